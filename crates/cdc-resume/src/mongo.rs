//! [`MongoStore`]: one document per stream in a MongoDB collection, which may live in
//! another cluster than the watched one.

use async_trait::async_trait;
use bson::{Bson, Document, RawDocumentBuf, doc};
use cdc_core::{
    ClusterTime, DeadLetter, DeadLetterStore, Error, OperationType, Result, ResumePoint,
    ResumeStore, ResumeToken, validate_stream_id,
};
use mongodb::{Client, ClientSession, Collection, error::ErrorKind as DriverKind};

/// Keeps `{ _id: <stream>, token, clusterTime, operationType, savedAt }` documents.
///
/// A save is one conditional upsert (`clusterTime` not newer than the new point), so
/// concurrent saves never move the point backwards; [`MongoStore::save_in_session`]
/// commits a checkpoint in the same transaction as the caller's own writes.
#[derive(Clone)]
pub struct MongoStore {
    coll: Collection<RawDocumentBuf>,
    /// Dead letters: `{ _id: { stream, id }, stream, id, token, clusterTime, event, errors,
    /// attempts, recordedAt, parked }` in `<coll>_dead_letters`.
    letters: Collection<RawDocumentBuf>,
}

impl std::fmt::Debug for MongoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoStore")
            .field("collection", &self.coll.namespace().to_string())
            .finish()
    }
}

impl MongoStore {
    /// A store in `db.coll` of `client` (dead letters in `db.<coll>_dead_letters`).
    pub fn new(client: &Client, db: &str, coll: &str) -> Self {
        let db = client.database(db);
        Self {
            coll: db.collection(coll),
            letters: db.collection(&format!("{coll}_dead_letters")),
        }
    }

    fn letter_location(&self, stream: &str) -> String {
        format!("{} stream={stream:?}", self.letters.namespace())
    }

