//! Multi-document transactions: entering one, committing it.

use bson::{Bson, Document, doc};

use super::*;
use crate::{
    error::{CmdError, CmdResult, code},
    state::{State, Txn},
    value::id_key,
};

/// Starts, continues or refuses a transaction for a command with `autocommit: false`.
pub(crate) fn enter_txn(state: &mut State, cmd: &Document) -> CmdResult<Option<(Vec<u8>, Txn)>> {
    if cmd.get("autocommit").and_then(Bson::as_bool) != Some(false) {
        return Ok(None);
    }
    let lsid = get_doc(cmd, "lsid")?
        .ok_or_else(|| CmdError::bad_value("a transaction needs a session (lsid)"))?;
    let txn_number = match cmd.get("txnNumber") {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => i64::from(*n),
        _ => return Err(CmdError::bad_value("a transaction needs a txnNumber")),
    };
    let key = id_key(&Bson::Document(lsid.clone()));
    if truthy(cmd.get("startTransaction")) {
        let txn = Txn {
            txn_number,
            lsid: lsid.clone(),
            workspace: Default::default(),
            base_versions: Default::default(),
            entries: Vec::new(),
            committed: false,
        };
        state.txns.remove(&key);
        return Ok(Some((key, txn)));
    }
    match state.txns.remove(&key) {
        Some(txn) if txn.txn_number == txn_number => Ok(Some((key, txn))),
        other => {
            if let Some(t) = other {
                state.txns.insert(key, t);
            }
            Err(no_such_txn(txn_number))
        }
    }
}

fn no_such_txn(n: i64) -> CmdError {
    CmdError::new(
        code::NO_SUCH_TRANSACTION,
        format!("Transaction with txnNumber {n} has been aborted or does not exist"),
    )
    .with_label("TransientTransactionError")
}

/// `commitTransaction`: installs the transaction's copies and publishes its entries with
/// one shared cluster time; a concurrent write to a touched collection is a WriteConflict.
pub(crate) fn commit_transaction(state: &mut State, key: Vec<u8>, mut txn: Txn) -> CmdResult {
    if txn.committed {
        state.txns.insert(key, txn);
        return Ok(doc! { "ok": 1.0 });
    }
    for ((db, name), base) in &txn.base_versions {
        let live = state
            .dbs
            .get(db)
            .and_then(|d| d.get(name))
            .map(|c| c.version);
        if live != *base {
            return Err(CmdError::new(
                code::WRITE_CONFLICT,
                "Write conflict during plan execution and yielding is disabled.",
            )
            .with_label("TransientTransactionError"));
        }
    }
    for ((db, name), mut coll) in std::mem::take(&mut txn.workspace) {
        coll.version += 1;
        state.dbs.entry(db).or_default().insert(name, coll);
    }
    let entries = std::mem::take(&mut txn.entries);
    state
        .log
        .append(entries, Some((txn.lsid.clone(), txn.txn_number)));
    txn.committed = true;
    state.txns.insert(key, txn);
    Ok(doc! { "ok": 1.0 })
}
