//! One active instance per stream: processors on one stream id with a leased store hand
//! the stream over (a standby takes it when the holder stops, at once, or when it dies,
//! after the TTL), never handle it at the same time, and lose nothing; a holder whose
//! renewals stop answering (a paused process) stops handling before its successor
//! starts, and the stored point never moves backwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bson::doc;
use cdc_core::{DeadLetter, DeadLetterStore, Lease, LeaseStore, ResumePoint, ResumeStore};
use cdc_processor::{BoxError, ChangeEvent, CheckpointPolicy, DocumentProcessor, FnDispatcher};
use mongo_sim::TestDeployment;

const TTL: Duration = Duration::from_millis(600);

/// `(owner, _id, when)` of every event handled, in order.
type Log = Arc<Mutex<Vec<(String, i64, Instant)>>>;

fn recorder(
    owner: &str,
    log: &Log,
) -> FnDispatcher<impl Fn(&ChangeEvent, Option<BoxError>) -> Result<(), BoxError> + use<>> {
    let (owner, log) = (owner.to_owned(), Arc::clone(log));
    FnDispatcher(move |e: &ChangeEvent, _| {
        // The handler sees the lease its run holds (a sink fences its own writes with it).
        let ctx = cdc_processor::HandlerContext::current().ok_or("no handler context")?;
        if ctx.lease().is_none_or(|l| l.owner != owner) {
            return Err(format!("the handler of {owner} sees the lease {:?}", ctx.lease()).into());
        }
        if let Some(id) = e.document_id().and_then(|b| b.as_i64()) {
            log.lock()
                .unwrap()
                .push((owner.clone(), id, Instant::now()));
        }
        Ok(())
    })
}

/// Waits until every id of `written` was handled by someone.
async fn all_handled(log: &Log, written: &[i64]) {
    let (seen, all) = (Arc::clone(log), written.to_vec());
    until("every write handled", move || {
        let got: BTreeSet<i64> = seen.lock().unwrap().iter().map(|(_, id, _)| *id).collect();
        all.iter().all(|id| got.contains(id))
    })
    .await;
}

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

/// A memory store whose lease renewals can be frozen (as if its process were paused at
/// that moment), recording every point saved.
#[derive(Default)]
struct Pausable {
    inner: cdc_processor::stores::MemoryStore,
    frozen: AtomicBool,
    /// Saves and renewals are refused as if a newer holder existed.
    fence_saves: AtomicBool,
    saved: Mutex<Vec<ResumePoint>>,
}

#[async_trait]
impl ResumeStore for Pausable {
    async fn load(&self, s: &str) -> cdc_core::Result<Option<ResumePoint>> {
        self.inner.load(s).await
    }
    async fn save(&self, s: &str, p: &ResumePoint) -> cdc_core::Result<()> {
        self.inner.save(s, p).await
    }
    async fn delete(&self, s: &str) -> cdc_core::Result<()> {
        ResumeStore::delete(&self.inner, s).await
    }
    async fn list_streams(&self) -> cdc_core::Result<Vec<String>> {
        self.inner.list_streams().await
    }
    fn describe(&self) -> String {
        "pausable memory".into()
    }
}

#[async_trait]
impl DeadLetterStore for Pausable {
    async fn record(&self, l: &DeadLetter) -> cdc_core::Result<()> {
        self.inner.record(l).await
    }
    async fn list(&self, s: &str, n: usize) -> cdc_core::Result<Vec<DeadLetter>> {
        self.inner.list(s, n).await
    }
    async fn count(&self, s: &str) -> cdc_core::Result<u64> {
        self.inner.count(s).await
    }
    async fn remove(&self, s: &str, id: &str) -> cdc_core::Result<bool> {
        self.inner.remove(s, id).await
    }
    fn describe(&self) -> String {
        "pausable memory".into()
    }
}

