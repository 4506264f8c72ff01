//! What a new user did following the README, and what they must see: each test repeats the
//! commands as they were typed (signals by the pids `pidof lb` gives, `lb stop && lb …`,
//! `lb status --watch | head -1`, …).

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// The pids `pidof lb` prints: every process whose executable is lb's (the master and its
/// built-in workers), read from `/proc` as pidof does, restricted to this lb's own tree.
fn pidof_lb(master: u32) -> Vec<u32> {
    let exe = std::fs::read_link(format!("/proc/{master}/exe")).unwrap();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok().as_ref() == Some(&exe))
        .filter(|&pid| pid == master || stat_field(pid, 1).as_deref() == Some(&master.to_string()))
        .collect();
    pids.sort_unstable();
    pids
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

#[test]
fn kill_hup_of_every_lb_process_reloads_and_the_built_in_workers_live_on() {
    let lb = Lb::start(&["-w", "3"]);
    let workers = lb.wait_all_ready(3);
    let pids = pidof_lb(lb.pid());
    assert_eq!(pids.len(), 4, "the master and 3 built-in workers: {pids:?}");
    // `ps` tells them apart, as nginx's "nginx: worker process" does.
    for w in &workers {
        let slot = lb.workers()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["pid"] == *w)
            .unwrap()["slot"]
            .as_u64()
            .unwrap();
        assert!(
            cmdline(*w).starts_with(&format!("lb: worker {slot} ")),
            "{}",
            cmdline(*w)
        );
        // The kernel's name (`ps -o comm`, `top`) is set by the worker itself, once it runs.
        wait_for("the worker's comm", Duration::from_secs(5), || {
            let comm = std::fs::read_to_string(format!("/proc/{w}/comm")).ok()?;
            (comm.trim() == format!("lb: worker {slot}")).then_some(())
        });
    }
    assert!(!cmdline(lb.pid()).starts_with("lb: worker"));

    // `kill -HUP $(pidof lb)`, then the same with USR2 and INT to the workers only.
    for pid in &pids {
        kill(*pid, Signal::SIGHUP);
    }
    wait_for("the reload", Duration::from_secs(15), || {
        lb.log_text().contains("re-executed in place").then_some(())
    });
    for sig in [Signal::SIGUSR2, Signal::SIGHUP] {
        for w in &workers {
            kill(*w, sig);
        }
    }
    // Whatever those signals did, it is done once a request to every slot is answered.
    let after = lb.wait_all_ready(3);
    assert_eq!(after, workers, "the same workers serve");
    for w in &workers {
        assert!(alive(*w));
    }
    assert_eq!(
        lb.metric("lb_worker_restarts_total{worker=\"0\"}"),
        Some(0.0)
    );
    assert!(
        !lb.log_text().contains("exited unexpectedly"),
        "{}",
        lb.log_text()
    );
    for i in 0..30 {
        let (status, _) = http_get(lb.target(), "/", Some(client_ip(i)));
        assert_eq!(status, 200);
    }
}

#[test]
fn every_worker_death_by_signal_is_logged_and_counted() {
    // Node workers die of SIGHUP (Node resets signal dispositions at start): three rounds of
    // HUP to the master and every worker at once; each death is one log line and one restart.
    let lb = start_node(&["-w", "3"], &example("server.js"), &[]);
    let mut deaths = 0u32;
    for round in 1..=3 {
        let workers = lb.wait_all_ready(3);
        kill(lb.pid(), Signal::SIGHUP);
        for w in &workers {
            kill(*w, Signal::SIGHUP);
        }
        deaths += 3;
        wait_for("the workers replaced", Duration::from_secs(20), || {
            let now = lb.workers();
            let rows = now["workers"].as_array()?;
            rows.iter()
                .all(|r| {
                    r["state"] == "ready"
                        && r["pid"]
                            .as_u64()
                            .is_some_and(|p| !workers.contains(&(p as u32)))
                })
                .then_some(())
        });
        let restarts: f64 = (0..3)
            .map(|s| {
                lb.metric(&format!("lb_worker_restarts_total{{worker=\"{s}\"}}"))
                    .unwrap()
            })
            .sum();
        assert_eq!(restarts, f64::from(deaths), "round {round}");
        let logged = lb.log_text().matches("killed by signal SIGHUP").count();
        assert_eq!(logged, deaths as usize, "round {round}: {}", lb.log_text());
    }
}

/// `sh -c "<lb …> | head -1"`: what lb wrote to stderr and its own exit status.
fn piped_to_head(lb: &Lb, args: &str) -> (i32, String) {
    let control = lb.control.as_ref().unwrap().display().to_string();
    let script = format!(
        "{LB} {args} --control {control} 2>\"$E\" | head -1 >/dev/null; echo ${{PIPESTATUS[0]}}"
    );
    let err = std::env::temp_dir().join(format!("lb-head-{}-{}", std::process::id(), args.len()));
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .env("E", &err)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let _ = std::fs::remove_file(&err);
    (code, stderr)
}

