//! Commands about the server itself: the handshake, build and status information.

use crate::catalog::IdOrd;
use bson::{Bson, Document, doc, oid::ObjectId};

use super::*;
use crate::{
    error::{CmdError, CmdResult, code},
    state::State,
    wire::{MAX_BSON_OBJECT_SIZE, MAX_MESSAGE_SIZE},
};

/// The `hello` / `isMaster` reply.
pub(crate) fn hello(state: &State, ctx: &Ctx<'_>, legacy: bool) -> Document {
    let (info, connection_id, term) = (ctx.info, ctx.conn_id, ctx.term);
    let primary = !state.faults.stepped_down;
    let mut reply = Document::new();
    reply.insert(writable_field(legacy), primary);
    reply.insert("secondary", !primary);
    reply.insert("helloOk", true);
    reply.insert("setName", info.set_name.clone());
    reply.insert("setVersion", 1);
    reply.insert("hosts", vec![info.host.clone()]);
    if primary {
        reply.insert("primary", info.host.clone());
        let mut election = [0u8; 12];
        election[..4].copy_from_slice(&[0x7f, 0xff, 0xff, 0xff]);
        election[11] = term;
        reply.insert("electionId", ObjectId::from_bytes(election));
    }
    reply.insert("me", info.host.clone());
    hello_limits(&mut reply, connection_id);
    let last = state.log.last_ts();
    let op_time = doc! { "ts": last, "t": i64::from(term) };
    let date = bson::DateTime::from_millis(i64::from(last.time) * 1000);
    reply.insert(
        "lastWrite",
        doc! { "opTime": op_time.clone(), "lastWriteDate": date, "majorityOpTime": op_time, "majorityWriteDate": date },
    );
    reply.insert("ok", 1.0);
    reply
}

/// The field saying whether the server takes writes: `ismaster` in the legacy reply,
/// `isWritablePrimary` in `hello`'s.
pub(crate) fn writable_field(legacy: bool) -> &'static str {
    if legacy {
        "ismaster"
    } else {
        "isWritablePrimary"
    }
}

/// The limits and versions every `hello` reply carries (a replica set member's and a
/// `mongos`'s alike).
pub(crate) fn hello_limits(reply: &mut Document, connection_id: i64) {
    reply.insert("maxBsonObjectSize", MAX_BSON_OBJECT_SIZE as i32);
    reply.insert("maxMessageSizeBytes", MAX_MESSAGE_SIZE as i32);
    reply.insert("maxWriteBatchSize", 100_000);
    reply.insert("localTime", bson::DateTime::now());
    reply.insert("logicalSessionTimeoutMinutes", 30);
    reply.insert("connectionId", connection_id);
    reply.insert("minWireVersion", 0);
    reply.insert("maxWireVersion", 21);
    reply.insert("readOnly", false);
}

/// `buildInfo`.
pub(crate) fn build_info() -> Document {
    doc! {
        "version": VERSION,
        "versionArray": [7, 0, 12, 0],
        "gitVersion": "mongo-sim",
        "bits": 64,
        "maxBsonObjectSize": MAX_BSON_OBJECT_SIZE as i32,
        "storageEngines": ["mongo-sim"],
        "ok": 1.0,
    }
}

/// Commands that run on `admin` only refuse other databases as the server does.
pub(crate) fn admin_only(db: &str, name: &str) -> CmdResult<()> {
    if db == "admin" {
        Ok(())
    } else {
        Err(CmdError::new(
            code::UNAUTHORIZED,
            format!("{name} may only be run against the admin database."),
        ))
    }
}

fn port_of(host: &str) -> i32 {
    host.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(27017)
}

