//! Handler errors: retried in process under the builder's [`HandlerErrorPolicy`], then
//! the stream stops, or the event is skipped, or it is recorded as a dead letter (and,
//! when asked, its document key is parked: the key's later events follow it into the dead
//! letters, so a replay keeps their order).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use cdc_core::{
    BoxError, ChangeEvent, ClusterTime, DeadLetter, DeadLetterStore, Dispatcher, ErrorKind,
};

/// Where an event lies in the stream: its cluster time, then its letter id.
type Position = (ClusterTime, String);

use crate::{context::HandlerContext, handling::handler_error};

/// What follows when a handler keeps failing on an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AfterRetries {
    /// The processor stops with the handler error (not retried by `start_with_retry`:
    /// the same event would fail again).
    Stop,
    /// The event is acknowledged without being handled, logged at error level and counted
    /// in [`crate::Stats::skipped_events`].
    Skip,
    /// The event is recorded in the dead-letter store (before it is acknowledged, so a
    /// crash never loses it), then acknowledged; counted in [`crate::Stats::dead_letters`].
    DeadLetter,
}

/// What the processor does when a handler returns an error (or panics) on an event:
/// call it again up to `retries` times in process, waiting a backoff between calls
/// (without reopening the stream), then [`AfterRetries`].
///
/// The default: 3 retries from 100 ms doubling to 5 s, then stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerErrorPolicy {
    retries: u32,
    min_delay: Duration,
    max_delay: Duration,
    then: AfterRetries,
    park_keys: bool,
}

impl Default for HandlerErrorPolicy {
    fn default() -> Self {
        Self::stop()
    }
}

impl HandlerErrorPolicy {
    fn with(then: AfterRetries) -> Self {
        Self {
            retries: 3,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            then,
            park_keys: false,
        }
    }

    /// After the retries, stop with the handler error (the default).
    pub fn stop() -> Self {
        Self::with(AfterRetries::Stop)
    }

    /// After the retries, skip the event.
    pub fn skip() -> Self {
        Self::with(AfterRetries::Skip)
    }

    /// After the retries, record the event as a dead letter (needs
    /// [`crate::Storage::dead_letters`]).
    pub fn dead_letter() -> Self {
        Self::with(AfterRetries::DeadLetter)
    }

    /// How many times a failed call is repeated before giving up (0: give up at once).
    #[must_use]
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// The wait before the first retry, doubling up to `max` (without jitter: the
    /// retries of one event are not a herd).
    #[must_use]
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_delay = min;
        self.max_delay = max.max(min);
        self
    }

    /// With dead letters: once an event is a dead letter, the later events of its
    /// document key are recorded behind it without calling the handler (so replaying the
    /// dead letters keeps the key's order). Parked keys are read back from the store at
    /// every start, and a key is released when its dead letters are replayed or deleted.
    #[must_use]
    pub fn park_keys(mut self, on: bool) -> Self {
        self.park_keys = on;
        self
    }

    /// What follows the retries.
    pub fn then(&self) -> AfterRetries {
        self.then
    }

    /// The number of retries.
    pub fn retry_count(&self) -> u32 {
        self.retries
    }

    /// Whether keys are parked behind their dead letters.
    pub fn parks_keys(&self) -> bool {
        self.park_keys && self.then == AfterRetries::DeadLetter
    }

    /// The waits after failed calls: from the minimum, doubling up to the maximum (the
    /// same `backon` backoff as the restart loop's, without jitter), in whole
    /// milliseconds.
    fn delays(&self) -> impl Iterator<Item = Duration> + use<> {
        let max = self.max_delay;
        backon::BackoffBuilder::build(
            backon::ExponentialBuilder::default()
                .with_min_delay(self.min_delay)
                .with_max_delay(max)
                .with_factor(2.0)
                .without_max_times(),
        )
        .chain(std::iter::repeat(max))
        // Whole milliseconds, the timer's resolution (backon multiplies in `f32`).
        .map(|d| Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }
}

