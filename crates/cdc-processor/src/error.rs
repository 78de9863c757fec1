//! Errors of the processor.

use cdc_core::ErrorKind;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a processor stopped or could not be built. A clone is the same error: the same
/// kind and the same typed cause (see `cdc_core::Error::cause`).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The source, the store, a handler or the protocol failed; the kind says which.
    #[error(transparent)]
    Cdc(#[from] cdc_core::Error),
    /// `start` was called while the processor was already running.
    #[error("the processor for stream `{0}` is already running")]
    AlreadyRunning(String),
    /// The stream was invalidated (its collection dropped or renamed) and the invalidate
    /// policy is to stop. The invalidate point is stored; a new start continues after it.
    #[error(
        "stream `{0}` was invalidated (collection dropped or renamed) and the policy is to stop"
    )]
    Invalidated(String),
    /// `start` was called on a processor that was stopped: a processor runs once; build
    /// another to run again.
    #[error("the processor for stream `{0}` was stopped; build a new one to run again")]
    Stopped(String),
    /// A call that needs a running processor (a snapshot request) came while it was not
    /// running.
    #[error("the processor for stream `{0}` is not running")]
    NotRunning(String),
    /// The builder was given an inconsistent configuration.
    #[error("invalid processor configuration: {0}")]
    Config(String),
    /// A resume store call did not answer in time.
    #[error("resume store did not answer within {} s for stream `{stream}`", timeout.as_secs_f64())]
    StoreTimeout {
        /// The stream.
        stream: String,
        /// The timeout (sub-second ones kept).
        timeout: std::time::Duration,
    },
}

impl Error {
    /// How the error is classified.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Cdc(e) => e.kind(),
            Self::StoreTimeout { .. } => ErrorKind::Store,
            Self::AlreadyRunning(_)
            | Self::NotRunning(_)
            | Self::Stopped(_)
            | Self::Invalidated(_)
            | Self::Config(_) => ErrorKind::Fatal,
        }
    }

    /// Whether a retry loop should try again after a backoff.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}
