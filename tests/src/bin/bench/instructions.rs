//! `cdc-bench instructions [--events N]`: the CPU cost of the processor's hot path in
//! instructions, which callgrind counts the same run after run (time on two shared cores
//! does not).
//!
//! The simulator runs in its own process (not counted) with `3N` identical inserts after
//! a recorded position: the same events for every run. A child process under callgrind
//! reads them from that position, either through the driver's raw stream (what scenario
//! 1 measures) or through the processor with batched checkpoints and a memory store
//! (scenario 2), once for `N` events and once for `2N`: the difference over `N` is the
//! cost per event without start-up. Prints `processor instructions per event ÷ raw driver:
//! <r>x` for the median of `--runs` (3) measurements.

use std::{path::Path, sync::atomic::Ordering, time::Duration};

use cdc_core::{ResumeToken, StartPosition};
use cdc_mongo::{MongoSource, Scope};
use cdc_processor::DocumentProcessor;
use futures_util::TryStreamExt;
use mongodb::Client;

use super::BoxError;

/// Total instructions (`Ir`) of a callgrind output file.
fn total_instructions(path: &Path) -> Result<u64, BoxError> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{}: no instruction total", path.display()).into())
}

/// Instructions of the child reading `events` events in `mode`.
async fn counted(
    mode: &str,
    uri: &str,
    coll: &str,
    token: &str,
    events: usize,
    out: &Path,
) -> Result<u64, BoxError> {
    let status = tokio::process::Command::new("valgrind")
        .args(["--tool=callgrind", "--quiet"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(std::env::current_exe()?)
        .args(["count-child", "--mode", mode, "--uri", uri, "--coll", coll])
        .args(["--token", token, "--events", &events.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .map_err(|e| format!("valgrind (is it installed?): {e}"))?;
    if !status.success() {
        return Err(format!("the {mode} child under callgrind failed: {status}").into());
    }
    total_instructions(out)
}

pub(crate) async fn run(args: &[String]) -> Result<(), BoxError> {
    let events = super::flag(args, "--events", 20_000)?;
    let runs = super::flag(args, "--runs", 3)?;
    let ratios = measure_runs(events, runs).await?;
    print_runs(&ratios);
    Ok(())
}

/// `runs` measurements (each of N and 2N events, both paths): the counts move about 2%
/// from run to run (the two tasks' scheduling, the driver's batches), so the line gives
/// the median run. Each is `(raw, processor)`, sorted by their ratio.
pub(crate) async fn measure_runs(events: usize, runs: usize) -> Result<Vec<(f64, f64)>, BoxError> {
    let mut all = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        all.push(measure(events).await?);
    }
    all.sort_by(|a, b| (a.1 / a.0).total_cmp(&(b.1 / b.0)));
    Ok(all)
}

/// Prints the median run's lines, then the spread of the ratio over the runs.
pub(crate) fn print_runs(runs: &[(f64, f64)]) {
    let Some(&(raw, processor)) = runs.get(runs.len() / 2) else {
        return;
    };
    print(raw, processor);
    if let (Some(low), Some(high)) = (runs.first(), runs.last()) {
        println!(
            "  median of {} runs; ratios {:.2}x to {:.2}x",
            runs.len(),
            low.1 / low.0,
            high.1 / high.0
        );
    }
}

/// Prints the per-event counts and the ratio line.
pub(crate) fn print(raw: f64, processor: f64) {
    println!("raw driver: {raw:.0} instructions per event (callgrind)");
    println!("processor: {processor:.0} instructions per event (callgrind)");
    println!(
        "processor instructions per event ÷ raw driver: {:.2}x",
        processor / raw
    );
}

/// Instructions per event of the raw driver and of the processor, over `events` events.
pub(crate) async fn measure(events: usize) -> Result<(f64, f64), BoxError> {
    let (mut server, uri) = super::spawn_sim(events * 4 + 10_000).await?;
    let client = Client::with_uri_str(&uri).await?;
    let name = "instructions";
    let coll = client.database("bench").collection::<bson::Document>(name);
    let _ = coll.drop().await;
    let start = super::scenarios::head_point(&coll).await?;
    // 3N: the runs of N and 2N events both read ahead past their last one the same way.
    super::preload(&coll, events * 3, 0).await?;
    let token = super::hex(start.token.as_bytes());
    // `CDC_BENCH_CALLGRIND_DIR` keeps the callgrind files there, for `callgrind_annotate`.
    let kept = std::env::var_os("CDC_BENCH_CALLGRIND_DIR").map(std::path::PathBuf::from);
    let work = kept.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("cdc-bench-callgrind-{}", std::process::id()))
    });
    std::fs::create_dir_all(&work)?;
    let mut per_event = Vec::new();
    for mode in ["raw", "processor"] {
        let one = counted(
            mode,
            &uri,
            name,
            &token,
            events,
            &work.join(format!("{mode}-1")),
        )
        .await?;
        let two = counted(
            mode,
            &uri,
            name,
            &token,
            events * 2,
            &work.join(format!("{mode}-2")),
        )
        .await?;
        // Fewer instructions for 2N events than for N: start-up's variation swamped the
        // events' cost; a figure from it would be noise.
        if two <= one {
            return Err(format!(
                "{mode}: {two} instructions for {} events, not more than {one} for {events}: use more --events",
                events * 2
            )
            .into());
        }
        per_event.push((two - one) as f64 / events as f64);
    }
    if kept.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    server.kill().await?;
    Ok((per_event[0], per_event[1]))
}

/// The child: reads `--events` events after `--token` from `--uri`, `--mode raw` through
/// the driver's stream as raw BSON, `--mode processor` through the processor (scenario 2:
/// batched checkpoints, memory store, default read-ahead) into a counting handler.
pub(crate) async fn count_child(args: &[String]) -> Result<(), BoxError> {
    let need = |name| super::need(args, name);
    let uri = need("--uri")?;
    let coll = need("--coll")?.to_owned();
    let events: usize = need("--events")?.parse()?;
    let token = super::unhex(need("--token")?).ok_or("bad token hex")?;
    let token = ResumeToken::from_bytes(token)?;
    let client = Client::with_uri_str(uri).await?;
    match need("--mode")? {
        "raw" => {
            let source = MongoSource::new(
                client,
                Scope::collection("bench", coll),
                cdc_processor::SourceOptions::default(),
            );
            let drain = tokio::spawn(async move {
                let mut stream = source
                    .open_driver_stream(&StartPosition::ResumeAfter(token))
                    .await?;
                for _ in 0..events {
                    stream.try_next().await?.ok_or("stream ended")?;
                }
                Ok::<_, BoxError>(())
            });
            drain.await??;
        }
        "processor" => {
            let (store, stream_id) = super::scenarios::child_store(&coll, token).await?;
            let p = DocumentProcessor::builder()
                .source(cdc_processor::Watch::collection(client, "bench", coll))
                .stream_id(stream_id)
                .store(store)
                .checkpoint(cdc_processor::CheckpointPolicy::default())
                .prefetch(1024)
                .build()?;
            let count = super::scenarios::Count::default();
            count.target.store(events as u64, Ordering::Relaxed);
            let runner = p.clone();
            let handler = count.clone();
            let task = tokio::spawn(async move { runner.start(handler).await });
            tokio::time::timeout(Duration::from_secs(600), count.done.notified())
                .await
                .map_err(|_| "the processor stalled")?;
            p.stop();
            task.await??;
        }
        other => return Err(format!("--mode {other}: raw or processor").into()),
    }
    Ok(())
}
