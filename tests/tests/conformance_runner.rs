//! The unified-format runner itself: generic over directories, and never passing what it
//! does not check.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cdc_tests::unified::{Target, Verdict, run_dir};

fn write_suite(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("cdc-runner-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (file, body) in files {
        std::fs::write(dir.join(file), body).unwrap();
    }
    dir
}

const HEADER: &str = r#"
  "schemaVersion": "1.7",
  "createEntities": [
    { "client": { "id": "client0", "observeEvents": ["commandStartedEvent"] } },
    { "database": { "id": "db0", "client": "client0", "databaseName": "d" } },
    { "collection": { "id": "c0", "database": "db0", "collectionName": "c" } }
  ],
  "initialData": [ { "collectionName": "c", "databaseName": "d", "documents": [] } ],
"#;

fn test_file(operations: &str, extra: &str) -> String {
    format!(
        r#"{{ "description": "synthetic", {HEADER} "tests": [ {{ "description": "t", "operations": {operations} {extra} }} ] }}"#
    )
}

#[tokio::test]
async fn passes_fails_and_refuses_what_it_does_not_support() {
    let watch_and_insert = r#"[
        { "name": "createChangeStream", "object": "c0", "arguments": { "pipeline": [] }, "saveResultAsEntity": "s0" },
        { "name": "insertOne", "object": "c0", "arguments": { "document": { "_id": 1 } } },
        { "name": "iterateUntilDocumentOrError", "object": "s0", "expectResult": { "operationType": "insert", "documentKey": { "_id": 1 } } }
    ]"#;
    let wrong = watch_and_insert.replace(
        r#""operationType": "insert""#,
        r#""operationType": "delete""#,
    );
    let unsupported =
        r#"[ { "name": "bulkWrite", "object": "c0", "arguments": { "requests": [] } } ]"#;
    let bad_matcher = watch_and_insert.replace(
        r#""documentKey": { "_id": 1 }"#,
        r#""documentKey": { "$$matchesEntity": "x" }"#,
    );
    let events = r#", "expectEvents": [ { "client": "client0", "ignoreExtraEvents": true, "events": [ { "commandStartedEvent": { "commandName": "find" } } ] } ]"#;
    let gated = format!(
        r#"{{ "description": "gated", "runOnRequirements": [ {{ "topologies": ["sharded"] }} ], {HEADER} "tests": [ {{ "description": "t", "operations": [] }} ] }}"#
    );
    let dir = write_suite(
        "mixed",
        &[
            ("a-pass.json", &test_file(watch_and_insert, "")),
            ("b-wrong.json", &test_file(&wrong, "")),
            ("c-unsupported.json", &test_file(unsupported, "")),
            ("d-matcher.json", &test_file(&bad_matcher, "")),
            ("e-events.json", &test_file(watch_and_insert, events)),
            ("f-gated.json", &gated),
        ],
    );
    let results = run_dir(&dir, &Target::Sim).await.unwrap();
    let verdicts: Vec<&Verdict> = results.iter().map(|r| &r.verdict).collect();
    assert_eq!(verdicts[0], &Verdict::Pass);
    assert!(
        matches!(verdicts[1], Verdict::Fail(why) if why.contains("operationType")),
        "{:?}",
        verdicts[1]
    );
    assert!(
        matches!(verdicts[2], Verdict::Fail(why) if why.contains("not supported")),
        "{:?}",
        verdicts[2]
    );
    assert!(
        matches!(verdicts[3], Verdict::Fail(why) if why.contains("$$matchesEntity")),
        "{:?}",
        verdicts[3]
    );
    assert!(
        matches!(verdicts[4], Verdict::Fail(why) if why.contains("commandName")),
        "{:?}",
        verdicts[4]
    );
    assert!(
        matches!(verdicts[5], Verdict::Skip(why) if why.contains("sharded")),
        "{:?}",
        verdicts[5]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `failGetMoreAfterCursorCheckout` through the runner: the server labels the injected
/// error by its rule, so a resumable code resumes (the runner sees the event and the new
/// `aggregate`) and an unlabelled one reaches the test as an error; expecting the opposite
/// fails.
#[tokio::test]
async fn fail_get_more_after_cursor_checkout_is_labelled_by_the_server() {
    let ops = |code: i32, expect: &str| {
        format!(
            r#"[
        {{ "name": "failPoint", "object": "testRunner", "arguments": {{ "client": "client0", "failPoint": {{
            "configureFailPoint": "failGetMoreAfterCursorCheckout", "mode": {{ "times": 1 }}, "data": {{ "errorCode": {code}, "closeConnection": false }} }} }} }},
        {{ "name": "createChangeStream", "object": "c0", "arguments": {{ "pipeline": [] }}, "saveResultAsEntity": "s0" }},
        {{ "name": "insertOne", "object": "c0", "arguments": {{ "document": {{ "_id": 1 }} }} }},
        {{ "name": "iterateUntilDocumentOrError", "object": "s0", {expect} }}
    ]"#
        )
    };
    let resumed = r#""expectResult": { "operationType": "insert", "documentKey": { "_id": 1 } }"#;
    let refused = r#""expectError": { "errorCode": 50 }"#;
    let events = r#", "expectEvents": [ { "client": "client0", "ignoreExtraEvents": true, "events": [
        { "commandStartedEvent": { "commandName": "aggregate" } },
        { "commandStartedEvent": { "commandName": "insert" } },
        { "commandStartedEvent": { "commandName": "getMore" } },
        { "commandStartedEvent": { "commandName": "aggregate", "command": { "pipeline": [ { "$changeStream": { "resumeAfter": { "$$exists": true } } } ] } } }
    ] } ]"#;
    let dir = write_suite(
        "getmore-fp",
        &[
            // HostUnreachable (6) is labelled ResumableChangeStreamError: the stream resumes.
            ("a-resumes.json", &test_file(&ops(6, resumed), events)),
            // MaxTimeMSExpired (50) is not: the error reaches the application.
            ("b-refused.json", &test_file(&ops(50, refused), "")),
            ("c-wrong.json", &test_file(&ops(50, resumed), "")),
            ("d-wrong.json", &test_file(&ops(6, refused), "")),
        ],
    );
    let results = run_dir(&dir, &Target::Sim).await.unwrap();
    let verdicts: Vec<&Verdict> = results.iter().map(|r| &r.verdict).collect();
    assert_eq!(verdicts[0], &Verdict::Pass, "{:?}", results[0]);
    assert_eq!(verdicts[1], &Verdict::Pass, "{:?}", results[1]);
    assert!(matches!(verdicts[2], Verdict::Fail(_)), "{:?}", verdicts[2]);
    assert!(matches!(verdicts[3], Verdict::Fail(_)), "{:?}", verdicts[3]);
    let _ = std::fs::remove_dir_all(&dir);
}
