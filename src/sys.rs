//! Raw socket syscalls: `accept4`, `sendmsg`/`recvmsg` with `SCM_RIGHTS`, and reactor registration.
//!
//! This is one of the two places in lb that may use `unsafe` (the other is the `pre_exec` hook in
//! [`crate::spawn`]). Everything here is small, synchronous and non-blocking; the async wrappers
//! live in the callers, which drive these functions through [`tokio::io::unix::AsyncFd`].
//!
//! Invariants (see `shared/PITFALLS.md` §2, §3, §5):
//! - [`accept`] returns sockets that are already `O_NONBLOCK | O_CLOEXEC` (one `accept4`), because a
//!   blocking fd passed to a Node worker can freeze the whole worker.
//! - [`send_with_fd`] sends the whole buffer in one `sendmsg` with at most one fd, with
//!   `MSG_NOSIGNAL`; the caller attaches the fd only to the first chunk of a partial write.
//! - [`recv_with_fds`] always uses `MSG_CMSG_CLOEXEC`, sizes its control buffer for the kernel's
//!   maximum of 253 fds, and collects every fd the kernel installed even when the control data was
//!   truncated, so that no received fd can leak.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::mem::{self, MaybeUninit};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The kernel's `SCM_MAX_FD`: the most fds one `recvmsg` can carry.
const SCM_MAX_FD: usize = 253;

/// Registers an fd with the tokio reactor for the given interest.
pub fn register<T: AsRawFd>(inner: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    register_owned(inner, interest).map_err(|(_, e)| e)
}

/// [`register`], giving `inner` back if it cannot be registered (so a connection is not lost).
pub fn register_owned<T: AsRawFd>(
    inner: T,
    interest: Interest,
) -> Result<AsyncFd<T>, (T, io::Error)> {
    // Callers pass owning types (`socket2::Socket`, `UnixStream`, `TcpStream`).
    // SAFETY: `inner` owns its fd, so it stays open and the same file, and `as_raw_fd` returns
    // it, until the AsyncFd is dropped or `into_inner` is called.
    unsafe { AsyncFd::register_with_interest(inner, interest) }.map_err(|e| e.into_parts())
}

/// Accepts one connection with a single `accept4(SOCK_NONBLOCK | SOCK_CLOEXEC)`.
///
/// Returns `WouldBlock` when the backlog is empty.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<(TcpStream, SocketAddr)> {
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` is a writable sockaddr_storage of `len` bytes, `len` is a valid pointer,
    // and `listener` is a live fd borrowed for the call.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            storage.as_mut_ptr().cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new fd that nothing else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    // SAFETY: the kernel wrote a valid socket address of `len` bytes into `storage`.
    let addr = unsafe { sockaddr_to_std(storage.assume_init_ref(), len) };
    match addr {
        Some(addr) => Ok((stream, addr)),
        // An accepted TCP socket always has an inet peer; fall back to asking the socket.
        None => {
            let addr = stream.peer_addr()?;
            Ok((stream, addr))
        }
    }
}

/// Converts a kernel socket address to a std one (None for non-inet families).
///
/// # Safety
/// `storage` must hold a socket address of `len` valid bytes written by the kernel.
// SAFETY: an `unsafe fn` because it reinterprets `storage` by its family; its one caller passes
// what `accept4` wrote, with the length the kernel returned.
unsafe fn sockaddr_to_std(
    storage: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    let len = len as usize;
    match storage.ss_family as libc::c_int {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            let p = (storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
            // SAFETY: AF_INET and `len` covers a sockaddr_in; sockaddr_storage aligns any sockaddr.
            let sin = unsafe { &*p };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            let p = (storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
            // SAFETY: as above, for AF_INET6 and sockaddr_in6.
            let sin6 = unsafe { &*p };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Set once the inherited channel fd has been adopted (it may be owned only once).
static ADOPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The same for the inherited listener (kernel steering, fd 4).
static LISTENER_ADOPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Takes ownership of a socket fd inherited across `exec` (a worker's channel, fd 3).
///
/// Fails if `fd` is not an open socket, or if an fd was already adopted by this process.
pub fn adopt_inherited_socket(fd: RawFd) -> io::Result<OwnedFd> {
    adopt(fd, &ADOPTED)
}

/// Takes ownership of the slot's listening socket inherited across `exec` (fd 4, once).
pub fn adopt_inherited_listener(fd: RawFd) -> io::Result<OwnedFd> {
    adopt(fd, &LISTENER_ADOPTED)
}

fn adopt(fd: RawFd, once: &std::sync::atomic::AtomicBool) -> io::Result<OwnedFd> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat only writes into `st`; an fd number that is not open just yields EBADF.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded and filled `st`.
    let st = unsafe { st.assume_init() };
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::other("not a socket"));
    }
    if once.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Err(io::Error::other(
            "that fd is already in use by this process",
        ));
    }
    // SAFETY: `fd` is open (fstat succeeded), was inherited at exec so no Rust object owns it,
    // and the `once` flag guarantees this is its only adoption in the process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Control buffer big enough for `SCM_MAX_FD` fds, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; cmsg_space(SCM_MAX_FD)]);

/// `CMSG_SPACE(n * sizeof(int))`, computed at compile time.
const fn cmsg_space(fds: usize) -> usize {
    let align = mem::size_of::<usize>();
    let hdr = (mem::size_of::<libc::cmsghdr>() + align - 1) & !(align - 1);
    let data = (fds * mem::size_of::<RawFd>() + align - 1) & !(align - 1);
    hdr + data
}

/// Sends `data` with one `sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT)`, attaching `fd` (if any) as one
/// `SCM_RIGHTS` fd. Returns how many bytes went out (may be fewer than `data.len()`).
pub fn send_with_fd(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cbuf = CmsgBuf([0; cmsg_space(SCM_MAX_FD)]);
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic on a constant.
        let space = unsafe { libc::CMSG_SPACE(mem::size_of::<RawFd>() as u32) } as usize;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` zeroed, aligned bytes, enough for one cmsghdr with
        // one int, so CMSG_FIRSTHDR is non-null and CMSG_DATA is in bounds for one RawFd.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    // SAFETY: `msg` points at live buffers (`iov` → `data`, `cbuf`) for the duration of the call,
    // and `sock` is a live fd borrowed for the call.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Receives bytes into `buf` with one `recvmsg(MSG_CMSG_CLOEXEC | MSG_DONTWAIT)`, appending every fd
