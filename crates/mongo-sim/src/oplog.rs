//! The oplog: one ordered, cluster-wide log of what happened, with a capacity, and the
//! cluster clock that stamps it.

use std::collections::VecDeque;

use bson::{Binary, Document, Timestamp, doc};

use crate::{timed::TimedMutex, update::Delta};

/// What an oplog entry did.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    /// A document was inserted.
    Insert {
        /// The document.
        doc: Document,
        /// Its `documentKey` (the shard key's fields, then `_id`).
        key: Document,
    },
    /// A document was updated.
    Update {
        /// Its `_id` as `{ _id: … }`.
        key: Document,
        /// What changed.
        delta: Delta,
        /// The pre-image, recorded when images are enabled.
        pre: Option<Document>,
        /// The post-image, recorded when images are enabled.
        post: Option<Document>,
    },
    /// A document was replaced.
    Replace {
        /// Its `_id` as `{ _id: … }`.
        key: Document,
        /// The new document.
        doc: Document,
        /// The pre-image, recorded when images are enabled.
        pre: Option<Document>,
    },
    /// A document was deleted.
    Delete {
        /// Its `_id` as `{ _id: … }`.
        key: Document,
        /// The pre-image, recorded when images are enabled.
        pre: Option<Document>,
    },
    /// The collection was dropped.
    Drop,
    /// The collection was renamed.
    Rename {
        /// The target database.
        to_db: String,
        /// The target collection.
        to_coll: String,
        /// The UUID of the target dropped by the rename, if any.
        drop_target: Option<Binary>,
    },
    /// The database was dropped (after a `Drop` entry for each of its collections).
    DropDatabase,
    /// A collection or view was created.
    Create {
        /// The creation options (`viewOn`, `pipeline`, …).
        description: Document,
    },
    /// Indexes were created.
    CreateIndexes {
        /// Their specifications.
        indexes: Vec<Document>,
    },
    /// Indexes were dropped.
    DropIndexes {
        /// Their specifications.
        indexes: Vec<Document>,
    },
    /// A collection was sharded (the sharded front): `shardKey`, `unique`,
    /// `presplitHashedZones`.
    ShardCollection {
        /// What `operationDescription` shows.
        description: Document,
    },
    /// Collection options changed.
    Modify {
        /// The options given to `collMod`.
        description: Document,
    },
}

/// An entry not yet given its place in the oplog.
#[derive(Clone, Debug)]
pub(crate) struct PendingEntry {
    /// The database.
    pub(crate) db: String,
    /// The collection (empty for `DropDatabase`).
    pub(crate) coll: String,
    /// The collection's UUID.
    pub(crate) uuid: Option<Binary>,
    /// What happened.
    pub(crate) op: Op,
}

/// One entry of the cluster-wide log.
#[derive(Clone, Debug)]
pub(crate) struct OplogEntry {
    /// Position: strictly increasing from 1.
    pub(crate) seq: u64,
    /// Cluster time: non-decreasing; a transaction's entries share one.
    pub(crate) ts: Timestamp,
    /// Wall-clock time.
    pub(crate) wall: bson::DateTime,
    /// The database.
    pub(crate) db: String,
    /// The collection (empty for `DropDatabase`).
    pub(crate) coll: String,
    /// The collection's UUID.
    pub(crate) uuid: Option<Binary>,
    /// What happened.
    pub(crate) op: Op,
    /// `(lsid, txnNumber)` for entries written by a transaction.
    pub(crate) txn: Option<(Document, i64)>,
    /// The entry's size as `local.oplog.rs` shows it, in bytes; counted only while the log
    /// is bounded by bytes (0 otherwise).
    pub(crate) size: usize,
}

