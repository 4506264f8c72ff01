//! The supervisor's vocabulary: worker identity, phases, signals, slot views, and the actions
//! the core hands to the shell.

use std::time::{Duration, Instant};

use super::backoff::CrashLoop;
pub use crate::slot::{SlotState, SlotView, WorkerId};

/// How long, without `--wait-ready`, a rolling restart waits for a new worker's first message
/// before it moves on to the next slot anyway.
pub const ROLL_SETTLE: Duration = Duration::from_secs(1);

/// A signal to a worker's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    /// Finish what you hold and exit.
    Term,
    /// Now.
    Kill,
}

/// Where a worker process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Spawned; not ready yet (`--wait-ready`): gets no connections.
    Starting {
        /// When it was spawned.
        since: Instant,
    },
    /// Takes connections.
    Ready,
    /// Ready, but has left a handoff unanswered for the stall timeout: no new connections until
    /// it answers again.
    Stalled,
    /// A Node cluster worker sent cluster's `disconnect` (or leaving on its own): it closes its
    /// servers and finishes its connections; SIGTERM follows once its channel closes.
    Disconnecting {
        /// When the stop began.
        since: Instant,
    },
    /// Sent SIGTERM: finishing its connections, gets no new ones.
    Draining {
        /// When SIGTERM was sent.
        since: Instant,
    },
    /// Sent SIGKILL.
    Killing,
    /// The process is gone (its channel may still be handing back connections).
    Exited,
}

impl Phase {
    pub(crate) fn is_live(self) -> bool {
        !matches!(self, Phase::Exited)
    }

    pub(crate) fn signalled(self) -> bool {
        matches!(
            self,
            Phase::Disconnecting { .. } | Phase::Draining { .. } | Phase::Killing
        )
    }

    /// When a graceful stop began (its drain timeout runs from then).
    pub(crate) fn stopping_since(self) -> Option<Instant> {
        match self {
            Phase::Disconnecting { since } | Phase::Draining { since } => Some(since),
            _ => None,
        }
    }
}

/// What the shell must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start a worker process for this id, then report [`super::Fleet::spawned`] or
    /// [`super::Fleet::spawn_failed`].
    Spawn(WorkerId),
    /// Signal a worker's process group.
    Signal {
        /// Which worker (for logs).
        id: WorkerId,
        /// Its pid (the process group id).
        pid: u32,
        /// Which signal.
        sig: Sig,
    },
    /// Send this worker no more connections; its dispatch hands back what it has not delivered.
    Detach(WorkerId),
    /// Send a cluster worker Node's `disconnect` (its graceful stop).
    Disconnect(WorkerId),
    /// The slot's view changed (see [`super::Fleet::view`]).
    Publish(usize),
    /// The slot's worker was replaced (`lb_worker_restarts_total`).
    Restarted(usize),
    /// The slot table now has this many slots (`lb scale`; [`super::Fleet::active`] of them take
    /// connections).
    Resized(usize),
}

/// Settings the lifecycle depends on.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Number of slots.
    pub workers: usize,
    /// A worker is ready only once it says so (`--wait-ready`).
    pub wait_ready: bool,
    /// A worker not ready by then is killed (`--ready-timeout`).
    pub ready_timeout: Duration,
    /// How long a draining worker may take before SIGKILL (`--shutdown-timeout`).
    pub drain_timeout: Duration,
    /// A worker that beat once and then is silent this long is killed (`--heartbeat-timeout`).
    pub heartbeat_timeout: Duration,
    /// RSS above which a worker is replaced (`--max-memory`).
    pub max_memory: Option<u64>,
    /// The crash-loop guard (`--crash-loop`).
    pub crash_loop: CrashLoop,
    /// At shutdown, how long a worker that still has handoffs to answer is spared SIGTERM.
    pub hold_timeout: Duration,
    /// The workers are Node processes: without `--wait-ready`, one is ready when it listens on
    /// lb's port, sends a message of its own, or after [`NODE_READY_AFTER`] (not at spawn: its
    /// code may not have installed a `message` listener or called `listen()` yet).
    pub node_workers: bool,
    /// Added to the log line of a worker stopped for not being ready in time: what readiness
    /// takes here, when that is not obvious.
    pub ready_hint: &'static str,
}

/// Without `--wait-ready`, the longest a Node worker that stays silent counts as starting.
pub const NODE_READY_AFTER: Duration = Duration::from_secs(2);