/// `getCmdLineOpts`: the options the simulated `mongod` runs with. Test commands are
/// enabled (fail points work); there is no authentication and no TLS.
pub(crate) fn cmd_line_opts(ctx: &Ctx<'_>) -> Document {
    let port = port_of(&ctx.info.host);
    doc! {
        "argv": [
            "mongod", "--replSet", ctx.info.set_name.clone(), "--bind_ip", "127.0.0.1",
            "--port", port.to_string(), "--setParameter", "enableTestCommands=1",
        ],
        "parsed": {
            "net": { "bindIp": "127.0.0.1", "port": port },
            "replication": { "replSet": ctx.info.set_name.clone() },
            "setParameter": { "enableTestCommands": "1" },
        },
        "ok": 1.0,
    }
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The `repl` section of `serverStatus` (the `hello` facts).
fn repl_section(state: &State, ctx: &Ctx<'_>) -> Document {
    let hello = hello(state, ctx, false);
    let mut repl = Document::new();
    for key in [
        "hosts",
        "setName",
        "setVersion",
        "isWritablePrimary",
        "secondary",
        "primary",
        "me",
        "electionId",
        "lastWrite",
    ] {
        if let Some(v) = hello.get(key) {
            repl.insert(key, v.clone());
        }
    }
    repl.insert("rbid", 1);
    repl
}

/// `serverStatus`, with the sections tools read: `host`, `version`, `process`, `pid`,
/// `uptime`, `localTime`, `connections`, `repl`, `opcounters`. Sections the simulator has
/// no truth for (storage engine internals, `mem`, `metrics`) are left out, as a server
/// leaves out sections it does not have.
pub(crate) fn server_status(state: &State, ctx: &Ctx<'_>) -> Document {
    let c = ctx.connections;
    doc! {
        "host": ctx.info.host.clone(),
        "version": VERSION,
        "process": "mongod",
        "pid": i64::from(std::process::id()),
        "uptime": ctx.uptime.as_secs_f64().floor(),
        "uptimeMillis": millis(ctx.uptime),
        "uptimeEstimate": i64::try_from(ctx.uptime.as_secs()).unwrap_or(i64::MAX),
        "localTime": bson::DateTime::now(),
        "connections": {
            "current": i32::try_from(c.current).unwrap_or(i32::MAX),
            "available": i32::try_from(c.available).unwrap_or(i32::MAX),
            "totalCreated": i64::try_from(c.total_created).unwrap_or(i64::MAX),
            "active": i32::try_from(state.activity.ops.len()).unwrap_or(i32::MAX),
        },
        "repl": repl_section(state, ctx),
        "opcounters": state.activity.counters.to_document(),
        "storageEngine": { "name": "mongo-sim", "supportsCommittedReads": true, "persistent": false },
        "ok": 1.0,
    }
}

/// The version the simulator reports.
pub(crate) const VERSION: &str = "7.0.12";

/// The server parameters `getParameter` reads, with their values.
fn parameters(state: &State) -> Document {
    doc! {
        "minSnapshotHistoryWindowInSeconds": i32::try_from(state.history.window_secs).unwrap_or(i32::MAX),
        "featureCompatibilityVersion": { "version": "7.0" },
        "enableTestCommands": true,
        "authenticationMechanisms": [],
        "requireApiVersion": false,
        "transactionLifetimeLimitSeconds": i32::try_from(state.txn_lifetime.as_secs()).unwrap_or(i32::MAX),
        "maxBSONDepth": i32::try_from(crate::wire::MAX_BSON_DEPTH).unwrap_or(i32::MAX),
        "changeStreamOptions": { "preAndPostImages": { "expireAfterSeconds": "off" } },
        "logLevel": 0,
        "quiet": false,
    }
}

/// `getParameter`: `"*"` (or `{ allParameters: true }`) for all, otherwise each named one;
/// naming none that exists is InvalidOptions, as on the server.
pub(crate) fn get_parameter(state: &State, cmd: &Document) -> CmdResult {
    let all = parameters(state);
    let everything = match cmd.get("getParameter") {
        Some(Bson::String(s)) => s == "*",
        Some(Bson::Document(d)) => d.get_bool("allParameters").unwrap_or(false),
        _ => false,
    };
    let mut reply = Document::new();
    for (k, v) in &all {
        if everything || (k != "getParameter" && cmd.contains_key(k)) {
            reply.insert(k.clone(), v.clone());
        }
    }
    if reply.is_empty() {
        return Err(CmdError::new(
            code::INVALID_OPTIONS,
            "no option found to get",
        ));
    }
    reply.insert("ok", 1.0);
    Ok(reply)
}

/// `replSetGetStatus`: one member, this node.
pub(crate) fn repl_set_status(state: &State, ctx: &Ctx<'_>) -> Document {
    let primary = !state.faults.stepped_down;
    let (state_num, state_str) = if primary {
        (1, "PRIMARY")
    } else {
        (2, "SECONDARY")
    };
    let ts = state.log.last_ts();
    let op_time = doc! { "ts": ts, "t": i64::from(ctx.term) };
    let date = bson::DateTime::from_millis(i64::from(ts.time) * 1000);
    let mut me = doc! {
        "_id": 0,
        "name": ctx.info.host.clone(),
        "health": 1.0,
        "state": state_num,
        "stateStr": state_str,
        "uptime": i64::try_from(ctx.uptime.as_secs()).unwrap_or(i64::MAX),
        "optime": op_time.clone(),
        "optimeDate": date,
        "configVersion": 1,
        "configTerm": i64::from(ctx.term),
        "self": true,
    };
    if primary {
        me.insert("electionDate", date);
    }
    doc! {
        "set": ctx.info.set_name.clone(),
        "date": bson::DateTime::now(),
        "myState": state_num,
        "term": i64::from(ctx.term),
        "heartbeatIntervalMillis": 2000_i64,
        "majorityVoteCount": 1,
        "writeMajorityCount": 1,
        "votingMembersCount": 1,
        "writableVotingMembersCount": 1,
        "optimes": {
            "lastCommittedOpTime": op_time.clone(),
            "appliedOpTime": op_time.clone(),
            "durableOpTime": op_time,
        },
        "members": [me],
        "ok": 1.0,
    }
}

/// `replSetGetConfig`: a one-member set.
pub(crate) fn repl_set_config(ctx: &Ctx<'_>) -> Document {
    doc! {
        "config": {
            "_id": ctx.info.set_name.clone(),
            "version": 1,
            "term": i64::from(ctx.term),
            "members": [ {
                "_id": 0,
                "host": ctx.info.host.clone(),
                "arbiterOnly": false,
                "buildIndexes": true,
                "hidden": false,
                "priority": 1.0,
                "tags": {},
                "secondaryDelaySecs": 0_i64,
                "votes": 1,
            } ],
            "protocolVersion": 1_i64,
            "writeConcernMajorityJournalDefault": true,
            "settings": {
                "chainingAllowed": true,
                "heartbeatIntervalMillis": 2000,
                "heartbeatTimeoutSecs": 10,
                "electionTimeoutMillis": 10000,
                "catchUpTimeoutMillis": -1,
                "catchUpTakeoverDelayMillis": 30000,
                "getLastErrorModes": {},
                "getLastErrorDefaults": { "w": 1, "wtimeout": 0 },
            },
        },
        "ok": 1.0,
    }
}

/// Total memory in MiB from `/proc/meminfo`, where the OS has it.
fn mem_size_mb() -> Option<i64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// `hostInfo`: read from the machine the simulator runs on.
pub(crate) fn host_info() -> Document {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    let mut system = doc! {
        "currentTime": bson::DateTime::now(),
        "hostname": hostname,
        "cpuAddrSize": i32::try_from(usize::BITS).unwrap_or(64),
        "numCores": i32::try_from(cores).unwrap_or(i32::MAX),
        "cpuArch": std::env::consts::ARCH,
        "numaEnabled": false,
    };
    if let Some(mb) = mem_size_mb() {
        system.insert("memSizeMB", mb);
        system.insert("memLimitMB", mb);
    }
    let os_type = match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "windows" => "Windows",
        other => other,
    };
    doc! {
        "system": system,
        "os": { "type": os_type },
        "extra": {},
        "ok": 1.0,
    }
}

