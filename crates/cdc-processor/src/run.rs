//! The run loop: the one place that composes the reader, the handlers and the delivery
//! protocol. It opens the stream, tracks every event in the `Checkpointer` before its
//! handler runs, acknowledges it after, and saves the points the protocol says are due.

use std::time::{Duration, Instant};

use cdc_core::{
    ChangeEvent, CheckpointPolicy, Checkpointer, Dispatcher, ErrorKind, OperationType, ResumePoint,
    ResumeToken, StartPosition,
};
use tokio::sync::mpsc;

use std::sync::{Arc, atomic::AtomicU32};

use crate::stop::Stop;

use crate::{
    Error, Result,
    context::HandlerContext,
    handling::Handler,
    lanes::{Done, Lanes, Outcome as LaneOutcome, Tally, Tracked, Unit, handle_until_deadline},
    lease::Held,
    poison::Fate,
    poison::Poison,
    reader::{Budget, HANDOFF, Handoff, Item, read_ahead},
    reader::{Progress, Requests},
    settings::{InvalidatePolicy, Settings},
    stats::Counters,
};

/// What became of one item: carry on (at this instant), or the stream ended.
pub(crate) enum Step {
    /// An event was handled and acknowledged at this instant (what is due then was saved).
    Handled(Instant),
    /// Another item was acted on at this instant.
    Next(Instant),
    End(Outcome),
}

pub(crate) enum Outcome {
    Stopped,
    Invalidated,
    Closed,
    /// The source has nothing more (a snapshot-only source after its scan), with the
    /// position a later start continues from.
    Finished(Option<ResumeToken>),
}

/// What a run shares with the processor's handle: the stop signal, the counters, the
/// handler-error policy, the snapshot requests, the lease held now and what the reader saw.
pub(crate) struct Shared {
    pub(crate) cancel: Stop,
    pub(crate) stats: Arc<Counters>,
    /// Runs started (the attempt number handlers see).
    pub(crate) attempts: AtomicU32,
    pub(crate) poison: Arc<Poison>,
    /// Snapshots requested while streaming, waiting for the reader.
    pub(crate) requests: Arc<Requests>,
    /// The lease held now (with a leased store).
    pub(crate) held: Arc<Held>,
    /// What the cursor reader saw.
    pub(crate) progress: Arc<Progress>,
}

/// One run of a processor: opens the stream where the store says, hands every event to
/// the handler (in the loop, or through lanes), and saves the points the protocol says
/// are due. Handed the settings and what it shares with the processor's handle.
pub(crate) struct RunLoop<'a> {
    pub(crate) settings: &'a Settings,
    pub(crate) shared: &'a Shared,
}

