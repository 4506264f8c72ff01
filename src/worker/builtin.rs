//! lb's built-in worker: HTTP/1.1 (keep-alive) with hyper and a WebSocket echo, on [`Worker`].
//!
//! Routes:
//! - `GET /` → `200 worker <slot> pid <pid>\n`
//! - `GET /ws` → WebSocket echo (text and binary; messages up to 16 MiB)
//! - `POST /echo` → the request body, streamed back
//! - `GET /sleep/<ms>` → waits, then answers like `/` (for drain and shutdown tests)
//! - anything else → 404
//!
//! On SIGTERM it stops taking connections, lets in-flight requests finish (idle keep-alive
//! connections are closed), and exits once none remain.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::{Counters, Worker};

type Body = BoxBody<Bytes, hyper::Error>;

/// Why the built-in worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    /// The lb channel is missing or unusable.
    #[error(transparent)]
    Worker(#[from] super::WorkerError),
    /// The runtime or a signal handler could not be set up.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// While draining, how long a connection that has not sent its first request yet is kept open.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// After an idle timeout, how long a graceful close may take before the connection is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_millis(500);

/// How long a connection may sit idle, as nginx bounds it: before its first complete request
/// (`client_header_timeout`, a client that sends nothing or half a request line) and between
/// requests on a kept-alive connection (`keepalive_timeout`). A WebSocket, once upgraded, is not
/// affected. lb passes its `--client-header-timeout` and `--keepalive-timeout`.
#[derive(Debug, Clone, Copy)]
struct IdleLimits {
    header: Duration,
    keepalive: Duration,
}

impl IdleLimits {
    fn from_env() -> Self {
        let ms = |k: &str, d: u64| {
            Duration::from_millis(
                std::env::var(k)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(d),
            )
        };
        Self {
            header: ms(crate::env::LB_CLIENT_HEADER_TIMEOUT_MS, 60_000),
            keepalive: ms(crate::env::LB_KEEPALIVE_TIMEOUT_MS, 75_000),
        }
    }
}

/// What the idle watchdog of one connection needs to know.
#[derive(Debug, Default)]
struct Activity {
    /// Requests being answered.
    in_flight: AtomicUsize,
    /// When the last request was answered, in ms since the connection began (`u64::MAX`: none
    /// yet).
    last_done_ms: AtomicU64,
}

/// Largest WebSocket message and frame the echo endpoint accepts (PITFALLS §13).
const WS_MAX_MESSAGE: usize = 16 << 20;

/// Runs the built-in worker until lb closes the channel or SIGTERM drains it.
pub fn main() -> Result<(), BuiltinError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve())
}

