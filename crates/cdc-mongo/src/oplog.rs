//! The deployment's oplog window, read from `local.oplog.rs` as `rs.printReplicationInfo()`
//! reads it: its first entry in natural order and its last.

use bson::{RawDocumentBuf, doc};
use cdc_core::{ClusterTime, ErrorKind, OplogView, OplogWindow};
use mongodb::{Client, Collection};

use crate::error::{Error, classify, server_code};

/// Reads the oldest and the newest entry's `ts`. What only a person can change (no
/// permission, a router) is [`OplogView::Unreadable`], with the reason;
/// a failure worth asking again is an error.
pub(crate) async fn window(client: &Client) -> cdc_core::Result<OplogView> {
    let oplog = client
        .database("local")
        .collection::<RawDocumentBuf>("oplog.rs");
    let oldest = match end(&oplog, 1).await? {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(OplogView::Empty),
        Err(why) => return Ok(OplogView::Unreadable(why)),
    };
    let newest = match end(&oplog, -1).await? {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(OplogView::Empty),
        Err(why) => return Ok(OplogView::Unreadable(why)),
    };
    Ok(OplogView::Window(OplogWindow::new(oldest, newest)))
}

/// The `ts` of the first entry in `natural` order (1: oldest, -1: newest; `None` for an
/// empty oplog), or why it cannot be read.
async fn end(
    oplog: &Collection<RawDocumentBuf>,
    natural: i32,
) -> cdc_core::Result<Result<Option<ClusterTime>, String>> {
    let found = oplog
        .find_one(doc! {})
        .sort(doc! { "$natural": natural })
        .projection(doc! { "ts": 1, "_id": 0 })
        .await;
    let entry = match found {
        Ok(entry) => entry,
        Err(e) if classify(&e) == ErrorKind::Fatal => {
            let why = match server_code(&e) {
                Some(13) => "the user may not read it (Unauthorized, code 13: grant the \
                             clusterMonitor role, or read on the local database)"
                    .to_owned(),
                Some(20) => "a sharded cluster's router (mongos) serves no oplog of its own \
                             (IllegalOperation, code 20): each shard keeps one"
                    .to_owned(),
                _ => e.to_string(),
            };
            return Ok(Err(format!("local.oplog.rs cannot be read: {why}")));
        }
        Err(e) => return Err(Error::driver("read the oplog's ends", e).into()),
    };
    Ok(match entry {
        None => Ok(None),
        Some(entry) => entry
            .get_timestamp("ts")
            .map(|ts| Some(ClusterTime::from(ts)))
            .map_err(|_| "an entry of local.oplog.rs has no timestamp `ts`".to_owned()),
    })
}
