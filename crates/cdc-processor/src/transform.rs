//! Field-level privacy and shaping, applied to every event before any handler sees it
//! ([`crate::Builder::transform`]): fields dropped or replaced by a keyed hash, and
//! namespaces kept or left out.
//!
//! A field is named by a dotted path (`ssn`, `card.number`); a path through an array
//! applies to every element (`items.card.number` reaches the number of each item's card),
//! and a numeric part names one element (`items.0.ssn`). The same fields are shaped
//! wherever an event carries document data: `fullDocument`, `fullDocumentBeforeChange`,
//! `documentKey`, and `updateDescription.updatedFields`, whose keys are dotted paths
//! themselves (`card.number`, `items.3.card`, `card`): an update of a shaped field, of a
//! part of one, or of a document holding one, is shaped the same way. Field names in
//! `removedFields` and `truncatedArrays` carry no values and are kept.
//!
//! A hashed value is replaced by the string of 64 lowercase hex digits of HMAC-SHA-256
//! under the key: over the UTF-8 bytes of a string (so a consumer holding the key can
//! hash a known value and join on it), and over the BSON type byte followed by the
//! value's BSON bytes for any other value. Equal values give equal hashes in every event,
//! collection and run that uses the same key.

use std::fmt;

use bson::{Bson, Document, RawDocument, RawDocumentBuf};
use cdc_core::Namespace;
use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// What an update event carries of the document ([`Transform::document_mode`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DocumentMode {
    /// The post-image (`fullDocument`), without `updateDescription`.
    Full,
    /// Only what changed (`updateDescription`: the fields set, the fields removed, the
    /// arrays truncated), without the post-image: smaller messages, no lookup needed.
    Delta,
    /// Both, as the server sends them (the default).
    #[default]
    Both,
}

/// What to do with a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Exclude,
    Hash,
}

/// A dotted field path, split.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FieldPath(Vec<String>);

impl FieldPath {
    fn parse(path: &str) -> Result<Self, cdc_core::Error> {
        let bad = |reason: String| cdc_core::Error::InvalidArgument {
            name: "transform field",
            reason,
        };
        let parts: Vec<String> = path.split('.').map(str::to_owned).collect();
        if path.is_empty() || parts.iter().any(String::is_empty) {
            return Err(bad(format!(
                "`{path}`: a field is a dotted path of non-empty names, such as `card.number`"
            )));
        }
        if parts.iter().any(|p| p.starts_with('$')) {
            return Err(bad(format!("`{path}`: a field name cannot start with `$`")));
        }
        if parts[0] == "_id" {
            return Err(bad(format!(
                "`{path}`: `_id` is every event's key (lanes, sinks' message ids and rows follow it); it cannot be dropped or hashed"
            )));
        }
        Ok(Self(parts))
    }
}

/// A namespace pattern: `db.coll`, each side a name or a glob with `*` (`shop.*`,
/// `*.users`, `shop.order*`); `db` alone matches the whole database.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NsPattern {
    db: String,
    coll: String,
}

impl NsPattern {
    fn parse(pattern: &str) -> Result<Self, cdc_core::Error> {
        let (db, coll) = pattern.split_once('.').unwrap_or((pattern, "*"));
        if db.is_empty() || coll.is_empty() {
            return Err(cdc_core::Error::InvalidArgument {
                name: "transform namespace",
                reason: format!(
                    "`{pattern}`: a namespace pattern is `db.coll`, either side a name or a glob with `*` (`shop.*`)"
                ),
            });
        }
        Ok(Self {
            db: db.to_owned(),
            coll: coll.to_owned(),
        })
    }

    fn matches(&self, ns: &Namespace) -> bool {
        glob(&self.db, &ns.db) && glob(&self.coll, ns.coll.as_deref().unwrap_or(""))
    }
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole text must be the pattern.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The keyed hash, its key already taken in (so each value costs a copy of this state,
/// not the key's two blocks again). Never shown.
#[derive(Clone)]
struct HashKey(HmacSha256);

impl fmt::Debug for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HashKey(***)")
    }
}

/// What [`Transform::apply`] made of an event.
#[derive(Debug, PartialEq)]
#[non_exhaustive]
pub enum Shaped {
    /// Its namespace is left out: no handler sees it (its position still counts).
    LeftOut,
    /// Kept as it is (no field to shape).
    Unchanged,
    /// Kept, with its fields shaped: these are its bytes now.
    Changed(RawDocumentBuf),
}

