//! One task per worker process: hands connections over its channel and tracks the ACKs.
//!
//! The task owns the master's end of the worker's channel. It receives [`Handoff`]s from the
//! master, sends each as one `NODE_HANDLE` line with its fd in one `sendmsg`, and keeps the
//! master's copy of the fd until the worker answers:
//!
//! - `NODE_HANDLE_ACK` → the master's copy is closed (mandatory: otherwise a worker's
//!   `socket.destroy()` never reaches the client) and the master is told.
//! - `NODE_HANDLE_NACK` → the same envelope and fd are sent again, up to [`MAX_NACKS`] times, then the
//!   connection goes back to the master for another worker.
//! - send error / channel EOF → every connection not yet ACKed goes back to the master.
//!
//! ACKs and NACKs arrive in the order handles were sent, so they are matched FIFO. Each envelope is
//! small and written whole by one `sendmsg` (Node tolerates several in flight, node-ipc.md §4.3);
//! after a partial write, or `ETOOMANYREFS`, no further handle is sent until every in-flight one is
//! answered. A connection is never dropped silently.
//!
//! This module alone owns a worker's handoff state — queue, in flight, NACK retries, stall
//! detection — and reports facts upward ([`Report`]). The one number the router needs, how many
//! handoffs the worker has not confirmed, is [`DispatchHandle::pending`]: it is kept by this
//! module (incremented on send, decremented when a connection is ACKed or handed back), and the
//! router skips a worker whose count reaches `--max-pending`, the one limit on unconfirmed
//! handoffs.
//!
//! This file holds the types and the task's I/O loop; the channel's state — what is queued, in
//! flight and owed, and what each line from the worker means — is `state::Dispatcher`.

use bytes::Bytes;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::sync::mpsc;

use crate::channel::cluster::ServerQuery;
use crate::channel::{ClusterMsg, Received, Serialization, WorkerMsg};
use crate::slot::WorkerId;
use crate::sys;

mod state;
use state::{Dispatcher, Sent};

/// NACKs one worker may return for one connection before it is given to another worker
/// (Node's `MAX_HANDLE_RETRANSMISSIONS`).
pub const MAX_NACKS: u8 = 3;

/// An accepted connection on its way to a worker.
#[derive(Debug)]
pub struct Handoff {
    /// The client socket (non-blocking, close-on-exec). Dropping it closes the master's copy.
    pub stream: TcpStream,
    /// The client's address (the sticky key): the PROXY header's source, else the peer's.
    pub peer: SocketAddr,
    /// The client's address from a PROXY header, told to the worker with the connection.
    pub client: Option<SocketAddr>,
    /// When the master accepted it (for the handoff-duration histogram and queue deadline).
    pub accepted: Instant,
    /// NACKs received for it from the current worker.
    pub nacks: u8,
    /// Workers it has been given to so far.
    pub dispatches: u8,
    /// The socket.io session id its request line carries (peeked, `--handoff socket.io`).
    pub sid: Option<Box<str>>,
    /// The hash of the `--hash-key` key its request head carries (peeked); `None` hashes the
    /// client's IP.
    pub key: Option<u32>,
}

impl Handoff {
    /// A freshly accepted connection.
    pub fn new(stream: TcpStream, peer: SocketAddr) -> Self {
        Self {
            stream,
            peer,
            accepted: Instant::now(),
            nacks: 0,
            dispatches: 0,
            client: None,
            sid: None,
            key: None,
        }
    }

    /// What `sticky` hashes for it: its key, else its client's address.
    pub fn sticky_key(&self) -> u32 {
        self.key
            .unwrap_or_else(|| crate::balance::ip_key(crate::balance::canonical_ip(self.peer.ip())))
    }

    /// A connection whose PROXY header named `client` (hashed on, and told to the worker).
    pub fn proxied(stream: TcpStream, peer: SocketAddr, client: Option<SocketAddr>) -> Self {
        Self {
            client,
            ..Self::new(stream, client.unwrap_or(peer))
        }
    }
}

