//! The [`Builder`] of a [`DocumentProcessor`].

use std::{sync::Arc, time::Duration};

use cdc_core::{ChangeSource, CheckpointPolicy, ResumeStore, StartPosition, validate_stream_id};
use cdc_mongo::{
    BeforeChange, FullDocument, HistoryLostPolicy, MongoSource, PreImagePolicy, Scope,
    SourceOptions,
};
use mongodb_client::Client;

use crate::{
    DocumentProcessor, Error, InvalidatePolicy, Result, context::BatchLimits, processor::Settings,
};

use cdc_mongo::mongodb as mongodb_client;

/// The default of [`Builder::stop_timeout`]: 25 s.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(25);

/// The default of [`Builder::max_buffered_bytes`]: 64 MiB.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 64 * 1024 * 1024;

/// The processor's change-stream options unless told otherwise: post-images by
/// `updateLookup`, pre-images when available, batches of 1,000 events, the default
/// operation types.
pub fn default_source_options() -> SourceOptions {
    SourceOptions::default()
        .full_document(FullDocument::UpdateLookup)
        .before_change(BeforeChange::WhenAvailable)
        .batch_size(1000)
}

/// Configures a [`DocumentProcessor`].
///
/// Defaults: post-images by `updateLookup`, pre-images when available, batches of 1,000
/// events (so a burst does not make the driver buffer 16 MB batches), the batched
/// checkpoint policy (100 events or 1 s; idle tokens once a minute), restart after
/// invalidate, fail on history loss and on a missing required pre-image, a 10 s store
/// timeout, 1024 events read ahead, retry after handler errors.
pub struct Builder {
    client: Option<Client>,
    scope: Option<Scope>,
    source: Option<Arc<dyn ChangeSource>>,
    options: SourceOptions,
    store: Option<Arc<dyn ResumeStore>>,
    lease: Option<(Arc<dyn cdc_core::LeaseStore>, Duration)>,
    /// The leased store as a dead-letter store: letters are fenced there.
    leased_letters: Option<Arc<dyn cdc_core::DeadLetterStore>>,
    owner: Option<String>,
    stream_id: Option<String>,
    suffix: String,
    policy: CheckpointPolicy,
    invalidate: InvalidatePolicy,
    store_timeout: Duration,
    prefetch: usize,
    on_handler_error: crate::HandlerErrorPolicy,
    dead_letters: Option<Arc<dyn cdc_core::DeadLetterStore>>,
    concurrency: usize,
    keep_transactions: Option<bool>,
    handler_checkpoints: bool,
    max_buffered_bytes: usize,
    batch: BatchLimits,
    stop_timeout: Option<Duration>,
    initial_position: Option<StartPosition>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("scope", &self.scope)
            .field("stream_id", &self.stream_id)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            client: None,
            scope: None,
            source: None,
            options: default_source_options(),
            store: None,
            lease: None,
            leased_letters: None,
            owner: None,
            stream_id: None,
            suffix: String::new(),
            policy: CheckpointPolicy::default(),
            invalidate: InvalidatePolicy::default(),
            store_timeout: Duration::from_secs(10),
            prefetch: 1024,
            on_handler_error: crate::HandlerErrorPolicy::default(),
            dead_letters: None,
            concurrency: 1,
            keep_transactions: None,
            handler_checkpoints: false,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            batch: BatchLimits::default(),
            stop_timeout: Some(DEFAULT_STOP_TIMEOUT),
            initial_position: None,
        }
    }
}

impl Builder {
    /// The client to watch through (see `cdc_mongo::connect`).
    #[must_use]
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Watch one collection.
    #[must_use]
    pub fn collection(mut self, db: impl Into<String>, coll: impl Into<String>) -> Self {
        self.scope = Some(Scope::collection(db, coll));
        self
    }

    /// Watch every collection of a database.
    #[must_use]
    pub fn database(mut self, db: impl Into<String>) -> Self {
        self.scope = Some(Scope::database(db));
        self
    }

    /// Watch the whole deployment.
    #[must_use]
    pub fn deployment(mut self) -> Self {
        self.scope = Some(Scope::Deployment);
        self
    }

    /// Use any change source instead of a client and scope.
    #[must_use]
    pub fn source(mut self, source: Arc<dyn ChangeSource>) -> Self {
        self.source = Some(source);
        self
    }

    /// All source options at once (document modes, operation filter, pipeline, …).
    #[must_use]
    pub fn source_options(mut self, options: SourceOptions) -> Self {
        self.options = options;
        self
    }

    /// The `fullDocument` mode.
    #[must_use]
    pub fn full_document(mut self, mode: FullDocument) -> Self {
        self.options = self.options.full_document(mode);
        self
    }

