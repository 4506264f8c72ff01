//! Node's cluster protocol (`{"cmd":"NODE_CLUSTER",…}`), the primary's side: what a cluster
//! worker tells lb and the lines lb answers with. Byte-level reference: `shared/node-cluster.md`.
//!
//! Every message lb sends carries a `seq` (a per-worker counter the caller supplies); a reply
//! carries `ack` = the request's `seq`. Handles ride in `NODE_HANDLE` envelopes of type
//! `net.Native` (never `net.Socket`: with that type the worker ACKs and never serves, §5).

use serde_json::{Map, Value, json};

/// A cluster message from a worker.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterMsg {
    /// `online`: the worker's cluster setup ran (its first message).
    Online,
    /// `queryServer`: the worker called `listen()`; it waits for the reply.
    QueryServer(ServerQuery),
    /// `listening`: a server of the worker is listening (its key).
    Listening {
        /// The server's key.
        key: String,
    },
    /// `close`: the worker closed the server with this key.
    Close {
        /// The server's key.
        key: String,
    },
    /// `exitedAfterDisconnect`: the worker is leaving; it waits for the ack.
    ExitedAfterDisconnect {
        /// The request's seq.
        seq: u64,
    },
    /// The worker's answer to a `newconn`.
    NewconnReply {
        /// The `newconn`'s seq.
        ack: u64,
        /// Whether it took the connection.
        accepted: bool,
    },
    /// Well-formed, but nothing lb acts on (an unknown `act`).
    Other,
    /// A `NODE_CLUSTER` message missing what its `act` needs.
    Malformed(&'static str),
}

/// What a `queryServer` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerQuery {
    /// The request's seq (the reply's `ack`).
    pub seq: u64,
    /// Requested address (`None`: `listen(port)` without a host).
    pub address: Option<String>,
    /// Requested port (0 = ephemeral, -1 = a pipe).
    pub port: i64,
    /// `4`, `6`, `-1` (pipe), `"udp4"`, `"udp6"`.
    pub address_type: Value,
    /// `data` to echo (TLS ticket keys).
    pub data: Value,
    /// The server's key, in Node's format `address:port:addressType:fd:index`.
    pub key: String,
}

impl ServerQuery {
    /// A TCP server (not a pipe, not UDP).
    pub fn is_tcp(&self) -> bool {
        matches!(self.address_type.as_i64(), Some(4 | 6)) && self.port >= 0
    }
}

