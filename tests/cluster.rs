//! Node cluster apps, unmodified: `lb -- node app.js` for the single-file
//! `if (cluster.isPrimary) … else …` pattern (DESIGN §8). lb is the primary: the worker branch
//! runs, `listen()` on lb's port is served by lb's policy, other ports are shared sockets, and
//! socket.io's cluster adapter is relayed.
//!
//! Needs `node` and the npm packages of `examples/node` (the README test command installs them).

mod common;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Parses `worker <id> pid <pid> slot <slot>` (the sticky fixture's body).
fn id_pid_slot(body: &str) -> (u64, u32, usize) {
    let p: Vec<&str> = body.split_whitespace().collect();
    assert!(
        p.len() == 6 && p[0] == "worker" && p[2] == "pid" && p[4] == "slot",
        "{body:?}"
    );
    (
        p[1].parse().unwrap(),
        p[3].parse().unwrap(),
        p[5].parse().unwrap(),
    )
}

#[test]
fn a_cluster_app_whose_workers_take_handed_sockets_keeps_every_client_on_one_worker() {
    let lb = start_node(&["-w", "3"], &fixture("cluster-sticky.js"), &[]);
    lb.wait_all_ready(3);
    let mut home: HashMap<IpAddr, (u64, u32, usize)> = HashMap::new();
    for round in 0..2 {
        for i in 0..120 {
            let ip = client_ip(i);
            let (status, body) = http_get(lb.addr, "/", Some(ip));
            assert_eq!(status, 200);
            let got = id_pid_slot(&body);
            let want = *home.entry(ip).or_insert(got);
            assert_eq!(got, want, "client {ip} moved in round {round}");
        }
    }
    // cluster.worker.id is unique per worker (NODE_UNIQUE_ID), and lb route predicts the slot.
    let ids: HashSet<u64> = home.values().map(|v| v.0).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    for (ip, (_, _, slot)) in home.iter().take(40) {
        assert_eq!(*slot, lb_route(*ip, 3, &[]));
    }
    // The workers' own `listen(0, 'localhost')` was answered (a shared socket), logged once.
    assert_eq!(
        lb.log_text().matches("served as a shared socket").count(),
        1,
        "{}",
        lb.log_text()
    );
}

#[test]
fn a_cluster_app_that_listens_on_lbs_port_gets_sticky_connections_and_exact_counts() {
    let lb = start_node(&["-w", "3"], &fixture("cluster-listen.js"), &[]);
    let pids = lb.wait_all_ready(3);
    let slot_of: HashMap<u32, usize> = pids.iter().enumerate().map(|(s, p)| (*p, s)).collect();
    let mut per_slot = [0u64; 3];
    let mut home: HashMap<IpAddr, u32> = HashMap::new();
    for round in 0..2 {
        for i in 0..60 {
            let ip = client_ip(500 + i);
            let (status, body) = http_get(lb.addr, "/", Some(ip));
            assert_eq!(status, 200, "{body}");
            let (_, pid) = slot_and_pid(&body);
            assert_eq!(
                *home.entry(ip).or_insert(pid),
                pid,
                "client {ip} moved in round {round}"
            );
            let slot = slot_of[&pid];
            assert_eq!(slot, lb_route(ip, 3, &[]), "lb route predicts {ip}");
            per_slot[slot] += 1;
        }
    }
    assert!(per_slot.iter().all(|&n| n > 0), "{per_slot:?}");
    wait_for(
        "exact per-slot request counts",
        Duration::from_secs(10),
        || {
            (0..3)
                .all(|s| {
                    lb.metric(&format!("lb_worker_requests_total{{worker=\"{s}\"}}"))
                        == Some(per_slot[s] as f64)
                })
                .then_some(())
        },
    );
    for (s, n) in per_slot.iter().enumerate() {
        assert_eq!(
            lb.metric(&format!("lb_worker_connections_total{{worker=\"{s}\"}}")),
            Some(*n as f64)
        );
    }
}

#[test]
fn a_rolling_restart_of_a_cluster_app_with_no_sigterm_handler_loses_nothing() {
    let lb = start_node(&["-w", "2"], &fixture("cluster-listen.js"), &[]);
    let before = lb.wait_all_ready(2);
    // A slow request in flight on each old worker when the roll starts: it must finish.
    let slow: Vec<_> = (0..2)
        .map(|slot| {
            let mut c = connect(lb.addr, Some(ips_of(slot, 2, 1)[0]));
            use std::io::Write;
            c.write_all(b"GET /sleep/1000 HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n")
                .unwrap();
            c
        })
        .collect();
    wait_for(
        "both slow requests in their workers",
        Duration::from_secs(10),
        || {
            (lb.metric("lb_worker_requests_total{worker=\"0\"}")? >= 1.0
                && lb.metric("lb_worker_requests_total{worker=\"1\"}")? >= 1.0)
                .then_some(())
        },
    );
    let churn = Churn::start(lb.addr, 3, 700, 20);
    churn.wait_more("requests before the roll", 60);
    lb.signal(Signal::SIGUSR2);
    for (slot, mut c) in slow.into_iter().enumerate() {
        let (status, body) = read_response(&mut c);
        assert_eq!(status, 200);
        assert_eq!(
            slot_and_pid(std::str::from_utf8(&body).unwrap()),
            (slot, before[slot]),
            "served by the old worker while it drained"
        );
    }
    wait_for("every worker replaced", Duration::from_secs(30), || {
        let w = lb.workers();
        let rows = w["workers"].as_array()?.clone();
        rows.iter()
            .all(|r| {
                r["state"] == "ready" && !before.contains(&(r["pid"].as_u64().unwrap() as u32))
            })
            .then_some(())
    });
    churn.wait_more("requests after the roll", 60);
    let result = churn.stop();
    result.assert_no_failures();
    for (ip, slots) in &result.seen {
        assert_eq!(slots.len(), 1, "{ip} was served by slots {slots:?}");
    }
    for p in before {
        wait_for("the old worker to exit", Duration::from_secs(10), || {
            (!alive(p)).then_some(())
        });
    }
    assert!(
        lb.log_text().contains("rolling restart complete"),
        "{}",
        lb.log_text()
    );
}

#[test]
fn a_worker_that_also_listens_on_another_port_serves_both_and_lb_logs_it_once() {
    let lb = start_node(
        &["-w", "2"],
        &fixture("cluster-listen.js"),
        &[("SECOND_PORT", "0")],
    );
    lb.wait_all_ready(2);
    // Both workers got the same shared socket for their second server (one key, one port).
    let port: u16 = wait_for("the second port", Duration::from_secs(10), || {
        let ports: HashSet<u16> = lb
            .log_text()
            .lines()
            .filter_map(|l| l.strip_prefix("second port ")?.trim().parse().ok())
            .collect();
        (ports.len() == 1 && lb.log_text().matches("second port ").count() == 2)
            .then(|| *ports.iter().next().unwrap())
    });
    let second = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    for i in 0..4 {
        let (status, body) = http_get(second, "/", Some(client_ip(i)));
        assert_eq!(status, 200);
        assert!(body.starts_with("second "), "{body}");
        assert_eq!(
            served_by(lb.addr, Some(client_ip(i))).0,
            lb_route(client_ip(i), 2, &[])
        );
    }
    assert_eq!(
        lb.log_text().matches("served as a shared socket").count(),
        1
    );
}

/// Runs the socket.io broadcast client against `lb` (`binary` > 0: a Buffer of that size).
fn sio_broadcast(lb: &Lb, clients: usize, binary: usize) -> serde_json::Value {
    let out = Command::new("node")
        .arg(fixture("sio-broadcast.js"))
        .arg(format!("http://{}", lb.addr))
        .args([clients.to_string().as_str(), "20000"])
        .env("NODE_PATH", node_modules())
        .env("BINARY", binary.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn socket_io_with_the_cluster_adapter_broadcasts_to_clients_on_every_worker() {
    let lb = start_node(&["-w", "3"], &example("socketio-cluster.js"), &[]);
    lb.wait_all_ready(3);
    let r = sio_broadcast(&lb, 30, 0);
    assert_eq!(r["why"], "done", "{r}");
    assert_eq!(r["connected"], 30);
    assert_eq!(r["upgraded"], 30);
    assert_eq!(r["received"], 30, "the broadcast reached every client");
    assert_eq!(
        r["pids"].as_array().unwrap().len(),
        3,
        "clients on all 3 workers, so the broadcast crossed workers: {r}"
    );
}

#[test]
fn malformed_cluster_messages_are_counted_and_a_worker_ignoring_disconnect_is_killed() {
    let mut lb = Lb::start_with(
        &[
            "-w",
            "2",
            "--wait-ready",
            "--shutdown-timeout",
            "1s",
            "--",
            "python3",
            &fixture("raw_worker.py"),
        ],
        &[("MODE", "badcluster")],
    );
    let pids = lb.wait_all_ready(2);
    wait_for(
        "the malformed messages counted",
        Duration::from_secs(10),
        || {
            (lb.metric("lb_channel_messages_dropped_total{reason=\"malformed\"}")? >= 3.0)
                .then_some(())
        },
    );
    assert_eq!(
        lb.log_text().matches("malformed cluster message").count(),
        1
    );
    // Both workers serve, the misbehaving one included.
    for (slot, pid) in pids.iter().enumerate() {
        for ip in ips_of(slot, 2, 2) {
            assert_eq!(served_by(lb.addr, Some(ip)), (slot, *pid));
        }
    }
    // Shutdown: slot 0 (a cluster worker) is sent `disconnect`, ignores it, and is killed after
    // the shutdown timeout; lb exits cleanly.
    let t = Instant::now();
    lb.signal(Signal::SIGTERM);
    assert_eq!(lb.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(t.elapsed() >= Duration::from_secs(1) && t.elapsed() < Duration::from_secs(6));
    assert!(
        lb.log_text()
            .contains("still running after the shutdown timeout")
    );
    for p in pids {
        wait_for("workers gone", Duration::from_secs(5), || {
            (!alive(p)).then_some(())
        });
    }
}

#[test]
fn with_heartbeat_ping_a_worker_that_stops_answering_is_replaced() {
    let lb = start_node(
        &[
            "-w",
            "2",
            "--heartbeat-ping",
            "200ms",
            "--heartbeat-timeout",
            "1s",
        ],
        &fixture("ping-answerer.js"),
        &[("ANSWER_FOR_MS", "1500")],
    );
    let first = lb.wait_all_ready(2);
    wait_for("slot 1 replaced", Duration::from_secs(15), || {
        (lb.metric("lb_worker_restarts_total{worker=\"1\"}")? >= 1.0).then_some(())
    });
    assert!(lb.log_text().contains("no heartbeat"), "{}", lb.log_text());
    // Slot 0 keeps answering: never replaced.
    holds_for(
        "slot 0 keeps its worker",
        Duration::from_millis(1500),
        || {
            lb.workers()["workers"][0]["pid"] == first[0]
                && lb.metric("lb_worker_restarts_total{worker=\"0\"}") == Some(0.0)
        },
    );
}

#[test]
fn a_connection_a_cluster_worker_refuses_goes_to_another_worker() {
    // At its maxConnections a Node worker answers a newconn with `accepted: false`.
    let lb = start_node(
        &["-w", "2"],
        &fixture("cluster-listen.js"),
        &[("MAX_CONNECTIONS", "1")],
    );
    let pids = lb.wait_all_ready(2);
    let ips = ips_of(0, 2, 2);
    let mut busy = connect(lb.addr, Some(ips[0]));
    use std::io::Write;
    busy.write_all(b"GET /sleep/3000 HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n")
        .unwrap();
    wait_for(
        "the slow request in slot 0",
        Duration::from_secs(10),
        || (lb.metric("lb_worker_requests_total{worker=\"0\"}")? >= 1.0).then_some(()),
    );
    // Slot 0 refuses the next one of its clients (first try and 3 retries): slot 1 serves it.
    assert_eq!(served_by(lb.addr, Some(ips[1])), (1, pids[1]));
    assert_eq!(
        lb.metric("lb_handoff_failures_total{reason=\"nack\"}"),
        Some(4.0)
    );
    let (status, body) = read_response(&mut busy);
    assert_eq!(
        (status, slot_and_pid(std::str::from_utf8(&body).unwrap())),
        (200, (0, pids[0]))
    );
}

#[test]
fn with_advanced_serialization_a_binary_broadcast_arrives_as_binary_on_every_worker() {
    let lb = start_node(
        &["-w", "3", "--serialization", "advanced"],
        &example("socketio-cluster.js"),
        &[],
    );
    lb.wait_all_ready(3);
    let r = sio_broadcast(&lb, 30, 1024);
    assert_eq!(r["why"], "done", "{r}");
    assert_eq!(r["pids"].as_array().unwrap().len(), 3, "{r}");
    assert_eq!(
        r["received"], 30,
        "1 KiB byte-exact as binary at every client: {r}"
    );
    // The control: in json mode the clients on the other workers get an object, not bytes.
    let json = start_node(&["-w", "3"], &example("socketio-cluster.js"), &[]);
    json.wait_all_ready(3);
    let r = sio_broadcast(&json, 30, 1024);
    assert_eq!(r["pids"].as_array().unwrap().len(), 3, "{r}");
    assert!(r["notBinary"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn worker_styles_can_be_mixed_across_the_workers_of_one_app() {
    let lb = start_node(&["-w", "2"], &fixture("cluster-mixed.js"), &[]);
    let pids = lb.wait_all_ready(2);
    for (slot, pid) in pids.iter().enumerate() {
        let style = if slot == 0 { "listen" } else { "handle" };
        for ip in ips_of(slot, 2, 5) {
            let (status, body) = http_get(lb.addr, "/", Some(ip));
            assert_eq!(status, 200);
            assert_eq!(body, format!("worker {slot} pid {pid} {style}\n"));
        }
    }
}
