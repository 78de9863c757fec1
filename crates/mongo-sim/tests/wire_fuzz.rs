//! The wire decoder fuzzed with property tests: arbitrary bytes and mutated valid messages
//! never panic it; whatever it cannot read is an error for that connection alone. (Runs
//! in CI with every test; `PROPTEST_CASES` raises the count for a longer run.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bson::doc;
use mongo_sim::wire;
use proptest::prelude::*;

fn decode(bytes: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut reader = bytes;
    // Ok or Err are both fine; a panic or a hang is the failure.
    let _ = rt.block_on(wire::read_request_within(
        &mut reader,
        std::time::Duration::from_secs(1),
    ));
    let _ = wire::nesting_depth(bytes);
}

fn framed(op_code: i32, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(&((16 + body.len()) as i32).to_le_bytes());
    msg.extend_from_slice(&1i32.to_le_bytes());
    msg.extend_from_slice(&0i32.to_le_bytes());
    msg.extend_from_slice(&op_code.to_le_bytes());
    msg.extend_from_slice(body);
    msg
}

fn valid_messages() -> Vec<Vec<u8>> {
    let cmds = [
        doc! { "ping": 1, "$db": "admin" },
        doc! { "insert": "c", "documents": [ { "_id": 1, "a": [1, { "b": "x" }] } ], "$db": "d" },
        doc! { "find": "c", "filter": { "$or": [ { "a": { "$gt": 1 } } ] }, "$db": "d" },
    ];
    let mut out = Vec::new();
    for cmd in &cmds {
        out.push(wire::encode_request(1, cmd, false).unwrap());
        out.push(wire::encode_request(1, cmd, true).unwrap());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bodies_never_panic(
        op in prop::sample::select(vec![1i32, 2004, 2012, 2013, 0, -1]),
        body in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        decode(&framed(op, &body));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        decode(&bytes);
    }

    #[test]
    fn mutated_valid_messages_never_panic(
        which in 0usize..6,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        truncate in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut msg = valid_messages().swap_remove(which);
        for (at, byte) in edits {
            let i = at.index(msg.len());
            msg[i] = byte;
        }
        if let Some(cut) = truncate {
            msg.truncate(cut.index(msg.len()));
        }
        decode(&msg);
    }
}
