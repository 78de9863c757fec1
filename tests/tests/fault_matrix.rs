//! The fault matrix: each case breaks something on purpose, states the expected outcome,
//! and checks it with the independent verifier (`cdc_tests::verify`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use bson::{Document, doc};
use cdc_core::{BoxError, ChangeEvent, CheckpointPolicy, Dispatcher, ErrorKind, ResumeStore};
use cdc_processor::{
    BeforeChange, DocumentProcessor, HistoryLostPolicy, PreImagePolicy, SourceOptions,
    default_backoff, stores::MemoryStore,
};
use cdc_tests::{
    proxy::{FaultProxy, Mode},
    verify::{Verdict, verify},
};
use mongo_sim::MongoSim;
use mongodb::{Client, Collection};

type Log = Arc<Mutex<Vec<(String, String)>>>;

/// The handler under test: records each delivered change; may fail on one.
#[derive(Clone, Default)]
struct Deliveries {
    log: Log,
    fail_once_on: Arc<Mutex<Option<(String, String)>>>,
}

/// The workload's change, with the id as text as the verifier logs it.
fn change_of(e: &ChangeEvent) -> Option<(String, String)> {
    cdc_tests::workload::change_of(e).map(|(id, change)| (id.to_string(), change))
}

#[async_trait]
impl Dispatcher for Deliveries {
    async fn dispatch(&self, e: &ChangeEvent, previous: Option<BoxError>) -> Result<(), BoxError> {
        if let Some(p) = previous {
            return Err(p);
        }
        let Some(c) = change_of(e) else { return Ok(()) };
        {
            let mut fail = self.fail_once_on.lock().unwrap();
            if fail.as_ref() == Some(&c) {
                *fail = None;
                return Err(format!("handler refuses {c:?} once").into());
            }
        }
        self.log.lock().unwrap().push(c);
        Ok(())
    }
}

/// Writes changes and logs each acknowledged one.
struct Writer {
    coll: Collection<Document>,
    written: Log,
    next: i64,
}

impl Writer {
    async fn changes(&mut self, n: usize) {
        for _ in 0..n {
            let id = self.next;
            self.next += 1;
            self.coll
                .insert_one(doc! { "_id": id, "version": 1_i64 })
                .await
                .unwrap();
            self.written
                .lock()
                .unwrap()
                .push((id.to_string(), "v1".into()));
            if id % 3 == 0 {
                self.coll
                    .update_one(doc! { "_id": id }, doc! { "$set": { "version": 2_i64 } })
                    .await
                    .unwrap();
                self.written
                    .lock()
                    .unwrap()
                    .push((id.to_string(), "v2".into()));
            }
            if id % 5 == 0 {
                self.coll.delete_one(doc! { "_id": id }).await.unwrap();
                self.written
                    .lock()
                    .unwrap()
                    .push((id.to_string(), "deleted".into()));
            }
        }
    }
}

struct Case {
    sim: MongoSim,
    client: Client,
    writer: Writer,
    delivered: Deliveries,
}

impl Case {
    async fn new() -> Self {
        let sim = MongoSim::start().await.unwrap();
        let client = Client::with_uri_str(sim.uri()).await.unwrap();
        let coll = client.database("fm").collection::<Document>("docs");
        client
            .database("fm")
            .create_collection("docs")
            .await
            .unwrap();
        Self {
            sim,
            client,
            writer: Writer {
                coll,
                written: Log::default(),
                next: 0,
            },
            delivered: Deliveries::default(),
        }
    }

    fn watch(&self) -> cdc_processor::Watch {
        cdc_processor::Watch::collection(self.client.clone(), "fm", "docs")
    }

    fn builder(&self, store: Arc<dyn ResumeStore>) -> cdc_processor::Builder {
        DocumentProcessor::builder()
            .source(self.watch())
            .store(store)
    }

