//! [`EventStream`]: a change stream as a `futures` `Stream`, for use without the processor.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use cdc_core::{ChangeCursor, ChangeEvent, EventDecoder, HistoryGap, Next, ResumeToken};
use futures_core::Stream;

/// What an [`EventStream`] yields when idle rounds are asked for.
#[derive(Debug)]
#[non_exhaustive]
pub enum Change {
    /// A change event.
    Event(Box<ChangeEvent>),
    /// A round trip brought no event (the stream is quiet, or everything was filtered
    /// out); the resume token may have moved (save it to keep a quiet stream fresh).
    Idle {
        /// The token to resume after everything read so far.
        resume_token: Option<ResumeToken>,
    },
    /// The stored position had aged out of the oplog and the source restarts from now
    /// (`HistoryLostPolicy::RestartFromNow`): these changes were skipped.
    Gap(HistoryGap),
}

type Pending =
    Pin<Box<dyn Future<Output = (Box<dyn ChangeCursor>, cdc_core::Result<Next>)> + Send>>;

/// A change stream that yields events and ends only when the server closes it (after an
/// `invalidate`) or on an error it could not resume from — like the `mongodb` crate's
/// `ChangeStream`. Idle round trips are skipped, unless [`EventStream::with_idle`] asks
/// for them. Built by [`crate::MongoSource::stream`].
pub struct EventStream {
    cursor: Option<Box<dyn ChangeCursor>>,
    pending: Option<Pending>,
    token: Option<ResumeToken>,
    idle: bool,
    done: bool,
    /// Decodes raw events (sharing their namespace's names).
    decoder: EventDecoder,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("resume_token", &self.token)
            .field("idle", &self.idle)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl EventStream {
    pub(crate) fn new(cursor: Box<dyn ChangeCursor>) -> Self {
        let token = cursor.resume_token();
        Self {
            cursor: Some(cursor),
            pending: None,
            token,
            idle: false,
            done: false,
            decoder: EventDecoder::new(),
        }
    }

    /// The same stream, yielding [`Change`]s: events, and a [`Change::Idle`] for every
    /// round trip that brought none.
    pub fn with_idle(mut self) -> IdleStream {
        self.idle = true;
        IdleStream(self)
    }

    /// The token to resume after everything this stream has yielded (also after idle
    /// rounds, when the server moved it).
    pub fn resume_token(&self) -> Option<&ResumeToken> {
        self.token.as_ref()
    }

    fn poll_change(&mut self, cx: &mut Context<'_>) -> Poll<Option<cdc_core::Result<Change>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if self.pending.is_none() {
                let Some(mut cursor) = self.cursor.take() else {
                    self.done = true;
                    return Poll::Ready(None);
                };
                self.pending = Some(Box::pin(async move {
                    let result = cursor.next().await;
                    (cursor, result)
                }));
            }
            let Some(pending) = self.pending.as_mut() else {
                continue;
            };
            let (cursor, result) = match pending.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(ready) => ready,
            };
            self.pending = None;
            self.cursor = Some(cursor);
            let decoder = &mut self.decoder;
            match result.and_then(|next| next.decoded(decoder)) {
                Ok(Next::Event(event)) => {
                    self.token = Some(event.token.clone());
                    return Poll::Ready(Some(Ok(Change::Event(event))));
                }
                Ok(Next::Closed) => {
                    self.done = true;
                    return Poll::Ready(None);
                }
                Ok(Next::Finished(token)) => {
                    if token.is_some() {
                        self.token = token;
                    }
                    self.done = true;
                    return Poll::Ready(None);
                }
                Ok(Next::Idle(token)) => {
                    if token.is_some() {
                        self.token = token;
                    }
                    if self.idle {
                        return Poll::Ready(Some(Ok(Change::Idle {
                            resume_token: self.token.clone(),
                        })));
                    }
                }
                Ok(Next::Gap(gap)) => {
                    if self.idle {
                        return Poll::Ready(Some(Ok(Change::Gap(gap))));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

impl Stream for EventStream {
    type Item = cdc_core::Result<ChangeEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            return match this.poll_change(cx) {
                Poll::Ready(Some(Ok(Change::Event(event)))) => Poll::Ready(Some(Ok(*event))),
                Poll::Ready(Some(Ok(Change::Idle { .. } | Change::Gap(_)))) => continue,
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

/// An [`EventStream`] that also yields its idle round trips.
#[derive(Debug)]
pub struct IdleStream(EventStream);

impl IdleStream {
    /// As [`EventStream::resume_token`].
    pub fn resume_token(&self) -> Option<&ResumeToken> {
        self.0.resume_token()
    }
}

impl Stream for IdleStream {
    type Item = cdc_core::Result<Change>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().0.poll_change(cx)
    }
}
