//! Oplog headroom: how long until a stored resume point falls off the oplog.
//!
//! A change stream resumes only from a point the oplog still holds. The oplog keeps a
//! window of history (its oldest entry to its newest); as writes come in, the oldest
//! entries are dropped, and a stored point older than the oldest entry can no longer be
//! resumed from (the server answers `ChangeStreamHistoryLost`). The *headroom* is the
//! stored point's distance from the oldest entry: with writes coming at the rate they
//! came, about how long the point has before it falls off. These are the figures
//! `rs.printReplicationInfo()` prints, with the point added.

use crate::ClusterTime;

/// The oldest and newest entries of a deployment's oplog, by cluster time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OplogWindow {
    /// The oldest entry still kept.
    pub oldest: ClusterTime,
    /// The newest entry.
    pub newest: ClusterTime,
}

impl OplogWindow {
    /// A window from its ends.
    pub const fn new(oldest: ClusterTime, newest: ClusterTime) -> Self {
        Self { oldest, newest }
    }

    /// Seconds of history the oplog holds (newest − oldest).
    pub fn window_seconds(&self) -> u32 {
        self.newest.time.saturating_sub(self.oldest.time)
    }

    /// Seconds between the oldest entry and `point`: how long the point has before it
    /// falls off, while writes keep the pace they had. Negative when the point is older
    /// than the oldest entry (it has fallen off: a resume from it fails).
    pub fn headroom_seconds(&self, point: ClusterTime) -> i64 {
        i64::from(point.time) - i64::from(self.oldest.time)
    }

    /// Whether `point` can still be resumed from (the oplog holds it or what follows it).
    pub fn holds(&self, point: ClusterTime) -> bool {
        point >= self.oldest
    }

    /// The headroom as a share of the window (1.0: the point is the newest entry; 0.0 or
    /// less: at or past the oldest). `None` for a window of no length (nothing to share).
    pub fn headroom_share(&self, point: ClusterTime) -> Option<f64> {
        let window = self.window_seconds();
        (window > 0).then(|| self.headroom_seconds(point) as f64 / f64::from(window))
    }
}

/// What a source can tell of its deployment's oplog.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OplogView {
    /// The oplog's oldest and newest entries.
    Window(OplogWindow),
    /// The oplog holds no entry yet: nothing was written since the replica set began (a
    /// server writes a no-op at least every 10 s, so this does not last).
    Empty,
    /// The source cannot read it, and why (the user may not read `local.oplog.rs`, the
    /// deployment is a sharded cluster's router, the source is not
    /// MongoDB): for an operator, said once; the figures are left out.
    Unreadable(String),
}

/// The oplog window and the stored point it is judged against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OplogHeadroom {
    /// What the source told of its oplog.
    pub view: OplogView,
    /// The stored point's cluster time (`None`: no point stored yet).
    pub point: Option<ClusterTime>,
}

impl OplogHeadroom {
    /// The window, when the oplog could be read.
    pub fn window(&self) -> Option<&OplogWindow> {
        match &self.view {
            OplogView::Window(w) => Some(w),
            OplogView::Empty | OplogView::Unreadable(_) => None,
        }
    }

    /// Seconds of history the oplog holds, when it could be read.
    pub fn window_seconds(&self) -> Option<u32> {
        self.window().map(OplogWindow::window_seconds)
    }

    /// The stored point's headroom in seconds, when both are known.
    pub fn headroom_seconds(&self) -> Option<i64> {
        Some(self.window()?.headroom_seconds(self.point?))
    }

    /// The headroom as a share of the window, when both are known.
    pub fn headroom_share(&self) -> Option<f64> {
        self.window()?.headroom_share(self.point?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(time: u32, increment: u32) -> ClusterTime {
        ClusterTime::new(time, increment)
    }

    #[test]
    fn the_headroom_is_the_points_distance_from_the_oldest_entry() {
        let w = OplogWindow::new(t(1_000, 3), t(1_400, 1));
        assert_eq!(w.window_seconds(), 400);
        assert_eq!(w.headroom_seconds(t(1_100, 9)), 100);
        assert_eq!(w.headroom_share(t(1_100, 9)), Some(0.25));
        assert!(w.holds(t(1_000, 3)));
        assert!(
            !w.holds(t(1_000, 2)),
            "one increment before the oldest is gone"
        );
        assert_eq!(w.headroom_seconds(t(990, 1)), -10);
        assert_eq!(
            OplogWindow::new(t(5, 1), t(5, 9)).headroom_share(t(5, 2)),
            None
        );
    }

    #[test]
    fn figures_are_left_out_when_the_oplog_or_the_point_is_unknown() {
        let w = OplogWindow::new(t(1_000, 1), t(1_060, 1));
        let known = OplogHeadroom {
            view: OplogView::Window(w),
            point: Some(t(1_045, 1)),
        };
        assert_eq!(known.window_seconds(), Some(60));
        assert_eq!(known.headroom_seconds(), Some(45));
        let no_point = OplogHeadroom {
            point: None,
            ..known.clone()
        };
        assert_eq!(no_point.window_seconds(), Some(60));
        assert_eq!(no_point.headroom_seconds(), None);
        let unreadable = OplogHeadroom {
            view: OplogView::Unreadable("not allowed".into()),
            point: Some(t(1_045, 1)),
        };
        assert_eq!(unreadable.window_seconds(), None);
        assert_eq!(unreadable.headroom_seconds(), None);
        assert_eq!(unreadable.headroom_share(), None);
    }
}
