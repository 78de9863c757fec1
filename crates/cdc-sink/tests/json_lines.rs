//! The JSON-lines sink under a processor, through the driver against mongo-sim: every
//! change of the collection arrives as one line, in order, before it is acknowledged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use bson::doc;
use cdc_processor::{CheckpointPolicy, DocumentProcessor, stores::MemoryStore};
use cdc_sink::JsonLines;

/// A writer whose bytes the test reads.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn lines(&self) -> Vec<serde_json::Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// A processor over `sink.<coll>` with a memory store, handing its batches to
/// `JsonLines` on `out`; returned once its stream is open.
async fn start_on<W: Write + Send + 'static>(
    client: &mongodb::Client,
    coll: &str,
    out: W,
) -> (
    DocumentProcessor,
    Arc<MemoryStore>,
    tokio::task::JoinHandle<cdc_processor::Result<()>>,
) {
    let store = Arc::new(MemoryStore::new());
    let p = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            client.clone(),
            "sink",
            coll,
        ))
        .store(store.clone())
        .checkpoint(CheckpointPolicy::every_event())
        .build()
        .unwrap();
    let task = {
        let (p, sink) = (p.clone(), JsonLines::new(out));
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
    (p, store, task)
}

#[tokio::test]
async fn every_change_arrives_as_one_line_in_order() {
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(sim.uri()).await.unwrap();
    let out = Shared::default();
    let (p, store, task) = start_on(&client, "items", out.clone()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let coll = client
        .database("sink")
        .collection::<bson::Document>("items");
    for i in 0..20_i64 {
        coll.insert_one(doc! { "_id": i, "v": i * 10 })
            .await
            .unwrap();
    }
    coll.update_one(doc! { "_id": 3_i64 }, doc! { "$set": { "v": -1_i64 } })
        .await
        .unwrap();
    coll.delete_one(doc! { "_id": 4_i64 }).await.unwrap();
    while out.lines().len() < 22 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "lines: {}",
            out.lines().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.stop();
    task.await.unwrap().unwrap();
    let lines = out.lines();
    let ids: Vec<i64> = lines
        .iter()
        .take(20)
        .map(|l| l["documentKey"]["_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (0..20).collect::<Vec<_>>());
    assert_eq!(lines[20]["operationType"], "update");
    assert_eq!(lines[20]["updateDescription"]["updatedFields"]["v"], -1);
    assert_eq!(lines[21]["operationType"], "delete");
    // Acknowledged only once written: the stored point is the last line's token.
    let point = cdc_core::ResumeStore::load(&*store, p.stream_id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        point.token.data(),
        lines[21]["_id"]["_data"].as_str(),
        "the point is the last line's"
    );
    sim.shutdown().await;
}

/// A writer whose first write blocks until the test lets it go (10 s at most, then it
/// fails), telling when it started and when it ended.
struct Gate {
    out: Shared,
    started: Arc<std::sync::atomic::AtomicBool>,
    ended: Arc<std::sync::atomic::AtomicBool>,
    go: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Write for Gate {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::sync::atomic::Ordering;
        if !self.ended.load(Ordering::SeqCst) {
            self.started.store(true, Ordering::SeqCst);
            let waited = self
                .go
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10));
            self.ended.store(true, Ordering::SeqCst);
            waited.map_err(|_| std::io::Error::other("never let go"))?;
        }
        self.out.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// On a runtime with one thread, a write that blocks (a full pipe) holds nothing else up:
/// while it waits, the driver and the simulator on the same thread serve another insert;
/// then the write goes through and both changes arrive.
#[tokio::test(flavor = "current_thread")]
async fn a_blocked_writer_does_not_block_the_runtime() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(sim.uri()).await.unwrap();
    let out = Shared::default();
    let (go, wait) = std::sync::mpsc::channel();
    let (started, ended) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let gate = Gate {
        out: out.clone(),
        started: Arc::clone(&started),
        ended: Arc::clone(&ended),
        go: Mutex::new(wait),
    };
    let (p, _, task) = start_on(&client, "blocked", gate).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let coll = client
        .database("sink")
        .collection::<bson::Document>("blocked");
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    while !started.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the write never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    coll.insert_one(doc! { "_id": 2 }).await.unwrap();
    assert!(
        !ended.load(Ordering::SeqCst),
        "the insert waited for the blocked write: the runtime was blocked"
    );
    go.send(()).unwrap();
    while out.lines().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "lines: {}",
            out.lines().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.stop();
    task.await.unwrap().unwrap();
    let ids: Vec<i64> = out
        .lines()
        .iter()
        .map(|l| l["documentKey"]["_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2]);
    sim.shutdown().await;
}