/// `currentOp`: the operations in progress (the `currentOp` itself among them), filtered
/// by the command's other fields as a query, as the server filters them.
pub(crate) fn current_op(state: &State, ctx: &Ctx<'_>, cmd: &Document) -> CmdResult {
    let mut filter = Document::new();
    for (k, v) in cmd {
        match k.as_str() {
            "currentOp" | "$all" | "$ownOps" | "$db" | "lsid" | "$clusterTime"
            | "$readPreference" | "comment" => {}
            _ => {
                filter.insert(k.clone(), v.clone());
            }
        }
    }
    let filter = crate::matcher::Filter::parse(&filter)?;
    let mut inprog = Vec::new();
    for (opid, op) in &state.activity.ops {
        let running = op.started.elapsed();
        let mut d = doc! {
            "type": "op",
            "host": ctx.info.host.clone(),
            "desc": format!("conn{}", op.connection_id),
            "connectionId": op.connection_id,
            "client": op.client.clone(),
            "active": true,
            "opid": *opid,
            "secs_running": i64::try_from(running.as_secs()).unwrap_or(i64::MAX),
            "microsecs_running": i64::try_from(running.as_micros()).unwrap_or(i64::MAX),
            "op": match op.name.as_str() {
                "insert" => "insert",
                "update" => "update",
                "delete" => "remove",
                "find" => "query",
                "getMore" => "getmore",
                _ => "command",
            },
            "ns": op.ns.clone(),
            "command": op.command.clone(),
            "waitingForLock": false,
        };
        if let Some(app) = &op.app_name {
            d.insert("appName", app.clone());
        }
        if filter.matches(&d) {
            inprog.push(d);
        }
    }
    Ok(doc! { "inprog": inprog, "ok": 1.0 })
}