    /// The `fullDocumentBeforeChange` mode.
    #[must_use]
    pub fn before_change(mut self, mode: BeforeChange) -> Self {
        self.options = self.options.before_change(mode);
        self
    }

    /// What to do when a required pre-image is missing.
    #[must_use]
    pub fn pre_image_policy(mut self, policy: PreImagePolicy) -> Self {
        self.options = self.options.pre_image_policy(policy);
        self
    }

    /// What to do when the stored position has aged out of the oplog.
    #[must_use]
    pub fn history_lost_policy(mut self, policy: HistoryLostPolicy) -> Self {
        self.options = self.options.history_lost_policy(policy);
        self
    }

    /// Where resume points live.
    #[must_use]
    pub fn store(mut self, store: Arc<dyn ResumeStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Keeps the point in `store` and handles the stream only while holding its lease
    /// there (TTL `ttl`): one active instance per stream id, the others standing by. Every
    /// save carries the lease's fencing token, so an instance that lost the lease (paused
    /// past its TTL) cannot move the point; it stops handling at once and stands by again
    /// under `start_with_retry`. `stop()` releases the lease. See `docs/SEMANTICS.md`.
    #[must_use]
    pub fn leased_store<S>(mut self, store: Arc<S>, ttl: Duration) -> Self
    where
        S: ResumeStore + cdc_core::LeaseStore + cdc_core::DeadLetterStore + 'static,
    {
        self.store = Some(store.clone());
        self.leased_letters = Some(store.clone());
        self.lease = Some((store, ttl));
        self
    }

    /// [`Builder::leased_store`] with a store opened by URL ([`crate::stores::open`]):
    /// points, dead letters and leases of its one backend.
    #[must_use]
    pub fn leased_stores(mut self, stores: &crate::stores::Stores, ttl: Duration) -> Self {
        self.store = Some(Arc::clone(&stores.points));
        self.leased_letters = Some(Arc::clone(&stores.dead_letters));
        self.lease = Some((Arc::clone(&stores.leases), ttl));
        self
    }

    /// The owner id this instance holds leases under (default: host, process id and
    /// start time, unique per incarnation). Two instances must never share one.
    #[must_use]
    pub fn owner(mut self, id: impl Into<String>) -> Self {
        self.owner = Some(id.into());
        self
    }

    /// The stream id the point is stored under (default: the watched namespace, like the
    /// Go package's collection name, plus the resume suffix).
    #[must_use]
    pub fn stream_id(mut self, id: impl Into<String>) -> Self {
        self.stream_id = Some(id.into());
        self
    }

    /// A suffix for the default stream id (the Go package's `resumeSuffix`).
    #[must_use]
    pub fn resume_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.suffix = suffix.into();
        self
    }

    /// When to persist resume points.
    #[must_use]
    pub fn checkpoint(mut self, policy: CheckpointPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// What to do after an invalidate.
    #[must_use]
    pub fn invalidate_policy(mut self, policy: InvalidatePolicy) -> Self {
        self.invalidate = policy;
        self
    }

    /// How long a store call may take before it counts as failed (and is retried).
    #[must_use]
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout;
        self
    }

    /// How many events are read ahead while the handler works (at least 1; default 1024).
    /// They are handed to the handler's loop in batches of up to 256 (fewer when the
    /// driver has fewer buffered): at most `prefetch` events queued, plus the batch being
    /// filled and the one being handled.
    #[must_use]
    pub fn prefetch(mut self, events: usize) -> Self {
        self.prefetch = events.max(1);
        self
    }

    /// Reads the documents that already exist before streaming (default: never). With
    /// [`cdc_mongo::SnapshotMode::Initial`], a stream whose store holds no point first
    /// delivers every document of the collection as a `snapshot` event, then the changes
    /// made since the snapshot began, with no gap (the algorithm and its limits:
    /// `docs/SEMANTICS.md`). An explicit [`Builder::start_position`] skips the snapshot.
    #[must_use]
    pub fn snapshot(mut self, mode: cdc_mongo::SnapshotMode) -> Self {
        self.options = self.options.snapshot(mode);
        self
    }

    /// Reads a snapshot in chunks of `chunk_docs` documents, `parallelism` chunks at once
    /// (default 1 and 1,000: chunks of 1,000 one after the other; with more readers,
    /// ranges from `splitVector` of at least `chunk_docs`, at most 16 per reader).
    #[must_use]
    pub fn snapshot_parallelism(mut self, parallelism: usize, chunk_docs: usize) -> Self {
        self.options = self.options.snapshot_parallelism(parallelism, chunk_docs);
        self
    }

    /// What happens when the handler fails (or panics) on an event: retried in process,
    /// then stop (the default: 3 retries from 100 ms, then stop), skip or dead-letter. See
    /// [`crate::HandlerErrorPolicy`] and `docs/SEMANTICS.md`.
    #[must_use]
    pub fn on_handler_error(mut self, policy: crate::HandlerErrorPolicy) -> Self {
        self.on_handler_error = policy;
        self
    }

