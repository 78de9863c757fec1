//! Where a command's writes go and the oplog entries they leave: a transaction's writes
//! to its side (under the server lock), live writes straight to the collections with no
//! server lock held.
//!
//! A live write is prepared with no lock at all (its document found, the update applied,
//! its oplog entry built), then committed under the commit lock
//! ([`crate::oplog::OplogLock`]): the collection must still be in the epoch its handle was
//! taken in and the document as the write read it, else the write is prepared again (as
//! WiredTiger retries a write conflict outside a transaction). Writes to different
//! documents run in parallel up to their commit, which is a check, a cluster time, an
//! entry and a version.

use std::{collections::HashMap, ops::Bound, sync::Arc};

use bson::{Binary, Bson, Document, doc};

use super::sharding::document_key;
use crate::{
    catalog::Collection,
    engine::{self, Expect, Handle, Refused, Ts},
    error::{CmdError, CmdResult, code},
    matcher::{Filter, id_range},
    oplog::{Op, OplogLock, PendingEntry},
    state::{State, Txn, TxnColl},
    update::delta,
    value::id_key,
};

/// Takes a collection's handle under the server lock: `(db, name, create)`; see
/// [`resolve`].
pub(crate) type Resolve<'r> = dyn FnMut(&str, &str, bool) -> CmdResult<Option<Handle>> + 'r;

/// Where the writes of one command go.
pub(crate) struct Writer<'a> {
    mode: Mode<'a>,
    log: Arc<OplogLock>,
    /// Versions older than this may be dropped as records are written.
    horizon: Ts,
}

enum Mode<'a> {
    /// A transaction's writes, kept to its side until it commits (under the server lock).
    Txn {
        state: &'a mut State,
        txn: &'a mut Txn,
    },
    /// Live writes with no server lock held, through the handles of the collections
    /// they write; the server lock is taken only to create a collection or to take a
    /// handle again after a drop, rename or settings change.
    Live {
        handles: HashMap<(String, String), Handle>,
        resolve: &'a mut Resolve<'a>,
    },
}

/// Whether a live write was committed, or must be prepared again from a fresh read of
/// its document (another write changed it, or its collection changed).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// Committed (or kept on the transaction's side).
    Done,
    /// Not committed: read the document again.
    Retry,
}

/// How many times a statement prepares a live write again before it gives up with
/// `WriteConflict` (a server retries without end; this bounds a livelock).
pub(crate) const MAX_RETRIES: usize = 10_000;

/// `WriteConflict` (112) as a transaction meets it.
pub(crate) fn write_conflict() -> CmdError {
    CmdError::new(
        code::WRITE_CONFLICT,
        "Write conflict during plan execution and yielding is disabled.",
    )
    .with_label("TransientTransactionError")
}

/// `WriteConflict` (112) for a live statement that was prepared again too many times.
pub(crate) fn gave_up() -> CmdError {
    CmdError::new(
        code::WRITE_CONFLICT,
        format!("Write conflict: the statement was retried {MAX_RETRIES} times"),
    )
}

/// Makes sure `db.name` can be written outside a transaction (under the server lock):
/// `None` when it does not exist and `create` is false; its handle otherwise, created
/// (with a `create` entry) when missing. A view is refused.
pub(crate) fn resolve(
    state: &mut State,
    db: &str,
    name: &str,
    create: bool,
) -> CmdResult<Option<Handle>> {
    validate_ns(db, name)?;
    if let Some(c) = state.dbs.get(db).and_then(|d| d.get(name)) {
        refuse_view(db, name, c)?;
        return Ok(Some(c.handle()));
    }
    if !create {
        return Ok(None);
    }
    let c = Collection::new();
    let handle = c.handle();
    state
        .log
        .lock()
        .append_one(create_entry(db, name, &c, Document::new()));
    state
        .dbs
        .entry(db.to_owned())
        .or_default()
        .insert(name.to_owned(), c);
    Ok(Some(handle))
}

/// Logs `entries`, a change that ends the epoch of `colls` (a drop, a rename,
/// `collMod`, `shardCollection`), in one hold of the commit lock: writes prepared against
/// those collections before it are refused from then on. Returns the last entry's
/// cluster time.
pub(crate) fn log_epoch_end<'c>(
    log: &OplogLock,
    colls: impl IntoIterator<Item = &'c Collection>,
    entries: Vec<PendingEntry>,
) -> bson::Timestamp {
    let mut log = log.lock();
    for c in colls {
        c.retire();
    }
    log.append(entries, None);
    log.last_ts
}

fn refuse_view(db: &str, name: &str, c: &Collection) -> CmdResult<()> {
    if c.view.is_some() {
        return Err(CmdError::new(
            166,
            format!("Namespace {db}.{name} is a view, not a collection"),
        ));
    }
    Ok(())
}

