//! Handlers: the Go package's `CollectionWatcher` shape (documents as JSON bytes), a typed
//! variant deserializing into the user's own type, and raw dispatchers.

use std::marker::PhantomData;

use async_trait::async_trait;
use bson::{Bson, Document, RawDocument};
use cdc_core::{BoxError, ChangeEvent, Dispatcher, OperationType};
use serde::de::DeserializeOwned;

/// The Go package's handler shape: each method receives the document as JSON bytes in
/// relaxed Extended JSON (see [`to_json_bytes`]).
///
/// - `insert`: the inserted document;
/// - `update`: the post-image (`fullDocument`: the processor asks for `updateLookup` by
///   default), or the document key when the event carries no post-image; `replace` events
///   arrive here too (the Go package dropped them);
/// - `delete`: the pre-image when one was recorded, else the document key.
///
/// Other operation types are skipped. Returning an error stops the stream with it; the
/// event is delivered again on the next start.
#[async_trait]
pub trait CollectionWatcher: Send + Sync {
    /// A document was inserted.
    async fn insert(&self, doc: &[u8]) -> Result<(), BoxError>;
    /// A document was updated or replaced.
    async fn update(&self, doc: &[u8]) -> Result<(), BoxError>;
    /// A document was deleted.
    async fn delete(&self, doc: &[u8]) -> Result<(), BoxError>;
}

/// Encodes a document as relaxed Extended JSON: numbers, strings and booleans as plain
/// JSON, while ObjectIds, dates, binary, decimals and other types JSON cannot express keep
/// their `$`-wrappers (`{"$oid": …}`, `{"$date": …}`). Relaxed rather than canonical
/// because consumers of JSON expect `1`, not `{"$numberInt": "1"}`; use
/// [`TypedWatcher`] where exact numeric types matter.
pub fn to_json_bytes(doc: &Document) -> Vec<u8> {
    cdc_core::support::to_relaxed_json(Bson::Document(doc.clone()))
        .to_string()
        .into_bytes()
}

/// [`to_json_bytes`] for raw BSON, as events carry their images.
///
/// # Errors
/// When the bytes are not valid BSON.
pub fn raw_to_json_bytes(doc: &RawDocument) -> Result<Vec<u8>, bson::error::Error> {
    Ok(
        cdc_core::support::to_relaxed_json(Bson::Document(Document::try_from(doc)?))
            .to_string()
            .into_bytes(),
    )
}

/// A document for a JSON watcher method, as JSON bytes; a handler error naming the event
/// when its bytes are not valid BSON.
fn json(doc: &RawDocument, event: &ChangeEvent) -> Result<Vec<u8>, BoxError> {
    raw_to_json_bytes(doc).map_err(|e| -> BoxError {
        format!(
            "the {} event for _id {} carries a document that is not valid BSON: {e}",
            event.operation_type,
            event.document_id_string().unwrap_or_default()
        )
        .into()
    })
}

fn post_image_or_key(event: &ChangeEvent) -> Option<&RawDocument> {
    event.full_document().or(event.document_key())
}

fn pre_image_or_key(event: &ChangeEvent) -> Option<&RawDocument> {
    event
        .full_document_before_change()
        .or_else(|| post_image_or_key(event))
}

/// Adapts a [`CollectionWatcher`] into a [`Dispatcher`].
#[derive(Debug)]
pub struct JsonWatcher<W>(pub W);

#[async_trait]
impl<W: CollectionWatcher> Dispatcher for JsonWatcher<W> {
    async fn dispatch(
        &self,
        event: &ChangeEvent,
        previous: Option<BoxError>,
    ) -> Result<(), BoxError> {
        if let Some(e) = previous {
            return Err(e);
        }
        match event.operation_type {
            OperationType::Insert => match event.full_document() {
                Some(doc) => self.0.insert(&json(doc, event)?).await,
                None => Ok(()),
            },
            OperationType::Update | OperationType::Replace => match post_image_or_key(event) {
                Some(doc) => self.0.update(&json(doc, event)?).await,
                None => Ok(()),
            },
            OperationType::Delete => match pre_image_or_key(event) {
                Some(doc) => self.0.delete(&json(doc, event)?).await,
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }
}

/// Like [`CollectionWatcher`], with documents deserialized into the user's own type.
#[async_trait]
pub trait TypedWatcher<T: Send + 'static>: Send + Sync {
    /// A document was inserted.
    async fn insert(&self, doc: T, event: &ChangeEvent) -> Result<(), BoxError>;
    /// A document was updated or replaced; `doc` is the post-image when the event carries
    /// one.
    async fn update(&self, doc: Option<T>, event: &ChangeEvent) -> Result<(), BoxError>;
    /// A document was deleted; `before` is the pre-image when one was recorded.
    async fn delete(&self, before: Option<T>, event: &ChangeEvent) -> Result<(), BoxError>;
}

/// Adapts a [`TypedWatcher`] into a [`Dispatcher`]. A document that does not deserialize
/// is a handler error naming the document key.
pub struct Typed<T, W> {
    watcher: W,
    _type: PhantomData<fn() -> T>,
}

impl<T, W> Typed<T, W> {
    /// Wraps a typed watcher.
    pub fn new(watcher: W) -> Self {
        Self {
            watcher,
            _type: PhantomData,
        }
    }
}

impl<T, W> std::fmt::Debug for Typed<T, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Typed")
    }
}

fn decode<T: DeserializeOwned>(
    doc: Option<&RawDocument>,
    event: &ChangeEvent,
) -> Result<Option<T>, BoxError> {
    doc.map(|d| {
        bson::deserialize_from_slice::<T>(d.as_bytes()).map_err(|e| -> BoxError {
            format!(
                "cannot deserialize the document with _id {} into {}: {e}",
                event.document_id_string().unwrap_or_default(),
                std::any::type_name::<T>()
            )
            .into()
        })
    })
    .transpose()
}

#[async_trait]
impl<T, W> Dispatcher for Typed<T, W>
where
    T: DeserializeOwned + Send + 'static,
    W: TypedWatcher<T>,
{
    async fn dispatch(
        &self,
        event: &ChangeEvent,
        previous: Option<BoxError>,
    ) -> Result<(), BoxError> {
        if let Some(e) = previous {
            return Err(e);
        }
        match event.operation_type {
            OperationType::Insert => match decode::<T>(event.full_document(), event)? {
                Some(doc) => self.watcher.insert(doc, event).await,
                None => Ok(()),
            },
            OperationType::Update | OperationType::Replace => {
                let doc = decode::<T>(event.full_document(), event)?;
                self.watcher.update(doc, event).await
            }
            OperationType::Delete => {
                let before = decode::<T>(event.full_document_before_change(), event)?;
                self.watcher.delete(before, event).await
            }
            _ => Ok(()),
        }
    }
}
