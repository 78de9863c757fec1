//! `cdc-mongo`: the change-stream source over the official `mongodb` driver.
//!
//! [`MongoSource`] implements [`cdc_core::ChangeSource`] for a collection, a database or
//! the whole deployment. Events are decoded from the server's raw BSON into
//! [`cdc_core::ChangeEvent`]s, and every failure is classified by server code and error
//! label into a [`cdc_core::ErrorKind`] — never by message text.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use cdc_core::StartPosition;
//! use cdc_mongo::{MongoSource, Scope, SourceOptions, connect};
//! use futures_util::StreamExt;
//!
//! let client = connect("mongodb://127.0.0.1:27017/?replicaSet=rs0", Duration::from_secs(10)).await?;
//! let source = MongoSource::new(
//!     client,
//!     Scope::collection("shop", "orders"),
//!     SourceOptions::default(),
//! );
//! // Ends only when the server closes the stream (an invalidate) or on an error.
//! let mut events = source.stream(&StartPosition::Now).await?;
//! while let Some(event) = events.next().await {
//!     let event = event?;
//!     println!("{} {:?}", event.operation_type, event.document_id());
//! }
//! # Ok(()) }
//! ```
//!
//! `events.with_idle()` also yields a `Change::Idle` for each round trip that brought no
//! event (with the resume token, which moves on a quiet stream). The same code runs
//! against mongo-sim in `tests/event_stream.rs`.

mod admin;
mod cursor;
mod error;
mod oplog;
mod options;
mod progress;
mod snapshot;
mod source;
mod split;
mod stream;

pub use admin::{connect, enable_pre_post_images, record_pre_images};
pub use cursor::{MongoCursor, from_driver_token, to_driver_token};
pub use error::{Error, Result, classify, redact_uri, server_code, uri_secrets};
pub use options::{
    BeforeChange, FullDocument, HistoryLostPolicy, PreImagePolicy, Scope, SnapshotMode,
    SourceOptions,
};
pub use source::MongoSource;
pub use stream::{Change, EventStream, IdleStream};

/// Re-export of the driver this crate is built on.
pub use mongodb;
