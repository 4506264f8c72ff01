//! The in-place upgrade's sequencing (SIGHUP, `lb reload`; DESIGN §10) as one pure value: no
//! sockets, no processes, no clock — the shell passes `now` and the facts it sees (the fleet is
//! steady, nothing is in flight, a preflight is running) and carries out the [`Step`]s it gets
//! back (sozu's upgrade progress, quinn-proto's `handle_timeout`/`poll` shape).
//!
//! ```text
//!            steady            preflight ok          steady, retry due
//! WaitSteady ──────▶ Preflight ────────────▶ Checked ─────────────────▶ Settling ──quiet──▶ Exec
//!     ▲                 │ failed: Failed       ▲                           │
//!     │                 │                      └── deadline or unsteady ───┘ (tries < 4; else Failed)
//!     └─ config text changed again (a second SIGHUP): checked again ─────────┘
//! ```
//!
//! Settling stops accepting (new connections wait in the backlog) until every handoff in flight
//! is answered; a settle that cannot finish within [`SETTLE_LIMIT`] gives way (lb accepts again)
//! and is tried again [`SETTLE_RETRY`] later, [`SETTLE_TRIES`] times in all.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long lb waits, before re-executing, for handoffs in flight to be answered.
pub const SETTLE_LIMIT: Duration = Duration::from_millis(500);
/// Settles an upgrade tries (accepting again for [`SETTLE_RETRY`] between two) before it fails.
pub const SETTLE_TRIES: u32 = 4;
/// The pause between two settles.
pub const SETTLE_RETRY: Duration = Duration::from_secs(1);
/// How often a settling lb looks whether it may re-execute.
pub const SETTLE_POLL: Duration = Duration::from_millis(1);

/// Where a reload is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a steady fleet (no roll, scale or start in progress) to run the preflight.
    WaitSteady {
        /// "The reload waits" was logged.
        logged: bool,
    },
    /// The preflight (`lb check --takeover` of the binary at the start path, with the config
    /// text) runs.
    Preflight {
        /// The config text changed meanwhile: this verdict is for an older one.
        stale: bool,
    },
    /// The preflight passed; a settle starts once the fleet is steady (and `retry_at` passed).
    Checked {
        /// After a settle that gave way: not before then.
        retry_at: Option<Instant>,
    },
    /// Accepting is paused until what is in flight is answered, or `until`.
    Settling {
        /// When this settle gives way.
        until: Instant,
    },
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Log that the reload waits for a steady fleet.
    Waiting,
    /// Start the preflight with [`Reload::text`].
    Preflight,
    /// Stop accepting (and pause the admin endpoint): settling.
    Pause,
    /// Accept again.
    Resume,
    /// Everything is settled: re-execute now (if it turns out something was in flight after
    /// all, stay settling: [`Reload::poll`] is asked again).
    Exec,
    /// A settle gave way; it is tried again after [`SETTLE_RETRY`].
    Retry,
    /// The reload is over without an exec: log this one line, count it, answer the callers,
    /// carry on as before. (Preceded by [`Step::Resume`] if lb was settling.)
    Failed(String),
}

/// What the shell sees, each time it asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// No rolling restart, scale or start is in progress.
    pub steady: bool,
    /// No handoff in flight, nothing waiting in lb or for its first bytes, no admin request open.
    pub quiet: bool,
    /// A preflight process (maybe an older reload's) still runs.
    pub preflight_busy: bool,
}

/// A reload asked for and not yet over.
#[derive(Debug, Clone)]
pub struct Reload {
    /// What asked for it (`SIGHUP`, `lb reload`), for the log.
    pub why: &'static str,
    /// The config file's text it runs with (read once, when asked for).
    pub text: Option<String>,
    /// Where it is.
    pub phase: Phase,
    /// Settles started so far.
    pub tries: u32,
    /// Steps owed before the phase gives the next one (a `Resume` before a `Failed`).
    owed: VecDeque<Step>,
}

impl Reload {
    /// A reload asked for by `why`, to run with the config text `text`.
    pub fn new(why: &'static str, text: Option<String>) -> Self {
        Self {
            why,
            text,
            phase: Phase::WaitSteady { logged: false },
            tries: 0,
            owed: VecDeque::new(),
        }
    }

