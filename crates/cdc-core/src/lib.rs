//! `cdc-core`: the pure centre of the workspace.
//!
//! Change events, resume tokens and points, start positions, dispatch chains and the
//! delivery protocol ([`Checkpointer`]), with no I/O, no async runtime and no driver.
//! Every other crate depends on this one; it depends on none of them.
//!
//! ```
//! use std::time::Instant;
//! use cdc_core::{ChangeEvent, Checkpointer, CheckpointPolicy, StartPosition};
//!
//! let raw = bson::doc! {
//!     "_id": { "_data": "8265A1B2C3000000012B" },
//!     "operationType": "insert",
//!     "clusterTime": bson::Timestamp { time: 1_705_000_000, increment: 1 },
//!     "ns": { "db": "shop", "coll": "orders" },
//!     "documentKey": { "_id": 42 },
//!     "fullDocument": { "_id": 42, "total": 9.5 },
//! };
//! let event = ChangeEvent::from_document(&raw)?;
//! assert_eq!(event.document_id_string().as_deref(), Some("42"));
//! // Images stay raw BSON: read a field without parsing the rest.
//! assert_eq!(event.full_document().and_then(|d| d.get_f64("total").ok()), Some(9.5));
//!
//! let now = Instant::now();
//! let mut checkpointer = Checkpointer::new(CheckpointPolicy::every_event(), None, now);
//! let seq = checkpointer.track(event.resume_point(bson::DateTime::now()))?;
//! // ... run the handlers, then:
//! let due = checkpointer.ack(seq, now)?.expect("every event is saved under this policy");
//! // ... save `due` in a store, then:
//! checkpointer.confirm(&due, now);
//! assert_eq!(StartPosition::after(checkpointer.persisted()), StartPosition::ResumeAfter(event.token));
//! # Ok::<(), cdc_core::Error>(())
//! ```

mod checkpoint;
mod dead_letter;
mod dispatch;
mod error;
mod event;
mod extjson;
mod frame;
mod lease;
mod namespace;
mod oplog;
mod point;
mod redact;
mod source;
mod store;
mod token;

pub use checkpoint::{CheckpointPolicy, Checkpointer, Seq};
pub use dead_letter::{DeadLetter, DeadLetterStore};
pub use dispatch::{DispatchChain, Dispatcher, FnDispatcher};
pub use error::{BoxError, Error, ErrorKind, PERSISTENT_TRIES, Result, SharedError};
pub use event::{ChangeEvent, EventDecoder, TruncatedArray, UpdateDescription};
pub use lease::{Lease, LeaseRecord, LeaseStore};
pub use namespace::{Name, Namespace, OperationType};
pub use oplog::{OplogHeadroom, OplogView, OplogWindow};
pub use point::{ResumePoint, StartPosition};
pub use source::{ChangeCursor, ChangeSource, HistoryGap, Next, SnapshotProgress, SnapshotRequest};
pub use store::{ResumeStore, check_forward, validate_stream_id};
pub use token::{ClusterTime, ResumeToken, SnapshotRow};

/// Helpers the workspace's crates share (percent-decoding and redacting URLs, an error's
/// chain as text, relaxed Extended JSON, a TTL in milliseconds). Not part of the API:
/// they may change in any release; depend on the concepts above instead.
#[doc(hidden)]
pub mod support {
    pub use crate::{
        dead_letter::error_chain,
        event::bson_display,
        extjson::to_relaxed_json,
        lease::ttl_ms,
        redact::{percent_decode, percent_decode_lossy, redact_secrets},
    };
}

/// Re-export of the `bson` crate this crate's types are built on.
pub use bson;
