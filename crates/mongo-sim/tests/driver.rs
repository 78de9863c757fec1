//! mongo-sim driven only through the official `mongodb` driver: CRUD, queries, every
//! event type and option, resume positions, history loss, invalidation, transactions and
//! the long-poll wake-up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bson::{Bson, Document, doc};
use futures_util::TryStreamExt;
use mongo_sim::{MongoSim, SimOptions};
use mongodb::{
    Client, Collection,
    change_stream::{
        ChangeStream,
        event::{ChangeStreamEvent, OperationType, ResumeToken},
    },
    error::{Error, ErrorKind},
    options::{FullDocumentBeforeChangeType, FullDocumentType, ReturnDocument},
};

async fn setup() -> (MongoSim, Client) {
    setup_with(SimOptions::default()).await
}

async fn setup_with(options: SimOptions) -> (MongoSim, Client) {
    let sim = MongoSim::start_with(options).await.unwrap();
    let client = Client::with_uri_str(sim.uri()).await.unwrap();
    (sim, client)
}

fn code(err: &Error) -> Option<i32> {
    match err.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .and_then(|e| e.first())
            .map(|e| e.code),
        _ => None,
    }
}

/// The next event, with a guard so a hang fails the test instead of stalling the suite.
async fn next(
    stream: &mut ChangeStream<ChangeStreamEvent<Document>>,
) -> ChangeStreamEvent<Document> {
    tokio::time::timeout(Duration::from_secs(20), stream.try_next())
        .await
        .expect("no event within 20 s")
        .expect("stream failed")
        .expect("stream ended")
}

async fn next_err(stream: &mut ChangeStream<ChangeStreamEvent<Document>>) -> Error {
    tokio::time::timeout(Duration::from_secs(20), stream.try_next())
        .await
        .expect("no answer within 20 s")
        .expect_err("expected an error")
}