    /// Waits until everything written was delivered (or 30 s), then verifies.
    async fn settle(&self, bound: usize) -> Verdict {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.verdict(bound);
            if v.lost == 0 || tokio::time::Instant::now() > deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn verdict(&self, bound: usize) -> Verdict {
        let written = self.writer.written.lock().unwrap().clone();
        let delivered = self.delivered.log.lock().unwrap().clone();
        verify(&written, &delivered, bound)
    }

    async fn fail_point(&self, spec: Document) {
        let mut cmd = doc! { "configureFailPoint": "failCommand" };
        cmd.extend(spec);
        self.client
            .database("admin")
            .run_command(cmd)
            .await
            .unwrap();
    }
}

fn run(
    p: &DocumentProcessor,
    handler: Deliveries,
) -> tokio::task::JoinHandle<cdc_processor::Result<()>> {
    let p = p.clone();
    tokio::spawn(async move { p.start_with_retry(default_backoff(), handler).await })
}

async fn wait_open(p: &DocumentProcessor, case: &mut Case) {
    // The stream is open once its opening position is saved; then a first change must
    // come through.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while p.stats().checkpoints == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the processor never opened: {:?}",
            p.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    case.writer.changes(1).await;
    while case.delivered.log.lock().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the processor never opened: {:?}",
            p.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Resumable faults: CursorNotFound once; two closed connections in a row with batch size
/// 1; a labelled resumable error; a step-down and step-up. Expected: 0 lost, 0 duplicates,
/// order kept.
#[tokio::test]
async fn resumable_faults_lose_and_repeat_nothing() {
    if needs_sim("resumable_faults_lose_and_repeat_nothing") {
        return;
    }
    for fault in ["cursor-not-found", "close-twice", "labelled", "step-down"] {
        let mut case = Case::new().await;
        let store = Arc::new(MemoryStore::new());
        let p = case
            .builder(store)
            .source(case.watch().options(SourceOptions::default().batch_size(1)))
            .build()
            .unwrap();
        let task = run(&p, case.delivered.clone());
        wait_open(&p, &mut case).await;
        case.writer.changes(10).await;
        match fault {
            "cursor-not-found" => case.fail_point(doc! { "mode": { "times": 1 }, "data": { "failCommands": ["getMore"], "errorCode": 43 } }).await,
            "close-twice" => case.fail_point(doc! { "mode": { "times": 2 }, "data": { "failCommands": ["getMore"], "closeConnection": true } }).await,
            "labelled" => {
                case.fail_point(doc! { "mode": { "times": 1 }, "data": { "failCommands": ["getMore"], "errorCode": 91, "errorLabels": ["ResumableChangeStreamError"] } })
                    .await;
            }
            _ => {
                case.sim.step_down();
                tokio::time::sleep(Duration::from_millis(300)).await;
                case.sim.step_up();
            }
        }
        case.writer.changes(10).await;
        let v = case.settle(0).await;
        assert!(v.holds() && v.duplicates == 0, "{fault}: {v}");
        p.stop();
        task.await.unwrap().unwrap();
        case.sim.shutdown().await;
    }
}

/// Fatal faults: getMore fails with ChangeStreamFatalError (280), or with a code that is
/// not resumable on a 4.4+ server (Interrupted, 11601, unlabelled). Expected: a typed fatal
/// error at once, no retry loop, the stored point still at the last processed event.
#[tokio::test]
async fn fatal_faults_stop_at_once_with_the_point_unchanged() {
    if needs_sim("fatal_faults_stop_at_once_with_the_point_unchanged") {
        return;
    }
    for (code, kind) in [(280, ErrorKind::InvalidToken), (11601, ErrorKind::Fatal)] {
        let mut case = Case::new().await;
        let store = Arc::new(MemoryStore::new());
        let p = case
            .builder(store.clone())
            .source(
                case.watch()
                    .options(SourceOptions::default().max_await_time(Duration::from_millis(50))),
            )
            .checkpoint(CheckpointPolicy::every_event())
            .build()
            .unwrap();
        let mut published = p.on_start_err();
        let task = run(&p, case.delivered.clone());
        wait_open(&p, &mut case).await;
        case.writer.changes(5).await;
        let v = case.settle(0).await;
        assert_eq!(v.lost, 0);
        // The handler logs before the event is acknowledged and saved: let it settle.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = store.load("fm.docs").await.unwrap();
        case.fail_point(
            doc! { "mode": "alwaysOn", "data": { "failCommands": ["getMore"], "errorCode": code } },
        )
        .await;
        // A getMore sent before the fail point (it waits at most 50 ms) has answered by now.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mark = case.writer.written.lock().unwrap().len();
        case.writer.changes(2).await;
        let after_fault = case.writer.written.lock().unwrap().len() - mark;
        let err = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("no retry loop")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), kind, "code {code}: {err}");
        // What `on_start_err` publishes is the error itself: its typed cause still holds
        // the driver's error, with the server's code and labels.
        let shared = published.try_recv().unwrap();
        let driver = match &*shared {
            cdc_processor::Error::Cdc(inner) => match inner
                .cause()
                .and_then(|c| c.downcast_ref::<cdc_mongo::Error>())
            {
                Some(cdc_mongo::Error::Driver { source, .. }) => source.clone(),
                other => panic!("code {code}: not a driver error: {other:?}"),
            },
            other => panic!("code {code}: {other:?}"),
        };
        assert_eq!(cdc_mongo::server_code(&driver), Some(code));
        // Not a copy: the very cause the caller of `start` got.
        let cause = |e: &cdc_processor::Error| match e {
            cdc_processor::Error::Cdc(inner) => inner.cause().map(|c| c as *const _ as *const u8),
            _ => None,
        };
        assert!(
            cause(&err).is_some() && cause(&err) == cause(&shared),
            "code {code}"
        );
        assert_eq!(
            p.stats().restarts,
            0,
            "code {code}: not retried: {:?}",
            p.stats()
        );
        // Unchanged as a position: no later cluster time (an idle post-batch token for the
        // same position may have replaced the event's own token), and nothing after the
        // fault was delivered.
        let after = store.load("fm.docs").await.unwrap().unwrap();
        assert_eq!(
            after.cluster_time,
            before.unwrap().cluster_time,
            "code {code}: the stored point did not move"
        );
        assert_eq!(
            case.verdict(0).lost,
            after_fault,
            "code {code}: the changes after the fault were not delivered"
        );
        case.sim.shutdown().await;
    }
}

