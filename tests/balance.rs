//! Load lb can see and load it bounds (DESIGN §13): true active counts for every worker kind
//! (WebSockets included), `least-connections` placing by them, `--balance-factor` for many clients
//! behind one address, and `--hash-key` keys peeked from the request head.
//!
//! The Node tests need `node` and the npm packages of `examples/node` (the README test command
//! installs them).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, TcpStream};
use std::time::Duration;

use common::*;

/// How long lb may take to see a connection open or close (the bound).
const SEEN: Duration = Duration::from_secs(2);

/// Every slot's `lb_worker_active_connections`.
fn active(lb: &Lb, workers: usize) -> Vec<f64> {
    let text = lb.metrics_text();
    (0..workers)
        .map(|w| {
            metric_value(
                &text,
                &format!("lb_worker_active_connections{{worker=\"{w}\"}}"),
            )
            .unwrap_or(-1.0)
        })
        .collect()
}

/// Every slot's `lb_worker_connections_total`.
fn delivered(lb: &Lb, workers: usize) -> Vec<f64> {
    let text = lb.metrics_text();
    (0..workers)
        .map(|w| {
            metric_value(
                &text,
                &format!("lb_worker_connections_total{{worker=\"{w}\"}}"),
            )
            .unwrap_or(0.0)
        })
        .collect()
}

/// Waits (at most [`SEEN`]) for the active counts to read `want`.
fn wait_active(lb: &Lb, want: &[f64]) {
    let mut last = Vec::new();
    let t = std::time::Instant::now();
    while t.elapsed() < SEEN {
        last = active(lb, want.len());
        if last == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("active connections {last:?} after {SEEN:?}, want {want:?}");
}

/// `n` WebSockets from one address, each echoing once (so each is served, not only accepted).
fn hold_websockets(lb: &Lb, ip: IpAddr, n: usize) -> Vec<tungstenite::WebSocket<TcpStream>> {
    (0..n)
        .map(|i| {
            let mut ws = websocket(lb.addr, Some(ip), "/ws");
            let m = format!("hello {i}");
            ws.send(tungstenite::Message::text(m.clone())).unwrap();
            assert_eq!(ws.read().unwrap(), tungstenite::Message::text(m));
            ws
        })
        .collect()
}

/// 200 WebSockets from one address on a 2-slot lb: its home slot reads 200 active, the other 0;
/// after they close, both read 0.
fn websockets_are_counted(lb: &Lb) {
    lb.wait_all_ready(2);
    let ip = client_ip(17);
    let home = lb_route(ip, 2, &[]);
    let held = hold_websockets(lb, ip, 200);
    let mut want = vec![0.0; 2];
    want[home] = 200.0;
    wait_active(lb, &want);
    drop(held);
    wait_active(lb, &[0.0, 0.0]);
}

#[test]
fn websockets_on_builtin_workers_count_as_active_until_they_close() {
    websockets_are_counted(&Lb::start(&["-w", "2"]));
}

#[test]
fn websockets_on_a_node_sticky_worker_count_as_active_by_its_socket_count() {
    // REPORT=none: the worker says nothing; lb asks Node's count of the sockets it was sent.
    websockets_are_counted(&start_node(
        &["-w", "2"],
        &example("server.js"),
        &[("REPORT", "none")],
    ));
}

#[test]
fn websockets_on_a_node_cluster_worker_count_as_active_in_the_kernel() {
    // Connections go to it as `newconn`s; it reports nothing (no process.send at all).
    websockets_are_counted(&start_node(&["-w", "2"], &fixture("cluster-ws.js"), &[]));
}

#[test]
fn connections_held_by_a_rust_worker_on_lb_worker_count_as_active() {
    let exe = echo_worker();
    let lb = Lb::start(&["-w", "2", "--wait-ready", "--", exe.to_str().unwrap()]);
    lb.wait_all_ready(2);
    let ip = client_ip(23);
    let home = lb_route(ip, 2, &[]);
    let held: Vec<_> = (0..200)
        .map(|i| {
            let mut c = connect(lb.addr, Some(ip));
            c.write_all(format!("line {i}\n").as_bytes()).unwrap();
            let mut r = BufReader::new(c);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, format!("[{home}] line {i}\n"));
            r
        })
        .collect();
    let mut want = vec![0.0; 2];
    want[home] = 200.0;
    wait_active(&lb, &want);
    drop(held);
    wait_active(&lb, &[0.0, 0.0]);
}

#[test]
fn least_connections_places_websockets_by_what_is_open() {
    let lb = Lb::start(&["-w", "3", "--policy", "least-connections"]);
    lb.wait_all_ready(3);
    // Opens one WebSocket and says which slot took it.
    let open = |i: usize| {
        let before = delivered(&lb, 3);
        let ws = hold_websockets(&lb, client_ip(100 + i), 1).pop().unwrap();
        // (The worker may answer before lb has its ACK.)
        let slot = wait_for("the ACK", SEEN, || {
            let after = delivered(&lb, 3);
            (0..3).find(|&s| after[s] > before[s])
        });
        (slot, ws)
    };
    let mut by_slot: Vec<Vec<_>> = vec![Vec::new(), Vec::new(), Vec::new()];
    for i in 0..9 {
        let (slot, ws) = open(i);
        by_slot[slot].push(ws);
    }
    let counts: Vec<usize> = by_slot.iter().map(Vec::len).collect();
    assert_eq!(counts, [3, 3, 3]);
    wait_active(&lb, &[3.0, 3.0, 3.0]);
    by_slot[1].clear();
    wait_active(&lb, &[3.0, 0.0, 3.0]);
    let next: Vec<_> = (9..12).map(open).collect();
    let slots: Vec<usize> = next.iter().map(|(s, _)| *s).collect();
    assert_eq!(slots, [1, 1, 1], "the next three go where nothing is open");
}