#[tokio::test]
async fn crud_and_queries() {
    let (sim, client) = setup().await;
    let coll: Collection<Document> = client.database("app").collection("items");
    coll.insert_many(vec![
        doc! { "_id": 1, "n": 5, "tags": ["a", "b"], "sub": { "x": 1 } },
        doc! { "_id": 2, "n": 3, "tags": ["c"] },
        doc! { "_id": 3, "n": 9, "s": "z" },
    ])
    .await
    .unwrap();
    let auto = coll.insert_one(doc! { "n": 1 }).await.unwrap();
    assert!(matches!(auto.inserted_id, Bson::ObjectId(_)));

    let ids = |docs: Vec<Document>| {
        docs.iter()
            .map(|d| d.get("_id").unwrap().clone())
            .collect::<Vec<_>>()
    };
    let sorted: Vec<Document> = coll
        .find(doc! { "n": { "$gte": 3 } })
        .sort(doc! { "n": -1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        ids(sorted),
        vec![Bson::Int32(3), Bson::Int32(1), Bson::Int32(2)]
    );
    let page: Vec<Document> = coll
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .skip(1)
        .limit(1)
        .projection(doc! { "n": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(page, vec![doc! { "_id": 2, "n": 3 }]);
    assert_eq!(coll.count_documents(doc! { "tags": "b" }).await.unwrap(), 1);
    assert_eq!(
        coll.count_documents(doc! { "sub.x": 1, "n": { "$in": [5, 6] } })
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        coll.count_documents(doc! { "$or": [{ "n": 3 }, { "s": { "$exists": true } }] })
            .await
            .unwrap(),
        2
    );

    let r = coll
        .update_one(
            doc! { "_id": 1 },
            doc! { "$inc": { "n": 1 }, "$set": { "sub.y": 2 } },
        )
        .await
        .unwrap();
    assert_eq!((r.matched_count, r.modified_count), (1, 1));
    let r = coll
        .update_many(
            doc! { "n": { "$lt": 100 } },
            doc! { "$set": { "seen": true } },
        )
        .await
        .unwrap();
    assert_eq!(r.matched_count, 4);
    let r = coll
        .update_one(doc! { "_id": 2 }, vec![doc! { "$set": { "m": "$n" } }])
        .await
        .unwrap();
    assert_eq!(r.modified_count, 1);
    assert_eq!(
        coll.find_one(doc! { "_id": 2 })
            .await
            .unwrap()
            .unwrap()
            .get_i32("m")
            .unwrap(),
        3
    );
    let r = coll
        .replace_one(doc! { "_id": 3 }, doc! { "replaced": true })
        .await
        .unwrap();
    assert_eq!(r.modified_count, 1);
    assert_eq!(
        coll.find_one(doc! { "_id": 3 }).await.unwrap().unwrap(),
        doc! { "_id": 3, "replaced": true }
    );
    let r = coll
        .update_one(doc! { "_id": 7 }, doc! { "$set": { "new": 1 } })
        .upsert(true)
        .await
        .unwrap();
    assert_eq!(r.upserted_id, Some(Bson::Int32(7)));
    let after = coll
        .find_one_and_update(doc! { "_id": 7 }, doc! { "$inc": { "new": 1 } })
        .return_document(ReturnDocument::After)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.get_i32("new").unwrap(), 2);
    let gone = coll
        .find_one_and_delete(doc! { "_id": 7 })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(gone.get_i32("new").unwrap(), 2);
    // The replacement of _id 3 dropped its `seen` field.
    assert_eq!(
        coll.delete_many(doc! { "seen": true })
            .await
            .unwrap()
            .deleted_count,
        3
    );
    assert_eq!(coll.estimated_document_count().await.unwrap(), 1);
    coll.delete_many(doc! {}).await.unwrap();

    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    let dup = coll.insert_one(doc! { "_id": 1 }).await.unwrap_err();
    assert_eq!(code(&dup), Some(11000));
    let bad = coll
        .find_one(doc! { "a": { "$elemMatch": { "x": 1 } } })
        .await
        .unwrap_err();
    assert_eq!(
        code(&bad),
        Some(2),
        "unsupported operators are errors, never silent"
    );
    let bad = coll
        .update_one(doc! {}, doc! { "$rename": { "a": "b" } })
        .await
        .unwrap_err();
    assert_eq!(code(&bad), Some(9));
    sim.shutdown().await;
}

#[tokio::test]
async fn collections_indexes_and_unknown_commands() {
    let (sim, client) = setup().await;
    let db = client.database("app");
    db.create_collection("a").await.unwrap();
    let err = db.create_collection("a").await.unwrap_err();
    assert_eq!(code(&err), Some(48));
    let coll: Collection<Document> = db.collection("a");
    coll.create_index(mongodb::IndexModel::builder().keys(doc! { "x": 1 }).build())
        .await
        .unwrap();
    let mut names = coll.list_index_names().await.unwrap();
    names.sort();
    assert_eq!(names, vec!["_id_", "x_1"]);
    coll.drop_index("x_1").await.unwrap();
    assert_eq!(code(&coll.drop_index("x_1").await.unwrap_err()), Some(27));
    assert_eq!(db.list_collection_names().await.unwrap(), vec!["a"]);
    assert!(
        client
            .list_database_names()
            .await
            .unwrap()
            .contains(&"app".to_owned())
    );
    coll.drop().await.unwrap();
    assert!(db.list_collection_names().await.unwrap().is_empty());
    let err = db.run_command(doc! { "frobnicate": 1 }).await.unwrap_err();
    assert_eq!(code(&err), Some(59));
    // The server keeps working after an error.
    db.run_command(doc! { "ping": 1 }).await.unwrap();
    let build = db.run_command(doc! { "buildInfo": 1 }).await.unwrap();
    assert_eq!(build.get_str("version").unwrap(), "7.0.12");
    sim.shutdown().await;
}

#[tokio::test]
async fn direct_connection_works() {
    let sim = MongoSim::start().await.unwrap();
    let client = Client::with_uri_str(sim.direct_uri()).await.unwrap();
    client
        .database("x")
        .collection::<Document>("y")
        .insert_one(doc! { "a": 1 })
        .await
        .unwrap();
    sim.shutdown().await;
}

#[tokio::test]
async fn every_document_event_type_is_shaped_like_mongodb() {
    let (sim, client) = setup().await;
    let coll: Collection<Document> = client.database("app").collection("c");
    let mut stream = coll.watch().await.unwrap();
    coll.insert_one(doc! { "_id": 1, "a": 1, "arr": [1, 2, 3] })
        .await
        .unwrap();
    coll.update_one(
        doc! { "_id": 1 },
        doc! { "$set": { "a": 2 }, "$unset": { "zz": "" } },
    )
    .await
    .unwrap();
    coll.update_one(doc! { "_id": 1 }, vec![doc! { "$set": { "arr": [1] } }])
        .await
        .unwrap();
    coll.update_one(doc! { "_id": 1 }, doc! { "$unset": { "a": "" } })
        .await
        .unwrap();
    coll.replace_one(doc! { "_id": 1 }, doc! { "b": 1 })
        .await
        .unwrap();
    coll.delete_one(doc! { "_id": 1 }).await.unwrap();

    let insert = next(&mut stream).await;
    assert_eq!(insert.operation_type, OperationType::Insert);
    assert_eq!(insert.document_key, Some(doc! { "_id": 1 }));
    assert_eq!(
        insert.full_document,
        Some(doc! { "_id": 1, "a": 1, "arr": [1, 2, 3] })
    );
    assert!(insert.cluster_time.is_some() && insert.wall_time.is_some());
    let ns = insert.ns.unwrap();
    assert_eq!((ns.db.as_str(), ns.coll.as_deref()), ("app", Some("c")));

    let update = next(&mut stream).await;
    assert_eq!(update.operation_type, OperationType::Update);
    let ud = update.update_description.unwrap();
    assert_eq!(ud.updated_fields, doc! { "a": 2 });
    assert!(ud.removed_fields.is_empty());
    assert!(
        update.full_document.is_none(),
        "default mode: no document on updates"
    );

    let truncate = next(&mut stream).await;
    let ud = truncate.update_description.unwrap();
    let truncated = ud.truncated_arrays.unwrap();
    assert_eq!(
        (truncated[0].field.as_str(), truncated[0].new_size),
        ("arr", 1)
    );

    let unset = next(&mut stream).await;
    assert_eq!(
        unset.update_description.unwrap().removed_fields,
        vec!["a".to_owned()]
    );

    let replace = next(&mut stream).await;
    assert_eq!(replace.operation_type, OperationType::Replace);
    assert_eq!(replace.full_document, Some(doc! { "_id": 1, "b": 1 }));

    let delete = next(&mut stream).await;
    assert_eq!(delete.operation_type, OperationType::Delete);
    assert_eq!(delete.document_key, Some(doc! { "_id": 1 }));
    assert!(insert.id != delete.id);
    sim.shutdown().await;
}

#[tokio::test]
async fn drop_and_rename_invalidate_collection_streams() {
    let (sim, client) = setup().await;
    let db = client.database("app");
    let coll: Collection<Document> = db.collection("c");
    coll.insert_one(doc! { "_id": 0 }).await.unwrap();
    let mut stream = coll.watch().await.unwrap();
    coll.drop().await.unwrap();
    assert_eq!(next(&mut stream).await.operation_type, OperationType::Drop);
    let invalidate = next(&mut stream).await;
    assert_eq!(invalidate.operation_type, OperationType::Invalidate);
    assert!(
        stream.try_next().await.unwrap().is_none(),
        "the cursor closes after invalidate"
    );
    assert!(!stream.is_alive());

    // resumeAfter an invalidate is refused; startAfter it continues on the new collection.
    let err = coll
        .watch()
        .resume_after(invalidate.id.clone())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(260));
    let mut again = coll
        .watch()
        .start_after(invalidate.id.clone())
        .await
        .unwrap();
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    let e = next(&mut again).await;
    assert_eq!(
        (e.operation_type, e.document_key),
        (OperationType::Insert, Some(doc! { "_id": 1 }))
    );

    let mut renamed = coll.watch().await.unwrap();
    client
        .database("admin")
        .run_command(doc! { "renameCollection": "app.c", "to": "app.d" })
        .await
        .unwrap();
    let rename = next(&mut renamed).await;
    assert_eq!(rename.operation_type, OperationType::Rename);
    assert_eq!(rename.to.unwrap().coll.as_deref(), Some("d"));
    assert_eq!(
        next(&mut renamed).await.operation_type,
        OperationType::Invalidate
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn database_and_cluster_streams() {
    let (sim, client) = setup().await;
    let db = client.database("app");
    let mut db_stream = db.watch().await.unwrap();
    let mut cluster = client.watch().await.unwrap();
    db.collection::<Document>("a")
        .insert_one(doc! { "x": 1 })
        .await
        .unwrap();
    client
        .database("other")
        .collection::<Document>("b")
        .insert_one(doc! { "y": 1 })
        .await
        .unwrap();
    db.drop().await.unwrap();

    let e = next(&mut db_stream).await;
    assert_eq!(e.ns.unwrap().coll.as_deref(), Some("a"));
    assert_eq!(
        next(&mut db_stream).await.operation_type,
        OperationType::Drop
    );
    assert_eq!(
        next(&mut db_stream).await.operation_type,
        OperationType::DropDatabase
    );
    assert_eq!(
        next(&mut db_stream).await.operation_type,
        OperationType::Invalidate
    );

    assert_eq!(next(&mut cluster).await.ns.unwrap().db, "app");
    assert_eq!(next(&mut cluster).await.ns.unwrap().db, "other");
    assert_eq!(next(&mut cluster).await.operation_type, OperationType::Drop);
    assert_eq!(
        next(&mut cluster).await.operation_type,
        OperationType::DropDatabase
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn full_document_and_pre_image_modes() {
    let (sim, client) = setup().await;
    let db = client.database("app");
    let plain: Collection<Document> = db.collection("plain");
    plain.insert_one(doc! { "_id": 1, "v": 1 }).await.unwrap();
    let mut lookup = plain
        .watch()
        .full_document(FullDocumentType::UpdateLookup)
        .await
        .unwrap();
    let mut when = plain
        .watch()
        .full_document(FullDocumentType::WhenAvailable)
        .full_document_before_change(FullDocumentBeforeChangeType::WhenAvailable)
        .await
        .unwrap();
    let mut required = plain
        .watch()
        .full_document_before_change(FullDocumentBeforeChangeType::Required)
        .await
        .unwrap();
    plain
        .update_one(doc! { "_id": 1 }, doc! { "$set": { "v": 2 } })
        .await
        .unwrap();
    assert_eq!(
        next(&mut lookup).await.full_document,
        Some(doc! { "_id": 1, "v": 2 })
    );
    let e = next(&mut when).await;
    assert_eq!(
        (e.full_document, e.full_document_before_change),
        (None, None)
    );
    assert_eq!(
        code(&next_err(&mut required).await),
        Some(47),
        "required pre-image missing"
    );

    db.run_command(
        doc! { "create": "imaged", "changeStreamPreAndPostImages": { "enabled": true } },
    )
    .await
    .unwrap();
    let imaged: Collection<Document> = db.collection("imaged");
    imaged.insert_one(doc! { "_id": 1, "v": 1 }).await.unwrap();
    let mut both = imaged
        .watch()
        .full_document(FullDocumentType::Required)
        .full_document_before_change(FullDocumentBeforeChangeType::Required)
        .await
        .unwrap();
    imaged
        .update_one(doc! { "_id": 1 }, doc! { "$set": { "v": 2 } })
        .await
        .unwrap();
    imaged.delete_one(doc! { "_id": 1 }).await.unwrap();
    let e = next(&mut both).await;
    assert_eq!(e.full_document, Some(doc! { "_id": 1, "v": 2 }));
    assert_eq!(
        e.full_document_before_change,
        Some(doc! { "_id": 1, "v": 1 })
    );
    let d = next(&mut both).await;
    assert_eq!(
        d.full_document_before_change,
        Some(doc! { "_id": 1, "v": 2 })
    );

    // collMod toggles images; the old recordPreImages form is refused as on 6.0+.
    db.run_command(
        doc! { "collMod": "plain", "changeStreamPreAndPostImages": { "enabled": true } },
    )
    .await
    .unwrap();
    let err = db
        .run_command(doc! { "collMod": "plain", "recordPreImages": true })
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(72));
    sim.shutdown().await;
}

#[tokio::test]
async fn resume_after_start_at_and_history_loss() {
    let (sim, client) = setup_with(SimOptions {
        oplog_capacity: 50,
        ..SimOptions::default()
    })
    .await;
    let coll: Collection<Document> = client.database("app").collection("c");
    let mut stream = coll.watch().await.unwrap();
    for i in 0..5 {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
    }
    let mut events = Vec::new();
    for _ in 0..5 {
        events.push(next(&mut stream).await);
    }
    // Resume after the third: exactly the fourth and fifth, nothing again.
    let mut resumed = coll
        .watch()
        .resume_after(events[2].id.clone())
        .await
        .unwrap();
    assert_eq!(
        next(&mut resumed).await.document_key,
        Some(doc! { "_id": 3 })
    );
    assert_eq!(
        next(&mut resumed).await.document_key,
        Some(doc! { "_id": 4 })
    );
    // Start at the second's cluster time: inclusive.
    let mut at = coll
        .watch()
        .start_at_operation_time(events[1].cluster_time.unwrap())
        .await
        .unwrap();
    assert_eq!(next(&mut at).await.document_key, Some(doc! { "_id": 1 }));

    // Roll the oplog past the first event: resuming there is ChangeStreamHistoryLost.
    for i in 100..160 {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
    }
    let err = coll
        .watch()
        .resume_after(events[0].id.clone())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(286));
    let err = coll
        .watch()
        .start_at_operation_time(events[0].cluster_time.unwrap())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(286));
    // A stream left behind by the rollover fails the same way on its next getMore.
    let err = next_err(&mut stream).await;
    assert_eq!(code(&err), Some(286));
    sim.shutdown().await;
}

#[tokio::test]
async fn shrinking_the_oplog_loses_history() {
    let (sim, client) = setup().await;
    let coll: Collection<Document> = client.database("app").collection("c");
    let mut stream = coll.watch().await.unwrap();
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    let first = next(&mut stream).await;
    coll.insert_one(doc! { "_id": 2 }).await.unwrap();
    coll.insert_one(doc! { "_id": 3 }).await.unwrap();
    sim.set_oplog_capacity(1);
    assert_eq!(sim.oplog_len(), 1);
    let err = coll.watch().resume_after(first.id).await.unwrap_err();
    assert_eq!(code(&err), Some(286));
    sim.shutdown().await;
}

#[tokio::test]
async fn transactions_apply_atomically_with_one_cluster_time() {
    let (sim, client) = setup().await;
    let coll: Collection<Document> = client.database("app").collection("t");
    coll.insert_one(doc! { "_id": 0 }).await.unwrap();
    let mut stream = coll.watch().await.unwrap();
    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    coll.insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    coll.update_one(doc! { "_id": 0 }, doc! { "$set": { "t": 1 } })
        .session(&mut session)
        .await
        .unwrap();
    // Not visible outside before commit; visible inside.
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 1);
    assert_eq!(
        coll.count_documents(doc! {})
            .session(&mut session)
            .await
            .unwrap(),
        2
    );
    session.commit_transaction().await.unwrap();
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 2);
    let a = next(&mut stream).await;
    let b = next(&mut stream).await;
    assert_eq!(
        a.cluster_time, b.cluster_time,
        "one cluster time for the transaction"
    );
    assert!(a.id != b.id);
    assert!(a.lsid.is_some() && a.txn_number.is_some());

    session.start_transaction().await.unwrap();
    coll.insert_one(doc! { "_id": 2 })
        .session(&mut session)
        .await
        .unwrap();
    session.abort_transaction().await.unwrap();
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 2);
    coll.insert_one(doc! { "_id": 3 }).await.unwrap();
    assert_eq!(
        next(&mut stream).await.document_key,
        Some(doc! { "_id": 3 }),
        "aborted writes leave no event"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_waiting_get_more_wakes_on_a_new_event() {
    let (sim, client) = setup().await;
    let coll: Collection<Document> = client.database("app").collection("c");
    // The server may hold this getMore for two minutes; only a wake-up makes it return
    // sooner, and the guard in `next` fails the test after 20 s.
    let mut stream = coll
        .watch()
        .max_await_time(Duration::from_secs(120))
        .await
        .unwrap();
    let writer = coll.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        writer.insert_one(doc! { "_id": 1 }).await.unwrap();
    });
    assert_eq!(
        next(&mut stream).await.document_key,
        Some(doc! { "_id": 1 })
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn post_batch_token_advances_past_filtered_events() {
    let (sim, client) = setup().await;
    let coll: Collection<Document> = client.database("app").collection("c");
    let mut stream = coll
        .watch()
        .pipeline([doc! { "$match": { "operationType": "delete" } }])
        .max_await_time(Duration::from_millis(50))
        .await
        .unwrap();
    let before = stream.resume_token().unwrap();
    for i in 0..10 {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
    }
    // The first call consumes the (empty) first batch of `aggregate`; a `getMore` follows.
    let mut after = before.clone();
    for _ in 0..5 {
        assert!(stream.next_if_any().await.unwrap().is_none());
        after = stream.resume_token().unwrap();
        if after != before {
            break;
        }
    }
    assert_ne!(
        before, after,
        "the post-batch token moved past the filtered inserts"
    );
    // Resuming from it skips them all.
    coll.delete_one(doc! { "_id": 3 }).await.unwrap();
    let mut resumed = coll.watch().resume_after(after).await.unwrap();
    let e = next(&mut resumed).await;
    assert_eq!(e.operation_type, OperationType::Delete);
    sim.shutdown().await;
}

#[tokio::test]
async fn pipeline_stages_and_their_errors() {
    let (sim, client) = setup().await;
    let coll: Collection<Document> = client.database("app").collection("c");
    let mut projected = coll
        .watch()
        .pipeline([
            doc! { "$match": { "fullDocument.keep": true } },
            doc! { "$addFields": { "db": "$ns.db" } },
            doc! { "$project": { "db": 1, "operationType": 1 } },
        ])
        .await
        .unwrap()
        .with_type::<Document>();
    let mut bad_id = coll
        .watch()
        .pipeline([doc! { "$project": { "_id": 0 } }])
        .await
        .unwrap();
    let err = coll
        .watch()
        .pipeline([doc! { "$unsupported": 1 }])
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(40324));
    coll.insert_one(doc! { "_id": 1, "keep": false })
        .await
        .unwrap();
    coll.insert_one(doc! { "_id": 2, "keep": true })
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(20), projected.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(e.get_str("db").unwrap(), "app");
    assert!(e.contains_key("_id") && !e.contains_key("fullDocument"));
    let err = next_err(&mut bad_id).await;
    assert_eq!(code(&err), Some(280));
    assert!(err.contains_label("NonResumableChangeStreamError"));
    sim.shutdown().await;
}

