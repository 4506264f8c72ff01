//! Prometheus metrics; the admin HTTP endpoint that serves them (`/metrics`, `/workers`,
//! `/healthz`, the status page) is [`admin`].
//!
//! Everything is served from the master's own state: a scrape never talks to a worker, so it
//! cannot block on one. Per-worker series are labelled by slot (never by pid, which would grow
//! without bound) and exist from start-up at 0. Worker-reported cumulative counts are turned into
//! deltas per worker generation by the master, so exported counters never go backwards when a
//! worker restarts.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use serde::Serialize;
use std::sync::{Arc, Mutex, RwLock};

use crate::balance::Policy;

mod admin;
pub use admin::{ADMIN_MAX_CONNECTIONS, AppScrapes, Shared, SlotView, bind, serve};

/// Per-slot metric handles (looked up once, so the hot path does no label hashing).
#[derive(Debug, Clone)]
pub struct SlotMetrics {
    /// Requests the worker reported.
    pub requests: IntCounter,
    /// Connections ACKed by the worker.
    pub connections: IntCounter,
    /// Active connections (worker-reported, else lb's estimate).
    pub active: IntGauge,
    /// 1 if the slot's worker is ready.
    pub up: IntGauge,
    /// Replacements of the slot's worker.
    pub restarts: IntCounter,
    /// RSS of the slot's worker.
    pub memory: IntGauge,
    /// Sticky clients of this slot sent elsewhere while its worker was up (at `--max-pending`,
    /// or it refused the connection).
    pub moved: IntCounter,
    /// New sticky clients of this slot sent to their next choice because it was full
    /// (`--balance-factor`).
    pub overflow: IntCounter,
    /// Scrapes the slot's worker did not answer in `--app-metrics-timeout`.
    pub app_timeouts: IntCounter,
    /// socket.io sessions the slot's worker owns (`@socket.io/sticky` notices).
    pub sessions: IntGauge,
    /// `lb_worker_state{state}`: 1 for the slot's state, 0 for the others.
    pub states: Vec<(&'static str, IntGauge)>,
}

/// The slot states `/workers` and `lb_worker_state` show.
pub const SLOT_STATES: [&str; 7] = [
    "starting", "ready", "stalled", "backoff", "failed", "draining", "exited",
];

impl SlotMetrics {
    /// Marks `state` as the slot's state in `lb_worker_state`.
    pub fn set_state(&self, state: &str) {
        for (name, g) in &self.states {
            g.set(i64::from(*name == state));
        }
    }
}

/// The per-slot metric families.
#[derive(Debug)]
struct SlotFamilies {
    requests: IntCounterVec,
    connections: IntCounterVec,
    active: IntGaugeVec,
    up: IntGaugeVec,
    restarts: IntCounterVec,
    memory: IntGaugeVec,
    moved: IntCounterVec,
    overflow: IntCounterVec,
    app_timeouts: IntCounterVec,
    sessions: IntGaugeVec,
    state: IntGaugeVec,
}

impl SlotFamilies {
    /// The per-slot counters (carried across an upgrade; removed with their slot).
    fn counters(&self) -> [&IntCounterVec; 6] {
        [
            &self.requests,
            &self.connections,
            &self.restarts,
            &self.moved,
            &self.overflow,
            &self.app_timeouts,
        ]
    }

