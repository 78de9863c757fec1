//! Per-key lanes: `concurrency` tasks, each handling its own queue of units in order.
//! Events are routed to a lane by a stable hash of their document key's raw bytes, so the
//! events of one key are handled in stream order while different keys run concurrently.
//! The run loop tracks every event before it enters a lane and acknowledges it when the
//! lane reports it handled; the stored point is the low watermark of those
//! acknowledgements. Where an event waits: in its lane's queue, then in the handler call.

use std::sync::Arc;

use cdc_core::{ChangeEvent, Seq};
use tokio::{
    sync::{OwnedSemaphorePermit, mpsc},
    task::JoinHandle,
};

use crate::{
    context::{Batch, BatchDispatcher, HandlerContext, TransactionPosition},
    handling::{BatchLimits, Handler, handler_error},
    poison::{AfterRetries, Fate, Poison},
};

/// An event tracked by the checkpointer, with its share of the byte budget (released
/// when it is dropped, after its handler finished).
pub(crate) struct Tracked {
    pub(crate) seq: Seq,
    pub(crate) event: Box<ChangeEvent>,
    /// Held only to be dropped with the event.
    pub(crate) _bytes: Option<OwnedSemaphorePermit>,
}

/// A unit handled as one: a single event, or every event of one transaction in order.
pub(crate) struct Unit {
    pub(crate) events: Vec<Tracked>,
    /// The events are one multi-document transaction.
    pub(crate) transaction: bool,
}

impl Unit {
    fn raw_bytes(&self) -> usize {
        self.events
            .iter()
            .map(|t| t.event.raw().map_or(0, |r| r.as_bytes().len()))
            .sum()
    }
}

/// What the policy did with events that were not handled but acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) skipped: u64,
    pub(crate) dead_lettered: u64,
}

impl Tally {
    /// Counts what the policy did with one event.
    pub(crate) fn add(&mut self, fate: &Fate) {
        match fate {
            Fate::Skipped => self.skipped += 1,
            Fate::DeadLettered => self.dead_lettered += 1,
            _ => {}
        }
    }
}

/// What became of units a lane took.
pub(crate) enum Outcome {
    /// Handled, skipped or dead-lettered under the policy: acknowledge every event.
    Handled(Tally),
    /// The handler failed on them and the policy says stop (or a dead letter could not
    /// be recorded): acknowledge none.
    Failed(cdc_core::Error),
    /// Not handled (the processor is stopping, or the lane failed before): acknowledge
    /// none; they are delivered again.
    Abandoned,
}

/// Units a lane is done with.
pub(crate) struct Done {
    pub(crate) units: Vec<Unit>,
    pub(crate) outcome: Outcome,
}

/// Handles units in order under the handler-error policy: per event, or as one batch
/// (which, when it keeps failing and the policy does not stop, is split into one batch
/// per unit so only the failing units are skipped or dead-lettered).
pub(crate) async fn handle(
    handler: &Handler,
    units: &[Unit],
    ctx: &HandlerContext,
    poison: &Poison,
) -> Outcome {
    let mut tally = Tally::default();
    match handler {
        Handler::Event(h) => {
            for unit in units {
                let len = unit.events.len();
                for (index, t) in unit.events.iter().enumerate() {
                    let position = unit
                        .transaction
                        .then_some(TransactionPosition { index, len });
                    let ctx = ctx.in_transaction(position);
                    match poison.handle_event(&**h, &t.event, &ctx).await {
                        Fate::Failed(e) => return Outcome::Failed(e),
                        Fate::Abandoned => return Outcome::Abandoned,
                        fate => tally.add(&fate),
                    }
                }
            }
            Outcome::Handled(tally)
        }
        Handler::Batch(h, _) => {
            // Units with a parked key follow it into the dead letters, whole.
            let mut open = Vec::with_capacity(units.len());
            for unit in units {
                if unit.events.iter().any(|t| poison.is_parked(&t.event)) {
                    for t in &unit.events {
                        match poison.park(&t.event).await {
                            Fate::Failed(e) => return Outcome::Failed(e),
                            fate => tally.add(&fate),
                        }
                    }
                } else {
                    open.push(unit);
                }
            }
            match handle_batch(&**h, &open, ctx, poison).await {
                Ok(Some(())) => return Outcome::Handled(tally),
                Ok(None) => return Outcome::Abandoned,
                Err(e) if poison.policy.then() == AfterRetries::Stop || open.len() < 2 => {
                    return give_up_units(&open, e, poison, tally).await;
                }
                Err(_) => {}
            }
            // One batch per unit: only the units that still fail are given up on.
            for unit in open {
                match handle_batch(&**h, &[unit], ctx, poison).await {
                    Ok(Some(())) => {}
                    Ok(None) => return Outcome::Abandoned,
                    Err(e) => match give_up_units(&[unit], e, poison, tally).await {
                        Outcome::Handled(t) => tally = t,
                        other => return other,
                    },
                }
            }
            Outcome::Handled(tally)
        }
    }
}

