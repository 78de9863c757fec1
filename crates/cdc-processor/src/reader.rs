//! The reader: reads the change stream ahead of the handlers and hands what the driver
//! has buffered to the run loop in batches. Where an event waits before it is handled:
//! in the driver's buffer, then in the channel this task fills.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use cdc_core::{
    ChangeCursor, ChangeEvent, ChangeSource, ClusterTime, HistoryGap, Next, ResumeToken,
    SnapshotRequest,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

/// What the reader hands over at once: items, and the byte-budget shares of their events
/// as one permit (taking and giving back a permit for every event made the budget's
/// reference count and state bounce between the reader's thread and the run loop's).
pub(crate) struct Handoff {
    pub(crate) items: Vec<Item>,
    /// The sum of the events' shares: the run loop gives them back after handling the
    /// batch, or splits off each event's share for its lane.
    pub(crate) bytes: Option<OwnedSemaphorePermit>,
}

pub(crate) enum Item {
    /// Boxed: an event is large, and items are moved and batched in `Vec`s. The number is
    /// its share of the byte budget, held in [`Handoff::bytes`].
    Event(Box<ChangeEvent>, u32),
    /// An event as the server sent it, decoded by the run loop ([`Next::Raw`]); its share
    /// of the byte budget as for [`Item::Event`].
    Raw(bson::RawDocumentBuf, u32),
    /// An empty round trip that moved the stream's resume token (or had none).
    Idle(Option<ResumeToken>),
    /// An empty round trip with the same token as the last one: time passed, nothing else.
    Tick,
    Gap(HistoryGap),
    Closed,
    /// The source has nothing more, for good (a snapshot-only source after its scan), with
    /// the position a later start continues from.
    Finished(Option<ResumeToken>),
    Failed(cdc_core::Error),
}

/// A snapshot request and where its answer goes.
pub(crate) struct Pending {
    pub(crate) request: SnapshotRequest,
    pub(crate) reply: oneshot::Sender<cdc_core::Result<()>>,
}

/// Snapshot requests waiting for the reader, the task that holds the cursor: it takes
/// them between two events and hands its cursor to the source, which returns the cursor
/// that reads the documents alongside the stream.
pub(crate) struct Requests {
    tx: mpsc::UnboundedSender<Pending>,
    rx: std::sync::Mutex<mpsc::UnboundedReceiver<Pending>>,
    /// Set when a request was sent: the reader looks at the queue only then.
    waiting: std::sync::atomic::AtomicBool,
}

impl Requests {
    pub(crate) fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tx,
            rx: std::sync::Mutex::new(rx),
            waiting: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Queues a request; the answer comes on the returned receiver.
    pub(crate) fn send(&self, request: SnapshotRequest) -> oneshot::Receiver<cdc_core::Result<()>> {
        let (reply, answer) = oneshot::channel();
        // The receiver lives as long as `self`: sending cannot fail.
        let _ = self.tx.send(Pending { request, reply });
        self.waiting
            .store(true, std::sync::atomic::Ordering::Release);
        answer
    }

    fn take(&self) -> Option<Pending> {
        self.rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .try_recv()
            .ok()
    }

    /// Answers every waiting request with `error` (the processor stopped).
    pub(crate) fn refuse_all(&self, error: &cdc_core::Error) {
        while let Some(p) = self.take() {
            let _ = p.reply.send(Err(error.clone()));
        }
    }

    /// Hands `cursor` to `source` for each waiting request; the cursor to read on.
    async fn serve(
        &self,
        source: &dyn ChangeSource,
        mut cursor: Box<dyn ChangeCursor>,
    ) -> Box<dyn ChangeCursor> {
        // A plain load first: this runs for every event, a request rarely comes.
        if !self.waiting.load(std::sync::atomic::Ordering::Acquire)
            || !self
                .waiting
                .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return cursor;
        }
        while let Some(p) = self.take() {
            cursor = match source.snapshot_while_streaming(cursor, &p.request).await {
                Ok(cursor) => {
                    let _ = p.reply.send(Ok(()));
                    cursor
                }
                Err((cursor, e)) => {
                    tracing::warn!(error = %e, "snapshot request refused");
                    let _ = p.reply.send(Err(e));
                    cursor
                }
            };
        }
        cursor
    }
}

/// The most events the reader hands to the consumer at once: handing over batches rather
/// than single events spares a task wake-up per event.
pub(crate) const HANDOFF: usize = 256;

