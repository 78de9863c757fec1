//! One conformance suite for the dead letters of every store backend. Redis and PostgreSQL
//! come from `CDC_REDIS_URL` and `CDC_POSTGRES_URL` (defaults: the local servers); MongoDB
//! from a fresh mongo-sim. When `CI=true` an unreachable backend fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{postgres_url, redis_url, unique, unreachable_backend};

use std::sync::Arc;

use bson::{Binary, Decimal128, doc, spec::BinarySubtype};
use cdc_core::{ChangeEvent, DeadLetter, DeadLetterStore, ErrorKind, ResumeStore};
use cdc_resume::{FileStore, MemoryStore, MongoStore, PostgresStore, RedisStore};

/// An event whose bytes hold many BSON types (so byte-exactness is really tested), at
/// cluster time `t`, with the token `_data` `data`.
fn event(t: u32, data: &str, key: i32) -> ChangeEvent {
    ChangeEvent::from_document(&doc! {
        "_id": { "_data": data, "_typeBits": Binary { subtype: BinarySubtype::Generic, bytes: vec![0x40, 7] } },
        "operationType": "update",
        "clusterTime": bson::Timestamp { time: t, increment: 3 },
        "wallTime": bson::DateTime::from_millis(1_700_000_000_123),
        "ns": { "db": "shop", "coll": "orders" },
        "documentKey": { "_id": key },
        "fullDocument": {
            "_id": key, "price": Decimal128::from_bytes([7; 16]), "f": -0.0_f64,
            "bin": Binary { subtype: BinarySubtype::UserDefined(0x80), bytes: vec![0, 1, 255] },
            "nested": { "a": [1_i64, "two", null, { "b": true }] }, "ünï": "cödé \u{1F600}",
        },
        "updateDescription": { "updatedFields": { "price": 1 }, "removedFields": [] },
    })
    .unwrap()
}

fn letter(stream: &str, e: &ChangeEvent, why: &str, attempts: u32, parked: bool) -> DeadLetter {
    let error = std::io::Error::other(why.to_owned());
    DeadLetter::new(
        stream,
        e,
        (!parked).then_some(&error as _),
        attempts,
        parked,
    )
    .unwrap()
}

