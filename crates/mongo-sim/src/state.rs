//! The simulated server's data: databases, collections, the oplog, cursors and
//! transactions, behind the server lock; the oplog has its own (the commit lock).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use bson::{Binary, Bson, Document, doc, spec::BinarySubtype};

use crate::{
    catalog::{Catalog, Collection},
    changestream::StreamCursor,
    commands::DocCursor,
    engine::{History, Pin, Ts, View},
    faults::Faults,
    oplog::{Oplog, OplogLock, PendingEntry},
    status::Activity,
    value::id_key,
};

/// A server-side cursor.
#[derive(Debug)]
pub(crate) enum Cursor {
    /// Documents: `find`, `aggregate`, `listCollections`, `listIndexes`.
    Docs(Box<DocCursor>),
    /// A change stream.
    Stream(Box<StreamCursor>),
}

/// A multi-document transaction in progress. It reads one snapshot (the cluster time of
/// its first command) and keeps what it wrote to the side until it commits: its cost is
/// the documents it touches, not the collections.
#[derive(Debug)]
pub(crate) struct Txn {
    /// Its number within the session.
    pub(crate) txn_number: i64,
    /// The session id document.
    pub(crate) lsid: Document,
    /// The time it reads at.
    pub(crate) read_at: Ts,
    /// Keeps the versions at `read_at` while it runs (let go at commit: a committed
    /// transaction is kept only to answer a repeated commit).
    pub(crate) pin: Option<Pin>,
    /// What it did to each collection it touched.
    pub(crate) colls: BTreeMap<(String, String), TxnColl>,
    /// Counts its writes, to replay them in order.
    pub(crate) writes: u64,
    /// Oplog entries to publish at commit.
    pub(crate) entries: Vec<PendingEntry>,
    /// Whether it has committed (a repeated commit then succeeds).
    pub(crate) committed: bool,
    /// When it started (it is aborted after `transactionLifetimeLimitSeconds`).
    pub(crate) started: std::time::Instant,
}

/// A transaction's side of one collection.
#[derive(Debug)]
pub(crate) struct TxnColl {
    /// The collection it read (`None`: the transaction created it).
    pub(crate) base: Option<(Binary, View)>,
    /// The collection the transaction created, installed at commit.
    pub(crate) created: Option<Collection>,
    /// `_id` key → (write number, the document now; `None`: deleted).
    pub(crate) writes: HashMap<Vec<u8>, (u64, Option<Document>)>,
}

impl TxnColl {
    /// What a read in the transaction sees, to read with no lock held.
    pub(crate) fn read(&self) -> TxnRead {
        TxnRead {
            base: self.base.as_ref().map(|(_, v)| v.clone()),
            writes: self.writes.clone(),
        }
    }

    /// The documents the transaction sees, in natural order.
    pub(crate) fn docs(&self) -> Vec<Document> {
        self.read().docs()
    }

    /// The document with `_id` key `key` as the transaction sees it.
    pub(crate) fn get(&self, key: &[u8], id: &Bson) -> Option<Document> {
        match self.writes.get(key) {
            Some((_, d)) => d.clone(),
            None => self
                .base
                .as_ref()
                .and_then(|(_, v)| v.get(id))
                .map(|d| (*d).clone()),
        }
    }
}

/// What a transaction's read sees of one collection: its snapshot and its own writes.
#[derive(Debug, Clone)]
pub(crate) struct TxnRead {
    /// The snapshot (`None`: the transaction created the collection).
    pub(crate) base: Option<View>,
    /// Its writes, as in [`TxnColl::writes`].
    pub(crate) writes: HashMap<Vec<u8>, (u64, Option<Document>)>,
}

impl TxnRead {
    /// The documents, in natural order: the snapshot's with the transaction's writes over
    /// them, then what it inserted.
    pub(crate) fn docs(&self) -> Vec<Document> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        if let Some(view) = &self.base {
            for d in view.all() {
                let key = d.get("_id").map(id_key).unwrap_or_default();
                match self.writes.get(&key) {
                    Some((_, Some(mine))) => out.push(mine.clone()),
                    Some((_, None)) => {}
                    None => out.push((*d).clone()),
                }
                seen.insert(key);
            }
        }
        let mut inserted: Vec<(&u64, &Document)> = self
            .writes
            .iter()
            .filter(|(k, _)| !seen.contains(*k))
            .filter_map(|(_, (n, d))| d.as_ref().map(|d| (n, d)))
            .collect();
        inserted.sort_by_key(|(n, _)| **n);
        out.extend(inserted.into_iter().map(|(_, d)| d.clone()));
        out
    }
}

