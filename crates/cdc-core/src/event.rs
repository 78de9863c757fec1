//! Change events, decoded from the server's document without a lossy round trip.

use bson::{Bson, Document, RawDocument};

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
    /// with every value kept as the BSON it is.
    pub document_key: Option<Document>,
    /// The document after the change, when the stream asked for it and it exists.
    pub full_document: Option<Document>,
    /// The document before the change (pre-image), when requested and recorded.
    pub full_document_before_change: Option<Document>,
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

    /// Decodes an event from the raw document the server sent. The token keeps the exact
    /// bytes of `_id`.
    ///
    /// # Errors
    /// [`Error::MalformedEvent`] naming the field when `_id`, `operationType` or
    /// `clusterTime` is missing or a field has the wrong BSON type.
    pub fn from_raw(raw: &RawDocument) -> Result<Self> {
        let token = match raw.get("_id") {
            Ok(Some(bson::RawBsonRef::Document(id))) => ResumeToken::from_raw(id.to_owned()),
            Ok(Some(other)) => {
                return Err(malformed(
                    "_id",
                    format!("is a {:?}, not a document", other.element_type()),
                ));
            }
            Ok(None) => return Err(malformed("_id", "is missing".into())),
            Err(e) => return Err(malformed("_id", e.to_string())),
        };
        let doc = Document::try_from(raw).map_err(|e| malformed("(document)", e.to_string()))?;
        Self::decode(token, doc)
    }

    /// Decodes an event from a parsed document.
    ///
    /// # Errors
    /// As [`ChangeEvent::from_raw`].
    pub fn from_document(doc: Document) -> Result<Self> {
        let token = match doc.get("_id") {
            Some(Bson::Document(id)) => {
                ResumeToken::from_document(id).map_err(|e| malformed("_id", e.to_string()))?
            }
            Some(other) => {
                return Err(malformed(
                    "_id",
                    format!("is a {:?}, not a document", other.element_type()),
                ));
            }
            None => return Err(malformed("_id", "is missing".into())),
        };
        Self::decode(token, doc)
    }

    fn decode(token: ResumeToken, mut doc: Document) -> Result<Self> {
        doc.remove("_id");
        let operation_type = match doc.remove("operationType") {
            Some(Bson::String(s)) => OperationType::parse(&s),
            Some(other) => return Err(wrong_type("operationType", "a string", &other)),
            None => return Err(malformed("operationType", "is missing".into())),
        };
        let cluster_time = match doc.remove("clusterTime") {
            Some(Bson::Timestamp(ts)) => ClusterTime::from(ts),
            Some(other) => return Err(wrong_type("clusterTime", "a timestamp", &other)),
            None => return Err(malformed("clusterTime", "is missing".into())),
        };
        let mut event = Self::new(token, operation_type, cluster_time);
        event.wall_time = match doc.remove("wallTime") {
            Some(Bson::DateTime(dt)) => Some(dt),
            None | Some(Bson::Null) => None,
            Some(other) => return Err(wrong_type("wallTime", "a date", &other)),
        };
        event.ns = take_namespace(&mut doc, "ns")?;
        event.to = take_namespace(&mut doc, "to")?;
        event.document_key = take_document(&mut doc, "documentKey")?;
        event.full_document = take_document(&mut doc, "fullDocument")?;
        event.full_document_before_change = take_document(&mut doc, "fullDocumentBeforeChange")?;
        event.update_description = match take_document(&mut doc, "updateDescription")? {
            Some(ud) => Some(decode_update_description(ud)?),
            None => None,
        };
        event.txn_number = match doc.remove("txnNumber") {
            None | Some(Bson::Null) => None,
            Some(Bson::Int64(n)) => Some(n),
            Some(Bson::Int32(n)) => Some(i64::from(n)),
            Some(other) => return Err(wrong_type("txnNumber", "an integer", &other)),
        };
        event.lsid = take_document(&mut doc, "lsid")?;
        event.extra = doc;
        Ok(event)
    }

    /// The changed document's `_id`, as the BSON value it is.
    pub fn document_id(&self) -> Option<&Bson> {
        self.document_key.as_ref().and_then(|key| key.get("_id"))
    }

    /// The changed document's `_id` as text, for logs and for keys in other systems:
    /// a string as itself, an ObjectId as its hex, numbers in decimal, anything else as
    /// relaxed Extended JSON. Distinct ids of different types may print alike (`"1"` and
    /// `1`); use [`ChangeEvent::document_id`] where that matters.
    pub fn document_id_string(&self) -> Option<String> {
        self.document_id().map(bson_display)
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

fn malformed(field: &'static str, problem: String) -> Error {
    Error::MalformedEvent { field, problem }
}

fn wrong_type(field: &'static str, expected: &str, got: &Bson) -> Error {
    malformed(
        field,
        format!("should be {expected}, is a {:?}", got.element_type()),
    )
}

fn take_document(doc: &mut Document, field: &'static str) -> Result<Option<Document>> {
    match doc.remove(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Document(d)) => Ok(Some(d)),
        Some(other) => Err(wrong_type(field, "a document", &other)),
    }
}

