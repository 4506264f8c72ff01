//! Load generator for lb's benchmarks (`benches/compare.py` drives it).
//!
//! ```text
//! loadgen TARGET MODE [--concurrency N] [--seconds S] [--sources N] [--conns N] [--path P]
//!         [--cookie NAME]
//!   MODE = churn      a new connection per request (`Connection: close`)
//!          keepalive  N connections, requests back to back on each
//!          ws         open --conns idle WebSocket connections, report the time, hold until stdin closes
//!          wsecho     open --conns WebSockets, then each sends a 64-byte message and waits for its
//!                     echo, back to back, for --seconds: messages/s and round-trip p50/p99
//! ```
//!
//! Client sockets are bound to `--sources` distinct loopback addresses spread over many /16s and
//! /24s (127.2-9.x.y) so sticky balancers see many clients. Prints one JSON object: requests, errors, seconds, rps, p50/p99
//! latency in µs, and how many responses each distinct body got (bodies name the worker).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

struct Args {
    target: SocketAddr,
    mode: String,
    concurrency: usize,
    seconds: f64,
    sources: usize,
    conns: usize,
    path: String,
    /// `--cookie NAME`: each client sends `cookie: NAME=client-ID` (for `lb --hash-key cookie:NAME`).
    cookie: Option<String>,
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let target = it
        .next()
        .expect("TARGET")
        .parse()
        .expect("TARGET is IP:PORT");
    let mode = it.next().expect("MODE");
    let mut a = Args {
        target,
        mode,
        concurrency: 50,
        seconds: 5.0,
        sources: 64,
        conns: 10_000,
        path: "/".into(),
        cookie: None,
    };
    while let Some(flag) = it.next() {
        let v = it.next().expect("flag value");
        match flag.as_str() {
            "--concurrency" => a.concurrency = v.parse().unwrap(),
            "--seconds" => a.seconds = v.parse().unwrap(),
            "--sources" => a.sources = v.parse().unwrap(),
            "--conns" => a.conns = v.parse().unwrap(),
            "--path" => a.path = v,
            "--cookie" => a.cookie = Some(v),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// The i-th client address. Every octet varies, so balancers that hash only part of the address
/// see as many distinct keys as there are sources: nginx `ip_hash` uses the first three octets
/// (64 sources: 8 /16s, 64 /24s), HAProxy's map-based `balance source` mostly the low bits.
fn source(i: usize) -> IpAddr {
    IpAddr::from([
        127,
        2 + (i % 8) as u8,
        ((i / 8) % 250) as u8,
        (i % 250 + 1) as u8,
    ])
}

async fn connect(target: SocketAddr, from: IpAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from, 0))?;
    let stream = s.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads one HTTP/1.1 response with a content-length body; returns the body.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    buf.clear();
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = stream.read(&mut tmp).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.1 101") {
                return Err(std::io::Error::other(
                    head.lines().next().unwrap_or("").to_owned(),
                ));
            }
            return Ok(buf[end + 4..end + 4 + len].to_vec());
        }
        let n = stream.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    bodies: HashMap<String, u64>,
}

