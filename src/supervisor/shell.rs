//! The master's async shell: one task on one thread that owns all state and does the I/O.
//!
//! It selects on four sources — the listener, dispatch reports, worker exits, signals — plus
//! one timer, and does nothing but translate: accepted connections and handed-back ones go to the
//! [`Router`]; lifecycle facts go to the [`Fleet`]; the fleet's [`Action`]s are carried out here
//! (spawn, signal a process group, detach, publish a slot's view, count a restart). There are no
//! locks on the data path; the admin endpoint reads [`Shared`].
//!
//! The master spawns workers only from this thread, which lives as long as the process, so
//! `PR_SET_PDEATHSIG` fires only when the master dies (PITFALLS §6).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

mod accept;

use super::{Action, Fleet, FleetConfig, Sig, WorkerId};
use crate::channel::cluster::ServerQuery;
use crate::channel::{ClusterMsg, DEFAULT_MAX_LINE, WorkerMsg};
use crate::config::{RunArgs, Settings};
use crate::dispatch::{self, ClusterOut, Report};
use crate::listener::Listener;
use crate::loglimit::LogLimit;
use crate::metrics::{Dropped, Failure, Shared};
use crate::router::Router;
use crate::{control, env, procfs, reaper, silence, spawn, steering, systemd, upgrade};

/// How often memory is sampled and socket counts asked for.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// How long lb waits at exit for the descendants it killed to be reaped.
const ORPHAN_KILL_LIMIT: Duration = Duration::from_secs(2);

/// A worker process exited.
type Exit = (WorkerId, u32, Option<ExitStatus>);

/// The master process.
pub struct Master {
    settings: Settings,
    /// The worker command.
    argv: Vec<String>,
    fleet: Fleet,
    router: Router,
    shared: Arc<Shared>,
    reports_tx: mpsc::UnboundedSender<dispatch::Event>,
    reports_rx: mpsc::UnboundedReceiver<dispatch::Event>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits_rx: mpsc::UnboundedReceiver<Exit>,
    /// The accept loop and the connections waiting for their first bytes.
    acceptor: accept::Acceptor,
    /// lb's listening address (a cluster worker's `listen()` on its port attaches to it).
    listen_addr: Option<SocketAddr>,
    /// Listening sockets lb opened for cluster workers' `listen()` on other addresses, by
    /// Node's server key (workers with the same key share one, as under Node's primary).
    shared_listeners: HashMap<String, socket2::Socket>,
    /// The next `NODE_UNIQUE_ID` (1, 2, 3…, never reused, like `cluster.worker.id`).
    next_unique_id: u64,
    /// When the next `--heartbeat-ping` goes out.
    next_ping: Option<Instant>,
    /// "malformed cluster message" lines.
    malformed_log: LogLimit,
    /// The command line lb was started with, to read the configuration again on reload.
    reload_from: Option<(RunArgs, Vec<String>)>,
    /// Pids of the workers lb started and has not yet seen exit (every other child of lb is
    /// an orphaned descendant, see [`reaper`]).
    worker_pids: HashSet<u32>,
    /// The service manager's notification socket (`NOTIFY_SOCKET`), if any.
    notify: Option<systemd::Notifier>,
    /// `READY=1` has been sent (once a worker is ready, and again after each reload).
    ready_notified: bool,
    /// When the next `WATCHDOG=1` is due.
    next_watchdog: Option<Instant>,
    /// `--steering kernel`: the per-slot listeners and the program steering them.
    group: Option<steering::Group>,
    /// When kernel steering next looks for slots that stopped accepting.
    next_steer_check: Option<Instant>,
    /// Each slot's worker's CPU ticks at the last check (progress, for kernel steering).
    steer_cpu: Vec<Option<u64>>,
    /// How to re-execute lb in place (SIGHUP), if it can.
    takeover: Option<Takeover>,
    /// A reload was asked for and has not happened yet (it waits for a steady fleet).
    reload_wanted: Option<&'static str>,
    /// `lb reload` callers, answered once the preflight passed (or the reload failed).
    reload_replies: Vec<(
        oneshot::Sender<Result<serde_json::Value, String>>,
        serde_json::Value,
    )>,
    /// A preflight (`lb check` of the binary at the start path) is running; it reports here.
    preflight_running: bool,
    preflight_tx: mpsc::UnboundedSender<(u32, Result<(), String>)>,
    preflight_rx: mpsc::UnboundedReceiver<(u32, Result<(), String>)>,
    /// "The reload waits for a steady fleet" was logged for the reload asked for.
    reload_wait_logged: bool,
    /// Settling before the exec: accepting stopped until this deadline at the latest.
    settling_until: Option<Instant>,
    /// The preflight of the reload asked for passed.
    checked: bool,
    /// The config file's text the reload asked for runs with (read when it was asked for, checked
    /// by the preflight, carried to the next image).
    reload_text: Option<String>,
    /// The file changed again while the preflight ran: its verdict is for an older text.
    recheck: bool,
    /// Settles tried for it, and when the next may start (accepting meanwhile).
    settle_tries: u32,
    settle_retry_at: Option<Instant>,
    /// Workers lb's previous image started: their exits are seen with `waitpid`.
    adopted: Vec<(WorkerId, u32)>,
    /// The state lb's previous image left, applied when `run` starts.
    resume_state: Option<upgrade::State>,
}

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

/// How long lb waits, before re-executing, for handoffs in flight to be answered.
const SETTLE_LIMIT: Duration = Duration::from_millis(500);
/// Settles an in-place upgrade tries (accepting again for [`SETTLE_RETRY`] between two) before
/// the reload fails.
const SETTLE_TRIES: u32 = 4;
const SETTLE_RETRY: Duration = Duration::from_secs(1);
/// How often a settling lb checks whether it may re-execute.
const SETTLE_POLL: Duration = Duration::from_millis(1);

