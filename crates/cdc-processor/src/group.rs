//! Streams spread across instances: a [`Group`] of instances given the same set of stream
//! ids balances them by leases.
//!
//! Every instance holds a membership lease (`<group>/members/<owner>`) and, every third
//! of the TTL, counts the live members and computes its fair share, `ceil(streams ÷
//! members)`. Below it, it starts a processor for streams nobody holds (free, or whose
//! holder died and let its lease expire); above it (a new instance joined), it stops
//! processors until it is back at its share, and their leases are released for the others
//! to take. Each processor holds its own stream's lease, so at most one instance handles a
//! stream at a time whatever the balancing does (see [`crate::Storage::leased`]).
//!
//! Each running processor keeps one connection of its client busy while its `getMore`
//! waits for changes: give the client a `maxPoolSize` above the number of streams an
//! instance may hold.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use cdc_core::{Dispatcher, LeaseStore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{DocumentProcessor, Error, Result};

/// Builds the processor of a stream for an instance: `(stream id, owner id)`. The
/// processor must use that stream id and a leased store holding its leases in the
/// group's store, under that owner id.
pub type ProcessorFactory = dyn Fn(&str, &str) -> Result<DocumentProcessor> + Send + Sync;

/// Builds the handler of a stream's processor.
pub type HandlerFactory = dyn Fn(&str) -> Box<dyn Dispatcher> + Send + Sync;

/// One instance of a group of instances sharing a set of streams.
pub struct Group {
    name: String,
    owner: String,
    store: Arc<dyn LeaseStore>,
    ttl: Duration,
    streams: Vec<String>,
    processors: Arc<ProcessorFactory>,
    handlers: Arc<HandlerFactory>,
    cancel: CancellationToken,
    running: Mutex<BTreeMap<String, Running>>,
}

/// A processor this instance runs, and its task.
struct Running {
    processor: DocumentProcessor,
    /// `None` once taken to be awaited.
    task: Option<JoinHandle<Result<()>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Dropped without a stop (the group's run was dropped): handling ends at once, and
        // the lease expires by itself.
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("name", &self.name)
            .field("owner", &self.owner)
            .field("streams", &self.streams.len())
            .finish_non_exhaustive()
    }
}

impl Group {
    /// An instance of group `name` sharing `streams`, with leases in `store` for `ttl`:
    /// `processors` builds a stream's processor (with `Storage::leased` on the same store and
    /// TTL, under the owner id it is given), `handlers` its handler.
    ///
    /// # Errors
    /// [`Error::Build`] for a TTL under 30 ms or an empty set of streams.
    pub fn new(
        name: impl Into<String>,
        store: Arc<dyn LeaseStore>,
        ttl: Duration,
        streams: Vec<String>,
        processors: impl Fn(&str, &str) -> Result<DocumentProcessor> + Send + Sync + 'static,
        handlers: impl Fn(&str) -> Box<dyn Dispatcher> + Send + Sync + 'static,
    ) -> Result<Self> {
        if ttl < Duration::from_millis(30) {
            return Err(Error::Build(crate::BuildError::Invalid {
                setting: "ttl",
                reason: format!("a group lease TTL of {ttl:?} is too short (at least 30 ms)"),
            }));
        }
        if streams.is_empty() {
            return Err(Error::Build(crate::BuildError::Invalid {
                setting: "streams",
                reason: "a group needs at least one stream".into(),
            }));
        }
        Ok(Self {
            name: name.into(),
            owner: crate::lease::default_owner(),
            store,
            ttl,
            streams,
            processors: Arc::new(processors),
            handlers: Arc::new(handlers),
            cancel: CancellationToken::new(),
            running: Mutex::new(BTreeMap::new()),
        })
    }

    /// The owner id of this instance (default: host, process id and start time).
    #[must_use]
    pub fn owner(mut self, id: impl Into<String>) -> Self {
        self.owner = id.into();
        self
    }

