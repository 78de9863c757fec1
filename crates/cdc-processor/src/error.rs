//! Errors of the processor.

use cdc_core::ErrorKind;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The one error of this crate's API: connecting ([`crate::connect`]), opening stores
/// ([`crate::stores::open`]), building, running, replaying. Match on the variant, or ask
/// [`Error::kind`], [`Error::is_retryable`], and for a server's refusal [`Error::code`]
/// and [`Error::labels`]; the cause chain (`std::error::Error::source`) is kept, down to
/// the driver's error. A clone is the same error: the same kind and the same typed cause.
/// Its text and `Debug` never show a password or token (they are redacted where the
/// error is made).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The source, the store, a handler or the protocol failed; the kind says which.
    #[error(transparent)]
    Cdc(#[from] cdc_core::Error),
    /// Connecting to MongoDB, or a call of the MongoDB adapter, failed.
    #[error(transparent)]
    Mongo(std::sync::Arc<cdc_mongo::Error>),
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
    /// The builder (or a handler's limits) refused a setting: see [`BuildError`].
    #[error("invalid processor configuration: {0}")]
    Build(#[from] BuildError),
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
            Self::Mongo(e) => e.kind(),
            Self::StoreTimeout { .. } => ErrorKind::Store,
            Self::AlreadyRunning(_)
            | Self::NotRunning(_)
            | Self::Stopped(_)
            | Self::Invalidated(_)
            | Self::Build(_) => ErrorKind::Fatal,
        }
    }

    /// Whether a retry loop should try again after a backoff.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    /// The server's error code, when the server refused (anywhere down the cause chain):
    /// 286 for lost history, 13 for no permission, 11000 for a duplicate key, ….
    pub fn code(&self) -> Option<i32> {
        self.chain().find_map(|e| {
            if let Some(cdc_mongo::Error::Unsupported { code, .. }) =
                e.downcast_ref::<cdc_mongo::Error>()
            {
                return Some(*code);
            }
            e.downcast_ref::<cdc_mongo::mongodb::error::Error>()
                .and_then(cdc_mongo::server_code)
        })
    }

    /// The server's or the driver's error labels (`ResumableChangeStreamError`,
    /// `TransientTransactionError`, …), sorted; empty when the error did not come from
    /// the driver.
    pub fn labels(&self) -> Vec<&str> {
        let mut labels: Vec<&str> = self
            .chain()
            .find_map(|e| e.downcast_ref::<cdc_mongo::mongodb::error::Error>())
            .map(|e| e.labels().iter().map(String::as_str).collect())
            .unwrap_or_default();
        labels.sort_unstable();
        labels
    }

    /// This error's causes, from the first typed one down.
    fn chain(&self) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
        let first: Option<&(dyn std::error::Error + 'static)> = match self {
            Self::Cdc(e) => Some(e),
            Self::Mongo(e) => Some(&**e),
            _ => None,
        };
        std::iter::successors(first, |e| e.source())
    }
}

impl From<cdc_mongo::Error> for Error {
    fn from(e: cdc_mongo::Error) -> Self {
        Self::Mongo(std::sync::Arc::new(e))
    }
}

/// A setting [`crate::Builder::build`] refused, naming it (and, for a contradiction, the setting
/// it contradicts) as the builder spells them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A setting every processor needs was not given.
    #[error("`{setting}` is required: {hint}")]
    Missing {
        /// The missing setting.
        setting: &'static str,
        /// How to give it.
        hint: &'static str,
    },
    /// A setting's value is out of its range.
    #[error("`{setting}` is invalid: {reason}")]
    Invalid {
        /// The setting.
        setting: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// Two settings contradict each other.
    #[error("`{setting}` contradicts `{other}`: {reason}")]
    Conflict {
        /// The setting refused.
        setting: &'static str,
        /// The setting it contradicts.
        other: &'static str,
        /// Why they cannot both hold.
        reason: &'static str,
    },
}

impl BuildError {
    /// Refuses the first of `bounds` that is 0, named as its setter spells it.
    pub(crate) fn at_least_one(bounds: &[(&'static str, usize)]) -> Result<(), Self> {
        match bounds.iter().find(|(_, value)| *value == 0) {
            Some((setting, _)) => Err(Self::Invalid {
                setting,
                reason: "must be at least 1".into(),
            }),
            None => Ok(()),
        }
    }
}
