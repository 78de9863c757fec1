//! The catalog: databases, their collections (and views) and the documents in them.

use std::collections::{BTreeMap, HashMap};

use bson::{Binary, Bson, Document, oid::ObjectId, spec::BinarySubtype};

use crate::{
    error::{CmdError, CmdResult, code},
    value::id_key,
};

/// Databases by name, each with its collections by name.
pub(crate) type Catalog = BTreeMap<String, BTreeMap<String, Collection>>;

/// The current document with this `_id` in `db.coll`, if any.
pub(crate) fn lookup<'a>(
    dbs: &'a Catalog,
    db: &str,
    coll: &str,
    id: &Bson,
) -> Option<&'a Document> {
    dbs.get(db)
        .and_then(|d| d.get(coll))
        .and_then(|c| c.by_id(id))
}

/// One collection (or view).
#[derive(Clone, Debug)]
pub(crate) struct Collection {
    /// The collection's UUID (`collectionUUID` in expanded events).
    pub(crate) uuid: Binary,
    /// Documents by record id, in insertion (natural) order.
    pub(crate) docs: BTreeMap<u64, Document>,
    /// `_id` key → record id; the unique `_id` index.
    pub(crate) ids: HashMap<Vec<u8>, u64>,
    /// The same index in `_id` order (MongoDB's comparison order), for range scans.
    pub(crate) order: BTreeMap<IdOrd, u64>,
    next_rid: u64,
    /// Secondary index specifications (recorded, not used for queries).
    pub(crate) indexes: Vec<Document>,
    /// Whether `changeStreamPreAndPostImages` is enabled.
    pub(crate) images: bool,
    /// For a view: the source collection and pipeline.
    pub(crate) view: Option<(String, Vec<Bson>)>,
    /// Bumped by every write, so transactions can detect conflicts.
    pub(crate) version: u64,
    /// `_id` key → the `version` at which that document was last written (inserted,
    /// replaced or removed; removed ones stay): a transaction conflicts only with writes
    /// to the documents it wrote itself.
    pub(crate) written: HashMap<Vec<u8>, u64>,
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
            order: BTreeMap::new(),
            next_rid: 1,
            indexes: Vec::new(),
            images: false,
            view: None,
            version: 0,
            written: HashMap::new(),
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
        self.ids.insert(key.clone(), rid);
        self.order.insert(IdOrd(id), rid);
        self.docs.insert(rid, doc);
        self.version += 1;
        self.written.insert(key, self.version);
        Ok(())
    }

    /// Replaces the document at `rid`.
    pub(crate) fn replace(&mut self, rid: u64, doc: Document) {
        let key = doc.get("_id").map(id_key);
        self.docs.insert(rid, doc);
        self.version += 1;
        if let Some(key) = key {
            self.written.insert(key, self.version);
        }
    }

    /// Removes the document at `rid`.
    pub(crate) fn remove(&mut self, rid: u64) -> Option<Document> {
        let doc = self.docs.remove(&rid)?;
        self.version += 1;
        if let Some(id) = doc.get("_id") {
            let key = id_key(id);
            self.ids.remove(&key);
            self.order.remove(&IdOrd(id.clone()));
            self.written.insert(key, self.version);
        }
        Some(doc)
    }

    /// Writes `doc` as the document with its `_id` (a replacement, or an insert), as a
    /// committed transaction installs what it wrote.
    pub(crate) fn put(&mut self, ns: &str, doc: Document) -> CmdResult<()> {
        let key = doc.get("_id").map(id_key).unwrap_or_default();
        match self.ids.get(&key).copied() {
            Some(rid) => {
                self.replace(rid, doc);
                Ok(())
            }
            None => self.insert(ns, doc),
        }
    }

    /// Removes the document whose `_id` key is `key`, if there is one.
    pub(crate) fn remove_key(&mut self, key: &[u8]) {
        if let Some(rid) = self.ids.get(key).copied() {
            self.remove(rid);
        }
    }

    /// The document with this `_id`.
    pub(crate) fn by_id(&self, id: &Bson) -> Option<&Document> {
        self.ids.get(&id_key(id)).and_then(|rid| self.docs.get(rid))
    }
}

/// An `_id` ordered as MongoDB compares values (`1` and `1.0` are one key, as in the
/// unique index).
#[derive(Clone, Debug)]
pub(crate) struct IdOrd(pub(crate) Bson);

impl PartialEq for IdOrd {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for IdOrd {}

impl PartialOrd for IdOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for IdOrd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Values MongoDB's order calls equal but the unique index tells apart (two
        // `DBPointer`s, say) are ordered by their index keys: a total order.
        crate::value::compare(&self.0, &other.0)
            .then_with(|| id_key(&self.0).cmp(&id_key(&other.0)))
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

/// Whether a database is internal (never shown to database or cluster streams).
pub(crate) fn is_internal_db(db: &str) -> bool {
    matches!(db, "admin" | "config" | "local")
}
