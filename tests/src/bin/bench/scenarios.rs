//! The library scenarios of `cargo xtask bench`: throughput as catch-up over a pre-loaded
//! oplog, latency at a steady rate, peak memory over a burst, resume cost with a selective
//! filter, and store writes per minute.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bson::{Document, doc};
use cdc_core::{
    BoxError as CoreBoxError, ChangeEvent, ChangeSource, CheckpointPolicy, ClusterTime, Dispatcher,
    OperationType, ResumePoint, ResumeStore, ResumeToken, StartPosition,
};
use cdc_mongo::{MongoSource, Scope, SourceOptions, from_driver_token};
use cdc_processor::{DocumentProcessor, stores::MemoryStore};
use futures_util::TryStreamExt;
use mongo_sim::{MongoSim, SimOptions};
use mongodb::{Client, Collection};
use serde_json::json;

use super::{BoxError, flag, median_and_spread, payload, percentile, preload};

/// Counts delivered events and wakes the waiter at the target.
#[derive(Clone, Default)]
pub(crate) struct Count {
    n: Arc<AtomicU64>,
    pub(crate) target: Arc<AtomicU64>,
    pub(crate) done: Arc<tokio::sync::Notify>,
    /// The largest event seen, in bytes (kept only when `measure_size` is set).
    largest: Arc<AtomicU64>,
    measure_size: bool,
    /// Awaited per event: a handler doing I/O.
    delay: Option<Duration>,
}

#[async_trait]
impl Dispatcher for Count {
    async fn dispatch(
        &self,
        event: &ChangeEvent,
        previous: Option<CoreBoxError>,
    ) -> Result<(), CoreBoxError> {
        if let Some(e) = previous {
            return Err(e);
        }
        if self.measure_size {
            let size = event.raw().map_or(0, |r| r.as_bytes().len());
            self.largest.fetch_max(size as u64, Ordering::Relaxed);
        }
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        let n = self.n.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.target.load(Ordering::Relaxed) {
            self.done.notify_one();
        }
        Ok(())
    }
}

/// A batch handler that awaits `delay` per batch and counts the events.
#[derive(Clone)]
struct BatchCount {
    count: Count,
    delay: Duration,
}

#[async_trait]
impl cdc_processor::BatchDispatcher for BatchCount {
    async fn dispatch_batch(
        &self,
        batch: &cdc_processor::Batch<'_>,
        _ctx: &cdc_processor::HandlerContext,
    ) -> Result<(), CoreBoxError> {
        tokio::time::sleep(self.delay).await;
        let n = self
            .count
            .n
            .fetch_add(batch.len() as u64, Ordering::Relaxed)
            + batch.len() as u64;
        if n >= self.count.target.load(Ordering::Relaxed) {
            self.count.done.notify_one();
        }
        Ok(())
    }
}

/// Counts saves, for store-writes-per-minute.
struct CountingStore {
    inner: MemoryStore,
    saves: AtomicU64,
}

#[async_trait]
impl ResumeStore for CountingStore {
    async fn load(&self, stream: &str) -> cdc_core::Result<Option<ResumePoint>> {
        self.inner.load(stream).await
    }
    async fn save(&self, stream: &str, point: &ResumePoint) -> cdc_core::Result<()> {
        self.saves.fetch_add(1, Ordering::Relaxed);
        self.inner.save(stream, point).await
    }
    async fn delete(&self, stream: &str) -> cdc_core::Result<()> {
        self.inner.delete(stream).await
    }
    async fn list_streams(&self) -> cdc_core::Result<Vec<String>> {
        self.inner.list_streams().await
    }
    fn describe(&self) -> String {
        "counting memory".into()
    }
}

/// A starting point at the current head of the oplog, for `coll`.
pub(crate) async fn head_point(coll: &Collection<Document>) -> Result<ResumePoint, BoxError> {
    let stream = coll.watch().await?;
    let token = stream.resume_token().ok_or("no initial resume token")?;
    let token = from_driver_token(&token).ok_or("token conversion")?;
    let time = token.cluster_time_hint().unwrap_or_default();
    Ok(ResumePoint::post_batch(token, time, bson::DateTime::now()))
}

struct Row {
    id: String,
    name: String,
    unit: &'static str,
    median: f64,
    min: f64,
    max: f64,
}

fn row(
    id: impl Into<String>,
    name: impl Into<String>,
    unit: &'static str,
    values: Vec<f64>,
) -> Row {
    let (median, min, max) = median_and_spread(values);
    Row {
        id: id.into(),
        name: name.into(),
        unit,
        median,
        min,
        max,
    }
}

/// Wall-clock and this process's CPU time, from one moment on.
struct Meter {
    wall: Instant,
    cpu: Option<Duration>,
}

/// One throughput round: events per second, and the consumer's CPU per event.
#[derive(Clone, Copy)]
struct Sample {
    rate: f64,
    cpu_us: f64,
}

impl Meter {
    fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: process_cpu(),
        }
    }

    fn finish(&self, events: usize) -> Sample {
        let cpu_us = match (self.cpu, process_cpu()) {
            (Some(a), Some(b)) => (b - a).as_secs_f64() * 1e6 / events as f64,
            _ => f64::NAN,
        };
        Sample {
            rate: events as f64 / self.wall.elapsed().as_secs_f64(),
            cpu_us,
        }
    }
}

/// User plus system CPU time of this process (all threads), from `/proc/self/stat`; the
/// simulator runs in a process of its own, so this is the consumer's alone.
fn process_cpu() -> Option<Duration> {
    cpu_of("self")
}

/// User plus system CPU time of process `pid` (`"self"`: this one).
fn cpu_of(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Some(Duration::from_millis(ticks * 10))
}

/// A throughput scenario: what drains the pre-loaded oplog.
enum Throughput {
    /// The driver alone.
    Raw,
    /// The processor with this store, checkpoint policy and read-ahead.
    Processor(Arc<dyn ResumeStore>, CheckpointPolicy, usize),
    /// The Go package's protocol.
    Go,
}

struct Bench {
    client: Client,
    events: usize,
    next: usize,
    batch: Option<u32>,
}