/// Shapes events before any handler sees them (see the module's documentation).
#[derive(Clone, Debug, Default)]
pub struct Transform {
    mode: DocumentMode,
    fields: Vec<(FieldPath, Op)>,
    key: Option<HashKey>,
    include: Vec<NsPattern>,
    exclude_ns: Vec<NsPattern>,
}

impl Transform {
    /// A transform that changes nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops `field` (a dotted path) wherever an event carries it.
    ///
    /// # Errors
    /// [`cdc_core::Error::InvalidArgument`] for an empty part, a `$` name, or `_id`.
    pub fn exclude(mut self, field: &str) -> cdc_core::Result<Self> {
        self.fields.push((FieldPath::parse(field)?, Op::Exclude));
        Ok(self)
    }

    /// Replaces `field`'s value by its keyed hash (see the module's documentation).
    ///
    /// # Errors
    /// As for [`Transform::exclude`].
    pub fn hash(mut self, field: &str) -> cdc_core::Result<Self> {
        self.fields.push((FieldPath::parse(field)?, Op::Hash));
        Ok(self)
    }

    /// The key of the keyed hash (at least 16 bytes).
    ///
    /// # Errors
    /// [`cdc_core::Error::InvalidArgument`] for a shorter key (its bytes are not shown).
    pub fn hash_key(mut self, key: impl AsRef<[u8]>) -> cdc_core::Result<Self> {
        let key = key.as_ref();
        if key.len() < 16 {
            return Err(cdc_core::Error::InvalidArgument {
                name: "transform hash key",
                reason: format!(
                    "the key has {} bytes: use at least 16 (32 random bytes are best)",
                    key.len()
                ),
            });
        }
        // HMAC takes a key of any length: this cannot fail.
        let mac =
            HmacSha256::new_from_slice(key).map_err(|_| cdc_core::Error::InvalidArgument {
                name: "transform hash key",
                reason: "HMAC-SHA-256 refused the key".into(),
            })?;
        self.key = Some(HashKey(mac));
        Ok(self)
    }

    /// Keeps only events of namespaces matching one of the patterns given this way (all,
    /// when none is given).
    ///
    /// # Errors
    /// [`cdc_core::Error::InvalidArgument`] for a pattern with an empty side.
    pub fn include(mut self, pattern: &str) -> cdc_core::Result<Self> {
        self.include.push(NsPattern::parse(pattern)?);
        Ok(self)
    }

    /// Leaves out events of namespaces matching `pattern` (it wins over
    /// [`Transform::include`]).
    ///
    /// # Errors
    /// As for [`Transform::include`].
    pub fn exclude_namespace(mut self, pattern: &str) -> cdc_core::Result<Self> {
        self.exclude_ns.push(NsPattern::parse(pattern)?);
        Ok(self)
    }

    /// What update events carry of the document (default [`DocumentMode::Both`]). Other
    /// events are left as they are: an insert or a replace has no delta, a delete no
    /// post-image.
    #[must_use]
    pub fn document_mode(mut self, mode: DocumentMode) -> Self {
        self.mode = mode;
        self
    }

