//! Where each accepted connection goes: the routing half of the master.
//!
//! The router owns the per-slot routing targets (which worker is the slot's current one and
//! whether it takes connections — published by the supervisor), each worker's
//! [`DispatchHandle`] and load accounting, and the bounded queue of connections waiting for a
//! ready worker. A policy decision reads only a narrow per-slot [`SlotLoad`] built from those;
//! handoff state itself (queue, in flight, NACK retries, stalls) belongs to [`crate::dispatch`].
//!
//! Load accounting (DESIGN §2, §6): a worker's active connections are what it last reported
//! (`stats`, or a Node worker's socket count) plus the connections ACKed since; least-connections
//! adds the handoffs it has not confirmed. Cumulative request counts become per-slot deltas, so
//! `lb_worker_requests_total` never goes backwards across restarts.
//!
//! A connection is never dropped silently: it goes to a worker, waits in the queue, or is closed
//! and counted (`no_worker`, `queue_full`).
//!
//! This file holds the router's state and what workers tell it; the decision itself — where a
//! connection goes, the wait queue, `lb route --live` — is in `router/route.rs`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::balance::{Balancer, Policy, SlotLoad};
use crate::channel::{SioMessage, WorkerMsg};
use crate::config::{Settings, StalledSticky};
use crate::dispatch::{DispatchHandle, Handoff, Returned};
use crate::held::Held;
use crate::loglimit::LogLimit;
use crate::metrics::{Dropped, Shared, SlotMetrics};
use crate::sessions::Sessions;
use crate::silence::Watch;
use crate::slot::{SlotState, SlotView, WorkerId};

mod route;

/// Workers a connection may be offered to before it is closed.
const MAX_DISPATCHES: u8 = 8;

/// Whether a slot's current worker may get connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Target {
    /// No worker, or one that is starting or going away.
    #[default]
    Down,
    /// Takes connections.
    Up,
    /// Ready, but not answering handoffs for now.
    Stalled,
}

/// A worker lb still tracks (current, incoming or retiring), as routing sees it.
#[derive(Debug)]
struct Link {
    id: WorkerId,
    /// Whether it serves anyone at all ([`crate::silence`]).
    watch: Watch,
    /// Its dispatch task (kept until the worker is gone: cluster messages still go through it).
    dispatch: DispatchHandle,
    /// May get new connections (false once the supervisor detached it or its channel closed).
    routable: bool,
    /// The process exited: its connections no longer count as active.
    exited: bool,
    /// Its channel closed: nothing more comes from it (forgotten once it exited too).
    closed: bool,
    /// What it told lb (carried across an in-place upgrade as it is).
    known: Known,
    /// What it holds, counted in the kernel (when it reports nothing itself, see [`Held`]).
    held: Held,
}

impl Link {
    /// Hands `h` to this worker's dispatch (noting the first few for [`crate::silence`]).
    fn hand(&mut self, h: Handoff) -> Result<(), Handoff> {
        if self.counted_in_kernel() {
            self.held.note(&h.stream);
        }
        let addrs = if self.watch.wants_sample() {
            h.stream.local_addr().ok().zip(h.stream.peer_addr().ok())
        } else {
            None
        };
        self.dispatch.send(h)?;
        self.watch.handed(addrs, Instant::now);
        Ok(())
    }

    /// A cluster worker that gets `newconn`s and reports no count: lb counts in the kernel.
    fn counted_in_kernel(&self) -> bool {
        self.known.rr_key.is_some() && !self.known.reports_active
    }

    fn active(&self) -> u64 {
        if self.exited {
            0
        } else {
            self.known.reported_active + self.known.acked_since_report
        }
    }

    fn pending(&self) -> usize {
        self.dispatch.pending()
    }
}

/// What a worker told routing: its cluster keys, its socket.io adapters, its last counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Known {
    /// The key of its server on lb's port: answered, not yet `listening`.
    pub rr_pending: Option<String>,
    /// The key connections go to as `newconn`s (it is `listening` on lb's port).
    pub rr_key: Option<String>,
    /// Its socket.io adapters' uids (for relaying responses to their requester).
    pub sio_uids: Vec<String>,
    /// Last `activeConnections` it reported.
    pub reported_active: u64,
    /// ACKs since that report (the report does not include them yet).
    pub acked_since_report: u64,
    /// It reports `activeConnections` itself; otherwise lb asks Node's socket count.
    pub reports_active: bool,
    /// Last cumulative `totalRequests` it reported (so that its next report counts only what
    /// is new).
    pub reported_requests: u64,
}