/// `dbStats`: counts and sizes of a database (sizes are the documents' BSON sizes; the
/// simulator keeps no pages, so storage size equals data size and index size is 0).
pub(crate) fn db_stats(state: &State, db: &str) -> Document {
    let colls = state.dbs.get(db);
    let (mut collections, mut views, mut objects, mut data, mut indexes) = (0, 0, 0, 0, 0);
    for c in colls.into_iter().flat_map(|d| d.values()) {
        if c.view.is_some() {
            views += 1;
            continue;
        }
        collections += 1;
        objects += count(c.len());
        data += count(c.data_size());
        indexes += 1 + count(c.indexes.len());
    }
    let avg = if objects > 0 {
        data as f64 / objects as f64
    } else {
        0.0
    };
    doc! {
        "db": db,
        "collections": collections,
        "views": views,
        "objects": objects,
        "avgObjSize": avg,
        "dataSize": data as f64,
        "storageSize": data as f64,
        "indexes": indexes,
        "indexSize": 0.0,
        "totalSize": data as f64,
        "scaleFactor": 1.0,
        "ok": 1.0,
    }
}

/// `collStats` (deprecated in 7.0 but still answered): sizes of one collection. A view is
/// refused (CommandNotSupportedOnView), a missing collection is NamespaceNotFound.
pub(crate) fn coll_stats(state: &State, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "collStats")?;
    let ns = format!("{db}.{name}");
    let Some(c) = state.dbs.get(db).and_then(|d| d.get(name)) else {
        return Err(CmdError::new(
            code::NAMESPACE_NOT_FOUND,
            format!("Collection [{ns}] not found."),
        ));
    };
    if c.view.is_some() {
        return Err(CmdError::new(
            code::COMMAND_NOT_SUPPORTED_ON_VIEW,
            format!("Namespace {ns} is a view, not a collection"),
        ));
    }
    let n = count(c.len());
    let size = count(c.data_size());
    let mut index_sizes = doc! { "_id_": 0 };
    for spec in &c.indexes {
        if let Ok(name) = spec.get_str("name") {
            index_sizes.insert(name, 0);
        }
    }
    Ok(doc! {
        "ns": ns,
        "size": size,
        "count": n,
        "avgObjSize": if n > 0 { size / n } else { 0 },
        "storageSize": size,
        "nindexes": 1 + count(c.indexes.len()),
        "indexBuilds": [],
        "totalIndexSize": 0,
        "totalSize": size,
        "indexSizes": index_sizes,
        "capped": false,
        "scaleFactor": 1,
        "ok": 1.0,
    })
}

