//! The worker channel's framing and messages: Node.js child-process IPC in `json` mode.
//!
//! A message is `JSON.stringify(value) + "\n"`; any JSON value may be a message. A value is
//! *internal* when it is an object whose `cmd` is a string starting with `NODE_` (longer than 5
//! chars); everything else is a user message. See `shared/node-ipc.md` §2–§5.
//!
//! Invariants:
//! - lb never writes a blank line, invalid JSON, or an unsolicited `NODE_HANDLE_ACK`/`NACK`: each
//!   of these crashes a Node worker. lb writes only the constants below, the cluster-protocol
//!   lines of [`cluster`] (built with `serde_json`, one line each), and lines a worker sent that
//!   lb relays unchanged (socket.io adapter messages, which parsed as valid JSON).
//! - The decoder is bounded: a line longer than its limit is discarded (up to the next newline)
//!   and reported, so a worker that writes megabytes without a newline cannot grow master memory.
//! - A line that is not valid JSON is one dropped message, never a fatal channel error.
//!
//! Both ends use this module: [`Inbox`] is the receiving half of every channel endpoint (batch
//! reads, fd FIFO, framing); [`FromWorker`]/[`WorkerMsg`] and [`FromMaster`] are the typed
//! messages each way, with the constants and [`WorkerMsg::encode`] for what lb writes.

use std::borrow::Cow;
use std::net::SocketAddr;

use serde_json::Value;

pub mod cluster;
mod inbox;
pub mod v8;
pub use cluster::ClusterMsg;
pub use inbox::{Inbox, Incoming, Received};

/// The handoff envelope lb sends with each connection fd (one `sendmsg`, one fd).
///
/// The `key` makes a Node worker track the sockets it receives (node-ipc.md §5.2), so lb can ask
/// an unmodified Node worker how many of them are still open with [`SOCKET_COUNT_QUERY`].
pub const HANDLE_ENVELOPE: &[u8] =
    b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":\"sticky-session:connection\",\"key\":\"lb\"}\n";
/// The message a handed-over connection travels with (`--handoff`, DESIGN §12): what the
/// worker's `process.on('message', (msg, socket))` sees as `msg`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HandoffMsg {
    /// `'sticky-session:connection'`: Node's cluster guide, and lb's default.
    #[default]
    Default,
    /// `{"type":"sticky:connection","data":""}`: `@socket.io/sticky`'s `setupWorker`. Its
    /// primary sends the bytes it read as `data` for the worker to `unshift`; lb reads nothing,
    /// so `data` is an empty string — which `socket.unshift` takes as a zero-length chunk in both
    /// serializations (a `Buffer` would cross `json` as `{"type":"Buffer",…}`, which it rejects).
    SocketIo,
    /// Any other string (`sticky:balance` for the `sticky-session` package).
    Named(String),
}

impl HandoffMsg {
    /// Parses `--handoff`: `socket.io`, or the message string itself.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "socket.io" => Ok(Self::SocketIo),
            HANDLE_MESSAGE => Ok(Self::Default),
            "" => Err(
                "the handoff message cannot be empty (e.g. sticky-session:connection, \
                       sticky:balance, socket.io)"
                    .into(),
            ),
            s if s.len() > 256 => Err(format!(
                "a handoff message of {} bytes is not one a worker expects (at most 256)",
                s.len()
            )),
            s if s.chars().any(char::is_control) => Err(format!(
                "the handoff message {s:?} contains control characters"
            )),
            s => Ok(Self::Named(s.to_owned())),
        }
    }

    /// What `--handoff` shows.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Default => HANDLE_MESSAGE,
            Self::SocketIo => "socket.io",
            Self::Named(s) => s,
        }
    }

    /// The envelope's `msg`.
    pub fn value(&self) -> Value {
        match self {
            Self::Default => Value::String(HANDLE_MESSAGE.into()),
            Self::SocketIo => serde_json::json!({"type": "sticky:connection", "data": ""}),
            Self::Named(s) => Value::String(s.clone()),
        }
    }

    /// The whole `NODE_HANDLE` line (JSON, with its newline), with the client's address from a
    /// PROXY header (`"client":"IP:PORT"`, read by lb-aware workers; Node ignores keys it does
    /// not know).
    pub fn envelope(&self, client: Option<SocketAddr>) -> Vec<u8> {
        if *self == Self::Default && client.is_none() {
            return HANDLE_ENVELOPE.to_vec();
        }
        let mut v = serde_json::json!({
            "cmd": "NODE_HANDLE",
            "type": "net.Socket",
            "msg": self.value(),
            "key": "lb",
        });
        if let Some(c) = client {
            v["client"] = Value::String(c.to_string());
        }
        let mut out = serde_json::to_vec(&v).expect("serializes");
        out.push(b'\n');
        out
    }
}

