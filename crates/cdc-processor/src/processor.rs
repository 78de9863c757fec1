//! The [`DocumentProcessor`]: reads a change stream, hands each event to the handler, and
//! checkpoints after processing through the `cdc-core` protocol.

use std::{
    future::Future,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use backon::BackoffBuilder;
use cdc_core::{
    ChangeCursor, ChangeEvent, ChangeSource, CheckpointPolicy, Checkpointer, Dispatcher, ErrorKind,
    HistoryGap, OperationType, ResumePoint, ResumeStore, ResumeToken, StartPosition,
};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Error, Result, Stats};

/// What happens when the watched collection is dropped or renamed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidatePolicy {
    /// Dispatch and store the invalidate event, then reopen with `startAfter` it in
    /// process, so events on a collection re-created under the same name keep flowing.
    #[default]
    Restart,
    /// Dispatch and store the invalidate event, then stop with [`Error::Invalidated`].
    Stop,
}

pub(crate) struct Settings {
    pub(crate) stream_id: String,
    pub(crate) source: Arc<dyn ChangeSource>,
    pub(crate) store: Arc<dyn ResumeStore>,
    pub(crate) policy: CheckpointPolicy,
    pub(crate) invalidate: InvalidatePolicy,
    pub(crate) store_timeout: Duration,
    pub(crate) prefetch: usize,
    pub(crate) stop_on_handler_error: bool,
}

struct Inner {
    settings: Settings,
    cancel: CancellationToken,
    running: AtomicBool,
    errors: broadcast::Sender<Arc<Error>>,
    stats: Mutex<Stats>,
}

/// Watches a collection, database or deployment and hands every change to a handler,
/// never losing one: see `docs/SEMANTICS.md`.
///
/// Cloning gives another handle onto the same processor (to stop it from elsewhere).
#[derive(Clone)]
pub struct DocumentProcessor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DocumentProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.inner.settings;
        f.debug_struct("DocumentProcessor")
            .field("stream", &s.stream_id)
            .field("source", &s.source.describe())
            .field("store", &s.store.describe())
            .field("policy", &s.policy)
            .finish_non_exhaustive()
    }
}

/// Stops a processor from anywhere, including from inside a handler.
#[derive(Clone, Debug)]
pub struct StopHandle(CancellationToken);

impl StopHandle {
    /// Asks the processor to stop: see [`DocumentProcessor::stop`].
    pub fn stop(&self) {
        self.0.cancel();
    }
}

enum Item {
    /// Boxed: an event is large, and items are moved and batched in `Vec`s.
    Event(Box<ChangeEvent>),
    /// An empty round trip that moved the stream's resume token (or had none).
    Idle(Option<ResumeToken>),
    /// An empty round trip with the same token as the last one: time passed, nothing else.
    Tick,
    Gap(HistoryGap),
    Closed,
    Failed(cdc_core::Error),
}

/// What became of one item: carry on (at this instant), or the stream ended.
enum Step {
    Next(Instant),
    End(Outcome),
}

enum Outcome {
    Stopped,
    Invalidated,
    Closed,
}

/// The most events the reader hands to the consumer at once: handing over batches rather
/// than single events spares a task wake-up per event.
const HANDOFF: usize = 256;

