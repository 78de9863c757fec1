//! Command handlers. Each runs under the state lock and returns a reply body (without
//! `$clusterTime`, which the server adds).

use std::collections::VecDeque;

use bson::{Bson, Document, RawDocumentBuf, doc, oid::ObjectId};

use crate::{
    changestream::{OpenRequest, StreamCursor, stream_reply, to_raw},
    error::{CmdError, CmdResult, code},
    matcher::Filter,
    pipeline::{Context, Projection, parse_pipeline, run as run_pipeline, sort_documents},
    state::{Collection, Cursor, Op, PendingEntry, State, Txn},
    update::{UpdateSpec, delta},
    value::id_key,
    wire::{MAX_BSON_OBJECT_SIZE, MAX_MESSAGE_SIZE},
};

/// The default first batch size of cursors.
const DEFAULT_BATCH: usize = 101;

/// Facts about the server that replies carry.
#[derive(Debug, Clone)]
pub(crate) struct ServerInfo {
    /// `host:port` as clients reach it.
    pub(crate) host: String,
    /// The replica set's name.
    pub(crate) set_name: String,
}

/// A collection's namespace within a command.
fn coll_name<'a>(cmd: &'a Document, name: &str) -> CmdResult<&'a str> {
    match cmd.get(name) {
        Some(Bson::String(s)) if !s.is_empty() => Ok(s),
        _ => Err(CmdError::new(
            code::INVALID_NAMESPACE,
            format!("collection name must be a non-empty string in '{name}'"),
        )),
    }
}

fn get_doc<'a>(cmd: &'a Document, field: &str) -> CmdResult<Option<&'a Document>> {
    match cmd.get(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Document(d)) => Ok(Some(d)),
        Some(_) => Err(CmdError::type_mismatch(field, "object")),
    }
}

fn get_usize(cmd: &Document, field: &str) -> CmdResult<Option<i64>> {
    match cmd.get(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Int32(n)) => Ok(Some(i64::from(*n))),
        Some(Bson::Int64(n)) => Ok(Some(*n)),
        Some(Bson::Double(n)) if n.fract() == 0.0 => Ok(Some(*n as i64)),
        Some(_) => Err(CmdError::type_mismatch(field, "number")),
    }
}

fn truthy(v: Option<&Bson>) -> bool {
    match v {
        Some(Bson::Boolean(b)) => *b,
        Some(Bson::Int32(n)) => *n != 0,
        Some(Bson::Int64(n)) => *n != 0,
        Some(Bson::Double(n)) => *n != 0.0,
        _ => false,
    }
}

/// The `hello` / `isMaster` reply.
pub(crate) fn hello(
    state: &State,
    info: &ServerInfo,
    legacy: bool,
    connection_id: i64,
    term: u8,
) -> Document {
    let primary = !state.faults.stepped_down;
    let mut reply = Document::new();
    reply.insert(
        if legacy {
            "ismaster"
        } else {
            "isWritablePrimary"
        },
        primary,
    );
    reply.insert("secondary", !primary);
    reply.insert("helloOk", true);
    reply.insert("setName", info.set_name.clone());
    reply.insert("setVersion", 1);
    reply.insert("hosts", vec![info.host.clone()]);
    if primary {
        reply.insert("primary", info.host.clone());
        let mut election = [0u8; 12];
        election[..4].copy_from_slice(&[0x7f, 0xff, 0xff, 0xff]);
        election[11] = term;
        reply.insert("electionId", ObjectId::from_bytes(election));
    }
    reply.insert("me", info.host.clone());
    reply.insert("maxBsonObjectSize", MAX_BSON_OBJECT_SIZE as i32);
    reply.insert("maxMessageSizeBytes", MAX_MESSAGE_SIZE as i32);
    reply.insert("maxWriteBatchSize", 100_000);
    reply.insert("localTime", bson::DateTime::now());
    reply.insert("logicalSessionTimeoutMinutes", 30);
    reply.insert("connectionId", connection_id);
    reply.insert("minWireVersion", 0);
    reply.insert("maxWireVersion", 21);
    reply.insert("readOnly", false);
    let op_time = doc! { "ts": state.last_ts, "t": i64::from(term) };
    let date = bson::DateTime::from_millis(i64::from(state.last_ts.time) * 1000);
    reply.insert(
        "lastWrite",
        doc! { "opTime": op_time.clone(), "lastWriteDate": date, "majorityOpTime": op_time, "majorityWriteDate": date },
    );
    reply.insert("ok", 1.0);
    reply
}

