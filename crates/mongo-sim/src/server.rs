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

use bson::{Bson, Document, RawDocumentBuf, doc};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
    time::Instant,
};

use crate::{
    changestream::{stream_reply, to_raw},
    commands::{self, ServerInfo},
    error::{CmdError, CmdResult, code},
    state::{Cursor, State},
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
        let next = state.next_seq;
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
        get_more(shared, &cmd).await
    } else {
        let term = shared.term.load(Ordering::Relaxed);
        let mut state = shared.lock();
        let r = match state.faults.stepdown_error(&name) {
            Some(e) => Err(e),
            None => run_sync(&mut state, &shared.info, conn.id, term, &db, &name, &cmd),
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
    reply.append(bson::cstr!("operationTime"), state.last_ts);
    reply
}

fn error_reply(e: CmdError) -> RawDocumentBuf {
    to_raw(&e.to_document()).unwrap_or_default()
}

fn run_sync(
    state: &mut State,
    info: &ServerInfo,
    conn_id: i64,
    term: u8,
    db: &str,
    name: &str,
    cmd: &Document,
) -> CmdResult<RawDocumentBuf> {
    let raw = |r: CmdResult| r.and_then(|d| to_raw(&d));
    match name {
        "hello" => return raw(Ok(commands::hello(state, info, false, conn_id, term))),
        "isMaster" | "ismaster" => {
            return raw(Ok(commands::hello(state, info, true, conn_id, term)));
        }
        "ping" | "endSessions" | "killAllSessions" | "killSessions" | "refreshSessions" => {
            return raw(Ok(doc! { "ok": 1.0 }));
        }
        "buildInfo" | "buildinfo" => return raw(Ok(commands::build_info())),
        "configureFailPoint" => {
            if db != "admin" {
                return Err(CmdError::new(
                    code::UNAUTHORIZED,
                    "configureFailPoint may only be run against the admin database.",
                ));
            }
            state.faults.configure(cmd)?;
            return raw(Ok(doc! { "ok": 1.0 }));
        }
        "killCursors" => return raw(commands::kill_cursors(state, cmd)),
        "create" => return raw(commands::create(state, db, cmd)),
        "drop" => return raw(commands::drop(state, db, cmd)),
        "dropDatabase" => return raw(commands::drop_database(state, db)),
        "renameCollection" => return raw(commands::rename_collection(state, db, cmd)),
        "collMod" => return raw(commands::coll_mod(state, db, cmd)),
        "createIndexes" => return raw(commands::create_indexes(state, db, cmd)),
        "dropIndexes" | "deleteIndexes" => return raw(commands::drop_indexes(state, db, cmd)),
        "listIndexes" => return raw(commands::list_indexes(state, db, cmd)),
        "listCollections" => return raw(commands::list_collections(state, db, cmd)),
        "listDatabases" => return raw(commands::list_databases(state, cmd)),
        _ => {}
    }
    let transactional = matches!(
        name,
        "insert"
            | "update"
            | "delete"
            | "findAndModify"
            | "find"
            | "aggregate"
            | "count"
            | "commitTransaction"
            | "abortTransaction"
    );
    if !transactional {
        return Err(CmdError::new(
            code::COMMAND_NOT_FOUND,
            format!("no such command: '{name}'"),
        ));
    }
    let entered = commands::enter_txn(state, cmd)?;
    let Some((key, mut txn)) = entered else {
        return match name {
            "insert" => raw(commands::insert(state, None, db, cmd)),
            "update" => raw(commands::update(state, None, db, cmd)),
            "delete" => raw(commands::delete(state, None, db, cmd)),
            "findAndModify" => raw(commands::find_and_modify(state, None, db, cmd)),
            "find" => raw(commands::find(state, None, db, cmd)),
            "aggregate" => commands::aggregate(state, None, db, cmd),
            "count" => raw(commands::count(state, None, db, cmd)),
            _ => Err(CmdError::new(
                code::NO_SUCH_TRANSACTION,
                format!("{name} needs a transaction (autocommit: false)"),
            )),
        };
    };
    let result = match name {
        "commitTransaction" => return raw(commands::commit_transaction(state, key, txn)),
        "abortTransaction" => return raw(Ok(doc! { "ok": 1.0 })),
        "insert" => raw(commands::insert(state, Some(&mut txn), db, cmd)),
        "update" => raw(commands::update(state, Some(&mut txn), db, cmd)),
        "delete" => raw(commands::delete(state, Some(&mut txn), db, cmd)),
        "findAndModify" => raw(commands::find_and_modify(state, Some(&mut txn), db, cmd)),
        "find" => raw(commands::find(state, Some(&txn), db, cmd)),
        "aggregate" => commands::aggregate(state, Some(&txn), db, cmd),
        _ => raw(commands::count(state, Some(&txn), db, cmd)),
    };
    state.txns.insert(key, txn);
    result
}

fn as_i64(v: Option<&Bson>) -> Option<i64> {
    match v {
        Some(Bson::Int64(n)) => Some(*n),
        Some(Bson::Int32(n)) => Some(i64::from(*n)),
        Some(Bson::Double(n)) if n.fract() == 0.0 => Some(*n as i64),
        _ => None,
    }
}

/// `getMore`: a change stream waits up to `maxTimeMS` (default 1 s) for an event.
async fn get_more(shared: &Shared, cmd: &Document) -> CmdResult<RawDocumentBuf> {
    let id =
        as_i64(cmd.get("getMore")).ok_or_else(|| CmdError::type_mismatch("getMore", "long"))?;
    let batch = as_i64(cmd.get("batchSize"))
        .filter(|n| *n > 0)
        .map(|n| n as usize);
    let wait = Duration::from_millis(as_i64(cmd.get("maxTimeMS")).unwrap_or(1000).max(0) as u64);
    let deadline = Instant::now() + wait;
    loop {
        let mut head = shared.head.subscribe();
        {
            let mut state = shared.lock();
            if let Some(e) = state.faults.stepdown_error("getMore") {
                return Err(e);
            }
            let cursor = state.cursors.remove(&id);
            let mut stream = match cursor {
                None => {
                    return Err(CmdError::new(
                        code::CURSOR_NOT_FOUND,
                        format!("cursor id {id} not found"),
                    ));
                }
                Some(docs @ Cursor::Docs { .. }) => {
                    state.cursors.insert(id, docs);
                    return commands::get_more_docs(&mut state, id, batch).and_then(|d| to_raw(&d));
                }
                Some(Cursor::Stream(s)) => s,
            };
            let (events, pbrt) = stream.next_batch(&state, batch.unwrap_or(usize::MAX))?;
            if !events.is_empty() || stream.closed || Instant::now() >= deadline {
                let ns = stream.ns.clone();
                let next_id = if stream.closed { 0 } else { id };
                if !stream.closed {
                    state.cursors.insert(id, Cursor::Stream(stream));
                }
                return stream_reply(false, events, &pbrt, next_id, &ns);
            }
            state.cursors.insert(id, Cursor::Stream(stream));
        }
        if tokio::time::timeout_at(deadline, head.changed())
            .await
            .is_err()
        {
            // One more look at the deadline: answer with an empty batch.
            continue;
        }
    }
}