/// What the master sends a dispatch task.
#[derive(Debug)]
enum ToDispatch {
    /// A connection to hand over.
    Handoff(Handoff),
    /// Ask a Node worker for its open handed-off socket count ([`SOCKET_COUNT_QUERY`]).
    QuerySocketCount,
    /// The worker gets no new connections: hand back what is queued and what it NACKs.
    Detach,
    /// The worker process has exited: read what it wrote before dying, then treat the channel
    /// as closed even if a descendant that inherited it keeps it open.
    Exited,
    /// From now on hand connections over as cluster `newconn`s for this server key (the
    /// worker's `listen()` on lb's port), or, with `None`, as sticky-session handles again.
    RrKey(Option<String>),
    /// A cluster-protocol message to the worker.
    Cluster(ClusterOut),
    /// A line to pass on unchanged (socket.io adapter relay, heartbeat ping).
    Line(Bytes),
    /// An in-place upgrade: if nothing is in flight, end the task and give back the channel
    /// (else answer `None` and carry on).
    Surrender(tokio::sync::oneshot::Sender<Option<Surrendered>>),
}

/// What a dispatch task hands over for an in-place upgrade ([`crate::upgrade`]).
#[derive(Debug)]
pub struct Surrendered {
    /// The master's end of the worker's channel.
    pub channel: UnixStream,
    /// What the next dispatch task of this channel needs to carry on.
    pub carried: Carried,
}

/// A dispatch task's state that outlives it across an in-place upgrade (nothing is in flight).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Carried {
    /// The start of a message from the worker not yet complete.
    pub inbox: Vec<u8>,
    /// Connections go to the worker as cluster `newconn`s for this key.
    pub rr_key: Option<String>,
    /// The last cluster `seq` lb used towards this worker.
    pub seq: u64,
}

/// Cluster-protocol messages lb sends a worker (the dispatch numbers them).
#[derive(Debug)]
pub enum ClusterOut {
    /// `queryServer` on lb's port: the server is attached to lb's listener.
    RrReply {
        /// The query.
        query: ServerQuery,
        /// lb's listening address.
        listener: SocketAddr,
    },
    /// `queryServer` refused with a libuv errno (positive here, sent negative).
    Error {
        /// The query.
        query: ServerQuery,
        /// The errno.
        errno: i32,
    },
    /// `queryServer` on another address: the listening socket itself, shared.
    Shared {
        /// The query.
        query: ServerQuery,
        /// A duplicate of the listener (closed once sent).
        fd: OwnedFd,
    },
    /// Close your servers and leave.
    Disconnect,
}

/// The sending side of one worker's dispatch task (cloneable; the task ends when every clone is
/// dropped and the channel closed).
#[derive(Debug, Clone)]
pub struct DispatchHandle {
    tx: mpsc::UnboundedSender<ToDispatch>,
    pending: Arc<AtomicUsize>,
}

impl DispatchHandle {
    /// Gives the worker a connection; `Err` returns it if the task is gone.
    pub fn send(&self, h: Handoff) -> Result<(), Handoff> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        self.tx.send(ToDispatch::Handoff(h)).map_err(|e| {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            match e.0 {
                ToDispatch::Handoff(h) => h,
                _ => unreachable!("sent a handoff"),
            }
        })
    }

    /// Handoffs given to this worker and not yet confirmed or handed back.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Asks a Node worker how many handed-off sockets it has open (answered as
    /// [`WorkerMsg::SocketCount`]).
    pub fn query_socket_count(&self) {
        let _ = self.tx.send(ToDispatch::QuerySocketCount);
    }

    /// No new connections for this worker; what it has not taken comes back.
    pub fn detach(&self) {
        let _ = self.tx.send(ToDispatch::Detach);
    }

    /// The worker process has exited (its channel may outlive it in a descendant).
    pub fn exited(&self) {
        let _ = self.tx.send(ToDispatch::Exited);
    }

    /// Hand connections over as `newconn`s for `key` (or, with `None`, as handles again).
    pub fn rr_key(&self, key: Option<String>) {
        let _ = self.tx.send(ToDispatch::RrKey(key));
    }

    /// Sends a cluster-protocol message.
    pub fn cluster(&self, m: ClusterOut) {
        let _ = self.tx.send(ToDispatch::Cluster(m));
    }

    /// Sends a line unchanged (it must be one valid JSON message ending in `\n`).
    pub fn line(&self, line: Bytes) {
        let _ = self.tx.send(ToDispatch::Line(line));
    }

    /// Asks the task to end and give back the channel (an in-place upgrade); answers `None`
    /// while connections are in flight or the channel is gone.
    pub async fn surrender(&self) -> Option<Surrendered> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(ToDispatch::Surrender(tx)).ok()?;
        rx.await.ok().flatten()
    }
}

