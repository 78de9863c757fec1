//! Prometheus metrics at `/metrics` (the `prometheus-client` crate's text format) and
//! health at `/healthz` (alive) and `/readyz` (stream open, lease held, sink reachable),
//! served by a small HTTP/1.1 responder on the metrics address.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use cdc_processor::{DocumentProcessor, Stats};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::run::CliSink;

/// What the sink wrapper and the sampler record.
#[derive(Debug)]
pub(crate) struct Metrics {
    latency: Histogram,
    sink_failures: Counter,
    nats_stored: AtomicU64,
    nats_duplicates: AtomicU64,
    nats_coalesced: AtomicU64,
    nats_objects: AtomicU64,
    /// When the process started (the checkpoint age before the first checkpoint).
    started: std::time::SystemTime,
    /// Events handled per second over the last sampling interval (as f64 bits).
    rate: AtomicU64,
    /// The newest reading of the oplog's window and the stored point's headroom.
    pub(crate) oplog: Arc<crate::oplog::OplogState>,
    /// `/readyz` fails while the headroom is below this (0: never).
    oplog_floor_s: u64,
}

impl Metrics {
    /// With `/readyz` failing while the oplog headroom is below `oplog_floor_s` (0: never).
    pub(crate) fn new(oplog_floor_s: u64) -> Self {
        Self {
            // 1 ms to ~16 s.
            latency: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            sink_failures: Counter::default(),
            nats_stored: AtomicU64::new(0),
            nats_duplicates: AtomicU64::new(0),
            nats_coalesced: AtomicU64::new(0),
            nats_objects: AtomicU64::new(0),
            started: std::time::SystemTime::now(),
            rate: AtomicU64::new(0),
            oplog: Arc::default(),
            oplog_floor_s,
        }
    }

    /// One batch handed to the sink: how long it took and whether it was taken.
    pub(crate) fn sink_batch(&self, took: Duration, ok: bool) {
        self.latency.observe(took.as_secs_f64());
        if !ok {
            self.sink_failures.inc();
        }
    }

    pub(crate) fn nats_counters(&self, stored: u64, duplicates: u64, coalesced: u64, objects: u64) {
        self.nats_objects.store(objects, Ordering::Relaxed);
        self.nats_stored.store(stored, Ordering::Relaxed);
        self.nats_duplicates.store(duplicates, Ordering::Relaxed);
        self.nats_coalesced.store(coalesced, Ordering::Relaxed);
    }

    /// Seconds since the newest checkpoint (since start when none yet).
    fn checkpoint_age(&self, stats: &Stats) -> f64 {
        stats
            .last_checkpoint_at
            .unwrap_or(self.started)
            .elapsed()
            .map_or(0.0, |d| d.as_secs_f64())
    }
}

