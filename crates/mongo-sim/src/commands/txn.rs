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

/// `commitTransaction`: installs what the transaction wrote and publishes its entries
/// with one shared cluster time. It conflicts (WriteConflict, 112, labelled
/// `TransientTransactionError`) only when another write committed since the transaction
/// took its copy touched a document the transaction wrote, or the collection was created,
/// dropped or re-created meanwhile: two transactions on different documents of one
/// collection both commit, as WiredTiger lets them.
pub(crate) fn commit_transaction(state: &mut State, key: Vec<u8>, mut txn: Txn) -> CmdResult {
    if txn.committed {
        state.txns.insert(key, txn);
        return Ok(doc! { "ok": 1.0 });
    }
    let conflict = || {
        CmdError::new(
            code::WRITE_CONFLICT,
            "Write conflict during plan execution and yielding is disabled.",
        )
        .with_label("TransientTransactionError")
    };
    // The version each touched collection had when the transaction copied it (`None`:
    // created inside the transaction).
    let bases = std::mem::take(&mut txn.base_versions);
    let base_of = |key: &(String, String)| bases.get(key).copied().flatten();
    for (key, copy) in &txn.workspace {
        let (db, name) = key;
        let base = base_of(key);
        let live = state.dbs.get(db).and_then(|d| d.get(name));
        match (base, live) {
            (None, None) => {}
            (None, Some(_)) | (Some(_), None) => return Err(conflict()),
            (Some(base), Some(live)) => {
                if live.uuid != copy.uuid {
                    return Err(conflict());
                }
                let touched_since = copy
                    .written
                    .iter()
                    .filter(|(_, v)| **v > base)
                    .any(|(k, _)| live.written.get(k).is_some_and(|lv| *lv > base));
                if touched_since {
                    return Err(conflict());
                }
            }
        }
    }
    for (key, copy) in std::mem::take(&mut txn.workspace) {
        let base = base_of(&key);
        let (db, name) = key;
        let ns = format!("{db}.{name}");
        let Some(base) = base else {
            // Created inside the transaction: installed whole.
            let mut copy = copy;
            copy.version += 1;
            state.dbs.entry(db).or_default().insert(name, copy);
            continue;
        };
        let Some(live) = state.dbs.get_mut(&db).and_then(|d| d.get_mut(&name)) else {
            continue;
        };
        // In the order the transaction wrote them.
        let mut touched: Vec<(&Vec<u8>, u64)> = copy
            .written
            .iter()
            .filter(|(_, v)| **v > base)
            .map(|(k, v)| (k, *v))
            .collect();
        touched.sort_by_key(|(_, v)| *v);
        for (k, _) in touched {
            match copy.ids.get(k).and_then(|rid| copy.docs.get(rid)) {
                Some(doc) => live.put(&ns, doc.clone())?,
                None => live.remove_key(k),
            }
        }
        // Settings the transaction changed on its copy (pre- and post-images, indexes).
        live.images = copy.images;
        live.indexes = copy.indexes;
    }
    let entries = std::mem::take(&mut txn.entries);
    state
        .log
        .append(entries, Some((txn.lsid.clone(), txn.txn_number)));
    txn.committed = true;
    state.txns.insert(key, txn);
    Ok(doc! { "ok": 1.0 })
}
