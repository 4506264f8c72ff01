//! The lifecycle core driven by events on a fake clock: every transition, no processes.

use super::*;
use crate::supervisor::backoff::CrashLoop;

const MS: Duration = Duration::from_millis(1);

fn config(workers: usize) -> FleetConfig {
    FleetConfig {
        workers,
        wait_ready: false,
        ready_timeout: Duration::from_secs(30),
        drain_timeout: Duration::from_secs(30),
        heartbeat_timeout: Duration::from_secs(30),
        max_memory: None,
        crash_loop: CrashLoop::default(),
        hold_timeout: Duration::from_secs(2),
        node_workers: false,
        ready_hint: "",
    }
}

/// A fleet plus a fake clock and a fake process table: `Spawn` actions are answered at once
/// with a new pid (or a failure while `fail_spawns`).
struct Harness {
    fleet: Fleet,
    now: Instant,
    next_pid: u32,
    fail_spawns: bool,
    pids: std::collections::HashMap<WorkerId, u32>,
}

impl Harness {
    fn new(cfg: FleetConfig) -> (Self, Vec<Action>) {
        let now = Instant::now();
        let mut h = Self {
            fleet: Fleet::new(cfg, now),
            now,
            next_pid: 100,
            fail_spawns: false,
            pids: Default::default(),
        };
        let acts = h.run();
        (h, acts)
    }

    /// Carries out every pending action the way the shell would; returns them.
    fn run(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(a) = self.fleet.poll_action() {
            out.push(a);
            if let Action::Spawn(id) = a {
                if self.fail_spawns {
                    self.fleet.spawn_failed(id, self.now);
                } else {
                    self.next_pid += 1;
                    self.pids.insert(id, self.next_pid);
                    self.fleet.spawned(id, self.next_pid, self.now);
                }
            }
        }
        out
    }

    fn advance(&mut self, d: Duration) -> Vec<Action> {
        self.now += d;
        self.fleet.tick(self.now);
        self.run()
    }

    /// Runs the clock to the fleet's next deadline (which must exist).
    fn until_deadline(&mut self) -> Vec<Action> {
        let d = self.fleet.next_deadline().expect("a deadline");
        assert!(d >= self.now, "deadline in the past");
        self.now = d;
        self.fleet.tick(self.now);
        let acts = self.run();
        if let Some(next) = self.fleet.next_deadline() {
            assert!(next > self.now, "tick left a deadline at or before now");
        }
        acts
    }

    fn current(&self, slot: usize) -> WorkerId {
        self.fleet.view(slot).current.expect("a current worker")
    }

    fn state(&self, slot: usize) -> SlotState {
        self.fleet.view(slot).state
    }

    /// The process exits and its channel closes (both are needed before it is forgotten).
    fn exit(&mut self, id: WorkerId) -> Vec<Action> {
        self.fleet.on_exit(id, "exit code 1", self.now);
        self.fleet.on_channel_closed(id, self.now);
        self.run()
    }
}

/// A fleet whose first workers all said ready.
fn all_ready(cfg: FleetConfig) -> Harness {
    let n = cfg.workers;
    let (mut h, _) = Harness::new(cfg);
    for s in 0..n {
        h.fleet.on_ready(id(s, 0), h.now);
    }
    h.run();
    h
}

fn signals(acts: &[Action]) -> Vec<(WorkerId, Sig)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Signal { id, sig, .. } => Some((*id, *sig)),
            _ => None,
        })
        .collect()
}

fn spawns(acts: &[Action]) -> Vec<WorkerId> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Spawn(id) => Some(*id),
            _ => None,
        })
        .collect()
}

fn restarts(acts: &[Action]) -> usize {
    acts.iter()
        .filter(|a| matches!(a, Action::Restarted(_)))
        .count()
}

fn id(slot: usize, generation: u64) -> WorkerId {
    WorkerId { slot, generation }
}

#[test]
fn every_slot_starts_and_is_ready_at_once_without_wait_ready() {
    let (h, acts) = Harness::new(config(3));
    assert_eq!(spawns(&acts), [id(0, 0), id(1, 0), id(2, 0)]);
    assert_eq!(restarts(&acts), 0);
    for s in 0..3 {
        assert_eq!(h.state(s), SlotState::Ready);
        assert!(h.fleet.view(s).up());
    }
    assert!(signals(&acts).is_empty());
}

