//! Snapshots: the documents that exist first, then the stream, with no gap.
//!
//! The algorithm ("scan after a position"): before reading anything, the change stream is
//! opened at "now" and its resume token `P` is taken. The collection is then read in `_id`
//! order (in chunks read by `parallelism` readers, handed over in order), each document as
//! a `snapshot` event whose token records `P` and the document's `_id`. After the last
//! document the stream continues after `P`. Every document that exists at `P` is read by
//! the scan unless it is deleted first, and then its delete comes from the stream; every
//! change after `P` comes from the stream: no gap. All snapshot events come before all
//! stream events, so no snapshot image is ever delivered after a stream event.
//!
//! Limits: a change made between `P` and the moment its document was read is delivered
//! again by the stream after the snapshot (so a key may see an older image after its
//! snapshot image; applying events in order still ends with the collection's content), and
//! the scan must finish within the oplog's window, or the stream cannot continue after `P`
//! (`ChangeStreamHistoryLost`).
//!
//! A snapshot is resumable through the ordinary checkpoints: the stored point of a stream
//! mid-snapshot is a snapshot token (`P`, the collection, the last `_id` handled), and
//! opening at it continues the scan after that `_id`.

use std::sync::Arc;

use bson::{Bson, Document, RawBsonRef, RawDocumentBuf, doc};
use cdc_core::{ChangeCursor, ChangeEvent, ClusterTime, HistoryGap, ResumeToken, StartPosition};
use futures_util::{StreamExt, TryStreamExt};
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
    /// The stream's token taken before the scan.
    start: ResumeToken,
    start_time: ClusterTime,
    coll: String,
    /// The last `_id` handed over; `None` before the first.
    after: Option<Bson>,
}

const FIELD: &str = "_snapshot";

/// Documents counted into the shared progress at once by a one-cursor read (a chunked
/// read counts a chunk at once): the lock is not taken per document.
const PROGRESS_STEP: u64 = 1024;

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
        let coll = match snap.get("coll") {
            Ok(Some(RawBsonRef::String(s))) => s.to_owned(),
            _ => return Err(bad("no `coll`")),
        };
        let after = match snap.get("after") {
            Ok(Some(v)) => Some(Bson::try_from(v).map_err(|e| bad(&e.to_string()))?),
            Ok(None) => None,
            Err(e) => return Err(bad(&e.to_string())),
        };
        Ok(Self {
            start,
            start_time,
            coll,
            after,
        })
    }

    fn token(&self) -> ResumeToken {
        let mut snap = doc! {
            "start": self.start.to_document().unwrap_or_default(),
            "startTime": self.start_time.to_timestamp(),
            "coll": &self.coll,
        };
        if let Some(after) = &self.after {
            snap.insert("after", after.clone());
        }
        // A document of plain values: it always encodes.
        ResumeToken::from_document(&doc! { FIELD: snap }).unwrap_or_else(|_| self.start.clone())
    }
}

/// Starts a snapshot: takes the stream's position first, then scans.
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
        coll,
        after: None,
    };
    tracing::info!(scope = %inner.scope, "snapshot: the stream's position is taken; reading the documents");
    Ok(Box::new(SnapshotCursor::new(inner, position)))
}

/// Continues a snapshot from a stored position.
pub(crate) fn resume(inner: &Arc<Inner>, position: SnapshotPosition) -> Box<dyn ChangeCursor> {
    tracing::info!(coll = %position.coll, after = ?position.after, "snapshot: continuing after the last document handled");
    Box::new(SnapshotCursor::new(inner, position))
}

/// Reads the snapshot, then the stream.
struct SnapshotCursor {
    inner: Arc<Inner>,
    position: SnapshotPosition,
    rows: mpsc::Receiver<cdc_core::Result<(Arc<str>, RawDocumentBuf)>>,
    reader: JoinHandle<()>,
    tail: Option<Box<dyn ChangeCursor>>,
    finished: bool,
    /// The start token's bytes, copied into every snapshot token.
    start_raw: RawDocumentBuf,
    /// The namespace of the collection being read, encoded once.
    ns: Option<(Arc<str>, RawDocumentBuf)>,
    /// The token of the last event handed over.
    last: Option<ResumeToken>,
}

impl SnapshotCursor {
    fn new(inner: &Arc<Inner>, position: SnapshotPosition) -> Self {
        inner.snapshot.restart();
        let (tx, rows) = mpsc::channel(inner.options.snapshot_chunk_docs.max(1));
        let reader = tokio::spawn(scan(Arc::clone(inner), position.clone(), tx));
        Self {
            inner: Arc::clone(inner),
            start_raw: position.start.as_raw().to_owned(),
            position,
            rows,
            reader,
            tail: None,
            finished: false,
            ns: None,
            last: None,
        }
    }

