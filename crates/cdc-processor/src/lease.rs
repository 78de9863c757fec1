//! Holding a stream's lease: one active instance per stream, the others standing by.
//!
//! With [`crate::Storage::leased`] a run first waits as a standby until it acquires
//! the lease (polling every third of the TTL), then handles the stream while a renewer
//! extends the lease every third of the TTL. Every save goes through
//! [`LeaseStore::save_fenced`], so once another instance holds the lease nothing this one
//! saves lands. When a renewal fails (the lease expired or was taken, or the store did not
//! answer before the lease would have expired) the run is dropped at once: handlers in
//! flight are cancelled and nothing past the last saved point is acknowledged; the run
//! ends with [`cdc_core::Error::Fenced`], which `start_with_retry` answers by standing by
//! again. A `stop()` releases the lease so a standby takes over without waiting.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use crate::stop::Stop;
use cdc_core::{Lease, LeaseStore};
use tokio::time::Instant;

use crate::{Result, stats::Counters};

/// How a processor holds its stream's lease.
#[derive(Clone)]
pub(crate) struct LeaseSettings {
    pub(crate) store: Arc<dyn LeaseStore>,
    pub(crate) ttl: Duration,
    pub(crate) owner: String,
}

/// The lease held now, shared by the renewer and the saves.
#[derive(Debug, Default)]
pub(crate) struct Held(Mutex<Option<Lease>>);

impl Held {
    pub(crate) fn get(&self) -> Option<Lease> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set(&self, lease: Option<Lease>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = lease;
    }
}

/// An owner id unique to this process incarnation: host, process id, start time.
pub(crate) fn default_owner() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "host".to_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{host}-{}-{nanos:x}", std::process::id())
}

/// Acquires, keeps and releases one stream's lease for a run; handed the lease store, the
/// TTL and the owner id, the lease held now (which the saves read) and the counters.
pub(crate) struct LeaseKeeper {
    settings: LeaseSettings,
    stream: String,
    held: Arc<Held>,
    stats: Arc<Counters>,
}

impl LeaseKeeper {
    pub(crate) fn new(
        settings: LeaseSettings,
        stream: String,
        held: Arc<Held>,
        stats: Arc<Counters>,
    ) -> Self {
        Self {
            settings,
            stream,
            held,
            stats,
        }
    }

    /// Every third of the TTL (at least 10 ms): how often a standby asks, and a holder
    /// renews.
    fn period(&self) -> Duration {
        (self.settings.ttl / 3).max(Duration::from_millis(10))
    }

