//! The NATS JetStream sink under a processor, through the driver against mongo-sim and the
//! local NATS server (`CDC_NATS_URL`, default `nats://127.0.0.1:4222`): every change
//! arrives once with its headers and id, a batch published again is dropped as duplicates,
//! and a missing stream is an error unless the sink may create it. Under `CI=true` an
//! unreachable NATS fails the test.
#![cfg(feature = "nats")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, consumer::pull};
use bson::doc;
use cdc_processor::{ChangeEvent, DocumentProcessor, stores::MemoryStore};
use cdc_sink::{Body, NatsSink, SubjectTemplate, async_nats};
use futures_util::StreamExt;

fn url() -> String {
    std::env::var("CDC_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn connect() -> Option<async_nats::Client> {
    match async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(url())
        .await
    {
        Ok(client) => Some(client),
        Err(e) => {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "NATS is unreachable under CI=true: {e}"
            );
            eprintln!("SKIPPED: NATS unreachable ({e})");
            None
        }
    }
}

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

/// Every message of JetStream stream `name`, in order.
async fn messages(js: &jetstream::Context, name: &str) -> Vec<jetstream::Message> {
    let stream = js.get_stream(name).await.unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut out = Vec::new();
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_millis(300))
            .messages()
            .await
            .unwrap();
        let before = out.len();
        while let Some(m) = batch.next().await {
            out.push(m.unwrap());
        }
        if out.len() == before {
            return out;
        }
    }
}

#[tokio::test]
async fn every_change_once_with_headers_and_a_repeat_is_dropped() {
    let Some(nats) = connect().await else { return };
    let tag = tag();
    let name = format!("CDC_TEST_{tag}");
    let prefix = format!("t{tag}");
    let js = jetstream::new(nats.clone());
    let sink = Arc::new(
        NatsSink::new(nats.clone(), "s1")
            .subject(SubjectTemplate::parse(&format!("{prefix}.{{db}}.{{coll}}.{{op}}")).unwrap())
            .window(8),
    );
    // A stream that does not exist is an error naming it, unless the sink may create it.
    let err = sink
        .ensure_stream(&name, false, Duration::from_secs(120))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&name), "{err}");
    let window = sink
        .ensure_stream(&name, true, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(window, Duration::from_secs(120));

    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(sim.uri()).await.unwrap();
    let p = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            client.clone(),
            "shop",
            "items",
        ))
        .store(Arc::new(MemoryStore::new()))
        .stream_id("s1")
        .build()
        .unwrap();
    let task = {
        let (p, sink) = (p.clone(), Arc::clone(&sink));
        tokio::spawn(async move {
            p.start(cdc_processor::Batches::new(sink).max_events(7))
                .await
        })
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
    for i in 0..40_i64 {
        coll.insert_one(doc! { "_id": i, "v": 0_i64 })
            .await
            .unwrap();
    }
    coll.update_one(doc! { "_id": 3 }, doc! { "$set": { "v": 1 } })
        .await
        .unwrap();
    coll.delete_one(doc! { "_id": 4 }).await.unwrap();
    while sink.counters().stored < 42 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            sink.counters()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.stop();
    task.await.unwrap().unwrap();

    let got = messages(&js, &name).await;
    assert_eq!(got.len(), 42, "every change exactly once");
    let first = &got[0];
    assert_eq!(
        first.subject.as_str(),
        format!("{prefix}.shop.items.insert")
    );
    let headers = first.headers.as_ref().unwrap();
    assert_eq!(headers.get("Cdc-Operation").unwrap().as_str(), "insert");
    assert_eq!(headers.get("Cdc-Namespace").unwrap().as_str(), "shop.items");
    assert_eq!(
        headers.get("Cdc-Document-Key").unwrap().as_str(),
        r#"{"_id":0}"#
    );
    let ct = headers.get("Cdc-Cluster-Time").unwrap().as_str().to_owned();
    assert!(
        ct.split_once('.')
            .is_some_and(|(t, _)| t.parse::<u32>().unwrap() > 0),
        "{ct}"
    );
    let body: serde_json::Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(
        body["fullDocument"],
        serde_json::json!({ "_id": 0, "v": 0 })
    );
    let id = headers.get("Nats-Msg-Id").unwrap().as_str();
    assert_eq!(id, format!("s1:{}", body["_id"]["_data"].as_str().unwrap()));
    assert_eq!(
        got.last().unwrap().subject.as_str(),
        format!("{prefix}.shop.items.delete")
    );

    // The same changes published again (a restart from an older point): all duplicates.
    let events: Vec<ChangeEvent> = got
        .iter()
        .map(|m| {
            let json: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            let bson = bson::Bson::try_from(json).unwrap();
            ChangeEvent::from_document(bson.as_document().unwrap()).unwrap()
        })
        .collect();
    let refs: Vec<&ChangeEvent> = events.iter().collect();
    sink.publish_events(&refs).await.unwrap();
    assert_eq!(sink.counters().duplicates, 42, "{:?}", sink.counters());
    assert_eq!(messages(&js, &name).await.len(), 42);

    // Raw BSON bodies carry the event's bytes.
    let bson_sink = NatsSink::new(nats.clone(), "s2")
        .subject(SubjectTemplate::parse(&format!("{prefix}.{{db}}.{{coll}}.{{op}}")).unwrap())
        .body(Body::Bson);
    bson_sink.publish_events(&refs[..1]).await.unwrap();
    let got = messages(&js, &name).await;
    let raw = bson::RawDocument::from_bytes(&got.last().unwrap().payload).unwrap();
    assert_eq!(raw.get_str("operationType").unwrap(), "insert");

    js.delete_stream(&name).await.unwrap();
}

