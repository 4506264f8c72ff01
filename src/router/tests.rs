//! The router with real dispatch tasks on `UnixStream::pair()` channels (the fake workers never
//! answer, so every handoff stays pending and shows where it went): the policy, the wait queue,
//! stalled sticky clients, socket.io sessions.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::*;
use crate::balance::StickyHash;
use crate::config::RunArgs;
use crate::dispatch::{self, Limits};

struct World {
    router: Router,
    ids: Vec<WorkerId>,
    /// The fake workers' ends (kept open).
    _workers: Vec<UnixStream>,
    shared: Arc<Shared>,
    _listener: std::net::TcpListener,
    addr: SocketAddr,
    seed: u64,
}

fn settings(n: usize, policy: &str, extra: impl FnOnce(&mut RunArgs)) -> Settings {
    let mut run = RunArgs {
        workers: Some(n.to_string()),
        policy: Some(policy.into()),
        queue_timeout: Some("1s".into()),
        ..RunArgs::default()
    };
    extra(&mut run);
    Settings::from_cli(&run, &[]).unwrap()
}

fn world(s: Settings) -> World {
    let shared = Shared::new(s.workers, s.policy);
    let mut router = Router::new(&s, shared.clone());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::mem::forget(rx); // reports are not looked at
    let mut ids = Vec::new();
    let mut workers = Vec::new();
    for slot in 0..s.workers {
        let id = WorkerId {
            slot,
            generation: 1,
        };
        let (master, worker) = UnixStream::pair().unwrap();
        let limits = Limits {
            window: s.max_pending,
            max_line: 1 << 16,
            stall_timeout: Duration::from_secs(60),
            serialization: s.serialization,
            handoff: s.handoff.clone(),
        };
        router.attach(id, dispatch::start(id, master, tx.clone(), limits));
        ids.push(id);
        workers.push(worker);
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    World {
        router,
        ids,
        _workers: workers,
        shared,
        _listener: listener,
        addr,
        seed: s.hash_seed,
    }
}

impl World {
    fn set(&mut self, slot: usize, state: SlotState) {
        let view = SlotView {
            current: Some(self.ids[slot]),
            pid: Some(1000 + slot as u32),
            started: Some(Instant::now()),
            state,
        };
        self.router.publish(slot, &view);
    }

    fn all(&mut self, state: SlotState) {
        for s in 0..self.ids.len() {
            self.set(s, state);
        }
    }

    /// A connection from `ip` (a real socket: lb hands over fds).
    fn conn(&self, ip: IpAddr) -> Handoff {
        let s = std::net::TcpStream::connect(self.addr).unwrap();
        Handoff::new(s, SocketAddr::new(ip, 4000))
    }

    /// The handoffs each worker holds.
    fn pending(&self) -> Vec<usize> {
        self.ids
            .iter()
            .map(|id| {
                self.router.links[id.slot]
                    .iter()
                    .find(|l| l.id == *id)
                    .map_or(0, |l| l.pending())
            })
            .collect()
    }
}

fn ip(i: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, i])
}

#[tokio::test]
async fn sticky_sends_each_client_to_its_rendezvous_slot_and_a_down_slots_clients_move() {
    let mut w = world(settings(3, "sticky", |_| {}));
    w.all(SlotState::Ready);
    let hash = StickyHash::new(w.seed);
    let mut want = [0usize; 3];
    for i in 0..30 {
        want[hash.pick(ip(i), 3, |_| true).unwrap()] += 1;
        w.router.route(w.conn(ip(i)), None);
    }
    assert_eq!(w.pending(), want.to_vec());
    // Slot 1 goes down: its clients go to their next choice; nobody else's move.
    w.set(1, SlotState::Starting);
    let before = w.pending();
    for i in 0..30 {
        if hash.pick(ip(i), 3, |_| true) == Some(1) {
            w.router.route(w.conn(ip(i)), None);
        }
    }
    let after = w.pending();
    assert_eq!(after[1], before[1], "nothing more to the down slot");
    assert_eq!(after[0] + after[2] - before[0] - before[2], want[1]);
}

