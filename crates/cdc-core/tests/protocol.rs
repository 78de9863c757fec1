//! Property tests of the delivery protocol: for any sequence of events, handler failures,
//! store outages and crashes, replaying from the last persisted point delivers every event
//! not yet acknowledged, duplicates after a crash stay within the policy's bound, and the
//! persisted point never moves backwards. `docs/SEMANTICS.md` states these promises.

// A test file: a panic is a failed test, which is what unwrap means here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use cdc_core::{
    CheckpointPolicy, Checkpointer, ClusterTime, OperationType, ResumePoint, ResumeToken,
    StartPosition,
};
use proptest::prelude::*;

/// One oplog entry of the model: visible to the stream's filter or not.
#[derive(Clone, Debug)]
struct Entry {
    visible: bool,
}

#[derive(Clone, Debug)]
enum Action {
    /// The source returns its next entry; a visible one is handled successfully.
    Step,
    /// The next visible entry's handler fails: the stream stops gracefully and restarts.
    HandlerFails,
    /// The process dies: in-memory state is lost.
    Crash,
    /// The cursor reports its post-batch resume token with no event.
    Idle,
    /// Time passes.
    Advance(u64),
    /// The store starts or stops failing.
    StoreDown(bool),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        8 => Just(Action::Step),
        1 => Just(Action::HandlerFails),
        1 => Just(Action::Crash),
        2 => Just(Action::Idle),
        2 => (0u64..3_000).prop_map(Action::Advance),
        1 => any::<bool>().prop_map(Action::StoreDown),
    ]
}

fn policy() -> impl Strategy<Value = CheckpointPolicy> {
    prop_oneof![
        Just(CheckpointPolicy::every_event()),
        (1u32..8, 0u64..2_000).prop_map(|(n, ms)| {
            CheckpointPolicy::batched(n, Duration::from_millis(ms))
                .unwrap()
                .with_idle_interval(Duration::from_millis(ms * 3))
        }),
    ]
}

/// Entry `i` has cluster time (1 + i/2, 0): pairs share a time, like a transaction's writes.
fn token(i: usize) -> ResumeToken {
    let time = 1 + (i / 2) as u32;
    ResumeToken::from_document(&bson::doc! { "_data": format!("82{time:08X}{:08X}{i:06X}", 0) })
        .unwrap()
}

fn cluster_time(i: usize) -> ClusterTime {
    ClusterTime::new(1 + (i / 2) as u32, 0)
}

fn index_of(token: &ResumeToken) -> usize {
    let data = token.data().unwrap();
    usize::from_str_radix(&data[data.len() - 6..], 16).unwrap()
}

/// Where a stream opened at `pos` starts reading the log.
fn first_index(pos: &StartPosition) -> usize {
    match pos {
        StartPosition::Now => 0,
        StartPosition::ResumeAfter(t) | StartPosition::StartAfter(t) => index_of(t) + 1,
        other => panic!("the protocol never starts at {other:?}"),
    }
}

struct Model {
    log: Vec<Entry>,
    policy: CheckpointPolicy,
    /// The durable store.
    stored: Option<ResumePoint>,
    store_down: bool,
    /// Per entry: how many times its handlers succeeded.
    delivered: Vec<u32>,
    now: Instant,
    cp: Checkpointer,
    /// The next log index the open stream reads.
    cursor: usize,
    /// Events delivered again after crashes, each crash checked against the bound.
    duplicates: u32,
}

impl Model {
    fn new(log: Vec<Entry>, policy: CheckpointPolicy) -> Self {
        let now = Instant::now();
        let cp = Checkpointer::new(policy.clone(), None, now);
        let n = log.len();
        Self {
            log,
            policy,
            stored: None,
            store_down: false,
            delivered: vec![0; n],
            now,
            cp,
            cursor: 0,
            duplicates: 0,
        }
    }

    fn save(&mut self, point: Option<ResumePoint>) {
        let Some(point) = point else { return };
        if self.store_down {
            return;
        }
        if let Some(old) = &self.stored {
            assert!(
                point.cluster_time >= old.cluster_time,
                "stored point moved backwards"
            );
            assert!(
                index_of(&point.token) >= index_of(&old.token),
                "stored token moved backwards"
            );
        }
        // The stored point never passes an event whose handlers have not succeeded.
        let upto = index_of(&point.token);
        for i in 0..=upto {
            assert!(
                !self.log[i].visible || self.delivered[i] > 0,
                "point {upto} passes unprocessed event {i}"
            );
        }
        self.stored = Some(point.clone());
        self.cp.confirm(&point, self.now);
    }

