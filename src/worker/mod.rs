//! `lb::worker`: make a Rust program an lb worker.
//!
//! lb starts each worker with its channel on fd 3 (`NODE_CHANNEL_FD`) and hands it accepted client
//! connections as `NODE_HANDLE` messages, each carrying one fd. [`Worker`] opens that channel,
//! receives the fds (with `MSG_CMSG_CLOEXEC`, queued FIFO: an fd may arrive in the same read as
//! earlier bytes), answers `NODE_HANDLE_ACK` *before* the connection is used (or `NACK` if the fd
//! did not arrive), and yields [`tokio::net::TcpStream`]s. It also reports
//! `{"cmd":"stats",...}` when counts change and `{"type":"heartbeat"}` periodically, so lb's
//! metrics and least-connections policy see what the worker does.
//!
//! ```no_run
//! use lb::worker::Worker;
//! use tokio::io::AsyncWriteExt;
//!
//! # async fn demo() -> Result<(), lb::worker::WorkerError> {
//! let mut worker = Worker::from_env()?;
//! while let Some(mut conn) = worker.accept().await {
//!     tokio::spawn(async move {
//!         let _ = conn.stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nhi\n").await;
//!         conn.request_done(); // counted in lb_worker_requests_total
//!         // dropping `conn` closes the socket and the active-connection count goes down
//!     });
//! }
//! # Ok(()) }
//! ```
//!
//! Must run inside a tokio runtime (a current-thread runtime is the fast choice: one worker
//! process per core).

pub mod builtin;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::io::Interest;
use tokio::sync::{Notify, mpsc};

use crate::channel::{
    self, FromMaster, HANDLE_ACK, HANDLE_NACK, Inbox, Incoming, Received, Serialization, WorkerMsg,
};
use crate::sys;

/// Errors opening the worker channel.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// `NODE_CHANNEL_FD` is missing: the program was not started by lb.
    #[error(
        "NODE_CHANNEL_FD is not set: this program must be started by lb (`lb -- <this program>`)"
    )]
    NotUnderLb,
    /// `NODE_CHANNEL_FD` is not a number.
    #[error("NODE_CHANNEL_FD `{0}` is not a file descriptor number")]
    BadFd(String),
    /// fd is not an open Unix socket.
    #[error("channel fd {fd} is not usable: {source}")]
    Channel {
        /// The fd.
        fd: i32,
        /// Why.
        source: io::Error,
    },
}

/// Counts the worker reports to lb.
#[derive(Debug, Default)]
pub struct Counters {
    /// Open client connections.
    active: AtomicU64,
    /// Requests served since this process started (cumulative).
    requests: AtomicU64,
    /// Woken when a count changes.
    changed: Notify,
}

impl Counters {
    /// Records one served request.
    pub fn request_done(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// Active connections now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Counts one more active connection until the guard is dropped: for a connection that
    /// outlives the [`Connection`] it came on (a WebSocket served by its own task after the
    /// upgrade), so that lb's `least-connections` and `--balance-factor` see it.
    pub fn hold(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
        ActiveGuard(self.clone())
    }
}

/// A connection handed to this worker by lb. Dropping it closes the socket and decrements the
/// active-connection count reported to lb.
#[derive(Debug)]
pub struct Connection {
    /// The client socket (already ACKed to lb).
    pub stream: tokio::net::TcpStream,
    /// The client's address when lb read it from a PROXY protocol header (`--proxy-protocol`);
    /// `None` means the socket's own peer address is the client's.
    pub client: Option<std::net::SocketAddr>,
    /// Keeps the active count up while the connection lives.
    pub guard: ActiveGuard,
}

impl Connection {
    /// Records one served request on this connection.
    pub fn request_done(&self) {
        self.guard.0.request_done();
    }
}

/// Decrements the active-connection count when dropped.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Counters>);

impl ActiveGuard {
    /// The worker's counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.changed.notify_one();
    }
}