fn take_namespace(doc: &mut Document, field: &'static str) -> Result<Option<Namespace>> {
    let Some(ns) = take_document(doc, field)? else {
        return Ok(None);
    };
    let db = match ns.get("db") {
        Some(Bson::String(db)) => db.clone(),
        Some(other) => return Err(wrong_type(field, "a namespace with a string `db`", other)),
        None => return Err(malformed(field, "has no `db`".into())),
    };
    let coll = match ns.get("coll") {
        Some(Bson::String(coll)) => Some(coll.clone()),
        None | Some(Bson::Null) => None,
        Some(other) => return Err(wrong_type(field, "a namespace with a string `coll`", other)),
    };
    Ok(Some(Namespace { db, coll }))
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
        let event = ChangeEvent::from_document(insert_doc(Bson::Int32(7))).unwrap();
        assert_eq!(event.operation_type, OperationType::Insert);
        assert_eq!(event.cluster_time, ClusterTime::new(100, 1));
        assert_eq!(event.ns, Some(Namespace::collection("app", "users")));
        assert_eq!(event.document_id(), Some(&Bson::Int32(7)));
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
            let event = ChangeEvent::from_document(insert_doc(id.clone())).unwrap();
            assert_eq!(event.document_id(), Some(&id));
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
        assert_eq!(event, ChangeEvent::from_document(doc).unwrap());
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
        let event = ChangeEvent::from_document(update).unwrap();
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
        let event = ChangeEvent::from_document(rename).unwrap();
        assert_eq!(event.to, Some(Namespace::collection("d", "c2")));
        let drop_db = doc! {
            "_id": { "_data": "84" },
            "operationType": "dropDatabase",
            "clusterTime": Timestamp { time: 7, increment: 0 },
            "ns": { "db": "d" },
        };
        assert_eq!(
            ChangeEvent::from_document(drop_db).unwrap().ns,
            Some(Namespace::database("d"))
        );
    }

    #[test]
    fn malformed_events_name_the_field() {
        let mut doc = insert_doc(Bson::Int32(1));
        doc.remove("clusterTime");
        let err = ChangeEvent::from_document(doc).unwrap_err();
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
        let err = ChangeEvent::from_document(doc).unwrap_err();
        assert!(
            matches!(err, Error::MalformedEvent { field: "_id", .. }),
            "{err}"
        );

        let mut doc = insert_doc(Bson::Int32(1));
        doc.insert("operationType", 3);
        let err = ChangeEvent::from_document(doc).unwrap_err();
        assert!(err.to_string().contains("operationType"), "{err}");

        let mut doc = insert_doc(Bson::Int32(1));
        doc.insert("ns", doc! { "coll": "x" });
        let err = ChangeEvent::from_document(doc).unwrap_err();
        assert!(
            matches!(err, Error::MalformedEvent { field: "ns", .. }),
            "{err}"
        );
    }

    #[test]
    fn resume_point_carries_no_document() {
        let event = ChangeEvent::from_document(insert_doc(Bson::Int32(1))).unwrap();
        let point = event.resume_point(bson::DateTime::from_millis(5));
        assert_eq!(point.token, event.token);
        assert_eq!(point.cluster_time, event.cluster_time);
        assert_eq!(point.operation_type, Some(OperationType::Insert));
    }
}