#[async_trait]
impl LeaseStore for Pausable {
    async fn acquire(&self, s: &str, o: &str, ttl: Duration) -> cdc_core::Result<Option<Lease>> {
        self.inner.acquire(s, o, ttl).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> cdc_core::Result<Lease> {
        if self.fence_saves.load(Ordering::SeqCst) {
            return Err(cdc_core::Error::Fenced {
                stream: lease.stream.clone(),
                token: lease.token,
                newest: Some(lease.token + 1),
            });
        }
        while self.frozen.load(Ordering::SeqCst) && lease.owner == "a" {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.inner.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> cdc_core::Result<()> {
        self.inner.release(lease).await
    }
    async fn holder(&self, s: &str) -> cdc_core::Result<Option<Lease>> {
        self.inner.holder(s).await
    }
    async fn leases(&self, prefix: &str) -> cdc_core::Result<Vec<Lease>> {
        self.inner.leases(prefix).await
    }
    async fn save_fenced(&self, lease: &Lease, p: &ResumePoint) -> cdc_core::Result<()> {
        if self.fence_saves.load(Ordering::SeqCst) {
            return Err(cdc_core::Error::Fenced {
                stream: lease.stream.clone(),
                token: lease.token,
                newest: Some(lease.token + 1),
            });
        }
        self.inner.save_fenced(lease, p).await?;
        self.saved.lock().unwrap().push(p.clone());
        Ok(())
    }
    async fn record_fenced(&self, lease: &Lease, l: &DeadLetter) -> cdc_core::Result<()> {
        self.inner.record_fenced(lease, l).await
    }
    fn describe(&self) -> String {
        "pausable memory".into()
    }
}

struct Env {
    deployment: TestDeployment,
    client: mongodb::Client,
    store: Arc<Pausable>,
    next: std::sync::atomic::AtomicI64,
}

impl Env {
    async fn new() -> Self {
        let deployment = TestDeployment::start().await.unwrap();
        let client = mongodb::Client::with_uri_str(deployment.uri())
            .await
            .unwrap();
        client.database("leased").drop().await.unwrap();
        Self {
            deployment,
            client,
            store: Arc::default(),
            next: 0.into(),
        }
    }

    fn processor(&self, owner: &str) -> DocumentProcessor {
        DocumentProcessor::builder()
            .source(cdc_processor::Watch::collection(
                self.client.clone(),
                "leased",
                "items",
            ))
            .stream_id("leased-items")
            .store(cdc_processor::Storage::leased(Arc::clone(&self.store), TTL).owner(owner))
            .checkpoint(CheckpointPolicy::every_event())
            .build()
            .unwrap()
    }

    fn run(
        &self,
        p: &DocumentProcessor,
        owner: &str,
        log: &Log,
    ) -> tokio::task::JoinHandle<cdc_processor::Result<()>> {
        let (p, handler) = (p.clone(), recorder(owner, log));
        tokio::spawn(async move {
            p.start_with_retry(cdc_processor::default_backoff(), handler)
                .await
        })
    }

    /// Inserts `n` documents; their ids.
    async fn write(&self, n: i64) -> Vec<i64> {
        let coll = self
            .client
            .database("leased")
            .collection::<bson::Document>("items");
        let mut ids = Vec::new();
        for _ in 0..n {
            let id = self.next.fetch_add(1, Ordering::SeqCst);
            coll.insert_one(doc! { "_id": id }).await.unwrap();
            ids.push(id);
        }
        ids
    }
}

/// No two owners' handling overlaps: once an owner's events stop, they never resume
/// after another's began (per hand-over, given in order).
fn handed_over_in_order(log: &[(String, i64, Instant)], owners: &[&str]) {
    let first = |o: &str| log.iter().position(|(w, ..)| w == o);
    let last = |o: &str| log.iter().rposition(|(w, ..)| w == o);
    for pair in owners.windows(2) {
        if let (Some(end), Some(start)) = (last(pair[0]), first(pair[1])) {
            assert!(
                end < start,
                "{} handled after {} began: {log:?}",
                pair[0],
                pair[1]
            );
        }
    }
}

#[tokio::test]
async fn one_instance_handles_the_stream_and_standbys_take_over() {
    let env = Env::new().await;
    let log: Log = Arc::default();
    let (a, b) = (env.processor("a"), env.processor("b"));
    let task_a = env.run(&a, "a", &log);
    let held = a.clone();
    until("a to hold the lease", move || {
        held.stats().lease_token.is_some()
    })
    .await;
    let task_b = env.run(&b, "b", &log);
    let waiting = b.clone();
    until("b to stand by", move || waiting.stats().standby).await;
    let mut written = env.write(30).await;
    let seen = Arc::clone(&log);
    until("a to handle them", move || seen.lock().unwrap().len() >= 30).await;
    assert!(
        log.lock().unwrap().iter().all(|(o, ..)| o == "a"),
        "only the holder handles"
    );
    assert_eq!(b.stats().events, 0);

    // A stop releases the lease: the standby takes over at once, not after the TTL.
    a.stop();
    let stopped = Instant::now();
    task_a.await.unwrap().unwrap();
    let taken = b.clone();
    until("b to take the lease", move || {
        taken.stats().lease_token.is_some()
    })
    .await;
    assert!(
        stopped.elapsed() < TTL,
        "taken over in {:?}",
        stopped.elapsed()
    );
    assert!(b.stats().lease_token > Some(1), "a greater token");
    written.extend(env.write(30).await);

    // A holder that dies without releasing (its task dropped, as by kill -9): a new
    // instance takes over once the TTL has passed, and nothing is lost.
    let seen = Arc::clone(&log);
    until("b to handle its share", move || {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(o, ..)| o == "b")
            .count()
            >= 30
    })
    .await;
    task_b.abort();
    let _ = task_b.await;
    written.extend(env.write(30).await);
    let c = env.processor("c");
    let task_c = env.run(&c, "c", &log);
    all_handled(&log, &written).await;
    c.stop();
    task_c.await.unwrap().unwrap();
    let log = log.lock().unwrap().clone();
    handed_over_in_order(&log, &["a", "b", "c"]);
    // The stored point only moved forward.
    let saved = env.store.saved.lock().unwrap().clone();
    assert!(
        saved
            .windows(2)
            .all(|w| w[0].cluster_time <= w[1].cluster_time)
    );
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn a_holder_whose_renewals_stall_stops_before_its_successor_starts() {
    let env = Env::new().await;
    let log: Log = Arc::default();
    let (a, b) = (env.processor("a"), env.processor("b"));
    let task_a = env.run(&a, "a", &log);
    let held = a.clone();
    until("a to hold the lease", move || {
        held.stats().lease_token.is_some()
    })
    .await;
    let task_b = env.run(&b, "b", &log);
    let mut written = env.write(20).await;
    let seen = Arc::clone(&log);
    until("a to handle them", move || seen.lock().unwrap().len() >= 20).await;

    // A's renewals stall (its process paused at that moment): its lease expires, B takes
    // it, and A has stopped handling by then.
    env.store.frozen.store(true, Ordering::SeqCst);
    let taken = b.clone();
    until("b to take the lease", move || {
        taken.stats().lease_token.is_some()
    })
    .await;
    written.extend(env.write(20).await);
    all_handled(&log, &written).await;
    // A resumes: it stands by (its old lease is fenced off), never handling again.
    env.store.frozen.store(false, Ordering::SeqCst);
    written.extend(env.write(10).await);
    all_handled(&log, &written).await;
    tokio::time::sleep(TTL).await;
    assert!(a.stats().standby, "a stands by again: {:?}", a.stats());
    assert!(
        a.stats()
            .last_error
            .is_some_and(|e| e.contains("no longer held"))
    );
    let log_now = log.lock().unwrap().clone();
    handed_over_in_order(&log_now, &["a", "b"]);
    let saved = env.store.saved.lock().unwrap().clone();
    assert!(
        saved
            .windows(2)
            .all(|w| w[0].cluster_time <= w[1].cluster_time)
    );
    a.stop();
    b.stop();
    task_a.await.unwrap().unwrap();
    task_b.await.unwrap().unwrap();
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn a_leased_store_takes_the_dead_letters_too() {
    let env = Env::new().await;
    // A separate dead-letter store next to a leased one cannot be written (`Leased` has
    // no `dead_letters`: a compile_fail doctest of `Storage::leased`); the leased store
    // is the dead-letter store.
    let p = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            env.client.clone(),
            "leased",
            "items",
        ))
        .store(cdc_processor::Storage::leased(Arc::clone(&env.store), TTL))
        .build()
        .unwrap();
    assert_eq!(p.dead_letter_count().await.unwrap(), 0);
    let err = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            env.client.clone(),
            "leased",
            "items",
        ))
        .store(cdc_processor::Storage::leased(
            Arc::clone(&env.store),
            Duration::from_millis(5),
        ))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("too short"), "{err}");
    assert!(
        matches!(
            err,
            cdc_processor::Error::Build(cdc_processor::BuildError::Invalid {
                setting: "store",
                ..
            })
        ),
        "{err:?}"
    );
    env.deployment.shutdown().await;
}

