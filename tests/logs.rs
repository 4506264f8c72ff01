//! Worker output (DESIGN §15): `--worker-output inherit|prefix|json` and `lb logs`, with real
//! Node workers writing to their stdout and stderr (tests/fixtures/output.js) and lb's own
//! stdout read byte for byte.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn output_worker(args: &[&str], env: &[(&str, &str)]) -> Lb {
    start_node(args, &fixture("output.js"), env)
}

/// lb's stdout so far, as lines (the last one only if it ended).
fn out_lines(lb: &Lb) -> Vec<String> {
    let text = lb.out_text();
    let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
    lines.pop(); // what follows the last newline
    lines
}

/// The line `output.js` writes as line `i` of slot `slot`.
fn numbered(slot: usize, i: usize) -> String {
    format!("slot={slot} i={i} {}", ".".repeat(i % 97))
}

#[test]
fn prefix_attributes_every_line_of_four_workers_printing_at_once() {
    let lb = output_worker(
        &["-w", "4", "--worker-output", "prefix"],
        &[("LINES", "10000")],
    );
    lb.wait_all_ready(4);
    wait_for("every worker's last line", Duration::from_secs(60), || {
        let out = lb.out_text();
        (0..4)
            .all(|s| out.contains(&format!("[worker {s}] done slot={s}\n")))
            .then_some(())
    });
    let mut next = [0usize; 4];
    for line in out_lines(&lb) {
        let (slot, rest) = line
            .strip_prefix("[worker ")
            .and_then(|l| l.split_once("] "))
            .unwrap_or_else(|| panic!("a line without its prefix: {line:?}"));
        let slot: usize = slot.parse().unwrap();
        if rest == format!("done slot={slot}") {
            continue;
        }
        // Each worker's lines arrive whole, in its order, each under its own slot.
        assert_eq!(rest, numbered(slot, next[slot]), "slot {slot}");
        next[slot] += 1;
    }
    assert_eq!(next, [10_000; 4], "every line of every worker");
    // stderr lines go to lb's stderr, prefixed the same way.
    let log = lb.log_text();
    for s in 0..4 {
        let errs = log
            .lines()
            .filter(|l| l.starts_with(&format!("[worker {s}] err slot={s} i=")))
            .count();
        assert_eq!(errs, 1000, "slot {s}'s stderr lines");
    }
}

#[test]
fn json_lines_carry_slot_pid_stream_and_time() {
    let lb = output_worker(&["-w", "2", "--worker-output", "json"], &[("LINES", "20")]);
    let pids = lb.wait_all_ready(2);
    wait_for("both workers done", Duration::from_secs(20), || {
        (lb.out_text().matches("\"line\":\"done slot=").count() == 2).then_some(())
    });
    let mut seen = HashMap::new();
    for line in out_lines(&lb) {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        let slot = v["slot"].as_u64().unwrap() as usize;
        assert_eq!(v["pid"].as_u64(), Some(u64::from(pids[slot])), "{line}");
        assert_eq!(v["stream"], "stdout");
        let time = v["time"].as_str().unwrap();
        assert!(
            time.len() == 24 && time.starts_with("20") && time.ends_with('Z'),
            "{time}"
        );
        *seen.entry(slot).or_insert(0) += 1;
    }
    assert_eq!(seen, HashMap::from([(0, 21), (1, 21)]));
    let err = lb
        .log_text()
        .lines()
        .find(|l| l.contains("\"stream\":\"stderr\""))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .expect("stderr lines on lb's stderr");
    assert!(err["line"].as_str().unwrap().starts_with("err slot="));
}

#[test]
fn a_line_that_never_ends_is_cut_and_lbs_memory_stays_bounded() {
    // 32 MiB with no newline: lb passes it on in 64 KiB pieces instead of holding it.
    let total = 32 << 20;
    let lb = output_worker(
        &["-w", "1", "--worker-output", "prefix"],
        &[("OUTPUT", "long"), ("LONG", &total.to_string())],
    );
    let before = rss_bytes(lb.pid());
    let pieces = total / (64 * 1024);
    wait_for("every piece", Duration::from_secs(60), || {
        (lb.out_text().matches(" [continued]\n").count() >= pieces - 1).then_some(())
    });
    let grown = rss_bytes(lb.pid()).saturating_sub(before);
    eprintln!("lb's RSS grew {} KiB for a 32 MiB line", grown / 1024);
    assert!(grown < 16 << 20, "RSS grew {grown} bytes");
    served_by(lb.addr, None); // the worker is still served
    http_get(lb.addr, "/end", None);
    wait_for("the end of the line", Duration::from_secs(10), || {
        let lines = out_lines(&lb);
        let last = lines.last()?;
        (!last.ends_with(" [continued]")).then_some(())
    });
    let lines = out_lines(&lb);
    let piece = format!("[worker 0] {} [continued]", "a".repeat(64 * 1024));
    let mut text = 0;
    for (i, l) in lines.iter().enumerate() {
        let body = l.strip_prefix("[worker 0] ").expect("prefixed");
        if i + 1 < lines.len() {
            assert_eq!(l, &piece, "piece {i}");
        }
        text += body.trim_end_matches(" [continued]").len();
    }
    assert_eq!(text, total, "every byte, once");
}

