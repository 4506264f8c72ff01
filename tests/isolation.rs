//! What lb inherited stays with lb: a worker starts with fds 0, 1, 2, its channel and what lb
//! means to pass (the slot's listener with kernel steering), nothing else — whatever lb's parent
//! left open without close-on-exec (PITFALLS §15). lb is started here by a wrapper that leaves a
//! root-only (0600) file open on fd 7 and an unrelated listening socket on fd 9, as a shell's
//! `exec 7</etc/shadow` or a careless supervisor would.
//!
//! Needs `node` and the npm packages of `examples/node` for the Node workers (the README test
//! command installs them).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Opens `argv[1]` on fd 7 and a listening socket on fd 9 (both inheritable), then execs the rest.
const WRAPPER: &str = "import os, socket, sys\n\
f = os.open(sys.argv[1], os.O_RDONLY); os.dup2(f, 7); os.close(f)\n\
s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); os.dup2(s.fileno(), 9)\n\
os.execv(sys.argv[2], sys.argv[2:])\n";

/// A root-only file with a recognisable content, removed on drop.
struct Secret(std::path::PathBuf);

impl Secret {
    fn new() -> Secret {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("lb-secret-{}-{n}", std::process::id()));
        std::fs::write(&p, "TOP-SECRET-ROOT-ONLY\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        Secret(p)
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// lb started through the wrapper, with `env` added.
fn start(secret: &Secret, args: &[&str], env: &[(&str, &str)]) -> Lb {
    let path = secret.0.to_string_lossy().into_owned();
    Lb::start_via(&["python3", "-c", WRAPPER, &path], args, env)
}

/// Where each of a process's fds points (`/proc/PID/fd/N` links).
fn fd_links(pid: u32) -> Vec<(i32, String)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let n = e.file_name().to_str()?.parse().ok()?;
        let l = std::fs::read_link(e.path()).ok()?;
        Some((n, l.to_string_lossy().into_owned()))
    })
    .collect()
}

/// What lb holds on fds 7 and 9 (the file's path and the socket's inode), checked to be there.
fn inherited(lb: &Lb) -> [String; 2] {
    let links = fd_links(lb.pid());
    let at = |n| links.iter().find(|(f, _)| *f == n).map(|(_, l)| l.clone());
    let (file, sock) = (at(7).expect("lb holds fd 7"), at(9).expect("lb holds fd 9"));
    assert!(file.contains("lb-secret-"), "{file}");
    assert!(sock.starts_with("socket:"), "{sock}");
    [file, sock]
}

/// Every current worker's pid.
fn worker_pids(lb: &Lb) -> Vec<u32> {
    lb.workers()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
        .collect()
}

/// Asserts that no worker holds either inherited fd; returns how many workers were looked at.
fn assert_no_worker_holds(lb: &Lb, inherited: &[String; 2], when: &str) -> usize {
    let pids = worker_pids(lb);
    assert!(!pids.is_empty(), "{when}: no worker");
    for &pid in &pids {
        let links = fd_links(pid);
        assert!(!links.is_empty(), "{when}: cannot read /proc/{pid}/fd");
        for (fd, link) in &links {
            assert!(
                !inherited.contains(link),
                "{when}: worker {pid} holds lb's inherited {link} on fd {fd}"
            );
        }
        // Exactly stdio and the channel (the channel is a socket on fd 3); Node opens its own
        // (epoll, eventfds, pipes) above that, all of them its own.
        let channel = links.iter().find(|(f, _)| *f == 3).map(|(_, l)| l.as_str());
        assert!(
            channel.is_some_and(|l| l.starts_with("socket:")),
            "{when}: worker {pid} has no channel on fd 3: {links:?}"
        );
    }
    pids.len()
}

