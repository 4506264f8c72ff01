//! When to respawn a worker that exited: exponential backoff plus a crash-loop guard.
//!
//! Pure decisions over the times the caller passes in (no clock reads, no I/O), so they are
//! unit-tested over simulated minutes with `tokio::time::pause()`.
//!
//! - Respawn delay: 100 ms, doubling per consecutive unhealthy exit, capped at 30 s.
//! - A worker that ran at least a minute before exiting resets the delay.
//! - [`CRASH_LOOP_EXITS`] exits within [`CRASH_WINDOW`] (configurable with `--crash-loop`) mark the
//!   slot failed: it rests for the length of the window instead of spinning, then starts over.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// First respawn delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest respawn delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker that ran this long resets its slot's backoff.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);
pub use crate::config::{CRASH_LOOP_EXITS, CRASH_WINDOW};
/// How long a failed slot rests before it is tried again (by default: the crash window).
pub const FAILED_COOLDOWN: Duration = CRASH_WINDOW;
/// The shortest cool-down, whatever the configured window.
pub const FAILED_COOLDOWN_MIN: Duration = Duration::from_secs(1);

/// What to do after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Start a new worker after this delay.
    Respawn(Duration),
    /// Crash loop: mark the slot failed and try again after this cool-down.
    Failed(Duration),
}

pub use crate::config::CrashLoop;

/// Per-slot restart state.
#[derive(Debug, Clone, Default)]
pub struct RestartPolicy {
    /// The crash-loop guard in force.
    crash_loop: CrashLoop,
    /// Consecutive unhealthy exits (the backoff exponent).
    attempt: u32,
    /// Recent exit times, oldest first (within [`CRASH_WINDOW`]).
    exits: VecDeque<Instant>,
}

impl RestartPolicy {
    /// Changes the crash-loop guard (a config reload); the exit history is kept.
    pub fn set_guard(&mut self, crash_loop: CrashLoop) {
        self.crash_loop = crash_loop;
    }

    /// A policy with the given crash-loop guard.
    pub fn new(crash_loop: CrashLoop) -> Self {
        Self {
            crash_loop,
            ..Self::default()
        }
    }

    /// Records an exit at `now` of a worker that ran for `ran`, and decides what comes next.
    pub fn on_exit(&mut self, now: Instant, ran: Duration) -> Next {
        if ran >= HEALTHY_RUN {
            self.attempt = 0;
        }
        self.exits.push_back(now);
        let CrashLoop { exits, window } = self.crash_loop;
        while self
            .exits
            .front()
            .is_some_and(|&t| now.duration_since(t) > window)
        {
            self.exits.pop_front();
        }
        if self.exits.len() >= exits {
            self.exits.clear();
            self.attempt = 0;
            return Next::Failed(window.max(FAILED_COOLDOWN_MIN));
        }
        let delay = BACKOFF_MIN
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        Next::Respawn(delay)
    }

    /// Exits counted in the current window.
    pub fn recent_exits(&self) -> usize {
        self.exits.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::{self, advance};

    fn now() -> Instant {
        time::Instant::now().into_std()
    }

    #[tokio::test(start_paused = true)]
    async fn immediate_exits_back_off_then_the_slot_is_marked_failed() {
        let mut p = RestartPolicy::default();
        let mut delays = Vec::new();
        let failed = loop {
            match p.on_exit(now(), Duration::ZERO) {
                Next::Respawn(d) => {
                    delays.push(d.as_millis());
                    advance(d).await; // the respawned worker dies at once
                }
                Next::Failed(cooldown) => break cooldown,
            }
        };
        // 9 respawns (100 ms … 25.6 s, 51.1 s in all) then the 10th exit within a minute.
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600]);
        assert_eq!(failed, FAILED_COOLDOWN);
        // After the cool-down it starts over from the shortest delay.
        advance(failed).await;
        assert_eq!(p.on_exit(now(), Duration::ZERO), Next::Respawn(BACKOFF_MIN));
    }

    #[tokio::test(start_paused = true)]
    async fn delay_is_capped_at_30s_when_exits_are_spread_out() {
        let mut p = RestartPolicy::default();
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            // Each worker runs 20 s: too short to be healthy, too slow to be a crash loop.
            advance(Duration::from_secs(20)).await;
            match p.on_exit(now(), Duration::from_secs(20)) {
                Next::Respawn(d) => {
                    assert!(d >= last && d <= BACKOFF_MAX);
                    last = d;
                    advance(d).await;
                }
                Next::Failed(_) => panic!("not a crash loop: at most 3 exits per minute"),
            }
        }
        assert_eq!(last, BACKOFF_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn a_configured_guard_trips_sooner() {
        let mut p = RestartPolicy::new(CrashLoop {
            exits: 3,
            window: Duration::from_secs(10),
        });
        assert!(matches!(p.on_exit(now(), Duration::ZERO), Next::Respawn(_)));
        advance(Duration::from_millis(100)).await;
        assert!(matches!(p.on_exit(now(), Duration::ZERO), Next::Respawn(_)));
        advance(Duration::from_millis(200)).await;
        assert_eq!(
            p.on_exit(now(), Duration::ZERO),
            Next::Failed(Duration::from_secs(10))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_minute_resets_the_backoff() {
        let mut p = RestartPolicy::default();
        for _ in 0..4 {
            let Next::Respawn(d) = p.on_exit(now(), Duration::ZERO) else {
                panic!()
            };
            advance(d).await;
        }
        advance(HEALTHY_RUN).await;
        assert_eq!(p.on_exit(now(), HEALTHY_RUN), Next::Respawn(BACKOFF_MIN));
        assert!(p.recent_exits() <= 2);
    }
}
