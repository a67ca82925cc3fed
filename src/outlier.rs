//! Passive outlier ejection: every real request's outcome is evidence about its backend.
//! Consecutive connect failures, timeouts, resets and gateway errors (502/503/504) eject
//! a backend for a time that doubles with each repeated ejection (with jitter, capped).
//! A cap on the ejected share keeps ejection from emptying a pool.
//!
//! All state is atomics on `BackendState`; workers record outcomes without locks. When
//! an ejection ends the backend is not trusted at once: the first failure after it
//! returns ejects it again (the consecutive count is left one short of the threshold).

use std::sync::atomic::Ordering;

use http::StatusCode;

use crate::error::ProxyError;
use crate::state::{now_ms, Pool};

/// Consecutive failures that eject a backend (HAProxy's fall is 3, Envoy's 5xx run 5;
/// real traffic gives evidence fast, so 3).
pub const CONSECUTIVE_FAILURES: u32 = 3;
/// First ejection length; doubles for each ejection in a row.
pub const BASE_EJECTION_MS: u64 = 2_000;
/// Longest ejection.
pub const MAX_EJECTION_MS: u64 = 60_000;
/// At most this share of a pool is ejected at once (Envoy's max_ejection_percent).
pub const MAX_EJECTED_PERCENT: usize = 50;

/// Records a failed try. Only upstream failures count against the backend.
pub fn on_failure(pool: &Pool, bi: usize, err: &ProxyError) {
    if !err.is_backend_failure() {
        return;
    }
    let backend = &pool.backends[bi];
    metrics::counter!(crate::metrics::UPSTREAM_ERRORS, "pool" => pool.name.clone(), "backend" => backend.name.clone(), "kind" => err.kind()).increment(1);
    let n = backend.state.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
    if n >= CONSECUTIVE_FAILURES {
        try_eject(pool, bi, err.kind());
    }
}

/// Records a response. Returns the gateway error when the status says the backend is
/// failing, so the caller may retry elsewhere.
pub fn on_response(pool: &Pool, bi: usize, status: StatusCode) -> Option<ProxyError> {
    let backend = &pool.backends[bi];
    if matches!(status.as_u16(), 502..=504) {
        let err = ProxyError::BadStatus {
            backend: backend.addr,
            status: status.as_u16(),
        };
        on_failure(pool, bi, &err);
        Some(err)
    } else {
        let st = &backend.state;
        if st.consecutive_failures.load(Ordering::Relaxed) != 0 {
            st.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if st.ejections.load(Ordering::Relaxed) != 0 && !st.is_ejected(now_ms()) {
            // A success after an ejection ended: the backend has recovered.
            st.ejections.store(0, Ordering::Relaxed);
        }
        None
    }
}

fn try_eject(pool: &Pool, bi: usize, reason: &'static str) {
    let now = now_ms();
    let st = &pool.backends[bi].state;
    if st.is_ejected(now) {
        return;
    }
    let ejected = pool.backends.iter().filter(|b| b.state.is_ejected(now)).count();
    if (ejected + 1) * 100 > pool.backends.len() * MAX_EJECTED_PERCENT.max(1) && ejected + 1 > 1 {
        tracing::warn!(pool = %pool.name, backend = %pool.backends[bi].name, reason, "not ejecting: max ejected share reached");
        return;
    }
    let k = st.ejections.fetch_add(1, Ordering::Relaxed).min(16);
    let base = BASE_EJECTION_MS.saturating_mul(1 << k).min(MAX_EJECTION_MS);
    // ±10% jitter so backends ejected together do not return together.
    let jitter = fastrand::u64(..=base / 5).saturating_sub(base / 10);
    let until = now + base + jitter;
    if st
        .ejected_until
        .compare_exchange(
            st.ejected_until.load(Ordering::Relaxed),
            until,
            Ordering::Relaxed,
            Ordering::Relaxed,
        )
        .is_ok()
    {
        // Back one short of the threshold: a single failure on return re-ejects.
        st.consecutive_failures
            .store(CONSECUTIVE_FAILURES - 1, Ordering::Relaxed);
        tracing::warn!(pool = %pool.name, backend = %pool.backends[bi].name, reason, ejection_ms = until - now, "backend ejected");
    }
}
