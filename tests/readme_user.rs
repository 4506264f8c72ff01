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
    ok_stdout(lb.cmd(&["scale", "1"]));
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
    let out = ok_stdout(lb.cmd(&["scale", "3"]));
    assert!(out.contains("3 workers ready"), "{out}");
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
        texts(&out)
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

    // When lb reads the workers' output, its last line quotes the worker's error line (not
    // Node's closing `Node.js v20…`, the true last line of its stderr).
    let mut lb = Lb::start(&[
        "-w",
        "1",
        "--worker-output",
        "prefix",
        "--",
        "node",
        "-e",
        "require('./not-here.js')",
    ]);
    let code = lb.wait_exit(Duration::from_secs(30));
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}");
    let log = lb.log_text();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains("the worker's last error: Error: Cannot find module './not-here.js'"),
        "{log}"
    );
    assert!(
        last.ends_with("lb stops: fix the worker command and start again"),
        "{last}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's first fenced block with this info string (```` ```haproxy ````), as printed.
fn readme_block(info: &str) -> String {
    readme_block_after("", info)
}

/// The README's first fenced block with this info string after the text `after`.
fn readme_block_after(after: &str, info: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let from = readme
        .find(after)
        .expect("the README has the text before the block");
    let start = from
        + readme[from..]
            .find(&format!("\n```{info}\n"))
            .unwrap_or_else(|| panic!("no ```{info} block in the README after {after:?}"))
        + info.len()
        + 5;
    let len = readme[start..].find("\n```").unwrap();
    readme[start..start + len + 1].to_owned()
}

/// A front tier (HAProxy, nginx) run from a config file, stopped by pid when dropped.
struct Front {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    dir: std::path::PathBuf,
}

impl Front {
    fn start(name: &str, cfg: &str, argv: impl Fn(&std::path::Path) -> Vec<String>) -> Front {
        let port = free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let dir =
            std::env::temp_dir().join(format!("lb-front-{name}-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = cfg
            .replace("bind :443", &format!("bind {addr}"))
            .replace("listen 443;", &format!("listen {addr};"))
            .replace("@DIR@", &dir.display().to_string());
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, cfg).unwrap();
        let argv = argv(&path);
        let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let mut child = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_for(
            &format!("{name} to listen"),
            Duration::from_secs(10),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "{name} exited ({status}): {}",
                        std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
                    );
                }
                std::net::TcpStream::connect(addr).ok().map(|_| ())
            },
        );
        Front { child, addr, dir }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// GET / through the front from `ip`: the slot that answered, or `None` if it failed.
fn via_front(front: std::net::SocketAddr, ip: std::net::IpAddr) -> Option<usize> {
    use std::io::{Read, Write};
    let mut s = connect(front, Some(ip));
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    if !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    Some(slot_and_pid(text.split("\r\n\r\n").nth(1)?).0)
}

/// The README's two-host setup behind a front tier made from `cfg` (the README's block with the
/// hosts' addresses put in): every client on its route slot; then host b SIGKILLed, and every
/// request still served on the same slot — 0 failed, while the balancer notices and after.
fn two_hosts_behind(name: &str, block: &str, argv: impl Fn(&std::path::Path) -> Vec<String>) {
    let args = ["-w", "3", "--hash-seed", "7", "--proxy-protocol", "strip"];
    let a = Lb::start(&args);
    let mut b = Lb::start(&args);
    a.wait_all_ready(3);
    b.wait_all_ready(3);
    let cfg = block
        .replace("10.0.0.11:8000", &a.target().to_string())
        .replace("10.0.0.12:8000", &b.target().to_string());
    let front = Front::start(name, &cfg, argv);
    let ips: Vec<std::net::IpAddr> = (0..40).map(|i| client_ip(3000 + i)).collect();
    let want = |ip: std::net::IpAddr| lb_route(ip, 3, &["--hash-seed", "7"]);
    for ip in &ips {
        let slot = wait_for(
            "an answer through the front",
            Duration::from_secs(10),
            || via_front(front.addr, *ip),
        );
        assert_eq!(slot, want(*ip), "{name}: client {ip}");
    }
    let served_by_b = b.metric("lb_accepted_connections_total").unwrap();
    assert!(served_by_b > 0.0, "{name} spreads clients over both hosts");
    b.signal(Signal::SIGKILL);
    b.wait_exit(Duration::from_secs(10));
    let killed = std::time::Instant::now();
    // Three passes over every client: the first right after the kill, the last after the
    // balancer's check interval (HAProxy: inter 1s × fall 2).
    let mut failed = Vec::new();
    for pass in 0..3 {
        if pass == 2 {
            wait_for("the check interval", Duration::from_secs(5), || {
                (killed.elapsed() >= Duration::from_secs(3)).then_some(())
            });
        }
        for ip in &ips {
            match via_front(front.addr, *ip) {
                Some(slot) => assert_eq!(slot, want(*ip), "{name}: client {ip} after the kill"),
                None => failed.push((pass, *ip)),
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{name}: failed after losing a host: {failed:?}"
    );
}

#[test]
fn the_readmes_haproxy_front_tier_runs_as_printed_and_survives_losing_a_host() {
    let Some(bin) = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        return skip(
            "haproxy front tier",
            "HAProxy is not installed (apt-get install haproxy)",
        );
    };
    let block = readme_block("haproxy");
    // As printed, the config passes HAProxy's own check without a warning.
    two_hosts_behind("haproxy", &block, |cfg| {
        let check = std::process::Command::new(bin)
            .args(["-c", "-f"])
            .arg(cfg)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&check.stdout).into_owned()
            + &String::from_utf8_lossy(&check.stderr);
        assert!(
            check.status.success() && !said.contains("WARNING"),
            "{said}"
        );
        vec![
            bin.into(),
            "-db".into(),
            "-f".into(),
            cfg.display().to_string(),
        ]
    });
}

#[test]
fn the_readmes_nginx_stream_front_tier_runs_as_printed_and_survives_losing_a_host() {
    let Some(bin) = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        return skip(
            "nginx front tier",
            "nginx is not installed (apt-get install nginx)",
        );
    };
    if std::fs::read_dir("/etc/nginx/modules-enabled").map_or(true, |d| {
        !d.flatten()
            .any(|e| e.file_name().to_string_lossy().contains("stream"))
    }) {
        return skip(
            "nginx front tier",
            "no stream module (apt-get install libnginx-mod-stream)",
        );
    }
    // Debian's nginx.conf around the README's block: its module include, and a scratch pid
    // and log for a process that is not the system's nginx.
    let block = format!(
        "daemon off;\nmaster_process off;\npid @DIR@/nginx.pid;\nerror_log @DIR@/error.log;\n\
         include /etc/nginx/modules-enabled/*.conf;\nevents {{ worker_connections 1024; }}\n{}",
        readme_block("nginx")
    );
    two_hosts_behind("nginx", &block, |cfg| {
        let check = std::process::Command::new(bin)
            .args(["-t", "-q", "-c"])
            .arg(cfg)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&check.stderr);
        assert!(check.status.success() && !said.contains("[warn]"), "{said}");
        vec![bin.into(), "-c".into(), cfg.display().to_string()]
    });
}

