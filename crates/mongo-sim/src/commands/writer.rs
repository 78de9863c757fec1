//! Where a command's writes go (the live collections or a transaction's copies) and the
//! oplog entries they leave.

use bson::{Document, doc};

use crate::{
    catalog::Collection,
    error::{CmdError, CmdResult, code},
    oplog::{Op, PendingEntry},
    state::{State, Txn},
};

/// Where writes of one command go: the live collections, or a transaction's copies.
pub(crate) struct Writer<'a> {
    pub(crate) state: &'a mut State,
    txn: Option<&'a mut Txn>,
    entries: Vec<PendingEntry>,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(state: &'a mut State, txn: Option<&'a mut Txn>) -> Self {
        Self {
            state,
            txn,
            entries: Vec::new(),
        }
    }

    /// The collection to write, created (with a `create` entry) when missing and `create`.
    pub(crate) fn coll(
        &mut self,
        db: &str,
        name: &str,
        create: bool,
    ) -> CmdResult<Option<&mut Collection>> {
        validate_ns(db, name)?;
        let key = (db.to_owned(), name.to_owned());
        let live = self.state.dbs.get(db).and_then(|d| d.get(name));
        if live.is_some_and(|c| c.view.is_some()) {
            return Err(CmdError::new(
                166,
                format!("Namespace {db}.{name} is a view, not a collection"),
            ));
        }
        let exists_live = live.is_some();
        if let Some(txn) = self.txn.as_deref_mut() {
            if !txn.workspace.contains_key(&key) {
                let base = live.map(|c| c.version);
                let copy = match live {
                    Some(c) => c.clone(),
                    None if create => {
                        let c = Collection::new();
                        self.entries
                            .push(create_entry(db, name, &c, Document::new()));
                        c
                    }
                    None => return Ok(None),
                };
                txn.base_versions.insert(key.clone(), base);
                txn.workspace.insert(key.clone(), copy);
            }
            return Ok(txn.workspace.get_mut(&key));
        }
        if !exists_live {
            if !create {
                return Ok(None);
            }
            let c = Collection::new();
            self.entries
                .push(create_entry(db, name, &c, Document::new()));
            self.state
                .dbs
                .entry(db.to_owned())
                .or_default()
                .insert(name.to_owned(), c);
        }
        Ok(self.state.dbs.get_mut(db).and_then(|d| d.get_mut(name)))
    }

    pub(crate) fn log(&mut self, db: &str, coll: &str, uuid: &bson::Binary, op: Op) {
        self.entries.push(PendingEntry {
            db: db.to_owned(),
            coll: coll.to_owned(),
            uuid: Some(uuid.clone()),
            op,
        });
    }

    pub(crate) fn finish(self) {
        match self.txn {
            Some(txn) => txn.entries.extend(self.entries),
            None => self.state.log.append(self.entries, None),
        }
    }
}

pub(crate) fn create_entry(
    db: &str,
    name: &str,
    c: &Collection,
    description: Document,
) -> PendingEntry {
    let mut description = description;
    if !description.contains_key("viewOn") {
        description.insert(
            "idIndex",
            doc! { "v": 2, "key": { "_id": 1 }, "name": "_id_" },
        );
    }
    PendingEntry {
        db: db.to_owned(),
        coll: name.to_owned(),
        uuid: Some(c.uuid.clone()),
        op: Op::Create { description },
    }
}

pub(crate) fn validate_ns(db: &str, coll: &str) -> CmdResult<()> {
    if db.is_empty() || db.contains(['/', '\\', '.', ' ', '"', '$', '\0']) {
        return Err(CmdError::new(
            code::INVALID_NAMESPACE,
            format!("Invalid database name: '{db}'"),
        ));
    }
    if coll.is_empty() || coll.contains(['$', '\0']) {
        return Err(CmdError::new(
            code::INVALID_NAMESPACE,
            format!("Invalid collection name: '{coll}'"),
        ));
    }
    Ok(())
}
