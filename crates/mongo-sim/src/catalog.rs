//! The catalog: databases, their collections (and views) and the documents in them.

use std::{collections::BTreeMap, sync::Arc};

use bson::{Bson, Document};

pub(crate) use crate::engine::Collection;
use crate::value::id_key;

/// Databases by name, each with its collections by name.
pub(crate) type Catalog = BTreeMap<String, BTreeMap<String, Collection>>;

/// The current document with this `_id` in `db.coll`, if any.
pub(crate) fn lookup(dbs: &Catalog, db: &str, coll: &str, id: &Bson) -> Option<Arc<Document>> {
    dbs.get(db)
        .and_then(|d| d.get(coll))
        .and_then(|c| c.get(&id_key(id)))
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

/// Whether a database is internal (never shown to database or cluster streams).
pub(crate) fn is_internal_db(db: &str) -> bool {
    matches!(db, "admin" | "config" | "local")
}
