//! Kernel steering (`--steering kernel`): one `SO_REUSEPORT` listener per slot, all owned by the
//! master, and a classic BPF program (`SO_ATTACH_REUSEPORT_CBPF`, no privilege needed) that picks
//! the slot's socket from the client's source address with the very mapping of `sticky`
//! ([`crate::balance::StickyHash`]): rendezvous hashing over the slots that are up. Each worker
//! accepts from its own slot's listener, so the master does no work per connection.
//!
//! The program: load the IP version nibble; for IPv4 the key is the source address, for IPv6 the
//! xor of its four words (a v4-mapped client of a dual-stack socket arrives as IPv4); then for
//! every live slot `h = fmix32(key ^ slot_seed)`, keeping the highest (ties: the lower slot). It
//! returns the index of the socket in the reuseport group, which is the slot (sockets join the
//! group in slot order and never leave it while lb runs, so indices never shift).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::balance::StickyHash;
use crate::listener::{BindError, Listener};

/// Binds `n` `SO_REUSEPORT` listeners on `addr` (the first one picks the port if it is 0), in
/// slot order: socket `i` is slot `i`'s and index `i` of the group.
pub fn bind_group(addr: SocketAddr, n: usize, backlog: u32) -> Result<Vec<Socket>, BindError> {
    let mut addr = addr;
    let mut group = Vec::with_capacity(n);
    for _ in 0..n {
        let s = crate::listener::bind_with(addr, backlog, true)?;
        if addr.port() == 0 {
            addr.set_port(
                s.local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .map_or(0, |a| a.port()),
            );
        }
        group.push(s);
    }
    Ok(group)
}

/// A listener of the group registered with the runtime, through a duplicate of its fd (closing
/// it deregisters it; the group keeps the socket).
fn watch(s: &Socket) -> io::Result<Arc<Listener>> {
    Listener::new(s.try_clone()?).map(Arc::new)
}

/// Waits until one of `listeners` may have a connection; returns its slot.
pub async fn any_ready(listeners: &[(usize, Arc<Listener>)]) -> usize {
    let waits = listeners.iter().map(|(slot, l)| {
        Box::pin(async move {
            let _ = l.ready().await;
            *slot
        })
    });
    futures_util::future::select_all(waits).await.0
}

/// The master's side of kernel steering: the group's listeners (kept open while lb runs, so no
/// socket ever leaves the group), the program attached, and per-slot accept-queue watch.
///
/// Only the listeners of slots outside the program are registered with the master's runtime
/// (through a duplicate fd): a live slot's incoming connections must not wake the master, or
/// it would pay an epoll wakeup per connection it never accepts.
pub struct Group {
    addr: SocketAddr,
    backlog: u32,
    hash: StickyHash,
    sockets: Vec<Socket>,
    /// Registered duplicates of the listeners the master accepts from (slots outside the
    /// program).
    watched: Vec<Option<Arc<Listener>>>,
    /// The live slots of the attached program (`None` before the first).
    live: Option<Vec<usize>>,
    /// Since when each slot's accept queue has been non-empty (at every check).
    waiting_since: Vec<Option<Instant>>,
}

