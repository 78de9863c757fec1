//! The change-stream source abstraction: what the processor needs from "a change stream",
//! implemented over the MongoDB driver by `cdc-mongo` and by fakes in tests.

use async_trait::async_trait;

use crate::{ChangeEvent, ClusterTime, OplogView, Result, ResumeToken, StartPosition};

/// Opens change streams. One source serves every (re)open of a processor's stream.
#[async_trait]
pub trait ChangeSource: Send + Sync {
    /// Opens a stream at `position`.
    ///
    /// # Errors
    /// A classified [`crate::Error::Source`]: transient failures are worth retrying;
    /// [`crate::ErrorKind::HistoryLost`] means the position has aged out of the oplog (a
    /// source configured to restart from now reports the gap as the cursor's first
    /// [`Next::Gap`] instead).
    async fn open(&self, position: &StartPosition) -> Result<Box<dyn ChangeCursor>>;

    /// A short description for logs (the watched namespace), without credentials.
    fn describe(&self) -> String;

    /// What points taken from this source are bound to (the watched namespace:
    /// `shop.orders`, `shop.*`, `*.*`); a stored point of another origin is refused
    /// ([`crate::Error::ForeignPoint`]). `None` (the default) binds nothing.
    fn origin(&self) -> Option<String> {
        None
    }

    /// The deployment's newest operation time, when the source can tell (`None` by
    /// default). A stored point later than it cannot come from this deployment's log.
    ///
    /// # Errors
    /// A classified [`crate::Error::Source`].
    async fn cluster_time(&self) -> Result<Option<ClusterTime>> {
        Ok(None)
    }

    /// The deployment's oplog window (its oldest and newest entries), for the stored
    /// point's headroom ([`crate::OplogHeadroom`]). By default the source cannot tell
    /// ([`OplogView::Unreadable`]).
    ///
    /// # Errors
    /// A classified [`crate::Error::Source`] for a failure worth asking again (the
    /// network, an election); a source that may not read the oplog answers
    /// [`OplogView::Unreadable`] instead.
    async fn oplog(&self) -> Result<OplogView> {
        Ok(OplogView::Unreadable(format!(
            "{} cannot tell its oplog",
            self.describe()
        )))
    }

    /// How far the source's current snapshot got, if it ever read one.
    fn snapshot_progress(&self) -> Option<SnapshotProgress> {
        None
    }

    /// Reads documents again while `cursor` streams (an incremental snapshot): the cursor
    /// returned hands over `cursor`'s stream with the documents `request` names
    /// interleaved, under the same guarantees as an initial snapshot. On refusal, the
    /// error and `cursor` unchanged. By default every request is refused.
    async fn snapshot_while_streaming(
        &self,
        cursor: Box<dyn ChangeCursor>,
        request: &SnapshotRequest,
    ) -> std::result::Result<Box<dyn ChangeCursor>, (Box<dyn ChangeCursor>, crate::Error)> {
        let _ = request;
        let reason = format!("{} cannot read documents while streaming", self.describe());
        Err((
            cursor,
            crate::Error::InvalidArgument {
                name: "snapshot request",
                reason,
            },
        ))
    }
}

/// Documents to read again while streaming (an incremental snapshot).
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct SnapshotRequest {
    /// The collection to read: `None` for the source's collection (or every collection of
    /// its database).
    pub collection: Option<String>,
    /// Which documents: a query filter (empty: all of them).
    pub filter: bson::Document,
}

impl SnapshotRequest {
    /// The documents matching `filter` (empty: all of them).
    pub fn new(filter: bson::Document) -> Self {
        Self {
            collection: None,
            filter,
        }
    }

    /// Of the collection `name` (of a database source).
    #[must_use]
    pub fn collection(mut self, name: impl Into<String>) -> Self {
        self.collection = Some(name.into());
        self
    }
}

/// How far a snapshot's reading got.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotProgress {
    /// Documents read (counted a chunk at a time).
    pub documents: u64,
    /// Chunks read.
    pub chunks_done: u64,
    /// Chunks of the collection being read, when known in advance (parallel reading; 0
    /// when chunks are read one after the other until the collection ends).
    pub chunks_total: u64,
    /// Documents read again because a change to them came through the stream before
    /// their turn: the image read first was older than that change.
    pub reread: u64,
    /// Collections finished (a database snapshot).
    pub collections_done: u64,
    /// Whether every document has been read.
    pub finished: bool,
    /// Documents per second since the snapshot began.
    pub per_second: u64,
}

