//! `cdc-resume`: where resume points live.
//!
//! Every backend implements [`cdc_core::ResumeStore`] and keeps the same rules, checked by
//! one conformance suite: tokens round-trip byte-for-byte, streams are isolated, a point
//! never moves backwards unless deleted, concurrent saves never corrupt the record, a
//! failing backend is an error (never "no point"), a corrupt record is an error naming
//! the stream and where it lives.
//!
//! | backend | feature | keeps |
//! | --- | --- | --- |
//! | [`MemoryStore`] | always | a map in memory |
//! | [`FileStore`] | `file` (default) | one JSON file per stream, replaced atomically |
//! | `MongoStore` | `mongodb` | one document per stream |
//! | `RedisStore` | `redis` | one key per stream |
//! | `PostgresStore` | `postgres` | one row per stream |
//!
//! ```
//! # async fn demo() -> cdc_core::Result<()> {
//! use cdc_core::ResumeStore;
//! let store = cdc_resume::MemoryStore::new();
//! assert!(store.load("orders").await?.is_none());
//! # Ok(()) }
//! ```

mod memory;
pub use memory::MemoryStore;

#[cfg(any(feature = "redis", feature = "postgres"))]
mod redact;

#[cfg(any(feature = "file", feature = "redis"))]
mod record;

#[cfg(feature = "file")]
mod file;
#[cfg(feature = "file")]
pub use file::FileStore;

#[cfg(feature = "mongodb")]
mod mongo;
#[cfg(feature = "mongodb")]
pub use mongo::MongoStore;

#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
pub use crate::redis::RedisStore;

#[cfg(feature = "postgres")]
mod pg_tls;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;

pub use cdc_core::ResumeStore;
