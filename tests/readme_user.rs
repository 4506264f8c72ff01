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
        assert_eq!(
            std::fs::read_to_string(format!("/proc/{w}/comm"))
                .unwrap()
                .trim(),
            format!("lb: worker {slot}")
        );
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
