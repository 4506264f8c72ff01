//! The routing decision: where a connection goes now (its session's worker, its sticky home,
//! the policy's pick among the slots that take connections), what waits for a ready worker and
//! for how long, and `lb route --live`'s account of the same decision.

use std::time::Instant;

use super::{MAX_DISPATCHES, Router, Target};
use crate::balance::{Policy, SlotLoad};
use crate::config::StalledSticky;
use crate::dispatch::Handoff;
use crate::metrics::{Failure, PeekResult};
use crate::slot::WorkerId;

impl Router {
    /// Sends a connection to a worker, or queues it while no worker is ready.
    pub fn route(&mut self, mut h: Handoff, exclude: Option<usize>) {
        if h.dispatches >= MAX_DISPATCHES {
            // Dropping `h` closes it (each NACK was counted as it happened; this is the end).
            self.shared.metrics.failure(Failure::Refused, 1);
            if let Some(n) = self.refused_log.hit(Instant::now()) {
                tracing::warn!(
                    peer = %h.peer,
                    "closed {n} connection(s) that {MAX_DISPATCHES} offers to workers could not place (every one refused); logged at most every 5s"
                );
            }
            return;
        }
        if let Some(id) = self.session_owner(&h, exclude) {
            self.shared.metrics.peeked(PeekResult::Sid);
            h.dispatches += 1;
            match self.link(id).map(|l| l.hand(h)) {
                Some(Ok(())) => {}
                Some(Err(h)) => {
                    self.detach(id);
                    self.route(h, Some(id.slot));
                }
                None => unreachable!("a session's owner has a link"),
            }
            return;
        }
        if h.sid.take().is_some() {
            self.shared.metrics.peeked(PeekResult::NoSid);
        }
        for slot in 0..self.active {
            self.loads[slot] = self.slot_load(slot, exclude);
        }
        let key = h.sticky_key();
        let pick = if self.waits_for_home(key) {
            None
        } else {
            self.balancer.pick_key(key, &self.loads[..self.active])
        };
        let Some((slot, overflowed)) = pick else {
            if (0..self.active).any(|s| self.at_limit(s)) {
                self.waiting_for_room = true;
            }
            return self.wait(h);
        };
        if self.balancer.policy() == Policy::Sticky
            && (exclude.is_some()
                || (0..self.active)
                    .any(|s| self.at_limit(s) || self.targets[s].1 == Target::Stalled))
        {
            // Count the client as moved if its home worker is alive (up or stalled) but was
            // passed over.
            let home = self
                .balancer
                .hash()
                .pick_key(key, self.active, |s| self.targets[s].1 != Target::Down);
            if let Some(home) = home
                && home != slot
                && !overflowed
            {
                self.slot_metrics[home].moved.inc();
            }
        }
        if overflowed {
            // Its first choice among the eligible slots was full.
            let home = self
                .balancer
                .hash()
                .pick_key(key, self.active, |s| self.loads[s].eligible);
            if let Some(home) = home {
                self.slot_metrics[home].overflow.inc();
            }
        }
        let id = self.targets[slot].0.expect("an eligible slot has a worker");
        if self.sio {
            // Possibly a new session: counted from now (least-connections).
            self.sessions.handed_new(id, Instant::now());
        }
        h.dispatches += 1;
        let sent = self.link(id).map(|l| l.hand(h));
        match sent {
            Some(Ok(())) => {}
            Some(Err(h)) => {
                // The dispatch task is gone (its channel closed): never again.
                self.detach(id);
                self.route(h, Some(slot));
            }
            None => unreachable!("an eligible slot's worker has a link"),
        }
    }

    /// Where a connection with sticky key `key` would go now (`lb route --live`): its home (all
    /// slots up), each slot's load and whether it takes connections, the bound and whether the
    /// home is full (`--balance-factor`), and the slot `sticky` picks.
    pub fn explain(&self, key: u32) -> serde_json::Value {
        let n = self.active;
        let loads: Vec<SlotLoad> = (0..n).map(|s| self.slot_load(s, None)).collect();
        let hash = self.balancer.hash();
        let home = hash.pick_key(key, n, |_| true);
        let live = loads.iter().filter(|l| l.eligible).count();
        let total: u64 = loads.iter().filter(|l| l.eligible).map(|l| l.load).sum();
        let factor = self.balancer.factor();
        let bound = factor
            .filter(|_| live > 0)
            .map(|f| (f * (total + 1) as f64 / live as f64).ceil() as u64);
        let now = match factor {
            Some(f) => hash.pick_bounded(key, &loads, f).map(|(s, _)| s),
            None => hash.pick_key(key, n, |s| loads[s].eligible),
        };
        let home_full = match (home, bound) {
            (Some(h), Some(b)) => loads[h].eligible && loads[h].load >= b,
            _ => false,
        };
        serde_json::json!({
            "policy": self.policy.as_str(),
            "home": home,
            "now": if self.policy == Policy::Sticky { now } else { None },
            "slots": loads.iter().enumerate().map(|(s, l)| serde_json::json!({
                "slot": s, "eligible": l.eligible, "load": l.load,
            })).collect::<Vec<_>>(),
            "balance_factor": factor,
            "total": total,
            "live": live,
            "bound": bound,
            "home_full": home_full,
        })
    }

