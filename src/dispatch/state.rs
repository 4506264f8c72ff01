//! The state of one worker's channel, without the I/O loop around it: what is queued, in flight
//! and awaited, what is owed to the worker, and how each line it sends changes that.
//!
//! [`super::run`] owns the socket and the timers and calls into [`Dispatcher`]; every decision
//! (when to write, what a NACK means, when to hold) is made here, and every fact goes upward
//! through the `send` closure as a [`Report`].

use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use super::{Carried, ClusterOut, Handoff, MAX_NACKS, Report, Returned, ToDispatch};
use crate::channel::cluster;
use crate::channel::{
    ClusterMsg, FromWorker, HANDLE_NACK, HandoffMsg, Inbox, Incoming, SOCKET_COUNT_QUERY,
    Serialization,
};
use crate::sys;

/// One of lb's constant messages in the channel's serialization (static in `json`).
fn constant(ser: Serialization, json_line: &'static [u8]) -> Bytes {
    match ser.encode_line(json_line) {
        std::borrow::Cow::Borrowed(b) => Bytes::from_static(b),
        std::borrow::Cow::Owned(v) => Bytes::from(v),
    }
}

/// A handle sent and not yet answered.
pub(super) enum Sent {
    /// A connection (with its `newconn` seq when sent as one).
    Conn(Handoff, Option<u64>),
    /// A shared listening socket (our copy is already closed).
    Listener,
}

pub(super) struct InFlight {
    pub(super) sent: Sent,
    pub(super) at: Instant,
}

/// The state of one worker's channel.
pub(super) struct Dispatcher {
    /// Connections waiting to be sent.
    pub(super) queue: VecDeque<Handoff>,
    /// Handles sent and not yet ACKed/NACKed, oldest first.
    pub(super) in_flight: VecDeque<InFlight>,
    /// `newconn`s ACKed, waiting for the worker's `{ack, accepted}` (by seq).
    pub(super) awaiting: Vec<(u64, Handoff)>,
    /// Most handles in flight at once.
    pub(super) window: usize,
    /// The unsent tail of a partially written line (sent before anything else).
    pub(super) partial: Option<(Bytes, usize)>,
    /// NACK replies owed to the worker for handles it sent us.
    pub(super) owed_nacks: usize,
    /// Socket-count queries to send.
    pub(super) owed_queries: usize,
    /// Lines to send (cluster replies, relayed messages), in order.
    pub(super) lines: VecDeque<Bytes>,
    /// Shared listening sockets to send (envelope, fd).
    pub(super) listeners: VecDeque<(Vec<u8>, OwnedFd)>,
    /// No new handle until `in_flight` is empty (after a partial write or ETOOMANYREFS).
    pub(super) hold: bool,
    /// The last write returned EAGAIN: wait for writability.
    pub(super) blocked_on_write: bool,
    /// The channel failed on write.
    pub(super) failed: bool,
    /// The worker process exited (the master said so).
    pub(super) worker_exited: bool,
    /// When the oldest unanswered handle was sent (None when nothing is in flight).
    pub(super) oldest_sent: Option<Instant>,
    /// The worker has not answered for the stall timeout.
    pub(super) stalled: bool,
    /// The master sends no more (the worker is being replaced): NACKed connections go back to
    /// the master at once instead of being retried here.
    pub(super) draining: bool,
    /// Hand connections over as cluster `newconn`s for this key.
    pub(super) rr_key: Option<String>,
    /// Our cluster-message counter (each message to the worker gets the next `seq`).
    pub(super) seq: u64,
    /// The channel's receiving half (framing, fds the worker sent us).
    pub(super) inbox: Inbox,
    /// The channel's serialization, and lb's constant messages in it.
    pub(super) ser: Serialization,
    /// What each connection travels with, and its envelope in `ser`.
    pub(super) handoff: HandoffMsg,
    pub(super) envelope: Bytes,
    pub(super) nack: Bytes,
    pub(super) query: Bytes,
}

