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

use std::sync::Arc;

use bson::{Bson, Document, RawBsonRef, RawDocumentBuf, doc};
use cdc_core::{
    ChangeCursor, ChangeEvent, ClusterTime, HistoryGap, Next, ResumeToken, StartPosition,
};
use futures_util::TryStreamExt;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{Error, options::Scope, source::Inner};

/// When the processor reads the existing documents before streaming.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotMode {
    /// Never: only changes from the start position on (the Go package's behaviour).
    #[default]
    Never,
    /// When the store holds no point: the existing documents, then the stream.
    Initial,
    /// As `Initial`, then stop (the stored point then continues the stream later).
    InitialOnly,
    /// As `Initial`, and again whenever the stream's position has aged out of the oplog
    /// (`ChangeStreamHistoryLost`): the documents are read anew, then the stream continues
    /// from a position taken before that read, so nothing the lost history held is
    /// missing from what a consumer ends with.
    WhenNeeded,
}

/// The position of a snapshot: where the stream continues, and the last `_id` read.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SnapshotPosition {
    /// Where the stream continues: the token taken before the reading began, or the last
    /// stream position handed over since.
    start: ResumeToken,
    /// The cluster time of `start`.
    start_time: ClusterTime,
    /// The snapshot's identity: the stream's cluster time when it started, kept in every
    /// token until it finishes (message and dead-letter ids of rows derive from it).
    id: ClusterTime,
    coll: String,
    /// The last `_id` handed over; `None` before the first.
    after: Option<Bson>,
    /// For a snapshot requested while streaming: which documents (`None`: an initial
    /// snapshot, of every document).
    filter: Option<Document>,
    /// Only the collection `coll` (of a database source), not every collection after it.
    single: bool,
}

const FIELD: &str = "_snapshot";

/// The latest snapshot's progress, shared by its reader and the source.
#[derive(Debug, Default)]
pub(crate) struct Progress(
    std::sync::Mutex<Option<(cdc_core::SnapshotProgress, std::time::Instant)>>,
);

impl Progress {
    fn update(&self, f: impl FnOnce(&mut cdc_core::SnapshotProgress)) {
        // Plain counters: a poisoned lock still guards consistent numbers.
        let mut slot = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (progress, started) = slot.get_or_insert_with(|| {
            (
                cdc_core::SnapshotProgress::default(),
                std::time::Instant::now(),
            )
        });
        f(progress);
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        progress.per_second = (progress.documents as f64 / secs) as u64;
    }

    fn restart(&self) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((
            cdc_core::SnapshotProgress::default(),
            std::time::Instant::now(),
        ));
    }

    pub(crate) fn get(&self) -> Option<cdc_core::SnapshotProgress> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|(p, _)| p.clone())
    }
}

impl SnapshotPosition {
    /// The snapshot position a stored token holds, if it is one.
    pub(crate) fn of(position: &StartPosition) -> Option<cdc_core::Result<Self>> {
        let token = position.token()?;
        let raw = token.as_raw();
        let Ok(Some(RawBsonRef::Document(snap))) = raw.get(FIELD) else {
            return None;
        };
        Some(Self::decode(snap))
    }

    fn decode(snap: &bson::RawDocument) -> cdc_core::Result<Self> {
        let bad = |what: &str| cdc_core::Error::MalformedEvent {
            field: "_id._snapshot",
            problem: what.to_owned(),
        };
        let start = match snap.get("start") {
            Ok(Some(RawBsonRef::Document(d))) => ResumeToken::copied(d),
            _ => return Err(bad("no `start` token")),
        };
        let start_time = match snap.get("startTime") {
            Ok(Some(RawBsonRef::Timestamp(ts))) => ClusterTime::from(ts),
            _ => return Err(bad("no `startTime`")),
        };
        // Tokens written before snapshots had an identity carry none: their start stands in.
        let id = match snap.get("id") {
            Ok(Some(RawBsonRef::Timestamp(ts))) => ClusterTime::from(ts),
            Ok(None) => start_time,
            _ => return Err(bad("`id` is not a timestamp")),
        };
        let coll = match snap.get("coll") {
            Ok(Some(RawBsonRef::String(s))) => s.to_owned(),
            _ => return Err(bad("no `coll`")),
        };
        let after = match snap.get("after") {
            Ok(Some(v)) => Some(Bson::try_from(v).map_err(|e| bad(&e.to_string()))?),
            Ok(None) => None,
            Err(e) => return Err(bad(&e.to_string())),
        };
        let filter = match snap.get("filter") {
            Ok(Some(RawBsonRef::Document(d))) => {
                Some(Document::try_from(d).map_err(|e| bad(&e.to_string()))?)
            }
            Ok(None) => None,
            _ => return Err(bad("`filter` is not a document")),
        };
        let single = matches!(snap.get("single"), Ok(Some(RawBsonRef::Boolean(true))));
        Ok(Self {
            start,
            start_time,
            id,
            coll,
            after,
            filter,
            single,
        })
    }
}

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
        .and_then(crate::source::from_driver_token)
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
    let mut cursor = SnapshotCursor::new(inner, position);
    cursor.stream = Some(stream);
    Ok(Box::new(cursor))
}

/// Continues a snapshot from a stored position.
pub(crate) fn resume(inner: &Arc<Inner>, position: SnapshotPosition) -> Box<dyn ChangeCursor> {
    tracing::info!(coll = %position.coll, after = ?position.after, "snapshot: continuing after the last document handled");
    Box::new(SnapshotCursor::new(inner, position))
}

/// An empty document with room for `capacity` bytes: built by appending, it grows once
/// instead of doubling its way up (a snapshot builds four of them per document read).
fn doc_with_capacity(capacity: usize) -> RawDocumentBuf {
    let mut bytes = Vec::with_capacity(capacity.max(5));
    // An empty document: its length (5, little-endian) and its terminating zero.
    bytes.extend_from_slice(&[5, 0, 0, 0, 0]);
    RawDocumentBuf::from_bytes(bytes).unwrap_or_default()
}

