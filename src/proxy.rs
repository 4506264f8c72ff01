//! PROXY protocol input (v1 and v2, detected per connection): the master learns the client's
//! address from the header a balancer in front sends, hashes on it, and (`strip`) consumes the
//! header so the worker's stream starts with the client's first byte.
//!
//! The master only ever peeks until the header is complete. Most headers are already there when
//! the connection is accepted ([`parse_now`], no waiting); the others wait in a task of their own
//! ([`await_header`]) with a deadline, so a slow or silent client never blocks the accept loop.
//! Parsing is the `ppp` crate's, on a borrowed buffer.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::Interest;

/// The largest header lb accepts (v2 allows 64 KiB of TLVs; balancers send a few hundred bytes).
pub const MAX_HEADER: usize = 4096;

/// Connections whose header lb waits for at once; more are closed (`overflow`).
pub const MAX_PENDING: usize = 4096;

/// `--proxy-protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No header expected.
    Off,
    /// The master consumes the header: the worker's stream starts with the client's bytes.
    Strip,
    /// The master only peeks: the header stays for a worker that parses it.
    Keep,
}

/// One `--proxy-trusted` network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR/PREFIX` or a bare address (a host).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an address or CIDR (e.g. 10.0.0.0/8, ::1)"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0..={max}"))?,
        };
        Ok(Self { net, prefix })
    }

    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// Parses `--proxy-trusted`: `CIDR[,CIDR…]`, or `any` (every source, the default).
pub fn parse_trusted(s: &str) -> Result<Option<Vec<Cidr>>, String> {
    if s.trim() == "any" {
        return Ok(None);
    }
    s.split(',')
        .map(Cidr::parse)
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Whether a connection from `ip` must start with a header (`None` trusts every source).
pub fn trusted(list: &Option<Vec<Cidr>>, ip: IpAddr) -> bool {
    list.as_ref()
        .is_none_or(|l| l.iter().any(|c| c.contains(ip)))
}

pub use crate::metrics::ProxyFailure as Failure;

/// How a refused header is described in lb's log.
pub fn describe(f: Failure) -> &'static str {
    match f {
        Failure::Missing => "missing (the connection did not start with one)",
        Failure::Malformed => "malformed",
        Failure::Timeout => "not complete within --proxy-timeout",
        Failure::Closed => "cut short (the client closed the connection)",
        Failure::Overflow => "one too many to wait for",
    }
}

/// A complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Its length in bytes.
    pub len: usize,
    /// The client's address; `None` for v2 `LOCAL`, `UNKNOWN` and non-TCP families (the
    /// connection's own address is used).
    pub client: Option<SocketAddr>,
}

/// What the bytes so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header.
    Complete(Header),
    /// A header may still follow.
    Incomplete,
    /// No header, or a broken one.
    Invalid(Failure),
}

/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The longest v1 header, its CRLF included (the specification's 107 bytes).
const V1_MAX: usize = 107;

/// Whether `buf` is the start of a header that has not all arrived. Decided here, from the
/// lengths the specification gives, and not by the parser: `ppp` calls some prefixes of a valid
/// v1 header malformed (one cut after the source port's space, for one), which closed connections
/// whose header came in two segments.
fn incomplete(buf: &[u8]) -> bool {
    if buf.len() < 6 && b"PROXY ".starts_with(buf) {
        return true;
    }
    if buf.starts_with(b"PROXY ") {
        return buf.len() < V1_MAX && !buf.contains(&b'\n');
    }
    if buf.len() < V2_SIGNATURE.len() {
        return V2_SIGNATURE.starts_with(buf);
    }
    if buf.starts_with(V2_SIGNATURE) {
        if buf.len() < 16 {
            return true;
        }
        let need = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        return buf.len() < need && need <= MAX_HEADER;
    }
    false
}

/// Parses the start of a connection.
pub fn parse(buf: &[u8]) -> Parsed {
    if incomplete(buf) {
        return Parsed::Incomplete;
    }
    if buf.starts_with(b"PROXY ") && !buf[..buf.len().min(V1_MAX)].contains(&b'\n') {
        return Parsed::Invalid(Failure::Malformed);
    }
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        // A v2 header longer than lb reads can never complete.
        if buf.len() >= MAX_HEADER {
            return Parsed::Invalid(Failure::Malformed);
        }
        return Parsed::Incomplete;
    }
    match result {
        HeaderResult::V2(Ok(h)) => Parsed::Complete(Header {
            len: h.len(),
            client: match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => Some((a.source_address, a.source_port).into()),
                (_, v2::Addresses::IPv6(a)) => Some((a.source_address, a.source_port).into()),
                _ => None,
            },
        }),
        HeaderResult::V1(Ok(h)) => Parsed::Complete(Header {
            len: h.header.len(),
            client: match h.addresses {
                v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
                v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
                v1::Addresses::Unknown => None,
            },
        }),
        // Neither signature: a direct client (or a misconfigured balancer).
        HeaderResult::V1(Err(v1::BinaryParseError::Parse(v1::ParseError::InvalidPrefix)))
            if !buf.starts_with(b"\r\n\r\n\0\r\nQUIT\n") =>
        {
            Parsed::Invalid(Failure::Missing)
        }
        _ => Parsed::Invalid(Failure::Malformed),
    }
}

