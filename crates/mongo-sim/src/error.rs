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
    pub const INTERNAL_ERROR: i32 = 1;
    pub const BAD_VALUE: i32 = 2;
    pub const FAIL_POINT_SET_FAILED: i32 = 266;
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
    pub const SNAPSHOT_TOO_OLD: i32 = 239;
    pub const SNAPSHOT_UNAVAILABLE: i32 = 246;
    pub const INVALID_NAMESPACE: i32 = 73;
    pub const WRITE_CONFLICT: i32 = 112;
    pub const INVALID_PIPELINE_OPERATOR: i32 = 168;
    pub const OVERFLOW: i32 = 15;
    pub const OPERATION_FAILED: i32 = 96;
    pub const HOST_UNREACHABLE: i32 = 6;
    pub const COMMAND_NOT_SUPPORTED_ON_VIEW: i32 = 166;
    pub const OPERATION_NOT_SUPPORTED_IN_TRANSACTION: i32 = 263;
    pub const NOT_PRIMARY_NO_SECONDARY_OK: i32 = 13435;
    pub const BSON_OBJECT_TOO_LARGE: i32 = 10334;
    pub const EXCEEDED_TIME_LIMIT: i32 = 262;
    pub const ELECTION_IN_PROGRESS: i32 = 216;
    pub const NO_SUCH_TRANSACTION: i32 = 251;
    pub const TRANSACTION_COMMITTED: i32 = 256;
    pub const INVALID_RESUME_TOKEN: i32 = 260;
    pub const CHANGE_STREAM_FATAL_ERROR: i32 = 280;
    pub const CHANGE_STREAM_HISTORY_LOST: i32 = 286;
    pub const NOT_WRITABLE_PRIMARY: i32 = 10107;
    pub const DUPLICATE_KEY: i32 = 11000;
    pub const UNRECOGNIZED_PIPELINE_STAGE: i32 = 40324;
    /// `$options` given without `$regex`.
    pub const REGEX_OPTIONS_WITHOUT_REGEX: i32 = 51074;
    /// Options both in a regular expression given to `$regex` and in `$options`.
    pub const REGEX_OPTIONS_TWICE: i32 = 51075;
    /// A regular expression the server (here: the simulator) cannot compile.
    pub const REGEX_INVALID: i32 = 51091;
    /// An option letter other than `i`, `m`, `s`, `x`, `u`.
    pub const REGEX_BAD_OPTION: i32 = 51108;
}

