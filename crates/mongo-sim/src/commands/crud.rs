//! Reads and writes of documents: `insert`, `update`, `delete`, `findAndModify`, `find`,
//! `count` and `aggregate` over a collection.

use bson::{Bson, Document, RawDocumentBuf, doc, oid::ObjectId};

use super::{changestreams::open_change_stream, writer::*, *};
use crate::{
    catalog::Collection,
    changestream::to_raw,
    error::{CmdError, CmdResult, code},
    matcher::{Filter, id_range},
    oplog::Op,
    pipeline::{Context, Projection, parse_pipeline, run as run_pipeline, sort_documents},
    state::{State, Txn},
    update::{UpdateSpec, delta},
    wire::MAX_BSON_OBJECT_SIZE,
};

/// The collection a read sees: the transaction's copy if it has one.
fn read_coll<'s>(
    state: &'s State,
    txn: Option<&'s Txn>,
    db: &str,
    name: &str,
) -> Option<&'s Collection> {
    if let Some(c) = txn.and_then(|t| t.workspace.get(&(db.to_owned(), name.to_owned()))) {
        return Some(c);
    }
    state.dbs.get(db).and_then(|d| d.get(name))
}

fn with_id_first(doc: Document) -> Document {
    if doc.keys().next().is_some_and(|k| k == "_id") {
        return doc;
    }
    let mut out = Document::new();
    out.insert(
        "_id",
        doc.get("_id")
            .cloned()
            .unwrap_or_else(|| Bson::ObjectId(ObjectId::new())),
    );
    for (k, v) in doc {
        if k != "_id" {
            out.insert(k, v);
        }
    }
    out
}

/// `insert`.
pub(crate) fn insert(
    state: &mut State,
    txn: Option<&mut Txn>,
    db: &str,
    cmd: &Document,
) -> CmdResult {
    let name = coll_name(cmd, "insert")?;
    let Some(Bson::Array(docs)) = cmd.get("documents") else {
        return Err(CmdError::type_mismatch("documents", "array"));
    };
    let ordered = cmd.get("ordered").and_then(Bson::as_bool).unwrap_or(true);
    let ns = format!("{db}.{name}");
    let mut w = Writer::new(state, txn);
    let mut n = 0;
    let mut write_errors = Vec::new();
    {
        let coll = w
            .coll(db, name, true)?
            .ok_or_else(|| CmdError::bad_value("no collection"))?;
        let uuid = coll.uuid.clone();
        let mut logged = Vec::new();
        for (index, d) in docs.iter().enumerate() {
            let Bson::Document(d) = d else {
                return Err(CmdError::type_mismatch("documents", "array of objects"));
            };
            let d = with_id_first(d.clone());
            match coll.insert(&ns, d.clone()) {
                Ok(()) => {
                    n += 1;
                    logged.push(Op::Insert { doc: d });
                }
                Err(e) => {
                    write_errors
                        .push(doc! { "index": index as i32, "code": e.code, "errmsg": e.message });
                    if ordered {
                        break;
                    }
                }
            }
        }
        for op in logged {
            w.log(db, name, &uuid, op);
        }
    }
    w.finish();
    let mut reply = doc! { "n": n };
    if !write_errors.is_empty() {
        reply.insert("writeErrors", write_errors);
    }
    reply.insert("ok", 1.0);
    Ok(reply)
}

/// Matching record ids in natural order.
fn matching(coll: &Collection, filter: &Filter) -> Vec<u64> {
    coll.docs
        .iter()
        .filter(|(_, d)| filter.matches(d))
        .map(|(rid, _)| *rid)
        .collect()
}

/// The document an upsert starts from: the equality conditions of the filter.
fn upsert_seed(q: &Document) -> Document {
    let mut seed = Document::new();
    for (k, v) in q {
        if k.starts_with('$') {
            continue;
        }
        let value = match v {
            Bson::Document(d) if d.keys().next().is_some_and(|k| k.starts_with('$')) => {
                match d.get("$eq") {
                    Some(v) => v.clone(),
                    None => continue,
                }
            }
            other => other.clone(),
        };
        let _ = crate::value::set_path(&mut seed, k, value);
    }
    seed
}

