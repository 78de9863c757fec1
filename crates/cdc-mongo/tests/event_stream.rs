//! The source on its own, as the crate's example uses it: a `Stream` of events that ends
//! only when the server closes it, with idle round trips visible when asked for.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bson::{Bson, Document, doc};
use cdc_core::{OperationType, StartPosition};
use cdc_mongo::{Change, FullDocument, MongoSource, Scope, SourceOptions, connect};
use futures_util::StreamExt;
use mongo_sim::TestDeployment;

#[tokio::test]
async fn the_crate_example_reads_events_until_the_stream_is_closed() {
    let deployment = TestDeployment::start().await.unwrap();
    let client = connect(&deployment.uri(), Duration::from_secs(10))
        .await
        .unwrap();
    let orders = client
        .database("stream_example")
        .collection::<Document>("orders");
    let _ = orders.drop().await;
    orders.insert_one(doc! { "_id": 0 }).await.unwrap();
    // The example, with a short await time so idle rounds come quickly.
    let source = MongoSource::new(
        client.clone(),
        Scope::collection("stream_example", "orders"),
        SourceOptions::default()
            .full_document(FullDocument::UpdateLookup)
            .max_await_time(Duration::from_millis(50)),
    );
    let mut events = source.stream(&StartPosition::Now).await.unwrap();
    let writer = orders.clone();
    tokio::spawn(async move {
        // Quiet first: the stream must not end on empty round trips.
        tokio::time::sleep(Duration::from_millis(400)).await;
        for i in 1..=3 {
            writer.insert_one(doc! { "_id": i }).await.unwrap();
        }
        writer.drop().await.unwrap();
    });
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(event) = events.next().await {
            let event = event.unwrap();
            seen.push((event.operation_type.clone(), event.document_id()));
        }
    });
    read.await.expect("the stream ends after the invalidate");
    let ids: Vec<Option<Bson>> = seen
        .iter()
        .filter(|(op, _)| *op == OperationType::Insert)
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(ids, [1, 2, 3].map(|i| Some(Bson::Int32(i))));
    assert_eq!(
        seen.last().unwrap().0,
        OperationType::Invalidate,
        "{seen:?}"
    );
    assert!(events.next().await.is_none(), "ended for good");
    deployment.shutdown().await;
}

#[tokio::test]
async fn idle_round_trips_are_visible_when_asked_for() {
    let deployment = TestDeployment::start().await.unwrap();
    let client = connect(&deployment.uri(), Duration::from_secs(10))
        .await
        .unwrap();
    let coll = client.database("stream_idle").collection::<Document>("c");
    let _ = coll.drop().await;
    coll.insert_one(doc! { "_id": 0 }).await.unwrap();
    let source = MongoSource::new(
        client.clone(),
        Scope::collection("stream_idle", "c"),
        SourceOptions::default().max_await_time(Duration::from_millis(30)),
    );
    let mut changes = source
        .stream(&StartPosition::Now)
        .await
        .unwrap()
        .with_idle();
    let mut idle = 0;
    while idle < 3 {
        match tokio::time::timeout(Duration::from_secs(10), changes.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Change::Idle { resume_token } => {
                assert!(resume_token.is_some());
                idle += 1;
            }
            other => panic!("nothing was written: {other:?}"),
        }
    }
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    let event = loop {
        match changes.next().await.unwrap().unwrap() {
            Change::Event(e) => break e,
            Change::Idle { .. } => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(event.document_id(), Some(Bson::Int32(1)));
    assert_eq!(changes.resume_token(), Some(&event.token));
    deployment.shutdown().await;
}
