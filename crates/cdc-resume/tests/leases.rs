//! One conformance suite for the leases of every store backend: mutual exclusion under
//! concurrent acquirers, expiry, a renewal after expiry fails, tokens strictly increase,
//! and saves and dead letters under an older token are refused (`Fenced`) with the
//! stored point unchanged. Redis and PostgreSQL come from `CDC_REDIS_URL` and
//! `CDC_POSTGRES_URL` (defaults: the local servers); MongoDB from a fresh mongo-sim. When
//! `CI=true` an unreachable backend fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{postgres_url, redis_url, unique, unreachable_backend};

use std::{sync::Arc, time::Duration};

use bson::doc;
use cdc_core::{
    ChangeEvent, ClusterTime, DeadLetter, DeadLetterStore, Error, ErrorKind, LeaseStore,
    ResumePoint, ResumeStore, ResumeToken,
};
use cdc_resume::{FileStore, MemoryStore, MongoStore, PostgresStore, RedisStore};

/// A store with points, dead letters and leases.
trait Backend: ResumeStore + DeadLetterStore + LeaseStore {}
impl<T: ResumeStore + DeadLetterStore + LeaseStore> Backend for T {}

fn point(t: u32) -> ResumePoint {
    let token =
        ResumeToken::from_document(&doc! { "_data": format!("82{t:08X}00000001") }).unwrap();
    ResumePoint::post_batch(
        token,
        ClusterTime::new(t, 1),
        bson::DateTime::from_millis(1_700_000_000_000),
    )
}

fn letter(stream: &str, t: u32) -> DeadLetter {
    let event = ChangeEvent::from_document(&doc! {
        "_id": { "_data": format!("82{t:08X}00000001") },
        "operationType": "insert",
        "clusterTime": bson::Timestamp { time: t, increment: 1 },
        "ns": { "db": "d", "coll": "c" },
        "documentKey": { "_id": 1 },
        "fullDocument": { "_id": 1 },
    })
    .unwrap();
    let error = std::io::Error::other("boom");
    DeadLetter::new(stream, &event, Some(&error as _), 1, false).unwrap()
}

fn fenced(e: &Error) -> bool {
    e.kind() == ErrorKind::Fenced && matches!(e, Error::Fenced { .. })
}

const TTL: Duration = Duration::from_millis(400);