/// MongoDB's named error codes (`src/mongo/base/error_codes.yml`), sorted by code.
const NAMES: &[(i32, &str)] = &[
    (1, "InternalError"),
    (2, "BadValue"),
    (4, "NoSuchKey"),
    (5, "GraphContainsCycle"),
    (6, "HostUnreachable"),
    (7, "HostNotFound"),
    (8, "UnknownError"),
    (9, "FailedToParse"),
    (10, "CannotMutateObject"),
    (11, "UserNotFound"),
    (12, "UnsupportedFormat"),
    (13, "Unauthorized"),
    (14, "TypeMismatch"),
    (15, "Overflow"),
    (16, "InvalidLength"),
    (17, "ProtocolError"),
    (18, "AuthenticationFailed"),
    (19, "CannotReuseObject"),
    (20, "IllegalOperation"),
    (21, "EmptyArrayOperation"),
    (22, "InvalidBSON"),
    (23, "AlreadyInitialized"),
    (24, "LockTimeout"),
    (25, "RemoteValidationError"),
    (26, "NamespaceNotFound"),
    (27, "IndexNotFound"),
    (28, "PathNotViable"),
    (29, "NonExistentPath"),
    (30, "InvalidPath"),
    (31, "RoleNotFound"),
    (32, "RolesNotRelated"),
    (33, "PrivilegeNotFound"),
    (34, "CannotBackfillArray"),
    (35, "UserModificationFailed"),
    (36, "RemoteChangeDetected"),
    (37, "FileRenameFailed"),
    (38, "FileNotOpen"),
    (39, "FileStreamFailed"),
    (40, "ConflictingUpdateOperators"),
    (41, "FileAlreadyOpen"),
    (42, "LogWriteFailed"),
    (43, "CursorNotFound"),
    (45, "UserDataInconsistent"),
    (46, "LockBusy"),
    (47, "NoMatchingDocument"),
    (48, "NamespaceExists"),
    (49, "InvalidRoleModification"),
    (50, "MaxTimeMSExpired"),
    (51, "ManualInterventionRequired"),
    (52, "DollarPrefixedFieldName"),
    (53, "InvalidIdField"),
    (54, "NotSingleValueField"),
    (55, "InvalidDBRef"),
    (56, "EmptyFieldName"),
    (57, "DottedFieldName"),
    (58, "RoleModificationFailed"),
    (59, "CommandNotFound"),
    (61, "ShardKeyNotFound"),
    (62, "OplogOperationUnsupported"),
    (63, "StaleShardVersion"),
    (64, "WriteConcernFailed"),
    (65, "MultipleErrorsOccurred"),
    (66, "ImmutableField"),
    (67, "CannotCreateIndex"),
    (68, "IndexAlreadyExists"),
    (69, "AuthSchemaIncompatible"),
    (70, "ShardNotFound"),
    (71, "ReplicaSetNotFound"),
    (72, "InvalidOptions"),
    (73, "InvalidNamespace"),
    (74, "NodeNotFound"),
    (75, "WriteConcernLegacyOK"),
    (76, "NoReplicationEnabled"),
    (77, "OperationIncomplete"),
    (78, "CommandResultSchemaViolation"),
    (79, "UnknownReplWriteConcern"),
    (80, "RoleDataInconsistent"),
    (81, "NoMatchParseContext"),
    (82, "NoProgressMade"),
    (83, "RemoteResultsUnavailable"),
    (85, "IndexOptionsConflict"),
    (86, "IndexKeySpecsConflict"),
    (87, "CannotSplit"),
    (89, "NetworkTimeout"),
    (90, "CallbackCanceled"),
    (91, "ShutdownInProgress"),
    (92, "SecondaryAheadOfPrimary"),
    (93, "InvalidReplicaSetConfig"),
    (94, "NotYetInitialized"),
    (95, "NotSecondary"),
    (96, "OperationFailed"),
    (97, "NoProjectionFound"),
    (98, "DBPathInUse"),
    (100, "UnsatisfiableWriteConcern"),
    (101, "OutdatedClient"),
    (102, "IncompatibleAuditMetadata"),
    (103, "NewReplicaSetConfigurationIncompatible"),
    (104, "NodeNotElectable"),
    (105, "IncompatibleShardingMetadata"),
    (106, "DistributedClockSkewed"),
    (107, "LockFailed"),
    (108, "InconsistentReplicaSetNames"),
    (109, "ConfigurationInProgress"),
    (110, "CannotInitializeNodeWithData"),
    (111, "NotExactValueField"),
    (112, "WriteConflict"),
    (113, "InitialSyncFailure"),
    (114, "InitialSyncOplogSourceMissing"),
    (115, "CommandNotSupported"),
    (116, "DocTooLargeForCapped"),
    (117, "ConflictingOperationInProgress"),
    (118, "NamespaceNotSharded"),
    (119, "InvalidSyncSource"),
    (120, "OplogStartMissing"),
    (121, "DocumentValidationFailure"),
    (123, "NotAReplicaSet"),
    (124, "IncompatibleElectionProtocol"),
    (125, "CommandFailed"),
    (126, "RPCProtocolNegotiationFailed"),
    (127, "UnrecoverableRollbackError"),
    (128, "LockNotFound"),
    (129, "LockStateChangeFailed"),
    (130, "SymbolNotFound"),
    (133, "FailedToSatisfyReadPreference"),
    (134, "ReadConcernMajorityNotAvailableYet"),
    (135, "StaleTerm"),
    (136, "CappedPositionLost"),
    (137, "IncompatibleShardingConfigVersion"),
    (138, "RemoteOplogStale"),
    (139, "JSInterpreterFailure"),
    (140, "InvalidSSLConfiguration"),
    (141, "SSLHandshakeFailed"),
    (142, "JSUncatchableError"),
    (143, "CursorInUse"),
    (144, "IncompatibleCatalogManager"),
    (145, "PooledConnectionsDropped"),
    (146, "ExceededMemoryLimit"),
    (147, "ZLibError"),
    (148, "ReadConcernMajorityNotEnabled"),
    (149, "NoConfigPrimary"),
    (150, "StaleEpoch"),
    (151, "OperationCannotBeBatched"),
    (152, "OplogOutOfOrder"),
    (153, "ChunkTooBig"),
    (154, "InconsistentShardIdentity"),
    (155, "CannotApplyOplogWhilePrimary"),
    (157, "CanRepairToDowngrade"),
    (158, "MustUpgrade"),
    (159, "DurationOverflow"),
    (160, "MaxStalenessOutOfRange"),
    (161, "IncompatibleCollationVersion"),
    (162, "CollectionIsEmpty"),
    (163, "ZoneStillInUse"),
    (164, "InitialSyncActive"),
    (165, "ViewDepthLimitExceeded"),
    (166, "CommandNotSupportedOnView"),
    (167, "OptionNotSupportedOnView"),
    (168, "InvalidPipelineOperator"),
    (169, "CommandOnShardedViewNotSupportedOnMongod"),
    (170, "TooManyMatchingDocuments"),
    (171, "CannotIndexParallelArrays"),
    (172, "TransportSessionClosed"),
    (173, "TransportSessionNotFound"),
    (174, "TransportSessionUnknown"),
    (175, "QueryPlanKilled"),
    (176, "FileOpenFailed"),
    (177, "ZoneNotFound"),
    (178, "RangeOverlapConflict"),
    (179, "WindowsPdhError"),
    (180, "BadPerfCounterPath"),
    (181, "AmbiguousIndexKeyPattern"),
    (182, "InvalidViewDefinition"),
    (183, "ClientMetadataMissingField"),
    (184, "ClientMetadataAppNameTooLarge"),
    (185, "ClientMetadataDocumentTooLarge"),
    (186, "ClientMetadataCannotBeMutated"),
    (187, "LinearizableReadConcernError"),
    (188, "IncompatibleServerVersion"),
    (189, "PrimarySteppedDown"),
    (190, "MasterSlaveConnectionFailure"),
    (192, "FailPointEnabled"),
    (193, "NoShardingEnabled"),
    (194, "BalancerInterrupted"),
    (195, "ViewPipelineMaxSizeExceeded"),
    (197, "InvalidIndexSpecificationOption"),
    (199, "ReplicaSetMonitorRemoved"),
    (200, "ChunkRangeCleanupPending"),
    (201, "CannotBuildIndexKeys"),
    (202, "NetworkInterfaceExceededTimeLimit"),
    (203, "ShardingStateNotInitialized"),
    (204, "TimeProofMismatch"),
    (205, "ClusterTimeFailsRateLimiter"),
    (206, "NoSuchSession"),
    (207, "InvalidUUID"),
    (208, "TooManyLocks"),
    (209, "StaleClusterTime"),
    (210, "CannotVerifyAndSignLogicalTime"),
    (211, "KeyNotFound"),
    (212, "IncompatibleRollbackAlgorithm"),
    (213, "DuplicateSession"),
    (214, "AuthenticationRestrictionUnmet"),
    (215, "DatabaseDropPending"),
    (216, "ElectionInProgress"),
    (217, "IncompleteTransactionHistory"),
    (218, "UpdateOperationFailed"),
    (219, "FTDCPathNotSet"),
    (220, "FTDCPathAlreadySet"),
    (221, "IndexModified"),
    (222, "CloseChangeStream"),
    (223, "IllegalOpMsgFlag"),
    (224, "QueryFeatureNotAllowed"),
    (225, "TransactionTooOld"),
    (226, "AtomicityFailure"),
    (227, "CannotImplicitlyCreateCollection"),
    (228, "SessionTransferIncomplete"),
    (229, "MustDowngrade"),
    (230, "DNSHostNotFound"),
    (231, "DNSProtocolError"),
    (232, "MaxSubPipelineDepthExceeded"),
    (233, "TooManyDocumentSequences"),
    (234, "RetryChangeStream"),
    (235, "InternalErrorNotSupported"),
    (236, "ForTestingErrorExtraInfo"),
    (237, "CursorKilled"),
    (238, "NotImplemented"),
    (239, "SnapshotTooOld"),
    (240, "DNSRecordTypeMismatch"),
    (241, "ConversionFailure"),
    (242, "CannotCreateCollection"),
    (243, "IncompatibleWithUpgradedServer"),
    (245, "BrokenPromise"),
    (246, "SnapshotUnavailable"),
    (247, "ProducerConsumerQueueBatchTooLarge"),
    (248, "ProducerConsumerQueueEndClosed"),
    (249, "StaleDbVersion"),
    (250, "StaleChunkHistory"),
    (251, "NoSuchTransaction"),
    (252, "ReentrancyNotAllowed"),
    (253, "FreeMonHttpInFlight"),
    (254, "FreeMonHttpTemporaryFailure"),
    (255, "FreeMonHttpPermanentFailure"),
    (256, "TransactionCommitted"),
    (257, "TransactionTooLarge"),
    (258, "UnknownFeatureCompatibilityVersion"),
    (259, "KeyedExecutorRetry"),
    (260, "InvalidResumeToken"),
    (261, "TooManyLogicalSessions"),
    (262, "ExceededTimeLimit"),
    (263, "OperationNotSupportedInTransaction"),
    (264, "TooManyFilesOpen"),
    (265, "OrphanedRangeCleanUpFailed"),
    (266, "FailPointSetFailed"),
    (267, "PreparedTransactionInProgress"),
    (268, "CannotBackup"),
    (269, "DataModifiedByRepair"),
    (270, "RepairedReplicaSetNode"),
    (271, "JSInterpreterFailureWithStack"),
    (272, "MigrationConflict"),
    (273, "ProducerConsumerQueueProducerQueueDepthExceeded"),
    (274, "ProducerConsumerQueueConsumed"),
    (275, "ExchangePassthrough"),
    (276, "IndexBuildAborted"),
    (277, "AlarmAlreadyFulfilled"),
    (278, "UnsatisfiableCommitQuorum"),
    (279, "ClientDisconnect"),
    (280, "ChangeStreamFatalError"),
    (281, "TransactionCoordinatorSteppingDown"),
    (282, "TransactionCoordinatorReachedAbortDecision"),
    (283, "WouldChangeOwningShard"),
    (284, "ForTestingErrorExtraInfoWithExtraInfoInNamespace"),
    (285, "IndexBuildAlreadyInProgressForCollection"),
    (286, "ChangeStreamHistoryLost"),
    (287, "TransactionCoordinatorDeadlineTaskCanceled"),
    (288, "ChecksumMismatch"),
    (289, "WaitForMajorityServiceEarlierOpTimeAvailable"),
    (290, "TransactionExceededLifetimeLimitSeconds"),
    (291, "NoQueryExecutionPlans"),
    (292, "QueryExceededMemoryLimitNoDiskUseAllowed"),
    (293, "InvalidSeedList"),
    (294, "InvalidTopologyType"),
    (295, "InvalidHeartBeatFrequency"),
    (296, "TopologySetNameRequired"),
    (297, "HierarchicalAcquisitionLevelViolation"),
    (298, "InvalidServerType"),
    (299, "OCSPCertificateStatusRevoked"),
    (
        300,
        "RangeDeletionAbandonedBecauseCollectionWithUUIDDoesNotExist",
    ),
    (301, "DataCorruptionDetected"),
    (302, "OCSPCertificateStatusUnknown"),
    (303, "SplitHorizonChange"),
    (304, "ShardInvalidatedForTargeting"),
    (307, "RangeDeletionAbandonedBecauseTaskDocumentDoesNotExist"),
    (308, "CurrentConfigNotCommittedYet"),
    (309, "ExhaustCommandFinished"),
    (310, "PeriodicJobIsStopped"),
    (311, "TransactionCoordinatorCanceled"),
    (312, "OperationIsKilledAndDelisted"),
    (313, "ResumableRangeDeleterDisabled"),
    (314, "ObjectIsBusy"),
    (315, "TooStaleToSyncFromSource"),
    (316, "QueryTrialRunCompleted"),
    (317, "ConnectionPoolExpired"),
    (318, "ForTestingOptionalErrorExtraInfo"),
    (319, "MovePrimaryInProgress"),
    (320, "TenantMigrationConflict"),
    (321, "TenantMigrationCommitted"),
    (322, "APIVersionError"),
    (323, "APIStrictError"),
    (324, "APIDeprecationError"),
    (325, "TenantMigrationAborted"),
    (326, "OplogQueryMinTsMissing"),
    (327, "NoSuchTenantMigration"),
    (328, "TenantMigrationAccessBlockerShuttingDown"),
    (329, "TenantMigrationInProgress"),
    (330, "SkipCommandExecution"),
    (331, "FailedToRunWithReplyBuilder"),
    (332, "CannotDowngrade"),
    (333, "ServiceExecutorInShutdown"),
    (334, "MechanismUnavailable"),
    (335, "TenantMigrationForgotten"),
    (9001, "SocketException"),
    (10003, "CannotGrowDocumentInCappedNamespace"),
    (10107, "NotWritablePrimary"),
    (10334, "BSONObjectTooLarge"),
    (11000, "DuplicateKey"),
    (11600, "InterruptedAtShutdown"),
    (11601, "Interrupted"),
    (11602, "InterruptedDueToReplStateChange"),
    (12586, "BackgroundOperationInProgressForDatabase"),
    (12587, "BackgroundOperationInProgressForNamespace"),
    (13113, "MergeStageNoMatchingDocument"),
    (13297, "DatabaseDifferCase"),
    (13388, "StaleConfig"),
    (13435, "NotPrimaryNoSecondaryOk"),
    (13436, "NotPrimaryOrSecondary"),
    (14031, "OutOfDiskSpace"),
    (46841, "ClientMarkedKilled"),
];