impl OplogEntry {
    /// The entry as a client reading `local.oplog.rs` sees it: `ts`, `t`, `v`, `op`
    /// (`i`, `u`, `d`, `c`), `ns`, `ui`, `o`, `o2`, `wall` (and `lsid`, `txnNumber` for a
    /// transaction's write). An update's `o` is `{ $v: 2, diff: { u: {…}, d: {…} } }` with
    /// dotted paths (the server nests sub-documents: `sa: { u: … }`); a transaction's
    /// writes are entries of their own rather than one `applyOps`.
    pub(crate) fn to_document(&self) -> Document {
        let ns = format!("{}.{}", self.db, self.coll);
        let cmd_ns = format!("{}.$cmd", self.db);
        let (op, ns, o, o2) = match &self.op {
            Op::Insert { doc, key } => ("i", ns, doc.clone(), Some(key.clone())),
            Op::Update { key, delta, .. } => {
                let mut u = Document::new();
                for (path, value) in &delta.updated {
                    u.insert(crate::update::dotted(path), value.clone());
                }
                for (path, len) in &delta.truncated {
                    u.insert(
                        format!("{}.$size", crate::update::dotted(path)),
                        i64::from(*len),
                    );
                }
                let mut d = Document::new();
                for path in &delta.removed {
                    d.insert(crate::update::dotted(path), false);
                }
                let mut diff = Document::new();
                if !u.is_empty() {
                    diff.insert("u", u);
                }
                if !d.is_empty() {
                    diff.insert("d", d);
                }
                ("u", ns, doc! { "$v": 2, "diff": diff }, Some(key.clone()))
            }
            Op::Replace { key, doc, .. } => ("u", ns, doc.clone(), Some(key.clone())),
            Op::Delete { key, .. } => ("d", ns, key.clone(), None),
            Op::Drop => ("c", cmd_ns, doc! { "drop": &self.coll }, None),
            Op::Rename {
                to_db,
                to_coll,
                drop_target,
            } => {
                let mut o = doc! { "renameCollection": &ns, "to": format!("{to_db}.{to_coll}"), "stayTemp": false };
                if let Some(uuid) = drop_target {
                    o.insert("dropTarget", uuid.clone());
                }
                ("c", cmd_ns, o, None)
            }
            Op::DropDatabase => ("c", cmd_ns, doc! { "dropDatabase": 1 }, None),
            Op::Create { description } => {
                let mut o = doc! { "create": &self.coll };
                o.extend(description.clone());
                ("c", cmd_ns, o, None)
            }
            Op::CreateIndexes { indexes } => {
                let mut o = doc! { "createIndexes": &self.coll };
                if let Some(first) = indexes.first() {
                    o.extend(first.clone());
                }
                ("c", cmd_ns, o, None)
            }
            Op::DropIndexes { indexes } => {
                let name = indexes
                    .first()
                    .and_then(|i| i.get_str("name").ok())
                    .unwrap_or("")
                    .to_owned();
                (
                    "c",
                    cmd_ns,
                    doc! { "dropIndexes": &self.coll, "index": name },
                    None,
                )
            }
            Op::ShardCollection { description } => {
                let mut o2 = doc! { "shardCollection": &ns };
                o2.extend(description.clone());
                let o = doc! { "msg": { "shardCollection": &ns } };
                ("n", ns, o, Some(o2))
            }
            Op::Modify { description } => {
                let mut o = doc! { "collMod": &self.coll };
                o.extend(description.clone());
                ("c", cmd_ns, o, None)
            }
        };
        let mut out = doc! { "op": op, "ns": ns };
        if let Some(uuid) = &self.uuid {
            out.insert("ui", uuid.clone());
        }
        out.insert("o", o);
        if let Some(o2) = o2 {
            out.insert("o2", o2);
        }
        if let Some((lsid, txn_number)) = &self.txn {
            out.insert("lsid", lsid.clone());
            out.insert("txnNumber", *txn_number);
        }
        out.insert("ts", self.ts);
        out.insert("t", 1_i64);
        out.insert("v", 2_i64);
        out.insert("wall", self.wall);
        out
    }
}

/// The retained log and the clock.
#[derive(Debug)]
pub(crate) struct Oplog {
    /// The retained entries, oldest first.
    pub(crate) entries: VecDeque<OplogEntry>,
    /// How many entries the log keeps.
    pub(crate) capacity: usize,
    /// How many bytes the log keeps, when bounded by bytes too.
    pub(crate) max_bytes: Option<usize>,
    /// The bytes the retained entries take (while bounded by bytes).
    pub(crate) bytes: usize,
    /// The sequence number the next entry gets.
    pub(crate) next_seq: u64,
    /// The cluster time of the newest entry dropped from the log.
    pub(crate) dropped_upto: Option<Timestamp>,
    /// The newest cluster time handed out.
    pub(crate) last_ts: Timestamp,
}

