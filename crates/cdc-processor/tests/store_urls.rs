//! Stores chosen at run time: `cdc_processor::stores::open(url)` for every scheme, against
//! the real Redis and PostgreSQL servers and mongo-sim (an unreachable one fails under
//! `CI=true`), with clear errors for what is wrong and no credential in any of them.
#![cfg(all(
    feature = "file",
    feature = "redis",
    feature = "postgres",
    feature = "mongodb"
))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bson::doc;
use cdc_core::{ClusterTime, DeadLetter, OperationType, ResumePoint};
use cdc_processor::{
    BoxError, ChangeEvent, DocumentProcessor, FnDispatcher, HandlerErrorPolicy, stores,
};

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

fn unreachable_backend(name: &str, why: &str) -> bool {
    assert!(
        !std::env::var("CI").is_ok_and(|v| v == "true"),
        "{name} is unreachable under CI=true: {why}"
    );
    eprintln!("SKIPPED {name}: unreachable ({why})");
    true
}

fn event(t: u32) -> ChangeEvent {
    ChangeEvent::from_document(&doc! {
        "_id": { "_data": format!("82{t:08X}") },
        "operationType": "insert",
        "clusterTime": bson::Timestamp { time: t, increment: 1 },
        "ns": { "db": "d", "coll": "c" },
        "documentKey": { "_id": 1 },
    })
    .unwrap()
}

/// A point and a dead letter go in and come back.
async fn round_trip(url: &str, what: &str) {
    let opened = match stores::open(url).await {
        Ok(s) => s,
        Err(e) if what == "redis" || what == "postgres" => {
            unreachable_backend(what, &e.to_string());
            return;
        }
        Err(e) => panic!("{what}: {e}"),
    };
    let stream = unique("url");
    let e = event(7);
    let point = ResumePoint::for_event(
        e.token.clone(),
        ClusterTime::new(7, 1),
        OperationType::Insert,
        bson::DateTime::from_millis(1),
    );
    opened.points.save(&stream, &point).await.unwrap();
    assert_eq!(
        opened.points.load(&stream).await.unwrap().unwrap().token,
        point.token,
        "{what}"
    );
    let letter = DeadLetter::new(&stream, &e, None, 1, false).unwrap();
    opened.dead_letters.record(&letter).await.unwrap();
    assert_eq!(
        opened.dead_letters.count(&stream).await.unwrap(),
        1,
        "{what}"
    );
    opened.points.delete(&stream).await.unwrap();
    opened
        .dead_letters
        .remove(&stream, &letter.id)
        .await
        .unwrap();
}

#[tokio::test]
async fn every_scheme_opens_a_store_for_points_and_dead_letters() {
    round_trip("memory:", "memory").await;
    let dir = std::env::temp_dir().join(unique("cdc-url-file"));
    round_trip(&format!("file:{}", dir.display()), "file").await;
    round_trip(&format!("file://{}", dir.display()), "file").await;
    let _ = std::fs::remove_dir_all(&dir);
    round_trip(
        &format!("redis://127.0.0.1:6379/0?prefix={}:", unique("cdc-url")),
        "redis",
    )
    .await;
    let table = unique("cdc_url");
    round_trip(
        &format!("postgres://postgres@127.0.0.1:5432/test?table={table}"),
        "postgres",
    )
    .await;
    if let Ok((client, conn)) = tokio_postgres::connect(
        "postgres://postgres@127.0.0.1:5432/test",
        tokio_postgres::NoTls,
    )
    .await
    {
        tokio::spawn(conn);
        let _ = client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_dead_letters"
            ))
            .await;
    }
    let deployment = mongo_sim::TestDeployment::start().await.unwrap();
    let base = deployment.uri();
    let (host, query) = base.split_once('?').unwrap_or((&base, ""));
    let host = host.trim_end_matches('/');
    round_trip(
        &format!("{host}/url_store?{query}&collection=points"),
        "mongodb",
    )
    .await;
    deployment.shutdown().await;
}

