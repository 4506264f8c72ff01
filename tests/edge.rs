//! How lb starts, reports and stops under the tools operators run it with: systemd's socket
//! activation (`systemd-socket-activate`, Debian package `systemd`), the `sd_notify` protocol,
//! and as PID 1 of a container (`unshare --pid`).

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// Socket inodes of a process's open fds (`socket:[N]`), by fd number.
fn socket_inodes(pid: u32) -> Vec<(u32, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            let ino = link
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((fd, ino))
        })
        .collect()
}

/// Inodes of the TCP sockets in LISTEN state on this host.
fn listening_inodes() -> HashSet<u64> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| {
            t.lines()
                .skip(1)
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.get(3) == Some(&"0A")).then(|| f.get(9)?.parse().ok())?
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

#[test]
fn under_systemd_socket_activation_lb_serves_on_the_passed_sockets_and_keeps_them_from_workers() {
    let Some(activate) = which("systemd-socket-activate").map(|p| p.display().to_string()) else {
        return skip(
            "socket activation",
            "systemd-socket-activate is not installed (apt-get install systemd)",
        );
    };
    let (port, mport) = (free_port(), free_port());
    let listen = format!("127.0.0.1:{port}");
    let metrics = format!("127.0.0.1:{mport}");
    // systemd-socket-activate execs lb at the first connection: make one from another thread.
    let poke = std::thread::spawn({
        let addr: SocketAddr = listen.parse().unwrap();
        move || {
            let mut s = wait_for("the activation socket", Duration::from_secs(10), || {
                TcpStream::connect(addr).ok()
            });
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        }
    });
    let lb = Lb::start_via(
        &[
            &activate,
            "-l",
            &listen,
            "-l",
            &metrics,
            "--fdname=http:metrics",
        ],
        &["-w", "2"],
        &[],
    );
    let first = poke.join().unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert_eq!(lb.addr.to_string(), listen, "serves on the passed socket");
    assert!(lb.log_text().contains("(sockets from systemd)"));
    let pids = lb.wait_all_ready(2);
    assert!(served_by(lb.addr, None).0 < 2);
    // lb listens on exactly the two sockets it was given (it bound none of its own).
    let listening = listening_inodes();
    let lb_listening: Vec<(u32, u64)> = socket_inodes(lb.pid())
        .into_iter()
        .filter(|(_, ino)| listening.contains(ino))
        .collect();
    let fds: HashSet<u32> = lb_listening.iter().map(|(fd, _)| *fd).collect();
    assert_eq!(fds, HashSet::from([3, 4]), "{lb_listening:?}");
    let passed: HashSet<u64> = lb_listening.iter().map(|(_, i)| *i).collect();
    for pid in pids {
        let env = environ(pid);
        for var in [
            "LISTEN_PID",
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
            "NOTIFY_SOCKET",
        ] {
            assert!(
                !env.iter().any(|e| e.starts_with(&format!("{var}="))),
                "worker {pid} inherited {var}"
            );
        }
        let leaked: Vec<_> = socket_inodes(pid)
            .into_iter()
            .filter(|(_, ino)| passed.contains(ino))
            .collect();
        assert!(
            leaked.is_empty(),
            "worker {pid} holds lb's sockets: {leaked:?}"
        );
    }
}

