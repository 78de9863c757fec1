//! `cdc run`'s watch on the oplog: every `oplog.check_every_ms` it reads the oplog's
//! window and the stored point's headroom in it ([`DocumentProcessor::oplog_headroom`]),
//! keeps them for the gauges and `/readyz`, and warns in the log when the headroom falls
//! below `oplog.warn_below_percent` of the window: before the point falls off the oplog,
//! when a restart would fail with the history lost.

use std::{
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use cdc_processor::{DocumentProcessor, OplogView};

use crate::config;

/// The newest reading, for the gauges and `/readyz`.
#[derive(Debug, Default)]
pub(crate) struct OplogState {
    latest: Mutex<Option<Reading>>,
}

/// One reading of the oplog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reading {
    pub(crate) window_s: u32,
    /// `None` while no point is stored.
    pub(crate) headroom_s: Option<i64>,
}

impl OplogState {
    pub(crate) fn latest(&self) -> Option<Reading> {
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, reading: Option<Reading>) {
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner) = reading;
    }
}

/// How long one reading may take before it is given up until the next.
const READ_DEADLINE: Duration = Duration::from_secs(15);

/// While the headroom stays low, the warning is said again this often.
const WARN_AGAIN: Duration = Duration::from_secs(300);

/// How the stored point stands, and when that was last said.
#[derive(Debug, Default)]
struct Warned {
    /// `None`: fine (or nothing said yet).
    level: Option<Said>,
    said_at: Option<Instant>,
    said_unreadable: bool,
}

/// Reads the oplog every `cfg.check_every_ms` until the process ends (not at all for 0).
pub(crate) async fn watch(
    processor: DocumentProcessor,
    cfg: config::Oplog,
    state: std::sync::Arc<OplogState>,
) {
    if cfg.check_every_ms == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.check_every_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = Warned::default();
    loop {
        tick.tick().await;
        let headroom = match tokio::time::timeout(READ_DEADLINE, processor.oplog_headroom()).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "reading the oplog window failed; asking again later");
                continue;
            }
            Err(_) => {
                tracing::debug!("reading the oplog window took over 15 s; asking again later");
                continue;
            }
        };
        let window = match &headroom.view {
            OplogView::Window(w) => *w,
            OplogView::Unreadable(why) => {
                if !warned.said_unreadable {
                    tracing::warn!(
                        reason = %why,
                        "the oplog cannot be read: cdc_oplog_window_seconds and cdc_oplog_headroom_seconds are left out"
                    );
                    warned.said_unreadable = true;
                }
                state.set(None);
                continue;
            }
            _ => {
                state.set(None);
                continue;
            }
        };
        let reading = Reading {
            window_s: window.window_seconds(),
            headroom_s: headroom.headroom_seconds(),
        };
        state.set(Some(reading));
        judge(&mut warned, reading, cfg.warn_below_percent, Instant::now());
    }
}

/// Says what a reading means for the stored point: a warning when the headroom went
/// below `warn_below_percent` of the window, an error when the point fell off (each when
/// it gets there, and again every [`WARN_AGAIN`] while it stays), a note when it recovered.
fn judge(warned: &mut Warned, reading: Reading, warn_below_percent: u64, now: Instant) -> Said {
    let Some(headroom) = reading.headroom_s else {
        return Said::Nothing;
    };
    // A window of no length (a fresh deployment) tells nothing yet.
    if reading.window_s == 0 {
        return Said::Nothing;
    }
    let percent = headroom.saturating_mul(100) / i64::from(reading.window_s);
    let level = if headroom < 0 {
        Said::FallenOff
    } else if percent < i64::try_from(warn_below_percent).unwrap_or(i64::MAX) {
        Said::Low
    } else {
        if warned.level.take().is_some() {
            warned.said_at = None;
            tracing::info!(
                headroom_seconds = headroom,
                window_seconds = reading.window_s,
                "the stored point's oplog headroom is back above {warn_below_percent}% of the window"
            );
            return Said::Recovered;
        }
        return Said::Nothing;
    };
    let again = warned
        .said_at
        .is_none_or(|at| now.duration_since(at) >= WARN_AGAIN);
    if warned.level.as_ref() == Some(&level) && !again {
        return Said::Nothing;
    }
    warned.level = Some(level);
    warned.said_at = Some(now);
    if headroom < 0 {
        tracing::error!(
            headroom_seconds = headroom,
            window_seconds = reading.window_s,
            "the stored point has fallen off the oplog: a restart fails with the history lost (ChangeStreamHistoryLost), or reads the collection again under `snapshot.mode = \"when_needed\"`; checkpoint more often, keep up, or grow the oplog"
        );
        return Said::FallenOff;
    }
    tracing::warn!(
        headroom_seconds = headroom,
        window_seconds = reading.window_s,
        percent,
        "the stored point is close to falling off the oplog: {headroom} s of headroom, {percent}% of the {} s window (below {warn_below_percent}%); checkpoint more often, keep up, or grow the oplog",
        reading.window_s
    );
    Said::Low
}

