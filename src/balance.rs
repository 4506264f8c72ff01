//! Load-balancing policies: pure functions over the slot table, no I/O.
//!
//! - **sticky**: rendezvous (highest-random-weight) hashing of the client IP over slot ids. When a
//!   slot is not eligible, only *its* clients move (each to its own next-best slot), and they come
//!   back when it returns. Never `hash % live` (PITFALLS §10).
//! - **round-robin**: the next eligible slot after the last one picked.
//! - **least-connections**: the eligible slot with the lowest load, ties broken round-robin so a
//!   burst does not pile onto one slot.
//!
//! The sticky hash is written out here, in 32-bit multiply/xor/shift steps (murmur3's `fmix32`),
//! so that a classic BPF program can compute the very same mapping in the kernel
//! (`--steering kernel`, [`crate::steering`]). The client key is the IPv4 address, or the xor of
//! an IPv6 address's four 32-bit words; slot `s`'s seed is `fmix32(seed32 ^ s·0x9E3779B1)`; its
//! weight for a client is `fmix32(key ^ slot seed)`; the highest weight wins, ties to the lower
//! slot. Golden vectors below (computed by an independent Python reference) pin the mapping.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// The default `--hash-seed`.
pub const DEFAULT_HASH_SEED: u64 = 0x6c62_5f73_7469_636b; // "lb_stick"

/// How the master picks a worker for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Client-IP rendezvous hash.
    Sticky,
    /// Next ready slot in order.
    RoundRobin,
    /// Fewest active connections.
    LeastConnections,
}

impl Policy {
    /// The name used on the command line and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sticky => "sticky",
            Self::RoundRobin => "round-robin",
            Self::LeastConnections => "least-connections",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for an unknown policy name.
#[derive(Debug, thiserror::Error)]
#[error("unknown policy `{0}` (expected sticky, round-robin or least-connections)")]
pub struct UnknownPolicy(pub String);

impl FromStr for Policy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sticky" | "ip-hash" | "source" => Ok(Self::Sticky),
            "round-robin" | "roundrobin" | "rr" => Ok(Self::RoundRobin),
            "least-connections" | "leastconn" | "least-conn" => Ok(Self::LeastConnections),
            other => Err(UnknownPolicy(other.to_owned())),
        }
    }
}

/// Canonical form of a client address for hashing: IPv4-mapped IPv6 becomes IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// murmur3's 32-bit finalizer: a bijection that spreads every input bit over the output.
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^= h >> 16;
    h
}

/// The 32-bit hash key of a canonical client address.
pub fn ip_key(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4),
        IpAddr::V6(v6) => {
            let b = u128::from(v6);
            ((b >> 96) as u32) ^ ((b >> 64) as u32) ^ ((b >> 32) as u32) ^ (b as u32)
        }
    }
}

/// Rendezvous hasher for the sticky policy.
#[derive(Debug, Clone, Copy)]
pub struct StickyHash {
    seed: u32,
}

impl StickyHash {
    /// A hasher for `seed`. Same seed ⇒ same mapping, across processes, hosts and steering modes.
    pub fn new(seed: u64) -> Self {
        Self {
            seed: (seed as u32) ^ ((seed >> 32) as u32),
        }
    }

    /// Slot `slot`'s seed (what its weight mixes with the client key).
    pub fn slot_seed(&self, slot: usize) -> u32 {
        fmix32(self.seed ^ (slot as u32).wrapping_mul(0x9E37_79B1))
    }

    /// The weight of `slot` for client `ip` (already canonical).
    pub fn weight(&self, ip: IpAddr, slot: usize) -> u32 {
        self.key_weight(ip_key(ip), slot)
    }

    /// The weight of `slot` for a 32-bit key (an IP's [`ip_key`], or a `--hash-key` key's).
    pub fn key_weight(&self, key: u32, slot: usize) -> u32 {
        fmix32(key ^ self.slot_seed(slot))
    }

    /// The eligible slot with the highest weight for `ip` (canonicalized here).
    pub fn pick(
        &self,
        ip: IpAddr,
        slots: usize,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        self.pick_key(ip_key(canonical_ip(ip)), slots, eligible)
    }

    /// The eligible slot with the highest weight for `key`.
    pub fn pick_key(
        &self,
        key: u32,
        slots: usize,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        (0..slots)
            .filter(|&s| eligible(s))
            .max_by_key(|&s| (self.key_weight(key, s), std::cmp::Reverse(s)))
    }

