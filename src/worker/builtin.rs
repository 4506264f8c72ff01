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
            header: ms("LB_CLIENT_HEADER_TIMEOUT_MS", 60_000),
            keepalive: ms("LB_KEEPALIVE_TIMEOUT_MS", 75_000),
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
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
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
    let serve_one = |conn: super::Connection| {
        let (hello, http, stop) = (hello.clone(), http.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let counters = conn.guard.counters().clone();
            // Shown to the client when lb read its address from a PROXY header.
            let client = conn
                .client
                .and_then(|a| HeaderValue::from_str(&a.to_string()).ok());
            serve_connection(conn.stream, hello, client, counters, http, stop, idle).await;
            drop(conn.guard);
        });
    };
    // With `lb --steering kernel`, the kernel sends this slot's clients to its own listener.
    let listener = worker.listener()?;
    loop {
        tokio::select! {
            conn = worker.accept() => match conn {
                Some(conn) => serve_one(conn),
                None => break,
            },
            conn = async { listener.as_ref().expect("guarded").accept().await }, if listener.is_some() => {
                // An accept error (a connection reset in the queue, out of fds) affects that
                // connection only: keep accepting.
                match conn {
                    Ok(conn) => serve_one(conn),
                    // Out of fds: give closes a moment instead of spinning.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            _ = term.recv() => break,
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
        serve_one(conn);
    }
    // Then wait for connections to finish their current request and close.
    drop(worker);
    // (lb SIGKILLs us after its --shutdown-timeout if a connection never finishes.)
    while counters.active() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Serves one HTTP/1.1 connection (with upgrades) until it closes or a drain finishes it.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    hello: Bytes,
    client: Option<HeaderValue>,
    counters: Arc<Counters>,
    http: Arc<hyper::server::conn::http1::Builder>,
    mut stop: watch::Receiver<bool>,
    idle: IdleLimits,
) {
    let _ = stream.set_nodelay(true);
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
    let service = hyper::service::service_fn(move |req| {
        let hello = hello.clone();
        let counters = counters.clone();
        let act = act.clone();
        let client = client.clone();
        started_tx.send_replace(true);
        act.in_flight.fetch_add(1, Ordering::Relaxed);
        async move {
            let mut resp = route(req, &hello, &counters).await;
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
        .serve_connection(TokioIo::new(stream), service)
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
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        socket.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(socket.into())?;
        let hello: Bytes = format!("worker direct pid {}\n", std::process::id()).into();
        let counters = Arc::new(Counters::default());
        let http = Arc::new(hyper::server::conn::http1::Builder::new());
        let (_stop_tx, stop_rx) = watch::channel(false);
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let (hello, counters, http, stop) = (
                hello.clone(),
                counters.clone(),
                http.clone(),
                stop_rx.clone(),
            );
            tokio::spawn(serve_connection(
                stream,
                hello,
                None,
                counters,
                http,
                stop,
                IdleLimits::from_env(),
            ));
        }
    })
}

/// The response header that tells the client's address lb read from a PROXY header.
const CLIENT_ADDR: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static("x-client-addr");

async fn route(req: Request<Incoming>, hello: &Bytes, counters: &Counters) -> Response<Body> {
    let path = req.uri().path();
    let resp = match (req.method(), path) {
        (&Method::GET, "/") => text(StatusCode::OK, hello.clone()),
        (&Method::GET, "/ws") => websocket(req),
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

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
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
    tokio::spawn(async move {
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
        while let Some(Ok(msg)) = rx.next().await {
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
