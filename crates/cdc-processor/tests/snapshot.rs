//! Snapshots end to end, through the driver against mongo-sim: the existing documents
//! first, then the stream with no gap, so a replica built from the events equals the
//! collection; a snapshot stopped midway continues where it stopped; initial-only stops
//! after the scan and a later start streams from before it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bson::{Bson, Document, doc};
use cdc_processor::{
    BoxError, ChangeEvent, CheckpointPolicy, Dispatcher, DocumentProcessor, FnDispatcher,
    FullDocument, OperationType, SnapshotMode, stores::MemoryStore,
};
use mongo_sim::TestDeployment;
use mongodb::{Client, Collection};

type Log = Arc<Mutex<Vec<(OperationType, i64, Option<Document>, Option<i64>)>>>;

/// Records `(operation, _id, full document, version)` of every event, in delivery order.
/// The version `v` is the event's own: a snapshot's or an insert's document, an update's
/// `updatedFields` (a looked-up full document may be newer than its update).
fn recorder(
    log: &Log,
) -> FnDispatcher<impl Fn(&ChangeEvent, Option<BoxError>) -> Result<(), BoxError> + use<>> {
    let log = Arc::clone(log);
    FnDispatcher(move |e: &ChangeEvent, _: Option<BoxError>| {
        let id = match e.document_id() {
            Some(Bson::Int64(n)) => n,
            Some(Bson::Int32(n)) => i64::from(n),
            _ => return Ok(()),
        };
        let full = e.full_document_parsed()?;
        let version = match e.operation_type {
            OperationType::Update => e
                .update_description()?
                .and_then(|u| u.updated_fields.get_i64("v").ok()),
            _ => full.as_ref().and_then(|d| d.get_i64("v").ok()),
        };
        log.lock()
            .unwrap()
            .push((e.operation_type.clone(), id, full, version));
        Ok(())
    })
}

/// A recorder that takes a millisecond every fourth snapshot event: the snapshot is
/// read while the writer writes, so stream events and snapshot images meet.
struct Unhurried<D>(D, std::sync::atomic::AtomicU64);

#[async_trait::async_trait]
impl<D: Dispatcher> Dispatcher for Unhurried<D> {
    async fn dispatch(&self, e: &ChangeEvent, previous: Option<BoxError>) -> Result<(), BoxError> {
        if e.operation_type == OperationType::Snapshot
            && self
                .1
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .is_multiple_of(4)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.0.dispatch(e, previous).await
    }
}

/// The collection as the events say it is, applied in delivery order.
fn replica(log: &Log) -> BTreeMap<i64, Document> {
    let mut out = BTreeMap::new();
    for (op, id, full, _) in log.lock().unwrap().iter() {
        match op {
            OperationType::Delete => {
                out.remove(id);
            }
            // An update whose document was deleted since has none: its delete follows.
            _ => {
                if let Some(d) = full {
                    out.insert(*id, d.clone());
                }
            }
        }
    }
    out
}