/// The notifications received on `sock` until `until` says stop (or `limit` passes).
fn notifications(
    sock: &UnixDatagram,
    limit: Duration,
    mut until: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let end = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        sock.set_read_timeout(Some(
            end.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                let stop = until(&m);
                out.push(m);
                if stop {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    out
}

#[test]
fn sd_notify_ready_after_a_worker_reloading_then_ready_stopping_and_watchdog_pings() {
    let dir = std::env::temp_dir().join(format!("lb-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).unwrap();
    let path_s = path.to_string_lossy().into_owned();
    // The worker takes a moment to be ready (--wait-ready, the Python worker says so once set
    // up), so READY=1 must wait for it.
    let mut lb = Lb::start_with(
        &[
            "-w",
            "1",
            "--wait-ready",
            "--",
            "python3",
            &fixture("raw_worker.py"),
        ],
        &[("NOTIFY_SOCKET", &path_s), ("WATCHDOG_USEC", "200000")],
    );
    let mut got = notifications(&sock, Duration::from_secs(20), |m| m.contains("READY=1"));
    assert!(got.last().unwrap().contains("READY=1"), "{got:?}");
    assert!(
        got.last()
            .unwrap()
            .contains("STATUS=serving: 1 of 1 workers ready")
    );
    // At the moment READY=1 arrived, a worker was ready.
    assert_eq!(lb.workers()["workers"][0]["state"], "ready");
    // Watchdog pings at WATCHDOG_USEC/2 = 100 ms: 1.5 s gives about 15.
    let started = Instant::now();
    let pings = notifications(&sock, Duration::from_millis(1500), |_| false);
    let n = pings.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(
        (8..=25).contains(&n),
        "{n} pings in {:?}: {pings:?}",
        started.elapsed()
    );
    got.extend(pings);
    lb.signal(Signal::SIGHUP);
    got.extend(notifications(&sock, Duration::from_secs(10), |m| {
        m.starts_with("READY=1")
    }));
    lb.signal(Signal::SIGTERM);
    got.extend(notifications(&sock, Duration::from_secs(10), |m| {
        m.starts_with("STOPPING=1")
    }));
    assert_eq!(lb.wait_exit(Duration::from_secs(15)), Some(0));
    let states: Vec<&str> = got
        .iter()
        .filter(|m| *m != "WATCHDOG=1")
        .map(|m| m.lines().next().unwrap())
        .collect();
    assert_eq!(
        states,
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"],
        "{got:?}"
    );
    let reloading = got.iter().find(|m| m.starts_with("RELOADING=1")).unwrap();
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC with RELOADING=1")
        .parse()
        .unwrap();
    assert!(usec > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `(pid, ppid, state, comm)` of every process.
fn processes() -> Vec<(u32, u32, char, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let comm = stat[stat.find('(')? + 1..stat.rfind(')')?].to_string();
            let mut f = stat[stat.rfind(')')? + 2..].split_whitespace();
            let state = f.next()?.chars().next()?;
            let ppid = f.next()?.parse().ok()?;
            Some((pid, ppid, state, comm))
        })
        .collect()
}

fn descendants(root: u32) -> Vec<(u32, u32, char, String)> {
    let all = processes();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for proc in all.iter().filter(|x| x.1 == p) {
            frontier.push(proc.0);
            out.push(proc.clone());
        }
    }
    out
}

#[test]
fn as_pid_1_lb_reaps_orphans_keeps_its_workers_statuses_and_leaves_nothing() {
    let Some(unshare) = which("unshare").map(|p| p.display().to_string()) else {
        return skip("pid 1", "unshare is not installed (util-linux)");
    };
    // Each worker leaves an orphan that exits after a moment (re-parented to PID 1: lb).
    let script = "(sleep 0.3 </dev/null >/dev/null 2>&1 &); exec \"$0\" builtin-worker";
    let probe = std::process::Command::new(&unshare)
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        return skip("pid 1", "cannot create a PID namespace here (needs root)");
    }
    let mut lb = Lb::start_via(
        &[&unshare, "--pid", "--fork", "--mount-proc", "--kill-child"],
        &[
            "-w",
            "2",
            "--shutdown-timeout",
            "2s",
            "--",
            "sh",
            "-c",
            script,
            LB,
        ],
        &[],
    );
    // lb is unshare's child, PID 1 in the new namespace.
    let lb_pid = wait_for("lb under unshare", Duration::from_secs(10), || {
        processes()
            .into_iter()
            .find(|p| p.1 == lb.pid() && p.3 == "lb")
            .map(|p| p.0)
    });
    let status = std::fs::read_to_string(format!("/proc/{lb_pid}/status")).unwrap();
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .to_string();
    assert_eq!(nspid, "1", "lb is PID 1 in its namespace");
    let workers = lb.wait_all_ready(2);
    // The orphans come and go: none stays behind as a zombie.
    wait_for("the orphans to be reaped", Duration::from_secs(10), || {
        let d = descendants(lb_pid);
        (!d.iter().any(|p| p.3 == "sleep")).then_some(())
    });
    assert!(!descendants(lb_pid).iter().any(|p| p.2 == 'Z'));
    // A worker's exit status still reaches lb (not stolen by the reaping).
    assert!(served_by(lb.addr, None).0 < 2);
    let victim = descendants(lb_pid)
        .into_iter()
        // (A built-in worker names itself `lb: worker N`.)
        .find(|p| p.1 == lb_pid && p.3.starts_with("lb: worker"))
        .map(|p| p.0)
        .unwrap();
    kill(victim, Signal::SIGKILL);
    wait_for(
        "the killed worker's status in the log",
        Duration::from_secs(10),
        || {
            lb.log_text()
                .contains("worker exited unexpectedly (killed by signal SIGKILL)")
                .then_some(())
        },
    );
    let now = lb.wait_all_ready(2);
    assert_ne!(now, workers);
    assert!(served_by(lb.addr, None).0 < 2);
    let seen: Vec<u32> = descendants(lb_pid).iter().map(|p| p.0).collect();
    kill(lb_pid, Signal::SIGTERM);
    assert_eq!(
        lb.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        lb.log_text()
    );
    for p in seen.into_iter().chain([lb_pid]) {
        assert!(!alive(p), "process {p} survived");
    }
}
