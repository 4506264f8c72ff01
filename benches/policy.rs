//! Micro-benchmark of the policy pick (the master's per-connection decision).
//! `cargo bench --bench policy`

use std::net::{IpAddr, Ipv4Addr};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lb::balance::{Balancer, DEFAULT_HASH_SEED, Policy, SlotLoad};

fn picks(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for slots in [4usize, 16, 64] {
        let loads: Vec<SlotLoad> = (0..slots)
            .map(|i| SlotLoad {
                eligible: true,
                load: (i * 7 % 13) as u64,
            })
            .collect();
        for policy in [Policy::Sticky, Policy::RoundRobin, Policy::LeastConnections] {
            let mut b = Balancer::new(policy, DEFAULT_HASH_SEED);
            let mut i = 0u32;
            g.bench_with_input(
                BenchmarkId::new(policy.as_str(), slots),
                &loads,
                |bench, loads| {
                    bench.iter(|| {
                        i = i.wrapping_add(1);
                        b.pick(
                            IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | (i & 0xffff))),
                            std::hint::black_box(loads),
                        )
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, picks);
criterion_main!(benches);
