//! Per-key lanes, barriers, whole transactions, batch handlers, the handler context, the
//! stop deadline and a stream that must not see its own store, end to end through the
//! driver against mongo-sim (or `CDC_MONGODB_URI`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bson::{Bson, Document, doc};
use cdc_core::{OperationType, ResumePoint, ResumeStore, ResumeToken};
use cdc_processor::{
    Batch, BatchDispatcher, BoxError, ChangeEvent, Dispatcher, DocumentProcessor, HandlerContext,
    default_backoff, stores::MemoryStore,
};
use mongo_sim::TestDeployment;
use mongodb::{Client, Collection};

struct Env {
    deployment: TestDeployment,
    client: Client,
    db: String,
    store: Arc<RecordingStore>,
}

impl Env {
    async fn new(db: &str) -> Self {
        let deployment = TestDeployment::start().await.unwrap();
        let client = Client::with_uri_str(deployment.uri()).await.unwrap();
        client.database(db).drop().await.unwrap();
        Self {
            deployment,
            client,
            db: db.to_owned(),
            store: Arc::new(RecordingStore::default()),
        }
    }

    fn coll(&self) -> Collection<Document> {
        self.client.database(&self.db).collection("items")
    }

    fn builder(&self) -> cdc_processor::Builder {
        DocumentProcessor::builder()
            .source(cdc_processor::Watch::collection(
                self.client.clone(),
                self.db.clone(),
                "items",
            ))
            .store(self.store.clone())
    }
}

/// A memory store that remembers every point saved.
#[derive(Default)]
struct RecordingStore {
    inner: MemoryStore,
    saved: Mutex<Vec<ResumeToken>>,
}

#[async_trait]
impl ResumeStore for RecordingStore {
    async fn load(&self, stream: &str) -> cdc_core::Result<Option<ResumePoint>> {
        self.inner.load(stream).await
    }
    async fn save(&self, stream: &str, point: &ResumePoint) -> cdc_core::Result<()> {
        self.saved.lock().unwrap().push(point.token.clone());
        self.inner.save(stream, point).await
    }
    async fn delete(&self, stream: &str) -> cdc_core::Result<()> {
        self.inner.delete(stream).await
    }
    async fn list_streams(&self) -> cdc_core::Result<Vec<String>> {
        self.inner.list_streams().await
    }
    fn describe(&self) -> String {
        "recording memory store".into()
    }
}

/// Waits until `cond` holds, failing the test after 30 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs the processor with `handler` in the background.
fn spawn(
    p: &DocumentProcessor,
    handler: impl Dispatcher + 'static,
) -> tokio::task::JoinHandle<cdc_processor::Result<()>> {
    let p = p.clone();
    tokio::spawn(async move { p.start(handler).await })
}

/// Waits until the processor has opened its stream (it saves its opening position).
async fn opened(p: &DocumentProcessor) {
    let p = p.clone();
    until("the stream to open", move || p.stats().checkpoints >= 1).await;
}

/// What a handler saw of one event.
#[derive(Clone, Debug)]
struct Seen {
    op: OperationType,
    id: Bson,
    version: Option<i32>,
    lane: Option<usize>,
    transaction: Option<(usize, usize)>,
    token: ResumeToken,
    concurrent: usize,
    attempt: u32,
    call: u32,
    // Read only by the deployment-stream test, which needs the `mongodb` store.
    #[cfg_attr(not(feature = "mongodb"), allow(dead_code))]
    ns: Option<String>,
}

/// Records events with their context; sleeps a little per event so lanes overlap.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
    in_flight: Arc<AtomicUsize>,
    sleep_ms: u64,
    fail_once_on: Arc<Mutex<Option<Bson>>>,
}

