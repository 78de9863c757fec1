//! The commands drivers' test harnesses, monitoring tools and shells call, answered as
//! MongoDB 7.0 shapes them, through the real driver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bson::{Bson, Document, doc};
use mongo_sim::MongoSim;
use mongodb::{Client, error::ErrorKind};

async fn setup() -> (MongoSim, Client) {
    let sim = MongoSim::start().await.unwrap();
    let client = Client::with_uri_str(sim.uri()).await.unwrap();
    (sim, client)
}

async fn admin(client: &Client, cmd: Document) -> Document {
    client.database("admin").run_command(cmd).await.unwrap()
}

fn code_of(err: &mongodb::error::Error) -> (i32, String) {
    match err.kind.as_ref() {
        ErrorKind::Command(c) => (c.code, c.code_name.clone()),
        other => panic!("not a command error: {other:?}"),
    }
}

#[tokio::test]
async fn harness_commands_answer_in_7_0_shape() {
    let (sim, client) = setup().await;
    let port = i32::from(sim.addr().port());

    let opts = admin(&client, doc! { "getCmdLineOpts": 1 }).await;
    assert_eq!(
        opts.get_array("argv").unwrap()[0],
        Bson::String("mongod".into())
    );
    let parsed = opts.get_document("parsed").unwrap();
    assert_eq!(
        parsed.get_document("net").unwrap().get_i32("port").unwrap(),
        port
    );
    assert_eq!(
        parsed
            .get_document("replication")
            .unwrap()
            .get_str("replSet")
            .unwrap(),
        "rs0"
    );
    assert_eq!(
        parsed
            .get_document("setParameter")
            .unwrap()
            .get_str("enableTestCommands")
            .unwrap(),
        "1"
    );
    assert!(!parsed.contains_key("security"), "no authentication");

    let p = admin(
        &client,
        doc! { "getParameter": 1, "featureCompatibilityVersion": 1 },
    )
    .await;
    assert_eq!(
        p.get_document("featureCompatibilityVersion")
            .unwrap()
            .get_str("version")
            .unwrap(),
        "7.0"
    );
    assert!(!p.contains_key("enableTestCommands"), "only what was asked");
    let all = admin(&client, doc! { "getParameter": "*" }).await;
    assert!(all.get_bool("enableTestCommands").unwrap());
    let err = client
        .database("admin")
        .run_command(doc! { "getParameter": 1, "noSuchParameter": 1 })
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), (72, "InvalidOptions".to_owned()));
    let err = client
        .database("app")
        .run_command(doc! { "getCmdLineOpts": 1 })
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), (13, "Unauthorized".to_owned()));

    let status = admin(&client, doc! { "replSetGetStatus": 1 }).await;
    assert_eq!(status.get_str("set").unwrap(), "rs0");
    assert_eq!(status.get_i32("myState").unwrap(), 1);
    let me = status.get_array("members").unwrap()[0]
        .as_document()
        .unwrap()
        .clone();
    assert_eq!(me.get_str("stateStr").unwrap(), "PRIMARY");
    assert_eq!(me.get_str("name").unwrap(), sim.addr().to_string());
    assert!(me.get_bool("self").unwrap());

    let config = admin(&client, doc! { "replSetGetConfig": 1 }).await;
    let config = config.get_document("config").unwrap();
    assert_eq!(config.get_str("_id").unwrap(), "rs0");
    assert_eq!(
        config.get_array("members").unwrap()[0]
            .as_document()
            .unwrap()
            .get_str("host")
            .unwrap(),
        sim.addr().to_string()
    );

    let host = admin(&client, doc! { "hostInfo": 1 }).await;
    let system = host.get_document("system").unwrap();
    assert!(system.get_i32("numCores").unwrap() >= 1);
    assert_eq!(system.get_str("cpuArch").unwrap(), std::env::consts::ARCH);

    let conn = admin(
        &client,
        doc! { "connectionStatus": 1, "showPrivileges": true },
    )
    .await;
    let auth = conn.get_document("authInfo").unwrap();
    assert!(auth.get_array("authenticatedUsers").unwrap().is_empty());
    assert!(
        auth.get_array("authenticatedUserPrivileges")
            .unwrap()
            .is_empty()
    );

    let names = admin(&client, doc! { "getLog": "*" }).await;
    assert_eq!(
        names.get_array("names").unwrap(),
        &vec![Bson::from("global"), Bson::from("startupWarnings")]
    );
    let global = admin(&client, doc! { "getLog": "global" }).await;
    let lines = global.get_array("log").unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.as_str().unwrap().contains("Connection accepted")),
        "{lines:?}"
    );
    let err = client
        .database("admin")
        .run_command(doc! { "getLog": "nope" })
        .await
        .unwrap_err();
    assert_eq!(code_of(&err).0, 96);
    sim.shutdown().await;
}

