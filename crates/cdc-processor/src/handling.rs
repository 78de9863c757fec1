//! The handler as the processor runs it: per event or in batches ([`Batches`] with its
//! limits, what [`IntoHandler`] makes of either), and the error that names the event a
//! handler failed on.

use std::sync::Arc;

use cdc_core::{BoxError, ChangeEvent, Dispatcher};

use crate::{BuildError, context::BatchDispatcher};

/// The user's handler: one event at a time, or batches.
#[derive(Clone)]
pub(crate) enum Handler {
    /// A per-event dispatcher.
    Event(Arc<dyn Dispatcher>),
    /// A batch dispatcher, with the limits of a batch.
    Batch(Arc<dyn BatchDispatcher>, BatchLimits),
}

/// The limits of one batch: whichever is reached first closes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BatchLimits {
    /// Most events (a transaction larger than this is handed over alone, whole).
    pub(crate) max_events: usize,
    /// Most raw bytes (a single unit larger than this is handed over alone).
    pub(crate) max_bytes: usize,
    /// How long to wait for more events once the first is in hand.
    pub(crate) max_wait: std::time::Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_events: 500,
            max_bytes: 8 * 1024 * 1024,
            max_wait: std::time::Duration::from_millis(10),
        }
    }
}

/// A batch handler with the limits of its batches, as [`crate::DocumentProcessor::start`]
/// takes it: `processor.start(Batches::new(sink).max_events(1000))`. Batches are formed
/// per lane; a batch's success acknowledges all its events.
#[derive(Clone, Debug)]
pub struct Batches<B> {
    handler: B,
    limits: BatchLimits,
}

impl<B: BatchDispatcher + 'static> Batches<B> {
    /// `handler` with the default limits: 500 events, 8 MiB, 10 ms.
    pub fn new(handler: B) -> Self {
        Self {
            handler,
            limits: BatchLimits::default(),
        }
    }

    /// The most events in one batch (at least 1; default 500; a transaction larger than
    /// this is handed over alone, whole).
    #[must_use]
    pub fn max_events(mut self, events: usize) -> Self {
        self.limits.max_events = events;
        self
    }

    /// The most raw bytes in one batch (at least 1; default 8 MiB; a single unit larger
    /// than this is handed over alone).
    #[must_use]
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.limits.max_bytes = bytes;
        self
    }

    /// How long a lane waits for more events once it holds one (default 10 ms; zero
    /// hands over what is queued at once).
    #[must_use]
    pub fn max_wait(mut self, wait: std::time::Duration) -> Self {
        self.limits.max_wait = wait;
        self
    }
}

/// A handler as the processor runs it (opaque: made by [`IntoHandler`]).
#[derive(Clone)]
pub struct HandlerSpec(pub(crate) Handler);

impl std::fmt::Debug for HandlerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Handler::Event(_) => "HandlerSpec::Event",
            Handler::Batch(..) => "HandlerSpec::Batch",
        })
    }
}

/// What [`crate::DocumentProcessor::start`] and `start_with_retry` take: any per-event
/// [`cdc_core::Dispatcher`] (a [`crate::JsonWatcher`], a [`cdc_core::DispatchChain`], …),
/// or a [`BatchDispatcher`] wrapped in [`Batches`] with its limits.
pub trait IntoHandler: Send + 'static {
    /// The handler as the processor runs it.
    ///
    /// # Errors
    /// A limit out of its range, named as the setter spells it.
    fn into_handler(self) -> Result<HandlerSpec, BuildError>;
}

impl<D: cdc_core::Dispatcher + 'static> IntoHandler for D {
    fn into_handler(self) -> Result<HandlerSpec, BuildError> {
        Ok(HandlerSpec(Handler::Event(Arc::new(self))))
    }
}

impl<B: BatchDispatcher + 'static> IntoHandler for Batches<B> {
    fn into_handler(self) -> Result<HandlerSpec, BuildError> {
        BuildError::at_least_one(&[
            ("max_events", self.limits.max_events),
            ("max_bytes", self.limits.max_bytes),
        ])?;
        Ok(HandlerSpec(Handler::Batch(
            Arc::new(self.handler),
            self.limits,
        )))
    }
}

pub(crate) fn handler_error(
    event: &ChangeEvent,
    source: BoxError,
    attempts: u32,
) -> cdc_core::Error {
    cdc_core::Error::Handler {
        operation: event.operation_type.clone(),
        cluster_time: event.cluster_time,
        document_id: event.document_id_string(),
        token: Some(event.token.clone()),
        attempts,
        source: source.into(),
    }
}
