//! `cdc check` and `cdc run`: the processor, the store and the sink built from the
//! configuration.

use std::{
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use cdc_processor::{
    Batch, BatchDispatcher, Batches, BoxError, ChangeEvent, CheckpointPolicy, Dispatcher,
    DocumentProcessor, HandlerContext, HandlerErrorPolicy, Storage, bson, mongodb::Client, stores,
};
use cdc_sink::{JsonLines, NatsSink, PostgresSink, async_nats};

use crate::{
    config::{self, Config, OnError, SinkKind, SnapshotModeCfg, redact_url},
    metrics::Metrics,
};

/// Log targets of dependencies that print connection options (passwords, tokens) below
/// `info`: async-nats shows each server's URL, credentials included, at `debug`. They are
/// held at `info` whatever `log.level` says.
const CHATTY_TARGETS: [&str; 1] = ["async_nats"];

/// The filter `log.level` asks for, with [`CHATTY_TARGETS`] held at `info`.
pub(crate) fn log_filter(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    let kept: Vec<&str> = level
        .split(',')
        .filter(|directive| {
            !CHATTY_TARGETS
                .iter()
                .any(|t| directive.trim().trim_start_matches('[').starts_with(t))
        })
        .collect();
    let mut filter =
        tracing_subscriber::EnvFilter::try_new(kept.join(",")).map_err(|e| e.to_string())?;
    for target in CHATTY_TARGETS {
        filter = filter.add_directive(
            format!("{target}=info")
                .parse()
                .map_err(|e| format!("{e}"))?,
        );
    }
    Ok(filter)
}

/// Sets up `tracing` as `log` says.
pub(crate) fn init_logs(log: &config::Log) -> Result<(), String> {
    let filter = log_filter(&log.level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let set = match log.format {
        config::LogFormat::Text => builder.try_init(),
        config::LogFormat::Json => builder.json().try_init(),
    };
    set.map_err(|e| e.to_string())
}

pub(crate) async fn connect_source(cfg: &Config) -> Result<Client, BoxError> {
    let uri = cfg.source_uri()?;
    Ok(cdc_processor::connect(&uri, Duration::from_secs(10)).await?)
}

pub(crate) async fn connect_nats(url: &str) -> Result<async_nats::Client, BoxError> {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .name("cdc")
        .connect(url)
        .await
        .map_err(|e| {
            format!(
                "NATS {}: {}",
                redact_url(url),
                config::scrub(&e.to_string(), url)
            )
            .into()
        })
}

/// The store as opened: by URL, or the PostgreSQL sink's own database (then also as the
/// `PostgresStore` the sink writes its checkpoints and rows through).
pub(crate) struct Opened {
    pub(crate) stores: stores::Stores,
    postgres: Option<Arc<stores::PostgresStore>>,
}

/// Opens the configured store.
pub(crate) async fn open_store(cfg: &Config) -> Result<Opened, BoxError> {
    if cfg.sink.kind == SinkKind::Postgres {
        let table = cfg
            .sink
            .postgres
            .as_ref()
            .and_then(|p| p.points_table.clone())
            .unwrap_or_else(|| stores::PostgresStore::DEFAULT_TABLE.to_owned());
        let store = Arc::new(stores::PostgresStore::connect(&cfg.postgres_url()?, &table).await?);
        return Ok(Opened {
            stores: stores::Stores::one(Arc::clone(&store)),
            postgres: Some(store),
        });
    }
    let url = cfg.store_url()?;
    if cfg.store.allow_shared_dir
        && let Some(dir) = url.strip_prefix("file:")
    {
        let dir = dir.strip_prefix("//").unwrap_or(dir);
        return Ok(Opened {
            stores: stores::Stores::one(Arc::new(stores::FileStore::new_in_shared_dir(dir)?)),
            postgres: None,
        });
    }
    Ok(Opened {
        stores: stores::open(&url).await?,
        postgres: None,
    })
}

/// The builder for the configured stream (everything but the store).
pub(crate) fn builder(cfg: &Config, client: Client) -> Result<cdc_processor::Builder, BoxError> {
    let s = &cfg.source;
    let mut options = cdc_processor::SourceOptions::default()
        .full_document(match s.full_document {
            config::FullDocumentMode::Default => cdc_processor::FullDocument::Default,
            config::FullDocumentMode::UpdateLookup => cdc_processor::FullDocument::UpdateLookup,
            config::FullDocumentMode::WhenAvailable => cdc_processor::FullDocument::WhenAvailable,
            config::FullDocumentMode::Required => cdc_processor::FullDocument::Required,
        })
        .before_change(match s.before_change {
            config::BeforeChangeMode::Off => cdc_processor::BeforeChange::Off,
            config::BeforeChangeMode::WhenAvailable => cdc_processor::BeforeChange::WhenAvailable,
            config::BeforeChangeMode::Required => cdc_processor::BeforeChange::Required,
        });
    if let Some(types) = &s.operation_types {
        options.operation_types = Some(
            types
                .iter()
                .map(|t| cdc_processor::OperationType::parse(t))
                .collect(),
        );
    }
    options.pipeline = pipeline(cfg)?;
    options.show_expanded_events = s.show_expanded_events;
    let scope = match (&s.database, &s.collection) {
        (Some(db), Some(coll)) => cdc_processor::Scope::collection(db, coll),
        (Some(db), None) => cdc_processor::Scope::database(db),
        _ => cdc_processor::Scope::Deployment,
    };
    let watch = cdc_processor::Watch::new(client, scope)
        .options(options)
        .snapshot(match cfg.snapshot.mode {
            SnapshotModeCfg::Never => cdc_processor::SnapshotMode::Never,
            SnapshotModeCfg::Initial => cdc_processor::SnapshotMode::Initial,
            SnapshotModeCfg::InitialOnly => cdc_processor::SnapshotMode::InitialOnly,
            SnapshotModeCfg::WhenNeeded => cdc_processor::SnapshotMode::WhenNeeded,
        })
        .snapshot_parallelism(cfg.snapshot.parallelism, cfg.snapshot.chunk_docs);
    let mut b = DocumentProcessor::builder().source(watch);
    if let Some(id) = &s.stream_id {
        b = b.stream_id(id);
    }
    let p = &cfg.processing;
    b = b
        .checkpoint(CheckpointPolicy::batched(
            // Within u32: `check` holds it to config::RANGES.
            u32::try_from(cfg.checkpoint.every_events).unwrap_or(u32::MAX),
            cfg.checkpoint_interval(),
        )?)
        .concurrency(p.concurrency)
        .max_buffered_bytes(p.max_buffered_bytes);
    let d = &cfg.dead_letters;
    let policy = match d.on_error {
        OnError::Stop => HandlerErrorPolicy::stop(),
        OnError::Skip => HandlerErrorPolicy::skip(),
        OnError::DeadLetter => HandlerErrorPolicy::dead_letter(),
    }
    // Within u32: `check` holds it to config::RANGES.
    .retries(u32::try_from(d.retries).unwrap_or(u32::MAX))
    .park_keys(d.park_keys);
    b = b.on_handler_error(policy);
    // The PostgreSQL sink saves the point in its transactions, ahead of the processor.
    b = b.handler_checkpoints(cfg.sink.kind == SinkKind::Postgres);
    if let Some(t) = cfg.transform()? {
        b = b.transform(t);
    }
    Ok(b)
}

/// The configured sink.
pub(crate) enum SinkImpl {
    Stdout(JsonLines<std::io::Stdout>),
    // Boxed: the NATS sink (its JetStream contexts) is several times the others.
    Nats(Box<NatsSink>, async_nats::Client),
    Postgres(PostgresSink),
}

/// The sink under the processor, timed and watched for the metrics and `/readyz`.
pub(crate) struct CliSink {
    inner: SinkImpl,
    metrics: Arc<Metrics>,
    failing: AtomicBool,
    /// Standard output was closed (the reader of the pipe went away): `run` stops.
    closed: tokio::sync::Notify,
}

impl std::fmt::Debug for CliSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.inner {
            SinkImpl::Stdout(_) => "CliSink(stdout)",
            SinkImpl::Nats(..) => "CliSink(nats)",
            SinkImpl::Postgres(_) => "CliSink(postgres)",
        })
    }
}

