//! `cdc-demo [--uri URI] [--seconds S] [--rate R]`: the main job on the embedded default.
//!
//! Starts mongo-sim in process (or uses the replica set at URI), a writer that inserts,
//! updates and deletes documents at a steady rate, and a DocumentProcessor with the file
//! store under `target/demo/`. Midway it kills the processor without a graceful stop, then
//! starts a new one on the same store. It shows live progress, then a table: written,
//! delivered, lost (by document id and version), delivered twice, catch-up time.

// A terminal program: drawing its progress and table is its job.
#![allow(clippy::print_stdout)]

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bson::{Document, doc};
use cdc_core::{BoxError, ChangeEvent, Dispatcher};
use cdc_processor::{CheckpointPolicy, DocumentProcessor, stores::FileStore};
use mongodb::Client;

type Change = (i64, String); // (document id, "v<version>" or "deleted")

#[derive(Default)]
struct Ledger {
    written: Vec<Change>,
    delivered: Vec<Change>,
}

#[derive(Clone)]
struct Deliveries(Arc<Mutex<Ledger>>);

#[async_trait]
impl Dispatcher for Deliveries {
    async fn dispatch(
        &self,
        event: &ChangeEvent,
        previous: Option<BoxError>,
    ) -> Result<(), BoxError> {
        if let Some(e) = previous {
            return Err(e);
        }
        if let Some(c) = cdc_tests::workload::change_of(event) {
            self.0
                .lock()
                .map_err(|_| "ledger poisoned")?
                .delivered
                .push(c);
        }
        Ok(())
    }
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, BoxError> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a value").into()),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("cdc-demo: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<bool, BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds: u64 = flag(&args, "--seconds", 12)?;
    let rate: u64 = flag(&args, "--rate", 300)?;
    let uri: Option<String> = args
        .iter()
        .position(|a| a == "--uri")
        .and_then(|i| args.get(i + 1).cloned());
    let sim = match &uri {
        Some(_) => None,
        None => Some(mongo_sim::MongoSim::start().await?),
    };
    let uri = uri.unwrap_or_else(|| {
        sim.as_ref()
            .map(mongo_sim::MongoSim::uri)
            .unwrap_or_default()
    });
    let client = cdc_processor::connect(&uri, Duration::from_secs(10)).await?;
    let coll = client.database("demo").collection::<Document>("orders");
    coll.drop().await?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    let store = Arc::new(FileStore::new(&dir)?);
    let ledger = Deliveries(Arc::new(Mutex::new(Ledger::default())));
    let build = |client: Client| {
        DocumentProcessor::builder()
            .source(cdc_processor::Watch::collection(client, "demo", "orders"))
            .store(store.clone())
            .checkpoint(
                CheckpointPolicy::batched(50, Duration::from_millis(500)).unwrap_or_default(),
            )
            .build()
    };
    println!(
        "mongo-cdc demo: {rate} changes/s for {seconds} s into demo.orders; file store in {}",
        dir.display()
    );
    println!(
        "the processor is killed (no graceful stop) midway, then a new one resumes from the store\n"
    );

    let first = build(client.clone())?;
    let handler = ledger.clone();
    let p1 = first.clone();
    let mut task = tokio::spawn(async move {
        p1.start_with_retry(cdc_processor::default_backoff(), handler)
            .await
    });
    // Wait for the stream to be open before writing.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let writer_ledger = ledger.clone();
    let wcoll = coll.clone();
    let writer = tokio::spawn(async move {
        let mut versions: HashMap<i64, i64> = HashMap::new();
        let mut next_id = 0i64;
        let period = Duration::from_micros(1_000_000 / rate.max(1));
        let end = Instant::now() + Duration::from_secs(seconds);
        let mut tick = tokio::time::interval(period);
        let mut i = 0u64;
        while Instant::now() < end {
            tick.tick().await;
            i += 1;
            let change = if i.is_multiple_of(10) && !versions.is_empty() {
                let id = *versions.keys().next().unwrap_or(&0);
                versions.remove(&id);
                wcoll
                    .delete_one(doc! { "_id": id })
                    .await
                    .map(|_| (id, "deleted".to_owned()))
            } else if i.is_multiple_of(3) && !versions.is_empty() {
                let id = *versions
                    .keys()
                    .nth((i as usize / 3) % versions.len())
                    .unwrap_or(&0);
                let v = versions.get(&id).copied().unwrap_or(1) + 1;
                versions.insert(id, v);
                wcoll
                    .update_one(doc! { "_id": id }, doc! { "$set": { "version": v } })
                    .await
                    .map(|_| (id, format!("v{v}")))
            } else {
                let id = next_id;
                next_id += 1;
                versions.insert(id, 1);
                wcoll
                    .insert_one(doc! { "_id": id, "version": 1_i64, "item": format!("item-{id}"), "qty": (id % 7) + 1 })
                    .await
                    .map(|_| (id, "v1".to_owned()))
            };
            match change {
                Ok(c) => {
                    if let Ok(mut l) = writer_ledger.0.lock() {
                        l.written.push(c);
                    }
                }
                Err(e) => eprintln!("write failed (not counted as written): {e}"),
            }
        }
    });

