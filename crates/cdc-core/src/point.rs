//! Resume points (what a store keeps per stream) and start positions (where a stream opens).

use serde::{Deserialize, Serialize};

use crate::{ClusterTime, OperationType, ResumeToken};

/// What a resume store keeps for one stream: enough to reopen the stream exactly after the
/// last processed change, and nothing more. It never carries a document (the Go package
/// stored whole documents in its points: a size and privacy cost).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct ResumePoint {
    /// The token to reopen the stream from.
    pub token: ResumeToken,
    /// The cluster time of the change the token belongs to (for a post-batch token: the
    /// latest cluster time known when it was taken). Stores order points by it.
    pub cluster_time: ClusterTime,
    /// The operation type of the event the point was taken from; `None` for a post-batch
    /// resume token taken while the stream was idle or filtered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_type: Option<OperationType>,
    /// When the point was created (milliseconds since the Unix epoch in serialized form).
    #[serde(with = "millis")]
    pub saved_at: bson::DateTime,
    /// What the point was taken from: the watched namespace as the source names it
    /// ([`crate::ChangeSource::origin`], `shop.orders`, `shop.*`, `*.*`), set by the
    /// processor when it saves. A point loaded for a stream of another origin is refused
    /// ([`crate::Error::ForeignPoint`]): a token of another stream would open this one at
    /// the wrong place and skip or repeat changes. `None` in points saved before origins
    /// were kept (accepted, and stamped at the next save).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl ResumePoint {
    /// A point taken from an event.
    pub fn for_event(
        token: ResumeToken,
        cluster_time: ClusterTime,
        operation_type: OperationType,
        saved_at: bson::DateTime,
    ) -> Self {
        Self {
            token,
            cluster_time,
            operation_type: Some(operation_type),
            saved_at,
            origin: None,
        }
    }

    /// A point taken from a batch's post-batch resume token, with no event behind it.
    pub fn post_batch(
        token: ResumeToken,
        cluster_time: ClusterTime,
        saved_at: bson::DateTime,
    ) -> Self {
        Self {
            token,
            cluster_time,
            operation_type: None,
            saved_at,
            origin: None,
        }
    }

    /// The same point, bound to `origin` (see [`ResumePoint::origin`]).
    #[must_use]
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = Some(origin.into());
        self
    }

    /// Checks that a point loaded for `stream` (from `location`) was taken from
    /// `expected`; a point without an origin (saved by an older version) passes.
    ///
    /// # Errors
    /// [`crate::Error::ForeignPoint`] naming the stream, the place and both origins.
    pub fn check_origin(&self, stream: &str, location: &str, expected: &str) -> crate::Result<()> {
        match &self.origin {
            Some(found) if found != expected => Err(crate::Error::ForeignPoint {
                stream: stream.to_owned(),
                location: location.to_owned(),
                found: format!("a stream over {found}"),
                expected: format!("a stream over {expected}"),
            }),
            _ => Ok(()),
        }
    }

    /// Whether the point was taken from an `invalidate` event.
    pub fn is_invalidate(&self) -> bool {
        self.operation_type == Some(OperationType::Invalidate)
    }

    /// Where a stream reopened from this point starts: see [`StartPosition::after`].
    pub fn start_position(&self) -> StartPosition {
        StartPosition::after(Some(self))
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(dt: &bson::DateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(dt.timestamp_millis())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bson::DateTime, D::Error> {
        i64::deserialize(d).map(bson::DateTime::from_millis)
    }
}

/// Where a change stream opens.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartPosition {
    /// From the present: only changes after the stream opens.
    Now,
    /// Just after the change the token names (`resumeAfter`): exact, nothing re-delivered.
    ResumeAfter(ResumeToken),
    /// Just after the change the token names, allowed after an `invalidate` (`startAfter`).
    StartAfter(ResumeToken),
    /// At a cluster time, inclusive (`startAtOperationTime`): changes at that very time are
    /// delivered again.
    AtOperationTime(ClusterTime),
}

impl StartPosition {
    /// The rule that derives a start position from the stored point:
    /// no point → [`StartPosition::Now`]; a point taken from an `invalidate` event →
    /// [`StartPosition::StartAfter`] its token (the server refuses `resumeAfter` an
    /// invalidate); any other point → [`StartPosition::ResumeAfter`] its token, which is
    /// exact where the Go package's `startAtOperationTime` re-delivered every event sharing
    /// the stored cluster time.
    pub fn after(point: Option<&ResumePoint>) -> Self {
        match point {
            None => Self::Now,
            Some(p) if p.is_invalidate() => Self::StartAfter(p.token.clone()),
            Some(p) => Self::ResumeAfter(p.token.clone()),
        }
    }

    /// The token this position names, if any.
    pub fn token(&self) -> Option<&ResumeToken> {
        match self {
            Self::ResumeAfter(t) | Self::StartAfter(t) => Some(t),
            Self::Now | Self::AtOperationTime(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn token(data: &str) -> ResumeToken {
        ResumeToken::from_document(&doc! { "_data": data }).unwrap()
    }

    #[test]
    fn start_position_rule() {
        assert_eq!(StartPosition::after(None), StartPosition::Now);
        let at = bson::DateTime::from_millis(1);
        let insert = ResumePoint::for_event(
            token("82A1"),
            ClusterTime::new(1, 1),
            OperationType::Insert,
            at,
        );
        assert_eq!(
            insert.start_position(),
            StartPosition::ResumeAfter(token("82A1"))
        );
        let invalidate = ResumePoint::for_event(
            token("82A2"),
            ClusterTime::new(1, 2),
            OperationType::Invalidate,
            at,
        );
        assert_eq!(
            invalidate.start_position(),
            StartPosition::StartAfter(token("82A2"))
        );
        let idle = ResumePoint::post_batch(token("82A3"), ClusterTime::new(1, 3), at);
        assert_eq!(
            idle.start_position(),
            StartPosition::ResumeAfter(token("82A3"))
        );
        assert_eq!(idle.start_position().token(), Some(&token("82A3")));
        assert_eq!(
            StartPosition::AtOperationTime(ClusterTime::new(1, 0)).token(),
            None
        );
    }

    #[test]
    fn point_serializes_compactly_and_round_trips() {
        let point = ResumePoint::for_event(
            token("82FF"),
            ClusterTime::new(7, 3),
            OperationType::Update,
            bson::DateTime::from_millis(1_700_000_000_123),
        );
        let json = serde_json::to_string(&point).unwrap();
        assert_eq!(
            json,
            r#"{"token":{"_data":"82FF"},"clusterTime":{"time":7,"increment":3},"operationType":"update","savedAt":1700000000123}"#
        );
        assert_eq!(serde_json::from_str::<ResumePoint>(&json).unwrap(), point);
        let bson_doc = bson::serialize_to_document(&point).unwrap();
        assert_eq!(
            bson::deserialize_from_document::<ResumePoint>(bson_doc).unwrap(),
            point
        );

        let idle = ResumePoint::post_batch(
            token("82FF"),
            ClusterTime::new(7, 3),
            bson::DateTime::from_millis(0),
        );
        let json = serde_json::to_string(&idle).unwrap();
        assert!(!json.contains("operationType"));
        assert_eq!(serde_json::from_str::<ResumePoint>(&json).unwrap(), idle);
    }
}
