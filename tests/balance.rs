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

/// Each slot's share of `n` connections lb delivered since `before` (waits until all are in).
fn placed(lb: &Lb, workers: usize, before: &[f64], n: usize) -> Vec<usize> {
    wait_for("every connection delivered", SEEN, || {
        let now = delivered(lb, workers);
        let d: Vec<usize> = (0..workers)
            .map(|s| (now[s] - before[s]) as usize)
            .collect();
        (d.iter().sum::<usize>() == n).then_some(d)
    })
}

#[test]
fn a_balance_factor_bounds_200_websockets_from_one_address() {
    let ip = client_ip(31);
    // The control: without the factor, one address is one slot.
    let plain = Lb::start(&["-w", "4"]);
    plain.wait_all_ready(4);
    let held = hold_websockets(&plain, ip, 200);
    let counts = placed(&plain, 4, &[0.0; 4], 200);
    assert_eq!(counts.iter().filter(|&&c| c > 0).count(), 1, "{counts:?}");
    drop(held);
    drop(plain);

    let lb = Lb::start(&["-w", "4", "--balance-factor", "1.25"]);
    lb.wait_all_ready(4);
    let held = hold_websockets(&lb, ip, 200);
    let counts = placed(&lb, 4, &[0.0; 4], 200);
    // ⌈1.25 × 200 / 4⌉ = 63.
    assert!(counts.iter().all(|&c| c <= 63), "{counts:?}");
    let home = lb_route(ip, 4, &[]);
    assert_eq!(
        counts[home],
        *counts.iter().max().unwrap(),
        "the home takes the most: {counts:?}"
    );
    let overflow = lb
        .metric(&format!("lb_sticky_overflow_total{{worker=\"{home}\"}}"))
        .unwrap();
    assert_eq!(overflow, (200 - counts[home]) as f64);
    let mut want = vec![0.0; 4];
    for s in 0..4 {
        want[s] = counts[s] as f64;
    }
    wait_active(&lb, &want);
    // `lb route --live` tells the home's load against the bound and where the next one goes.
    let live = route_live(&lb, ip);
    let first = format!("home {home}: {} active, ", counts[home]);
    assert!(live.starts_with(&first), "{live}");
    assert!(
        live.contains("(bound 63 = ⌈1.25 × (200 + 1) / 4⌉)"),
        "{live}"
    );
    let next: usize = live
        .trim_end()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{live}"));
    let before = delivered(&lb, 4);
    let one_more = hold_websockets(&lb, ip, 1);
    let went = placed(&lb, 4, &before, 1);
    assert_eq!(went[next], 1, "{live} but it went to {went:?}");
    drop((held, one_more));
}

