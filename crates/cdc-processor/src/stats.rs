//! A snapshot of what a processor has done.

use std::collections::BTreeMap;

use cdc_core::{ClusterTime, HistoryGap};

/// Counters and positions of a processor, as of the moment it was taken.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Stats {
    /// Events handled successfully, by operation type.
    pub events_by_type: BTreeMap<String, u64>,
    /// Events handled successfully in all.
    pub events: u64,
    /// The cluster time of the newest event handled.
    pub last_cluster_time: Option<ClusterTime>,
    /// The cluster time of the newest point saved in the store.
    pub last_checkpoint: Option<ClusterTime>,
    /// Points saved.
    pub checkpoints: u64,
    /// Handled events not yet covered by a saved point.
    pub checkpoint_lag_events: u64,
    /// Seconds between the newest handled event and the newest saved point.
    pub checkpoint_lag_seconds: u64,
    /// Runs that ended in an error and were started again.
    pub restarts: u64,
    /// Streams reopened in-process after an invalidate.
    pub reopens: u64,
    /// Events the handler kept failing on that were skipped (`on_handler_error: skip`).
    pub skipped_events: u64,
    /// Events recorded as dead letters by this processor (parked ones included).
    pub dead_letters: u64,
    /// The last error, as text.
    pub last_error: Option<String>,
    /// The last history gap skipped (under the restart-from-now policy).
    pub last_gap: Option<HistoryGap>,
    /// How far the latest snapshot's reading got (documents, chunks, rate), if one ran.
    pub snapshot: Option<cdc_core::SnapshotProgress>,
    /// The fencing token of the lease this instance holds now (with a leased store).
    pub lease_token: Option<u64>,
    /// Whether this instance stands by while another holds the lease.
    pub standby: bool,
    /// Times this instance acquired the lease.
    pub leases_acquired: u64,
}