async fn suite(name: &str, store: Arc<dyn Backend>) {
    let stream = unique(&format!("{name}-lease"));
    let s = stream.as_str();

    // Free: the first owner gets it; others are refused while it holds it.
    assert_eq!(store.holder(s).await.unwrap(), None, "{name}");
    let a = store.acquire(s, "a", TTL).await.unwrap().expect("free");
    assert_eq!((a.owner.as_str(), a.stream.as_str()), ("a", s), "{name}");
    assert!(
        store.acquire(s, "b", TTL).await.unwrap().is_none(),
        "{name}: held"
    );
    assert_eq!(
        store.holder(s).await.unwrap().map(|l| l.token),
        Some(a.token),
        "{name}"
    );
    // The holder asking again keeps its token.
    let again = store.acquire(s, "a", TTL).await.unwrap().unwrap();
    assert_eq!(again.token, a.token, "{name}");

    // Saves under the lease pass; renewals extend it.
    store.save_fenced(&a, &point(10)).await.unwrap();
    store.record_fenced(&a, &letter(s, 10)).await.unwrap();
    let renewed = store.renew(&a, TTL).await.unwrap();
    assert_eq!(renewed.token, a.token, "{name}");
    assert!(renewed.expires_at_ms >= a.expires_at_ms, "{name}");

    // Expired: a renewal fails though nobody took over; a save still passes (no newer
    // holder exists); another owner takes it with a greater token.
    tokio::time::sleep(TTL + Duration::from_millis(100)).await;
    assert_eq!(store.holder(s).await.unwrap(), None, "{name}: expired");
    let err = store.renew(&a, TTL).await.unwrap_err();
    assert!(fenced(&err), "{name}: {err}");
    store.save_fenced(&a, &point(11)).await.unwrap();
    let b = store.acquire(s, "b", TTL).await.unwrap().expect("expired");
    assert!(b.token > a.token, "{name}: {} after {}", b.token, a.token);

    // The old holder is fenced off: its saves, letters and renewals are refused, and the
    // stored point stays.
    for e in [
        store.save_fenced(&a, &point(50)).await.unwrap_err(),
        store.record_fenced(&a, &letter(s, 50)).await.unwrap_err(),
        store.renew(&a, TTL).await.unwrap_err(),
    ] {
        assert!(fenced(&e), "{name}: {e}");
    }
    assert_eq!(
        store.load(s).await.unwrap().unwrap().cluster_time,
        ClusterTime::new(11, 1),
        "{name}: the point stays"
    );
    assert_eq!(
        store.count(s).await.unwrap(),
        1,
        "{name}: no letter under the old token"
    );
    // Releasing a lost lease leaves the holder's alone.
    store.release(&a).await.unwrap();
    assert_eq!(
        store.holder(s).await.unwrap().map(|l| l.token),
        Some(b.token),
        "{name}"
    );
    store.save_fenced(&b, &point(12)).await.unwrap();
    // The forward rule holds under a lease too.
    let err = store.save_fenced(&b, &point(5)).await.unwrap_err();
    assert!(matches!(err, Error::Regression { .. }), "{name}: {err}");

    // Released: another owner takes it at once, with a greater token.
    store.release(&b).await.unwrap();
    let c = store.acquire(s, "c", TTL).await.unwrap().expect("released");
    assert!(c.token > b.token, "{name}");
    assert!(
        fenced(&store.save_fenced(&b, &point(13)).await.unwrap_err()),
        "{name}"
    );

    // The same owner after expiry is a new holder: its old token is fenced off too (a
    // paused incarnation of it cannot write).
    let c2 = {
        tokio::time::sleep(TTL + Duration::from_millis(100)).await;
        store.acquire(s, "c", TTL).await.unwrap().expect("expired")
    };
    assert!(c2.token > c.token, "{name}");
    assert!(
        fenced(&store.save_fenced(&c, &point(14)).await.unwrap_err()),
        "{name}"
    );
    store.save_fenced(&c2, &point(14)).await.unwrap();

    // Tokens strictly increase over many holders.
    let mut last = c2.token;
    for i in 0..5 {
        let holder = store.holder(s).await.unwrap().unwrap();
        let lease = cdc_core::Lease::new(s, holder.owner, holder.token, holder.expires_at_ms);
        store.release(&lease).await.unwrap();
        let next = store
            .acquire(s, &format!("o{i}"), TTL)
            .await
            .unwrap()
            .unwrap();
        assert!(next.token > last, "{name}: {} after {last}", next.token);
        last = next.token;
    }

    // Mutual exclusion: of 16 concurrent acquirers of a free stream, one wins.
    let race = unique(&format!("{name}-race"));
    let mut racers = tokio::task::JoinSet::new();
    for i in 0..16 {
        let store = Arc::clone(&store);
        let race = race.clone();
        racers.spawn(async move { store.acquire(&race, &format!("r{i}"), TTL).await.unwrap() });
    }
    let winners: Vec<_> = racers.join_all().await.into_iter().flatten().collect();
    assert_eq!(winners.len(), 1, "{name}: {winners:?}");
    // Leases are per stream.
    let other = unique(&format!("{name}-other"));
    assert!(
        store.acquire(&other, "z", TTL).await.unwrap().is_some(),
        "{name}"
    );

    // The live leases under a prefix, in stream order (a group's members).
    let group = unique(&format!("{name}-group"));
    let (m2, m1, outside) = (
        format!("{group}/m/2"),
        format!("{group}/m/1"),
        format!("{group}/x"),
    );
    let l2 = store.acquire(&m2, "two", TTL).await.unwrap().unwrap();
    store.acquire(&m1, "one", TTL).await.unwrap().unwrap();
    store.acquire(&outside, "x", TTL).await.unwrap().unwrap();
    let listed = store.leases(&format!("{group}/m/")).await.unwrap();
    let owners: Vec<&str> = listed.iter().map(|l| l.owner.as_str()).collect();
    assert_eq!(owners, ["one", "two"], "{name}");
    store.release(&l2).await.unwrap();
    let listed = store.leases(&format!("{group}/m/")).await.unwrap();
    assert_eq!(listed.len(), 1, "{name}: a released lease is not live");
    assert!(
        store
            .leases(&format!("{group}/none/"))
            .await
            .unwrap()
            .is_empty(),
        "{name}"
    );
}

