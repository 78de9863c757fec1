//! Reads: `_id` range scans (the ordered `_id` index) agree with filtering everything,
//! and `readConcern` levels and snapshot reads answer as MongoDB does, through the real
//! driver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bson::{Bson, Document, doc};
use futures_util::TryStreamExt;
use mongo_sim::MongoSim;
use mongodb::{Client, error::ErrorKind};
use proptest::prelude::*;

async fn setup() -> (MongoSim, Client) {
    let sim = MongoSim::start().await.unwrap();
    let client = Client::with_uri_str(sim.uri()).await.unwrap();
    (sim, client)
}

fn code_of(err: &mongodb::error::Error) -> i32 {
    match err.kind.as_ref() {
        ErrorKind::Command(c) => c.code,
        other => panic!("not a command error: {other:?}"),
    }
}

/// `_id`s of mixed types, as MongoDB orders them: numbers (of three types), strings,
/// ObjectIds.
fn ids() -> Vec<Bson> {
    let mut ids: Vec<Bson> = (0..40).map(|n| Bson::Int32(n * 3)).collect();
    ids.extend((0..20).map(|n| Bson::Int64(i64::from(n) * 3 + 1)));
    ids.extend((0..20).map(|n| Bson::Double(f64::from(n) * 3.0 + 2.5)));
    ids.extend((0..20).map(|n| Bson::String(format!("k{n:02}"))));
    ids.extend((0..5).map(|n| Bson::ObjectId(bson::oid::ObjectId::from_bytes([n; 12]))));
    ids
}

#[test]
fn id_range_scans_agree_with_sorting_everything() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_sim, client) = rt.block_on(setup());
    let coll = client.database("reads").collection::<Document>("ranges");
    rt.block_on(async {
        // Inserted in a scrambled order, so natural order is not `_id` order.
        let mut all = ids();
        all.reverse();
        all.rotate_left(37);
        let docs: Vec<Document> = all
            .iter()
            .map(|id| doc! { "_id": id.clone(), "v": 1 })
            .collect();
        coll.insert_many(docs).await.unwrap();
        // A few deleted, so the index follows removals.
        coll.delete_many(doc! { "_id": { "$in": [3, 4_i64, "k03"] } })
            .await
            .unwrap();
    });
    let bound = prop_oneof![
        (0..130_i32).prop_map(Bson::Int32),
        (0..130_i64).prop_map(Bson::Int64),
        (0.0..130.0_f64).prop_map(Bson::Double),
        (0..25_u8).prop_map(|n| Bson::String(format!("k{n:02}"))),
    ];
    let op = prop_oneof![
        Just("$gt"),
        Just("$gte"),
        Just("$lt"),
        Just("$lte"),
        Just("$eq")
    ];
    let spec = (
        proptest::collection::vec((op, bound), 0..3),
        any::<bool>(),
        0..5_i64,
        0..8_i64,
    );
    proptest!(ProptestConfig::with_cases(64), |((conds, ascending, skip, limit) in spec)| {
        let mut range = Document::new();
        for (op, b) in conds {
            range.insert(op, b);
        }
        let filter = if range.is_empty() { doc! {} } else { doc! { "_id": range } };
        let dir = if ascending { 1 } else { -1 };
        let (indexed, whole): (Vec<Document>, Vec<Document>) = rt.block_on(async {
            // By the index: sorted by `_id` alone.
            let indexed: Vec<Document> = coll
                .find(filter.clone())
                .sort(doc! { "_id": dir })
                .skip(u64::try_from(skip).unwrap())
                .limit(limit)
                .batch_size(3)
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            // By filtering everything and sorting on two keys (no index path).
            let mut whole: Vec<Document> = coll
                .find(filter.clone())
                .sort(doc! { "_id": dir, "v": 1 })
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            let skip = usize::try_from(skip).unwrap();
            whole = whole.into_iter().skip(skip).collect();
            if limit > 0 {
                whole.truncate(usize::try_from(limit).unwrap());
            }
            (indexed, whole)
        });
        prop_assert_eq!(indexed, whole, "filter {}", filter);
    });
}

