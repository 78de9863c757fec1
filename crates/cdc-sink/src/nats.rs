//! [`NatsSink`]: every change as one message on NATS JetStream, de-duplicated by an id
//! derived from the stream and the change's resume token.

use std::{
    collections::VecDeque,
    fmt,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use async_nats::jetstream::{self, message::PublishMessage as Publish};
use async_trait::async_trait;
use cdc_core::{BoxError, ChangeEvent};

use crate::Error;
use cdc_processor::{Batch, BatchDispatcher, HandlerContext};

/// How a change is put into a message's body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Body {
    /// The event as relaxed Extended JSON (numbers plain), as `JsonLines` writes it.
    #[default]
    RelaxedJson,
    /// The event as canonical Extended JSON (every type kept).
    CanonicalJson,
    /// The event's raw BSON bytes, as the server sent them.
    Bson,
}

impl std::str::FromStr for Body {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "relaxed" | "json" => Ok(Self::RelaxedJson),
            "canonical" => Ok(Self::CanonicalJson),
            "bson" => Ok(Self::Bson),
            other => Err(Error::Config(format!(
                "unknown body format `{other}`: expected `relaxed`, `canonical` or `bson`"
            ))),
        }
    }
}

/// One piece of a subject template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Db,
    Coll,
    Op,
    Stream,
}

/// A subject template such as `cdc.{db}.{coll}.{op}`: placeholders `{db}`, `{coll}`,
/// `{op}` (the operation type) and `{stream}` (the stream id). A value that cannot stand
/// in a subject token (dots, spaces, `*`, `>`) has those characters replaced by `_`; a
/// missing one (the collection of a `dropDatabase`) is `_`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectTemplate {
    pieces: Vec<Piece>,
    source: String,
}

impl SubjectTemplate {
    /// Parses `template`.
    ///
    /// # Errors
    /// [`Error::Config`] naming what is wrong: an unknown placeholder, an unclosed brace,
    /// an empty token, a wildcard or whitespace.
    pub fn parse(template: &str) -> Result<Self, Error> {
        let bad = |why: String| Error::Config(format!("subject template `{template}`: {why}"));
        if template.is_empty() {
            return Err(bad("is empty".into()));
        }
        if template.split('.').any(str::is_empty) {
            return Err(bad(
                "has an empty token (a leading, trailing or double `.`)".into(),
            ));
        }
        let mut pieces = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return Err(bad("has a `}` without its `{`".into()));
                }
                Some(i) => {
                    if i > 0 {
                        pieces.push(Piece::Text(rest[..i].to_owned()));
                    }
                    let after = &rest[i + 1..];
                    let end = after
                        .find('}')
                        .ok_or_else(|| bad("has a `{` without its `}`".into()))?;
                    pieces.push(match &after[..end] {
                        "db" => Piece::Db,
                        "coll" => Piece::Coll,
                        "op" => Piece::Op,
                        "stream" => Piece::Stream,
                        other => {
                            return Err(bad(format!(
                                "unknown placeholder `{{{other}}}` (known: {{db}}, {{coll}}, {{op}}, {{stream}})"
                            )));
                        }
                    });
                    rest = &after[end + 1..];
                }
                None => {
                    pieces.push(Piece::Text(rest.to_owned()));
                    rest = "";
                }
            }
        }
        for piece in &pieces {
            if let Piece::Text(text) = piece
                && let Some(c) = text.chars().find(|c| !subject_char(*c))
            {
                return Err(bad(format!(
                    "holds {c:?}, which a NATS subject cannot (wildcards and whitespace are not allowed)"
                )));
            }
        }
        Ok(Self {
            pieces,
            source: template.to_owned(),
        })
    }

    /// The subject of `event` published under stream id `stream`.
    pub fn render(&self, event: &ChangeEvent, stream: &str) -> String {
        let ns = event.ns.as_ref();
        let mut out = String::with_capacity(self.source.len() + 32);
        for piece in &self.pieces {
            let value = match piece {
                Piece::Text(text) => {
                    out.push_str(text);
                    continue;
                }
                Piece::Db => ns.map(|n| n.db.as_str()),
                Piece::Coll => ns.and_then(|n| n.coll.as_deref()),
                Piece::Op => Some(event.operation_type.as_str()),
                Piece::Stream => Some(stream),
            };
            push_token(&mut out, value.unwrap_or(""));
        }
        out
    }

    /// The subjects this template can produce, as a JetStream subject filter: each token
    /// with a placeholder becomes `*` (`cdc.{db}.{coll}.{op}` → `cdc.*.*.*`).
    pub fn filter(&self) -> String {
        self.source
            .split('.')
            .map(|token| if token.contains('{') { "*" } else { token })
            .collect::<Vec<_>>()
            .join(".")
    }
}