/// Reads the processor's stats at each scrape.
#[derive(Debug)]
struct StatsCollector {
    processor: DocumentProcessor,
    metrics: Arc<Metrics>,
    sink: Arc<CliSink>,
    leased: bool,
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(m)
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(m)
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.processor.stats();
        let e = &mut encoder;
        {
            // The stream's id as a label of its own gauge, so that rules and dashboards
            // can group a stream's instances (`cdc_ready * on(instance) group_left(stream)
            // cdc_info`), and readiness as `/readyz` answers it.
            let stream = self.processor.stream_id();
            let mut family = e.encode_descriptor(
                "cdc_info",
                "Always 1: the stream this process handles, and its version",
                None,
                MetricType::Gauge,
            )?;
            let labels = [("stream", stream), ("version", env!("CARGO_PKG_VERSION"))];
            ConstGauge::new(1_i64).encode(family.encode_family(&labels)?)?;
        }
        {
            let ready = not_ready(&s, &self.sink, self.leased, &self.metrics).is_none();
            let mut family = e.encode_descriptor(
                "cdc_ready",
                "1 while /readyz answers 200 (stream open, lease held, sink taking batches, oplog headroom above its floor)",
                None,
                MetricType::Gauge,
            )?;
            let labels = [("stream", self.processor.stream_id())];
            ConstGauge::new(i64::from(ready)).encode(family.encode_family(&labels)?)?;
        }
        {
            let mut family = e.encode_descriptor(
                "cdc_events",
                "Changes handled by the sink, by operation type",
                None,
                MetricType::Counter,
            )?;
            for (op, n) in &s.events_by_type {
                let labels = [("operation", op.as_str())];
                ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }
        let rate = f64::from_bits(self.metrics.rate.load(Ordering::Relaxed));
        gauge(
            e,
            "cdc_events_per_second",
            "Changes handled per second (5 s sampling)",
            rate,
        )?;
        gauge(
            e,
            "cdc_lag_seconds",
            "Seconds the newest handled change is behind the newest position the stream reported",
            s.lag_seconds() as f64,
        )?;
        gauge(
            e,
            "cdc_lag_events",
            "Changes read from the stream and not handled yet",
            s.read_events
                .saturating_sub(s.events + s.skipped_events + s.dead_letters) as f64,
        )?;
        gauge(
            e,
            "cdc_checkpoint_age_seconds",
            "Seconds since the newest checkpoint was saved (since start before the first)",
            self.metrics.checkpoint_age(&s),
        )?;
        gauge(
            e,
            "cdc_checkpoint_lag_events",
            "Handled changes the newest checkpoint does not cover yet",
            s.checkpoint_lag_events as f64,
        )?;
        counter(e, "cdc_checkpoints", "Checkpoints saved", s.checkpoints)?;
        counter(
            e,
            "cdc_restarts",
            "Runs that failed and were started again",
            s.restarts,
        )?;
        counter(
            e,
            "cdc_dead_letters",
            "Changes recorded as dead letters by this process",
            s.dead_letters,
        )?;
        counter(
            e,
            "cdc_skipped_events",
            "Changes the sink kept failing on, skipped",
            s.skipped_events,
        )?;
        gauge(
            e,
            "cdc_stream_open",
            "1 while a change stream is open",
            f64::from(u8::from(s.stream_open)),
        )?;
        gauge(
            e,
            "cdc_lease_held",
            "1 while this process holds the stream's lease (or runs without leases)",
            f64::from(u8::from(!s.standby && s.stream_open)),
        )?;
        gauge(
            e,
            "cdc_lease_standby",
            "1 while another process holds the lease",
            f64::from(u8::from(s.standby)),
        )?;
        counter(
            e,
            "cdc_leases_acquired",
            "Times this process acquired the lease",
            s.leases_acquired,
        )?;
        if let Some(snap) = &s.snapshot {
            gauge(
                e,
                "cdc_snapshot_documents",
                "Documents the snapshot read",
                snap.documents as f64,
            )?;
            gauge(
                e,
                "cdc_snapshot_chunks_done",
                "Snapshot chunks read",
                snap.chunks_done as f64,
            )?;
            gauge(
                e,
                "cdc_snapshot_chunks_total",
                "Snapshot chunks planned (0: unknown)",
                snap.chunks_total as f64,
            )?;
            gauge(
                e,
                "cdc_snapshot_finished",
                "1 once the snapshot finished",
                f64::from(u8::from(snap.finished)),
            )?;
        }
        if let Some(reading) = self.metrics.oplog.latest() {
            gauge(
                e,
                "cdc_oplog_window_seconds",
                "Seconds of history the oplog holds (its newest entry's time less its oldest's)",
                f64::from(reading.window_s),
            )?;
            if let Some(headroom) = reading.headroom_s {
                gauge(
                    e,
                    "cdc_oplog_headroom_seconds",
                    "Seconds between the oplog's oldest entry and the stored point: about how long the point has before it falls off (negative: it has)",
                    headroom as f64,
                )?;
            }
        }
        counter(
            e,
            "cdc_nats_stored",
            "Messages JetStream stored",
            self.metrics.nats_stored.load(Ordering::Relaxed),
        )?;
        counter(
            e,
            "cdc_nats_duplicates",
            "Messages JetStream dropped as duplicates (changes published again)",
            self.metrics.nats_duplicates.load(Ordering::Relaxed),
        )?;
        counter(
            e,
            "cdc_nats_coalesced",
            "Changes not published because a later change of the same document in the same batch stood for them (sink.nats.coalesce)",
            self.metrics.nats_coalesced.load(Ordering::Relaxed),
        )?;
        counter(
            e,
            "cdc_nats_objects",
            "Changes over the NATS payload limit stored in the object store (sink.nats.oversized)",
            self.metrics.nats_objects.load(Ordering::Relaxed),
        )?;
        Ok(())
    }
}

