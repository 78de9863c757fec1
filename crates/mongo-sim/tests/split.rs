//! `$changeStreamSplitLargeEvent` as MongoDB 7.0 does it, through the real driver: events
//! over 16 MiB become fragments with their own resume tokens, a resume in the middle
//! continues with the next fragment, and without the stage such an event is
//! BSONObjectTooLarge.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bson::{Bson, Document, doc};
use mongo_sim::MongoSim;
use mongodb::{Client, Database, error::ErrorKind};

/// A string so long that a document holding it and a little more is just under 16 MiB.
fn big(c: char) -> String {
    std::iter::repeat_n(c, 16 * 1024 * 1024 - 1024).collect()
}

async fn setup() -> (MongoSim, Client, Database) {
    let sim = MongoSim::start().await.unwrap();
    let client = Client::with_uri_str(sim.uri()).await.unwrap();
    let db = client.database("app");
    db.run_command(doc! { "create": "c", "changeStreamPreAndPostImages": { "enabled": true } })
        .await
        .unwrap();
    (sim, client, db)
}

fn code_of(err: &mongodb::error::Error) -> (i32, String, Vec<String>) {
    match err.kind.as_ref() {
        ErrorKind::Command(c) => (
            c.code,
            c.code_name.clone(),
            err.labels().iter().cloned().collect(),
        ),
        other => panic!("not a command error: {other:?}"),
    }
}

async fn open(
    db: &Database,
    options: Document,
    split: bool,
) -> Result<Document, mongodb::error::Error> {
    let mut pipeline = vec![Bson::Document(doc! { "$changeStream": options })];
    if split {
        pipeline.push(Bson::Document(doc! { "$changeStreamSplitLargeEvent": {} }));
    }
    db.run_command(doc! { "aggregate": "c", "pipeline": pipeline, "cursor": { "batchSize": 0 } })
        .await
}

/// Reads every event of a stream until an empty batch, returning them.
async fn drain(db: &Database, reply: Document) -> Vec<Document> {
    let cursor = reply.get_document("cursor").unwrap();
    let id = cursor.get_i64("id").unwrap();
    let mut out: Vec<Document> = cursor
        .get_array("firstBatch")
        .unwrap()
        .iter()
        .map(|b| b.as_document().unwrap().clone())
        .collect();
    loop {
        let r = db
            .run_command(doc! { "getMore": id, "collection": "c", "maxTimeMS": 50 })
            .await
            .unwrap();
        let batch = r
            .get_document("cursor")
            .unwrap()
            .get_array("nextBatch")
            .unwrap()
            .clone();
        if batch.is_empty() {
            return out;
        }
        out.extend(batch.into_iter().map(|b| b.as_document().unwrap().clone()));
    }
}

