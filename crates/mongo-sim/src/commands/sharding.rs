//! The sharded front (`mongo-sim --sharded`): the server answers as a `mongos` of a
//! cluster with one shard holding every chunk. `hello` says `isdbgrid`, commands a router
//! does not have are refused as it refuses them, `shardCollection` records a shard key,
//! `config.collections` / `config.chunks` / `config.shards` describe the cluster, and
//! change events of a sharded collection carry the shard key in `documentKey`.

use bson::{Bson, Document, doc};

use super::*;
use crate::{
    catalog::Collection,
    error::{CmdError, CmdResult, code},
    state::State,
    value::query_values,
};

/// The one shard's name.
pub(crate) const SHARD: &str = "shard01";

/// Commands a `mongos` does not have (they run on shards or replica set members).
const NOT_ON_MONGOS: [&str; 4] = [
    "splitVector",
    "replSetGetStatus",
    "replSetGetConfig",
    "getLog",
];

/// Commands only a `mongos` (or a config server) has.
const ONLY_ON_MONGOS: [&str; 4] = [
    "shardCollection",
    "enableSharding",
    "listShards",
    "isdbgrid",
];

/// Refuses what the server in its current role does not have: `CommandNotFound` (59), as
/// a `mongos` answers `splitVector` and a replica set member answers `shardCollection`.
pub(crate) fn refuse_unknown(sharded: bool, name: &str) -> CmdResult<()> {
    let missing = if sharded {
        NOT_ON_MONGOS.contains(&name)
    } else {
        ONLY_ON_MONGOS.contains(&name)
    };
    if missing {
        return Err(CmdError::new(
            code::COMMAND_NOT_FOUND,
            format!("no such command: '{name}'"),
        ));
    }
    Ok(())
}

/// `hello` as a `mongos` answers it: `msg: "isdbgrid"`, no replica set fields.
pub(crate) fn hello_mongos(ctx: &Ctx<'_>, legacy: bool) -> Document {
    let mut reply = Document::new();
    reply.insert(writable_field(legacy), true);
    reply.insert("msg", "isdbgrid");
    reply.insert("helloOk", true);
    reply.insert(
        "topologyVersion",
        doc! { "processId": bson::oid::ObjectId::from_bytes([0; 12]), "counter": 0_i64 },
    );
    hello_limits(&mut reply, ctx.conn_id);
    reply.insert("ok", 1.0);
    reply
}

/// `isdbgrid`.
pub(crate) fn isdbgrid(ctx: &Ctx<'_>) -> Document {
    doc! { "isdbgrid": 1, "hostname": ctx.info.host.clone(), "ok": 1.0 }
}

/// `listShards`: the one shard.
pub(crate) fn list_shards(ctx: &Ctx<'_>) -> Document {
    doc! { "shards": [shard_doc(ctx)], "ok": 1.0 }
}

fn shard_doc(ctx: &Ctx<'_>) -> Document {
    doc! {
        "_id": SHARD,
        "host": format!("{}/{}", ctx.info.set_name, ctx.info.host),
        "state": 1,
        "topologyTime": bson::Timestamp { time: 1, increment: 1 },
    }
}

/// Checks a shard key pattern: fields with `1` or `"hashed"` (one hashed field at most),
/// as `shardCollection` does.
fn parse_key(key: &Document) -> CmdResult<Document> {
    if key.is_empty() {
        return Err(CmdError::bad_value("Shard key cannot be empty"));
    }
    let mut hashed = 0;
    let mut out = Document::new();
    for (field, value) in key {
        if field.is_empty() || field.starts_with('$') || field.split('.').any(str::is_empty) {
            return Err(CmdError::bad_value(format!(
                "Shard key field name '{field}' is not valid"
            )));
        }
        match value {
            Bson::Int32(1) | Bson::Int64(1) => {
                out.insert(field.clone(), Bson::Int32(1));
            }
            Bson::Double(d) if *d == 1.0 => {
                out.insert(field.clone(), Bson::Int32(1));
            }
            Bson::String(s) if s == "hashed" => {
                hashed += 1;
                out.insert(field.clone(), "hashed");
            }
            other => {
                return Err(CmdError::bad_value(format!(
                    "Shard key {{ {field}: {other} }} is not valid: values must be 1 or \"hashed\""
                )));
            }
        }
    }
    if hashed > 1 {
        return Err(CmdError::bad_value(
            "A shard key may contain at most one hashed field",
        ));
    }
    Ok(out)
}

/// `enableSharding` (nothing to do: every database may hold sharded collections).
pub(crate) fn enable_sharding(db: &str) -> CmdResult {
    admin_only(db, "enableSharding")?;
    Ok(doc! { "ok": 1.0 })
}

