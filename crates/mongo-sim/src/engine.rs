//! The storage engine: documents kept as versions stamped with the cluster time that wrote
//! them, views that read one moment of a collection without holding writers up, and the
//! history window that decides how far back a view may read.
//!
//! - A collection's rows live behind their own lock ([`Rows`]), shared by the collection
//!   and every [`View`] of it. A write adds a version under that lock for as long as it
//!   takes to push it; a reader takes the lock for one bounded chunk of a scan at a time
//!   (cloning `Arc`s of the visible documents), then filters, projects and encodes with no
//!   lock held.
//! - A view reads at one cluster time: of each record, the newest version at or before it.
//!   Writes after that time are invisible to it however long the read takes.
//! - Versions older than the history window are dropped as records are written, unless a
//!   view still reads at a time before them ([`Pins`]): the oldest pinned time holds the
//!   horizon back, so a long cursor is never cut off.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    ops::Bound,
    sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use bson::{Binary, Bson, Document, Timestamp, oid::ObjectId, spec::BinarySubtype};

use crate::{
    catalog::IdOrd,
    error::{CmdError, CmdResult, code},
    value::id_key,
};

/// A cluster time as one ordered number (`time << 32 | increment`).
pub(crate) type Ts = u64;

/// A cluster time's [`Ts`].
pub(crate) fn ts(t: Timestamp) -> Ts {
    (u64::from(t.time) << 32) | u64::from(t.increment)
}

/// How many records a reader examines per hold of a collection's lock.
const CHUNK: usize = 256;

/// One version of a record: what it held from `ts` on (`None`: deleted).
#[derive(Debug, Clone)]
struct Version {
    ts: Ts,
    doc: Option<Arc<Document>>,
}

/// The versions of one record, oldest first.
type Chain = Vec<Version>;

fn visible(chain: &Chain, at: Ts) -> Option<&Arc<Document>> {
    chain
        .iter()
        .rev()
        .find(|v| v.ts <= at)
        .and_then(|v| v.doc.as_ref())
}

/// A collection's records: their versions by record id (natural order), the `_id` index
/// over every record that still has a version, and what writes check.
///
/// Versions are pushed only by a holder of the commit lock ([`crate::oplog::OplogLock`]),
/// which hands out their cluster times: a write's checks (duplicate key, the version it
/// was computed from, a transaction's conflicts) and its version are one step, and every
/// version at or before the newest cluster time is in place when a view is taken.
#[derive(Debug, Default)]
pub(crate) struct Rows {
    chains: BTreeMap<u64, Chain>,
    order: BTreeSet<(IdOrd, u64)>,
    /// `_id` key → record id of the live documents; the unique `_id` index.
    ids: HashMap<Vec<u8>, u64>,
    /// The last record id handed out (the first is 1).
    last_rid: u64,
    /// `_id` key → when that document was last written (inserted, replaced or removed;
    /// removed ones stay): transactions conflict with writes to documents they wrote.
    written: HashMap<Vec<u8>, Ts>,
    /// Removed records, oldest first, dropped once the horizon passes them.
    tombstones: VecDeque<(Ts, u64, IdOrd)>,
    /// Live documents and their BSON bytes.
    count: usize,
    bytes: usize,
    /// Bumped when the collection is dropped, renamed or its write settings change: a
    /// write prepared against an earlier epoch is refused and prepared again.
    epoch: u64,
}

/// The times views read at, so the versions they need outlive the history window.
#[derive(Debug, Default, Clone)]
pub(crate) struct Pins(Arc<Mutex<BTreeMap<Ts, usize>>>);

impl Pins {
    /// Pins `at` while the returned guard lives.
    pub(crate) fn pin(&self, at: Ts) -> Pin {
        *self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(at)
            .or_default() += 1;
        Pin {
            pins: self.clone(),
            at,
        }
    }

    /// The oldest time a view reads at.
    pub(crate) fn oldest(&self) -> Option<Ts> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .next()
            .copied()
    }
}

/// Holds a time pinned while it lives.
#[derive(Debug)]
pub(crate) struct Pin {
    pins: Pins,
    at: Ts,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = self.pins.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = pins.get_mut(&self.at) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.at);
            }
        }
    }
}