async fn serve() -> Result<(), BuiltinError> {
    if let Ok(slot) = std::env::var(crate::env::LB_WORKER_ID) {
        // `ps -o comm`, `top`: the same title as the command line lb gave.
        if let Ok(title) = std::ffi::CString::new(format!("lb: worker {slot}")) {
            let _ = nix::sys::prctl::set_name(&title);
        }
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    // `kill -HUP $(pidof lb)` reaches the workers too (they are `lb` as well): the signals the
    // master acts on must not kill them. HUP and USR2 are the master's (reload, upgrade) and
    // mean nothing here; INT drains, like TERM. A handler that is never polled still replaces
    // the default action (terminate).
    let _ignored = (
        signal(SignalKind::hangup())?,
        signal(SignalKind::user_defined2())?,
    );
    let mut int = signal(SignalKind::interrupt())?;
    let mut worker = Worker::from_env()?;
    // For `lb --wait-ready`: we can take connections (and drain on SIGTERM) from now on.
    worker.ready();
    let slot = worker.slot().unwrap_or(0);
    let hello: Bytes = format!("worker {slot} pid {}\n", std::process::id()).into();
    let counters = worker.counters().clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    let idle = IdleLimits::from_env();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true).max_buf_size(64 * 1024);
    let http = Arc::new(http);
    // `handed`: lb passed the connection over (it may still hold its copy of the fd for a
    // moment); otherwise this worker accepted it from its slot's listener.
    let serve_one = |conn: super::Connection, handed: bool| {
        let (hello, http, stop) = (hello.clone(), http.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let counters = conn.guard.counters().clone();
            // Shown to the client when lb read its address from a PROXY header.
            let client = conn
                .client
                .and_then(|a| HeaderValue::from_str(&a.to_string()).ok());
            let serving = Serving {
                hello,
                client,
                counters,
                http,
                stop,
                idle,
                handed,
            };
            serve_connection(conn.stream, serving).await;
            drop(conn.guard);
        });
    };
    // With `lb --steering kernel`, the kernel sends this slot's clients to its own listener.
    let listener = worker.listener()?;
    loop {
        tokio::select! {
            conn = worker.accept() => match conn {
                Some(conn) => serve_one(conn, true),
                None => break,
            },
            conn = async { listener.as_ref().expect("guarded").accept().await }, if listener.is_some() => {
                // An accept error (a connection reset in the queue, out of fds) affects that
                // connection only: keep accepting.
                match conn {
                    Ok(conn) => serve_one(conn, false),
                    // Out of fds: give closes a moment instead of spinning.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Stop accepting from the slot's listener: what waits there goes to the next worker of the
    // slot (a rolling restart) or is taken by lb.
    drop(listener);
    // Drain: take no new connections (lb gets NACKs and re-routes them), but serve every one
    // already acknowledged.
    let _ = stop_tx.send(true);
    worker.close();
    while let Some(conn) = worker.accept().await {
        serve_one(conn, true);
    }
    // Then wait for connections to finish their current request and close.
    drop(worker);
    // (lb SIGKILLs us after its --shutdown-timeout if a connection never finishes.)
    while counters.active() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// The most a request head may take on the fast path; a larger one goes to hyper.
const FAST_HEAD_LIMIT: usize = 16 * 1024;

/// What the start of a connection's buffer holds.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// A complete `GET /` over HTTP/1.1 without a body or an upgrade: `len` bytes, and whether the
    /// client asked to close.
    Simple { len: usize, close: bool },
    /// Not a complete head yet.
    Partial,
    /// Anything else (another route or method, a body, an upgrade, HTTP/1.0, a malformed head):
    /// hyper answers it.
    Other,
}

fn parse_head(buf: &[u8]) -> Head {
    if buf.is_empty() {
        return Head::Partial;
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Other,
    };
    if req.method != Some("GET") || req.path != Some("/") || req.version != Some(1) {
        return Head::Other;
    }
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name;
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("content-length") || is("transfer-encoding") || is("upgrade") || is("expect") {
            return Head::Other;
        }
        if is("connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                    return Head::Other;
                }
            }
        }
    }
    Head::Simple { len, close }
}

/// The `date` header's value, formatted once a second.
fn http_date() -> [u8; 29] {
    thread_local! {
        static DATE: std::cell::Cell<(u64, [u8; 29])> = const { std::cell::Cell::new((u64::MAX, [0; 29])) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let (at, text) = d.get();
        if at == secs {
            return text;
        }
        let mut text = [b' '; 29];
        let s = httpdate::fmt_http_date(now);
        let n = s.len().min(29);
        text[..n].copy_from_slice(&s.as_bytes()[..n]);
        d.set((secs, text));
        text
    })
}

