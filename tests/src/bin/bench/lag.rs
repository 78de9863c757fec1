//! Lag under load: the soak's load generator (`cdc-soak writer`, built beside this
//! program) writes at a steady rate while the `cdc` program (beside it too) moves the
//! changes into NATS JetStream or PostgreSQL; each change's lag is the time from the
//! writer having its acknowledgement to the message being stored in JetStream (the
//! stream's own timestamp) or its row's transaction being committed in PostgreSQL (a
//! trigger's `pg_notify`, which PostgreSQL delivers at commit, stamped by a listener).
//!
//! The PostgreSQL sink writes one row per document per batch, so a change that a later
//! change of its document superseded in the same batch is never a row of its own: its lag
//! runs until the row holding a later state was committed (it is visible from then on).
//! A change stored before the writer had its acknowledgement counts as 0 ms.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use cdc_core::ChangeEvent;
use cdc_sink::async_nats::{self, jetstream};
use futures_util::StreamExt;

use super::BoxError;

/// What one run measured.
#[derive(Debug, Clone)]
pub(crate) struct Lag {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    /// p99 of the changes acknowledged in the run's last 10 s.
    pub(crate) tail_p99_ms: f64,
    /// The rate the writer reached (writes/s).
    pub(crate) reached: f64,
    pub(crate) written: usize,
    /// Changes with no stored time (neither their own nor a later state's).
    pub(crate) missing: usize,
    /// Changes of documents inserted and deleted within one sink batch (never a row).
    pub(crate) never_a_row: usize,
}

