//! `--steering kernel`: per-slot SO_REUSEPORT listeners and a BPF program computing sticky; the
//! built-in worker accepts for itself and the master does no work per connection.

mod common;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn kernel(workers: &str, extra: &[&str]) -> Lb {
    let mut args = vec!["-w", workers, "--steering", "kernel"];
    args.extend(extra);
    let lb = Lb::start(&args);
    assert!(
        lb.log_text().contains("(kernel steering)"),
        "{}",
        lb.log_text()
    );
    lb
}

fn accepted(lb: &Lb) -> f64 {
    lb.metric("lb_accepted_connections_total").unwrap()
}

#[test]
fn in_kernel_mode_200_clients_stay_on_their_route_slot_and_the_master_accepts_none() {
    let lb = kernel("4", &[]);
    lb.wait_all_ready(4);
    let mut per_slot = [0; 4];
    for i in 0..200 {
        let ip = client_ip(i);
        let (slot, _) = served_by(lb.addr, Some(ip));
        assert_eq!(slot, lb_route(ip, 4, &[]), "client {ip}");
        per_slot[slot] += 1;
    }
    assert!(per_slot.iter().all(|n| *n > 20), "{per_slot:?}");
    assert_eq!(accepted(&lb), 0.0, "the master accepted a connection");
    // The workers' own reports still reach /metrics.
    wait_for(
        "the workers' request counts",
        Duration::from_secs(10),
        || {
            let total: f64 = (0..4)
                .map(|w| {
                    lb.metric(&format!("lb_worker_requests_total{{worker=\"{w}\"}}"))
                        .unwrap()
                })
                .sum();
            (total >= 200.0).then_some(())
        },
    );
}

#[test]
fn a_killed_worker_under_churn_fails_no_request_and_its_clients_return_after_respawn() {
    let lb = kernel("3", &[]);
    let pids = lb.wait_all_ready(3);
    let churn = Churn::start(lb.addr, 4, 0, 15);
    churn.wait_more("traffic before the kill", 200);
    kill(pids[1], Signal::SIGKILL);
    let now = wait_for("slot 1 refilled", Duration::from_secs(10), || {
        let p = lb.wait_all_ready(3);
        (p[1] != pids[1]).then_some(p)
    });
    assert_eq!(
        (now[0], now[2]),
        (pids[0], pids[2]),
        "other workers untouched"
    );
    churn.wait_more("traffic after the respawn", 300);
    let result = churn.stop();
    result.assert_only_lost_with_the_killed_worker(4);
    // Clients of the other slots never moved; slot 1's are home again.
    for (ip, slots) in &result.seen {
        let home = lb_route(*ip, 3, &[]);
        if home != 1 {
            assert_eq!(
                slots.len(),
                1,
                "client {ip} of a live slot moved: {slots:?}"
            );
        }
        assert!(slots.contains(&home), "{ip}: {slots:?}");
        assert_eq!(served_by(lb.addr, Some(*ip)).0, home, "{ip} back home");
    }
}

#[test]
fn a_rolling_restart_under_churn_fails_no_request() {
    let lb = kernel("3", &["--wait-ready"]);
    let before = lb.wait_all_ready(3);
    let churn = Churn::start(lb.addr, 4, 100, 15);
    churn.wait_more("traffic before the roll", 200);
    lb.signal(Signal::SIGUSR2);
    wait_for("every worker replaced", Duration::from_secs(30), || {
        let now = lb.wait_all_ready(3);
        now.iter().all(|p| !before.contains(p)).then_some(())
    });
    churn.wait_more("traffic after the roll", 200);
    let result = churn.stop();
    result.assert_no_failures();
    for (ip, slots) in &result.seen {
        assert_eq!(
            slots.len(),
            1,
            "client {ip} moved during the roll: {slots:?}"
        );
        assert_eq!(*slots.iter().next().unwrap(), lb_route(*ip, 3, &[]));
    }
}

