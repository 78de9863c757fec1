//! What a handler knows about the call it is in: the [`HandlerContext`] (stop signal,
//! lane, attempt, transaction position), and the batch handler trait with its [`Batch`].

use std::{ops::Range, sync::Arc};

use crate::stop::Stop;
use async_trait::async_trait;
use cdc_core::{BoxError, ChangeEvent};

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
    cancel: Stop,
    stop_timeout: Option<std::time::Duration>,
    lease: Option<cdc_core::Lease>,
}

tokio::task_local! {
    /// The context of the handler call running on this task, if one is. A task that makes
    /// handler calls one after another (the run loop, a lane) holds one slot for its
    /// life ([`HandlerContext::slot_for`]) and fills it for each call: entering a
    /// task-local scope for every call cost more than the rest of handling an event.
    static CURRENT: std::cell::RefCell<Option<HandlerContext>>;
}

impl HandlerContext {
    pub(crate) fn new(
        lane: Option<usize>,
        attempt: u32,
        cancel: Stop,
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
    /// `None` then (the caller drops `fut`, cancelling it). A call that finishes when
    /// first polled (most do) never looks at the deadline. `fut` is pinned where the
    /// caller made it rather than moved in here.
    pub(crate) async fn before_deadline<F: std::future::Future>(
        &self,
        mut fut: std::pin::Pin<&mut F>,
    ) -> Option<F::Output> {
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
        CURRENT
            .try_with(|slot| slot.borrow().clone())
            .ok()
            .flatten()
    }

    /// Runs `fut`, a task that makes handler calls one at a time, with a slot for their
    /// contexts.
    pub(crate) async fn slot_for<F: std::future::Future>(fut: F) -> F::Output {
        CURRENT.scope(std::cell::RefCell::new(None), fut).await
    }

    /// One handler call: `fut` with this as the current context, a panic in it turned
    /// into an error. The context goes in the task's slot when it has one (emptied when
    /// the call ends or is dropped), in a scope of its own otherwise.
    pub(crate) async fn make_call<F>(self, fut: std::pin::Pin<&mut F>) -> Result<(), BoxError>
    where
        F: std::future::Future<Output = Result<(), BoxError>>,
    {
        match self.hold() {
            Ok(_empty) => catch_panic(fut).await,
            Err(this) => {
                let scoped = CURRENT.scope(std::cell::RefCell::new(Some(this)), fut);
                catch_panic(std::pin::pin!(scoped)).await
            }
        }
    }

    /// Puts this in the task's empty slot: the guard that empties it again, or this back
    /// when the task has no slot or it is taken (a call within a call).
    fn hold(self) -> Result<EmptySlot, Self> {
        let mut this = Some(self);
        let held = CURRENT.try_with(|slot| match slot.try_borrow_mut() {
            Ok(mut slot) if slot.is_none() => {
                *slot = this.take();
                true
            }
            _ => false,
        });
        match (held, this) {
            (Ok(true), _) | (_, None) => Ok(EmptySlot),
            (_, Some(this)) => Err(this),
        }
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

/// Runs a handler future, turning a panic into an error that carries its message. The
/// future is pinned where the caller made it (not moved into this one: handler futures
/// are large, and this runs for every call), and polled through a plain `poll_fn` (no
/// state machine of its own).
pub(crate) fn catch_panic<'a, F: std::future::Future<Output = Result<(), BoxError>>>(
    mut fut: std::pin::Pin<&'a mut F>,
) -> impl std::future::Future<Output = Result<(), BoxError>> + 'a {
    std::future::poll_fn(move |cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string panic payload".to_owned());
                std::task::Poll::Ready(Err(format!("the handler panicked: {message}").into()))
            }
        }
    })
}

/// Empties the task's context slot when a call ends (or is dropped).
struct EmptySlot;

impl Drop for EmptySlot {
    fn drop(&mut self) {
        // Outside the task's scope (dropped with the task), there is no slot to empty.
        let _ = CURRENT.try_with(|slot| {
            if let Ok(mut slot) = slot.try_borrow_mut() {
                *slot = None;
            }
        });
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::future::Future;

    use super::*;

    fn ctx(call: u32) -> HandlerContext {
        HandlerContext::new(Some(3), 1, Stop::default(), None).with_call(call)
    }

    type Seen = std::sync::Arc<std::sync::Mutex<Vec<Option<(Option<usize>, u32)>>>>;

    /// A handler call that records the context it sees.
    async fn seeing(seen: Seen) -> Result<(), BoxError> {
        tokio::task::yield_now().await;
        let now = HandlerContext::current().map(|c| (c.lane(), c.call()));
        seen.lock().unwrap().push(now);
        Ok(())
    }

    fn outside() -> Option<u32> {
        HandlerContext::current().map(|c| c.call())
    }

    #[tokio::test]
    async fn the_context_is_current_during_a_call_only() {
        let seen = Seen::default();
        let s = seen.clone();
        HandlerContext::slot_for(async move {
            assert_eq!(outside(), None);
            ctx(1)
                .make_call(std::pin::pin!(seeing(s.clone())))
                .await
                .unwrap();
            assert_eq!(outside(), None);
            ctx(2)
                .make_call(std::pin::pin!(seeing(s.clone())))
                .await
                .unwrap();
            // A call dropped half-way (cancelled) leaves no context behind.
            let pending = std::pin::pin!(std::future::pending::<Result<(), BoxError>>());
            let mut call = Box::pin(ctx(3).make_call(pending));
            let polled = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(call.as_mut().poll(cx).is_pending())
            })
            .await;
            assert!(polled, "the call waits");
            drop(call);
            assert_eq!(outside(), None);
            // A call inside a call gets its own scope; the outer one is kept.
            let inner = s.clone();
            let outer = s.clone();
            let nested = async move {
                ctx(5).make_call(std::pin::pin!(seeing(inner))).await?;
                seeing(outer).await
            };
            ctx(4).make_call(std::pin::pin!(nested)).await.unwrap();
            // A panic is an error naming it, and empties the slot too.
            let panics = async {
                if outside() == Some(6) {
                    panic!("boom");
                }
                Ok(())
            };
            let err = ctx(6).make_call(std::pin::pin!(panics)).await.unwrap_err();
            assert!(err.to_string().contains("panicked: boom"), "{err}");
            assert_eq!(outside(), None);
        })
        .await;
        // Without a slot for the task, a call still sees its context.
        ctx(7)
            .make_call(std::pin::pin!(seeing(seen.clone())))
            .await
            .unwrap();
        assert_eq!(outside(), None);
        let seen: Vec<_> = seen.lock().unwrap().clone();
        let calls: Vec<_> = seen.iter().map(|s| s.map(|(_, call)| call)).collect();
        assert_eq!(calls, [Some(1), Some(2), Some(5), Some(4), Some(7)]);
        assert!(
            seen.iter()
                .all(|s| s.is_some_and(|(lane, _)| lane == Some(3)))
        );
    }
}
