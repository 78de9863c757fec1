//! `MongoSource` through the real driver against mongo-sim (or `CDC_MONGODB_URI`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bson::{Bson, Document, doc, oid::ObjectId};
use cdc_core::{
    ChangeCursor, ChangeEvent, ChangeSource, ErrorKind, Next, OperationType, StartPosition,
};
use cdc_mongo::{
    BeforeChange, FullDocument, HistoryLostPolicy, MongoSource, PreImagePolicy, Scope,
    SourceOptions, connect, enable_pre_post_images, record_pre_images,
};
use mongo_sim::{MongoSim, SimOptions, TestDeployment};
use mongodb::{Client, Collection};

struct Fixture {
    deployment: TestDeployment,
    client: Client,
    db: String,
}

impl Fixture {
    async fn new(db: &str) -> Self {
        let deployment = TestDeployment::start().await.unwrap();
        let client = connect(&deployment.uri(), Duration::from_secs(10))
            .await
            .unwrap();
        let _ = client.database(db).drop().await;
        Self {
            deployment,
            client,
            db: db.to_owned(),
        }
    }

    fn coll(&self, name: &str) -> Collection<Document> {
        self.client.database(&self.db).collection(name)
    }

    fn source(&self, scope: Scope, options: SourceOptions) -> MongoSource {
        MongoSource::new(self.client.clone(), scope, options)
    }

    fn scope(&self, coll: &str) -> Scope {
        Scope::collection(self.db.clone(), coll)
    }
}

/// The next event, polling through idle round trips; fails after 20 s.
async fn next(cursor: &mut Box<dyn ChangeCursor>) -> ChangeEvent {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match cursor.next().await.unwrap() {
                Next::Closed => panic!("cursor closed while waiting for an event"),
                next => {
                    if let Some(e) = next.into_event().unwrap() {
                        return e;
                    }
                }
            }
        }
    })
    .await
    .expect("no event within 20 s")
}

async fn next_err(cursor: &mut Box<dyn ChangeCursor>) -> cdc_core::Error {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match cursor.next().await {
                Ok(next @ (Next::Event(_) | Next::Raw(_))) => {
                    panic!("expected an error, got {next:?}")
                }
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("no error within 20 s")
}

fn skip(reason: &str) {
    eprintln!("SKIPPED: {reason}");
}

#[tokio::test]
async fn each_scope_sees_its_changes() {
    let f = Fixture::new("src_scopes").await;
    let other_db = "src_scopes_other";
    let _ = f.client.database(other_db).drop().await;
    let coll_src = f.source(f.scope("a"), SourceOptions::default());
    let db_src = f.source(Scope::database(f.db.clone()), SourceOptions::default());
    let all_src = f.source(Scope::Deployment, SourceOptions::default());
    let mut c = coll_src.open(&StartPosition::Now).await.unwrap();
    let mut d = db_src.open(&StartPosition::Now).await.unwrap();
    let mut a = all_src.open(&StartPosition::Now).await.unwrap();
    f.coll("b")
        .insert_one(doc! { "_id": "in-b" })
        .await
        .unwrap();
    f.client
        .database(other_db)
        .collection::<Document>("x")
        .insert_one(doc! { "_id": "other" })
        .await
        .unwrap();
    f.coll("a")
        .insert_one(doc! { "_id": "in-a" })
        .await
        .unwrap();
    assert_eq!(next(&mut c).await.document_id_string().unwrap(), "in-a");
    assert_eq!(next(&mut d).await.document_id_string().unwrap(), "in-b");
    assert_eq!(next(&mut d).await.document_id_string().unwrap(), "in-a");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e = next(&mut a).await;
        if e.ns
            .as_ref()
            .is_some_and(|ns| ns.db == f.db || ns.db == other_db)
        {
            seen.push(e.document_id_string().unwrap());
        }
    }
    assert_eq!(seen, vec!["in-b", "other", "in-a"]);
    assert_eq!(coll_src.describe(), "src_scopes.a");
    f.deployment.shutdown().await;
}