async fn client(a: std::sync::Arc<Args>, id: usize, deadline: Instant) -> Tally {
    let mut t = Tally::default();
    let close = a.mode == "churn";
    let cookie = a.cookie.as_ref().map_or_else(String::new, |name| {
        format!("cookie: {name}=client-{id}\r\n")
    });
    let req = format!(
        "GET {} HTTP/1.1\r\nhost: bench\r\n{cookie}connection: {}\r\n\r\n",
        a.path,
        if close { "close" } else { "keep-alive" }
    );
    let mut buf = Vec::with_capacity(4096);
    let mut conn: Option<TcpStream> = None;
    let mut n = 0usize;
    while Instant::now() < deadline {
        let from = source((id + n * a.concurrency) % a.sources);
        n += 1;
        let start = Instant::now();
        if conn.is_none() {
            match connect(a.target, from).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    t.errors += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected");
        let ok = match c.write_all(req.as_bytes()).await {
            Ok(()) => read_response(c, &mut buf).await,
            Err(e) => Err(e),
        };
        match ok {
            Ok(body) => {
                t.latencies_us
                    .push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
                let key = String::from_utf8_lossy(&body).trim().to_owned();
                *t.bodies.entry(key).or_default() += 1;
            }
            Err(_) => {
                t.errors += 1;
                conn = None;
            }
        }
        if close {
            conn = None;
        }
    }
    t
}

async fn websockets(a: &Args) -> serde_json::Value {
    let start = Instant::now();
    let mut held = Vec::with_capacity(a.conns);
    let mut errors = 0u64;
    let mut bodies: HashMap<String, u64> = HashMap::new();
    let mut buf = Vec::new();
    for i in 0..a.conns {
        let from = source(i % a.sources);
        let r = async {
            let mut c = connect(a.target, from).await?;
            let req = format!(
                "GET {} HTTP/1.1\r\nhost: bench\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                a.path
            );
            c.write_all(req.as_bytes()).await?;
            read_response(&mut c, &mut buf).await?;
            Ok::<_, std::io::Error>(c)
        }
        .await;
        match r {
            Ok(c) => held.push(c),
            Err(_) => errors += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    *bodies.entry("ws".into()).or_default() += held.len() as u64;
    // Report, then hold the connections until told to stop (stdin closes).
    let report = serde_json::json!({
        "mode": "ws", "connections": held.len(), "errors": errors, "seconds": secs,
        "conns_per_s": held.len() as f64 / secs,
    });
    println!("{report}");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(held);
    report
}

/// Opens one WebSocket (upgrade on `path`) from `from`.
async fn ws_open(target: SocketAddr, from: IpAddr, path: &str) -> std::io::Result<TcpStream> {
    let mut c = connect(target, from).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: bench\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    c.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    read_response(&mut c, &mut buf).await?;
    Ok(c)
}

/// One connection's echo loop: a masked 64-byte binary frame out, the unmasked echo back.
async fn echo_loop(mut c: TcpStream, deadline: Instant) -> (Vec<u32>, u64) {
    let payload = [0x5au8; 64];
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x82, 0x80 | 64];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let mut rtts = Vec::new();
    let mut back = [0u8; 66];
    while Instant::now() < deadline {
        let t = Instant::now();
        if c.write_all(&frame).await.is_err() || c.read_exact(&mut back).await.is_err() {
            return (rtts, 1);
        }
        if back[0] != 0x82 || back[1] != 64 || back[2..] != payload {
            return (rtts, 1);
        }
        rtts.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    (rtts, 0)
}

/// CPU seconds this process has used (user + system).
fn own_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

async fn ws_echo(a: &Args) {
    let mut conns = Vec::with_capacity(a.conns);
    let mut errors = 0u64;
    for i in 0..a.conns {
        match ws_open(a.target, source(i % a.sources), &a.path).await {
            Ok(c) => conns.push(c),
            Err(_) => errors += 1,
        }
    }
    let opened = conns.len();
    let (cpu0, start) = (own_cpu(), Instant::now());
    let deadline = start + Duration::from_secs_f64(a.seconds);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(echo_loop(c, deadline)))
        .collect();
    let mut rtts = Vec::new();
    for t in tasks {
        let (r, e) = t.await.unwrap();
        rtts.extend(r);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = own_cpu() - cpu0;
    rtts.sort_unstable();
    let pct = |p: f64| {
        if rtts.is_empty() {
            0
        } else {
            rtts[((rtts.len() - 1) as f64 * p) as usize]
        }
    };
    println!(
        "{}",
        serde_json::json!({
            "mode": "wsecho", "connections": opened, "messages": rtts.len(), "errors": errors,
            "seconds": secs, "msgs_per_s": rtts.len() as f64 / secs, "p50_us": pct(0.5),
            "p99_us": pct(0.99), "loadgen_cpu_s": cpu,
        })
    );
}

fn main() {
    let a = std::sync::Arc::new(parse_args());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if a.mode == "ws" {
            websockets(&a).await;
            return;
        }
        if a.mode == "wsecho" {
            ws_echo(&a).await;
            return;
        }
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(a.seconds);
        let tasks: Vec<_> = (0..a.concurrency).map(|i| tokio::spawn(client(a.clone(), i, deadline))).collect();
        let mut all = Tally::default();
        for t in tasks {
            let t = t.await.unwrap();
            all.latencies_us.extend(t.latencies_us);
            all.errors += t.errors;
            for (k, v) in t.bodies {
                *all.bodies.entry(k).or_default() += v;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        all.latencies_us.sort_unstable();
        let pct = |p: f64| {
            let l = &all.latencies_us;
            if l.is_empty() { 0 } else { l[((l.len() - 1) as f64 * p) as usize] }
        };
        let n = all.latencies_us.len();
        println!(
            "{}",
            serde_json::json!({
                "mode": a.mode, "requests": n, "errors": all.errors, "seconds": secs,
                "rps": n as f64 / secs, "p50_us": pct(0.5), "p99_us": pct(0.99), "bodies": all.bodies,
            })
        );
    });
}