/// How far back reads may go: the history window and the horizon it gives.
#[derive(Debug)]
pub(crate) struct History {
    /// `minSnapshotHistoryWindowInSeconds`.
    pub(crate) window_secs: u32,
    /// Versions older than this may be gone: a snapshot read before it is SnapshotTooOld.
    pub(crate) horizon: Ts,
    /// Times views read at.
    pub(crate) pins: Pins,
}

impl History {
    /// A window of `window_secs` starting now (`start`: the server's first cluster time).
    pub(crate) fn new(window_secs: u32, start: Ts) -> Self {
        Self {
            window_secs,
            horizon: start,
            pins: Pins::default(),
        }
    }

    /// Moves the horizon to `now` less the window, but not past the oldest pinned view,
    /// and returns it. It never moves back.
    pub(crate) fn advance(&mut self, now: Timestamp) -> Ts {
        let window_start = ts(Timestamp {
            time: now.time.saturating_sub(self.window_secs),
            increment: 0,
        });
        let target = match self.pins.oldest() {
            Some(pinned) => window_start.min(pinned),
            None => window_start,
        };
        self.horizon = self.horizon.max(target);
        self.horizon
    }

    /// A view of `coll` at `at`, pinned.
    pub(crate) fn view(&self, coll: &Collection, at: Ts) -> View {
        View {
            rows: Arc::clone(&coll.rows),
            at,
            _pin: Arc::new(self.pins.pin(at)),
        }
    }
}

/// One collection (or view definition).
#[derive(Debug)]
pub(crate) struct Collection {
    /// The collection's UUID (`collectionUUID` in expanded events).
    pub(crate) uuid: Binary,
    /// The records, shared with views and write handles.
    rows: Arc<RwLock<Rows>>,
    /// Secondary index specifications (recorded, not used for queries).
    pub(crate) indexes: Vec<Document>,
    /// Whether `changeStreamPreAndPostImages` is enabled.
    pub(crate) images: bool,
    /// For a view: the source collection and pipeline.
    pub(crate) view: Option<(String, Vec<Bson>)>,
    /// For a sharded collection (the sharded front): its shard key pattern.
    pub(crate) shard_key: Option<Document>,
}

fn bson_len(d: &Document) -> usize {
    d.to_vec().map_or(0, |v| v.len())
}

impl Collection {
    /// A new, empty collection.
    pub(crate) fn new() -> Self {
        Self {
            uuid: Binary {
                subtype: BinarySubtype::Uuid,
                bytes: random_uuid(),
            },
            rows: Arc::default(),
            indexes: Vec::new(),
            images: false,
            view: None,
            shard_key: None,
        }
    }

    fn rows_mut(&self) -> RwLockWriteGuard<'_, Rows> {
        write_lock(&self.rows)
    }

    fn rows(&self) -> RwLockReadGuard<'_, Rows> {
        read_lock(&self.rows)
    }

    /// Live documents.
    pub(crate) fn len(&self) -> usize {
        self.rows().count
    }

    /// The live documents' BSON bytes.
    pub(crate) fn data_size(&self) -> usize {
        self.rows().bytes
    }

    /// When the document with `_id` key `key` was last written.
    pub(crate) fn written_at(&self, key: &[u8]) -> Option<Ts> {
        self.rows().written.get(key).copied()
    }

    /// The live document with this `_id` key.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Arc<Document>> {
        self.rows().current(key)
    }

    /// Writes the document with `_id` key `key` at `at` (see [`Rows::write`]). The
    /// caller holds the commit lock.
    pub(crate) fn write(
        &self,
        ns: &str,
        key: &[u8],
        doc: Option<Arc<Document>>,
        at: Ts,
        horizon: Ts,
    ) -> CmdResult<()> {
        self.rows_mut().write(ns, key, doc, at, horizon)
    }

    /// Ends the collection's epoch (it is dropped, renamed, or the settings its writes
    /// record changed): writes prepared against it are prepared again. The caller holds
    /// the commit lock.
    pub(crate) fn retire(&self) {
        self.rows_mut().epoch += 1;
    }

    /// What a write needs of the collection to be prepared with no server lock held.
    pub(crate) fn handle(&self) -> Handle {
        Handle {
            rows: Arc::clone(&self.rows),
            epoch: self.rows().epoch,
            uuid: self.uuid.clone(),
            images: self.images,
            shard_key: self.shard_key.clone(),
        }
    }
}

