//! `cargo xtask`: the project's automation, one small binary with no dependencies.
//!
//! - `cargo xtask ci` — what CI runs: formatting, clippy (warnings denied), every test,
//!   docs (warnings denied), and the layering checks of `docs/ARCHITECTURE.md`.

// A command-line tool: printing to the terminal is its job.
#![allow(clippy::print_stdout)]

mod deploy;
mod modules;

use std::{
    env,
    process::{Command, ExitCode},
};

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench(&args[1..]),
        Some("conformance") => conformance(&args[1..]),
        Some("demo") => demo(&args[1..]),
        Some("deploy") => deploy::check(),
        Some("integration") => integration(&args[1..]),
        Some("soak") => soak(&args[1..]),
        Some("help" | "--help" | "-h") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo xtask <command>

commands:
  ci              formatting, clippy, tests, docs and layering checks (what CI runs)
  demo [--uri URI] [--seconds S] [--rate R]
                  the main job on the embedded default, killed and resumed midway
  soak [--kills K] [--seconds S] [--rate R] [--connections N] [--keys K] [--burst-every S --burst-x F] [--uri URI] [--concurrency N] [--transactions] [--poison P] [--snapshot [--preload N]] [--standby N] [--sink nats|postgres]
                  SIGKILL the consumer K times (default 100), then verify nothing was lost
                  (with lanes: per-key order and whole transactions too; with --sink: the
                  `cdc` program is the consumer and the sink is checked: exactly once)
  integration [--uri URI]
                  the end-to-end suites against mongo-sim (or the replica set at URI)
  bench sim       change events per second from mongo-sim to the driver (release build)
  bench stores    save and load latency of every resume store (release build)
  bench [all]     the ten library scenarios side by side, report in target/bench/ (release build)
  deploy          checks deploy/: the alert rules with promtool (and their unit tests), a
                  live scrape of `cdc run` with `promtool check metrics`, the systemd unit
  conformance [--dir DIR] [--uri URI | --sharded]
                  MongoDB's unified change-stream spec tests against mongo-sim (or URI)";

fn cargo() -> Command {
    Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(step: &str, mut cmd: Command) -> Result<(), String> {
    println!("\n== {step}");
    let status = cmd
        .status()
        .map_err(|e| format!("{step}: could not start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{step} failed ({status})"))
    }
}

/// `cargo run [--release] --quiet -p cdc-tests --bin <bin> --`: the programs behind the
/// xtask commands live in the `cdc-tests` package.
fn cdc_tests_bin(bin: &str, release: bool) -> Command {
    let mut cmd = cargo();
    cmd.arg("run");
    if release {
        cmd.arg("--release");
    }
    cmd.args(["--quiet", "-p", "cdc-tests", "--bin", bin, "--"]);
    cmd
}

/// Runs the kill -9 soak, built for release (the long runs, at the rates the README
/// states).
fn soak(args: &[String]) -> Result<(), String> {
    soak_with(args, true)
}

/// Runs the kill -9 soak, built for release or not (CI's short runs).
fn soak_with(args: &[String], release: bool) -> Result<(), String> {
    if args.iter().any(|a| a == "--sink") {
        // The consumer is the `cdc` program, found beside the soak program.
        let mut build = cargo();
        build.args(["build", "--quiet", "-p", "cdc-cli"]);
        if release {
            build.arg("--release");
        }
        run("build cdc", build)?;
    }
    let mut cmd = cdc_tests_bin("cdc-soak", release);
    cmd.arg("run").args(args);
    run("soak", cmd)
}

/// Runs the demo program.
fn demo(args: &[String]) -> Result<(), String> {
    let mut cmd = cdc_tests_bin("cdc-demo", false);
    cmd.args(args);
    run("demo", cmd)
}