/// Documents of one collection read at one cluster time, in `_id` order.
struct Chunk {
    coll: Arc<str>,
    /// The cluster time the documents were read at (a snapshot read's `atClusterTime`).
    time: ClusterTime,
    rows: mpsc::Receiver<cdc_core::Result<RawDocumentBuf>>,
    /// The task reading the rest of the chunk, if one does; it ends with the chunk.
    _reader: Option<AbortOnDrop>,
}

/// A document key of a snapshotted namespace: the collection and the `_id`'s bytes (its
/// BSON type and value).
type Key = (Arc<str>, Vec<u8>);

fn key_of(coll: &Arc<str>, id: RawBsonRef<'_>) -> Key {
    let mut bytes = vec![id.element_type() as u8];
    let mut one = RawDocumentBuf::new();
    one.append(bson::cstr!("v"), id);
    bytes.extend_from_slice(one.as_bytes());
    (Arc::clone(coll), bytes)
}

/// The keys of the stream events handed over during the snapshot, with their cluster
/// times, kept until no chunk read before them is left to hand over.
#[derive(Debug, Default)]
struct Changed {
    order: std::collections::VecDeque<(ClusterTime, Key)>,
    latest: std::collections::HashMap<Key, ClusterTime>,
}

impl Changed {
    fn record(&mut self, time: ClusterTime, key: Key) {
        self.latest.insert(key.clone(), time);
        self.order.push_back((time, key));
    }

    /// Whether a stream event of `key` later than `time` was handed over.
    fn after(&self, key: &Key, time: ClusterTime) -> bool {
        self.latest.get(key).is_some_and(|&t| t > time)
    }

    /// Forgets the events at or before `time`.
    fn forget_through(&mut self, time: ClusterTime) {
        while let Some((t, _)) = self.order.front() {
            if *t > time {
                break;
            }
            if let Some((t, key)) = self.order.pop_front()
                && self.latest.get(&key) == Some(&t)
            {
                self.latest.remove(&key);
            }
        }
    }
}

/// What one pull of the stream gave.
enum Pulled {
    /// An event, handed over.
    Event(Box<ChangeEvent>),
    /// An event later than the time waited for, held back: everything up to that time
    /// has been handed over.
    Held,
    /// A round trip without events.
    Idle,
    /// The stream skipped a gap in history (restarted from now, as configured).
    Gap(HistoryGap),
    /// The stream ended (an `invalidate`): nothing later comes to wait for.
    Closed,
}

/// Reads the snapshot interleaved with the stream (see the module documentation).
struct SnapshotCursor {
    inner: Arc<Inner>,
    /// Where the stream continues: the last stream event handed over, or the latest
    /// post-batch token after a round trip without events.
    stream_pos: ResumeToken,
    /// The cluster time of `stream_pos`: every stream event up to it has been handed over.
    stream_time: ClusterTime,
    /// The stream, opened after `stream_pos` at the first need.
    stream: Option<Box<dyn ChangeCursor>>,
    /// A stream event later than the time a chunk waits for.
    held: Option<ChangeEvent>,
    chunks: mpsc::Receiver<cdc_core::Result<Chunk>>,
    reader: JoinHandle<()>,
    /// The chunk being handed over, and whether the stream has reached its time.
    head: Option<(Chunk, bool)>,
    /// The time of the chunk handed over last: chunk times never go backwards.
    last_chunk: ClusterTime,
    /// A document read again at a later time (`None`: deleted by then), handed over once
    /// the stream reaches that time.
    again: Option<(ClusterTime, Option<RawDocumentBuf>)>,
    changed: Changed,
    /// The collection being read and the last `_id` handed over in it.
    coll: Arc<str>,
    after: Option<bson::RawBson>,
    scan_done: bool,
    /// The stream is handed over as it is: the snapshot has been read.
    tail: bool,
    finished: bool,
    /// The stream ended (an `invalidate`) while the snapshot was read.
    stream_closed: bool,
    /// The namespace of the collection being read, encoded once.
    ns: Option<(Arc<str>, RawDocumentBuf)>,
    /// A requested snapshot's filter, as its tokens carry it; `None` for an initial one.
    filter: Option<RawDocumentBuf>,
    /// Only one collection of a database is read.
    single: bool,
    /// The snapshot's identity (see [`SnapshotPosition`]).
    id: ClusterTime,
}

impl SnapshotCursor {
    fn new(inner: &Arc<Inner>, position: SnapshotPosition) -> Self {
        inner.snapshot.restart();
        let (tx, chunks) = mpsc::channel(inner.options.snapshot_parallelism.max(1));
        let reader = tokio::spawn(scan(Arc::clone(inner), position.clone(), tx));
        Self::with_reader(inner, position, chunks, reader)
    }

    /// A cursor handing over the chunks `chunks` brings, read by `reader`.
    fn with_reader(
        inner: &Arc<Inner>,
        position: SnapshotPosition,
        chunks: mpsc::Receiver<cdc_core::Result<Chunk>>,
        reader: JoinHandle<()>,
    ) -> Self {
        let after = position
            .after
            .as_ref()
            .and_then(|a| bson::RawBson::try_from(a.clone()).ok());
        let filter = position
            .filter
            .as_ref()
            .and_then(|f| RawDocumentBuf::try_from(f).ok());
        Self {
            filter,
            single: position.single,
            id: position.id,
            inner: Arc::clone(inner),
            stream_time: position.start_time,
            stream_pos: position.start,
            stream: None,
            held: None,
            chunks,
            reader,
            head: None,
            last_chunk: ClusterTime::default(),
            again: None,
            changed: Changed::default(),
            coll: Arc::from(position.coll),
            after,
            scan_done: false,
            tail: false,
            finished: false,
            stream_closed: false,
            ns: None,
        }
    }

