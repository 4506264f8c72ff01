//! Looking at a connection's first bytes without reading them (`MSG_PEEK`): the request line of
//! an HTTP request, for the socket.io session id it may carry (`--handoff socket.io`, DESIGN §12).
//!
//! lb never consumes a byte: the worker's stream still starts with the client's first byte. What
//! it looks at is bounded ([`MAX_LINE`] bytes, `--peek-timeout`); anything that is not an HTTP
//! request line — TLS, another protocol, nothing at all — is routed by the policy, never refused.
//! After a peek that found too little, readiness is cleared and lb waits for the next arrival
//! (the bytes stay in the socket, so it would look readable for ever, PITFALLS §17).

use std::io;
use std::net::TcpStream;
use std::time::Duration;

use tokio::io::Interest;

use crate::metrics::PeekResult;

/// The most of a request line lb looks at.
pub const MAX_LINE: usize = 4096;

/// The longest HTTP method lb takes for one (`OPTIONS`, `CONNECT`, WebDAV's `PROPPATCH`…).
const MAX_METHOD: usize = 16;

/// The length of an engine.io session id (`@socket.io/sticky`'s `sid=([\w\-]{20})`).
pub const SID_LEN: usize = 20;

/// What the first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A whole request line, with the session id it carries, if any.
    Request(Option<Box<str>>),
    /// Not all there yet.
    Incomplete,
    /// Not an HTTP request line: route by the policy.
    NotHttp,
    /// No line end within [`MAX_LINE`].
    TooLong,
}

/// Parses the start of a connection (`buf` is what a peek returned).
pub fn request_line(buf: &[u8]) -> Line {
    let method = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match buf.get(method) {
        None if method < MAX_METHOD => return Line::Incomplete,
        Some(b' ') if (1..=MAX_METHOD).contains(&method) => {}
        _ => return Line::NotHttp,
    }
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_LINE {
            Line::TooLong
        } else {
            Line::Incomplete
        };
    };
    let line = &buf[method + 1..end];
    let target = line.split(|&b| b == b' ').next().unwrap_or_default();
    Line::Request(sid(target))
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

/// What a look at the connection found, and the sid if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A request line (with its sid, if any).
    Line(Option<Box<str>>),
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

/// Classifies `n` peeked bytes from `skip` on (a PROXY header left in the stream).
fn classify(buf: &[u8], skip: usize) -> Option<Found> {
    match request_line(buf.get(skip..).unwrap_or_default()) {
        Line::Request(sid) => Some(Found::Line(sid)),
        Line::NotHttp => Some(Found::Nothing(PeekResult::NotHttp)),
        Line::TooLong => Some(Found::Nothing(PeekResult::TooLong)),
        Line::Incomplete => None,
    }
}

/// Looks without waiting: `None` if the request line is not all there yet.
pub fn look_now(stream: &TcpStream, skip: usize) -> Option<Found> {
    let mut buf = [0u8; MAX_LINE + 256];
    let cap = (skip + MAX_LINE).min(buf.len());
    match peek(stream, &mut buf[..cap]) {
        Ok(0) => Some(Found::Nothing(PeekResult::Closed)),
        Ok(n) => classify(&buf[..n], skip),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(_) => Some(Found::Nothing(PeekResult::Closed)),
    }
}

/// Waits (at most `timeout`, or until `stop` resolves) for the request line; gives the stream
/// back whatever it found.
pub async fn wait(
    stream: TcpStream,
    skip: usize,
    timeout: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> (TcpStream, Found) {
    let io = match crate::sys::register_owned(stream, Interest::READABLE) {
        Ok(io) => io,
        Err((stream, _)) => return (stream, Found::Nothing(PeekResult::Closed)),
    };
    let look = async {
        let mut buf = vec![0u8; skip + MAX_LINE];
        loop {
            let Ok(mut guard) = io.readable().await else {
                return Found::Nothing(PeekResult::Closed);
            };
            let closed = guard.ready().is_read_closed();
            match peek(io.get_ref(), &mut buf) {
                Ok(0) => return Found::Nothing(PeekResult::Closed),
                Ok(n) => match classify(&buf[..n], skip) {
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

    #[test]
    fn a_request_line_gives_its_sid() {
        let req =
            format!("GET /socket.io/?EIO=4&transport=polling&sid={SID} HTTP/1.1\r\nhost: x\r\n");
        assert_eq!(
            request_line(req.as_bytes()),
            Line::Request(Some(SID.into()))
        );
        let ws = format!("GET /socket.io/?EIO=4&transport=websocket&sid={SID} HTTP/1.1\r\n");
        assert_eq!(request_line(ws.as_bytes()), Line::Request(Some(SID.into())));
        assert_eq!(
            request_line(b"GET /socket.io/?EIO=4&transport=polling&t=abc HTTP/1.1\r\n"),
            Line::Request(None)
        );
        // A sid in a header is not the request's (only the request line is looked at).
        assert_eq!(
            request_line(format!("GET / HTTP/1.1\r\nx: sid={SID}\r\n").as_bytes()),
            Line::Request(None)
        );
        // Too short a sid is none.
        assert_eq!(
            request_line(b"GET /?sid=abc HTTP/1.1\r\n"),
            Line::Request(None)
        );
        assert_eq!(
            request_line(format!("POST /x?a=1&sid={SID}&b=2 HTTP/1.1\n").as_bytes()),
            Line::Request(Some(SID.into()))
        );
    }

    #[test]
    fn partial_foreign_and_overlong_first_bytes_are_told_apart() {
        for cut in ["", "G", "GET", "GET ", "GET /socket.io/?sid=AbC"] {
            assert_eq!(request_line(cut.as_bytes()), Line::Incomplete, "{cut:?}");
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
            assert_eq!(request_line(foreign), Line::NotHttp, "{foreign:?}");
        }
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_LINE));
        assert_eq!(request_line(&long.as_bytes()[..MAX_LINE]), Line::TooLong);
    }
}