/// The name MongoDB gives a code, for `codeName`: its entry in the server's table, or
/// `Location<code>` for the numbered assertion codes that have no name (as the server
/// reports them).
pub fn code_name(code: i32) -> std::borrow::Cow<'static, str> {
    match NAMES.binary_search_by_key(&code, |&(c, _)| c) {
        Ok(i) => std::borrow::Cow::Borrowed(NAMES[i].1),
        Err(_) => std::borrow::Cow::Owned(format!("Location{code}")),
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
            "codeName": code_name(self.code).into_owned(),
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

/// Codes a 4.4+ server labels `ResumableChangeStreamError` when a change stream's
/// `getMore` fails with them: the retriable and network errors, the shard-retargeting
/// errors, `RetryChangeStream` and `FailedToSatisfyReadPreference`.
const RESUMABLE_CHANGE_STREAM_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    63,    // StaleShardVersion
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    133,   // FailedToSatisfyReadPreference
    150,   // StaleEpoch
    189,   // PrimarySteppedDown
    234,   // RetryChangeStream
    249,   // StaleDbVersion
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13388, // StaleConfig
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
];

/// Codes in the server's `NonResumableChangeStreamError` category.
const NON_RESUMABLE_CHANGE_STREAM_CODES: &[i32] = &[
    code::CHANGE_STREAM_FATAL_ERROR,
    code::CHANGE_STREAM_HISTORY_LOST,
];

