//! Dead letters: events a handler could not process, kept with why, so that the stream
//! can move past them without losing them.

use std::cmp::Ordering;

use async_trait::async_trait;

use crate::{ChangeEvent, ClusterTime, Error, Result, ResumeToken};

/// An event the handler failed on (or one parked behind such an event of the same
/// document key), recorded before the stream moved past it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The stream id the event was read for.
    pub stream: String,
    /// The letter's id within its stream: see [`DeadLetter::id_of`].
    pub id: String,
    /// The event's resume token.
    pub token: ResumeToken,
    /// The event's cluster time.
    pub cluster_time: ClusterTime,
    /// The event's exact bytes, as the server sent them.
    pub event: Vec<u8>,
    /// The error and its causes, outermost first (empty for a parked event).
    pub errors: Vec<String>,
    /// How many times the handler was called on it (0 for a parked event).
    pub attempts: u32,
    /// When it was recorded.
    pub recorded_at: bson::DateTime,
    /// Recorded without calling the handler, because an earlier event of its document
    /// key is a dead letter (so a replay keeps the key's order).
    pub parked: bool,
}

impl DeadLetter {
    /// A letter for `event` of `stream`, failed with `error` after `attempts` calls.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the event has no raw bytes (events built by hand
    /// rather than read from a server cannot be dead-lettered exactly).
    pub fn new(
        stream: &str,
        event: &ChangeEvent,
        error: Option<&(dyn std::error::Error + 'static)>,
        attempts: u32,
        parked: bool,
    ) -> Result<Self> {
        let raw = event.raw().ok_or_else(|| Error::InvalidArgument {
            name: "event",
            reason: "an event without its raw bytes cannot be dead-lettered".into(),
        })?;
        Ok(Self {
            stream: stream.to_owned(),
            id: Self::id_of(&event.token),
            token: event.token.clone(),
            cluster_time: event.cluster_time,
            event: raw.as_bytes().to_vec(),
            errors: error.map(error_chain).unwrap_or_default(),
            attempts,
            recorded_at: bson::DateTime::now(),
            parked,
        })
    }

    /// The id of the letter of the event with `token`: the token's `_data` string (its
    /// byte order is the stream's order); for a snapshot row, its snapshot's identity,
    /// collection and `_id` ([`crate::SnapshotRow::id`], the same after a restart); the
    /// hex of the token's bytes otherwise. Recording the same event twice records one
    /// letter.
    pub fn id_of(token: &ResumeToken) -> String {
        if let Some(data) = token.data() {
            return data.to_owned();
        }
        if let Some(row) = token.snapshot_row() {
            return row.id();
        }
        token
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The event, decoded again from its bytes.
    ///
    /// # Errors
    /// [`Error::MalformedEvent`] when the bytes do not decode as a change event.
    pub fn decode(&self) -> Result<ChangeEvent> {
        let raw = bson::RawDocumentBuf::from_bytes(self.event.clone()).map_err(|e| {
            Error::MalformedEvent {
                field: "(dead letter)",
                problem: e.to_string(),
            }
        })?;
        ChangeEvent::from_raw_buf(raw)
    }

    /// Stream order: by cluster time, then by id.
    pub fn stream_order(&self, other: &Self) -> Ordering {
        self.cluster_time
            .cmp(&other.cluster_time)
            .then_with(|| self.id.cmp(&other.id))
    }
}

/// An error and its `source()` chain, outermost first; a cause whose text the outer
/// message already contains is not repeated.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut chain: Vec<String> = vec![error.to_string()];
    let mut next = error.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !chain.last().is_some_and(|outer| outer.contains(&text)) {
            chain.push(text);
        }
        next = cause.source();
    }
    chain
}

/// Keeps dead letters per stream. One store serves many streams.
///
/// Every implementation keeps these rules (checked by `cdc-resume`'s conformance suite):
/// the event's bytes and token round-trip exactly; recording a letter whose id is already
/// stored keeps the stored one and succeeds (a crash between recording and the next
/// checkpoint records the same event again); a record that returned `Ok` survives a crash;
/// streams are isolated; [`DeadLetterStore::list`] returns letters in stream order.
#[async_trait]
pub trait DeadLetterStore: Send + Sync {
    /// Records `letter` durably (idempotent by stream and id).
    ///
    /// # Errors
    /// [`Error::Store`] when the backend fails: the event must then not be acknowledged.
    async fn record(&self, letter: &DeadLetter) -> Result<()>;

    /// Up to `limit` letters of `stream`, in stream order.
    ///
    /// # Errors
    /// [`Error::Store`] when the backend fails; [`Error::CorruptPoint`] when a record
    /// cannot be decoded.
    async fn list(&self, stream: &str, limit: usize) -> Result<Vec<DeadLetter>>;

    /// How many letters `stream` has.
    ///
    /// # Errors
    /// [`Error::Store`] when the backend fails.
    async fn count(&self, stream: &str) -> Result<u64>;

    /// Removes the letter `id` of `stream`; `false` when there was none.
    ///
    /// # Errors
    /// [`Error::Store`] when the backend fails.
    async fn remove(&self, stream: &str, id: &str) -> Result<bool>;

    /// A short description for logs (backend and location), without credentials.
    fn describe(&self) -> String;

    /// The MongoDB collection the letters are written to, when it is one (a stream over
    /// its database or deployment leaves it out).
    fn namespace(&self) -> Option<crate::Namespace> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str, t: u32) -> ChangeEvent {
        let raw = bson::doc! {
            "_id": { "_data": data },
            "operationType": "insert",
            "clusterTime": bson::Timestamp { time: t, increment: 1 },
            "ns": { "db": "d", "coll": "c" },
            "documentKey": { "_id": 1 },
        };
        ChangeEvent::from_document(&raw).unwrap()
    }

    #[test]
    fn a_letter_keeps_the_bytes_and_the_chain() {
        let e = event("8200000001", 1);
        let inner = std::io::Error::other("disk full");
        let outer = Error::store("s", inner);
        let letter = DeadLetter::new("s", &e, Some(&outer), 3, false).unwrap();
        assert_eq!(letter.event, e.raw().unwrap().as_bytes());
        assert_eq!(letter.id, "8200000001");
        // The outer message already names its cause: it is not repeated.
        assert_eq!(letter.errors.len(), 1, "{:?}", letter.errors);
        assert!(letter.errors[0].contains("disk full"));
        assert_eq!(letter.decode().unwrap().token, e.token);
        let built = ChangeEvent::new(
            e.token.clone(),
            crate::OperationType::Insert,
            ClusterTime::new(1, 1),
        );
        assert!(DeadLetter::new("s", &built, None, 1, false).is_err());
    }

    #[test]
    fn a_chain_lists_causes_not_named_by_their_parent() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("writing the row failed")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let chain = error_chain(&Outer(std::io::Error::other("connection reset")));
        assert_eq!(chain, ["writing the row failed", "connection reset"]);
    }

    #[test]
    fn stream_order_is_cluster_time_then_id() {
        let a = DeadLetter::new("s", &event("82B", 1), None, 1, false).unwrap();
        let b = DeadLetter::new("s", &event("82A", 2), None, 1, false).unwrap();
        let c = DeadLetter::new("s", &event("82C", 2), None, 1, false).unwrap();
        assert_eq!(a.stream_order(&b), Ordering::Less);
        assert_eq!(b.stream_order(&c), Ordering::Less);
        let no_data = ResumeToken::from_document(&bson::doc! { "x": 1 }).unwrap();
        assert!(
            DeadLetter::id_of(&no_data)
                .chars()
                .all(|c| c.is_ascii_hexdigit())
        );
    }
}