/// This process's side of the lb channel.
#[derive(Debug)]
pub struct Worker {
    conns: mpsc::UnboundedReceiver<Connection>,
    messages: mpsc::Receiver<Value>,
    out: mpsc::UnboundedSender<Vec<u8>>,
    counters: Arc<Counters>,
    slot: Option<usize>,
    /// The channel's serialization (`NODE_CHANNEL_SERIALIZATION_MODE`).
    ser: Serialization,
}

impl Worker {
    /// Opens the channel lb passed in `NODE_CHANNEL_FD` and starts serving it.
    ///
    /// Must be called inside a tokio runtime.
    pub fn from_env() -> Result<Self, WorkerError> {
        let var =
            std::env::var(crate::env::NODE_CHANNEL_FD).map_err(|_| WorkerError::NotUnderLb)?;
        let fd: i32 = var
            .trim()
            .parse()
            .map_err(|_| WorkerError::BadFd(var.clone()))?;
        if fd < 0 {
            return Err(WorkerError::BadFd(var));
        }
        let slot = std::env::var(crate::env::LB_WORKER_ID)
            .ok()
            .and_then(|s| s.parse().ok());
        let heartbeat = std::env::var(crate::env::LB_HEARTBEAT_MS)
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(Duration::from_secs(5), Duration::from_millis);
        let channel = adopt_channel(fd)?;
        Self::start_in(channel, slot, heartbeat, Serialization::from_env())
            .map_err(|source| WorkerError::Channel { fd, source })
    }

    /// Serves a channel given directly, in `json` (for tests and embedding).
    pub fn start(
        channel: UnixStream,
        slot: Option<usize>,
        heartbeat: Duration,
    ) -> io::Result<Self> {
        Self::start_in(channel, slot, heartbeat, Serialization::Json)
    }

    /// Serves a channel given directly, in serialization `ser`.
    pub fn start_in(
        channel: UnixStream,
        slot: Option<usize>,
        heartbeat: Duration,
        ser: Serialization,
    ) -> io::Result<Self> {
        channel.set_nonblocking(true)?;
        let io = sys::register(channel, Interest::READABLE | Interest::WRITABLE)?;
        let (conn_tx, conns) = mpsc::unbounded_channel();
        // Bounded: a worker that never reads its messages (the built-in one, under
        // `--heartbeat-ping`) must not grow without limit; beyond it, messages are dropped.
        let (msg_tx, messages) = mpsc::channel(MESSAGE_BACKLOG);
        let (out, out_rx) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        tokio::spawn(serve_channel(
            io,
            conn_tx,
            msg_tx,
            out_rx,
            counters.clone(),
            heartbeat,
            ser,
        ));
        Ok(Self {
            conns,
            messages,
            out,
            counters,
            slot,
            ser,
        })
    }

    /// The next connection from lb; `None` once the channel is closed (lb is gone or shutting
    /// this worker down).
    pub async fn accept(&mut self) -> Option<Connection> {
        self.conns.recv().await
    }

    /// Stops taking connections (for a graceful drain): from now on lb gets a NACK for every
    /// handle and gives the connection to another worker. Connections already received are still
    /// returned by [`Worker::accept`], which then returns `None`.
    pub fn close(&mut self) {
        self.conns.close();
    }

    /// The next user message from lb (lb sends none by default; `--heartbeat-ping` sends pings).
    /// At most 1024 unread messages are kept; later ones are dropped.
    pub async fn message(&mut self) -> Option<Value> {
        self.messages.recv().await
    }

    /// Sends a user message to lb (e.g. `{"type":"ready"}`).
    pub fn send(&self, value: &Value) {
        let _ = self.out.send(self.ser.encode(value));
    }

    /// Tells lb this worker is ready (needed when lb runs with `--wait-ready`).
    pub fn ready(&self) {
        let _ = self.out.send(self.ser.reencode(WorkerMsg::Ready.encode()));
    }

    /// The worker's counters (shared with every [`Connection`]).
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// This worker's slot (`LB_WORKER_ID`).
    pub fn slot(&self) -> Option<usize> {
        self.slot
    }