#[tokio::test]
async fn full_document_modes() {
    let f = Fixture::new("src_fulldoc").await;
    let coll = f.coll("c");
    f.client
        .database(&f.db)
        .create_collection("c")
        .await
        .unwrap();
    enable_pre_post_images(&f.client.database(&f.db), "c")
        .await
        .unwrap();
    coll.insert_one(doc! { "_id": 1, "v": 1 }).await.unwrap();
    let mut cursors = Vec::new();
    for mode in [
        FullDocument::Default,
        FullDocument::UpdateLookup,
        FullDocument::WhenAvailable,
        FullDocument::Required,
    ] {
        let src = f.source(
            f.scope("c"),
            SourceOptions::default()
                .full_document(mode)
                .before_change(BeforeChange::Required),
        );
        cursors.push(src.open(&StartPosition::Now).await.unwrap());
    }
    coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "v": 2 } })
        .await
        .unwrap();
    let mut events = Vec::new();
    for c in &mut cursors {
        events.push(next(c).await);
    }
    assert_eq!(events[0].full_document(), None);
    for e in &events[1..] {
        assert_eq!(
            e.full_document_parsed().unwrap(),
            Some(doc! { "_id": 1, "v": 2 })
        );
    }
    for e in &events {
        assert_eq!(
            e.full_document_before_change_parsed().unwrap(),
            Some(doc! { "_id": 1, "v": 1 })
        );
        assert_eq!(
            e.update_description().unwrap().unwrap().updated_fields,
            doc! { "v": 2 }
        );
    }
    f.deployment.shutdown().await;
}

#[tokio::test]
async fn resume_start_after_and_start_at() {
    let f = Fixture::new("src_resume").await;
    let coll = f.coll("c");
    let src = f.source(f.scope("c"), SourceOptions::default());
    let mut cursor = src.open(&StartPosition::Now).await.unwrap();
    for i in 0..4 {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
    }
    let mut events = Vec::new();
    for _ in 0..4 {
        events.push(next(&mut cursor).await);
    }
    // Resume after the second: exactly the third and fourth.
    let mut resumed = src
        .open(&StartPosition::ResumeAfter(events[1].token.clone()))
        .await
        .unwrap();
    assert_eq!(next(&mut resumed).await.document_id(), Some(Bson::Int32(2)));
    assert_eq!(next(&mut resumed).await.document_id(), Some(Bson::Int32(3)));
    // Start at the third's cluster time: inclusive.
    let mut at = src
        .open(&StartPosition::AtOperationTime(events[2].cluster_time))
        .await
        .unwrap();
    assert_eq!(next(&mut at).await.document_id(), Some(Bson::Int32(2)));

    // Drop: invalidate, then start after it on the re-created collection.
    coll.drop().await.unwrap();
    let mut invalidate = None;
    while invalidate.is_none() {
        let e = next(&mut cursor).await;
        if e.operation_type == OperationType::Invalidate {
            invalidate = Some(e);
        }
    }
    let invalidate = invalidate.unwrap();
    assert!(matches!(cursor.next().await.unwrap(), Next::Closed));
    let point = invalidate.resume_point(bson::DateTime::now());
    let mut after = src.open(&point.start_position()).await.unwrap();
    coll.insert_one(doc! { "_id": "new" }).await.unwrap();
    assert_eq!(next(&mut after).await.document_id_string().unwrap(), "new");
    let err = src
        .open(&StartPosition::ResumeAfter(invalidate.token.clone()))
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::InvalidToken);
    f.deployment.shutdown().await;
}

