//! The storage engine against a single-threaded model: a random interleaving of writes,
//! transactions of several sessions and snapshot reads at past times returns what a
//! model of committed states returns for those times, and a transaction's fate (commit
//! or WriteConflict) is the model's: a conflict exactly when a document it wrote was
//! written by someone else after its snapshot.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use bson::{Bson, Document, doc};
use proptest::prelude::*;

use super::*;
use crate::{engine::Ts, state::State};

#[derive(Clone, Debug)]
enum Step {
    /// Outside a transaction: upsert (`Some`) or delete (`None`) document `key`.
    Write(i32, bool),
    /// Session `s` starts a transaction (ending any it had, uncommitted).
    Begin(usize),
    /// Session `s` upserts or deletes `key` in its transaction.
    TxnWrite(usize, i32, bool),
    /// Session `s` commits.
    Commit(usize),
    /// A snapshot read at the `n`-th recorded time counted from the newest.
    Read(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..6_i32, any::<bool>()).prop_map(|(k, up)| Step::Write(k, up)),
        1 => (0..3_usize).prop_map(Step::Begin),
        3 => (0..3_usize, 0..6_i32, any::<bool>()).prop_map(|(s, k, up)| Step::TxnWrite(s, k, up)),
        1 => (0..3_usize).prop_map(Step::Commit),
        2 => (0..8_usize).prop_map(Step::Read),
    ]
}

/// What the model keeps of a transaction.
#[derive(Clone, Debug)]
struct ModelTxn {
    read_at: Ts,
    snapshot: BTreeMap<i32, i64>,
    writes: BTreeMap<i32, Option<i64>>,
}

struct Sim {
    state: State,
    info: ServerInfo,
    counter: i64,
    txn_numbers: [i64; 3],
}

impl Sim {
    /// A fresh server with an empty collection `t` (created first: a transaction creating
    /// it would conflict with its creation elsewhere, a catalog matter the model leaves
    /// out).
    fn new(oplog_capacity: usize) -> Self {
        let mut sim = Self {
            state: State::new(oplog_capacity),
            info: ServerInfo {
                host: "localhost:1".to_owned(),
                set_name: "rs0".to_owned(),
            },
            counter: 0,
            txn_numbers: [0; 3],
        };
        sim.run("create", doc! { "create": "t" }).unwrap();
        sim
    }

    fn run(&mut self, name: &str, cmd: Document) -> CmdResult<Document> {
        let ctx = Ctx {
            info: &self.info,
            conn_id: 1,
            term: 1,
            connections: Connections {
                current: 1,
                available: 1,
                total_created: 1,
            },
            uptime: std::time::Duration::ZERO,
        };
        let outcome = run(&mut self.state, &ctx, "db", name, &cmd);
        let state = &mut self.state;
        let reply = outcome.finish(
            &cmd,
            |_| panic!("one batch holds every read here"),
            &mut |db, name, create| resolve(state, db, name, create),
        )?;
        Ok(from_raw(&reply).unwrap())
    }

    fn now(&self) -> Ts {
        crate::engine::ts(self.state.log.last_ts())
    }

    fn write_cmd(&mut self, key: i32, upsert: bool) -> (&'static str, Document, i64) {
        self.counter += 1;
        let v = self.counter;
        if upsert {
            let cmd = doc! { "update": "t", "updates": [
                { "q": { "_id": key }, "u": { "$set": { "v": v } }, "upsert": true }
            ] };
            ("update", cmd, v)
        } else {
            let cmd = doc! { "delete": "t", "deletes": [ { "q": { "_id": key }, "limit": 1 } ] };
            ("delete", cmd, v)
        }
    }

    fn session(s: usize) -> Document {
        doc! { "id": Bson::Binary(bson::Binary {
            subtype: bson::spec::BinarySubtype::Uuid,
            bytes: vec![u8::try_from(s).unwrap(); 16],
        }) }
    }

    fn read_at(&mut self, at: Ts) -> BTreeMap<i32, i64> {
        let at = bson::Timestamp {
            time: u32::try_from(at >> 32).unwrap(),
            increment: u32::try_from(at & 0xFFFF_FFFF).unwrap(),
        };
        let reply = self
            .run(
                "find",
                doc! { "find": "t", "batchSize": 1000, "readConcern": { "level": "snapshot", "atClusterTime": at } },
            )
            .unwrap();
        docs_of(&reply)
    }
}

fn docs_of(reply: &Document) -> BTreeMap<i32, i64> {
    let batch = reply
        .get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap();
    batch
        .iter()
        .map(|d| {
            let d = d.as_document().unwrap();
            (d.get_i32("_id").unwrap(), d.get_i64("v").unwrap())
        })
        .collect()
}

