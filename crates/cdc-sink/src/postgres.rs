//! [`PostgresSink`]: one table per collection, upserts and deletes in one transaction per
//! batch, optionally with the checkpoint in that same transaction.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
};

use async_trait::async_trait;
use cdc_core::{BoxError, ChangeEvent, Lease, OperationType};
use cdc_processor::{Batch, BatchDispatcher, HandlerContext};
use cdc_resume::PostgresStore;
use tokio_postgres::Client;

use crate::Error;

/// A document's last change in a batch.
enum Change {
    /// The full document as relaxed Extended JSON, at its cluster time.
    Upsert(serde_json::Value, (i64, i64)),
    /// A delete at its cluster time.
    Delete((i64, i64)),
}

/// Writes each collection's documents into a table `<prefix><collection>` (`id` the
/// document's `_id` as canonical Extended JSON, `doc` the document as `jsonb`, and the
/// cluster time of the change that wrote it): inserts, replaces and updates upsert the
/// full document, deletes delete, one transaction per batch. A row only ever moves
/// forward in cluster time, so a batch delivered again after a crash changes nothing.
///
/// With [`PostgresSink::checkpoint_with`], the batch's last point is saved in the same
/// transaction: the table's effects and the checkpoint commit together (exactly once
/// across crashes). That needs batches in stream order: a processor with `concurrency(1)`,
/// and `handler_checkpoints(true)` (the store is then ahead of the processor's own saves).
///
/// Updates need their full document: configure the processor with
/// `full_document(FullDocument::UpdateLookup)` (or post-images).
pub struct PostgresSink {
    /// The connection; `None` until (re)opened through `reconnect`.
    client: tokio::sync::Mutex<Option<Client>>,
    /// Where a lost connection is opened again (a sink built on a given client has none).
    reconnect: Option<Arc<PostgresStore>>,
    prefix: String,
    checkpoint: Option<(Arc<PostgresStore>, String)>,
    created: Mutex<HashSet<String>>,
    /// The stream's full documents come from `updateLookup`.
    update_lookup: bool,
}

impl std::fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSink")
            .field("prefix", &self.prefix)
            .field("checkpoint", &self.checkpoint.as_ref().map(|(_, s)| s))
            .finish_non_exhaustive()
    }
}

impl PostgresSink {
    /// A sink writing through `client` into tables named `<prefix><collection>`. When
    /// that connection is lost, every later batch fails: prefer
    /// [`PostgresSink::reconnecting`].
    pub fn new(client: Client, prefix: impl Into<String>) -> Self {
        Self {
            client: tokio::sync::Mutex::new(Some(client)),
            reconnect: None,
            prefix: prefix.into(),
            checkpoint: None,
            created: Mutex::new(HashSet::new()),
            update_lookup: false,
        }
    }

    /// A sink writing into tables named `<prefix><collection>` in the database of
    /// `store`, through its own connection ([`PostgresStore::open_client`]), opened at the
    /// first batch and again whenever it was lost (a restarted or unreachable server).
    pub fn reconnecting(store: Arc<PostgresStore>, prefix: impl Into<String>) -> Self {
        Self {
            client: tokio::sync::Mutex::new(None),
            reconnect: Some(store),
            prefix: prefix.into(),
            checkpoint: None,
            created: Mutex::new(HashSet::new()),
            update_lookup: false,
        }
    }

    /// Says the stream's full documents come from `updateLookup`
    /// (`FullDocument::UpdateLookup`): an update whose looked-up document is `null` is of
    /// a document deleted since (its delete follows in the stream), and changes nothing.
    /// Otherwise (the default, and with post-images) such an update is an error: the
    /// document it wrote is unknown.
    #[must_use]
    pub fn update_lookup(mut self, on: bool) -> Self {
        self.update_lookup = on;
        self
    }

    /// Saves the point of stream `stream` in `store` (which must live in the same
    /// database) in each batch's transaction.
    #[must_use]
    pub fn checkpoint_with(mut self, store: Arc<PostgresStore>, stream: impl Into<String>) -> Self {
        self.checkpoint = Some((store, stream.into()));
        self
    }

    /// The quoted table name of `coll`.
    fn table(&self, coll: &str) -> Result<String, Error> {
        let name = format!("{}{coll}", self.prefix);
        if name.is_empty() || name.len() > 63 || name.contains('\0') {
            return Err(Error::refused(
                SERVICE,
                format!(
                    "table name {name:?} for collection {coll:?} does not fit PostgreSQL's 63 bytes"
                ),
                None,
            ));
        }
        Ok(format!("\"{}\"", name.replace('"', "\"\"")))
    }

