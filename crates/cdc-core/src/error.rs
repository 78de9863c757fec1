//! The error type of `cdc-core`, and the kinds that every other crate maps its errors onto.

use crate::{ClusterTime, OperationType};

/// Any error that can cross a crate boundary as a source: driver, store or handler errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A cause shared by the copies of one error (an error published to several listeners
/// is the same error, with the same typed cause, not a flattened copy).
pub type SharedError = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a failure means for the caller: the retry loop reads this, never message text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Worth retrying after a pause: network errors, elections, resumable server errors.
    Transient,
    /// The start position has aged out of the oplog (ChangeStreamHistoryLost, code 286).
    HistoryLost,
    /// The server refused the resume token for this start position (codes 260, 280).
    InvalidToken,
    /// A required pre-image was missing (NoMatchingDocument, code 47).
    PreImageMissing,
    /// The resume store could not be read or written; retried, since stores come back.
    Store,
    /// A user handler returned an error.
    Handler,
    /// Another instance holds the stream's lease now: this one stops handling and waits
    /// as a standby (a retry loop tries to acquire the lease again).
    Fenced,
    /// The same failure each time, which only a person can mend (a store's directory
    /// replaced by a file, no permission, a name the file system refuses): retried at most
    /// [`PERSISTENT_TRIES`] times in a row, since someone may be mending it, then given up.
    Persistent,
    /// Not worth retrying: authorization, bad pipeline, corrupt data, misuse.
    Fatal,
}

/// How many runs in a row a retry loop makes when each fails with an
/// [`ErrorKind::Persistent`] error before it gives up (with the default backoff, about
/// 13 s of waiting).
pub const PERSISTENT_TRIES: u32 = 8;

impl ErrorKind {
    /// Whether a retry loop should try again after a backoff.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Transient | Self::Store | Self::Fenced | Self::Persistent
        )
    }
}

/// Errors of the pure layer, and the common currency of the source and store traits.
///
/// Cloning shares the cause: a clone keeps the kind and the typed cause (reach it with
/// [`Error::cause`] to downcast, for example to `cdc_mongo::Error` for a server code).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A change event document lacked a required field or held one of the wrong type.
    #[error("malformed change event: field `{field}` {problem}")]
    MalformedEvent {
        /// The offending field's name.
        field: &'static str,
        /// What was wrong with it.
        problem: String,
    },
    /// The change stream source failed; `kind` says whether to retry.
    #[error("change stream failed ({kind:?}): {source}")]
    Source {
        /// How the failure was classified (from server codes and labels).
        kind: ErrorKind,
        /// The driver's error.
        #[source]
        source: SharedError,
    },
    /// The resume store failed to read or write the point of `stream`.
    #[error("resume store failed for stream `{stream}`: {source}")]
    Store {
        /// The stream whose point was being read or written.
        stream: String,
        /// The backend's error.
        #[source]
        source: SharedError,
    },
    /// A service a handler or sink writes to (a NATS server, a database) did not answer or
    /// refused for now: an outage, retried until it returns (classified
    /// [`ErrorKind::Transient`]).
    #[error("{service} is unavailable: {source}")]
    Unavailable {
        /// What is away, as in `NATS JetStream` or `the PostgreSQL sink's database`.
        service: String,
        /// The client's error.
        #[source]
        source: SharedError,
    },
    /// The resume store cannot be used for `stream` in a way only a person can mend (a
    /// file where the store's directory belongs, a name the file system refuses, no
    /// permission): [`ErrorKind::Persistent`], so a run restarts a bounded number of times,
    /// not forever.
    #[error("resume store unusable for stream `{stream}` at {location}: {source}")]
    StoreUnusable {
        /// The stream whose state was being read or written.
        stream: String,
        /// Where (a path, a key, a table).
        location: String,
        /// The backend's error.
        #[source]
        source: SharedError,
    },
    /// A stored point could not be decoded.
    #[error("corrupt resume point for stream `{stream}` at {location}: {reason}")]
    CorruptPoint {
        /// The stream whose point is corrupt.
        stream: String,
        /// Where it lives (a file path, a key, a table and row).
        location: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The point stored for `stream` belongs to another stream (copied from another
    /// stream's file or key, or taken from another namespace): opening on it would start
    /// at another stream's position and skip or repeat changes.
    #[error(
        "the resume point of stream `{stream}` at {location} is not this stream's: it was taken from {found}, this stream is {expected}; restore the right point or delete it to start over"
    )]
    ForeignPoint {
        /// The stream being loaded.
        stream: String,
        /// Where the point lives.
        location: String,
        /// What the point says it was taken from.
        found: String,
        /// What this stream is.
        expected: String,
    },
    /// The server refused to resume stream `stream` from the token stored at `location`
    /// (classified [`ErrorKind::InvalidToken`]).
    #[error(
        "the server refuses to resume stream `{stream}` from the token stored at {location}: {source}; restore the right point, or delete it to start over"
    )]
    TokenRefused {
        /// The stream.
        stream: String,
        /// Where the point lives.
        location: String,
        /// The source's error.
        #[source]
        source: SharedError,
    },
    /// A save would have moved the stored point backwards.
    #[error(
        "resume point of stream `{stream}` may not move backwards: stored {stored}, refused {attempted}"
    )]
    Regression {
        /// The stream.
        stream: String,
        /// The cluster time of the stored point.
        stored: ClusterTime,
        /// The cluster time of the refused point.
        attempted: ClusterTime,
    },
    /// The stored point is later than the deployment's newest operation: it comes from
    /// another deployment or from before a restore, and opening on it would wait for
    /// that time to come.
    #[error(
        "the stored point of stream `{stream}` at {location} ({stored}) is ahead of the deployment's newest operation ({deployment}): it comes from another deployment or a restored backup; delete it, or start from an explicit position, to start over"
    )]
    PointAhead {
        /// The stream.
        stream: String,
        /// Where the point lives.
        location: String,
        /// The stored point's cluster time.
        stored: ClusterTime,
        /// The deployment's newest operation time.
        deployment: ClusterTime,
    },
    /// A handler returned an error for an event (after the retries its policy allows).
    #[error(
        "handler failed on the {operation} event at {cluster_time}{}{}: {source}",
        document_id.as_ref().map(|id| format!(" of document {id}")).unwrap_or_default(),
        if *attempts > 1 { format!(" after {attempts} attempts") } else { String::new() }
    )]
    Handler {
        /// The event's operation type.
        operation: OperationType,
        /// The event's cluster time.
        cluster_time: ClusterTime,
        /// The changed document's `_id` as text, when the event has one.
        document_id: Option<String>,
        /// The event's resume token (resume after it to skip the event by hand).
        token: Option<crate::ResumeToken>,
        /// How many times the handler was called on the event.
        attempts: u32,
        /// The handler's error.
        #[source]
        source: SharedError,
    },
    /// A write or renewal under a lease was refused: a newer holder exists (or the lease
    /// expired), so this instance must stop handling the stream.
    #[error(
        "stream `{stream}`: the lease with fencing token {token} is no longer held{}",
        newest.map(|n| format!(" (newest token {n})")).unwrap_or_default()
    )]
    Fenced {
        /// The stream.
        stream: String,
        /// The refused token.
        token: u64,
        /// The newest token the store has seen, when it has one.
        newest: Option<u64>,
    },
    /// An argument was out of its range.
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument's name.
        name: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// The delivery protocol was driven in an order it does not allow.
    #[error("delivery protocol misuse: {0}")]
    Protocol(String),
}

