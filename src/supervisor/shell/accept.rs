//! The acceptor: the master's accept loop and the connections that wait for their first bytes.
//!
//! - **Accepting** in batches of [`ACCEPT_BATCH`] per wakeup (other work gets a turn between
//!   two), classifying errors: a transient one is counted, running out of fds or memory pauses
//!   accepting for [`ACCEPT_PAUSE`] (a level-triggered listener would otherwise spin) and is
//!   logged at most once per 5 s.
//! - **Waiting for first bytes**: the PROXY header (`--proxy-protocol`), then the request line
//!   (`--handoff socket.io`: the session id a request names, [`crate::peek`]). Connections that
//!   already carry what lb looks for when they are accepted never wait. The others wait off the
//!   accept loop in one bounded [`WaitSet`], each with its own deadlines: a header not complete
//!   in `--proxy-timeout` closes the connection; a request line not there in `--peek-timeout`
//!   is simply routed by the policy. When the set is full, the **oldest** waiter is closed (counted `overflow`) to
//!   make room: refusing the newcomer instead would let anyone who can open connections lock
//!   every good client out by holding all the places (PITFALLS §16).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::channel::HandoffMsg;
use crate::config::Settings;
use crate::dispatch::Handoff;
use crate::listener::{AcceptError, Listener};
use crate::loglimit::LogLimit;
use crate::metrics::{AcceptErrorKind, Metrics, PeekResult};
use crate::peek::{self, Found};
use crate::proxy;

/// Pause of the accept loop after running out of fds or memory.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Accepts per wakeup before other work gets a turn.
const ACCEPT_BATCH: usize = 64;

/// A bounded set of tasks, each waiting for something about one connection; the oldest is
/// evicted when a newcomer needs its place. Each task reports its outcome once, tagged with its
/// id. An evicted task is told so ([`Evict`] resolves) and ends at once with what it holds: it
/// decides what becomes of its connection (closed, or routed as it is), and still reports.
pub struct WaitSet<T> {
    /// The most that wait at once.
    cap: usize,
    /// The next task's id (ids only grow: the smallest is the oldest).
    next: u64,
    /// The tasks still waiting (not evicted, not reported), oldest first.
    tasks: BTreeMap<u64, oneshot::Sender<()>>,
    tx: mpsc::UnboundedSender<(u64, T)>,
    rx: mpsc::UnboundedReceiver<(u64, T)>,
}

/// Resolves when the waiter is evicted from its [`WaitSet`].
pub struct Evict(oneshot::Receiver<()>);

impl Evict {
    /// Waits for the eviction (never, for a waiter that is not evicted).
    pub async fn evicted(self) {
        if self.0.await.is_err() {
            // The set itself is gone (lb is exiting): nothing to make room for.
            std::future::pending::<()>().await;
        }
    }
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

    /// Tells the oldest waiter to give up its place; `false` if none was waiting. A task that
    /// has already finished is skipped (its outcome is on its way).
    pub fn evict_oldest(&mut self) -> bool {
        while let Some((_, evict)) = self.tasks.pop_first() {
            if evict.send(()).is_ok() {
                return true;
            }
        }
        false
    }

    /// Starts a waiter: `wait` gets its [`Evict`] and returns the future whose output
    /// [`WaitSet::recv`] reports. The caller makes room first ([`WaitSet::is_full`],
    /// [`WaitSet::evict_oldest`]).
    pub fn spawn<F: Future<Output = T> + Send + 'static>(&mut self, wait: impl FnOnce(Evict) -> F) {
        let id = self.next;
        self.next += 1;
        let (evict_tx, evict_rx) = oneshot::channel();
        let fut = wait(Evict(evict_rx));
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let _ = tx.send((id, fut.await));
        });
        self.tasks.insert(id, evict_tx);
    }

    /// The next outcome (never `None`: the set holds a sender itself).
    pub async fn recv(&mut self) -> Option<T> {
        let (id, outcome) = self.rx.recv().await?;
        self.tasks.remove(&id);
        Some(outcome)
    }
}

