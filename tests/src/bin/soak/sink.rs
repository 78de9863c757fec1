//! `cdc-soak run --sink nats|postgres`: the `cdc` program itself as the consumer, killed
//! with SIGKILL while it moves the writer's changes into NATS JetStream or PostgreSQL;
//! then the sink is checked.
//!
//! - NATS: every change the writer made is in the JetStream stream exactly once (by
//!   document id and version), nothing else is: `lost` counts changes missing, and
//!   `duplicates` messages of a change stored more than once (or of no change).
//! - PostgreSQL: the table equals the collection: `lost` counts documents whose row is
//!   missing or holds another version, `duplicates` rows of documents the collection no
//!   longer has (a delete undone).
//! - With `--snapshot [--preload N]` (default 30,000 documents written before `cdc`
//!   starts, `snapshot.mode = "initial"`, kills from the first second, so several land
//!   while the snapshot reads): for NATS, the replica built from the messages in stream
//!   order must equal the collection (`lost` counts documents that differ), and
//!   `duplicates` counts every snapshot row stored more than once for its document, and
//!   every change stored more than once.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use cdc_core::{BoxError, ChangeEvent};
use cdc_sink::async_nats::{self, jetstream};

use super::{collection_content, count_lines, value};

fn spawn_cdc(cdc: &Path, config: &Path, log: &Path) -> Result<Child, BoxError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Ok(Command::new(cdc)
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?)
}

/// What the sink holds, as changes `(id, "v<n>" | "deleted")` with their counts (NATS),
/// or as the table's content `id → "v<n>"` (PostgreSQL).
enum Held {
    Changes(HashMap<(String, String), usize>),
    Table(BTreeMap<i64, String>),
}

async fn nats_changes(
    js: &jetstream::Context,
    stream: &str,
) -> Result<HashMap<(String, String), usize>, BoxError> {
    let mut out: HashMap<(String, String), usize> = HashMap::new();
    for m in cdc_tests::nats::all_messages(js, stream).await? {
        let json: serde_json::Value = serde_json::from_slice(&m.payload)?;
        let doc = match bson::Bson::try_from(json)? {
            bson::Bson::Document(d) => d,
            other => return Err(format!("a message body is not a document: {other}").into()),
        };
        let key = cdc_tests::workload::change_of(&ChangeEvent::from_document(&doc)?).map_or_else(
            || ("?".to_owned(), format!("{doc}")),
            |(id, change)| (id.to_string(), change),
        );
        *out.entry(key).or_default() += 1;
    }
    Ok(out)
}

async fn pg_table(
    client: &tokio_postgres::Client,
    table: &str,
) -> Result<BTreeMap<i64, String>, BoxError> {
    let rows = client
        .query(&format!("SELECT doc FROM \"{table}\""), &[])
        .await?;
    let mut out = BTreeMap::new();
    for row in rows {
        let doc: serde_json::Value = row.get(0);
        let id = doc["_id"].as_i64().ok_or("a row without an integer _id")?;
        let v = doc["version"].as_i64().ok_or("a row without a version")?;
        out.insert(id, format!("v{v}"));
    }
    Ok(out)
}

/// What a JetStream stream holds after a snapshot: the replica its messages build (in
/// stream order) and the duplicates among them.
#[derive(Debug, Default, PartialEq)]
struct Replayed {
    replica: BTreeMap<i64, String>,
    /// Snapshot rows stored beyond the first of their document.
    duplicate_rows: usize,
    /// Changes (document, version) stored more than once.
    duplicate_changes: usize,
    rows: usize,
}

/// Replays `(operation, id, "v<n>" | "deleted")` in stream order.
fn replay(messages: &[(String, i64, String)]) -> Replayed {
    let mut out = Replayed::default();
    let mut rows: HashMap<i64, usize> = HashMap::new();
    let mut changes: HashMap<(i64, &str), usize> = HashMap::new();
    for (op, id, change) in messages {
        if op == "snapshot" {
            *rows.entry(*id).or_default() += 1;
        } else {
            *changes.entry((*id, change.as_str())).or_default() += 1;
        }
        if change == "deleted" {
            out.replica.remove(id);
        } else {
            out.replica.insert(*id, change.clone());
        }
    }
    out.rows = rows.len();
    out.duplicate_rows = rows.values().map(|n| n - 1).sum();
    out.duplicate_changes = changes.values().map(|n| n - 1).sum();
    out
}