/// Starts the dispatch task for worker `id` on its channel.
pub fn start(
    id: WorkerId,
    channel: UnixStream,
    reports: mpsc::UnboundedSender<Event>,
    limits: Limits,
) -> DispatchHandle {
    resume(id, channel, reports, limits, Carried::default())
}

/// Starts the dispatch task for worker `id` on a channel another task (or lb's previous image)
/// served, with what it [`Carried`].
pub fn resume(
    id: WorkerId,
    channel: UnixStream,
    reports: mpsc::UnboundedSender<Event>,
    limits: Limits,
    carried: Carried,
) -> DispatchHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let pending = Arc::new(AtomicUsize::new(0));
    tokio::spawn(run(
        id,
        channel,
        rx,
        reports,
        limits,
        pending.clone(),
        carried,
    ));
    DispatchHandle { tx, pending }
}

/// Why connections came back from a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returned {
    /// NACKed [`MAX_NACKS`] + 1 times.
    Nack,
    /// `sendmsg` failed (not `EAGAIN`).
    SendError,
    /// The worker's channel closed (the worker exited).
    WorkerExit,
    /// Not sent yet when the worker stalled: not a failure, just route it elsewhere.
    Stalled,
}

impl Returned {
    /// The failure to count for each connection handed back (NACKs are counted one by one as
    /// [`Report::Nacked`]; a stall is no failure).
    pub fn failure(self) -> Option<crate::metrics::Failure> {
        use crate::metrics::Failure;
        match self {
            Self::Nack | Self::Stalled => None,
            Self::SendError => Some(Failure::SendError),
            Self::WorkerExit => Some(Failure::WorkerExit),
        }
    }
}

/// What a dispatch task reports to the master.
#[derive(Debug)]
pub enum Report {
    /// A connection was ACKed (the master's copy is already closed).
    Acked {
        /// When it was accepted.
        accepted: Instant,
    },
    /// One NACK (the connection is being retried or returned).
    Nacked,
    /// Connections the worker did not take; the master must place them elsewhere.
    Returned(Vec<Handoff>, Returned),
    /// A message from the worker (the handle protocol is answered here, never passed up).
    Message(WorkerMsg),
    /// A cluster-protocol message the master must act on (`newconn` replies and the
    /// `exitedAfterDisconnect` ack are handled here).
    Cluster(ClusterMsg),
    /// A channel line over the length limit was dropped.
    TooLong,
    /// The worker sent an fd (with or without an envelope); it was closed (and NACKed).
    StrayFd,
    /// The worker has not answered its oldest handle for the stall timeout: it gets no new
    /// connections until it answers again (its unsent connections come back as `Stalled`).
    Stalled,
    /// A stalled worker answered again.
    Recovered,
    /// The worker broke the handle protocol (an ACK/NACK with nothing in flight): its channel
    /// cannot be trusted any more.
    Desync,
    /// The channel is closed; nothing more will come from this task except returned connections.
    Closed,
}

/// A report tagged with the worker it is about.
#[derive(Debug)]
pub struct Event {
    /// The worker.
    pub id: WorkerId,
    /// What happened.
    pub report: Report,
}

/// Bounds of one dispatch task.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Handles in flight before waiting for answers (`--max-pending`; the router sends no more
    /// than that anyway).
    pub window: usize,
    /// Longest channel line accepted from the worker.
    pub max_line: usize,
    /// Unanswered-handle time after which the worker is reported stalled.
    pub stall_timeout: Duration,
    /// The channel's serialization.
    pub serialization: Serialization,
    /// The message each connection travels with (`--handoff`).
    pub handoff: crate::channel::HandoffMsg,
}

