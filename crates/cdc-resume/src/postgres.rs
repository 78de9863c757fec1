//! [`PostgresStore`]: one row per stream id in a table the store creates if missing.

use async_trait::async_trait;
use bson::DateTime;
use cdc_core::{
    ClusterTime, DeadLetter, DeadLetterStore, Error, Lease, LeaseStore, OperationType, Result,
    ResumePoint, ResumeStore, ResumeToken, validate_stream_id,
};
use tokio_postgres::{Client, GenericClient, NoTls};

/// Keeps `(stream_id, token, ct_time, ct_increment, operation_type, saved_at_ms)` rows.
///
/// A save is one `INSERT … ON CONFLICT DO UPDATE … WHERE` the stored point is not newer.
/// [`PostgresStore::save_in`] takes the caller's open transaction, so a consumer that
/// writes into PostgreSQL commits its rows and the checkpoint atomically: effectively
/// exactly-once delivery into PostgreSQL.
pub struct PostgresStore {
    config: String,
    shown: String,
    table: String,
    /// `<table>_dead_letters`.
    letters: String,
    /// `<table>_leases`: one row per stream (owner, token, expiry by the server's clock).
    leases: String,
    /// The TLS connector when the connection string requires TLS.
    tls: Option<crate::pg_tls::RustlsConnect>,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("server", &self.shown)
            .field("table", &self.table)
            .finish()
    }
}

/// Drives a connection until it closes, logging why.
async fn watch<F: Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::warn!(error = %e, "PostgreSQL resume store connection closed");
    }
}

