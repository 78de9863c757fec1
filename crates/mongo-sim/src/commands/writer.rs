//! Where a command's writes go (the live collections, stamped with a new cluster time
//! each, or a transaction's side) and the oplog entries they leave.

use std::{ops::Bound, sync::Arc};

use bson::{Binary, Bson, Document, doc};

use super::sharding::document_key;
use crate::{
    catalog::Collection,
    engine::{self, Ts},
    error::{CmdError, CmdResult, code},
    matcher::{Filter, id_range},
    oplog::{Op, PendingEntry},
    state::{State, Txn, TxnColl},
    update::delta,
    value::id_key,
};

/// Where the writes of one command go.
pub(crate) struct Writer<'a> {
    pub(crate) state: &'a mut State,
    txn: Option<&'a mut Txn>,
    /// Versions older than this may be dropped as records are written.
    horizon: Ts,
}

/// `WriteConflict` (112) as a transaction meets it.
pub(crate) fn write_conflict() -> CmdError {
    CmdError::new(
        code::WRITE_CONFLICT,
        "Write conflict during plan execution and yielding is disabled.",
    )
    .with_label("TransientTransactionError")
}

impl<'a> Writer<'a> {
    pub(crate) fn new(state: &'a mut State, txn: Option<&'a mut Txn>) -> Self {
        let horizon = state.horizon();
        Self {
            state,
            txn,
            horizon,
        }
    }

    fn live(&self, db: &str, name: &str) -> Option<&Collection> {
        self.state.dbs.get(db).and_then(|d| d.get(name))
    }

    fn live_mut(&mut self, db: &str, name: &str) -> Option<&mut Collection> {
        self.state.dbs.get_mut(db).and_then(|d| d.get_mut(name))
    }

    /// Makes sure `db.name` can be written: `Ok(false)` when it does not exist and
    /// `create` is false; created (with a `create` entry) otherwise. A view is refused.
    pub(crate) fn ensure(&mut self, db: &str, name: &str, create: bool) -> CmdResult<bool> {
        validate_ns(db, name)?;
        let live = self.state.dbs.get(db).and_then(|d| d.get(name));
        if live.is_some_and(|c| c.view.is_some()) {
            return Err(CmdError::new(
                166,
                format!("Namespace {db}.{name} is a view, not a collection"),
            ));
        }
        let key = (db.to_owned(), name.to_owned());
        if let Some(txn) = self.txn.as_deref_mut() {
            if txn.colls.contains_key(&key) {
                return Ok(true);
            }
            let side = match live {
                Some(c) => TxnColl {
                    base: Some((c.uuid.clone(), self.state.history.view(c, txn.read_at))),
                    created: None,
                    writes: Default::default(),
                },
                None if create => {
                    let c = Collection::new();
                    txn.entries
                        .push(create_entry(db, name, &c, Document::new()));
                    TxnColl {
                        base: None,
                        created: Some(c),
                        writes: Default::default(),
                    }
                }
                None => return Ok(false),
            };
            txn.colls.insert(key, side);
            return Ok(true);
        }
        if live.is_some() {
            return Ok(true);
        }
        if !create {
            return Ok(false);
        }
        let c = Collection::new();
        self.state
            .log
            .append_one(create_entry(db, name, &c, Document::new()));
        self.state
            .dbs
            .entry(db.to_owned())
            .or_default()
            .insert(name.to_owned(), c);
        Ok(true)
    }

    fn side(&mut self, db: &str, name: &str) -> CmdResult<(&mut Txn, Option<&Collection>)> {
        let live = self.state.dbs.get(db).and_then(|d| d.get(name));
        let txn = self
            .txn
            .as_deref_mut()
            .ok_or_else(|| CmdError::new(code::INTERNAL_ERROR, "no transaction"))?;
        Ok((txn, live))
    }

