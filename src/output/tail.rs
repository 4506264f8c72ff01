//! `lb logs [--worker N] [-n LINES] [-f]`: both ends of the control socket's `logs` request.
//!
//! The request is one line, `{"cmd":"logs","worker":1,"lines":5,"follow":true,"after":0}`; the
//! answer is `{"ok":true,"lines":[…]}` (each slot's last `lines`, oldest first), then, with
//! `follow`, one [`Line`] object per line as the workers write them, and `{"skipped":N}` when
//! the follower fell too far behind. A follower whose lb re-executes itself in place sees its
//! connection end and asks again for what came after the last line it printed.

use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{Line, Logs, Mode};

/// `lb logs`'s default number of lines per worker (pm2's `--lines`).
pub const DEFAULT_LINES: usize = 15;

/// How long a follower tries to reach its lb again after the connection ended.
const RECONNECT: Duration = Duration::from_secs(5);

/// What `lb logs` asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Only this slot's lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<usize>,
    /// The last this many lines (of each slot).
    #[serde(default = "default_lines")]
    pub lines: usize,
    /// Then new lines as they come.
    #[serde(default)]
    pub follow: bool,
    /// Only lines after this sequence number.
    #[serde(default)]
    pub after: u64,
}

fn default_lines() -> usize {
    DEFAULT_LINES
}

/// Answers a `logs` request for an lb running `slots` workers, on `w`.
pub async fn serve(
    logs: &Logs,
    slots: usize,
    req: &Request,
    w: &mut (impl AsyncWrite + Unpin),
) -> io::Result<()> {
    let refuse = match (logs.mode(), req.worker) {
        (Mode::Inherit, _) => Some(
            "lb keeps no worker lines: it runs with --worker-output inherit (the workers write \
             to lb's stdout and stderr themselves); start it with --worker-output prefix or json"
                .to_string(),
        ),
        (_, Some(n)) if n >= slots => Some(format!(
            "no worker {n}: lb runs {slots} worker{} (0…{})",
            if slots == 1 { "" } else { "s" },
            slots.saturating_sub(1)
        )),
        _ => None,
    };
    if let Some(error) = refuse {
        return send(w, &serde_json::json!({"ok": false, "error": error})).await;
    }
    // Subscribed before the tail is taken: no line falls between the two.
    let mut new = req.follow.then(|| logs.follow());
    let lines = logs.tail(req.worker, req.lines, req.after);
    let mut last = lines.last().map_or(req.after, |l| l.seq);
    let lines: Vec<&Line> = lines.iter().map(Arc::as_ref).collect();
    send(w, &serde_json::json!({"ok": true, "lines": lines})).await?;
    let Some(new) = new.as_mut() else {
        return Ok(());
    };
    loop {
        match new.recv().await {
            Ok(l) if l.seq > last && req.worker.is_none_or(|s| s == l.slot) => {
                last = l.seq;
                send(w, &*l).await?;
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                send(w, &serde_json::json!({"skipped": n})).await?;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

async fn send(w: &mut (impl AsyncWrite + Unpin), v: &impl Serialize) -> io::Result<()> {
    let mut out = serde_json::to_vec(v).map_err(io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await
}

/// Runs `lb logs` against the control socket at `path`: prints each line with `print` (as
/// `prefix` or, with `json`, as `json` writes it) until the lines asked for are printed, or,
/// following, until lb has gone or `print` returns `false` (stdout closed). `Err` is the line
/// to print.
pub fn run(
    path: &Path,
    mut req: Request,
    json: bool,
    print: &mut dyn FnMut(&str) -> bool,
) -> Result<(), String> {
    let mut first = true;
    loop {
        let stream = match connect(path, if first { Duration::ZERO } else { RECONNECT }) {
            Ok(s) => s,
            Err(_) if !first => return Ok(()), // lb has stopped
            Err(e) => return Err(format!("cannot reach lb at {}: {e}", path.display())),
        };
        let mut line = serde_json::json!({"cmd": "logs"});
        if let (Some(o), Ok(serde_json::Value::Object(r))) =
            (line.as_object_mut(), serde_json::to_value(&req))
        {
            o.extend(r);
        }
        let mut w = &stream;
        writeln!(w, "{line}").map_err(|e| format!("cannot ask lb: {e}"))?;
        let mut lines = BufReader::new(&stream).lines();
        let head: serde_json::Value = match lines.next() {
            Some(Ok(l)) => serde_json::from_str(&l).map_err(|_| format!("lb answered `{l}`"))?,
            _ if !first => continue, // it re-executed just then
            _ => return Err("lb closed the connection without an answer".into()),
        };
        if head["ok"] != true {
            return Err(head["error"].as_str().unwrap_or("lb refused").to_string());
        }
        let shown = |l: &Line| if json { l.json() } else { l.prefixed() };
        for v in head["lines"].as_array().into_iter().flatten() {
            if let Ok(l) = serde_json::from_value::<Line>(v.clone()) {
                req.after = l.seq;
                if !print(&shown(&l)) {
                    return Ok(());
                }
            }
        }
        if !req.follow {
            return Ok(());
        }
        for l in lines {
            let Ok(l) = l else { break };
            let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
            let text = match v.get("skipped") {
                Some(n) => format!("lb logs: {n} lines skipped (this reader fell behind)\n"),
                None => match serde_json::from_value::<Line>(v) {
                    Ok(l) => {
                        req.after = l.seq;
                        shown(&l)
                    }
                    Err(_) => continue,
                },
            };
            if !print(&text) {
                return Ok(());
            }
        }
        // The connection ended: lb stopped, or re-executed itself (then it answers again at
        // once, from the lines after the last one printed).
        first = false;
        req.lines = super::RING_LINES;
    }
}

/// Connects to `path`, trying for up to `patience`.
fn connect(path: &Path, patience: Duration) -> io::Result<std::os::unix::net::UnixStream> {
    let deadline = Instant::now() + patience;
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            // A stopped lb removes its socket: no need to wait.
            Err(e) if Instant::now() >= deadline || !path.exists() => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
