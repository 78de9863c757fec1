//! [`MongoStore`]: one document per stream in a MongoDB collection, which may live in
//! another cluster than the watched one.

use async_trait::async_trait;
use bson::{Bson, Document, RawDocumentBuf, doc};
use cdc_core::{
    ClusterTime, DeadLetter, DeadLetterStore, Error, Lease, LeaseRecord, LeaseStore, OperationType,
    Result, ResumePoint, ResumeStore, ResumeToken, validate_stream_id,
};
use mongodb::{Client, ClientSession, Collection, Database, error::ErrorKind as DriverKind};

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
    /// The database, for the server's clock and transactions.
    database: Database,
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
            database: db,
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

    /// A dead letter's document (without `_id`).
    fn letter_body(letter: &DeadLetter) -> Document {
        let binary = |bytes: &[u8]| bson::Binary {
            subtype: bson::spec::BinarySubtype::Generic,
            bytes: bytes.to_vec(),
        };
        doc! {
            "stream": &letter.stream,
            "id": &letter.id,
            "token": binary(letter.token.as_bytes()),
            "clusterTime": letter.cluster_time.to_timestamp(),
            "event": binary(&letter.event),
            "errors": &letter.errors,
            "attempts": i64::from(letter.attempts),
            "recordedAt": letter.recorded_at,
            "parked": letter.parked,
        }
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
        // A point without an origin (a sink's own checkpoint) keeps the stored one.
        if let Some(origin) = &point.origin {
            set.insert("origin", origin.as_str());
        }
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
        if is_duplicate(&e) {
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
        let origin = match raw.get("origin") {
            Ok(None) => None,
            Ok(Some(bson::RawBsonRef::String(s))) => Some(s.to_owned()),
            _ => return Err(corrupt("`origin` should be a string".into())),
        };
        let mut point = ResumePoint::post_batch(token, cluster_time, saved_at);
        point.operation_type = operation_type;
        point.origin = origin;
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
        // A document holding only a lease has no point yet.
        found
            .filter(|raw| !matches!(raw.get("token"), Ok(None)) || lease_record(raw).is_none())
            .map(|raw| self.decode(stream, &raw))
            .transpose()
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
        // The point goes; a lease stays (its tokens keep growing).
        self.coll
            .delete_one(doc! { "_id": stream, "lease": { "$exists": false } })
            .await
            .map_err(|e| Error::store(stream, e))?;
        self.coll
            .update_one(
                doc! { "_id": stream },
                doc! { "$unset": { "token": "", "clusterTime": "", "savedAt": "", "operationType": "" } },
            )
            .await
            .map_err(|e| Error::store(stream, e))?;
        Ok(())
    }

    async fn list_streams(&self) -> Result<Vec<String>> {
        let mut cursor = self
            .coll
            .clone_with_type::<Document>()
            .find(doc! { "token": { "$exists": true } })
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
        let body = Self::letter_body(letter);
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

/// The lease of a stream in its document (`lease: { owner, token, expires }`).
fn lease_record(raw: &RawDocumentBuf) -> Option<LeaseRecord> {
    let lease = match raw.get("lease") {
        Ok(Some(bson::RawBsonRef::Document(d))) => d,
        _ => return None,
    };
    let owner = lease.get_str("owner").ok()?.to_owned();
    let token = match lease.get("token").ok()?? {
        bson::RawBsonRef::Int64(t) => u64::try_from(t).ok()?,
        bson::RawBsonRef::Int32(t) => u64::try_from(t).ok()?,
        _ => return None,
    };
    let expires_at_ms = lease.get_datetime("expires").ok()?.timestamp_millis();
    Some(LeaseRecord {
        owner,
        token,
        expires_at_ms,
    })
}

fn lease_doc(record: &LeaseRecord) -> Document {
    doc! {
        "owner": &record.owner,
        "token": i64::try_from(record.token).unwrap_or(i64::MAX),
        "expires": bson::DateTime::from_millis(record.expires_at_ms),
    }
}

/// The filter matching a stream's document while `lease` is its newest lease.
fn held_filter(lease: &Lease) -> Document {
    doc! {
        "_id": &lease.stream,
        "lease.owner": &lease.owner,
        "lease.token": i64::try_from(lease.token).unwrap_or(i64::MAX),
    }
}

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    matches!(e.kind.as_ref(), DriverKind::Write(mongodb::error::WriteFailure::WriteError(w)) if w.code == 11000)
        || matches!(e.kind.as_ref(), DriverKind::Command(c) if c.code == 11000)
}

impl MongoStore {
    /// The server's clock (`hello`'s `localTime`), in milliseconds: leases expire by the
    /// store's clock, read just before each lease operation.
    async fn server_now(&self, stream: &str) -> Result<i64> {
        let hello = self
            .database
            .run_command(doc! { "hello": 1 })
            .await
            .map_err(|e| Error::store(stream, e))?;
        hello
            .get_datetime("localTime")
            .map(|t| t.timestamp_millis())
            .map_err(|e| Error::store(stream, e))
    }

    /// The stream's document (point and lease), if any.
    async fn stream_doc(&self, stream: &str) -> Result<Option<RawDocumentBuf>> {
        self.coll
            .find_one(doc! { "_id": stream })
            .await
            .map_err(|e| Error::store(stream, e))
    }

    async fn fenced(&self, lease: &Lease) -> Error {
        match self.stream_doc(&lease.stream).await {
            Ok(doc) => LeaseRecord::fenced(doc.as_ref().and_then(lease_record).as_ref(), lease),
            Err(e) => e,
        }
    }
}

/// Leases in each stream's own document (`lease: { owner, token, expires }`), so a fenced
/// save is one conditional update of that document; a lease changes by compare-and-set
/// on the lease as read, with expiry by the server's clock (`hello.localTime`). A fenced
/// dead letter is recorded in a transaction that also writes the lease, so a takeover
/// conflicts with it.
#[async_trait]
impl LeaseStore for MongoStore {
    async fn acquire(
        &self,
        stream: &str,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<Lease>> {
        validate_stream_id(stream)?;
        // A compare-and-set on the lease as read; a race lost to another acquirer is read
        // again (a few times: each loss means someone else got it).
        for _ in 0..8 {
            let now = self.server_now(stream).await?;
            let current = self
                .stream_doc(stream)
                .await?
                .as_ref()
                .and_then(lease_record);
            let Some(next) = LeaseRecord::acquire(current.as_ref(), owner, now, ttl) else {
                return Ok(None);
            };
            let filter = match &current {
                Some(c) => doc! {
                    "_id": stream,
                    "lease.owner": &c.owner,
                    "lease.token": i64::try_from(c.token).unwrap_or(i64::MAX),
                    "lease.expires": bson::DateTime::from_millis(c.expires_at_ms),
                },
                None => doc! { "_id": stream, "lease": { "$exists": false } },
            };
            let done = self
                .coll
                .update_one(filter, doc! { "$set": { "lease": lease_doc(&next) } })
                .upsert(current.is_none())
                .await;
            match done {
                Ok(r) if r.matched_count == 1 || r.upserted_id.is_some() => {
                    return Ok(Some(next.lease(stream)));
                }
                Ok(_) => {}
                Err(e) if is_duplicate(&e) => {}
                Err(e) => return Err(Error::store(stream, e)),
            }
        }
        Ok(None)
    }

    async fn renew(&self, lease: &Lease, ttl: std::time::Duration) -> Result<Lease> {
        let now = self.server_now(&lease.stream).await?;
        let mut filter = held_filter(lease);
        filter.insert(
            "lease.expires",
            doc! { "$gt": bson::DateTime::from_millis(now) },
        );
        let expires = now.saturating_add(cdc_core::support::ttl_ms(ttl));
        let r = self
            .coll
            .update_one(
                filter,
                doc! { "$set": { "lease.expires": bson::DateTime::from_millis(expires) } },
            )
            .await
            .map_err(|e| Error::store(lease.stream.as_str(), e))?;
        if r.matched_count == 1 {
            return Ok(Lease::new(
                lease.stream.clone(),
                lease.owner.clone(),
                lease.token,
                expires,
            ));
        }
        Err(self.fenced(lease).await)
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let now = self.server_now(&lease.stream).await?;
        let mut filter = held_filter(lease);
        filter.insert(
            "lease.expires",
            doc! { "$gt": bson::DateTime::from_millis(now) },
        );
        self.coll
            .update_one(
                filter,
                doc! { "$set": { "lease.expires": bson::DateTime::from_millis(now) } },
            )
            .await
            .map_err(|e| Error::store(lease.stream.as_str(), e))?;
        Ok(())
    }

    async fn holder(&self, stream: &str) -> Result<Option<Lease>> {
        validate_stream_id(stream)?;
        let now = self.server_now(stream).await?;
        Ok(self
            .stream_doc(stream)
            .await?
            .as_ref()
            .and_then(lease_record)
            .filter(|r| r.is_live(now))
            .map(|r| r.lease(stream)))
    }

    async fn leases(&self, prefix: &str) -> Result<Vec<Lease>> {
        let now = self.server_now("*").await?;
        let mut cursor = self
            .coll
            .find(doc! {
                "_id": { "$gte": prefix },
                "lease.expires": { "$gt": bson::DateTime::from_millis(now) },
            })
            .sort(doc! { "_id": 1 })
            .await
            .map_err(|e| Error::store("*", e))?;
        let mut out = Vec::new();
        while cursor.advance().await.map_err(|e| Error::store("*", e))? {
            let raw = cursor.current();
            let Ok(stream) = raw.get_str("_id") else {
                continue;
            };
            if !stream.starts_with(prefix) {
                break;
            }
            if let Some(record) = lease_record(&raw.to_owned()) {
                out.push(record.lease(stream));
            }
        }
        Ok(out)
    }

    async fn save_fenced(&self, lease: &Lease, point: &ResumePoint) -> Result<()> {
        let stream = lease.stream.as_str();
        validate_stream_id(stream)?;
        let (mut filter, update) = Self::save_parts(stream, point)?;
        filter.extend(held_filter(lease));
        let r = self
            .coll
            .update_one(filter, update)
            .await
            .map_err(|e| Error::store(stream, e))?;
        if r.matched_count == 1 {
            return Ok(());
        }
        match self
            .stream_doc(stream)
            .await?
            .as_ref()
            .map(|d| (lease_record(d), d))
        {
            Some((Some(record), doc)) if record.admits(lease) => {
                let stored = self.decode(stream, doc)?;
                Err(Error::Regression {
                    stream: stream.to_owned(),
                    stored: stored.cluster_time,
                    attempted: point.cluster_time,
                })
            }
            other => Err(LeaseRecord::fenced(
                other.and_then(|(r, _)| r).as_ref(),
                lease,
            )),
        }
    }

    async fn record_fenced(&self, lease: &Lease, letter: &DeadLetter) -> Result<()> {
        lease.covers(letter)?;
        let stream = lease.stream.as_str();
        validate_stream_id(stream)?;
        let client = self.database.client();
        let mut session = client
            .start_session()
            .await
            .map_err(|e| Error::store(stream, e))?;
        session
            .start_transaction()
            .await
            .map_err(|e| Error::store(stream, e))?;
        // Writing the lease in the transaction makes a concurrent takeover conflict with
        // it: one of the two fails and is retried.
        let held = self
            .coll
            .update_one(
                held_filter(lease),
                doc! { "$set": { "lease.lastWrite": bson::DateTime::now() } },
            )
            .session(&mut session)
            .await
            .map_err(|e| Error::store(stream, e))?;
        if held.matched_count == 0 {
            let _ = session.abort_transaction().await;
            return Err(self.fenced(lease).await);
        }
        self.letters
            .clone_with_type::<Document>()
            .update_one(
                doc! { "_id": { "stream": stream, "id": &letter.id } },
                doc! { "$setOnInsert": Self::letter_body(letter) },
            )
            .upsert(true)
            .session(&mut session)
            .await
            .map_err(|e| Error::store(stream, e))?;
        session
            .commit_transaction()
            .await
            .map_err(|e| Error::store(stream, e))
    }

    fn describe(&self) -> String {
        ResumeStore::describe(self)
    }
}