async fn contents(coll: &Collection<Document>) -> BTreeMap<i64, Document> {
    let mut cursor = coll.find(doc! {}).await.unwrap();
    let mut out = BTreeMap::new();
    while cursor.advance().await.unwrap() {
        let d = cursor.deserialize_current().unwrap();
        out.insert(d.get_i64("_id").unwrap(), d);
    }
    out
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Env {
    deployment: TestDeployment,
    client: Client,
    db: String,
}

impl Env {
    async fn new(db: &str, existing: i64) -> Self {
        let deployment = TestDeployment::start().await.unwrap();
        let client = Client::with_uri_str(deployment.uri()).await.unwrap();
        client.database(db).drop().await.unwrap();
        let env = Self {
            deployment,
            client,
            db: db.to_owned(),
        };
        let docs: Vec<Document> = (0..existing)
            .map(|i| doc! { "_id": i, "v": 0_i64, "pad": "x".repeat(100) })
            .collect();
        for chunk in docs.chunks(1000) {
            env.coll().insert_many(chunk.to_vec()).await.unwrap();
        }
        env
    }

    fn coll(&self) -> Collection<Document> {
        self.client.database(&self.db).collection("items")
    }

    fn watch(&self) -> cdc_processor::Watch {
        cdc_processor::Watch::collection(self.client.clone(), self.db.clone(), "items")
            .full_document(FullDocument::UpdateLookup)
    }

    fn builder(&self, store: &Arc<MemoryStore>) -> cdc_processor::Builder {
        DocumentProcessor::builder()
            .source(self.watch())
            .store(store.clone())
    }

    /// Updates, deletes and inserts while the processor reads.
    async fn write_meanwhile(&self, existing: i64, rounds: std::ops::Range<i64>) {
        let coll = self.coll();
        for r in rounds {
            let id = (r * 37) % existing;
            coll.update_one(doc! { "_id": id }, doc! { "$inc": { "v": 1_i64 } })
                .await
                .unwrap();
            if r % 5 == 0 {
                coll.delete_one(doc! { "_id": (r * 53 + 11) % existing })
                    .await
                    .unwrap();
            }
            if r % 7 == 0 {
                coll.insert_one(doc! { "_id": existing + r, "v": 0_i64 })
                    .await
                    .unwrap();
            }
        }
    }

    /// Waits until the processor's snapshot is read, then as `caught_up` (stream events
    /// are handed over while a snapshot is read, so a marker alone does not tell the
    /// snapshot is done).
    async fn snapshot_caught_up(&self, p: &DocumentProcessor, log: &Log, marker: i64) {
        let read = p.clone();
        until("the snapshot to be read", move || {
            read.stats().snapshot.is_some_and(|s| s.finished)
        })
        .await;
        self.caught_up(log, marker).await;
    }

    /// Writes a marker and waits until the processor delivered it: everything written
    /// before it has been delivered too.
    async fn caught_up(&self, log: &Log, marker: i64) {
        self.coll()
            .insert_one(doc! { "_id": marker, "v": -1_i64 })
            .await
            .unwrap();
        let seen = Arc::clone(log);
        until("the marker", move || {
            seen.lock()
                .unwrap()
                .iter()
                .any(|(op, id, ..)| *op == OperationType::Insert && *id == marker)
        })
        .await;
    }
}

#[tokio::test]
async fn existing_documents_first_then_the_stream_and_the_replica_equals_the_collection() {
    let existing = 3000;
    // One cursor; chunks read four at a time; and chunks with 8 lanes.
    for (parallelism, chunk, lanes) in [(1, 1000, 1), (4, 100, 1), (4, 250, 8)] {
        let env = Env::new("snap_replica", existing).await;
        if lanes > 1 {
            // Split points from a scan of the keys when `splitVector` is refused (a user
            // without the privilege).
            env.client
                .database("admin")
                .run_command(doc! {
                    "configureFailPoint": "failCommand",
                    "mode": "alwaysOn",
                    "data": { "failCommands": ["splitVector"], "errorCode": 13 },
                })
                .await
                .unwrap();
        }
        let store = Arc::new(MemoryStore::new());
        let log: Log = Arc::default();
        let p = env
            .builder(&store)
            .source(
                env.watch()
                    .snapshot(SnapshotMode::Initial)
                    .snapshot_parallelism(parallelism, chunk),
            )
            .concurrency(lanes)
            .build()
            .unwrap();
        let (p2, handler) = (p.clone(), Unhurried(recorder(&log), Default::default()));
        let task = tokio::spawn(async move { p2.start(handler).await });
        env.write_meanwhile(existing, 0..300).await;
        env.snapshot_caught_up(&p, &log, 1_000_000).await;
        p.stop();
        task.await.unwrap().unwrap();

        let case = format!("parallelism {parallelism}, chunks {chunk}, lanes {lanes}");
        assert_eq!(replica(&log), contents(&env.coll()).await, "{case}");
        let entries = log.lock().unwrap().clone();
        // Every document that existed was delivered by the snapshot or deleted by the
        // stream; snapshot events come in `_id` order (sequentially), and, per key,
        // before any stream event of that key.
        let snapshot_ids: Vec<i64> = entries
            .iter()
            .filter(|(op, ..)| *op == OperationType::Snapshot)
            .map(|(_, id, ..)| *id)
            .collect();
        assert!(
            snapshot_ids.len() as i64 >= existing - 60,
            "{case}: {}",
            snapshot_ids.len()
        );
        if lanes == 1 {
            assert!(
                snapshot_ids.windows(2).all(|w| w[0] < w[1]),
                "{case}: in _id order"
            );
        }
        // No stale overwrite: per key, the versions arrive in the order they were made
        // (snapshot images and stream events interleave, each at its place).
        let mut latest: BTreeMap<i64, i64> = BTreeMap::new();
        for (op, id, _, version) in &entries {
            if let Some(v) = version {
                let before = latest.insert(*id, *v).unwrap_or(i64::MIN);
                assert!(
                    *v >= before,
                    "{case}: key {id}: version {v} ({op:?}) after version {before}"
                );
            }
        }
        let progress = p.stats().snapshot.unwrap();
        assert!(progress.finished, "{case}");
        if parallelism > 1 {
            assert!(
                progress.chunks_total > 4 && progress.chunks_done == progress.chunks_total,
                "{case}: {progress:?}"
            );
        }
        // The writer wrote while the snapshot was read: stream events came between
        // snapshot images.
        let last_image = entries
            .iter()
            .rposition(|(op, ..)| *op == OperationType::Snapshot)
            .unwrap();
        let interleaved = entries[..last_image]
            .iter()
            .filter(|(op, ..)| *op != OperationType::Snapshot)
            .count();
        eprintln!(
            "{case}: {interleaved} stream events among the snapshot images, {} documents read again",
            progress.reread
        );
        assert!(
            interleaved > 0,
            "{case}: the writer did not meet the snapshot"
        );
        assert_eq!(
            p.stats()
                .events_by_type
                .get("snapshot")
                .copied()
                .unwrap_or(0),
            snapshot_ids.len() as u64,
            "{case}: counted"
        );
        env.deployment.shutdown().await;
    }
}

#[tokio::test]
async fn a_snapshot_stopped_midway_continues_where_it_stopped() {
    let existing = 2000;
    let env = Env::new("snap_resume", existing).await;
    let store = Arc::new(MemoryStore::new());
    let first: Log = Arc::default();
    let p = env
        .builder(&store)
        .source(env.watch().snapshot(SnapshotMode::Initial))
        .checkpoint(CheckpointPolicy::every_event())
        .build()
        .unwrap();
    let stop = p.stop_handle();
    let seen = Arc::clone(&first);
    let handler = FnDispatcher(move |e: &ChangeEvent, _: Option<BoxError>| {
        let mut log = seen.lock().unwrap();
        log.push((
            e.operation_type.clone(),
            e.document_id().and_then(|b| b.as_i64()).unwrap_or(-1),
            None,
            None,
        ));
        if log.len() == 700 {
            stop.stop();
        }
        Ok(())
    });
    p.start(handler).await.unwrap();
    let delivered_first = first.lock().unwrap().len();
    assert!((700..=701).contains(&delivered_first), "{delivered_first}");
    // Changes while no consumer runs: the stream delivers them after the snapshot.
    env.coll()
        .insert_one(doc! { "_id": 5000_i64, "v": 0_i64 })
        .await
        .unwrap();
    env.coll()
        .delete_one(doc! { "_id": 1999_i64 })
        .await
        .unwrap();

    let second: Log = Arc::default();
    let q = env
        .builder(&store)
        .source(env.watch().snapshot(SnapshotMode::Initial))
        .checkpoint(CheckpointPolicy::every_event())
        .build()
        .unwrap();
    let (q2, handler) = (q.clone(), recorder(&second));
    let task = tokio::spawn(async move { q2.start(handler).await });
    env.snapshot_caught_up(&q, &second, 1_000_000).await;
    q.stop();
    task.await.unwrap().unwrap();
    let second = second.lock().unwrap().clone();
    let snap: Vec<i64> = second
        .iter()
        .filter(|(op, ..)| *op == OperationType::Snapshot)
        .map(|(_, id, ..)| *id)
        .collect();
    // It continued after the last document handled (at most one repeat under
    // every_event), not from the start.
    let first_ids: Vec<i64> = first
        .lock()
        .unwrap()
        .iter()
        .map(|(_, id, ..)| *id)
        .collect();
    let last_first = *first_ids.last().unwrap();
    assert!(
        snap[0] >= last_first && snap[0] <= last_first + 1,
        "{} after {last_first}",
        snap[0]
    );
    let mut all: Vec<i64> = first_ids.into_iter().chain(snap.iter().copied()).collect();
    all.sort_unstable();
    all.dedup();
    // Every document that existed when the snapshot began is there, except 1999, deleted
    // before the scan reached it (its delete comes from the stream); documents inserted
    // since are read by the scan when their `_id` lies ahead of it.
    let expected: Vec<i64> = (0..existing - 1).collect();
    assert_eq!(&all[..expected.len()], expected.as_slice());
    assert!(!snap.contains(&1999));
    assert!(
        second.iter().any(|(_, id, ..)| *id == 5000),
        "the insert made meanwhile"
    );
    assert!(
        second
            .iter()
            .any(|(op, id, ..)| *op == OperationType::Delete && *id == 1999)
    );
    env.deployment.shutdown().await;
}

#[tokio::test]
async fn initial_only_stops_after_the_scan_and_a_later_start_streams_from_before_it() {
    let existing = 500;
    let env = Env::new("snap_initial_only", existing).await;
    let store = Arc::new(MemoryStore::new());
    let log: Log = Arc::default();
    let p = env
        .builder(&store)
        .source(env.watch().snapshot(SnapshotMode::InitialOnly))
        .build()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), p.start(recorder(&log)))
        .await
        .expect("initial-only ends by itself")
        .unwrap();
    assert_eq!(log.lock().unwrap().len() as i64, existing);
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .all(|(op, ..)| *op == OperationType::Snapshot)
    );
    env.coll()
        .update_one(doc! { "_id": 7_i64 }, doc! { "$set": { "v": 9_i64 } })
        .await
        .unwrap();
    // A later start (without snapshots) continues the stream from before the scan.
    let later: Log = Arc::default();
    let q = env.builder(&store).build().unwrap();
    let (q2, handler) = (q.clone(), recorder(&later));
    let task = tokio::spawn(async move { q2.start(handler).await });
    env.caught_up(&later, 1_000_000).await;
    q.stop();
    task.await.unwrap().unwrap();
    let later = later.lock().unwrap().clone();
    assert!(later.iter().all(|(op, ..)| *op != OperationType::Snapshot));
    assert!(
        later
            .iter()
            .any(|(op, id, d, _)| *op == OperationType::Update
                && *id == 7
                && d.as_ref().and_then(|d| d.get_i64("v").ok()) == Some(9))
    );
    env.deployment.shutdown().await;
}