impl RunLoop<'_> {
    async fn store_call<T>(&self, call: impl Future<Output = cdc_core::Result<T>>) -> Result<T> {
        let s = &self.settings;
        match tokio::time::timeout(s.store_timeout, call).await {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::StoreTimeout {
                stream: s.stream_id.clone(),
                timeout: s.store_timeout,
            }),
        }
    }

    async fn save(&self, cp: &mut Checkpointer, mut point: ResumePoint) -> Result<()> {
        let s = &self.settings;
        point.saved_at = bson::DateTime::now();
        if let Some(origin) = s.source.origin() {
            point.origin = Some(origin);
        }
        let saved = match (&s.lease, self.shared.held.get()) {
            (Some(l), Some(lease)) => self.store_call(l.store.save_fenced(&lease, &point)).await,
            // Leased but not held: a run never gets here without the lease.
            (Some(_), None) => {
                return Err(cdc_core::Error::Fenced {
                    stream: s.stream_id.clone(),
                    token: 0,
                    newest: None,
                }
                .into());
            }
            (None, _) => self.store_call(s.store.save(&s.stream_id, &point)).await,
        };
        match saved {
            Ok(()) => {}
            // The stored point is past this one, at an event this run handed out, and
            // the handler saves points: it saved it itself, in its own transaction with its effects (a sink's
            // exactly-once checkpoint). This point is covered; nothing moves backwards.
            Err(Error::Cdc(cdc_core::Error::Regression { stored, .. }))
                if s.handler_checkpoints
                    && cp.latest_time().is_some_and(|latest| stored <= latest) =>
            {
                tracing::debug!(?stored, attempted = ?point.cluster_time, "the handler saved a later point itself");
            }
            Err(e) => return Err(e),
        }
        cp.confirm(&point, Instant::now());
        let mut stats = self.shared.stats.lock();
        stats.checkpoints += 1;
        stats.last_checkpoint = Some(point.cluster_time);
        stats.last_checkpoint_at = Some(std::time::SystemTime::now());
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

    pub(crate) async fn run(&self, handler: &Handler) -> Result<()> {
        let s = &self.settings;
        if self.shared.cancel.is_cancelled() {
            return Ok(());
        }
        let stored = self.store_call(s.store.load(&s.stream_id)).await?;
        if let Some(point) = &stored {
            validate_stored(point, &s.stream_id, &s.store.describe())?;
            if let Some(origin) = s.source.origin() {
                point.check_origin(&s.stream_id, &s.store.describe(), &origin)?;
            }
            let newest = tokio::select! {
                t = s.source.cluster_time() => t?,
                () = self.shared.cancel.cancelled() => return Ok(()),
            };
            if let Some(newest) = newest
                && point.cluster_time > newest
            {
                return Err(cdc_core::Error::PointAhead {
                    stream: s.stream_id.clone(),
                    location: s.store.describe(),
                    stored: point.cluster_time,
                    deployment: newest,
                }
                .into());
            }
        }
        self.shared.stats.lock().last_checkpoint = stored.as_ref().map(|p| p.cluster_time);
        self.shared.poison.load_parked().await?;
        let mut cp = Checkpointer::new(self.policy_for(handler), stored.clone(), Instant::now());
        let mut position = match (&stored, &s.initial_position) {
            (None, Some(initial)) => initial.clone(),
            (stored, _) => StartPosition::after(stored.as_ref()),
        };
        loop {
            tracing::info!(source = %s.source.describe(), ?position, "opening the change stream");
            let cursor = tokio::select! {
                c = s.source.open(&position) => match c {
                    Err(e) if e.kind() == ErrorKind::InvalidToken => {
                        // Say which stream's point, and where it lives.
                        return Err(cdc_core::Error::TokenRefused {
                            stream: s.stream_id.clone(),
                            location: s.store.describe(),
                            source: std::sync::Arc::new(e),
                        }
                        .into());
                    }
                    c => c?,
                },
                () = self.shared.cancel.cancelled() => return Ok(()),
            };
            if cp.persisted().is_none() && cp.pending().is_none() {
                let initial = cursor.resume_token();
                self.save_initial_position(&mut cp, initial).await?;
            }
            // About `prefetch` events in flight: handoffs of up to HANDOFF events each.
            let handoff = s.prefetch.clamp(1, HANDOFF);
            let (tx, mut rx) = mpsc::channel((s.prefetch / handoff).max(1));
            let budget = Budget::new(crate::reader::read_ahead_bytes(s.max_buffered_bytes));
            let reader = tokio::spawn(read_ahead(
                cursor,
                tx,
                handoff,
                budget,
                Some((
                    std::sync::Arc::clone(&s.source),
                    std::sync::Arc::clone(&self.shared.requests),
                )),
                std::sync::Arc::clone(&self.shared.progress),
                s.transform.clone(),
            ));
            let outcome = match handler {
                Handler::Event(h) if s.concurrency <= 1 && s.keep_transactions != Some(true) => {
                    HandlerContext::slot_for(self.consume(&mut rx, &mut cp, &**h)).await
                }
                _ => {
                    // Enough queued per lane to keep it busy; the protocol's bound and the
                    // byte budget limit what is in flight overall.
                    let queue = (s.prefetch / s.concurrency.max(1)).clamp(1, 64);
                    let mut lanes = Lanes::start(
                        s.concurrency.max(1),
                        queue,
                        handler,
                        &self.context(None),
                        &self.shared.poison,
                    );
                    let keep = s.keep_transactions.unwrap_or(s.concurrency > 1);
                    let consuming = self.consume_lanes(&mut rx, &mut cp, handler, &mut lanes, keep);
                    let outcome = HandlerContext::slot_for(consuming).await;
                    if matches!(&outcome, Err(e) if e.kind() == ErrorKind::Fenced) {
                        // Another instance holds the lease now: the handlers in flight are
                        // cancelled at once (dropping the lanes aborts them).
                        drop(lanes);
                    } else {
                        lanes.shutdown().await;
                    }
                    outcome
                }
            };
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
                Ok(Outcome::Finished(position)) => {
                    self.flush(&mut cp).await?;
                    // Everything handled: a later start continues from where the source
                    // says (after a snapshot: the stream's position taken before it).
                    if let Some(token) = position
                        && cp.unsaved_events() == 0
                    {
                        let time = token
                            .cluster_time_hint()
                            .or(cp.persisted().map(|p| p.cluster_time))
                            .unwrap_or_default();
                        self.save(
                            &mut cp,
                            ResumePoint::post_batch(token, time, bson::DateTime::now()),
                        )
                        .await?;
                    }
                    tracing::info!("the source has nothing more (snapshot only): stopped");
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
                    self.shared.stats.lock().reopens += 1;
                    tracing::info!(?position, "the stream was closed by the server: reopening");
                }
                Err(e) if e.kind() == ErrorKind::HistoryLost && s.resnapshot => {
                    // What was handled is saved; the documents are read anew, then the
                    // stream continues from a position taken before that read.
                    self.flush(&mut cp).await?;
                    cp.reset_outstanding();
                    position = StartPosition::Now;
                    self.shared.stats.lock().reopens += 1;
                    tracing::error!(error = %e, "the stream's history is lost: reading the documents anew (snapshot when needed)");
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
        rx: &mut mpsc::Receiver<Handoff>,
        cp: &mut Checkpointer,
        handler: &dyn Dispatcher,
    ) -> Result<Outcome> {
        let mut counted = Counted::default();
        let outcome = self.consume_counting(rx, cp, handler, &mut counted).await;
        self.flush_counts(&mut counted, cp);
        outcome
    }

    async fn consume_counting(
        &self,
        rx: &mut mpsc::Receiver<Handoff>,
        cp: &mut Checkpointer,
        handler: &dyn Dispatcher,
        counted: &mut Counted,
    ) -> Result<Outcome> {
        let mut invalidated = false;
        // The same for every call of the run (its attempt, stop token, lease).
        let ctx = self.context(Some(0));
        loop {
            let batch = tokio::select! {
                biased;
                () = self.shared.cancel.cancelled() => return Ok(Outcome::Stopped),
                batch = rx.recv() => batch,
            };
            let Some(Handoff { items, bytes }) = batch else {
                return Err(reader_ended());
            };
            for item in items {
                // Events not yet tracked are simply read again after a stop.
                if self.shared.cancel.is_cancelled() {
                    return Ok(Outcome::Stopped);
                }
                let step = self.step(item, cp, handler, &ctx, &mut invalidated, counted);
                let now = match step.await? {
                    // The acknowledgement looked at what is due at `now` already.
                    Step::Handled(now) => now,
                    Step::Next(now) => {
                        if let Some(point) = cp.tick(now) {
                            self.save(cp, point).await?;
                        }
                        now
                    }
                    Step::End(outcome) => return Ok(outcome),
                };
                if now >= counted.flush_at {
                    self.flush_counts(counted, cp);
                }
            }
            // The batch is handled: its bytes go back with the counts.
            counted.give_back(bytes);
            self.flush_counts(counted, cp);
        }
    }

    /// Acts on one item from the reader: an event is tracked, handled under the error
    /// policy (unless the stop timeout runs out), acknowledged, and what is due is saved.
    async fn step(
        &self,
        item: Item,
        cp: &mut Checkpointer,
        handler: &dyn Dispatcher,
        ctx: &HandlerContext,
        invalidated: &mut bool,
        counted: &mut Counted,
    ) -> Result<Step> {
        // A raw event is decoded here, on the stack (no allocation for the event).
        let (boxed, decoded);
        let event: &ChangeEvent = match item {
            Item::Event(event, _) => {
                boxed = event;
                &boxed
            }
            Item::Raw(raw, _) => {
                decoded = counted.decoder.decode(raw)?;
                &decoded
            }
            other => return self.side_step(other, cp, invalidated).await,
        };
        if cp.is_blocked() {
            self.flush(cp).await?;
        }
        // `saved_at` is stamped when the point is saved.
        let seq = cp.track(event.resume_point(bson::DateTime::MIN))?;
        let poison = &self.shared.poison;
        let handling = std::pin::pin!(poison.handle_event(handler, event, ctx));
        let Some(fate) = ctx.before_deadline(handling).await else {
            tracing::warn!(
                "the handler did not finish within the stop timeout: cancelled, its event comes again"
            );
            return Ok(Step::End(Outcome::Stopped));
        };
        match fate {
            Fate::Abandoned => return Ok(Step::End(Outcome::Stopped)),
            Fate::Failed(e) => return Err(e.into()),
            Fate::Handled => {}
            fate => {
                let mut tally = Tally::default();
                tally.add(&fate);
                self.tally(tally);
            }
        }
        let now = Instant::now();
        if let Some(point) = cp.ack(seq, now)? {
            self.save(cp, point).await?;
        }
        counted.add(event);
        *invalidated |= event.operation_type == OperationType::Invalidate;
        Ok(Step::Handled(now))
    }

    /// Acts on an item that is not an event.
    async fn side_step(
        &self,
        item: Item,
        cp: &mut Checkpointer,
        invalidated: &mut bool,
    ) -> Result<Step> {
        match item {
            Item::Idle(token) => self.idle(token, cp).await?,
            // Time passed: the tick after every item covers it.
            Item::Tick | Item::Event(..) | Item::Raw(..) => {}
            Item::Gap(gap) => self.gap(gap),
            Item::Finished(position) => return Ok(Step::End(Outcome::Finished(position))),
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

    /// The checkpoint policy in force: the builder's, except that every lane may hold one
    /// event (a batch handler's `Batches::max_events`) in flight: a smaller bound of
    /// unsaved events would keep lanes idle and batches from filling, so the bound is
    /// raised to that (and so is the bound of repeats after a crash).
    fn policy_for(&self, handler: &Handler) -> CheckpointPolicy {
        let s = &self.settings;
        let per_lane = match handler {
            Handler::Batch(_, limits) => limits.max_events,
            Handler::Event(_) if s.concurrency > 1 => 1,
            Handler::Event(_) => return s.policy.clone(),
        };
        let wanted =
            u32::try_from(per_lane.saturating_mul(s.concurrency.max(1))).unwrap_or(u32::MAX);
        if s.policy.max_events() >= wanted {
            return s.policy.clone();
        }
        CheckpointPolicy::batched(wanted, s.policy.max_interval()).map_or_else(
            |_| s.policy.clone(),
            |p| p.with_idle_interval(s.policy.idle_interval()),
        )
    }

    /// The context of a handler call on `lane`.
    fn context(&self, lane: Option<usize>) -> HandlerContext {
        let attempt = self
            .shared
            .attempts
            .load(std::sync::atomic::Ordering::Relaxed);
        HandlerContext::new(
            lane,
            attempt,
            self.shared.cancel.clone(),
            self.settings.stop_timeout,
        )
        .with_lease(self.shared.held.get())
    }

    /// The run loop with lanes (or a batch handler): routes each event to the lane of its
    /// document key, keeps transactions whole when asked, handles events without a key
    /// alone after every lane has drained, and acknowledges what the lanes report.
    async fn consume_lanes(
        &self,
        rx: &mut mpsc::Receiver<Handoff>,
        cp: &mut Checkpointer,
        handler: &Handler,
        lanes: &mut Lanes,
        keep_transactions: bool,
    ) -> Result<Outcome> {
        let mut invalidated = false;
        let mut open: Option<OpenTransaction> = None;
        let mut decoder = cdc_core::EventDecoder::new();
        let result = async {
            loop {
                let batch = tokio::select! {
                    biased;
                    () = self.shared.cancel.cancelled() => return Ok(Outcome::Stopped),
                    done = lanes.next_done(), if lanes.in_flight() > 0 => {
                        if let Some(done) = done {
                            self.complete(done, cp).await?;
                        }
                        continue;
                    }
                    batch = rx.recv() => batch,
                };
                let Some(Handoff { items, mut bytes }) = batch else {
                    return Err(reader_ended());
                };
                // Each event takes its share of the batch's bytes into its lane, which
                // gives it back once the event is handled.
                let mut share = |n: u32| bytes.as_mut().and_then(|b| b.split(n as usize));
                for item in items {
                    // Events not yet tracked are simply read again after a stop.
                    if self.shared.cancel.is_cancelled() {
                        return Ok(Outcome::Stopped);
                    }
                    let event = match item {
                        Item::Event(event, n) => (event, share(n)),
                        Item::Raw(raw, n) => (Box::new(decoder.decode(raw)?), share(n)),
                        other => {
                            if let Some(t) = open.take() {
                                self.dispatch_unit(t.events, true, cp, handler, lanes)
                                    .await?;
                            }
                            if let Some(outcome) =
                                self.side_item(other, cp, lanes, invalidated).await?
                            {
                                return Ok(outcome);
                            }
                            continue;
                        }
                    };
                    let key = if keep_transactions {
                        transaction_key(&event.0)
                    } else {
                        None
                    };
                    if let Some(key) = key {
                        match &mut open {
                            Some(t) if t.key == key => t.events.push(event),
                            _ => {
                                if let Some(t) = open.take() {
                                    self.dispatch_unit(t.events, true, cp, handler, lanes)
                                        .await?;
                                }
                                open = Some(OpenTransaction {
                                    key,
                                    events: vec![event],
                                });
                            }
                        }
                        continue;
                    }
                    if let Some(t) = open.take() {
                        self.dispatch_unit(t.events, true, cp, handler, lanes)
                            .await?;
                    }
                    invalidated |= event.0.operation_type == OperationType::Invalidate;
                    self.dispatch_unit(vec![event], false, cp, handler, lanes)
                        .await?;
                    if let Some(point) = cp.tick(Instant::now()) {
                        self.save(cp, point).await?;
                    }
                }
            }
        }
        .await;
        // Whatever ended the loop, what the lanes have in hand is finished (or skipped,
        // when stopping) and acknowledged before the final checkpoint.
        let drained = self.drain(lanes, cp).await;
        match (result, drained) {
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            (Ok(outcome), Ok(())) => Ok(outcome),
        }
    }

    /// Acts on an item that is not an event; `Some` when the stream ended.
    async fn side_item(
        &self,
        item: Item,
        cp: &mut Checkpointer,
        lanes: &mut Lanes,
        invalidated: bool,
    ) -> Result<Option<Outcome>> {
        match item {
            Item::Closed => {
                self.drain(lanes, cp).await?;
                return Ok(Some(if invalidated {
                    Outcome::Invalidated
                } else {
                    Outcome::Closed
                }));
            }
            Item::Failed(e) => return Err(e.into()),
            Item::Finished(position) => {
                self.drain(lanes, cp).await?;
                return Ok(Some(Outcome::Finished(position)));
            }
            Item::Idle(token) => self.idle(token, cp).await?,
            Item::Tick => {
                if let Some(point) = cp.tick(Instant::now()) {
                    self.save(cp, point).await?;
                }
            }
            Item::Gap(gap) => self.gap(gap),
            Item::Event(..) | Item::Raw(..) => {}
        }
        Ok(None)
    }

    /// Tracks a unit and hands it to the lane of its keys, or handles it alone (after
    /// every lane drained) when an event has no document key or its keys span lanes.
    async fn dispatch_unit(
        &self,
        events: Vec<(Box<ChangeEvent>, Option<tokio::sync::OwnedSemaphorePermit>)>,
        transaction: bool,
        cp: &mut Checkpointer,
        handler: &Handler,
        lanes: &mut Lanes,
    ) -> Result<()> {
        let mut keys = events
            .iter()
            .map(|(e, _)| e.document_key().map(|k| lanes.lane_of(k.as_bytes())));
        let first = keys.next().flatten();
        let lane = if first.is_some() && keys.all(|l| l == first) {
            first
        } else {
            None
        };
        // Room under the protocol's bound of unsaved work: save, or wait for the lanes.
        while cp.is_blocked() {
            if cp.pending().is_some() {
                self.flush(cp).await?;
            } else if let Some(done) = lanes.next_done().await {
                self.complete(done, cp).await?;
            } else {
                break;
            }
        }
        if lane.is_none() {
            self.drain(lanes, cp).await?;
            if cp.is_blocked() {
                self.flush(cp).await?;
            }
        }
        // `saved_at` is stamped when the point is saved.
        let mut points: Vec<ResumePoint> = events
            .iter()
            .map(|(e, _)| e.resume_point(bson::DateTime::MIN))
            .collect();
        let seqs = if points.len() == 1 {
            vec![cp.track(points.remove(0))?]
        } else {
            cp.track_group(points)?
        };
        let unit = Unit {
            events: seqs
                .into_iter()
                .zip(events)
                .map(|(seq, (event, bytes))| Tracked {
                    seq,
                    event,
                    _bytes: bytes,
                })
                .collect(),
            transaction,
        };
        match lane {
            Some(lane) => lanes.send(lane, unit).await,
            None => {
                let ctx = self.context(None);
                let units = vec![unit];
                let outcome =
                    handle_until_deadline(handler, &units, &ctx, &self.shared.poison).await;
                self.complete(Done { units, outcome }, cp).await?;
            }
        }
        Ok(())
    }

    /// Acknowledges what a lane handled (all of it before saving, so no point falls
    /// inside a transaction) and saves when a point is due.
    async fn complete(&self, done: Done, cp: &mut Checkpointer) -> Result<()> {
        match done.outcome {
            LaneOutcome::Handled(tally) => {
                self.tally(tally);
                let now = Instant::now();
                let mut due = None;
                for unit in &done.units {
                    for t in &unit.events {
                        due = cp.ack(t.seq, now)?;
                    }
                }
                let mut counted = Counted::default();
                for unit in &done.units {
                    for t in &unit.events {
                        counted.add(&t.event);
                    }
                }
                self.flush_counts(&mut counted, cp);
                if let Some(point) = due {
                    self.save(cp, point).await?;
                }
                Ok(())
            }
            LaneOutcome::Failed(e) => Err(e.into()),
            LaneOutcome::Abandoned => Ok(()),
        }
    }

    /// Waits for every lane's units to be reported, acknowledging what was handled; the
    /// first failure is returned after all are in.
    async fn drain(&self, lanes: &mut Lanes, cp: &mut Checkpointer) -> Result<()> {
        let mut first_error = None;
        while let Some(done) = lanes.next_done().await {
            if let Err(e) = self.complete(done, cp).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// An empty round trip: saves its token (or what is due) when the protocol says so.
    async fn idle(&self, token: Option<ResumeToken>, cp: &mut Checkpointer) -> Result<()> {
        let now = Instant::now();
        let due = match token {
            Some(t) => cp.idle(t, now, bson::DateTime::now()),
            None => cp.tick(now),
        };
        match due {
            Some(point) => self.save(cp, point).await,
            None => Ok(()),
        }
    }

    /// A history gap the source skipped (restart-from-now policy): logged and kept.
    fn gap(&self, gap: cdc_core::HistoryGap) {
        tracing::error!(%gap, "events were lost to oplog rollover (restart-from-now policy)");
        self.shared.stats.lock().last_gap = Some(gap);
    }

    /// Counts events the handler-error policy skipped or dead-lettered.
    fn tally(&self, tally: Tally) {
        if tally != Tally::default() {
            let mut stats = self.shared.stats.lock();
            stats.skipped_events += tally.skipped;
            stats.dead_letters += tally.dead_lettered;
        }
    }

    /// Adds what `counted` holds to the stats (one lock for many events).
    fn flush_counts(&self, counted: &mut Counted, cp: &Checkpointer) {
        counted.bytes = None;
        let mut stats = self.shared.stats.lock();
        stats.events += counted.events;
        for (kind, n) in counted.by_type.drain(..) {
            match stats.events_by_type.get_mut(kind.as_str()) {
                Some(total) => *total += n,
                None => {
                    stats.events_by_type.insert(kind.as_str().to_owned(), n);
                }
            }
        }
        if let Some(time) = counted.last_time.take() {
            stats.last_cluster_time = Some(time);
        }
        stats.checkpoint_lag_events = u64::from(cp.unsaved_events());
        counted.events = 0;
        counted.flush_at = Instant::now() + COUNTS_EVERY;
    }
}

/// How long handled events may be counted locally before the stats show them (they are
/// also added after every batch from the reader).
const COUNTS_EVERY: Duration = Duration::from_millis(100);

/// What handled events leave to do, done a batch at a time rather than for every event:
/// adding them to the stats (one lock) and giving their bytes back to the reader's
/// budget (one release of the semaphore, which takes its lock).
#[derive(Debug)]
struct Counted {
    /// Decodes raw events (sharing their namespace's names).
    decoder: cdc_core::EventDecoder,
    /// The bytes of the events handled since the last flush, merged into one permit.
    bytes: Option<tokio::sync::OwnedSemaphorePermit>,
    events: u64,
    /// Few kinds per batch (usually one to four): a list beats a map.
    by_type: Vec<(OperationType, u64)>,
    last_time: Option<cdc_core::ClusterTime>,
    /// When they are to be added to the stats at the latest.
    flush_at: Instant,
}

impl Default for Counted {
    fn default() -> Self {
        Self {
            decoder: cdc_core::EventDecoder::new(),
            bytes: None,
            events: 0,
            by_type: Vec::new(),
            last_time: None,
            flush_at: Instant::now() + COUNTS_EVERY,
        }
    }
}

impl Counted {
    /// Keeps a handled event's share of the byte budget until the next flush.
    fn give_back(&mut self, bytes: Option<tokio::sync::OwnedSemaphorePermit>) {
        match (&mut self.bytes, bytes) {
            // Every permit of one run loop comes from the one budget of its reader, so
            // merging (which panics only for permits of different semaphores) cannot fail.
            (Some(held), Some(permit)) => held.merge(permit),
            (held @ None, permit) => *held = permit,
            (Some(_), None) => {}
        }
    }

    fn add(&mut self, event: &ChangeEvent) {
        self.events += 1;
        self.last_time = Some(event.cluster_time);
        // Runs of one kind are the rule: the last kind counted first.
        if let Some((kind, n)) = self.by_type.last_mut()
            && *kind == event.operation_type
        {
            *n += 1;
            return;
        }
        match self
            .by_type
            .iter_mut()
            .find(|(kind, _)| *kind == event.operation_type)
        {
            Some((_, n)) => *n += 1,
            None => self.by_type.push((event.operation_type.clone(), 1)),
        }
    }
}

/// Events of one transaction read so far: handed over whole when the next item is not
/// part of it.
struct OpenTransaction {
    key: (Vec<u8>, i64),
    events: Vec<(Box<ChangeEvent>, Option<tokio::sync::OwnedSemaphorePermit>)>,
}

/// `(lsid, txnNumber)`: the identity of an event's transaction, if it has one.
fn transaction_key(event: &ChangeEvent) -> Option<(Vec<u8>, i64)> {
    Some((event.lsid()?.as_bytes().to_vec(), event.txn_number?))
}

/// The reader task's channel closed without a last item: a transient failure.
fn reader_ended() -> Error {
    cdc_core::Error::source(ErrorKind::Transient, "the cursor reader ended unexpectedly").into()
}

/// A stored point is checked before the stream opens on it: its token must decode as BSON
/// element by element (a token that only frames as BSON would fail inside the driver,
/// as an unexplained fatal error), and its cluster time must not lie more than a day
/// ahead of this machine's clock (such a point cannot have come from this deployment's
/// log, and opening on it would wait silently). Either is a `CorruptPoint` naming the
/// stream and the store.
fn validate_stored(point: &ResumePoint, stream: &str, store: &str) -> Result<()> {
    let corrupt = |reason: String| {
        Error::from(cdc_core::Error::CorruptPoint {
            stream: stream.to_owned(),
            location: store.to_owned(),
            reason,
        })
    };
    if let Err(e) = bson::Document::try_from(point.token.as_raw()) {
        return Err(corrupt(format!("its resume token does not decode: {e}")));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if u64::from(point.cluster_time.time) > now + 24 * 3600 {
        return Err(corrupt(format!(
            "its cluster time {} is more than a day ahead of this machine's clock",
            point.cluster_time
        )));
    }
    Ok(())
}
