//! The TCP server: accepts connections, reads requests, runs commands, writes replies.
//! A bad message closes only its own connection.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicI32, AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

use bson::{Bson, Document, RawDocumentBuf, doc};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    time::Instant,
};

use crate::{
    changestream::to_raw,
    commands::{self, Connections, Ctx, DEFAULT_AWAIT, GetMore, Outcome, ServerInfo, Step},
    error::{CmdError, CmdResult, code},
    state::{Cursor, State},
    status,
    timed::{TimedGuard, TimedMutex},
    wire::{self, RequestBody},
};

/// State shared by the listener, every connection and the handle.
#[derive(Debug)]
pub(crate) struct Shared {
    state: TimedMutex<State>,
    /// The next oplog sequence number; waiting `getMore`s watch it.
    pub(crate) head: watch::Sender<u64>,
    /// Host and replica set name.
    pub(crate) info: ServerInfo,
    /// The election term (bumped at each step-up).
    pub(crate) term: AtomicU8,
    /// While true, requests are read but not answered.
    pub(crate) paused: watch::Sender<bool>,
    /// Bumped to make every open connection close.
    pub(crate) kill: watch::Sender<u64>,
    next_request_id: AtomicI32,
    /// One permit per connection the server may hold open (`maxIncomingConnections`).
    pub(crate) connection_slots: Arc<Semaphore>,
    /// The most connections open at once.
    pub(crate) max_connections: usize,
    /// Connections accepted since start.
    pub(crate) total_connections: AtomicU64,
    /// When the server started (for `uptime`).
    pub(crate) started: std::time::Instant,
    /// The oplog (also in the state), for writes that run with no server lock held.
    pub(crate) log: Arc<crate::oplog::OplogLock>,
}

impl Shared {
    /// New shared state for a server at `host`.
    /// Bounds the oplog by bytes too (see [`crate::SimOptions::oplog_size_bytes`]).
    pub(crate) fn set_oplog_size(&self, bytes: Option<usize>) {
        let mut log = self.log.lock();
        log.max_bytes = bytes;
        log.trim();
    }

    pub(crate) fn new(info: ServerInfo, oplog_capacity: usize, max_connections: usize) -> Self {
        let state = State::new(oplog_capacity);
        Self {
            log: Arc::clone(&state.log),
            connection_slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            total_connections: AtomicU64::new(0),
            started: std::time::Instant::now(),
            state: TimedMutex::new(state),
            head: watch::Sender::new(1),
            info,
            term: AtomicU8::new(1),
            paused: watch::Sender::new(false),
            kill: watch::Sender::new(0),
            next_request_id: AtomicI32::new(1),
        }
    }

    /// Locks the state. A panic elsewhere cannot leave it half-written (commands mutate it
    /// only after validating), so a poisoned lock is taken over. How long it is held is
    /// counted ([`Shared::lock_held`]).
    pub(crate) fn lock(&self) -> TimedGuard<'_, State> {
        self.state.lock()
    }

    /// How long the state lock has been held in all, since the server started.
    pub(crate) fn lock_held(&self) -> Duration {
        self.state.held()
    }

    /// Connections open now.
    pub(crate) fn open_connections(&self) -> usize {
        self.max_connections - self.connection_slots.available_permits()
    }

    /// Wakes waiting change streams if the oplog grew.
    pub(crate) fn notify(&self) {
        let next = self.log.lock().next_seq;
        self.head.send_if_modified(|h| {
            let changed = *h != next;
            *h = next;
            changed
        });
    }
}

/// Accepts connections until `stop` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                match accepted {
                    Ok((socket, peer)) => {
                        // Over the cap the connection is closed at once, as mongod does.
                        let Ok(slot) = Arc::clone(&shared.connection_slots).try_acquire_owned() else {
                            tracing::warn!(%peer, "connection refused: too many open connections");
                            drop(socket);
                            continue;
                        };
                        shared.total_connections.fetch_add(1, Ordering::Relaxed);
                        let shared = Arc::clone(&shared);
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            connection(socket, peer, shared, stop).await;
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            _ = stop.changed() => return,
        }
    }
}

struct Conn {
    id: i64,
    peer: String,
    app_name: Option<String>,
}

/// Logs a connection's end however it ends.
struct ConnectionLog<'a> {
    shared: &'a Shared,
    id: i64,
    peer: String,
}

impl Drop for ConnectionLog<'_> {
    fn drop(&mut self) {
        let open = self.shared.open_connections().saturating_sub(1);
        self.shared.lock().activity.log(
            "NETWORK",
            22944,
            &format!("conn{}", self.id),
            "Connection ended",
            doc! { "remote": self.peer.clone(), "connectionId": self.id, "connectionCount": i64::try_from(open).unwrap_or(i64::MAX) },
        );
    }
}

/// Ends an operation's `currentOp` entry however the command ends.
struct OpGuard<'a> {
    shared: &'a Shared,
    opid: i64,
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().activity.end(self.opid);
    }
}