/// When the stored position has aged out of the oplog, `WhenNeeded` reads the documents
/// anew and continues from a position taken before that read: the replica built from
/// that run alone equals the collection.
#[tokio::test]
async fn when_needed_reads_the_documents_anew_after_history_is_lost() {
    let existing = 300;
    let env = Env::new("snap_when_needed", existing).await;
    let Some(sim) = env.deployment.sim() else {
        eprintln!(
            "SKIPPED when_needed_reads_the_documents_anew_after_history_is_lost: needs mongo-sim's oplog control"
        );
        return;
    };
    let store = Arc::new(MemoryStore::new());
    let first: Log = Arc::default();
    let p = env.builder(&store).build().unwrap();
    let (p2, handler) = (p.clone(), recorder(&first));
    let task = tokio::spawn(async move { p2.start(handler).await });
    let opened = p.clone();
    until("the stream to open", move || {
        opened.stats().checkpoints >= 1
    })
    .await;
    env.caught_up(&first, 900_000).await;
    p.stop();
    task.await.unwrap().unwrap();
    // Meanwhile more changes than the oplog keeps.
    env.write_meanwhile(existing, 0..60).await;
    sim.set_oplog_capacity(5);
    let log: Log = Arc::default();
    let q = env
        .builder(&store)
        .source(env.watch().snapshot(SnapshotMode::WhenNeeded))
        .build()
        .unwrap();
    let (q2, handler) = (q.clone(), recorder(&log));
    let task = tokio::spawn(async move { q2.start(handler).await });
    let seen = Arc::clone(&log);
    until("the snapshot", move || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|(op, ..)| *op == OperationType::Snapshot)
    })
    .await;
    sim.set_oplog_capacity(1_000_000);
    env.write_meanwhile(existing, 60..100).await;
    env.snapshot_caught_up(&q, &log, 1_000_000).await;
    q.stop();
    task.await.unwrap().unwrap();
    assert_eq!(replica(&log), contents(&env.coll()).await);
    env.deployment.shutdown().await;
}