impl Error {
    /// Wraps a source failure with its classification.
    pub fn source(kind: ErrorKind, source: impl Into<BoxError>) -> Self {
        Self::Source {
            kind,
            source: SharedError::from(source.into()),
        }
    }

    /// The typed cause of a source, store or handler error, to downcast:
    /// `err.cause().and_then(|c| c.downcast_ref::<cdc_mongo::Error>())`.
    pub fn cause(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self {
            Self::Source { source, .. }
            | Self::Store { source, .. }
            | Self::StoreUnusable { source, .. }
            | Self::Unavailable { source, .. }
            | Self::TokenRefused { source, .. }
            | Self::Handler { source, .. } => Some(&**source),
            _ => None,
        }
    }

    /// An outage of `service` (see [`Error::Unavailable`]).
    pub fn unavailable(service: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Unavailable {
            service: service.into(),
            source: SharedError::from(source.into()),
        }
    }

    /// Wraps a store failure for `stream`.
    pub fn store(stream: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Store {
            stream: stream.into(),
            source: SharedError::from(source.into()),
        }
    }

    /// How this error is classified.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Source { kind, .. } => *kind,
            Self::Store { .. } => ErrorKind::Store,
            Self::Handler { .. } => ErrorKind::Handler,
            Self::Fenced { .. } => ErrorKind::Fenced,
            Self::Unavailable { .. } => ErrorKind::Transient,
            Self::TokenRefused { .. } => ErrorKind::InvalidToken,
            Self::StoreUnusable { .. } => ErrorKind::Persistent,
            Self::MalformedEvent { .. }
            | Self::CorruptPoint { .. }
            | Self::ForeignPoint { .. }
            | Self::PointAhead { .. }
            | Self::Regression { .. }
            | Self::InvalidArgument { .. }
            | Self::Protocol(_) => ErrorKind::Fatal,
        }
    }

    /// Whether a retry loop should try again after a backoff.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_classify_retry() {
        let io = std::io::Error::other("connection reset");
        assert!(Error::source(ErrorKind::Transient, io).is_retryable());
        assert!(Error::store("s", "down").is_retryable());
        assert!(!Error::source(ErrorKind::HistoryLost, "gone").is_retryable());
        let regression = Error::Regression {
            stream: "s".into(),
            stored: ClusterTime::new(2, 0),
            attempted: ClusterTime::new(1, 0),
        };
        assert_eq!(regression.kind(), ErrorKind::Fatal);
        assert!(regression.to_string().contains("Timestamp(1, 0)"));
    }

    #[test]
    fn sources_are_kept() {
        use std::error::Error as _;
        let err = Error::store("orders", std::io::Error::other("disk full"));
        assert_eq!(
            err.source().map(ToString::to_string).as_deref(),
            Some("disk full")
        );
        assert!(err.to_string().contains("`orders`"));
    }
}
