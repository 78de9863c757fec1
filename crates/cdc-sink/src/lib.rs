//! `cdc-sink`: sinks for the processor — batch handlers that put changes somewhere.
//!
//! [`JsonLines`] writes each change as one line of relaxed Extended JSON to a writer
//! (stdout for `cdc run | jq`, a file, a pipe), flushed before the batch is acknowledged.
//! [`PostgresSink`] (feature `postgres`) keeps one table per collection in PostgreSQL,
//! with the checkpoint in the same transaction as the rows. A NATS JetStream sink follows.

mod json_lines;
#[cfg(feature = "postgres")]
mod postgres;

pub use json_lines::JsonLines;
#[cfg(feature = "postgres")]
pub use postgres::PostgresSink;
