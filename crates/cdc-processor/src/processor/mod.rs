//! The [`DocumentProcessor`] handle and the one place that composes its parts: the run
//! loop (`run`), the reader (`reader`), the lanes (`lanes`), the lease keeper (`lease`),
//! the handler-error policy (`poison`) and the restart loop (`retry`), each handed what it
//! needs. The builder (`builder`) checks the settings and makes the handle.

mod builder;

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU32, Ordering},
};

use crate::stop::Stop;
use backon::BackoffBuilder;
use cdc_core::{DeadLetter, DeadLetterStore, Dispatcher, OplogHeadroom};
use tokio::sync::broadcast;
use tracing::Instrument;

pub use builder::{
    Builder, DEFAULT_MAX_BUFFERED_BYTES, DEFAULT_STOP_TIMEOUT, Leased, Source, Storage, Watch,
};

use crate::{
    BuildError, Error, IntoHandler, Result,
    context::HandlerContext,
    dead_letters::{ReplayReport, replay},
    handling::Handler,
    lease::{Held, LeaseKeeper},
    poison::Poison,
    reader::Requests,
    retry::restart_loop,
    run::{RunLoop, Shared},
    settings::Settings,
    stats::Stats,
};

/// The processor's state, private to this module: its settings, what its runs share,
/// whether one runs now, and where start errors are published.
struct Inner {
    settings: Settings,
    shared: Shared,
    running: AtomicBool,
    errors: broadcast::Sender<Arc<Error>>,
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
pub struct StopHandle(Stop);

impl StopHandle {
    /// Asks the processor to stop: see [`DocumentProcessor::stop`].
    pub fn stop(&self) {
        self.0.cancel();
    }
}

impl DocumentProcessor {
    fn from_settings(settings: Settings) -> Self {
        let (errors, _) = broadcast::channel(64);
        let held = Arc::new(Held::default());
        let poison = Arc::new(Poison::new(
            settings.on_handler_error.clone(),
            settings.dead_letters.clone(),
            settings.stream_id.clone(),
            settings.store_timeout,
            settings
                .lease
                .as_ref()
                .map(|l| (Arc::clone(&l.store), Arc::clone(&held))),
        ));
        let shared = Shared {
            cancel: Stop::default(),
            stats: Arc::default(),
            attempts: AtomicU32::new(0),
            poison,
            requests: Arc::new(Requests::new()),
            held,
            progress: Arc::default(),
        };
        Self {
            inner: Arc::new(Inner {
                settings,
                shared,
                running: AtomicBool::new(false),
                errors,
            }),
        }
    }

    /// The builder.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The stream id under which the resume point is stored.
    pub fn stream_id(&self) -> &str {
        &self.inner.settings.stream_id
    }

    /// A snapshot of the processor's counters and positions.
    pub fn stats(&self) -> Stats {
        let mut stats = self.inner.shared.stats.lock().clone();
        stats.snapshot = self.inner.settings.source.snapshot_progress();
        let progress = &self.inner.shared.progress;
        stats.read_events = progress.read.load(Ordering::Relaxed);
        stats.source_time = progress.source_time();
        stats.stream_open = progress.open.load(Ordering::Relaxed);
        stats
    }

    /// The oplog's window and the stored point's headroom in it: how long the point a
    /// restart resumes from has before it falls off the oplog (see
    /// [`cdc_core::OplogWindow::headroom_seconds`]). The point is the newest this
    /// processor saved, or the store's when it saved none yet. Asks the deployment each
    /// call (two reads of `local.oplog.rs`); a user who may not read it gets
    /// [`cdc_core::OplogView::Unreadable`] with the reason.
    ///
    /// # Errors
    /// A source failure worth asking again; the store's, or [`Error::StoreTimeout`], when
    /// the point had to be loaded.
    pub async fn oplog_headroom(&self) -> Result<OplogHeadroom> {
        let s = &self.inner.settings;
        let saved = self.inner.shared.stats.lock().last_checkpoint;
        let point = match saved {
            Some(t) => Some(t),
            None => match tokio::time::timeout(s.store_timeout, s.store.load(&s.stream_id)).await {
                Ok(loaded) => loaded?.map(|p| p.cluster_time),
                Err(_) => {
                    return Err(Error::StoreTimeout {
                        stream: s.stream_id.clone(),
                        timeout: s.store_timeout,
                    });
                }
            },
        };
        let view = s.source.oplog().await?;
        Ok(OplogHeadroom { view, point })
    }

    /// Receives every error that ended a start (a broadcast: it never blocks the processor,
    /// and nothing happens when nobody listens; a slow receiver skips what it missed). Each
    /// is the error itself, with its kind and typed cause (a driver error's server code
    /// and labels through `cdc_core::Error::cause`), not a flattened copy.
    pub fn on_start_err(&self) -> broadcast::Receiver<Arc<Error>> {
        self.inner.errors.subscribe()
    }

