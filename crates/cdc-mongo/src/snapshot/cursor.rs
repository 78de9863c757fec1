//! The snapshot cursor: hands the chunks' documents over interleaved with the stream, each
//! at its read time (see the module documentation of `snapshot`). It reaches the deployment
//! only through [`Deployment`], so its hand-over is tested against a scripted stream and
//! scripted reads, with no driver client.

use std::sync::Arc;

use bson::{Bson, RawBsonRef, RawDocumentBuf};
use cdc_core::{
    ChangeCursor, ChangeEvent, ClusterTime, EventDecoder, HistoryGap, Next, ResumeToken,
    StartPosition,
};
use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    SnapshotMode, SnapshotPosition,
    scan::{Chunk, Driver, scan},
};
use crate::{cursor::Inner, options::Scope, progress::Progress};

/// What the snapshot cursor asks of the deployment.
#[async_trait::async_trait]
pub(crate) trait Deployment: Send + Sync {
    /// What the source watches.
    fn scope(&self) -> &Scope;
    /// The source's snapshot mode.
    fn mode(&self) -> SnapshotMode;
    /// The latest snapshot's progress counters.
    fn progress(&self) -> &Progress;
    /// Opens the change stream at `position`, under the source's policies.
    async fn open_stream(
        &self,
        position: &StartPosition,
    ) -> cdc_core::Result<Box<dyn ChangeCursor>>;
    /// Reads document `id` of collection `coll` again, at a time no earlier than now: the
    /// time it was read at, and the document (`None`: deleted since).
    async fn read_one(
        &self,
        coll: &str,
        id: Bson,
    ) -> cdc_core::Result<(ClusterTime, Option<RawDocumentBuf>)>;
}