/// Settings a reload cannot apply to a running lb: reported, kept at their running value.
const NEEDS_RESTART: [&str; 8] = [
    "listen",
    "metrics",
    "control",
    "backlog",
    "log_format",
    "serialization",
    "steering",
    "handoff",
];

/// The lifecycle settings of `settings` for workers running `argv`.
fn fleet_config(settings: &Settings, argv: &[String]) -> FleetConfig {
    FleetConfig {
        workers: settings.workers,
        // With kernel steering a Node worker takes clients only by accepting from the slot's
        // listener: it is ready once it listens on lb's port (a cluster app), not before.
        wait_ready: settings.wait_ready
            || (settings.steering == crate::config::Steering::Kernel && is_node(argv)),
        ready_timeout: settings.ready_timeout,
        drain_timeout: settings.shutdown_timeout,
        heartbeat_timeout: settings.heartbeat_timeout,
        max_memory: settings.max_memory,
        crash_loop: settings.crash_loop,
        settle_timeout: settings.stall_timeout,
        node_workers: is_node(argv),
        ready_hint: if settings.steering == crate::config::Steering::Kernel && is_node(argv) {
            " (under --steering kernel a Node worker is ready once it calls listen() on lb's port \
             and takes its slot's listener; a sticky-session worker, which waits for handed-over \
             connections, never does: run it with --steering master)"
        } else {
            ""
        },
    }
}

/// Whether the worker command runs Node (`node`/`nodejs`).
fn is_node(argv: &[String]) -> bool {
    argv.first()
        .and_then(|p| std::path::Path::new(p).file_name())
        .is_some_and(|n| n == "node" || n == "nodejs")
}

/// What lb sends for `--heartbeat-ping` (a worker answers `{cmd:'heartbeat'}` the same way).
const PING: &[u8] = b"{\"cmd\":\"heartbeat\"}\n";

impl Master {
    /// Creates the master for `settings`; `argv` is the worker command.
    pub fn new(settings: Settings, argv: Vec<String>, shared: Arc<Shared>) -> Self {
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        let (preflight_tx, preflight_rx) = mpsc::unbounded_channel();
        let fleet = Fleet::new(fleet_config(&settings, &argv), Instant::now());
        Self {
            router: Router::new(&settings, shared.clone()),
            fleet,
            settings,
            argv,
            shared,
            reports_tx,
            reports_rx,
            exits_tx,
            exits_rx,
            acceptor: accept::Acceptor::default(),
            listen_addr: None,
            shared_listeners: HashMap::new(),
            next_unique_id: 1,
            next_ping: None,
            malformed_log: LogLimit::default(),
            worker_pids: HashSet::new(),
            notify: systemd::Notifier::from_env(),
            ready_notified: false,
            next_watchdog: None,
            group: None,
            next_steer_check: None,
            steer_cpu: Vec::new(),
            reload_from: None,
            takeover: None,
            reload_wanted: None,
            reload_replies: Vec::new(),
            preflight_running: false,
            preflight_tx,
            preflight_rx,
            reload_wait_logged: false,
            settling_until: None,
            checked: false,
            reload_text: None,
            recheck: false,
            settle_tries: 0,
            settle_retry_at: None,
            adopted: Vec::new(),
            resume_state: None,
        }
    }

    /// SIGHUP re-executes lb in place with `t` (else it reloads the configuration in place).
    pub fn takeover(mut self, t: Takeover) -> Self {
        self.takeover = Some(t);
        self
    }

    /// Goes on from the state lb's previous image left (an in-place upgrade).
    pub fn resume_from(mut self, state: upgrade::State) -> Self {
        self.resume_state = Some(state);
        self
    }

    /// Reload (SIGHUP, `lb reload`) re-reads the configuration from this command line.
    pub fn reload_from(mut self, run: RunArgs, command: Vec<String>) -> Self {
        self.reload_from = Some((run, command));
        self
    }