#[test]
fn lb_logs_shows_a_workers_last_lines_and_follows_new_ones() {
    let lb = output_worker(
        &["-w", "2", "--worker-output", "prefix"],
        &[("LINES", "50")],
    );
    lb.wait_all_ready(2);
    // Every line read: both workers' stdout and stderr ended with `done`.
    let json_lines = |args: &[&str]| -> Vec<serde_json::Value> {
        ok_stdout(lb.cmd(args))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    wait_for("every line read", Duration::from_secs(20), || {
        let all = json_lines(&["logs", "-n", "1000", "--json"]);
        (all.iter()
            .filter(|v| v["line"].as_str().is_some_and(|l| l.starts_with("done")))
            .count()
            == 4)
            .then_some(())
    });
    // Worker 1's last five lines, in the order lb read its two pipes: the last of its stdout's
    // and the last of its stderr's.
    let last = json_lines(&["logs", "-n", "5", "--worker", "1", "--json"]);
    assert_eq!(last.len(), 5);
    let mut stdout: Vec<String> = (0..50).map(|i| numbered(1, i)).collect();
    stdout.push("done slot=1".into());
    let mut stderr: Vec<String> = (0..50)
        .step_by(10)
        .map(|i| format!("err slot=1 i={i}"))
        .collect();
    stderr.push("done slot=1".into());
    for (stream, written) in [("stdout", &stdout), ("stderr", &stderr)] {
        let shown: Vec<&str> = last
            .iter()
            .filter(|v| v["stream"] == stream)
            .map(|v| v["line"].as_str().unwrap())
            .collect();
        assert!(
            written.ends_with(&shown.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            "{stream}: {shown:?}"
        );
    }
    assert!(last.iter().all(|v| v["slot"] == 1));
    // The same five as text.
    let text = ok_stdout(lb.cmd(&["logs", "-n", "5", "--worker", "1"]));
    let expected: String = last
        .iter()
        .map(|v| format!("[worker 1] {}\n", v["line"].as_str().unwrap()))
        .collect();
    assert_eq!(text, expected);
    // As JSON, with the pid.
    let out = lb.cmd(&["logs", "-n", "1", "--worker", "0", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["slot"], 0);
    assert!(v["pid"].as_u64().unwrap() > 0);

    // Following: lines written after it started.
    let mut follow = Command::new(LB)
        .args(["logs", "-f", "-n", "0", "--worker", "0", "--control"])
        .arg(lb.control.as_ref().unwrap())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            let _ = tx.send(l);
        }
    });
    let from = ips_of(0, 2, 1)[0];
    let mut got = None;
    for i in 0..50 {
        http_get(lb.addr, &format!("/say?hello{i}"), Some(from));
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            got = Some((i, l));
            break;
        }
    }
    let (i, line) = got.expect("the follower printed a new line");
    // It started following before some request; the first line it shows is that request's.
    assert!(line.starts_with("[worker 0] said slot=0 hello"), "{line}");
    let n: usize = line.rsplit("hello").next().unwrap().parse().unwrap();
    assert!(n <= i);
    kill(follow.id(), Signal::SIGTERM);
    let _ = follow.wait();

    // Asked for what it does not have: one line, exit 2.
    let out = lb.cmd(&["logs", "--worker", "9"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "lb: error: no worker 9: lb runs 2 workers (0…1)"
    );
}

