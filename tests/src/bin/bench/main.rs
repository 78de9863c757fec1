//! `cdc-bench`: the benchmark program that `cargo xtask bench` runs in release mode.
//!
//! - `cdc-bench sim [--events N] [--rounds R] [--scan-docs N] [--write-ops N]`: how many
//!   change events per second one stream delivers from mongo-sim to the official driver
//!   over loopback (catch-up: the oplog is pre-loaded, then drained); then the simulator
//!   under concurrency: writes from 1 and 8 connections, writes while a 1,000,000-document
//!   scan reads, transactions on distinct documents.
//! - `cdc-bench stores [--ops N]`: save and load latency (median, p99) of every resume
//!   store backend.
//! - `cdc-bench lag [--sink nats|postgres|both] [--rate R] [--seconds S]`: lag under load
//!   through `cdc run` (see `lag.rs`); row 15 of `all`.
//! - `cdc-bench instructions [--events N]`: instructions per event of the processor and of
//!   the raw driver under callgrind (see `instructions.rs`).
//! - `cdc-bench all`: the ten library scenarios side by side (see `scenarios.rs`), written
//!   to `target/bench/report.md` and `report.json`.

// A benchmark program: printing its figures is its job.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use bson::{Document, doc};
use futures_util::TryStreamExt;
use mongo_sim::{MongoSim, SimOptions};
use mongodb::{Client, Collection};

mod instructions;
mod lag;
mod scenarios;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("sim") => sim(&args[1..]).await,
        Some("stores") => stores(&args[1..]).await,
        Some("all") => scenarios::all(&args[1..]).await,
        Some("lag") => lag::run(&args[1..]).await,
        Some("instructions") => instructions::run(&args[1..]).await,
        Some("count-child") => instructions::count_child(&args[1..]).await,
        Some("consume") => scenarios::consume_child(&args[1..]).await,
        Some("serve-sim") => scenarios::serve_sim(&args[1..]).await,
        _ => Err("usage: cdc-bench sim [--events N] [--rounds R] | stores [--ops N] | lag [--sink nats|postgres|both] [--rate R] [--seconds S] | instructions [--events N] | all [--events N] [--rounds R] [--burst N] [--filtered N] [--idle-seconds S]".into()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cdc-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Starts `serve-sim --capacity <capacity>` (a simulator in a process of its own, so its
/// heap neither shows in nor slows what is measured): the process and the URI it printed.
async fn spawn_sim(capacity: usize) -> Result<(tokio::process::Child, String), BoxError> {
    use tokio::io::AsyncBufReadExt;
    let mut server = tokio::process::Command::new(std::env::current_exe()?)
        .args(["serve-sim", "--capacity", &capacity.to_string()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = server.stdout.take().ok_or("no simulator output")?;
    let uri = tokio::io::BufReader::new(out)
        .lines()
        .next_line()
        .await?
        .ok_or("the simulator printed no URI")?;
    Ok((server, uri))
}

/// A program built beside this one (`cargo xtask bench` builds `cdc` and `cdc-soak`).
fn sibling(name: &str) -> Result<std::path::PathBuf, BoxError> {
    Ok(cdc_tests::program_beside(name, "`cargo xtask bench` does")?)
}

/// The value after `name` in `args`, if given.
fn value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// The value after `name`, which must be given.
fn need<'a>(args: &'a [String], name: &str) -> Result<&'a str, BoxError> {
    value(args, name).ok_or_else(|| format!("{name} is required").into())
}

fn flag(args: &[String], name: &str, default: usize) -> Result<usize, BoxError> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => Ok(args
            .get(i + 1)
            .ok_or_else(|| format!("{name} needs a value"))?
            .parse()
            .map_err(|e| format!("{name}: {e}"))?),
    }
}

/// A document of about 400 bytes.
fn payload(i: usize) -> Document {
    doc! {
        "_id": i as i64,
        "customer": format!("customer-{:06}", i % 100_000),
        "status": "pending",
        "total": (i % 1000) as f64 * 1.25,
        "note": "x".repeat(300),
    }
}

