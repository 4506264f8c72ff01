//! Spawning a worker process with its Node-IPC channel on fd 3.
//!
//! Exactly what Node's `child_process.fork` does (node-ipc.md §1, §8): a CLOEXEC
//! `socketpair(AF_UNIX, SOCK_STREAM)`; the child end becomes fd 3 without CLOEXEC;
//! `NODE_CHANNEL_FD=3`, `NODE_CHANNEL_SERIALIZATION_MODE=json` and `LB_WORKER_ID=<slot>` are set and
//! lb's own `NODE_UNIQUE_ID` is removed (the caller sets a fresh one per worker, as Node's primary
//! does); the parent's copy of the child end is closed right after spawn so
//! that the worker's death is seen as EOF.
//!
//! A worker gets exactly fds 0, 1, 2, the channel (3) and, with kernel steering, its slot's listener
//! (4): every other descriptor is marked close-on-exec between fork and exec, whatever lb itself
//! inherited without the flag (a shell's `exec 7</etc/shadow`, a supervisor's socket) — with
//! `--user` that would hand root's files to an unprivileged process (PITFALLS §15). Node's
//! `child_process.fork` passes only stdio and the channel too.
//!
//! Each worker leads its own process group (so grandchildren can be signalled too) and gets
//! `PR_SET_PDEATHSIG(SIGKILL)`, so it dies with the master even if the master is SIGKILLed. The
//! death signal is tied to the forking *thread*: the master spawns only from its single
//! long-lived runtime thread (PITFALLS §6).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::Stdio;

use crate::env;
pub use crate::env::{CHANNEL_FD, LISTEN_FD};

pub use crate::user::WorkerUser;

/// The subcommand that runs the built-in worker (`lb builtin-worker`).
pub const BUILTIN_WORKER: &str = "builtin-worker";

/// A freshly spawned worker.
#[derive(Debug)]
pub struct Spawned {
    /// The process (reaped through tokio's SIGCHLD handling).
    pub child: tokio::process::Child,
    /// Its pid.
    pub pid: u32,
    /// The master's end of the channel (CLOEXEC, blocking mode untouched).
    pub channel: UnixStream,
}

