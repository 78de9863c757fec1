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
    /// When this process saved the newest point.
    pub last_checkpoint_at: Option<std::time::SystemTime>,
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
    /// Events read from the stream (handled or not yet; events read again after a restart
    /// count again).
    pub read_events: u64,
    /// The newest cluster time the stream reported: an event's, or the position of an
    /// empty round trip (the server's time while nothing changes). With
    /// [`Stats::last_cluster_time`] it gives the lag: [`Stats::lag_seconds`].
    pub source_time: Option<ClusterTime>,
    /// Whether a change stream is open now.
    pub stream_open: bool,
}

impl Stats {
    /// Seconds the newest handled change is behind the newest position the stream
    /// reported (0 when caught up, or when nothing was reported yet).
    pub fn lag_seconds(&self) -> u64 {
        match (self.source_time, self.last_cluster_time) {
            (Some(source), Some(handled)) => u64::from(source.time.saturating_sub(handled.time)),
            _ => 0,
        }
    }
}

/// A processor's live counters, shared by its handle and its parts (run loop, lease
/// keeper, restart loop).
#[derive(Debug, Default)]
pub(crate) struct Counters(std::sync::Mutex<Stats>);

impl Counters {
    /// The counters, locked. Plain counters: a panic while holding the lock cannot break
    /// them, so a poisoned lock is used as it is.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
