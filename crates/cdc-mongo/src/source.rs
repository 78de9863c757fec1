//! [`MongoSource`]: `cdc_core::ChangeSource` over the driver's change streams: opens a
//! cursor (`crate::cursor`) or a snapshot (`crate::snapshot`) at a position.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use async_trait::async_trait;
use bson::{RawDocumentBuf, doc};
use cdc_core::{ChangeCursor, ChangeSource, ErrorKind, StartPosition};
use mongodb::{Client, change_stream::ChangeStream};

use crate::{
    cursor::{Inner, open_cursor},
    error::{Error, Result},
    options::{Scope, SourceOptions},
};

/// Watches one collection, database or deployment through the official driver.
///
/// The driver's own automatic resume stays on: what it cannot resume from surfaces as a
/// classified [`cdc_core::Error::Source`].
#[derive(Clone)]
pub struct MongoSource {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for MongoSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client is left out: its options may hold credentials.
        f.debug_struct("MongoSource")
            .field("scope", &self.inner.scope)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl MongoSource {
    /// A source over `client` for `scope`.
    pub fn new(client: Client, scope: Scope, options: SourceOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                scope,
                options,
                pre_images_off: AtomicBool::new(false),
                snapshot: crate::progress::Progress::default(),
                fallbacks: AtomicU64::new(0),
            }),
        }
    }

    /// What the source watches.
    pub fn scope(&self) -> &Scope {
        &self.inner.scope
    }

    /// The driver's change stream exactly as this source opens it (scope, pipeline,
    /// options, position), for iterating raw BSON without this crate's decoding and
    /// policies: no pre-image fallback, no history-lost handling.
    ///
    /// # Errors
    /// As [`ChangeSource::open`].
    pub async fn open_driver_stream(
        &self,
        position: &StartPosition,
    ) -> Result<ChangeStream<RawDocumentBuf>> {
        self.inner.open_stream(position).await
    }

    /// How it opens its streams.
    pub fn options(&self) -> &SourceOptions {
        &self.inner.options
    }

    /// How many times a missing pre-image made the source fall back to pre-images off.
    pub fn pre_image_fallbacks(&self) -> u64 {
        self.inner.fallbacks.load(Ordering::Relaxed)
    }
}

impl MongoSource {
    /// Opens the change stream at `position` as a `futures` `Stream` of events (see
    /// [`crate::EventStream`]).
    ///
    /// # Errors
    /// As [`ChangeSource::open`].
    pub async fn stream(&self, position: &StartPosition) -> cdc_core::Result<crate::EventStream> {
        Ok(crate::EventStream::new(self.open(position).await?))
    }
}

#[async_trait]
impl ChangeSource for MongoSource {
    async fn open(&self, position: &StartPosition) -> cdc_core::Result<Box<dyn ChangeCursor>> {
        let inner = &self.inner;
        if let Some(snapshot) = crate::snapshot::SnapshotPosition::of(position) {
            return Ok(crate::snapshot::resume(inner, snapshot?));
        }
        if *position == StartPosition::Now && inner.options.snapshot != crate::SnapshotMode::Never {
            return crate::snapshot::start(inner).await;
        }
        match open_cursor(inner, position).await {
            Err(e)
                if e.kind() == ErrorKind::HistoryLost
                    && inner.options.snapshot == crate::SnapshotMode::WhenNeeded =>
            {
                tracing::error!(error = %e, "the stream's position aged out of the oplog: reading the documents anew (snapshot when needed)");
                crate::snapshot::start(inner).await
            }
            other => other,
        }
    }

    async fn cluster_time(&self) -> cdc_core::Result<Option<cdc_core::ClusterTime>> {
        let client = &self.inner.client;
        let mut session = client
            .start_session()
            .await
            .map_err(|e| Error::driver("start a session", e))?;
        client
            .database("admin")
            .run_command(doc! { "ping": 1 })
            .session(&mut session)
            .await
            .map_err(|e| Error::driver("ping", e))?;
        Ok(session.operation_time().map(cdc_core::ClusterTime::from))
    }

    async fn oplog(&self) -> cdc_core::Result<cdc_core::OplogView> {
        crate::oplog::window(&self.inner.client).await
    }

    fn snapshot_progress(&self) -> Option<cdc_core::SnapshotProgress> {
        self.inner.snapshot.get()
    }

    async fn snapshot_while_streaming(
        &self,
        cursor: Box<dyn ChangeCursor>,
        request: &cdc_core::SnapshotRequest,
    ) -> Result<Box<dyn ChangeCursor>, (Box<dyn ChangeCursor>, cdc_core::Error)> {
        crate::snapshot::incremental(&self.inner, cursor, request).await
    }

    fn describe(&self) -> String {
        self.inner.scope.to_string()
    }

    fn origin(&self) -> Option<String> {
        Some(self.inner.scope.to_string())
    }
}