    /// A handle that stops the processor from elsewhere.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.inner.shared.cancel.clone())
    }

    /// A handle that stops the processor from elsewhere.
    pub fn stop(&self) {
        self.inner.shared.cancel.cancel();
    }

    /// Reads documents again while the stream goes on (an incremental snapshot): the
    /// documents `request` names are handed over as `snapshot` events, interleaved with
    /// the stream's changes under the same promises as an initial snapshot (each document
    /// at its read time, so no key's versions go backwards; no change missed), and a
    /// restart continues the reading where it stopped. Returns once the reader has taken
    /// the request (within one round trip of the stream); `Stats::snapshot` then shows its
    /// progress.
    ///
    /// # Errors
    /// [`Error::NotRunning`] when the processor is not running (or stops before taking the
    /// request); a refusal ([`cdc_core::Error::InvalidArgument`]) while another snapshot
    /// is being read, for a collection the source does not watch, for a source that cannot
    /// read documents, or a filter the server refuses.
    pub async fn request_snapshot(&self, request: cdc_core::SnapshotRequest) -> Result<()> {
        if !self.inner.running.load(Ordering::Acquire) {
            return Err(Error::NotRunning(self.stream_id().to_owned()));
        }
        let answer = self.inner.shared.requests.send(request);
        tokio::select! {
            answer = answer => match answer {
                Ok(answer) => answer.map_err(Error::Cdc),
                Err(_) => Err(Error::NotRunning(self.stream_id().to_owned())),
            },
            () = self.inner.shared.cancel.cancelled() => Err(Error::NotRunning(self.stream_id().to_owned())),
        }
    }

    /// Runs until stopped or failed, handing events to `handler`: a per-event
    /// [`Dispatcher`](cdc_core::Dispatcher), or a batch handler in
    /// [`crate::Batches`] (batches per lane with [`crate::Builder::concurrency`],
    /// bounded by its limits; a batch's success acknowledges all its events).
    ///
    /// # Errors
    /// The error that ended the stream: a source, store or handler failure
    /// ([`Error::Cdc`]), [`Error::Invalidated`] under [`crate::InvalidatePolicy::Stop`],
    /// [`Error::AlreadyRunning`], [`Error::Stopped`] when the processor was already
    /// stopped, [`Error::Build`] for a batch limit out of range.
    pub async fn start(&self, handler: impl IntoHandler) -> Result<()> {
        let handler = self.runnable(handler)?;
        self.run_guarded(&handler).await
    }

    /// [`DocumentProcessor::start`] (with either kind of handler) until stopped,
    /// restarting after retryable failures (transient source errors,
    /// store failures; handler errors are retried in process under
    /// [`crate::Builder::on_handler_error`], never here) with the
    /// given backoff; [`crate::default_backoff`] is exponential with jitter. The backoff starts
    /// over after a run that handled at least one event. Fatal errors end it at once;
    /// [`cdc_core::ErrorKind::Persistent`] ones (a store only a person can mend) after
    /// [`cdc_core::PERSISTENT_TRIES`] failed runs in a row.
    ///
    /// A `stop()` that lands while it waits to retry ends it with `Ok` (the stop is
    /// graceful); the failure that caused the wait stays visible in
    /// [`crate::Stats::last_error`] and was published on
    /// [`DocumentProcessor::on_start_err`] when it happened.
    ///
    /// # Errors
    /// The first error not worth retrying, or the last one when the backoff gives up;
    /// [`crate::Error::Stopped`] when the processor was already stopped.
    pub async fn start_with_retry<B>(&self, backoff: B, handler: impl IntoHandler) -> Result<()>
    where
        B: BackoffBuilder + Clone,
    {
        let handler = self.runnable(handler)?;
        let shared = &self.inner.shared;
        restart_loop(
            backoff,
            self.stream_id(),
            &shared.cancel,
            &shared.stats,
            || self.run_guarded(&handler),
        )
        .await
    }