impl Oplog {
    /// An empty log keeping `capacity` entries.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            capacity: capacity.max(1),
            max_bytes: None,
            bytes: 0,
            next_seq: 1,
            dropped_upto: None,
            last_ts: Timestamp {
                time: now_secs(),
                increment: 0,
            },
        }
    }

    /// Hands out the next cluster time.
    pub(crate) fn next_ts(&mut self) -> Timestamp {
        let now = now_secs();
        self.last_ts = if now > self.last_ts.time {
            Timestamp {
                time: now,
                increment: 1,
            }
        } else {
            Timestamp {
                time: self.last_ts.time,
                increment: self.last_ts.increment + 1,
            }
        };
        self.last_ts
    }

    /// Appends one entry outside a transaction and returns the cluster time it got.
    pub(crate) fn append_one(&mut self, entry: PendingEntry) -> Timestamp {
        self.append(vec![entry], None);
        self.last_ts
    }

    /// Appends a committed transaction's entries at the cluster time `ts` it committed
    /// at (handed out by [`Self::next_ts`] just before).
    pub(crate) fn append_txn(
        &mut self,
        entries: Vec<PendingEntry>,
        txn: (Document, i64),
        ts: Timestamp,
    ) {
        self.push(entries, Some(txn), Some(ts));
    }

    /// Appends entries. Outside a transaction each gets its own cluster time.
    pub(crate) fn append(&mut self, entries: Vec<PendingEntry>, txn: Option<(Document, i64)>) {
        let shared_ts = txn.as_ref().map(|_| self.next_ts());
        self.push(entries, txn, shared_ts);
    }

    fn push(
        &mut self,
        entries: Vec<PendingEntry>,
        txn: Option<(Document, i64)>,
        shared_ts: Option<Timestamp>,
    ) {
        if entries.is_empty() {
            return;
        }
        let wall = bson::DateTime::now();
        for e in entries {
            let ts = match shared_ts {
                Some(ts) => ts,
                None => self.next_ts(),
            };
            let seq = self.next_seq;
            self.next_seq += 1;
            let mut entry = OplogEntry {
                seq,
                ts,
                wall,
                db: e.db,
                coll: e.coll,
                uuid: e.uuid,
                op: e.op,
                txn: txn.clone(),
                size: 0,
            };
            if self.max_bytes.is_some() {
                entry.size = entry.to_document().to_vec().map_or(0, |b| b.len());
                self.bytes += entry.size;
            }
            self.entries.push_back(entry);
        }
        self.trim();
    }

    /// Drops the oldest entries beyond capacity (in entries, and in bytes when bounded
    /// so; the newest entry always stays, as a server's oplog keeps its last).
    pub(crate) fn trim(&mut self) {
        if self.max_bytes.is_none() {
            self.bytes = 0;
        }
        while self.entries.len() > self.capacity
            || (self.entries.len() > 1 && self.max_bytes.is_some_and(|max| self.bytes > max))
        {
            if let Some(old) = self.entries.pop_front() {
                self.bytes = self.bytes.saturating_sub(old.size);
                self.dropped_upto = Some(old.ts);
            }
        }
    }

    /// The sequence number of the oldest retained entry (or the next one, if empty).
    pub(crate) fn first_seq(&self) -> u64 {
        self.entries.front().map_or(self.next_seq, |e| e.seq)
    }

    /// The newest entry's sequence number (0 if none was ever written).
    pub(crate) fn head_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// The entry with sequence number `seq`, if retained.
    pub(crate) fn entry(&self, seq: u64) -> Option<&OplogEntry> {
        let first = self.entries.front()?.seq;
        let index = seq.checked_sub(first)?;
        self.entries.get(usize::try_from(index).ok()?)
    }
}

/// The oplog behind its own lock, which is also the commit lock: whoever holds it hands
/// out cluster times, appends entries and installs the versions they stand for, in one
/// step. Times are handed out in the order entries are appended, so the log has no holes
/// and a reader who sees an entry sees every earlier one (MongoDB's oplog visibility).
/// Writes prepare everything else (finding their documents, applying updates, building
/// entries) before they take it. Taken after the server lock and before a collection's.
pub(crate) type OplogLock = TimedMutex<Oplog>;

impl TimedMutex<Oplog> {
    /// The newest cluster time handed out.
    pub(crate) fn last_ts(&self) -> Timestamp {
        self.lock().last_ts
    }
}

/// Seconds since the Unix epoch, now.
pub(crate) fn now_secs() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}
