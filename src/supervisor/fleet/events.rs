//! The events a worker's life is made of, as the shell reports them: spawned, ready, online,
//! leaving, alive, beating, stalled, recovered, out of step, channel closed, exited, over its
//! memory limit. Each moves the worker's phase and says what follows through the fleet's actions.

use std::time::{Duration, Instant};

use super::{
    Action, Fleet, GIVE_UP_AFTER, MEMORY_BACKOFF_MAX, MEMORY_YOUNG, MIN_UPTIME, Phase, ROLL_SETTLE,
    Role, Roll, Sig, Worker, WorkerId,
};

impl Fleet {
    /// A requested worker is running as `pid`.
    pub fn spawned(&mut self, id: WorkerId, pid: u32, now: Instant) {
        let s = &mut self.slots[id.slot];
        let Some((generation, role)) = s.spawning.take() else {
            return;
        };
        debug_assert_eq!(generation, id.generation);
        tracing::debug!(slot = id.slot, pid, generation, "spawned worker");
        let w = Worker {
            id,
            pid,
            started: now,
            phase: Phase::Starting { since: now },
            last_heartbeat: None,
            channel_closed: false,
            cluster: false,
            lost_channel: false,
            over_at: None,
        };
        match role {
            Role::Current => {
                if id.generation > 0 {
                    self.actions.push_back(Action::Restarted(id.slot));
                }
                s.current = Some(w);
            }
            Role::Incoming => s.incoming = Some(w),
        }
        if self.shutdown.is_some() || self.slots[id.slot].removed {
            // Asked for before the shutdown or scale down began: stop it at once.
            self.signal_worker(id, Sig::Term, now);
        } else if !self.cfg.wait_ready && !self.cfg.node_workers {
            self.on_ready(id, now);
        }
        self.publish(id.slot);
    }

    /// A requested worker could not be started.
    pub fn spawn_failed(&mut self, id: WorkerId, now: Instant) {
        let s = &mut self.slots[id.slot];
        let Some((_, role)) = s.spawning.take() else {
            return;
        };
        match role {
            // Counts as an exit: backoff and crash-loop guard apply.
            Role::Current => self.schedule_respawn(id.slot, now, Duration::ZERO),
            Role::Incoming => {
                if self.roll.is_some_and(|r| r.slot() == id.slot) {
                    let why = format!(
                        "rolling restart stopped at slot {}: cannot start a new worker",
                        id.slot
                    );
                    self.end_roll(Err(why));
                }
            }
        }
        self.publish(id.slot);
    }

    /// The worker said `{"type":"ready"}` (or, without `--wait-ready`, was spawned).
    pub fn on_ready(&mut self, id: WorkerId, now: Instant) {
        let s = &mut self.slots[id.slot];
        let is_incoming = s.incoming.as_ref().is_some_and(|w| w.id == id);
        let Some(w) = s.find(id.generation) else {
            return;
        };
        if !matches!(w.phase, Phase::Starting { .. }) || w.channel_closed {
            return;
        }
        w.phase = Phase::Ready;
        if is_incoming {
            // Replacement: switch the slot to the new worker, drain the old one.
            let new = s.incoming.take().expect("checked");
            let pid = new.pid;
            if let Some(old) = s.current.replace(new) {
                let old_id = old.id;
                tracing::info!(slot = id.slot, pid = old.pid, "draining old worker");
                s.retiring.push(old);
                self.signal_worker(old_id, Sig::Term, now);
            }
            self.actions.push_back(Action::Restarted(id.slot));
            tracing::info!(slot = id.slot, pid, "replacement worker ready");
            if self.roll == Some(Roll::Starting(id.slot)) {
                self.roll = Some(Roll::AwaitingSign {
                    id,
                    until: now + ROLL_SETTLE,
                });
                if self.cfg.wait_ready {
                    // Saying ready is the sign of life.
                    self.advance_roll(id.slot + 1, now);
                }
            }
        } else {
            tracing::info!(slot = id.slot, pid = w.pid, "worker ready");
        }
        self.publish(id.slot);
    }

    /// The worker is a Node cluster worker (it sent cluster's `online`).
    pub fn on_cluster_online(&mut self, id: WorkerId) {
        if let Some(w) = self.slots[id.slot].find(id.generation) {
            w.cluster = true;
        }
    }

