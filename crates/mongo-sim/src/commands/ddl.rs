//! Collections, databases and indexes: create, drop, rename, modify and list them.

use std::collections::VecDeque;

use bson::{Bson, Document, doc};

use super::{writer::*, *};
use crate::{
    catalog::Collection,
    error::{CmdError, CmdResult, code},
    matcher::Filter,
    oplog::{Op, PendingEntry},
    state::State,
};

/// `create`.
pub(crate) fn create(state: &mut State, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "create")?;
    validate_ns(db, name)?;
    if state.dbs.get(db).is_some_and(|d| d.contains_key(name)) {
        return Err(CmdError::new(
            code::NAMESPACE_EXISTS,
            format!("Collection {db}.{name} already exists."),
        ));
    }
    let mut c = Collection::new();
    let mut description = Document::new();
    if let Some(view_on) = cmd.get("viewOn") {
        let Bson::String(view_on) = view_on else {
            return Err(CmdError::type_mismatch("viewOn", "string"));
        };
        let pipeline = match cmd.get("pipeline") {
            Some(Bson::Array(p)) => p.clone(),
            None => Vec::new(),
            Some(_) => return Err(CmdError::type_mismatch("pipeline", "array")),
        };
        description.insert("viewOn", view_on.clone());
        description.insert("pipeline", pipeline.clone());
        c.view = Some((view_on.clone(), pipeline));
    }
    if let Some(images) = get_doc(cmd, "changeStreamPreAndPostImages")? {
        c.images = truthy(images.get("enabled"));
        description.insert("changeStreamPreAndPostImages", images.clone());
    }
    if cmd.contains_key("recordPreImages") {
        return Err(record_pre_images_refused());
    }
    let entry = create_entry(db, name, &c, description);
    state
        .dbs
        .entry(db.to_owned())
        .or_default()
        .insert(name.to_owned(), c);
    state.log.lock().append(vec![entry], None);
    Ok(doc! { "ok": 1.0 })
}

fn record_pre_images_refused() -> CmdError {
    CmdError::new(
        code::INVALID_OPTIONS,
        "option 'recordPreImages' is not supported on MongoDB 6.0 and later; use changeStreamPreAndPostImages",
    )
}

/// `drop`.
pub(crate) fn drop(state: &mut State, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "drop")?;
    let Some(c) = state.dbs.get_mut(db).and_then(|d| d.remove(name)) else {
        // MongoDB 7.0 answers ok for a collection that does not exist.
        return Ok(doc! { "ok": 1.0 });
    };
    if state.dbs.get(db).is_some_and(|d| d.is_empty()) {
        state.dbs.remove(db);
    }
    let n_indexes = c.indexes.len() as i32 + 1;
    let entry = PendingEntry {
        db: db.to_owned(),
        coll: name.to_owned(),
        uuid: Some(c.uuid.clone()),
        op: Op::Drop,
    };
    let at = log_epoch_end(&state.log, [&c], vec![entry]);
    state.replaced(format!("{db}.{name}"), at);
    Ok(doc! { "nIndexesWas": n_indexes, "ns": format!("{db}.{name}"), "ok": 1.0 })
}

/// `dropDatabase`: a `drop` entry per collection, then `dropDatabase`.
pub(crate) fn drop_database(state: &mut State, db: &str) -> CmdResult {
    let Some(colls) = state.dbs.remove(db) else {
        return Ok(doc! { "ok": 1.0 });
    };

    let mut entries: Vec<PendingEntry> = colls
        .iter()
        .map(|(name, c)| PendingEntry {
            db: db.to_owned(),
            coll: name.clone(),
            uuid: Some(c.uuid.clone()),
            op: Op::Drop,
        })
        .collect();
    entries.push(PendingEntry {
        db: db.to_owned(),
        coll: String::new(),
        uuid: None,
        op: Op::DropDatabase,
    });
    let at = log_epoch_end(&state.log, colls.values(), entries);
    state.replaced(db.to_owned(), at);
    Ok(doc! { "dropped": db, "ok": 1.0 })
}

