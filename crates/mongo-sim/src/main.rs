//! `mongo-sim` as a program: `cargo run -p mongo-sim -- --port 27017`.

// A command-line program: printing its address is its job.
#![allow(clippy::print_stdout)]

use mongo_sim::{MongoSim, SimOptions};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut options = SimOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--sharded" {
            options.sharded = true;
            continue;
        }
        let value = args.next();
        let parsed = match (arg.as_str(), value.as_deref()) {
            ("--port", Some(v)) => number(&arg, v).map(|p| options.port = p),
            ("--oplog-capacity", Some(v)) => number(&arg, v).map(|n| options.oplog_capacity = n),
            ("--oplog-size-mb", Some(v)) => number::<usize>(&arg, v).and_then(|mb| {
                if mb == 0 {
                    Err("--oplog-size-mb must be at least 1".to_owned())
                } else {
                    mb.checked_mul(1 << 20)
                        .map(|bytes| options.oplog_size_bytes = Some(bytes))
                        .ok_or_else(|| "--oplog-size-mb is too large".to_owned())
                }
            }),
            ("--max-connections", Some(v)) => number(&arg, v).map(|n| options.max_connections = n),
            ("--snapshot-history-secs", Some(v)) => {
                number(&arg, v).map(|n| options.snapshot_history_secs = n)
            }
            ("--transaction-lifetime-secs", Some(v)) => {
                number(&arg, v).map(|n| options.transaction_lifetime_secs = n)
            }
            ("--replica-set", Some(v)) => {
                options.set_name = v.to_owned();
                Ok(())
            }
            (
                "--port"
                | "--oplog-capacity"
                | "--oplog-size-mb"
                | "--max-connections"
                | "--snapshot-history-secs"
                | "--transaction-lifetime-secs"
                | "--replica-set",
                None,
            ) => Err(format!("`{arg}` needs a value")),
            _ => Err(format!("unknown argument `{arg}`")),
        };
        if let Err(e) = parsed {
            eprintln!(
                "mongo-sim: {e}\nusage: mongo-sim [--port N] [--replica-set NAME] [--oplog-capacity N] [--oplog-size-mb N] [--max-connections N] [--snapshot-history-secs N] [--transaction-lifetime-secs N] [--sharded]"
            );
            return std::process::ExitCode::from(2);
        }
    }
    let sim = match MongoSim::start_with(options).await {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("mongo-sim: cannot listen: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("mongo-sim listening: {}", sim.uri());
    let _ = tokio::signal::ctrl_c().await;
    sim.shutdown().await;
    std::process::ExitCode::SUCCESS
}

/// The number `value` given to `flag`, or an error naming both.
fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e| format!("`{flag}` expects a number, not `{value}` ({e})"))
}