/// The target p99 for a sink, in ms.
pub(crate) fn target_ms(kind: &str) -> f64 {
    if kind == "nats" { 250.0 } else { 1000.0 }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Each written change's lag in ms (its own stored time, or the earliest stored time of
/// a later change of its document), how many have none, and how many of those belong to
/// documents that were never a row (inserted and deleted within one batch of the
/// PostgreSQL sink: nothing to see, and nothing owed), when `rows` says the sink keeps
/// one row per document (NATS keeps every change: there, none is excused).
fn lags(
    written: &[(String, String, u64)],
    stored: &HashMap<(String, String), u64>,
    rows: bool,
) -> (Vec<(u64, f64)>, usize, usize) {
    let mut by_doc: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, (id, _, _)) in written.iter().enumerate() {
        by_doc.entry(id.as_str()).or_default().push(i);
    }
    let mut out = Vec::with_capacity(written.len());
    let mut missing = 0;
    let mut never_a_row = 0;
    for indices in by_doc.values() {
        let deleted_last = indices.last().is_some_and(|&i| written[i].1 == "deleted");
        let seen = indices
            .iter()
            .any(|&i| stored.contains_key(&(written[i].0.clone(), written[i].1.clone())));
        if rows && deleted_last && !seen {
            never_a_row += indices.len();
            continue;
        }
        let mut earliest: Option<u64> = None;
        for &i in indices.iter().rev() {
            let (id, change, acked) = &written[i];
            if let Some(&at) = stored.get(&(id.clone(), change.clone())) {
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
            }
            match earliest {
                Some(at) => out.push((*acked, at.saturating_sub(*acked) as f64 / 1000.0)),
                None => missing += 1,
            }
        }
    }
    (out, missing, never_a_row)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summarize(
    written: &[(String, String, u64)],
    stored: &HashMap<(String, String), u64>,
    reached: f64,
    rows: bool,
) -> Lag {
    let (mut all, missing, never_a_row) = lags(written, stored, rows);
    let last = written.iter().map(|w| w.2).max().unwrap_or(0);
    let mut tail: Vec<f64> = all
        .iter()
        .filter(|(acked, _)| *acked + 10_000_000 >= last)
        .map(|(_, l)| *l)
        .collect();
    tail.sort_by(f64::total_cmp);
    all.sort_by(|a, b| a.1.total_cmp(&b.1));
    let sorted: Vec<f64> = all.into_iter().map(|(_, l)| l).collect();
    Lag {
        p50_ms: percentile(&sorted, 0.5),
        p99_ms: percentile(&sorted, 0.99),
        max_ms: sorted.last().copied().unwrap_or(f64::NAN),
        tail_p99_ms: percentile(&tail, 0.99),
        reached,
        written: written.len(),
        missing,
        never_a_row,
    }
}

/// Runs the writer at `rate` for `seconds` with `cdc run` moving the changes into `kind`
/// (`nats` or `postgres`), and measures each change's lag.
pub(crate) async fn lag_into(
    uri: &str,
    kind: &str,
    rate: u64,
    seconds: u64,
) -> Result<Lag, BoxError> {
    let cdc = super::sibling("cdc")?;
    let soak = super::sibling("cdc-soak")?;
    let pid = std::process::id();
    let work = std::env::temp_dir().join(format!("cdc-bench-lag-{kind}-{pid}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    {
        let client = mongodb::Client::with_uri_str(uri).await?;
        client
            .database("soak")
            .collection::<bson::Document>("docs")
            .drop()
            .await?;
    }
    let nats_url = std::env::var("CDC_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let pg_url = std::env::var("CDC_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let stream_name = format!("LAG_{pid}");
    let prefix = format!("lag_{pid}_");
    let table = format!("{prefix}docs");
    let channel = format!("lag_{pid}");

    // PostgreSQL: the sink's table made beforehand, with a trigger announcing each row
    // change at commit; a listener stamps each announcement as it arrives.
    let stored: Arc<Mutex<HashMap<(String, String), u64>>> = Arc::default();
    let mut pg_client = None;
    if kind == "postgres" {
        let (client, mut conn) = tokio_postgres::connect(&pg_url, tokio_postgres::NoTls).await?;
        let seen = Arc::clone(&stored);
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = message
                    && let Some((id, change)) = n.payload().split_once(' ')
                    && let Ok(mut seen) = seen.lock()
                {
                    seen.entry((id.to_owned(), change.to_owned()))
                        .or_insert_with(now_micros);
                }
            }
        });
        client
            .batch_execute(&format!(
                "CREATE TABLE \"{table}\" (id TEXT PRIMARY KEY, doc JSONB NOT NULL, ct_time BIGINT NOT NULL, ct_increment BIGINT NOT NULL);
                 CREATE FUNCTION \"{table}_announce\"() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                   IF TG_OP = 'DELETE' THEN
                     PERFORM pg_notify('{channel}', (OLD.doc->>'_id') || ' deleted');
                   ELSE
                     PERFORM pg_notify('{channel}', (NEW.doc->>'_id') || ' v' || (NEW.doc->>'version'));
                   END IF;
                   RETURN NULL;
                 END $$;
                 CREATE TRIGGER \"{table}_announce\" AFTER INSERT OR UPDATE OR DELETE ON \"{table}\"
                   FOR EACH ROW EXECUTE FUNCTION \"{table}_announce\"();
                 LISTEN {channel};"
            ))
            .await?;
        pg_client = Some(client);
    }
    let sink = match kind {
        "nats" => format!(
            "[sink]\ntype = \"nats\"\n\n[sink.nats]\nurl = \"{nats_url}\"\nsubject = \"lag{pid}.{{db}}.{{coll}}.{{op}}\"\nbody = \"canonical\"\nstream = \"{stream_name}\"\ncreate_stream = true\nduplicate_window_s = 600\n\n[store]\nurl = \"file:{}\"\n",
            work.join("store").display()
        ),
        "postgres" => format!(
            "[sink]\ntype = \"postgres\"\n\n[sink.postgres]\nurl = \"{pg_url}\"\ntable_prefix = \"{prefix}\"\npoints_table = \"{prefix}points\"\n"
        ),
        other => return Err(format!("no lag run into {other:?}: nats or postgres").into()),
    };
    let config = work.join("cdc.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nuri = \"{uri}\"\ndatabase = \"soak\"\ncollection = \"docs\"\nstream_id = \"lag-{kind}\"\nfull_document = \"updateLookup\"\n\n[log]\nlevel = \"warn\"\n\n{sink}"
        ),
    )?;
    let mut consumer = tokio::process::Command::new(&cdc)
        .args(["run", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Some(status) = consumer.try_wait()? {
        return Err(format!("`cdc run` exited at once: {status}").into());
    }
    let log = work.join("written.log");
    let status = tokio::process::Command::new(&soak)
        .args(["writer", "--uri", uri, "--rate", &rate.to_string()])
        .args(["--seconds", &seconds.to_string(), "--ack-times"])
        .arg("--log")
        .arg(&log)
        .arg("--stop-file")
        .arg(work.join("stop"))
        .stdout(std::process::Stdio::null())
        .status()
        .await?;
    if !status.success() {
        return Err(format!("the writer failed: {status}").into());
    }
    let reached = cdc_tests::load::reached_rate(&log)? as f64;
    let written = cdc_tests::verify::acknowledged(&std::fs::read_to_string(&log)?)?;

    // Until every change has a stored time, or none came for 30 s.
    let js = match kind {
        "nats" => Some(jetstream::new(async_nats::connect(&nats_url).await?)),
        _ => None,
    };
    let mut catch_up = cdc_tests::load::CatchUp::new();
    let lag = loop {
        let missing = match &js {
            // One message per change: the stream's count says when all are there (it is
            // read whole once, at the end).
            Some(js) => {
                let held = js
                    .get_stream(&stream_name)
                    .await?
                    .info()
                    .await?
                    .state
                    .messages;
                written.len().saturating_sub(held as usize)
            }
            None => {
                let stored = stored.lock().map_err(|_| "poisoned")?;
                summarize(&written, &stored, reached, true).missing
            }
        };
        if catch_up.done(missing) {
            if let Some(js) = &js {
                let read = nats_stored(js, &stream_name).await?;
                *stored.lock().map_err(|_| "poisoned")? = read;
            }
            let stored = stored.lock().map_err(|_| "poisoned")?;
            break summarize(&written, &stored, reached, js.is_none());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    consumer.kill().await?;
    if let Some(js) = &js {
        let _ = js.delete_stream(&stream_name).await;
    }
    if let Some(pg) = &pg_client {
        let _ = pg
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS \"{table}\"; DROP FUNCTION IF EXISTS \"{table}_announce\"(); DROP TABLE IF EXISTS \"{prefix}points\"; DROP TABLE IF EXISTS \"{prefix}points_leases\"; DROP TABLE IF EXISTS \"{prefix}points_dead_letters\""
            ))
            .await;
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(lag)
}

/// Each change in the JetStream stream with the time the stream stored it (µs).
async fn nats_stored(
    js: &jetstream::Context,
    stream: &str,
) -> Result<HashMap<(String, String), u64>, BoxError> {
    let mut out = HashMap::new();
    for m in cdc_tests::nats::all_messages(js, stream).await? {
        let at = m
            .info()
            .map_err(|e| format!("a message without its stream metadata: {e}"))?
            .published
            .unix_timestamp_nanos();
        let json: serde_json::Value = serde_json::from_slice(&m.payload)?;
        let bson::Bson::Document(doc) = bson::Bson::try_from(json)? else {
            return Err("a message body is not a document".into());
        };
        let event = ChangeEvent::from_document(&doc)?;
        if let Some((id, change)) = cdc_tests::workload::change_of(&event) {
            out.entry((id.to_string(), change))
                .or_insert((at / 1000) as u64);
        }
    }
    Ok(out)
}

/// Prints a run's lines.
pub(crate) fn print(kind: &str, rate: u64, seconds: u64, lag: &Lag) {
    println!(
        "lag at {rate} writes/s into {kind}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        lag.p50_ms, lag.p99_ms, lag.max_ms
    );
    let kept_up = lag.missing == 0 && lag.tail_p99_ms <= target_ms(kind);
    println!(
        "  writer reached {:.0} writes/s for {seconds} s; {} of {} changes stored{}; the last 10 s: p99 {:.0} ms; kept up: {} (p99 target {:.0} ms)",
        lag.reached,
        lag.written - lag.missing,
        lag.written,
        if lag.never_a_row > 0 {
            format!(
                " ({} of documents inserted and deleted within one batch, never a row)",
                lag.never_a_row
            )
        } else {
            String::new()
        },
        lag.tail_p99_ms,
        if kept_up { "yes" } else { "no" },
        target_ms(kind)
    );
}

/// `cdc-bench lag [--sink nats|postgres|both] [--rate R] [--seconds S]`: the lag runs
/// alone, against a simulator in its own process.
pub(crate) async fn run(args: &[String]) -> Result<(), BoxError> {
    let rate = super::flag(args, "--rate", 5000)? as u64;
    let seconds = super::flag(args, "--seconds", 60)? as u64;
    let which = super::value(args, "--sink").unwrap_or("both");
    let kinds: &[&str] = match which {
        "both" => &["nats", "postgres"],
        "nats" => &["nats"],
        "postgres" => &["postgres"],
        other => return Err(format!("--sink {other}: nats, postgres or both").into()),
    };
    let (mut server, uri) = super::spawn_sim((rate * seconds * 2 + 100_000) as usize).await?;
    let mut lost = Vec::new();
    for kind in kinds {
        let lag = lag_into(&uri, kind, rate, seconds).await?;
        print(kind, rate, seconds, &lag);
        if lag.missing > 0 {
            lost.push(format!("{} into {kind}", lag.missing));
        }
    }
    server.kill().await?;
    // Whether the sink kept up is a figure; an acknowledged change that never arrived is
    // a loss, and fails the run.
    if !lost.is_empty() {
        return Err(format!("acknowledged changes never stored: {}", lost.join(", ")).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_superseded_change_waits_for_the_state_that_covers_it() {
        let w = |id: &str, c: &str, at: u64| (id.to_owned(), c.to_owned(), at);
        let written = vec![
            w("1", "v1", 1_000),
            w("1", "v2", 2_000),
            w("1", "v3", 3_000),
            w("2", "v1", 4_000),
            w("3", "v1", 5_000),
        ];
        let s = |id: &str, c: &str| (id.to_owned(), c.to_owned());
        // v2 of 1 was never a row of its own: v3's row (at 9 ms) covers it; v1 has its
        // own; 2 was stored before its acknowledgement reached the writer (0 ms); 3 never.
        let stored = HashMap::from([
            (s("1", "v1"), 4_000),
            (s("1", "v3"), 9_000),
            (s("2", "v1"), 3_500),
        ]);
        let (mut got, missing, never) = lags(&written, &stored, true);
        got.sort_by_key(|(acked, _)| *acked);
        assert_eq!(
            got,
            [(1_000, 3.0), (2_000, 7.0), (3_000, 6.0), (4_000, 0.0)]
        );
        assert_eq!((missing, never), (1, 0));
        let lag = summarize(&written, &stored, 5000.0, true);
        assert_eq!((lag.max_ms, lag.missing, lag.written), (7.0, 1, 5));
        // A document inserted and deleted within one batch was never a row: not missing.
        // One whose rows were seen but whose delete was not is.
        let mut written = written;
        written.extend([w("3", "deleted", 6_000), w("1", "deleted", 7_000)]);
        let (_, missing, never) = lags(&written, &stored, true);
        assert_eq!((missing, never), (1, 2));
        // In a stream of every change, nothing is excused.
        let (_, missing, never) = lags(&written, &stored, false);
        assert_eq!((missing, never), (3, 0));
    }
}
