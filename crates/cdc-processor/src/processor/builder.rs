//! The [`Builder`] of a [`DocumentProcessor`].

use std::{sync::Arc, time::Duration};

use cdc_core::{
    ChangeSource, CheckpointPolicy, DeadLetterStore, LeaseStore, ResumeStore, StartPosition,
    validate_stream_id,
};
use cdc_mongo::{
    BeforeChange, FullDocument, HistoryLostPolicy, MongoSource, PreImagePolicy, Scope,
    SourceOptions,
};
use mongodb_client::Client;

use super::DocumentProcessor;
use crate::{
    BuildError, Error, Result,
    settings::{InvalidatePolicy, Settings},
};

use cdc_mongo::mongodb as mongodb_client;

/// The default of [`Builder::stop_timeout`]: 25 s.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(25);

/// The default of [`Builder::max_buffered_bytes`]: 64 MiB.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 64 * 1024 * 1024;

/// Where events come from: a MongoDB [`Watch`], or any [`ChangeSource`] of your own
/// (`Source::from(arc)`). The source's options belong to the watch, so a custom source
/// cannot be given options it would ignore.
pub struct Source(SourceKind);

enum SourceKind {
    Watch(Watch),
    Custom(Arc<dyn ChangeSource>),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            SourceKind::Watch(w) => w.fmt(f),
            SourceKind::Custom(s) => f.debug_tuple("Source").field(&s.describe()).finish(),
        }
    }
}

impl From<Watch> for Source {
    fn from(watch: Watch) -> Self {
        Self(SourceKind::Watch(watch))
    }
}

impl From<Arc<dyn ChangeSource>> for Source {
    fn from(source: Arc<dyn ChangeSource>) -> Self {
        Self(SourceKind::Custom(source))
    }
}

impl<S: ChangeSource + 'static> From<Arc<S>> for Source {
    fn from(source: Arc<S>) -> Self {
        Self(SourceKind::Custom(source))
    }
}

/// A MongoDB change stream to watch: a client, a scope and the stream's options
/// ([`SourceOptions::default()`] unless told otherwise: post-images by `updateLookup`,
/// pre-images when available, batches of 1,000 events, the default operation types).
pub struct Watch {
    client: Client,
    scope: Scope,
    options: SourceOptions,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("scope", &self.scope)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Watch {
    /// Watches `scope` through `client` (see [`crate::connect`]).
    pub fn new(client: Client, scope: Scope) -> Self {
        Self {
            client,
            scope,
            options: SourceOptions::default(),
        }
    }

    /// Watches one collection.
    pub fn collection(client: Client, db: impl Into<String>, coll: impl Into<String>) -> Self {
        Self::new(client, Scope::collection(db, coll))
    }

    /// Watches every collection of a database.
    pub fn database(client: Client, db: impl Into<String>) -> Self {
        Self::new(client, Scope::database(db))
    }

    /// Watches the whole deployment.
    pub fn deployment(client: Client) -> Self {
        Self::new(client, Scope::Deployment)
    }

    /// All the stream's options at once (document modes, operation filter, pipeline, …),
    /// replacing the ones set so far; build them from [`SourceOptions::default()`].
    #[must_use]
    pub fn options(mut self, options: SourceOptions) -> Self {
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

    /// Reads the documents that already exist before streaming (default: never). With
    /// [`cdc_mongo::SnapshotMode::Initial`], a stream whose store holds no point first
    /// delivers every document of the collection as a `snapshot` event, then the changes
    /// made since the snapshot began, with no gap (the algorithm and its limits:
    /// `docs/SEMANTICS.md`).
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
}

/// Where resume points and dead letters live, and whether the stream is leased.
///
/// An unleased store: `Storage::new(points)` (also `From` an `Arc` of any store, or a
/// [`crate::stores::Stores`] opened by URL, which brings its dead letters along), with
/// [`Storage::dead_letters`]. A leased one: [`Storage::leased`] or
/// [`Storage::leased_stores`], where points and dead letters are both written in the
/// leased store, fenced by the lease, so they cannot be split across stores.
#[derive(Clone)]
pub struct Storage {
    points: Arc<dyn ResumeStore>,
    dead_letters: Option<Arc<dyn DeadLetterStore>>,
    lease: Option<LeaseSpec>,
}

#[derive(Clone)]
struct LeaseSpec {
    store: Arc<dyn LeaseStore>,
    ttl: Duration,
    owner: Option<String>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("points", &self.points.describe())
            .field(
                "dead_letters",
                &self.dead_letters.as_ref().map(|d| d.describe()),
            )
            .field("lease_ttl", &self.lease.as_ref().map(|l| l.ttl))
            .finish()
    }
}

impl Storage {
    /// Resume points in `points`; no dead-letter store, no lease.
    pub fn new(points: Arc<dyn ResumeStore>) -> Self {
        Self {
            points,
            dead_letters: None,
            lease: None,
        }
    }