    /// Opens a new stream from the store, as a fresh process does.
    fn restart_from_store(&mut self) {
        self.cp = Checkpointer::new(self.policy.clone(), self.stored.clone(), self.now);
        self.cursor = first_index(&StartPosition::after(self.stored.as_ref()));
    }

    fn next_visible(&mut self) -> Option<usize> {
        while self.cursor < self.log.len() {
            let i = self.cursor;
            self.cursor += 1;
            if self.log[i].visible {
                return Some(i);
            }
        }
        None
    }

    fn point(&self, i: usize) -> ResumePoint {
        ResumePoint::for_event(
            token(i),
            cluster_time(i),
            OperationType::Insert,
            bson::DateTime::from_millis(0),
        )
    }

    fn step(&mut self, handler_ok: bool) {
        if self.cp.is_blocked() {
            // Back-pressure: a save is owed before more events are taken.
            let due = self.cp.tick(self.now).or_else(|| self.cp.flush());
            self.save(due);
            return;
        }
        let Some(i) = self.next_visible() else { return };
        let seq = self.cp.track(self.point(i)).unwrap();
        if handler_ok {
            self.delivered[i] += 1;
            let due = self.cp.ack(seq, self.now).unwrap();
            self.save(due);
        } else {
            // The stream stops with the handler's error; a graceful stop saves what was
            // acknowledged, then the processor starts again from the store.
            let flush = self.cp.flush();
            self.save(flush);
            self.restart_from_store();
        }
    }

    fn crash(&mut self) {
        let from = first_index(&StartPosition::after(self.stored.as_ref()));
        let redelivered = (from..self.log.len())
            .filter(|&i| self.log[i].visible && self.delivered[i] > 0)
            .count() as u32;
        assert!(
            redelivered <= self.policy.max_events(),
            "{redelivered} acknowledged events would be delivered again, bound is {}",
            self.policy.max_events()
        );
        self.duplicates += redelivered;
        self.restart_from_store();
    }

    fn idle(&mut self) {
        // A post-batch token names the last entry the server scanned, visible or not.
        if self.cursor == 0 {
            return;
        }
        let scanned = self.cursor - 1;
        let due = self
            .cp
            .idle(token(scanned), self.now, bson::DateTime::from_millis(0));
        self.save(due);
    }

