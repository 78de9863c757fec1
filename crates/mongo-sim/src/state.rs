//! The simulated server's data: databases, collections, the oplog, cursors and
//! transactions. Everything lives behind one mutex; commands are short.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bson::{Binary, Bson, Document, Timestamp, doc, oid::ObjectId, spec::BinarySubtype};

use crate::{
    changestream::StreamCursor,
    error::{CmdError, CmdResult, code},
    faults::Faults,
    update::Delta,
    value::id_key,
};

/// One collection (or view).
#[derive(Clone, Debug)]
pub(crate) struct Collection {
    /// The collection's UUID (`collectionUUID` in expanded events).
    pub(crate) uuid: Binary,
    /// Documents by record id, in insertion (natural) order.
    pub(crate) docs: BTreeMap<u64, Document>,
    /// `_id` key → record id; the unique `_id` index.
    pub(crate) ids: HashMap<Vec<u8>, u64>,
    next_rid: u64,
    /// Secondary index specifications (recorded, not used for queries).
    pub(crate) indexes: Vec<Document>,
    /// Whether `changeStreamPreAndPostImages` is enabled.
    pub(crate) images: bool,
    /// For a view: the source collection and pipeline.
    pub(crate) view: Option<(String, Vec<Bson>)>,
    /// Bumped by every write, so transactions can detect conflicts.
    pub(crate) version: u64,
}

impl Collection {
    /// A new, empty collection.
    pub(crate) fn new() -> Self {
        let uuid = Binary {
            subtype: BinarySubtype::Uuid,
            bytes: random_uuid(),
        };
        Self {
            uuid,
            docs: BTreeMap::new(),
            ids: HashMap::new(),
            next_rid: 1,
            indexes: Vec::new(),
            images: false,
            view: None,
            version: 0,
        }
    }

    /// Inserts a document that has an `_id`; a duplicate `_id` is error 11000.
    pub(crate) fn insert(&mut self, ns: &str, doc: Document) -> CmdResult<()> {
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        let key = id_key(&id);
        if self.ids.contains_key(&key) {
            return Err(CmdError::new(
                code::DUPLICATE_KEY,
                format!(
                    "E11000 duplicate key error collection: {ns} index: _id_ dup key: {{ _id: {id} }}"
                ),
            ));
        }
        let rid = self.next_rid;
        self.next_rid += 1;
        self.ids.insert(key, rid);
        self.docs.insert(rid, doc);
        self.version += 1;
        Ok(())
    }

    /// Replaces the document at `rid`.
    pub(crate) fn replace(&mut self, rid: u64, doc: Document) {
        self.docs.insert(rid, doc);
        self.version += 1;
    }

    /// Removes the document at `rid`.
    pub(crate) fn remove(&mut self, rid: u64) -> Option<Document> {
        let doc = self.docs.remove(&rid)?;
        if let Some(id) = doc.get("_id") {
            self.ids.remove(&id_key(id));
        }
        self.version += 1;
        Some(doc)
    }

    /// The document with this `_id`.
    pub(crate) fn by_id(&self, id: &Bson) -> Option<&Document> {
        self.ids.get(&id_key(id)).and_then(|rid| self.docs.get(rid))
    }
}

impl Default for Collection {
    fn default() -> Self {
        Self::new()
    }
}

fn random_uuid() -> Vec<u8> {
    // Two ObjectIds give 16 bytes that differ between collections and runs.
    let mut bytes = ObjectId::new().bytes().to_vec();
    bytes.extend_from_slice(&ObjectId::new().bytes()[..4]);
    bytes[6] = (bytes[6] & 0x0F) | 0x40;
    bytes[8] = (bytes[8] & 0x3F) | 0x80;
    bytes
}

/// What an oplog entry did.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    /// A document was inserted.
    Insert {
        /// The document.
        doc: Document,
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
}

/// A server-side cursor.
#[derive(Debug)]
pub(crate) enum Cursor {
    /// Materialized results of `find`, `aggregate`, `listCollections`, `listIndexes`.
    Docs {
        /// `db.coll` for replies.
        ns: String,
        /// What remains.
        docs: VecDeque<Document>,
    },
    /// A change stream.
    Stream(Box<StreamCursor>),
}

