//! The retry loop: runs the processor again after retryable failures, with a backoff the
//! caller chooses.

use std::{future::Future, time::Duration};

use crate::stop::Stop;
use backon::BackoffBuilder;

use crate::{Result, stats::Counters};

/// Runs `run` again after retryable failures, waiting the delays of `backoff` between
/// runs; the backoff starts over after a run that handled at least one event (counted in
/// `stats.events`). Fatal errors end it at once; [`cdc_core::ErrorKind::Persistent`]
/// ones after [`cdc_core::PERSISTENT_TRIES`] failed runs in a row. A `cancel` that lands
/// while it waits ends it with `Ok`.
pub(crate) async fn restart_loop<B, F, Fut>(
    backoff: B,
    stream: &str,
    cancel: &Stop,
    stats: &Counters,
    mut run: F,
) -> Result<()>
where
    B: BackoffBuilder + Clone,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut delays = backoff.clone().build();
    // Failed runs in a row with a persistent error.
    let mut persistent = 0_u32;
    loop {
        let before = stats.lock().events;
        let err = match run().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        // A handler error reaches here only once the handler-error policy gave up on
        // its event (in-process retries done): the same event would fail again.
        if !err.is_retryable() {
            return Err(err);
        }
        if cancel.is_cancelled() {
            return Ok(());
        }
        if stats.lock().events > before {
            delays = backoff.clone().build();
            persistent = 0;
        }
        if err.kind() == cdc_core::ErrorKind::Persistent {
            persistent += 1;
            if persistent >= cdc_core::PERSISTENT_TRIES {
                tracing::error!(%stream, error = %err, tries = persistent, "giving up: the same failure every time");
                return Err(err);
            }
        } else {
            persistent = 0;
        }
        let Some(delay) = delays.next() else {
            return Err(err);
        };
        stats.lock().restarts += 1;
        tracing::warn!(%stream, error = %err, ?delay, "restarting after a failure");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return Ok(()),
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