impl Group {
    /// Registers the bound group with the runtime.
    pub fn new(sockets: Vec<Socket>, backlog: u32, hash: StickyHash) -> io::Result<Group> {
        let addr = sockets
            .first()
            .and_then(|s| s.local_addr().ok()?.as_socket())
            .ok_or_else(|| io::Error::other("no listener in the group"))?;
        // Until the first program is attached every slot is outside it: the master accepts.
        let watched = sockets
            .iter()
            .map(|s| watch(s).map(Some))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Group {
            addr,
            backlog,
            hash,
            waiting_since: vec![None; sockets.len()],
            sockets,
            watched,
            live: None,
        })
    }

    /// The address every listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Slot `slot`'s listener (what its worker accepts from), growing the group to reach it.
    pub fn listener(&mut self, slot: usize) -> io::Result<BorrowedFd<'_>> {
        while self.sockets.len() <= slot {
            let s = crate::listener::bind_with(self.addr, self.backlog, true)
                .map_err(|e| io::Error::other(e.to_string()))?;
            // Outside the program until the next one is attached.
            self.watched.push(Some(watch(&s)?));
            self.sockets.push(s);
            self.waiting_since.push(None);
        }
        Ok(self.sockets[slot].as_fd())
    }

    /// Attaches the program for `live` if it differs from the one attached (and watches the
    /// listeners of the slots outside it). `Ok(true)` if it did.
    pub fn steer(&mut self, live: Vec<usize>) -> io::Result<bool> {
        if self.live.as_ref() == Some(&live) {
            return Ok(false);
        }
        crate::sys::attach_reuseport_cbpf(self.sockets[0].as_fd(), &program(&self.hash, &live))?;
        for (slot, s) in self.sockets.iter().enumerate() {
            let w = &mut self.watched[slot];
            match (live.contains(&slot), w.is_some()) {
                (true, true) => *w = None,
                (false, false) => *w = Some(watch(s)?),
                _ => {}
            }
        }
        self.live = Some(live);
        Ok(true)
    }

    /// The slots outside the attached program, whose queues the master empties itself.
    pub fn down(&self) -> Vec<(usize, Arc<Listener>)> {
        self.watched
            .iter()
            .enumerate()
            .filter_map(|(i, l)| Some((i, l.clone()?)))
            .collect()
    }

    /// Slot `slot`'s listener, for the master to accept from (while the slot is outside the
    /// program).
    pub fn get(&self, slot: usize) -> Option<Arc<Listener>> {
        self.watched.get(slot).cloned().flatten()
    }

    /// Slot `slot`'s worker made progress (it used CPU): a queue it has not emptied yet is
    /// load, not a stall.
    pub fn progress(&mut self, slot: usize) {
        if let Some(w) = self.waiting_since.get_mut(slot) {
            *w = None;
        }
    }

    /// Live slots whose accept queue has not been empty at any check for `limit`, with no
    /// [`Group::progress`] meanwhile: their worker is not accepting (stopped, blocked, or not a
    /// worker that accepts at all).
    pub fn stuck(&mut self, now: Instant, limit: Duration) -> Vec<usize> {
        let live = self.live.clone().unwrap_or_default();
        let mut stuck = Vec::new();
        for (slot, s) in self.sockets.iter().enumerate() {
            let waiting = live.contains(&slot)
                && crate::sys::accept_queue_len(s.as_fd()).is_ok_and(|n| n > 0);
            match (waiting, self.waiting_since[slot]) {
                (false, _) => self.waiting_since[slot] = None,
                (true, None) => self.waiting_since[slot] = Some(now),
                (true, Some(t)) if now.saturating_duration_since(t) >= limit => {
                    self.waiting_since[slot] = None;
                    stuck.push(slot);
                }
                (true, Some(_)) => {}
            }
        }
        stuck
    }

    /// Closes the master's copies (at shutdown; workers still hold theirs until they exit).
    pub fn close(&mut self) {
        self.watched.clear();
        self.sockets.clear();
        self.live = None;
    }
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("addr", &self.addr)
            .field("slots", &self.sockets.len())
            .field("live", &self.live)
            .finish()
    }
}

pub use crate::sys::Insn;

const fn insn(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
    Insn { code, jt, jf, k }
}

// Opcode parts (linux/filter.h).
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const B: u16 = 0x10;
const ABS: u16 = 0x20;
const MEM: u16 = 0x60;
const IMM: u16 = 0x00;
const MUL: u16 = 0x20;
const XOR: u16 = 0xa0;
const RSH: u16 = 0x70;
const JA: u16 = 0x00;
const JEQ: u16 = 0x10;
const JGT: u16 = 0x20;
const K: u16 = 0x00;
const X: u16 = 0x08;
const A: u16 = 0x10;
const TAX: u16 = 0x00;
const TXA: u16 = 0x80;
/// `SKF_NET_OFF`: loads relative to the network header.
const NET: u32 = (-0x0010_0000i32) as u32;

/// The kernel's limit on a classic BPF program.
pub const MAX_INSNS: usize = 4096;

/// Instructions per slot in [`program`].
const PER_SLOT: usize = 18;

/// The most slots a program can cover.
pub const MAX_SLOTS: usize = (MAX_INSNS - 32) / PER_SLOT;