impl CliSink {
    async fn put(
        &self,
        events: &[&ChangeEvent],
        ctx: Option<&HandlerContext>,
    ) -> Result<(), BoxError> {
        let started = Instant::now();
        let written = match &self.inner {
            SinkImpl::Stdout(s) => s.write_events(events.iter().copied()),
            SinkImpl::Nats(s, _) => s.publish_events(events).await,
            SinkImpl::Postgres(s) => match ctx.and_then(HandlerContext::lease) {
                Some(lease) => s.write_events_fenced(lease, events.iter().copied()).await,
                None => s.write_events(events.iter().copied()).await,
            },
        };
        let result = written.map_err(|e| match e {
            // Standard output closed: nobody reads the lines any more. The batch is not
            // acknowledged (waited on as an outage, never skipped), and `run` stops.
            cdc_sink::Error::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed.notify_one();
                cdc_core::Error::unavailable("standard output (the pipe was closed)", e).into()
            }
            e => e.into_handler_error(),
        });
        self.metrics.sink_batch(started.elapsed(), result.is_ok());
        self.failing.store(result.is_err(), Ordering::Relaxed);
        if let SinkImpl::Nats(s, _) = &self.inner {
            let c = s.counters();
            self.metrics
                .nats_counters(c.stored, c.duplicates, c.coalesced, c.objects);
        }
        result
    }

    /// Whether the sink took its last batch and (NATS) is connected.
    pub(crate) fn reachable(&self) -> bool {
        if self.failing.load(Ordering::Relaxed) {
            return false;
        }
        match &self.inner {
            SinkImpl::Nats(_, client) => {
                client.connection_state() == async_nats::connection::State::Connected
            }
            _ => true,
        }
    }
}

