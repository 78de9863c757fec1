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
    239,   // SnapshotTooOld: a snapshot read outlived the history window; read anew
    246,   // SnapshotUnavailable: the snapshot is not yet available
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

/// The secrets of a MongoDB URI, as the driver's own parser reads it (no DNS lookup): the
/// password, an `AWS_SESSION_TOKEN` among `authMechanismProperties`, and the value of
/// `tlsCertificateKeyFilePassword`. `None` when the URI does not parse.
pub fn uri_secrets(uri: &str) -> Option<Vec<String>> {
    // `mongodb+srv` has the same syntax for secrets; this build's driver (without a DNS
    // resolver) refuses to parse it, so it is read as `mongodb`.
    let parsed = match uri.strip_prefix("mongodb+srv://") {
        Some(rest) => mongodb::options::ConnectionString::parse(format!("mongodb://{rest}")),
        None => mongodb::options::ConnectionString::parse(uri),
    }
    .ok()?;
    let mut secrets = Vec::new();
    if let Some(credential) = &parsed.credential {
        secrets.extend(credential.password.clone());
        if let Some(props) = &credential.mechanism_properties {
            secrets.extend(props.get_str("AWS_SESSION_TOKEN").ok().map(str::to_owned));
        }
    }
    // Whether or not this build of the driver reads it, the option holds a secret.
    if let Some((_, query)) = uri.split_once('?') {
        for pair in query.split('&') {
            if let Some((key, value)) = pair.split_once('=')
                && key.eq_ignore_ascii_case("tlsCertificateKeyFilePassword")
            {
                secrets.push(cdc_core::support::percent_decode_lossy(value));
            }
        }
    }
    Some(secrets)
}

/// A MongoDB URI fit to show: each secret the driver's parser finds in it (password,
/// `AWS_SESSION_TOKEN`, `tlsCertificateKeyFilePassword`) replaced by `***`, wherever and
/// however it is written; a URI that does not parse, or a secret written in a form not
/// recognised, shows only its scheme.
pub fn redact_uri(uri: &str) -> String {
    let hidden = || {
        let scheme = uri.split_once("://").map_or("mongodb", |(s, _)| s);
        format!("{scheme}://(hidden: the URI could not be checked for secrets)")
    };
    let Some(secrets) = uri_secrets(uri) else {
        return hidden();
    };
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    cdc_core::support::redact_secrets(uri, &secrets).unwrap_or_else(hidden)
}

/// `message` with the secrets of `uri` taken out (a driver message may quote the URI).
pub(crate) fn scrub(message: &str, uri: &str) -> String {
    let secrets = uri_secrets(uri).unwrap_or_default();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    cdc_core::support::redact_secrets(message, &secrets)
        .unwrap_or_else(|| "(the message is hidden: it holds a secret of the URI)".to_owned())
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
        assert_eq!(
            redact_uri("mongodb://h1/?replicaSet=rs"),
            "mongodb://h1/?replicaSet=rs"
        );
        assert_eq!(redact_uri("mongodb://ada@h1"), "mongodb://ada@h1");
        assert_eq!(
            redact_uri("mongodb+srv://a:p%40ss@c.example.com/"),
            "mongodb+srv://a:***@c.example.com/"
        );
        assert_eq!(
            uri_secrets("mongodb://a:p%40ss@h/"),
            Some(vec!["p@ss".to_owned()])
        );
        assert_eq!(uri_secrets("mongodb://h/"), Some(vec![]));
        assert!(redact_uri("mongodb://a:b@").contains("hidden"));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    fn secret() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                proptest::char::range('a', 'z'),
                proptest::char::range('0', '9'),
                proptest::sample::select(vec![
                    '/', '?', '@', ':', '=', '&', '#', '%', ' ', '+', ',', ';', '\'', 'é',
                ]),
            ],
            8..24,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    proptest! {
        #[test]
        fn mongodb_secrets_never_show(secret in secret(), user in "[a-z]{1,8}") {
            let e = encode(&secret);
            let forms = [
                format!("mongodb://{user}:{e}@h1:27017,h2/db?replicaSet=rs"),
                format!("mongodb+srv://{user}:{e}@cluster0.example.net/"),
                format!("mongodb://{user}:{e}@h/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:{e}"),
                format!("mongodb://h/?tls=true&tlsCertificateKeyFile=/k.pem&tlsCertificateKeyFilePassword={e}"),
            ];
            for form in forms {
                let shown = super::redact_uri(&form);
                let decoded = cdc_core::support::percent_decode_lossy(&shown);
                prop_assert!(
                    !shown.contains(&secret) && !shown.contains(&e) && !decoded.contains(&secret),
                    "{form} -> {shown}"
                );
                // Where this build's driver reads the URI, it is shown with the secret
                // replaced, not hidden whole (a URI it refuses, such as MONGODB-AWS
                // without that feature, is hidden).
                if super::uri_secrets(&form).is_some() {
                    prop_assert!(shown.contains("***") && !shown.contains("hidden"), "{form} -> {shown}");
                }
            }
            let plain = format!("mongodb://{user}@h1:27017/db?replicaSet=rs");
            prop_assert_eq!(super::redact_uri(&plain), plain);
            let with_password = format!("mongodb://{user}:{e}@h1:27017,h2/db");
            prop_assert!(super::uri_secrets(&with_password).is_some());
        }
    }
}