/// A database scope reads every collection (in name order), then streams them all.
#[tokio::test]
async fn a_database_snapshot_reads_every_collection_then_streams() {
    let env = Env::new("snap_database", 0).await;
    let db = env.client.database(&env.db);
    for name in ["alpha", "beta", "gamma"] {
        let docs: Vec<Document> = (0..200_i64)
            .map(|i| doc! { "_id": i, "v": 0_i64 })
            .collect();
        db.collection::<Document>(name)
            .insert_many(docs)
            .await
            .unwrap();
    }
    let log: Arc<Mutex<Vec<(String, OperationType, i64)>>> = Arc::default();
    let seen = Arc::clone(&log);
    let handler = FnDispatcher(move |e: &ChangeEvent, _: Option<BoxError>| {
        let coll =
            e.ns.as_ref()
                .and_then(|n| n.coll.clone())
                .map(String::from)
                .unwrap_or_default();
        let id = e.document_id().and_then(|b| b.as_i64()).unwrap_or(-1);
        seen.lock()
            .unwrap()
            .push((coll, e.operation_type.clone(), id));
        Ok(())
    });
    let store = Arc::new(MemoryStore::new());
    let p = DocumentProcessor::builder()
        .source(
            cdc_processor::Watch::database(env.client.clone(), env.db.clone())
                .snapshot(SnapshotMode::Initial)
                .snapshot_parallelism(2, 50),
        )
        .store(store)
        .build()
        .unwrap();
    let p2 = p.clone();
    let task = tokio::spawn(async move { p2.start(handler).await });
    let read = Arc::clone(&log);
    until("the snapshot of the three collections", move || {
        read.lock()
            .unwrap()
            .iter()
            .filter(|(_, op, _)| *op == OperationType::Snapshot)
            .count()
            >= 600
    })
    .await;
    db.collection::<Document>("beta")
        .insert_one(doc! { "_id": 1000_i64, "v": 0_i64 })
        .await
        .unwrap();
    let done = Arc::clone(&log);
    until("the new document of beta, after the snapshot", move || {
        done.lock()
            .unwrap()
            .iter()
            .any(|(c, op, id)| c == "beta" && *op == OperationType::Insert && *id == 1000)
    })
    .await;
    p.stop();
    task.await.unwrap().unwrap();
    let log = log.lock().unwrap().clone();
    let order: Vec<&str> = log
        .iter()
        .filter(|(_, op, _)| *op == OperationType::Snapshot)
        .map(|(c, ..)| c.as_str())
        .collect();
    let mut names = order.clone();
    names.dedup();
    assert_eq!(
        names,
        ["alpha", "beta", "gamma"],
        "collections in name order"
    );
    for name in ["alpha", "gamma"] {
        assert_eq!(order.iter().filter(|c| **c == name).count(), 200, "{name}");
    }
    assert_eq!(order.iter().filter(|c| **c == "beta").count(), 200);
    env.deployment.shutdown().await;
}