/// The program that sends each client to the highest-weight slot among `live` (ascending slot
/// numbers; empty: every connection to slot 0's socket, where the master takes it).
pub fn program(hash: &StickyHash, live: &[usize]) -> Vec<Insn> {
    let mut p = vec![
        // A = IP version.
        insn(LD | B | ABS, 0, 0, NET),
        insn(ALU | RSH | K, 0, 0, 4),
        insn(JMP | JEQ | K, 11, 0, 4),
        // IPv6: A = xor of the source address's words.
        insn(LD | W | ABS, 0, 0, NET + 8),
        insn(MISC | TAX, 0, 0, 0),
        insn(LD | W | ABS, 0, 0, NET + 12),
        insn(ALU | XOR | X, 0, 0, 0),
        insn(MISC | TAX, 0, 0, 0),
        insn(LD | W | ABS, 0, 0, NET + 16),
        insn(ALU | XOR | X, 0, 0, 0),
        insn(MISC | TAX, 0, 0, 0),
        insn(LD | W | ABS, 0, 0, NET + 20),
        insn(ALU | XOR | X, 0, 0, 0),
        insn(JMP | JA, 0, 0, 1),
        // IPv4: A = the source address.
        insn(LD | W | ABS, 0, 0, NET + 12),
        // M[0] = key, M[1] = best weight, M[2] = best slot.
        insn(ST, 0, 0, 0),
        insn(LD | IMM, 0, 0, 0),
        insn(ST, 0, 0, 1),
        insn(LD | IMM, 0, 0, live.first().map_or(0, |&s| s as u32)),
        insn(ST, 0, 0, 2),
    ];
    for &slot in live {
        let before = p.len();
        p.extend([
            insn(LD | MEM, 0, 0, 0),
            insn(ALU | XOR | K, 0, 0, hash.slot_seed(slot)),
            // fmix32
            insn(MISC | TAX, 0, 0, 0),
            insn(ALU | RSH | K, 0, 0, 16),
            insn(ALU | XOR | X, 0, 0, 0),
            insn(ALU | MUL | K, 0, 0, 0x85EB_CA6B),
            insn(MISC | TAX, 0, 0, 0),
            insn(ALU | RSH | K, 0, 0, 13),
            insn(ALU | XOR | X, 0, 0, 0),
            insn(ALU | MUL | K, 0, 0, 0xC2B2_AE35),
            insn(MISC | TAX, 0, 0, 0),
            insn(ALU | RSH | K, 0, 0, 16),
            insn(ALU | XOR | X, 0, 0, 0),
        ]);
        p.extend([
            // X = best so far; if A > X { M[1] = A; M[2] = slot } (M[2] starts at the first
            // live slot, so a weight of 0 there needs no update: ties go to the lower slot).
            insn(LDX | MEM, 0, 0, 1),
            insn(JMP | JGT | X, 0, 3, 0),
            insn(ST, 0, 0, 1),
            insn(LD | IMM, 0, 0, slot as u32),
            insn(ST, 0, 0, 2),
        ]);
        debug_assert_eq!(p.len() - before, PER_SLOT);
    }
    p.extend([insn(LD | MEM, 0, 0, 2), insn(RET | A, 0, 0, 0)]);
    p
}

