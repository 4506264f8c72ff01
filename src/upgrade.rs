//! In-place upgrade (SIGHUP, `lb reload`, `systemctl reload`; DESIGN §10): lb re-executes itself, from the path it was started
//! from, in the same pid, and the new image carries on with the same listener, workers, channels
//! and counters.
//!
//! The sequence, decided by [`crate::supervisor::reload`] and carried out by the master's shell:
//!
//! 1. **Preflight**: `<start path> check --takeover FORMAT <lb's arguments>` must exit 0. It
//!    validates the configuration as a start would, and the new binary says whether it reads
//!    this image's state [`FORMAT`]; on failure lb logs the one line it printed, counts
//!    `lb_reloads_total{result="failed"}` and carries on unchanged.
//! 2. **Settle**: lb stops accepting (new connections wait in the kernel's backlog) until every
//!    handoff in flight is answered and nothing waits in lb (bounded: else the reload fails and
//!    lb carries on).
//! 3. **Surrender**: each worker's dispatch task gives back its channel and what it carries
//!    (the start of a message not yet complete, cluster state).
//! 4. **Exec**: the [`State`] document goes into a memfd; every fd it names (and the memfd)
//!    loses close-on-exec for this exec only; signals lb handles are blocked across the exec
//!    (pending ones are delivered once the new image handles them); `execve`.
//! 5. The new image ([`take`]) adopts the fds, restores counters, adopts each worker (its exit is
//!    then seen with `waitpid`), reaps what exited during the switch, and applies the new
//!    configuration: a changed worker command is a rolling restart, a changed count a scale.
//!
//! If `execve` itself fails, the old image restores itself from the same document.

use std::ffi::{CString, OsString};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::dispatch;
use crate::metrics;
use crate::router::CarriedLink;
use crate::sys;

/// The state document's format. A new binary refuses (in the preflight) a format it does not
/// read, and the running lb then carries on.
pub const FORMAT: u32 = 1;

/// The environment variable naming the state document's fd in the new image.
pub const ENV: &str = crate::env::LB_UPGRADE_STATE;

/// The environment variable that gives the preflight the config file's text to check (the
/// text the next image will run with, whatever the file holds by then).
pub const CONFIG_ENV: &str = crate::env::LB_UPGRADE_CONFIG;

/// How long the preflight (`lb check`) may take.
const PREFLIGHT_LIMIT: Duration = Duration::from_secs(10);

/// What lb's next image needs to carry on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// [`FORMAT`].
    pub format: u32,
    /// The version of the image that wrote it.
    pub version: String,
    /// The listening socket.
    pub listener: Option<RawFd>,
    /// The admin/metrics socket.
    pub metrics: Option<RawFd>,
    /// The control socket.
    pub control: Option<RawFd>,
    /// Listening sockets opened for cluster workers' `listen()` elsewhere, by server key.
    pub shared_listeners: Vec<(String, RawFd)>,
    /// The next `NODE_UNIQUE_ID`.
    pub next_unique_id: u64,
    /// Slots taking connections.
    pub slots: usize,
    /// The worker command the workers run.
    pub argv: Vec<String>,
    /// The user they run as.
    pub user: Option<String>,
    /// Settings that a reload cannot change, at their running values (`Settings` field name,
    /// value as the configuration file spells it).
    pub fixed: Vec<(String, String)>,
    /// The config file's text as the preflight checked it (`None`: no config file). The next
    /// image runs with it, not with what the file holds by then.
    #[serde(default)]
    pub config: Option<String>,
    /// The workers.
    pub workers: Vec<CarriedWorker>,
    /// Every slot's next generation, those without a worker too (one that died just before
    /// the upgrade is replaced as a restart, and counted).
    #[serde(default)]
    pub generations: Vec<u64>,
    /// `workers` as the configuration last read said (a count `lb scale` set may differ): the
    /// next image keeps the running count unless the file's changed.
    #[serde(default)]
    pub loaded_workers: Option<usize>,
    /// Counter values.
    pub counters: metrics::Carried,
    /// The app's metrics: gone workers' counters, live workers' last answers.
    #[serde(default)]
    pub app_metrics: crate::appmetrics::collect::Carried,
    /// The workers' output pipes (`--worker-output prefix|json`), the exited workers' whose
    /// children still write to them too.
    #[serde(default)]
    pub outputs: Vec<crate::output::Carried>,
    /// The lines `lb logs` shows.
    #[serde(default)]
    pub logs: Vec<crate::output::Line>,
}