#[tokio::test]
async fn a_publish_nobody_stores_fails_the_batch() {
    let Some(nats) = connect().await else { return };
    // No stream takes these subjects: JetStream answers "no responders", and the batch
    // fails instead of being acknowledged.
    let sink = NatsSink::new(nats, "s1")
        .subject(SubjectTemplate::parse(&format!("nostream{}.{{op}}", tag())).unwrap());
    let event = ChangeEvent::from_document(&doc! {
        "_id": { "_data": "82AB" },
        "operationType": "insert",
        "clusterTime": bson::Timestamp { time: 1, increment: 1 },
        "ns": { "db": "d", "coll": "c" },
        "documentKey": { "_id": 1 },
        "fullDocument": { "_id": 1 },
    })
    .unwrap();
    let err = sink.publish_events(&[&event]).await.unwrap_err();
    assert!(err.to_string().contains("JetStream"), "{err}");
    assert_eq!(sink.counters().stored, 0);
}

/// A change too large for NATS (over the server's payload limit) is the change's own
/// failure, not an outage: the handler-error policy takes it (here into the dead letters)
/// and the changes after it are published.
#[tokio::test]
async fn a_change_over_the_payload_limit_is_dead_lettered_not_waited_on() {
    let Some(nats) = connect().await else { return };
    let tag = tag();
    let name = format!("CDC_BIG_{tag}");
    let js = jetstream::new(nats.clone());
    let sink = Arc::new(
        NatsSink::new(nats.clone(), "big")
            .subject(SubjectTemplate::parse(&format!("big{tag}.{{op}}")).unwrap()),
    );
    sink.ensure_stream(&name, true, Duration::from_secs(60))
        .await
        .unwrap();
    let limit = nats.server_info().max_payload;
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(sim.uri()).await.unwrap();
    let store = Arc::new(MemoryStore::new());
    let p = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            client.clone(),
            "shop",
            "big",
        ))
        .store(cdc_processor::Storage::new(store.clone()).dead_letters(store))
        .on_handler_error(cdc_processor::HandlerErrorPolicy::dead_letter().retries(0))
        .build()
        .unwrap();
    let task = {
        let (p, sink) = (p.clone(), Arc::clone(&sink));
        tokio::spawn(async move { p.start(cdc_processor::Batches::new(sink)).await })
    };
    while !p.stats().stream_open {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let coll = client.database("shop").collection::<bson::Document>("big");
    coll.insert_one(doc! { "_id": 1, "pad": "x".repeat(limit + 1024) })
        .await
        .unwrap();
    coll.insert_one(doc! { "_id": 2 }).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sink.counters().stored < 1 || p.stats().dead_letters < 1 {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", p.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.stop();
    task.await.unwrap().unwrap();
    let letters = p.dead_letters(10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].errors.iter().any(|e| e.contains("payload")),
        "{:?}",
        letters[0].errors
    );
    let got = messages(&js, &name).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].subject.as_str(), format!("big{tag}.insert"));
    js.delete_stream(&name).await.unwrap();
}