#[test]
fn with_wait_ready_a_worker_starts_then_is_ready_when_it_says_so() {
    let (mut h, _) = Harness::new(FleetConfig {
        wait_ready: true,
        ..config(1)
    });
    assert_eq!(h.state(0), SlotState::Starting);
    assert!(!h.fleet.view(0).up());
    h.fleet.on_ready(id(0, 0), h.now);
    let acts = h.run();
    assert!(acts.contains(&Action::Publish(0)));
    assert_eq!(h.state(0), SlotState::Ready);
}

#[test]
fn a_worker_not_ready_in_time_is_killed_and_respawned_with_backoff() {
    let (mut h, _) = Harness::new(FleetConfig {
        wait_ready: true,
        ready_timeout: Duration::from_secs(1),
        ..config(1)
    });
    let first = h.current(0);
    let acts = h.until_deadline();
    assert_eq!(signals(&acts), [(first, Sig::Kill)]);
    assert!(acts.contains(&Action::Detach(first)));
    // Its exit was expected: respawn after the first backoff step, counted as a restart.
    h.exit(first);
    assert_eq!(h.state(0), SlotState::Backoff);
    let t = h.now;
    let acts = h.until_deadline();
    assert_eq!(h.now - t, 100 * MS);
    assert_eq!(spawns(&acts), [id(0, 1)]);
    assert_eq!(restarts(&acts), 1);
}

#[test]
fn unexpected_exits_back_off_doubling_then_a_crash_loop_marks_the_slot_failed() {
    let (mut h, _) = Harness::new(FleetConfig {
        crash_loop: CrashLoop {
            exits: 4,
            window: Duration::from_secs(60),
        },
        ..config(2)
    });
    let mut delays = Vec::new();
    for _ in 0..3 {
        let w = h.current(1);
        assert!(signals(&h.exit(w)).is_empty());
        assert_eq!(h.state(1), SlotState::Backoff);
        let t = h.now;
        let acts = h.until_deadline();
        delays.push(h.now - t);
        assert_eq!(spawns(&acts).len(), 1);
    }
    assert_eq!(delays, [100 * MS, 200 * MS, 400 * MS]);
    // The 4th exit within the window: failed for a cool-down of the window's length.
    let w = h.current(1);
    h.exit(w);
    assert_eq!(h.state(1), SlotState::Failed);
    let t = h.now;
    let acts = h.until_deadline();
    assert_eq!(h.now - t, Duration::from_secs(60));
    assert_eq!(spawns(&acts), [id(1, 4)]);
    assert_eq!(h.state(1), SlotState::Ready);
    // Slot 0 never moved.
    assert_eq!(h.current(0), id(0, 0));
}

#[test]
fn a_worker_that_cannot_be_spawned_is_retried_with_backoff() {
    let (mut h, _) = {
        let now = Instant::now();
        let mut h = Harness {
            fleet: Fleet::new(config(1), now),
            now,
            next_pid: 1,
            fail_spawns: true,
            pids: Default::default(),
        };
        let acts = h.run();
        (h, acts)
    };
    assert_eq!(h.state(0), SlotState::Backoff);
    h.fail_spawns = false;
    let acts = h.until_deadline();
    assert_eq!(spawns(&acts), [id(0, 1)]);
    assert_eq!(h.state(0), SlotState::Ready);
}

#[test]
fn a_rolling_restart_without_wait_ready_replaces_one_slot_at_a_time() {
    let (mut h, _) = Harness::new(config(3));
    let old: Vec<WorkerId> = (0..3).map(|s| h.current(s)).collect();
    h.fleet.roll("SIGUSR2", h.now);
    let acts = h.run();
    // Only slot 0 is replaced now: its new worker takes over and the old one drains.
    assert_eq!(spawns(&acts), [id(0, 1)]);
    assert_eq!(signals(&acts), [(old[0], Sig::Term)]);
    assert_eq!(restarts(&acts), 1);
    assert_eq!(h.current(0), id(0, 1));
    // Slot 1 waits until the new worker shows a sign of life...
    assert!(spawns(&h.advance(10 * MS)).is_empty());
    h.fleet.on_alive(id(0, 1), h.now);
    let acts = h.run();
    assert_eq!(spawns(&acts), [id(1, 1)]);
    assert_eq!(signals(&acts), [(old[1], Sig::Term)]);
    // ...or, from a silent worker, for ROLL_SETTLE.
    let t = h.now;
    let acts = h.until_deadline();
    assert_eq!(h.now - t, ROLL_SETTLE);
    assert_eq!(spawns(&acts), [id(2, 1)]);
    assert_eq!(signals(&acts), [(old[2], Sig::Term)]);
    h.fleet.on_alive(id(2, 1), h.now);
    assert!(h.run().is_empty());
    // The roll is over: a second SIGUSR2 starts a new one.
    h.fleet.roll("SIGUSR2", h.now);
    assert_eq!(spawns(&h.run()), [id(0, 2)]);
}

