//! Opening and reading a change stream: what a source and its cursors share (`Inner`),
//! the driver's stream opened at a position under the source's policies, the cursor that
//! reads it ([`MongoCursor`]), and token conversion. Both the source and the snapshot use
//! this module; it uses neither.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use async_trait::async_trait;
use bson::{Document, RawDocumentBuf, doc};
use cdc_core::{ChangeCursor, ErrorKind, HistoryGap, Next, ResumeToken, StartPosition};
use mongodb::{
    Client,
    change_stream::{ChangeStream, event::ResumeToken as DriverToken},
    options::{FullDocumentBeforeChangeType, FullDocumentType},
};

use crate::{
    error::{Error, Result, classify, server_code},
    options::{
        BeforeChange, FullDocument, HistoryLostPolicy, PreImagePolicy, Scope, SourceOptions,
    },
    split::{FragmentError, Piece, Reassembler, SPLIT_STAGE},
};

/// Converts a driver token to ours, keeping its bytes.
pub fn from_driver_token(token: &DriverToken) -> Option<ResumeToken> {
    bson::serialize_to_raw_document_buf(token)
        .ok()
        .map(ResumeToken::from_raw)
}

/// Converts our token to the driver's, keeping its bytes.
pub fn to_driver_token(token: &ResumeToken) -> Option<DriverToken> {
    bson::deserialize_from_slice(token.as_bytes()).ok()
}

/// What a source and every cursor it opens share: the client, what is watched and how,
/// whether pre-images were given up, and the latest snapshot's progress.
pub(crate) struct Inner {
    pub(crate) client: Client,
    pub(crate) scope: Scope,
    pub(crate) options: SourceOptions,
    /// Set once a missing pre-image made the source fall back to `Off`.
    pub(crate) pre_images_off: AtomicBool,
    /// The progress of the latest snapshot.
    pub(crate) snapshot: crate::progress::Progress,
    pub(crate) fallbacks: AtomicU64,
}

impl Inner {
    fn before_change(&self) -> BeforeChange {
        if self.pre_images_off.load(Ordering::Relaxed) {
            BeforeChange::Off
        } else {
            self.options.before_change
        }
    }

    /// Whether the stream may send split events: the split stage is asked for, or ends
    /// the user's pipeline. Without it the server never splits an event (one over 16 MiB
    /// is an error), and events are not looked at for fragments.
    fn splits(&self) -> bool {
        self.options.split_large_events
            || self
                .options
                .pipeline
                .last()
                .is_some_and(|s| s.contains_key(SPLIT_STAGE))
    }

    fn pipeline(&self) -> Vec<Document> {
        let mut stages = Vec::with_capacity(self.options.pipeline.len() + 1);
        if let Some(types) = &self.options.operation_types {
            let names: Vec<&str> = types.iter().map(|t| t.as_str()).collect();
            stages.push(doc! { "$match": { "operationType": { "$in": names } } });
        }
        stages.extend(self.options.pipeline.iter().cloned());
        if self.options.split_large_events
            && !stages.last().is_some_and(|s| s.contains_key(SPLIT_STAGE))
        {
            stages.push(doc! { SPLIT_STAGE: {} });
        }
        stages
    }