    /// Where dead letters are recorded (every `cdc-resume` store is one; usually the same
    /// store as the resume points). Needed by [`crate::HandlerErrorPolicy::dead_letter`],
    /// and by the dead-letter API ([`DocumentProcessor::dead_letters`] and the rest).
    #[must_use]
    pub fn dead_letters(mut self, store: Arc<dyn cdc_core::DeadLetterStore>) -> Self {
        self.dead_letters = Some(store);
        self
    }

    /// Per-key lanes (default 1: one event at a time, as the Go package). With `n > 1`,
    /// events are routed by a stable hash of their document key to `n` lanes: each key's
    /// events are handled in stream order, different keys concurrently. Events without a
    /// document key (invalidate, drop, rename, DDL) are barriers: every lane drains, the
    /// event is handled alone, then lanes resume. The stored point is the low watermark of
    /// what is handled, so a crash never skips an event a lane has not finished. The
    /// checkpoint policy's `max_events` also bounds the events in flight; it is raised to
    /// `n` (one per lane) when smaller, and so is the bound of repeats after a crash.
    #[must_use]
    pub fn concurrency(mut self, lanes: usize) -> Self {
        self.concurrency = lanes.max(1);
        self
    }

    /// Whether the events of one multi-document transaction (same `lsid` and
    /// `txnNumber`) are handled as one unit, in order, on one lane (or alone when their
    /// keys span lanes), with no checkpoint between them, so that after a crash a
    /// transaction is delivered again entirely or not at all. Default: on when
    /// `concurrency > 1` or with a batch handler, off for the sequential per-event handler.
    /// Handlers see a transaction's boundaries in [`crate::HandlerContext::transaction`]
    /// or [`crate::Batch::units`].
    #[must_use]
    pub fn keep_transactions(mut self, on: bool) -> Self {
        self.keep_transactions = Some(on);
        self
    }

    /// Says that the handler saves points of this stream itself, in its own transactions
    /// with its effects (`cdc_sink::PostgresSink::checkpoint_with`). A save of the
    /// processor's then finding the store already past it, at an event this run handed
    /// out, is the handler's doing and is accepted; otherwise (off, the default) it is a
    /// `Regression` error, the sign of a second instance on the stream.
    #[must_use]
    pub fn handler_checkpoints(mut self, on: bool) -> Self {
        self.handler_checkpoints = on;
        self
    }

    /// The most raw bytes of events read from the stream and not yet handled (default
    /// 64 MiB), on top of the event-count bound of [`Builder::prefetch`]. The bound covers
    /// the driver's buffered server batch (up to 16 MiB) too: the reader stops pulling
    /// from the cursor while what it holds is over the bound less one such batch (but at
    /// least half the bound). A single event larger than that is still delivered, alone.
    ///
    /// The process's resident memory is about this bound plus its baseline (~14 MiB) and
    /// the allocator's overhead. With large documents glibc's malloc keeps freed buffers
    /// in per-thread arenas (measured with 1 MiB documents and a 64 MiB bound: about
    /// 150 MiB of RSS); with `MALLOC_MMAP_THRESHOLD_=131072 MALLOC_ARENA_MAX=2` in the
    /// environment (what the `cdc` program sets for itself), or jemalloc or mimalloc, it
    /// stays close to the bound (README, benchmark row 12d).
    #[must_use]
    pub fn max_buffered_bytes(mut self, bytes: usize) -> Self {
        self.max_buffered_bytes = bytes.max(1);
        self
    }

    /// For batch handlers: the most events in one batch (default 500; a transaction
    /// larger than this is handed over alone, whole).
    #[must_use]
    pub fn max_batch_events(mut self, events: usize) -> Self {
        self.batch.max_events = events.max(1);
        self
    }

    /// For batch handlers: the most raw bytes in one batch (default 8 MiB; a single unit
    /// larger than this is handed over alone).
    #[must_use]
    pub fn max_batch_bytes(mut self, bytes: usize) -> Self {
        self.batch.max_bytes = bytes.max(1);
        self
    }

    /// For batch handlers: how long a lane waits for more events once it holds one
    /// (default 10 ms; zero hands over what is queued at once).
    #[must_use]
    pub fn max_batch_wait(mut self, wait: Duration) -> Self {
        self.batch.max_wait = wait;
        self
    }

