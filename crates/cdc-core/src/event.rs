//! Change events, decoded from the server's document without a lossy round trip.

use bson::{Bson, Document, RawBsonRef, RawDocument, RawDocumentBuf, spec::ElementType};

use crate::{ClusterTime, Error, Namespace, OperationType, Result, ResumePoint, ResumeToken};

/// What changed in an `update` event.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct UpdateDescription {
    /// Fields set by the update, with their new values (dotted paths as keys).
    pub updated_fields: Document,
    /// Fields removed by the update.
    pub removed_fields: Vec<String>,
    /// Arrays shortened by the update.
    pub truncated_arrays: Vec<TruncatedArray>,
    /// Paths whose dotted form is ambiguous, with their components (MongoDB 6.1+,
    /// `showExpandedEvents`).
    pub disambiguated_paths: Option<Document>,
}

/// An array that an update truncated.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TruncatedArray {
    /// The array's path.
    pub field: String,
    /// Its length after the update.
    pub new_size: u32,
}

/// One change event from a change stream.
///
/// The event keeps the bytes the server sent ([`ChangeEvent::raw`]) and decodes its
/// header eagerly (token, operation type, times, namespaces, transaction number); the
/// document key, the images, the update description, the session id and any field this
/// version does not know are read from those bytes only when asked. An event therefore
/// costs one buffer, not a tree of allocations, and nothing the server sent is lost.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct ChangeEvent {
    /// The event's resume token (`_id`), kept byte-for-byte.
    pub token: ResumeToken,
    /// The kind of change.
    pub operation_type: OperationType,
    /// When the change happened in the cluster's log.
    pub cluster_time: ClusterTime,
    /// The server's wall-clock time of the change (MongoDB 6.0+).
    pub wall_time: Option<bson::DateTime>,
    /// The namespace changed; absent on `invalidate`.
    pub ns: Option<Namespace>,
    /// The new namespace of a `rename`.
    pub to: Option<Namespace>,
    /// The transaction number, for changes made in a multi-document transaction.
    pub txn_number: Option<i64>,
    /// The event as the server sent it; empty for events built with [`ChangeEvent::new`].
    raw: RawDocumentBuf,
    views: Views,
}

/// Where the lazily read parts of an event lie in its raw bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Views {
    document_key: Option<Span>,
    full_document: Option<Span>,
    full_document_before_change: Option<Span>,
    update_description: Option<Span>,
    lsid: Option<Span>,
    /// Whether a top-level field this version does not interpret is present.
    has_extra: bool,
}

/// Where a sub-document lies in an event's raw bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

impl Span {
    /// The span of `sub`, a document borrowed from `base`.
    fn of(base: &RawDocument, sub: &RawDocument) -> Self {
        // Both point into the same buffer (`sub` was read out of `base`); were they not,
        // the span would be nonsense and `ChangeEvent::view` would find nothing: no panic.
        let start =
            (sub.as_bytes().as_ptr() as usize).wrapping_sub(base.as_bytes().as_ptr() as usize);
        Self {
            start,
            end: start.wrapping_add(sub.as_bytes().len()),
        }
    }
}

/// The name of a top-level field decoded eagerly or read through a view; `None` for the
/// fields this version does not interpret ("extra").
fn known_field(key: &str) -> Option<&'static str> {
    Some(match key {
        "_id" => "_id",
        "operationType" => "operationType",
        "clusterTime" => "clusterTime",
        "wallTime" => "wallTime",
        "ns" => "ns",
        "to" => "to",
        "documentKey" => "documentKey",
        "fullDocument" => "fullDocument",
        "fullDocumentBeforeChange" => "fullDocumentBeforeChange",
        "updateDescription" => "updateDescription",
        "txnNumber" => "txnNumber",
        "lsid" => "lsid",
        _ => return None,
    })
}

impl std::fmt::Debug for ChangeEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeEvent")
            .field("token", &self.token)
            .field("operation_type", &self.operation_type)
            .field("cluster_time", &self.cluster_time)
            .field("wall_time", &self.wall_time)
            .field("ns", &self.ns)
            .field("to", &self.to)
            .field("txn_number", &self.txn_number)
            .field("document_key", &self.document_key())
            .field("full_document", &self.full_document())
            .field(
                "full_document_before_change",
                &self.full_document_before_change(),
            )
            .field("update_description", &self.update_description())
            .field("lsid", &self.lsid())
            .field("extra", &self.extra())
            .finish()
    }
}