    /// Up to `limit` dead letters of this processor's stream, oldest first.
    ///
    /// # Errors
    /// [`Error::Build`] without a dead-letter store; the store's error when it fails.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let store = self.letter_store()?;
        Ok(store.list(self.stream_id(), limit).await?)
    }

    /// How many dead letters this processor's stream has.
    ///
    /// # Errors
    /// As [`DocumentProcessor::dead_letters`].
    pub async fn dead_letter_count(&self) -> Result<u64> {
        let store = self.letter_store()?;
        Ok(store.count(self.stream_id()).await?)
    }

    /// Deletes the dead letter `id` (its event is then given up for good); `false` when
    /// there was none. A parked key is released once it has no dead letters left.
    ///
    /// # Errors
    /// As [`DocumentProcessor::dead_letters`].
    pub async fn delete_dead_letter(&self, id: &str) -> Result<bool> {
        let store = self.letter_store()?;
        let removed = store.remove(self.stream_id(), id).await?;
        self.inner.shared.poison.load_parked().await?;
        Ok(removed)
    }

    /// Hands every dead letter of this stream, oldest first, to `handler` (under the
    /// handler-error policy's retries). A letter the handler succeeds on is removed; one
    /// it fails on again is kept, and so are the later letters of the same document key
    /// (without a call), so a key's order holds. Parked keys with no letters left are
    /// released. Run it while the processor is not running (it refuses otherwise); with
    /// several instances, while none consumes the stream.
    ///
    /// # Errors
    /// [`Error::AlreadyRunning`] while `start` runs; [`Error::Stopped`] after `stop()`;
    /// [`Error::Build`] without a dead-letter store; a store failure (what was replayed
    /// before it stays replayed).
    pub async fn replay_dead_letters(&self, handler: impl Dispatcher) -> Result<ReplayReport> {
        let store = self.letter_store()?;
        if self.inner.running.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadyRunning(self.stream_id().to_owned()));
        }
        let shared = &self.inner.shared;
        // After the processor stopped, a replay still runs (with a stop signal of its own).
        let cancel = if shared.cancel.is_cancelled() {
            Stop::default()
        } else {
            shared.cancel.clone()
        };
        let ctx = HandlerContext::new(
            None,
            shared.attempts.load(Ordering::Relaxed),
            cancel,
            self.inner.settings.stop_timeout,
        );
        let result = replay(store, &shared.poison, self.stream_id(), &ctx, &handler).await;
        self.inner.running.store(false, Ordering::Release);
        let reloaded = shared.poison.load_parked().await;
        let report = result?;
        reloaded?;
        Ok(report)
    }

    fn letter_store(&self) -> Result<&dyn DeadLetterStore> {
        self.inner
            .settings
            .dead_letters
            .as_deref()
            .ok_or(Error::Build(BuildError::Missing {
                setting: "store",
                hint: "there is no dead-letter store: give one with Storage::new(points).dead_letters(…), a leased store, or &Stores",
            }))
    }

    /// The handler `start` and `start_with_retry` run: [`Error::Stopped`] once `stop()`
    /// was called (a processor runs once), [`Error::Build`] for a limit out of range.
    fn runnable(&self, handler: impl IntoHandler) -> Result<Handler> {
        if self.inner.shared.cancel.is_cancelled() {
            return Err(Error::Stopped(self.stream_id().to_owned()));
        }
        Ok(handler.into_handler()?.0)
    }

    /// One run (holding the lease first, with a leased store), guarded against a second
    /// at once; its error is recorded and published.
    async fn run_guarded(&self, handler: &Handler) -> Result<()> {
        if self.inner.running.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadyRunning(self.stream_id().to_owned()));
        }
        let span = tracing::info_span!("cdc", stream = %self.stream_id());
        let shared = &self.inner.shared;
        shared.attempts.fetch_add(1, Ordering::Relaxed);
        let result = self.run_once(handler).instrument(span).await;
        self.inner.running.store(false, Ordering::Release);
        shared
            .requests
            .refuse_all(&cdc_core::Error::InvalidArgument {
                name: "snapshot request",
                reason: format!(
                    "the processor for stream `{}` stopped before taking it",
                    self.stream_id()
                ),
            });
        if let Err(e) = &result {
            shared.stats.lock().last_error = Some(e.to_string());
            let _ = self.inner.errors.send(Arc::new(e.clone()));
        }
        result
    }

    /// Composes one run: the run loop, under the lease keeper when the store is leased
    /// (standing by until the lease is acquired, dropping the run at once when it is
    /// lost, releasing it after).
    async fn run_once(&self, handler: &Handler) -> Result<()> {
        let (settings, shared) = (&self.inner.settings, &self.inner.shared);
        let run = RunLoop { settings, shared };
        let Some(lease) = &settings.lease else {
            return run.run(handler).await;
        };
        let keeper = LeaseKeeper::new(
            lease.clone(),
            settings.stream_id.clone(),
            Arc::clone(&shared.held),
            Arc::clone(&shared.stats),
        );
        let Some((held, asked)) = keeper.acquire(&shared.cancel).await? else {
            return Ok(());
        };
        let result = tokio::select! {
            r = run.run(handler) => r,
            lost = keeper.keep(held, asked) => {
                tracing::warn!(error = %lost, "lease lost: handling stops at once; standing by");
                Err(lost.into())
            }
        };
        keeper.release(&result).await;
        result
    }
}
