//! `cdc-conformance [--dir DIR] [--uri URI | --sharded]`: runs MongoDB's unified-format
//! change-stream tests against a fresh mongo-sim per test (`--sharded`: its `mongos`
//! front; or the deployment at URI), one line per test, and `N passed, N failed, N
//! skipped` at the end. Exits non-zero if any test failed.

// A command-line program: printing the verdicts is its job.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use cdc_tests::unified::{Target, Verdict, run_dir};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut dir = PathBuf::from("../shared/spec/change-streams/unified");
    let mut target = Target::Sim;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--sharded" {
            target = Target::ShardedSim;
            continue;
        }
        match (arg.as_str(), args.next()) {
            ("--dir", Some(d)) => dir = PathBuf::from(d),
            ("--uri", Some(u)) => target = Target::Uri(u),
            _ => {
                eprintln!("usage: cdc-conformance [--dir DIR] [--uri URI | --sharded]");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let results = match run_dir(&dir, &target).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cdc-conformance: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for r in &results {
        match &r.verdict {
            Verdict::Pass => {
                passed += 1;
                println!("pass  {} :: {}", r.file, r.test);
            }
            Verdict::Fail(why) => {
                failed += 1;
                println!("FAIL  {} :: {}\n      {why}", r.file, r.test);
            }
            Verdict::Skip(why) => {
                skipped += 1;
                println!("skip  {} :: {} ({why})", r.file, r.test);
            }
        }
    }
    println!("conformance: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
