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
    sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard},
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

/// A collection's records: their versions by record id (natural order) and the `_id`
/// index over every record that still has a version.
#[derive(Debug, Default)]
pub(crate) struct Rows {
    chains: BTreeMap<u64, Chain>,
    order: BTreeSet<(IdOrd, u64)>,
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
    /// The records, shared with views.
    rows: Arc<RwLock<Rows>>,
    /// `_id` key → record id of the live documents; the unique `_id` index.
    ids: HashMap<Vec<u8>, u64>,
    next_rid: u64,
    /// Secondary index specifications (recorded, not used for queries).
    pub(crate) indexes: Vec<Document>,
    /// Whether `changeStreamPreAndPostImages` is enabled.
    pub(crate) images: bool,
    /// For a view: the source collection and pipeline.
    pub(crate) view: Option<(String, Vec<Bson>)>,
    /// For a sharded collection (the sharded front): its shard key pattern.
    pub(crate) shard_key: Option<Document>,
    /// `_id` key → when that document was last written (inserted, replaced or removed;
    /// removed ones stay): transactions conflict with writes to documents they wrote.
    written: HashMap<Vec<u8>, Ts>,
    /// Removed records, oldest first, dropped once the horizon passes them.
    tombstones: VecDeque<(Ts, u64, IdOrd)>,
    /// Live documents and their BSON bytes.
    count: usize,
    bytes: usize,
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
            ids: HashMap::new(),
            next_rid: 1,
            indexes: Vec::new(),
            images: false,
            view: None,
            shard_key: None,
            written: HashMap::new(),
            tombstones: VecDeque::new(),
            count: 0,
            bytes: 0,
        }
    }

    fn rows_mut(&self) -> std::sync::RwLockWriteGuard<'_, Rows> {
        self.rows.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn rows(&self) -> RwLockReadGuard<'_, Rows> {
        self.rows.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Live documents.
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// The live documents' BSON bytes.
    pub(crate) fn data_size(&self) -> usize {
        self.bytes
    }

    /// When the document with `_id` key `key` was last written.
    pub(crate) fn written_at(&self, key: &[u8]) -> Option<Ts> {
        self.written.get(key).copied()
    }

    /// Whether a live document has this `_id` key.
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        self.ids.contains_key(key)
    }

    /// The live document with this `_id` key.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Arc<Document>> {
        let rid = self.ids.get(key)?;
        let rows = self.rows();
        rows.chains
            .get(rid)
            .and_then(|c| c.last())
            .and_then(|v| v.doc.clone())
    }

    /// Inserts a document that has an `_id`, written at `at`; a duplicate `_id` is
    /// error 11000.
    pub(crate) fn insert(&mut self, ns: &str, doc: Document, at: Ts, horizon: Ts) -> CmdResult<()> {
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        let key = id_key(&id);
        if self.ids.contains_key(&key) {
            return Err(duplicate_key(ns, &id));
        }
        let rid = self.next_rid;
        self.next_rid += 1;
        self.count += 1;
        self.bytes += bson_len(&doc);
        self.ids.insert(key.clone(), rid);
        self.written.insert(key, at);
        {
            let mut rows = self.rows_mut();
            rows.order.insert((IdOrd(id), rid));
            rows.chains.insert(
                rid,
                vec![Version {
                    ts: at,
                    doc: Some(Arc::new(doc)),
                }],
            );
        }
        self.sweep(horizon);
        Ok(())
    }

    /// Replaces the live document with `_id` key `key` (its `_id` stays), written at `at`.
    pub(crate) fn replace(&mut self, key: &[u8], doc: Document, at: Ts, horizon: Ts) {
        let Some(rid) = self.ids.get(key).copied() else {
            return;
        };
        let new_len = bson_len(&doc);
        self.written.insert(key.to_vec(), at);
        let old_len = self.push(rid, at, Some(Arc::new(doc)), horizon);
        self.bytes = self.bytes.saturating_sub(old_len) + new_len;
        self.sweep(horizon);
    }

    /// Removes the live document with `_id` key `key`, written at `at`. With no such
    /// document the key still counts as written at `at` (a transaction that inserted and
    /// deleted it commits a write to it, which later snapshots conflict with).
    pub(crate) fn remove(&mut self, key: &[u8], at: Ts, horizon: Ts) -> Option<Arc<Document>> {
        self.written.insert(key.to_vec(), at);
        let rid = self.ids.remove(key)?;
        let old = {
            let rows = self.rows();
            rows.chains
                .get(&rid)
                .and_then(|c| c.last())
                .and_then(|v| v.doc.clone())
        };
        let old_len = self.push(rid, at, None, horizon);
        self.count = self.count.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(old_len);
        if let Some(id) = old.as_ref().and_then(|d| d.get("_id")) {
            self.tombstones.push_back((at, rid, IdOrd(id.clone())));
        }
        self.sweep(horizon);
        old
    }

    /// Writes `doc` as the document with its `_id` (a replacement, or an insert).
    pub(crate) fn put(&mut self, ns: &str, doc: Document, at: Ts, horizon: Ts) -> CmdResult<()> {
        let key = doc.get("_id").map(id_key).unwrap_or_default();
        if self.ids.contains_key(&key) {
            self.replace(&key, doc, at, horizon);
            Ok(())
        } else {
            self.insert(ns, doc, at, horizon)
        }
    }

    /// Adds a version to `rid`, dropping those the horizon has passed; returns the BSON
    /// size of the version it follows.
    fn push(&mut self, rid: u64, at: Ts, doc: Option<Arc<Document>>, horizon: Ts) -> usize {
        let mut rows = self.rows_mut();
        let Some(chain) = rows.chains.get_mut(&rid) else {
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
            let mut rows = self.rows_mut();
            rows.chains.remove(&rid);
            rows.order.remove(&(id, rid));
        }
    }

    /// `(key, document)` of the live documents in the `_id` range (all without one) that
    /// `keep` accepts, in natural order; `first` stops at the first.
    pub(crate) fn matching(
        &self,
        range: Option<(Bound<IdOrd>, Bound<IdOrd>)>,
        keep: &dyn Fn(&Document) -> bool,
        first: bool,
    ) -> Vec<(Vec<u8>, Arc<Document>)> {
        let rows = self.rows();
        let mut out: Vec<(u64, Arc<Document>)> = Vec::new();
        let current = |rid: &u64| {
            rows.chains
                .get(rid)
                .and_then(|c| c.last())
                .and_then(|v| v.doc.clone())
        };
        match range {
            Some((low, high)) => {
                let (low, high) = index_bounds(&low, &high);
                if !bounds_ordered(&low, &high) {
                    return Vec::new();
                }
                for (_, rid) in rows.order.range((low, high)) {
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
                for rid in rows.chains.keys() {
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
        self.rows.read().unwrap_or_else(PoisonError::into_inner)
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
