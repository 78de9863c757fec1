//! `mongo-sim` as a program: a bad argument is one line naming it (exit 2); `--sharded`
//! listens as a `mongos` whose URI names no replica set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mongo-sim"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_argument_is_named_and_exits_2() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["--snapshot-history-secs", "abc"],
            "`--snapshot-history-secs` expects a number, not `abc`",
        ),
        (
            &["--transaction-lifetime-secs", "-1"],
            "`--transaction-lifetime-secs` expects a number, not `-1`",
        ),
        (
            &["--port", "99999"],
            "`--port` expects a number, not `99999`",
        ),
        (&["--port"], "`--port` needs a value"),
        (
            &["--oplog-size-mb", "0"],
            "--oplog-size-mb must be at least 1",
        ),
        (&["--bogus", "1"], "unknown argument `--bogus`"),
    ];
    for (args, expected) in cases {
        let (code, stderr) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        assert!(first.contains(expected), "{args:?}: {first}");
    }
}

#[test]
fn sharded_listens_as_a_mongos() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mongo-sim"))
        .args(["--sharded", "--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        line.starts_with("mongo-sim listening: mongodb://127.0.0.1:"),
        "{line}"
    );
    assert!(!line.contains("replicaSet"), "{line}");
}