    /// The collection's UUID, whether it records pre- and post-images, and its shard key.
    fn settings(&self, db: &str, name: &str) -> (Option<Binary>, bool, Option<Document>) {
        let key = (db.to_owned(), name.to_owned());
        let coll = self
            .txn
            .as_deref()
            .and_then(|t| t.colls.get(&key))
            .and_then(|s| s.created.as_ref())
            .or_else(|| self.live(db, name));
        coll.map_or((None, false, None), |c| {
            (Some(c.uuid.clone()), c.images, c.shard_key.clone())
        })
    }

    /// The documents `filter` matches, in natural order, as this command sees them;
    /// `first` stops at the first.
    pub(crate) fn matching(
        &self,
        db: &str,
        name: &str,
        filter: &Filter,
        first: bool,
    ) -> Vec<(Vec<u8>, Arc<Document>)> {
        let key = (db.to_owned(), name.to_owned());
        let range = id_range(filter);
        if let Some(txn) = self.txn.as_deref() {
            let Some(side) = txn.colls.get(&key) else {
                return Vec::new();
            };
            // One `_id`: looked up, as the live collection's index does, instead of
            // reading the whole snapshot (a transaction costs the documents it touches).
            if let Some((Bound::Included(low), Bound::Included(high))) = &range
                && low == high
            {
                let key = id_key(&low.0);
                return side
                    .get(&key, &low.0)
                    .filter(|d| filter.matches(d))
                    .map(|d| (key, Arc::new(d)))
                    .into_iter()
                    .collect();
            }
            let docs = side.docs().into_iter().filter(|d| filter.matches(d));
            let docs = docs.map(|d| (d.get("_id").map(id_key).unwrap_or_default(), Arc::new(d)));
            return if first {
                docs.take(1).collect()
            } else {
                docs.collect()
            };
        }
        self.live(db, name).map_or_else(Vec::new, |c| {
            c.matching(range, &|d| filter.matches(d), first)
        })
    }

    /// Inserts `doc` (which has its `_id`).
    pub(crate) fn insert(&mut self, db: &str, name: &str, doc: Document) -> CmdResult<()> {
        let ns = format!("{db}.{name}");
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        let key = id_key(&id);
        let (uuid, _, shard_key) = self.settings(db, name);
        let op = Op::Insert {
            key: document_key(shard_key.as_ref(), &doc),
            doc: doc.clone(),
        };
        let entry = entry(db, name, uuid, op);
        if self.txn.is_some() {
            let (txn, live) = self.side(db, name)?;
            let read_at = txn.read_at;
            if live.is_some_and(|c| c.written_at(&key).is_some_and(|w| w > read_at)) {
                return Err(write_conflict());
            }
            txn.writes += 1;
            let n = txn.writes;
            let side = side_of(txn, db, name)?;
            if side.get(&key, &id).is_some() {
                return Err(engine::duplicate_key(&ns, &id));
            }
            side.writes.insert(key, (n, Some(doc)));
            txn.entries.push(entry);
            return Ok(());
        }
        let horizon = self.horizon;
        let coll = self
            .live(db, name)
            .ok_or_else(|| CmdError::bad_value("no collection"))?;
        if coll.contains(&key) {
            return Err(engine::duplicate_key(&ns, &id));
        }
        let at = engine::ts(self.state.log.append_one(entry));
        let coll = self
            .live_mut(db, name)
            .ok_or_else(|| CmdError::bad_value("no collection"))?;
        coll.insert(&ns, doc, at, horizon)
    }

