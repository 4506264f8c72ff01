//! The service manager (systemd's `sd_notify`): `READY=1` once a worker is ready, and the
//! watchdog.

use std::time::Instant;

use super::*;

impl Master {
    /// systemd: `READY=1` once a worker is ready (lb accepts from the start), and the watchdog.
    pub(super) fn notify_manager(&mut self, now: Instant) {
        let Some(n) = &self.notify else { return };
        if !self.ready_notified && !self.fleet.shutting_down() {
            // The fleet's own view, not the gauges it publishes.
            let ready = (0..self.fleet.len())
                .filter(|&i| self.fleet.view(i).up())
                .count();
            if ready > 0 {
                self.ready_notified = true;
                n.send(&format!(
                    "READY=1\nSTATUS=serving: {ready} of {} workers ready",
                    self.fleet.len()
                ));
            }
        }
        if let Some(every) = n.watchdog
            && self.timers.due(Timer::Watchdog, now)
        {
            n.send("WATCHDOG=1");
            self.timers.set(Timer::Watchdog, now + every);
        }
    }
}