#[tokio::test]
async fn memory_leases() {
    suite("memory", Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn file_leases() {
    let root = std::env::temp_dir().join(unique("cdc-file-lease"));
    let store = Arc::new(FileStore::new(&root).unwrap());
    suite("file", store.clone()).await;
    // Lease files are not streams with points.
    let streams = store.list_streams().await.unwrap();
    assert_eq!(streams.len(), 1, "{streams:?}");
    assert!(store.load(&streams[0]).await.unwrap().is_some());
    // Another store on the same directory (another process of the host) sees the lease.
    let other = FileStore::new(&root).unwrap();
    let lease = store.acquire("shared", "p1", TTL).await.unwrap().unwrap();
    assert!(other.acquire("shared", "p2", TTL).await.unwrap().is_none());
    assert_eq!(other.holder("shared").await.unwrap(), Some(lease));
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn redis_leases() {
    let url = redis_url();
    let store = Arc::new(RedisStore::new(&url, format!("{}:", unique("cdc-lease"))).unwrap());
    if let Err(e) = store.list_streams().await {
        return unreachable_backend("leases", "redis", &e.to_string());
    }
    suite("redis", store.clone()).await;
    // Lease keys are not streams with points.
    let streams = store.list_streams().await.unwrap();
    assert_eq!(streams.len(), 1, "{streams:?}");
}

#[tokio::test]
async fn postgres_leases() {
    let url = postgres_url();
    let table = unique("cdc_lease").replace('-', "_");
    let store = match PostgresStore::connect(&url, &table).await {
        Ok(s) => Arc::new(s),
        Err(e) => return unreachable_backend("leases", "postgres", &e.to_string()),
    };
    suite("postgres", store.clone()).await;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "DROP TABLE {table}; DROP TABLE {}; DROP TABLE {}",
            store.dead_letters_table(),
            store.leases_table()
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn mongodb_leases() {
    let deployment = mongo_sim::TestDeployment::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(deployment.uri())
        .await
        .unwrap();
    let db = unique("lease").replace('-', "_");
    let store = Arc::new(MongoStore::new(&client, &db, "points"));
    suite("mongodb", store.clone()).await;
    // A stream with a lease and no point yet has no point, and is not listed.
    let fresh = store.acquire("fresh", "x", TTL).await.unwrap().unwrap();
    assert_eq!(store.load("fresh").await.unwrap(), None);
    assert!(
        !store
            .list_streams()
            .await
            .unwrap()
            .contains(&"fresh".to_owned())
    );
    // Deleting a point keeps the lease, so tokens keep growing.
    store.save_fenced(&fresh, &point(1)).await.unwrap();
    store.delete("fresh").await.unwrap();
    assert_eq!(store.load("fresh").await.unwrap(), None);
    assert_eq!(
        store.holder("fresh").await.unwrap().map(|l| l.token),
        Some(fresh.token)
    );
    let _ = client.database(&db).drop().await;
    deployment.shutdown().await;
}
