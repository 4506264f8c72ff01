//! The acceptor: the master's accept loop and the connections that wait for their first bytes.
//!
//! - **Accepting** in batches of [`ACCEPT_BATCH`] per wakeup (other work gets a turn between
//!   two), classifying errors: a transient one is counted, running out of fds or memory pauses
//!   accepting for [`ACCEPT_PAUSE`] (a level-triggered listener would otherwise spin) and is
//!   logged at most once per 5 s.
//! - **Waiting for first bytes** (today the PROXY header; the peeked keys of DESIGN §12–13 join
//!   the same set): most connections already carry what lb looks for when they are accepted and
//!   never wait. The others wait off the accept loop in one bounded [`WaitSet`], each with its
//!   own deadline. When the set is full, the **oldest** waiter is closed (counted `overflow`) to
//!   make room: refusing the newcomer instead would let anyone who can open connections lock
//!   every good client out by holding all the places (PITFALLS §16).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::config::Settings;
use crate::dispatch::Handoff;
use crate::listener::{AcceptError, Listener};
use crate::loglimit::LogLimit;
use crate::metrics::{AcceptErrorKind, Metrics};
use crate::proxy;

/// Pause of the accept loop after running out of fds or memory.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Accepts per wakeup before other work gets a turn.
const ACCEPT_BATCH: usize = 64;

/// A bounded set of tasks, each waiting for something about one connection; the oldest is
/// evicted when a newcomer needs its place. Each task reports its outcome once, tagged with its
/// id, unless it was evicted first.
pub struct WaitSet<T> {
    /// The most that wait at once.
    cap: usize,
    /// The next task's id (ids only grow: the smallest is the oldest).
    next: u64,
    /// The tasks still waiting, oldest first.
    tasks: BTreeMap<u64, AbortHandle>,
    tx: mpsc::UnboundedSender<(u64, T)>,
    rx: mpsc::UnboundedReceiver<(u64, T)>,
}

impl<T: Send + 'static> WaitSet<T> {
    /// An empty set holding at most `cap` waiters.
    pub fn new(cap: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            cap: cap.max(1),
            next: 0,
            tasks: BTreeMap::new(),
            tx,
            rx,
        }
    }

    /// How many wait.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether a newcomer needs an eviction first.
    pub fn is_full(&self) -> bool {
        self.tasks.len() >= self.cap
    }

    /// Closes the oldest waiter (dropping its future drops its connection); `false` if none
    /// could be evicted. A task that has already finished is not evicted: its outcome is on its
    /// way and is still delivered.
    pub fn evict_oldest(&mut self) -> bool {
        while let Some((_, task)) = self.tasks.pop_first() {
            if !task.is_finished() {
                task.abort();
                return true;
            }
        }
        false
    }

    /// Starts waiting with `wait`, whose output is reported by [`WaitSet::recv`]. The caller
    /// makes room first ([`WaitSet::is_full`], [`WaitSet::evict_oldest`]).
    pub fn spawn(&mut self, wait: impl Future<Output = T> + Send + 'static) {
        let id = self.next;
        self.next += 1;
        let tx = self.tx.clone();
        let task = tokio::spawn(async move {
            let _ = tx.send((id, wait.await));
        });
        self.tasks.insert(id, task.abort_handle());
    }

    /// The next outcome (never `None`: the set holds a sender itself).
    pub async fn recv(&mut self) -> Option<T> {
        let (id, outcome) = self.rx.recv().await?;
        self.tasks.remove(&id);
        Some(outcome)
    }
}

/// A connection whose PROXY header lb waited for: the peer, and the header or why not.
type HeaderDone = (
    SocketAddr,
    Result<(TcpStream, proxy::Header), proxy::Failure>,
);

/// The accept loop's state.
pub struct Acceptor {
    /// Accepting is paused until then (fds or memory ran out).
    paused_until: Option<Instant>,
    /// "accept failed" lines.
    exhausted_log: LogLimit,
    /// Connections waiting for their PROXY header.
    headers: WaitSet<HeaderDone>,
    /// "closed a connection whose PROXY header was …" lines.
    proxy_log: LogLimit,
}

impl Default for Acceptor {
    fn default() -> Self {
        Self {
            paused_until: None,
            exhausted_log: LogLimit::default(),
            headers: WaitSet::new(proxy::MAX_PENDING),
            proxy_log: LogLimit::default(),
        }
    }
}

impl Acceptor {
    /// Whether accepting is paused at `now` (clearing a pause that has ended).
    pub fn paused(&mut self, now: Instant) -> bool {
        if self.paused_until.is_some_and(|t| t <= now) {
            self.paused_until = None;
        }
        self.paused_until.is_some()
    }

    /// When a pause ends.
    pub fn deadline(&self) -> Option<Instant> {
        self.paused_until
    }

    /// Pauses accepting (the listener failed).
    pub fn pause(&mut self, now: Instant) {
        self.paused_until = Some(now + ACCEPT_PAUSE);
    }

    /// How many connections wait for their first bytes.
    pub fn waiting(&self) -> usize {
        self.headers.len()
    }