/// Runs the dispatch task for one worker until its channel closes and the master stops sending.
async fn run(
    id: WorkerId,
    channel: UnixStream,
    mut handoffs: mpsc::UnboundedReceiver<ToDispatch>,
    reports: mpsc::UnboundedSender<Event>,
    limits: Limits,
    pending: Arc<AtomicUsize>,
    carried: Carried,
) {
    let Limits {
        window,
        max_line,
        stall_timeout,
        serialization,
        handoff,
    } = limits;
    let (slot, generation) = (id.slot, id.generation);
    // Every connection that leaves this task's custody (ACKed or handed back) is uncounted here.
    let send = |report: Report| {
        match &report {
            Report::Acked { .. } => {
                pending.fetch_sub(1, Ordering::Relaxed);
            }
            Report::Returned(conns, _) => {
                pending.fetch_sub(conns.len(), Ordering::Relaxed);
            }
            _ => {}
        }
        let _ = reports.send(Event { id, report });
    };
    let registered = channel
        .set_nonblocking(true)
        .and_then(|_| sys::register(channel, Interest::READABLE | Interest::WRITABLE));
    let io = match registered {
        Ok(io) => io,
        Err(e) => {
            tracing::error!(slot, "cannot register worker channel: {e}");
            send(Report::Closed);
            return return_all_until_closed(&mut handoffs, send).await;
        }
    };
    let mut d = Dispatcher::new(window.max(1), max_line, serialization, handoff);
    d.inbox.extend(&carried.inbox);
    d.rr_key = carried.rr_key;
    d.seq = carried.seq;
    let mut accepting = true;
    let mut open = true;
    let mut surrender = None;
    while open && !d.failed {
        if d.want_write() {
            d.flush(io.get_ref().as_fd(), &send);
        }
        tokio::select! {
            ready = io.readable() => {
                let Ok(mut guard) = ready else { break };
                if d.inbox.read(&mut guard) == Received::Closed {
                    tracing::debug!(slot, generation, "worker channel closed");
                    open = false;
                }
                drop(guard);
                d.process_lines(&send);
            }
            ready = io.writable(), if d.blocked_on_write => {
                let Ok(mut guard) = ready else { break };
                d.blocked_on_write = false;
                if guard.try_io(|io| d.flush_io(io.get_ref().as_fd(), &send)).is_err() {
                    d.blocked_on_write = true;
                }
            }
            () = stall_timer(d.oldest_sent, stall_timeout), if !d.stalled => {
                d.stalled = true;
                send(Report::Stalled);
                let unsent: Vec<Handoff> = d.queue.drain(..).collect();
                if !unsent.is_empty() {
                    send(Report::Returned(unsent, Returned::Stalled));
                }
            }
            h = handoffs.recv(), if accepting => match h {
                Some(ToDispatch::Surrender(reply)) => match d.carry() {
                    Some(carried) => {
                        surrender = Some((reply, carried));
                        break;
                    }
                    None => {
                        let _ = reply.send(None);
                    }
                },
                Some(h) => {
                    d.take(h, &send);
                    // Take everything already queued before writing: one pass, many sends.
                    while let Ok(h) = handoffs.try_recv() { d.take(h, &send); }
                    if d.worker_exited {
                        d.inbox.read_rest(io.get_ref().as_fd());
                        d.process_lines(&send);
                        tracing::debug!(slot, generation, "worker exited; its channel is done");
                        open = false;
                    }
                    if d.stalled && !d.queue.is_empty() {
                        // Sent before the master heard of the stall: route elsewhere.
                        send(Report::Returned(d.queue.drain(..).collect(), Returned::Stalled));
                    }
                }
                None => {
                    accepting = false;
                    d.detach(&send);
                }
            },
        }
    }
    if let Some((reply, carried)) = surrender {
        let channel = io.into_inner();
        // The master awaits the answer (`DispatchHandle::surrender`) to the end.
        let _ = reply.send(Some(Surrendered { channel, carried }));
        return;
    }
    // The channel is gone: nothing it held was confirmed.
    let mut back: Vec<Handoff> = d
        .in_flight
        .drain(..)
        .filter_map(|f| match f.sent {
            Sent::Conn(h, _) => Some(h),
            Sent::Listener => None,
        })
        .collect();
    back.extend(d.awaiting.drain(..).map(|(_, h)| h));
    back.extend(d.queue.drain(..));
    if !back.is_empty() {
        send(Report::Returned(back, Returned::WorkerExit));
    }
    send(Report::Closed);
    drop(d);
    if accepting {
        return_all_until_closed(&mut handoffs, send).await;
    }
}

/// Fires `timeout` after `since` (never if `since` is None).
async fn stall_timer(since: Option<Instant>, timeout: Duration) {
    match since {
        Some(t) => tokio::time::sleep_until((t + timeout).into()).await,
        None => std::future::pending().await,
    }
}

/// After the channel closed: hand back whatever the master still sends until it stops.
async fn return_all_until_closed(
    handoffs: &mut mpsc::UnboundedReceiver<ToDispatch>,
    send: impl Fn(Report),
) {
    while let Some(m) = handoffs.recv().await {
        if let ToDispatch::Handoff(h) = m {
            send(Report::Returned(vec![h], Returned::WorkerExit));
        }
    }
}

#[cfg(test)]
mod tests;
