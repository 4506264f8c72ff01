//! Failure modes: stalled workers, garbage on the channel, fd exhaustion. Each must end in a
//! bounded, logged, counted event — never a crash, a hang or a lost connection.

mod common;

use std::io::{Read, Write};
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Client IPs whose sticky home (with `n` workers) is `slot`.
fn ips_of(slot: usize, n: usize, count: usize) -> Vec<IpAddr> {
    (0..1000)
        .map(client_ip)
        .filter(|ip| lb_route(*ip, n, &[]) == slot)
        .take(count)
        .collect()
}

fn state(lb: &Lb, slot: usize) -> String {
    lb.workers()["workers"][slot]["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Sends a GET on a new connection and returns the stream without reading (the worker may be stopped).
fn start_request(lb: &Lb, ip: IpAddr) -> std::net::TcpStream {
    let mut c = connect(lb.addr, Some(ip));
    c.write_all(b"GET / HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n")
        .unwrap();
    c
}

#[test]
fn a_stopped_worker_is_skipped_and_its_waiting_clients_are_served_when_it_resumes() {
    let lb = Lb::start(&["-w", "2", "--stall-timeout", "300ms"]);
    let pids = lb.wait_all_ready(2);
    let ips = ips_of(0, 2, 4);
    kill(pids[0], Signal::SIGSTOP);
    // This client's connection reaches the stopped worker's channel; it must not be lost.
    let mut waiting = start_request(&lb, ips[0]);
    wait_for(
        "slot 0 to be marked stalled",
        Duration::from_secs(10),
        || (state(&lb, 0) == "stalled").then_some(()),
    );
    assert_eq!(lb.metric("lb_worker_up{worker=\"0\"}"), Some(0.0));
    // Meanwhile slot 0's clients go to their next choice, and round-robin-like traffic flows.
    for ip in &ips[1..] {
        let t = Instant::now();
        assert_eq!(served_by(lb.addr, Some(*ip)).0, 1);
        assert!(t.elapsed() < Duration::from_secs(2));
    }
    // The admin endpoint is not blocked by the stopped worker.
    let t = Instant::now();
    lb.metrics_text();
    assert!(t.elapsed() < Duration::from_secs(1));
    kill(pids[0], Signal::SIGCONT);
    let (status, body) = read_response(&mut waiting);
    assert_eq!(status, 200);
    assert_eq!(
        slot_and_pid(std::str::from_utf8(&body).unwrap()),
        (0, pids[0])
    );
    wait_for("slot 0 ready again", Duration::from_secs(10), || {
        (state(&lb, 0) == "ready").then_some(())
    });
    for ip in &ips {
        assert_eq!(
            served_by(lb.addr, Some(*ip)).0,
            0,
            "clients come home after recovery"
        );
    }
    assert!(lb.log_text().contains("has not answered a handoff"));
}

#[test]
fn sticky_clients_can_wait_for_their_stalled_worker_instead() {
    let lb = Lb::start(&[
        "-w",
        "2",
        "--stall-timeout",
        "300ms",
        "--sticky-stalled",
        "wait",
        "--queue-timeout",
        "10s",
    ]);
    let pids = lb.wait_all_ready(2);
    let ips = ips_of(0, 2, 3);
    let other = ips_of(1, 2, 1)[0];
    kill(pids[0], Signal::SIGSTOP);
    let first = start_request(&lb, ips[0]);
    wait_for(
        "slot 0 to be marked stalled",
        Duration::from_secs(10),
        || (state(&lb, 0) == "stalled").then_some(()),
    );
    let queued: Vec<_> = ips[1..].iter().map(|ip| start_request(&lb, *ip)).collect();
    wait_for("the clients to queue", Duration::from_secs(10), || {
        (lb.metric("lb_queued_connections")? == 2.0).then_some(())
    });
    // Other slots are unaffected.
    assert_eq!(served_by(lb.addr, Some(other)).0, 1);
    kill(pids[0], Signal::SIGCONT);
    for mut c in std::iter::once(first).chain(queued) {
        let (status, body) = read_response(&mut c);
        assert_eq!(status, 200);
        assert_eq!(
            slot_and_pid(std::str::from_utf8(&body).unwrap()).0,
            0,
            "served by its own worker"
        );
    }
}

#[test]
fn garbage_on_the_channel_is_dropped_and_counted_and_other_workers_are_unaffected() {
    let lb = Lb::start_with(
        &["-w", "2", "--", "python3", &fixture("raw_worker.py")],
        &[("GARBAGE", "1")],
    );
    lb.wait_all_ready(2);
    wait_for("the garbage to be counted", Duration::from_secs(10), || {
        let t = lb.metrics_text();
        let m = |r: &str| {
            metric_value(
                &t,
                &format!("lb_channel_messages_dropped_total{{reason=\"{r}\"}}"),
            )
        };
        (m("malformed")? >= 2.0
            && m("too_long")? >= 1.0
            && m("stray_fd")? >= 2.0
            && m("ignored")? >= 1.0)
            .then_some(())
    });
    // Both workers serve, including the one that sent the garbage.
    for slot in 0..2 {
        for ip in ips_of(slot, 2, 3) {
            assert_eq!(served_by(lb.addr, Some(ip)).0, slot);
        }
    }
    wait_for(
        "request messages from both workers",
        Duration::from_secs(10),
        || {
            (lb.metric("lb_worker_requests_total{worker=\"0\"}")? == 3.0
                && lb.metric("lb_worker_requests_total{worker=\"1\"}")? == 3.0)
                .then_some(())
        },
    );
    assert_eq!(
        lb.metric("lb_worker_restarts_total{worker=\"0\"}"),
        Some(0.0)
    );
    // The 3 MiB line did not stay in the master's memory.
    let status = std::fs::read_to_string(format!("/proc/{}/status", lb.pid())).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(rss_kb < 64 * 1024, "master RSS {rss_kb} kB");
}

#[test]
fn a_worker_that_breaks_the_handle_protocol_is_replaced() {
    let lb = Lb::start_with(
        &["-w", "2", "--", "python3", &fixture("raw_worker.py")],
        &[("GARBAGE", "desync")],
    );
    lb.wait_all_ready(2);
    wait_for(
        "the desynced worker to be replaced",
        Duration::from_secs(10),
        || (lb.metric("lb_worker_restarts_total{worker=\"0\"}")? >= 1.0).then_some(()),
    );
    assert!(
        lb.metric("lb_channel_messages_dropped_total{reason=\"desync\"}")
            .unwrap()
            >= 1.0
    );
    assert_eq!(
        lb.metric("lb_worker_restarts_total{worker=\"1\"}"),
        Some(0.0)
    );
    for ip in ips_of(1, 2, 2) {
        assert_eq!(served_by(lb.addr, Some(ip)).0, 1);
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn out_of_file_descriptors_backs_off_instead_of_spinning_and_recovers() {
    let mut cmd = Command::new("prlimit");
    assert!(
        cmd.arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "prlimit (util-linux) is required"
    );
    // lb and its workers at 128 fds; 400 clients held open.
    let lb = Lb::start(&[
        "-w",
        "2",
        "--queue-timeout",
        "30s",
        "--",
        "prlimit",
        "--nofile=128:128",
        LB,
        "builtin-worker",
    ]);
    let lb_pid = lb.pid();
    Command::new("prlimit")
        .args(["--pid", &lb_pid.to_string(), "--nofile=128:128"])
        .status()
        .unwrap();
    lb.wait_all_ready(2);
    let held: Vec<std::net::TcpStream> = (0..400)
        .map(|i| connect(lb.addr, Some(client_ip(i))))
        .collect();
    wait_for("lb to hit the fd limit", Duration::from_secs(10), || {
        (lb.metric("lb_accept_errors_total{kind=\"exhausted\"}")
            .unwrap_or(0.0)
            > 0.0)
            .then_some(())
    });
    let cpu0 = cpu_seconds(lb_pid);
    let t0 = Instant::now();
    wait_for("a second at the limit", Duration::from_secs(5), || {
        (t0.elapsed() >= Duration::from_secs(1)).then_some(())
    });
    let used = cpu_seconds(lb_pid) - cpu0;
    assert!(
        used < 0.3 * t0.elapsed().as_secs_f64(),
        "lb spun at the fd limit: {used:.2}s CPU in {:?}",
        t0.elapsed()
    );
    assert!(alive(lb_pid));
    drop(held);
    // Once the clients are gone lb serves again.
    wait_for("lb to serve again", Duration::from_secs(30), || {
        let mut c = connect(lb.addr, None);
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n")
            .ok()?;
        let mut out = String::new();
        c.read_to_string(&mut out).ok()?;
        out.starts_with("HTTP/1.1 200").then_some(())
    });
    assert!(lb.log_text().contains("accept failed"), "{}", lb.log_text());
}

#[test]
fn the_wait_queue_is_bounded_and_overflow_is_closed_and_counted() {
    // A worker that never gets ready: every connection has to wait.
    let lb = Lb::start(&[
        "-w",
        "1",
        "--wait-ready",
        "--max-queue",
        "2",
        "--queue-timeout",
        "20s",
        "--",
        "sleep",
        "600",
    ]);
    let waiting: Vec<_> = (0..2).map(|i| start_request(&lb, client_ip(i))).collect();
    wait_for("two queued connections", Duration::from_secs(10), || {
        (lb.metric("lb_queued_connections")? == 2.0).then_some(())
    });
    // The third is closed at once, not queued and not left hanging.
    let mut third = start_request(&lb, client_ip(2));
    let t = Instant::now();
    let mut buf = [0u8; 8];
    assert_eq!(third.read(&mut buf).unwrap_or(0), 0);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(
        lb.metric("lb_handoff_failures_total{reason=\"queue_full\"}"),
        Some(1.0)
    );
    assert_eq!(lb.metric("lb_queued_connections"), Some(2.0));
    drop(waiting);
}

#[test]
fn a_worker_at_its_pending_limit_is_skipped() {
    // Stopped worker, long stall timeout: only --max-pending bounds what is sent its way.
    let lb = Lb::start(&[
        "-w",
        "2",
        "-p",
        "round-robin",
        "--max-pending",
        "3",
        "--stall-timeout",
        "60s",
    ]);
    let pids = lb.wait_all_ready(2);
    kill(pids[0], Signal::SIGSTOP);
    // Round-robin alternates until slot 0 holds 3 unanswered handoffs; after that every
    // connection goes to slot 1 and is served.
    let mut held = Vec::new();
    let mut served_by_1 = 0;
    for i in 0..12 {
        let mut c = start_request(&lb, client_ip(i));
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut out = Vec::new();
        match c.read_to_end(&mut out) {
            Ok(_) if out.starts_with(b"HTTP/1.1 200") => served_by_1 += 1,
            _ => held.push(c), // with the stopped worker
        }
    }
    assert_eq!(
        held.len(),
        3,
        "exactly --max-pending connections wait for the stopped worker"
    );
    assert_eq!(served_by_1, 9);
    kill(pids[0], Signal::SIGCONT);
    for mut c in held {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (status, body) = read_response(&mut c);
        assert_eq!(status, 200);
        assert_eq!(slot_and_pid(std::str::from_utf8(&body).unwrap()).1, pids[0]);
    }
}
