//! Reads and writes of documents: `insert`, `update`, `delete`, `findAndModify`, `find`,
//! `count` and `aggregate` over a collection.

use bson::{Bson, Document, RawDocumentBuf, doc, oid::ObjectId};

use super::{changestreams::open_change_stream, sharding, writer::*, *};
use crate::{
    engine::{Position, View},
    error::{CmdError, CmdResult, code},
    matcher::{Filter, id_range},
    pipeline::{Context, Projection, Stage, parse_pipeline, sort_documents},
    state::{State, Txn, TxnRead},
    update::UpdateSpec,
    wire::MAX_BSON_OBJECT_SIZE,
};

/// What a read sees of a collection: a view at the newest time, or what a transaction
/// sees (its snapshot and its own writes). `None` when there is no such collection.
pub(crate) enum ReadSource {
    /// A view outside a transaction.
    View(View),
    /// What a transaction sees.
    Txn(TxnRead),
}

impl ReadSource {
    /// How many documents `filter` matches.
    pub(crate) fn count(&self, filter: &Filter) -> usize {
        match self {
            Self::View(v) => v.all().iter().filter(|d| filter.matches(d)).count(),
            Self::Txn(t) => t.docs().iter().filter(|d| filter.matches(d)).count(),
        }
    }

    /// Every document, in natural order.
    pub(crate) fn all(&self) -> Vec<Document> {
        match self {
            Self::View(v) => v.all().into_iter().map(|d| (*d).clone()).collect(),
            Self::Txn(t) => t.docs(),
        }
    }
}

/// When a read reads: in a transaction, or at a cluster time.
#[derive(Clone, Copy)]
pub(crate) enum Read<'t> {
    /// In this transaction.
    Txn(&'t Txn),
    /// At this time.
    At(crate::engine::Ts),
}

/// Work a read does with no lock held.
pub(crate) type Job = Box<dyn FnOnce() -> CmdResult + Send>;

