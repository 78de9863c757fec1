//! Fault injection: the `failCommand` fail point as real servers accept it in test mode,
//! and the step-down state the handle controls.

use std::time::Duration;

use bson::{Bson, Document};

use crate::error::{CmdError, CmdResult, code};

/// How often a fail point fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Every matching command.
    AlwaysOn,
    /// The next `n` matching commands.
    Times(u64),
    /// Every matching command after the next `n`.
    Skip(u64),
}

/// A configured `failCommand` fail point.
#[derive(Clone, Debug)]
pub(crate) struct FailCommand {
    mode: Mode,
    commands: Vec<String>,
    error_code: Option<i32>,
    error_labels: Option<Vec<String>>,
    close_connection: bool,
    block: Option<Duration>,
    app_name: Option<String>,
    write_concern_error: Option<Document>,
}

/// What a fired fail point does to a command.
#[derive(Debug, Default)]
pub(crate) struct Firing {
    /// Wait this long first.
    pub(crate) block: Option<Duration>,
    /// Close the connection without answering.
    pub(crate) close: bool,
    /// Answer with this error instead of running the command.
    pub(crate) error: Option<CmdError>,
    /// Run the command, then add this `writeConcernError` to its reply.
    pub(crate) write_concern_error: Option<Document>,
}

/// The injected faults of one server.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    fail_command: Option<FailCommand>,
    /// Stepped down: writes and `getMore` fail until stepped up again.
    pub(crate) stepped_down: bool,
}

impl Faults {
    /// Handles `configureFailPoint`.
    pub(crate) fn configure(&mut self, cmd: &Document) -> CmdResult<()> {
        let name = cmd.get_str("configureFailPoint").unwrap_or_default();
        if name != "failCommand" {
            return Err(CmdError::bad_value(format!(
                "unknown fail point '{name}' (mongo-sim supports failCommand)"
            )));
        }
        let mode = match cmd.get("mode") {
            Some(Bson::String(s)) if s == "alwaysOn" => Mode::AlwaysOn,
            Some(Bson::String(s)) if s == "off" => {
                self.fail_command = None;
                return Ok(());
            }
            Some(Bson::Document(d)) => {
                if let Some(n) = d.get("times").and_then(as_u64) {
                    if n == 0 {
                        self.fail_command = None;
                        return Ok(());
                    }
                    Mode::Times(n)
                } else if let Some(n) = d.get("skip").and_then(as_u64) {
                    Mode::Skip(n)
                } else {
                    return Err(CmdError::bad_value(format!(
                        "unsupported fail point mode {d}"
                    )));
                }
            }
            other => {
                return Err(CmdError::bad_value(format!(
                    "unsupported fail point mode {other:?}"
                )));
            }
        };
        let data = match cmd.get("data") {
            Some(Bson::Document(d)) => d.clone(),
            None => Document::new(),
            Some(_) => return Err(CmdError::type_mismatch("data", "object")),
        };
        let mut fc = FailCommand {
            mode,
            commands: Vec::new(),
            error_code: None,
            error_labels: None,
            close_connection: false,
            block: None,
            app_name: None,
            write_concern_error: None,
        };
        let mut block_connection = false;
        let mut block_ms = None;
        for (k, v) in &data {
            match k.as_str() {
                "failCommands" => {
                    let Bson::Array(items) = v else {
                        return Err(CmdError::type_mismatch("data.failCommands", "array"));
                    };
                    fc.commands = items
                        .iter()
                        .filter_map(|i| i.as_str().map(str::to_owned))
                        .collect();
                }
                "errorCode" => {
                    fc.error_code = as_u64(v).and_then(|n| i32::try_from(n).ok()).or(match v {
                        Bson::Int32(n) => Some(*n),
                        _ => None,
                    })
                }
                "errorLabels" => {
                    let Bson::Array(items) = v else {
                        return Err(CmdError::type_mismatch("data.errorLabels", "array"));
                    };
                    fc.error_labels = Some(
                        items
                            .iter()
                            .filter_map(|i| i.as_str().map(str::to_owned))
                            .collect(),
                    );
                }
                "closeConnection" => fc.close_connection = v.as_bool().unwrap_or(false),
                "blockConnection" => block_connection = v.as_bool().unwrap_or(false),
                "blockTimeMS" => block_ms = as_u64(v),
                "appName" => fc.app_name = v.as_str().map(str::to_owned),
                "writeConcernError" => match v {
                    Bson::Document(d) => fc.write_concern_error = Some(d.clone()),
                    _ => return Err(CmdError::type_mismatch("data.writeConcernError", "object")),
                },
                other => {
                    return Err(CmdError::bad_value(format!(
                        "unsupported failCommand option '{other}' (not supported by mongo-sim)"
                    )));
                }
            }
        }
        if fc.commands.is_empty() {
            return Err(CmdError::bad_value(
                "failCommand needs a non-empty data.failCommands",
            ));
        }
        if block_connection {
            fc.block = Some(Duration::from_millis(block_ms.ok_or_else(|| {
                CmdError::bad_value("blockConnection needs blockTimeMS")
            })?));
        }
        self.fail_command = Some(fc);
        Ok(())
    }

