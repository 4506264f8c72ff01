//! One scrape's collection of the workers' answers, without I/O: the shell sends the requests it
//! is told to and passes the answers, exits and the clock in.
//!
//! - A scrape asks every live Node worker (`getMetricsReq` with a fresh `requestId`) and waits
//!   for those that may answer, at most `--app-metrics-timeout`. A scrape that arrives while one
//!   is collecting joins it: concurrent scrapes do not multiply the requests.
//! - A worker that has never answered is asked, but after its first miss it is not waited for
//!   until it answers once (a sticky-session worker without prom-client costs nothing).
//! - A worker that misses a scrape (stopped, busy) is counted (`lb_app_metrics_timeouts_total`)
//!   and contributes its last answer's counter series, so the sums do not dip; its gauges are
//!   left out of that scrape.
//! - A gone worker's last counters become [`Bases`].

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Bases, DropReason, Family, aggregate, is_counter_like, parse, render};
use crate::slot::WorkerId;

/// The most one answer may hold (series); a larger one is dropped (`too_large`).
pub const MAX_SERIES_PER_ANSWER: usize = 50_000;

/// The most one scrape serves of the app's series, merged (about 5 MiB of text); families past
/// it are left out of that scrape (`too_large`), in the order the workers list them, so the same
/// ones go each time.
pub const MAX_SERIES_PER_SCRAPE: usize = 100_000;

/// What lb knows of one worker's answers.
#[derive(Debug, Default)]
struct Known {
    /// It answered at least once.
    answered: bool,
    /// It has never answered and missed a scrape: not waited for.
    skipped: bool,
    /// Its last good answer.
    last: Option<Vec<Family>>,
}

/// A collection in progress.
#[derive(Debug)]
struct Round<W> {
    id: u64,
    deadline: Instant,
    /// Workers asked this round (a late answer from one of them still counts as its last).
    asked: HashSet<WorkerId>,
    /// Workers waited for that have not answered.
    awaited: HashSet<WorkerId>,
    /// Fresh answers.
    answers: HashMap<WorkerId, Vec<Family>>,
    waiters: Vec<W>,
}

/// What an in-place upgrade carries to lb's next image: gone workers' counters, and the live
/// workers' last answers (so a worker that dies before the next image's first scrape still
/// leaves its counters).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Carried {
    /// Gone workers' counters.
    pub bases: Bases,
    /// (slot, generation, last answer) of the live workers.
    pub last: Vec<(usize, u64, Vec<Family>)>,
}

/// What the shell should do for a new scrape.
#[derive(Debug, PartialEq, Eq)]
pub enum Begin {
    /// Send `{type:"prom-client:getMetricsReq", requestId}` to these workers.
    Ask(u64, Vec<WorkerId>),
    /// A collection is under way: the scrape joined it.
    Joined,
}

/// The app metrics state of the master. `W` is what waits for the text (a reply channel).
#[derive(Debug)]
pub struct Collector<W> {
    timeout: Duration,
    next_id: u64,
    round: Option<Round<W>>,
    known: HashMap<WorkerId, Known>,
    /// Gone workers' counters.
    pub bases: Bases,
}

