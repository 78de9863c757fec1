//! Streams spread across instances: three instances of a group share twelve streams (one
//! per collection) by leases, about four each; when one dies its streams are taken by the
//! others, and nothing is lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bson::doc;
use cdc_processor::{
    BoxError, ChangeEvent, CheckpointPolicy, Dispatcher, DocumentProcessor, FnDispatcher, Group,
    stores::MemoryStore,
};
use mongo_sim::TestDeployment;

const TTL: Duration = Duration::from_millis(600);
const STREAMS: usize = 12;

/// `(collection, _id)` of every event handled, by any instance.
type Log = Arc<Mutex<Vec<(String, i64)>>>;

fn group(owner: &str, client: &mongodb::Client, store: &Arc<MemoryStore>, log: &Log) -> Arc<Group> {
    let streams: Vec<String> = (0..STREAMS).map(|i| format!("grp.c{i:02}")).collect();
    let (client, store, log) = (client.clone(), Arc::clone(store), Arc::clone(log));
    Arc::new(
        Group::new(
            "grp",
            store.clone(),
            TTL,
            streams,
            move |stream, owner| {
                let coll = stream.trim_start_matches("grp.");
                DocumentProcessor::builder()
                    .source(cdc_processor::Watch::collection(
                        client.clone(),
                        "grp",
                        coll,
                    ))
                    .stream_id(stream)
                    .store(cdc_processor::Storage::leased(Arc::clone(&store), TTL).owner(owner))
                    .checkpoint(CheckpointPolicy::every_event())
                    .build()
            },
            move |stream| {
                let (log, coll) = (
                    Arc::clone(&log),
                    stream.trim_start_matches("grp.").to_owned(),
                );
                Box::new(FnDispatcher(move |e: &ChangeEvent, _: Option<BoxError>| {
                    if let Some(id) = e.document_id().and_then(|b| b.as_i64()) {
                        log.lock().unwrap().push((coll.clone(), id));
                    }
                    Ok(())
                })) as Box<dyn Dispatcher>
            },
        )
        .unwrap()
        .owner(owner),
    )
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// Inserts `n` documents in every collection, after the ids written so far.
async fn write(client: &mongodb::Client, written: &mut BTreeSet<(String, i64)>, n: i64) {
    let base = i64::try_from(written.len()).unwrap();
    for i in 0..STREAMS {
        let coll = format!("c{i:02}");
        for k in 0..n {
            let id = base + k;
            client
                .database("grp")
                .collection::<bson::Document>(&coll)
                .insert_one(doc! { "_id": id })
                .await
                .unwrap();
            written.insert((coll.clone(), id));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_shares_its_streams_and_takes_over_a_dead_instance() {
    let deployment = TestDeployment::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(deployment.uri())
        .await
        .unwrap();
    client.database("grp").drop().await.unwrap();
    // The writer has a client of its own: each stream's processor keeps a connection of
    // the shared client busy while its `getMore` waits.
    let writer = mongodb::Client::with_uri_str(deployment.uri())
        .await
        .unwrap();
    let store = Arc::new(MemoryStore::new());
    let log: Log = Arc::default();
    let ids = |held: Vec<String>| held.len();

    // One instance alone holds every stream.
    let g1 = group("g1", &client, &store, &log);
    let run1 = tokio::spawn({
        let g = Arc::clone(&g1);
        async move { g.run().await }
    });
    until("g1 to hold every stream", || ids(g1.held()) == STREAMS).await;

    // Two more join: about four each.
    let (g2, g3) = (
        group("g2", &client, &store, &log),
        group("g3", &client, &store, &log),
    );
    let runs: Vec<_> = [&g2, &g3]
        .iter()
        .map(|g| {
            let g = Arc::clone(g);
            tokio::spawn(async move { g.run().await })
        })
        .collect();
    let fair = |n: usize| (3..=5).contains(&n);
    let took = until("three instances to share the streams", || {
        let held = [g1.held().len(), g2.held().len(), g3.held().len()];
        held.iter().all(|&n| fair(n)) && held.iter().sum::<usize>() == STREAMS
    })
    .await;
    eprintln!(
        "balanced in {} ms (3 TTLs: {} ms): {:?}",
        took.as_millis(),
        3 * TTL.as_millis(),
        [g1.held().len(), g2.held().len(), g3.held().len()]
    );
    // Every instance's processors have opened their streams (saved their positions).
    tokio::time::sleep(TTL).await;
    let mut written = BTreeSet::new();
    write(&writer, &mut written, 3).await;
    let seen = Arc::clone(&log);
    let all = written.clone();
    until("every write handled", move || {
        let got: BTreeSet<(String, i64)> = seen.lock().unwrap().iter().cloned().collect();
        all.is_subset(&got)
    })
    .await;

    // g1 dies (its run dropped, nothing released): the others take its streams once its
    // leases expire, six each, and nothing written meanwhile is lost.
    run1.abort();
    let _ = run1.await;
    drop(g1);
    let killed = Instant::now();
    write(&writer, &mut written, 3).await;
    until("two instances to hold every stream", || {
        let held = [g2.held().len(), g3.held().len()];
        held.iter().sum::<usize>() == STREAMS && held.iter().all(|&n| n == 6)
    })
    .await;
    eprintln!(
        "a dead instance's streams taken in {} ms (2 TTLs: {} ms)",
        killed.elapsed().as_millis(),
        2 * TTL.as_millis()
    );
    write(&writer, &mut written, 3).await;
    let seen = Arc::clone(&log);
    let all = written.clone();
    until("every write handled", move || {
        let got: BTreeSet<(String, i64)> = seen.lock().unwrap().iter().cloned().collect();
        all.is_subset(&got)
    })
    .await;
    g2.stop();
    g3.stop();
    for r in runs {
        r.await.unwrap().unwrap();
    }
    // Stopped instances release everything.
    assert!(
        cdc_core::LeaseStore::leases(&*store, "grp")
            .await
            .unwrap()
            .is_empty()
    );
    deployment.shutdown().await;
}