impl std::fmt::Display for HandoffMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// [`HANDLE_ENVELOPE`] with the client's address from a PROXY header (`"client":"IP:PORT"`):
/// lb-aware workers read it; Node ignores keys it does not know.
pub fn handle_envelope_for(client: SocketAddr) -> Vec<u8> {
    HandoffMsg::Default.envelope(Some(client))
}

/// Asks a Node worker how many sockets received with [`HANDLE_ENVELOPE`] are open; it answers
/// `{"cmd":"NODE_SOCKET_COUNT","key":"lb","count":N}`. Other workers ignore it (an internal message).
pub const SOCKET_COUNT_QUERY: &[u8] = b"{\"cmd\":\"NODE_SOCKET_GET_COUNT\",\"key\":\"lb\"}\n";
/// The user message that accompanies a handed-off connection.
pub const HANDLE_MESSAGE: &str = "sticky-session:connection";
/// "I took the fd" (sent by the receiver of a `NODE_HANDLE`).
pub const HANDLE_ACK: &[u8] = b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n";
/// "I did not get an fd for that `NODE_HANDLE`".
pub const HANDLE_NACK: &[u8] = b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n";

/// Node's channel serialization (`NODE_CHANNEL_SERIALIZATION_MODE`), the same for every worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Serialization {
    /// One JSON value per line (Node's default).
    #[default]
    Json,
    /// V8 `ValueSerializer` frames ([`v8`]): binary data crosses as binary.
    Advanced,
}

impl Serialization {
    /// The value of `NODE_CHANNEL_SERIALIZATION_MODE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Advanced => "advanced",
        }
    }

    /// The mode a worker was started with (from its environment; `json` if unset).
    pub fn from_env() -> Self {
        match std::env::var(crate::env::NODE_CHANNEL_SERIALIZATION_MODE).as_deref() {
            Ok("advanced") => Self::Advanced,
            _ => Self::Json,
        }
    }

    /// One message in this mode, from its JSON line (lb's constants and cluster lines are
    /// written as JSON lines and re-encoded here for `advanced`).
    pub fn encode_line(self, line: &'static [u8]) -> Cow<'static, [u8]> {
        match self {
            Self::Json => Cow::Borrowed(line),
            Self::Advanced => Cow::Owned(self.reencode(line.to_vec())),
        }
    }

    /// Like [`Serialization::encode_line`] for a line built at run time.
    pub fn reencode(self, line: Vec<u8>) -> Vec<u8> {
        match self {
            Self::Json => line,
            Self::Advanced => {
                let body = line.strip_suffix(b"\n").unwrap_or(&line);
                let v: Value = serde_json::from_slice(body).expect("lb's own lines are valid JSON");
                v8::encode(&v)
            }
        }
    }

    /// One message in this mode.
    pub fn encode(self, value: &Value) -> Vec<u8> {
        match self {
            Self::Json => encode(value),
            Self::Advanced => v8::encode(value),
        }
    }
}

