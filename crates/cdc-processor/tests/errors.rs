//! One error through the facade: connecting, opening a store and running all return
//! `cdc_processor::Error`, whose server code, labels, kind and cause chain a user reaches
//! without a downcast, and whose text never shows a secret.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use bson::doc;
use cdc_processor::{
    CoreError, DocumentProcessor, Error, ErrorKind, FnDispatcher, Watch, stores::MemoryStore,
};

#[tokio::test]
async fn a_server_refusal_has_its_code_labels_kind_and_cause_chain() {
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let client = cdc_processor::connect(&sim.uri(), Duration::from_secs(5))
        .await
        .unwrap();
    client
        .database("admin")
        .run_command(doc! {
            "configureFailPoint": "failCommand",
            "mode": { "times": 1 },
            "data": {
                "failCommands": ["aggregate"],
                "errorCode": 13,
                "errorLabels": ["TheSecondLabel", "AFirstLabel"],
            },
        })
        .await
        .unwrap();
    let p = DocumentProcessor::builder()
        .source(Watch::collection(client, "shop", "orders"))
        .store(Arc::new(MemoryStore::new()))
        .build()
        .unwrap();
    let err = p.start(FnDispatcher(|_: &_, _| Ok(()))).await.unwrap_err();
    assert_eq!(err.code(), Some(13), "{err:?}");
    assert_eq!(err.labels(), ["AFirstLabel", "TheSecondLabel"], "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Fatal);
    assert!(!err.is_retryable());
    assert!(
        matches!(err, Error::Cdc(CoreError::Source { .. })),
        "{err:?}"
    );
    // The chain goes down to the driver's own error.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    let mut driver = false;
    while let Some(c) = cause {
        driver |= c
            .downcast_ref::<cdc_processor::mongodb::error::Error>()
            .is_some();
        cause = c.source();
    }
    assert!(driver, "no driver error in the chain of {err:?}");
    // Errors of other kinds have neither.
    let stopped = Error::Stopped("s".into());
    assert_eq!((stopped.code(), stopped.labels().len()), (None, 0));
    sim.shutdown().await;
}

#[tokio::test]
async fn connecting_and_opening_stores_return_the_same_error_without_secrets() {
    let err = cdc_processor::connect(
        "mongodb://app:s3cr3t-pass@127.0.0.1:1/?replicaSet=rs0",
        Duration::from_millis(200),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Mongo(_)), "{err:?}");
    assert!(
        err.is_retryable(),
        "an unreachable server is worth retrying: {err:?}"
    );
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(!shown.contains("s3cr3t-pass"), "{shown}");
    }
    let err = cdc_processor::stores::open("nosuchstore://user:hunter2@host/x")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Cdc(CoreError::InvalidArgument { .. })),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Fatal);
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
