//! `cdc-sink`: sinks for the processor — batch handlers that put changes somewhere.
//!
//! [`JsonLines`] writes each change as one line of relaxed Extended JSON to a writer
//! (stdout for `cdc run | jq`, a file, a pipe), flushed before the batch is acknowledged.
//! NATS JetStream and PostgreSQL sinks follow (issue 18).

mod json_lines;

pub use json_lines::JsonLines;
