//! The DocumentProcessor end to end: through the real driver against mongo-sim.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use bson::{Bson, Document, doc};
use cdc_core::{CheckpointPolicy, ClusterTime, ErrorKind, ResumeStore};
use cdc_processor::{
    BoxError, ChangeEvent, CollectionWatcher, Dispatcher, DocumentProcessor, Error,
    InvalidatePolicy, JsonWatcher, Typed, TypedWatcher, default_backoff, stores::MemoryStore,
};
use mongo_sim::{MongoSim, SimOptions, TestDeployment};
use mongodb::{Client, Collection};

/// Records every event it is given; fails on the event whose `_id` is `fail_on`.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<(String, Bson)>>>,
    fail_on: Arc<Mutex<Option<Bson>>>,
}

impl Recorder {
    fn seen(&self) -> Vec<(String, Bson)> {
        self.seen.lock().unwrap().clone()
    }
    fn ids(&self) -> Vec<Bson> {
        self.seen()
            .into_iter()
            .filter(|(op, _)| op != "invalidate")
            .map(|(_, id)| id)
            .collect()
    }

    /// The ids of the test's own documents (`Int32`), in delivery order: without the
    /// string-keyed markers `ready` writes.
    fn written(&self) -> Vec<Bson> {
        self.ids()
            .into_iter()
            .filter(|id| matches!(id, Bson::Int32(_)))
            .collect()
    }
}

#[async_trait]
impl Dispatcher for Recorder {
    async fn dispatch(
        &self,
        event: &ChangeEvent,
        previous: Option<BoxError>,
    ) -> Result<(), BoxError> {
        if let Some(e) = previous {
            return Err(e);
        }
        let id = event.document_id().unwrap_or(Bson::Null);
        if self.fail_on.lock().unwrap().as_ref() == Some(&id) {
            return Err(format!("refusing {id}").into());
        }
        self.seen
            .lock()
            .unwrap()
            .push((event.operation_type.to_string(), id));
        Ok(())
    }
}

/// A deployment (mongo-sim, or `CDC_MONGODB_URI`), a database of the test's own, a store.
struct Env {
    deployment: TestDeployment,
    client: Client,
    store: Arc<MemoryStore>,
    db: String,
}

impl Env {
    async fn new(db: &str) -> Self {
        let deployment = TestDeployment::start().await.unwrap();
        let client = Client::with_uri_str(deployment.uri()).await.unwrap();
        client.database(db).drop().await.unwrap();
        Self {
            deployment,
            client,
            store: Arc::new(MemoryStore::new()),
            db: db.to_owned(),
        }
    }

    fn coll(&self) -> Collection<Document> {
        self.client.database(&self.db).collection("items")
    }

    fn stream(&self) -> String {
        format!("{}.items", self.db)
    }

    fn watch(&self) -> cdc_processor::Watch {
        cdc_processor::Watch::collection(self.client.clone(), self.db.clone(), "items")
    }

    fn builder(&self) -> cdc_processor::Builder {
        DocumentProcessor::builder()
            .source(self.watch())
            .store(self.store.clone())
    }

    async fn stored_time(&self) -> Option<ClusterTime> {
        self.store.load_cluster_time(&self.stream()).await.unwrap()
    }

    /// The simulator, for tests that need its fault controls; `None` (after printing why
    /// the test is skipped) against a real deployment.
    fn sim(&self, test: &str) -> Option<&MongoSim> {
        let sim = self.deployment.sim();
        if sim.is_none() {
            eprintln!("SKIPPED {test}: needs mongo-sim's fault controls (CDC_MONGODB_URI is set)");
        }
        sim
    }
}

/// Runs the processor in the background.
fn spawn(
    p: &DocumentProcessor,
    handler: impl Dispatcher + 'static,
) -> tokio::task::JoinHandle<cdc_processor::Result<()>> {
    let p = p.clone();
    tokio::spawn(async move { p.start(handler).await })
}