    /// How long handler calls in flight may run after [`DocumentProcessor::stop`] (default
    /// 25 s, within the usual 30 s between SIGTERM and SIGKILL): after it they are
    /// cancelled (their futures dropped), their events are not acknowledged and come
    /// again, and the final checkpoint is written, so `start` returns within this plus the
    /// store timeout. `None` waits for them however long they take.
    #[must_use]
    pub fn stop_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// Where to start when the store holds no point for the stream (the Go package's
    /// `Start(resumePoint)`): after a resume token, or at an operation time (inclusive).
    /// Once a point is stored it wins, so a restart continues where processing stopped.
    /// Default: now.
    #[must_use]
    pub fn start_position(mut self, position: StartPosition) -> Self {
        self.initial_position = Some(position);
        self
    }

    /// Builds the processor.
    ///
    /// # Errors
    /// [`Error::Config`] when there is no store, no source (a client and a scope), or the
    /// stream id is invalid.
    pub fn build(self) -> Result<DocumentProcessor> {
        let store = self
            .store
            .ok_or_else(|| Error::Config("no resume store: call .store(…)".into()))?;
        // With a leased store, dead letters go to that store, fenced like the points.
        let dead_letters = match (self.leased_letters, self.dead_letters) {
            (Some(leased), Some(given))
                if !std::ptr::addr_eq(Arc::as_ptr(&leased), Arc::as_ptr(&given)) =>
            {
                return Err(Error::Config(
                    "with a leased store, dead letters are recorded in that store (fenced by the lease): leave .dead_letters(…) out or give it the same store".into(),
                ));
            }
            (Some(leased), _) => Some(leased),
            (None, given) => given,
        };
        if self.on_handler_error.then() == crate::AfterRetries::DeadLetter && dead_letters.is_none()
        {
            return Err(Error::Config(
                "the handler-error policy records dead letters but there is no dead-letter store: call .dead_letters(…)".into(),
            ));
        }
        let resnapshot = self.options.snapshot == cdc_mongo::SnapshotMode::WhenNeeded;
        let lease = match self.lease {
            Some((_, ttl)) if ttl < Duration::from_millis(30) => {
                return Err(Error::Config(format!(
                    "a lease TTL of {ttl:?} is too short: renewals come every third of it"
                )));
            }
            Some((store, ttl)) => Some(crate::lease::LeaseSettings {
                store,
                ttl,
                owner: self.owner.unwrap_or_else(crate::lease::default_owner),
            }),
            None => None,
        };
        let (source, default_id): (Arc<dyn ChangeSource>, String) =
            match (self.source, self.client, self.scope) {
                (Some(source), _, _) => {
                    let id = source.describe();
                    (source, id)
                }
                (None, Some(client), Some(scope)) => {
                    let id = scope.to_string();
                    let mut options = self.options;
                    let own = [
                        store.namespace(),
                        dead_letters.as_ref().and_then(|d| d.namespace()),
                    ];
                    if let Some(stage) = exclude_own(&scope, &own) {
                        options.pipeline.insert(0, stage);
                    }
                    (Arc::new(MongoSource::new(client, scope, options)), id)
                }
                (None, None, _) => {
                    return Err(Error::Config(
                        "no source: call .client(…) and .collection(…), or .source(…)".into(),
                    ));
                }
                (None, Some(_), None) => {
                    return Err(Error::Config(
                        "no scope: call .collection(…), .database(…) or .deployment()".into(),
                    ));
                }
            };
        let stream_id = self
            .stream_id
            .unwrap_or_else(|| format!("{default_id}{}", self.suffix));
        validate_stream_id(&stream_id).map_err(|e| Error::Config(e.to_string()))?;
        Ok(DocumentProcessor::from_settings(Settings {
            stream_id,
            source,
            store,
            policy: self.policy,
            invalidate: self.invalidate,
            store_timeout: self.store_timeout,
            prefetch: self.prefetch,
            resnapshot,
            on_handler_error: self.on_handler_error,
            dead_letters,
            concurrency: self.concurrency,
            keep_transactions: self.keep_transactions,
            handler_checkpoints: self.handler_checkpoints,
            max_buffered_bytes: self.max_buffered_bytes,
            batch: self.batch,
            stop_timeout: self.stop_timeout,
            initial_position: self.initial_position,
            lease,
        }))
    }
}

/// A stage that leaves the stores' own collections (resume points, dead letters) out of a
/// database or deployment stream that would include them: otherwise every checkpoint is
/// an event the stream then checkpoints.
fn exclude_own(scope: &Scope, own: &[Option<cdc_core::Namespace>]) -> Option<bson::Document> {
    let nor: Vec<bson::Bson> = own
        .iter()
        .flatten()
        .filter_map(|ns| {
            let coll = ns.coll.clone()?;
            let watched = match scope {
                Scope::Database(db) => *db == ns.db,
                Scope::Deployment => true,
                _ => false,
            };
            watched.then(|| {
                bson::Bson::Document(bson::doc! { "ns.db": ns.db.clone(), "ns.coll": coll })
            })
        })
        .collect();
    (!nor.is_empty()).then(|| bson::doc! { "$match": { "$nor": nor } })
}