/// `connectionStatus`: no authentication, so no users and no roles.
pub(crate) fn connection_status(cmd: &Document) -> Document {
    let mut auth = doc! { "authenticatedUsers": [], "authenticatedUserRoles": [] };
    if cmd.get_bool("showPrivileges").unwrap_or(false) {
        auth.insert("authenticatedUserPrivileges", Vec::<Bson>::new());
    }
    doc! { "authInfo": auth, "ok": 1.0 }
}

/// The startup warning a server without access control logs.
fn startup_warnings() -> Vec<String> {
    vec![Bson::Document(doc! {
        "s": "W",
        "c": "CONTROL",
        "id": 22120,
        "ctx": "initandlisten",
        "msg": "Access control is not enabled for the database. Read and write access to data and configuration is unrestricted",
        "tags": ["startupWarnings"],
    })
    .into_relaxed_extjson()
    .to_string()]
}

/// `getLog`: `"*"` lists the logs, `global` holds recent lines (connections accepted and
/// ended), `startupWarnings` the warnings; any other name is refused.
pub(crate) fn get_log(state: &State, cmd: &Document) -> CmdResult {
    let Some(Bson::String(which)) = cmd.get("getLog") else {
        return Err(CmdError::type_mismatch("getLog", "string"));
    };
    match which.as_str() {
        "*" => Ok(doc! { "names": ["global", "startupWarnings"], "ok": 1.0 }),
        "global" => Ok(doc! {
            "totalLinesWritten": state.activity.log_written,
            "log": state.activity.log.iter().cloned().collect::<Vec<_>>(),
            "ok": 1.0,
        }),
        "startupWarnings" => {
            let log = startup_warnings();
            Ok(doc! { "totalLinesWritten": count(log.len()), "log": log, "ok": 1.0 })
        }
        other => Err(CmdError::new(
            code::OPERATION_FAILED,
            format!("No log named '{other}'"),
        )),
    }
}

/// `splitVector` (an internal command drivers' tools use to split a collection for
/// parallel reads): split points along the `_id` index so each range holds about
/// `maxChunkObjects` documents or half of `maxChunkSize(Bytes)`, as the server computes
/// them. Only the `_id` index exists here: another key pattern is IndexNotFound.
pub(crate) fn split_vector(state: &State, cmd: &Document) -> CmdResult<super::crud::Job> {
    let ns = match cmd.get("splitVector") {
        Some(Bson::String(ns)) => ns.as_str(),
        _ => return Err(CmdError::type_mismatch("splitVector", "string")),
    };
    let Some((db, name)) = ns.split_once('.') else {
        return Err(CmdError::new(
            code::INVALID_NAMESPACE,
            format!("Invalid namespace specified '{ns}'"),
        ));
    };
    let pattern = match cmd.get("keyPattern") {
        Some(Bson::Document(p)) => p,
        _ => return Err(CmdError::type_mismatch("keyPattern", "object")),
    };
    let by_id = pattern.len() == 1
        && matches!(pattern.get("_id"), Some(Bson::Int32(1) | Bson::Int64(1)))
        || matches!(pattern.get("_id"), Some(Bson::Double(d)) if *d == 1.0 && pattern.len() == 1);
    if !by_id {
        return Err(CmdError::new(
            code::INDEX_NOT_FOUND,
            format!("couldn't find index over splitting key {pattern}"),
        ));
    }
    let number = |field: &str| -> CmdResult<Option<i64>> {
        match cmd.get(field) {
            None | Some(Bson::Null) => Ok(None),
            Some(Bson::Int32(n)) => Ok(Some(i64::from(*n))),
            Some(Bson::Int64(n)) => Ok(Some(*n)),
            Some(Bson::Double(n)) => Ok(Some(*n as i64)),
            Some(_) => Err(CmdError::type_mismatch(field, "number")),
        }
    };
    let force = cmd
        .get("force")
        .is_some_and(|f| !matches!(f, Bson::Boolean(false) | Bson::Null));
    let max_bytes = match (number("maxChunkSizeBytes")?, number("maxChunkSize")?) {
        (Some(b), _) => Some(b),
        (None, Some(mb)) => Some(mb.saturating_mul(1024 * 1024)),
        (None, None) => None,
    };
    if max_bytes.is_none() && !force {
        return Err(CmdError::bad_value(
            "need to specify the desired max chunk size (maxChunkSize or maxChunkSizeBytes)",
        ));
    }
    let max_objects = number("maxChunkObjects")?.filter(|n| *n > 0);
    let max_points = number("maxSplitPoints")?.filter(|n| *n > 0);
    let Some(c) = state.dbs.get(db).and_then(|d| d.get(name)) else {
        return Err(CmdError::new(code::NAMESPACE_NOT_FOUND, "ns not found"));
    };
    let bound = |field: &str| -> CmdResult<std::ops::Bound<IdOrd>> {
        match cmd.get(field) {
            None => Ok(std::ops::Bound::Unbounded),
            Some(Bson::Document(d)) if d.is_empty() => Ok(std::ops::Bound::Unbounded),
            Some(Bson::Document(d)) => match d.get("_id") {
                Some(Bson::MinKey | Bson::MaxKey) => Ok(std::ops::Bound::Unbounded),
                Some(v) => Ok(if field == "min" {
                    std::ops::Bound::Included(IdOrd(v.clone()))
                } else {
                    std::ops::Bound::Excluded(IdOrd(v.clone()))
                }),
                None => Err(CmdError::bad_value(format!(
                    "{field} must be a prefix of the key pattern"
                ))),
            },
            Some(_) => Err(CmdError::type_mismatch(field, "object")),
        }
    };
    let range = (bound("min")?, bound("max")?);
    if let (std::ops::Bound::Included(l), std::ops::Bound::Excluded(h)) = (&range.0, &range.1)
        && l >= h
    {
        return Ok(Box::new(|| Ok(doc! { "splitKeys": [], "ok": 1.0 })));
    }
    let records = count(c.len());
    let size = count(c.data_size());
    // The keys are read from a view of now, with no lock held.
    let view = state
        .history
        .view(c, crate::engine::ts(state.log.last_ts()));
    Ok(Box::new(move || {
        split_points(
            &view,
            range,
            force,
            records,
            size,
            max_bytes,
            max_objects,
            max_points,
        )
    }))
}