/// that arrived to `fds` in order. Returns the byte count (0 = EOF).
///
/// Also returns, through `truncated`, whether the kernel reported `MSG_CTRUNC` (some fds were
/// dropped by the kernel because the receiver is out of fds).
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut VecDeque<OwnedFd>,
    truncated: &mut bool,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf([0; cmsg_space(SCM_MAX_FD)]);
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.0.len() as _;
    // SAFETY: `msg` points at live, writable buffers of the stated sizes; `sock` is a live fd.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    *truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
    // Walk every control message, even when MSG_CTRUNC is set: the fds the kernel did install are
    // ours now and must be owned (and closed) rather than leaked.
    // SAFETY: `msg` describes the control buffer the kernel just filled; CMSG_FIRSTHDR/NXTHDR only
    // return headers that lie within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header = data.offset_from(cmsg.cast::<u8>()) as usize;
                let len = ((*cmsg).cmsg_len as usize).saturating_sub(header);
                for i in 0..len / mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    if fd >= 0 {
                        fds.push_back(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(n as usize)
}

/// Takes ownership of the sockets systemd passed (`LISTEN_FDS` fds from 3 on) and marks them
/// close-on-exec, so no worker inherits them. Each must be an open socket.
pub fn take_passed_fds(count: usize) -> io::Result<Vec<OwnedFd>> {
    const SD_LISTEN_FDS_START: RawFd = 3;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let fd = SD_LISTEN_FDS_START + i as RawFd;
        // SAFETY: fcntl on an fd number only reads its flags; an fd that is not open is EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(io::Error::other(format!(
                "LISTEN_FDS says fd {fd} was passed, but it is not open"
            )));
        }
        // SAFETY: as above; setting FD_CLOEXEC changes nothing else about the fd.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: systemd passed this fd to lb for lb to own (sd_listen_fds(3)); it is open (checked
        // above) and nothing else in lb refers to it, so the OwnedFd is its only owner.
        out.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok(out)
}

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    /// Opcode.
    pub code: u16,
    /// Jump offset if true.
    pub jt: u8,
    /// Jump offset if false.
    pub jf: u8,
    /// Constant operand.
    pub k: u32,
}