impl<'a> Writer<'a> {
    /// A writer for a transaction's command.
    pub(crate) fn txn(state: &'a mut State, txn: &'a mut Txn) -> Self {
        let horizon = state.horizon();
        Self {
            log: Arc::clone(&state.log),
            mode: Mode::Txn { state, txn },
            horizon,
        }
    }

    /// A writer for a command outside a transaction, run with no server lock held:
    /// `handles` are those taken with the command, `resolve` takes more.
    pub(crate) fn live(
        log: Arc<OplogLock>,
        horizon: Ts,
        handles: HashMap<(String, String), Handle>,
        resolve: &'a mut Resolve<'a>,
    ) -> Self {
        Self {
            mode: Mode::Live { handles, resolve },
            log,
            horizon,
        }
    }

    /// Whether the writes go straight to the collections (not to a transaction's side).
    pub(crate) fn is_live(&self) -> bool {
        matches!(self.mode, Mode::Live { .. })
    }

    /// Makes sure `db.name` can be written: `Ok(false)` when it does not exist and
    /// `create` is false; created (with a `create` entry) otherwise. A view is refused.
    pub(crate) fn ensure(&mut self, db: &str, name: &str, create: bool) -> CmdResult<bool> {
        let key = (db.to_owned(), name.to_owned());
        let (state, txn) = match &mut self.mode {
            Mode::Live { handles, resolve } => {
                if handles.contains_key(&key) {
                    return Ok(true);
                }
                return Ok(match resolve(db, name, create)? {
                    Some(h) => {
                        handles.insert(key, h);
                        true
                    }
                    None => false,
                });
            }
            Mode::Txn { state, txn } => (state, txn),
        };
        validate_ns(db, name)?;
        let live = state.dbs.get(db).and_then(|d| d.get(name));
        if let Some(c) = live {
            refuse_view(db, name, c)?;
        }
        if txn.colls.contains_key(&key) {
            return Ok(true);
        }
        let side = match live {
            Some(c) => TxnColl {
                base: Some((c.uuid.clone(), state.history.view(c, txn.read_at))),
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
        Ok(true)
    }

    /// The handle of `db.name` taken again (after [`Refused::Stale`]).
    fn refresh(&mut self, db: &str, name: &str, create: bool) -> CmdResult<Option<Handle>> {
        let Mode::Live { handles, resolve } = &mut self.mode else {
            return Ok(None);
        };
        let key = (db.to_owned(), name.to_owned());
        handles.remove(&key);
        let handle = resolve(db, name, create)?;
        if let Some(h) = &handle {
            handles.insert(key, h.clone());
        }
        Ok(handle)
    }

    fn handle(&self, db: &str, name: &str) -> Option<Handle> {
        match &self.mode {
            Mode::Live { handles, .. } => handles.get(&(db.to_owned(), name.to_owned())).cloned(),
            Mode::Txn { .. } => None,
        }
    }

    /// Commits one live write under the commit lock (see [`Handle::commit`]).
    fn commit(
        &self,
        h: &Handle,
        ns: &str,
        key: &[u8],
        expect: &Expect,
        doc: Option<Arc<Document>>,
        entry: PendingEntry,
    ) -> CmdResult<Result<(), Refused>> {
        let mut log = self.log.lock();
        h.commit(ns, key, expect, doc, self.horizon, || {
            engine::ts(log.append_one(entry))
        })
    }

    /// The collection's UUID, whether it records pre- and post-images, and its shard key,
    /// as a transaction's write records them.
    fn txn_settings(
        state: &State,
        txn: &Txn,
        db: &str,
        name: &str,
    ) -> (Option<Binary>, bool, Option<Document>) {
        let key = (db.to_owned(), name.to_owned());
        let coll = txn
            .colls
            .get(&key)
            .and_then(|s| s.created.as_ref())
            .or_else(|| state.dbs.get(db).and_then(|d| d.get(name)));
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
        let txn = match &self.mode {
            Mode::Live { handles, .. } => {
                return handles.get(&key).map_or_else(Vec::new, |h| {
                    h.matching(range, &|d| filter.matches(d), first)
                });
            }
            Mode::Txn { txn, .. } => txn,
        };
        let Some(side) = txn.colls.get(&key) else {
            return Vec::new();
        };
        // One `_id`: looked up, as the live collection's index does, instead of reading
        // the whole snapshot (a transaction costs the documents it touches).
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
        if first {
            docs.take(1).collect()
        } else {
            docs.collect()
        }
    }

    /// Inserts `doc` (which has its `_id`) into a collection [`Self::ensure`]d first.
    pub(crate) fn insert(&mut self, db: &str, name: &str, doc: Document) -> CmdResult<()> {
        let ns = format!("{db}.{name}");
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        let key = id_key(&id);
        if let Mode::Txn { state, txn } = &mut self.mode {
            let (uuid, _, shard_key) = Self::txn_settings(state, txn, db, name);
            let live = state.dbs.get(db).and_then(|d| d.get(name));
            if live.is_some_and(|c| c.written_at(&key).is_some_and(|w| w > txn.read_at)) {
                return Err(write_conflict());
            }
            let op = Op::Insert {
                key: document_key(shard_key.as_ref(), &doc),
                doc: doc.clone(),
            };
            txn.writes += 1;
            let n = txn.writes;
            let side = side_of(txn, db, name)?;
            if side.get(&key, &id).is_some() {
                return Err(engine::duplicate_key(&ns, &id));
            }
            side.writes.insert(key, (n, Some(doc)));
            txn.entries.push(entry(db, name, uuid, op));
            return Ok(());
        }
        let doc = Arc::new(doc);
        let mut handle = self.handle(db, name);
        for _ in 0..MAX_RETRIES {
            let Some(h) = handle else {
                handle = self.refresh(db, name, true)?;
                continue;
            };
            let op = Op::Insert {
                key: document_key(h.shard_key.as_ref(), &doc),
                doc: (*doc).clone(),
            };
            let entry = entry(db, name, Some(h.uuid.clone()), op);
            let new = Some(Arc::clone(&doc));
            match self.commit(&h, &ns, &key, &Expect::Absent, new, entry)? {
                Ok(()) => return Ok(()),
                Err(Refused::Stale) => handle = self.refresh(db, name, true)?,
                Err(Refused::Duplicate | Refused::Changed) => {
                    return Err(engine::duplicate_key(&ns, &id));
                }
            }
        }
        Err(gave_up())
    }

    /// Replaces `old` (the document with `_id` key `key`) with `new`, logged as a
    /// replacement or as an update with what changed.
    pub(crate) fn replace(
        &mut self,
        db: &str,
        name: &str,
        (key, old): &(Vec<u8>, Arc<Document>),
        new: Document,
        replacement: bool,
    ) -> CmdResult<Written> {
        self.write(db, name, key, old, Some(new), replacement)
    }

    /// Removes `old` (the document with `_id` key `key`).
    pub(crate) fn remove(
        &mut self,
        db: &str,
        name: &str,
        (key, old): &(Vec<u8>, Arc<Document>),
    ) -> CmdResult<Written> {
        self.write(db, name, key, old, None, false)
    }

    /// Writes `new` (`None`: removes) over `old`, the document with `_id` key `key`.
    fn write(
        &mut self,
        db: &str,
        name: &str,
        key: &[u8],
        old: &Arc<Document>,
        new: Option<Document>,
        replacement: bool,
    ) -> CmdResult<Written> {
        if let Mode::Txn { state, txn } = &mut self.mode {
            let (uuid, images, shard_key) = Self::txn_settings(state, txn, db, name);
            let live = state.dbs.get(db).and_then(|d| d.get(name));
            if live.is_some_and(|c| c.written_at(key).is_some_and(|w| w > txn.read_at)) {
                return Err(write_conflict());
            }
            let op = change_op(old, new.as_ref(), replacement, images, shard_key.as_ref());
            txn.writes += 1;
            let n = txn.writes;
            side_of(txn, db, name)?
                .writes
                .insert(key.to_vec(), (n, new));
            txn.entries.push(entry(db, name, uuid, op));
            return Ok(Written::Done);
        }
        let Some(h) = self.handle(db, name) else {
            // The collection went away since the document was read.
            return Ok(Written::Retry);
        };
        let ns = format!("{db}.{name}");
        let op = change_op(
            old,
            new.as_ref(),
            replacement,
            h.images,
            h.shard_key.as_ref(),
        );
        let entry = entry(db, name, Some(h.uuid.clone()), op);
        let expect = Expect::Current(Arc::clone(old));
        match self.commit(&h, &ns, key, &expect, new.map(Arc::new), entry)? {
            Ok(()) => Ok(Written::Done),
            Err(Refused::Stale) => {
                self.refresh(db, name, false)?;
                Ok(Written::Retry)
            }
            Err(Refused::Changed | Refused::Duplicate) => Ok(Written::Retry),
        }
    }
}

/// The oplog entry's operation for writing `new` over `old` (`None`: removing it), as
/// a collection with these settings records it: its `o2` is the document key of the
/// document before the write (the shard key it had, when an update changes it).
fn change_op(
    old: &Document,
    new: Option<&Document>,
    replacement: bool,
    images: bool,
    shard_key: Option<&Document>,
) -> Op {
    let key = document_key(shard_key, old);
    let pre = images.then(|| old.clone());
    match new {
        None => Op::Delete { key, pre },
        Some(new) if replacement => Op::Replace {
            key,
            doc: new.clone(),
            pre,
        },
        Some(new) => Op::Update {
            key,
            delta: delta(old, new),
            pre,
            post: images.then(|| new.clone()),
        },
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
