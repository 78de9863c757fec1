//! Each fault the simulator injects, shown through the real driver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bson::{Document, doc};
use futures_util::TryStreamExt;
use mongo_sim::MongoSim;
use mongodb::{
    Client, Collection,
    change_stream::{ChangeStream, event::ChangeStreamEvent},
    error::{Error, ErrorKind},
    options::ClientOptions,
};

async fn setup() -> (MongoSim, Client, Collection<Document>) {
    let sim = MongoSim::start().await.unwrap();
    let client = Client::with_uri_str(sim.uri()).await.unwrap();
    let coll = client.database("app").collection("c");
    (sim, client, coll)
}

async fn fail_point(client: &Client, fp: Document) {
    let mut cmd = doc! { "configureFailPoint": "failCommand" };
    cmd.extend(fp);
    client.database("admin").run_command(cmd).await.unwrap();
}

fn code(err: &Error) -> Option<i32> {
    match err.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => Some(w.code),
        _ => None,
    }
}

async fn next(
    stream: &mut ChangeStream<ChangeStreamEvent<Document>>,
) -> Result<ChangeStreamEvent<Document>, Error> {
    tokio::time::timeout(Duration::from_secs(20), stream.try_next())
        .await
        .expect("no answer within 20 s")
        .map(|e| e.expect("stream ended"))
}

