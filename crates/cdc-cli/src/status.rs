//! `cdc status` and `cdc dead-letters`.

use std::{process::ExitCode, sync::Arc, time::Duration};

use cdc_core::ChangeSource;
use cdc_processor::{BoxError, ClusterTime, DocumentProcessor, OplogView, ResumePoint, bson};

use crate::{config::Config, metrics::Metrics, run};

/// A processor for the configured stream that never connects until used (its id, its
/// dead letters); the store as configured.
async fn offline_processor(cfg: &Config) -> Result<(DocumentProcessor, run::Opened), BoxError> {
    let uri = cfg.source_uri()?;
    let client = cdc_processor::mongodb::Client::with_uri_str(&uri)
        .await
        .map_err(|e| {
            format!(
                "`source.uri`: {}",
                crate::config::scrub(&e.to_string(), &uri)
            )
        })?;
    let opened = run::open_store(cfg).await?;
    let processor = run::builder(cfg, client)?.store(&opened.stores).build()?;
    Ok((processor, opened))
}

fn time_text(t: ClusterTime) -> String {
    let at = bson::DateTime::from_millis(i64::from(t.time) * 1000);
    format!(
        "{}.{} ({})",
        t.time,
        t.increment,
        at.try_to_rfc3339_string().unwrap_or_default()
    )
}

/// What a stored point says about a snapshot in progress.
fn snapshot_text(point: &ResumePoint) -> Option<String> {
    let snap = point.token.as_raw().get_document("_snapshot").ok()?;
    let coll = snap.get_str("coll").unwrap_or("?");
    let after = snap
        .get("after")
        .ok()
        .flatten()
        .and_then(|v| bson::Bson::try_from(v).ok())
        .map_or_else(
            || "the start".to_owned(),
            |v| cdc_core::support::to_relaxed_json(v).to_string(),
        );
    Some(format!("in progress: collection {coll}, after _id {after}"))
}

/// The oplog's window and the point's headroom in it, for `cdc status`.
fn oplog_text(oplog: &Result<OplogView, String>, point: ClusterTime) -> String {
    match oplog {
        Ok(OplogView::Window(w)) => {
            let headroom = w.headroom_seconds(point);
            let share = w.headroom_share(point).map_or_else(String::new, |s| {
                format!(", {:.0}% of the window", s * 100.0)
            });
            let fallen = if w.holds(point) {
                ""
            } else {
                " (the point has fallen off: a resume from it fails)"
            };
            format!(
                "window {} s (oldest entry {}), headroom {headroom} s{share}{fallen}",
                w.window_seconds(),
                time_text(w.oldest)
            )
        }
        Ok(OplogView::Unreadable(why)) => format!("unknown: {why}"),
        Ok(OplogView::Empty) => "empty: no entry written yet".to_owned(),
        Ok(_) => "unknown".to_owned(),
        Err(e) => format!("unknown: the source did not answer: {e}"),
    }
}

fn oplog_json(oplog: &Result<OplogView, String>, point: ClusterTime) -> serde_json::Value {
    match oplog {
        Ok(OplogView::Window(w)) => serde_json::json!({
            "window_seconds": w.window_seconds(),
            "headroom_seconds": w.headroom_seconds(point),
            "oldest": { "t": w.oldest.time, "i": w.oldest.increment },
            "newest": { "t": w.newest.time, "i": w.newest.increment },
        }),
        Ok(OplogView::Unreadable(why)) => serde_json::json!({ "unreadable": why }),
        Ok(OplogView::Empty) => serde_json::json!({ "empty": true }),
        Ok(_) => serde_json::json!({ "unreadable": "unknown" }),
        Err(e) => serde_json::json!({ "error": e }),
    }
}

