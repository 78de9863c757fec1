//! The delivery protocol as an I/O-free state machine: which resume point to persist, and
//! when.
//!
//! The caller (the processor) owns the I/O. For each event it receives it calls
//! [`Checkpointer::track`], runs the handlers, then [`Checkpointer::ack`]s the event. When
//! the machine answers with a point, the caller saves it and reports success with
//! [`Checkpointer::confirm`]. Between events, [`Checkpointer::idle`] offers the cursor's
//! post-batch resume token and [`Checkpointer::tick`] lets time-based flushes happen.
//!
//! Rules (see `docs/SEMANTICS.md`):
//! 1. A point is offered for saving only once every event up to it has been acknowledged
//!    (the low watermark), so a stored point never passes an unprocessed event.
//! 2. At most [`CheckpointPolicy::max_events`] acknowledged events are ever unsaved: when
//!    that many are waiting, [`Checkpointer::track`] refuses new events until a save is
//!    confirmed. This bounds the events delivered again after a crash.
//! 3. Offered points never move backwards in cluster time.
//! 4. A post-batch token is taken only when nothing is outstanding, and saved at most once
//!    per [`CheckpointPolicy::idle_interval`] while no event is waiting, so a quiet stream's
//!    point stays inside the oplog window at the cost of one write per interval.
//! 5. An `invalidate` point is offered at once: the next start must use `startAfter` it.

use std::{collections::VecDeque, num::NonZeroU32, time::Duration, time::Instant};

use crate::{ClusterTime, Error, Result, ResumePoint, ResumeToken, StartPosition};

/// When acknowledged events are persisted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointPolicy {
    max_events: NonZeroU32,
    max_interval: Duration,
    idle_interval: Duration,
}

impl Default for CheckpointPolicy {
    /// Batched: at most 100 events or 1 second, whichever comes first; idle tokens at most
    /// once a minute.
    fn default() -> Self {
        Self {
            max_events: NonZeroU32::new(100).unwrap_or(NonZeroU32::MIN),
            max_interval: Duration::from_secs(1),
            idle_interval: Duration::from_secs(60),
        }
    }
}

impl CheckpointPolicy {
    /// Persist after every acknowledged event: at most one event delivered again after a
    /// crash, one store write per event.
    pub fn every_event() -> Self {
        Self {
            max_events: NonZeroU32::MIN,
            max_interval: Duration::ZERO,
            ..Self::default()
        }
    }

    /// Persist once `max_events` events are acknowledged or `max_interval` has passed since
    /// the oldest unsaved acknowledgement, whichever comes first.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `max_events` is zero.
    pub fn batched(max_events: u32, max_interval: Duration) -> Result<Self> {
        let max_events = NonZeroU32::new(max_events).ok_or(Error::InvalidArgument {
            name: "max_events",
            reason: "must be at least 1".into(),
        })?;
        Ok(Self {
            max_events,
            max_interval,
            ..Self::default()
        })
    }

    /// How often, at most, a post-batch resume token is saved while no event is waiting.
    #[must_use]
    pub fn with_idle_interval(mut self, idle_interval: Duration) -> Self {
        self.idle_interval = idle_interval;
        self
    }

    /// The most acknowledged events left unsaved; also the most events delivered again
    /// after a crash.
    pub fn max_events(&self) -> u32 {
        self.max_events.get()
    }

    /// The longest an acknowledged event stays unsaved while events flow.
    pub fn max_interval(&self) -> Duration {
        self.max_interval
    }

    /// The shortest time between two saves of idle post-batch tokens.
    pub fn idle_interval(&self) -> Duration {
        self.idle_interval
    }
}

/// The sequence number of a tracked event, handed back to [`Checkpointer::ack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(u64);

#[derive(Debug)]
struct Outstanding {
    seq: u64,
    point: ResumePoint,
    acked: bool,
}

#[derive(Debug)]
struct Pending {
    point: ResumePoint,
    /// Acknowledged events covered by `point` and not yet saved.
    events: u32,
    /// When the oldest of those events was acknowledged; `None` while the point is a
    /// post-batch token with no event behind it.
    since: Option<Instant>,
    /// `since` plus the policy's `max_interval` (`None` when that overflows: never due
    /// by time), worked out once rather than for every event.
    due_at: Option<Instant>,
}

