//! The in-place upgrade's two ends: re-executing lb with every worker's channel and the state
//! document ([`crate::upgrade`]), and, in the new image, resuming from that state (counters,
//! workers and their channels, the configuration's changes) and watching adopted workers'
//! exits with `waitpid` (they are not this image's tokio children).

use std::os::fd::AsRawFd;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::*;

/// What an in-place upgrade needs that the master does not otherwise hold.
#[derive(Debug, Clone)]
pub struct Takeover {
    /// The path lb was started from (a new binary there takes effect).
    pub exe: std::path::PathBuf,
    /// lb's arguments.
    pub args: Vec<std::ffi::OsString>,
    /// The admin socket (owned by its task).
    pub metrics_fd: Option<std::os::fd::RawFd>,
    /// The control socket (owned by its task).
    pub control_fd: Option<std::os::fd::RawFd>,
}

impl Master {
    /// Re-executes lb in place with the workers' channels; returns only if that did not
    /// happen (every worker is then served as before): `Err(None)` if something was still in
    /// flight after all (the caller tries again), `Err(Some(why))` if the exec failed.
    pub(super) async fn re_execute(
        &mut self,
        listener_fd: Option<std::os::fd::RawFd>,
    ) -> Result<(), Option<String>> {
        let Some(t) = self.takeover.clone() else {
            return Err(Some("lb cannot re-execute itself".into()));
        };
        let mut carried = Vec::new();
        for a in self.fleet.carry() {
            let Some((handle, _)) = self.router.carry(a.id) else {
                continue;
            };
            match handle.surrender().await {
                Some(s) => carried.push((a, s)),
                None => {
                    self.resume_workers(carried);
                    return Err(None);
                }
            }
        }
        // What the workers reported before their tasks ended (ACKs, stats) is counted first, so
        // that the counters carried are complete.
        while let Ok(ev) = self.reports_rx.try_recv() {
            self.on_dispatch(ev, Instant::now());
        }
        if !self.router.quiescent() || !self.fleet.steady() {
            self.resume_workers(carried);
            return Err(None);
        }
        let carried: Vec<_> = carried
            .into_iter()
            .filter_map(|(a, s)| Some((a, s, self.router.carry(a.id)?.1)))
            .collect();
        // The workers' pipes go too, once what was read from them is written out.
        let outputs = match self.output.as_mut() {
            Some(o) => o.pause(super::OUTPUT_LIMIT).await,
            None => Vec::new(),
        };
        // No await from here to the exec. A worker that died while this image awaited may
        // already be reaped (its status waits in its exit task): carried, the next image would
        // know only that it is gone. Its exit is taken here first, and the upgrade tried again.
        if carried.iter().any(|(a, _, _)| reaped(a.pid)) {
            if let Some(o) = self.output.as_mut() {
                o.resume();
            }
            self.resume_workers(carried.into_iter().map(|(a, s, _)| (a, s)).collect());
            return Err(None);
        }
        let now = Instant::now();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let state = upgrade::State {
            format: upgrade::FORMAT,
            version: crate::VERSION.to_owned(),
            listener: listener_fd,
            metrics: t.metrics_fd,
            control: t.control_fd,
            shared_listeners: self
                .shared_listeners
                .iter()
                .map(|(k, s)| (k.clone(), s.as_raw_fd()))
                .collect(),
            next_unique_id: self.next_unique_id,
            slots: self.fleet.active(),
            argv: self.argv.clone(),
            user: self.settings.user.as_ref().map(|u| u.name.clone()),
            fixed: vec![
                (
                    "serialization".into(),
                    self.settings.serialization.as_str().into(),
                ),
                ("handoff".into(), self.settings.handoff.as_str().into()),
                (
                    "worker_output".into(),
                    self.settings.worker_output.as_str().into(),
                ),
            ],
            config: self.reload.as_ref().and_then(|r| r.text.clone()),
            workers: carried
                .iter()
                .map(|(a, s, link)| upgrade::CarriedWorker {
                    slot: a.id.slot,
                    generation: a.id.generation,
                    next_generation: a.next_generation,
                    pid: a.pid,
                    channel: s.channel.as_raw_fd(),
                    age_ms: ms(now.saturating_duration_since(a.started)),
                    heartbeat_age_ms: a
                        .last_heartbeat
                        .map(|h| ms(now.saturating_duration_since(h))),
                    cluster: a.cluster,
                    dispatch: s.carried.clone(),
                    link: link.clone(),
                })
                .collect(),
            generations: self.fleet.generations(),
            loaded_workers: Some(self.settings.workers),
            counters: self.shared.metrics.carry(),
            app_metrics: self.app.carry(),
            outputs,
            logs: self.shared.logs.carry(),
        };
        tracing::info!(
            "re-executing {} in place with {} workers (lb {})",
            t.exe.display(),
            state.workers.len(),
            crate::VERSION
        );
        let err = upgrade::exec(&t.exe, &t.args, &state);
        if let Some(o) = self.output.as_mut() {
            o.resume();
        }
        self.resume_workers(carried.into_iter().map(|(a, s, _)| (a, s)).collect());
        Err(Some(format!("cannot execute {}: {err}", t.exe.display())))
    }

