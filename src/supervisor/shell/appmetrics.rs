//! The app's metrics ([`crate::appmetrics`]): a scrape of `/metrics` asks the master, which asks
//! its Node workers (`prom-client:getMetricsReq`), gathers their answers until every awaited one
//! is in or `--app-metrics-timeout` passed, and answers every scrape that waited with the merged
//! text. Nothing happens when nobody scrapes.

use std::time::Instant;

use tokio::sync::oneshot;

use super::*;
use crate::appmetrics::DropReason;
use crate::appmetrics::collect::{Begin, Finished};

/// A scrape waiting for the app's metrics.
pub(super) type Scrape = oneshot::Sender<String>;

impl Master {
    /// A scrape of `/metrics` wants the app's families.
    pub(super) fn on_scrape(&mut self, reply: Scrape, now: Instant) {
        if !self.settings.app_metrics || !self.fleet_config_node() {
            let _ = reply.send(String::new());
            return;
        }
        let live = self.router.live_workers();
        if let Begin::Ask(id, workers) = self.app.begin(reply, &live, now) {
            let req = format!("{{\"type\":\"prom-client:getMetricsReq\",\"requestId\":{id}}}\n");
            let line = bytes::Bytes::from(self.settings.serialization.reencode(req.into_bytes()));
            for w in workers {
                if let Some(d) = self.router.dispatch(w) {
                    d.line(line.clone());
                }
            }
        }
        self.finish_scrape(now);
    }

    /// Whether the workers are Node programs (only those speak prom-client's protocol).
    fn fleet_config_node(&self) -> bool {
        super::workers::is_node(&self.argv)
    }

    /// A worker's `getMetricsRes`.
    pub(super) fn on_app_metrics(
        &mut self,
        id: WorkerId,
        request_id: Option<u64>,
        result: &Result<serde_json::Value, String>,
        now: Instant,
    ) {
        let result = result.as_ref().map_err(String::as_str);
        if let Some(why) = self.app.answer(id, request_id, result) {
            self.app_dropped(id, why, None);
        }
        self.finish_scrape(now);
    }

    /// A line over the channel's limit from a worker lb waited for: its answer is lost.
    pub(super) fn app_line_too_long(&mut self, id: WorkerId, now: Instant) {
        if self.app.too_long(id) {
            self.app_dropped(
                id,
                DropReason::TooLarge,
                Some("its answer is over the channel's line limit"),
            );
            self.finish_scrape(now);
        }
    }

    /// Answers the scrapes once the collection is complete (or its deadline passed).
    pub(super) fn finish_scrape(&mut self, now: Instant) {
        if !self.app.done(now) {
            return;
        }
        let Some(Finished {
            text,
            waiters,
            missed,
            dropped,
        }) = self.app.finish()
        else {
            return;
        };
        for w in missed {
            self.shared.metrics.slot(w.slot).app_timeouts.inc();
        }
        for (family, why) in dropped {
            self.shared.metrics.app_dropped(why);
            if let Some(n) = self.app_log.hit(now) {
                tracing::warn!(
                    "left the app's metric family {family} out of /metrics: {} ({n} left out since the last such line; see lb_app_metrics_dropped_total)",
                    describe(why)
                );
            }
        }
        for w in waiters {
            let _ = w.send(text.clone());
        }
    }

    fn app_dropped(&mut self, id: WorkerId, why: DropReason, detail: Option<&str>) {
        self.shared.metrics.app_dropped(why);
        if let Some(n) = self.app_log.hit(Instant::now()) {
            tracing::warn!(
                slot = id.slot,
                "left worker {}'s prom-client answer out of /metrics: {} ({n} left out since the last such line; see lb_app_metrics_dropped_total)",
                id.slot,
                detail.unwrap_or(describe(why))
            );
        }
    }
}

fn describe(why: DropReason) -> &'static str {
    match why {
        DropReason::Error => "its registry failed (the answer carries `error`)",
        DropReason::Malformed => {
            "it is not what getMetricsAsJSON() writes, or a name Prometheus does not allow"
        }
        DropReason::TooLarge => {
            "it is over the size limit (a 1 MiB line or 50,000 series per answer, 100,000 series per scrape)"
        }
        DropReason::TypeConflict => "its type differs between workers",
        DropReason::NameClash => "its name is one of lb's own (lb_…)",
        DropReason::BadAggregator => "its aggregator is not one prom-client knows",
    }
}
