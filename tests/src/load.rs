//! What the load generator (`cdc-soak writer`) leaves for the programs that drive it (the
//! soak, the lag benchmark): its summary, and how long to wait for a consumer behind it.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Where the writer logging to `log` leaves its summary.
pub fn summary_path(log: &Path) -> PathBuf {
    PathBuf::from(format!("{}.summary", log.display()))
}

/// The summary line: `writer: <n> writes in <s> s (<r>/s)`.
pub fn summary(writes: u64, seconds: f64) -> String {
    format!(
        "writer: {writes} writes in {seconds:.1} s ({:.0}/s)",
        writes as f64 / seconds.max(0.001)
    )
}

/// The rate (writes/s) a [`summary`] line states.
///
/// # Errors
/// The text, when it is not a summary line.
pub fn summary_rate(text: &str) -> Result<u64, String> {
    text.trim()
        .strip_prefix("writer: ")
        .and_then(|t| t.rsplit_once('('))
        .and_then(|(_, r)| r.strip_suffix("/s)"))
        .and_then(|r| r.parse().ok())
        .ok_or_else(|| format!("not a writer summary: {text:?}"))
}

/// The rate the writer logging to `log` reached, from the summary it left.
///
/// # Errors
/// The summary cannot be read or is not one.
pub fn reached_rate(log: &Path) -> Result<u64, String> {
    let path = summary_path(log);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    summary_rate(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Waiting for a consumer to catch up after the writer stopped: as long as what is
/// missing keeps shrinking (a consumer behind a fast writer may need minutes), but not
/// when it stalls for 30 s (what is still missing then is lost), nor past 20 minutes.
#[derive(Debug)]
pub struct CatchUp {
    best: usize,
    since: Instant,
    began: Instant,
}

impl Default for CatchUp {
    fn default() -> Self {
        Self::new()
    }
}

impl CatchUp {
    /// Starts waiting now.
    pub fn new() -> Self {
        Self {
            best: usize::MAX,
            since: Instant::now(),
            began: Instant::now(),
        }
    }

    /// Whether to stop waiting, with `missing` changes (or documents) not there yet.
    pub fn done(&mut self, missing: usize) -> bool {
        if missing == 0 {
            return true;
        }
        if missing < self.best {
            self.best = missing;
            self.since = Instant::now();
        }
        self.since.elapsed() > Duration::from_secs(30)
            || self.began.elapsed() > Duration::from_secs(20 * 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_states_its_rate() {
        let line = summary(100_350, 20.1);
        assert_eq!(line, "writer: 100350 writes in 20.1 s (4993/s)");
        assert_eq!(summary_rate(&format!("{line}\n")).unwrap(), 4993);
        assert!(summary_rate("writer: broken").is_err());
        assert!(summary_rate("reader: 1 writes in 1.0 s (1/s)").is_err());
        let mut wait = CatchUp::new();
        assert!(wait.done(0));
        assert!(!wait.done(5), "shrinking from nothing seen: wait on");
    }
}
