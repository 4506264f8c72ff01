//! The admin HTTP endpoint: `/metrics` (lb's families and the app's, merged), `/workers` (the
//! slot table), `/healthz`, and the status page at `/`; and [`Shared`], the state it reads,
//! which the master keeps current.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;

use super::Metrics;
use crate::balance::Policy;

/// One row of the `/workers` table, kept current by the master.
#[derive(Debug, Clone, Default)]
pub struct SlotView {
    /// Pid of the slot's current worker.
    pub pid: Option<u32>,
    /// `starting`, `ready`, `draining`, `backoff`, `failed`, `exited`.
    pub state: &'static str,
    /// When the current worker started.
    pub started: Option<Instant>,
    /// Generation (spawn count) of the current worker.
    pub generation: u64,
}

/// What the admin endpoint reads: metrics plus the slot table.
#[derive(Debug)]
pub struct Shared {
    /// The metrics.
    pub metrics: Metrics,
    /// The slot table.
    pub table: Mutex<Vec<SlotView>>,
    /// The policy (for `/workers`).
    pub policy: Policy,
    /// `true` while an in-place upgrade settles: the admin endpoint accepts nothing new and
    /// closes its connections once their request in progress is answered.
    admin_pause: tokio::sync::watch::Sender<bool>,
    /// Admin connections open.
    admin_open: std::sync::atomic::AtomicUsize,
    /// Where a scrape asks the master for the app's metrics (set by the master when it runs).
    pub app_metrics: std::sync::OnceLock<AppScrapes>,
    /// The address lb listens on (for `/workers` and `lb ls`).
    pub listen: std::sync::OnceLock<std::net::SocketAddr>,
    /// When this lb image started.
    started: std::time::Instant,
    /// The workers' last output lines (`--worker-output prefix|json`, `lb logs`).
    pub logs: Arc<crate::output::Logs>,
}

/// A scrape's request for the app's metrics: the master answers with Prometheus text.
pub type AppScrapes = tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<String>>;

impl Shared {
    /// Creates the shared state for `workers` slots.
    pub fn new(workers: usize, policy: Policy) -> Arc<Self> {
        Arc::new(Self {
            metrics: Metrics::new(workers, policy),
            table: Mutex::new(vec![
                SlotView {
                    state: "starting",
                    ..SlotView::default()
                };
                workers
            ]),
            policy,
            admin_pause: tokio::sync::watch::Sender::new(false),
            admin_open: std::sync::atomic::AtomicUsize::new(0),
            app_metrics: std::sync::OnceLock::new(),
            listen: std::sync::OnceLock::new(),
            started: std::time::Instant::now(),
            logs: Arc::default(),
        })
    }

    /// Pauses (or resumes) the admin endpoint for an in-place upgrade: no new connection is
    /// accepted (they wait in the backlog), open ones close after their request in progress.
    pub fn pause_admin(&self, paused: bool) {
        self.admin_pause.send_replace(paused);
    }

    /// Admin connections still open.
    pub fn admin_open(&self) -> usize {
        self.admin_open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Updates slot `slot`'s row.
    pub fn set_slot(&self, slot: usize, view: SlotView) {
        if let Ok(mut t) = self.table.lock()
            && let Some(row) = t.get_mut(slot)
        {
            *row = view;
        }
    }

    /// Makes the slot table `n` rows long (lb was scaled).
    pub fn resize(&self, n: usize) {
        self.metrics.ensure_slots(n);
        if let Ok(mut t) = self.table.lock() {
            t.resize(
                n,
                SlotView {
                    state: "starting",
                    ..SlotView::default()
                },
            );
        }
    }

    /// Whether any slot's worker is ready.
    pub fn any_ready(&self) -> bool {
        let table = self.table.lock().map(|t| t.len()).unwrap_or(0);
        (0..table).any(|i| self.metrics.slot(i).up.get() > 0)
    }

    /// The `/workers` JSON document.
    pub fn workers_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Row {
            slot: usize,
            pid: Option<u32>,
            state: &'static str,
            generation: u64,
            uptime_seconds: f64,
            connections: u64,
            active_connections: i64,
            requests: u64,
            restarts: u64,
            memory_bytes: i64,
        }
        #[derive(Serialize)]
        struct Doc {
            policy: Policy,
            listen: Option<String>,
            pid: u32,
            uptime_seconds: f64,
            version: &'static str,
            accepted_connections: u64,
            reloads: u64,
            workers: Vec<Row>,
        }
        let table = self.table.lock().map(|t| t.clone()).unwrap_or_default();
        let workers = table
            .iter()
            .enumerate()
            .map(|(slot, v)| {
                let m = self.metrics.slot(slot);
                Row {
                    slot,
                    pid: v.pid,
                    state: v.state,
                    generation: v.generation,
                    uptime_seconds: v
                        .started
                        .map_or(0.0, |t| (t.elapsed().as_millis() as f64) / 1000.0),
                    connections: m.connections.get(),
                    active_connections: m.active.get(),
                    requests: m.requests.get(),
                    restarts: m.restarts.get(),
                    memory_bytes: m.memory.get(),
                }
            })
            .collect();
        serde_json::to_vec_pretty(&Doc {
            policy: self.policy,
            listen: self.listen.get().map(ToString::to_string),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            version: crate::VERSION,
            accepted_connections: self.metrics.accepted.get(),
            reloads: self.metrics.reloads.with_label_values(&["ok"]).get(),
            workers,
        })
        .expect("serializable")
    }
}

