//! The supervisor's core: the lifecycle of every slot's workers as one state machine, without I/O.
//!
//! [`Fleet`] is sans-I/O in the style of `quinn-proto`: it never spawns, signals, reads a clock or
//! touches a socket. The shell ([`super::shell`]) feeds it what happened — a worker was spawned,
//! said ready, beat, stalled, closed its channel, exited; a timer fired ([`Fleet::tick`]); an
//! operator asked for a roll or a shutdown — always with the current time, and carries out the
//! [`Action`]s it hands back ([`Fleet::poll_action`]): spawn a worker, signal a process group,
//! detach a worker from routing, publish a slot's new view, count a restart.
//!
//! Each worker process is in exactly one [`Phase`]; every transition is a method below, and
//! signals are requested in exactly one place (`Fleet::signal_worker`), which also moves the phase, so
//! "SIGTERM sent" and "draining" cannot disagree.
//!
//! Per slot (DESIGN §4): slots are stable; a slot has at most one `current` worker (the one
//! routed to), at most one `incoming` replacement (rolling restart, memory limit), and any
//! number of `retiring` workers finishing their connections. An unexpected exit schedules a
//! respawn with [`RestartPolicy`]'s backoff; a crash loop marks the slot failed for a cool-down.
//! A rolling restart replaces one slot at a time (`Roll`): the next slot starts only once the
//! new worker of the previous one is ready and has shown a sign of life.

use std::time::{Duration, Instant};

use super::backoff::{Next, RestartPolicy};
pub use super::types::{
    Action, FleetConfig, NODE_READY_AFTER, Phase, ROLL_SETTLE, Sig, SlotState, SlotView, WorkerId,
};
use roll::Roll;

mod roll;
mod timers;

/// One worker process.
#[derive(Debug, Clone)]
struct Worker {
    id: WorkerId,
    pid: u32,
    started: Instant,
    phase: Phase,
    /// Last heartbeat (`None` until the first: workers that never beat are not watched).
    last_heartbeat: Option<Instant>,
    /// Its channel reached EOF: nothing more will come from it.
    channel_closed: bool,
    /// A Node cluster worker (it sent `online`): stopped with cluster's `disconnect`.
    cluster: bool,
    /// Its channel closed while it was serving (a crash, usually): its exit is unexpected even
    /// though lb then sent it SIGTERM.
    lost_channel: bool,
    /// Its age when its RSS was first seen over `--max-memory`.
    over_at: Option<Duration>,
}

impl Worker {
    fn gone(&self) -> bool {
        self.phase == Phase::Exited && self.channel_closed
    }
}

/// A ready worker carried across an in-place upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adopted {
    /// Its slot and generation.
    pub id: WorkerId,
    /// Its pid.
    pub pid: u32,
    /// When it started.
    pub started: Instant,
    /// Its last heartbeat.
    pub last_heartbeat: Option<Instant>,
    /// A Node cluster worker.
    pub cluster: bool,
    /// The slot's next generation.
    pub next_generation: u64,
}

/// A spawn requested and not yet reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The slot's worker (first start or respawn).
    Current,
    /// A replacement for the slot's current worker.
    Incoming,
}

/// When a slot without a worker gets one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Respawn {
    /// Not scheduled.
    Idle,
    /// After a backoff delay.
    At(Instant),
    /// After a crash loop's cool-down.
    Failed(Instant),
}

#[derive(Debug)]
struct Slot {
    current: Option<Worker>,
    incoming: Option<Worker>,
    retiring: Vec<Worker>,
    spawning: Option<(u64, Role)>,
    next_generation: u64,
    restart: RestartPolicy,
    respawn: Respawn,
    /// Scaled away: draining, never respawned; dropped once its workers are gone.
    removed: bool,
    /// Failed starts in a row while lb has not served (see [`Fleet::gave_up`]).
    failed_starts: u32,
    /// Replacements in a row of young workers over `--max-memory` (their backoff).
    memory_young: u32,
}

impl Slot {
    fn new(crash_loop: super::backoff::CrashLoop, now: Instant) -> Self {
        Slot {
            current: None,
            incoming: None,
            retiring: Vec::new(),
            spawning: None,
            next_generation: 0,
            restart: RestartPolicy::new(crash_loop),
            respawn: Respawn::At(now),
            removed: false,
            failed_starts: 0,
            memory_young: 0,
        }
    }

    fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.current
            .iter()
            .chain(self.incoming.iter())
            .chain(self.retiring.iter())
    }

    fn find(&mut self, generation: u64) -> Option<&mut Worker> {
        self.current
            .iter_mut()
            .chain(self.incoming.iter_mut())
            .chain(self.retiring.iter_mut())
            .find(|w| w.id.generation == generation)
    }
}

