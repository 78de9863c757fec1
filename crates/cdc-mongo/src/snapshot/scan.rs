//! Reading the documents: snapshot reads in `_id` order, one chunk after the other or
//! ranges in parallel, each chunk at the cluster time the server tells; and reading one
//! document again. Everything here talks to the driver; the cursor asks for it through
//! [`Deployment`].

use std::sync::Arc;

use bson::{Bson, Document, RawDocumentBuf, doc};
use cdc_core::{ChangeCursor, ClusterTime, StartPosition};
use futures_util::TryStreamExt;
use tokio::{sync::mpsc, task::JoinHandle};

use super::{SnapshotMode, SnapshotPosition, cursor::Deployment};
use crate::{Error, cursor::Inner, options::Scope, progress::Progress};

/// Documents of one collection read at one cluster time, in `_id` order.
pub(crate) struct Chunk {
    pub(crate) coll: Arc<str>,
    /// The cluster time the documents were read at (a snapshot read's `atClusterTime`).
    pub(crate) time: ClusterTime,
    pub(crate) rows: mpsc::Receiver<cdc_core::Result<RawDocumentBuf>>,
    /// The task reading the rest of the chunk, if one does; it ends with the chunk.
    pub(crate) _reader: Option<AbortOnDrop>,
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
pub(crate) async fn scan(
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
pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);

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

/// The deployment as the driver reaches it: what the snapshot cursor asks of it.
pub(crate) struct Driver(pub(crate) Arc<Inner>);

#[async_trait::async_trait]
impl Deployment for Driver {
    fn scope(&self) -> &Scope {
        &self.0.scope
    }

    fn mode(&self) -> SnapshotMode {
        self.0.options.snapshot
    }

    fn progress(&self) -> &Progress {
        &self.0.snapshot
    }

    async fn open_stream(
        &self,
        position: &StartPosition,
    ) -> cdc_core::Result<Box<dyn ChangeCursor>> {
        crate::cursor::open_cursor(&self.0, position).await
    }

    async fn read_one(
        &self,
        coll: &str,
        id: Bson,
    ) -> cdc_core::Result<(ClusterTime, Option<RawDocumentBuf>)> {
        let db = self.0.scope.db().unwrap_or_default();
        let coll = self
            .0
            .client
            .database(db)
            .collection::<RawDocumentBuf>(coll);
        let (time, mut session, mut cursor) =
            open_read(&self.0, &coll, doc! { "_id": id }, Some(1), 1).await?;
        let doc = cursor
            .next(&mut session)
            .await
            .transpose()
            .map_err(|e| Error::driver("read the snapshot", e))?;
        Ok((time, doc))
    }
}
