//! Command handlers by family. Each runs under the state lock and returns a reply body
//! (without `$clusterTime`, which the server adds); [`run`] dispatches by command name.

mod admin;
mod changestreams;
mod crud;
mod cursors;
mod ddl;
mod failpoints;
#[cfg(test)]
mod model_tests;
mod read_concern;
mod sharding;
mod txn;
mod writer;

use std::{collections::HashMap, sync::Arc};

use bson::{Bson, Document, RawDocumentBuf, doc};

use crate::{
    changestream::to_raw,
    engine::{Handle, Ts},
    error::{CmdError, CmdResult, code},
    oplog::OplogLock,
    state::State,
};

pub(crate) use writer::{Resolve, resolve};

pub(crate) use admin::*;
pub(crate) use crud::*;
pub(crate) use cursors::*;
pub(crate) use ddl::*;
pub(crate) use failpoints::*;
pub(crate) use txn::*;

/// The default first batch size of cursors.
const DEFAULT_BATCH: usize = 101;

/// Facts about the server that replies carry.
#[derive(Debug, Clone)]
pub(crate) struct ServerInfo {
    /// `host:port` as clients reach it.
    pub(crate) host: String,
    /// The replica set's name.
    pub(crate) set_name: String,
}

/// A collection's namespace within a command.
fn coll_name<'a>(cmd: &'a Document, name: &str) -> CmdResult<&'a str> {
    match cmd.get(name) {
        Some(Bson::String(s)) if !s.is_empty() => Ok(s),
        _ => Err(CmdError::new(
            code::INVALID_NAMESPACE,
            format!("collection name must be a non-empty string in '{name}'"),
        )),
    }
}

fn get_doc<'a>(cmd: &'a Document, field: &str) -> CmdResult<Option<&'a Document>> {
    match cmd.get(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Document(d)) => Ok(Some(d)),
        Some(_) => Err(CmdError::type_mismatch(field, "object")),
    }
}

fn get_usize(cmd: &Document, field: &str) -> CmdResult<Option<i64>> {
    match cmd.get(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Int32(n)) => Ok(Some(i64::from(*n))),
        Some(Bson::Int64(n)) => Ok(Some(*n)),
        Some(Bson::Double(n)) if n.fract() == 0.0 => Ok(Some(*n as i64)),
        Some(_) => Err(CmdError::type_mismatch(field, "number")),
    }
}

/// A count that must not be negative (`skip`, `batchSize`): the server's IDL validator
/// refuses a negative one with code 51024.
fn get_count(cmd: &Document, field: &str) -> CmdResult<Option<usize>> {
    match get_usize(cmd, field)? {
        None => Ok(None),
        Some(n) if n < 0 => Err(CmdError::new(
            51024,
            format!("BSON field '{field}' value must be >= 0, actual value '{n}'"),
        )),
        Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
    }
}

fn truthy(v: Option<&Bson>) -> bool {
    match v {
        Some(Bson::Boolean(b)) => *b,
        Some(Bson::Int32(n)) => *n != 0,
        Some(Bson::Int64(n)) => *n != 0,
        Some(Bson::Double(n)) => *n != 0.0,
        _ => false,
    }
}

/// What a command may need to know beyond the data: the server, the connection, the
/// election term, the connection counts and the uptime.
#[derive(Debug)]
pub(crate) struct Ctx<'a> {
    /// Host and replica set name.
    pub(crate) info: &'a ServerInfo,
    /// The connection running the command.
    pub(crate) conn_id: i64,
    /// The election term.
    pub(crate) term: u8,
    /// Connection counts.
    pub(crate) connections: Connections,
    /// Time since the server started.
    pub(crate) uptime: std::time::Duration,
}

/// `serverStatus.connections`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Connections {
    /// Open now.
    pub(crate) current: usize,
    /// Still allowed.
    pub(crate) available: usize,
    /// Accepted since start.
    pub(crate) total_created: u64,
}

fn from_raw(raw: &RawDocumentBuf) -> CmdResult<Document> {
    Document::try_from(raw.as_ref()).map_err(|e| CmdError::new(code::INTERNAL_ERROR, e.to_string()))
}

/// What a command gave under the state lock.
pub(crate) enum Outcome {
    /// The reply.
    Reply(CmdResult<RawDocumentBuf>),
    /// A read to finish with no lock held: a cursor's first batch.
    Cursor(Box<OpenCursor>),
    /// A read to finish with no lock held: a computed reply (with the snapshot time it
    /// read at, for a snapshot read).
    Compute(crud::Job, Option<bson::Timestamp>),
    /// Writes outside a transaction, to run with no server lock held.
    Write(Box<WriteJob>),
}

/// The commands that write documents.
#[derive(Clone, Copy, Debug)]
enum WriteCmd {
    Insert,
    Update,
    Delete,
    FindAndModify,
}