fn split_ns(ns: &str) -> CmdResult<(&str, &str)> {
    ns.split_once('.')
        .filter(|(d, c)| !d.is_empty() && !c.is_empty())
        .ok_or_else(|| {
            CmdError::new(
                code::INVALID_NAMESPACE,
                format!("Invalid namespace specified '{ns}'"),
            )
        })
}

/// `renameCollection` (on `admin`).
pub(crate) fn rename_collection(state: &mut State, db: &str, cmd: &Document) -> CmdResult {
    if db != "admin" {
        return Err(CmdError::new(
            code::UNAUTHORIZED,
            "renameCollection may only be run against the admin database.",
        ));
    }
    let from = cmd
        .get_str("renameCollection")
        .map_err(|_| CmdError::type_mismatch("renameCollection", "string"))?;
    let to = cmd
        .get_str("to")
        .map_err(|_| CmdError::type_mismatch("to", "string"))?;
    let (from_db, from_coll) = split_ns(from)?;
    let (to_db, to_coll) = split_ns(to)?;
    validate_ns(to_db, to_coll)?;
    let drop_target = truthy(cmd.get("dropTarget"));
    if !state
        .dbs
        .get(from_db)
        .is_some_and(|d| d.contains_key(from_coll))
    {
        return Err(CmdError::new(
            code::NAMESPACE_NOT_FOUND,
            format!("Source collection {from} does not exist"),
        ));
    }
    if from == to {
        return Err(CmdError::new(
            code::ILLEGAL_OPERATION,
            "Can't rename a collection to itself",
        ));
    }
    let target_uuid = state
        .dbs
        .get(to_db)
        .and_then(|d| d.get(to_coll))
        .map(|c| c.uuid.clone());
    if target_uuid.is_some() && !drop_target {
        return Err(CmdError::new(
            code::NAMESPACE_EXISTS,
            format!("target namespace {to} exists"),
        ));
    }
    let coll = state
        .dbs
        .get_mut(from_db)
        .and_then(|d| d.remove(from_coll))
        .ok_or_else(|| CmdError::new(code::NAMESPACE_NOT_FOUND, "source vanished"))?;
    if state.dbs.get(from_db).is_some_and(|d| d.is_empty()) {
        state.dbs.remove(from_db);
    }
    let entry = PendingEntry {
        db: from_db.to_owned(),
        coll: from_coll.to_owned(),
        uuid: Some(coll.uuid.clone()),
        op: Op::Rename {
            to_db: to_db.to_owned(),
            to_coll: to_coll.to_owned(),
            drop_target: target_uuid,
        },
    };
    // Writes prepared against either name are refused from the rename on.
    let target = state.dbs.get(to_db).and_then(|d| d.get(to_coll));
    let at = log_epoch_end(&state.log, target.into_iter().chain([&coll]), vec![entry]);
    state
        .dbs
        .entry(to_db.to_owned())
        .or_default()
        .insert(to_coll.to_owned(), coll);
    state.replaced(format!("{from_db}.{from_coll}"), at);
    state.replaced(format!("{to_db}.{to_coll}"), at);
    Ok(doc! { "ok": 1.0 })
}

/// `collMod`: `changeStreamPreAndPostImages`; other options are recorded.
pub(crate) fn coll_mod(state: &mut State, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "collMod")?;
    if cmd.contains_key("recordPreImages") {
        return Err(record_pre_images_refused());
    }
    let c = state
        .dbs
        .get_mut(db)
        .and_then(|d| d.get_mut(name))
        .ok_or_else(|| {
            CmdError::new(
                code::NAMESPACE_NOT_FOUND,
                format!("ns does not exist: {db}.{name}"),
            )
        })?;
    let mut description = Document::new();
    for (k, v) in cmd {
        if k == "collMod"
            || k.starts_with('$')
            || matches!(
                k.as_str(),
                "lsid" | "txnNumber" | "writeConcern" | "comment"
            )
        {
            continue;
        }
        if k == "changeStreamPreAndPostImages" {
            let Bson::Document(d) = v else {
                return Err(CmdError::type_mismatch(
                    "changeStreamPreAndPostImages",
                    "object",
                ));
            };
            c.images = truthy(d.get("enabled"));
        }
        description.insert(k.clone(), v.clone());
    }
    let entry = PendingEntry {
        db: db.to_owned(),
        coll: name.to_owned(),
        uuid: Some(c.uuid.clone()),
        op: Op::Modify { description },
    };
    // Writes prepared with the old settings are prepared again.
    log_epoch_end(&state.log, [&*c], vec![entry]);
    Ok(doc! { "ok": 1.0 })
}

