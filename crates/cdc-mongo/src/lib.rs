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
//! use cdc_core::{ChangeSource, StartPosition};
//! use cdc_mongo::{MongoSource, Scope, SourceOptions, FullDocument, connect};
//!
//! let client = connect("mongodb://127.0.0.1:27017/?replicaSet=rs0", Duration::from_secs(10)).await?;
//! let source = MongoSource::new(
//!     client,
//!     Scope::collection("shop", "orders"),
//!     SourceOptions::default().full_document(FullDocument::UpdateLookup),
//! );
//! let mut cursor = source.open(&StartPosition::Now).await?;
//! // `Ok(None)` is an empty round trip (the cursor's resume token may have moved), not
//! // the end: the stream ends only when the server closes it (an invalidate).
//! while !cursor.is_closed() {
//!     if let Some(event) = cursor.next().await? {
//!         println!("{} {:?}", event.operation_type, event.document_id());
//!     }
//! }
//! # Ok(()) }
//! ```

mod admin;
mod error;
mod options;
mod source;
mod split;

pub use admin::{connect, enable_pre_post_images, record_pre_images};
pub use error::{Error, Result, classify, redact_uri, server_code};
pub use options::{
    BeforeChange, FullDocument, HistoryLostPolicy, PreImagePolicy, Scope, SourceOptions,
};
pub use source::{MongoCursor, MongoSource, from_driver_token, to_driver_token};

/// Re-export of the driver this crate is built on.
pub use mongodb;
