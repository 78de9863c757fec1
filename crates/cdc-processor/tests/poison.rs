//! Poison events end to end, through the real driver against mongo-sim: each
//! handler-error policy (stop, skip, dead letter), with and without lanes, parked keys,
//! batch handlers, panics, replay, and a dead-letter store that fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use bson::{Document, doc};
use cdc_core::{DeadLetterStore, ErrorKind, ResumeStore};
use cdc_processor::{
    Batch, BatchDispatcher, BoxError, ChangeEvent, Dispatcher, DocumentProcessor, Error,
    HandlerContext, HandlerErrorPolicy,
    stores::{FileStore, MemoryStore},
};
use mongo_sim::TestDeployment;
use mongodb::{Client, Collection};

/// Records `(key, n)` of every event handled; fails on keys in `poison` (or panics, for
/// keys in `panic_on`), counting calls per key.
#[derive(Clone, Default)]
struct Handler {
    seen: Arc<Mutex<Vec<(i32, i32)>>>,
    calls: Arc<Mutex<BTreeMap<(i32, i32), u32>>>,
    poison: Arc<Mutex<Vec<(i32, i32)>>>,
    panic_on: Arc<Mutex<Vec<(i32, i32)>>>,
    /// For each call: the lane it ran on.
    lanes: Arc<Mutex<Vec<Option<usize>>>>,
}

fn key_of(event: &ChangeEvent) -> (i32, i32) {
    let doc = event.full_document_parsed().unwrap().unwrap_or_default();
    (
        doc.get_i32("k").unwrap_or(-1),
        doc.get_i32("n").unwrap_or(-1),
    )
}

impl Handler {
    fn seen(&self) -> Vec<(i32, i32)> {
        self.seen.lock().unwrap().clone()
    }
    fn seen_of(&self, k: i32) -> Vec<i32> {
        self.seen()
            .into_iter()
            .filter(|(key, _)| *key == k)
            .map(|(_, n)| n)
            .collect()
    }
    fn calls(&self, key: (i32, i32)) -> u32 {
        self.calls.lock().unwrap().get(&key).copied().unwrap_or(0)
    }
    fn poison(&self, keys: &[(i32, i32)]) {
        *self.poison.lock().unwrap() = keys.to_vec();
    }
    fn handle(&self, event: &ChangeEvent) -> Result<(), BoxError> {
        let key = key_of(event);
        *self.calls.lock().unwrap().entry(key).or_default() += 1;
        self.lanes
            .lock()
            .unwrap()
            .push(HandlerContext::current().and_then(|c| c.lane()));
        assert!(
            !self.panic_on.lock().unwrap().contains(&key),
            "cannot take {key:?}"
        );
        if self.poison.lock().unwrap().contains(&key) {
            return Err(format!("refusing {key:?}").into());
        }
        self.seen.lock().unwrap().push(key);
        Ok(())
    }
}

#[async_trait]
impl Dispatcher for Handler {
    async fn dispatch(&self, event: &ChangeEvent, _: Option<BoxError>) -> Result<(), BoxError> {
        self.handle(event)
    }
}

/// The same, as a batch handler: a batch holding a poisoned event fails whole.
#[derive(Clone, Default)]
struct Batches(Handler);

#[async_trait]
impl BatchDispatcher for Batches {
    async fn dispatch_batch(&self, batch: &Batch<'_>, _: &HandlerContext) -> Result<(), BoxError> {
        let poisoned = self.0.poison.lock().unwrap().clone();
        if let Some(bad) = batch
            .events()
            .iter()
            .map(|e| key_of(e))
            .find(|k| poisoned.contains(k))
        {
            for e in batch.events() {
                *self.0.calls.lock().unwrap().entry(key_of(e)).or_default() += 1;
            }
            return Err(format!("the batch holds {bad:?}").into());
        }
        for e in batch.events() {
            self.0.handle(e)?;
        }
        Ok(())
    }
}

