//! [`open`]: a store (resume points and dead letters) chosen at run time by a URL.

use std::sync::Arc;

use cdc_core::{DeadLetterStore, Error, LeaseStore, Result, ResumeStore};
use cdc_resume as stores;

/// A store opened by [`open`]: one backend serving the three traits.
#[derive(Clone)]
pub struct Stores {
    /// Where resume points live.
    pub points: Arc<dyn ResumeStore>,
    /// Where dead letters live (the same backend).
    pub dead_letters: Arc<dyn DeadLetterStore>,
    /// Where leases live (the same backend): see `Storage::leased_stores`.
    pub leases: Arc<dyn LeaseStore>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("points", &self.points.describe())
            .field("dead_letters", &self.dead_letters.describe())
            .finish()
    }
}

fn both<S: ResumeStore + DeadLetterStore + LeaseStore + 'static>(store: S) -> Stores {
    Stores::one(Arc::new(store))
}

impl Stores {
    /// One backend serving points, dead letters and leases.
    pub fn one<S: ResumeStore + DeadLetterStore + LeaseStore + 'static>(store: Arc<S>) -> Self {
        Self {
            points: store.clone(),
            dead_letters: store.clone(),
            leases: store,
        }
    }
}

fn bad(reason: impl Into<String>) -> Error {
    Error::InvalidArgument {
        name: "store URL",
        reason: reason.into(),
    }
}

/// The error for a backend this build leaves out.
#[cfg_attr(
    all(
        feature = "file",
        feature = "redis",
        feature = "postgres",
        feature = "mongodb"
    ),
    allow(dead_code)
)]
fn not_built(scheme: &str, feature: &str) -> Error {
    bad(format!(
        "`{scheme}` stores are not built in: enable the `{feature}` feature of cdc-processor (or of cdc-resume)"
    ))
}

/// Opens the store a URL names, for resume points and dead letters alike:
///
/// | URL | store |
/// | --- | --- |
/// | `memory:` | `MemoryStore` |
/// | `file:<dir>` or `file://<dir>` | `FileStore` in `<dir>` (feature `file`) |
/// | `redis://…` or `rediss://…`, optional `prefix=` (default `cdc:`) | `RedisStore` (feature `redis`) |
/// | `postgres://…` or `postgresql://…`, optional `table=` (default `cdc_resume_points`), `sslmode`, `sslrootcert` | `PostgresStore` (feature `postgres`) |
/// | `mongodb://…` or `mongodb+srv://…`: the path's database (default `cdc`), optional `collection=` (default `resume_points`) | `MongoStore` (feature `mongodb`) |
///
/// The parameters named here are taken out before the rest of the URL goes to the
/// backend's own client, which parses it. Network stores connect lazily or at once as
/// their constructors do (PostgreSQL connects and creates its tables here).
///
/// # Errors
/// `Error::Cdc(CoreError::InvalidArgument)` naming the problem (an unknown scheme, a
/// backend whose feature is off, a malformed URL: credentials never shown); the
/// backend's error when it cannot be reached at once.
pub async fn open(url: &str) -> crate::Result<Stores> {
    Ok(open_url(url).await?)
}

async fn open_url(url: &str) -> Result<Stores> {
    let scheme = url.split_once(':').map_or("", |(s, _)| s);
    match scheme {
        "memory" => Ok(both(stores::MemoryStore::new())),
        "file" => {
            #[cfg(feature = "file")]
            {
                let rest = &url["file:".len()..];
                let dir = rest.strip_prefix("//").unwrap_or(rest);
                if dir.is_empty() {
                    return Err(bad(
                        "`file:` needs a directory, as in `file:./resume-points`",
                    ));
                }
                Ok(both(stores::FileStore::new(dir)?))
            }
            #[cfg(not(feature = "file"))]
            Err(not_built("file", "file"))
        }
        "redis" | "rediss" => {
            #[cfg(feature = "redis")]
            {
                let (url, prefix) = take_param(url, "prefix")?;
                let prefix = prefix.unwrap_or_else(|| "cdc:".to_owned());
                Ok(both(stores::RedisStore::new(&url, prefix)?))
            }
            #[cfg(not(feature = "redis"))]
            Err(not_built(scheme, "redis"))
        }
        "postgres" | "postgresql" => {
            #[cfg(feature = "postgres")]
            {
                let (url, table) = take_param(url, "table")?;
                let table =
                    table.unwrap_or_else(|| stores::PostgresStore::DEFAULT_TABLE.to_owned());
                Ok(both(stores::PostgresStore::connect(&url, &table).await?))
            }
            #[cfg(not(feature = "postgres"))]
            Err(not_built(scheme, "postgres"))
        }
        "mongodb" | "mongodb+srv" => {
            #[cfg(feature = "mongodb")]
            {
                let (url, coll) = take_param(url, "collection")?;
                let coll = coll.unwrap_or_else(|| "resume_points".to_owned());
                let db = cdc_mongo::mongodb::options::ConnectionString::parse(url.replacen(
                    "mongodb+srv://",
                    "mongodb://",
                    1,
                ))
                .ok()
                .and_then(|c| c.default_database)
                .unwrap_or_else(|| "cdc".to_owned());
                // Unreachable is the store's failure (retried), not a bad URL; a URL the
                // driver refuses stays an invalid argument.
                let client = cdc_mongo::connect(&url, std::time::Duration::from_secs(10))
                    .await
                    .map_err(|e| match e.kind() {
                        cdc_core::ErrorKind::Fatal => bad(format!("MongoDB store: {e}")),
                        _ => Error::unavailable("the MongoDB store", e),
                    })?;
                Ok(both(stores::MongoStore::new(&client, &db, &coll)))
            }
            #[cfg(not(feature = "mongodb"))]
            Err(not_built(scheme, "mongodb"))
        }
        _ => Err(bad(format!(
            "unknown scheme {:?}: use memory:, file:, redis://, postgres:// or mongodb://",
            scheme
        ))),
    }
}

