//! A split event through the processor: handled once, whole, and the checkpoint lands
//! after its last fragment, never between fragments.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bson::{Bson, Document, doc};
use cdc_core::{OperationType, ResumeStore};
use cdc_mongo::{BeforeChange, FullDocument};
use cdc_processor::{
    BoxError, ChangeEvent, DocumentProcessor, FnDispatcher, SourceOptions, stores::MemoryStore,
};
use mongo_sim::TestDeployment;

/// What the handler saw of one event: operation, document id, size, token.
type Handled = (OperationType, Bson, usize, cdc_core::ResumeToken);

fn big(c: char) -> String {
    std::iter::repeat_n(c, 12 * 1024 * 1024).collect()
}

#[tokio::test]
async fn a_split_event_is_handled_whole_and_checkpointed_after_its_last_fragment() {
    let deployment = TestDeployment::start().await.unwrap();
    let client = cdc_processor::connect(&deployment.uri(), Duration::from_secs(10))
        .await
        .unwrap();
    let db = client.database("p_split_events");
    let _ = db.drop().await;
    db.create_collection("c").await.unwrap();
    cdc_mongo::enable_pre_post_images(&db, "c").await.unwrap();
    let coll = db.collection::<Document>("c");
    coll.insert_one(doc! { "_id": 1, "a": big('x') })
        .await
        .unwrap();
    let head = coll.watch().await.unwrap().resume_token().unwrap();

    let store = Arc::new(MemoryStore::new());
    let p = DocumentProcessor::builder()
        .source(
            cdc_processor::Watch::collection(client.clone(), "p_split_events", "c").options(
                SourceOptions::default()
                    .full_document(FullDocument::Required)
                    .before_change(BeforeChange::Required)
                    .split_large_events(true)
                    .batch_size(1),
            ),
        )
        .stream_id("split")
        .store(store.clone())
        .build()
        .unwrap();
    let seen: Arc<Mutex<Vec<Handled>>> = Arc::default();
    let stop = p.stop_handle();
    let record = Arc::clone(&seen);
    let handler = FnDispatcher(move |e: &ChangeEvent, prev: Option<BoxError>| {
        if let Some(prev) = prev {
            return Err(prev);
        }
        let size = e.raw().map_or(0, |r| r.as_bytes().len());
        let post = e
            .full_document()
            .map(|d| d.get_str("a").map(str::len).unwrap_or(0));
        assert!(e.operation_type != OperationType::Update || post == Some(12 * 1024 * 1024));
        record.lock().unwrap().push((
            e.operation_type.clone(),
            e.document_id().unwrap_or(Bson::Null),
            size,
            e.token.clone(),
        ));
        if e.operation_type == OperationType::Update {
            stop.stop();
        }
        Ok(())
    });
    let runner = p.clone();
    let task = tokio::spawn(async move { runner.start(handler).await });
    let opened = p.clone();
    tokio::time::timeout(Duration::from_secs(20), async move {
        while opened.stats().checkpoints < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "a": big('y') } })
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        1,
        "one event, handled once: {:?}",
        seen.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    let (op, id, size, token) = &seen[0];
    assert_eq!((op, id), (&OperationType::Update, &Bson::Int32(1)));
    assert!(
        *size > 3 * 12 * 1024 * 1024,
        "both images and the update description"
    );
    // The final checkpoint is the event's token: its last fragment's.
    let saved = store.load("split").await.unwrap().unwrap();
    assert_eq!(&saved.token, token);
    // Read raw, the event's fragments carry three tokens; the stored one is the last.
    let mut fragments = coll
        .watch()
        .pipeline([doc! { "$changeStreamSplitLargeEvent": {} }])
        .full_document(mongodb::options::FullDocumentType::Required)
        .full_document_before_change(mongodb::options::FullDocumentBeforeChangeType::Required)
        .resume_after(head)
        .await
        .unwrap()
        .with_type::<bson::RawDocumentBuf>();
    let mut tokens = Vec::new();
    while tokens.len() < 3 {
        if let Some(d) = fragments.next_if_any().await.unwrap() {
            assert!(d.get("splitEvent").unwrap().is_some());
            tokens.push(cdc_core::ResumeToken::from_raw(
                d.get_document("_id").unwrap().to_owned(),
            ));
        }
    }
    assert_eq!(
        saved.token, tokens[2],
        "the stored point is the last fragment's token"
    );
    deployment.shutdown().await;
}