#[tokio::test]
async fn bad_urls_are_named_and_never_show_a_password() {
    let err = stores::open("ftp://h/x").await.unwrap_err();
    assert!(
        err.to_string().contains("unknown scheme \"ftp\"")
            && err.to_string().contains("postgres://"),
        "{err}"
    );
    let err = stores::open("file:").await.unwrap_err();
    assert!(err.to_string().contains("needs a directory"), "{err}");
    let err = stores::open("postgres://u:hunter2@127.0.0.1:1/test?connect_timeout=1")
        .await
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(
        text.contains("127.0.0.1:1") || text.contains("u:***@"),
        "{text}"
    );
    let err = stores::open("postgres://u@h/db?table=no%ZZ")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("`table`"), "{err}");
    let err = stores::open("mongodb://u:hunter2@127.0.0.1:1/?serverSelectionTimeoutMS=200")
        .await
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains("hunter2"), "{text}");
}

/// A deployment stream with the MongoDB store (opened by URL) in the same deployment
/// sees none of the store's writes: neither checkpoints nor dead letters.
#[tokio::test]
async fn a_deployment_stream_sees_none_of_its_stores_writes() {
    let deployment = mongo_sim::TestDeployment::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(deployment.uri())
        .await
        .unwrap();
    let db = unique("own_writes");
    let base = deployment.uri();
    let (host, query) = base.split_once('?').unwrap_or((&base, ""));
    let url = format!(
        "{}/{db}_state?{query}&collection=points",
        host.trim_end_matches('/')
    );
    let opened = stores::open(&url).await.unwrap();
    let p = DocumentProcessor::builder()
        .source(cdc_processor::Watch::deployment(client.clone()))
        .stream_id(unique("everything"))
        .store(
            cdc_processor::Storage::new(opened.points.clone())
                .dead_letters(opened.dead_letters.clone()),
        )
        .on_handler_error(HandlerErrorPolicy::dead_letter().retries(0))
        .checkpoint(cdc_core::CheckpointPolicy::every_event())
        .build()
        .unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s2 = Arc::clone(&seen);
    let handler = FnDispatcher(move |e: &ChangeEvent, _: Option<BoxError>| {
        let ns = e.ns.as_ref().map(ToString::to_string).unwrap_or_default();
        s2.lock().unwrap().push(ns);
        if e.document_id() == Some(bson::Bson::Int32(3)) {
            return Err("poison".into());
        }
        Ok(())
    });
    let p2 = p.clone();
    let task = tokio::spawn(async move { p2.start(handler).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let items = client.database(&db).collection::<bson::Document>("items");
    for i in 0..6 {
        items.insert_one(doc! { "_id": i }).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while p.stats().dead_letters < 1 || p.stats().events < 5 {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", p.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.stop();
    task.await.unwrap().unwrap();
    let state = format!("{db}_state.");
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|ns| ns.starts_with(&state)),
        "the stores' own writes came back: {seen:?}"
    );
    assert_eq!(p.dead_letter_count().await.unwrap(), 1);
    deployment.shutdown().await;
}

/// A store on a wrong port: `start` fails with an error that says which store, where,
/// and why (the client's own message), and no password.
#[tokio::test]
async fn a_store_on_a_wrong_port_says_where_and_why() {
    let deployment = mongo_sim::TestDeployment::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(deployment.uri())
        .await
        .unwrap();
    // Redis connects at the first call: the processor's start reports it.
    let opened = stores::open("redis://:hunter2@127.0.0.1:1/0")
        .await
        .unwrap();
    let p = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            client.clone(),
            "wrong_port",
            "orders",
        ))
        .store(opened.points)
        .build()
        .unwrap();
    let mut published = p.on_start_err();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        p.start(FnDispatcher(
            |_: &ChangeEvent, _: Option<BoxError>| -> Result<(), BoxError> { Ok(()) },
        )),
    )
    .await
    .unwrap()
    .unwrap_err();
    for text in [
        err.to_string(),
        published.recv().await.unwrap().to_string(),
        p.stats().last_error.unwrap(),
    ] {
        assert!(
            text.contains("resume store failed for stream `wrong_port.orders`"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }
    assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("redis://:***@127.0.0.1:1/0"), "{text}");
    assert!(text.to_lowercase().contains("refused"), "{text}");
    // PostgreSQL connects when opened: the error says where and why.
    let err = stores::open("postgres://u:hunter2@127.0.0.1:1/test?connect_timeout=2")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("postgres://u:***@127.0.0.1:1/test"), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
    deployment.shutdown().await;
}