#[test]
fn a_rolling_restart_with_wait_ready_moves_on_when_the_new_worker_is_ready() {
    let mut h = all_ready(FleetConfig {
        wait_ready: true,
        ..config(2)
    });
    h.fleet.roll("SIGUSR2", h.now);
    let acts = h.run();
    assert_eq!(spawns(&acts), [id(0, 1)]);
    assert!(
        signals(&acts).is_empty(),
        "the old worker serves until the new one is ready"
    );
    assert_eq!(h.current(0), id(0, 0));
    h.fleet.on_ready(id(0, 1), h.now);
    let acts = h.run();
    assert_eq!(signals(&acts), [(id(0, 0), Sig::Term)]);
    assert_eq!(spawns(&acts), [id(1, 1)]);
    assert_eq!(h.current(0), id(0, 1));
}

#[test]
fn a_roll_whose_new_worker_never_gets_ready_keeps_the_old_one_and_stops() {
    let mut h = all_ready(FleetConfig {
        wait_ready: true,
        ready_timeout: Duration::from_secs(1),
        ..config(2)
    });
    h.fleet.roll("SIGUSR2", h.now);
    h.run();
    let acts = h.until_deadline();
    assert_eq!(signals(&acts), [(id(0, 1), Sig::Kill)]);
    h.exit(id(0, 1));
    assert_eq!(h.current(0), id(0, 0));
    assert_eq!(h.state(0), SlotState::Ready);
    // No further slot is touched, and nothing else is pending.
    assert!(h.fleet.next_deadline().is_none());
    assert_eq!(h.current(1), id(1, 0));
}

#[test]
fn a_roll_stops_if_the_new_worker_exits_or_cannot_start() {
    let mut h = all_ready(FleetConfig {
        wait_ready: true,
        ..config(2)
    });
    h.fleet.roll("SIGUSR2", h.now);
    h.run();
    let acts = h.exit(id(0, 1));
    assert!(spawns(&acts).is_empty() && signals(&acts).is_empty());
    assert_eq!(h.current(0), id(0, 0));
    h.fail_spawns = true;
    h.fleet.roll("SIGUSR2", h.now);
    let acts = h.run();
    assert_eq!(spawns(&acts).len(), 1);
    assert!(signals(&acts).is_empty());
    h.fail_spawns = false;
    assert!(spawns(&h.advance(Duration::from_secs(5))).is_empty());
}

#[test]
fn a_draining_worker_is_killed_after_the_drain_timeout() {
    let (mut h, _) = Harness::new(FleetConfig {
        drain_timeout: Duration::from_secs(3),
        max_memory: Some(100),
        ..config(1)
    });
    // (Over the limit from its start: replaced once it is a second old.)
    h.advance(Duration::from_secs(1));
    h.fleet.on_rss(id(0, 0), 500, h.now);
    let acts = h.run();
    assert_eq!(spawns(&acts), [id(0, 1)]);
    assert_eq!(signals(&acts), [(id(0, 0), Sig::Term)]);
    let t = h.now;
    let acts = h.until_deadline();
    assert_eq!(h.now - t, Duration::from_secs(3));
    assert_eq!(signals(&acts), [(id(0, 0), Sig::Kill)]);
    // Gone once it exited and its channel closed; the new worker serves.
    h.exit(id(0, 0));
    assert_eq!(h.current(0), id(0, 1));
    assert!(h.fleet.next_deadline().is_none());
}