/// The delivery protocol's state for one stream. See the module docs.
#[derive(Debug)]
pub struct Checkpointer {
    policy: CheckpointPolicy,
    next_seq: u64,
    outstanding: VecDeque<Outstanding>,
    persisted: Option<ResumePoint>,
    pending: Option<Pending>,
    last_save: Instant,
    latest_time: Option<ClusterTime>,
}

impl Checkpointer {
    /// A machine starting from the point the store holds (`None`: no point yet).
    pub fn new(policy: CheckpointPolicy, persisted: Option<ResumePoint>, now: Instant) -> Self {
        let latest_time = persisted.as_ref().map(|p| p.cluster_time);
        Self {
            policy,
            next_seq: 0,
            outstanding: VecDeque::new(),
            persisted,
            pending: None,
            last_save: now,
            latest_time,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &CheckpointPolicy {
        &self.policy
    }

    /// The last point confirmed saved.
    pub fn persisted(&self) -> Option<&ResumePoint> {
        self.persisted.as_ref()
    }

    /// The newest acknowledged point not yet confirmed saved.
    pub fn pending(&self) -> Option<&ResumePoint> {
        self.pending.as_ref().map(|p| &p.point)
    }

    /// Acknowledged events not yet saved.
    pub fn unsaved_events(&self) -> u32 {
        self.pending.as_ref().map_or(0, |p| p.events)
    }

    /// Events tracked but not yet behind the low watermark.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// The newest cluster time seen in a tracked event or a stored point.
    pub fn latest_time(&self) -> Option<ClusterTime> {
        self.latest_time
    }

    /// Whether [`Checkpointer::track`] would refuse an event because a save is overdue.
    pub fn is_blocked(&self) -> bool {
        let waiting = self.unsaved_events() as usize + self.outstanding.len();
        waiting >= self.policy.max_events() as usize
    }

    /// Where a stream reopened in this process should start: after the newest acknowledged
    /// point, saved or not (so nothing acknowledged is delivered again in-process).
    pub fn resume_position(&self) -> StartPosition {
        StartPosition::after(self.pending().or(self.persisted.as_ref()))
    }

    /// Forgets events tracked but not acknowledged: the stream they came from is gone and
    /// the next one starts at [`Checkpointer::resume_position`], so they arrive again.
    pub fn reset_outstanding(&mut self) {
        self.outstanding.clear();
    }

    /// Registers a received event's point before its handlers run.
    ///
    /// # Errors
    /// [`Error::Protocol`] when the policy's bound of unsaved events is reached (save and
    /// [`Checkpointer::confirm`] first), or when the point is older than one already seen.
    pub fn track(&mut self, point: ResumePoint) -> Result<Seq> {
        if self.is_blocked() {
            return Err(self.blocked_error());
        }
        self.check_order(&point, self.latest_time)?;
        self.latest_time = Some(point.cluster_time);
        Ok(self.push(point))
    }

    /// Registers the events of one unit that must be delivered whole (a multi-document
    /// transaction) before their handlers run. Only the first must fit the policy's bound:
    /// a unit is never split, so it may exceed the bound by its own size. Acknowledge all
    /// of them (in any order) without saving in between, and act only on what the last
    /// [`Checkpointer::ack`] returns: the point then due is at or after the unit's last
    /// event, so no saved point falls inside the unit.
    ///
    /// # Errors
    /// As [`Checkpointer::track`] for the first point; [`Error::Protocol`] when the points
    /// are not in cluster-time order.
    pub fn track_group(&mut self, points: Vec<ResumePoint>) -> Result<Vec<Seq>> {
        if self.is_blocked() && !points.is_empty() {
            return Err(self.blocked_error());
        }
        let mut latest = self.latest_time;
        for point in &points {
            self.check_order(point, latest)?;
            latest = Some(point.cluster_time);
        }
        self.latest_time = latest;
        Ok(points.into_iter().map(|point| self.push(point)).collect())
    }

    /// The refusal of an event while the bound of unsaved work is reached.
    fn blocked_error(&self) -> Error {
        Error::Protocol(format!(
            "{} events are waiting for a checkpoint (the policy's bound is {}); save before taking more",
            self.unsaved_events() as usize + self.outstanding.len(),
            self.policy.max_events()
        ))
    }

    /// Refuses a point older than `latest`, the newest seen before it.
    fn check_order(&self, point: &ResumePoint, latest: Option<ClusterTime>) -> Result<()> {
        match latest {
            Some(latest) if point.cluster_time < latest => Err(Error::Protocol(format!(
                "event at {} arrived after one at {latest}",
                point.cluster_time
            ))),
            _ => Ok(()),
        }
    }

    /// Adds a point to the outstanding events under the next sequence number.
    fn push(&mut self, point: ResumePoint) -> Seq {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outstanding.push_back(Outstanding {
            seq,
            point,
            acked: false,
        });
        Seq(seq)
    }

    /// Acknowledges a tracked event: its handlers succeeded. Events may be acknowledged in
    /// any order; the point advances to the low watermark. Returns the point to save now,
    /// if the policy says one is due.
    ///
    /// # Errors
    /// [`Error::Protocol`] for a sequence number that is unknown or already acknowledged.
    pub fn ack(&mut self, seq: Seq, now: Instant) -> Result<Option<ResumePoint>> {
        // In order (one lane, the usual case) it is the oldest: no search.
        let index = if self.outstanding.front().is_some_and(|o| o.seq == seq.0) {
            0
        } else {
            self.outstanding
                .binary_search_by_key(&seq.0, |o| o.seq)
                .map_err(|_| Error::Protocol(format!("event {} is not outstanding", seq.0)))?
        };
        let entry = &mut self.outstanding[index];
        if entry.acked {
            return Err(Error::Protocol(format!(
                "event {} was acknowledged twice",
                seq.0
            )));
        }
        entry.acked = true;
        while self.outstanding.front().is_some_and(|o| o.acked) {
            if let Some(done) = self.outstanding.pop_front() {
                let max_interval = self.policy.max_interval;
                match &mut self.pending {
                    Some(pending) => {
                        pending.point = done.point;
                        pending.events += 1;
                        if pending.since.is_none() {
                            pending.since = Some(now);
                            pending.due_at = now.checked_add(max_interval);
                        }
                    }
                    None => {
                        self.pending = Some(Pending {
                            point: done.point,
                            events: 1,
                            since: Some(now),
                            due_at: now.checked_add(max_interval),
                        });
                    }
                }
            }
        }
        Ok(self.due(now))
    }

    /// Offers the cursor's current post-batch resume token, seen while no event was
    /// returned. It is taken only if nothing is outstanding and the token is new. Returns
    /// the point to save now, if one is due.
    ///
    /// The point's cluster time is the token's own (when it can be read) or the newest
    /// time seen, whichever is later; with neither, the token is not taken.
    pub fn idle(
        &mut self,
        token: ResumeToken,
        now: Instant,
        saved_at: bson::DateTime,
    ) -> Option<ResumePoint> {
        if !self.outstanding.is_empty() {
            return self.due(now);
        }
        let newest = self.pending().or(self.persisted.as_ref());
        if newest.is_some_and(|p| p.token == token) {
            return self.due(now);
        }
        let time = match (token.cluster_time_hint(), self.latest_time) {
            (Some(hint), Some(latest)) => hint.max(latest),
            (Some(t), None) | (None, Some(t)) => t,
            (None, None) => return self.due(now),
        };
        self.latest_time = Some(time);
        let point = ResumePoint::post_batch(token, time, saved_at);
        match &mut self.pending {
            Some(pending) => pending.point = point,
            None => {
                self.pending = Some(Pending {
                    point,
                    events: 0,
                    since: None,
                    due_at: None,
                });
            }
        }
        self.due(now)
    }

    /// Lets time pass: returns the point to save if an interval has run out.
    pub fn tick(&mut self, now: Instant) -> Option<ResumePoint> {
        self.due(now)
    }

    /// The point to save on a graceful stop: the newest acknowledged one, if unsaved.
    pub fn flush(&self) -> Option<ResumePoint> {
        self.pending().cloned()
    }

    /// Reports that `point` was saved.
    pub fn confirm(&mut self, point: &ResumePoint, now: Instant) {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.point.token == point.token)
        {
            self.pending = None;
        }
        self.persisted = Some(point.clone());
        self.last_save = now;
    }

    fn due(&self, now: Instant) -> Option<ResumePoint> {
        let pending = self.pending.as_ref()?;
        let due = if pending.point.is_invalidate() || pending.events >= self.policy.max_events() {
            true
        } else if pending.since.is_some() {
            pending.due_at.is_some_and(|at| now >= at)
        } else {
            now.saturating_duration_since(self.last_save) >= self.policy.idle_interval
        };
        due.then(|| pending.point.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OperationType;

    fn token(i: u32) -> ResumeToken {
        ResumeToken::from_document(&bson::doc! { "_data": format!("82{:08X}{:08X}", i, 0) })
            .unwrap()
    }

    fn point(i: u32, op: OperationType) -> ResumePoint {
        ResumePoint::for_event(
            token(i),
            ClusterTime::new(i, 0),
            op,
            bson::DateTime::from_millis(0),
        )
    }

    const AT: bson::DateTime = bson::DateTime::from_millis(0);

    #[test]
    fn every_event_policy_offers_each_point() {
        let t0 = Instant::now();
        let mut cp = Checkpointer::new(CheckpointPolicy::every_event(), None, t0);
        let s = cp.track(point(1, OperationType::Insert)).unwrap();
        assert!(
            cp.track(point(2, OperationType::Insert)).is_err(),
            "bound of 1 reached"
        );
        let due = cp.ack(s, t0).unwrap().unwrap();
        assert_eq!(due.token, token(1));
        cp.confirm(&due, t0);
        assert_eq!(cp.persisted(), Some(&due));
        assert!(cp.pending().is_none());
        assert!(cp.track(point(2, OperationType::Insert)).is_ok());
    }

    #[test]
    fn a_group_may_exceed_the_bound_and_is_never_cut() {
        let t0 = Instant::now();
        let policy = CheckpointPolicy::batched(2, Duration::from_secs(1)).unwrap();
        let mut cp = Checkpointer::new(policy, None, t0);
        let group: Vec<ResumePoint> = (1..=5).map(|i| point(i, OperationType::Insert)).collect();
        let seqs = cp.track_group(group).unwrap();
        assert_eq!(seqs.len(), 5, "five points past a bound of two");
        assert!(
            cp.track(point(6, OperationType::Insert)).is_err(),
            "now blocked"
        );
        // Acknowledged out of order: after the last acknowledgement, the point due is the
        // group's end.
        let mut due = None;
        for seq in [seqs[4], seqs[0], seqs[2], seqs[1], seqs[3]] {
            due = cp.ack(seq, t0).unwrap();
        }
        assert_eq!(
            due.unwrap().token,
            token(5),
            "the point after the whole group"
        );
        let mut cp = Checkpointer::new(CheckpointPolicy::every_event(), None, t0);
        cp.track(point(1, OperationType::Insert)).unwrap();
        assert!(
            cp.track_group(vec![point(2, OperationType::Insert)])
                .is_err(),
            "a blocked machine takes no group"
        );
        let mut cp = Checkpointer::new(CheckpointPolicy::every_event(), None, t0);
        assert!(
            cp.track_group(vec![
                point(3, OperationType::Insert),
                point(2, OperationType::Insert)
            ])
            .is_err(),
            "out of order"
        );
    }

    #[test]
    fn batched_policy_waits_for_count_or_interval() {
        let t0 = Instant::now();
        let policy = CheckpointPolicy::batched(3, Duration::from_secs(1)).unwrap();
        let mut cp = Checkpointer::new(policy, None, t0);
        for i in 1..=2 {
            let s = cp.track(point(i, OperationType::Insert)).unwrap();
            assert_eq!(cp.ack(s, t0).unwrap(), None);
        }
        assert_eq!(cp.tick(t0 + Duration::from_millis(999)), None);
        let due = cp.tick(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(due.token, token(2));
        cp.confirm(&due, t0 + Duration::from_secs(1));
        for i in 3..=4 {
            let s = cp.track(point(i, OperationType::Insert)).unwrap();
            assert_eq!(cp.ack(s, t0).unwrap(), None);
        }
        let s = cp.track(point(5, OperationType::Insert)).unwrap();
        assert_eq!(cp.ack(s, t0).unwrap().unwrap().token, token(5));
        assert!(cp.is_blocked());
    }

    #[test]
    fn out_of_order_acks_advance_to_the_low_watermark() {
        let t0 = Instant::now();
        let mut cp = Checkpointer::new(
            CheckpointPolicy::batched(10, Duration::ZERO).unwrap(),
            None,
            t0,
        );
        let a = cp.track(point(1, OperationType::Insert)).unwrap();
        let b = cp.track(point(2, OperationType::Insert)).unwrap();
        let c = cp.track(point(3, OperationType::Insert)).unwrap();
        assert_eq!(cp.ack(c, t0).unwrap(), None);
        assert_eq!(cp.ack(a, t0).unwrap().unwrap().token, token(1));
        assert!(cp.ack(a, t0).is_err(), "acknowledged twice");
        assert_eq!(cp.ack(b, t0).unwrap().unwrap().token, token(3));
        assert!(cp.ack(Seq(99), t0).is_err());
    }

    #[test]
    fn invalidate_is_offered_at_once() {
        let t0 = Instant::now();
        let mut cp = Checkpointer::new(CheckpointPolicy::default(), None, t0);
        let s = cp.track(point(1, OperationType::Invalidate)).unwrap();
        let due = cp.ack(s, t0).unwrap().unwrap();
        assert!(due.is_invalidate());
        cp.confirm(&due, t0);
        assert!(matches!(cp.resume_position(), StartPosition::StartAfter(_)));
    }

    #[test]
    fn idle_tokens_are_saved_at_most_once_per_interval() {
        let t0 = Instant::now();
        let policy = CheckpointPolicy::default().with_idle_interval(Duration::from_secs(60));
        let mut cp = Checkpointer::new(policy, Some(point(1, OperationType::Insert)), t0);
        assert_eq!(cp.idle(token(5), t0 + Duration::from_secs(10), AT), None);
        assert_eq!(cp.pending().unwrap().token, token(5));
        assert_eq!(cp.pending().unwrap().operation_type, None);
        let due = cp.idle(token(6), t0 + Duration::from_secs(60), AT).unwrap();
        assert_eq!(due.token, token(6));
        assert_eq!(due.cluster_time, ClusterTime::new(6, 0));
        cp.confirm(&due, t0 + Duration::from_secs(60));
        assert_eq!(
            cp.idle(token(6), t0 + Duration::from_secs(200), AT),
            None,
            "same token"
        );
    }

    #[test]
    fn idle_token_is_ignored_while_events_are_outstanding() {
        let t0 = Instant::now();
        let mut cp = Checkpointer::new(CheckpointPolicy::default(), None, t0);
        let _s = cp.track(point(1, OperationType::Insert)).unwrap();
        assert_eq!(cp.idle(token(9), t0 + Duration::from_secs(3600), AT), None);
        assert!(cp.pending().is_none());
    }

    #[test]
    fn idle_token_without_time_is_dated_by_the_newest_event() {
        let t0 = Instant::now();
        let mut cp = Checkpointer::new(CheckpointPolicy::every_event(), None, t0);
        let opaque = ResumeToken::from_document(&bson::doc! { "_data": "zz" }).unwrap();
        assert_eq!(
            cp.idle(opaque.clone(), t0 + Duration::from_secs(61), AT),
            None
        );
        assert!(cp.pending().is_none(), "no time known at all");
        let s = cp.track(point(4, OperationType::Insert)).unwrap();
        let due = cp.ack(s, t0).unwrap().unwrap();
        cp.confirm(&due, t0);
        let due = cp.idle(opaque, t0 + Duration::from_secs(61), AT).unwrap();
        assert_eq!(due.cluster_time, ClusterTime::new(4, 0));
    }

    #[test]
    fn older_events_are_refused() {
        let t0 = Instant::now();
        let mut cp = Checkpointer::new(
            CheckpointPolicy::default(),
            Some(point(5, OperationType::Insert)),
            t0,
        );
        assert!(cp.track(point(4, OperationType::Insert)).is_err());
        assert!(
            cp.track(point(5, OperationType::Insert)).is_ok(),
            "ties are allowed"
        );
    }

    #[test]
    fn resume_position_prefers_the_unsaved_acknowledged_point() {
        let t0 = Instant::now();
        let mut cp = Checkpointer::new(
            CheckpointPolicy::default(),
            Some(point(1, OperationType::Insert)),
            t0,
        );
        assert_eq!(cp.resume_position(), StartPosition::ResumeAfter(token(1)));
        let s = cp.track(point(2, OperationType::Insert)).unwrap();
        let _t = cp.track(point(3, OperationType::Insert)).unwrap();
        cp.ack(s, t0).unwrap();
        assert_eq!(cp.resume_position(), StartPosition::ResumeAfter(token(2)));
        cp.reset_outstanding();
        assert_eq!(cp.outstanding(), 0);
        assert_eq!(cp.flush().unwrap().token, token(2));
    }

    #[test]
    fn zero_batch_is_refused() {
        assert!(matches!(
            CheckpointPolicy::batched(0, Duration::ZERO),
            Err(Error::InvalidArgument {
                name: "max_events",
                ..
            })
        ));
    }
}