/// A graceful shutdown in progress.
#[derive(Debug)]
struct Shutdown {
    since: Instant,
    /// Workers spared SIGTERM until their handoffs are answered.
    held: Vec<WorkerId>,
    /// The shutdown timeout passed and everything left was killed.
    killed: bool,
}

/// Every slot's lifecycle.
#[derive(Debug)]
pub struct Fleet {
    cfg: FleetConfig,
    slots: Vec<Slot>,
    roll: Option<Roll>,
    /// How the last rolling restart ended (`Err` says where and why it stopped).
    roll_outcome: Option<Result<(), String>>,
    shutdown: Option<Shutdown>,
    actions: std::collections::VecDeque<Action>,
    /// A worker has served: it was ready for [`MIN_UPTIME`] (or lb's previous image ran
    /// workers). Until then, workers that all fail to start make lb give up.
    served: bool,
    /// Why lb gives up (set once): every slot's worker failed to start
    /// [`GIVE_UP_AFTER`] times in a row before anything was served.
    gave_up: Option<String>,
    /// The "normal size above --max-memory" line was logged.
    memory_warned: bool,
}

/// A worker that exits before this much time after its start, or before it is ready, failed
/// to start (pm2's `min_uptime`).
pub const MIN_UPTIME: Duration = Duration::from_secs(1);

/// A worker over `--max-memory` younger than this is taken to be that size normally (not
/// leaking): its replacements back off.
pub const MEMORY_YOUNG: Duration = Duration::from_secs(60);