    // Drawn on a terminal only: in a log or a pipe the bar stays quiet.
    let bar = indicatif::ProgressBar::new(1).with_style(
        indicatif::ProgressStyle::with_template("  [{bar:30}] {msg}")
            .map_err(|e| format!("progress template: {e}"))?
            .progress_chars("█▓░"),
    );
    let started = Instant::now();
    let kill_at = Duration::from_secs(seconds / 2);
    let mut killed = false;
    let mut restart_at: Option<(Instant, usize)> = None;
    let mut caught_up: Option<Duration> = None;
    let mut second: Option<DocumentProcessor> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !killed && started.elapsed() >= kill_at {
            task.abort();
            let _ = (&mut task).await;
            killed = true;
            let note = "  ✖ processor killed (no stop, no final checkpoint); starting a new one on the same store";
            if bar.is_hidden() {
                println!("{note}");
            } else {
                bar.println(note);
            }
            tokio::time::sleep(Duration::from_millis(700)).await;
            let p2 = build(client.clone())?;
            let handler = ledger.clone();
            let runner = p2.clone();
            task = tokio::spawn(async move {
                runner
                    .start_with_retry(cdc_processor::default_backoff(), handler)
                    .await
            });
            let written_then = ledger.0.lock().map_err(|_| "poisoned")?.written.len();
            restart_at = Some((Instant::now(), written_then));
            second = Some(p2);
        }
        let (written, delivered, covered) = {
            let l = ledger.0.lock().map_err(|_| "poisoned")?;
            let seen: HashSet<&Change> = l.delivered.iter().collect();
            let covered = l.written.iter().filter(|c| seen.contains(c)).count();
            (l.written.len(), l.delivered.len(), covered)
        };
        if let (Some((t0, at_restart)), None) = (restart_at, caught_up) {
            let l = ledger.0.lock().map_err(|_| "poisoned")?;
            let seen: HashSet<&Change> = l.delivered.iter().collect();
            if l.written[..at_restart.min(l.written.len())]
                .iter()
                .all(|c| seen.contains(c))
            {
                caught_up = Some(t0.elapsed());
            }
        }
        let current = second.as_ref().unwrap_or(&first);
        let checkpoint = current
            .stats()
            .last_checkpoint
            .map_or_else(|| "-".to_owned(), |t| t.to_string());
        bar.set_length(written.max(1) as u64);
        bar.set_position(covered as u64);
        bar.set_message(format!(
            "written {written:>6}  delivered {delivered:>6}  checkpoint {checkpoint}"
        ));
        if writer.is_finished() && covered == written && killed {
            break;
        }
        if started.elapsed() > Duration::from_secs(seconds + 60) {
            bar.abandon_with_message("gave up waiting for the processor to catch up");
            break;
        }
    }
    bar.finish();
    if let Some(p) = &second {
        p.stop();
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    let (written, delivered, lost, twice) = {
        let l = ledger.0.lock().map_err(|_| "poisoned")?;
        let seen: HashSet<&Change> = l.delivered.iter().collect();
        let lost = l.written.iter().filter(|c| !seen.contains(c)).count();
        let mut counts: HashMap<&Change, usize> = HashMap::new();
        for c in &l.delivered {
            *counts.entry(c).or_default() += 1;
        }
        let twice = counts
            .values()
            .filter(|n| **n > 1)
            .map(|n| n - 1)
            .sum::<usize>();
        (l.written.len(), l.delivered.len(), lost, twice)
    };
    println!("\n| written | delivered | lost | delivered twice | catch-up after restart |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {} | {} | {} | {} | {} |",
        written,
        delivered,
        lost,
        twice,
        caught_up.map_or_else(
            || "not reached".to_owned(),
            |d| format!("{:.0} ms", d.as_secs_f64() * 1000.0)
        )
    );
    println!(
        "\nlost is checked by document id and version; repeats after a crash are bounded by the checkpoint batch (50)."
    );
    if let Some(sim) = sim {
        sim.shutdown().await;
    }
    Ok(lost == 0)
}
