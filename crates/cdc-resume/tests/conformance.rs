//! One conformance suite for every resume store backend. Redis and PostgreSQL come from
//! `CDC_REDIS_URL` and `CDC_POSTGRES_URL` (defaults: the local servers); MongoDB from
//! `CDC_MONGODB_URI` or a fresh mongo-sim. When `CI=true` an unreachable backend fails the
//! test; elsewhere the test prints that it was skipped and why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{postgres_url, redis_url, unique, unreachable_backend};

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use bson::{Binary, doc, spec::BinarySubtype};
use cdc_core::{
    ClusterTime, Error, ErrorKind, OperationType, ResumePoint, ResumeStore, ResumeToken,
};
use cdc_resume::{FileStore, MemoryStore, MongoStore, PostgresStore, RedisStore};

type Corrupter = Box<dyn Fn(String) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

struct Backend {
    name: &'static str,
    store: Arc<dyn ResumeStore>,
    /// Writes an undecodable record for a stream, where the backend can hold one.
    corrupt: Option<Corrupter>,
    /// The same kind of store pointed at something that fails, and how its load fails:
    /// [`ErrorKind::Store`] (retried) for a server away, [`ErrorKind::Persistent`]
    /// ([`Error::StoreUnusable`]) for a file store whose directory is a file.
    failing: Option<(Arc<dyn ResumeStore>, ErrorKind)>,
}

/// A token with several fields and types, so byte-exactness is really tested.
fn token(n: u32) -> ResumeToken {
    ResumeToken::from_document(&doc! {
        "_data": format!("82{n:08X}000000012B0229296E04"),
        "_typeBits": Binary { subtype: BinarySubtype::Generic, bytes: vec![0x40, n as u8] },
        "n": i64::from(n),
    })
    .unwrap()
}

fn point(t: u32, inc: u32) -> ResumePoint {
    ResumePoint::for_event(
        token(t * 1000 + inc),
        ClusterTime::new(t, inc),
        OperationType::Update,
        bson::DateTime::from_millis(1_700_000_000_000 + i64::from(t)),
    )
}