    /// Whether it changes anything at all.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
            && self.include.is_empty()
            && self.exclude_ns.is_empty()
            && self.mode == DocumentMode::Both
    }

    /// What is wrong with it as a whole: a hashed field without a key.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.key.is_none() && self.fields.iter().any(|(_, op)| *op == Op::Hash) {
            return Err("fields to hash need a key (`Transform::hash_key`)".into());
        }
        Ok(())
    }

    /// Whether events of `ns` are kept (events without a namespace always are).
    pub fn keeps(&self, ns: Option<&Namespace>) -> bool {
        let Some(ns) = ns else {
            return true;
        };
        (self.include.is_empty() || self.include.iter().any(|p| p.matches(ns)))
            && !self.exclude_ns.iter().any(|p| p.matches(ns))
    }

    /// An event (its raw bytes) as handlers are to see it. The namespace patterns apply
    /// to change events; a snapshot's rows are read from the source's own collections
    /// and are only shaped.
    ///
    /// # Errors
    /// An event that cannot be read as a document or written back after shaping.
    pub fn apply(&self, event: &RawDocument) -> cdc_core::Result<Shaped> {
        let bad = |e: String| cdc_core::Error::InvalidArgument {
            name: "change event",
            reason: format!("cannot be shaped: {e}"),
        };
        let row = event
            .get_document("_id")
            .is_ok_and(|id| id.get("_snapshot").is_ok_and(|v| v.is_some()));
        let patterns = !(self.include.is_empty() && self.exclude_ns.is_empty());
        if patterns && !row {
            let ns = event.get_document("ns").ok().and_then(|ns| {
                let db = ns.get_str("db").ok()?;
                Some(match ns.get_str("coll") {
                    Ok(coll) => Namespace::collection(db, coll),
                    Err(_) => Namespace::database(db),
                })
            });
            if !self.keeps(ns.as_ref()) {
                return Ok(Shaped::LeftOut);
            }
        }
        let trimmed = match self.mode {
            DocumentMode::Both => None,
            _ if event.get_str("operationType").ok() != Some("update") => None,
            DocumentMode::Full => Some("updateDescription"),
            DocumentMode::Delta => Some("fullDocument"),
        }
        .filter(|field| event.get(field).is_ok_and(|v| v.is_some()));
        if self.fields.is_empty() && trimmed.is_none() {
            return Ok(Shaped::Unchanged);
        }
        let mut doc = Document::try_from(event).map_err(|e| bad(e.to_string()))?;
        if let Some(field) = trimmed {
            doc.remove(field);
        }
        self.shape(&mut doc);
        let out = RawDocumentBuf::try_from(&doc).map_err(|e| bad(e.to_string()))?;
        Ok(Shaped::Changed(out))
    }

    /// Shapes an event document in place.
    fn shape(&self, event: &mut Document) {
        for name in ["fullDocument", "fullDocumentBeforeChange", "documentKey"] {
            if let Ok(doc) = event.get_document_mut(name) {
                for (path, op) in &self.fields {
                    self.in_document(doc, &path.0, *op);
                }
            }
        }
        if let Ok(update) = event.get_document_mut("updateDescription")
            && let Ok(updated) = update.get_document_mut("updatedFields")
        {
            self.in_updated_fields(updated);
        }
    }

    /// Applies `op` to `path` within `doc`.
    fn in_document(&self, doc: &mut Document, path: &[String], op: Op) {
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        if rest.is_empty() {
            match op {
                Op::Exclude => {
                    doc.remove(first);
                }
                Op::Hash => {
                    if let Some(v) = doc.get_mut(first) {
                        *v = self.hashed(v);
                    }
                }
            }
            return;
        }
        if let Some(v) = doc.get_mut(first) {
            self.in_value(v, rest, op);
        }
    }

    /// Applies `op` to `path` within a value: into a document's field, into every element
    /// of an array (or the one a numeric part names).
    fn in_value(&self, value: &mut Bson, path: &[String], op: Op) {
        match value {
            Bson::Document(doc) => self.in_document(doc, path, op),
            Bson::Array(items) => {
                if let Some((first, rest)) = path.split_first()
                    && let Ok(i) = first.parse::<usize>()
                {
                    if rest.is_empty() {
                        if let Some(item) = items.get_mut(i) {
                            match op {
                                // An element cannot be taken out without moving the
                                // others: it is blanked.
                                Op::Exclude => *item = Bson::Null,
                                Op::Hash => *item = self.hashed(item),
                            }
                        }
                    } else if let Some(item) = items.get_mut(i) {
                        self.in_value(item, rest, op);
                    }
                    return;
                }
                for item in items {
                    self.in_value(item, path, op);
                }
            }
            _ => {}
        }
    }

    /// `updatedFields`: its keys are dotted paths, with array indexes as numeric parts.
    fn in_updated_fields(&self, updated: &mut Document) {
        let keys: Vec<String> = updated.keys().cloned().collect();
        for key in keys {
            let parts: Vec<&str> = key.split('.').collect();
            for (path, op) in &self.fields {
                let Some(value) = updated.get_mut(&key) else {
                    break;
                };
                match relate(&parts, &path.0) {
                    // The update sets the field, or a part of it.
                    Relation::Within => match op {
                        Op::Exclude => {
                            updated.remove(&key);
                        }
                        Op::Hash => *value = self.hashed(value),
                    },
                    // The update sets a value that holds the field further down.
                    Relation::Holds(rest) => self.in_value(value, rest, *op),
                    Relation::Apart => {}
                }
            }
        }
    }

    /// The keyed hash of a value, as a string of hex digits.
    fn hashed(&self, value: &Bson) -> Bson {
        let Some(key) = &self.key else {
            // `check` refuses hashed fields without a key before a transform is used;
            // should one get here, nothing of the value is let through.
            return Bson::Null;
        };
        let mut mac = key.0.clone();
        match value {
            Bson::String(s) => mac.update(s.as_bytes()),
            other => {
                mac.update(&[other.element_type() as u8]);
                let mut doc = Document::new();
                doc.insert("", other.clone());
                if let Ok(bytes) = doc.to_vec() {
                    // The document's length (4), the element's type byte and its empty
                    // name (2) come first, its terminating byte last: the value between.
                    if bytes.len() > 7 {
                        mac.update(&bytes[6..bytes.len() - 1]);
                    }
                }
            }
        }
        let digest = mac.finalize().into_bytes();
        let mut hex = String::with_capacity(64);
        for b in digest.iter() {
            // Both halves of a byte are below 16: always a digit.
            hex.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
            hex.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
        }
        Bson::String(hex)
    }
}

