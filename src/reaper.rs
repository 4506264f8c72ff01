//! Descendants that outlive their worker: lb is their child subreaper (or PID 1 in a container),
//! reaps them when they exit and kills what is left at shutdown.
//!
//! A worker that double-forks (a daemonised helper, `setsid cmd &`) leaves a process outside its
//! process group that signals to the group never reach. Without a subreaper it is re-parented to
//! the host's init and outlives lb; as lb's orphan it stays visible. Orphans are reaped by pid
//! (never `waitpid(-1)`), so lb never takes a worker's exit status from the task waiting for it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

/// Makes lb the reaper of every orphaned descendant (a no-op for PID 1, which already is).
pub fn become_subreaper() {
    if std::process::id() == 1 {
        return;
    }
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(
            "cannot become the child subreaper ({e}): a worker's daemonised descendants will outlive lb"
        );
    }
}

/// lb's children by state, read from `/proc` (`ppid` = lb).
fn children() -> Vec<(u32, char)> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
            let rest = &stat[stat.rfind(')')? + 2..];
            let mut f = rest.split_whitespace();
            let state = f.next()?.chars().next()?;
            let ppid: u32 = f.next()?.parse().ok()?;
            (ppid == me).then_some((pid, state))
        })
        .collect()
}

/// Reaps the orphans that have exited (zombies that are not workers). Returns how many.
pub fn reap_orphans(workers: &HashSet<u32>) -> usize {
    let mut n = 0;
    for (pid, state) in children() {
        if state == 'Z' && !workers.contains(&pid) {
            let pid = Pid::from_raw(pid as i32);
            if waitpid(pid, Some(WaitPidFlag::WNOHANG)).is_ok() {
                tracing::debug!(pid = pid.as_raw(), "reaped an orphaned descendant");
                n += 1;
            }
        }
    }
    n
}

/// Kills and reaps every orphan still alive (at shutdown, once the workers are gone), waiting at
/// most `limit`. Returns how many were killed.
pub fn kill_orphans(workers: &HashSet<u32>, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    let mut killed = HashSet::new();
    loop {
        let left: Vec<u32> = children()
            .into_iter()
            .filter(|(pid, _)| !workers.contains(pid))
            .map(|(pid, state)| {
                if state != 'Z' && killed.insert(pid) {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                pid
            })
            .collect();
        reap_orphans(workers);
        if left.is_empty() || Instant::now() >= deadline {
            if !killed.is_empty() {
                tracing::info!(
                    count = killed.len(),
                    "killed descendants the workers left behind"
                );
            }
            return killed.len();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills what is left of an exited worker's process group (its own children that did not leave
/// the group). The group id stays reserved while any member lives, so it cannot name a stranger.
pub fn kill_group_leftovers(pid: u32) {
    if pid != 0 {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}