/// Admin connections served at once; more are closed at once (and counted), so idle
/// connections to the admin port can never take the master's file descriptors.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// How long an admin connection accepted just before an in-place upgrade may take to send its
/// first request before it is closed.
const ADMIN_FIRST_REQUEST: std::time::Duration = std::time::Duration::from_millis(50);

/// Serves the admin endpoint on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let mut paused = shared.admin_pause.subscribe();
    loop {
        // Paused for an in-place upgrade: connections wait in the backlog for the next image.
        if paused.wait_for(|p| !*p).await.map(drop).is_err() {
            return;
        }
        let accepted = tokio::select! {
            biased;
            _ = async { paused.wait_for(|p| *p).await.map(drop) } => continue,
            a = listener.accept() => a,
        };
        let (stream, _) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of fds (counted by the main listener too): back off, do not spin or spam.
                tracing::debug!("metrics endpoint accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.metrics.admin_refused.inc();
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        shared
            .admin_open
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut pause = shared.admin_pause.subscribe();
        tokio::spawn(async move {
            let _permit = permit;
            let counted = shared.clone();
            let served = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let served_in = served.clone();
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                served_in.store(true, std::sync::atomic::Ordering::Relaxed);
                async move { Ok::<_, Infallible>(handle(&req, &shared).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                // The connection first: a request already received is read and answered
                // before a pause closes the connection.
                biased;
                _ = conn.as_mut() => {}
                _ = async { pause.wait_for(|p| *p).await.map(drop) } => {
                    // A connection just accepted may not have sent its request yet: it gets a
                    // moment to. Then the request in progress (if any) is finished, and the
                    // connection closed.
                    if !served.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = tokio::time::timeout(ADMIN_FIRST_REQUEST, conn.as_mut()).await;
                    }
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            counted
                .admin_open
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
}

/// The status page at `/`: one self-contained HTML document (no CDN, no framework) that polls
/// `/workers` once a second while it is open; the master does nothing for it otherwise.
const STATUS_PAGE: &str = include_str!("status.html");

/// The app's families for one scrape (empty when the master has none to give).
async fn app_metrics(shared: &Shared) -> String {
    let Some(tx) = shared.app_metrics.get() else {
        return String::new();
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if tx.send(reply).is_err() {
        return String::new();
    }
    // The master bounds the wait (--app-metrics-timeout); this only guards against a master
    // that is gone.
    tokio::time::timeout(std::time::Duration::from_secs(30), answer)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

async fn handle(req: &Request<hyper::body::Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let (status, ctype, body): (StatusCode, &str, Vec<u8>) = match (req.method(), req.uri().path())
    {
        (&hyper::Method::GET | &hyper::Method::HEAD, "/metrics") => {
            let mut body = shared.metrics.render();
            body.extend(app_metrics(shared).await.into_bytes());
            (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            )
        }
        (&hyper::Method::GET | &hyper::Method::HEAD, "/") => (
            StatusCode::OK,
            "text/html; charset=utf-8",
            STATUS_PAGE.as_bytes().to_vec(),
        ),
        (&hyper::Method::GET | &hyper::Method::HEAD, "/workers") => {
            (StatusCode::OK, "application/json", shared.workers_json())
        }
        (&hyper::Method::GET | &hyper::Method::HEAD, "/healthz") => {
            if shared.any_ready() {
                (StatusCode::OK, "text/plain", b"ok\n".to_vec())
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    b"no worker ready\n".to_vec(),
                )
            }
        }
        (_, "/" | "/metrics" | "/workers" | "/healthz") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"method not allowed\n".to_vec(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            b"not found (try /, /metrics, /workers, /healthz)\n".to_vec(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_str(ctype).expect("ascii"),
    );
    resp
}

/// Binds the admin endpoint.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, crate::listener::BindError> {
    let s = crate::listener::bind(addr, 128)?;
    Ok(s.into())
}
