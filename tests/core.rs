//! Core behaviour through the real binary: HTTP, WebSocket, stickiness, policies, bad input.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn one_client_s_new_connections_all_reach_one_worker_and_keep_alive_works() {
    // lb decides where each new connection goes: with sticky, every connection from one client
    // address lands on the same worker (with round-robin, the control, they alternate).
    let lb = Lb::start(&["-w", "2"]);
    lb.wait_all_ready(2);
    let ip = client_ip(7);
    let seen: Vec<_> = (0..6).map(|_| served_by(lb.addr, Some(ip))).collect();
    assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
    let home = seen[0];
    assert_eq!(home.0, lb_route(ip, 2, &[]));
    let rr = Lb::start(&["-w", "2", "-p", "round-robin"]);
    rr.wait_all_ready(2);
    let slots: std::collections::HashSet<_> =
        (0..6).map(|_| served_by(rr.addr, Some(ip)).0).collect();
    assert_eq!(
        slots.len(),
        2,
        "round-robin spreads one client's connections"
    );
    // Keep-alive and POST echo on one connection through lb.
    let mut conn = connect(lb.addr, Some(ip));
    for _ in 0..3 {
        let (status, body) = request(&mut conn, "GET", "/", b"", false);
        assert_eq!(status, 200);
        assert_eq!(slot_and_pid(std::str::from_utf8(&body).unwrap()), home);
    }
    let (status, body) = request(&mut conn, "POST", "/echo", b"hello lb", false);
    assert_eq!((status, body.as_slice()), (200, &b"hello lb"[..]));
    let (status, _) = request(&mut conn, "GET", "/nope", b"", true);
    assert_eq!(status, 404);
}

#[test]
fn pipelined_requests_of_every_kind_are_answered_in_order_on_one_connection() {
    // `GET /` is answered on the built-in worker's fast path, the rest by hyper from the bytes
    // the fast path had already read: one write carrying all of them must get every answer, in
    // order, and the connection must close after the one that asked for it.
    use std::io::{Read, Write};
    let lb = Lb::start(&["-w", "1"]);
    lb.wait_all_ready(1);
    let mut conn = connect(lb.addr, None);
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\n\
          GET / HTTP/1.1\r\nhost: a\r\n\r\n\
          POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello\
          GET / HTTP/1.1\r\nhost: a\r\n\r\n\
          GET /nope HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    let mut answers = Vec::new();
    let mut rest = raw.as_slice();
    while !rest.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(n) = resp.parse(rest).unwrap() else {
            panic!("a partial response: {:?}", String::from_utf8_lossy(rest));
        };
        let len: usize = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
            .expect("content-length");
        answers.push((
            resp.code.unwrap(),
            String::from_utf8_lossy(&rest[n..n + len]).into_owned(),
        ));
        rest = &rest[n + len..];
    }
    let codes: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert_eq!(codes, [200, 200, 200, 200, 404], "{answers:?}");
    assert!(answers[0].1.starts_with("worker 0 pid "), "{answers:?}");
    assert_eq!(answers[0].1, answers[3].1);
    assert_eq!(answers[2].1, "hello");
    // HTTP/1.0 is answered too (by hyper), and closed.
    let mut conn = connect(lb.addr, None);
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    assert!(text.ends_with(&answers[0].1), "{text}");
}

#[test]
fn websocket_echo_through_builtin_workers() {
    let lb = Lb::start(&["-w", "2"]);
    let url = format!("ws://{}/ws", lb.addr);
    let (mut ws, resp) = tungstenite::connect(&url).expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    ws.send(tungstenite::Message::text("hello")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("hello"));
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(tungstenite::Message::binary(big.clone())).unwrap();
    assert_eq!(ws.read().unwrap().into_data().as_ref(), big.as_slice());
    ws.close(None).unwrap();
}

#[test]
fn sticky_clients_always_reach_the_same_worker_and_spread_evenly() {
    let workers = 4;
    let lb = Lb::start(&["-w", "4"]);
    lb.wait_all_ready(workers);
    let clients = 240;
    let mut home: HashMap<std::net::IpAddr, usize> = HashMap::new();
    for round in 0..3 {
        for i in 0..clients {
            let ip = client_ip(i);
            let (slot, _) = served_by(lb.addr, Some(ip));
            match home.get(&ip) {
                Some(&s) => assert_eq!(
                    s, slot,
                    "client {ip} moved from slot {s} to {slot} in round {round}"
                ),
                None => {
                    home.insert(ip, slot);
                }
            }
        }
    }
    let mut counts = vec![0usize; workers];
    for &s in home.values() {
        counts[s] += 1;
    }
    let mean = clients as f64 / workers as f64;
    let max = *counts.iter().max().unwrap() as f64;
    assert!(max / mean <= 1.3, "uneven spread {counts:?}");
    // `lb route` predicts every observed slot.
    for (ip, slot) in home.iter().take(60) {
        assert_eq!(
            lb_route(*ip, workers, &[]),
            *slot,
            "lb route disagrees for {ip}"
        );
    }
}