/// What routing knows of a worker, carried across an in-place upgrade (the state document's
/// fields are `Known`'s, flattened, and `held`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CarriedLink {
    /// What it told routing (its fields sit at the top level of the document).
    #[serde(flatten)]
    pub known: Known,
    /// The connections it held at the last look, when lb counts them in the kernel.
    #[serde(default)]
    pub held: Vec<crate::held::Pair>,
}

/// Routing state of the master.
pub struct Router {
    /// Rate limits for the two warnings a fault can repeat thousands of times a second.
    refused_log: LogLimit,
    expired_log: LogLimit,
    balancer: Balancer,
    balancer_seed: u64,
    policy: Policy,
    sticky_stalled: StalledSticky,
    max_pending: usize,
    max_queue: usize,
    queue_timeout: Duration,
    /// Per slot: its current worker and whether it takes connections.
    targets: Vec<(Option<WorkerId>, Target)>,
    /// Per slot: the workers still tracked.
    links: Vec<Vec<Link>>,
    /// Connections waiting for a ready worker, oldest first.
    waiting: VecDeque<Handoff>,
    /// Scratch for the policy (one entry per slot).
    loads: Vec<SlotLoad>,
    /// Shutting down: nothing waits any more.
    closing: bool,
    /// Something waits while a ready worker is at `--max-pending`: an ACK makes room.
    waiting_for_room: bool,
    /// Slots `0..active` take connections (the rest drain after `lb scale`).
    active: usize,
    /// Per-slot metric handles (looked up once: the ACK path takes no lock).
    slot_metrics: Vec<Arc<SlotMetrics>>,
    shared: Arc<Shared>,
    /// `--handoff socket.io`: workers report sessions; least-connections counts them and a
    /// request naming a session goes to its worker.
    sio: bool,
    /// The socket.io sessions each worker owns.
    sessions: Sessions,
}

impl Router {
    /// A router for `settings`, reporting into `shared`.
    pub fn new(settings: &Settings, shared: Arc<Shared>) -> Self {
        let n = settings.workers;
        Self {
            refused_log: LogLimit::default(),
            expired_log: LogLimit::default(),
            balancer: Balancer::new(settings.policy, settings.hash_seed)
                .with_factor(settings.balance_factor),
            balancer_seed: settings.hash_seed,
            policy: settings.policy,
            sticky_stalled: settings.sticky_stalled,
            max_pending: settings.max_pending,
            max_queue: settings.max_queue,
            queue_timeout: settings.queue_timeout,
            targets: vec![(None, Target::Down); n],
            links: (0..n).map(|_| Vec::new()).collect(),
            waiting: VecDeque::new(),
            loads: vec![SlotLoad::default(); n],
            closing: false,
            waiting_for_room: false,
            active: n,
            slot_metrics: (0..n).map(|i| shared.metrics.slot(i)).collect(),
            shared,
            sio: settings.handoff == crate::channel::HandoffMsg::SocketIo,
            sessions: Sessions::default(),
        }
    }

    /// New settings (a config reload): policy, seed, limits and timeouts apply from now on.
    pub fn reconfigure(&mut self, settings: &Settings) {
        if settings.policy != self.policy || settings.hash_seed != self.balancer_seed {
            self.balancer = Balancer::new(settings.policy, settings.hash_seed);
        }
        self.balancer = self.balancer.clone().with_factor(settings.balance_factor);
        self.policy = settings.policy;
        self.balancer_seed = settings.hash_seed;
        self.sticky_stalled = settings.sticky_stalled;
        self.max_pending = settings.max_pending;
        self.max_queue = settings.max_queue;
        self.queue_timeout = settings.queue_timeout;
        self.sio = settings.handoff == crate::channel::HandoffMsg::SocketIo;
    }

    /// `lb scale`: slots `0..active` take connections, the table has `total` slots.
    pub fn resize(&mut self, active: usize, total: usize) {
        self.targets.resize(total, (None, Target::Down));
        self.links.resize_with(total, Vec::new);
        self.loads.resize(total, SlotLoad::default());
        self.slot_metrics.truncate(total);
        while self.slot_metrics.len() < total {
            let i = self.slot_metrics.len();
            self.slot_metrics.push(self.shared.metrics.slot(i));
        }
        self.active = active.min(total);
        self.flush_waiting();
    }

