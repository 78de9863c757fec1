//! `cdc-sink`: sinks for the processor — batch handlers that put changes somewhere.
//!
//! [`JsonLines`] writes each change as one line of relaxed Extended JSON to a writer
//! (stdout for `cdc run | jq`, a file, a pipe), flushed before the batch is acknowledged.
//! [`PostgresSink`] (feature `postgres`) keeps one table per collection in PostgreSQL,
//! with the checkpoint in the same transaction as the rows. [`NatsSink`] (feature `nats`)
//! publishes each change to NATS JetStream, de-duplicated by a message id derived from its
//! resume token.

mod error;
mod json_lines;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "postgres")]
mod postgres;

/// The NATS client this crate is built with (to connect the [`NatsSink`]'s client).
#[cfg(feature = "nats")]
pub use async_nats;
pub use error::{Error, ErrorKind, Result};
pub use json_lines::JsonLines;
#[cfg(feature = "nats")]
pub use nats::{
    Body, DEFAULT_SUBJECT, NatsCounters, NatsSink, SubjectTemplate, dedup_window_warning,
    message_id, object_name,
};
#[cfg(feature = "postgres")]
pub use postgres::PostgresSink;
