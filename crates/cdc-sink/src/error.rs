//! The sinks' error: what failed, and whether it is an outage to wait out or a change the
//! sink refuses — a kind, never a test of the message's text.

use cdc_core::BoxError;

/// What a sink's failure means for the change being written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The sink's service is away or refused for now (connection lost, no responders, a
    /// server shutting down, a serialization failure): the change is fine and is written
    /// once the service is back; the processor waits it out, never skipping the change.
    Outage,
    /// The service refused this change (a value the database refuses, a message over its
    /// size limit, an event with nothing to write): it goes to the handler-error policy.
    Refused,
    /// Writing the output failed (a closed pipe, a full disk).
    Output,
    /// The sink is set up or used in a way that cannot work (a subject template or body
    /// format that does not parse, a collection name that cannot be a table, checkpoints
    /// with lanes, a sink on a given client that cannot reconnect).
    Config,
    /// Another instance holds the stream's lease: nothing of the batch was written.
    Fenced,
}

/// A sink's error. Its text names the service and what it said; it never holds a
/// password (the sinks are given connected clients).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The sink's service is unavailable ([`ErrorKind::Outage`]).
    #[error("{service} is unavailable: {reason}")]
    Unavailable {
        /// The service, as in `NATS JetStream`.
        service: &'static str,
        /// What was being done and what the client said.
        reason: String,
        /// The client's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The service refused the change ([`ErrorKind::Refused`]).
    #[error("{service} refused the change: {reason}")]
    Refused {
        /// The service.
        service: &'static str,
        /// Why.
        reason: String,
        /// The client's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// Writing the output failed ([`ErrorKind::Output`]).
    #[error("writing the output failed: {0}")]
    Output(#[source] std::io::Error),
    /// A setting or a use that cannot work ([`ErrorKind::Config`]).
    #[error("{0}")]
    Config(String),
    /// The resume store the sink checkpoints in failed, or its lease is held by another
    /// instance: [`ErrorKind::Outage`] for a store that is away, [`ErrorKind::Fenced`]
    /// when another instance holds the stream, else [`ErrorKind::Config`].
    #[error(transparent)]
    Store(cdc_core::Error),
}

impl Error {
    /// What the failure means.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Unavailable { .. } => ErrorKind::Outage,
            Self::Refused { .. } => ErrorKind::Refused,
            Self::Output(_) => ErrorKind::Output,
            Self::Config(_) => ErrorKind::Config,
            Self::Store(e) => match e.kind() {
                cdc_core::ErrorKind::Fenced => ErrorKind::Fenced,
                k if k.is_retryable() => ErrorKind::Outage,
                _ => ErrorKind::Config,
            },
        }
    }

    pub(crate) fn unavailable(
        service: &'static str,
        reason: impl Into<String>,
        source: impl Into<Option<BoxError>>,
    ) -> Self {
        Self::Unavailable {
            service,
            reason: reason.into(),
            source: source.into(),
        }
    }

    pub(crate) fn refused(
        service: &'static str,
        reason: impl Into<String>,
        source: impl Into<Option<BoxError>>,
    ) -> Self {
        Self::Refused {
            service,
            reason: reason.into(),
            source: source.into(),
        }
    }

    /// The error as a batch handler returns it to the processor: an outage as a
    /// `cdc_core::Error::Unavailable` (which the processor waits out) with this error as
    /// its cause, anything else as it is.
    pub fn into_handler_error(self) -> BoxError {
        match self {
            // The store's own error: the processor reads its kind (fenced, store).
            Self::Store(e) => e.into(),
            _ if self.kind() == ErrorKind::Outage => {
                let service = match &self {
                    Self::Unavailable { service, .. } => *service,
                    _ => "the sink",
                };
                cdc_core::Error::unavailable(service, self).into()
            }
            _ => self.into(),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::Output(e)
    }
}

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
