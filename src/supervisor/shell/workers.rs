//! Starting workers with the environment contract ([`crate::env`]), seeing them exit (and the
//! line lb stops with when none can start), the once-a-second look at them (memory, orphans,
//! socket counts) and at workers that serve nobody ([`crate::silence`]).

use std::process::ExitStatus;
use std::time::Instant;

use super::*;

impl Master {
    /// Memory sampling (and the memory limit) and socket-count queries.
    pub(super) fn housekeeping(&mut self, now: Instant) {
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
        // An unmodified Node worker counts the sockets we sent it: ask. A cluster worker
        // counts nothing: the kernel does.
        self.router.query_socket_counts();
        if self.router.counts_in_kernel() {
            match crate::tcpdiag::open_pairs() {
                Ok(open) => self.router.kernel_counts(&open),
                Err(e) => tracing::debug!("cannot count cluster workers' connections: {e}"),
            }
        }
        self.look_for_silent_workers(now);

        self.apply();
    }

    /// Why lb stops when its workers cannot start, with what the worker said: its error line
    /// when lb reads its output (`--worker-output prefix|json`), else where to find it.
    pub(super) fn give_up_line(&self, why: &str) -> String {
        let said = match self.shared.logs.last_error() {
            Some(l) => format!(": the worker's last error: {}", l.line),
            None => "; the worker's own error is in its output above".to_owned(),
        };
        format!("{why}{said}. lb stops: fix the worker command and start again")
    }

    pub(super) fn spawn(&mut self, id: WorkerId, now: Instant) {
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
        let (write_ends, read_ends) = match self.output.as_ref().map(|_| output::worker_pipes()) {
            Some(Ok((w, r))) => (Some(w), Some(r)),
            Some(Err(e)) => {
                tracing::error!(slot = id.slot, "cannot make the worker's output pipes: {e}");
                return self.fleet.spawn_failed(id, now);
            }
            None => (None, None),
        };
        let spawned = match spawn::spawn_worker(
            &self.argv,
            id.slot,
            &vars,
            self.settings.user.as_ref(),
            listener,
            write_ends,
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
        if let (Some(out), Some(ends)) = (self.output.as_mut(), read_ends) {
            out.attach(id.slot, spawned.pid, ends);
        }
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
    pub(super) fn on_exit(
        &mut self,
        id: WorkerId,
        pid: u32,
        status: Option<ExitStatus>,
        now: Instant,
    ) {
        self.worker_pids.remove(&pid);
        let how = status.map_or_else(|| "unknown status".to_string(), describe_status);
        self.fleet.on_exit(id, &how, now);
        self.router.exited(id);
        self.app.gone(id);
        self.finish_scrape(now);
        if let Some(why) = self.fleet.gave_up()
            && !self.fleet.shutting_down()
        {
            tracing::error!("{why}; lb stops");
            self.begin_shutdown("the worker command cannot start", now);
        }
        self.apply();
    }

    /// A worker that took connections and answers none of them (likely a sticky library that
    /// expects another `--handoff`) is named once, [`silence::AFTER`] after its first handoff.
    pub(super) fn look_for_silent_workers(&mut self, now: Instant) {
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
}

pub(super) fn describe_status(s: ExitStatus) -> String {
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

/// The lifecycle settings of `settings` for workers running `argv`.
pub(super) fn fleet_config(settings: &Settings, argv: &[String]) -> FleetConfig {
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
        hold_timeout: settings.stall_timeout,
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
pub(super) fn is_node(argv: &[String]) -> bool {
    argv.first()
        .and_then(|p| std::path::Path::new(p).file_name())
        .is_some_and(|n| n == "node" || n == "nodejs")
}