impl<W> Collector<W> {
    /// A collector waiting at most `timeout` per scrape.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            next_id: 1,
            round: None,
            known: HashMap::new(),
            bases: Bases::default(),
        }
    }

    /// What lb's next image needs to go on counting.
    pub fn carry(&self) -> Carried {
        Carried {
            bases: self.bases.clone(),
            last: self
                .known
                .iter()
                .filter_map(|(w, k)| Some((w.slot, w.generation, k.last.clone()?)))
                .collect(),
        }
    }

    /// Goes on from what lb's previous image carried.
    pub fn restore(&mut self, c: Carried) {
        self.bases = c.bases;
        for (slot, generation, last) in c.last {
            self.known.insert(
                WorkerId { slot, generation },
                Known {
                    answered: true,
                    skipped: false,
                    last: Some(last),
                },
            );
        }
    }

    /// A new `--app-metrics-timeout`.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// A scrape: it joins the collection under way, or starts one over `live` workers.
    pub fn begin(&mut self, waiter: W, live: &[WorkerId], now: Instant) -> Begin {
        if let Some(r) = &mut self.round {
            r.waiters.push(waiter);
            return Begin::Joined;
        }
        let id = self.next_id;
        self.next_id += 1;
        let awaited = live
            .iter()
            .copied()
            .filter(|w| !self.known.get(w).is_some_and(|k| k.skipped))
            .collect();
        self.round = Some(Round {
            id,
            deadline: now + self.timeout,
            asked: live.iter().copied().collect(),
            awaited,
            answers: HashMap::new(),
            waiters: vec![waiter],
        });
        Begin::Ask(id, live.to_vec())
    }

    /// When the collection under way gives up on the workers it still waits for.
    pub fn deadline(&self) -> Option<Instant> {
        self.round.as_ref().map(|r| r.deadline)
    }

    /// Whether the collection under way has every answer it waits for (or passed its deadline).
    pub fn done(&self, now: Instant) -> bool {
        self.round
            .as_ref()
            .is_some_and(|r| r.awaited.is_empty() || now >= r.deadline)
    }

    /// A `getMetricsRes` from worker `from`: `Ok(metrics)` or `Err(error)`. Returns the reason
    /// to count if it is dropped.
    pub fn answer(
        &mut self,
        from: WorkerId,
        request_id: Option<u64>,
        result: Result<&Value, &str>,
    ) -> Option<DropReason> {
        let outcome = match result {
            Err(_) => Err(DropReason::Error),
            Ok(v) => match parse(v) {
                None => Err(DropReason::Malformed),
                Some(f)
                    if f.iter().map(|f| f.values.len()).sum::<usize>() > MAX_SERIES_PER_ANSWER =>
                {
                    Err(DropReason::TooLarge)
                }
                Some(f) => Ok(f),
            },
        };
        let known = self.known.entry(from).or_default();
        known.answered = true;
        known.skipped = false;
        let round = self.round.as_mut().filter(|r| Some(r.id) == request_id);
        match outcome {
            Ok(f) => {
                if let Some(r) = round {
                    r.awaited.remove(&from);
                    r.answers.insert(from, f.clone());
                }
                known.last = Some(f);
                None
            }
            Err(why) => {
                if let Some(r) = round {
                    r.awaited.remove(&from);
                }
                Some(why)
            }
        }
    }

    /// A worker's channel sent a line too long to read while lb waited for its answer.
    pub fn too_long(&mut self, from: WorkerId) -> bool {
        self.round.as_mut().is_some_and(|r| r.awaited.remove(&from))
    }

    /// Worker `id` is gone: its last counters are kept.
    pub fn gone(&mut self, id: WorkerId) {
        if let Some(k) = self.known.remove(&id)
            && let Some(last) = k.last
        {
            self.bases.fold(&last);
        }
        if let Some(r) = &mut self.round {
            r.awaited.remove(&id);
            r.asked.remove(&id);
        }
    }

    /// Ends the collection under way: the text for its waiters, the workers that missed it
    /// (counted by the caller), and the families dropped while merging.
    pub fn finish(&mut self) -> Option<Finished<W>> {
        let r = self.round.take()?;
        let missed: Vec<WorkerId> = r.awaited.iter().copied().collect();
        for w in &missed {
            let k = self.known.entry(*w).or_default();
            if !k.answered {
                k.skipped = true;
            }
        }
        // Workers asked that did not answer in time: their last counters, so that sums hold.
        let stale: Vec<Vec<Family>> = r
            .asked
            .iter()
            .filter(|w| !r.answers.contains_key(w))
            .filter_map(|w| self.known.get(w)?.last.as_ref())
            .map(|last| {
                last.iter()
                    .map(|f| Family {
                        values: f
                            .values
                            .iter()
                            .filter(|s| is_counter_like(f, s))
                            .cloned()
                            .collect(),
                        ..f.clone()
                    })
                    .filter(|f| !f.values.is_empty())
                    .collect()
            })
            .collect();
        let mut ids: Vec<&WorkerId> = r.answers.keys().collect();
        ids.sort_by_key(|w| (w.slot, w.generation));
        let mut all: Vec<&[Family]> = ids.iter().map(|w| r.answers[w].as_slice()).collect();
        all.extend(stale.iter().map(Vec::as_slice));
        let (mut merged, mut dropped) = aggregate(&all);
        self.bases.apply(&mut merged);
        let mut room = MAX_SERIES_PER_SCRAPE;
        merged.retain(|f| {
            if f.values.len() <= room {
                room -= f.values.len();
                true
            } else {
                room = 0;
                dropped.push((f.name.clone(), DropReason::TooLarge));
                false
            }
        });
        let mut text = String::new();
        render(&merged, &mut text);
        Some(Finished {
            text,
            waiters: r.waiters,
            missed,
            dropped,
        })
    }
}

/// The outcome of a collection.
#[derive(Debug)]
pub struct Finished<W> {
    /// Prometheus text of the app's families.
    pub text: String,
    /// Who waits for it.
    pub waiters: Vec<W>,
    /// Workers waited for that did not answer in time.
    pub missed: Vec<WorkerId>,
    /// Families left out, and why.
    pub dropped: Vec<(String, DropReason)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn w(slot: usize) -> WorkerId {
        WorkerId {
            slot,
            generation: 1,
        }
    }