#[tokio::test]
async fn with_no_ready_worker_connections_wait_then_go_or_expire() {
    let mut w = world(settings(2, "round-robin", |_| {}));
    w.router.route(w.conn(ip(1)), None);
    w.router.route(w.conn(ip(2)), None);
    assert_eq!(w.pending(), [0, 0]);
    assert_eq!(w.shared.metrics.queued.get(), 2);
    assert!(!w.router.quiescent());
    w.set(0, SlotState::Ready);
    assert_eq!(w.pending(), [2, 0], "flushed to the first ready worker");
    assert_eq!(w.shared.metrics.queued.get(), 0);
    // Down again: a newcomer waits, and is closed after --queue-timeout.
    w.set(0, SlotState::Starting);
    let h = w.conn(ip(3));
    let accepted = h.accepted;
    w.router.route(h, None);
    assert_eq!(
        w.router.next_deadline(),
        Some(accepted + Duration::from_secs(1))
    );
    w.router.expire(accepted + Duration::from_secs(1));
    assert_eq!(w.shared.metrics.queued.get(), 0);
    assert!(w.router.next_deadline().is_none());
}

#[tokio::test]
async fn a_stalled_home_sends_sticky_clients_on_or_makes_them_wait() {
    let hash_home = |w: &World, i| StickyHash::new(w.seed).pick(ip(i), 2, |_| true).unwrap();
    for (mode, waits) in [("next", false), ("wait", true)] {
        let mut w = world(settings(2, "sticky", |r| {
            r.sticky_stalled = Some(mode.into())
        }));
        w.all(SlotState::Ready);
        let i = (0..50).find(|&i| hash_home(&w, i) == 0).unwrap();
        w.set(0, SlotState::Stalled);
        w.router.route(w.conn(ip(i)), None);
        if waits {
            assert_eq!(w.pending(), [0, 0], "{mode}: waits for its own worker");
            w.set(0, SlotState::Ready);
            assert_eq!(w.pending(), [1, 0], "{mode}: and gets it back");
        } else {
            assert_eq!(w.pending(), [0, 1], "{mode}: its next choice");
            assert_eq!(w.shared.metrics.slot(0).moved.get(), 1);
        }
    }
}

#[tokio::test]
async fn least_connections_spreads_a_burst_by_what_is_pending() {
    let mut w = world(settings(3, "least-connections", |_| {}));
    w.all(SlotState::Ready);
    for i in 0..9 {
        w.router.route(w.conn(ip(i)), None);
    }
    assert_eq!(w.pending(), [3, 3, 3]);
}

#[tokio::test]
async fn socketio_sessions_route_by_sid_and_count_as_load() {
    let mut w = world(settings(2, "least-connections", |r| {
        r.handoff = Some("socket.io".into())
    }));
    w.all(SlotState::Ready);
    // Worker 1 owns a session; a request naming it goes there whatever the policy says.
    let sid = "AbCdEfGhIjKlMnOp_-12";
    assert!(
        w.router
            .message(w.ids[1], &WorkerMsg::SessionOpened(sid.into()))
    );
    assert_eq!(w.shared.metrics.slot(1).sessions.get(), 1);
    for _ in 0..3 {
        let mut h = w.conn(ip(1));
        h.sid = Some(sid.into());
        w.router.route(h, None);
    }
    assert_eq!(w.pending(), [0, 3]);
    // New sessions go to the least loaded by sessions (handed ones count at once).
    let mut w = world(settings(2, "least-connections", |r| {
        r.handoff = Some("socket.io".into())
    }));
    w.all(SlotState::Ready);
    for i in 0..4 {
        w.router.route(w.conn(ip(i)), None);
    }
    assert_eq!(w.pending(), [2, 2], "a burst spreads");
    // A sid nobody owns goes by the policy; a dead worker's sessions are gone.
    w.router
        .message(w.ids[0], &WorkerMsg::SessionOpened(sid.into()));
    w.router.exited(w.ids[0]);
    assert_eq!(w.shared.metrics.slot(0).sessions.get(), 0);
    assert_eq!(w.router.sessions.owner(sid), None);
}

#[test]
fn what_routing_carries_keeps_the_state_documents_flat_fields() {
    // The state document an older image wrote names these fields at the top level.
    let old = r#"{"rr_pending":null,"rr_key":"4:127.0.0.1:0:tcp4","sio_uids":["a"],
        "reported_active":3,"acked_since_report":1,"reports_active":true,"reported_requests":9}"#;
    let c: CarriedLink = serde_json::from_str(old).unwrap();
    assert_eq!(c.known.rr_key.as_deref(), Some("4:127.0.0.1:0:tcp4"));
    assert_eq!((c.known.reported_active, c.known.reported_requests), (3, 9));
    assert!(c.held.is_empty());
    let v = serde_json::to_value(&c).unwrap();
    assert_eq!(v["sio_uids"][0], "a");
    assert_eq!(v["acked_since_report"], 1);
    assert!(v.get("known").is_none());
    assert_eq!(serde_json::from_value::<CarriedLink>(v).unwrap(), c);
}
