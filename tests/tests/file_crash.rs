//! The file store's crash safety: a child process saving as fast as it can is killed with
//! SIGKILL at random moments, many times; every time, the store holds a valid point, old
//! or new, never a torn one, and never an older one than before.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cdc_core::{ClusterTime, ResumeStore};
use cdc_resume::FileStore;

/// A small xorshift generator: the kill moments differ from run to run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test]
async fn killed_mid_save_leaves_the_old_or_the_new_point() {
    let dir = std::env::temp_dir().join(format!("cdc-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    let mut last = ClusterTime::new(0, 0);
    let kills = 40;
    // A store handle for watching progress; `FileStore::new` (which clears a crashed
    // save's leftover temporary file) runs only while no saver is alive, as at a restart.
    let mut store = FileStore::new(&dir).unwrap();
    for round in 0..kills {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cdc-crash-saver"))
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until this child has saved at least once past the last point, then kill it
        // a random 0–20 ms later: almost always in the middle of a save.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(p)) = store.load("crash").await
                && p.cluster_time > last
            {
                break;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "round {round}: the saver exited early"
            );
            assert!(
                Instant::now() < deadline,
                "round {round}: the saver made no progress"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros(rng.next() % 20_000));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        store = FileStore::new(&dir).unwrap();
        let point = store
            .load("crash")
            .await
            .unwrap_or_else(|e| panic!("round {round}: torn or unreadable point: {e}"))
            .expect("a point survives every kill");
        assert!(
            point.cluster_time >= last,
            "round {round}: the point moved backwards"
        );
        let data = point.token.data().unwrap();
        assert_eq!(
            &data[2..10],
            format!("{:08X}", point.cluster_time.time),
            "round {round}: token and time belong together"
        );
        last = point.cluster_time;
    }
    assert!(
        last.time as usize >= kills,
        "each round saved past the previous point"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