    pub(crate) async fn open_stream(
        &self,
        position: &StartPosition,
    ) -> Result<ChangeStream<RawDocumentBuf>> {
        let o = &self.options;
        let full_document = match o.full_document {
            FullDocument::Default => None,
            FullDocument::UpdateLookup => Some(FullDocumentType::UpdateLookup),
            FullDocument::WhenAvailable => Some(FullDocumentType::WhenAvailable),
            FullDocument::Required => Some(FullDocumentType::Required),
        };
        let before = match self.before_change() {
            BeforeChange::Off => None,
            BeforeChange::WhenAvailable => Some(FullDocumentBeforeChangeType::WhenAvailable),
            BeforeChange::Required => Some(FullDocumentBeforeChangeType::Required),
        };
        let coll_handle;
        let db_handle;
        let watch = match &self.scope {
            Scope::Collection { db, coll } => {
                coll_handle = self.client.database(db).collection::<Document>(coll);
                coll_handle.watch()
            }
            Scope::Database(db) => {
                db_handle = self.client.database(db);
                db_handle.watch()
            }
            Scope::Deployment => self.client.watch(),
        };
        let mut watch = watch.pipeline(self.pipeline());
        if let Some(mode) = full_document {
            watch = watch.full_document(mode);
        }
        if let Some(mode) = before {
            watch = watch.full_document_before_change(mode);
        }
        if let Some(n) = o.batch_size {
            watch = watch.batch_size(n);
        }
        if let Some(d) = o.max_await_time {
            watch = watch.max_await_time(d);
        }
        if let Some(criteria) = &o.read_preference {
            watch = watch.selection_criteria(criteria.clone());
        }
        if o.show_expanded_events {
            watch = watch.show_expanded_events(true);
        }
        let watch = match position {
            StartPosition::Now => watch,
            StartPosition::ResumeAfter(t) => {
                watch.resume_after(to_driver_token(t).ok_or_else(|| bad_token(t))?)
            }
            StartPosition::StartAfter(t) => {
                watch.start_after(to_driver_token(t).ok_or_else(|| bad_token(t))?)
            }
            StartPosition::AtOperationTime(ct) => watch.start_at_operation_time(ct.to_timestamp()),
            other => {
                return Err(Error::Decode(cdc_core::Error::InvalidArgument {
                    name: "position",
                    reason: format!("unsupported start position {other:?}"),
                }));
            }
        };
        let stream = watch
            .await
            .map_err(|e| Error::driver("open change stream", e))?;
        Ok(stream.with_type::<RawDocumentBuf>())
    }

    pub(crate) fn fall_back_from_pre_images(&self) -> bool {
        if self.options.pre_image_policy != PreImagePolicy::FallBackToOff
            || self.before_change() == BeforeChange::Off
        {
            return false;
        }
        self.pre_images_off.store(true, Ordering::Relaxed);
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            scope = %self.scope,
            "a required pre-image is missing: reopening with fullDocumentBeforeChange off for the life of this source"
        );
        true
    }
}

fn bad_token(t: &ResumeToken) -> Error {
    Error::Decode(cdc_core::Error::InvalidArgument {
        name: "position",
        reason: format!("resume token {t} is not a BSON document the driver accepts"),
    })
}

pub(crate) fn position_time(position: &StartPosition) -> Option<cdc_core::ClusterTime> {
    match position {
        StartPosition::AtOperationTime(t) => Some(*t),
        other => other.token().and_then(ResumeToken::cluster_time_hint),
    }
}