    /// Waits as a standby until the lease is acquired; `None` when `cancel` fires
    /// meanwhile. With the lease, the instant its acquisition was asked for (the TTL runs
    /// from no later).
    pub(crate) async fn acquire(&self, cancel: &Stop) -> Result<Option<(Lease, Instant)>> {
        let l = &self.settings;
        let mut waiting = false;
        loop {
            let asked = Instant::now();
            match l.store.acquire(&self.stream, &l.owner, l.ttl).await {
                Ok(Some(lease)) => {
                    tracing::info!(owner = %lease.owner, token = lease.token, "lease acquired: handling the stream");
                    self.held.set(Some(lease.clone()));
                    let mut stats = self.stats.lock();
                    stats.lease_token = Some(lease.token);
                    stats.standby = false;
                    stats.leases_acquired += 1;
                    return Ok(Some((lease, asked)));
                }
                Ok(None) => {
                    if !waiting {
                        let holder = l.store.holder(&self.stream).await.ok().flatten();
                        tracing::info!(
                            holder = holder.as_ref().map_or("?", |h| h.owner.as_str()),
                            token = holder.as_ref().map(|h| h.token),
                            "standby: another instance holds the lease"
                        );
                        self.stats.lock().standby = true;
                        waiting = true;
                    }
                }
                // A store outage while standing by: keep waiting.
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "standby: the lease store failed; trying again");
                }
                Err(e) => return Err(e.into()),
            }
            tokio::select! {
                () = tokio::time::sleep(self.period()) => {}
                () = cancel.cancelled() => return Ok(None),
            }
        }
    }

    /// Renews the lease every third of the TTL; returns when it is lost (a renewal
    /// refused, or none succeeded before the lease would have expired).
    pub(crate) async fn keep(&self, mut lease: Lease, asked: Instant) -> cdc_core::Error {
        let l = &self.settings;
        let every = self.period();
        // When the latest successful renewal (or the acquisition) was asked for.
        let mut renewed = asked;
        let lost = |lease: &Lease| cdc_core::Error::Fenced {
            stream: lease.stream.clone(),
            token: lease.token,
            newest: None,
        };
        loop {
            tokio::time::sleep(every).await;
            // A renewal that does not answer before the lease would expire is a loss: the
            // store may have handed the lease on meanwhile.
            let started = Instant::now();
            let left = l.ttl.saturating_sub(renewed.elapsed());
            let attempt = tokio::time::timeout(left, l.store.renew(&lease, l.ttl)).await;
            let Ok(attempt) = attempt else {
                tracing::warn!("the lease renewal did not answer before the lease expires");
                return lost(&lease);
            };
            match attempt {
                Ok(next) => {
                    renewed = started;
                    self.held.set(Some(next.clone()));
                    lease = next;
                }
                Err(e) if e.kind() == cdc_core::ErrorKind::Fenced => return e,
                Err(e) => {
                    // Counted from the last renewal's start, by this process's clock: the
                    // lease may have expired in the store by now.
                    if renewed.elapsed() + every >= l.ttl {
                        tracing::warn!(error = %e, "the lease could not be renewed before it expires");
                        return lost(&lease);
                    }
                    tracing::warn!(error = %e, "lease renewal failed; trying again");
                }
            }
        }
    }

    /// After a run that held the lease: forgets it, and releases it in the store (so a
    /// standby takes over at once rather than after the TTL) unless the run ended
    /// because it was lost.
    pub(crate) async fn release(&self, result: &Result<()>) {
        let held = self.held.get();
        self.held.set(None);
        self.stats.lock().lease_token = None;
        let lost = matches!(result, Err(e) if e.kind() == cdc_core::ErrorKind::Fenced);
        if let Some(lease) = held
            && !lost
            && let Err(e) = self.settings.store.release(&lease).await
        {
            tracing::warn!(error = %e, "the lease could not be released; it expires by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use mockall::{Sequence, mock};

    use super::*;

    mock! {
        Leases {}
        #[async_trait::async_trait]
        impl LeaseStore for Leases {
            async fn acquire(&self, stream: &str, owner: &str, ttl: Duration) -> cdc_core::Result<Option<Lease>>;
            async fn renew(&self, lease: &Lease, ttl: Duration) -> cdc_core::Result<Lease>;
            async fn release(&self, lease: &Lease) -> cdc_core::Result<()>;
            async fn holder(&self, stream: &str) -> cdc_core::Result<Option<Lease>>;
            async fn leases(&self, prefix: &str) -> cdc_core::Result<Vec<Lease>>;
            async fn save_fenced(&self, lease: &Lease, point: &cdc_core::ResumePoint) -> cdc_core::Result<()>;
            async fn record_fenced(&self, lease: &Lease, letter: &cdc_core::DeadLetter) -> cdc_core::Result<()>;
            fn describe(&self) -> String;
        }
    }

    const TTL: Duration = Duration::from_millis(300);
    const THIRD: Duration = Duration::from_millis(100);

    /// The store's calls, each with when it came (since the test's start).
    type Log = Arc<Mutex<Vec<(&'static str, Duration)>>>;

    fn keeper(store: MockLeases) -> (LeaseKeeper, Arc<Held>, Arc<Counters>) {
        let (held, stats) = (Arc::new(Held::default()), Arc::<Counters>::default());
        let settings = LeaseSettings {
            store: Arc::new(store),
            ttl: TTL,
            owner: "me".into(),
        };
        let keeper = LeaseKeeper::new(settings, "s".into(), Arc::clone(&held), Arc::clone(&stats));
        (keeper, held, stats)
    }

    fn log(log: &Log, call: &'static str, t0: Instant) {
        log.lock().unwrap().push((call, t0.elapsed()));
    }

    fn calls(log: &Log) -> Vec<(&'static str, Duration)> {
        log.lock().unwrap().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_standby_asks_every_third_of_the_ttl_until_it_holds_the_lease() {
        let t0 = Instant::now();
        let calls_made: Log = Arc::default();
        let mut store = MockLeases::new();
        let mut seq = Sequence::new();
        for n in 0..3 {
            let l = Arc::clone(&calls_made);
            store
                .expect_acquire()
                .times(1)
                .in_sequence(&mut seq)
                .returning(move |stream, owner, ttl| {
                    assert_eq!((stream, owner, ttl), ("s", "me", TTL));
                    log(&l, "acquire", t0);
                    Ok((n == 2).then(|| Lease::new(stream, owner, 7, 0)))
                });
            if n == 0 {
                // The holder is looked up once, to say who it is.
                let l = Arc::clone(&calls_made);
                store
                    .expect_holder()
                    .times(1)
                    .in_sequence(&mut seq)
                    .returning(move |stream| {
                        log(&l, "holder", t0);
                        Ok(Some(Lease::new(stream, "other", 6, 0)))
                    });
            }
        }
        let (keeper, held, stats) = keeper(store);
        let (lease, asked) = keeper.acquire(&Stop::default()).await.unwrap().unwrap();
        assert_eq!(
            calls(&calls_made),
            [
                ("acquire", Duration::ZERO),
                ("holder", Duration::ZERO),
                ("acquire", THIRD),
                ("acquire", 2 * THIRD),
            ]
        );
        assert_eq!((lease.token, asked), (7, t0 + 2 * THIRD));
        assert_eq!(held.get().map(|l| l.token), Some(7));
        let stats = stats.lock();
        assert_eq!(
            (stats.standby, stats.lease_token, stats.leases_acquired),
            (false, Some(7), 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_the_standby_and_a_store_outage_only_delays_it() {
        let t0 = Instant::now();
        let calls_made: Log = Arc::default();
        let mut store = MockLeases::new();
        let l = Arc::clone(&calls_made);
        store
            .expect_acquire()
            .times(2)
            .returning(move |stream, _, _| {
                log(&l, "acquire", t0);
                Err(cdc_core::Error::store(
                    stream,
                    std::io::Error::other("down"),
                ))
            });
        let (keeper, held, _) = keeper(store);
        let cancel = Stop::default();
        let stop = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(THIRD + THIRD / 2).await;
            stop.cancel();
        });
        assert!(keeper.acquire(&cancel).await.unwrap().is_none());
        assert_eq!(
            calls(&calls_made),
            [("acquire", Duration::ZERO), ("acquire", THIRD)]
        );
        assert!(held.get().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_holder_renews_every_third_of_the_ttl_until_a_renewal_is_refused() {
        let t0 = Instant::now();
        let calls_made: Log = Arc::default();
        let mut store = MockLeases::new();
        let mut seq = Sequence::new();
        for n in 1..=3_i64 {
            let l = Arc::clone(&calls_made);
            store
                .expect_renew()
                .times(1)
                .in_sequence(&mut seq)
                .returning(move |lease, ttl| {
                    assert_eq!((lease.token, ttl), (7, TTL));
                    log(&l, "renew", t0);
                    Ok(Lease::new("s", "me", 7, n))
                });
        }
        let l = Arc::clone(&calls_made);
        store
            .expect_renew()
            .times(1)
            .in_sequence(&mut seq)
            .returning(move |lease, _| {
                log(&l, "renew", t0);
                Err(cdc_core::Error::Fenced {
                    stream: lease.stream.clone(),
                    token: lease.token,
                    newest: Some(8),
                })
            });
        let (keeper, held, _) = keeper(store);
        let lost = keeper.keep(Lease::new("s", "me", 7, 0), t0).await;
        assert!(
            matches!(
                lost,
                cdc_core::Error::Fenced {
                    token: 7,
                    newest: Some(8),
                    ..
                }
            ),
            "{lost:?}"
        );
        assert_eq!(
            calls(&calls_made),
            [
                ("renew", THIRD),
                ("renew", 2 * THIRD),
                ("renew", 3 * THIRD),
                ("renew", 4 * THIRD)
            ]
        );
        // The saves use the latest renewal.
        assert_eq!(held.get().map(|l| l.expires_at_ms), Some(3));
    }

    /// Renewals that fail (the store away) are tried again while the lease can still be
    /// alive; the one that would come after the TTL ran out is not made: the hold is lost.
    #[tokio::test(start_paused = true)]
    async fn renewals_failing_until_the_ttl_runs_out_lose_the_lease() {
        let t0 = Instant::now();
        let calls_made: Log = Arc::default();
        let mut store = MockLeases::new();
        let l = Arc::clone(&calls_made);
        store.expect_renew().times(2).returning(move |lease, _| {
            log(&l, "renew", t0);
            Err(cdc_core::Error::store(
                lease.stream.clone(),
                std::io::Error::other("down"),
            ))
        });
        let (keeper, _, _) = keeper(store);
        let lost = keeper.keep(Lease::new("s", "me", 7, 0), t0).await;
        assert!(
            matches!(
                lost,
                cdc_core::Error::Fenced {
                    token: 7,
                    newest: None,
                    ..
                }
            ),
            "{lost:?}"
        );
        assert_eq!(t0.elapsed(), 2 * THIRD);
        assert_eq!(calls(&calls_made), [("renew", THIRD), ("renew", 2 * THIRD)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_run_releases_the_lease_and_a_lost_one_leaves_it() {
        let mut store = MockLeases::new();
        store
            .expect_release()
            .times(1)
            .withf(|lease| lease.token == 7)
            .returning(|_| Ok(()));
        let (keeper, held, stats) = keeper(store);
        held.set(Some(Lease::new("s", "me", 7, 0)));
        stats.lock().lease_token = Some(7);
        keeper.release(&Ok(())).await;
        assert!(held.get().is_none());
        assert_eq!(stats.lock().lease_token, None);

        let mut store = MockLeases::new();
        store.expect_release().times(0);
        let (lost_keeper, held, _) = self::keeper(store);
        held.set(Some(Lease::new("s", "me", 7, 0)));
        let fenced = cdc_core::Error::Fenced {
            stream: "s".into(),
            token: 7,
            newest: Some(8),
        };
        lost_keeper.release(&Err(fenced.into())).await;
        assert!(held.get().is_none());
    }
}
