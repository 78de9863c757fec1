//! The reader: reads the change stream ahead of the handlers and hands what the driver
//! has buffered to the run loop in batches. Where an event waits before it is handled:
//! in the driver's buffer, then in the channel this task fills.

use std::future::Future;

use cdc_core::{ChangeCursor, ChangeEvent, HistoryGap, ResumeToken};
use tokio::sync::mpsc;

pub(crate) enum Item {
    /// Boxed: an event is large, and items are moved and batched in `Vec`s.
    Event(Box<ChangeEvent>),
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

/// Reads ahead of the handler: the cursor fetches the next batch while the handler works.
/// Events already buffered by the driver are handed over together (up to `handoff`); the
/// batch in hand goes out before the reader waits on the server.
pub(crate) async fn read_ahead(
    mut cursor: Box<dyn ChangeCursor>,
    tx: mpsc::Sender<Vec<Item>>,
    handoff: usize,
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
            Ok(Some(e)) => (Item::Event(Box::new(e)), false),
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
        let send_now = last || batch.len() + 1 >= handoff || !matches!(item, Item::Event(_));
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