impl ChangeEvent {
    /// A minimal event with no bytes behind it: no key, images or other parts. For tests
    /// and for sources that build events themselves ([`ChangeEvent::from_document`] builds
    /// a complete one).
    pub fn new(
        token: ResumeToken,
        operation_type: OperationType,
        cluster_time: ClusterTime,
    ) -> Self {
        Self {
            token,
            operation_type,
            cluster_time,
            wall_time: None,
            ns: None,
            to: None,
            txn_number: None,
            raw: RawDocumentBuf::new(),
            views: Views::default(),
        }
    }

    /// Decodes an event from the raw document the server sent (copying it once: prefer
    /// [`ChangeEvent::from_raw_buf`] when the buffer can be handed over).
    ///
    /// # Errors
    /// As [`ChangeEvent::from_raw_buf`].
    pub fn from_raw(raw: &RawDocument) -> Result<Self> {
        Self::from_raw_buf(raw.to_owned())
    }

    /// Decodes an event from the raw document the server sent, in one pass over its
    /// top-level fields, keeping the buffer.
    ///
    /// # Errors
    /// [`Error::MalformedEvent`] naming the field when `_id`, `operationType` or
    /// `clusterTime` is missing, a top-level field has the wrong BSON type, or the bytes
    /// do not frame as BSON. The insides of the key, images, update description and
    /// session id are checked when they are read.
    pub fn from_raw_buf(raw: RawDocumentBuf) -> Result<Self> {
        let mut token = None;
        let mut operation_type = None;
        let mut cluster_time = None;
        let mut header = Header::default();
        let mut views = Views::default();
        for element in raw.iter_elements() {
            let element = element.map_err(|e| malformed("(document)", e.to_string()))?;
            let key = element.key().as_str();
            let Some(field) = known_field(key) else {
                views.has_extra = true;
                continue;
            };
            let value = element
                .value()
                .map_err(|e| malformed(field, e.to_string()))?;
            let span = |value: RawBsonRef<'_>| -> Result<Option<Span>> {
                Ok(raw_subdocument(field, value)?.map(|d| Span::of(&raw, d)))
            };
            match field {
                "_id" => match value {
                    RawBsonRef::Document(id) => token = Some(ResumeToken::copied(id)),
                    other => return Err(wrong_type("_id", "a document", other.element_type())),
                },
                "operationType" => match value {
                    RawBsonRef::String(s) => operation_type = Some(OperationType::parse(s)),
                    other => {
                        return Err(wrong_type(
                            "operationType",
                            "a string",
                            other.element_type(),
                        ));
                    }
                },
                "clusterTime" => match value {
                    RawBsonRef::Timestamp(ts) => cluster_time = Some(ClusterTime::from(ts)),
                    other => {
                        return Err(wrong_type(
                            "clusterTime",
                            "a timestamp",
                            other.element_type(),
                        ));
                    }
                },
                "documentKey" => views.document_key = span(value)?,
                "fullDocument" => views.full_document = span(value)?,
                "fullDocumentBeforeChange" => views.full_document_before_change = span(value)?,
                "updateDescription" => views.update_description = span(value)?,
                "lsid" => views.lsid = span(value)?,
                other => header.take(other, value)?,
            }
        }
        let token = token.ok_or_else(|| malformed("_id", "is missing".into()))?;
        let operation_type =
            operation_type.ok_or_else(|| malformed("operationType", "is missing".into()))?;
        let cluster_time =
            cluster_time.ok_or_else(|| malformed("clusterTime", "is missing".into()))?;
        Ok(Self {
            token,
            operation_type,
            cluster_time,
            wall_time: header.wall_time,
            ns: header.ns,
            to: header.to,
            txn_number: header.txn_number,
            raw,
            views,
        })
    }

    /// Decodes an event from a parsed document (by encoding it to BSON first: prefer
    /// [`ChangeEvent::from_raw_buf`] where the bytes are at hand).
    ///
    /// # Errors
    /// As [`ChangeEvent::from_raw_buf`].
    pub fn from_document(doc: &Document) -> Result<Self> {
        let raw =
            RawDocumentBuf::try_from(doc).map_err(|e| malformed("(document)", e.to_string()))?;
        Self::from_raw_buf(raw)
    }

    /// The event as the server sent it (to forward it verbatim); `None` for events built
    /// with [`ChangeEvent::new`].
    pub fn raw(&self) -> Option<&RawDocument> {
        (!self.raw.is_empty()).then_some(self.raw.as_ref())
    }

    fn view(&self, span: Option<Span>) -> Option<&RawDocument> {
        let span = span?;
        let bytes = self.raw.as_bytes().get(span.start..span.end)?;
        RawDocument::from_bytes(bytes).ok()
    }

    /// The changed document's key: `{ _id: … }` (plus the shard key on sharded clusters),
    /// as the raw BSON the server sent, so every value keeps its exact type and bytes (a
    /// stable key for partitioning). [`ChangeEvent::document_id`] reads the `_id`.
    pub fn document_key(&self) -> Option<&RawDocument> {
        self.view(self.views.document_key)
    }

    /// The document after the change, when the stream asked for it and it exists, as the
    /// raw BSON the server sent: read fields with `get_str` and friends, deserialize with
    /// `bson::deserialize_from_slice(doc.as_bytes())`, or parse it whole with
    /// [`ChangeEvent::full_document_parsed`].
    pub fn full_document(&self) -> Option<&RawDocument> {
        self.view(self.views.full_document)
    }

    /// The document before the change (pre-image), when requested and recorded; raw BSON
    /// like [`ChangeEvent::full_document`].
    pub fn full_document_before_change(&self) -> Option<&RawDocument> {
        self.view(self.views.full_document_before_change)
    }

    /// The post-image parsed into a [`Document`].
    ///
    /// # Errors
    /// [`Error::MalformedEvent`] when its bytes are not valid BSON.
    pub fn full_document_parsed(&self) -> Result<Option<Document>> {
        parse_part("fullDocument", self.full_document())
    }

    /// The pre-image parsed into a [`Document`].
    ///
    /// # Errors
    /// [`Error::MalformedEvent`] when its bytes are not valid BSON.
    pub fn full_document_before_change_parsed(&self) -> Result<Option<Document>> {
        parse_part(
            "fullDocumentBeforeChange",
            self.full_document_before_change(),
        )
    }

    /// What an `update` changed, decoded from the event's bytes.
    ///
    /// # Errors
    /// [`Error::MalformedEvent`] naming `updateDescription` when it does not decode.
    pub fn update_description(&self) -> Result<Option<UpdateDescription>> {
        parse_part(
            "updateDescription",
            self.view(self.views.update_description),
        )?
        .map(decode_update_description)
        .transpose()
    }

    /// The logical session id, for changes made in a transaction.
    pub fn lsid(&self) -> Option<&RawDocument> {
        self.view(self.views.lsid)
    }

    /// Top-level fields this version does not interpret, as the server sent them (empty
    /// for most events).
    ///
    /// # Errors
    /// [`Error::MalformedEvent`] when one of them does not decode.
    pub fn extra(&self) -> Result<Document> {
        let mut extra = Document::new();
        if !self.views.has_extra {
            return Ok(extra);
        }
        for element in &self.raw {
            let (key, value) = element.map_err(|e| malformed("(document)", e.to_string()))?;
            if known_field(key.as_str()).is_none() {
                let value = Bson::try_from(value)
                    .map_err(|e| malformed("(document)", format!("`{key}`: {e}")))?;
                extra.insert(key.as_str(), value);
            }
        }
        Ok(extra)
    }

    /// The changed document's `_id`, borrowed from the raw key: `None` when the event has
    /// no key, the key no `_id`, or its bytes do not parse.
    pub fn document_id_raw(&self) -> Option<RawBsonRef<'_>> {
        self.document_key()?.get("_id").ok().flatten()
    }

    /// The changed document's `_id`, as the BSON value it is (decoded from the raw key).
    pub fn document_id(&self) -> Option<Bson> {
        self.document_id_raw()
            .and_then(|id| Bson::try_from(id).ok())
    }

    /// The changed document's `_id` as text, for logs and for keys in other systems:
    /// a string as itself, an ObjectId as its hex, numbers in decimal, anything else as
    /// relaxed Extended JSON. Distinct ids of different types may print alike (`"1"` and
    /// `1`); use [`ChangeEvent::document_id`] where that matters.
    pub fn document_id_string(&self) -> Option<String> {
        self.document_id().as_ref().map(bson_display)
    }

    /// The resume point this event leaves behind once processed (no document inside).
    pub fn resume_point(&self, saved_at: bson::DateTime) -> ResumePoint {
        ResumePoint::for_event(
            self.token.clone(),
            self.cluster_time,
            self.operation_type.clone(),
            saved_at,
        )
    }
}