    /// Asked for again (a second SIGHUP, another `lb reload`) with the file's text now: `true`
    /// if it changed, in which case it is checked again before lb re-executes (a settle in
    /// progress gives way first).
    pub fn again(&mut self, text: Option<String>) -> bool {
        if text == self.text {
            return false;
        }
        self.text = text;
        match self.phase {
            Phase::WaitSteady { .. } => {}
            Phase::Preflight { .. } => self.phase = Phase::Preflight { stale: true },
            Phase::Checked { .. } | Phase::Settling { .. } => {
                if matches!(self.phase, Phase::Settling { .. }) {
                    self.owed.push_back(Step::Resume);
                }
                self.phase = Phase::WaitSteady { logged: true };
                self.tries = 0;
            }
        }
        true
    }

    /// The preflight ended: `Ok` or the one line of why not. Returns the verdict for the
    /// callers of `lb reload` when it is on the text they asked for (`None`: an older text's,
    /// or an older reload's; it is checked again).
    pub fn preflight_done(&mut self, result: Result<(), String>) -> Option<Result<(), String>> {
        let Phase::Preflight { stale } = self.phase else {
            return None;
        };
        if stale {
            self.phase = Phase::WaitSteady { logged: true };
            return None;
        }
        match &result {
            Ok(()) => self.phase = Phase::Checked { retry_at: None },
            Err(e) => self.owed.push_back(Step::Failed(e.clone())),
        }
        Some(result)
    }

    /// The exec failed (`e`): lb carries on as it was, accepting again.
    pub fn exec_failed(&mut self, e: String) {
        self.owed.push_back(Step::Resume);
        self.owed.push_back(Step::Failed(e));
        self.phase = Phase::Checked { retry_at: None };
    }

    /// lb began shutting down: the reload is over (after accepting again, if it was settling).
    pub fn abandon(&mut self) {
        self.owed.clear();
        if matches!(self.phase, Phase::Settling { .. }) {
            self.owed.push_back(Step::Resume);
        }
        self.owed
            .push_back(Step::Failed("lb is shutting down".into()));
        self.phase = Phase::Checked { retry_at: None };
    }

    /// The next step at `now`, given `facts`; `None` when there is nothing to do until an event
    /// or [`Reload::poll_timeout`]. After [`Step::Failed`] the reload is over.
    pub fn poll(&mut self, now: Instant, facts: Facts) -> Option<Step> {
        if let Some(step) = self.owed.pop_front() {
            return Some(step);
        }
        match self.phase {
            Phase::WaitSteady { logged } => {
                if facts.steady && !facts.preflight_busy {
                    self.phase = Phase::Preflight { stale: false };
                    Some(Step::Preflight)
                } else if !facts.steady && !logged {
                    self.phase = Phase::WaitSteady { logged: true };
                    Some(Step::Waiting)
                } else {
                    None
                }
            }
            Phase::Preflight { .. } => None,
            Phase::Checked { retry_at } => {
                if facts.steady && retry_at.is_none_or(|t| now >= t) {
                    self.tries += 1;
                    self.phase = Phase::Settling {
                        until: now + SETTLE_LIMIT,
                    };
                    Some(Step::Pause)
                } else {
                    None
                }
            }
            Phase::Settling { until } => {
                if facts.steady && facts.quiet {
                    return Some(Step::Exec);
                }
                if now < until && facts.steady {
                    return None;
                }
                // A worker that does not answer (stopped, busy), or one that changed state:
                // accept again, and try later (or give up).
                if self.tries >= SETTLE_TRIES {
                    self.owed.push_back(Step::Failed(format!(
                        "connections in flight were not settled ({SETTLE_TRIES} tries of {SETTLE_LIMIT:?})"
                    )));
                    self.phase = Phase::Checked { retry_at: None };
                } else {
                    self.owed.push_back(Step::Retry);
                    self.phase = Phase::Checked {
                        retry_at: Some(now + SETTLE_RETRY),
                    };
                }
                Some(Step::Resume)
            }
        }
    }

    /// When [`Reload::poll`] must be asked again without an event.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        if !self.owed.is_empty() {
            return Some(now);
        }
        match self.phase {
            // Admin connections closing and the dispatch tasks' answers wake nothing else.
            Phase::Settling { .. } => Some(now + SETTLE_POLL),
            Phase::Checked { retry_at } => retry_at,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