    fn decode_letter(&self, stream: &str, raw: &RawDocumentBuf) -> Result<DeadLetter> {
        let corrupt = |reason: String| Error::CorruptPoint {
            stream: stream.to_owned(),
            location: self.letter_location(stream),
            reason: format!("dead letter: {reason}"),
        };
        let field = |name: &str| match raw.get(name) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(corrupt(format!("no `{name}`"))),
            Err(e) => Err(corrupt(format!("`{name}`: {e}"))),
        };
        let text = |name: &str| match field(name)? {
            bson::RawBsonRef::String(s) => Ok(s.to_owned()),
            _ => Err(corrupt(format!("`{name}` should be a string"))),
        };
        let binary = |name: &str| match field(name)? {
            bson::RawBsonRef::Binary(b) => Ok(b.bytes.to_vec()),
            _ => Err(corrupt(format!("`{name}` should be binary"))),
        };
        let token = ResumeToken::from_bytes(binary("token")?)
            .map_err(|e| corrupt(format!("`token` is not BSON: {e}")))?;
        let cluster_time = match field("clusterTime")? {
            bson::RawBsonRef::Timestamp(ts) => ClusterTime::from(ts),
            _ => return Err(corrupt("`clusterTime` should be a timestamp".into())),
        };
        let errors = match field("errors")? {
            bson::RawBsonRef::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    Ok(bson::RawBsonRef::String(s)) => Ok(s.to_owned()),
                    _ => Err(corrupt("`errors` holds a non-string".into())),
                })
                .collect::<Result<Vec<_>>>()?,
            _ => return Err(corrupt("`errors` should be an array".into())),
        };
        let attempts = match field("attempts")? {
            bson::RawBsonRef::Int64(n) => u32::try_from(n).unwrap_or(u32::MAX),
            bson::RawBsonRef::Int32(n) => u32::try_from(n).unwrap_or(0),
            _ => return Err(corrupt("`attempts` should be a number".into())),
        };
        let recorded_at = match field("recordedAt")? {
            bson::RawBsonRef::DateTime(dt) => dt,
            _ => return Err(corrupt("`recordedAt` should be a date".into())),
        };
        Ok(DeadLetter {
            stream: text("stream")?,
            id: text("id")?,
            token,
            cluster_time,
            event: binary("event")?,
            errors,
            attempts,
            recorded_at,
            parked: matches!(raw.get("parked"), Ok(Some(bson::RawBsonRef::Boolean(true)))),
        })
    }

    fn location(&self, stream: &str) -> String {
        format!("{} _id={stream:?}", self.coll.namespace())
    }

    fn save_parts(stream: &str, point: &ResumePoint) -> Result<(Document, Document)> {
        let token =
            Document::try_from(point.token.as_raw()).map_err(|e| Error::InvalidArgument {
                name: "point",
                reason: format!("its token is not a valid document: {e}"),
            })?;
        let ts = point.cluster_time.to_timestamp();
        let filter = doc! {
            "_id": stream,
            "$or": [ { "clusterTime": { "$exists": false } }, { "clusterTime": { "$lte": ts } } ],
        };
        let mut set = doc! { "token": token, "clusterTime": ts, "savedAt": point.saved_at };
        let update = match &point.operation_type {
            Some(op) => {
                set.insert("operationType", op.as_str());
                doc! { "$set": set }
            }
            None => doc! { "$set": set, "$unset": { "operationType": "" } },
        };
        Ok((filter, update))
    }

    async fn regression_or(
        &self,
        stream: &str,
        point: &ResumePoint,
        e: mongodb::error::Error,
    ) -> Error {
        let duplicate = matches!(e.kind.as_ref(), DriverKind::Write(mongodb::error::WriteFailure::WriteError(w)) if w.code == 11000)
            || matches!(e.kind.as_ref(), DriverKind::Command(c) if c.code == 11000);
        if duplicate {
            // The upsert found no document it may replace: the stored point is newer, or
            // its cluster time cannot be read.
            match self.load(stream).await {
                Ok(Some(stored)) => {
                    return Error::Regression {
                        stream: stream.to_owned(),
                        stored: stored.cluster_time,
                        attempted: point.cluster_time,
                    };
                }
                Err(corrupt @ Error::CorruptPoint { .. }) => return corrupt,
                _ => {}
            }
        }
        Error::store(stream, e)
    }

    /// Saves inside the caller's session (and transaction, if one is open), so the
    /// checkpoint commits or aborts with the caller's own writes.
    ///
    /// # Errors
    /// As [`ResumeStore::save`].
    pub async fn save_in_session(
        &self,
        session: &mut ClientSession,
        stream: &str,
        point: &ResumePoint,
    ) -> Result<()> {
        validate_stream_id(stream)?;
        let (filter, update) = Self::save_parts(stream, point)?;
        match self
            .coll
            .update_one(filter, update)
            .upsert(true)
            .session(session)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(self.regression_or(stream, point, e).await),
        }
    }

    fn decode(&self, stream: &str, raw: &RawDocumentBuf) -> Result<ResumePoint> {
        let corrupt = |reason: String| Error::CorruptPoint {
            stream: stream.to_owned(),
            location: self.location(stream),
            reason,
        };
        let token = match raw.get("token") {
            Ok(Some(bson::RawBsonRef::Document(d))) => ResumeToken::from_raw(d.to_owned()),
            Ok(other) => {
                return Err(corrupt(format!(
                    "`token` should be a document, is {:?}",
                    other.map(|v| v.element_type())
                )));
            }
            Err(e) => return Err(corrupt(format!("`token`: {e}"))),
        };
        let cluster_time = match raw.get("clusterTime") {
            Ok(Some(bson::RawBsonRef::Timestamp(ts))) => ClusterTime::from(ts),
            Ok(other) => {
                return Err(corrupt(format!(
                    "`clusterTime` should be a timestamp, is {:?}",
                    other.map(|v| v.element_type())
                )));
            }
            Err(e) => return Err(corrupt(format!("`clusterTime`: {e}"))),
        };
        let saved_at = match raw.get("savedAt") {
            Ok(Some(bson::RawBsonRef::DateTime(dt))) => dt,
            _ => return Err(corrupt("`savedAt` should be a date".into())),
        };
        let operation_type = match raw.get("operationType") {
            Ok(None) => None,
            Ok(Some(bson::RawBsonRef::String(s))) => Some(OperationType::parse(s)),
            _ => return Err(corrupt("`operationType` should be a string".into())),
        };
        let mut point = ResumePoint::post_batch(token, cluster_time, saved_at);
        point.operation_type = operation_type;
        Ok(point)
    }
}

#[async_trait]
impl ResumeStore for MongoStore {
    async fn load(&self, stream: &str) -> Result<Option<ResumePoint>> {
        validate_stream_id(stream)?;
        let found = self
            .coll
            .find_one(doc! { "_id": stream })
            .await
            .map_err(|e| Error::store(stream, e))?;
        found.map(|raw| self.decode(stream, &raw)).transpose()
    }

