//! `--user`: lb (root) runs its workers as another user, with that user's groups and HOME.
//! The test creates a system user and removes it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// A system user created for the test, deleted on drop.
struct TestUser(String);

impl TestUser {
    fn create() -> Option<TestUser> {
        let name = format!("lbt{}", std::process::id());
        let ok = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
            ])
            .args(["/usr/sbin/nologin", &name])
            .status()
            .ok()?
            .success();
        ok.then_some(TestUser(name))
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.0).status();
    }
}

/// (uid, gid) of a process, from /proc.
fn ids(pid: u32) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| -> u32 {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("Uid:"), field("Gid:"))
}

/// A capability set of a process (`CapEff:` …) from /proc, as a bit mask.
fn caps(pid: u32, set: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(set))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

fn env_of(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
        .replace('\0', "\n")
}

#[test]
fn workers_run_as_the_given_user_built_in_and_node() {
    if !std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
    {
        skip(
            "workers_run_as_the_given_user_built_in_and_node",
            "not root",
        );
        return;
    }
    let Some(user) = TestUser::create() else {
        skip(
            "workers_run_as_the_given_user_built_in_and_node",
            "useradd failed",
        );
        return;
    };
    let out = Command::new("id").args(["-u", &user.0]).output().unwrap();
    let uid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    // The built-in worker.
    let lb = Lb::start(&["-w", "2", "--user", &user.0]);
    let pids = lb.wait_all_ready(2);
    for p in &pids {
        assert_eq!(ids(*p).0, uid, "worker {p} runs as {}", user.0);
        let env = env_of(*p);
        assert!(
            env.contains("HOME=/nonexistent") && env.contains(&format!("USER={}", user.0)),
            "{env}"
        );
    }
    assert_eq!(ids(lb.pid()).0, 0, "the master stays root");
    // …with only the capabilities that needs: CAP_KILL (5), CAP_SETGID (6), CAP_SETUID (7).
    let keep = (1u64 << 5) | (1 << 6) | (1 << 7);
    assert_eq!(caps(lb.pid(), "CapEff:"), keep);
    assert_eq!(caps(lb.pid(), "CapPrm:"), keep);
    assert_eq!(caps(lb.pid(), "CapBnd:"), keep);
    for p in &pids {
        for set in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:"] {
            assert_eq!(caps(*p, set), 0, "worker {p} {set}");
        }
    }
    // Killing and replacing a worker still works with what the master kept.
    kill(pids[0], nix::sys::signal::Signal::SIGKILL);
    let again = wait_for("a replacement worker", Duration::from_secs(10), || {
        let now = lb.wait_all_ready(2);
        (!now.contains(&pids[0])).then_some(now)
    });
    assert!(again.iter().all(|p| ids(*p).0 == uid));
    assert_eq!(
        served_by(lb.addr, Some(client_ip(1))).0,
        lb_route(client_ip(1), 2, &[])
    );
    // A Node worker.
    let lb = start_node(&["-w", "1", "--user", &user.0], &example("server.js"), &[]);
    let pid = lb.wait_all_ready(1)[0];
    assert_eq!(ids(pid).0, uid);
    wait_for("the Node worker to serve", Duration::from_secs(10), || {
        (http_get(lb.addr, "/", None).0 == 200).then_some(())
    });
}

#[test]
fn a_bad_user_or_no_root_is_a_one_line_error() {
    let out = Command::new(LB)
        .args(["-l", "127.0.0.1:0", "--metrics", "off", "--control", "off"])
        .args(["--user", "no-such-user-lb"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no such user `no-such-user-lb`") && err.lines().count() == 1,
        "{err}"
    );
    // Not root: refused (run as nobody).
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(LB)
        .args([
            "-l",
            "127.0.0.1:0",
            "--metrics",
            "off",
            "--control",
            "off",
            "--user",
            "root",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs lb to run as root") && err.lines().count() == 1,
        "{err}"
    );
}