    /// Bounded loads (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded
    /// Loads"; HAProxy's `hash-balance-factor`): the first eligible slot in `key`'s rendezvous
    /// order that is not full, and whether the key's first choice was full. A slot is full when
    /// one more connection would take it over ⌈factor × (total + 1) / eligible slots⌉, counting
    /// the eligible slots' loads. Some slot is always below the bound (the bound times the
    /// slots exceeds the total), so an eligible slot is always found.
    pub fn pick_bounded(&self, key: u32, slots: &[SlotLoad], factor: f64) -> Option<(usize, bool)> {
        let live = slots.iter().filter(|s| s.eligible).count();
        if live == 0 {
            return None;
        }
        let total: u64 = slots.iter().filter(|s| s.eligible).map(|s| s.load).sum();
        let bound = (factor * (total + 1) as f64 / live as f64).ceil() as u64;
        let mut order: Vec<usize> = (0..slots.len()).filter(|&s| slots[s].eligible).collect();
        order.sort_unstable_by_key(|&s| {
            std::cmp::Reverse((self.key_weight(key, s), std::cmp::Reverse(s)))
        });
        let pick = order
            .iter()
            .copied()
            .find(|&s| slots[s].load < bound)
            .unwrap_or(order[0]);
        Some((pick, pick != order[0]))
    }

    /// The slot `ip` goes to when all `slots` are up.
    pub fn home(&self, ip: IpAddr, slots: usize) -> usize {
        self.pick(ip, slots, |_| true).expect("at least one slot")
    }
}

/// What a policy needs to know about one slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotLoad {
    /// May receive connections now (worker ready and not saturated).
    pub eligible: bool,
    /// Active connections (worker-reported) plus handoffs not yet confirmed.
    pub load: u64,
}

/// A policy plus the little state it carries between picks.
#[derive(Debug, Clone)]
pub struct Balancer {
    policy: Policy,
    hash: StickyHash,
    /// The slot after which round-robin (and least-connections' tie-break) continues.
    cursor: usize,
    /// `--balance-factor`.
    factor: Option<f64>,
}

impl Balancer {
    /// A balancer for `policy` with the sticky seed `seed`.
    pub fn new(policy: Policy, seed: u64) -> Self {
        Self {
            policy,
            hash: StickyHash::new(seed),
            cursor: usize::MAX,
            factor: None,
        }
    }

    /// With `--balance-factor`: sticky's loads are bounded.
    pub fn with_factor(mut self, factor: Option<f64>) -> Self {
        self.factor = factor;
        self
    }

    /// The policy in use.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// `--balance-factor`, if set.
    pub fn factor(&self) -> Option<f64> {
        self.factor
    }

    /// The sticky hasher (for `lb route` and fallbacks).
    pub fn hash(&self) -> &StickyHash {
        &self.hash
    }

    /// Picks a slot for a connection from `ip`, or `None` if no slot is eligible.
    pub fn pick(&mut self, ip: IpAddr, slots: &[SlotLoad]) -> Option<usize> {
        self.pick_key(ip_key(canonical_ip(ip)), slots)
            .map(|(s, _)| s)
    }

    /// Picks a slot for a connection whose sticky key is `key`, and says whether sticky's first
    /// choice was passed over for being full (`--balance-factor`).
    pub fn pick_key(&mut self, key: u32, slots: &[SlotLoad]) -> Option<(usize, bool)> {
        match self.policy {
            Policy::Sticky => match self.factor {
                Some(f) => self.hash.pick_bounded(key, slots, f),
                None => self
                    .hash
                    .pick_key(key, slots.len(), |s| slots[s].eligible)
                    .map(|s| (s, false)),
            },
            Policy::RoundRobin => {
                let s = self.rotation(slots.len()).find(|&s| slots[s].eligible)?;
                self.cursor = s;
                Some((s, false))
            }
            Policy::LeastConnections => {
                let mut best: Option<usize> = None;
                for s in self.rotation(slots.len()) {
                    if slots[s].eligible && best.is_none_or(|b| slots[s].load < slots[b].load) {
                        best = Some(s);
                    }
                }
                let s = best?;
                self.cursor = s;
                Some((s, false))
            }
        }
    }

    /// Slots in round-robin order, starting after the cursor.
    fn rotation(&self, n: usize) -> impl Iterator<Item = usize> {
        let start = self.cursor.wrapping_add(1);
        (0..n).map(move |i| (start.wrapping_add(i)) % n.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn all_up(n: usize) -> Vec<SlotLoad> {
        vec![
            SlotLoad {
                eligible: true,
                load: 0
            };
            n
        ]
    }

    fn ip(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | i))
    }

