//! What to watch and how: scope, document modes, filters and failure policies.

use std::time::Duration;

use bson::Document;
use cdc_core::{Namespace, OperationType};
use mongodb::options::SelectionCriteria;

/// What a source watches.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scope {
    /// One collection.
    Collection {
        /// Its database.
        db: String,
        /// Its name.
        coll: String,
    },
    /// Every collection of one database.
    Database(String),
    /// The whole deployment.
    Deployment,
}

impl Scope {
    /// The database watched, unless the whole deployment is.
    pub fn db(&self) -> Option<&str> {
        match self {
            Self::Collection { db, .. } | Self::Database(db) => Some(db),
            Self::Deployment => None,
        }
    }

    /// One collection.
    pub fn collection(db: impl Into<String>, coll: impl Into<String>) -> Self {
        Self::Collection {
            db: db.into(),
            coll: coll.into(),
        }
    }

    /// One database.
    pub fn database(db: impl Into<String>) -> Self {
        Self::Database(db.into())
    }

    /// The namespace watched, if the scope has one.
    pub fn namespace(&self) -> Option<Namespace> {
        match self {
            Self::Collection { db, coll } => Some(Namespace::collection(db.clone(), coll.clone())),
            Self::Database(db) => Some(Namespace::database(db.clone())),
            Self::Deployment => None,
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Collection { db, coll } => write!(f, "{db}.{coll}"),
            Self::Database(db) => write!(f, "{db}.*"),
            Self::Deployment => f.write_str("*.*"),
        }
    }
}

/// The `fullDocument` mode: which post-image update events carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FullDocument {
    /// Inserts and replaces carry the document; updates do not.
    #[default]
    Default,
    /// Updates carry the current document, looked up when the event is read.
    UpdateLookup,
    /// Updates carry the recorded post-image when there is one (MongoDB 6.0+).
    WhenAvailable,
    /// Updates carry the recorded post-image, or the stream fails (MongoDB 6.0+).
    Required,
}

/// The `fullDocumentBeforeChange` mode: whether events carry the pre-image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum BeforeChange {
    /// No pre-image.
    #[default]
    Off,
    /// The recorded pre-image when there is one.
    WhenAvailable,
    /// The recorded pre-image, or NoMatchingDocument (47).
    Required,
}

/// What to do when a required pre-image is missing (NoMatchingDocument, 47).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PreImagePolicy {
    /// Fail with [`cdc_core::ErrorKind::PreImageMissing`].
    #[default]
    Fail,
    /// Reopen at the same position with pre-images off, for the life of the source
    /// (logged at warn and counted), as the Go package did.
    FallBackToOff,
}

/// What to do when the start position has aged out of the oplog (ChangeStreamHistoryLost,
/// 286).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HistoryLostPolicy {
    /// Fail with [`cdc_core::ErrorKind::HistoryLost`]: never skip data silently.
    #[default]
    Fail,
    /// Start again from now and report the gap's bounds (the Go package's
    /// `WithResumeOnChangeStreamHistoryLost`).
    RestartFromNow,
}

/// How a source opens its streams.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SourceOptions {
    /// The `fullDocument` mode.
    pub full_document: FullDocument,
    /// The `fullDocumentBeforeChange` mode.
    pub before_change: BeforeChange,
    /// The operation types passed through; `None` passes every type.
    pub operation_types: Option<Vec<OperationType>>,
    /// Stages appended after the operation-type filter.
    pub pipeline: Vec<Document>,
    /// The cursor batch size.
    pub batch_size: Option<u32>,
    /// How long a `getMore` waits for events (the server's default is 1 s).
    pub max_await_time: Option<Duration>,
    /// Where reads go.
    pub read_preference: Option<SelectionCriteria>,
    /// Whether to show DDL events (`create`, `createIndexes`, …).
    pub show_expanded_events: bool,
    /// What to do when a required pre-image is missing.
    pub pre_image_policy: PreImagePolicy,
    /// What to do when the start position has aged out of the oplog.
    pub history_lost_policy: HistoryLostPolicy,
    /// Whether to append `$changeStreamSplitLargeEvent` (MongoDB 7.0, 6.0.9): events over
    /// 16 MiB then arrive as fragments, which the cursor reassembles into one event.
    pub split_large_events: bool,
    /// Whether existing documents are read first (see [`SnapshotMode`]).
    pub snapshot: SnapshotMode,
    /// How many chunks of a snapshot are read at once (1: chunks of `snapshot_chunk_docs`
    /// one after the other; more: `_id` ranges from `splitVector` read concurrently).
    pub snapshot_parallelism: usize,
    /// Documents per snapshot chunk (at least; and the batch size of snapshot reads).
    pub snapshot_chunk_docs: usize,
}

