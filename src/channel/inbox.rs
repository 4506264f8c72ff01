//! The receiving half of a channel endpoint, shared by the master's dispatch and `lb::worker`.
//!
//! One [`Inbox`] per channel: it reads a bounded batch per wakeup with `recvmsg` (fds with
//! `MSG_CMSG_CLOEXEC`, cmsg room for the kernel's maximum, PITFALLS §3), keeps the fds that arrived
//! in a FIFO (an fd arrives with the first byte of its message, and earlier fd-less bytes can
//! share that read, PITFALLS §2), frames lines with the bounded [`LineDecoder`], and hands out
//! typed messages. Whoever decodes a handle message pops its fd; every other fd is stray and is
//! closed by [`Inbox::close_stray_fds`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use tokio::io::unix::AsyncFdReadyGuard;

use super::v8::{Frame, FrameDecoder};
use super::{Line, LineDecoder, Payload, Serialization};
use crate::sys;

/// Reads per wakeup before other work gets a turn (readiness stays set if there is more).
const READS_PER_WAKEUP: usize = 16;

/// What a read pass found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// The channel is open (there may be lines to take).
    Open,
    /// The peer closed the channel, or it failed.
    Closed,
}

/// One item taken from the inbox.
#[derive(Debug, PartialEq)]
pub enum Incoming<T> {
    /// A complete line, decoded.
    Message(T),
    /// A line over the length limit was dropped.
    TooLong,
}

/// How messages are delimited.
#[derive(Debug)]
enum Framing {
    /// `json`: newline-terminated lines.
    Lines(LineDecoder),
    /// `advanced`: length-prefixed V8 frames.
    Frames(FrameDecoder),
}

/// Framing state of one channel's receiving side.
#[derive(Debug)]
pub struct Inbox {
    buf: Vec<u8>,
    decoder: Framing,
    /// Fds that arrived, in order, not yet claimed by a handle message.
    fds: VecDeque<OwnedFd>,
    /// The kernel dropped fds (`MSG_CTRUNC`) since the last [`Inbox::close_stray_fds`].
    truncated: bool,
}

impl Framing {
    fn extend(&mut self, bytes: &[u8]) {
        match self {
            Framing::Lines(d) => d.extend(bytes),
            Framing::Frames(d) => d.extend(bytes),
        }
    }

    fn buffered(&self) -> usize {
        match self {
            Framing::Lines(d) => d.buffered(),
            Framing::Frames(d) => d.buffered(),
        }
    }
}

impl Inbox {
    /// An inbox for `json` lines up to `max_line` bytes, reading `read_size` bytes at a time.
    pub fn new(max_line: usize, read_size: usize) -> Self {
        Self::with(Serialization::Json, max_line, read_size)
    }

    /// An inbox for messages of `mode` up to `max_len` bytes.
    pub fn with(mode: Serialization, max_len: usize, read_size: usize) -> Self {
        Self {
            buf: vec![0; read_size],
            decoder: match mode {
                Serialization::Json => Framing::Lines(LineDecoder::new(max_len)),
                Serialization::Advanced => Framing::Frames(FrameDecoder::new(max_len)),
            },
            fds: VecDeque::new(),
            truncated: false,
        }
    }