/// Applies one update to one record and logs it. Returns whether it changed anything.
fn update_one_record(
    w: &mut Writer<'_>,
    db: &str,
    name: &str,
    rid: u64,
    spec: &UpdateSpec,
) -> CmdResult<(bool, Document, Document)> {
    let coll = w
        .coll(db, name, false)?
        .ok_or_else(|| CmdError::bad_value("no collection"))?;
    let old = coll
        .docs
        .get(&rid)
        .cloned()
        .ok_or_else(|| CmdError::bad_value("record vanished"))?;
    let new = spec.apply(&old, false)?;
    if new == old {
        return Ok((false, old, new));
    }
    if new.to_vec().map_or(0, |v| v.len()) > MAX_BSON_OBJECT_SIZE {
        return Err(CmdError::new(
            17419,
            "Resulting document after update is larger than 16777216",
        ));
    }
    coll.replace(rid, new.clone());
    let images = coll.images;
    let uuid = coll.uuid.clone();
    let key = doc! { "_id": new.get("_id").cloned().unwrap_or(Bson::Null) };
    let pre = images.then(|| old.clone());
    let op = if spec.is_replacement() {
        Op::Replace {
            key,
            doc: new.clone(),
            pre,
        }
    } else {
        Op::Update {
            key,
            delta: delta(&old, &new),
            pre,
            post: images.then(|| new.clone()),
        }
    };
    w.log(db, name, &uuid, op);
    Ok((true, old, new))
}

/// Inserts the document of an upsert; returns it.
fn upsert_insert(
    w: &mut Writer<'_>,
    db: &str,
    name: &str,
    q: &Document,
    spec: &UpdateSpec,
) -> CmdResult<Document> {
    let seed = upsert_seed(q);
    let mut new = match spec {
        UpdateSpec::Replacement(r) => {
            let mut d = r.clone();
            if let (None, Some(id)) = (d.get("_id"), seed.get("_id")) {
                d.insert("_id", id.clone());
            }
            d
        }
        _ => spec.apply(&seed, true)?,
    };
    if new.get("_id").is_none() {
        new.insert("_id", ObjectId::new());
    }
    let new = with_id_first(new);
    let ns = format!("{db}.{name}");
    let coll = w
        .coll(db, name, true)?
        .ok_or_else(|| CmdError::bad_value("no collection"))?;
    coll.insert(&ns, new.clone())?;
    let uuid = coll.uuid.clone();
    w.log(db, name, &uuid, Op::Insert { doc: new.clone() });
    Ok(new)
}