/// A connection whose first bytes lb waited for: its peer, and what they said (the PROXY header
/// if one was expected, what the request line gave if it was looked at) or why it is refused.
type Waited = (
    SocketAddr,
    Result<(TcpStream, Option<proxy::Header>, Option<Found>), proxy::Failure>,
);

/// Where a waiting connection is.
enum Stage {
    /// Its PROXY header is not complete.
    Header,
    /// Its header (if any) is in; its request line is not.
    Line(Option<proxy::Header>),
}

/// What lb looks for in connections' first bytes.
#[derive(Clone)]
struct Looks {
    /// `--proxy-protocol` for this connection's source.
    proxy: proxy::Mode,
    proxy_timeout: Duration,
    /// The request head (socket.io's sid, `--hash-key`), for at most this long.
    head: Option<(peek::Want, Duration)>,
}

impl Looks {
    /// How many peeked bytes precede the request line: a header `keep` left in the stream.
    fn skip(&self, header: Option<proxy::Header>) -> usize {
        match (self.proxy, header) {
            (proxy::Mode::Keep, Some(h)) => h.len,
            _ => 0,
        }
    }
}

/// Waits for what a connection still lacks. Evicted while its PROXY header is incomplete, it
/// is closed (`overflow`); while only its request line is missing, it is routed as it is.
async fn first_bytes(
    stream: TcpStream,
    peer: SocketAddr,
    stage: Stage,
    looks: Looks,
    evict: Evict,
) -> Waited {
    let mut evicted = std::pin::pin!(evict.evicted());
    let (stream, header) = match stage {
        Stage::Header => {
            let header = proxy::await_header(stream, looks.proxy, looks.proxy_timeout);
            let result = tokio::select! {
                r = header => r,
                () = &mut evicted => Err(proxy::Failure::Overflow),
            };
            match result {
                Ok((s, h)) => (s, Some(h)),
                Err(f) => return (peer, Err(f)),
            }
        }
        Stage::Line(h) => (stream, h),
    };
    let Some((want, timeout)) = &looks.head else {
        return (peer, Ok((stream, header, None)));
    };
    let (stream, found) = peek::wait(stream, looks.skip(header), want, *timeout, evicted).await;
    (peer, Ok((stream, header, Some(found))))
}

/// The accept loop's state.
pub struct Acceptor {
    /// Accepting is paused until then (fds or memory ran out).
    paused_until: Option<Instant>,
    /// "accept failed" lines.
    exhausted_log: LogLimit,
    /// Connections waiting for their first bytes.
    waiting: WaitSet<Waited>,
    /// "closed a connection whose PROXY header was …" lines.
    proxy_log: LogLimit,
}