    /// The token of a position during the snapshot: where the stream continues, and the
    /// last `_id` handed over. `data` (a stream event's own `_data`) keeps the event's
    /// identity and order.
    fn position_token(
        &self,
        stream_pos: &ResumeToken,
        time: ClusterTime,
        data: Option<&str>,
    ) -> cdc_core::Result<ResumeToken> {
        // Room for the fields below with an `_id` of up to 64 bytes (a longer one grows it).
        let filter_len = self.filter.as_ref().map_or(0, |f| f.as_bytes().len());
        let snap_len = stream_pos.as_raw().as_bytes().len() + self.coll.len() + filter_len + 160;
        let mut snap = doc_with_capacity(snap_len);
        snap.append(bson::cstr!("start"), stream_pos.as_raw());
        snap.append(bson::cstr!("startTime"), time.to_timestamp());
        snap.append(bson::cstr!("id"), self.id.to_timestamp());
        snap.append(bson::cstr!("coll"), &*self.coll);
        if let Some(after) = &self.after {
            snap.append(bson::cstr!("after"), after.clone());
        }
        if let Some(filter) = &self.filter {
            snap.append(bson::cstr!("filter"), filter.as_ref());
        }
        if self.single {
            snap.append(bson::cstr!("single"), true);
        }
        let mut token = doc_with_capacity(snap_len + data.map_or(0, str::len) + 32);
        if let Some(data) = data {
            token.append(bson::cstr!("_data"), data);
        }
        // The literal is `FIELD`.
        token.append(bson::cstr!("_snapshot"), snap);
        Ok(ResumeToken::from_raw(token))
    }

    /// The snapshot event of `doc` of the collection being read: built from raw bytes,
    /// with no decoding.
    fn row(&mut self, doc: &RawDocumentBuf) -> cdc_core::Result<ChangeEvent> {
        let id = match doc.get("_id") {
            Ok(Some(id)) => id,
            _ => {
                return Err(cdc_core::Error::MalformedEvent {
                    field: "fullDocument._id",
                    problem: "a document without `_id`".into(),
                });
            }
        };
        if self.ns.as_ref().is_none_or(|(c, _)| *c != self.coll) {
            let (Scope::Collection { db, .. } | Scope::Database(db)) = &self.inner.scope else {
                return Err(cdc_core::Error::Protocol(
                    "a snapshot of a deployment".into(),
                ));
            };
            let mut ns = RawDocumentBuf::new();
            ns.append(bson::cstr!("db"), db.as_str());
            ns.append(bson::cstr!("coll"), &*self.coll);
            self.ns = Some((Arc::clone(&self.coll), ns));
        }
        self.after = Some(bson::RawBson::from(id));
        let token = self.position_token(&self.stream_pos, self.stream_time, None)?;
        let mut key = doc_with_capacity(64);
        key.append(bson::cstr!("_id"), id);
        let ns_len = self.ns.as_ref().map_or(0, |(_, ns)| ns.as_bytes().len());
        let mut raw = doc_with_capacity(
            token.as_raw().as_bytes().len()
                + ns_len
                + key.as_bytes().len()
                + doc.as_bytes().len()
                + 128,
        );
        raw.append(bson::cstr!("_id"), token.as_raw());
        raw.append(bson::cstr!("operationType"), "snapshot");
        raw.append(bson::cstr!("clusterTime"), self.stream_time.to_timestamp());
        if let Some((_, ns)) = &self.ns {
            raw.append(bson::cstr!("ns"), ns.as_ref());
        }
        raw.append(bson::cstr!("documentKey"), key);
        raw.append(bson::cstr!("fullDocument"), doc.as_ref());
        ChangeEvent::from_raw_buf(raw)
    }

    /// The stream, opened after `stream_pos` at the first need.
    async fn stream(&mut self) -> cdc_core::Result<&mut Box<dyn ChangeCursor>> {
        if self.stream.is_none() {
            let after = StartPosition::ResumeAfter(self.stream_pos.clone());
            let opened = crate::source::open_cursor(&self.inner, &after).await?;
            return Ok(self.stream.insert(opened));
        }
        // Just checked: the stream is open.
        self.stream
            .as_mut()
            .ok_or_else(|| cdc_core::Error::Protocol("the snapshot's stream is not open".into()))
    }

    /// Takes the next stream event (the held one first). One later than `until` is held
    /// back; the others are handed over, their keys recorded, their tokens marking the
    /// snapshot's position too.
    async fn pull(&mut self, until: ClusterTime) -> cdc_core::Result<Pulled> {
        let event = match self.held.take() {
            Some(event) => event,
            None => {
                let stream = self.stream().await?;
                match stream.next().await? {
                    Next::Event(event) => *event,
                    Next::Idle(token) => {
                        if let Some(token) = token {
                            if let Some(time) = token.cluster_time_hint() {
                                self.stream_time = self.stream_time.max(time);
                            }
                            self.stream_pos = token;
                        }
                        return Ok(Pulled::Idle);
                    }
                    Next::Gap(gap) => return Ok(Pulled::Gap(gap)),
                    Next::Closed | Next::Finished(_) => {
                        self.stream_closed = true;
                        return Ok(Pulled::Closed);
                    }
                    _ => return Ok(Pulled::Idle),
                }
            }
        };
        if event.cluster_time > until {
            self.held = Some(event);
            return Ok(Pulled::Held);
        }
        Ok(Pulled::Event(Box::new(self.hand_over(event)?)))
    }