    /// The snapshot event of `doc` of `coll`: built from raw bytes, with no decoding.
    fn event(&mut self, coll: Arc<str>, doc: &RawDocumentBuf) -> cdc_core::Result<ChangeEvent> {
        let id = match doc.get("_id") {
            Ok(Some(id)) => id,
            _ => {
                return Err(cdc_core::Error::MalformedEvent {
                    field: "fullDocument._id",
                    problem: "a document without `_id`".into(),
                });
            }
        };
        if self.ns.as_ref().is_none_or(|(c, _)| *c != coll) {
            let (Scope::Collection { db, .. } | Scope::Database(db)) = &self.inner.scope else {
                return Err(cdc_core::Error::Protocol(
                    "a snapshot of a deployment".into(),
                ));
            };
            let mut ns = RawDocumentBuf::new();
            ns.append(bson::cstr!("db"), db.as_str());
            ns.append(bson::cstr!("coll"), &*coll);
            self.ns = Some((Arc::clone(&coll), ns));
        }
        let mut snap = RawDocumentBuf::new();
        snap.append(bson::cstr!("start"), self.start_raw.as_ref());
        snap.append(
            bson::cstr!("startTime"),
            self.position.start_time.to_timestamp(),
        );
        snap.append(bson::cstr!("coll"), &*coll);
        snap.append(bson::cstr!("after"), id);
        let mut token = RawDocumentBuf::new();
        // The literal is `FIELD`.
        token.append(bson::cstr!("_snapshot"), snap);
        let mut key = RawDocumentBuf::new();
        key.append(bson::cstr!("_id"), id);
        let mut raw = RawDocumentBuf::new();
        raw.append(bson::cstr!("_id"), token.as_ref());
        raw.append(bson::cstr!("operationType"), "snapshot");
        raw.append(
            bson::cstr!("clusterTime"),
            self.position.start_time.to_timestamp(),
        );
        if let Some((_, ns)) = &self.ns {
            raw.append(bson::cstr!("ns"), ns.as_ref());
        }
        raw.append(bson::cstr!("documentKey"), key);
        raw.append(bson::cstr!("fullDocument"), doc.as_ref());
        let event = ChangeEvent::from_raw_buf(raw)?;
        self.last = Some(event.token.clone());
        Ok(event)
    }
}

#[async_trait::async_trait]
impl ChangeCursor for SnapshotCursor {
    async fn next(&mut self) -> cdc_core::Result<Option<ChangeEvent>> {
        if let Some(tail) = &mut self.tail {
            return tail.next().await;
        }
        if self.finished {
            return Ok(None);
        }
        match self.rows.recv().await {
            Some(Ok((coll, doc))) => self.event(coll, &doc).map(Some),
            Some(Err(e)) => Err(e),
            None => {
                tracing::info!(scope = %self.inner.scope, "snapshot: every document read");
                self.inner.snapshot.update(|p| p.finished = true);
                if self.inner.options.snapshot == SnapshotMode::InitialOnly {
                    self.finished = true;
                    return Ok(None);
                }
                let after = StartPosition::ResumeAfter(self.position.start.clone());
                self.tail = Some(crate::source::open_cursor(&self.inner, &after).await?);
                Ok(None)
            }
        }
    }

    fn resume_token(&self) -> Option<ResumeToken> {
        match &self.tail {
            Some(tail) => tail.resume_token(),
            // Every document read: the stream continues after the position taken first.
            None if self.finished => Some(self.position.start.clone()),
            None => self.last.clone().or_else(|| Some(self.position.token())),
        }
    }

    fn is_closed(&self) -> bool {
        self.tail.as_ref().is_some_and(|t| t.is_closed())
    }

    fn take_gap(&mut self) -> Option<HistoryGap> {
        self.tail.as_mut().and_then(|t| t.take_gap())
    }

    fn is_finished(&self) -> bool {
        self.finished
    }

    async fn close(mut self: Box<Self>) {
        self.reader.abort();
        if let Some(tail) = self.tail.take() {
            tail.close().await;
        }
    }
}

impl Drop for SnapshotCursor {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Reads the documents after `position.after` in `_id` order into `tx`: one cursor, or,
/// with parallelism, chunks of `snapshot_chunk_docs` read concurrently and handed over in
/// order.
async fn scan(
    inner: Arc<Inner>,
    position: SnapshotPosition,
    tx: mpsc::Sender<cdc_core::Result<(Arc<str>, RawDocumentBuf)>>,
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
    tx: &mpsc::Sender<cdc_core::Result<(Arc<str>, RawDocumentBuf)>>,
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
        if coll < position.coll {
            continue;
        }
        let after = if coll == position.coll {
            position.after.clone()
        } else {
            None
        };
        if !scan_collection(inner, &db, &coll, after, tx).await? {
            break;
        }
        inner.snapshot.update(|p| p.collections_done += 1);
    }
    Ok(())
}