    #[test]
    fn golden_vectors_pin_the_sticky_mapping() {
        // If this fails, the mapping changed: clients would move between hosts or versions, and
        // the kernel's program (--steering kernel) would disagree with `lb route`. The vectors
        // come from a separate Python implementation of the same hash.
        let h = StickyHash::new(DEFAULT_HASH_SEED);
        let got: Vec<usize> = [
            "127.0.0.1",
            "127.0.0.2",
            "10.1.2.3",
            "192.168.7.9",
            "::1",
            "2001:db8::7",
        ]
        .iter()
        .map(|s| h.home(s.parse().unwrap(), 4))
        .collect();
        assert_eq!(got, GOLDEN_4);
        let got8: Vec<usize> = (1..=16).map(|i| h.home(ip(i), 8)).collect();
        assert_eq!(got8, GOLDEN_8);
        let seeded = StickyHash::new(42);
        let got_seeded: Vec<usize> = (1..=8).map(|i| seeded.home(ip(i), 4)).collect();
        assert_eq!(got_seeded, GOLDEN_SEED42);
    }

    const GOLDEN_4: [usize; 6] = [0, 2, 1, 1, 1, 0];
    const GOLDEN_8: [usize; 16] = [4, 6, 2, 0, 4, 2, 2, 5, 7, 6, 2, 4, 5, 5, 5, 0];
    const GOLDEN_SEED42: [usize; 8] = [0, 3, 2, 3, 1, 3, 1, 2];

    #[test]
    fn ipv4_mapped_ipv6_hashes_like_ipv4() {
        let h = StickyHash::new(DEFAULT_HASH_SEED);
        for i in 0..500 {
            let v4 = Ipv4Addr::from(0x0a00_0000 + i * 7919);
            let mapped = IpAddr::V6(v4.to_ipv6_mapped());
            assert_eq!(h.home(IpAddr::V4(v4), 7), h.home(mapped, 7));
        }
        // A non-mapped IPv6 address is not canonicalized.
        assert_eq!(
            canonical_ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        );
    }

    #[test]
    fn spread_is_even() {
        let h = StickyHash::new(DEFAULT_HASH_SEED);
        let mut counts = [0usize; 4];
        for i in 0..20_000 {
            counts[h.home(ip(i), 4)] += 1;
        }
        let max = *counts.iter().max().unwrap() as f64;
        assert!(max / 5000.0 < 1.05, "{counts:?}");
    }

    #[test]
    fn only_the_down_slots_keys_move_and_they_come_back() {
        let h = StickyHash::new(DEFAULT_HASH_SEED);
        let n = 8;
        let before: Vec<usize> = (0..5000).map(|i| h.home(ip(i), n)).collect();
        let down = 3;
        let during: Vec<usize> = (0..5000)
            .map(|i| h.pick(ip(i), n, |s| s != down).unwrap())
            .collect();
        let mut moved_to = [0usize; 8];
        for (b, d) in before.iter().zip(&during) {
            if *b == down {
                assert_ne!(*d, down);
                moved_to[*d] += 1;
            } else {
                assert_eq!(b, d, "a key of a live slot moved");
            }
        }
        // The down slot's keys spread over all the others, not onto one neighbour.
        assert!(
            moved_to
                .iter()
                .enumerate()
                .all(|(s, &c)| s == down || c > 0),
            "{moved_to:?}"
        );
        // Through the stateful balancer: slot 3 goes down, then comes back; its keys return.
        let mut b = Balancer::new(Policy::Sticky, DEFAULT_HASH_SEED);
        let mut slots = all_up(n);
        slots[down].eligible = false;
        let via_down: Vec<usize> = (0..5000).map(|i| b.pick(ip(i), &slots).unwrap()).collect();
        assert_eq!(via_down, during);
        slots[down].eligible = true;
        let after: Vec<usize> = (0..5000).map(|i| b.pick(ip(i), &slots).unwrap()).collect();
        assert_eq!(
            before, after,
            "the down slot's keys come back, nothing else moves"
        );
        assert_eq!(
            after.iter().filter(|&&s| s == down).count(),
            moved_to.iter().sum::<usize>()
        );
    }

    #[test]
    fn deterministic_per_seed_and_seed_matters() {
        let a = StickyHash::new(1);
        let b = StickyHash::new(1);
        let c = StickyHash::new(2);
        let va: Vec<_> = (0..100).map(|i| a.home(ip(i), 16)).collect();
        let vb: Vec<_> = (0..100).map(|i| b.home(ip(i), 16)).collect();
        let vc: Vec<_> = (0..100).map(|i| c.home(ip(i), 16)).collect();
        assert_eq!(va, vb);
        assert_ne!(va, vc);
    }

