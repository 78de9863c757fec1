//! `readConcern` on reads outside transactions: the levels are checked, and `snapshot`
//! reads answer with the cluster time they read at (`atClusterTime`).
//!
//! A read takes a view of the time it reads at (the newest, or `atClusterTime`) and its
//! cursor keeps that view. Documents keep their versions for the history window
//! (`--snapshot-history-secs`, MongoDB's `minSnapshotHistoryWindowInSeconds`): a
//! `snapshot` read before it is `SnapshotTooOld` (239), as on a server; so is one of a
//! namespace dropped or renamed since that time (the catalog keeps no history).

use bson::{Bson, Document, Timestamp};

use crate::{
    error::{CmdError, CmdResult, code},
    state::State,
};

/// The commands that take `readConcern: { level: "snapshot" }` outside a transaction.
const SNAPSHOT_READS: [&str; 3] = ["find", "aggregate", "distinct"];

/// The levels MongoDB knows.
const LEVELS: [&str; 5] = ["local", "available", "majority", "linearizable", "snapshot"];

/// Checks a read's `readConcern`; `Some(time)` for a snapshot read, which reads at `time`.
pub(crate) fn snapshot_time(
    state: &mut State,
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
    let now = state.log.last_ts();
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
    // Versions reach back to the history horizon; what a namespace held before it was
    // dropped or renamed away is not kept.
    let too_old = |why: &str| {
        CmdError::new(
            code::SNAPSHOT_TOO_OLD,
            format!("Read timestamp {at} is older than the oldest available timestamp ({why})"),
        )
    };
    let at_key = crate::engine::ts(at);
    if at_key < state.horizon() {
        return Err(too_old(&format!(
            "the history window is {} s",
            state.history.window_secs
        )));
    }
    // A namespace dropped or renamed away since `at`: the server reports the catalog
    // change as SnapshotUnavailable (246); mongo-sim keeps no catalog history to read it.
    let replaced = |ns: &str| state.replaced_at.get(ns).is_some_and(|t| *t > at_key);
    if replaced(db) || coll.is_some_and(|c| replaced(&format!("{db}.{c}"))) {
        return Err(CmdError::new(
            code::SNAPSHOT_UNAVAILABLE,
            format!(
                "Unable to read from a snapshot at {at}: the collection catalog changed since (the namespace was dropped or renamed); please retry the operation"
            ),
        ));
    }
    Ok(Some(at))
}