    /// A worker is leaving on its own — a cluster worker's `exitedAfterDisconnect`, or a
    /// `sticky-session` worker whose app closed its server (`why`): it gets no new connections,
    /// and its exit is expected.
    pub fn on_leaving(&mut self, id: WorkerId, now: Instant, why: &str) {
        if let Some(w) = self.slots[id.slot].find(id.generation)
            && w.phase.is_live()
            && !w.phase.signalled()
        {
            tracing::info!(
                slot = id.slot,
                pid = w.pid,
                "worker is leaving ({why}): no new connections for it"
            );
            w.phase = Phase::Disconnecting { since: now };
            self.actions.push_back(Action::Detach(id));
            self.publish(id.slot);
        }
    }

    /// The worker sent a message of its own (any kind): it is alive and reading its channel.
    pub fn on_alive(&mut self, id: WorkerId, now: Instant) {
        if self.cfg.node_workers
            && !self.cfg.wait_ready
            && self.slots[id.slot]
                .find(id.generation)
                .is_some_and(|w| matches!(w.phase, Phase::Starting { .. }))
        {
            self.on_ready(id, now);
        }
        if let Some(Roll::AwaitingSign { id: r, .. }) = self.roll
            && r == id
        {
            self.advance_roll(id.slot + 1, now);
        }
    }

    /// The worker sent a heartbeat.
    pub fn on_heartbeat(&mut self, id: WorkerId, now: Instant) {
        if let Some(w) = self.slots[id.slot].find(id.generation) {
            w.last_heartbeat = Some(now);
        }
        self.on_alive(id, now);
    }

    /// The worker's dispatch saw a handoff unanswered for the stall timeout.
    pub fn on_stalled(&mut self, id: WorkerId, stall_timeout: Duration) {
        if let Some(w) = self.slots[id.slot].find(id.generation)
            && w.phase == Phase::Ready
        {
            w.phase = Phase::Stalled;
            tracing::warn!(
                slot = id.slot,
                pid = w.pid,
                "worker has not answered a handoff (or, with kernel steering, accepted from its listener) for {stall_timeout:?}; no new connections until it does"
            );
            self.publish(id.slot);
        }
    }

    /// A stalled worker answered again.
    pub fn on_recovered(&mut self, id: WorkerId) {
        if let Some(w) = self.slots[id.slot].find(id.generation)
            && w.phase == Phase::Stalled
        {
            w.phase = Phase::Ready;
            tracing::info!(slot = id.slot, pid = w.pid, "stalled worker answers again");
            self.publish(id.slot);
        }
    }

    /// The worker answered a handoff it was never sent: its channel cannot be trusted.
    pub fn on_desync(&mut self, id: WorkerId, now: Instant) {
        if let Some(w) = self.slots[id.slot].find(id.generation)
            && !w.phase.signalled()
            && w.phase.is_live()
        {
            tracing::error!(
                slot = id.slot,
                pid = w.pid,
                "worker answered a handoff that was never sent; its channel cannot be trusted, replacing it"
            );
            self.signal_worker(id, Sig::Term, now);
            self.publish(id.slot);
        }
    }

    /// The worker's channel reached EOF (its dispatch has handed back everything it held).
    pub fn on_channel_closed(&mut self, id: WorkerId, now: Instant) {
        let Some(w) = self.slots[id.slot].find(id.generation) else {
            return;
        };
        w.channel_closed = true;
        if let Phase::Disconnecting { .. } = w.phase {
            // Its servers closed and its connections ended: SIGTERM in case something else
            // keeps it alive (a timer).
            self.signal_worker(id, Sig::Term, now);
            self.forget_gone(id.slot);
            return self.publish(id.slot);
        }
        let (live, signalled, pid) = (w.phase.is_live(), w.phase.signalled(), w.pid);
        if live && !signalled && self.shutdown.is_none() {
            w.lost_channel = true;
            // A worker without its channel can never get a connection again.
            tracing::warn!(
                slot = id.slot,
                pid,
                "worker closed its channel; stopping it"
            );
        }
        if live && !signalled {
            self.signal_worker(id, Sig::Term, now);
        }
        self.forget_gone(id.slot);
        self.publish(id.slot);
    }

