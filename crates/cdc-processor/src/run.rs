//! The run loop: the one place that composes the reader, the handlers and the delivery
//! protocol. It opens the stream, tracks every event in the `Checkpointer` before its
//! handler runs, acknowledges it after, and saves the points the protocol says are due.

use std::time::{Duration, Instant};

use cdc_core::{
    ChangeEvent, Checkpointer, Dispatcher, ErrorKind, OperationType, ResumePoint, ResumeToken,
    StartPosition,
};
use tokio::sync::mpsc;

use crate::{
    DocumentProcessor, Error, Result,
    processor::InvalidatePolicy,
    reader::{HANDOFF, Item, read_ahead},
};

/// What became of one item: carry on (at this instant), or the stream ended.
pub(crate) enum Step {
    Next(Instant),
    End(Outcome),
}

pub(crate) enum Outcome {
    Stopped,
    Invalidated,
    Closed,
}

impl DocumentProcessor {
    async fn store_call<T>(&self, call: impl Future<Output = cdc_core::Result<T>>) -> Result<T> {
        let s = &self.inner.settings;
        match tokio::time::timeout(s.store_timeout, call).await {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::StoreTimeout {
                stream: s.stream_id.clone(),
                seconds: s.store_timeout.as_secs(),
            }),
        }
    }

    async fn save(&self, cp: &mut Checkpointer, mut point: ResumePoint) -> Result<()> {
        let s = &self.inner.settings;
        point.saved_at = bson::DateTime::now();
        self.store_call(s.store.save(&s.stream_id, &point)).await?;
        cp.confirm(&point, Instant::now());
        let mut stats = self.stats_mut();
        stats.checkpoints += 1;
        stats.last_checkpoint = Some(point.cluster_time);
        stats.checkpoint_lag_events = u64::from(cp.unsaved_events());
        stats.checkpoint_lag_seconds = stats.last_cluster_time.map_or(0, |t| {
            u64::from(t.time.saturating_sub(point.cluster_time.time))
        });
        Ok(())
    }

    /// A first start has no stored point and opens at "now": that position is saved at
    /// once, so a crash before the first checkpoint does not make the next start open at a
    /// later "now" and skip what came in between.
    async fn save_initial_position(
        &self,
        cp: &mut Checkpointer,
        initial: Option<ResumeToken>,
    ) -> Result<()> {
        match initial {
            Some(token) => {
                let time = token.cluster_time_hint().unwrap_or_default();
                self.save(
                    cp,
                    ResumePoint::post_batch(token, time, bson::DateTime::now()),
                )
                .await
            }
            None => {
                tracing::warn!(
                    "the new stream gave no initial resume token; the first checkpoint comes with the first event"
                );
                Ok(())
            }
        }
    }

    async fn flush(&self, cp: &mut Checkpointer) -> Result<()> {
        match cp.flush() {
            Some(point) => self.save(cp, point).await,
            None => Ok(()),
        }
    }

    pub(crate) async fn run(&self, handler: &dyn Dispatcher) -> Result<()> {
        let s = &self.inner.settings;
        if self.inner.cancel.is_cancelled() {
            return Ok(());
        }
        let stored = self.store_call(s.store.load(&s.stream_id)).await?;
        self.stats_mut().last_checkpoint = stored.as_ref().map(|p| p.cluster_time);
        let mut cp = Checkpointer::new(s.policy.clone(), stored.clone(), Instant::now());
        let mut position = StartPosition::after(stored.as_ref());
        loop {
            tracing::info!(source = %s.source.describe(), ?position, "opening the change stream");
            let cursor = tokio::select! {
                c = s.source.open(&position) => c?,
                () = self.inner.cancel.cancelled() => return Ok(()),
            };
            if cp.persisted().is_none() && cp.pending().is_none() {
                let initial = cursor.resume_token();
                self.save_initial_position(&mut cp, initial).await?;
            }
            // About `prefetch` events in flight: handoffs of up to HANDOFF events each.
            let handoff = s.prefetch.clamp(1, HANDOFF);
            let (tx, mut rx) = mpsc::channel((s.prefetch / handoff).max(1));
            let reader = tokio::spawn(read_ahead(cursor, tx, handoff));
            let outcome = self.consume(&mut rx, &mut cp, handler).await;
            drop(rx);
            if tokio::time::timeout(Duration::from_secs(5), reader)
                .await
                .is_err()
            {
                tracing::warn!("the cursor reader did not finish within 5 s");
            }
            match outcome {
                Ok(Outcome::Stopped) => {
                    self.flush(&mut cp).await?;
                    tracing::info!("stopped");
                    return Ok(());
                }
                Ok(Outcome::Invalidated) if s.invalidate == InvalidatePolicy::Stop => {
                    self.flush(&mut cp).await?;
                    return Err(Error::Invalidated(s.stream_id.clone()));
                }
                Ok(Outcome::Invalidated | Outcome::Closed) => {
                    self.flush(&mut cp).await?;
                    cp.reset_outstanding();
                    position = cp.resume_position();
                    self.stats_mut().reopens += 1;
                    tracing::info!(?position, "the stream was closed by the server: reopening");
                }
                Err(e) => {
                    if let Err(flush) = self.flush(&mut cp).await {
                        tracing::warn!(error = %flush, "the final checkpoint after a failure could not be written");
                    }
                    return Err(e);
                }
            }
        }
    }

    async fn consume(
        &self,
        rx: &mut mpsc::Receiver<Vec<Item>>,
        cp: &mut Checkpointer,
        handler: &dyn Dispatcher,
    ) -> Result<Outcome> {
        let mut invalidated = false;
        loop {
            let batch = tokio::select! {
                biased;
                () = self.inner.cancel.cancelled() => return Ok(Outcome::Stopped),
                batch = rx.recv() => batch,
            };
            let Some(batch) = batch else {
                return Err(cdc_core::Error::source(
                    ErrorKind::Transient,
                    "the cursor reader ended unexpectedly",
                )
                .into());
            };
            for item in batch {
                // Events not yet tracked are simply read again after a stop.
                if self.inner.cancel.is_cancelled() {
                    return Ok(Outcome::Stopped);
                }
                let now = match self.step(item, cp, handler, &mut invalidated).await? {
                    Step::Next(now) => now,
                    Step::End(outcome) => return Ok(outcome),
                };
                if let Some(point) = cp.tick(now) {
                    self.save(cp, point).await?;
                }
            }
        }
    }

    /// Acts on one item from the reader.
    async fn step(
        &self,
        item: Item,
        cp: &mut Checkpointer,
        handler: &dyn Dispatcher,
        invalidated: &mut bool,
    ) -> Result<Step> {
        match item {
            Item::Event(event) => {
                if cp.is_blocked() {
                    self.flush(cp).await?;
                }
                // `saved_at` is stamped when the point is saved.
                let seq = cp.track(event.resume_point(bson::DateTime::MIN))?;
                if let Err(source) = handler.dispatch(&event, None).await {
                    return Err(cdc_core::Error::Handler {
                        operation: event.operation_type.clone(),
                        cluster_time: event.cluster_time,
                        source,
                    }
                    .into());
                }
                let now = Instant::now();
                if let Some(point) = cp.ack(seq, now)? {
                    self.save(cp, point).await?;
                }
                self.count(&event, cp);
                *invalidated |= event.operation_type == OperationType::Invalidate;
                return Ok(Step::Next(now));
            }
            Item::Idle(token) => {
                let now = Instant::now();
                let due = match token {
                    Some(t) => cp.idle(t, now, bson::DateTime::now()),
                    None => cp.tick(now),
                };
                if let Some(point) = due {
                    self.save(cp, point).await?;
                }
            }
            // Time passed: the tick after every item covers it.
            Item::Tick => {}
            Item::Gap(gap) => {
                tracing::error!(%gap, "events were lost to oplog rollover (restart-from-now policy)");
                self.stats_mut().last_gap = Some(gap);
            }
            Item::Closed => {
                return Ok(Step::End(if *invalidated {
                    Outcome::Invalidated
                } else {
                    Outcome::Closed
                }));
            }
            Item::Failed(e) => return Err(e.into()),
        }
        Ok(Step::Next(Instant::now()))
    }

    /// Counts a handled event (one lock, no allocation once its type has been seen).
    fn count(&self, event: &ChangeEvent, cp: &Checkpointer) {
        let mut stats = self.stats_mut();
        stats.events += 1;
        let kind = event.operation_type.as_str();
        match stats.events_by_type.get_mut(kind) {
            Some(n) => *n += 1,
            None => {
                stats.events_by_type.insert(kind.to_owned(), 1);
            }
        }
        stats.last_cluster_time = Some(event.cluster_time);
        stats.checkpoint_lag_events = u64::from(cp.unsaved_events());
    }
}
