//! Events over 16 MiB through `MongoSource`: without splitting, a typed error that names
//! the remedy; with `split_large_events`, one reassembled event whose token resumes after
//! its last fragment, also when the stream resumed in the middle of it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bson::{Document, RawDocumentBuf, doc};
use cdc_core::{
    ChangeCursor, ChangeEvent, ChangeSource, ErrorKind, OperationType, ResumeToken, StartPosition,
};
use cdc_mongo::{
    BeforeChange, FullDocument, MongoSource, Scope, SourceOptions, connect, enable_pre_post_images,
};
use mongo_sim::TestDeployment;

fn big(c: char) -> String {
    std::iter::repeat_n(c, 12 * 1024 * 1024).collect()
}

async fn next(cursor: &mut Box<dyn ChangeCursor>) -> ChangeEvent {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(e) = cursor.next().await.unwrap().into_event().unwrap() {
                return e;
            }
        }
    })
    .await
    .expect("no event within 30 s")
}

#[tokio::test]
async fn large_events_are_reassembled_or_refused_with_the_remedy() {
    let deployment = TestDeployment::start().await.unwrap();
    let client = connect(&deployment.uri(), Duration::from_secs(10))
        .await
        .unwrap();
    let db = client.database("split_events");
    let _ = db.drop().await;
    db.create_collection("c").await.unwrap();
    enable_pre_post_images(&db, "c").await.unwrap();
    let coll = db.collection::<Document>("c");
    let images = SourceOptions::default()
        .full_document(FullDocument::Required)
        .before_change(BeforeChange::Required)
        .batch_size(1);
    let scope = Scope::collection("split_events", "c");
    let plain = MongoSource::new(client.clone(), scope.clone(), images.clone());
    let split = MongoSource::new(client.clone(), scope, images.split_large_events(true));

    let start = plain.open(&StartPosition::Now).await.unwrap();
    let start_token = start.resume_token().unwrap();
    start.close().await;
    coll.insert_one(doc! { "_id": 1, "a": big('x') })
        .await
        .unwrap();
    coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "a": big('y') } })
        .await
        .unwrap();
    coll.insert_one(doc! { "_id": 2 }).await.unwrap();
    let from_start = StartPosition::ResumeAfter(start_token.clone());

    // Without splitting: a typed, non-retryable error naming the remedy.
    let mut cursor = plain.open(&from_start).await.unwrap();
    assert_eq!(
        next(&mut cursor).await.operation_type,
        OperationType::Insert
    );
    let err = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match cursor.next().await {
                Ok(next @ (cdc_core::Next::Event(_) | cdc_core::Next::Raw(_))) => {
                    panic!("expected the too-large error, got {next:?}")
                }
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(err.kind(), ErrorKind::Fatal);
    assert!(!err.kind().is_retryable());
    let chain = format!(
        "{err} / {}",
        std::error::Error::source(&err)
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    assert!(
        chain.contains("split_large_events") && chain.contains("10334"),
        "{chain}"
    );

    // With splitting: the update arrives as one event with both images whole.
    let mut cursor = split.open(&from_start).await.unwrap();
    assert_eq!(
        next(&mut cursor).await.operation_type,
        OperationType::Insert
    );
    let update = next(&mut cursor).await;
    assert_eq!(update.operation_type, OperationType::Update);
    assert_eq!(update.document_id(), Some(bson::Bson::Int32(1)));
    let post = update.full_document().unwrap();
    assert_eq!(post.get_str("a").unwrap(), big('y'));
    let pre = update.full_document_before_change().unwrap();
    assert_eq!(pre.get_str("a").unwrap(), big('x'));
    let desc = update.update_description().unwrap().unwrap();
    assert_eq!(desc.updated_fields.get_str("a").unwrap(), big('y'));
    assert!(update.raw().unwrap().as_bytes().len() > 16 * 1024 * 1024);
    // Its token is the last fragment's: resuming after it gives the next event.
    let after_update = update.token.clone();
    let mut resumed = split
        .open(&StartPosition::ResumeAfter(after_update.clone()))
        .await
        .unwrap();
    assert_eq!(
        next(&mut resumed).await.document_id(),
        Some(bson::Bson::Int32(2))
    );

    // The fragments' own tokens, read raw: resuming after any of them delivers the whole
    // event again (its start is found by its cluster time), then what follows.
    let mut raw = split.open_driver_stream(&from_start).await.unwrap();
    let mut fragment_tokens = Vec::new();
    while fragment_tokens.len() < 3 {
        let Some(doc): Option<RawDocumentBuf> =
            tokio::time::timeout(Duration::from_secs(30), raw.next_if_any())
                .await
                .unwrap()
                .unwrap()
        else {
            continue;
        };
        if doc.get("splitEvent").unwrap().is_some() {
            fragment_tokens.push(ResumeToken::from_raw(
                doc.get_document("_id").unwrap().to_owned(),
            ));
        }
    }
    assert_eq!(
        fragment_tokens[2], after_update,
        "the event's token is its last fragment's"
    );
    for mid in &fragment_tokens[..2] {
        let mut cursor = split
            .open(&StartPosition::ResumeAfter(mid.clone()))
            .await
            .unwrap();
        let again = next(&mut cursor).await;
        assert_eq!(again.operation_type, OperationType::Update);
        assert_eq!(again.token, after_update);
        assert_eq!(
            again.full_document().unwrap().get_str("a").unwrap(),
            big('y')
        );
        assert_eq!(
            cursor.resume_token(),
            Some(after_update.clone()),
            "the position is after the whole event"
        );
        assert_eq!(
            next(&mut cursor).await.document_id(),
            Some(bson::Bson::Int32(2))
        );
    }
    deployment.shutdown().await;
}