/// What became of one event.
pub(crate) enum Fate {
    /// The handler succeeded.
    Handled,
    /// Given up on and skipped.
    Skipped,
    /// Recorded as a dead letter.
    DeadLettered,
    /// The policy says stop: the handler error.
    Failed(cdc_core::Error),
    /// The processor is stopping: not handled, not acknowledged (it comes again).
    Abandoned,
}

/// The policy in force for one processor, with its dead-letter store and parked keys.
pub(crate) struct Poison {
    pub(crate) policy: HandlerErrorPolicy,
    pub(crate) letters: Option<Arc<dyn DeadLetterStore>>,
    stream: String,
    store_timeout: Duration,
    /// Document keys (raw bytes) parked behind a dead letter, with the stream position
    /// of their first letter: events of the key from there on are parked (one before it
    /// is a repeat after a restart, handled before the key was parked).
    parked: Mutex<HashMap<Vec<u8>, Position>>,
    /// With a leased store: letters are recorded fenced by the lease held now.
    fence: Option<(Arc<dyn cdc_core::LeaseStore>, Arc<crate::lease::Held>)>,
}

impl std::fmt::Debug for Poison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poison")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Poison {
    pub(crate) fn new(
        policy: HandlerErrorPolicy,
        letters: Option<Arc<dyn DeadLetterStore>>,
        stream: String,
        store_timeout: Duration,
        fence: Option<(Arc<dyn cdc_core::LeaseStore>, Arc<crate::lease::Held>)>,
    ) -> Self {
        Self {
            policy,
            letters,
            stream,
            store_timeout,
            parked: Mutex::new(HashMap::new()),
            fence,
        }
    }

    fn parked(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Position>> {
        // A set of keys, changed by single inserts and removals: always consistent.
        self.parked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the parked keys back from the dead-letter store (at every start).
    pub(crate) async fn load_parked(&self) -> cdc_core::Result<()> {
        let Some(store) = self.letters.as_ref().filter(|_| self.policy.parks_keys()) else {
            return Ok(());
        };
        let letters = self.timed(store.list(&self.stream, usize::MAX)).await?;
        let mut keys = HashMap::new();
        // In stream order: the first letter of a key is where it was parked.
        for letter in letters {
            if let Some(key) = letter.decode()?.document_key() {
                keys.entry(key.as_bytes().to_vec())
                    .or_insert((letter.cluster_time, letter.id));
            }
        }
        *self.parked() = keys;
        Ok(())
    }

    /// Whether `event`'s key is parked at or before it.
    pub(crate) fn is_parked(&self, event: &ChangeEvent) -> bool {
        if !self.policy.parks_keys() {
            return false;
        }
        let Some(key) = event.document_key() else {
            return false;
        };
        self.parked()
            .get(key.as_bytes())
            .is_some_and(|from| (event.cluster_time, DeadLetter::id_of(&event.token)) >= *from)
    }

    async fn timed<T>(
        &self,
        call: impl Future<Output = cdc_core::Result<T>>,
    ) -> cdc_core::Result<T> {
        match tokio::time::timeout(self.store_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(cdc_core::Error::store(
                self.stream.clone(),
                std::io::Error::other(format!(
                    "the dead-letter store did not answer within {:?}",
                    self.store_timeout
                )),
            )),
        }
    }

    /// Records `event` as a dead letter (parked: behind an earlier letter of its key).
    async fn record(
        &self,
        event: &ChangeEvent,
        error: Option<&cdc_core::Error>,
        attempts: u32,
        parked: bool,
    ) -> Fate {
        let Some(store) = &self.letters else {
            // The builder refuses a dead-letter policy without a store.
            return Fate::Failed(cdc_core::Error::InvalidArgument {
                name: "dead_letters",
                reason: "no dead-letter store".into(),
            });
        };
        let cause = error.map(|e| e as &(dyn std::error::Error + 'static));
        let letter = match DeadLetter::new(&self.stream, event, cause, attempts, parked) {
            Ok(l) => l,
            Err(e) => return Fate::Failed(e),
        };
        let recorded = match &self.fence {
            Some((leases, held)) => match held.get() {
                Some(lease) => self.timed(leases.record_fenced(&lease, &letter)).await,
                None => Err(cdc_core::Error::Fenced {
                    stream: self.stream.clone(),
                    token: 0,
                    newest: None,
                }),
            },
            None => self.timed(store.record(&letter)).await,
        };
        if let Err(e) = recorded {
            return Fate::Failed(e);
        }
        if self.policy.parks_keys()
            && let Some(key) = event.document_key()
        {
            self.parked()
                .entry(key.as_bytes().to_vec())
                .or_insert((letter.cluster_time, letter.id));
        }
        Fate::DeadLettered
    }

    /// Applies the policy to an event the handler gave up on after `attempts` calls.
    pub(crate) async fn give_up(
        &self,
        event: &ChangeEvent,
        error: cdc_core::Error,
        attempts: u32,
    ) -> Fate {
        match self.policy.then {
            AfterRetries::Stop => Fate::Failed(error),
            AfterRetries::Skip => {
                tracing::error!(
                    error = %error,
                    token = ?event.token,
                    "the handler kept failing on an event: skipped (on_handler_error: skip)"
                );
                Fate::Skipped
            }
            AfterRetries::DeadLetter => {
                tracing::error!(
                    error = %error,
                    token = ?event.token,
                    "the handler kept failing on an event: recorded as a dead letter"
                );
                self.record(event, Some(&error), attempts, false).await
            }
        }
    }

    /// Records an event of a parked key behind its key's dead letters.
    pub(crate) async fn park(&self, event: &ChangeEvent) -> Fate {
        tracing::warn!(token = ?event.token, "an event of a parked key follows it into the dead letters");
        self.record(event, None, 0, true).await
    }

    /// Calls `call` until it succeeds or the retries run out (`Err` with the last error
    /// and the number of calls made); `Ok(None)` when the processor is stopping.
    ///
    /// A handler error that is a [`cdc_core::Error`] of kind `Transient` or `Store` says
    /// the handler's downstream is unavailable (a sink's server down or unreachable), not
    /// that the event is bad: such failures do not count against the retries. The call is
    /// repeated, with the policy's backoff, until it succeeds or the processor stops, so
    /// an outage neither skips nor dead-letters anything.
    pub(crate) async fn retrying<F, Fut>(
        &self,
        ctx: &HandlerContext,
        mut call: F,
    ) -> Result<Option<()>, (BoxError, u32)>
    where
        F: FnMut(&HandlerContext) -> Fut,
        Fut: Future<Output = Result<(), BoxError>>,
    {
        let this = ctx.with_call(1);
        let first = std::pin::pin!(call(&this));
        match this.make_call(first).await {
            Ok(()) => Ok(Some(())),
            // Most calls succeed at once: what a failure needs (backoffs, timers) lives in
            // a future of its own, made on the first failure, so the future of every call
            // stays small.
            Err(e) => Box::pin(self.retrying_after(ctx, call, e)).await,
        }
    }

    /// [`Poison::retrying`] after the first call failed with `first`.
    async fn retrying_after<F, Fut>(
        &self,
        ctx: &HandlerContext,
        mut call: F,
        first: BoxError,
    ) -> Result<Option<()>, (BoxError, u32)>
    where
        F: FnMut(&HandlerContext) -> Fut,
        Fut: Future<Output = Result<(), BoxError>>,
    {
        let mut n = 1;
        let mut counted = 1;
        let mut outage = 0_u32;
        let (mut outage_delays, mut retry_delays) = (None, None);
        let mut failed = Some(first);
        loop {
            let result = match failed.take() {
                Some(e) => Err(e),
                None => {
                    let this = ctx.with_call(n);
                    let again = std::pin::pin!(call(&this));
                    this.make_call(again).await
                }
            };
            match result {
                Ok(()) => {
                    if outage > 0 {
                        tracing::info!(calls = n, "the handler's downstream is back");
                    }
                    return Ok(Some(()));
                }
                Err(e) if is_outage(&e) => {
                    outage += 1;
                    let delay = outage_delays
                        .get_or_insert_with(|| self.policy.delays())
                        .next()
                        .unwrap_or(self.policy.max_delay);
                    if outage == 1 || outage.is_power_of_two() {
                        tracing::warn!(error = %e, call = n, ?delay, "the handler's downstream is unavailable: calling again until it returns (not counted against the retries)");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = ctx.stopping() => return Ok(None),
                    }
                    n += 1;
                }
                Err(e) if counted > self.policy.retries => return Err((e, n)),
                Err(e) => {
                    let delay = retry_delays
                        .get_or_insert_with(|| self.policy.delays())
                        .next()
                        .unwrap_or(self.policy.max_delay);
                    tracing::warn!(error = %e, call = n, ?delay, "the handler failed: calling it again after a pause");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = ctx.stopping() => return Ok(None),
                    }
                    n += 1;
                    counted += 1;
                }
            }
        }
    }

    /// Handles one event under the policy.
    pub(crate) async fn handle_event(
        &self,
        handler: &dyn Dispatcher,
        event: &ChangeEvent,
        ctx: &HandlerContext,
    ) -> Fate {
        // The rare paths (a parked key, giving up) are boxed: the future made for every
        // event stays small.
        if self.is_parked(event) {
            return Box::pin(self.park(event)).await;
        }
        match self.retrying(ctx, |_| handler.dispatch(event, None)).await {
            Ok(Some(())) => Fate::Handled,
            Ok(None) => Fate::Abandoned,
            Err((e, calls)) => {
                let error = handler_error(event, e, calls);
                Box::pin(self.give_up(event, error, calls)).await
            }
        }
    }
}

/// Whether a handler error says its downstream is unavailable (see [`Poison::retrying`]).
fn is_outage(error: &BoxError) -> bool {
    error
        .downcast_ref::<cdc_core::Error>()
        .is_some_and(|e| matches!(e.kind(), ErrorKind::Transient | ErrorKind::Store))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::{AtomicU32, Ordering};

    use mockall::{Sequence, mock};
    use tokio::time::Instant;

    use super::*;

    mock! {
        Letters {}
        #[async_trait::async_trait]
        impl DeadLetterStore for Letters {
            async fn record(&self, letter: &DeadLetter) -> cdc_core::Result<()>;
            async fn list(&self, stream: &str, limit: usize) -> cdc_core::Result<Vec<DeadLetter>>;
            async fn count(&self, stream: &str) -> cdc_core::Result<u64>;
            async fn remove(&self, stream: &str, id: &str) -> cdc_core::Result<bool>;
            fn describe(&self) -> String;
        }
    }

    fn ctx() -> HandlerContext {
        HandlerContext::new(None, 1, crate::stop::Stop::default(), None)
    }

    fn insert(id: i64) -> ChangeEvent {
        ChangeEvent::from_raw_buf(bson::rawdoc! {
            "_id": { "_data": format!("82{:08X}00000001", 1000 + id) },
            "operationType": "insert",
            "clusterTime": bson::Timestamp { time: 1000 + u32::try_from(id).unwrap(), increment: 1 },
            "ns": { "db": "d", "coll": "c" },
            "documentKey": { "_id": id },
            "fullDocument": { "_id": id },
        })
        .unwrap()
    }

    fn outage() -> BoxError {
        let down = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        cdc_core::Error::source(ErrorKind::Transient, down).into()
    }

    /// The calls and the waits between them, on the paused clock: an outage is called
    /// again on its own backoff and not counted; a bad event gets the policy's retries,
    /// each after the policy's backoff (100 ms doubling, at most 250 ms).
    #[tokio::test(start_paused = true)]
    async fn calls_come_on_the_policys_backoff_and_an_outage_is_not_counted() {
        let poison = Poison::new(
            HandlerErrorPolicy::stop()
                .retries(2)
                .backoff(Duration::from_millis(100), Duration::from_millis(250)),
            None,
            "s".into(),
            Duration::from_secs(1),
            None,
        );
        let t0 = Instant::now();
        let at = Mutex::new(Vec::new());
        let outcome = poison
            .retrying(&ctx(), |this| {
                let n = this.call();
                at.lock().unwrap().push((n, t0.elapsed().as_millis()));
                async move {
                    match n {
                        1..=3 => Err(outage()),
                        4 | 5 => Err("bad event".into()),
                        _ => Ok(()),
                    }
                }
            })
            .await;
        assert!(matches!(outcome, Ok(Some(()))));
        // Outage waits: 100, 200, 250; retry waits: 100, 200.
        assert_eq!(
            *at.lock().unwrap(),
            [(1, 0), (2, 100), (3, 300), (4, 550), (5, 650), (6, 850)]
        );
        // One more bad call than the retries allow: given up after 3 calls.
        let t1 = Instant::now();
        let calls = AtomicU32::new(0);
        let outcome = poison
            .retrying(&ctx(), |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), BoxError>("bad event".into()) }
            })
            .await;
        assert!(matches!(outcome, Err((_, 3))));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(t1.elapsed(), Duration::from_millis(300));
    }

    /// A stop during a wait abandons the event at once (it comes again).
    #[tokio::test(start_paused = true)]
    async fn a_stop_during_a_wait_abandons_the_event() {
        let poison = Poison::new(
            HandlerErrorPolicy::stop().backoff(Duration::from_secs(10), Duration::from_secs(10)),
            None,
            "s".into(),
            Duration::from_secs(1),
            None,
        );
        let cancel = crate::stop::Stop::default();
        let ctx = HandlerContext::new(None, 1, cancel.clone(), None);
        let t0 = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            cancel.cancel();
        });
        let outcome = poison
            .retrying(&ctx, |_| async { Err::<(), BoxError>("bad event".into()) })
            .await;
        assert!(matches!(outcome, Ok(None)));
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
    }

    /// Dead letters: the event given up on is recorded once, then the later events of its
    /// key are recorded behind it (parked) without a handler call, in that order; another
    /// key is handled.
    #[tokio::test(start_paused = true)]
    async fn a_dead_letter_then_its_keys_later_events_are_recorded_in_order() {
        let mut store = MockLetters::new();
        let mut seq = Sequence::new();
        for (id, parked) in [(1_i64, false), (1, true)] {
            store
                .expect_record()
                .times(1)
                .in_sequence(&mut seq)
                .withf(move |letter| {
                    let key = letter.decode().unwrap();
                    letter.parked == parked
                        && key.document_key().and_then(|k| k.get_i64("_id").ok()) == Some(id)
                })
                .returning(|_| Ok(()));
        }
        let poison = Poison::new(
            HandlerErrorPolicy::dead_letter()
                .retries(1)
                .backoff(Duration::from_millis(5), Duration::from_millis(5))
                .park_keys(true),
            Some(Arc::new(store)),
            "s".into(),
            Duration::from_secs(1),
            None,
        );
        let calls = Mutex::new(Vec::new());
        let handler = cdc_core::FnDispatcher(|event: &ChangeEvent, _: Option<BoxError>| {
            let id = event.document_key().and_then(|k| k.get_i64("_id").ok());
            calls.lock().unwrap().push(id);
            if id == Some(1) {
                Err("poison".into())
            } else {
                Ok(())
            }
        });
        let (first, later, other) = (insert(1), insert(1), insert(2));
        assert!(matches!(
            poison.handle_event(&handler, &first, &ctx()).await,
            Fate::DeadLettered
        ));
        assert!(matches!(
            poison.handle_event(&handler, &later, &ctx()).await,
            Fate::DeadLettered
        ));
        assert!(matches!(
            poison.handle_event(&handler, &other, &ctx()).await,
            Fate::Handled
        ));
        // Two calls on the first event (one retry), none on the parked one.
        assert_eq!(*calls.lock().unwrap(), [Some(1), Some(1), Some(2)]);
    }

    #[test]
    fn the_backoff_doubles_up_to_its_bound() {
        let p = HandlerErrorPolicy::stop()
            .backoff(Duration::from_millis(100), Duration::from_millis(350));
        let ms = |n: u64| Duration::from_millis(n);
        let delays: Vec<Duration> = p.delays().take(40).collect();
        assert_eq!(delays[..4], [ms(100), ms(200), ms(350), ms(350)]);
        assert_eq!(delays[39], ms(350));
        assert!(!HandlerErrorPolicy::skip().park_keys(true).parks_keys());
        assert!(
            HandlerErrorPolicy::dead_letter()
                .park_keys(true)
                .parks_keys()
        );
    }
}