/// One batch call with the policy's retries: `Err` with the handler error of the batch's
/// first event and the number of calls.
async fn handle_batch(
    h: &dyn BatchDispatcher,
    units: &[&Unit],
    ctx: &HandlerContext,
    poison: &Poison,
) -> Result<Option<()>, (cdc_core::Error, u32)> {
    let groups: Vec<Vec<&ChangeEvent>> = units
        .iter()
        .map(|u| u.events.iter().map(|t| &*t.event).collect())
        .collect();
    let batch = Batch::new(&groups);
    let Some(first) = batch.events().first().copied() else {
        return Ok(Some(()));
    };
    poison
        .retrying(ctx, |ctx| {
            let (batch, ctx) = (&batch, ctx.clone());
            async move { h.dispatch_batch(batch, &ctx).await }
        })
        .await
        .map_err(|(e, calls)| (handler_error(first, e, calls), calls))
}

/// Applies the policy to every event of units a batch handler gave up on.
async fn give_up_units(
    units: &[&Unit],
    (error, calls): (cdc_core::Error, u32),
    poison: &Poison,
    mut tally: Tally,
) -> Outcome {
    if poison.policy.then() == AfterRetries::Stop {
        return Outcome::Failed(error);
    }
    let error = Arc::new(error);
    for unit in units {
        for t in &unit.events {
            let this = handler_error(&t.event, Box::new(SharedError(Arc::clone(&error))), calls);
            match poison.give_up(&t.event, this, calls).await {
                Fate::Failed(e) => return Outcome::Failed(e),
                fate => tally.add(&fate),
            }
        }
    }
    Outcome::Handled(tally)
}

/// The batch's error, shared by the letters of each of its events.
#[derive(Debug)]
struct SharedError(Arc<cdc_core::Error>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the batch failed: {}", self.0)
    }
}

impl std::error::Error for SharedError {}

/// Handles units as [`handle`] does, unless the stop timeout runs out first: then the
/// call is dropped (cancelled) and the units are not acknowledged (they come again).
pub(crate) async fn handle_until_deadline(
    handler: &Handler,
    units: &[Unit],
    ctx: &HandlerContext,
    poison: &Poison,
) -> Outcome {
    let handling = std::pin::pin!(handle(handler, units, ctx, poison));
    match ctx.before_deadline(handling).await {
        Some(outcome) => outcome,
        None => {
            tracing::warn!(
                "a handler did not finish within the stop timeout: cancelled, its events come again"
            );
            Outcome::Abandoned
        }
    }
}