    /// The live worker that owns the session a connection's request names, if it can take it
    /// now (up, routable, below `--max-pending`, not excluded).
    fn session_owner(&self, h: &Handoff, exclude: Option<usize>) -> Option<WorkerId> {
        let id = self.sessions.owner(h.sid.as_deref()?)?;
        let slot = id.slot;
        let ok = slot < self.active
            && Some(slot) != exclude
            && self.targets[slot] == (Some(id), Target::Up)
            && self.links[slot]
                .iter()
                .any(|l| l.id == id && l.routable && l.pending() < self.max_pending);
        ok.then_some(id)
    }

    /// What the policy sees of a slot.
    fn slot_load(&self, slot: usize, exclude: Option<usize>) -> SlotLoad {
        let (current, target) = self.targets[slot];
        let link = current.and_then(|id| self.links[slot].iter().find(|l| l.id == id));
        match link {
            Some(l) if target == Target::Up && l.routable => {
                let pending = l.pending();
                SlotLoad {
                    eligible: Some(slot) != exclude && pending < self.max_pending,
                    // socket.io workers: their sessions, new ones counted from their handoff.
                    load: if self.sio {
                        self.sessions.load(l.id)
                    } else {
                        l.active() + pending as u64
                    },
                }
            }
            _ => SlotLoad::default(),
        }
    }

    /// The slot's worker is up but has `--max-pending` handoffs unconfirmed.
    fn at_limit(&self, slot: usize) -> bool {
        let (current, target) = self.targets[slot];
        target == Target::Up
            && current.is_some_and(|id| {
                self.links[slot]
                    .iter()
                    .any(|l| l.id == id && l.pending() >= self.max_pending)
            })
    }

    /// With `--sticky-stalled wait`, a sticky client whose own worker is stalled waits for it
    /// (not when lb is shutting down: then its next choice is its only chance).
    fn waits_for_home(&self, key: u32) -> bool {
        !self.closing
            && self.policy == Policy::Sticky
            && self.sticky_stalled == StalledSticky::Wait
            && self
                .balancer
                .hash()
                .pick_key(key, self.active, |i| self.targets[i].1 != Target::Down)
                .is_some_and(|home| self.targets[home].1 == Target::Stalled)
    }

    fn wait(&mut self, h: Handoff) {
        let metrics = &self.shared.metrics;
        if self.closing {
            metrics.failure(Failure::NoWorker, 1);
            return;
        }
        if self.waiting.len() >= self.max_queue {
            metrics.failure(Failure::QueueFull, 1);
            return;
        }
        self.waiting.push_back(h);
        metrics.queued.set(self.waiting.len() as i64);
    }

    /// Routes queued connections now that a worker may be ready.
    pub(super) fn flush_waiting(&mut self) {
        for _ in 0..self.waiting.len() {
            let Some(h) = self.waiting.pop_front() else {
                break;
            };
            self.route(h, None);
        }
        self.shared.metrics.queued.set(self.waiting.len() as i64);
    }

    /// Closes connections that waited longer than `--queue-timeout`.
    pub fn expire(&mut self, now: Instant) {
        if self.sio {
            self.sessions.expire(now);
        }
        let limit = self.queue_timeout;
        let mut expired = 0;
        while self
            .waiting
            .front()
            .is_some_and(|h| now.saturating_duration_since(h.accepted) >= limit)
        {
            self.waiting.pop_front();
            expired += 1;
        }
        if expired > 0 {
            self.shared.metrics.failure(Failure::NoWorker, expired);
            self.shared.metrics.queued.set(self.waiting.len() as i64);
            if let Some(n) = self.expired_log.add(now, expired) {
                tracing::warn!(
                    "closed {n} connection(s) after waiting {limit:?} for a ready worker (logged at most every 5s)"
                );
            }
        }
    }

    /// When the oldest waiting connection times out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting
            .front()
            .map(|h| h.accepted + self.queue_timeout)
    }
}
