//! The master's async shell: one task on one thread that owns all state and does the I/O.
//!
//! [`Master::run`] selects on its sources — the listener (and kernel steering's per-slot
//! listeners), connections done waiting for their first bytes, dispatch reports, worker exits,
//! preflight verdicts, control commands, signals — plus one timer (the minimum of every
//! deadline), and does nothing but translate: connections go to the [`Router`]; lifecycle facts
//! go to the [`Fleet`]; the fleet's [`Action`]s and the reload's steps are carried out. There are
//! no locks on the data path; the admin endpoint reads [`Shared`].
//!
//! Each concern is a child module (one `impl Master` each):
//! - `accept` — the acceptor: batches, EMFILE pause, the bounded wait set for first bytes
//!   (PROXY headers, socket.io sids), rate-limited logs;
//! - `reload` — reloading and carrying out the in-place upgrade's [`crate::supervisor::reload`]
//!   steps; `takeover` — the exec and, in the new image, resuming and adopted workers' exits;
//! - `commands` — the control socket's verbs and `lb roll` callers;
//! - `cluster` — Node's primary: `queryServer`, shared listeners;
//! - `kernel` — kernel steering's program and stall watch;
//! - `workers` — spawning with the environment contract, exits, silent workers;
//! - `messages` — the dispatch tasks' reports: hand-off answers and worker messages;
//! - `notify` — systemd; `timers` — the periodic timer table.
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
mod appmetrics;
mod cluster;
mod commands;
mod kernel;
mod notify;
mod reload;
mod takeover;
mod timers;
pub use takeover::Takeover;
mod messages;
mod workers;
use workers::fleet_config;

use super::{Action, Fleet, FleetConfig, Sig, WorkerId};
use crate::channel::cluster::ServerQuery;
use crate::channel::{ClusterMsg, DEFAULT_MAX_LINE, WorkerMsg};
use crate::config::{RunArgs, Settings};
use crate::dispatch::{self, ClusterOut, Report};
use crate::listener::Listener;
use crate::loglimit::LogLimit;
use crate::metrics::{Dropped, Failure, Shared};
use crate::router::Router;
use crate::{control, env, output, procfs, reaper, silence, spawn, steering, systemd, upgrade};
use timers::Timer;

/// How often memory is sampled and socket counts asked for.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// How long lb waits at exit for the descendants it killed to be reaped.
const ORPHAN_KILL_LIMIT: Duration = Duration::from_secs(2);
/// How long lb waits at exit, or before an in-place upgrade, for the workers' output to be
/// read and written out.
const OUTPUT_LIMIT: Duration = Duration::from_secs(1);

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
    /// The shell's periodic timers (housekeeping, ping, watchdog, steering check).
    timers: timers::Timers,
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
    /// `--steering kernel`: the per-slot listeners and the program steering them.
    group: Option<steering::Group>,
    /// Each slot's worker's CPU ticks at the last check (progress, for kernel steering).
    steer_cpu: Vec<Option<u64>>,
    /// How to re-execute lb in place (SIGHUP), if it can.
    takeover: Option<Takeover>,
    /// The in-place upgrade in progress (SIGHUP, `lb reload`).
    reload: Option<crate::supervisor::reload::Reload>,
    /// `lb roll` callers, answered when the roll has ended.
    roll_waiters: Vec<oneshot::Sender<Result<(), String>>>,
    /// `lb reload` callers, answered once the preflight passed (or the reload failed).
    reload_replies: Vec<(
        oneshot::Sender<Result<serde_json::Value, String>>,
        serde_json::Value,
    )>,
    /// A preflight (`lb check` of the binary at the start path) is running; it reports here.
    preflight_running: bool,
    preflight_tx: mpsc::UnboundedSender<(u32, Result<(), String>)>,
    preflight_rx: mpsc::UnboundedReceiver<(u32, Result<(), String>)>,
    /// Workers lb's previous image started: their exits are seen with `waitpid`.
    adopted: Vec<(WorkerId, u32)>,
    /// The state lb's previous image left, applied when `run` starts.
    resume_state: Option<upgrade::State>,
    /// The app's prom-client metrics: the collection for scrapes, and gone workers' counters.
    app: crate::appmetrics::collect::Collector<appmetrics::Scrape>,
    /// Scrapes asking for them.
    app_rx: mpsc::UnboundedReceiver<appmetrics::Scrape>,
    /// "left … out of /metrics" lines.
    app_log: LogLimit,
    /// The workers' pipes and their readers (`--worker-output prefix|json`; `None`: inherit).
    output: Option<crate::output::Output>,
}

/// What lb sends for `--heartbeat-ping` (a worker answers `{cmd:'heartbeat'}` the same way).
const PING: &[u8] = b"{\"cmd\":\"heartbeat\"}\n";

