//! The master: accept loop, routing, and worker supervision, in one task on one thread.
//!
//! Data path: [`crate::listener`] accepts → [`crate::balance`] picks a slot → the slot's
//! [`crate::dispatch`] task passes the fd and waits for the ACK. Everything the master decides is
//! decided here, in one `select!` loop that owns all state, so there are no locks on the data
//! path; the admin endpoint reads [`crate::metrics::Shared`].
//!
//! Supervision (DESIGN §4): slots are stable (slot 3's replacement is slot 3 again, so sticky
//! clients come back). A worker is `starting` until ready (at once, or on `{"type":"ready"}` with
//! `--wait-ready`), then `ready`; an unexpected exit schedules a respawn with exponential backoff,
//! and a crash loop marks the slot `failed` for a cool-down. A replaced worker (rolling restart,
//! memory limit) first drains: it gets no new connections, is sent SIGTERM, and is SIGKILLed after
//! `--shutdown-timeout`. A connection is never dropped silently: every fd not ACKed comes back
//! from its dispatch task and is routed again, waits in a bounded queue, or is closed and counted.
//!
//! The master spawns workers only from this thread, which lives as long as the process, so
//! `PR_SET_PDEATHSIG` fires only when the master dies (PITFALLS §6).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::balance::{Balancer, Policy, SlotLoad};
use crate::channel::{DEFAULT_MAX_LINE, FromWorker};
use crate::config::{Settings, StalledSticky};
use crate::dispatch::{self, Handoff, Report, Returned, ToWorker};
use crate::listener::{AcceptError, Listener};
use crate::metrics::{Shared, SlotView};
use crate::restart::{Next, RestartPolicy};
use crate::spawn;

/// Handles in flight per worker before waiting for ACKs.
const HANDOFF_WINDOW: usize = 16;
/// Workers a connection may be offered to before it is closed.
const MAX_DISPATCHES: u8 = 8;
/// How often memory is sampled and heartbeats checked.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// Pause of the accept loop after running out of fds or memory.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Accepts per wakeup before other work gets a turn.
const ACCEPT_BATCH: usize = 64;

/// A worker process exited: (slot, generation, status).
type Exit = (usize, u64, Option<ExitStatus>);

/// One worker process (current, incoming or draining).
#[derive(Debug)]
struct Proc {
    generation: u64,
    pid: u32,
    /// Handoffs go here; `None` once draining or the channel closed.
    tx: Option<mpsc::UnboundedSender<ToWorker>>,
    started: Instant,
    ready: bool,
    exited: bool,
    channel_closed: bool,
    /// Sent to the dispatch task and not yet ACKed or returned.
    outstanding: usize,
    /// Last cumulative `totalRequests` this process reported.
    reported_requests: u64,
    /// Last `activeConnections` this process reported.
    reported_active: u64,
    /// ACKs since that report (the report does not include them yet).
    acked_since_report: u64,
    /// The worker reports `activeConnections` itself; otherwise lb asks Node's socket count.
    reports_active: bool,
    /// Last heartbeat (`None` until the first: workers that never beat are not watched).
    last_heartbeat: Option<Instant>,
    /// Leaves a handoff unanswered for the stall timeout: no new connections for now.
    stalled: bool,
    /// When SIGTERM was sent (then SIGKILL after the shutdown timeout).
    term_sent: Option<Instant>,
    killed: bool,
}

impl Proc {
    /// May receive new connections.
    fn takes_connections(&self) -> bool {
        self.ready && self.tx.is_some() && !self.stalled
    }

    fn load(&self) -> u64 {
        self.reported_active + self.acked_since_report + self.outstanding as u64
    }

    fn gone(&self) -> bool {
        self.exited && self.channel_closed
    }
}

/// Slot state (what `/workers` shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Starting,
    Ready,
    Backoff,
    Failed,
    Stopped,
}

#[derive(Debug)]
struct Slot {
    state: SlotState,
    /// The worker serving the slot.
    current: Option<Proc>,
    /// A new generation starting up to replace `current` (rolling restart, memory limit).
    incoming: Option<Proc>,
    /// Previous generations finishing their connections.
    draining: Vec<Proc>,
    next_generation: u64,
    restart: RestartPolicy,
    respawn_at: Option<Instant>,
}

/// A rolling restart in progress.
#[derive(Debug)]
struct Roll {
    slot: usize,
}