    /// A new worker's dispatch.
    pub fn attach(&mut self, id: WorkerId, dispatch: DispatchHandle) {
        self.adopt(id, dispatch, CarriedLink::default());
    }

    /// A worker lb's previous image routed to (or a new one, with the default).
    pub fn adopt(&mut self, id: WorkerId, dispatch: DispatchHandle, c: CarriedLink) {
        if self.links.len() <= id.slot {
            self.links.resize_with(id.slot + 1, Vec::new);
        }
        self.links[id.slot].retain(|l| l.id != id);
        self.links[id.slot].push(Link {
            id,
            dispatch,
            routable: true,
            exited: false,
            closed: false,
            known: c.known,
            held: Held::from_vec(c.held),
            watch: Watch::default(),
        });
        self.update_active(id.slot);
        self.flush_waiting();
    }

    /// What routing knows of worker `id`, for lb's next image.
    pub fn carry(&self, id: WorkerId) -> Option<(DispatchHandle, CarriedLink)> {
        let l = self.links.get(id.slot)?.iter().find(|l| l.id == id)?;
        Some((
            l.dispatch.clone(),
            CarriedLink {
                known: l.known.clone(),
                held: l.held.to_vec(),
            },
        ))
    }

    /// Nothing waits in lb and no handoff is unanswered (an in-place upgrade may go ahead).
    pub fn quiescent(&self) -> bool {
        self.waiting.is_empty() && self.links.iter().flatten().all(|l| l.pending() == 0)
    }

    /// The worker gets no new connections (its dispatch hands back what it holds).
    pub fn detach(&mut self, id: WorkerId) {
        if let Some(l) = self.link(id)
            && l.routable
        {
            l.routable = false;
            l.dispatch.detach();
        }
    }

    /// The worker's process exited.
    pub fn exited(&mut self, id: WorkerId) {
        if let Some(l) = self.link(id) {
            l.exited = true;
            // A descendant may hold the channel open: the exit alone ends it.
            l.dispatch.exited();
        }
        // Its socket.io sessions died with it.
        self.sessions.forget(id);
        self.update_sessions(id.slot);
        self.forget_gone(id.slot);
    }

    /// The worker's channel closed: nothing more will come from it.
    pub fn closed(&mut self, id: WorkerId) {
        if let Some(l) = self.link(id) {
            l.closed = true;
            l.routable = false;
        }
        self.forget_gone(id.slot);
    }

    fn forget_gone(&mut self, slot: usize) {
        if let Some(ls) = self.links.get_mut(slot) {
            ls.retain(|l| !(l.exited && l.closed));
            self.update_active(slot);
        }
    }

    /// The supervisor published a slot's new view.
    pub fn publish(&mut self, slot: usize, view: &SlotView) {
        let target = match view.state {
            SlotState::Ready => Target::Up,
            SlotState::Stalled => Target::Stalled,
            _ => Target::Down,
        };
        self.targets[slot] = (view.current, target);
        if target == Target::Up {
            self.flush_waiting();
        }
    }

    /// Whether the worker has handoffs it has not answered.
    pub fn busy(&self, id: WorkerId) -> bool {
        self.links
            .get(id.slot)
            .is_some_and(|ls| ls.iter().any(|l| l.id == id && l.pending() > 0))
    }

    /// Shutdown: hand what waits to a ready worker if there is one, else close it; from now on
    /// nothing waits.
    pub fn close(&mut self) {
        self.closing = true;
        self.flush_waiting();
    }

    /// The worker ACKed a connection.
    pub fn acked(&mut self, id: WorkerId, accepted: Instant) {
        self.slot_metrics[id.slot].connections.inc();
        self.shared
            .metrics
            .handoff_duration
            .observe(accepted.elapsed().as_secs_f64());
        if let Some(l) = self.link(id) {
            l.known.acked_since_report += 1;
            self.update_active(id.slot);
            // Room again under --max-pending for what waits because of it.
            if self.waiting_for_room {
                self.waiting_for_room = false;
                self.flush_waiting();
            }
        }
    }

