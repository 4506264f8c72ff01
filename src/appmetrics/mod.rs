//! The app's own metrics: lb as prom-client's cluster aggregator (DESIGN §14).
//!
//! A Node app that follows prom-client's cluster guide creates `new AggregatorRegistry()` in its
//! one file; in a worker that installs a `process.on('message')` handler answering
//! `{type:"prom-client:getMetricsReq", requestId}` with `{type:"prom-client:getMetricsRes",
//! requestId, metrics}` (`metrics`: one `registry.getMetricsAsJSON()` array per registry), or
//! `{…, error}` (prom-client 15.1.3, `lib/cluster.js`, `addListeners`). Under lb the primary branch
//! never runs, so lb asks and merges, on each scrape of its `/metrics` ([`collect`]).
//!
//! The merge is prom-client's `AggregatorRegistry.aggregate` (`lib/cluster.js`) with the
//! aggregators of `lib/metricAggregators.js`: metrics are grouped by `name`; the first one's
//! `aggregator` picks the function (`sum` when absent, `first`, `min`, `max`, `average`, `omit`);
//! within a metric, values are grouped by `metricName` (a histogram's `_bucket`/`_sum`/`_count`)
//! and label set (`hashObject`: sorted `key:value,`); help and type come from the first;
//! timestamps are dropped. Where prom-client would write a broken exposition or take the first of
//! conflicting families, lb drops the family and counts why ([`DropReason`]).
//!
//! Better than the Node primary: counters never go back ([`Bases`]). When a worker is gone, its
//! last counter values (counters; histogram and summary `_count`, `_sum`, `_bucket`) are kept
//! and added to what the live workers report, so an aggregated counter is monotonic across
//! crashes, rolls and reloads. Gauges are not carried.

pub mod collect;
mod merge;

pub use merge::{Bases, aggregate, render};

use serde_json::{Map, Value};

/// One metric as `getMetricsAsJSON()` writes it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Family {
    /// The metric's name.
    pub name: String,
    /// Its help text.
    pub help: String,
    /// `counter`, `gauge`, `histogram`, `summary` (anything else is written `untyped`).
    pub kind: String,
    /// prom-client's `aggregator` (`None`: `sum`).
    pub aggregator: Option<String>,
    /// Its samples.
    pub values: Vec<Sample>,
}

/// One sample of a [`Family`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// The series name when it is not the family's (`_bucket`, `_sum`, `_count`).
    pub metric_name: Option<String>,
    /// Its labels (values are strings or numbers, as prom-client keeps them).
    pub labels: Map<String, Value>,
    /// Its value (`null`, as JSON writes a non-finite number, is 0 as in JavaScript's sums).
    pub value: f64,
}

impl Sample {
    /// The series name.
    pub fn series<'a>(&'a self, family: &'a str) -> &'a str {
        self.metric_name.as_deref().unwrap_or(family)
    }

    /// prom-client's grouping key for it: `metricName_` and the labels' sorted `key:value,`.
    pub fn key(&self) -> String {
        let mut keys: Vec<&String> = self.labels.keys().collect();
        keys.sort();
        let mut k = format!("{}_", self.metric_name.as_deref().unwrap_or_default());
        for name in keys {
            match &self.labels[name] {
                Value::Null => continue,
                Value::String(s) => k += &format!("{name}:{s},"),
                v => k += &format!("{name}:{v},"),
            }
        }
        k
    }
}

/// Why an answer or a family was left out of the exposition (`lb_app_metrics_dropped_total`).
pub use crate::metrics::AppMetricsDrop as DropReason;

/// Parses a `getMetricsRes`'s `metrics` (an array of registries, each an array of metrics).
pub fn parse(metrics: &Value) -> Option<Vec<Family>> {
    let mut out = Vec::new();
    for registry in metrics.as_array()? {
        for m in registry.as_array()? {
            out.push(family(m)?);
        }
    }
    Some(out)
}

fn family(m: &Value) -> Option<Family> {
    let text = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    let mut values = Vec::new();
    for v in m.get("values")?.as_array()? {
        let value = match v.get("value") {
            Some(Value::Number(n)) => n.as_f64()?,
            Some(Value::Null) | None => 0.0,
            Some(_) => return None,
        };
        let labels = match v.get("labels") {
            Some(Value::Object(l)) => l.clone(),
            None | Some(Value::Null) => Map::new(),
            Some(_) => return None,
        };
        values.push(Sample {
            metric_name: v
                .get("metricName")
                .and_then(Value::as_str)
                .map(str::to_owned),
            labels,
            value,
        });
    }
    Some(Family {
        name: text("name")?,
        help: text("help").unwrap_or_default(),
        kind: text("type")?,
        aggregator: text("aggregator"),
        values,
    })
}

/// Whether a family's series in `sample` only grows (so a gone worker's last value is kept).
pub fn is_counter_like(family: &Family, sample: &Sample) -> bool {
    if !matches!(family.aggregator.as_deref(), None | Some("sum")) {
        return false;
    }
    match family.kind.as_str() {
        "counter" | "histogram" => true,
        "summary" => {
            let s = sample.series(&family.name);
            s.ends_with("_sum") || s.ends_with("_count")
        }
        _ => false,
    }
}