/// `cdc status`.
pub(crate) async fn status(cfg: &Config, json: bool) -> Result<ExitCode, BoxError> {
    let (processor, opened) = offline_processor(cfg).await?;
    let stores = &opened.stores;
    let mine = processor.stream_id().to_owned();
    let newest = async {
        let client = run::connect_source(cfg).await?;
        let scope = match (&cfg.source.database, &cfg.source.collection) {
            (Some(db), Some(coll)) => cdc_mongo::Scope::Collection {
                db: db.clone(),
                coll: coll.clone(),
            },
            (Some(db), None) => cdc_mongo::Scope::Database(db.clone()),
            _ => cdc_mongo::Scope::Deployment,
        };
        let source =
            cdc_mongo::MongoSource::new(client, scope, cdc_processor::SourceOptions::default());
        let newest = source.cluster_time().await?;
        let oplog = source.oplog().await?;
        Ok::<_, BoxError>((newest, oplog))
    };
    let (newest, oplog) = match tokio::time::timeout(Duration::from_secs(15), newest).await {
        Ok(Ok((t, oplog))) => (Ok(t), Ok(oplog)),
        Ok(Err(e)) => (Err(e.to_string()), Err(e.to_string())),
        Err(_) => (
            Err("no answer in 15 s".to_owned()),
            Err("no answer in 15 s".to_owned()),
        ),
    };
    let mut streams = stores.points.list_streams().await?;
    if !streams.contains(&mine) {
        streams.push(mine.clone());
    }
    streams.sort();
    let now_ms = bson::DateTime::now().timestamp_millis();
    let mut out = Vec::new();
    for stream in &streams {
        let point = stores.points.load(stream).await?;
        let lease = stores.leases.holder(stream).await?;
        let letters = stores.dead_letters.count(stream).await?;
        let mut entry = serde_json::json!({
            "stream": stream,
            "configured": *stream == mine,
            "dead_letters": letters,
        });
        if let Some(p) = &point {
            entry["point"] = serde_json::json!({
                "cluster_time": { "t": p.cluster_time.time, "i": p.cluster_time.increment },
                "saved_at": p.saved_at.try_to_rfc3339_string().unwrap_or_default(),
                "age_seconds": (now_ms - p.saved_at.timestamp_millis()).max(0) / 1000,
            });
            if let (Ok(Some(n)), true) = (&newest, *stream == mine) {
                entry["lag_seconds"] =
                    serde_json::json!(n.time.saturating_sub(p.cluster_time.time));
            }
            if let Some(s) = snapshot_text(p) {
                entry["snapshot"] = serde_json::json!(s);
            }
            if *stream == mine {
                entry["oplog"] = oplog_json(&oplog, p.cluster_time);
            }
        }
        if let Some(l) = &lease {
            entry["lease"] = serde_json::json!({
                "owner": l.owner, "token": l.token,
                "expires_in_ms": l.expires_at_ms - now_ms,
            });
        }
        if json {
            println!("{entry}");
            continue;
        }
        let mut text = format!(
            "stream {stream}{}\n",
            if *stream == mine { " (configured)" } else { "" }
        );
        match &point {
            Some(p) => {
                text.push_str(&format!(
                    "  point        {}, saved {} s ago\n",
                    time_text(p.cluster_time),
                    (now_ms - p.saved_at.timestamp_millis()).max(0) / 1000
                ));
                if *stream == mine {
                    match &newest {
                        Ok(Some(n)) => text.push_str(&format!(
                            "  lag          {} s behind the source ({})\n",
                            n.time.saturating_sub(p.cluster_time.time),
                            time_text(*n)
                        )),
                        Ok(None) => {
                            text.push_str("  lag          unknown (the source told no time)\n")
                        }
                        Err(e) => text.push_str(&format!(
                            "  lag          unknown: the source did not answer: {e}\n"
                        )),
                    }
                }
                if *stream == mine {
                    text.push_str(&format!(
                        "  oplog        {}\n",
                        oplog_text(&oplog, p.cluster_time)
                    ));
                }
                if let Some(s) = snapshot_text(p) {
                    text.push_str(&format!("  snapshot     {s}\n"));
                }
            }
            None => text.push_str("  point        none stored (starts from now, or a snapshot)\n"),
        }
        match &lease {
            Some(l) if l.expires_at_ms > now_ms => text.push_str(&format!(
                "  lease        held by {} (token {}), expires in {} ms\n",
                l.owner,
                l.token,
                l.expires_at_ms - now_ms
            )),
            Some(l) => text.push_str(&format!("  lease        free (last token {})\n", l.token)),
            None => text.push_str("  lease        none\n"),
        }
        text.push_str(&format!("  dead letters {letters}\n"));
        out.push(text);
    }
    if !json {
        print!("{}", out.join("\n"));
    }
    Ok(ExitCode::SUCCESS)
}

