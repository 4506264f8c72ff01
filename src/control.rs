//! The control socket: how `lb status`, `lb roll`, `lb scale`, `lb reload` and `lb stop` talk to
//! a running lb.
//!
//! A Unix stream socket (`--control PATH`, default one per instance at [`instance_path`]), mode 0600: file
//! permissions are the access control. Protocol: the client writes one JSON line, a
//! [`Request`] (`{"cmd":"status"|"roll"|"reload"|"stop"}` or `{"cmd":"scale","workers":N}`, the
//! same type serialized by the client and parsed by the server); lb answers with one JSON line,
//! `{"ok":true,…}` or `{"ok":false,"error":"…"}`, and closes. `status` is answered from the admin state (it never
//! waits on the master loop or a worker); `roll` answers when the rolling restart has finished
//! (or stopped); `stop` answers once the graceful shutdown has begun.
//!
//! At start-up a socket file whose lb still answers is an "already running" error; a stale one
//! (nobody listening) is replaced.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Shared;

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Control-socket errors (one line each).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another lb answers on the path.
    #[error(
        "control socket {0}: another lb is running there (stop it, or give this one its own --control PATH or --control off)"
    )]
    AlreadyRunning(PathBuf),
    /// The socket could not be created.
    #[error("control socket {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The socket belongs to another user (mode 0600).
    #[error("control socket {0}: permission denied (it belongs to the user lb runs as)")]
    Denied(PathBuf),
    /// No lb listens on the path.
    #[error(
        "no lb is running with control socket {path} ({source}); start lb, or pass the --control PATH it was started with"
    )]
    NotRunning {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The lb answered with an error, or something unreadable.
    #[error("{0}")]
    Failed(String),
}

pub use crate::config::CONTROL_AUTO as AUTO;

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

/// What a client asks a running lb (one JSON line, tagged by `cmd`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// The slot table (answered from the admin state, never by the master loop).
    Status,
    /// A rolling restart; answered when it has ended.
    Roll,
    /// Re-read the configuration; answered with what changed.
    Reload,
    /// Change the number of worker slots.
    Scale {
        /// The new count (1..=1024).
        workers: usize,
    },
    /// A graceful shutdown; answered once it has begun.
    Stop,
    /// The workers' last output lines, then (`follow`) new ones as they come
    /// ([`crate::output::tail`]; answered from the admin state).
    Logs(crate::output::tail::Request),
    /// Where `sticky` would send a client now: its home, the slots' loads, the bound.
    Route {
        /// The client's address.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip: Option<String>,
        /// A `--hash-key` key's value.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
}

/// The verbs [`Request`] knows, for the error about one it does not.
const VERBS: &str = "status, roll, scale, reload, stop, route, logs";

/// A command for the master loop.
#[derive(Debug)]
pub enum Command {
    /// Roll every worker; the reply comes when the roll has ended.
    Roll(oneshot::Sender<Result<(), String>>),
    /// Begin a graceful shutdown; the reply (at once) is `{pid, timeout_ms}`: which process
    /// to wait for, and for how long at most.
    Stop(oneshot::Sender<Result<Value, String>>),
    /// Reload the configuration; the reply says what changed.
    Reload(oneshot::Sender<Result<Value, String>>),
    /// Change the number of worker slots.
    Scale(usize, oneshot::Sender<Result<(), String>>),
    /// Where a connection with this sticky key would go now.
    Route(u32, oneshot::Sender<Result<Value, String>>),
}

/// Creates the control socket (mode 0600, parent directory 0700 if lb creates it). Call
/// [`UnixListener::from_std`] on it inside the runtime.
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, ControlError> {
    let bind_err = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(bind_err)?;
    }
    if path.exists() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ControlError::AlreadyRunning(path.to_owned())),
            // Stale: its lb is gone.
            Err(_) => std::fs::remove_file(path).map_err(bind_err)?,
        }
    }
    // Created 0600 from the start: no window in which others could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = bound.map_err(bind_err)?;
    l.set_nonblocking(true).map_err(bind_err)?;
    Ok(l)
}

/// Serves the control socket until the process ends.
pub async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (shared, commands) = (shared.clone(), commands.clone());
        tokio::spawn(async move {
            let _ = answer(stream, &shared, &commands).await;
        });
    }
}

async fn answer(
    stream: UnixStream,
    shared: &Shared,
    commands: &mpsc::UnboundedSender<Command>,
) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        BufReader::new(r.take(MAX_REQUEST as u64)).read_line(&mut line),
    )
    .await;
    let reply = match read {
        Ok(Ok(_)) => match parse(line.trim()) {
            // Lines, and with `follow` more of them: not one reply.
            Ok(Request::Logs(req)) => {
                let slots = shared.table.lock().map_or(0, |t| t.len());
                return crate::output::tail::serve(&shared.logs, slots, &req, &mut w).await;
            }
            _ => handle(line.trim(), shared, commands).await,
        },
        _ => json!({"ok": false, "error": "no request line within 5s"}),
    };
    let mut out = serde_json::to_vec(&reply).expect("serializes");
    out.push(b'\n');
    w.write_all(&out).await
}

