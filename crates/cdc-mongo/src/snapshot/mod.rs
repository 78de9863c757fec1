//! Snapshots: the documents that exist first, then the stream, with no gap and no stale
//! overwrite.
//!
//! The algorithm ("chunks at their read time", after DBLog's watermarks): before reading
//! anything, the change stream's position `P` is taken. The collection is then read in
//! `_id` order in chunks, each a snapshot read (`readConcern: snapshot`) whose cluster time
//! `T` the server tells. The stream is read alongside, from `P`, and its events are handed
//! over as they come, except that a chunk's documents take their place in the order exactly
//! at `T`: they are handed over once every stream event up to `T` has been, and before any
//! later one. A document so handed over is the document as it was at that point of the
//! order, so for every key a consumer applying events in delivery order sees its versions
//! in the order they were made, and ends with the collection's content.
//!
//! When the stream has already gone past a chunk's time (a document read again, below,
//! made it wait for a later time), a document of the chunk whose key had a stream event
//! after `T` is older than what was handed over: it is read again on its own, at a time
//! no earlier than the stream's position, and handed over at that time (or left out if it
//! was deleted by then; its delete comes from the stream). Chunks are opened one after
//! the other, each after the one before told its time, so chunk times never go backwards
//! (if they do, after a failover, the cursor fails with a transient error and the
//! processor continues from its stored point).
//!
//! Every document that exists at `P` is in some chunk unless it is deleted before its
//! chunk is read, and then its delete comes from the stream; every change after `P` comes
//! from the stream: no gap.
//!
//! A snapshot is resumable through the ordinary checkpoints: every event handed over
//! during it carries a snapshot token (the stream's position, the collection, the last
//! `_id` handed over; a stream event also keeps its own `_data`), and opening at one
//! continues the stream after that position and the reading after that `_id`.
//!
//! Limits: the stream must stay within the oplog's window while the snapshot is read
//! (`ChangeStreamHistoryLost` otherwise, which `WhenNeeded` answers with a new snapshot);
//! one chunk must be read within the server's snapshot history window
//! (`minSnapshotHistoryWindowInSeconds`, 300 s by default; `SnapshotTooOld` otherwise);
//! snapshot reads need MongoDB 5.0 or later.

mod cursor;
mod position;
mod scan;

use std::sync::Arc;

use bson::RawDocumentBuf;
use cdc_core::{ChangeCursor, StartPosition};

pub(crate) use position::SnapshotPosition;

pub(crate) use crate::options::SnapshotMode;
use crate::{Error, cursor::Inner, options::Scope};
use cursor::SnapshotCursor;

/// Starts a snapshot: takes the stream's position first, then reads.
pub(crate) async fn start(inner: &Arc<Inner>) -> cdc_core::Result<Box<dyn ChangeCursor>> {
    let coll = match &inner.scope {
        Scope::Collection { coll, .. } => coll.clone(),
        // Collections are read in name order, from the first.
        Scope::Database(_) => String::new(),
        Scope::Deployment => {
            return Err(cdc_core::Error::InvalidArgument {
                name: "snapshot",
                reason: "snapshots read a collection or a database, not a whole deployment".into(),
            });
        }
    };
    let stream = inner.open_stream(&StartPosition::Now).await?;
    let start = stream
        .resume_token()
        .as_ref()
        .and_then(crate::cursor::from_driver_token)
        .ok_or_else(|| {
            cdc_core::Error::source(
                cdc_core::ErrorKind::Fatal,
                "the server gave no resume token when the stream opened: a snapshot cannot mark where the stream continues",
            )
        })?;
    drop(stream);
    let start_time = start.cluster_time_hint().unwrap_or_default();
    let position = SnapshotPosition {
        start,
        start_time,
        id: start_time,
        coll,
        after: None,
        filter: None,
        single: false,
    };
    tracing::info!(scope = %inner.scope, "snapshot: the stream's position is taken; reading the documents");
    Ok(Box::new(SnapshotCursor::new(inner, position)))
}

/// Reads the documents `request` names while `stream` goes on (an incremental snapshot):
/// the same hand-over as an initial snapshot, from the stream's current position.
pub(crate) async fn incremental(
    inner: &Arc<Inner>,
    stream: Box<dyn ChangeCursor>,
    request: &cdc_core::SnapshotRequest,
) -> Result<Box<dyn ChangeCursor>, (Box<dyn ChangeCursor>, cdc_core::Error)> {
    let refuse = |reason: String| cdc_core::Error::InvalidArgument {
        name: "snapshot request",
        reason,
    };
    let (db, coll, single) = match (&inner.scope, &request.collection) {
        (Scope::Collection { db, coll }, None) => (db, coll.clone(), false),
        (Scope::Collection { db, coll }, Some(c)) if c == coll => (db, coll.clone(), false),
        (Scope::Database(db), Some(c)) => (db, c.clone(), true),
        (Scope::Database(db), None) => (db, String::new(), false),
        (scope, Some(c)) => {
            return Err((
                stream,
                refuse(format!(
                    "collection `{c}` is not watched by this source ({scope})"
                )),
            ));
        }
        (Scope::Deployment, None) => {
            return Err((
                stream,
                refuse("snapshots read a collection or a database, not a whole deployment".into()),
            ));
        }
    };
    if stream.is_snapshotting() {
        return Err((
            stream,
            refuse("a snapshot is being read; request another once it is read".into()),
        ));
    }
    let Some(start) = stream.resume_token() else {
        return Err((
            stream,
            refuse("the stream has no position yet; request again once it has one".into()),
        ));
    };
    // A filter the server refuses would fail every read, and every restart from a point
    // carrying it: it is tried first.
    let database = inner.client.database(db);
    let probed = if coll.is_empty() {
        match database.list_collection_names().await {
            Ok(mut names) => {
                names.retain(|n| !n.starts_with("system."));
                names.sort();
                names.into_iter().next()
            }
            Err(e) => return Err((stream, Error::driver("list the collections", e).into())),
        }
    } else {
        Some(coll.clone())
    };
    if let Some(probed) = probed
        && let Err(e) = database
            .collection::<RawDocumentBuf>(&probed)
            .find(request.filter.clone())
            .limit(1)
            .await
    {
        return Err((
            stream,
            Error::driver("check the snapshot's filter", e).into(),
        ));
    }
    let start_time = start.cluster_time_hint().unwrap_or_default();
    let position = SnapshotPosition {
        start_time,
        id: start_time,
        start,
        coll,
        after: None,
        filter: Some(request.filter.clone()),
        single,
    };
    tracing::info!(scope = %inner.scope, collection = %position.coll, filter = %request.filter, "snapshot requested while streaming: reading the documents");
    Ok(Box::new(
        SnapshotCursor::new(inner, position).with_stream(stream),
    ))
}

/// Continues a snapshot from a stored position.
pub(crate) fn resume(inner: &Arc<Inner>, position: SnapshotPosition) -> Box<dyn ChangeCursor> {
    tracing::info!(coll = %position.coll, after = ?position.after, "snapshot: continuing after the last document handled");
    Box::new(SnapshotCursor::new(inner, position))
}
