//! The run loop's decisions, driven by `mockall` mocks of the source, the cursor, the store
//! and the handler through scripted sequences: which points are saved, and when, after
//! each kind of failure. No server; each test runs in milliseconds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use bson::rawdoc;
use cdc_core::{
    BoxError, ChangeCursor, ChangeEvent, ChangeSource, CheckpointPolicy, ClusterTime, Dispatcher,
    ErrorKind, HistoryGap, Next, ResumePoint, ResumeStore, ResumeToken, StartPosition,
};
use cdc_processor::DocumentProcessor;
use mockall::{Sequence, mock, predicate::eq};

mock! {
    Cursor {}
    #[async_trait]
    impl ChangeCursor for Cursor {
        async fn next(&mut self) -> cdc_core::Result<Next>;
        fn resume_token(&self) -> Option<ResumeToken>;
        async fn close(self: Box<Self>);
    }
}

mock! {
    Source {}
    #[async_trait]
    impl ChangeSource for Source {
        async fn open(&self, position: &StartPosition) -> cdc_core::Result<Box<dyn ChangeCursor>>;
        fn describe(&self) -> String;
    }
}

mock! {
    Store {}
    #[async_trait]
    impl ResumeStore for Store {
        async fn load(&self, stream: &str) -> cdc_core::Result<Option<ResumePoint>>;
        async fn save(&self, stream: &str, point: &ResumePoint) -> cdc_core::Result<()>;
        async fn delete(&self, stream: &str) -> cdc_core::Result<()>;
        async fn list_streams(&self) -> cdc_core::Result<Vec<String>>;
        fn describe(&self) -> String;
    }
}

mock! {
    Handler {}
    #[async_trait]
    impl Dispatcher for Handler {
        async fn dispatch(&self, event: &ChangeEvent, previous: Option<BoxError>) -> Result<(), BoxError>;
    }
}

fn token(n: u32) -> ResumeToken {
    ResumeToken::from_document(&bson::doc! { "_data": format!("82{:08X}{:08X}", 1000 + n, 1) })
        .unwrap()
}

/// An insert of document `n` at cluster time `1000 + n`.
fn insert(n: u32) -> ChangeEvent {
    let raw = rawdoc! {
        "_id": { "_data": format!("82{:08X}{:08X}", 1000 + n, 1) },
        "operationType": "insert",
        "clusterTime": bson::Timestamp { time: 1000 + n, increment: 1 },
        "ns": { "db": "d", "coll": "c" },
        "documentKey": { "_id": i64::from(n) },
        "fullDocument": { "_id": i64::from(n) },
    };
    ChangeEvent::from_raw_buf(raw).unwrap()
}

fn invalidate(n: u32) -> ChangeEvent {
    let raw = rawdoc! {
        "_id": { "_data": format!("82{:08X}{:08X}", 1000 + n, 1) },
        "operationType": "invalidate",
        "clusterTime": bson::Timestamp { time: 1000 + n, increment: 1 },
    };
    ChangeEvent::from_raw_buf(raw).unwrap()
}

/// What a scripted cursor does on one `next()`.
enum Step {
    Event(Box<ChangeEvent>),
    /// An event as the server sent it (decoded by the run loop).
    Raw(bson::RawDocumentBuf),
    /// An empty round trip with this post-batch token.
    Idle(ResumeToken),
    /// The server closed the cursor.
    Closed,
    /// Nothing more for now (repeats forever).
    Quiet,
}