fn valid_table(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl PostgresStore {
    /// The default table name.
    pub const DEFAULT_TABLE: &'static str = "cdc_resume_points";

    /// Connects with a libpq-style connection string or URL and creates `table` if missing.
    /// Every connection (this one, and each [`PostgresStore::open_client`] or reconnection)
    /// must be ready within 10 s, TLS and authentication included.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad table name or connection string;
    /// [`Error::Store`] when the server cannot be reached.
    pub async fn connect(config: &str, table: &str) -> Result<Self> {
        if !valid_table(table) {
            return Err(Error::InvalidArgument {
                name: "table",
                reason: format!("{table:?} is not a plain SQL identifier"),
            });
        }
        let letters = format!("{table}_dead_letters");
        if !valid_table(&letters) {
            return Err(Error::InvalidArgument {
                name: "table",
                reason: format!(
                    "{table:?} is too long: the dead-letter table {letters:?} must fit PostgreSQL's 63 bytes"
                ),
            });
        }
        let shown_original = crate::redact::postgres(config);
        let wanted = crate::pg_tls::wanted(config).map_err(|reason| Error::InvalidArgument {
            name: "config",
            reason: format!("{shown_original}: {reason}"),
        })?;
        let tls = wanted
            .tls
            .as_ref()
            .map(|root| crate::pg_tls::RustlsConnect::new(root.as_deref()))
            .transpose()
            .map_err(|reason| Error::InvalidArgument {
                name: "config",
                reason: format!("{shown_original}: {reason}"),
            })?;
        let store = Self {
            shown: crate::redact::postgres(&wanted.config),
            config: wanted.config,
            tls,
            table: table.to_owned(),
            leases: format!("{table}_leases"),
            letters,
            client: tokio::sync::Mutex::new(None),
        };
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {} (
                stream_id TEXT PRIMARY KEY,
                token BYTEA NOT NULL,
                ct_time BIGINT NOT NULL,
                ct_increment BIGINT NOT NULL,
                operation_type TEXT,
                saved_at_ms BIGINT NOT NULL,
                origin TEXT
            );
            ALTER TABLE {} ADD COLUMN IF NOT EXISTS origin TEXT;
            CREATE TABLE IF NOT EXISTS {} (
                stream_id TEXT NOT NULL,
                letter_id TEXT NOT NULL,
                token BYTEA NOT NULL,
                ct_time BIGINT NOT NULL,
                ct_increment BIGINT NOT NULL,
                event BYTEA NOT NULL,
                errors TEXT[] NOT NULL,
                attempts BIGINT NOT NULL,
                recorded_at_ms BIGINT NOT NULL,
                parked BOOLEAN NOT NULL,
                PRIMARY KEY (stream_id, letter_id)
            );
            CREATE TABLE IF NOT EXISTS {} (
                stream_id TEXT PRIMARY KEY,
                owner TEXT NOT NULL,
                token BIGINT NOT NULL,
                expires_at TIMESTAMPTZ NOT NULL
            )",
            store.table, store.table, store.letters, store.leases
        );
        {
            let client = store.client("*").await?;
            client
                .batch_execute(&create)
                .await
                .map_err(|e| Error::store("*", e))?;
        }
        Ok(store)
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The dead-letter table's name (`<table>_dead_letters`).
    pub fn dead_letters_table(&self) -> &str {
        &self.letters
    }

    async fn client(&self, stream: &str) -> Result<tokio::sync::MappedMutexGuard<'_, Client>> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(self.open(stream).await?);
        }
        tokio::sync::MutexGuard::try_map(slot, Option::as_mut)
            .map_err(|_| Error::store(stream, std::io::Error::other("no PostgreSQL connection")))
    }

    /// A new connection to the store's database, with the store's settings (TLS too): for
    /// a writer that saves points in its own transactions ([`PostgresStore::save_in`]),
    /// such as a sink, and reconnects when its connection is lost.
    ///
    /// # Errors
    /// [`Error::Store`] when the server cannot be reached (credentials never shown).
    pub async fn open_client(&self) -> Result<Client> {
        self.open("*").await
    }

    async fn open(&self, stream: &str) -> Result<Client> {
        let failed = |e: std::io::Error| {
            // Opening for no stream in particular (start-up, a check): say what is away.
            if stream == "*" {
                Error::unavailable("the PostgreSQL store", e)
            } else {
                Error::store(stream, e)
            }
        };
        let fail = |e: tokio_postgres::Error| {
            // The driver's message and its cause (a TLS refusal says why).
            let cause = std::error::Error::source(&e)
                .map(|c| format!(": {c}"))
                .unwrap_or_default();
            failed(std::io::Error::other(format!("{}: {e}{cause}", self.shown)))
        };
        let connecting = async {
            Ok(match &self.tls {
                None => {
                    let (client, connection) = tokio_postgres::connect(&self.config, NoTls)
                        .await
                        .map_err(fail)?;
                    tokio::spawn(watch(connection));
                    client
                }
                Some(tls) => {
                    let (client, connection) = tokio_postgres::connect(&self.config, tls.clone())
                        .await
                        .map_err(fail)?;
                    tokio::spawn(watch(connection));
                    client
                }
            })
        };
        // A server that accepts and then says nothing (stalled) must not hold a start-up,
        // a check or a reconnection without end.
        match tokio::time::timeout(CONNECT_DEADLINE, connecting).await {
            Ok(result) => result,
            Err(_) => Err(failed(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "{}: the connection was not ready within {} s",
                    self.shown,
                    CONNECT_DEADLINE.as_secs()
                ),
            ))),
        }
    }

    /// The conditional upsert of a point ($1–$7; a point without an origin, a sink's own
    /// checkpoint, keeps the stored one); fenced, it inserts only while the lease of owner
    /// $8 with token $9 is the newest (reading the lease row `FOR SHARE`).
    fn upsert_sql(&self, fenced: bool) -> String {
        let source = if fenced {
            format!(
                "WITH lease AS (
                    SELECT 1 FROM {l} WHERE stream_id = $1 AND owner = $8 AND token = $9 FOR SHARE
                 )
                 INSERT INTO {t} (stream_id, token, ct_time, ct_increment, operation_type, saved_at_ms, origin)
                 SELECT $1::text, $2::bytea, $3::bigint, $4::bigint, $5::text, $6::bigint, $7::text FROM lease",
                l = self.leases,
                t = self.table
            )
        } else {
            format!(
                "INSERT INTO {t} (stream_id, token, ct_time, ct_increment, operation_type, saved_at_ms, origin)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                t = self.table
            )
        };
        format!(
            "{source}
             ON CONFLICT (stream_id) DO UPDATE SET
                token = EXCLUDED.token, ct_time = EXCLUDED.ct_time, ct_increment = EXCLUDED.ct_increment,
                operation_type = EXCLUDED.operation_type, saved_at_ms = EXCLUDED.saved_at_ms,
                origin = COALESCE(EXCLUDED.origin, {t}.origin)
             WHERE ({t}.ct_time, {t}.ct_increment) <= (EXCLUDED.ct_time, EXCLUDED.ct_increment)
               AND {t}.ct_time BETWEEN 0 AND 4294967295 AND {t}.ct_increment BETWEEN 0 AND 4294967295",
            t = self.table
        )
    }

    /// Runs the upsert of `point` (fenced by `fence`); the rows written.
    async fn upsert(
        &self,
        client: &impl GenericClient,
        stream: &str,
        point: &ResumePoint,
        fence: Option<&Lease>,
    ) -> Result<u64> {
        let op = point.operation_type.as_ref().map(OperationType::as_str);
        let (token, time, increment, saved) = (
            point.token.as_bytes(),
            i64::from(point.cluster_time.time),
            i64::from(point.cluster_time.increment),
            point.saved_at.timestamp_millis(),
        );
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
            &stream,
            &token,
            &time,
            &increment,
            &op,
            &saved,
            &point.origin,
        ];
        let fence_token = fence.map(token_of);
        if let (Some(lease), Some(t)) = (fence, fence_token.as_ref()) {
            params.push(&lease.owner);
            params.push(t);
        }
        client
            .execute(&self.upsert_sql(fence.is_some()), &params)
            .await
            .map_err(|e| Error::store(stream, e))
    }

    /// The error of a save that wrote nothing: the stored point is newer.
    async fn regression(
        &self,
        client: &impl GenericClient,
        stream: &str,
        point: &ResumePoint,
    ) -> Error {
        match self.load_with(client, stream).await {
            Ok(stored) => Error::Regression {
                stream: stream.to_owned(),
                stored: stored.map(|p| p.cluster_time).unwrap_or_default(),
                attempted: point.cluster_time,
            },
            Err(e) => e,
        }
    }

    /// Saves through the caller's client or open transaction: the checkpoint commits or
    /// rolls back with the caller's own rows.
    ///
    /// # Errors
    /// As [`ResumeStore::save`].
    pub async fn save_in(
        &self,
        client: &impl GenericClient,
        stream: &str,
        point: &ResumePoint,
    ) -> Result<()> {
        validate_stream_id(stream)?;
        if self.upsert(client, stream, point, None).await? == 1 {
            return Ok(());
        }
        Err(self.regression(client, stream, point).await)
    }

    /// As [`PostgresStore::save_in`], fenced by `lease` (as
    /// [`LeaseStore::save_fenced`]): a sink committing its rows and the checkpoint in one
    /// transaction under a lease.
    ///
    /// # Errors
    /// As [`LeaseStore::save_fenced`].
    pub async fn save_in_fenced(
        &self,
        client: &impl GenericClient,
        lease: &Lease,
        point: &ResumePoint,
    ) -> Result<()> {
        let stream = lease.stream.as_str();
        validate_stream_id(stream)?;
        if self.upsert(client, stream, point, Some(lease)).await? == 1 {
            return Ok(());
        }
        if !self.admits(client, lease).await? {
            return Err(self.fenced(client, lease).await);
        }
        Err(self.regression(client, stream, point).await)
    }

    async fn load_with(
        &self,
        client: &impl GenericClient,
        stream: &str,
    ) -> Result<Option<ResumePoint>> {
        let sql = format!(
            "SELECT token, ct_time, ct_increment, operation_type, saved_at_ms, origin FROM {} WHERE stream_id = $1",
            self.table
        );
        let row = client
            .query_opt(&sql, &[&stream])
            .await
            .map_err(|e| Error::store(stream, e))?;
        let Some(row) = row else { return Ok(None) };
        let corrupt = |reason: String| Error::CorruptPoint {
            stream: stream.to_owned(),
            location: format!("{} table {} stream_id = {stream:?}", self.shown, self.table),
            reason,
        };
        let token: Vec<u8> = row.try_get(0).map_err(|e| corrupt(format!("token: {e}")))?;
        let token = ResumeToken::from_bytes(token)
            .map_err(|e| corrupt(format!("token is not BSON: {e}")))?;
        let part = |i: usize, name: &str| -> Result<u32> {
            let v: i64 = row
                .try_get(i)
                .map_err(|e| corrupt(format!("{name}: {e}")))?;
            u32::try_from(v).map_err(|_| corrupt(format!("{name} {v} is out of range")))
        };
        let cluster_time = ClusterTime::new(part(1, "ct_time")?, part(2, "ct_increment")?);
        let op: Option<String> = row
            .try_get(3)
            .map_err(|e| corrupt(format!("operation_type: {e}")))?;
        let saved_at: i64 = row
            .try_get(4)
            .map_err(|e| corrupt(format!("saved_at_ms: {e}")))?;
        let origin: Option<String> = row
            .try_get(5)
            .map_err(|e| corrupt(format!("origin: {e}")))?;
        let mut point =
            ResumePoint::post_batch(token, cluster_time, DateTime::from_millis(saved_at));
        point.operation_type = op.as_deref().map(OperationType::parse);
        point.origin = origin;
        Ok(Some(point))
    }
}