/// Reads the documents of `db.coll` after `after` in `_id` order into `tx`: one cursor,
/// or, with parallelism, chunks of `snapshot_chunk_docs` read concurrently and handed
/// over in order. `false` when the receiver is gone.
async fn scan_collection(
    inner: &Arc<Inner>,
    db: &str,
    coll_name: &str,
    after: Option<Bson>,
    tx: &mpsc::Sender<cdc_core::Result<(Arc<str>, RawDocumentBuf)>>,
) -> cdc_core::Result<bool> {
    let coll = inner
        .client
        .database(db)
        .collection::<RawDocumentBuf>(coll_name);
    let o = &inner.options;
    let chunk = o.snapshot_chunk_docs.max(1);
    let after_filter = |after: &Option<Bson>| match after {
        Some(a) => doc! { "_id": { "$gt": a.clone() } },
        None => Document::new(),
    };
    let driver = |e| Error::driver("read the snapshot", e);
    let name: Arc<str> = Arc::from(coll_name);
    let send = |doc: RawDocumentBuf| tx.send(Ok((Arc::clone(&name), doc)));
    if o.snapshot_parallelism <= 1 {
        let mut cursor = coll
            .find(after_filter(&after))
            .sort(doc! { "_id": 1 })
            .batch_size(u32::try_from(chunk).unwrap_or(u32::MAX))
            .await
            .map_err(driver)?;
        let started = std::time::Instant::now();
        let mut read: u64 = 0;
        while let Some(doc) = cursor.try_next().await.map_err(driver)? {
            if send(doc).await.is_err() {
                return Ok(false);
            }
            read += 1;
            if read.is_multiple_of(PROGRESS_STEP) {
                inner.snapshot.update(|p| p.documents += PROGRESS_STEP);
            }
            if read.is_multiple_of(100_000) {
                progress(read, None, started);
            }
        }
        inner
            .snapshot
            .update(|p| p.documents += read % PROGRESS_STEP);
        progress(read, None, started);
        return Ok(true);
    }
    // Chunk bounds from a scan of the keys alone (MongoDB's `splitVector` needs
    // privileges a change-stream user seldom has): every `chunk`-th `_id`, with `chunk`
    // grown so there are at most 16 chunks per reader (each chunk is one query).
    let readers = o.snapshot_parallelism;
    let count = coll
        .count_documents(after_filter(&after))
        .await
        .map_err(driver)?;
    let chunk = chunk
        .max(
            usize::try_from(count)
                .unwrap_or(usize::MAX)
                .div_ceil(readers * 16),
        )
        .max(1);
    let mut keys = coll
        .clone_with_type::<Document>()
        .find(after_filter(&after))
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
    let started = std::time::Instant::now();
    let mut read: u64 = 0;
    // Each chunk is read by a task of its own into a small bounded channel; chunks are
    // handed over in order, so at most `readers` chunks are read ahead, each holding at
    // most one batch in memory.
    let batch = u32::try_from(o.snapshot_chunk_docs.max(1)).unwrap_or(u32::MAX);
    let readers_ahead = futures_util::stream::iter(ranges.into_iter().map(|(low, high)| {
        let coll = coll.clone();
        let (chunk_tx, chunk_rx) = mpsc::channel::<mongodb::error::Result<RawDocumentBuf>>(
            usize::try_from(batch).unwrap_or(1024).clamp(1, 1024),
        );
        let task = tokio::spawn(async move {
            let mut range = Document::new();
            if let Some(l) = low {
                range.insert("$gt", l);
            }
            if let Some(h) = high {
                range.insert("$lte", h);
            }
            let filter = if range.is_empty() {
                Document::new()
            } else {
                doc! { "_id": range }
            };
            let cursor = coll
                .find(filter)
                .sort(doc! { "_id": 1 })
                .batch_size(batch)
                .await;
            let mut cursor = match cursor {
                Ok(c) => c,
                Err(e) => {
                    let _ = chunk_tx.send(Err(e)).await;
                    return;
                }
            };
            loop {
                match cursor.try_next().await {
                    Ok(Some(doc)) => {
                        if chunk_tx.send(Ok(doc)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = chunk_tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        async move { (chunk_rx, task) }
    }))
    .buffered(readers);
    futures_util::pin_mut!(readers_ahead);
    let mut done = 0;
    while let Some((mut chunk_rx, task)) = readers_ahead.next().await {
        // The reader ends with its task, when this side stops listening.
        let _reader = AbortOnDrop(task);
        let mut in_chunk: u64 = 0;
        while let Some(doc) = chunk_rx.recv().await {
            if send(doc.map_err(driver)?).await.is_err() {
                return Ok(false);
            }
            in_chunk += 1;
        }
        read += in_chunk;
        done += 1;
        inner.snapshot.update(|p| {
            p.documents += in_chunk;
            p.chunks_done += 1;
        });
        if done % 100 == 0 || done == total {
            progress(read, Some((done, total)), started);
        }
    }
    Ok(true)
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Logs how far a snapshot's reading got (documents handed over, chunks, rate).
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