fn change(op: &str, key: Option<i32>, n: u32) -> ChangeEvent {
    let mut d = doc! {
        "_id": { "_data": format!("82{n:08X}0000") },
        "operationType": op,
        "clusterTime": bson::Timestamp { time: n, increment: 1 },
        "ns": { "db": "shop", "coll": "items" },
    };
    if let Some(k) = key {
        d.insert("documentKey", doc! { "_id": k });
        d.insert("fullDocument", doc! { "_id": k, "v": n });
    }
    ChangeEvent::from_document(&d).unwrap()
}

/// With `coalesce`, a batch's several changes of one document are one message: the last
/// change (its id, body and time), with the operations it stands for in headers; the
/// changes of other documents, and a drop between them, are kept in order.
#[tokio::test]
async fn coalescing_publishes_each_documents_last_change_with_what_it_stands_for() {
    let Some(nats) = connect().await else { return };
    let tag = tag();
    let name = format!("CDC_TEST_{tag}");
    let prefix = format!("t{tag}");
    let js = jetstream::new(nats.clone());
    let sink = NatsSink::new(nats.clone(), "s1")
        .subject(SubjectTemplate::parse(&format!("{prefix}.{{db}}.{{coll}}.{{op}}")).unwrap())
        .coalesce(true);
    sink.ensure_stream(&name, true, Duration::from_secs(120))
        .await
        .unwrap();
    let events = [
        change("insert", Some(1), 1),
        change("update", Some(1), 2),
        change("insert", Some(2), 3),
        change("update", Some(1), 4),
        change("drop", None, 5),
        change("insert", Some(1), 6),
    ];
    let refs: Vec<&ChangeEvent> = events.iter().collect();
    sink.publish_events(&refs).await.unwrap();
    let got = messages(&js, &name).await;
    let shown: Vec<(String, Option<String>, Option<String>)> = got
        .iter()
        .map(|m| {
            let h = m.headers.as_ref().unwrap();
            let get = |k: &str| h.get(k).map(|v| v.as_str().to_owned());
            (
                get("Cdc-Cluster-Time").unwrap(),
                get("Cdc-Coalesced"),
                get("Cdc-Coalesced-Operations"),
            )
        })
        .collect();
    assert_eq!(
        shown,
        vec![
            ("3.1".to_owned(), None, None),
            (
                "4.1".to_owned(),
                Some("3".to_owned()),
                Some("insert,update,update".to_owned())
            ),
            ("5.1".to_owned(), None, None),
            ("6.1".to_owned(), None, None),
        ]
    );
    let body: serde_json::Value = serde_json::from_slice(&got[1].payload).unwrap();
    assert_eq!(body["fullDocument"]["v"], 4, "the last change's body");
    assert_eq!(sink.counters().coalesced, 2);
    assert_eq!(sink.counters().stored, 4);
    js.delete_stream(&name).await.unwrap();
}

