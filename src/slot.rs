//! The vocabulary every layer names: which worker (slot and generation), and what a slot looks
//! like from outside the supervisor. A leaf module: the router, the dispatch tasks and the
//! supervisor all import it, and it imports none of them.

use std::fmt;
use std::time::Instant;

/// One worker process: its slot and its generation within the slot (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkerId {
    /// The slot it serves.
    pub slot: usize,
    /// Spawn count of the slot when it was started (0 for the first).
    pub generation: u64,
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.slot, self.generation)
    }
}

/// What `/workers` and `lb_worker_up` show for a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// A worker is starting.
    Starting,
    /// The worker takes connections.
    Ready,
    /// The worker stopped answering handoffs.
    Stalled,
    /// Waiting to respawn after an exit.
    Backoff,
    /// Crash loop: resting before the next try.
    Failed,
    /// Shutting down; the worker is finishing.
    Draining,
    /// Shut down; no worker.
    Exited,
}

impl SlotState {
    /// The name in `/workers`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Stalled => "stalled",
            Self::Backoff => "backoff",
            Self::Failed => "failed",
            Self::Draining => "draining",
            Self::Exited => "exited",
        }
    }
}

/// A slot as the rest of lb sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    /// The slot's current worker, if any.
    pub current: Option<WorkerId>,
    /// Its pid.
    pub pid: Option<u32>,
    /// When it was spawned.
    pub started: Option<Instant>,
    /// What to show.
    pub state: SlotState,
}

impl SlotView {
    /// The slot's current worker takes new connections.
    pub fn up(&self) -> bool {
        self.state == SlotState::Ready
    }
}