impl Dispatcher {
    pub(super) fn new(
        window: usize,
        max_line: usize,
        ser: Serialization,
        handoff: HandoffMsg,
    ) -> Self {
        Self {
            queue: VecDeque::new(),
            in_flight: VecDeque::new(),
            awaiting: Vec::new(),
            window,
            partial: None,
            owed_nacks: 0,
            owed_queries: 0,
            lines: VecDeque::new(),
            listeners: VecDeque::new(),
            hold: false,
            blocked_on_write: false,
            failed: false,
            worker_exited: false,
            draining: false,
            oldest_sent: None,
            stalled: false,
            rr_key: None,
            seq: 0,
            inbox: Inbox::with(ser, max_line, 64 * 1024),
            ser,
            envelope: Bytes::from(ser.reencode(handoff.envelope(None))),
            handoff,
            nack: constant(ser, HANDLE_NACK),
            query: constant(ser, SOCKET_COUNT_QUERY),
        }
    }

    /// What an in-place upgrade carries, if nothing is in flight either way.
    pub(super) fn carry(&self) -> Option<Carried> {
        let idle = self.queue.is_empty()
            && self.in_flight.is_empty()
            && self.awaiting.is_empty()
            && self.partial.is_none()
            && self.owed_nacks == 0
            && self.owed_queries == 0
            && self.lines.is_empty()
            && self.listeners.is_empty()
            && !self.failed
            && !self.worker_exited;
        idle.then(|| {
            Some(Carried {
                inbox: self.inbox.carry()?,
                rr_key: self.rr_key.clone(),
                seq: self.seq,
            })
        })?
    }

    pub(super) fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    pub(super) fn want_write(&self) -> bool {
        !self.blocked_on_write
            && !self.failed
            && (self.partial.is_some()
                || self.owed_nacks > 0
                || self.owed_queries > 0
                || !self.lines.is_empty()
                || (!self.hold
                    && self.in_flight.len() < self.window
                    && (!self.queue.is_empty() || !self.listeners.is_empty())))
    }

    /// Writes what can be written; EAGAIN sets `blocked_on_write`.
    pub(super) fn flush(&mut self, fd: BorrowedFd<'_>, send: &impl Fn(Report)) {
        if let Err(e) = self.flush_io(fd, send) {
            debug_assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
            self.blocked_on_write = true;
        }
    }

