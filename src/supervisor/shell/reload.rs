//! Reloading (SIGHUP, `lb reload`; DESIGN §10): the configuration read again and what changed
//! applied in place, or — with an executable to re-execute — the in-place upgrade, whose
//! sequencing is the pure [`crate::supervisor::reload::Reload`]; this file carries out its steps
//! (start the preflight, pause and resume accepting, exec, fail with one line).

use std::time::Instant;

use tokio::sync::oneshot;

use super::*;
use crate::supervisor::plan;
use crate::supervisor::reload::{Facts, Phase, Reload, SETTLE_RETRY, Step};

impl Master {
    /// Re-reads the configuration and applies what can change while running: the worker
    /// count (a scale), the worker command (a rolling restart), timeouts, limits, the policy and
    /// seed. Addresses, the backlog, the log format and the serialization need a restart: they
    /// are reported, not applied. On a bad configuration nothing changes.
    pub(super) fn reload(&mut self, why: &str) -> Result<serde_json::Value, String> {
        if let Some(n) = &self.notify {
            n.reloading();
        }
        let result = self.try_reload();
        // READY=1 again once a worker is ready (at once, unless the reload changed them all).
        self.ready_notified = false;
        self.shared.metrics.reload(result.is_ok());
        match &result {
            Ok(v) => tracing::info!("{why}: configuration reloaded: {v}"),
            Err(e) => tracing::warn!("{why}: reload failed, running as before: {e}"),
        }
        result
    }

    /// The configuration read again (from `text`, the config file's, if given): the new
    /// settings, what changed that can be applied while running, and what changed that needs a
    /// restart.
    pub(super) fn read_config(
        &self,
        text: Option<&str>,
    ) -> Result<(Settings, Vec<&'static str>, Vec<&'static str>), String> {
        let Some((run, command)) = &self.reload_from else {
            return Err("no configuration to reload from".into());
        };
        let new = Settings::from_cli_text(run, command, text).map_err(|e| e.to_string())?;
        let (changed, restart_needed) = plan::split(new.differences(&self.settings));
        Ok((new, changed, restart_needed))
    }

    pub(super) fn try_reload(&mut self) -> Result<serde_json::Value, String> {
        let (new, changed, restart_needed) = self.read_config(None)?;
        let notes: Vec<String> = self.scale_note(new.workers).into_iter().collect();
        let old = &self.settings;
        let argv = match &new.command {
            _ if !changed.contains(&"command") => self.argv.clone(),
            Some(c) => c.clone(),
            None => vec![
                std::env::current_exe()
                    .map_err(|e| format!("cannot find lb's own executable: {e}"))?
                    .to_string_lossy()
                    .into_owned(),
                crate::spawn::BUILTIN_WORKER.into(),
            ],
        };
        let changes = plan::plan(
            plan::Workers {
                count: old.workers,
                argv: &self.argv,
                user: old.user.as_ref().map(|u| u.name.as_str()),
            },
            plan::Workers {
                count: new.workers,
                argv: &argv,
                user: new.user.as_ref().map(|u| u.name.as_str()),
            },
        );
        // What needs a restart keeps its running value.
        let applied = plan::keep_running(old, new);
        self.fleet.reconfigure(fleet_config(&applied, &argv));
        self.router.reconfigure(&applied);
        self.app.set_timeout(applied.app_metrics_timeout);
        self.settings = applied;
        self.argv = argv;
        let now = Instant::now();
        if let Some(n) = changes.scale {
            self.fleet.scale(n, now);
        }
        if changes.roll {
            self.fleet.roll("reload (the worker command changed)", now);
        }
        self.apply();
        Ok(
            serde_json::json!({"changed": changed, "restart_needed": restart_needed, "notes": notes}),
        )
    }

    /// What a reload does to a worker count `lb scale` set: it stays unless the file's
    /// `workers` changed since lb last read it (then the file's wins). One line for the
    /// reload's report, when there is something to say.
    pub(super) fn scale_note(&self, file_workers: usize) -> Option<String> {
        let (loaded, running) = (self.settings.workers, self.fleet.active());
        match (file_workers == loaded, running == loaded) {
            (_, true) => None,
            (true, false) => Some(format!(
                "workers: keeps the {running} that `lb scale` set (the file's workers = {loaded} did not change)"
            )),
            (false, false) => Some(format!(
                "workers: the file's {file_workers} replaces the {running} that `lb scale` set"
            )),
        }
    }

    /// SIGHUP or `lb reload`: with an executable to re-execute (and master steering), an
    /// in-place upgrade (DESIGN §10); otherwise the configuration is reloaded in place.
    pub(super) fn request_reload(
        &mut self,
        why: &'static str,
        reply: Option<oneshot::Sender<Result<serde_json::Value, String>>>,
    ) {
        let answer = |reply: Option<oneshot::Sender<_>>, r| {
            if let Some(reply) = reply {
                let _ = reply.send(r);
            }
        };
        if self.fleet.shutting_down() {
            tracing::info!("{why} during shutdown: ignored");
            return answer(reply, Err("lb is shutting down".into()));
        }
        if self.takeover.is_none() || self.group.is_some() {
            return answer(reply, self.reload(why));
        }
        // The config file is read once: the preflight checks that text and the next image runs
        // with it, whatever the file holds by then. One that does not parse fails here and now,
        // as a start would.
        let (text, report) = match self.config_text().and_then(|text| {
            let report = self.diff_config(text.as_deref())?;
            Ok((text, report))
        }) {
            Ok(r) => r,
            Err(e) => {
                self.shared.metrics.reload(false);
                tracing::warn!("{why}: reload failed, running as before: {e}");
                return answer(reply, Err(e));
            }
        };
        if let Some(reply) = reply {
            self.reload_replies.push((reply, report));
        }
        match &mut self.reload {
            Some(r) => {
                if r.again(text) {
                    tracing::info!(
                        "the config file changed again during the reload: it is checked again"
                    );
                }
            }
            None => {
                if let Some(n) = &self.notify {
                    n.reloading();
                }
                self.reload = Some(Reload::new(why, text));
            }
        }
    }