#[test]
fn hash_seed_changes_the_mapping_and_route_follows_it() {
    let lb = Lb::start(&["-w", "4", "--hash-seed", "12345"]);
    lb.wait_all_ready(4);
    let mut differs = 0;
    for i in 0..40 {
        let ip = client_ip(i);
        let (slot, _) = served_by(lb.addr, Some(ip));
        assert_eq!(lb_route(ip, 4, &["--hash-seed", "12345"]), slot);
        if lb_route(ip, 4, &[]) != slot {
            differs += 1;
        }
    }
    assert!(
        differs > 10,
        "the seed should move many clients, moved {differs}"
    );
}

#[test]
fn round_robin_spreads_one_clients_connections_evenly() {
    let lb = Lb::start(&["-w", "3", "-p", "round-robin"]);
    lb.wait_all_ready(3);
    let mut counts = HashMap::new();
    for _ in 0..30 {
        *counts.entry(served_by(lb.addr, None).0).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&c| c == 10), "{counts:?}");
}

#[test]
fn least_connections_sends_new_connections_to_the_least_loaded_worker() {
    let lb = Lb::start(&["-w", "2", "-p", "least-connections"]);
    lb.wait_all_ready(2);
    // Four held keep-alive connections: two per worker.
    let mut held: Vec<(usize, std::net::TcpStream)> = (0..4)
        .map(|_| {
            let mut c = connect(lb.addr, None);
            let (_, body) = request(&mut c, "GET", "/", b"", false);
            (slot_and_pid(std::str::from_utf8(&body).unwrap()).0, c)
        })
        .collect();
    let on = |slot: usize, held: &[(usize, std::net::TcpStream)]| {
        held.iter().filter(|(s, _)| *s == slot).count()
    };
    assert_eq!((on(0, &held), on(1, &held)), (2, 2));
    // Close worker 0's connections and wait until lb knows.
    held.retain(|(s, _)| *s != 0);
    wait_for(
        "worker 0 to report 0 active connections",
        Duration::from_secs(10),
        || {
            let w = lb.workers();
            (w["workers"][0]["active_connections"] == 0
                && w["workers"][1]["active_connections"] == 2)
                .then_some(())
        },
    );
    // New connections go to worker 0 until it holds as many as worker 1.
    let mut fresh = Vec::new();
    for _ in 0..2 {
        let mut c = connect(lb.addr, None);
        let (_, body) = request(&mut c, "GET", "/", b"", false);
        assert_eq!(slot_and_pid(std::str::from_utf8(&body).unwrap()).0, 0);
        fresh.push(c);
    }
}

#[test]
fn dual_stack_listener_serves_ipv4_clients_stickily() {
    let Ok(probe) = std::net::TcpListener::bind("[::1]:0") else {
        skip(
            "dual_stack_listener_serves_ipv4_clients_stickily",
            "no IPv6 on this host",
        );
        return;
    };
    drop(probe);
    let lb = Lb::start(&["-w", "3", "-l", "[::]:0"]);
    lb.wait_all_ready(3);
    for i in 0..20 {
        let ip = client_ip(i);
        let (slot, _) = served_by(lb.target(), Some(ip));
        // The client arrives as ::ffff:127.x.y.z and hashes like plain IPv4.
        assert_eq!(lb_route(ip, 3, &[]), slot);
    }
    // A real IPv6 client too.
    let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, lb.addr.port()));
    let (slot, _) = served_by(v6, None);
    assert_eq!(lb_route("::1".parse().unwrap(), 3, &[]), slot);
}

