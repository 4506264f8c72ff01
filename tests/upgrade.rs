//! In-place upgrade on SIGHUP (DESIGN §10): lb re-executes itself in the same pid and keeps
//! its listener, workers, connections and counters; a reload that cannot happen changes nothing.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use nix::sys::signal::Signal;

/// A config file's first lines: any free port for the listener and the admin endpoint.
const PORT0: &str = "listen = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\n";

/// A scratch directory of this test process.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lb-upgrade-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Puts a copy of `from` at `to` the way an upgrade does: written next to it, renamed over it
/// (a running binary cannot be written in place).
fn install(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// `lb --version` of a binary.
fn version_of(exe: &Path) -> String {
    let out = std::process::Command::new(exe)
        .arg("--version")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// An lb binary whose version string differs from the one under test: the same sources built
/// with `LB_VERSION` set. `scripts/test.sh` builds it (`LB_NEXT_BIN`); otherwise it is built
/// here, in its own target directory.
fn next_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("LB_NEXT_BIN").map(PathBuf::from)
        && p.exists()
    {
        return p;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target").join("lb-next-build");
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--bin", "lb", "--target-dir"])
        .arg(&target)
        .env("LB_VERSION", concat!(env!("CARGO_PKG_VERSION"), "+next"))
        .current_dir(root)
        .status()
        .unwrap();
    assert!(status.success(), "building the next lb failed");
    target.join("debug").join("lb")
}

/// Every counter series of a scrape (`_total`, and histograms' `_bucket`/`_count`/`_sum`).
fn counters(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            ["_total", "_bucket", "_count", "_sum"]
                .iter()
                .any(|s| name.ends_with(s))
                .then(|| Some((series.to_owned(), value.parse().ok()?)))?
        })
        .collect()
}

/// Asserts no counter of `before` went down or disappeared in `after`.
fn assert_monotonic(before: &HashMap<String, f64>, after: &HashMap<String, f64>, when: &str) {
    for (series, v) in before {
        let now = after.get(series).copied();
        assert!(
            now.is_some_and(|n| n >= *v),
            "{when}: {series} went from {v} to {now:?}"
        );
    }
}