fn check(steps: &[Step]) -> Result<(), TestCaseError> {
    let mut sim = Sim::new(100_000);
    // The model: committed states with their times, when each key was last written.
    let mut states: Vec<(Ts, BTreeMap<i32, i64>)> = vec![(sim.now(), BTreeMap::new())];
    let mut last_write: BTreeMap<i32, Ts> = BTreeMap::new();
    let mut txns: [Option<ModelTxn>; 3] = [None, None, None];
    for step in steps {
        let current = states.last().map(|(_, s)| s.clone()).unwrap_or_default();
        match step.clone() {
            Step::Write(key, upsert) => {
                let (name, cmd, v) = sim.write_cmd(key, upsert);
                sim.run(name, cmd).unwrap();
                let mut next = current.clone();
                let changed = if upsert {
                    next.insert(key, v);
                    true
                } else {
                    next.remove(&key).is_some()
                };
                if changed {
                    last_write.insert(key, sim.now());
                    states.push((sim.now(), next));
                }
            }
            Step::Begin(s) => {
                sim.txn_numbers[s] += 1;
                let cmd = doc! {
                    "find": "t", "batchSize": 1000, "lsid": Sim::session(s),
                    "txnNumber": sim.txn_numbers[s], "autocommit": false, "startTransaction": true,
                };
                let seen = docs_of(&sim.run("find", cmd).unwrap());
                prop_assert_eq!(&seen, &current, "a new transaction reads the newest state");
                txns[s] = Some(ModelTxn {
                    read_at: sim.now(),
                    snapshot: current.clone(),
                    writes: BTreeMap::new(),
                });
            }
            Step::TxnWrite(s, key, upsert) => {
                let Some(txn) = txns[s].as_mut() else {
                    continue;
                };
                let (name, mut cmd, v) = sim.write_cmd(key, upsert);
                cmd.insert("lsid", Sim::session(s));
                cmd.insert("txnNumber", sim.txn_numbers[s]);
                cmd.insert("autocommit", false);
                let sees = match txn.writes.get(&key) {
                    Some(mine) => mine.is_some(),
                    None => txn.snapshot.contains_key(&key),
                };
                // A write to a document someone wrote after the snapshot conflicts; a
                // delete of a document the transaction does not see writes nothing.
                let writes = upsert || sees;
                let conflict = writes && last_write.get(&key).is_some_and(|w| *w > txn.read_at);
                let result = sim.run(name, cmd);
                if conflict {
                    let err = result.expect_err("the model expects a WriteConflict");
                    prop_assert_eq!(err.code, code::WRITE_CONFLICT);
                    txns[s] = None;
                } else {
                    prop_assert!(result.is_ok(), "{:?}", result);
                    if writes {
                        txn.writes.insert(key, upsert.then_some(v));
                    }
                }
            }
            Step::Commit(s) => {
                let Some(txn) = txns[s].take() else {
                    continue;
                };
                let cmd = doc! {
                    "commitTransaction": 1, "lsid": Sim::session(s),
                    "txnNumber": sim.txn_numbers[s], "autocommit": false,
                };
                let conflict = txn
                    .writes
                    .keys()
                    .any(|k| last_write.get(k).is_some_and(|w| *w > txn.read_at));
                let result = sim.run("commitTransaction", cmd);
                if conflict {
                    let err = result.expect_err("the model expects a WriteConflict at commit");
                    prop_assert_eq!(err.code, code::WRITE_CONFLICT);
                } else {
                    prop_assert!(result.is_ok(), "{:?}", result);
                    if !txn.writes.is_empty() {
                        let mut next = current.clone();
                        for (k, v) in &txn.writes {
                            match v {
                                Some(v) => next.insert(*k, *v),
                                None => next.remove(k),
                            };
                            last_write.insert(*k, sim.now());
                        }
                        states.push((sim.now(), next));
                    }
                }
            }
            Step::Read(back) => {
                let index = states.len().saturating_sub(1 + back);
                let (at, expected) = states[index].clone();
                prop_assert_eq!(sim.read_at(at), expected, "snapshot read at {}", at);
            }
        }
    }
    // Every recorded time, read again at the end.
    for (at, expected) in states.clone() {
        prop_assert_eq!(sim.read_at(at), expected, "final read at {}", at);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn interleavings_read_and_conflict_as_the_model(steps in prop::collection::vec(step(), 1..60)) {
        check(&steps)?;
    }
}

/// Found by the property test: a transaction that inserted and then deleted a document
/// committed a write to it, so a transaction whose snapshot predates that commit
/// conflicts when it writes the document.
#[test]
fn a_transaction_that_inserted_and_deleted_a_document_wrote_it() {
    let steps = [
        Step::Begin(2),
        Step::TxnWrite(2, 4, true),
        Step::TxnWrite(2, 4, false),
        Step::Begin(1),
        Step::Commit(2),
        Step::TxnWrite(1, 4, true),
    ];
    check(&steps).unwrap();
}

/// A committed transaction is kept for a repeated commit, but no longer holds its
/// snapshot: the history horizon can pass it (an idle session would otherwise keep every
/// later version in memory).
#[test]
fn a_committed_transaction_keeps_no_snapshot_pinned() {
    let mut sim = Sim::new(1_000);
    let txn = |extra: Document| {
        let mut cmd = doc! { "lsid": Sim::session(0), "txnNumber": 1_i64, "autocommit": false };
        cmd.extend(extra);
        cmd
    };
    sim.run(
        "insert",
        txn(doc! { "insert": "t", "documents": [{ "_id": 1 }], "startTransaction": true }),
    )
    .unwrap();
    assert!(
        sim.state.history.pins.oldest().is_some(),
        "a running transaction pins"
    );
    sim.run("commitTransaction", txn(doc! { "commitTransaction": 1 }))
        .unwrap();
    assert_eq!(sim.state.history.pins.oldest(), None);
    // The repeated commit still succeeds.
    sim.run("commitTransaction", txn(doc! { "commitTransaction": 1 }))
        .unwrap();
}