/// A change over the server's payload limit goes into the object store: the message keeps
/// its id and headers and names the object, which holds exactly the body the message
/// would have had. Published again after a failure between the object and the message
/// (a kill there), the object is found, not stored twice, and the message is stored once.
#[tokio::test]
async fn an_oversized_change_arrives_through_the_object_store_once() {
    let Some(nats) = connect().await else { return };
    let tag = tag();
    let name = format!("CDC_TEST_{tag}");
    let bucket = format!("cdc_obj_{tag}");
    let prefix = format!("t{tag}");
    let js = jetstream::new(nats.clone());
    let subject = |p: &str| SubjectTemplate::parse(&format!("{p}.{{db}}.{{coll}}.{{op}}")).unwrap();
    let sink = NatsSink::new(nats.clone(), "s1").subject(subject(&prefix));
    sink.ensure_stream(&name, true, Duration::from_secs(120))
        .await
        .unwrap();
    let Err(err) = sink.ensure_object_store(&bucket, false).await else {
        panic!("a missing bucket was found");
    };
    assert!(err.to_string().contains("create_object_store"), "{err}");
    let store = sink.ensure_object_store(&bucket, true).await.unwrap();
    let limit = nats.server_info().max_payload;
    // 20 MiB of document: twenty times the usual limit.
    let big = {
        let d = doc! {
            "_id": { "_data": "82000000010000" },
            "operationType": "insert",
            "clusterTime": bson::Timestamp { time: 1, increment: 1 },
            "ns": { "db": "shop", "coll": "items" },
            "documentKey": { "_id": 1 },
            "fullDocument": { "_id": 1, "blob": "x".repeat(20 << 20) },
        };
        ChangeEvent::from_document(&d).unwrap()
    };
    let small = change("insert", Some(2), 2);
    let expected = serde_json::to_vec(&cdc_core::support::to_relaxed_json(bson::Bson::Document(
        bson::Document::try_from(big.raw().unwrap()).unwrap(),
    )))
    .unwrap();
    assert!(expected.len() > 20 * limit.max(1 << 20) / 2);

    // First attempt: the object is stored, the message goes nowhere (no stream takes
    // this subject): the batch fails, as a kill between the two would leave it.
    let lost = NatsSink::new(nats.clone(), "s1")
        .subject(subject(&format!("nowhere{tag}")))
        .ack_timeout(Duration::from_secs(1))
        .object_store(&bucket, store.clone());
    assert!(lost.publish_events(&[&big]).await.is_err());
    assert_eq!(lost.counters().objects, 1);
    let object = cdc_sink::object_name(&cdc_sink::message_id("s1", &big));
    let first = store.info(&object).await.unwrap();

    // Published again, twice: the object is found; the message is stored once.
    let sink = sink.object_store(&bucket, store.clone());
    sink.publish_events(&[&big, &small]).await.unwrap();
    sink.publish_events(&[&big, &small]).await.unwrap();
    assert_eq!(sink.counters().objects, 0, "no object stored twice");
    assert_eq!(sink.counters().stored, 2);
    assert_eq!(sink.counters().duplicates, 2);
    assert_eq!(store.info(&object).await.unwrap().nuid, first.nuid);

    let got = messages(&js, &name).await;
    assert_eq!(got.len(), 2);
    let h = got[0].headers.as_ref().unwrap();
    let get = |k: &str| h.get(k).map(|v| v.as_str().to_owned());
    assert_eq!(
        get("Nats-Msg-Id").unwrap(),
        cdc_sink::message_id("s1", &big)
    );
    assert_eq!(get("Cdc-Operation").unwrap(), "insert");
    assert_eq!(get("Cdc-Object-Bucket").unwrap(), bucket);
    assert_eq!(get("Cdc-Object-Name").unwrap(), object);
    assert_eq!(get("Cdc-Object-Size").unwrap(), expected.len().to_string());
    assert!(get("Cdc-Object-Digest").unwrap().starts_with("SHA-256="));
    let reference: serde_json::Value = serde_json::from_slice(&got[0].payload).unwrap();
    assert_eq!(reference["$cdcObject"]["name"], object.as_str());
    assert!(got[0].payload.len() < 1024, "a reference, not the body");
    // A reader fetches the object: exactly the body the message would have had.
    let mut fetched = Vec::new();
    let mut reader = store.get(&object).await.unwrap();
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut fetched)
        .await
        .unwrap();
    assert!(
        fetched == expected,
        "the object's bytes differ from the change's"
    );
    // The small change went as itself.
    assert!(
        got[1]
            .headers
            .as_ref()
            .unwrap()
            .get("Cdc-Object-Name")
            .is_none()
    );
    js.delete_stream(&name).await.unwrap();
    js.delete_object_store(&bucket).await.unwrap();
}