/// The registry: the sink's latency and failures, and the processor's stats per scrape.
fn registry(
    metrics: &Arc<Metrics>,
    processor: &DocumentProcessor,
    sink: &Arc<CliSink>,
    leased: bool,
) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "cdc_sink_batch_seconds",
        "Time to hand one batch to the sink (a publish acknowledged, a transaction committed)",
        metrics.latency.clone(),
    );
    registry.register(
        "cdc_sink_failures",
        "Batches the sink failed to take",
        metrics.sink_failures.clone(),
    );
    registry.register_collector(Box::new(StatsCollector {
        processor: processor.clone(),
        metrics: Arc::clone(metrics),
        sink: Arc::clone(sink),
        leased,
    }));
    registry
}

/// Why `/readyz` says no, if it does.
fn not_ready(stats: &Stats, sink: &CliSink, leased: bool, metrics: &Metrics) -> Option<String> {
    let mut why = Vec::new();
    let low = crate::oplog::below_floor(&metrics.oplog, metrics.oplog_floor_s);
    if !stats.stream_open {
        why.push("no change stream open");
    }
    if leased && (stats.standby || stats.lease_token.is_none()) {
        why.push("the lease is not held (standing by)");
    }
    if !sink.reachable() {
        why.push("the sink is not reachable (its last batch failed or it is disconnected)");
    }
    if let Some(low) = &low {
        why.push(low);
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// Serves until the process ends.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    processor: DocumentProcessor,
    sink: Arc<CliSink>,
    leased: bool,
) {
    let registry = Arc::new(registry(&metrics, &processor, &sink, leased));
    {
        let (metrics, processor) = (Arc::clone(&metrics), processor.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            let mut last = (Instant::now(), processor.stats().events);
            loop {
                tick.tick().await;
                let events = processor.stats().events;
                let rate = (events - last.1.min(events)) as f64 / last.0.elapsed().as_secs_f64();
                metrics.rate.store(rate.to_bits(), Ordering::Relaxed);
                last = (Instant::now(), events);
            }
        });
    }
    // At most MAX_CONNECTIONS at once: the next is accepted only when one ends (the
    // kernel's backlog holds the rest), so slow or many clients never take the
    // descriptors the stream, the store and the sink need.
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (registry, processor, sink, metrics) = (
            Arc::clone(&registry),
            processor.clone(),
            Arc::clone(&sink),
            Arc::clone(&metrics),
        );
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = vec![0_u8; 4096];
            let mut len = 0;
            let read = tokio::time::timeout(IO_DEADLINE, async {
                while len < buf.len() {
                    let n = conn.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if head_end(&buf[..len]).is_some() {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let answer = match parse_request(&buf[..len]) {
                Err(status) => Answer::text(status, "bad request\n"),
                Ok((method, path)) => {
                    let mut answer = match path.as_str() {
                        "/metrics" => {
                            let mut text = String::new();
                            match prometheus_client::encoding::text::encode(&mut text, &registry) {
                                Ok(()) if wants_openmetrics(&buf[..len]) => Answer {
                                    status: "200 OK",
                                    kind: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                    body: text,
                                    allow: false,
                                    head_only: false,
                                },
                                Ok(()) => Answer {
                                    status: "200 OK",
                                    kind: "text/plain; version=0.0.4; charset=utf-8",
                                    body: prometheus_text(&text),
                                    allow: false,
                                    head_only: false,
                                },
                                Err(_) => {
                                    Answer::text("500 Internal Server Error", "encoding failed\n")
                                }
                            }
                        }
                        "/healthz" => Answer::text("200 OK", "ok\n"),
                        "/readyz" => match not_ready(&processor.stats(), &sink, leased, &metrics) {
                            None => Answer::text("200 OK", "ready\n"),
                            Some(why) => Answer::text(
                                "503 Service Unavailable",
                                &format!("not ready: {why}\n"),
                            ),
                        },
                        _ => Answer::text("404 Not Found", "try /metrics, /healthz or /readyz\n"),
                    };
                    match method.as_str() {
                        "GET" => {}
                        "HEAD" => answer.head_only = true,
                        _ => {
                            answer = Answer::text("405 Method Not Allowed", "GET or HEAD\n");
                            answer.allow = true;
                        }
                    }
                    answer
                }
            };
            let _ = tokio::time::timeout(IO_DEADLINE, async {
                conn.write_all(answer.bytes().as_slice()).await?;
                conn.shutdown().await
            })
            .await;
        });
    }
}

/// Connections served at once on the metrics address.
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send its request, or to take the answer.
const IO_DEADLINE: Duration = Duration::from_secs(5);

/// An HTTP answer.
#[derive(Debug)]
struct Answer {
    status: &'static str,
    kind: &'static str,
    body: String,
    /// An `Allow` header (a 405).
    allow: bool,
    /// A HEAD request: the headers only.
    head_only: bool,
}

impl Answer {
    fn text(status: &'static str, body: &str) -> Self {
        Self {
            status,
            kind: "text/plain; charset=utf-8",
            body: body.to_owned(),
            allow: false,
            head_only: false,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
            self.status,
            self.kind,
            self.body.len(),
            if self.allow {
                "Allow: GET, HEAD\r\n"
            } else {
                ""
            }
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// Where the request's head ends (after an empty line; bare LF line ends accepted, as
/// HTTP/1.1 allows).
fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2))
}

/// The method and path of an HTTP/1.x request head; `Err` with the status for anything
/// that is not one (`400 Bad Request`; `505` for another HTTP version). The target may be
/// in origin form (`/metrics?x`) or absolute form (`http://host:port/metrics`).
/// Whether the request's `Accept` header names OpenMetrics (as Prometheus's scrapes do).
fn wants_openmetrics(request: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(request) else {
        return false;
    };
    text.split('\n').skip(1).any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("accept")
                && value.contains("application/openmetrics-text")
        })
    })
}

