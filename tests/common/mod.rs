//! Test harness: runs the real `lb` binary on port 0 and talks to it with real clients.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Path of a test fixture (`tests/fixtures/NAME`).
pub fn fixture(name: &str) -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/").to_string() + name
}

/// Path of the lb binary under test.
pub const LB: &str = env!("CARGO_BIN_EXE_lb");

/// A running lb master.
pub struct Lb {
    pub child: Child,
    /// The control socket lb was given (removed on drop).
    pub control: Option<std::path::PathBuf>,
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Everything lb wrote to its stdout, byte for byte.
    pub out: Arc<Mutex<Vec<u8>>>,
}

/// Polls `cond` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Lb {
    /// Starts lb with `args` (listen and metrics on port 0 unless given) and waits for its
    /// "listening on" line.
    pub fn start(args: &[&str]) -> Lb {
        Self::start_with(args, &[])
    }

    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Lb {
        Self::start_via(&[], args, env)
    }

    /// Like [`Lb::start_with`], with lb run by a wrapper that execs it (e.g. `prlimit ...`), so
    /// the pid is still lb's.
    pub fn start_via(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Lb {
        Self::start_program(LB.as_ref(), wrapper, args, env)
    }

    /// Like [`Lb::start_with`], with the lb binary at `exe` (an in-place upgrade re-executes
    /// the binary found there).
    pub fn start_exe(exe: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Lb {
        Self::start_program(exe, &[], args, env)
    }

    fn start_program(
        exe: &std::path::Path,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Lb {
        let mut cmd = match wrapper.split_first() {
            None => Command::new(exe),
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(exe);
                c
            }
        };
        // lb's own options: what comes before the worker command.
        let own = &args[..args.iter().position(|a| *a == "--").unwrap_or(args.len())];
        if !own
            .iter()
            .any(|a| *a == "-l" || *a == "--listen" || *a == "-c")
        {
            cmd.args(["-l", "127.0.0.1:0"]);
        }
        if !own.iter().any(|a| *a == "--metrics" || *a == "-c") {
            cmd.args(["--metrics", "127.0.0.1:0"]);
        }
        // Each lb its own control socket, unless the test gives lb its own XDG_RUNTIME_DIR:
        // then lb's default (one socket per instance there) is what is tested.
        let control = if own.contains(&"--control")
            || env.iter().any(|(k, _)| *k == "XDG_RUNTIME_DIR")
        {
            None
        } else {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("lb-test-{}-{n}.sock", std::process::id()));
            cmd.arg("--control").arg(&p);
            Some(p)
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start lb");
        let stderr = child.stderr.take().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        {
            let (out, mut stdout) = (out.clone(), child.stdout.take().unwrap());
            std::thread::spawn(move || {
                let mut buf = [0u8; 64 * 1024];
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut sent = false;
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let line = strip_ansi(&line);
                    log.lock().unwrap().push(line.clone());
                    if !sent && line.contains("listening on ") {
                        let _ = tx.send(line);
                        sent = true;
                    }
                }
            });
        }
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "lb did not report its address; log: {:?}",
                    log.lock().unwrap()
                );
            }
        };
        let after = line.split("listening on ").nth(1).unwrap();
        let addr: SocketAddr = after.split(',').next().unwrap().trim().parse().unwrap();
        let metrics = after
            .split("metrics on ")
            .nth(1)
            .map(|m| m.split_whitespace().next().unwrap().parse().unwrap());
        Lb {
            child,
            control,
            addr,
            metrics,
            log,
            out,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Client address to connect to (127.0.0.1 when lb listens on an unspecified address).
    pub fn target(&self) -> SocketAddr {
        if self.addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], self.addr.port()))
        } else {
            self.addr
        }
    }

    pub fn signal(&self, sig: Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    /// Waits for lb to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        wait_for("lb to exit", timeout, || {
            self.child.try_wait().unwrap().map(|s| s.code())
        })
    }

    /// What lb wrote to its stdout so far, as text (invalid UTF-8 replaced).
    pub fn out_text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn metrics_text(&self) -> String {
        let m = self.metrics.expect("metrics enabled");
        let (status, body) = http_get(m, "/metrics", None);
        assert_eq!(status, 200);
        body
    }

    /// The value of one metric series (`name{labels}`), if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics_text(), series)
    }

    pub fn workers(&self) -> serde_json::Value {
        let (status, body) = http_get(self.metrics.expect("metrics enabled"), "/workers", None);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Pids of the slots' current workers, once every slot is ready.
    /// Runs `lb ARGS --control <this lb's socket>` (a client command) to its end.
    pub fn cmd(&self, args: &[&str]) -> std::process::Output {
        let mut c = Command::new(LB);
        c.args(args);
        if let Some(p) = &self.control {
            c.arg("--control").arg(p);
        }
        c.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .expect("run lb")
    }

    pub fn wait_all_ready(&self, n: usize) -> Vec<u32> {
        wait_for("all workers ready", Duration::from_secs(20), || {
            let w = self.workers();
            let rows = w["workers"].as_array()?.clone();
            if rows.len() == n && rows.iter().all(|r| r["state"] == "ready") {
                Some(
                    rows.iter()
                        .map(|r| r["pid"].as_u64().unwrap() as u32)
                        .collect(),
                )
            } else {
                None
            }
        })
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        // SIGKILL the master; its workers die with it (PR_SET_PDEATHSIG).
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = &self.control {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Connects to `addr`, from source IP `from` if given.
pub fn connect(addr: SocketAddr, from: Option<IpAddr>) -> TcpStream {
    let s = match from {
        None => TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"),
        Some(ip) => {
            let sock = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )
            .unwrap();
            sock.bind(&SocketAddr::new(ip, 0).into())
                .expect("bind source address");
            sock.connect_timeout(&addr.into(), Duration::from_secs(5))
                .expect("connect");
            sock.into()
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// One HTTP/1.1 request on an open connection; returns (status, body). Understands
/// content-length and chunked bodies.
pub fn request(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    body: &[u8],
    close: bool,
) -> (u16, Vec<u8>) {
    let conn = if close { "close" } else { "keep-alive" };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: lb\r\nconnection: {conn}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    read_response(stream)
}

pub fn read_response(stream: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut r = BufReader::new(stream);
    let mut status_line = String::new();
    r.read_line(&mut status_line).expect("read status line");
    assert!(
        status_line.starts_with("HTTP/1.1 "),
        "bad status line {status_line:?}"
    );
    let status: u16 = status_line[9..12].parse().unwrap();
    let mut len = None;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        match k.to_ascii_lowercase().as_str() {
            "content-length" => len = Some(v.trim().parse::<usize>().unwrap()),
            "transfer-encoding" => chunked = v.trim().eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = len {
        body.resize(n, 0);
        r.read_exact(&mut body).unwrap();
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    assert!(r.buffer().is_empty(), "unexpected bytes after the response");
    (status, body)
}

/// GET `path` on a fresh connection (from `from`), `Connection: close`.
pub fn http_get(addr: SocketAddr, path: &str, from: Option<IpAddr>) -> (u16, String) {
    let mut s = connect(addr, from);
    let (status, body) = request(&mut s, "GET", path, b"", true);
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Parses the built-in worker's `worker <slot> pid <pid>` body.
pub fn slot_and_pid(body: &str) -> (usize, u32) {
    let parts: Vec<&str> = body.split_whitespace().collect();
    assert!(
        parts.len() == 4 && parts[0] == "worker" && parts[2] == "pid",
        "unexpected body {body:?}"
    );
    (parts[1].parse().unwrap(), parts[3].parse().unwrap())
}

/// Which slot served a fresh connection from `from`.
/// Reads the answer on `stream`, checks it is a 200, and returns the (slot, pid) that served it.
pub fn answered_by(stream: &mut TcpStream) -> (usize, u32) {
    let (status, body) = read_response(stream);
    assert_eq!(status, 200);
    slot_and_pid(std::str::from_utf8(&body).unwrap())
}

pub fn served_by(addr: SocketAddr, from: Option<IpAddr>) -> (usize, u32) {
    let (status, body) = http_get(addr, "/", from);
    assert_eq!(status, 200, "{body}");
    slot_and_pid(&body)
}

/// The i-th distinct client source address (127.1.x.y).
pub fn client_ip(i: usize) -> IpAddr {
    IpAddr::from([
        127,
        1 + (i / 250 / 250) as u8,
        ((i / 250) % 250) as u8,
        (i % 250 + 1) as u8,
    ])
}

/// `lb route IP -w N` through the real binary.
pub fn lb_route(ip: IpAddr, workers: usize, extra: &[&str]) -> usize {
    let mut args = vec!["route".to_string(), ip.to_string()];
    args.extend(["--workers".to_string(), workers.to_string()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    lb_route_args(&args)
}

/// The slot `lb ARGS` (an `lb route …`) prints.
pub fn lb_route_args(args: &[String]) -> usize {
    let out = Command::new(LB).args(args).output().unwrap();
    ok_stdout(out).trim().parse().unwrap()
}

/// The stdout of a command that must have succeeded (else the test fails with its stderr).
pub fn ok_stdout(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A finished command's exit code, stdout and stderr, as text.
pub fn texts(out: &std::process::Output) -> (Option<i32>, String, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A free loopback port, for a config file that must name one (lb itself binds port 0).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where `name` is on `$PATH`.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.exists())
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    stat_field(pid, 0).is_some_and(|state| !state.starts_with('Z'))
}

/// Field `n` of `/proc/PID/stat` counted after the command name (0 = state, 1 = ppid, 3 =
/// session, 11/12 = user/system CPU ticks); `None` if the process is gone.
pub fn stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state …`: comm may hold spaces and parentheses.
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(n)
        .map(str::to_owned)
}

pub fn kill(pid: u32, sig: Signal) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig);
}

/// Background connection churn: `threads` clients, each cycling over `ips_per_thread` source
/// addresses, one `GET /` per new connection, until stopped (bounded by 20 000 requests per
/// thread and 60 s).
pub struct Churn {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    failures: std::sync::Arc<Mutex<Vec<String>>>,
    seen:
        std::sync::Arc<Mutex<std::collections::HashMap<IpAddr, std::collections::HashSet<usize>>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What a churn run saw.
pub struct ChurnResult {
    /// One line per failed request.
    pub failures: Vec<String>,
    /// The slots each client address was served by.
    pub seen: std::collections::HashMap<IpAddr, std::collections::HashSet<usize>>,
    /// Requests made (answered or failed).
    pub requests: usize,
}

impl Churn {
    pub fn start(
        addr: SocketAddr,
        threads: usize,
        first_ip: usize,
        ips_per_thread: usize,
    ) -> Churn {
        use std::sync::atomic::Ordering;
        let c = Churn {
            stop: Default::default(),
            done: Default::default(),
            failures: Default::default(),
            seen: Default::default(),
            threads: Vec::new(),
        };
        let threads = (0..threads)
            .map(|t| {
                let (stop, done, failures, seen) = (
                    c.stop.clone(),
                    c.done.clone(),
                    c.failures.clone(),
                    c.seen.clone(),
                );
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && i < 20_000 {
                        let ip = client_ip(first_ip + t * ips_per_thread + i % ips_per_thread);
                        i += 1;
                        match std::panic::catch_unwind(|| served_by(addr, Some(ip))) {
                            Ok((slot, _)) => {
                                seen.lock().unwrap().entry(ip).or_default().insert(slot);
                            }
                            Err(e) => {
                                let why = e
                                    .downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_default();
                                failures.lock().unwrap().push(format!("{ip}: {why}"))
                            }
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Churn { threads, ..c }
    }

    /// Requests completed (or failed) so far.
    pub fn count(&self) -> usize {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `n` more requests have completed.
    pub fn wait_more(&self, what: &str, n: usize) {
        let target = self.count() + n;
        wait_for(what, Duration::from_secs(20), || {
            (self.count() >= target).then_some(())
        });
    }

    pub fn stop(self) -> ChurnResult {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        ChurnResult {
            requests: self.done.load(std::sync::atomic::Ordering::Relaxed),
            failures: std::mem::take(&mut self.failures.lock().unwrap()),
            seen: std::mem::take(&mut self.seen.lock().unwrap()),
        }
    }
}

impl ChurnResult {
    /// Only connections a killed worker had already taken may fail, and only by being closed or
    /// reset without an answer (never by hanging): at most one per client thread.
    pub fn assert_only_lost_with_the_killed_worker(&self, threads: usize) {
        let f = &self.failures;
        assert!(
            f.len() <= threads
                && f.iter()
                    .all(|e| e.contains("bad status line \"\"") || e.contains("ConnectionReset")),
            "{} failed requests: {f:?}",
            f.len()
        );
    }

    pub fn assert_no_failures(&self) {
        let f = &self.failures;
        assert!(
            f.is_empty(),
            "{} failed requests, e.g. {:?}",
            f.len(),
            &f[..f.len().min(3)]
        );
    }
}

/// Records that a test could not run on this host (it then returns early): printed, and counted
/// as skipped (not passed) in `scripts/test.sh`'s closing line via `LB_TEST_SKIP_LOG`.
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
    if let Ok(path) = std::env::var("LB_TEST_SKIP_LOG") {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
        {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
}

/// Asserts that `cond` holds at every check for the whole of `window` (sampled every 50 ms):
/// for "it stays so" claims, which one look cannot show.
pub fn holds_for(what: &str, window: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + window;
    loop {
        assert!(cond(), "{what} stopped holding");
        if Instant::now() >= end {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    kb * 1024
}

/// Client addresses whose sticky home among `n` slots is `slot` (the first `count` of 127.1.x.y).
pub fn ips_of(slot: usize, n: usize, count: usize) -> Vec<IpAddr> {
    (0..2000)
        .map(client_ip)
        .filter(|ip| lb_route(*ip, n, &[]) == slot)
        .take(count)
        .collect()
}

/// Sends a GET on a new connection and returns the stream without reading (the worker may be
/// stopped).
pub fn start_request(lb: &Lb, ip: IpAddr) -> TcpStream {
    let mut c = connect(lb.addr, Some(ip));
    c.write_all(b"GET / HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n")
        .unwrap();
    c
}

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `examples/node/node_modules` (installed by the README test command).
pub fn node_modules() -> std::path::PathBuf {
    let nm = root().join("examples/node/node_modules");
    assert!(
        nm.join("ws").exists() && nm.join("socket.io").exists(),
        "npm packages missing: run `npm ci --prefix examples/node` (the README test command does)"
    );
    nm
}

/// Path of `examples/node/NAME`.
pub fn example(name: &str) -> String {
    root()
        .join("examples/node")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// lb with `args` running `node SCRIPT` workers (with the examples' npm packages).
pub fn start_node(args: &[&str], script: &str, env: &[(&str, &str)]) -> Lb {
    let nm = node_modules();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--", "node", script]);
    let mut env = env.to_vec();
    let nm = nm.to_string_lossy().into_owned();
    env.push(("NODE_PATH", &nm));
    Lb::start_with(&all, &env)
}

/// A real Prometheus server (Debian package `prometheus`) scraping `targets` every second,
/// with `rules` loaded if given; stopped (by pid) when dropped.
pub struct Prometheus {
    child: Child,
    /// Its HTTP API address.
    pub api: SocketAddr,
}

impl Prometheus {
    pub fn start(targets: &[SocketAddr], rules: Option<&std::path::Path>) -> Prometheus {
        let dir = std::env::temp_dir().join(format!(
            "lb-prom-{}-{}",
            std::process::id(),
            targets.first().map_or(0, |t| t.port())
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let rule_files = rules.map_or(String::new(), |r| {
            format!("rule_files:\n  - '{}'\n", r.display())
        });
        let cfg = dir.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{rule_files}scrape_configs:\n  - job_name: lb\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "prometheus (Debian package `prometheus`; the README test command installs it)",
            );
        Prometheus {
            child,
            api: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// GET on the API; the JSON `data`, if the server answered 200.
    pub fn get(&self, path_and_query: &str) -> Option<serde_json::Value> {
        std::net::TcpStream::connect(self.api).ok()?;
        let (status, body) = http_get(self.api, path_and_query, None);
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some(v["data"].clone())
    }

    /// An instant query's result vector (PromQL in `q`, URL-encoded here).
    pub fn query(&self, q: &str) -> Option<Vec<serde_json::Value>> {
        let enc: String = q
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        self.get(&format!("/api/v1/query?query={enc}"))?["result"]
            .as_array()
            .cloned()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many fds a process has open.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The `echo_worker` example (a Rust worker on `lb::worker`), built on first use (cargo does not
/// hold its lock while tests run).
pub fn echo_worker() -> std::path::PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "--quiet", "--example", "echo_worker"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo");
    assert!(built.success(), "cargo build --example echo_worker failed");
    let exe = std::path::Path::new(LB)
        .parent()
        .unwrap()
        .join("examples/echo_worker");
    assert!(exe.exists(), "{} not built", exe.display());
    exe
}

/// A WebSocket to `path` on `addr`, from `from`.
pub fn websocket(
    addr: SocketAddr,
    from: Option<IpAddr>,
    path: &str,
) -> tungstenite::WebSocket<TcpStream> {
    let s = connect(addr, from);
    let (ws, resp) =
        tungstenite::client(format!("ws://{addr}{path}"), s).expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}