/// One received message, as its serialization delivered it.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// A JSON line, without its `\n`.
    Json(&'a [u8]),
    /// A V8 frame: the whole frame (with its length prefix) and its payload.
    V8 {
        /// Length prefix and payload, as received (relayed unchanged).
        frame: &'a [u8],
        /// The payload.
        payload: &'a [u8],
    },
}

impl Payload<'_> {
    /// The decoded value (`None`: not valid in its serialization).
    fn value(self) -> Option<Value> {
        match self {
            Payload::Json(b) => serde_json::from_slice(b).ok(),
            Payload::V8 { payload, .. } => v8::decode(payload).ok(),
        }
    }

    /// The message as received, ready to be sent on unchanged.
    fn raw(self) -> Vec<u8> {
        match self {
            Payload::Json(b) => {
                let mut v = b.to_vec();
                v.push(b'\n');
                v
            }
            Payload::V8 { frame, .. } => frame.to_vec(),
        }
    }
}

/// Default bound on one channel line (1 MiB): generous for stats, far below memory trouble.
pub const DEFAULT_MAX_LINE: usize = 1 << 20;

/// Splits a byte stream into lines, bounded in memory.
#[derive(Debug)]
pub struct LineDecoder {
    /// Bytes received but not yet returned as a complete line.
    buf: Vec<u8>,
    /// Where the next unreturned line starts in `buf` (compacted lazily).
    start: usize,
    /// Longest line accepted; longer ones are discarded.
    max_line: usize,
    /// True while discarding the rest of an over-long line.
    discarding: bool,
}

/// One item out of the decoder.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A complete line, without its `\n`.
    Complete(&'a [u8]),
    /// A line longer than the limit was dropped.
    TooLong,
}

impl LineDecoder {
    /// A decoder that accepts lines up to `max_line` bytes.
    pub fn new(max_line: usize) -> Self {
        Self {
            buf: Vec::with_capacity(4096),
            start: 0,
            max_line,
            discarding: false,
        }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next complete line (or a too-long report), if any.
    pub fn next_line(&mut self) -> Option<Line<'_>> {
        loop {
            let pending = &self.buf[self.start..];
            let Some(i) = memchr(b'\n', pending) else {
                if pending.len() > self.max_line {
                    // Drop what we have and keep dropping until the next newline; report once.
                    self.buf.clear();
                    self.start = 0;
                    if !self.discarding {
                        self.discarding = true;
                        return Some(Line::TooLong);
                    }
                } else {
                    self.compact();
                }
                return None;
            };
            let begin = self.start;
            self.start += i + 1;
            if self.discarding {
                // The tail of a line already reported as too long.
                self.discarding = false;
                continue;
            }
            if i > self.max_line {
                return Some(Line::TooLong);
            }
            return Some(Line::Complete(&self.buf[begin..begin + i]));
        }
    }