fn read_lock(rows: &RwLock<Rows>) -> RwLockReadGuard<'_, Rows> {
    rows.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock(rows: &RwLock<Rows>) -> RwLockWriteGuard<'_, Rows> {
    rows.write().unwrap_or_else(PoisonError::into_inner)
}

/// A collection as a write sees it while it is prepared with no server lock held: its
/// records, the epoch it was resolved in, and the settings its oplog entries record.
#[derive(Debug, Clone)]
pub(crate) struct Handle {
    rows: Arc<RwLock<Rows>>,
    epoch: u64,
    /// The collection's UUID.
    pub(crate) uuid: Binary,
    /// Whether it records pre- and post-images.
    pub(crate) images: bool,
    /// Its shard key (the sharded front).
    pub(crate) shard_key: Option<Document>,
}

/// What a prepared write expects of its document when it commits.
#[derive(Debug)]
pub(crate) enum Expect {
    /// No live document has its `_id` (an insert).
    Absent,
    /// The live document is still this version (an update or delete computed from it).
    Current(Arc<Document>),
}

/// Why a prepared write was not committed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The collection was dropped, renamed or changed since the handle was taken.
    Stale,
    /// Another write changed or removed the document since it was read.
    Changed,
    /// An insert met a live document with its `_id`.
    Duplicate,
}

impl Handle {
    /// `(key, document)` of the live documents in the `_id` range (all without one) that
    /// `keep` accepts, in natural order; `first` stops at the first.
    pub(crate) fn matching(
        &self,
        range: Option<(Bound<IdOrd>, Bound<IdOrd>)>,
        keep: &dyn Fn(&Document) -> bool,
        first: bool,
    ) -> Vec<(Vec<u8>, Arc<Document>)> {
        read_lock(&self.rows).matching(range, keep, first)
    }

    /// Commits one write to the document with `_id` key `key` (`doc`: its new content;
    /// `None`: removed) if the collection is still in the handle's epoch and the document
    /// is as `expect` says: then `stamp` hands out its cluster time (appending its oplog
    /// entry) and the version goes in, all in one hold of the collection's lock. The
    /// caller holds the commit lock.
    pub(crate) fn commit(
        &self,
        ns: &str,
        key: &[u8],
        expect: &Expect,
        doc: Option<Arc<Document>>,
        horizon: Ts,
        stamp: impl FnOnce() -> Ts,
    ) -> CmdResult<Result<(), Refused>> {
        let mut rows = write_lock(&self.rows);
        if rows.epoch != self.epoch {
            return Ok(Err(Refused::Stale));
        }
        match (expect, rows.current(key)) {
            (Expect::Absent, None) => {}
            (Expect::Absent, Some(_)) => return Ok(Err(Refused::Duplicate)),
            (Expect::Current(seen), Some(now)) if Arc::ptr_eq(seen, &now) => {}
            (Expect::Current(_), _) => return Ok(Err(Refused::Changed)),
        }
        let at = stamp();
        rows.write(ns, key, doc, at, horizon).map(Ok)
    }
}

impl Rows {
    /// The newest version of record `rid`, if it is not a removal.
    fn latest(&self, rid: u64) -> Option<Arc<Document>> {
        self.chains
            .get(&rid)
            .and_then(|c| c.last())
            .and_then(|v| v.doc.clone())
    }

    /// The live document with this `_id` key.
    fn current(&self, key: &[u8]) -> Option<Arc<Document>> {
        self.latest(*self.ids.get(key)?)
    }

