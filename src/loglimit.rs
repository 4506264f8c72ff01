//! Rate-limited warnings: a fault that can repeat thousands of times a second (a full queue, a
//! refused PROXY header, an exhausted fd table) is logged at most once per [`LOG_EVERY`], and the
//! line says how many events it stands for.

use std::time::{Duration, Instant};

/// How often a repeated warning may be logged.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// At most one log line per [`LOG_EVERY`], carrying how many events it stands for.
#[derive(Debug, Default)]
pub struct LogLimit {
    /// When the last line was logged.
    last: Option<Instant>,
    /// Events since that line.
    pending: u64,
}

impl LogLimit {
    /// One more event: `Some(count since the last line)` if a line may be logged now.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.add(now, 1)
    }

    /// `n` more events.
    pub fn add(&mut self, now: Instant, n: u64) -> Option<u64> {
        self.pending += n;
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_counting_what_it_stands_for() {
        let mut l = LogLimit::default();
        let t = Instant::now();
        assert_eq!(l.hit(t), Some(1));
        assert_eq!(l.hit(t + Duration::from_secs(1)), None);
        assert_eq!(l.add(t + Duration::from_secs(2), 5), None);
        assert_eq!(l.hit(t + LOG_EVERY), Some(7));
        assert_eq!(l.hit(t + LOG_EVERY), None);
    }
}
