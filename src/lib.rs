//! # lb — a sticky-session TCP load-balancer front end
//!
//! One master process accepts every TCP connection itself and never reads from it. It picks a
//! worker process (client-IP rendezvous hash, round-robin or least-connections) and passes the
//! connection's file descriptor to it over a Unix socket with `SCM_RIGHTS`; after that the master
//! is out of the data path. The worker channel speaks Node.js's own child-process IPC format, so
//! unmodified Node.js sticky-session workers run under lb, and so do Rust programs using
//! [`worker`]. The master supervises its workers and exports per-worker counts for Prometheus.
//!
//! # Layout
//!
//! The data path, in order:
//!
//! - [`listener`] — the public socket: socket2 bind with a real backlog, `accept4` with
//!   `SOCK_NONBLOCK | SOCK_CLOEXEC`, classified accept errors.
//! - [`proxy`] — PROXY protocol v1/v2 headers, peeked (and consumed with `strip`).
//! - [`peek`] — a connection's request line, peeked for the socket.io `sid` it names.
//! - [`steering`] — kernel steering: per-slot `SO_REUSEPORT` listeners and the cBPF program.
//! - [`balance`] — the policies, pure functions with no I/O.
//! - [`router`] — where each connection goes: per-slot targets, load accounting, the bounded wait
//!   queue; reads a narrow per-slot view, never a worker record. [`sessions`] — socket.io
//!   sessions per worker (sid routing, their load).
//! - [`dispatch`] — one task per worker: sends handles, matches ACK/NACK FIFO, retries NACKs,
//!   detects stalls, hands back every connection a worker did not take.
//! - [`sys`] — the raw syscalls (`sendmsg`/`recvmsg` with `SCM_RIGHTS`, `accept4`); one of the two
//!   modules allowed `unsafe`.
//! - [`channel`] — Node IPC: framing (`json` lines, `advanced` V8 frames), typed messages both
//!   ways, the shared receiving half, and Node's cluster protocol.
//! - [`worker`] — the worker side: the `lb::worker` library and lb's built-in HTTP/WebSocket worker.
//!
//! Beside it:
//!
//! - [`supervisor`] — the workers' lifecycle: a pure state machine (`fleet`: spawn, readiness,
//!   backoff, heartbeats, memory, rolling restart, graceful shutdown) and the single-threaded
//!   async shell that owns all state and carries out what it decides (`shell`).
//! - [`upgrade`] — the in-place upgrade's state document and exec; [`systemd`] — socket
//!   activation and `sd_notify`; [`reaper`] — orphans as PID 1 or subreaper.
//! - [`silence`] and [`tcpdiag`] — naming a worker that serves nobody (the kernel's byte counts).
//! - [`procfs`] — worker memory and CPU from `/proc`.
//! - [`spawn`] — starting a worker with its channel on fd 3 and nothing else inherited (the
//!   other `unsafe` module).
//! - [`metrics`] — Prometheus metrics and the admin endpoint.
//! - [`config`] — command line and TOML config file.
//! - [`control`] — the control socket behind `lb status`, `roll`, `scale`, `reload`, `stop`.
//!
//! Vocabulary at the bottom (leaf modules every layer may name): [`slot`] (worker ids, slot
//! states and views), [`env`](mod@env) (the master ↔ child environment and fd contract), [`user`]
//! (`--user`), [`loglimit`] (rate-limited warnings).
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

pub mod appmetrics;
pub mod balance;
pub mod channel;
pub mod config;
pub mod control;
pub mod dispatch;
pub mod env;
pub mod hashkey;
pub mod held;
pub mod listener;
pub mod loglimit;
pub mod metrics;
pub mod output;
pub mod peek;
pub mod procfs;
pub mod proxy;
pub mod reaper;
pub mod router;
pub mod sessions;
pub mod silence;
pub mod slot;
pub mod spawn;
pub mod steering;
pub mod supervisor;
pub mod sys;
pub mod systemd;
pub mod tcpdiag;
pub mod upgrade;
pub mod user;
pub mod worker;

/// lb's version: the package version, or `LB_VERSION` when set at build time (to tell builds
/// apart, e.g. before and after an in-place upgrade).
pub const VERSION: &str = match option_env!("LB_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};