/// What [`judge`] said.
#[derive(Debug, PartialEq, Eq)]
enum Said {
    Nothing,
    Low,
    FallenOff,
    Recovered,
}

/// Why `/readyz` should say no, if the headroom is below `floor_s` (0: never).
pub(crate) fn below_floor(state: &OplogState, floor_s: u64) -> Option<String> {
    if floor_s == 0 {
        return None;
    }
    let headroom = state.latest()?.headroom_s?;
    let floor = i64::try_from(floor_s).unwrap_or(i64::MAX);
    (headroom < floor).then(|| {
        format!(
            "the stored point's oplog headroom is {headroom} s, below `oplog.ready_floor_s` ({floor_s} s)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(window_s: u32, headroom_s: i64) -> Reading {
        Reading {
            window_s,
            headroom_s: Some(headroom_s),
        }
    }

    #[test]
    fn the_warning_comes_once_on_the_way_down_and_again_while_it_stays_low() {
        let mut w = Warned::default();
        let t0 = Instant::now();
        assert_eq!(judge(&mut w, r(100, 60), 25, t0), Said::Nothing);
        assert_eq!(
            judge(&mut w, r(100, 25), 25, t0),
            Said::Nothing,
            "25% is not below 25%"
        );
        assert_eq!(judge(&mut w, r(100, 24), 25, t0), Said::Low);
        let soon = t0 + Duration::from_secs(10);
        assert_eq!(
            judge(&mut w, r(100, 10), 25, soon),
            Said::Nothing,
            "said already"
        );
        let later = t0 + WARN_AGAIN;
        assert_eq!(judge(&mut w, r(100, 5), 25, later), Said::Low, "said again");
        assert_eq!(judge(&mut w, r(100, 50), 25, later), Said::Recovered);
        assert_eq!(
            judge(&mut w, r(100, 10), 25, later),
            Said::Low,
            "down again"
        );
    }

    #[test]
    fn a_point_off_the_oplog_is_an_error_and_unknowns_say_nothing() {
        let mut w = Warned::default();
        let t0 = Instant::now();
        assert_eq!(judge(&mut w, r(100, 10), 25, t0), Said::Low);
        assert_eq!(
            judge(&mut w, r(100, -3), 25, t0),
            Said::FallenOff,
            "said at once, though the warning was just said"
        );
        assert_eq!(judge(&mut w, r(100, -4), 25, t0), Said::Nothing);
        assert_eq!(
            judge(&mut w, r(100, -5), 25, t0 + WARN_AGAIN),
            Said::FallenOff
        );
        let mut fresh = Warned::default();
        assert_eq!(judge(&mut fresh, r(0, 0), 25, t0), Said::Nothing);
        let no_point = Reading {
            window_s: 100,
            headroom_s: None,
        };
        assert_eq!(judge(&mut fresh, no_point, 25, t0), Said::Nothing);
        assert_eq!(
            judge(&mut fresh, r(100, 1), 0, t0),
            Said::Nothing,
            "0% never warns"
        );
    }

    #[test]
    fn readiness_fails_below_the_floor_only() {
        let state = OplogState::default();
        assert_eq!(below_floor(&state, 60), None, "nothing read yet");
        state.set(Some(r(3600, 59)));
        assert!(below_floor(&state, 60).unwrap().contains("59 s, below"));
        assert_eq!(below_floor(&state, 0), None, "no floor set");
        state.set(Some(r(3600, 60)));
        assert_eq!(below_floor(&state, 60), None);
    }
}