async fn suite(name: &str, store: Arc<dyn DeadLetterStore>) {
    let s1 = unique(&format!("{name}-dl-one"));
    let s2 = unique(&format!("{name}-dl-two"));

    // Nothing yet, and that is not an error.
    assert_eq!(store.count(&s1).await.unwrap(), 0, "{name}");
    assert!(store.list(&s1, 10).await.unwrap().is_empty(), "{name}");
    assert!(!store.remove(&s1, "nope").await.unwrap(), "{name}");

    // Recorded out of order; listed in stream order (cluster time, then id).
    let events = [
        event(30, "8200000030", 3),
        event(10, "8200000010", 1),
        event(20, "820000002B", 2),
        event(20, "820000002A", 2),
    ];
    let letters: Vec<DeadLetter> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            letter(
                &s1,
                e,
                &format!("boom {i}"),
                if i == 3 { 0 } else { 5 },
                i == 3,
            )
        })
        .collect();
    for l in &letters {
        store.record(l).await.unwrap();
    }
    assert_eq!(store.count(&s1).await.unwrap(), 4, "{name}");
    let listed = store.list(&s1, 10).await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(
        ids,
        ["8200000010", "820000002A", "820000002B", "8200000030"],
        "{name}: stream order"
    );
    // Every field round-trips; the bytes exactly.
    for got in &listed {
        let sent = letters.iter().find(|l| l.id == got.id).unwrap();
        assert_eq!(got, sent, "{name}: letter {}", got.id);
        assert_eq!(got.event, sent.event, "{name}: event bytes");
        assert_eq!(
            got.token.as_bytes(),
            sent.token.as_bytes(),
            "{name}: token bytes"
        );
        let back = got.decode().unwrap();
        assert_eq!(back.raw().unwrap().as_bytes(), sent.event.as_slice());
    }
    assert!(listed[1].parked && listed[1].errors.is_empty() && listed[1].attempts == 0);
    assert_eq!(listed[0].errors, ["boom 1"]);

    // The same event recorded again (a crash before the checkpoint): one letter, the first.
    let again = letter(&s1, &events[0], "a later failure", 9, false);
    store.record(&again).await.unwrap();
    assert_eq!(store.count(&s1).await.unwrap(), 4, "{name}: idempotent");
    let kept = store.list(&s1, 10).await.unwrap();
    assert_eq!(
        kept.last().unwrap().errors,
        ["boom 0"],
        "{name}: first kept"
    );

    // A limit takes the oldest.
    let two = store.list(&s1, 2).await.unwrap();
    assert_eq!(two.len(), 2);
    assert_eq!(two[0].id, "8200000010");
    assert_eq!(two[1].id, "820000002A");

    // Streams are isolated.
    assert_eq!(store.count(&s2).await.unwrap(), 0, "{name}: isolation");
    store
        .record(&letter(&s2, &events[0], "other", 1, false))
        .await
        .unwrap();
    assert_eq!(store.count(&s2).await.unwrap(), 1);
    assert_eq!(store.count(&s1).await.unwrap(), 4);

    // Removal: once, and the rest keep their order.
    assert!(store.remove(&s1, "820000002A").await.unwrap(), "{name}");
    assert!(
        !store.remove(&s1, "820000002A").await.unwrap(),
        "{name}: twice"
    );
    let rest: Vec<String> = store
        .list(&s1, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(rest, ["8200000010", "820000002B", "8200000030"], "{name}");
    assert_eq!(
        store.count(&s2).await.unwrap(),
        1,
        "{name}: other stream kept"
    );

    // Concurrent records: distinct ids all land; one id lands once.
    let s3 = unique(&format!("{name}-dl-three"));
    let mut tasks = Vec::new();
    for i in 0..16_u32 {
        let store = Arc::clone(&store);
        let s3 = s3.clone();
        tasks.push(tokio::spawn(async move {
            let e = event(100 + i, &format!("82{:08X}", 100 + i), 9);
            store.record(&letter(&s3, &e, "x", 1, false)).await.unwrap();
            let same = event(99, "8200000099", 9);
            store
                .record(&letter(&s3, &same, "y", 1, false))
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.count(&s3).await.unwrap(), 17, "{name}: concurrent");

    // Bad stream ids are refused with a typed error.
    let err = store.count("").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Fatal, "{name}: {err}");
}

/// A failing store is an error, never "no letters": `kind` is [`ErrorKind::Store`] for a
/// server away, [`ErrorKind::Persistent`] for a file store whose directory became a file.
async fn failing(name: &str, store: &dyn DeadLetterStore, kind: ErrorKind) {
    let e = event(1, "8200000001", 1);
    let err = store
        .record(&letter("s", &e, "x", 1, false))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), kind, "{name}: {err}");
    assert!(store.list("s", 1).await.is_err(), "{name}");
    assert!(store.count("s").await.is_err(), "{name}");
}

