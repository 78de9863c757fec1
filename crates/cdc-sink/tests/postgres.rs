//! The PostgreSQL sink under a processor, through the driver against mongo-sim and the
//! local PostgreSQL (`CDC_POSTGRES_URL`): the table equals the collection after inserts,
//! updates and deletes, the checkpoint is committed with the rows, and a batch delivered
//! again changes nothing. Under `CI=true` an unreachable PostgreSQL fails the test.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bson::doc;
use cdc_processor::{CheckpointPolicy, DocumentProcessor, FullDocument, stores::PostgresStore};
use cdc_sink::PostgresSink;

fn url() -> String {
    std::env::var("CDC_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn connect() -> Option<tokio_postgres::Client> {
    match tokio_postgres::connect(&url(), tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            Some(client)
        }
        Err(e) => {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "PostgreSQL is unreachable under CI=true: {e}"
            );
            eprintln!("SKIPPED: PostgreSQL unreachable ({e})");
            None
        }
    }
}

/// The table as `_id` → `v`.
async fn table(client: &tokio_postgres::Client, name: &str) -> BTreeMap<i64, i64> {
    client
        .query(&format!("SELECT doc FROM \"{name}\""), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let doc: serde_json::Value = r.get(0);
            (doc["_id"].as_i64().unwrap(), doc["v"].as_i64().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn the_table_equals_the_collection_and_the_checkpoint_commits_with_it() {
    let Some(check) = connect().await else { return };
    let Some(sink_client) = connect().await else {
        return;
    };
    let tag = format!(
        "{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let prefix = format!("sink_{tag}_");
    let store = Arc::new(
        PostgresStore::connect(&url(), &format!("sink_points_{tag}"))
            .await
            .unwrap(),
    );
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(sim.uri()).await.unwrap();
    let p = DocumentProcessor::builder()
        .source(
            cdc_processor::Watch::collection(client.clone(), "shop", "items")
                .full_document(FullDocument::UpdateLookup),
        )
        .store(store.clone())
        .handler_checkpoints(true)
        .checkpoint(CheckpointPolicy::batched(1000, Duration::from_secs(60)).unwrap())
        .build()
        .unwrap();
    let sink = Arc::new(
        PostgresSink::new(sink_client, prefix.clone())
            .checkpoint_with(store.clone(), p.stream_id()),
    );
    let task = {
        let (p, sink) = (p.clone(), Arc::clone(&sink));
        tokio::spawn(async move { p.start(cdc_processor::Batches::new(sink)).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while p.stats().checkpoints < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream never opened"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let coll = client
        .database("shop")
        .collection::<bson::Document>("items");
    for i in 0..30_i64 {
        coll.insert_one(doc! { "_id": i, "v": 0_i64 })
            .await
            .unwrap();
    }
    for i in (0..30_i64).step_by(3) {
        coll.update_one(doc! { "_id": i }, doc! { "$set": { "v": i } })
            .await
            .unwrap();
    }
    for i in (0..30_i64).step_by(5) {
        coll.delete_one(doc! { "_id": i }).await.unwrap();
    }
    let mut expected = BTreeMap::new();
    let mut cursor = coll.find(doc! {}).await.unwrap();
    while cursor.advance().await.unwrap() {
        let d = cursor.deserialize_current().unwrap();
        expected.insert(d.get_i64("_id").unwrap(), d.get_i64("v").unwrap());
    }
    let name = format!("{prefix}items");
    while check
        .query_opt("SELECT 1 FROM pg_tables WHERE tablename = $1", &[&name])
        .await
        .unwrap()
        .is_none()
        || table(&check, &name).await != expected
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the table never equalled the collection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The processor's own checkpoints are a minute apart; the point stored is the sink's,
    // committed with the rows: the last change's.
    let point = cdc_core::ResumeStore::load(&*store, p.stream_id())
        .await
        .unwrap()
        .unwrap();
    assert!(
        point.operation_type == Some(cdc_core::OperationType::Delete),
        "{point:?}"
    );
    p.stop();
    task.await.unwrap().unwrap();

    // A batch delivered again (after a crash between the commit and the acknowledgement)
    // changes nothing: rows only move forward in cluster time.
    let before = table(&check, &name).await;
    let stale = cdc_core::ChangeEvent::from_document(&doc! {
        "_id": { "_data": "8200000001" },
        "operationType": "insert",
        "clusterTime": bson::Timestamp { time: 1, increment: 1 },
        "ns": { "db": "shop", "coll": "items" },
        "documentKey": { "_id": 1_i64 },
        "fullDocument": { "_id": 1_i64, "v": 999_i64 },
    })
    .unwrap();
    sink.write_events([&stale]).await.unwrap();
    assert_eq!(
        table(&check, &name).await,
        before,
        "the checkpoint was past it"
    );
    // Without the checkpoint, the rows' own cluster times keep the newer versions.
    let plain = PostgresSink::new(connect().await.unwrap(), prefix.clone());
    plain.write_events([&stale]).await.unwrap();
    assert_eq!(table(&check, &name).await, before, "rows only move forward");
    // An update without its full document is refused, naming the setting.
    let bare = cdc_core::ChangeEvent::from_document(&doc! {
        "_id": { "_data": "8200000002" },
        "operationType": "update",
        "clusterTime": bson::Timestamp { time: 2, increment: 1 },
        "ns": { "db": "shop", "coll": "items" },
        "documentKey": { "_id": 2_i64 },
        "updateDescription": { "updatedFields": { "v": 1 }, "removedFields": [] },
    })
    .unwrap();
    let err = PostgresSink::new(connect().await.unwrap(), prefix.clone())
        .write_events([&bare])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("UpdateLookup"), "{err}");
    assert_eq!(err.kind(), cdc_sink::ErrorKind::Refused, "{err:?}");
    // A value PostgreSQL refuses (a NUL in JSONB text, 22P05) is the change's own
    // failure, not an outage: the kind says so, no text is read.
    let nul = cdc_core::ChangeEvent::from_document(&doc! {
        "_id": { "_data": "8200000003" },
        "operationType": "insert",
        "clusterTime": bson::Timestamp { time: 3, increment: 1 },
        "ns": { "db": "shop", "coll": "items" },
        "documentKey": { "_id": 3_i64 },
        "fullDocument": { "_id": 3_i64, "v": "a\u{0}b" },
    })
    .unwrap();
    let err = PostgresSink::new(connect().await.unwrap(), prefix.clone())
        .write_events([&nul])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), cdc_sink::ErrorKind::Refused, "{err:?}");
    assert!(matches!(err, cdc_sink::Error::Refused { .. }), "{err:?}");
    // Under a lease: the checkpoint is fenced, and once another instance holds the
    // stream nothing of a batch commits.
    use cdc_core::LeaseStore;
    let fenced_stream = format!("fenced-{tag}");
    let a = store
        .acquire(&fenced_stream, "a", Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    let fenced_sink = PostgresSink::new(connect().await.unwrap(), prefix.clone())
        .checkpoint_with(store.clone(), fenced_stream.clone());
    let event = |t: u32, v: i64| {
        cdc_core::ChangeEvent::from_document(&doc! {
            "_id": { "_data": format!("82{t:08X}00000001") },
            "operationType": "insert",
            "clusterTime": bson::Timestamp { time: t, increment: 1 },
            "ns": { "db": "shop", "coll": "fenced" },
            "documentKey": { "_id": 1_i64 },
            "fullDocument": { "_id": 1_i64, "v": v },
        })
        .unwrap()
    };
    fenced_sink
        .write_events_fenced(&a, [&event(10, 1)])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    store
        .acquire(&fenced_stream, "b", Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let err = fenced_sink
        .write_events_fenced(&a, [&event(11, 2)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no longer held"), "{err}");
    assert_eq!(err.kind(), cdc_sink::ErrorKind::Fenced, "{err:?}");
    let fenced_table = format!("{prefix}fenced");
    assert_eq!(
        table(&check, &fenced_table).await,
        BTreeMap::from([(1, 1)]),
        "nothing of the fenced batch committed"
    );
    check
        .batch_execute(&format!("DROP TABLE \"{fenced_table}\""))
        .await
        .unwrap();
    check
        .batch_execute(&format!(
            "DROP TABLE \"{name}\"; DROP TABLE {t}; DROP TABLE {t}_dead_letters; DROP TABLE {t}_leases",
            t = store.table()
        ))
        .await
        .unwrap();
    sim.shutdown().await;
}

/// With `updateLookup`, an update whose document was deleted before the lookup comes with
/// `fullDocument: null`: it changes nothing (its delete follows). Without the sink being
/// told so, such an update is an error (its document is unknown).
#[tokio::test]
async fn an_update_looked_up_after_a_delete_changes_nothing() {
    let Some(check) = connect().await else { return };
    let Some(sink_client) = connect().await else {
        return;
    };
    let Some(strict_client) = connect().await else {
        return;
    };
    let prefix = format!(
        "lookup_{}_{}_",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let event = |t: u32, op: &str, full: Option<bson::Bson>| {
        let mut d = doc! {
            "_id": { "_data": format!("82{t:08X}00000001") },
            "operationType": op,
            "clusterTime": bson::Timestamp { time: t, increment: 1 },
            "ns": { "db": "d", "coll": "c" },
            "documentKey": { "_id": 1_i64 },
        };
        if let Some(full) = full {
            d.insert("fullDocument", full);
        }
        cdc_core::ChangeEvent::from_document(&d).unwrap()
    };
    let insert = event(10, "insert", Some(doc! { "_id": 1_i64, "v": 1_i64 }.into()));
    let gone = event(11, "update", Some(bson::Bson::Null));
    let sink = PostgresSink::new(sink_client, prefix.clone()).update_lookup(true);
    sink.write_events([&insert, &gone]).await.unwrap();
    let name = format!("{prefix}c");
    assert_eq!(table(&check, &name).await, BTreeMap::from([(1, 1)]));
    let strict = PostgresSink::new(strict_client, prefix.clone());
    let err = strict.write_events([&gone]).await.unwrap_err();
    assert!(err.to_string().contains("no full document"), "{err}");
    // A missing field (the stream asked for no full documents) is an error either way.
    let bare = event(12, "update", None);
    assert!(sink.write_events([&bare]).await.is_err());
    check
        .batch_execute(&format!("DROP TABLE IF EXISTS \"{name}\""))
        .await
        .unwrap();
}