#[test]
fn memory_over_the_limit_replaces_once_and_under_it_never() {
    let (mut h, _) = Harness::new(FleetConfig {
        wait_ready: true,
        max_memory: Some(1000),
        ..config(1)
    });
    h.fleet.on_ready(id(0, 0), h.now);
    h.run();
    h.fleet.on_rss(id(0, 0), 999, h.now);
    assert!(spawns(&h.run()).is_empty());
    h.advance(Duration::from_secs(1));
    h.fleet.on_rss(id(0, 0), 1001, h.now);
    assert_eq!(spawns(&h.run()), [id(0, 1)]);
    // A second sample while the replacement starts does not start another.
    h.fleet.on_rss(id(0, 0), 5000, h.now);
    assert!(spawns(&h.run()).is_empty());
}

#[test]
fn a_worker_that_stops_heartbeating_is_killed_one_that_never_beat_is_not_watched() {
    let (mut h, _) = Harness::new(FleetConfig {
        heartbeat_timeout: Duration::from_secs(1),
        ..config(2)
    });
    assert!(
        h.fleet.next_deadline().is_none(),
        "no heartbeat yet: not watched"
    );
    h.fleet.on_heartbeat(id(0, 0), h.now);
    h.advance(900 * MS);
    h.fleet.on_heartbeat(id(0, 0), h.now);
    let t = h.now;
    let acts = h.until_deadline();
    assert_eq!(h.now - t, Duration::from_secs(1));
    assert_eq!(signals(&acts), [(id(0, 0), Sig::Kill)]);
    assert!(!h.fleet.view(0).up());
    assert_eq!(h.current(1), id(1, 0));
}

#[test]
fn a_stalled_worker_is_not_up_until_it_recovers() {
    let (mut h, _) = Harness::new(config(1));
    h.fleet.on_stalled(id(0, 0), Duration::from_secs(2));
    h.run();
    assert_eq!(h.state(0), SlotState::Stalled);
    assert!(!h.fleet.view(0).up());
    h.fleet.on_recovered(id(0, 0));
    h.run();
    assert_eq!(h.state(0), SlotState::Ready);
}

#[test]
fn desync_and_a_closed_channel_stop_the_worker_once_and_it_is_respawned() {
    let (mut h, _) = Harness::new(config(2));
    h.fleet.on_desync(id(0, 0), h.now);
    let acts = h.run();
    assert_eq!(signals(&acts), [(id(0, 0), Sig::Term)]);
    assert!(acts.contains(&Action::Detach(id(0, 0))));
    // Its channel then closes: no second SIGTERM.
    h.fleet.on_channel_closed(id(0, 0), h.now);
    assert!(signals(&h.run()).is_empty());
    h.fleet.on_exit(id(0, 0), "exit code 0", h.now);
    h.run();
    assert_eq!(spawns(&h.until_deadline()), [id(0, 1)]);
    // A live worker whose channel closes is stopped.
    h.fleet.on_channel_closed(id(1, 0), h.now);
    assert_eq!(signals(&h.run()), [(id(1, 0), Sig::Term)]);
}

#[test]
fn shutdown_terms_idle_workers_holds_busy_ones_then_kills_what_is_left() {
    let (mut h, _) = Harness::new(FleetConfig {
        drain_timeout: Duration::from_secs(5),
        hold_timeout: Duration::from_secs(1),
        ..config(3)
    });
    let busy = [id(1, 0), id(2, 0)];
    h.fleet.shutdown("SIGTERM", h.now, |w| busy.contains(&w));
    let acts = h.run();
    assert_eq!(signals(&acts), [(id(0, 0), Sig::Term)]);
    for s in 0..3 {
        assert_eq!(h.state(s), SlotState::Draining);
    }
    // Slot 1's handoffs are answered: SIGTERM now. Slot 2's never are: SIGTERM at the settle
    // timeout.
    h.fleet.on_answered(id(1, 0), h.now);
    assert_eq!(signals(&h.run()), [(id(1, 0), Sig::Term)]);
    let acts = h.until_deadline();
    assert_eq!(signals(&acts), [(id(2, 0), Sig::Term)]);
    // Slot 0 exits by itself: no respawn during a shutdown.
    h.exit(id(0, 0));
    assert_eq!(h.state(0), SlotState::Exited);
    let t0 = h.now;
    let acts = h.until_deadline();
    assert_eq!(h.now - t0, Duration::from_secs(4));
    assert_eq!(
        signals(&acts),
        [(id(1, 0), Sig::Kill), (id(2, 0), Sig::Kill)]
    );
    assert!(!h.fleet.is_done());
    h.exit(id(1, 0));
    h.exit(id(2, 0));
    assert!(h.fleet.is_done());
    assert!(h.fleet.next_deadline().is_none());
    assert!(spawns(&h.advance(Duration::from_secs(60))).is_empty());
}

