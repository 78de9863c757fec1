//! What a handler knows about the call it is in: the [`HandlerContext`] (stop signal,
//! lane, attempt, transaction position), and the batch handler trait with its [`Batch`].

use std::{ops::Range, sync::Arc};

use async_trait::async_trait;
use cdc_core::{BoxError, ChangeEvent};
use tokio_util::sync::CancellationToken;

/// Where an event stands in its multi-document transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransactionPosition {
    /// Its index among the transaction's events (from 0).
    pub index: usize,
    /// How many events the transaction has.
    pub len: usize,
}

impl TransactionPosition {
    /// Whether this is the transaction's last event.
    pub fn is_last(&self) -> bool {
        self.index + 1 == self.len
    }
}

/// The context of one handler call. Cloning it is cheap (what is the same for the whole
/// run is shared): the processor makes one per call.
#[derive(Clone, Debug)]
pub struct HandlerContext {
    run: Arc<RunContext>,
    lane: Option<usize>,
    call: u32,
    transaction: Option<TransactionPosition>,
}

/// What every call of one run shares.
#[derive(Debug)]
struct RunContext {
    attempt: u32,
    cancel: CancellationToken,
    stop_timeout: Option<std::time::Duration>,
    lease: Option<cdc_core::Lease>,
}

tokio::task_local! {
    static CURRENT: HandlerContext;
}

impl HandlerContext {
    pub(crate) fn new(
        lane: Option<usize>,
        attempt: u32,
        cancel: CancellationToken,
        stop_timeout: Option<std::time::Duration>,
    ) -> Self {
        Self {
            run: Arc::new(RunContext {
                attempt,
                cancel,
                stop_timeout,
                lease: None,
            }),
            lane,
            call: 1,
            transaction: None,
        }
    }

    /// The context with the lease the run holds.
    pub(crate) fn with_lease(self, lease: Option<cdc_core::Lease>) -> Self {
        let run = RunContext {
            attempt: self.run.attempt,
            cancel: self.run.cancel.clone(),
            stop_timeout: self.run.stop_timeout,
            lease,
        };
        Self {
            run: Arc::new(run),
            ..self
        }
    }

    /// The context of a call on `lane`.
    pub(crate) fn on_lane(&self, lane: usize) -> Self {
        Self {
            lane: Some(lane),
            ..self.clone()
        }
    }

    /// The lease this run holds, with a leased store (its owner and fencing token stay the
    /// same for the whole run): a sink that saves checkpoints of its own fences them with
    /// it.
    pub fn lease(&self) -> Option<&cdc_core::Lease> {
        self.run.lease.as_ref()
    }

    pub(crate) fn with_call(&self, call: u32) -> Self {
        Self {
            call,
            ..self.clone()
        }
    }

    /// Resolves when a handler call must be abandoned: the stop timeout has run out since
    /// `stop()` (never, without a stop timeout).
    pub(crate) async fn stop_deadline(&self) {
        self.run.cancel.cancelled().await;
        match self.run.stop_timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    }

    /// Runs `fut` to its end, unless the stop timeout runs out first ([`Self::stop_deadline`]):
    /// `None` then, and `fut` is dropped (cancelled). A call that finishes when first
    /// polled (most do) never looks at the deadline.
    pub(crate) async fn before_deadline<F: std::future::Future>(
        &self,
        fut: F,
    ) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        let first = std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
            std::task::Poll::Ready(out) => std::task::Poll::Ready(Some(out)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await;
        if first.is_some() {
            return first;
        }
        tokio::select! {
            biased;
            out = fut => Some(out),
            () = self.stop_deadline() => None,
        }
    }

    pub(crate) fn in_transaction(&self, position: Option<TransactionPosition>) -> Self {
        Self {
            transaction: position,
            ..self.clone()
        }
    }

    /// The context of the handler call running now, for per-event handlers
    /// ([`cdc_core::Dispatcher`], whose signature has no room for it): `None` outside a
    /// handler call.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `fut` with this as the current context.
    pub(crate) async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        CURRENT.scope(self, fut).await
    }

    /// The lane handling the call (`0..concurrency`); `None` for an event handled alone
    /// (a barrier: an event without a document key, or a transaction spanning lanes).
    pub fn lane(&self) -> Option<usize> {
        self.lane
    }

    /// Which run of the processor this is: 1 for the first, one more after each restart
    /// by `start_with_retry` (an event seen with an attempt above 1 may have been handled
    /// before).
    pub fn attempt(&self) -> u32 {
        self.run.attempt
    }

    /// Which call on this event (or batch) this is within the run: 1 for the first, one
    /// more for each retry under [`crate::HandlerErrorPolicy`].
    pub fn call(&self) -> u32 {
        self.call
    }

    /// Whether the processor was asked to stop (the Go package's `ctx.Done()`).
    pub fn is_stopping(&self) -> bool {
        self.run.cancel.is_cancelled()
    }

    /// Resolves when the processor is asked to stop: select on it to end a long handler
    /// call early (its events are then delivered again).
    pub async fn stopping(&self) {
        self.run.cancel.cancelled().await;
    }

    /// For a per-event handler: the event's place in its transaction, when transactions
    /// are kept whole and it belongs to one.
    pub fn transaction(&self) -> Option<TransactionPosition> {
        self.transaction
    }
}

/// Consecutive events handed to a [`BatchDispatcher`] at once, in stream order.
#[derive(Debug)]
pub struct Batch<'a> {
    events: Vec<&'a ChangeEvent>,
    units: Vec<Range<usize>>,
    bytes: usize,
}

impl<'a> Batch<'a> {
    pub(crate) fn new(units: &[Vec<&'a ChangeEvent>]) -> Self {
        let mut events = Vec::new();
        let mut ranges = Vec::with_capacity(units.len());
        for unit in units {
            let start = events.len();
            events.extend(unit.iter().copied());
            ranges.push(start..events.len());
        }
        let bytes = events
            .iter()
            .map(|e| e.raw().map_or(0, |r| r.as_bytes().len()))
            .sum();
        Self {
            events,
            units: ranges,
            bytes,
        }
    }

    /// The events, in stream order (per key when lanes are used).
    pub fn events(&self) -> &[&'a ChangeEvent] {
        &self.events
    }

    /// How many events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether it holds no event (never, when handed to a handler).
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The raw size of its events, in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The units it is made of, in order: each a single event or a whole transaction
    /// (when transactions are kept whole), never split across batches.
    pub fn units(&self) -> impl Iterator<Item = &[&'a ChangeEvent]> {
        self.units.iter().map(|r| &self.events[r.clone()])
    }
}

/// Handles events a batch at a time: success acknowledges every event of the batch; an
/// error acknowledges none of them (they are delivered again).
#[async_trait]
pub trait BatchDispatcher: Send + Sync {
    /// Handles `batch`.
    async fn dispatch_batch(&self, batch: &Batch<'_>, ctx: &HandlerContext)
    -> Result<(), BoxError>;
}

/// A shared batch dispatcher is one too.
#[async_trait]
impl<T: BatchDispatcher + ?Sized> BatchDispatcher for std::sync::Arc<T> {
    async fn dispatch_batch(
        &self,
        batch: &Batch<'_>,
        ctx: &HandlerContext,
    ) -> Result<(), BoxError> {
        (**self).dispatch_batch(batch, ctx).await
    }
}
