//! Where a snapshot is: the stream's position taken before it, the collection and the last
//! `_id` handed over, carried in the tokens of what it hands over.

use bson::{Bson, Document, RawBsonRef};
use cdc_core::{ClusterTime, ResumeToken, StartPosition};

/// The position of a snapshot: where the stream continues, and the last `_id` read.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SnapshotPosition {
    /// Where the stream continues: the token taken before the reading began, or the last
    /// stream position handed over since.
    pub(crate) start: ResumeToken,
    /// The cluster time of `start`.
    pub(crate) start_time: ClusterTime,
    /// The snapshot's identity: the stream's cluster time when it started, kept in every
    /// token until it finishes (message and dead-letter ids of rows derive from it).
    pub(crate) id: ClusterTime,
    pub(crate) coll: String,
    /// The last `_id` handed over; `None` before the first.
    pub(crate) after: Option<Bson>,
    /// For a snapshot requested while streaming: which documents (`None`: an initial
    /// snapshot, of every document).
    pub(crate) filter: Option<Document>,
    /// Only the collection `coll` (of a database source), not every collection after it.
    pub(crate) single: bool,
}

const FIELD: &str = "_snapshot";

impl SnapshotPosition {
    /// The snapshot position a stored token holds, if it is one.
    pub(crate) fn of(position: &StartPosition) -> Option<cdc_core::Result<Self>> {
        let token = position.token()?;
        let raw = token.as_raw();
        let Ok(Some(RawBsonRef::Document(snap))) = raw.get(FIELD) else {
            return None;
        };
        Some(Self::decode(snap))
    }

    fn decode(snap: &bson::RawDocument) -> cdc_core::Result<Self> {
        let bad = |what: &str| cdc_core::Error::MalformedEvent {
            field: "_id._snapshot",
            problem: what.to_owned(),
        };
        let start = match snap.get("start") {
            Ok(Some(RawBsonRef::Document(d))) => ResumeToken::copied(d),
            _ => return Err(bad("no `start` token")),
        };
        let start_time = match snap.get("startTime") {
            Ok(Some(RawBsonRef::Timestamp(ts))) => ClusterTime::from(ts),
            _ => return Err(bad("no `startTime`")),
        };
        // Tokens written before snapshots had an identity carry none: their start stands in.
        let id = match snap.get("id") {
            Ok(Some(RawBsonRef::Timestamp(ts))) => ClusterTime::from(ts),
            Ok(None) => start_time,
            _ => return Err(bad("`id` is not a timestamp")),
        };
        let coll = match snap.get("coll") {
            Ok(Some(RawBsonRef::String(s))) => s.to_owned(),
            _ => return Err(bad("no `coll`")),
        };
        let after = match snap.get("after") {
            Ok(Some(v)) => Some(Bson::try_from(v).map_err(|e| bad(&e.to_string()))?),
            Ok(None) => None,
            Err(e) => return Err(bad(&e.to_string())),
        };
        let filter = match snap.get("filter") {
            Ok(Some(RawBsonRef::Document(d))) => {
                Some(Document::try_from(d).map_err(|e| bad(&e.to_string()))?)
            }
            Ok(None) => None,
            _ => return Err(bad("`filter` is not a document")),
        };
        let single = matches!(snap.get("single"), Ok(Some(RawBsonRef::Boolean(true))));
        Ok(Self {
            start,
            start_time,
            id,
            coll,
            after,
            filter,
            single,
        })
    }
}
