//! The TCP server: accepts connections, reads requests, runs commands, writes replies.
//! A bad message closes only its own connection.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicI32, AtomicU8, Ordering},
    },
    time::Duration,
};

use bson::{Bson, Document, RawDocumentBuf};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
    time::Instant,
};

use crate::{
    changestream::to_raw,
    commands::{self, DEFAULT_AWAIT, GetMore, ServerInfo, Step},
    error::{CmdError, CmdResult, code},
    state::State,
    wire::{self, RequestBody},
};

/// State shared by the listener, every connection and the handle.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
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
}

impl Shared {
    /// New shared state for a server at `host`.
    pub(crate) fn new(info: ServerInfo, oplog_capacity: usize) -> Self {
        Self {
            state: Mutex::new(State::new(oplog_capacity)),
            head: watch::Sender::new(1),
            info,
            term: AtomicU8::new(1),
            paused: watch::Sender::new(false),
            kill: watch::Sender::new(0),
            next_request_id: AtomicI32::new(1),
        }
    }

    /// Locks the state. A panic elsewhere cannot leave it half-written (commands mutate it
    /// only after validating), so a poisoned lock is taken over.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes waiting change streams if the oplog grew.
    pub(crate) fn notify(&self, state: &State) {
        let next = state.log.next_seq;
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
                        let shared = Arc::clone(&shared);
                        let stop = stop.clone();
                        tokio::spawn(async move { connection(socket, peer, shared, stop).await });
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
    app_name: Option<String>,
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
    let id = {
        let mut st = shared.lock();
        let id = st.next_connection_id;
        st.next_connection_id += 1;
        id
    };
    let mut conn = Conn { id, app_name: None };
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
            RequestBody::Compressed => {
                let reply = error_reply(CmdError::new(
                    code::BAD_VALUE,
                    "OP_COMPRESSED is not supported: mongo-sim advertises no compressors",
                ));
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
    let firing = if name == "configureFailPoint" {
        None
    } else {
        shared.lock().faults.check(&name, conn.app_name.as_deref())
    };
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
    let result = if name == "getMore" {
        get_more(shared, &cmd).await?
    } else {
        let term = shared.term.load(Ordering::Relaxed);
        let mut state = shared.lock();
        let r = match state.faults.stepdown_error(&name) {
            Some(e) => Err(e),
            None => commands::run(&mut state, &shared.info, conn.id, term, &db, &name, &cmd),
        };
        shared.notify(&state);
        r
    };
    let mut reply = finish(shared, result);
    if let Some(wce) = write_concern_error
        && let Ok(wce) = to_raw(&wce)
    {
        reply.append(bson::cstr!("writeConcernError"), wce);
    }
    Some(reply)
}

fn finish(shared: &Shared, result: CmdResult<RawDocumentBuf>) -> RawDocumentBuf {
    let error = |e: CmdError| to_raw(&e.to_document()).unwrap_or_default();
    let mut reply = result.unwrap_or_else(error);
    let state = shared.lock();
    if let Ok(ct) = to_raw(&state.cluster_time_doc()) {
        reply.append(bson::cstr!("$clusterTime"), ct);
    }
    reply.append(bson::cstr!("operationTime"), state.log.last_ts);
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
            Step::Close => return None,
            Step::Wait => {
                // Woken by a new oplog entry, or the deadline: look again either way.
                let _ = tokio::time::timeout_at(deadline, head.changed()).await;
            }
        }
    }
}