/// What one call of [`ChangeCursor::next`] brought.
#[derive(Debug)]
#[non_exhaustive]
pub enum Next {
    /// An event (boxed: the other variants are small, and a reader keeps events boxed).
    Event(Box<ChangeEvent>),
    /// An event as the server sent it, still to be decoded ([`crate::EventDecoder`], or
    /// [`Next::into_event`]). A source that reads on one task for a consumer on another
    /// hands events over so: decoded where they are handled, an event's allocations are
    /// made and freed on one thread, and none is needed for the decoded event itself.
    Raw(bson::RawDocumentBuf),
    /// A round trip brought no event (the stream is idle, or everything was filtered
    /// out): the position to resume from now (the post-batch resume token), if any.
    Idle(Option<ResumeToken>),
    /// The requested position had aged out of the oplog and the source was configured to
    /// restart from now: these changes were skipped. Reading goes on.
    Gap(HistoryGap),
    /// The server closed the stream (after an `invalidate`): nothing more comes from this
    /// cursor; open a new one after the last event.
    Closed,
    /// The source has nothing more to deliver, for good (a snapshot-only source after its
    /// scan), with the position a later start continues from: the processor saves it and
    /// stops.
    Finished(Option<ResumeToken>),
}

impl Next {
    /// The event, when this is one (decoded, when it came raw).
    ///
    /// # Errors
    /// [`crate::Error::MalformedEvent`] when a raw event does not decode.
    pub fn into_event(self) -> Result<Option<ChangeEvent>> {
        match self {
            Self::Event(event) => Ok(Some(*event)),
            Self::Raw(raw) => ChangeEvent::from_raw_buf(raw).map(Some),
            _ => Ok(None),
        }
    }

    /// The same, with a raw event decoded by `decoder` (so that a stream's events share
    /// their namespace's names): never [`Next::Raw`].
    ///
    /// # Errors
    /// [`crate::Error::MalformedEvent`] when a raw event does not decode.
    pub fn decoded(self, decoder: &mut crate::EventDecoder) -> Result<Self> {
        match self {
            Self::Raw(raw) => decoder.decode(raw).map(|e| Self::Event(Box::new(e))),
            other => Ok(other),
        }
    }
}

/// An open change stream.
#[async_trait]
pub trait ChangeCursor: Send {
    /// What happened next: an event, an idle round trip with its position, a gap in
    /// history, the stream's end ([`Next`]).
    ///
    /// # Errors
    /// A classified [`crate::Error::Source`] the driver could not resume from.
    async fn next(&mut self) -> Result<Next>;

    /// The token to resume after everything this cursor has returned: an event's `_id`, or
    /// the latest post-batch resume token (right after opening: the opening position).
    fn resume_token(&self) -> Option<ResumeToken>;

    /// Whether the cursor is reading a snapshot (not yet every document handed over).
    fn is_snapshotting(&self) -> bool {
        false
    }

    /// Closes the server-side cursor.
    async fn close(self: Box<Self>);
}

/// Changes that were skipped because they aged out of the oplog before they were read.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryGap {
    /// The cluster time of the last position known processed, when it can be told.
    pub after: Option<ClusterTime>,
    /// The cluster time where the stream started again, when it can be told.
    pub resumed_at: Option<ClusterTime>,
}

impl HistoryGap {
    /// A gap between two positions.
    pub fn new(after: Option<ClusterTime>, resumed_at: Option<ClusterTime>) -> Self {
        Self { after, resumed_at }
    }
}

impl std::fmt::Display for HistoryGap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show =
            |t: &Option<ClusterTime>| t.map_or_else(|| "unknown".to_owned(), |t| t.to_string());
        write!(
            f,
            "changes after {} up to {} were lost",
            show(&self.after),
            show(&self.resumed_at)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The traits must be usable as trait objects: processors pick sources at run time.
    #[allow(dead_code)]
    fn _obj_safe(_: &dyn ChangeSource, _: Box<dyn ChangeCursor>) {}

    #[test]
    fn gap_displays_its_bounds() {
        let gap = HistoryGap::new(Some(ClusterTime::new(1, 2)), None);
        assert_eq!(
            gap.to_string(),
            "changes after Timestamp(1, 2) up to unknown were lost"
        );
    }
}
