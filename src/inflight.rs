//! Per-client limits on requests in flight on a route (`in_flight_limit`), as nginx's
//! `limit_conn` (which, over HTTP/2, counts each request as a connection), Traefik's
//! `inFlightReq` and HAProxy's `sc_conn_cur` ACLs offer: a client that holds that
//! many requests open, slow downloads or long polls, gets 429 for the next one until
//! one of them ends, so it cannot take every backend connection for itself.
//!
//! The state is a fixed table of atomics shared by every worker, as the rate limits'
//! (`ratelimit`): no lock, no allocation per client. A slot packs a 32-bit fingerprint
//! of the client's key with its count of requests in flight; a count of 0 is a free
//! slot, whoever held it last. A client hashes to two slots and counts in the one it
//! already holds, else in the first free one; only when both are held by other
//! clients with requests open does it share the first, and so that client's count.
//! With 65,536 slots that takes tens of thousands of clients with requests open at
//! once. A request gives its place back when its response has been sent (or the
//! client has gone), by the slot it took, so a reload never loses count of it.
//! Owns: `InFlightLimiter`, `InFlightSlot`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::HashKey;

const SLOTS: usize = 1 << 16;
const COUNT_MASK: u64 = u32::MAX as u64;

/// One route's limit and its clients' counts.
#[derive(Debug)]
pub struct InFlightLimiter {
    pub key: HashKey,
    /// The most requests a client may have in flight. Atomic: a reload that keeps the
    /// route (and `key`) keeps the table, whose counts are still being given back,
    /// and changes only this.
    max: AtomicU32,
    slots: Box<[AtomicU64]>,
}

/// A request's place in its client's count, given back when dropped.
#[derive(Debug)]
pub struct InFlightSlot {
    limiter: Arc<InFlightLimiter>,
    slot: u32,
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        // The count is above 0 while this place is held, so this never borrows from
        // the fingerprint.
        self.limiter.slots[self.slot as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

impl InFlightLimiter {
    pub fn new(key: HashKey, max: u32) -> InFlightLimiter {
        InFlightLimiter {
            key,
            max: AtomicU32::new(max),
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn max(&self) -> u32 {
        self.max.load(Ordering::Relaxed)
    }

    pub fn set_max(&self, max: u32) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// A place for one more request of the client whose key hashes to `key`, or
    /// `None` when it already has `max` in flight.
    pub fn acquire(self: &Arc<Self>, key: u64) -> Option<InFlightSlot> {
        let fp = key >> 32;
        let at = [(key as usize) & (SLOTS - 1), ((key >> 16) as usize) & (SLOTS - 1)];
        let max = u64::from(self.max());
        loop {
            let cur = at.map(|i| self.slots[i].load(Ordering::Relaxed));
            let held = |c: u64| c & COUNT_MASK > 0;
            // Its own slot first, so a client's requests are counted in one place.
            let pick = (0..2)
                .find(|&i| held(cur[i]) && cur[i] >> 32 == fp)
                .or_else(|| (0..2).find(|&i| !held(cur[i])))
                .unwrap_or(0);
            let c = cur[pick];
            let count = c & COUNT_MASK;
            if count >= max {
                return None;
            }
            // A free slot becomes this client's; a shared one stays its holder's.
            let owner = if count == 0 { fp } else { c >> 32 };
            let next = (owner << 32) | (count + 1);
            if self.slots[at[pick]]
                .compare_exchange_weak(c, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return Some(InFlightSlot {
                    limiter: self.clone(),
                    slot: at[pick] as u32,
                });
            }
        }
    }

    /// Requests in flight over every client (for tests and `/status`-like views).
    #[cfg(test)]
    fn total(&self) -> u64 {
        self.slots.iter().map(|s| s.load(Ordering::Relaxed) & COUNT_MASK).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(max: u32) -> Arc<InFlightLimiter> {
        Arc::new(InFlightLimiter::new(HashKey::ClientIp, max))
    }

    #[test]
    fn a_client_gets_max_places_and_one_back_per_request_ended() {
        let l = limiter(2);
        let a = l.acquire(42).expect("first");
        let b = l.acquire(42).expect("second");
        assert!(l.acquire(42).is_none(), "a third is refused");
        assert!(l.acquire(43 << 32 | 7).is_some(), "another client is not");
        drop(a);
        let c = l.acquire(42).expect("a place came back");
        assert!(l.acquire(42).is_none());
        drop((b, c));
        assert_eq!(l.total(), 0);
    }

    #[test]
    fn clients_on_the_same_slot_count_apart_until_both_slots_are_taken() {
        let l = limiter(1);
        // Same first slot (low 16 bits), other second slots and fingerprints.
        let a = 5u64 | (1 << 16) | (1 << 32);
        let b = 5u64 | (2 << 16) | (2 << 32);
        let ga = l.acquire(a).expect("a takes its first slot");
        let gb = l.acquire(b).expect("b takes its second");
        assert!(l.acquire(a).is_none() && l.acquire(b).is_none());
        // c's slots are a's first and b's second: both held, so it shares a's.
        let c = 5u64 | (2 << 16) | (3 << 32);
        assert!(l.acquire(c).is_none());
        drop(ga);
        // a's slot is free again: c takes it as its own, and a is then refused there
        // but finds its second slot.
        let gc = l.acquire(c).expect("c on the freed slot");
        let ga = l.acquire(a).expect("a on its second slot");
        drop((ga, gb, gc));
        assert_eq!(l.total(), 0);
    }

    #[test]
    fn a_client_keeps_counting_in_the_slot_it_holds() {
        let l = limiter(2);
        let other = 9u64 | (1 << 16) | (8 << 32);
        let a = 9u64 | (3 << 16) | (1 << 32);
        // `other` holds a's first slot; a counts in its second.
        let go = l.acquire(other).expect("other");
        let a1 = l.acquire(a).expect("a's first request");
        drop(go);
        // a's first slot is free now, but a has a request counted in its second: the
        // next must count there too, or a would get 2 × max.
        let a2 = l.acquire(a).expect("a's second request");
        assert!(l.acquire(a).is_none(), "max reached in one slot");
        drop((a1, a2));
    }

    #[test]
    fn a_lower_max_applies_to_places_already_held() {
        let l = limiter(3);
        let held: Vec<_> = (0..3).map(|_| l.acquire(1).expect("place")).collect();
        l.set_max(2);
        assert!(l.acquire(1).is_none());
        drop(held);
        assert!(l.acquire(1).is_some());
    }
}