/// A cursor mock playing `steps`, its resume token following what it returned.
fn scripted(steps: Vec<Step>, gap: Option<HistoryGap>) -> MockCursor {
    let state = Arc::new(Mutex::new((
        VecDeque::from(steps),
        None::<ResumeToken>,
        gap,
    )));
    let mut cursor = MockCursor::new();
    let s = Arc::clone(&state);
    cursor.expect_next().returning(move || {
        let mut st = s.lock().unwrap();
        if let Some(gap) = st.2.take() {
            return Ok(Next::Gap(gap));
        }
        match st.0.pop_front() {
            Some(Step::Event(e)) => {
                st.1 = Some(e.token.clone());
                Ok(Next::Event(e))
            }
            Some(Step::Raw(raw)) => {
                if let Ok(id) = raw.get_document("_id") {
                    st.1 = Some(ResumeToken::copied(id));
                }
                Ok(Next::Raw(raw))
            }
            Some(Step::Idle(t)) => {
                st.1 = Some(t.clone());
                Ok(Next::Idle(Some(t)))
            }
            Some(Step::Closed) => Ok(Next::Closed),
            Some(Step::Quiet) | None => {
                let token = st.1.clone();
                drop(st);
                std::thread::sleep(Duration::from_millis(5));
                Ok(Next::Idle(token))
            }
        }
    });
    let s = Arc::clone(&state);
    cursor
        .expect_resume_token()
        .returning(move || s.lock().unwrap().1.clone());
    cursor.expect_close().returning(|| ());
    cursor
}

fn stored_at(n: u32) -> ResumePoint {
    ResumePoint::for_event(
        token(n),
        ClusterTime::new(1000 + n, 1),
        cdc_core::OperationType::Insert,
        bson::DateTime::now(),
    )
}

/// A store holding point `n`, recording every save.
fn recording_store(n: u32) -> (MockStore, Arc<Mutex<Vec<ResumeToken>>>) {
    let saved = Arc::new(Mutex::new(Vec::new()));
    let mut store = MockStore::new();
    store
        .expect_load()
        .returning(move |_| Ok(Some(stored_at(n))));
    let record = Arc::clone(&saved);
    store.expect_save().returning(move |_, p| {
        record.lock().unwrap().push(p.token.clone());
        Ok(())
    });
    store.expect_describe().returning(|| "mock store".into());
    (store, saved)
}

fn source_with(cursors: Vec<(StartPosition, MockCursor)>) -> MockSource {
    let mut source = MockSource::new();
    let mut seq = Sequence::new();
    for (position, cursor) in cursors {
        source
            .expect_open()
            .with(eq(position))
            .times(1)
            .in_sequence(&mut seq)
            .return_once(move |_| Ok(Box::new(cursor) as Box<dyn ChangeCursor>));
    }
    source.expect_describe().returning(|| "mock source".into());
    source
}

fn processor(source: MockSource, store: MockStore, policy: CheckpointPolicy) -> DocumentProcessor {
    DocumentProcessor::builder()
        .source(Arc::new(source))
        .stream_id("s")
        .store(Arc::new(store))
        .checkpoint(policy)
        .build()
        .unwrap()
}

/// A handler that accepts every event.
fn accept_all() -> impl Dispatcher + 'static {
    cdc_core::FnDispatcher(|_: &ChangeEvent, _: Option<BoxError>| Ok(()))
}

/// Runs the processor with [`accept_all`] in the background.
fn spawn_accepting(p: &DocumentProcessor) -> tokio::task::JoinHandle<cdc_processor::Result<()>> {
    let runner = p.clone();
    tokio::spawn(async move { runner.start(accept_all()).await })
}

/// Waits until the processor has handled `n` events, failing after 10 s.
async fn until_handled(p: &DocumentProcessor, n: u64) {
    let watched = p.clone();
    tokio::time::timeout(Duration::from_secs(10), async move {
        while watched.stats().events < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("events handled within 10 s");
}

fn batched() -> CheckpointPolicy {
    CheckpointPolicy::batched(100, Duration::from_secs(3600)).unwrap()
}

#[tokio::test]
async fn an_error_mid_batch_saves_only_what_succeeded() {
    let cursor = scripted(
        vec![
            Step::Event(Box::new(insert(1))),
            Step::Event(Box::new(insert(2))),
            Step::Event(Box::new(insert(3))),
        ],
        None,
    );
    let source = source_with(vec![(StartPosition::ResumeAfter(token(0)), cursor)]);
    let (store, saved) = recording_store(0);
    let mut handler = MockHandler::new();
    let mut seq = Sequence::new();
    handler
        .expect_dispatch()
        .withf(|e, _| e.token == token(1))
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(()));
    handler
        .expect_dispatch()
        .withf(|e, _| e.token == token(2))
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Err("refused".into()));
    // Event 3 is never handed over.
    let p = processor(source, store, batched());
    let err = p.start(handler).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Handler);
    // The error names the event: its document and its resume token.
    assert!(err.to_string().contains("of document 2"), "{err}");
    match &err {
        cdc_processor::Error::Cdc(cdc_core::Error::Handler {
            document_id,
            token: t,
            ..
        }) => {
            assert_eq!(document_id.as_deref(), Some("2"));
            assert_eq!(t.as_ref(), Some(&token(2)));
        }
        other => panic!("not a handler error: {other:?}"),
    }
    assert_eq!(
        *saved.lock().unwrap(),
        vec![token(1)],
        "only the event that succeeded"
    );
}