/// Waits until `cond` holds, failing the test after 20 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Inserting documents with a processor already watching: waits until the stream is open.
async fn ready(env: &Env, rec: &Recorder) {
    // A marker document proves the stream is open and reading.
    let marker = Bson::String(format!("ready-{}", rec.seen().len()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        env.coll()
            .insert_one(doc! { "_id": marker.clone() })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        if rec.ids().contains(&marker) {
            return;
        }
        env.coll()
            .delete_one(doc! { "_id": marker.clone() })
            .await
            .unwrap();
        assert!(
            tokio::time::Instant::now() < deadline,
            "the processor never started reading"
        );
    }
}

fn ids(range: std::ops::Range<i32>) -> Vec<Bson> {
    range.map(Bson::Int32).collect()
}

#[derive(Clone, Default)]
struct Counter {
    counts: Arc<Mutex<[u32; 3]>>,
    docs: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl CollectionWatcher for Counter {
    async fn insert(&self, doc: &[u8]) -> Result<(), BoxError> {
        self.counts.lock().unwrap()[0] += 1;
        self.docs
            .lock()
            .unwrap()
            .push(String::from_utf8(doc.to_vec())?);
        Ok(())
    }
    async fn update(&self, doc: &[u8]) -> Result<(), BoxError> {
        self.counts.lock().unwrap()[1] += 1;
        self.docs
            .lock()
            .unwrap()
            .push(String::from_utf8(doc.to_vec())?);
        Ok(())
    }
    async fn delete(&self, doc: &[u8]) -> Result<(), BoxError> {
        self.counts.lock().unwrap()[2] += 1;
        self.docs
            .lock()
            .unwrap()
            .push(String::from_utf8(doc.to_vec())?);
        Ok(())
    }
}

/// The Go package's own test: five documents inserted, updated and deleted, counted per
/// action.
#[tokio::test]
async fn go_port_five_documents_counted_per_action() {
    let env = Env::new("p_go_port_five_documents_counted_per_actio").await;
    let p = env.builder().build().unwrap();
    let counter = Counter::default();
    let rec = Recorder::default();
    let task = spawn(
        &p,
        cdc_core::DispatchChain::new()
            .then(rec.clone())
            .then(JsonWatcher(counter.clone())),
    );
    ready(&env, &rec).await;
    let base = *counter.counts.lock().unwrap();
    for i in 0..5 {
        env.coll()
            .insert_one(doc! { "_id": i, "name": format!("doc{i}") })
            .await
            .unwrap();
    }
    for i in 0..5 {
        env.coll()
            .update_one(doc! { "_id": i }, doc! { "$set": { "v": 2 } })
            .await
            .unwrap();
    }
    for i in 0..5 {
        env.coll().delete_one(doc! { "_id": i }).await.unwrap();
    }
    until("15 changes", || {
        let c = *counter.counts.lock().unwrap();
        c[0] - base[0] >= 5 && c[1] - base[1] >= 5 && c[2] - base[2] >= 5
    })
    .await;
    p.stop();
    task.await.unwrap().unwrap();
    let c = *counter.counts.lock().unwrap();
    assert_eq!((c[0] - base[0], c[1] - base[1], c[2] - base[2]), (5, 5, 5));
    let docs = counter.docs.lock().unwrap().clone();
    assert!(
        docs.contains(&r#"{"_id":3,"name":"doc3","v":2}"#.to_owned()),
        "update gives the post-image: {docs:?}"
    );
    let stats = p.stats();
    assert!(stats.events_by_type.get("insert").copied().unwrap_or(0) >= 5);
    assert!(stats.last_checkpoint.is_some() && stats.checkpoints > 0);
    env.deployment.shutdown().await;
}

/// Resume after stop: events written while stopped arrive after the restart, none twice.
#[tokio::test]
async fn resume_after_stop_delivers_exactly_the_missed_events() {
    let env = Env::new("p_resume_after_stop_delivers_exactly_the_m").await;
    let rec = Recorder::default();
    let p = env.builder().build().unwrap();
    let task = spawn(&p, rec.clone());
    ready(&env, &rec).await;
    for i in 0..3 {
        env.coll().insert_one(doc! { "_id": i }).await.unwrap();
    }
    until("three inserts", || rec.written().len() == 3).await;
    p.stop();
    task.await.unwrap().unwrap();
    let checkpoint = env.stored_time().await.unwrap();
    assert_eq!(
        Some(checkpoint),
        p.stats().last_cluster_time,
        "a graceful stop saves the last event processed"
    );
    let stored = env.store.load(&env.stream()).await.unwrap().unwrap();
    let age = bson::DateTime::now().timestamp_millis() - stored.saved_at.timestamp_millis();
    assert!(
        (0..60_000).contains(&age),
        "a point is stamped when it is saved ({age} ms ago)"
    );
    for i in 3..6 {
        env.coll().insert_one(doc! { "_id": i }).await.unwrap();
    }
    let p2 = env.builder().build().unwrap();
    let task = spawn(&p2, rec.clone());
    until("six inserts", || rec.written().len() >= 6).await;
    p2.stop();
    task.await.unwrap().unwrap();
    let ints: Vec<Bson> = rec.written();
    assert_eq!(ints, ids(0..6), "in order, none lost, none twice");
    env.deployment.shutdown().await;
}

/// Any read-ahead size, from none to more than one hand-over, delivers every event once and
/// in order, in bursts larger than a driver batch.
#[tokio::test]
async fn every_read_ahead_size_delivers_in_order() {
    for prefetch in [1, 2, 300, 5000] {
        let env = Env::new(&format!("p_every_read_ahead_size_{prefetch}")).await;
        let rec = Recorder::default();
        let p = env
            .builder()
            .source(
                env.watch()
                    .options(cdc_processor::SourceOptions::default().batch_size(7)),
            )
            .prefetch(prefetch)
            .build()
            .unwrap();
        let task = spawn(&p, rec.clone());
        ready(&env, &rec).await;
        let docs: Vec<Document> = (0..600).map(|i| doc! { "_id": i }).collect();
        env.coll().insert_many(docs).await.unwrap();
        until("600 inserts", || rec.written().len() >= 600).await;
        p.stop();
        task.await.unwrap().unwrap();
        let ints: Vec<Bson> = rec.written();
        assert_eq!(
            ints,
            ids(0..600),
            "prefetch {prefetch}: in order, once each"
        );
        assert_eq!(
            env.stored_time().await,
            p.stats().last_cluster_time,
            "prefetch {prefetch}: the graceful stop saved the last event"
        );
        env.deployment.shutdown().await;
    }
}

/// Resume from a given point: a point saved beforehand is where the processor starts.
#[tokio::test]
async fn resume_from_a_given_point() {
    let env = Env::new("p_resume_from_a_given_point").await;
    let mut watch = env.coll().watch().await.unwrap();
    for i in 0..4 {
        env.coll().insert_one(doc! { "_id": i }).await.unwrap();
    }
    let mut tokens = Vec::new();
    for _ in 0..4 {
        let e = tokio::time::timeout(Duration::from_secs(10), futures_next(&mut watch))
            .await
            .unwrap();
        tokens.push(e);
    }
    let second = &tokens[1];
    let token = cdc_mongo::from_driver_token(&second.id).unwrap();
    let point = cdc_core::ResumePoint::for_event(
        token,
        second.cluster_time.unwrap().into(),
        cdc_core::OperationType::Insert,
        bson::DateTime::now(),
    );
    env.store.save(&env.stream(), &point).await.unwrap();
    let rec = Recorder::default();
    let p = env.builder().build().unwrap();
    let task = spawn(&p, rec.clone());
    until("two events", || rec.ids().len() >= 2).await;
    p.stop();
    task.await.unwrap().unwrap();
    assert_eq!(rec.ids(), ids(2..4));
    env.deployment.shutdown().await;
}

async fn futures_next(
    s: &mut mongodb::change_stream::ChangeStream<
        mongodb::change_stream::event::ChangeStreamEvent<Document>,
    >,
) -> mongodb::change_stream::event::ChangeStreamEvent<Document> {
    loop {
        if let Some(e) = s.next_if_any().await.unwrap() {
            return e;
        }
    }
}

/// A handler error stops the stream with it; the stored point stays at the last event
/// fully processed, and a restart delivers the failed event again.
#[tokio::test]
async fn handler_error_stops_and_the_event_is_delivered_again() {
    let env = Env::new("p_handler_error_stops_and_the_event_is_del").await;
    let rec = Recorder::default();
    let p = env
        .builder()
        .checkpoint(CheckpointPolicy::every_event())
        .build()
        .unwrap();
    let mut errors = p.on_start_err();
    let task = spawn(&p, rec.clone());
    ready(&env, &rec).await;
    *rec.fail_on.lock().unwrap() = Some(Bson::Int32(3));
    for i in 0..6 {
        env.coll().insert_one(doc! { "_id": i }).await.unwrap();
    }
    let err = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Handler, "{err}");
    assert!(err.to_string().contains("insert"), "{err}");
    let published = errors.try_recv().expect("the failure was published");
    assert_eq!(published.kind(), ErrorKind::Handler);
    let ints: Vec<Bson> = rec.written();
    assert_eq!(ints, ids(0..3));
    // The stored point is event 2's: resuming after it yields event 3 first.
    let stored = env.store.load(&env.stream()).await.unwrap().unwrap();
    let token = cdc_mongo::to_driver_token(&stored.token).unwrap();
    let mut after = env.coll().watch().resume_after(token).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), futures_next(&mut after))
        .await
        .unwrap();
    assert_eq!(first.document_key, Some(doc! { "_id": 3 }));
    *rec.fail_on.lock().unwrap() = None;
    let p2 = env.builder().build().unwrap();
    let task = spawn(&p2, rec.clone());
    until("the rest", || rec.written().len() >= 6).await;
    p2.stop();
    task.await.unwrap().unwrap();
    let ints: Vec<Bson> = rec.written();
    assert_eq!(
        ints,
        ids(0..6),
        "event 3 delivered again, nothing before it twice"
    );
    env.deployment.shutdown().await;
}

