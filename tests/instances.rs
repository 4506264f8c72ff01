//! Several lbs on one host with no control flags (DESIGN §15): each has its own control socket,
//! derived from its listen address; client commands find the right one, `lb ls` lists them, and
//! a killed instance's stale socket does not block its successor.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// A scratch `XDG_RUNTIME_DIR` (where lb puts `lb/<listen>.sock`), removed when dropped.
struct Runtime(std::path::PathBuf);

impl Runtime {
    fn new(tag: &str) -> Runtime {
        let d = std::env::temp_dir().join(format!("lb-xdg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Runtime(d)
    }

    fn env(&self) -> [(&str, &str); 1] {
        [("XDG_RUNTIME_DIR", self.0.to_str().unwrap())]
    }

    /// `lb ARGS` as a user types it (no --control), in this runtime dir.
    fn lb(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = Command::new(LB)
            .args(args)
            .env("XDG_RUNTIME_DIR", &self.0)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        texts(&out)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pids_in(status_json: &str) -> Vec<u32> {
    let v: serde_json::Value = serde_json::from_str(status_json).unwrap();
    let mut p: Vec<u32> = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
        .collect();
    p.sort_unstable();
    p
}

#[test]
fn three_instances_with_default_control_each_answer_for_themselves() {
    let rt = Runtime::new("three");
    let env = rt.env();
    let a = Lb::start_with(&["-w", "1", "--metrics", "off"], &env);
    let b = Lb::start_with(&["-w", "2", "--metrics", "off"], &env);
    // One alone is found without naming it... (checked before the third starts)
    let c;
    {
        let (code, out, err) = rt.lb(&["status", "--listen", &a.target().to_string(), "--json"]);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(pids_in(&out).len(), 1);
        c = Lb::start_with(&["-w", "3", "--metrics", "off"], &env);
    }
    for (lb, n) in [(&a, 1), (&b, 2), (&c, 3)] {
        let addr = lb.target().to_string();
        let want = wait_for("the instance's workers", Duration::from_secs(20), || {
            let (code, out, _) = rt.lb(&["status", "--listen", &addr, "--json"]);
            let p = pids_in(&out);
            (code == Some(0) && p.len() == n).then_some(p)
        });
        // Its own pids: its children.
        for pid in want {
            assert_eq!(stat_field(pid, 1).unwrap(), lb.pid().to_string());
        }
    }
    // Several running and none named: exit 2, naming them.
    let (code, _, err) = rt.lb(&["status"]);
    assert_eq!(code, Some(2));
    assert_eq!(err.lines().count(), 1, "{err}");
    for lb in [&a, &b, &c] {
        assert!(err.contains(&lb.target().to_string()), "{err}");
    }
    // `lb ls` lists all three, with pids and worker counts.
    let (code, out, _) = rt.lb(&["ls"]);
    assert_eq!(code, Some(0));
    for (lb, n) in [(&a, 1), (&b, 2), (&c, 3)] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&lb.target().to_string()))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(line.contains(&lb.pid().to_string()), "{line}");
        assert!(line.contains(&format!("{n}/{n}")), "{line}");
    }
    // A SIGKILLed instance leaves its socket file; a new lb on the same address starts anyway,
    // and `lb ls` never shows the dead one.
    let addr_b = b.target().to_string();
    b.signal(Signal::SIGKILL);
    let mut b = b;
    b.wait_exit(Duration::from_secs(10));
    let (_, out, _) = rt.lb(&["ls"]);
    assert!(!out.contains(&addr_b), "{out}");
    let b2 = Lb::start_with(&["-w", "2", "--metrics", "off", "-l", &addr_b], &env);
    let (code, out, err) = rt.lb(&["status", "--listen", &addr_b, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["pid"], b2.pid());
    // `lb stop --listen` stops only that one.
    let (code, _, err) = rt.lb(&["stop", "--listen", &addr_b]);
    assert_eq!(code, Some(0), "{err}");
    let (_, out, _) = rt.lb(&["ls"]);
    assert_eq!(out.lines().count(), 3, "a header and two instances: {out}");
}

#[test]
fn one_instance_alone_needs_no_flags() {
    let rt = Runtime::new("one");
    let lb = Lb::start_with(&["-w", "2", "--metrics", "off"], &rt.env());
    wait_for("2 workers ready", Duration::from_secs(20), || {
        let (_, out, _) = rt.lb(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let rows = v["workers"].as_array()?;
        (rows.len() == 2 && rows.iter().all(|r| r["state"] == "ready")).then_some(())
    });
    let (code, out, err) = rt.lb(&["status"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ready"), "{out}");
    let sock = rt.0.join("lb").join(format!("{}.sock", lb.target()));
    assert!(sock.exists(), "the per-instance socket {}", sock.display());
}

/// (NODE_APP_INSTANCE, LB_WORKER_ID, pid) as the worker that answers `ip` says.
fn identity(lb: &Lb, ip: std::net::IpAddr) -> (String, String, u32) {
    let (status, body) = http_get(lb.target(), "/", Some(ip));
    assert_eq!(status, 200, "{body}");
    let f: Vec<&str> = body.split_whitespace().collect();
    (f[1].to_owned(), f[3].to_owned(), f[5].parse().unwrap())
}

#[test]
fn workers_get_pm2s_node_app_instance_stable_per_slot_across_respawn_and_roll() {
    let lb = start_node(&["-w", "3"], &fixture("instance.js"), &[]);
    lb.wait_all_ready(3);
    // One client address per slot.
    let ips: Vec<std::net::IpAddr> = (0..3).map(|s| ips_of(s, 3, 1)[0]).collect();
    let seen = |lb: &Lb| -> Vec<(String, String, u32)> {
        ips.iter().map(|ip| identity(lb, *ip)).collect()
    };
    let first = seen(&lb);
    for (slot, (instance, id, _)) in first.iter().enumerate() {
        assert_eq!(
            instance,
            &slot.to_string(),
            "NODE_APP_INSTANCE of slot {slot}"
        );
        assert_eq!(id, &slot.to_string());
    }
    // Slot 1's worker killed: its successor has the same instance number.
    kill(first[1].2, Signal::SIGKILL);
    let after_kill = wait_for("slot 1 respawned", Duration::from_secs(20), || {
        let s = seen(&lb);
        // (Until it is ready its clients go to their next choice.)
        (s[1].1 == "1" && s[1].2 != first[1].2).then_some(s)
    });
    assert_eq!(after_kill[1].0, "1");
    // A rolling restart: every worker new, every instance number where it was.
    let out = lb.cmd(&["roll"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rolled = seen(&lb);
    for (slot, (instance, _, pid)) in rolled.iter().enumerate() {
        assert_eq!(instance, &slot.to_string());
        assert_ne!(*pid, after_kill[slot].2, "slot {slot} was rolled");
    }
}