    /// Bytes currently buffered (for tests and memory accounting).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The start of a line received and not yet complete (`None` while discarding an over-long
    /// one: its end is not wanted).
    pub fn pending_bytes(&self) -> Option<&[u8]> {
        (!self.discarding).then(|| &self.buf[self.start..])
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[inline]
fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

/// What a worker told the master, classified: the handle protocol (which the dispatch answers
/// itself) or a message for the rest of lb.
#[derive(Debug, Clone, PartialEq)]
pub enum FromWorker {
    /// `{"cmd":"NODE_HANDLE_ACK"}`: the oldest in-flight handle was taken.
    HandleAck,
    /// `{"cmd":"NODE_HANDLE_NACK"}`: the oldest in-flight handle did not arrive.
    HandleNack,
    /// `{"cmd":"NODE_HANDLE",...}`: the worker sent us a handle; it must be answered.
    Handle,
    /// `{"cmd":"NODE_CLUSTER",...}`: Node's cluster protocol.
    Cluster(ClusterMsg),
    /// Anything else.
    Msg(WorkerMsg),
}

/// A worker's message that is not part of the handle protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerMsg {
    /// `{"cmd":"NODE_SOCKET_COUNT","key":"lb","count":N}`: a Node worker's open handed-off sockets.
    SocketCount(u64),
    /// Another internal `NODE_*` message (ignored).
    OtherInternal,
    /// `{"cmd":"stats","data":{"activeConnections":A,"totalRequests":T}}` (cumulative).
    Stats {
        /// Connections open in the worker now, if given.
        active: Option<u64>,
        /// Requests served by this worker process since it started, if given.
        total_requests: Option<u64>,
    },
    /// `{"type":"request"}`: one request served.
    Request,
    /// `{"type":"heartbeat"}` or `{"cmd":"heartbeat"}`.
    Heartbeat,
    /// `{"type":"ready"}`.
    Ready,
    /// A `@socket.io/cluster-adapter` message for the other workers (`"source":"_sio_adapter"`).
    SocketIo(SioMessage),
    /// `{"type":"sticky:connection","data":SID}`: a `@socket.io/sticky` worker opened a
    /// socket.io session.
    SessionOpened(String),
    /// `{"type":"sticky:disconnection","data":SID}`: that session ended.
    SessionClosed(String),
    /// Another `@socket.io/sticky` message (`{"type":"sticky:…"}`, the relaying primary's, which
    /// lb never needs: it never reads the connection).
    SocketIoSticky,
    /// `{"type":"close"}`: a `sticky-session` worker's app closed its server (no new
    /// connections for it).
    Leaving,
    /// `{"type":"prom-client:getMetricsRes","requestId":N,"metrics":[…]}` (or with `error`):
    /// a prom-client worker's answer to lb's request for its metrics ([`crate::appmetrics`]).
    AppMetrics {
        /// The request it answers.
        request_id: Option<u64>,
        /// Its `metrics`, or its `error`.
        result: Result<Value, String>,
    },
    /// Any other valid JSON value.
    Other,
    /// Not valid JSON (dropped).
    Malformed,
}

/// A `@socket.io/cluster-adapter` message, as `setupPrimary()` relays it.
#[derive(Debug, Clone, PartialEq)]
pub struct SioMessage {
    /// The message exactly as the worker sent it (a line with its `\n`, or a whole V8 frame):
    /// relayed unchanged.
    pub line: Vec<u8>,
    /// The sending adapter's `uid`.
    pub uid: Option<String>,
    /// The message `type` (8 and 10 are responses: they go to the requester only).
    pub kind: u64,
    /// For responses: the requesting adapter's uid.
    pub requester_uid: Option<String>,
}

impl WorkerMsg {
    /// Encodes the messages a worker sends lb (the `lb::worker` side).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Stats {
                active,
                total_requests,
            } => format!(
                "{{\"cmd\":\"stats\",\"data\":{{\"activeConnections\":{},\"totalRequests\":{}}}}}\n",
                active.unwrap_or(0),
                total_requests.unwrap_or(0)
            )
            .into_bytes(),
            Self::Request => b"{\"type\":\"request\"}\n".to_vec(),
            Self::Heartbeat => b"{\"type\":\"heartbeat\"}\n".to_vec(),
            Self::Ready => b"{\"type\":\"ready\"}\n".to_vec(),
            Self::SocketCount(n) => {
                format!("{{\"cmd\":\"NODE_SOCKET_COUNT\",\"key\":\"lb\",\"count\":{n}}}\n").into_bytes()
            }
            Self::OtherInternal
            | Self::Other
            | Self::Malformed
            | Self::SocketIo(_)
            | Self::SessionOpened(_)
            | Self::SessionClosed(_)
            | Self::Leaving
            | Self::AppMetrics { .. }
            | Self::SocketIoSticky => {
                unreachable!("not a message lb's workers send")
            }
        }
    }
}

