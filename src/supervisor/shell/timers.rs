//! The shell's own periodic timers in one table (quinn-proto's `timer.rs`): one slot per kind,
//! the loop sleeps until the earliest ([`Timers::next`]) and handles every expired kind with the
//! same `now`. (The fleet's, the router's, the acceptor's and the reload's deadlines are theirs;
//! the loop takes the minimum of all of them.)

use std::time::Instant;

/// What a timer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    /// Memory sampling, socket-count queries, reaping, the silence check (every second).
    Housekeeping,
    /// The next `--heartbeat-ping`.
    Ping,
    /// The next `WATCHDOG=1` to systemd.
    Watchdog,
    /// Kernel steering's next stall check.
    SteerCheck,
}

const KINDS: usize = 4;

/// When each timer fires next (`None`: at the first look).
#[derive(Debug, Default)]
pub(super) struct Timers([Option<Instant>; KINDS]);

impl Timers {
    /// `t` fires at `at`.
    pub(super) fn set(&mut self, t: Timer, at: Instant) {
        self.0[t as usize] = Some(at);
    }

    /// Whether `t` is due at `now` (a timer never set is due at once).
    pub(super) fn due(&self, t: Timer, now: Instant) -> bool {
        self.0[t as usize].is_none_or(|at| at <= now)
    }

    /// The earliest timer set.
    pub(super) fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_earliest_timer_is_next_and_unset_ones_are_due() {
        let t = Instant::now();
        let mut timers = Timers::default();
        assert!(timers.due(Timer::Ping, t));
        assert_eq!(timers.next(), None);
        timers.set(Timer::Housekeeping, t + Duration::from_secs(1));
        timers.set(Timer::Watchdog, t + Duration::from_millis(300));
        assert_eq!(timers.next(), Some(t + Duration::from_millis(300)));
        assert!(!timers.due(Timer::Housekeeping, t));
        assert!(timers.due(Timer::Housekeeping, t + Duration::from_secs(1)));
    }
}