/// How an update's path stands to a shaped field's.
#[derive(Debug, PartialEq, Eq)]
enum Relation<'f> {
    /// The update's path is the field or lies inside it.
    Within,
    /// The update's path holds the field: this is the rest of the field's path below it.
    Holds(&'f [String]),
    Apart,
}

/// Relates an update path (numeric parts may be array indexes, which a field's path
/// skips, or field names) to a field's path. Where both readings of a numeric part
/// relate, the one that shapes more wins.
fn relate<'f>(update: &[&str], field: &'f [String]) -> Relation<'f> {
    match (update.split_first(), field.split_first()) {
        (None, None) => Relation::Within,
        (None, Some(_)) => Relation::Holds(field),
        (Some(_), None) => Relation::Within,
        (Some((u, urest)), Some((f, frest))) => {
            let literal = if u == f {
                relate(urest, frest)
            } else {
                Relation::Apart
            };
            if matches!(literal, Relation::Within) {
                return literal;
            }
            let skipped = if u.parse::<usize>().is_ok() {
                relate(urest, field)
            } else {
                Relation::Apart
            };
            match (literal, skipped) {
                (_, Relation::Within) => Relation::Within,
                (Relation::Holds(a), Relation::Holds(b)) => {
                    // Both hold: shape by the longer rest (more of the value).
                    Relation::Holds(if a.len() >= b.len() { a } else { b })
                }
                (Relation::Holds(a), _) | (_, Relation::Holds(a)) => Relation::Holds(a),
                _ => Relation::Apart,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use bson::{doc, rawdoc};

    fn event(body: Document) -> RawDocumentBuf {
        let mut d = doc! {
            "_id": { "_data": "8200000001" },
            "operationType": "update",
            "clusterTime": bson::Timestamp { time: 1, increment: 1 },
            "ns": { "db": "shop", "coll": "users" },
        };
        d.extend(body);
        RawDocumentBuf::try_from(&d).unwrap()
    }

    fn shaped(t: &Transform, e: &RawDocumentBuf) -> Document {
        let Shaped::Changed(raw) = t.apply(e).unwrap() else {
            panic!("not shaped");
        };
        Document::try_from(raw.as_ref()).unwrap()
    }

    fn key() -> Transform {
        Transform::new().hash_key("0123456789abcdef0123").unwrap()
    }

    #[test]
    fn fields_are_dropped_in_every_image_and_through_arrays() {
        let t = key()
            .exclude("ssn")
            .unwrap()
            .exclude("card.number")
            .unwrap();
        let e = event(doc! {
            "documentKey": { "_id": 1, "ssn": "111" },
            "fullDocument": { "_id": 1, "ssn": "111", "card": { "number": "4111", "exp": "12/30" },
                "cards": [{ "number": "1" }] },
            "fullDocumentBeforeChange": { "_id": 1, "ssn": "000", "card": [{ "number": "4000" }, { "number": "5000", "exp": "1" }, 7] },
        });
        let d = shaped(&t, &e);
        assert_eq!(d.get_document("documentKey").unwrap(), &doc! { "_id": 1 });
        assert_eq!(
            d.get_document("fullDocument").unwrap(),
            &doc! { "_id": 1, "card": { "exp": "12/30" }, "cards": [{ "number": "1" }] }
        );
        assert_eq!(
            d.get_document("fullDocumentBeforeChange").unwrap(),
            &doc! { "_id": 1, "card": [{}, { "exp": "1" }, 7] }
        );
        // The event's own fields are untouched.
        assert_eq!(
            d.get_document("ns").unwrap(),
            &doc! { "db": "shop", "coll": "users" }
        );
    }

    #[test]
    fn update_paths_into_above_and_beside_a_field_are_shaped() {
        let t = key().exclude("card.number").unwrap().hash("email").unwrap();
        let e = event(doc! {
            "updateDescription": {
                "updatedFields": {
                    "card.number": "4111",
                    "card": { "number": "4222", "exp": "1" },
                    "card.number.first": "4",
                    "cards.0.x": 1,
                    "card.exp": "2",
                    "email": "a@x.io",
                    "email.local": "a",
                    "items.3": { "email": "no" },
                },
                "removedFields": ["card.number"],
                "truncatedArrays": [],
            },
        });
        let d = shaped(&t, &e);
        let u = d.get_document("updateDescription").unwrap();
        let set = u.get_document("updatedFields").unwrap();
        assert!(!set.contains_key("card.number"));
        assert!(!set.contains_key("card.number.first"));
        assert_eq!(set.get_document("card").unwrap(), &doc! { "exp": "1" });
        assert_eq!(set.get_str("card.exp").unwrap(), "2");
        assert_eq!(set.get_i32("cards.0.x").unwrap(), 1);
        let hashed = set.get_str("email").unwrap();
        assert_eq!(hashed.len(), 64);
        assert_ne!(set.get_str("email.local").unwrap(), "a");
        assert_eq!(
            set.get_document("items.3").unwrap(),
            &doc! { "email": "no" }
        );
        // Names without values stay.
        assert_eq!(u.get_array("removedFields").unwrap().len(), 1);
    }

    #[test]
    fn equal_values_hash_equally_and_the_key_matters() {
        let t = key().hash("email").unwrap().hash("n").unwrap();
        let a = shaped(
            &t,
            &event(doc! { "fullDocument": { "_id": 1, "email": "a@x.io", "n": 5 } }),
        );
        let b = shaped(
            &t,
            &event(doc! { "fullDocument": { "_id": 2, "email": "a@x.io", "n": 5_i64 } }),
        );
        let fa = a.get_document("fullDocument").unwrap();
        let fb = b.get_document("fullDocument").unwrap();
        assert_eq!(fa.get_str("email").unwrap(), fb.get_str("email").unwrap());
        // An int32 and an int64 are different values to BSON.
        assert_ne!(fa.get_str("n").unwrap(), fb.get_str("n").unwrap());
        // A string's hash is HMAC-SHA-256 over its bytes: computable by a consumer.
        let mut mac = HmacSha256::new_from_slice(b"0123456789abcdef0123").unwrap();
        mac.update(b"a@x.io");
        let expected: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(fa.get_str("email").unwrap(), expected);
        let other = Transform::new()
            .hash_key("another key of 16+ bytes")
            .unwrap()
            .hash("email")
            .unwrap();
        let c = shaped(
            &other,
            &event(doc! { "fullDocument": { "_id": 1, "email": "a@x.io" } }),
        );
        assert_ne!(
            c.get_document("fullDocument")
                .unwrap()
                .get_str("email")
                .unwrap(),
            expected
        );
    }

    #[test]
    fn namespaces_are_kept_or_left_out_by_pattern() {
        let t = Transform::new()
            .include("shop.*")
            .unwrap()
            .exclude_namespace("shop.audit")
            .unwrap();
        let ns = |db: &str, coll: &str| Namespace::collection(db, coll);
        assert!(t.keeps(Some(&ns("shop", "users"))));
        assert!(!t.keeps(Some(&ns("shop", "audit"))));
        assert!(!t.keeps(Some(&ns("crm", "users"))));
        assert!(t.keeps(None));
        assert!(glob("order*", "orders") && glob("*s", "orders") && glob("o*r*s", "orders"));
        assert!(!glob("order", "orders") && !glob("*x", "orders") && !glob("s*", "orders"));
        assert!(glob("*", "") && glob("a*a", "aa") && !glob("a*a", "a"));
        let e = event(doc! {});
        assert_eq!(t.apply(&e).unwrap(), Shaped::Unchanged);
        let audit = rawdoc! {
            "_id": { "_data": "8200000001" },
            "operationType": "insert",
            "clusterTime": bson::Timestamp { time: 1, increment: 1 },
            "ns": { "db": "shop", "coll": "audit" },
        };
        assert_eq!(t.apply(&audit).unwrap(), Shaped::LeftOut);
        // A snapshot's row is not left out by namespace (snapshots read the source's own
        // collections).
        let row = rawdoc! {
            "_id": { "_snapshot": { "coll": "audit" } },
            "operationType": "insert",
            "ns": { "db": "shop", "coll": "audit" },
        };
        assert_eq!(t.apply(&row).unwrap(), Shaped::Unchanged);
    }

    #[test]
    fn update_events_carry_the_post_image_the_delta_or_both() {
        let update = event(doc! {
            "fullDocument": { "_id": 1, "n": 2 },
            "updateDescription": { "updatedFields": { "n": 2 }, "removedFields": ["m"], "truncatedArrays": [] },
        });
        let full = shaped(&Transform::new().document_mode(DocumentMode::Full), &update);
        assert!(full.contains_key("fullDocument") && !full.contains_key("updateDescription"));
        let delta = shaped(
            &Transform::new().document_mode(DocumentMode::Delta),
            &update,
        );
        assert!(!delta.contains_key("fullDocument"));
        assert_eq!(
            delta.get_document("updateDescription").unwrap(),
            &doc! { "updatedFields": { "n": 2 }, "removedFields": ["m"], "truncatedArrays": [] }
        );
        let both = Transform::new().document_mode(DocumentMode::Both);
        assert!(both.is_empty());
        assert_eq!(both.apply(&update).unwrap(), Shaped::Unchanged);
        // An insert keeps its document whatever the mode.
        let insert = rawdoc! {
            "_id": { "_data": "8200000001" },
            "operationType": "insert",
            "ns": { "db": "shop", "coll": "users" },
            "fullDocument": { "_id": 1 },
        };
        let t = Transform::new().document_mode(DocumentMode::Delta);
        assert_eq!(t.apply(&insert).unwrap(), Shaped::Unchanged);
    }

    #[test]
    fn bad_fields_patterns_and_keys_are_named() {
        for bad in ["", "a..b", ".a", "a.", "_id", "_id.x", "a.$b"] {
            let e = Transform::new().exclude(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}`")), "{bad}: {e}");
        }
        for bad in ["", ".x", "x."] {
            assert!(Transform::new().include(bad).is_err(), "{bad}");
        }
        let e = Transform::new().hash_key("short").unwrap_err().to_string();
        assert!(e.contains("5 bytes") && !e.contains("short"), "{e}");
        assert!(Transform::new().hash("email").unwrap().check().is_err());
        assert!(format!("{:?}", key()).contains("***"));
    }

    mod property {
        use super::super::*;
        use bson::doc;
        use proptest::prelude::*;

        /// A document's shape: leaves become values marked by where they are.
        #[derive(Clone, Debug)]
        enum Tree {
            Leaf,
            Doc(Vec<(String, Tree)>),
            Arr(Vec<Tree>),
        }

        fn name() -> impl Strategy<Value = String> {
            prop_oneof![Just("a"), Just("b"), Just("s"), Just("t")].prop_map(str::to_owned)
        }

        fn tree() -> impl Strategy<Value = Tree> {
            Just(Tree::Leaf).prop_recursive(4, 40, 4, |inner| {
                prop_oneof![
                    prop::collection::vec((name(), inner.clone()), 0..4).prop_map(Tree::Doc),
                    prop::collection::vec(inner, 0..3).prop_map(Tree::Arr),
                ]
            })
        }

        fn doc_tree() -> impl Strategy<Value = Vec<(String, Tree)>> {
            prop::collection::vec((name(), tree()), 0..5)
        }

        fn field() -> impl Strategy<Value = Vec<String>> {
            prop::collection::vec(name(), 1..4)
        }

        /// An update path: names, and array indexes among them.
        fn update_path() -> impl Strategy<Value = Vec<String>> {
            prop::collection::vec(
                prop_oneof![3 => name(), 1 => Just("0".to_owned()), 1 => Just("1".to_owned())],
                1..5,
            )
        }

        /// Marks leaves: `SECRET-n` inside an excluded field, `PRIVATE-n` inside a hashed
        /// one, `KEEP-n` elsewhere (recorded). `path` holds the names down to here (array
        /// positions are not names: a field's path passes through them).
        struct Marker<'a> {
            excluded: &'a [Vec<String>],
            hashed: &'a [Vec<String>],
            n: usize,
            kept: Vec<String>,
        }

        impl Marker<'_> {
            fn under(fields: &[Vec<String>], path: &[String]) -> bool {
                fields.iter().any(|f| path.starts_with(f))
            }

            fn value(&mut self, tree: &Tree, path: &mut Vec<String>) -> Bson {
                match tree {
                    Tree::Leaf => {
                        self.n += 1;
                        let mark = if Self::under(self.excluded, path) {
                            format!("SECRET-{}", self.n)
                        } else if Self::under(self.hashed, path) {
                            format!("PRIVATE-{}", self.n)
                        } else {
                            let keep = format!("KEEP-{}", self.n);
                            self.kept.push(keep.clone());
                            keep
                        };
                        Bson::String(mark)
                    }
                    Tree::Doc(fields) => Bson::Document(self.doc(fields, path)),
                    Tree::Arr(items) => {
                        Bson::Array(items.iter().map(|t| self.value(t, path)).collect())
                    }
                }
            }

            fn doc(&mut self, fields: &[(String, Tree)], path: &mut Vec<String>) -> Document {
                let mut d = Document::new();
                for (name, t) in fields {
                    if d.contains_key(name) {
                        continue;
                    }
                    path.push(name.clone());
                    let v = self.value(t, path);
                    path.pop();
                    d.insert(name.clone(), v);
                }
                d
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn no_excluded_or_hashed_value_gets_through_and_nothing_else_is_lost(
                excluded in prop::collection::vec(field(), 0..3),
                hashed in prop::collection::vec(field(), 0..3),
                key in doc_tree(),
                after in doc_tree(),
                before in doc_tree(),
                updates in prop::collection::vec((update_path(), tree()), 0..5),
            ) {
                let mut t = Transform::new().hash_key("a key of sixteen bytes").unwrap();
                for f in &excluded {
                    t = t.exclude(&f.join(".")).unwrap();
                }
                for f in &hashed {
                    t = t.hash(&f.join(".")).unwrap();
                }
                let mut m = Marker { excluded: &excluded, hashed: &hashed, n: 0, kept: Vec::new() };
                let mut document_key = doc! { "_id": 1 };
                document_key.extend(m.doc(&key, &mut Vec::new()));
                let full = m.doc(&after, &mut Vec::new());
                let prior = m.doc(&before, &mut Vec::new());
                let mut updated = Document::new();
                for (path, value) in &updates {
                    let dotted = path.join(".");
                    if updated.contains_key(&dotted) {
                        continue;
                    }
                    // The names along the update's path (its indexes are array positions).
                    let mut names: Vec<String> =
                        path.iter().filter(|p| p.parse::<usize>().is_err()).cloned().collect();
                    let v = m.value(value, &mut names);
                    updated.insert(dotted, v);
                }
                let event = doc! {
                    "_id": { "_data": "8200000001" },
                    "operationType": "update",
                    "clusterTime": bson::Timestamp { time: 1, increment: 1 },
                    "ns": { "db": "shop", "coll": "users" },
                    "documentKey": document_key,
                    "fullDocument": full,
                    "fullDocumentBeforeChange": prior,
                    "updateDescription": {
                        "updatedFields": updated,
                        "removedFields": [],
                        "truncatedArrays": [],
                    },
                };
                let raw = RawDocumentBuf::try_from(&event).unwrap();
                let out = match t.apply(&raw).unwrap() {
                    Shaped::Changed(out) => out.into_bytes(),
                    Shaped::Unchanged => raw.clone().into_bytes(),
                    Shaped::LeftOut => unreachable!("no namespace pattern"),
                };
                let text = String::from_utf8_lossy(&out);
                prop_assert!(!text.contains("SECRET-"), "{}", text);
                prop_assert!(!text.contains("PRIVATE-"), "{}", text);
                for keep in &m.kept {
                    prop_assert!(text.contains(keep.as_str()), "{} lost: {}", keep, text);
                }
            }
        }
    }
}
