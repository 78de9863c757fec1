//! Hostile input never takes the simulator down: deep nesting, stalled half-sent messages,
//! too many connections, endless waits and out-of-range arguments are each refused with
//! the server's answer, and a normal client still reads its data afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bson::{Bson, Document, doc};
use mongo_sim::{MongoSim, SimOptions, wire};
use mongodb::{Client, error::ErrorKind};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Reads one OP_MSG reply body; `None` when the server closed the connection.
async fn read_reply(sock: &mut TcpStream) -> Option<Document> {
    let mut header = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), sock.read_exact(&mut header))
        .await
        .expect("no answer");
    read.ok()?;
    let len = i32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - 16];
    sock.read_exact(&mut body).await.ok()?;
    Some(Document::from_reader(&body[5..]).unwrap())
}

/// A client that wrote a document before the hostile input reads it back after.
async fn seeded(sim: &MongoSim) -> Client {
    let client = Client::with_uri_str(sim.uri()).await.unwrap();
    client
        .database("app")
        .collection::<Document>("c")
        .insert_one(doc! { "_id": 1, "v": "kept" })
        .await
        .unwrap();
    client
}

async fn data_still_readable(client: &Client) {
    let found = client
        .database("app")
        .collection::<Document>("c")
        .find_one(doc! { "_id": 1 })
        .await
        .unwrap();
    assert_eq!(found, Some(doc! { "_id": 1, "v": "kept" }));
}

/// BSON bytes of `{ a: { a: … { a: 1 } } }` nested `depth` documents deep, built by hand
/// (encoding through `bson` would itself recurse).
fn nested(depth: usize) -> Vec<u8> {
    // Each level: type 0x03, key "a\0", then the inner document, inside a document frame.
    let mut inner = {
        let mut d = vec![0u8; 4];
        d.extend_from_slice(&[0x10, b'a', 0, 1, 0, 0, 0, 0]);
        let len = d.len() as i32;
        d[..4].copy_from_slice(&len.to_le_bytes());
        d
    };
    for _ in 1..depth {
        let mut d = vec![0u8; 4];
        d.extend_from_slice(&[0x03, b'a', 0]);
        d.extend_from_slice(&inner);
        d.push(0);
        let len = d.len() as i32;
        d[..4].copy_from_slice(&len.to_le_bytes());
        inner = d;
    }
    inner
}

