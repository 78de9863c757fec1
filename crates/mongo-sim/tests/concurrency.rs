//! mongo-sim under concurrency, through the real driver: a long cursor reads its snapshot
//! while another connection writes, change streams keep the oplog's order with eight
//! writers, and the sharded front answers as a `mongos`. (Transactions conflicting only
//! on the same document: `driver.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bson::{Bson, Document, doc};
use futures_util::TryStreamExt;
use mongo_sim::{MongoSim, SimOptions};
use mongodb::{Client, error::ErrorKind};

async fn setup_with(options: SimOptions) -> (MongoSim, Client) {
    let sim = MongoSim::start_with(options).await.unwrap();
    let client = Client::with_uri_str(sim.uri()).await.unwrap();
    (sim, client)
}

fn code_of(err: &mongodb::error::Error) -> i32 {
    match err.kind.as_ref() {
        ErrorKind::Command(c) => c.code,
        other => panic!("not a command error: {other:?}"),
    }
}

/// A 1,000,000-document cursor is read to its end while another connection inserts and
/// updates in the same collection as fast as it can: the writes go on (each round of
/// them completes while the cursor is still open), and the cursor returns exactly the
/// documents of the moment it was opened, unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_document_cursor_reads_its_snapshot_while_another_connection_writes() {
    let (_sim, client) = setup_with(SimOptions::default()).await;
    let coll = client.database("conc").collection::<Document>("big");
    let total: i64 = 1_000_000;
    let mut next = 0;
    while next < total {
        let batch: Vec<Document> = (next..(next + 100_000).min(total))
            .map(|i| doc! { "_id": i, "v": 0 })
            .collect();
        next += i64::try_from(batch.len()).unwrap();
        coll.insert_many(batch).await.unwrap();
    }
    let mut cursor = coll.find(doc! {}).batch_size(10_000).await.unwrap();
    // The first batch is in: the cursor's view is taken.
    assert!(cursor.advance().await.unwrap());
    let writer = {
        let coll = coll.clone();
        tokio::spawn(async move {
            let mut rounds = 0_i64;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stopping = std::sync::Arc::clone(&stop);
            let handle = tokio::spawn(async move {
                while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                    let id = total + rounds;
                    coll.insert_one(doc! { "_id": id, "v": 1 }).await.unwrap();
                    coll.update_one(doc! { "_id": rounds }, doc! { "$set": { "v": 1 } })
                        .await
                        .unwrap();
                    rounds += 1;
                }
                rounds
            });
            (stop, handle)
        })
        .await
        .unwrap()
    };
    let mut seen = 1_i64;
    let mut changed = 0;
    let mut expected_id = 0_i64;
    let first: Document = cursor.deserialize_current().unwrap();
    assert_eq!(first, doc! { "_id": 0_i64, "v": 0 });
    expected_id += 1;
    let mut writes_before_the_end = 0;
    while cursor.advance().await.unwrap() {
        let d: Document = cursor.deserialize_current().unwrap();
        if d.get_i32("v").unwrap() != 0 {
            changed += 1;
        }
        assert_eq!(
            d.get_i64("_id").unwrap(),
            expected_id,
            "natural order, no gap"
        );
        expected_id += 1;
        seen += 1;
        if seen == total - 1 {
            writes_before_the_end = coll.count_documents(doc! { "v": 1 }).await.unwrap();
        }
    }
    let (stop, handle) = writer;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = handle.await.unwrap();
    assert_eq!(seen, total, "exactly the documents of the cursor's moment");
    assert_eq!(changed, 0, "no write after the cursor opened shows in it");
    assert!(
        writes_before_the_end > 0,
        "the writer's changes landed while the cursor was read"
    );
    assert!(rounds > 0);
}