/// A lease taken over (renewals and saves refused) with lanes: the handlers still in
/// flight are cancelled at once, not waited for, and the instance stands by.
#[tokio::test]
async fn a_lost_lease_cancels_the_handlers_in_flight() {
    let env = Env::new().await;
    let finished = Arc::new(AtomicBool::new(false));
    let p = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            env.client.clone(),
            "leased",
            "items",
        ))
        .stream_id("leased-items")
        .store(cdc_processor::Storage::leased(Arc::clone(&env.store), TTL).owner("a"))
        .concurrency(4)
        .checkpoint(CheckpointPolicy::every_event())
        .build()
        .unwrap();
    let slow = Arc::clone(&finished);
    struct Slow(Arc<AtomicBool>);
    #[async_trait]
    impl cdc_core::Dispatcher for Slow {
        async fn dispatch(&self, e: &ChangeEvent, _: Option<BoxError>) -> Result<(), BoxError> {
            if e.document_id().and_then(|b| b.as_i64()) == Some(0) {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                self.0.store(true, Ordering::SeqCst);
            }
            Ok(())
        }
    }
    let task = {
        let p = p.clone();
        tokio::spawn(async move {
            p.start_with_retry(cdc_processor::default_backoff(), Slow(slow))
                .await
        })
    };
    let held = p.clone();
    until("a to hold the lease and open its stream", move || {
        held.stats().lease_token.is_some() && held.stats().checkpoints >= 1
    })
    .await;
    // Document 0 is being handled (for 1.5 s) when the lease is taken over.
    env.write(1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    env.store.fence_saves.store(true, Ordering::SeqCst);
    env.write(5).await;
    let stood = p.clone();
    until("a to stand by", move || stood.stats().lease_token.is_none()).await;
    // Past the time the handler would have taken: it never finished.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !finished.load(Ordering::SeqCst),
        "the slow handler was cancelled"
    );
    assert!(
        p.stats()
            .last_error
            .is_some_and(|e| e.contains("no longer held"))
    );
    p.stop();
    task.await.unwrap().unwrap();
    env.deployment.shutdown().await;
}
