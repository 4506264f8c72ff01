//! Looking at a connection's first bytes without reading them (`MSG_PEEK`): the request line of
//! an HTTP request, for the socket.io session id it may carry (`--handoff socket.io`, DESIGN §12),
//! and the request head, for the key `sticky` hashes (`--hash-key`, [`crate::hashkey`], §13).
//!
//! lb never consumes a byte: the worker's stream still starts with the client's first byte. What
//! it looks at is bounded ([`MAX_LINE`] bytes for a line, [`MAX_HEAD`] for a head,
//! `--peek-timeout`); anything that is not an HTTP
//! request line — TLS, another protocol, nothing at all — is routed by the policy, never refused.
//! After a peek that found too little, readiness is cleared and lb waits for the next arrival
//! (the bytes stay in the socket, so it would look readable for ever, PITFALLS §17).

use std::io;
use std::net::TcpStream;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;

use crate::hashkey::HashKeys;
use crate::metrics::PeekResult;

/// The most of a request line lb looks at for a session id.
pub const MAX_LINE: usize = 4096;

/// The most of a request head lb looks at for a key in its headers (`--hash-key`).
pub const MAX_HEAD: usize = 8192;

/// The longest HTTP method lb takes for one (`OPTIONS`, `CONNECT`, WebDAV's `PROPPATCH`…).
const MAX_METHOD: usize = 16;

/// The length of an engine.io session id (`@socket.io/sticky`'s `sid=([\w\-]{20})`).
pub const SID_LEN: usize = 20;

/// What lb looks for in a connection's request head.
#[derive(Debug, Clone, Default)]
pub struct Want {
    /// The `sid=` of the request line (`--handoff socket.io`).
    pub sid: bool,
    /// The `--hash-key` keys.
    pub keys: Option<Arc<HashKeys>>,
    /// The connection comes from a `--proxy-trusted` source: its `X-Forwarded-For` counts.
    pub xff_trusted: bool,
}

impl Want {
    /// Whether the headers are needed, not only the request line.
    fn whole_head(&self) -> bool {
        self.keys.as_ref().is_some_and(|k| k.needs_headers())
    }

    /// The most lb looks at.
    pub fn limit(&self) -> usize {
        if self.whole_head() {
            MAX_HEAD
        } else {
            MAX_LINE
        }
    }
}

/// What a request head gave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// The session id its request line names, if lb looked for one.
    pub sid: Option<Box<str>>,
    /// The hash of the first `--hash-key` key present, if any.
    pub key: Option<u32>,
    /// What lb looked for: a sid, a key.
    pub looked: (bool, bool),
}

/// What the first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A whole request line: where its target is, and where the line ends (after its `\n`).
    Request {
        /// The request target's bytes.
        target: Range<usize>,
        /// The offset just past the line.
        end: usize,
    },
    /// Not all there yet.
    Incomplete,
    /// Not an HTTP request line: route by the policy.
    NotHttp,
    /// No line end within `limit`.
    TooLong,
}

/// Parses the start of a connection (`buf` is what a peek returned), looking for the line's end
/// within `limit` bytes.
pub fn request_line(buf: &[u8], limit: usize) -> Line {
    let method = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match buf.get(method) {
        None if method < MAX_METHOD => return Line::Incomplete,
        Some(b' ') if (1..=MAX_METHOD).contains(&method) => {}
        _ => return Line::NotHttp,
    }
    let Some(nl) = buf.iter().take(limit).position(|&b| b == b'\n') else {
        return if buf.len() >= limit {
            Line::TooLong
        } else {
            Line::Incomplete
        };
    };
    let start = method + 1;
    let len = buf[start..nl]
        .iter()
        .position(|&b| b == b' ')
        .unwrap_or(nl - start);
    Line::Request {
        target: start..start + len,
        end: nl + 1,
    }
}

/// The header lines after a request line (`rest`), through the empty line that ends them:
/// `None` if that line is not there yet.
fn headers(rest: &[u8]) -> Option<&[u8]> {
    let mut at = 0;
    while at < rest.len() {
        let nl = at + rest[at..].iter().position(|&b| b == b'\n')?;
        let line = &rest[at..nl];
        if line.is_empty() || line == b"\r" {
            return Some(&rest[..at]);
        }
        at = nl + 1;
    }
    None
}