/// Parses a request line: the [`Request`], or the error line to answer.
fn parse(line: &str) -> Result<Request, String> {
    serde_json::from_str::<Request>(line).map_err(|_| {
        let v = serde_json::from_str::<Value>(line).ok();
        match v
            .as_ref()
            .and_then(|v| v.get("cmd"))
            .and_then(Value::as_str)
        {
            Some("scale") => "scale needs \"workers\": a number from 1 to 1024".to_string(),
            Some(other) => format!("unknown command `{other}` ({VERBS})"),
            None => "expected one JSON line like {\"cmd\":\"status\"}".to_string(),
        }
    })
}

/// The sticky key of an address or a `--hash-key` value (what `lb route` hashes).
pub fn route_key(ip: Option<&str>, key: Option<&str>) -> Result<u32, String> {
    match (ip, key) {
        (_, Some(k)) => Ok(crate::hashkey::text_key(k.as_bytes())),
        (Some(ip), None) => ip
            .parse::<std::net::IpAddr>()
            .map(|a| crate::balance::ip_key(crate::balance::canonical_ip(a)))
            .map_err(|_| format!("invalid IP address `{ip}`")),
        (None, None) => Err("route needs \"ip\" or \"key\"".into()),
    }
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

/// Passes a command to the master loop and waits for its answer.
async fn ask<T>(
    commands: &mpsc::UnboundedSender<Command>,
    cmd: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Command,
) -> Result<T, String> {
    let (tx, rx) = oneshot::channel();
    commands
        .send(cmd(tx))
        .map_err(|_| "lb is shutting down".to_string())?;
    rx.await.map_err(|_| "lb is shutting down".to_string())?
}

async fn handle(
    request: &str,
    shared: &Shared,
    commands: &mpsc::UnboundedSender<Command>,
) -> Value {
    let status =
        || -> Value { serde_json::from_slice(&shared.workers_json()).expect("valid JSON") };
    let answer = match parse(request) {
        Err(e) => Err(e),
        Ok(Request::Status) => Ok(json!({"ok": true, "status": status()})),
        Ok(Request::Roll) => ask(commands, Command::Roll)
            .await
            .map(|()| json!({"ok": true, "status": status()})),
        Ok(Request::Scale { workers }) if !(1..=1024).contains(&workers) => {
            Err("scale needs \"workers\": a number from 1 to 1024".into())
        }
        Ok(Request::Scale { workers }) => ask(commands, |tx| Command::Scale(workers, tx))
            .await
            .map(|()| json!({"ok": true, "workers": workers})),
        Ok(Request::Reload) => ask(commands, Command::Reload)
            .await
            .map(|v| json!({"ok": true, "reload": v})),
        Ok(Request::Stop) => ask(commands, Command::Stop)
            .await
            .map(|v| json!({"ok": true, "stop": v})),
        // `answer` serves it (a stream of lines, not one reply).
        Ok(Request::Logs(_)) => Err("logs: ask on a connection of its own".into()),
        Ok(Request::Route { ip, key }) => match route_key(ip.as_deref(), key.as_deref()) {
            Ok(k) => ask(commands, |tx| Command::Route(k, tx))
                .await
                .map(|v| json!({"ok": true, "route": v})),
            Err(e) => Err(e),
        },
    };
    answer.unwrap_or_else(|e| json!({"ok": false, "error": e}))
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
    fn requests_cross_as_one_tagged_json_line_and_bad_ones_get_one_error_line() {
        for (req, line) in [
            (Request::Status, r#"{"cmd":"status"}"#),
            (Request::Roll, r#"{"cmd":"roll"}"#),
            (Request::Reload, r#"{"cmd":"reload"}"#),
            (Request::Stop, r#"{"cmd":"stop"}"#),
            (
                Request::Scale { workers: 4 },
                r#"{"cmd":"scale","workers":4}"#,
            ),
            (
                Request::Route {
                    ip: None,
                    key: Some("abc".into()),
                },
                r#"{"cmd":"route","key":"abc"}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&req).unwrap(), line);
            assert_eq!(parse(line), Ok(req));
        }
        assert_eq!(
            parse(r#"{"cmd":"dance"}"#),
            Err(format!("unknown command `dance` ({VERBS})"))
        );
        assert!(parse(r#"{"cmd":"scale"}"#).unwrap_err().contains("workers"));
        assert!(
            parse("status")
                .unwrap_err()
                .starts_with("expected one JSON line")
        );
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

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = std::env::temp_dir().join(format!("lb-ctl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("lb.sock");
        let first = bind(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(bind(&path), Err(ControlError::AlreadyRunning(_))));
        drop(first); // the file stays: stale
        assert!(path.exists());
        bind(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