/// Runs the end-to-end suites; with `--uri`, against that replica set.
fn integration(args: &[String]) -> Result<(), String> {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--all-features",
        "-p",
        "cdc-tests",
        "-p",
        "cdc-processor",
        "-p",
        "cdc-mongo",
        "-p",
        "cdc-resume",
        "-p",
        "mongo-sim",
        "--tests",
    ]);
    match args {
        [] => {}
        [flag, uri] if flag == "--uri" => {
            println!(
                "integration: against {uri}; tests that need mongo-sim's fault controls say SKIPPED with their reason"
            );
            cmd.env("CDC_MONGODB_URI", uri);
            // Passing tests' output is captured: show it, so each skip's reason is printed.
            cmd.args(["--", "--show-output"]);
        }
        _ => return Err("usage: cargo xtask integration [--uri URI]".into()),
    }
    run("integration", cmd)
}

/// Runs the benchmark program in release mode with the given arguments (row 12c runs the
/// `cdc` program, built beside it first).
fn bench(args: &[String]) -> Result<(), String> {
    // Programs the benchmark runs: `cdc` (12c, 15) and the soak's load generator (15).
    let mut build = cargo();
    build.args(["build", "--quiet", "--release", "-p", "cdc-cli"]);
    build.args(["-p", "cdc-tests", "--bin", "cdc-soak", "--bin", "cdc"]);
    run("build cdc", build)?;
    let mut cmd = cdc_tests_bin("cdc-bench", true);
    if args.is_empty() {
        cmd.arg("all");
    } else {
        cmd.args(args);
    }
    run("bench", cmd)
}

/// CI's short runs of the lag and instruction measurements, on debug builds.
fn bench_smoke() -> Result<(), String> {
    let mut build = cargo();
    build.args(["build", "--quiet", "-p", "cdc-cli"]);
    build.args(["-p", "cdc-tests", "--bin", "cdc-soak", "--bin", "cdc"]);
    run("build cdc", build)?;
    let mut lag = cdc_tests_bin("cdc-bench", false);
    lag.args(["lag", "--rate", "1000", "--seconds", "10"]);
    run("bench lag (short, debug build)", lag)?;
    let mut instructions = cdc_tests_bin("cdc-bench", false);
    instructions.args(["instructions", "--events", "2000", "--runs", "1"]);
    run("bench instructions (short, debug build)", instructions)
}

/// The workspace's root (xtask's parent folder), wherever cargo runs from.
fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shared spec tests, read in place from the checkout's sibling `shared/` folder.
fn default_spec_dir() -> std::path::PathBuf {
    workspace_root().join("../shared/spec/change-streams/unified")
}

/// Runs the unified-format conformance runner.
fn conformance(args: &[String]) -> Result<(), String> {
    let mut cmd = cdc_tests_bin("cdc-conformance", false);
    if !args.iter().any(|a| a == "--dir") {
        cmd.arg("--dir").arg(default_spec_dir());
    }
    cmd.args(args);
    run("conformance", cmd)
}

/// The services CI tests against, with the command that starts one that stopped (CI
/// starts nothing itself).
const SERVICES: [(&str, &str, &str); 3] = [
    (
        "PostgreSQL",
        "127.0.0.1:5432",
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    ),
    (
        "Redis",
        "127.0.0.1:6379",
        "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save \"\" --appendonly no",
    ),
    (
        "NATS (JetStream)",
        "127.0.0.1:4222",
        "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server",
    ),
];

/// Fails at once, naming the service, when one CI needs does not answer.
fn services() -> Result<(), String> {
    println!("\n== services");
    for (name, addr, start) in SERVICES {
        let reachable = addr.parse().is_ok_and(|a| {
            std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(3)).is_ok()
        });
        if !reachable {
            return Err(format!(
                "{name} does not answer on {addr}: CI tests against it and starts nothing itself. Start it with: {start}"
            ));
        }
        println!("{name} answers on {addr}");
    }
    Ok(())
}