impl WriteCmd {
    fn of(name: &str) -> Option<Self> {
        Some(match name {
            "insert" => Self::Insert,
            "update" => Self::Update,
            "delete" => Self::Delete,
            "findAndModify" => Self::FindAndModify,
            _ => return None,
        })
    }

    /// The command's name, also the field naming its collection.
    fn name(self) -> &'static str {
        match self {
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::FindAndModify => "findAndModify",
        }
    }

    fn run(self, w: &mut writer::Writer<'_>, db: &str, cmd: &Document) -> CmdResult {
        match self {
            Self::Insert => insert(w, db, cmd),
            Self::Update => update(w, db, cmd),
            Self::Delete => delete(w, db, cmd),
            Self::FindAndModify => find_and_modify(w, db, cmd),
        }
    }
}

/// A write command outside a transaction, with what it needs to run with no server
/// lock held: the commit lock, the history horizon and the handle of its collection,
/// taken with the command.
pub(crate) struct WriteJob {
    cmd: WriteCmd,
    db: String,
    log: Arc<OplogLock>,
    horizon: Ts,
    handles: HashMap<(String, String), Handle>,
}

impl WriteJob {
    fn new(state: &mut State, write: WriteCmd, db: &str, cmd: &Document) -> Self {
        let mut handles = HashMap::new();
        // A collection that is not there yet, or cannot be written, is left to the
        // command (it creates it, or tells the error in its place).
        if let Some(Bson::String(coll)) = cmd.get(write.name())
            && let Ok(Some(h)) = resolve(state, db, coll, false)
        {
            handles.insert((db.to_owned(), coll.clone()), h);
        }
        Self {
            cmd: write,
            db: db.to_owned(),
            log: Arc::clone(&state.log),
            horizon: state.horizon(),
            handles,
        }
    }

    /// Runs the command; `resolve` takes the server lock to create a collection or take
    /// a handle again.
    fn run(self, cmd: &Document, resolve: &mut Resolve<'_>) -> CmdResult<RawDocumentBuf> {
        let mut w = writer::Writer::live(self.log, self.horizon, self.handles, resolve);
        to_raw(&self.cmd.run(&mut w, &self.db, cmd)?)
    }
}

impl Outcome {
    /// Finishes a read or a write with no lock held: `register` keeps a cursor with more
    /// results and gives its id; `resolve` is a write's way back to the server lock.
    pub(crate) fn finish(
        self,
        cmd: &Document,
        register: impl FnOnce(DocCursor) -> i64,
        resolve: &mut Resolve<'_>,
    ) -> CmdResult<RawDocumentBuf> {
        match self {
            Self::Reply(r) => r,
            Self::Write(job) => job.run(cmd, resolve),
            Self::Cursor(open) => open.read(register),
            Self::Compute(job, at) => {
                let mut reply = job()?;
                if let Some(at) = at {
                    reply.insert("atClusterTime", at);
                }
                to_raw(&reply)
            }
        }
    }
}

/// Runs one command under the state lock (every command but `getMore`, which may wait).
/// Reads outside a transaction come back as work to finish after the lock is released.
pub(crate) fn run(
    state: &mut State,
    ctx: &Ctx<'_>,
    db: &str,
    name: &str,
    cmd: &Document,
) -> Outcome {
    match run_locked(state, ctx, db, name, cmd) {
        Ok(outcome) => outcome,
        Err(e) => Outcome::Reply(Err(e)),
    }
}

