//! Supervision of the worker processes: a pure lifecycle core and the async shell around it.
//!
//! - [`fleet`] — the core: every slot's workers as one state machine ([`Phase`] per process),
//!   driven by events and the time, handing back [`Action`]s. No tokio, no syscalls; unit-tested
//!   with a fake clock. The rolling-restart sequencer and the shutdown choreography live here.
//! - [`backoff`] — when a slot gets a new worker after an exit (pure).
//! - [`reload`] — the in-place upgrade's sequencing (preflight, settle, exec, retries, a second
//!   SIGHUP), pure like the fleet; [`plan`] — what a reload changes (one list of restart-only
//!   settings, one scale/roll decision).
//! - [`shell`] — the master's one task: selects on accepts, dispatch reports, process exits,
//!   commands, signals and one timer; feeds the cores and the [`crate::router`]; carries out
//!   their actions (spawn, signal a process group, detach, publish, count, exec).

pub mod backoff;
pub mod fleet;
pub mod plan;
pub mod reload;
pub mod shell;
mod types;

pub use fleet::{
    Action, Adopted, Fleet, FleetConfig, GIVE_UP_AFTER, MIN_UPTIME, Phase, Sig, SlotState,
    SlotView, WorkerId,
};