/// Polls `fut` once: its output if it is ready now, `None` if it would wait (it stays
/// registered with the waker, and can be awaited afterwards).
async fn ready_now<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *fut).poll(cx) {
        std::task::Poll::Ready(out) => std::task::Poll::Ready(Some(out)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

/// What the reader holds and has not handed over yet.
struct InHand {
    items: Vec<Item>,
    bytes: Option<OwnedSemaphorePermit>,
    /// Events read since the last handover (added to [`Progress::read`] at the handover).
    read: u64,
}

impl InHand {
    fn new(handoff: usize) -> Self {
        Self {
            items: Vec::with_capacity(handoff),
            bytes: None,
            read: 0,
        }
    }

    /// The items in hand with their bytes, leaving an empty batch of the same capacity in
    /// their place. Raw events are decoded by the run loop: the newest one's time is read
    /// here, once per handover rather than for every event, for the stream's progress.
    fn handover(&mut self, handoff: usize, progress: &Progress) -> Handoff {
        progress.saw(newest_raw_time(&self.items));
        progress
            .read
            .fetch_add(std::mem::take(&mut self.read), Ordering::Relaxed);
        Handoff {
            items: std::mem::replace(&mut self.items, Vec::with_capacity(handoff)),
            bytes: self.bytes.take(),
        }
    }

    fn keep(&mut self, permit: OwnedSemaphorePermit) {
        match &mut self.bytes {
            // Every permit merged here comes from the one budget of this reader, so
            // merging (which panics only for permits of different semaphores) cannot fail.
            Some(held) => held.merge(permit),
            held @ None => *held = Some(permit),
        }
    }
}

/// The bytes read from the cursor and not yet handled: the reader takes an event's raw
/// size from it before handing the event over (an event larger than the whole budget
/// takes all of it, so it still goes through, alone), and stops reading while it is spent.
#[derive(Clone, Debug)]
pub(crate) struct Budget {
    bytes: Arc<Semaphore>,
    max: u32,
}

impl Budget {
    /// A budget of `max_bytes` (at most `u32::MAX` bytes are counted per event).
    pub(crate) fn new(max_bytes: usize) -> Self {
        let max = u32::try_from(max_bytes.min(Semaphore::MAX_PERMITS))
            .unwrap_or(u32::MAX)
            .max(1);
        Self {
            bytes: Arc::new(Semaphore::new(max as usize)),
            max,
        }
    }

    /// An event's share: its raw size (the whole budget at most, at least one byte).
    fn share(&self, size: usize) -> u32 {
        u32::try_from(size).unwrap_or(u32::MAX).clamp(1, self.max)
    }
}

/// The most one server batch of a change stream holds (the wire's message bound): the
/// driver keeps one such batch buffered beside what the reader holds.
const DRIVER_BATCH: usize = 16 << 20;

/// The reader's share of `max_buffered_bytes`: the bound less one driver batch (so events
/// buffered by the driver and by the reader together stay within it), but never less than
/// half of it.
pub(crate) fn read_ahead_bytes(max_buffered_bytes: usize) -> usize {
    max_buffered_bytes
        .saturating_sub(DRIVER_BATCH)
        .max(max_buffered_bytes / 2)
}

/// What the reader saw, shared with [`crate::Stats`]: events read from the cursor, the
/// newest cluster time the stream reported (an event's, or an idle round trip's
/// position), and whether a stream is open now.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub(crate) read: AtomicU64,
    /// `time << 32 | increment`; 0 for none yet.
    pub(crate) source_time: AtomicU64,
    pub(crate) open: AtomicBool,
}

impl Progress {
    fn saw(&self, time: Option<ClusterTime>) {
        if let Some(t) = time {
            let packed = (u64::from(t.time) << 32) | u64::from(t.increment);
            self.source_time.fetch_max(packed, Ordering::Relaxed);
        }
    }

    pub(crate) fn source_time(&self) -> Option<ClusterTime> {
        let packed = self.source_time.load(Ordering::Relaxed);
        // The halves of a u64 fit their u32s.
        #[allow(clippy::cast_possible_truncation)]
        (packed != 0).then(|| ClusterTime::new((packed >> 32) as u32, packed as u32))
    }
}

/// Takes an event's share of the byte budget into what is in hand: at once when it is
/// free, otherwise after what is in hand has gone to the run loop and handlers gave bytes
/// back. The share, or `None` when the run loop is gone.
async fn take_share(
    budget: &Budget,
    size: usize,
    hand: &mut InHand,
    tx: &mpsc::Sender<Handoff>,
    handoff: usize,
    progress: &Progress,
) -> Option<u32> {
    let share = budget.share(size);
    hand.read += 1;
    if let Ok(permit) = Arc::clone(&budget.bytes).try_acquire_many_owned(share) {
        hand.keep(permit);
        return Some(share);
    }
    // Over budget: what is in hand goes first, then wait for handlers.
    if !hand.items.is_empty() && tx.send(hand.handover(handoff, progress)).await.is_err() {
        return None;
    }
    let permit = tokio::select! {
        permit = Arc::clone(&budget.bytes).acquire_many_owned(share) => permit.ok()?,
        () = tx.closed() => return None,
    };
    hand.keep(permit);
    Some(share)
}

/// The cluster time of the newest raw event in `batch`.
fn newest_raw_time(batch: &[Item]) -> Option<ClusterTime> {
    batch.iter().rev().find_map(|item| match item {
        Item::Raw(raw, _) => raw.get_timestamp("clusterTime").ok().map(ClusterTime::from),
        _ => None,
    })
}

/// An event as the transform leaves it, and whether its namespace was left out (it is
/// then an idle position: the stored point may move past it, no handler sees it).
fn shape(
    transform: &crate::Transform,
    next: cdc_core::Result<Next>,
) -> (cdc_core::Result<Next>, bool) {
    use crate::Shaped;
    match next {
        Ok(Next::Raw(raw)) => match transform.apply(&raw) {
            Ok(Shaped::Changed(shaped)) => (Ok(Next::Raw(shaped)), false),
            Ok(Shaped::LeftOut) => {
                let token = raw.get_document("_id").ok().map(ResumeToken::copied);
                (Ok(Next::Idle(token)), true)
            }
            Ok(_) => (Ok(Next::Raw(raw)), false),
            Err(e) => (Err(e), false),
        },
        Ok(Next::Event(event)) => match event.raw().map(|raw| transform.apply(raw)) {
            Some(Ok(Shaped::Changed(shaped))) => (Ok(Next::Raw(shaped)), false),
            Some(Ok(Shaped::LeftOut)) => (Ok(Next::Idle(Some(event.token.clone()))), true),
            Some(Err(e)) => (Err(e), false),
            _ => (Ok(Next::Event(event)), false),
        },
        other => (other, false),
    }
}

/// Reads ahead of the handler: the cursor fetches the next batch while the handler works.
/// Events already buffered by the driver are handed over together (up to `handoff`); the
/// batch in hand goes out before the reader waits on the server or on the byte budget.
pub(crate) async fn read_ahead(
    mut cursor: Box<dyn ChangeCursor>,
    tx: mpsc::Sender<Handoff>,
    handoff: usize,
    budget: Budget,
    requests: Option<(Arc<dyn ChangeSource>, Arc<Requests>)>,
    progress: Arc<Progress>,
    transform: Option<Arc<crate::Transform>>,
) {
    progress.open.store(true, Ordering::Relaxed);
    let mut hand = InHand::new(handoff);
    let mut idle_token: Option<ResumeToken> = None;
    loop {
        if let Some((source, requests)) = &requests {
            cursor = requests.serve(&**source, cursor).await;
        }
        let next = {
            let mut fut = cursor.next();
            match ready_now(&mut fut).await {
                Some(next) => next,
                None => {
                    if !hand.items.is_empty()
                        && tx.send(hand.handover(handoff, &progress)).await.is_err()
                    {
                        break;
                    }
                    tokio::select! {
                        r = fut => r,
                        () = tx.closed() => break,
                    }
                }
            }
        };
        // Shaped here, once, whatever cursor the event came from (the stream's, a
        // snapshot's): an event of a left-out namespace goes on as its position only.
        let (next, left_out) = match transform.as_deref() {
            Some(t) => shape(t, next),
            None => (next, false),
        };
        let (item, last) = match next {
            Ok(Next::Event(e)) => {
                progress.saw(Some(e.cluster_time));
                let size = e.raw().map_or(0, |r| r.as_bytes().len());
                let Some(share) =
                    take_share(&budget, size, &mut hand, &tx, handoff, &progress).await
                else {
                    break;
                };
                (Item::Event(e, share), false)
            }
            Ok(Next::Raw(raw)) => {
                let size = raw.as_bytes().len();
                let Some(share) =
                    take_share(&budget, size, &mut hand, &tx, handoff, &progress).await
                else {
                    break;
                };
                (Item::Raw(raw, share), false)
            }
            Ok(Next::Closed) => (Item::Closed, true),
            Ok(Next::Finished(token)) => (Item::Finished(token), true),
            Ok(Next::Gap(gap)) => (Item::Gap(gap), false),
            Ok(Next::Idle(token)) => {
                // An empty round trip: the position matters only when it moved.
                progress.saw(token.as_ref().and_then(ResumeToken::cluster_time_hint));
                if token.is_some() && token == idle_token {
                    (Item::Tick, false)
                } else {
                    idle_token.clone_from(&token);
                    (Item::Idle(token), false)
                }
            }
            // A kind of news this reader does not know: nothing to hand over.
            Ok(_) => continue,
            Err(e) => (Item::Failed(e), true),
        };
        // Anything but an event goes out at once: the consumer acts on it with no delay.
        let send_now = last
            || hand.items.len() + 1 >= handoff
            || !(left_out || matches!(item, Item::Event(..) | Item::Raw(..)));
        hand.items.push(item);
        if send_now && tx.send(hand.handover(handoff, &progress)).await.is_err() {
            break;
        }
        if last {
            break;
        }
    }
    progress.open.store(false, Ordering::Relaxed);
    cursor.close().await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn the_reader_leaves_room_for_one_driver_batch() {
        assert_eq!(super::read_ahead_bytes(64 << 20), 48 << 20);
        assert_eq!(super::read_ahead_bytes(20 << 20), 10 << 20);
        assert_eq!(super::read_ahead_bytes(0), 0);
    }

    use async_trait::async_trait;
    use bson::rawdoc;

    use super::*;

    /// A cursor with an endless supply of events of `size` bytes, counting reads.
    struct Endless {
        size: usize,
        reads: Arc<AtomicUsize>,
    }

    fn event(i: usize, size: usize) -> ChangeEvent {
        let pad = "x".repeat(size);
        let i = i64::try_from(i).unwrap();
        let raw = rawdoc! {
            "_id": { "_data": format!("82{:08X}00000001", 1000 + i) },
            "operationType": "insert",
            "clusterTime": bson::Timestamp { time: 1000 + u32::try_from(i).unwrap(), increment: 1 },
            "ns": { "db": "d", "coll": "c" },
            "documentKey": { "_id": i },
            "fullDocument": { "_id": i, "pad": pad },
        };
        ChangeEvent::from_raw_buf(raw).unwrap()
    }

    #[async_trait]
    impl ChangeCursor for Endless {
        async fn next(&mut self) -> cdc_core::Result<Next> {
            let i = self.reads.fetch_add(1, Ordering::SeqCst);
            Ok(Next::Event(Box::new(event(i, self.size))))
        }
        fn resume_token(&self) -> Option<ResumeToken> {
            None
        }
        async fn close(self: Box<Self>) {}
    }

    fn sizes(batches: &[Handoff]) -> usize {
        batches
            .iter()
            .flat_map(|h| &h.items)
            .map(|i| match i {
                Item::Event(e, _) => e.raw().map_or(0, |r| r.as_bytes().len()),
                _ => 0,
            })
            .sum()
    }

    #[tokio::test]
    async fn the_reader_stops_at_the_byte_budget_and_goes_on_when_events_are_handled() {
        let size = 10_000;
        let reads = Arc::new(AtomicUsize::new(0));
        let cursor = Box::new(Endless {
            size,
            reads: Arc::clone(&reads),
        });
        // Room for three events (and a channel that could hold far more).
        let budget = Budget::new(3 * (size + 200));
        let (tx, mut rx) = mpsc::channel(1000);
        let reader = tokio::spawn(read_ahead(
            cursor,
            tx,
            256,
            budget,
            None,
            Arc::default(),
            None,
        ));
        let mut held: Vec<Handoff> = Vec::new();
        for _ in 0..50 {
            tokio::task::yield_now().await;
            while let Ok(batch) = rx.try_recv() {
                held.push(batch);
            }
        }
        let handed: usize = held.iter().map(|h| h.items.len()).sum();
        assert_eq!(handed, 3, "three events fit the budget");
        assert!(sizes(&held) <= 3 * (size + 200));
        let taken: usize = held
            .iter()
            .map(|h| {
                h.bytes
                    .as_ref()
                    .map_or(0, OwnedSemaphorePermit::num_permits)
            })
            .sum();
        assert_eq!(taken, sizes(&held), "each batch holds its events' shares");
        assert!(
            reads.load(Ordering::SeqCst) <= 4,
            "the reader stopped pulling"
        );
        // Handling (dropping) the events gives the budget back: reading goes on.
        held.clear();
        let more = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(!more.items.is_empty());
        drop(rx);
        reader.await.unwrap();
    }

    #[tokio::test]
    async fn an_event_larger_than_the_budget_still_goes_through_alone() {
        let reads = Arc::new(AtomicUsize::new(0));
        let cursor = Box::new(Endless {
            size: 50_000,
            reads: Arc::clone(&reads),
        });
        let (tx, mut rx) = mpsc::channel(1000);
        let reader = tokio::spawn(read_ahead(
            cursor,
            tx,
            256,
            Budget::new(1_000),
            None,
            Arc::default(),
            None,
        ));
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.items.len(), 1, "alone");
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(
            rx.try_recv().is_err(),
            "the next waits while the first is held"
        );
        drop(first);
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.items.len(), 1);
        drop(rx);
        reader.await.unwrap();
    }
}
