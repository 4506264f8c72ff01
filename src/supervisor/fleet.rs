//! The supervisor's core: the lifecycle of every slot's workers as one state machine, without I/O.
//!
//! [`Fleet`] is sans-I/O in the style of `quinn-proto`: it never spawns, signals, reads a clock or
//! touches a socket. The shell ([`super::shell`]) feeds it what happened — a worker was spawned,
//! said ready, beat, stalled, closed its channel, exited; a timer fired ([`Fleet::tick`]); an
//! operator asked for a roll or a shutdown — always with the current time, and carries out the
//! [`Action`]s it hands back ([`Fleet::poll_action`]): spawn a worker, signal a process group,
//! detach a worker from routing, publish a slot's new view, count a restart.
//!
//! Each worker process is in exactly one [`Phase`]; every transition is a method (the events the
//! shell reports in `fleet/events.rs`, the transitions they share in this file), and
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

mod events;
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