#[allow(clippy::too_many_arguments)]
fn split_points(
    view: &crate::engine::View,
    range: (std::ops::Bound<IdOrd>, std::ops::Bound<IdOrd>),
    force: bool,
    records: i64,
    size: i64,
    max_bytes: Option<i64>,
    max_objects: Option<i64>,
    max_points: Option<i64>,
) -> CmdResult {
    let (low, high) = range;
    let mut split_keys: Vec<Bson> = Vec::new();
    if force {
        // One split point, at the middle of the range: count the keys, then walk to it.
        let mut n = 0_usize;
        view.walk_ids(&low, &high, |_| {
            n += 1;
            true
        });
        if n > 1 {
            let mut i = 0;
            view.walk_ids(&low, &high, |id| {
                if i == n / 2 {
                    split_keys.push(Bson::Document(doc! { "_id": id.clone() }));
                    return false;
                }
                i += 1;
                true
            });
        }
        return Ok(doc! { "splitKeys": split_keys, "ok": 1.0 });
    }
    let max_bytes = max_bytes.unwrap_or(i64::MAX);
    if records == 0 || size < max_bytes {
        return Ok(doc! { "splitKeys": split_keys, "ok": 1.0 });
    }
    let average = (size / records).max(1);
    let mut per_chunk = max_bytes / (2 * average);
    if let Some(objects) = max_objects
        && objects < per_chunk
    {
        per_chunk = objects;
    }
    let mut in_chunk = 0_i64;
    view.walk_ids(&low, &high, |key| {
        if in_chunk > per_chunk {
            split_keys.push(Bson::Document(doc! { "_id": key.clone() }));
            in_chunk = 0;
            if max_points.is_some_and(|m| count(split_keys.len()) >= m) {
                return false;
            }
        }
        in_chunk += 1;
        true
    });
    Ok(doc! { "splitKeys": split_keys, "ok": 1.0 })
}