async fn preload(coll: &Collection<Document>, n: usize, offset: usize) -> Result<(), BoxError> {
    let mut i = 0;
    while i < n {
        let batch: Vec<Document> = (i..(i + 1000).min(n))
            .map(|k| payload(offset + k))
            .collect();
        i += batch.len();
        coll.insert_many(batch).await?;
    }
    Ok(())
}

fn median_and_spread(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    let median = xs[xs.len() / 2];
    (median, xs[0], xs[xs.len() - 1])
}

async fn sim(args: &[String]) -> Result<(), BoxError> {
    let events = flag(args, "--events", 200_000)?;
    let rounds = flag(args, "--rounds", 5)?;
    // The simulator under concurrency first, in a fresh process heap.
    let scan_docs = flag(args, "--scan-docs", 1_000_000)?;
    let write_ops = flag(args, "--write-ops", 20_000)?;
    sim_writes(scan_docs, write_ops).await?;
    let sim = MongoSim::start_with(SimOptions {
        oplog_capacity: events * 2 + 10,
        ..SimOptions::default()
    })
    .await?;
    let client = Client::with_uri_str(sim.uri()).await?;
    let mut rates = Vec::new();
    for round in 0..=rounds {
        // A fresh collection per round; the previous one is dropped first so the oplog
        // holds only this round's events after `start_at`.
        let db = client.database("bench");
        db.collection::<Document>(&format!("sim{}", round.saturating_sub(1)))
            .drop()
            .await?;
        let coll: Collection<Document> = db.collection(&format!("sim{round}"));
        let start_at = client
            .database("admin")
            .run_command(doc! { "ping": 1 })
            .await?;
        let start_at = start_at.get_timestamp("operationTime")?;
        preload(&coll, events, 0).await?;
        // The driver hands over each event's raw BSON: this measures the server and the
        // wire, not the decoding into a typed event (which the library does itself).
        let mut stream = coll
            .watch()
            .start_at_operation_time(start_at)
            .await?
            .with_type::<bson::RawDocumentBuf>();
        let t0 = Instant::now();
        let mut seen = 0;
        while seen < events {
            let e = tokio::time::timeout(Duration::from_secs(60), stream.try_next())
                .await
                .map_err(|_| "stream stalled")??
                .ok_or("stream ended")?;
            if e.get_str("operationType")? == "insert" {
                seen += 1;
            }
        }
        let rate = events as f64 / t0.elapsed().as_secs_f64();
        if round == 0 {
            println!("warm-up: {rate:.0} events/s");
        } else {
            println!("round {round}: {rate:.0} events/s");
            rates.push(rate);
        }
    }
    let (median, min, max) = median_and_spread(rates);
    println!(
        "\nmongo-sim → driver, one stream, {events} events of ~400 B, {rounds} rounds:\n  median {median:.0} events/s (min {min:.0}, max {max:.0})"
    );
    sim.shutdown().await;
    Ok(())
}

/// Single-document writes (an insert, then an update of it), acknowledged, from `conns`
/// connections at once, `ops` in all; writes per second.
async fn write_rate(
    client: &Client,
    coll: &str,
    conns: usize,
    ops: usize,
) -> Result<f64, BoxError> {
    let coll: Collection<Document> = client.database("bench").collection(coll);
    let run = std::sync::Arc::new(bson::oid::ObjectId::new().to_hex());
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..conns {
        let coll = coll.clone();
        let run = std::sync::Arc::clone(&run);
        let share = ops / conns;
        tasks.spawn(async move {
            for i in 0..share / 2 {
                let id = format!("{run}-{task}-{i}");
                coll.insert_one(doc! { "_id": &id, "n": 0, "note": "x".repeat(100) })
                    .await?;
                coll.update_one(doc! { "_id": &id }, doc! { "$inc": { "n": 1 } })
                    .await?;
            }
            Ok::<_, mongodb::error::Error>(share / 2 * 2)
        });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        done += r??;
    }
    Ok(done as f64 / t0.elapsed().as_secs_f64())
}

