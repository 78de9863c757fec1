//! Errors as a MongoDB 7.0 server reports them, seen through the real driver: the exact
//! code, `codeName` and labels of change-stream `getMore` failures (injected or not), the
//! validation of `$changeStream`, and names for every code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bson::{Bson, Document, doc};
use mongo_sim::MongoSim;
use mongodb::{
    Client, Database,
    error::{CommandError, Error, ErrorKind},
};

async fn setup() -> (MongoSim, Client, Database) {
    let sim = MongoSim::start().await.unwrap();
    let client = Client::with_uri_str(sim.uri()).await.unwrap();
    let db = client.database("app");
    db.run_command(doc! { "create": "c" }).await.unwrap();
    (sim, client, db)
}

fn command_error(err: &Error) -> &CommandError {
    match err.kind.as_ref() {
        ErrorKind::Command(c) => c,
        other => panic!("not a command error: {other:?}"),
    }
}

/// Asserts the exact code, `codeName` and labels of a server error.
fn assert_server_error(err: &Error, code: i32, code_name: &str, labels: &[&str]) {
    let c = command_error(err);
    assert_eq!((c.code, c.code_name.as_str()), (code, code_name), "{err}");
    let mut got: Vec<&str> = err.labels().iter().map(String::as_str).collect();
    got.sort_unstable();
    let mut want = labels.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "labels of {err}");
}

/// Opens a change stream with a raw `aggregate` and returns its cursor id.
async fn open_stream(db: &Database) -> i64 {
    let reply = db
        .run_command(
            doc! { "aggregate": "c", "pipeline": [ { "$changeStream": {} } ], "cursor": {} },
        )
        .await
        .unwrap();
    reply.get_document("cursor").unwrap().get_i64("id").unwrap()
}

async fn get_more(db: &Database, id: i64) -> Result<Document, Error> {
    db.run_command(doc! { "getMore": id, "collection": "c", "maxTimeMS": 10 })
        .await
}

async fn fail_point(client: &Client, name: &str, mode: Bson, data: Document) {
    client
        .database("admin")
        .run_command(doc! { "configureFailPoint": name, "mode": mode, "data": data })
        .await
        .unwrap();
}