    /// Writes `events` (in stream order) in one transaction, with the checkpoint if asked.
    ///
    /// # Errors
    /// [`Error::Refused`] for an update without its full document, a table name that
    /// does not fit, or a value the database refuses; [`Error::Unavailable`] when the
    /// database is away (connection lost, shutting down, a serialization failure);
    /// [`Error::Store`] when the checkpoint's store fails. The transaction is rolled back:
    /// nothing of the batch is written.
    pub async fn write_events<'a>(
        &self,
        events: impl IntoIterator<Item = &'a ChangeEvent>,
    ) -> Result<(), Error> {
        self.write(events.into_iter().collect(), None).await
    }

    /// As [`PostgresSink::write_events`], with the checkpoint fenced by `lease` (a
    /// processor with a leased `PostgresStore` hands its lease to its handlers): once
    /// another instance holds the stream, nothing of the batch commits.
    ///
    /// # Errors
    /// As [`PostgresSink::write_events`]; [`Error::Store`] of kind
    /// [`crate::ErrorKind::Fenced`] when `lease` is no longer the newest.
    pub async fn write_events_fenced<'a>(
        &self,
        lease: &Lease,
        events: impl IntoIterator<Item = &'a ChangeEvent>,
    ) -> Result<(), Error> {
        self.write(events.into_iter().collect(), Some(lease)).await
    }

    async fn write(&self, events: Vec<&ChangeEvent>, lease: Option<&Lease>) -> Result<(), Error> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            let Some(store) = &self.reconnect else {
                return Err(Error::Config(
                    "the PostgreSQL sink's connection is closed, and a sink built on a given client cannot reconnect (build it with PostgresSink::reconnecting)".into(),
                ));
            };
            // The created tables may be gone with a restored server: check again.
            self.created
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            *slot = Some(store.open_client().await.map_err(Error::Store)?);
        }
        let Some(client) = slot.as_mut() else {
            return Err(Error::unavailable(SERVICE, "no connection", None));
        };
        let tx = client.transaction().await.map_err(classify)?;
        // The batch's last change per document and table: rows only move forward, so the
        // last state is what the table must hold; one statement per table and kind then
        // writes them all (a statement may not touch one row twice).
        let mut tables: Vec<(String, HashMap<String, Change>)> = Vec::new();
        for event in &events {
            let Some(coll) = event.ns.as_ref().and_then(|n| n.coll.as_deref()) else {
                continue;
            };
            let Some(id) = event.document_id() else {
                continue;
            };
            let table = self.table(coll)?;
            let key = id.into_canonical_extjson().to_string();
            let at = (
                i64::from(event.cluster_time.time),
                i64::from(event.cluster_time.increment),
            );
            let change = match event.operation_type {
                OperationType::Insert
                | OperationType::Replace
                | OperationType::Update
                | OperationType::Snapshot => {
                    let looked_up_gone = self.update_lookup
                        && event.operation_type == OperationType::Update
                        && event
                            .raw()
                            .and_then(|r| r.get("fullDocument").ok().flatten())
                            .is_some_and(|d| matches!(d, bson::RawBsonRef::Null));
                    let doc = match event.full_document() {
                        Some(doc) => doc,
                        // Deleted after this update, before the lookup: its delete follows.
                        None if looked_up_gone => continue,
                        None => {
                            return Err(Error::refused(
                                SERVICE,
                                format!(
                                    "the {} event of {key} in {coll} has no full document: the PostgreSQL sink needs full_document(UpdateLookup) or post-images",
                                    event.operation_type
                                ),
                                None,
                            ));
                        }
                    };
                    let doc = bson::Document::try_from(doc).map_err(|e| {
                        Error::refused(SERVICE, "the document is not valid BSON", Some(e.into()))
                    })?;
                    Change::Upsert(
                        cdc_core::support::to_relaxed_json(bson::Bson::Document(doc)),
                        at,
                    )
                }
                OperationType::Delete => Change::Delete(at),
                _ => continue,
            };
            let rows = match tables.iter_mut().position(|(t, _)| *t == table) {
                Some(i) => &mut tables[i].1,
                None => {
                    tables.push((table, HashMap::new()));
                    let last = tables.len() - 1;
                    &mut tables[last].1
                }
            };
            rows.insert(key, change);
        }
        for (table, rows) in &tables {
            let created = self
                .created
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(table);
            if !created {
                tx.batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {table} (
                        id TEXT PRIMARY KEY,
                        doc JSONB NOT NULL,
                        ct_time BIGINT NOT NULL,
                        ct_increment BIGINT NOT NULL
                    )"
                ))
                .await
                .map_err(classify)?;
            }
            let (mut up_ids, mut up_docs, mut up_t, mut up_i) = (vec![], vec![], vec![], vec![]);
            let (mut del_ids, mut del_t, mut del_i) = (vec![], vec![], vec![]);
            for (key, change) in rows {
                match change {
                    Change::Upsert(doc, (t, i)) => {
                        up_ids.push(key.as_str());
                        up_docs.push(doc);
                        up_t.push(*t);
                        up_i.push(*i);
                    }
                    Change::Delete((t, i)) => {
                        del_ids.push(key.as_str());
                        del_t.push(*t);
                        del_i.push(*i);
                    }
                }
            }
            if !up_ids.is_empty() {
                tx.execute(
                    &format!(
                        "INSERT INTO {table} AS t (id, doc, ct_time, ct_increment)
                         SELECT * FROM unnest($1::text[], $2::jsonb[], $3::bigint[], $4::bigint[])
                         ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc,
                            ct_time = EXCLUDED.ct_time, ct_increment = EXCLUDED.ct_increment
                         WHERE (t.ct_time, t.ct_increment) <= (EXCLUDED.ct_time, EXCLUDED.ct_increment)"
                    ),
                    &[&up_ids, &up_docs, &up_t, &up_i],
                )
                .await
                .map_err(classify)?;
            }
            if !del_ids.is_empty() {
                tx.execute(
                    &format!(
                        "DELETE FROM {table} AS t
                         USING unnest($1::text[], $2::bigint[], $3::bigint[]) AS d(id, ct_time, ct_increment)
                         WHERE t.id = d.id AND (t.ct_time, t.ct_increment) <= (d.ct_time, d.ct_increment)"
                    ),
                    &[&del_ids, &del_t, &del_i],
                )
                .await
                .map_err(classify)?;
            }
        }
        if let (Some((store, stream)), Some(last)) = (&self.checkpoint, events.last()) {
            let point = last.resume_point(bson::DateTime::now());
            let saved = match lease {
                Some(lease) if lease.stream == *stream => {
                    store.save_in_fenced(&tx, lease, &point).await
                }
                Some(lease) => {
                    return Err(Error::Config(format!(
                        "the sink checkpoints stream `{stream}` but runs under the lease of `{}`",
                        lease.stream
                    )));
                }
                None => store.save_in(&tx, stream, &point).await,
            };
            match saved {
                Ok(()) => {}
                // The stored point is past this batch: it was committed before, with its
                // rows (a batch delivered again); writing it again would change nothing.
                Err(cdc_core::Error::Regression { .. }) => {
                    tx.rollback().await.map_err(classify)?;
                    return Ok(());
                }
                Err(e) => return Err(Error::Store(e)),
            }
        }
        tx.commit().await.map_err(classify)?;
        for event in &events {
            if let Some(coll) = event.ns.as_ref().and_then(|n| n.coll.as_deref())
                && let Ok(table) = self.table(coll)
            {
                self.created
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(table);
            }
        }
        Ok(())
    }
}