async fn suite(b: Backend) {
    let store = &b.store;
    let s1 = unique(&format!("{}-one", b.name));
    let s2 = unique(&format!("{}-two", b.name));

    // Missing stream: no point, and that is not an error.
    assert_eq!(store.load(&s1).await.unwrap(), None, "{}", b.name);
    assert_eq!(store.load_cluster_time(&s1).await.unwrap(), None);

    // Byte-for-byte round trip.
    let p1 = point(10, 1);
    store.save(&s1, &p1).await.unwrap();
    let back = store.load(&s1).await.unwrap().unwrap();
    assert_eq!(
        back.token.as_bytes(),
        p1.token.as_bytes(),
        "{}: token bytes",
        b.name
    );
    assert_eq!(back, p1, "{}", b.name);
    assert_eq!(
        store.load_cluster_time(&s1).await.unwrap(),
        Some(ClusterTime::new(10, 1))
    );

    // A post-batch point (no operation type) round-trips too.
    let idle = ResumePoint::post_batch(
        token(5),
        ClusterTime::new(10, 1),
        bson::DateTime::from_millis(3),
    );
    store.save(&s1, &idle).await.unwrap();
    assert_eq!(store.load(&s1).await.unwrap().unwrap(), idle, "{}", b.name);

    // The origin (what the point was taken from) round-trips.
    let bound = point(10, 1).with_origin("shop.orders");
    store.save(&s1, &bound).await.unwrap();
    assert_eq!(store.load(&s1).await.unwrap().unwrap(), bound, "{}", b.name);
    store.delete(&s1).await.unwrap();
    store.save(&s1, &idle).await.unwrap();

    // Isolation.
    store.save(&s2, &point(3, 0)).await.unwrap();
    assert_eq!(
        store.load(&s1).await.unwrap().unwrap().cluster_time,
        ClusterTime::new(10, 1)
    );
    let listed = store.list_streams().await.unwrap();
    assert!(
        listed.contains(&s1) && listed.contains(&s2),
        "{}: {listed:?}",
        b.name
    );

    // Never backwards: an older save is refused and changes nothing; equal and newer pass.
    let err = store.save(&s1, &point(9, 99)).await.unwrap_err();
    assert!(
        matches!(err, Error::Regression { ref stream, stored, attempted } if *stream == s1 && stored == ClusterTime::new(10, 1) && attempted == ClusterTime::new(9, 99)),
        "{}: {err}",
        b.name
    );
    let err = store.save(&s1, &point(10, 0)).await.unwrap_err();
    assert!(matches!(err, Error::Regression { .. }), "{}: {err}", b.name);
    assert_eq!(store.load(&s1).await.unwrap().unwrap(), idle);
    store.save(&s1, &point(10, 1)).await.unwrap();
    store.save(&s1, &point(11, 0)).await.unwrap();

    // Concurrent saves from many tasks: the record stays whole and ends at the newest.
    let mut tasks = Vec::new();
    for task in 0..16u32 {
        let store = Arc::clone(store);
        let s = s1.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..8u32 {
                let t = 20 + ((task * 7 + i * 13) % 40);
                match store.save(&s, &point(t, task)).await {
                    Ok(()) | Err(Error::Regression { .. }) => {}
                    Err(e) => panic!("concurrent save failed: {e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let last = store.load(&s1).await.unwrap().unwrap();
    let newest = (0..16u32)
        .flat_map(|task| {
            (0..8u32).map(move |i| ClusterTime::new(20 + ((task * 7 + i * 13) % 40), task))
        })
        .max()
        .unwrap();
    assert_eq!(last.cluster_time, newest, "{}", b.name);
    assert_eq!(
        last,
        point(newest.time, newest.increment),
        "{}: token matches its cluster time",
        b.name
    );

    // Delete is the only way back.
    store.delete(&s1).await.unwrap();
    assert_eq!(store.load(&s1).await.unwrap(), None);
    store.save(&s1, &point(1, 0)).await.unwrap();
    store.delete(&s1).await.unwrap();
    store.delete(&s1).await.unwrap();
    store.delete(&s2).await.unwrap();

    // Bad stream ids are typed errors.
    assert!(matches!(
        store.load("").await,
        Err(Error::InvalidArgument { .. })
    ));

    // A corrupt record (its cluster time unreadable) is an error naming the stream and
    // where it lives.
    if let Some(corrupt) = &b.corrupt {
        let s3 = unique(&format!("{}-corrupt", b.name));
        corrupt(s3.clone()).await;
        let err = store.load(&s3).await.unwrap_err();
        assert!(
            matches!(err, Error::CorruptPoint { .. }),
            "{}: {err}",
            b.name
        );
        let text = err.to_string();
        assert!(text.contains(&s3), "{}: names the stream: {text}", b.name);
        // A save never replaces a record whose cluster time it cannot read.
        let err = store.save(&s3, &point(1, 0)).await.unwrap_err();
        assert!(
            matches!(err, Error::CorruptPoint { .. }),
            "{}: {err}",
            b.name
        );
        let _ = store.delete(&s3).await;
    }

    // A failing backend is an error, never "no point".
    if let Some((failing, kind)) = &b.failing {
        let err = failing.load("any").await.unwrap_err();
        assert_eq!(err.kind(), *kind, "{}: {err}", b.name);
        if *kind == ErrorKind::Persistent {
            assert!(
                matches!(err, Error::StoreUnusable { .. }),
                "{}: {err}",
                b.name
            );
        }
        assert!(failing.save("any", &point(1, 0)).await.is_err());
        assert!(failing.list_streams().await.is_err());
    }
}

#[tokio::test]
async fn memory_store() {
    suite(Backend {
        name: "memory",
        store: Arc::new(MemoryStore::new()),
        corrupt: None,
        failing: None,
    })
    .await;
}

#[tokio::test]
async fn file_store() {
    let root = std::env::temp_dir().join(unique("cdc-file-store"));
    let store = Arc::new(FileStore::new(root.join("points")).unwrap());
    let dir = store.dir().to_path_buf();
    let corrupt: Corrupter = Box::new(move |stream: String| {
        let path = dir.join(format!("{stream}.json"));
        Box::pin(async move { std::fs::write(path, b"{ torn").unwrap() })
    });
    // A store whose directory was replaced by a regular file: every call fails.
    let broken_dir = root.join("broken");
    let failing = FileStore::new(&broken_dir).unwrap();
    std::fs::remove_dir(&broken_dir).unwrap();
    std::fs::write(&broken_dir, b"not a directory").unwrap();
    suite(Backend {
        name: "file",
        store: store.clone(),
        corrupt: Some(corrupt),
        failing: Some((Arc::new(failing), ErrorKind::Persistent)),
    })
    .await;

    // Files are private to their owner.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        store.save("perm", &point(1, 0)).await.unwrap();
        let mode = std::fs::metadata(store.path_of("perm"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    hostile_state_files(&store).await;
    a_shared_state_directory_is_refused(&root);
    let _ = std::fs::remove_dir_all(&root);
}

/// A state directory every user may write to, owned by another user, is refused unless
/// allowed deliberately; one of our own is used.
fn a_shared_state_directory_is_refused(root: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let shared = root.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    // Ours, writable by all: used (with a warning).
    FileStore::new(&shared).unwrap();
    // Another user's: as root, give it to `nobody`; otherwise /tmp-like directories of
    // root's are another user's already.
    let foreign = if std::process::Command::new("chown")
        .args(["65534", shared.to_str().unwrap()])
        .status()
        .is_ok_and(|s| s.success())
    {
        shared.clone()
    } else {
        std::path::PathBuf::from("/tmp")
    };
    let err = FileStore::new(&foreign).unwrap_err();
    assert!(matches!(err, Error::StoreUnusable { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Persistent);
    let text = err.to_string();
    assert!(
        text.contains(&foreign.display().to_string()) && text.contains("owned by another user"),
        "{text}"
    );
    FileStore::new_in_shared_dir(&foreign).unwrap();
}

/// Whatever sits at a stream's point path, the store never reads "no point" unless
/// nothing is there: a link (dangling, or to another stream's file), a directory, a FIFO
/// are errors naming the path (and end a run instead of restarting it); a file copied from
/// another stream is refused as that stream's.
async fn hostile_state_files(store: &FileStore) {
    let dir = store.dir().to_path_buf();
    store.save("source", &point(5, 0)).await.unwrap();
    let source = store.path_of("source");
    type Make<'a> = Box<dyn Fn(&std::path::Path) + 'a>;
    let cases: Vec<(&str, Make<'_>, &str)> = vec![
        (
            "dangling link",
            Box::new(|p| std::os::unix::fs::symlink("/nonexistent/cdc-point", p).unwrap()),
            "a symbolic link",
        ),
        (
            "link to another stream's point",
            Box::new(|p| std::os::unix::fs::symlink(&source, p).unwrap()),
            "a symbolic link",
        ),
        (
            "directory",
            Box::new(|p| std::fs::create_dir(p).unwrap()),
            "a directory",
        ),
        (
            "fifo",
            Box::new(|p| {
                let status = std::process::Command::new("mkfifo")
                    .arg(p)
                    .status()
                    .unwrap();
                assert!(status.success());
            }),
            "a FIFO",
        ),
        (
            "copy of another stream's point",
            Box::new(|p| {
                std::fs::copy(&source, p).unwrap();
            }),
            "stream `source`",
        ),
    ];
    for (i, (case, make, says)) in cases.into_iter().enumerate() {
        let stream = format!("victim-{i}");
        let path = store.path_of(&stream);
        make(&path);
        let err = tokio::time::timeout(Duration::from_secs(5), store.load(&stream))
            .await
            .unwrap_or_else(|_| panic!("{case}: load hangs"))
            .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.kind(), ErrorKind::Fatal, "{case}: {text}");
        assert!(
            text.contains(&path.display().to_string()),
            "{case}: names the path: {text}"
        );
        assert!(text.contains(says), "{case}: {text}");
        // A save does not replace it either.
        let err = tokio::time::timeout(Duration::from_secs(5), store.save(&stream, &point(9, 0)))
            .await
            .unwrap_or_else(|_| panic!("{case}: save hangs"))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Fatal, "{case}: save: {err}");
        if path.is_dir() {
            std::fs::remove_dir(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
    assert!(dir.join("source.json").is_file());
    // A stream id too long for a file name is refused when named, never "File name too
    // long" at every restart.
    let long = "x".repeat(250);
    let err = store.load(&long).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    assert!(err.to_string().contains("255"), "{err}");
}

#[tokio::test]
async fn mongodb_store() {
    let deployment = mongo_sim::TestDeployment::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(deployment.uri())
        .await
        .unwrap();
    let db = unique("resume").replace('-', "_");
    let store = Arc::new(MongoStore::new(&client, &db, "points"));
    let raw = client.database(&db).collection::<bson::Document>("points");
    let corrupt: Corrupter = Box::new(move |stream: String| {
        let raw = raw.clone();
        Box::pin(async move {
            raw.insert_one(doc! { "_id": stream, "token": "not a document", "clusterTime": 5 })
                .await
                .unwrap();
        })
    });
    let dead = mongodb::Client::with_uri_str(
        "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300&connectTimeoutMS=300",
    )
    .await
    .unwrap();
    let failing = Arc::new(MongoStore::new(&dead, "x", "points"));
    suite(Backend {
        name: "mongodb",
        store,
        corrupt: Some(corrupt),
        failing: Some((failing, ErrorKind::Store)),
    })
    .await;
    let _ = client.database(&db).drop().await;
    deployment.shutdown().await;
}

#[tokio::test]
async fn mongodb_store_saves_inside_a_transaction() {
    let deployment = mongo_sim::TestDeployment::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(deployment.uri())
        .await
        .unwrap();
    let db = unique("resume_txn").replace('-', "_");
    let store = MongoStore::new(&client, &db, "points");
    let orders = client.database(&db).collection::<bson::Document>("orders");
    orders.insert_one(doc! { "_id": 0 }).await.unwrap();
    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    orders
        .insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    store
        .save_in_session(&mut session, "orders", &point(5, 0))
        .await
        .unwrap();
    session.abort_transaction().await.unwrap();
    assert_eq!(
        store.load("orders").await.unwrap(),
        None,
        "aborted with the user's write"
    );
    session.start_transaction().await.unwrap();
    orders
        .insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    store
        .save_in_session(&mut session, "orders", &point(5, 0))
        .await
        .unwrap();
    session.commit_transaction().await.unwrap();
    assert_eq!(store.load("orders").await.unwrap(), Some(point(5, 0)));
    assert_eq!(orders.count_documents(doc! {}).await.unwrap(), 2);
    let _ = client.database(&db).drop().await;
    deployment.shutdown().await;
}

#[tokio::test]
async fn redis_store() {
    let url = redis_url();
    let prefix = format!("{}:", unique("cdc-test"));
    let store = Arc::new(RedisStore::new(&url, prefix.clone()).unwrap());
    if let Err(e) = store.list_streams().await {
        return unreachable_backend("conformance", "redis", &e.to_string());
    }
    let client = redis::Client::open(url.as_str()).unwrap();
    let corrupt: Corrupter = Box::new(move |stream: String| {
        let client = client.clone();
        let key = format!("{prefix}{stream}");
        Box::pin(async move {
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let _: () = redis::cmd("HSET")
                .arg(&key)
                .arg("a")
                .arg("b")
                .query_async(&mut conn)
                .await
                .unwrap();
        })
    });
    let failing = Arc::new(RedisStore::new("redis://127.0.0.1:1", "x:").unwrap());
    suite(Backend {
        name: "redis",
        store: store.clone(),
        corrupt: Some(corrupt),
        failing: Some((failing, ErrorKind::Store)),
    })
    .await;

    // A string that is not our JSON is corrupt as well, and is not overwritten.
    let conn_client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = conn_client
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{}bad-json", store_prefix(&store));
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("{not json")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(matches!(
        store.load("bad-json").await,
        Err(Error::CorruptPoint { .. })
    ));
    assert!(matches!(
        store.save("bad-json", &point(1, 0)).await,
        Err(Error::CorruptPoint { .. })
    ));
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();

    // A record copied from another stream's key is refused as that stream's.
    store.save("copied-from", &point(4, 0)).await.unwrap();
    let prefix = store_prefix(&store);
    let _: () = redis::cmd("COPY")
        .arg(format!("{prefix}copied-from"))
        .arg(format!("{prefix}copied-to"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = store.load("copied-to").await.unwrap_err();
    assert!(matches!(err, Error::ForeignPoint { .. }), "{err}");
    assert!(err.to_string().contains("`copied-from`"), "{err}");
    for key in ["copied-from", "copied-to"] {
        store.delete(key).await.unwrap();
    }
}

fn store_prefix(store: &RedisStore) -> String {
    let shown = store.describe();
    let start = shown.find("prefix \"").unwrap() + 8;
    shown[start..shown.len() - 1].to_owned()
}

#[tokio::test]
async fn postgres_store() {
    let url = postgres_url();
    let table = unique("cdc_conf").replace('-', "_");
    let store = match PostgresStore::connect(&url, &table).await {
        Ok(s) => Arc::new(s),
        Err(e) => return unreachable_backend("conformance", "postgres", &e.to_string()),
    };
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let client = Arc::new(client);
    let c2 = Arc::clone(&client);
    let t2 = table.clone();
    let corrupt: Corrupter = Box::new(move |stream: String| {
        let client = Arc::clone(&c2);
        let sql = format!("INSERT INTO {t2} VALUES ($1, '\\x01'::bytea, -5, 0, NULL, 0)");
        Box::pin(async move {
            client.execute(&sql, &[&stream]).await.unwrap();
        })
    });
    let failing = match PostgresStore::connect(
        "postgres://postgres@127.0.0.1:1/test?connect_timeout=1",
        "x",
    )
    .await
    {
        Ok(_) => panic!("nothing listens on port 1"),
        Err(e) => {
            // Connecting for no stream in particular: the store is unavailable (retried).
            assert!(matches!(e, Error::Unavailable { .. }), "{e}");
            assert_eq!(e.kind(), ErrorKind::Transient);
            None
        }
    };
    suite(Backend {
        name: "postgres",
        store: store.clone(),
        corrupt: Some(corrupt),
        failing,
    })
    .await;

    // The caller's transaction carries the checkpoint: rollback discards it with the rows.
    let (mut tx_client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    tx_client
        .batch_execute(&format!("CREATE TABLE {table}_sink (id INT PRIMARY KEY)"))
        .await
        .unwrap();
    let tx = tx_client.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO {table}_sink VALUES (1)"), &[])
        .await
        .unwrap();
    store.save_in(&tx, "sink", &point(7, 0)).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(store.load("sink").await.unwrap(), None);
    let tx = tx_client.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO {table}_sink VALUES (1)"), &[])
        .await
        .unwrap();
    store.save_in(&tx, "sink", &point(7, 0)).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(store.load("sink").await.unwrap(), Some(point(7, 0)));

    client
        .batch_execute(&format!(
            "DROP TABLE {table}; DROP TABLE {table}_sink; DROP TABLE {table}_dead_letters"
        ))
        .await
        .unwrap();
    let _ = Duration::ZERO;
}

/// `sslmode=require` connects over TLS (rustls) and verifies the server's certificate:
/// the local server's self-signed certificate is trusted only through `sslrootcert`.
#[tokio::test]
async fn postgres_store_over_tls() {
    let cert = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    if !std::path::Path::new(cert).exists() {
        return unreachable_backend(
            "conformance",
            "postgres over TLS",
            &format!("no server certificate at {cert}"),
        );
    }
    let table = unique("cdc_tls").replace('-', "_");
    let app = unique("cdc-tls-test");
    let url = format!(
        "postgres://postgres@localhost:5432/test?sslmode=require&sslrootcert={cert}&application_name={app}"
    );
    let store = match PostgresStore::connect(&url, &table).await {
        Ok(s) => s,
        Err(e) => return unreachable_backend("conformance", "postgres over TLS", &e.to_string()),
    };
    store.save("tls", &point(3, 0)).await.unwrap();
    assert_eq!(store.load("tls").await.unwrap(), Some(point(3, 0)));
    // The server says the store's session is encrypted.
    let (client, conn) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE s.ssl AND a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        1,
        "the store's session is not over TLS"
    );
    // Without the root certificate the server's self-signed one is refused, and the
    // error says so.
    let err = PostgresStore::connect(
        "postgres://postgres@localhost:5432/test?sslmode=verify-full",
        &table,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    let err = PostgresStore::connect(
        "postgres://postgres@localhost:5432/test?sslmode=require&sslrootcert=/nonexistent.pem",
        &table,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent.pem"), "{err}");
    client
        .batch_execute(&format!(
            "DROP TABLE {table}; DROP TABLE {table}_dead_letters"
        ))
        .await
        .unwrap();
}
