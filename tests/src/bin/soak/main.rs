//! `cdc-soak`: the kill -9 soak.
//!
//! - `cdc-soak run [--kills K] [--rate R] [--uri URI] [--concurrency N] [--transactions]
//!   [--poison P]` starts mongo-sim (or uses URI), a writer process, and a consumer process
//!   (with N lanes) that it SIGKILLs K times at random moments and restarts; then runs the
//!   independent verifier over the two logs. With lanes (or `--transactions`) the writer
//!   also commits multi-document transactions and the verifier checks each reached the
//!   consumer whole. With `--poison P` the consumer's handler refuses P% of the changes
//!   (the same ones every time), which go to the file store's dead letters with their
//!   keys parked: the consumer is killed while dead-lettering too, and the verifier counts
//!   a change as delivered when it is in the log or in the dead letters (never both). With
//!   `--snapshot [--preload N]` N documents (1,000,000) exist before the consumer starts,
//!   which snapshots them while the writer goes on; the verifier rebuilds the collection
//!   from what the consumer delivered, compares it with the collection's content, and
//!   counts versions of a key that arrived after a newer one (both must be nothing); 20
//!   kills unless `--kills` says otherwise (100 otherwise).
//! - `cdc-soak run --standby N [--kills K] [--ttl MS]`: N + 1 consumers on one stream
//!   with a leased file store; the holder is SIGKILLed K times (20), then paused past its
//!   TTL and resumed; prints the verifier's line, `overlapping holders: n` and
//!   `failover p50 … ms, max … ms (ttl … ms)`.
//! - `cdc-soak run --sink nats|postgres [--kills K]`: the `cdc` program (built beside this
//!   one) as the consumer, moving the changes into NATS JetStream or PostgreSQL, SIGKILLed
//!   K times (20); then the sink is checked against the writer's log (NATS: every change
//!   exactly once) or the collection (PostgreSQL: the table equals it): `sink <name>: lost
//!   n | duplicates n | checked n`.
//! - `cdc-soak writer --uri U --log F --stop-file S [--rate R] [--connections N] [--keys K]
//!   [--transactions] [--burst-every S --burst-x F] [--preload N] [--seconds S]`: the load
//!   generator (see `writer.rs`), logging every acknowledged change, until S exists.
//!
//! Every run takes `--seconds S` (the kills spread over about S seconds) and the load
//! generator's `--rate` (total writes/s, 5,000 unless given),
//! `--connections` (8), `--keys`, `--burst-every` and `--burst-x`, and its summary starts
//! with `soak at load: <r> writes/s | lost <n> | …`, the rate the writer reached.
//! - `cdc-soak consumer --uri U --store DIR --log F`: a DocumentProcessor with the file
//!   store, appending every delivered change to F and fsyncing before acknowledging.

// A command-line program: printing its figures is its job.
#![allow(clippy::print_stdout)]

mod sink;
mod writer;

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bson::{Document, doc};
use cdc_core::{BoxError, ChangeEvent, Dispatcher};
use cdc_core::{DeadLetterStore, ResumeStore};
use cdc_processor::{
    CheckpointPolicy, DocumentProcessor, HandlerErrorPolicy, default_backoff, stores::FileStore,
};
use cdc_tests::verify::{parse, session_overlaps, sessions, verify, verify_transactions};

/// The consumer's checkpoint batch: also the per-kill bound on repeats.
const BATCH: u32 = 100;

fn value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn need(args: &[String], name: &str) -> Result<String, BoxError> {
    value(args, name).ok_or_else(|| format!("{name} is required").into())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]).await,
        Some("writer") => writer::run(&args[1..]).await.map(|()| true),
        Some("consumer") => consumer(&args[1..]).await.map(|()| true),
        _ => Err(
            "usage: cdc-soak run [--kills K] [--seconds S] [--rate R] [--connections N] [--keys K] [--burst-every S --burst-x F] [--uri URI] [--concurrency N] [--transactions] [--poison P] [--snapshot [--preload N]] [--standby N [--ttl MS]] [--sink nats|postgres] | writer … | consumer …".into(),
        ),
    };
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("cdc-soak: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn collection(client: &mongodb::Client) -> mongodb::Collection<Document> {
    let majority = mongodb::options::WriteConcern::majority();
    client.database("soak").collection_with_options(
        "docs",
        mongodb::options::CollectionOptions::builder()
            .write_concern(majority)
            .build(),
    )
}