impl Default for Acceptor {
    fn default() -> Self {
        Self {
            paused_until: None,
            exhausted_log: LogLimit::default(),
            waiting: WaitSet::new(proxy::MAX_PENDING),
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
        self.waiting.len()
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
                    self.admit(stream, peer, settings, metrics, route);
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

    /// A new connection: routed now if lb looks for nothing in its first bytes or they are
    /// already there, else once they are (or their deadline passed).
    fn admit(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        settings: &Settings,
        metrics: &Metrics,
        route: &mut impl FnMut(Handoff),
    ) {
        let trusted = proxy::trusted(&settings.proxy_trusted, peer.ip());
        let looks = Looks {
            proxy: if trusted {
                settings.proxy_protocol
            } else {
                proxy::Mode::Off
            },
            proxy_timeout: settings.proxy_timeout,
            head: settings.peeks().then(|| {
                let want = peek::Want {
                    sid: settings.handoff == HandoffMsg::SocketIo,
                    keys: settings.hash_key.peeks().then(|| settings.hash_key.clone()),
                    xff_trusted: trusted && settings.proxy_trusted.is_some(),
                };
                (want, settings.peek_timeout)
            }),
        };
        let mut header = None;
        if looks.proxy != proxy::Mode::Off {
            match proxy::parse_now(&stream, looks.proxy) {
                proxy::Now::Done(h) => header = Some(h),
                proxy::Now::Failed(f) => return self.refused(Some(peer), f, metrics),
                proxy::Now::Wait => return self.wait(stream, peer, Stage::Header, looks),
            }
        }
        let found = match &looks.head {
            None => None,
            Some((want, _)) => match peek::look_now(&stream, looks.skip(header), want) {
                Some(found) => Some(found),
                None => return self.wait(stream, peer, Stage::Line(header), looks),
            },
        };
        self.ready((peer, Ok((stream, header, found))), metrics, route);
    }

    /// Makes a place (evicting the oldest waiter if the set is full) and waits there.
    fn wait(&mut self, stream: TcpStream, peer: SocketAddr, stage: Stage, looks: Looks) {
        // The oldest waiter gives up its place: it reports (and is counted) as it ends.
        if self.waiting.is_full() {
            self.waiting.evict_oldest();
        }
        self.waiting
            .spawn(move |evict| first_bytes(stream, peer, stage, looks, evict));
    }

    /// The next connection whose wait ended.
    pub async fn waited(&mut self) -> Option<Waited> {
        self.waiting.recv().await
    }

    /// Routes a connection whose first bytes are in (or whose wait for its request line ended),
    /// or closes and counts one whose PROXY header failed.
    pub fn ready(
        &mut self,
        (peer, result): Waited,
        metrics: &Metrics,
        route: &mut impl FnMut(Handoff),
    ) {
        let (stream, header, found) = match result {
            Ok(r) => r,
            Err(reason) => return self.refused(Some(peer), reason, metrics),
        };
        let mut h = match header {
            Some(header) => Handoff::proxied(stream, peer, header.client),
            None => Handoff::new(stream, peer),
        };
        match found {
            Some(Found::Head(seen)) => {
                // The router counts whether the session is one it knows.
                let (sid, key) = seen.looked;
                if seen.sid.is_some() {
                    h.sid = seen.sid;
                } else if sid {
                    metrics.peeked(PeekResult::NoSid);
                }
                if key {
                    metrics.peeked(if seen.key.is_some() {
                        PeekResult::Key
                    } else {
                        PeekResult::NoKey
                    });
                }
                h.key = seen.key;
            }
            Some(Found::Nothing(why)) => metrics.peeked(why),
            None => {}
        }
        route(h);
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
    async fn a_full_set_evicts_its_oldest_waiter_which_still_reports() {
        let mut set = WaitSet::new(2);
        let (tx1, rx1) = oneshot::channel::<()>();
        let (tx2, rx2) = oneshot::channel::<()>();
        let wait = |n: u8, rx: oneshot::Receiver<()>| {
            move |evict: Evict| async move {
                tokio::select! {
                    _ = rx => (n, "done"),
                    () = evict.evicted() => (n, "evicted"),
                }
            }
        };
        let (_tx0, rx0) = oneshot::channel::<()>();
        set.spawn(wait(0, rx0));
        set.spawn(wait(1, rx1));
        assert!(set.is_full());
        assert!(set.evict_oldest());
        set.spawn(wait(2, rx2));
        assert_eq!(set.len(), 2, "the evicted one has no place any more");
        assert_eq!(set.recv().await, Some((0, "evicted")));
        tx2.send(()).unwrap();
        assert_eq!(set.recv().await, Some((2, "done")));
        tx1.send(()).unwrap();
        assert_eq!(set.recv().await, Some((1, "done")));
        assert_eq!(set.len(), 0);
        assert!(!set.evict_oldest(), "nothing left to evict");
    }

    #[tokio::test]
    async fn a_waiter_that_already_finished_is_not_evicted() {
        let mut set = WaitSet::new(1);
        set.spawn(|_evict| async { "done" });
        tokio::task::yield_now().await; // it runs, sends and finishes
        assert!(!set.evict_oldest(), "a finished waiter is not evicted");
        assert_eq!(set.recv().await, Some("done"));
    }
}