    /// Records dead letters in `store` (every `cdc-resume` store is one; usually the
    /// same store as the points). Needed by [`crate::HandlerErrorPolicy::dead_letter`],
    /// and by the dead-letter API ([`DocumentProcessor::dead_letters`] and the rest).
    #[must_use]
    pub fn dead_letters(mut self, store: Arc<dyn DeadLetterStore>) -> Self {
        self.dead_letters = Some(store);
        self
    }

    /// Keeps the point and the dead letters in `store` and handles the stream only while
    /// holding its lease there (TTL `ttl`): one active instance per stream id, the others
    /// standing by. Every save carries the lease's fencing token, so an instance that lost
    /// the lease (paused past its TTL) cannot move the point; it stops handling at once
    /// and stands by again under `start_with_retry`. `stop()` releases the lease. See
    /// `docs/SEMANTICS.md`.
    pub fn leased<S>(store: Arc<S>, ttl: Duration) -> Leased
    where
        S: ResumeStore + LeaseStore + DeadLetterStore + 'static,
    {
        Self::leased_stores(&crate::stores::Stores::one(store), ttl)
    }

    /// [`Storage::leased`] with a store opened by URL ([`crate::stores::open`]): points,
    /// dead letters and leases of its one backend.
    pub fn leased_stores(stores: &crate::stores::Stores, ttl: Duration) -> Leased {
        Leased(Self {
            points: Arc::clone(&stores.points),
            dead_letters: Some(Arc::clone(&stores.dead_letters)),
            lease: Some(LeaseSpec {
                store: Arc::clone(&stores.leases),
                ttl,
                owner: None,
            }),
        })
    }
}

/// A leased [`Storage`] (see [`Storage::leased`]): the only setting left is who holds it.
#[derive(Clone, Debug)]
pub struct Leased(Storage);

impl Leased {
    /// The owner id this instance holds leases under (default: host, process id and
    /// start time, unique per incarnation). Two instances must never share one.
    #[must_use]
    pub fn owner(mut self, id: impl Into<String>) -> Self {
        if let Some(lease) = &mut self.0.lease {
            lease.owner = Some(id.into());
        }
        self
    }
}

impl From<Leased> for Storage {
    fn from(leased: Leased) -> Self {
        leased.0
    }
}

impl From<Arc<dyn ResumeStore>> for Storage {
    fn from(points: Arc<dyn ResumeStore>) -> Self {
        Self::new(points)
    }
}

impl<S: ResumeStore + 'static> From<Arc<S>> for Storage {
    fn from(points: Arc<S>) -> Self {
        Self::new(points)
    }
}

impl From<&crate::stores::Stores> for Storage {
    /// Points and dead letters of the opened backend, unleased.
    fn from(stores: &crate::stores::Stores) -> Self {
        Self::new(Arc::clone(&stores.points)).dead_letters(Arc::clone(&stores.dead_letters))
    }
}

/// Configures a [`DocumentProcessor`]: [`Builder::source`] (where events come from) and
/// [`Builder::store`] (where points, dead letters and the lease live) are required; the
/// rest says how delivery works and how much flows.
///
/// Defaults: the batched checkpoint policy (100 events or 1 s; idle tokens once a
/// minute), restart after invalidate, a 10 s store timeout, 1024 events read ahead
/// within 64 MiB, one lane, retry after handler errors (3 times, then stop), a 25 s stop
/// timeout, start now when the store holds no point.
pub struct Builder {
    source: Option<Source>,
    storage: Option<Storage>,
    stream_id: Option<String>,
    suffix: String,
    policy: CheckpointPolicy,
    invalidate: InvalidatePolicy,
    store_timeout: Duration,
    prefetch: usize,
    on_handler_error: crate::HandlerErrorPolicy,
    concurrency: usize,
    keep_transactions: Option<bool>,
    handler_checkpoints: bool,
    max_buffered_bytes: usize,
    stop_timeout: Option<Duration>,
    initial_position: Option<StartPosition>,
    transform: Option<crate::Transform>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("source", &self.source)
            .field("storage", &self.storage)
            .field("stream_id", &self.stream_id)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            source: None,
            storage: None,
            stream_id: None,
            suffix: String::new(),
            policy: CheckpointPolicy::default(),
            invalidate: InvalidatePolicy::default(),
            store_timeout: Duration::from_secs(10),
            prefetch: 1024,
            on_handler_error: crate::HandlerErrorPolicy::default(),
            concurrency: 1,
            keep_transactions: None,
            handler_checkpoints: false,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            stop_timeout: Some(DEFAULT_STOP_TIMEOUT),
            initial_position: None,
            transform: None,
        }
    }
}