/// `aggregate` fails at open (twice, so the driver's own retry fails too): the processor's
/// backoff recovers. Expected: at least one restart, 0 lost.
#[tokio::test]
async fn open_failure_is_recovered_by_the_processor_backoff() {
    if needs_sim("open_failure_is_recovered_by_the_processor_backoff") {
        return;
    }
    let mut case = Case::new().await;
    case.fail_point(doc! { "mode": { "times": 2 }, "data": { "failCommands": ["aggregate"], "closeConnection": true } }).await;
    let p = case.builder(Arc::new(MemoryStore::new())).build().unwrap();
    let task = run(&p, case.delivered.clone());
    wait_open(&p, &mut case).await;
    case.writer.changes(10).await;
    let v = case.settle(0).await;
    assert!(v.holds(), "{v}");
    assert!(p.stats().restarts >= 1, "{:?}", p.stats());
    p.stop();
    task.await.unwrap().unwrap();
    case.sim.shutdown().await;
}

/// History lost (286): the default policy stops with a typed error and never restarts from
/// now silently; the restart-from-now policy reports the gap's bounds.
#[tokio::test]
async fn history_lost_fails_by_default_and_reports_the_gap_when_asked() {
    if needs_sim("history_lost_fails_by_default_and_reports_the_gap_when_asked") {
        return;
    }
    let mut case = Case::new().await;
    let store = Arc::new(MemoryStore::new());
    let p = case.builder(store.clone()).build().unwrap();
    let task = run(&p, case.delivered.clone());
    wait_open(&p, &mut case).await;
    p.stop();
    task.await.unwrap().unwrap();
    let stored = store.load("fm.docs").await.unwrap().unwrap();
    case.writer.changes(30).await;
    case.sim.set_oplog_capacity(5);
    let p = case.builder(store.clone()).build().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), run(&p, case.delivered.clone()))
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::HistoryLost, "{err}");
    assert_eq!(p.stats().restarts, 0);
    assert_eq!(
        store.load("fm.docs").await.unwrap().unwrap(),
        stored,
        "nothing skipped silently"
    );
    let p = case
        .builder(store.clone())
        .source(
            case.watch()
                .history_lost_policy(HistoryLostPolicy::RestartFromNow),
        )
        .build()
        .unwrap();
    let task = run(&p, case.delivered.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while p.stats().last_gap.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no gap reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gap = p.stats().last_gap.unwrap();
    assert_eq!(gap.after, Some(stored.cluster_time));
    assert!(gap.resumed_at.unwrap() > stored.cluster_time);
    p.stop();
    task.await.unwrap().unwrap();
    case.sim.shutdown().await;
}

