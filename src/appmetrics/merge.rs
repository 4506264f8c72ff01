//! Merging the workers' answers ([`aggregate`]), keeping gone workers' counters ([`Bases`]) and
//! writing Prometheus text ([`render`]).

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::{DropReason, Family, Sample, is_counter_like};

/// prom-client's `aggregators`, by name.
fn aggregator(name: Option<&str>) -> Option<fn(&[&Sample]) -> f64> {
    Some(match name {
        None | Some("sum") => |v| v.iter().map(|s| s.value).sum(),
        Some("first") => |v| v[0].value,
        Some("min") => |v| v.iter().map(|s| s.value).fold(f64::INFINITY, f64::min),
        Some("max") => |v| v.iter().map(|s| s.value).fold(f64::NEG_INFINITY, f64::max),
        Some("average") => |v| v.iter().map(|s| s.value).sum::<f64>() / v.len() as f64,
        _ => return None,
    })
}

fn valid_name(s: &str, colon: bool) -> bool {
    let ok = |c: char, first: bool| {
        c.is_ascii_alphabetic() || c == '_' || (colon && c == ':') || (!first && c.is_ascii_digit())
    };
    let mut chars = s.chars();
    chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
}

/// Merges the families of several workers' answers as `AggregatorRegistry.aggregate` does,
/// in first-seen order. Families lb cannot write correctly are left out, each with a reason:
/// a name of lb's own (`lb_…`), a type that differs between workers, an unknown aggregator, an
/// invalid metric or label name.
pub fn aggregate(answers: &[&[Family]]) -> (Vec<Family>, Vec<(String, DropReason)>) {
    let mut order: Vec<&str> = Vec::new();
    let mut by_name: HashMap<&str, Vec<&Family>> = HashMap::new();
    for fams in answers {
        for f in fams.iter() {
            by_name
                .entry(&f.name)
                .or_insert_with(|| {
                    order.push(&f.name);
                    Vec::new()
                })
                .push(f);
        }
    }
    let mut out = Vec::new();
    let mut dropped = Vec::new();
    for name in order {
        let fams = &by_name[name];
        let first = fams[0];
        let reason = if name.starts_with("lb_") {
            Some(DropReason::NameClash)
        } else if fams.iter().any(|f| f.kind != first.kind) {
            Some(DropReason::TypeConflict)
        } else if !valid_name(name, true)
            || fams.iter().any(|f| {
                f.values.iter().any(|s| {
                    !valid_name(s.series(name), true)
                        || !s.labels.keys().all(|l| valid_name(l, false))
                })
            })
        {
            Some(DropReason::Malformed)
        } else if first.aggregator.as_deref() != Some("omit")
            && aggregator(first.aggregator.as_deref()).is_none()
        {
            Some(DropReason::BadAggregator)
        } else {
            None
        };
        if let Some(r) = reason {
            dropped.push((name.to_owned(), r));
            continue;
        }
        let Some(agg) = aggregator(first.aggregator.as_deref()) else {
            continue; // `omit`
        };
        let mut keys: Vec<String> = Vec::new();
        let mut groups: HashMap<String, Vec<&Sample>> = HashMap::new();
        for f in fams {
            for s in &f.values {
                let k = s.key();
                groups
                    .entry(k.clone())
                    .or_insert_with(|| {
                        keys.push(k);
                        Vec::new()
                    })
                    .push(s);
            }
        }
        let values = keys
            .iter()
            .map(|k| {
                let g = &groups[k];
                Sample {
                    metric_name: g[0].metric_name.clone(),
                    labels: g[0].labels.clone(),
                    value: agg(g),
                }
            })
            .collect();
        out.push(Family {
            name: name.to_owned(),
            help: first.help.clone(),
            kind: first.kind.clone(),
            aggregator: first.aggregator.clone(),
            values,
        });
    }
    (out, dropped)
}

/// A kept series: its family, series name, label key, labels and value.
type Kept = (String, String, String, Map<String, Value>, f64);

/// What gone workers counted: per counter-like series, the sum of their last values, with each
/// family's help and type (to write a series no live worker has yet).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Bases {
    /// family name → (help, type).
    families: Vec<(String, String, String)>,
    /// (family, series, label key) → (labels, value).
    series: Vec<Kept>,
}