async fn nats_replay(js: &jetstream::Context, stream: &str) -> Result<Replayed, BoxError> {
    let mut messages = Vec::new();
    for m in cdc_tests::nats::all_messages(js, stream).await? {
        let json: serde_json::Value = serde_json::from_slice(&m.payload)?;
        let doc = match bson::Bson::try_from(json)? {
            bson::Bson::Document(d) => d,
            other => return Err(format!("a message body is not a document: {other}").into()),
        };
        let event = ChangeEvent::from_document(&doc)?;
        if let Some((id, change)) = cdc_tests::workload::change_of(&event) {
            messages.push((event.operation_type.as_str().to_owned(), id, change));
        }
    }
    Ok(replay(&messages))
}

/// `(lost, duplicates, checked)`.
fn compare_changes(
    written: &[(String, String)],
    held: &HashMap<(String, String), usize>,
) -> (usize, usize, usize) {
    let lost = written.iter().filter(|c| !held.contains_key(*c)).count();
    let wanted: std::collections::HashSet<&(String, String)> = written.iter().collect();
    let duplicates = held
        .iter()
        .map(|(c, n)| if wanted.contains(c) { n - 1 } else { *n })
        .sum();
    (lost, duplicates, written.len())
}

/// `(lost, duplicates, checked)`.
fn compare_table(
    content: &BTreeMap<i64, String>,
    table: &BTreeMap<i64, String>,
) -> (usize, usize, usize) {
    let lost = content
        .iter()
        .filter(|(id, v)| table.get(id) != Some(v))
        .count();
    let extra = table.keys().filter(|id| !content.contains_key(id)).count();
    (lost, extra, content.len())
}