#[tokio::test]
async fn document_keys_of_every_type_and_filters() {
    let f = Fixture::new("src_keys").await;
    let coll = f.coll("c");
    let only_inserts = f.source(
        f.scope("c"),
        SourceOptions::default()
            .operation_types([OperationType::Insert])
            .pipeline([doc! { "$match": { "fullDocument.keep": true } }]),
    );
    let all = f.source(f.scope("c"), SourceOptions::default());
    let mut filtered = only_inserts.open(&StartPosition::Now).await.unwrap();
    let mut every = all.open(&StartPosition::Now).await.unwrap();
    let oid = ObjectId::new();
    let ids = [
        Bson::ObjectId(oid),
        Bson::String("s-1".into()),
        Bson::Int64(42),
        Bson::Document(doc! { "region": "eu", "n": 7 }),
    ];
    for id in &ids {
        coll.insert_one(doc! { "_id": id.clone(), "keep": true })
            .await
            .unwrap();
    }
    coll.insert_one(doc! { "_id": "dropped", "keep": false })
        .await
        .unwrap();
    coll.delete_one(doc! { "_id": "s-1" }).await.unwrap();
    coll.insert_one(doc! { "_id": "last", "keep": true })
        .await
        .unwrap();
    for id in &ids {
        let e = next(&mut every).await;
        assert_eq!(
            e.document_id().as_ref(),
            Some(id),
            "keys keep their BSON type"
        );
    }
    assert_eq!(
        next(&mut every).await.document_id_string().unwrap(),
        "dropped"
    );
    assert_eq!(next(&mut every).await.operation_type, OperationType::Delete);
    let mut kept = Vec::new();
    for _ in 0..5 {
        kept.push(next(&mut filtered).await.document_id_string().unwrap());
    }
    assert_eq!(
        kept,
        vec![
            oid.to_hex(),
            "s-1".into(),
            "42".into(),
            r#"{"region":"eu","n":7}"#.into(),
            "last".into()
        ]
    );
    f.deployment.shutdown().await;
}

#[tokio::test]
async fn post_batch_token_advances_on_a_filtered_stream() {
    let f = Fixture::new("src_pbrt").await;
    let coll = f.coll("c");
    let src = f.source(
        f.scope("c"),
        SourceOptions::default()
            .operation_types([OperationType::Delete])
            .max_await_time(Duration::from_millis(50)),
    );
    let mut cursor = src.open(&StartPosition::Now).await.unwrap();
    let first = cursor.resume_token().expect("a token right after open");
    for i in 0..20 {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
    }
    let mut latest = first.clone();
    for _ in 0..10 {
        let Next::Idle(token) = cursor.next().await.unwrap() else {
            panic!("every insert is filtered out");
        };
        // The idle round's position is the cursor's.
        assert_eq!(token, cursor.resume_token());
        latest = token.unwrap();
        if latest != first {
            break;
        }
    }
    assert_ne!(
        latest, first,
        "the post-batch token must move past filtered events"
    );
    assert!(latest.cluster_time_hint() >= first.cluster_time_hint());
    // Resuming from it does not scan the inserts again: the next event is the delete.
    coll.delete_one(doc! { "_id": 5 }).await.unwrap();
    let mut resumed = src.open(&StartPosition::ResumeAfter(latest)).await.unwrap();
    assert_eq!(
        next(&mut resumed).await.operation_type,
        OperationType::Delete
    );
    f.deployment.shutdown().await;
}