/// The raw bytes of [`insert`]`(n)`.
fn raw_insert(n: u32) -> bson::RawDocumentBuf {
    insert(n).raw().unwrap().to_owned()
}

#[tokio::test]
async fn raw_events_are_decoded_by_the_run_loop_and_a_malformed_one_stops_it() {
    // An event whose `clusterTime` is a string: it frames as BSON, it does not decode.
    let mut bytes = raw_insert(3).into_bytes();
    let at = bytes
        .windows(12)
        .position(|w| w == b"clusterTime\0")
        .unwrap();
    bytes[at - 1] = 0x02; // the element's type: a string now, of the timestamp's 8 bytes
    bytes[at + 12..at + 16].copy_from_slice(&4_i32.to_le_bytes());
    bytes[at + 19] = 0;
    let broken = bson::RawDocumentBuf::from_bytes(bytes).unwrap();
    let cursor = scripted(
        vec![
            Step::Raw(raw_insert(1)),
            Step::Event(Box::new(insert(2))),
            Step::Raw(broken),
            Step::Raw(raw_insert(4)),
        ],
        None,
    );
    let source = source_with(vec![(StartPosition::ResumeAfter(token(0)), cursor)]);
    let (store, saved) = recording_store(0);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let handler = cdc_core::FnDispatcher(move |e: &ChangeEvent, _: Option<BoxError>| {
        s.lock().unwrap().push((e.token.clone(), e.ns.clone()));
        Ok(())
    });
    let p = processor(source, store, batched());
    let err = p.start(handler).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Fatal, "{err}");
    assert!(err.to_string().contains("clusterTime"), "{err}");
    let ns = Some(cdc_core::Namespace::collection("d", "c"));
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(token(1), ns.clone()), (token(2), ns)],
        "the raw and the decoded event, nothing after the malformed one"
    );
    assert_eq!(
        *saved.lock().unwrap(),
        vec![token(2)],
        "what was handled is saved"
    );
}