/// The answer to `GET /`, as hyper would write it.
fn hello_response(out: &mut Vec<u8>, body: &[u8], client: Option<&HeaderValue>, close: bool) {
    use std::io::Write;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n");
    if let Some(c) = client {
        out.extend_from_slice(CLIENT_ADDR.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(c.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let _ = write!(out, "content-length: {}\r\ndate: ", body.len());
    out.extend_from_slice(&http_date());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

/// Serves one connection until it closes or a drain finishes it. `GET /` — what load balancers'
/// health checks and benchmarks send — is answered on a fast path that parses the head and
/// writes the response itself; from the first request that is anything else on, hyper serves
/// the rest of the connection (HTTP/1.1 with bodies, upgrades and errors), starting with the
/// bytes already read.
async fn serve_connection(mut stream: tokio::net::TcpStream, mut serving: Serving) {
    use bytes::Buf;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // TCP_NODELAY comes with the socket: lb sets it on its listeners and accepted sockets
    // inherit it.
    let began = tokio::time::Instant::now();
    let mut buf = bytes::BytesMut::with_capacity(2048);
    let mut out = Vec::with_capacity(256);
    let mut answered = 0u64;
    let mut last_done = began;
    // When this connection saw the drain begin.
    let mut stopped = (*serving.stop.borrow()).then_some(began);
    // `true`: hyper serves the rest; `false`: the connection ends here.
    let to_hyper = loop {
        // Requests already read (pipelined) are answered before reading more.
        match parse_head(&buf) {
            Head::Simple { len, close } => {
                let close = close || stopped.is_some();
                hello_response(&mut out, &serving.hello, serving.client.as_ref(), close);
                buf.advance(len);
                serving.counters.request_done();
                if stream.write_all(&out).await.is_err() || close {
                    break false;
                }
                answered += 1;
                last_done = tokio::time::Instant::now();
                continue;
            }
            Head::Other => break true,
            Head::Partial if buf.len() >= FAST_HEAD_LIMIT => break true,
            Head::Partial => {}
        }
        // As hyper's path does: a first request within the header timeout, the next ones within
        // the keep-alive timeout; when draining, an idle kept-alive connection is closed and one
        // that has sent nothing yet gets a short grace for its first request.
        let mut deadline = if answered == 0 {
            began + serving.idle.header
        } else {
            last_done + serving.idle.keepalive
        };
        if let Some(at) = stopped {
            if answered == 0 {
                deadline = deadline.min(at + FIRST_REQUEST_GRACE);
            } else if buf.is_empty() {
                break false;
            }
        }
        tokio::select! {
            r = stream.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => break false,
                Ok(_) => {}
            },
            () = tokio::time::sleep_until(deadline) => break false,
            r = serving.stop.changed(), if stopped.is_none() => {
                if r.is_err() || *serving.stop.borrow() {
                    stopped = Some(tokio::time::Instant::now());
                }
            }
        }
    };
    if !to_hyper {
        if serving.handed {
            let _ = stream.shutdown().await;
        }
        return;
    }
    let io = ClientIo {
        read: buf.freeze(),
        stream,
        shutdown: serving.handed,
    };
    serve_hyper(io, serving).await;
}

/// What serving one connection needs besides its socket.
struct Serving {
    /// The body of `GET /`.
    hello: Bytes,
    /// The client's address from a PROXY header, shown in `x-client-addr`.
    client: Option<HeaderValue>,
    counters: Arc<Counters>,
    http: Arc<hyper::server::conn::http1::Builder>,
    /// Becomes true when the worker drains.
    stop: watch::Receiver<bool>,
    idle: IdleLimits,
    /// lb handed the connection over: see [`ClientIo`].
    handed: bool,
}

/// Serves the rest of a connection with hyper (HTTP/1.1 with upgrades) until it closes or a
/// drain finishes it.
async fn serve_hyper(io: ClientIo, serving: Serving) {
    let Serving {
        hello,
        client,
        counters,
        http,
        mut stop,
        idle,
        ..
    } = serving;
    let began = tokio::time::Instant::now();
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        last_done_ms: AtomicU64::new(u64::MAX),
    });
    // A connection handed to us has a client that is about to send a request: when draining,
    // let that first request in before closing (else a client that connected just before
    // SIGTERM would see its connection closed).
    let (started_tx, mut started_rx) = watch::channel(false);
    let act = activity.clone();
    let ws_stop = stop.clone();
    let service = hyper::service::service_fn(move |req| {
        let hello = hello.clone();
        let counters = counters.clone();
        let act = act.clone();
        let client = client.clone();
        let stop = ws_stop.clone();
        started_tx.send_replace(true);
        act.in_flight.fetch_add(1, Ordering::Relaxed);
        async move {
            let mut resp = route(req, &hello, &counters, stop).await;
            if let Some(c) = client {
                resp.headers_mut().insert(CLIENT_ADDR, c);
            }
            act.last_done_ms
                .store(began.elapsed().as_millis() as u64, Ordering::Relaxed);
            act.in_flight.fetch_sub(1, Ordering::Relaxed);
            Ok::<_, Infallible>(resp)
        }
    });
    // Fires when the connection has been idle too long (checked only at its deadlines).
    let idle_out = async {
        let mut deadline = began + idle.header;
        loop {
            tokio::time::sleep_until(deadline).await;
            let now = tokio::time::Instant::now();
            if activity.in_flight.load(Ordering::Relaxed) > 0 {
                deadline = now + idle.keepalive;
                continue;
            }
            let next = match activity.last_done_ms.load(Ordering::Relaxed) {
                u64::MAX => began + idle.header,
                ms => began + Duration::from_millis(ms) + idle.keepalive,
            };
            if now >= next {
                return;
            }
            deadline = next;
        }
    };
    let served = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(served);
    tokio::select! {
        _ = served.as_mut() => {}
        () = idle_out => {
            // Nothing in progress: close politely, and for good if a half-sent request keeps
            // the connection open.
            served.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(IDLE_CLOSE_GRACE, served).await;
        }
        _ = async {
            let _ = stop.wait_for(|s| *s).await;
            let first = async { let _ = started_rx.wait_for(|s| *s).await; };
            let _ = tokio::time::timeout(FIRST_REQUEST_GRACE, first).await;
        } => {
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
    }
}

/// A client socket as hyper sees it: first the bytes the fast path already read, then the
/// socket. A connection lb handed over may still be open in lb for a moment (it closes its copy
/// when this worker's ACK arrives), so closing ours would not end it: its write side is shut
/// down first (`shutdown`). One this worker accepted itself is ours alone: closing it sends the
/// FIN, and the `shutdown(2)` is saved.
struct ClientIo {
    read: Bytes,
    stream: tokio::net::TcpStream,
    shutdown: bool,
}

impl tokio::io::AsyncRead for ClientIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ClientIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.shutdown {
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Runs the built-in HTTP server on its own listening socket, without lb (`SO_REUSEPORT`, so
/// several can share a port). This is the *direct* baseline of the benchmarks.
pub fn main_standalone(addr: std::net::SocketAddr) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_tcp_nodelay(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        socket.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(socket.into())?;
        let hello: Bytes = format!("worker direct pid {}\n", std::process::id()).into();
        let counters = Arc::new(Counters::default());
        let http = Arc::new(hyper::server::conn::http1::Builder::new());
        let (_stop_tx, stop_rx) = watch::channel(false);
        let idle = IdleLimits::from_env();
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let serving = Serving {
                hello: hello.clone(),
                client: None,
                counters: counters.clone(),
                http: http.clone(),
                stop: stop_rx.clone(),
                idle,
                handed: false,
            };
            tokio::spawn(serve_connection(stream, serving));
        }
    })
}

/// The response header that tells the client's address lb read from a PROXY header.
const CLIENT_ADDR: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static("x-client-addr");

async fn route(
    req: Request<Incoming>,
    hello: &Bytes,
    counters: &Arc<Counters>,
    stop: watch::Receiver<bool>,
) -> Response<Body> {
    let path = req.uri().path();
    let resp = match (req.method(), path) {
        (&Method::GET, "/") => text(StatusCode::OK, hello.clone()),
        (&Method::GET, "/ws") => websocket(req, counters, stop),
        (&Method::POST, "/echo") => {
            let body = req.into_body().boxed();
            Response::new(body)
        }
        (&Method::GET, p) if p.starts_with("/sleep/") => {
            match p["/sleep/".len()..].parse::<u64>() {
                Ok(ms) if ms <= 600_000 => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    text(StatusCode::OK, hello.clone())
                }
                _ => text(
                    StatusCode::BAD_REQUEST,
                    Bytes::from_static(b"bad duration\n"),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
    };
    counters.request_done();
    resp
}

fn text(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    r
}

/// Echoes a WebSocket's messages. The socket counts as active until it closes (hyper lets go of
/// the connection at the upgrade); when the worker drains, it says goodbye with close code 1001
/// (going away), so the client reconnects to another worker instead of waiting for lb's
/// shutdown timeout.
fn websocket(
    mut req: Request<Incoming>,
    counters: &Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> Response<Body> {
    let h = req.headers();
    let upgrade = h
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = h.get(SEC_WEBSOCKET_KEY).filter(|_| upgrade) else {
        return text(
            StatusCode::BAD_REQUEST,
            Bytes::from_static(b"expected a WebSocket upgrade\n"),
        );
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let held = counters.hold();
    tokio::spawn(async move {
        let _held = held;
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        // Small buffers: an idle WebSocket should cost kilobytes, not the 256 KiB of the
        // defaults (they grow as large messages need).
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_write_buffer_size(WS_MAX_MESSAGE * 2)
            .max_message_size(Some(WS_MAX_MESSAGE))
            .max_frame_size(Some(WS_MAX_MESSAGE));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        let (mut tx, mut rx) = ws.split();
        loop {
            let msg = tokio::select! {
                m = rx.next() => m,
                () = async { let _ = stop.wait_for(|s| *s).await; } => {
                    let bye = CloseFrame { code: CloseCode::Away, reason: "worker stopping".into() };
                    let _ = tx.send(Message::Close(Some(bye))).await;
                    break;
                }
            };
            let Some(Ok(msg)) = msg else { break };
            if msg.is_text() || msg.is_binary() {
                if tx.send(msg).await.is_err() {
                    break;
                }
            } else if msg.is_close() {
                let _ = tx.close().await;
                break;
            }
        }
    });
    let mut r = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = r.headers_mut();
    hs.insert(UPGRADE, HeaderValue::from_static("websocket"));
    hs.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    hs.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_get_of_the_root_takes_the_fast_path() {
        let simple = |close| move |len| Head::Simple { len, close };
        for (req, want) in [
            ("GET / HTTP/1.1\r\nhost: a\r\n\r\n", simple(false)(27)),
            (
                "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
                simple(true)(37),
            ),
            (
                "GET / HTTP/1.1\r\nconnection: Keep-Alive\r\n\r\n",
                simple(false)(42),
            ),
        ] {
            assert_eq!(parse_head(req.as_bytes()), want, "{req:?}");
        }
        for partial in [
            "",
            "G",
            "GET / HTTP/1.1\r\n",
            "GET / HTTP/1.1\r\nhost: a\r\n",
        ] {
            assert_eq!(parse_head(partial.as_bytes()), Head::Partial, "{partial:?}");
        }
        for other in [
            "GET /ws HTTP/1.1\r\n\r\n",
            "HEAD / HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello",
            "GET / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nexpect: 100-continue\r\n\r\n",
            "\x16\x03\x01\x02\x00",
            "GET / HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            assert_eq!(parse_head(other.as_bytes()), Head::Other, "{other:?}");
        }
    }

    #[test]
    fn the_fast_answer_is_a_valid_response() {
        let mut out = Vec::new();
        let client = HeaderValue::from_static("192.0.2.1:80");
        hello_response(&mut out, b"worker 0 pid 1\n", Some(&client), true);
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(n) = resp.parse(&out).unwrap() else {
            panic!("incomplete: {:?}", String::from_utf8_lossy(&out));
        };
        assert_eq!(resp.code, Some(200));
        let get = |k: &str| {
            resp.headers
                .iter()
                .find(|h| h.name == k)
                .map(|h| std::str::from_utf8(h.value).unwrap().to_owned())
        };
        assert_eq!(get("content-length").as_deref(), Some("15"));
        assert_eq!(get("x-client-addr").as_deref(), Some("192.0.2.1:80"));
        assert_eq!(get("connection").as_deref(), Some("close"));
        let date = get("date").unwrap();
        assert!(httpdate::parse_http_date(&date).is_ok(), "{date}");
        assert_eq!(&out[n..], b"worker 0 pid 1\n");
    }
}
