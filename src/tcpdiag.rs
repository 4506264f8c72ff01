//! What the kernel knows of TCP connections lb handed over (`NETLINK_SOCK_DIAG`, the interface
//! behind `ss -ti`): how many bytes each side has sent. lb keeps no copy of a connection once its
//! worker took it, so this is how it can tell, without reading a byte or holding the socket, that
//! a worker is not answering anyone (DESIGN §12: a hang must not be silent).
//!
//! It also tells which handed connections are still open ([`open_pairs`]), for workers that do
//! not say how many they hold ([`crate::held`]).
//!
//! One dump of the TCP sockets of both families with `INET_DIAG_INFO` (`struct tcp_info`); only
//! safe calls (nix's netlink socket), the messages parsed by hand with bounds checks.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

/// What the kernel says of one connection, from the server's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// Bytes the server sent that the client acknowledged (`tcpi_bytes_acked`).
    pub sent: u64,
    /// Bytes the server received (`tcpi_bytes_received`).
    pub received: u64,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const INET_DIAG_INFO: u16 = 2;
/// `struct inet_diag_msg`: family, state, timer, retrans, the 48-byte socket id, then five u32s.
const DIAG_MSG_LEN: usize = 72;
/// Offsets in `struct tcp_info` (linux/tcp.h, stable since Linux 4.1).
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;

/// Every TCP connection of this network namespace, by (local, peer) address (IPv4-mapped IPv6
/// addresses as IPv4), with its byte counts.
pub fn flows() -> io::Result<HashMap<(SocketAddr, SocketAddr), Flow>> {
    let mut all = HashMap::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        dump(family, u32::MAX, 1 << (INET_DIAG_INFO - 1), |m| {
            if let Some((key, flow)) = parse(m) {
                all.insert(key, flow);
            }
        })?;
    }
    Ok(all)
}

/// The (local, peer) address pairs of the connections that are open on this side: established,
/// or closed by the peer and not yet by the process that holds them (`CLOSE_WAIT`). A smaller
/// dump than [`flows`]: two states, no `tcp_info`.
pub fn open_pairs() -> io::Result<HashSet<(SocketAddr, SocketAddr)>> {
    const ESTABLISHED: u32 = 1;
    const CLOSE_WAIT: u32 = 8;
    let mut open = HashSet::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        dump(family, (1 << ESTABLISHED) | (1 << CLOSE_WAIT), 0, |m| {
            if let Some(key) = pair(m) {
                open.insert(key);
            }
        })?;
    }
    Ok(open)
}

/// One dump of `family`'s TCP sockets in `states` (a bit per state) with the extensions `ext`;
/// `each` gets every `inet_diag_msg` with its attributes.
fn dump(family: u8, states: u32, ext: u8, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    // nlmsghdr (16) + inet_diag_req_v2 (56).
    let mut req = Vec::with_capacity(72);
    req.extend(72u32.to_ne_bytes());
    req.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend((NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend(1u32.to_ne_bytes()); // seq
    req.extend(0u32.to_ne_bytes()); // pid
    req.push(family);
    req.push(libc::IPPROTO_TCP as u8);
    req.push(ext); // idiag_ext
    req.push(0);
    req.extend(states.to_ne_bytes());
    req.extend([0u8; 48]); // no socket id: all of them
    sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut off = 0;
        while off + 16 <= n {
            let len = u32_at(&buf, off) as usize;
            let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            if len < 16 || off + len > n {
                return Ok(());
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => return Err(io::Error::other("sock_diag refused the dump")),
                SOCK_DIAG_BY_FAMILY => each(&buf[off + 16..off + len]),
                _ => {}
            }
            off += (len + 3) & !3;
        }
        if n == 0 {
            return Ok(());
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The (local, peer) addresses of one `inet_diag_msg`.
fn pair(m: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    if m.len() < DIAG_MSG_LEN {
        return None;
    }
    let family = i32::from(m[0]);
    // id: sport, dport (big-endian), src[16], dst[16], if, cookie.
    let sport = u16::from_be_bytes([m[4], m[5]]);
    let dport = u16::from_be_bytes([m[6], m[7]]);
    let addr = |at: usize| -> Option<IpAddr> {
        let b = &m[at..at + 16];
        if family == libc::AF_INET {
            Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
        } else if family == libc::AF_INET6 {
            let a: [u8; 16] = b.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(a)).to_canonical())
        } else {
            None
        }
    };
    Some((
        SocketAddr::new(addr(8)?, sport),
        SocketAddr::new(addr(24)?, dport),
    ))
}

/// One `inet_diag_msg` with its `tcp_info`.
fn parse(m: &[u8]) -> Option<((SocketAddr, SocketAddr), Flow)> {
    let key = pair(m)?;
    let mut off = DIAG_MSG_LEN;
    while off + 4 <= m.len() {
        let len = usize::from(u16::from_ne_bytes([m[off], m[off + 1]]));
        let kind = u16::from_ne_bytes([m[off + 2], m[off + 3]]);
        if len < 4 || off + len > m.len() {
            break;
        }
        if kind == INET_DIAG_INFO {
            let info = &m[off + 4..off + len];
            let flow = Flow {
                sent: u64_at(info, TCPI_BYTES_ACKED)?,
                received: u64_at(info, TCPI_BYTES_RECEIVED)?,
            };
            return Some((key, flow));
        }
        off += (len + 3) & !3;
    }
    None
}

/// `addr` as the dump keys it.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn the_dump_sees_what_each_side_of_a_connection_sent() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        let key = (
            canonical(s.local_addr().unwrap()),
            canonical(s.peer_addr().unwrap()),
        );
        let f = flows().unwrap();
        assert_eq!(
            f[&key],
            Flow {
                sent: 0,
                received: 5
            },
            "nothing answered yet"
        );
        s.write_all(b"hi!").unwrap();
        c.read_exact(&mut buf[..3]).unwrap();
        // The client's ACK of those bytes may take a moment (loopback: microseconds).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let f = flows().unwrap()[&key];
            if f.sent == 3 {
                assert_eq!(f.received, 5);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{f:?}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn open_pairs_has_a_connection_until_its_server_side_closes() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let key = (
            canonical(s.local_addr().unwrap()),
            canonical(s.peer_addr().unwrap()),
        );
        assert!(open_pairs().unwrap().contains(&key), "established");
        drop(c);
        // The client's FIN arrives (CLOSE_WAIT): the server still holds it open.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &s, &mut buf).unwrap(), 0);
        assert!(open_pairs().unwrap().contains(&key), "close-wait");
        drop(s);
        while open_pairs().unwrap().contains(&key) {
            assert!(
                std::time::Instant::now() < deadline,
                "still open after its close"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