    async fn save(&self, stream: &str, point: &ResumePoint) -> Result<()> {
        validate_stream_id(stream)?;
        let (filter, update) = Self::save_parts(stream, point)?;
        match self.coll.update_one(filter, update).upsert(true).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.regression_or(stream, point, e).await),
        }
    }

    async fn delete(&self, stream: &str) -> Result<()> {
        validate_stream_id(stream)?;
        self.coll
            .delete_one(doc! { "_id": stream })
            .await
            .map_err(|e| Error::store(stream, e))?;
        Ok(())
    }

    async fn list_streams(&self) -> Result<Vec<String>> {
        let mut cursor = self
            .coll
            .clone_with_type::<Document>()
            .find(doc! {})
            .projection(doc! { "_id": 1 })
            .await
            .map_err(|e| Error::store("*", e))?;
        let mut streams = Vec::new();
        while cursor.advance().await.map_err(|e| Error::store("*", e))? {
            let doc = cursor
                .deserialize_current()
                .map_err(|e| Error::store("*", e))?;
            if let Some(Bson::String(id)) = doc.get("_id") {
                streams.push(id.clone());
            }
        }
        streams.sort();
        Ok(streams)
    }

    fn describe(&self) -> String {
        format!("mongodb:{}", self.coll.namespace())
    }

    fn namespace(&self) -> Option<cdc_core::Namespace> {
        let ns = self.coll.namespace();
        Some(cdc_core::Namespace::collection(ns.db, ns.coll))
    }
}

#[async_trait]
impl DeadLetterStore for MongoStore {
    async fn record(&self, letter: &DeadLetter) -> Result<()> {
        let stream = &letter.stream;
        validate_stream_id(stream)?;
        let binary = |bytes: &[u8]| bson::Binary {
            subtype: bson::spec::BinarySubtype::Generic,
            bytes: bytes.to_vec(),
        };
        let body = doc! {
            "stream": stream,
            "id": &letter.id,
            "token": binary(letter.token.as_bytes()),
            "clusterTime": letter.cluster_time.to_timestamp(),
            "event": binary(&letter.event),
            "errors": &letter.errors,
            "attempts": i64::from(letter.attempts),
            "recordedAt": letter.recorded_at,
            "parked": letter.parked,
        };
        // Written with majority acknowledgement: a letter must survive a failover, since
        // the stream moves past its event once it is recorded.
        self.letters
            .clone_with_type::<Document>()
            .update_one(
                doc! { "_id": { "stream": stream, "id": &letter.id } },
                doc! { "$setOnInsert": body },
            )
            .upsert(true)
            .write_concern(mongodb::options::WriteConcern::majority())
            .await
            .map_err(|e| Error::store(stream, e))?;
        Ok(())
    }

    async fn list(&self, stream: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        validate_stream_id(stream)?;
        let mut find = self
            .letters
            .find(doc! { "stream": stream })
            .sort(doc! { "clusterTime": 1, "id": 1 });
        if let Ok(n) = i64::try_from(limit) {
            find = find.limit(n);
        }
        let mut cursor = find.await.map_err(|e| Error::store(stream, e))?;
        let mut letters = Vec::new();
        while cursor
            .advance()
            .await
            .map_err(|e| Error::store(stream, e))?
        {
            let raw = cursor.current().to_owned();
            letters.push(self.decode_letter(stream, &raw)?);
        }
        // The server sorts; the order is also the documented one when ids tie on time.
        letters.sort_by(DeadLetter::stream_order);
        letters.truncate(limit);
        Ok(letters)
    }

    async fn count(&self, stream: &str) -> Result<u64> {
        validate_stream_id(stream)?;
        self.letters
            .count_documents(doc! { "stream": stream })
            .await
            .map_err(|e| Error::store(stream, e))
    }

    async fn remove(&self, stream: &str, id: &str) -> Result<bool> {
        validate_stream_id(stream)?;
        let result = self
            .letters
            .delete_one(doc! { "_id": { "stream": stream, "id": id } })
            .write_concern(mongodb::options::WriteConcern::majority())
            .await
            .map_err(|e| Error::store(stream, e))?;
        Ok(result.deleted_count > 0)
    }

    fn describe(&self) -> String {
        format!("mongodb:{}", self.letters.namespace())
    }

    fn namespace(&self) -> Option<cdc_core::Namespace> {
        let ns = self.letters.namespace();
        Some(cdc_core::Namespace::collection(ns.db, ns.coll))
    }
}