/// A required pre-image missing (47) recurs at every resume: the processor does not spin;
/// the policy decides (fail, or fall back to pre-images off and deliver everything).
#[tokio::test]
async fn missing_pre_images_do_not_spin() {
    if needs_sim("missing_pre_images_do_not_spin") {
        return;
    }
    let mut case = Case::new().await;
    let store = Arc::new(MemoryStore::new());
    let strict = case
        .builder(store.clone())
        .source(case.watch().before_change(BeforeChange::Required))
        .stream_id("strict")
        .build()
        .unwrap();
    let task = run(&strict, case.delivered.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    case.writer.changes(4).await;
    let err = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PreImageMissing, "{err}");
    assert_eq!(
        strict.stats().restarts,
        0,
        "no retry loop on a missing pre-image"
    );

    let lenient = case
        .builder(store)
        .source(
            case.watch()
                .before_change(BeforeChange::Required)
                .pre_image_policy(PreImagePolicy::FallBackToOff),
        )
        .stream_id("lenient")
        .build()
        .unwrap();
    let delivered = Deliveries::default();
    let task = run(&lenient, delivered.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mark = case.writer.written.lock().unwrap().len();
    case.writer.changes(6).await;
    let written: Vec<_> = case.writer.written.lock().unwrap()[mark..].to_vec();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = verify(&written, &delivered.log.lock().unwrap(), 0);
        if v.holds() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lenient.stop();
    task.await.unwrap().unwrap();
    case.sim.shutdown().await;
}

/// A handler that fails on the k-th event: after the restart that event is delivered again
/// and nothing is lost.
#[tokio::test]
async fn a_failing_handler_gets_the_event_again() {
    if needs_sim("a_failing_handler_gets_the_event_again") {
        return;
    }
    let mut case = Case::new().await;
    let p = case
        .builder(Arc::new(MemoryStore::new()))
        .checkpoint(CheckpointPolicy::every_event())
        .build()
        .unwrap();
    *case.delivered.fail_once_on.lock().unwrap() = Some(("7".into(), "v1".into()));
    let task = run(&p, case.delivered.clone());
    wait_open(&p, &mut case).await;
    case.writer.changes(12).await;
    let v = case.settle(1).await;
    assert!(v.holds(), "{v}");
    assert!(
        case.delivered
            .log
            .lock()
            .unwrap()
            .contains(&("7".into(), "v1".into()))
    );
    // Called again in process (the handler-error policy's retries), without a restart.
    assert_eq!(p.stats().restarts, 0);
    p.stop();
    task.await.unwrap().unwrap();
    case.sim.shutdown().await;
}

/// The store fails or stalls: the stored point never passes an unprocessed event, nothing
/// is lost when the store returns, and the unsaved work stays within the batch bound while
/// it is away.
async fn store_outage(
    case: &mut Case,
    store: Arc<dyn ResumeStore>,
    stream: &str,
    break_it: impl Fn(),
    heal: impl Fn(),
) {
    let bound = 20;
    let p = case
        .builder(store.clone())
        .stream_id(stream)
        .checkpoint(CheckpointPolicy::batched(bound, Duration::from_millis(200)).unwrap())
        .store_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let task = run(&p, case.delivered.clone());
    wait_open(&p, case).await;
    case.writer.changes(10).await;
    assert_eq!(case.settle(0).await.lost, 0);
    break_it();
    case.writer.changes(30).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // While the store is away, deliveries beyond the stored point stay within the bound.
    let delivered_while_down = case.delivered.log.lock().unwrap().len();
    heal();
    case.writer.changes(10).await;
    let v = case.settle(usize::MAX).await;
    assert_eq!(v.lost, 0, "{stream}: {v}");
    assert_eq!(v.out_of_order, 0, "{stream}: {v}");
    let restarts = p.stats().restarts as usize;
    assert!(
        v.duplicates <= bound as usize * (restarts + 1),
        "{stream}: {v} with {restarts} restarts"
    );
    let written_before_heal = 10 + 1 + 30;
    assert!(
        delivered_while_down <= written_before_heal * 2,
        "{stream}: memory bounded while down"
    );
    // The stored point never passes an unprocessed event: it is a delivered one.
    let point = store.load(stream).await.unwrap().unwrap();
    assert!(point.cluster_time <= p.stats().last_cluster_time.unwrap());
    p.stop();
    task.await.unwrap().unwrap();
}

/// Every case breaks the simulator on purpose: against `CDC_MONGODB_URI` it is skipped,
/// saying so.
fn needs_sim(test: &str) -> bool {
    let external = std::env::var("CDC_MONGODB_URI").is_ok_and(|u| !u.is_empty());
    if external {
        eprintln!("SKIPPED {test}: needs mongo-sim's fault controls (CDC_MONGODB_URI is set)");
    }
    external
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

#[tokio::test]
async fn redis_store_behind_a_faulty_proxy() {
    if needs_sim("redis_store_behind_a_faulty_proxy") {
        return;
    }
    let url = std::env::var("CDC_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let target: std::net::SocketAddr = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    store_behind_a_faulty_proxy("Redis", target, |addr| async move {
        let store = cdc_processor::stores::RedisStore::new(
            &format!("redis://{addr}"),
            format!("fm-{}:", std::process::id()),
        )
        .unwrap();
        Arc::new(store) as Arc<dyn ResumeStore>
    })
    .await;
}

#[tokio::test]
async fn postgres_store_behind_a_faulty_proxy() {
    if needs_sim("postgres_store_behind_a_faulty_proxy") {
        return;
    }
    let target: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    store_behind_a_faulty_proxy("PostgreSQL", target, |addr| async move {
        let url = format!("postgres://postgres@{addr}/test?connect_timeout=2");
        let table = format!("fm_points_{}", std::process::id());
        let store = cdc_processor::stores::PostgresStore::connect(&url, &table)
            .await
            .unwrap();
        Arc::new(store) as Arc<dyn ResumeStore>
    })
    .await;
}

/// A store reached through a TCP proxy that refuses, then stalls, its connections: the
/// store outage case for each mode. `connect` builds the store for the proxy's address.
async fn store_behind_a_faulty_proxy<F, Fut>(name: &str, target: std::net::SocketAddr, connect: F)
where
    F: Fn(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Arc<dyn ResumeStore>>,
{
    if tokio::net::TcpStream::connect(target).await.is_err() {
        assert!(!ci(), "{name} is unreachable under CI=true");
        eprintln!("SKIPPED: {name} unreachable at {target}");
        return;
    }
    for mode in [Mode::Refuse, Mode::Stall] {
        let proxy = Arc::new(FaultProxy::start(target).await.unwrap());
        let store = connect(proxy.addr()).await;
        let mut case = Case::new().await;
        let stream = format!("{name}-{mode:?}");
        let (p1, p2) = (Arc::clone(&proxy), Arc::clone(&proxy));
        store_outage(
            &mut case,
            store.clone(),
            &stream,
            move || {
                p1.set(mode);
                p1.cut();
            },
            move || p2.set(Mode::Pass),
        )
        .await;
        store.delete(&stream).await.unwrap();
        case.sim.shutdown().await;
    }
}

#[tokio::test]
async fn mongodb_store_blocked_by_block_connection() {
    if needs_sim("mongodb_store_blocked_by_block_connection") {
        return;
    }
    let mut case = Case::new().await;
    let store_sim = MongoSim::start().await.unwrap();
    let store_client = Client::with_uri_str(store_sim.uri()).await.unwrap();
    let store = Arc::new(cdc_processor::stores::MongoStore::new(
        &store_client,
        "local",
        "points",
    ));
    let admin = store_client.database("admin");
    let (a1, a2) = (admin.clone(), admin.clone());
    let block = move || {
        let a = a1.clone();
        tokio::spawn(async move {
            a.run_command(doc! { "configureFailPoint": "failCommand", "mode": "alwaysOn", "data": { "failCommands": ["update", "find"], "blockConnection": true, "blockTimeMS": 2000 } })
                .await
                .unwrap();
        });
    };
    let unblock = move || {
        let a = a2.clone();
        tokio::spawn(async move {
            a.run_command(doc! { "configureFailPoint": "failCommand", "mode": "off" })
                .await
                .unwrap();
        });
    };
    store_outage(&mut case, store, "mongo-blocked", block, unblock).await;
    store_sim.shutdown().await;
    case.sim.shutdown().await;
}

#[tokio::test]
async fn file_store_made_unwritable() {
    if needs_sim("file_store_made_unwritable") {
        return;
    }
    let mut case = Case::new().await;
    let dir = std::env::temp_dir().join(format!("fm-file-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Arc::new(cdc_processor::stores::FileStore::new(&dir).unwrap());
    // Root ignores permission bits, so "read-only" is made by swapping the directory for a
    // regular file while the store is away, and back again.
    let aside = dir.with_extension("aside");
    let (d1, d2, s1, s2) = (dir.clone(), dir.clone(), aside.clone(), aside.clone());
    store_outage(
        &mut case,
        store,
        "file-unwritable",
        move || {
            std::fs::rename(&d1, &s1).unwrap();
            std::fs::write(&d1, b"not a directory").unwrap();
        },
        move || {
            std::fs::remove_file(&d2).unwrap();
            std::fs::rename(&s2, &d2).unwrap();
        },
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    case.sim.shutdown().await;
}
