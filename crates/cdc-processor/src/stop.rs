//! The processor's stop signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Asked once per event by the run loop, so it answers from a flag: the token's own
/// `is_cancelled` takes a lock. The flag is set before the token is cancelled, so a
/// task woken by [`Stop::cancelled`] also sees [`Stop::is_cancelled`].
#[derive(Clone, Debug, Default)]
pub(crate) struct Stop {
    token: CancellationToken,
    flag: Arc<AtomicBool>,
}

impl Stop {
    pub(crate) fn cancel(&self) {
        self.flag.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Resolves once [`Stop::cancel`] was called (at once if it was).
    pub(crate) fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_is_seen_by_every_clone_and_wakes_waiters() {
        let stop = Stop::default();
        let other = stop.clone();
        assert!(!other.is_cancelled());
        let waiter = tokio::spawn(async move {
            other.cancelled().await;
            other.is_cancelled()
        });
        tokio::task::yield_now().await;
        stop.cancel();
        assert!(stop.is_cancelled());
        assert!(waiter.await.unwrap(), "a woken waiter sees the flag");
        // Waiting after the stop resolves at once.
        stop.cancelled().await;
    }
}