/// Polls `fut` once: its output if it is ready now, `None` if it would wait (it stays
/// registered with the waker, and can be awaited afterwards).
async fn ready_now<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *fut).poll(cx) {
        std::task::Poll::Ready(out) => std::task::Poll::Ready(Some(out)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

/// The batch in hand, leaving an empty one of the same capacity in its place.
fn handover(batch: &mut Vec<Item>, handoff: usize) -> Vec<Item> {
    std::mem::replace(batch, Vec::with_capacity(handoff))
}

/// Reads ahead of the handler: the cursor fetches the next batch while the handler works.
/// Events already buffered by the driver are handed over together (up to `handoff`); the
/// batch in hand goes out before the reader waits on the server.
async fn read_ahead(
    mut cursor: Box<dyn ChangeCursor>,
    tx: mpsc::Sender<Vec<Item>>,
    handoff: usize,
) {
    let mut batch = Vec::with_capacity(handoff);
    let mut idle_token: Option<ResumeToken> = None;
    loop {
        if let Some(gap) = cursor.take_gap() {
            batch.push(Item::Gap(gap));
        }
        let next = {
            let mut fut = cursor.next();
            match ready_now(&mut fut).await {
                Some(next) => next,
                None => {
                    if !batch.is_empty() && tx.send(handover(&mut batch, handoff)).await.is_err() {
                        break;
                    }
                    tokio::select! {
                        r = fut => r,
                        () = tx.closed() => break,
                    }
                }
            }
        };
        let (item, last) = match next {
            Ok(Some(e)) => (Item::Event(Box::new(e)), false),
            Ok(None) if cursor.is_closed() => (Item::Closed, true),
            Ok(None) => {
                // An empty round trip: the position matters only when it moved.
                let token = cursor.resume_token();
                if token.is_some() && token == idle_token {
                    (Item::Tick, false)
                } else {
                    idle_token.clone_from(&token);
                    (Item::Idle(token), false)
                }
            }
            Err(e) => (Item::Failed(e), true),
        };
        // Anything but an event goes out at once: the consumer acts on it with no delay.
        let send_now = last || batch.len() + 1 >= handoff || !matches!(item, Item::Event(_));
        batch.push(item);
        if send_now && tx.send(handover(&mut batch, handoff)).await.is_err() {
            break;
        }
        if last {
            break;
        }
    }
    cursor.close().await;
}

impl DocumentProcessor {
    pub(crate) fn from_settings(settings: Settings) -> Self {
        let (errors, _) = broadcast::channel(64);
        Self {
            inner: Arc::new(Inner {
                settings,
                cancel: CancellationToken::new(),
                running: AtomicBool::new(false),
                errors,
                stats: Mutex::new(Stats::default()),
            }),
        }
    }

    /// The builder.
    pub fn builder() -> crate::Builder {
        crate::Builder::default()
    }

    /// The stream id under which the resume point is stored.
    pub fn stream_id(&self) -> &str {
        &self.inner.settings.stream_id
    }

    /// A snapshot of the processor's counters and positions.
    pub fn stats(&self) -> Stats {
        self.stats_mut().clone()
    }

    fn stats_mut(&self) -> MutexGuard<'_, Stats> {
        // Stats are plain counters: a panic while holding the lock cannot break them.
        self.inner
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Receives every error that ended a start (a broadcast: it never blocks the processor,
    /// and nothing happens when nobody listens; a slow receiver skips what it missed).
    pub fn on_start_err(&self) -> broadcast::Receiver<Arc<Error>> {
        self.inner.errors.subscribe()
    }

    /// A handle that stops the processor from elsewhere.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.inner.cancel.clone())
    }

    /// Asks the processor to stop, gracefully: no new event is taken, the handler call in
    /// flight finishes, the final checkpoint is written, the cursor is closed, then
    /// `start` returns `Ok`. Safe before `start`, twice, or from inside a handler. A
    /// processor stops once: build a new one to run again.
    pub fn stop(&self) {
        self.inner.cancel.cancel();
    }

    /// Runs until stopped or failed.
    ///
    /// # Errors
    /// The error that ended the stream: a source, store or handler failure
    /// ([`Error::Cdc`]), [`Error::Invalidated`] under [`InvalidatePolicy::Stop`],
    /// [`Error::AlreadyRunning`].
    pub async fn start(&self, handler: impl Dispatcher + 'static) -> Result<()> {
        self.run_guarded(&handler).await
    }

    /// Runs until stopped, restarting after retryable failures (transient source errors,
    /// store failures, and handler errors unless the builder says to stop on them) with the
    /// given backoff; [`default_backoff`] is exponential with jitter. The backoff starts
    /// over after a run that handled at least one event. Fatal errors end it at once.
    ///
    /// # Errors
    /// The first error not worth retrying, or the last one when the backoff gives up.
    pub async fn start_with_retry<B>(
        &self,
        backoff: B,
        handler: impl Dispatcher + 'static,
    ) -> Result<()>
    where
        B: BackoffBuilder + Clone,
    {
        let mut delays = backoff.clone().build();
        loop {
            let before = self.stats_mut().events;
            let err = match self.run_guarded(&handler).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let handler_error = err.kind() == ErrorKind::Handler;
            let retry =
                err.is_retryable() || (handler_error && !self.inner.settings.stop_on_handler_error);
            if !retry {
                return Err(err);
            }
            if self.inner.cancel.is_cancelled() {
                return Ok(());
            }
            if self.stats_mut().events > before {
                delays = backoff.clone().build();
            }
            let Some(delay) = delays.next() else {
                return Err(err);
            };
            self.stats_mut().restarts += 1;
            tracing::warn!(stream = %self.stream_id(), error = %err, ?delay, "restarting after a failure");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.inner.cancel.cancelled() => return Ok(()),
            }
        }
    }

    async fn run_guarded(&self, handler: &dyn Dispatcher) -> Result<()> {
        if self.inner.running.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadyRunning(self.stream_id().to_owned()));
        }
        let span = tracing::info_span!("cdc", stream = %self.stream_id());
        let result = self.run(handler).instrument(span).await;
        self.inner.running.store(false, Ordering::Release);
        if let Err(e) = &result {
            self.stats_mut().last_error = Some(e.to_string());
            let _ = self.inner.errors.send(Arc::new(clone_error(e)));
        }
        result
    }

    async fn store_call<T>(&self, call: impl Future<Output = cdc_core::Result<T>>) -> Result<T> {
        let s = &self.inner.settings;
        match tokio::time::timeout(s.store_timeout, call).await {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::StoreTimeout {
                stream: s.stream_id.clone(),
                seconds: s.store_timeout.as_secs(),
            }),
        }
    }

    async fn save(&self, cp: &mut Checkpointer, mut point: ResumePoint) -> Result<()> {
        let s = &self.inner.settings;
        point.saved_at = bson::DateTime::now();
        self.store_call(s.store.save(&s.stream_id, &point)).await?;
        cp.confirm(&point, Instant::now());
        let mut stats = self.stats_mut();
        stats.checkpoints += 1;
        stats.last_checkpoint = Some(point.cluster_time);
        stats.checkpoint_lag_events = u64::from(cp.unsaved_events());
        stats.checkpoint_lag_seconds = stats.last_cluster_time.map_or(0, |t| {
            u64::from(t.time.saturating_sub(point.cluster_time.time))
        });
        Ok(())
    }

    /// A first start has no stored point and opens at "now": that position is saved at
    /// once, so a crash before the first checkpoint does not make the next start open at a
    /// later "now" and skip what came in between.
    async fn save_initial_position(
        &self,
        cp: &mut Checkpointer,
        initial: Option<ResumeToken>,
    ) -> Result<()> {
        match initial {
            Some(token) => {
                let time = token.cluster_time_hint().unwrap_or_default();
                self.save(
                    cp,
                    ResumePoint::post_batch(token, time, bson::DateTime::now()),
                )
                .await
            }
            None => {
                tracing::warn!(
                    "the new stream gave no initial resume token; the first checkpoint comes with the first event"
                );
                Ok(())
            }
        }
    }

    async fn flush(&self, cp: &mut Checkpointer) -> Result<()> {
        match cp.flush() {
            Some(point) => self.save(cp, point).await,
            None => Ok(()),
        }
    }

    async fn run(&self, handler: &dyn Dispatcher) -> Result<()> {
        let s = &self.inner.settings;
        if self.inner.cancel.is_cancelled() {
            return Ok(());
        }
        let stored = self.store_call(s.store.load(&s.stream_id)).await?;
        self.stats_mut().last_checkpoint = stored.as_ref().map(|p| p.cluster_time);
        let mut cp = Checkpointer::new(s.policy.clone(), stored.clone(), Instant::now());
        let mut position = StartPosition::after(stored.as_ref());
        loop {
            tracing::info!(source = %s.source.describe(), ?position, "opening the change stream");
            let cursor = tokio::select! {
                c = s.source.open(&position) => c?,
                () = self.inner.cancel.cancelled() => return Ok(()),
            };
            if cp.persisted().is_none() && cp.pending().is_none() {
                let initial = cursor.resume_token();
                self.save_initial_position(&mut cp, initial).await?;
            }
            // About `prefetch` events in flight: handoffs of up to HANDOFF events each.
            let handoff = s.prefetch.clamp(1, HANDOFF);
            let (tx, mut rx) = mpsc::channel((s.prefetch / handoff).max(1));
            let reader = tokio::spawn(read_ahead(cursor, tx, handoff));
            let outcome = self.consume(&mut rx, &mut cp, handler).await;
            drop(rx);
            if tokio::time::timeout(Duration::from_secs(5), reader)
                .await
                .is_err()
            {
                tracing::warn!("the cursor reader did not finish within 5 s");
            }
            match outcome {
                Ok(Outcome::Stopped) => {
                    self.flush(&mut cp).await?;
                    tracing::info!("stopped");
                    return Ok(());
                }
                Ok(Outcome::Invalidated) if s.invalidate == InvalidatePolicy::Stop => {
                    self.flush(&mut cp).await?;
                    return Err(Error::Invalidated(s.stream_id.clone()));
                }
                Ok(Outcome::Invalidated | Outcome::Closed) => {
                    self.flush(&mut cp).await?;
                    cp.reset_outstanding();
                    position = cp.resume_position();
                    self.stats_mut().reopens += 1;
                    tracing::info!(?position, "the stream was closed by the server: reopening");
                }
                Err(e) => {
                    if let Err(flush) = self.flush(&mut cp).await {
                        tracing::warn!(error = %flush, "the final checkpoint after a failure could not be written");
                    }
                    return Err(e);
                }
            }
        }
    }

    async fn consume(
        &self,
        rx: &mut mpsc::Receiver<Vec<Item>>,
        cp: &mut Checkpointer,
        handler: &dyn Dispatcher,
    ) -> Result<Outcome> {
        let mut invalidated = false;
        loop {
            let batch = tokio::select! {
                biased;
                () = self.inner.cancel.cancelled() => return Ok(Outcome::Stopped),
                batch = rx.recv() => batch,
            };
            let Some(batch) = batch else {
                return Err(cdc_core::Error::source(
                    ErrorKind::Transient,
                    "the cursor reader ended unexpectedly",
                )
                .into());
            };
            for item in batch {
                // Events not yet tracked are simply read again after a stop.
                if self.inner.cancel.is_cancelled() {
                    return Ok(Outcome::Stopped);
                }
                let now = match self.step(item, cp, handler, &mut invalidated).await? {
                    Step::Next(now) => now,
                    Step::End(outcome) => return Ok(outcome),
                };
                if let Some(point) = cp.tick(now) {
                    self.save(cp, point).await?;
                }
            }
        }
    }

    /// Acts on one item from the reader.
    async fn step(
        &self,
        item: Item,
        cp: &mut Checkpointer,
        handler: &dyn Dispatcher,
        invalidated: &mut bool,
    ) -> Result<Step> {
        match item {
            Item::Event(event) => {
                if cp.is_blocked() {
                    self.flush(cp).await?;
                }
                // `saved_at` is stamped when the point is saved.
                let seq = cp.track(event.resume_point(bson::DateTime::MIN))?;
                if let Err(source) = handler.dispatch(&event, None).await {
                    return Err(cdc_core::Error::Handler {
                        operation: event.operation_type.clone(),
                        cluster_time: event.cluster_time,
                        source,
                    }
                    .into());
                }
                let now = Instant::now();
                if let Some(point) = cp.ack(seq, now)? {
                    self.save(cp, point).await?;
                }
                self.count(&event, cp);
                *invalidated |= event.operation_type == OperationType::Invalidate;
                return Ok(Step::Next(now));
            }
            Item::Idle(token) => {
                let now = Instant::now();
                let due = match token {
                    Some(t) => cp.idle(t, now, bson::DateTime::now()),
                    None => cp.tick(now),
                };
                if let Some(point) = due {
                    self.save(cp, point).await?;
                }
            }
            // Time passed: the tick after every item covers it.
            Item::Tick => {}
            Item::Gap(gap) => {
                tracing::error!(%gap, "events were lost to oplog rollover (restart-from-now policy)");
                self.stats_mut().last_gap = Some(gap);
            }
            Item::Closed => {
                return Ok(Step::End(if *invalidated {
                    Outcome::Invalidated
                } else {
                    Outcome::Closed
                }));
            }
            Item::Failed(e) => return Err(e.into()),
        }
        Ok(Step::Next(Instant::now()))
    }

    /// Counts a handled event (one lock, no allocation once its type has been seen).
    fn count(&self, event: &ChangeEvent, cp: &Checkpointer) {
        let mut stats = self.stats_mut();
        stats.events += 1;
        let kind = event.operation_type.as_str();
        match stats.events_by_type.get_mut(kind) {
            Some(n) => *n += 1,
            None => {
                stats.events_by_type.insert(kind.to_owned(), 1);
            }
        }
        stats.last_cluster_time = Some(event.cluster_time);
        stats.checkpoint_lag_events = u64::from(cp.unsaved_events());
    }
}

/// Errors are published to many subscribers; the published copy keeps the kind and the
/// message chain.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::AlreadyRunning(s) => Error::AlreadyRunning(s.clone()),
        Error::Invalidated(s) => Error::Invalidated(s.clone()),
        Error::Config(s) => Error::Config(s.clone()),
        Error::StoreTimeout { stream, seconds } => Error::StoreTimeout {
            stream: stream.clone(),
            seconds: *seconds,
        },
        Error::Cdc(inner) => {
            let mut text = inner.to_string();
            let mut source = std::error::Error::source(inner);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            Error::Cdc(cdc_core::Error::source(inner.kind(), text))
        }
    }
}

/// Exponential backoff with jitter: 100 ms doubling to 30 s, retrying forever.
pub fn default_backoff() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(30))
        .without_max_times()
}