impl Builder {
    /// Where events come from: a [`Watch`] (a client, a scope and the stream's
    /// options), or an `Arc` of any [`ChangeSource`].
    #[must_use]
    pub fn source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Where resume points (and dead letters, and the lease) live: an `Arc` of any
    /// store, a [`Storage`] with its dead-letter store, a leased one
    /// ([`Storage::leased`]), or `&Stores` opened by URL.
    #[must_use]
    pub fn store(mut self, storage: impl Into<Storage>) -> Self {
        self.storage = Some(storage.into());
        self
    }

    /// The stream id the point is stored under (default: the watched namespace, like the
    /// Go package's collection name, plus the resume suffix).
    #[must_use]
    pub fn stream_id(mut self, id: impl Into<String>) -> Self {
        self.stream_id = Some(id.into());
        self
    }

    /// A suffix for the default stream id (the Go package's `resumeSuffix`); contradicts
    /// an explicit [`Builder::stream_id`].
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
        self.prefetch = events;
        self
    }

    /// What happens when the handler fails (or panics) on an event: retried in process,
    /// then stop (the default: 3 retries from 100 ms, then stop), skip or dead-letter
    /// (which needs a dead-letter store in [`Builder::store`]). See
    /// [`crate::HandlerErrorPolicy`] and `docs/SEMANTICS.md`.
    #[must_use]
    pub fn on_handler_error(mut self, policy: crate::HandlerErrorPolicy) -> Self {
        self.on_handler_error = policy;
        self
    }

    /// Per-key lanes (at least 1; default 1: one event at a time, as the Go package).
    /// With `n > 1`, events are routed by a stable hash of their document key to `n`
    /// lanes: each key's events are handled in stream order, different keys concurrently.
    /// Events without a document key (invalidate, drop, rename, DDL) are barriers: every
    /// lane drains, the event is handled alone, then lanes resume. The stored point is the
    /// low watermark of what is handled, so a crash never skips an event a lane has not
    /// finished. The checkpoint policy's `max_events` also bounds the events in flight; it
    /// is raised to `n` (one per lane) when smaller, and so is the bound of repeats after
    /// a crash.
    #[must_use]
    pub fn concurrency(mut self, lanes: usize) -> Self {
        self.concurrency = lanes;
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

    /// The most raw bytes of events read from the stream and not yet handled (at least
    /// 1; default 64 MiB), on top of the event-count bound of [`Builder::prefetch`]. The
    /// bound covers the driver's buffered server batch (up to 16 MiB) too: the reader
    /// stops pulling from the cursor while what it holds is over the bound less one such
    /// batch (but at least half the bound). A single event larger than that is still
    /// delivered, alone.
    ///
    /// The process's resident memory is about this bound plus its baseline (~14 MiB) and
    /// the allocator's overhead. With large documents glibc's malloc keeps freed buffers
    /// in per-thread arenas (measured with 1 MiB documents and a 64 MiB bound: about
    /// 150 MiB of RSS); with jemalloc built to return freed memory at once (what the `cdc`
    /// program uses: `.cargo/config.toml`) it stays close to the bound (README, benchmark
    /// row 12c).
    #[must_use]
    pub fn max_buffered_bytes(mut self, bytes: usize) -> Self {
        self.max_buffered_bytes = bytes;
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
    /// Default: now. Contradicts an initial snapshot ([`Watch::snapshot`]), which starts
    /// where the snapshot begins.
    #[must_use]
    pub fn start_position(mut self, position: StartPosition) -> Self {
        self.initial_position = Some(position);
        self
    }

    /// Shapes every event before any handler sees it (fields dropped or replaced by a
    /// keyed hash, namespaces kept or left out): see [`crate::Transform`]. Events of a
    /// left-out namespace reach no handler; their positions still count, so the stored
    /// point moves past them.
    #[must_use]
    pub fn transform(mut self, transform: crate::Transform) -> Self {
        self.transform = Some(transform);
        self
    }

    /// Builds the processor.
    ///
    /// # Errors
    /// [`Error::Build`] naming the setting (and the one it contradicts): no source or
    /// store, a zero bound, a lease TTL too short, an invalid stream id, a dead-letter
    /// policy without a dead-letter store, a resume suffix next to an explicit stream id,
    /// a start position next to an initial snapshot, restarting from now after lost
    /// history next to re-reading the documents then.
    pub fn build(self) -> Result<DocumentProcessor> {
        self.check().map_err(Error::Build)
    }

    fn check(self) -> std::result::Result<DocumentProcessor, BuildError> {
        BuildError::at_least_one(&[
            ("concurrency", self.concurrency),
            ("prefetch", self.prefetch),
            ("max_buffered_bytes", self.max_buffered_bytes),
        ])?;
        if let Some(t) = &self.transform {
            t.check().map_err(|reason| BuildError::Invalid {
                setting: "transform",
                reason,
            })?;
        }
        let storage = self.storage.ok_or(BuildError::Missing {
            setting: "store",
            hint: "call .store(…) with a resume store",
        })?;
        let source = self.source.ok_or(BuildError::Missing {
            setting: "source",
            hint: "call .source(Watch::collection(client, db, coll)) or .source(an Arc of a ChangeSource)",
        })?;
        if self.on_handler_error.then() == crate::AfterRetries::DeadLetter
            && storage.dead_letters.is_none()
        {
            return Err(BuildError::Conflict {
                setting: "on_handler_error",
                other: "store",
                reason: "the policy records dead letters but the store has no dead-letter store: use Storage::new(points).dead_letters(…), a leased store, or &Stores",
            });
        }
        if self.stream_id.is_some() && !self.suffix.is_empty() {
            return Err(BuildError::Conflict {
                setting: "resume_suffix",
                other: "stream_id",
                reason: "a suffix applies to the default stream id only; put it in the explicit id",
            });
        }
        if let SourceKind::Watch(w) = &source.0 {
            let snapshot = w.options.snapshot;
            if self.initial_position.is_some()
                && matches!(
                    snapshot,
                    cdc_mongo::SnapshotMode::Initial | cdc_mongo::SnapshotMode::InitialOnly
                )
            {
                return Err(BuildError::Conflict {
                    setting: "start_position",
                    other: "snapshot",
                    reason: "an initial snapshot starts the stream where the snapshot begins; drop one of them",
                });
            }
            if snapshot == cdc_mongo::SnapshotMode::WhenNeeded
                && w.options.history_lost_policy == HistoryLostPolicy::RestartFromNow
            {
                return Err(BuildError::Conflict {
                    setting: "history_lost_policy",
                    other: "snapshot",
                    reason: "SnapshotMode::WhenNeeded reads the documents again when history is lost; RestartFromNow would skip them",
                });
            }
        }
        let lease = match storage.lease {
            Some(LeaseSpec { ttl, .. }) if ttl < Duration::from_millis(30) => {
                return Err(BuildError::Invalid {
                    setting: "store",
                    reason: format!(
                        "a lease TTL of {ttl:?} is too short: renewals come every third of it (at least 30 ms)"
                    ),
                });
            }
            Some(LeaseSpec { store, ttl, owner }) => Some(crate::lease::LeaseSettings {
                store,
                ttl,
                owner: owner.unwrap_or_else(crate::lease::default_owner),
            }),
            None => None,
        };
        let store = storage.points;
        let dead_letters = storage.dead_letters;
        let mut resnapshot = false;
        let (source, default_id): (Arc<dyn ChangeSource>, String) = match source.0 {
            SourceKind::Custom(source) => {
                let id = source.describe();
                (source, id)
            }
            SourceKind::Watch(Watch {
                client,
                scope,
                mut options,
            }) => {
                resnapshot = options.snapshot == cdc_mongo::SnapshotMode::WhenNeeded;
                let id = scope.to_string();
                let own = [
                    store.namespace(),
                    dead_letters.as_ref().and_then(|d| d.namespace()),
                ];
                if let Some(stage) = exclude_own(&scope, &own) {
                    options.pipeline.insert(0, stage);
                }
                (Arc::new(MongoSource::new(client, scope, options)), id)
            }
        };
        let stream_id = self
            .stream_id
            .unwrap_or_else(|| format!("{default_id}{}", self.suffix));
        validate_stream_id(&stream_id).map_err(|e| BuildError::Invalid {
            setting: "stream_id",
            reason: e.to_string(),
        })?;
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
            stop_timeout: self.stop_timeout,
            initial_position: self.initial_position,
            lease,
            transform: self
                .transform
                .filter(|t| !t.is_empty())
                .map(std::sync::Arc::new),
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
