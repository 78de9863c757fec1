//! Dispatch chains: the Go package's `ChangeEventDispatcherFunc` semantics.
//!
//! Dispatchers run in order. Each receives the event and the error the previous one
//! returned (if any), and may pass it on, replace it or clear it. The error left after the
//! last dispatcher is the chain's result: it stops the stream, and the event is not
//! acknowledged.

use async_trait::async_trait;

use crate::{BoxError, ChangeEvent};

/// One step of a dispatch chain.
#[async_trait]
pub trait Dispatcher: Send + Sync {
    /// Handles `event`. `previous` is the error of the dispatcher before this one in the
    /// chain; return it to pass it on, or `Ok(())` to clear it.
    async fn dispatch(
        &self,
        event: &ChangeEvent,
        previous: Option<BoxError>,
    ) -> Result<(), BoxError>;
}

/// A dispatcher from a synchronous closure with the chain signature.
pub struct FnDispatcher<F>(pub F);

impl<F> std::fmt::Debug for FnDispatcher<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnDispatcher")
    }
}

#[async_trait]
impl<F> Dispatcher for FnDispatcher<F>
where
    F: Fn(&ChangeEvent, Option<BoxError>) -> Result<(), BoxError> + Send + Sync,
{
    async fn dispatch(
        &self,
        event: &ChangeEvent,
        previous: Option<BoxError>,
    ) -> Result<(), BoxError> {
        (self.0)(event, previous)
    }
}

/// Dispatchers run in order, each seeing the previous one's error.
#[derive(Default)]
pub struct DispatchChain {
    steps: Vec<Box<dyn Dispatcher>>,
}

impl std::fmt::Debug for DispatchChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatchChain")
            .field("steps", &self.steps.len())
            .finish()
    }
}

impl DispatchChain {
    /// An empty chain (which accepts every event).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a dispatcher.
    #[must_use]
    pub fn then(mut self, step: impl Dispatcher + 'static) -> Self {
        self.steps.push(Box::new(step));
        self
    }

    /// Appends a boxed dispatcher.
    pub fn push(&mut self, step: Box<dyn Dispatcher>) {
        self.steps.push(step);
    }

    /// How many dispatchers the chain holds.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether the chain is empty.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

#[async_trait]
impl Dispatcher for DispatchChain {
    async fn dispatch(
        &self,
        event: &ChangeEvent,
        previous: Option<BoxError>,
    ) -> Result<(), BoxError> {
        let mut carried = previous;
        for step in &self.steps {
            carried = step.dispatch(event, carried).await.err();
        }
        match carried {
            None => Ok(()),
            Some(err) => Err(err),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        future::Future,
        pin::pin,
        sync::{Arc, Mutex},
        task::{Context, Poll, Waker},
    };

    use super::*;
    use crate::{ClusterTime, OperationType, ResumeToken};

    /// Drives a future that never waits on I/O (the core has no runtime).
    pub(crate) fn block_on<F: Future>(fut: F) -> F::Output {
        let mut fut = pin!(fut);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
                return out;
            }
        }
    }

    fn event() -> ChangeEvent {
        let token = ResumeToken::from_document(&bson::doc! { "_data": "82" }).unwrap();
        ChangeEvent::new(token, OperationType::Insert, ClusterTime::new(1, 1))
    }

    fn recorder(
        log: &Arc<Mutex<Vec<String>>>,
        name: &'static str,
        fail: bool,
    ) -> impl Dispatcher + 'static {
        let log = Arc::clone(log);
        FnDispatcher(move |_e: &ChangeEvent, prev: Option<BoxError>| {
            log.lock().unwrap().push(format!(
                "{name} saw {:?}",
                prev.as_ref().map(ToString::to_string)
            ));
            if fail {
                Err(format!("{name} failed").into())
            } else {
                prev.map_or(Ok(()), Err)
            }
        })
    }

    #[test]
    fn chain_runs_in_order_and_passes_errors_on() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let chain = DispatchChain::new()
            .then(recorder(&log, "a", false))
            .then(recorder(&log, "b", true))
            .then(recorder(&log, "c", false));
        let err = block_on(chain.dispatch(&event(), None)).unwrap_err();
        assert_eq!(err.to_string(), "b failed");
        assert_eq!(
            *log.lock().unwrap(),
            vec!["a saw None", "b saw None", "c saw Some(\"b failed\")"]
        );
    }

    #[test]
    fn a_later_dispatcher_may_clear_an_error() {
        let chain = DispatchChain::new()
            .then(FnDispatcher(|_: &ChangeEvent, _| Err("first".into())))
            .then(FnDispatcher(|_: &ChangeEvent, prev: Option<BoxError>| {
                assert_eq!(prev.unwrap().to_string(), "first");
                Ok(())
            }));
        assert!(block_on(chain.dispatch(&event(), None)).is_ok());
        assert_eq!(chain.len(), 2);
        assert!(block_on(DispatchChain::new().dispatch(&event(), None)).is_ok());
    }

    #[test]
    fn chain_is_object_safe() {
        let boxed: Box<dyn Dispatcher> = Box::new(DispatchChain::new());
        assert!(block_on(boxed.dispatch(&event(), None)).is_ok());
    }
}
