//! Oplog headroom through the real driver against mongo-sim with a small oplog: the figure
//! is the stored point's distance from the oldest entry, to the second; it shrinks while
//! the consumer is held back; the point falls off only after the headroom went below a
//! quarter of the window; what may not be read says why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use bson::{Document, doc};
use cdc_core::{CheckpointPolicy, ClusterTime, ErrorKind, ResumeStore};
use cdc_processor::{
    BoxError, ChangeEvent, DocumentProcessor, FnDispatcher, OplogView, OplogWindow,
    stores::MemoryStore,
};
use mongo_sim::{MongoSim, SimOptions};
use mongodb::{Client, Collection};

/// The oplog's ends as a client reads them (`rs.printReplicationInfo()`'s way).
async fn ends(client: &Client) -> OplogWindow {
    let oplog: Collection<Document> = client.database("local").collection("oplog.rs");
    let mut ts = Vec::new();
    for natural in [1, -1] {
        let entry = oplog
            .find_one(doc! {})
            .sort(doc! { "$natural": natural })
            .await
            .unwrap()
            .unwrap();
        ts.push(ClusterTime::from(entry.get_timestamp("ts").unwrap()));
    }
    OplogWindow::new(ts[0], ts[1])
}

fn processor(client: &Client, store: &Arc<MemoryStore>) -> DocumentProcessor {
    DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            client.clone(),
            "app",
            "items",
        ))
        .store(store.clone())
        .checkpoint(CheckpointPolicy::every_event())
        .build()
        .unwrap()
}

fn ignore()
-> FnDispatcher<impl Fn(&ChangeEvent, Option<BoxError>) -> Result<(), BoxError> + Send + Sync> {
    FnDispatcher(|_: &ChangeEvent, _| Ok(()))
}

#[tokio::test]
async fn the_headroom_shrinks_to_the_second_and_warns_before_the_point_falls_off() {
    // 64 entries at under ten writes a second: a window of about 7 s, so a quarter of it
    // is more than a second (the figures are in seconds).
    let sim = MongoSim::start_with(SimOptions {
        oplog_capacity: 64,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let client = Client::with_uri_str(sim.uri()).await.unwrap();
    let coll: Collection<Document> = client.database("app").collection("items");
    // Two seconds of history before the point, so the point starts well inside the
    // window and the headroom has a way to shrink.
    for i in -10..0 {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let store = Arc::new(MemoryStore::new());

    // The consumer handles one change, saves its point, and is held back (stopped).
    let p = processor(&client, &store);
    let runner = p.clone();
    let task = tokio::spawn(async move { runner.start(ignore()).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !p.stats().stream_open {
        assert!(tokio::time::Instant::now() < deadline, "never opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    coll.insert_one(doc! { "_id": 0 }).await.unwrap();
    while p.stats().events < 1 {
        assert!(tokio::time::Instant::now() < deadline, "never handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.stop();
    task.await.unwrap().unwrap();
    let point = store.load("app.items").await.unwrap().unwrap().cluster_time;

    // A processor that never ran tells the stored point's headroom all the same.
    let idle = processor(&client, &store);
    let mut readings = Vec::new();
    let mut i = 1;
    let fell_off = loop {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Nothing writes between the two reads of the ends (the simulator writes no
        // no-op entries), so the processor's figures must be theirs exactly.
        let before = ends(&client).await;
        let h = idle.oplog_headroom().await.unwrap();
        assert_eq!(ends(&client).await, before);
        assert_eq!(h.point, Some(point));
        assert_eq!(h.view, OplogView::Window(before));
        assert_eq!(h.window_seconds(), Some(before.window_seconds()));
        let headroom = h.headroom_seconds().unwrap();
        assert_eq!(
            headroom,
            i64::from(point.time) - i64::from(before.oldest.time),
            "to the second"
        );
        let held = before.holds(point);
        readings.push((headroom, h.headroom_share().unwrap_or(1.0), held));
        if !held {
            break true;
        }
        assert!(i < 1000, "the point never fell off: {readings:?}");
    };
    assert!(fell_off);
    // The headroom only shrank once the oplog was full, and a reading below a quarter of
    // the window (where `cdc` warns) came while the point could still be resumed from.
    let last = readings.last().unwrap().0;
    assert!(
        readings.windows(2).all(|w| w[1].0 <= w[0].0),
        "{readings:?}"
    );
    assert!(readings[0].0 > last, "{readings:?}");
    assert!(readings[0].1 >= 0.25, "{readings:?}");
    assert!(
        readings
            .iter()
            .any(|(_, share, held)| *share < 0.25 && *held),
        "the warning came before the point fell off: {readings:?}"
    );
    // And the history is lost for a restart, as the headroom said.
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        processor(&client, &store).start(ignore()),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::HistoryLost, "{err}");
    sim.shutdown().await;
}

#[tokio::test]
async fn an_oplog_the_user_may_not_read_is_named_and_left_out() {
    let sim = MongoSim::start().await.unwrap();
    let client = Client::with_uri_str(sim.uri()).await.unwrap();
    let store = Arc::new(MemoryStore::new());
    let h = processor(&client, &store).oplog_headroom().await.unwrap();
    assert_eq!(h.view, OplogView::Empty, "nothing written yet");
    client
        .database("app")
        .collection::<Document>("items")
        .insert_one(doc! { "_id": 1 })
        .await
        .unwrap();
    let p = processor(&client, &store);
    let h = p.oplog_headroom().await.unwrap();
    assert!(matches!(h.view, OplogView::Window(_)), "{h:?}");
    assert_eq!(h.point, None, "no point stored yet");
    assert_eq!(h.headroom_seconds(), None);

    client
        .database("admin")
        .run_command(doc! {
            "configureFailPoint": "failCommand",
            "mode": { "times": 1 },
            "data": { "failCommands": ["find"], "errorCode": 13 },
        })
        .await
        .unwrap();
    let h = p.oplog_headroom().await.unwrap();
    match &h.view {
        OplogView::Unreadable(why) => {
            assert!(
                why.contains("may not read") && why.contains("clusterMonitor"),
                "{why}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.window_seconds(), None);
    sim.shutdown().await;

    // A sharded cluster's router keeps no oplog: said so.
    let sharded = MongoSim::start_with(SimOptions {
        sharded: true,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let client = Client::with_uri_str(sharded.uri()).await.unwrap();
    let h = processor(&client, &store).oplog_headroom().await.unwrap();
    match &h.view {
        OplogView::Unreadable(why) => assert!(why.contains("mongos"), "{why}"),
        other => panic!("{other:?}"),
    }
    sharded.shutdown().await;
}