/// Starts `argv` as the worker for `slot`, with `env` added to the inherited environment, with
/// `listener` (kernel steering: the slot's listening socket) on fd 4, and with `output`'s pipes
/// as its stdout and stderr (`--worker-output prefix|json`; else it shares lb's).
pub fn spawn_worker(
    argv: &[String],
    slot: usize,
    env: &[(&str, String)],
    user: Option<&WorkerUser>,
    listener: Option<std::os::fd::BorrowedFd<'_>>,
    output: Option<crate::output::pipes::WriteEnds>,
) -> io::Result<Spawned> {
    let listener_fd = listener.map(|l| l.as_raw_fd());
    let (parent_end, child_end) = UnixStream::pair()?;
    let child_end: OwnedFd = child_end.into();
    let child_fd = child_end.as_raw_fd();
    let master_pid = std::process::id() as libc::pid_t;

    let mut cmd = tokio::process::Command::new(&argv[0]);
    // systemd's socket activation and notification variables are lb's, not the workers'.
    for var in crate::systemd::VARIABLES {
        cmd.env_remove(var);
    }
    cmd.args(&argv[1..])
        .env(env::NODE_CHANNEL_FD, CHANNEL_FD.to_string())
        .env(env::NODE_CHANNEL_SERIALIZATION_MODE, "json")
        .env(env::LB_WORKER_ID, slot.to_string())
        .env_remove(env::NODE_UNIQUE_ID)
        .env_remove(env::LB_UPGRADE_STATE)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(false);
    // The write ends close in lb when `cmd` is dropped, after the spawn: the pipe ends when the
    // worker (and whatever it started) has closed it.
    if let Some(o) = output {
        cmd.stdout(Stdio::from(o.stdout))
            .stderr(Stdio::from(o.stderr));
    }
    if std::env::var_os(env::NODE_APP_INSTANCE).is_none() {
        cmd.env(env::NODE_APP_INSTANCE, slot.to_string());
    }
    // The built-in worker is lb's own binary: a title that tells it from the master in `ps`
    // (as nginx's "nginx: worker process").
    if argv.get(1).map(String::as_str) == Some(BUILTIN_WORKER) {
        cmd.arg0(format!("lb: worker {slot}"));
    }
    if listener_fd.is_some() {
        cmd.env(env::LB_LISTEN_FD, LISTEN_FD.to_string());
    } else {
        cmd.env_remove(env::LB_LISTEN_FD);
    }
    if let Some(u) = user {
        cmd.env("HOME", &u.home)
            .env("USER", &u.name)
            .env("LOGNAME", &u.name);
    }
    // Everything the child needs, prepared before fork (no allocation after it).
    let creds = user.map(|u| (u.uid, u.gid, u.groups.clone()));
    // The first fd the worker is not meant to get, and (for kernels without close_range) the
    // highest fd lb has open now.
    let first_private: libc::c_uint = if listener_fd.is_some() { 5 } else { 4 };
    let highest_fd = highest_open_fd();
    // The closure runs in the child between fork and exec; `child_fd` stays open in the parent
    // until after spawn returns, because `child_end` is dropped only below.
    // The closure makes only setgroups, setgid, setuid, prctl, getppid, dup2, fcntl and
    // close_range calls on integers and a group list allocated before fork and captured by value.
    // SAFETY: all async-signal-safe; no allocation, no locks, no logging after fork.
    unsafe {
        cmd.pre_exec(move || {
            // Drop to the worker user first: a credential change clears PR_SET_PDEATHSIG.
            if let Some((uid, gid, groups)) = &creds {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The master may have died between fork and prctl: then nobody will signal us.
            if libc::getppid() != master_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            if let Some(lfd) = listener_fd {
                // Channel to 3 and listener to 4: first move both above 4 (close-on-exec
                // copies), so that neither dup2 overwrites the other's source.
                let c = libc::fcntl(child_fd, libc::F_DUPFD_CLOEXEC, 10);
                let l = libc::fcntl(lfd, libc::F_DUPFD_CLOEXEC, 10);
                if c < 0 || l < 0 || libc::dup2(c, CHANNEL_FD) < 0 || libc::dup2(l, LISTEN_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if child_fd == CHANNEL_FD {
                // dup2(3, 3) would not clear FD_CLOEXEC.
                if libc::fcntl(CHANNEL_FD, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(child_fd, CHANNEL_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            // Nothing else crosses the exec: close-on-exec on everything above what is passed.
            if libc::syscall(
                libc::SYS_close_range,
                first_private,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                // Linux < 5.11: one fcntl per fd that was open before fork.
                for fd in first_private as i32..=highest_fd {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags >= 0
                        && flags & libc::FD_CLOEXEC == 0
                        && libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(child_end);
    let pid = child.id().unwrap_or(0);
    Ok(Spawned {
        child,
        pid,
        channel: parent_end,
    })
}

/// The highest fd number open in lb (read before fork, for the close_range fallback); fds opened
/// after this are lb's own, all close-on-exec.
fn highest_open_fd() -> i32 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .max()
                .unwrap_or(1024)
        })
        .unwrap_or(1024)
}

/// Sends `signal` to the worker's whole process group (falls back to the pid alone).
pub fn signal_group(pid: u32, signal: nix::sys::signal::Signal) {
    use nix::unistd::Pid;
    if pid == 0 {
        return;
    }
    let pid = Pid::from_raw(pid as i32);
    if nix::sys::signal::killpg(pid, signal).is_err() {
        let _ = nix::sys::signal::kill(pid, signal);
    }
}

/// With `--user`, the master keeps root only for what it still does as root: starting workers as
/// another user (`CAP_SETUID`, `CAP_SETGID`) and signalling them (`CAP_KILL`). Every other
/// capability leaves its effective, permitted, inheritable, ambient and bounding sets (so no
/// worker can regain one either). Call after the sockets are bound.
pub fn drop_master_privileges() -> Result<(), String> {
    use caps::{CapSet, Capability, CapsHashSet};
    let keep: CapsHashSet = [
        Capability::CAP_SETUID,
        Capability::CAP_SETGID,
        Capability::CAP_KILL,
    ]
    .into_iter()
    .collect();
    let err = |what: &str, e: caps::errors::CapsError| format!("cannot drop {what}: {e}");
    for cap in caps::read(None, CapSet::Bounding).map_err(|e| err("capabilities", e))? {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| err("capabilities", e))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| err("ambient capabilities", e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| err("inheritable capabilities", e))?;
    caps::set(None, CapSet::Effective, &keep).map_err(|e| err("capabilities", e))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|e| err("capabilities", e))?;
    Ok(())
}
