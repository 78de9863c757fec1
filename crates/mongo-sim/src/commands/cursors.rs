//! Cursors: first batches, `getMore` on plain cursors, `killCursors`.

use std::{collections::VecDeque, time::Duration};

use bson::{Bson, Document, RawDocumentBuf, doc};

use crate::{
    changestream::to_raw,
    error::{CmdError, CmdResult, code},
    state::{Cursor, State},
};

/// A reply with a first batch, leaving a cursor open for the rest.
pub(crate) fn cursor_reply(
    state: &mut State,
    ns: String,
    mut docs: VecDeque<Document>,
    batch: usize,
    single: bool,
) -> Document {
    let first: Vec<Document> = docs.drain(..batch.min(docs.len())).collect();
    let id = if docs.is_empty() || single {
        0
    } else {
        state.add_cursor(Cursor::Docs {
            ns: ns.clone(),
            docs,
        })
    };
    doc! { "cursor": { "firstBatch": first, "id": id, "ns": ns }, "ok": 1.0 }
}

/// `getMore` on a plain cursor. Change-stream cursors are served by the server loop, which
/// may wait for new events.
pub(crate) fn get_more_docs(state: &mut State, id: i64, batch: Option<usize>) -> CmdResult {
    let Some(Cursor::Docs { ns, docs }) = state.cursors.get_mut(&id) else {
        return Err(CmdError::new(
            code::CURSOR_NOT_FOUND,
            format!("cursor id {id} not found"),
        ));
    };
    let take = batch.unwrap_or(usize::MAX).min(docs.len());
    let next: Vec<Document> = docs.drain(..take).collect();
    let ns = ns.clone();
    let done = docs.is_empty();
    if done {
        state.cursors.remove(&id);
    }
    Ok(
        doc! { "cursor": { "nextBatch": next, "id": if done { 0 } else { id }, "ns": ns }, "ok": 1.0 },
    )
}

/// `killCursors`.
pub(crate) fn kill_cursors(state: &mut State, cmd: &Document) -> CmdResult {
    let Some(Bson::Array(ids)) = cmd.get("cursors") else {
        return Err(CmdError::type_mismatch("cursors", "array"));
    };
    let mut killed = Vec::new();
    let mut not_found = Vec::new();
    for id in ids {
        let id = match id {
            Bson::Int64(n) => *n,
            Bson::Int32(n) => i64::from(*n),
            _ => continue,
        };
        if state.cursors.remove(&id).is_some() {
            killed.push(Bson::Int64(id));
        } else {
            not_found.push(Bson::Int64(id));
        }
    }
    Ok(doc! {
        "cursorsKilled": killed,
        "cursorsNotFound": not_found,
        "cursorsAlive": [],
        "cursorsUnknown": [],
        "ok": 1.0,
    })
}

/// A parsed `getMore`.
#[derive(Debug)]
pub(crate) struct GetMore {
    /// The cursor.
    pub(crate) id: i64,
    /// `batchSize`, if given and positive.
    pub(crate) batch: Option<usize>,
    /// `maxTimeMS`, if given: how long an awaitData cursor (a change stream) may wait.
    pub(crate) max_time: Option<Duration>,
}

/// How long a change stream's `getMore` waits for an event when `maxTimeMS` is absent.
pub(crate) const DEFAULT_AWAIT: Duration = Duration::from_secs(1);

impl GetMore {
    /// Validates a `getMore` command as the server does.
    pub(crate) fn parse(cmd: &Document) -> CmdResult<Self> {
        let id = match cmd.get("getMore") {
            Some(Bson::Int64(n)) => *n,
            _ => return Err(CmdError::type_mismatch("getMore", "long")),
        };
        let batch = match get_number(cmd, "batchSize")? {
            None | Some(0) => None,
            Some(n) if n < 0 => {
                return Err(CmdError::new(
                    code::BAD_VALUE,
                    format!("Batch size for getMore must be positive, but received: {n}"),
                ));
            }
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        let max_time = match get_number(cmd, "maxTimeMS")? {
            None => None,
            Some(n) if !(0..=i64::from(i32::MAX)).contains(&n) => {
                return Err(CmdError::new(
                    code::BAD_VALUE,
                    format!("{n} value for maxTimeMS is out of range [0, {}]", i32::MAX),
                ));
            }
            Some(n) => Some(Duration::from_millis(n.unsigned_abs())),
        };
        Ok(Self {
            id,
            batch,
            max_time,
        })
    }
}

fn get_number(cmd: &Document, field: &str) -> CmdResult<Option<i64>> {
    match cmd.get(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Int32(n)) => Ok(Some(i64::from(*n))),
        Some(Bson::Int64(n)) => Ok(Some(*n)),
        Some(Bson::Double(n)) if n.fract() == 0.0 => Ok(Some(*n as i64)),
        Some(_) => Err(CmdError::type_mismatch(field, "long")),
    }
}

/// What one look at a `getMore` decided.
#[derive(Debug)]
pub(crate) enum Step {
    /// Answer with this.
    Reply(CmdResult<RawDocumentBuf>),
    /// A change stream with nothing new yet: wait for the oplog to grow or the deadline.
    Wait,
    /// Close the connection without answering (a fail point asked for it).
    Close,
}

/// One look at a `getMore`: `first` on the look that checks the cursor out (fail points
/// fire there), `expired` once the wait is over (an empty batch is the answer).
pub(crate) fn get_more(state: &mut State, req: &GetMore, first: bool, expired: bool) -> Step {
    let stream = match state.cursors.get(&req.id) {
        None => {
            return Step::Reply(Err(CmdError::new(
                code::CURSOR_NOT_FOUND,
                format!("cursor id {} not found", req.id),
            )));
        }
        Some(Cursor::Stream(_)) => true,
        Some(Cursor::Docs { .. }) => false,
    };
    if !stream && req.max_time.is_some() {
        return Step::Reply(Err(CmdError::bad_value(
            "cannot set maxTimeMS on getMore command for a non-awaitData cursor",
        )));
    }
    let failure = match state.faults.stepdown_error("getMore") {
        Some(e) => Some((e, false)),
        None if first => state.faults.check_get_more(),
        None => None,
    };
    if let Some((error, close)) = failure {
        // A failed getMore kills its cursor, as on the server.
        state.cursors.remove(&req.id);
        if close {
            return Step::Close;
        }
        return Step::Reply(Err(if stream {
            crate::error::label_change_stream_error(error)
        } else {
            error
        }));
    }
    if !stream {
        return Step::Reply(get_more_docs(state, req.id, req.batch).and_then(|d| to_raw(&d)));
    }
    match super::changestreams::stream_get_more(state, req, expired) {
        Ok(Some(reply)) => Step::Reply(Ok(reply)),
        Ok(None) => Step::Wait,
        Err(e) => Step::Reply(Err(crate::error::label_change_stream_error(e))),
    }
}