impl Bases {
    /// Keeps a gone worker's last counter values.
    pub fn fold(&mut self, last: &[Family]) {
        let mut index: HashMap<String, usize> = self
            .series
            .iter()
            .enumerate()
            .map(|(i, (f, s, k, ..))| (format!("{f}\0{s}\0{k}"), i))
            .collect();
        for f in last {
            for s in f.values.iter().filter(|s| is_counter_like(f, s)) {
                if !self.families.iter().any(|(n, ..)| *n == f.name) {
                    self.families
                        .push((f.name.clone(), f.help.clone(), f.kind.clone()));
                }
                let (series, key) = (s.series(&f.name).to_owned(), s.key());
                let id = format!("{}\0{series}\0{key}", f.name);
                match index.get(&id) {
                    Some(&i) => self.series[i].4 += s.value,
                    None => {
                        index.insert(id, self.series.len());
                        self.series
                            .push((f.name.clone(), series, key, s.labels.clone(), s.value));
                    }
                }
            }
        }
    }

    /// Adds the bases to the merged families (a series no live worker has is added as it was).
    pub fn apply(&self, merged: &mut Vec<Family>) {
        if self.series.is_empty() {
            return;
        }
        let mut families: HashMap<String, usize> = merged
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.clone(), i))
            .collect();
        let mut samples: HashMap<(usize, String), usize> = HashMap::new();
        for (i, f) in merged.iter().enumerate() {
            for (j, s) in f.values.iter().enumerate() {
                samples.insert((i, format!("{}\0{}", s.series(&f.name), s.key())), j);
            }
        }
        for (fam, series, key, labels, value) in &self.series {
            let i = match families.get(fam) {
                Some(&i) => i,
                None => {
                    let Some((_, help, kind)) = self.families.iter().find(|(n, ..)| n == fam)
                    else {
                        continue;
                    };
                    merged.push(Family {
                        name: fam.clone(),
                        help: help.clone(),
                        kind: kind.clone(),
                        aggregator: None,
                        values: Vec::new(),
                    });
                    families.insert(fam.clone(), merged.len() - 1);
                    merged.len() - 1
                }
            };
            let f = &mut merged[i];
            if !matches!(f.aggregator.as_deref(), None | Some("sum")) {
                continue;
            }
            match samples.get(&(i, format!("{series}\0{key}"))) {
                Some(&j) => f.values[j].value += value,
                None => {
                    f.values.push(Sample {
                        metric_name: (series != fam).then(|| series.clone()),
                        labels: labels.clone(),
                        value: *value,
                    });
                    samples.insert((i, format!("{series}\0{key}")), f.values.len() - 1);
                }
            }
        }
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }
}

fn escape(s: &str, quote: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out += "\\\\",
            '\n' => out += "\\n",
            '"' if quote => out += "\\\"",
            c => out.push(c),
        }
    }
    out
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

