//! `mongo-sim`: a MongoDB-wire-compatible single-node replica set with an oplog and change
//! streams, for tests and the demo. Never a product database: see `docs/mongo-sim.md` for
//! what it supports and what it does not.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let sim = mongo_sim::MongoSim::start().await?;
//! let uri = sim.uri(); // mongodb://127.0.0.1:PORT/?replicaSet=rs0
//! // ... connect with the `mongodb` driver ...
//! sim.shutdown().await;
//! # Ok(()) }
//! ```

mod catalog;
mod changestream;
mod commands;
mod engine;
pub mod error;
mod faults;
mod matcher;
mod oplog;
mod pipeline;
mod server;
mod state;
mod status;
mod timed;
mod update;
mod value;
pub mod wire;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{commands::ServerInfo, server::Shared};

/// Options for a simulator.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// The port to bind on 127.0.0.1 (0: any free port).
    pub port: u16,
    /// The replica set name.
    pub set_name: String,
    /// How many entries the oplog keeps before dropping the oldest.
    pub oplog_capacity: usize,
    /// How many bytes the oplog keeps (its entries as `local.oplog.rs` shows them)
    /// before dropping the oldest, as `--oplogSize` bounds a server's; `None`: only
    /// `oplog_capacity` bounds it.
    pub oplog_size_bytes: Option<usize>,
    /// How many connections may be open at once (`maxIncomingConnections`); one more is
    /// closed as soon as it is accepted.
    pub max_connections: usize,
    /// How long documents keep their older versions, in seconds (MongoDB's
    /// `minSnapshotHistoryWindowInSeconds`): a snapshot read at an older cluster time is
    /// `SnapshotTooOld` (239). A view still being read keeps what it reads.
    pub snapshot_history_secs: u32,
    /// How long a transaction may stay uncommitted, in seconds (MongoDB's
    /// `transactionLifetimeLimitSeconds`): an older one is aborted (its snapshot let go)
    /// and its next command is `NoSuchTransaction` (251).
    pub transaction_lifetime_secs: u32,
    /// Present itself as a `mongos` of a sharded cluster (`--sharded`): see
    /// `docs/mongo-sim.md`.
    pub sharded: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            port: 0,
            set_name: "rs0".to_owned(),
            oplog_capacity: 2_000_000,
            oplog_size_bytes: None,
            max_connections: 1_000,
            snapshot_history_secs: 300,
            transaction_lifetime_secs: 60,
            sharded: false,
        }
    }
}

/// A running simulator. Dropping it without [`MongoSim::shutdown`] leaves its tasks
/// running until the runtime ends.
#[derive(Debug)]
pub struct MongoSim {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl MongoSim {
    /// Starts a simulator on a free port of 127.0.0.1 with default options.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(SimOptions::default()).await
    }