/// The longest such a worker is left over the limit before it is replaced.
pub const MEMORY_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Failed starts in a row, in every slot, after which an lb that has never served stops (a
/// worker command that cannot work: a missing script, a syntax error).
pub const GIVE_UP_AFTER: u32 = 3;

impl Fleet {
    /// A fleet whose slots all want a worker now.
    pub fn new(cfg: FleetConfig, now: Instant) -> Self {
        Self::resume(cfg, &[], &[], now)
    }

    /// A fleet that goes on with the ready workers lb's previous image ran (an in-place
    /// upgrade); slots without one get a worker now. `generations` are the slots' next
    /// generations there ([`Fleet::generations`]), so that a worker that died just before the
    /// upgrade is replaced, and counted, as a restart.
    pub fn resume(
        cfg: FleetConfig,
        adopted: &[Adopted],
        generations: &[u64],
        now: Instant,
    ) -> Self {
        let mut slots: Vec<Slot> = (0..cfg.workers)
            .map(|_| Slot::new(cfg.crash_loop, now))
            .collect();
        for (s, g) in slots.iter_mut().zip(generations) {
            s.next_generation = *g;
        }
        for a in adopted {
            let Some(s) = slots.get_mut(a.id.slot) else {
                continue;
            };
            s.current = Some(Worker {
                id: a.id,
                pid: a.pid,
                started: a.started,
                phase: Phase::Ready,
                last_heartbeat: a.last_heartbeat,
                channel_closed: false,
                cluster: a.cluster,
                lost_channel: false,
                over_at: None,
            });
            s.next_generation = a.next_generation.max(a.id.generation + 1);
            s.respawn = Respawn::Idle;
        }
        let mut fleet = Self {
            cfg,
            slots,
            roll: None,
            roll_outcome: None,
            shutdown: None,
            actions: Default::default(),
            served: !adopted.is_empty() || !generations.is_empty(),
            gave_up: None,
            memory_warned: false,
        };
        // The workers carried over are ready: routing and `/workers` learn it at once.
        for a in adopted {
            fleet.publish(a.id.slot);
        }
        fleet.tick(now);
        fleet
    }

    /// Nothing is changing: no rolling restart or shutdown, and every slot has at most one
    /// worker, ready (an in-place upgrade waits for this).
    pub fn steady(&self) -> bool {
        self.roll.is_none()
            && self.shutdown.is_none()
            && self.slots.len() == self.cfg.workers
            && self.slots.iter().all(|s| {
                s.incoming.is_none()
                    && s.retiring.is_empty()
                    && s.spawning.is_none()
                    && s.current.as_ref().is_none_or(|w| w.phase == Phase::Ready)
            })
    }

    /// The workers an in-place upgrade carries (call when [`Fleet::steady`]).
    pub fn carry(&self) -> Vec<Adopted> {
        self.slots
            .iter()
            .filter_map(|s| {
                let w = s.current.as_ref()?;
                Some(Adopted {
                    id: w.id,
                    pid: w.pid,
                    started: w.started,
                    last_heartbeat: w.last_heartbeat,
                    cluster: w.cluster,
                    next_generation: s.next_generation,
                })
            })
            .collect()
    }

    /// Every slot's next generation (what an in-place upgrade carries besides the workers).
    pub fn generations(&self) -> Vec<u64> {
        self.slots.iter().map(|s| s.next_generation).collect()
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// New settings (a config reload): timeouts, readiness, memory limit and crash-loop guard
    /// apply from now on; the worker count changes only through [`Fleet::scale`].
    pub fn reconfigure(&mut self, cfg: FleetConfig) {
        let workers = self.cfg.workers;
        self.cfg = FleetConfig { workers, ..cfg };
        for s in &mut self.slots {
            s.restart.set_guard(self.cfg.crash_loop);
        }
    }

    /// Slots that take connections (the rest, up to [`Fleet::len`], are draining after a scale
    /// down).
    pub fn active(&self) -> usize {
        self.cfg.workers
    }

    /// Changes the number of slots (`lb scale`): new slots get workers; slots `n..` drain (their
    /// workers are stopped gracefully, never respawned) and are dropped once their workers are
    /// gone. Sticky clients of the slots that stay do not move.
    pub fn scale(&mut self, n: usize, now: Instant) {
        if self.shutdown.is_some() || n == 0 || n == self.cfg.workers {
            return;
        }
        let old = self.cfg.workers;
        tracing::info!("scaling from {old} to {n} workers");
        while self.slots.len() < n {
            self.slots.push(Slot::new(self.cfg.crash_loop, now));
        }
        self.cfg.workers = n;
        self.actions.push_back(Action::Resized(self.slots.len()));
        for slot in old.min(n)..old.max(n) {
            let s = &mut self.slots[slot];
            if slot < n {
                // Back in service (it may have been draining from an earlier scale down).
                s.removed = false;
                if s.current.is_none() && s.spawning.is_none() {
                    s.respawn = Respawn::At(now);
                }
            } else {
                s.removed = true;
                s.respawn = Respawn::Idle;
                let ids: Vec<WorkerId> = s
                    .current
                    .iter()
                    .chain(s.incoming.iter())
                    .map(|w| w.id)
                    .collect();
                for id in ids {
                    self.signal_worker(id, Sig::Term, now);
                }
            }
            self.publish(slot);
        }
        if let Some(r) = self.roll
            && r.slot() >= n
        {
            self.end_roll(Err(format!(
                "rolling restart stopped: slot {} was scaled away",
                r.slot()
            )));
        }
        self.trim();
        self.tick(now);
    }

    /// Drops scaled-away slots at the end whose workers are all gone.
    fn trim(&mut self) {
        let before = self.slots.len();
        while self.slots.len() > self.cfg.workers
            && self
                .slots
                .last()
                .is_some_and(|s| s.removed && s.spawning.is_none() && s.workers().next().is_none())
        {
            self.slots.pop();
        }
        let len = self.slots.len();
        if len != before {
            // Nothing is left to publish about slots that are gone.
            self.actions
                .retain(|a| !matches!(a, Action::Publish(s) if *s >= len));
            self.actions.push_back(Action::Resized(len));
        }
    }

    /// Whether there are no slots (never, in practice).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// A rolling restart is in progress.
    pub fn rolling(&self) -> bool {
        self.roll.is_some()
    }

    /// How the last rolling restart ended, if one did.
    pub fn roll_outcome(&self) -> Option<&Result<(), String>> {
        self.roll_outcome.as_ref()
    }

    /// Ends the rolling restart in progress (logged).
    fn end_roll(&mut self, outcome: Result<(), String>) {
        match &outcome {
            Ok(()) => tracing::info!("rolling restart complete"),
            Err(why) => tracing::warn!("{why}"),
        }
        self.roll = None;
        self.roll_outcome = Some(outcome);
    }

    /// True once a shutdown has begun.
    pub fn shutting_down(&self) -> bool {
        self.shutdown.is_some()
    }

    /// True once a shutdown has begun and every worker is gone (exited, channel closed).
    pub fn is_done(&self) -> bool {
        self.shutdown.is_some()
            && self
                .slots
                .iter()
                .all(|s| s.workers().all(Worker::gone) && s.spawning.is_none())
    }

    /// The slot's view (what routing, `/workers` and `lb_worker_up` use).
    pub fn view(&self, slot: usize) -> SlotView {
        let s = &self.slots[slot];
        let cur = s.current.as_ref();
        let state = match (cur.map(|w| w.phase), &self.shutdown, s.respawn) {
            (Some(p), _, _) if s.removed && p.is_live() => SlotState::Draining,
            _ if s.removed => SlotState::Exited,
            (Some(Phase::Ready), None, _) => SlotState::Ready,
            (Some(Phase::Stalled), None, _) => SlotState::Stalled,
            (Some(p), Some(_), _) if p.is_live() => SlotState::Draining,
            (_, Some(_), _) => SlotState::Exited,
            (Some(Phase::Starting { .. }), None, _) => SlotState::Starting,
            (Some(p), None, _) if p.is_live() => SlotState::Draining,
            (_, None, Respawn::Failed(_)) => SlotState::Failed,
            (_, None, _) if s.spawning.is_some() => SlotState::Starting,
            (_, None, _) => SlotState::Backoff,
        };
        SlotView {
            current: cur.map(|w| w.id),
            pid: cur.map(|w| w.pid),
            started: cur.map(|w| w.started),
            state,
        }
    }

    /// Live workers (for sampling their memory and asking their socket counts).
    pub fn live_workers(&self) -> impl Iterator<Item = (WorkerId, u32)> + '_ {
        self.slots
            .iter()
            .flat_map(Slot::workers)
            .filter(|w| w.phase.is_live())
            .map(|w| (w.id, w.pid))
    }

    // ---- events -------------------------------------------------------------------------------

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

    // ---- transitions --------------------------------------------------------------------------

    /// The one place signals are sent: moves the worker's phase along with it (a worker is never
    /// signalled twice the same way, and never again once SIGKILLed or gone).
    fn signal_worker(&mut self, id: WorkerId, sig: Sig, now: Instant) {
        let Some(w) = self.slots[id.slot].find(id.generation) else {
            return;
        };
        let (next, action) = match (sig, w.phase) {
            (_, Phase::Exited | Phase::Killing) => return,
            (Sig::Term, Phase::Draining { .. }) => return,
            // A cluster worker whose channel is still open is stopped the way Node's primary
            // stops it: cluster's `disconnect` (SIGTERM follows when its channel closes).
            (Sig::Term, Phase::Disconnecting { .. }) if !w.channel_closed => return,
            (Sig::Term, p) if w.cluster && !w.channel_closed => (
                Phase::Disconnecting {
                    since: p.stopping_since().unwrap_or(now),
                },
                Action::Disconnect(id),
            ),
            (Sig::Term, p) => (
                Phase::Draining {
                    since: p.stopping_since().unwrap_or(now),
                },
                Action::Signal {
                    id,
                    pid: w.pid,
                    sig,
                },
            ),
            (Sig::Kill, _) => (
                Phase::Killing,
                Action::Signal {
                    id,
                    pid: w.pid,
                    sig,
                },
            ),
        };
        w.phase = next;
        self.actions.push_back(action);
        self.actions.push_back(Action::Detach(id));
    }

    fn pid(&self, id: WorkerId) -> u32 {
        self.slots[id.slot]
            .workers()
            .find(|w| w.id == id)
            .map_or(0, |w| w.pid)
    }

    fn request_spawn(&mut self, slot: usize, role: Role) {
        let s = &mut self.slots[slot];
        let generation = s.next_generation;
        s.next_generation += 1;
        s.spawning = Some((generation, role));
        if role == Role::Current {
            s.respawn = Respawn::Idle;
        }
        self.actions
            .push_back(Action::Spawn(WorkerId { slot, generation }));
    }

    /// Decides when `slot` gets a new worker after an unexpected exit.
    fn schedule_respawn(&mut self, slot: usize, now: Instant, ran: Duration) {
        let s = &mut self.slots[slot];
        match s.restart.on_exit(now, ran) {
            Next::Failed(cooldown) => {
                let guard = self.cfg.crash_loop;
                tracing::error!(
                    slot,
                    "worker crash loop: {} exits within {:?}; slot marked failed, retrying in {cooldown:?}",
                    guard.exits,
                    guard.window
                );
                s.respawn = Respawn::Failed(now + cooldown);
            }
            Next::Respawn(delay) => {
                tracing::info!(slot, "respawning in {delay:?}");
                s.respawn = Respawn::At(now + delay);
            }
        }
    }

    /// Starts a replacement for the slot's worker (it takes over once ready).
    fn replace(&mut self, slot: usize, why: &str) {
        let s = &self.slots[slot];
        if s.incoming.is_some() || s.spawning.is_some() || s.current.is_none() {
            return;
        }
        tracing::warn!(
            slot,
            pid = s.current.as_ref().map(|w| w.pid),
            "replacing worker: {why}"
        );
        self.request_spawn(slot, Role::Incoming);
    }

    /// Forgets workers that exited and whose channel is closed.
    fn forget_gone(&mut self, slot: usize) {
        self.slots[slot].retiring.retain(|w| !w.gone());
        self.trim();
    }

    fn publish(&mut self, slot: usize) {
        // (A slot dropped by a scale down has nothing left to publish.)
        if slot < self.slots.len() && self.actions.back() != Some(&Action::Publish(slot)) {
            self.actions.push_back(Action::Publish(slot));
        }
    }
}

#[cfg(test)]
mod tests;
