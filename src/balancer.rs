//! Backend selection: the algorithms as one enum, each lock-free so workers share it.
//!
//! - `round_robin`: smooth weighted round robin (nginx's algorithm). The sequence is
//!   computed once per config load; a pick is one atomic increment.
//! - `least_request`: power of two choices on in-flight requests divided by weight.
//! - `peak_ewma`: power of two choices on peak-EWMA latency × (in-flight + 1) / weight,
//!   as linkerd does. The default.
//! - `consistent_hash`: a ketama-style ring keyed on a header, a cookie or the client
//!   IP. Skipping an unavailable backend walks on along the ring, so a removed backend
//!   moves only its own keys.
//! - `random`: uniform over available backends (weighted).
//!
//! Which backends are available (health, ejection, retries' exclusions) is decided by
//! the caller through the `ok` predicate; this module owns only the choice.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::BalancerKind;
use crate::state::Backend;

/// Virtual nodes per unit of weight on the hash ring.
const RING_POINTS_PER_WEIGHT: u32 = 100;

#[derive(Debug)]
pub enum Balancer {
    RoundRobin { seq: Vec<u32>, next: AtomicUsize },
    LeastRequest,
    PeakEwma,
    ConsistentHash { ring: Vec<(u64, u32)> },
    Random { total_weight: u32 },
}

impl Balancer {
    pub fn new(kind: BalancerKind, backends: &[Backend]) -> Balancer {
        match kind {
            BalancerKind::RoundRobin => Balancer::RoundRobin {
                seq: smooth_wrr_sequence(&backends.iter().map(|b| b.weight).collect::<Vec<_>>()),
                next: AtomicUsize::new(fastrand::usize(..usize::MAX / 2)),
            },
            BalancerKind::LeastRequest => Balancer::LeastRequest,
            BalancerKind::PeakEwma => Balancer::PeakEwma,
            BalancerKind::ConsistentHash => Balancer::ConsistentHash {
                ring: build_ring(backends),
            },
            BalancerKind::Random => Balancer::Random {
                total_weight: backends.iter().map(|b| b.weight).sum(),
            },
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Balancer::RoundRobin { .. } => "round_robin",
            Balancer::LeastRequest => "least_request",
            Balancer::PeakEwma => "peak_ewma",
            Balancer::ConsistentHash { .. } => "consistent_hash",
            Balancer::Random { .. } => "random",
        }
    }

    /// Picks a backend index for which `ok(i)` holds. `hash` is the request's hash key
    /// (consistent hashing only; without one a random backend is chosen, as Envoy does).
    /// `now_ns` is a `state::clock_ns()` reading, for peak-EWMA's decay.
    pub fn pick(
        &self,
        backends: &[Backend],
        hash: Option<u64>,
        now_ns: u64,
        ok: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        match self {
            Balancer::RoundRobin { seq, next } => {
                let len = seq.len();
                let start = next.fetch_add(1, Ordering::Relaxed);
                (0..len).map(|k| seq[(start + k) % len] as usize).find(|&i| ok(i))
            }
            Balancer::LeastRequest => p2c(backends, ok, |a, b| {
                (
                    a.state.in_flight() as f64 / a.weight as f64,
                    b.state.in_flight() as f64 / b.weight as f64,
                )
            }),
            Balancer::PeakEwma => p2c(backends, ok, |a, b| {
                // A backend with no sample yet borrows its rival's latency, so the
                // choice falls to in-flight load and a new backend gets tried.
                let (la, lb) = match (a.state.has_latency_sample(), b.state.has_latency_sample()) {
                    (true, false) => {
                        let l = a.state.ewma_at(now_ns);
                        (l, l)
                    }
                    (false, true) => {
                        let l = b.state.ewma_at(now_ns);
                        (l, l)
                    }
                    _ => (a.state.ewma_at(now_ns), b.state.ewma_at(now_ns)),
                };
                (
                    a.state.ewma_cost(la) / a.weight as f64,
                    b.state.ewma_cost(lb) / b.weight as f64,
                )
            }),
            Balancer::ConsistentHash { ring } => match hash {
                Some(h) => ring_lookup(ring, h, ok),
                None => random_weighted(backends, total(backends), ok),
            },
            Balancer::Random { total_weight } => random_weighted(backends, *total_weight, ok),
        }
    }
}