    /// Writes the document with `_id` key `key` at `at`: `doc` replaces the live one or
    /// is inserted; `None` removes it.
    fn write(
        &mut self,
        ns: &str,
        key: &[u8],
        doc: Option<Arc<Document>>,
        at: Ts,
        horizon: Ts,
    ) -> CmdResult<()> {
        match doc {
            Some(doc) if self.ids.contains_key(key) => self.replace(key, doc, at, horizon),
            Some(doc) => return self.insert(ns, doc, at, horizon),
            None => self.remove(key, at, horizon),
        }
        Ok(())
    }

    /// Inserts a document that has an `_id`, written at `at`; a duplicate `_id` is
    /// error 11000.
    fn insert(&mut self, ns: &str, doc: Arc<Document>, at: Ts, horizon: Ts) -> CmdResult<()> {
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        let key = id_key(&id);
        if self.ids.contains_key(&key) {
            return Err(duplicate_key(ns, &id));
        }
        self.last_rid += 1;
        let rid = self.last_rid;
        self.count += 1;
        self.bytes += bson_len(&doc);
        self.ids.insert(key.clone(), rid);
        self.written.insert(key, at);
        self.order.insert((IdOrd(id), rid));
        self.chains.insert(
            rid,
            vec![Version {
                ts: at,
                doc: Some(doc),
            }],
        );
        self.sweep(horizon);
        Ok(())
    }

    /// Replaces the live document with `_id` key `key` (its `_id` stays), written at `at`.
    fn replace(&mut self, key: &[u8], doc: Arc<Document>, at: Ts, horizon: Ts) {
        let Some(rid) = self.ids.get(key).copied() else {
            return;
        };
        let new_len = bson_len(&doc);
        self.written.insert(key.to_vec(), at);
        let old_len = self.push(rid, at, Some(doc), horizon);
        self.bytes = self.bytes.saturating_sub(old_len) + new_len;
        self.sweep(horizon);
    }

    /// Removes the live document with `_id` key `key`, written at `at`. With no such
    /// document the key still counts as written at `at` (a transaction that inserted and
    /// deleted it commits a write to it, which later snapshots conflict with).
    fn remove(&mut self, key: &[u8], at: Ts, horizon: Ts) {
        self.written.insert(key.to_vec(), at);
        let Some(rid) = self.ids.remove(key) else {
            return;
        };
        let old = self.latest(rid);
        let old_len = self.push(rid, at, None, horizon);
        self.count = self.count.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(old_len);
        if let Some(id) = old.as_ref().and_then(|d| d.get("_id")) {
            self.tombstones.push_back((at, rid, IdOrd(id.clone())));
        }
        self.sweep(horizon);
    }

    /// Adds a version to `rid`, dropping those the horizon has passed; returns the BSON
    /// size of the version it follows.
    fn push(&mut self, rid: u64, at: Ts, doc: Option<Arc<Document>>, horizon: Ts) -> usize {
        let Some(chain) = self.chains.get_mut(&rid) else {
            return 0;
        };
        let old_len = chain
            .last()
            .and_then(|v| v.doc.as_deref())
            .map_or(0, bson_len);
        chain.push(Version { ts: at, doc });
        // A version is needed while some read at or after the horizon can see it: the
        // newest one at or before the horizon and every later one.
        let keep_from = chain.iter().rposition(|v| v.ts <= horizon).unwrap_or(0);
        if keep_from > 0 {
            chain.drain(..keep_from);
        }
        old_len
    }

    /// Forgets removed records the horizon has passed.
    fn sweep(&mut self, horizon: Ts) {
        while self
            .tombstones
            .front()
            .is_some_and(|(at, ..)| *at <= horizon)
        {
            let Some((_, rid, id)) = self.tombstones.pop_front() else {
                break;
            };
            self.chains.remove(&rid);
            self.order.remove(&(id, rid));
        }
    }