/// The master process.
pub struct Master {
    settings: Settings,
    argv: Vec<String>,
    balancer: Balancer,
    slots: Vec<Slot>,
    loads: Vec<SlotLoad>,
    waiting: VecDeque<Handoff>,
    shared: Arc<Shared>,
    reports_tx: mpsc::UnboundedSender<dispatch::Event>,
    reports_rx: mpsc::UnboundedReceiver<dispatch::Event>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits_rx: mpsc::UnboundedReceiver<Exit>,
    roll: Option<Roll>,
    shutting_down: Option<Instant>,
    /// The shutdown timeout passed and the remaining workers were SIGKILLed.
    shutdown_killed: bool,
    accept_paused_until: Option<Instant>,
    last_exhausted_log: Option<Instant>,
}

impl Master {
    /// Creates the master for `settings`; `argv` is the worker command.
    pub fn new(settings: Settings, argv: Vec<String>, shared: Arc<Shared>) -> Self {
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        let n = settings.workers;
        let slots = (0..n)
            .map(|_| Slot {
                state: SlotState::Starting,
                current: None,
                incoming: None,
                draining: Vec::new(),
                next_generation: 0,
                restart: RestartPolicy::new(settings.crash_loop),
                respawn_at: Some(Instant::now()),
            })
            .collect();
        Self {
            balancer: Balancer::new(settings.policy, settings.hash_seed),
            settings,
            argv,
            slots,
            loads: vec![SlotLoad::default(); n],
            waiting: VecDeque::new(),
            shared,
            reports_tx,
            reports_rx,
            exits_tx,
            exits_rx,
            roll: None,
            shutting_down: None,
            shutdown_killed: false,
            accept_paused_until: None,
            last_exhausted_log: None,
        }
    }