impl FromWorker {
    /// Classifies one line (without its newline).
    pub fn parse(line: &[u8]) -> Self {
        Self::parse_payload(Payload::Json(line))
    }

    /// Classifies one message in either serialization.
    pub fn parse_payload(p: Payload<'_>) -> Self {
        // Fast path for the message that arrives once per connection.
        if let Payload::Json(line) = p
            && line == &HANDLE_ACK[..HANDLE_ACK.len() - 1]
        {
            return Self::HandleAck;
        }
        let Some(value) = p.value() else {
            return Self::Msg(WorkerMsg::Malformed);
        };
        Self::classify(&value, p)
    }

    fn classify(value: &Value, p: Payload<'_>) -> Self {
        use WorkerMsg::*;
        let Value::Object(map) = value else {
            return Self::Msg(Other);
        };
        let cmd = map.get("cmd").and_then(Value::as_str);
        if cmd == Some("NODE_CLUSTER") {
            return Self::Cluster(ClusterMsg::from_map(map));
        }
        if map.get("source").and_then(Value::as_str) == Some("_sio_adapter") {
            let text = |k: &str| map.get(k).and_then(Value::as_str).map(str::to_owned);
            return Self::Msg(SocketIo(SioMessage {
                line: p.raw(),
                uid: text("uid"),
                kind: map.get("type").and_then(Value::as_u64).unwrap_or(0),
                requester_uid: text("requesterUid"),
            }));
        }
        if let Some(cmd) = cmd
            && is_internal_cmd(cmd)
        {
            return match cmd {
                "NODE_HANDLE_ACK" => Self::HandleAck,
                "NODE_HANDLE_NACK" => Self::HandleNack,
                "NODE_HANDLE" => Self::Handle,
                "NODE_SOCKET_COUNT" if map.get("key").and_then(Value::as_str) == Some("lb") => {
                    Self::Msg(
                        map.get("count")
                            .and_then(as_count)
                            .map_or(OtherInternal, SocketCount),
                    )
                }
                _ => Self::Msg(OtherInternal),
            };
        }
        let ty = map.get("type").and_then(Value::as_str);
        Self::Msg(match (cmd, ty) {
            (Some("stats"), _) => {
                let data = map.get("data");
                let field = |k: &str| data.and_then(|d| d.get(k)).and_then(as_count);
                Stats {
                    active: field("activeConnections"),
                    total_requests: field("totalRequests"),
                }
            }
            (Some("heartbeat"), _) | (_, Some("heartbeat")) => Heartbeat,
            (_, Some("request")) => Request,
            (_, Some("ready")) | (Some("ready"), _) => Ready,
            (_, Some(t @ ("sticky:connection" | "sticky:disconnection"))) => {
                match map.get("data").and_then(Value::as_str) {
                    Some(sid) if sid.len() <= MAX_SID => {
                        if t == "sticky:connection" {
                            SessionOpened(sid.to_owned())
                        } else {
                            SessionClosed(sid.to_owned())
                        }
                    }
                    _ => Other,
                }
            }
            (_, Some(t)) if t.starts_with("sticky:") => SocketIoSticky,
            (None, Some("close")) if map.len() == 1 => Leaving,
            (_, Some("prom-client:getMetricsRes")) => AppMetrics {
                request_id: map.get("requestId").and_then(as_count),
                result: match (map.get("error"), map.get("metrics")) {
                    (Some(e), _) => Err(e.as_str().unwrap_or("error").to_owned()),
                    (None, Some(m)) => Ok(m.clone()),
                    (None, None) => Ok(Value::Null),
                },
            },
            _ => Other,
        })
    }
}

/// The longest session id lb keeps (socket.io's are 20 characters).
pub const MAX_SID: usize = 64;

/// A non-negative integer count (JSON numbers from JS may be floats like `3.0`).
fn as_count(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| *f >= 0.0 && f.is_finite())
            .map(|f| f as u64)
    })
}