    /// Whether a fail point fires for this command, and what it does.
    pub(crate) fn check(&mut self, command: &str, app_name: Option<&str>) -> Option<Firing> {
        let fc = self.fail_command.as_mut()?;
        if !fc.commands.iter().any(|c| c == command) {
            return None;
        }
        if let Some(want) = &fc.app_name
            && app_name != Some(want.as_str())
        {
            return None;
        }
        match &mut fc.mode {
            Mode::AlwaysOn => {}
            Mode::Skip(n) if *n > 0 => {
                *n -= 1;
                return None;
            }
            Mode::Skip(_) => {}
            Mode::Times(n) => {
                *n -= 1;
            }
        }
        let firing = Firing {
            block: fc.block,
            close: fc.close_connection,
            error: fc.error_code.map(|code| {
                let mut err = CmdError::new(
                    code,
                    format!("Failing command {command} due to failCommand failpoint"),
                );
                if let Some(labels) = &fc.error_labels {
                    err.labels = labels.clone();
                }
                err
            }),
            write_concern_error: fc.write_concern_error.clone(),
        };
        if fc.mode == Mode::Times(0) {
            self.fail_command = None;
        }
        Some(firing)
    }

    /// The error a stepped-down server answers writes and `getMore` with.
    pub(crate) fn stepdown_error(&self, command: &str) -> Option<CmdError> {
        if !self.stepped_down {
            return None;
        }
        let write = matches!(
            command,
            "insert"
                | "update"
                | "delete"
                | "findAndModify"
                | "create"
                | "drop"
                | "dropDatabase"
                | "createIndexes"
                | "dropIndexes"
                | "renameCollection"
                | "collMod"
                | "commitTransaction"
        );
        if write {
            return Some(
                CmdError::new(code::NOT_WRITABLE_PRIMARY, "not primary")
                    .with_label("RetryableWriteError"),
            );
        }
        if matches!(command, "getMore" | "aggregate" | "find") {
            return Some(
                CmdError::new(code::ELECTION_IN_PROGRESS, "election in progress")
                    .with_label("ResumableChangeStreamError"),
            );
        }
        None
    }
}

fn as_u64(v: &Bson) -> Option<u64> {
    match v {
        Bson::Int32(n) => u64::try_from(*n).ok(),
        Bson::Int64(n) => u64::try_from(*n).ok(),
        Bson::Double(n) if *n >= 0.0 && n.fract() == 0.0 => Some(*n as u64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn times_mode_fires_then_turns_off() {
        let mut f = Faults::default();
        f.configure(&doc! {
            "configureFailPoint": "failCommand",
            "mode": { "times": 2 },
            "data": { "failCommands": ["getMore"], "errorCode": 43 },
        })
        .unwrap();
        assert!(f.check("find", None).is_none());
        assert_eq!(f.check("getMore", None).unwrap().error.unwrap().code, 43);
        assert!(f.check("getMore", None).is_some());
        assert!(f.check("getMore", None).is_none());
    }

    #[test]
    fn skip_mode_and_app_name() {
        let mut f = Faults::default();
        f.configure(&doc! {
            "configureFailPoint": "failCommand",
            "mode": { "skip": 1 },
            "data": { "failCommands": ["insert"], "closeConnection": true, "appName": "x" },
        })
        .unwrap();
        assert!(f.check("insert", Some("x")).is_none(), "skipped");
        assert!(f.check("insert", Some("y")).is_none(), "other app");
        assert!(f.check("insert", Some("x")).unwrap().close);
        assert!(
            f.configure(&doc! { "configureFailPoint": "other", "mode": "alwaysOn" })
                .is_err()
        );
        f.configure(&doc! { "configureFailPoint": "failCommand", "mode": "off" })
            .unwrap();
        assert!(f.check("insert", Some("x")).is_none());
    }
}