/// Attaches a classic BPF program that picks the socket of the `SO_REUSEPORT` group `fd`
/// belongs to (`SO_ATTACH_REUSEPORT_CBPF`; replaces the previous one, for the whole group).
pub fn attach_reuseport_cbpf(fd: BorrowedFd<'_>, prog: &[Insn]) -> io::Result<()> {
    let filter: Vec<libc::sock_filter> = prog
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let len = u16::try_from(filter.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let fprog = libc::sock_fprog {
        len,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `filter`, which outlives the call; the kernel copies the program
    // and reads exactly `len` instructions; the option length is the struct's size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const fprog).cast(),
            mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How many connections wait in a listening socket's accept queue (`TCP_INFO`'s `tcpi_unacked`
/// is that count for a socket in LISTEN state).
pub fn accept_queue_len(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which is that large and zeroed
    // (so any field it does not fill is 0, a valid value for every field).
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised, then (partly) filled by the kernel: every bit pattern is valid.
    Ok(unsafe { info.assume_init() }.tcpi_unacked)
}

/// Takes ownership of fd `fd`, which lb's previous image passed across `exec` (an in-place
/// upgrade, [`crate::upgrade`]): checks it is open and makes it close-on-exec again.
pub fn adopt_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::other(format!(
            "fd {fd} is not a file descriptor"
        )));
    }
    // SAFETY: fcntl on an fd number only reads its flags; an fd that is not open is EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::other(format!(
            "the state names fd {fd}, but it is not open"
        )));
    }
    // lb's previous image left this fd open for this image to own, and the state document names
    // each fd once (`upgrade::State::validate` checks).
    // SAFETY: the fd is open (checked above) and nothing else here refers to it: sole owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_inheritable(owned.as_fd(), false)?;
    Ok(owned)
}

/// Clears (`true`) or sets (`false`) `FD_CLOEXEC` on `fd`: an fd is inherited across `exec`
/// only while it is clear.
pub fn set_inheritable(fd: BorrowedFd<'_>, inherit: bool) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let flags = if inherit {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))
        .map(drop)
        .map_err(io::Error::from)
}

/// [`set_inheritable`] for an fd this process owns through something that only gives its
/// number (the listener and sockets owned by their tasks, during an in-place upgrade).
pub fn set_inheritable_raw(fd: RawFd, inherit: bool) -> io::Result<()> {
    // SAFETY: fcntl(F_GETFD/F_SETFD) reads and sets only the close-on-exec flag of the fd
    // number; it touches no memory, and an fd that is not open is EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if inherit {
        flags & !libc::FD_CLOEXEC
    } else {
        flags | libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn fd_travels_with_its_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (p, _q) = UnixStream::pair().unwrap();
        assert_eq!(
            send_with_fd(a.as_fd(), b"hello\n", Some(p.as_fd())).unwrap(),
            6
        );
        let mut buf = [0u8; 64];
        let mut fds = VecDeque::new();
        let mut trunc = false;
        let n = recv_with_fds(b.as_fd(), &mut buf, &mut fds, &mut trunc).unwrap();
        assert_eq!(&buf[..n], b"hello\n");
        assert_eq!(fds.len(), 1);
        assert!(!trunc);
        // The received fd is close-on-exec.
        let flags = nix::fcntl::fcntl(fds[0].as_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn fdless_bytes_before_an_fd_share_a_read_and_the_fd_is_queued() {
        // PITFALLS §2: earlier fd-less bytes can arrive in the same read as a later fd.
        let (a, b) = UnixStream::pair().unwrap();
        let (p, _q) = UnixStream::pair().unwrap();
        send_with_fd(a.as_fd(), b"AAAA", None).unwrap();
        send_with_fd(a.as_fd(), b"BBBB", Some(p.as_fd())).unwrap();
        send_with_fd(a.as_fd(), b"CCCC", Some(p.as_fd())).unwrap();
        let mut buf = [0u8; 64];
        let mut fds = VecDeque::new();
        let mut trunc = false;
        let n = recv_with_fds(b.as_fd(), &mut buf, &mut fds, &mut trunc).unwrap();
        assert_eq!(&buf[..n], b"AAAABBBB");
        assert_eq!(fds.len(), 1, "a read stops after the skb that carries fds");
        let n = recv_with_fds(b.as_fd(), &mut buf, &mut fds, &mut trunc).unwrap();
        assert_eq!(&buf[..n], b"CCCC");
        assert_eq!(fds.len(), 2);
    }

    #[test]
    fn would_block_when_empty() {
        let (_a, b) = UnixStream::pair().unwrap();
        let mut buf = [0u8; 8];
        let mut fds = VecDeque::new();
        let mut trunc = false;
        let err = recv_with_fds(b.as_fd(), &mut buf, &mut fds, &mut trunc).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn accept_returns_nonblocking_cloexec_socket_and_peer() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = accept(l.as_fd()).unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        let fl = nix::fcntl::fcntl(s.as_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        let fd = nix::fcntl::fcntl(s.as_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(fd & libc::FD_CLOEXEC, 0);
    }
}