/// The server's labelling of an error a change stream's `getMore` returns (injected ones
/// included): `ResumableChangeStreamError` for the codes above,
/// `NonResumableChangeStreamError` for fatal ones, nothing otherwise. Labels already on
/// the error are kept.
pub(crate) fn label_change_stream_error(mut e: CmdError) -> CmdError {
    let label = if RESUMABLE_CHANGE_STREAM_CODES.contains(&e.code) {
        "ResumableChangeStreamError"
    } else if NON_RESUMABLE_CHANGE_STREAM_CODES.contains(&e.code) {
        "NonResumableChangeStreamError"
    } else {
        return e;
    };
    if !e.labels.iter().any(|l| l == label) {
        e.labels.push(label.to_owned());
    }
    e
}

/// Result of a command.
pub type CmdResult<T = Document> = Result<T, CmdError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_table_is_sorted_and_unnamed_codes_are_locations() {
        assert!(
            NAMES.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted, no repeats"
        );
        assert_eq!(code_name(286), "ChangeStreamHistoryLost");
        assert_eq!(code_name(13435), "NotPrimaryNoSecondaryOk");
        assert_eq!(code_name(40324), "Location40324");
        let e = label_change_stream_error(CmdError::new(6, "x").with_label("Other"));
        assert_eq!(e.labels, ["Other", "ResumableChangeStreamError"]);
        assert!(
            label_change_stream_error(CmdError::new(50, "x"))
                .labels
                .is_empty()
        );
    }
}