impl fmt::Display for SubjectTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn subject_char(c: char) -> bool {
    !(c.is_whitespace() || c.is_control() || c == '*' || c == '>')
}

/// Appends `value` as (part of) one subject token.
fn push_token(out: &mut String, value: &str) {
    if value.is_empty() {
        out.push('_');
        return;
    }
    out.extend(
        value
            .chars()
            .map(|c| if subject_char(c) && c != '.' { c } else { '_' }),
    );
}

/// The `Nats-Msg-Id` of `event` under stream id `stream`: the stream id and the token's
/// `_data` (unique per change and the same every time the change is delivered). A
/// snapshot row (its token has no `_data`) is named by its snapshot's identity (chosen
/// when the snapshot started, kept in the stored point), its collection and its `_id`
/// ([`cdc_core::SnapshotRow::id`]): the same when the row is read again after any number
/// of restarts. The part after the stream id is the event's dead-letter id
/// ([`cdc_core::DeadLetter::id_of`]).
pub fn message_id(stream: &str, event: &ChangeEvent) -> String {
    format!("{stream}:{}", cdc_core::DeadLetter::id_of(&event.token))
}

/// The warning for a JetStream stream whose de-duplication window is too short for the
/// checkpoint interval: after a crash the changes since the last stored point are
/// published again, up to `checkpoint_every` (plus the time to restart, `restart`) after
/// their first publication; JetStream drops them only within its window.
pub fn dedup_window_warning(
    window: Duration,
    checkpoint_every: Duration,
    restart: Duration,
) -> Option<String> {
    let needed = checkpoint_every + restart;
    (window < needed).then(|| {
        format!(
            "the JetStream stream's duplicate window ({} s) is shorter than the checkpoint interval plus restart time ({} s): changes published again after a crash may be stored twice; raise `duplicate_window` or checkpoint more often",
            window.as_secs_f64(),
            needed.as_secs_f64()
        )
    })
}

/// What a [`NatsSink`] has published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsCounters {
    /// Messages JetStream acknowledged as stored.
    pub stored: u64,
    /// Messages JetStream acknowledged as duplicates it dropped (changes published again
    /// after a crash or a retried batch).
    pub duplicates: u64,
    /// Changes not published because a later change of the same document in the same
    /// batch stood for them ([`NatsSink::coalesce`]).
    pub coalesced: u64,
    /// Bodies stored in the object store ([`NatsSink::object_store`]); a change published
    /// again finds its object and stores nothing.
    pub objects: u64,
}

/// Publishes each change as one message to NATS JetStream: the subject from a
/// [`SubjectTemplate`], headers `Cdc-Operation`, `Cdc-Namespace`, `Cdc-Cluster-Time`
/// (`<seconds>.<increment>`), `Cdc-Document-Key` (relaxed Extended JSON) and
/// `Nats-Msg-Id` ([`message_id`]), the body as [`Body`] says. Publishes are pipelined
/// (up to [`NatsSink::window`] acknowledgements in flight); a batch succeeds only when
/// JetStream acknowledged every one of its messages, so a change is acknowledged to the
/// processor only once it is stored. A batch published again (a retry, or a restart from
/// an older point) is dropped by JetStream's de-duplication within the stream's
/// duplicate window.
pub struct NatsSink {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Where changes over the server's payload limit go ([`NatsSink::object_store`]).
    /// Boxed: the store is large and seldom set.
    objects: Option<Box<(String, jetstream::object_store::ObjectStore)>>,
    stream_id: String,
    subject: SubjectTemplate,
    body: Body,
    window: usize,
    coalesce: bool,
    stored: AtomicU64,
    duplicates: AtomicU64,
    coalesced: AtomicU64,
    objects_stored: AtomicU64,
}

impl fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSink")
            .field("stream_id", &self.stream_id)
            .field("subject", &self.subject.source)
            .field("body", &self.body)
            .field("window", &self.window)
            .field("coalesce", &self.coalesce)
            .finish_non_exhaustive()
    }
}