    /// Replaces `old` (the document with `_id` key `key`) with `new`, logged as a
    /// replacement or as an update with what changed.
    pub(crate) fn replace(
        &mut self,
        db: &str,
        name: &str,
        key: &[u8],
        old: &Document,
        new: Document,
        replacement: bool,
    ) -> CmdResult<()> {
        let (uuid, images, shard_key) = self.settings(db, name);
        // As the server writes `o2`: the document key of the document before the update
        // (the shard key it had, when an update changes it).
        let id_doc = document_key(shard_key.as_ref(), old);
        let pre = images.then(|| old.clone());
        let op = if replacement {
            Op::Replace {
                key: id_doc,
                doc: new.clone(),
                pre,
            }
        } else {
            Op::Update {
                key: id_doc,
                delta: delta(old, &new),
                pre,
                post: images.then(|| new.clone()),
            }
        };
        self.write(db, name, key, Some(new), entry(db, name, uuid, op))
    }

    /// Removes `old` (the document with `_id` key `key`).
    pub(crate) fn remove(
        &mut self,
        db: &str,
        name: &str,
        key: &[u8],
        old: &Document,
    ) -> CmdResult<()> {
        let (uuid, images, shard_key) = self.settings(db, name);
        let op = Op::Delete {
            key: document_key(shard_key.as_ref(), old),
            pre: images.then(|| old.clone()),
        };
        self.write(db, name, key, None, entry(db, name, uuid, op))
    }

    fn write(
        &mut self,
        db: &str,
        name: &str,
        key: &[u8],
        doc: Option<Document>,
        entry: PendingEntry,
    ) -> CmdResult<()> {
        if self.txn.is_some() {
            let (txn, live) = self.side(db, name)?;
            let read_at = txn.read_at;
            if live.is_some_and(|c| c.written_at(key).is_some_and(|w| w > read_at)) {
                return Err(write_conflict());
            }
            txn.writes += 1;
            let n = txn.writes;
            side_of(txn, db, name)?
                .writes
                .insert(key.to_vec(), (n, doc));
            txn.entries.push(entry);
            return Ok(());
        }
        let horizon = self.horizon;
        let at = engine::ts(self.state.log.append_one(entry));
        let coll = self
            .live_mut(db, name)
            .ok_or_else(|| CmdError::bad_value("no collection"))?;
        match doc {
            Some(doc) => coll.replace(key, doc, at, horizon),
            None => {
                coll.remove(key, at, horizon);
            }
        }
        Ok(())
    }

    /// Logs a command's entry outside a transaction (index and collection changes).
    pub(crate) fn log(&mut self, entry: PendingEntry) {
        self.state.log.append_one(entry);
    }
}

fn side_of<'t>(txn: &'t mut Txn, db: &str, name: &str) -> CmdResult<&'t mut TxnColl> {
    txn.colls
        .get_mut(&(db.to_owned(), name.to_owned()))
        .ok_or_else(|| CmdError::bad_value("no collection"))
}

fn entry(db: &str, name: &str, uuid: Option<Binary>, op: Op) -> PendingEntry {
    PendingEntry {
        db: db.to_owned(),
        coll: name.to_owned(),
        uuid,
        op,
    }
}

pub(crate) fn create_entry(
    db: &str,
    name: &str,
    c: &Collection,
    description: Document,
) -> PendingEntry {
    let mut description = description;
    if !description.contains_key("viewOn") {
        description.insert(
            "idIndex",
            doc! { "v": 2, "key": { "_id": 1 }, "name": "_id_" },
        );
    }
    PendingEntry {
        db: db.to_owned(),
        coll: name.to_owned(),
        uuid: Some(c.uuid.clone()),
        op: Op::Create { description },
    }
}

pub(crate) fn validate_ns(db: &str, coll: &str) -> CmdResult<()> {
    if db.is_empty() || db.contains(['/', '\\', '.', ' ', '"', '$', '\0']) {
        return Err(CmdError::new(
            code::INVALID_NAMESPACE,
            format!("Invalid database name: '{db}'"),
        ));
    }
    if coll.is_empty() || coll.contains(['$', '\0']) {
        return Err(CmdError::new(
            code::INVALID_NAMESPACE,
            format!("Invalid collection name: '{coll}'"),
        ));
    }
    Ok(())
}
