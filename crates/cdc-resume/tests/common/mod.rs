//! Helpers shared by the store suites.
#![allow(dead_code)]

/// A name unique to this process and moment, for streams, prefixes and tables.
pub(crate) fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// A backend server that cannot be reached: a failure under `CI=true`, a skip (said so)
/// otherwise.
pub(crate) fn unreachable_backend(suite: &str, name: &str, why: &str) {
    assert!(
        !std::env::var("CI").is_ok_and(|v| v == "true"),
        "{name} is unreachable under CI=true: {why}"
    );
    eprintln!(
        "SKIPPED {name} {suite}: the server is unreachable ({why}); set CI=true to make this a failure"
    );
}

/// The Redis URL of the suites (`CDC_REDIS_URL`, default the local server).
pub(crate) fn redis_url() -> String {
    std::env::var("CDC_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The PostgreSQL URL of the suites (`CDC_POSTGRES_URL`, default the local server).
pub(crate) fn postgres_url() -> String {
    std::env::var("CDC_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}
