//! The sticky libraries Node apps use, unmodified (`--handoff`, DESIGN §12): socket.io's
//! documented cluster setup (`@socket.io/sticky` + `@socket.io/cluster-adapter`) and the
//! `sticky-session` package's README app, with real socket.io clients and HTTP clients; the
//! silent-hang warning; the bounds of peeking.
//!
//! Needs `node` and the npm packages of `examples/node` (the README test command installs them).

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The socket.io docs' cluster app.
fn sio_app() -> String {
    example("socketio-sticky.js")
}

/// What `sio-sticky-client.js` printed for one phase.
struct Phase {
    errors: Vec<String>,
    /// Per client: the worker pids its acks came from, and how many acks.
    clients: Vec<(HashSet<u64>, u64)>,
    /// Clients the broadcast reached.
    reached: u64,
}

impl Phase {
    fn parse(line: &str) -> Phase {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_ne!(v["phase"], "timeout", "the client timed out");
        Phase {
            errors: v["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_str().unwrap().to_string())
                .collect(),
            clients: v["clients"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    let pids = c["pids"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| p.as_u64().unwrap())
                        .collect();
                    (pids, c["acks"].as_u64().unwrap())
                })
                .collect(),
            reached: v["reached"].as_u64().unwrap(),
        }
    }

    /// Every worker pid any client's acks came from.
    fn workers(&self) -> HashSet<u64> {
        self.clients.iter().flat_map(|(p, _)| p.clone()).collect()
    }
}

/// Runs `n` socket.io clients against lb with `flags`; returns the events phase.
fn sio_clients(lb: &Lb, n: usize, flags: &[&str]) -> Phase {
    let out = Command::new("node")
        .arg(fixture("sio-sticky-client.js"))
        .arg(format!("http://{}", lb.addr))
        .arg(n.to_string())
        .args(flags)
        .env("NODE_PATH", node_modules())
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Phase::parse(stdout.lines().next().expect("a line"))
}

#[test]
fn socketio_docs_cluster_app_runs_unmodified_with_30_clients_on_3_workers() {
    let lb = start_node(
        &[
            "-w",
            "3",
            "--serialization",
            "advanced",
            "--handoff",
            "socket.io",
        ],
        &sio_app(),
        &[],
    );
    lb.wait_all_ready(3);
    let p = sio_clients(&lb, 30, &[]);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    for (i, (pids, acks)) in p.clients.iter().enumerate() {
        assert_eq!(*acks, 20, "client {i}");
        assert_eq!(
            pids.len(),
            1,
            "client {i}'s events all reached one worker: {pids:?}"
        );
    }
    assert_eq!(p.reached, 30, "one io.emit() reached every client");
    assert!(p.workers().len() >= 2, "{:?}", p.workers());
    // Every request after the handshake named its session and went to its owner.
    assert!(lb.metric("lb_peeks_total{result=\"sid\"}").unwrap() >= 30.0);
    assert!(!lb.log_text().contains("serves none"), "{}", lb.log_text());
}

#[test]
fn long_polling_clients_behind_one_address_keep_their_sessions_by_sid_and_spread() {
    // json serialization, least-connections, polling only, 10 clients from one address: only
    // the sid routing can keep each session on its worker.
    let args = [
        "-w",
        "3",
        "-p",
        "least-connections",
        "--handoff",
        "socket.io",
    ];
    let lb = start_node(&args, &sio_app(), &[]);
    lb.wait_all_ready(3);
    let p = sio_clients(&lb, 10, &["--polling", "--same-ip"]);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    for (i, (pids, acks)) in p.clients.iter().enumerate() {
        assert_eq!((*acks, pids.len()), (20, 1), "client {i}");
    }
    assert_eq!(p.reached, 10);
    assert!(
        p.workers().len() >= 2,
        "sessions spread over the workers: {:?}",
        p.workers()
    );
    let sessions: f64 = (0..3)
        .map(|w| {
            lb.metric(&format!("lb_worker_sessions{{worker=\"{w}\"}}"))
                .unwrap()
        })
        .sum();
    assert!(sessions <= 10.0, "{sessions}");
    drop(lb);

    // The control: the same with sid routing off (--peek-timeout 0s) fails.
    let mut args = args.to_vec();
    args.extend(["--peek-timeout", "0s"]);
    let lb = start_node(&args, &sio_app(), &[]);
    lb.wait_all_ready(3);
    let p = sio_clients(&lb, 10, &["--polling", "--same-ip", "--events", "5"]);
    assert!(
        !p.errors.is_empty() || p.reached < 10,
        "without sid routing the sessions should break"
    );
}