    fn slot(&self, i: usize) -> SlotMetrics {
        let l = i.to_string();
        SlotMetrics {
            states: SLOT_STATES
                .iter()
                .map(|st| (*st, self.state.with_label_values(&[l.as_str(), st])))
                .collect(),
            requests: self.requests.with_label_values(&[&l]),
            connections: self.connections.with_label_values(&[&l]),
            active: self.active.with_label_values(&[&l]),
            up: self.up.with_label_values(&[&l]),
            restarts: self.restarts.with_label_values(&[&l]),
            memory: self.memory.with_label_values(&[&l]),
            moved: self.moved.with_label_values(&[&l]),
            overflow: self.overflow.with_label_values(&[&l]),
            app_timeouts: self.app_timeouts.with_label_values(&[&l]),
            sessions: self.sessions.with_label_values(&[&l]),
        }
    }
}

/// All of lb's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Per-slot handles, indexed by slot (grows when lb is scaled up).
    slots: RwLock<Vec<Arc<SlotMetrics>>>,
    /// The per-slot families, to add slots.
    families: SlotFamilies,
    /// Connections accepted by the master.
    pub accepted: IntCounter,
    /// Configuration reloads by result (`ok`, `failed`).
    reloads: IntCounterVec,
    /// Admin connections closed at once because [`ADMIN_MAX_CONNECTIONS`] were open.
    pub admin_refused: IntCounter,
    /// Handoff failures by reason.
    failures: IntCounterVec,
    /// Accept → ACK latency.
    pub handoff_duration: Histogram,
    /// Connections waiting for a ready worker.
    pub queued: IntGauge,
    /// Accept errors by kind.
    accept_errors: IntCounterVec,
    /// Channel messages lb dropped or ignored, by reason.
    channel_dropped: IntCounterVec,
    /// Connections closed for their PROXY header, by reason.
    proxy_errors: IntCounterVec,
    /// `lb_peeks_total{result}`.
    peeks: IntCounterVec,
    /// `lb_app_metrics_dropped_total{reason}`.
    app_dropped: IntCounterVec,
    /// Histogram values lb's previous image counted (an in-place upgrade), added when
    /// gathering.
    histogram_base: Mutex<Vec<CarriedHistogram>>,
}

/// Counter and histogram values carried across an in-place upgrade, so that no counter ever
/// goes back (DESIGN §10).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, Serialize)]
pub struct Carried {
    /// Every counter series: name, label values (in label-name order) and value.
    pub counters: Vec<(String, Vec<String>, u64)>,
    /// Every histogram.
    pub histograms: Vec<CarriedHistogram>,
}

/// One histogram's totals.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, Serialize)]
pub struct CarriedHistogram {
    /// The family name.
    pub name: String,
    /// Observations.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// Cumulative count of each bucket, in bound order.
    pub buckets: Vec<u64>,
}

/// Registers a counter with one label, creating the series of every value at 0.
fn labeled_counter<'a>(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: impl Iterator<Item = &'a str>,
) -> IntCounterVec {
    let v = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    registry
        .register(Box::new(v.clone()))
        .expect("unique metric");
    for value in values {
        v.with_label_values(&[value]);
    }
    v
}

/// Declares a label enum: its variants, their label values, and `ALL` (every series is created
/// at start-up, so each exists at 0).
macro_rules! labels {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $label:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
        }

        impl $name {
            /// Every value, in label order.
            pub const ALL: &[$name] = &[$($name::$variant,)*];

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)*
                }
            }
        }
    };
}

labels! {
    /// `reason` of `lb_handoff_failures_total`: why a connection did not reach a worker (this time).
    Failure {
        /// The worker NACKed the handle (each NACK counts).
        Nack = "nack",
        /// `sendmsg` to the worker failed.
        SendError = "send_error",
        /// The worker's channel closed with the connection un-ACKed.
        WorkerExit = "worker_exit",
        /// No ready worker within `--queue-timeout` (or at shutdown): closed.
        NoWorker = "no_worker",
        /// The wait queue was full: closed.
        QueueFull = "queue_full",
        /// Offered to workers 8 times and refused (NACKed) every time: closed.
        Refused = "refused",
    }
}

labels! {
    /// `reason` of `lb_channel_messages_dropped_total`.
    Dropped {
        /// Not valid JSON.
        Malformed = "malformed",
        /// A line over the length limit.
        TooLong = "too_long",
        /// Valid, but nothing lb acts on.
        Ignored = "ignored",
        /// An fd the worker sent (closed), or a handle from the worker (NACKed).
        StrayFd = "stray_fd",
        /// An ACK/NACK for a handle never sent.
        Desync = "desync",
    }
}

