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
    time::{Duration, Instant},
};

use cdc_core::{Lease, LeaseStore};

use crate::{DocumentProcessor, Result, lanes::Handler};

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

    fn set(&self, lease: Option<Lease>) {
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

impl DocumentProcessor {
    /// Runs while holding the lease: stands by until it is acquired, then runs until
    /// stopped, failed, or the lease is lost.
    pub(crate) async fn run_leased(&self, l: &LeaseSettings, handler: &Handler) -> Result<()> {
        let Some((lease, asked)) = self.acquire_lease(l).await? else {
            return Ok(());
        };
        let result = tokio::select! {
            r = self.run(handler) => r,
            lost = self.keep_lease(l, lease, asked) => {
                tracing::warn!(error = %lost, "lease lost: handling stops at once; standing by");
                Err(lost.into())
            }
        };
        let held = self.inner.held.get();
        self.inner.held.set(None);
        self.stats_mut().lease_token = None;
        let lost = matches!(&result, Err(e) if e.kind() == cdc_core::ErrorKind::Fenced);
        if let Some(lease) = held
            && !lost
        {
            // A standby takes over at once rather than after the TTL.
            if let Err(e) = l.store.release(&lease).await {
                tracing::warn!(error = %e, "the lease could not be released; it expires by itself");
            }
        }
        result
    }

    /// Waits as a standby until the lease is acquired; `None` when stopped meanwhile. With
    /// the lease, the instant its acquisition was asked for (the TTL runs from no later).
    async fn acquire_lease(&self, l: &LeaseSettings) -> Result<Option<(Lease, Instant)>> {
        let stream = self.stream_id();
        let poll = (l.ttl / 3).max(Duration::from_millis(10));
        let mut waiting = false;
        loop {
            let asked = Instant::now();
            match l.store.acquire(stream, &l.owner, l.ttl).await {
                Ok(Some(lease)) => {
                    tracing::info!(owner = %lease.owner, token = lease.token, "lease acquired: handling the stream");
                    self.inner.held.set(Some(lease.clone()));
                    let mut stats = self.stats_mut();
                    stats.lease_token = Some(lease.token);
                    stats.standby = false;
                    stats.leases_acquired += 1;
                    return Ok(Some((lease, asked)));
                }
                Ok(None) => {
                    if !waiting {
                        let holder = l.store.holder(stream).await.ok().flatten();
                        tracing::info!(
                            holder = holder.as_ref().map_or("?", |h| h.owner.as_str()),
                            token = holder.as_ref().map(|h| h.token),
                            "standby: another instance holds the lease"
                        );
                        self.stats_mut().standby = true;
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
                () = tokio::time::sleep(poll) => {}
                () = self.inner.cancel.cancelled() => return Ok(None),
            }
        }
    }

    /// Renews the lease every third of the TTL; returns when it is lost (a renewal
    /// refused, or none succeeded before the lease would have expired).
    async fn keep_lease(
        &self,
        l: &LeaseSettings,
        mut lease: Lease,
        asked: Instant,
    ) -> cdc_core::Error {
        let every = (l.ttl / 3).max(Duration::from_millis(10));
        // When the latest successful renewal (or the acquisition) was asked for.
        let mut renewed = asked;
        loop {
            tokio::time::sleep(every).await;
            // A renewal that does not answer before the lease would expire is a loss: the
            // store may have handed the lease on meanwhile.
            let started = Instant::now();
            let left = l.ttl.saturating_sub(renewed.elapsed());
            let attempt = tokio::time::timeout(left, l.store.renew(&lease, l.ttl)).await;
            let Ok(attempt) = attempt else {
                tracing::warn!("the lease renewal did not answer before the lease expires");
                return cdc_core::Error::Fenced {
                    stream: lease.stream.clone(),
                    token: lease.token,
                    newest: None,
                };
            };
            match attempt {
                Ok(next) => {
                    renewed = started;
                    self.inner.held.set(Some(next.clone()));
                    lease = next;
                }
                Err(e) if e.kind() == cdc_core::ErrorKind::Fenced => return e,
                Err(e) => {
                    // Counted from the last renewal's start, by this process's clock: the
                    // lease may have expired in the store by now.
                    if renewed.elapsed() + every >= l.ttl {
                        tracing::warn!(error = %e, "the lease could not be renewed before it expires");
                        return cdc_core::Error::Fenced {
                            stream: lease.stream.clone(),
                            token: lease.token,
                            newest: None,
                        };
                    }
                    tracing::warn!(error = %e, "lease renewal failed; trying again");
                }
            }
        }
    }
}