    /// What a reload would change: `{changed, restart_needed}`, or the configuration's error.
    pub(super) fn diff_config(&self, text: Option<&str>) -> Result<serde_json::Value, String> {
        let (new, changed, restart_needed) = self.read_config(text)?;
        let notes: Vec<String> = self.scale_note(new.workers).into_iter().collect();
        Ok(
            serde_json::json!({"changed": changed, "restart_needed": restart_needed, "notes": notes}),
        )
    }

    /// The config file's text (`None`: lb runs without one).
    pub(super) fn config_text(&self) -> Result<Option<String>, String> {
        self.reload_from
            .as_ref()
            .and_then(|(run, _)| run.config.as_deref())
            .map(crate::config::read_text)
            .transpose()
            .map_err(|e| e.to_string())
    }

    /// Whether accepting is paused for an upgrade's settle.
    pub(super) fn settling(&self) -> bool {
        self.reload
            .as_ref()
            .is_some_and(|r| matches!(r.phase, Phase::Settling { .. }))
    }

    /// Carries out what the upgrade in progress asks for now (its sequencing is the pure
    /// [`Reload`]).
    pub(super) async fn drive_reload(
        &mut self,
        listener_fd: Option<std::os::fd::RawFd>,
        now: Instant,
    ) {
        let Some(r) = &mut self.reload else { return };
        let why = r.why;
        if self.fleet.shutting_down() {
            r.abandon();
        }
        loop {
            let facts = Facts {
                steady: self.fleet.steady(),
                quiet: self.router.quiescent()
                    && self.acceptor.waiting() == 0
                    && self.shared.admin_open() == 0,
                preflight_busy: self.preflight_running,
            };
            let Some(step) = self.reload.as_mut().and_then(|r| r.poll(now, facts)) else {
                return;
            };
            match step {
                Step::Waiting => tracing::info!(
                    "{why}: the reload waits for the workers to settle (a rolling restart, a scale or a start in progress)"
                ),
                Step::Preflight => self.start_preflight(),
                Step::Pause => self.shared.pause_admin(true),
                Step::Resume => self.shared.pause_admin(false),
                Step::Retry => tracing::info!(
                    "{why}: handoffs in flight not settled; accepting again, the reload is tried again in {SETTLE_RETRY:?}"
                ),
                Step::Exec => {
                    // `Err(None)`: not settled after all; tried again on the next pass, until the
                    // settle's deadline.
                    if let Err(Some(e)) = self.re_execute(listener_fd).await
                        && let Some(r) = &mut self.reload
                    {
                        r.exec_failed(e);
                        continue;
                    }
                    return;
                }
                Step::Failed(e) => return self.reload_failed(why, e),
            }
        }
    }

    /// Runs `lb check --takeover` of the binary at the start path with the reload's text.
    fn start_preflight(&mut self) {
        let Some(t) = &self.takeover else { return };
        let text = self.reload.as_ref().and_then(|r| r.text.as_deref());
        match upgrade::preflight(t.exe.clone(), &t.args, text) {
            Ok((pid, done)) => {
                // Reaped by its task, not as an orphan.
                self.worker_pids.insert(pid);
                self.preflight_running = true;
                let tx = self.preflight_tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send((pid, done.await));
                });
            }
            Err(e) => {
                if let Some(r) = &mut self.reload {
                    r.preflight_done(Err(e));
                }
            }
        }
    }

    /// The preflight finished: its verdict goes to the reload (the `lb reload` callers are
    /// answered when it is on the text they asked for).
    pub(super) fn preflight_done(&mut self, (pid, checked): (u32, Result<(), String>)) {
        self.preflight_running = false;
        self.worker_pids.remove(&pid);
        let Some(r) = &mut self.reload else { return };
        if let Some(Ok(())) = r.preflight_done(checked) {
            for (reply, report) in self.reload_replies.drain(..) {
                let _ = reply.send(Ok(report));
            }
        }
    }

    /// The in-place upgrade did not happen: one line, counted, and lb carries on as it was.
    pub(super) fn reload_failed(&mut self, why: &str, e: String) {
        tracing::warn!("{why}: reload failed, running as before: {e}");
        self.shared.metrics.reload(false);
        self.reload = None;
        self.shared.pause_admin(false);
        self.ready_notified = false; // READY=1 again after RELOADING=1
        for (reply, _) in self.reload_replies.drain(..) {
            let _ = reply.send(Err(e.clone()));
        }
    }
}