/// `shardCollection` (on `admin`): records the shard key, creating the collection when
/// missing. The same key again is accepted; another key is `AlreadyInitialized` (23).
pub(crate) fn shard_collection(state: &mut State, db: &str, cmd: &Document) -> CmdResult {
    admin_only(db, "shardCollection")?;
    let ns = match cmd.get("shardCollection") {
        Some(Bson::String(ns)) => ns.clone(),
        _ => return Err(CmdError::type_mismatch("shardCollection", "string")),
    };
    let (coll_db, name) = ns
        .split_once('.')
        .filter(|(d, c)| !d.is_empty() && !c.is_empty())
        .ok_or_else(|| {
            CmdError::new(
                code::INVALID_NAMESPACE,
                format!("Invalid namespace specified '{ns}'"),
            )
        })?;
    if crate::catalog::is_internal_db(coll_db) {
        return Err(CmdError::new(
            code::ILLEGAL_OPERATION,
            format!("can't shard {ns}: the {coll_db} database cannot be sharded"),
        ));
    }
    let key = match cmd.get("key") {
        Some(Bson::Document(k)) => parse_key(k)?,
        _ => return Err(CmdError::type_mismatch("key", "object")),
    };
    writer::resolve(state, coll_db, name, true)?;
    let coll = state
        .dbs
        .get_mut(coll_db)
        .and_then(|d| d.get_mut(name))
        .ok_or_else(|| CmdError::bad_value("no collection"))?;
    if coll.view.is_some() {
        return Err(CmdError::new(
            code::COMMAND_NOT_SUPPORTED_ON_VIEW,
            format!("Namespace {ns} is a view, not a collection"),
        ));
    }
    match &coll.shard_key {
        Some(existing) if *existing != key => {
            return Err(CmdError::new(
                23,
                format!(
                    "sharding already enabled for collection {ns} with options {{ key: {existing} }}"
                ),
            ));
        }
        Some(_) => return Ok(doc! { "collectionsharded": ns, "ok": 1.0 }),
        None => coll.shard_key = Some(key.clone()),
    }
    let entry = crate::oplog::PendingEntry {
        db: coll_db.to_owned(),
        coll: name.to_owned(),
        uuid: Some(coll.uuid.clone()),
        op: crate::oplog::Op::ShardCollection {
            description: doc! { "shardKey": key, "unique": false, "presplitHashedZones": false },
        },
    };
    // Writes prepared without the shard key are prepared again (their documentKey).
    writer::log_epoch_end(&state.log, [&*coll], vec![entry]);
    Ok(doc! { "collectionsharded": ns, "ok": 1.0 })
}

/// The `documentKey` of `doc` in a collection: the shard key's fields (those present,
/// dotted paths flattened) in the key's order, then `_id` unless the key holds it.
pub(crate) fn document_key(coll_shard_key: Option<&Document>, doc: &Document) -> Document {
    let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
    let Some(key) = coll_shard_key else {
        return doc! { "_id": id };
    };
    let mut out = Document::new();
    for field in key.keys() {
        if field == "_id" {
            out.insert("_id", id.clone());
            continue;
        }
        if let Some(Some(value)) = query_values(doc, field).into_iter().next() {
            out.insert(field.clone(), value.clone());
        }
    }
    if !out.contains_key("_id") {
        out.insert("_id", id);
    }
    out
}

/// The documents of `config.collections`, `config.chunks` and `config.shards` (a
/// sharded collection has one chunk, from `MinKey` to `MaxKey` on the one shard).
pub(crate) fn config_docs(state: &State, name: &str) -> Vec<Document> {
    let sharded = state.dbs.iter().flat_map(|(db, colls)| {
        colls
            .iter()
            .filter_map(move |(c, coll)| coll.shard_key.as_ref().map(|k| (db, c, coll, k)))
    });
    let epoch = bson::oid::ObjectId::from_bytes([0x65; 12]);
    let since = bson::Timestamp {
        time: 1,
        increment: 1,
    };
    match name {
        "collections" => sharded
            .map(|(db, c, coll, key)| {
                doc! {
                    "_id": format!("{db}.{c}"),
                    "lastmodEpoch": epoch,
                    "lastmod": bson::DateTime::from_millis(0),
                    "timestamp": since,
                    "uuid": coll.uuid.clone(),
                    "key": key.clone(),
                    "unique": false,
                    "noBalance": false,
                }
            })
            .collect(),
        "chunks" => sharded
            .map(|(_, _, coll, key)| chunk(coll, key, since))
            .collect(),
        "shards" => vec![doc! {
            "_id": SHARD,
            "host": state.shard_host.clone(),
            "state": 1,
            "topologyTime": since,
        }],
        _ => Vec::new(),
    }
}

fn chunk(coll: &Collection, key: &Document, since: bson::Timestamp) -> Document {
    let mut min = Document::new();
    let mut max = Document::new();
    for field in key.keys() {
        min.insert(field.clone(), Bson::MinKey);
        max.insert(field.clone(), Bson::MaxKey);
    }
    doc! {
        "_id": bson::oid::ObjectId::from_bytes({
            let mut b = [0u8; 12];
            b.copy_from_slice(&coll.uuid.bytes[..12]);
            b
        }),
        "uuid": coll.uuid.clone(),
        "min": min,
        "max": max,
        "shard": SHARD,
        "lastmod": bson::Timestamp { time: 1, increment: 0 },
        "onCurrentShardSince": since,
        "history": [{ "validAfter": since, "shard": SHARD }],
    }
}