#[tokio::test]
async fn server_status_counts_what_happened() {
    let (sim, client) = setup().await;
    let coll = client.database("app").collection::<Document>("c");
    let before = admin(&client, doc! { "serverStatus": 1 }).await;
    coll.insert_many((0..5).map(|i| doc! { "_id": i }))
        .await
        .unwrap();
    coll.find_one(doc! {}).await.unwrap();
    coll.delete_one(doc! { "_id": 0 }).await.unwrap();
    coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "x": 1 } })
        .await
        .unwrap();
    let after = admin(&client, doc! { "serverStatus": 1 }).await;
    for key in [
        "host",
        "version",
        "process",
        "uptime",
        "localTime",
        "connections",
        "repl",
    ] {
        assert!(after.contains_key(key), "serverStatus.{key}");
    }
    assert_eq!(after.get_str("version").unwrap(), "7.0.12");
    assert_eq!(after.get_str("process").unwrap(), "mongod");
    assert_eq!(after.get_str("host").unwrap(), sim.addr().to_string());
    let ops = |d: &Document, k: &str| d.get_document("opcounters").unwrap().get_i64(k).unwrap();
    assert_eq!(ops(&after, "insert") - ops(&before, "insert"), 5);
    assert_eq!(ops(&after, "query") - ops(&before, "query"), 1);
    assert_eq!(ops(&after, "delete") - ops(&before, "delete"), 1);
    assert_eq!(ops(&after, "update") - ops(&before, "update"), 1);
    let connections = after.get_document("connections").unwrap();
    assert!(connections.get_i32("current").unwrap() >= 1);
    assert!(connections.get_i32("available").unwrap() > 0);
    let repl = after.get_document("repl").unwrap();
    assert_eq!(repl.get_str("setName").unwrap(), "rs0");
    assert!(repl.get_bool("isWritablePrimary").unwrap());
    sim.shutdown().await;
}

#[tokio::test]
async fn current_op_shows_a_waiting_get_more() {
    let (sim, client) = setup().await;
    let db = client.database("app");
    db.run_command(doc! { "create": "c" }).await.unwrap();
    let reply = db
        .run_command(
            doc! { "aggregate": "c", "pipeline": [ { "$changeStream": {} } ], "cursor": {} },
        )
        .await
        .unwrap();
    let id = reply.get_document("cursor").unwrap().get_i64("id").unwrap();
    let waiting = {
        let db = db.clone();
        tokio::spawn(async move {
            db.run_command(doc! { "getMore": id, "collection": "c", "maxTimeMS": 3000 })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ops = admin(&client, doc! { "currentOp": 1, "op": "getmore" }).await;
    let inprog = ops.get_array("inprog").unwrap();
    assert_eq!(inprog.len(), 1, "{inprog:?}");
    let op = inprog[0].as_document().unwrap();
    assert_eq!(op.get_str("ns").unwrap(), "app.c");
    assert_eq!(
        op.get_document("command")
            .unwrap()
            .get_i64("getMore")
            .unwrap(),
        id
    );
    // Unfiltered, the currentOp command sees itself too.
    let all = admin(&client, doc! { "currentOp": 1 }).await;
    assert!(all.get_array("inprog").unwrap().len() >= 2);
    waiting.await.unwrap().unwrap();
    let ops = admin(&client, doc! { "currentOp": 1, "op": "getmore" }).await;
    assert!(ops.get_array("inprog").unwrap().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn stats_and_distinct() {
    let (sim, client) = setup().await;
    let db = client.database("app");
    let coll = db.collection::<Document>("c");
    coll.insert_many([
        doc! { "_id": 1, "tag": "a", "n": [1, 2] },
        doc! { "_id": 2, "tag": "b", "n": 2 },
        doc! { "_id": 3, "tag": "a", "n": [3] },
    ])
    .await
    .unwrap();
    db.run_command(doc! { "create": "v", "viewOn": "c", "pipeline": [] })
        .await
        .unwrap();
    let stats = db.run_command(doc! { "dbStats": 1 }).await.unwrap();
    assert_eq!(stats.get_str("db").unwrap(), "app");
    assert_eq!(stats.get_i32("collections").unwrap(), 1);
    assert_eq!(stats.get_i32("views").unwrap(), 1);
    assert_eq!(stats.get_i64("objects").unwrap(), 3);
    assert!(stats.get_f64("dataSize").unwrap() > 0.0);
    let cs = db.run_command(doc! { "collStats": "c" }).await.unwrap();
    assert_eq!(cs.get_str("ns").unwrap(), "app.c");
    assert_eq!(cs.get_i64("count").unwrap(), 3);
    assert_eq!(
        cs.get_i64("size").unwrap() as f64,
        stats.get_f64("dataSize").unwrap()
    );
    let err = db
        .run_command(doc! { "collStats": "nope" })
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), (26, "NamespaceNotFound".to_owned()));
    let err = db.run_command(doc! { "collStats": "v" }).await.unwrap_err();
    assert_eq!(code_of(&err), (166, "CommandNotSupportedOnView".to_owned()));

    let tags = coll.distinct("tag", doc! {}).await.unwrap();
    assert_eq!(tags, vec![Bson::from("a"), Bson::from("b")]);
    let n = coll.distinct("n", doc! { "tag": "a" }).await.unwrap();
    assert_eq!(n, vec![Bson::Int32(1), Bson::Int32(2), Bson::Int32(3)]);
    let err = db
        .run_command(doc! { "distinct": "c", "key": 5 })
        .await
        .unwrap_err();
    assert_eq!(code_of(&err).0, 14);
    sim.shutdown().await;
}