/// Eight connections write at once (inserts and updates of their own documents) while a
/// change stream reads: every change arrives once, cluster times strictly increase (no
/// event after a later one), and each writer's changes arrive in the order it made them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_streams_keep_the_oplog_order_with_eight_writer_connections() {
    let (_sim, client) = setup_with(SimOptions::default()).await;
    let coll = client.database("conc").collection::<Document>("order");
    let mut stream = coll.watch().await.unwrap();
    let writers: usize = 8;
    let per_writer: i32 = 150;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let coll = coll.clone();
        tasks.spawn(async move {
            for i in 0..per_writer {
                let id = format!("{w}-{i}");
                coll.insert_one(doc! { "_id": &id, "i": i }).await.unwrap();
                coll.update_one(doc! { "_id": &id }, doc! { "$set": { "done": true } })
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let expected = writers * usize::try_from(per_writer).unwrap() * 2;
    let mut last_time: Option<bson::Timestamp> = None;
    let mut next_of_writer = vec![(0, false); writers];
    let mut n = 0;
    while n < expected {
        let event = tokio::time::timeout(Duration::from_secs(30), stream.try_next())
            .await
            .expect("the stream delivers every change")
            .unwrap()
            .unwrap();
        let time = event.cluster_time.unwrap();
        if let Some(last) = last_time {
            assert!(
                (time.time, time.increment) > (last.time, last.increment),
                "cluster times strictly increase: {last:?} then {time:?}"
            );
        }
        last_time = Some(time);
        let id = event.document_key.unwrap();
        let id = id.get_str("_id").unwrap().to_owned();
        let (w, i) = id.split_once('-').unwrap();
        let (w, i): (usize, i32) = (w.parse().unwrap(), i.parse().unwrap());
        let (expected_i, updated) = next_of_writer[w];
        assert_eq!(i, expected_i, "writer {w}'s changes in its order");
        let insert = matches!(
            event.operation_type,
            mongodb::change_stream::event::OperationType::Insert
        );
        assert_eq!(insert, !updated, "writer {w}: insert then update of {id}");
        next_of_writer[w] = if updated { (i + 1, false) } else { (i, true) };
        n += 1;
    }
    assert!(next_of_writer.iter().all(|(i, u)| *i == per_writer && !u));
}

/// `--sharded`: `hello` says `isdbgrid`, `splitVector` and `replSetGetStatus` are
/// refused as a `mongos` refuses them, `shardCollection` records the key (the same key
/// again is fine, another is refused), `config.collections` / `config.chunks` describe
/// the collection, and change events carry the shard key before `_id` in `documentKey`
/// — for an update that changes the shard key, the key the document had, as the server
/// writes it; afterwards the new one.
#[tokio::test]
async fn the_sharded_front_answers_as_a_mongos() {
    let (sim, client) = setup_with(SimOptions {
        sharded: true,
        ..Default::default()
    })
    .await;
    assert!(!sim.uri().contains("replicaSet"));
    let admin = client.database("admin");
    let hello = admin.run_command(doc! { "hello": 1 }).await.unwrap();
    assert_eq!(hello.get_str("msg").unwrap(), "isdbgrid");
    assert!(hello.get("setName").is_none() && hello.get("hosts").is_none());
    let split = admin
        .run_command(
            doc! { "splitVector": "shop.orders", "keyPattern": { "_id": 1 }, "maxChunkSize": 1 },
        )
        .await
        .unwrap_err();
    assert_eq!(code_of(&split), 59, "{split}");
    let status = admin
        .run_command(doc! { "replSetGetStatus": 1 })
        .await
        .unwrap_err();
    assert_eq!(code_of(&status), 59, "{status}");

    admin
        .run_command(doc! { "enableSharding": "shop" })
        .await
        .unwrap();
    let reply = admin
        .run_command(
            doc! { "shardCollection": "shop.orders", "key": { "region": 1, "customer": 1 } },
        )
        .await
        .unwrap();
    assert_eq!(reply.get_str("collectionsharded").unwrap(), "shop.orders");
    admin
        .run_command(
            doc! { "shardCollection": "shop.orders", "key": { "region": 1, "customer": 1 } },
        )
        .await
        .unwrap();
    let other = admin
        .run_command(doc! { "shardCollection": "shop.orders", "key": { "other": 1 } })
        .await
        .unwrap_err();
    assert_eq!(code_of(&other), 23, "{other}");
    let bad = admin
        .run_command(doc! { "shardCollection": "shop.bad", "key": { "x": -1 } })
        .await
        .unwrap_err();
    assert_eq!(code_of(&bad), 2, "{bad}");

    let config = client.database("config");
    let colls: Vec<Document> = config
        .collection::<Document>("collections")
        .find(doc! { "_id": "shop.orders" })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(colls.len(), 1);
    assert_eq!(
        colls[0].get_document("key").unwrap(),
        &doc! { "region": 1, "customer": 1 }
    );
    let uuid = colls[0].get("uuid").unwrap().clone();
    let chunks: Vec<Document> = config
        .collection::<Document>("chunks")
        .find(doc! { "uuid": uuid })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(chunks.len(), 1);
    assert_eq!(
        chunks[0].get_document("min").unwrap(),
        &doc! { "region": Bson::MinKey, "customer": Bson::MinKey }
    );
    assert_eq!(
        chunks[0].get_document("max").unwrap(),
        &doc! { "region": Bson::MaxKey, "customer": Bson::MaxKey }
    );

    let orders = client.database("shop").collection::<Document>("orders");
    let mut stream = orders.watch().await.unwrap();
    orders
        .insert_one(doc! { "_id": 1, "customer": "c1", "region": "eu", "total": 5 })
        .await
        .unwrap();
    orders
        .update_one(doc! { "_id": 1 }, doc! { "$set": { "total": 6 } })
        .await
        .unwrap();
    // The shard key changes (a retryable write, as a mongos requires).
    orders
        .update_one(doc! { "_id": 1 }, doc! { "$set": { "region": "us" } })
        .await
        .unwrap();
    orders.delete_one(doc! { "_id": 1 }).await.unwrap();
    let mut keys = Vec::new();
    for _ in 0..4 {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        keys.push(event.document_key.unwrap());
    }
    assert_eq!(
        keys,
        vec![
            doc! { "region": "eu", "customer": "c1", "_id": 1 },
            doc! { "region": "eu", "customer": "c1", "_id": 1 },
            doc! { "region": "eu", "customer": "c1", "_id": 1 },
            doc! { "region": "us", "customer": "c1", "_id": 1 },
        ]
    );
    // Not sharded: the replica set refuses the router's commands.
    let (_rs, rs_client) = setup_with(SimOptions::default()).await;
    let refused = rs_client
        .database("admin")
        .run_command(doc! { "shardCollection": "shop.orders", "key": { "_id": 1 } })
        .await
        .unwrap_err();
    assert_eq!(code_of(&refused), 59, "{refused}");
}

/// A change stream filtered to a quiet collection catches up on a long log in looks of a
/// few thousand entries, letting writers in between: its event still arrives, and no
/// look returns an event twice.
#[tokio::test]
async fn a_stream_on_a_quiet_collection_catches_up_on_a_long_log() {
    let (_sim, client) = setup_with(SimOptions::default()).await;
    let db = client.database("conc");
    let start = db
        .run_command(doc! { "ping": 1 })
        .await
        .unwrap()
        .get_timestamp("operationTime")
        .unwrap();
    let busy = db.collection::<Document>("busy");
    for chunk in 0..4 {
        busy.insert_many((0..5_000).map(|i| doc! { "_id": chunk * 5_000 + i }))
            .await
            .unwrap();
    }
    let quiet = db.collection::<Document>("quiet");
    quiet.insert_one(doc! { "_id": "only" }).await.unwrap();
    let mut stream = quiet.watch().start_at_operation_time(start).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(30), stream.try_next())
        .await
        .expect("the event arrives")
        .unwrap()
        .unwrap();
    assert_eq!(event.document_key.unwrap(), doc! { "_id": "only" });
    let next = tokio::time::timeout(Duration::from_millis(1_500), stream.try_next()).await;
    assert!(!matches!(next, Ok(Ok(Some(_)))), "one event only: {next:?}");
}

/// Writes outside a transaction run with no server lock held and commit only if their
/// document is still as they read it: eight connections incrementing one document lose
/// no increment, each also counting its own document; eight connections claiming jobs
/// with `findAndModify` claim each job exactly once; eight connections inserting the same
/// `_id`s create each document once (the others get the duplicate-key error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_to_one_document_lose_nothing() {
    let (_sim, client) = setup_with(SimOptions::default()).await;
    let db = client.database("conc");
    let counters = db.collection::<Document>("counters");
    let jobs = db.collection::<Document>("jobs");
    let ids = db.collection::<Document>("ids");
    let writers: i32 = 8;
    let rounds: i32 = 150;
    let job_count: i32 = 400;
    counters
        .insert_one(doc! { "_id": "shared", "n": 0 })
        .await
        .unwrap();
    jobs.insert_many((0..job_count).map(|i| doc! { "_id": i, "state": "new" }))
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (counters, jobs, ids) = (counters.clone(), jobs.clone(), ids.clone());
        tasks.spawn(async move {
            for _ in 0..rounds {
                counters
                    .update_one(doc! { "_id": "shared" }, doc! { "$inc": { "n": 1 } })
                    .await
                    .unwrap();
                counters
                    .update_one(doc! { "_id": w }, doc! { "$inc": { "n": 1 } })
                    .upsert(true)
                    .await
                    .unwrap();
            }
            let mut claimed = Vec::new();
            while let Some(job) = jobs
                .find_one_and_update(
                    doc! { "state": "new" },
                    doc! { "$set": { "state": "taken", "by": w } },
                )
                .await
                .unwrap()
            {
                claimed.push(job.get_i32("_id").unwrap());
            }
            let mut created = 0;
            for i in 0..100 {
                match ids.insert_one(doc! { "_id": i, "by": w }).await {
                    Ok(_) => created += 1,
                    Err(e) => assert_eq!(code_of_write(&e), 11000, "{e}"),
                }
            }
            (claimed, created)
        });
    }
    let mut claimed = Vec::new();
    let mut created = 0;
    while let Some(r) = tasks.join_next().await {
        let (c, n) = r.unwrap();
        claimed.extend(c);
        created += n;
    }
    let shared = counters
        .find_one(doc! { "_id": "shared" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        shared.get_i32("n").unwrap(),
        writers * rounds,
        "no increment lost"
    );
    for w in 0..writers {
        let own = counters.find_one(doc! { "_id": w }).await.unwrap().unwrap();
        assert_eq!(own.get_i32("n").unwrap(), rounds);
    }
    claimed.sort_unstable();
    assert_eq!(
        claimed,
        (0..job_count).collect::<Vec<_>>(),
        "each job claimed once"
    );
    let taken = jobs
        .count_documents(doc! { "state": "taken" })
        .await
        .unwrap();
    assert_eq!(taken, u64::try_from(job_count).unwrap());
    assert_eq!(created, 100, "each _id inserted once");
    assert_eq!(ids.count_documents(doc! {}).await.unwrap(), 100);
}