/// Opens the change stream at `position`, under the source's pre-image and history-lost
/// policies.
pub(crate) async fn open_cursor(
    inner: &Arc<Inner>,
    position: &StartPosition,
) -> cdc_core::Result<Box<dyn ChangeCursor>> {
    loop {
        match inner.open_stream(position).await {
            Ok(stream) => {
                return Ok(Box::new(MongoCursor::new(stream, inner, position)));
            }
            Err(e)
                if e.kind() == ErrorKind::PreImageMissing && inner.fall_back_from_pre_images() =>
            {
                continue;
            }
            Err(e)
                if e.kind() == ErrorKind::HistoryLost
                    && inner.options.history_lost_policy == HistoryLostPolicy::RestartFromNow =>
            {
                let stream = inner.open_stream(&StartPosition::Now).await?;
                let mut cursor = MongoCursor::new(stream, inner, &StartPosition::Now);
                cursor.gap = Some(cursor.gap_since(position_time(position)));
                return Ok(Box::new(cursor));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// An open stream of a [`crate::MongoSource`].
pub struct MongoCursor {
    stream: ChangeStream<RawDocumentBuf>,
    inner: Arc<Inner>,
    /// A gap found while opening (restarted from now), reported by the first `next`.
    gap: Option<HistoryGap>,
    /// Whether the stream may send split events ([`Inner::splits`], fixed for its life):
    /// only then are events looked at for fragments.
    splits: bool,
    /// Fragments of a split event read so far.
    split: Reassembler,
    /// Resumed in the middle of a split event: reopened at its cluster time, events are
    /// skipped until the one holding this fragment token is whole.
    seek: Option<RawDocumentBuf>,
    /// The position after the last event delivered, or the last empty round's token:
    /// what `resume_token` reports while a split event is half-read (or sought), so no
    /// checkpoint falls between its fragments.
    boundary: Option<ResumeToken>,
}

impl std::fmt::Debug for MongoCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoCursor")
            .field("scope", &self.inner.scope)
            .field("alive", &self.stream.is_alive())
            .finish_non_exhaustive()
    }
}

impl MongoCursor {
    fn new(
        stream: ChangeStream<RawDocumentBuf>,
        inner: &Arc<Inner>,
        position: &StartPosition,
    ) -> Self {
        let boundary = position
            .token()
            .cloned()
            .or_else(|| stream.resume_token().as_ref().and_then(from_driver_token));
        Self {
            stream,
            inner: Arc::clone(inner),
            gap: None,
            splits: inner.splits(),
            split: Reassembler::new(),
            seek: None,
            boundary,
        }
    }

    /// The stream began after fragment `id` of a split event: reopen at that event's
    /// cluster time and deliver it whole once its fragments are read again.
    async fn seek_event_start(&mut self, id: RawDocumentBuf) -> cdc_core::Result<()> {
        let token = ResumeToken::from_raw(id.clone());
        let Some(time) = token.cluster_time_hint() else {
            return Err(Error::SplitEvent(format!(
                "resumed in the middle of a split event (after fragment token {token}) whose cluster time cannot be read from the token"
            ))
            .into());
        };
        tracing::info!(scope = %self.inner.scope, %token, "resumed in the middle of a split event: reading it again from its start");
        self.stream = self
            .inner
            .open_stream(&StartPosition::AtOperationTime(time))
            .await?;
        self.split.reset();
        self.seek = Some(id);
        Ok(())
    }

    /// The history skipped by restarting from now, after `after`: logged, and returned to
    /// be reported.
    fn gap_since(&self, after: Option<cdc_core::ClusterTime>) -> HistoryGap {
        let resumed_at = self
            .stream
            .resume_token()
            .as_ref()
            .and_then(from_driver_token)
            .and_then(|t| t.cluster_time_hint());
        let gap = HistoryGap::new(after, resumed_at);
        tracing::error!(scope = %self.inner.scope, %gap, "change stream history lost: restarted from now as configured");
        gap
    }

    fn position(&self) -> Option<StartPosition> {
        self.resume_token().map(StartPosition::ResumeAfter)
    }
}

impl MongoCursor {
    /// An event read whole, handed over undecoded: the processor decodes it on the task
    /// that handles it. While a split event is half-read or sought, the position is the
    /// last whole event's, so its token is kept.
    fn deliver(&mut self, raw: RawDocumentBuf) -> cdc_core::Result<Next> {
        if self.splits {
            let token = match raw.get_document("_id") {
                Ok(id) => ResumeToken::copied(id),
                Err(e) => {
                    return Err(cdc_core::Error::MalformedEvent {
                        field: "_id",
                        problem: e.to_string(),
                    });
                }
            };
            self.boundary = Some(token);
        }
        Ok(Next::Raw(raw))
    }

    /// Everything but an event read whole from a stream without splits: fragments, an
    /// empty round trip, errors (and the reopening some of them call for). `None`: read
    /// on. Kept out of [`ChangeCursor::next`] (and boxed there) so that the future made
    /// for every event stays small.
    async fn read_rest(
        &mut self,
        read: mongodb::error::Result<Option<RawDocumentBuf>>,
    ) -> cdc_core::Result<Option<Next>> {
        match read {
            Ok(Some(raw)) if !self.splits => self.deliver(raw).map(Some),
            Ok(Some(raw)) => {
                let raw = match self.split.take(raw) {
                    Ok(Piece::Whole(raw)) => raw,
                    Ok(Piece::Partial) => return Ok(None),
                    Err(FragmentError::StartsMidEvent { id, .. }) if self.seek.is_none() => {
                        self.seek_event_start(id).await?;
                        return Ok(None);
                    }
                    Err(e) => return Err(Error::SplitEvent(format!("{e:?}")).into()),
                };
                if let Some(target) = &self.seek {
                    // Before the event the stream resumed inside: already delivered.
                    if !self.split.fragment_ids().contains(target) {
                        return Ok(None);
                    }
                    self.seek = None;
                }
                self.deliver(raw).map(Some)
            }
            // Half-way through a split event the rest is on its way: keep reading.
            Ok(None) if self.split.in_progress() || self.seek.is_some() => Ok(None),
            Ok(None) if !self.stream.is_alive() => Ok(Some(Next::Closed)),
            Ok(None) => {
                self.boundary = self
                    .stream
                    .resume_token()
                    .as_ref()
                    .and_then(from_driver_token);
                Ok(Some(Next::Idle(self.boundary.clone())))
            }
            Err(e) if server_code(&e) == Some(10334) => Err(Error::EventTooLarge(e).into()),
            Err(e) => {
                self.split.reset();
                let kind = classify(&e);
                if kind == ErrorKind::PreImageMissing
                    && let Some(position) = self.position()
                    && self.inner.fall_back_from_pre_images()
                {
                    self.stream = self.inner.open_stream(&position).await?;
                    return Ok(None);
                }
                if kind == ErrorKind::HistoryLost
                    && self.inner.options.history_lost_policy == HistoryLostPolicy::RestartFromNow
                {
                    let after = self.position().as_ref().and_then(position_time);
                    self.stream = self.inner.open_stream(&StartPosition::Now).await?;
                    return Ok(Some(Next::Gap(self.gap_since(after))));
                }
                Err(Error::driver("read change stream", e).into())
            }
        }
    }
}

/// The future `make` returns, boxed: the box is allocated first and the future written
/// into it, which lets the compiler build it in place instead of copying it in.
fn boxed_in_place<'b, F, R>(
    make: impl FnOnce() -> F,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = R> + Send + 'b>>
where
    F: std::future::Future<Output = R> + Send + 'b,
{
    let slot = Box::<F>::new_uninit();
    let boxed: Box<F> = Box::write(slot, make());
    Box::into_pin(boxed)
}

impl MongoCursor {
    /// What [`ChangeCursor::next`] returns, boxed by it.
    async fn read_next(&mut self) -> cdc_core::Result<Next> {
        if let Some(gap) = self.gap.take() {
            return Ok(Next::Gap(gap));
        }
        loop {
            let read = self.stream.next_if_any().await;
            if !self.splits
                && let Ok(Some(raw)) = read
            {
                return self.deliver(raw);
            }
            if let Some(next) = Box::pin(self.read_rest(read)).await? {
                return Ok(next);
            }
        }
    }
}

#[async_trait]
impl ChangeCursor for MongoCursor {
    // Written out rather than by `async_trait`: the future holds the driver's (several
    // KiB), and building it straight into its box spares copying it for every event.
    fn next<'a, 'b>(
        &'a mut self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = cdc_core::Result<Next>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        boxed_in_place(|| self.read_next())
    }

    fn resume_token(&self) -> Option<ResumeToken> {
        // Never a position inside a split event.
        if self.split.in_progress() || self.seek.is_some() {
            return self.boundary.clone();
        }
        self.stream
            .resume_token()
            .as_ref()
            .and_then(from_driver_token)
    }

    async fn close(self: Box<Self>) {
        drop(self.stream);
    }
}
