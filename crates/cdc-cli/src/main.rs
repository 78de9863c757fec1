//! `cdc`: MongoDB change streams into NATS JetStream, PostgreSQL or stdout, from a config
//! file — no Rust to write. See `docs/OPERATIONS.md` and `cdc.example.toml`.

// A command-line program: what it prints on stdout is its output.
#![allow(clippy::print_stdout)]

mod config;
mod metrics;
mod oplog;
mod redact;
mod run;
mod status;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

/// Moves MongoDB changes into NATS JetStream, PostgreSQL or stdout, never losing one:
/// resumes after restarts and crashes, checkpoints only what the sink took.
///
/// Settings come from a TOML file (see cdc.example.toml), then environment variables
/// `CDC_<SECTION>__<KEY>` (as in CDC_SOURCE__URI, CDC_SINK__NATS__URL), then `--set`
/// flags, each overriding the one before.
#[derive(Debug, Parser)]
#[command(name = "cdc", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Common {
    /// The configuration file.
    #[arg(
        short,
        long,
        value_name = "FILE",
        default_value = "cdc.toml",
        env = "CDC_CONFIG",
        global = true
    )]
    config: PathBuf,
    /// Overrides one key, as in `--set processing.concurrency=8` (repeatable; after the
    /// file and the environment).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    set: Vec<String>,
    /// Log format: `text` or `json` (overrides `log.format`).
    #[arg(long, value_name = "FORMAT", global = true)]
    log_format: Option<String>,
    /// Log level or filter, as in `info` or `cdc=debug,warn` (overrides `log.level`).
    #[arg(long, value_name = "LEVEL", global = true)]
    log_level: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks the configuration, then connects to the source, the store and the sink and
    /// says precisely what is wrong. Exits 0 when everything answered, 1 when something
    /// did not, 2 when the configuration itself is wrong.
    Check,
    /// Runs: watches the source and hands every change to the sink until SIGTERM or
    /// Ctrl-C, then stops gracefully (final checkpoint, lease released).
    Run {
        /// Serves Prometheus metrics at /metrics and health at /healthz and /readyz on
        /// this address (overrides `metrics.addr`), as in 127.0.0.1:9464.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<String>,
    },
    /// Shows, per stream of the store: the stored point and its age, the lag behind the
    /// source, the lease holder, dead letters and snapshot progress.
    Status {
        /// Prints JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Lists, replays or deletes the dead letters of the configured stream.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
}

#[derive(Debug, Subcommand)]
enum DeadLetterAction {
    /// Lists dead letters, oldest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Prints JSON lines (the event as relaxed Extended JSON with the errors).
        #[arg(long)]
        json: bool,
    },
    /// Hands every dead letter to the sink again, oldest first; the ones it takes are
    /// removed. Run it while no `cdc run` consumes the stream.
    Replay,
    /// Deletes dead letters (their changes are then given up for good).
    Delete {
        /// The ids to delete (as `list` shows them).
        ids: Vec<String>,
        /// Deletes every dead letter of the stream.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

impl Common {
    /// Loads the configuration with the environment's and the flags' overrides.
    fn load(&self) -> Result<config::Config, config::ConfigError> {
        let name = self.config.display().to_string();
        let text = std::fs::read_to_string(&self.config)
            .map_err(|e| config::ConfigError(format!("{name}: {e}")))?;
        let mut overrides = config::env_overrides(std::env::vars_os())?;
        for s in &self.set {
            overrides.push(config::flag_override(s)?);
        }
        if let Some(f) = &self.log_format {
            overrides.push(config::flag_override(&format!("log.format={f}"))?);
        }
        if let Some(l) = &self.log_level {
            overrides.push(config::flag_override(&format!("log.level={l}"))?);
        }
        config::load(&text, &name, &overrides)
    }
}

/// glibc's malloc, once a freed buffer has raised its dynamic mmap threshold, keeps later
/// large buffers (events of a MiB or more) in per-thread arenas instead of returning them:
/// measured, a 64 MiB read-ahead bound with 1 MiB documents peaked at 138 MiB of RSS.
/// jemalloc, built to return freed memory at once with two arenas
/// (`JEMALLOC_SYS_WITH_MALLOC_CONF` in `.cargo/config.toml`), keeps the program near the
/// bound it is given (README, bench row 12c), with no environment variable at run time and
/// no second `exec`.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cdc: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `run` listens for SIGTERM, SIGINT and SIGHUP from here on, before the configuration
    // is read: a stop in any phase after this ends it with exit 0.
    let shutdown = matches!(cli.command, Command::Run { .. }).then(|| {
        let _entered = runtime.enter();
        run::shutdown_signal()
    });
    let mut cfg = match cli.common.load() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("cdc: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::Run {
        metrics_addr: Some(addr),
        ..
    } = &cli.command
    {
        match addr.parse() {
            Ok(addr) => cfg.metrics.addr = Some(addr),
            Err(e) => {
                eprintln!("cdc: configuration error: `--metrics-addr` {addr:?}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if let Err(e) = run::init_logs(&cfg.log) {
        eprintln!("cdc: configuration error: `log.level`: {e}");
        return ExitCode::from(2);
    }
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Check => run::check(&cfg).await,
            Command::Run { .. } => run::run(cfg, shutdown).await,
            Command::Status { json, .. } => status::status(&cfg, json).await,
            Command::DeadLetters { action, .. } => match action {
                DeadLetterAction::List { limit, json } => {
                    status::list_letters(&cfg, limit, json).await
                }
                DeadLetterAction::Replay => status::replay_letters(&cfg).await,
                DeadLetterAction::Delete { ids, all } => {
                    status::delete_letters(&cfg, &ids, all).await
                }
            },
        }
    });
    // Blocking tasks (a file store's read) are not waited for without end.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(code) => code,
        // A configuration error found while running (a secret file gone, a value only the
        // server can refuse) exits as configuration errors do.
        Err(e) if e.downcast_ref::<config::ConfigError>().is_some() => {
            eprintln!("cdc: configuration error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("cdc: {e}");
            ExitCode::FAILURE
        }
    }
}