/// Prometheus text (format 0.0.4): `# HELP` and `# TYPE` once per family, then its samples.
pub fn render(families: &[Family], out: &mut String) {
    for f in families {
        let kind = match f.kind.as_str() {
            k @ ("counter" | "gauge" | "histogram" | "summary") => k,
            _ => "untyped",
        };
        let _ = writeln!(out, "# HELP {} {}", f.name, escape(&f.help, false));
        let _ = writeln!(out, "# TYPE {} {kind}", f.name);
        for s in &f.values {
            out.push_str(s.series(&f.name));
            if !s.labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in s.labels.iter().enumerate() {
                    let v = match v {
                        Value::String(s) => escape(s, true),
                        v => escape(&v.to_string(), true),
                    };
                    let _ = write!(out, "{}{k}=\"{v}\"", if i > 0 { "," } else { "" });
                }
                out.push('}');
            }
            let _ = writeln!(out, " {}", number(s.value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;
    use serde_json::json;

    fn answer(requests: f64, gauge: f64, bucket: f64) -> Vec<Family> {
        parse(&json!([[
            {"name": "app_requests_total", "help": "Requests.", "type": "counter",
             "values": [{"value": requests, "labels": {"route": "/"}}], "aggregator": "sum"},
            {"name": "app_busy", "help": "Busy.", "type": "gauge",
             "values": [{"value": gauge, "labels": {}}], "aggregator": "max"},
            {"name": "app_seconds", "help": "Latency.", "type": "histogram", "values": [
                {"value": bucket, "labels": {"le": 0.1}, "metricName": "app_seconds_bucket"},
                {"value": requests, "labels": {"le": "+Inf"}, "metricName": "app_seconds_bucket"},
                {"value": 1.5, "labels": {}, "metricName": "app_seconds_sum"},
                {"value": requests, "labels": {}, "metricName": "app_seconds_count"}],
             "aggregator": "sum"},
            {"name": "nodejs_version_info", "help": "Node.", "type": "gauge",
             "values": [{"value": 1, "labels": {"version": "v20"}}], "aggregator": "first"},
            {"name": "app_secret", "help": "", "type": "gauge",
             "values": [{"value": 1}], "aggregator": "omit"}
        ]]))
        .unwrap()
    }

    fn text(f: &[Family]) -> String {
        let mut s = String::new();
        render(f, &mut s);
        s
    }

    #[test]
    fn answers_merge_per_aggregator_and_label_set() {
        let (a, b) = (answer(100.0, 3.0, 40.0), answer(200.0, 7.0, 60.0));
        let (merged, dropped) = aggregate(&[&a, &b]);
        assert!(dropped.is_empty());
        assert_eq!(
            text(&merged),
            "# HELP app_requests_total Requests.\n# TYPE app_requests_total counter\n\
             app_requests_total{route=\"/\"} 300\n\
             # HELP app_busy Busy.\n# TYPE app_busy gauge\napp_busy 7\n\
             # HELP app_seconds Latency.\n# TYPE app_seconds histogram\n\
             app_seconds_bucket{le=\"0.1\"} 100\napp_seconds_bucket{le=\"+Inf\"} 300\n\
             app_seconds_sum 3\napp_seconds_count 300\n\
             # HELP nodejs_version_info Node.\n# TYPE nodejs_version_info gauge\n\
             nodejs_version_info{version=\"v20\"} 1\n"
        );
    }

    #[test]
    fn families_that_would_break_the_exposition_are_dropped_with_a_reason() {
        let a = parse(&json!([[
            {"name": "lb_worker_up", "help": "", "type": "gauge", "values": []},
            {"name": "x", "help": "", "type": "counter", "values": [{"value": 1}]},
            {"name": "y", "help": "", "type": "gauge", "values": [], "aggregator": "median"},
            {"name": "bad-name", "help": "", "type": "gauge", "values": []},
            {"name": "z", "help": "a \"q\"\nb\\", "type": "gauge",
             "values": [{"value": 1, "labels": {"l": "x\"y\n"}}]}
        ]]))
        .unwrap();
        let b =
            parse(&json!([[{"name": "x", "help": "", "type": "gauge", "values": []}]])).unwrap();
        let (merged, dropped) = aggregate(&[&a, &b]);
        let reasons: Vec<_> = dropped.iter().map(|(n, r)| (n.as_str(), *r)).collect();
        assert_eq!(
            reasons,
            [
                ("lb_worker_up", DropReason::NameClash),
                ("x", DropReason::TypeConflict),
                ("y", DropReason::BadAggregator),
                ("bad-name", DropReason::Malformed)
            ]
        );
        assert_eq!(
            text(&merged),
            "# HELP z a \"q\"\\nb\\\\\n# TYPE z gauge\nz{l=\"x\\\"y\\n\"} 1\n"
        );
        assert!(parse(&json!({"not": "an array"})).is_none());
        assert!(
            parse(&json!([[{"name": "n", "type": "gauge", "values": [{"value": "1"}]}]])).is_none()
        );
    }

    #[test]
    fn a_gone_worker_s_counters_stay_and_its_gauges_do_not() {
        let mut bases = Bases::default();
        bases.fold(&answer(100.0, 3.0, 40.0));
        // Its successor starts from zero, beside a worker at 200.
        let (fresh, other) = (answer(5.0, 1.0, 5.0), answer(200.0, 7.0, 60.0));
        let (mut merged, _) = aggregate(&[&fresh, &other]);
        bases.apply(&mut merged);
        let t = text(&merged);
        assert!(t.contains("app_requests_total{route=\"/\"} 305\n"), "{t}");
        assert!(t.contains("app_seconds_bucket{le=\"0.1\"} 105\n"), "{t}");
        assert!(t.contains("app_seconds_count 305\n"), "{t}");
        assert!(t.contains("app_seconds_sum 4.5\n"), "{t}");
        assert!(t.contains("app_busy 7\n"), "gauges are not carried: {t}");
        // With no live worker, the kept series are still written.
        let mut none = Vec::new();
        bases.apply(&mut none);
        let t = text(&none);
        assert!(
            t.contains("# TYPE app_requests_total counter\napp_requests_total{route=\"/\"} 100\n"),
            "{t}"
        );
        assert!(!t.contains("app_busy"), "{t}");
    }
}
