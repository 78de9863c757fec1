//! The opaque resume token and the cluster time that orders change events.

use std::{fmt, sync::Arc};

use bson::{RawDocument, RawDocumentBuf};
use serde::{Deserialize, Serialize};

/// A change stream resume token: the `_id` document of a change event, or a batch's
/// `postBatchResumeToken`.
///
/// Servers compare tokens exactly, so the token is kept as the raw BSON bytes it arrived as
/// and is handed back byte-for-byte. Its content is opaque: nothing in this workspace reads
/// meaning into it, except [`ResumeToken::cluster_time_hint`], which is a documented,
/// best-effort decoding used only where no better source of time exists.
///
/// Serde: serialized as the document itself (`{ "_data": "8264…" }` in JSON), so stores
/// that keep JSON keep the familiar shape.
///
/// Cloning is cheap (the bytes are shared): every event's token is also held by the
/// checkpointer until the event is acknowledged.
#[derive(Clone)]
pub struct ResumeToken(
    /// The bytes of a well-formed BSON document: every constructor takes them from a
    /// `RawDocument` or checks them, and they are never changed.
    Arc<[u8]>,
);

impl Serialize for ResumeToken {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.as_raw().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ResumeToken {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        RawDocumentBuf::deserialize(deserializer).map(Self::from_raw)
    }
}

/// Tokens are equal when their bytes are: the server compares them exactly.
impl PartialEq for ResumeToken {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for ResumeToken {}

impl std::hash::Hash for ResumeToken {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl ResumeToken {
    /// Wraps a token document exactly as the server sent it.
    pub fn from_raw(raw: RawDocumentBuf) -> Self {
        Self::copied(&raw)
    }

    /// Copies a token document exactly as the server sent it.
    pub fn copied(raw: &RawDocument) -> Self {
        Self(Arc::from(raw.as_bytes()))
    }

    /// A token from bytes framed as a document (length prefix equal to their length, at
    /// least 5, a terminator last: what `RawDocument::from_bytes` checks), as the event
    /// decoder's framing has checked them.
    pub(crate) fn framed(bytes: &[u8]) -> Self {
        Self(Arc::from(bytes))
    }

    /// Parses a token from its BSON bytes.
    ///
    /// # Errors
    /// [`bson::error::Error`] when the bytes are not a well-formed BSON document.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, bson::error::Error> {
        RawDocumentBuf::from_bytes(bytes).map(Self::from_raw)
    }

    /// Builds a token from a parsed document (for tests and for tokens read back from
    /// JSON). The document's field order and types are kept.
    ///
    /// # Errors
    /// [`bson::error::Error`] when the document cannot be encoded as BSON.
    pub fn from_document(doc: &bson::Document) -> Result<Self, bson::error::Error> {
        RawDocumentBuf::try_from(doc).map(Self::from_raw)
    }

    /// The token document, to pass to `resumeAfter` / `startAfter`.
    pub fn as_raw(&self) -> &RawDocument {
        // The bytes were a `RawDocument` when the token was made and never change, so
        // framing them again (length prefix and terminator, the only checks) cannot fail.
        #[allow(clippy::expect_used)]
        RawDocument::from_bytes(&self.0).expect("a token holds the bytes of a BSON document")
    }

    /// The token's BSON bytes, exactly as received.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The token as a parsed document.
    ///
    /// # Errors
    /// [`bson::error::Error`] when the stored bytes hold invalid UTF-8 or similar corruption.
    pub fn to_document(&self) -> Result<bson::Document, bson::error::Error> {
        bson::Document::try_from(self.as_raw())
    }

    /// The `_data` string of a modern (MongoDB 4.2+) token, if the token has one.
    pub fn data(&self) -> Option<&str> {
        self.as_raw().get_str("_data").ok()
    }

    /// For the token of a snapshot row (no `_data`; a `_snapshot` document, as
    /// `cdc-mongo` writes it): the snapshot's identity, chosen when it started and the
    /// same in every token of it after any number of restarts (`_snapshot.id`; tokens
    /// written before identities were kept give their `startTime`), with the collection
    /// and the raw `_id` value (type byte, then its bytes) of the row. Message ids and
    /// dead-letter ids of rows are derived from these only, so a row read again after a
    /// crash keeps its ids.
    pub fn snapshot_row(&self) -> Option<SnapshotRow<'_>> {
        if self.data().is_some() {
            return None;
        }
        let snap = self.as_raw().get_document("_snapshot").ok()?;
        let id = snap
            .get_timestamp("id")
            .or_else(|_| snap.get_timestamp("startTime"))
            .ok()?;
        let coll = snap.get_str("coll").ok()?;
        let after = snap.get("after").ok()??;
        Some(SnapshotRow {
            snapshot: ClusterTime::from(id),
            coll,
            key: after,
        })
    }

    /// Best-effort: the cluster time encoded at the front of a MongoDB 4.2+ `_data` token
    /// (hex of a KeyString whose first value is the timestamp: type byte `0x82`, then the
    /// seconds and increment as big-endian `u32`s).
    ///
    /// This format is internal to the server; the result is used only to date a
    /// post-batch resume token that arrives without an event, never to order events.
    /// Returns `None` when the token does not have that shape.
    pub fn cluster_time_hint(&self) -> Option<ClusterTime> {
        let data = self.data()?;
        let hex = data.get(..18)?;
        if !hex.starts_with("82") {
            return None;
        }
        let time = u32::from_str_radix(hex.get(2..10)?, 16).ok()?;
        let increment = u32::from_str_radix(hex.get(10..18)?, 16).ok()?;
        Some(ClusterTime::new(time, increment))
    }
}

