//! Server errors as MongoDB reports them: a numeric code, its name, a message and labels.

use bson::{Document, doc};

/// A command failure, turned into an `ok: 0` reply.
#[derive(Clone, Debug, PartialEq)]
pub struct CmdError {
    /// The server error code.
    pub code: i32,
    /// The message.
    pub message: String,
    /// Error labels (`ResumableChangeStreamError`, `RetryableWriteError`, …).
    pub labels: Vec<String>,
}

/// Codes the simulator answers with, by name.
#[allow(missing_docs)] // the names are MongoDB's own
pub mod code {
    pub const BAD_VALUE: i32 = 2;
    pub const FAILED_TO_PARSE: i32 = 9;
    pub const UNAUTHORIZED: i32 = 13;
    pub const TYPE_MISMATCH: i32 = 14;
    pub const ILLEGAL_OPERATION: i32 = 20;
    pub const NAMESPACE_NOT_FOUND: i32 = 26;
    pub const INDEX_NOT_FOUND: i32 = 27;
    pub const CURSOR_NOT_FOUND: i32 = 43;
    pub const NO_MATCHING_DOCUMENT: i32 = 47;
    pub const NAMESPACE_EXISTS: i32 = 48;
    pub const COMMAND_NOT_FOUND: i32 = 59;
    pub const IMMUTABLE_FIELD: i32 = 66;
    pub const INVALID_OPTIONS: i32 = 72;
    pub const INVALID_NAMESPACE: i32 = 73;
    pub const WRITE_CONFLICT: i32 = 112;
    pub const INVALID_PIPELINE_OPERATOR: i32 = 168;
    pub const ELECTION_IN_PROGRESS: i32 = 216;
    pub const NO_SUCH_TRANSACTION: i32 = 251;
    pub const TRANSACTION_COMMITTED: i32 = 256;
    pub const INVALID_RESUME_TOKEN: i32 = 260;
    pub const CHANGE_STREAM_FATAL_ERROR: i32 = 280;
    pub const CHANGE_STREAM_HISTORY_LOST: i32 = 286;
    pub const NOT_WRITABLE_PRIMARY: i32 = 10107;
    pub const DUPLICATE_KEY: i32 = 11000;
    pub const UNRECOGNIZED_PIPELINE_STAGE: i32 = 40324;
}

/// The name MongoDB gives a code, for `codeName`.
pub fn code_name(code: i32) -> &'static str {
    use code::*;
    match code {
        BAD_VALUE => "BadValue",
        FAILED_TO_PARSE => "FailedToParse",
        UNAUTHORIZED => "Unauthorized",
        TYPE_MISMATCH => "TypeMismatch",
        ILLEGAL_OPERATION => "IllegalOperation",
        NAMESPACE_NOT_FOUND => "NamespaceNotFound",
        INDEX_NOT_FOUND => "IndexNotFound",
        CURSOR_NOT_FOUND => "CursorNotFound",
        NO_MATCHING_DOCUMENT => "NoMatchingDocument",
        NAMESPACE_EXISTS => "NamespaceExists",
        COMMAND_NOT_FOUND => "CommandNotFound",
        IMMUTABLE_FIELD => "ImmutableField",
        INVALID_OPTIONS => "InvalidOptions",
        INVALID_NAMESPACE => "InvalidNamespace",
        WRITE_CONFLICT => "WriteConflict",
        INVALID_PIPELINE_OPERATOR => "InvalidPipelineOperator",
        ELECTION_IN_PROGRESS => "ElectionInProgress",
        NO_SUCH_TRANSACTION => "NoSuchTransaction",
        TRANSACTION_COMMITTED => "TransactionCommitted",
        INVALID_RESUME_TOKEN => "InvalidResumeToken",
        CHANGE_STREAM_FATAL_ERROR => "ChangeStreamFatalError",
        CHANGE_STREAM_HISTORY_LOST => "ChangeStreamHistoryLost",
        NOT_WRITABLE_PRIMARY => "NotWritablePrimary",
        DUPLICATE_KEY => "DuplicateKey",
        6 => "HostUnreachable",
        7 => "HostNotFound",
        18 => "AuthenticationFailed",
        89 => "NetworkTimeout",
        91 => "ShutdownInProgress",
        189 => "PrimarySteppedDown",
        _ => "",
    }
}

impl CmdError {
    /// An error with a code and message, no labels.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            labels: Vec::new(),
        }
    }

    /// `BadValue` (2).
    pub fn bad_value(message: impl Into<String>) -> Self {
        Self::new(code::BAD_VALUE, message)
    }

    /// `TypeMismatch` (14) for a field of the wrong type.
    pub fn type_mismatch(field: &str, expected: &str) -> Self {
        Self::new(
            code::TYPE_MISMATCH,
            format!("BSON field '{field}' is the wrong type, expected {expected}"),
        )
    }

    /// Adds a label.
    #[must_use]
    pub fn with_label(mut self, label: &str) -> Self {
        self.labels.push(label.to_owned());
        self
    }

    /// The `ok: 0` reply body.
    pub fn to_document(&self) -> Document {
        let mut reply = doc! {
            "ok": 0.0,
            "errmsg": self.message.clone(),
            "code": self.code,
            "codeName": code_name(self.code),
        };
        if !self.labels.is_empty() {
            reply.insert("errorLabels", self.labels.clone());
        }
        reply
    }
}

impl std::fmt::Display for CmdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            code_name(self.code),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for CmdError {}

/// Result of a command.
pub type CmdResult<T = Document> = Result<T, CmdError>;
