//! socket.io sessions and the workers that own them (`--handoff socket.io`, DESIGN §12).
//!
//! `@socket.io/sticky`'s workers tell their primary of each engine.io session they open
//! (`{type:"sticky:connection", data: sid}`) and close (`sticky:disconnection`). lb keeps, per
//! worker, the sessions it owns, so that
//! - a request whose request line carries `sid=<id>` of a live session goes to its owner (what
//!   `setupMaster` does, and what keeps long-polling working when many clients share one IP);
//! - `least-connections` counts sessions, as `@socket.io/sticky`'s `least-connection` method does —
//!   and, unlike it, also counts a new session from the moment its first request is handed over
//!   (until the worker's notice arrives, at most [`FRESH_TTL`]), so a burst of new clients does
//!   not all land on the worker that was least loaded when the burst began.
//!
//! Bounded: at most [`MAX_SESSIONS`] in all (further notices are ignored until some close); a
//! worker's sessions go when it exits. Pure: no I/O, the clock is passed in.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::slot::WorkerId;

/// The most sessions lb remembers at once.
pub const MAX_SESSIONS: usize = 1 << 20;

/// How long a handed-over first request counts as a session before its worker's notice.
pub const FRESH_TTL: Duration = Duration::from_secs(5);

/// One worker's sessions.
#[derive(Debug, Default)]
struct Owned {
    /// The sessions it reported open.
    sids: HashSet<Box<str>>,
    /// When each new-session handoff not yet confirmed by a notice was made, oldest first.
    fresh: VecDeque<Instant>,
}

/// Every worker's sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    /// Session → its worker.
    owner: HashMap<Box<str>, WorkerId>,
    /// Worker → what it owns.
    by_worker: HashMap<WorkerId, Owned>,
    /// Notices ignored because [`MAX_SESSIONS`] were known.
    pub ignored: u64,
}

impl Sessions {
    /// `id` opened session `sid`. Returns false when the table is full (not recorded).
    pub fn opened(&mut self, id: WorkerId, sid: &str) -> bool {
        if !self.owner.contains_key(sid) && self.owner.len() >= MAX_SESSIONS {
            self.ignored += 1;
            return false;
        }
        if let Some(prev) = self.owner.insert(sid.into(), id)
            && prev != id
            && let Some(o) = self.by_worker.get_mut(&prev)
        {
            o.sids.remove(sid);
        }
        let o = self.by_worker.entry(id).or_default();
        o.sids.insert(sid.into());
        o.fresh.pop_front();
        true
    }

    /// `id` closed session `sid`.
    pub fn closed(&mut self, id: WorkerId, sid: &str) {
        if self.owner.get(sid) == Some(&id) {
            self.owner.remove(sid);
        }
        if let Some(o) = self.by_worker.get_mut(&id) {
            o.sids.remove(sid);
        }
    }

    /// `id` is gone: its sessions with it.
    pub fn forget(&mut self, id: WorkerId) {
        if let Some(o) = self.by_worker.remove(&id) {
            for sid in o.sids {
                if self.owner.get(&sid) == Some(&id) {
                    self.owner.remove(&sid);
                }
            }
        }
    }

    /// The worker that owns `sid`.
    pub fn owner(&self, sid: &str) -> Option<WorkerId> {
        self.owner.get(sid).copied()
    }

    /// A connection that may start a new session was handed to `id` at `now`.
    pub fn handed_new(&mut self, id: WorkerId, now: Instant) {
        self.by_worker.entry(id).or_default().fresh.push_back(now);
    }

    /// Forgets new-session handoffs older than [`FRESH_TTL`] (they started no session).
    pub fn expire(&mut self, now: Instant) {
        for o in self.by_worker.values_mut() {
            while o
                .fresh
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) >= FRESH_TTL)
            {
                o.fresh.pop_front();
            }
        }
    }

    /// The sessions `id` owns.
    pub fn count(&self, id: WorkerId) -> usize {
        self.by_worker.get(&id).map_or(0, |o| o.sids.len())
    }

    /// `id`'s load for least-connections: its sessions and the new ones on their way.
    pub fn load(&self, id: WorkerId) -> u64 {
        self.by_worker
            .get(&id)
            .map_or(0, |o| (o.sids.len() + o.fresh.len()) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(slot: usize, generation: u64) -> WorkerId {
        WorkerId { slot, generation }
    }

    #[test]
    fn sessions_belong_to_the_worker_that_opened_them_until_it_closes_them_or_dies() {
        let mut s = Sessions::default();
        let (a, b) = (w(0, 1), w(1, 1));
        assert!(s.opened(a, "AAAAAAAAAAAAAAAAAAAA"));
        assert!(s.opened(b, "BBBBBBBBBBBBBBBBBBBB"));
        assert_eq!(s.owner("AAAAAAAAAAAAAAAAAAAA"), Some(a));
        assert_eq!((s.count(a), s.count(b)), (1, 1));
        s.closed(a, "AAAAAAAAAAAAAAAAAAAA");
        assert_eq!(s.owner("AAAAAAAAAAAAAAAAAAAA"), None);
        // Another worker's close of a session it does not own changes nothing.
        s.closed(a, "BBBBBBBBBBBBBBBBBBBB");
        assert_eq!(s.owner("BBBBBBBBBBBBBBBBBBBB"), Some(b));
        s.forget(b);
        assert_eq!(s.owner("BBBBBBBBBBBBBBBBBBBB"), None);
        assert_eq!(s.count(b), 0);
        // The slot's next worker starts with none.
        assert_eq!(s.count(w(1, 2)), 0);
    }

    #[test]
    fn a_new_session_counts_from_its_handoff_until_its_notice_or_the_ttl() {
        let mut s = Sessions::default();
        let (a, t) = (w(0, 1), Instant::now());
        s.handed_new(a, t);
        s.handed_new(a, t);
        assert_eq!(s.load(a), 2, "counted at handoff");
        assert!(s.opened(a, "s1"));
        assert_eq!(s.load(a), 2, "the notice replaces its handoff");
        s.expire(t + FRESH_TTL);
        assert_eq!(
            s.load(a),
            1,
            "a handoff that opened no session stops counting"
        );
    }

    #[test]
    fn a_session_reported_again_by_another_worker_moves() {
        let mut s = Sessions::default();
        let (a, b) = (w(0, 1), w(1, 1));
        s.opened(a, "x");
        s.opened(b, "x");
        assert_eq!((s.owner("x"), s.count(a), s.count(b)), (Some(b), 0, 1));
    }
}