/// `createIndexes`.
pub(crate) fn create_indexes(state: &mut State, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "createIndexes")?;
    let Some(Bson::Array(specs)) = cmd.get("indexes") else {
        return Err(CmdError::type_mismatch("indexes", "array"));
    };
    let existed = state.dbs.get(db).is_some_and(|d| d.contains_key(name));
    resolve(state, db, name, true)?;
    let coll = state
        .dbs
        .get_mut(db)
        .and_then(|d| d.get_mut(name))
        .ok_or_else(|| CmdError::bad_value("no collection"))?;
    let before = coll.indexes.len() as i32 + 1;
    let mut added = Vec::new();
    for spec in specs {
        let Bson::Document(spec) = spec else {
            return Err(CmdError::type_mismatch("indexes", "array of objects"));
        };
        let index_name = spec
            .get_str("name")
            .map_err(|_| CmdError::bad_value("index specification needs a name"))?;
        get_doc(spec, "key")?
            .ok_or_else(|| CmdError::bad_value("index specification needs a key"))?;
        if index_name == "_id_"
            || coll
                .indexes
                .iter()
                .any(|i| i.get_str("name").ok() == Some(index_name))
        {
            continue;
        }
        let mut full = doc! { "v": 2 };
        for (k, v) in spec {
            full.insert(k.clone(), v.clone());
        }
        coll.indexes.push(full.clone());
        added.push(full);
    }
    let after = coll.indexes.len() as i32 + 1;
    let uuid = coll.uuid.clone();
    if !added.is_empty() {
        state.log.lock().append_one(PendingEntry {
            db: db.to_owned(),
            coll: name.to_owned(),
            uuid: Some(uuid),
            op: Op::CreateIndexes { indexes: added },
        });
    }
    Ok(doc! {
        "numIndexesBefore": before,
        "numIndexesAfter": after,
        "createdCollectionAutomatically": !existed,
        "ok": 1.0,
    })
}

/// `dropIndexes`.
pub(crate) fn drop_indexes(state: &mut State, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "dropIndexes")?;
    let c = state
        .dbs
        .get_mut(db)
        .and_then(|d| d.get_mut(name))
        .ok_or_else(|| {
            CmdError::new(
                code::NAMESPACE_NOT_FOUND,
                format!("ns not found {db}.{name}"),
            )
        })?;
    let before = c.indexes.len() as i32 + 1;
    let dropped: Vec<Document> = match cmd.get("index") {
        Some(Bson::String(s)) if s == "*" => std::mem::take(&mut c.indexes),
        Some(Bson::String(s)) => {
            let pos = c
                .indexes
                .iter()
                .position(|i| i.get_str("name").ok() == Some(s.as_str()))
                .ok_or_else(|| {
                    CmdError::new(
                        code::INDEX_NOT_FOUND,
                        format!("index not found with name [{s}]"),
                    )
                })?;
            vec![c.indexes.remove(pos)]
        }
        Some(Bson::Document(key)) => {
            let pos = c
                .indexes
                .iter()
                .position(|i| i.get_document("key").ok() == Some(key))
                .ok_or_else(|| {
                    CmdError::new(
                        code::INDEX_NOT_FOUND,
                        format!("can't find index with key: {key}"),
                    )
                })?;
            vec![c.indexes.remove(pos)]
        }
        _ => return Err(CmdError::type_mismatch("index", "string or object")),
    };
    let uuid = c.uuid.clone();
    if !dropped.is_empty() {
        state.log.lock().append(
            vec![PendingEntry {
                db: db.to_owned(),
                coll: name.to_owned(),
                uuid: Some(uuid),
                op: Op::DropIndexes { indexes: dropped },
            }],
            None,
        );
    }
    Ok(doc! { "nIndexesWas": before, "ok": 1.0 })
}