    /// Accepts what is queued (at most one batch); each connection goes to `route` now or once
    /// its PROXY header is in.
    pub fn accept_batch(
        &mut self,
        guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, socket2::Socket>,
        settings: &Settings,
        metrics: &Metrics,
        route: &mut impl FnMut(Handoff),
    ) {
        for _ in 0..ACCEPT_BATCH {
            match Listener::accept(guard) {
                Ok((stream, peer)) => {
                    metrics.accepted.inc();
                    if settings.proxy_protocol != proxy::Mode::Off
                        && proxy::trusted(&settings.proxy_trusted, peer.ip())
                    {
                        self.await_header(stream, peer, settings, metrics, route);
                    } else {
                        route(Handoff::new(stream, peer));
                    }
                }
                Err((AcceptError::WouldBlock, _)) => return,
                Err((AcceptError::Transient, _)) => {
                    metrics.accept_error(AcceptErrorKind::Transient)
                }
                Err((kind, e)) => {
                    metrics.accept_error(if kind == AcceptError::Exhausted {
                        AcceptErrorKind::Exhausted
                    } else {
                        AcceptErrorKind::Other
                    });
                    let now = Instant::now();
                    if self.exhausted_log.hit(now).is_some() {
                        let e = e.map(|e| e.to_string()).unwrap_or_default();
                        tracing::warn!(
                            "accept failed ({e}); pausing accepts for {ACCEPT_PAUSE:?} (logged at most every 5s)"
                        );
                    }
                    self.pause(now);
                    return;
                }
            }
        }
    }

    /// A connection from a trusted source: route it once its PROXY header is in. Most headers
    /// are there at accept; the others wait in the bounded set, each with a deadline.
    fn await_header(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        settings: &Settings,
        metrics: &Metrics,
        route: &mut impl FnMut(Handoff),
    ) {
        let mode = settings.proxy_protocol;
        match proxy::parse_now(&stream, mode) {
            proxy::Now::Done(h) => self.header_done((peer, Ok((stream, h))), metrics, route),
            proxy::Now::Failed(f) => self.header_done((peer, Err(f)), metrics, route),
            proxy::Now::Wait => {
                if self.headers.is_full() && self.headers.evict_oldest() {
                    self.refused(None, proxy::Failure::Overflow, metrics);
                }
                let timeout = settings.proxy_timeout;
                self.headers
                    .spawn(async move { (peer, proxy::await_header(stream, mode, timeout).await) });
            }
        }
    }

    /// The next connection whose wait ended.
    pub async fn waited(&mut self) -> Option<HeaderDone> {
        self.headers.recv().await
    }

    /// Routes a connection whose header is in, or closes and counts one whose header failed.
    pub fn header_done(
        &mut self,
        (peer, result): HeaderDone,
        metrics: &Metrics,
        route: &mut impl FnMut(Handoff),
    ) {
        match result {
            Ok((stream, h)) => route(Handoff::proxied(stream, peer, h.client)),
            Err(reason) => self.refused(Some(peer), reason, metrics),
        }
    }

    /// Counts (and now and then logs) a connection closed for its PROXY header.
    fn refused(&mut self, peer: Option<SocketAddr>, reason: proxy::Failure, metrics: &Metrics) {
        metrics.proxy_error(reason);
        if let Some(n) = self.proxy_log.hit(Instant::now()) {
            let peer = peer.map_or_else(|| "the oldest waiting".to_string(), |p| p.to_string());
            tracing::warn!(
                %peer,
                "closed a connection whose PROXY header was {}; {n} closed for a PROXY header since the last such line (see lb_proxy_header_errors_total)",
                proxy::describe(reason),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_set_evicts_its_oldest_waiter_and_delivers_the_rest() {
        let mut set = WaitSet::new(2);
        let (tx0, rx0) = tokio::sync::oneshot::channel::<()>();
        let (tx1, rx1) = tokio::sync::oneshot::channel::<()>();
        let (tx2, rx2) = tokio::sync::oneshot::channel::<()>();
        set.spawn(async move { (0, rx0.await.is_ok()) });
        set.spawn(async move { (1, rx1.await.is_ok()) });
        assert!(set.is_full());
        assert!(set.evict_oldest());
        set.spawn(async move { (2, rx2.await.is_ok()) });
        assert_eq!(set.len(), 2);
        // The evicted waiter's future is dropped: its end of the channel closes.
        tokio::task::yield_now().await;
        assert!(tx0.send(()).is_err(), "the oldest waiter was dropped");
        tx2.send(()).unwrap();
        assert_eq!(set.recv().await, Some((2, true)));
        tx1.send(()).unwrap();
        assert_eq!(set.recv().await, Some((1, true)));
        assert_eq!(set.len(), 0);
        assert!(!set.evict_oldest(), "nothing left to evict");
    }

    #[tokio::test]
    async fn a_waiter_that_already_finished_is_delivered_not_evicted() {
        let mut set = WaitSet::new(1);
        set.spawn(async { "done" });
        tokio::task::yield_now().await; // it runs, sends and finishes
        assert!(!set.evict_oldest(), "a finished waiter is not evicted");
        assert_eq!(set.recv().await, Some("done"));
    }
}