fn total(backends: &[Backend]) -> u32 {
    backends.iter().map(|b| b.weight).sum()
}

/// A random available index: a few random probes, then a scan from a random start.
fn random_available(n: usize, ok: &dyn Fn(usize) -> bool, not: Option<usize>) -> Option<usize> {
    let good = |i: usize| Some(i) != not && ok(i);
    for _ in 0..3 {
        let i = fastrand::usize(..n);
        if good(i) {
            return Some(i);
        }
    }
    let start = fastrand::usize(..n);
    (0..n).map(|k| (start + k) % n).find(|&i| good(i))
}

/// Power of two choices: two distinct random candidates, the lower cost wins (a tie
/// goes to the first, itself random). `costs` returns both candidates' costs.
fn p2c(
    backends: &[Backend],
    ok: &dyn Fn(usize) -> bool,
    costs: impl Fn(&Backend, &Backend) -> (f64, f64),
) -> Option<usize> {
    let n = backends.len();
    let a = random_available(n, ok, None)?;
    let Some(b) = random_available(n, ok, Some(a)) else {
        return Some(a);
    };
    let (ca, cb) = costs(&backends[a], &backends[b]);
    if cb < ca {
        Some(b)
    } else {
        Some(a)
    }
}

fn random_weighted(backends: &[Backend], total_weight: u32, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
    for _ in 0..3 {
        let mut r = fastrand::u32(..total_weight.max(1));
        let i = backends
            .iter()
            .position(|b| {
                if r < b.weight {
                    true
                } else {
                    r -= b.weight;
                    false
                }
            })
            .unwrap_or(0);
        if ok(i) {
            return Some(i);
        }
    }
    random_available(backends.len(), ok, None)
}

/// nginx's smooth weighted round robin, unrolled into one period of picks.
pub fn smooth_wrr_sequence(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let w: Vec<i64> = weights.iter().map(|&x| (x / g) as i64).collect();
    let total: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut seq = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        seq.push(best as u32);
    }
    seq
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Ring points are derived from the backend's address text, so the same backend lands
/// on the same points in every process and across reloads.
fn build_ring(backends: &[Backend]) -> Vec<(u64, u32)> {
    let mut ring = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        for v in 0..b.weight * RING_POINTS_PER_WEIGHT {
            let key = format!("{}#{v}", b.addr);
            ring.push((hash64(key.as_bytes()), i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

fn ring_lookup(ring: &[(u64, u32)], h: u64, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
    if ring.is_empty() {
        return None;
    }
    let start = ring.partition_point(|&(p, _)| p < h);
    (0..ring.len())
        .map(|k| ring[(start + k) % ring.len()].1 as usize)
        .find(|&i| ok(i))
}

/// FNV-1a with a murmur3 finalizer: stable across processes and Rust versions.
pub fn hash64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_wrr_interleaves_by_weight() {
        // nginx's documented example: weights 5,1,1 give a a b a c a a.
        assert_eq!(smooth_wrr_sequence(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_wrr_sequence(&[2, 2, 2]), vec![0, 1, 2]);
    }

    #[test]
    fn ring_moves_only_the_removed_backends_keys() {
        let cfg = |addrs: &[&str]| {
            addrs
                .iter()
                .map(|a| Backend {
                    name: a.to_string(),
                    written: a.to_string(),
                    addr: a.parse().unwrap(),
                    weight: 1,
                    config_weight: 1,
                    backup: false,
                    max_in_flight: u32::MAX,
                    tls_name: None,
                    state: Default::default(),
                    sticky_id: 0,
                })
                .collect::<Vec<_>>()
        };
        let full = build_ring(&cfg(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]));
        let less = build_ring(&cfg(&["10.0.0.1:80", "10.0.0.3:80"]));
        let all = |_| true;
        let mut moved_foreign = 0;
        for k in 0..10_000u32 {
            let h = hash64(&k.to_le_bytes());
            let before = ring_lookup(&full, h, &all).unwrap();
            let after = ring_lookup(&less, h, &all).unwrap();
            // indices in `less`: 0 is .1, 1 is .3
            let before_addr = [1, 2, 3][before];
            let after_addr = [1, 3][after];
            if before_addr != 2 && before_addr != after_addr {
                moved_foreign += 1;
            }
        }
        assert_eq!(moved_foreign, 0);
    }
}