#[tokio::test]
async fn history_lost_policies() {
    let sim = MongoSim::start_with(SimOptions {
        oplog_capacity: 20,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let client = connect(&sim.uri(), Duration::from_secs(10)).await.unwrap();
    let coll: Collection<Document> = client.database("h").collection("c");
    let failing = MongoSource::new(
        client.clone(),
        Scope::collection("h", "c"),
        SourceOptions::default(),
    );
    let restarting = MongoSource::new(
        client.clone(),
        Scope::collection("h", "c"),
        SourceOptions::default().history_lost_policy(HistoryLostPolicy::RestartFromNow),
    );
    let mut cursor = failing.open(&StartPosition::Now).await.unwrap();
    coll.insert_one(doc! { "_id": 0 }).await.unwrap();
    let first = next(&mut cursor).await;
    for i in 1..40 {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
    }
    let position = StartPosition::ResumeAfter(first.token.clone());
    let err = failing.open(&position).await.err().unwrap();
    assert_eq!(err.kind(), ErrorKind::HistoryLost, "{err}");
    let mut restarted = restarting.open(&position).await.unwrap();
    let Next::Gap(gap) = restarted.next().await.unwrap() else {
        panic!("the gap is reported first");
    };
    assert_eq!(gap.after, Some(first.cluster_time));
    assert!(gap.resumed_at.unwrap() > first.cluster_time);
    assert!(
        !matches!(restarted.next().await.unwrap(), Next::Gap(_)),
        "reported once"
    );
    coll.insert_one(doc! { "_id": "after" }).await.unwrap();
    assert_eq!(
        next(&mut restarted).await.document_id_string().unwrap(),
        "after"
    );
    // A running cursor that falls behind fails the same way under the default policy.
    assert_eq!(next_err(&mut cursor).await.kind(), ErrorKind::HistoryLost);
    sim.shutdown().await;
}

#[tokio::test]
async fn pre_image_policies() {
    let f = Fixture::new("src_preimage").await;
    let coll = f.coll("c");
    coll.insert_one(doc! { "_id": 1, "v": 1 }).await.unwrap();
    let options = SourceOptions::default().before_change(BeforeChange::Required);
    let failing = f.source(f.scope("c"), options.clone());
    let falling_back = f.source(
        f.scope("c"),
        options.pre_image_policy(PreImagePolicy::FallBackToOff),
    );
    let mut strict = failing.open(&StartPosition::Now).await.unwrap();
    let mut lenient = falling_back.open(&StartPosition::Now).await.unwrap();
    coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "v": 2 } })
        .await
        .unwrap();
    coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "v": 3 } })
        .await
        .unwrap();
    assert_eq!(
        next_err(&mut strict).await.kind(),
        ErrorKind::PreImageMissing
    );
    let e = next(&mut lenient).await;
    assert_eq!(
        e.update_description().unwrap().unwrap().updated_fields,
        doc! { "v": 2 }
    );
    assert_eq!(e.full_document_before_change(), None);
    assert_eq!(
        next(&mut lenient)
            .await
            .update_description()
            .unwrap()
            .unwrap()
            .updated_fields,
        doc! { "v": 3 }
    );
    assert_eq!(
        falling_back.pre_image_fallbacks(),
        1,
        "fell back once, then stayed off"
    );
    // Opening again does not spin on the same missing image.
    let mut again = falling_back
        .open(&StartPosition::ResumeAfter(e.token))
        .await
        .unwrap();
    assert!(
        next(&mut again)
            .await
            .full_document_before_change()
            .is_none()
    );
    assert_eq!(falling_back.pre_image_fallbacks(), 1);
    f.deployment.shutdown().await;
}

