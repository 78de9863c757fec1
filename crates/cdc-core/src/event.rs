//! Change events, decoded from the server's document without a lossy round trip.

use bson::{Bson, Document, RawBsonRef, RawDocument, RawDocumentBuf};

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
/// Every field the server sends is kept: the known ones typed, the rest in
/// [`ChangeEvent::extra`].
#[derive(Clone, Debug, PartialEq)]
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
    /// The changed document's key: `{ _id: … }` (plus the shard key on sharded clusters),
    /// as the raw BSON the server sent, so every value keeps its exact type and bytes (a
    /// stable key for partitioning). [`ChangeEvent::document_id`] reads the `_id`.
    pub document_key: Option<RawDocumentBuf>,
    /// The document after the change, when the stream asked for it and it exists, as the
    /// raw BSON the server sent: read fields with `get_str` and friends, deserialize with
    /// `bson::deserialize_from_slice(doc.as_bytes())`, or parse it whole with
    /// [`ChangeEvent::full_document_parsed`]. Kept raw so that an event costs one copy of
    /// its bytes, not a tree of allocations, whatever the handler needs of it.
    pub full_document: Option<RawDocumentBuf>,
    /// The document before the change (pre-image), when requested and recorded; raw BSON
    /// like [`ChangeEvent::full_document`].
    pub full_document_before_change: Option<RawDocumentBuf>,
    /// The fields an `update` changed.
    pub update_description: Option<UpdateDescription>,
    /// The transaction number, for changes made in a multi-document transaction.
    pub txn_number: Option<i64>,
    /// The logical session id, for changes made in a transaction.
    pub lsid: Option<Document>,
    /// Top-level fields this version does not interpret, as the server sent them.
    pub extra: Document,
}

impl ChangeEvent {
    /// A minimal event; the other fields start empty. For tests and for sources that build
    /// events themselves.
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
            document_key: None,
            full_document: None,
            full_document_before_change: None,
            update_description: None,
            txn_number: None,
            lsid: None,
            extra: Document::new(),
        }
    }

    /// Decodes an event from the raw document the server sent, in one pass over its bytes.
    /// The token keeps the exact bytes of `_id`; the post- and pre-image are copied as raw
    /// BSON, without parsing them.
    ///
    /// # Errors
    /// [`Error::MalformedEvent`] naming the field when `_id`, `operationType` or
    /// `clusterTime` is missing, a field has the wrong BSON type, or the bytes are not
    /// valid BSON.
    pub fn from_raw(raw: &RawDocument) -> Result<Self> {
        let mut token = None;
        let mut operation_type = None;
        let mut cluster_time = None;
        let mut rest = Fields::default();
        for element in raw {
            let (key, value) = element.map_err(|e| malformed("(document)", e.to_string()))?;
            match key.as_str() {
                "_id" => match value {
                    RawBsonRef::Document(id) => token = Some(ResumeToken::from_raw(id.to_owned())),
                    other => return Err(raw_type("_id", "a document", &other)),
                },
                "operationType" => match value {
                    RawBsonRef::String(s) => operation_type = Some(OperationType::parse(s)),
                    other => return Err(raw_type("operationType", "a string", &other)),
                },
                "clusterTime" => match value {
                    RawBsonRef::Timestamp(ts) => cluster_time = Some(ClusterTime::from(ts)),
                    other => return Err(raw_type("clusterTime", "a timestamp", &other)),
                },
                other => rest.take(other, value)?,
            }
        }
        let token = token.ok_or_else(|| malformed("_id", "is missing".into()))?;
        let operation_type =
            operation_type.ok_or_else(|| malformed("operationType", "is missing".into()))?;
        let cluster_time =
            cluster_time.ok_or_else(|| malformed("clusterTime", "is missing".into()))?;
        let mut event = Self::new(token, operation_type, cluster_time);
        rest.fill(&mut event);
        Ok(event)
    }

    /// Decodes an event from a parsed document (by encoding it to BSON first: prefer
    /// [`ChangeEvent::from_raw`] where the bytes are at hand).
    ///
    /// # Errors
    /// As [`ChangeEvent::from_raw`].
    pub fn from_document(doc: &Document) -> Result<Self> {
        let raw =
            RawDocumentBuf::try_from(doc).map_err(|e| malformed("(document)", e.to_string()))?;
        Self::from_raw(&raw)
    }

    /// The post-image parsed into a [`Document`].
    ///
    /// # Errors
    /// [`Error::MalformedEvent`] when its bytes are not valid BSON.
    pub fn full_document_parsed(&self) -> Result<Option<Document>> {
        parse_image("fullDocument", self.full_document.as_deref())
    }

    /// The pre-image parsed into a [`Document`].
    ///
    /// # Errors
    /// [`Error::MalformedEvent`] when its bytes are not valid BSON.
    pub fn full_document_before_change_parsed(&self) -> Result<Option<Document>> {
        parse_image(
            "fullDocumentBeforeChange",
            self.full_document_before_change.as_deref(),
        )
    }

    /// The changed document's `_id`, borrowed from the raw key: `None` when the event has
    /// no key, the key no `_id`, or its bytes do not parse.
    pub fn document_id_raw(&self) -> Option<RawBsonRef<'_>> {
        self.document_key.as_ref()?.get("_id").ok().flatten()
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
        ResumePoint {
            token: self.token.clone(),
            cluster_time: self.cluster_time,
            operation_type: Some(self.operation_type.clone()),
            saved_at,
        }
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
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