pub(super) async fn run(args: &[String], kind: &str) -> Result<bool, BoxError> {
    if kind != "nats" && kind != "postgres" {
        return Err(format!("--sink {kind}: expected nats or postgres").into());
    }
    let kills: usize = value(args, "--kills").map_or(Ok(20), |v| v.parse())?;
    let load = super::LoadArgs::from(args)?;
    let snapshot = args.iter().any(|a| a == "--snapshot");
    let preload = value(args, "--preload").unwrap_or_else(|| "1000000".to_owned());
    let cdc =
        cdc_tests::program_beside("cdc", "`cargo build -p cdc-cli`; `cargo xtask soak` does")?;
    let sim = match value(args, "--uri") {
        Some(_) => None,
        None => Some(mongo_sim::MongoSim::start().await?),
    };
    let uri = match (&sim, value(args, "--uri")) {
        (_, Some(uri)) => uri,
        (Some(sim), None) => sim.uri(),
        (None, None) => return Err("no source".into()),
    };
    let work = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../target/soak-{kind}{}",
        if snapshot { "-snapshot" } else { "" }
    ));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let written = work.join("written.log");
    let stop_file = work.join("stop-writer");
    let cdc_log = work.join("cdc.log");
    {
        let client = mongodb::Client::with_uri_str(&uri).await?;
        super::collection(&client).drop().await?;
    }
    let tag = format!(
        "{}_{}",
        std::process::id(),
        Instant::now().elapsed().subsec_nanos()
    );
    let nats_url = std::env::var("CDC_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let pg_url = std::env::var("CDC_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let stream_name = format!("SOAK_{tag}");
    let prefix = format!("soak_{tag}_");
    let sink_section = match kind {
        "nats" => format!(
            "[sink]\ntype = \"nats\"\n\n[sink.nats]\nurl = \"{nats_url}\"\nsubject = \"soak{tag}.{{db}}.{{coll}}.{{op}}\"\nbody = \"canonical\"\nstream = \"{stream_name}\"\ncreate_stream = true\nduplicate_window_s = 600\n\n[store]\nurl = \"file:{}\"\n",
            work.join("store").display()
        ),
        _ => format!(
            "[sink]\ntype = \"postgres\"\n\n[sink.postgres]\nurl = \"{pg_url}\"\ntable_prefix = \"{prefix}\"\npoints_table = \"{prefix}points\"\n"
        ),
    };
    let config = work.join("cdc.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nuri = \"{uri}\"\ndatabase = \"soak\"\ncollection = \"docs\"\nstream_id = \"soak-{kind}\"\nfull_document = \"updateLookup\"\n\n[checkpoint]\nevery_events = 100\nevery_ms = 1000\n\n[processing]\nmax_batch_events = 50\n\n[log]\nlevel = \"warn\"\n\n[snapshot]\nmode = \"{}\"\nchunk_docs = 2000\n\n{sink_section}",
            if snapshot { "initial" } else { "never" }
        ),
    )?;
    let started = Instant::now();
    println!(
        "soak: {kills} SIGKILLs of `cdc run` with the {kind} sink, writer {}, logs in {}",
        load.describe(),
        work.display()
    );
    let (mut consumer, mut writer) = if snapshot {
        // The documents exist before `cdc` starts; it snapshots them while the writer
        // goes on, and is killed from the first second (during the snapshot).
        let writer = super::KillOnDrop(super::spawn_writer(
            &uri,
            &load,
            &written,
            &stop_file,
            &["--preload", &preload],
        )?);
        let preloaded = PathBuf::from(format!("{}.preloaded", written.display()));
        let deadline = Instant::now() + Duration::from_secs(300);
        while !preloaded.exists() {
            if Instant::now() > deadline {
                return Err("the writer never finished preloading".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (spawn_cdc(&cdc, &config, &cdc_log)?, writer)
    } else {
        let consumer = spawn_cdc(&cdc, &config, &cdc_log)?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Killed if this run ends early (an error): no writer is left behind.
        let writer =
            super::KillOnDrop(super::spawn_writer(&uri, &load, &written, &stop_file, &[])?);
        (consumer, writer)
    };
    let mut rng = started.elapsed().as_nanos() as u64 | 1;
    for k in 0..kills {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(super::kill_pause(args, kills, rng, 300 + rng % 900)?).await;
        consumer.kill()?; // SIGKILL
        consumer.wait()?;
        consumer = spawn_cdc(&cdc, &config, &cdc_log)?;
        if (k + 1) % 5 == 0 {
            println!("  {} kills, {} written", k + 1, count_lines(&written));
        }
        if let Some(status) = writer.0.try_wait()? {
            return Err(format!("the writer exited early: {status}").into());
        }
        if let Some(status) = consumer.try_wait()? {
            return Err(format!(
                "`cdc run` exited at once ({status}); see {}",
                cdc_log.display()
            )
            .into());
        }
    }
    std::fs::write(&stop_file, b"stop")?;
    let status = writer.0.wait()?;
    if !status.success() {
        return Err(format!("the writer failed: {status}").into());
    }
    let written_log = cdc_tests::verify::parse(&std::fs::read_to_string(&written)?)?;
    let content = collection_content(&uri).await?;

    // Wait for the last run to catch up, then stop it gracefully (SIGTERM).
    let nats = match kind {
        "nats" => Some(async_nats::connect(&nats_url).await?),
        _ => None,
    };
    let pg = match kind {
        "postgres" => {
            let (client, conn) = tokio_postgres::connect(&pg_url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            Some(client)
        }
        _ => None,
    };
    let table = format!("{prefix}docs");
    let mut catch_up = cdc_tests::load::CatchUp::new();
    if snapshot && let Some(n) = &nats {
        let js = jetstream::new(n.clone());
        let replayed = loop {
            let replayed = nats_replay(&js, &stream_name).await?;
            if catch_up.done(differing(&content, &replayed.replica)) {
                break replayed;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        super::signal(&consumer, "-TERM")?;
        let stopped = consumer.wait()?;
        let _ = js.delete_stream(&stream_name).await;
        let lost = differing(&content, &replayed.replica);
        let duplicates = replayed.duplicate_rows + replayed.duplicate_changes;
        println!();
        super::print_load_line(
            &written,
            lost,
            &format!(
                "duplicates {duplicates} (snapshot rows {}, changes {}) | {kills} kills | stopped: {stopped}",
                replayed.duplicate_rows, replayed.duplicate_changes
            ),
        )?;
        println!(
            "soak: {kills} kills in {:.0} s; the last run stopped on SIGTERM: {stopped}",
            started.elapsed().as_secs_f64()
        );
        println!(
            "snapshot rows: {} documents, stored twice: {}; changes stored twice: {}",
            replayed.rows, replayed.duplicate_rows, replayed.duplicate_changes
        );
        println!(
            "sink {kind}: lost {lost} | duplicates {duplicates} | checked {}",
            content.len()
        );
        if let Some(sim) = sim {
            sim.shutdown().await;
        }
        return Ok(lost == 0 && duplicates == 0 && replayed.rows > 0 && stopped.success());
    }
    let held = loop {
        let held = match (&nats, &pg) {
            (Some(n), _) => {
                Held::Changes(nats_changes(&jetstream::new(n.clone()), &stream_name).await?)
            }
            (_, Some(pg)) => Held::Table(pg_table(pg, &table).await.unwrap_or_default()),
            _ => return Err("no sink".into()),
        };
        // A table is done when it equals the collection: rows still there for documents
        // deleted last are deletes not applied yet, so they are waited for as well. A
        // stream's duplicates never go away; only its missing changes are waited for.
        let (lost, pending) = match &held {
            Held::Changes(c) => (compare_changes(&written_log, c).0, 0),
            Held::Table(t) => {
                let (lost, extra, _) = compare_table(&content, t);
                (lost, extra)
            }
        };
        if catch_up.done(lost + pending) {
            break held;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    super::signal(&consumer, "-TERM")?;
    let stopped = consumer.wait()?;
    let (lost, duplicates, checked) = match &held {
        Held::Changes(c) => compare_changes(&written_log, c),
        Held::Table(t) => compare_table(&content, t),
    };
    if let Some(n) = &nats {
        let _ = jetstream::new(n.clone()).delete_stream(&stream_name).await;
    }
    if let Some(pg) = &pg {
        let _ = pg
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS \"{table}\"; DROP TABLE IF EXISTS \"{prefix}points\"; DROP TABLE IF EXISTS \"{prefix}points_leases\""
            ))
            .await;
    }
    println!();
    super::print_load_line(
        &written,
        lost,
        &format!(
            "duplicates {duplicates} | checked {checked} | {kills} kills | stopped: {stopped}"
        ),
    )?;
    println!(
        "soak: {kills} kills in {:.0} s; the last run stopped on SIGTERM: {stopped}",
        started.elapsed().as_secs_f64()
    );
    println!("sink {kind}: lost {lost} | duplicates {duplicates} | checked {checked}");
    if let Some(sim) = sim {
        sim.shutdown().await;
    }
    Ok(lost == 0 && duplicates == 0 && checked > 0 && stopped.success())
}

/// Documents whose replica entry differs from the collection (missing, another version,
/// or present though deleted).
pub(super) fn differing(content: &BTreeMap<i64, String>, replica: &BTreeMap<i64, String>) -> usize {
    let wrong = content
        .iter()
        .filter(|(id, v)| replica.get(id) != Some(v))
        .count();
    wrong
        + replica
            .keys()
            .filter(|id| !content.contains_key(id))
            .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_counts_rows_and_changes_stored_twice() {
        let m = |op: &str, id: i64, c: &str| (op.to_owned(), id, c.to_owned());
        let r = replay(&[
            m("snapshot", 1, "v1"),
            m("snapshot", 2, "v3"),
            m("update", 1, "v2"),
            // Row 1 read again after a restart and stored under a new id: a duplicate.
            m("snapshot", 1, "v2"),
            m("update", 1, "v2"),
            m("delete", 2, "deleted"),
        ]);
        assert_eq!((r.rows, r.duplicate_rows, r.duplicate_changes), (2, 1, 1));
        assert_eq!(r.replica, BTreeMap::from([(1, "v2".to_owned())]));
        let content = BTreeMap::from([(1, "v2".to_owned()), (3, "v1".to_owned())]);
        assert_eq!(differing(&content, &r.replica), 1);
    }

    #[test]
    fn the_comparisons_count_what_they_say() {
        let c = |id: &str, v: &str| (id.to_owned(), v.to_owned());
        let written = vec![c("1", "v1"), c("1", "v2"), c("2", "v1")];
        let held: HashMap<_, _> = [(c("1", "v1"), 2), (c("2", "v1"), 1), (c("9", "v1"), 1)].into();
        assert_eq!(compare_changes(&written, &held), (1, 2, 3));
        let content: BTreeMap<i64, String> = [(1, "v2".into()), (2, "v1".into())].into();
        let table: BTreeMap<i64, String> = [(1, "v1".into()), (3, "v1".into())].into();
        assert_eq!(compare_table(&content, &table), (2, 1, 2));
    }
}