#[tokio::test]
async fn a_close_after_invalidate_saves_it_and_reopens_after_it() {
    let first = scripted(
        vec![
            Step::Event(Box::new(insert(1))),
            Step::Event(Box::new(invalidate(2))),
            Step::Closed,
        ],
        None,
    );
    let second = scripted(vec![Step::Quiet], None);
    let source = source_with(vec![
        (StartPosition::ResumeAfter(token(0)), first),
        (StartPosition::StartAfter(token(2)), second),
    ]);
    let (store, saved) = recording_store(0);
    let p = processor(source, store, batched());
    let stop = p.clone();
    let task = spawn_accepting(&p);
    let reopened = p.clone();
    tokio::time::timeout(Duration::from_secs(10), async move {
        while reopened.stats().reopens < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    stop.stop();
    task.await.unwrap().unwrap();
    // The invalidate is saved at once (it covers event 1); nothing after it.
    assert_eq!(*saved.lock().unwrap(), vec![token(2)]);
}

#[tokio::test]
async fn idle_tokens_are_saved_when_they_move_and_not_past_outstanding_events() {
    let cursor = scripted(
        vec![
            Step::Idle(token(5)),
            Step::Idle(token(5)),
            Step::Event(Box::new(insert(6))),
            Step::Idle(token(7)),
        ],
        None,
    );
    let source = source_with(vec![(StartPosition::ResumeAfter(token(0)), cursor)]);
    let (store, saved) = recording_store(0);
    let policy = CheckpointPolicy::batched(100, Duration::from_secs(3600))
        .unwrap()
        .with_idle_interval(Duration::ZERO);
    let p = processor(source, store, policy);
    let task = spawn_accepting(&p);
    until_handled(&p, 1).await;
    // Let the last idle round trip through, then stop: the final checkpoint takes it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    p.stop();
    task.await.unwrap().unwrap();
    // 5 once (the repeat is a tick); event 6 waits for its batch, and the idle token 7
    // after it replaces it, saved by the final checkpoint.
    assert_eq!(*saved.lock().unwrap(), vec![token(5), token(7)]);
}

#[tokio::test]
async fn a_history_gap_is_recorded_in_the_stats() {
    let gap = HistoryGap::new(
        Some(ClusterTime::new(1000, 1)),
        Some(ClusterTime::new(2000, 1)),
    );
    let cursor = scripted(vec![Step::Event(Box::new(insert(1)))], Some(gap.clone()));
    let source = source_with(vec![(StartPosition::ResumeAfter(token(0)), cursor)]);
    let (store, _saved) = recording_store(0);
    let p = processor(source, store, batched());
    let task = spawn_accepting(&p);
    until_handled(&p, 1).await;
    p.stop();
    task.await.unwrap().unwrap();
    assert_eq!(p.stats().last_gap, Some(gap));
}

/// A store whose saves take `delay` before the mock answers (a mock's answer is
/// immediate; the wait is what a slow store does).
struct Slow {
    inner: MockStore,
    delay: Duration,
}

#[async_trait]
impl ResumeStore for Slow {
    async fn load(&self, stream: &str) -> cdc_core::Result<Option<ResumePoint>> {
        self.inner.load(stream).await
    }
    async fn save(&self, stream: &str, point: &ResumePoint) -> cdc_core::Result<()> {
        tokio::time::sleep(self.delay).await;
        self.inner.save(stream, point).await
    }
    async fn delete(&self, stream: &str) -> cdc_core::Result<()> {
        self.inner.delete(stream).await
    }
    async fn list_streams(&self) -> cdc_core::Result<Vec<String>> {
        self.inner.list_streams().await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[tokio::test]
async fn a_store_timeout_ends_the_run_with_a_retryable_error() {
    let cursor = scripted(vec![Step::Event(Box::new(insert(1)))], None);
    let source = source_with(vec![(StartPosition::ResumeAfter(token(0)), cursor)]);
    let mut store = MockStore::new();
    store.expect_load().returning(|_| Ok(Some(stored_at(0))));
    // Cut short by the timeout: the mock is never asked to save.
    store.expect_save().never();
    store.expect_describe().returning(|| "slow store".into());
    let store = Slow {
        inner: store,
        delay: Duration::from_secs(30),
    };
    let p = DocumentProcessor::builder()
        .source(Arc::new(source))
        .stream_id("s")
        .store(Arc::new(store))
        .checkpoint(CheckpointPolicy::every_event())
        .store_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let err = p.start(accept_all()).await.unwrap_err();
    assert!(
        matches!(err, cdc_processor::Error::StoreTimeout { .. }),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Store);
    assert!(err.is_retryable());
}

#[tokio::test]
async fn a_store_refusal_ends_the_run_and_nothing_is_retried() {
    let cursor = scripted(vec![Step::Event(Box::new(insert(1)))], None);
    let source = source_with(vec![(StartPosition::ResumeAfter(token(0)), cursor)]);
    let mut store = MockStore::new();
    store.expect_load().returning(|_| Ok(Some(stored_at(0))));
    store.expect_save().times(2).returning(|stream, p| {
        Err(cdc_core::Error::Regression {
            stream: stream.to_owned(),
            stored: ClusterTime::new(5000, 1),
            attempted: p.cluster_time,
        })
    });
    store
        .expect_describe()
        .returning(|| "refusing store".into());
    let p = processor(source, store, CheckpointPolicy::every_event());
    let err = p
        .start_with_retry(cdc_processor::default_backoff(), accept_all())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Fatal, "{err}");
    assert_eq!(p.stats().restarts, 0, "a refusal is not retried");
}

/// A store that fails the same way each time, which only a person can mend (its directory
/// replaced by a file): the retry loop tries `PERSISTENT_TRIES` runs in a row, then gives
/// up with the error, instead of restarting forever; a store that is merely away
/// (`Store`) is retried past that.
#[tokio::test]
async fn a_persistent_store_failure_is_retried_a_bounded_number_of_times() {
    let fast = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(1))
        .with_max_delay(Duration::from_millis(2))
        .without_max_times();
    let mut store = MockStore::new();
    store
        .expect_load()
        .times(cdc_core::PERSISTENT_TRIES as usize)
        .returning(|stream| {
            Err(cdc_core::Error::StoreUnusable {
                stream: stream.to_owned(),
                location: "/state/s.json".into(),
                source: Arc::new(std::io::Error::from(std::io::ErrorKind::NotADirectory)),
            })
        });
    store.expect_describe().returning(|| "unusable".into());
    let p = processor(source_with(Vec::new()), store, batched());
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        p.start_with_retry(fast, accept_all()),
    )
    .await
    .expect("given up, not retried forever")
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Persistent, "{err}");
    assert!(err.to_string().contains("/state/s.json"), "{err}");
    assert_eq!(
        p.stats().restarts,
        u64::from(cdc_core::PERSISTENT_TRIES - 1)
    );

    // Away (Store) is not counted: more tries than that, then it answers.
    let calls = Arc::new(Mutex::new(0_u32));
    let mut store = MockStore::new();
    let counted = Arc::clone(&calls);
    store.expect_load().returning(move |stream| {
        let mut n = counted.lock().unwrap();
        *n += 1;
        if *n <= cdc_core::PERSISTENT_TRIES * 2 {
            Err(cdc_core::Error::store(stream, "connection refused"))
        } else {
            Err(cdc_core::Error::InvalidArgument {
                name: "test",
                reason: "back, and done".into(),
            })
        }
    });
    store.expect_describe().returning(|| "away".into());
    let p = processor(source_with(Vec::new()), store, batched());
    let err = p.start_with_retry(fast, accept_all()).await.unwrap_err();
    assert!(err.to_string().contains("back, and done"), "{err}");
    assert_eq!(*calls.lock().unwrap(), cdc_core::PERSISTENT_TRIES * 2 + 1);
}