/// `buildInfo`.
pub(crate) fn build_info() -> Document {
    doc! {
        "version": "7.0.12",
        "versionArray": [7, 0, 12, 0],
        "gitVersion": "mongo-sim",
        "bits": 64,
        "maxBsonObjectSize": MAX_BSON_OBJECT_SIZE as i32,
        "storageEngines": ["mongo-sim"],
        "ok": 1.0,
    }
}

/// Where writes of one command go: the live collections, or a transaction's copies.
struct Writer<'a> {
    state: &'a mut State,
    txn: Option<&'a mut Txn>,
    entries: Vec<PendingEntry>,
}

impl<'a> Writer<'a> {
    fn new(state: &'a mut State, txn: Option<&'a mut Txn>) -> Self {
        Self {
            state,
            txn,
            entries: Vec::new(),
        }
    }

    /// The collection to write, created (with a `create` entry) when missing and `create`.
    fn coll(&mut self, db: &str, name: &str, create: bool) -> CmdResult<Option<&mut Collection>> {
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

    fn log(&mut self, db: &str, coll: &str, uuid: &bson::Binary, op: Op) {
        self.entries.push(PendingEntry {
            db: db.to_owned(),
            coll: coll.to_owned(),
            uuid: Some(uuid.clone()),
            op,
        });
    }

    fn finish(self) {
        match self.txn {
            Some(txn) => txn.entries.extend(self.entries),
            None => self.state.append(self.entries, None),
        }
    }
}

fn create_entry(db: &str, name: &str, c: &Collection, description: Document) -> PendingEntry {
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

fn validate_ns(db: &str, coll: &str) -> CmdResult<()> {
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
pub(crate) fn find(state: &mut State, txn: Option<&Txn>, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "find")?;
    let filter = Filter::parse(&get_doc(cmd, "filter")?.cloned().unwrap_or_default())?;
    let projection = get_doc(cmd, "projection")?
        .map(Projection::parse)
        .transpose()?;
    let mut docs: Vec<Document> = match read_coll(state, txn, db, name) {
        Some(c) => c
            .docs
            .values()
            .filter(|d| filter.matches(d))
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    if let Some(sort) = get_doc(cmd, "sort")? {
        sort_documents(&mut docs, sort)?;
    }
    let skip = get_usize(cmd, "skip")?.unwrap_or(0).max(0) as usize;
    let limit = get_usize(cmd, "limit")?.unwrap_or(0);
    let mut single = truthy(cmd.get("singleBatch"));
    let mut docs: Vec<Document> = docs.into_iter().skip(skip).collect();
    if limit != 0 {
        docs.truncate(limit.unsigned_abs() as usize);
        single |= limit < 0;
    }
    if let Some(p) = &projection {
        docs = docs.iter().map(|d| p.apply(d)).collect::<CmdResult<_>>()?;
    }
    let batch = get_usize(cmd, "batchSize")?.map_or(DEFAULT_BATCH, |n| n.max(0) as usize);
    Ok(cursor_reply(
        state,
        format!("{db}.{name}"),
        docs.into(),
        batch,
        single,
    ))
}

/// A reply with a first batch, leaving a cursor open for the rest.
pub(crate) fn cursor_reply(
    state: &mut State,
    ns: String,
    mut docs: VecDeque<Document>,
    batch: usize,
    single: bool,
) -> Document {
    let first: Vec<Document> = docs.drain(..batch.min(docs.len())).collect();
    let id = if docs.is_empty() || single {
        0
    } else {
        state.add_cursor(Cursor::Docs {
            ns: ns.clone(),
            docs,
        })
    };
    doc! { "cursor": { "firstBatch": first, "id": id, "ns": ns }, "ok": 1.0 }
}

/// `count`.
pub(crate) fn count(state: &State, txn: Option<&Txn>, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "count")?;
    let filter = Filter::parse(&get_doc(cmd, "query")?.cloned().unwrap_or_default())?;
    let n = read_coll(state, txn, db, name)
        .map_or(0, |c| c.docs.values().filter(|d| filter.matches(d)).count());
    let skip = get_usize(cmd, "skip")?.unwrap_or(0).max(0) as usize;
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
    let batch = get_usize(cursor_opts, "batchSize")?.map_or(DEFAULT_BATCH, |n| n.max(0) as usize);
    if let Some(Bson::Document(first)) = pipeline.first()
        && let Some(spec) = first.get("$changeStream")
    {
        let Bson::Document(spec) = spec else {
            return Err(CmdError::type_mismatch("$changeStream", "object"));
        };
        if pipeline[1..]
            .iter()
            .any(|s| matches!(s, Bson::Document(d) if d.contains_key("$changeStream")))
        {
            return Err(CmdError::new(
                40602,
                "$changeStream is only valid as the first stage in a pipeline",
            ));
        }
        if txn.is_some() {
            return Err(CmdError::new(
                code::ILLEGAL_OPERATION,
                "$changeStream may not be opened in a transaction",
            ));
        }
        let mut stream = StreamCursor::open(
            state,
            OpenRequest {
                db,
                target,
                spec,
                rest: &pipeline[1..],
            },
        )?;
        let (events, pbrt) = stream.next_batch(state, batch)?;
        let ns = stream.ns.clone();
        let id = if stream.closed {
            0
        } else {
            state.add_cursor(Cursor::Stream(Box::new(stream)))
        };
        return stream_reply(true, events, &pbrt, id, &ns);
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

/// `getMore` on a plain cursor. Change-stream cursors are served by the server loop, which
/// may wait for new events.
pub(crate) fn get_more_docs(state: &mut State, id: i64, batch: Option<usize>) -> CmdResult {
    let Some(Cursor::Docs { ns, docs }) = state.cursors.get_mut(&id) else {
        return Err(CmdError::new(
            code::CURSOR_NOT_FOUND,
            format!("cursor id {id} not found"),
        ));
    };
    let take = batch.unwrap_or(usize::MAX).min(docs.len());
    let next: Vec<Document> = docs.drain(..take).collect();
    let ns = ns.clone();
    let done = docs.is_empty();
    if done {
        state.cursors.remove(&id);
    }
    Ok(
        doc! { "cursor": { "nextBatch": next, "id": if done { 0 } else { id }, "ns": ns }, "ok": 1.0 },
    )
}

/// `killCursors`.
pub(crate) fn kill_cursors(state: &mut State, cmd: &Document) -> CmdResult {
    let Some(Bson::Array(ids)) = cmd.get("cursors") else {
        return Err(CmdError::type_mismatch("cursors", "array"));
    };
    let mut killed = Vec::new();
    let mut not_found = Vec::new();
    for id in ids {
        let id = match id {
            Bson::Int64(n) => *n,
            Bson::Int32(n) => i64::from(*n),
            _ => continue,
        };
        if state.cursors.remove(&id).is_some() {
            killed.push(Bson::Int64(id));
        } else {
            not_found.push(Bson::Int64(id));
        }
    }
    Ok(doc! {
        "cursorsKilled": killed,
        "cursorsNotFound": not_found,
        "cursorsAlive": [],
        "cursorsUnknown": [],
        "ok": 1.0,
    })
}

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
    state.append(vec![entry], None);
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
    state.append(
        vec![PendingEntry {
            db: db.to_owned(),
            coll: name.to_owned(),
            uuid: Some(c.uuid),
            op: Op::Drop,
        }],
        None,
    );
    Ok(doc! { "nIndexesWas": n_indexes, "ns": format!("{db}.{name}"), "ok": 1.0 })
}

/// `dropDatabase`: a `drop` entry per collection, then `dropDatabase`.
pub(crate) fn drop_database(state: &mut State, db: &str) -> CmdResult {
    let Some(colls) = state.dbs.remove(db) else {
        return Ok(doc! { "ok": 1.0 });
    };
    let mut entries: Vec<PendingEntry> = colls
        .into_iter()
        .map(|(name, c)| PendingEntry {
            db: db.to_owned(),
            coll: name,
            uuid: Some(c.uuid),
            op: Op::Drop,
        })
        .collect();
    entries.push(PendingEntry {
        db: db.to_owned(),
        coll: String::new(),
        uuid: None,
        op: Op::DropDatabase,
    });
    state.append(entries, None);
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
    let uuid = coll.uuid.clone();
    state
        .dbs
        .entry(to_db.to_owned())
        .or_default()
        .insert(to_coll.to_owned(), coll);
    state.append(
        vec![PendingEntry {
            db: from_db.to_owned(),
            coll: from_coll.to_owned(),
            uuid: Some(uuid),
            op: Op::Rename {
                to_db: to_db.to_owned(),
                to_coll: to_coll.to_owned(),
                drop_target: target_uuid,
            },
        }],
        None,
    );
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
    let uuid = c.uuid.clone();
    state.append(
        vec![PendingEntry {
            db: db.to_owned(),
            coll: name.to_owned(),
            uuid: Some(uuid),
            op: Op::Modify { description },
        }],
        None,
    );
    Ok(doc! { "ok": 1.0 })
}

/// `createIndexes`.
pub(crate) fn create_indexes(state: &mut State, db: &str, cmd: &Document) -> CmdResult {
    let name = coll_name(cmd, "createIndexes")?;
    let Some(Bson::Array(specs)) = cmd.get("indexes") else {
        return Err(CmdError::type_mismatch("indexes", "array"));
    };
    let mut w = Writer::new(state, None);
    let existed = w.state.dbs.get(db).is_some_and(|d| d.contains_key(name));
    let coll = w
        .coll(db, name, true)?
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
        w.log(db, name, &uuid, Op::CreateIndexes { indexes: added });
    }
    w.finish();
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
        state.append(
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
    Ok(cursor_reply(
        state,
        format!("{db}.$cmd.listIndexes"),
        docs,
        batch,
        false,
    ))
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
    Ok(cursor_reply(
        state,
        format!("{db}.$cmd.listCollections"),
        docs,
        batch,
        false,
    ))
}

/// `listDatabases`.
pub(crate) fn list_databases(state: &State, cmd: &Document) -> CmdResult {
    let filter = Filter::parse(&get_doc(cmd, "filter")?.cloned().unwrap_or_default())?;
    let name_only = truthy(cmd.get("nameOnly"));
    let mut dbs = Vec::new();
    for (name, colls) in &state.dbs {
        let size: i64 = colls.values().map(|c| c.docs.len() as i64 * 64).sum();
        let info = if name_only {
            doc! { "name": name.clone() }
        } else {
            doc! { "name": name.clone(), "sizeOnDisk": size, "empty": colls.values().all(|c| c.docs.is_empty()) }
        };
        if filter.matches(&info) {
            dbs.push(info);
        }
    }
    Ok(doc! { "databases": dbs, "totalSize": 0_i64, "ok": 1.0 })
}

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
    state.append(entries, Some((txn.lsid.clone(), txn.txn_number)));
    txn.committed = true;
    state.txns.insert(key, txn);
    Ok(doc! { "ok": 1.0 })
}