impl Bench {
    /// A fresh collection with `events` inserts after a recorded head point.
    async fn loaded(&mut self) -> Result<(Collection<Document>, String, ResumePoint), BoxError> {
        self.next += 1;
        let name = format!("c{}", self.next);
        let coll = self.client.database("bench").collection::<Document>(&name);
        if self.next > 1 {
            self.client
                .database("bench")
                .collection::<Document>(&format!("c{}", self.next - 1))
                .drop()
                .await?;
        }
        let start = head_point(&coll).await?;
        preload(&coll, self.events, 0).await?;
        Ok((coll, name, start))
    }

    async fn run(&mut self, scenario: &Throughput) -> Result<Sample, BoxError> {
        match scenario {
            Throughput::Raw => self.raw_driver().await,
            Throughput::Processor(store, policy, prefetch) => {
                self.processor(Arc::clone(store), policy.clone(), *prefetch)
                    .await
            }
            Throughput::Go => self.go_protocol().await,
        }
    }

    /// The change-stream options of the processor scenarios (its defaults, with `--batch`).
    fn source_options(&self) -> SourceOptions {
        let options = cdc_processor::SourceOptions::default();
        match self.batch {
            Some(n) => options.batch_size(n),
            None => options,
        }
    }

    /// The same change stream the processor opens (pipeline, options, batch size),
    /// iterated as raw BSON with nothing done per event.
    async fn raw_driver(&mut self) -> Result<Sample, BoxError> {
        let (_, name, start) = self.loaded().await?;
        let source = MongoSource::new(
            self.client.clone(),
            Scope::collection("bench", name),
            self.source_options(),
        );
        let events = self.events;
        // On a runtime worker, as the processor's tasks are.
        let drain = tokio::spawn(async move {
            let meter = Meter::start();
            let mut stream = source
                .open_driver_stream(&StartPosition::ResumeAfter(start.token))
                .await?;
            let mut seen = 0;
            while seen < events {
                stream.try_next().await?.ok_or("stream ended")?;
                seen += 1;
            }
            Ok::<_, BoxError>(meter.finish(events))
        });
        drain.await?
    }

    async fn processor(
        &mut self,
        store: Arc<dyn ResumeStore>,
        policy: CheckpointPolicy,
        prefetch: usize,
    ) -> Result<Sample, BoxError> {
        let (_, name, start) = self.loaded().await?;
        let stream_id = format!("bench.{name}");
        store.delete(&stream_id).await?;
        store.save(&stream_id, &start).await?;
        let builder = DocumentProcessor::builder()
            .source(
                cdc_processor::Watch::collection(self.client.clone(), "bench", name)
                    .options(self.source_options()),
            )
            .stream_id(stream_id)
            .store(store)
            .checkpoint(policy)
            .prefetch(prefetch);
        let p = builder.build()?;
        let count = Count::default();
        count.target.store(self.events as u64, Ordering::Relaxed);
        let meter = Meter::start();
        let runner = p.clone();
        let handler = count.clone();
        let task = tokio::spawn(async move { runner.start(handler).await });
        tokio::time::timeout(Duration::from_secs(600), count.done.notified())
            .await
            .map_err(|_| "processor stalled")?;
        let sample = meter.finish(self.events);
        p.stop();
        task.await??;
        Ok(sample)
    }

    /// The Go package's protocol: save the point (with its document) before dispatch,
    /// delete the previous one: two store writes per event.
    async fn go_protocol(&mut self) -> Result<Sample, BoxError> {
        let (coll, name, start) = self.loaded().await?;
        let points = self
            .client
            .database("bench_local")
            .collection::<Document>(&format!("{name}_resume"));
        let token = cdc_mongo::to_driver_token(&start.token).ok_or("token")?;
        let count = Count::default();
        let meter = Meter::start();
        let mut stream = coll
            .watch()
            .full_document(mongodb::options::FullDocumentType::UpdateLookup)
            .resume_after(token)
            .await?;
        let mut previous: Option<Document> = None;
        let mut seen = 0;
        while seen < self.events {
            let e = stream.try_next().await?.ok_or("stream ended")?;
            let id = bson::serialize_to_document(&e.id)?;
            points
                .insert_one(doc! {
                    "_id": id.clone(),
                    "timestamp": e.cluster_time.unwrap_or(bson::Timestamp { time: 0, increment: 0 }),
                    "fullDocument": e.full_document.clone().unwrap_or_default(),
                    "operationType": "insert",
                })
                .await?;
            if let Some(prev) = previous.replace(id) {
                points.delete_one(doc! { "_id": prev }).await?;
            }
            let event = ChangeEvent::new(
                from_driver_token(&e.id).ok_or("token")?,
                OperationType::Insert,
                ClusterTime::default(),
            );
            count.dispatch(&event, None).await?;
            seen += 1;
        }
        Ok(meter.finish(self.events))
    }
}

