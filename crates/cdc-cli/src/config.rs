//! The configuration: a TOML file, then environment variables, then `--set` flags, read
//! into one typed [`Config`] and checked as a whole. Every error is one line naming the
//! key; secrets (URLs with credentials) never appear in errors or `Debug` output.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

/// A configuration error: one line naming the key (or the file position) and what is
/// wrong.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ConfigError(pub(crate) String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err(text: impl Into<String>) -> ConfigError {
    ConfigError(text.into())
}

/// A value that may hold credentials: shown redacted.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub(crate) struct Secret(pub(crate) String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

pub(crate) use crate::redact::{redact_url, scrub};

/// The whole configuration, as read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) source: Source,
    #[serde(default)]
    pub(crate) processing: Processing,
    #[serde(default)]
    pub(crate) checkpoint: Checkpoint,
    #[serde(default)]
    pub(crate) store: Store,
    #[serde(default)]
    pub(crate) dead_letters: DeadLetters,
    #[serde(default)]
    pub(crate) snapshot: Snapshot,
    pub(crate) lease: Option<Lease>,
    pub(crate) sink: Sink,
    #[serde(default)]
    pub(crate) transform: TransformCfg,
    #[serde(default)]
    pub(crate) oplog: Oplog,
    #[serde(default)]
    pub(crate) metrics: Metrics,
    #[serde(default)]
    pub(crate) log: Log,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Source {
    pub(crate) uri: Option<Secret>,
    pub(crate) uri_file: Option<PathBuf>,
    pub(crate) database: Option<String>,
    pub(crate) collection: Option<String>,
    #[serde(default)]
    pub(crate) deployment: bool,
    pub(crate) stream_id: Option<String>,
    #[serde(default)]
    pub(crate) full_document: FullDocumentMode,
    #[serde(default)]
    pub(crate) before_change: BeforeChangeMode,
    pub(crate) operation_types: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) pipeline: Vec<toml::Table>,
    #[serde(default)]
    pub(crate) show_expanded_events: bool,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(crate) enum FullDocumentMode {
    Default,
    #[default]
    UpdateLookup,
    WhenAvailable,
    Required,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(crate) enum BeforeChangeMode {
    Off,
    #[default]
    WhenAvailable,
    Required,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Processing {
    pub(crate) concurrency: usize,
    pub(crate) max_batch_events: usize,
    pub(crate) max_batch_bytes: usize,
    pub(crate) max_batch_wait_ms: u64,
    pub(crate) max_buffered_bytes: usize,
}

impl Default for Processing {
    fn default() -> Self {
        Self {
            concurrency: 1,
            max_batch_events: 500,
            max_batch_bytes: 4 << 20,
            max_batch_wait_ms: 20,
            max_buffered_bytes: cdc_processor::DEFAULT_MAX_BUFFERED_BYTES,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Checkpoint {
    pub(crate) every_events: u64,
    pub(crate) every_ms: u64,
}

impl Default for Checkpoint {
    fn default() -> Self {
        Self {
            every_events: 1000,
            every_ms: 1000,
        }
    }
}

/// Field-level privacy and shaping (`cdc_processor::Transform`), applied before the sink.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TransformCfg {
    /// Fields dropped wherever a change carries them (dotted paths).
    pub(crate) exclude: Vec<String>,
    /// Fields replaced by their HMAC-SHA-256 under the key.
    pub(crate) hash: Vec<String>,
    pub(crate) hash_key: Option<Secret>,
    pub(crate) hash_key_file: Option<PathBuf>,
    /// Namespaces kept (`db.coll` patterns with `*`; none: all).
    pub(crate) include: Vec<String>,
    /// Namespaces left out.
    pub(crate) exclude_ns: Vec<String>,
}

/// How `cdc run` watches the oplog's window and the stored point's headroom in it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Oplog {
    /// How often both are read (0: never).
    pub(crate) check_every_ms: u64,
    /// A warning in the log when the headroom falls below this share of the window.
    pub(crate) warn_below_percent: u64,
    /// `/readyz` fails while the headroom is below this many seconds (0: never).
    pub(crate) ready_floor_s: u64,
}

impl Default for Oplog {
    fn default() -> Self {
        Self {
            check_every_ms: 30_000,
            warn_below_percent: 25,
            ready_floor_s: 0,
        }
    }
}

/// The range of every numeric key, `(key, min, max)` inclusive: what `check` (and every
/// command) accepts. `docs/OPERATIONS.md` lists the same table.
pub(crate) const RANGES: &[(&str, u64, u64)] = &[
    ("processing.concurrency", 1, 4096),
    ("processing.max_batch_events", 1, 100_000),
    // 1 GiB: a batch is held in memory whole.
    ("processing.max_batch_bytes", 1, 1 << 30),
    // An hour: a stop does not wait for it, but a batch does.
    ("processing.max_batch_wait_ms", 0, 3_600_000),
    // 1 MiB to 64 GiB.
    ("processing.max_buffered_bytes", 1 << 20, 1 << 36),
    ("checkpoint.every_events", 1, 10_000_000),
    // A day.
    ("checkpoint.every_ms", 1, 86_400_000),
    ("dead_letters.retries", 0, 1000),
    ("snapshot.parallelism", 1, 64),
    ("snapshot.chunk_docs", 1, 10_000_000),
    // 30 ms to a day.
    ("lease.ttl_ms", 30, 86_400_000),
    // 0: never; at most once a day.
    ("oplog.check_every_ms", 0, 86_400_000),
    ("oplog.warn_below_percent", 0, 100),
    // Never (0) or up to a year.
    ("oplog.ready_floor_s", 0, 31_536_000),
    // A second to 30 days (JetStream's window is a duration in nanoseconds).
    ("sink.nats.duplicate_window_s", 1, 2_592_000),
    // Publishes awaiting acknowledgement at once.
    ("sink.nats.window", 1, 65_536),
];

/// The store when `store.url` is left out (and the sink is not PostgreSQL).
pub(crate) const DEFAULT_STORE_URL: &str = "file:./cdc-state";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Store {
    pub(crate) url: Option<Secret>,
    pub(crate) url_file: Option<PathBuf>,
    /// A `file:` store may live in a directory every user may write to that another user
    /// owns (refused otherwise).
    #[serde(default)]
    pub(crate) allow_shared_dir: bool,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum OnError {
    #[default]
    Stop,
    Skip,
    DeadLetter,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct DeadLetters {
    pub(crate) on_error: OnError,
    pub(crate) retries: u64,
    pub(crate) park_keys: bool,
}

impl Default for DeadLetters {
    fn default() -> Self {
        Self {
            on_error: OnError::Stop,
            retries: 3,
            park_keys: false,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SnapshotModeCfg {
    #[default]
    Never,
    Initial,
    InitialOnly,
    WhenNeeded,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Snapshot {
    pub(crate) mode: SnapshotModeCfg,
    pub(crate) parallelism: usize,
    pub(crate) chunk_docs: usize,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            mode: SnapshotModeCfg::Never,
            parallelism: 1,
            chunk_docs: 10_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Lease {
    pub(crate) ttl_ms: u64,
    pub(crate) owner: Option<String>,
}

/// `sink.document_mode`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DocumentModeCfg {
    /// The post-image, without `updateDescription`.
    Full,
    /// `updateDescription` only.
    Delta,
    /// Both, as the server sends them: what `cdc` always sent.
    #[default]
    Both,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SinkKind {
    Stdout,
    Nats,
    Postgres,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Sink {
    #[serde(rename = "type")]
    pub(crate) kind: SinkKind,
    /// What update changes carry of the document.
    #[serde(default)]
    pub(crate) document_mode: DocumentModeCfg,
    pub(crate) nats: Option<NatsSinkCfg>,
    pub(crate) postgres: Option<PostgresSinkCfg>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct NatsSinkCfg {
    pub(crate) url: Secret,
    pub(crate) url_file: Option<PathBuf>,
    pub(crate) subject: String,
    pub(crate) body: String,
    pub(crate) stream: String,
    pub(crate) create_stream: bool,
    pub(crate) duplicate_window_s: u64,
    pub(crate) window: usize,
    /// Several changes of one document in a batch: publish the last only.
    pub(crate) coalesce: bool,
    /// What happens to a change over the server's `max_payload` (left out: as
    /// `dead_letters.on_error` says for any refused change).
    pub(crate) oversized: Option<Oversized>,
    /// The object store bucket of `oversized = "object-store"`.
    pub(crate) object_store_bucket: String,
    pub(crate) create_object_store: bool,
}

/// `sink.nats.oversized`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Oversized {
    ObjectStore,
    DeadLetter,
    Stop,
}

impl Default for NatsSinkCfg {
    fn default() -> Self {
        Self {
            url: Secret("nats://127.0.0.1:4222".into()),
            url_file: None,
            subject: cdc_sink::DEFAULT_SUBJECT.into(),
            body: "relaxed".into(),
            stream: "CDC".into(),
            create_stream: false,
            duplicate_window_s: 120,
            window: 256,
            coalesce: false,
            oversized: None,
            object_store_bucket: "cdc-oversized".into(),
            create_object_store: false,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PostgresSinkCfg {
    pub(crate) url: Option<Secret>,
    pub(crate) url_file: Option<PathBuf>,
    #[serde(default)]
    pub(crate) table_prefix: String,
    pub(crate) points_table: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Metrics {
    pub(crate) addr: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Log {
    pub(crate) format: LogFormat,
    pub(crate) level: String,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// The environment variables that override keys: `CDC_<SECTION>__<KEY>` (path segments
/// joined by `__`, upper case), as in `CDC_SOURCE__URI` or `CDC_SINK__NATS__URL`.
pub(crate) const ENV_PREFIX: &str = "CDC_";

/// An override: a dotted key path and its value as written.
#[derive(Clone, Debug)]
pub(crate) struct Override {
    pub(crate) key: String,
    pub(crate) value: String,
    /// Where it came from, for errors (`CDC_SOURCE__URI`, `--set`).
    pub(crate) origin: String,
}

/// The overrides the environment holds (`std::env::vars_os()`). Variables that are not
/// ours (no `CDC_` prefix, or no `__`) are ignored whatever their bytes; one of ours whose
/// name or value is not UTF-8 is an error naming it (its value is never shown).
///
/// # Errors
/// [`ConfigError`] naming the variable.
pub(crate) fn env_overrides(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<Vec<Override>, ConfigError> {
    let mut out = Vec::new();
    for (name, value) in vars {
        let ours = name
            .as_encoded_bytes()
            .strip_prefix(ENV_PREFIX.as_bytes())
            .is_some_and(|rest| rest.windows(2).any(|w| w == b"__"));
        if !ours {
            continue;
        }
        let Some(name) = name.to_str() else {
            return Err(err(format!(
                "the environment variable {} has a name that is not UTF-8",
                name.to_string_lossy()
            )));
        };
        let Some(value) = value.to_str() else {
            return Err(err(format!(
                "the environment variable {name} is not UTF-8 (its value is not shown)"
            )));
        };
        let rest = &name[ENV_PREFIX.len()..];
        out.push(Override {
            key: rest
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect::<Vec<_>>()
                .join("."),
            value: value.to_owned(),
            origin: name.to_owned(),
        });
    }
    out.sort_by(|a, b| a.origin.cmp(&b.origin));
    Ok(out)
}

/// A `--set key=value` flag.
pub(crate) fn flag_override(text: &str) -> Result<Override, ConfigError> {
    let (key, value) = text.split_once('=').ok_or_else(|| {
        err(format!(
            "--set {text:?}: expected key=value, as in --set processing.concurrency=8"
        ))
    })?;
    Ok(Override {
        key: key.trim().to_owned(),
        value: value.to_owned(),
        origin: "--set".into(),
    })
}

/// The TOML value of an override: integers, floats, booleans and arrays or inline
/// tables as TOML reads them; anything else a string (quote a string that looks like a
/// number: `'"123"'`).
fn override_value(text: &str) -> toml::Value {
    let trimmed = text.trim();
    if let Ok(v) = trimmed.parse::<i64>() {
        return toml::Value::Integer(v);
    }
    match trimmed {
        "true" => return toml::Value::Boolean(true),
        "false" => return toml::Value::Boolean(false),
        _ => {}
    }
    if trimmed.starts_with(['[', '{', '"', '\''])
        && let Ok(table) = format!("v = {trimmed}").parse::<toml::Table>()
        && let Some(v) = table.get("v")
    {
        return v.clone();
    }
    toml::Value::String(text.to_owned())
}

fn apply(table: &mut toml::Table, o: &Override) -> Result<(), ConfigError> {
    let parts: Vec<&str> = o.key.split('.').collect();
    if o.key.is_empty() || parts.iter().any(|p| p.is_empty()) {
        return Err(err(format!(
            "{}: the key {:?} is not a dotted key path",
            o.origin, o.key
        )));
    }
    let mut at = table;
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            at.insert((*part).to_owned(), override_value(&o.value));
            return Ok(());
        }
        let entry = at
            .entry((*part).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(err(format!(
                    "{}: `{}` is a value, not a section, so `{}` cannot be set",
                    o.origin,
                    parts[..=i].join("."),
                    o.key
                )));
            }
        };
    }
    Ok(())
}

/// The value at dotted `path` in `table`.
fn lookup<'a>(table: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

/// The line and column of byte `at` in `text`.
fn position(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, col)
}

/// Reads the configuration from `text` (the file's content, named `name` in errors) with
/// `overrides` applied in order, and checks it.
pub(crate) fn load(text: &str, name: &str, overrides: &[Override]) -> Result<Config, ConfigError> {
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let message = e.message().trim().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let (line, col) = position(text, span.start);
                err(format!("{name}:{line}:{col}: {message}"))
            }
            None => err(format!("{name}: {message}")),
        }
    })?;
    for o in overrides {
        apply(&mut table, o)?;
    }
    for section in [
        "source",
        "processing",
        "checkpoint",
        "store",
        "dead_letters",
        "snapshot",
        "lease",
        "sink",
        "metrics",
        "log",
    ] {
        if table.get(section).is_some_and(|v| !v.is_table()) {
            return Err(err(format!(
                "`{section}` must be a table (a `[{section}]` section)"
            )));
        }
    }
    let original = table.clone();
    let config: Config =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let path = e.path().to_string();
            // An enum key given a number or a boolean: serde's words for it are its own
            // ("invalid type: unit variant").
            if e.inner().to_string().contains("unit variant") {
                let found = lookup(&original, &path).map_or("a value", toml::Value::type_str);
                return err(format!(
                    "`{path}`: expected a string naming one of its choices (see cdc.example.toml), found {found}"
                ));
            }
            let inner = e.into_inner().to_string();
            let inner = inner.trim().replace('\n', " ");
            // serde's "in `section`" suffix repeats the path.
            let inner = match inner.rsplit_once(" in `") {
                Some((head, _)) => head.to_owned(),
                None => inner,
            };
            if let Some(rest) = inner.strip_prefix("unknown field `")
                && let Some((_, expected)) = rest.split_once('`')
            {
                return err(format!(
                    "unknown key `{path}`:{}",
                    expected.trim_start_matches(',')
                ));
            }
            if let Some(rest) = inner.strip_prefix("missing field `")
                && let Some((field, _)) = rest.split_once('`')
            {
                let key = if path == "." {
                    field.to_owned()
                } else {
                    format!("{path}.{field}")
                };
                return err(format!("missing key `{key}`"));
            }
            if path == "." {
                err(inner)
            } else {
                err(format!("`{path}`: {inner}"))
            }
        })?;
    config.check()?;
    Ok(config)
}

/// Reads a secret from its key or its file key (never both); `None` when neither is set.
fn secret(
    value: Option<&Secret>,
    file: Option<&PathBuf>,
    key: &str,
) -> Result<Option<Secret>, ConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(err(format!(
            "`{key}` and `{key}_file` are both set: give one"
        ))),
        (Some(v), None) if v.0.trim().is_empty() => Err(err(format!("`{key}` is empty"))),
        (Some(v), None) => Ok(Some(v.clone())),
        (None, Some(path)) if path.as_os_str().is_empty() => {
            Err(err(format!("`{key}_file` is empty: name a file")))
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| err(format!("`{key}_file` {}: {e}", path.display())))?;
            if text.trim().is_empty() {
                return Err(err(format!(
                    "`{key}_file` {}: the file is empty",
                    path.display()
                )));
            }
            Ok(Some(Secret(text.trim().to_owned())))
        }
        (None, None) => Ok(None),
    }
}

impl Config {
    /// Checks what the types alone do not: required keys, ranges and combinations.
    fn check(&self) -> Result<(), ConfigError> {
        let s = &self.source;
        if s.uri.is_none() && s.uri_file.is_none() {
            return Err(err(
                "missing key `source.uri` (or `source.uri_file`; the environment: CDC_SOURCE__URI)",
            ));
        }
        if s.uri.is_some() && s.uri_file.is_some() {
            return Err(err(
                "`source.uri` and `source.uri_file` are both set: give one",
            ));
        }
        // Every connection string resolves (files read, nothing empty) now, so `check`
        // and every command say so as a configuration error.
        self.source_uri()?;
        self.store_url()?;
        self.transform()?;
        let mode = self.sink.document_mode;
        if mode == DocumentModeCfg::Full && s.full_document == FullDocumentMode::Default {
            return Err(err(
                "`sink.document_mode = \"full\"` sends updates' post-images, which `source.full_document = \"default\"` leaves out: set `source.full_document` (`updateLookup`, `whenAvailable`, `required`), or `sink.document_mode = \"delta\"`",
            ));
        }
        if mode == DocumentModeCfg::Delta && self.sink.kind == SinkKind::Postgres {
            return Err(err(
                "`sink.document_mode = \"delta\"`: the postgres sink writes whole documents; use `full` or `both`",
            ));
        }
        let on_error = self.dead_letters.on_error;
        match self.sink.nats.as_ref().and_then(|n| n.oversized) {
            Some(Oversized::DeadLetter) if on_error != OnError::DeadLetter => {
                return Err(err(
                    "`sink.nats.oversized = \"dead-letter\"` records an oversized change as a dead letter, as `dead_letters.on_error = \"dead-letter\"` does for every refused change: set it",
                ));
            }
            Some(Oversized::Stop) if on_error != OnError::Stop => {
                return Err(err(
                    "`sink.nats.oversized = \"stop\"` stops at an oversized change, as `dead_letters.on_error = \"stop\"` does for every refused change: set it, or choose `object-store`",
                ));
            }
            Some(Oversized::ObjectStore) => {
                let bucket = &self.nats().object_store_bucket;
                if bucket.is_empty()
                    || !bucket
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(err(format!(
                        "`sink.nats.object_store_bucket` `{bucket}`: a bucket name is letters, digits, `-` and `_`"
                    )));
                }
            }
            _ => {}
        }
        if mode == DocumentModeCfg::Delta && self.sink.nats.as_ref().is_some_and(|n| n.coalesce) {
            return Err(err(
                "`sink.nats.coalesce` keeps a document's last change only, which under `sink.document_mode = \"delta\"` would lose the earlier changes' fields: use `full` or `both`",
            ));
        }
        if self.sink.nats.is_some() {
            self.nats_url()?;
        }
        if let Some(pg) = &self.sink.postgres {
            secret(pg.url.as_ref(), pg.url_file.as_ref(), "sink.postgres.url")?;
        }
        match (s.deployment, &s.database, &s.collection) {
            (true, None, None) | (false, Some(_), _) => {}
            (true, _, _) => {
                return Err(err(
                    "`source.deployment` watches everything: leave `source.database` and `source.collection` out",
                ));
            }
            (false, None, Some(_)) => {
                return Err(err("`source.collection` needs `source.database`"));
            }
            (false, None, None) => {
                return Err(err(
                    "the source watches nothing: set `source.database` (and `source.collection`), or `source.deployment = true`",
                ));
            }
        }
        for (key, name) in [
            ("source.database", &s.database),
            ("source.collection", &s.collection),
        ] {
            if name
                .as_deref()
                .is_some_and(|n| n.is_empty() || n.contains('\0'))
            {
                return Err(err(format!("`{key}` is empty or holds a NUL byte")));
            }
        }
        if s.stream_id.as_deref().is_some_and(str::is_empty) {
            return Err(err("`source.stream_id` is empty"));
        }
        if let Some(types) = &s.operation_types {
            for t in types {
                if matches!(
                    cdc_processor::OperationType::parse(t),
                    cdc_processor::OperationType::Other(_)
                ) {
                    return Err(err(format!(
                        "`source.operation_types`: unknown operation type {t:?}"
                    )));
                }
            }
        }
        for (i, stage) in s.pipeline.iter().enumerate() {
            if stage.len() != 1 || !stage.keys().all(|k| k.starts_with('$')) {
                return Err(err(format!(
                    "`source.pipeline[{i}]`: a stage is a table with one `$` key, as in {{ \"$match\" = {{ … }} }}"
                )));
            }
        }
        if let Some(id) = &s.stream_id {
            cdc_core::validate_stream_id(id)
                .map_err(|e| err(format!("`source.stream_id`: {e}")))?;
        }
        let stream = s
            .stream_id
            .clone()
            .or_else(|| match (&s.database, &s.collection) {
                (Some(db), Some(coll)) => Some(format!("{db}.{coll}")),
                (Some(db), None) => Some(db.clone()),
                _ => None,
            });
        let file_store = self
            .store
            .url
            .as_ref()
            .is_none_or(|u| u.0.starts_with("file:"))
            && self.store.url_file.is_none()
            && self.sink.kind != SinkKind::Postgres;
        if let Some(stream) = stream.filter(|_| file_store) {
            cdc_processor::stores::FileStore::check_stream_id(&stream)
                .map_err(|e| err(format!("`source.stream_id`: {e}")))?;
        }
        for (key, value) in self.numbers() {
            let Some(&(_, min, max)) = RANGES.iter().find(|(k, _, _)| *k == key) else {
                return Err(err(format!(
                    "`{key}` has no range (a bug: add it to RANGES)"
                )));
            };
            if !(min..=max).contains(&value) {
                return Err(err(format!(
                    "`{key}` is {value}: it must be from {min} to {max}"
                )));
            }
        }
        let p = &self.processing;
        if let Some(lease) = &self.lease
            && lease.owner.as_deref().is_some_and(str::is_empty)
        {
            return Err(err("`lease.owner` is empty"));
        }
        if self.store.url.is_some() && self.store.url_file.is_some() {
            return Err(err(
                "`store.url` and `store.url_file` are both set: give one",
            ));
        }
        if self.dead_letters.on_error == OnError::DeadLetter
            && self
                .store
                .url
                .as_ref()
                .is_some_and(|u| u.0.starts_with("memory:"))
        {
            return Err(err(
                "`dead_letters.on_error = \"dead-letter\"` with a `memory:` store loses the letters at exit: use a lasting store",
            ));
        }
        if self.log.level.trim().is_empty() {
            return Err(err("`log.level` is empty"));
        }
        match self.sink.kind {
            SinkKind::Stdout => {}
            SinkKind::Nats => {
                let n = self.nats();
                cdc_sink::SubjectTemplate::parse(&n.subject)
                    .map_err(|e| err(format!("`sink.nats.subject`: {e}")))?;
                n.body
                    .parse::<cdc_sink::Body>()
                    .map_err(|e| err(format!("`sink.nats.body`: {e}")))?;
                if n.stream.is_empty()
                    || n.stream
                        .contains(|c: char| c == '.' || c == '*' || c == '>' || c.is_whitespace())
                {
                    return Err(err(format!(
                        "`sink.nats.stream` {:?} is not a JetStream stream name (no dots, wildcards or spaces)",
                        n.stream
                    )));
                }
            }
            SinkKind::Postgres => {
                let pg = self.sink.postgres.as_ref().ok_or_else(|| {
                    err("`sink.type = \"postgres\"` needs a `[sink.postgres]` section with `url`")
                })?;
                if pg.url.is_none() && pg.url_file.is_none() {
                    return Err(err(
                        "missing key `sink.postgres.url` (or `sink.postgres.url_file`)",
                    ));
                }
                if self.store.url.is_some() || self.store.url_file.is_some() {
                    return Err(err(
                        "`store.url`: the postgres sink keeps the resume point in its own database, in the same transaction as the rows; leave `store.url` out",
                    ));
                }
                if p.concurrency != 1 {
                    return Err(err(
                        "`processing.concurrency`: the postgres sink saves the checkpoint in its transactions, which needs batches in stream order: 1",
                    ));
                }
                if self.source.full_document == FullDocumentMode::Default {
                    return Err(err(
                        "`source.full_document`: the postgres sink writes whole documents, so updates need `updateLookup`, `whenAvailable` or `required`",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every numeric key set (with its default when left out), for [`RANGES`].
    fn numbers(&self) -> Vec<(&'static str, u64)> {
        let p = &self.processing;
        let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let mut out = vec![
            ("processing.concurrency", as_u64(p.concurrency)),
            ("processing.max_batch_events", as_u64(p.max_batch_events)),
            ("processing.max_batch_bytes", as_u64(p.max_batch_bytes)),
            ("processing.max_batch_wait_ms", p.max_batch_wait_ms),
            (
                "processing.max_buffered_bytes",
                as_u64(p.max_buffered_bytes),
            ),
            ("checkpoint.every_events", self.checkpoint.every_events),
            ("checkpoint.every_ms", self.checkpoint.every_ms),
            ("dead_letters.retries", self.dead_letters.retries),
            ("snapshot.parallelism", as_u64(self.snapshot.parallelism)),
            ("snapshot.chunk_docs", as_u64(self.snapshot.chunk_docs)),
            ("oplog.check_every_ms", self.oplog.check_every_ms),
            ("oplog.warn_below_percent", self.oplog.warn_below_percent),
            ("oplog.ready_floor_s", self.oplog.ready_floor_s),
        ];
        if let Some(lease) = &self.lease {
            out.push(("lease.ttl_ms", lease.ttl_ms));
        }
        if self.sink.kind == SinkKind::Nats || self.sink.nats.is_some() {
            let n = self.nats();
            out.push(("sink.nats.duplicate_window_s", n.duplicate_window_s));
            out.push(("sink.nats.window", as_u64(n.window)));
        }
        out
    }

    /// The `[transform]` section as the library's transform (`None` when it changes
    /// nothing); every field and pattern checked, the key read.
    pub(crate) fn transform(&self) -> Result<Option<cdc_processor::Transform>, ConfigError> {
        let t = &self.transform;
        let mut out = cdc_processor::Transform::new();
        let key = secret(
            t.hash_key.as_ref(),
            t.hash_key_file.as_ref(),
            "transform.hash_key",
        )?;
        if let Some(key) = key {
            out = out
                .hash_key(key.0.as_bytes())
                .map_err(|e| err(format!("`transform.hash_key`: {e}")))?;
        } else if !t.hash.is_empty() {
            return Err(err(
                "`transform.hash` needs a key: `transform.hash_key_file`, or the environment's CDC_TRANSFORM__HASH_KEY (at least 16 bytes)",
            ));
        }
        for (key, list, add) in [
            (
                "transform.exclude",
                &t.exclude,
                cdc_processor::Transform::exclude as fn(_, &str) -> _,
            ),
            ("transform.hash", &t.hash, cdc_processor::Transform::hash),
            (
                "transform.include",
                &t.include,
                cdc_processor::Transform::include,
            ),
            (
                "transform.exclude_ns",
                &t.exclude_ns,
                cdc_processor::Transform::exclude_namespace,
            ),
        ] {
            for item in list {
                out = add(out, item).map_err(|e| err(format!("`{key}`: {e}")))?;
            }
        }
        out = out.document_mode(match self.sink.document_mode {
            DocumentModeCfg::Full => cdc_processor::DocumentMode::Full,
            DocumentModeCfg::Delta => cdc_processor::DocumentMode::Delta,
            DocumentModeCfg::Both => cdc_processor::DocumentMode::Both,
        });
        Ok((!out.is_empty()).then_some(out))
    }

    /// The source's URI (`source.uri`, or the content of `source.uri_file`).
    pub(crate) fn source_uri(&self) -> Result<String, ConfigError> {
        let s = &self.source;
        secret(s.uri.as_ref(), s.uri_file.as_ref(), "source.uri")?
            .map(|s| s.0)
            .ok_or_else(|| err("missing key `source.uri`"))
    }

    /// The store URL: `store.url` (or its file), or [`DEFAULT_STORE_URL`].
    pub(crate) fn store_url(&self) -> Result<String, ConfigError> {
        let s = &self.store;
        Ok(secret(s.url.as_ref(), s.url_file.as_ref(), "store.url")?
            .map_or_else(|| DEFAULT_STORE_URL.to_owned(), |s| s.0))
    }

    /// The NATS sink's URL (`sink.nats.url`, which has a default, or `url_file`, which
    /// then counts).
    pub(crate) fn nats_url(&self) -> Result<String, ConfigError> {
        let n = self.nats();
        let given = Some(&n.url).filter(|_| n.url_file.is_none());
        Ok(secret(given, n.url_file.as_ref(), "sink.nats.url")?.map_or(n.url.0, |s| s.0))
    }

    /// The PostgreSQL sink's URL (`sink.postgres.url` or its file).
    pub(crate) fn postgres_url(&self) -> Result<String, ConfigError> {
        let pg = self
            .sink
            .postgres
            .as_ref()
            .ok_or_else(|| err("`sink.type = \"postgres\"` needs `[sink.postgres]`"))?;
        secret(pg.url.as_ref(), pg.url_file.as_ref(), "sink.postgres.url")?
            .map(|s| s.0)
            .ok_or_else(|| err("missing key `sink.postgres.url`"))
    }

    /// The NATS sink's settings (defaults when the section is left out).
    pub(crate) fn nats(&self) -> NatsSinkCfg {
        self.sink.nats.clone().unwrap_or_default()
    }

    /// The checkpoint interval.
    pub(crate) fn checkpoint_interval(&self) -> Duration {
        Duration::from_millis(self.checkpoint.every_ms)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const GOOD: &str = r#"
[source]
uri = "mongodb://u:pw@127.0.0.1:27017/?replicaSet=rs0"
database = "shop"
collection = "orders"
full_document = "updateLookup"

[sink]
type = "nats"

[sink.nats]
subject = "cdc.{db}.{coll}.{op}"
"#;

    /// The annotated example in the repository is a working configuration.
    #[test]
    fn the_example_config_loads() {
        let c = load(
            include_str!("../../../cdc.example.toml"),
            "cdc.example.toml",
            &[],
        )
        .unwrap();
        assert_eq!(c.sink.kind, SinkKind::Nats);
        assert_eq!(
            c.processing.max_buffered_bytes,
            cdc_processor::DEFAULT_MAX_BUFFERED_BYTES
        );
        assert_eq!(c.nats().subject, cdc_sink::DEFAULT_SUBJECT);
    }

    /// `cdc.example.toml` shows every key with its default, except those marked on their
    /// line: `[required]` (no default: left out, the file does not load) and `[not the
    /// default]` (an example value). Each key is left out in turn and the configuration
    /// compared with the whole file's: a difference on an unmarked key, or a mark on a key
    /// at its default, fails.
    #[test]
    fn the_example_is_the_defaults_except_where_marked() {
        let text = include_str!("../../../cdc.example.toml");
        // What the program uses: a store URL left out is the default store.
        let effective = |mut c: Config| {
            if c.store.url.is_none()
                && c.store.url_file.is_none()
                && c.sink.kind != SinkKind::Postgres
            {
                c.store.url = Some(Secret(DEFAULT_STORE_URL.to_owned()));
            }
            format!("{c:?}")
        };
        let whole = effective(load(text, "example", &[]).unwrap());
        let table: toml::Table = text.parse().unwrap();
        let mut leaves = Vec::new();
        fn walk(prefix: &[String], t: &toml::Table, out: &mut Vec<Vec<String>>) {
            for (k, v) in t {
                let mut path = prefix.to_vec();
                path.push(k.clone());
                match v {
                    toml::Value::Table(inner) => walk(&path, inner, out),
                    _ => out.push(path),
                }
            }
        }
        walk(&[], &table, &mut leaves);
        assert!(leaves.len() > 25, "{leaves:?}");
        for path in leaves {
            let mut without = table.clone();
            let mut at = &mut without;
            for part in &path[..path.len() - 1] {
                at = at
                    .get_mut(part)
                    .and_then(toml::Value::as_table_mut)
                    .unwrap();
            }
            at.remove(&path[path.len() - 1]);
            let reduced = toml::to_string(&without).unwrap();
            let state = match load(&reduced, "example", &[]).map(effective) {
                Err(_) => "[required]",
                Ok(c) if c != whole => "[not the default]",
                Ok(_) => "",
            };
            let line = key_line(text, &path);
            let marked = ["[required]", "[not the default]"]
                .into_iter()
                .find(|m| line.contains(m))
                .unwrap_or("");
            assert_eq!(
                marked,
                state,
                "`{}` (line {line:?}): left out, {}",
                path.join("."),
                match state {
                    "" => "the configuration is the same: it is the default, unmark it",
                    "[required]" => "the file does not load: mark it [required]",
                    _ => "the configuration is another: mark it [not the default]",
                }
            );
        }
    }

    /// The line of the example that sets `path` (its section header, then `key =`).
    fn key_line<'a>(text: &'a str, path: &[String]) -> &'a str {
        let section = format!("[{}]", path[..path.len() - 1].join("."));
        let key = &path[path.len() - 1];
        let mut current = String::from("[]");
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('[') && !trimmed.starts_with("[[") {
                current = trimmed.split(']').next().unwrap_or("").to_owned() + "]";
                continue;
            }
            if current == section
                && trimmed
                    .strip_prefix(key.as_str())
                    .is_some_and(|r| r.trim_start().starts_with('='))
            {
                return line;
            }
        }
        panic!("no line sets `{}`", path.join("."));
    }

    /// Every numeric key: its bounds pass, one past them is an error naming the key and
    /// the range (a `u64::MAX` window once passed `check` and panicked at run).
    #[test]
    fn every_numeric_key_is_held_to_its_range() {
        let with_lease = format!("{GOOD}\n[lease]\nttl_ms = 1000\n");
        let set = |key: &str, v: u64| Override {
            key: key.to_owned(),
            value: v.to_string(),
            origin: "--set".into(),
        };
        let config = load(&with_lease, "cdc.toml", &[]).unwrap();
        let listed: Vec<&str> = config.numbers().iter().map(|(k, _)| *k).collect();
        assert_eq!(listed.len(), RANGES.len(), "{listed:?}");
        for &(key, min, max) in RANGES {
            assert!(listed.contains(&key), "{key}");
            for ok in [min, max] {
                load(&with_lease, "cdc.toml", &[set(key, ok)])
                    .unwrap_or_else(|e| panic!("{key} = {ok}: {e}"));
            }
            let mut bad = vec![max + 1, u64::try_from(i64::MAX).unwrap()];
            if min > 0 {
                bad.push(min - 1);
            }
            for v in bad {
                let e = load(&with_lease, "cdc.toml", &[set(key, v)]).unwrap_err().0;
                assert!(
                    e.contains(&format!("`{key}`")) && e.contains(&format!("from {min} to {max}")),
                    "{key} = {v}: {e}"
                );
            }
        }
        // Stream ids: 256 bytes at most; with the file store, what fits in a file name.
        let id = |n: usize| Override {
            key: "source.stream_id".into(),
            value: "x".repeat(n),
            origin: "--set".into(),
        };
        let e = load(GOOD, "cdc.toml", &[id(257)]).unwrap_err().0;
        assert!(e.contains("`source.stream_id`") && e.contains("256"), "{e}");
        let e = load(GOOD, "cdc.toml", &[id(250)]).unwrap_err().0;
        assert!(e.contains("`source.stream_id`") && e.contains("255"), "{e}");
        load(GOOD, "cdc.toml", &[id(200)]).unwrap();
        let redis = Override {
            key: "store.url".into(),
            value: "redis://127.0.0.1:6379".into(),
            origin: "--set".into(),
        };
        load(GOOD, "cdc.toml", &[id(250), redis]).unwrap();
    }

    #[test]
    fn a_good_file_loads_with_defaults() {
        let c = load(GOOD, "cdc.toml", &[]).unwrap();
        assert_eq!(c.processing.concurrency, 1);
        assert_eq!(c.sink.kind, SinkKind::Nats);
        assert_eq!(c.nats().stream, "CDC");
        assert_eq!(c.source.full_document, FullDocumentMode::UpdateLookup);
    }

    #[test]
    fn the_environment_and_flags_override_the_file_in_that_order() {
        let env = env_overrides(os_vars(&[
            (b"CDC_PROCESSING__CONCURRENCY", b"8"),
            (b"CDC_SINK__NATS__STREAM", b"FROMENV"),
            // Not ours: no `__`.
            (b"CDC_POSTGRES_URL", b"x"),
            (b"HOME", b"/root"),
            // Not ours, and not UTF-8: ignored.
            (b"X", b"\xff"),
            (b"\xfe\xff", b"y"),
            (b"CDC_NOT_OURS", b"\xff"),
        ]))
        .unwrap();
        assert_eq!(env.len(), 2);
        let mut all = env;
        all.push(flag_override("sink.nats.stream=FROMFLAG").unwrap());
        let c = load(GOOD, "cdc.toml", &all).unwrap();
        assert_eq!(c.processing.concurrency, 8);
        assert_eq!(c.nats().stream, "FROMFLAG");
    }

    fn os_vars(vars: &[(&[u8], &[u8])]) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        use std::os::unix::ffi::OsStrExt;
        vars.iter()
            .map(|(n, v)| {
                (
                    std::ffi::OsStr::from_bytes(n).to_owned(),
                    std::ffi::OsStr::from_bytes(v).to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn a_variable_of_ours_that_is_not_utf8_is_named() {
        let e = env_overrides(os_vars(&[(b"CDC_SOURCE__URI", b"mongodb://u:s\xffcret@h")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("CDC_SOURCE__URI") && e.contains("not UTF-8"),
            "{e}"
        );
        assert!(!e.contains("cret"), "{e}");
        let e = env_overrides(os_vars(&[(b"CDC_SOURCE__\xff", b"x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("CDC_SOURCE__") && e.contains("not UTF-8"), "{e}");
    }

    #[test]
    fn secrets_are_never_shown() {
        let c = load(GOOD, "cdc.toml", &[]).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("pw"), "{shown}");
        assert!(shown.contains("u:***@127.0.0.1"), "{shown}");
        assert_eq!(
            redact_url("postgres://a:s3cret@h/db?sslmode=require&password=s3cret"),
            "postgres://a:***@h/db?sslmode=require&password=***"
        );
        assert_eq!(redact_url("nats://tok@h:4222"), "nats://***@h:4222");
        assert_eq!(redact_url("file:./x"), "file:./x");
        assert_eq!(
            scrub("auth failed for s%40cret and s@cret", "nats://u:s%40cret@h"),
            "auth failed for *** and ***"
        );
    }

    /// Every malformed or hostile configuration gives one line naming the key (or the
    /// file position) — no panic, nothing secret in it.
    #[test]
    fn malformed_configs_give_one_clear_line() {
        let base = |extra: &str| format!("{GOOD}\n{extra}");
        let cases: Vec<(String, Vec<Override>, &str)> = vec![
            (
                base("[processing]\nconcurency = 4"),
                vec![],
                "unknown key `processing.concurency`",
            ),
            (base("bogus = 1"), vec![], "unknown key `sink.nats.bogus`"),
            (format!("bogus = 1\n{GOOD}"), vec![], "unknown key `bogus`"),
            (
                base("[processing]\nconcurrency = -1"),
                vec![],
                "`processing.concurrency`",
            ),
            (
                base("[processing]\nconcurrency = \"many\""),
                vec![],
                "`processing.concurrency`",
            ),
            (
                base("[processing]\nconcurrency = 0"),
                vec![],
                "`processing.concurrency` is 0: it must be from 1 to 4096",
            ),
            (
                base("[processing]\nconcurrency = 99999"),
                vec![],
                "`processing.concurrency` is 99999: it must be from 1 to 4096",
            ),
            (
                base("[processing]\nmax_buffered_bytes = 18446744073709551616"),
                vec![],
                "cdc.toml:",
            ),
            (
                GOOD.replace("updateLookup", "sometimes"),
                vec![],
                "`source.full_document`",
            ),
            (
                GOOD.replace("type = \"nats\"", "type = \"kafka\""),
                vec![],
                "`sink.type`",
            ),
            (
                GOOD.replace("{op}", "{operation}"),
                vec![],
                "`sink.nats.subject`",
            ),
            (
                GOOD.replace("cdc.{db}", "cdc.>.{db}"),
                vec![],
                "`sink.nats.subject`",
            ),
            (
                GOOD.replace("[sink]\ntype = \"nats\"", "[sink]"),
                vec![],
                "missing key `sink.type`",
            ),
            (
                GOOD.replace("database = \"shop\"\n", ""),
                vec![],
                "`source.collection` needs `source.database`",
            ),
            (
                GOOD.replace("uri = ", "uri_ = "),
                vec![],
                "unknown key `source.uri_`",
            ),
            (
                GOOD.replace(
                    "uri = \"mongodb://u:pw@127.0.0.1:27017/?replicaSet=rs0\"\n",
                    "",
                ),
                vec![],
                "missing key `source.uri`",
            ),
            (
                base("[lease]\nttl_ms = 5"),
                vec![],
                "`lease.ttl_ms` is 5: it must be from 30 to 86400000",
            ),
            (
                base("[lease]\nowner = \"a\""),
                vec![],
                "missing key `lease.ttl_ms`",
            ),
            (
                base("[metrics]\naddr = \"not an address\""),
                vec![],
                "`metrics.addr`",
            ),
            (base("[log]\nformat = \"xml\""), vec![], "`log.format`"),
            (
                base("[snapshot]\nmode = \"always\""),
                vec![],
                "`snapshot.mode`",
            ),
            (
                base("[dead_letters]\non_error = \"ignore\""),
                vec![],
                "`dead_letters.on_error`",
            ),
            (
                GOOD.replace("type = \"nats\"", "type = \"postgres\""),
                vec![],
                "`[sink.postgres]`",
            ),
            ("[source\nuri = 1".into(), vec![], "cdc.toml:1:"),
            ("source = 5\n".into(), vec![], "`source` must be a table"),
            ("\u{0}\u{1}\u{2}".into(), vec![], "cdc.toml:"),
            (
                "[[source]]\nuri = \"x\"".into(),
                vec![],
                "`source` must be a table",
            ),
            (
                GOOD.into(),
                vec![flag_override("processing.concurrency=abc").unwrap()],
                "`processing.concurrency`",
            ),
            (
                GOOD.into(),
                vec![flag_override("source.uri.deeper=1").unwrap()],
                "`source.uri` is a value",
            ),
            (
                GOOD.into(),
                vec![flag_override("..=1").unwrap()],
                "not a dotted key path",
            ),
            (
                base("[source.pipeline]\nx = 1"),
                vec![],
                "`source.pipeline`",
            ),
            (
                GOOD.replace(
                    "collection = \"orders\"",
                    "collection = \"orders\"\npipeline = [{ a = 1 }]",
                ),
                vec![],
                "`source.pipeline[0]`",
            ),
            (
                GOOD.replace(
                    "collection = \"orders\"",
                    "collection = \"orders\"\noperation_types = [\"insertt\"]",
                ),
                vec![],
                "unknown operation type \"insertt\"",
            ),
            (
                GOOD.replace(
                    "collection = \"orders\"",
                    "collection = \"orders\"\ndeployment = true",
                ),
                vec![],
                "`source.deployment`",
            ),
            (
                GOOD.replace("database = \"shop\"", "database = \"\""),
                vec![],
                "`source.database` is empty",
            ),
            (
                GOOD.replace("[sink.nats]", "[sink.nats]\nstream = \"a.b\""),
                vec![],
                "`sink.nats.stream`",
            ),
            (
                GOOD.replace("[sink.nats]", "[sink.nats]\nbody = \"xml\""),
                vec![],
                "`sink.nats.body`",
            ),
            (
                GOOD.replace("[sink.nats]", "[sink.nats]\nwindow = 0"),
                vec![],
                "`sink.nats.window`",
            ),
            (
                base("[store]\nurl = \"memory:\"\nurl_file = \"/x\""),
                vec![],
                "both set",
            ),
            (
                base("[store]\nurl = \"memory:\"\n[dead_letters]\non_error = \"dead-letter\""),
                vec![],
                "`memory:` store",
            ),
            (
                base("[checkpoint]\nevery_ms = 0"),
                vec![],
                "`checkpoint.every_ms`",
            ),
        ];
        for (text, overrides, says) in cases {
            let e = load(&text, "cdc.toml", &overrides).unwrap_err().0;
            println!("{e}");
            assert!(
                e.contains(says),
                "expected {says:?} in: {e}\n--- config:\n{text}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
            assert!(!e.contains("pw@"), "no secret: {e}");
        }
    }

    #[test]
    fn a_postgres_sink_needs_its_combination() {
        let pg = GOOD
            .replace("type = \"nats\"", "type = \"postgres\"")
            .replace(
                "[sink.nats]\nsubject = \"cdc.{db}.{coll}.{op}\"",
                "[sink.postgres]\nurl = \"postgres://h/db\"",
            );
        load(&pg, "f", &[]).unwrap();
        let e = load(
            &pg,
            "f",
            &[flag_override("processing.concurrency=4").unwrap()],
        )
        .unwrap_err();
        assert!(e.0.contains("`processing.concurrency`"), "{e}");
        let e = load(&pg, "f", &[flag_override("store.url=redis://h").unwrap()]).unwrap_err();
        assert!(e.0.contains("`store.url`"), "{e}");
        let e = load(&pg.replace("updateLookup", "default"), "f", &[]).unwrap_err();
        assert!(e.0.contains("`source.full_document`"), "{e}");
    }

    proptest::proptest! {
        /// Hostile input anywhere: arbitrary text, the good file cut or spliced with junk,
        /// arbitrary overrides. Never a panic; an error is one line and shows no secret.
        #[test]
        fn no_input_panics_and_errors_stay_one_line(
            junk in "\\PC{0,64}",
            at in 0..GOOD.len(),
            key in "[a-z_.]{0,24}",
            value in "\\PC{0,16}",
        ) {
            let cut = GOOD.get(..at).unwrap_or(GOOD);
            let spliced = format!("{cut}{junk}{}", GOOD.get(at..).unwrap_or(""));
            for (text, overrides) in [
                (junk.clone(), vec![]),
                (cut.to_owned(), vec![]),
                (spliced, vec![]),
                (GOOD.to_owned(), vec![Override { key: key.clone(), value: value.clone(), origin: "--set".into() }]),
            ] {
                if let Err(e) = load(&text, "cdc.toml", &overrides) {
                    proptest::prop_assert!(!e.0.contains('\n'), "{}", e.0);
                    proptest::prop_assert!(!e.0.contains(":pw@"), "{}", e.0);
                }
            }
        }
    }
}
