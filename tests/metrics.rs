//! The Prometheus endpoint and admin API, checked with real tools (promtool, a Prometheus
//! server) and exact request patterns.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn exact_counts_after_a_known_pattern_of_requests() {
    let lb = Lb::start(&["-w", "3"]);
    lb.wait_all_ready(3);
    let mut served: HashMap<usize, u64> = HashMap::new();
    let mut conns: HashMap<usize, u64> = HashMap::new();
    let mut connections = 0;
    for i in 0..40 {
        let mut c = connect(lb.addr, Some(client_ip(i)));
        connections += 1;
        let n = 1 + i % 4;
        for k in 0..n {
            let (status, body) = request(&mut c, "GET", "/", b"", k + 1 == n);
            assert_eq!(status, 200);
            let slot = slot_and_pid(std::str::from_utf8(&body).unwrap()).0;
            *served.entry(slot).or_default() += 1;
            if k == 0 {
                *conns.entry(slot).or_default() += 1;
            }
        }
    }
    wait_for("exact per-worker counts", Duration::from_secs(10), || {
        let text = lb.metrics_text();
        (0..3)
            .all(|s| {
                let req = metric_value(
                    &text,
                    &format!("lb_worker_requests_total{{worker=\"{s}\"}}"),
                );
                let con = metric_value(
                    &text,
                    &format!("lb_worker_connections_total{{worker=\"{s}\"}}"),
                );
                req == Some(*served.get(&s).unwrap_or(&0) as f64)
                    && con == Some(*conns.get(&s).unwrap_or(&0) as f64)
            })
            .then_some(())
    });
    assert_eq!(
        lb.metric("lb_accepted_connections_total"),
        Some(connections as f64)
    );
    assert_eq!(
        lb.metric("lb_handoff_duration_seconds_count"),
        Some(connections as f64)
    );
    // /workers agrees with /metrics.
    let w = lb.workers();
    for s in 0..3 {
        assert_eq!(w["workers"][s]["requests"], *served.get(&s).unwrap_or(&0));
        assert_eq!(w["workers"][s]["slot"], s);
        assert!(w["workers"][s]["uptime_seconds"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(w["policy"], "sticky");
}

#[test]
fn counters_never_go_backwards_when_a_worker_is_killed_and_respawned() {
    let lb = Lb::start(&["-w", "2"]);
    let pids = lb.wait_all_ready(2);
    // Put traffic on slot 0 only.
    let ips: Vec<_> = (0..200)
        .map(client_ip)
        .filter(|ip| lb_route(*ip, 2, &[]) == 0)
        .take(5)
        .collect();
    for ip in &ips {
        for _ in 0..4 {
            served_by(lb.addr, Some(*ip));
        }
    }
    let series = "lb_worker_requests_total{worker=\"0\"}";
    wait_for("20 requests counted", Duration::from_secs(10), || {
        (lb.metric(series)? == 20.0).then_some(())
    });
    kill(pids[0], Signal::SIGKILL);
    let mut last = 20.0;
    let deadline = Instant::now() + Duration::from_secs(10);
    // Scrape through the restart: never below the previous value.
    loop {
        let v = lb.metric(series).unwrap();
        assert!(v >= last, "counter went backwards: {last} -> {v}");
        last = v;
        let w = lb.workers();
        if w["workers"][0]["state"] == "ready" && w["workers"][0]["pid"] != pids[0] {
            break;
        }
        assert!(Instant::now() < deadline, "slot 0 was not refilled");
    }
    for ip in &ips {
        served_by(lb.addr, Some(*ip));
    }
    wait_for(
        "the new worker's requests added on top",
        Duration::from_secs(10),
        || (lb.metric(series)? == 25.0).then_some(()),
    );
    assert_eq!(
        lb.metric("lb_worker_restarts_total{worker=\"0\"}"),
        Some(1.0)
    );
    assert_eq!(
        lb.metric("lb_worker_connections_total{worker=\"0\"}"),
        Some(25.0)
    );
}

#[test]
fn promtool_accepts_the_real_output() {
    let lb = Lb::start(&["-w", "2"]);
    lb.wait_all_ready(2);
    for i in 0..10 {
        served_by(lb.addr, Some(client_ip(i)));
    }
    let text = lb.metrics_text();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`; the README test command installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "lb_worker_requests_total",
        "lb_worker_connections_total",
        "lb_worker_active_connections",
        "lb_worker_up",
        "lb_worker_restarts_total",
        "lb_worker_memory_bytes",
        "lb_accepted_connections_total",
        "lb_handoff_failures_total",
        "lb_handoff_duration_seconds",
        "lb_build_info",
    ] {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "missing HELP for {name}"
        );
    }
    assert!(!text.contains("pid="), "series must not be labelled by pid");
}

#[test]
fn a_real_prometheus_server_scrapes_the_right_sum() {
    let lb = Lb::start(&["-w", "2"]);
    lb.wait_all_ready(2);
    for i in 0..17 {
        served_by(lb.addr, Some(client_ip(i)));
    }
    wait_for("17 requests counted", Duration::from_secs(10), || {
        let t = lb.metrics_text();
        let sum: f64 = (0..2)
            .filter_map(|s| {
                metric_value(&t, &format!("lb_worker_requests_total{{worker=\"{s}\"}}"))
            })
            .sum();
        (sum == 17.0).then_some(())
    });
    let prom = Prometheus::start(&[lb.metrics.unwrap()], None);
    let value = wait_for("Prometheus to scrape lb", Duration::from_secs(60), || {
        prom.query("sum(lb_worker_requests_total)")?.first()?["value"][1]
            .as_str()
            .map(str::to_owned)
    });
    assert_eq!(value, "17");
}

#[test]
fn metrics_answer_quickly_while_a_worker_is_stopped() {
    let lb = Lb::start(&["-w", "2"]);
    let pids = lb.wait_all_ready(2);
    kill(pids[1], Signal::SIGSTOP);
    for _ in 0..5 {
        let t = Instant::now();
        let text = lb.metrics_text();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "scrape took {:?}",
            t.elapsed()
        );
        assert!(text.contains("lb_worker_up{worker=\"1\"}"));
        let t = Instant::now();
        lb.workers();
        assert!(t.elapsed() < Duration::from_secs(1));
    }
    kill(pids[1], Signal::SIGCONT);
}

#[test]
fn healthz_workers_and_unknown_paths() {
    let lb = Lb::start(&["-w", "2", "-p", "least-connections"]);
    lb.wait_all_ready(2);
    let m = lb.metrics.unwrap();
    assert_eq!(http_get(m, "/healthz", None).0, 200);
    assert_eq!(http_get(m, "/nope", None).0, 404);
    let w = lb.workers();
    assert_eq!(w["policy"], "least-connections");
    let rows = w["workers"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for key in [
        "slot",
        "pid",
        "state",
        "uptime_seconds",
        "connections",
        "active_connections",
        "requests",
        "restarts",
    ] {
        assert!(rows[0].get(key).is_some(), "missing {key}");
    }
}

#[test]
fn metrics_off_disables_the_endpoint() {
    let lb = Lb::start(&["-w", "1", "--metrics", "off"]);
    assert!(lb.metrics.is_none());
    assert!(lb.log_text().contains("metrics off"));
    assert_eq!(served_by(lb.addr, None).0, 0);
}

#[test]
fn idle_connections_to_the_admin_endpoint_are_capped_and_counted() {
    let lb = Lb::start(&["-w", "1"]);
    lb.wait_all_ready(1);
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let before = fds(lb.pid());
    // 300 connections that never send a request.
    let idle: Vec<_> = (0..300)
        .map(|i| connect(lb.metrics.unwrap(), Some(client_ip(i))))
        .collect();
    // lb keeps at most 64 of them; the others are closed at once.
    wait_for(
        "the extra admin connections closed",
        Duration::from_secs(10),
        || (fds(lb.pid()) <= before + 64 + 4).then_some(()),
    );
    // Clients are still served meanwhile.
    assert_eq!(served_by(lb.addr, None).0, 0);
    drop(idle);
    let refused = wait_for("a scrape after the flood", Duration::from_secs(20), || {
        let t = std::panic::catch_unwind(|| lb.metrics_text()).ok()?;
        metric_value(&t, "lb_admin_refused_connections_total")
    });
    assert!(refused >= 236.0, "refused {refused}");
}