/// The OpenMetrics text as Prometheus's own text format (0.0.4), for clients that do not
/// ask for OpenMetrics (`curl`, `promtool check metrics`): a counter's family is named
/// with its `_total` suffix there, `_created` samples and `# UNIT` lines do not exist, and
/// there is no `# EOF`.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        let kept = if line == "# EOF" || line.starts_with("# UNIT ") {
            None
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            Some(if counters.contains(name) {
                format!("# HELP {name}_total {help}")
            } else {
                line.to_owned()
            })
        } else if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|r| r.strip_suffix(" counter"))
        {
            Some(format!("# TYPE {name}_total counter"))
        } else if counters.iter().any(|c| {
            line.strip_prefix(c)
                .is_some_and(|r| r.starts_with("_created"))
        }) {
            None
        } else {
            Some(line.to_owned())
        };
        if let Some(line) = kept {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

fn parse_request(bytes: &[u8]) -> Result<(String, String), &'static str> {
    const BAD: &str = "400 Bad Request";
    head_end(bytes).ok_or(BAD)?;
    let text = std::str::from_utf8(bytes).map_err(|_| BAD)?;
    let line = text.split('\n').next().ok_or(BAD)?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BAD);
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(BAD);
    }
    match version {
        "HTTP/1.1" | "HTTP/1.0" => {}
        v if v.starts_with("HTTP/") => return Err("505 HTTP Version Not Supported"),
        _ => return Err(BAD),
    }
    let path = if let Some(rest) = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
    {
        rest.find('/').map_or("/", |i| &rest[i..])
    } else if target.starts_with('/') {
        target
    } else {
        return Err(BAD);
    };
    let path = path.split(['?', '#']).next().unwrap_or("/");
    Ok((method.to_owned(), path.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_prometheus_text_names_counters_with_their_suffix() {
        let open = "# HELP cdc_checkpoints Checkpoints saved.\n# TYPE cdc_checkpoints counter\ncdc_checkpoints_total 3\ncdc_checkpoints_created 1.7e9\n# HELP cdc_lag_seconds Lag.\n# TYPE cdc_lag_seconds gauge\n# UNIT cdc_lag_seconds seconds\ncdc_lag_seconds 0.5\n# EOF\n";
        assert_eq!(
            prometheus_text(open),
            "# HELP cdc_checkpoints_total Checkpoints saved.\n# TYPE cdc_checkpoints_total counter\ncdc_checkpoints_total 3\n# HELP cdc_lag_seconds Lag.\n# TYPE cdc_lag_seconds gauge\ncdc_lag_seconds 0.5\n"
        );
        let scrape = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n";
        assert!(wants_openmetrics(scrape));
        assert!(!wants_openmetrics(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        ));
        assert!(!wants_openmetrics(
            b"GET /application/openmetrics-text HTTP/1.1\r\n\r\n"
        ));
    }

    /// Hostile and odd requests: each a clear status, never a panic.
    #[test]
    fn requests_are_read_as_http_1_1_says() {
        let ok = |m: &str, p: &str| Ok((m.to_owned(), p.to_owned()));
        type Parsed = Result<(String, String), &'static str>;
        let cases: &[(&[u8], Parsed)] = &[
            (
                b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                ok("GET", "/metrics"),
            ),
            (b"HEAD /readyz HTTP/1.0\r\n\r\n", ok("HEAD", "/readyz")),
            // Bare LF line ends.
            (b"GET /healthz HTTP/1.1\nHost: x\n\n", ok("GET", "/healthz")),
            // Absolute form, a query.
            (
                b"GET http://127.0.0.1:9464/metrics?x=1 HTTP/1.1\r\n\r\n",
                ok("GET", "/metrics"),
            ),
            (b"GET http://h HTTP/1.1\r\n\r\n", ok("GET", "/")),
            (b"POST /metrics HTTP/1.1\r\n\r\n", ok("POST", "/metrics")),
            (
                b"GET /metrics HTTP/2.0\r\n\r\n",
                Err("505 HTTP Version Not Supported"),
            ),
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                Err("400 Bad Request"),
            ),
            (b"GET\r\n\r\n", Err("400 Bad Request")),
            (b"GET  /metrics HTTP/1.1\r\n\r\n", Err("400 Bad Request")),
            (b"GET metrics HTTP/1.1\r\n\r\n", Err("400 Bad Request")),
            (b"get /metrics HTTP/1.1\r\n\r\n", Err("400 Bad Request")),
            (b"GET /metrics HTTP/1.1\r\n", Err("400 Bad Request")),
            (b"", Err("400 Bad Request")),
        ];
        for (request, expected) in cases {
            assert_eq!(
                &parse_request(request),
                expected,
                "{:?}",
                String::from_utf8_lossy(request)
            );
        }
    }

    #[test]
    fn answers_are_well_formed() {
        let mut head = Answer::text("200 OK", "ok\n");
        head.head_only = true;
        let text = String::from_utf8(head.bytes()).unwrap();
        assert!(
            text.ends_with("Content-Length: 3\r\nConnection: close\r\n\r\n"),
            "{text}"
        );
        let mut refused = Answer::text("405 Method Not Allowed", "GET or HEAD\n");
        refused.allow = true;
        let text = String::from_utf8(refused.bytes()).unwrap();
        assert!(
            text.contains("\r\nAllow: GET, HEAD\r\n") && text.ends_with("GET or HEAD\n"),
            "{text}"
        );
    }
}
