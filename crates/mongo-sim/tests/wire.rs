//! Bad input never crashes the server: each case closes or answers only its own
//! connection, and the driver keeps working throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bson::{Document, doc};
use mongo_sim::{MongoSim, wire};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Reads one reply; `None` when the server closed the connection.
async fn read_reply(sock: &mut TcpStream) -> Option<(i32, Document)> {
    let mut header = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), sock.read_exact(&mut header))
        .await
        .expect("no answer");
    read.ok()?;
    let len = i32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    let op = i32::from_le_bytes(header[12..16].try_into().unwrap());
    let mut body = vec![0u8; len - 16];
    sock.read_exact(&mut body).await.ok()?;
    let doc_start = match op {
        2013 => 5, // flags + section kind
        1 => 20,   // responseFlags, cursorID, startingFrom, numberReturned
        other => panic!("unexpected reply opcode {other}"),
    };
    Some((op, Document::from_reader(&body[doc_start..]).unwrap()))
}

async fn closed(sock: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), sock.read(&mut byte))
            .await
            .expect("not closed"),
        Ok(0) | Err(_)
    )
}

async fn driver_still_works(sim: &MongoSim) {
    let client = mongodb::Client::with_uri_str(sim.uri()).await.unwrap();
    client
        .database("x")
        .run_command(doc! { "ping": 1 })
        .await
        .unwrap();
}

#[tokio::test]
async fn malformed_messages_close_only_their_connection() {
    let sim = MongoSim::start().await.unwrap();
    let keeper = mongodb::Client::with_uri_str(sim.uri()).await.unwrap();
    keeper
        .database("x")
        .run_command(doc! { "ping": 1 })
        .await
        .unwrap();

    let cases: Vec<Vec<u8>> = vec![
        // A length below the header size.
        vec![3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xdd, 7, 0, 0],
        // A length over 48 MB.
        {
            let mut h = vec![0u8; 16];
            h[..4].copy_from_slice(&(48_000_001i32).to_le_bytes());
            h[12..16].copy_from_slice(&2013i32.to_le_bytes());
            h
        },
        // An unknown opcode.
        {
            let mut h = vec![0u8; 20];
            h[..4].copy_from_slice(&20i32.to_le_bytes());
            h[12..16].copy_from_slice(&9999i32.to_le_bytes());
            h
        },
        // OP_MSG whose body is not BSON.
        {
            let mut m = vec![0u8; 16];
            m.extend_from_slice(&0u32.to_le_bytes());
            m.push(0);
            m.extend_from_slice(&[12, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
            let len = m.len() as i32;
            m[..4].copy_from_slice(&len.to_le_bytes());
            m[12..16].copy_from_slice(&2013i32.to_le_bytes());
            m
        },
        // A bad checksum.
        {
            let mut m = wire::encode_request(1, &doc! { "ping": 1, "$db": "admin" }, true).unwrap();
            let last = m.len() - 1;
            m[last] ^= 0xff;
            m
        },
    ];
    for (i, bytes) in cases.into_iter().enumerate() {
        let mut sock = TcpStream::connect(sim.addr()).await.unwrap();
        sock.write_all(&bytes).await.unwrap();
        assert!(
            closed(&mut sock).await,
            "case {i}: connection should be closed"
        );
        keeper
            .database("x")
            .run_command(doc! { "ping": 1 })
            .await
            .unwrap();
    }
    driver_still_works(&sim).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn checksummed_messages_legacy_hello_and_compression() {
    let sim = MongoSim::start().await.unwrap();
    let mut sock = TcpStream::connect(sim.addr()).await.unwrap();

    // OP_MSG with a valid CRC-32C.
    let msg = wire::encode_request(7, &doc! { "ping": 1, "$db": "admin" }, true).unwrap();
    sock.write_all(&msg).await.unwrap();
    let (op, reply) = read_reply(&mut sock).await.unwrap();
    assert_eq!((op, reply.get_f64("ok").unwrap()), (2013, 1.0));

    // Unknown command: ok 0, code 59, connection still usable.
    let msg = wire::encode_request(8, &doc! { "nope": 1, "$db": "admin" }, false).unwrap();
    sock.write_all(&msg).await.unwrap();
    let (_, reply) = read_reply(&mut sock).await.unwrap();
    assert_eq!(reply.get_i32("code").unwrap(), 59);
    assert_eq!(reply.get_str("codeName").unwrap(), "CommandNotFound");

    // Legacy OP_QUERY isMaster, as older clients send first.
    let mut q = vec![0u8; 16];
    q.extend_from_slice(&0i32.to_le_bytes());
    q.extend_from_slice(b"admin.$cmd\0");
    q.extend_from_slice(&0i32.to_le_bytes());
    q.extend_from_slice(&(-1i32).to_le_bytes());
    doc! { "isMaster": 1 }.to_writer(&mut q).unwrap();
    let len = q.len() as i32;
    q[..4].copy_from_slice(&len.to_le_bytes());
    q[4..8].copy_from_slice(&9i32.to_le_bytes());
    q[12..16].copy_from_slice(&2004i32.to_le_bytes());
    sock.write_all(&q).await.unwrap();
    let (op, reply) = read_reply(&mut sock).await.unwrap();
    assert_eq!(op, 1, "OP_REPLY");
    assert!(reply.get_bool("ismaster").unwrap());
    assert_eq!(reply.get_i32("maxWireVersion").unwrap(), 21);
    assert_eq!(
        reply.get_array("hosts").unwrap()[0].as_str().unwrap(),
        sim.addr().to_string()
    );

    // OP_COMPRESSED is refused with an error, not a crash.
    let mut c = vec![0u8; 16];
    c.extend_from_slice(&2013i32.to_le_bytes());
    c.extend_from_slice(&10i32.to_le_bytes());
    c.push(0);
    c.extend_from_slice(&[0u8; 10]);
    let len = c.len() as i32;
    c[..4].copy_from_slice(&len.to_le_bytes());
    c[12..16].copy_from_slice(&2012i32.to_le_bytes());
    sock.write_all(&c).await.unwrap();
    let (_, reply) = read_reply(&mut sock).await.unwrap();
    assert_eq!(reply.get_f64("ok").unwrap(), 0.0);
    assert!(reply.get_str("errmsg").unwrap().contains("OP_COMPRESSED"));

    // And the connection still answers.
    let msg = wire::encode_request(10, &doc! { "ping": 1, "$db": "admin" }, false).unwrap();
    sock.write_all(&msg).await.unwrap();
    assert!(read_reply(&mut sock).await.is_some());
    sim.shutdown().await;
}
