//! Kernel steering's upkeep (DESIGN §11): the BPF program re-attached whenever the set of live
//! slots changes, and the stall watch (a live slot whose accept queue stays non-empty while its
//! worker uses no CPU is marked stalled, so its clients move on and the master empties it).

use std::time::{Duration, Instant};

use super::*;

impl Master {
    /// Kernel steering: attaches the program for the slots that are up whenever that set
    /// changes, and (every quarter `--stall-timeout`) marks stalled a live slot whose accept
    /// queue has stayed non-empty that long, so its clients move on and the master empties it.
    pub(super) fn steer(&mut self, now: Instant) {
        let Some(g) = &mut self.group else { return };
        if self.fleet.shutting_down() {
            return;
        }
        let stall = self.settings.stall_timeout;
        if self.timers.due(Timer::SteerCheck, now) {
            self.timers.set(
                Timer::SteerCheck,
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
}
