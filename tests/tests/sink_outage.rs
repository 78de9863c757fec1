//! A sink's server away mid-run: NATS JetStream or PostgreSQL reached through a fault
//! proxy that refuses every connection, then stalls every byte, then cuts the connections
//! (a restart) while a writer keeps changing documents. The processor waits the outage
//! out (nothing skipped or dead-lettered, no operator action); the checkpoint never passes
//! a change the sink did not take; afterwards the sink holds every change (NATS: exactly
//! once; PostgreSQL: the table equals the collection).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::{sync::Arc, time::Duration};

use bson::doc;
use cdc_core::ResumeStore;
use cdc_processor::{CheckpointPolicy, DocumentProcessor, HandlerErrorPolicy, stores::MemoryStore};
use cdc_sink::{
    Body, NatsSink, PostgresSink, SubjectTemplate,
    async_nats::{self, jetstream},
};
use cdc_tests::proxy::{FaultProxy, Mode};
use mongo_sim::MongoSim;

fn tag() -> String {
    format!(
        "{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

/// Inserts `_id` 0.., updating every third, until told to stop; returns how many ids.
fn writer(
    coll: mongodb::Collection<bson::Document>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<i64> {
    tokio::spawn(async move {
        let mut i = 0_i64;
        while !stop.is_cancelled() {
            coll.insert_one(doc! { "_id": i, "v": 0_i64 })
                .await
                .unwrap();
            if i % 3 == 0 {
                coll.update_one(doc! { "_id": i }, doc! { "$set": { "v": 1_i64 } })
                    .await
                    .unwrap();
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        i
    })
}

/// The processor of both tests: stream `outage` of `shop.items`, small batches and
/// checkpoints, and a handler-error policy that stops after one retry (so an outage
/// taken for a bad event would end the run).
fn processor(
    client: &mongodb::Client,
    store: Arc<dyn cdc_core::ResumeStore>,
    handler_checkpoints: bool,
) -> DocumentProcessor {
    DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            client.clone(),
            "shop",
            "items",
        ))
        .store(store)
        .handler_checkpoints(handler_checkpoints)
        .stream_id("outage")
        .on_handler_error(HandlerErrorPolicy::stop().retries(1))
        .checkpoint(CheckpointPolicy::batched(20, Duration::from_millis(100)).unwrap())
        .build()
        .unwrap()
}

/// Runs `p` with `sink` under the retry loop; returns once its stream is open.
async fn start<S>(
    p: &DocumentProcessor,
    sink: Arc<S>,
) -> tokio::task::JoinHandle<cdc_processor::Result<()>>
where
    S: cdc_processor::BatchDispatcher + 'static,
{
    let runner = p.clone();
    let task = tokio::spawn(async move {
        runner
            .start_with_retry(
                cdc_processor::default_backoff(),
                cdc_processor::Batches::new(sink).max_events(20),
            )
            .await
    });
    while !p.stats().stream_open {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task
}

/// Pass, refuse, stall, then pass with every connection cut, `phase` each; calls
/// `sample` every 50 ms meanwhile.
async fn outage<F, Fut>(proxy: &FaultProxy, phase: Duration, mut sample: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for mode in [Mode::Pass, Mode::Refuse, Mode::Stall, Mode::Pass] {
        proxy.set(mode);
        proxy.cut();
        let until = tokio::time::Instant::now() + phase;
        while tokio::time::Instant::now() < until {
            sample().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `(cluster time, Nats-Msg-Id, JetStream sequence)` of every message.
async fn nats_messages(js: &jetstream::Context, stream: &str) -> Vec<((u32, u32), String, u64)> {
    cdc_tests::nats::all_messages(js, stream)
        .await
        .unwrap()
        .iter()
        .map(|m| {
            let h = m.headers.as_ref().unwrap();
            let (t, i) = h
                .get("Cdc-Cluster-Time")
                .unwrap()
                .as_str()
                .split_once('.')
                .unwrap();
            (
                (t.parse().unwrap(), i.parse().unwrap()),
                h.get("Nats-Msg-Id").unwrap().to_string(),
                m.info().unwrap().stream_sequence,
            )
        })
        .collect()
}

#[tokio::test]
async fn nats_away_mid_run() {
    let url = std::env::var("CDC_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let direct = match async_nats::connect(&url).await {
        Ok(c) => c,
        Err(e) => {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "NATS is unreachable under CI=true: {e}"
            );
            eprintln!("SKIPPED: NATS unreachable ({e})");
            return;
        }
    };
    let target = url.trim_start_matches("nats://").parse().unwrap();
    let proxy = FaultProxy::start(target).await.unwrap();
    let through = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(1))
        .connect(format!("nats://{}", proxy.addr()))
        .await
        .unwrap();
    let tag = tag();
    let stream = format!("OUTAGE_{tag}");
    let js = jetstream::new(direct);
    let sink = Arc::new(
        NatsSink::new(through, "outage")
            .subject(SubjectTemplate::parse(&format!("outage{tag}.{{coll}}.{{op}}")).unwrap())
            .body(Body::CanonicalJson)
            .window(32)
            // Shorter than the outage: publishes fail, and the run must wait them out.
            .ack_timeout(Duration::from_millis(400)),
    );
    sink.ensure_stream(&stream, true, Duration::from_secs(600))
        .await
        .unwrap();

    let sim = MongoSim::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(sim.uri()).await.unwrap();
    let coll = client
        .database("shop")
        .collection::<bson::Document>("items");
    let store = Arc::new(MemoryStore::new());
    let p = processor(&client, store.clone(), false);
    let task = start(&p, Arc::clone(&sink)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let w = writer(coll.clone(), stop.clone());
    // (stored point, last sequence JetStream had right after it was read).
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    outage(&proxy, Duration::from_millis(1500), || {
        let (store, js, stream) = (store.clone(), js.clone(), stream.clone());
        let samples = Arc::clone(&samples);
        async move {
            if let Some(point) = store.load("outage").await.unwrap() {
                let last = js
                    .get_stream(&stream)
                    .await
                    .unwrap()
                    .info()
                    .await
                    .unwrap()
                    .state
                    .last_sequence;
                samples.lock().unwrap().push((point.cluster_time, last));
            }
        }
    })
    .await;
    stop.cancel();
    let ids = w.await.unwrap();
    let expected = usize::try_from(ids + (ids + 2) / 3).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut got = nats_messages(&js, &stream).await;
    while got.len() < expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        got = nats_messages(&js, &stream).await;
    }
    assert!(
        !task.is_finished(),
        "the run ended: {:?}",
        p.stats().last_error
    );
    p.stop();
    task.await.unwrap().unwrap();

    let stats = p.stats();
    assert_eq!(stats.skipped_events + stats.dead_letters, 0);
    let ids: std::collections::HashSet<&String> = got.iter().map(|(_, id, _)| id).collect();
    assert_eq!(got.len(), expected, "every change, exactly once");
    assert_eq!(ids.len(), expected);
    // The checkpoint never passed a change JetStream had not stored.
    let samples = samples.lock().unwrap().clone();
    let mut checked = 0;
    for (point, last_seq) in &samples {
        for (ct, id, seq) in &got {
            if (ct.0, ct.1) <= (point.time, point.increment) {
                checked += 1;
                assert!(
                    seq <= last_seq,
                    "{id} (seq {seq}) is behind the stored point {point:?}, stored when JetStream held {last_seq}"
                );
            }
        }
    }
    assert!(
        checked > 0 && samples.len() > 20,
        "{checked} {}",
        samples.len()
    );
    println!(
        "nats outage: {} changes, {} stored-point samples checked, {} duplicates dropped by JetStream, restarts {}",
        got.len(),
        samples.len(),
        sink.counters().duplicates,
        stats.restarts
    );
    js.delete_stream(&stream).await.unwrap();
    sim.shutdown().await;
}

#[tokio::test]
async fn postgres_away_mid_run() {
    let direct_url = std::env::var("CDC_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let (check, conn) = match tokio_postgres::connect(&direct_url, tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "PostgreSQL is unreachable under CI=true: {e}"
            );
            eprintln!("SKIPPED: PostgreSQL unreachable ({e})");
            return;
        }
    };
    tokio::spawn(conn);
    let proxy = FaultProxy::start("127.0.0.1:5432".parse().unwrap())
        .await
        .unwrap();
    let url = format!(
        "postgres://postgres@{}/test?connect_timeout=1",
        proxy.addr()
    );
    let tag = tag();
    let prefix = format!("outage_{tag}_");
    let points = format!("outage_points_{tag}");
    // The sink reaches PostgreSQL through the proxy; the processor's own saves go
    // direct, so the outage is the sink's alone (it must not end the run).
    let store = Arc::new(
        cdc_processor::stores::PostgresStore::connect(&url, &points)
            .await
            .unwrap(),
    );
    let direct_store = Arc::new(
        cdc_processor::stores::PostgresStore::connect(&direct_url, &points)
            .await
            .unwrap(),
    );
    let sim = MongoSim::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(sim.uri()).await.unwrap();
    let coll = client
        .database("shop")
        .collection::<bson::Document>("items");
    let p = processor(&client, direct_store, true);
    let sink = Arc::new(
        PostgresSink::reconnecting(store.clone(), prefix.clone())
            .checkpoint_with(store.clone(), "outage"),
    );
    let task = start(&p, sink).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let w = writer(coll.clone(), stop.clone());
    outage(&proxy, Duration::from_millis(1500), || async {}).await;
    stop.cancel();
    let ids = w.await.unwrap();
    // The sink's connection died in the outage: it opens a new one and goes on.
    let table = format!("{prefix}items");
    // Caught up once every document is there with its last version (every third at v 1):
    // the table equals the collection.
    let state = async || {
        let rows: i64 = check
            .query_one(&format!("SELECT count(*) FROM \"{table}\""), &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        let mismatched: i64 = check
            .query_one(
                &format!(
                    "SELECT count(*) FROM \"{table}\" WHERE (doc->>'v')::bigint <> CASE WHEN (doc->>'_id')::bigint % 3 = 0 THEN 1 ELSE 0 END"
                ),
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1);
        (rows, mismatched)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (rows, mismatched) = loop {
        let (rows, mismatched) = state().await;
        if (rows >= ids && mismatched == 0) || tokio::time::Instant::now() > deadline {
            break (rows, mismatched);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        !task.is_finished(),
        "the run ended: {:?}",
        p.stats().last_error
    );
    p.stop();
    task.await.unwrap().unwrap();
    assert_eq!(rows, ids, "{:?}", p.stats().last_error);
    assert_eq!(
        mismatched, 0,
        "rows at another version than the collection's"
    );
    let stats = p.stats();
    assert_eq!(stats.skipped_events + stats.dead_letters, 0);
    println!(
        "postgres outage: {ids} documents, restarts {}",
        p.stats().restarts
    );
    let _ = check
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS \"{table}\"; DROP TABLE IF EXISTS \"{points}\"; DROP TABLE IF EXISTS \"{points}_leases\""
        ))
        .await;
    sim.shutdown().await;
}