/// Latency from insert acknowledged to handler called, at a steady rate.
async fn latency(client: &Client, rate: u64, seconds: u64) -> Result<(f64, f64), BoxError> {
    let coll = client.database("bench").collection::<Document>("latency");
    coll.drop().await?;
    let acked: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let handled: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    #[derive(Clone)]
    struct Stamp(Arc<Mutex<HashMap<i64, Instant>>>);
    #[async_trait]
    impl Dispatcher for Stamp {
        async fn dispatch(
            &self,
            e: &ChangeEvent,
            _: Option<CoreBoxError>,
        ) -> Result<(), CoreBoxError> {
            if let Some(bson::RawBsonRef::Int64(id)) = e.document_id_raw() {
                self.0
                    .lock()
                    .map_err(|_| "poisoned")?
                    .insert(id, Instant::now());
            }
            Ok(())
        }
    }
    let store = Arc::new(MemoryStore::new());
    let p = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            client.clone(),
            "bench",
            "latency",
        ))
        .store(store)
        .build()?;
    let runner = p.clone();
    let stamp = Stamp(Arc::clone(&handled));
    let task = tokio::spawn(async move { runner.start(stamp).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let total = (rate * seconds) as i64;
    for i in 0..total {
        tick.tick().await;
        coll.insert_one(payload(i as usize)).await?;
        acked
            .lock()
            .map_err(|_| "poisoned")?
            .insert(i, Instant::now());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while handled.lock().map_err(|_| "poisoned")?.len() < total as usize
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.stop();
    task.await??;
    let acked = acked.lock().map_err(|_| "poisoned")?;
    let handled = handled.lock().map_err(|_| "poisoned")?;
    let mut lat: Vec<Duration> = acked
        .iter()
        .filter_map(|(id, a)| handled.get(id).map(|h| h.saturating_duration_since(*a)))
        .collect();
    if lat.len() < total as usize {
        return Err(format!("only {} of {total} events arrived", lat.len()).into());
    }
    lat.sort();
    Ok((
        percentile(&lat, 0.5).as_secs_f64() * 1000.0,
        percentile(&lat, 0.99).as_secs_f64() * 1000.0,
    ))
}

/// `serve-sim --capacity N`: a simulator in its own process; prints its URI, then serves
/// until killed.
pub(crate) async fn serve_sim(args: &[String]) -> Result<(), BoxError> {
    let capacity = flag(args, "--capacity", 2_000_000)?;
    let sim = MongoSim::start_with(SimOptions {
        oplog_capacity: capacity,
        ..SimOptions::default()
    })
    .await?;
    println!("{}", sim.uri());
    std::future::pending::<()>().await;
    Ok(())
}

/// A child's store: a memory store holding, for stream `bench.<coll>`, the point after
/// `token` (where the parent recorded the head before loading the events).
pub(crate) async fn child_store(
    coll: &str,
    token: ResumeToken,
) -> Result<(Arc<MemoryStore>, String), BoxError> {
    let store = Arc::new(MemoryStore::new());
    let stream_id = format!("bench.{coll}");
    let point = ResumePoint::post_batch(token, ClusterTime::default(), bson::DateTime::now());
    store.save(&stream_id, &point).await?;
    Ok((store, stream_id))
}

/// The child side of the memory scenario: drains `--events` from `--uri` and prints its
/// own peak resident memory.
pub(crate) async fn consume_child(args: &[String]) -> Result<(), BoxError> {
    let value = |name| super::value(args, name);
    let need = |name| super::need(args, name);
    let uri = need("--uri")?;
    let coll = need("--coll")?;
    let events: u64 = need("--events")?.parse()?;
    let token = crate::unhex(need("--token")?).ok_or("bad token hex")?;
    let token = ResumeToken::from_bytes(token)?;
    let client = Client::with_uri_str(uri).await?;
    let (store, stream_id) = child_store(coll, token).await?;
    let split = args.iter().any(|a| a == "--split");
    let snapshot = value("--snapshot")
        .map(|v| v.parse::<usize>())
        .transpose()?;
    let delay = value("--delay-ms")
        .map(|v| v.parse::<u64>())
        .transpose()?
        .map(Duration::from_millis);
    let max_buffered = value("--max-buffered-mib")
        .map(|v| v.parse::<usize>())
        .transpose()?;
    let mut watch = cdc_processor::Watch::collection(client, "bench", coll);
    if split {
        // Both images of a large document: events over 16 MiB, split and reassembled.
        watch = watch.options(
            cdc_processor::SourceOptions::default()
                .full_document(cdc_mongo::FullDocument::Required)
                .before_change(cdc_mongo::BeforeChange::Required)
                .split_large_events(true),
        );
    }
    if let Some(readers) = snapshot {
        // Read the collection, then stop: no stored point, so it starts with the scan.
        store.delete(&stream_id).await?;
        watch = watch
            .snapshot(cdc_processor::SnapshotMode::InitialOnly)
            .snapshot_parallelism(readers, 1000);
    }
    let mut builder = DocumentProcessor::builder()
        .source(watch)
        .stream_id(stream_id.clone())
        .store(store.clone());
    if let Some(mib) = max_buffered {
        builder = builder.max_buffered_bytes(mib * 1024 * 1024);
    }
    let p = builder.build()?;
    let count = Count {
        measure_size: true,
        delay,
        ..Count::default()
    };
    count.target.store(events, Ordering::Relaxed);
    let runner = p.clone();
    let handler = count.clone();
    let t0 = Instant::now();
    let task = tokio::spawn(async move { runner.start(handler).await });
    tokio::time::timeout(Duration::from_secs(900), count.done.notified())
        .await
        .map_err(|_| "stalled")?;
    let elapsed = t0.elapsed().as_secs_f64();
    p.stop();
    task.await??;
    let hwm = vm_hwm_kib(std::process::id()).ok_or("no VmHWM")?;
    println!(
        "peak_rss_kib {hwm} elapsed_s {elapsed:.2} largest_event_bytes {} cpu_s {:.2}",
        count.largest.load(Ordering::Relaxed),
        process_cpu().map_or(f64::NAN, |c| c.as_secs_f64())
    );
    Ok(())
}

/// Events per second through a handler that awaits `delay` per event (or per batch,
/// with `batch`), with `lanes` lanes, over `events` pre-loaded inserts.
async fn handler_rate(
    client: &Client,
    name: &str,
    events: usize,
    lanes: usize,
    delay: Duration,
    batch: bool,
) -> Result<f64, BoxError> {
    let coll = client.database("bench").collection::<Document>(name);
    let _ = coll.drop().await;
    let start = head_point(&coll).await?;
    preload(&coll, events, 0).await?;
    let store = Arc::new(MemoryStore::new());
    let stream_id = format!("bench.{name}");
    store.save(&stream_id, &start).await?;
    let p = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            client.clone(),
            "bench",
            name,
        ))
        .stream_id(stream_id)
        .store(store)
        .concurrency(lanes)
        .build()?;
    let count = Count {
        delay: (!batch).then_some(delay),
        ..Count::default()
    };
    count.target.store(events as u64, Ordering::Relaxed);
    let runner = p.clone();
    let t0 = Instant::now();
    let task = if batch {
        let handler = BatchCount {
            count: count.clone(),
            delay,
        };
        tokio::spawn(async move { runner.start(cdc_processor::Batches::new(handler)).await })
    } else {
        let handler = count.clone();
        tokio::spawn(async move { runner.start(handler).await })
    };
    tokio::time::timeout(Duration::from_secs(900), count.done.notified())
        .await
        .map_err(|_| "stalled")?;
    let rate = events as f64 / t0.elapsed().as_secs_f64();
    p.stop();
    task.await??;
    coll.drop().await?;
    Ok(rate)
}