/// The service named in the sink's errors.
const SERVICE: &str = "the PostgreSQL sink's database";

/// A failure of PostgreSQL rather than of the change — the connection lost or refused,
/// a server shutting down, too many connections, a serialization failure or deadlock —
/// is [`Error::Unavailable`], which the processor waits out instead of giving up on the
/// change; an error about the data (a value PostgreSQL refuses) is [`Error::Refused`].
fn classify(error: tokio_postgres::Error) -> Error {
    let outage = match error.code() {
        None => true,
        Some(code) => {
            let code = code.code();
            ["08", "40", "53", "57P", "58"]
                .iter()
                .any(|class| code.starts_with(class))
        }
    };
    let reason = error.to_string();
    if outage {
        Error::unavailable(SERVICE, reason, Some(error.into()))
    } else {
        Error::refused(SERVICE, reason, Some(error.into()))
    }
}

#[async_trait]
impl BatchDispatcher for PostgresSink {
    async fn dispatch_batch(
        &self,
        batch: &Batch<'_>,
        ctx: &HandlerContext,
    ) -> Result<(), BoxError> {
        if self.checkpoint.is_some() && ctx.lane().is_some_and(|l| l > 0) {
            return Err(Error::Config(
                "the PostgreSQL sink saves checkpoints in its transactions, which needs batches in stream order: build the processor with concurrency(1)".into(),
            )
            .into());
        }
        self.write(batch.events().to_vec(), ctx.lease())
            .await
            .map_err(Error::into_handler_error)
    }
}