#[test]
fn the_shipped_systemd_units_pass_systemd_analyze_verify() {
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        return skip(
            "systemd units",
            "no systemd-analyze (apt-get install systemd)",
        );
    };
    assert!(out.status.success());
    // A scratch root with what the units name: systemd's own units, /bin/kill, and lb where
    // ExecStart says (verify checks that the commands exist and are executable).
    let root = std::env::temp_dir().join(format!("lb-units-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for d in [
        "usr/local/bin",
        "usr/bin",
        "etc/systemd/system",
        "usr/lib/systemd",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    let copy = |from: &str, to: &str| {
        let st = std::process::Command::new("cp")
            .arg("-r")
            .arg(from)
            .arg(root.join(to))
            .status()
            .unwrap();
        assert!(st.success(), "cp {from}");
    };
    copy("/usr/lib/systemd/system", "usr/lib/systemd/");
    copy("/usr/bin/kill", "usr/bin/kill");
    copy(LB, "usr/local/bin/lb");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    copy(&format!("{config}/lb.service"), "etc/systemd/system/");
    copy(&format!("{config}/lb.socket"), "etc/systemd/system/");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args([
            "/etc/systemd/system/lb.service",
            "/etc/systemd/system/lb.socket",
        ])
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // Not only the exit status: an unknown `Type=` is a warning ("…, ignoring") with status 0.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_readmes_server_js_runs_as_printed_under_lb() {
    let dir = std::env::temp_dir().join(format!("lb-readme-server-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("server.js");
    std::fs::write(
        &script,
        readme_block_after("`server.js` is unchanged", "js"),
    )
    .unwrap();
    let lb = start_node(&["-w", "2"], script.to_str().unwrap(), &[]);
    let pids = lb.wait_all_ready(2);
    let (status, body) = http_get(lb.target(), "/", Some(client_ip(1)));
    assert_eq!(status, 200);
    let pid: u32 = body.trim().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(pids.contains(&pid), "{body}");
    // Its WebSocket echo and its stats reach lb.
    let mut ws = websocket(lb.target(), Some(client_ip(2)), "/");
    ws.send(tungstenite::Message::text("ping")).unwrap();
    assert_eq!(ws.read().unwrap().into_text().unwrap().as_str(), "ping");
    wait_for(
        "the snippet's stats in lb's metrics",
        Duration::from_secs(10),
        || {
            let served: f64 = (0..2)
                .filter_map(|s| lb.metric(&format!("lb_worker_requests_total{{worker=\"{s}\"}}")))
                .sum();
            (served >= 1.0).then_some(())
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_small_things_a_new_user_hit() {
    let lb_out = |args: &[&str]| {
        let out = std::process::Command::new(LB)
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        texts(&out)
    };
    // `--heartbeat-ping 0s` would ping without pause: a one-line error.
    let (code, _, err) = lb_out(&["check", "--heartbeat-ping", "0s"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("heartbeat-ping") && err.lines().count() == 1,
        "{err}"
    );

    // `--policy <TAB>` offers the policies (bash, zsh, fish), not file names; and every word
    // offered for an option is one lb accepts.
    let (_, bash, _) = lb_out(&["completions", "bash"]);
    assert!(
        bash.contains("compgen -W \"sticky round-robin least-connections\""),
        "bash completion of --policy"
    );
    for shell in ["zsh", "fish"] {
        let (_, script, _) = lb_out(&["completions", shell]);
        assert!(
            script.contains("round-robin"),
            "{shell} completion of --policy"
        );
    }
    for (name, words) in lb::config::WORD_CHOICES {
        let flag = format!("--{}", name.replace('_', "-"));
        for word in *words {
            let (code, _, err) = lb_out(&["check", &flag, word]);
            assert_eq!(code, Some(0), "lb check {flag} {word}: {err}");
        }
    }

    // The non-root fallback control path is documented, in --help and the README.
    let (_, help, _) = lb_out(&["--help"]);
    assert!(help.contains("/tmp/lb-<uid>/"), "{help}");
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(readme.contains("/tmp/lb-<uid>"));

    // config/lb.toml names every option, its values are the defaults, and lb accepts it with
    // every commented-out line put in.
    let sample =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/lb.toml")).unwrap();
    let (_, help, _) = lb_out(&["--help"]);
    // The option lines of --help: `  -l, --listen <ADDR>  …` or `      --policy <P>  …`.
    let flags = help
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("--")));
    for flag in flags {
        let key = flag
            .trim_start_matches("--")
            .trim_end_matches(',')
            .replace('-', "_");
        if ["help", "version", "config"].contains(&key.as_str()) {
            continue;
        }
        assert!(
            sample.contains(&format!("\n{key} = ")) || sample.contains(&format!("\n# {key} = ")),
            "config/lb.toml lacks {key}"
        );
    }
    let seed = sample
        .lines()
        .find_map(|l| l.strip_prefix("# hash_seed = "))
        .expect("hash_seed shown");
    for i in 0..50 {
        let ip = client_ip(500 + i);
        assert_eq!(
            lb_route(ip, 4, &["--hash-seed", seed]),
            lb_route(ip, 4, &[]),
            "the hash_seed shown is lb's default"
        );
    }
    let dir = std::env::temp_dir().join(format!("lb-sample-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let all: String = sample
        .lines()
        .map(|l| {
            // `# key = value` lines (not prose that happens to hold " = ").
            let kv = l.strip_prefix("# ").filter(|kv| {
                kv.split_once(" = ").is_some_and(|(k, _)| {
                    k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        && k != "command"
                        && k != "user"
                })
            });
            kv.unwrap_or(l).to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n");
    let cfg = dir.join("lb.toml");
    std::fs::write(&cfg, all).unwrap();
    let (code, out, err) = lb_out(&["check", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    let _ = std::fs::remove_dir_all(&dir);

    // The man pages the README installs, with every page lb(1) points to.
    let man = std::env::temp_dir().join(format!("lb-man-{}/share/man/man1", std::process::id()));
    let (code, _, err) = lb_out(&["manpage", "--dir", man.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let page = std::fs::read_to_string(man.join("lb.1")).unwrap();
    let refs: Vec<&str> = page
        .split("lb\\-")
        .skip(1)
        .filter_map(|s| s.split_once("(1)").map(|(name, _)| name))
        .filter(|n| n.chars().all(|c| c.is_ascii_lowercase()))
        .collect();
    assert!(refs.len() >= 8, "{refs:?}");
    for r in refs {
        assert!(
            man.join(format!("lb-{r}.1")).exists(),
            "lb(1) points to lb-{r}(1)"
        );
    }
    let _ = std::fs::remove_dir_all(man.parent().unwrap().parent().unwrap().parent().unwrap());
}
