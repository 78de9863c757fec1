//! `cdc-soak writer`: the load generator.
//!
//! `--connections N` writers (8) share the target rate `--rate R` (a total; 0 = as fast as
//! each write is acknowledged), each with its own client and its own keys (document ids
//! `≡ c mod N`), so one key's writes come from one connection, in order, and transactions
//! never conflict with each other. Each writer keeps about `--keys K / N` documents alive
//! (10,000 in all) with a mix of inserts, `$set` and `$inc` updates of `version`,
//! replacements, deletes and, with `--transactions`, 2–3-document transactions. An id is
//! never inserted again once deleted and a version never repeats, so `<id> v<version>` and
//! `<id> deleted` name one write each; every logged write also carries its write id
//! (`w<connection>.<sequence>`, stored in the document as `w`). With `--burst-every S
//! --burst-x F` the rate is F times higher for the first second of every S seconds.
//!
//! Every write is majority-acknowledged before it is logged (with `--ack-times`, followed
//! by ` @<µs since the epoch>` of the acknowledgement); the log is flushed when the writer
//! stops (at the stop file, or after `--seconds S`). It prints, and writes to
//! `<log>.summary`, `writer: <n> writes in <s> s (<r>/s)`, counting each document changed
//! (a transaction of three documents is three writes).