/// Runs a classic BPF program the way the kernel would, on a packet whose network header is
/// `net` (for tests: the kernel is the real check, this one reaches IPv6 and many slots).
pub fn run(prog: &[Insn], net: &[u8]) -> Option<u32> {
    let (mut a, mut x, mut mem, mut pc) = (0u32, 0u32, [0u32; 16], 0usize);
    let load = |off: u32, size: usize| -> Option<u32> {
        let off = off.wrapping_sub(NET) as usize;
        let b = net.get(off..off + size)?;
        Some(b.iter().fold(0u32, |v, &x| (v << 8) | u32::from(x)))
    };
    loop {
        let i = *prog.get(pc)?;
        pc += 1;
        match i.code {
            c if c == LD | W | ABS => a = load(i.k, 4)?,
            c if c == LD | B | ABS => a = load(i.k, 1)?,
            c if c == LD | IMM => a = i.k,
            c if c == LD | MEM => a = mem[i.k as usize],
            c if c == LDX | MEM => x = mem[i.k as usize],
            c if c == ST => mem[i.k as usize] = a,
            c if c == ALU | RSH | K => a >>= i.k,
            c if c == ALU | XOR | X => a ^= x,
            c if c == ALU | XOR | K => a ^= i.k,
            c if c == ALU | MUL | K => a = a.wrapping_mul(i.k),
            c if c == MISC | TAX => x = a,
            c if c == MISC | TXA => a = x,
            c if c == JMP | JA => pc += i.k as usize,
            c if c == JMP | JEQ | K => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
            c if c == JMP | JGT | X => pc += usize::from(if a > x { i.jt } else { i.jf }),
            c if c == RET | A => return Some(a),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{DEFAULT_HASH_SEED, canonical_ip};
    use std::net::IpAddr;

    /// A network header with `ip` as the source address.
    fn header(ip: IpAddr) -> Vec<u8> {
        match ip {
            IpAddr::V4(v4) => {
                let mut h = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0];
                h.extend(v4.octets());
                h.extend([127, 0, 0, 1]);
                h
            }
            IpAddr::V6(v6) => {
                let mut h = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
                h.extend(v6.octets());
                h.extend(std::net::Ipv6Addr::LOCALHOST.octets());
                h
            }
        }
    }

    #[test]
    fn the_program_computes_sticky_for_v4_and_v6_over_any_live_set() {
        for seed in [DEFAULT_HASH_SEED, 42, u64::MAX] {
            let hash = StickyHash::new(seed);
            for n in [1usize, 2, 3, 7, 16] {
                for down in [None, Some(0), Some(n - 1), Some(n / 2)] {
                    let live: Vec<usize> = (0..n).filter(|s| Some(*s) != down || n == 1).collect();
                    let prog = program(&hash, &live);
                    assert_eq!(prog.len(), 22 + PER_SLOT * live.len());
                    for i in 0..300u32 {
                        let v4 = IpAddr::V4(
                            (0x0a00_0000u32.wrapping_add(i.wrapping_mul(2_654_435_761))).into(),
                        );
                        let v6 = IpAddr::V6(std::net::Ipv6Addr::from(
                            0x2001_0db8_0000_0000_0000_0000_0000_0000u128
                                + u128::from(i.wrapping_mul(40_503)) * 0x1_0001,
                        ));
                        for ip in [v4, v6] {
                            let want = hash.pick(ip, n, |s| live.contains(&s)).unwrap();
                            let got = run(&prog, &header(canonical_ip(ip)));
                            assert_eq!(got, Some(want as u32), "{ip} n={n} live={live:?}");
                        }
                    }
                }
            }
        }
    }

    /// The real kernel: one reuseport group of `n` listeners on loopback, the program attached;
    /// the socket each client lands on is the slot `sticky` picks.
    #[test]
    fn the_kernel_picks_the_sticky_slot() {
        use socket2::{Domain, Socket, Type};
        use std::os::fd::AsFd;
        let n = 5;
        let hash = StickyHash::new(DEFAULT_HASH_SEED);
        let mut group: Vec<Socket> = Vec::new();
        let mut addr = "127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap();
        for _ in 0..n {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&addr.into()).unwrap();
            s.listen(64).unwrap();
            s.set_nonblocking(true).unwrap();
            addr = s.local_addr().unwrap().as_socket().unwrap();
            group.push(s);
        }
        for live in [vec![0, 1, 2, 3, 4], vec![0, 1, 3, 4]] {
            crate::sys::attach_reuseport_cbpf(group[0].as_fd(), &program(&hash, &live)).unwrap();
            for i in 0..100u32 {
                let src = IpAddr::V4(std::net::Ipv4Addr::new(
                    127,
                    3,
                    (i / 250) as u8,
                    (i % 250 + 1) as u8,
                ));
                let c = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                c.bind(&std::net::SocketAddr::new(src, 0).into()).unwrap();
                c.connect(&addr.into()).unwrap();
                let got = (0..200)
                    .find_map(|_| {
                        let hit = group.iter().position(|l| l.accept().is_ok());
                        if hit.is_none() {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                        hit
                    })
                    .expect("the connection reached a listener");
                let want = hash.pick(src, n, |s| live.contains(&s)).unwrap();
                assert_eq!(got, want, "{src} live={live:?}");
            }
        }
    }

    #[test]
    fn a_program_fits_the_kernel_limit_for_max_slots() {
        let live: Vec<usize> = (0..MAX_SLOTS).collect();
        assert!(program(&StickyHash::new(1), &live).len() <= MAX_INSNS);
    }
}