#[cfg_attr(
    not(any(feature = "redis", feature = "postgres", feature = "mongodb")),
    allow(dead_code)
)]
/// Takes the query parameter `name` out of a URL: the URL without it, and its value
/// (percent-decoded, a `+` kept as written, as libpq and the MongoDB driver read it).
///
/// The query is split here rather than by `url::Url`: `url` refuses the multi-host
/// authorities these URLs may have (`mongodb://a:1,b:2/`, `postgres://a:1,b:2/`), and
/// re-serializing through it would rewrite the other parameters the backend's client
/// reads. For every URL `url` parses, this reading agrees with `url`'s (a property test).
///
/// # Errors
/// [`Error::InvalidArgument`] when the value holds a malformed escape or its bytes are not
/// UTF-8.
pub(crate) fn take_param(url: &str, name: &str) -> Result<(String, Option<String>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None));
    };
    let (fragment_free, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let mut value = None;
    let mut kept = Vec::new();
    for pair in fragment_free.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((key, v)) if key == name => {
                value = Some(cdc_core::support::percent_decode(v).ok_or_else(|| {
                    bad(format!(
                        "the `{name}` parameter is not valid percent-encoded UTF-8"
                    ))
                })?);
            }
            _ => kept.push(pair),
        }
    }
    let mut out = base.to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    Ok((out, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run by `cargo xtask ci` without default features too, so each left-out backend is
    /// checked to be named with its feature.
    #[tokio::test]
    async fn a_backend_left_out_is_named_with_its_feature() {
        let cases = [
            ("file:/tmp/x", "file", cfg!(feature = "file")),
            ("redis://127.0.0.1:1", "redis", cfg!(feature = "redis")),
            (
                "postgres://u@127.0.0.1:1/db",
                "postgres",
                cfg!(feature = "postgres"),
            ),
            (
                "mongodb://127.0.0.1:1/",
                "mongodb",
                cfg!(feature = "mongodb"),
            ),
        ];
        for (url, feature, built) in cases {
            if built {
                continue;
            }
            let err = open(url).await.unwrap_err().to_string();
            assert!(
                err.contains(&format!("the `{feature}` feature of cdc-processor")),
                "{err}"
            );
        }
        assert!(open("memory:").await.is_ok());
    }

    #[test]
    fn parameters_are_taken_out() {
        let (url, v) = take_param("redis://h:1/0?prefix=a%3Ab&x=1", "prefix").unwrap();
        assert_eq!(
            (url.as_str(), v.as_deref()),
            ("redis://h:1/0?x=1", Some("a:b"))
        );
        let (url, v) = take_param("postgres://h/db?table=t", "table").unwrap();
        assert_eq!((url.as_str(), v.as_deref()), ("postgres://h/db", Some("t")));
        let (url, v) = take_param("postgres://h/db", "table").unwrap();
        assert_eq!((url.as_str(), v), ("postgres://h/db", None));
        assert!(take_param("x://h?table=%FF", "table").is_err());
        assert!(take_param("x://h?table=a%Z", "table").is_err());
        // Seed lists, which `url` refuses; a `+` is kept.
        let (url, v) = take_param(
            "mongodb://a:1,b:2/db?collection=c+d%2F&replicaSet=rs",
            "collection",
        )
        .unwrap();
        assert_eq!(
            (url.as_str(), v.as_deref()),
            ("mongodb://a:1,b:2/db?replicaSet=rs", Some("c+d/"))
        );
    }

    proptest::proptest! {
        /// Where `url` parses the URL, the value taken is the one `url` reads and the URL
        /// left holds every other parameter as `url` reads them (values here are written
        /// percent-encoded, as a `+` means a space to `url` and itself to the backends).
        #[test]
        fn take_param_reads_as_url_does(
            scheme in proptest::sample::select(vec!["postgres", "redis", "mongodb"]),
            path in "(/[a-z0-9]{0,6}){0,2}",
            pairs in proptest::collection::vec(("[a-zA-Z_]{1,6}", "\\PC{0,8}"), 0..5),
            value in proptest::option::of("\\PC{0,12}"),
            fragment in proptest::option::of("[a-z]{0,4}"),
        ) {
            let enc = |s: &str| percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string();
            let mut query: Vec<String> = pairs.iter().filter(|(k, _)| k != "table").map(|(k, v)| format!("{k}={}", enc(v))).collect();
            if let Some(v) = &value {
                query.insert(query.len() / 2, format!("table={}", enc(v)));
            }
            let mut text = format!("{scheme}://u@h.example:5{path}");
            if !query.is_empty() {
                text = format!("{text}?{}", query.join("&"));
            }
            if let Some(f) = &fragment {
                text = format!("{text}#{f}");
            }
            let parsed = url::Url::parse(&text).unwrap();
            let (rest, taken) = take_param(&text, "table").unwrap();
            let want: Option<String> = parsed.query_pairs().find(|(k, _)| k == "table").map(|(_, v)| v.into_owned());
            proptest::prop_assert_eq!(&taken, &want, "{}", text);
            let left = url::Url::parse(&rest).unwrap();
            let others: Vec<(String, String)> = parsed.query_pairs().filter(|(k, _)| k != "table").map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
            let kept: Vec<(String, String)> = left.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
            proptest::prop_assert_eq!(kept, others, "{} -> {}", text, rest);
            proptest::prop_assert_eq!(left.fragment(), parsed.fragment());
            proptest::prop_assert_eq!(left.path(), parsed.path());
        }
    }
}