impl Master {
    /// Creates the master for `settings`; `argv` is the worker command.
    pub fn new(settings: Settings, argv: Vec<String>, shared: Arc<Shared>) -> Self {
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        let (preflight_tx, preflight_rx) = mpsc::unbounded_channel();
        let (app_tx, app_rx) = mpsc::unbounded_channel();
        let _ = shared.app_metrics.set(app_tx);
        let fleet = Fleet::new(fleet_config(&settings, &argv), Instant::now());
        let settings_app_timeout = settings.app_metrics_timeout;
        let output = start_output(settings.worker_output, &shared);
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
            timers: timers::Timers::default(),
            malformed_log: LogLimit::default(),
            worker_pids: HashSet::new(),
            notify: systemd::Notifier::from_env(),
            ready_notified: false,
            group: None,
            steer_cpu: Vec::new(),
            reload_from: None,
            takeover: None,
            reload_replies: Vec::new(),
            preflight_running: false,
            reload: None,
            roll_waiters: Vec::new(),
            preflight_tx,
            preflight_rx,
            adopted: Vec::new(),
            resume_state: None,
            app: crate::appmetrics::collect::Collector::new(settings_app_timeout),
            app_rx,
            app_log: LogLimit::default(),
            output,
        }
    }

    /// SIGHUP re-executes lb in place with `t` (else it reloads the configuration in place).
    pub fn with_takeover(mut self, t: Takeover) -> Self {
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

    /// Runs until a graceful shutdown completes, taking commands from the control socket.
    pub async fn run(
        mut self,
        listener: Option<Listener>,
        group: Option<steering::Group>,
        mut commands: Option<mpsc::UnboundedReceiver<control::Command>>,
    ) -> std::io::Result<()> {
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
        self.timers
            .set(Timer::Housekeeping, Instant::now() + HOUSEKEEPING);
        self.apply();
        // One timer for every deadline, reset only when the earliest deadline changes (the hot
        // path — accept, hand off, ACK — then touches no timer at all).
        let mut armed = Instant::now() + HOUSEKEEPING;
        let timer = tokio::time::sleep_until(armed.into());
        tokio::pin!(timer);
        loop {
            let now = Instant::now();
            let paused = self.acceptor.paused(now);
            if self.timers.due(Timer::Housekeeping, now) {
                self.housekeeping(now);
                self.timers.set(Timer::Housekeeping, now + HOUSEKEEPING);
            }
            if let Some(every) = self.settings.heartbeat_ping
                && self.timers.due(Timer::Ping, now)
            {
                self.timers.set(Timer::Ping, now + every);
                let ping = self.settings.serialization.encode_line(PING).into_owned();
                self.router.broadcast(&ping.into());
            }
            self.fleet.tick(now);
            self.router.expire(now);
            self.finish_scrape(now);
            self.apply();
            self.answer_roll_waiters();
            self.notify_manager(now);
            self.steer(now);
            self.drive_reload(listener_fd, now).await;
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
                self.timers.next(),
                self.reload.as_ref().and_then(|r| r.poll_timeout(now)),
                self.app.deadline(),
            ]
            .into_iter()
            .flatten()
            .fold(now + HOUSEKEEPING, Instant::min)
            .max(now);
            if deadline != armed {
                armed = deadline;
                timer.as_mut().reset(armed.into());
            }
            // Settling before an in-place upgrade: new connections wait in the backlog.
            let accepting = listener.is_some() && !paused && !self.settling();
            // Kernel steering: the master empties the queues of slots outside the program.
            let down = match &self.group {
                Some(g) if !paused && !self.fleet.shutting_down() => g.down(),
                _ => Vec::new(),
            };
            tokio::select! {
                biased;
                Some(ev) = self.reports_rx.recv() => {
                    let now = Instant::now();
                    self.on_dispatch(ev, now);
                    // Drain what else is queued before going back to accepting.
                    while let Ok(ev) = self.reports_rx.try_recv() { self.on_dispatch(ev, now); }
                }
                Some((id, pid, status)) = self.exits_rx.recv() => {
                    self.on_exit(id, pid, status, Instant::now())
                }
                Some(checked) = self.preflight_rx.recv() => self.preflight_done(checked),
                Some(reply) = self.app_rx.recv() => self.on_scrape(reply, Instant::now()),
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
                _ = term.recv() => self.begin_shutdown("SIGTERM", Instant::now()),
                _ = int.recv() => self.begin_shutdown("SIGINT", Instant::now()),
                _ = usr2.recv() => self.fleet.roll("SIGUSR2", Instant::now()),
                Some(cmd) = async { commands.as_mut().expect("guarded").recv().await }, if commands.is_some() => {
                    self.on_command(cmd, Instant::now());
                }
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
        // The workers' last lines, still in their pipes, are written out.
        if let Some(o) = self.output.as_mut() {
            o.finish(OUTPUT_LIMIT).await;
        }
        if let Some(why) = self.fleet.gave_up() {
            return Err(std::io::Error::other(self.give_up_line(why)));
        }
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

    fn begin_shutdown(&mut self, why: &str, now: Instant) {
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
        self.fleet.shutdown(why, now, |id| router.busy(id));
        self.apply();
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
                    // Slots scaled away (their workers gone) have no series left.
                    self.shared.metrics.remove_slots_from(total);
                    self.shared.logs.remove_slots_from(total);
                    self.shared.resize(total);
                    self.router.resize(self.fleet.active(), total);
                }
            }
        }
    }
}

/// `--worker-output`: the pipes' writer, unless the workers inherit lb's stdout and stderr (or
/// the writer cannot start: then they do, and lb says so).
fn start_output(mode: output::Mode, shared: &Shared) -> Option<output::Output> {
    output::Output::start(mode, shared.logs.clone()).unwrap_or_else(|e| {
        tracing::error!(
            "cannot start the worker output writer: {e}; the workers write to lb's stdout and \
             stderr themselves"
        );
        shared.logs.set_mode(output::Mode::Inherit);
        None
    })
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