#[async_trait]
impl BatchDispatcher for CliSink {
    async fn dispatch_batch(
        &self,
        batch: &Batch<'_>,
        ctx: &HandlerContext,
    ) -> Result<(), BoxError> {
        self.put(batch.events(), Some(ctx)).await
    }
}

/// One event at a time (dead-letter replay).
#[async_trait]
impl Dispatcher for CliSink {
    async fn dispatch(
        &self,
        event: &ChangeEvent,
        previous: Option<BoxError>,
    ) -> Result<(), BoxError> {
        if let Some(e) = previous {
            return Err(e);
        }
        self.put(&[event], None).await
    }
}

/// Builds the sink. `checkpoint`: the PostgreSQL sink saves the point of stream
/// `stream_id` in its transactions (not for a replay of dead letters, whose old events
/// are behind the stored point).
pub(crate) async fn build_sink(
    cfg: &Config,
    opened: &Opened,
    stream_id: &str,
    checkpoint: bool,
    metrics: Arc<Metrics>,
) -> Result<CliSink, BoxError> {
    let inner = match cfg.sink.kind {
        SinkKind::Stdout => SinkImpl::Stdout(JsonLines::stdout()),
        SinkKind::Nats => {
            let n = cfg.nats();
            let client = connect_nats(&cfg.nats_url()?).await?;
            let mut sink = NatsSink::new(client.clone(), stream_id)
                .subject(cdc_sink::SubjectTemplate::parse(&n.subject)?)
                .body(n.body.parse()?)
                .window(n.window)
                .coalesce(n.coalesce);
            if n.oversized == Some(config::Oversized::ObjectStore) {
                let store = sink
                    .ensure_object_store(&n.object_store_bucket, n.create_object_store)
                    .await?;
                sink = sink.object_store(&n.object_store_bucket, store);
            }
            let window = sink
                .ensure_stream(
                    &n.stream,
                    n.create_stream,
                    Duration::from_secs(n.duplicate_window_s),
                )
                .await?;
            let restart = cfg.lease.as_ref().map_or(Duration::from_secs(30), |l| {
                Duration::from_secs(30) + Duration::from_millis(l.ttl_ms)
            });
            if let Some(warning) =
                cdc_sink::dedup_window_warning(window, cfg.checkpoint_interval(), restart)
            {
                tracing::warn!("{warning}");
            }
            SinkImpl::Nats(Box::new(sink), client)
        }
        SinkKind::Postgres => {
            let pg = cfg.sink.postgres.as_ref().ok_or("no [sink.postgres]")?;
            let store = opened
                .postgres
                .clone()
                .ok_or("the PostgreSQL sink's store was not opened")?;
            let mut sink = PostgresSink::reconnecting(Arc::clone(&store), pg.table_prefix.clone())
                .update_lookup(cfg.source.full_document == config::FullDocumentMode::UpdateLookup);
            if checkpoint {
                sink = sink.checkpoint_with(store, stream_id);
            }
            SinkImpl::Postgres(sink)
        }
    };
    Ok(CliSink {
        inner,
        metrics,
        failing: AtomicBool::new(false),
        closed: tokio::sync::Notify::new(),
    })
}

