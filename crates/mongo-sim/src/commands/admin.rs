//! Commands about the server itself: the handshake, build and status information.

use bson::{Document, doc, oid::ObjectId};

use super::*;
use crate::{
    state::State,
    wire::{MAX_BSON_OBJECT_SIZE, MAX_MESSAGE_SIZE},
};

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
    let op_time = doc! { "ts": state.log.last_ts, "t": i64::from(term) };
    let date = bson::DateTime::from_millis(i64::from(state.log.last_ts.time) * 1000);
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