    /// The streams this instance runs a processor for now.
    pub fn running(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// The streams this instance holds the lease of now.
    pub fn held(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, r)| r.processor.stats().lease_token.is_some())
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Stops the instance: every processor stops gracefully and releases its lease, and
    /// so does the membership.
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        // A map changed by single inserts and removals.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn member_id(&self) -> String {
        format!("{}/members/{}", self.name, self.owner)
    }

    /// Runs the instance until [`Group::stop`]: balances every third of the TTL.
    ///
    /// # Errors
    /// A fatal error of the lease store or a processor factory.
    pub async fn run(&self) -> Result<()> {
        let every = (self.ttl / 3).max(Duration::from_millis(10));
        let mut shown = Vec::new();
        loop {
            if let Err(e) = self.balance().await {
                if !e.is_retryable() {
                    self.shutdown().await;
                    return Err(e);
                }
                tracing::warn!(group = %self.name, error = %e, "group: balancing failed; trying again");
            }
            let held = self.held();
            if held != shown {
                tracing::info!(group = %self.name, owner = %self.owner, held = ?held, "group: streams held");
                shown = held;
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = self.cancel.cancelled() => {
                    self.shutdown().await;
                    return Ok(());
                }
            }
        }
    }

    /// One round: the membership renewed, processors started up to the fair share and
    /// stopped down to it.
    async fn balance(&self) -> Result<()> {
        let member = self.member_id();
        self.store.acquire(&member, &self.owner, self.ttl).await?;
        let members = self
            .store
            .leases(&format!("{}/members/", self.name))
            .await?
            .len()
            .max(1);
        let fair = self.streams.len().div_ceil(members);
        // Processors that ended (a fatal error) or stand by behind another holder go.
        let idle: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, r)| {
                r.task.as_ref().is_none_or(JoinHandle::is_finished)
                    || (r.processor.stats().standby && r.processor.stats().lease_token.is_none())
            })
            .map(|(s, _)| s.clone())
            .collect();
        self.stop_streams(&idle).await;
        let mine = self.lock().len();
        if mine > fair {
            let extra: Vec<String> = self
                .lock()
                .keys()
                .rev()
                .take(mine - fair)
                .cloned()
                .collect();
            tracing::info!(group = %self.name, streams = ?extra, fair, members, "group: giving streams up to rebalance");
            self.stop_streams(&extra).await;
            return Ok(());
        }
        let mut wanted = fair - mine;
        for stream in &self.streams {
            if wanted == 0 {
                break;
            }
            if self.lock().contains_key(stream) {
                continue;
            }
            if self.store.holder(stream).await?.is_some() {
                continue;
            }
            let processor = (self.processors)(stream, &self.owner)?;
            if processor.stream_id() != stream {
                return Err(Error::Build(crate::BuildError::Invalid {
                    setting: "processors",
                    reason: format!(
                        "the processor built for stream `{stream}` has stream id `{}`",
                        processor.stream_id()
                    ),
                }));
            }
            let handler = (self.handlers)(stream);
            let p = processor.clone();
            let task = tokio::spawn(async move {
                p.start_with_retry(crate::default_backoff(), BoxedDispatcher(handler))
                    .await
            });
            self.lock().insert(
                stream.clone(),
                Running {
                    processor,
                    task: Some(task),
                },
            );
            wanted -= 1;
        }
        Ok(())
    }

    /// Stops the processors of `streams` together (each releasing its lease) and forgets
    /// them.
    async fn stop_streams(&self, streams: &[String]) {
        let mut stopping: Vec<(String, Running)> = {
            let mut running = self.lock();
            streams
                .iter()
                .filter_map(|s| running.remove(s).map(|r| (s.clone(), r)))
                .collect()
        };
        for (_, r) in &stopping {
            r.processor.stop();
        }
        for (stream, r) in &mut stopping {
            let Some(task) = r.task.take() else { continue };
            if let Ok(Err(e)) = task.await {
                tracing::warn!(group = %self.name, stream = %stream, error = %e, "group: a stream's processor ended with an error");
            }
        }
    }

    /// Stops every processor and gives the membership up.
    async fn shutdown(&self) {
        self.stop_streams(&self.running()).await;
        if let Ok(Some(lease)) = self.store.holder(&self.member_id()).await
            && lease.owner == self.owner
        {
            let _ = self.store.release(&lease).await;
        }
    }
}

/// A boxed handler as a handler.
struct BoxedDispatcher(Box<dyn Dispatcher>);

#[async_trait::async_trait]
impl Dispatcher for BoxedDispatcher {
    async fn dispatch(
        &self,
        event: &cdc_core::ChangeEvent,
        previous: Option<cdc_core::BoxError>,
    ) -> std::result::Result<(), cdc_core::BoxError> {
        self.0.dispatch(event, previous).await
    }
}
