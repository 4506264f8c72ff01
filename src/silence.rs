//! Telling a worker that serves nobody from a slow one (DESIGN §12: a hang must not be silent).
//!
//! The classic silent failure under lb: a Node app whose sticky library expects another handoff
//! message (`sticky:balance`, `@socket.io/sticky`'s object) ACKs every connection lb hands it and
//! never touches one — each client waits until it gives up, and nothing is logged. lb keeps no
//! copy of a connection, so it asks the kernel ([`crate::tcpdiag`]) about the first few it
//! handed a worker, [`AFTER`] after the first: if every one of them is still open, its client
//! has sent bytes and the worker has sent **none** back, and the worker has reported nothing
//! (no stats, no request, no session), lb logs one line naming `--handoff`. A slow worker that
//! answers within those 10 s, a WebSocket server (its 101 response is a byte), a worker whose
//! clients have not spoken yet, or one that closed any of them, is never named. Checked once per
//! worker.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::tcpdiag::{self, Flow};

/// How long after its first handoff a worker is looked at.
pub const AFTER: Duration = Duration::from_secs(10);

/// Connections sampled per worker.
pub const SAMPLE: usize = 16;

/// A connection as the kernel's table keys it: (local, peer) address.
pub type Conn = (SocketAddr, SocketAddr);

/// One worker's record.
#[derive(Debug, Default, Clone)]
pub struct Watch {
    /// When lb first handed it a connection.
    first: Option<Instant>,
    /// (local, peer) of the first [`SAMPLE`] connections handed to it.
    sample: Vec<(SocketAddr, SocketAddr)>,
    /// Connections handed to it.
    pub handed: u64,
    /// It said something that shows it serves (stats, a request, a session).
    spoke: bool,
    /// Looked at already (or no longer worth it).
    done: bool,
}

impl Watch {
    /// A connection with these addresses (when known) was handed over (`now` is read for the
    /// first only: the hot path reads no clock).
    pub fn handed(
        &mut self,
        addrs: Option<(SocketAddr, SocketAddr)>,
        now: impl FnOnce() -> Instant,
    ) {
        self.handed += 1;
        self.first.get_or_insert_with(now);
        if let Some((l, p)) = addrs
            && self.sample.len() < SAMPLE
        {
            self.sample
                .push((tcpdiag::canonical(l), tcpdiag::canonical(p)));
        }
    }

    /// Whether the next handoff's addresses are wanted.
    pub fn wants_sample(&self) -> bool {
        !self.done && !self.spoke && self.sample.len() < SAMPLE
    }

    /// The worker reported serving something.
    pub fn spoke(&mut self) {
        self.spoke = true;
    }

    /// The sample to look at, once it is due (once).
    pub fn due(&mut self, now: Instant) -> Option<Vec<(SocketAddr, SocketAddr)>> {
        if self.done || self.spoke || self.first.is_none_or(|t| now < t + AFTER) {
            return None;
        }
        self.done = true;
        Some(std::mem::take(&mut self.sample))
    }
}

/// Whether, by the kernel's counts, the worker answered none of `sample`: every one still open,
/// each with bytes from its client and not one byte back.
pub fn serves_none(
    sample: &[(SocketAddr, SocketAddr)],
    flow: impl Fn(&(SocketAddr, SocketAddr)) -> Option<Flow>,
) -> bool {
    !sample.is_empty()
        && sample
            .iter()
            .all(|k| flow(k).is_some_and(|f| f.sent == 0 && f.received > 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn a(port: u16) -> (SocketAddr, SocketAddr) {
        (
            "127.0.0.1:8000".parse().unwrap(),
            SocketAddr::from(([127, 0, 0, 2], port)),
        )
    }

    #[test]
    fn only_a_worker_that_answered_nobody_who_spoke_is_named() {
        let flows: HashMap<_, _> = [
            (
                a(1),
                Flow {
                    sent: 0,
                    received: 80,
                },
            ),
            (
                a(2),
                Flow {
                    sent: 0,
                    received: 95,
                },
            ),
            (
                a(3),
                Flow {
                    sent: 120,
                    received: 80,
                },
            ),
            (
                a(4),
                Flow {
                    sent: 0,
                    received: 0,
                },
            ),
        ]
        .into();
        let f = |k: &(SocketAddr, SocketAddr)| flows.get(k).copied();
        assert!(serves_none(&[a(1), a(2)], f));
        assert!(!serves_none(&[a(1), a(3)], f), "one was answered");
        assert!(
            !serves_none(&[a(1), a(4)], f),
            "a client that has not spoken"
        );
        assert!(!serves_none(&[a(1), a(9)], f), "one was closed");
        assert!(!serves_none(&[], f));
    }

    #[test]
    fn a_worker_is_looked_at_once_ten_seconds_after_its_first_handoff_unless_it_spoke() {
        let t = Instant::now();
        let mut w = Watch::default();
        assert_eq!(w.due(t + AFTER), None, "never handed anything");
        w.handed(Some(a(1)), || t);
        w.handed(Some(a(2)), || t + Duration::from_secs(3));
        assert_eq!(w.due(t + AFTER - Duration::from_millis(1)), None);
        assert_eq!(w.due(t + AFTER), Some(vec![a(1), a(2)]));
        assert_eq!(w.due(t + AFTER * 2), None, "once");
        let mut quiet = Watch::default();
        quiet.handed(Some(a(1)), || t);
        quiet.spoke();
        assert_eq!(quiet.due(t + AFTER), None);
        assert!(!quiet.wants_sample());
    }
}