    fn counter(v: f64) -> Value {
        json!([[{"name": "c_total", "help": "", "type": "counter",
                  "values": [{"value": v, "labels": {}}]},
                 {"name": "g", "help": "", "type": "gauge", "values": [{"value": v}]}]])
    }

    #[test]
    fn a_scrape_over_the_series_limit_leaves_the_last_families_out() {
        let t = Instant::now();
        let mut c = Collector::new(Duration::from_millis(500));
        let workers = [w(0), w(1), w(2)];
        let Begin::Ask(id, _) = c.begin("a", &workers, t) else {
            panic!("a fresh scrape asks");
        };
        // Three workers, each a family of its own of 40,000 series: 120,000 in all.
        for (i, wk) in workers.iter().enumerate() {
            let values: Vec<Value> = (0..40_000)
                .map(|n| json!({"value": 1, "labels": {"n": n.to_string()}}))
                .collect();
            let answer = json!([[{"name": format!("f{i}_total"), "help": "", "type": "counter",
                                 "values": values}]]);
            assert_eq!(c.answer(*wk, Some(id), Ok(&answer)), None);
        }
        assert!(c.done(t));
        let f = c.finish().unwrap();
        assert_eq!(f.dropped, [("f2_total".to_owned(), DropReason::TooLarge)]);
        assert!(f.text.contains("f0_total{n=\"39999\"} 1\n"));
        assert!(f.text.contains("f1_total{n=\"0\"} 1\n"));
        assert!(!f.text.contains("f2_total"));
    }

    #[test]
    fn concurrent_scrapes_share_one_collection_and_a_miss_is_not_waited_for_again() {
        let t = Instant::now();
        let mut c = Collector::new(Duration::from_millis(500));
        assert_eq!(
            c.begin("a", &[w(0), w(1)], t),
            Begin::Ask(1, vec![w(0), w(1)])
        );
        assert_eq!(c.begin("b", &[w(0), w(1)], t), Begin::Joined);
        assert_eq!(c.answer(w(0), Some(1), Ok(&counter(3.0))), None);
        assert!(!c.done(t), "slot 1 is still awaited");
        assert!(c.done(t + Duration::from_millis(500)));
        let f = c.finish().unwrap();
        assert_eq!(f.waiters, ["a", "b"]);
        assert_eq!(f.missed, [w(1)]);
        assert!(f.text.contains("c_total 3\n"), "{}", f.text);
        // Slot 1 never answered: the next scrape asks it but does not wait.
        assert_eq!(
            c.begin("c", &[w(0), w(1)], t),
            Begin::Ask(2, vec![w(0), w(1)])
        );
        c.answer(w(0), Some(2), Ok(&counter(4.0)));
        assert!(c.done(t));
        assert!(c.finish().unwrap().missed.is_empty());
    }

    #[test]
    fn a_missed_answer_keeps_its_counters_and_a_gone_worker_becomes_a_base() {
        let t = Instant::now();
        let mut c = Collector::new(Duration::from_millis(500));
        c.begin((), &[w(0), w(1)], t);
        c.answer(w(0), Some(1), Ok(&counter(10.0)));
        c.answer(w(1), Some(1), Ok(&counter(20.0)));
        assert!(c.finish().unwrap().text.contains("c_total 30\n"));
        // Slot 1 stops answering: its counter stays in the sum, its gauge goes.
        c.begin((), &[w(0), w(1)], t);
        c.answer(w(0), Some(2), Ok(&counter(11.0)));
        let f = c.finish().unwrap();
        assert_eq!(f.missed, [w(1)]);
        assert!(f.text.contains("c_total 31\n"), "{}", f.text);
        assert!(f.text.contains("g 11\n"), "{}", f.text);
        // It dies; its successor starts at 0.
        c.gone(w(1));
        let next = WorkerId {
            slot: 1,
            generation: 2,
        };
        c.begin((), &[w(0), next], t);
        c.answer(w(0), Some(3), Ok(&counter(12.0)));
        c.answer(next, Some(3), Ok(&counter(1.0)));
        assert!(c.finish().unwrap().text.contains("c_total 33\n"));
        // Bad answers are dropped with a reason; a stale request id does not end a round.
        c.begin((), &[w(0)], t);
        assert_eq!(
            c.answer(w(0), Some(1), Err("boom")),
            Some(DropReason::Error)
        );
        assert!(!c.done(t), "an answer to an older request");
        assert_eq!(
            c.answer(w(0), Some(4), Ok(&json!("x"))),
            Some(DropReason::Malformed)
        );
        assert!(c.done(t));
    }
}
