//! Watches a collection with the file store and prints each change.
//!
//! ```sh
//! cargo run -p cdc-processor --example watch_collection -- mongodb://127.0.0.1:27017/?replicaSet=rs0 shop orders
//! ```
//!
//! Without arguments it starts an in-process mongo-sim, writes a few changes itself and
//! stops after printing them.

// An example program: printing is its job.
#![allow(clippy::print_stdout)]

use std::{sync::Arc, time::Duration};

use cdc_processor::{
    BoxError, CollectionWatcher, DocumentProcessor, JsonWatcher, default_backoff, stores::FileStore,
};

struct Printer;

#[async_trait::async_trait]
impl CollectionWatcher for Printer {
    async fn insert(&self, doc: &[u8]) -> Result<(), BoxError> {
        println!("insert {}", String::from_utf8_lossy(doc));
        Ok(())
    }
    async fn update(&self, doc: &[u8]) -> Result<(), BoxError> {
        println!("update {}", String::from_utf8_lossy(doc));
        Ok(())
    }
    async fn delete(&self, doc: &[u8]) -> Result<(), BoxError> {
        println!("delete {}", String::from_utf8_lossy(doc));
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (sim, uri, db, coll) = match args.as_slice() {
        [uri, db, coll] => (None, uri.clone(), db.clone(), coll.clone()),
        [] => {
            let sim = mongo_sim::MongoSim::start().await?;
            let uri = sim.uri();
            (Some(sim), uri, "shop".to_owned(), "orders".to_owned())
        }
        _ => return Err("usage: watch_collection [URI DB COLLECTION]".into()),
    };
    let client = cdc_processor::connect(&uri, Duration::from_secs(10)).await?;
    // Demo mode uses a fresh directory: points from another (simulated) deployment mean
    // nothing to this one.
    let dir = match &sim {
        Some(_) => std::env::temp_dir().join(format!("cdc-example-{}", std::process::id())),
        None => std::env::temp_dir().join("cdc-example-resume-points"),
    };
    let processor = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            client.clone(),
            db.clone(),
            coll.clone(),
        ))
        .store(Arc::new(FileStore::new(&dir)?))
        .build()?;
    println!("watching {db}.{coll}; resume points in {}", dir.display());
    if sim.is_some() {
        // Demo mode: write three changes, then stop once they are printed.
        let stop = processor.stop_handle();
        let collection = client.database(&db).collection::<bson::Document>(&coll);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = collection
                .insert_one(bson::doc! { "_id": 1, "item": "tea", "qty": 2 })
                .await;
            let _ = collection
                .update_one(bson::doc! { "_id": 1 }, bson::doc! { "$inc": { "qty": 1 } })
                .await;
            let _ = collection.delete_one(bson::doc! { "_id": 1 }).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            stop.stop();
        });
    }
    processor
        .start_with_retry(default_backoff(), JsonWatcher(Printer))
        .await?;
    if let Some(sim) = sim {
        sim.shutdown().await;
    }
    Ok(())
}