/// An OP_MSG whose body is `{ <name>: "c", <field>: <nested>, $db: "app" }`.
fn message_with(name: &str, field: &str, nested_doc: &[u8]) -> Vec<u8> {
    let mut body = vec![0u8; 4];
    body.push(0x02);
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(&2i32.to_le_bytes());
    body.extend_from_slice(b"c\0");
    body.push(0x03);
    body.extend_from_slice(field.as_bytes());
    body.push(0);
    body.extend_from_slice(nested_doc);
    body.push(0x02);
    body.extend_from_slice(b"$db\0");
    body.extend_from_slice(&4i32.to_le_bytes());
    body.extend_from_slice(b"app\0");
    body.push(0);
    let len = body.len() as i32;
    body[..4].copy_from_slice(&len.to_le_bytes());
    let mut msg = vec![0u8; 16];
    msg[4..8].copy_from_slice(&9i32.to_le_bytes());
    msg[12..16].copy_from_slice(&2013i32.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    msg.push(0);
    msg.extend_from_slice(&body);
    let len = msg.len() as i32;
    msg[..4].copy_from_slice(&len.to_le_bytes());
    msg
}

fn code_of(reply: &Document) -> (i32, String) {
    (
        reply.get_i32("code").unwrap(),
        reply.get_str("codeName").unwrap().to_owned(),
    )
}

#[test]
fn nesting_depth_is_measured_without_recursion() {
    assert_eq!(wire::nesting_depth(&nested(1)), 1);
    assert_eq!(wire::nesting_depth(&nested(7)), 7);
    assert_eq!(wire::nesting_depth(&nested(100_000)), 100_000);
    let mut mixed = Vec::new();
    doc! { "a": [ { "b": [1, { "c": 2 }] } ], "s": "x" }
        .to_writer(&mut mixed)
        .unwrap();
    assert_eq!(wire::nesting_depth(&mixed), 5);
    // Truncated or nonsense bytes stop the walk; they never panic.
    for cut in 0..mixed.len() {
        let _ = wire::nesting_depth(&mixed[..cut]);
    }
}

#[tokio::test]
async fn deeply_nested_documents_are_refused_with_the_servers_error() {
    let sim = MongoSim::start().await.unwrap();
    let client = seeded(&sim).await;
    let mut sock = TcpStream::connect(sim.addr()).await.unwrap();
    // 2,000 levels in about 16 KB: over maxBSONDepth (200), answered with Overflow on
    // the same connection, which stays usable.
    let msg = message_with("insert", "documents", &nested(2_000));
    assert!(msg.len() < 20_000);
    sock.write_all(&msg).await.unwrap();
    let reply = read_reply(&mut sock)
        .await
        .expect("an error reply, not a close");
    assert_eq!(code_of(&reply), (15, "Overflow".to_owned()), "{reply}");
    // A find filter nested 1,500 deep: the same.
    sock.write_all(&message_with("find", "filter", &nested(1_500)))
        .await
        .unwrap();
    let reply = read_reply(&mut sock).await.unwrap();
    assert_eq!(code_of(&reply), (15, "Overflow".to_owned()), "{reply}");
    let ping = wire::encode_request(10, &doc! { "ping": 1, "$db": "admin" }, false).unwrap();
    sock.write_all(&ping).await.unwrap();
    assert_eq!(
        read_reply(&mut sock).await.unwrap().get_f64("ok").unwrap(),
        1.0
    );

    // Through the driver: 150 `$and` levels are 300 BSON levels, refused the same way.
    let mut filter = doc! { "x": 1 };
    for _ in 0..150 {
        filter = doc! { "$and": [filter] };
    }
    let err = client
        .database("app")
        .collection::<Document>("c")
        .find_one(filter)
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind.as_ref(), ErrorKind::Command(c) if c.code == 15 && c.code_name == "Overflow"),
        "{err}"
    );
    data_still_readable(&client).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn stalled_half_sent_messages_are_cut_off_and_hold_little_memory() {
    let sim = MongoSim::start().await.unwrap();
    let client = seeded(&sim).await;
    // Many connections each announce a 46 MB message and send only its start.
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut sock = TcpStream::connect(sim.addr()).await.unwrap();
        let mut header = vec![0u8; 16];
        header[..4].copy_from_slice(&(46_000_000i32).to_le_bytes());
        header[12..16].copy_from_slice(&2013i32.to_le_bytes());
        sock.write_all(&header).await.unwrap();
        sock.write_all(&[0u8; 1024]).await.unwrap();
        stalled.push(sock);
    }
    data_still_readable(&client).await;
    // A message whose body stalls is dropped once the server's read timeout passes;
    // shown here with the reader itself and a short timeout.
    let (mut near, far) = tokio::io::duplex(64);
    let mut header = vec![0u8; 16];
    header[..4].copy_from_slice(&(46_000_000i32).to_le_bytes());
    header[12..16].copy_from_slice(&2013i32.to_le_bytes());
    near.write_all(&header).await.unwrap();
    let mut far = far;
    let read = wire::read_request_within(&mut far, Duration::from_millis(100)).await;
    assert!(
        matches!(read, Err(wire::WireError::Timeout(46_000_000))),
        "{read:?}"
    );
    drop(stalled);
    data_still_readable(&client).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_and_the_rest_keep_working() {
    let sim = MongoSim::start_with(SimOptions {
        max_connections: 8,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let client = seeded(&sim).await;
    // Hold every remaining slot.
    let mut held = Vec::new();
    let ping = wire::encode_request(1, &doc! { "ping": 1, "$db": "admin" }, false).unwrap();
    let mut refused = 0;
    for _ in 0..20 {
        let mut sock = TcpStream::connect(sim.addr()).await.unwrap();
        sock.write_all(&ping).await.unwrap();
        match read_reply(&mut sock).await {
            Some(_) => held.push(sock),
            None => refused += 1,
        }
    }
    assert!(refused > 0, "over the cap, connections are closed");
    assert!(held.len() < 8, "the driver's own connections count too");
    drop(held);
    // Slots free again: a new client connects and reads.
    tokio::time::sleep(Duration::from_millis(200)).await;
    data_still_readable(&client).await;
    let fresh = Client::with_uri_str(sim.uri()).await.unwrap();
    data_still_readable(&fresh).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn out_of_range_arguments_are_refused_and_a_waiting_get_more_ends_with_its_client() {
    let sim = MongoSim::start().await.unwrap();
    let client = seeded(&sim).await;
    let db = client.database("app");
    let err = db
        .run_command(doc! { "find": "c", "skip": -5 })
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind.as_ref(), ErrorKind::Command(c) if c.code == 51024),
        "{err}"
    );
    let err = db
        .run_command(doc! { "find": "c", "batchSize": -1 })
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind.as_ref(), ErrorKind::Command(c) if c.code == 51024),
        "{err}"
    );
    let reply = db
        .run_command(
            doc! { "aggregate": "c", "pipeline": [ { "$changeStream": {} } ], "cursor": {} },
        )
        .await
        .unwrap();
    let id = reply.get_document("cursor").unwrap().get_i64("id").unwrap();
    for bad in [Bson::Int64(-1), Bson::Int64(i64::from(i32::MAX) + 1)] {
        let err = db
            .run_command(doc! { "getMore": id, "collection": "c", "maxTimeMS": bad })
            .await
            .unwrap_err();
        assert!(
            matches!(err.kind.as_ref(), ErrorKind::Command(c) if c.code == 2 && c.code_name == "BadValue"),
            "{err}"
        );
    }
    // The longest allowed wait: the client goes away, and so does the server's wait (the
    // connection slot is freed, the cursor stays for a resume).
    let mut sock = TcpStream::connect(sim.addr()).await.unwrap();
    let get_more = wire::encode_request(
        2,
        &doc! { "getMore": id, "collection": "c", "maxTimeMS": i32::MAX, "$db": "app" },
        false,
    )
    .unwrap();
    sock.write_all(&get_more).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(sock);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reply = db
        .run_command(doc! { "getMore": id, "collection": "c", "maxTimeMS": 10 })
        .await
        .unwrap();
    assert_eq!(
        reply.get_document("cursor").unwrap().get_i64("id").unwrap(),
        id
    );
    data_still_readable(&client).await;
    sim.shutdown().await;
}
