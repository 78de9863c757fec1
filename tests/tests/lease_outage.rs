//! A store outage during a lease: two processors on one stream hold their lease in Redis
//! or PostgreSQL reached through a fault proxy that refuses, then stalls, every
//! connection for three TTLs. The holder stops handling once it cannot renew; nobody
//! handles while the store is away; after it returns one instance takes the stream again
//! from the stored point: never two holders at once, nothing lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use bson::doc;
use cdc_core::{DeadLetterStore, LeaseStore, ResumeStore};
use cdc_processor::{BoxError, ChangeEvent, CheckpointPolicy, DocumentProcessor, FnDispatcher};
use cdc_tests::{
    proxy::{FaultProxy, Mode},
    verify::{session_overlaps, sessions},
};
use mongo_sim::MongoSim;

const TTL: Duration = Duration::from_millis(600);

/// `(owner, _id, ms)` of every event handled.
type Log = Arc<Mutex<Vec<(String, i64, i64)>>>;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn now_ms() -> i64 {
    bson::DateTime::now().timestamp_millis()
}

#[tokio::test]
async fn redis_lease_through_an_outage() {
    let url = std::env::var("CDC_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let target: std::net::SocketAddr = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    through_an_outage("Redis", target, |addr| async move {
        cdc_processor::stores::RedisStore::new(
            &format!("redis://{addr}"),
            format!("lease-outage-{}:", std::process::id()),
        )
        .unwrap()
    })
    .await;
}

#[tokio::test]
async fn postgres_lease_through_an_outage() {
    let target: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    through_an_outage("PostgreSQL", target, |addr| async move {
        let url = format!("postgres://postgres@{addr}/test?connect_timeout=2");
        let table = format!("lease_outage_{}", std::process::id());
        cdc_processor::stores::PostgresStore::connect(&url, &table)
            .await
            .unwrap()
    })
    .await;
}

async fn through_an_outage<S, F, Fut>(name: &str, target: std::net::SocketAddr, connect: F)
where
    S: ResumeStore + LeaseStore + DeadLetterStore + 'static,
    F: Fn(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = S>,
{
    if tokio::net::TcpStream::connect(target).await.is_err() {
        assert!(!ci(), "{name} is unreachable under CI=true");
        eprintln!("SKIPPED: {name} unreachable at {target}");
        return;
    }
    for mode in [Mode::Refuse, Mode::Stall] {
        let case = format!("{name} {mode:?}");
        let sim = MongoSim::start().await.unwrap();
        let client = mongodb::Client::with_uri_str(sim.uri()).await.unwrap();
        let proxy = FaultProxy::start(target).await.unwrap();
        let store = Arc::new(connect(proxy.addr()).await);
        // Each instance has its own store client, as separate processes do.
        let store_b = Arc::new(connect(proxy.addr()).await);
        let stream = format!("lease-outage-{}-{mode:?}", std::process::id());
        let log: Log = Arc::default();
        let processor = |owner: &str, store: &Arc<S>| {
            DocumentProcessor::builder()
                .source(cdc_processor::Watch::collection(
                    client.clone(),
                    "outage",
                    "items",
                ))
                .stream_id(stream.clone())
                .store(cdc_processor::Storage::leased(Arc::clone(store), TTL).owner(owner))
                .store_timeout(Duration::from_secs(1))
                .checkpoint(CheckpointPolicy::every_event())
                .build()
                .unwrap()
        };
        let run = |p: &DocumentProcessor, owner: &str| {
            let (p, owner, log) = (p.clone(), owner.to_owned(), Arc::clone(&log));
            tokio::spawn(async move {
                p.start_with_retry(
                    cdc_processor::default_backoff(),
                    FnDispatcher(move |e: &ChangeEvent, _: Option<BoxError>| {
                        if let Some(id) = e.document_id().and_then(|b| b.as_i64()) {
                            log.lock().unwrap().push((owner.clone(), id, now_ms()));
                        }
                        Ok(())
                    }),
                )
                .await
            })
        };
        let (a, b) = (processor("a", &store), processor("b", &store_b));
        let task_a = run(&a, "a");
        let held = a.clone();
        // Held, and its stream open (its opening position saved): writes from now on are
        // its to deliver.
        wait(&case, "a to hold the lease and open its stream", || {
            held.stats().lease_token.is_some() && held.stats().checkpoints >= 1
        })
        .await;
        let task_b = run(&b, "b");

        // A writer inserts all along.
        let coll = client
            .database("outage")
            .collection::<bson::Document>("items");
        let written: Arc<Mutex<Vec<i64>>> = Arc::default();
        let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let writer = {
            let (coll, written, writing) =
                (coll.clone(), Arc::clone(&written), Arc::clone(&writing));
            tokio::spawn(async move {
                let mut id = 0_i64;
                while writing.load(std::sync::atomic::Ordering::SeqCst) {
                    coll.insert_one(doc! { "_id": id }).await.unwrap();
                    written.lock().unwrap().push(id);
                    id += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let seen = Arc::clone(&log);
        wait(&case, "events before the outage", || {
            seen.lock().unwrap().len() >= 20
        })
        .await;

        // The store goes away for three TTLs.
        proxy.set(mode);
        proxy.cut();
        let down = now_ms();
        tokio::time::sleep(TTL * 3).await;
        let during = log
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, t)| *t > down + i64::try_from(TTL.as_millis()).unwrap())
            .count();
        proxy.set(Mode::Pass);
        assert_eq!(during, 0, "{case}: events handled a TTL into the outage");

        tokio::time::sleep(Duration::from_millis(500)).await;
        writing.store(false, std::sync::atomic::Ordering::SeqCst);
        writer.await.unwrap();
        let all: BTreeSet<i64> = written.lock().unwrap().iter().copied().collect();
        let seen = Arc::clone(&log);
        wait(&case, "every write handled", || {
            let got: BTreeSet<i64> = seen.lock().unwrap().iter().map(|(_, id, _)| *id).collect();
            all.is_subset(&got)
        })
        .await;
        a.stop();
        b.stop();
        task_a.await.unwrap().unwrap();
        task_b.await.unwrap().unwrap();

        // Never two holders: the owners' handling sessions (split where an owner handled
        // nothing for a TTL) never intersect.
        let log = log.lock().unwrap().clone();
        let ttl = i64::try_from(TTL.as_millis()).unwrap();
        let owners = ["a", "b"].map(|owner| {
            let times = log
                .iter()
                .filter(|(o, ..)| o == owner)
                .map(|(_, _, t)| *t)
                .collect();
            (owner.to_owned(), times)
        });
        let handled = sessions(owners, ttl);
        for (x, y, overlap) in session_overlaps(&handled) {
            assert!(
                overlap < 0,
                "{case}: {x:?} and {y:?} handled at the same time"
            );
        }
        let _ = ResumeStore::delete(&*store, &stream).await;
        sim.shutdown().await;
    }
}

async fn wait(case: &str, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{case}: timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
