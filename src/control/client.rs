//! The client's side of the control socket: finding the running lb (one control socket per
//! instance, named by its listen address), sending a [`Request`], waiting for a stop or a scale to
//! have happened, and printing the answers (`lb status`, `lb ls`, `lb route --live`).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{AUTO, ControlError, Request};

/// The directory of the per-instance control sockets: `$XDG_RUNTIME_DIR/lb`, else `/run/lb`
/// for root, else `/tmp/lb-<uid>`.
pub fn instance_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("lb");
    }
    let uid = nix::unistd::getuid().as_raw();
    if uid == 0 {
        PathBuf::from("/run/lb")
    } else {
        PathBuf::from(format!("/tmp/lb-{uid}"))
    }
}

/// The control socket of the lb listening on `listen` (its bound address, so port 0 names
/// the port the kernel chose): `<instance_dir>/<listen>.sock`, e.g. `/run/lb/127.0.0.1:8000.sock`
/// or `/run/lb/[::]:8000.sock`. A path that would not fit `sun_path` (108 bytes, a long
/// `XDG_RUNTIME_DIR`) uses a short hash of the address instead.
pub fn instance_path(listen: std::net::SocketAddr) -> PathBuf {
    instance_path_in(&instance_dir(), listen)
}

fn instance_path_in(dir: &Path, listen: std::net::SocketAddr) -> PathBuf {
    let p = dir.join(format!("{listen}.sock"));
    if p.as_os_str().len() < 108 {
        return p;
    }
    let h = listen
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    dir.join(format!("{h:016x}.sock"))
}

/// One running lb found in [`instance_dir`].
#[derive(Debug, Clone)]
pub struct Instance {
    /// Its control socket.
    pub path: PathBuf,
    /// Its `/workers` document (with `listen`, `pid`, `version`, `started_seconds_ago`).
    pub status: Value,
}

/// The lbs that answer on a control socket in [`instance_dir`] (dead ones' stale files are
/// skipped), ordered by listen address.
pub fn instances() -> Vec<Instance> {
    let Ok(dir) = std::fs::read_dir(instance_dir()) else {
        return Vec::new();
    };
    let mut found: Vec<Instance> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .filter_map(|path| {
            let v = send(&path, &Request::Status, Duration::from_secs(2)).ok()?;
            Some(Instance {
                path,
                status: v["status"].clone(),
            })
        })
        .collect();
    found.sort_by_key(|i| i.status["listen"].as_str().unwrap_or_default().to_owned());
    found
}

/// The control socket a client command talks to: `--control PATH` if given; else the lb
/// listening on `--listen ADDR`; else the only running lb. Several running and none chosen:
/// an error naming them.
pub fn find(control: Option<PathBuf>, listen: Option<&str>) -> Result<PathBuf, ControlError> {
    if let Some(p) = control.filter(|p| p.as_os_str() != AUTO) {
        return Ok(p);
    }
    let running = instances();
    if let Some(want) = listen {
        let addr = crate::config::parse_addr(want)
            .map_err(|e| ControlError::Failed(format!("--listen {want}: {e}")))?;
        return running
            .iter()
            .find(|i| {
                i.status["listen"]
                    .as_str()
                    .and_then(|l| l.parse::<std::net::SocketAddr>().ok())
                    .is_some_and(|l| {
                        l == addr || (l.port() == addr.port() && l.ip().is_unspecified())
                    })
            })
            .map(|i| i.path.clone())
            .ok_or_else(|| {
                ControlError::Failed(format!(
                    "no lb is listening on {want} (running: {})",
                    list(&running)
                ))
            });
    }
    match running.as_slice() {
        [one] => Ok(one.path.clone()),
        [] => Err(ControlError::Failed(format!(
            "no lb is running (no control socket answers in {})",
            instance_dir().display()
        ))),
        many => Err(ControlError::Failed(format!(
            "{} lbs are running: say which with --listen ADDR ({})",
            many.len(),
            list(many)
        ))),
    }
}