struct Env {
    deployment: TestDeployment,
    client: Client,
    points: Arc<MemoryStore>,
    letters: Arc<MemoryStore>,
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
            points: Arc::new(MemoryStore::new()),
            letters: Arc::new(MemoryStore::new()),
            db: db.to_owned(),
        }
    }

    fn coll(&self) -> Collection<Document> {
        self.client.database(&self.db).collection("items")
    }

    fn builder(&self, policy: HandlerErrorPolicy) -> cdc_processor::Builder {
        DocumentProcessor::builder()
            .source(cdc_processor::Watch::collection(
                self.client.clone(),
                self.db.clone(),
                "items",
            ))
            .store(
                cdc_processor::Storage::new(self.points.clone()).dead_letters(self.letters.clone()),
            )
            .on_handler_error(policy.backoff(Duration::from_millis(2), Duration::from_millis(2)))
    }

    /// Writes event `n` of key `k` (an insert for n = 0, an update after).
    async fn write(&self, k: i32, n: i32) {
        if n == 0 {
            self.coll()
                .insert_one(doc! { "_id": k, "k": k, "n": n })
                .await
                .unwrap();
        } else {
            self.coll()
                .replace_one(doc! { "_id": k }, doc! { "k": k, "n": n })
                .await
                .unwrap();
        }
    }
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

fn spawn(p: &DocumentProcessor, h: &Handler) -> tokio::task::JoinHandle<cdc_processor::Result<()>> {
    let (p, h) = (p.clone(), h.clone());
    tokio::spawn(async move { p.start(h).await })
}

async fn opened(p: &DocumentProcessor) {
    until("the stream to open", || p.stats().checkpoints >= 1).await;
}

/// Keys 1..=3, events 0..3 each, written key by key in rounds; key 2's event 1 is poison.
async fn write_rounds(env: &Env) {
    for n in 0..3 {
        for k in 1..=3 {
            env.write(k, n).await;
        }
    }
}