fn lb_cmd(lb: &Lb, args: &[&str]) {
    let out = Command::new(LB)
        .args(args)
        .arg("--control")
        .arg(lb.control.as_ref().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every way lb starts a worker: the first spawn, a respawn after a crash, `lb roll`, an
/// in-place re-exec (SIGHUP) and `lb scale`.
fn every_spawn_path_keeps_the_inherited_fds(lb: &mut Lb, n: usize, serves: impl Fn(&Lb)) {
    let inh = inherited(lb);
    lb.wait_all_ready(n);
    assert_eq!(assert_no_worker_holds(lb, &inh, "at start"), n);
    serves(lb);

    let old = worker_pids(lb)[0];
    kill(old, Signal::SIGKILL);
    wait_for("slot 0 respawned", Duration::from_secs(20), || {
        let w = lb.workers();
        let row = &w["workers"][0];
        (row["state"] == "ready" && row["pid"].as_u64() != Some(old as u64)).then_some(())
    });
    assert_no_worker_holds(lb, &inh, "after a respawn");

    let before = worker_pids(lb);
    lb_cmd(lb, &["roll"]);
    let after = lb.wait_all_ready(n);
    assert!(after.iter().all(|p| !before.contains(p)), "{after:?}");
    assert_no_worker_holds(lb, &inh, "after lb roll");

    lb.signal(Signal::SIGHUP);
    wait_for("the reload", Duration::from_secs(30), || {
        (lb.metric("lb_reloads_total{result=\"ok\"}") == Some(1.0)).then_some(())
    });
    // The new image still holds what lb inherited (lb's own fds are not the workers').
    assert_eq!(inherited(lb), inh);
    assert_no_worker_holds(lb, &inh, "after a SIGHUP re-exec");

    lb_cmd(lb, &["scale", &(n + 1).to_string()]);
    lb.wait_all_ready(n + 1);
    assert_eq!(
        assert_no_worker_holds(lb, &inh, "after lb scale"),
        n + 1,
        "every slot looked at"
    );
    serves(lb);
    lb.signal(Signal::SIGTERM);
    assert_eq!(lb.wait_exit(Duration::from_secs(20)), Some(0));
}

fn serves_every_slot(lb: &Lb) {
    let n = worker_pids(lb).len();
    let mut seen = std::collections::HashSet::new();
    for i in 0..400 {
        let (status, body) = http_get(lb.addr, "/", Some(client_ip(i)));
        assert_eq!(status, 200, "{body}");
        seen.insert(body.split_whitespace().nth(3).map(str::to_string));
        if seen.len() == n {
            return;
        }
    }
    panic!("only {} of {n} workers answered 400 clients", seen.len());
}

#[test]
fn built_in_workers_get_none_of_lbs_inherited_fds() {
    let secret = Secret::new();
    let mut lb = start(&secret, &["-w", "2"], &[]);
    every_spawn_path_keeps_the_inherited_fds(&mut lb, 2, serves_every_slot);
}

#[test]
fn node_sticky_session_workers_get_none_of_lbs_inherited_fds() {
    let secret = Secret::new();
    let nm = node_modules().to_string_lossy().into_owned();
    let server = example("server.js");
    let mut lb = start(
        &secret,
        &["-w", "2", "--", "node", &server],
        &[("NODE_PATH", &nm)],
    );
    every_spawn_path_keeps_the_inherited_fds(&mut lb, 2, |lb| {
        let (status, body) = http_get(lb.addr, "/", Some(client_ip(1)));
        assert_eq!((status, body.starts_with("worker ")), (200, true), "{body}");
    });
}

#[test]
fn node_cluster_app_workers_get_none_of_lbs_inherited_fds() {
    let secret = Secret::new();
    let app = example("cluster-app.js");
    let mut lb = start(&secret, &["-w", "2", "--", "node", &app], &[]);
    every_spawn_path_keeps_the_inherited_fds(&mut lb, 2, |lb| {
        let (status, body) = http_get(lb.addr, "/", Some(client_ip(1)));
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("hello world from worker"), "{body}");
    });
}

#[test]
fn kernel_steering_workers_still_get_their_listener_and_nothing_else() {
    let secret = Secret::new();
    let lb = start(&secret, &["-w", "2", "--steering", "kernel"], &[]);
    let inh = inherited(&lb);
    lb.wait_all_ready(2);
    assert_no_worker_holds(&lb, &inh, "kernel steering");
    // Each worker's fd 4 is one of the listeners lb holds (its slot's).
    let lb_links = fd_links(lb.pid());
    for pid in worker_pids(&lb) {
        let links = fd_links(pid);
        let four = links
            .iter()
            .find(|(f, _)| *f == 4)
            .map(|(_, l)| l.clone())
            .unwrap_or_else(|| panic!("worker {pid} has no listener on fd 4: {links:?}"));
        assert!(
            lb_links.iter().any(|(_, l)| *l == four),
            "worker {pid}'s fd 4 ({four}) is not one of lb's listeners"
        );
    }
    serves_every_slot(&lb);
}

#[test]
fn a_worker_run_as_another_user_cannot_read_the_root_file_lb_inherited() {
    let secret = Secret::new();
    // The worker tries the inherited fd 7, then the path itself.
    let script = format!(
        "if head -c 20 <&7 >&2 2>/dev/null; then echo FD7-READ >&2; else echo FD7-CLOSED >&2; fi; \
         if cat {} >&2 2>/dev/null; then echo PATH-READ >&2; else echo PATH-DENIED >&2; fi; \
         id -u >&2; exec sleep 60",
        secret.0.display()
    );
    let lb = start(
        &secret,
        &[
            "-w", "1", "--user", "nobody", "--", "/bin/sh", "-c", &script,
        ],
        &[],
    );
    // The worker's own lines (lb's log also quotes the command, markers included).
    let lines = wait_for("the worker's report", Duration::from_secs(20), || {
        let lines: Vec<String> = lb.log.lock().unwrap().clone();
        let has = |p: &str| lines.iter().any(|l| l.starts_with(p));
        (has("FD7-") && has("PATH-") && lines.iter().any(|l| l.trim() == "65534")).then_some(lines)
    });
    let has = |l: &str| lines.iter().any(|x| x.trim() == l);
    assert!(has("FD7-CLOSED"), "{lines:?}");
    assert!(has("PATH-DENIED"), "{lines:?}");
    assert!(!has("FD7-READ") && !has("PATH-READ"), "{lines:?}");
    assert!(
        !lines.iter().any(|l| l.contains("TOP-SECRET")),
        "the worker read the file: {lines:?}"
    );
}