fn run_lb(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(LB)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_bad(args: &[&str], must_name: &str) {
    let (code, stderr) = run_lb(args);
    assert_eq!(code, Some(2), "{args:?} should exit 2; stderr: {stderr}");
    let first = stderr.lines().next().unwrap_or("");
    assert!(
        first.contains(must_name),
        "{args:?}: first line {first:?} should name {must_name:?}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
}

#[test]
fn bad_input_is_a_one_line_error_with_exit_status_2() {
    assert_bad(&["--frobnicate"], "--frobnicate");
    assert_bad(&["-l", "not-an-address"], "not-an-address");
    assert_bad(&["-l", "127.0.0.1:99999"], "127.0.0.1:99999");
    assert_bad(&["--shutdown-timeout", "soon"], "soon");
    assert_bad(&["--queue-timeout", "30"], "30");
    assert_bad(&["-p", "fastest"], "fastest");
    assert_bad(&["-w", "0"], "workers");
    assert_bad(&["-w", "many"], "many");
    assert_bad(&["--hash-seed", "-1"], "-1");
    assert_bad(&["--max-memory", "lots"], "lots");
    assert_bad(&["--log-format", "xml"], "xml");
    assert_bad(&["-c", "/nonexistent/lb.toml"], "/nonexistent/lb.toml");
    assert_bad(
        &["-l", "127.0.0.1:0", "--", "/no/such/worker-binary"],
        "/no/such/worker-binary",
    );
    assert_bad(
        &["-l", "127.0.0.1:0", "--", "no-such-worker-command-xyz"],
        "no-such-worker-command-xyz",
    );
    assert_bad(&["route", "not-an-ip"], "not-an-ip");
    let dir = std::env::temp_dir().join(format!("lb-core-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text, named) in [
        ("syntax.toml", "workers = \n", "line 1"),
        (
            "unknown.toml",
            "listen = \"127.0.0.1:0\"\nspeed = 11\n",
            "speed",
        ),
        ("type.toml", "workers = [2]\n", "workers"),
        ("range.toml", "\n\nworkers = 0\n", "line 3"),
        ("addr.toml", "listen = \"localhost\"\n", "localhost"),
        ("dur.toml", "shutdown_timeout = \"forever\"\n", "forever"),
        (
            "cmd.toml",
            "command = [\"no-such-worker-command-xyz\"]\n",
            "no-such-worker-command-xyz",
        ),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        assert_bad(&["-c", p.to_str().unwrap()], named);
    }
}

#[test]
fn busy_port_is_a_one_line_error_with_exit_status_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    assert_bad(&["-l", &addr, "--metrics", "off"], &addr);
    assert_bad(&["-l", "127.0.0.1:0", "--metrics", &addr], &addr);
}

#[test]
fn config_file_sets_options_and_flags_override_it() {
    let dir = std::env::temp_dir().join(format!("lb-core-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("lb.toml");
    std::fs::write(&p, "listen = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\nworkers = 3\npolicy = \"round-robin\"\n").unwrap();
    let lb = Lb::start(&["-c", p.to_str().unwrap()]);
    assert_eq!(lb.workers()["policy"], "round-robin");
    lb.wait_all_ready(3);
    let lb2 = Lb::start(&["-c", p.to_str().unwrap(), "-w", "2", "-p", "sticky"]);
    assert_eq!(lb2.workers()["policy"], "sticky");
    lb2.wait_all_ready(2);
    // The shipped example config is valid.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/lb.toml");
    let (code, out) = run_lb(&["route", "127.0.0.1", "-c", example]);
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn route_prints_a_slot() {
    let out = Command::new(LB)
        .args(["route", "203.0.113.7", "--workers", "4"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let slot: usize = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(slot < 4);
    // IPv4-mapped IPv6 gives the same answer as IPv4.
    assert_eq!(
        lb_route("::ffff:203.0.113.7".parse().unwrap(), 4, &[]),
        slot
    );
}

#[test]
fn a_rust_worker_on_the_lb_worker_library_serves_connections() {
    let exe = echo_worker();
    let lb = Lb::start(&["-w", "2", "--wait-ready", "--", exe.to_str().unwrap()]);
    lb.wait_all_ready(2);
    use std::io::{BufRead, Write};
    let ip = client_ip(7);
    let mut c = connect(lb.addr, Some(ip));
    c.write_all(b"hello\nworld\n").unwrap();
    let mut r = std::io::BufReader::new(c);
    let slot = lb_route(ip, 2, &[]);
    for word in ["hello", "world"] {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, format!("[{slot}] {word}\n"));
    }
    wait_for(
        "the library's stats to reach lb",
        Duration::from_secs(10),
        || {
            (lb.metric(&format!("lb_worker_requests_total{{worker=\"{slot}\"}}"))? == 2.0
                && lb.metric(&format!(
                    "lb_worker_active_connections{{worker=\"{slot}\"}}"
                ))? == 1.0)
                .then_some(())
        },
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let lb = Lb::start(&["-w", "1", "--log-format", "json"]);
    lb.wait_all_ready(1);
    let log = lb.log_text();
    let first = log.lines().find(|l| l.contains("listening on")).unwrap();
    let v: serde_json::Value = serde_json::from_str(first).expect("a JSON log line");
    assert!(
        v["fields"]["message"]
            .as_str()
            .unwrap()
            .starts_with("listening on 127.0.0.1:")
    );
    assert_eq!(v["level"], "INFO");
}

#[test]
fn the_builtin_worker_serves_and_reports_in_advanced_serialization() {
    let lb = Lb::start(&["-w", "2", "--serialization", "advanced"]);
    lb.wait_all_ready(2);
    for i in 0..6 {
        let ip = client_ip(i);
        assert_eq!(served_by(lb.addr, Some(ip)).0, lb_route(ip, 2, &[]));
    }
    wait_for("6 requests counted", Duration::from_secs(10), || {
        let n = lb.metric("lb_worker_requests_total{worker=\"0\"}")?
            + lb.metric("lb_worker_requests_total{worker=\"1\"}")?;
        (n == 6.0).then_some(())
    });
    assert_eq!(
        lb.metric("lb_channel_messages_dropped_total{reason=\"malformed\"}"),
        Some(0.0)
    );
}
