//! `Builder::build` refuses every contradiction that can still be written, with a typed
//! error naming both settings; each case also builds once the contradiction is removed,
//! so the refusal is the contradiction's doing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use cdc_processor::{
    BuildError, Builder, ClusterTime, DocumentProcessor, Error, HandlerErrorPolicy,
    HistoryLostPolicy, SnapshotMode, StartPosition, Storage, Watch, stores::MemoryStore,
};

/// A client that is never used: parsing a URI without SRV does not connect.
async fn client() -> cdc_processor::mongodb::Client {
    cdc_processor::mongodb::Client::with_uri_str("mongodb://127.0.0.1:1/?replicaSet=rs0")
        .await
        .unwrap()
}

fn watch(client: &cdc_processor::mongodb::Client) -> Watch {
    Watch::collection(client.clone(), "shop", "orders")
}

/// A builder with nothing to refuse: a watch and a store.
fn valid(c: &cdc_processor::mongodb::Client, store: &Arc<MemoryStore>) -> Builder {
    DocumentProcessor::builder()
        .source(watch(c))
        .store(store.clone())
}

fn at() -> StartPosition {
    StartPosition::AtOperationTime(ClusterTime::new(1_700_000_000, 1))
}

#[tokio::test]
async fn every_contradiction_is_a_typed_error_naming_both_settings() {
    let c = client().await;
    let store = Arc::new(MemoryStore::new());
    let base = || valid(&c, &store);
    type Case<'a> = (
        &'a str,
        Box<dyn Fn() -> Builder + 'a>,
        BuildError,
        Box<dyn Fn() -> Builder + 'a>,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "no store",
            Box::new(|| DocumentProcessor::builder().source(watch(&c))),
            BuildError::Missing {
                setting: "store",
                hint: "call .store(…) with a resume store",
            },
            Box::new(base),
        ),
        (
            "a dead-letter policy without a dead-letter store",
            Box::new(|| base().on_handler_error(HandlerErrorPolicy::dead_letter())),
            BuildError::Conflict {
                setting: "on_handler_error",
                other: "store",
                reason: "the policy records dead letters but the store has no dead-letter store: use Storage::new(points).dead_letters(…), a leased store, or &Stores",
            },
            Box::new(|| {
                base()
                    .store(Storage::new(store.clone()).dead_letters(store.clone()))
                    .on_handler_error(HandlerErrorPolicy::dead_letter())
            }),
        ),
        (
            "a resume suffix next to an explicit stream id",
            Box::new(|| base().stream_id("orders").resume_suffix("-v2")),
            BuildError::Conflict {
                setting: "resume_suffix",
                other: "stream_id",
                reason: "a suffix applies to the default stream id only; put it in the explicit id",
            },
            Box::new(|| base().resume_suffix("-v2")),
        ),
        (
            "a start position next to an initial snapshot",
            Box::new(|| {
                base()
                    .source(watch(&c).snapshot(SnapshotMode::Initial))
                    .start_position(at())
            }),
            BuildError::Conflict {
                setting: "start_position",
                other: "snapshot",
                reason: "an initial snapshot starts the stream where the snapshot begins; drop one of them",
            },
            Box::new(|| {
                base()
                    .source(watch(&c).snapshot(SnapshotMode::WhenNeeded))
                    .start_position(at())
            }),
        ),
        (
            "a start position next to a snapshot-only run",
            Box::new(|| {
                base()
                    .source(watch(&c).snapshot(SnapshotMode::InitialOnly))
                    .start_position(at())
            }),
            BuildError::Conflict {
                setting: "start_position",
                other: "snapshot",
                reason: "an initial snapshot starts the stream where the snapshot begins; drop one of them",
            },
            Box::new(|| base().source(watch(&c).snapshot(SnapshotMode::InitialOnly))),
        ),
        (
            "restart from now after lost history next to re-reading the documents then",
            Box::new(|| {
                base().source(
                    watch(&c)
                        .snapshot(SnapshotMode::WhenNeeded)
                        .history_lost_policy(HistoryLostPolicy::RestartFromNow),
                )
            }),
            BuildError::Conflict {
                setting: "history_lost_policy",
                other: "snapshot",
                reason: "SnapshotMode::WhenNeeded reads the documents again when history is lost; RestartFromNow would skip them",
            },
            Box::new(|| {
                base().source(watch(&c).history_lost_policy(HistoryLostPolicy::RestartFromNow))
            }),
        ),
    ];
    for (name, bad, expected, good) in &cases {
        match bad().build() {
            Err(Error::Build(e)) => {
                assert_eq!(&e, expected, "{name}");
                let text = e.to_string();
                if let BuildError::Conflict { setting, other, .. } = expected {
                    assert!(
                        text.contains(setting) && text.contains(other),
                        "{name}: {text}"
                    );
                }
            }
            other => panic!("{name}: expected a build error, got {other:?}"),
        }
        good()
            .build()
            .unwrap_or_else(|e| panic!("{name}, mended: {e}"));
    }
}

#[tokio::test]
async fn out_of_range_settings_are_named() {
    let c = client().await;
    let store = Arc::new(MemoryStore::new());
    let base = || valid(&c, &store);
    let invalid = |b: Builder| match b.build() {
        Err(Error::Build(BuildError::Invalid { setting, .. })) => setting,
        other => panic!("expected an invalid setting, got {other:?}"),
    };
    assert_eq!(invalid(base().concurrency(0)), "concurrency");
    assert_eq!(invalid(base().prefetch(0)), "prefetch");
    assert_eq!(invalid(base().max_buffered_bytes(0)), "max_buffered_bytes");
    assert_eq!(invalid(base().stream_id("")), "stream_id");
    assert_eq!(
        invalid(base().store(Storage::leased(store.clone(), Duration::from_millis(5)))),
        "store"
    );
    assert!(matches!(
        DocumentProcessor::builder().store(store.clone()).build(),
        Err(Error::Build(BuildError::Missing {
            setting: "source",
            ..
        }))
    ));
    base()
        .concurrency(1)
        .prefetch(1)
        .max_buffered_bytes(1)
        .store(Storage::leased(store.clone(), Duration::from_millis(30)))
        .build()
        .unwrap();
}

/// A batch limit out of range is refused by `start` (the only place the handler is
/// given), named as `Batches` spells it, before anything runs.
#[tokio::test]
async fn batch_limits_out_of_range_are_refused_by_start() {
    struct Nothing;
    #[async_trait::async_trait]
    impl cdc_processor::BatchDispatcher for Nothing {
        async fn dispatch_batch(
            &self,
            _: &cdc_processor::Batch<'_>,
            _: &cdc_processor::HandlerContext,
        ) -> Result<(), cdc_processor::BoxError> {
            Ok(())
        }
    }
    let c = client().await;
    let p = DocumentProcessor::builder()
        .source(watch(&c))
        .store(Arc::new(MemoryStore::new()))
        .build()
        .unwrap();
    for (batches, setting) in [
        (
            cdc_processor::Batches::new(Nothing).max_events(0),
            "max_events",
        ),
        (
            cdc_processor::Batches::new(Nothing).max_bytes(0),
            "max_bytes",
        ),
    ] {
        match p.start(batches).await {
            Err(Error::Build(BuildError::Invalid { setting: s, .. })) => assert_eq!(s, setting),
            other => panic!("{setting}: {other:?}"),
        }
    }
    assert_eq!(p.stats().events, 0);
}