#[tokio::test]
async fn snapshot_reads_tell_their_time_and_read_the_past() {
    let (_sim, client) = setup().await;
    let db = client.database("reads");
    let coll = db.collection::<Document>("snap");
    coll.insert_many((0..10).map(|i| doc! { "_id": i }))
        .await
        .unwrap();

    // A snapshot session: the first read fixes the time, later reads of the session use it.
    let mut session = client.start_session().snapshot(true).await.unwrap();
    let mut cursor = coll
        .find(doc! {})
        .batch_size(4)
        .session(&mut session)
        .await
        .unwrap();
    let at = session
        .snapshot_time()
        .expect("the server told the snapshot's time");
    let mut n = 0;
    while cursor
        .next(&mut session)
        .await
        .transpose()
        .unwrap()
        .is_some()
    {
        n += 1;
    }
    assert_eq!(n, 10);
    // Another collection changes: the snapshot can still be read at `at`.
    db.collection::<Document>("other")
        .insert_one(doc! { "x": 1 })
        .await
        .unwrap();
    let again: Vec<Document> = coll
        .find(doc! { "_id": { "$lt": 3 } })
        .session(&mut session)
        .await
        .unwrap()
        .stream(&mut session)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(again.len(), 3);
    assert_eq!(session.snapshot_time(), Some(at));
    // This collection changes (an insert, an update, a delete): reading at `at` still
    // returns the documents as they were then.
    coll.insert_one(doc! { "_id": 10 }).await.unwrap();
    coll.update_one(doc! { "_id": 0 }, doc! { "$set": { "changed": true } })
        .await
        .unwrap();
    coll.delete_one(doc! { "_id": 1 }).await.unwrap();
    let then: Vec<Document> = coll
        .find(doc! {})
        .session(&mut session)
        .await
        .unwrap()
        .stream(&mut session)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(then, (0..10).map(|i| doc! { "_id": i }).collect::<Vec<_>>());
    let now: Vec<Document> = coll
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(now.len(), 10);
    assert_eq!(now[0], doc! { "_id": 0, "changed": true });
    // A collection dropped since `at` held other data then: SnapshotUnavailable, as the
    // server reports a catalog change under a snapshot read (no catalog history here).
    db.collection::<Document>("other").drop().await.unwrap();
    let err = db
        .run_command(
            doc! { "find": "other", "readConcern": { "level": "snapshot", "atClusterTime": at } },
        )
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), 246, "{err}");

    // distinct answers with its time at the top.
    let reply = db
        .run_command(
            doc! { "distinct": "snap", "key": "_id", "readConcern": { "level": "snapshot" } },
        )
        .await
        .unwrap();
    assert!(
        matches!(reply.get("atClusterTime"), Some(Bson::Timestamp(_))),
        "{reply}"
    );
    // A time in the future, a level that does not exist, a command that takes no
    // snapshot, and atClusterTime without snapshot are refused with the server's codes.
    let future = bson::Timestamp {
        time: u32::MAX,
        increment: 1,
    };
    let cases = [
        (
            doc! { "find": "snap", "readConcern": { "level": "snapshot", "atClusterTime": future } },
            72,
        ),
        (
            doc! { "find": "snap", "readConcern": { "level": "sometimes" } },
            9,
        ),
        (
            doc! { "count": "snap", "readConcern": { "level": "snapshot" } },
            72,
        ),
        (
            doc! { "find": "snap", "readConcern": { "level": "majority", "atClusterTime": at } },
            72,
        ),
        (doc! { "find": "snap", "readConcern": "majority" }, 14),
    ];
    for (cmd, code) in cases {
        let err = db.run_command(cmd.clone()).await.unwrap_err();
        assert_eq!(code_of(&err), code, "{cmd}: {err}");
    }
    // Ordinary levels read as before.
    for level in ["local", "majority", "available", "linearizable"] {
        let reply = db
            .run_command(doc! { "find": "snap", "readConcern": { "level": level } })
            .await
            .unwrap();
        let cursor = reply.get_document("cursor").unwrap();
        assert!(!cursor.contains_key("atClusterTime"), "{level}: {reply}");
    }
}

#[tokio::test]
async fn split_vector_splits_the_id_index_as_the_server_does() {
    let (_sim, client) = setup().await;
    let db = client.database("reads");
    let coll = db.collection::<Document>("split");
    // Inserted out of `_id` order.
    coll.insert_many(
        (0..1000_i64).map(|i| doc! { "_id": (i * 7919) % 1000, "pad": "x".repeat(50) }),
    )
    .await
    .unwrap();
    let size = db
        .run_command(doc! { "collStats": "split" })
        .await
        .unwrap()
        .get_i64("size")
        .unwrap();
    let split = |extra: Document| {
        let mut cmd = doc! { "splitVector": "reads.split", "keyPattern": { "_id": 1 } };
        cmd.extend(extra);
        let db = db.clone();
        async move { db.run_command(cmd).await }
    };
    let keys = |reply: Document| -> Vec<i64> {
        reply
            .get_array("splitKeys")
            .unwrap()
            .iter()
            .map(|k| k.as_document().unwrap().get_i64("_id").unwrap())
            .collect()
    };
    // At most 100 documents per chunk: a split point after every 101 keys.
    let points = keys(
        split(doc! { "maxChunkSizeBytes": size, "maxChunkObjects": 100 })
            .await
            .unwrap(),
    );
    assert_eq!(points, (1..10).map(|k| k * 101).collect::<Vec<_>>());
    // By size alone: half of the maximum per chunk.
    let points = keys(split(doc! { "maxChunkSizeBytes": size / 4 }).await.unwrap());
    assert!((6..=9).contains(&points.len()), "{points:?}");
    assert!(points.windows(2).all(|w| w[0] < w[1]));
    // Within bounds, capped in number.
    let points = keys(
        split(doc! { "maxChunkSizeBytes": size, "maxChunkObjects": 100, "min": { "_id": 500_i64 }, "max": { "_id": 900_i64 }, "maxSplitPoints": 2 })
            .await
            .unwrap(),
    );
    assert_eq!(points, [601, 702]);
    // A collection smaller than one chunk has no split points.
    assert!(keys(split(doc! { "maxChunkSizeBytes": size + 1 }).await.unwrap()).is_empty());
    // Refusals with the server's codes.
    let cases = [
        (
            doc! { "splitVector": "reads.split", "keyPattern": { "pad": 1 }, "maxChunkSize": 1 },
            27,
        ),
        (
            doc! { "splitVector": "reads.split", "keyPattern": { "_id": 1 } },
            2,
        ),
        (
            doc! { "splitVector": "reads.nothing", "keyPattern": { "_id": 1 }, "maxChunkSize": 1 },
            26,
        ),
        (
            doc! { "splitVector": "nodot", "keyPattern": { "_id": 1 }, "maxChunkSize": 1 },
            73,
        ),
    ];
    for (cmd, code) in cases {
        let err = db.run_command(cmd.clone()).await.unwrap_err();
        assert_eq!(code_of(&err), code, "{cmd}: {err}");
    }
}