    /// Re-reads the configuration and applies what can change while running: the worker
    /// count (a scale), the worker command (a rolling restart), timeouts, limits, the policy and
    /// seed. Addresses, the backlog, the log format and the serialization need a restart: they
    /// are reported, not applied. On a bad configuration nothing changes.
    fn reload(&mut self, why: &str) -> Result<serde_json::Value, String> {
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
    fn read_config(
        &self,
        text: Option<&str>,
    ) -> Result<(Settings, Vec<&'static str>, Vec<&'static str>), String> {
        let Some((run, command)) = &self.reload_from else {
            return Err("no configuration to reload from".into());
        };
        let new = Settings::from_cli_text(run, command, text).map_err(|e| e.to_string())?;
        let (restart_needed, changed): (Vec<&str>, Vec<&str>) = new
            .differences(&self.settings)
            .into_iter()
            .partition(|name| NEEDS_RESTART.contains(name));
        Ok((new, changed, restart_needed))
    }

    fn try_reload(&mut self) -> Result<serde_json::Value, String> {
        let (new, changed, restart_needed) = self.read_config(None)?;
        let old = &self.settings;
        let argv = match &new.command {
            _ if !changed.contains(&"command") => self.argv.clone(),
            Some(c) => c.clone(),
            None => vec![
                std::env::current_exe()
                    .map_err(|e| format!("cannot find lb's own executable: {e}"))?
                    .to_string_lossy()
                    .into_owned(),
                "builtin-worker".into(),
            ],
        };
        let roll = changed.contains(&"command") || changed.contains(&"user");
        let scale = changed.contains(&"workers").then_some(new.workers);
        // What needs a restart keeps its running value.
        let applied = Settings {
            listen: old.listen,
            metrics: old.metrics,
            control: old.control.clone(),
            backlog: old.backlog,
            log_format: old.log_format,
            serialization: old.serialization,
            steering: old.steering,
            handoff: old.handoff.clone(),
            ..new
        };
        self.fleet.reconfigure(fleet_config(&applied, &argv));
        self.router.reconfigure(&applied);
        self.settings = applied;
        self.argv = argv;
        let now = Instant::now();
        if let Some(n) = scale {
            self.fleet.scale(n, now);
        }
        if roll {
            self.fleet.roll(now);
        }
        self.apply();
        Ok(serde_json::json!({"changed": changed, "restart_needed": restart_needed}))
    }

    /// The bounds of a dispatch task.
    fn limits(&self) -> dispatch::Limits {
        dispatch::Limits {
            window: self.settings.max_pending,
            max_line: DEFAULT_MAX_LINE,
            stall_timeout: self.settings.stall_timeout,
            serialization: self.settings.serialization,
            handoff: self.settings.handoff.clone(),
        }
    }

    /// SIGHUP or `lb reload`: with an executable to re-execute (and master steering), an
    /// in-place upgrade (DESIGN §10); otherwise the configuration is reloaded in place.
    fn request_reload(
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
        let report = match self.config_text().and_then(|text| {
            let report = self.diff_config(text.as_deref())?;
            Ok((text, report))
        }) {
            Ok((text, report)) => {
                if self.reload_wanted.is_some() && text != self.reload_text {
                    self.check_again();
                }
                self.reload_text = text;
                report
            }
            Err(e) => {
                self.shared.metrics.reload(false);
                tracing::warn!("{why}: reload failed, running as before: {e}");
                return answer(reply, Err(e));
            }
        };
        if let Some(reply) = reply {
            self.reload_replies.push((reply, report));
        }
        if self.reload_wanted.is_none() {
            if let Some(n) = &self.notify {
                n.reloading();
            }
            self.reload_wanted = Some(why);
            self.reload_wait_logged = false;
        }
    }

    /// What a reload would change: `{changed, restart_needed}`, or the configuration's error.
    fn diff_config(&self, text: Option<&str>) -> Result<serde_json::Value, String> {
        let (_, changed, restart_needed) = self.read_config(text)?;
        Ok(serde_json::json!({"changed": changed, "restart_needed": restart_needed}))
    }

    /// The config file's text (`None`: lb runs without one).
    fn config_text(&self) -> Result<Option<String>, String> {
        self.reload_from
            .as_ref()
            .and_then(|(run, _)| run.config.as_deref())
            .map(crate::config::read_text)
            .transpose()
            .map_err(|e| e.to_string())
    }

    /// The config file changed again during a reload: the preflight checks the new text before
    /// lb re-executes (a settle in progress stops; lb accepts meanwhile).
    fn check_again(&mut self) {
        tracing::info!("the config file changed again during the reload: it is checked again");
        if self.preflight_running {
            self.recheck = true;
            return;
        }
        self.unsettle();
    }

    /// Back to before the preflight's verdict: no settle in progress or planned, accepting.
    fn unsettle(&mut self) {
        self.checked = false;
        self.settling_until = None;
        self.settle_tries = 0;
        self.settle_retry_at = None;
        self.shared.pause_admin(false);
    }

    /// Moves a requested in-place upgrade on: preflight once the fleet is steady, then settle,
    /// then re-execute.
    async fn advance_reload(
        &mut self,
        why: &'static str,
        listener_fd: Option<std::os::fd::RawFd>,
        now: Instant,
    ) {
        if self.fleet.shutting_down() {
            return self.reload_failed(why, "lb is shutting down".into());
        }
        if let Some(until) = self.settling_until {
            if self.fleet.steady()
                && self.router.quiescent()
                && self.acceptor.waiting() == 0
                && self.shared.admin_open() == 0
            {
                // `Err(None)`: not settled after all; tried again on the next pass, until the
                // deadline.
                if let Err(Some(e)) = self.take_over(listener_fd).await {
                    self.reload_failed(why, e);
                }
            } else if now >= until || !self.fleet.steady() {
                // A worker that does not answer (stopped, busy) or one that changed state:
                // accept again, and try later.
                self.settling_until = None;
                self.shared.pause_admin(false);
                if self.settle_tries >= SETTLE_TRIES {
                    self.reload_failed(
                        why,
                        format!(
                            "connections in flight were not settled ({SETTLE_TRIES} tries of {SETTLE_LIMIT:?})"
                        ),
                    );
                } else {
                    tracing::info!(
                        "{why}: handoffs in flight not settled; accepting again, the reload is tried again in {SETTLE_RETRY:?}"
                    );
                    self.settle_retry_at = Some(now + SETTLE_RETRY);
                }
            }
            return;
        }
        if self.preflight_running {
            return;
        }
        if self.checked {
            if self.fleet.steady() && self.settle_retry_at.is_none_or(|t| now >= t) {
                self.start_settle(now);
            }
            return;
        }
        if !self.fleet.steady() {
            if !self.reload_wait_logged {
                self.reload_wait_logged = true;
                tracing::info!(
                    "{why}: the reload waits for the workers to settle (a rolling restart, a scale or a start in progress)"
                );
            }
            return;
        }
        let Some(t) = &self.takeover else { return };
        match upgrade::preflight(t.exe.clone(), &t.args, self.reload_text.as_deref()) {
            Ok((pid, done)) => {
                // Reaped by its task, not as an orphan.
                self.worker_pids.insert(pid);
                self.preflight_running = true;
                let tx = self.preflight_tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send((pid, done.await));
                });
            }
            Err(e) => self.reload_failed(why, e),
        }
    }

    /// The preflight finished: settle and re-execute, or carry on as before.
    fn preflight_done(&mut self, (pid, checked): (u32, Result<(), String>)) {
        self.preflight_running = false;
        self.worker_pids.remove(&pid);
        let Some(why) = self.reload_wanted else {
            return;
        };
        if std::mem::take(&mut self.recheck) {
            return; // a verdict on an older text: the next pass checks the new one
        }
        match checked {
            Ok(()) => {
                self.checked = true;
                self.start_settle(Instant::now());
                for (reply, report) in self.reload_replies.drain(..) {
                    let _ = reply.send(Ok(report));
                }
            }
            Err(e) => self.reload_failed(why, e),
        }
    }

    /// Stops accepting until what is in flight is settled (then lb re-executes).
    fn start_settle(&mut self, now: Instant) {
        self.settle_tries += 1;
        self.settle_retry_at = None;
        self.settling_until = Some(now + SETTLE_LIMIT);
        self.shared.pause_admin(true);
    }

    /// The in-place upgrade did not happen: one line, counted, and lb carries on as it was.
    fn reload_failed(&mut self, why: &str, e: String) {
        tracing::warn!("{why}: reload failed, running as before: {e}");
        self.shared.metrics.reload(false);
        self.reload_wanted = None;
        self.reload_text = None;
        self.recheck = false;
        self.unsettle();
        self.ready_notified = false; // READY=1 again after RELOADING=1
        for (reply, _) in self.reload_replies.drain(..) {
            let _ = reply.send(Err(e.clone()));
        }
    }

    /// Re-executes lb in place with the workers' channels; returns only if that did not
    /// happen (every worker is then served as before): `Err(None)` if something was still in
    /// flight after all (the caller tries again), `Err(Some(why))` if the exec failed.
    async fn take_over(
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
            self.on_dispatch(ev);
        }
        if !self.router.quiescent() || !self.fleet.steady() {
            self.resume_workers(carried);
            return Err(None);
        }
        let carried: Vec<_> = carried
            .into_iter()
            .filter_map(|(a, s)| Some((a, s, self.router.carry(a.id)?.1)))
            .collect();
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
            ],
            config: self.reload_text.clone(),
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
            counters: self.shared.metrics.carry(),
        };
        tracing::info!(
            "re-executing {} in place with {} workers (lb {})",
            t.exe.display(),
            state.workers.len(),
            crate::VERSION
        );
        let err = upgrade::exec(&t.exe, &t.args, &state);
        self.resume_workers(carried.into_iter().map(|(a, s, _)| (a, s)).collect());
        Err(Some(format!("cannot execute {}: {err}", t.exe.display())))
    }

    /// Serves surrendered channels again (the exec did not happen).
    fn resume_workers(&mut self, carried: Vec<(super::Adopted, dispatch::Surrendered)>) {
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
    fn resume(&mut self, state: upgrade::State) {
        let now = Instant::now();
        self.shared.metrics.restore(&state.counters);
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
            adopted.push(super::Adopted {
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
        self.fleet = Fleet::resume(fleet_config(&running, &self.argv), &adopted, now);
        let mut applied = Vec::new();
        if self.settings.workers != total {
            self.fleet.scale(self.settings.workers, now);
            applied.push(format!("workers {total} → {}", self.settings.workers));
        }
        let user = self.settings.user.as_ref().map(|u| u.name.clone());
        if (state.argv != self.argv || state.user != user) && !adopted.is_empty() {
            self.fleet.roll(now);
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

    /// Workers lb's previous image started are not tokio's children here: their exits are
    /// collected by pid.
    fn check_adopted(&mut self) {
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

    /// Runs until a graceful shutdown completes, taking commands from the control socket.
    pub async fn run(
        mut self,
        listener: Option<Listener>,
        group: Option<steering::Group>,
        mut commands: Option<mpsc::UnboundedReceiver<control::Command>>,
    ) -> std::io::Result<()> {
        let mut roll_waiters: Vec<oneshot::Sender<Result<(), String>>> = Vec::new();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut usr2 = signal(SignalKind::user_defined2())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut chld = signal(SignalKind::child())?;
        // Signals that arrived while lb re-executed itself were blocked across the exec: they are
        // delivered now that they are handled.
        upgrade::unblock_signals();
        let listener_fd = listener.as_ref().map(|l| l.fd().as_raw_fd());
        self.listen_addr = match (&listener, &group) {
            (Some(l), _) => l.local_addr().ok(),
            (None, Some(g)) => Some(g.local_addr()),
            (None, None) => None,
        };
        self.group = group;
        if let Some(state) = self.resume_state.take() {
            self.resume(state);
        }
        let mut listener = listener;
        let mut next_housekeeping = Instant::now() + HOUSEKEEPING;
        self.apply();
        // One timer for every deadline, reset only when the earliest deadline changes (the hot
        // path — accept, hand off, ACK — then touches no timer at all).
        let mut armed = next_housekeeping;
        let timer = tokio::time::sleep_until(armed.into());
        tokio::pin!(timer);
        loop {
            let now = Instant::now();
            let paused = self.acceptor.paused(now);
            if now >= next_housekeeping {
                self.housekeeping(now);
                next_housekeeping = now + HOUSEKEEPING;
            }
            if let Some(every) = self.settings.heartbeat_ping
                && self.next_ping.is_none_or(|t| now >= t)
            {
                self.next_ping = Some(now + every);
                let ping = self.settings.serialization.encode_line(PING).into_owned();
                self.router.broadcast(&ping.into());
            }
            self.fleet.tick(now);
            self.router.expire(now);
            self.apply();
            if !roll_waiters.is_empty() && !self.fleet.rolling() {
                let outcome = self
                    .fleet
                    .roll_outcome()
                    .cloned()
                    .unwrap_or_else(|| Err("no rolling restart ran".into()));
                for w in roll_waiters.drain(..) {
                    let _ = w.send(outcome.clone());
                }
            }
            self.notify_manager(now);
            self.steer(now);
            if let Some(why) = self.reload_wanted {
                self.advance_reload(why, listener_fd, now).await;
            }
            if self.fleet.shutting_down() {
                listener = None; // stop accepting: close the listening socket
                if let Some(g) = &mut self.group {
                    g.close();
                }
                if self.fleet.is_done() {
                    break;
                }
            }
            let deadline = [
                self.fleet.next_deadline(),
                self.router.next_deadline(),
                self.acceptor.deadline(),
                self.next_ping,
                self.next_watchdog,
                self.next_steer_check,
                // Settling: look again every millisecond (admin connections closing and the
                // dispatch tasks' answers wake nothing else).
                self.settling_until.map(|_| now + SETTLE_POLL),
                self.settle_retry_at,
            ]
            .into_iter()
            .flatten()
            .fold(next_housekeeping, Instant::min)
            .max(now);
            if deadline != armed {
                armed = deadline;
                timer.as_mut().reset(armed.into());
            }
            // Settling before an in-place upgrade: new connections wait in the backlog.
            let accepting = listener.is_some() && !paused && self.settling_until.is_none();
            // Kernel steering: the master empties the queues of slots outside the program.
            let down = match &self.group {
                Some(g) if !paused && !self.fleet.shutting_down() => g.down(),
                _ => Vec::new(),
            };
            tokio::select! {
                biased;
                Some(ev) = self.reports_rx.recv() => {
                    self.on_dispatch(ev);
                    // Drain what else is queued before going back to accepting.
                    while let Ok(ev) = self.reports_rx.try_recv() { self.on_dispatch(ev); }
                }
                Some((id, pid, status)) = self.exits_rx.recv() => self.on_exit(id, pid, status),
                Some(checked) = self.preflight_rx.recv() => self.preflight_done(checked),
                Some(done) = self.acceptor.waited() => {
                    let router = &mut self.router;
                    self.acceptor.ready(done, &self.shared.metrics, &mut |h| router.route(h, None));
                }
                ready = async { listener.as_ref().expect("guarded").ready().await }, if accepting => {
                    match ready {
                        Ok(mut guard) => self.accept_batch(&mut guard),
                        Err(e) => {
                            tracing::error!("listener failed: {e}");
                            self.acceptor.pause(Instant::now());
                        }
                    }
                }
                slot = steering::any_ready(&down), if !down.is_empty() => {
                    if let Some(l) = self.group.as_ref().and_then(|g| g.get(slot))
                        && let Ok(mut guard) = l.ready().await
                    {
                        self.accept_batch(&mut guard);
                    }
                }
                _ = term.recv() => self.begin_shutdown("SIGTERM"),
                _ = int.recv() => self.begin_shutdown("SIGINT"),
                _ = usr2.recv() => self.fleet.roll(Instant::now()),
                Some(cmd) = async { commands.as_mut().expect("guarded").recv().await }, if commands.is_some() => match cmd {
                    control::Command::Roll(reply) => {
                        if self.fleet.shutting_down() {
                            let _ = reply.send(Err("lb is shutting down".into()));
                        } else {
                            self.fleet.roll(Instant::now());
                            self.apply();
                            roll_waiters.push(reply);
                        }
                    }
                    control::Command::Stop => self.begin_shutdown("lb stop"),
                    control::Command::Reload(reply) => self.request_reload("lb reload", Some(reply)),
                    control::Command::Scale(n, reply) => {
                        if self.fleet.shutting_down() {
                            let _ = reply.send(Err("lb is shutting down".into()));
                        } else {
                            self.fleet.scale(n, Instant::now());
                            self.apply();
                            let _ = reply.send(Ok(()));
                        }
                    }
                },
                _ = chld.recv() => {
                    self.check_adopted();
                    reaper::reap_orphans(&self.worker_pids);
                }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP received: reloading the configuration");
                    self.request_reload("SIGHUP", None);
                }
                () = &mut timer => {
                    // Fired: arm far ahead until the next pass computes the real deadline.
                    armed = Instant::now() + HOUSEKEEPING;
                    timer.as_mut().reset(armed.into());
                }
            }
        }
        // What the workers left behind (double-forked daemons re-parented to lb) goes too.
        reaper::kill_orphans(&self.worker_pids, ORPHAN_KILL_LIMIT);
        tracing::info!("all workers exited; bye");
        Ok(())
    }

    fn accept_batch(
        &mut self,
        guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, socket2::Socket>,
    ) {
        let router = &mut self.router;
        self.acceptor
            .accept_batch(guard, &self.settings, &self.shared.metrics, &mut |h| {
                router.route(h, None)
            });
    }

    fn on_dispatch(&mut self, ev: dispatch::Event) {
        let dispatch::Event { id, report } = ev;
        let metrics = &self.shared.metrics;
        match report {
            Report::Acked { accepted } => {
                self.router.acked(id, accepted);
                self.settle(id);
            }
            Report::Nacked => metrics.failure(Failure::Nack, 1),
            Report::Returned(conns, why) => {
                self.router.returned(id, conns, why);
                self.settle(id);
            }
            Report::Message(m) => {
                let now = Instant::now();
                if !self.router.message(id, &m) {
                    match m {
                        WorkerMsg::Heartbeat => self.fleet.on_heartbeat(id, now),
                        WorkerMsg::Ready => self.fleet.on_ready(id, now),
                        WorkerMsg::Leaving => {
                            self.fleet.on_leaving(id, now, "its app closed its server")
                        }
                        _ => {}
                    }
                }
                self.fleet.on_alive(id, now);
                if self.group.is_some() {
                    // Kernel steering: a worker that stopped accepting speaks again.
                    self.fleet.on_recovered(id);
                }
            }
            Report::Stalled => self.fleet.on_stalled(id, self.settings.stall_timeout),
            Report::Recovered => self.fleet.on_recovered(id),
            Report::Desync => {
                metrics.dropped(Dropped::Desync);
                self.fleet.on_desync(id, Instant::now());
            }
            Report::TooLong => metrics.dropped(Dropped::TooLong),
            Report::StrayFd => metrics.dropped(Dropped::StrayFd),
            Report::Cluster(m) => self.on_cluster(id, m),
            Report::Closed => {
                self.fleet.on_channel_closed(id, Instant::now());
                self.router.closed(id);
            }
        }
        self.apply();
    }

    /// During a shutdown, a worker spared SIGTERM gets it once its handoffs are answered.
    fn settle(&mut self, id: WorkerId) {
        if self.fleet.shutting_down() && !self.router.busy(id) {
            self.fleet.on_settled(id, Instant::now());
        }
    }

    /// A message of Node's cluster protocol, answered as Node's primary does.
    fn on_cluster(&mut self, id: WorkerId, m: ClusterMsg) {
        let now = Instant::now();
        match m {
            ClusterMsg::Online => self.fleet.on_cluster_online(id),
            ClusterMsg::QueryServer(q) => self.query_server(id, q),
            ClusterMsg::Listening { key } => {
                if self.router.rr_listening(id, &key) {
                    // Listening on lb's port: ready (with or without --wait-ready).
                    self.fleet.on_ready(id, now);
                }
            }
            ClusterMsg::Close { key } => self.router.rr_closed(id, &key),
            ClusterMsg::ExitedAfterDisconnect { .. } => {
                self.fleet.on_leaving(id, now, "cluster disconnect")
            }
            ClusterMsg::NewconnReply { .. } | ClusterMsg::Other => {
                self.shared.metrics.dropped(Dropped::Ignored)
            }
            ClusterMsg::Malformed(why) => {
                self.shared.metrics.dropped(Dropped::Malformed);
                if self.malformed_log.hit(now).is_some() {
                    tracing::warn!(
                        slot = id.slot,
                        "malformed cluster message from a worker ({why}); ignored (logged at most every 5s)"
                    );
                }
            }
        }
        self.apply();
    }

    /// A cluster worker called `listen()`. On lb's port its server is attached to lb's
    /// listener (connections come as `newconn`, chosen by lb's policy); on any other TCP address
    /// lb opens that socket once per key and shares it, as Node's primary would (the kernel
    /// balances those connections, not lb); pipes and UDP are refused with ENOTSUP.
    fn query_server(&mut self, id: WorkerId, q: ServerQuery) {
        let Some(d) = self.router.dispatch(id).cloned() else {
            return;
        };
        let lb = self.listen_addr;
        if let Some(lb) = lb
            && q.is_tcp()
            && q.port == i64::from(lb.port())
            && let Some(g) = &mut self.group
        {
            // Kernel steering: the worker's server gets the slot's own listener and accepts
            // from it (like Node's SCHED_NONE, but the kernel picks by client IP).
            let fd = g.listener(id.slot).and_then(|fd| fd.try_clone_to_owned());
            return match fd {
                Ok(fd) => {
                    // What the master hands this worker itself (a down slot's queue) goes to
                    // the same server, as a `newconn`.
                    self.router.rr_answered(id, q.key.clone());
                    d.cluster(ClusterOut::Shared { query: q, fd })
                }
                Err(e) => {
                    tracing::warn!(slot = id.slot, "cannot share the slot's listener: {e}");
                    d.cluster(ClusterOut::Error {
                        query: q,
                        errno: e.raw_os_error().unwrap_or(libc::EINVAL),
                    })
                }
            };
        }
        if let Some(lb) = lb
            && q.is_tcp()
            && q.port == i64::from(lb.port())
        {
            self.router.rr_answered(id, q.key.clone());
            return d.cluster(ClusterOut::RrReply {
                query: q,
                listener: lb,
            });
        }
        if !q.is_tcp() {
            tracing::warn!(
                slot = id.slot,
                "a worker listens on {} (a pipe or UDP): not supported under lb, refused with ENOTSUP",
                q.key
            );
            return d.cluster(ClusterOut::Error {
                query: q,
                errno: libc::ENOTSUP,
            });
        }
        let socket = match self.shared_listeners.get(&q.key) {
            Some(s) => s.try_clone(),
            None => match bind_shared(&q) {
                Ok(s) => {
                    let addr = s.local_addr().ok().and_then(|a| a.as_socket());
                    tracing::info!(
                        slot = id.slot,
                        "a worker listens on {} itself (not lb's port {}): served as a shared socket, balanced by the kernel, not sticky",
                        addr.map_or_else(|| q.key.clone(), |a| a.to_string()),
                        lb.map_or(0, |a| a.port())
                    );
                    let dup = s.try_clone();
                    self.shared_listeners.insert(q.key.clone(), s);
                    dup
                }
                Err(e) => Err(e),
            },
        };
        match socket {
            Ok(s) => d.cluster(ClusterOut::Shared {
                query: q,
                fd: s.into(),
            }),
            Err(e) => {
                tracing::warn!(
                    slot = id.slot,
                    "cannot listen on {} for a worker: {e}",
                    q.key
                );
                d.cluster(ClusterOut::Error {
                    query: q,
                    errno: e.raw_os_error().unwrap_or(libc::EINVAL),
                });
            }
        }
    }

    /// Kernel steering: attaches the program for the slots that are up whenever that set
    /// changes, and (every quarter `--stall-timeout`) marks stalled a live slot whose accept
    /// queue has stayed non-empty that long, so its clients move on and the master empties it.
    fn steer(&mut self, now: Instant) {
        let Some(g) = &mut self.group else { return };
        if self.fleet.shutting_down() {
            return;
        }
        let stall = self.settings.stall_timeout;
        if self.next_steer_check.is_none_or(|t| now >= t) {
            self.next_steer_check = Some(
                now + (stall / 4).clamp(Duration::from_millis(10), Duration::from_millis(250)),
            );
            // A worker that used CPU since the last check is working through its queue.
            self.steer_cpu.resize(self.fleet.len(), None);
            for slot in 0..self.fleet.len() {
                let ticks = self.fleet.view(slot).pid.and_then(procfs::cpu_ticks);
                if ticks != self.steer_cpu[slot] {
                    self.steer_cpu[slot] = ticks;
                    g.progress(slot);
                }
            }
            let stuck = g.stuck(now, stall);
            for &slot in &stuck {
                if let Some(id) = self.fleet.view(slot).current {
                    self.fleet.on_stalled(id, stall);
                }
            }
            if !stuck.is_empty() {
                // The router must know before the master takes those slots' queues.
                self.apply();
            }
        }
        let Some(g) = &mut self.group else { return };
        let live: Vec<usize> = (0..self.fleet.len())
            .filter(|&s| self.fleet.view(s).up())
            .collect();
        match g.steer(live.clone()) {
            Ok(true) => tracing::debug!(?live, "kernel steering: program attached"),
            Ok(false) => {}
            Err(e) => tracing::error!("kernel steering: cannot attach the program: {e}"),
        }
    }

    /// systemd: `READY=1` once a worker is ready (lb accepts from the start), and the watchdog.
    fn notify_manager(&mut self, now: Instant) {
        let Some(n) = &self.notify else { return };
        if !self.ready_notified && !self.fleet.shutting_down() && self.shared.any_ready() {
            self.ready_notified = true;
            let ready = (0..self.fleet.len())
                .filter(|&i| self.shared.metrics.slot(i).up.get() > 0)
                .count();
            n.send(&format!(
                "READY=1\nSTATUS=serving: {ready} of {} workers ready",
                self.fleet.len()
            ));
        }
        if let Some(every) = n.watchdog
            && self.next_watchdog.is_none_or(|t| now >= t)
        {
            n.send("WATCHDOG=1");
            self.next_watchdog = Some(now + every);
        }
    }

    fn on_exit(&mut self, id: WorkerId, pid: u32, status: Option<ExitStatus>) {
        self.worker_pids.remove(&pid);
        let how = status.map_or_else(|| "unknown status".to_string(), describe_status);
        self.fleet.on_exit(id, &how, Instant::now());
        self.router.exited(id);
        self.apply();
    }

    fn begin_shutdown(&mut self, why: &str) {
        if let Some(n) = &self.notify
            && !self.fleet.shutting_down()
        {
            n.send(&format!("STOPPING=1\nSTATUS=shutting down ({why})"));
        }
        if !self.fleet.shutting_down() {
            // (The fleet logs the one "graceful shutdown" line, with its timeout.)
            // Hand what waits to a ready worker first (or close it): those workers get SIGTERM
            // only once they have answered.
            self.router.close();
        }
        let router = &self.router;
        self.fleet
            .shutdown(why, Instant::now(), |id| router.busy(id));
        self.apply();
    }

    /// Memory sampling (and the memory limit) and socket-count queries.
    fn housekeeping(&mut self, now: Instant) {
        for slot in 0..self.fleet.len() {
            let view = self.fleet.view(slot);
            let (Some(id), Some(pid)) = (view.current, view.pid) else {
                self.shared.metrics.slot(slot).memory.set(0);
                continue;
            };
            let rss = procfs::rss_bytes(pid).unwrap_or(0);
            self.shared.metrics.slot(slot).memory.set(rss as i64);
            self.fleet.on_rss(id, rss, now);
        }
        // In case a SIGCHLD was coalesced with one tokio consumed for a worker.
        self.check_adopted();
        reaper::reap_orphans(&self.worker_pids);
        // An unmodified Node worker counts the sockets we sent it: ask.
        self.router.query_socket_counts();
        self.look_for_silent_workers(now);

        self.apply();
    }

    /// A worker that took connections and answers none of them (likely a sticky library that
    /// expects another `--handoff`) is named once, [`silence::AFTER`] after its first handoff.
    fn look_for_silent_workers(&mut self, now: Instant) {
        let due = self.router.due_for_silence_check(now);
        if due.is_empty() {
            return;
        }
        let flows = match crate::tcpdiag::flows() {
            Ok(f) => f,
            Err(e) => {
                return tracing::debug!("cannot ask the kernel about handed connections: {e}");
            }
        };
        for (id, handed, sample) in due {
            if !silence::serves_none(&sample, |k| flows.get(k).copied()) {
                continue;
            }
            let pid = self.fleet.view(id.slot).pid.unwrap_or(0);
            tracing::warn!(
                slot = id.slot,
                pid,
                "worker {} took {handed} connection(s) and serves none: their clients sent \
                 requests {:?} ago and got no byte back, and the worker reported nothing. Does it \
                 expect another --handoff (sticky:balance for the sticky-session package, \
                 socket.io for @socket.io/sticky)? It is given {:?}",
                id.slot,
                silence::AFTER,
                self.settings.handoff.as_str()
            );
        }
    }

    /// Carries out what the fleet asks for.
    fn apply(&mut self) {
        while let Some(action) = self.fleet.poll_action() {
            match action {
                Action::Spawn(id) => self.spawn(id, Instant::now()),
                Action::Signal { pid, sig, .. } => spawn::signal_group(
                    pid,
                    match sig {
                        Sig::Term => Signal::SIGTERM,
                        Sig::Kill => Signal::SIGKILL,
                    },
                ),
                Action::Detach(id) => self.router.detach(id),
                Action::Disconnect(id) => {
                    if let Some(d) = self.router.dispatch(id) {
                        d.cluster(ClusterOut::Disconnect);
                    }
                }
                Action::Publish(slot) => {
                    let view = self.fleet.view(slot);
                    let sm = self.shared.metrics.slot(slot);
                    sm.up.set(view.up() as i64);
                    sm.set_state(view.state.as_str());
                    self.shared.set_slot(
                        slot,
                        crate::metrics::SlotView {
                            pid: view.pid,
                            state: view.state.as_str(),
                            started: view.started,
                            generation: view.current.map_or(0, |w| w.generation),
                        },
                    );
                    self.router.publish(slot, &view);
                }
                Action::Restarted(slot) => self.shared.metrics.slot(slot).restarts.inc(),
                Action::Resized(total) => {
                    // Slots scaled away keep their counters; their gauges say they are gone.
                    let before = self.shared.table.lock().map_or(0, |t| t.len());
                    for slot in total..before {
                        let sm = self.shared.metrics.slot(slot);
                        sm.set_state("exited");
                        sm.up.set(0);
                        sm.active.set(0);
                        sm.memory.set(0);
                    }
                    self.shared.resize(total);
                    self.router.resize(self.fleet.active(), total);
                }
            }
        }
    }

    fn spawn(&mut self, id: WorkerId, now: Instant) {
        // Workers built on lb::worker beat three times per heartbeat timeout (with kernel
        // steering, twice per stall timeout: a beat is how a stalled worker says it is back).
        let mut beat = self.settings.heartbeat_timeout / 3;
        if self.group.is_some() {
            beat = beat.min(self.settings.stall_timeout / 2);
        }
        let beat_ms = beat.as_millis().max(10).to_string();
        let unique_id = self.next_unique_id;
        self.next_unique_id += 1;
        let mut vars = vec![
            (
                env::NODE_CHANNEL_SERIALIZATION_MODE,
                self.settings.serialization.as_str().to_owned(),
            ),
            (env::LB_HEARTBEAT_MS, beat_ms),
            (
                env::LB_CLIENT_HEADER_TIMEOUT_MS,
                self.settings.client_header_timeout.as_millis().to_string(),
            ),
            (
                env::LB_KEEPALIVE_TIMEOUT_MS,
                self.settings.keepalive_timeout.as_millis().to_string(),
            ),
            (env::NODE_UNIQUE_ID, unique_id.to_string()),
        ];
        // The port to listen() on to be served through lb: `LB_PORT`, and `PORT` unless lb's
        // own environment sets one.
        if let Some(port) = self.listen_addr.map(|a| a.port().to_string()) {
            if std::env::var_os(env::PORT).is_none() {
                vars.push((env::PORT, port.clone()));
            }
            vars.push((env::LB_PORT, port));
        }
        let listener = match self.group.as_mut().map(|g| g.listener(id.slot)) {
            Some(Ok(fd)) => Some(fd),
            Some(Err(e)) => {
                tracing::error!(slot = id.slot, "cannot open the slot's listener: {e}");
                return self.fleet.spawn_failed(id, now);
            }
            None => None,
        };
        let spawned = match spawn::spawn_worker(
            &self.argv,
            id.slot,
            &vars,
            self.settings.user.as_ref(),
            listener,
        ) {
            Ok(sp) => sp,
            Err(e) => {
                tracing::error!(
                    slot = id.slot,
                    "cannot start worker `{}`: {e}",
                    self.argv[0]
                );
                return self.fleet.spawn_failed(id, now);
            }
        };
        let handle = dispatch::start(id, spawned.channel, self.reports_tx.clone(), self.limits());
        self.router.attach(id, handle);
        let mut child = spawned.child;
        let exits = self.exits_tx.clone();
        let pid = spawned.pid;
        self.worker_pids.insert(pid);
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            // The worker's own children die with it (they are in its process group).
            reaper::kill_group_leftovers(pid);
            let _ = exits.send((id, pid, status));
        });
        self.fleet.spawned(id, spawned.pid, now);
    }
}

/// Opens the listening socket a cluster worker asked for (Node's primary binds `[::]` for a
/// `listen(port)` without a host).
fn bind_shared(q: &ServerQuery) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let ip: std::net::IpAddr = match q.address.as_deref() {
        Some(a) => a
            .parse()
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL))?,
        None => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let port =
        u16::try_from(q.port).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let addr = SocketAddr::new(ip, port);
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() && q.address.is_none() {
        s.set_only_v6(false)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(511)?;
    Ok(s)
}

fn describe_status(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (_, Some(sig)) => format!(
            "killed by signal {}",
            Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.to_string())
        ),
        _ => s.to_string(),
    }
}

/// The addresses lb actually listens on (for the start-up log line).
pub fn listening_line(listen: SocketAddr, metrics: Option<SocketAddr>) -> String {
    match metrics {
        Some(m) => format!("listening on {listen}, metrics on {m}"),
        None => format!("listening on {listen}, metrics off"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_names_both_addresses() {
        let l = listening_line(
            "127.0.0.1:1".parse().unwrap(),
            Some("127.0.0.1:2".parse().unwrap()),
        );
        assert_eq!(l, "listening on 127.0.0.1:1, metrics on 127.0.0.1:2");
        assert_eq!(
            listening_line("127.0.0.1:1".parse().unwrap(), None),
            "listening on 127.0.0.1:1, metrics off"
        );
    }
}