/// Marks the documents whose `_id` is even as `tier: gold`.
async fn gild_even(env: &Env, existing: i64) {
    let even: Vec<i64> = (0..existing).filter(|i| i % 2 == 0).collect();
    env.coll()
        .update_many(
            doc! { "_id": { "$in": even } },
            doc! { "$set": { "tier": "gold" } },
        )
        .await
        .unwrap();
}

/// A snapshot requested while streaming reads the documents its filter names, each at
/// its place among the changes the writer makes meanwhile (no key's versions go
/// backwards); a second request while it reads, a collection not watched, a filter the
/// server refuses and a processor not running are refused.
#[tokio::test]
async fn a_snapshot_requested_while_streaming_reads_the_filtered_documents() {
    let existing = 6000;
    let env = Env::new("snap_request", existing).await;
    gild_even(&env, existing).await;
    let store = Arc::new(MemoryStore::new());
    let log: Log = Arc::default();
    let p = env.builder(&store).build().unwrap();
    let gold = || cdc_processor::SnapshotRequest::new(doc! { "tier": "gold" });
    let not_running = p.request_snapshot(gold()).await.unwrap_err();
    assert!(
        matches!(not_running, cdc_processor::Error::NotRunning(_)),
        "{not_running}"
    );
    let (p2, handler) = (p.clone(), Unhurried(recorder(&log), Default::default()));
    let task = tokio::spawn(async move { p2.start(handler).await });
    let opened = p.clone();
    until("the stream to open", move || {
        opened.stats().checkpoints >= 1
    })
    .await;

    p.request_snapshot(gold()).await.unwrap();
    let again = p.request_snapshot(gold()).await.unwrap_err();
    assert!(again.to_string().contains("being read"), "{again}");
    let elsewhere = p
        .request_snapshot(gold().collection("other"))
        .await
        .unwrap_err();
    assert!(elsewhere.to_string().contains("not watched"), "{elsewhere}");
    env.write_meanwhile(existing, 0..300).await;
    env.snapshot_caught_up(&p, &log, 1_000_000).await;
    let bad = p
        .request_snapshot(cdc_processor::SnapshotRequest::new(doc! { "$bogus": 1 }))
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("filter"), "{bad}");
    p.stop();
    task.await.unwrap().unwrap();

    let entries = log.lock().unwrap().clone();
    let images: Vec<i64> = entries
        .iter()
        .filter(|(op, ..)| *op == OperationType::Snapshot)
        .map(|(_, id, ..)| *id)
        .collect();
    // Only gold documents, in `_id` order; every gold document that exists now was read.
    assert!(images.iter().all(|id| id % 2 == 0 && *id < existing));
    assert!(images.windows(2).all(|w| w[0] < w[1]));
    let now = contents(&env.coll()).await;
    let gold_now: Vec<i64> = now
        .iter()
        .filter(|(_, d)| d.get_str("tier").ok() == Some("gold"))
        .map(|(id, _)| *id)
        .collect();
    assert!(gold_now.iter().all(|id| images.contains(id)));
    assert!(images.len() > 2500, "{}", images.len());
    // No stale overwrite: per key, versions in the order they were made.
    let mut latest: BTreeMap<i64, i64> = BTreeMap::new();
    for (op, id, _, version) in &entries {
        if let Some(v) = version {
            let before = latest.insert(*id, *v).unwrap_or(i64::MIN);
            assert!(
                *v >= before,
                "key {id}: version {v} ({op:?}) after {before}"
            );
        }
    }
    // Changes came during the reading too.
    let last_image = entries
        .iter()
        .rposition(|(op, ..)| *op == OperationType::Snapshot)
        .unwrap();
    assert!(
        entries[..last_image]
            .iter()
            .any(|(op, ..)| *op != OperationType::Snapshot)
    );
    env.deployment.shutdown().await;
}