#[tokio::test]
async fn get_more_after_cursor_checkout_errors_carry_the_servers_labels() {
    let (sim, client, db) = setup().await;
    let cases: &[(i32, &str, &[&str])] = &[
        (6, "HostUnreachable", &["ResumableChangeStreamError"]),
        (89, "NetworkTimeout", &["ResumableChangeStreamError"]),
        (91, "ShutdownInProgress", &["ResumableChangeStreamError"]),
        (189, "PrimarySteppedDown", &["ResumableChangeStreamError"]),
        (234, "RetryChangeStream", &["ResumableChangeStreamError"]),
        (262, "ExceededTimeLimit", &["ResumableChangeStreamError"]),
        (9001, "SocketException", &["ResumableChangeStreamError"]),
        (10107, "NotWritablePrimary", &["ResumableChangeStreamError"]),
        (
            11602,
            "InterruptedDueToReplStateChange",
            &["ResumableChangeStreamError"],
        ),
        (13388, "StaleConfig", &["ResumableChangeStreamError"]),
        (
            13436,
            "NotPrimaryOrSecondary",
            &["ResumableChangeStreamError"],
        ),
        (
            280,
            "ChangeStreamFatalError",
            &["NonResumableChangeStreamError"],
        ),
        (
            286,
            "ChangeStreamHistoryLost",
            &["NonResumableChangeStreamError"],
        ),
        (50, "MaxTimeMSExpired", &[]),
        (11601, "Interrupted", &[]),
        (216, "ElectionInProgress", &[]),
        (237, "CursorKilled", &[]),
        (40324, "Location40324", &[]),
    ];
    for &(code, name, labels) in cases {
        let id = open_stream(&db).await;
        fail_point(
            &client,
            "failGetMoreAfterCursorCheckout",
            doc! { "times": 1 }.into(),
            doc! { "errorCode": code },
        )
        .await;
        let err = get_more(&db, id).await.unwrap_err();
        assert_server_error(&err, code, name, labels);
        // The failed getMore killed its cursor; the fail point fired once only.
        assert_server_error(
            &get_more(&db, id).await.unwrap_err(),
            43,
            "CursorNotFound",
            &[],
        );
        let id = open_stream(&db).await;
        get_more(&db, id).await.unwrap();
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn only_change_stream_cursors_are_labelled_and_fail_command_is_left_as_configured() {
    let (sim, client, db) = setup().await;
    db.collection::<Document>("c")
        .insert_many((0..5).map(|i| doc! { "_id": i }))
        .await
        .unwrap();
    // A plain cursor's getMore error gets no change-stream label.
    let reply = db
        .run_command(doc! { "find": "c", "batchSize": 1 })
        .await
        .unwrap();
    let id = reply.get_document("cursor").unwrap().get_i64("id").unwrap();
    fail_point(
        &client,
        "failGetMoreAfterCursorCheckout",
        doc! { "times": 1 }.into(),
        doc! { "errorCode": 6 },
    )
    .await;
    let err = db
        .run_command(doc! { "getMore": id, "collection": "c" })
        .await
        .unwrap_err();
    assert_server_error(&err, 6, "HostUnreachable", &[]);

    // failCommand answers with exactly the labels it was given (none here), as the
    // server's failCommand does: the allow-listed code alone is not resumable.
    let id = open_stream(&db).await;
    fail_point(
        &client,
        "failCommand",
        doc! { "times": 1 }.into(),
        doc! { "failCommands": ["getMore"], "errorCode": 6 },
    )
    .await;
    assert_server_error(
        &get_more(&db, id).await.unwrap_err(),
        6,
        "HostUnreachable",
        &[],
    );
    fail_point(
        &client,
        "failCommand",
        doc! { "times": 1 }.into(),
        doc! { "failCommands": ["getMore"], "errorCode": 50, "errorLabels": ["ResumableChangeStreamError"] },
    )
    .await;
    let id = open_stream(&db).await;
    assert_server_error(
        &get_more(&db, id).await.unwrap_err(),
        50,
        "MaxTimeMSExpired",
        &["ResumableChangeStreamError"],
    );

    // `off` turns the fail point off before it fired.
    fail_point(
        &client,
        "failGetMoreAfterCursorCheckout",
        "alwaysOn".into(),
        doc! { "errorCode": 6 },
    )
    .await;
    fail_point(
        &client,
        "failGetMoreAfterCursorCheckout",
        "off".into(),
        doc! {},
    )
    .await;
    let id = open_stream(&db).await;
    get_more(&db, id).await.unwrap();

    // An unknown fail point is refused with the server's code.
    let err = client
        .database("admin")
        .run_command(doc! { "configureFailPoint": "noSuchFailPoint", "mode": "alwaysOn" })
        .await
        .unwrap_err();
    assert_server_error(&err, 266, "FailPointSetFailed", &[]);
    sim.shutdown().await;
}

#[tokio::test]
async fn history_lost_on_get_more_is_labelled_non_resumable() {
    let (sim, _client, db) = setup().await;
    let id = open_stream(&db).await;
    let coll = db.collection::<Document>("c");
    coll.insert_many((0..10).map(|i| doc! { "_id": i }))
        .await
        .unwrap();
    sim.set_oplog_capacity(2);
    let err = get_more(&db, id).await.unwrap_err();
    assert_server_error(
        &err,
        286,
        "ChangeStreamHistoryLost",
        &["NonResumableChangeStreamError"],
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn change_stream_options_and_read_concerns_are_validated() {
    let (sim, client, db) = setup().await;
    let open = |spec: Document, extra: Document| {
        let mut cmd =
            doc! { "aggregate": "c", "pipeline": [ { "$changeStream": spec } ], "cursor": {} };
        cmd.extend(extra);
        let db = db.clone();
        async move { db.run_command(cmd).await }
    };
    for level in ["local", "available", "linearizable", "snapshot"] {
        let err = open(doc! {}, doc! { "readConcern": { "level": level } })
            .await
            .unwrap_err();
        assert_server_error(&err, 72, "InvalidOptions", &[]);
    }
    let err = open(doc! {}, doc! { "readConcern": { "level": "strong" } })
        .await
        .unwrap_err();
    assert_server_error(&err, 9, "FailedToParse", &[]);
    open(doc! {}, doc! { "readConcern": { "level": "majority" } })
        .await
        .unwrap();
    let err = open(doc! { "noSuchOption": 1 }, doc! {}).await.unwrap_err();
    assert_server_error(&err, 40415, "Location40415", &[]);
    let err = open(doc! { "fullDocument": 1 }, doc! {}).await.unwrap_err();
    assert_server_error(&err, 14, "TypeMismatch", &[]);
    let err = open(doc! { "fullDocument": "sometimes" }, doc! {})
        .await
        .unwrap_err();
    assert_server_error(&err, 2, "BadValue", &[]);
    let err = open(doc! { "fullDocumentBeforeChange": true }, doc! {})
        .await
        .unwrap_err();
    assert_server_error(&err, 14, "TypeMismatch", &[]);
    let err = open(doc! { "showExpandedEvents": "yes" }, doc! {})
        .await
        .unwrap_err();
    assert_server_error(&err, 14, "TypeMismatch", &[]);
    let err = open(doc! { "resumeAfter": "token" }, doc! {})
        .await
        .unwrap_err();
    assert_server_error(&err, 14, "TypeMismatch", &[]);
    let err = open(
        doc! { "startAtOperationTime": bson::Timestamp { time: 1, increment: 1 }, "startAfter": { "_data": "00" } },
        doc! {},
    )
    .await
    .unwrap_err();
    assert_server_error(&err, 40674, "Location40674", &[]);
    let err = db
        .run_command(doc! { "aggregate": "c", "pipeline": [ { "$match": {} }, { "$changeStream": {} } ], "cursor": {} })
        .await
        .unwrap_err();
    assert_server_error(&err, 40602, "Location40602", &[]);
    let err = db
        .run_command(doc! { "aggregate": "c", "pipeline": [ { "$changeStream": {} }, { "$nope": {} } ], "cursor": {} })
        .await
        .unwrap_err();
    assert_server_error(&err, 40324, "Location40324", &[]);
    // Internal databases cannot be watched.
    for internal in ["config", "local"] {
        let err = client
            .database(internal)
            .run_command(
                doc! { "aggregate": 1, "pipeline": [ { "$changeStream": {} } ], "cursor": {} },
            )
            .await
            .unwrap_err();
        assert_server_error(&err, 73, "InvalidNamespace", &[]);
    }
    // Not inside a transaction.
    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    let err = db
        .run_command(
            doc! { "aggregate": "c", "pipeline": [ { "$changeStream": {} } ], "cursor": {} },
        )
        .session(&mut session)
        .await
        .unwrap_err();
    assert_server_error(&err, 263, "OperationNotSupportedInTransaction", &[]);
    sim.shutdown().await;
}

#[tokio::test]
async fn every_error_reply_names_its_code() {
    let (sim, client, db) = setup().await;
    let err = db
        .run_command(doc! { "noSuchCommand": 1 })
        .await
        .unwrap_err();
    assert_server_error(&err, 59, "CommandNotFound", &[]);
    // Any code a fail point injects is named as the server names it.
    for (code, name) in [
        (1, "InternalError"),
        (11600, "InterruptedAtShutdown"),
        (136, "CappedPositionLost"),
        (31254, "Location31254"),
    ] {
        fail_point(
            &client,
            "failCommand",
            doc! { "times": 1 }.into(),
            doc! { "failCommands": ["ping"], "errorCode": code },
        )
        .await;
        let err = db.run_command(doc! { "ping": 1 }).await.unwrap_err();
        assert_server_error(&err, code, name, &[]);
    }
    sim.shutdown().await;
}

/// A token in mongo-sim's shape: `82`, time and increment, oplog position, phase.
fn forge(time: u32, increment: u32, seq: u64, phase: u8) -> Document {
    doc! { "_data": format!("82{time:08X}{increment:08X}{seq:016X}{phase:02X}") }
}

async fn resume(db: &Database, token: Document) -> Result<Document, Error> {
    db.run_command(doc! {
        "aggregate": "c",
        "pipeline": [ { "$changeStream": { "resumeAfter": token } } ],
        "cursor": {},
    })
    .await
}

#[tokio::test]
async fn resume_tokens_are_checked_as_the_server_checks_them() {
    let (sim, _client, db) = setup().await;
    let coll = db.collection::<Document>("c");
    let id = open_stream(&db).await;
    coll.insert_many((0..3).map(|i| doc! { "_id": i }))
        .await
        .unwrap();
    let batch = get_more(&db, id).await.unwrap();
    let events = batch
        .get_document("cursor")
        .unwrap()
        .get_array("nextBatch")
        .unwrap()
        .clone();
    let first = events[0]
        .as_document()
        .unwrap()
        .get_document("_id")
        .unwrap()
        .clone();
    let data = first.get_str("_data").unwrap();
    let time = u32::from_str_radix(&data[2..10], 16).unwrap();
    let inc = u32::from_str_radix(&data[10..18], 16).unwrap();
    let seq = u64::from_str_radix(&data[18..34], 16).unwrap();

    // The real token resumes after the first insert: two events follow.
    let reply = resume(&db, first.clone()).await.unwrap();
    assert!(reply.get_document("cursor").is_ok());

    // Well-formed, but the log holds no such event at that time: 280, not a silent skip.
    let past_the_log = forge(time, inc, seq + 1000, 0);
    assert_server_error(
        &resume(&db, past_the_log).await.unwrap_err(),
        280,
        "ChangeStreamFatalError",
        &[],
    );
    let wrong_time = forge(time, inc + 1000, seq, 0);
    assert_server_error(
        &resume(&db, wrong_time).await.unwrap_err(),
        280,
        "ChangeStreamFatalError",
        &[],
    );

    // Multi-byte characters in `_data` are an invalid token (260), not a dropped
    // connection.
    let multi = doc! { "_data": format!("82{}", "é".repeat(17)) };
    assert_server_error(
        &resume(&db, multi).await.unwrap_err(),
        260,
        "InvalidResumeToken",
        &[],
    );
    for bad in ["", "82", "zz", &"8".repeat(36), &format!("{data}00000")] {
        assert_server_error(
            &resume(&db, doc! { "_data": bad }).await.unwrap_err(),
            260,
            "InvalidResumeToken",
            &[],
        );
    }

    // Older than anything the log still holds: 286.
    coll.insert_many((3..10).map(|i| doc! { "_id": i }))
        .await
        .unwrap();
    sim.set_oplog_capacity(3);
    assert_server_error(
        &resume(&db, first).await.unwrap_err(),
        286,
        "ChangeStreamHistoryLost",
        &[],
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_token_ahead_of_the_log_waits_for_it_then_fails_if_it_is_not_there() {
    let (sim, _client, db) = setup().await;
    let coll = db.collection::<Document>("c");
    coll.insert_one(doc! { "_id": 0 }).await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // A token from "another deployment" two seconds ahead in time.
    let ahead = forge(u32::try_from(now).unwrap() + 2, 1, 1_000_000, 0);
    let reply = resume(&db, ahead.clone()).await.unwrap();
    let cursor = reply.get_document("cursor").unwrap();
    assert!(cursor.get_array("firstBatch").unwrap().is_empty());
    assert_eq!(
        cursor.get_document("postBatchResumeToken").unwrap(),
        &ahead,
        "the resume point stands while the log is behind it"
    );
    let id = cursor.get_i64("id").unwrap();
    // Once the log has passed the token's time without its event, the stream fails.
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    let err = get_more(&db, id).await.unwrap_err();
    assert_server_error(
        &err,
        280,
        "ChangeStreamFatalError",
        &["NonResumableChangeStreamError"],
    );
    sim.shutdown().await;
}