/// The default subject template.
pub const DEFAULT_SUBJECT: &str = "cdc.{db}.{coll}.{op}";

impl NatsSink {
    /// A sink publishing through `client` the changes of stream `stream_id` (the
    /// processor's stream id; it prefixes every message id), on subjects
    /// [`DEFAULT_SUBJECT`], bodies as relaxed Extended JSON, 256 acknowledgements in
    /// flight.
    pub fn new(client: async_nats::Client, stream_id: impl Into<String>) -> Self {
        Self {
            js: jetstream::new(client.clone()),
            client,
            objects: None,
            stream_id: stream_id.into(),
            subject: SubjectTemplate {
                pieces: vec![
                    Piece::Text("cdc.".into()),
                    Piece::Db,
                    Piece::Text(".".into()),
                    Piece::Coll,
                    Piece::Text(".".into()),
                    Piece::Op,
                ],
                source: DEFAULT_SUBJECT.into(),
            },
            body: Body::default(),
            window: 256,
            coalesce: false,
            stored: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            objects_stored: AtomicU64::new(0),
        }
    }

    /// Subjects from `template`.
    #[must_use]
    pub fn subject(mut self, template: SubjectTemplate) -> Self {
        self.subject = template;
        self
    }

    /// Bodies as `body` says.
    #[must_use]
    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    /// At most `window` (at least 1) acknowledgements in flight.
    #[must_use]
    pub fn window(mut self, window: usize) -> Self {
        self.window = window.max(1);
        self
    }

    /// When a batch holds several changes of one document (same namespace and document
    /// key), publishes only the last, with headers `Cdc-Coalesced` (how many changes it
    /// stands for) and `Cdc-Coalesced-Operations` (their operations in order, such as
    /// `insert,update,update`); default off. A change without a document key (a drop, a
    /// rename, an invalidate) is never merged across: changes before it and after it are
    /// coalesced apart. The message keeps the last change's id and cluster time. After a
    /// crash, the changes since the checkpoint are batched anew: a batch may then end
    /// earlier, and publish an older state of a document after the newer one was stored;
    /// consumers that keep the latest state compare `Cdc-Cluster-Time`.
    #[must_use]
    pub fn coalesce(mut self, coalesce: bool) -> Self {
        self.coalesce = coalesce;
        self
    }

    /// Changes whose message would exceed the server's `max_payload` go into JetStream
    /// object store `bucket` (see [`NatsSink::ensure_object_store`]): the object holds the
    /// body, named after the message id (so a change published again finds its object and
    /// does not store it twice), and the message, published only once the object is
    /// stored, keeps its subject, id and headers and carries a reference instead of the
    /// body: headers `Cdc-Object-Bucket`, `Cdc-Object-Name`, `Cdc-Object-Size`,
    /// `Cdc-Object-Digest` (`SHA-256=<base64url>`, as the object store keeps it), and the
    /// same as the body, `{"$cdcObject": {"bucket", "name", "size", "digest"}}` (a BSON
    /// document for `body = "bson"`). Without it such a change is refused.
    #[must_use]
    pub fn object_store(
        mut self,
        bucket: &str,
        store: jetstream::object_store::ObjectStore,
    ) -> Self {
        self.objects = Some(Box::new((bucket.to_owned(), store)));
        self
    }

    /// The object store bucket `bucket`, created (file storage) when `create` and missing.
    ///
    /// # Errors
    /// [`Error::Config`] when it does not exist and `create` is false, or JetStream refused;
    /// [`Error::Unavailable`] when JetStream did not answer.
    pub async fn ensure_object_store(
        &self,
        bucket: &str,
        create: bool,
    ) -> Result<jetstream::object_store::ObjectStore, Error> {
        use jetstream::context::ObjectStoreErrorKind;
        match self.js.get_object_store(bucket).await {
            Ok(store) => Ok(store),
            Err(e) if e.kind() == ObjectStoreErrorKind::GetStore && create => self
                .js
                .create_object_store(jetstream::object_store::Config {
                    bucket: bucket.to_owned(),
                    description: Some("cdc: changes over the NATS payload limit".into()),
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    Error::Config(format!(
                        "JetStream object store `{bucket}`: cannot create it: {e}"
                    ))
                }),
            Err(e) if e.kind() == ObjectStoreErrorKind::GetStore => Err(Error::Config(format!(
                "JetStream object store `{bucket}` does not exist: {e} (set `create_object_store = true` to create it)"
            ))),
            Err(e) => Err(stream_error(
                false,
                format!("JetStream object store `{bucket}`: {e}"),
            )),
        }
    }