    /// A stream event handed over during the snapshot: its key recorded, its token
    /// carrying the snapshot's position.
    fn hand_over(&mut self, mut event: ChangeEvent) -> cdc_core::Result<ChangeEvent> {
        if let (Some(ns), Some(id)) = (&event.ns, event.document_id_raw())
            && self.inner.scope.db() == Some(ns.db.as_str())
            && let Some(coll) = &ns.coll
        {
            let coll: Arc<str> = if *self.coll == **coll {
                Arc::clone(&self.coll)
            } else {
                Arc::from(coll.as_str())
            };
            self.changed.record(event.cluster_time, key_of(&coll, id));
        }
        self.stream_pos = event.token.clone();
        self.stream_time = self.stream_time.max(event.cluster_time);
        event.token = self.position_token(&event.token, event.cluster_time, event.token.data())?;
        Ok(event)
    }

    /// Reads `id` of the collection being read again, at a time no earlier than the
    /// stream's position.
    async fn read_again(&mut self, id: Bson) -> cdc_core::Result<()> {
        let db = self.inner.scope.db().unwrap_or_default();
        let coll = self
            .inner
            .client
            .database(db)
            .collection::<RawDocumentBuf>(&self.coll);
        let (time, mut session, mut cursor) =
            open_read(&self.inner, &coll, doc! { "_id": id }, Some(1), 1).await?;
        let doc = cursor
            .next(&mut session)
            .await
            .transpose()
            .map_err(|e| Error::driver("read the snapshot", e))?;
        self.inner.snapshot.update(|p| p.reread += 1);
        self.again = Some((time, doc));
        Ok(())
    }
}

#[async_trait::async_trait]
impl ChangeCursor for SnapshotCursor {
    async fn next(&mut self) -> cdc_core::Result<Next> {
        loop {
            if self.tail {
                if let Some(event) = self.held.take() {
                    return Ok(Next::Event(Box::new(event)));
                }
                if self.stream_closed {
                    return Ok(Next::Closed);
                }
                let stream = self.stream().await?;
                return stream.next().await;
            }
            if self.scan_done {
                tracing::info!(scope = %self.inner.scope, "snapshot: every document read");
                self.inner.snapshot.update(|p| p.finished = true);
                // A snapshot requested while streaming goes on streaming.
                if self.inner.options.snapshot == SnapshotMode::InitialOnly && self.filter.is_none()
                {
                    self.finished = true;
                    return Ok(Next::Finished(Some(self.stream_pos.clone())));
                }
                self.tail = true;
                continue;
            }
            // Documents wait until every stream event up to their read time has been
            // handed over, and no later one has: then they take their place in the order.
            let waiting = match (&self.again, &self.head) {
                (Some((time, _)), _) => Some(*time),
                (None, Some((chunk, false))) => Some(chunk.time),
                _ => None,
            };
            if let Some(until) = waiting {
                let reached = self.stream_time >= until
                    || self.held.as_ref().is_some_and(|e| e.cluster_time > until)
                    || self.stream_closed;
                if !reached {
                    match self.pull(until).await? {
                        Pulled::Event(event) => return Ok(Next::Event(event)),
                        Pulled::Held | Pulled::Closed => {}
                        Pulled::Idle => return Ok(Next::Idle(self.resume_token())),
                        Pulled::Gap(gap) => return Ok(Next::Gap(gap)),
                    }
                    continue;
                }
                if let Some((_, ready)) = &mut self.head {
                    *ready = true;
                }
            }
            if let Some((_, doc)) = self.again.take() {
                match doc {
                    Some(doc) => return self.row(&doc).map(|e| Next::Event(Box::new(e))),
                    // Deleted since: its delete comes from the stream.
                    None => continue,
                }
            }
            if let Some((chunk, _)) = &mut self.head {
                let time = chunk.time;
                match chunk.rows.recv().await {
                    Some(Ok(doc)) => {
                        let id = doc.get("_id").ok().flatten().ok_or_else(|| {
                            cdc_core::Error::MalformedEvent {
                                field: "fullDocument._id",
                                problem: "a document without `_id`".into(),
                            }
                        })?;
                        if self.changed.after(&key_of(&self.coll, id), time) {
                            // A change read after this document was handed over: the
                            // document as read is older than it. Read it again, now.
                            let id = Bson::try_from(id).map_err(|e| {
                                cdc_core::Error::MalformedEvent {
                                    field: "fullDocument._id",
                                    problem: e.to_string(),
                                }
                            })?;
                            self.read_again(id).await?;
                            continue;
                        }
                        return self.row(&doc).map(|e| Next::Event(Box::new(e)));
                    }
                    Some(Err(e)) => return Err(e),
                    None => {
                        self.changed.forget_through(time);
                        self.head = None;
                        continue;
                    }
                }
            }
            match self.chunks.recv().await {
                Some(Ok(chunk)) => {
                    if chunk.time < self.last_chunk {
                        return Err(cdc_core::Error::source(
                            cdc_core::ErrorKind::Transient,
                            format!(
                                "a snapshot read at {} came after one at {}: read times went backwards (a failover?); reading again from the last stored point",
                                chunk.time, self.last_chunk
                            ),
                        ));
                    }
                    self.last_chunk = chunk.time;
                    if *chunk.coll != *self.coll {
                        self.coll = Arc::clone(&chunk.coll);
                        self.after = None;
                    }
                    self.head = Some((chunk, false));
                }
                Some(Err(e)) => return Err(e),
                None => self.scan_done = true,
            }
        }
    }

    fn resume_token(&self) -> Option<ResumeToken> {
        if self.finished || (self.tail && self.held.is_some()) {
            return Some(self.stream_pos.clone());
        }
        if self.tail {
            return self
                .stream
                .as_ref()
                .and_then(|s| s.resume_token())
                .or_else(|| Some(self.stream_pos.clone()));
        }
        self.position_token(&self.stream_pos, self.stream_time, None)
            .ok()
    }

    fn is_snapshotting(&self) -> bool {
        !self.tail && !self.finished
    }