#[test]
fn a_stopped_worker_does_not_blackhole_its_clients_longer_than_the_stall_timeout() {
    let lb = kernel("3", &["--stall-timeout", "1s"]);
    let pids = lb.wait_all_ready(3);
    let ips: Vec<IpAddr> = (0..60).map(client_ip).collect();
    let home: HashMap<IpAddr, usize> = ips.iter().map(|ip| (*ip, lb_route(*ip, 3, &[]))).collect();
    let victim = 0;
    let theirs: Vec<IpAddr> = ips
        .iter()
        .copied()
        .filter(|ip| home[ip] == victim)
        .collect();
    assert!(!theirs.is_empty());
    kill(pids[victim], Signal::SIGSTOP);
    // A client of the stopped slot connects: it waits at most about the stall timeout (plus
    // the check interval), then the master takes it from the slot's queue and hands it on.
    let t = Instant::now();
    let (slot, _) = served_by(lb.addr, Some(theirs[0]));
    let waited = t.elapsed();
    assert_ne!(slot, victim);
    assert!(
        waited < Duration::from_millis(2500),
        "blackholed for {waited:?}"
    );
    wait_for("slot 0 marked stalled", Duration::from_secs(5), || {
        (lb.workers()["workers"][victim]["state"] == "stalled").then_some(())
    });
    // While it is stopped: its clients are served elsewhere at once, everyone else stays home.
    for ip in &ips {
        let t = Instant::now();
        let (slot, _) = served_by(lb.addr, Some(*ip));
        if home[ip] == victim {
            assert_ne!(slot, victim);
        } else {
            assert_eq!(slot, home[ip], "client {ip} of a live slot moved");
        }
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{ip} waited {:?}",
            t.elapsed()
        );
    }
    kill(pids[victim], Signal::SIGCONT);
    wait_for("slot 0 ready again", Duration::from_secs(10), || {
        (lb.workers()["workers"][victim]["state"] == "ready").then_some(())
    });
    for ip in &ips {
        assert_eq!(served_by(lb.addr, Some(*ip)).0, home[ip], "{ip} back home");
    }
    assert!(
        accepted(&lb) >= 1.0,
        "the master took the stalled slot's queue"
    );
}

#[test]
fn kernel_steering_refuses_what_it_cannot_do_in_one_line() {
    for (args, want) in [
        (
            vec!["--steering", "kernel", "-p", "round-robin"],
            "the kernel computes sticky only",
        ),
        (
            vec!["--steering", "kernel", "--proxy-protocol", "strip"],
            "PROXY header",
        ),
    ] {
        let out = std::process::Command::new(LB)
            .args(["-l", "127.0.0.1:0", "--metrics", "off", "--control", "off"])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(want) && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_sticky_session_node_worker_is_replaced_with_a_line_that_says_to_use_master_steering() {
    // It only takes handed-over connections, so it never accepts from its slot's listener: lb
    // cannot know that at start-up (the same `node app.js` may be a cluster app), so it says so
    // when the worker is not ready in time, and keeps running.
    let lb = start_node(
        &["-w", "1", "--steering", "kernel", "--ready-timeout", "1s"],
        &example("server.js"),
        &[],
    );
    wait_for(
        "the worker stopped with the hint",
        Duration::from_secs(15),
        || {
            lb.log_text()
                .lines()
                .any(|l| {
                    l.contains("not ready after") && l.contains("run it with --steering master")
                })
                .then_some(())
        },
    );
    assert!(alive(lb.pid()));
}

#[test]
fn node_cluster_apps_accept_from_their_slots_listener_and_stay_sticky() {
    // The single-file cluster app: its listen() on lb's port gets the slot's own listener.
    let lb = start_node(
        &["-w", "3", "--steering", "kernel"],
        &fixture("cluster-listen.js"),
        &[],
    );
    let pids = lb.wait_all_ready(3);
    for i in 0..100 {
        let ip = client_ip(300 + i);
        assert_eq!(served_by(lb.addr, Some(ip)).0, lb_route(ip, 3, &[]), "{ip}");
    }
    assert_eq!(accepted(&lb), 0.0);
    // A worker killed under churn: no request fails, its clients come back to its successor.
    let churn = Churn::start(lb.addr, 3, 300, 20);
    churn.wait_more("traffic before the kill", 150);
    kill(pids[2], Signal::SIGKILL);
    wait_for("slot 2 refilled", Duration::from_secs(15), || {
        let p = lb.wait_all_ready(3);
        (p[2] != pids[2]).then_some(())
    });
    churn.wait_more("traffic after the respawn", 150);
    let result = churn.stop();
    // Nothing queued for the dead worker is lost (the master takes its listener's queue); a
    // request the worker had already accepted dies with it.
    result.assert_only_lost_with_the_killed_worker(3);
    for ip in result.seen.keys() {
        assert_eq!(served_by(lb.addr, Some(*ip)).0, lb_route(*ip, 3, &[]));
    }
}
