//! Circuit breakers per pool: caps on open connections, requests waiting for a
//! connection, requests in flight and retries in flight. Past a cap the request gets a
//! fast 503 with `Retry-After` instead of queueing into a timeout. Counters are atomics
//! shared by all workers; a guard gives each slot back when dropped.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::config::BreakerConfig;

#[derive(Debug, Default)]
pub struct Breakers {
    pub connections: AtomicU32,
    pub pending: AtomicU32,
    pub requests: AtomicU32,
    pub retries: AtomicU32,
}

/// Which limit tripped, for the error and its metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections,
    Pending,
    Requests,
    Retries,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Connections => "max_connections",
            Limit::Pending => "max_pending",
            Limit::Requests => "max_requests",
            Limit::Retries => "max_retries",
        }
    }
}

impl Breakers {
    fn counter(&self, l: Limit) -> &AtomicU32 {
        match l {
            Limit::Connections => &self.connections,
            Limit::Pending => &self.pending,
            Limit::Requests => &self.requests,
            Limit::Retries => &self.retries,
        }
    }

    /// Takes a slot under `limit`, or says which breaker is open.
    pub fn acquire(self: &Arc<Self>, l: Limit, cfg: &BreakerConfig) -> Result<Slot, Limit> {
        let max = match l {
            Limit::Connections => cfg.max_connections,
            Limit::Pending => cfg.max_pending,
            Limit::Requests => cfg.max_requests,
            Limit::Retries => cfg.max_retries,
        };
        let c = self.counter(l);
        if c.fetch_add(1, Ordering::Relaxed) >= max {
            c.fetch_sub(1, Ordering::Relaxed);
            return Err(l);
        }
        Ok(Slot {
            breakers: self.clone(),
            limit: l,
        })
    }

    pub fn current(&self, l: Limit) -> u32 {
        self.counter(l).load(Ordering::Relaxed)
    }
}

/// One taken slot; returned on drop.
#[derive(Debug)]
pub struct Slot {
    breakers: Arc<Breakers>,
    limit: Limit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.breakers.counter(self.limit).fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_and_returned() {
        let b = Arc::new(Breakers::default());
        let cfg = BreakerConfig {
            max_connections: 1,
            max_pending: 1,
            max_requests: 2,
            max_retries: 0,
        };
        let s1 = b.acquire(Limit::Requests, &cfg).unwrap();
        let _s2 = b.acquire(Limit::Requests, &cfg).unwrap();
        assert_eq!(b.acquire(Limit::Requests, &cfg).unwrap_err(), Limit::Requests);
        drop(s1);
        assert!(b.acquire(Limit::Requests, &cfg).is_ok());
        assert!(
            b.acquire(Limit::Retries, &cfg).is_err(),
            "max_retries = 0 disables retries"
        );
        assert_eq!(b.current(Limit::Retries), 0);
    }
}