/// A handler that fails for a while is called again in process (no restart, no reopen)
/// and the event is delivered; one that keeps failing stops the processor after the
/// policy's retries, with the number of calls in the error, and `start_with_retry` does
/// not restart it (the same event would fail again).
#[tokio::test]
async fn handler_errors_are_retried_in_process_then_stop() {
    let env = Env::new("p_handler_errors_are_retried_in_process").await;
    let rec = Recorder::default();
    *rec.fail_on.lock().unwrap() = Some(Bson::Int32(1));
    let p = env
        .builder()
        .on_handler_error(
            cdc_processor::HandlerErrorPolicy::stop()
                .retries(1000)
                .backoff(Duration::from_millis(5), Duration::from_millis(20)),
        )
        .build()
        .unwrap();
    let p2 = p.clone();
    let r2 = rec.clone();
    let task = tokio::spawn(async move { p2.start_with_retry(default_backoff(), r2).await });
    until("the stream to open", || p.stats().checkpoints >= 1).await;
    for i in 0..3 {
        env.coll().insert_one(doc! { "_id": i }).await.unwrap();
    }
    until("the first event", || !rec.ids().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rec.ids(), ids(0..1), "event 1 is being retried; 2 waits");
    *rec.fail_on.lock().unwrap() = None;
    until("all three", || rec.ids().len() >= 3).await;
    p.stop();
    task.await.unwrap().unwrap();
    assert_eq!(rec.ids(), ids(0..3));
    let stats = p.stats();
    assert_eq!((stats.restarts, stats.reopens), (0, 0), "{stats:?}");

    let stopping = env
        .builder()
        .stream_id("strict")
        .on_handler_error(
            cdc_processor::HandlerErrorPolicy::stop()
                .retries(2)
                .backoff(Duration::from_millis(5), Duration::from_millis(5)),
        )
        .build()
        .unwrap();
    let rec = Recorder::default();
    *rec.fail_on.lock().unwrap() = Some(Bson::Int32(9));
    let s2 = stopping.clone();
    let r2 = rec.clone();
    let task = tokio::spawn(async move { s2.start_with_retry(default_backoff(), r2).await });
    until("the stream to open", || stopping.stats().checkpoints >= 1).await;
    env.coll().insert_one(doc! { "_id": 9 }).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Handler);
    assert!(
        !err.is_retryable(),
        "consistent with what the retry loop does"
    );
    match &err {
        Error::Cdc(cdc_core::Error::Handler {
            attempts, token, ..
        }) => {
            assert_eq!(*attempts, 3, "one call and two retries");
            assert!(token.is_some());
        }
        other => panic!("not a handler error: {other:?}"),
    }
    assert!(err.to_string().contains("after 3 attempts"), "{err}");
    assert_eq!(stopping.stats().restarts, 0);
    env.deployment.shutdown().await;
}