/// The simulator under concurrency: writes from 1 and 8 connections, writes while a
/// 1,000,000-document scan reads, and transactions on distinct documents.
async fn sim_writes(scan_docs: usize, write_ops: usize) -> Result<(), BoxError> {
    let sim = MongoSim::start_with(SimOptions::default()).await?;
    // Up to 9 connections at once: the default pool allows 10.
    let client = Client::with_uri_str(sim.uri()).await?;
    // Warm-up: connections opened, code paths paged in.
    write_rate(&client, "warm", 8, 2_000).await?;
    let one = write_rate(&client, "w1", 1, write_ops).await?;
    let (held, committing, t0) = (sim.lock_held(), sim.commit_lock_held(), Instant::now());
    let eight = write_rate(&client, "w8", 8, write_ops).await?;
    let wall = t0.elapsed().as_secs_f64();
    let serialized = (sim.lock_held() - held).as_secs_f64() / wall;
    let commits = (sim.commit_lock_held() - committing).as_secs_f64() / wall;
    println!("\nsim writes, 1 connection: {one:.0}/s");
    println!("sim writes, 8 connections: {eight:.0}/s");
    println!("sim writes 8 ÷ 1 connections: {:.2}x", eight / one);
    println!(
        "server lock held during the 8-connection writes: {:.0}% of the time",
        serialized * 100.0
    );
    println!(
        "commit lock held during the 8-connection writes: {:.0}% of the time",
        commits * 100.0
    );

    // A large collection, read whole by one cursor while one connection writes into it.
    let big: Collection<Document> = client.database("bench").collection("scan");
    preload(&big, scan_docs, 0).await?;
    let expected = big.count_documents(doc! {}).await?;
    let (opened, is_open) = tokio::sync::oneshot::channel();
    let reader = {
        let big = big.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut cursor = big
                .clone_with_type::<bson::RawDocumentBuf>()
                .find(doc! {})
                .batch_size(1000)
                .await?;
            // The cursor's view is taken: what is written from now on is not in it.
            let _ = opened.send(());
            let mut n = 0_u64;
            while cursor.try_next().await?.is_some() {
                n += 1;
            }
            Ok::<_, mongodb::error::Error>((n, t0.elapsed()))
        })
    };
    // Write until the scan is over, in rounds of 1,000 writes.
    is_open.await?;
    let t0 = Instant::now();
    let mut written = 0;
    while !reader.is_finished() {
        write_rate(&client, "scan", 1, 1_000).await?;
        written += 1_000;
    }
    let during_time = t0.elapsed();
    let during = written as f64 / during_time.as_secs_f64();
    let (seen, scan_time) = reader.await??;
    // The same writes, in the same rounds, for as long, with no scan.
    let t0 = Instant::now();
    let mut alone = 0;
    while t0.elapsed() < during_time {
        write_rate(&client, "scan", 1, 1_000).await?;
        alone += 1_000;
    }
    let without = f64::from(alone) / t0.elapsed().as_secs_f64();
    if seen != expected {
        return Err(format!("the scan saw {seen} documents, not its snapshot's {expected}").into());
    }
    println!(
        "scan of {seen} documents: {:.1} s, {written} writes meanwhile ({during:.0}/s; {without:.0}/s without)",
        scan_time.as_secs_f64()
    );
    println!(
        "sim writes during a {} scan ÷ without: {:.2}x",
        thousands(scan_docs as u64, "-document"),
        during / without
    );

    // Transactions of two updates each, 8 sessions at once, no two on the same document.
    let txn: Collection<Document> = client.database("bench").collection("txn");
    let sessions = 8;
    let per_session = 50;
    txn.insert_many((0..sessions * 2).map(|i| doc! { "_id": i as i64, "n": 0 }))
        .await?;
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..sessions {
        let client = client.clone();
        let txn = txn.clone();
        tasks.spawn(async move {
            let mut committed = 0;
            let mut session = client.start_session().await?;
            for _ in 0..per_session {
                session.start_transaction().await?;
                let result: Result<(), mongodb::error::Error> = async {
                    for id in [s * 2, s * 2 + 1] {
                        txn.update_one(doc! { "_id": id as i64 }, doc! { "$inc": { "n": 1 } })
                            .session(&mut session)
                            .await?;
                    }
                    session.commit_transaction().await
                }
                .await;
                match result {
                    Ok(()) => committed += 1,
                    Err(_) => {
                        let _ = session.abort_transaction().await;
                    }
                }
            }
            Ok::<_, mongodb::error::Error>(committed)
        });
    }
    let mut committed = 0;
    while let Some(r) = tasks.join_next().await {
        committed += r??;
    }
    println!(
        "transactions on distinct documents committed: {committed} of {}",
        sessions * per_session
    );
    sim.shutdown().await;
    Ok(())
}