/// The optional fields of an event, gathered in the decoding pass.
#[derive(Default)]
struct Fields {
    wall_time: Option<bson::DateTime>,
    ns: Option<Namespace>,
    to: Option<Namespace>,
    document_key: Option<RawDocumentBuf>,
    full_document: Option<RawDocumentBuf>,
    full_document_before_change: Option<RawDocumentBuf>,
    update_description: Option<UpdateDescription>,
    txn_number: Option<i64>,
    lsid: Option<Document>,
    extra: Document,
}

impl Fields {
    fn take(&mut self, key: &str, value: RawBsonRef<'_>) -> Result<()> {
        match key {
            "wallTime" => {
                self.wall_time = match value {
                    RawBsonRef::DateTime(dt) => Some(dt),
                    RawBsonRef::Null => None,
                    other => return Err(raw_type("wallTime", "a date", &other)),
                }
            }
            "ns" => self.ns = raw_namespace("ns", value)?,
            "to" => self.to = raw_namespace("to", value)?,
            "documentKey" => {
                self.document_key = raw_subdocument("documentKey", value)?.map(ToOwned::to_owned);
            }
            "fullDocument" => {
                self.full_document = raw_subdocument("fullDocument", value)?.map(ToOwned::to_owned);
            }
            "fullDocumentBeforeChange" => {
                self.full_document_before_change =
                    raw_subdocument("fullDocumentBeforeChange", value)?.map(ToOwned::to_owned);
            }
            "updateDescription" => {
                self.update_description = match raw_subdocument("updateDescription", value)? {
                    Some(ud) => Some(decode_update_description(parsed(ud)?)?),
                    None => None,
                };
            }
            "txnNumber" => {
                self.txn_number = match value {
                    RawBsonRef::Null => None,
                    RawBsonRef::Int64(n) => Some(n),
                    RawBsonRef::Int32(n) => Some(i64::from(n)),
                    other => return Err(raw_type("txnNumber", "an integer", &other)),
                }
            }
            "lsid" => self.lsid = raw_subdocument("lsid", value)?.map(parsed).transpose()?,
            other => {
                let value =
                    Bson::try_from(value).map_err(|e| malformed("(document)", e.to_string()))?;
                self.extra.insert(other, value);
            }
        }
        Ok(())
    }

    fn fill(self, event: &mut ChangeEvent) {
        event.wall_time = self.wall_time;
        event.ns = self.ns;
        event.to = self.to;
        event.document_key = self.document_key;
        event.full_document = self.full_document;
        event.full_document_before_change = self.full_document_before_change;
        event.update_description = self.update_description;
        event.txn_number = self.txn_number;
        event.lsid = self.lsid;
        event.extra = self.extra;
    }
}

fn malformed(field: &'static str, problem: String) -> Error {
    Error::MalformedEvent { field, problem }
}

fn wrong_type(field: &'static str, expected: &str, got: &Bson) -> Error {
    malformed(
        field,
        format!("should be {expected}, is a {:?}", got.element_type()),
    )
}

fn raw_type(field: &'static str, expected: &str, got: &RawBsonRef<'_>) -> Error {
    malformed(
        field,
        format!("should be {expected}, is a {:?}", got.element_type()),
    )
}

/// A sub-document field, or `None` when it is `null`.
fn raw_subdocument<'a>(
    field: &'static str,
    value: RawBsonRef<'a>,
) -> Result<Option<&'a RawDocument>> {
    match value {
        RawBsonRef::Document(d) => Ok(Some(d)),
        RawBsonRef::Null => Ok(None),
        other => Err(raw_type(field, "a document", &other)),
    }
}