labels! {
    /// `reason` of `lb_proxy_header_errors_total`: why a PROXY protocol header was refused (the
    /// connection is closed).
    ProxyFailure {
        /// The connection does not start with a PROXY signature.
        Missing = "missing",
        /// A PROXY signature, then something invalid (or a header too long to be real).
        Malformed = "malformed",
        /// Not complete within `--proxy-timeout` (nothing sent, or part of a header).
        Timeout = "timeout",
        /// The client closed or reset the connection before its header was complete.
        Closed = "closed",
        /// Too many connections were already waiting for their header.
        Overflow = "overflow",
    }
}

labels! {
    /// `result` of `lb_peeks_total`: what lb found in a connection's first bytes (the
    /// connection is routed either way).
    PeekResult {
        /// A request line with the `sid=` of a live session: routed to its worker.
        Sid = "sid",
        /// A request line without a known session.
        NoSid = "none",
        /// The first bytes are not an HTTP request line (TLS, another protocol).
        NotHttp = "not_http",
        /// Nothing (or not a whole request line) within `--peek-timeout`.
        Timeout = "timeout",
        /// A request line longer than lb looks at.
        TooLong = "too_long",
        /// The client closed before a whole request line.
        Closed = "closed",
        /// Still waiting when the wait set was full: routed as it was, to make room.
        Evicted = "evicted",
        /// A request head with a `--hash-key` key: hashed on it.
        Key = "key",
        /// A request head without any of the `--hash-key` keys: hashed on the IP.
        NoKey = "no_key",
    }
}

labels! {
    /// `reason` of `lb_app_metrics_dropped_total`: why a worker's prom-client answer, or one
    /// metric family of it, was left out of `/metrics`.
    AppMetricsDrop {
        /// The answer carried `error` (the worker's registry failed).
        Error = "error",
        /// Not the shape `getMetricsAsJSON()` writes, or a name Prometheus does not allow.
        Malformed = "malformed",
        /// Over the per-answer limit (series, or the channel's line limit).
        TooLarge = "too_large",
        /// A family whose type differs between workers.
        TypeConflict = "type_conflict",
        /// A family named like lb's own (`lb_…`).
        NameClash = "name_clash",
        /// An `aggregator` prom-client does not know.
        BadAggregator = "bad_aggregator",
    }
}

labels! {
    /// `kind` of `lb_accept_errors_total`.
    AcceptErrorKind {
        /// Out of fds or memory: accepting pauses.
        Exhausted = "exhausted",
        /// The connection went away before it was accepted.
        Transient = "transient",
        /// Anything else.
        Other = "other",
    }
}

