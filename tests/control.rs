//! `lb status`, `lb roll` and `lb stop` against a running lb, over its control socket.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;

/// Asserts the command exited 0 (showing its stderr otherwise).
fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn lb_cmd(lb: &Lb, args: &[&str]) -> Output {
    Command::new(LB)
        .args(args)
        .arg("--control")
        .arg(lb.control.as_ref().unwrap())
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

#[test]
fn lb_status_shows_every_worker_as_a_table_and_as_json() {
    let lb = Lb::start(&["-w", "3"]);
    let pids = lb.wait_all_ready(3);
    let out = lb_cmd(&lb, &["status"]);
    succeeded(&out);
    let table = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(rows.len(), 3, "{table}");
    for (slot, pid) in pids.iter().enumerate() {
        let cols: Vec<&str> = rows[slot].split_whitespace().collect();
        assert_eq!(
            cols[..3],
            [slot.to_string().as_str(), &pid.to_string(), "ready"],
            "{table}"
        );
    }
    assert!(!table.contains('\x1b'), "no colours when not on a terminal");
    let out = lb_cmd(&lb, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<u64> = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(got, pids.iter().map(|p| *p as u64).collect::<Vec<_>>());
}

#[test]
fn lb_roll_returns_once_every_worker_is_replaced_and_loses_nothing() {
    let lb = Lb::start(&["-w", "2", "--wait-ready"]);
    let before = lb.wait_all_ready(2);
    let churn = Churn::start(lb.addr, 3, 900, 20);
    churn.wait_more("requests before the roll", 50);
    let out = lb_cmd(&lb, &["roll"]);
    succeeded(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("rolling restart complete"), "{text}");
    // When `lb roll` returns, every slot has a new pid.
    let w = lb.workers();
    for (slot, old) in before.iter().enumerate() {
        let row = &w["workers"][slot];
        assert_eq!(row["state"], "ready");
        assert_ne!(
            row["pid"], *old,
            "slot {slot} not replaced when lb roll returned"
        );
    }
    churn.wait_more("requests after the roll", 50);
    churn.stop().assert_no_failures();
}

#[test]
fn lb_stop_shuts_down_gracefully() {
    let mut lb = Lb::start(&["-w", "2"]);
    let pids = lb.wait_all_ready(2);
    let out = lb_cmd(&lb, &["stop"]);
    succeeded(&out);
    assert_eq!(lb.wait_exit(Duration::from_secs(20)), Some(0));
    for p in pids {
        assert!(!alive(p));
    }
    assert!(
        !lb.control.as_ref().unwrap().exists(),
        "the socket file is removed at exit"
    );
    // Nobody there any more: a one-line error, exit 2.
    let out = lb_cmd(&lb, &["status"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no lb is running") && err.lines().count() == 1,
        "{err}"
    );
}

#[test]
fn a_second_lb_on_the_same_control_socket_is_refused_and_others_cannot_connect() {
    let lb = Lb::start(&["-w", "1"]);
    lb.wait_all_ready(1);
    let path = lb.control.clone().unwrap();
    let out = Command::new(LB)
        .args([
            "-l",
            "127.0.0.1:0",
            "--metrics",
            "off",
            "-w",
            "1",
            "--control",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another lb is running") && err.lines().count() == 1,
        "{err}"
    );
    // The first one is unaffected.
    assert!(lb_cmd(&lb, &["status"]).status.success());
    // Mode 0600: a user other than lb's cannot connect.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(LB)
        .args(["status", "--control"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn completions_and_the_man_page_come_from_the_cli_definition() {
    let out = Command::new(LB)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let bash = String::from_utf8(out.stdout).unwrap();
    for word in [
        "status",
        "roll",
        "stop",
        "--control",
        "--max-pending",
        "--serialization",
    ] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    let out = Command::new(LB).arg("manpage").output().unwrap();
    assert!(out.status.success());
    let man = String::from_utf8(out.stdout).unwrap();
    assert!(man.contains(".TH lb 1"), "{}", &man[..200.min(man.len())]);
    assert!(
        man.contains("heartbeat\\-ping"),
        "the man page lists every option"
    );
    let out = Command::new(LB)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn lb_scale_follows_the_count_and_every_client_goes_where_lb_route_says() {
    let lb = Lb::start(&["-w", "3"]);
    lb.wait_all_ready(3);
    let ips: Vec<std::net::IpAddr> = (0..60).map(|i| client_ip(1200 + i)).collect();
    let before: Vec<usize> = ips
        .iter()
        .map(|ip| served_by(lb.addr, Some(*ip)).0)
        .collect();
    let churn = Churn::start(lb.addr, 2, 1500, 20);
    for n in [5usize, 2] {
        let out = lb_cmd(&lb, &["scale", &n.to_string()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Removed slots drain and disappear; new ones start and get ready.
        lb.wait_all_ready(n);
        for (ip, was) in ips.iter().zip(&before) {
            let now = served_by(lb.addr, Some(*ip)).0;
            assert_eq!(now, lb_route(*ip, n, &[]), "{ip} with {n} workers");
            // Rendezvous: a client whose slot survives and is still its best choice stays put.
            if lb_route(*ip, n, &[]) == lb_route(*ip, 3, &[]) {
                assert_eq!(now, *was, "{ip} moved without a reason");
            }
        }
        churn.wait_more("requests after the scale", 40);
    }
    churn.stop().assert_no_failures();
    // Bad counts are one-line errors.
    let out = lb_cmd(&lb, &["scale", "0"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn lb_reload_and_sighup_apply_the_edited_config_and_a_bad_one_changes_nothing() {
    let dir = std::env::temp_dir().join(format!("lb-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("lb.toml");
    let write = |body: &str| {
        std::fs::write(
            &cfg,
            format!("listen = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\n{body}"),
        )
        .unwrap()
    };
    write("workers = 2\nqueue_timeout = \"5s\"\n");
    let lb = Lb::start(&["-c", cfg.to_str().unwrap()]);
    let first = lb.wait_all_ready(2);
    // More workers and another timeout: applied without a restart.
    write("workers = 3\nqueue_timeout = \"2s\"\n");
    let out = lb_cmd(&lb, &["reload"]);
    succeeded(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("workers") && text.contains("queue_timeout"),
        "{text}"
    );
    let now = lb.wait_all_ready(3);
    assert_eq!(now[..2], first[..], "the existing workers stay");
    // A bad value: a one-line error naming it, and lb runs on as it was.
    write("workers = 3\nqueue_timeout = \"soon\"\n");
    let out = lb_cmd(&lb, &["reload"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("soon") && err.lines().count() == 1, "{err}");
    assert_eq!(lb.wait_all_ready(3), now);
    // A new listen address is reported as needing a restart, not applied.
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:1\"\nmetrics = \"127.0.0.1:0\"\nworkers = 3\nqueue_timeout = \"2s\"\n",
    )
    .unwrap();
    let out = lb_cmd(&lb, &["reload"]);
    succeeded(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("not applied until lb is restarted: listen"),
        "{text}"
    );
    assert_eq!(
        served_by(lb.addr, Some(client_ip(1))).0,
        lb_route(client_ip(1), 3, &[])
    );
    // SIGHUP does the same as lb reload: back to 2 workers.
    write("workers = 2\nqueue_timeout = \"2s\"\n");
    lb.signal(Signal::SIGHUP);
    assert_eq!(lb.wait_all_ready(2), first);
    assert_eq!(lb.metric("lb_reloads_total{result=\"ok\"}"), Some(3.0));
    assert_eq!(lb.metric("lb_reloads_total{result=\"failed\"}"), Some(1.0));
    let _ = std::fs::remove_dir_all(&dir);
}