fn code_of_write(err: &mongodb::error::Error) -> i32 {
    match err.kind.as_ref() {
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(e)) => e.code,
        other => panic!("not a write error: {other:?}"),
    }
}

/// A collection dropped, renamed or modified while other connections write to it: no
/// write lands in a collection after its drop or rename (every oplog entry of a
/// collection's UUID comes before the entry that ended it), and the writes prepared
/// against it go to the collection the name has afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_racing_drops_and_renames_never_follow_them() {
    let (sim, client) = setup_with(SimOptions {
        oplog_capacity: 1_000_000,
        ..SimOptions::default()
    })
    .await;
    let db = client.database("race");
    let coll = db.collection::<Document>("c");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let coll = coll.clone();
        let stop = std::sync::Arc::clone(&stop);
        writers.spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                coll.insert_one(doc! { "_id": format!("{w}-{i}"), "n": 0 })
                    .await
                    .unwrap();
                coll.update_many(doc! {}, doc! { "$inc": { "n": 1 } })
                    .await
                    .unwrap();
                i += 1;
            }
        });
    }
    let admin = client.database("admin");
    for round in 0..20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        match round % 3 {
            0 => coll.drop().await.unwrap(),
            1 => {
                // The writers may not have created it again yet.
                let renamed = admin
                    .run_command(doc! {
                        "renameCollection": "race.c",
                        "to": format!("race.moved{round}"),
                    })
                    .await;
                if let Err(e) = renamed {
                    assert_eq!(code_of(&e), 26, "{e}");
                }
            }
            _ => {
                let modified = db
                    .run_command(doc! {
                        "collMod": "c",
                        "changeStreamPreAndPostImages": { "enabled": round % 2 == 0 },
                    })
                    .await;
                if let Err(e) = modified {
                    assert_eq!(code_of(&e), 26, "{e}");
                }
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(r) = writers.join_next().await {
        r.unwrap();
    }
    let entries: Vec<Document> = client
        .database("local")
        .collection::<Document>("oplog.rs")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(entries.len() < 1_000_000, "the oplog kept every entry");
    let mut ended = std::collections::HashSet::new();
    let (mut writes, mut ends) = (0, 0);
    for e in &entries {
        let Some(Bson::Binary(uuid)) = e.get("ui") else {
            continue;
        };
        let op = e.get_str("op").unwrap();
        let o = e.get_document("o").unwrap();
        assert!(
            !ended.contains(&uuid.bytes),
            "an entry after its collection was dropped or renamed: {e}"
        );
        if op == "c" && (o.contains_key("drop") || o.contains_key("renameCollection")) {
            ended.insert(uuid.bytes.clone());
            ends += 1;
        } else if matches!(op, "i" | "u") {
            writes += 1;
        }
    }
    assert!(
        ends >= 10,
        "the collection was dropped or renamed ({ends} times)"
    );
    assert!(
        writes > 100,
        "the writers wrote meanwhile ({writes} writes)"
    );
    drop(sim);
}

/// `local.oplog.rs` is read a few hundred entries per hold of the commit lock (writes
/// commit in between): oldest first and newest first across those chunks give the same
/// entries in opposite orders, in strictly increasing (decreasing) time, and `skip` and
/// `limit` count across chunks; a read made while a writer writes returns every entry
/// up to where it got, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oplog_reads_in_chunks_while_writes_go_on() {
    let (_sim, client) = setup_with(SimOptions::default()).await;
    let coll = client.database("ol").collection::<Document>("c");
    coll.insert_many((0..1_500).map(|i| doc! { "_id": i }))
        .await
        .unwrap();
    let oplog = client.database("local").collection::<Document>("oplog.rs");
    let read = |sort: i32, skip: u64, limit: i64| {
        let oplog = oplog.clone();
        async move {
            oplog
                .find(doc! { "ns": "ol.c" })
                .sort(doc! { "$natural": sort })
                .skip(skip)
                .limit(limit)
                .await
                .unwrap()
                .try_collect::<Vec<Document>>()
                .await
                .unwrap()
        }
    };
    let forward = read(1, 0, 0).await;
    let mut backward = read(-1, 0, 0).await;
    assert_eq!(forward.len(), 1_500);
    backward.reverse();
    assert_eq!(forward, backward);
    let times: Vec<bson::Timestamp> = forward
        .iter()
        .map(|e| e.get_timestamp("ts").unwrap())
        .collect();
    assert!(
        times
            .windows(2)
            .all(|w| (w[0].time, w[0].increment) < (w[1].time, w[1].increment))
    );
    let ids = |entries: &[Document]| -> Vec<i32> {
        entries
            .iter()
            .map(|e| e.get_document("o").unwrap().get_i32("_id").unwrap())
            .collect()
    };
    assert_eq!(ids(&read(1, 300, 5).await), (300..305).collect::<Vec<_>>());
    assert_eq!(
        ids(&read(-1, 300, 5).await),
        (1_195..1_200).rev().collect::<Vec<_>>()
    );
    // While another connection writes: what the read returns is in order, gapless for
    // this writer, and starts with the oldest entry.
    let writer = {
        let coll = coll.clone();
        tokio::spawn(async move {
            for i in 1_500..3_000 {
                coll.insert_one(doc! { "_id": i }).await.unwrap();
            }
        })
    };
    let during = ids(&read(1, 0, 0).await);
    writer.await.unwrap();
    assert!(during.len() >= 1_500);
    assert_eq!(
        during,
        (0..i32::try_from(during.len()).unwrap()).collect::<Vec<_>>()
    );
}