/// A multi-document transaction in progress.
#[derive(Debug)]
pub(crate) struct Txn {
    /// Its number within the session.
    pub(crate) txn_number: i64,
    /// The session id document.
    pub(crate) lsid: Document,
    /// Private copies of the collections it touched.
    pub(crate) workspace: HashMap<(String, String), Collection>,
    /// The live version of each touched collection when first touched (`None`: absent).
    pub(crate) base_versions: HashMap<(String, String), Option<u64>>,
    /// Oplog entries to publish at commit.
    pub(crate) entries: Vec<PendingEntry>,
    /// Whether it has committed (a repeated commit then succeeds).
    pub(crate) committed: bool,
}

/// All of the server's state.
#[derive(Debug)]
pub(crate) struct State {
    /// Databases → collections.
    pub(crate) dbs: BTreeMap<String, BTreeMap<String, Collection>>,
    /// The retained oplog, oldest first.
    pub(crate) oplog: VecDeque<OplogEntry>,
    /// How many entries the oplog keeps.
    pub(crate) oplog_capacity: usize,
    /// The sequence number the next entry gets.
    pub(crate) next_seq: u64,
    /// The cluster time of the newest entry dropped from the oplog.
    pub(crate) dropped_upto: Option<Timestamp>,
    /// The newest cluster time handed out.
    pub(crate) last_ts: Timestamp,
    /// Open cursors.
    pub(crate) cursors: HashMap<i64, Cursor>,
    next_cursor_id: i64,
    /// Transactions by session key.
    pub(crate) txns: HashMap<Vec<u8>, Txn>,
    /// Injected faults.
    pub(crate) faults: Faults,
    /// Connection ids handed out.
    pub(crate) next_connection_id: i64,
}

impl State {
    /// A fresh server state.
    pub(crate) fn new(oplog_capacity: usize) -> Self {
        Self {
            dbs: BTreeMap::new(),
            oplog: VecDeque::new(),
            oplog_capacity: oplog_capacity.max(1),
            next_seq: 1,
            dropped_upto: None,
            last_ts: Timestamp {
                time: now_secs(),
                increment: 0,
            },
            cursors: HashMap::new(),
            next_cursor_id: 1,
            txns: HashMap::new(),
            faults: Faults::default(),
            next_connection_id: 1,
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

    /// Appends entries. Outside a transaction each gets its own cluster time; a committed
    /// transaction's entries share one.
    pub(crate) fn append(&mut self, entries: Vec<PendingEntry>, txn: Option<(Document, i64)>) {
        if entries.is_empty() {
            return;
        }
        let shared_ts = txn.as_ref().map(|_| self.next_ts());
        let wall = bson::DateTime::now();
        for e in entries {
            let ts = match shared_ts {
                Some(ts) => ts,
                None => self.next_ts(),
            };
            let seq = self.next_seq;
            self.next_seq += 1;
            self.oplog.push_back(OplogEntry {
                seq,
                ts,
                wall,
                db: e.db,
                coll: e.coll,
                uuid: e.uuid,
                op: e.op,
                txn: txn.clone(),
            });
        }
        self.trim_oplog();
    }

    /// Drops the oldest entries beyond capacity.
    pub(crate) fn trim_oplog(&mut self) {
        while self.oplog.len() > self.oplog_capacity {
            if let Some(old) = self.oplog.pop_front() {
                self.dropped_upto = Some(old.ts);
            }
        }
    }

    /// The sequence number of the oldest retained entry (or the next one, if empty).
    pub(crate) fn first_seq(&self) -> u64 {
        self.oplog.front().map_or(self.next_seq, |e| e.seq)
    }

    /// The newest entry's sequence number (0 if none was ever written).
    pub(crate) fn head_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// The entry with sequence number `seq`, if retained.
    pub(crate) fn entry(&self, seq: u64) -> Option<&OplogEntry> {
        let first = self.oplog.front()?.seq;
        let index = seq.checked_sub(first)?;
        self.oplog.get(usize::try_from(index).ok()?)
    }

    /// Registers a cursor and returns its id.
    pub(crate) fn add_cursor(&mut self, cursor: Cursor) -> i64 {
        let id = self.next_cursor_id;
        self.next_cursor_id += 1;
        self.cursors.insert(id, cursor);
        id
    }

    /// `$clusterTime` for replies.
    pub(crate) fn cluster_time_doc(&self) -> Document {
        doc! {
            "clusterTime": self.last_ts,
            "signature": {
                "hash": Binary { subtype: BinarySubtype::Generic, bytes: vec![0; 20] },
                "keyId": 0_i64,
            },
        }
    }
}

/// Seconds since the Unix epoch, now.
pub(crate) fn now_secs() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// Whether a database is internal (never shown to database or cluster streams).
pub(crate) fn is_internal_db(db: &str) -> bool {
    matches!(db, "admin" | "config" | "local")
}
