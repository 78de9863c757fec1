//! The [`DocumentProcessor`] handle: its settings, shared state and public API. The work
//! is done in `run` (the run loop), `reader` (reading ahead) and `retry` (the retry loop).

use std::{
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use cdc_core::{ChangeSource, CheckpointPolicy, ResumeStore};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Error, IntoHandler, Result, Stats, lanes::Handler};

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
    /// The handler saves points itself (see `Builder::handler_checkpoints`).
    pub(crate) handler_checkpoints: bool,
    pub(crate) source: Arc<dyn ChangeSource>,
    pub(crate) store: Arc<dyn ResumeStore>,
    pub(crate) policy: CheckpointPolicy,
    pub(crate) invalidate: InvalidatePolicy,
    pub(crate) store_timeout: Duration,
    pub(crate) prefetch: usize,
    pub(crate) on_handler_error: crate::HandlerErrorPolicy,
    pub(crate) dead_letters: Option<Arc<dyn cdc_core::DeadLetterStore>>,
    /// Lanes (1: handled one at a time, in the run loop).
    pub(crate) concurrency: usize,
    /// Keep the events of one transaction together (`None`: when `concurrency > 1`).
    pub(crate) keep_transactions: Option<bool>,
    /// The byte budget of events read and not yet handled.
    pub(crate) max_buffered_bytes: usize,
    /// How long handlers in flight may take after `stop()` before they are cancelled.
    pub(crate) stop_timeout: Option<std::time::Duration>,
    /// Read the documents anew when the stream's history is lost (snapshot when needed).
    pub(crate) resnapshot: bool,
    /// Where to start when the store holds no point (`None`: now).
    pub(crate) initial_position: Option<cdc_core::StartPosition>,
    /// The lease to hold while handling, if any.
    pub(crate) lease: Option<crate::lease::LeaseSettings>,
}

pub(crate) struct Inner {
    pub(crate) settings: Settings,
    pub(crate) cancel: CancellationToken,
    pub(crate) running: AtomicBool,
    pub(crate) errors: broadcast::Sender<Arc<Error>>,
    pub(crate) stats: Mutex<Stats>,
    /// Runs started (the attempt number handlers see).
    pub(crate) attempts: std::sync::atomic::AtomicU32,
    /// The handler-error policy with its dead-letter store and parked keys.
    pub(crate) poison: Arc<crate::poison::Poison>,
    /// Snapshots requested while streaming, waiting for the reader.
    pub(crate) requests: Arc<crate::reader::Requests>,
    /// The lease held now (with a leased store).
    pub(crate) held: Arc<crate::lease::Held>,
    /// What the cursor reader saw.
    pub(crate) progress: Arc<crate::reader::Progress>,
}

/// Watches a collection, database or deployment and hands every change to a handler,
/// never losing one: see `docs/SEMANTICS.md`.
///
/// Cloning gives another handle onto the same processor (to stop it from elsewhere).
#[derive(Clone)]
pub struct DocumentProcessor {
    pub(crate) inner: Arc<Inner>,
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

impl DocumentProcessor {
    pub(crate) fn from_settings(settings: Settings) -> Self {
        let (errors, _) = broadcast::channel(64);
        let held = Arc::new(crate::lease::Held::default());
        let poison = Arc::new(crate::poison::Poison::new(
            settings.on_handler_error.clone(),
            settings.dead_letters.clone(),
            settings.stream_id.clone(),
            settings.store_timeout,
            settings
                .lease
                .as_ref()
                .map(|l| (Arc::clone(&l.store), Arc::clone(&held))),
        ));
        Self {
            inner: Arc::new(Inner {
                settings,
                cancel: CancellationToken::new(),
                running: AtomicBool::new(false),
                errors,
                stats: Mutex::new(Stats::default()),
                attempts: std::sync::atomic::AtomicU32::new(0),
                poison,
                requests: Arc::new(crate::reader::Requests::new()),
                held,
                progress: Arc::default(),
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
        let mut stats = self.stats_mut().clone();
        stats.snapshot = self.inner.settings.source.snapshot_progress();
        let progress = &self.inner.progress;
        stats.read_events = progress.read.load(std::sync::atomic::Ordering::Relaxed);
        stats.source_time = progress.source_time();
        stats.stream_open = progress.open.load(std::sync::atomic::Ordering::Relaxed);
        stats
    }

    pub(crate) fn stats_mut(&self) -> MutexGuard<'_, Stats> {
        // Stats are plain counters: a panic while holding the lock cannot break them.
        self.inner
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
        StopHandle(self.inner.cancel.clone())
    }

    /// Asks the processor to stop, gracefully: no new event is taken, the handler calls in
    /// flight finish (or, after [`crate::Builder::stop_timeout`], are cancelled and their
    /// events not acknowledged, so they come again), the final checkpoint is written, the
    /// cursor is closed, then `start` returns `Ok`. Safe before `start`, twice, or from inside a handler. A
    /// processor stops once: build a new one to run again.
    pub fn stop(&self) {
        self.inner.cancel.cancel();
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
        let answer = self.inner.requests.send(request);
        tokio::select! {
            answer = answer => match answer {
                Ok(answer) => answer.map_err(Error::Cdc),
                Err(_) => Err(Error::NotRunning(self.stream_id().to_owned())),
            },
            () = self.inner.cancel.cancelled() => Err(Error::NotRunning(self.stream_id().to_owned())),
        }
    }

    /// Runs until stopped or failed, handing events to `handler`: a per-event
    /// [`Dispatcher`](cdc_core::Dispatcher), or a batch handler in
    /// [`crate::Batches`] (batches per lane with [`crate::Builder::concurrency`],
    /// bounded by its limits; a batch's success acknowledges all its events).
    ///
    /// # Errors
    /// The error that ended the stream: a source, store or handler failure
    /// ([`Error::Cdc`]), [`Error::Invalidated`] under [`InvalidatePolicy::Stop`],
    /// [`Error::AlreadyRunning`], [`Error::Stopped`] when the processor was already
    /// stopped, [`Error::Build`] for a batch limit out of range.
    pub async fn start(&self, handler: impl IntoHandler) -> Result<()> {
        self.not_stopped()?;
        let handler = handler.into_handler().map_err(Error::Build)?;
        self.run_guarded(&handler.0).await
    }

    /// [`Error::Stopped`] once `stop()` was called: a processor runs once.
    pub(crate) fn not_stopped(&self) -> Result<()> {
        if self.inner.cancel.is_cancelled() {
            return Err(Error::Stopped(self.stream_id().to_owned()));
        }
        Ok(())
    }

    pub(crate) async fn run_guarded(&self, handler: &Handler) -> Result<()> {
        if self.inner.running.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadyRunning(self.stream_id().to_owned()));
        }
        let span = tracing::info_span!("cdc", stream = %self.stream_id());
        self.inner.attempts.fetch_add(1, Ordering::Relaxed);
        let result = match &self.inner.settings.lease {
            Some(lease) => self.run_leased(lease, handler).instrument(span).await,
            None => self.run(handler).instrument(span).await,
        };
        self.inner.running.store(false, Ordering::Release);
        self.inner
            .requests
            .refuse_all(&cdc_core::Error::InvalidArgument {
                name: "snapshot request",
                reason: format!(
                    "the processor for stream `{}` stopped before taking it",
                    self.stream_id()
                ),
            });
        if let Err(e) = &result {
            self.stats_mut().last_error = Some(e.to_string());
            let _ = self.inner.errors.send(Arc::new(e.clone()));
        }
        result
    }
}