/// `GET /` from `ip` on a new connection: (status, pid of the answering worker).
fn sticky_session_get(lb: &Lb, path: &str, ip: IpAddr) -> (u16, u32) {
    let (status, body) = http_get(lb.addr, path, Some(ip));
    let pid = body
        .split_whitespace()
        .nth(3)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    (status, pid)
}

#[test]
fn sticky_session_readme_app_is_sticky_and_keeps_alive() {
    let lb = start_node(
        &["-w", "3", "--handoff", "sticky:balance"],
        &example("sticky-session.js"),
        &[],
    );
    lb.wait_all_ready(3);
    let mut home: HashMap<IpAddr, u32> = HashMap::new();
    for round in 0..2 {
        for i in 0..60 {
            let ip = client_ip(i);
            let (status, pid) = sticky_session_get(&lb, "/", ip);
            assert_eq!(status, 200);
            assert_eq!(
                *home.entry(ip).or_insert(pid),
                pid,
                "{ip} moved in round {round}"
            );
        }
    }
    let pids: HashSet<u32> = home.values().copied().collect();
    assert!(pids.len() >= 2, "{pids:?}");
    // Keep-alive: three requests on one connection, one worker.
    let mut s = connect(lb.addr, Some(client_ip(7)));
    let answers: Vec<String> = (0..3)
        .map(|_| {
            let (status, body) = request(&mut s, "GET", "/", b"", false);
            assert_eq!(status, 200);
            String::from_utf8(body).unwrap()
        })
        .collect();
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    assert!(!lb.log_text().contains("serves none"));
}

#[test]
fn a_sticky_session_worker_whose_app_closes_its_server_gets_no_new_connections() {
    let lb = start_node(
        &["-w", "2", "--handoff", "sticky:balance"],
        &fixture("sticky-session-close.js"),
        &[],
    );
    lb.wait_all_ready(2);
    let ip = client_ip(3);
    let (status, closing) = sticky_session_get(&lb, "/close", ip);
    assert_eq!(status, 200);
    wait_for("the worker leaving", Duration::from_secs(10), || {
        lb.log_text()
            .contains("worker is leaving (its app closed its server)")
            .then_some(())
    });
    for i in 0..40 {
        let (status, pid) = sticky_session_get(&lb, "/", client_ip(i));
        assert_eq!(status, 200);
        assert_ne!(pid, closing, "a new connection went to the closing worker");
    }
}