/// The `sid=` of a request target, as `@socket.io/sticky` finds it: `sid=` then 20 of
/// `[A-Za-z0-9_-]`.
pub fn sid(target: &[u8]) -> Option<Box<str>> {
    let id = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-';
    target.windows(4).enumerate().find_map(|(i, w)| {
        let rest = target.get(i + 4..i + 4 + SID_LEN)?;
        (w == b"sid=" && rest.iter().all(id))
            .then(|| std::str::from_utf8(rest).ok().map(Box::from))
            .flatten()
    })
}

/// What a look at the connection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A request head (what it gave).
    Head(Seen),
    /// Nothing to route on, and why.
    Nothing(PeekResult),
}

fn peek(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.peek(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// Classifies peeked bytes from `skip` on (a PROXY header left in the stream): `None` if what
/// lb wants is not all there yet.
pub fn classify(buf: &[u8], skip: usize, want: &Want) -> Option<Found> {
    let b = buf.get(skip..).unwrap_or_default();
    let limit = want.limit();
    let (target, end) = match request_line(b, limit) {
        Line::Request { target, end } => (target, end),
        Line::NotHttp => return Some(Found::Nothing(PeekResult::NotHttp)),
        Line::TooLong => return Some(Found::Nothing(PeekResult::TooLong)),
        Line::Incomplete => return None,
    };
    let head = if want.whole_head() {
        match headers(&b[end..b.len().min(limit)]) {
            Some(h) => h,
            None if b.len() >= limit => return Some(Found::Nothing(PeekResult::TooLong)),
            None => return None,
        }
    } else {
        &[]
    };
    let target = &b[target];
    Some(Found::Head(Seen {
        sid: if want.sid { sid(target) } else { None },
        key: want
            .keys
            .as_ref()
            .and_then(|k| k.find(target, head, want.xff_trusted)),
        looked: (want.sid, want.keys.is_some()),
    }))
}

/// Looks without waiting: `None` if what lb wants is not all there yet.
pub fn look_now(stream: &TcpStream, skip: usize, want: &Want) -> Option<Found> {
    let mut buf = [0u8; MAX_HEAD + 256];
    let cap = (skip + want.limit()).min(buf.len());
    match peek(stream, &mut buf[..cap]) {
        Ok(0) => Some(Found::Nothing(PeekResult::Closed)),
        Ok(n) => classify(&buf[..n], skip, want),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(_) => Some(Found::Nothing(PeekResult::Closed)),
    }
}

/// Waits (at most `timeout`, or until `stop` resolves) for the request line; gives the stream
/// back whatever it found.
pub async fn wait(
    stream: TcpStream,
    skip: usize,
    want: &Want,
    timeout: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> (TcpStream, Found) {
    let io = match crate::sys::register_owned(stream, Interest::READABLE) {
        Ok(io) => io,
        Err((stream, _)) => return (stream, Found::Nothing(PeekResult::Closed)),
    };
    let look = async {
        let mut buf = vec![0u8; skip + want.limit()];
        loop {
            let Ok(mut guard) = io.readable().await else {
                return Found::Nothing(PeekResult::Closed);
            };
            let closed = guard.ready().is_read_closed();
            match peek(io.get_ref(), &mut buf) {
                Ok(0) => return Found::Nothing(PeekResult::Closed),
                Ok(n) => match classify(&buf[..n], skip, want) {
                    Some(found) => return found,
                    None if closed => return Found::Nothing(PeekResult::Closed),
                    // The bytes stay: wait for the next arrival, not for readiness that stays set.
                    None => guard.clear_ready(),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(_) => return Found::Nothing(PeekResult::Closed),
            }
        }
    };
    let found = tokio::select! {
        r = tokio::time::timeout(timeout, look) => r.unwrap_or(Found::Nothing(PeekResult::Timeout)),
        () = stop => Found::Nothing(PeekResult::Evicted),
    };
    (io.into_inner(), found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SID: &str = "AbCdEfGhIjKlMnOp_-12";

    fn sid_only() -> Want {
        Want {
            sid: true,
            ..Want::default()
        }
    }

    fn keys(k: &str) -> Want {
        Want {
            keys: Some(Arc::new(HashKeys::parse(k).unwrap())),
            ..Want::default()
        }
    }

    /// What a head gave (a sid, a key), or how it ended.
    type Got = Result<(Option<Box<str>>, Option<u32>), Option<PeekResult>>;

    fn seen(sid: Option<&str>, key: Option<u32>) -> Got {
        Ok((sid.map(Into::into), key))
    }

    fn look(buf: &[u8], skip: usize, want: &Want) -> Got {
        match classify(buf, skip, want) {
            Some(Found::Head(s)) => Ok((s.sid, s.key)),
            Some(Found::Nothing(why)) => Err(Some(why)),
            None => Err(None),
        }
    }

    #[test]
    fn a_request_line_gives_its_sid() {
        let w = sid_only();
        let req =
            format!("GET /socket.io/?EIO=4&transport=polling&sid={SID} HTTP/1.1\r\nhost: x\r\n");
        assert_eq!(look(req.as_bytes(), 0, &w), seen(Some(SID), None));
        let ws = format!("GET /socket.io/?EIO=4&transport=websocket&sid={SID} HTTP/1.1\r\n");
        assert_eq!(look(ws.as_bytes(), 0, &w), seen(Some(SID), None));
        let none = b"GET /socket.io/?EIO=4&transport=polling&t=abc HTTP/1.1\r\n";
        assert_eq!(look(none, 0, &w), seen(None, None));
        // A sid in a header is not the request's (only the request line is looked at).
        let hdr = format!("GET / HTTP/1.1\r\nx: sid={SID}\r\n");
        assert_eq!(look(hdr.as_bytes(), 0, &w), seen(None, None));
        // Too short a sid is none.
        assert_eq!(look(b"GET /?sid=abc HTTP/1.1\r\n", 0, &w), seen(None, None));
        let post = format!("POST /x?a=1&sid={SID}&b=2 HTTP/1.1\n");
        assert_eq!(look(post.as_bytes(), 0, &w), seen(Some(SID), None));
        // After a PROXY header `keep` left in the stream.
        let kept = format!("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET /?sid={SID} HTTP/1.1\r\n");
        assert_eq!(look(kept.as_bytes(), 32, &w), seen(Some(SID), None));
    }

    #[test]
    fn partial_foreign_and_overlong_first_bytes_are_told_apart() {
        for cut in ["", "G", "GET", "GET ", "GET /socket.io/?sid=AbC"] {
            assert_eq!(
                request_line(cut.as_bytes(), MAX_LINE),
                Line::Incomplete,
                "{cut:?}"
            );
        }
        // A TLS ClientHello, SSH, a lower-case or overlong "method", a control byte.
        for foreign in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"get / HTTP/1.1\r\n",
            b"ABCDEFGHIJKLMNOPQ / HTTP/1.1\r\n",
            b" GET / HTTP/1.1\r\n",
            b"\0\0\0",
        ] {
            assert_eq!(
                request_line(foreign, MAX_LINE),
                Line::NotHttp,
                "{foreign:?}"
            );
        }
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_LINE));
        assert_eq!(request_line(long.as_bytes(), MAX_LINE), Line::TooLong);
    }

    #[test]
    fn keys_in_headers_wait_for_the_whole_head_within_its_bound() {
        let w = keys("cookie:sid");
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: sid=abc\r\n";
        assert_eq!(look(head, 0, &w), Err(None), "the head has not ended");
        let whole = [&head[..], b"\r\n"].concat();
        let abc = Some(crate::hashkey::text_key(b"abc"));
        assert_eq!(look(&whole, 0, &w), seen(None, abc));
        // No headers at all; a bare-LF head.
        assert_eq!(look(b"GET / HTTP/1.1\r\n\r\n", 0, &w), seen(None, None));
        assert_eq!(
            look(b"GET / HTTP/1.0\nCookie: sid=abc\n\n", 0, &w),
            seen(None, abc)
        );
        // A head over the bound: too long, even with the cookie in its first bytes.
        let mut big = b"GET / HTTP/1.1\r\nCookie: sid=abc\r\n".to_vec();
        while big.len() < MAX_HEAD {
            big.extend(b"X-Pad: 0123456789012345678901234567890123456789\r\n");
        }
        assert_eq!(look(&big, 0, &w), Err(Some(PeekResult::TooLong)));
        // A query key needs only the line.
        let q = keys("query:room");
        assert_eq!(
            look(b"GET /?room=7 HTTP/1.1\r\nHost:", 0, &q),
            seen(None, Some(crate::hashkey::text_key(b"7")))
        );
    }
}