    /// Runs until a graceful shutdown completes.
    pub async fn run(mut self, listener: Listener) -> std::io::Result<()> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut usr2 = signal(SignalKind::user_defined2())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut listener = Some(listener);
        let mut next_housekeeping = Instant::now() + HOUSEKEEPING;
        for slot in 0..self.slots.len() {
            self.spawn_into(slot, false);
        }
        // One timer for every deadline, reset only when the earliest deadline changes (the hot
        // path — accept, hand off, ACK — then touches no timer at all).
        let mut armed = next_housekeeping;
        let timer = tokio::time::sleep_until(armed.into());
        tokio::pin!(timer);
        loop {
            let now = Instant::now();
            if self.accept_paused_until.is_some_and(|t| t <= now) {
                self.accept_paused_until = None;
            }
            if now >= next_housekeeping {
                self.housekeeping(now);
                next_housekeeping = now + HOUSEKEEPING;
            }
            self.run_timers(now);
            if let Some(started) = self.shutting_down {
                if listener.is_some() {
                    listener = None; // stop accepting: close the listening socket
                }
                if self.all_gone() {
                    break;
                }
                self.shutdown_step(started, now);
            }
            let deadline = self.next_deadline(next_housekeeping).max(now);
            if deadline != armed {
                armed = deadline;
                timer.as_mut().reset(armed.into());
            }
            let accepting = listener.is_some() && self.accept_paused_until.is_none();
            tokio::select! {
                biased;
                Some(ev) = self.reports_rx.recv() => {
                    self.on_dispatch(ev);
                    // Drain what else is queued before going back to accepting.
                    while let Ok(ev) = self.reports_rx.try_recv() { self.on_dispatch(ev); }
                }
                Some((slot, generation, status)) = self.exits_rx.recv() => self.on_exit(slot, generation, status),
                ready = async { listener.as_ref().expect("guarded").ready().await }, if accepting => {
                    match ready {
                        Ok(mut guard) => self.accept_batch(&mut guard),
                        Err(e) => {
                            tracing::error!("listener failed: {e}");
                            self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                        }
                    }
                }
                _ = term.recv() => self.begin_shutdown("SIGTERM"),
                _ = int.recv() => self.begin_shutdown("SIGINT"),
                _ = usr2.recv() => self.begin_roll(),
                _ = hup.recv() => tracing::info!("SIGHUP received: config reload is not supported yet; ignoring"),
                () = &mut timer => {
                    // Fired: arm far ahead until the next pass computes the real deadline.
                    armed = Instant::now() + HOUSEKEEPING;
                    timer.as_mut().reset(armed.into());
                }
            }
        }
        tracing::info!("all workers exited; bye");
        Ok(())
    }

    fn accept_batch(
        &mut self,
        guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, socket2::Socket>,
    ) {
        for _ in 0..ACCEPT_BATCH {
            match Listener::accept(guard) {
                Ok((stream, peer)) => {
                    self.shared.metrics.accepted.inc();
                    self.route(Handoff::new(stream, peer), None);
                }
                Err((AcceptError::WouldBlock, _)) => return,
                Err((AcceptError::Transient, _)) => self.shared.metrics.accept_error("transient"),
                Err((kind, e)) => {
                    let exhausted = kind == AcceptError::Exhausted;
                    self.shared
                        .metrics
                        .accept_error(if exhausted { "exhausted" } else { "other" });
                    let now = Instant::now();
                    if self
                        .last_exhausted_log
                        .is_none_or(|t| now - t > Duration::from_secs(5))
                    {
                        self.last_exhausted_log = Some(now);
                        let e = e.map(|e| e.to_string()).unwrap_or_default();
                        tracing::warn!(
                            "accept failed ({e}); pausing accepts for {ACCEPT_PAUSE:?} (logged at most every 5s)"
                        );
                    }
                    self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                    return;
                }
            }
        }
    }

    /// Sends a connection to a worker, or queues it while no worker is ready.
    fn route(&mut self, mut h: Handoff, exclude: Option<usize>) {
        if h.dispatches >= MAX_DISPATCHES {
            tracing::warn!(peer = %h.peer, "connection refused by {} workers; closing it", h.dispatches);
            return; // dropping `h` closes it; the failure reasons were counted as they happened
        }
        for (i, slot) in self.slots.iter().enumerate() {
            let p = slot.current.as_ref().filter(|p| p.takes_connections());
            self.loads[i] = SlotLoad {
                eligible: Some(i) != exclude
                    && p.is_some_and(|p| p.outstanding < self.settings.max_pending),
                load: p.map_or(0, Proc::load),
            };
        }
        // Sticky clients of a stalled worker may be configured to wait for it (not when lb is
        // shutting down: then the next choice is their only chance).
        let wait_for_home = self.shutting_down.is_none()
            && self.settings.policy == Policy::Sticky
            && self.settings.sticky_stalled == StalledSticky::Wait
            && self
                .balancer
                .hash()
                .pick(h.peer.ip(), self.slots.len(), |i| {
                    self.slots[i]
                        .current
                        .as_ref()
                        .is_some_and(|p| p.ready && p.tx.is_some())
                })
                .is_some_and(|home| self.slots[home].current.as_ref().is_some_and(|p| p.stalled));
        let pick = if wait_for_home {
            None
        } else {
            self.balancer.pick(h.peer.ip(), &self.loads)
        };
        let Some(s) = pick else {
            if self.shutting_down.is_some() {
                self.shared.metrics.failure("no_worker", 1);
                return;
            }
            if self.waiting.len() >= self.settings.max_queue {
                self.shared.metrics.failure("queue_full", 1);
                return;
            }
            self.waiting.push_back(h);
            self.shared.metrics.queued.set(self.waiting.len() as i64);
            return;
        };
        let p = self.slots[s]
            .current
            .as_mut()
            .expect("eligible slot has a worker");
        h.nacks = 0;
        h.dispatches += 1;
        match p.tx.as_ref().expect("eligible").send(ToWorker::Handoff(h)) {
            Ok(()) => p.outstanding += 1,
            Err(mpsc::error::SendError(m)) => {
                p.tx = None;
                if let ToWorker::Handoff(h) = m {
                    self.route(h, Some(s));
                }
            }
        }
    }

    /// Routes queued connections now that a worker may be ready; closes expired ones.
    fn flush_waiting(&mut self) {
        let n = self.waiting.len();
        for _ in 0..n {
            let Some(h) = self.waiting.pop_front() else {
                break;
            };
            self.route(h, None);
        }
        self.shared.metrics.queued.set(self.waiting.len() as i64);
    }

    fn on_dispatch(&mut self, ev: dispatch::Event) {
        let dispatch::Event {
            slot,
            generation,
            report,
        } = ev;
        let shared = self.shared.clone();
        let metrics = &shared.metrics;
        let sm = &metrics.slots[slot];
        let wait_ready = self.settings.wait_ready;
        // Connections a replaced (draining) worker hands back belong to the slot's new worker;
        // only the slot's current worker refusing them means "try another slot".
        let is_current = self.slots[slot]
            .current
            .as_ref()
            .is_some_and(|c| c.generation == generation);
        let Some(p) = find_proc(&mut self.slots[slot], generation) else {
            // A report from a process we no longer track: only returned connections matter.
            if let Report::Returned(conns, reason) = report {
                if reason != Returned::Stalled {
                    metrics.failure(reason.label(), conns.len() as u64);
                }
                for h in conns {
                    self.route(h, None);
                }
            }
            return;
        };
        let mut reroute = Vec::new();
        let mut became_ready = false;
        let mut flush = false;
        match report {
            Report::Acked { accepted } => {
                // A worker at its pending limit has room again for what waits in the queue.
                flush = p.outstanding >= self.settings.max_pending;
                p.outstanding = p.outstanding.saturating_sub(1);
                p.acked_since_report += 1;
                sm.connections.inc();
                metrics
                    .handoff_duration
                    .observe(accepted.elapsed().as_secs_f64());
            }
            Report::Nacked => metrics.failure("nack", 1),
            Report::Returned(conns, reason) => {
                p.outstanding = p.outstanding.saturating_sub(conns.len());
                if !matches!(reason, Returned::Nack | Returned::Stalled) {
                    metrics.failure(reason.label(), conns.len() as u64);
                }
                if reason == Returned::SendError {
                    p.tx = None;
                }
                reroute = conns;
            }
            Report::Message(m) => match m {
                FromWorker::Stats {
                    active,
                    total_requests,
                } => {
                    if let Some(a) = active {
                        p.reported_active = a;
                        p.acked_since_report = 0;
                        p.reports_active = true;
                    }
                    if let Some(t) = total_requests {
                        // Cumulative per process: add the delta; a smaller value means the
                        // worker's own counter restarted, so all of it is new.
                        let delta = if t >= p.reported_requests {
                            t - p.reported_requests
                        } else {
                            t
                        };
                        p.reported_requests = t;
                        sm.requests.inc_by(delta);
                    }
                }
                FromWorker::SocketCount(n) => {
                    if !p.reports_active {
                        p.reported_active = n;
                        p.acked_since_report = 0;
                    }
                }
                FromWorker::Request => sm.requests.inc(),
                FromWorker::Heartbeat => p.last_heartbeat = Some(Instant::now()),
                FromWorker::Ready => {
                    if wait_ready && !p.ready && p.tx.is_some() {
                        p.ready = true;
                        became_ready = true;
                    }
                }
                FromWorker::Malformed => metrics.dropped("malformed"),
                FromWorker::Other | FromWorker::OtherInternal => metrics.dropped("ignored"),
                FromWorker::HandleAck | FromWorker::HandleNack | FromWorker::Handle => {}
            },
            Report::Stalled => {
                p.stalled = true;
                tracing::warn!(
                    slot,
                    pid = p.pid,
                    "worker has not answered a handoff for {:?}; no new connections until it does",
                    self.settings.stall_timeout
                );
            }
            Report::Recovered => {
                p.stalled = false;
                tracing::info!(slot, pid = p.pid, "stalled worker answers again");
                flush = true;
            }
            Report::Desync => {
                metrics.dropped("desync");
                if p.term_sent.is_none() && !p.exited {
                    tracing::error!(
                        slot,
                        pid = p.pid,
                        "worker answered a handoff that was never sent; its channel cannot be trusted, replacing it"
                    );
                    p.ready = false;
                    p.tx = None;
                    spawn::signal_group(p.pid, Signal::SIGTERM);
                    p.term_sent = Some(Instant::now());
                }
            }
            Report::TooLong => metrics.dropped("too_long"),
            Report::StrayFd => metrics.dropped("stray_fd"),
            Report::Closed => {
                p.channel_closed = true;
                p.tx = None;
                p.ready = false;
                if !p.exited && p.term_sent.is_none() {
                    // A worker without its channel can never get a connection again.
                    tracing::warn!(slot, pid = p.pid, "worker closed its channel; stopping it");
                    spawn::signal_group(p.pid, Signal::SIGTERM);
                    p.term_sent = Some(Instant::now());
                }
                self.cleanup(slot);
            }
        }
        for h in reroute {
            self.route(h, is_current.then_some(slot));
        }
        if became_ready {
            self.on_ready(slot, generation);
        } else if flush {
            self.flush_waiting();
        }
        self.update_slot(slot);
        self.update_active(slot);
    }

    /// A process in `slot` became ready.
    fn on_ready(&mut self, slot: usize, generation: u64) {
        let s = &mut self.slots[slot];
        if s.incoming
            .as_ref()
            .is_some_and(|p| p.generation == generation)
        {
            // Rolling replacement: switch the slot to the new worker, drain the old one.
            let new = s.incoming.take().expect("checked");
            if let Some(old) = s.current.replace(new) {
                self.drain(slot, old);
            }
            self.shared.metrics.slots[slot].restarts.inc();
            tracing::info!(
                slot,
                pid = self.slots[slot].current.as_ref().map(|p| p.pid),
                "replacement worker ready"
            );
            if self.roll.as_ref().is_some_and(|r| r.slot == slot) {
                self.advance_roll(slot + 1);
            }
        } else {
            tracing::info!(
                slot,
                pid = s.current.as_ref().map(|p| p.pid),
                "worker ready"
            );
        }
        self.slots[slot].state = SlotState::Ready;
        self.update_slot(slot);
        self.flush_waiting();
    }

    /// Stops sending to `old`, asks it to finish, and keeps it until it is gone.
    fn drain(&mut self, slot: usize, mut old: Proc) {
        old.tx = None; // the dispatch task hands back what it could not deliver
        old.ready = false;
        if !old.exited {
            spawn::signal_group(old.pid, Signal::SIGTERM);
            old.term_sent = Some(Instant::now());
        }
        tracing::info!(slot, pid = old.pid, "draining old worker");
        self.slots[slot].draining.push(old);
    }

    fn on_exit(&mut self, slot: usize, generation: u64, status: Option<ExitStatus>) {
        let how = status.map_or_else(|| "unknown status".to_string(), describe_status);
        let s = &mut self.slots[slot];
        let now = Instant::now();
        if s.current
            .as_ref()
            .is_some_and(|p| p.generation == generation)
        {
            let p = s.current.as_mut().expect("checked");
            p.exited = true;
            p.ready = false;
            p.tx = None;
            let ran = now - p.started;
            let expected = p.term_sent.is_some() || self.shutting_down.is_some();
            if !expected {
                tracing::warn!(
                    slot,
                    pid = p.pid,
                    "worker exited unexpectedly ({how}) after {:.1}s",
                    ran.as_secs_f64()
                );
            }
            let old = s.current.take().expect("checked");
            s.draining.push(old); // kept until its channel reports closed
            if self.shutting_down.is_none() {
                self.schedule_respawn(slot, now, ran);
            }
        } else if s
            .incoming
            .as_ref()
            .is_some_and(|p| p.generation == generation)
        {
            let p = s.incoming.take().expect("checked");
            tracing::warn!(
                slot,
                pid = p.pid,
                "replacement worker exited before it was ready ({how}); keeping the old one"
            );
            let mut p = p;
            p.exited = true;
            s.draining.push(p);
            if self.roll.as_ref().is_some_and(|r| r.slot == slot) {
                tracing::warn!("rolling restart stopped at slot {slot}");
                self.roll = None;
            }
        } else if let Some(p) = s.draining.iter_mut().find(|p| p.generation == generation) {
            p.exited = true;
            tracing::info!(slot, pid = p.pid, "old worker exited ({how})");
        }
        self.cleanup(slot);
        self.update_slot(slot);
        self.update_active(slot);
    }

    /// Decides when `slot` gets a new worker after an unexpected exit.
    fn schedule_respawn(&mut self, slot: usize, now: Instant, ran: Duration) {
        let s = &mut self.slots[slot];
        match s.restart.on_exit(now, ran) {
            Next::Failed(cooldown) => {
                let guard = self.settings.crash_loop;
                tracing::error!(
                    slot,
                    "worker crash loop: {} exits within {:?}; slot marked failed, retrying in {cooldown:?}",
                    guard.exits,
                    guard.window
                );
                s.state = SlotState::Failed;
                s.respawn_at = Some(now + cooldown);
            }
            Next::Respawn(delay) => {
                tracing::info!(slot, "respawning in {delay:?}");
                s.state = SlotState::Backoff;
                s.respawn_at = Some(now + delay);
            }
        }
    }

    /// Spawns a worker for `slot`, as its current worker or as an incoming replacement.
    fn spawn_into(&mut self, slot: usize, incoming: bool) -> bool {
        let s = &mut self.slots[slot];
        let generation = s.next_generation;
        s.next_generation += 1;
        // Workers built on lb::worker beat three times per heartbeat timeout.
        let beat_ms = (self.settings.heartbeat_timeout.as_millis() / 3)
            .max(10)
            .to_string();
        let spawned = match spawn::spawn_worker(&self.argv, slot, &[("LB_HEARTBEAT_MS", beat_ms)]) {
            Ok(sp) => sp,
            Err(e) => {
                tracing::error!(slot, "cannot start worker `{}`: {e}", self.argv[0]);
                if !incoming {
                    self.schedule_respawn(slot, Instant::now(), Duration::ZERO);
                    self.update_slot(slot);
                }
                return false;
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let reports = self.reports_tx.clone();
        let limits = dispatch::Limits {
            window: HANDOFF_WINDOW,
            max_line: DEFAULT_MAX_LINE,
            stall_timeout: self.settings.stall_timeout,
        };
        tokio::spawn(dispatch::run(
            slot,
            generation,
            spawned.channel,
            rx,
            reports,
            limits,
        ));
        let mut child = spawned.child;
        let exits = self.exits_tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let _ = exits.send((slot, generation, status));
        });
        let ready = !self.settings.wait_ready;
        let proc = Proc {
            generation,
            pid: spawned.pid,
            tx: Some(tx),
            started: Instant::now(),
            ready: false,
            exited: false,
            channel_closed: false,
            outstanding: 0,
            reported_requests: 0,
            reported_active: 0,
            acked_since_report: 0,
            reports_active: false,
            last_heartbeat: None,
            stalled: false,
            term_sent: None,
            killed: false,
        };
        tracing::debug!(slot, pid = proc.pid, generation, "spawned worker");
        let s = &mut self.slots[slot];
        s.respawn_at = None;
        if incoming {
            s.incoming = Some(proc);
        } else {
            if generation > 0 {
                self.shared.metrics.slots[slot].restarts.inc();
            }
            s.current = Some(proc);
            s.state = SlotState::Starting;
        }
        if ready {
            let s = &mut self.slots[slot];
            let p = if incoming {
                s.incoming.as_mut()
            } else {
                s.current.as_mut()
            };
            p.expect("just set").ready = true;
            self.on_ready(slot, generation);
        } else {
            self.update_slot(slot);
        }
        true
    }

    /// SIGUSR2: replace every slot's worker, one slot at a time.
    fn begin_roll(&mut self) {
        if self.shutting_down.is_some() {
            return;
        }
        if self.roll.is_some() {
            tracing::info!("SIGUSR2: a rolling restart is already in progress");
            return;
        }
        tracing::info!("SIGUSR2: rolling restart of {} workers", self.slots.len());
        self.advance_roll(0);
    }

    /// Starts the replacement of the first slot at or after `from` that has a live worker.
    fn advance_roll(&mut self, from: usize) {
        self.roll = None;
        for slot in from..self.slots.len() {
            if self.slots[slot].current.is_none() || self.slots[slot].incoming.is_some() {
                continue; // down or already being replaced: it gets a fresh worker anyway
            }
            self.roll = Some(Roll { slot });
            if self.spawn_into(slot, true) {
                return;
            }
            tracing::warn!("rolling restart stopped at slot {slot}: cannot start a new worker");
            self.roll = None;
            return;
        }
        tracing::info!("rolling restart complete");
    }

    /// Replaces one slot's worker gracefully (e.g. over its memory limit).
    fn replace(&mut self, slot: usize, why: &str) {
        let s = &self.slots[slot];
        if s.incoming.is_some() || s.current.is_none() {
            return;
        }
        tracing::warn!(
            slot,
            pid = s.current.as_ref().map(|p| p.pid),
            "replacing worker: {why}"
        );
        self.spawn_into(slot, true);
    }

    fn begin_shutdown(&mut self, why: &str) {
        if self.shutting_down.is_some() {
            tracing::info!("{why} again: shutdown already in progress");
            return;
        }
        tracing::info!(
            "{why}: graceful shutdown (timeout {:?})",
            self.settings.shutdown_timeout
        );
        self.shutting_down = Some(Instant::now());
        self.roll = None;
        // Give queued connections to a ready worker if there is one; otherwise close them.
        let waiting: Vec<_> = self.waiting.drain(..).collect();
        for h in waiting {
            self.route(h, None);
        }
        self.shared.metrics.queued.set(0);
        for s in &mut self.slots {
            s.respawn_at = None;
            s.state = SlotState::Stopped;
        }
        self.shutdown_step(Instant::now(), Instant::now());
    }

    fn shutdown_step(&mut self, started: Instant, now: Instant) {
        // SIGTERM, except to a worker that still has handoffs unanswered (e.g. the queued
        // connections just handed on): it gets it once they are answered, so it does not refuse
        // them while draining, or after the stall timeout.
        let settle = now - started >= self.settings.stall_timeout;
        for s in &mut self.slots {
            for p in s
                .current
                .iter_mut()
                .chain(s.incoming.iter_mut())
                .chain(s.draining.iter_mut())
            {
                if !p.exited && p.term_sent.is_none() && (p.outstanding == 0 || settle) {
                    spawn::signal_group(p.pid, Signal::SIGTERM);
                    p.term_sent = Some(now);
                }
            }
        }
        if now - started < self.settings.shutdown_timeout || self.shutdown_killed {
            return;
        }
        self.shutdown_killed = true;
        for s in &mut self.slots {
            for p in s
                .current
                .iter_mut()
                .chain(s.incoming.iter_mut())
                .chain(s.draining.iter_mut())
            {
                if !p.exited && !p.killed {
                    tracing::warn!(
                        pid = p.pid,
                        "worker still running after the shutdown timeout; killing it"
                    );
                    spawn::signal_group(p.pid, Signal::SIGKILL);
                    p.killed = true;
                }
            }
        }
    }

    fn all_gone(&self) -> bool {
        self.slots.iter().all(|s| {
            s.current.as_ref().is_none_or(Proc::gone)
                && s.incoming.as_ref().is_none_or(Proc::gone)
                && s.draining.iter().all(Proc::gone)
        })
    }

    /// Respawns, ready timeouts, drain kills.
    fn run_timers(&mut self, now: Instant) {
        for slot in 0..self.slots.len() {
            if self.shutting_down.is_none()
                && self.slots[slot].current.is_none()
                && self.slots[slot].respawn_at.is_some_and(|t| t <= now)
            {
                self.spawn_into(slot, false);
            }
            let timeout = self.settings.ready_timeout;
            let s = &mut self.slots[slot];
            // A worker that does not get ready in time is stopped (and respawned, or the roll ends).
            for (is_incoming, p) in [(false, s.current.as_mut()), (true, s.incoming.as_mut())] {
                if let Some(p) = p
                    && !p.ready
                    && !p.exited
                    && p.term_sent.is_none()
                    && now - p.started > timeout
                {
                    tracing::warn!(
                        slot,
                        pid = p.pid,
                        "worker not ready after {timeout:?}; stopping it"
                    );
                    spawn::signal_group(p.pid, Signal::SIGKILL);
                    p.term_sent = Some(now);
                    p.killed = true;
                    if is_incoming && self.roll.as_ref().is_some_and(|r| r.slot == slot) {
                        tracing::warn!(
                            "rolling restart stopped at slot {slot}: the new worker never got ready"
                        );
                        self.roll = None;
                    }
                }
            }
            let grace = self.settings.shutdown_timeout;
            for p in &mut s.draining {
                if !p.exited && !p.killed && p.term_sent.is_some_and(|t| now - t > grace) {
                    tracing::warn!(
                        slot,
                        pid = p.pid,
                        "old worker did not exit within {grace:?}; killing it"
                    );
                    spawn::signal_group(p.pid, Signal::SIGKILL);
                    p.killed = true;
                }
            }
        }
        // Connections that waited too long for a worker are closed.
        let limit = self.settings.queue_timeout;
        let mut expired = 0;
        while self
            .waiting
            .front()
            .is_some_and(|h| now - h.accepted >= limit)
        {
            self.waiting.pop_front();
            expired += 1;
        }
        if expired > 0 {
            self.shared.metrics.failure("no_worker", expired);
            self.shared.metrics.queued.set(self.waiting.len() as i64);
            tracing::warn!(
                "closed {expired} connection(s) after waiting {limit:?} for a ready worker"
            );
        }
    }

    /// Memory sampling and heartbeat checks.
    fn housekeeping(&mut self, now: Instant) {
        let hb = self.settings.heartbeat_timeout;
        for slot in 0..self.slots.len() {
            let Some(p) = self.slots[slot].current.as_mut() else {
                self.shared.metrics.slots[slot].memory.set(0);
                continue;
            };
            if p.exited {
                continue;
            }
            if let Some(last) = p.last_heartbeat
                && now - last > hb
                && !p.killed
            {
                tracing::warn!(
                    slot,
                    pid = p.pid,
                    "no heartbeat for {:?}; killing the worker",
                    now - last
                );
                spawn::signal_group(p.pid, Signal::SIGKILL);
                p.killed = true;
                p.term_sent = Some(now);
                p.ready = false;
                continue;
            }
            if !p.reports_active
                && let Some(tx) = &p.tx
            {
                // An unmodified Node worker counts the sockets we sent it: ask.
                let _ = tx.send(ToWorker::QuerySocketCount);
            }
            let rss = crate::metrics::rss_bytes(p.pid).unwrap_or(0);
            self.shared.metrics.slots[slot].memory.set(rss as i64);
            if let Some(limit) = self.settings.max_memory
                && rss > limit
                && self.shutting_down.is_none()
            {
                self.replace(
                    slot,
                    &format!("RSS {rss} bytes exceeds --max-memory {limit}"),
                );
            }
        }
    }

    fn next_deadline(&self, housekeeping: Instant) -> Instant {
        let mut d = housekeeping;
        if let Some(t) = self.accept_paused_until {
            d = d.min(t);
        }
        if let Some(h) = self.waiting.front() {
            d = d.min(h.accepted + self.settings.queue_timeout);
        }
        for s in &self.slots {
            if let Some(t) = s.respawn_at {
                d = d.min(t);
            }
        }
        if let Some(t) = self.shutting_down
            && !self.shutdown_killed
        {
            d = d.min(t + self.settings.shutdown_timeout);
            let settle = t + self.settings.stall_timeout;
            if settle > Instant::now() {
                d = d.min(settle);
            }
        }
        d
    }

    /// Forgets processes that have exited and whose channel is closed.
    fn cleanup(&mut self, slot: usize) {
        self.slots[slot].draining.retain(|p| !p.gone());
    }

    fn update_slot(&self, slot: usize) {
        let s = &self.slots[slot];
        let up = s.current.as_ref().is_some_and(Proc::takes_connections);
        self.shared.metrics.slots[slot].up.set(up as i64);
        let live = s.current.as_ref().is_some_and(|p| !p.exited);
        let state = match s.state {
            _ if up => "ready",
            _ if s.current.as_ref().is_some_and(|p| p.stalled && !p.exited) => "stalled",
            SlotState::Stopped if live => "draining",
            SlotState::Stopped => "exited",
            SlotState::Failed => "failed",
            SlotState::Backoff => "backoff",
            SlotState::Starting | SlotState::Ready if live => "starting",
            SlotState::Starting | SlotState::Ready => "backoff",
        };
        let cur = s.current.as_ref();
        self.shared.set_slot(
            slot,
            SlotView {
                pid: cur.map(|p| p.pid),
                state,
                started: cur.map(|p| p.started),
                generation: cur.map_or(0, |p| p.generation),
            },
        );
    }

    fn update_active(&self, slot: usize) {
        let s = &self.slots[slot];
        let active: u64 = s
            .current
            .iter()
            .chain(s.draining.iter())
            .filter(|p| !p.exited)
            .map(|p| p.reported_active + p.acked_since_report)
            .sum();
        self.shared.metrics.slots[slot].active.set(active as i64);
    }
}