/// Upserts racing for the same `_id` (named by the filter) all succeed, as the server
/// retries an upsert that lost the insert race as an update: eight connections upsert
/// `$inc` into each of 100 documents at the same moment (a barrier per document), with
/// `update` and `findAndModify` alike; every count ends at 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_upserts_of_one_id_all_land() {
    let (_sim, client) = setup_with(SimOptions::default()).await;
    let coll = client.database("conc").collection::<Document>("upserts");
    let writers = 8;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(writers));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (coll, barrier) = (coll.clone(), std::sync::Arc::clone(&barrier));
        tasks.spawn(async move {
            for id in 0..100 {
                barrier.wait().await;
                if w % 2 == 0 {
                    coll.update_one(doc! { "_id": id }, doc! { "$inc": { "n": 1 } })
                        .upsert(true)
                        .await
                        .unwrap();
                } else {
                    coll.find_one_and_update(doc! { "_id": id }, doc! { "$inc": { "n": 1 } })
                        .upsert(true)
                        .await
                        .unwrap();
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let docs: Vec<Document> = coll
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(docs.len(), 100);
    for d in docs {
        assert_eq!(d.get_i32("n").unwrap(), 8, "{d}");
    }
}

/// An upsert whose filter has a condition besides equality on `_id` is not run again
/// when its insert meets the `_id`: the duplicate key is the answer, as on the server
/// (a conditional save relies on it).
#[tokio::test]
async fn a_conditional_upsert_meeting_its_id_is_a_duplicate_key() {
    let (_sim, client) = setup_with(SimOptions::default()).await;
    let coll = client
        .database("conc")
        .collection::<Document>("conditional");
    coll.insert_one(doc! { "_id": 1, "t": 10 }).await.unwrap();
    let err = coll
        .update_one(
            doc! { "_id": 1, "t": { "$lt": 5 } },
            doc! { "$set": { "t": 5 } },
        )
        .upsert(true)
        .await
        .unwrap_err();
    assert_eq!(code_of_write(&err), 11000, "{err}");
    let err = coll
        .find_one_and_update(
            doc! { "_id": 1, "t": { "$lt": 5 } },
            doc! { "$set": { "t": 5 } },
        )
        .upsert(true)
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), 11000, "{err}");
    let doc = coll.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    assert_eq!(doc.get_i32("t").unwrap(), 10);
}