    fn matching(
        &self,
        range: Option<(Bound<IdOrd>, Bound<IdOrd>)>,
        keep: &dyn Fn(&Document) -> bool,
        first: bool,
    ) -> Vec<(Vec<u8>, Arc<Document>)> {
        let mut out: Vec<(u64, Arc<Document>)> = Vec::new();
        let current = |rid: &u64| self.latest(*rid);
        match range {
            Some((low, high)) => {
                let (low, high) = index_bounds(&low, &high);
                if !bounds_ordered(&low, &high) {
                    return Vec::new();
                }
                for (_, rid) in self.order.range((low, high)) {
                    if let Some(doc) = current(rid).filter(|d| keep(d)) {
                        out.push((*rid, doc));
                    }
                }
                out.sort_by_key(|(rid, _)| *rid);
                if first {
                    out.truncate(1);
                }
            }
            None => {
                for rid in self.chains.keys() {
                    if let Some(doc) = current(rid).filter(|d| keep(d)) {
                        out.push((*rid, doc));
                        if first {
                            break;
                        }
                    }
                }
            }
        }
        out.into_iter()
            .map(|(_, d)| (d.get("_id").map(id_key).unwrap_or_default(), d))
            .collect()
    }
}

impl Default for Collection {
    fn default() -> Self {
        Self::new()
    }
}

/// The duplicate-key error for `_id` `id` in `ns`.
pub(crate) fn duplicate_key(ns: &str, id: &Bson) -> CmdError {
    CmdError::new(
        code::DUPLICATE_KEY,
        format!("E11000 duplicate key error collection: {ns} index: _id_ dup key: {{ _id: {id} }}"),
    )
}

fn random_uuid() -> Vec<u8> {
    // Two ObjectIds give 16 bytes that differ between collections and runs.
    let mut bytes = ObjectId::new().bytes().to_vec();
    bytes.extend_from_slice(&ObjectId::new().bytes()[..4]);
    bytes[6] = (bytes[6] & 0x0F) | 0x40;
    bytes[8] = (bytes[8] & 0x3F) | 0x80;
    bytes
}

/// Where a scan over a view is.
#[derive(Debug, Clone)]
pub(crate) enum Position {
    /// In natural order, after this record id (`0`: from the start).
    Natural(u64),
    /// In `_id` order within a range.
    Ids(Box<IdScan>),
}

/// A scan of the `_id` index.
#[derive(Debug, Clone)]
pub(crate) struct IdScan {
    /// The range.
    low: Bound<IdOrd>,
    /// The range.
    high: Bound<IdOrd>,
    /// Ascending or descending.
    ascending: bool,
    /// The last entry read (`None`: from the range's start).
    after: Option<(IdOrd, u64)>,
}

impl Position {
    /// A scan of `_id`s in `(low, high)`.
    pub(crate) fn ids(low: Bound<IdOrd>, high: Bound<IdOrd>, ascending: bool) -> Self {
        Self::Ids(Box::new(IdScan {
            low,
            high,
            ascending,
            after: None,
        }))
    }
}

/// One moment of a collection, readable with no server lock held.
#[derive(Debug, Clone)]
pub(crate) struct View {
    rows: Arc<RwLock<Rows>>,
    /// The time it reads at.
    pub(crate) at: Ts,
    _pin: Arc<Pin>,
}