/// An empty document with room for `capacity` bytes: built by appending, it grows once
/// instead of doubling its way up (a snapshot builds four of them per document read).
fn doc_with_capacity(capacity: usize) -> RawDocumentBuf {
    let mut bytes = Vec::with_capacity(capacity.max(5));
    // An empty document: its length (5, little-endian) and its terminating zero.
    bytes.extend_from_slice(&[5, 0, 0, 0, 0]);
    RawDocumentBuf::from_bytes(bytes).unwrap_or_default()
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
pub(crate) struct SnapshotCursor {
    deployment: Arc<dyn Deployment>,
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
    /// Decodes the stream's events and the rows (sharing their namespace's names).
    decoder: EventDecoder,
}

impl SnapshotCursor {
    pub(crate) fn new(inner: &Arc<Inner>, position: SnapshotPosition) -> Self {
        inner.snapshot.restart();
        let (tx, chunks) = mpsc::channel(inner.options.snapshot_parallelism.max(1));
        let reader = tokio::spawn(scan(Arc::clone(inner), position.clone(), tx));
        Self::with_reader(
            Arc::new(Driver(Arc::clone(inner))),
            position,
            chunks,
            reader,
        )
    }

    /// The same cursor going on with `stream`, already open (a snapshot requested while
    /// streaming).
    pub(crate) fn with_stream(mut self, stream: Box<dyn ChangeCursor>) -> Self {
        self.stream = Some(stream);
        self
    }

    /// A cursor handing over the chunks `chunks` brings, read by `reader`.
    fn with_reader(
        deployment: Arc<dyn Deployment>,
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
            deployment,
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
            decoder: EventDecoder::new(),
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
            let (Scope::Collection { db, .. } | Scope::Database(db)) = self.deployment.scope()
            else {
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
        self.decoder.decode(raw)
    }

    /// The stream, opened after `stream_pos` at the first need.
    async fn stream(&mut self) -> cdc_core::Result<&mut Box<dyn ChangeCursor>> {
        if self.stream.is_none() {
            let after = StartPosition::ResumeAfter(self.stream_pos.clone());
            let opened = self.deployment.open_stream(&after).await?;
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
                let next = stream.next().await?;
                match next.decoded(&mut self.decoder)? {
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
            && self.deployment.scope().db() == Some(ns.db.as_str())
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
        let (time, doc) = self.deployment.read_one(&self.coll, id).await?;
        self.deployment.progress().update(|p| p.reread += 1);
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
                tracing::info!(scope = %self.deployment.scope(), "snapshot: every document read");
                self.deployment.progress().update(|p| p.finished = true);
                // A snapshot requested while streaming goes on streaming.
                if self.deployment.mode() == SnapshotMode::InitialOnly && self.filter.is_none() {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::VecDeque;

    use std::sync::Mutex;

    use bson::{Document, doc};

    use super::*;

    /// The deployment as a script: the stream is set on the cursor; documents read again
    /// come from `reads`, in order.
    struct Script {
        scope: Scope,
        progress: Progress,
        reads: Mutex<VecDeque<(ClusterTime, Option<RawDocumentBuf>)>>,
    }

    #[async_trait::async_trait]
    impl Deployment for Script {
        fn scope(&self) -> &Scope {
            &self.scope
        }
        fn mode(&self) -> SnapshotMode {
            SnapshotMode::Initial
        }
        fn progress(&self) -> &Progress {
            &self.progress
        }
        async fn open_stream(&self, _: &StartPosition) -> cdc_core::Result<Box<dyn ChangeCursor>> {
            Err(cdc_core::Error::Protocol(
                "the scripted stream is set on the cursor".into(),
            ))
        }
        async fn read_one(
            &self,
            coll: &str,
            id: Bson,
        ) -> cdc_core::Result<(ClusterTime, Option<RawDocumentBuf>)> {
            assert_eq!(coll, "c");
            let read = self.reads.lock().unwrap().pop_front();
            read.ok_or_else(|| cdc_core::Error::Protocol(format!("no scripted read of {id}")))
        }
    }

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

    /// A cursor over `chunks` and a stream of `events`, with documents read again from
    /// `reads`: no driver client.
    fn cursor(
        reads: Vec<(ClusterTime, Option<Document>)>,
        chunks: Vec<Chunk>,
        events: Vec<ChangeEvent>,
    ) -> SnapshotCursor {
        let script = Arc::new(Script {
            scope: Scope::collection("d", "c"),
            progress: Progress::default(),
            reads: Mutex::new(
                reads
                    .into_iter()
                    .map(|(t, d)| (t, d.map(|d| RawDocumentBuf::try_from(&d).unwrap())))
                    .collect(),
            ),
        });
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
        SnapshotCursor::with_reader(script, position, rx, tokio::spawn(async {})).with_stream(
            Box::new(Scripted {
                events: events.into(),
                last: None,
                pbrt: token(u32::MAX - 1),
            }),
        )
    }

    /// `(operation, _id, version)` of what the cursor hands over until the snapshot is
    /// read and the stream idle.
    async fn drain(cursor: &mut SnapshotCursor) -> Vec<(String, i64, i64)> {
        let mut out = Vec::new();
        for _ in 0..100 {
            match cursor.next().await.unwrap().into_event().unwrap() {
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
            vec![],
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
            vec![],
            vec![
                chunk(10, &[doc! { "_id": 1_i64, "v": 1_i64 }]),
                chunk(20, &[doc! { "_id": 2_i64, "v": 0_i64 }]),
            ],
            vec![update(12, 1, 2), update(25, 2, 1)],
        );
        let row = c.next().await.unwrap().into_event().unwrap().unwrap();
        let at = SnapshotPosition::of(&StartPosition::ResumeAfter(row.token.clone()))
            .unwrap()
            .unwrap();
        assert_eq!((at.after, at.start), (Some(Bson::Int64(1)), token(1)));
        let change = c.next().await.unwrap().into_event().unwrap().unwrap();
        assert_eq!(
            change.token.data(),
            Some(format!("82{:08X}00000001", 12).as_str())
        );
        let at = SnapshotPosition::of(&StartPosition::ResumeAfter(change.token.clone()))
            .unwrap()
            .unwrap();
        assert_eq!((at.after, at.start), (Some(Bson::Int64(1)), token(12)));
        let row = c.next().await.unwrap().into_event().unwrap().unwrap();
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
        let reopened =
            SnapshotCursor::with_reader(Arc::clone(&c.deployment), at, rx, tokio::spawn(async {}));
        let again = reopened
            .position_token(&token(30), ClusterTime::new(30, 1), None)
            .unwrap();
        assert_eq!(
            again.snapshot_row().map(|r| r.snapshot),
            Some(ClusterTime::new(1, 1))
        );
        // The snapshot is read: the change held back comes with its own token.
        let change = c.next().await.unwrap().into_event().unwrap().unwrap();
        assert_eq!(change.token, token(25));
    }

    /// Chunk times going backwards cannot be placed: a transient error, so the processor
    /// continues from its stored point.
    #[tokio::test]
    async fn chunk_times_going_backwards_are_refused() {
        let mut c = cursor(
            vec![],
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
        // Read again, the document is at version 7 (at time 13).
        let mut c = cursor(
            vec![(
                ClusterTime::new(13, 1),
                Some(doc! { "_id": 1_i64, "v": 7_i64 }),
            )],
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
        c.deployment.progress().get().unwrap()
    }
}