/// `n` WebSockets from `ips` source addresses, each sending a message and checking its echo
/// every 100 ms until stopped.
struct Sockets {
    stop: Arc<AtomicBool>,
    open: Arc<AtomicU64>,
    echoed: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Sockets {
    fn start(addr: SocketAddr, n: usize, ips: usize) -> Sockets {
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicU64::new(0));
        let echoed = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, o, e, f) = (stop.clone(), open.clone(), echoed.clone(), failures.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let tasks: Vec<_> = (0..n)
                    .map(|i| {
                        let (s, o, e, f) = (s.clone(), o.clone(), e.clone(), f.clone());
                        let ip = client_ip(1000 + i % ips);
                        tokio::spawn(async move {
                            // Paced, so that connecting does not overflow the backlog.
                            tokio::time::sleep(Duration::from_millis(i as u64 * 2)).await;
                            if let Err(why) = one_socket(addr, ip, i, &s, &o, &e).await {
                                f.lock()
                                    .unwrap()
                                    .push(format!("socket {i} from {ip}: {why}"));
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        Sockets {
            stop,
            open,
            echoed,
            failures,
            thread,
        }
    }

    fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    /// Waits until `n` more messages have been echoed.
    fn wait_more(&self, n: u64) {
        let target = self.echoed() + n;
        wait_for("more WebSocket echoes", Duration::from_secs(30), || {
            (self.echoed() >= target).then_some(())
        });
    }

    /// Stops every socket (closing it cleanly); returns the failures.
    fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        std::mem::take(&mut self.failures.lock().unwrap())
    }
}

async fn one_socket(
    addr: SocketAddr,
    ip: IpAddr,
    i: usize,
    stop: &AtomicBool,
    open: &AtomicU64,
    echoed: &AtomicU64,
) -> Result<(), String> {
    use tokio_tungstenite::tungstenite::Message;
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::new(ip, 0))
        .map_err(|e| e.to_string())?;
    let stream = sock.connect(addr).await.map_err(|e| e.to_string())?;
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    open.fetch_add(1, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let msg = format!("socket {i} message {n} {}", "x".repeat((n % 64) as usize));
        ws.send(Message::text(msg.clone()))
            .await
            .map_err(|e| format!("send {n}: {e}"))?;
        let back = loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Err(_) => return Err(format!("no echo of message {n} within 10 s")),
                Ok(None) => return Err(format!("closed before the echo of message {n}")),
                Ok(Some(Err(e))) => return Err(format!("read {n}: {e}")),
                Ok(Some(Ok(Message::Text(t)))) => break t.to_string(),
                Ok(Some(Ok(Message::Close(_)))) => {
                    return Err(format!("closed by the server at message {n}"));
                }
                Ok(Some(Ok(_))) => continue,
            }
        };
        if back != msg {
            return Err(format!("message {n} came back as {back:?}"));
        }
        echoed.fetch_add(1, Ordering::Relaxed);
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// The worker pids `/workers` shows, by slot.
fn pids(lb: &Lb) -> Vec<u64> {
    lb.workers()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap_or(0))
        .collect()
}

fn reloads(lb: &Lb, result: &str) -> f64 {
    lb.metric(&format!("lb_reloads_total{{result=\"{result}\"}}"))
        .unwrap_or(0.0)
}

/// Waits until one line of lb's log contains every one of `parts`.
fn wait_log_line(lb: &Lb, parts: &[&str]) {
    wait_for(
        &format!("a log line with {parts:?}"),
        Duration::from_secs(5),
        || {
            lb.log_text()
                .lines()
                .any(|l| parts.iter().all(|p| l.contains(p)))
                .then_some(())
        },
    );
}

/// Sends SIGHUP and waits until lb counted the reload as `result`.
fn sighup(lb: &Lb, result: &str) {
    let before = reloads(lb, result);
    lb.signal(Signal::SIGHUP);
    wait_for(
        &format!("a reload counted as {result}"),
        Duration::from_secs(20),
        || (reloads(lb, result) > before).then_some(()),
    );
}

#[test]
fn three_sighups_one_onto_a_new_binary_keep_every_connection_pid_and_counter() {
    let dir = scratch("three");
    let exe = dir.join("lb");
    install(Path::new(LB), &exe);
    let next = next_binary();
    let (old_version, new_version) = (version_of(&exe), version_of(&next));
    assert_ne!(
        old_version, new_version,
        "the next build must say another version"
    );
    let lb = Lb::start_exe(&exe, &["-w", "3", "--wait-ready"], &[]);
    let before_pids = lb.wait_all_ready(3);
    let sockets = Sockets::start(lb.addr, 1000, 100);
    wait_for("1000 WebSockets open", Duration::from_secs(60), || {
        (sockets.open.load(Ordering::Relaxed) == 1000).then_some(())
    });
    sockets.wait_more(2000);
    let churn = Churn::start(lb.addr, 6, 1, 10); // 60 client addresses
    churn.wait_more("churn before the reloads", 100);
    let mut last = counters(&lb.metrics_text());
    for round in 0..3 {
        if round == 1 {
            install(&next, &exe);
        }
        sighup(&lb, "ok");
        let now = counters(&lb.metrics_text());
        assert_monotonic(&last, &now, &format!("reload {}", round + 1));
        last = now;
        // Still serving: new connections and the open WebSockets.
        churn.wait_more("churn after a reload", 100);
        sockets.wait_more(1000);
    }
    let result = churn.stop();
    let churned = result.requests;
    let failures = sockets.stop();
    result.assert_no_failures();
    assert!(
        failures.is_empty(),
        "{} WebSockets failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert_eq!(lb.wait_all_ready(3), before_pids, "every worker kept");
    assert_eq!(reloads(&lb, "ok"), 3.0);
    assert_eq!(reloads(&lb, "failed"), 0.0);
    assert_monotonic(&last, &counters(&lb.metrics_text()), "the end");
    // Workers report cumulative request counts: each is counted once, not again by each new
    // image (churn requests plus one upgrade request per WebSocket, at most).
    let requests: f64 = (0..3)
        .map(|i| {
            lb.metric(&format!("lb_worker_requests_total{{worker=\"{i}\"}}"))
                .unwrap()
        })
        .sum();
    assert!(
        requests <= (churned + 1000) as f64,
        "{requests} requests counted for {churned} churn requests and 1000 WebSockets"
    );
    let version = new_version.rsplit(' ').next().unwrap();
    assert_eq!(
        lb.metric(&format!(
            "lb_build_info{{policy=\"sticky\",version=\"{version}\"}}"
        )),
        Some(1.0),
        "{}",
        lb.metrics_text()
    );
    // Same master pid: the process we started is the one still running.
    assert!(alive(lb.pid()));
    assert_eq!(lb.log_text().matches("re-executed in place").count(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reload_scales_3_to_5_to_2_and_rolls_a_new_worker_command_with_no_failed_request() {
    let dir = scratch("scale");
    let cfg = dir.join("lb.toml");
    let write = |workers: usize, tag: &str| {
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\nworkers = {workers}\nwait_ready = true\ncommand = [\"sh\", \"-c\", \"exec {LB} builtin-worker # {tag}\"]\n"
            ),
        )
        .unwrap()
    };
    write(3, "v1");
    let lb = Lb::start(&["-c", cfg.to_str().unwrap()]);
    let first = lb.wait_all_ready(3);
    let churn = Churn::start(lb.addr, 4, 1, 5);
    churn.wait_more("churn", 50);
    // 3 → 5: two slots start, the three workers stay.
    write(5, "v1");
    sighup(&lb, "ok");
    let five = lb.wait_all_ready(5);
    assert_eq!(five[..3], first[..], "the existing workers stay");
    churn.wait_more("churn at 5 workers", 50);
    // 5 → 2 and a new command: slots 2–4 drain, slots 0–1 are replaced one by one.
    write(2, "v2");
    sighup(&lb, "ok");
    wait_for("2 new workers", Duration::from_secs(30), || {
        let p = pids(&lb);
        let w = lb.workers();
        let ready = w["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["state"] == "ready");
        (p.len() == 2 && ready && p.iter().zip(&five).all(|(a, b)| *a != u64::from(*b)))
            .then_some(())
    });
    churn.wait_more("churn at 2 workers", 50);
    churn.stop().assert_no_failures();
    for pid in &five[2..] {
        wait_for("a drained worker to exit", Duration::from_secs(10), || {
            (!alive(*pid)).then_some(())
        });
    }
    for i in 0..5 {
        assert_eq!(
            lb_route(client_ip(i), 2, &[]),
            served_by(lb.addr, Some(client_ip(i))).0
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_broken_config_or_binary_is_logged_counted_and_lb_carries_on_unchanged() {
    let dir = scratch("broken");
    let exe = dir.join("lb");
    install(Path::new(LB), &exe);
    let cfg = dir.join("lb.toml");
    std::fs::write(&cfg, format!("{PORT0}workers = 2\n")).unwrap();
    let lb = Lb::start_exe(&exe, &["-c", cfg.to_str().unwrap()], &[]);
    let pids = lb.wait_all_ready(2);
    // A configuration that does not parse.
    std::fs::write(&cfg, format!("{PORT0}workers = \"many\"\n")).unwrap();
    sighup(&lb, "failed");
    wait_log_line(&lb, &["reload failed, running as before", "many"]);
    // A binary that cannot start.
    std::fs::write(&cfg, format!("{PORT0}workers = 2\n")).unwrap();
    let script = dir.join("broken.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'lb: error: this build is broken' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    install(&script, &exe);
    sighup(&lb, "failed");
    wait_log_line(&lb, &["reload failed", "this build is broken"]);
    assert_eq!(reloads(&lb, "failed"), 2.0);
    assert_eq!(reloads(&lb, "ok"), 0.0);
    assert!(alive(lb.pid()));
    assert_eq!(lb.wait_all_ready(2), pids);
    for i in 0..4 {
        let (slot, pid) = served_by(lb.addr, Some(client_ip(i)));
        assert_eq!(pid, pids[slot]);
    }
    // The real binary back: the next reload works.
    install(Path::new(LB), &exe);
    sighup(&lb, "ok");
    assert_eq!(lb.wait_all_ready(2), pids);
    let _ = std::fs::remove_dir_all(&dir);
}

/// lb started from a copy of its binary in a scratch directory, with a config file of
/// `workers = 2` and a named worker command (the built-in worker's would be the start path, which
/// the wrapper changes: a changed command is a rolling restart). Then the start path gets a shell
/// script that runs `on_check` for `lb check` (with `$REAL` the real binary, `$CFG` the config
/// file, `$DIR` the directory) and otherwise executes the real binary. Returns the directory, the
/// config file, lb and its workers' pids.
fn lb_behind_a_wrapper(name: &str, on_check: &str) -> (PathBuf, PathBuf, Lb, Vec<u32>) {
    let dir = scratch(name);
    let exe = dir.join("lb");
    let real = dir.join("lb.real");
    install(Path::new(LB), &exe);
    install(Path::new(LB), &real);
    let cfg = dir.join("lb.toml");
    std::fs::write(&cfg, format!("{PORT0}workers = 2\n")).unwrap();
    let lb = Lb::start_exe(
        &exe,
        &["-c", cfg.to_str().unwrap(), "--", LB, "builtin-worker"],
        &[],
    );
    let pids = lb.wait_all_ready(2);
    let script = dir.join("wrapper.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nREAL=\"{}\"; CFG=\"{}\"; DIR=\"{}\"\n\
             if [ \"$1\" = check ]; then\n{on_check}\nfi\nexec \"$REAL\" \"$@\"\n",
            real.display(),
            cfg.display(),
            dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    install(&script, &exe);
    (dir, cfg, lb, pids)
}

#[test]
fn a_config_file_changed_during_the_reload_does_not_reach_the_new_image() {
    // The new image runs with the text the preflight checked, not with what the file holds by the
    // time of the exec: an edit in between (here made by the binary at the start path as soon as
    // its check passed) must not make the new image exit and take every worker with it.
    let (dir, cfg, lb, pids) = lb_behind_a_wrapper(
        "race",
        "\"$REAL\" \"$@\"; status=$?\necho 'workers = \"many\"' > \"$CFG\"\nexit $status",
    );
    std::fs::write(&cfg, format!("{PORT0}workers = 3\n")).unwrap();
    sighup(&lb, "ok");
    assert!(alive(lb.pid()), "{}", lb.log_text());
    let now = lb.wait_all_ready(3);
    assert_eq!(now[..2], pids[..], "the workers were carried over");
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        "workers = \"many\"\n",
        "the file was edited after the check"
    );
    // The file as it is now is what the next reload reads: refused, nothing changes.
    sighup(&lb, "failed");
    wait_log_line(&lb, &["reload failed, running as before", "many"]);
    assert_eq!(lb.wait_all_ready(3), now);
    for i in 0..6 {
        let (slot, pid) = served_by(lb.addr, Some(client_ip(i)));
        assert_eq!(pid, now[slot]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_config_file_changed_again_while_the_preflight_runs_is_checked_again() {
    // The binary at the start path refuses `workers = 4` (as a new version might refuse a
    // setting the running one accepts). Its first check (of `workers = 3`) waits until the test
    // has changed the file to 4 and sent SIGHUP again: lb must check that text too, not carry it
    // unchecked on the first check's word.
    let (dir, cfg, lb, pids) = lb_behind_a_wrapper(
        "recheck",
        "case \"$LB_UPGRADE_CONFIG\" in *\"workers = 4\"*) \
         echo 'lb: error: this build refuses 4 workers' >&2; exit 2;; esac\n\
         touch \"$DIR/check-started\"\n\
         i=0; while [ ! -e \"$DIR/go\" ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done",
    );
    std::fs::write(&cfg, format!("{PORT0}workers = 3\n")).unwrap();
    lb.signal(Signal::SIGHUP);
    wait_for("the first check to start", Duration::from_secs(10), || {
        dir.join("check-started").exists().then_some(())
    });
    std::fs::write(&cfg, format!("{PORT0}workers = 4\n")).unwrap();
    lb.signal(Signal::SIGHUP);
    wait_log_line(&lb, &["changed again during the reload"]);
    std::fs::write(dir.join("go"), "").unwrap();
    wait_for("the reload to fail", Duration::from_secs(20), || {
        (reloads(&lb, "failed") == 1.0).then_some(())
    });
    wait_log_line(&lb, &["reload failed", "refuses 4 workers"]);
    assert_eq!(reloads(&lb, "ok"), 0.0);
    assert!(alive(lb.pid()));
    assert_eq!(lb.wait_all_ready(2), pids, "nothing changed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sighup_during_a_rolling_restart_waits_for_it_and_during_shutdown_is_ignored() {
    // Workers take a moment to be ready, so the roll is still going when SIGHUP comes.
    let slow = format!("sleep 0.5; exec {LB} builtin-worker");
    let mut lb = Lb::start(&["-w", "2", "--wait-ready", "--", "sh", "-c", &slow]);
    let first = lb.wait_all_ready(2);
    lb.signal(Signal::SIGUSR2);
    wait_for("the roll to start", Duration::from_secs(5), || {
        lb.log_text().contains("rolling restart").then_some(())
    });
    sighup(&lb, "ok");
    assert!(
        lb.log_text()
            .contains("the reload waits for the workers to settle"),
        "{}",
        lb.log_text()
    );
    let rolled = lb.wait_all_ready(2);
    assert!(
        rolled.iter().zip(&first).all(|(a, b)| a != b),
        "the roll finished"
    );
    assert_eq!(reloads(&lb, "ok"), 1.0);
    // During a shutdown: ignored, and lb still exits. A request half sent keeps a worker
    // draining until the client goes.
    let mut held = connect(lb.addr, None);
    std::io::Write::write_all(&mut held, b"GET / HTTP/1.1\r\n").unwrap();
    wait_for("the connection handed over", Duration::from_secs(5), || {
        (lb.metric("lb_worker_active_connections{worker=\"0\"}")
            .unwrap_or(0.0)
            + lb.metric("lb_worker_active_connections{worker=\"1\"}")
                .unwrap_or(0.0)
            >= 1.0)
            .then_some(())
    });
    lb.signal(Signal::SIGTERM);
    wait_for("the shutdown to start", Duration::from_secs(5), || {
        lb.log_text().contains("graceful shutdown").then_some(())
    });
    lb.signal(Signal::SIGHUP);
    wait_for("SIGHUP ignored", Duration::from_secs(5), || {
        lb.log_text()
            .contains("SIGHUP during shutdown: ignored")
            .then_some(())
    });
    drop(held);
    assert_eq!(lb.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn a_node_cluster_app_with_socket_io_keeps_its_clients_and_its_relay_across_reloads() {
    use std::io::{BufRead, Write};
    let lb = start_node(&["-w", "3"], &example("socketio-cluster.js"), &[]);
    let pids = lb.wait_all_ready(3);
    let mut client = std::process::Command::new("node")
        .arg(fixture("sio-broadcast.js"))
        .arg(format!("http://{}", lb.addr))
        .args(["30", "60000"])
        .env("NODE_PATH", node_modules())
        .env("WAIT_FOR_GO", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(client.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "upgraded", "the clients did not all connect");
    // 30 socket.io clients on WebSockets across 3 workers; lb re-executes twice.
    sighup(&lb, "ok");
    sighup(&lb, "ok");
    assert_eq!(lb.wait_all_ready(3), pids);
    // The broadcast still crosses workers (lb relays the adapter's messages) and reaches every
    // client, none of which was disconnected.
    client.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let out = client.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["why"], "done", "{r}");
    assert_eq!(r["received"], 30, "{r}");
    assert_eq!(r["disconnected"], 0, "{r}");
    assert_eq!(r["pids"].as_array().unwrap().len(), 3, "{r}");
    // Requests after the reloads: routed to the same workers, counted once.
    let before = lb
        .metric("lb_worker_connections_total{worker=\"0\"}")
        .unwrap();
    for i in 0..5 {
        let ip = ips_of(0, 3, 5)[i];
        let (status, _) = http_get(lb.addr, "/socket.io/?EIO=4&transport=polling", Some(ip));
        assert_eq!(status, 200);
    }
    // (ACKs are counted as they reach lb, possibly just after the responses.)
    wait_for("the 5 connections counted", Duration::from_secs(5), || {
        (lb.metric("lb_worker_connections_total{worker=\"0\"}")? == before + 5.0).then_some(())
    });
}

#[test]
fn a_binary_refuses_a_state_format_it_does_not_read_in_one_line() {
    // What the preflight asks the new binary: can you take over from format N?
    let run = |format: &str| {
        std::process::Command::new(LB)
            .args([
                "check",
                "--takeover",
                format,
                "-w",
                "1",
                "-l",
                "127.0.0.1:0",
            ])
            .output()
            .unwrap()
    };
    let ok = run("1");
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    let out = run("99");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("state format is 99") && err.contains("reads format 1"),
        "{err}"
    );
}

#[test]
fn a_reload_while_a_worker_holds_a_handoff_unanswered_keeps_serving_and_goes_through_once_it_answers()
 {
    let lb = Lb::start(&["-w", "2"]);
    let pids = lb.wait_all_ready(2);
    // Slot 0's worker is stopped with a connection handed to it and not ACKed.
    kill(pids[0], Signal::SIGSTOP);
    let mut held = start_request(&lb, ips_of(0, 2, 1)[0]);
    wait_for("the handoff in flight", Duration::from_secs(5), || {
        (lb.metric("lb_accepted_connections_total")? >= 1.0).then_some(())
    });
    lb.signal(Signal::SIGHUP);
    // lb cannot settle, so it does not re-execute; it keeps serving (slot 1's clients, and slot
    // 0's once it is seen stalled), and says so.
    wait_for(
        "the settle given up for now",
        Duration::from_secs(10),
        || {
            lb.log_text()
                .contains("the reload waits for the workers to settle")
                .then_some(())
                .or_else(|| {
                    lb.log_text()
                        .contains("handoffs in flight not settled")
                        .then_some(())
                })
        },
    );
    for ip in ips_of(1, 2, 5) {
        assert_eq!(served_by(lb.addr, Some(ip)), (1, pids[1]));
    }
    assert_eq!(reloads(&lb, "ok"), 0.0);
    // The worker resumes and answers: the held connection is served, and the reload happens.
    kill(pids[0], Signal::SIGCONT);
    assert_eq!(answered_by(&mut held), (0, pids[0]));
    wait_for("the reload", Duration::from_secs(15), || {
        (reloads(&lb, "ok") == 1.0).then_some(())
    });
    assert_eq!(reloads(&lb, "failed"), 0.0);
    assert_eq!(lb.wait_all_ready(2), pids);
}
