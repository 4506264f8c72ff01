//! What operators run against lb: the Prometheus rules and the Grafana dashboard shipped in
//! `config/`, checked with the real `promtool` and a real Prometheus scraping a live lb.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

fn config(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(path)
}

#[test]
fn promtool_accepts_the_rules_file() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(config("prometheus/lb-rules.yml"))
        .output()
        .expect("promtool (Debian package `prometheus`)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// lb with slot 0 a built-in worker and slot 1 a worker that exits at once (a crash loop).
fn crash_looping_lb() -> Lb {
    let script = format!("[ \"$LB_WORKER_ID\" = 1 ] && exit 3; exec {LB} builtin-worker");
    Lb::start(&[
        "-w",
        "2",
        "--crash-loop",
        "3/30s",
        "--",
        "sh",
        "-c",
        &script,
    ])
}

#[test]
fn the_crash_loop_alert_fires_in_a_real_prometheus_and_every_dashboard_query_has_data() {
    let lb = crash_looping_lb();
    wait_for("slot 1 marked failed", Duration::from_secs(15), || {
        (lb.workers()["workers"][1]["state"] == "failed").then_some(())
    });
    let prom = Prometheus::start(
        &[lb.metrics.unwrap()],
        Some(&config("prometheus/lb-rules.yml")),
    );
    // Some traffic, so that rates and the handoff histogram have something to show.
    for i in 0..20 {
        served_by(lb.addr, Some(client_ip(i)));
    }
    let alert = wait_for("LbWorkerCrashLoop firing", Duration::from_secs(60), || {
        let alerts = prom.get("/api/v1/alerts")?;
        alerts["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == "LbWorkerCrashLoop" && a["state"] == "firing")
            .cloned()
    });
    assert_eq!(alert["labels"]["worker"], "1", "{alert}");
    // Slot 0 is fine: no crash-loop alert for it.
    let alerts = prom.get("/api/v1/alerts").unwrap();
    assert!(
        !alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(
                |a| a["labels"]["alertname"] == "LbWorkerCrashLoop" && a["labels"]["worker"] == "0"
            ),
        "{alerts}"
    );
    // Every query of the dashboard returns data from this Prometheus.
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(config("grafana/lb.json")).unwrap()).unwrap();
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(exprs.len() >= 12, "{exprs:?}");
    for expr in exprs {
        let q = expr
            .replace("$instance", ".*")
            .replace("$__rate_interval", "1m");
        let result = wait_for(&format!("data for {q}"), Duration::from_secs(30), || {
            prom.query(&q).filter(|r| !r.is_empty())
        });
        assert!(!result.is_empty());
    }
    // The recording rules produce series too.
    for rule in [
        "lb:requests:rate1m",
        "lb:worker_requests:rate1m",
        "lb:handoff_failures:rate5m",
    ] {
        wait_for(&format!("recorded {rule}"), Duration::from_secs(30), || {
            prom.query(rule).filter(|r| !r.is_empty())
        });
    }
}

#[test]
fn lb_check_validates_what_a_start_would_without_binding_or_spawning() {
    let dir = std::env::temp_dir().join(format!("lb-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "workers = 3\npolicy = \"round-robin\"\nlisten = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "workers = 3\nqueue_timeout = \"soon\"\n").unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(LB).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A port it could not bind (1) is fine: check binds nothing.
    let (code, out, _) = run(&["check", "-c", good.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("configuration ok: listen 127.0.0.1:1, 3 workers, policy round-robin"),
        "{out}"
    );
    for (args, want) in [
        (
            vec!["check", "-c", bad.to_str().unwrap()],
            "bad.toml line 2",
        ),
        (vec!["check", "--", "no-such-program-lb"], "not found"),
        (vec!["check", "--workers", "0"], "workers"),
        (
            vec!["check", "--steering", "kernel", "-p", "round-robin"],
            "sticky only",
        ),
    ] {
        let (code, _, err) = run(&args);
        assert_eq!(code, Some(2), "{args:?}");
        assert!(
            err.contains(want) && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