impl Metrics {
    /// Creates every series for `workers` slots, at 0.
    pub fn new(workers: usize, policy: Policy) -> Self {
        let registry = Registry::new();
        let slot_vec_counter = |name: &str, help: &str| {
            let v = IntCounterVec::new(Opts::new(name, help), &["worker"]).expect("valid metric");
            registry
                .register(Box::new(v.clone()))
                .expect("unique metric");
            v
        };
        let slot_vec_gauge = |name: &str, help: &str| {
            let v = IntGaugeVec::new(Opts::new(name, help), &["worker"]).expect("valid metric");
            registry
                .register(Box::new(v.clone()))
                .expect("unique metric");
            v
        };
        let requests = slot_vec_counter(
            "lb_worker_requests_total",
            "Requests the worker reported (stats / request messages), monotonic across restarts.",
        );
        let connections = slot_vec_counter(
            "lb_worker_connections_total",
            "Connections handed to and acknowledged by the worker.",
        );
        let active = slot_vec_gauge(
            "lb_worker_active_connections",
            "Active connections of the worker (worker-reported, else lb's estimate).",
        );
        let up = slot_vec_gauge(
            "lb_worker_up",
            "1 if the slot's worker is ready to receive connections.",
        );
        let restarts = slot_vec_counter(
            "lb_worker_restarts_total",
            "Replacements of the slot's worker, for any reason (crash, heartbeat, memory, rolling restart).",
        );
        let memory = slot_vec_gauge(
            "lb_worker_memory_bytes",
            "Resident set size of the slot's worker, from /proc.",
        );
        let state = IntGaugeVec::new(
            Opts::new(
                "lb_worker_state",
                "1 for the slot's current state (starting, ready, stalled, backoff, failed, draining, exited), 0 for the others.",
            ),
            &["worker", "state"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(state.clone()))
            .expect("unique metric");
        let moved = slot_vec_counter(
            "lb_sticky_moved_total",
            "Sticky clients of the slot sent to another slot while its worker was alive (stalled, at --max-pending unconfirmed handoffs, or it refused the connection).",
        );
        let overflow = slot_vec_counter(
            "lb_sticky_overflow_total",
            "New sticky clients whose home was this slot, sent to their next choice because it was full (--balance-factor).",
        );
        let app_timeouts = slot_vec_counter(
            "lb_app_metrics_timeouts_total",
            "Scrapes of /metrics the slot's worker did not answer (prom-client getMetricsReq) within --app-metrics-timeout; its last counters were used.",
        );
        let sessions = slot_vec_gauge(
            "lb_worker_sessions",
            "socket.io sessions the slot's worker owns (from @socket.io/sticky's sticky:connection and sticky:disconnection notices).",
        );
        let families = SlotFamilies {
            requests,
            connections,
            active,
            up,
            restarts,
            memory,
            moved,
            overflow,
            app_timeouts,
            sessions,
            state,
        };
        let slots = RwLock::new((0..workers).map(|i| Arc::new(families.slot(i))).collect());
        let accepted = IntCounter::new(
            "lb_accepted_connections_total",
            "Connections accepted by the master.",
        )
        .expect("valid");
        registry
            .register(Box::new(accepted.clone()))
            .expect("unique");
        let reloads = IntCounterVec::new(
            Opts::new(
                "lb_reloads_total",
                "Configuration reloads (SIGHUP, lb reload) by result.",
            ),
            &["result"],
        )
        .expect("valid");
        registry
            .register(Box::new(reloads.clone()))
            .expect("unique");
        for r in ["ok", "failed"] {
            reloads.with_label_values(&[r]);
        }
        let admin_refused = IntCounter::new(
            "lb_admin_refused_connections_total",
            "Admin endpoint connections closed at once because the connection cap was reached.",
        )
        .expect("valid");
        registry
            .register(Box::new(admin_refused.clone()))
            .expect("unique");
        let failures = labeled_counter(
            &registry,
            "lb_handoff_failures_total",
            "Handoffs that did not reach a worker, by reason.",
            "reason",
            Failure::ALL.iter().map(|r| r.as_str()),
        );
        let handoff_duration = Histogram::with_opts(
            HistogramOpts::new(
                "lb_handoff_duration_seconds",
                "Time from accept to the worker's ACK.",
            )
            .buckets(vec![
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .expect("valid");
        registry
            .register(Box::new(handoff_duration.clone()))
            .expect("unique");
        let queued = IntGauge::new(
            "lb_queued_connections",
            "Connections waiting for a ready worker.",
        )
        .expect("valid");
        registry.register(Box::new(queued.clone())).expect("unique");
        let accept_errors = labeled_counter(
            &registry,
            "lb_accept_errors_total",
            "Errors accepting connections (exhausted = out of fds/memory).",
            "kind",
            AcceptErrorKind::ALL.iter().map(|k| k.as_str()),
        );
        let channel_dropped = labeled_counter(
            &registry,
            "lb_channel_messages_dropped_total",
            "Worker channel messages lb dropped or ignored, by reason.",
            "reason",
            Dropped::ALL.iter().map(|r| r.as_str()),
        );
        let proxy_errors = labeled_counter(
            &registry,
            "lb_proxy_header_errors_total",
            "Connections closed because their PROXY protocol header was missing, malformed, \
             late, cut short, or one too many was awaited, by reason.",
            "reason",
            ProxyFailure::ALL.iter().map(|r| r.as_str()),
        );
        let peeks = labeled_counter(
            &registry,
            "lb_peeks_total",
            "Connections whose first bytes lb peeked at (--handoff socket.io), by what it found: \
             sid (routed to the session's worker), none (a request line without a known sid), \
             not_http, timeout (nothing in --peek-timeout), too_long, closed.",
            "result",
            PeekResult::ALL.iter().map(|r| r.as_str()),
        );
        let app_dropped = labeled_counter(
            &registry,
            "lb_app_metrics_dropped_total",
            "Workers' prom-client answers or metric families lb left out of /metrics, by reason: \
             error (the worker's registry failed), malformed, too_large, type_conflict (a family's \
             type differs between workers), name_clash (an lb_ name), bad_aggregator.",
            "reason",
            AppMetricsDrop::ALL.iter().map(|r| r.as_str()),
        );
        let info = IntGaugeVec::new(
            Opts::new(
                "lb_build_info",
                "lb's version and balancing policy (always 1).",
            ),
            &["version", "policy"],
        )
        .expect("valid");
        registry.register(Box::new(info.clone())).expect("unique");
        info.with_label_values(&[crate::VERSION, policy.as_str()])
            .set(1);
        Self {
            registry,
            slots,
            families,
            reloads,
            admin_refused,
            accepted,
            failures,
            handoff_duration,
            queued,
            accept_errors,
            channel_dropped,
            proxy_errors,
            peeks,
            app_dropped,
            histogram_base: Mutex::new(Vec::new()),
        }
    }

    /// Every family, with what lb's previous image counted added to the histograms.
    fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.registry.gather();
        let base = self.histogram_base.lock().expect("not poisoned");
        for b in base.iter() {
            let Some(f) = families.iter_mut().find(|f| f.name() == b.name) else {
                continue;
            };
            for m in f.mut_metric() {
                let mut h = m.get_histogram().clone();
                h.set_sample_count(h.get_sample_count() + b.count);
                h.set_sample_sum(h.get_sample_sum() + b.sum);
                let mut buckets = h.get_bucket().to_vec();
                for (bucket, add) in buckets.iter_mut().zip(&b.buckets) {
                    bucket.set_cumulative_count(bucket.cumulative_count() + add);
                }
                h.set_bucket(buckets);
                m.set_histogram(h);
            }
        }
        families
    }

    /// The counters' and histograms' values, for lb's next image.
    pub fn carry(&self) -> Carried {
        use prometheus::proto::MetricType;
        let mut out = Carried::default();
        for f in self.gather() {
            match f.get_field_type() {
                MetricType::COUNTER => out.counters.extend(f.get_metric().iter().map(|m| {
                    (
                        f.name().to_owned(),
                        m.get_label().iter().map(|l| l.value().to_owned()).collect(),
                        m.get_counter().get_value() as u64,
                    )
                })),
                MetricType::HISTOGRAM => out.histograms.extend(f.get_metric().iter().map(|m| {
                    let h = m.get_histogram();
                    CarriedHistogram {
                        name: f.name().to_owned(),
                        count: h.get_sample_count(),
                        sum: h.get_sample_sum(),
                        buckets: h
                            .get_bucket()
                            .iter()
                            .map(|b| b.cumulative_count())
                            .collect(),
                    }
                })),
                _ => {}
            }
        }
        out
    }

    /// Continues counting from what lb's previous image counted (series it did not have, or
    /// that this image does not know, are left alone).
    pub fn restore(&self, carried: &Carried) {
        use prometheus::core::Collector;
        let singles = [&self.accepted, &self.admin_refused];
        let per_slot = self.families.counters();
        let vecs = [
            &self.reloads,
            &self.failures,
            &self.accept_errors,
            &self.channel_dropped,
            &self.proxy_errors,
            &self.peeks,
            &self.app_dropped,
        ];
        let name_of = |c: &dyn Collector| c.desc().first().map(|d| d.fq_name.clone());
        for (name, labels, value) in &carried.counters {
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            if let Some(c) = singles.iter().find(|c| name_of(**c).as_ref() == Some(name)) {
                c.inc_by(*value);
            } else if let Some(v) = per_slot
                .iter()
                .find(|v| name_of(**v).as_ref() == Some(name))
            {
                if let Some(slot) = labels.first().and_then(|s| s.parse::<usize>().ok()) {
                    self.ensure_slots(slot + 1);
                    if let Ok(c) = v.get_metric_with_label_values(&labels) {
                        c.inc_by(*value);
                    }
                }
            } else if let Some(v) = vecs.iter().find(|v| name_of(**v).as_ref() == Some(name))
                && let Ok(c) = v.get_metric_with_label_values(&labels)
            {
                c.inc_by(*value);
            }
        }
        *self.histogram_base.lock().expect("not poisoned") = carried.histograms.clone();
    }

    /// Slot `i`'s handles (its series are created if lb grew to it).
    pub fn slot(&self, i: usize) -> Arc<SlotMetrics> {
        if let Some(m) = self.slots.read().expect("not poisoned").get(i) {
            return m.clone();
        }
        self.ensure_slots(i + 1);
        self.slots.read().expect("not poisoned")[i].clone()
    }

    /// Slots `n..` no longer exist (scaled away, their workers gone): their series go, so
    /// `count(lb_worker_up)` is the number of slots and no alert fires for a slot that is not
    /// there. A slot added again later starts its series afresh (Prometheus sees a new series).
    pub fn remove_slots_from(&self, n: usize) {
        let mut slots = self.slots.write().expect("not poisoned");
        let f = &self.families;
        for i in n..slots.len() {
            let l = i.to_string();
            let l = [l.as_str()];
            for v in f.counters() {
                let _ = v.remove_label_values(&l);
            }
            for v in [&f.active, &f.up, &f.memory, &f.sessions] {
                let _ = v.remove_label_values(&l);
            }
            for st in SLOT_STATES {
                let _ = f.state.remove_label_values(&[l[0], st]);
            }
        }
        slots.truncate(n);
    }

    /// Makes sure slots `0..n` have their series.
    pub fn ensure_slots(&self, n: usize) {
        let mut slots = self.slots.write().expect("not poisoned");
        while slots.len() < n {
            let i = slots.len();
            slots.push(Arc::new(self.families.slot(i)));
        }
    }

    /// Counts a configuration reload.
    pub fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }

    /// Counts `n` handoff failures for `reason`.
    pub fn failure(&self, reason: Failure, n: u64) {
        self.failures
            .with_label_values(&[reason.as_str()])
            .inc_by(n);
    }

    /// Counts what a peek at a connection's first bytes found.
    pub fn peeked(&self, result: PeekResult) {
        self.peeks.with_label_values(&[result.as_str()]).inc();
    }

    /// Counts a worker's metrics answer (or one of its families) left out.
    pub fn app_dropped(&self, reason: AppMetricsDrop) {
        self.app_dropped.with_label_values(&[reason.as_str()]).inc();
    }

    /// Counts a connection closed for its PROXY header.
    pub fn proxy_error(&self, reason: ProxyFailure) {
        self.proxy_errors
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Counts an accept error.
    pub fn accept_error(&self, kind: AcceptErrorKind) {
        self.accept_errors.with_label_values(&[kind.as_str()]).inc();
    }

    /// Counts a dropped channel message.
    pub fn dropped(&self, reason: Dropped) {
        self.channel_dropped
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        TextEncoder::new()
            .encode(&self.gather(), &mut out)
            .expect("text encoding never fails");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_exists_at_start() {
        let m = Metrics::new(3, Policy::Sticky);
        let text = String::from_utf8(m.render()).unwrap();
        for w in 0..3 {
            for name in [
                "lb_worker_requests_total",
                "lb_worker_connections_total",
                "lb_worker_up",
                "lb_worker_restarts_total",
            ] {
                assert!(
                    text.contains(&format!("{name}{{worker=\"{w}\"}} 0")),
                    "{name} {w}\n{text}"
                );
            }
        }
        for r in Failure::ALL {
            assert!(text.contains(&format!(
                "lb_handoff_failures_total{{reason=\"{}\"}} 0",
                r.as_str()
            )));
        }
        assert!(text.contains("lb_build_info{policy=\"sticky\""));
    }
}