/// The processor with its store (leased when configured), the store as opened, and the
/// source's client (shut down at the end, so the driver's clean-up of cursors runs).
pub(crate) async fn build_processor(
    cfg: &Config,
) -> Result<(DocumentProcessor, Opened, Client), BoxError> {
    let client = connect_source(cfg).await?;
    let opened = open_store(cfg).await?;
    let stores = &opened.stores;
    let mut b = builder(cfg, client.clone())?;
    b = match &cfg.lease {
        Some(lease) => {
            let mut leased = Storage::leased_stores(stores, Duration::from_millis(lease.ttl_ms));
            if let Some(owner) = &lease.owner {
                leased = leased.owner(owner);
            }
            b.store(leased)
        }
        None => b.store(stores),
    };
    Ok((b.build()?, opened, client))
}

/// `source.pipeline` as BSON stages.
fn pipeline(cfg: &Config) -> Result<Vec<bson::Document>, BoxError> {
    let mut out = Vec::new();
    for (i, stage) in cfg.source.pipeline.iter().enumerate() {
        let json = serde_json::to_value(stage)?;
        match bson::Bson::try_from(json)? {
            bson::Bson::Document(d) => out.push(d),
            other => {
                return Err(config::ConfigError(format!(
                    "`source.pipeline[{i}]` is not a document: {other}"
                ))
                .into());
            }
        }
    }
    Ok(out)
}

/// Opens a change stream with the configured pipeline and closes it: a pipeline the
/// server refuses (while a stream without it opens) is a configuration error.
async fn probe_pipeline(cfg: &Config, client: &Client) -> Result<(), BoxError> {
    let stages = pipeline(cfg)?;
    if stages.is_empty() {
        return Ok(());
    }
    let s = &cfg.source;
    let open = |stages: Vec<bson::Document>| async move {
        match (&s.database, &s.collection) {
            (Some(db), Some(coll)) => client
                .database(db)
                .collection::<bson::Document>(coll)
                .watch()
                .pipeline(stages)
                .await
                .map(drop),
            (Some(db), None) => client.database(db).watch().pipeline(stages).await.map(drop),
            _ => client.watch().pipeline(stages).await.map(drop),
        }
    };
    match open(stages).await {
        Ok(()) => Ok(()),
        Err(refused) => {
            open(Vec::new()).await?;
            Err(config::ConfigError(format!(
                "`source.pipeline`: the server refuses it: {}",
                config::scrub(&refused.to_string(), &cfg.source_uri()?)
            ))
            .into())
        }
    }
}