impl Recorder {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn version_of(e: &ChangeEvent) -> Option<i32> {
    if let Ok(Some(desc)) = e.update_description() {
        return desc.updated_fields.get_i32("v").ok();
    }
    e.full_document().and_then(|d| d.get_i32("v").ok())
}

#[async_trait]
impl Dispatcher for Recorder {
    async fn dispatch(&self, e: &ChangeEvent, prev: Option<BoxError>) -> Result<(), BoxError> {
        if let Some(prev) = prev {
            return Err(prev);
        }
        let concurrent = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let ctx = HandlerContext::current().expect("a context inside a handler call");
        if self.sleep_ms > 0 {
            // A little I/O-like waiting, varying by key so lanes interleave.
            let jitter = e.document_id().map_or(0, |id| match id {
                Bson::Int32(n) => u64::from(n.unsigned_abs()) % 3,
                _ => 0,
            });
            tokio::time::sleep(Duration::from_millis(self.sleep_ms + jitter)).await;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let id = e.document_id().unwrap_or(Bson::Null);
        {
            let mut fail = self.fail_once_on.lock().unwrap();
            if fail.as_ref() == Some(&id) {
                *fail = None;
                return Err(format!("refusing {id} once").into());
            }
        }
        self.seen.lock().unwrap().push(Seen {
            op: e.operation_type.clone(),
            id,
            version: version_of(e),
            lane: ctx.lane(),
            transaction: ctx.transaction().map(|t| (t.index, t.len)),
            token: e.token.clone(),
            concurrent,
            attempt: ctx.attempt(),
            call: ctx.call(),
            ns: e.ns.as_ref().map(ToString::to_string),
        });
        Ok(())
    }
}

#[tokio::test]
async fn lanes_keep_each_keys_order_and_run_keys_concurrently() {
    let env = Env::new("lanes_order").await;
    let p = env.builder().concurrency(16).build().unwrap();
    let rec = Recorder {
        sleep_ms: 1,
        ..Recorder::default()
    };
    let task = spawn(&p, rec.clone());
    opened(&p).await;
    let (keys, versions) = (40, 8);
    for v in 0..versions {
        for k in 0..keys {
            env.coll()
                .update_one(doc! { "_id": k }, doc! { "$set": { "v": v } })
                .upsert(true)
                .await
                .unwrap();
        }
    }
    let total = usize::try_from(keys * versions).unwrap();
    until("every event", || rec.seen().len() >= total).await;
    p.stop();
    task.await.unwrap().unwrap();

    let seen = rec.seen();
    assert_eq!(seen.len(), total, "each event once");
    let mut per_key: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    let mut lane_of: HashMap<i32, usize> = HashMap::new();
    for s in &seen {
        let Bson::Int32(k) = s.id else {
            panic!("{s:?}")
        };
        per_key.entry(k).or_default().push(s.version.unwrap());
        let lane = s.lane.expect("keyed events run on a lane");
        assert!(lane < 16);
        assert_eq!(
            *lane_of.entry(k).or_insert(lane),
            lane,
            "a key stays on its lane"
        );
    }
    for (k, vs) in &per_key {
        assert_eq!(
            vs,
            &(0..versions).collect::<Vec<_>>(),
            "key {k} in stream order"
        );
    }
    assert!(
        seen.iter().any(|s| s.concurrent > 1),
        "different keys ran concurrently"
    );
    assert!(
        lane_of
            .values()
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 1
    );
    // The final checkpoint is the last event's position: nothing is left unacknowledged.
    let stored = env.store.load(p.stream_id()).await.unwrap().unwrap();
    let last = seen
        .iter()
        .map(|s| s.token.clone())
        .max_by_key(|t| t.to_string())
        .unwrap();
    assert!(stored.token.to_string() >= last.to_string());
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn events_without_a_key_are_barriers_handled_alone() {
    let env = Env::new("lanes_barrier").await;
    let p = env.builder().concurrency(8).build().unwrap();
    let rec = Recorder {
        sleep_ms: 2,
        ..Recorder::default()
    };
    let task = spawn(&p, rec.clone());
    opened(&p).await;
    env.coll()
        .insert_many((0..30).map(|i| doc! { "_id": i }))
        .await
        .unwrap();
    // Dropping the collection invalidates the stream: a barrier.
    env.coll().drop().await.unwrap();
    let seen_invalidate = rec.clone();
    until("the invalidate", move || {
        seen_invalidate
            .seen()
            .iter()
            .any(|s| s.op == OperationType::Invalidate)
    })
    .await;
    // The processor reopens after it; later events keep flowing through the lanes.
    env.coll().insert_one(doc! { "_id": 100 }).await.unwrap();
    let after = rec.clone();
    until("the event after the barrier", move || {
        after.seen().iter().any(|s| s.id == Bson::Int32(100))
    })
    .await;
    p.stop();
    task.await.unwrap().unwrap();
    let seen = rec.seen();
    let at = seen
        .iter()
        .position(|s| s.op == OperationType::Invalidate)
        .unwrap();
    let barrier = &seen[at];
    assert_eq!(barrier.lane, None, "handled alone");
    assert_eq!(barrier.concurrent, 1, "no other handler ran meanwhile");
    let before: Vec<&Bson> = seen[..at].iter().map(|s| &s.id).collect();
    assert_eq!(before.len(), 30, "every lane drained before the barrier");
    assert_eq!(
        seen[at + 1..]
            .iter()
            .filter(|s| s.id == Bson::Int32(100))
            .count(),
        1
    );
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn transactions_are_handled_whole_and_never_checkpointed_inside() {
    let env = Env::new("lanes_txn").await;
    env.client
        .database(&env.db)
        .create_collection("items")
        .await
        .unwrap();
    let p = env
        .builder()
        .concurrency(8)
        .checkpoint(cdc_core::CheckpointPolicy::every_event())
        .build()
        .unwrap();
    let rec = Recorder {
        sleep_ms: 1,
        ..Recorder::default()
    };
    let task = spawn(&p, rec.clone());
    opened(&p).await;
    env.coll().insert_one(doc! { "_id": 1000 }).await.unwrap();
    let mut session = env.client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    for i in 0..6 {
        env.coll()
            .insert_one(doc! { "_id": i, "v": 0 })
            .session(&mut session)
            .await
            .unwrap();
    }
    session.commit_transaction().await.unwrap();
    env.coll().insert_one(doc! { "_id": 1001 }).await.unwrap();
    until("every event", || rec.seen().len() >= 8).await;
    p.stop();
    task.await.unwrap().unwrap();

    let seen = rec.seen();
    let txn: Vec<&Seen> = seen.iter().filter(|s| s.transaction.is_some()).collect();
    assert_eq!(txn.len(), 6);
    let start = seen.iter().position(|s| s.transaction.is_some()).unwrap();
    for (i, s) in seen[start..start + 6].iter().enumerate() {
        assert_eq!(
            s.transaction,
            Some((i, 6)),
            "in order, contiguous: {seen:?}"
        );
        assert_eq!(s.id, Bson::Int32(i32::try_from(i).unwrap()));
    }
    // Its keys span lanes: it ran alone.
    assert!(txn.iter().all(|s| s.lane.is_none()));
    // Every event was checkpointed on its own, except inside the transaction.
    let saved = env.store.saved.lock().unwrap().clone();
    for s in &seen[start..start + 5] {
        assert!(
            !saved.contains(&s.token),
            "a point was saved inside the transaction"
        );
    }
    assert!(
        saved.contains(&seen[start + 5].token),
        "after the transaction"
    );
    env.deployment.shutdown().await;
}

/// Records the batches it is given.
#[derive(Clone, Default)]
struct Batches {
    sizes: Arc<Mutex<Vec<usize>>>,
    ids: Arc<Mutex<Vec<Bson>>>,
    fail_first: Arc<Mutex<bool>>,
    /// `ctx.call()` of every call.
    calls: Arc<Mutex<Vec<u32>>>,
}

#[async_trait]
impl BatchDispatcher for Batches {
    async fn dispatch_batch(
        &self,
        batch: &Batch<'_>,
        ctx: &HandlerContext,
    ) -> Result<(), BoxError> {
        assert!(!batch.is_empty());
        self.calls.lock().unwrap().push(ctx.call());
        assert_eq!(batch.units().map(<[_]>::len).sum::<usize>(), batch.len());
        assert!(batch.bytes() > 0);
        assert!(ctx.lane().is_some());
        {
            let mut fail = self.fail_first.lock().unwrap();
            if *fail {
                *fail = false;
                return Err("the sink is down".into());
            }
        }
        self.sizes.lock().unwrap().push(batch.len());
        self.ids
            .lock()
            .unwrap()
            .extend(batch.events().iter().map(|e| e.document_id().unwrap()));
        Ok(())
    }
}

#[tokio::test]
async fn batch_handlers_get_bounded_batches_and_a_failed_batch_comes_again() {
    let env = Env::new("lanes_batches").await;
    let p = env.builder().build().unwrap();
    let batches = Batches {
        fail_first: Arc::new(Mutex::new(true)),
        ..Batches::default()
    };
    let runner = p.clone();
    let handler = batches.clone();
    let task = tokio::spawn(async move {
        runner
            .start_with_retry(
                default_backoff(),
                cdc_processor::Batches::new(handler)
                    .max_events(7)
                    .max_wait(Duration::from_millis(20)),
            )
            .await
    });
    opened(&p).await;
    env.coll()
        .insert_many((0..50).map(|i| doc! { "_id": i }))
        .await
        .unwrap();
    let done = batches.clone();
    until("fifty events", move || done.ids.lock().unwrap().len() >= 50).await;
    p.stop();
    task.await.unwrap().unwrap();
    let sizes = batches.sizes.lock().unwrap().clone();
    assert!(sizes.iter().all(|n| (1..=7).contains(n)), "{sizes:?}");
    let ids = batches.ids.lock().unwrap().clone();
    assert_eq!(
        ids,
        (0..50).map(Bson::Int32).collect::<Vec<_>>(),
        "in order, once, the failed batch again"
    );
    // Called again in process, without a restart.
    assert_eq!(p.stats().restarts, 0);
    assert_eq!(*batches.calls.lock().unwrap().first().unwrap(), 1);
    assert!(batches.calls.lock().unwrap().contains(&2));
    env.deployment.shutdown().await;
}

/// A stop does not wait out `max_batch_wait`: a lane gathering a batch (here for ten
/// minutes, of which it holds one event) hands what it holds over, or gives it up, at
/// once; the processor stops and the event is handled or comes again.
#[tokio::test]
async fn a_stop_does_not_wait_out_the_batch_wait() {
    let env = Env::new("lanes_batch_wait_stop").await;
    let p = env.builder().build().unwrap();
    let batches = Batches::default();
    let runner = p.clone();
    let handler = batches.clone();
    let task = tokio::spawn(async move {
        runner
            .start(
                cdc_processor::Batches::new(handler)
                    .max_events(1000)
                    .max_wait(Duration::from_secs(600)),
            )
            .await
    });
    opened(&p).await;
    env.coll().insert_one(doc! { "_id": 1 }).await.unwrap();
    // The event is read and the lane is gathering (nothing handed over within 600 s).
    let progress = p.clone();
    until("the event read", move || progress.stats().read_events >= 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(batches.ids.lock().unwrap().is_empty());
    p.stop();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the stop was not held up by the ten-minute batch wait")
        .unwrap()
        .unwrap();
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn the_context_carries_the_stop_signal_and_the_attempt() {
    let env = Env::new("lanes_context").await;
    let p = env.builder().concurrency(4).build().unwrap();
    let rec = Recorder::default();
    *rec.fail_once_on.lock().unwrap() = Some(Bson::Int32(3));
    let runner = p.clone();
    let handler = rec.clone();
    let task =
        tokio::spawn(async move { runner.start_with_retry(default_backoff(), handler).await });
    opened(&p).await;
    env.coll()
        .insert_many((0..6).map(|i| doc! { "_id": i }))
        .await
        .unwrap();
    let all = rec.clone();
    until("the refused event, delivered again", move || {
        all.seen().iter().any(|s| s.id == Bson::Int32(3))
    })
    .await;
    let seen = rec.seen();
    let again = seen.iter().find(|s| s.id == Bson::Int32(3)).unwrap();
    assert_eq!(
        (again.attempt, again.call),
        (1, 2),
        "called again in the same run"
    );
    assert!(
        seen.iter()
            .filter(|s| s.call == 1)
            .all(|s| s.id != Bson::Int32(3))
    );
    assert_eq!(p.stats().restarts, 0);

    // A handler waiting on the stop signal is released by `stop`.
    #[derive(Clone, Default)]
    struct Waiter(Arc<Mutex<Vec<bool>>>);
    #[async_trait]
    impl Dispatcher for Waiter {
        async fn dispatch(&self, _: &ChangeEvent, _: Option<BoxError>) -> Result<(), BoxError> {
            let ctx = HandlerContext::current().unwrap();
            assert!(!ctx.is_stopping());
            ctx.stopping().await;
            self.0.lock().unwrap().push(ctx.is_stopping());
            Ok(())
        }
    }
    p.stop();
    task.await.unwrap().unwrap();
    let q = env
        .builder()
        .stream_id("waiter")
        .concurrency(2)
        .build()
        .unwrap();
    let waiter = Waiter::default();
    let task = spawn(&q, waiter.clone());
    opened(&q).await;
    env.coll().insert_one(doc! { "_id": 50 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(waiter.0.lock().unwrap().is_empty(), "still waiting");
    q.stop();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(waiter.0.lock().unwrap().as_slice(), &[true]);
    env.deployment.shutdown().await;
}

/// Hangs forever on the event of document 2; records what it started and finished.
#[derive(Clone, Default)]
struct Hang {
    started: Arc<Mutex<Vec<Bson>>>,
    finished: Arc<Mutex<Vec<Bson>>>,
}

#[async_trait]
impl Dispatcher for Hang {
    async fn dispatch(&self, e: &ChangeEvent, _: Option<BoxError>) -> Result<(), BoxError> {
        let id = e.document_id().unwrap_or(Bson::Null);
        self.started.lock().unwrap().push(id.clone());
        if id == Bson::Int32(2) {
            std::future::pending::<()>().await;
        }
        self.finished.lock().unwrap().push(id);
        Ok(())
    }
}

#[tokio::test]
async fn a_hanging_handler_is_cancelled_at_the_stop_timeout_and_its_event_comes_again() {
    for lanes in [1, 4] {
        let env = Env::new(&format!("lanes_stop_timeout_{lanes}")).await;
        let p = env
            .builder()
            .concurrency(lanes)
            .stop_timeout(Some(Duration::from_millis(300)))
            .build()
            .unwrap();
        let hang = Hang::default();
        let task = spawn(&p, hang.clone());
        opened(&p).await;
        for i in 1..=3 {
            env.coll().insert_one(doc! { "_id": i }).await.unwrap();
        }
        let started = hang.clone();
        until("the hanging call", move || {
            started.started.lock().unwrap().contains(&Bson::Int32(2))
        })
        .await;
        p.stop();
        // `start` returns although the handler never does.
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("start returned after the stop timeout")
            .unwrap()
            .unwrap();
        assert!(!hang.finished.lock().unwrap().contains(&Bson::Int32(2)));
        // The cancelled event was not acknowledged: a new processor gets it again.
        let again = env.builder().concurrency(lanes).build().unwrap();
        let rec = Recorder::default();
        let task = spawn(&again, rec.clone());
        let seen = rec.clone();
        until("the cancelled event, again", move || {
            seen.seen().iter().any(|s| s.id == Bson::Int32(2))
        })
        .await;
        again.stop();
        task.await.unwrap().unwrap();
        env.deployment.shutdown().await;
    }
}

/// A deployment-wide stream with the MongoDB store in the same deployment leaves the
/// store's collection out: its checkpoints are not events of the stream.
#[cfg(feature = "mongodb")]
#[tokio::test]
async fn a_deployment_stream_does_not_see_its_own_store() {
    let env = Env::new("own_store").await;
    let _ = env.client.database("own_store_state").drop().await;
    let store = Arc::new(cdc_processor::stores::MongoStore::new(
        &env.client,
        "own_store_state",
        "points",
    ));
    let p = DocumentProcessor::builder()
        .source(cdc_processor::Watch::deployment(env.client.clone()))
        .stream_id("everything")
        .store(store)
        .checkpoint(cdc_core::CheckpointPolicy::every_event())
        .build()
        .unwrap();
    let rec = Recorder::default();
    let task = spawn(&p, rec.clone());
    opened(&p).await;
    for i in 0..5 {
        env.coll().insert_one(doc! { "_id": i }).await.unwrap();
    }
    // A deployment stream sees every database (other suites too, against a shared
    // deployment): count this test's own namespaces only.
    let ours = |s: &Seen, ns: &str| s.ns.as_deref() == Some(ns);
    let seen = rec.clone();
    until("the five inserts", move || {
        seen.seen()
            .iter()
            .filter(|s| ours(s, "own_store.items"))
            .count()
            >= 5
    })
    .await;
    // A checkpoint per event was written meanwhile; none came back as an event.
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.stop();
    task.await.unwrap().unwrap();
    assert!(p.stats().checkpoints >= 5);
    let seen = rec.seen();
    assert_eq!(
        seen.iter().filter(|s| ours(s, "own_store.items")).count(),
        5
    );
    assert!(
        !seen.iter().any(|s| ours(s, "own_store_state.points")),
        "the store's own writes came back: {seen:?}"
    );
    env.deployment.shutdown().await;
}

/// With no stored point, the processor starts where it is told: at an operation time
/// (inclusive) or after a token; once a point is stored, that wins.
#[tokio::test]
async fn an_explicit_start_position_is_used_when_the_store_holds_none() {
    let env = Env::new("start_position").await;
    let mut watch = env.coll().watch().await.unwrap();
    for i in 0..5 {
        env.coll().insert_one(doc! { "_id": i }).await.unwrap();
    }
    let mut events = Vec::new();
    while events.len() < 5 {
        if let Some(e) = tokio::time::timeout(Duration::from_secs(10), watch.next_if_any())
            .await
            .unwrap()
            .unwrap()
        {
            events.push(e);
        }
    }
    let at = cdc_core::ClusterTime::from(events[2].cluster_time.unwrap());
    let p = env
        .builder()
        .start_position(cdc_core::StartPosition::AtOperationTime(at))
        .build()
        .unwrap();
    let rec = Recorder::default();
    let task = spawn(&p, rec.clone());
    let seen = rec.clone();
    until("events 2 to 4", move || seen.seen().len() >= 3).await;
    p.stop();
    task.await.unwrap().unwrap();
    let ids: Vec<Bson> = rec.seen().iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids, vec![Bson::Int32(2), Bson::Int32(3), Bson::Int32(4)]);
    // A point is stored now: a new processor with another start position continues from it.
    env.coll().insert_one(doc! { "_id": 5 }).await.unwrap();
    let token = cdc_mongo::from_driver_token(&events[0].id).unwrap();
    let q = env
        .builder()
        .start_position(cdc_core::StartPosition::ResumeAfter(token))
        .build()
        .unwrap();
    let rec = Recorder::default();
    let task = spawn(&q, rec.clone());
    let seen = rec.clone();
    until("event 5", move || !seen.seen().is_empty()).await;
    q.stop();
    task.await.unwrap().unwrap();
    assert_eq!(rec.seen()[0].id, Bson::Int32(5), "the stored point wins");
    env.deployment.shutdown().await;
}