#[tokio::test]
async fn stop_is_the_default_and_keeps_the_point_before_the_poison() {
    let env = Env::new("poison_stop").await;
    let h = Handler::default();
    h.poison(&[(2, 1)]);
    let p = env
        .builder(HandlerErrorPolicy::stop().retries(2))
        .build()
        .unwrap();
    let task = spawn(&p, &h);
    opened(&p).await;
    write_rounds(&env).await;
    let err = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Handler, "{err}");
    assert_eq!(h.calls((2, 1)), 3, "one call and two retries");
    assert!(err.to_string().contains("refusing (2, 1)"), "{err}");
    // Nothing after the poison was handled, and the point stays before it.
    assert_eq!(h.seen(), [(1, 0), (2, 0), (3, 0), (1, 1)]);
    let stored = env
        .points
        .load(&format!("{}.items", env.db))
        .await
        .unwrap()
        .unwrap();
    let again = env
        .builder(HandlerErrorPolicy::stop().retries(0))
        .build()
        .unwrap();
    let h2 = Handler::default();
    h2.poison(&[(2, 1)]);
    let task = spawn(&again, &h2);
    until("the next run to reach the poison", || h2.calls((2, 1)) >= 1).await;
    // `start` fails again on the same event: the poison was not skipped silently.
    assert!(task.await.unwrap().is_err());
    assert!(h2.seen().is_empty(), "{:?} (stored {stored:?})", h2.seen());
    assert_eq!(p.stats().skipped_events + p.stats().dead_letters, 0);
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn skip_moves_on_and_counts() {
    let env = Env::new("poison_skip").await;
    let h = Handler::default();
    h.poison(&[(2, 1)]);
    let p = env
        .builder(HandlerErrorPolicy::skip().retries(1))
        .build()
        .unwrap();
    let task = spawn(&p, &h);
    opened(&p).await;
    write_rounds(&env).await;
    until("every other event", || h.seen().len() >= 8).await;
    p.stop();
    task.await.unwrap().unwrap();
    assert_eq!(h.seen_of(2), [0, 2]);
    assert_eq!(h.calls((2, 1)), 2);
    assert_eq!(p.stats().skipped_events, 1);
    assert_eq!(env.letters.count(p.stream_id()).await.unwrap(), 0);
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn dead_letters_keep_the_exact_event_and_replay_through_the_handler() {
    let env = Env::new("poison_dead_letter").await;
    let h = Handler::default();
    h.poison(&[(2, 1)]);
    let p = env
        .builder(HandlerErrorPolicy::dead_letter().retries(2))
        .build()
        .unwrap();
    let raw_events = Arc::new(Mutex::new(Vec::new()));
    let seen_raw = Arc::clone(&raw_events);
    let h2 = h.clone();
    let p2 = p.clone();
    let task = tokio::spawn(async move {
        p2.start(cdc_processor::FnDispatcher(
            move |e: &ChangeEvent, _: Option<BoxError>| {
                seen_raw
                    .lock()
                    .unwrap()
                    .push(e.raw().unwrap().as_bytes().to_vec());
                h2.handle(e)
            },
        ))
        .await
    });
    opened(&p).await;
    write_rounds(&env).await;
    until("every other event", || h.seen().len() >= 8).await;
    until("the letter", || p.stats().dead_letters >= 1).await;
    p.stop();
    task.await.unwrap().unwrap();
    assert_eq!(
        h.seen_of(2),
        [0, 2],
        "the key's later event was not held back"
    );

    let letters = p.dead_letters(10).await.unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.attempts, 3);
    assert!(!letter.parked);
    assert_eq!(letter.stream, p.stream_id());
    assert!(
        letter.errors[0].contains("refusing (2, 1)"),
        "{:?}",
        letter.errors
    );
    // The exact bytes the handler was given.
    assert!(raw_events.lock().unwrap().contains(&letter.event));
    assert_eq!(key_of(&letter.decode().unwrap()), (2, 1));
    assert_eq!(p.dead_letter_count().await.unwrap(), 1);

    // Replay through a fixed handler on a new processor over the same stores.
    let fixed = Handler::default();
    let replayer = env
        .builder(HandlerErrorPolicy::dead_letter())
        .build()
        .unwrap();
    let report = replayer.replay_dead_letters(fixed.clone()).await.unwrap();
    assert_eq!((report.replayed, report.failed, report.held), (1, 0, 0));
    assert_eq!(fixed.seen(), [(2, 1)]);
    assert_eq!(replayer.dead_letter_count().await.unwrap(), 0);
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn with_lanes_only_the_poisoned_key_waits() {
    let env = Env::new("poison_lanes").await;
    let h = Handler::default();
    h.poison(&[(2, 1)]);
    // Retried for a long time: the other keys' lanes must not wait for it.
    let p = env
        .builder(
            HandlerErrorPolicy::dead_letter()
                .retries(200)
                .backoff(Duration::from_millis(20), Duration::from_millis(20)),
        )
        .concurrency(8)
        .build()
        .unwrap();
    let task = spawn(&p, &h);
    opened(&p).await;
    write_rounds(&env).await;
    until("keys 1 and 3", || {
        h.seen_of(1).len() == 3 && h.seen_of(3).len() == 3
    })
    .await;
    assert_eq!(h.seen_of(2), [0], "key 2 waits behind its poisoned event");
    assert!(h.calls((2, 1)) < 200, "still retrying");
    h.poison(&[]);
    until("key 2", || h.seen_of(2).len() == 3).await;
    p.stop();
    task.await.unwrap().unwrap();
    assert_eq!(h.seen_of(2), [0, 1, 2]);
    assert_eq!(p.stats().dead_letters, 0);
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn parked_keys_follow_their_dead_letter_and_replay_in_order() {
    let env = Env::new("poison_park").await;
    for lanes in [1, 4] {
        let points = Arc::new(MemoryStore::new());
        let letters = Arc::new(MemoryStore::new());
        let h = Handler::default();
        h.poison(&[(2, 1)]);
        let builder = |h: &Handler| {
            let _ = h;
            DocumentProcessor::builder()
                .source(cdc_processor::Watch::collection(
                    env.client.clone(),
                    env.db.clone(),
                    "items",
                ))
                .store(cdc_processor::Storage::new(points.clone()).dead_letters(letters.clone()))
                .concurrency(lanes)
                .on_handler_error(HandlerErrorPolicy::dead_letter().retries(0).park_keys(true))
        };
        let p = builder(&h).build().unwrap();
        let task = spawn(&p, &h);
        opened(&p).await;
        env.coll().delete_many(doc! {}).await.unwrap();
        write_rounds(&env).await;
        until("keys 1 and 3", || {
            h.seen_of(1).len() == 3 && h.seen_of(3).len() == 3
        })
        .await;
        until("the parked event", || p.stats().dead_letters >= 2).await;
        p.stop();
        task.await.unwrap().unwrap();
        assert_eq!(h.seen_of(2), [0], "lanes {lanes}");
        assert_eq!(
            h.calls((2, 2)),
            0,
            "a parked event is not handed to the handler"
        );
        let listed = p.dead_letters(10).await.unwrap();
        let parked: Vec<bool> = listed.iter().map(|l| l.parked).collect();
        assert_eq!(parked, [false, true], "lanes {lanes}");

        // Parked keys survive a restart: read back from the store.
        // (It resumes from the stored point: what is written now is read whenever it opens.)
        let p = builder(&h).build().unwrap();
        let task = spawn(&p, &h);
        env.write(2, 3).await;
        env.write(1, 3).await;
        until("key 1's new event", || h.seen_of(1).len() == 4).await;
        until("the parked event", || p.stats().dead_letters >= 1).await;
        p.stop();
        task.await.unwrap().unwrap();
        assert_eq!(
            h.calls((2, 3)),
            0,
            "lanes {lanes}: still parked after a restart"
        );

        // A replay that fails on the first letter of the key holds the later ones.
        let report = p.replay_dead_letters(h.clone()).await.unwrap();
        assert_eq!((report.replayed, report.failed, report.held), (0, 1, 2));
        // Fixed: replayed in the key's order, and the key is released.
        h.poison(&[]);
        let report = p.replay_dead_letters(h.clone()).await.unwrap();
        assert_eq!((report.replayed, report.failed, report.held), (3, 0, 0));
        assert_eq!(h.seen_of(2), [0, 1, 2, 3], "lanes {lanes}");
        let task = spawn(&builder(&h).build().unwrap(), &h);
        env.write(2, 4).await;
        until("key 2 flows again", || h.seen_of(2).len() == 5).await;
        task.abort();
    }
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn a_batch_that_keeps_failing_is_split_and_only_the_poison_dead_lettered() {
    let env = Env::new("poison_batch").await;
    let h = Batches::default();
    h.0.poison(&[(2, 1)]);
    let p = env
        .builder(HandlerErrorPolicy::dead_letter().retries(1))
        .build()
        .unwrap();
    let (p2, h2) = (p.clone(), h.clone());
    let task = tokio::spawn(async move {
        p2.start(
            cdc_processor::Batches::new(h2)
                .max_events(50)
                .max_wait(Duration::from_millis(300)),
        )
        .await
    });
    opened(&p).await;
    write_rounds(&env).await;
    until("every other event", || h.0.seen().len() >= 8).await;
    p.stop();
    task.await.unwrap().unwrap();
    let letters = p.dead_letters(10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(key_of(&letters[0].decode().unwrap()), (2, 1));
    assert!(
        letters[0].errors[0].contains("the batch holds (2, 1)"),
        "{:?}",
        letters[0].errors
    );
    assert_eq!(h.0.seen_of(2), [0, 2]);
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn a_panicking_handler_is_a_dead_letter_with_the_panic_message() {
    let env = Env::new("poison_panic").await;
    let h = Handler::default();
    h.panic_on.lock().unwrap().push((3, 0));
    let p = env
        .builder(HandlerErrorPolicy::dead_letter().retries(1))
        .concurrency(4)
        .build()
        .unwrap();
    let task = spawn(&p, &h);
    opened(&p).await;
    write_rounds(&env).await;
    until("every other event", || h.seen().len() >= 8).await;
    until("the letter", || p.stats().dead_letters >= 1).await;
    p.stop();
    task.await.unwrap().unwrap();
    let letters = p.dead_letters(10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].errors[0].contains("the handler panicked: cannot take (3, 0)"),
        "{:?}",
        letters[0].errors
    );
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn a_dead_letter_store_that_fails_does_not_let_the_stream_move_past_the_event() {
    let env = Env::new("poison_store_fails").await;
    let root = std::env::temp_dir().join(format!("cdc-dl-fail-{}", std::process::id()));
    let broken = FileStore::new(&root).unwrap();
    std::fs::remove_dir(&root).unwrap();
    std::fs::write(&root, b"not a directory").unwrap();
    let h = Handler::default();
    h.poison(&[(2, 0)]);
    let p = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            env.client.clone(),
            env.db.clone(),
            "items",
        ))
        .store(cdc_processor::Storage::new(env.points.clone()).dead_letters(Arc::new(broken)))
        .on_handler_error(HandlerErrorPolicy::dead_letter().retries(0))
        .build()
        .unwrap();
    let task = spawn(&p, &h);
    opened(&p).await;
    for k in 1..=3 {
        env.write(k, 0).await;
    }
    let err = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    // A file where the store's directory belongs: the run ends (StoreUnusable, retried
    // a bounded number of times by start_with_retry, not forever); what matters here is
    // that the stream did not move past the event.
    assert_eq!(err.kind(), ErrorKind::Persistent, "{err}");
    assert!(
        matches!(
            &err,
            cdc_processor::Error::Cdc(cdc_core::Error::StoreUnusable { .. })
        ),
        "{err:?}"
    );
    assert_eq!(h.seen(), [(1, 0)]);
    // The stored point is not past the poisoned event: a new run sees it again.
    let h2 = Handler::default();
    let again = env
        .builder(HandlerErrorPolicy::skip().retries(0))
        .build()
        .unwrap();
    let task = spawn(&again, &h2);
    until("the events after", || h2.seen().len() >= 2).await;
    again.stop();
    task.await.unwrap().unwrap();
    assert_eq!(h2.calls((2, 0)), 1, "delivered again");
    let _ = std::fs::remove_file(&root);
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn a_dead_letter_policy_needs_a_store_and_the_api_says_so() {
    let env = Env::new("poison_config").await;
    let err = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            env.client.clone(),
            env.db.clone(),
            "items",
        ))
        .store(env.points.clone())
        .on_handler_error(HandlerErrorPolicy::dead_letter())
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::Build(_)), "{err}");
    assert!(err.to_string().contains(".dead_letters("), "{err}");
    let p = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            env.client.clone(),
            env.db.clone(),
            "items",
        ))
        .store(env.points.clone())
        .build()
        .unwrap();
    let err = p.dead_letter_count().await.unwrap_err();
    assert!(err.to_string().contains("no dead-letter store"), "{err}");
    env.deployment.shutdown().await;
}

/// A handler that panics under `start_with_retry` ends it with a handler error carrying
/// the panic message, and leaves the processor able to start again (not "already
/// running").
#[tokio::test]
async fn a_panic_under_start_with_retry_is_an_error_and_the_processor_starts_again() {
    let env = Env::new("poison_panic_retry").await;
    let h = Handler::default();
    h.panic_on.lock().unwrap().push((1, 0));
    let p = env
        .builder(HandlerErrorPolicy::stop().retries(1))
        .build()
        .unwrap();
    let (p2, h2) = (p.clone(), h.clone());
    let task = tokio::spawn(async move {
        p2.start_with_retry(cdc_processor::default_backoff(), h2)
            .await
    });
    opened(&p).await;
    env.write(1, 0).await;
    let err = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Handler);
    assert!(
        err.to_string()
            .contains("the handler panicked: cannot take (1, 0)"),
        "{err}"
    );
    h.panic_on.lock().unwrap().clear();
    let task = spawn(&p, &h);
    until("the event, handled on the next start", || {
        h.seen() == [(1, 0)]
    })
    .await;
    p.stop();
    task.await.unwrap().unwrap();
    env.deployment.shutdown().await;
}