fn run_locked(
    state: &mut State,
    ctx: &Ctx<'_>,
    db: &str,
    name: &str,
    cmd: &Document,
) -> CmdResult<Outcome> {
    let raw = |r: CmdResult| Ok(Outcome::Reply(r.and_then(|d| to_raw(&d))));
    sharding::refuse_unknown(state.sharded, name)?;
    match name {
        "hello" | "isMaster" | "ismaster" if state.sharded => {
            return raw(Ok(sharding::hello_mongos(ctx, name != "hello")));
        }
        "hello" => return raw(Ok(hello(state, ctx, false))),
        "isMaster" | "ismaster" => return raw(Ok(hello(state, ctx, true))),
        "isdbgrid" => return raw(Ok(sharding::isdbgrid(ctx))),
        "listShards" => return raw(admin_only(db, name).map(|()| sharding::list_shards(ctx))),
        "enableSharding" => return raw(sharding::enable_sharding(db)),
        "shardCollection" => return raw(sharding::shard_collection(state, db, cmd)),
        "getCmdLineOpts" => return raw(admin_only(db, name).map(|()| cmd_line_opts(ctx))),
        "serverStatus" => return raw(Ok(server_status(state, ctx))),
        "getParameter" => return raw(admin_only(db, name).and_then(|()| get_parameter(state, cmd))),
        "replSetGetStatus" => {
            return raw(admin_only(db, name).map(|()| repl_set_status(state, ctx)));
        }
        "replSetGetConfig" => return raw(admin_only(db, name).map(|()| repl_set_config(ctx))),
        "hostInfo" => return raw(Ok(host_info())),
        "currentOp" => return raw(admin_only(db, name).and_then(|()| current_op(state, ctx, cmd))),
        "dbStats" => return raw(Ok(db_stats(state, db))),
        "collStats" => return raw(coll_stats(state, db, cmd)),
        "splitVector" => return Ok(Outcome::Compute(split_vector(state, cmd)?, None)),
        "connectionStatus" => return raw(Ok(connection_status(cmd))),
        "getLog" => return raw(admin_only(db, name).and_then(|()| get_log(state, cmd))),
        "ping" | "endSessions" | "killAllSessions" | "killSessions" | "refreshSessions" => {
            return raw(Ok(doc! { "ok": 1.0 }));
        }
        "buildInfo" | "buildinfo" => return raw(Ok(build_info())),
        "configureFailPoint" => return raw(configure_fail_point(state, db, cmd)),
        "killCursors" => return raw(kill_cursors(state, cmd)),
        "create" => return raw(create(state, db, cmd)),
        "drop" => return raw(drop(state, db, cmd)),
        "dropDatabase" => return raw(drop_database(state, db)),
        "renameCollection" => return raw(rename_collection(state, db, cmd)),
        "collMod" => return raw(coll_mod(state, db, cmd)),
        "createIndexes" => return raw(create_indexes(state, db, cmd)),
        "dropIndexes" | "deleteIndexes" => return raw(drop_indexes(state, db, cmd)),
        "listIndexes" => return raw(list_indexes(state, db, cmd)),
        "listCollections" => return raw(list_collections(state, db, cmd)),
        "listDatabases" => return raw(list_databases(state, cmd)),
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
            | "distinct"
            | "commitTransaction"
            | "abortTransaction"
    );
    if !transactional {
        return Err(CmdError::new(
            code::COMMAND_NOT_FOUND,
            format!("no such command: '{name}'"),
        ));
    }
    let entered = enter_txn(state, cmd)?;
    let Some((key, mut txn)) = entered else {
        let read_at = if matches!(name, "find" | "aggregate" | "count" | "distinct") {
            let coll = match cmd.get(name) {
                Some(Bson::String(c)) => Some(c.as_str()),
                _ => None,
            };
            read_concern::snapshot_time(state, name, db, coll, cmd)?
        } else {
            None
        };
        let at = crud::Read::At(crate::engine::ts(
            read_at.unwrap_or_else(|| state.log.last_ts()),
        ));
        if let Some(write) = WriteCmd::of(name) {
            return Ok(Outcome::Write(Box::new(WriteJob::new(
                state, write, db, cmd,
            ))));
        }
        return match name {
            "find" => {
                let mut open = find(state, at, db, cmd)?;
                open.cursor.read_time = read_at;
                Ok(Outcome::Cursor(Box::new(open)))
            }
            "aggregate" => match aggregate(state, at, db, cmd)? {
                crud::Aggregate::Done(reply) => Ok(Outcome::Reply(Ok(reply))),
                crud::Aggregate::Cursor(mut open) => {
                    open.cursor.read_time = read_at;
                    Ok(Outcome::Cursor(open))
                }
            },
            "count" => Ok(Outcome::Compute(count(state, at, db, cmd)?, read_at)),
            "distinct" => Ok(Outcome::Compute(distinct(state, at, db, cmd)?, read_at)),
            _ => Err(CmdError::new(
                code::NO_SUCH_TRANSACTION,
                format!("{name} needs a transaction (autocommit: false)"),
            )),
        };
    };
    let reply = |r: CmdResult| r.map(|d| Outcome::Reply(to_raw(&d)));
    let result = match name {
        "commitTransaction" => return raw(commit_transaction(state, key, txn)),
        "abortTransaction" => return raw(Ok(doc! { "ok": 1.0 })),
        _ if let Some(write) = WriteCmd::of(name) => {
            reply(write.run(&mut writer::Writer::txn(state, &mut txn), db, cmd))
        }
        // Reads see the transaction's snapshot and writes, read after the lock is let go.
        "find" => {
            find(state, crud::Read::Txn(&txn), db, cmd).map(|open| Outcome::Cursor(Box::new(open)))
        }
        "aggregate" => aggregate(state, crud::Read::Txn(&txn), db, cmd).map(|a| match a {
            crud::Aggregate::Done(r) => Outcome::Reply(Ok(r)),
            crud::Aggregate::Cursor(open) => Outcome::Cursor(open),
        }),
        "distinct" => {
            distinct(state, crud::Read::Txn(&txn), db, cmd).map(|job| Outcome::Compute(job, None))
        }
        _ => count(state, crud::Read::Txn(&txn), db, cmd).map(|job| Outcome::Compute(job, None)),
    };
    // A write conflict aborts the transaction, as on the server.
    if !matches!(&result, Err(e) if e.code == code::WRITE_CONFLICT) {
        state.txns.insert(key, txn);
    }
    result
}