#[test]
fn lb_logs_under_inherit_says_how_to_keep_lines() {
    let lb = output_worker(&["-w", "1"], &[("LINES", "1")]);
    lb.wait_all_ready(1);
    let out = lb.cmd(&["logs"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--worker-output prefix or json"), "{err}");
}

/// Each slot's tick numbers in `lines` (`[worker S] tick slot=S n=N`), in order.
fn ticks(lines: &[String]) -> HashMap<usize, Vec<u64>> {
    let mut t: HashMap<usize, Vec<u64>> = HashMap::new();
    for l in lines {
        if let Some(rest) = l.strip_prefix("[worker ")
            && let Some((slot, tick)) = rest.split_once("] tick slot=")
            && let Some((_, n)) = tick.split_once(" n=")
        {
            t.entry(slot.parse().unwrap())
                .or_default()
                .push(n.parse().unwrap());
        }
    }
    t
}

fn assert_contiguous(what: &str, ticks: &HashMap<usize, Vec<u64>>) {
    for (slot, t) in ticks {
        for w in t.windows(2) {
            assert_eq!(
                w[1],
                w[0] + 1,
                "{what}: slot {slot}'s ticks {} then {}",
                w[0],
                w[1]
            );
        }
    }
}

#[test]
fn lines_keep_flowing_across_an_in_place_upgrade() {
    let lb = output_worker(
        &["-w", "2", "--worker-output", "prefix"],
        &[("OUTPUT", "tick")],
    );
    let pids = lb.wait_all_ready(2);
    let mut follow = Command::new(LB)
        .args(["logs", "-f", "-n", "0", "--control"])
        .arg(lb.control.as_ref().unwrap())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let followed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let (followed, stdout) = (followed.clone(), follow.stdout.take().unwrap());
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                followed.lock().unwrap().push(l);
            }
        });
    }
    let count = |lb: &Lb| {
        ticks(&out_lines(lb))
            .values()
            .map(Vec::len)
            .min()
            .unwrap_or(0)
    };
    wait_for("ticks before", Duration::from_secs(10), || {
        (count(&lb) >= 50).then_some(())
    });
    let reloads = |lb: &Lb| lb.metric("lb_reloads_total{result=\"ok\"}").unwrap_or(0.0);
    let before = reloads(&lb);
    let at_upgrade = count(&lb);
    lb.signal(Signal::SIGHUP);
    wait_for("the in-place upgrade", Duration::from_secs(20), || {
        (reloads(&lb) > before).then_some(())
    });
    wait_for("ticks after", Duration::from_secs(10), || {
        (count(&lb) >= at_upgrade + 200).then_some(())
    });
    assert!(
        lb.log_text().contains("re-executed in place"),
        "{}",
        lb.log_text()
    );
    // The same workers, every tick once and in order: nothing lost or doubled in the switch.
    assert_eq!(lb.wait_all_ready(2), pids);
    let all = ticks(&out_lines(&lb));
    assert_eq!(all.len(), 2);
    assert!(all.values().all(|t| t[0] == 0));
    assert_contiguous("lb's stdout", &all);
    // `lb logs` still has lines from before the upgrade; the follower went on after it.
    let out = lb.cmd(&["logs", "-n", "1000", "--worker", "0"]);
    let kept = ticks(
        &String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>(),
    );
    assert!(
        kept[&0].first().copied().unwrap() < at_upgrade as u64,
        "{:?}",
        &kept[&0][..3]
    );
    wait_for(
        "the follower past the upgrade",
        Duration::from_secs(10),
        || {
            let f = ticks(&followed.lock().unwrap());
            (f.values()
                .all(|t| t.last().copied().unwrap_or(0) > at_upgrade as u64 + 100)
                && f.len() == 2)
                .then_some(())
        },
    );
    kill(follow.id(), Signal::SIGTERM);
    let _ = follow.wait();
    assert_contiguous("lb logs -f", &ticks(&followed.lock().unwrap()));
}

#[test]
fn inherit_passes_the_workers_bytes_untouched_and_costs_nothing() {
    // Invalid UTF-8, a carriage return, a NUL and no final newline: exactly as written.
    let bytes: &[u8] = b"\xff\xfeplain\r\n\x00half a line";
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let lb = output_worker(&["-w", "1"], &[("OUTPUT", "raw"), ("RAW_HEX", &hex)]);
    let pids = lb.wait_all_ready(1);
    wait_for("the worker's bytes", Duration::from_secs(10), || {
        (lb.out.lock().unwrap().len() >= bytes.len()).then_some(())
    });
    assert_eq!(lb.out.lock().unwrap().as_slice(), bytes);
    // The worker's stdout and stderr are lb's own: no pipe, no reader, no thread.
    for fd in [1, 2] {
        let link = |pid: u32| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(link(pids[0]), link(lb.pid()), "fd {fd}");
    }
    let threads = std::fs::read_to_string(format!("/proc/{}/status", lb.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:").map(|t| t.trim().to_owned()))
        .unwrap();
    assert_eq!(threads, "1");
}

#[test]
fn the_last_lines_of_workers_that_stop_are_written_before_lb_exits() {
    // They write their 3,000 lines only once told to stop, then exit at once.
    let mut lb = output_worker(
        &["-w", "2", "--worker-output", "prefix"],
        &[("OUTPUT", "onexit"), ("LINES", "3000")],
    );
    lb.wait_all_ready(2);
    lb.signal(Signal::SIGTERM);
    assert_eq!(lb.wait_exit(Duration::from_secs(30)), Some(0));
    // (This test reads lb's stdout on a thread of its own, which may still be reading.)
    wait_for(
        "lb's stdout read to its end",
        Duration::from_secs(10),
        || {
            let out = lb.out_text();
            (out.contains("[worker 0] done slot=0\n") && out.contains("[worker 1] done slot=1\n"))
                .then_some(())
        },
    );
    // Every line each worker wrote before it exited is there, whole and in order.
    let mut next = [0usize; 2];
    for line in out_lines(&lb) {
        let (slot, rest) = line[8..].split_once("] ").unwrap();
        let slot: usize = slot.parse().unwrap();
        if rest.starts_with("done") {
            continue;
        }
        assert_eq!(rest, numbered(slot, next[slot]));
        next[slot] += 1;
    }
    assert_eq!(next, [3000, 3000]);
}