impl Default for SourceOptions {
    /// As the Go package and the processor watch: post-images by `updateLookup`,
    /// pre-images when available, batches of 1,000 events (so a burst does not make the
    /// driver buffer 16 MB batches), the Go package's operation types (insert, update,
    /// delete, invalidate) plus `replace`, which the Go package silently dropped;
    /// everything else off.
    fn default() -> Self {
        Self {
            full_document: FullDocument::UpdateLookup,
            before_change: BeforeChange::WhenAvailable,
            operation_types: Some(Self::default_operation_types()),
            pipeline: Vec::new(),
            batch_size: Some(1000),
            max_await_time: None,
            read_preference: None,
            show_expanded_events: false,
            pre_image_policy: PreImagePolicy::Fail,
            history_lost_policy: HistoryLostPolicy::Fail,
            snapshot: SnapshotMode::Never,
            snapshot_parallelism: 1,
            snapshot_chunk_docs: 1000,
            split_large_events: false,
        }
    }
}

impl SourceOptions {
    /// insert, update, replace, delete, invalidate.
    pub fn default_operation_types() -> Vec<OperationType> {
        vec![
            OperationType::Insert,
            OperationType::Update,
            OperationType::Replace,
            OperationType::Delete,
            OperationType::Invalidate,
        ]
    }

    /// Sets the `fullDocument` mode.
    #[must_use]
    pub fn full_document(mut self, mode: FullDocument) -> Self {
        self.full_document = mode;
        self
    }

    /// Sets the `fullDocumentBeforeChange` mode.
    #[must_use]
    pub fn before_change(mut self, mode: BeforeChange) -> Self {
        self.before_change = mode;
        self
    }

    /// Passes only these operation types.
    #[must_use]
    pub fn operation_types(mut self, types: impl IntoIterator<Item = OperationType>) -> Self {
        self.operation_types = Some(types.into_iter().collect());
        self
    }

    /// Passes every operation type.
    #[must_use]
    pub fn all_operation_types(mut self) -> Self {
        self.operation_types = None;
        self
    }

    /// Appends user stages after the operation-type filter.
    #[must_use]
    pub fn pipeline(mut self, stages: impl IntoIterator<Item = Document>) -> Self {
        self.pipeline = stages.into_iter().collect();
        self
    }

    /// Sets the cursor batch size.
    #[must_use]
    pub fn batch_size(mut self, n: u32) -> Self {
        self.batch_size = Some(n);
        self
    }

    /// Reads the existing documents first (see [`SnapshotMode`]).
    #[must_use]
    pub fn snapshot(mut self, mode: SnapshotMode) -> Self {
        self.snapshot = mode;
        self
    }

    /// Reads a snapshot in chunks of `chunk_docs` documents, `parallelism` at once (each
    /// chunk a snapshot read, handed over in `_id` order at its read time).
    #[must_use]
    pub fn snapshot_parallelism(mut self, parallelism: usize, chunk_docs: usize) -> Self {
        self.snapshot_parallelism = parallelism.max(1);
        self.snapshot_chunk_docs = chunk_docs.max(1);
        self
    }

    /// Sets how long a `getMore` waits for events.
    #[must_use]
    pub fn max_await_time(mut self, d: Duration) -> Self {
        self.max_await_time = Some(d);
        self
    }

    /// Sets where reads go.
    #[must_use]
    pub fn read_preference(mut self, criteria: SelectionCriteria) -> Self {
        self.read_preference = Some(criteria);
        self
    }

    /// Shows DDL events.
    #[must_use]
    pub fn show_expanded_events(mut self, on: bool) -> Self {
        self.show_expanded_events = on;
        self
    }

    /// Sets the pre-image policy.
    #[must_use]
    pub fn pre_image_policy(mut self, policy: PreImagePolicy) -> Self {
        self.pre_image_policy = policy;
        self
    }

    /// Sets the history-lost policy.
    #[must_use]
    pub fn history_lost_policy(mut self, policy: HistoryLostPolicy) -> Self {
        self.history_lost_policy = policy;
        self
    }

    /// Appends `$changeStreamSplitLargeEvent` as the last stage (MongoDB 7.0, 6.0.9+), so
    /// an event over 16 MiB (large pre- and post-images) is delivered instead of failing
    /// with BSONObjectTooLarge. Its fragments are reassembled into one event whose resume
    /// token is the last fragment's, so no checkpoint falls between them. Fragments are
    /// reassembled whenever they appear, also when the stage comes from [`Self::pipeline`].
    #[must_use]
    pub fn split_large_events(mut self, on: bool) -> Self {
        self.split_large_events = on;
        self
    }
}

/// When the processor reads the existing documents before streaming.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotMode {
    /// Never: only changes from the start position on (the Go package's behaviour).
    #[default]
    Never,
    /// When the store holds no point: the existing documents, then the stream.
    Initial,
    /// As `Initial`, then stop (the stored point then continues the stream later).
    InitialOnly,
    /// As `Initial`, and again whenever the stream's position has aged out of the oplog
    /// (`ChangeStreamHistoryLost`): the documents are read anew, then the stream continues
    /// from a position taken before that read, so nothing the lost history held is
    /// missing from what a consumer ends with.
    WhenNeeded,
}
