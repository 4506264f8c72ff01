//! Worker lifecycle through the real binary: respawn, rolling restart, shutdown, heartbeats,
//! memory limit, and master death.

mod common;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;

fn slot_pid(lb: &Lb, slot: usize) -> Option<u32> {
    let w = lb.workers();
    let row = &w["workers"][slot];
    (row["state"] == "ready").then(|| row["pid"].as_u64().unwrap() as u32)
}

#[test]
fn a_killed_worker_is_replaced_in_its_slot_and_only_its_clients_move_and_return() {
    let lb = Lb::start(&["-w", "4"]);
    let pids = lb.wait_all_ready(4);
    let ips: Vec<IpAddr> = (0..80).map(client_ip).collect();
    let home: HashMap<IpAddr, usize> = ips
        .iter()
        .map(|&ip| (ip, served_by(lb.addr, Some(ip)).0))
        .collect();
    let victim = 2;
    kill(pids[victim], Signal::SIGKILL);
    // While the slot is down or coming back: nobody hangs, other slots' clients stay put.
    for &ip in &ips {
        let (slot, pid) = served_by(lb.addr, Some(ip));
        assert_ne!(pid, pids[victim], "a dead worker served a request");
        if home[&ip] != victim {
            assert_eq!(slot, home[&ip], "client {ip} of a live slot moved");
        }
    }
    let new_pid = wait_for("slot 2 to be refilled", Duration::from_secs(10), || {
        slot_pid(&lb, victim).filter(|p| *p != pids[victim])
    });
    assert!(!alive(pids[victim]));
    // Everyone is home again, the killed slot's clients on the new worker.
    for &ip in &ips {
        let (slot, pid) = served_by(lb.addr, Some(ip));
        assert_eq!(slot, home[&ip]);
        if slot == victim {
            assert_eq!(pid, new_pid);
        }
    }
    assert_eq!(
        lb.metric("lb_worker_restarts_total{worker=\"2\"}"),
        Some(1.0)
    );
    assert_eq!(
        lb.metric("lb_worker_restarts_total{worker=\"0\"}"),
        Some(0.0)
    );
}

#[test]
fn rolling_restart_under_connection_churn_loses_nothing_and_keeps_the_mapping() {
    let lb = Lb::start(&["-w", "3", "--wait-ready"]);
    let before = lb.wait_all_ready(3);
    let churn = Churn::start(lb.addr, 4, 0, 25);
    churn.wait_more("traffic before the roll", 200);
    lb.signal(Signal::SIGUSR2);
    let after = wait_for(
        "every worker to be replaced",
        Duration::from_secs(30),
        || {
            let w = lb.workers();
            let rows = w["workers"].as_array()?.clone();
            let pids: Vec<u32> = rows
                .iter()
                .filter_map(|r| r["pid"].as_u64())
                .map(|p| p as u32)
                .collect();
            (rows
                .iter()
                .all(|r| r["state"] == "ready" && r["restarts"] == 1)
                && pids.len() == 3
                && pids.iter().all(|p| !before.contains(p)))
            .then_some(pids)
        },
    );
    churn.wait_more("traffic after the roll", 200);
    let result = churn.stop();
    result.assert_no_failures();
    // Every client stayed on one slot throughout, and the slot is the one `lb route` names.
    for (ip, slots) in &result.seen {
        assert_eq!(slots.len(), 1, "client {ip} was served by slots {slots:?}");
        assert_eq!(lb_route(*ip, 3, &[]), *slots.iter().next().unwrap());
    }
    for p in before {
        wait_for("old workers to exit", Duration::from_secs(10), || {
            (!alive(p)).then_some(())
        });
    }
    assert_eq!(after.len(), 3);
    assert_eq!(
        lb.metric("lb_handoff_failures_total{reason=\"no_worker\"}"),
        Some(0.0)
    );
}