/// `update`.
pub(crate) fn update(
    state: &mut State,
    txn: Option<&mut Txn>,
    db: &str,
    cmd: &Document,
) -> CmdResult {
    let name = coll_name(cmd, "update")?;
    let Some(Bson::Array(updates)) = cmd.get("updates") else {
        return Err(CmdError::type_mismatch("updates", "array"));
    };
    let ordered = cmd.get("ordered").and_then(Bson::as_bool).unwrap_or(true);
    let mut w = Writer::new(state, txn);
    let (mut n, mut modified) = (0i64, 0i64);
    let mut upserted = Vec::new();
    let mut write_errors = Vec::new();
    for (index, u) in updates.iter().enumerate() {
        let result = (|| -> CmdResult<()> {
            let Bson::Document(u) = u else {
                return Err(CmdError::type_mismatch("updates", "array of objects"));
            };
            if u.contains_key("arrayFilters") {
                return Err(CmdError::bad_value(
                    "arrayFilters are not supported by mongo-sim",
                ));
            }
            let q = get_doc(u, "q")?.cloned().unwrap_or_default();
            let filter = Filter::parse(&q)?;
            let spec = UpdateSpec::parse(
                u.get("u")
                    .ok_or_else(|| CmdError::bad_value("update statement needs u"))?,
            )?;
            let multi = truthy(u.get("multi"));
            if multi && spec.is_replacement() {
                return Err(CmdError::new(
                    code::FAILED_TO_PARSE,
                    "multi update is not supported for replacement-style update",
                ));
            }
            let rids = match w.coll(db, name, false)? {
                Some(c) => matching(c, &filter),
                None => Vec::new(),
            };
            let rids: Vec<u64> = if multi {
                rids
            } else {
                rids.into_iter().take(1).collect()
            };
            if rids.is_empty() && truthy(u.get("upsert")) {
                let new = upsert_insert(&mut w, db, name, &q, &spec)?;
                n += 1;
                upserted.push(doc! { "index": index as i32, "_id": new.get("_id").cloned().unwrap_or(Bson::Null) });
                return Ok(());
            }
            for rid in rids {
                n += 1;
                if update_one_record(&mut w, db, name, rid, &spec)?.0 {
                    modified += 1;
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            write_errors.push(doc! { "index": index as i32, "code": e.code, "errmsg": e.message });
            if ordered {
                break;
            }
        }
    }
    w.finish();
    let mut reply = doc! { "n": n as i32, "nModified": modified as i32 };
    if !upserted.is_empty() {
        reply.insert("upserted", upserted);
    }
    if !write_errors.is_empty() {
        reply.insert("writeErrors", write_errors);
    }
    reply.insert("ok", 1.0);
    Ok(reply)
}

/// `delete`.
pub(crate) fn delete(
    state: &mut State,
    txn: Option<&mut Txn>,
    db: &str,
    cmd: &Document,
) -> CmdResult {
    let name = coll_name(cmd, "delete")?;
    let Some(Bson::Array(deletes)) = cmd.get("deletes") else {
        return Err(CmdError::type_mismatch("deletes", "array"));
    };
    let mut w = Writer::new(state, txn);
    let mut n = 0i32;
    for d in deletes {
        let Bson::Document(d) = d else {
            return Err(CmdError::type_mismatch("deletes", "array of objects"));
        };
        let q = get_doc(d, "q")?.cloned().unwrap_or_default();
        let filter = Filter::parse(&q)?;
        let limit = get_usize(d, "limit")?.unwrap_or(0);
        let Some(coll) = w.coll(db, name, false)? else {
            continue;
        };
        let mut rids = matching(coll, &filter);
        if limit == 1 {
            rids.truncate(1);
        }
        let images = coll.images;
        let uuid = coll.uuid.clone();
        let mut ops = Vec::new();
        for rid in rids {
            if let Some(old) = coll.remove(rid) {
                n += 1;
                let key = doc! { "_id": old.get("_id").cloned().unwrap_or(Bson::Null) };
                ops.push(Op::Delete {
                    key,
                    pre: images.then_some(old),
                });
            }
        }
        for op in ops {
            w.log(db, name, &uuid, op);
        }
    }
    w.finish();
    Ok(doc! { "n": n, "ok": 1.0 })
}

/// `findAndModify`.
pub(crate) fn find_and_modify(
    state: &mut State,
    txn: Option<&mut Txn>,
    db: &str,
    cmd: &Document,
) -> CmdResult {
    let name = coll_name(cmd, "findAndModify")?;
    let q = get_doc(cmd, "query")?.cloned().unwrap_or_default();
    let filter = Filter::parse(&q)?;
    let remove = truthy(cmd.get("remove"));
    let return_new = truthy(cmd.get("new"));
    let upsert = truthy(cmd.get("upsert"));
    let projection = get_doc(cmd, "fields")?.map(Projection::parse).transpose()?;
    let spec = match (cmd.get("update"), remove) {
        (Some(u), false) => Some(UpdateSpec::parse(u)?),
        (None, true) => None,
        (Some(_), true) => {
            return Err(CmdError::new(
                code::FAILED_TO_PARSE,
                "Cannot specify both an update and remove=true",
            ));
        }
        (None, false) => {
            return Err(CmdError::new(
                code::FAILED_TO_PARSE,
                "Either an update or remove=true must be specified",
            ));
        }
    };
    let mut w = Writer::new(state, txn);
    let target = match w.coll(db, name, false)? {
        Some(coll) => {
            let mut docs: Vec<(u64, Document)> = coll
                .docs
                .iter()
                .filter(|(_, d)| filter.matches(d))
                .map(|(r, d)| (*r, d.clone()))
                .collect();
            if let Some(sort) = get_doc(cmd, "sort")? {
                let mut only: Vec<Document> = docs.iter().map(|(_, d)| d.clone()).collect();
                sort_documents(&mut only, sort)?;
                if let Some(first) = only.first() {
                    let id = first.get("_id").cloned().unwrap_or(Bson::Null);
                    docs.retain(|(_, d)| d.get("_id") == Some(&id));
                }
            }
            docs.into_iter().next()
        }
        None => None,
    };
    let project = |d: Document| -> CmdResult<Bson> {
        Ok(Bson::Document(match &projection {
            Some(p) => p.apply(&d)?,
            None => d,
        }))
    };
    let (value, last_error) = match (target, spec) {
        (Some((rid, old)), None) => {
            let coll = w
                .coll(db, name, false)?
                .ok_or_else(|| CmdError::bad_value("no collection"))?;
            coll.remove(rid);
            let (images, uuid) = (coll.images, coll.uuid.clone());
            let key = doc! { "_id": old.get("_id").cloned().unwrap_or(Bson::Null) };
            w.log(
                db,
                name,
                &uuid,
                Op::Delete {
                    key,
                    pre: images.then(|| old.clone()),
                },
            );
            (project(old)?, doc! { "n": 1 })
        }
        (Some((rid, _)), Some(spec)) => {
            let (_, old, new) = update_one_record(&mut w, db, name, rid, &spec)?;
            let shown = if return_new { new } else { old };
            (project(shown)?, doc! { "n": 1, "updatedExisting": true })
        }
        (None, Some(spec)) if upsert => {
            let new = upsert_insert(&mut w, db, name, &q, &spec)?;
            let id = new.get("_id").cloned().unwrap_or(Bson::Null);
            let value = if return_new {
                project(new)?
            } else {
                Bson::Null
            };
            (
                value,
                doc! { "n": 1, "updatedExisting": false, "upserted": id },
            )
        }
        (None, _) => (Bson::Null, doc! { "n": 0, "updatedExisting": false }),
    };
    w.finish();
    Ok(doc! { "lastErrorObject": last_error, "value": value, "ok": 1.0 })
}

/// `find`.
/// `find` on `local.oplog.rs`: the retained entries as a client reads them
/// ([`crate::oplog::OplogEntry::to_document`]), in natural order (`{$natural: 1}`, also
/// without a sort) or newest first (`{$natural: -1}`), filtered, skipped and limited as
/// they are read (the first or last entry costs one entry, not the whole log); another
/// sort orders the filtered entries.
fn read_oplog(
    state: &State,
    filter: &Filter,
    sort: Option<&Document>,
    skip: usize,
    take: usize,
) -> CmdResult<Vec<Document>> {
    let natural = match sort {
        None => Some(true),
        Some(s) if s.len() == 1 && s.contains_key("$natural") => match s.get("$natural") {
            Some(Bson::Int32(1) | Bson::Int64(1)) => Some(true),
            Some(Bson::Double(d)) if *d == 1.0 => Some(true),
            Some(Bson::Int32(-1) | Bson::Int64(-1)) => Some(false),
            Some(Bson::Double(d)) if *d == -1.0 => Some(false),
            _ => return Err(CmdError::bad_value("$natural must be 1 or -1")),
        },
        Some(_) => None,
    };
    let entries = &state.log.entries;
    let in_order: Box<dyn Iterator<Item = &crate::oplog::OplogEntry>> = match natural {
        Some(false) => Box::new(entries.iter().rev()),
        _ => Box::new(entries.iter()),
    };
    let matching = in_order
        .map(crate::oplog::OplogEntry::to_document)
        .filter(|d| filter.matches(d));
    Ok(match (natural, sort) {
        (None, Some(sort)) => {
            let mut docs: Vec<Document> = matching.collect();
            sort_documents(&mut docs, sort)?;
            docs.into_iter().skip(skip).take(take).collect()
        }
        _ => matching.skip(skip).take(take).collect(),
    })
}

pub(crate) fn find(state: &mut State, txn: Option<&Txn>, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "find")?;
    let filter = Filter::parse(&get_doc(cmd, "filter")?.cloned().unwrap_or_default())?;
    let projection = get_doc(cmd, "projection")?
        .map(Projection::parse)
        .transpose()?;
    let sort = get_doc(cmd, "sort")?;
    let skip = get_count(cmd, "skip")?.unwrap_or(0);
    let limit = get_usize(cmd, "limit")?.unwrap_or(0);
    let take = if limit == 0 {
        usize::MAX
    } else {
        limit.unsigned_abs() as usize
    };
    let oplog = db == "local" && name == "oplog.rs";
    let mut docs: Vec<Document> = if oplog {
        read_oplog(state, &filter, sort, skip, take)?
    } else {
        match (read_coll(state, txn, db, name), sort.and_then(id_order)) {
            // Sorted by `_id` alone: a scan of the `_id` index over the filter's range, which
            // stops at the limit.
            (Some(c), Some(ascending)) => match id_range(&filter) {
                Some(range) => {
                    let rids = c.order.range(range).map(|(_, rid)| rid);
                    let rids: Box<dyn Iterator<Item = &u64>> = if ascending {
                        Box::new(rids)
                    } else {
                        Box::new(rids.rev())
                    };
                    rids.filter_map(|rid| c.docs.get(rid))
                        .filter(|d| filter.matches(d))
                        .skip(skip)
                        .take(take)
                        .cloned()
                        .collect()
                }
                None => Vec::new(),
            },
            (Some(c), None) => {
                let mut docs: Vec<Document> = c
                    .docs
                    .values()
                    .filter(|d| filter.matches(d))
                    .cloned()
                    .collect();
                if let Some(sort) = sort {
                    sort_documents(&mut docs, sort)?;
                }
                docs.into_iter().skip(skip).take(take).collect()
            }
            (None, _) => Vec::new(),
        }
    };
    let mut single = truthy(cmd.get("singleBatch"));
    if limit != 0 {
        single |= limit < 0;
    }
    if let Some(p) = &projection {
        docs = docs.iter().map(|d| p.apply(d)).collect::<CmdResult<_>>()?;
    }
    let batch = get_count(cmd, "batchSize")?.unwrap_or(DEFAULT_BATCH);
    Ok(cursor_reply(
        state,
        format!("{db}.{name}"),
        docs.into(),
        batch,
        single,
    ))
}

/// `Some(ascending)` when a sort specification is `{ _id: 1 }` or `{ _id: -1 }`.
fn id_order(sort: &Document) -> Option<bool> {
    if sort.len() != 1 {
        return None;
    }
    match sort.get("_id")? {
        Bson::Int32(1) | Bson::Int64(1) => Some(true),
        Bson::Int32(-1) | Bson::Int64(-1) => Some(false),
        Bson::Double(d) if *d == 1.0 => Some(true),
        Bson::Double(d) if *d == -1.0 => Some(false),
        _ => None,
    }
}

/// `count`.
pub(crate) fn count(state: &State, txn: Option<&Txn>, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "count")?;
    let filter = Filter::parse(&get_doc(cmd, "query")?.cloned().unwrap_or_default())?;
    let n = read_coll(state, txn, db, name)
        .map_or(0, |c| c.docs.values().filter(|d| filter.matches(d)).count());
    let skip = get_count(cmd, "skip")?.unwrap_or(0);
    let mut n = n.saturating_sub(skip);
    if let Some(limit) = get_usize(cmd, "limit")?
        && limit != 0
    {
        n = n.min(limit.unsigned_abs() as usize);
    }
    Ok(doc! { "n": n as i32, "ok": 1.0 })
}

/// `aggregate`: a change stream when the first stage is `$changeStream`.
pub(crate) fn aggregate(
    state: &mut State,
    txn: Option<&Txn>,
    db: &str,
    cmd: &Document,
) -> CmdResult<RawDocumentBuf> {
    let target = cmd
        .get("aggregate")
        .ok_or_else(|| CmdError::bad_value("aggregate needs a target"))?;
    let Some(Bson::Array(pipeline)) = cmd.get("pipeline") else {
        return Err(CmdError::type_mismatch("pipeline", "array"));
    };
    let cursor_opts = get_doc(cmd, "cursor")?
        .ok_or_else(|| CmdError::new(code::FAILED_TO_PARSE, "The 'cursor' option is required"))?;
    let batch = get_count(cursor_opts, "batchSize")?.unwrap_or(DEFAULT_BATCH);
    if let Some(Bson::Document(first)) = pipeline.first()
        && let Some(spec) = first.get("$changeStream")
    {
        return open_change_stream(state, txn.is_some(), db, cmd, spec, pipeline, batch);
    }
    if pipeline
        .iter()
        .any(|s| matches!(s, Bson::Document(d) if d.contains_key("$changeStreamSplitLargeEvent")))
    {
        return Err(CmdError::new(
            code::ILLEGAL_OPERATION,
            "$changeStreamSplitLargeEvent can only be used in a $changeStream pipeline",
        ));
    }
    if pipeline
        .iter()
        .any(|s| matches!(s, Bson::Document(d) if d.contains_key("$changeStream")))
    {
        return Err(CmdError::new(
            40602,
            "$changeStream is only valid as the first stage in a pipeline",
        ));
    }
    let Bson::String(name) = target else {
        return Err(CmdError::bad_value(
            "aggregate: 1 supports only $changeStream in mongo-sim",
        ));
    };
    let stages = parse_pipeline(pipeline, Context::Aggregate)?;
    let docs: Vec<Document> = read_coll(state, txn, db, name)
        .map_or_else(Vec::new, |c| c.docs.values().cloned().collect());
    let out = run_pipeline(&stages, docs)?;
    to_raw(&cursor_reply(
        state,
        format!("{db}.{name}"),
        out.into(),
        batch,
        false,
    ))
}

/// `distinct`: the distinct values at `key` among the documents matching `query`, in
/// the order first seen; arrays contribute their elements.
pub(crate) fn distinct(state: &State, txn: Option<&Txn>, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "distinct")?;
    let key = match cmd.get("key") {
        Some(Bson::String(k)) if !k.is_empty() => k.as_str(),
        Some(Bson::String(_)) => {
            return Err(CmdError::bad_value(
                "FieldPath cannot be constructed with empty string",
            ));
        }
        _ => return Err(CmdError::type_mismatch("distinct.key", "string")),
    };
    let filter = Filter::parse(&get_doc(cmd, "query")?.cloned().unwrap_or_default())?;
    let mut values: Vec<Bson> = Vec::new();
    if let Some(c) = read_coll(state, txn, db, name) {
        for doc in c.docs.values().filter(|d| filter.matches(d)) {
            for v in crate::value::query_values(doc, key).into_iter().flatten() {
                let items = match v {
                    Bson::Array(items) => items.clone(),
                    other => vec![other.clone()],
                };
                for item in items {
                    if !values.iter().any(|seen| crate::value::equal(seen, &item)) {
                        values.push(item);
                    }
                }
            }
        }
    }
    Ok(doc! { "values": values, "ok": 1.0 })
}
