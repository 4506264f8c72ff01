//! The fleet's timers: respawns, ready timeouts, drain timeouts, heartbeats, roll pacing and the
//! shutdown deadlines, as one `tick(now)` and the earliest time it has something to do.

use std::time::Instant;

use super::roll::Roll;
use super::{Fleet, MIN_UPTIME, NODE_READY_AFTER, Phase, Respawn, Role, Sig, Slot, WorkerId};

impl Fleet {
    /// The earliest time [`Fleet::tick`] has something to do, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut d: Option<Instant> = None;
        let mut at = |t: Instant| d = Some(d.map_or(t, |d| d.min(t)));
        if let Some(sd) = &self.shutdown {
            if !sd.held.is_empty() {
                at(sd.since + self.cfg.hold_timeout);
            }
            if !sd.killed {
                at(sd.since + self.cfg.drain_timeout);
            }
        } else {
            for s in &self.slots {
                if let (None, None, Respawn::At(t) | Respawn::Failed(t)) =
                    (&s.current, s.spawning, s.respawn)
                {
                    at(t);
                }
            }
        }
        if let Some(Roll::AwaitingSign { until, .. }) = self.roll {
            at(until);
        }
        for s in &self.slots {
            for w in s.workers() {
                match w.phase {
                    Phase::Starting { since } => {
                        at(since + self.cfg.ready_timeout);
                        if self.cfg.node_workers && !self.cfg.wait_ready {
                            at(since + NODE_READY_AFTER);
                        }
                    }
                    Phase::Draining { since } | Phase::Disconnecting { since }
                        if self.shutdown.is_none() =>
                    {
                        at(since + self.cfg.drain_timeout)
                    }
                    _ => {}
                }
            }
            if let Some(w) = &s.current
                && matches!(w.phase, Phase::Ready | Phase::Stalled)
                && let Some(t) = w.last_heartbeat
            {
                at(t + self.cfg.heartbeat_timeout);
            }
        }
        d
    }

    /// Timers: respawns, ready timeouts, drain timeouts, heartbeats, roll pacing, shutdown.
    pub fn tick(&mut self, now: Instant) {
        if let Some(sd) = &mut self.shutdown {
            if !sd.held.is_empty() && now >= sd.since + self.cfg.hold_timeout {
                for id in std::mem::take(&mut sd.held) {
                    self.signal_worker(id, Sig::Term, now);
                }
            }
            let sd = self.shutdown.as_mut().expect("checked");
            if !sd.killed && now >= sd.since + self.cfg.drain_timeout {
                sd.killed = true;
                let left: Vec<WorkerId> = self
                    .slots
                    .iter()
                    .flat_map(Slot::workers)
                    .filter(|w| w.phase.is_live() && w.phase != Phase::Killing)
                    .map(|w| w.id)
                    .collect();
                for id in left {
                    let pid = self.pid(id);
                    tracing::warn!(
                        pid,
                        "worker still running after the shutdown timeout; killing it"
                    );
                    self.signal_worker(id, Sig::Kill, now);
                }
            }
        }
        for slot in 0..self.slots.len() {
            self.tick_slot(slot, now);
        }
        if !self.served {
            // A worker ready and alive for MIN_UPTIME: lb serves; failed starts from now on
            // are crashes (backoff and the crash-loop guard), not a reason to stop.
            self.served = self
                .slots
                .iter()
                .filter_map(|s| s.current.as_ref())
                .any(|w| {
                    !matches!(w.phase, Phase::Starting { .. })
                        && now.saturating_duration_since(w.started) >= MIN_UPTIME
                });
        }
        if let Some(Roll::AwaitingSign { id, until }) = self.roll
            && now >= until
        {
            self.advance_roll(id.slot + 1, now);
        }
    }

    pub(super) fn tick_slot(&mut self, slot: usize, now: Instant) {
        let cfg = &self.cfg;
        let s = &mut self.slots[slot];
        if self.shutdown.is_none()
            && s.current.is_none()
            && s.spawning.is_none()
            && matches!(s.respawn, Respawn::At(t) | Respawn::Failed(t) if t <= now)
        {
            self.request_spawn(slot, Role::Current);
            return self.publish(slot);
        }
        let mut kill = Vec::new();
        let mut ready = Vec::new();
        for w in s.workers() {
            match w.phase {
                Phase::Starting { since }
                    if cfg.node_workers
                        && !cfg.wait_ready
                        && now >= since + NODE_READY_AFTER
                        && now < since + cfg.ready_timeout =>
                {
                    ready.push(w.id);
                }
                Phase::Starting { since } if now >= since + cfg.ready_timeout => {
                    tracing::warn!(
                        slot,
                        pid = w.pid,
                        "worker not ready after {:?}; stopping it{}",
                        cfg.ready_timeout,
                        cfg.ready_hint
                    );
                    kill.push(w.id);
                }
                Phase::Draining { since } | Phase::Disconnecting { since }
                    if self.shutdown.is_none() && now >= since + cfg.drain_timeout =>
                {
                    tracing::warn!(
                        slot,
                        pid = w.pid,
                        "old worker did not exit within {:?}; killing it",
                        cfg.drain_timeout
                    );
                    kill.push(w.id);
                }
                _ => {}
            }
        }
        if let Some(w) = &s.current
            && matches!(w.phase, Phase::Ready | Phase::Stalled)
            && let Some(last) = w.last_heartbeat
            && now >= last + cfg.heartbeat_timeout
        {
            tracing::warn!(
                slot,
                pid = w.pid,
                "no heartbeat for {:?}; killing the worker",
                now - last
            );
            kill.push(w.id);
        }
        for id in ready {
            self.on_ready(id, now);
        }
        if kill.is_empty() {
            return;
        }
        let s = &self.slots[slot];
        let incoming = s.incoming.as_ref().map(|w| w.id);
        for id in kill {
            if Some(id) == incoming && self.roll == Some(Roll::Starting(slot)) {
                self.end_roll(Err(format!(
                    "rolling restart stopped at slot {slot}: the new worker never got ready"
                )));
            }
            self.signal_worker(id, Sig::Kill, now);
        }
        self.publish(slot);
    }
}