/// Idle checkpoints: a stream whose events are all filtered out still moves its stored
/// point forward with the post-batch token, so it never ages out of the oplog.
#[tokio::test]
async fn idle_checkpoints_keep_a_filtered_stream_fresh() {
    let env = Env::new("p_idle_checkpoints_keep_a_filtered_stream_").await;
    let rec = Recorder::default();
    let policy = CheckpointPolicy::default().with_idle_interval(Duration::from_millis(200));
    let p = env
        .builder()
        .source(
            env.watch().options(
                cdc_mongo::SourceOptions::default()
                    .operation_types([cdc_core::OperationType::Delete])
                    .max_await_time(Duration::from_millis(100)),
            ),
        )
        .checkpoint(policy)
        .build()
        .unwrap();
    let task = spawn(&p, rec.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = env.stored_time().await;
    for i in 0..50 {
        env.coll().insert_one(doc! { "_id": i }).await.unwrap();
    }
    let last_insert = env
        .client
        .database("admin")
        .run_command(doc! { "ping": 1 })
        .await
        .unwrap();
    let last_insert: ClusterTime = last_insert.get_timestamp("operationTime").unwrap().into();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stored = env.store.load(&env.stream()).await.unwrap();
        if let Some(point) = stored
            && point.cluster_time >= last_insert
        {
            assert_eq!(point.operation_type, None, "an idle (post-batch) point");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the point never moved past the filtered inserts (was {before:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rec.ids().is_empty(), "nothing was delivered");
    p.stop();
    task.await.unwrap().unwrap();
    env.deployment.shutdown().await;
}

/// Drop of the watched collection: the invalidate is dispatched and stored, and the
/// stream reopens after it in process; events on the re-created collection keep flowing.
#[tokio::test]
async fn invalidate_reopens_after_it_without_a_restart_loop() {
    let env = Env::new("p_invalidate_reopens_after_it_without_a_re").await;
    let rec = Recorder::default();
    let p = env.builder().build().unwrap();
    let task = spawn(&p, rec.clone());
    ready(&env, &rec).await;
    env.coll().insert_one(doc! { "_id": 1 }).await.unwrap();
    env.coll().drop().await.unwrap();
    env.coll().insert_one(doc! { "_id": 2 }).await.unwrap();
    until("the insert after re-creation", || {
        rec.ids().contains(&Bson::Int32(2))
    })
    .await;
    let ops: Vec<String> = rec.seen().into_iter().map(|(op, _)| op).collect();
    assert!(ops.contains(&"invalidate".to_owned()), "{ops:?}");
    assert_eq!(p.stats().reopens, 1);
    p.stop();
    task.await.unwrap().unwrap();
    // The stop policy ends with a typed error after storing the invalidate.
    let rec = Recorder::default();
    let stopper = env
        .builder()
        .stream_id("stopper")
        .invalidate_policy(InvalidatePolicy::Stop)
        .build()
        .unwrap();
    let task = spawn(&stopper, rec.clone());
    ready(&env, &rec).await;
    env.coll().drop().await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::Invalidated(_)), "{err}");
    assert_eq!(
        env.store
            .load("stopper")
            .await
            .unwrap()
            .unwrap()
            .operation_type,
        Some(cdc_core::OperationType::Invalidate)
    );
    env.deployment.shutdown().await;
}

/// A crash (the task aborted, no stop): a new processor on the same store delivers every
/// event not yet checkpointed; repeats stay within the batch bound.
#[tokio::test]
async fn crash_replays_at_most_the_batch_bound() {
    let env = Env::new("p_crash_replays_at_most_the_batch_bound").await;
    let bound = 10;
    let policy = CheckpointPolicy::batched(bound, Duration::from_secs(3600)).unwrap();
    let rec = Recorder::default();
    let p = env.builder().checkpoint(policy.clone()).build().unwrap();
    let task = spawn(&p, rec.clone());
    ready(&env, &rec).await;
    for i in 0..57 {
        env.coll().insert_one(doc! { "_id": i }).await.unwrap();
    }
    until("57 inserts", || rec.written().len() >= 57).await;
    task.abort();
    let _ = task.await;
    for i in 57..70 {
        env.coll().insert_one(doc! { "_id": i }).await.unwrap();
    }
    let p2 = env.builder().checkpoint(policy).build().unwrap();
    let task = spawn(&p2, rec.clone());
    until("all 70", || rec.ids().contains(&Bson::Int32(69))).await;
    p2.stop();
    task.await.unwrap().unwrap();
    let ints: Vec<Bson> = rec.written();
    for i in 0..70 {
        assert!(ints.contains(&Bson::Int32(i)), "event {i} lost");
    }
    let repeats = ints.len() - 70;
    assert!(
        repeats <= bound as usize,
        "{repeats} repeats, bound {bound}"
    );
    env.deployment.shutdown().await;
}

/// A first start saves its opening position at once: a crash before the first
/// checkpoint must not make the next start open at a later "now" and skip what came in
/// between.
#[tokio::test]
async fn a_crash_before_the_first_checkpoint_loses_nothing() {
    let env = Env::new("p_crash_before_first_checkpoint").await;
    let rec = Recorder::default();
    let policy = CheckpointPolicy::batched(1000, Duration::from_secs(3600)).unwrap();
    let p = env.builder().checkpoint(policy.clone()).build().unwrap();
    let task = spawn(&p, rec.clone());
    until("the opening position to be saved", || {
        p.stats().checkpoints >= 1
    })
    .await;
    task.abort();
    let _ = task.await;
    for i in 0..5 {
        env.coll().insert_one(doc! { "_id": i }).await.unwrap();
    }
    let p2 = env.builder().checkpoint(policy).build().unwrap();
    let task = spawn(&p2, rec.clone());
    until("the five written while no processor ran", || {
        rec.ids().len() >= 5
    })
    .await;
    p2.stop();
    task.await.unwrap().unwrap();
    assert_eq!(rec.ids(), ids(0..5));
    env.deployment.shutdown().await;
}

/// Connections killed and a step-down/step-up mid-stream: nothing lost, nothing twice.
#[tokio::test]
async fn connection_drops_and_elections_lose_nothing() {
    let env = Env::new("p_connection_drops_and_elections_lose_noth").await;
    let Some(sim) = env.sim("connection_drops_and_elections_lose_nothing") else {
        return;
    };
    let rec = Recorder::default();
    let p = env.builder().build().unwrap();
    let p2 = p.clone();
    let r2 = rec.clone();
    let task = tokio::spawn(async move { p2.start_with_retry(default_backoff(), r2).await });
    ready(&env, &rec).await;
    for i in 0..20 {
        env.coll().insert_one(doc! { "_id": i }).await.unwrap();
        if i == 5 {
            sim.drop_connections();
        }
        if i == 12 {
            sim.step_down();
            tokio::time::sleep(Duration::from_millis(300)).await;
            sim.step_up();
        }
    }
    until("20 inserts", || rec.written().len() >= 20).await;
    p.stop();
    task.await.unwrap().unwrap();
    let ints: Vec<Bson> = rec.written();
    assert_eq!(ints, ids(0..20));
    env.deployment.shutdown().await;
}

/// The server is unreachable at start: start_with_retry keeps trying, publishes each
/// failure, and catches up once the server is back.
#[tokio::test]
async fn unreachable_at_start_retries_then_catches_up() {
    if std::env::var("CDC_MONGODB_URI").is_ok_and(|u| !u.is_empty()) {
        eprintln!(
            "SKIPPED unreachable_at_start_retries_then_catches_up: it starts its own mongo-sim on a chosen port"
        );
        return;
    }
    if std::env::var("CDC_MONGODB_URI").is_ok_and(|u| !u.is_empty()) {
        eprintln!(
            "SKIPPED unreachable_at_start_retries_then_catches_up: starts its own mongo-sim on a chosen port"
        );
        return;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let uri = format!(
        "mongodb://127.0.0.1:{port}/?directConnection=true&serverSelectionTimeoutMS=300&connectTimeoutMS=300"
    );
    let client = Client::with_uri_str(&uri).await.unwrap();
    let store = Arc::new(MemoryStore::new());
    let p = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            client.clone(),
            "app",
            "items",
        ))
        .store(store.clone())
        .build()
        .unwrap();
    let mut errors = p.on_start_err();
    let rec = Recorder::default();
    let p2 = p.clone();
    let r2 = rec.clone();
    let backoff = cdc_processor::backon::ConstantBuilder::default()
        .with_delay(Duration::from_millis(100))
        .without_max_times();
    let task = tokio::spawn(async move { p2.start_with_retry(backoff, r2).await });
    for _ in 0..2 {
        let e = tokio::time::timeout(Duration::from_secs(20), errors.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::Transient, "{e}");
    }
    let sim = MongoSim::start_with(SimOptions {
        port,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    // The writer is a client of its own: the processor's client, with its 300 ms server
    // selection, may not have seen the server come back yet.
    let writer = Client::with_uri_str(sim.uri()).await.unwrap();
    let coll: Collection<Document> = writer.database("app").collection("items");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    while rec.ids().is_empty() {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(tokio::time::Instant::now() < deadline, "never caught up");
    }
    assert!(p.stats().restarts >= 2);
    p.stop();
    task.await.unwrap().unwrap();
    sim.shutdown().await;
}

#[derive(serde::Deserialize, Debug, PartialEq)]
struct Item {
    #[serde(rename = "_id")]
    id: i32,
    name: String,
}

#[derive(Clone, Default)]
struct TypedRec(Arc<Mutex<Vec<String>>>);

#[async_trait]
impl TypedWatcher<Item> for TypedRec {
    async fn insert(&self, doc: Item, _: &ChangeEvent) -> Result<(), BoxError> {
        self.0
            .lock()
            .unwrap()
            .push(format!("insert {} {}", doc.id, doc.name));
        Ok(())
    }
    async fn update(&self, doc: Option<Item>, _: &ChangeEvent) -> Result<(), BoxError> {
        self.0
            .lock()
            .unwrap()
            .push(format!("update {:?}", doc.map(|d| d.name)));
        Ok(())
    }
    async fn delete(&self, before: Option<Item>, event: &ChangeEvent) -> Result<(), BoxError> {
        self.0.lock().unwrap().push(format!(
            "delete {} {:?}",
            event.document_id_string().unwrap(),
            before.map(|d| d.name)
        ));
        Ok(())
    }
}

#[tokio::test]
async fn typed_watcher_and_stop_from_inside_a_handler() {
    let env = Env::new("p_typed_watcher_and_stop_from_inside_a_han").await;
    env.client
        .database(&env.db)
        .create_collection("items")
        .await
        .unwrap();
    cdc_mongo::enable_pre_post_images(&env.client.database(&env.db), "items")
        .await
        .unwrap();
    let p = env.builder().build().unwrap();
    // Stop before start, and twice: harmless; a stopped processor does not start again.
    let idle = env.builder().stream_id("idle").build().unwrap();
    idle.stop();
    idle.stop();
    let err = idle.start(Recorder::default()).await.unwrap_err();
    assert!(matches!(err, Error::Stopped(ref s) if s == "idle"), "{err}");
    assert!(!err.is_retryable());

    let typed = TypedRec::default();
    let stop = p.stop_handle();
    let t2 = typed.clone();
    let chain = cdc_core::DispatchChain::new()
        .then(Typed::new(t2))
        .then(cdc_core::FnDispatcher(
            move |e: &ChangeEvent, prev: Option<BoxError>| {
                if e.operation_type == cdc_core::OperationType::Delete {
                    stop.stop(); // from inside a handler
                }
                prev.map_or(Ok(()), Err)
            },
        ));
    let task = spawn(&p, chain);
    // The stream is open once the opening position is saved.
    let opened = p.clone();
    until("the stream to open", move || {
        opened.stats().checkpoints >= 1
    })
    .await;
    // Each write waits for the previous event: `updateLookup` reads the document when
    // the event is read, so an update read after the delete has no post-image.
    let seen = |n: usize| {
        let typed = typed.clone();
        move || typed.0.lock().unwrap().len() >= n
    };
    env.coll()
        .insert_one(doc! { "_id": 1, "name": "tea" })
        .await
        .unwrap();
    until("the insert", seen(1)).await;
    env.coll()
        .update_one(doc! { "_id": 1 }, doc! { "$set": { "name": "green tea" } })
        .await
        .unwrap();
    until("the update", seen(2)).await;
    env.coll().delete_one(doc! { "_id": 1 }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        typed.0.lock().unwrap().clone(),
        vec![
            "insert 1 tea",
            "update Some(\"green tea\")",
            "delete 1 Some(\"green tea\")"
        ]
    );
    // A document of the wrong shape is a handler error naming the document.
    env.coll()
        .insert_one(doc! { "_id": 2, "name": 5 })
        .await
        .unwrap();
    let p3 = env.builder().stream_id("typed-bad").build().unwrap();
    env.store.delete("typed-bad").await.unwrap();
    let task = spawn(&p3, Typed::new(TypedRec::default()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.coll()
        .insert_one(doc! { "_id": 3, "name": 7 })
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("handler failed"), "{err}");
    let source = std::error::Error::source(&err)
        .map(ToString::to_string)
        .unwrap_or_default();
    let chain = format!(
        "{err} {source} {}",
        match &err {
            Error::Cdc(cdc_core::Error::Handler { source, .. }) => source.to_string(),
            _ => String::new(),
        }
    );
    assert!(chain.contains("_id 3"), "{chain}");
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn already_running_and_futures_are_send() {
    let env = Env::new("p_already_running_and_futures_are_send").await;
    let p = env.builder().build().unwrap();
    fn assert_send<T: Send>(_: &T) {}
    let owned = p.clone();
    let fut = async move { owned.start(Recorder::default()).await };
    assert_send(&fut);
    let retry = p.start_with_retry(default_backoff(), Recorder::default());
    assert_send(&retry);
    drop(retry);
    let task = tokio::spawn(fut);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = p.start(Recorder::default()).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyRunning(_)));
    p.stop();
    task.await.unwrap().unwrap();
    assert!(matches!(
        DocumentProcessor::builder().build(),
        Err(Error::Build(_))
    ));
    env.deployment.shutdown().await;
}

/// A stored point whose token is well formed but names an event this deployment's log
/// never held (a restored backup, another cluster) is refused at start with a typed,
/// non-retryable error instead of silently skipping every event until the log reaches it.
#[tokio::test]
async fn a_stored_point_the_log_never_held_is_a_typed_error() {
    let env = Env::new("p_a_stored_point_the_log_never_held").await;

    if env.deployment.sim().is_none() {
        eprintln!(
            "SKIPPED a_stored_point_the_log_never_held_is_a_typed_error: it forges a token in mongo-sim's shape"
        );
        return;
    }

    env.coll().insert_one(doc! { "_id": 0 }).await.unwrap();
    let mut watch = env.coll().watch().await.unwrap();
    env.coll().insert_one(doc! { "_id": 1 }).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), futures_next(&mut watch))
        .await
        .unwrap();
    // The real token with its oplog position moved far ahead (mongo-sim's token shape).
    let real = cdc_mongo::from_driver_token(&seen.id).unwrap();
    let data = real.data().unwrap().to_owned();
    let forged = format!("{}{:016X}{}", &data[..18], 1_000_000_u64, &data[34..]);
    let token = cdc_core::ResumeToken::from_document(&doc! { "_data": forged }).unwrap();
    let point = cdc_core::ResumePoint::for_event(
        token,
        seen.cluster_time.unwrap().into(),
        cdc_core::OperationType::Insert,
        bson::DateTime::now(),
    );
    env.store.save(&env.stream(), &point).await.unwrap();
    for i in 2..5 {
        env.coll().insert_one(doc! { "_id": i }).await.unwrap();
    }
    let rec = Recorder::default();
    let p = env.builder().build().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), p.start(rec.clone()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidToken, "{err}");
    assert!(!err.kind().is_retryable());
    assert!(rec.ids().is_empty());
    // The message names the stream and where its point lives.
    let text = err.to_string();
    assert!(
        text.contains(&format!("`{}`", env.stream())) && text.contains("memory"),
        "{text}"
    );
    env.deployment.shutdown().await;
}