/// What names a snapshot row across restarts: see [`ResumeToken::snapshot_row`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct SnapshotRow<'a> {
    /// The snapshot's identity: the stream's cluster time when it started.
    pub snapshot: ClusterTime,
    /// The collection the row was read from.
    pub coll: &'a str,
    /// The row's `_id`.
    pub key: bson::RawBsonRef<'a>,
}

impl SnapshotRow<'_> {
    /// `snapshot:<time>.<increment>:<coll>:<hex of the _id's type byte and bytes>`: the
    /// same for the row in every run until the snapshot finishes.
    pub fn id(&self) -> String {
        let mut id = format!(
            "snapshot:{}.{}:{}:{:02x}",
            self.snapshot.time,
            self.snapshot.increment,
            self.coll,
            self.key.element_type() as u8
        );
        let mut doc = bson::RawDocumentBuf::new();
        doc.append(bson::cstr!("k"), self.key);
        // The value's bytes: after the 4-byte length, the type byte and "k\0".
        let bytes = doc.as_bytes();
        for b in bytes
            .get(7..bytes.len().saturating_sub(1))
            .unwrap_or_default()
        {
            id.push_str(&format!("{b:02x}"));
        }
        id
    }
}

impl fmt::Debug for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.data() {
            Some(data) => f.debug_tuple("ResumeToken").field(&data).finish(),
            None => f.debug_tuple("ResumeToken").field(&self.as_raw()).finish(),
        }
    }
}

impl fmt::Display for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.data() {
            Some(data) => f.write_str(data),
            None => write!(f, "{} token bytes", self.0.len()),
        }
    }
}

/// A point in the cluster's log: a BSON timestamp (seconds, increment), totally ordered.
///
/// Several events may share one cluster time (the writes of one transaction), so a cluster
/// time alone is not a position to resume from exactly; a [`ResumeToken`] is.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ClusterTime {
    /// Seconds since the Unix epoch.
    pub time: u32,
    /// Orders operations within the same second.
    pub increment: u32,
}

impl ClusterTime {
    /// A cluster time from its two parts.
    pub const fn new(time: u32, increment: u32) -> Self {
        Self { time, increment }
    }

    /// The timestamp as BSON carries it.
    pub const fn to_timestamp(self) -> bson::Timestamp {
        bson::Timestamp {
            time: self.time,
            increment: self.increment,
        }
    }
}

impl From<bson::Timestamp> for ClusterTime {
    fn from(ts: bson::Timestamp) -> Self {
        Self::new(ts.time, ts.increment)
    }
}

impl From<ClusterTime> for bson::Timestamp {
    fn from(ct: ClusterTime) -> Self {
        ct.to_timestamp()
    }
}

impl fmt::Display for ClusterTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({}, {})", self.time, self.increment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{Binary, doc, spec::BinarySubtype};

    #[test]
    fn token_round_trips_bson_bytes_exactly() {
        let doc = doc! { "_data": "8265A1B2C3000000012B022C0100296E5A1004", "extra": 7_i64 };
        let token = ResumeToken::from_document(&doc).unwrap();
        let bytes = token.as_bytes().to_vec();
        let again = ResumeToken::from_bytes(bytes.clone()).unwrap();
        assert_eq!(again.as_bytes(), bytes.as_slice());
        assert_eq!(again, token);
        // Through serde's BSON form, too.
        let wrapped = doc! { "t": bson::serialize_to_bson(&token).unwrap() };
        let back: ResumeToken =
            bson::deserialize_from_bson(wrapped.get("t").unwrap().clone()).unwrap();
        assert_eq!(back.as_bytes(), bytes.as_slice());
    }

    #[test]
    fn token_json_shape_is_data_field() {
        let token = ResumeToken::from_document(&doc! { "_data": "82ABCD" }).unwrap();
        let json = serde_json::to_string(&token).unwrap();
        assert_eq!(json, r#"{"_data":"82ABCD"}"#);
        let back: ResumeToken = serde_json::from_str(&json).unwrap();
        assert_eq!(back.as_bytes(), token.as_bytes());
    }

    #[test]
    fn binary_token_of_old_servers_round_trips() {
        let doc =
            doc! { "_data": Binary { subtype: BinarySubtype::Generic, bytes: vec![1, 2, 3] } };
        let token = ResumeToken::from_document(&doc).unwrap();
        assert_eq!(token.data(), None);
        assert_eq!(token.to_document().unwrap(), doc);
        assert_eq!(token.cluster_time_hint(), None);
    }

    #[test]
    fn cluster_time_hint_reads_keystring_prefix() {
        let token = ResumeToken::from_document(&doc! { "_data": "8265A1B2C30000002A2B0229296E04" })
            .unwrap();
        assert_eq!(
            token.cluster_time_hint(),
            Some(ClusterTime::new(0x65A1_B2C3, 0x2A))
        );
        let short = ResumeToken::from_document(&doc! { "_data": "82AB" }).unwrap();
        assert_eq!(short.cluster_time_hint(), None);
        let other = ResumeToken::from_document(&doc! { "_data": "0165A1B2C30000002A" }).unwrap();
        assert_eq!(other.cluster_time_hint(), None);
    }

    #[test]
    fn cluster_time_orders_by_time_then_increment() {
        let a = ClusterTime::new(10, 5);
        let b = ClusterTime::new(10, 6);
        let c = ClusterTime::new(11, 0);
        assert!(a < b && b < c);
        let ts: bson::Timestamp = b.into();
        assert_eq!(ClusterTime::from(ts), b);
        assert_eq!(b.to_string(), "Timestamp(10, 6)");
    }

    #[test]
    fn bad_bytes_are_an_error() {
        assert!(ResumeToken::from_bytes(vec![1, 2, 3]).is_err());
    }
}