/// `cdc check`.
pub(crate) async fn check(cfg: &Config) -> Result<ExitCode, BoxError> {
    println!("ok    configuration");
    for (section, set, used) in [
        (
            "[sink.nats]",
            cfg.sink.nats.is_some(),
            cfg.sink.kind == SinkKind::Nats,
        ),
        (
            "[sink.postgres]",
            cfg.sink.postgres.is_some(),
            cfg.sink.kind == SinkKind::Postgres,
        ),
    ] {
        if set && !used {
            println!("note  {section} is set, but `sink.type` names another sink: it is not used");
        }
    }
    let mut failed = false;
    let mut config_error = false;
    let mut report = |what: &str, result: Result<String, BoxError>| match result {
        Ok(detail) => println!("ok    {what}: {detail}"),
        Err(e) => {
            failed = true;
            println!("FAIL  {what}: {e}");
        }
    };
    let uri = cfg.source_uri()?;
    let source = async {
        let client = connect_source(cfg).await?;
        let hello = client
            .database("admin")
            .run_command(bson::doc! { "hello": 1 })
            .await?;
        let set = hello.get_str("setName").map_err(
            |_| "not a replica set member (change streams need a replica set or a sharded cluster)",
        )?;
        let set = set.to_owned();
        let probed = probe_pipeline(cfg, &client).await;
        client.shutdown().await;
        probed?;
        Ok::<_, BoxError>(format!("replica set {set}"))
    };
    let source = within_deadline(source).await;
    if let Err(e) = &source
        && e.downcast_ref::<config::ConfigError>().is_some()
    {
        config_error = true;
    }
    report(&format!("source {}", redact_url(&uri)), source);
    let store_name = match cfg.sink.kind {
        SinkKind::Postgres => "store (the PostgreSQL sink's database)".to_owned(),
        _ => format!("store {}", redact_url(&cfg.store_url()?)),
    };
    let mut opened = None;
    let store = async {
        let o = open_store(cfg).await?;
        let streams = o.stores.points.list_streams().await?;
        opened = Some(o);
        Ok::<_, BoxError>(format!("{} stream(s) stored", streams.len()))
    };
    let store = within_deadline(store).await;
    report(&store_name, store);
    let sink = async {
        match cfg.sink.kind {
            SinkKind::Stdout => Ok("standard output".to_owned()),
            SinkKind::Nats => {
                let n = cfg.nats();
                let client = connect_nats(&cfg.nats_url()?).await?;
                let sink = NatsSink::new(client, "check");
                match sink
                    .ensure_stream(&n.stream, false, Duration::from_secs(n.duplicate_window_s))
                    .await
                {
                    Ok(window) => Ok(format!(
                        "JetStream stream {} (duplicate window {} s){}",
                        n.stream,
                        window.as_secs(),
                        cdc_sink::dedup_window_warning(
                            window,
                            cfg.checkpoint_interval(),
                            Duration::from_secs(30)
                        )
                        .map(|w| format!("; warning: {w}"))
                        .unwrap_or_default()
                    )),
                    Err(_) if n.create_stream => Ok(format!(
                        "connected; JetStream stream {} will be created at `cdc run`",
                        n.stream
                    )),
                    Err(e) => Err(e.into()),
                }
            }
            SinkKind::Postgres => {
                // Connected as `run` connects: through the store, with its TLS settings.
                let store = opened
                    .as_ref()
                    .and_then(|o| o.postgres.clone())
                    .ok_or("the sink's database did not answer (see the store's line)")?;
                let client = store.open_client().await?;
                let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
                Ok(format!("PostgreSQL {version}"))
            }
        }
    };
    let sink = within_deadline(sink).await;
    let sink_name = match cfg.sink.kind {
        SinkKind::Stdout => "sink stdout".to_owned(),
        SinkKind::Nats => format!("sink nats {}", redact_url(&cfg.nats_url()?)),
        SinkKind::Postgres => format!("sink postgres {}", redact_url(&cfg.postgres_url()?)),
    };
    report(&sink_name, sink);
    if let Some(addr) = cfg.metrics.addr {
        let bind = tokio::net::TcpListener::bind(addr)
            .await
            .map(|_| "free".to_owned())
            .map_err(|e| format!("cannot listen: {e}").into());
        report(&format!("metrics address {addr}"), bind);
    }
    Ok(if config_error {
        ExitCode::from(2)
    } else if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// How long each of `check`'s steps (source, store, sink) may take.
const CHECK_DEADLINE: Duration = Duration::from_secs(20);

fn deadline_passed() -> BoxError {
    format!(
        "no answer within {} s (a server that accepts and stalls?)",
        CHECK_DEADLINE.as_secs()
    )
    .into()
}

/// `step`, or an error when it takes longer than [`CHECK_DEADLINE`].
async fn within_deadline<T>(
    step: impl std::future::Future<Output = Result<T, BoxError>>,
) -> Result<T, BoxError> {
    tokio::time::timeout(CHECK_DEADLINE, step)
        .await
        .unwrap_or_else(|_| Err(deadline_passed()))
}

/// `cdc run`: until SIGTERM, SIGINT or SIGHUP (`shutdown`, listening since the program
/// started), then a graceful stop.
pub(crate) async fn run(
    cfg: Config,
    shutdown: Option<impl std::future::Future<Output = ()>>,
) -> Result<ExitCode, BoxError> {
    let shutdown = async move {
        match shutdown {
            Some(signal) => signal.await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(shutdown);
    let metrics = Arc::new(Metrics::new(cfg.oplog.ready_floor_s));
    // A stop during start-up (connecting, opening the store and the sink) is honoured at
    // once: nothing was handled, nothing is to save.
    let started = tokio::select! {
        started = async {
            let (processor, opened, client) = build_processor(&cfg).await?;
            // A pipeline the server refuses is the configuration's fault (exit 2), found
            // before anything runs.
            probe_pipeline(&cfg, &client).await?;
            let sink = build_sink(&cfg, &opened, processor.stream_id(), true, Arc::clone(&metrics)).await?;
            Ok::<_, BoxError>((processor, opened, client, sink))
        } => started?,
        () = &mut shutdown => {
            tracing::info!("stopped during start-up: nothing was handled");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let (processor, _opened, client, sink) = started;
    let sink = Arc::new(sink);
    let leased = cfg.lease.is_some();
    if let Some(addr) = cfg.metrics.addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("`metrics.addr` {addr}: cannot listen: {e}"))?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        tokio::spawn(crate::metrics::serve(
            listener,
            Arc::clone(&metrics),
            processor.clone(),
            Arc::clone(&sink),
            leased,
        ));
    }
    tokio::spawn(crate::oplog::watch(
        processor.clone(),
        cfg.oplog.clone(),
        Arc::clone(&metrics.oplog),
    ));
    tracing::info!(stream = %processor.stream_id(), sink = ?sink, "starting");
    let mut task = {
        let p = processor.clone();
        let limits = &cfg.processing;
        let batches = Batches::new(Arc::clone(&sink))
            .max_events(limits.max_batch_events)
            .max_bytes(limits.max_batch_bytes)
            .max_wait(Duration::from_millis(limits.max_batch_wait_ms));
        tokio::spawn(async move {
            p.start_with_retry(cdc_processor::default_backoff(), batches)
                .await
        })
    };
    let mut progress = tokio::time::interval(Duration::from_secs(10));
    progress.tick().await;
    let mut last = (Instant::now(), 0_u64);
    let mut pipe_closed = false;
    let outcome = loop {
        tokio::select! {
            r = &mut task => break r,
            () = &mut shutdown => {
                tracing::info!("stopping: finishing what is in flight, saving the checkpoint");
                processor.stop();
                break (&mut task).await;
            }
            () = sink.closed.notified() => {
                tracing::error!("standard output was closed (the reader of the pipe went away): stopping; the lines written into the pipe up to the last checkpoint count as delivered");
                pipe_closed = true;
                processor.stop();
                break (&mut task).await;
            }
            _ = progress.tick() => {
                let stats = processor.stats();
                let rate = (stats.events - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), stats.events);
                tracing::info!(
                    events = stats.events,
                    per_second = rate.round(),
                    lag_seconds = stats.lag_seconds(),
                    checkpoints = stats.checkpoints,
                    standby = stats.standby,
                    "progress"
                );
            }
        }
    };
    // The driver cleans up cursors and sessions in tasks of its own (`killCursors`): they
    // must run before the runtime goes, or they are cancelled mid-way (the driver then
    // panics on the cancelled task).
    drop(task);
    if tokio::time::timeout(Duration::from_secs(5), client.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("the MongoDB client's clean-up did not finish within 5 s");
    }
    match outcome {
        Ok(Ok(())) if pipe_closed => Err(
            "standard output was closed (the reader of the pipe went away); the changes after the last checkpoint come again at the next run"
                .into(),
        ),
        Ok(Ok(())) => {
            tracing::info!(events = processor.stats().events, "stopped");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Err(e)) => Err(format!("stopped on an error: {e}").into()),
        Err(e) => Err(format!("the processor task failed: {e}").into()),
    }
}

/// SIGTERM, SIGHUP or Ctrl-C (SIGINT). On Unix the handlers are installed when this is
/// called, before the future is first polled.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        // SIGHUP (the terminal or session went away) stops gracefully too, with the final
        // checkpoint; without a handler it would kill the process with none.
        let hup = signal(SignalKind::hangup());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    let hangup = async move {
                        match hup {
                            Ok(mut hup) => {
                                hup.recv().await;
                            }
                            Err(_) => std::future::pending::<()>().await,
                        }
                    };
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                        () = hangup => {}
                    }
                }
                (term, int) => {
                    let e = term.err().or(int.err());
                    tracing::warn!(error = ?e, "cannot listen for SIGTERM or SIGINT; Ctrl-C only");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
