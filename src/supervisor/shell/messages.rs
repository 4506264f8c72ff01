//! What the dispatch tasks report: hand-off answers, worker messages (readiness, heartbeats,
//! sessions, `cluster` traffic), stalls, channel faults — each turned into a fact for the
//! [`Router`] or the [`Fleet`].

use std::time::Instant;

use super::*;

impl Master {
    /// One report from a worker's dispatch task.
    pub(super) fn on_dispatch(&mut self, ev: dispatch::Event, now: Instant) {
        let dispatch::Event { id, report } = ev;
        let metrics = &self.shared.metrics;
        match report {
            Report::Acked { accepted } => {
                self.router.acked(id, accepted);
                self.release_when_answered(id, now);
            }
            Report::Nacked => metrics.failure(Failure::Nack, 1),
            Report::Returned(conns, why) => {
                self.router.returned(id, conns, why);
                self.release_when_answered(id, now);
            }
            Report::Message(m) => {
                if !self.router.message(id, &m) {
                    match m {
                        WorkerMsg::Heartbeat => self.fleet.on_heartbeat(id, now),
                        WorkerMsg::Ready => self.fleet.on_ready(id, now),
                        WorkerMsg::Leaving => {
                            self.fleet.on_leaving(id, now, "its app closed its server")
                        }
                        WorkerMsg::AppMetrics { request_id, result } => {
                            self.on_app_metrics(id, request_id, &result, now)
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
                self.fleet.on_desync(id, now);
            }
            Report::TooLong => {
                metrics.dropped(Dropped::TooLong);
                self.app_line_too_long(id, now);
            }
            Report::StrayFd => metrics.dropped(Dropped::StrayFd),
            Report::Cluster(m) => self.on_cluster(id, m, now),
            Report::Closed => {
                self.fleet.on_channel_closed(id, now);
                self.router.closed(id);
            }
        }
        self.apply();
    }

    /// During a shutdown, a worker spared SIGTERM gets it once its handoffs are answered.
    fn release_when_answered(&mut self, id: WorkerId, now: Instant) {
        if self.fleet.shutting_down() && !self.router.busy(id) {
            self.fleet.on_answered(id, now);
        }
    }
}