pub(crate) fn read_coll(state: &State, read: Read<'_>, db: &str, name: &str) -> Option<ReadSource> {
    let txn = match read {
        Read::At(at) => {
            let c = state.dbs.get(db).and_then(|d| d.get(name))?;
            return Some(ReadSource::View(state.history.view(c, at)));
        }
        Read::Txn(txn) => txn,
    };
    if let Some(side) = txn.colls.get(&(db.to_owned(), name.to_owned())) {
        return Some(ReadSource::Txn(side.read()));
    }
    let c = state.dbs.get(db).and_then(|d| d.get(name))?;
    Some(ReadSource::Txn(TxnRead {
        base: Some(state.history.view(c, txn.read_at)),
        writes: Default::default(),
    }))
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
pub(crate) fn insert(w: &mut Writer<'_>, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "insert")?;
    let Some(Bson::Array(docs)) = cmd.get("documents") else {
        return Err(CmdError::type_mismatch("documents", "array"));
    };
    let ordered = cmd.get("ordered").and_then(Bson::as_bool).unwrap_or(true);
    let mut n = 0;
    let mut write_errors = Vec::new();
    w.ensure(db, name, true)?;
    for (index, d) in docs.iter().enumerate() {
        let Bson::Document(d) = d else {
            return Err(CmdError::type_mismatch("documents", "array of objects"));
        };
        let d = with_id_first(d.clone());
        match w.insert(db, name, d) {
            Ok(()) => n += 1,
            Err(e) if e.code == code::WRITE_CONFLICT => return Err(e),
            Err(e) => {
                write_errors
                    .push(doc! { "index": index as i32, "code": e.code, "errmsg": e.message });
                if ordered {
                    break;
                }
            }
        }
    }
    let mut reply = doc! { "n": n };
    if !write_errors.is_empty() {
        reply.insert("writeErrors", write_errors);
    }
    reply.insert("ok", 1.0);
    Ok(reply)
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

/// Applies one update to one document and logs it. Returns whether it changed anything,
/// with the document before and after; `None`: the document changed since it was read
/// (read it again).
fn update_one_record(
    w: &mut Writer<'_>,
    db: &str,
    name: &str,
    target: &(Vec<u8>, std::sync::Arc<Document>),
    spec: &UpdateSpec,
) -> CmdResult<Option<(bool, Document, Document)>> {
    let old: Document = (*target.1).clone();
    let new = spec.apply(&old, false)?;
    if new == old {
        return Ok(Some((false, old, new)));
    }
    if new.to_vec().map_or(0, |v| v.len()) > MAX_BSON_OBJECT_SIZE {
        return Err(CmdError::new(
            17419,
            "Resulting document after update is larger than 16777216",
        ));
    }
    match w.replace(db, name, target, new.clone(), spec.is_replacement())? {
        Written::Done => Ok(Some((true, old, new))),
        Written::Retry => Ok(None),
    }
}

/// Whether `q` is `{ _id: <value> }` or `{ _id: { $eq: <value> } }` and nothing else.
fn only_id_equality(q: &Document) -> bool {
    if q.len() != 1 {
        return false;
    }
    match q.get("_id") {
        Some(Bson::Document(d)) if d.keys().next().is_some_and(|k| k.starts_with('$')) => {
            d.len() == 1 && d.contains_key("$eq")
        }
        Some(_) => true,
        None => false,
    }
}

/// Inserts the document of an upsert; returns it. `None`: another write inserted the
/// `_id` the filter names since the statement found nothing — the statement runs again
/// and updates it. The server retries such an upsert (outside a transaction) only when
/// the filter is nothing but equality on the unique key that clashed (here `_id`):
/// with any other condition the duplicate key is the answer.
fn upsert_insert(
    w: &mut Writer<'_>,
    db: &str,
    name: &str,
    q: &Document,
    spec: &UpdateSpec,
) -> CmdResult<Option<Document>> {
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
    w.ensure(db, name, true)?;
    match w.insert(db, name, new.clone()) {
        Ok(()) => Ok(Some(new)),
        Err(e) if e.code == code::DUPLICATE_KEY && w.is_live() && only_id_equality(q) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `update`.
pub(crate) fn update(w: &mut Writer<'_>, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "update")?;
    let Some(Bson::Array(updates)) = cmd.get("updates") else {
        return Err(CmdError::type_mismatch("updates", "array"));
    };
    let ordered = cmd.get("ordered").and_then(Bson::as_bool).unwrap_or(true);
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
            // The documents this statement wrote: a document read again after another
            // write changed it is updated once.
            let mut done = std::collections::HashSet::new();
            for _ in 0..MAX_RETRIES {
                let targets = if w.ensure(db, name, false)? {
                    w.matching(db, name, &filter, !multi)
                } else {
                    Vec::new()
                };
                if targets.is_empty() && done.is_empty() && truthy(u.get("upsert")) {
                    let Some(new) = upsert_insert(w, db, name, &q, &spec)? else {
                        continue;
                    };
                    n += 1;
                    upserted.push(doc! { "index": index as i32, "_id": new.get("_id").cloned().unwrap_or(Bson::Null) });
                    return Ok(());
                }
                let mut again = false;
                for target in &targets {
                    if done.contains(&target.0) {
                        continue;
                    }
                    let Some((changed, ..)) = update_one_record(w, db, name, target, &spec)? else {
                        again = true;
                        break;
                    };
                    n += 1;
                    if changed {
                        modified += 1;
                    }
                    done.insert(target.0.clone());
                }
                if !again {
                    return Ok(());
                }
            }
            Err(gave_up())
        })();
        if let Err(e) = result {
            if e.code == code::WRITE_CONFLICT {
                return Err(e);
            }
            write_errors.push(doc! { "index": index as i32, "code": e.code, "errmsg": e.message });
            if ordered {
                break;
            }
        }
    }
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
pub(crate) fn delete(w: &mut Writer<'_>, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "delete")?;
    let Some(Bson::Array(deletes)) = cmd.get("deletes") else {
        return Err(CmdError::type_mismatch("deletes", "array"));
    };
    let mut n = 0i32;
    for d in deletes {
        let Bson::Document(d) = d else {
            return Err(CmdError::type_mismatch("deletes", "array of objects"));
        };
        let q = get_doc(d, "q")?.cloned().unwrap_or_default();
        let filter = Filter::parse(&q)?;
        let limit = get_usize(d, "limit")?.unwrap_or(0);
        let mut finished = false;
        for _ in 0..MAX_RETRIES {
            if !w.ensure(db, name, false)? {
                finished = true;
                break;
            }
            let mut again = false;
            for target in w.matching(db, name, &filter, limit == 1) {
                if w.remove(db, name, &target)? == Written::Retry {
                    again = true;
                    break;
                }
                n += 1;
            }
            // Removed documents no longer match: looking again finds the rest.
            if !again {
                finished = true;
                break;
            }
        }
        if !finished {
            return Err(gave_up());
        }
    }
    Ok(doc! { "n": n, "ok": 1.0 })
}

/// `findAndModify`.
pub(crate) fn find_and_modify(w: &mut Writer<'_>, db: &str, cmd: &Document) -> CmdResult {
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
    let sort = get_doc(cmd, "sort")?;
    let project = |d: Document| -> CmdResult<Bson> {
        Ok(Bson::Document(match &projection {
            Some(p) => p.apply(&d)?,
            None => d,
        }))
    };
    for _ in 0..MAX_RETRIES {
        let target = if w.ensure(db, name, false)? {
            let mut docs = w.matching(db, name, &filter, sort.is_none());
            if let Some(sort) = sort {
                let mut only: Vec<Document> = docs.iter().map(|(_, d)| (**d).clone()).collect();
                sort_documents(&mut only, sort)?;
                if let Some(first) = only.first() {
                    let id = first.get("_id").cloned().unwrap_or(Bson::Null);
                    docs.retain(|(_, d)| d.get("_id") == Some(&id));
                }
            }
            docs.into_iter().next()
        } else {
            None
        };
        let done = match (target, &spec) {
            (Some(target), None) => match w.remove(db, name, &target)? {
                Written::Done => Some((project((*target.1).clone())?, doc! { "n": 1 })),
                Written::Retry => None,
            },
            (Some(target), Some(spec)) => update_one_record(w, db, name, &target, spec)?
                .map(|(_, old, new)| {
                    let shown = if return_new { new } else { old };
                    project(shown).map(|v| (v, doc! { "n": 1, "updatedExisting": true }))
                })
                .transpose()?,
            (None, spec) => {
                modify_nothing(w, db, name, &q, spec.as_ref(), upsert, return_new, &project)?
            }
        };
        if let Some((value, last_error)) = done {
            return Ok(doc! { "lastErrorObject": last_error, "value": value, "ok": 1.0 });
        }
    }
    Err(gave_up())
}

/// `findAndModify` that matched nothing: an upsert's insert, or nothing; `None`: the
/// upsert lost a race for its `_id` (look again).
#[allow(clippy::too_many_arguments)]
fn modify_nothing(
    w: &mut Writer<'_>,
    db: &str,
    name: &str,
    q: &Document,
    spec: Option<&UpdateSpec>,
    upsert: bool,
    return_new: bool,
    project: &dyn Fn(Document) -> CmdResult<Bson>,
) -> CmdResult<Option<(Bson, Document)>> {
    Ok(Some(match spec {
        Some(spec) if upsert => {
            let Some(new) = upsert_insert(w, db, name, q, spec)? else {
                return Ok(None);
            };
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
        _ => (Bson::Null, doc! { "n": 0, "updatedExisting": false }),
    }))
}

/// `find`.
/// `find` on `local.oplog.rs`: the retained entries as a client reads them
/// ([`crate::oplog::OplogEntry::to_document`]), in natural order (`{$natural: 1}`, also
/// without a sort) or newest first (`{$natural: -1}`), filtered, skipped and limited as
/// they are read (the first or last entry costs one entry, not the whole log); another
/// sort orders the filtered entries.
fn read_oplog(
    state: &State,
    ns: String,
    filter: Filter,
    sort: Option<&Document>,
    skip: usize,
    take: usize,
) -> CmdResult<DocCursor> {
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
    Ok(match (natural, sort) {
        // Sorted by a field: every entry is read, then sorted (in bounded holds too).
        (None, Some(sort)) => {
            let mut all = OplogScan::new(Arc::clone(&state.log), true, filter, 0, usize::MAX);
            let mut docs: Vec<Document> = std::iter::from_fn(|| all.pull())
                .map(Arc::unwrap_or_clone)
                .collect();
            sort_documents(&mut docs, sort)?;
            DocCursor::ready(
                ns,
                docs.into_iter().skip(skip).take(take).collect::<Vec<_>>(),
            )
        }
        (natural, _) => DocCursor::oplog(
            ns,
            OplogScan::new(
                Arc::clone(&state.log),
                natural != Some(false),
                filter,
                skip,
                take,
            ),
        ),
    })
}

pub(crate) fn find(
    state: &State,
    read: Read<'_>,
    db: &str,
    cmd: &Document,
) -> CmdResult<OpenCursor> {
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
    let ns = format!("{db}.{name}");
    if db == "local" && state.sharded {
        // A router keeps no oplog of its own: each shard's is read on the shard.
        return Err(CmdError::new(
            crate::error::code::ILLEGAL_OPERATION,
            "Can't use 'local' database through mongos",
        ));
    }
    let oplog = db == "local" && name == "oplog.rs";
    let config = db == "config" && state.sharded;
    let cursor = if oplog {
        read_oplog(state, ns, filter, sort, skip, take)?
    } else if config && matches!(name, "collections" | "chunks" | "shards") {
        let mut docs: Vec<Document> = sharding::config_docs(state, name)
            .into_iter()
            .filter(|d| filter.matches(d))
            .collect();
        if let Some(sort) = sort {
            sort_documents(&mut docs, sort)?;
        }
        let docs: Vec<Document> = docs.into_iter().skip(skip).take(take).collect();
        DocCursor::ready(ns, docs)
    } else {
        match (read_coll(state, read, db, name), sort) {
            (None, _) => DocCursor::ready(ns, Vec::new()),
            (Some(ReadSource::Txn(t)), sort) => {
                DocCursor::pipeline(ns, Input::Txn(t), query_stages(filter, sort, skip, take))
            }
            (Some(ReadSource::View(view)), None) => {
                DocCursor::scan(ns, view, Position::Natural(0), filter, skip, take, None)
            }
            // Sorted by `_id` alone: a scan of the `_id` index over the filter's range,
            // which stops at the limit.
            (Some(ReadSource::View(view)), Some(sort)) => match (id_order(sort), id_range(&filter))
            {
                (Some(_), None) => DocCursor::ready(ns, Vec::new()),
                (Some(ascending), Some((low, high))) => DocCursor::scan(
                    ns,
                    view,
                    Position::ids(low, high, ascending),
                    filter,
                    skip,
                    take,
                    None,
                ),
                (None, _) => DocCursor::pipeline(
                    ns,
                    Input::View(view),
                    query_stages(filter, Some(sort), skip, take),
                ),
            },
        }
    };
    let mut single = truthy(cmd.get("singleBatch"));
    if limit != 0 {
        single |= limit < 0;
    }
    let batch = get_count(cmd, "batchSize")?.unwrap_or(DEFAULT_BATCH);
    Ok(OpenCursor {
        cursor: cursor.with_projection(projection),
        batch,
        single,
    })
}

/// A query as pipeline stages: match, sort, skip, limit.
fn query_stages(filter: Filter, sort: Option<&Document>, skip: usize, take: usize) -> Vec<Stage> {
    let mut stages = vec![Stage::Match(filter)];
    if let Some(sort) = sort {
        stages.push(Stage::Sort(sort.clone()));
    }
    stages.push(Stage::Skip(skip as u64));
    if take != usize::MAX {
        stages.push(Stage::Limit(take as u64));
    }
    stages
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

/// `count`: the work to run, with no lock held outside a transaction.
pub(crate) fn count(state: &State, read: Read<'_>, db: &str, cmd: &Document) -> CmdResult<Job> {
    let name = coll_name(cmd, "count")?;
    let filter = Filter::parse(&get_doc(cmd, "query")?.cloned().unwrap_or_default())?;
    let skip = get_count(cmd, "skip")?.unwrap_or(0);
    let limit = get_usize(cmd, "limit")?;
    let source = read_coll(state, read, db, name);
    Ok(Box::new(move || {
        let n = source.map_or(0, |s| s.count(&filter));
        let mut n = n.saturating_sub(skip);
        if let Some(limit) = limit
            && limit != 0
        {
            n = n.min(limit.unsigned_abs() as usize);
        }
        Ok(doc! { "n": n as i32, "ok": 1.0 })
    }))
}

/// `aggregate`: a change stream when the first stage is `$changeStream`.
pub(crate) fn aggregate(
    state: &mut State,
    read: Read<'_>,
    db: &str,
    cmd: &Document,
) -> CmdResult<Aggregate> {
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
        let in_txn = matches!(read, Read::Txn(_));
        return open_change_stream(state, in_txn, db, cmd, spec, pipeline, batch)
            .map(Aggregate::Done);
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
    let ns = format!("{db}.{name}");
    let cursor = match read_coll(state, read, db, name) {
        None => DocCursor::ready(ns, Vec::new()),
        Some(ReadSource::Txn(t)) => DocCursor::pipeline(ns, Input::Txn(t), stages),
        Some(ReadSource::View(view)) => DocCursor::pipeline(ns, Input::View(view), stages),
    };
    Ok(Aggregate::Cursor(Box::new(OpenCursor {
        cursor,
        batch,
        single: false,
    })))
}

/// What `aggregate` gives: a change stream's reply, or a cursor to read.
pub(crate) enum Aggregate {
    /// Answered (a change stream).
    Done(RawDocumentBuf),
    /// A cursor whose first batch is to be read.
    Cursor(Box<OpenCursor>),
}

/// `distinct`: the distinct values at `key` among the documents matching `query`, in
/// the order first seen; arrays contribute their elements.
pub(crate) fn distinct(state: &State, read: Read<'_>, db: &str, cmd: &Document) -> CmdResult<Job> {
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
    let key = key.to_owned();
    let filter = Filter::parse(&get_doc(cmd, "query")?.cloned().unwrap_or_default())?;
    let source = read_coll(state, read, db, name);
    Ok(Box::new(move || {
        let key = key.as_str();
        let mut values: Vec<Bson> = Vec::new();
        if let Some(c) = source {
            for doc in c.all().iter().filter(|d| filter.matches(d)) {
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
    }))
}
