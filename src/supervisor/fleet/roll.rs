//! Operator commands that span slots: the rolling-restart sequencer (one slot at a time) and the
//! graceful-shutdown choreography.

use std::time::Instant;

use super::{Fleet, Respawn, Role, Shutdown, Sig, WorkerId};

/// Where a rolling restart is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Roll {
    /// The new worker of this slot is starting.
    Starting(usize),
    /// The new worker of this slot took over; waiting for a sign of life (or `until`).
    AwaitingSign {
        /// The new worker.
        id: WorkerId,
        /// Move on at the latest then.
        until: Instant,
    },
}

impl Roll {
    pub(super) fn slot(self) -> usize {
        match self {
            Roll::Starting(s) => s,
            Roll::AwaitingSign { id, .. } => id.slot,
        }
    }
}

impl Fleet {
    /// Replace every slot's worker, one slot at a time (`why`: SIGUSR2, `lb roll`, a reload that
    /// changed the worker command, for the log).
    pub fn roll(&mut self, why: &str, now: Instant) {
        if self.shutdown.is_some() {
            return;
        }
        if self.roll.is_some() {
            tracing::info!("{why}: a rolling restart is already in progress");
            return;
        }
        tracing::info!("{why}: rolling restart of {} workers", self.cfg.workers);
        self.advance_roll(0, now);
    }

    /// Graceful shutdown: no more respawns or rolls; SIGTERM to every worker except those for
    /// which `busy` says handoffs are still unanswered (they get it once [`Fleet::on_answered`]
    /// or the settle timeout); SIGKILL to what is left after the shutdown timeout.
    pub fn shutdown(&mut self, why: &str, now: Instant, busy: impl Fn(WorkerId) -> bool) {
        if self.shutdown.is_some() {
            tracing::info!("{why} again: shutdown already in progress");
            return;
        }
        tracing::info!(
            "{why}: graceful shutdown (timeout {:?})",
            self.cfg.drain_timeout
        );
        if self.roll.is_some() {
            self.end_roll(Err("rolling restart stopped: lb is shutting down".into()));
        }
        let mut held = Vec::new();
        let mut term = Vec::new();
        for s in &mut self.slots {
            s.respawn = Respawn::Idle;
            for w in s
                .workers()
                .filter(|w| w.phase.is_live() && !w.phase.signalled())
            {
                if busy(w.id) {
                    held.push(w.id);
                } else {
                    term.push(w.id);
                }
            }
        }
        self.shutdown = Some(Shutdown {
            since: now,
            held,
            killed: false,
        });
        for id in term {
            self.signal_worker(id, Sig::Term, now);
        }
        for slot in 0..self.slots.len() {
            self.publish(slot);
        }
    }

    /// During a shutdown: the worker has no handoff left to answer.
    pub fn on_answered(&mut self, id: WorkerId, now: Instant) {
        if let Some(sd) = &mut self.shutdown
            && let Some(i) = sd.held.iter().position(|h| *h == id)
        {
            sd.held.swap_remove(i);
            self.signal_worker(id, Sig::Term, now);
        }
    }

    /// Starts the replacement of the first slot at or after `from` that has a live worker.
    pub(super) fn advance_roll(&mut self, from: usize, now: Instant) {
        let _ = now;
        for slot in from..self.cfg.workers.min(self.slots.len()) {
            let s = &self.slots[slot];
            if s.current.as_ref().is_none_or(|w| !w.phase.is_live())
                || s.incoming.is_some()
                || s.spawning.is_some()
            {
                continue; // down or already being replaced: it gets a fresh worker anyway
            }
            self.roll = Some(Roll::Starting(slot));
            self.request_spawn(slot, Role::Incoming);
            return;
        }
        self.end_roll(Ok(()));
    }
}
