//! Spawning a worker process with its Node-IPC channel on fd 3.
//!
//! Exactly what Node's `child_process.fork` does (node-ipc.md §1, §8): a CLOEXEC
//! `socketpair(AF_UNIX, SOCK_STREAM)`; the child end becomes fd 3 without CLOEXEC;
//! `NODE_CHANNEL_FD=3`, `NODE_CHANNEL_SERIALIZATION_MODE=json` and `LB_WORKER_ID=<slot>` are set and
//! lb's own `NODE_UNIQUE_ID` is removed (the caller sets a fresh one per worker, as Node's primary
//! does); the parent's copy of the child end is closed right after spawn so
//! that the worker's death is seen as EOF.
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

/// The fd number of the channel in the worker.
pub const CHANNEL_FD: i32 = 3;

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

/// Starts `argv` as the worker for `slot`, with `env` added to the inherited environment.
pub fn spawn_worker(argv: &[String], slot: usize, env: &[(&str, String)]) -> io::Result<Spawned> {
    let (parent_end, child_end) = UnixStream::pair()?;
    let child_end: OwnedFd = child_end.into();
    let child_fd = child_end.as_raw_fd();
    let master_pid = std::process::id() as libc::pid_t;

    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("NODE_CHANNEL_FD", CHANNEL_FD.to_string())
        .env("NODE_CHANNEL_SERIALIZATION_MODE", "json")
        .env("LB_WORKER_ID", slot.to_string())
        .env_remove("NODE_UNIQUE_ID")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(false);
    // The closure runs in the child between fork and exec; `child_fd` stays open in the parent
    // until after spawn returns, because `child_end` is dropped only below.
    // SAFETY: the closure only makes async-signal-safe syscalls (prctl, getppid, dup2, fcntl) on
    // integers captured by value: no allocation, no locks, no logging.
    unsafe {
        cmd.pre_exec(move || {
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
            if child_fd == CHANNEL_FD {
                // dup2(3, 3) would not clear FD_CLOEXEC.
                if libc::fcntl(CHANNEL_FD, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(child_fd, CHANNEL_FD) < 0 {
                return Err(io::Error::last_os_error());
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