    /// The worker's dispatch handed connections back.
    pub fn returned(&mut self, id: WorkerId, conns: Vec<Handoff>, why: Returned) {
        if let Some(f) = why.failure() {
            self.shared.metrics.failure(f, conns.len() as u64);
        }
        if why == Returned::SendError {
            self.detach(id); // its channel failed: send it nothing more
        }
        // A connection the slot's current worker did not take goes to another slot; one a
        // retiring worker hands back belongs to its slot's new worker.
        let exclude = (self.targets.get(id.slot).and_then(|t| t.0) == Some(id)).then_some(id.slot);
        for h in conns {
            self.route(h, exclude);
        }
    }

    /// A message from the worker that concerns load or counts. Returns false for messages the
    /// router does not handle (heartbeat, ready: the supervisor's).
    pub fn message(&mut self, id: WorkerId, msg: &WorkerMsg) -> bool {
        let (Some(sm), Some(links)) = (self.slot_metrics.get(id.slot), self.links.get_mut(id.slot))
        else {
            return true;
        };
        let link = links.iter_mut().find(|l| l.id == id);
        match msg {
            WorkerMsg::Stats {
                active,
                total_requests,
            } => {
                let Some(l) = link else { return true };
                l.watch.spoke();
                if let Some(a) = active {
                    l.known.reported_active = *a;
                    l.known.acked_since_report = 0;
                    l.known.reports_active = true;
                }
                if let Some(t) = *total_requests {
                    // Cumulative per process: add the delta; a smaller value means the worker's
                    // own counter restarted, so all of it is new.
                    let delta = t.checked_sub(l.known.reported_requests).unwrap_or(t);
                    l.known.reported_requests = t;
                    sm.requests.inc_by(delta);
                }
                self.update_active(id.slot);
            }
            WorkerMsg::SocketCount(n) => {
                if let Some(l) = link
                    && !l.known.reports_active
                    && !l.counted_in_kernel()
                {
                    l.known.reported_active = *n;
                    l.known.acked_since_report = 0;
                }
                self.update_active(id.slot);
            }
            WorkerMsg::Request => {
                sm.requests.inc();
                if let Some(l) = link {
                    l.watch.spoke();
                }
            }
            WorkerMsg::Malformed => self.shared.metrics.dropped(Dropped::Malformed),
            WorkerMsg::Other | WorkerMsg::OtherInternal => {
                self.shared.metrics.dropped(Dropped::Ignored)
            }
            WorkerMsg::SocketIo(m) => self.relay(id, m),
            WorkerMsg::SessionOpened(sid) => {
                if let Some(l) = link {
                    l.watch.spoke();
                }
                if !self.sessions.opened(id, sid) && self.sessions.ignored == 1 {
                    tracing::warn!(
                        "{} socket.io sessions known: new ones are not routed by their sid until some end",
                        crate::sessions::MAX_SESSIONS
                    );
                }
                self.update_sessions(id.slot);
            }
            WorkerMsg::SessionClosed(sid) => {
                self.sessions.closed(id, sid);
                self.update_sessions(id.slot);
            }
            WorkerMsg::SocketIoSticky => {}
            WorkerMsg::Heartbeat
            | WorkerMsg::Ready
            | WorkerMsg::Leaving
            | WorkerMsg::AppMetrics { .. } => return false,
        }
        true
    }

    /// Relays a socket.io cluster-adapter message as the adapter's `setupPrimary()` does: a
    /// response (types 8 and 10) to the first worker whose adapter made the request, anything
    /// else to every other live worker; the line is passed on unchanged.
    fn relay(&mut self, from: WorkerId, m: &SioMessage) {
        if let Some(uid) = &m.uid
            && let Some(l) = self.link(from)
            && !l.known.sio_uids.contains(uid)
        {
            l.known.sio_uids.push(uid.clone());
        }
        // One copy, shared by every recipient.
        let line = bytes::Bytes::from(m.line.clone());
        let live = self
            .links
            .iter()
            .flatten()
            .filter(|l| !l.exited && !l.closed && l.id != from);
        if matches!(m.kind, 8 | 10) {
            if let Some(l) = live.into_iter().find(|l| {
                m.requester_uid
                    .as_ref()
                    .is_some_and(|r| l.known.sio_uids.contains(r))
            }) {
                l.dispatch.line(line);
            }
        } else {
            for l in live {
                l.dispatch.line(line.clone());
            }
        }
    }