/// A stored point later than the deployment's newest operation (a point from another
/// cluster, or saved before the deployment was restored from a backup) is a typed,
/// non-retryable error at start naming the stream and both times, not a silent wait for
/// that time to come.
/// A point names what it was taken from: a stream id pointed at another collection
/// (or a point copied from another stream's) is refused, typed, before the stream opens;
/// nothing starts from another stream's position.
#[tokio::test]
async fn a_point_of_another_namespace_is_refused() {
    let env = Env::new("p_a_point_of_another_namespace").await;
    let rec = Recorder::default();
    let p = env.builder().stream_id("shared").build().unwrap();
    let task = spawn(&p, rec.clone());
    ready(&env, &rec).await;
    p.stop();
    task.await.unwrap().unwrap();
    let stored = env.store.load("shared").await.unwrap().unwrap();
    assert_eq!(
        stored.origin.as_deref(),
        Some("p_a_point_of_another_namespace.items")
    );
    // The same stream id over another collection.
    let other = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            env.client.clone(),
            env.db.clone(),
            "others",
        ))
        .store(env.store.clone())
        .stream_id("shared")
        .build()
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), other.start(rec.clone()))
        .await
        .expect("a typed error, not a wait")
        .unwrap_err();
    assert!(
        matches!(&err, Error::Cdc(cdc_core::Error::ForeignPoint { .. })),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(
        text.contains("`shared`") && text.contains("p_a_point_of_another_namespace.items"),
        "{text}"
    );
    // A point saved before origins were kept loads as it did.
    let mut legacy = stored.clone();
    legacy.origin = None;
    env.store.delete("legacy").await.unwrap();
    env.store.save("legacy", &legacy).await.unwrap();
    let p = env.builder().stream_id("legacy").build().unwrap();
    let task = spawn(&p, rec.clone());
    ready(&env, &rec).await;
    p.stop();
    task.await.unwrap().unwrap();
    assert!(
        env.store
            .load("legacy")
            .await
            .unwrap()
            .unwrap()
            .origin
            .is_some()
    );
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn a_stored_point_ahead_of_the_deployment_is_a_typed_error() {
    let env = Env::new("p_a_stored_point_ahead_of_the_deployment").await;
    let mut watch = env.coll().watch().await.unwrap();
    env.coll().insert_one(doc! { "_id": 1 }).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), futures_next(&mut watch))
        .await
        .unwrap();
    let real: ClusterTime = seen.cluster_time.unwrap().into();
    // The same token, with a cluster time an hour ahead (within a day of the clock, so
    // not refused as corrupt): only the deployment can tell it is wrong.
    let ahead = ClusterTime::new(real.time + 3600, 1);
    let point = cdc_core::ResumePoint::for_event(
        cdc_mongo::from_driver_token(&seen.id).unwrap(),
        ahead,
        cdc_core::OperationType::Insert,
        bson::DateTime::now(),
    );
    env.store.save(&env.stream(), &point).await.unwrap();
    let rec = Recorder::default();
    let p = env.builder().build().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), p.start(rec.clone()))
        .await
        .expect("a typed error, not a wait")
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Cdc(cdc_core::Error::PointAhead { stored, deployment, .. })
                if *stored == ahead && *deployment >= real && *deployment < ahead
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(err.to_string().contains(&env.stream()), "{err}");
    // A point the deployment did reach starts as usual.
    let p = env.builder().stream_id("fine").build().unwrap();
    let task = spawn(&p, rec.clone());
    ready(&env, &rec).await;
    p.stop();
    task.await.unwrap().unwrap();
    env.deployment.shutdown().await;
}
