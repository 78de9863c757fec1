//! Multi-document transactions: entering one, committing it.

use std::sync::Arc;

use bson::{Bson, Document, doc};

use super::{writer::write_conflict, *};
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
        let read_at = crate::engine::ts(state.log.last_ts());
        let txn = Txn {
            txn_number,
            lsid: lsid.clone(),
            read_at,
            pin: Some(state.history.pins.pin(read_at)),
            colls: Default::default(),
            writes: 0,
            entries: Vec::new(),
            committed: false,
            started: std::time::Instant::now(),
        };
        state.txns.remove(&key);
        return Ok(Some((key, txn)));
    }
    state.reap_transactions();
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

/// `commitTransaction`: installs what the transaction wrote at one new cluster time and
/// publishes its entries with it. It conflicts (WriteConflict, 112, labelled
/// `TransientTransactionError`) only when a write committed after the transaction's
/// snapshot touched a document the transaction wrote, or a collection it wrote was
/// dropped or created meanwhile: two transactions on different documents of one
/// collection both commit, as WiredTiger lets them. (A conflict with a write already
/// committed is found at the transaction's own write, as on the server.)
pub(crate) fn commit_transaction(state: &mut State, key: Vec<u8>, mut txn: Txn) -> CmdResult {
    if txn.committed {
        state.txns.insert(key, txn);
        return Ok(doc! { "ok": 1.0 });
    }
    let horizon = state.horizon();
    // The commit lock for the whole commit: no live write commits between the checks and
    // the install.
    let log = Arc::clone(&state.log);
    let mut log = log.lock();
    for ((db, name), side) in &txn.colls {
        let live = state.dbs.get(db).and_then(|d| d.get(name));
        match (&side.base, live) {
            (None, None) => {}
            (Some((uuid, _)), Some(live)) if live.uuid == *uuid => {
                let touched_since = side
                    .writes
                    .keys()
                    .any(|k| live.written_at(k).is_some_and(|w| w > txn.read_at));
                if touched_since {
                    return Err(write_conflict());
                }
            }
            // Read-only sides of a collection dropped meanwhile do not conflict.
            (Some(_), _) if side.writes.is_empty() => {}
            _ => return Err(write_conflict()),
        }
    }
    let commit_ts = log.next_ts();
    let at = crate::engine::ts(commit_ts);
    for ((db, name), side) in std::mem::take(&mut txn.colls) {
        let ns = format!("{db}.{name}");
        if let Some(created) = side.created {
            state
                .dbs
                .entry(db.clone())
                .or_default()
                .insert(name.clone(), created);
        }
        let Some(live) = state.dbs.get(&db).and_then(|d| d.get(&name)) else {
            continue;
        };
        // In the order the transaction wrote them.
        let mut writes: Vec<_> = side.writes.into_iter().collect();
        writes.sort_by_key(|(_, (n, _))| *n);
        for (k, (_, doc)) in writes {
            live.write(&ns, &k, doc.map(Arc::new), at, horizon)?;
        }
    }
    let entries = std::mem::take(&mut txn.entries);
    log.append_txn(entries, (txn.lsid.clone(), txn.txn_number), commit_ts);
    std::mem::drop(log);
    txn.committed = true;
    txn.pin = None;
    state.txns.insert(key, txn);
    Ok(doc! { "ok": 1.0 })
}