#[tokio::test]
async fn resumable_get_more_errors_are_resumed_by_the_driver() {
    let (sim, client, coll) = setup().await;
    let mut stream = coll.watch().batch_size(1).await.unwrap();
    // CursorNotFound is always resumable; a labelled error is resumable by its label.
    fail_point(
        &client,
        doc! { "mode": { "times": 1 }, "data": { "failCommands": ["getMore"], "errorCode": 43 } },
    )
    .await;
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    assert_eq!(
        next(&mut stream).await.unwrap().document_key,
        Some(doc! { "_id": 1 })
    );
    fail_point(
        &client,
        doc! { "mode": { "times": 1 }, "data": { "failCommands": ["getMore"], "errorCode": 91, "errorLabels": ["ResumableChangeStreamError"] } },
    )
    .await;
    coll.insert_one(doc! { "_id": 2 }).await.unwrap();
    assert_eq!(
        next(&mut stream).await.unwrap().document_key,
        Some(doc! { "_id": 2 })
    );
    // Two closed connections in a row, batch size 1: resumed each time, nothing lost.
    fail_point(&client, doc! { "mode": { "times": 2 }, "data": { "failCommands": ["getMore"], "closeConnection": true } }).await;
    coll.insert_one(doc! { "_id": 3 }).await.unwrap();
    coll.insert_one(doc! { "_id": 4 }).await.unwrap();
    assert_eq!(
        next(&mut stream).await.unwrap().document_key,
        Some(doc! { "_id": 3 })
    );
    assert_eq!(
        next(&mut stream).await.unwrap().document_key,
        Some(doc! { "_id": 4 })
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn non_resumable_get_more_errors_surface() {
    let (sim, client, coll) = setup().await;
    let mut stream = coll.watch().await.unwrap();
    fail_point(
        &client,
        doc! { "mode": "alwaysOn", "data": { "failCommands": ["getMore"], "errorCode": 280 } },
    )
    .await;
    let err = next(&mut stream).await.unwrap_err();
    assert_eq!(code(&err), Some(280));
    fail_point(&client, doc! { "mode": "off" }).await;
    // An unlabelled ElectionInProgress is not resumable on a 4.4+ server.
    let mut stream = coll.watch().await.unwrap();
    fail_point(
        &client,
        doc! { "mode": { "times": 1 }, "data": { "failCommands": ["getMore"], "errorCode": 216 } },
    )
    .await;
    assert_eq!(code(&next(&mut stream).await.unwrap_err()), Some(216));
    sim.shutdown().await;
}

#[tokio::test]
async fn skip_mode_app_name_and_write_concern_errors() {
    let (sim, client, coll) = setup().await;
    fail_point(
        &client,
        doc! { "mode": { "skip": 1 }, "data": { "failCommands": ["insert"], "errorCode": 2 } },
    )
    .await;
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    assert_eq!(
        code(&coll.insert_one(doc! { "_id": 2 }).await.unwrap_err()),
        Some(2)
    );
    fail_point(&client, doc! { "mode": "off" }).await;

    // Only the client with the named application is affected.
    fail_point(&client, doc! { "mode": "alwaysOn", "data": { "failCommands": ["find"], "errorCode": 13, "appName": "victim" } }).await;
    let mut options = ClientOptions::parse(sim.uri()).await.unwrap();
    options.app_name = Some("victim".into());
    let victim = Client::with_options(options).unwrap();
    let victim_coll: Collection<Document> = victim.database("app").collection("c");
    assert_eq!(
        code(&victim_coll.find_one(doc! {}).await.unwrap_err()),
        Some(13)
    );
    assert!(
        coll.find_one(doc! {}).await.is_ok(),
        "another application is unaffected"
    );
    fail_point(&client, doc! { "mode": "off" }).await;

    fail_point(
        &client,
        doc! { "mode": { "times": 1 }, "data": { "failCommands": ["insert"], "writeConcernError": { "code": 91, "errmsg": "shutting down" } } },
    )
    .await;
    let err = coll.insert_one(doc! { "_id": 3 }).await.unwrap_err();
    assert!(
        matches!(err.kind.as_ref(), ErrorKind::Write(mongodb::error::WriteFailure::WriteConcernError(w)) if w.code == 91),
        "{err}"
    );
    assert_eq!(
        coll.count_documents(doc! { "_id": 3 }).await.unwrap(),
        1,
        "the write itself applied"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn block_connection_delays_the_answer() {
    let (sim, client, coll) = setup().await;
    fail_point(&client, doc! { "mode": { "times": 1 }, "data": { "failCommands": ["find"], "blockConnection": true, "blockTimeMS": 5000 } }).await;
    // Blocked for 5 s: a 500 ms deadline expires first; the next find is not blocked.
    let blocked = tokio::time::timeout(Duration::from_millis(500), coll.find_one(doc! {})).await;
    assert!(
        blocked.is_err(),
        "the blocked find should not have answered yet"
    );
    assert!(coll.find_one(doc! {}).await.is_ok());
    sim.shutdown().await;
}

#[tokio::test]
async fn dropping_connections_is_survived_by_streams() {
    let (sim, _client, coll) = setup().await;
    let mut stream = coll.watch().await.unwrap();
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    assert!(next(&mut stream).await.is_ok());
    sim.drop_connections();
    coll.insert_one(doc! { "_id": 2 }).await.unwrap();
    assert_eq!(
        next(&mut stream).await.unwrap().document_key,
        Some(doc! { "_id": 2 })
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn step_down_fails_writes_and_get_more_until_step_up() {
    let (sim, client, coll) = setup().await;
    coll.insert_one(doc! { "_id": 0 }).await.unwrap();
    let mut stream = coll.watch().await.unwrap();
    sim.step_down();
    // With no primary, the driver cannot select a server for the write.
    let write = tokio::time::timeout(
        Duration::from_millis(1500),
        coll.insert_one(doc! { "_id": 1 }),
    )
    .await;
    assert!(
        !matches!(write, Ok(Ok(_))),
        "no write succeeds while stepped down"
    );
    // A direct connection still reaches the node and sees the codes and labels.
    let direct = Client::with_uri_str(sim.direct_uri()).await.unwrap();
    let err = direct
        .database("app")
        .collection::<Document>("c")
        .insert_one(doc! { "_id": 2 })
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(10107));
    assert!(err.contains_label("RetryableWriteError"));
    let err = direct
        .database("app")
        .run_command(doc! { "getMore": 1_i64, "collection": "c" })
        .await
        .unwrap_err();
    // The stream's cursor survived on the node; its getMore is refused as a secondary
    // refuses primary reads, labelled resumable by the server's rule.
    assert_eq!(code(&err), Some(13435));
    assert!(err.contains_label("ResumableChangeStreamError"));
    sim.step_up();
    coll.insert_one(doc! { "_id": 3 }).await.unwrap();
    // The stream resumes across the election and loses nothing.
    let mut keys = Vec::new();
    while keys.last() != Some(&doc! { "_id": 3 }) {
        keys.push(next(&mut stream).await.unwrap().document_key.unwrap());
    }
    assert!(
        !keys.contains(&doc! { "_id": 2 }),
        "the refused write left no event"
    );
    let _ = client;
    sim.shutdown().await;
}

#[tokio::test]
async fn pause_answers_nothing_until_resume() {
    let (sim, client, _coll) = setup().await;
    sim.pause();
    let admin = client.database("admin");
    let paused = tokio::time::timeout(
        Duration::from_millis(500),
        admin.run_command(doc! { "ping": 1 }),
    )
    .await;
    assert!(paused.is_err(), "a paused server answers nothing");
    sim.resume();
    admin.run_command(doc! { "ping": 1 }).await.unwrap();
    sim.shutdown().await;
}