    /// The worker process exited (`how` describes its status, for the log).
    pub fn on_exit(&mut self, id: WorkerId, how: &str, now: Instant) {
        let shutting_down = self.shutdown.is_some();
        let s = &mut self.slots[id.slot];
        if s.current.as_ref().is_some_and(|w| w.id == id) {
            let mut w = s.current.take().expect("checked");
            let ran = now.saturating_duration_since(w.started);
            let unexpected = (!w.phase.signalled() || w.lost_channel) && !shutting_down;
            if unexpected {
                tracing::warn!(
                    slot = id.slot,
                    pid = w.pid,
                    "worker exited unexpectedly ({how}) after {:.1}s",
                    ran.as_secs_f64()
                );
            }
            let started_up = !matches!(w.phase, Phase::Starting { .. }) && ran >= MIN_UPTIME;
            if started_up {
                self.served = true;
            } else if unexpected && !self.served {
                s.failed_starts += 1;
            }
            w.phase = Phase::Exited;
            s.retiring.push(w); // kept until its channel reports closed
            self.actions.push_back(Action::Detach(id));
            if !shutting_down && !s.removed {
                self.schedule_respawn(id.slot, now, ran);
            }
        } else if s.incoming.as_ref().is_some_and(|w| w.id == id) {
            let mut w = s.incoming.take().expect("checked");
            tracing::warn!(
                slot = id.slot,
                pid = w.pid,
                "replacement worker exited before it was ready ({how}); keeping the old one"
            );
            w.phase = Phase::Exited;
            s.retiring.push(w);
            self.actions.push_back(Action::Detach(id));
            if self.roll.is_some_and(|r| r.slot() == id.slot) {
                let why = format!(
                    "rolling restart stopped at slot {}: the new worker exited before it was ready",
                    id.slot
                );
                self.end_roll(Err(why));
            }
        } else if let Some(w) = s.retiring.iter_mut().find(|w| w.id == id) {
            w.phase = Phase::Exited;
            tracing::info!(slot = id.slot, pid = w.pid, "old worker exited ({how})");
        }
        self.check_give_up(id.slot, how);
        self.forget_gone(id.slot);
        self.publish(id.slot);
    }

    /// Why lb should stop: before anything was served, every slot's worker failed to start
    /// [`GIVE_UP_AFTER`] times in a row (the shell shuts down and exits with this line, and the
    /// worker's error line when lb sees its output).
    pub fn gave_up(&self) -> Option<&str> {
        self.gave_up.as_deref()
    }

    fn check_give_up(&mut self, slot: usize, how: &str) {
        let live = &self.slots[..self.cfg.workers.min(self.slots.len())];
        if self.served
            || self.gave_up.is_some()
            || self.shutdown.is_some()
            || live.is_empty()
            || !live.iter().all(|s| s.failed_starts >= GIVE_UP_AFTER)
        {
            return;
        }
        self.gave_up = Some(format!(
            "every worker exited before it could serve, {GIVE_UP_AFTER} times in a row {} (the \
             last: slot {slot}, {how})",
            match live.len() {
                1 => "in its one slot".to_owned(),
                n => format!("in each of the {n} slots"),
            }
        ));
    }

    /// The worker's resident memory was sampled.
    pub fn on_rss(&mut self, id: WorkerId, bytes: u64, now: Instant) {
        let s = &mut self.slots[id.slot];
        let Some(limit) = self.cfg.max_memory else {
            return;
        };
        let Some(w) = s
            .current
            .as_mut()
            .filter(|w| w.id == id && w.phase.is_live())
        else {
            return;
        };
        if bytes <= limit || self.shutdown.is_some() || s.removed || s.incoming.is_some() {
            return;
        }
        // A worker over the limit soon after its start is not leaking: its normal size is
        // above the limit. Replacing it every second would be all lb does; it waits longer
        // each time instead (1 s, 2 s, 4 s … 5 min of the worker's age), and says so once.
        let age = now.saturating_duration_since(w.started);
        let born_big = *w.over_at.get_or_insert(age) < MEMORY_YOUNG;
        if born_big {
            let wait = Duration::from_secs(1 << s.memory_young.min(9)).min(MEMORY_BACKOFF_MAX);
            if age < wait {
                return;
            }
            s.memory_young += 1;
            if !self.memory_warned {
                self.memory_warned = true;
                tracing::warn!(
                    slot = id.slot,
                    "a worker is over --max-memory {limit} bytes ({bytes}) {:.0}s after its start: \
                     its normal size may be above the limit; such workers are replaced less and \
                     less often (up to every {}s), raise --max-memory if this is their size",
                    age.as_secs_f64(),
                    MEMORY_BACKOFF_MAX.as_secs()
                );
            }
        } else {
            s.memory_young = 0;
        }
        self.replace(
            id.slot,
            &format!("RSS {bytes} bytes exceeds --max-memory {limit}"),
        );
    }
}