/// The lanes of one run.
pub(crate) struct Lanes {
    senders: Vec<mpsc::Sender<Unit>>,
    done: mpsc::UnboundedReceiver<Done>,
    in_flight: usize,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes")
            .field("lanes", &self.senders.len())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

/// FNV-1a: a stable hash of a document key's bytes (the same lane in every run and every
/// process, unlike the standard library's seeded hasher).
pub(crate) fn key_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Lanes {
    /// Starts `n` lanes, each with a queue of `queue` units.
    pub(crate) fn start(
        n: usize,
        queue: usize,
        handler: &Handler,
        base: &HandlerContext,
        poison: &Arc<Poison>,
    ) -> Self {
        let (done_tx, done) = mpsc::unbounded_channel();
        let mut senders = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        for lane in 0..n {
            let (tx, rx) = mpsc::channel(queue.max(1));
            senders.push(tx);
            let ctx = base.on_lane(lane);
            tasks.push(tokio::spawn(HandlerContext::slot_for(run_lane(
                rx,
                done_tx.clone(),
                handler.clone(),
                ctx,
                Arc::clone(poison),
            ))));
        }
        Self {
            senders,
            done,
            in_flight: 0,
            tasks,
        }
    }

    /// The lane of a document key.
    pub(crate) fn lane_of(&self, key: &[u8]) -> usize {
        // The modulus is below `count()`, a `usize`: the conversion cannot fail.
        usize::try_from(key_hash(key) % self.senders.len() as u64).unwrap_or(0)
    }

    /// Units sent and not yet reported done.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues a unit on a lane (waits while that lane's queue is full; lanes never wait on
    /// the run loop, so this ends).
    pub(crate) async fn send(&mut self, lane: usize, unit: Unit) {
        if self.senders[lane].send(unit).await.is_ok() {
            self.in_flight += 1;
        }
    }

    /// The next report of a lane; `None` when nothing is in flight.
    pub(crate) async fn next_done(&mut self) -> Option<Done> {
        if self.in_flight == 0 {
            return None;
        }
        let done = self.done.recv().await?;
        self.in_flight = self.in_flight.saturating_sub(done.units.len());
        Some(done)
    }

    /// Closes the queues and waits for the lanes to end.
    pub(crate) async fn shutdown(mut self) {
        self.senders.clear();
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

/// Lanes dropped without a shutdown (the run was dropped: its lease was lost) cancel their
/// handlers at once; nothing they were handling is acknowledged.
impl Drop for Lanes {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn run_lane(
    mut rx: mpsc::Receiver<Unit>,
    done: mpsc::UnboundedSender<Done>,
    handler: Handler,
    ctx: HandlerContext,
    poison: Arc<Poison>,
) {
    let mut failed = false;
    let mut carry: Option<Unit> = None;
    loop {
        let first = match carry.take() {
            Some(unit) => unit,
            None => match rx.recv().await {
                Some(unit) => unit,
                None => return,
            },
        };
        if failed || ctx.is_stopping() {
            // After a failure the lane's later events wait for the restart, so their key's
            // order holds; when stopping, nothing new starts.
            let _ = done.send(Done {
                units: vec![first],
                outcome: Outcome::Abandoned,
            });
            continue;
        }
        let mut units = vec![first];
        if let Handler::Batch(_, limits) = &handler {
            carry = gather(&mut rx, &mut units, limits, &ctx).await;
        }
        let outcome = match handle_until_deadline(&handler, &units, &ctx, &poison).await {
            Outcome::Failed(e) => {
                failed = true;
                Outcome::Failed(e)
            }
            other => other,
        };
        if done.send(Done { units, outcome }).is_err() {
            return;
        }
    }
}

/// Adds queued units to a batch until a limit is reached, the wait runs out or the
/// processor is stopping (a stop never waits out `max_batch_wait`); returns a unit that
/// did not fit (it opens the next batch).
async fn gather(
    rx: &mut mpsc::Receiver<Unit>,
    units: &mut Vec<Unit>,
    limits: &BatchLimits,
    ctx: &HandlerContext,
) -> Option<Unit> {
    let mut events: usize = units.iter().map(|u| u.events.len()).sum();
    let mut bytes: usize = units.iter().map(Unit::raw_bytes).sum();
    let deadline = tokio::time::Instant::now() + limits.max_wait;
    while events < limits.max_events && bytes < limits.max_bytes {
        let next = match rx.try_recv() {
            Ok(unit) => unit,
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) => {
                let next = tokio::select! {
                    next = tokio::time::timeout_at(deadline, rx.recv()) => next,
                    () = ctx.stopping() => return None,
                };
                match next {
                    Ok(Some(unit)) => unit,
                    Ok(None) | Err(_) => return None,
                }
            }
        };
        let (n, b) = (next.events.len(), next.raw_bytes());
        if events + n > limits.max_events || bytes + b > limits.max_bytes {
            return Some(next);
        }
        events += n;
        bytes += b;
        units.push(next);
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::{
        sync::Mutex,
        time::{Duration, Instant as StdInstant},
    };

    use cdc_core::{BoxError, CheckpointPolicy, Checkpointer, Dispatcher};
    use tokio::time::Instant;

    use super::*;
    use crate::poison::HandlerErrorPolicy;

    /// A handler that takes `ms` of (paused) time per event of key `k`, logging when each
    /// call starts.
    struct Slow {
        t0: Instant,
        ms: fn(i64) -> u64,
        started: Mutex<Vec<(i64, i64, u128)>>,
    }

    #[async_trait::async_trait]
    impl Dispatcher for Slow {
        async fn dispatch(&self, event: &ChangeEvent, _: Option<BoxError>) -> Result<(), BoxError> {
            let doc = event.full_document().unwrap();
            let (k, n) = (doc.get_i64("k").unwrap(), doc.get_i64("n").unwrap());
            self.started
                .lock()
                .unwrap()
                .push((k, n, self.t0.elapsed().as_millis()));
            tokio::time::sleep(Duration::from_millis((self.ms)(k))).await;
            Ok(())
        }
    }

    fn event(k: i64, n: i64) -> ChangeEvent {
        let t = 1000 + u32::try_from(n).unwrap();
        ChangeEvent::from_raw_buf(bson::rawdoc! {
            "_id": { "_data": format!("82{t:08X}{k:08X}") },
            "operationType": "update",
            "clusterTime": bson::Timestamp { time: t, increment: u32::try_from(k).unwrap() },
            "ns": { "db": "d", "coll": "c" },
            "documentKey": { "_id": k },
            "fullDocument": { "_id": k, "k": k, "n": n },
        })
        .unwrap()
    }

    /// Two keys on two lanes: each key's events are handled in order, one at a time; the
    /// keys concurrently; and each unit is handed back the moment its lane finished it.
    #[tokio::test(start_paused = true)]
    async fn lanes_keep_each_keys_order_and_hand_units_back_as_they_finish() {
        let t0 = Instant::now();
        let slow = Arc::new(Slow {
            t0,
            ms: |k| if k == 1 { 300 } else { 100 },
            started: Mutex::new(Vec::new()),
        });
        let poison = Arc::new(Poison::new(
            HandlerErrorPolicy::stop(),
            None,
            "s".into(),
            Duration::from_secs(1),
            None,
        ));
        let ctx = HandlerContext::new(None, 1, crate::stop::Stop::default(), None);
        let handler = Handler::Event(Arc::clone(&slow) as Arc<dyn Dispatcher>);
        let mut lanes = Lanes::start(2, 4, &handler, &ctx, &poison);
        // Two keys that hash to different lanes.
        let key = |k: i64| bson::rawdoc! { "_id": k }.as_bytes().to_vec();
        let (k1, k2) = (
            1_i64,
            (2..100)
                .find(|k| lanes.lane_of(&key(*k)) != lanes.lane_of(&key(1)))
                .unwrap(),
        );
        let policy = CheckpointPolicy::batched(100, Duration::from_secs(60)).unwrap();
        let mut cp = Checkpointer::new(policy, None, StdInstant::now());
        for (k, n) in [(k1, 1), (k2, 2), (k1, 3), (k2, 4)] {
            let event = event(k, n);
            let seq = cp.track(event.resume_point(bson::DateTime::now())).unwrap();
            let unit = Unit {
                events: vec![Tracked {
                    seq,
                    event: Box::new(event),
                    _bytes: None,
                }],
                transaction: false,
            };
            lanes.send(lanes.lane_of(&key(k)), unit).await;
        }
        let mut handed = Vec::new();
        while let Some(done) = lanes.next_done().await {
            assert!(matches!(done.outcome, Outcome::Handled(_)));
            let doc = done.units[0].events[0].event.full_document().unwrap();
            handed.push((doc.get_i64("n").unwrap(), t0.elapsed().as_millis()));
        }
        assert_eq!(handed, [(2, 100), (4, 200), (1, 300), (3, 600)]);
        assert_eq!(
            *slow.started.lock().unwrap(),
            [(k1, 1, 0), (k2, 2, 0), (k2, 4, 100), (k1, 3, 300)]
        );
        lanes.shutdown().await;
    }

    #[test]
    fn the_key_hash_is_stable() {
        // Fixed values: a lane must not change between runs, processes or releases.
        assert_eq!(key_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(key_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