/// Formats a BSON value for humans: strings bare, ObjectIds as hex, numbers in decimal,
/// everything else as relaxed Extended JSON.
pub fn bson_display(value: &Bson) -> String {
    match value {
        Bson::String(s) => s.clone(),
        Bson::ObjectId(oid) => oid.to_hex(),
        Bson::Int32(n) => n.to_string(),
        Bson::Int64(n) => n.to_string(),
        Bson::Double(n) => n.to_string(),
        other => crate::extjson::to_relaxed_json(other.clone()).to_string(),
    }
}

/// The header fields decoded in the decoding pass (besides token, type and time).
#[derive(Default)]
struct Header {
    wall_time: Option<bson::DateTime>,
    ns: Option<Namespace>,
    to: Option<Namespace>,
    txn_number: Option<i64>,
}

impl Header {
    fn take(&mut self, field: &'static str, value: RawBsonRef<'_>) -> Result<()> {
        match field {
            "wallTime" => {
                self.wall_time = match value {
                    RawBsonRef::DateTime(dt) => Some(dt),
                    RawBsonRef::Null => None,
                    other => return Err(wrong_type("wallTime", "a date", other.element_type())),
                }
            }
            "ns" => self.ns = raw_namespace("ns", value)?,
            "to" => self.to = raw_namespace("to", value)?,
            "txnNumber" => {
                self.txn_number = match value {
                    RawBsonRef::Null => None,
                    RawBsonRef::Int64(n) => Some(n),
                    RawBsonRef::Int32(n) => Some(i64::from(n)),
                    other => {
                        return Err(wrong_type("txnNumber", "an integer", other.element_type()));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn malformed(field: &'static str, problem: String) -> Error {
    Error::MalformedEvent { field, problem }
}

/// `field` holds a value of the wrong BSON type (`got`, from a parsed or a raw value).
fn wrong_type(field: &'static str, expected: &str, got: ElementType) -> Error {
    malformed(field, format!("should be {expected}, is a {got:?}"))
}

/// A sub-document field, or `None` when it is `null`.
fn raw_subdocument<'a>(
    field: &'static str,
    value: RawBsonRef<'a>,
) -> Result<Option<&'a RawDocument>> {
    match value {
        RawBsonRef::Document(d) => Ok(Some(d)),
        RawBsonRef::Null => Ok(None),
        other => Err(wrong_type(field, "a document", other.element_type())),
    }
}

fn parse_part(field: &'static str, raw: Option<&RawDocument>) -> Result<Option<Document>> {
    raw.map(|d| Document::try_from(d).map_err(|e| malformed(field, e.to_string())))
        .transpose()
}

fn raw_namespace(field: &'static str, value: RawBsonRef<'_>) -> Result<Option<Namespace>> {
    let Some(ns) = raw_subdocument(field, value)? else {
        return Ok(None);
    };
    let mut db = None;
    let mut coll = None;
    for element in ns {
        match element.map_err(|e| malformed(field, e.to_string()))? {
            (key, RawBsonRef::String(s)) if key.as_str() == "db" => db = Some(s.to_owned()),
            (key, RawBsonRef::String(s)) if key.as_str() == "coll" => coll = Some(s.to_owned()),
            (key, RawBsonRef::Null) if key.as_str() == "coll" => coll = None,
            (key, other) if key.as_str() == "db" => {
                return Err(wrong_type(
                    field,
                    "a namespace with a string `db`",
                    other.element_type(),
                ));
            }
            (key, other) if key.as_str() == "coll" => {
                return Err(wrong_type(
                    field,
                    "a namespace with a string `coll`",
                    other.element_type(),
                ));
            }
            _ => {}
        }
    }
    let db = db.ok_or_else(|| malformed(field, "has no `db`".into()))?;
    Ok(Some(Namespace { db, coll }))
}

fn take_document(doc: &mut Document, field: &'static str) -> Result<Option<Document>> {
    match doc.remove(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Document(d)) => Ok(Some(d)),
        Some(other) => Err(wrong_type(field, "a document", other.element_type())),
    }
}

fn decode_update_description(mut ud: Document) -> Result<UpdateDescription> {
    const FIELD: &str = "updateDescription";
    let updated_fields = take_document(&mut ud, "updatedFields")?.unwrap_or_default();
    let removed_fields = match ud.remove("removedFields") {
        None | Some(Bson::Null) => Vec::new(),
        Some(Bson::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Bson::String(s) => Ok(s),
                other => Err(wrong_type(
                    FIELD,
                    "a list of field names in `removedFields`",
                    other.element_type(),
                )),
            })
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(wrong_type(
                FIELD,
                "an array in `removedFields`",
                other.element_type(),
            ));
        }
    };
    let truncated_arrays = match ud.remove("truncatedArrays") {
        None | Some(Bson::Null) => Vec::new(),
        Some(Bson::Array(items)) => items
            .into_iter()
            .map(decode_truncated_array)
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(wrong_type(
                FIELD,
                "an array in `truncatedArrays`",
                other.element_type(),
            ));
        }
    };
    let disambiguated_paths = take_document(&mut ud, "disambiguatedPaths")?;
    Ok(UpdateDescription {
        updated_fields,
        removed_fields,
        truncated_arrays,
        disambiguated_paths,
    })
}