#[test]
fn sigterm_lets_a_slow_request_finish_then_exits_0_with_no_worker_left() {
    let mut lb = Lb::start(&["-w", "2"]);
    let pids = lb.wait_all_ready(2);
    let mut conn = connect(lb.addr, None);
    use std::io::Write;
    conn.write_all(b"GET /sleep/1500 HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n")
        .unwrap();
    wait_for(
        "the request to be in a worker",
        Duration::from_secs(10),
        || {
            let w = lb.workers();
            w["workers"]
                .as_array()?
                .iter()
                .any(|r| r["active_connections"] == 1)
                .then_some(())
        },
    );
    lb.signal(Signal::SIGTERM);
    // The listener closes at once, while the slow request is still being served.
    wait_for(
        "the listener to close during the drain",
        Duration::from_secs(5),
        || std::net::TcpStream::connect(lb.addr).is_err().then_some(()),
    );
    assert!(
        lb.child.try_wait().unwrap().is_none(),
        "lb must still be draining"
    );
    let (status, body) = read_response(&mut conn);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        lb.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        lb.log_text()
    );
    for p in pids {
        assert!(!alive(p), "worker {p} outlived lb");
    }
    // The listener is closed: new connections are refused.
    assert!(std::net::TcpStream::connect(lb.addr).is_err());
}

#[test]
fn sigterm_kills_workers_that_ignore_it_after_the_shutdown_timeout() {
    // Ready only once its SIGTERM handler is installed.
    let stubborn = "process.on('SIGTERM', () => {}); setInterval(() => {}, 1000); process.send({type: 'ready'});";
    let mut lb = Lb::start(&[
        "-w",
        "1",
        "--wait-ready",
        "--shutdown-timeout",
        "500ms",
        "--",
        "node",
        "-e",
        stubborn,
    ]);
    let pids = lb.wait_all_ready(1);
    let started = Instant::now();
    lb.signal(Signal::SIGTERM);
    assert_eq!(lb.wait_exit(Duration::from_secs(20)), Some(0));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "shutdown took {took:?} with a 500ms timeout"
    );
    wait_for(
        "the stubborn worker to be gone",
        Duration::from_secs(5),
        || (!alive(pids[0])).then_some(()),
    );
}

#[test]
fn workers_die_when_the_master_is_sigkilled() {
    let mut lb = Lb::start(&["-w", "3"]);
    let pids = lb.wait_all_ready(3);
    lb.child.kill().unwrap();
    lb.child.wait().unwrap();
    for p in pids {
        wait_for(
            "worker to die with its master",
            Duration::from_secs(5),
            || (!alive(p)).then_some(()),
        );
    }
}

#[test]
fn a_worker_that_exits_at_once_is_respawned_with_backoff_and_clients_are_closed_not_hung() {
    // The first worker runs 1.5 s (lb has served), every later one exits at once: a crash
    // loop after service, which lb rides out with backoff (one that never served gives up).
    let flag = std::env::temp_dir().join(format!("lb-served-once-{}", std::process::id()));
    let _ = std::fs::remove_file(&flag);
    let script = format!(
        "[ -e {f} ] && exit 3; touch {f}; sleep 1.5; exit 3",
        f = flag.display()
    );
    let lb = Lb::start(&[
        "-w",
        "1",
        "--queue-timeout",
        "300ms",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    wait_for("the first worker's exit", Duration::from_secs(10), || {
        (lb.metric("lb_worker_restarts_total{worker=\"0\"}")? >= 1.0).then_some(())
    });
    let t0 = Instant::now();
    // Several respawns happen, spaced by a growing delay (not a spin).
    wait_for("a few respawns", Duration::from_secs(10), || {
        (lb.metric("lb_worker_restarts_total{worker=\"0\"}")? >= 3.0).then_some(())
    });
    let elapsed = t0.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300),
        "3 respawns after 100+200 ms of backoff at least"
    );
    let restarts_at_2s = {
        wait_for("2 s of uptime", Duration::from_secs(5), || {
            (t0.elapsed() >= Duration::from_secs(2)).then_some(())
        });
        lb.metric("lb_worker_restarts_total{worker=\"0\"}").unwrap()
    };
    assert!(
        restarts_at_2s <= 6.0,
        "backoff should bound respawns, saw {restarts_at_2s} in 2 s"
    );
    // A client gets its connection closed after the queue timeout instead of hanging.
    let mut c = connect(lb.addr, None);
    use std::io::{Read, Write};
    c.write_all(b"GET / HTTP/1.1\r\nhost: lb\r\n\r\n").unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let n = c.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected the connection to be closed");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(
        lb.metric("lb_handoff_failures_total{reason=\"no_worker\"}")
            .unwrap()
            >= 1.0
    );
    assert!(lb.log_text().contains("respawning in"), "{}", lb.log_text());
    let (status, _) = http_get(lb.metrics.unwrap(), "/healthz", None);
    assert_eq!(status, 503);
    let _ = std::fs::remove_file(&flag);
}