/// How long a connection may take to be ready (TCP, TLS, authentication).
const CONNECT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

#[async_trait]
impl ResumeStore for PostgresStore {
    async fn load(&self, stream: &str) -> Result<Option<ResumePoint>> {
        validate_stream_id(stream)?;
        let client = self.client(stream).await?;
        self.load_with(&*client, stream).await
    }

    async fn save(&self, stream: &str, point: &ResumePoint) -> Result<()> {
        validate_stream_id(stream)?;
        let client = self.client(stream).await?;
        self.save_in(&*client, stream, point).await
    }

    async fn delete(&self, stream: &str) -> Result<()> {
        validate_stream_id(stream)?;
        let client = self.client(stream).await?;
        let sql = format!("DELETE FROM {} WHERE stream_id = $1", self.table);
        client
            .execute(&sql, &[&stream])
            .await
            .map_err(|e| Error::store(stream, e))?;
        Ok(())
    }

    async fn list_streams(&self) -> Result<Vec<String>> {
        let client = self.client("*").await?;
        let sql = format!("SELECT stream_id FROM {} ORDER BY stream_id", self.table);
        let rows = client
            .query(&sql, &[])
            .await
            .map_err(|e| Error::store("*", e))?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(|e| Error::store("*", e)))
            .collect()
    }

    fn describe(&self) -> String {
        format!("postgres:{} table {}", self.shown, self.table)
    }
}