/// Peeks without waiting (accepted sockets are non-blocking).
fn peek(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.peek(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// Reads (consumes) the `len` header bytes already peeked.
fn consume(stream: &TcpStream, len: usize) -> Result<(), Failure> {
    use std::io::Read;
    let mut buf = [0u8; MAX_HEADER];
    let mut done = 0;
    let mut s = stream;
    while done < len {
        match s.read(&mut buf[..len - done]) {
            Ok(0) => return Err(Failure::Closed),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Peeked bytes are in the receive queue: a read cannot block or come up short.
            Err(_) => return Err(Failure::Closed),
        }
    }
    Ok(())
}

/// What to do with a connection right after accept, without waiting.
pub enum Now {
    /// The header was complete (and consumed, with `strip`).
    Done(Header),
    /// Not all there yet: wait for it ([`await_header`]).
    Wait,
    /// Refused.
    Failed(Failure),
}

/// Looks at a freshly accepted connection: most headers have arrived by then.
pub fn parse_now(stream: &TcpStream, mode: Mode) -> Now {
    let mut buf = [0u8; MAX_HEADER];
    match peek(stream, &mut buf) {
        Ok(0) => Now::Failed(Failure::Closed),
        Ok(n) => match parse(&buf[..n]) {
            Parsed::Complete(h) => finish(stream, h, mode).map_or_else(Now::Failed, Now::Done),
            Parsed::Incomplete => Now::Wait,
            Parsed::Invalid(f) => Now::Failed(f),
        },
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Now::Wait,
        Err(_) => Now::Failed(Failure::Closed),
    }
}

fn finish(stream: &TcpStream, h: Header, mode: Mode) -> Result<Header, Failure> {
    if mode == Mode::Strip {
        consume(stream, h.len)?;
    }
    Ok(h)
}

/// Waits (at most `timeout`) for the rest of a header, then consumes it with `strip`.
pub async fn await_header(
    stream: TcpStream,
    mode: Mode,
    timeout: Duration,
) -> Result<(TcpStream, Header), Failure> {
    let io = crate::sys::register(stream, Interest::READABLE).map_err(|_| Failure::Closed)?;
    let wait = async {
        let mut buf = vec![0u8; MAX_HEADER];
        loop {
            let mut guard = io.readable().await.map_err(|_| Failure::Closed)?;
            let closed = guard.ready().is_read_closed();
            match peek(io.get_ref(), &mut buf) {
                Ok(0) => return Err(Failure::Closed),
                Ok(n) => match parse(&buf[..n]) {
                    Parsed::Complete(h) => return Ok(h),
                    Parsed::Invalid(f) => return Err(f),
                    // Part of a header and the client has finished sending: truncated.
                    Parsed::Incomplete if closed => return Err(Failure::Closed),
                    // A peek leaves the bytes in place, so the socket stays readable: wait
                    // for the next arrival instead (tokio keeps readiness that came meanwhile).
                    Parsed::Incomplete => guard.clear_ready(),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(_) => return Err(Failure::Closed),
            }
        }
    };
    let header = tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| Failure::Timeout)??;
    let stream = io.into_inner();
    finish(&stream, header, mode).map(|h| (stream, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, fam: u8, addr: &[u8]) -> Vec<u8> {
        let mut b = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        b.push(cmd);
        b.push(fam);
        b.extend((addr.len() as u16).to_be_bytes());
        b.extend(addr);
        b
    }

    #[test]
    fn v1_and_v2_headers_give_the_client_and_their_length() {
        let header = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 80\r\n";
        let h = [&header[..], b"GET / HTTP/1.1\r\n"].concat();
        assert_eq!(
            parse(&h),
            Parsed::Complete(Header {
                len: header.len(),
                client: Some("203.0.113.7:51000".parse().unwrap())
            })
        );
        let h6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n";
        assert!(
            matches!(parse(h6), Parsed::Complete(Header { client: Some(a), .. }) if a.ip().is_ipv6())
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parsed::Complete(Header {
                len: 15,
                client: None
            })
        );
        let mut addr = vec![198, 51, 100, 9, 10, 0, 0, 1];
        addr.extend(40000u16.to_be_bytes());
        addr.extend(80u16.to_be_bytes());
        let mut b = v2(0x21, 0x11, &addr);
        let len = b.len();
        b.extend(b"hello");
        assert_eq!(
            parse(&b),
            Parsed::Complete(Header {
                len,
                client: Some("198.51.100.9:40000".parse().unwrap())
            })
        );
        // LOCAL (a health check from the balancer itself): the connection's own address.
        assert_eq!(
            parse(&v2(0x20, 0x00, &[])),
            Parsed::Complete(Header {
                len: 16,
                client: None
            })
        );
    }

    #[test]
    fn partial_missing_and_malformed_headers_are_told_apart() {
        // Every prefix of a valid header is incomplete, never invalid: a header that arrives
        // in pieces (a busy balancer, a slow link) waits for the rest.
        let mut v6 = vec![0u8; 36];
        v6[15] = 1;
        v6[31] = 1;
        let headers: [Vec<u8>; 5] = [
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 80\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::1 ::1 51000 80\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            v2(0x21, 0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]),
            v2(0x21, 0x21, &v6),
        ];
        for h in &headers {
            assert!(matches!(parse(h), Parsed::Complete(_)), "{h:?}");
            for cut in 0..h.len() {
                assert_eq!(parse(&h[..cut]), Parsed::Incomplete, "{h:?} cut at {cut}");
            }
        }
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n"),
            Parsed::Invalid(Failure::Missing)
        );
        assert_eq!(
            parse(b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n"),
            Parsed::Invalid(Failure::Malformed)
        );
        assert_eq!(
            parse(&v2(0x31, 0x11, &[0; 12])),
            Parsed::Invalid(Failure::Malformed)
        );
    }

    #[test]
    fn trusted_networks() {
        let l = parse_trusted("10.0.0.0/8, 127.0.0.1,::1/128").unwrap();
        assert!(trusted(&l, "10.9.8.7".parse().unwrap()));
        assert!(trusted(&l, "::ffff:10.1.1.1".parse().unwrap()));
        assert!(trusted(&l, "127.0.0.1".parse().unwrap()));
        assert!(!trusted(&l, "127.0.0.2".parse().unwrap()));
        assert!(trusted(&l, "::1".parse().unwrap()));
        assert!(!trusted(&l, "11.0.0.1".parse().unwrap()));
        assert!(trusted(
            &parse_trusted("any").unwrap(),
            "8.8.8.8".parse().unwrap()
        ));
        assert!(trusted(
            &parse_trusted("0.0.0.0/0").unwrap(),
            "8.8.8.8".parse().unwrap()
        ));
        assert!(parse_trusted("10.0.0.0/33").is_err());
        assert!(parse_trusted("ten").is_err());
    }
}
