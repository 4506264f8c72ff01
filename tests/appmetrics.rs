//! The app's own metrics through lb (DESIGN §14): prom-client's cluster example, unmodified,
//! aggregated on lb's `/metrics` exactly as prom-client's `AggregatorRegistry.aggregate` does,
//! checked by promtool and scraped by a real Prometheus; counters that never go back across a
//! kill, a roll and an in-place upgrade; a stopped worker that does not hold a scrape up; bad
//! answers dropped and counted.
//!
//! Needs `node`, the npm packages of `examples/node` (prom-client among them) and Debian's
//! `prometheus` package; the README test command installs them.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Every sample of the families `names` in a Prometheus text: series with labels → value.
fn samples(text: &str, names: &[&str]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = l.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or_default();
        let of = |n: &&str| {
            name == *n
                || name
                    .strip_prefix(n)
                    .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))
        };
        if names.iter().any(of)
            && let Ok(v) = value.parse()
        {
            out.insert(series.to_owned(), v);
        }
    }
    out
}

/// `promtool check metrics` on `text`: its complaints (exit 0: none).
fn promtool(text: &str) -> (i32, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`; the README test command installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// promtool parses the body; its only complaints are about prom-client's own default gauges
/// whose names end in `_total` (a naming lint on the app's names, not a format error).
fn promtool_accepts(text: &str) {
    let (code, out) = promtool(text);
    let app_lint = |l: &str| {
        [
            "nodejs_active_handles_total",
            "nodejs_active_requests_total",
            "nodejs_active_resources_total",
        ]
        .iter()
        .any(|n| l.starts_with(n))
            && l.contains("non-counter metrics should not have \"_total\" suffix")
    };
    assert!(
        code == 0 || (code == 3 && out.lines().all(app_lint)),
        "promtool exit {code}: {out}"
    );
}

fn the_example() -> String {
    example("prom-cluster.js")
}

/// `n` requests from `ips` addresses, each answered 200.
fn requests(lb: &Lb, n: usize, ips: usize) {
    for i in 0..n {
        let (status, _) = http_get(lb.addr, "/", Some(client_ip(i % ips)));
        assert_eq!(status, 200);
    }
}

fn app_requests(lb: &Lb) -> Option<f64> {
    lb.metric("app_requests_total{route=\"/\"}")
}

#[test]
fn prom_clients_cluster_example_is_aggregated_on_lbs_metrics_as_prom_client_does() {
    let lb = start_node(&["-w", "3"], &fixture("prom-cluster-local.js"), &[]);
    lb.wait_all_ready(3);
    requests(&lb, 300, 60);
    // Each worker's own registry, as its getMetricsAsJSON() gives it.
    let locals: Vec<serde_json::Value> = (0..3)
        .map(|slot| {
            let ip = ips_of(slot, 3, 1)[0];
            let (status, body) = http_get(lb.addr, "/local-metrics", Some(ip));
            assert_eq!(status, 200, "{body}");
            serde_json::from_str(&body).unwrap()
        })
        .collect();
    let text = lb.metrics_text();
    // prom-client's own aggregation of the same three answers.
    let mut node = Command::new("node")
        .arg(fixture("prom-aggregate.js"))
        .env("NODE_PATH", node_modules())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    node.stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&locals).unwrap().as_bytes())
        .unwrap();
    let out = node.wait_with_output().unwrap();
    assert!(out.status.success());
    let reference = String::from_utf8(out.stdout).unwrap();
    let app = [
        "app_requests_total",
        "app_request_duration_seconds",
        "app_in_flight_max",
    ];
    let ours = samples(&text, &app);
    assert_eq!(
        ours,
        samples(&reference, &app),
        "lb's vs prom-client's aggregation"
    );
    assert_eq!(ours["app_requests_total{route=\"/\"}"], 300.0);
    assert_eq!(ours["app_request_duration_seconds_count"], 300.0);
    assert_eq!(
        ours["app_request_duration_seconds_bucket{le=\"+Inf\"}"],
        300.0
    );
    assert_eq!(ours["app_in_flight_max"], 3.0, "aggregator max");
    let version: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("nodejs_version_info{"))
        .collect();
    assert_eq!(version.len(), 1, "{version:?}");
    // HELP and TYPE once per family, after lb's own.
    assert_eq!(
        text.matches("# TYPE app_requests_total counter\n").count(),
        1
    );
    assert!(text.find("lb_build_info").unwrap() < text.find("app_requests_total").unwrap());
    promtool_accepts(&text);
    // A real Prometheus scrapes it.
    let prom = Prometheus::start(&[lb.metrics.unwrap()], None);
    let sum = wait_for(
        "Prometheus to scrape the app's counter",
        Duration::from_secs(30),
        || {
            let r = prom.query("sum(app_requests_total)")?;
            r.first()?["value"][1].as_str()?.parse::<f64>().ok()
        },
    );
    assert_eq!(sum, 300.0);
}

/// Scrapes `/metrics` every 100 ms until stopped, checking that the app's counter never goes
/// back; returns the values seen.
struct Scraper {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<f64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scraper {
    fn start(metrics: std::net::SocketAddr) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok(mut c) = std::net::TcpStream::connect(metrics) {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let (status, body) = request(&mut c, "GET", "/metrics", b"", true);
                    if status == 200
                        && let Some(n) = metric_value(
                            &String::from_utf8_lossy(&body),
                            "app_requests_total{route=\"/\"}",
                        )
                    {
                        v.lock().unwrap().push(n);
                    }
                }
                std::thread::sleep(Duration::from_millis(100)); // the scrape interval
            }
        });
        Scraper {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.seen.lock().unwrap().clone()
    }
}

#[test]
fn the_apps_counters_never_go_back_across_a_kill_a_roll_and_an_in_place_upgrade() {
    let lb = start_node(&["-w", "3"], &the_example(), &[]);
    let pids = lb.wait_all_ready(3);
    let scraper = Scraper::start(lb.metrics.unwrap());
    let wait_count = |n: f64| {
        wait_for(
            &format!("app_requests_total = {n}"),
            Duration::from_secs(10),
            || (app_requests(&lb) == Some(n)).then_some(()),
        )
    };
    requests(&lb, 300, 60);
    wait_count(300.0);
    kill(pids[1], Signal::SIGKILL);
    wait_for("slot 1 respawned", Duration::from_secs(20), || {
        let w = lb.workers();
        let r = &w["workers"][1];
        (r["state"] == "ready" && r["pid"].as_u64() != Some(u64::from(pids[1]))).then_some(())
    });
    requests(&lb, 100, 60);
    wait_count(400.0);
    let rolled = Command::new(LB)
        .args(["roll", "--control"])
        .arg(lb.control.as_ref().unwrap())
        .output()
        .unwrap();
    assert!(
        rolled.status.success(),
        "{}",
        String::from_utf8_lossy(&rolled.stderr)
    );
    requests(&lb, 100, 60);
    wait_count(500.0);
    let reloads = |lb: &Lb| lb.metric("lb_reloads_total{result=\"ok\"}").unwrap_or(0.0);
    let before = reloads(&lb);
    lb.signal(Signal::SIGHUP);
    wait_for("the in-place upgrade", Duration::from_secs(20), || {
        (reloads(&lb) > before).then_some(())
    });
    wait_count(500.0);
    // A worker that dies right after the upgrade still leaves its counts.
    let pid = lb.workers()["workers"][2]["pid"].as_u64().unwrap() as u32;
    kill(pid, Signal::SIGKILL);
    requests(&lb, 100, 60);
    wait_count(600.0);
    // The scraper runs on its own clock: let it see the final value too before stopping it.
    wait_for("the scraper saw 600", Duration::from_secs(10), || {
        (scraper.seen.lock().unwrap().last() == Some(&600.0)).then_some(())
    });
    let seen = scraper.stop();
    assert!(seen.len() >= 5, "{} scrapes", seen.len());
    assert_eq!(seen.last(), Some(&600.0));
    for w in seen.windows(2) {
        assert!(
            w[1] >= w[0],
            "the counter went back: {} then {}",
            w[0],
            w[1]
        );
    }
}

#[test]
fn a_stopped_worker_does_not_hold_a_scrape_up_and_is_counted() {
    let lb = start_node(
        &["-w", "3", "--app-metrics-timeout", "300ms"],
        &the_example(),
        &[],
    );
    let pids = lb.wait_all_ready(3);
    requests(&lb, 60, 60);
    wait_for("every request counted", Duration::from_secs(10), || {
        (app_requests(&lb) == Some(60.0)).then_some(())
    });
    kill(pids[0], Signal::SIGSTOP);
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let text = lb.metrics_text();
        slowest = slowest.max(t.elapsed());
        // The others' metrics are there, and the stopped one's counts are not lost.
        assert_eq!(
            metric_value(&text, "app_requests_total{route=\"/\"}"),
            Some(60.0)
        );
        assert!(text.contains("nodejs_version_info{"));
    }
    kill(pids[0], Signal::SIGCONT);
    eprintln!("slowest scrape with a stopped worker: {slowest:?}");
    assert!(slowest < Duration::from_millis(400), "{slowest:?}");
    assert!(
        lb.metric("lb_app_metrics_timeouts_total{worker=\"0\"}")
            .unwrap()
            >= 5.0
    );
    assert_eq!(
        lb.metric("lb_app_metrics_timeouts_total{worker=\"1\"}"),
        Some(0.0)
    );
}

#[test]
fn workers_without_prom_client_cost_a_scrape_nothing_after_their_first_miss() {
    // sticky-session workers (examples/node/server.js) do not answer: the first scrape waits
    // for them once, later ones not at all.
    let lb = start_node(&["-w", "2"], &example("server.js"), &[]);
    lb.wait_all_ready(2);
    let t = Instant::now();
    lb.metrics_text();
    let first = t.elapsed();
    let mut later = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let text = lb.metrics_text();
        later = later.max(t.elapsed());
        assert!(!text.contains("# TYPE app_"), "no app families");
    }
    eprintln!("first scrape {first:?}, slowest later one {later:?}");
    assert!(
        first >= Duration::from_millis(450),
        "the first waits for the first answer: {first:?}"
    );
    assert!(
        later < Duration::from_millis(250),
        "later scrapes do not wait: {later:?}"
    );
    let off = start_node(
        &["-w", "2", "--app-metrics", "off"],
        &example("server.js"),
        &[],
    );
    off.wait_all_ready(2);
    let t = Instant::now();
    off.metrics_text();
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "off: nothing is asked"
    );
    assert!(
        !lb.log_text().contains("out of /metrics"),
        "{}",
        lb.log_text()
    );
}

#[test]
fn bad_answers_are_dropped_and_counted_and_the_exposition_stays_valid() {
    let modes = "good,error,malformed,conflict,lb-name,huge";
    // The huge worker builds a 10 MiB answer: on a loaded machine that takes longer than the
    // default timeout, and this test is about what lb does with the answer once it comes.
    let lb = start_node(
        &["-w", "6", "--app-metrics-timeout", "20s"],
        &fixture("bad-prom.js"),
        &[("BAD", modes)],
    );
    lb.wait_all_ready(6);
    let dropped = |lb: &Lb, r: &str| {
        lb.metric(&format!("lb_app_metrics_dropped_total{{reason=\"{r}\"}}"))
            .unwrap_or(0.0)
    };
    let text = lb.metrics_text();
    for reason in [
        "error",
        "malformed",
        "type_conflict",
        "name_clash",
        "too_large",
    ] {
        assert!(dropped(&lb, reason) >= 1.0, "{reason} not counted");
    }
    // Good families of the good (and the clashing) workers are there; the conflicting family and
    // the lb_ name are not.
    assert_eq!(
        metric_value(&text, "good_total"),
        Some(3.0),
        "slots 0, 3, 4"
    );
    assert!(!text.contains("shared_kind"), "type conflict dropped");
    assert_eq!(
        text.matches("# TYPE lb_worker_up ").count(),
        1,
        "no second lb_worker_up"
    );
    assert!(!text.contains("\nhuge"), "the 10 MiB answer is not there");
    let (code, out) = promtool(&text);
    assert_eq!(code, 0, "promtool: {out}");
    assert!(
        lb.log_text().contains("out of /metrics"),
        "one line said so"
    );
}
