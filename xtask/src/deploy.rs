//! `cargo xtask ci`'s check of the operator's kit under `deploy/`: the Prometheus alert
//! rules (`promtool check rules`, `promtool test rules`), a live scrape of `cdc run`
//! linted by `promtool check metrics`, and the systemd unit (`systemd-analyze verify`,
//! where the machine has it). Debian's `prometheus` package is installed when `promtool`
//! is missing.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{cargo, run, workspace_root as root};

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

fn on_path(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// `promtool`, installing Debian's `prometheus` package when it is missing.
fn promtool() -> Result<&'static str, String> {
    if on_path("promtool") {
        return Ok("promtool");
    }
    println!("\n== promtool is missing: installing Debian's prometheus package");
    let install = |update: bool| {
        if update {
            let _ = Command::new("apt-get").args(["update", "-q"]).status();
        }
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "prometheus",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if (install(false) || install(true)) && on_path("promtool") {
        Ok("promtool")
    } else {
        Err("promtool is missing and `apt-get install prometheus` failed: install Debian's prometheus package (it ships promtool)".into())
    }
}

/// Kills the child when dropped (whatever the check's outcome).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// `GET /metrics` as a plain client (no OpenMetrics in `Accept`): the body, or `None`.
fn scrape(port: u16) -> Option<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: cdc\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

pub(crate) fn check() -> Result<(), String> {
    let promtool = promtool()?;
    let rules = root().join("deploy/prometheus");
    let mut check = Command::new(promtool);
    check
        .args(["check", "rules"])
        .arg(rules.join("cdc-alerts.yml"));
    run(
        "promtool check rules deploy/prometheus/cdc-alerts.yml",
        check,
    )?;
    let mut test = Command::new(promtool);
    // promtool reads the rule files named in the test file relative to it.
    test.current_dir(&rules)
        .args(["test", "rules", "cdc-alerts.test.yml"]);
    run(
        "promtool test rules deploy/prometheus/cdc-alerts.test.yml",
        test,
    )?;

    let mut build = cargo();
    build.args([
        "build",
        "--quiet",
        "-p",
        "cdc-cli",
        "-p",
        "mongo-sim",
        "-p",
        "cdc-tests",
    ]);
    build.args(["--bin", "cdc", "--bin", "mongo-sim", "--bin", "cdc-soak"]);
    run("build cdc, mongo-sim and the writer", build)?;
    let bin = target_dir().join("debug");
    live_scrape(promtool, &bin)?;
    systemd_unit(&bin)
}

/// `cdc run` against mongo-sim with a few changes written, scraped and linted.
fn live_scrape(promtool: &str, bin: &Path) -> Result<(), String> {
    println!("\n== promtool check metrics on a live scrape of cdc run");
    let dir = std::env::temp_dir().join(format!("cdc-deploy-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (sim_port, metrics_port) = (free_port()?, free_port()?);
    let _sim = Running(
        Command::new(bin.join("mongo-sim"))
            .args(["--port", &sim_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("mongo-sim: {e}"))?,
    );
    let uri = format!("mongodb://127.0.0.1:{sim_port}/?replicaSet=rs0");
    let config = dir.join("cdc.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nuri = \"{uri}\"\ndatabase = \"soak\"\ncollection = \"docs\"\n\n[store]\nurl = \"file:{}\"\n\n[sink]\ntype = \"stdout\"\n\n[oplog]\ncheck_every_ms = 200\n",
            dir.join("state").display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let started = Instant::now();
    // The simulator takes a moment to listen; the writer and cdc retry on their own.
    std::thread::sleep(Duration::from_millis(300));
    let _cdc = Running(
        Command::new(bin.join("cdc"))
            .args(["run", "--config"])
            .arg(&config)
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cdc: {e}"))?,
    );
    let writer = Command::new(bin.join("cdc-soak"))
        .args(["writer", "--uri", &uri, "--rate", "200", "--seconds", "3"])
        .arg("--log")
        .arg(dir.join("writes.log"))
        .arg("--stop-file")
        .arg(dir.join("stop"))
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cdc-soak writer: {e}"))?;
    if !writer.success() {
        return Err(format!("the writer failed ({writer})"));
    }
    // Every family present: changes handled, the oplog read, a batch through the sink.
    let wanted = [
        "cdc_events_total{",
        "cdc_oplog_headroom_seconds ",
        "cdc_ready{",
    ];
    let body = loop {
        if let Some(body) = scrape(metrics_port)
            && wanted.iter().all(|w| body.contains(w))
        {
            break body;
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "cdc's /metrics never showed {wanted:?} within 60 s (configuration {})",
                config.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut lint = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("promtool: {e}"))?;
    if let Some(mut stdin) = lint.stdin.take() {
        stdin
            .write_all(body.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let status = lint.wait().map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    if status.success() {
        Ok(())
    } else {
        Err(format!("promtool check metrics found problems ({status})"))
    }
}

/// `systemd-analyze verify` on the unit, its `ExecStart` pointed at the built binary.
fn systemd_unit(bin: &Path) -> Result<(), String> {
    if !on_path("systemd-analyze") {
        println!(
            "\n== systemd-analyze is not on this machine: deploy/systemd/cdc.service not verified"
        );
        return Ok(());
    }
    let unit = std::fs::read_to_string(root().join("deploy/systemd/cdc.service"))
        .map_err(|e| format!("deploy/systemd/cdc.service: {e}"))?;
    let cdc = bin.join("cdc");
    let dir = std::env::temp_dir().join(format!("cdc-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let copy = dir.join("cdc.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/cdc", &cdc.display().to_string()),
    )
    .map_err(|e| e.to_string())?;
    let mut verify = Command::new("systemd-analyze");
    verify.arg("verify").arg(&copy);
    let result = run("systemd-analyze verify deploy/systemd/cdc.service", verify);
    let _ = std::fs::remove_dir_all(&dir);
    result
}
