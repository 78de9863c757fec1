//! `cdc-crash-saver DIR`: saves ever newer resume points into a file store in DIR as fast
//! as it can, until killed. The file store's crash test kills it mid-save, many times.

use cdc_core::{ClusterTime, OperationType, ResumePoint, ResumeStore, ResumeToken};
use cdc_resume::FileStore;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: cdc-crash-saver DIR");
        return std::process::ExitCode::from(2);
    };
    let store = match FileStore::new(dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cdc-crash-saver: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let start = match store.load("crash").await {
        Ok(p) => p.map_or(1, |p| p.cluster_time.time + 1),
        Err(e) => {
            eprintln!("cdc-crash-saver: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    for t in start.. {
        let data = format!("82{t:08X}{}", "AB".repeat(40));
        let token =
            match ResumeToken::from_document(&bson::doc! { "_data": data, "n": i64::from(t) }) {
                Ok(token) => token,
                Err(e) => {
                    eprintln!("cdc-crash-saver: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
        let point = ResumePoint::for_event(
            token,
            ClusterTime::new(t, 1),
            OperationType::Insert,
            bson::DateTime::now(),
        );
        if let Err(e) = store.save("crash", &point).await {
            eprintln!("cdc-crash-saver: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    std::process::ExitCode::SUCCESS
}
