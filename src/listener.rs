//! The public listening socket: bound with socket2 (explicit backlog, dual-stack for `[::]`), and
//! accepted with one `accept4(SOCK_NONBLOCK | SOCK_CLOEXEC)` per connection. The master never
//! reads from an accepted socket.
//!
//! Accept errors are classified (PITFALLS §7): running out of fds or memory pauses accepting for a
//! moment instead of spinning on a level-triggered listener; per-connection errors
//! (`ECONNABORTED`, `EPERM` from a firewall) are skipped.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::sys;

/// Binding failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}{hint}")]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// The OS error.
    #[source]
    pub source: io::Error,
    /// Advice for common causes.
    pub hint: &'static str,
}

/// Binds `addr` with `backlog` (not registered with a runtime yet).
pub fn bind(addr: SocketAddr, backlog: u32) -> Result<Socket, BindError> {
    bind_with(addr, backlog, false)
}

/// [`bind`], optionally with `SO_REUSEPORT` (kernel steering's per-slot listeners).
pub fn bind_with(addr: SocketAddr, backlog: u32, reuse_port: bool) -> Result<Socket, BindError> {
    let err = |source: io::Error| {
        let hint = match source.kind() {
            io::ErrorKind::AddrInUse => {
                " (is another lb or server running? pick another port or use port 0)"
            }
            io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
            io::ErrorKind::AddrNotAvailable => " (that address is not on this host)",
            _ => "",
        };
        BindError { addr, source, hint }
    };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(err)?;
    }
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // `[::]` accepts IPv4 clients too (as IPv4-mapped addresses).
        socket.set_only_v6(false).map_err(err)?;
    }
    socket.bind(&addr.into()).map_err(err)?;
    socket
        .listen(backlog.min(i32::MAX as u32) as i32)
        .map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    no_delay(&socket);
    Ok(socket)
}

/// Turns Nagle's algorithm off on a listening socket: the connections accepted from it inherit
/// `TCP_NODELAY` (as HTTP servers want it: Node's sets it on every socket), so a worker need not
/// spend a system call per connection on it.
pub fn no_delay(socket: &Socket) {
    if let Err(e) = socket.set_tcp_nodelay(true) {
        tracing::debug!("TCP_NODELAY on the listener: {e}");
    }
}

/// Why an accept failed, for the caller's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptError {
    /// Nothing to accept now.
    WouldBlock,
    /// This one connection failed (aborted by the client, refused by a firewall): go on.
    Transient,
    /// Out of fds or memory: pause accepting for a moment.
    Exhausted,
    /// Unexpected error: log and pause.
    Fatal,
}

/// A listener registered with the runtime.
#[derive(Debug)]
pub struct Listener {
    io: AsyncFd<Socket>,
}

impl Listener {
    /// Registers a bound socket with the current runtime.
    pub fn new(socket: Socket) -> io::Result<Self> {
        Ok(Self {
            io: sys::register(socket, Interest::READABLE)?,
        })
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io
            .get_ref()
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("listener has no inet address"))
    }

    /// The listening socket's fd.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.io.get_ref().as_fd()
    }

    /// Waits until a connection may be pending.
    pub async fn ready(&self) -> io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, Socket>> {
        self.io.readable().await
    }

    /// Accepts one connection through a readiness guard (clears readiness on `WouldBlock`).
    pub fn accept(
        guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, Socket>,
    ) -> Result<(TcpStream, SocketAddr), (AcceptError, Option<io::Error>)> {
        match guard.try_io(|s| sys::accept(s.get_ref().as_fd())) {
            Err(_would_block) => Err((AcceptError::WouldBlock, None)),
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err((classify(&e), Some(e))),
        }
    }
}

/// Classifies an `accept4` error.
pub fn classify(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        Some(libc::EAGAIN) => AcceptError::WouldBlock,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::Exhausted,
        Some(
            libc::ECONNABORTED
            | libc::EINTR
            | libc::EPERM
            | libc::EPROTO
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH,
        ) => AcceptError::Transient,
        _ => AcceptError::Fatal,
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).ok()?;
    }
    Some(hard.max(soft))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_accept_errors() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(classify(&e(libc::EMFILE)), AcceptError::Exhausted);
        assert_eq!(classify(&e(libc::ENFILE)), AcceptError::Exhausted);
        assert_eq!(classify(&e(libc::ECONNABORTED)), AcceptError::Transient);
        assert_eq!(classify(&e(libc::EBADF)), AcceptError::Fatal);
    }

    #[test]
    fn busy_port_is_a_clear_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = bind(taken.local_addr().unwrap(), 16)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot listen on 127.0.0.1:") && err.contains("port 0"),
            "{err}"
        );
    }

    #[test]
    fn dual_stack_accepts_ipv4() {
        let Ok(s) = bind("[::]:0".parse().unwrap(), 16) else {
            // Visible, and counted as skipped by scripts/test.sh.
            eprintln!("SKIPPED dual_stack_accepts_ipv4: no IPv6 on this host");
            if let Ok(path) = std::env::var("LB_TEST_SKIP_LOG") {
                use std::io::Write as _;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(path)
                    .unwrap();
                writeln!(f, "listener::dual_stack_accepts_ipv4: no IPv6 on this host").unwrap();
            }
            return;
        };
        let port = s.local_addr().unwrap().as_socket().unwrap().port();
        TcpStream::connect(("127.0.0.1", port)).unwrap();
    }
}