/// A snapshot requested while streaming and stopped midway continues where it stopped
/// at the next start, with the same filter (it is part of the stored point).
#[tokio::test]
async fn a_requested_snapshot_stopped_midway_continues_with_its_filter() {
    let existing = 2000;
    let env = Env::new("snap_request_resume", existing).await;
    gild_even(&env, existing).await;
    let store = Arc::new(MemoryStore::new());
    let first: Log = Arc::default();
    let p = env
        .builder(&store)
        .checkpoint(CheckpointPolicy::every_event())
        .build()
        .unwrap();
    let stop = p.stop_handle();
    let seen = Arc::clone(&first);
    let handler = FnDispatcher(move |e: &ChangeEvent, _: Option<BoxError>| {
        let mut log = seen.lock().unwrap();
        if e.operation_type == OperationType::Snapshot {
            log.push((
                e.operation_type.clone(),
                e.document_id().and_then(|b| b.as_i64()).unwrap_or(-1),
                None,
                None,
            ));
            if log.len() == 300 {
                stop.stop();
            }
        }
        Ok(())
    });
    let p2 = p.clone();
    let task = tokio::spawn(async move { p2.start(handler).await });
    let opened = p.clone();
    until("the stream to open", move || {
        opened.stats().checkpoints >= 1
    })
    .await;
    p.request_snapshot(cdc_processor::SnapshotRequest::new(doc! { "tier": "gold" }))
        .await
        .unwrap();
    task.await.unwrap().unwrap();
    let first_ids: Vec<i64> = first
        .lock()
        .unwrap()
        .iter()
        .map(|(_, id, ..)| *id)
        .collect();
    assert!((300..=301).contains(&first_ids.len()));

    let second: Log = Arc::default();
    let q = env.builder(&store).build().unwrap();
    let (q2, handler) = (q.clone(), recorder(&second));
    let task = tokio::spawn(async move { q2.start(handler).await });
    env.snapshot_caught_up(&q, &second, 1_000_000).await;
    q.stop();
    task.await.unwrap().unwrap();
    let images: Vec<i64> = second
        .lock()
        .unwrap()
        .iter()
        .filter(|(op, ..)| *op == OperationType::Snapshot)
        .map(|(_, id, ..)| *id)
        .collect();
    let last_first = *first_ids.last().unwrap();
    assert!(
        images[0] >= last_first && images[0] <= last_first + 2,
        "{} after {last_first}",
        images[0]
    );
    assert!(images.iter().all(|id| id % 2 == 0), "the filter held");
    let mut all: Vec<i64> = first_ids.into_iter().chain(images).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all,
        (0..existing).filter(|i| i % 2 == 0).collect::<Vec<_>>()
    );
    env.deployment.shutdown().await;
}
