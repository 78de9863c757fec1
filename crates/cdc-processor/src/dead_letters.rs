//! The dead-letter API of a processor: list, count, replay through a handler, delete.

use std::{collections::HashSet, sync::atomic::Ordering};

use cdc_core::{DeadLetter, DeadLetterStore, Dispatcher};

use crate::{DocumentProcessor, Error, Result};

/// What a replay of dead letters did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayReport {
    /// Letters the handler now succeeded on: removed from the store.
    pub replayed: u64,
    /// Letters the handler failed on again (after the policy's retries): kept.
    pub failed: u64,
    /// Letters kept without a call, behind a failed letter of the same document key.
    pub held: u64,
}

impl DocumentProcessor {
    fn letter_store(&self) -> Result<&dyn DeadLetterStore> {
        self.inner
            .settings
            .dead_letters
            .as_deref()
            .ok_or(Error::Build(crate::BuildError::Missing {
                setting: "store",
                hint: "there is no dead-letter store: give one with Storage::new(points).dead_letters(…), a leased store, or &Stores",
            }))
    }

    /// Up to `limit` dead letters of this processor's stream, oldest first.
    ///
    /// # Errors
    /// [`Error::Build`] without a dead-letter store; the store's error when it fails.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let store = self.letter_store()?;
        Ok(store.list(self.stream_id(), limit).await?)
    }

    /// How many dead letters this processor's stream has.
    ///
    /// # Errors
    /// As [`DocumentProcessor::dead_letters`].
    pub async fn dead_letter_count(&self) -> Result<u64> {
        let store = self.letter_store()?;
        Ok(store.count(self.stream_id()).await?)
    }

    /// Deletes the dead letter `id` (its event is then given up for good); `false` when
    /// there was none. A parked key is released once it has no dead letters left.
    ///
    /// # Errors
    /// As [`DocumentProcessor::dead_letters`].
    pub async fn delete_dead_letter(&self, id: &str) -> Result<bool> {
        let store = self.letter_store()?;
        let removed = store.remove(self.stream_id(), id).await?;
        self.inner.poison.load_parked().await?;
        Ok(removed)
    }

    /// Hands every dead letter of this stream, oldest first, to `handler` (under the
    /// handler-error policy's retries). A letter the handler succeeds on is removed; one
    /// it fails on again is kept, and so are the later letters of the same document key
    /// (without a call), so a key's order holds. Parked keys with no letters left are
    /// released. Run it while the processor is not running (it refuses otherwise); with
    /// several instances, while none consumes the stream.
    ///
    /// # Errors
    /// [`Error::AlreadyRunning`] while `start` runs; [`Error::Stopped`] after `stop()`;
    /// [`Error::Build`] without a dead-letter store; a store failure (what was replayed
    /// before it stays replayed).
    pub async fn replay_dead_letters(&self, handler: impl Dispatcher) -> Result<ReplayReport> {
        let store = self.letter_store()?;
        if self.inner.running.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadyRunning(self.stream_id().to_owned()));
        }
        let result = self.replay(store, &handler).await;
        self.inner.running.store(false, Ordering::Release);
        let reloaded = self.inner.poison.load_parked().await;
        let report = result?;
        reloaded?;
        Ok(report)
    }

    async fn replay(
        &self,
        store: &dyn DeadLetterStore,
        handler: &dyn Dispatcher,
    ) -> Result<ReplayReport> {
        let stream = self.stream_id();
        let mut report = ReplayReport::default();
        let mut held_keys: HashSet<Vec<u8>> = HashSet::new();
        // After the processor stopped, a replay still runs (with a stop signal of its own).
        let cancel = if self.inner.cancel.is_cancelled() {
            tokio_util::sync::CancellationToken::new()
        } else {
            self.inner.cancel.clone()
        };
        let ctx = crate::context::HandlerContext::new(
            None,
            self.inner.attempts.load(Ordering::Relaxed),
            cancel,
            self.inner.settings.stop_timeout,
        );
        for letter in store.list(stream, usize::MAX).await? {
            let event = letter.decode()?;
            let key = event.document_key().map(|k| k.as_bytes().to_vec());
            if key.as_ref().is_some_and(|k| held_keys.contains(k)) {
                report.held += 1;
                continue;
            }
            match self
                .inner
                .poison
                .retrying(&ctx, |_| handler.dispatch(&event, None))
                .await
            {
                Ok(Some(())) => {
                    store.remove(stream, &letter.id).await?;
                    report.replayed += 1;
                }
                Ok(None) => break,
                Err((e, calls)) => {
                    tracing::warn!(id = %letter.id, error = %e, calls, "a dead letter failed again: kept");
                    report.failed += 1;
                    held_keys.extend(key);
                }
            }
        }
        Ok(report)
    }
}