#[test]
fn a_worker_is_not_forgotten_before_its_channel_closes() {
    let (mut h, _) = Harness::new(config(1));
    h.fleet.shutdown("SIGTERM", h.now, |_| false);
    h.run();
    h.fleet.on_exit(id(0, 0), "exit code 0", h.now);
    h.run();
    assert!(
        !h.fleet.is_done(),
        "its dispatch may still hand connections back"
    );
    h.fleet.on_channel_closed(id(0, 0), h.now);
    h.run();
    assert!(h.fleet.is_done());
}

#[test]
fn signals_are_never_repeated_or_sent_to_a_gone_worker() {
    let (mut h, _) = Harness::new(FleetConfig {
        drain_timeout: Duration::from_secs(1),
        ..config(1)
    });
    h.fleet.on_desync(id(0, 0), h.now);
    h.fleet.on_desync(id(0, 0), h.now);
    h.fleet.shutdown("SIGTERM", h.now, |_| false);
    let acts = h.run();
    assert_eq!(signals(&acts), [(id(0, 0), Sig::Term)]);
    let acts = h.until_deadline();
    assert_eq!(signals(&acts), [(id(0, 0), Sig::Kill)]);
    h.exit(id(0, 0));
    h.fleet.on_desync(id(0, 0), h.now);
    h.fleet.on_channel_closed(id(0, 0), h.now);
    assert!(signals(&h.run()).is_empty());
}

#[test]
fn events_about_unknown_workers_are_ignored() {
    let (mut h, _) = Harness::new(config(1));
    let ghost = id(0, 7);
    h.fleet.on_ready(ghost, h.now);
    h.fleet.on_heartbeat(ghost, h.now);
    h.fleet.on_desync(ghost, h.now);
    h.fleet.on_exit(ghost, "exit code 0", h.now);
    h.fleet.on_channel_closed(ghost, h.now);
    let acts = h.run();
    assert!(signals(&acts).is_empty() && spawns(&acts).is_empty());
    assert_eq!(h.current(0), id(0, 0));
}

#[test]
fn every_slot_state_has_a_metric_series() {
    use SlotState::*;
    for st in [Starting, Ready, Stalled, Backoff, Failed, Draining, Exited] {
        assert!(crate::metrics::SLOT_STATES.contains(&st.as_str()), "{st:?}");
    }
}

#[test]
fn scaling_up_adds_slots_and_scaling_down_drains_and_drops_the_last_ones() {
    let (mut h, _) = Harness::new(config(2));
    h.fleet.scale(4, h.now);
    let acts = h.run();
    assert_eq!(
        acts[0],
        Action::Resized(4),
        "resize before the new slots spawn"
    );
    assert_eq!(spawns(&acts), [id(2, 0), id(3, 0)]);
    assert_eq!((h.fleet.active(), h.fleet.len()), (4, 4));
    // Down to 1: slots 1..4 drain (SIGTERM), are never respawned, and go once their workers are
    // gone; slot 0 is untouched.
    h.fleet.scale(1, h.now);
    let acts = h.run();
    assert_eq!(
        signals(&acts),
        [
            (id(1, 0), Sig::Term),
            (id(2, 0), Sig::Term),
            (id(3, 0), Sig::Term)
        ]
    );
    assert_eq!((h.fleet.active(), h.fleet.len()), (1, 4));
    assert_eq!(h.state(2), SlotState::Draining);
    h.exit(id(2, 0));
    assert_eq!(h.fleet.len(), 4, "slot 3 still drains behind slot 2");
    h.exit(id(3, 0));
    let acts = h.exit(id(1, 0));
    assert!(acts.contains(&Action::Resized(1)), "{acts:?}");
    assert_eq!(h.fleet.len(), 1);
    assert!(spawns(&h.advance(Duration::from_secs(60))).is_empty());
    assert_eq!(h.current(0), id(0, 0));
    // A roll now only covers the one slot.
    h.fleet.roll("SIGUSR2", h.now);
    assert_eq!(spawns(&h.run()), [id(0, 1)]);
}