    /// Writes until done or `WouldBlock` (returned as `Err`, for `AsyncFdReadyGuard::try_io`).
    pub(super) fn flush_io(
        &mut self,
        fd: BorrowedFd<'_>,
        send: &impl Fn(Report),
    ) -> io::Result<()> {
        let mut now: Option<Instant> = None;
        loop {
            if self.failed {
                return Ok(());
            }
            if let Some((line, off)) = self.partial.take() {
                let n = self.write(fd, &line[off..])?;
                if off + n < line.len() {
                    self.partial = Some((line, off + n));
                }
                continue;
            }
            if self.owed_nacks > 0 {
                self.write_line(fd, self.nack.clone())?;
                self.owed_nacks -= 1;
                continue;
            }
            if self.owed_queries > 0 {
                self.write_line(fd, self.query.clone())?;
                self.owed_queries -= 1;
                continue;
            }
            if let Some(line) = self.lines.pop_front() {
                if let Err(e) = self.write_line(fd, line.clone()) {
                    self.lines.push_front(line);
                    return Err(e);
                }
                continue;
            }
            if self.hold || self.in_flight.len() >= self.window {
                return Ok(());
            }
            // A handle: a shared listener first (a worker waits in listen() for it), then
            // connections.
            let (envelope, newconn): (Bytes, Option<u64>) = if !self.listeners.is_empty() {
                (Bytes::from(self.listeners[0].0.clone()), None)
            } else if self.queue.is_empty() {
                return Ok(());
            } else if self.rr_key.is_some() {
                let seq = self.next_seq();
                let key = self.rr_key.as_deref().expect("checked");
                let env = self.ser.reencode(cluster::newconn_envelope(key, seq));
                (Bytes::from(env), Some(seq))
            } else if let Some(client) = self.queue.front().and_then(|h| h.client) {
                let env = self.ser.reencode(self.handoff.envelope(Some(client)));
                (Bytes::from(env), None)
            } else {
                (self.envelope.clone(), None) // a reference count, not a copy
            };
            let (sent, result) = if let Some((_, lfd)) = self.listeners.front() {
                let r = sys::send_with_fd(fd, &envelope, Some(lfd.as_fd()));
                (Sent::Listener, r)
            } else {
                let h = self.queue.pop_front().expect("checked");
                let r = sys::send_with_fd(fd, &envelope, Some(h.stream.as_fd()));
                (Sent::Conn(h, newconn), r)
            };
            match result {
                Ok(n) => {
                    if matches!(sent, Sent::Listener) {
                        self.listeners.pop_front(); // our duplicate of the listener is closed
                    }
                    // One clock read per batch of sends.
                    let now = *now.get_or_insert_with(Instant::now);
                    self.in_flight.push_back(InFlight { sent, at: now });
                    self.oldest_sent.get_or_insert(now);
                    if n < envelope.len() {
                        // The fd went with the first chunk; the rest follows without one, and no
                        // other handle may be sent until this one is answered (node-ipc.md §4.3).
                        self.partial = Some((envelope, n));
                        self.hold = true;
                    }
                }
                Err(e) => {
                    let back = |d: &mut Self, sent: Sent| {
                        if let Sent::Conn(h, _) = sent {
                            d.queue.push_front(h);
                        }
                    };
                    if e.kind() == io::ErrorKind::WouldBlock {
                        back(self, sent);
                        return Err(e);
                    } else if e.kind() == io::ErrorKind::Interrupted {
                        back(self, sent);
                    } else if e.raw_os_error() == Some(libc::ETOOMANYREFS)
                        && !self.in_flight.is_empty()
                    {
                        // Too many fds in flight to this worker: wait for its answers.
                        back(self, sent);
                        self.hold = true;
                        return Ok(());
                    } else {
                        tracing::warn!("handoff sendmsg failed: {e}");
                        self.failed = true;
                        if let Sent::Conn(h, _) = sent {
                            send(Report::Returned(vec![h], Returned::SendError));
                        }
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Writes one line; a partial write leaves its tail to be sent before anything else.
    pub(super) fn write_line(&mut self, fd: BorrowedFd<'_>, line: Bytes) -> io::Result<()> {
        let n = self.write(fd, &line)?;
        if n < line.len() {
            self.partial = Some((line, n));
        }
        Ok(())
    }

    /// Writes bytes without an fd; a hard error marks the channel failed (reported as 0 bytes).
    pub(super) fn write(&mut self, fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
        loop {
            match sys::send_with_fd(fd, bytes, None) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                Err(e) => {
                    tracing::debug!("worker channel write failed: {e}");
                    self.failed = true;
                    return Ok(bytes.len());
                }
            }
        }
    }

    /// Accepts one message from the master.
    pub(super) fn take(&mut self, m: ToDispatch, send: &impl Fn(Report)) {
        match m {
            ToDispatch::Handoff(h) => self.queue.push_back(h),
            // One outstanding query is enough.
            ToDispatch::QuerySocketCount => self.owed_queries = 1,
            ToDispatch::Detach => self.detach(send),
            ToDispatch::Exited => self.worker_exited = true,
            ToDispatch::RrKey(key) => self.rr_key = key,
            ToDispatch::Line(line) => self.lines.push_back(line),
            // Arrived in a batch with other work: not idle now; the master asks again.
            ToDispatch::Surrender(reply) => {
                let _ = reply.send(None);
            }
            ToDispatch::Cluster(out) => {
                let seq = self.next_seq();
                match out {
                    ClusterOut::RrReply { query, listener } => {
                        self.push_line(cluster::rr_reply(&query, listener, seq))
                    }
                    ClusterOut::Error { query, errno } => {
                        self.push_line(cluster::error_reply(&query, errno, seq))
                    }
                    ClusterOut::Shared { query, fd } => self.listeners.push_back((
                        self.ser
                            .reencode(cluster::shared_handle_envelope(&query, seq)),
                        fd,
                    )),
                    ClusterOut::Disconnect => self.push_line(cluster::disconnect(seq)),
                }
            }
        }
    }

    /// Queues one of lb's JSON lines, in the channel's serialization.
    pub(super) fn push_line(&mut self, json_line: Vec<u8>) {
        self.lines
            .push_back(Bytes::from(self.ser.reencode(json_line)));
    }

    /// No more connections for this worker: what is queued goes back now, and what it NACKs
    /// from now on goes back at once.
    pub(super) fn detach(&mut self, send: &impl Fn(Report)) {
        self.draining = true;
        if !self.queue.is_empty() {
            send(Report::Returned(
                self.queue.drain(..).collect(),
                Returned::Stalled,
            ));
        }
    }

    /// Takes the oldest in-flight handle for an ACK/NACK, updating the stall bookkeeping.
    pub(super) fn pop_answered(&mut self, send: &impl Fn(Report)) -> Option<Sent> {
        let f = self.in_flight.pop_front()?;
        self.oldest_sent = self.in_flight.front().map(|f| f.at);
        if self.stalled {
            self.stalled = false;
            send(Report::Recovered);
        }
        Some(f.sent)
    }

    /// A connection the worker refused (NACK, or `accepted:false`): retried here, or handed back.
    pub(super) fn refused(&mut self, mut h: Handoff, send: &impl Fn(Report)) {
        send(Report::Nacked);
        h.nacks += 1;
        if h.nacks > MAX_NACKS || self.draining {
            h.nacks = 0; // the next worker gets its own retries
            send(Report::Returned(vec![h], Returned::Nack));
        } else {
            self.queue.push_front(h);
        }
    }

    pub(super) fn process_lines(&mut self, send: &impl Fn(Report)) {
        while let Some(item) = self.inbox.next(FromWorker::parse_payload) {
            let Incoming::Message(msg) = item else {
                send(Report::TooLong);
                continue;
            };
            match msg {
                FromWorker::HandleAck => match self.pop_answered(send) {
                    Some(Sent::Conn(h, None)) => {
                        send(Report::Acked {
                            accepted: h.accepted,
                        });
                        drop(h); // closes the master's copy
                    }
                    // A newconn is settled by the cluster reply that follows.
                    Some(Sent::Conn(h, Some(seq))) => self.awaiting.push((seq, h)),
                    Some(Sent::Listener) => {}
                    None => send(Report::Desync),
                },
                FromWorker::HandleNack => match self.pop_answered(send) {
                    Some(Sent::Conn(h, _)) => self.refused(h, send),
                    Some(Sent::Listener) => {
                        tracing::warn!("a worker NACKed a shared listening socket");
                    }
                    None => send(Report::Desync),
                },
                FromWorker::Handle => {
                    // lb does not take handles from workers: answer so the worker's later
                    // messages are not stuck behind it, and close the fd if one came.
                    self.inbox.pop_fd();
                    self.owed_nacks += 1;
                    send(Report::StrayFd);
                }
                FromWorker::Cluster(ClusterMsg::NewconnReply { ack, accepted }) => {
                    match self.awaiting.iter().position(|(s, _)| *s == ack) {
                        Some(i) => {
                            let (_, h) = self.awaiting.swap_remove(i);
                            if accepted {
                                send(Report::Acked {
                                    accepted: h.accepted,
                                });
                            } else {
                                self.refused(h, send);
                            }
                        }
                        None => send(Report::Cluster(ClusterMsg::Malformed(
                            "a newconn reply for no newconn",
                        ))),
                    }
                }
                FromWorker::Cluster(ClusterMsg::ExitedAfterDisconnect { seq }) => {
                    // Without the ack the worker never leaves.
                    let ours = self.next_seq();
                    self.push_line(cluster::ack(seq, ours));
                    send(Report::Cluster(ClusterMsg::ExitedAfterDisconnect { seq }));
                }
                FromWorker::Cluster(m) => send(Report::Cluster(m)),
                FromWorker::Msg(m) => send(Report::Message(m)),
            }
            if self.in_flight.is_empty() {
                self.hold = false;
            }
        }
        for _ in 0..self.inbox.close_stray_fds() {
            send(Report::StrayFd);
        }
    }
}
