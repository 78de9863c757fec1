//! `readConcern` on reads outside transactions: the levels are checked, and `snapshot`
//! reads answer with the cluster time they read at (`atClusterTime`).
//!
//! Every read here runs whole under the state lock and its cursor holds the documents as
//! they were then, so a read *is* a snapshot of the moment it ran. What the simulator
//! cannot do is read an older moment: it keeps no old versions of documents, so a
//! `snapshot` read at an `atClusterTime` after which the collection changed is refused
//! with `SnapshotTooOld` (239), as a server whose history window has passed refuses it.

use bson::{Bson, Document, Timestamp};

use crate::{
    error::{CmdError, CmdResult, code},
    oplog::Op,
    state::State,
};

/// The commands that take `readConcern: { level: "snapshot" }` outside a transaction.
const SNAPSHOT_READS: [&str; 3] = ["find", "aggregate", "distinct"];

/// The levels MongoDB knows.
const LEVELS: [&str; 5] = ["local", "available", "majority", "linearizable", "snapshot"];

/// Checks a read's `readConcern`; `Some(time)` for a snapshot read, which reads at `time`.
pub(crate) fn snapshot_time(
    state: &State,
    name: &str,
    db: &str,
    coll: Option<&str>,
    cmd: &Document,
) -> CmdResult<Option<Timestamp>> {
    let rc = match cmd.get("readConcern") {
        None => return Ok(None),
        Some(Bson::Document(rc)) => rc,
        Some(_) => return Err(CmdError::type_mismatch("readConcern", "object")),
    };
    let level = match rc.get("level") {
        None => "local",
        Some(Bson::String(l)) if LEVELS.contains(&l.as_str()) => l.as_str(),
        Some(Bson::String(l)) => {
            return Err(CmdError::new(
                code::FAILED_TO_PARSE,
                format!("readConcern.level must be one of {LEVELS:?}, not '{l}'"),
            ));
        }
        Some(_) => return Err(CmdError::type_mismatch("readConcern.level", "string")),
    };
    let at = match rc.get("atClusterTime") {
        None => None,
        Some(Bson::Timestamp(ts)) => Some(*ts),
        Some(_) => {
            return Err(CmdError::type_mismatch(
                "readConcern.atClusterTime",
                "timestamp",
            ));
        }
    };
    if at.is_some() && level != "snapshot" {
        return Err(CmdError::new(
            code::INVALID_OPTIONS,
            "readConcern.atClusterTime is only valid with level snapshot",
        ));
    }
    if at.is_some() && rc.contains_key("afterClusterTime") {
        return Err(CmdError::new(
            code::INVALID_OPTIONS,
            "readConcern cannot have both atClusterTime and afterClusterTime",
        ));
    }
    if level != "snapshot" {
        return Ok(None);
    }
    if !SNAPSHOT_READS.contains(&name) {
        return Err(CmdError::new(
            code::INVALID_OPTIONS,
            format!("Command {name} does not support {{ readConcern: {{ level: \"snapshot\" }} }}"),
        ));
    }
    let now = state.log.last_ts;
    let Some(at) = at else {
        return Ok(Some(now));
    };
    let key = crate::changestream::ts_key;
    if key(at) > key(now) {
        return Err(CmdError::new(
            code::INVALID_OPTIONS,
            format!(
                "readConcern atClusterTime value {at} must not be greater than the current clusterTime {now}"
            ),
        ));
    }
    // The content at `at` is the current one when nothing touched the namespace since; the
    // log must reach back that far to tell.
    let too_old = || {
        CmdError::new(
            code::SNAPSHOT_TOO_OLD,
            format!(
                "Read timestamp {at} is older than the oldest available timestamp (mongo-sim keeps no older versions of documents)"
            ),
        )
    };
    if state.log.dropped_upto.is_some_and(|d| key(d) > key(at)) {
        return Err(too_old());
    }
    let touched = state
        .log
        .entries
        .iter()
        .rev()
        .take_while(|e| key(e.ts) > key(at))
        .any(|e| {
            (e.db == db && (coll.is_none_or(|c| c == e.coll) || matches!(e.op, Op::DropDatabase)))
                || matches!(&e.op, Op::Rename { to_db, to_coll, .. }
                if to_db == db && coll.is_none_or(|c| c == to_coll))
        });
    if touched {
        return Err(too_old());
    }
    Ok(Some(at))
}

/// A snapshot read's reply with the time it read at: in the cursor for `find` and
/// `aggregate`, at the top for `distinct`.
pub(crate) fn with_read_time(
    reply: bson::RawDocumentBuf,
    at: Timestamp,
) -> CmdResult<bson::RawDocumentBuf> {
    let mut out = bson::RawDocumentBuf::new();
    let mut in_cursor = false;
    for element in reply.iter() {
        let (key, value) =
            element.map_err(|e| CmdError::new(code::INTERNAL_ERROR, e.to_string()))?;
        match value {
            bson::RawBsonRef::Document(cursor) if key == "cursor" => {
                let mut cursor = cursor.to_owned();
                cursor.append(bson::cstr!("atClusterTime"), at);
                out.append(key, cursor);
                in_cursor = true;
            }
            other => out.append(key, other),
        }
    }
    if !in_cursor {
        out.append(bson::cstr!("atClusterTime"), at);
    }
    Ok(out)
}