/// Whether the consumer refuses a change, every time: `percent`% of them, by a stable
/// hash of the change.
fn poisoned(id: i64, change: &str, percent: u64) -> bool {
    let hash = format!("{id} {change}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    hash % 100 < percent
}

/// Appends each delivered change to the log and fsyncs before acknowledging; refuses the
/// poisoned ones; with a times file, appends the time (ms since the epoch) of each change
/// handled there too (not fsynced: a killed process's writes survive it).
struct DeliveryLog(Mutex<std::fs::File>, u64, Option<Mutex<std::fs::File>>);

#[async_trait]
impl Dispatcher for DeliveryLog {
    async fn dispatch(
        &self,
        event: &ChangeEvent,
        previous: Option<BoxError>,
    ) -> Result<(), BoxError> {
        if let Some(e) = previous {
            return Err(e);
        }
        let Some((id, change)) = cdc_tests::workload::change_of(event) else {
            return Ok(());
        };
        if poisoned(id, &change, self.1) {
            return Err(format!("refusing {id} {change}").into());
        }
        let mut file = self.0.lock().map_err(|_| "log poisoned")?;
        // One write call per line: a kill cannot leave half of it behind.
        file.write_all(format!("{id} {change}\n").as_bytes())?;
        file.sync_data()?;
        if let Some(times) = &self.2 {
            let now = bson::DateTime::now().timestamp_millis();
            times
                .lock()
                .map_err(|_| "times poisoned")?
                .write_all(format!("{now}\n").as_bytes())?;
        }
        Ok(())
    }
}

async fn consumer(args: &[String]) -> Result<(), BoxError> {
    let uri = need(args, "--uri")?;
    let store_dir = need(args, "--store")?;
    let log_path = need(args, "--log")?;
    let client = mongodb::Client::with_uri_str(&uri).await?;
    let concurrency: usize = value(args, "--concurrency").map_or(Ok(1), |v| v.parse())?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    // A new session of deliveries: the verifier checks transactions session by session.
    // A line a killed consumer left unfinished is ended first, so the marker stands alone.
    let torn = std::fs::read(&log_path).is_ok_and(|b| b.last().is_some_and(|&c| c != b'\n'));
    log.write_all(if torn { b"\n# start\n" } else { b"# start\n" })?;
    log.sync_data()?;
    let poison: u64 = value(args, "--poison").map_or(Ok(0), |v| v.parse())?;
    let store = Arc::new(FileStore::new(store_dir)?);
    let mut builder = DocumentProcessor::builder();
    let mut watch = cdc_processor::Watch::collection(client, "soak", "docs");
    if args.iter().any(|a| a == "--snapshot") {
        watch = watch
            .snapshot(cdc_processor::SnapshotMode::Initial)
            .full_document(cdc_processor::FullDocument::UpdateLookup);
    }
    if poison > 0 {
        builder = builder.on_handler_error(
            HandlerErrorPolicy::dead_letter()
                .retries(1)
                .backoff(Duration::from_millis(1), Duration::from_millis(1))
                .park_keys(true),
        );
    }
    // With a lease: one active consumer among several, the others standing by.
    builder = match value(args, "--lease") {
        Some(ms) => builder.store(
            cdc_processor::Storage::leased(store, Duration::from_millis(ms.parse()?))
                .owner(need(args, "--owner")?),
        ),
        None if poison > 0 => {
            builder.store(cdc_processor::Storage::new(store.clone()).dead_letters(store))
        }
        None => builder.store(store),
    };
    let times = match value(args, "--times") {
        Some(path) => Some(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        )),
        None => None,
    };
    let processor = builder
        .source(watch)
        .checkpoint(CheckpointPolicy::batched(
            BATCH,
            Duration::from_millis(500),
        )?)
        .concurrency(concurrency)
        .keep_transactions(args.iter().any(|a| a == "--transactions"))
        .build()?;
    processor
        .start_with_retry(
            default_backoff(),
            DeliveryLog(Mutex::new(log), poison, times),
        )
        .await?;
    Ok(())
}

/// The collection as the delivered log says it is: each document's last delivered change.
fn replica_of(delivered: &[(String, String)]) -> std::collections::BTreeMap<i64, String> {
    let mut out = std::collections::BTreeMap::new();
    for (id, change) in delivered {
        let Ok(id) = id.parse::<i64>() else { continue };
        if change == "deleted" {
            out.remove(&id);
        } else {
            out.insert(id, change.clone());
        }
    }
    out
}

