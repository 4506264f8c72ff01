//! systemd integration: socket activation (`LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES`) and the
//! `sd_notify` protocol (`READY=1`, `STATUS=`, `RELOADING=1`, `STOPPING=1`, `WATCHDOG=1`).
//!
//! Workers never see any of it: the spawn code removes these variables from their environment,
//! and the passed sockets are close-on-exec.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The environment variables that belong to lb alone (removed from workers' environment).
pub const VARIABLES: [&str; 6] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// The sockets systemd passed lb.
#[derive(Debug, Default)]
pub struct Passed {
    /// The socket to accept client connections on (the first one not named `metrics`).
    pub listener: Option<socket2::Socket>,
    /// The admin/metrics endpoint's socket (`FileDescriptorName=metrics`).
    pub metrics: Option<std::net::TcpListener>,
}

/// The sockets passed to this process, if lb was socket-activated (`LISTEN_PID` is our pid).
pub fn passed() -> io::Result<Passed> {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: usize = match std::env::var("LISTEN_FDS") {
        Ok(n) if for_us => n
            .parse()
            .map_err(|_| io::Error::other(format!("LISTEN_FDS `{n}` is not a number")))?,
        _ => return Ok(Passed::default()),
    };
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut passed = Passed::default();
    for (i, fd) in crate::sys::take_passed_fds(count)?.into_iter().enumerate() {
        let name = names.get(i).map_or("", String::as_str);
        let socket = listening_tcp(fd)
            .map_err(|e| io::Error::other(format!("passed socket {i} (`{name}`): {e}")))?;
        if name == "metrics" && passed.metrics.is_none() {
            passed.metrics = Some(socket.into());
        } else if passed.listener.is_none() {
            socket.set_nonblocking(true)?;
            passed.listener = Some(socket);
        } else {
            return Err(io::Error::other(format!(
                "systemd passed more than one listening socket (`{name}` is extra); name the \
                 admin endpoint's `FileDescriptorName=metrics`"
            )));
        }
    }
    Ok(passed)
}

/// Checks that `fd` is a listening TCP socket.
fn listening_tcp(fd: OwnedFd) -> io::Result<socket2::Socket> {
    let s = socket2::Socket::from(fd);
    if s.r#type()? != socket2::Type::STREAM || !s.is_listener()? {
        return Err(io::Error::other(
            "not a listening stream socket (use ListenStream= in the .socket unit)",
        ));
    }
    match s.local_addr()?.as_socket() {
        Some(_) => Ok(s),
        None => Err(io::Error::other("not a TCP socket")),
    }
}

/// Talks to the service manager over `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
    /// How often to send `WATCHDOG=1` (half of `WATCHDOG_USEC`), if the manager asked.
    pub watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier, if lb runs under a manager that asked for notifications.
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let addr = match path.as_encoded_bytes() {
            [b'@', name @ ..] => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name).ok()?
            }
            _ => std::os::unix::net::SocketAddr::from_pathname(&path).ok()?,
        };
        let socket = UnixDatagram::unbound().ok()?;
        let _ = socket.set_nonblocking(true);
        let watchdog_for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && watchdog_for_us)
            .map(|u| Duration::from_micros(u / 2));
        Some(Notifier {
            socket,
            addr,
            watchdog,
        })
    }

    /// Sends one notification (`KEY=VALUE` lines); failures are logged, never fatal.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            tracing::debug!("sd_notify `{state}` failed: {e}");
        }
    }

    /// `RELOADING=1` with the monotonic timestamp systemd wants with it.
    pub fn reloading(&self) {
        let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
            .unwrap_or(0);
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }
}
