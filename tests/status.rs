//! The status page on the admin endpoint's `/`, in a real headless Chromium (Debian's
//! `chromium`) driven over the DevTools protocol: it loads without console errors, shows one row
//! per worker with the pids `/workers` reports, shows a killed worker's restart without a reload
//! of the page, fits a phone's width, and costs the master nothing when nobody looks.

mod common;

use common::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A headless Chromium with a DevTools port (chosen by Chromium, read from its profile
/// directory); stopped by pid and its profile removed when dropped.
struct Chromium {
    child: Child,
    profile: std::path::PathBuf,
    port: u16,
}

impl Chromium {
    fn start() -> Option<Chromium> {
        let bin = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let profile = std::env::temp_dir().join(format!("lb-chromium-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let child = Command::new(bin)
            .args([
                "--headless=new",
                // Tests run as root here; Chromium refuses its sandbox as root.
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1100,700",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let mut chromium = Chromium {
            child,
            profile,
            port: 0,
        };
        let file = chromium.profile.join("DevToolsActivePort");
        chromium.port = wait_for("chromium's DevTools port", Duration::from_secs(30), || {
            std::fs::read_to_string(&file)
                .ok()?
                .lines()
                .next()?
                .trim()
                .parse()
                .ok()
        });
        Some(chromium)
    }

    /// The DevTools WebSocket of the first page (the `about:blank` it opened with).
    fn page(&self) -> Cdp {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let url = wait_for("chromium's page target", Duration::from_secs(10), || {
            // DevTools answers only a Host that is an IP or localhost (DNS-rebinding guard).
            let mut s = TcpStream::connect(addr).ok()?;
            let head =
                format!("GET /json/list HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
            std::io::Write::write_all(&mut s, head.as_bytes()).ok()?;
            let (status, body) = read_response(&mut s);
            if status != 200 {
                return None;
            }
            let list: Value = serde_json::from_slice(&body).ok()?;
            list.as_array()?
                .iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                .map(str::to_owned)
        });
        let (ws, _) = tungstenite::connect(url.as_str()).expect("connect to DevTools");
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        Cdp {
            ws,
            next: 0,
            events: Vec::new(),
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// One DevTools session: commands answered by id, events kept for the test to read.
struct Cdp {
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next: u64,
    events: Vec<Value>,
}

impl Cdp {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(tungstenite::Message::text(msg.to_string()))
            .expect("send to DevTools");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                Instant::now() < deadline,
                "DevTools did not answer {method}"
            );
            let m = self.ws.read().expect("read from DevTools");
            let Ok(text) = m.to_text() else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if v["id"] == id {
                assert!(v["error"].is_null(), "{method} failed: {v}");
                return v["result"].clone();
            }
            if v["method"].is_string() {
                self.events.push(v);
            }
        }
    }

    /// Evaluates `expr` in the page and returns its value (JSON-serializable results only).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        assert!(r["exceptionDetails"].is_null(), "{expr} threw: {r}");
        r["result"]["value"].clone()
    }

    /// Console errors, uncaught exceptions and failed loads the page has logged so far.
    fn errors(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| match e["method"].as_str() {
                Some("Runtime.consoleAPICalled") => e["params"]["type"] == "error",
                Some("Runtime.exceptionThrown") => true,
                Some("Log.entryAdded") => e["params"]["entry"]["level"] == "error",
                _ => false,
            })
            .map(|e| e.to_string())
            .collect()
    }
}

/// The rows of the page's worker table, as the cells' text.
fn rows(cdp: &mut Cdp) -> Vec<Vec<String>> {
    let v = cdp.eval(
        "[...document.querySelectorAll('#rows tr')].map(tr => [...tr.children].map(c => c.textContent))",
    );
    serde_json::from_value(v).unwrap_or_default()
}

/// Standard base64 (what `Page.captureScreenshot` answers).
fn base64(text: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(val).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &d)| n | (u32::from(d) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

#[test]
fn the_status_page_shows_the_workers_and_a_restart_live_in_a_real_browser() {
    let Some(chromium) = Chromium::start() else {
        skip(
            "the_status_page_shows_the_workers_and_a_restart_live_in_a_real_browser",
            "no chromium (scripts/test.sh installs Debian's chromium)",
        );
        return;
    };
    let lb = Lb::start(&["-w", "3"]);
    let pids = lb.wait_all_ready(3);
    // Some traffic, so the counters on the page are not all zero.
    for i in 0..30 {
        let (status, _) = http_get(lb.target(), "/", Some(client_ip(i)));
        assert_eq!(status, 200);
    }
    let admin = lb.metrics.expect("admin endpoint");

    let mut cdp = chromium.page();
    for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
        cdp.call(domain, json!({}));
    }
    cdp.call("Page.navigate", json!({"url": format!("http://{admin}/")}));
    let shown = wait_for("the page's worker rows", Duration::from_secs(10), || {
        let r = rows(&mut cdp);
        (r.len() == 3).then_some(r)
    });
    assert_eq!(cdp.eval("document.title"), "lb status");
    let mut page_pids: Vec<u32> = shown.iter().map(|r| r[2].parse().unwrap()).collect();
    let mut want = pids.clone();
    page_pids.sort_unstable();
    want.sort_unstable();
    assert_eq!(
        page_pids, want,
        "the page's pids are /workers' pids: {shown:?}"
    );
    for r in &shown {
        assert_eq!(
            r[1], "ready",
            "state is written as text, not only a colour: {r:?}"
        );
    }
    let version = cdp.eval("document.getElementById('version').textContent");
    assert_eq!(
        version,
        format!("lb {}", lb.workers()["version"].as_str().unwrap())
    );

    // A worker killed under the page: its slot shows a new pid, and the event list says so,
    // within 3 s and without a reload.
    let (slot, victim) = (
        shown[1][0].parse::<usize>().unwrap(),
        shown[1][2].parse::<u32>().unwrap(),
    );
    let navigations_before = cdp
        .events
        .iter()
        .filter(|e| e["method"] == "Page.frameNavigated")
        .count();
    // Traffic while it happens (bounded: 5,000 requests or 8 s), so the rates have something
    // to show; requests from the killed worker's clients may fail, the others' must not.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, target) = (stop.clone(), lb.target());
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut served = 0usize;
            for _ in 0..5_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed)
                    || start.elapsed() > Duration::from_secs(8)
                {
                    break;
                }
                let Ok(mut s) = TcpStream::connect(target) else {
                    continue;
                };
                let head = "GET / HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n";
                if std::io::Write::write_all(&mut s, head.as_bytes()).is_ok() {
                    let mut buf = Vec::new();
                    if std::io::Read::read_to_end(&mut s, &mut buf).is_ok()
                        && buf.starts_with(b"HTTP/1.1 200")
                    {
                        served += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            served
        })
    };
    wait_for("requests/s on the page", Duration::from_secs(5), || {
        let rps = cdp.eval("document.getElementById('rps').textContent");
        rps.as_str()?.parse::<f64>().ok().filter(|r| *r > 0.0)
    });
    kill(victim, Signal::SIGKILL);
    let killed = Instant::now();
    let new_pid = wait_for("the restart on the page", Duration::from_secs(3), || {
        let r = rows(&mut cdp);
        let row = r.iter().find(|r| r[0] == slot.to_string())?;
        let pid: u32 = row[2].parse().ok()?;
        (pid != victim && row[1] == "ready").then_some(pid)
    });
    assert!(killed.elapsed() <= Duration::from_secs(3));
    assert!(alive(new_pid), "the page shows a live pid");
    let events = cdp.eval("document.getElementById('events').textContent");
    assert!(
        events
            .as_str()
            .unwrap()
            .contains(&format!("slot {slot}: new worker pid {new_pid}")),
        "the restart is listed in recent events: {events}"
    );
    let navigations_after = cdp
        .events
        .iter()
        .filter(|e| e["method"] == "Page.frameNavigated")
        .count();
    assert_eq!(
        navigations_before, navigations_after,
        "the page was not reloaded"
    );

    // The rates fill in after the second poll; nothing on the page says NaN or undefined.
    let text = cdp.eval("document.body.innerText");
    let text = text.as_str().unwrap();
    assert!(
        !text.contains("NaN") && !text.contains("undefined"),
        "{text}"
    );

    let shot = cdp.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64(shot["data"].as_str().unwrap());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG screenshot");
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&out, &png).unwrap();
    eprintln!("screenshot: {}", out.display());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(traffic.join().unwrap() > 0, "traffic was served");

    // A phone's width: the page itself does not scroll sideways (the table may, in its box).
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}),
    );
    let fits = wait_for(
        "the page to lay out at 390 px",
        Duration::from_secs(5),
        || {
            let w = cdp.eval("[document.documentElement.scrollWidth, window.innerWidth]");
            let (scroll, inner) = (w[0].as_u64()?, w[1].as_u64()?);
            (inner == 390).then_some(scroll <= inner)
        },
    );
    assert!(fits, "the page fits a 390 px phone screen");

    // A real table for screen readers: header cells with scopes, one row header per slot.
    let headers = cdp.eval("document.querySelectorAll('thead th[scope=col]').length");
    assert_eq!(headers, 10);
    let row_headers = cdp.eval("document.querySelectorAll('#rows th[scope=row]').length");
    assert_eq!(row_headers, 3);

    let errors = cdp.errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
}

#[test]
fn the_status_page_is_one_self_contained_document() {
    let lb = Lb::start(&["-w", "2"]);
    lb.wait_all_ready(2);
    let admin = lb.metrics.expect("admin endpoint");
    let (status, body) = http_get(admin, "/", None);
    assert_eq!(status, 200);
    assert!(body.starts_with("<!doctype html>"), "{}", &body[..40]);
    // No CDN, no external fetch: the page works on a host with no way out.
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "self-contained"
    );
    // It polls only while it is visible, so a forgotten background tab costs lb nothing.
    assert!(
        body.contains("document.hidden"),
        "polling stops when hidden"
    );
    let (status, body) = http_get(admin, "/nope", None);
    assert_eq!(status, 404);
    assert!(body.contains("try /,"), "{body}");
}