/// A handler that saves points itself (a sink's checkpoint in its own transaction) leaves
/// the store ahead of the processor's saves. With `handler_checkpoints`, a refusal whose
/// stored point is at an event the run handed out is accepted and the run goes on; a
/// stored point beyond anything handed out is still refused (another instance).
#[tokio::test]
async fn a_point_the_handler_saved_itself_is_not_a_regression() {
    for (stored, handler_saves, accepted) in [
        (1001, true, true),
        (5000, true, false),
        (1001, false, false),
    ] {
        let cursor = scripted(vec![Step::Event(Box::new(insert(1))), Step::Quiet], None);
        let source = source_with(vec![(StartPosition::ResumeAfter(token(0)), cursor)]);
        let mut store = MockStore::new();
        store.expect_load().returning(|_| Ok(Some(stored_at(0))));
        store.expect_save().returning(move |stream, p| {
            Err(cdc_core::Error::Regression {
                stream: stream.to_owned(),
                stored: ClusterTime::new(stored, 1),
                attempted: p.cluster_time,
            })
        });
        store.expect_describe().returning(|| "store ahead".into());
        let p = DocumentProcessor::builder()
            .source(Arc::new(source))
            .stream_id("s")
            .store(Arc::new(store))
            .checkpoint(CheckpointPolicy::every_event())
            .handler_checkpoints(handler_saves)
            .build()
            .unwrap();
        let task = spawn_accepting(&p);
        if accepted {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while p.stats().checkpoints < 1 {
                assert!(tokio::time::Instant::now() < deadline, "never confirmed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            p.stop();
            task.await.unwrap().unwrap();
        } else {
            let err = task.await.unwrap().unwrap_err();
            assert_eq!(
                err.kind(),
                ErrorKind::Fatal,
                "{stored} {handler_saves}: {err}"
            );
        }
    }
}

/// Handles every event at once except the first, which it holds until released.
#[derive(Clone)]
struct HoldFirst {
    release: Arc<tokio::sync::Notify>,
    done: Arc<Mutex<Vec<ResumeToken>>>,
}

#[async_trait]
impl Dispatcher for HoldFirst {
    async fn dispatch(&self, e: &ChangeEvent, _: Option<BoxError>) -> Result<(), BoxError> {
        if e.token == token(1) {
            self.release.notified().await;
        }
        self.done.lock().unwrap().push(e.token.clone());
        Ok(())
    }
}

#[tokio::test]
async fn out_of_order_lane_completions_never_save_past_an_unfinished_event() {
    let cursor = scripted(
        (1..=8).map(|n| Step::Event(Box::new(insert(n)))).collect(),
        None,
    );
    let source = source_with(vec![(StartPosition::ResumeAfter(token(0)), cursor)]);
    let (store, saved) = recording_store(0);
    let p = DocumentProcessor::builder()
        .source(Arc::new(source))
        .stream_id("s")
        .store(Arc::new(store))
        .checkpoint(CheckpointPolicy::every_event())
        .concurrency(4)
        .build()
        .unwrap();
    let handler = HoldFirst {
        release: Arc::new(tokio::sync::Notify::new()),
        done: Arc::default(),
    };
    let runner = p.clone();
    let h = handler.clone();
    let task = tokio::spawn(async move { runner.start(h).await });
    // Events 2, 3 and 4 are on the other lanes (keys 1 and 5 share lane 0): they finish,
    // and the bound (one per lane under `every_event`) holds the rest back.
    let done = Arc::clone(&handler.done);
    tokio::time::timeout(Duration::from_secs(10), async move {
        while done.lock().unwrap().len() < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(handler.done.lock().unwrap().len(), 3);
    assert!(
        saved.lock().unwrap().is_empty(),
        "nothing is saved while event 1 is unfinished: {:?}",
        saved.lock().unwrap()
    );
    handler.release.notify_one();
    let done = Arc::clone(&handler.done);
    tokio::time::timeout(Duration::from_secs(10), async move {
        while done.lock().unwrap().len() < 8 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    p.stop();
    task.await.unwrap().unwrap();
    let saved = saved.lock().unwrap().clone();
    assert_eq!(saved.last(), Some(&token(8)), "{saved:?}");
    let mut sorted = saved.clone();
    sorted.sort_by_key(ToString::to_string);
    assert_eq!(saved, sorted, "points only move forwards");
}

/// What users name is reachable through the facade, with the facade's own `bson` and
/// `mongodb` (one major of each).
#[test]
fn the_facade_re_exports_what_users_name() {
    let document: cdc_processor::bson::Document = cdc_processor::bson::doc! { "_id": 1 };
    let token =
        cdc_processor::ResumeToken::from_document(&cdc_processor::bson::doc! { "_data": "82" })
            .unwrap();
    let position = cdc_processor::StartPosition::ResumeAfter(token);
    assert!(position.token().is_some());
    assert!(cdc_processor::ErrorKind::Transient.is_retryable());
    let gap = cdc_processor::HistoryGap::new(None, None);
    assert!(!gap.to_string().is_empty());
    let _options = cdc_processor::mongodb::options::ClientOptions::default();
    assert_eq!(document.get_i32("_id").unwrap(), 1);
}

/// An error's message carries its cause, for `start`'s error, the published copy and the
/// stats: "resume store failed" alone says nothing about why.
#[tokio::test]
async fn errors_name_their_cause() {
    let mut store = MockStore::new();
    store.expect_load().returning(|stream| {
        Err(cdc_core::Error::store(
            stream,
            "cannot connect to 127.0.0.1:1: Connection refused (os error 111)",
        ))
    });
    store
        .expect_describe()
        .returning(|| "unreachable store".into());
    let source = source_with(Vec::new());
    let p = processor(source, store, batched());
    let mut published = p.on_start_err();
    let err = p.start(accept_all()).await.unwrap_err();
    let want = "Connection refused (os error 111)";
    assert!(
        err.to_string()
            .contains("resume store failed for stream `s`"),
        "{err}"
    );
    assert!(err.to_string().contains(want), "{err}");
    let copy = published.recv().await.unwrap();
    assert!(copy.to_string().contains(want), "{copy}");
    assert_eq!(copy.kind(), ErrorKind::Store);
    assert!(p.stats().last_error.unwrap().contains(want));
}

/// A stop during the wait before a retry ends `start_with_retry` with `Ok`, and the
/// failure that caused the wait stays visible in the stats and on the broadcast.
#[tokio::test]
async fn a_stop_during_a_retry_wait_keeps_the_cause_visible() {
    let mut store = MockStore::new();
    store.expect_load().returning(|stream| {
        Err(cdc_core::Error::store(
            stream,
            "the store is down for maintenance",
        ))
    });
    store.expect_describe().returning(|| "store".into());
    let p = processor(source_with(Vec::new()), store, batched());
    let mut published = p.on_start_err();
    let runner = p.clone();
    let task = tokio::spawn(async move {
        runner
            .start_with_retry(
                cdc_processor::backon::ConstantBuilder::default()
                    .with_delay(Duration::from_secs(3600))
                    .without_max_times(),
                accept_all(),
            )
            .await
    });
    let cause = published.recv().await.unwrap();
    assert!(
        cause.to_string().contains("down for maintenance"),
        "{cause}"
    );
    p.stop();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        p.stats()
            .last_error
            .unwrap()
            .contains("down for maintenance")
    );
    // A stopped processor does not start again.
    let again = p.start(accept_all()).await.unwrap_err();
    assert!(matches!(again, cdc_processor::Error::Stopped(_)), "{again}");
}

/// A stored point is validated before the stream opens on it: a token that frames as
/// BSON but holds a bad element, or a cluster time that cannot be right, is a
/// `CorruptPoint` naming the stream and the store (the source is never opened).
#[tokio::test]
async fn a_corrupt_stored_point_is_refused_before_opening() {
    // `{ _data: "82AB" }` with the string's length prefix broken (framing still valid).
    let mut bytes = Vec::new();
    bson::doc! { "_data": "82AB" }
        .to_writer(&mut bytes)
        .unwrap();
    let at = bytes.len() - 10; // the string's length prefix: 4 bytes before "82AB\0", then the terminator
    bytes[at..at + 4].copy_from_slice(&100_i32.to_le_bytes());
    let bad_token = ResumeToken::from_bytes(bytes).expect("the framing is intact");
    let points = [
        ResumePoint::for_event(
            bad_token,
            ClusterTime::new(1000, 1),
            cdc_core::OperationType::Insert,
            bson::DateTime::now(),
        ),
        ResumePoint::for_event(
            token(1),
            ClusterTime::new(u32::MAX, 1),
            cdc_core::OperationType::Insert,
            bson::DateTime::now(),
        ),
    ];
    for (point, why) in points
        .into_iter()
        .zip(["does not decode", "ahead of this machine's clock"])
    {
        let mut store = MockStore::new();
        store.expect_load().return_once(move |_| Ok(Some(point)));
        store.expect_describe().returning(|| "mock store".into());
        // No `open` is expected: the source must not be asked.
        let p = processor(source_with(Vec::new()), store, batched());
        let err = p.start(accept_all()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Fatal, "{err}");
        let text = err.to_string();
        assert!(
            text.contains("corrupt resume point for stream `s` at mock store"),
            "{text}"
        );
        assert!(text.contains(why), "{text}");
    }
}
