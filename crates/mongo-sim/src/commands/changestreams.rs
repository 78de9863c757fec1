//! Change-stream commands: opening a stream (`aggregate` with `$changeStream` first), the
//! validation the server does on it, and `getMore` on a stream cursor.

use std::sync::Arc;

use bson::{Bson, Document, RawDocumentBuf};

use super::cursors::GetMore;
use crate::{
    changestream::{OpenRequest, StreamCursor, stream_reply},
    error::{CmdError, CmdResult, code},
    state::{Cursor, State},
};

/// Opens a change stream for `aggregate` whose first stage is `$changeStream`.
pub(crate) fn open_change_stream(
    state: &mut State,
    in_txn: bool,
    db: &str,
    cmd: &Document,
    spec: &Bson,
    pipeline: &[Bson],
    batch: usize,
) -> CmdResult<RawDocumentBuf> {
    let Bson::Document(spec) = spec else {
        return Err(CmdError::type_mismatch("$changeStream", "object"));
    };
    if pipeline[1..]
        .iter()
        .any(|s| matches!(s, Bson::Document(d) if d.contains_key("$changeStream")))
    {
        return Err(CmdError::new(
            40602,
            "$changeStream is only valid as the first stage in a pipeline",
        ));
    }
    if in_txn {
        return Err(CmdError::new(
            code::OPERATION_NOT_SUPPORTED_IN_TRANSACTION,
            "Operation not permitted in transaction :: caused by :: $changeStream cannot run in a multi-document transaction",
        ));
    }
    check_read_concern(cmd)?;
    let target = cmd.get("aggregate").unwrap_or(&Bson::Null);
    let log = Arc::clone(&state.log);
    let log = log.lock();
    let mut stream = StreamCursor::open(
        &log,
        OpenRequest {
            db,
            target,
            spec,
            rest: &pipeline[1..],
        },
    )?;
    let (events, pbrt) = stream.next_batch(&log, &state.dbs, batch)?;
    std::mem::drop(log);
    let ns = stream.ns.clone();
    let id = if stream.closed {
        0
    } else {
        state.add_cursor(Cursor::Stream(Box::new(stream)))
    };
    stream_reply(true, events, &pbrt, id, &ns)
}

/// Change streams read at `majority`: an absent read concern is upgraded to it, any other
/// level given explicitly is refused (InvalidOptions), an unknown level fails to parse.
fn check_read_concern(cmd: &Document) -> CmdResult<()> {
    let level = match cmd.get("readConcern") {
        None | Some(Bson::Null) => return Ok(()),
        Some(Bson::Document(rc)) => match rc.get("level") {
            None => return Ok(()),
            Some(Bson::String(level)) => level.as_str(),
            Some(_) => return Err(CmdError::type_mismatch("readConcern.level", "string")),
        },
        Some(_) => return Err(CmdError::type_mismatch("readConcern", "object")),
    };
    match level {
        "majority" => Ok(()),
        "local" | "available" | "linearizable" | "snapshot" => Err(CmdError::new(
            code::INVALID_OPTIONS,
            format!(
                "Aggregation stage $changeStream cannot run with a readConcern other than 'majority'. Current readConcern: {level}"
            ),
        )),
        other => Err(CmdError::new(
            code::FAILED_TO_PARSE,
            format!(
                "readConcern.level must be either 'local', 'majority', 'linearizable', 'available', or 'snapshot', not '{other}'"
            ),
        )),
    }
}

/// What one look at a change stream's `getMore` found.
#[derive(Debug)]
pub(crate) enum StreamLook {
    /// Answer with this batch.
    Batch(RawDocumentBuf),
    /// Nothing yet: wait for the log to grow.
    Wait,
    /// Nothing yet, and more of the log to scan: let the lock go, then look again.
    Yield,
}

/// `getMore` on a change-stream cursor: a batch, or nothing yet while the wait is not
/// over. An error kills the cursor.
pub(crate) fn stream_get_more(
    state: &mut State,
    req: &GetMore,
    expired: bool,
) -> CmdResult<StreamLook> {
    let Some(Cursor::Stream(mut stream)) = state.cursors.remove(&req.id) else {
        return Err(CmdError::new(
            code::CURSOR_NOT_FOUND,
            format!("cursor id {} not found", req.id),
        ));
    };
    let (events, pbrt) = {
        let log = state.log.lock();
        stream.next_batch(&log, &state.dbs, req.batch.unwrap_or(usize::MAX))?
    };
    if events.is_empty() && !stream.closed && !expired {
        let look = if stream.yielded {
            StreamLook::Yield
        } else {
            StreamLook::Wait
        };
        state.cursors.insert(req.id, Cursor::Stream(stream));
        return Ok(look);
    }
    let ns = stream.ns.clone();
    let next_id = if stream.closed { 0 } else { req.id };
    if !stream.closed {
        state.cursors.insert(req.id, Cursor::Stream(stream));
    }
    stream_reply(false, events, &pbrt, next_id, &ns).map(StreamLook::Batch)
}
