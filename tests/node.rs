//! Unmodified Node.js sticky-session workers under lb (`lb -- node app.js`).
//!
//! Needs `node` and the npm packages of `examples/node` (the README test command installs them).

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::*;

fn whoami(stream: &mut std::net::TcpStream, close: bool) -> serde_json::Value {
    let (status, body) = request(stream, "GET", "/whoami", b"", close);
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

#[test]
fn one_client_s_connections_reach_one_node_worker_which_sees_the_real_address() {
    // NODE_UNIQUE_ID in lb's own environment must not reach the workers (it would turn them
    // into cluster workers waiting for a cluster primary).
    let lb = start_node(
        &["-w", "2"],
        &example("server.js"),
        &[("NODE_UNIQUE_ID", "7")],
    );
    lb.wait_all_ready(2);
    for i in 0..6 {
        let ip = client_ip(100 + i);
        // Three separate connections (lb places each), then two requests on one kept alive.
        let mut replies: Vec<_> = (0..3)
            .map(|_| whoami(&mut connect(lb.addr, Some(ip)), true))
            .collect();
        let mut conn = connect(lb.addr, Some(ip));
        replies.extend((0..2).map(|_| whoami(&mut conn, false)));
        for r in &replies {
            assert_eq!(
                r["pid"], replies[0]["pid"],
                "one client's connections reached different workers"
            );
            assert_eq!(
                r["remoteAddress"],
                ip.to_string(),
                "the worker must see the real client address"
            );
        }
        // And the sticky slot is the one `lb route` names.
        assert_eq!(
            replies[0]["slot"]
                .as_str()
                .unwrap()
                .parse::<usize>()
                .unwrap(),
            lb_route(ip, 2, &[])
        );
    }
}

#[test]
fn websocket_echo_with_the_ws_package_and_a_1mb_message() {
    let lb = start_node(&["-w", "2"], &example("server.js"), &[]);
    lb.wait_all_ready(2);
    let (mut ws, _) = tungstenite::connect(format!("ws://{}/ws", lb.addr)).expect("handshake");
    let big: Vec<u8> = (0..1_048_576u32).map(|i| (i * 7 % 256) as u8).collect();
    ws.send(tungstenite::Message::binary(big.clone())).unwrap();
    assert_eq!(ws.read().unwrap().into_data().as_ref(), big.as_slice());
    let text = "é✓😀".repeat(100_000);
    ws.send(tungstenite::Message::text(text.clone())).unwrap();
    assert_eq!(ws.read().unwrap().into_text().unwrap().as_str(), text);
    ws.close(None).unwrap();
}

fn socketio_clients(lb: &Lb, clients: usize) -> Vec<serde_json::Value> {
    let out = Command::new("node")
        .arg(fixture("sio-client.js"))
        .arg(format!("http://{}", lb.addr))
        .arg(clients.to_string())
        .arg("10000")
        .env("NODE_PATH", node_modules())
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("client summary")
}

#[test]
fn socketio_with_default_transports_works_across_3_workers_under_sticky() {
    let lb = start_node(&["-w", "3"], &example("socketio.js"), &[]);
    lb.wait_all_ready(3);
    let results = socketio_clients(&lb, 24);
    let failed: Vec<_> = results.iter().filter(|r| r["ok"] != true).collect();
    assert!(failed.is_empty(), "socket.io clients failed: {failed:?}");
    assert!(
        results.iter().all(|r| r["transport"] == "websocket"),
        "every client upgraded to websocket"
    );
    let pids: std::collections::HashSet<_> =
        results.iter().map(|r| r["pid"].as_u64().unwrap()).collect();
    assert_eq!(pids.len(), 3, "clients should be spread over all 3 workers");
}

#[test]
fn socketio_long_polling_breaks_without_stickiness() {
    // The control for the test above: the same clients under round-robin fail, which is why
    // sticky routing matters.
    let lb = start_node(
        &["-w", "3", "-p", "round-robin"],
        &example("socketio.js"),
        &[],
    );
    lb.wait_all_ready(3);
    let results = socketio_clients(&lb, 6);
    assert!(
        results.iter().any(|r| r["ok"] != true),
        "round-robin unexpectedly worked: {results:?}"
    );
}

#[test]
fn a_20mb_post_is_echoed_byte_exact() {
    let lb = start_node(&["-w", "2"], &example("server.js"), &[]);
    lb.wait_all_ready(2);
    let body: Vec<u8> = (0..20 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut conn = connect(lb.addr, None);
    // Write from another thread: the worker streams the echo back while it is still reading.
    let mut writer = conn.try_clone().unwrap();
    let sent = body.clone();
    let w = std::thread::spawn(move || {
        use std::io::Write;
        let head = format!(
            "POST /echo HTTP/1.1\r\nhost: lb\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            sent.len()
        );
        writer.write_all(head.as_bytes()).unwrap();
        writer.write_all(&sent).unwrap();
    });
    let (status, echoed) = read_response(&mut conn);
    w.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(echoed.len(), body.len());
    assert!(echoed == body, "echoed body differs");
}

/// Sends a known pattern of requests and checks lb's per-worker counts against what each
/// worker says it served.
fn counts_match(report: &str) {
    let lb = start_node(&["-w", "3"], &example("server.js"), &[("REPORT", report)]);
    lb.wait_all_ready(3);
    let mut served: HashMap<usize, u64> = HashMap::new();
    for i in 0..30 {
        let ip = client_ip(200 + i);
        let mut conn = connect(lb.addr, Some(ip));
        let n = 1 + i % 3;
        for k in 0..n {
            let r = whoami(&mut conn, k + 1 == n);
            let slot: usize = r["slot"].as_str().unwrap().parse().unwrap();
            *served.entry(slot).or_default() += 1;
        }
    }
    assert_eq!(served.values().sum::<u64>(), 60);
    wait_for(
        "lb's request counts to match what the workers served",
        Duration::from_secs(10),
        || {
            let text = lb.metrics_text();
            (0..3)
                .all(|s| {
                    metric_value(
                        &text,
                        &format!("lb_worker_requests_total{{worker=\"{s}\"}}"),
                    ) == Some(*served.get(&s).unwrap_or(&0) as f64)
                })
                .then_some(())
        },
    );
    assert_eq!(lb.metric("lb_accepted_connections_total"), Some(30.0));
}

#[test]
fn request_counts_from_stats_messages_match_what_each_worker_served() {
    counts_match("stats");
}

#[test]
fn request_counts_from_request_messages_match_what_each_worker_served() {
    counts_match("request");
}

#[test]
fn a_worker_that_registers_its_listener_late_still_gets_its_connections() {
    let lb = start_node(&["-w", "2"], &fixture("late-listener.js"), &[]);
    // Connect at once: the listener appears only after 1 s.
    let (status, body) = http_get(lb.addr, "/", None);
    assert_eq!(status, 200);
    assert!(body.starts_with("late worker pid"), "{body}");
}

#[test]
fn a_worker_that_sends_lb_a_handle_is_answered_and_keeps_working() {
    let lb = start_node(&["-w", "1"], &fixture("handle-sender.js"), &[]);
    lb.wait_all_ready(1);
    // Node retransmits a NACKed handle 3 times: lb answers each one.
    wait_for(
        "the worker's handle to be refused",
        Duration::from_secs(10),
        || {
            (lb.metric("lb_channel_messages_dropped_total{reason=\"stray_fd\"}")? >= 4.0)
                .then_some(())
        },
    );
    for _ in 0..5 {
        assert_eq!(http_get(lb.addr, "/", None).0, 200);
    }
    // Its later messages are not stuck behind the handle: the request messages arrive.
    wait_for(
        "request messages after the handle",
        Duration::from_secs(10),
        || (lb.metric("lb_worker_requests_total{worker=\"0\"}")? == 5.0).then_some(()),
    );
    assert!(
        lb.metric("lb_channel_messages_dropped_total{reason=\"ignored\"}")
            .unwrap()
            >= 2.0
    );
}

#[test]
fn active_connections_of_a_worker_that_reports_nothing_come_from_nodes_socket_count() {
    // server.js with REPORT=none sends no stats: lb asks Node's own per-key socket count.
    let lb = start_node(&["-w", "1"], &example("server.js"), &[("REPORT", "none")]);
    lb.wait_all_ready(1);
    let mut conns: Vec<_> = (0..3)
        .map(|_| {
            let mut c = connect(lb.addr, None);
            whoami(&mut c, false);
            c
        })
        .collect();
    let series = "lb_worker_active_connections{worker=\"0\"}";
    wait_for("3 active connections", Duration::from_secs(10), || {
        (lb.metric(series)? == 3.0).then_some(())
    });
    conns.truncate(1);
    wait_for(
        "1 active connection after 2 closed",
        Duration::from_secs(10),
        || (lb.metric(series)? == 1.0).then_some(()),
    );
    assert_eq!(lb.workers()["workers"][0]["active_connections"], 1);
}

#[test]
fn rolling_restart_of_node_workers_under_churn_loses_nothing() {
    let lb = start_node(&["-w", "2"], &example("server.js"), &[]);
    let before = lb.wait_all_ready(2);
    let churn = Churn::start(lb.addr, 3, 500, 20);
    churn.wait_more("traffic before the roll", 100);
    lb.signal(Signal::SIGUSR2);
    wait_for(
        "both Node workers replaced",
        Duration::from_secs(30),
        || {
            let w = lb.workers();
            let rows = w["workers"].as_array()?.clone();
            rows.iter()
                .all(|r| {
                    r["state"] == "ready"
                        && r["pid"]
                            .as_u64()
                            .is_some_and(|p| !before.contains(&(p as u32)))
                })
                .then_some(())
        },
    );
    churn.wait_more("traffic after the roll", 100);
    churn.stop().assert_no_failures();
    for p in before {
        wait_for("old Node workers to exit", Duration::from_secs(10), || {
            (!alive(p)).then_some(())
        });
    }
}
