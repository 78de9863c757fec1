//! Errors of `cdc-mongo`, and their classification by server code and error label —
//! never by message text.

use cdc_core::ErrorKind;
use mongodb::error::{Error as DriverError, ErrorKind as DriverKind, WriteFailure};

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the MongoDB adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The driver failed; `kind` says what it means for a retry loop.
    #[error("MongoDB {operation} failed ({kind:?}): {source}")]
    Driver {
        /// What was being done.
        operation: &'static str,
        /// The classification.
        kind: ErrorKind,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// Connecting failed. The URI and reason are shown with any password replaced.
    #[error("cannot connect to {uri}: {reason}")]
    Connect {
        /// The URI, password redacted.
        uri: String,
        /// What went wrong, password redacted.
        reason: String,
        /// The classification.
        kind: ErrorKind,
    },
    /// The server does not support a feature this call needs.
    #[error("{feature} is not supported by this server (code {code}): {message}")]
    Unsupported {
        /// The feature.
        feature: &'static str,
        /// The server's error code.
        code: i32,
        /// The server's message.
        message: String,
    },
    /// A change event from the server could not be decoded.
    #[error("undecodable change event: {0}")]
    Decode(#[source] cdc_core::Error),
    /// A change event exceeds 16 MiB (BSONObjectTooLarge, 10334) and the stream does not
    /// split large events. Not retryable: the same event fails again.
    #[error(
        "a change event exceeds 16 MiB (BSONObjectTooLarge, code 10334): enable \
         SourceOptions::split_large_events (the $changeStreamSplitLargeEvent stage, MongoDB \
         7.0 or 6.0.9+), or $project the large fields away"
    )]
    EventTooLarge(#[source] DriverError),
    /// The fragments of a split event did not arrive as the server promises (out of
    /// sequence, malformed `splitEvent`), or a stream resumed in the middle of a split
    /// event whose start cannot be found.
    #[error("split change event: {0}")]
    SplitEvent(String),
}

impl Error {
    /// Wraps a driver error, classifying it.
    pub fn driver(operation: &'static str, source: DriverError) -> Self {
        Self::Driver {
            operation,
            kind: classify(&source),
            source,
        }
    }

    /// How the error is classified.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Driver { kind, .. } | Self::Connect { kind, .. } => *kind,
            Self::Unsupported { .. }
            | Self::Decode(_)
            | Self::EventTooLarge(_)
            | Self::SplitEvent(_) => ErrorKind::Fatal,
        }
    }
}

impl From<Error> for cdc_core::Error {
    fn from(e: Error) -> Self {
        cdc_core::Error::source(e.kind(), e)
    }
}

/// The server's error code, if the error came from the server.
pub fn server_code(e: &DriverError) -> Option<i32> {
    match e.kind.as_ref() {
        DriverKind::Command(c) => Some(c.code),
        DriverKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        DriverKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        _ => None,
    }
}

/// Codes that mean "try again": elections, shutdowns, network trouble seen by the server.
const TRANSIENT_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    43,    // CursorNotFound
    63,    // StaleShardVersion
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    133,   // FailedToSatisfyReadPreference
    150,   // StaleEpoch
    189,   // PrimarySteppedDown
    216,   // ElectionInProgress
    234,   // RetryChangeStream
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13388, // StaleConfig
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
];

/// Codes of a pipeline or option the server refuses: retrying cannot help.
const BAD_REQUEST_CODES: &[i32] = &[
    2,     // BadValue
    9,     // FailedToParse
    14,    // TypeMismatch
    40323, // stage specification must have exactly one field
    40324, // unrecognized pipeline stage
    40415, // unknown field in $changeStream
    40573, // change streams need a replica set
    40602, // $changeStream is only valid as the first stage
    15983, // bad expression
    168,   // InvalidPipelineOperator
    31254, // exclusion and inclusion in one projection
];

/// Classifies a driver error for the retry loop: by server code first, then by error
/// label, then by the driver's error kind.
pub fn classify(e: &DriverError) -> ErrorKind {
    match server_code(e) {
        Some(286) => return ErrorKind::HistoryLost,
        Some(47) => return ErrorKind::PreImageMissing,
        Some(260 | 280) => return ErrorKind::InvalidToken,
        Some(13 | 18 | 10334) => return ErrorKind::Fatal,
        Some(code) if BAD_REQUEST_CODES.contains(&code) => return ErrorKind::Fatal,
        _ => {}
    }
    if e.contains_label("ResumableChangeStreamError")
        || e.contains_label("RetryableWriteError")
        || e.contains_label("TransientTransactionError")
    {
        return ErrorKind::Transient;
    }
    if let Some(code) = server_code(e) {
        return if TRANSIENT_CODES.contains(&code) {
            ErrorKind::Transient
        } else {
            ErrorKind::Fatal
        };
    }
    match e.kind.as_ref() {
        DriverKind::Io(_)
        | DriverKind::ConnectionPoolCleared { .. }
        | DriverKind::ServerSelection { .. }
        | DriverKind::DnsResolve { .. } => ErrorKind::Transient,
        DriverKind::Authentication { .. } => ErrorKind::Fatal,
        _ => ErrorKind::Fatal,
    }
}

/// Replaces the password of a `mongodb://user:password@host` URI with `***`.
pub fn redact_uri(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://") else {
        return uri.to_owned();
    };
    let rest = &uri[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return uri.to_owned();
    };
    let userinfo = &authority[..at];
    let redacted = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => userinfo.to_owned(),
    };
    format!("{}{}{}", &uri[..scheme_end + 3], redacted, &rest[at..])
}

/// The password of a URI, if it has one (to scrub it from messages).
pub(crate) fn uri_password(uri: &str) -> Option<String> {
    let rest = &uri[uri.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    let password = &userinfo[userinfo.find(':')? + 1..];
    (!password.is_empty()).then(|| password.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction() {
        assert_eq!(
            redact_uri("mongodb://ada:s3cret@h1:27017,h2/db?replicaSet=rs"),
            "mongodb://ada:***@h1:27017,h2/db?replicaSet=rs"
        );
        assert_eq!(redact_uri("mongodb://h1/?x=1"), "mongodb://h1/?x=1");
        assert_eq!(redact_uri("mongodb://ada@h1"), "mongodb://ada@h1");
        assert_eq!(
            redact_uri("mongodb+srv://a:p%40ss@c.example/"),
            "mongodb+srv://a:***@c.example/"
        );
        assert_eq!(
            uri_password("mongodb://a:p%40ss@h/").as_deref(),
            Some("p%40ss")
        );
        assert_eq!(uri_password("mongodb://h/"), None);
    }
}