/// The collection's content: `_id` → `v<version>`.
async fn collection_content(
    uri: &str,
) -> Result<std::collections::BTreeMap<i64, String>, BoxError> {
    use futures_util::TryStreamExt;
    let client = mongodb::Client::with_uri_str(uri).await?;
    let mut cursor = collection(&client)
        .find(doc! {})
        .projection(doc! { "version": 1 })
        .await?;
    let mut out = std::collections::BTreeMap::new();
    while let Some(d) = cursor.try_next().await? {
        out.insert(d.get_i64("_id")?, format!("v{}", d.get_i64("version")?));
    }
    Ok(out)
}

/// Waits for the last consumer to catch up, then checks the replica built from what it
/// delivered equals the collection; prints `replica equals collection: yes (<n>
/// documents)` or the first differences, and the first-arrival order of versions.
async fn verify_snapshot(
    uri: &str,
    written: &Path,
    delivered: &Path,
    consumer: &mut Child,
    kills: usize,
    started: Instant,
) -> Result<bool, BoxError> {
    let content = collection_content(uri).await?;
    let mut catch_up = cdc_tests::load::CatchUp::new();
    let mut replica;
    // Keys whose last state the replica lacks: missing, stale, or still present after
    // their delete.
    let lost = loop {
        replica = replica_of(&parse(
            &std::fs::read_to_string(delivered).unwrap_or_default(),
        )?);
        let lost = sink::differing(&content, &replica);
        if catch_up.done(lost) {
            break lost;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    consumer.kill()?;
    consumer.wait()?;
    let delivered_log = parse(&std::fs::read_to_string(delivered)?)?;
    let equal = replica == content;
    // First arrivals of each key's versions (repeats after a kill left out).
    let mut last: HashMap<&str, u64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut backwards = 0;
    for c in &delivered_log {
        if !seen.insert(c) {
            continue;
        }
        if let Some(v) = c.1.strip_prefix('v').and_then(|v| v.parse::<u64>().ok()) {
            let before = last.insert(c.0.as_str(), v).unwrap_or(0);
            if v < before {
                backwards += 1;
            }
        }
    }
    println!();
    print_load_line(
        written,
        lost,
        &format!(
            "replica equals collection {} | versions after a newer one {backwards} | {kills} kills",
            if equal { "yes" } else { "no" }
        ),
    )?;
    if equal {
        println!(
            "replica equals collection: yes ({} documents)",
            content.len()
        );
    } else {
        let differences: Vec<String> = content
            .iter()
            .filter(|(id, v)| replica.get(id) != Some(v))
            .map(|(id, v)| {
                format!(
                    "{id}: {v} in the collection, {:?} in the replica",
                    replica.get(id)
                )
            })
            .chain(
                replica
                    .iter()
                    .filter(|(id, _)| !content.contains_key(id))
                    .map(|(id, v)| format!("{id}: absent from the collection, {v} in the replica")),
            )
            .take(5)
            .collect();
        println!("replica equals collection: no ({differences:?})");
    }
    println!("lost {lost} (keys whose last state the replica lacks)");
    println!("versions arriving after a newer one of their key: {backwards}");
    println!(
        "soak: {kills} kills in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let equal = equal && backwards == 0;
    println!(
        "soak: {}",
        if equal {
            "every promise held"
        } else {
            "A PROMISE WAS BROKEN"
        }
    );
    Ok(equal)
}

/// The changes in the consumer's dead letters, in stream order, as the verifier reads them.
async fn dead_letters(store: &FileStore) -> Result<Vec<(String, String)>, BoxError> {
    let letters = DeadLetterStore::list(store, "soak.docs", usize::MAX).await?;
    let mut changes = Vec::with_capacity(letters.len());
    for letter in letters {
        if let Some((id, change)) = cdc_tests::workload::change_of(&letter.decode()?) {
            changes.push((id.to_string(), change));
        }
    }
    Ok(changes)
}

fn spawn_self(args: &[&str]) -> Result<Child, BoxError> {
    Ok(Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::null())
        .spawn()?)
}

/// The load generator's options a run passes on to its writer: `--rate` (total writes/s,
/// 5,000 unless given; 0 = as fast as acknowledged), `--connections` (8), `--keys`,
/// `--burst-every`, `--burst-x`.
#[derive(Debug, Clone)]
struct LoadArgs {
    rate: u64,
    args: Vec<String>,
}

/// The load generator's default target, in writes per second.
const DEFAULT_RATE: u64 = 5_000;

impl LoadArgs {
    fn from(args: &[String]) -> Result<Self, BoxError> {
        let rate = value(args, "--rate").map_or(Ok(DEFAULT_RATE), |v| v.parse())?;
        let mut out = vec!["--rate".to_owned(), rate.to_string()];
        for name in ["--connections", "--keys", "--burst-every", "--burst-x"] {
            if let Some(v) = value(args, name) {
                out.extend([name.to_owned(), v]);
            }
        }
        Ok(Self { rate, args: out })
    }

    /// `at 5000 writes/s (8 connections)` for a run's first line.
    fn describe(&self) -> String {
        let connections = value(&self.args, "--connections").unwrap_or_else(|| "8".to_owned());
        match self.rate {
            0 => format!("as fast as it goes ({connections} connections)"),
            r => format!("at {r} writes/s ({connections} connections)"),
        }
    }
}

/// Starts the writer process (the load generator), logging to `log` until `stop_file`
/// exists; `extra` adds its options (`--transactions`, `--preload N`).
fn spawn_writer(
    uri: &str,
    load: &LoadArgs,
    log: &Path,
    stop_file: &Path,
    extra: &[&str],
) -> Result<Child, BoxError> {
    let mut args = vec![
        "writer",
        "--uri",
        uri,
        "--log",
        log.to_str().ok_or("path")?,
        "--stop-file",
        stop_file.to_str().ok_or("path")?,
    ];
    args.extend(load.args.iter().map(String::as_str));
    args.extend_from_slice(extra);
    spawn_self(&args)
}

/// `soak at load: <r> writes/s | lost <n> | <rest>`: each soak's summary's first line.
fn print_load_line(written: &Path, lost: usize, rest: &str) -> Result<(), BoxError> {
    println!(
        "soak at load: {} writes/s | lost {lost} | {rest}",
        cdc_tests::load::reached_rate(written)?
    );
    Ok(())
}

/// The wait before the next kill: with `--seconds S`, the kills spread over S seconds
/// (each wait between half and one and a half times S / kills); otherwise `otherwise_ms`.
fn kill_pause(
    args: &[String],
    kills: usize,
    rng: u64,
    otherwise_ms: u64,
) -> Result<Duration, BoxError> {
    Ok(match value(args, "--seconds") {
        Some(s) => {
            let mean = s.parse::<f64>()? * 1000.0 / kills.max(1) as f64;
            Duration::from_millis((mean * (0.5 + (rng % 1000) as f64 / 1000.0)) as u64)
        }
        None => Duration::from_millis(otherwise_ms),
    })
}

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

async fn run(args: &[String]) -> Result<bool, BoxError> {
    if let Some(n) = value(args, "--standby") {
        return run_standby(args, n.parse()?).await;
    }
    if let Some(kind) = value(args, "--sink") {
        return sink::run(args, &kind).await;
    }
    let snapshot = args.iter().any(|a| a == "--snapshot");
    // The full run: 100 kills, or 20 across a snapshot and the stream after it.
    let kills: usize =
        value(args, "--kills").map_or(Ok(if snapshot { 20 } else { 100 }), |v| v.parse())?;
    let load = LoadArgs::from(args)?;
    let concurrency: usize = value(args, "--concurrency").map_or(Ok(1), |v| v.parse())?;
    let poison = value(args, "--poison").unwrap_or_else(|| "0".to_owned());
    let dead_lettering = poison.parse::<u64>()? > 0;
    let preload = if snapshot {
        value(args, "--preload").unwrap_or_else(|| "1000000".to_owned())
    } else {
        "0".to_owned()
    };
    // Lanes are checked against a workload with multi-document transactions (not with
    // poison: a transaction with a dead-lettered change is not delivered whole).
    let transactions = (concurrency > 1 && !dead_lettering && !snapshot)
        || args.iter().any(|a| a == "--transactions");
    let sim = match value(args, "--uri") {
        Some(_) => None,
        None => Some(mongo_sim::MongoSim::start().await?),
    };
    let uri = value(args, "--uri").unwrap_or_else(|| {
        sim.as_ref()
            .map(mongo_sim::MongoSim::uri)
            .unwrap_or_default()
    });
    let work = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/soak");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let written = work.join("written.log");
    let delivered = work.join("delivered.log");
    let store = work.join("store");
    let stop_file = work.join("stop-writer");
    {
        let client = mongodb::Client::with_uri_str(&uri).await?;
        collection(&client).drop().await?;
    }
    let started = Instant::now();
    println!(
        "soak: {kills} SIGKILLs of the consumer ({concurrency} lane{}), writer {}{}{}, logs in {}",
        if concurrency == 1 { "" } else { "s" },
        load.describe(),
        if transactions {
            " with transactions"
        } else {
            ""
        },
        if dead_lettering {
            format!(", {poison}% of changes refused into the dead letters")
        } else {
            String::new()
        },
        work.display()
    );
    let lanes = concurrency.to_string();
    let mut consumer_args = vec![
        "consumer",
        "--uri",
        &uri,
        "--store",
        store.to_str().ok_or("path")?,
        "--log",
        delivered.to_str().ok_or("path")?,
        "--concurrency",
        &lanes,
        "--poison",
        &poison,
    ];
    if snapshot {
        consumer_args.push("--snapshot");
    }
    if transactions {
        consumer_args.push("--transactions");
    }
    let preloaded = PathBuf::from(format!("{}.preloaded", written.display()));
    let mut consumer = if snapshot {
        None
    } else {
        let c = spawn_self(&consumer_args)?;
        tokio::time::sleep(Duration::from_millis(800)).await;
        Some(c)
    };
    let mut writer_extra = Vec::new();
    if transactions {
        writer_extra.push("--transactions");
    }
    if snapshot {
        writer_extra.push("--preload");
        writer_extra.push(&preload);
    }
    let mut writer = spawn_writer(&uri, &load, &written, &stop_file, &writer_extra)?;
    let mut consumer = match consumer.take() {
        Some(c) => c,
        None => {
            // The documents exist before the consumer starts; it snapshots them while the
            // writer goes on.
            let deadline = Instant::now() + Duration::from_secs(300);
            while !preloaded.exists() {
                if Instant::now() > deadline {
                    return Err("the writer never finished preloading".into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            spawn_self(&consumer_args)?
        }
    };
    let mut rng = started.elapsed().as_nanos() as u64 | 1;
    for k in 0..kills {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // With a snapshot, kills are spread over the snapshot and the stream after it.
        let pause = if snapshot {
            200 + rng % 2000
        } else {
            150 + rng % 600
        };
        tokio::time::sleep(kill_pause(args, kills, rng, pause)?).await;
        consumer.kill()?; // SIGKILL
        consumer.wait()?;
        consumer = spawn_self(&consumer_args)?;
        if (k + 1) % 10 == 0 {
            println!(
                "  {} kills, {} written, {} delivered",
                k + 1,
                count_lines(&written),
                count_lines(&delivered)
            );
        }
        if let Some(status) = writer.try_wait()? {
            return Err(format!("the writer exited early: {status}").into());
        }
    }
    std::fs::write(&stop_file, b"stop")?;
    let status = writer.wait()?;
    if !status.success() {
        return Err(format!("the writer failed: {status}").into());
    }
    if snapshot {
        let ok = verify_snapshot(&uri, &written, &delivered, &mut consumer, kills, started).await?;
        if let Some(sim) = sim {
            sim.shutdown().await;
        }
        return Ok(ok);
    }
    // Let the last consumer catch up with everything written.
    let written_log = parse(&std::fs::read_to_string(&written)?)?;
    let letters_store = FileStore::new(&store)?;
    let mut catch_up = cdc_tests::load::CatchUp::new();
    loop {
        let mut delivered_log = parse(&std::fs::read_to_string(&delivered).unwrap_or_default())?;
        delivered_log.extend(dead_letters(&letters_store).await?);
        if catch_up.done(verify(&written_log, &delivered_log, usize::MAX).lost) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    consumer.kill()?;
    consumer.wait()?;
    let delivered_text = std::fs::read_to_string(&delivered)?;
    let mut delivered_log = parse(&delivered_text)?;
    let mut letters_ok = true;
    if dead_lettering {
        let letters = dead_letters(&letters_store).await?;
        let handled: std::collections::HashSet<&(String, String)> = delivered_log.iter().collect();
        let both = letters.iter().filter(|c| handled.contains(c)).count();
        println!(
            "\ndead letters: {} (handled as well: {both})",
            letters.len()
        );
        letters_ok = both == 0 && !letters.is_empty();
        // Each key's dead letters follow its handled changes (its key is parked).
        delivered_log.extend(letters);
    }
    // Repeats per kill: a checkpoint batch (at least one event per lane), plus, with
    // transactions, one transaction (at most 4 changes) that may exceed it.
    let per_kill = (BATCH as usize).max(concurrency) + if transactions { 4 } else { 0 };
    let verdict = verify(&written_log, &delivered_log, kills * per_kill);
    let txns = verify_transactions(&std::fs::read_to_string(&written)?, &delivered_text)?;
    println!();
    print_load_line(
        &written,
        verdict.lost,
        &format!(
            "out of order {} | duplicates {} (bound {}) | transactions not whole {} | {kills} kills",
            verdict.out_of_order, verdict.duplicates, verdict.duplicate_bound, txns.not_whole
        ),
    )?;
    println!("verifier: {verdict}");
    let mut whole = true;
    if transactions {
        println!("verifier: {txns}");
        whole = txns.not_whole == 0 && txns.transactions > 0;
    }
    println!(
        "soak: {} kills in {:.0} s",
        kills,
        started.elapsed().as_secs_f64()
    );
    let ok = verdict.holds() && whole && letters_ok;
    println!(
        "soak: {}",
        if ok {
            "every promise held"
        } else {
            "A PROMISE WAS BROKEN"
        }
    );
    if let Some(sim) = sim {
        sim.shutdown().await;
    }
    Ok(ok)
}

/// The consumers of a standby run: one process per slot, its owner id naming the slot and
/// the incarnation.
struct Slots {
    work: PathBuf,
    args: Vec<String>,
    ttl_ms: u64,
    procs: Vec<(String, Child)>,
    incarnations: usize,
}

/// A run that ends early (an error) leaves no consumer behind.
impl Drop for Slots {
    fn drop(&mut self) {
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A child process killed when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Slots {
    fn spawn(&mut self, slot: usize) -> Result<(String, Child), BoxError> {
        self.incarnations += 1;
        let owner = format!("slot{slot}-{}", self.incarnations);
        let times = self.work.join(format!("times-{owner}.log"));
        let ttl = self.ttl_ms.to_string();
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend([
            "--lease",
            &ttl,
            "--owner",
            &owner,
            "--times",
            times.to_str().ok_or("path")?,
        ]);
        Ok((owner.clone(), spawn_self(&args)?))
    }

    /// Times (ms) at which each incarnation handled events, by owner.
    fn times(&self) -> Result<Vec<(String, Vec<i64>)>, BoxError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.work)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if let Some(owner) = name
                .strip_prefix("times-")
                .and_then(|n| n.strip_suffix(".log"))
            {
                let times = std::fs::read_to_string(&path)?
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect();
                out.push((owner.to_owned(), times));
            }
        }
        Ok(out)
    }

    /// The first time an owner other than `but` handled an event after `after` (ms).
    fn first_after(&self, after: i64, but: &str) -> Result<Option<i64>, BoxError> {
        Ok(self
            .times()?
            .into_iter()
            .filter(|(o, _)| o != but)
            .filter_map(|(_, t)| t.into_iter().find(|&t| t > after))
            .min())
    }
}

fn now_ms() -> i64 {
    bson::DateTime::now().timestamp_millis()
}

fn signal(child: &Child, sig: &str) -> Result<(), BoxError> {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()?;
    if !status.success() {
        return Err(format!("kill {sig} failed").into());
    }
    Ok(())
}

/// `--standby N`: N + 1 consumers on one stream with a leased file store; the active one is
/// SIGKILLed `kills` times (and started again as a standby), then paused (SIGSTOP) past
/// its TTL and resumed. Prints the verifier's line, `overlapping holders: n` (pairs of
/// incarnations that handled events at overlapping times for longer than the TTL),
/// `failover p50 … ms, max … ms (ttl … ms)` and what the paused holder did once resumed.
async fn run_standby(args: &[String], standbys: usize) -> Result<bool, BoxError> {
    let kills: usize = value(args, "--kills").map_or(Ok(20), |v| v.parse())?;
    let ttl_ms: u64 = value(args, "--ttl").map_or(Ok(1000), |v| v.parse())?;
    let load = LoadArgs::from(args)?;
    let sim = mongo_sim::MongoSim::start().await?;
    let uri = sim.uri();
    let work = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/soak-standby");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let (written, delivered, store_dir, stop_file) = (
        work.join("written.log"),
        work.join("delivered.log"),
        work.join("store"),
        work.join("stop-writer"),
    );
    {
        let client = mongodb::Client::with_uri_str(&uri).await?;
        collection(&client).drop().await?;
    }
    let started = Instant::now();
    println!(
        "soak: {} consumers on one stream ({standbys} standing by), lease TTL {ttl_ms} ms, {kills} SIGKILLs of the holder then one SIGSTOP past the TTL, writer {}, logs in {}",
        standbys + 1,
        load.describe(),
        work.display()
    );
    let path = |p: &Path| p.to_str().map(str::to_owned).ok_or("path");
    let mut slots = Slots {
        work: work.clone(),
        args: vec![
            "consumer".into(),
            "--uri".into(),
            uri.clone(),
            "--store".into(),
            path(&store_dir)?,
            "--log".into(),
            path(&delivered)?,
        ],
        ttl_ms,
        procs: Vec::new(),
        incarnations: 0,
    };
    for slot in 0..=standbys {
        let p = slots.spawn(slot)?;
        slots.procs.push(p);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut writer = KillOnDrop(spawn_writer(&uri, &load, &written, &stop_file, &[])?);
    let store = FileStore::new(&store_dir)?;
    let holder = || async {
        let stream = store.list_streams().await?.into_iter().next();
        Ok::<_, BoxError>(match stream {
            Some(s) => cdc_core::LeaseStore::holder(&store, &s).await?,
            None => None,
        })
    };
    // The stored point, sampled all along: it must never move backwards.
    let backwards = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = {
        let (store_dir, backwards) = (store_dir.clone(), Arc::clone(&backwards));
        tokio::spawn(async move {
            let Ok(store) = FileStore::new(&store_dir) else {
                return;
            };
            let mut last = None;
            loop {
                if let Ok(Some(stream)) = store.list_streams().await.map(|s| s.into_iter().next())
                    && let Ok(Some(point)) = store.load(&stream).await
                {
                    if last.is_some_and(|l| point.cluster_time < l) {
                        backwards.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    last = Some(point.cluster_time);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut rng = started.elapsed().as_nanos() as u64 | 1;
    let mut failovers: Vec<i64> = Vec::new();
    let active = |slots: &Slots, owner: &str| slots.procs.iter().position(|(o, _)| o == owner);
    for k in 0..kills {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(kill_pause(args, kills, rng, 300 + rng % 1200)?).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let slot = loop {
            if let Some(h) = holder().await?
                && let Some(slot) = active(&slots, &h.owner)
            {
                break slot;
            }
            if Instant::now() > deadline {
                return Err("no consumer took the lease within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (owner, mut child) = slots.procs.swap_remove(slot);
        child.kill()?; // SIGKILL
        child.wait()?;
        let killed = now_ms();
        let p = slots.spawn(slot)?;
        slots.procs.push(p);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(first) = slots.first_after(killed, &owner)? {
                failovers.push(first - killed);
                break;
            }
            if Instant::now() > deadline {
                return Err("nobody handled an event within 30 s of a kill".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if (k + 1) % 10 == 0 {
            println!(
                "  {} kills, {} written, {} delivered",
                k + 1,
                count_lines(&written),
                count_lines(&delivered)
            );
        }
        if let Some(status) = writer.0.try_wait()? {
            return Err(format!("the writer exited early: {status}").into());
        }
    }
    // A zombie: the holder is paused past its TTL, a standby takes over, the paused one
    // resumes.
    // The file store's leases are changed under the host's OS file lock: a holder paused
    // inside that short section (a renewal or a fenced save) holds it, and the others
    // wait until it resumes (SEMANTICS 17, limits). When nobody takes over and the lock is
    // held, the pause landed there: it is resumed and paused again, said in the output.
    let lock_file = std::fs::read_dir(&store_dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".lease.lock"))
        .ok_or("no lease lock file in the store")?;
    let mut tries = 0;
    let (zombie, zombie_owner) = loop {
        let zombie = loop {
            if let Some(h) = holder().await?
                && let Some(slot) = active(&slots, &h.owner)
            {
                break slot;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let zombie_owner = slots.procs[zombie].0.clone();
        signal(&slots.procs[zombie].1, "-STOP")?;
        let paused = now_ms();
        let deadline = Instant::now() + Duration::from_millis(3 * ttl_ms + 5_000);
        let mut taken = false;
        while Instant::now() < deadline {
            if slots.first_after(paused, &zombie_owner)?.is_some() {
                taken = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if taken {
            break (zombie, zombie_owner);
        }
        let probe = std::fs::OpenOptions::new().write(true).open(&lock_file)?;
        let in_lock = matches!(probe.try_lock(), Err(std::fs::TryLockError::WouldBlock));
        drop(probe);
        tries += 1;
        if !in_lock || tries >= 5 {
            return Err(format!(
                "nobody took over from the paused holder within {} ms (host lease lock held by it: {in_lock})",
                3 * ttl_ms + 5_000
            )
            .into());
        }
        println!(
            "  the paused holder was inside the host's lease lock (file store): resumed, pausing it again"
        );
        signal(&slots.procs[zombie].1, "-CONT")?;
        tokio::time::sleep(Duration::from_millis(2 * ttl_ms)).await;
    };
    tokio::time::sleep(Duration::from_millis(ttl_ms)).await;
    let resumed = now_ms();
    signal(&slots.procs[zombie].1, "-CONT")?;
    tokio::time::sleep(Duration::from_millis(3 * ttl_ms)).await;
    let zombie_times: Vec<i64> = slots
        .times()?
        .into_iter()
        .filter(|(o, _)| *o == zombie_owner)
        .flat_map(|(_, t)| t)
        .filter(|&t| t >= resumed)
        .collect();
    let zombie_span = zombie_times.last().map_or(0, |&t| t - resumed);

    std::fs::write(&stop_file, b"stop")?;
    let status = writer.0.wait()?;
    if !status.success() {
        return Err(format!("the writer failed: {status}").into());
    }
    let written_log = parse(&std::fs::read_to_string(&written)?)?;
    let mut catch_up = cdc_tests::load::CatchUp::new();
    loop {
        let delivered_log = parse(&std::fs::read_to_string(&delivered).unwrap_or_default())?;
        if catch_up.done(verify(&written_log, &delivered_log, usize::MAX).lost) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for (_, mut child) in slots.procs.drain(..) {
        let _ = child.kill();
        let _ = child.wait();
    }
    sampler.abort();
    let delivered_log = parse(&std::fs::read_to_string(&delivered)?)?;
    // Repeats: a checkpoint batch per kill, and the zombie's (each pause a hand-over).
    let verdict = verify(
        &written_log,
        &delivered_log,
        (kills + 1 + tries) * BATCH as usize,
    );
    // Overlaps: pairs of handling sessions of different incarnations (an incarnation's
    // events split where it handled nothing for longer than the TTL: it stood by, or was
    // paused) that intersect for longer than the TTL.
    let ttl = i64::try_from(ttl_ms).unwrap_or(i64::MAX);
    let handled = sessions(slots.times()?, ttl);
    let mut overlapping = 0;
    for (a, b, overlap) in session_overlaps(&handled) {
        if overlap > ttl {
            println!(
                "overlap: {} and {} handled at the same time for {overlap} ms",
                a.0, b.0
            );
            overlapping += 1;
        }
    }
    failovers.sort_unstable();
    let p50 = failovers.get(failovers.len() / 2).copied().unwrap_or(0);
    let max = failovers.last().copied().unwrap_or(0);
    let backwards = backwards.load(std::sync::atomic::Ordering::Relaxed);
    println!();
    print_load_line(
        &written,
        verdict.lost,
        &format!(
            "out of order {} | duplicates {} (bound {}) | overlapping holders {overlapping} | failover max {max} ms | {kills} kills",
            verdict.out_of_order, verdict.duplicates, verdict.duplicate_bound
        ),
    )?;
    println!("verifier: {verdict}");
    println!("overlapping holders: {overlapping}");
    println!("failover p50 {p50} ms, max {max} ms (ttl {ttl_ms} ms)");
    println!(
        "paused holder: handled {} events in the {zombie_span} ms after it resumed (renewal interval {} ms); the stored point moved backwards {backwards} times",
        zombie_times.len(),
        ttl_ms / 3
    );
    println!(
        "soak: {kills} kills in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let ok = verdict.holds()
        && overlapping == 0
        && backwards == 0
        && zombie_span <= i64::try_from(ttl_ms).unwrap_or(i64::MAX)
        && p50 <= i64::try_from(ttl_ms + 1000).unwrap_or(i64::MAX);
    println!(
        "soak: {}",
        if ok {
            "every promise held"
        } else {
            "A PROMISE WAS BROKEN"
        }
    );
    sim.shutdown().await;
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_options_are_passed_on_with_the_default_rate() {
        let args: Vec<String> = ["--kills", "5", "--connections", "4", "--burst-x", "3"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let load = LoadArgs::from(&args).unwrap();
        assert_eq!(load.rate, DEFAULT_RATE);
        assert_eq!(
            load.args,
            ["--rate", "5000", "--connections", "4", "--burst-x", "3"]
        );
        assert_eq!(load.describe(), "at 5000 writes/s (4 connections)");
    }
}