#[test]
fn a_dropped_slot_is_never_published() {
    let (mut h, _) = Harness::new(config(2));
    h.fleet.scale(1, h.now);
    h.run();
    let acts = h.exit(id(1, 0));
    assert!(acts.contains(&Action::Resized(1)), "{acts:?}");
    assert!(!acts.contains(&Action::Publish(1)), "{acts:?}");
}

#[test]
fn a_resumed_fleet_keeps_carried_workers_ready_and_starts_only_the_empty_slots() {
    let now = Instant::now();
    let carried = Adopted {
        id: WorkerId {
            slot: 0,
            generation: 4,
        },
        pid: 77,
        started: now - Duration::from_secs(60),
        last_heartbeat: None,
        cluster: false,
        next_generation: 5,
    };
    let mut fleet = Fleet::resume(config(2), &[carried], &[], now);
    let acts: Vec<Action> = std::iter::from_fn(|| fleet.poll_action()).collect();
    assert!(acts.contains(&Action::Publish(0)));
    let spawns: Vec<WorkerId> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Spawn(id) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(spawns.len(), 1, "{acts:?}");
    assert_eq!(spawns[0].slot, 1);
    let v = fleet.view(0);
    assert_eq!(v.state, SlotState::Ready);
    assert_eq!((v.pid, v.started), (Some(77), Some(carried.started)));
    assert!(!fleet.steady(), "slot 1 is starting");
    // Carried again at the next upgrade, generations continuing.
    assert_eq!(fleet.carry(), vec![carried]);
}

#[test]
fn an_lb_whose_workers_all_fail_to_start_gives_up_and_one_that_served_never_does() {
    // Two slots whose workers exit at once, from the start: after the third failed start of
    // each, lb gives up — not one exit sooner.
    let (mut h, _) = Harness::new(config(2));
    for round in 0..GIVE_UP_AFTER {
        for slot in 0..2 {
            assert!(h.fleet.gave_up().is_none(), "round {round} slot {slot}");
            let w = h.current(slot);
            h.exit(w);
        }
        if round + 1 < GIVE_UP_AFTER {
            h.advance(Duration::from_secs(10));
        }
    }
    let why = h.fleet.gave_up().expect("gave up");
    assert!(
        why.contains("3 times in a row in each of the 2 slots"),
        "{why}"
    );

    // One slot fine for MIN_UPTIME: lb has served; the other's failures are crashes.
    let (mut h, _) = Harness::new(config(2));
    h.advance(MIN_UPTIME);
    for _ in 0..10 {
        let w = h.current(1);
        h.exit(w);
        h.advance(Duration::from_secs(60));
    }
    assert!(h.fleet.gave_up().is_none());
}

#[test]
fn a_worker_whose_normal_size_is_over_max_memory_is_replaced_less_and_less_often() {
    let mut cfg = config(1);
    cfg.max_memory = Some(10);
    let mut h = all_ready(cfg);
    let mut replacements = 0;
    // Ten minutes of 1 s RSS samples, every worker at 20 bytes from its start.
    for _ in 0..600 {
        h.advance(Duration::from_secs(1));
        let cur = h.current(0);
        h.fleet.on_rss(cur, 20, h.now);
        let new = spawns(&h.run());
        if let Some(&id) = new.first() {
            h.fleet.on_ready(id, h.now);
            h.run();
            h.exit(cur);
            replacements += 1;
        }
    }
    // Today's every-second replacement would be ~600; the backoff (1, 2, 4 … 300 s) allows
    // about a dozen in ten minutes, and at least a few.
    assert!(
        (5..=15).contains(&replacements),
        "{replacements} replacements"
    );

    // A worker that grows past the limit after a minute is replaced at once, every time.
    let mut cfg = config(1);
    cfg.max_memory = Some(10);
    let mut h = all_ready(cfg);
    for round in 0..3 {
        h.advance(MEMORY_YOUNG);
        let cur = h.current(0);
        h.fleet.on_rss(cur, 20, h.now);
        let new = spawns(&h.run());
        assert_eq!(new.len(), 1, "round {round}");
        h.fleet.on_ready(new[0], h.now);
        h.run();
        h.exit(cur);
    }
}