/// One running worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedWorker {
    /// Its slot.
    pub slot: usize,
    /// Its generation within the slot.
    pub generation: u64,
    /// The slot's next generation.
    pub next_generation: u64,
    /// Its pid.
    pub pid: u32,
    /// lb's end of its channel.
    pub channel: RawFd,
    /// How long it has run, in ms.
    pub age_ms: u64,
    /// How long since its last heartbeat, in ms (`None`: it never beat).
    pub heartbeat_age_ms: Option<u64>,
    /// A Node cluster worker.
    pub cluster: bool,
    /// Its dispatch task's state.
    pub dispatch: dispatch::Carried,
    /// What routing knows of it.
    pub link: CarriedLink,
}

impl State {
    /// Every fd the document names.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = [self.listener, self.metrics, self.control]
            .into_iter()
            .flatten()
            .collect();
        fds.extend(self.shared_listeners.iter().map(|(_, fd)| *fd));
        fds.extend(self.workers.iter().map(|w| w.channel));
        fds.extend(self.outputs.iter().map(|o| o.fd));
        fds
    }

    /// Checks the document before any fd is adopted: its format, and each fd named once.
    fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "state format {} (this lb reads format {FORMAT})",
                self.format
            ));
        }
        let mut fds = self.fds();
        fds.sort_unstable();
        if fds.windows(2).any(|w| w[0] == w[1]) {
            return Err("the state names an fd twice".into());
        }
        if let Some(w) = self.workers.iter().find(|w| w.slot >= self.slots) {
            return Err(format!(
                "the state puts a worker in slot {} of {}",
                w.slot, self.slots
            ));
        }
        Ok(())
    }

    /// Writes the document into a new memfd (close-on-exec; the caller clears it for the exec).
    pub fn write(&self) -> io::Result<OwnedFd> {
        let fd = nix::sys::memfd::memfd_create(
            c"lb-upgrade-state",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )?;
        let mut f = std::fs::File::from(fd);
        serde_json::to_writer(&mut f, self)?;
        f.flush()?;
        f.rewind()?;
        Ok(f.into())
    }
}

/// The state lb's previous image left, if this image was started by an in-place upgrade.
pub fn take() -> Option<Result<State, String>> {
    let var = std::env::var(ENV).ok()?;
    Some(read(&var))
}

fn read(var: &str) -> Result<State, String> {
    let fd: RawFd = var
        .trim()
        .parse()
        .map_err(|_| format!("{ENV}={var} is not an fd number"))?;
    let owned = sys::adopt_fd(fd).map_err(|e| e.to_string())?;
    let mut text = String::new();
    std::fs::File::from(owned)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the state: {e}"))?;
    let state: State =
        serde_json::from_str(&text).map_err(|e| format!("the state is not valid: {e}"))?;
    state.validate()?;
    Ok(state)
}

/// Takes ownership of an fd the state names.
pub fn adopt(fd: RawFd) -> io::Result<OwnedFd> {
    sys::adopt_fd(fd)
}

/// Starts the preflight, `exe check --takeover FORMAT args…`: its pid (lb's child until it is
/// reaped, which the returned future does) and its outcome (`Err` is the one line to log).
pub fn preflight(
    exe: PathBuf,
    args: &[OsString],
    config: Option<&str>,
) -> Result<(u32, impl Future<Output = Result<(), String>> + use<>), String> {
    let mut cmd = tokio::process::Command::new(&exe);
    cmd.arg("check")
        .arg("--takeover")
        .arg(FORMAT.to_string())
        .args(args)
        .env_remove(ENV);
    match config {
        Some(text) => cmd.env(CONFIG_ENV, text),
        None => cmd.env_remove(CONFIG_ENV),
    };
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let pid = child.id().unwrap_or(0);
    Ok((pid, async move {
        let out = match tokio::time::timeout(PREFLIGHT_LIMIT, child.wait_with_output()).await {
            Err(_) => return Err(format!("`{} check` did not finish", exe.display())),
            Ok(Err(e)) => return Err(format!("cannot run {}: {e}", exe.display())),
            Ok(Ok(out)) => out,
        };
        outcome(&exe, out)
    }))
}

/// What a finished preflight says.
fn outcome(exe: &Path, out: std::process::Output) -> Result<(), String> {
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().trim_start_matches("lb: error: ").to_owned());
    Err(match line {
        Some(l) => format!("{}: {l}", exe.display()),
        None => format!("{} check failed ({})", exe.display(), out.status),
    })
}

/// The signals the master handles: blocked across the exec so that one arriving in between is
/// delivered to the new image's handlers instead of acting with its default disposition.
fn handled_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGHUP,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR2,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    set
}

/// Unblocks the signals [`exec`] blocked (the new image calls it once its handlers are in place).
pub fn unblock_signals() {
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
        Some(&handled_signals()),
        None,
    );
}