#[tokio::test]
async fn every_listed_code_is_classified() {
    let deployment = TestDeployment::start().await.unwrap();
    if deployment.sim().is_none() {
        skip(
            "classification uses the simulator's failCommand with codes a real server would not produce on demand",
        );
        return;
    }
    let client = connect(&deployment.uri(), Duration::from_secs(10))
        .await
        .unwrap();
    let src = MongoSource::new(
        client.clone(),
        Scope::collection("cls", "c"),
        SourceOptions::default(),
    );
    let admin = client.database("admin");
    let cases: &[(i32, &[&str], ErrorKind)] = &[
        (286, &[], ErrorKind::HistoryLost),
        (47, &[], ErrorKind::PreImageMissing),
        (260, &[], ErrorKind::InvalidToken),
        (
            280,
            &["NonResumableChangeStreamError"],
            ErrorKind::InvalidToken,
        ),
        (10107, &[], ErrorKind::Transient),
        (216, &[], ErrorKind::Transient),
        (239, &[], ErrorKind::Transient),
        (246, &[], ErrorKind::Transient),
        (91, &["ResumableChangeStreamError"], ErrorKind::Transient),
        (11000, &["RetryableWriteError"], ErrorKind::Transient),
        (13, &[], ErrorKind::Fatal),
        (18, &[], ErrorKind::Fatal),
        (40324, &[], ErrorKind::Fatal),
        (40415, &[], ErrorKind::Fatal),
        (12345, &[], ErrorKind::Fatal),
    ];
    for (code, labels, want) in cases {
        admin
            .run_command(doc! {
                "configureFailPoint": "failCommand",
                "mode": "alwaysOn",
                "data": { "failCommands": ["aggregate"], "errorCode": code, "errorLabels": labels.to_vec() },
            })
            .await
            .unwrap();
        let err = src.open(&StartPosition::Now).await.err().unwrap();
        assert_eq!(err.kind(), *want, "code {code} labels {labels:?}: {err}");
    }
    admin
        .run_command(doc! { "configureFailPoint": "failCommand", "mode": "alwaysOn", "data": { "failCommands": ["aggregate"], "closeConnection": true } })
        .await
        .unwrap();
    let err = src.open(&StartPosition::Now).await.err().unwrap();
    assert_eq!(
        err.kind(),
        ErrorKind::Transient,
        "network errors are transient: {err}"
    );
    admin
        .run_command(doc! { "configureFailPoint": "failCommand", "mode": "off" })
        .await
        .unwrap();
    assert!(src.open(&StartPosition::Now).await.is_ok());
    // A bad pipeline from the user is fatal too, straight from the server.
    let bad = MongoSource::new(
        client,
        Scope::collection("cls", "c"),
        SourceOptions::default().pipeline([doc! { "$bogus": 1 }]),
    );
    assert_eq!(
        bad.open(&StartPosition::Now).await.err().unwrap().kind(),
        ErrorKind::Fatal
    );
    deployment.shutdown().await;
}

#[tokio::test]
async fn image_helpers_return_typed_errors() {
    let f = Fixture::new("src_helpers").await;
    let db = f.client.database(&f.db);
    let missing = enable_pre_post_images(&db, "nope").await.unwrap_err();
    assert!(
        matches!(missing, cdc_mongo::Error::Driver { .. }),
        "{missing}"
    );
    db.create_collection("c").await.unwrap();
    enable_pre_post_images(&db, "c").await.unwrap();
    let err = record_pre_images(&db, "c").await.unwrap_err();
    assert!(
        matches!(
            err,
            cdc_mongo::Error::Unsupported {
                feature: "recordPreImages",
                ..
            }
        ),
        "{err}"
    );
    f.deployment.shutdown().await;
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn passwords_never_appear_in_errors_debug_or_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // Nothing listens on port 1: the connection fails.
    let uri = "mongodb://ada:s3cret-Pa55@127.0.0.1:1/?serverSelectionTimeoutMS=300";
    let err = connect(uri, Duration::from_millis(300)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient);
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("s3cret-Pa55"), "{shown}");
    assert!(shown.contains("ada:***@"), "{shown}");
    let core: cdc_core::Error = err.into();
    assert!(!format!("{core} {core:?}").contains("s3cret-Pa55"));

    // A malformed URI with a password.
    let err = connect(
        "mongodb://ada:s3cret-Pa55@/bad?replicaSet=",
        Duration::from_millis(300),
    )
    .await
    .unwrap_err();
    assert!(!format!("{err} {err:?}").contains("s3cret-Pa55"));

    // A source's Debug leaves the client (and its credentials) out.
    let sim = MongoSim::start().await.unwrap();
    let client = Client::with_uri_str(format!(
        "mongodb://ada:s3cret-Pa55@{}/?directConnection=true",
        sim.addr()
    ))
    .await
    .unwrap();
    let src = MongoSource::new(
        client,
        Scope::collection("x", "y"),
        SourceOptions::default(),
    );
    assert!(!format!("{src:?}").contains("s3cret-Pa55"));
    sim.shutdown().await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("cannot connect"),
        "the failure was logged: {logs}"
    );
    assert!(!logs.contains("s3cret-Pa55"), "{logs}");
}