/// All of the server's state.
#[derive(Debug)]
pub(crate) struct State {
    /// Databases → collections.
    pub(crate) dbs: Catalog,
    /// The oplog and the cluster clock, behind the commit lock (shared with writes that
    /// run with no server lock held).
    pub(crate) log: Arc<OplogLock>,
    /// Open cursors.
    pub(crate) cursors: HashMap<i64, Cursor>,
    next_cursor_id: i64,
    /// Transactions by session key.
    pub(crate) txns: HashMap<Vec<u8>, Txn>,
    /// `transactionLifetimeLimitSeconds`.
    pub(crate) txn_lifetime: std::time::Duration,
    /// When expired transactions were last looked for.
    last_reap: std::time::Instant,
    /// Injected faults.
    pub(crate) faults: Faults,
    /// Connection ids handed out.
    pub(crate) next_connection_id: i64,
    /// Operations in progress, counters and the log.
    pub(crate) activity: Activity,
    /// The history window and the views reading in it.
    pub(crate) history: History,
    /// `db.coll` (or `db`) → when it was last dropped or renamed away: a snapshot read of
    /// an earlier time finds other data there than it had.
    pub(crate) replaced_at: HashMap<String, Ts>,
    /// Whether the server presents itself as a `mongos` (`--sharded`).
    pub(crate) sharded: bool,
    /// The one shard's `host` (`set/host:port`) as `config.shards` shows it.
    pub(crate) shard_host: String,
}

impl State {
    /// A fresh server state.
    pub(crate) fn new(oplog_capacity: usize) -> Self {
        let log = Arc::new(OplogLock::new(Oplog::new(oplog_capacity)));
        let log_start = log.last_ts();
        Self {
            dbs: Catalog::new(),
            log,
            cursors: HashMap::new(),
            next_cursor_id: 1,
            txns: HashMap::new(),
            txn_lifetime: std::time::Duration::from_secs(60),
            last_reap: std::time::Instant::now(),
            faults: Faults::default(),
            next_connection_id: 1,
            activity: Activity::default(),
            history: History::new(300, crate::engine::ts(log_start)),
            replaced_at: HashMap::new(),
            sharded: false,
            shard_host: String::new(),
        }
    }

    /// Registers a cursor and returns its id.
    pub(crate) fn add_cursor(&mut self, cursor: Cursor) -> i64 {
        let id = self.next_cursor_id;
        self.next_cursor_id += 1;
        self.cursors.insert(id, cursor);
        id
    }

    /// Aborts the uncommitted transactions older than the lifetime limit, as the server's
    /// periodic reaper does: their snapshots no longer hold the history horizon back.
    /// Looks at most once a second (every write asks; the map holds every session's last
    /// transaction).
    pub(crate) fn reap_transactions(&mut self) {
        if self.last_reap.elapsed() < std::time::Duration::from_secs(1) {
            return;
        }
        self.last_reap = std::time::Instant::now();
        let limit = self.txn_lifetime;
        self.txns
            .retain(|_, t| t.committed || t.started.elapsed() <= limit);
    }

    /// Moves the history horizon on and returns it.
    pub(crate) fn horizon(&mut self) -> Ts {
        self.reap_transactions();
        let now = bson::Timestamp {
            time: crate::oplog::now_secs(),
            increment: 0,
        };
        self.history.advance(now)
    }

    /// Records that `ns` (`db.coll`, or a database) was dropped or renamed away at `at`.
    pub(crate) fn replaced(&mut self, ns: String, at: bson::Timestamp) {
        self.replaced_at.insert(ns, crate::engine::ts(at));
    }

    /// `$clusterTime` for replies at `time`.
    pub(crate) fn cluster_time_at(time: bson::Timestamp) -> Document {
        doc! {
            "clusterTime": time,
            "signature": {
                "hash": Binary { subtype: BinarySubtype::Generic, bytes: vec![0; 20] },
                "keyId": 0_i64,
            },
        }
    }
}