    /// With `lb --steering kernel`: the slot's listening socket (`LB_LISTEN_FD`), to accept
    /// from alongside [`Worker::accept`] — the kernel sends this slot's sticky clients there.
    /// `Ok(None)` when lb steers in the master. Call once.
    pub fn listener(&self) -> Result<Option<SlotListener>, WorkerError> {
        let Ok(var) = std::env::var(crate::env::LB_LISTEN_FD) else {
            return Ok(None);
        };
        let fd: i32 = var
            .trim()
            .parse()
            .map_err(|_| WorkerError::BadFd(var.clone()))?;
        let owned = sys::adopt_inherited_listener(fd)
            .map_err(|source| WorkerError::Channel { fd, source })?;
        let std = std::net::TcpListener::from(owned);
        let inner = std
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(std))
            .map_err(|source| WorkerError::Channel { fd, source })?;
        Ok(Some(SlotListener {
            inner,
            counters: self.counters.clone(),
        }))
    }
}

/// The slot's own listening socket (kernel steering): connections accepted here count like
/// handed ones.
#[derive(Debug)]
pub struct SlotListener {
    inner: tokio::net::TcpListener,
    counters: Arc<Counters>,
}

impl SlotListener {
    /// The next connection the kernel steered to this slot.
    pub async fn accept(&self) -> io::Result<Connection> {
        let (stream, _) = self.inner.accept().await?;
        Ok(Connection {
            stream,
            client: None,
            guard: self.counters.hold(),
        })
    }
}