#[test]
fn a_worker_that_stops_heartbeating_is_replaced() {
    let lb = Lb::start(&[
        "-w",
        "1",
        "--heartbeat-timeout",
        "1s",
        "--",
        "node",
        &fixture("stops-heartbeat.js"),
    ]);
    let first = lb.wait_all_ready(1)[0];
    let second = wait_for(
        "the silent worker to be replaced",
        Duration::from_secs(15),
        || slot_pid(&lb, 0).filter(|p| *p != first),
    );
    assert_ne!(first, second);
    wait_for(
        "the silent worker to be gone",
        Duration::from_secs(5),
        || (!alive(first)).then_some(()),
    );
    assert!(lb.log_text().contains("no heartbeat"), "{}", lb.log_text());
}

#[test]
fn a_worker_over_the_memory_limit_is_replaced_gracefully() {
    let lb = Lb::start_with(
        &[
            "-w",
            "1",
            "--max-memory",
            "100MiB",
            "--",
            "node",
            &fixture("grows.js"),
        ],
        &[("GROW_MB", "160")],
    );
    let first = lb.wait_all_ready(1)[0];
    // Every new worker grows past the limit too, so it is replaced again and again: clients
    // keep being served throughout.
    let churn = Churn::start(lb.addr, 2, 300, 20);
    wait_for("two replacements", Duration::from_secs(30), || {
        (lb.metric("lb_worker_restarts_total{worker=\"0\"}")? >= 2.0).then_some(())
    });
    churn.wait_more("requests after the replacements", 50);
    let result = churn.stop();
    result.assert_no_failures();
    wait_for("the big worker to be gone", Duration::from_secs(10), || {
        (!alive(first)).then_some(())
    });
    assert!(
        lb.log_text().contains("exceeds --max-memory"),
        "{}",
        lb.log_text()
    );
    assert!(lb.metric("lb_worker_memory_bytes{worker=\"0\"}").unwrap() > 0.0);
    // Every worker is over the limit from its start: lb says so once, and backs off.
    assert_eq!(
        lb.log_text()
            .matches("its normal size may be above the limit")
            .count(),
        1,
        "{}",
        lb.log_text()
    );
}