impl View {
    fn rows(&self) -> RwLockReadGuard<'_, Rows> {
        read_lock(&self.rows)
    }

    /// The documents visible at the view's time among the next [`CHUNK`] records from
    /// `pos` on (one hold of the collection's lock); moves `pos`. `None` when the scan is
    /// over.
    pub(crate) fn next_chunk(&self, pos: &mut Position) -> Option<Vec<Arc<Document>>> {
        let rows = self.rows();
        let mut out = Vec::new();
        match pos {
            Position::Natural(after) => {
                let mut examined = 0;
                let mut last = None;
                for (rid, chain) in rows
                    .chains
                    .range((Bound::Excluded(*after), Bound::Unbounded))
                {
                    last = Some(*rid);
                    if let Some(d) = visible(chain, self.at) {
                        out.push(Arc::clone(d));
                    }
                    examined += 1;
                    if examined == CHUNK {
                        break;
                    }
                }
                let last = last?;
                *after = last;
            }
            Position::Ids(scan) => {
                let IdScan {
                    low,
                    high,
                    ascending,
                    after,
                } = &mut **scan;
                let (lo, hi) = index_bounds(low, high);
                let (lo, hi) = match (after.clone(), *ascending) {
                    (None, _) => (lo, hi),
                    (Some(a), true) => (Bound::Excluded(a), hi),
                    (Some(a), false) => (lo, Bound::Excluded(a)),
                };
                if !bounds_ordered(&lo, &hi) {
                    return None;
                }
                let range = rows.order.range((lo, hi));
                let entries: Box<dyn Iterator<Item = &(IdOrd, u64)>> = if *ascending {
                    Box::new(range)
                } else {
                    Box::new(range.rev())
                };
                let mut last = None;
                for entry in entries.take(CHUNK) {
                    last = Some(entry);
                    if let Some(d) = rows.chains.get(&entry.1).and_then(|c| visible(c, self.at)) {
                        out.push(Arc::clone(d));
                    }
                }
                *after = Some(last?.clone());
            }
        }
        Some(out)
    }

    /// Every document visible at the view's time, in natural order (read chunk by chunk).
    pub(crate) fn all(&self) -> Vec<Arc<Document>> {
        let mut pos = Position::Natural(0);
        let mut out = Vec::new();
        while let Some(chunk) = self.next_chunk(&mut pos) {
            out.extend(chunk);
        }
        out
    }

    /// The document with `_id` `id` at the view's time.
    pub(crate) fn get(&self, id: &Bson) -> Option<Arc<Document>> {
        let rows = self.rows();
        let low = Bound::Included((IdOrd(id.clone()), 0));
        let high = Bound::Included((IdOrd(id.clone()), u64::MAX));
        rows.order
            .range((low, high))
            .filter_map(|(_, rid)| rows.chains.get(rid))
            .find_map(|c| visible(c, self.at).cloned())
    }

    /// Walks the `_id`s in `(low, high)` visible at the view's time, in order, straight
    /// off the index (no document is touched), [`CHUNK`] entries per hold of the lock;
    /// `each` says whether to go on.
    pub(crate) fn walk_ids(
        &self,
        low: &Bound<IdOrd>,
        high: &Bound<IdOrd>,
        mut each: impl FnMut(&Bson) -> bool,
    ) {
        let (lo, hi) = index_bounds(low, high);
        let mut after: Option<(IdOrd, u64)> = None;
        loop {
            let rows = self.rows();
            let lo = match after.take() {
                Some(a) => Bound::Excluded(a),
                None => lo.clone(),
            };
            if !bounds_ordered(&lo, &hi) {
                return;
            }
            let mut last = None;
            for entry in rows.order.range((lo, hi.clone())).take(CHUNK) {
                last = Some(entry);
                let visible = rows
                    .chains
                    .get(&entry.1)
                    .is_some_and(|c| visible(c, self.at).is_some());
                if visible && !each(&entry.0.0) {
                    return;
                }
            }
            match last {
                Some(entry) => after = Some(entry.clone()),
                None => return,
            }
        }
    }
}

/// A range of the `_id` index (entries are `(_id, record id)`).
type IndexRange = (Bound<(IdOrd, u64)>, Bound<(IdOrd, u64)>);

fn index_bounds(low: &Bound<IdOrd>, high: &Bound<IdOrd>) -> IndexRange {
    let lo = match low {
        Bound::Included(l) => Bound::Included((l.clone(), 0)),
        Bound::Excluded(l) => Bound::Excluded((l.clone(), u64::MAX)),
        Bound::Unbounded => Bound::Unbounded,
    };
    let hi = match high {
        Bound::Included(h) => Bound::Included((h.clone(), u64::MAX)),
        Bound::Excluded(h) => Bound::Excluded((h.clone(), 0)),
        Bound::Unbounded => Bound::Unbounded,
    };
    (lo, hi)
}

/// Whether `BTreeSet::range` accepts these bounds (it panics on an inverted range).
fn bounds_ordered<T: Ord>(lo: &Bound<T>, hi: &Bound<T>) -> bool {
    match (lo, hi) {
        (Bound::Included(l), Bound::Included(h)) => l <= h,
        (Bound::Included(l) | Bound::Excluded(l), Bound::Included(h) | Bound::Excluded(h)) => l < h,
        _ => true,
    }
}