#[tokio::test]
async fn memory_dead_letters() {
    suite("memory", Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn file_dead_letters() {
    let root = std::env::temp_dir().join(unique("cdc-file-dl"));
    let store = Arc::new(FileStore::new(&root).unwrap());
    suite("file", store.clone()).await;

    // A crash in the middle of an append leaves a torn last line: it was never recorded
    // (record had not returned), so it is left out, and the next record repairs the file.
    let stream = "torn";
    let e1 = event(1, "8200000001", 1);
    store
        .record(&letter(stream, &e1, "x", 1, false))
        .await
        .unwrap();
    let path = store.dead_letters_path(stream);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(br#"{"version":1,"stream":"torn","id":"82"#);
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(store.count(stream).await.unwrap(), 1);
    let e2 = event(2, "8200000002", 1);
    store
        .record(&letter(stream, &e2, "y", 1, false))
        .await
        .unwrap();
    assert_eq!(store.count(stream).await.unwrap(), 2);
    // A damaged line in the middle is an error naming the file, never a silent loss.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{{oops\n{text}")).unwrap();
    let err = store.list(stream, 10).await.unwrap_err();
    assert!(err.to_string().contains("dead-letters.jsonl"), "{err}");
    // Dead-letter files are not streams with points.
    assert!(
        !store
            .list_streams()
            .await
            .unwrap()
            .iter()
            .any(|s| s.contains("dead"))
    );

    // Two processes recording into one directory: each reads what the other appended
    // (a letter is recorded once), and a removal by one (the file replaced, or deleted
    // and created again) is seen by the other, which then records the letter again.
    let (a, b) = (
        FileStore::new(&root).unwrap(),
        FileStore::new(&root).unwrap(),
    );
    let stream = "shared";
    let l: Vec<DeadLetter> = (1..=3)
        .map(|t| {
            letter(
                stream,
                &event(t, &format!("820000000{t}"), 1),
                "z",
                1,
                false,
            )
        })
        .collect();
    a.record(&l[0]).await.unwrap();
    b.record(&l[1]).await.unwrap();
    a.record(&l[1]).await.unwrap();
    b.record(&l[0]).await.unwrap();
    assert_eq!(a.count(stream).await.unwrap(), 2);
    assert!(b.remove(stream, &l[1].id).await.unwrap());
    a.record(&l[2]).await.unwrap();
    a.record(&l[1]).await.unwrap();
    assert_eq!(a.count(stream).await.unwrap(), 3);
    for x in &l {
        assert!(b.remove(stream, &x.id).await.unwrap());
    }
    assert!(!store.dead_letters_path(stream).exists());
    a.record(&l[0]).await.unwrap();
    b.record(&l[2]).await.unwrap();
    a.record(&l[2]).await.unwrap();
    let ids: Vec<String> = b
        .list(stream, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(ids, [l[0].id.clone(), l[2].id.clone()]);

    let broken = root.join("broken");
    let failing_store = FileStore::new(&broken).unwrap();
    std::fs::remove_dir(&broken).unwrap();
    std::fs::write(&broken, b"not a directory").unwrap();
    failing("file", &failing_store, ErrorKind::Persistent).await;
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn mongodb_dead_letters() {
    let deployment = mongo_sim::TestDeployment::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(deployment.uri())
        .await
        .unwrap();
    let db = unique("dl").replace('-', "_");
    let store = Arc::new(MongoStore::new(&client, &db, "points"));
    suite("mongodb", store.clone()).await;
    let ns = DeadLetterStore::namespace(&*store).unwrap();
    assert_eq!(ns.to_string(), format!("{db}.points_dead_letters"));
    let dead = mongodb::Client::with_uri_str(
        "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300&connectTimeoutMS=300",
    )
    .await
    .unwrap();
    failing(
        "mongodb",
        &MongoStore::new(&dead, "x", "points"),
        ErrorKind::Store,
    )
    .await;
    let _ = client.database(&db).drop().await;
    deployment.shutdown().await;
}

#[tokio::test]
async fn redis_dead_letters() {
    let url = redis_url();
    let store = Arc::new(RedisStore::new(&url, format!("{}:", unique("cdc-dl"))).unwrap());
    if let Err(e) = store.list_streams().await {
        return unreachable_backend("dead letters", "redis", &e.to_string());
    }
    suite("redis", store.clone()).await;
    // The dead-letter keys are not streams with points.
    assert!(store.list_streams().await.unwrap().is_empty());
    failing(
        "redis",
        &RedisStore::new("redis://127.0.0.1:1", "x:").unwrap(),
        ErrorKind::Store,
    )
    .await;
}

#[tokio::test]
async fn postgres_dead_letters() {
    let url = postgres_url();
    let table = unique("cdc_dl").replace('-', "_");
    let store = match PostgresStore::connect(&url, &table).await {
        Ok(s) => Arc::new(s),
        Err(e) => return unreachable_backend("dead letters", "postgres", &e.to_string()),
    };
    suite("postgres", store.clone()).await;
    let long = "t".repeat(55);
    let err = PostgresStore::connect(&url, &long).await.unwrap_err();
    assert!(err.to_string().contains("dead-letter table"), "{err}");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "DROP TABLE {table}; DROP TABLE {}",
            store.dead_letters_table()
        ))
        .await
        .unwrap();
}
