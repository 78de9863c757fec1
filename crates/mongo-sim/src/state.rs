//! The simulated server's data: databases, collections, the oplog, cursors and
//! transactions. Everything lives behind one mutex; commands are short.

use std::collections::{HashMap, VecDeque};

use bson::{Binary, Document, doc, spec::BinarySubtype};

use crate::{
    catalog::{Catalog, Collection},
    changestream::StreamCursor,
    faults::Faults,
    oplog::{Oplog, PendingEntry},
    status::Activity,
};

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
    pub(crate) dbs: Catalog,
    /// The oplog and the cluster clock.
    pub(crate) log: Oplog,
    /// Open cursors.
    pub(crate) cursors: HashMap<i64, Cursor>,
    next_cursor_id: i64,
    /// Transactions by session key.
    pub(crate) txns: HashMap<Vec<u8>, Txn>,
    /// Injected faults.
    pub(crate) faults: Faults,
    /// Connection ids handed out.
    pub(crate) next_connection_id: i64,
    /// Operations in progress, counters and the log.
    pub(crate) activity: Activity,
}

impl State {
    /// A fresh server state.
    pub(crate) fn new(oplog_capacity: usize) -> Self {
        Self {
            dbs: Catalog::new(),
            log: Oplog::new(oplog_capacity),
            cursors: HashMap::new(),
            next_cursor_id: 1,
            txns: HashMap::new(),
            faults: Faults::default(),
            next_connection_id: 1,
            activity: Activity::default(),
        }
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
            "clusterTime": self.log.last_ts,
            "signature": {
                "hash": Binary { subtype: BinarySubtype::Generic, bytes: vec![0; 20] },
                "keyId": 0_i64,
            },
        }
    }
}
