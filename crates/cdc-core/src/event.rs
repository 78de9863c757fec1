//! Change events, decoded from the server's document without a lossy round trip.

use bson::{Bson, Document, RawBsonRef, RawDocument, RawDocumentBuf, spec::ElementType};

use crate::{
    ClusterTime, Error, Name, Namespace, OperationType, Result, ResumePoint, ResumeToken,
    frame::{self, Element},
};

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

/// Where a sub-document lies in an event's raw bytes (offsets fit 32 bits: a document's
/// length is an `i32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// The span of `sub`, bytes borrowed from `base`.
    fn of(base: &RawDocument, sub: &[u8]) -> Self {
        // Both point into the same buffer (`sub` was read out of `base`); were they not,
        // the span would be nonsense and `ChangeEvent::view` would find nothing: no panic.
        let start = (sub.as_ptr() as usize).wrapping_sub(base.as_bytes().as_ptr() as usize);
        let end = start.wrapping_add(sub.len());
        Self {
            start: u32::try_from(start).unwrap_or(u32::MAX),
            end: u32::try_from(end).unwrap_or(u32::MAX),
        }
    }
}

/// A top-level field decoded eagerly or read through a view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Id,
    OperationType,
    ClusterTime,
    WallTime,
    Ns,
    To,
    DocumentKey,
    FullDocument,
    FullDocumentBeforeChange,
    UpdateDescription,
    TxnNumber,
    Lsid,
}

impl Field {
    /// The field a key names; `None` for the fields this version does not interpret
    /// ("extra").
    fn of(key: &[u8]) -> Option<Self> {
        // By length first, then one comparison of fixed-size arrays (a few integer
        // comparisons, no call): this runs for every top-level field of every event.
        fn is<const N: usize>(key: &[u8], name: &[u8; N]) -> bool {
            <&[u8; N]>::try_from(key).is_ok_and(|key| key == name)
        }
        let field = match key.len() {
            2 if is(key, b"ns") => Self::Ns,
            2 if is(key, b"to") => Self::To,
            3 if is(key, b"_id") => Self::Id,
            4 if is(key, b"lsid") => Self::Lsid,
            8 if is(key, b"wallTime") => Self::WallTime,
            9 if is(key, b"txnNumber") => Self::TxnNumber,
            11 if is(key, b"clusterTime") => Self::ClusterTime,
            11 if is(key, b"documentKey") => Self::DocumentKey,
            12 if is(key, b"fullDocument") => Self::FullDocument,
            13 if is(key, b"operationType") => Self::OperationType,
            17 if is(key, b"updateDescription") => Self::UpdateDescription,
            24 if is(key, b"fullDocumentBeforeChange") => Self::FullDocumentBeforeChange,
            _ => return None,
        };
        Some(field)
    }