async fn connection(
    socket: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = socket.set_nodelay(true);
    let (mut reader, mut writer) = socket.into_split();
    let mut kill = shared.kill.subscribe();
    kill.mark_unchanged();
    let open = shared.open_connections();
    let id = {
        let mut st = shared.lock();
        let id = st.next_connection_id;
        st.next_connection_id += 1;
        st.activity.log(
            "NETWORK",
            22943,
            "listener",
            "Connection accepted",
            doc! { "remote": peer.to_string(), "connectionId": id, "connectionCount": i64::try_from(open).unwrap_or(i64::MAX) },
        );
        id
    };
    let _logged = ConnectionLog {
        shared: &shared,
        id,
        peer: peer.to_string(),
    };
    let mut conn = Conn {
        id,
        peer: peer.to_string(),
        app_name: None,
    };
    loop {
        let request = tokio::select! {
            r = wire::read_request(&mut reader) => r,
            _ = kill.changed() => return,
            _ = stop.changed() => return,
        };
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "closing connection");
                return;
            }
        };
        // Paused: hold the request, answer nothing, until resumed.
        let mut paused = shared.paused.subscribe();
        while *paused.borrow_and_update() {
            tokio::select! {
                _ = paused.changed() => {}
                _ = kill.changed() => return,
                _ = stop.changed() => return,
            }
        }
        let (command, legacy, more_to_come) = match request.body {
            RequestBody::Msg {
                command,
                more_to_come,
            } => (command, false, more_to_come),
            RequestBody::Query {
                full_collection_name,
                mut command,
            } => {
                let db = full_collection_name
                    .strip_suffix(".$cmd")
                    .unwrap_or("admin")
                    .to_owned();
                command.insert("$db", db);
                (command, true, false)
            }
            RequestBody::Compressed | RequestBody::Refused(_) => {
                let error = match request.body {
                    RequestBody::Refused(e) => e,
                    _ => CmdError::new(
                        code::BAD_VALUE,
                        "OP_COMPRESSED is not supported: mongo-sim advertises no compressors",
                    ),
                };
                let reply = error_reply(error);
                if write_reply(&shared, &mut writer, request.request_id, &reply, false)
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        let outcome = tokio::select! {
            o = handle(&shared, &mut conn, command) => o,
            () = peer_gone(&mut reader) => return,
            _ = kill.changed() => return,
            _ = stop.changed() => return,
        };
        let Some(reply) = outcome else { return };
        if more_to_come {
            continue;
        }
        if write_reply(&shared, &mut writer, request.request_id, &reply, legacy)
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Resolves when the peer has closed its side (or the socket failed), so a command that
/// waits (a `getMore` with a long `maxTimeMS`) ends with its client. Pending forever while
/// the peer is connected, including when it already sent its next request.
async fn peer_gone(reader: &mut tokio::net::tcp::OwnedReadHalf) {
    let mut byte = [0u8; 1];
    match reader.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

async fn write_reply(
    shared: &Shared,
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    response_to: i32,
    reply: &RawDocumentBuf,
    legacy: bool,
) -> std::io::Result<()> {
    let request_id = shared.next_request_id.fetch_add(1, Ordering::Relaxed);
    let bytes = if legacy {
        wire::encode_reply(request_id, response_to, reply)
    } else {
        wire::encode_msg(request_id, response_to, reply)
    }
    .map_err(std::io::Error::other)?;
    writer.write_all(&bytes).await
}

/// Runs one command; `None` means "close the connection without answering".
async fn handle(shared: &Shared, conn: &mut Conn, cmd: Document) -> Option<RawDocumentBuf> {
    let Some(name) = cmd.keys().next().cloned() else {
        return Some(error_reply(CmdError::new(
            code::FAILED_TO_PARSE,
            "empty command",
        )));
    };
    let db = match cmd.get("$db") {
        Some(Bson::String(db)) => db.clone(),
        _ => {
            return Some(error_reply(CmdError::new(
                40571,
                "OP_MSG requests require a $db argument",
            )));
        }
    };
    if matches!(name.as_str(), "hello" | "isMaster" | "ismaster")
        && let Some(app) = cmd
            .get_document("client")
            .ok()
            .and_then(|c| c.get_document("application").ok())
            .and_then(|a| a.get_str("name").ok())
    {
        conn.app_name = Some(app.to_owned());
    }
    let ns = match cmd.get(&name) {
        Some(Bson::String(coll)) => format!("{db}.{coll}"),
        _ => match cmd.get_str("collection") {
            Ok(coll) => format!("{db}.{coll}"),
            Err(_) => format!("{db}.$cmd"),
        },
    };
    // One hold of the lock for the fail points and the operation's `currentOp` entry
    // (summarised before it is taken).
    let op = status::Op {
        connection_id: conn.id,
        client: conn.peer.clone(),
        app_name: conn.app_name.clone(),
        name: name.clone(),
        ns,
        command: status::summarise(&cmd),
        started: std::time::Instant::now(),
    };
    let (firing, opid) = {
        let mut state = shared.lock();
        let firing = if name == "configureFailPoint" {
            None
        } else {
            state.faults.check(&name, conn.app_name.as_deref())
        };
        state.activity.counters.count(&name, &cmd);
        let opid = state.activity.begin(op);
        (firing, opid)
    };
    let _op = OpGuard { shared, opid };
    let mut write_concern_error = None;
    if let Some(f) = firing {
        if let Some(block) = f.block {
            tokio::time::sleep(block).await;
        }
        if f.close {
            return None;
        }
        if let Some(err) = f.error {
            return Some(finish(shared, Err(err)));
        }
        write_concern_error = f.write_concern_error;
    }
    let (result, time) = if name == "getMore" {
        (get_more(shared, &cmd).await?, None)
    } else {
        let ctx = Ctx {
            info: &shared.info,
            conn_id: conn.id,
            term: shared.term.load(Ordering::Relaxed),
            connections: Connections {
                current: shared.open_connections(),
                available: shared.connection_slots.available_permits(),
                total_created: shared.total_connections.load(Ordering::Relaxed),
            },
            uptime: shared.started.elapsed(),
        };
        // The reply's cluster time is the one the command ran at, taken in the same hold.
        let (outcome, time) = {
            let mut state = shared.lock();
            let outcome = match state.faults.stepdown_error(&name) {
                Some(e) => Outcome::Reply(Err(e)),
                None => commands::run(&mut state, &ctx, &db, &name, &cmd),
            };
            shared.notify();
            (outcome, state.log.last_ts())
        };
        let (result, time) = match outcome {
            Outcome::Reply(r) => (r, time),
            // A read's scan, copy and encoding, and a write outside a transaction, run
            // here with no server lock held.
            later => {
                let wrote = matches!(later, Outcome::Write(_));
                let mut resolve = |db: &str, name: &str, create: bool| {
                    let mut state = shared.lock();
                    let handle = commands::resolve(&mut state, db, name, create);
                    shared.notify();
                    handle
                };
                let register = |c| shared.lock().add_cursor(Cursor::Docs(Box::new(c)));
                let result = later.finish(&cmd, register, &mut resolve);
                if wrote {
                    // The reply's cluster time covers the command's own writes.
                    shared.notify();
                    (result, shared.log.last_ts())
                } else {
                    (result, time)
                }
            }
        };
        (result, Some(time))
    };
    let mut reply = match time {
        Some(time) => finish_at(result, time),
        None => finish(shared, result),
    };
    if let Some(wce) = write_concern_error
        && let Ok(wce) = to_raw(&wce)
    {
        reply.append(bson::cstr!("writeConcernError"), wce);
    }
    Some(reply)
}

fn finish(shared: &Shared, result: CmdResult<RawDocumentBuf>) -> RawDocumentBuf {
    let time = shared.log.last_ts();
    finish_at(result, time)
}

/// The reply with `$clusterTime` and `operationTime` at `time`.
fn finish_at(result: CmdResult<RawDocumentBuf>, time: bson::Timestamp) -> RawDocumentBuf {
    let error = |e: CmdError| to_raw(&e.to_document()).unwrap_or_default();
    let mut reply = result.unwrap_or_else(error);
    if let Ok(ct) = to_raw(&State::cluster_time_at(time)) {
        reply.append(bson::cstr!("$clusterTime"), ct);
    }
    reply.append(bson::cstr!("operationTime"), time);
    reply
}

fn error_reply(e: CmdError) -> RawDocumentBuf {
    to_raw(&e.to_document()).unwrap_or_default()
}

/// `getMore`: a change stream waits up to `maxTimeMS` (default 1 s) for an event; the
/// wait ends early when the oplog grows. `None` closes the connection.
async fn get_more(shared: &Shared, cmd: &Document) -> Option<CmdResult<RawDocumentBuf>> {
    let req = match GetMore::parse(cmd) {
        Ok(req) => req,
        Err(e) => return Some(Err(e)),
    };
    let deadline = Instant::now() + req.max_time.unwrap_or(DEFAULT_AWAIT);
    let mut first = true;
    loop {
        let mut head = shared.head.subscribe();
        let step = {
            let mut state = shared.lock();
            commands::get_more(&mut state, &req, first, Instant::now() >= deadline)
        };
        first = false;
        match step {
            Step::Reply(reply) => return Some(reply),
            Step::Read(cursor, batch) => {
                // Read with no lock held; the cursor goes back for the next getMore.
                let (reply, rest) = commands::get_more_docs(*cursor, req.id, batch);
                if let Some(rest) = rest {
                    shared
                        .lock()
                        .cursors
                        .insert(req.id, Cursor::Docs(Box::new(rest)));
                }
                return Some(reply);
            }
            Step::Close => return None,
            Step::Yield => tokio::task::yield_now().await,
            Step::Wait => {
                // Woken by a new oplog entry, or the deadline: look again either way.
                let _ = tokio::time::timeout_at(deadline, head.changed()).await;
            }
        }
    }
}
