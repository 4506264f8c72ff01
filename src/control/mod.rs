//! The control socket: how `lb status`, `lb roll`, `lb scale`, `lb reload`, `lb stop` and `lb logs`
//! talk to a running lb (the client's side is [`client`]).
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

pub mod client;
pub use client::{
    Instance, describe_route, find, instance_dir, instance_path, instances, instances_table, send,
    status_table, wait_exited, wait_scaled,
};

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

#[cfg(test)]
mod tests {
    use super::*;

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