/// `cdc dead-letters list`.
pub(crate) async fn list_letters(
    cfg: &Config,
    limit: usize,
    json: bool,
) -> Result<ExitCode, BoxError> {
    let (processor, _) = offline_processor(cfg).await?;
    let letters = processor.dead_letters(limit).await?;
    if letters.is_empty() && !json {
        println!("no dead letters for stream {}", processor.stream_id());
    }
    for l in letters {
        let event = l.decode().ok();
        if json {
            let doc = bson::RawDocument::from_bytes(&l.event)
                .ok()
                .and_then(|r| bson::Document::try_from(r).ok())
                .map(|d| cdc_core::support::to_relaxed_json(bson::Bson::Document(d)));
            println!(
                "{}",
                serde_json::json!({
                    "id": l.id, "attempts": l.attempts, "parked": l.parked,
                    "errors": l.errors, "event": doc,
                    "recorded_at": l.recorded_at.try_to_rfc3339_string().unwrap_or_default(),
                })
            );
        } else {
            println!(
                "{}  {}  {}  key {}  attempts {}{}  last error: {}",
                l.id,
                time_text(l.cluster_time),
                event.as_ref().map_or("?", |e| e.operation_type.as_str()),
                event
                    .as_ref()
                    .and_then(ChangeEventExt::key_text)
                    .unwrap_or_else(|| "-".into()),
                l.attempts,
                if l.parked { " (parked)" } else { "" },
                l.errors.last().map_or("-", String::as_str)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

trait ChangeEventExt {
    fn key_text(&self) -> Option<String>;
}

impl ChangeEventExt for cdc_processor::ChangeEvent {
    fn key_text(&self) -> Option<String> {
        self.document_id()
            .map(|id| cdc_core::support::to_relaxed_json(id).to_string())
    }
}

/// `cdc dead-letters replay`.
pub(crate) async fn replay_letters(cfg: &Config) -> Result<ExitCode, BoxError> {
    let (processor, opened) = offline_processor(cfg).await?;
    let sink = run::build_sink(
        cfg,
        &opened,
        processor.stream_id(),
        false,
        Arc::new(Metrics::new(0)),
    )
    .await?;
    let report = processor.replay_dead_letters(sink).await?;
    println!(
        "replayed {} | failed again {} | held behind a failed one {}",
        report.replayed, report.failed, report.held
    );
    Ok(if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `cdc dead-letters delete`.
pub(crate) async fn delete_letters(
    cfg: &Config,
    ids: &[String],
    all: bool,
) -> Result<ExitCode, BoxError> {
    let (processor, _) = offline_processor(cfg).await?;
    let ids: Vec<String> = if all {
        processor
            .dead_letters(usize::MAX)
            .await?
            .into_iter()
            .map(|l| l.id)
            .collect()
    } else if ids.is_empty() {
        return Err("name the ids to delete, or give --all".into());
    } else {
        ids.to_vec()
    };
    let mut missing = 0;
    for id in &ids {
        if processor.delete_dead_letter(id).await? {
            println!("deleted {id}");
        } else {
            missing += 1;
            println!("no dead letter {id}");
        }
    }
    Ok(if missing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