    /// Serves surrendered channels again (the exec did not happen).
    pub(super) fn resume_workers(
        &mut self,
        carried: Vec<(crate::supervisor::Adopted, dispatch::Surrendered)>,
    ) {
        for (a, s) in carried {
            let link = self.router.carry(a.id).map(|(_, l)| l).unwrap_or_default();
            let handle = dispatch::resume(
                a.id,
                s.channel,
                self.reports_tx.clone(),
                self.limits(),
                s.carried,
            );
            self.router.adopt(a.id, handle, link);
        }
    }

    /// The new image goes on from the state lb's previous image left: counters, workers and
    /// their channels; then applies what the configuration changed.
    pub(super) fn resume(&mut self, state: upgrade::State) {
        let now = Instant::now();
        self.shared.metrics.restore(&state.counters);
        self.app.restore(state.app_metrics.clone());
        self.next_unique_id = state.next_unique_id;
        for (key, fd) in &state.shared_listeners {
            match upgrade::adopt(*fd) {
                Ok(fd) => {
                    self.shared_listeners
                        .insert(key.clone(), socket2::Socket::from(fd));
                }
                Err(e) => tracing::warn!("cannot take over the listener for {key}: {e}"),
            }
        }
        if let Some((_, ser)) = state.fixed.iter().find(|(k, _)| k == "serialization")
            && ser != self.settings.serialization.as_str()
        {
            tracing::warn!("serialization: not applied until lb is restarted");
            self.settings.serialization = if ser == "advanced" {
                crate::channel::Serialization::Advanced
            } else {
                crate::channel::Serialization::Json
            };
        }
        if let Some((_, h)) = state.fixed.iter().find(|(k, _)| k == "handoff")
            && h != self.settings.handoff.as_str()
        {
            tracing::warn!("handoff: not applied until lb is restarted");
            if let Ok(h) = crate::channel::HandoffMsg::parse(h) {
                self.settings.handoff = h;
                self.router.reconfigure(&self.settings);
            }
        }
        self.resume_output(&state);
        let total = state.slots.max(1);
        self.router.resize(total, total);
        self.shared.resize(total);
        let mut adopted = Vec::new();
        for w in &state.workers {
            let id = WorkerId {
                slot: w.slot,
                generation: w.generation,
            };
            let channel = match upgrade::channel(w.channel) {
                Ok(c) if w.slot < total => c,
                Ok(_) | Err(_) => {
                    tracing::error!(
                        slot = w.slot,
                        pid = w.pid,
                        "cannot take over this worker's channel: stopping it"
                    );
                    spawn::signal_group(w.pid, Signal::SIGKILL);
                    continue;
                }
            };
            let handle = dispatch::resume(
                id,
                channel,
                self.reports_tx.clone(),
                self.limits(),
                w.dispatch.clone(),
            );
            self.router.adopt(id, handle, w.link.clone());
            self.worker_pids.insert(w.pid);
            self.adopted.push((id, w.pid));
            let ago = |ms: u64| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now);
            adopted.push(crate::supervisor::Adopted {
                id,
                pid: w.pid,
                started: ago(w.age_ms),
                last_heartbeat: w.heartbeat_age_ms.map(ago),
                cluster: w.cluster,
                next_generation: w.next_generation,
            });
        }
        let running = Settings {
            workers: total,
            ..self.settings.clone()
        };
        self.fleet = Fleet::resume(
            fleet_config(&running, &self.argv),
            &adopted,
            &state.generations,
            now,
        );
        // A count `lb scale` set stays unless the file's `workers` changed since the previous
        // image read it (DESIGN §10): the file's value is what changed, not the scale.
        let target = match state.loaded_workers {
            Some(loaded) if loaded == self.settings.workers => total,
            _ => self.settings.workers,
        };
        let changes = crate::supervisor::plan::plan(
            crate::supervisor::plan::Workers {
                count: total,
                argv: &state.argv,
                user: state.user.as_deref(),
            },
            crate::supervisor::plan::Workers {
                count: target,
                argv: &self.argv,
                user: self.settings.user.as_ref().map(|u| u.name.as_str()),
            },
        );
        let mut applied = Vec::new();
        if let Some(n) = changes.scale {
            self.fleet.scale(n, now);
            applied.push(format!("workers {total} → {n}"));
        }
        if changes.roll && !adopted.is_empty() {
            self.fleet.roll("reload (the worker command changed)", now);
            applied.push("worker command: rolling restart".into());
        }
        // Whatever exited during the switch.
        self.check_adopted();
        self.shared.metrics.reload(true);
        tracing::info!(
            "re-executed in place (lb {} → lb {}): {} workers carried over{}",
            state.version,
            crate::VERSION,
            adopted.len(),
            if applied.is_empty() {
                String::new()
            } else {
                format!("; {}", applied.join(", "))
            }
        );
    }

    /// The workers' output as the previous image ran it (`--worker-output` needs a restart to
    /// change): its pipes, read on, and its lines for `lb logs`.
    fn resume_output(&mut self, state: &upgrade::State) {
        let running = state
            .fixed
            .iter()
            .find(|(k, _)| k == "worker_output")
            .and_then(|(_, v)| crate::output::Mode::parse(v));
        if let Some(mode) = running
            && mode != self.settings.worker_output
        {
            tracing::warn!("worker_output: not applied until lb is restarted");
            self.settings.worker_output = mode;
            self.output = super::start_output(mode, &self.shared);
        }
        self.shared.logs.restore(state.logs.clone());
        match self.output.as_mut() {
            Some(o) => o.adopt(state.outputs.clone()),
            None => {
                if !state.outputs.is_empty() {
                    tracing::warn!(
                        "{} worker output pipe(s) carried over with nothing to read them",
                        state.outputs.len()
                    );
                }
            }
        }
    }

    /// Workers lb's previous image started are not tokio's children here: their exits are
    /// collected by pid.
    pub(super) fn check_adopted(&mut self) {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        use std::os::unix::process::ExitStatusExt;
        let mut i = 0;
        while i < self.adopted.len() {
            let (id, pid) = self.adopted[i];
            let status = match waitpid(
                nix::unistd::Pid::from_raw(pid as i32),
                Some(WaitPidFlag::WNOHANG),
            ) {
                Ok(WaitStatus::Exited(_, code)) => Some(ExitStatus::from_raw(code << 8)),
                Ok(WaitStatus::Signaled(_, sig, core)) => Some(ExitStatus::from_raw(
                    sig as i32 | if core { 0x80 } else { 0 },
                )),
                Ok(_) => {
                    i += 1;
                    continue;
                }
                Err(_) => None,
            };
            self.adopted.swap_remove(i);
            reaper::kill_group_leftovers(pid);
            let _ = self.exits_tx.send((id, pid, status));
        }
    }
}

/// Whether lb's child `pid` has exited and been reaped already (a zombie, still to be reaped,
/// is not: the next image reaps it and learns how it ended).
fn reaped(pid: u32) -> bool {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    matches!(
        waitid(Id::Pid(nix::unistd::Pid::from_raw(pid as i32)), flags),
        Err(nix::errno::Errno::ECHILD)
    )
}