    #[test]
    fn sticky_with_nothing_eligible_is_none() {
        let mut b = Balancer::new(Policy::Sticky, 0);
        assert_eq!(b.pick(ip(1), &[SlotLoad::default(); 3]), None);
        assert_eq!(b.pick(ip(1), &[]), None);
    }

    #[test]
    fn round_robin_cycles_over_eligible_slots() {
        let mut b = Balancer::new(Policy::RoundRobin, 0);
        let mut slots = all_up(3);
        let seq: Vec<_> = (0..6).map(|_| b.pick(ip(1), &slots).unwrap()).collect();
        assert_eq!(seq, [0, 1, 2, 0, 1, 2]);
        slots[1].eligible = false;
        let seq: Vec<_> = (0..4).map(|_| b.pick(ip(1), &slots).unwrap()).collect();
        assert_eq!(seq, [0, 2, 0, 2]);
        assert_eq!(
            Balancer::new(Policy::RoundRobin, 0).pick(ip(1), &[SlotLoad::default(); 2]),
            None
        );
    }

    #[test]
    fn least_connections_prefers_lowest_load_and_rotates_ties() {
        let mut b = Balancer::new(Policy::LeastConnections, 0);
        let mut slots = all_up(3);
        slots[0].load = 5;
        slots[1].load = 1;
        slots[2].load = 3;
        assert_eq!(b.pick(ip(1), &slots), Some(1));
        // Equal loads that do not change between picks (e.g. reports not in yet): the tie is
        // broken round-robin, not by lowest index.
        let even = all_up(3);
        let mut fresh = Balancer::new(Policy::LeastConnections, 0);
        let seq: Vec<_> = (0..6).map(|_| fresh.pick(ip(1), &even).unwrap()).collect();
        assert_eq!(seq, [0, 1, 2, 0, 1, 2]);
        // A tie among the lowest only: the higher-loaded slot is never chosen.
        let mut two = all_up(3);
        two[1].load = 9;
        let seq: Vec<_> = (0..4).map(|_| fresh.pick(ip(1), &two).unwrap()).collect();
        assert!(
            seq.contains(&0) && seq.contains(&2) && !seq.contains(&1),
            "{seq:?}"
        );
        // A burst with equal loads spreads instead of piling on one slot.
        let mut ties = all_up(3);
        let seq: Vec<_> = (0..6)
            .map(|_| {
                let s = b.pick(ip(1), &ties).unwrap();
                ties[s].load += 1;
                s
            })
            .collect();
        let mut counts = [0; 3];
        seq.iter().for_each(|&s| counts[s] += 1);
        assert_eq!(counts, [2, 2, 2]);
        slots[1].eligible = false;
        assert_eq!(b.pick(ip(1), &slots), Some(2));
    }

    #[test]
    fn policy_names_round_trip() {
        for p in [Policy::Sticky, Policy::RoundRobin, Policy::LeastConnections] {
            assert_eq!(p.as_str().parse::<Policy>().unwrap(), p);
        }
        assert!(
            "fastest"
                .parse::<Policy>()
                .unwrap_err()
                .to_string()
                .contains("fastest")
        );
    }

    #[test]
    fn bounded_loads_send_a_full_home_s_keys_to_their_next_choice() {
        let h = StickyHash::new(DEFAULT_HASH_SEED);
        let key = ip_key(ip(7));
        let home = h.pick_key(key, 4, |_| true).unwrap();
        let mut slots = all_up(4);
        // 200 from one key: ⌈1.25 × 201 / 4⌉ = 63 is the most any slot reaches.
        let mut homes = 0;
        for _ in 0..200 {
            let (s, full) = h.pick_bounded(key, &slots, 1.25).unwrap();
            homes += usize::from(!full);
            assert_eq!(full, s != home);
            slots[s].load += 1;
        }
        assert!(slots.iter().all(|s| s.load <= 63), "{slots:?}");
        assert_eq!(slots[home].load, homes as u64);
        assert_eq!(slots.iter().map(|s| s.load).sum::<u64>(), 200);
        // Below the bound, the key stays home; an ineligible slot is never chosen.
        let mut slots = all_up(4);
        assert_eq!(h.pick_bounded(key, &slots, 1.25), Some((home, false)));
        slots[home].eligible = false;
        let (s, full) = h.pick_bounded(key, &slots, 1.25).unwrap();
        assert!(
            s != home && !full,
            "the first eligible choice is not 'full'"
        );
        assert_eq!(h.pick_bounded(key, &[SlotLoad::default(); 3], 1.25), None);
    }
}
