//! The retry loop: runs the processor again after retryable failures, with a backoff the
//! caller chooses.

use std::time::Duration;

use backon::BackoffBuilder;

use crate::{DocumentProcessor, IntoHandler, Result, lanes::Handler};

impl DocumentProcessor {
    /// [`DocumentProcessor::start`] (with either kind of handler) until stopped,
    /// restarting after retryable failures (transient source errors,
    /// store failures; handler errors are retried in process under
    /// [`crate::Builder::on_handler_error`], never here) with the
    /// given backoff; [`default_backoff`] is exponential with jitter. The backoff starts
    /// over after a run that handled at least one event. Fatal errors end it at once;
    /// [`cdc_core::ErrorKind::Persistent`] ones (a store only a person can mend) after
    /// [`cdc_core::PERSISTENT_TRIES`] failed runs in a row.
    ///
    /// A `stop()` that lands while it waits to retry ends it with `Ok` (the stop is
    /// graceful); the failure that caused the wait stays visible in
    /// [`crate::Stats::last_error`] and was published on
    /// [`DocumentProcessor::on_start_err`] when it happened.
    ///
    /// # Errors
    /// The first error not worth retrying, or the last one when the backoff gives up;
    /// [`crate::Error::Stopped`] when the processor was already stopped.
    pub async fn start_with_retry<B>(&self, backoff: B, handler: impl IntoHandler) -> Result<()>
    where
        B: BackoffBuilder + Clone,
    {
        self.not_stopped()?;
        let handler = handler.into_handler().map_err(crate::Error::Build)?;
        self.retry_loop(backoff, &handler.0).await
    }

    async fn retry_loop<B>(&self, backoff: B, handler: &Handler) -> Result<()>
    where
        B: BackoffBuilder + Clone,
    {
        let mut delays = backoff.clone().build();
        // Failed runs in a row with a persistent error.
        let mut persistent = 0_u32;
        loop {
            let before = self.stats_mut().events;
            let err = match self.run_guarded(handler).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            // A handler error reaches here only once the handler-error policy gave up on
            // its event (in-process retries done): the same event would fail again.
            if !err.is_retryable() {
                return Err(err);
            }
            if self.inner.cancel.is_cancelled() {
                return Ok(());
            }
            if self.stats_mut().events > before {
                delays = backoff.clone().build();
                persistent = 0;
            }
            if err.kind() == cdc_core::ErrorKind::Persistent {
                persistent += 1;
                if persistent >= cdc_core::PERSISTENT_TRIES {
                    tracing::error!(stream = %self.stream_id(), error = %err, tries = persistent, "giving up: the same failure every time");
                    return Err(err);
                }
            } else {
                persistent = 0;
            }
            let Some(delay) = delays.next() else {
                return Err(err);
            };
            self.stats_mut().restarts += 1;
            tracing::warn!(stream = %self.stream_id(), error = %err, ?delay, "restarting after a failure");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.inner.cancel.cancelled() => return Ok(()),
            }
        }
    }
}

/// Exponential backoff with jitter: 100 ms doubling to 30 s, retrying forever.
pub fn default_backoff() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(30))
        .without_max_times()
}