/// A snapshot read at a time before the history window is SnapshotTooOld (239), as a
/// server answers once `minSnapshotHistoryWindowInSeconds` has passed; inside it, the
/// documents as they were.
#[tokio::test]
async fn a_snapshot_read_before_the_history_window_is_too_old() {
    let sim = MongoSim::start_with(mongo_sim::SimOptions {
        snapshot_history_secs: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = Client::with_uri_str(sim.uri()).await.unwrap();
    let db = client.database("reads");
    let coll = db.collection::<Document>("window");
    coll.insert_one(doc! { "_id": 1, "v": 1 }).await.unwrap();
    let at = db
        .run_command(doc! { "find": "window", "readConcern": { "level": "snapshot" } })
        .await
        .unwrap()
        .get_document("cursor")
        .unwrap()
        .get_timestamp("atClusterTime")
        .unwrap();
    coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "v": 2 } })
        .await
        .unwrap();
    let read_at = |at: bson::Timestamp| {
        doc! { "find": "window", "readConcern": { "level": "snapshot", "atClusterTime": at } }
    };
    let inside = db.run_command(read_at(at)).await.unwrap();
    let batch = inside
        .get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap();
    assert_eq!(batch, &vec![Bson::Document(doc! { "_id": 1, "v": 1 })]);
    let window = db
        .run_command(doc! { "getParameter": 1, "minSnapshotHistoryWindowInSeconds": 1 })
        .await;
    assert!(window.is_err(), "getParameter runs on admin only");
    let window = client
        .database("admin")
        .run_command(doc! { "getParameter": 1, "minSnapshotHistoryWindowInSeconds": 1 })
        .await
        .unwrap();
    assert_eq!(
        window.get_i32("minSnapshotHistoryWindowInSeconds").unwrap(),
        1
    );
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "v": 3 } })
        .await
        .unwrap();
    let err = db.run_command(read_at(at)).await.unwrap_err();
    assert_eq!(code_of(&err), 239, "{err}");
    assert!(err.to_string().contains("history window"), "{err}");
}

/// A transaction left uncommitted past `transactionLifetimeLimitSeconds` is aborted, as
/// the server's reaper aborts it: its next command is NoSuchTransaction (251, labelled
/// TransientTransactionError), nothing of it is applied, and its snapshot no longer holds
/// the history window back (a read at its start time is then SnapshotTooOld).
#[tokio::test]
async fn an_abandoned_transaction_expires_and_lets_its_snapshot_go() {
    let sim = MongoSim::start_with(mongo_sim::SimOptions {
        snapshot_history_secs: 1,
        transaction_lifetime_secs: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = Client::with_uri_str(sim.uri()).await.unwrap();
    let db = client.database("reads");
    let coll = db.collection::<Document>("expiry");
    coll.insert_one(doc! { "_id": 1, "v": 1 }).await.unwrap();
    let limit = client
        .database("admin")
        .run_command(doc! { "getParameter": 1, "transactionLifetimeLimitSeconds": 1 })
        .await
        .unwrap();
    assert_eq!(limit.get_i32("transactionLifetimeLimitSeconds").unwrap(), 1);
    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "v": 2 } })
        .session(&mut session)
        .await
        .unwrap();
    let started = session.operation_time().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    // Another write moves the horizon on (and reaps).
    coll.insert_one(doc! { "_id": 2 }).await.unwrap();
    let err = coll
        .update_one(doc! { "_id": 1 }, doc! { "$set": { "v": 3 } })
        .session(&mut session)
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), 251, "{err}");
    assert!(err.contains_label("TransientTransactionError"), "{err}");
    let doc = coll.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    assert_eq!(doc.get_i32("v").unwrap(), 1, "nothing of it applied");
    let err = db
        .run_command(doc! {
            "find": "expiry",
            "readConcern": { "level": "snapshot", "atClusterTime": started },
        })
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), 239, "{err}");
    sim.shutdown().await;
}