/// `lb route IP --live` against `lb`'s control socket.
fn route_live(lb: &Lb, ip: IpAddr) -> String {
    let out = std::process::Command::new(LB)
        .args(["route", &ip.to_string(), "--live", "--control"])
        .arg(lb.control.as_ref().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn with_a_balance_factor_few_keys_move_and_none_spreads_over_more_than_two_slots() {
    let lb = Lb::start(&["-w", "4", "--balance-factor", "1.25"]);
    lb.wait_all_ready(4);
    let mut held = Vec::new();
    let mut slots_of = vec![std::collections::BTreeSet::new(); 300];
    for round in 0..4 {
        for (i, slots) in slots_of.iter_mut().enumerate() {
            let mut s = connect(lb.addr, Some(client_ip(1000 + i)));
            let (status, body) = request(&mut s, "GET", "/", b"", false);
            assert_eq!(status, 200, "round {round}");
            slots.insert(slot_and_pid(&String::from_utf8_lossy(&body)).0);
            held.push(s);
        }
    }
    let home: Vec<usize> = (0..300)
        .map(|i| lb_route(client_ip(1000 + i), 4, &[]))
        .collect();
    let at_home = (0..300)
        .filter(|&i| slots_of[i].len() == 1 && slots_of[i].contains(&home[i]))
        .count();
    let most = slots_of.iter().map(|s| s.len()).max().unwrap();
    eprintln!("{at_home}/300 addresses only on their home; most slots for one address: {most}");
    assert!(at_home >= 285, "{at_home}/300 at home");
    assert!(most <= 2, "an address on {most} slots");
}

#[test]
fn killing_the_overloaded_home_spreads_its_clients_within_the_bound() {
    let lb = Lb::start(&["-w", "4", "--balance-factor", "1.25"]);
    let pids = lb.wait_all_ready(4);
    let ip = client_ip(41);
    let home = lb_route(ip, 4, &[]);
    let before = vec![0.0; 4];
    let mut held = Vec::new();
    let mut slot_of = Vec::new();
    for _ in 0..200 {
        let now = delivered(&lb, 4);
        held.extend(hold_websockets(&lb, ip, 1));
        let after = wait_for("the ACK", SEEN, || {
            let a = delivered(&lb, 4);
            (0..4).find(|&s| a[s] > now[s])
        });
        slot_of.push(after);
    }
    let counts = placed(&lb, 4, &before, 200);
    assert!(counts.iter().all(|&c| c <= 63), "{counts:?}");
    kill(pids[home], Signal::SIGKILL);
    // The home's WebSockets die with it; every other one still echoes.
    let mut lost = 0;
    for (i, ws) in held.iter_mut().enumerate() {
        let alive = ws
            .send(tungstenite::Message::text("still there?"))
            .and_then(|()| ws.read())
            .is_ok();
        if slot_of[i] == home {
            lost += usize::from(!alive);
        } else {
            assert!(alive, "a WebSocket on slot {} failed", slot_of[i]);
        }
    }
    assert_eq!(
        lost, counts[home],
        "only the killed worker's clients are lost"
    );
    // They come back (as a client library reconnects) and spread within the bound.
    let before = delivered(&lb, 4);
    let again = hold_websockets(&lb, ip, lost);
    let counts = placed(&lb, 4, &before, lost);
    let open: Vec<usize> = (0..4)
        .map(|s| slot_of.iter().filter(|&&x| x == s && s != home).count() + counts[s])
        .collect();
    // ⌈1.25 × 200 / live slots⌉: 63 with the home back, 84 while it is still restarting.
    assert!(open.iter().all(|&c| c <= 84), "{open:?}");
    assert_eq!(open.iter().sum::<usize>(), 200);
    drop(again);
}

#[test]
fn a_cookie_key_pins_each_client_behind_one_address_and_spreads_them() {
    let lb = Lb::start(&["-w", "4", "--hash-key", "cookie:sid"]);
    lb.wait_all_ready(4);
    let ip = client_ip(51);
    let mut used = std::collections::BTreeSet::new();
    for c in 0..100 {
        let sid = format!("client-{c}");
        let want = lb_route_key(&sid, 4);
        for _ in 0..3 {
            let mut s = connect(lb.addr, Some(ip));
            let req = format!(
                "GET / HTTP/1.1\r\nhost: lb\r\ncookie: theme=dark; sid={sid}\r\nconnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).unwrap();
            let (status, body) = read_response(&mut s);
            assert_eq!(status, 200);
            let slot = slot_and_pid(&String::from_utf8_lossy(&body)).0;
            assert_eq!(slot, want, "client {sid}");
            used.insert(slot);
        }
    }
    assert_eq!(used.len(), 4, "100 cookies spread over every worker");
    assert_eq!(lb.metric("lb_peeks_total{result=\"key\"}"), Some(300.0));
}

/// `lb route --key VALUE -w N` through the real binary.
fn lb_route_key(key: &str, workers: usize) -> usize {
    lb_route_args(&["route", "--key", key, "--workers", &workers.to_string()].map(String::from))
}

/// `GET /` from `from` with an `X-Forwarded-For: client`: the slot that answered.
fn slot_with_xff(lb: &Lb, from: IpAddr, client: IpAddr) -> usize {
    let mut s = connect(lb.addr, Some(from));
    let req = format!(
        "GET / HTTP/1.1\r\nhost: lb\r\nx-forwarded-for: {client}\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let (status, body) = read_response(&mut s);
    assert_eq!(status, 200);
    slot_and_pid(&String::from_utf8_lossy(&body)).0
}

#[test]
fn xff_is_believed_from_a_trusted_proxy_only() {
    let lb = Lb::start(&[
        "-w",
        "4",
        "--hash-key",
        "xff",
        "--proxy-trusted",
        "127.0.0.2/32",
    ]);
    lb.wait_all_ready(4);
    let proxy: IpAddr = "127.0.0.2".parse().unwrap();
    let stranger: IpAddr = "127.0.0.3".parse().unwrap();
    let own = lb_route(stranger, 4, &[]);
    let mut differs = 0;
    for i in 0..40 {
        let client = client_ip(2000 + i);
        let home = lb_route(client, 4, &[]);
        assert_eq!(
            slot_with_xff(&lb, proxy, client),
            home,
            "via the proxy: {client}"
        );
        assert_eq!(
            slot_with_xff(&lb, stranger, client),
            own,
            "a stranger's header"
        );
        differs += usize::from(home != own);
    }
    assert!(differs > 0, "the test would not tell the two apart");
}

/// A real nginx (Debian's package) proxying HTTP to `upstream`, appending the client's address
/// to `X-Forwarded-For` (upstream keep-alive off: nginx's default); stopped by pid when dropped.
struct Nginx {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    dir: std::path::PathBuf,
}

impl Nginx {
    fn start(upstream: std::net::SocketAddr) -> Option<Nginx> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        // nginx needs a port in its config: take a free one from the kernel.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let dir = std::env::temp_dir().join(format!("lb-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let cfg = format!(
            "daemon off;\nmaster_process off;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  \
             fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  \
             upstream lb {{ server {upstream}; }}\n  \
             server {{\n    listen {addr};\n    location / {{\n      proxy_pass http://lb;\n      \
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    }}\n  }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, cfg).unwrap();
        let mut child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_for("nginx to listen", Duration::from_secs(10), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nginx exited ({status}): {}",
                    std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            TcpStream::connect(addr).ok().map(|_| ())
        });
        Some(Nginx { child, addr, dir })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn behind_a_real_nginx_each_client_address_keeps_its_route_slot_by_xff() {
    let lb = Lb::start(&[
        "-w",
        "4",
        "--hash-key",
        "xff",
        "--proxy-trusted",
        "127.0.0.1/32",
    ]);
    lb.wait_all_ready(4);
    let Some(nginx) = Nginx::start(lb.addr) else {
        return skip(
            "behind_a_real_nginx_each_client_address_keeps_its_route_slot_by_xff",
            "nginx is not installed (apt-get install nginx)",
        );
    };
    let mut used = std::collections::BTreeSet::new();
    for i in 0..50 {
        let client = client_ip(3000 + i);
        for _ in 0..2 {
            let (status, body) = http_get(nginx.addr, "/", Some(client));
            assert_eq!(status, 200, "{body}");
            let slot = slot_and_pid(&body).0;
            assert_eq!(slot, lb_route(client, 4, &[]), "client {client}");
            used.insert(slot);
        }
    }
    // nginx reaches lb from one address: without the key, every client would be on one slot.
    assert_eq!(used.len(), 4, "{used:?}");
    assert_eq!(lb.metric("lb_peeks_total{result=\"key\"}"), Some(100.0));
}

#[test]
fn keys_are_peeked_within_bounds_and_the_worker_gets_the_exact_bytes() {
    use std::io::Read;
    let mut lb = Lb::start(&[
        "-w",
        "4",
        "--hash-key",
        "cookie:sid",
        "--peek-timeout",
        "1s",
    ]);
    lb.wait_all_ready(4);
    let fds_before = fd_count(lb.pid());
    let cpu_before = lb::procfs::cpu_ticks(lb.pid()).unwrap();
    let silent: Vec<TcpStream> = (0..1000)
        .map(|i| connect(lb.addr, Some(client_ip(i % 50))))
        .collect();
    // A request whose head arrives a byte at a time over 500 ms: routed by its cookie, and the
    // worker echoes the body it got, byte for byte.
    // An address whose slot is not the cookie's, so that the two can be told apart.
    let by_key = lb_route_key("slow-one", 4);
    let (ip, by_ip) = (4000..4100)
        .map(|i| (client_ip(i), lb_route(client_ip(i), 4, &[])))
        .find(|&(_, s)| s != by_key)
        .unwrap();
    let req = b"POST /echo HTTP/1.1\r\nhost: lb\r\ncookie: sid=slow-one\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello";
    let head_end = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut slow = connect(lb.addr, Some(ip));
    for b in &req[..head_end] {
        slow.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_millis(500 / head_end as u64)); // the slow client
    }
    slow.write_all(&req[head_end..]).unwrap();
    let (status, body) = read_response(&mut slow);
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"hello"[..]),
        "byte-exact"
    );
    // Which worker serves it: the cookie's.
    let (slot, _) = {
        let mut s = connect(lb.addr, Some(ip));
        s.write_all(
            b"GET / HTTP/1.1\r\nhost: lb\r\ncookie: sid=slow-one\r\nconnection: close\r\n\r\n",
        )
        .unwrap();
        answered_by(&mut s)
    };
    assert_eq!(slot, by_key);
    // A head over 8 KiB (the cookie is in its first bytes): routed by the IP.
    let mut big = b"GET / HTTP/1.1\r\nhost: lb\r\ncookie: sid=slow-one\r\n".to_vec();
    for _ in 0..9 {
        big.extend(format!("x-pad: {}\r\n", "p".repeat(1000)).as_bytes());
    }
    big.extend(b"connection: close\r\n\r\n");
    let mut s = connect(lb.addr, Some(ip));
    s.write_all(&big).unwrap();
    assert_eq!(answered_by(&mut s).0, by_ip, "over the bound: the IP");
    // TLS's first bytes reach a worker as they were sent (the built-in worker answers 400).
    let mut tls = connect(lb.addr, Some(client_ip(4001)));
    tls.write_all(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
        .unwrap();
    let mut answer = Vec::new();
    tls.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = tls.read_to_end(&mut answer);
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    wait_for("1,000 peek timeouts", Duration::from_secs(10), || {
        (lb.metric("lb_peeks_total{result=\"timeout\"}") == Some(1000.0)).then_some(())
    });
    assert_eq!(lb.metric("lb_peeks_total{result=\"too_long\"}"), Some(1.0));
    assert_eq!(lb.metric("lb_peeks_total{result=\"not_http\"}"), Some(1.0));
    assert_eq!(lb.metric("lb_peeks_total{result=\"key\"}"), Some(2.0));
    wait_for(
        "every connection delivered",
        Duration::from_secs(10),
        || (delivered(&lb, 4).iter().sum::<f64>() == 1004.0).then_some(()),
    );
    let ticks = lb::procfs::cpu_ticks(lb.pid()).unwrap() - cpu_before;
    eprintln!("1,000 silent connections and 4 peeked: lb CPU {ticks} ticks");
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