fn ci() -> Result<(), String> {
    services()?;
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run("rustfmt", fmt)?;

    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]);
    run("clippy", clippy)?;

    layering()?;

    let mut test = cargo();
    test.args(["test", "--workspace", "--all-features"]);
    run("tests", test)?;

    // Without the optional stores: what a left-out backend says.
    let mut lean = cargo();
    lean.args([
        "test",
        "-p",
        "cdc-processor",
        "--no-default-features",
        "--lib",
    ]);
    run("tests without optional stores", lean)?;

    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps", "--all-features"])
        .env("RUSTDOCFLAGS", "-D warnings");
    run("docs", doc)?;

    // The operator's kit: alert rules and their unit tests, a live scrape linted, the
    // systemd unit.
    deploy::check()?;

    // Every soak short (about 20 s of kills) at the load generator's default (5,000
    // writes/s over 8 connections; a debug build reaches what it reaches, and says so on
    // its `soak at load:` line). The long runs are `cargo xtask soak … --kills 50`.
    let short = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.extend(["--seconds".to_owned(), "20".to_owned()]);
        soak_with(&all, false)
    };
    short(&["--kills", "10"])?;
    short(&["--kills", "10", "--concurrency", "16"])?;
    // Killed mid-snapshot and mid-stream: the replica must equal the collection.
    short(&["--kills", "5", "--snapshot", "--preload", "100000"])?;
    // Three consumers on one stream with a leased store: the holder killed, then paused.
    short(&["--kills", "5", "--standby", "2"])?;
    // Killed while dead-lettering: 3% of the changes are refused by the handler.
    short(&["--kills", "10", "--concurrency", "4", "--poison", "3"])?;
    // The `cdc` program killed while moving changes into each sink.
    for sink in ["nats", "postgres"] {
        short(&["--kills", "5", "--sink", sink])?;
    }
    // Killed while its initial snapshot reads, with a writer: no snapshot row is stored
    // twice in JetStream (rows keep their message id across restarts).
    short(&[
        "--kills",
        "5",
        "--sink",
        "nats",
        "--snapshot",
        "--preload",
        "100000",
    ])?;

    // The measurements of `cargo xtask bench lag` and `bench instructions`, short and on
    // debug builds: their figures are not the release ones (the README's are); this
    // checks that they run, and the lag run fails if an acknowledged change never
    // reaches a sink.
    bench_smoke()?;

    let spec = default_spec_dir();
    if spec.is_dir() {
        conformance(&[])?;
        // The same files against the simulator's `mongos` front.
        conformance(&["--sharded".to_owned()])?;
    } else {
        println!(
            "\n== conformance\nNOT RUN: the spec directory {} is absent",
            spec.display()
        );
    }

    println!("\nci: all steps passed");
    Ok(())
}

/// The architecture invariants `cargo tree` can check: cdc-core pulls in no driver and no
/// runtime.
fn layering() -> Result<(), String> {
    println!("\n== layering");
    check_tree_lacks("cdc-core", &[], &["mongodb", "tokio"])?;
    check_tree_lacks(
        "cdc-resume",
        &["file"],
        &["mongodb", "redis", "tokio-postgres", "rustls"],
    )?;
    // A sink's client comes with its feature only, and the processor pulls in none.
    check_tree_lacks("cdc-sink", &[], &["tokio-postgres", "redis", "async-nats"])?;
    check_tree_lacks(
        "cdc-processor",
        &[],
        &["async-nats", "prometheus-client", "clap"],
    )?;
    // The processor's and the MongoDB adapter's rooms import each other in one direction
    // only.
    for package in ["cdc-processor", "cdc-mongo"] {
        let src = workspace_root().join("crates").join(package).join("src");
        let graph = modules::graph(&src)?;
        if let Some(cycle) = modules::cycle(&graph) {
            return Err(format!(
                "{package}'s modules import each other in a circle: {}",
                cycle.join(" → ")
            ));
        }
        println!(
            "{package}'s {} modules import each other in one direction only",
            graph.len()
        );
    }
    Ok(())
}

fn check_tree_lacks(package: &str, features: &[&str], banned: &[&str]) -> Result<(), String> {
    let mut cmd = cargo();
    cmd.args(["tree", "-p", package, "-e", "normal", "--prefix", "none"]);
    if !features.is_empty() {
        cmd.args(["--no-default-features", "--features", &features.join(",")]);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cargo tree: could not start: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo tree -p {package} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    for name in banned {
        if tree
            .lines()
            .any(|line| line.split_whitespace().next() == Some(name))
        {
            return Err(format!(
                "{package} depends on {name}, which its layer forbids"
            ));
        }
    }
    println!("{package} (features: {features:?}) pulls in none of {banned:?}");
    Ok(())
}