/// The first batch size of a listing command's optional `cursor: { batchSize }`.
fn listing_batch(cmd: &Document) -> CmdResult<usize> {
    Ok(get_doc(cmd, "cursor")?
        .and_then(|c| get_usize(c, "batchSize").ok().flatten())
        .map_or(DEFAULT_BATCH, |n| n.max(0) as usize))
}

/// `listIndexes`.
pub(crate) fn list_indexes(state: &mut State, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "listIndexes")?;
    let c = state.dbs.get(db).and_then(|d| d.get(name)).ok_or_else(|| {
        CmdError::new(
            code::NAMESPACE_NOT_FOUND,
            format!("ns does not exist: {db}.{name}"),
        )
    })?;
    let mut docs: VecDeque<Document> = VecDeque::new();
    docs.push_back(doc! { "v": 2, "key": { "_id": 1 }, "name": "_id_" });
    docs.extend(c.indexes.iter().cloned());
    let batch = listing_batch(cmd)?;
    cursor_reply(state, format!("{db}.$cmd.listIndexes"), docs, batch, false)
}

/// `listCollections`.
pub(crate) fn list_collections(state: &mut State, db: &str, cmd: &Document) -> CmdResult {
    let filter = Filter::parse(&get_doc(cmd, "filter")?.cloned().unwrap_or_default())?;
    let name_only = truthy(cmd.get("nameOnly"));
    let mut docs = VecDeque::new();
    if let Some(colls) = state.dbs.get(db) {
        for (name, c) in colls {
            let kind = if c.view.is_some() {
                "view"
            } else {
                "collection"
            };
            let mut options = Document::new();
            if let Some((on, pipeline)) = &c.view {
                options.insert("viewOn", on.clone());
                options.insert("pipeline", pipeline.clone());
            }
            if c.images {
                options.insert("changeStreamPreAndPostImages", doc! { "enabled": true });
            }
            let info = doc! {
                "name": name.clone(),
                "type": kind,
                "options": options,
                "info": { "readOnly": c.view.is_some(), "uuid": c.uuid.clone() },
                "idIndex": { "v": 2, "key": { "_id": 1 }, "name": "_id_" },
            };
            if filter.matches(&info) {
                docs.push_back(if name_only {
                    doc! { "name": name.clone(), "type": kind }
                } else {
                    info
                });
            }
        }
    }
    let batch = listing_batch(cmd)?;
    cursor_reply(
        state,
        format!("{db}.$cmd.listCollections"),
        docs,
        batch,
        false,
    )
}

/// `listDatabases`.
pub(crate) fn list_databases(state: &State, cmd: &Document) -> CmdResult {
    let filter = Filter::parse(&get_doc(cmd, "filter")?.cloned().unwrap_or_default())?;
    let name_only = truthy(cmd.get("nameOnly"));
    let mut dbs = Vec::new();
    for (name, colls) in &state.dbs {
        let size: i64 = colls
            .values()
            .map(|c| i64::try_from(c.data_size()).unwrap_or(i64::MAX))
            .sum();
        let info = if name_only {
            doc! { "name": name.clone() }
        } else {
            doc! { "name": name.clone(), "sizeOnDisk": size, "empty": colls.values().all(|c| c.len() == 0) }
        };
        if filter.matches(&info) {
            dbs.push(info);
        }
    }
    Ok(doc! { "databases": dbs, "totalSize": 0_i64, "ok": 1.0 })
}