/// Replaces this process image with `exe args…`, passing `state` (and the fds it names).
/// Returns only on failure, with every fd close-on-exec again and signals unblocked.
pub fn exec(exe: &Path, args: &[OsString], state: &State) -> io::Error {
    let doc = match state.write() {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    let fds = state.fds();
    let set_all = |inherit: bool| -> io::Result<()> {
        sys::set_inheritable(doc.as_fd(), inherit)?;
        for &fd in &fds {
            sys::set_inheritable_raw(fd, inherit)?;
        }
        Ok(())
    };
    let err = match set_all(true) {
        Err(e) => e,
        Ok(()) => {
            let env: Vec<CString> = std::env::vars_os()
                .filter(|(k, _)| k != ENV)
                .chain(std::iter::once((
                    OsString::from(ENV),
                    OsString::from(doc.as_raw_fd().to_string()),
                )))
                .filter_map(|(k, v)| {
                    let mut kv = k.into_vec();
                    kv.push(b'=');
                    kv.extend(v.into_vec());
                    CString::new(kv).ok()
                })
                .collect();
            let argv: Vec<CString> = std::iter::once(exe.as_os_str().to_owned())
                .chain(args.iter().cloned())
                .filter_map(|a| CString::new(a.into_vec()).ok())
                .collect();
            match CString::new(exe.as_os_str().to_owned().into_vec()) {
                Err(e) => io::Error::other(e),
                Ok(path) => {
                    let _ = nix::sys::signal::sigprocmask(
                        nix::sys::signal::SigmaskHow::SIG_BLOCK,
                        Some(&handled_signals()),
                        None,
                    );
                    let e = nix::unistd::execve(&path, &argv, &env).unwrap_err();
                    unblock_signals();
                    io::Error::from(e)
                }
            }
        }
    };
    let _ = set_all(false);
    err
}

/// A listening socket from the state.
pub fn listener(fd: RawFd) -> io::Result<std::net::TcpListener> {
    adopt(fd).map(std::net::TcpListener::from)
}

/// A Unix listening socket (the control socket) from the state.
pub fn unix_listener(fd: RawFd) -> io::Result<std::os::unix::net::UnixListener> {
    adopt(fd).map(std::os::unix::net::UnixListener::from)
}

/// A worker channel from the state.
pub fn channel(fd: RawFd) -> io::Result<std::os::unix::net::UnixStream> {
    adopt(fd).map(std::os::unix::net::UnixStream::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    fn state() -> State {
        State {
            format: FORMAT,
            version: "test".into(),
            listener: Some(7),
            metrics: None,
            control: None,
            shared_listeners: vec![("key".into(), 8)],
            next_unique_id: 3,
            slots: 2,
            argv: vec!["lb".into(), crate::spawn::BUILTIN_WORKER.into()],
            user: None,
            fixed: vec![("serialization".into(), "json".into())],
            config: Some("workers = 2\n".into()),
            workers: vec![CarriedWorker {
                slot: 1,
                generation: 2,
                next_generation: 3,
                pid: 42,
                channel: 9,
                age_ms: 1000,
                heartbeat_age_ms: Some(5),
                cluster: true,
                dispatch: dispatch::Carried {
                    inbox: b"{\"cmd\":".to_vec(),
                    rr_key: Some("4:::8000".into()),
                    seq: 6,
                },
                link: CarriedLink::default(),
            }],
            counters: metrics::Carried::default(),
            app_metrics: Default::default(),
            generations: vec![3],
            loaded_workers: Some(1),
            outputs: vec![crate::output::Carried {
                slot: 1,
                pid: 42,
                stream: crate::output::Stream::Stderr,
                fd: 10,
                pending: b"half a li".to_vec(),
            }],
            logs: Vec::new(),
        }
    }

    #[test]
    fn the_state_document_round_trips_through_its_memfd() {
        let s = state();
        let fd = s.write().unwrap().into_raw_fd();
        let back = read(&fd.to_string()).unwrap();
        assert_eq!(back.workers[0].dispatch, s.workers[0].dispatch);
        assert_eq!(back.fds(), vec![7, 8, 9, 10]);
        assert_eq!(back.outputs, s.outputs);
        assert_eq!(back.next_unique_id, 3);
    }

    #[test]
    fn a_state_it_cannot_trust_is_refused() {
        let mut s = state();
        s.format = FORMAT + 1;
        assert!(s.validate().unwrap_err().contains("state format"));
        let mut s = state();
        s.workers[0].channel = 7; // the listener's fd
        assert!(s.validate().unwrap_err().contains("twice"));
        let mut s = state();
        s.workers[0].slot = 2;
        assert!(s.validate().unwrap_err().contains("slot 2 of 2"));
        assert!(read("not a number").is_err());
    }
}