/// `1,000,000-document` from `(1000000, "-document")`.
fn thousands(n: u64, suffix: &str) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out + suffix
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

async fn measure_store(
    name: &str,
    store: &dyn cdc_core::ResumeStore,
    ops: usize,
) -> Result<String, BoxError> {
    use cdc_core::{ClusterTime, OperationType, ResumePoint, ResumeToken};
    let stream = format!("bench-{}", std::process::id());
    let _ = store.delete(&stream).await;
    let mut saves = Vec::with_capacity(ops);
    let mut loads = Vec::with_capacity(ops);
    for i in 0..ops {
        let t = 1_000_000 + i as u32;
        let token = ResumeToken::from_document(
            &doc! { "_data": format!("82{t:08X}00000001{}", "2B".repeat(30)) },
        )?;
        let point = ResumePoint::for_event(
            token,
            ClusterTime::new(t, 1),
            OperationType::Insert,
            bson::DateTime::now(),
        );
        let t0 = Instant::now();
        store.save(&stream, &point).await?;
        saves.push(t0.elapsed());
        let t0 = Instant::now();
        store.load(&stream).await?.ok_or("saved point missing")?;
        loads.push(t0.elapsed());
    }
    store.delete(&stream).await?;
    saves.sort();
    loads.sort();
    Ok(format!(
        "| {name} | {} | {} | {} | {} |",
        micros(percentile(&saves, 0.5)),
        micros(percentile(&saves, 0.99)),
        micros(percentile(&loads, 0.5)),
        micros(percentile(&loads, 0.99))
    ))
}

async fn stores(args: &[String]) -> Result<(), BoxError> {
    let ops = flag(args, "--ops", 2000)?;
    let mut rows = Vec::new();
    rows.push(measure_store("memory", &cdc_resume::MemoryStore::new(), ops).await?);
    let dir = std::env::temp_dir().join(format!("cdc-bench-file-{}", std::process::id()));
    rows.push(measure_store("file (fsync)", &cdc_resume::FileStore::new(&dir)?, ops).await?);
    let _ = std::fs::remove_dir_all(&dir);
    let sim = MongoSim::start().await?;
    let client = Client::with_uri_str(sim.uri()).await?;
    rows.push(
        measure_store(
            "mongodb (mongo-sim)",
            &cdc_resume::MongoStore::new(&client, "bench", "points"),
            ops,
        )
        .await?,
    );
    sim.shutdown().await;
    let redis_url =
        std::env::var("CDC_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    match cdc_resume::RedisStore::new(&redis_url, "cdc-bench:") {
        Ok(store) => match measure_store("redis", &store, ops).await {
            Ok(row) => rows.push(row),
            Err(e) => rows.push(format!("| redis | not measured: {e} | | | |")),
        },
        Err(e) => rows.push(format!("| redis | not measured: {e} | | | |")),
    }
    let pg_url = std::env::var("CDC_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    match cdc_resume::PostgresStore::connect(&pg_url, "cdc_bench_points").await {
        Ok(store) => rows.push(measure_store("postgres", &store, ops).await?),
        Err(e) => rows.push(format!("| postgres | not measured: {e} | | | |")),
    }
    println!("resume stores, {ops} saves and {ops} loads each, one stream, sequential:\n");
    println!(
        "| backend | save p50 | save p99 | load p50 | load p99 |\n| --- | --- | --- | --- | --- |"
    );
    for row in rows {
        println!("{row}");
    }
    Ok(())
}