    /// Starts a simulator with options.
    ///
    /// # Errors
    /// When the port cannot be bound.
    pub async fn start_with(options: SimOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", options.port)).await?;
        let addr = listener.local_addr()?;
        let info = ServerInfo {
            host: addr.to_string(),
            set_name: options.set_name.clone(),
        };
        let shared = Arc::new(Shared::new(
            info,
            options.oplog_capacity,
            options.max_connections,
        ));
        shared.set_oplog_size(options.oplog_size_bytes);
        {
            let mut state = shared.lock();
            state.history.window_secs = options.snapshot_history_secs;
            state.txn_lifetime =
                std::time::Duration::from_secs(options.transaction_lifetime_secs.into());
            state.sharded = options.sharded;
            state.shard_host = format!("{}/{}", options.set_name, addr);
        }
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(server::serve(listener, Arc::clone(&shared), stop_rx));
        Ok(Self {
            shared,
            addr,
            stop,
            task: Some(task),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A URI naming the replica set (`?replicaSet=`), with short server-selection and
    /// heartbeat intervals suited to tests.
    /// A sharded front (`--sharded`) is a `mongos`: its URI names no replica set.
    pub fn uri(&self) -> String {
        if self.shared.lock().sharded {
            return format!(
                "mongodb://{}/?serverSelectionTimeoutMS=10000&heartbeatFrequencyMS=500",
                self.addr
            );
        }
        format!(
            "mongodb://{}/?replicaSet={}&serverSelectionTimeoutMS=10000&heartbeatFrequencyMS=500",
            self.addr, self.shared.info.set_name
        )
    }

    /// A URI with `directConnection=true`.
    pub fn direct_uri(&self) -> String {
        format!("mongodb://{}/?directConnection=true", self.addr)
    }

    /// Stops listening and closes every connection.
    pub async fn shutdown(mut self) {
        self.stop_listening().await;
    }

    async fn stop_listening(&mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Closes every open connection (clients see network errors and reconnect).
    pub fn drop_connections(&self) {
        self.shared.kill.send_modify(|n| *n += 1);
    }

    /// How long the server's state lock has been held in all since it started (every
    /// command's decisions, the catalog's changes, a read's taking of its view; a write
    /// outside a transaction takes it only to start): with the wall time of a run it
    /// tells how much of the run was serialized on it.
    pub fn lock_held(&self) -> std::time::Duration {
        self.shared.lock_held()
    }

    /// How long the commit lock (the oplog's) has been held in all since the server
    /// started: each write's commit (its checks, cluster time, entry and version), change
    /// streams' scans of the oplog, catalog changes' entries.
    pub fn commit_lock_held(&self) -> std::time::Duration {
        self.shared.log.held()
    }

    /// Shrinks (or grows) the oplog; shrinking drops the oldest entries at once, so
    /// streams and tokens behind them fail with ChangeStreamHistoryLost (286).
    pub fn set_oplog_capacity(&self, capacity: usize) {
        let mut log = self.shared.log.lock();
        log.capacity = capacity.max(1);
        log.trim();
    }

    /// Steps down: `hello` reports a secondary with no primary; writes fail with
    /// NotWritablePrimary (10107, `RetryableWriteError`) and reads, `aggregate` and
    /// `getMore` with NotPrimaryNoSecondaryOk (13435; a change stream's `getMore` labelled
    /// `ResumableChangeStreamError` by the server's rule), until
    /// [`MongoSim::step_up`].
    pub fn step_down(&self) {
        self.shared.lock().faults.stepped_down = true;
        self.drop_connections();
    }

    /// Steps up again after [`MongoSim::step_down`], as a new election (a new term).
    pub fn step_up(&self) {
        self.shared.term.fetch_add(1, Ordering::Relaxed);
        self.shared.lock().faults.stepped_down = false;
    }

    /// Pauses: connections are accepted and requests read, but nothing is answered until
    /// [`MongoSim::resume`].
    pub fn pause(&self) {
        self.shared.paused.send_replace(true);
    }

    /// Answers again after [`MongoSim::pause`].
    pub fn resume(&self) {
        self.shared.paused.send_replace(false);
    }

    /// Stops and starts again on the same port, keeping the data and the oplog; every
    /// connection and cursor is lost, as in a process restart.
    ///
    /// # Errors
    /// When the port cannot be bound again.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.stop_listening().await;
        self.shared.lock().cursors.clear();
        let listener = TcpListener::bind(self.addr).await?;
        let (stop, stop_rx) = watch::channel(false);
        self.stop = stop;
        self.task = Some(tokio::spawn(server::serve(
            listener,
            Arc::clone(&self.shared),
            stop_rx,
        )));
        Ok(())
    }

    /// How many entries the oplog holds now.
    pub fn oplog_len(&self) -> usize {
        self.shared.log.lock().entries.len()
    }
}

/// The deployment a test runs against: the replica set named by the environment variable
/// `CDC_MONGODB_URI` when it is set, otherwise a fresh simulator.
#[derive(Debug)]
pub enum TestDeployment {
    /// A simulator started for this test.
    Sim(MongoSim),
    /// A real deployment at this URI.
    External(String),
}

impl TestDeployment {
    /// Starts a simulator, or names the deployment of `CDC_MONGODB_URI`.
    ///
    /// # Errors
    /// When a simulator cannot bind a port.
    pub async fn start() -> std::io::Result<Self> {
        match std::env::var("CDC_MONGODB_URI") {
            Ok(uri) if !uri.is_empty() => Ok(Self::External(uri)),
            _ => Ok(Self::Sim(MongoSim::start().await?)),
        }
    }

    /// The URI to connect to.
    pub fn uri(&self) -> String {
        match self {
            Self::Sim(sim) => sim.uri(),
            Self::External(uri) => uri.clone(),
        }
    }

    /// The simulator, for tests that need its fault controls. `None` against a real
    /// deployment: such a test must say it was skipped and why.
    pub fn sim(&self) -> Option<&MongoSim> {
        match self {
            Self::Sim(sim) => Some(sim),
            Self::External(_) => None,
        }
    }

    /// Stops the simulator, if there is one.
    pub async fn shutdown(self) {
        if let Self::Sim(sim) = self {
            sim.shutdown().await;
        }
    }
}