#[tokio::test]
async fn events_over_16_mib_are_split_and_resumable_in_the_middle() {
    let (sim, _client, db) = setup().await;
    let coll = db.collection::<Document>("c");
    let start = open(&db, doc! {}, false).await.unwrap();
    let start_token = start
        .get_document("cursor")
        .unwrap()
        .get_document("postBatchResumeToken")
        .unwrap()
        .clone();
    coll.insert_one(doc! { "_id": "aaa", "a": big('x') })
        .await
        .unwrap();
    coll.update_one(doc! { "_id": "aaa" }, doc! { "$set": { "a": big('y') } })
        .await
        .unwrap();
    coll.insert_one(doc! { "_id": "after" }).await.unwrap();
    let images = doc! {
        "resumeAfter": start_token.clone(),
        "fullDocument": "required",
        "fullDocumentBeforeChange": "required",
    };

    // Without the stage: BSONObjectTooLarge, not resumable.
    let reply = open(&db, images.clone(), false).await.unwrap();
    let id = reply.get_document("cursor").unwrap().get_i64("id").unwrap();
    let err = db
        .run_command(doc! { "getMore": id, "collection": "c" })
        .await
        .unwrap_err();
    let (code, name, labels) = code_of(&err);
    assert_eq!((code, name.as_str()), (10334, "BSONObjectTooLarge"));
    assert!(labels.is_empty(), "{labels:?}");

    // With it: the insert (under 16 MiB) whole, the update in three fragments, then the
    // last insert.
    let events = drain(&db, open(&db, images.clone(), true).await.unwrap()).await;
    assert_eq!(events.len(), 5, "insert, 3 fragments, insert");
    assert!(!events[0].contains_key("splitEvent"));
    let fragments = &events[1..4];
    let mut whole = Document::new();
    for (i, f) in fragments.iter().enumerate() {
        assert_eq!(
            f.get_document("splitEvent").unwrap(),
            &doc! { "fragment": i32::try_from(i).unwrap() + 1, "of": 3 }
        );
        for (k, v) in f {
            if k != "_id" && k != "splitEvent" {
                assert!(whole.insert(k.clone(), v.clone()).is_none(), "{k} twice");
            }
        }
    }
    assert_eq!(whole.get_str("operationType").unwrap(), "update");
    assert_eq!(
        whole.get_document("documentKey").unwrap(),
        &doc! { "_id": "aaa" }
    );
    assert_eq!(
        whole
            .get_document("fullDocument")
            .unwrap()
            .get_str("a")
            .unwrap(),
        big('y')
    );
    assert_eq!(
        whole
            .get_document("fullDocumentBeforeChange")
            .unwrap()
            .get_str("a")
            .unwrap(),
        big('x')
    );
    assert_eq!(
        whole
            .get_document("updateDescription")
            .unwrap()
            .get_document("updatedFields")
            .unwrap()
            .get_str("a")
            .unwrap(),
        big('y')
    );
    // The first fragment carries the event's context (the smallest fields).
    assert!(fragments[0].contains_key("operationType") && fragments[0].contains_key("ns"));
    let tokens: Vec<Document> = fragments
        .iter()
        .map(|f| f.get_document("_id").unwrap().clone())
        .collect();
    let data = |d: &Document| d.get_str("_data").unwrap().to_owned();
    assert!(data(&tokens[0]) < data(&tokens[1]) && data(&tokens[1]) < data(&tokens[2]));
    assert_eq!(
        events[4].get_document("documentKey").unwrap(),
        &doc! { "_id": "after" }
    );

    // Resuming after the second fragment shows the third, then what follows.
    let mut resumed = images.clone();
    resumed.insert("resumeAfter", tokens[1].clone());
    let rest = drain(&db, open(&db, resumed, true).await.unwrap()).await;
    assert_eq!(rest.len(), 2);
    assert_eq!(
        rest[0].get_document("splitEvent").unwrap(),
        &doc! { "fragment": 3, "of": 3 }
    );
    assert_eq!(rest[0].get_document("_id").unwrap(), &tokens[2]);
    // After the last fragment: the next event.
    let mut resumed = images.clone();
    resumed.insert("resumeAfter", tokens[2].clone());
    let rest = drain(&db, open(&db, resumed, true).await.unwrap()).await;
    assert_eq!(rest.len(), 1);
    assert_eq!(
        rest[0].get_document("documentKey").unwrap(),
        &doc! { "_id": "after" }
    );

    // A fragment token without the stage, or for an event that no longer needs splitting,
    // cannot be resumed from: ChangeStreamFatalError.
    let mut resumed = images.clone();
    resumed.insert("resumeAfter", tokens[1].clone());
    let err = open(&db, resumed, false).await.unwrap_err();
    assert_eq!(code_of(&err).0, 280);
    let small = open(&db, doc! { "resumeAfter": tokens[1].clone() }, true)
        .await
        .unwrap();
    let id = small.get_document("cursor").unwrap().get_i64("id").unwrap();
    let err = db
        .run_command(doc! { "getMore": id, "collection": "c" })
        .await
        .unwrap_err();
    assert_eq!(code_of(&err).0, 280);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_stage_is_validated() {
    let (sim, _client, db) = setup().await;
    let run = |pipeline: Vec<Document>| {
        let db = db.clone();
        async move {
            db.run_command(doc! { "aggregate": "c", "pipeline": pipeline, "cursor": {} })
                .await
                .unwrap_err()
        }
    };
    let err = run(vec![doc! { "$changeStreamSplitLargeEvent": {} }]).await;
    assert_eq!(code_of(&err).0, 20, "only in a change stream");
    let err = run(vec![
        doc! { "$changeStream": {} },
        doc! { "$changeStreamSplitLargeEvent": {} },
        doc! { "$changeStreamSplitLargeEvent": {} },
    ])
    .await;
    assert_eq!(code_of(&err).0, 7_182_802, "once");
    let err = run(vec![
        doc! { "$changeStream": {} },
        doc! { "$changeStreamSplitLargeEvent": {} },
        doc! { "$match": {} },
    ])
    .await;
    assert_eq!(code_of(&err).0, 7_182_802, "last");
    let err = run(vec![
        doc! { "$changeStream": {} },
        doc! { "$changeStreamSplitLargeEvent": { "x": 1 } },
    ])
    .await;
    assert_eq!(code_of(&err).0, 9, "empty specification");
    sim.shutdown().await;
}
