//! `cdc-processor`: the `DocumentProcessor` most users import.
//!
//! It watches a MongoDB collection (or database, or deployment) through `cdc-mongo`,
//! hands every change to your handler, and stores how far it got in a `cdc-resume` store
//! only after your handler succeeded, so that after a restart, crash, failover or dropped
//! collection it continues exactly where processing stopped. The delivery guarantee is
//! stated in `docs/SEMANTICS.md`.
//!
//! ```no_run
//! use std::{sync::Arc, time::Duration};
//! use cdc_processor::{
//!     BoxError, CollectionWatcher, DocumentProcessor, JsonWatcher, Watch, default_backoff,
//! };
//!
//! struct Printer;
//!
//! #[async_trait::async_trait]
//! impl CollectionWatcher for Printer {
//!     async fn insert(&self, doc: &[u8]) -> Result<(), BoxError> {
//!         println!("insert {}", String::from_utf8_lossy(doc));
//!         Ok(())
//!     }
//!     async fn update(&self, doc: &[u8]) -> Result<(), BoxError> {
//!         println!("update {}", String::from_utf8_lossy(doc));
//!         Ok(())
//!     }
//!     async fn delete(&self, doc: &[u8]) -> Result<(), BoxError> {
//!         println!("delete {}", String::from_utf8_lossy(doc));
//!         Ok(())
//!     }
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = cdc_processor::connect("mongodb://127.0.0.1:27017/?replicaSet=rs0", Duration::from_secs(10)).await?;
//! let processor = DocumentProcessor::builder()
//!     // Where events come from (and the stream's options: Watch::full_document, …).
//!     .source(Watch::collection(client, "shop", "orders"))
//!     // Where points live (Storage: dead letters, a lease).
//!     .store(Arc::new(cdc_processor::stores::FileStore::new("./resume-points")?))
//!     .build()?;
//! processor.start_with_retry(default_backoff(), JsonWatcher(Printer)).await?;
//! # Ok(()) }
//! ```
//!
//! A batch handler goes through the same `start` and `start_with_retry`, wrapped in
//! [`Batches`] with its limits: `processor.start(Batches::new(sink).max_events(1000))`.
//! Settings that contradict each other are refused by `build()` with a [`BuildError`]
//! naming both; a leased store takes the dead letters too, so they cannot be split:
//!
//! ```compile_fail
//! # use std::{sync::Arc, time::Duration};
//! # use cdc_processor::{Storage, stores::MemoryStore};
//! let store = Arc::new(MemoryStore::new());
//! // `Leased` has no `dead_letters`: the leased store records them, fenced.
//! let _ = Storage::leased(store.clone(), Duration::from_secs(10)).dead_letters(store);
//! ```

mod context;
mod dead_letters;
mod error;
mod group;
mod handler;
mod handling;
mod lanes;
mod lease;
mod poison;
mod processor;
mod reader;
mod retry;
mod run;
mod settings;
mod stats;
mod stop;
mod store_url;
mod transform;

/// The errors [`Error`] wraps, to match a cause: `Error::Cdc(CoreError::…)`,
/// `Error::Mongo(e)` with `e: Arc<MongoError>`.
pub use cdc_core::Error as CoreError;
pub use cdc_mongo::Error as MongoError;
pub use context::{Batch, BatchDispatcher, HandlerContext, TransactionPosition};
pub use dead_letters::ReplayReport;
pub use error::{BuildError, Error, Result};
pub use group::{Group, HandlerFactory, ProcessorFactory};
pub use handler::{
    CollectionWatcher, JsonWatcher, Typed, TypedWatcher, raw_to_json_bytes, to_json_bytes,
};
pub use handling::{Batches, HandlerSpec, IntoHandler};
pub use poison::{AfterRetries, HandlerErrorPolicy};
pub use processor::{
    Builder, DEFAULT_MAX_BUFFERED_BYTES, DEFAULT_STOP_TIMEOUT, DocumentProcessor, Leased, Source,
    StopHandle, Storage, Watch,
};
pub use retry::default_backoff;
pub use settings::InvalidatePolicy;
pub use stats::Stats;
pub use transform::{DocumentMode, Shaped, Transform};

pub use cdc_core::{
    BoxError, ChangeEvent, CheckpointPolicy, ClusterTime, DeadLetter, DeadLetterStore,
    DispatchChain, Dispatcher, ErrorKind, FnDispatcher, HistoryGap, Namespace, OperationType,
    OplogHeadroom, OplogView, OplogWindow, ResumePoint, ResumeStore, ResumeToken, SnapshotProgress,
    SnapshotRequest, StartPosition,
};

/// The `bson` crate this one is built with: use it rather than a `bson` of your own, so
/// documents and tokens are the same types (a second major would not be).
pub use bson;
/// The `mongodb` driver this one is built with (for `connect`'s `Client`, options and
/// errors), for the same reason.
pub use cdc_mongo::mongodb;
pub use cdc_mongo::{
    BeforeChange, FullDocument, HistoryLostPolicy, PreImagePolicy, Scope, SnapshotMode,
    SourceOptions,
};

/// Connects to MongoDB (see `cdc_mongo::connect`): the URI is checked, the deployment
/// reached within `server_selection_timeout`, and any password redacted from the error.
///
/// # Errors
/// [`Error::Mongo`] when the URI is invalid or no server answered in time.
pub async fn connect(
    uri: &str,
    server_selection_timeout: std::time::Duration,
) -> Result<mongodb::Client> {
    Ok(cdc_mongo::connect(uri, server_selection_timeout).await?)
}

/// The resume stores, re-exported behind the same features as `cdc-resume`.
pub mod stores {
    pub use cdc_resume::*;

    pub use crate::store_url::{Stores, open};
}

/// Re-export of `backon`, for custom backoff policies.
pub use backon;