/// Node's `isInternal`: a `cmd` string that starts with `NODE_` and is longer than 5 chars.
fn is_internal_cmd(cmd: &str) -> bool {
    cmd.len() > 5 && cmd.starts_with("NODE_")
}

/// What the master told a worker, classified (used by [`crate::worker`]).
#[derive(Debug, Clone, PartialEq)]
pub enum FromMaster {
    /// A `NODE_HANDLE` envelope; an fd should have arrived with it.
    Handle {
        /// The envelope's `msg` (normally `"sticky-session:connection"`).
        msg: Value,
        /// The client's address, when lb read it from a PROXY header.
        client: Option<SocketAddr>,
    },
    /// Another internal message (ignored by workers).
    OtherInternal,
    /// A user message.
    User(Value),
    /// Not valid JSON.
    Malformed,
}

impl FromMaster {
    /// Classifies one line (without its newline).
    pub fn parse(line: &[u8]) -> Self {
        Self::parse_payload(Payload::Json(line))
    }

    /// Classifies one message in either serialization.
    pub fn parse_payload(p: Payload<'_>) -> Self {
        if let Payload::Json(line) = p
            && line == &HANDLE_ENVELOPE[..HANDLE_ENVELOPE.len() - 1]
        {
            return Self::Handle {
                msg: Value::String(HANDLE_MESSAGE.to_owned()),
                client: None,
            };
        }
        let Some(value) = p.value() else {
            return Self::Malformed;
        };
        let cmd = value.get("cmd").and_then(Value::as_str);
        match cmd {
            Some("NODE_HANDLE") => Self::Handle {
                msg: value.get("msg").cloned().unwrap_or(Value::Null),
                client: value
                    .get("client")
                    .and_then(Value::as_str)
                    .and_then(|c| c.parse().ok()),
            },
            Some(c) if is_internal_cmd(c) => Self::OtherInternal,
            _ => Self::User(value),
        }
    }
}