/// Events per second from the stream through a real sink (`nats`: JetStream on the local
/// NATS server; `postgres`: a table in the local PostgreSQL with the checkpoint in each
/// transaction), batches of up to 500 events as `cdc` runs them.
async fn sink_rate(client: &Client, kind: &str, events: usize) -> Result<f64, BoxError> {
    use cdc_sink::{NatsSink, PostgresSink, SubjectTemplate, async_nats};
    let name = format!("sink_{kind}");
    let coll = client.database("bench").collection::<Document>(&name);
    let _ = coll.drop().await;
    let start = head_point(&coll).await?;
    preload(&coll, events, 0).await?;
    let stream_id = format!("bench.{name}");
    let pid = std::process::id();
    let stream_name = format!("BENCH_{pid}");
    let table_prefix = format!("bench_{pid}_");
    let points_table = format!("bench_points_{pid}");
    let pg_url = std::env::var("CDC_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let nats_url = std::env::var("CDC_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let builder = DocumentProcessor::builder()
        .source(cdc_processor::Watch::collection(
            client.clone(),
            "bench",
            &name,
        ))
        .stream_id(&stream_id);
    let (p, task, js) = match kind {
        "nats" => {
            let nats = async_nats::connect(&nats_url).await?;
            let sink = NatsSink::new(nats.clone(), &stream_id).subject(SubjectTemplate::parse(
                &format!("bench{pid}.{{coll}}.{{op}}"),
            )?);
            sink.ensure_stream(&stream_name, true, Duration::from_secs(120))
                .await?;
            let store = Arc::new(MemoryStore::new());
            store.save(&stream_id, &start).await?;
            let p = builder.store(store).build()?;
            let runner = p.clone();
            let task = tokio::spawn(async move {
                runner
                    .start(cdc_processor::Batches::new(sink).max_events(500))
                    .await
            });
            (p, task, Some(async_nats::jetstream::new(nats)))
        }
        _ => {
            let store = Arc::new(
                cdc_processor::stores::PostgresStore::connect(&pg_url, &points_table).await?,
            );
            store.save(&stream_id, &start).await?;
            let sink = PostgresSink::reconnecting(Arc::clone(&store), table_prefix.clone())
                .checkpoint_with(Arc::clone(&store), &stream_id);
            let p = builder.store(store).handler_checkpoints(true).build()?;
            let runner = p.clone();
            let task = tokio::spawn(async move {
                runner
                    .start(cdc_processor::Batches::new(sink).max_events(500))
                    .await
            });
            (p, task, None)
        }
    };
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(900);
    while (p.stats().events as usize) < events {
        if Instant::now() > deadline || task.is_finished() {
            return Err(format!("the {kind} sink stalled: {:?}", p.stats().last_error).into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = events as f64 / t0.elapsed().as_secs_f64();
    p.stop();
    task.await??;
    coll.drop().await?;
    if let Some(js) = js {
        js.delete_stream(&stream_name).await?;
    } else {
        let (pg, conn) = tokio_postgres::connect(&pg_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        pg.batch_execute(&format!(
            "DROP TABLE IF EXISTS \"{table_prefix}{name}\"; DROP TABLE IF EXISTS {points_table}; DROP TABLE IF EXISTS {points_table}_leases; DROP TABLE IF EXISTS {points_table}_dead_letters"
        ))
        .await?;
    }
    Ok(rate)
}

/// Peak consumer RSS while `docs` documents of 1 MiB pass a handler slower than the
/// stream, with the byte budget at `budget_mib`.
async fn large_documents_memory(
    uri: &str,
    client: &Client,
    docs: usize,
    budget_mib: usize,
) -> Result<f64, BoxError> {
    let coll_name = "large_docs";
    let coll = client.database("bench").collection::<Document>(coll_name);
    let _ = coll.drop().await;
    let start = head_point(&coll).await?;
    let body: String = std::iter::repeat_n('x', 1024 * 1024 - 64).collect();
    for i in 0..docs {
        coll.insert_one(doc! { "_id": i as i64, "body": body.as_str() })
            .await?;
    }
    // glibc raises its mmap threshold after freeing large blocks, then keeps later ones in
    // its arenas (what the `cdc` program's allocator avoids, row 12c).
    let env: &[(&str, &str)] = &[];
    let (docs, budget, token) = (
        docs.to_string(),
        budget_mib.to_string(),
        crate::hex(start.token.as_bytes()),
    );
    let words = consumer_child(
        &[
            "--uri",
            uri,
            "--coll",
            coll_name,
            "--events",
            &docs,
            "--delay-ms",
            "5",
            "--max-buffered-mib",
            &budget,
            "--token",
            &token,
        ],
        env,
    )
    .await;
    coll.drop().await?;
    peak_mib(&words?)
}

/// Peak RSS of the `cdc` program itself (built beside this one, with its own allocator:
/// `crates/cdc-cli/src/main.rs`) while it writes `docs` changes of 1 MiB documents to standard output, read
/// by this process at 5 ms per change (so its read-ahead fills up to `budget_mib`).
async fn cdc_program_memory(
    uri: &str,
    client: &Client,
    docs: usize,
    budget_mib: usize,
) -> Result<f64, BoxError> {
    use tokio::io::AsyncBufReadExt;
    let cdc = super::sibling("cdc")?;
    let coll_name = "large_docs_cdc";
    let coll = client.database("bench").collection::<Document>(coll_name);
    let _ = coll.drop().await;
    let start = head_point(&coll).await?;
    let work = std::env::temp_dir().join(format!("cdc-bench-12c-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let store = cdc_processor::stores::FileStore::new(work.join("points"))?;
    cdc_core::ResumeStore::save(&store, "bench-12c", &start).await?;
    let config = work.join("cdc.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nuri = \"{uri}\"\ndatabase = \"bench\"\ncollection = \"{coll_name}\"\nstream_id = \"bench-12c\"\n\n[processing]\nmax_buffered_bytes = {}\nmax_batch_events = 1\n\n[log]\nlevel = \"warn\"\n\n[sink]\ntype = \"stdout\"\n\n[store]\nurl = \"file:{}\"\n",
            budget_mib * 1024 * 1024,
            work.join("points").display()
        ),
    )?;
    let body: String = std::iter::repeat_n('x', 1024 * 1024 - 64).collect();
    for i in 0..docs {
        coll.insert_one(doc! { "_id": i as i64, "body": body.as_str() })
            .await?;
    }
    let mut child = tokio::process::Command::new(&cdc)
        .args(["run", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().ok_or("cdc exited at once")?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    for _ in 0..docs {
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .map_err(|_| "cdc wrote nothing for 120 s")??;
        if line.is_none() {
            return Err("cdc stopped before writing every change".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The high-water mark: the peak over the whole run, read once before the kill.
    let peak_kib = vm_hwm_kib(pid).ok_or("no VmHWM for cdc")?;
    child.kill().await?;
    coll.drop().await?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(peak_kib as f64 / 1024.0)
}

/// A process's peak resident set (`VmHWM`), in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Snapshot rate against a raw `find` scan of the same `docs` documents of ~400 B (same
/// batch size, same run): the raw scan's documents/s, and per reader count the snapshot's
/// documents/s and the consumer's peak RSS (a child process).
async fn snapshot_rates(
    uri: &str,
    client: &Client,
    docs: u64,
    sim_pid: Option<u32>,
) -> Result<(f64, Vec<(usize, f64, f64)>), BoxError> {
    use futures_util::TryStreamExt;
    let coll_name = "snapshot";
    let coll = client.database("bench").collection::<Document>(coll_name);
    let _ = coll.drop().await;
    let pad = "x".repeat(360);
    let mut next = 0_u64;
    while next < docs {
        let n = (docs - next).min(10_000);
        coll.insert_many(
            (next..next + n).map(|i| doc! { "_id": i as i64, "n": i as i64, "pad": pad.as_str() }),
        )
        .await?;
        next += n;
    }
    let t0 = Instant::now();
    let mut cursor = client
        .database("bench")
        .collection::<bson::RawDocumentBuf>(coll_name)
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .batch_size(1000)
        .await?;
    let mut seen = 0_u64;
    while cursor.try_next().await?.is_some() {
        seen += 1;
    }
    let raw = seen as f64 / t0.elapsed().as_secs_f64();
    let token = crate::hex(head_point(&coll).await?.token.as_bytes());
    let mut rates = Vec::new();
    let sim_cpu = || sim_pid.and_then(|pid| cpu_of(&pid.to_string()));
    for readers in [1_usize, 4] {
        let sim_before = sim_cpu();
        let words = consumer_child(
            &[
                "--uri",
                uri,
                "--coll",
                coll_name,
                "--events",
                &docs.to_string(),
                "--snapshot",
                &readers.to_string(),
                "--token",
                &token,
            ],
            &[],
        )
        .await?;
        let elapsed: f64 = words.get(3).ok_or("no elapsed")?.parse()?;
        // Where the CPU went: the consumer's whole run and the simulator's meanwhile.
        let consumer_cpu: f64 = words.get(7).map_or(Ok(f64::NAN), |w| w.parse())?;
        let sim_spent = match (sim_before, sim_cpu()) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => f64::NAN,
        };
        println!(
            "snapshot, {readers} reader(s): {elapsed:.2} s; CPU per document: consumer {:.2} µs, simulator {:.2} µs",
            consumer_cpu * 1e6 / docs as f64,
            sim_spent * 1e6 / docs as f64
        );
        rates.push((readers, docs as f64 / elapsed, peak_mib(&words)?));
    }
    coll.drop().await?;
    Ok((raw, rates))
}

/// Runs the `consume` child with `args` (and `env`), returning the words it printed:
/// `peak_rss_kib <n> elapsed_s <s> largest_event_bytes <b>`.
async fn consumer_child(args: &[&str], env: &[(&str, &str)]) -> Result<Vec<String>, BoxError> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?);
    for (key, value) in env {
        child.env(key, value);
    }
    let out = child.arg("consume").args(args).output().await?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "consumer failed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(text.split_whitespace().map(str::to_owned).collect())
}

/// The peak RSS a consumer child printed, in MiB.
fn peak_mib(words: &[String]) -> Result<f64, BoxError> {
    let kib: f64 = words.get(1).ok_or("no figure")?.parse()?;
    Ok(kib / 1024.0)
}

/// Peak consumer RSS while one update of a large document with both images (an event
/// of about `3 × field_mib` MiB, over 16 MiB, so split into fragments) is read through
/// the processor: returns the event's size and the peak, in MiB.
async fn split_memory(
    uri: &str,
    client: &Client,
    field_mib: usize,
) -> Result<(f64, f64), BoxError> {
    let db = client.database("bench");
    let coll_name = "split";
    let _ = db.collection::<Document>(coll_name).drop().await;
    db.run_command(
        doc! { "create": coll_name, "changeStreamPreAndPostImages": { "enabled": true } },
    )
    .await?;
    let coll = db.collection::<Document>(coll_name);
    let field = |c: char| std::iter::repeat_n(c, field_mib * 1024 * 1024).collect::<String>();
    coll.insert_one(doc! { "_id": 1, "a": field('x') }).await?;
    let start = head_point(&coll).await?;
    coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "a": field('y') } })
        .await?;
    let token = crate::hex(start.token.as_bytes());
    let words = consumer_child(
        &[
            "--uri", uri, "--coll", coll_name, "--events", "1", "--split", "--token", &token,
        ],
        &[],
    )
    .await;
    coll.drop().await?;
    let words = words?;
    let bytes: f64 = words.get(5).ok_or("no event size")?.parse()?;
    Ok((bytes / (1024.0 * 1024.0), peak_mib(&words)?))
}

/// Peak consumer RSS while a burst of `events` pre-loaded inserts is drained.
async fn peak_memory(uri: &str, client: &Client, events: usize) -> Result<f64, BoxError> {
    let coll_name = format!("burst{events}");
    let coll = client.database("bench").collection::<Document>(&coll_name);
    let start = head_point(&coll).await?;
    preload(&coll, events, 0).await?;
    let events = events.to_string();
    let token = crate::hex(start.token.as_bytes());
    let words = consumer_child(
        &[
            "--uri", uri, "--coll", &coll_name, "--events", &events, "--token", &token,
        ],
        &[],
    )
    .await;
    coll.drop().await?;
    peak_mib(&words?)
}

/// Time from restart to the first answered read, from an old event token versus a fresh
/// post-batch token, with `filtered` non-matching events in between.
async fn resume_cost(client: &Client, filtered: usize) -> Result<(f64, f64), BoxError> {
    let coll = client.database("bench").collection::<Document>("selective");
    coll.drop().await?;
    let options = SourceOptions::default()
        .operation_types([OperationType::Delete])
        .max_await_time(Duration::from_millis(10));
    let source = MongoSource::new(
        client.clone(),
        Scope::collection("bench", "selective"),
        options,
    );
    let mut cursor = source.open(&StartPosition::Now).await?;
    coll.insert_one(doc! { "_id": -1_i64 }).await?;
    coll.delete_one(doc! { "_id": -1_i64 }).await?;
    let last_event = loop {
        if let Some(e) = cursor.next().await?.into_event()? {
            break e.token;
        }
    };
    preload(&coll, filtered, 0).await?;
    // What an idle checkpoint holds: the post-batch token of a cursor that is up to date.
    let fresh = source
        .open(&StartPosition::Now)
        .await?
        .resume_token()
        .ok_or("no fresh token")?;
    let mut timings = Vec::new();
    for token in [last_event, fresh] {
        let t0 = Instant::now();
        let mut c = source.open(&StartPosition::ResumeAfter(token)).await?;
        let _ = c.next().await?;
        timings.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    coll.drop().await?;
    Ok((timings[0], timings[1]))
}

/// Store writes per minute with the default policy: idle (the cluster busy elsewhere) and
/// busy (1,000 events/s on the watched collection).
async fn store_writes(client: &Client, idle_seconds: u64) -> Result<(f64, f64), BoxError> {
    let mut out = Vec::new();
    for busy in [false, true] {
        let coll = client.database("bench").collection::<Document>("writes");
        let elsewhere = client.database("bench").collection::<Document>("elsewhere");
        let store = Arc::new(CountingStore {
            inner: MemoryStore::new(),
            saves: AtomicU64::new(0),
        });
        let p = DocumentProcessor::builder()
            .source(cdc_processor::Watch::collection(
                client.clone(),
                "bench",
                "writes",
            ))
            .stream_id(format!("writes-{busy}"))
            .store(store.clone())
            .build()?;
        let runner = p.clone();
        let task = tokio::spawn(async move { runner.start(Count::default()).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        store.saves.store(0, Ordering::Relaxed);
        let seconds = if busy { 20 } else { idle_seconds };
        let (target, rate) = if busy {
            (&coll, 1000u64)
        } else {
            (&elsewhere, 20u64)
        };
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        let t0 = Instant::now();
        let mut i = 0usize;
        while t0.elapsed() < Duration::from_secs(seconds) {
            tick.tick().await;
            target
                .insert_one(payload(1_000_000 * usize::from(busy) + i))
                .await?;
            i += 1;
        }
        let per_minute =
            store.saves.load(Ordering::Relaxed) as f64 * 60.0 / t0.elapsed().as_secs_f64();
        p.stop();
        task.await??;
        coll.drop().await?;
        elsewhere.drop().await?;
        out.push(per_minute);
    }
    Ok((out[0], out[1]))
}

pub(crate) async fn all(args: &[String]) -> Result<(), BoxError> {
    let events = flag(args, "--events", 100_000)?;
    let rounds = flag(args, "--rounds", 5)?;
    let burst = flag(args, "--burst", 1_000_000)?;
    let filtered = flag(args, "--filtered", 1_000_000)?;
    let idle_seconds = flag(args, "--idle-seconds", 65)? as u64;
    // The simulator runs in its own process, so its heap (the whole oplog) neither shows in
    // nor slows the consumer's measurements.
    let capacity = burst.max(filtered).max(events) * 2 + 1000;
    let (mut server, uri) = super::spawn_sim(capacity).await?;
    let client = Client::with_uri_str(&uri).await?;
    let batch = super::value(args, "--batch").and_then(|v| v.parse().ok());
    let only: Vec<String> = super::value(args, "--only")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let want = |id: &str| only.is_empty() || only.iter().any(|o| o == id);
    let mut b = Bench {
        client: client.clone(),
        events,
        next: 0,
        batch,
    };
    let mut rows = Vec::new();
    let tp = "events/s";
    eprintln!("bench: {events} events of ~400 B per round, {rounds} rounds after a warm-up");

    let memory: Arc<dyn ResumeStore> = Arc::new(MemoryStore::new());
    let dir: PathBuf = std::env::temp_dir().join(format!("cdc-bench-{}", std::process::id()));
    let file: Arc<dyn ResumeStore> = Arc::new(cdc_processor::stores::FileStore::new(&dir)?);
    let mongo: Arc<dyn ResumeStore> = Arc::new(cdc_processor::stores::MongoStore::new(
        &client,
        "bench_local",
        "points",
    ));
    let batched = CheckpointPolicy::default;
    let throughput: Vec<(&str, &str, Throughput)> = vec![
        (
            "1",
            "raw driver, raw BSON events, no processing (ceiling)",
            Throughput::Raw,
        ),
        (
            "2",
            "processor, batched checkpoints, memory store",
            Throughput::Processor(Arc::clone(&memory), batched(), 1024),
        ),
        (
            "2b",
            "processor, batched, memory store, no read-ahead",
            Throughput::Processor(Arc::clone(&memory), batched(), 1),
        ),
        (
            "3",
            "processor, batched checkpoints, file store",
            Throughput::Processor(file, batched(), 1024),
        ),
        (
            "4",
            "processor, batched checkpoints, MongoDB store",
            Throughput::Processor(Arc::clone(&mongo), batched(), 1024),
        ),
        (
            "5",
            "processor, a checkpoint per event, MongoDB store",
            Throughput::Processor(mongo, CheckpointPolicy::every_event(), 1024),
        ),
        (
            "6",
            "Go protocol re-enacted (2 writes/event), MongoDB store",
            Throughput::Go,
        ),
    ];
    let throughput: Vec<_> = throughput
        .into_iter()
        .filter(|(id, _, _)| want(id))
        .collect();
    // Rounds are interleaved (1, 2, 2b, … then again), so that drift on the machine falls
    // on every scenario alike rather than on whichever ran last.
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); throughput.len()];
    for r in 0..=rounds {
        for ((id, _, scenario), v) in throughput.iter().zip(&mut samples) {
            let x = b.run(scenario).await?;
            eprintln!(
                "bench: round {r}{} scenario {id}: {:.0} events/s, consumer CPU {:.2} µs/event",
                if r == 0 { " (warm-up)" } else { "" },
                x.rate,
                x.cpu_us
            );
            if r > 0 {
                v.push(x);
            }
        }
    }
    for ((id, name, _), v) in throughput.iter().zip(&samples) {
        rows.push(row(*id, *name, tp, v.iter().map(|x| x.rate).collect()));
    }
    // The same rounds seen from the consumer's side: its CPU time per event (the
    // simulator's is not counted), steadier than throughput on a shared machine.
    for ((id, name, _), v) in throughput.iter().zip(&samples) {
        rows.push(row(
            format!("{id}-cpu"),
            format!("{name}: consumer CPU per event"),
            "µs/event",
            v.iter().map(|x| x.cpu_us).collect(),
        ));
    }
    // Scenario 2 against scenario 1 round by round (the two ran back to back).
    let paired = |a: &str, b: &str| -> Option<Vec<f64>> {
        let find = |id: &str| throughput.iter().position(|(i, _, _)| *i == id);
        let (a, b) = (find(a)?, find(b)?);
        Some(
            samples[a]
                .iter()
                .zip(&samples[b])
                .map(|(x, y)| x.rate / y.rate)
                .collect(),
        )
    };
    if let Some(ratios) = paired("2", "1") {
        rows.push(row(
            "2/1",
            "scenario 2 ÷ scenario 1, paired by round",
            "ratio",
            ratios,
        ));
        // The same two paths in instructions (callgrind, about 2% apart run to run: the
        // median of three runs).
        let runs = super::instructions::measure_runs(20_000, 3).await?;
        super::instructions::print_runs(&runs);
        rows.push(row(
            "2i",
            "scenario 2 ÷ scenario 1 in instructions per event (callgrind, 3 runs; target ≤ 1.5)",
            "ratio",
            runs.iter()
                .map(|(raw, processor)| processor / raw)
                .collect(),
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("bench: throughput done");
    if want("7") {
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        for r in 0..=rounds.min(3) {
            let (a, z) = latency(&client, 1000, 5).await?;
            if r > 0 {
                p50.push(a);
                p99.push(z);
            }
        }
        rows.push(row(
            "7a",
            "latency insert-acked → handler, p50, at 1,000 events/s",
            "ms",
            p50,
        ));
        rows.push(row(
            "7b",
            "latency insert-acked → handler, p99, at 1,000 events/s",
            "ms",
            p99,
        ));
    }
    if want("8") {
        let small = peak_memory(&uri, &client, burst / 10).await?;
        let large = peak_memory(&uri, &client, burst).await?;
        rows.push(row(
            "8a",
            format!("peak consumer RSS, burst of {}", burst / 10),
            "MiB",
            vec![small],
        ));
        rows.push(row(
            "8b",
            format!("peak consumer RSS, burst of {burst}"),
            "MiB",
            vec![large],
        ));
    }
    if want("12") || want("12ab") {
        // Handlers that wait 1 ms per event: sequential against lanes.
        let delay = Duration::from_millis(1);
        let sequential = handler_rate(&client, "lanes1", 1_000, 1, delay, false).await?;
        rows.push(row(
            "12a",
            "handler awaiting 1 ms per event, sequential",
            "events/s",
            vec![sequential],
        ));
        for lanes in [16, 64, 256] {
            let rate = handler_rate(
                &client,
                &format!("lanes{lanes}"),
                20_000,
                lanes,
                delay,
                false,
            )
            .await?;
            if lanes == 64 {
                println!("concurrency 64 ÷ sequential: {:.1}x", rate / sequential);
            }
            rows.push(row(
                format!("12-{lanes}"),
                format!("handler awaiting 1 ms per event, concurrency {lanes}"),
                "events/s",
                vec![rate],
            ));
        }
        let batched = handler_rate(&client, "batches", events, 1, delay, true).await?;
        rows.push(row(
            "12b",
            "batch handler awaiting 1 ms per batch",
            "events/s",
            vec![batched],
        ));
    }
    if want("12") || want("12c") {
        let budget = 64;
        // First the `cdc` program itself (its allocator), then the library on glibc's
        // default malloc.
        let program = cdc_program_memory(&uri, &client, 300, budget).await?;
        println!(
            "peak RSS with 1 MiB documents: {program:.1} MiB (bound {} MiB)",
            budget + 32
        );
        rows.push(row(
            "12c",
            format!("peak RSS of the `cdc` program as it runs (jemalloc: decay 0, 2 arenas), 300 documents of 1 MiB to stdout read at 5 ms per change, max_buffered_bytes {budget} MiB"),
            "MiB",
            vec![program],
        ));
    }
    if want("12") || want("12d") {
        let budget = 64;
        let defaults = large_documents_memory(&uri, &client, 300, budget).await?;
        println!(
            "peak RSS with 1 MiB documents, glibc's default malloc settings: {defaults:.1} MiB (bound {} MiB)",
            budget + 32
        );
        rows.push(row(
            "12d",
            "peak consumer RSS of the library on glibc's default malloc, as 12c with a 5 ms handler",
            "MiB",
            vec![defaults],
        ));
    }
    if want("13") {
        let docs = std::env::var("CDC_BENCH_SNAPSHOT_DOCS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000_u64);
        let (raw, rates) = snapshot_rates(&uri, &client, docs, server.id()).await?;
        rows.push(row(
            "13a",
            format!("raw find scan of {docs} documents, batches of 1000"),
            "docs/s",
            vec![raw],
        ));
        for (readers, rate, peak) in &rates {
            rows.push(row(
                format!("13-{readers}"),
                format!(
                    "snapshot of {docs} documents, {readers} reader{}",
                    if *readers == 1 { "" } else { "s" }
                ),
                "docs/s",
                vec![*rate],
            ));
            rows.push(row(
                format!("13m-{readers}"),
                format!(
                    "peak consumer RSS during that snapshot, {readers} reader{}",
                    if *readers == 1 { "" } else { "s" }
                ),
                "MiB",
                vec![*peak],
            ));
        }
        if let Some((_, best, _)) = rates.iter().max_by(|a, b| a.1.total_cmp(&b.1)) {
            println!("snapshot ÷ raw find scan: {:.2}x", best / raw);
        }
        let rate_of = |n: usize| rates.iter().find(|r| r.0 == n).map(|r| r.1);
        if let (Some(one), Some(four)) = (rate_of(1), rate_of(4)) {
            println!("snapshot 4 readers ÷ 1 reader: {:.2}x", four / one);
        }
    }
    if want("14") {
        let ceiling = rows.iter().find(|r| r.id == "1").map(|r| r.median);
        for (id, kind, label) in [
            ("14a", "nats", "NATS JetStream"),
            ("14b", "postgres", "PostgreSQL"),
        ] {
            let rate = sink_rate(&client, kind, events).await?;
            match ceiling {
                Some(c) => println!("{kind} sink ÷ scenario 1: {:.2}x", rate / c),
                None => println!(
                    "{kind} sink: {rate:.0} events/s (run scenario 1 too for the ratio: --only 1,14)"
                ),
            }
            rows.push(row(
                id,
                format!(
                    "through the {label} sink (batches of 500{})",
                    if kind == "postgres" {
                        ", checkpoint in each transaction"
                    } else {
                        ", acknowledged by JetStream"
                    }
                ),
                "events/s",
                vec![rate],
            ));
        }
    }
    if want("15") {
        // Lag under load: the load generator at 5,000 writes/s for 60 s through `cdc run`.
        for (id, kind) in [("15a", "nats"), ("15b", "postgres")] {
            let lag = super::lag::lag_into(&uri, kind, 5000, 60).await?;
            super::lag::print(kind, 5000, 60, &lag);
            rows.push(row(
                id,
                format!(
                    "lag p99, write acknowledged → {}, 5,000 writes/s for 60 s through `cdc run` (target {:.0} ms)",
                    if kind == "nats" { "stored in JetStream" } else { "row committed in PostgreSQL" },
                    super::lag::target_ms(kind)
                ),
                "ms",
                vec![lag.p99_ms],
            ));
        }
    }
    if want("11") {
        let (event, peak) = split_memory(&uri, &client, 12).await?;
        println!(
            "peak RSS with a {event:.1} MiB split event: {peak:.1} MiB ({:.2}x the event; target < 4x)",
            peak / event
        );
        rows.push(row(
            "11a",
            "size of one event split into fragments (both images of a 12 MiB document)",
            "MiB",
            vec![event],
        ));
        rows.push(row(
            "11b",
            "peak consumer RSS while it is read, reassembled and handled",
            "MiB",
            vec![peak],
        ));
    }
    if want("9") {
        let (old, fresh) = resume_cost(&client, filtered).await?;
        rows.push(row(
            "9a",
            format!(
                "restart → first read, from the last event's token ({filtered} filtered after it)"
            ),
            "ms",
            vec![old],
        ));
        rows.push(row(
            "9b",
            "restart → first read, from a fresh post-batch token",
            "ms",
            vec![fresh],
        ));
    }
    if want("10") {
        let (idle, busy) = store_writes(&client, idle_seconds).await?;
        rows.push(row(
            "10a",
            format!("store writes per minute, idle stream ({idle_seconds} s window)"),
            "writes/min",
            vec![idle],
        ));
        rows.push(row(
            "10b",
            "store writes per minute, busy stream (1,000 events/s)",
            "writes/min",
            vec![busy],
        ));
    }
    server.kill().await?;

    report(&rows, events, rounds)
}

/// A figure with `places` decimals, or a dash when the scenario behind it did not run.
fn shown(x: f64, places: usize) -> String {
    if x.is_finite() {
        format!("{x:.places$}")
    } else {
        "—".to_owned()
    }
}

fn report(rows: &[Row], events: usize, rounds: usize) -> Result<(), BoxError> {
    let get = |id: &str| {
        rows.iter()
            .find(|r| r.id == id)
            .map_or(f64::NAN, |r| r.median)
    };
    let ceiling = get("1");
    let go = get("6");
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let build = if cfg!(debug_assertions) {
        "debug build (figures not representative)"
    } else {
        "release build"
    };
    let mut md = format!(
        "# Benchmark report\n\nMeasured {date} on a {cpus}-core machine, mongo-sim on loopback, {build}; {events} events of ~400 B per throughput round, median of {rounds} rounds after a warm-up (min–max in brackets).\n\n| # | scenario | median | spread | unit | × scenario 1 | × scenario 6 |\n| --- | --- | ---: | --- | --- | ---: | ---: |\n"
    );
    let mut json_rows = Vec::new();
    for r in rows {
        let (x1, x6) = if r.unit == "events/s" {
            (shown(r.median / ceiling, 2), shown(r.median / go, 1))
        } else {
            (String::new(), String::new())
        };
        // Ratios and per-event CPU need two decimals to be read; the rest one.
        let places = if r.unit == "ratio" || r.unit == "µs/event" {
            2
        } else {
            1
        };
        md.push_str(&format!(
            "| {} | {} | {:.places$} | {:.places$}–{:.places$} | {} | {x1} | {x6} |\n",
            r.id, r.name, r.median, r.min, r.max, r.unit
        ));
        json_rows.push(json!({ "id": r.id, "scenario": r.name, "unit": r.unit, "median": r.median, "min": r.min, "max": r.max }));
    }
    let targets = format!(
        "\nTargets: scenario 2 ≥ 0.9× scenario 1: {}× (medians), {}× (paired rounds); scenario 4 ≥ 10× scenario 6: {}×; p99 < 10 ms: {} ms; peak memory < 64 MiB and flat: {} → {} MiB; fresh token ≥ 10× faster: {}×; idle writes ≤ 1/min: {}/min; split event peak RSS < 4× the event: {}×; concurrency 64 ÷ sequential ≥ 40×: {}×; batch handler ≥ 0.5× scenario 1: {}×; peak RSS with 1 MiB documents ≤ 96 MiB: {} MiB; snapshot ÷ raw find scan ≥ 0.8×: {}×; snapshot peak RSS ≤ 64 MiB: {} MiB; NATS sink ≥ 0.3× scenario 1: {}×.\n",
        shown(get("2") / ceiling, 2),
        shown(get("2/1"), 2),
        shown(get("4") / go, 1),
        shown(get("7b"), 2),
        shown(get("8a"), 1),
        shown(get("8b"), 1),
        shown(get("9a") / get("9b"), 0),
        shown(get("10a"), 1),
        shown(get("11b") / get("11a"), 2),
        shown(get("12-64") / get("12a"), 1),
        shown(get("12b") / ceiling, 2),
        shown(get("12c"), 1),
        shown(get("13-4").max(get("13-1")) / get("13a"), 2),
        shown(get("13m-4").max(get("13m-1")), 1),
        shown(get("14a") / ceiling, 2),
    );
    md.push_str(&targets);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("report.md"), &md)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(
            &json!({ "date": date, "cpus": cpus, "events": events, "rounds": rounds, "rows": json_rows }),
        )?,
    )?;
    println!("{md}");
    println!("written to {}", dir.join("report.md").display());
    Ok(())
}