fn list(running: &[Instance]) -> String {
    if running.is_empty() {
        return "none".into();
    }
    running
        .iter()
        .map(|i| {
            format!(
                "{} pid {}",
                i.status["listen"].as_str().unwrap_or("?"),
                i.status["pid"]
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `lb ls`: one line per running lb.
pub fn instances_table(running: &[Instance]) -> String {
    let mut out = format!(
        "{:<24} {:>8} {:>8} {:>9}  {:<12} {}\n",
        "listen", "pid", "workers", "uptime", "version", "control"
    );
    for i in running {
        let s = &i.status;
        let workers = s["workers"].as_array().map_or(0, Vec::len);
        let ready = s["workers"]
            .as_array()
            .map_or(0, |w| w.iter().filter(|r| r["state"] == "ready").count());
        out += &format!(
            "{:<24} {:>8} {:>8} {:>9}  {:<12} {}\n",
            s["listen"].as_str().unwrap_or("?"),
            s["pid"],
            format!("{ready}/{workers}"),
            humane_secs(s["uptime_seconds"].as_f64().unwrap_or(0.0)),
            s["version"].as_str().unwrap_or("?"),
            i.path.display()
        );
    }
    out
}

/// What `lb route --live` prints for the master's answer.
pub fn describe_route(v: &Value) -> String {
    let home = v["home"].as_u64().unwrap_or(0);
    let slot = &v["slots"][home as usize];
    let mut out = format!("home {home}: ");
    if slot["eligible"].as_bool() == Some(true) {
        out += &format!("{} active", slot["load"]);
        if let Some(bound) = v["bound"].as_u64() {
            let full = v["home_full"].as_bool() == Some(true);
            out += &format!(
                ", {} (bound {bound} = ⌈{} × ({} + 1) / {}⌉)",
                if full { "full" } else { "not full" },
                v["balance_factor"],
                v["total"],
                v["live"]
            );
        }
    } else {
        out += "not taking connections";
    }
    out += "\n";
    match v["now"].as_u64() {
        Some(now) => out += &format!("a new connection goes to {now}\n"),
        None => out += "a new connection waits: no slot takes connections\n",
    }
    out
}

/// Waits until the lb with `pid` (whose control socket is `path`) has exited, at most `limit`:
/// its process is gone (or the pid now names another process) and its socket answers no more.
/// Returns whether it did.
pub fn wait_exited(pid: u32, path: &Path, limit: Duration) -> bool {
    // The process's start time while it runs (a zombie has exited; its parent reaps it).
    let started = |pid: u32| -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let mut f = stat.rsplit(')').next()?.split_whitespace();
        if f.next()? == "Z" {
            return None;
        }
        // Field 22 (starttime), counted after `pid (comm) state`.
        f.nth(18).map(str::to_owned)
    };
    let first = started(pid);
    let deadline = std::time::Instant::now() + limit;
    loop {
        let process_gone = first.is_none() || started(pid) != first;
        if process_gone && std::os::unix::net::UnixStream::connect(path).is_err() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the lb at `path` runs exactly `n` slots, each with a ready worker (the end of
/// an `lb scale`), at most `limit`. `Err` says what was not ready by then.
pub fn wait_scaled(path: &Path, n: usize, limit: Duration) -> Result<(), ControlError> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let v = send(path, &Request::Status, Duration::from_secs(5))?;
        let rows = v["status"]["workers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let pending: Vec<String> = rows
            .iter()
            .filter(|r| r["state"] != "ready")
            .map(|r| format!("slot {} {}", r["slot"], r["state"].as_str().unwrap_or("?")))
            .collect();
        if rows.len() == n && pending.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(ControlError::Failed(format!(
                "scaling to {n} workers is not done after {}s: {}",
                limit.as_secs(),
                if pending.is_empty() {
                    format!("{} slots still draining", rows.len().saturating_sub(n))
                } else {
                    pending.join(", ")
                }
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends one request object and returns the answer (`ok: true`).
pub fn send(path: &Path, req: &Request, wait: Duration) -> Result<Value, ControlError> {
    use std::io::{BufRead, Write};
    let not_running = |source| ControlError::NotRunning {
        path: path.to_owned(),
        source,
    };
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            ControlError::Denied(path.to_owned())
        } else {
            not_running(e)
        }
    })?;
    s.set_read_timeout(Some(wait)).map_err(not_running)?;
    let line = serde_json::to_string(req).expect("serializes");
    writeln!(s, "{line}").map_err(not_running)?;
    let mut line = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| {
            ControlError::Failed(format!("no answer from lb on {}: {e}", path.display()))
        })?;
    let v: Value = serde_json::from_str(line.trim()).map_err(|_| {
        ControlError::Failed(format!("unreadable answer from lb on {}", path.display()))
    })?;
    if v["ok"] == true {
        Ok(v)
    } else {
        Err(ControlError::Failed(
            v["error"]
                .as_str()
                .unwrap_or("lb refused the command")
                .to_owned(),
        ))
    }
}

/// `lb status` as a table, like `pm2 ls`.
pub fn status_table(status: &Value, color: bool) -> String {
    let (green, yellow, red, reset) = if color {
        ("\x1b[32m", "\x1b[33m", "\x1b[31m", "\x1b[0m")
    } else {
        ("", "", "", "")
    };
    let mut out = format!(
        "policy {}\n{:>4}  {:>8}  {:<9} {:>9}  {:>11}  {:>6}  {:>9}  {:>8}  {:>9}\n",
        status["policy"].as_str().unwrap_or("?"),
        "slot",
        "pid",
        "state",
        "uptime",
        "connections",
        "active",
        "requests",
        "restarts",
        "memory"
    );
    for w in status["workers"].as_array().into_iter().flatten() {
        let state = w["state"].as_str().unwrap_or("?");
        let c = match state {
            "ready" => green,
            "starting" | "draining" | "backoff" => yellow,
            _ => red,
        };
        out += &format!(
            "{:>4}  {:>8}  {c}{:<9}{reset} {:>9}  {:>11}  {:>6}  {:>9}  {:>8}  {:>9}\n",
            w["slot"].to_string(),
            w["pid"].as_u64().map_or("-".to_string(), |p| p.to_string()),
            state,
            humane_secs(w["uptime_seconds"].as_f64().unwrap_or(0.0)),
            w["connections"].to_string(),
            w["active_connections"].to_string(),
            w["requests"].to_string(),
            w["restarts"].to_string(),
            humane_bytes(w["memory_bytes"].as_u64().unwrap_or(0)),
        );
    }
    out
}

fn humane_secs(s: f64) -> String {
    match s {
        s if s < 60.0 => format!("{s:.0}s"),
        s if s < 3600.0 => format!("{:.0}m", s / 60.0),
        s if s < 86400.0 => format!("{:.1}h", s / 3600.0),
        s => format!("{:.1}d", s / 86400.0),
    }
}

fn humane_bytes(b: u64) -> String {
    match b {
        0 => "-".into(),
        b if b < 1 << 20 => format!("{:.0}KiB", b as f64 / 1024.0),
        b if b < 1 << 30 => format!("{:.1}MiB", b as f64 / 1048576.0),
        b => format!("{:.2}GiB", b as f64 / 1073741824.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn instance_paths_are_named_by_the_address_and_fit_sun_path() {
        let v4: std::net::SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let v6: std::net::SocketAddr = "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
            .parse()
            .unwrap();
        assert_eq!(
            instance_path_in(Path::new("/run/lb"), v4),
            Path::new("/run/lb/127.0.0.1:8000.sock")
        );
        assert_eq!(
            instance_path_in(Path::new("/run/lb"), v6),
            Path::new("/run/lb/[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535.sock")
        );
        // A long runtime directory: a short hash instead, still one per address.
        let long = Path::new("/run/user/1000/a/very/long/runtime/directory/that/goes/on/and/on/x");
        let (a, b) = (instance_path_in(long, v4), instance_path_in(long, v6));
        assert!(
            a.as_os_str().len() < 108 && b.as_os_str().len() < 108,
            "{a:?} {b:?}"
        );
        assert_ne!(a, b);
    }

    #[test]
    fn the_table_has_a_row_per_worker() {
        let s = json!({"policy":"sticky","workers":[
            {"slot":0,"pid":12,"state":"ready","uptime_seconds":75.0,"connections":3,"active_connections":1,"requests":9,"restarts":0,"memory_bytes":10485760},
            {"slot":1,"pid":null,"state":"backoff","uptime_seconds":0.0,"connections":0,"active_connections":0,"requests":0,"restarts":2,"memory_bytes":0}]});
        let t = status_table(&s, false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(
            lines[2].contains("12") && lines[2].contains("ready") && lines[2].contains("10.0MiB")
        );
        assert!(lines[3].contains("backoff") && lines[3].contains(" - "));
        assert!(!t.contains('\x1b'));
        assert!(status_table(&s, true).contains("\x1b[32mready"));
    }
}
