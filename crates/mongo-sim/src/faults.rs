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

/// A configured `failGetMoreAfterCursorCheckout` fail point: a `getMore` that found its
/// cursor fails with `errorCode`, labelled by the server's own rule.
#[derive(Clone, Debug)]
pub(crate) struct FailGetMore {
    mode: Mode,
    error_code: i32,
    close_connection: bool,
}

/// The injected faults of one server.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    fail_command: Option<FailCommand>,
    fail_get_more: Option<FailGetMore>,
    /// Stepped down: writes and `getMore` fail until stepped up again.
    pub(crate) stepped_down: bool,
}

/// The fail points `configureFailPoint` accepts.
pub(crate) const FAIL_POINTS: &[&str] = &["failCommand", "failGetMoreAfterCursorCheckout"];

/// Reads `mode`: `None` turns the fail point off.
fn parse_mode(cmd: &Document) -> CmdResult<Option<Mode>> {
    match cmd.get("mode") {
        Some(Bson::String(s)) if s == "alwaysOn" => Ok(Some(Mode::AlwaysOn)),
        Some(Bson::String(s)) if s == "off" => Ok(None),
        Some(Bson::Document(d)) => {
            if let Some(n) = d.get("times").and_then(as_u64) {
                Ok((n > 0).then_some(Mode::Times(n)))
            } else if let Some(n) = d.get("skip").and_then(as_u64) {
                Ok(Some(Mode::Skip(n)))
            } else {
                Err(CmdError::bad_value(format!(
                    "unsupported fail point mode {d}"
                )))
            }
        }
        other => Err(CmdError::bad_value(format!(
            "unsupported fail point mode {other:?}"
        ))),
    }
}

/// Counts one matching evaluation against a mode: whether the point fires, and whether it
/// is used up afterwards.
fn fire(mode: &mut Mode) -> (bool, bool) {
    match mode {
        Mode::AlwaysOn => (true, false),
        Mode::Skip(n) if *n > 0 => {
            *n -= 1;
            (false, false)
        }
        Mode::Skip(_) => (true, false),
        Mode::Times(n) => {
            *n = n.saturating_sub(1);
            (true, *n == 0)
        }
    }
}

impl Faults {
    /// Handles `configureFailPoint`.
    pub(crate) fn configure(&mut self, cmd: &Document) -> CmdResult<()> {
        let name = cmd.get_str("configureFailPoint").unwrap_or_default();
        if !FAIL_POINTS.contains(&name) {
            return Err(CmdError::new(
                code::FAIL_POINT_SET_FAILED,
                format!("{name} not found (mongo-sim supports {FAIL_POINTS:?})"),
            ));
        }
        let mode = parse_mode(cmd)?;
        let data = match cmd.get("data") {
            Some(Bson::Document(d)) => d.clone(),
            None => Document::new(),
            Some(_) => return Err(CmdError::type_mismatch("data", "object")),
        };
        if name == "failGetMoreAfterCursorCheckout" {
            self.fail_get_more = match mode {
                None => None,
                Some(mode) => Some(fail_get_more(mode, &data)?),
            };
            return Ok(());
        }
        let Some(mode) = mode else {
            self.fail_command = None;
            return Ok(());
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
                "errorCode" => fc.error_code = as_i32(v),
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
        let (fires, used_up) = fire(&mut fc.mode);
        if !fires {
            return None;
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
        if used_up {
            self.fail_command = None;
        }
        Some(firing)
    }

    /// Whether `failGetMoreAfterCursorCheckout` fires for a `getMore` that found its
    /// cursor: the error it raises (before the server's labelling), and whether the
    /// connection closes instead.
    pub(crate) fn check_get_more(&mut self) -> Option<(CmdError, bool)> {
        let fp = self.fail_get_more.as_mut()?;
        let (fires, used_up) = fire(&mut fp.mode);
        if !fires {
            return None;
        }
        let firing = (
            CmdError::new(
                fp.error_code,
                "Failing command getMore due to failGetMoreAfterCursorCheckout failpoint",
            ),
            fp.close_connection,
        );
        if used_up {
            self.fail_get_more = None;
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
        if matches!(
            command,
            "getMore" | "aggregate" | "find" | "count" | "distinct"
        ) {
            // A secondary refuses primary reads; a change stream's getMore gets its label
            // from the server's rule like any other error.
            return Some(CmdError::new(
                code::NOT_PRIMARY_NO_SECONDARY_OK,
                "not primary and secondaryOk=false",
            ));
        }
        None
    }
}

fn fail_get_more(mode: Mode, data: &Document) -> CmdResult<FailGetMore> {
    let mut fp = FailGetMore {
        mode,
        error_code: code::INTERNAL_ERROR,
        close_connection: false,
    };
    for (k, v) in data {
        match k.as_str() {
            "errorCode" => {
                fp.error_code =
                    as_i32(v).ok_or_else(|| CmdError::type_mismatch("data.errorCode", "int"))?;
            }
            "closeConnection" => fp.close_connection = v.as_bool().unwrap_or(false),
            other => {
                return Err(CmdError::bad_value(format!(
                    "unsupported failGetMoreAfterCursorCheckout option '{other}' (not supported by mongo-sim)"
                )));
            }
        }
    }
    Ok(fp)
}

fn as_i32(v: &Bson) -> Option<i32> {
    match v {
        Bson::Int32(n) => Some(*n),
        Bson::Int64(n) => i32::try_from(*n).ok(),
        Bson::Double(n) if n.fract() == 0.0 => i32::try_from(*n as i64).ok(),
        _ => None,
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