    /// Its name, as errors give it.
    fn name(self) -> &'static str {
        match self {
            Self::Id => "_id",
            Self::OperationType => "operationType",
            Self::ClusterTime => "clusterTime",
            Self::WallTime => "wallTime",
            Self::Ns => "ns",
            Self::To => "to",
            Self::DocumentKey => "documentKey",
            Self::FullDocument => "fullDocument",
            Self::FullDocumentBeforeChange => "fullDocumentBeforeChange",
            Self::UpdateDescription => "updateDescription",
            Self::TxnNumber => "txnNumber",
            Self::Lsid => "lsid",
        }
    }
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
    /// top-level fields, keeping the buffer. (A stream's events decode with an
    /// [`EventDecoder`], which shares their namespace's names.)
    ///
    /// # Errors
    /// [`Error::MalformedEvent`] naming the field when `_id`, `operationType` or
    /// `clusterTime` is missing, a top-level field has the wrong BSON type, or the bytes
    /// do not frame as BSON. The insides of the key, images, update description and
    /// session id are checked when they are read.
    pub fn from_raw_buf(raw: RawDocumentBuf) -> Result<Self> {
        EventDecoder::default().decode(raw)
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
        let (start, end) = (span.start as usize, span.end as usize);
        let bytes = self.raw.as_bytes().get(start..end)?;
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
            if Field::of(key.as_str().as_bytes()).is_none() {
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

/// Decodes the events of one stream ([`ChangeEvent::from_raw_buf`] for each), sharing
/// what consecutive events repeat: events of the namespace decoded last share its
/// [`crate::Name`]s instead of allocating their own, so decoding an event allocates only
/// its token.
#[derive(Debug, Default)]
pub struct EventDecoder {
    /// The raw `ns` decoded last, and what it decoded to.
    last_ns: Vec<u8>,
    ns: Option<Namespace>,
}

impl EventDecoder {
    /// A decoder that has seen no event yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes `raw` (see [`ChangeEvent::from_raw_buf`]).
    ///
    /// # Errors
    /// As [`ChangeEvent::from_raw_buf`].
    pub fn decode(&mut self, raw: RawDocumentBuf) -> Result<ChangeEvent> {
        let mut token = None;
        let mut operation_type = None;
        let mut cluster_time = None;
        let mut header = Header::default();
        let mut views = Views::default();
        for element in frame::elements(&raw) {
            let element = element.map_err(|e| malformed("(document)", e.to_string()))?;
            let Some(field) = Field::of(element.key) else {
                element
                    .key_str()
                    .map_err(|e| malformed("(document)", e.to_string()))?;
                views.has_extra = true;
                continue;
            };
            let name = field.name();
            let span = |e: &Element<'_>| -> Result<Option<Span>> {
                match (e.kind, e.document_bytes()) {
                    (ElementType::Null, _) => Ok(None),
                    (_, Some(bytes)) => Ok(Some(Span::of(&raw, bytes))),
                    (kind, None) => Err(wrong_type(name, "a document", kind)),
                }
            };
            match field {
                Field::Id => match element.document_bytes() {
                    Some(id) => token = Some(ResumeToken::framed(id)),
                    None => return Err(wrong_type(name, "a document", element.kind)),
                },
                Field::OperationType => {
                    let known = element.string_bytes().and_then(OperationType::known);
                    operation_type = Some(match known {
                        Some(known) => known,
                        None => OperationType::parse(text(name, &element)?),
                    });
                }
                Field::ClusterTime => match element.timestamp() {
                    Some(ts) => cluster_time = Some(ClusterTime::from(ts)),
                    None => return Err(wrong_type(name, "a timestamp", element.kind)),
                },
                Field::DocumentKey => views.document_key = span(&element)?,
                Field::FullDocument => views.full_document = span(&element)?,
                Field::FullDocumentBeforeChange => {
                    views.full_document_before_change = span(&element)?;
                }
                Field::UpdateDescription => views.update_description = span(&element)?,
                Field::Lsid => views.lsid = span(&element)?,
                Field::Ns => header.ns = self.namespace(&element)?,
                Field::To => header.to = namespace(name, &element)?,
                Field::WallTime => {
                    header.wall_time = match element.kind {
                        ElementType::Null => None,
                        _ => Some(
                            element
                                .date()
                                .ok_or_else(|| wrong_type(name, "a date", element.kind))?,
                        ),
                    }
                }
                Field::TxnNumber => {
                    header.txn_number = match element.kind {
                        ElementType::Null => None,
                        _ => Some(
                            element
                                .i64()
                                .or_else(|| element.i32().map(i64::from))
                                .ok_or_else(|| wrong_type(name, "an integer", element.kind))?,
                        ),
                    }
                }
            }
        }
        let token = token.ok_or_else(|| malformed("_id", "is missing".into()))?;
        let operation_type =
            operation_type.ok_or_else(|| malformed("operationType", "is missing".into()))?;
        let cluster_time =
            cluster_time.ok_or_else(|| malformed("clusterTime", "is missing".into()))?;
        Ok(ChangeEvent {
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

    /// The `ns` field: the one decoded last when its bytes are the same.
    fn namespace(&mut self, element: &Element<'_>) -> Result<Option<Namespace>> {
        if self.ns.is_some() && element.value == self.last_ns.as_slice() {
            return Ok(self.ns.clone());
        }
        let ns = namespace("ns", element)?;
        if ns.is_some() {
            self.last_ns.clear();
            self.last_ns.extend_from_slice(element.value);
            self.ns.clone_from(&ns);
        }
        Ok(ns)
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
fn document_or_null<'a>(
    field: &'static str,
    element: &Element<'a>,
) -> Result<Option<&'a RawDocument>> {
    match element.kind {
        ElementType::Null => Ok(None),
        _ => element
            .document()
            .map(Some)
            .ok_or_else(|| wrong_type(field, "a document", element.kind)),
    }
}

/// A string field's text.
fn text<'a>(field: &'static str, element: &Element<'a>) -> Result<&'a str> {
    element.string().ok_or_else(|| match element.kind {
        ElementType::String => malformed(field, "is not valid UTF-8".into()),
        kind => wrong_type(field, "a string", kind),
    })
}

fn parse_part(field: &'static str, raw: Option<&RawDocument>) -> Result<Option<Document>> {
    raw.map(|d| Document::try_from(d).map_err(|e| malformed(field, e.to_string())))
        .transpose()
}

fn namespace(field: &'static str, element: &Element<'_>) -> Result<Option<Namespace>> {
    let Some(ns) = document_or_null(field, element)? else {
        return Ok(None);
    };
    let part = |e: &Element<'_>, name: &str| -> Result<Name> {
        match e.string() {
            Some(s) => Ok(Name::from(s)),
            None if e.kind == ElementType::String => {
                Err(malformed(field, format!("`{name}` is not valid UTF-8")))
            }
            None => Err(wrong_type(
                field,
                &format!("a namespace with a string `{name}`"),
                e.kind,
            )),
        }
    };
    let mut db = None;
    let mut coll = None;
    for e in frame::elements(ns) {
        let e = e.map_err(|e| malformed(field, e.to_string()))?;
        match e.key {
            b"db" => db = Some(part(&e, "db")?),
            b"coll" if e.kind == ElementType::Null => coll = None,
            b"coll" => coll = Some(part(&e, "coll")?),
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

    #[test]
    fn a_decoder_shares_the_names_of_a_namespace_it_saw_last() {
        let mut decoder = EventDecoder::new();
        let at = |ns: Document| {
            let mut doc = insert_doc(Bson::Int32(1));
            doc.insert("ns", ns);
            bson::RawDocumentBuf::try_from(&doc).unwrap()
        };
        let first = decoder
            .decode(at(doc! { "db": "app", "coll": "users" }))
            .unwrap();
        let second = decoder
            .decode(at(doc! { "db": "app", "coll": "users" }))
            .unwrap();
        let (a, b) = (first.ns.unwrap(), second.ns.unwrap());
        assert_eq!(a, Namespace::collection("app", "users"));
        assert!(a.db.shares(&b.db) && a.coll.unwrap().shares(&b.coll.unwrap()));
        // Another namespace is decoded, not taken from what was seen before.
        let other = decoder
            .decode(at(doc! { "db": "app", "coll": "orders" }))
            .unwrap();
        assert_eq!(other.ns, Some(Namespace::collection("app", "orders")));
        let db_level = decoder.decode(at(doc! { "db": "app" })).unwrap();
        assert_eq!(db_level.ns, Some(Namespace::database("app")));
        // A bad namespace is refused even right after a good one.
        let err = decoder
            .decode(at(doc! { "db": 5, "coll": "orders" }))
            .unwrap_err();
        assert_names_field(&err, "ns");
        let err = decoder.decode(at(doc! { "coll": "orders" })).unwrap_err();
        assert_names_field(&err, "ns");
        // Names read as strings.
        assert!(other.ns.unwrap().coll.unwrap() == "orders");
    }

    #[test]
    fn keys_that_are_not_utf8_are_refused() {
        let doc = insert_doc(Bson::Int32(1));
        let mut bytes = bson::RawDocumentBuf::try_from(&doc).unwrap().into_bytes();
        // An unknown top-level key with a byte that is not UTF-8.
        let mut extra = bson::RawDocumentBuf::new();
        extra.append(bson::cstr!("zz"), 1_i32);
        let element = &extra.as_bytes()[4..extra.as_bytes().len() - 1];
        let mut element = element.to_vec();
        element[1] = 0xff;
        bytes.pop();
        bytes.extend_from_slice(&element);
        bytes.push(0);
        let len = i32::try_from(bytes.len()).unwrap();
        bytes[..4].copy_from_slice(&len.to_le_bytes());
        let raw = bson::RawDocumentBuf::from_bytes(bytes).unwrap();
        assert!(matches!(
            ChangeEvent::from_raw_buf(raw),
            Err(Error::MalformedEvent {
                field: "(document)",
                ..
            })
        ));
    }

    #[test]
    fn every_field_is_known_by_its_exact_name_only() {
        let all = [
            Field::Id,
            Field::OperationType,
            Field::ClusterTime,
            Field::WallTime,
            Field::Ns,
            Field::To,
            Field::DocumentKey,
            Field::FullDocument,
            Field::FullDocumentBeforeChange,
            Field::UpdateDescription,
            Field::TxnNumber,
            Field::Lsid,
        ];
        for field in all {
            assert_eq!(Field::of(field.name().as_bytes()), Some(field));
            // The same length, one byte changed: not a known field.
            let mut near = field.name().as_bytes().to_vec();
            near[1] ^= 0x20;
            assert_eq!(Field::of(&near), None, "{near:?}");
        }
        for other in [
            "",
            "n",
            "t",
            "id",
            "splitEvent",
            "clusterTimes",
            "collectionUUID",
        ] {
            assert_eq!(Field::of(other.as_bytes()), None, "{other}");
        }
    }
}