#[async_trait]
impl DeadLetterStore for PostgresStore {
    async fn record(&self, letter: &DeadLetter) -> Result<()> {
        validate_stream_id(&letter.stream)?;
        let client = self.client(&letter.stream).await?;
        self.insert_letter(&client, letter, None).await?;
        Ok(())
    }

    async fn list(&self, stream: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        validate_stream_id(stream)?;
        let client = self.client(stream).await?;
        let sql = format!(
            "SELECT letter_id, token, ct_time, ct_increment, event, errors, attempts,
                    recorded_at_ms, parked
             FROM {} WHERE stream_id = $1
             ORDER BY ct_time, ct_increment, letter_id COLLATE \"C\" LIMIT $2",
            self.letters
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(&sql, &[&stream, &limit])
            .await
            .map_err(|e| Error::store(stream, e))?;
        let corrupt = |reason: String| Error::CorruptPoint {
            stream: stream.to_owned(),
            location: format!(
                "{} table {} stream_id = {stream:?}",
                self.shown, self.letters
            ),
            reason: format!("dead letter: {reason}"),
        };
        let mut letters = Vec::with_capacity(rows.len());
        for row in rows {
            let get_u32 = |i: usize, name: &str| -> Result<u32> {
                let v: i64 = row
                    .try_get(i)
                    .map_err(|e| corrupt(format!("{name}: {e}")))?;
                u32::try_from(v).map_err(|_| corrupt(format!("{name} {v} is out of range")))
            };
            let token: Vec<u8> = row.try_get(1).map_err(|e| corrupt(format!("token: {e}")))?;
            letters.push(DeadLetter {
                stream: stream.to_owned(),
                id: row
                    .try_get(0)
                    .map_err(|e| corrupt(format!("letter_id: {e}")))?,
                token: ResumeToken::from_bytes(token)
                    .map_err(|e| corrupt(format!("token is not BSON: {e}")))?,
                cluster_time: ClusterTime::new(get_u32(2, "ct_time")?, get_u32(3, "ct_increment")?),
                event: row.try_get(4).map_err(|e| corrupt(format!("event: {e}")))?,
                errors: row
                    .try_get(5)
                    .map_err(|e| corrupt(format!("errors: {e}")))?,
                attempts: get_u32(6, "attempts")?,
                recorded_at: DateTime::from_millis(
                    row.try_get(7)
                        .map_err(|e| corrupt(format!("recorded_at_ms: {e}")))?,
                ),
                parked: row
                    .try_get(8)
                    .map_err(|e| corrupt(format!("parked: {e}")))?,
            });
        }
        letters.sort_by(DeadLetter::stream_order);
        Ok(letters)
    }

    async fn count(&self, stream: &str) -> Result<u64> {
        validate_stream_id(stream)?;
        let client = self.client(stream).await?;
        let sql = format!("SELECT count(*) FROM {} WHERE stream_id = $1", self.letters);
        let row = client
            .query_one(&sql, &[&stream])
            .await
            .map_err(|e| Error::store(stream, e))?;
        let n: i64 = row.try_get(0).map_err(|e| Error::store(stream, e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn remove(&self, stream: &str, id: &str) -> Result<bool> {
        validate_stream_id(stream)?;
        let client = self.client(stream).await?;
        let sql = format!(
            "DELETE FROM {} WHERE stream_id = $1 AND letter_id = $2",
            self.letters
        );
        let n = client
            .execute(&sql, &[&stream, &id])
            .await
            .map_err(|e| Error::store(stream, e))?;
        Ok(n > 0)
    }

    fn describe(&self) -> String {
        format!("postgres:{} table {}", self.shown, self.letters)
    }
}

impl PostgresStore {
    /// Inserts a dead letter once (a letter whose id is recorded stays as it is); with a
    /// lease, only while it is the newest (the insert reads the lease row `FOR SHARE`).
    /// The rows inserted.
    async fn insert_letter(
        &self,
        client: &Client,
        letter: &DeadLetter,
        fence: Option<&Lease>,
    ) -> Result<u64> {
        let columns = "stream_id, letter_id, token, ct_time, ct_increment, event, errors,
                attempts, recorded_at_ms, parked";
        let sql = match fence {
            None => format!(
                "INSERT INTO {d} ({columns})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (stream_id, letter_id) DO NOTHING",
                d = self.letters
            ),
            Some(_) => format!(
                "WITH lease AS (
                    SELECT 1 FROM {l} WHERE stream_id = $1 AND owner = $11 AND token = $12 FOR SHARE
                 )
                 INSERT INTO {d} ({columns})
                 SELECT $1::text, $2::text, $3::bytea, $4::bigint, $5::bigint, $6::bytea, $7::text[],
                    $8::bigint, $9::bigint, $10::boolean FROM lease
                 ON CONFLICT (stream_id, letter_id) DO NOTHING",
                l = self.leases,
                d = self.letters
            ),
        };
        let (token, time, increment, attempts, recorded) = (
            letter.token.as_bytes(),
            i64::from(letter.cluster_time.time),
            i64::from(letter.cluster_time.increment),
            i64::from(letter.attempts),
            letter.recorded_at.timestamp_millis(),
        );
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
            &letter.stream,
            &letter.id,
            &token,
            &time,
            &increment,
            &letter.event,
            &letter.errors,
            &attempts,
            &recorded,
            &letter.parked,
        ];
        let fence_token = fence.map(token_of);
        if let (Some(lease), Some(t)) = (fence, fence_token.as_ref()) {
            params.push(&lease.owner);
            params.push(t);
        }
        client
            .execute(&sql, &params)
            .await
            .map_err(|e| Error::store(letter.stream.as_str(), e))
    }
}

/// Milliseconds since the Unix epoch of a `timestamptz` column, in SQL.
fn millis(column: &str) -> String {
    format!("(extract(epoch from {column}) * 1000)::bigint")
}

impl PostgresStore {
    /// The lease table.
    pub fn leases_table(&self) -> &str {
        &self.leases
    }

    /// The newest token of `stream`'s lease, for a `Fenced` error.
    async fn newest_token(&self, client: &impl GenericClient, stream: &str) -> Result<Option<u64>> {
        let sql = format!("SELECT token FROM {} WHERE stream_id = $1", self.leases);
        let row = client
            .query_opt(&sql, &[&stream])
            .await
            .map_err(|e| Error::store(stream, e))?;
        Ok(row
            .and_then(|r| r.try_get::<_, i64>(0).ok())
            .and_then(|t| u64::try_from(t).ok()))
    }

    /// Whether `lease` is the newest on its stream (a fenced write may go on).
    async fn admits(&self, client: &impl GenericClient, lease: &Lease) -> Result<bool> {
        let sql = format!(
            "SELECT 1 FROM {} WHERE stream_id = $1 AND owner = $2 AND token = $3",
            self.leases
        );
        let row = client
            .query_opt(&sql, &[&lease.stream, &lease.owner, &token_of(lease)])
            .await
            .map_err(|e| Error::store(lease.stream.as_str(), e))?;
        Ok(row.is_some())
    }

    async fn fenced(&self, client: &impl GenericClient, lease: &Lease) -> Error {
        match self.newest_token(client, &lease.stream).await {
            Ok(newest) => Error::Fenced {
                stream: lease.stream.clone(),
                token: lease.token,
                newest,
            },
            Err(e) => e,
        }
    }
}

fn token_of(lease: &Lease) -> i64 {
    i64::try_from(lease.token).unwrap_or(i64::MAX)
}

fn lease_of(stream: &str, owner: &str, row: &tokio_postgres::Row) -> Result<Lease> {
    let token: i64 = row.try_get(0).map_err(|e| Error::store(stream, e))?;
    let expires: i64 = row.try_get(1).map_err(|e| Error::store(stream, e))?;
    Ok(Lease::new(
        stream,
        owner,
        u64::try_from(token).unwrap_or_default(),
        expires,
    ))
}

/// Leases in `<table>_leases`, one row per stream, changed by single statements on the
/// server's clock (`clock_timestamp()`); a fenced save or letter is one statement whose
/// insert reads the lease row `FOR SHARE`, so a takeover and the write are ordered.
#[async_trait]
impl LeaseStore for PostgresStore {
    async fn acquire(
        &self,
        stream: &str,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<Lease>> {
        validate_stream_id(stream)?;
        let client = self.client(stream).await?;
        let sql = format!(
            "INSERT INTO {l} AS l (stream_id, owner, token, expires_at)
             VALUES ($1, $2, 1, clock_timestamp() + $3::bigint * interval '1 millisecond')
             ON CONFLICT (stream_id) DO UPDATE SET
                token = CASE WHEN l.expires_at > clock_timestamp() THEN l.token ELSE l.token + 1 END,
                owner = EXCLUDED.owner,
                expires_at = EXCLUDED.expires_at
             WHERE l.expires_at <= clock_timestamp() OR l.owner = EXCLUDED.owner
             RETURNING token, {ms}",
            l = self.leases,
            ms = millis("expires_at"),
        );
        let row = client
            .query_opt(&sql, &[&stream, &owner, &cdc_core::support::ttl_ms(ttl)])
            .await
            .map_err(|e| Error::store(stream, e))?;
        row.map(|r| lease_of(stream, owner, &r)).transpose()
    }

    async fn renew(&self, lease: &Lease, ttl: std::time::Duration) -> Result<Lease> {
        let client = self.client(&lease.stream).await?;
        let sql = format!(
            "UPDATE {} SET expires_at = clock_timestamp() + $4::bigint * interval '1 millisecond'
             WHERE stream_id = $1 AND owner = $2 AND token = $3 AND expires_at > clock_timestamp()
             RETURNING token, {}",
            self.leases,
            millis("expires_at")
        );
        let row = client
            .query_opt(
                &sql,
                &[
                    &lease.stream,
                    &lease.owner,
                    &token_of(lease),
                    &cdc_core::support::ttl_ms(ttl),
                ],
            )
            .await
            .map_err(|e| Error::store(lease.stream.as_str(), e))?;
        match row {
            Some(r) => lease_of(&lease.stream, &lease.owner, &r),
            None => Err(self.fenced(&*client, lease).await),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let client = self.client(&lease.stream).await?;
        let sql = format!(
            "UPDATE {} SET expires_at = clock_timestamp()
             WHERE stream_id = $1 AND owner = $2 AND token = $3 AND expires_at > clock_timestamp()",
            self.leases
        );
        client
            .execute(&sql, &[&lease.stream, &lease.owner, &token_of(lease)])
            .await
            .map_err(|e| Error::store(lease.stream.as_str(), e))?;
        Ok(())
    }

    async fn holder(&self, stream: &str) -> Result<Option<Lease>> {
        validate_stream_id(stream)?;
        let client = self.client(stream).await?;
        let sql = format!(
            "SELECT token, {}, owner FROM {} WHERE stream_id = $1 AND expires_at > clock_timestamp()",
            millis("expires_at"),
            self.leases
        );
        let row = client
            .query_opt(&sql, &[&stream])
            .await
            .map_err(|e| Error::store(stream, e))?;
        let Some(row) = row else { return Ok(None) };
        let owner: String = row.try_get(2).map_err(|e| Error::store(stream, e))?;
        lease_of(stream, &owner, &row).map(Some)
    }

    async fn leases(&self, prefix: &str) -> Result<Vec<Lease>> {
        let client = self.client("*").await?;
        let sql = format!(
            "SELECT token, {}, owner, stream_id FROM {}
             WHERE left(stream_id, length($1)) = $1 AND expires_at > clock_timestamp()
             ORDER BY stream_id COLLATE \"C\"",
            millis("expires_at"),
            self.leases
        );
        let rows = client
            .query(&sql, &[&prefix])
            .await
            .map_err(|e| Error::store("*", e))?;
        rows.iter()
            .map(|row| {
                let owner: String = row.try_get(2).map_err(|e| Error::store("*", e))?;
                let stream: String = row.try_get(3).map_err(|e| Error::store("*", e))?;
                lease_of(&stream, &owner, row)
            })
            .collect()
    }

    async fn save_fenced(&self, lease: &Lease, point: &ResumePoint) -> Result<()> {
        validate_stream_id(&lease.stream)?;
        let client = self.client(&lease.stream).await?;
        self.save_in_fenced(&*client, lease, point).await
    }

    async fn record_fenced(&self, lease: &Lease, letter: &DeadLetter) -> Result<()> {
        lease.covers(letter)?;
        validate_stream_id(&lease.stream)?;
        let client = self.client(&lease.stream).await?;
        let n = self.insert_letter(&client, letter, Some(lease)).await?;
        // Nothing inserted: recorded before (fine), or fenced off.
        if n == 0 && !self.admits(&*client, lease).await? {
            return Err(self.fenced(&*client, lease).await);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        ResumeStore::describe(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_and_table_names() {
        let redact = crate::redact::postgres;
        assert_eq!(redact("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact("host=h user=u password=pw dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        assert_eq!(
            redact("host=h password = 'a b' user=u"),
            "host=h password = *** user=u"
        );
        assert_eq!(
            redact("postgres://u@h/db?password=p%3Fw"),
            "postgres://u@h/db?password=***"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert!(valid_table("cdc_resume_points"));
        assert!(!valid_table("x; DROP TABLE y"));
        assert!(!valid_table("1abc"));
    }
}