/// Takes ownership of the inherited channel fd after checking it is a socket.
fn adopt_channel(fd: i32) -> Result<UnixStream, WorkerError> {
    let owned =
        sys::adopt_inherited_socket(fd).map_err(|source| WorkerError::Channel { fd, source })?;
    let stream = UnixStream::from(owned);
    // Close-on-exec, so our own children do not inherit the channel (Node does the same).
    let _ = nix::fcntl::fcntl(
        stream.as_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Ok(stream)
}

/// User messages from lb kept for [`Worker::message`] before further ones are dropped.
const MESSAGE_BACKLOG: usize = 1024;

/// How often stats may be sent at most.
const STATS_MIN_INTERVAL: Duration = Duration::from_millis(50);

async fn serve_channel(
    io: tokio::io::unix::AsyncFd<UnixStream>,
    conns: mpsc::UnboundedSender<Connection>,
    messages: mpsc::Sender<Value>,
    mut out_rx: mpsc::UnboundedReceiver<Vec<u8>>,
    counters: Arc<Counters>,
    heartbeat: Duration,
    ser: Serialization,
) {
    let mut inbox = Inbox::with(ser, channel::DEFAULT_MAX_LINE, 16 * 1024);
    let (ack, nack) = (ser.encode_line(HANDLE_ACK), ser.encode_line(HANDLE_NACK));
    let mut out: VecDeque<u8> = VecDeque::new();
    let mut out_open = true;
    let mut beat = tokio::time::interval(heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent = (u64::MAX, u64::MAX);
    let mut stats_due = true;
    let mut next_stats = tokio::time::Instant::now();
    loop {
        // Write what is pending (ACKs first: they are pushed in order as handles arrive).
        if !out.is_empty() {
            let (a, _) = out.as_slices();
            match sys::send_with_fd(io.get_ref().as_fd(), a, None) {
                Ok(n) => {
                    out.drain(..n);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return, // lb is gone
            }
        }
        let want_write = !out.is_empty();
        tokio::select! {
            biased;
            ready = io.readable() => {
                let Ok(mut guard) = ready else { return };
                let eof = inbox.read(&mut guard) == Received::Closed;
                drop(guard);
                while let Some(item) = inbox.next(FromMaster::parse_payload) {
                    let Incoming::Message(msg) = item else { continue };
                    match msg {
                        FromMaster::Handle { client, .. } => match inbox.pop_fd() {
                            // Nobody will accept it (the worker is shutting down): let lb give
                            // the connection to another worker.
                            Some(_) if conns.is_closed() => out.extend(nack.iter()),
                            Some(fd) => {
                                out.extend(ack.iter());
                                if let Some(conn) = into_connection(fd, client, &counters) {
                                    let _ = conns.send(conn);
                                }
                            }
                            None => out.extend(nack.iter()),
                        },
                        FromMaster::User(v) => { let _ = messages.try_send(v); }
                        FromMaster::OtherInternal | FromMaster::Malformed => {}
                    }
                }
                inbox.close_stray_fds();
                if eof {
                    return;
                }
            }
            ready = io.writable(), if want_write => {
                if let Ok(mut guard) = ready {
                    let (a, _) = out.as_slices();
                    match guard.try_io(|io| sys::send_with_fd(io.get_ref().as_fd(), a, None)) {
                        Ok(Ok(n)) => { out.drain(..n); }
                        Ok(Err(_)) => return,
                        Err(_) => {}
                    }
                }
            }
            line = out_rx.recv(), if out_open => match line {
                Some(line) => out.extend(line),
                None => out_open = false,
            },
            _ = counters.changed.notified(), if !stats_due => stats_due = true,
            _ = tokio::time::sleep_until(next_stats), if stats_due => {
                stats_due = false;
                next_stats = tokio::time::Instant::now() + STATS_MIN_INTERVAL;
                let now = (counters.active(), counters.requests());
                if now != last_sent {
                    last_sent = now;
                    out.extend(ser.reencode(WorkerMsg::Stats { active: Some(now.0), total_requests: Some(now.1) }.encode()));
                }
            }
            _ = beat.tick() => out.extend(ser.reencode(WorkerMsg::Heartbeat.encode())),
        }
    }
}

/// Turns a received fd into a tokio stream, counting it active. `None` if it is not a TCP socket.
fn into_connection(
    fd: OwnedFd,
    client: Option<std::net::SocketAddr>,
    counters: &Arc<Counters>,
) -> Option<Connection> {
    let std = std::net::TcpStream::from(fd);
    // lb passes non-blocking sockets; make sure (a blocking one would stall the runtime).
    if std.set_nonblocking(true).is_err() {
        return None;
    }
    let stream = tokio::net::TcpStream::from_std(std).ok()?;
    Some(Connection {
        stream,
        client,
        guard: counters.hold(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[tokio::test]
    async fn acks_handles_and_nacks_missing_fds() {
        let (master, worker_end) = UnixStream::pair().unwrap();
        let mut w = Worker::start(worker_end, Some(0), Duration::from_secs(3600)).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        server_side.set_nonblocking(true).unwrap();
        sys::send_with_fd(
            master.as_fd(),
            channel::HANDLE_ENVELOPE,
            Some(server_side.as_fd()),
        )
        .unwrap();
        sys::send_with_fd(master.as_fd(), channel::HANDLE_ENVELOPE, None).unwrap();
        let conn = w.accept().await.unwrap();
        assert_eq!(
            conn.stream.peer_addr().unwrap(),
            client.local_addr().unwrap()
        );
        // Read the worker's answers: ACK then NACK, then a stats line.
        master.set_nonblocking(true).unwrap();
        let master = tokio::net::UnixStream::from_std(master).unwrap();
        let mut r = tokio::io::BufReader::new(master);
        let mut lines = Vec::new();
        while lines.len() < 3 {
            let mut l = String::new();
            tokio::io::AsyncBufReadExt::read_line(&mut r, &mut l)
                .await
                .unwrap();
            lines.push(l);
        }
        assert_eq!(lines[0], "{\"cmd\":\"NODE_HANDLE_ACK\"}\n");
        assert_eq!(lines[1], "{\"cmd\":\"NODE_HANDLE_NACK\"}\n");
        assert!(lines[2].contains("\"activeConnections\":1"), "{}", lines[2]);
        drop(conn);
    }
}