use std::{
    collections::HashMap,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bson::doc;
use cdc_core::BoxError;

use super::{collection, need, value};

/// What the writer was asked to do.
#[derive(Debug, Clone)]
struct Load {
    rate: u64,
    connections: u64,
    keys: u64,
    transactions: bool,
    burst_every: Option<f64>,
    burst_x: f64,
}

impl Load {
    /// The pause before a connection's next write, `elapsed` into the run.
    fn pause(&self, elapsed: Duration) -> Option<Duration> {
        if self.rate == 0 {
            return None;
        }
        let mut per_connection = self.rate as f64 / self.connections as f64;
        if let Some(every) = self.burst_every {
            let into = elapsed.as_secs_f64() % every;
            if elapsed.as_secs_f64() >= every && into < 1.0 {
                per_connection *= self.burst_x;
            }
        }
        Some(Duration::from_secs_f64(1.0 / per_connection.max(0.001)))
    }
}

/// One connection's keys and what it knows of them.
struct Keys {
    connection: u64,
    stride: u64,
    live: Vec<i64>,
    /// The last version written of every key ever written (kept after a delete, so a
    /// version is never written twice).
    versions: HashMap<i64, i64>,
    next_id: i64,
    rng: u64,
}

impl Keys {
    fn roll(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn next_version(&mut self, id: i64) -> i64 {
        let v = self.versions.get(&id).copied().unwrap_or(0) + 1;
        self.versions.insert(id, v);
        v
    }

    fn new_id(&mut self) -> i64 {
        let id = self.next_id;
        self.next_id += self.stride as i64;
        id
    }
}

/// The shared log: lines of one key come from one connection, in acknowledgement order;
/// with `stamp`, each line ends with ` @<microseconds since the epoch>` of its
/// acknowledgement (for the lag benchmark).
#[derive(Clone)]
struct Log {
    file: Arc<Mutex<BufWriter<std::fs::File>>>,
    stamp: bool,
}

impl Log {
    fn append(&self, lines: &[String]) -> Result<(), BoxError> {
        let at = self.stamp.then(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros())
        });
        let mut file = self.file.lock().map_err(|_| "the log's lock is poisoned")?;
        for line in lines {
            match at {
                Some(at) => writeln!(file, "{line} @{at}")?,
                None => writeln!(file, "{line}")?,
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), BoxError> {
        let mut file = self.file.lock().map_err(|_| "the log's lock is poisoned")?;
        file.flush()?;
        file.get_ref().sync_all()?;
        Ok(())
    }
}

pub(super) async fn run(args: &[String]) -> Result<(), BoxError> {
    let uri = need(args, "--uri")?;
    let load = Load {
        rate: need(args, "--rate")?.parse()?,
        connections: value(args, "--connections").map_or(Ok(8), |v| v.parse())?,
        keys: value(args, "--keys").map_or(Ok(10_000), |v| v.parse())?,
        transactions: args.iter().any(|a| a == "--transactions"),
        burst_every: value(args, "--burst-every")
            .map(|v| v.parse())
            .transpose()?,
        burst_x: value(args, "--burst-x").map_or(Ok(4.0), |v| v.parse())?,
    };
    if load.connections == 0 || load.keys < load.connections {
        return Err("--connections must be at least 1 and --keys at least --connections".into());
    }
    if load.burst_every.is_some_and(|s| s <= 1.0) || load.burst_x <= 0.0 {
        return Err("--burst-every must exceed 1 (s) and --burst-x be positive".into());
    }
    let log_path = need(args, "--log")?;
    let stop_file = PathBuf::from(need(args, "--stop-file")?);
    let seconds: Option<f64> = value(args, "--seconds").map(|v| v.parse()).transpose()?;
    let preload: i64 = value(args, "--preload").map_or(Ok(0), |v| v.parse())?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let log = Log {
        file: Arc::new(Mutex::new(BufWriter::with_capacity(1 << 16, file))),
        stamp: args.iter().any(|a| a == "--ack-times"),
    };

    // Documents that exist before the consumer starts (a snapshot reads them).
    let client = mongodb::Client::with_uri_str(&uri).await?;
    let coll = collection(&client);
    let mut next = 0i64;
    while next < preload {
        let n = (preload - next).min(5_000);
        let docs: Vec<bson::Document> = (next..next + n)
            .map(|id| doc! { "_id": id, "version": 1_i64, "w": "preload", "pad": "x".repeat(200) })
            .collect();
        coll.insert_many(docs).await?;
        let lines: Vec<String> = (next..next + n).map(|id| format!("{id} v1")).collect();
        log.append(&lines)?;
        next += n;
    }
    log.sync()?;
    if preload > 0 {
        // The consumer starts now: it reads what exists, then the stream.
        std::fs::write(format!("{log_path}.preloaded"), b"")?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..load.connections {
        // Each connection its own client (its own pool and sockets), as separate
        // application instances would be.
        let client = mongodb::Client::with_uri_str(&uri).await?;
        let stride = load.connections;
        let first_new = preload + ((c as i64 - preload).rem_euclid(stride as i64));
        let mut keys = Keys {
            connection: c,
            stride,
            live: (0..preload).filter(|id| *id as u64 % stride == c).collect(),
            versions: (0..preload)
                .filter(|id| *id as u64 % stride == c)
                .map(|id| (id, 1))
                .collect(),
            next_id: first_new,
            rng: 0x9E37_79B9_7F4A_7C15 ^ (c + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
        };
        let (load, log, stop, writes) = (load.clone(), log.clone(), stop.clone(), writes.clone());
        tasks.push(tokio::spawn(async move {
            connection(&client, &load, &mut keys, &log, &stop, &writes, started).await
        }));
    }
    // The stop file (or the time limit) ends every connection after its current write.
    while !stop_file.exists() && seconds.is_none_or(|s| started.elapsed().as_secs_f64() < s) {
        if tasks.iter().any(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failed = None;
    for task in tasks {
        if let Err(e) = task.await? {
            failed.get_or_insert(e);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    log.sync()?;
    if let Some(e) = failed {
        return Err(e);
    }
    let summary = cdc_tests::load::summary(writes.load(Ordering::Relaxed), elapsed);
    println!("{summary}");
    std::fs::write(
        cdc_tests::load::summary_path(Path::new(&log_path)),
        format!("{summary}\n"),
    )?;
    Ok(())
}

/// One connection's writes until `stop`.
async fn connection(
    client: &mongodb::Client,
    load: &Load,
    keys: &mut Keys,
    log: &Log,
    stop: &AtomicBool,
    writes: &AtomicU64,
    started: Instant,
) -> Result<(), BoxError> {
    let coll = collection(client);
    let target_live = (load.keys / load.connections).max(1) as usize;
    let mut sequence = 0u64;
    let mut txn_sequence = 0u64;
    let mut next_at = tokio::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let pause = load.pause(started.elapsed());
        if let Some(pause) = pause {
            next_at += pause;
            let now = tokio::time::Instant::now();
            if next_at + Duration::from_secs(1) < now {
                // Far behind (the server was slower): do not make up for it in a rush.
                next_at = now;
            }
            tokio::time::sleep_until(next_at).await;
        }
        let roll = keys.roll() % 100;
        let pick = (keys.roll() % 1_000_000) as usize;
        sequence += 1;
        let w = format!("w{}.{sequence}", keys.connection);
        if keys.live.len() < target_live.min(2) || (keys.live.len() < target_live && roll < 30) {
            let id = keys.new_id();
            let v = keys.next_version(id);
            coll.insert_one(doc! { "_id": id, "version": v, "w": &w, "pad": "x".repeat(200) })
                .await?;
            keys.live.push(id);
            log.append(&[format!("{id} v{v} {w}")])?;
            writes.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if load.transactions && roll >= 90 && keys.live.len() >= 3 {
            // Two or three of this connection's documents updated together.
            let size = 2 + pick % 2;
            let start = pick % keys.live.len();
            let ids: Vec<i64> = (0..size)
                .map(|k| keys.live[(start + k) % keys.live.len()])
                .collect();
            let t = keys.connection + load.connections * txn_sequence;
            txn_sequence += 1;
            let mut session = client.start_session().await?;
            session.start_transaction().await?;
            let mut lines = Vec::new();
            for (k, &id) in ids.iter().enumerate() {
                let v = keys.next_version(id);
                let w = format!("{w}.{k}");
                coll.update_one(
                    doc! { "_id": id },
                    doc! { "$set": { "version": v, "w": &w } },
                )
                .session(&mut session)
                .await?;
                lines.push(format!("{id} v{v} t{t} {w}"));
            }
            session.commit_transaction().await?;
            // Logged only after the commit was acknowledged.
            log.append(&lines)?;
            writes.fetch_add(lines.len() as u64, Ordering::Relaxed);
            // The rate counts documents written: the transaction's others take their turns.
            if let Some(pause) = pause {
                next_at += pause * (lines.len() as u32 - 1);
            }
            continue;
        }
        let at = pick % keys.live.len();
        let id = keys.live[at];
        let line = if roll < 15 {
            coll.delete_one(doc! { "_id": id }).await?;
            keys.live.swap_remove(at);
            format!("{id} deleted {w}")
        } else if roll < 50 {
            let v = keys.next_version(id);
            coll.update_one(
                doc! { "_id": id },
                doc! { "$set": { "version": v, "w": &w } },
            )
            .await?;
            format!("{id} v{v} {w}")
        } else if roll < 75 {
            // `$inc` of the version: the change's updated fields carry the new value.
            let v = keys.next_version(id);
            coll.update_one(
                doc! { "_id": id },
                doc! { "$inc": { "version": 1_i64 }, "$set": { "w": &w } },
            )
            .await?;
            format!("{id} v{v} {w}")
        } else {
            let v = keys.next_version(id);
            coll.replace_one(
                doc! { "_id": id },
                doc! { "version": v, "w": &w, "pad": "y".repeat(200) },
            )
            .await?;
            format!("{id} v{v} {w}")
        };
        // Logged only after the write was acknowledged.
        log.append(&[line])?;
        writes.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_multiply_the_rate_for_the_first_second_of_each_period() {
        let load = Load {
            rate: 800,
            connections: 8,
            keys: 80,
            transactions: false,
            burst_every: Some(10.0),
            burst_x: 4.0,
        };
        let at = |s: f64| {
            load.pause(Duration::from_secs_f64(s))
                .unwrap()
                .as_secs_f64()
        };
        assert!(
            (at(0.5) - 0.01).abs() < 1e-9,
            "no burst before the first period ends"
        );
        assert!((at(10.5) - 0.0025).abs() < 1e-9);
        assert!((at(11.5) - 0.01).abs() < 1e-9);
        assert!((at(20.2) - 0.0025).abs() < 1e-9);
        let flat = Load { rate: 0, ..load };
        assert_eq!(flat.pause(Duration::ZERO), None);
    }
}