#[test]
fn a_rolling_restart_whose_new_worker_never_gets_ready_keeps_the_old_one_and_stops_there() {
    // The first worker of each slot says ready; its replacements never do. Every start is
    // recorded in `starts`.
    let dir = std::env::temp_dir().join(format!("lb-roll-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        "const fs = require('fs'); const d = {:?}; const id = process.env.LB_WORKER_ID;
         fs.appendFileSync(d + '/starts', id + '\\n');
         if (!fs.existsSync(d + '/ready-' + id)) {{ fs.writeFileSync(d + '/ready-' + id, ''); process.send({{type: 'ready'}}); }}
         const http = require('http');
         const s = http.createServer((q, r) => r.end(`worker ${{id}} pid ${{process.pid}}\\n`));
         process.on('message', (msg, c) => {{ if (msg === 'sticky-session:connection') {{ s.emit('connection', c); c.resume(); }} }});",
        dir.to_str().unwrap()
    );
    let lb = Lb::start(&[
        "-w",
        "2",
        "--wait-ready",
        "--ready-timeout",
        "1s",
        "--",
        "node",
        "-e",
        &script,
    ]);
    let before = lb.wait_all_ready(2);
    lb.signal(Signal::SIGUSR2);
    wait_for("the roll to give up", Duration::from_secs(15), || {
        lb.log_text()
            .contains("rolling restart stopped")
            .then_some(())
    });
    let starts = || std::fs::read_to_string(dir.join("starts")).unwrap_or_default();
    // The roll stops at slot 0: slot 1 is never replaced, and no slot went down.
    holds_for(
        "3 starts (2 workers and slot 0's failed replacement), old pids serving",
        Duration::from_millis(1500),
        || {
            let w = lb.workers();
            starts().lines().count() == 3
                && (0..2).all(|i| w["workers"][i]["pid"] == before[i])
                && (0..2).all(|i| w["workers"][i]["restarts"] == 0)
        },
    );
    assert_eq!(served_by(lb.addr, Some(ips_of(0, 2, 1)[0])), (0, before[0]));
    assert_eq!(served_by(lb.addr, Some(ips_of(1, 2, 1)[0])), (1, before[1]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_crash_loop_marks_the_slot_failed_and_lb_stays_up() {
    let lb = Lb::start(&[
        "-w",
        "2",
        "--crash-loop",
        "3/30s",
        "--",
        "sh",
        "-c",
        "[ \"$LB_WORKER_ID\" = 1 ] && exit 3; exec sleep 600",
    ]);
    wait_for(
        "slot 1 to be marked failed",
        Duration::from_secs(10),
        || (lb.workers()["workers"][1]["state"] == "failed").then_some(()),
    );
    assert_eq!(lb.metric("lb_worker_up{worker=\"1\"}"), Some(0.0));
    assert!(
        lb.log_text().contains("crash loop: 3 exits within 30s"),
        "{}",
        lb.log_text()
    );
    // It stays failed (no more respawns during the cool-down) and the other slot is unaffected.
    holds_for(
        "slot 1 failed, 2 restarts",
        Duration::from_millis(1500),
        || {
            lb.workers()["workers"][1]["state"] == "failed"
                && lb.metric("lb_worker_restarts_total{worker=\"1\"}") == Some(2.0)
        },
    );
    assert_eq!(lb.workers()["workers"][0]["state"], "ready");
    assert_eq!(
        lb.metric("lb_worker_restarts_total{worker=\"0\"}"),
        Some(0.0)
    );
    assert!(alive(lb.pid()));
}

#[test]
fn sigterm_closes_the_listener_at_once_and_hands_queued_connections_to_a_ready_worker() {
    // Slot 0 is stopped and its sticky clients wait for it: they are queued when SIGTERM comes.
    let mut lb = Lb::start(&[
        "-w",
        "2",
        "--stall-timeout",
        "300ms",
        "--sticky-stalled",
        "wait",
        "--queue-timeout",
        "30s",
        "--shutdown-timeout",
        "5s",
    ]);
    let pids = lb.wait_all_ready(2);
    let ips = ips_of(0, 2, 3);
    kill(pids[0], Signal::SIGSTOP);
    let held = start_request(&lb, ips[0]);
    wait_for("slot 0 to be stalled", Duration::from_secs(10), || {
        (lb.workers()["workers"][0]["state"] == "stalled").then_some(())
    });
    let queued: Vec<_> = ips[1..].iter().map(|ip| start_request(&lb, *ip)).collect();
    wait_for("two queued connections", Duration::from_secs(10), || {
        (lb.metric("lb_queued_connections")? == 2.0).then_some(())
    });
    lb.signal(Signal::SIGTERM);
    // The queued connections are handed to the worker that is still up, and served.
    for mut c in queued {
        assert_eq!(answered_by(&mut c), (1, pids[1]));
    }
    // The listener is closed while lb still waits for the stopped worker.
    wait_for("the listener to close", Duration::from_secs(5), || {
        std::net::TcpStream::connect(lb.addr).is_err().then_some(())
    });
    assert!(lb.child.try_wait().unwrap().is_none());
    // The stopped worker resumes and lb exits cleanly.
    kill(pids[0], Signal::SIGCONT);
    assert_eq!(lb.wait_exit(Duration::from_secs(20)), Some(0));
    drop(held);
    assert_eq!(
        lb.log_text().matches("could not place").count(),
        0,
        "{}",
        lb.log_text()
    );
}

#[test]
fn sighup_is_logged_and_changes_nothing() {
    let lb = Lb::start(&["-w", "2"]);
    let pids = lb.wait_all_ready(2);
    lb.signal(Signal::SIGHUP);
    wait_for("the SIGHUP log line", Duration::from_secs(5), || {
        lb.log_text().contains("SIGHUP received").then_some(())
    });
    holds_for(
        "same workers, all ready",
        Duration::from_millis(500),
        || {
            let w = lb.workers();
            (0..2).all(|i| w["workers"][i]["pid"] == pids[i] && w["workers"][i]["state"] == "ready")
        },
    );
    assert_eq!(served_by(lb.addr, Some(ips_of(1, 2, 1)[0])), (1, pids[1]));
    assert!(alive(lb.pid()));
}

#[test]
fn the_shutdown_timeout_kills_the_whole_process_group_of_a_stubborn_worker() {
    // The worker ignores SIGTERM and leaves a grandchild that ignores it too.
    let script = format!(
        "trap '' TERM; sleep 600 & echo \"grandchild $!\" >&2; exec python3 {}",
        fixture("raw_worker.py")
    );
    let mut lb = Lb::start(&[
        "-w",
        "1",
        "--shutdown-timeout",
        "500ms",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let pid = lb.wait_all_ready(1)[0];
    let grandchild: u32 = wait_for("the grandchild's pid", Duration::from_secs(10), || {
        lb.log_text()
            .lines()
            .find_map(|l| l.strip_prefix("grandchild ")?.trim().parse().ok())
    });
    assert!(alive(grandchild));
    let started = Instant::now();
    lb.signal(Signal::SIGTERM);
    assert_eq!(lb.wait_exit(Duration::from_secs(20)), Some(0));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    for (what, p) in [("worker", pid), ("grandchild", grandchild)] {
        wait_for(
            &format!("the {what} to be gone"),
            Duration::from_secs(5),
            || (!alive(p)).then_some(()),
        );
    }
}

/// The parent pid of a live process.
fn ppid_of(pid: u32) -> Option<u32> {
    stat_field(pid, 1)?.parse().ok()
}

/// The session id of a live process.
fn session_of(pid: u32) -> Option<u32> {
    stat_field(pid, 3)?.parse().ok()
}

#[test]
fn what_a_worker_leaves_behind_is_reaped_and_killed_and_never_holds_up_a_restart_or_shutdown() {
    // Found by the soak: a worker started through a shell that daemonises a helper (`setsid`, its
    // own session) hands the helper its channel (fd 3). When the worker died, lb waited for the
    // channel to close — which the helper never did — so shutdown hung forever. Each worker here
    // also leaves a plain background child in its process group.
    let script = "sleep 600 </dev/null >/dev/null 2>&1 & echo \"child $!\" >&2; \
                  (setsid sleep 600 </dev/null >/dev/null 2>&1 & echo \"daemon $!\" >&2); \
                  exec \"$0\" builtin-worker";
    let mut lb = Lb::start(&[
        "-w",
        "1",
        "--shutdown-timeout",
        "2s",
        "--",
        "sh",
        "-c",
        script,
        LB,
    ]);
    let first = lb.wait_all_ready(1)[0];
    let pids = |lb: &Lb, prefix: &str| -> Vec<u32> {
        lb.log_text()
            .lines()
            .filter_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
            .collect()
    };
    let (child, daemon) = wait_for("the helpers' pids", Duration::from_secs(10), || {
        Some((
            *pids(&lb, "child ").first()?,
            *pids(&lb, "daemon ").first()?,
        ))
    });
    // The daemon's parent exited at once: lb (the child subreaper) adopted it. Its parent may exit
    // before `setsid` has run, so wait for its own session too: until then it is still in the
    // worker's process group, which goes down with the worker.
    wait_for("lb to adopt the daemon", Duration::from_secs(5), || {
        (ppid_of(daemon) == Some(lb.pid()) && session_of(daemon) == Some(daemon)).then_some(())
    });

    kill(first, Signal::SIGKILL);
    // Its process group goes with it; the replacement serves.
    wait_for(
        "the dead worker's child to be killed",
        Duration::from_secs(5),
        || (!alive(child)).then_some(()),
    );
    let second = wait_for("a replacement worker", Duration::from_secs(10), || {
        lb.wait_all_ready(1)
            .first()
            .copied()
            .filter(|p| *p != first)
    });
    assert_eq!(served_by(lb.target(), None).1, second);
    assert!(alive(daemon), "daemonised helpers live on until lb stops");
    assert!(
        lb.log_text().contains("worker exited unexpectedly"),
        "{}",
        lb.log_text()
    );

    let started = Instant::now();
    lb.signal(Signal::SIGTERM);
    assert_eq!(
        lb.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        lb.log_text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let daemons = pids(&lb, "daemon ");
    assert_eq!(daemons.len(), 2, "{}", lb.log_text());
    for p in daemons.into_iter().chain(pids(&lb, "child ")) {
        wait_for(
            &format!("helper {p} to be gone"),
            Duration::from_secs(5),
            || (!alive(p)).then_some(()),
        );
    }
    assert!(
        lb.log_text()
            .contains("killed descendants the workers left behind")
    );
}