    /// Reads what is already buffered on `fd` without waiting for readiness (the worker has
    /// exited: what it wrote before dying still counts).
    pub fn read_rest(&mut self, fd: std::os::fd::BorrowedFd<'_>) {
        for _ in 0..READS_PER_WAKEUP {
            match sys::recv_with_fds(fd, &mut self.buf, &mut self.fds, &mut self.truncated) {
                Ok(0) => break,
                Ok(n) => self.decoder.extend(&self.buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// Reads what the readiness `guard` allows (a bounded batch). A short read drains the socket
    /// (as tokio does for its own streams), unless it stopped early at a message carrying fds:
    /// then readiness is cleared without a trailing `EAGAIN` read.
    pub fn read(&mut self, guard: &mut AsyncFdReadyGuard<'_, UnixStream>) -> Received {
        for _ in 0..READS_PER_WAKEUP {
            let fds_before = self.fds.len();
            let r = guard.try_io(|io| {
                sys::recv_with_fds(
                    io.get_ref().as_fd(),
                    &mut self.buf,
                    &mut self.fds,
                    &mut self.truncated,
                )
            });
            match r {
                Err(_would_block) => break,
                Ok(Ok(0)) => return Received::Closed,
                Ok(Ok(n)) => {
                    self.decoder.extend(&self.buf[..n]);
                    if n < self.buf.len() && self.fds.len() == fds_before && !self.truncated {
                        guard.clear_ready();
                        break;
                    }
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => {
                    tracing::debug!("channel read error: {e}");
                    return Received::Closed;
                }
            }
        }
        Received::Open
    }

    /// What an in-place upgrade carries: the start of a message not yet complete. `None` when
    /// that cannot be carried faithfully (an fd arrived with it, or an over-long message is
    /// being discarded); the caller then waits and asks again.
    pub fn carry(&self) -> Option<Vec<u8>> {
        if !self.fds.is_empty() || self.truncated {
            return None;
        }
        match &self.decoder {
            Framing::Lines(d) => d.pending_bytes(),
            Framing::Frames(d) => d.pending_bytes(),
        }
        .map(<[u8]>::to_vec)
    }

    /// Feeds bytes as if read (for tests and for callers that read themselves).
    pub fn extend(&mut self, bytes: &[u8]) {
        self.decoder.extend(bytes);
    }

    /// The next complete message, decoded with `parse`.
    pub fn next<T>(&mut self, parse: impl FnOnce(Payload<'_>) -> T) -> Option<Incoming<T>> {
        Some(match &mut self.decoder {
            Framing::Lines(d) => match d.next_line()? {
                Line::Complete(bytes) => Incoming::Message(parse(Payload::Json(bytes))),
                Line::TooLong => Incoming::TooLong,
            },
            Framing::Frames(d) => match d.next_frame()? {
                Frame::Complete(frame, payload) => {
                    Incoming::Message(parse(Payload::V8 { frame, payload }))
                }
                Frame::TooLong => Incoming::TooLong,
            },
        })
    }

    /// The oldest fd not claimed yet (for the handle message just decoded).
    pub fn pop_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    /// Closes fds that no message can claim any more: an fd arrives with the first byte of its
    /// message, so only a line still incomplete can own one. Returns how many were stray (a
    /// truncation by the kernel counts as one).
    pub fn close_stray_fds(&mut self) -> usize {
        let keep = usize::from(self.decoder.buffered() > 0);
        let mut stray = 0;
        while self.fds.len() > keep {
            self.fds.pop_front();
            stray += 1;
        }
        if std::mem::take(&mut self.truncated) {
            stray += 1;
        }
        stray
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_bytes(p: Payload<'_>) -> Vec<u8> {
        match p {
            Payload::Json(b) => b.to_vec(),
            Payload::V8 { .. } => panic!("a json inbox"),
        }
    }
    use std::os::fd::AsFd;

    #[tokio::test]
    async fn an_fd_that_shares_a_read_with_earlier_bytes_goes_to_its_own_message() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let io = sys::register(b, tokio::io::Interest::READABLE).unwrap();
        let mut inbox = Inbox::new(1024, 4096);
        let read = async |inbox: &mut Inbox| {
            let mut guard = io.readable().await.unwrap();
            inbox.read(&mut guard)
        };
        // A plain message, then a handle message with its fd: one read may carry both.
        let (r, _w) = nix::unistd::pipe().unwrap();
        sys::send_with_fd(a.as_fd(), b"plain\n", None).unwrap();
        sys::send_with_fd(a.as_fd(), b"handle\n", Some(r.as_fd())).unwrap();
        let mut lines = Vec::new();
        while lines.len() < 2 {
            assert_eq!(read(&mut inbox).await, Received::Open);
            while let Some(Incoming::Message(l)) = inbox.next(json_bytes) {
                if l == b"handle" {
                    assert!(inbox.pop_fd().is_some(), "the handle line claims the fd");
                } else {
                    assert_eq!(inbox.close_stray_fds(), 0, "the plain line owns no fd");
                }
                lines.push(l);
            }
        }
        assert_eq!(lines, [b"plain".to_vec(), b"handle".to_vec()]);
        // An fd with a message that claims none is stray: closed and counted.
        let (r, _w) = nix::unistd::pipe().unwrap();
        sys::send_with_fd(a.as_fd(), b"not a handle\n", Some(r.as_fd())).unwrap();
        read(&mut inbox).await;
        assert!(matches!(inbox.next(json_bytes), Some(Incoming::Message(_))));
        assert_eq!(inbox.close_stray_fds(), 1);
        drop(a);
        assert_eq!(read(&mut inbox).await, Received::Closed);
    }

    #[test]
    fn over_long_lines_come_out_as_too_long() {
        let mut inbox = Inbox::new(4, 64);
        inbox.extend(b"123456\nab\n");
        assert_eq!(inbox.next(|p| json_bytes(p).len()), Some(Incoming::TooLong));
        assert_eq!(
            inbox.next(|p| json_bytes(p).len()),
            Some(Incoming::Message(2))
        );
        assert_eq!(inbox.next(|p| json_bytes(p).len()), None);
    }
}
