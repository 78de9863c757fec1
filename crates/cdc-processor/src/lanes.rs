//! Per-key lanes: `concurrency` tasks, each handling its own queue of units in order.
//! Events are routed to a lane by a stable hash of their document key's raw bytes, so the
//! events of one key are handled in stream order while different keys run concurrently.
//! The run loop tracks every event before it enters a lane and acknowledges it when the
//! lane reports it handled; the stored point is the low watermark of those
//! acknowledgements. Where an event waits: in its lane's queue, then in the handler call.

use std::{future::Future, panic::AssertUnwindSafe, sync::Arc, task::Poll};

use cdc_core::{BoxError, ChangeEvent, Dispatcher, Seq};
use tokio::{
    sync::{OwnedSemaphorePermit, mpsc},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::context::{Batch, BatchDispatcher, BatchLimits, HandlerContext, TransactionPosition};

/// The user's handler: one event at a time, or batches.
#[derive(Clone)]
pub(crate) enum Handler {
    /// A per-event dispatcher.
    Event(Arc<dyn Dispatcher>),
    /// A batch dispatcher, with the limits of a batch.
    Batch(Arc<dyn BatchDispatcher>, BatchLimits),
}

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

/// What became of units a lane took.
pub(crate) enum Outcome {
    /// Handled: acknowledge every event.
    Handled,
    /// The handler failed on them: acknowledge none.
    Failed(cdc_core::Error),
    /// Not handled (the processor is stopping, or the lane failed before): acknowledge
    /// none; they are delivered again.
    Skipped,
}

/// Units a lane is done with.
pub(crate) struct Done {
    pub(crate) units: Vec<Unit>,
    pub(crate) outcome: Outcome,
}

/// Runs a handler future, turning a panic into an error that carries its message.
pub(crate) async fn catch_panic<F: Future<Output = Result<(), BoxError>>>(
    fut: F,
) -> Result<(), BoxError> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string panic payload".to_owned());
                Poll::Ready(Err(format!("the handler panicked: {message}").into()))
            }
        }
    })
    .await
}

pub(crate) fn handler_error(event: &ChangeEvent, source: BoxError) -> cdc_core::Error {
    cdc_core::Error::Handler {
        operation: event.operation_type.clone(),
        cluster_time: event.cluster_time,
        document_id: event.document_id_string(),
        token: Some(event.token.clone()),
        source,
    }
}

/// Handles units in order: per event (stopping at the first error) or as one batch.
pub(crate) async fn handle(
    handler: &Handler,
    units: &[Unit],
    ctx: &HandlerContext,
) -> Result<(), cdc_core::Error> {
    match handler {
        Handler::Event(h) => {
            for unit in units {
                let len = unit.events.len();
                for (index, t) in unit.events.iter().enumerate() {
                    let position = unit
                        .transaction
                        .then_some(TransactionPosition { index, len });
                    let ctx = ctx.in_transaction(position);
                    catch_panic(ctx.scope(h.dispatch(&t.event, None)))
                        .await
                        .map_err(|e| handler_error(&t.event, e))?;
                }
            }
            Ok(())
        }
        Handler::Batch(h, _) => {
            let groups: Vec<Vec<&ChangeEvent>> = units
                .iter()
                .map(|u| u.events.iter().map(|t| &*t.event).collect())
                .collect();
            let batch = Batch::new(&groups);
            let Some(first) = batch.events().first().copied() else {
                return Ok(());
            };
            catch_panic(ctx.clone().scope(h.dispatch_batch(&batch, ctx)))
                .await
                .map_err(|e| handler_error(first, e))
        }
    }
}

/// Handles units as [`handle`] does, unless the stop timeout runs out first: then the
/// call is dropped (cancelled) and the units are not acknowledged (they come again).
pub(crate) async fn handle_until_deadline(
    handler: &Handler,
    units: &[Unit],
    ctx: &HandlerContext,
) -> Outcome {
    tokio::select! {
        result = handle(handler, units, ctx) => match result {
            Ok(()) => Outcome::Handled,
            Err(e) => Outcome::Failed(e),
        },
        () = ctx.stop_deadline() => {
            tracing::warn!("a handler did not finish within the stop timeout: cancelled, its events come again");
            Outcome::Skipped
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
        attempt: u32,
        cancel: &CancellationToken,
        stop_timeout: Option<std::time::Duration>,
    ) -> Self {
        let (done_tx, done) = mpsc::unbounded_channel();
        let mut senders = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        for lane in 0..n {
            let (tx, rx) = mpsc::channel(queue.max(1));
            senders.push(tx);
            let ctx = HandlerContext::new(Some(lane), attempt, cancel.clone(), stop_timeout);
            tasks.push(tokio::spawn(run_lane(
                rx,
                done_tx.clone(),
                handler.clone(),
                ctx,
            )));
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
    pub(crate) async fn shutdown(self) {
        drop(self.senders);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn run_lane(
    mut rx: mpsc::Receiver<Unit>,
    done: mpsc::UnboundedSender<Done>,
    handler: Handler,
    ctx: HandlerContext,
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
                outcome: Outcome::Skipped,
            });
            continue;
        }
        let mut units = vec![first];
        if let Handler::Batch(_, limits) = &handler {
            carry = gather(&mut rx, &mut units, limits).await;
        }
        let outcome = match handle_until_deadline(&handler, &units, &ctx).await {
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

/// Adds queued units to a batch until a limit is reached or the wait runs out; returns a
/// unit that did not fit (it opens the next batch).
async fn gather(
    rx: &mut mpsc::Receiver<Unit>,
    units: &mut Vec<Unit>,
    limits: &BatchLimits,
) -> Option<Unit> {
    let mut events: usize = units.iter().map(|u| u.events.len()).sum();
    let mut bytes: usize = units.iter().map(Unit::raw_bytes).sum();
    let deadline = tokio::time::Instant::now() + limits.max_wait;
    while events < limits.max_events && bytes < limits.max_bytes {
        let next = match rx.try_recv() {
            Ok(unit) => unit,
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) => {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
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
    use super::*;

    #[test]
    fn the_key_hash_is_stable() {
        // Fixed values: a lane must not change between runs, processes or releases.
        assert_eq!(key_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(key_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
