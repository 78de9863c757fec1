//! What a processor was built with: the settings its parts are handed.

use std::{sync::Arc, time::Duration};

use cdc_core::{ChangeSource, CheckpointPolicy, DeadLetterStore, ResumeStore, StartPosition};

use crate::{lease::LeaseSettings, poison::HandlerErrorPolicy};

/// What happens when the watched collection is dropped or renamed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidatePolicy {
    /// Dispatch and store the invalidate event, then reopen with `startAfter` it in
    /// process, so events on a collection re-created under the same name keep flowing.
    #[default]
    Restart,
    /// Dispatch and store the invalidate event, then stop with [`crate::Error::Invalidated`].
    Stop,
}

/// The settings of one processor, checked by the builder.
pub(crate) struct Settings {
    pub(crate) stream_id: String,
    /// The handler saves points itself (see `Builder::handler_checkpoints`).
    pub(crate) handler_checkpoints: bool,
    pub(crate) source: Arc<dyn ChangeSource>,
    pub(crate) store: Arc<dyn ResumeStore>,
    pub(crate) policy: CheckpointPolicy,
    pub(crate) invalidate: InvalidatePolicy,
    pub(crate) store_timeout: Duration,
    pub(crate) prefetch: usize,
    pub(crate) on_handler_error: HandlerErrorPolicy,
    pub(crate) dead_letters: Option<Arc<dyn DeadLetterStore>>,
    /// Lanes (1: handled one at a time, in the run loop).
    pub(crate) concurrency: usize,
    /// Keep the events of one transaction together (`None`: when `concurrency > 1`).
    pub(crate) keep_transactions: Option<bool>,
    /// The byte budget of events read and not yet handled.
    pub(crate) max_buffered_bytes: usize,
    /// How long handlers in flight may take after `stop()` before they are cancelled.
    pub(crate) stop_timeout: Option<Duration>,
    /// Read the documents anew when the stream's history is lost (snapshot when needed).
    pub(crate) resnapshot: bool,
    /// Where to start when the store holds no point (`None`: now).
    pub(crate) initial_position: Option<StartPosition>,
    /// The lease to hold while handling, if any.
    pub(crate) lease: Option<LeaseSettings>,
    /// Shapes events before any handler sees them (`None`: as they come).
    pub(crate) transform: Option<Arc<crate::Transform>>,
}