fn parsed(raw: &RawDocument) -> Result<Document> {
    Document::try_from(raw).map_err(|e| malformed("(document)", e.to_string()))
}

fn parse_image(field: &'static str, raw: Option<&RawDocument>) -> Result<Option<Document>> {
    raw.map(|d| Document::try_from(d).map_err(|e| malformed(field, e.to_string())))
        .transpose()
}

fn raw_namespace(field: &'static str, value: RawBsonRef<'_>) -> Result<Option<Namespace>> {
    let Some(ns) = raw_subdocument(field, value)? else {
        return Ok(None);
    };
    let get = |key: &str| ns.get(key).map_err(|e| malformed(field, e.to_string()));
    let db = match get("db")? {
        Some(RawBsonRef::String(db)) => db.to_owned(),
        Some(other) => return Err(raw_type(field, "a namespace with a string `db`", &other)),
        None => return Err(malformed(field, "has no `db`".into())),
    };
    let coll = match get("coll")? {
        Some(RawBsonRef::String(coll)) => Some(coll.to_owned()),
        None | Some(RawBsonRef::Null) => None,
        Some(other) => return Err(raw_type(field, "a namespace with a string `coll`", &other)),
    };
    Ok(Some(Namespace { db, coll }))
}

fn take_document(doc: &mut Document, field: &'static str) -> Result<Option<Document>> {
    match doc.remove(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Document(d)) => Ok(Some(d)),
        Some(other) => Err(wrong_type(field, "a document", &other)),
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
                    &other,
                )),
            })
            .collect::<Result<_>>()?,
        Some(other) => return Err(wrong_type(FIELD, "an array in `removedFields`", &other)),
    };
    let truncated_arrays = match ud.remove("truncatedArrays") {
        None | Some(Bson::Null) => Vec::new(),
        Some(Bson::Array(items)) => items
            .into_iter()
            .map(decode_truncated_array)
            .collect::<Result<_>>()?,
        Some(other) => return Err(wrong_type(FIELD, "an array in `truncatedArrays`", &other)),
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
        return Err(wrong_type(FIELD, "documents in `truncatedArrays`", &item));
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
            event
                .full_document
                .as_ref()
                .unwrap()
                .get_str("name")
                .unwrap(),
            "ada"
        );
        assert_eq!(
            event.extra,
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
        let ud = event.update_description.unwrap();
        assert_eq!(ud.updated_fields, doc! { "a.b": 2 });
        assert_eq!(ud.removed_fields, vec!["gone".to_owned()]);
        assert_eq!(
            ud.truncated_arrays,
            vec![TruncatedArray {
                field: "arr".into(),
                new_size: 3
            }]
        );
        assert_eq!(event.full_document, None);
        assert_eq!(event.txn_number, Some(9));
        assert_eq!(event.lsid, Some(doc! { "id": 1 }));

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
        assert!(
            matches!(
                err,
                Error::MalformedEvent {
                    field: "clusterTime",
                    ..
                }
            ),
            "{err}"
        );

        let mut doc = insert_doc(Bson::Int32(1));
        doc.insert("_id", "not a document");
        let err = ChangeEvent::from_document(&doc).unwrap_err();
        assert!(
            matches!(err, Error::MalformedEvent { field: "_id", .. }),
            "{err}"
        );

        let mut doc = insert_doc(Bson::Int32(1));
        doc.insert("operationType", 3);
        let err = ChangeEvent::from_document(&doc).unwrap_err();
        assert!(err.to_string().contains("operationType"), "{err}");

        let mut doc = insert_doc(Bson::Int32(1));
        doc.insert("ns", doc! { "coll": "x" });
        let err = ChangeEvent::from_document(&doc).unwrap_err();
        assert!(
            matches!(err, Error::MalformedEvent { field: "ns", .. }),
            "{err}"
        );
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
        assert_eq!(event.full_document, None);
        assert_eq!(event.full_document_parsed().unwrap(), None);
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
        assert!(
            matches!(
                err,
                Error::MalformedEvent {
                    field: "fullDocument",
                    ..
                }
            ),
            "{err}"
        );
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
    fn resume_point_carries_no_document() {
        let event = ChangeEvent::from_document(&insert_doc(Bson::Int32(1))).unwrap();
        let point = event.resume_point(bson::DateTime::from_millis(5));
        assert_eq!(point.token, event.token);
        assert_eq!(point.cluster_time, event.cluster_time);
        assert_eq!(point.operation_type, Some(OperationType::Insert));
    }
}
