//! First contact through the real driver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bson::{Document, doc};
use futures_util::StreamExt;
use mongo_sim::MongoSim;
use mongodb::Client;

#[tokio::test]
async fn driver_connects_inserts_and_watches() {
    let sim = MongoSim::start().await.unwrap();
    let client = Client::with_uri_str(sim.uri()).await.unwrap();
    let db = client.database("app");
    db.run_command(doc! { "ping": 1 }).await.unwrap();
    let coll = db.collection::<Document>("users");
    let mut stream = coll.watch().await.unwrap();
    coll.insert_one(doc! { "_id": 1, "name": "ada" })
        .await
        .unwrap();
    let event = stream.next().await.unwrap().unwrap();
    assert_eq!(
        event.operation_type,
        mongodb::change_stream::event::OperationType::Insert
    );
    let found = coll.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    assert_eq!(found.get_str("name").unwrap(), "ada");
    sim.shutdown().await;
}