    /// How long to wait for JetStream to acknowledge a publish (default 5 s) before the
    /// batch fails as an outage and is published again.
    #[must_use]
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.js.set_timeout(timeout);
        self
    }

    /// The subject template.
    pub fn subject_template(&self) -> &SubjectTemplate {
        &self.subject
    }

    /// What was published so far.
    pub fn counters(&self) -> NatsCounters {
        NatsCounters {
            stored: self.stored.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            coalesced: self.coalesced.load(Ordering::Relaxed),
            objects: self.objects_stored.load(Ordering::Relaxed),
        }
    }

    /// Makes sure JetStream stream `name` exists and takes this sink's subjects: creates
    /// it (subjects [`SubjectTemplate::filter`], file storage, `duplicate_window`) when
    /// `create` and it does not exist. Returns the stream's duplicate window.
    ///
    /// # Errors
    /// [`Error::Config`] when the stream does not exist and `create` is false, or
    /// JetStream refused (a stream whose subjects overlap another's, …);
    /// [`Error::Unavailable`] when JetStream did not answer.
    pub async fn ensure_stream(
        &self,
        name: &str,
        create: bool,
        duplicate_window: Duration,
    ) -> Result<Duration, Error> {
        let mut stream = match self.js.get_stream(name).await {
            Ok(stream) => stream,
            Err(e)
                if create
                    && matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(js)
                        if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                self.js
                    .create_stream(jetstream::stream::Config {
                        name: name.to_owned(),
                        subjects: vec![self.subject.filter()],
                        duplicate_window,
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| {
                        let answered = matches!(
                            e.kind(),
                            jetstream::context::CreateStreamErrorKind::JetStream(_)
                        );
                        stream_error(answered, format!("creating JetStream stream `{name}`: {e}"))
                    })?
            }
            Err(e) => {
                let answered = matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(_)
                );
                return Err(stream_error(
                    answered,
                    format!(
                        "JetStream stream `{name}`: {e}{}",
                        if create {
                            ""
                        } else {
                            " (set `create_stream = true` to create it)"
                        }
                    ),
                ));
            }
        };
        let info = stream.info().await.map_err(|e| {
            Error::unavailable(
                "NATS JetStream",
                format!("JetStream stream `{name}`: {e}"),
                None,
            )
        })?;
        Ok(info.config.duplicate_window)
    }

    /// The body of `event`'s message.
    fn payload(&self, event: &ChangeEvent) -> Result<Vec<u8>, Error> {
        let refused = |why: &str, e: BoxError| Error::refused("the NATS sink", why, Some(e));
        let raw = event.raw().ok_or_else(|| {
            Error::refused(
                "the NATS sink",
                "an event without its raw document cannot be published",
                None,
            )
        })?;
        let payload: Vec<u8> = match self.body {
            Body::Bson => raw.as_bytes().to_vec(),
            Body::RelaxedJson | Body::CanonicalJson => {
                let doc = bson::Bson::Document(
                    bson::Document::try_from(raw)
                        .map_err(|e| refused("the event is not valid BSON", e.into()))?,
                );
                let json = if self.body == Body::RelaxedJson {
                    cdc_core::support::to_relaxed_json(doc)
                } else {
                    doc.into_canonical_extjson()
                };
                serde_json::to_vec(&json)
                    .map_err(|e| refused("the event cannot be encoded as JSON", e.into()))?
            }
        };
        Ok(payload)
    }

    /// Stores `payload` as object `name` unless it is there already (a change published
    /// again), and returns the reference to it.
    async fn put_object(&self, name: &str, payload: &[u8]) -> Result<ObjectRef, Error> {
        let Some((bucket, store)) = self.objects.as_deref() else {
            return Err(Error::refused(
                "the NATS sink",
                "the change is over the server's payload limit and no object store is set",
                None,
            ));
        };
        let unavailable = |what: &str, e: String| {
            Error::unavailable(
                "NATS JetStream",
                format!("object store `{bucket}`: {what}: {e}"),
                None,
            )
        };
        let info = match store.info(name).await {
            Ok(info) if !info.deleted && info.size == payload.len() => info,
            Ok(_) => self
                .store_object(store, name, payload)
                .await
                .map_err(|e| unavailable("put", e))?,
            Err(e) if e.kind() == jetstream::object_store::InfoErrorKind::NotFound => self
                .store_object(store, name, payload)
                .await
                .map_err(|e| unavailable("put", e))?,
            Err(e) => return Err(unavailable("info", e.to_string())),
        };
        Ok(ObjectRef {
            bucket: bucket.clone(),
            name: name.to_owned(),
            size: info.size,
            digest: info.digest.unwrap_or_default(),
        })
    }

    async fn store_object(
        &self,
        store: &jetstream::object_store::ObjectStore,
        name: &str,
        payload: &[u8],
    ) -> Result<jetstream::object_store::ObjectInfo, String> {
        let mut reader = payload;
        let info = store
            .put(name, &mut reader)
            .await
            .map_err(|e| e.to_string())?;
        self.objects_stored.fetch_add(1, Ordering::Relaxed);
        Ok(info)
    }

    /// The message of `event` with body `payload` (or the reference to the object holding
    /// it), standing for the changes of `ops` when it was coalesced.
    fn message(
        &self,
        event: &ChangeEvent,
        ops: Option<&[&ChangeEvent]>,
        payload: Vec<u8>,
        object: Option<&ObjectRef>,
    ) -> Result<(String, Publish), Error> {
        let refused = |why: &str, e: BoxError| Error::refused("the NATS sink", why, Some(e));
        let payload = match object {
            None => payload,
            Some(o) => {
                let reference = bson::doc! { "$cdcObject": {
                    "bucket": &o.bucket,
                    "name": &o.name,
                    "size": i64::try_from(o.size).unwrap_or(i64::MAX),
                    "digest": &o.digest,
                } };
                if self.body == Body::Bson {
                    reference
                        .to_vec()
                        .map_err(|e| refused("the object reference cannot be encoded", e.into()))?
                } else {
                    serde_json::to_vec(&cdc_core::support::to_relaxed_json(bson::Bson::Document(
                        reference,
                    )))
                    .map_err(|e| refused("the object reference cannot be encoded", e.into()))?
                }
            }
        };
        let mut publish = Publish::build()
            .payload(payload.into())
            .message_id(message_id(&self.stream_id, event))
            .header("Cdc-Operation", event.operation_type.as_str())
            .header(
                "Cdc-Cluster-Time",
                format!(
                    "{}.{}",
                    event.cluster_time.time, event.cluster_time.increment
                ),
            );
        if let Some(ns) = &event.ns {
            publish = publish.header("Cdc-Namespace", ns.to_string());
        }
        if let Some(o) = object {
            publish = publish
                .header("Cdc-Object-Bucket", o.bucket.as_str())
                .header("Cdc-Object-Name", o.name.as_str())
                .header("Cdc-Object-Size", o.size.to_string())
                .header("Cdc-Object-Digest", o.digest.as_str());
        }
        if let Some(ops) = ops.filter(|ops| ops.len() > 1) {
            let names: Vec<&str> = ops.iter().map(|e| e.operation_type.as_str()).collect();
            publish = publish
                .header("Cdc-Coalesced", ops.len().to_string())
                .header("Cdc-Coalesced-Operations", names.join(","));
        }
        if let Some(key) = event.document_key() {
            let key = cdc_core::support::to_relaxed_json(bson::Bson::Document(
                bson::Document::try_from(key)
                    .map_err(|e| refused("the document key is not valid BSON", e.into()))?,
            ));
            publish = publish.header("Cdc-Document-Key", key.to_string());
        }
        Ok((self.subject.render(event, &self.stream_id), publish))
    }

    /// Publishes `events` in order, pipelined, and waits until JetStream acknowledged
    /// every one.
    ///
    /// # Errors
    /// [`Error::Refused`] for an event without its raw document or a message JetStream
    /// refused (over its payload limit, …); [`Error::Unavailable`] for a publish not
    /// acknowledged in time or a lost connection (the caller publishes the batch again;
    /// what was stored is dropped as a duplicate then).
    pub async fn publish_events(&self, events: &[&ChangeEvent]) -> Result<(), Error> {
        let mut in_flight = VecDeque::with_capacity(self.window);
        let groups = if self.coalesce {
            coalesce(events)
        } else {
            events.iter().map(|e| (*e, Vec::new())).collect()
        };
        // Counted once the batch is stored (a failed batch is published again).
        let merged: usize = groups
            .iter()
            .map(|(_, ops)| ops.len().saturating_sub(1))
            .sum();
        // With an object store, the server's payload limit, read once per batch (the
        // server's info is copied whole on every read): a body that with room for its
        // headers would exceed it goes into the store.
        let limit = self
            .objects
            .as_ref()
            .map(|_| self.client.server_info().max_payload)
            .filter(|limit| *limit > 0);
        for (event, ops) in &groups {
            let payload = self.payload(event)?;
            // The object first, then (pipelined like any other) the message naming it.
            let object = if limit.is_some_and(|limit| payload.len() + HEADERS_ROOM > limit) {
                Some(
                    self.put_object(&object_name(&message_id(&self.stream_id, event)), &payload)
                        .await?,
                )
            } else {
                None
            };
            let (subject, publish) = self.message(event, Some(ops), payload, object.as_ref())?;
            if in_flight.len() >= self.window
                && let Some(ack) = in_flight.pop_front()
            {
                self.settle(ack).await?;
            }
            let ack = self
                .js
                .send_publish(subject, publish)
                .await
                .map_err(|e| classify(e.kind(), format!("publishing to JetStream: {e}")))?;
            in_flight.push_back(ack);
        }
        while let Some(ack) = in_flight.pop_front() {
            self.settle(ack).await?;
        }
        self.coalesced.fetch_add(merged as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn settle(&self, ack: jetstream::context::PublishAckFuture) -> Result<(), Error> {
        let ack = ack
            .await
            .map_err(|e| classify(e.kind(), format!("JetStream did not take a publish: {e}")))?;
        if ack.duplicate {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stored.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Room left for a message's headers under the server's `max_payload`.
const HEADERS_ROOM: usize = 4096;

/// Where an oversized change's body went.
#[derive(Debug)]
struct ObjectRef {
    bucket: String,
    name: String,
    size: usize,
    digest: String,
}

/// The object name for message id `id`: the characters object names take (letters,
/// digits, `-`, `_`, `.`) kept, every other byte as `=` and two hex digits (`:` is `=3A`).
pub fn object_name(id: &str) -> String {
    let mut out = String::with_capacity(id.len() + 8);
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_') || (b == b'.' && !out.is_empty()) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    if out.ends_with('.') {
        out.pop();
        out.push_str("=2E");
    }
    out
}

/// The changes of a batch to publish when coalescing, in order, each with the changes it
/// stands for (itself last; more than itself only when coalesced): per run of changes
/// between two changes without a document key, the last change of each document.
fn coalesce<'e>(events: &[&'e ChangeEvent]) -> Vec<(&'e ChangeEvent, Vec<&'e ChangeEvent>)> {
    use std::collections::HashMap;
    // Each document's changes, and where its last one stands in the batch.
    let mut groups: Vec<(usize, Vec<&ChangeEvent>)> = Vec::with_capacity(events.len());
    // Within the current run: a document's group.
    let mut group_of: HashMap<(Option<String>, &[u8]), usize> = HashMap::new();
    for (at, &event) in events.iter().enumerate() {
        let Some(key) = event.document_key() else {
            // A barrier: nothing is merged across it.
            groups.push((at, vec![event]));
            group_of.clear();
            continue;
        };
        let id = (event.ns.as_ref().map(ToString::to_string), key.as_bytes());
        match group_of.get(&id) {
            Some(&g) => {
                groups[g].0 = at;
                groups[g].1.push(event);
            }
            None => {
                group_of.insert(id, groups.len());
                groups.push((at, vec![event]));
            }
        }
    }
    // A document's message goes where its last change was.
    groups.sort_by_key(|(at, _)| *at);
    groups
        .into_iter()
        .filter_map(|(_, changes)| Some((*changes.last()?, changes)))
        .collect()
}

/// Whether a publish failed because of NATS rather than of the change: a timeout, a lost
/// connection, no stream answering (JetStream restarting), too many acknowledgements
/// pending. A message over the server's payload limit, or one JetStream refused, is the
/// change's own failure.
fn is_outage(kind: &jetstream::context::PublishErrorKind) -> bool {
    use jetstream::context::PublishErrorKind as K;
    matches!(
        kind,
        K::TimedOut | K::BrokenPipe | K::StreamNotFound | K::MaxAckPending
    )
}

/// An outage is [`Error::Unavailable`], which the processor waits out instead of giving
/// up on the change (see `HandlerErrorPolicy`); any other failure is the change's own.
fn classify(kind: jetstream::context::PublishErrorKind, text: String) -> Error {
    if is_outage(&kind) {
        Error::unavailable("NATS JetStream", text, None)
    } else {
        Error::refused("NATS JetStream", text, None)
    }
}

/// A stream call JetStream `answered` with an error (a setting to mend), or one it did
/// not answer (an outage).
fn stream_error(answered: bool, text: String) -> Error {
    if answered {
        Error::Config(text)
    } else {
        Error::unavailable("NATS JetStream", text, None)
    }
}

#[async_trait]
impl BatchDispatcher for NatsSink {
    async fn dispatch_batch(
        &self,
        batch: &Batch<'_>,
        _ctx: &HandlerContext,
    ) -> Result<(), BoxError> {
        self.publish_events(batch.events())
            .await
            .map_err(Error::into_handler_error)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use bson::doc;

    use super::*;

    fn event(ns: bson::Document, op: &str, data: Option<&str>) -> ChangeEvent {
        let mut d = doc! {
            "_id": match data { Some(d) => doc! { "_data": d }, None => doc! {
                "_snapshot": { "start": { "_data": "82AA" }, "startTime": bson::Timestamp { time: 9, increment: 2 }, "coll": "c" }
            } },
            "operationType": op,
            "clusterTime": bson::Timestamp { time: 7, increment: 1 },
            "ns": ns,
        };
        d.insert("documentKey", doc! { "_id": 5 });
        ChangeEvent::from_document(&d).unwrap()
    }

    fn change(op: &str, coll: &str, key: Option<i32>, n: u32) -> ChangeEvent {
        let mut d = doc! {
            "_id": { "_data": format!("82{n:08X}") },
            "operationType": op,
            "clusterTime": bson::Timestamp { time: n, increment: 1 },
            "ns": { "db": "shop", "coll": coll },
        };
        if let Some(k) = key {
            d.insert("documentKey", doc! { "_id": k });
        }
        ChangeEvent::from_document(&d).unwrap()
    }

    #[test]
    fn coalescing_keeps_each_documents_last_change_in_order_and_never_across_a_drop() {
        let events = [
            change("insert", "a", Some(1), 1),
            change("insert", "a", Some(2), 2),
            change("update", "a", Some(1), 3),
            change("update", "b", Some(1), 4),
            change("update", "a", Some(1), 5),
            change("drop", "a", None, 6),
            change("insert", "a", Some(1), 7),
            change("delete", "a", Some(1), 8),
        ];
        let refs: Vec<&ChangeEvent> = events.iter().collect();
        let out = coalesce(&refs);
        let shown: Vec<(u32, Vec<u32>)> = out
            .iter()
            .map(|(last, ops)| {
                (
                    last.cluster_time.time,
                    ops.iter().map(|e| e.cluster_time.time).collect(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            vec![
                (2, vec![2]),
                (4, vec![4]),
                (5, vec![1, 3, 5]),
                (6, vec![6]),
                (8, vec![7, 8]),
            ]
        );
        assert!(coalesce(&[]).is_empty());
    }

    #[test]
    fn templates_render_and_filter() {
        let t = SubjectTemplate::parse("cdc.{db}.{coll}.{op}").unwrap();
        let e = event(
            doc! { "db": "shop", "coll": "orders.2024" },
            "insert",
            Some("82"),
        );
        assert_eq!(t.render(&e, "s"), "cdc.shop.orders_2024.insert");
        assert_eq!(t.filter(), "cdc.*.*.*");
        let e = event(doc! { "db": "shop" }, "dropDatabase", Some("82"));
        assert_eq!(t.render(&e, "s"), "cdc.shop._.dropDatabase");
        let t = SubjectTemplate::parse("x.{stream}-{op}").unwrap();
        assert_eq!(t.render(&e, "a b"), "x.a_b-dropDatabase");
        assert_eq!(t.filter(), "x.*");
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        for (template, says) in [
            ("", "empty"),
            ("cdc..x", "empty token"),
            ("cdc.", "empty token"),
            ("cdc.{database}", "unknown placeholder `{database}`"),
            ("cdc.{db", "without its `}`"),
            ("cdc.db}", "without its `{`"),
            ("cdc.*", "'*'"),
            ("cdc.>", "'>'"),
            ("cdc. x", "' '"),
        ] {
            let err = SubjectTemplate::parse(template).unwrap_err();
            assert!(err.to_string().contains(says), "{template:?}: {err}");
            assert_eq!(err.kind(), crate::ErrorKind::Config);
        }
    }

    /// A snapshot row as `cdc-mongo` writes it: `start`/`startTime` move with the stream
    /// (and differ after a restart), `id` is the snapshot's identity.
    fn row(start: u32, id: u32, key: i32) -> ChangeEvent {
        let d = doc! {
            "_id": { "_snapshot": {
                "start": { "_data": format!("82{start:08X}") },
                "startTime": bson::Timestamp { time: start, increment: 1 },
                "id": bson::Timestamp { time: id, increment: 2 },
                "coll": "c",
                "after": key,
            } },
            "operationType": "snapshot",
            "clusterTime": bson::Timestamp { time: start, increment: 1 },
            "ns": { "db": "d", "coll": "c" },
            "documentKey": { "_id": key },
        };
        ChangeEvent::from_document(&d).unwrap()
    }

    #[test]
    fn message_ids_are_stable_per_change() {
        let a = event(doc! { "db": "d", "coll": "c" }, "insert", Some("82AB"));
        assert_eq!(message_id("s1", &a), "s1:82AB");
        let id = message_id("s1", &row(10, 9, 5));
        assert_eq!(id, "s1:snapshot:9.2:c:1005000000", "{id}");
        // The same row read again after a restart (the stream moved on: another start,
        // another time) keeps its id, and its dead-letter id too.
        assert_eq!(id, message_id("s1", &row(11, 9, 5)));
        assert_eq!(
            cdc_core::DeadLetter::id_of(&row(10, 9, 5).token),
            cdc_core::DeadLetter::id_of(&row(11, 9, 5).token)
        );
        // Another key, another snapshot: another id.
        assert_ne!(id, message_id("s1", &row(10, 9, 6)));
        assert_ne!(id, message_id("s1", &row(10, 8, 5)));
        // A token written before snapshots had an identity: its start names it.
        let old = event(doc! { "db": "d", "coll": "c" }, "snapshot", None);
        assert!(message_id("s1", &old).starts_with("s1:"));
    }

    #[test]
    fn a_short_duplicate_window_is_reported() {
        let s = Duration::from_secs;
        assert!(dedup_window_warning(s(120), s(5), s(60)).is_none());
        let warning = dedup_window_warning(s(10), s(5), s(60)).unwrap();
        assert!(
            warning.contains("10 s") && warning.contains("65 s"),
            "{warning}"
        );
    }

    #[test]
    fn an_outage_is_told_from_a_bad_change() {
        use jetstream::context::PublishErrorKind as K;
        for kind in [
            K::TimedOut,
            K::BrokenPipe,
            K::StreamNotFound,
            K::MaxAckPending,
        ] {
            let e = classify(kind, "x".into());
            assert_eq!(e.kind(), crate::ErrorKind::Outage);
            // The processor sees an outage it waits out, with the sink's error as cause.
            let handed = e.into_handler_error();
            let core = handed.downcast_ref::<cdc_core::Error>().unwrap();
            assert_eq!(core.kind(), cdc_core::ErrorKind::Transient);
            assert!(core.cause().unwrap().downcast_ref::<Error>().is_some());
        }
        for kind in [K::MaxPayloadExceeded, K::Other, K::WrongLastSequence] {
            let e = classify(kind, "x".into());
            assert_eq!(e.kind(), crate::ErrorKind::Refused);
            assert!(
                e.into_handler_error()
                    .downcast_ref::<cdc_core::Error>()
                    .is_none()
            );
        }
    }

    #[test]
    fn body_formats_parse() {
        assert_eq!("bson".parse::<Body>().unwrap(), Body::Bson);
        assert_eq!("canonical".parse::<Body>().unwrap(), Body::CanonicalJson);
        let e = "xml".parse::<Body>().unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Config);
        assert!(e.to_string().contains("`xml`"), "{e}");
    }
}