fn find_proc(slot: &mut Slot, generation: u64) -> Option<&mut Proc> {
    if slot
        .current
        .as_ref()
        .is_some_and(|p| p.generation == generation)
    {
        return slot.current.as_mut();
    }
    if slot
        .incoming
        .as_ref()
        .is_some_and(|p| p.generation == generation)
    {
        return slot.incoming.as_mut();
    }
    slot.draining
        .iter_mut()
        .find(|p| p.generation == generation)
}

fn describe_status(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (_, Some(sig)) => format!(
            "killed by signal {}",
            Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.to_string())
        ),
        _ => s.to_string(),
    }
}

/// The addresses lb actually listens on (for the start-up log line).
pub fn listening_line(listen: SocketAddr, metrics: Option<SocketAddr>) -> String {
    match metrics {
        Some(m) => format!("listening on {listen}, metrics on {m}"),
        None => format!("listening on {listen}, metrics off"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_names_both_addresses() {
        let l = listening_line(
            "127.0.0.1:1".parse().unwrap(),
            Some("127.0.0.1:2".parse().unwrap()),
        );
        assert_eq!(l, "listening on 127.0.0.1:1, metrics on 127.0.0.1:2");
        assert_eq!(
            listening_line("127.0.0.1:1".parse().unwrap(), None),
            "listening on 127.0.0.1:1, metrics off"
        );
    }
}