fn decode_truncated_array(item: Bson) -> Result<TruncatedArray> {
    const FIELD: &str = "updateDescription";
    let Bson::Document(entry) = item else {
        return Err(wrong_type(
            FIELD,
            "documents in `truncatedArrays`",
            item.element_type(),
        ));
    };
    let field = match entry.get("field") {
        Some(Bson::String(s)) => s.clone(),
        _ => {
            return Err(malformed(
                FIELD,
                "has a `truncatedArrays` entry without a string `field`".into(),
            ));
        }
    };
    let new_size = match entry.get("newSize") {
        Some(Bson::Int32(n)) => u32::try_from(*n).ok(),
        Some(Bson::Int64(n)) => u32::try_from(*n).ok(),
        _ => None,
    }
    .ok_or_else(|| {
        malformed(
            FIELD,
            format!("has a bad `newSize` for truncated array `{field}`"),
        )
    })?;
    Ok(TruncatedArray { field, new_size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{Timestamp, doc, oid::ObjectId};

    /// The error is a malformed event naming `field`.
    fn assert_names_field(err: &Error, field: &str) {
        assert!(
            matches!(err, Error::MalformedEvent { field: f, .. } if *f == field),
            "{err}"
        );
    }

    fn insert_doc(id: Bson) -> Document {
        doc! {
            "_id": { "_data": "8265000001000000012B" },
            "operationType": "insert",
            "clusterTime": Timestamp { time: 100, increment: 1 },
            "wallTime": bson::DateTime::from_millis(100_000),
            "ns": { "db": "app", "coll": "users" },
            "documentKey": { "_id": id.clone() },
            "fullDocument": { "_id": id, "name": "ada" },
            "splitEvent": { "fragment": 1, "of": 1 },
        }
    }

    #[test]
    fn decodes_insert_keeping_unknown_fields() {
        let event = ChangeEvent::from_document(&insert_doc(Bson::Int32(7))).unwrap();
        assert_eq!(event.operation_type, OperationType::Insert);
        assert_eq!(event.cluster_time, ClusterTime::new(100, 1));
        assert_eq!(event.ns, Some(Namespace::collection("app", "users")));
        assert_eq!(event.document_id(), Some(Bson::Int32(7)));
        assert_eq!(
            event.full_document().unwrap().get_str("name").unwrap(),
            "ada"
        );
        assert_eq!(
            event.extra().unwrap(),
            doc! { "splitEvent": { "fragment": 1, "of": 1 } }
        );
        assert_eq!(event.token.data(), Some("8265000001000000012B"));
    }

    #[test]
    fn document_keys_of_every_type_survive() {
        let oid = ObjectId::new();
        let cases = [
            (Bson::ObjectId(oid), oid.to_hex()),
            (Bson::String("user-1".into()), "user-1".to_owned()),
            (Bson::Int64(42), "42".to_owned()),
            (
                Bson::Document(doc! { "a": 1, "b": "x" }),
                r#"{"a":1,"b":"x"}"#.to_owned(),
            ),
        ];
        for (id, shown) in cases {
            let event = ChangeEvent::from_document(&insert_doc(id.clone())).unwrap();
            assert_eq!(event.document_id(), Some(id.clone()));
            assert_eq!(event.document_id_string().unwrap(), shown);
        }
    }

    #[test]
    fn raw_decoding_keeps_token_bytes() {
        let doc = insert_doc(Bson::Int32(1));
        let raw = bson::RawDocumentBuf::try_from(&doc).unwrap();
        let event = ChangeEvent::from_raw(&raw).unwrap();
        let id_bytes = bson::RawDocumentBuf::try_from(doc.get_document("_id").unwrap()).unwrap();
        assert_eq!(event.token.as_bytes(), id_bytes.as_bytes());
        assert_eq!(event, ChangeEvent::from_document(&doc).unwrap());
    }

    #[test]
    fn decodes_update_rename_and_transactions() {
        let update = doc! {
            "_id": { "_data": "82" },
            "operationType": "update",
            "clusterTime": Timestamp { time: 5, increment: 2 },
            "ns": { "db": "d", "coll": "c" },
            "documentKey": { "_id": 1 },
            "updateDescription": {
                "updatedFields": { "a.b": 2 },
                "removedFields": ["gone"],
                "truncatedArrays": [ { "field": "arr", "newSize": 3 } ],
            },
            "fullDocument": null,
            "txnNumber": 9_i64,
            "lsid": { "id": 1 },
        };
        let event = ChangeEvent::from_document(&update).unwrap();
        let ud = event.update_description().unwrap().unwrap();
        assert_eq!(ud.updated_fields, doc! { "a.b": 2 });
        assert_eq!(ud.removed_fields, vec!["gone".to_owned()]);
        assert_eq!(
            ud.truncated_arrays,
            vec![TruncatedArray {
                field: "arr".into(),
                new_size: 3
            }]
        );
        assert_eq!(event.full_document(), None);
        assert_eq!(event.txn_number, Some(9));
        assert_eq!(event.lsid().map(|l| l.get_i32("id").unwrap()), Some(1));

        let rename = doc! {
            "_id": { "_data": "83" },
            "operationType": "rename",
            "clusterTime": Timestamp { time: 6, increment: 0 },
            "ns": { "db": "d", "coll": "c" },
            "to": { "db": "d", "coll": "c2" },
        };
        let event = ChangeEvent::from_document(&rename).unwrap();
        assert_eq!(event.to, Some(Namespace::collection("d", "c2")));
        let drop_db = doc! {
            "_id": { "_data": "84" },
            "operationType": "dropDatabase",
            "clusterTime": Timestamp { time: 7, increment: 0 },
            "ns": { "db": "d" },
        };
        assert_eq!(
            ChangeEvent::from_document(&drop_db).unwrap().ns,
            Some(Namespace::database("d"))
        );
    }

    #[test]
    fn malformed_events_name_the_field() {
        let mut doc = insert_doc(Bson::Int32(1));
        doc.remove("clusterTime");
        let err = ChangeEvent::from_document(&doc).unwrap_err();
        assert_names_field(&err, "clusterTime");

        let mut doc = insert_doc(Bson::Int32(1));
        doc.insert("_id", "not a document");
        let err = ChangeEvent::from_document(&doc).unwrap_err();
        assert_names_field(&err, "_id");

        let mut doc = insert_doc(Bson::Int32(1));
        doc.insert("operationType", 3);
        let err = ChangeEvent::from_document(&doc).unwrap_err();
        assert!(err.to_string().contains("operationType"), "{err}");

        let mut doc = insert_doc(Bson::Int32(1));
        doc.insert("ns", doc! { "coll": "x" });
        let err = ChangeEvent::from_document(&doc).unwrap_err();
        assert_names_field(&err, "ns");
    }

    #[test]
    fn images_stay_raw_until_parsed() {
        let mut doc = insert_doc(Bson::Int32(1));
        doc.insert("fullDocumentBeforeChange", doc! { "_id": 1, "name": "bob" });
        let event = ChangeEvent::from_document(&doc).unwrap();
        assert_eq!(
            event.full_document_parsed().unwrap(),
            Some(doc! { "_id": 1, "name": "ada" })
        );
        assert_eq!(
            event.full_document_before_change_parsed().unwrap(),
            Some(doc! { "_id": 1, "name": "bob" })
        );
        doc.insert("fullDocument", Bson::Null);
        let event = ChangeEvent::from_document(&doc).unwrap();
        assert_eq!(event.full_document(), None);
        assert_eq!(event.full_document_parsed().unwrap(), None);
    }

    #[test]
    fn the_event_keeps_the_servers_bytes_and_views_into_them() {
        let doc = insert_doc(Bson::String("k".into()));
        let raw = bson::RawDocumentBuf::try_from(&doc).unwrap();
        let event = ChangeEvent::from_raw_buf(raw.clone()).unwrap();
        assert_eq!(event.raw().unwrap().as_bytes(), raw.as_bytes());
        let key = bson::RawDocumentBuf::try_from(doc.get_document("documentKey").unwrap()).unwrap();
        assert_eq!(event.document_key().unwrap().as_bytes(), key.as_bytes());
        assert_eq!(event.document_id_raw(), Some(bson::RawBsonRef::String("k")));
        assert_eq!(event.full_document_before_change(), None);
        // A clone is equal and its views read its own copy.
        let copy = event.clone();
        drop(event);
        assert_eq!(
            copy.full_document().unwrap().get_str("name").unwrap(),
            "ada"
        );
        // Events built by hand have no bytes and no views.
        let bare = ChangeEvent::new(
            copy.token.clone(),
            OperationType::Insert,
            ClusterTime::new(1, 1),
        );
        assert_eq!(bare.raw(), None);
        assert_eq!(bare.document_key(), None);
        assert_eq!(bare.document_id(), None);
    }

    #[test]
    fn corrupt_bytes_are_typed_errors_naming_the_field() {
        let raw = bson::RawDocumentBuf::try_from(&insert_doc(Bson::Int32(1))).unwrap();
        let mut bytes = raw.into_bytes();
        // Corrupt the length of the string "ada" inside fullDocument: the event still
        // frames, the image does not parse.
        let at = bytes.windows(4).position(|w| w == b"ada\0").unwrap();
        bytes[at - 4] = 0x7f;
        let raw = bson::RawDocument::from_bytes(&bytes).unwrap();
        let event = ChangeEvent::from_raw(raw).unwrap();
        let err = event.full_document_parsed().unwrap_err();
        assert_names_field(&err, "fullDocument");
        // A corrupt top-level element fails the decoding itself.
        let mut bytes = bson::RawDocumentBuf::try_from(&insert_doc(Bson::Int32(1)))
            .unwrap()
            .into_bytes();
        let at = bytes.windows(7).position(|w| w == b"insert\0").unwrap();
        bytes[at - 4] = 0x7f;
        let raw = bson::RawDocument::from_bytes(&bytes).unwrap();
        assert!(matches!(
            ChangeEvent::from_raw(raw),
            Err(Error::MalformedEvent { .. })
        ));
    }

    #[test]
    fn lazy_parts_report_their_own_malformation() {
        let mut doc = insert_doc(Bson::Int32(1));
        doc.insert("operationType", "update");
        doc.insert("updateDescription", doc! { "removedFields": "not a list" });
        let event = ChangeEvent::from_document(&doc).unwrap();
        let err = event.update_description().unwrap_err();
        assert_names_field(&err, "updateDescription");
        // A part of the wrong type at the top level fails the decoding at once.
        doc.insert("updateDescription", "text");
        let err = ChangeEvent::from_document(&doc).unwrap_err();
        assert_names_field(&err, "updateDescription");
        // No unknown fields: an empty `extra`, whatever else the event carries.
        let mut plain = insert_doc(Bson::Int32(1));
        plain.remove("splitEvent");
        let event = ChangeEvent::from_document(&plain).unwrap();
        assert_eq!(event.extra().unwrap(), Document::new());
        assert_eq!(event.update_description().unwrap(), None);
    }

    #[test]
    fn resume_point_carries_no_document() {
        let event = ChangeEvent::from_document(&insert_doc(Bson::Int32(1))).unwrap();
        let point = event.resume_point(bson::DateTime::from_millis(5));
        assert_eq!(point.token, event.token);
        assert_eq!(point.cluster_time, event.cluster_time);
        assert_eq!(point.operation_type, Some(OperationType::Insert));
    }
}