/// Encodes a user message as one channel line (`JSON + "\n"`), never blank.
pub fn encode(value: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).expect("a serde_json::Value always serializes");
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(d: &mut LineDecoder) -> Vec<Result<Vec<u8>, ()>> {
        let mut out = Vec::new();
        while let Some(l) = d.next_line() {
            out.push(match l {
                Line::Complete(b) => Ok(b.to_vec()),
                Line::TooLong => Err(()),
            });
        }
        out
    }

    #[test]
    fn splits_several_messages_in_one_read_and_keeps_the_tail() {
        let mut d = LineDecoder::new(64);
        d.extend(b"{\"type\":\"heartbeat\"}\n{\"cmd\":\"st");
        assert_eq!(
            lines(&mut d),
            vec![Ok(b"{\"type\":\"heartbeat\"}".to_vec())]
        );
        d.extend(b"ats\"}\n");
        assert_eq!(lines(&mut d), vec![Ok(b"{\"cmd\":\"stats\"}".to_vec())]);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn byte_at_a_time() {
        let mut d = LineDecoder::new(64);
        let mut got = Vec::new();
        for b in b"ab\ncd\n" {
            d.extend(&[*b]);
            got.extend(lines(&mut d));
        }
        assert_eq!(got, vec![Ok(b"ab".to_vec()), Ok(b"cd".to_vec())]);
    }

    #[test]
    fn over_long_line_is_dropped_once_and_memory_stays_bounded() {
        let mut d = LineDecoder::new(16);
        let mut got = Vec::new();
        for _ in 0..1000 {
            d.extend(&[b'x'; 1000]);
            got.extend(lines(&mut d));
            assert!(d.buffered() <= 16, "buffered {}", d.buffered());
        }
        d.extend(b"yyy\nok\n");
        got.extend(lines(&mut d));
        assert_eq!(got, vec![Err(()), Ok(b"ok".to_vec())]);
    }

    #[test]
    fn over_long_complete_line_is_reported() {
        let mut d = LineDecoder::new(4);
        d.extend(b"123456\nab\n");
        assert_eq!(lines(&mut d), vec![Err(()), Ok(b"ab".to_vec())]);
    }

    #[test]
    fn classifies_worker_messages() {
        use FromWorker::{Handle, HandleAck, HandleNack, Msg};
        use WorkerMsg::*;
        assert_eq!(
            FromWorker::parse(b"{\"cmd\":\"NODE_HANDLE_ACK\"}"),
            HandleAck
        );
        assert_eq!(
            FromWorker::parse(b"{ \"cmd\" : \"NODE_HANDLE_ACK\" }"),
            HandleAck
        );
        assert_eq!(
            FromWorker::parse(b"{\"cmd\":\"NODE_HANDLE_NACK\"}"),
            HandleNack
        );
        assert_eq!(
            FromWorker::parse(b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\"}"),
            Handle
        );
        assert_eq!(
            FromWorker::parse(b"{\"cmd\":\"NODE_SOCKET_COUNT\"}"),
            Msg(OtherInternal)
        );
        assert_eq!(
            FromWorker::parse(
                b"{\"cmd\":\"stats\",\"data\":{\"activeConnections\":2,\"totalRequests\":40}}"
            ),
            Msg(Stats {
                active: Some(2),
                total_requests: Some(40)
            })
        );
        assert_eq!(
            FromWorker::parse(b"{\"cmd\":\"stats\",\"data\":{}}"),
            Msg(Stats {
                active: None,
                total_requests: None
            })
        );
        assert_eq!(FromWorker::parse(b"{\"type\":\"request\"}"), Msg(Request));
        assert_eq!(
            FromWorker::parse(b"{\"type\":\"heartbeat\"}"),
            Msg(Heartbeat)
        );
        assert_eq!(
            FromWorker::parse(b"{\"cmd\":\"heartbeat\"}"),
            Msg(Heartbeat)
        );
        assert_eq!(FromWorker::parse(b"{\"type\":\"ready\"}"), Msg(Ready));
        assert_eq!(FromWorker::parse(b"\"plain string\""), Msg(Other));
        assert_eq!(
            FromWorker::parse(b"{\"cmd\":\"NODE_\"}"),
            Msg(Other),
            "NODE_ alone is not internal"
        );
        assert_eq!(FromWorker::parse(b""), Msg(Malformed));
        assert_eq!(FromWorker::parse(b"{oops}"), Msg(Malformed));
        // A lone surrogate (Node escapes it) is rejected by serde_json: dropped, not fatal.
        assert_eq!(FromWorker::parse(b"{\"s\":\"\\ud800\"}"), Msg(Malformed));
    }

    #[test]
    fn classifies_master_messages() {
        let env = &HANDLE_ENVELOPE[..HANDLE_ENVELOPE.len() - 1];
        assert_eq!(
            FromMaster::parse(env),
            FromMaster::Handle {
                msg: Value::String(HANDLE_MESSAGE.into()),
                client: None,
            }
        );
        let proxied = handle_envelope_for("203.0.113.9:4000".parse().unwrap());
        assert_eq!(
            FromMaster::parse(&proxied[..proxied.len() - 1]),
            FromMaster::Handle {
                msg: Value::String(HANDLE_MESSAGE.into()),
                client: Some("203.0.113.9:4000".parse().unwrap()),
            }
        );
        let with_key =
            br#"{"cmd":"NODE_HANDLE","type":"net.Socket","msg":"m","key":"4:127.0.0.1:0"}"#;
        assert_eq!(
            FromMaster::parse(with_key),
            FromMaster::Handle {
                msg: Value::String("m".into()),
                client: None,
            }
        );
        assert_eq!(
            FromMaster::parse(br#"{"cmd":"NODE_SOCKET_GET_COUNT"}"#),
            FromMaster::OtherInternal
        );
        assert_eq!(
            FromMaster::parse(br#"{"cmd":"reload"}"#),
            FromMaster::User(serde_json::json!({"cmd":"reload"}))
        );
    }

    #[test]
    fn constants_are_single_valid_json_lines() {
        for l in [HANDLE_ENVELOPE, HANDLE_ACK, HANDLE_NACK, SOCKET_COUNT_QUERY] {
            assert_eq!(l.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(*l.last().unwrap(), b'\n');
            serde_json::from_slice::<Value>(&l[..l.len() - 1]).unwrap();
        }
        assert_eq!(
            encode(&serde_json::json!({"type":"ready"})),
            b"{\"type\":\"ready\"}\n"
        );
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// However the bytes are chunked, the decoder returns exactly the lines sent.
            #[test]
            fn any_chunking_yields_the_same_lines(
                lines in proptest::collection::vec(proptest::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..40), 0..20),
                cuts in proptest::collection::vec(1usize..30, 0..40),
            ) {
                let mut stream = Vec::new();
                for l in &lines {
                    stream.extend_from_slice(l);
                    stream.push(b'\n');
                }
                let mut d = LineDecoder::new(64);
                let mut got = Vec::new();
                let mut rest = &stream[..];
                let mut cuts = cuts.into_iter();
                while !rest.is_empty() {
                    let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
                    d.extend(&rest[..n]);
                    rest = &rest[n..];
                    while let Some(l) = d.next_line() {
                        match l {
                            Line::Complete(b) => got.push(b.to_vec()),
                            Line::TooLong => prop_assert!(false, "no line is over the limit"),
                        }
                    }
                }
                prop_assert_eq!(got, lines);
                prop_assert_eq!(d.buffered(), 0);
            }

            /// Arbitrary bytes never panic the decoder or the classifiers, and memory stays bounded.
            #[test]
            fn arbitrary_bytes_are_harmless(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..30)) {
                let mut d = LineDecoder::new(100);
                for c in &chunks {
                    d.extend(c);
                    while let Some(l) = d.next_line() {
                        if let Line::Complete(b) = l {
                            let _ = FromWorker::parse(b);
                            let _ = FromMaster::parse(b);
                        }
                    }
                    // Once drained, at most one incomplete line within the limit stays.
                    prop_assert!(d.buffered() <= 100, "{} bytes buffered", d.buffered());
                }
            }

            /// JSON-shaped input with random structure classifies without panicking.
            #[test]
            fn json_like_lines_classify(cmd in "(NODE_)?[A-Za-z_]{0,20}", ty in "[a-z]{0,10}", n in any::<i64>()) {
                prop_assume!(cmd != "NODE_CLUSTER");
                let line = format!(r#"{{"cmd":"{cmd}","type":"{ty}","data":{{"activeConnections":{n},"totalRequests":{n}}}}}"#);
                let got = FromWorker::parse(line.as_bytes());
                // An independent statement of the rules (node-ipc.md §2, DESIGN §3).
                let count = u64::try_from(n).ok();
                let want = if cmd.len() > 5 && cmd.starts_with("NODE_") {
                    match cmd.as_str() {
                        "NODE_HANDLE_ACK" => FromWorker::HandleAck,
                        "NODE_HANDLE_NACK" => FromWorker::HandleNack,
                        "NODE_HANDLE" => FromWorker::Handle,
                        _ => FromWorker::Msg(WorkerMsg::OtherInternal),
                    }
                } else {
                    FromWorker::Msg(if cmd == "stats" {
                        WorkerMsg::Stats { active: count, total_requests: count }
                    } else if cmd == "heartbeat" || ty == "heartbeat" {
                        WorkerMsg::Heartbeat
                    } else if ty == "request" {
                        WorkerMsg::Request
                    } else if ty == "ready" || cmd == "ready" {
                        WorkerMsg::Ready
                    } else {
                        WorkerMsg::Other
                    })
                };
                prop_assert_eq!(got, want);
            }
        }
    }
}