#[test]
fn a_rolling_restart_of_the_sticky_session_app_under_churn_fails_no_request() {
    let lb = start_node(
        &["-w", "2", "--handoff", "sticky:balance"],
        &example("sticky-session.js"),
        &[],
    );
    let before = lb.wait_all_ready(2);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn: Vec<_> = (0..3)
        .map(|t| {
            let (addr, stop) = (lb.addr, stop.clone());
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0, Vec::new());
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && Instant::now() < deadline
                    && i < 20_000
                {
                    let ip = client_ip(t * 50 + i % 50);
                    i += 1;
                    match std::panic::catch_unwind(|| http_get(addr, "/", Some(ip))) {
                        Ok((200, _)) => ok += 1,
                        Ok((s, b)) => failed.push(format!("{s} {b}")),
                        Err(_) => failed.push(format!("{ip}: no answer")),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    lb.signal(Signal::SIGUSR2);
    wait_for("every slot replaced", Duration::from_secs(60), || {
        all_replaced(&lb, &before).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for t in churn {
        let (o, f) = t.join().unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(ok >= 50, "only {ok} requests during the roll");
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
}

#[test]
fn socketio_clients_reconnect_after_a_rolling_restart_and_the_broadcast_reaches_them_all() {
    let lb = start_node(
        &[
            "-w",
            "2",
            "--serialization",
            "advanced",
            "--handoff",
            "socket.io",
        ],
        &sio_app(),
        &[],
    );
    let before = lb.wait_all_ready(2);
    let mut client = Command::new("node")
        .arg(fixture("sio-sticky-client.js"))
        .arg(format!("http://{}", lb.addr))
        .args(["12", "--events", "5", "--pause"])
        .env("NODE_PATH", node_modules())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run node");
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    let first = Phase::parse(&lines.next().unwrap().unwrap());
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert_eq!(first.reached, 12);
    assert_eq!(lines.next().unwrap().unwrap(), "PAUSE");
    lb.signal(Signal::SIGUSR2);
    wait_for("every slot replaced", Duration::from_secs(60), || {
        all_replaced(&lb, &before).then_some(())
    });
    let after_pids: HashSet<u64> = lb.workers()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["pid"].as_u64().unwrap())
        .collect();
    writeln!(client.stdin.as_mut().unwrap(), "go").unwrap();
    let after = Phase::parse(&lines.next().unwrap().unwrap());
    let _ = client.wait();
    assert_eq!(after.reached, 12, "errors: {:?}", after.errors);
    assert!(
        after.workers().is_subset(&after_pids),
        "clients are on the new workers: {:?} vs {after_pids:?}",
        after.workers()
    );
}

/// Every slot is ready with a worker not in `before`.
fn all_replaced(lb: &Lb, before: &[u32]) -> bool {
    let w = lb.workers();
    w["workers"].as_array().is_some_and(|rows| {
        rows.iter().all(|r| {
            r["state"] == "ready"
                && r["pid"]
                    .as_u64()
                    .is_some_and(|p| !before.contains(&(p as u32)))
        })
    })
}

/// A polling request a socket.io client would send, on a connection left open.
fn polling_request(lb: &Lb, ip: IpAddr) -> TcpStream {
    let mut s = connect(lb.addr, Some(ip));
    s.write_all(b"GET /socket.io/?EIO=4&transport=polling&t=x HTTP/1.1\r\nhost: lb\r\n\r\n")
        .unwrap();
    s
}

#[test]
fn a_socketio_app_under_the_wrong_handoff_is_named_within_15_seconds() {
    let lb = start_node(&["-w", "2"], &sio_app(), &[]);
    lb.wait_all_ready(2);
    let t = Instant::now();
    let _held: Vec<TcpStream> = (0..4).map(|i| polling_request(&lb, client_ip(i))).collect();
    let line = wait_for("the silent-hang warning", Duration::from_secs(15), || {
        lb.log_text()
            .lines()
            .find(|l| l.contains("serves none"))
            .map(str::to_string)
    });
    eprintln!("after {:?}: {line}", t.elapsed());
    assert!(line.contains("--handoff"), "{line}");
    assert!(line.contains("socket.io"), "{line}");
    assert!(line.contains("\"sticky-session:connection\""), "{line}");
    // Once per worker.
    std::thread::sleep(Duration::from_millis(1500)); // one more housekeeping pass, to show no repeat
    let n = lb.log_text().matches("serves none").count();
    assert!((1..=2).contains(&n), "{n} lines");
}

#[test]
fn a_healthy_slow_worker_is_not_named() {
    // Answers each request after 3 s, reports nothing over the channel.
    let lb = start_node(&["-w", "1"], &fixture("slow-sticky.js"), &[]);
    lb.wait_all_ready(1);
    let t = Instant::now();
    let mut served = 0;
    while t.elapsed() < Duration::from_secs(14) {
        let mut s = connect(lb.addr, Some(client_ip(served)));
        s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        let (status, body) = request(&mut s, "GET", "/", b"", true);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        served += 1;
    }
    assert!(served >= 3, "{served}");
    assert!(!lb.log_text().contains("serves none"), "{}", lb.log_text());
}

#[test]
fn a_worker_whose_clients_have_not_spoken_yet_is_not_named() {
    let lb = start_node(&["-w", "1"], &fixture("slow-sticky.js"), &[]);
    lb.wait_all_ready(1);
    // Connections that have sent nothing (a keep-alive pool opening early, a slow client).
    let _idle: Vec<TcpStream> = (0..3)
        .map(|i| connect(lb.addr, Some(client_ip(i))))
        .collect();
    holds_for("no warning", Duration::from_secs(12), || {
        !lb.log_text().contains("serves none")
    });
}

#[test]
fn silent_and_foreign_first_bytes_are_routed_by_the_policy_within_the_peek_bounds() {
    let mut lb = Lb::start(&["-w", "2", "--handoff", "socket.io", "--peek-timeout", "1s"]);
    lb.wait_all_ready(2);
    let fds_before = fd_count(lb.pid());
    let cpu_before = lb::procfs::cpu_ticks(lb.pid()).unwrap();
    let silent: Vec<TcpStream> = (0..1000)
        .map(|i| connect(lb.addr, Some(client_ip(i % 50))))
        .collect();
    // A TLS ClientHello's first bytes, and an HTTP request whose line arrives a byte at a time
    // over 500 ms: both reach a worker with their bytes intact.
    let mut tls = connect(lb.addr, Some(client_ip(200)));
    tls.write_all(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
        .unwrap();
    let mut slow = connect(lb.addr, Some(client_ip(201)));
    let req =
        b"POST /echo HTTP/1.1\r\nhost: lb\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello";
    let line_end = req.iter().position(|&b| b == b'\n').unwrap() + 1;
    for b in &req[..line_end] {
        slow.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_millis(500 / line_end as u64)); // the slow client
    }
    slow.write_all(&req[line_end..]).unwrap();
    let (status, body) = read_response(&mut slow);
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"hello"[..]),
        "byte-exact"
    );
    wait_for("1,000 peek timeouts", Duration::from_secs(10), || {
        (lb.metric("lb_peeks_total{result=\"timeout\"}") == Some(1000.0)).then_some(())
    });
    assert_eq!(lb.metric("lb_peeks_total{result=\"not_http\"}"), Some(1.0));
    // Every connection reached a worker: none was refused for sending nothing. (A timed-out
    // peek is counted when it is routed; its hand-off to the worker follows.)
    let delivered = || -> f64 {
        (0..2)
            .map(|w| {
                lb.metric(&format!("lb_worker_connections_total{{worker=\"{w}\"}}"))
                    .unwrap_or(0.0)
            })
            .sum()
    };
    wait_for(
        "1,002 connections delivered",
        Duration::from_secs(10),
        || (delivered() == 1002.0).then_some(()),
    );
    // The worker got the TLS bytes as sent (the built-in worker answers a bad request with 400).
    let mut answer = Vec::new();
    tls.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = tls.read_to_end(&mut answer);
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    let ticks = lb::procfs::cpu_ticks(lb.pid()).unwrap() - cpu_before;
    eprintln!("1,000 silent connections peeked at: lb CPU {ticks} ticks");
    assert!(ticks < 100, "lb spent {ticks} clock ticks");
    drop(silent);
    drop(tls);
    wait_for(
        "lb's fds back to their start value",
        Duration::from_secs(15),
        || (fd_count(lb.pid()) <= fds_before).then_some(()),
    );
    lb.signal(Signal::SIGTERM);
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), Some(0));
}