/// Node's key for a server: `` `${address}:${port}:${addressType}:${fd}:${index}` ``.
fn node_key(m: &Map<String, Value>) -> String {
    let part = |k: &str| match m.get(k) {
        None => "undefined".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    format!(
        "{}:{}:{}:{}:{}",
        part("address"),
        part("port"),
        part("addressType"),
        part("fd"),
        part("index")
    )
}

impl ClusterMsg {
    /// Classifies a `NODE_CLUSTER` object.
    pub fn from_map(m: &Map<String, Value>) -> Self {
        let seq = m.get("seq").and_then(Value::as_u64);
        let act = m.get("act").and_then(Value::as_str);
        match act {
            Some("online") => Self::Online,
            Some("queryServer") => {
                let (Some(seq), Some(port)) = (seq, m.get("port").and_then(Value::as_i64)) else {
                    return Self::Malformed("queryServer without seq or port");
                };
                Self::QueryServer(ServerQuery {
                    seq,
                    address: m.get("address").and_then(Value::as_str).map(str::to_owned),
                    port,
                    address_type: m.get("addressType").cloned().unwrap_or(Value::Null),
                    data: m.get("data").cloned().unwrap_or(Value::Null),
                    key: node_key(m),
                })
            }
            Some("listening") => Self::Listening { key: node_key(m) },
            Some("close") => match m.get("key").and_then(Value::as_str) {
                Some(k) => Self::Close { key: k.to_owned() },
                None => Self::Malformed("close without key"),
            },
            Some("exitedAfterDisconnect") => match seq {
                Some(seq) => Self::ExitedAfterDisconnect { seq },
                None => Self::Malformed("exitedAfterDisconnect without seq"),
            },
            Some(_) => Self::Other,
            None => match (m.get("ack").and_then(Value::as_u64), m.get("accepted")) {
                (Some(ack), Some(Value::Bool(accepted))) => Self::NewconnReply {
                    ack,
                    accepted: *accepted,
                },
                (Some(_), _) => Self::Other,
                (None, _) => Self::Malformed("neither act nor ack"),
            },
        }
    }
}

fn line(mut v: Value, seq: u64) -> Vec<u8> {
    if let Some(m) = v.as_object_mut() {
        m.insert("seq".into(), seq.into());
    }
    let mut out = serde_json::to_vec(&v).expect("a json! value serializes");
    out.push(b'\n');
    out
}

/// The round-robin reply to a `queryServer` for lb's own listener: the worker's server is
/// attached to it, and connections come as `newconn` with `key`.
pub fn rr_reply(q: &ServerQuery, listener: std::net::SocketAddr, seq: u64) -> Vec<u8> {
    let family = if listener.is_ipv4() { "IPv4" } else { "IPv6" };
    line(
        json!({"cmd": "NODE_CLUSTER", "errno": null, "key": q.key, "ack": q.seq, "data": q.data,
               "sockname": {"address": listener.ip().to_string(), "family": family, "port": listener.port()}}),
        seq,
    )
}

/// The reply that fails a `queryServer` with a (negative, libuv) errno.
pub fn error_reply(q: &ServerQuery, errno: i32, seq: u64) -> Vec<u8> {
    line(
        json!({"cmd": "NODE_CLUSTER", "errno": -errno.abs(), "key": q.key, "ack": q.seq, "data": null}),
        seq,
    )
}

/// The envelope of a shared listening socket (SCHED_NONE style): sent with the listener's fd.
pub fn shared_handle_envelope(q: &ServerQuery, seq: u64) -> Vec<u8> {
    let msg = json!({"cmd": "NODE_CLUSTER", "errno": 0, "key": q.key, "ack": q.seq, "data": q.data, "seq": seq});
    let mut out =
        serde_json::to_vec(&json!({"cmd": "NODE_HANDLE", "type": "net.Native", "msg": msg}))
            .expect("serializes");
    out.push(b'\n');
    out
}

/// The envelope of one accepted connection for the worker's server `key`.
pub fn newconn_envelope(key: &str, seq: u64) -> Vec<u8> {
    let msg = json!({"cmd": "NODE_CLUSTER", "act": "newconn", "key": key, "seq": seq});
    let mut out =
        serde_json::to_vec(&json!({"cmd": "NODE_HANDLE", "type": "net.Native", "msg": msg}))
            .expect("serializes");
    out.push(b'\n');
    out
}

/// Asks a cluster worker to close its servers and leave (graceful stop).
pub fn disconnect(seq: u64) -> Vec<u8> {
    line(json!({"cmd": "NODE_CLUSTER", "act": "disconnect"}), seq)
}

/// Acknowledges a worker's `exitedAfterDisconnect` (without it the worker never leaves).
pub fn ack(of: u64, seq: u64) -> Vec<u8> {
    line(json!({"cmd": "NODE_CLUSTER", "ack": of}), seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ClusterMsg {
        ClusterMsg::from_map(
            serde_json::from_str::<Value>(s)
                .unwrap()
                .as_object()
                .unwrap(),
        )
    }

    #[test]
    fn parses_what_node_workers_send() {
        assert_eq!(
            parse(r#"{"cmd":"NODE_CLUSTER","act":"online","seq":0}"#),
            ClusterMsg::Online
        );
        let ClusterMsg::QueryServer(q) = parse(
            r#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":"127.0.0.1","port":8000,"addressType":4,"flags":0,"backlog":false,"seq":1}"#,
        ) else {
            panic!()
        };
        assert_eq!(q.key, "127.0.0.1:8000:4:undefined:0");
        assert_eq!((q.seq, q.port, q.is_tcp()), (1, 8000, true));
        let ClusterMsg::QueryServer(q) = parse(
            r#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":8000,"addressType":4,"backlog":0,"seq":1}"#,
        ) else {
            panic!()
        };
        assert_eq!(q.key, "null:8000:4:undefined:0");
        assert_eq!(q.address, None);
        assert_eq!(
            parse(
                r#"{"cmd":"NODE_CLUSTER","act":"listening","index":0,"data":null,"address":"127.0.0.1","port":8000,"addressType":4,"flags":0,"backlog":false,"seq":2}"#
            ),
            ClusterMsg::Listening {
                key: "127.0.0.1:8000:4:undefined:0".into()
            }
        );
        assert_eq!(
            parse(r#"{"cmd":"NODE_CLUSTER","ack":2,"accepted":true,"seq":3}"#),
            ClusterMsg::NewconnReply {
                ack: 2,
                accepted: true
            }
        );
        assert_eq!(
            parse(r#"{"cmd":"NODE_CLUSTER","act":"exitedAfterDisconnect","seq":4}"#),
            ClusterMsg::ExitedAfterDisconnect { seq: 4 }
        );
        assert_eq!(
            parse(r#"{"cmd":"NODE_CLUSTER","act":"close","key":"k","seq":3}"#),
            ClusterMsg::Close { key: "k".into() }
        );
        assert!(matches!(
            parse(r#"{"cmd":"NODE_CLUSTER","act":"queryServer"}"#),
            ClusterMsg::Malformed(_)
        ));
        assert!(matches!(
            parse(r#"{"cmd":"NODE_CLUSTER"}"#),
            ClusterMsg::Malformed(_)
        ));
        assert_eq!(
            parse(r#"{"cmd":"NODE_CLUSTER","act":"whatever","seq":9}"#),
            ClusterMsg::Other
        );
    }

    #[test]
    fn lines_are_single_valid_json_with_seq_and_ack() {
        let ClusterMsg::QueryServer(q) = parse(
            r#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":8000,"addressType":4,"backlog":0,"seq":1}"#,
        ) else {
            panic!()
        };
        let r = rr_reply(&q, "127.0.0.1:8000".parse().unwrap(), 7);
        let v: Value = serde_json::from_slice(&r[..r.len() - 1]).unwrap();
        assert_eq!(v["ack"], 1);
        assert_eq!(v["seq"], 7);
        assert_eq!(v["key"], "null:8000:4:undefined:0");
        assert_eq!(v["sockname"]["port"], 8000);
        assert_eq!(v["errno"], Value::Null);
        let e = error_reply(&q, 98, 8);
        let v: Value = serde_json::from_slice(&e[..e.len() - 1]).unwrap();
        assert_eq!(v["errno"], -98);
        let n = newconn_envelope("k\"q", 9);
        let v: Value = serde_json::from_slice(&n[..n.len() - 1]).unwrap();
        assert_eq!(v["type"], "net.Native");
        assert_eq!(v["msg"]["act"], "newconn");
        assert_eq!(v["msg"]["key"], "k\"q");
        for l in [
            r,
            e,
            n,
            disconnect(1),
            ack(4, 2),
            shared_handle_envelope(&q, 3),
        ] {
            assert_eq!(l.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(*l.last().unwrap(), b'\n');
        }
    }
}