    fn run(&mut self, actions: &[Action]) {
        for a in actions {
            match a {
                Action::Step => self.step(true),
                Action::HandlerFails => self.step(false),
                Action::Crash => self.crash(),
                Action::Idle => self.idle(),
                Action::Advance(ms) => {
                    self.now += Duration::from_millis(*ms);
                    let due = self.cp.tick(self.now);
                    self.save(due);
                }
                Action::StoreDown(down) => self.store_down = *down,
            }
        }
        // Finally: the store comes back and the stream runs to the end, then stops.
        self.store_down = false;
        let mut guard = 0;
        while self.cursor < self.log.len() || self.cp.is_blocked() {
            self.step(true);
            guard += 1;
            assert!(guard < 10 * self.log.len() + 10, "no progress");
        }
        let flush = self.cp.flush();
        self.save(flush);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn nothing_is_lost_and_duplicates_are_bounded(
        visible in prop::collection::vec(prop::bool::weighted(0.8), 1..60),
        actions in prop::collection::vec(action(), 0..200),
        policy in policy(),
    ) {
        let log = visible.into_iter().map(|visible| Entry { visible }).collect();
        let mut model = Model::new(log, policy);
        model.run(&actions);
        for (i, entry) in model.log.iter().enumerate() {
            if entry.visible {
                prop_assert!(model.delivered[i] >= 1, "event {} was never delivered", i);
            }
        }
        // A clean restart now delivers nothing that was already acknowledged.
        let from = first_index(&StartPosition::after(model.stored.as_ref()));
        let visible_after = (from..model.log.len()).filter(|&i| model.log[i].visible).count();
        prop_assert_eq!(visible_after, 0);
    }

    #[test]
    fn out_of_order_acks_never_pass_an_unacknowledged_event(
        order in Just((0..20usize).collect::<Vec<_>>()).prop_shuffle(),
    ) {
        let now = Instant::now();
        let policy = CheckpointPolicy::batched(64, Duration::ZERO).unwrap();
        let mut cp = Checkpointer::new(policy, None, now);
        let seqs: Vec<_> = (0..20)
            .map(|i| cp.track(ResumePoint::for_event(token(i), cluster_time(i), OperationType::Insert, bson::DateTime::from_millis(0))).unwrap())
            .collect();
        let mut acked = [false; 20];
        for &i in &order {
            acked[i] = true;
            let due = cp.ack(seqs[i], now).unwrap();
            let low = acked.iter().position(|a| !a).unwrap_or(20);
            match (due, low) {
                (None, 0) => {}
                (Some(p), low) => prop_assert_eq!(index_of(&p.token), low - 1),
                (None, low) => prop_assert!(false, "watermark {} not offered", low),
            }
        }
    }
}

proptest! {
    /// Lanes and whole transactions: units (single events or transactions) are queued on
    /// lanes by key and completed in any interleaving of the lanes; every unit is
    /// acknowledged all at once. No point offered for saving is ever past an unfinished
    /// event, and none falls inside a transaction.
    #[test]
    fn lane_completions_never_offer_a_point_past_an_unfinished_event(
        units in prop::collection::vec((0usize..8, 1usize..4), 1..20),
        lanes in 1usize..6,
        picks in prop::collection::vec(any::<prop::sample::Index>(), 0..200),
        max_events in 1u32..16,
    ) {
        let now = Instant::now();
        let policy = CheckpointPolicy::batched(max_events, Duration::ZERO).unwrap();
        let mut cp = Checkpointer::new(policy, None, now);
        // Track every unit (transactions as groups), queue it on its key's lane.
        let mut queues: Vec<std::collections::VecDeque<Vec<(usize, cdc_core::Seq)>>> =
            vec![std::collections::VecDeque::new(); lanes];
        let mut next = 0usize;
        let mut unit_end = std::collections::HashSet::new();
        let mut finished = Vec::new();
        for &(key, len) in &units {
            let indices: Vec<usize> = (next..next + len).collect();
            next += len;
            unit_end.insert(next - 1);
            let points: Vec<ResumePoint> = indices
                .iter()
                .map(|&i| ResumePoint::for_event(token(i), cluster_time(i), OperationType::Insert, bson::DateTime::from_millis(0)))
                .collect();
            // Save what is due until the unit can be tracked (the run loop's back-pressure).
            while cp.is_blocked() {
                let Some(p) = cp.flush() else { break };
                cp.confirm(&p, now);
            }
            if cp.is_blocked() {
                // Only unfinished events hold the bound: complete lanes until it frees.
                break;
            }
            let seqs = cp.track_group(points).unwrap();
            queues[key % lanes].push_back(indices.into_iter().zip(seqs).collect());
            finished.resize(next, false);
        }
        let check = |p: &ResumePoint, finished: &[bool]| -> Result<(), TestCaseError> {
            let at = index_of(&p.token);
            prop_assert!(finished[..=at].iter().all(|f| *f), "point {} passes an unfinished event", at);
            prop_assert!(unit_end.contains(&at), "point {} is inside a transaction", at);
            Ok(())
        };
        // Complete lane heads in the picked interleaving, then whatever remains.
        let mut picks = picks.into_iter();
        loop {
            let busy: Vec<usize> = (0..lanes).filter(|&l| !queues[l].is_empty()).collect();
            if busy.is_empty() {
                break;
            }
            let lane = match picks.next() {
                Some(ix) => busy[ix.index(busy.len())],
                None => busy[0],
            };
            let unit = queues[lane].pop_front().unwrap();
            let mut due = None;
            for &(i, seq) in &unit {
                finished[i] = true;
                due = cp.ack(seq, now).unwrap();
            }
            if let Some(p) = due {
                check(&p, &finished)?;
                cp.confirm(&p, now);
            }
        }
        if let Some(p) = cp.flush() {
            check(&p, &finished)?;
        }
    }
}