    async fn close(mut self: Box<Self>) {
        self.reader.abort();
        if let Some(stream) = self.stream.take() {
            stream.close().await;
        }
    }
}

impl Drop for SnapshotCursor {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Opens a snapshot read (`readConcern: snapshot`) of `filter` in `_id` order: the
/// cluster time it reads at, the session and the cursor.
async fn open_read(
    inner: &Inner,
    coll: &mongodb::Collection<RawDocumentBuf>,
    filter: Document,
    limit: Option<i64>,
    batch: u32,
) -> cdc_core::Result<(
    ClusterTime,
    mongodb::ClientSession,
    mongodb::SessionCursor<RawDocumentBuf>,
)> {
    let driver = |e| Error::driver("read the snapshot", e);
    let mut session = inner
        .client
        .start_session()
        .snapshot(true)
        .await
        .map_err(driver)?;
    let mut find = coll.find(filter).sort(doc! { "_id": 1 }).batch_size(batch);
    if let Some(limit) = limit {
        find = find.limit(limit);
    }
    let cursor = find.session(&mut session).await.map_err(driver)?;
    let time = session.snapshot_time().ok_or_else(|| {
        cdc_core::Error::source(
            cdc_core::ErrorKind::Fatal,
            "the server did not tell the cluster time of a snapshot read (snapshots need MongoDB 5.0 or later)",
        )
    })?;
    Ok((ClusterTime::from(time), session, cursor))
}

/// Reads the documents after `position.after` in `_id` order as chunks into `tx`.
async fn scan(
    inner: Arc<Inner>,
    position: SnapshotPosition,
    tx: mpsc::Sender<cdc_core::Result<Chunk>>,
) {
    if let Err(e) = scan_all(&inner, position, &tx).await {
        let _ = tx.send(Err(e)).await;
    }
}

/// Reads the collection, or each collection of the database in name order from the one
/// the position names (system collections and views left out).
async fn scan_all(
    inner: &Arc<Inner>,
    position: SnapshotPosition,
    tx: &mpsc::Sender<cdc_core::Result<Chunk>>,
) -> cdc_core::Result<()> {
    let (db, colls) = match &inner.scope {
        Scope::Collection { db, coll } => (db.clone(), vec![coll.clone()]),
        Scope::Database(db) => {
            let names = inner
                .client
                .database(db)
                .list_collection_names()
                .filter(doc! { "type": "collection" })
                .await
                .map_err(|e| Error::driver("list the collections", e))?;
            let mut names: Vec<String> = names
                .into_iter()
                .filter(|n| !n.starts_with("system."))
                .collect();
            names.sort();
            (db.clone(), names)
        }
        Scope::Deployment => return Ok(()),
    };
    for coll in colls {
        if coll < position.coll || (position.single && coll != position.coll) {
            continue;
        }
        let after = if coll == position.coll {
            position.after.clone()
        } else {
            None
        };
        if !scan_collection(inner, &db, &coll, after, position.filter.as_ref(), tx).await? {
            break;
        }
        inner.snapshot.update(|p| p.collections_done += 1);
    }
    Ok(())
}

/// Reads the documents of `db.coll` after `after` in `_id` order into `tx`, as chunks
/// each read at one cluster time: one after the other (each `snapshot_chunk_docs`
/// documents after the last one read) or, with parallelism, ranges of `_id` read
/// concurrently, each opened after the one before has told its time, so chunk times never
/// go backwards. `false` when the receiver is gone.
async fn scan_collection(
    inner: &Arc<Inner>,
    db: &str,
    coll_name: &str,
    after: Option<Bson>,
    filter: Option<&Document>,
    tx: &mpsc::Sender<cdc_core::Result<Chunk>>,
) -> cdc_core::Result<bool> {
    let coll = inner
        .client
        .database(db)
        .collection::<RawDocumentBuf>(coll_name);
    let o = &inner.options;
    let chunk_docs = o.snapshot_chunk_docs.max(1);
    let batch = u32::try_from(chunk_docs).unwrap_or(u32::MAX);
    // The requested documents within an `_id` range.
    let within = |range: Document| match filter {
        Some(f) if !f.is_empty() && !range.is_empty() => doc! { "$and": [f.clone(), range] },
        Some(f) if !f.is_empty() => f.clone(),
        _ => range,
    };
    let after_filter = |after: &Option<Bson>| {
        within(match after {
            Some(a) => doc! { "_id": { "$gt": a.clone() } },
            None => Document::new(),
        })
    };
    let driver = |e| Error::driver("read the snapshot", e);
    let name: Arc<str> = Arc::from(coll_name);
    let started = std::time::Instant::now();
    if o.snapshot_parallelism <= 1 {
        let mut after = after;
        let mut read: u64 = 0;
        let limit = i64::try_from(chunk_docs).unwrap_or(i64::MAX);
        loop {
            let (time, mut session, mut cursor) =
                open_read(inner, &coll, after_filter(&after), Some(limit), batch).await?;
            let (rows_tx, rows) = mpsc::channel(chunk_docs.min(4096));
            // This task reads the chunk itself (the next chunk starts after its last
            // `_id`); the hand-over side reads `rows` when its turn comes.
            let chunk = Chunk {
                coll: Arc::clone(&name),
                time,
                rows,
                _reader: None,
            };
            if tx.send(Ok(chunk)).await.is_err() {
                return Ok(false);
            }
            let mut in_chunk = 0_usize;
            let mut last = None;
            while let Some(doc) = cursor.next(&mut session).await {
                let doc = doc.map_err(driver)?;
                last = doc.get("_id").ok().flatten().map(bson::RawBson::from);
                if rows_tx.send(Ok(doc)).await.is_err() {
                    return Ok(false);
                }
                in_chunk += 1;
            }
            drop(rows_tx);
            read += in_chunk as u64;
            inner.snapshot.update(|p| {
                p.documents += in_chunk as u64;
                p.chunks_done += 1;
            });
            if read.is_multiple_of(100 * chunk_docs as u64) || in_chunk < chunk_docs {
                progress(read, None, started);
            }
            match last {
                Some(id) if in_chunk >= chunk_docs => {
                    after =
                        Some(
                            Bson::try_from(id).map_err(|e| cdc_core::Error::MalformedEvent {
                                field: "fullDocument._id",
                                problem: e.to_string(),
                            })?,
                        );
                }
                _ => return Ok(true),
            }
        }
    }
    let readers = o.snapshot_parallelism;
    let bounds = match split_vector(inner, db, coll_name, &after, chunk_docs, readers).await {
        Ok(bounds) => bounds,
        Err(e) => {
            tracing::info!(error = %e, "snapshot: splitVector refused; split points from a scan of the keys");
            scan_split_points(&coll, &after, chunk_docs, readers).await?
        }
    };
    let mut ranges: Vec<(Option<Bson>, Option<Bson>)> = Vec::with_capacity(bounds.len() + 1);
    let mut low = after;
    for b in bounds {
        ranges.push((low, Some(b.clone())));
        low = Some(b);
    }
    ranges.push((low, None));
    let total = ranges.len();
    inner.snapshot.update(|p| {
        p.chunks_total += total as u64;
    });
    let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for (done, (low, high)) in ranges.into_iter().enumerate() {
        let mut range = Document::new();
        if let Some(l) = low {
            range.insert("$gt", l);
        }
        if let Some(h) = high {
            range.insert("$lte", h);
        }
        let filter = within(if range.is_empty() {
            Document::new()
        } else {
            doc! { "_id": range }
        });
        // Opened here, one after the other: each chunk's time is told before the next
        // chunk is opened. The rest of it is read by a task of its own, concurrently.
        let (time, mut session, mut cursor) = open_read(inner, &coll, filter, None, batch).await?;
        // Room for four batches (at most 4,096 rows): the reader of the chunk being
        // handed over stays ahead by more than the round trip of its next batch (with
        // one batch of room the hand-over side waited for each `getMore`: four readers
        // were slower than one).
        let (rows_tx, rows) = mpsc::channel(chunk_docs.saturating_mul(4).clamp(1, 4096));
        let progress_of = Arc::clone(inner);
        let read = Arc::clone(&read);
        let task = tokio::spawn(async move {
            let mut in_chunk = 0_u64;
            while let Some(doc) = cursor.next(&mut session).await {
                let doc = doc.map_err(|e| Error::driver("read the snapshot", e).into());
                let failed = doc.is_err();
                if rows_tx.send(doc).await.is_err() || failed {
                    return;
                }
                in_chunk += 1;
            }
            let read = read.fetch_add(in_chunk, std::sync::atomic::Ordering::Relaxed) + in_chunk;
            progress_of.snapshot.update(|p| {
                p.documents += in_chunk;
                p.chunks_done += 1;
            });
            if (done + 1) % 100 == 0 || done + 1 == total {
                progress(read, Some((done + 1, total)), started);
            }
        });
        let chunk = Chunk {
            coll: Arc::clone(&name),
            time,
            rows,
            _reader: Some(AbortOnDrop(task)),
        };
        if tx.send(Ok(chunk)).await.is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Split points from MongoDB's `splitVector` along the `_id` index (sized from
/// `collStats`): about `chunk_docs` documents per chunk, grown so there are at most 16
/// chunks per reader. Needs the `splitVector` privilege (`clusterManager`, or a custom
/// role) and a replica set member; the caller falls back to a scan of the keys.
async fn split_vector(
    inner: &Inner,
    db: &str,
    coll: &str,
    after: &Option<Bson>,
    chunk_docs: usize,
    readers: usize,
) -> Result<Vec<Bson>, Error> {
    let database = inner.client.database(db);
    let stats = database
        .run_command(doc! { "collStats": coll })
        .await
        .map_err(|e| Error::driver("read the collection's size", e))?;
    let number = |field: &str| match stats.get(field) {
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Double(n)) => *n as i64,
        _ => 0,
    };
    let (size, count) = (number("size"), number("count"));
    if count == 0 || size == 0 {
        return Ok(Vec::new());
    }
    let per_chunk = i64::try_from(chunk_docs)
        .unwrap_or(i64::MAX)
        .max(count / i64::try_from(readers * 16).unwrap_or(i64::MAX).max(1))
        .max(1);
    // `maxChunkSizeBytes` at the collection's size lets `maxChunkObjects` decide (the
    // server splits at half the size, or at `maxChunkObjects` if fewer).
    let mut cmd = doc! {
        "splitVector": format!("{db}.{coll}"),
        "keyPattern": { "_id": 1 },
        "maxChunkSizeBytes": size,
        "maxChunkObjects": per_chunk,
    };
    if let Some(after) = after {
        cmd.insert("min", doc! { "_id": after.clone() });
    }
    let reply = database
        .run_command(cmd)
        .await
        .map_err(|e| Error::driver("find split points (splitVector)", e))?;
    let keys = reply
        .get_array("splitKeys")
        .map_err(|e| Error::Unsupported {
            feature: "splitVector",
            code: 0,
            message: format!("an answer without splitKeys: {e}"),
        })?;
    Ok(keys
        .iter()
        .filter_map(|k| k.as_document().and_then(|k| k.get("_id")).cloned())
        // `min` is inclusive there; the first chunk here starts after `after`.
        .filter(|k| Some(k) != after.as_ref())
        .collect())
}

/// Split points from a scan of the keys alone: every `chunk`-th `_id` after `after`, with
/// `chunk` grown so there are at most 16 chunks per reader.
async fn scan_split_points(
    coll: &mongodb::Collection<RawDocumentBuf>,
    after: &Option<Bson>,
    chunk_docs: usize,
    readers: usize,
) -> cdc_core::Result<Vec<Bson>> {
    let driver = |e| Error::driver("find split points", e);
    let filter = match after {
        Some(a) => doc! { "_id": { "$gt": a.clone() } },
        None => Document::new(),
    };
    let count = coll.count_documents(filter.clone()).await.map_err(driver)?;
    let chunk = chunk_docs
        .max(
            usize::try_from(count)
                .unwrap_or(usize::MAX)
                .div_ceil(readers * 16),
        )
        .max(1);
    let mut keys = coll
        .clone_with_type::<Document>()
        .find(filter)
        .sort(doc! { "_id": 1 })
        .projection(doc! { "_id": 1 })
        .batch_size(10_000)
        .await
        .map_err(driver)?;
    let mut bounds: Vec<Bson> = Vec::new();
    let mut n = 0_usize;
    while let Some(mut key) = keys.try_next().await.map_err(driver)? {
        n += 1;
        if n.is_multiple_of(chunk)
            && let Some(id) = key.remove("_id")
        {
            bounds.push(id);
        }
    }
    Ok(bounds)
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Logs how far a snapshot's reading got (documents read, chunks, rate).
fn progress(read: u64, chunks: Option<(usize, usize)>, started: std::time::Instant) {
    let rate = read as f64 / started.elapsed().as_secs_f64().max(1e-3);
    match chunks {
        Some((done, total)) => tracing::info!(
            documents = read,
            chunks_done = done,
            chunks_total = total,
            per_second = rate.round(),
            "snapshot: reading"
        ),
        None => tracing::info!(
            documents = read,
            per_second = rate.round(),
            "snapshot: reading"
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::VecDeque;

    use super::*;
    use crate::{MongoSource, SourceOptions};

    /// A stream of given events, then round trips without events whose post-batch token
    /// is `pbrt`.
    struct Scripted {
        events: VecDeque<ChangeEvent>,
        last: Option<ResumeToken>,
        pbrt: ResumeToken,
    }

    #[async_trait::async_trait]
    impl ChangeCursor for Scripted {
        async fn next(&mut self) -> cdc_core::Result<Next> {
            let event = self.events.pop_front();
            self.last = Some(
                event
                    .as_ref()
                    .map_or_else(|| self.pbrt.clone(), |e| e.token.clone()),
            );
            Ok(match event {
                Some(event) => Next::Event(Box::new(event)),
                None => Next::Idle(self.last.clone()),
            })
        }
        fn resume_token(&self) -> Option<ResumeToken> {
            self.last.clone()
        }
        async fn close(self: Box<Self>) {}
    }

    fn token(time: u32) -> ResumeToken {
        ResumeToken::from_document(&doc! { "_data": format!("82{time:08X}00000001") }).unwrap()
    }

    /// An update of `id` to version `v` at cluster time `time`.
    fn update(time: u32, id: i64, v: i64) -> ChangeEvent {
        let raw = RawDocumentBuf::try_from(&doc! {
            "_id": { "_data": format!("82{time:08X}00000001") },
            "operationType": "update",
            "clusterTime": bson::Timestamp { time, increment: 1 },
            "ns": { "db": "d", "coll": "c" },
            "documentKey": { "_id": id },
            "updateDescription": { "updatedFields": { "v": v }, "removedFields": [] },
        })
        .unwrap();
        ChangeEvent::from_raw_buf(raw).unwrap()
    }

    /// A chunk of `docs` read at `time`.
    fn chunk(time: u32, docs: &[Document]) -> Chunk {
        let (tx, rows) = mpsc::channel(docs.len().max(1));
        for d in docs {
            tx.try_send(Ok(RawDocumentBuf::try_from(d).unwrap()))
                .unwrap();
        }
        Chunk {
            coll: Arc::from("c"),
            time: ClusterTime::new(time, 1),
            rows,
            _reader: None,
        }
    }

    fn cursor(uri: &str, chunks: Vec<Chunk>, events: Vec<ChangeEvent>) -> SnapshotCursor {
        let client = mongodb::Client::with_uri_str(uri);
        let client = futures_util::FutureExt::now_or_never(client)
            .expect("parsing a URI without SRV does not wait")
            .unwrap();
        let options = SourceOptions {
            snapshot: SnapshotMode::Initial,
            ..SourceOptions::default()
        };
        let source = MongoSource::new(client, Scope::collection("d", "c"), options);
        let (tx, rx) = mpsc::channel(chunks.len().max(1));
        for c in chunks {
            tx.try_send(Ok(c)).unwrap();
        }
        let position = SnapshotPosition {
            start: token(1),
            start_time: ClusterTime::new(1, 1),
            id: ClusterTime::new(1, 1),
            coll: "c".into(),
            after: None,
            filter: None,
            single: false,
        };
        let mut cursor =
            SnapshotCursor::with_reader(&source.inner, position, rx, tokio::spawn(async {}));
        cursor.stream = Some(Box::new(Scripted {
            events: events.into(),
            last: None,
            pbrt: token(u32::MAX - 1),
        }));
        cursor
    }

    /// `(operation, _id, version)` of what the cursor hands over until the snapshot is
    /// read and the stream idle.
    async fn drain(cursor: &mut SnapshotCursor) -> Vec<(String, i64, i64)> {
        let mut out = Vec::new();
        for _ in 0..100 {
            match cursor.next().await.unwrap().into_event() {
                Some(e) => {
                    let id = e.document_id().and_then(|b| b.as_i64()).unwrap();
                    let v = match e.operation_type {
                        cdc_core::OperationType::Update => e
                            .update_description()
                            .unwrap()
                            .unwrap()
                            .updated_fields
                            .get_i64("v")
                            .unwrap(),
                        _ => e
                            .full_document_parsed()
                            .unwrap()
                            .unwrap()
                            .get_i64("v")
                            .unwrap(),
                    };
                    out.push((e.operation_type.to_string(), id, v));
                }
                None if cursor.tail => return out,
                None => {}
            }
        }
        panic!("the cursor did not settle: {out:?}");
    }

    /// Documents read at 10 take their place at 10: after the change at 5, before the
    /// change at 15 (held back while they are handed over).
    #[tokio::test]
    async fn documents_take_their_place_at_their_read_time() {
        let mut c = cursor(
            "mongodb://127.0.0.1:9/",
            vec![chunk(
                10,
                &[
                    doc! { "_id": 1_i64, "v": 1_i64 },
                    doc! { "_id": 2_i64, "v": 0_i64 },
                ],
            )],
            vec![update(5, 1, 1), update(15, 1, 2), update(16, 2, 1)],
        );
        let out = drain(&mut c).await;
        let expected = [
            ("update", 1, 1),
            ("snapshot", 1, 1),
            ("snapshot", 2, 0),
            ("update", 1, 2),
            ("update", 2, 1),
        ]
        .map(|(op, id, v)| (op.to_owned(), id, v));
        assert_eq!(out, expected);
    }

    /// Every event handed over during the snapshot marks where the stream continues and
    /// the last `_id` handed over; a stream event keeps its own `_data`.
    #[tokio::test]
    async fn tokens_during_the_snapshot_carry_both_positions() {
        let mut c = cursor(
            "mongodb://127.0.0.1:9/",
            vec![
                chunk(10, &[doc! { "_id": 1_i64, "v": 1_i64 }]),
                chunk(20, &[doc! { "_id": 2_i64, "v": 0_i64 }]),
            ],
            vec![update(12, 1, 2), update(25, 2, 1)],
        );
        let row = c.next().await.unwrap().into_event().unwrap();
        let at = SnapshotPosition::of(&StartPosition::ResumeAfter(row.token.clone()))
            .unwrap()
            .unwrap();
        assert_eq!((at.after, at.start), (Some(Bson::Int64(1)), token(1)));
        let change = c.next().await.unwrap().into_event().unwrap();
        assert_eq!(
            change.token.data(),
            Some(format!("82{:08X}00000001", 12).as_str())
        );
        let at = SnapshotPosition::of(&StartPosition::ResumeAfter(change.token.clone()))
            .unwrap()
            .unwrap();
        assert_eq!((at.after, at.start), (Some(Bson::Int64(1)), token(12)));
        let row = c.next().await.unwrap().into_event().unwrap();
        let at = SnapshotPosition::of(&StartPosition::ResumeAfter(row.token.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(
            (at.after.clone(), at.start.clone()),
            (Some(Bson::Int64(2)), token(12))
        );
        // The snapshot's identity stays what it was when it started, though the stream
        // position moved (the rows' message and dead-letter ids derive from it).
        assert_eq!(at.id, ClusterTime::new(1, 1));
        let named = row.token.snapshot_row().unwrap();
        assert_eq!((named.snapshot, named.coll), (ClusterTime::new(1, 1), "c"));
        // A cursor reopened on that token (a restart) keeps it.
        let (_, rx) = mpsc::channel(1);
        let reopened = SnapshotCursor::with_reader(&c.inner, at, rx, tokio::spawn(async {}));
        let again = reopened
            .position_token(&token(30), ClusterTime::new(30, 1), None)
            .unwrap();
        assert_eq!(
            again.snapshot_row().map(|r| r.snapshot),
            Some(ClusterTime::new(1, 1))
        );
        // The snapshot is read: the change held back comes with its own token.
        let change = c.next().await.unwrap().into_event().unwrap();
        assert_eq!(change.token, token(25));
    }

    /// Chunk times going backwards cannot be placed: a transient error, so the processor
    /// continues from its stored point.
    #[tokio::test]
    async fn chunk_times_going_backwards_are_refused() {
        let mut c = cursor(
            "mongodb://127.0.0.1:9/",
            vec![
                chunk(20, &[doc! { "_id": 1_i64, "v": 1_i64 }]),
                chunk(10, &[doc! { "_id": 2_i64, "v": 0_i64 }]),
            ],
            vec![],
        );
        let mut err = None;
        for _ in 0..10 {
            if let Err(e) = c.next().await {
                err = Some(e);
                break;
            }
        }
        let err = err.expect("refused");
        assert_eq!(err.kind(), cdc_core::ErrorKind::Transient, "{err}");
    }

    /// A document whose key had a stream event after its chunk's time was handed over is
    /// read again, at a later time, and that image is handed over instead.
    #[tokio::test]
    async fn a_document_passed_by_a_change_is_read_again() {
        let sim = mongo_sim::MongoSim::start().await.unwrap();
        let client = mongodb::Client::with_uri_str(sim.uri()).await.unwrap();
        client
            .database("d")
            .collection::<Document>("c")
            .insert_one(doc! { "_id": 1_i64, "v": 7_i64 })
            .await
            .unwrap();
        let mut c = cursor(
            &sim.uri(),
            vec![chunk(10, &[doc! { "_id": 1_i64, "v": 3_i64 }])],
            vec![],
        );
        // A change to 1 at 12 was handed over before the chunk read at 10 came.
        let handed = c.hand_over(update(12, 1, 7)).unwrap();
        assert!(handed.token.as_raw().get("_snapshot").unwrap().is_some());
        let out = drain(&mut c).await;
        assert_eq!(out, [("snapshot".to_owned(), 1, 7)]);
        assert_eq!(source_progress(&c).reread, 1);
    }

    fn source_progress(c: &SnapshotCursor) -> cdc_core::SnapshotProgress {
        c.inner.snapshot.get().unwrap()
    }
}