#[test]
fn a_closed_stdout_is_a_normal_end_for_every_client_command() {
    let lb = Lb::start(&["-w", "2"]);
    lb.wait_all_ready(2);
    // `--watch` writes a table a second until stdout goes; the others write more than one line.
    for args in ["status --watch", "status", "roll", "route 10.0.0.1 --live"] {
        let (code, stderr) = piped_to_head(&lb, args);
        assert!(
            code == 0 || code == 141,
            "lb {args} | head -1: exit {code}, {stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "lb {args} | head -1: {stderr}"
        );
    }
    for args in ["completions bash", "manpage", "--help"] {
        let script = format!("{LB} {args} 2>&1 | head -1 >/dev/null; echo ${{PIPESTATUS[0]}}");
        let out = std::process::Command::new("bash")
            .args(["-c", &script])
            .output()
            .unwrap();
        let code: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert!(code == 0 || code == 141, "lb {args} | head -1: exit {code}");
    }
}

#[test]
fn after_a_scale_down_the_removed_slots_have_no_series_and_no_alert_fires() {
    let lb = Lb::start(&["-w", "3"]);
    lb.wait_all_ready(3);
    let out = lb.cmd(&["scale", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lb.wait_all_ready(1);
    wait_for(
        "the removed slots' series gone",
        Duration::from_secs(10),
        || {
            let text = lb.metrics_text();
            (!text.contains("worker=\"1\"") && !text.contains("worker=\"2\"")).then_some(())
        },
    );
    // A late word from a removed worker does not bring them back.
    holds_for(
        "no series for slots 1 and 2",
        Duration::from_secs(2),
        || !lb.metrics_text().contains("worker=\"2\""),
    );
    assert_eq!(lb.metric("lb_worker_up{worker=\"0\"}"), Some(1.0));
    let rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prometheus/lb-rules.yml");
    let prom = Prometheus::start(&[lb.metrics.unwrap()], Some(&rules));
    // The README's "a slot is down" query and the shipped alerts, as Prometheus evaluates them.
    wait_for("Prometheus scraping lb", Duration::from_secs(30), || {
        let r = prom.query("count(lb_worker_up)")?;
        (r.first()?["value"][1] == "1").then_some(())
    });
    holds_for(
        "nothing says a slot is down",
        Duration::from_secs(3),
        || {
            prom.query("sum(lb_worker_up) < count(lb_worker_up)")
                .is_some_and(|r| r.is_empty())
                && prom.get("/api/v1/alerts").is_some_and(|a| {
                    a["alerts"].as_array().is_some_and(|v| {
                        !v.iter().any(|a| {
                            a["labels"]["alertname"].as_str().is_some_and(|n| {
                                n.starts_with("LbWorker") || n == "LbNoWorkerReady"
                            })
                        })
                    })
                })
        },
    );
    // Scaling up again gives the new slots fresh series.
    assert!(lb.cmd(&["scale", "2"]).status.success());
    lb.wait_all_ready(2);
    assert_eq!(lb.metric("lb_worker_up{worker=\"1\"}"), Some(1.0));
}

#[test]
fn a_reload_keeps_the_count_lb_scale_set_unless_the_file_changed_it() {
    let dir = std::env::temp_dir().join(format!("lb-scale-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("lb.toml");
    let write = |workers: usize| {
        std::fs::write(
            &cfg,
            format!("listen = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\nworkers = {workers}\n"),
        )
        .unwrap()
    };
    write(2);
    let lb = Lb::start(&["-c", cfg.to_str().unwrap()]);
    lb.wait_all_ready(2);
    assert!(lb.cmd(&["scale", "4"]).status.success());
    lb.wait_all_ready(4);
    // The file did not change: the reload keeps 4, and says why.
    let out = lb.cmd(&["reload"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("reloaded: changed nothing"), "{said}");
    assert!(said.contains("keeps the 4 that `lb scale` set"), "{said}");
    wait_for("the reload done", Duration::from_secs(15), || {
        lb.log_text().contains("re-executed in place").then_some(())
    });
    holds_for("4 workers after the reload", Duration::from_secs(2), || {
        lb.workers()["workers"]
            .as_array()
            .is_some_and(|w| w.len() == 4)
    });
    assert!(
        !lb.log_text().contains("scaling from 4 to 2"),
        "{}",
        lb.log_text()
    );
    // The same with SIGHUP.
    lb.signal(Signal::SIGHUP);
    wait_for("the second reload", Duration::from_secs(15), || {
        (lb.log_text().matches("re-executed in place").count() == 2).then_some(())
    });
    holds_for("still 4 workers", Duration::from_secs(2), || {
        lb.workers()["workers"]
            .as_array()
            .is_some_and(|w| w.len() == 4)
    });
    // The file's workers changed: the file wins, and the report says so.
    write(3);
    let out = lb.cmd(&["reload"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("reloaded: changed workers"), "{said}");
    assert!(
        said.contains("the file's 3 replaces the 4 that `lb scale` set"),
        "{said}"
    );
    lb.wait_all_ready(3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lb_stop_returns_once_lb_has_exited_so_the_same_command_starts_again() {
    let control = std::env::temp_dir().join(format!("lb-stop-again-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&control);
    let control_s = control.to_str().unwrap();
    let lb = Lb::start(&[
        "-w",
        "2",
        "--control",
        control_s,
        "--shutdown-timeout",
        "10s",
    ]);
    lb.wait_all_ready(2);
    let listen = lb.target().to_string();
    // A request in flight: its head half sent when `lb stop` runs, the rest after.
    let mut inflight = connect(lb.target(), Some(client_ip(7)));
    std::io::Write::write_all(&mut inflight, b"GET / HTTP/1.1\r\nhost: lb\r\n").unwrap();
    let stop = {
        let control = control.clone();
        std::thread::spawn(move || {
            let out = std::process::Command::new(LB)
                .args(["stop", "--control"])
                .arg(&control)
                .output()
                .unwrap();
            (out, std::time::Instant::now())
        })
    };
    wait_for("the shutdown begun", Duration::from_secs(10), || {
        lb.log_text().contains("graceful shutdown").then_some(())
    });
    std::io::Write::write_all(&mut inflight, b"connection: close\r\n\r\n").unwrap();
    let (status, _) = read_response(&mut inflight);
    assert_eq!(status, 200, "the request in flight is answered");
    let (out, returned) = stop.join().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("waiting for lb (pid"), "{said}");
    assert!(!alive(lb.pid()) || stat_field(lb.pid(), 0).as_deref() == Some("Z"));
    let _ = returned;
    // `lb stop && lb <same flags>`: the same address and control socket.
    let again = Lb::start(&["-w", "2", "-l", &listen, "--control", control_s]);
    again.wait_all_ready(2);
    assert_eq!(again.target().to_string(), listen);
    drop(again);
    drop(lb);
    let _ = std::fs::remove_file(&control);
}

#[test]
fn lb_scale_returns_when_the_new_count_is_ready() {
    let lb = Lb::start(&["-w", "1"]);
    lb.wait_all_ready(1);
    let out = lb.cmd(&["scale", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 workers ready"));
    // No polling here: when `lb scale` returns, the slots are there and ready.
    let rows = lb.workers()["workers"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["state"] == "ready"), "{rows:?}");
    let out = lb.cmd(&["scale", "1"]);
    assert!(out.status.success());
    assert_eq!(
        lb.workers()["workers"].as_array().unwrap().len(),
        1,
        "the removed slots are gone"
    );
    let out = lb.cmd(&["scale", "2", "--no-wait"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("not waiting"));
}

#[test]
fn a_worker_command_that_cannot_start_is_caught_by_lb_check_and_by_lb() {
    // In a directory without server.js, as the user typed it.
    let dir = std::env::temp_dir().join(format!("lb-no-server-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(LB)
            .args(args)
            .current_dir(&dir)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = run(&["check", "--", "node", "server.js"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("worker script `server.js` not found"), "{err}");
    assert!(err.contains("Cannot find module"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, _, err) = run(&[
        "-l",
        "127.0.0.1:0",
        "--control",
        "off",
        "--",
        "node",
        "server.js",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("worker script `server.js` not found"), "{err}");
    assert!(!err.contains("listening on"), "{err}");
    // What a check cannot see, it says.
    let (code, out, _) = run(&["check", "--", "node", "-e", "1"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("not checked: that it starts and serves"),
        "{out}"
    );

    // A worker that fails at start (a throw at load time, which no check can see): lb stops
    // after the third failed start of every slot, exit status ≠ 0, and its last line says why.
    let t = std::time::Instant::now();
    let mut lb = Lb::start(&[
        "-w",
        "2",
        "--",
        "node",
        "-e",
        "throw new Error('boom: cannot start')",
    ]);
    let code = lb.wait_exit(Duration::from_secs(30));
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}");
    assert!(t.elapsed() < Duration::from_secs(30));
    let log = lb.log_text();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains("every worker exited before it could serve, 3 times in a row"),
        "{log}"
    );
    assert!(
        log.contains("Error: boom: cannot start"),
        "the worker's own error is above: {log}"
    );
    assert_eq!(log.matches("exited unexpectedly").count(), 6, "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
