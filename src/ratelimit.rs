//! Per-client request rate limits on a route (`rate_limit`), as nginx's `limit_req`,
//! HAProxy's stick-table rates and Envoy's local rate limit offer.
//!
//! The generic cell rate algorithm (GCRA): each client has a "theoretical arrival
//! time" (TAT) that moves one emission interval (1 / rate) later per request
//! admitted; a request is refused while the TAT is more than `burst - 1` intervals
//! ahead of now, and the refusal says how long until it would not be. One `u64` per
//! client holds it all, so the state is a fixed table of atomics shared by every
//! worker, updated by compare-and-swap: no lock, and no allocation per client.
//!
//! A slot packs a 16-bit fingerprint of the client's key with a 48-bit TAT in
//! microseconds (8.9 years of uptime). A client hashes to two slots and takes the
//! first that is its own, empty, or stale (a TAT in the past is the state of a client
//! with its whole burst available, which is also a new client's). Only when both are
//! held by clients active right now does it share the first with one of them, and so
//! its budget: with 65,536 slots that takes tens of thousands of clients active
//! within one burst's window. Owns: `RateLimiter`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::RateLimitConfig;

const SLOTS: usize = 1 << 16;
const TAT_BITS: u32 = 48;
const TAT_MASK: u64 = (1 << TAT_BITS) - 1;

/// One route's limit and the state of its clients.
#[derive(Debug)]
pub struct RateLimiter {
    pub config: RateLimitConfig,
    /// The emission interval, in microseconds (at least 1).
    interval_us: u64,
    /// How far ahead of now the TAT may be for a request to pass.
    tolerance_us: u64,
    slots: Box<[AtomicU64]>,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> RateLimiter {
        let interval_us = ((1_000_000.0 / config.requests_per_second).round() as u64).max(1);
        RateLimiter {
            interval_us,
            tolerance_us: interval_us * (config.burst.max(1) as u64 - 1),
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            config,
        }
    }

    /// Admits a request from the client whose key hashes to `key` at `now_us`
    /// (microseconds on a monotonic clock), or says how long until it would be.
    pub fn check(&self, key: u64, now_us: u64) -> Result<(), Duration> {
        let now = now_us & TAT_MASK;
        let fp = key >> TAT_BITS;
        let first = (key as usize) & (SLOTS - 1);
        let second = ((key >> 24) as usize) & (SLOTS - 1);
        for slot in [first, second] {
            if let Some(verdict) = self.try_slot(&self.slots[slot], fp, now, false) {
                return verdict;
            }
        }
        // Both held by other clients active now: share the first.
        self.try_slot(&self.slots[first], fp, now, true).unwrap_or(Ok(()))
    }

    /// `None`: the slot is another active client's (and `share` is false).
    fn try_slot(&self, slot: &AtomicU64, fp: u64, now: u64, share: bool) -> Option<Result<(), Duration>> {
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let (owner, tat) = (cur >> TAT_BITS, cur & TAT_MASK);
            let ours = owner == fp || share;
            if !ours && tat > now {
                return None;
            }
            let base = if ours { tat.max(now) } else { now };
            let ahead = base - now;
            if ahead > self.tolerance_us {
                return Some(Err(Duration::from_micros(ahead - self.tolerance_us)));
            }
            let next = (fp << TAT_BITS) | ((base + self.interval_us) & TAT_MASK);
            match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(Ok(())),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Takes over `old`'s clients (a reload that kept the route and its limit), so a
    /// reload does not hand every client a fresh burst.
    pub fn carry(&self, old: &RateLimiter) {
        for (new, old) in self.slots.iter().zip(old.slots.iter()) {
            new.store(old.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HashKey;

    fn limiter(rps: f64, burst: u32) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            requests_per_second: rps,
            burst,
            key: HashKey::ClientIp,
        })
    }

    #[test]
    fn a_burst_passes_then_one_request_per_interval() {
        let l = limiter(10.0, 5);
        let t = 1_000_000;
        for i in 0..5 {
            assert_eq!(l.check(42, t), Ok(()), "request {i} of the burst");
        }
        // The sixth waits one interval (100 ms).
        assert_eq!(l.check(42, t), Err(Duration::from_millis(100)));
        assert_eq!(l.check(42, t + 40_000), Err(Duration::from_millis(60)));
        assert_eq!(l.check(42, t + 100_000), Ok(()));
        assert!(l.check(42, t + 100_000).is_err());
        // Quiet for a while: the whole burst again, not more.
        let later = t + 10_000_000;
        for _ in 0..5 {
            assert_eq!(l.check(42, later), Ok(()));
        }
        assert!(l.check(42, later).is_err());
    }

    #[test]
    fn clients_have_budgets_of_their_own_even_on_the_same_slot() {
        let l = limiter(1.0, 1);
        let t = 5_000_000;
        // Same first slot (low bits), other fingerprints and second slots.
        let (a, b, c) = (7u64, 7u64 | (1 << 24) | (1 << 50), 7u64 | (2 << 24) | (2 << 50));
        assert_eq!(l.check(a, t), Ok(()));
        assert_eq!(l.check(b, t), Ok(()), "b takes its second slot");
        assert!(l.check(a, t).is_err() && l.check(b, t).is_err());
        // Both of c's slots are held by active clients: it shares a's budget.
        let c = c & !(0xffff << 24) | (1 << 24);
        assert!(l.check(c, t).is_err());
        // Once a's window has passed, its slot is anyone's.
        assert_eq!(l.check(c, t + 1_000_000), Ok(()));
    }

    #[test]
    fn fractional_rates_and_a_carried_state() {
        let l = limiter(0.5, 1);
        assert_eq!(l.check(1, 10_000_000), Ok(()));
        assert_eq!(l.check(1, 10_000_000), Err(Duration::from_secs(2)));
        let next = limiter(0.5, 1);
        next.carry(&l);
        assert_eq!(next.check(1, 11_000_000), Err(Duration::from_secs(1)));
    }
}
