//! `configureFailPoint`: the fail points drivers' test suites use (see `crate::faults`).

use bson::{Document, doc};

use crate::{
    error::{CmdError, CmdResult, code},
    state::State,
};

/// `configureFailPoint`, on `admin` only.
pub(crate) fn configure_fail_point(state: &mut State, db: &str, cmd: &Document) -> CmdResult {
    if db != "admin" {
        return Err(CmdError::new(
            code::UNAUTHORIZED,
            "configureFailPoint may only be run against the admin database.",
        ));
    }
    state.faults.configure(cmd)?;
    Ok(doc! { "count": 0, "ok": 1.0 })
}
