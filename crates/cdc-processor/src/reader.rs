//! The reader: reads the change stream ahead of the handlers and hands what the driver
//! has buffered to the run loop in batches. Where an event waits before it is handled:
//! in the driver's buffer, then in the channel this task fills.

use std::{future::Future, sync::Arc};

use cdc_core::{ChangeCursor, ChangeEvent, HistoryGap, ResumeToken};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

pub(crate) enum Item {
    /// Boxed: an event is large, and items are moved and batched in `Vec`s. The permit is
    /// its share of the byte budget, given back when it is dropped (after its handler).
    Event(Box<ChangeEvent>, Option<OwnedSemaphorePermit>),
    /// An empty round trip that moved the stream's resume token (or had none).
    Idle(Option<ResumeToken>),
    /// An empty round trip with the same token as the last one: time passed, nothing else.
    Tick,
    Gap(HistoryGap),
    Closed,
    Failed(cdc_core::Error),
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

/// The batch in hand, leaving an empty one of the same capacity in its place.
fn handover(batch: &mut Vec<Item>, handoff: usize) -> Vec<Item> {
    std::mem::replace(batch, Vec::with_capacity(handoff))
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

    fn share(&self, event: &ChangeEvent) -> u32 {
        let size = event.raw().map_or(0, |r| r.as_bytes().len());
        u32::try_from(size).unwrap_or(u32::MAX).clamp(1, self.max)
    }
}

/// Reads ahead of the handler: the cursor fetches the next batch while the handler works.
/// Events already buffered by the driver are handed over together (up to `handoff`); the
/// batch in hand goes out before the reader waits on the server or on the byte budget.
pub(crate) async fn read_ahead(
    mut cursor: Box<dyn ChangeCursor>,
    tx: mpsc::Sender<Vec<Item>>,
    handoff: usize,
    budget: Budget,
) {
    let mut batch = Vec::with_capacity(handoff);
    let mut idle_token: Option<ResumeToken> = None;
    loop {
        if let Some(gap) = cursor.take_gap() {
            batch.push(Item::Gap(gap));
        }
        let next = {
            let mut fut = cursor.next();
            match ready_now(&mut fut).await {
                Some(next) => next,
                None => {
                    if !batch.is_empty() && tx.send(handover(&mut batch, handoff)).await.is_err() {
                        break;
                    }
                    tokio::select! {
                        r = fut => r,
                        () = tx.closed() => break,
                    }
                }
            }
        };
        let (item, last) = match next {
            Ok(Some(e)) => {
                let share = budget.share(&e);
                let permit = match Arc::clone(&budget.bytes).try_acquire_many_owned(share) {
                    Ok(permit) => permit,
                    Err(_) => {
                        // Over budget: what is in hand goes first, then wait for handlers.
                        if !batch.is_empty()
                            && tx.send(handover(&mut batch, handoff)).await.is_err()
                        {
                            break;
                        }
                        tokio::select! {
                            permit = Arc::clone(&budget.bytes).acquire_many_owned(share) => match permit {
                                Ok(permit) => permit,
                                Err(_) => break,
                            },
                            () = tx.closed() => break,
                        }
                    }
                };
                (Item::Event(Box::new(e), Some(permit)), false)
            }
            Ok(None) if cursor.is_closed() => (Item::Closed, true),
            Ok(None) => {
                // An empty round trip: the position matters only when it moved.
                let token = cursor.resume_token();
                if token.is_some() && token == idle_token {
                    (Item::Tick, false)
                } else {
                    idle_token.clone_from(&token);
                    (Item::Idle(token), false)
                }
            }
            Err(e) => (Item::Failed(e), true),
        };
        // Anything but an event goes out at once: the consumer acts on it with no delay.
        let send_now = last || batch.len() + 1 >= handoff || !matches!(item, Item::Event(..));
        batch.push(item);
        if send_now && tx.send(handover(&mut batch, handoff)).await.is_err() {
            break;
        }
        if last {
            break;
        }
    }
    cursor.close().await;
}
