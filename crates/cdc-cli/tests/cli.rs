//! The `cdc` program as users run it: a config file, mongo-sim as the source, the
//! binary in a child process. Run, metrics and health, SIGTERM with a final checkpoint,
//! resume, status, check, dead letters, help.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use bson::doc;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};

const CDC: &str = env!("CARGO_BIN_EXE_cdc");

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cdc-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_config(dir: &Path, uri: &str, extra: &str) -> PathBuf {
    let path = dir.join("cdc.toml");
    std::fs::write(
        &path,
        format!(
            "[source]\nuri = \"{uri}\"\ndatabase = \"shop\"\ncollection = \"orders\"\n\n[store]\nurl = \"file:{}\"\n\n{extra}",
            dir.join("state").display()
        ),
    )
    .unwrap();
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

fn cdc(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(CDC);
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn output(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = cdc(config, args).output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `shop.orders` collection of `sim`, which the configurations here watch.
async fn orders(sim: &mongo_sim::MongoSim) -> mongodb::Collection<bson::Document> {
    mongodb::Client::with_uri_str(sim.uri())
        .await
        .unwrap()
        .database("shop")
        .collection("orders")
}

/// Everything the (ended) child wrote on stderr.
async fn stderr_of(child: &mut Child) -> String {
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    err
}

fn terminate(child: &Child) {
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// Reads `n` lines of the child's stdout (30 s at most).
async fn lines(
    reader: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    n: usize,
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let line = tokio::time::timeout(Duration::from_secs(30), reader.next_line())
            .await
            .expect("a line within 30 s")
            .unwrap()
            .expect("the program ended early");
        out.push(serde_json::from_str(&line).unwrap());
    }
    out
}

#[tokio::test]
async fn run_serves_metrics_stops_on_sigterm_and_resumes() {
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let coll = orders(&sim).await;
    let d = dir("run");
    let port = free_port();
    let config = write_config(&d, &sim.uri(), "[sink]\ntype = \"stdout\"\n");

    let mut child = cdc(
        &config,
        &["run", "--metrics-addr", &format!("127.0.0.1:{port}")],
    )
    .spawn()
    .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    // Ready once the stream is open.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Ok(mut conn)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            drop(conn.shutdown().await);
            if http_get(port, "/readyz").await.0 == 200 {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http_get(port, "/healthz").await, (200, "ok\n".to_owned()));
    for i in 0..10_i64 {
        coll.insert_one(doc! { "_id": i, "v": i }).await.unwrap();
    }
    coll.delete_one(doc! { "_id": 3 }).await.unwrap();
    let got = lines(&mut out, 11).await;
    assert_eq!(got[0]["fullDocument"]["_id"], 0);
    assert_eq!(got[10]["operationType"], "delete");
    // The lines are out as soon as the batch is written; the counters follow when the
    // batch is acknowledged.
    let metrics = loop {
        let (status, metrics) = http_get(port, "/metrics").await;
        assert_eq!(status, 200);
        if metrics.contains("cdc_events_total{operation=\"delete\"} 1") {
            break metrics;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        metrics.contains("cdc_events_total{operation=\"insert\"} 10"),
        "{metrics}"
    );
    assert!(metrics.contains("cdc_events_total{operation=\"delete\"} 1"));
    assert!(metrics.contains("cdc_stream_open 1"), "{metrics}");
    assert!(metrics.contains("cdc_sink_batch_seconds_count"));
    assert_eq!(http_get(port, "/nope").await.0, 404);

    terminate(&child);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");

    // Stopped: status shows the point; changes made meanwhile come on the next run, and
    // nothing before them again.
    let (code, text, err) = output(&config, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("stream shop.orders (configured)"), "{text}");
    assert!(text.contains("dead letters 0"), "{text}");
    assert!(text.contains("behind the source"), "{text}");
    let (code, json, _) = output(&config, &["status", "--json"]).await;
    assert_eq!(code, 0);
    let entry: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(entry["stream"], "shop.orders");
    assert!(entry["point"]["cluster_time"]["t"].as_u64().unwrap() > 0);

    coll.insert_one(doc! { "_id": 100 }).await.unwrap();
    let mut child = cdc(&config, &["run"]).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let got = lines(&mut out, 1).await;
    assert_eq!(
        got[0]["fullDocument"]["_id"], 100,
        "resumed after the last one"
    );
    terminate(&child);
    assert!(child.wait().await.unwrap().success());
}

#[tokio::test]
async fn check_says_what_is_wrong_and_never_shows_secrets() {
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let d = dir("check");
    let config = write_config(&d, &sim.uri(), "[sink]\ntype = \"stdout\"\n");
    let (code, text, err) = output(&config, &["check"]).await;
    assert_eq!(code, 0, "{text}{err}");
    assert!(text.contains("ok    source"), "{text}");
    assert!(text.contains("replica set"), "{text}");

    // An unreachable sink: exit 1, the line names it; the password is not shown.
    let config = write_config(
        &d,
        &sim.uri(),
        "[sink]\ntype = \"nats\"\n[sink.nats]\nurl = \"nats://u:hunter2@127.0.0.1:1\"\n",
    );
    let (code, text, err) = output(&config, &["check"]).await;
    assert_eq!(code, 1, "{text}{err}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL  sink nats nats://u:***@127.0.0.1:1")),
        "{text}"
    );
    assert!(!text.contains("hunter2") && !err.contains("hunter2"));

    // A configuration error: exit 2, one line naming the key.
    let config = write_config(&d, &sim.uri(), "[sink]\ntype = \"stdout\"\nwindow = 3\n");
    let (code, _, err) = output(&config, &["check"]).await;
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("unknown key `sink.window`"), "{err}");
    // The environment overrides the file (and names the key when wrong).
    let mut cmd = cdc(&config, &["check"]);
    cmd.env("CDC_PROCESSING__CONCURRENCY", "lots");
    let out = cmd.output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`processing.concurrency`"));
    // A variable that is not UTF-8: ignored when not ours, named when ours.
    {
        use std::os::unix::ffi::OsStrExt;
        let bad = std::ffi::OsStr::from_bytes(b"\xff\xfe");
        let good = write_config(&d, &sim.uri(), "[sink]\ntype = \"stdout\"\n");
        let mut cmd = cdc(&good, &["check"]);
        cmd.env("X_NOT_UTF8", bad);
        let out = cmd.output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{text}");
        assert!(!text.contains("panicked"), "{text}");
        let mut cmd = cdc(&good, &["check"]);
        cmd.env("CDC_SOURCE__DATABASE", bad);
        let out = cmd.output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(
            text.contains("CDC_SOURCE__DATABASE") && text.contains("not UTF-8"),
            "{text}"
        );
    }
    // A missing file.
    let (code, _, err) = output(&d.join("nope.toml"), &["check"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("nope.toml"), "{err}");
}

/// A sink that refuses changes (NATS: over its payload limit) under `on_error =
/// "dead-letter"`: the changes become dead letters; `list` shows them, `replay` hands them
/// to a working sink (stdout) and removes them, `delete` deletes.
#[tokio::test]
async fn dead_letters_are_listed_replayed_and_deleted() {
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let coll = orders(&sim).await;
    let d = dir("letters");
    let port = free_port();
    let stream = format!("CDC_LETTERS_{}", std::process::id());
    let config = write_config(
        &d,
        &sim.uri(),
        &format!(
            "[dead_letters]\non_error = \"dead-letter\"\nretries = 0\n\n[sink]\ntype = \"nats\"\n[sink.nats]\nsubject = \"letters{}.{{db}}.{{coll}}.{{op}}\"\nstream = \"{stream}\"\ncreate_stream = true\n",
            std::process::id()
        ),
    );
    let mut child = cdc(
        &config,
        &["run", "--metrics-addr", &format!("127.0.0.1:{port}")],
    )
    .spawn()
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            drop(conn.shutdown().await);
            if http_get(port, "/metrics")
                .await
                .1
                .contains("cdc_stream_open 1")
            {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "never open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each over NATS's 1 MiB payload limit: refused by the server, the change's own fault.
    let pad = "x".repeat(1_200_000);
    for i in 0..3_i64 {
        coll.insert_one(doc! { "_id": i, "pad": &pad })
            .await
            .unwrap();
    }
    loop {
        let (_, metrics) = http_get(port, "/metrics").await;
        if metrics.contains("cdc_dead_letters_total 3") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    terminate(&child);
    assert!(child.wait().await.unwrap().success());
    let nats = cdc_sink::async_nats::connect("nats://127.0.0.1:4222")
        .await
        .unwrap();
    let _ = cdc_sink::async_nats::jetstream::new(nats)
        .delete_stream(&stream)
        .await;

    let (code, text, err) = output(&config, &["dead-letters", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        text.contains("insert") && text.contains("payload"),
        "{text}"
    );
    let first_id = text.split_whitespace().next().unwrap().to_owned();
    let (code, text, _) = output(&config, &["dead-letters", "delete", &first_id]).await;
    assert_eq!(code, 0);
    assert!(text.contains(&format!("deleted {first_id}")));
    let (code, text, err) = output(
        &config,
        &["dead-letters", "replay", "--set", "sink.type=stdout"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let mut printed = text.lines();
    let replayed: Vec<serde_json::Value> = printed
        .by_ref()
        .take(2)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(replayed[0]["fullDocument"]["_id"], 1);
    assert_eq!(replayed[1]["fullDocument"]["_id"], 2);
    assert!(text.contains("replayed 2 | failed again 0"), "{text}");
    let (_, text, _) = output(&config, &["dead-letters", "list"]).await;
    assert!(text.contains("no dead letters"), "{text}");
}

/// Two `cdc run` with `[lease]` on one stream: one is ready and handles, the other stands
/// by (not ready); `status` names the holder; killed, the holder is replaced by the
/// standby, which goes on from the stored point.
#[tokio::test]
async fn two_instances_with_a_lease_one_handles_the_other_takes_over() {
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let coll = orders(&sim).await;
    let d = dir("lease");
    let config = write_config(
        &d,
        &sim.uri(),
        "[lease]\nttl_ms = 600\n\n[sink]\ntype = \"stdout\"\n",
    );
    let ports = [free_port(), free_port()];
    let mut children = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let mut child = cdc(
            &config,
            &["run", "--metrics-addr", &format!("127.0.0.1:{port}")],
        )
        .env("CDC_LEASE__OWNER", format!("instance-{i}"))
        .spawn()
        .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap()).lines();
        children.push((child, out));
    }
    let ready = |port: u16| async move {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(mut c) => {
                drop(c.shutdown().await);
                http_get(port, "/readyz").await
            }
            Err(_) => (0, String::new()),
        }
    };
    // Exactly one becomes ready; the other says why not.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let holder = loop {
        let a = ready(ports[0]).await;
        let b = ready(ports[1]).await;
        match (a.0, b.0) {
            (200, 503) if b.1.contains("lease") => break 0,
            (503, 200) if a.1.contains("lease") => break 1,
            _ => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "{a:?} {b:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (code, text, _) = output(&config, &["status"]).await;
    assert_eq!(code, 0);
    assert!(
        text.contains(&format!("held by instance-{holder}")),
        "{text}"
    );
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();
    let got = lines(&mut children[holder].1, 1).await;
    assert_eq!(got[0]["fullDocument"]["_id"], 1);

    // The holder dies; the standby takes the stream and goes on after `_id` 1.
    children[holder].0.kill().await.unwrap();
    let other = 1 - holder;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ready(ports[other]).await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby never took over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    coll.insert_one(doc! { "_id": 2 }).await.unwrap();
    let got = lines(&mut children[other].1, 1).await;
    assert!(
        got[0]["fullDocument"]["_id"] == 1 || got[0]["fullDocument"]["_id"] == 2,
        "{got:?}"
    );
    terminate(&children[other].0);
    assert!(children[other].0.wait().await.unwrap().success());
}

#[tokio::test]
async fn every_command_has_complete_help() {
    for args in [
        vec!["--help"],
        vec!["check", "--help"],
        vec!["run", "--help"],
        vec!["status", "--help"],
        vec!["dead-letters", "--help"],
        vec!["dead-letters", "list", "--help"],
        vec!["dead-letters", "replay", "--help"],
        vec!["dead-letters", "delete", "--help"],
    ] {
        let out = Command::new(CDC).args(&args).output().await.unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        // Every option and command is described: on its line, or (long help) on the
        // lines below it, indented further.
        let all: Vec<&str> = text.lines().collect();
        for (i, line) in all.iter().enumerate() {
            let indent = line.len() - line.trim_start().len();
            let t = line.trim_start();
            let entry = (1..=6).contains(&indent)
                && (t.starts_with('-')
                    || (!t.is_empty() && text[..text.find(line).unwrap()].contains("Commands:")));
            if !entry {
                continue;
            }
            let same_line = t.split("  ").filter(|s| !s.trim().is_empty()).count() >= 2;
            let below = all.get(i + 1).is_some_and(|next| {
                next.len() - next.trim_start().len() > indent && !next.trim().is_empty()
            });
            assert!(same_line || below, "{args:?}: undescribed: {line}\n{text}");
        }
    }
}

/// No secret reaches stdout or stderr, whatever form the URL takes (a password with an
/// unencoded `/`, a token, a comma-separated NATS list, libpq key-value strings), wherever
/// it comes from (file, environment, `--set`, `url_file`) and at every log level — also
/// from the NATS client's own connect log during `run`.
#[tokio::test]
async fn no_secret_in_output_at_any_log_level() {
    const SECRET: &str = "s3cr/tPw";
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let d = dir("secrets");
    let url_file = d.join("url");
    let nats = |url: &str| {
        format!(
            "[sink]\ntype = \"nats\"\n[sink.nats]\nurl = \"{url}\"\nstream = \"CDC_SECRETS\"\ncreate_stream = true\n"
        )
    };
    let urls = [
        format!("nats://u:{SECRET}@127.0.0.1:4222"),
        format!("nats://{SECRET}@127.0.0.1:4222"),
        format!("nats://u:{SECRET}@127.0.0.1:4222,nats://u:{SECRET}@127.0.0.1:1"),
        format!("nats://u:{}@127.0.0.1:4222", SECRET.replace('/', "%2F")),
    ];
    let kv = format!("host=127.0.0.1 user=postgres password={SECRET} dbname=test");
    let quoted = format!("host=127.0.0.1 user=postgres password='{SECRET}' dbname=test");
    /// A config's sink section, the environment, extra arguments.
    type Case = (String, Vec<(String, String)>, Vec<String>);
    let mut cases: Vec<Case> = Vec::new();
    for url in &urls {
        cases.push((nats(url), vec![], vec![]));
        cases.push((
            nats("nats://127.0.0.1:4222"),
            vec![("CDC_SINK__NATS__URL".into(), url.clone())],
            vec![],
        ));
        cases.push((
            nats("nats://127.0.0.1:4222"),
            vec![],
            vec!["--set".into(), format!("sink.nats.url={url}")],
        ));
    }
    cases.push((
        format!("[sink]\ntype = \"postgres\"\n[sink.postgres]\nurl = \"{kv}\"\n"),
        vec![("CDC_STORE__URL".into(), String::new())],
        vec![],
    ));
    std::fs::write(&url_file, &quoted).unwrap();
    cases.push((
        format!(
            "[sink]\ntype = \"postgres\"\n[sink.postgres]\nurl_file = \"{}\"\n",
            url_file.display()
        ),
        vec![],
        vec![],
    ));
    cases.push((
        "[sink]\ntype = \"stdout\"\n".into(),
        vec![(
            "CDC_STORE__URL".into(),
            format!("postgres://postgres:{SECRET}@127.0.0.1:1/test"),
        )],
        vec![],
    ));
    cases.push((
        "[sink]\ntype = \"stdout\"\n".into(),
        vec![("CDC_STORE__URL".into(), kv.clone())],
        vec![],
    ));
    for (sink, env, args) in &cases {
        let config = write_config(&d, &sim.uri(), sink);
        for level in ["info", "debug", "trace"] {
            let mut all = vec!["check".to_owned(), "--log-level".into(), level.into()];
            all.extend(args.iter().cloned());
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            let mut cmd = cdc(&config, &refs);
            for (k, v) in env {
                if v.is_empty() {
                    cmd.env_remove(k);
                } else {
                    cmd.env(k, v);
                }
            }
            let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
                .await
                .expect("check ends")
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            for form in [SECRET, "s3cr%2FtPw", "s3cr%2ftPw", "s3cr"] {
                assert!(
                    !text.contains(form),
                    "{sink} {env:?} {args:?} at {level}: {text}"
                );
            }
        }
    }

    // `run` at trace: the NATS client connects with the credentials (the local server
    // takes any) and logs its connection attempts; none shows them.
    let encoded = SECRET.replace('/', "%2F");
    for url in [
        format!("nats://u:{encoded}@127.0.0.1:4222"),
        format!("nats://{encoded}@127.0.0.1:4222"),
    ] {
        let config = write_config(&d, &sim.uri(), &nats(&url));
        let mut child = cdc(&config, &["run", "--log-level", "trace"])
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        terminate(&child);
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("run stops");
        assert!(out.is_ok());
        let err = stderr_of(&mut child).await;
        assert!(err.contains("cdc::run: stopped"), "{err}");
        assert!(!err.contains("s3cr"), "{err}");
    }
}

/// Waits until process `pid` catches SIGTERM and SIGHUP (`SigCgt` in its status).
async fn catching_signals(pid: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .unwrap_or(0);
        // Bit n-1 for signal n: SIGHUP 1, SIGTERM 15.
        if caught & (1 << 14) != 0 && caught & 1 != 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cdc never caught the signals"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Stops in every phase are graceful: 50 starts of `cdc run` under a writer, each ended by
/// SIGTERM (or SIGHUP, every fifth) at a random moment — during start-up, while the first
/// batches flow, later. Each exits 0 at once, and nothing on stderr says `panicked` (the
/// driver's cursor clean-up once panicked on a runtime that went away first).
#[tokio::test]
async fn fifty_stops_at_random_moments_exit_cleanly() {
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let d = dir("stops");
    let config = write_config(
        &d,
        &sim.uri(),
        "[sink]\ntype = \"stdout\"\n[processing]\nmax_batch_wait_ms = 600000\n",
    );
    let coll = orders(&sim).await;
    let writing = tokio::spawn(async move {
        let mut i = 0_i64;
        loop {
            let _ = coll.insert_one(doc! { "_id": i, "v": 1 }).await;
            let _ = coll
                .update_one(doc! { "_id": i / 2 }, doc! { "$inc": { "v": 1 } })
                .await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let mut rng = 0x2545_F491_4F6C_DD1D_u64;
    for round in 0..50 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Standard output is not read here: it goes nowhere.
        let mut child = cdc(&config, &["run"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // From the moment it catches the signals (its first milliseconds, before it reads
        // its configuration; earlier the kernel's default ends it), at a random moment.
        catching_signals(child.id().unwrap()).await;
        tokio::time::sleep(Duration::from_millis(rng % 1500)).await;
        let signal = if round % 5 == 4 { "-HUP" } else { "-TERM" };
        let pid = child.id().unwrap().to_string();
        assert!(
            std::process::Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .unwrap_or_else(|_| panic!("round {round}: {signal} not honoured within 30 s"))
            .unwrap();
        let err = stderr_of(&mut child).await;
        assert_eq!(status.code(), Some(0), "round {round} ({signal}): {err}");
        assert!(!err.contains("panicked"), "round {round} ({signal}): {err}");
    }
    writing.abort();
}

/// Messages and exit codes (a table): each configuration mistake is exit 2 with a line
/// naming the key, found by `check` and by `run` alike; a server that stalls is a FAIL
/// line within check's deadline; `check` and `run` connect to PostgreSQL the same way (a
/// URL that demands TLS fails both, with the same words).
#[tokio::test]
async fn mistakes_are_named_with_the_right_exit_code() {
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let d = dir("mistakes");
    let stdout_sink = "[sink]\ntype = \"stdout\"\n";
    // (extra config, --set overrides, what the message says)
    let cases: &[(&str, &[&str], &str)] = &[
        (stdout_sink, &["source.uri=\"\""], "`source.uri` is empty"),
        (stdout_sink, &["store.url=\"\""], "`store.url` is empty"),
        (
            "[sink]\ntype = \"nats\"\n[sink.nats]\nurl = \"\"\n",
            &[],
            "`sink.nats.url` is empty",
        ),
        (
            stdout_sink,
            &["sink.type=1"],
            "`sink.type`: expected a string",
        ),
        (
            "[sink]\ntype = \"stdout\"\n",
            &["sink.nats.window=9223372036854775807"],
            "`sink.nats.window` is 9223372036854775807: it must be from 1 to 65536",
        ),
        (
            stdout_sink,
            &["source.pipeline=[{ \"$bogusStage\" = 1 }]"],
            "`source.pipeline`: the server refuses it",
        ),
    ];
    for (extra, sets, says) in cases {
        let config = write_config(&d, &sim.uri(), extra);
        for command in ["check", "run"] {
            let mut args = vec![command];
            for s in *sets {
                args.push("--set");
                args.push(s);
            }
            let out = tokio::time::timeout(
                Duration::from_secs(60),
                cdc(&config, &args).stdout(Stdio::piped()).output(),
            )
            .await
            .unwrap_or_else(|_| panic!("{command} {sets:?}: no end"))
            .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                out.status.code(),
                Some(2),
                "{command} {extra} {sets:?}: {text}"
            );
            assert!(text.contains(says), "{command} {sets:?}: {text}");
        }
    }

    // A PostgreSQL server that accepts and then says nothing: check's line says so
    // within its deadline (exit 1).
    let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = stalled.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = stalled.accept().await {
            held.push(conn);
        }
    });
    let pg_config = d.join("pg.toml");
    std::fs::write(
        &pg_config,
        format!(
            "[source]\nuri = \"{}\"\ndatabase = \"shop\"\ncollection = \"orders\"\n[sink]\ntype = \"postgres\"\n[sink.postgres]\nurl = \"postgres://postgres@127.0.0.1:{port}/test\"\n",
            sim.uri()
        ),
    )
    .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        cdc(&pg_config, &["check"]).output(),
    )
    .await
    .expect("check ends within its deadlines")
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL  store (the PostgreSQL sink's database)"),
        "{text}"
    );
    assert!(text.contains("within"), "{text}");
    hold.abort();

    // TLS demanded from the local server (which has none): check and run fail alike.
    std::fs::write(
        &pg_config,
        format!(
            "[source]\nuri = \"{}\"\ndatabase = \"shop\"\ncollection = \"orders\"\n[sink]\ntype = \"postgres\"\n[sink.postgres]\nurl = \"postgres://postgres@127.0.0.1:5432/test?sslmode=require\"\n",
            sim.uri()
        ),
    )
    .unwrap();
    let check = cdc(&pg_config, &["check"]).output().await.unwrap();
    let check_text = String::from_utf8_lossy(&check.stdout).into_owned();
    assert_eq!(check.status.code(), Some(1), "{check_text}");
    let run = tokio::time::timeout(Duration::from_secs(60), cdc(&pg_config, &["run"]).output())
        .await
        .expect("run ends")
        .unwrap();
    let run_text = String::from_utf8_lossy(&run.stderr).into_owned();
    assert_eq!(run.status.code(), Some(1), "{run_text}");
    // The same refusal, in the same words (the local server's certificate is its own, or
    // it has no TLS at all).
    let refusal = |text: &str| {
        text.lines()
            .find_map(|l| l.split_once("postgres://").map(|(_, r)| r.to_owned()))
            .unwrap_or_default()
    };
    assert!(
        refusal(&check_text).contains("TLS") || refusal(&check_text).contains("tls"),
        "check: {check_text}"
    );
    assert_eq!(
        refusal(&check_text),
        refusal(&run_text),
        "check: {check_text}\nrun: {run_text}"
    );
}

/// Many slow clients on the metrics address cannot starve the process: `cdc` runs with a
/// limit of 256 descriptors while 600 clients connect and say nothing; changes still flow
/// and are checkpointed, the process never holds more than its cap of connections, and
/// the endpoint answers again once the slow ones are gone.
#[tokio::test]
async fn slow_metrics_clients_cannot_starve_the_process() {
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let coll = orders(&sim).await;
    let d = dir("slow-clients");
    let port = free_port();
    let config = write_config(
        &d,
        &sim.uri(),
        "[sink]\ntype = \"stdout\"\n[checkpoint]\nevery_events = 1\nevery_ms = 10\n",
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 256 && exec \"$0\" \"$@\"")
        .arg(CDC)
        .args(["run", "--config"])
        .arg(&config)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
            && http_get(port, "/readyz").await.0 == 200
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut slow = Vec::new();
    for _ in 0..600 {
        if let Ok(Ok(c)) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            slow.push(c);
        }
    }
    for i in 0..50_i64 {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
    }
    let got = lines(&mut out, 50).await;
    assert_eq!(got[49]["fullDocument"]["_id"], 49);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert!(fds < 200, "{fds} descriptors open");
    drop(slow);
    // Served again (the slow ones time out or are gone).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while http_get(port, "/healthz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline);
    }
    terminate(&child);
    let status = child.wait().await.unwrap();
    let err = stderr_of(&mut child).await;
    assert!(status.success(), "{err}");
    assert!(!err.contains("Too many open files"), "{err}");
    assert!(
        !err.contains("restarting") && !err.contains("ERROR"),
        "{err}"
    );
    // The last change is checkpointed: a new run starts after it.
    coll.insert_one(doc! { "_id": 1000 }).await.unwrap();
    let mut child = cdc(&config, &["run"]).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines(&mut out, 1).await[0]["fullDocument"]["_id"], 1000);
    terminate(&child);
    assert!(child.wait().await.unwrap().success());
}

/// `cdc run | head -1`: once the reader of the pipe is gone, `cdc` stops with a clear
/// message (exit 1), and what was not written is not checkpointed past.
#[tokio::test]
async fn a_closed_pipe_stops_the_run_with_a_clear_message() {
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let coll = orders(&sim).await;
    let d = dir("closed-pipe");
    let config = write_config(
        &d,
        &sim.uri(),
        "[sink]\ntype = \"stdout\"\n[dead_letters]\non_error = \"skip\"\n",
    );
    let mut child = cdc(&config, &["run"]).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut i = 0_i64;
    // The first line read (the stream is open), then the reader goes away.
    let first = loop {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
        i += 1;
        if let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_millis(200), out.next_line()).await
        {
            break line;
        }
        assert!(tokio::time::Instant::now() < deadline, "no line");
    };
    assert!(first.contains("\"insert\""), "{first}");
    drop(out);
    for j in i..i + 20 {
        coll.insert_one(doc! { "_id": j }).await.unwrap();
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the run ends when its pipe is closed")
        .unwrap();
    let err = stderr_of(&mut child).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("standard output was closed"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Even with on_error = "skip", nothing unwritten was skipped: a new run writes the
    // last change.
    let mut child = cdc(&config, &["run"]).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut ids = Vec::new();
    while !ids.contains(&(i + 19)) {
        let line = lines(&mut out, 1).await;
        ids.push(line[0]["fullDocument"]["_id"].as_i64().unwrap());
    }
    terminate(&child);
    assert!(child.wait().await.unwrap().success());
}

/// The scrape of `/metrics` on `port`, or `None` while nothing listens there yet.
async fn metrics_if_up(port: u16) -> Option<String> {
    let mut conn = tokio::time::timeout(
        Duration::from_millis(200),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .ok()?
    .ok()?;
    drop(conn.shutdown().await);
    Some(http_get(port, "/metrics").await.1)
}

/// A child's output lines, as [`collect`] reads them.
type Collected = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Reads a child's output into lines as they come.
fn collect(out: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> Collected {
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = std::sync::Arc::clone(&lines);
    tokio::spawn(async move {
        let mut out = BufReader::new(out).lines();
        while let Ok(Some(line)) = out.next_line().await {
            into.lock().unwrap().push(line);
        }
    });
    lines
}

/// `cdc <args>` started, its standard output and error read into lines as they come.
fn spawn_collected(config: &Path, args: &[&str]) -> (Child, Collected, Collected) {
    let mut child = cdc(config, args).spawn().unwrap();
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    (child, out, err)
}

/// Waits until a line of `lines` contains `text` (failing the test, with what was
/// written, after `within`); returns everything written so far.
async fn until_logged(lines: &Collected, text: &str, within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let log = lines.lock().unwrap().join("\n");
        if log.contains(text) {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "`{text}` not written within {within:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of a gauge without labels in a scrape.
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A stored point held back (checkpoints a day apart) while writes roll a small oplog:
/// the headroom gauge shrinks, `/readyz` fails below its floor, the log warns, then says
/// the point fell off, `cdc status` shows both figures, and only then does a restart
/// fail with the history lost.
#[tokio::test]
async fn the_oplog_headroom_is_served_and_warned_of_before_the_history_is_lost() {
    // 64 entries at under ten writes a second: a window of several seconds.
    let sim = mongo_sim::MongoSim::start_with(mongo_sim::SimOptions {
        oplog_capacity: 64,
        ..mongo_sim::SimOptions::default()
    })
    .await
    .unwrap();
    let coll = orders(&sim).await;
    for i in 0..10 {
        coll.insert_one(doc! { "_id": -1 - i }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let d = dir("oplog");
    let port = free_port();
    let config = write_config(
        &d,
        &sim.uri(),
        "[sink]\ntype = \"stdout\"\n\n[checkpoint]\nevery_events = 10000000\nevery_ms = 86400000\n\n[oplog]\ncheck_every_ms = 200\nready_floor_s = 2\n",
    );
    let (mut child, _out, err) = spawn_collected(
        &config,
        &["run", "--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut headrooms = Vec::new();
    let mut refused_ready = None;
    let mut i = 0;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{headrooms:?} {:?}",
            err.lock().unwrap()
        );
        coll.insert_one(doc! { "_id": i }).await.unwrap();
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(metrics) = metrics_if_up(port).await else {
            continue;
        };
        let (Some(window), Some(headroom)) = (
            gauge(&metrics, "cdc_oplog_window_seconds"),
            gauge(&metrics, "cdc_oplog_headroom_seconds"),
        ) else {
            continue;
        };
        assert!(window >= 0.0);
        headrooms.push(headroom);
        let (status, why) = http_get(port, "/readyz").await;
        if headroom < 2.0 && status == 503 && refused_ready.is_none() {
            refused_ready = Some(why);
        }
        if headroom < 0.0 {
            break;
        }
    }
    assert!(headrooms.windows(2).all(|w| w[1] <= w[0]), "{headrooms:?}");
    assert!(headrooms[0] >= 2.0, "{headrooms:?}");
    let why = refused_ready.expect("/readyz failed below the floor");
    assert!(
        why.contains("oplog headroom") && why.contains("ready_floor_s"),
        "{why}"
    );
    // The warning, then (once the point fell off) the error, in that order.
    let within = deadline.saturating_duration_since(tokio::time::Instant::now());
    let log = until_logged(&err, "fallen off the oplog", within).await;
    let warned = log.find("close to falling off the oplog").expect(&log);
    assert!(warned < log.find("fallen off the oplog").unwrap(), "{log}");
    child.kill().await.unwrap();

    let (code, text, e) = output(&config, &["status"]).await;
    assert_eq!(code, 0, "{e}");
    assert!(text.contains("  oplog        window "), "{text}");
    assert!(text.contains("the point has fallen off"), "{text}");
    let (_, json, _) = output(&config, &["status", "--json"]).await;
    let entry: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert!(
        entry["oplog"]["headroom_seconds"].as_i64().unwrap() < 0,
        "{entry}"
    );
    // The restart from the held-back point: the history is lost, as the figures said.
    let (code, _, e) = output(&config, &["run"]).await;
    assert_ne!(code, 0);
    assert!(
        e.contains("ChangeStreamHistoryLost") || e.contains("history"),
        "{e}"
    );
    sim.shutdown().await;
}

/// The `cdc_…` names an expression text uses (as written: a histogram's `_bucket`).
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("cdc_") {
        let before = rest[..at].chars().last();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The Grafana dashboard and the alert rules under `deploy/` are built on what `cdc run`
/// serves: every `cdc_…` name their expressions use is in a live scrape (a snapshot, a
/// few changes and the oplog read, so that every family is there).
#[tokio::test]
async fn the_dashboard_and_alert_rules_use_only_the_metrics_cdc_serves() {
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let coll = orders(&sim).await;
    for i in 0..5 {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
    }
    let d = dir("deploy");
    let port = free_port();
    let config = write_config(
        &d,
        &sim.uri(),
        "[sink]\ntype = \"stdout\"\n\n[snapshot]\nmode = \"initial\"\n\n[oplog]\ncheck_every_ms = 100\n",
    );
    let (mut child, _out, _err) = spawn_collected(
        &config,
        &["run", "--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut i = 100;
    let served = loop {
        coll.insert_one(doc! { "_id": i }).await.unwrap();
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let wanted = [
            "cdc_oplog_headroom_seconds ",
            "cdc_snapshot_finished 1",
            "cdc_events_total{operation=\"insert\"}",
        ];
        if let Some(metrics) = metrics_if_up(port).await
            && wanted.iter().all(|w| metrics.contains(w))
        {
            break metrics;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "every family never showed"
        );
    };
    let names: std::collections::HashSet<&str> = served
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/cdc-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["definition"].as_str() {
            exprs.push(q.to_owned());
        }
    }
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/cdc-alerts.yml")).unwrap();
    exprs.extend(
        rules
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr:"))
            .map(str::to_owned),
    );
    assert!(exprs.len() > 20, "{exprs:?}");
    let mut used = std::collections::BTreeSet::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            assert!(
                names.contains(name.as_str()),
                "`{name}` (in `{expr}`) is not served:\n{served}"
            );
            used.insert(name);
        }
    }
    // What the issue asks the dashboard to show is on it.
    for wanted in [
        "cdc_events_total",
        "cdc_lag_seconds",
        "cdc_oplog_headroom_seconds",
        "cdc_checkpoint_age_seconds",
        "cdc_sink_batch_seconds_bucket",
        "cdc_dead_letters_total",
        "cdc_lease_held",
    ] {
        assert!(used.contains(wanted), "{wanted} is on no panel or rule");
    }
    child.kill().await.unwrap();
    sim.shutdown().await;
}

/// `[transform]` in `cdc`: dropped fields never reach the output (in the images and in an
/// update's fields), hashed ones arrive as their keyed hash, a left-out namespace reaches
/// no sink while the stored point moves past it, and the key is never printed.
#[tokio::test]
async fn fields_are_dropped_and_hashed_and_namespaces_left_out_before_the_sink() {
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(sim.uri()).await.unwrap();
    let shop = client.database("shop");
    let users = shop.collection::<bson::Document>("users");
    let audit = shop.collection::<bson::Document>("audit");
    let d = dir("transform");
    let path = d.join("cdc.toml");
    std::fs::write(
        &path,
        format!(
            "[source]\nuri = \"{}\"\ndatabase = \"shop\"\n\n[store]\nurl = \"file:{}\"\n\n[sink]\ntype = \"stdout\"\ndocument_mode = \"both\"\n\n[transform]\nexclude = [\"ssn\", \"card.number\"]\nhash = [\"email\"]\nexclude_ns = [\"shop.audit\"]\n",
            sim.uri(),
            d.join("state").display()
        ),
    )
    .unwrap();
    let key = "k3y-of-twenty-bytes!";
    // Without the key: a configuration error naming what is missing.
    let (code, _, e) = output(&path, &["check"]).await;
    assert_eq!(code, 2, "{e}");
    assert!(e.contains("`transform.hash` needs a key"), "{e}");

    let mut child = cdc(&path, &["run", "--log-level", "trace"])
        .env("CDC_TRANSFORM__HASH_KEY", key)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let err = collect(child.stderr.take().unwrap());
    until_logged(&err, "opening the change stream", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    users
        .insert_one(
            doc! { "_id": 1, "email": "ann@example.com", "ssn": "078-05-1120",
            "card": { "number": "4111111111111111", "exp": "12/30" }, "name": "Ann" },
        )
        .await
        .unwrap();
    users
        .update_one(
            doc! { "_id": 1 },
            doc! { "$set": { "card.number": "5500005555555559", "email": "ann@example.org" } },
        )
        .await
        .unwrap();
    audit
        .insert_one(doc! { "_id": 1, "who": "AUDIT-ROW" })
        .await
        .unwrap();
    users
        .insert_one(doc! { "_id": 2, "name": "Bo" })
        .await
        .unwrap();
    let got = lines(&mut out, 3).await;
    let text: String = got.iter().map(ToString::to_string).collect();
    for secret in [
        "078-05-1120",
        "4111111111111111",
        "5500005555555559",
        "ann@example",
        "AUDIT-ROW",
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    let insert = &got[0]["fullDocument"];
    assert_eq!(insert["name"], "Ann");
    assert_eq!(insert["card"], serde_json::json!({ "exp": "12/30" }));
    assert_eq!(insert["email"].as_str().unwrap().len(), 64);
    let set = &got[1]["updateDescription"]["updatedFields"];
    assert!(set.get("card.number").is_none(), "{set}");
    assert_eq!(set["email"].as_str().unwrap().len(), 64);
    assert_ne!(
        set["email"], insert["email"],
        "another address, another hash"
    );
    assert_eq!(
        got[2]["documentKey"]["_id"], 2,
        "the audit insert is left out"
    );

    // Only a left-out change after that: the point still moves past it.
    let mut session = client.start_session().await.unwrap();
    audit
        .insert_one(doc! { "_id": 2 })
        .session(&mut session)
        .await
        .unwrap();
    let last = session.operation_time().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    terminate(&child);
    assert!(child.wait().await.unwrap().success());
    let log = err.lock().unwrap().join("\n");
    assert!(!log.contains(key), "the key was printed");
    let status = cdc(&path, &["status", "--json"])
        .env("CDC_TRANSFORM__HASH_KEY", key)
        .output()
        .await
        .unwrap();
    let json = String::from_utf8_lossy(&status.stdout);
    let entry: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    let t = &entry["point"]["cluster_time"];
    let saved = (t["t"].as_u64().unwrap(), t["i"].as_u64().unwrap());
    assert!(
        saved >= (u64::from(last.time), u64::from(last.increment)),
        "{saved:?} before {last:?}"
    );
    sim.shutdown().await;
}

/// `sink.document_mode`: an update line carries the post-image only (`full`), the delta
/// only (`delta`) or both (`both`, the default); the settings that contradict each other
/// are configuration errors.
#[tokio::test]
async fn update_changes_carry_the_post_image_the_delta_or_both() {
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let coll = orders(&sim).await;
    for (i, mode) in ["full", "delta", "both", "left out"]
        .into_iter()
        .enumerate()
    {
        let d = dir(&format!("mode-{i}"));
        let line = if mode == "left out" {
            String::new()
        } else {
            format!("document_mode = \"{mode}\"\n")
        };
        let config = write_config(
            &d,
            &sim.uri(),
            &format!("[sink]\ntype = \"stdout\"\n{line}"),
        );
        let mut child = cdc(&config, &["run"]).spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let err = collect(child.stderr.take().unwrap());
        until_logged(&err, "opening the change stream", Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let id = i32::try_from(i).unwrap();
        coll.insert_one(doc! { "_id": id, "n": 0, "gone": 1 })
            .await
            .unwrap();
        coll.update_one(
            doc! { "_id": id },
            doc! { "$set": { "n": 1 }, "$unset": { "gone": "" } },
        )
        .await
        .unwrap();
        let got = lines(&mut out, 2).await;
        assert_eq!(got[0]["fullDocument"]["n"], 0, "{mode}: an insert is whole");
        let update = &got[1];
        let (post, delta) = (update.get("fullDocument"), update.get("updateDescription"));
        match mode {
            "full" => assert!(post.is_some() && delta.is_none(), "{update}"),
            "delta" => {
                assert!(post.is_none(), "{update}");
                assert_eq!(delta.unwrap()["updatedFields"]["n"], 1);
                assert_eq!(delta.unwrap()["removedFields"][0], "gone");
            }
            _ => assert!(post.is_some() && delta.is_some(), "{update}"),
        }
        terminate(&child);
        assert!(child.wait().await.unwrap().success());
    }
    let d = dir("mode-bad");
    for (extra, says) in [
        (
            "[source]\nfull_document = \"default\"\n",
            "`sink.document_mode = \"full\"` sends updates' post-images",
        ),
        (
            "[sink.nats]\ncoalesce = true\n",
            "`sink.nats.coalesce` keeps a document's last change only",
        ),
    ] {
        // The [source] table is the file's own: override through --set instead.
        let (sink, set) = if extra.starts_with("[source]") {
            (
                "[sink]\ntype = \"stdout\"\ndocument_mode = \"full\"\n".to_owned(),
                vec!["--set", "source.full_document=default"],
            )
        } else {
            (
                format!("[sink]\ntype = \"nats\"\ndocument_mode = \"delta\"\n\n{extra}"),
                vec![],
            )
        };
        let config = write_config(&d, &sim.uri(), &sink);
        let mut args = vec!["check"];
        args.extend(set);
        let (code, _, e) = output(&config, &args).await;
        assert_eq!(code, 2, "{e}");
        assert!(e.contains(says), "{e}");
    }
    sim.shutdown().await;
}

/// The local NATS server, or `None` (the test skipped, said on stderr) when it does not
/// answer; under `CI=true` it must.
async fn nats_or_skip() -> Option<cdc_sink::async_nats::Client> {
    match cdc_sink::async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect("nats://127.0.0.1:4222")
        .await
    {
        Ok(nats) => Some(nats),
        Err(e) => {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "NATS is unreachable under CI=true: {e}"
            );
            eprintln!("SKIPPED: NATS unreachable ({e})");
            None
        }
    }
}

/// How many messages JetStream stream `stream` holds (0 before it exists).
async fn stream_messages(js: &cdc_sink::async_nats::jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map_or(0, |i| i.state.messages),
        Err(_) => 0,
    }
}

/// `sink.nats.coalesce`: changes of one document that arrive in one batch (written while
/// `cdc` was stopped) are published as one message, the last change, and every change is
/// either published or counted in `cdc_nats_coalesced_total`.
#[tokio::test]
async fn coalesced_changes_reach_jetstream_as_the_documents_last_state() {
    let Some(nats) = nats_or_skip().await else {
        return;
    };
    let js = cdc_sink::async_nats::jetstream::new(nats);
    let tag = format!("{}{}", std::process::id(), free_port());
    let stream = format!("CDC_COALESCE_{tag}");
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let coll = orders(&sim).await;
    let d = dir("coalesce");
    let port = free_port();
    let config = write_config(
        &d,
        &sim.uri(),
        &format!(
            "[sink]\ntype = \"nats\"\n\n[sink.nats]\nstream = \"{stream}\"\nsubject = \"c{tag}.{{db}}.{{coll}}.{{op}}\"\ncreate_stream = true\ncoalesce = true\n"
        ),
    );
    // A first run publishes one insert and saves its point.
    let (mut child, _out, _err) = spawn_collected(&config, &["run"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    while stream_messages(&js, &stream).await < 1 {
        // Until the stream is open, inserts may come before it: one more each round.
        coll.insert_one(doc! { "_id": 1000 + i, "v": 0 })
            .await
            .unwrap();
        i += 1;
        assert!(tokio::time::Instant::now() < deadline, "nothing stored");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    terminate(&child);
    assert!(child.wait().await.unwrap().success());
    let before = stream_messages(&js, &stream).await;
    // While it is stopped: 30 updates of one document, and another document.
    coll.insert_one(doc! { "_id": 1, "v": 0 }).await.unwrap();
    for v in 1..=30 {
        coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "v": v } })
            .await
            .unwrap();
    }
    coll.insert_one(doc! { "_id": 2, "v": 0 }).await.unwrap();
    let (mut child, _out, _err) = spawn_collected(
        &config,
        &["run", "--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    // 32 changes: each one stored as a message or coalesced into a later one.
    let (published, coalesced) = loop {
        assert!(tokio::time::Instant::now() < deadline + Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(metrics) = metrics_if_up(port).await else {
            continue;
        };
        let coalesced = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix("cdc_nats_coalesced_total ")?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0);
        let published = stream_messages(&js, &stream).await - before;
        if published + coalesced == 32 {
            break (published, coalesced);
        }
    };
    assert!(coalesced > 0, "nothing coalesced: {published} published");
    // The newest message of document 1 is its last state.
    let s = js.get_stream(&stream).await.unwrap();
    let mut last_v = None;
    let mut said = None;
    for seq in (before + 1)..=(before + published) {
        let m = s.get_raw_message(seq).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        if body["documentKey"]["_id"] == 1 {
            last_v = Some(body["fullDocument"]["v"].clone());
            said = m
                .headers
                .get("Cdc-Coalesced-Operations")
                .map(|v| v.as_str().to_owned())
                .or(said);
        }
    }
    assert_eq!(last_v, Some(serde_json::json!(30)));
    assert!(said.unwrap().contains("update,update"));
    terminate(&child);
    assert!(child.wait().await.unwrap().success());
    js.delete_stream(&stream).await.unwrap();
    sim.shutdown().await;
}

/// `sink.nats.oversized = "object-store"` through `cdc run`: documents of 3 MiB (over
/// NATS's 1 MiB payload limit) arrive as references to objects holding exactly their
/// changes; with `cdc` killed midway and run again, each change is one message and one
/// object.
#[tokio::test]
async fn oversized_changes_arrive_through_the_object_store_across_a_kill() {
    let Some(nats) = nats_or_skip().await else {
        return;
    };
    let limit = nats.server_info().max_payload;
    let js = cdc_sink::async_nats::jetstream::new(nats);
    let tag = format!("{}{}", std::process::id(), free_port());
    let (stream, bucket) = (format!("CDC_BIG_{tag}"), format!("cdc-big-{tag}"));
    let sim = mongo_sim::MongoSim::start().await.unwrap();
    let coll = orders(&sim).await;
    let d = dir("oversized");
    let config = write_config(
        &d,
        &sim.uri(),
        &format!(
            "[sink]\ntype = \"nats\"\n\n[sink.nats]\nstream = \"{stream}\"\nsubject = \"b{tag}.{{db}}.{{coll}}.{{op}}\"\ncreate_stream = true\noversized = \"object-store\"\nobject_store_bucket = \"{bucket}\"\ncreate_object_store = true\n\n[checkpoint]\nevery_events = 1000\nevery_ms = 60000\n"
        ),
    );
    let blob = "y".repeat(3 << 20);
    assert!(blob.len() > limit);
    let (mut child, _out, err) = spawn_collected(&config, &["run"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    until_logged(&err, "opening the change stream", Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..3 {
        coll.insert_one(doc! { "_id": i, "blob": &blob })
            .await
            .unwrap();
    }
    while stream_messages(&js, &stream).await < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            err.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Killed with no checkpoint since the start (a minute apart): everything comes again.
    child.kill().await.unwrap();
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    for i in 3..5 {
        coll.insert_one(doc! { "_id": i, "blob": &blob })
            .await
            .unwrap();
    }
    let (mut child, _out, _err) = spawn_collected(&config, &["run"]);
    while stream_messages(&js, &stream).await < 5 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    terminate(&child);
    assert!(child.wait().await.unwrap().success());
    assert_eq!(stream_messages(&js, &stream).await, 5, "each change once");
    let s = js.get_stream(&stream).await.unwrap();
    let store = js.get_object_store(&bucket).await.unwrap();
    let mut names = std::collections::BTreeSet::new();
    for seq in 1..=5 {
        let m = s.get_raw_message(seq).await.unwrap();
        let name = m
            .headers
            .get("Cdc-Object-Name")
            .unwrap()
            .as_str()
            .to_owned();
        let info = store.info(&name).await.unwrap();
        assert_eq!(
            m.headers.get("Cdc-Object-Size").unwrap().as_str(),
            info.size.to_string()
        );
        let mut body = Vec::new();
        let mut reader = store.get(&name).await.unwrap();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut body)
            .await
            .unwrap();
        let change: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            change["fullDocument"]["blob"].as_str().unwrap().len(),
            blob.len()
        );
        assert_eq!(change["documentKey"]["_id"], seq - 1);
        if seq <= 3 {
            // Published again after the kill, but found: not stored a second time.
            let stored_at = info.modified.unwrap().unix_timestamp_nanos();
            assert!(
                u128::try_from(stored_at).unwrap() < killed_at,
                "{name} stored again"
            );
        }
        names.insert(name);
    }
    assert_eq!(names.len(), 5);
    js.delete_stream(&stream).await.unwrap();
    js.delete_object_store(&bucket).await.unwrap();
    sim.shutdown().await;
}