    /// Workers due for the look of [`crate::silence`]: each with how many connections it was
    /// handed and the (local, peer) addresses of the first few.
    pub fn due_for_silence_check(
        &mut self,
        now: Instant,
    ) -> Vec<(WorkerId, u64, Vec<crate::silence::Conn>)> {
        self.links
            .iter_mut()
            .flatten()
            .filter(|l| !l.exited && !l.closed)
            .filter_map(|l| Some((l.id, l.watch.handed, l.watch.due(now)?)))
            .collect()
    }

    /// Sends a line to every live worker (the heartbeat ping).
    pub fn broadcast(&self, line: &bytes::Bytes) {
        for l in self.links.iter().flatten() {
            if !l.exited && !l.closed {
                l.dispatch.line(line.clone());
            }
        }
    }

    /// Workers whose process and channel are alive (current, incoming and retiring ones).
    pub fn live_workers(&self) -> Vec<WorkerId> {
        self.links
            .iter()
            .flatten()
            .filter(|l| !l.exited && !l.closed)
            .map(|l| l.id)
            .collect()
    }

    /// The worker's dispatch (for cluster-protocol messages).
    pub fn dispatch(&self, id: WorkerId) -> Option<&DispatchHandle> {
        self.links
            .get(id.slot)?
            .iter()
            .find(|l| l.id == id)
            .map(|l| &l.dispatch)
    }

    /// The worker's `listen()` on lb's port was answered with `key`.
    pub fn rr_answered(&mut self, id: WorkerId, key: String) {
        if let Some(l) = self.link(id) {
            l.known.rr_pending = Some(key);
        }
    }

    /// The worker reports a server listening. Returns true when it is its server on lb's port:
    /// from now on it gets connections as `newconn`s for that key.
    pub fn rr_listening(&mut self, id: WorkerId, key: &str) -> bool {
        let Some(l) = self.link(id) else { return false };
        if l.known.rr_pending.as_deref() != Some(key) {
            return false;
        }
        l.known.rr_key = l.known.rr_pending.take();
        l.dispatch.rr_key(l.known.rr_key.clone());
        true
    }

    /// The worker closed a server. Its server on lb's port closing means it takes no more
    /// connections (as Node's primary stops routing that key to it).
    pub fn rr_closed(&mut self, id: WorkerId, key: &str) {
        let closes_ours = self.link(id).is_some_and(|l| {
            l.known.rr_key.as_deref() == Some(key) || l.known.rr_pending.as_deref() == Some(key)
        });
        if closes_ours {
            self.detach(id);
        }
    }

    /// Asks every worker that does not report its active connections for its socket count.
    pub fn query_socket_counts(&self) {
        for l in self.links.iter().flatten() {
            if !l.known.reports_active && !l.counted_in_kernel() && !l.exited && l.routable {
                l.dispatch.query_socket_count();
            }
        }
    }

    /// Some worker's connections are counted in the kernel ([`Held`]): look once a second.
    pub fn counts_in_kernel(&self) -> bool {
        self.links
            .iter()
            .flatten()
            .any(|l| l.counted_in_kernel() && !l.exited)
    }

    /// What the kernel says is open: the active counts of the workers counted there.
    pub fn kernel_counts(&mut self, open: &std::collections::HashSet<crate::held::Pair>) {
        for slot in 0..self.links.len() {
            let mut changed = false;
            for l in &mut self.links[slot] {
                if l.counted_in_kernel() {
                    l.known.reported_active = l.held.refresh(open);
                    l.known.acked_since_report = 0;
                    changed = true;
                }
            }
            if changed {
                self.update_active(slot);
            }
        }
    }

    fn link(&mut self, id: WorkerId) -> Option<&mut Link> {
        self.links.get_mut(id.slot)?.iter_mut().find(|l| l.id == id)
    }

    /// `lb_worker_sessions` of the slot: what its workers own.
    fn update_sessions(&self, slot: usize) {
        if let (Some(ls), Some(sm)) = (self.links.get(slot), self.slot_metrics.get(slot)) {
            let n: usize = ls.iter().map(|l| self.sessions.count(l.id)).sum();
            sm.sessions.set(n as i64);
        }
    }

    fn update_active(&self, slot: usize) {
        if let Some(ls) = self.links.get(slot) {
            let active: u64 = ls.iter().map(Link::active).sum();
            self.slot_metrics[slot].active.set(active as i64);
        }
    }
}

#[cfg(test)]
mod tests;