#[tokio::test]
async fn expanded_events_and_document_keys_of_any_type() {
    let (sim, client) = setup().await;
    let db = client.database("app");
    let mut stream = db
        .watch()
        .show_expanded_events(true)
        .await
        .unwrap()
        .with_type::<Document>();
    let coll: Collection<Document> = db.collection("k");
    let oid = bson::oid::ObjectId::new();
    for id in [
        Bson::ObjectId(oid),
        Bson::String("s".into()),
        Bson::Int64(7),
        Bson::Document(doc! { "a": 1, "b": 2 }),
    ] {
        coll.insert_one(doc! { "_id": id }).await.unwrap();
    }
    coll.create_index(mongodb::IndexModel::builder().keys(doc! { "x": 1 }).build())
        .await
        .unwrap();
    let mut kinds = Vec::new();
    for _ in 0..6 {
        let e = tokio::time::timeout(Duration::from_secs(20), stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        kinds.push(e.get_str("operationType").unwrap().to_owned());
        if kinds.last().unwrap() == "insert" {
            assert!(e.contains_key("collectionUUID"));
        }
    }
    assert_eq!(
        kinds,
        vec![
            "create",
            "insert",
            "insert",
            "insert",
            "insert",
            "createIndexes"
        ]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn restart_keeps_data_and_oplog() {
    let (mut sim, client) = setup().await;
    let coll: Collection<Document> = client.database("app").collection("c");
    let mut stream = coll.watch().await.unwrap();
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    let first = next(&mut stream).await;
    sim.restart().await.unwrap();
    coll.insert_one(doc! { "_id": 2 }).await.unwrap();
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 2);
    let mut resumed = coll
        .watch()
        .resume_after(Some::<ResumeToken>(first.id))
        .await
        .unwrap();
    assert_eq!(
        next(&mut resumed).await.document_key,
        Some(doc! { "_id": 2 })
    );
    sim.shutdown().await;
}

/// When a batch ends on an event and nothing later was scanned, its post-batch resume
/// token is that event's `_id`, byte for byte (a client tracking the post-batch token sees
/// the event's own); when later entries were scanned and filtered out, it moves past them.
/// Read through raw commands: the driver reports a batch's last `_id` itself until its
/// next `getMore`, so only the server's reply shows the token.
#[tokio::test]
async fn the_post_batch_token_is_the_last_event_s_id_unless_more_was_scanned() {
    let (sim, client) = setup().await;
    let db = client.database("pbrt");
    db.create_collection("c").await.unwrap();
    let coll: Collection<Document> = db.collection("c");
    let open = |filter: Document| {
        let db = db.clone();
        async move {
            let mut pipeline = vec![doc! { "$changeStream": {} }];
            if !filter.is_empty() {
                pipeline.push(doc! { "$match": filter });
            }
            let r = db
                .run_command(doc! { "aggregate": "c", "pipeline": pipeline, "cursor": {} })
                .await
                .unwrap();
            r.get_document("cursor").unwrap().get_i64("id").unwrap()
        }
    };
    let get_more = |id: i64| {
        let db = db.clone();
        async move {
            let r = db
                .run_command(doc! { "getMore": id, "collection": "c" })
                .await
                .unwrap();
            let cursor = r.get_document("cursor").unwrap().clone();
            let batch = cursor.get_array("nextBatch").unwrap().clone();
            let pbrt = cursor.get_document("postBatchResumeToken").unwrap().clone();
            (batch, pbrt)
        }
    };
    let id = open(doc! {}).await;
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    let (batch, pbrt) = get_more(id).await;
    let last = batch.last().unwrap().as_document().unwrap();
    assert_eq!(&pbrt, last.get_document("_id").unwrap(), "{batch:?}");

    // A filter: the matching event, then one filtered out, both before the batch.
    let id = open(doc! { "documentKey._id": { "$ne": 3 } }).await;
    coll.insert_one(doc! { "_id": 2 }).await.unwrap();
    coll.insert_one(doc! { "_id": 3 }).await.unwrap();
    let (batch, pbrt) = get_more(id).await;
    assert_eq!(batch.len(), 1, "{batch:?}");
    let last = batch[0]
        .as_document()
        .unwrap()
        .get_document("_id")
        .unwrap()
        .clone();
    assert_ne!(pbrt, last, "the filtered entry after it was scanned");
    assert!(
        pbrt.get_str("_data").unwrap() > last.get_str("_data").unwrap(),
        "{pbrt} after {last}"
    );
    // Resuming from it starts after both.
    coll.insert_one(doc! { "_id": 4 }).await.unwrap();
    let mut resumed = coll
        .watch()
        .resume_after(
            bson::deserialize_from_bson::<ResumeToken>(Bson::Document(pbrt.clone())).unwrap(),
        )
        .await
        .unwrap();
    let event = next(&mut resumed).await;
    assert_eq!(event.document_key, Some(doc! { "_id": 4 }));
    sim.shutdown().await;
}

/// `$regex` through the driver: in `find` (string with `$options`, a BSON regular
/// expression, in `$in`), and in a database change stream's `$match` on the namespace —
/// how users pick collections by name.
#[tokio::test]
async fn regular_expressions_in_find_and_in_a_change_stream() {
    let (sim, client) = setup().await;
    let db = client.database("rx");
    let people: Collection<Document> = db.collection("people");
    people
        .insert_many([
            doc! { "_id": 1, "name": "Alice" },
            doc! { "_id": 2, "name": "bob" },
            doc! { "_id": 3, "name": "ALINE" },
        ])
        .await
        .unwrap();
    let ids = |docs: Vec<Document>| {
        docs.iter()
            .map(|d| d.get_i32("_id").unwrap())
            .collect::<Vec<_>>()
    };
    let found: Vec<Document> = people
        .find(doc! { "name": { "$regex": "^al", "$options": "i" } })
        .sort(doc! { "_id": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(ids(found), [1, 3]);
    let found: Vec<Document> = people
        .find(doc! { "name": { "$in": [bson::Regex { pattern: bson::raw::CString::try_from("^b").unwrap(), options: bson::raw::CString::try_from("").unwrap() }, "Alice"] } })
        .sort(doc! { "_id": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(ids(found), [1, 2]);
    let err = people
        .find(doc! { "name": { "$regex": "(" } })
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(51091), "{err}");

    let mut stream = db
        .watch()
        .pipeline([doc! { "$match": { "ns.coll": { "$regex": "^orders_" } } }])
        .await
        .unwrap();
    db.collection::<Document>("other")
        .insert_one(doc! { "_id": 1 })
        .await
        .unwrap();
    db.collection::<Document>("orders_2024")
        .insert_one(doc! { "_id": 2 })
        .await
        .unwrap();
    let event = next(&mut stream).await;
    assert_eq!(event.ns.unwrap().coll.as_deref(), Some("orders_2024"));
    sim.shutdown().await;
}

/// The oplog as a client reads it (`rs.printReplicationInfo()`'s way): `find` on
/// `local.oplog.rs` sorted by `$natural` with a limit gives the oldest and the newest
/// entries with their fields, a filter on `ts` works, entries roll over at the capacity,
/// and `replSetGetStatus` reports the newest as its optimes.
#[tokio::test]
async fn the_oplog_reads_as_local_oplog_rs() {
    let (sim, client) = setup_with(SimOptions {
        oplog_capacity: 20,
        ..SimOptions::default()
    })
    .await;
    let coll: Collection<Document> = client.database("ol").collection("c");
    let oplog: Collection<Document> = client.database("local").collection("oplog.rs");
    let end = |dir: i32| {
        let oplog = oplog.clone();
        async move {
            oplog
                .find_one(doc! {})
                .sort(doc! { "$natural": dir })
                .await
                .unwrap()
                .unwrap()
        }
    };
    coll.insert_one(doc! { "_id": 1, "v": 1 }).await.unwrap();
    coll.update_one(
        doc! { "_id": 1 },
        doc! { "$set": { "v": 2 }, "$unset": { "w": 1 } },
    )
    .await
    .unwrap();
    coll.delete_one(doc! { "_id": 1 }).await.unwrap();
    let newest = end(-1).await;
    assert_eq!(newest.get_str("op").unwrap(), "d");
    assert_eq!(newest.get_str("ns").unwrap(), "ol.c");
    assert_eq!(newest.get_document("o").unwrap(), &doc! { "_id": 1 });
    for field in ["ts", "t", "v", "wall", "ui"] {
        assert!(newest.contains_key(field), "{field}: {newest}");
    }
    let updates: Vec<Document> = oplog
        .find(doc! { "op": "u", "ns": "ol.c" })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(updates.len(), 1);
    assert_eq!(
        updates[0].get_document("o").unwrap(),
        &doc! { "$v": 2, "diff": { "u": { "v": 2 } } }
    );
    assert_eq!(updates[0].get_document("o2").unwrap(), &doc! { "_id": 1 });
    let status = client
        .database("admin")
        .run_command(doc! { "replSetGetStatus": 1 })
        .await
        .unwrap();
    let applied = status
        .get_document("optimes")
        .unwrap()
        .get_document("appliedOpTime")
        .unwrap()
        .get_timestamp("ts")
        .unwrap();
    assert_eq!(applied, newest.get_timestamp("ts").unwrap());
    // A filter on ts, and the window moving when the log rolls over.
    let oldest = end(1).await.get_timestamp("ts").unwrap();
    for i in 2..40 {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
    }
    let rolled = end(1).await.get_timestamp("ts").unwrap();
    assert!(rolled > oldest, "{rolled:?} after {oldest:?}");
    let all: Vec<Document> = oplog
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 20);
    let later: Vec<Document> = oplog
        .find(doc! { "ts": { "$gt": all[9].get_timestamp("ts").unwrap() } })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(later.len(), 10);
    sim.shutdown().await;
}

/// `oplog_size_bytes` (`--oplog-size-mb`) bounds the oplog by the bytes of its entries:
/// 200 inserts of 10 KB into a 1 MiB oplog leave about 100 entries, the newest ones.
#[tokio::test]
async fn the_oplog_is_bounded_by_bytes_too() {
    let (sim, client) = setup_with(SimOptions {
        oplog_size_bytes: Some(1 << 20),
        ..SimOptions::default()
    })
    .await;
    let coll: Collection<Document> = client.database("ob").collection("c");
    let pad = "x".repeat(10_000);
    for i in 0..200 {
        coll.insert_one(doc! { "_id": i, "pad": &pad })
            .await
            .unwrap();
    }
    let oplog: Collection<Document> = client.database("local").collection("oplog.rs");
    let all: Vec<Document> = oplog
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let bytes: usize = all.iter().map(|d| d.to_vec().unwrap().len()).sum();
    assert!(bytes <= 1 << 20, "{bytes} bytes kept");
    assert!(
        (90..=105).contains(&all.len()),
        "{} entries kept",
        all.len()
    );
    let newest = all.last().unwrap();
    assert_eq!(
        newest.get_document("o").unwrap().get_i32("_id").unwrap(),
        199
    );
    sim.shutdown().await;
}

/// Transactions conflict as WiredTiger's do: only on a document both wrote. Two
/// interleaved transactions on different documents of one collection both commit; two on
/// the same document: the second is a WriteConflict labelled TransientTransactionError,
/// and nothing of it is applied; a non-transactional write to a document a transaction
/// wrote conflicts too; a write to a document changed after the transaction's snapshot
/// conflicts at that write.
#[tokio::test]
async fn transactions_conflict_only_on_the_same_document() {
    let (sim, client) = setup().await;
    let coll: Collection<Document> = client.database("tx").collection("c");
    coll.insert_many([doc! { "_id": 1, "v": 0 }, doc! { "_id": 2, "v": 0 }])
        .await
        .unwrap();
    let mut a = client.start_session().await.unwrap();
    let mut b = client.start_session().await.unwrap();
    a.start_transaction().await.unwrap();
    b.start_transaction().await.unwrap();
    coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "v": 1 } })
        .session(&mut a)
        .await
        .unwrap();
    coll.update_one(doc! { "_id": 2 }, doc! { "$set": { "v": 2 } })
        .session(&mut b)
        .await
        .unwrap();
    coll.insert_one(doc! { "_id": 3, "v": 3 })
        .session(&mut b)
        .await
        .unwrap();
    // Each reads its snapshot with its own writes, not the other's.
    let seen_by_a = coll
        .find_one(doc! { "_id": 2 })
        .session(&mut a)
        .await
        .unwrap();
    assert_eq!(seen_by_a, Some(doc! { "_id": 2, "v": 0 }));
    a.commit_transaction().await.unwrap();
    b.commit_transaction().await.unwrap();
    let all: Vec<Document> = coll
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        all,
        [
            doc! { "_id": 1, "v": 1 },
            doc! { "_id": 2, "v": 2 },
            doc! { "_id": 3, "v": 3 }
        ]
    );

    // The same document: the second to commit conflicts and changes nothing.
    a.start_transaction().await.unwrap();
    b.start_transaction().await.unwrap();
    coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "v": 10 } })
        .session(&mut a)
        .await
        .unwrap();
    coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "v": 20 } })
        .session(&mut b)
        .await
        .unwrap();
    coll.delete_one(doc! { "_id": 2 })
        .session(&mut b)
        .await
        .unwrap();
    a.commit_transaction().await.unwrap();
    let err = b.commit_transaction().await.unwrap_err();
    assert_eq!(code(&err), Some(112), "{err}");
    assert!(err.contains_label("TransientTransactionError"), "{err}");
    assert_eq!(
        coll.find_one(doc! { "_id": 1 }).await.unwrap().unwrap(),
        doc! { "_id": 1, "v": 10 }
    );
    assert!(coll.find_one(doc! { "_id": 2 }).await.unwrap().is_some());

    // A write outside any transaction to a document a transaction wrote.
    a.start_transaction().await.unwrap();
    coll.update_one(doc! { "_id": 3 }, doc! { "$set": { "v": 30 } })
        .session(&mut a)
        .await
        .unwrap();
    coll.update_one(doc! { "_id": 3 }, doc! { "$set": { "v": 31 } })
        .await
        .unwrap();
    let err = a.commit_transaction().await.unwrap_err();
    assert_eq!(code(&err), Some(112), "{err}");
    assert_eq!(
        coll.find_one(doc! { "_id": 3 }).await.unwrap().unwrap(),
        doc! { "_id": 3, "v": 31 }
    );

    // A write committed after a transaction's snapshot: the transaction's write to that
    // document conflicts at once (not only at commit), and the transaction is over.
    a.start_transaction().await.unwrap();
    coll.find_one(doc! { "_id": 3 })
        .session(&mut a)
        .await
        .unwrap();
    coll.update_one(doc! { "_id": 3 }, doc! { "$set": { "v": 32 } })
        .await
        .unwrap();
    let err = coll
        .update_one(doc! { "_id": 3 }, doc! { "$set": { "v": 33 } })
        .session(&mut a)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(112), "{err}");
    assert!(err.contains_label("TransientTransactionError"), "{err}");
    let err = a.commit_transaction().await.unwrap_err();
    assert_eq!(code(&err), Some(251), "the transaction is over: {err}");
    sim.shutdown().await;
}
