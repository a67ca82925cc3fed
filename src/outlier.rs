//! Passive outlier ejection: every real request's outcome is evidence about its backend.
//! Consecutive connect failures, timeouts, resets (before or after the response's
//! head) and gateway errors (502/503/504, or the pool's `retry.on_status`), and
//! staying silent long after a hedge to another backend answered, eject a backend for a time that
//! doubles with each ejection in a row (±10% jitter, capped). A cap on the ejected
//! share keeps ejection from emptying a pool; the panic threshold (`state::Pool::pick`)
//! covers the rest.
//!
//! An ejected backend is put on probation: when the ejection ends, the health loop
//! probes it and only a passing probe gives it traffic again (`restore`). Even then it
//! is one failure away from re-ejection until a success resets its backoff.
//!
//! All state is atomics on `BackendState`; workers record outcomes without locks.

use std::sync::atomic::Ordering;

use http::StatusCode;

use crate::error::ProxyError;
use crate::state::{now_ms, Pool};

/// Records a failed try. Only upstream failures count against the backend; a lost
/// keep-alive race is counted in the metric but is no evidence against it.
pub fn on_failure(pool: &Pool, bi: usize, err: &ProxyError) {
    if !err.is_backend_failure() {
        if let ProxyError::NotReceived { .. } = err {
            count_error(pool, bi, err.kind());
        }
        return;
    }
    record_failure(pool, bi, err.kind());
}

/// The backend still had not sent headers well after a hedge to another backend
/// answered (see `forward::watch_primary`).
pub fn on_hedge_loss(pool: &Pool, bi: usize) {
    record_failure(pool, bi, "hedge_lost");
}

fn count_error(pool: &Pool, bi: usize, kind: &'static str) {
    pool.backends[bi].state.counters.count_error(kind);
}

fn record_failure(pool: &Pool, bi: usize, kind: &'static str) {
    count_error(pool, bi, kind);
    let backend = &pool.backends[bi];
    if pool.config.outlier.counts_outcomes {
        backend.state.outcomes.fetch_add(TRY | 1, Ordering::Relaxed);
    }
    let n = backend.state.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
    if n >= pool.config.outlier.consecutive_failures {
        try_eject(pool, bi, kind);
    }
}

/// Judges a response's status: one of the pool's `retry.on_status` (502-504 by
/// default) is recorded as a failure and returned, so the caller may retry
/// elsewhere. Any other status is not yet a success: that is recorded when the body
/// has ended whole (`state::InFlight::succeeded`).
#[inline]
pub fn on_status(pool: &Pool, bi: usize, status: StatusCode) -> Option<ProxyError> {
    if pool.config.retry.fails_on(status.as_u16()) {
        let err = ProxyError::BadStatus {
            backend: pool.backends[bi].addr,
            status: status.as_u16(),
        };
        on_failure(pool, bi, &err);
        Some(err)
    } else {
        None
    }
}

/// A response body that failed after its head was sent on to the client: reset or
/// closed mid-body (`upstream_closed`), broken framing (`bad_response`), or silent
/// past `read_timeout` (`read_timeout`).
#[cold]
pub fn on_body_failure(pool: &Pool, bi: usize, e: &std::io::Error) {
    let kind = match e.kind() {
        std::io::ErrorKind::TimedOut => "read_timeout",
        std::io::ErrorKind::InvalidData => "bad_response",
        _ => "upstream_closed",
    };
    record_failure(pool, bi, kind);
}

/// One try, in `BackendState::outcomes`.
const TRY: u64 = 1 << 32;

#[inline]
pub fn on_success(pool: &Pool, bi: usize) {
    let st = &pool.backends[bi].state;
    if pool.config.outlier.counts_outcomes {
        st.outcomes.fetch_add(TRY, Ordering::Relaxed);
    }
    if st.consecutive_failures.load(Ordering::Relaxed) != 0 {
        st.consecutive_failures.store(0, Ordering::Relaxed);
    }
    if st.ejections.load(Ordering::Relaxed) != 0 && !st.is_ejected(now_ms()) {
        // A success after an ejection ended: the backend has recovered.
        st.ejections.store(0, Ordering::Relaxed);
    }
}

/// Ejects backend `bi` now (also used when a probation probe fails).
pub fn try_eject(pool: &Pool, bi: usize, reason: &str) {
    let now = now_ms();
    let cfg = &pool.config.outlier;
    let st = &pool.backends[bi].state;
    let prev_until = st.ejected_until.load(Ordering::Relaxed);
    if prev_until > now {
        return;
    }
    let on_probation = st.probation.load(Ordering::Relaxed);
    // The cap is a share of the backends in service: one the operator drained is
    // neither ejected nor there to take the load.
    let (mut in_service, mut ejected) = (0, 0);
    for (i, b) in pool.backends.iter().enumerate() {
        if b.state.in_service() {
            in_service += 1;
            ejected += (i != bi && (b.state.is_ejected(now) || b.state.probation.load(Ordering::Relaxed))) as usize;
        }
    }
    // The first ejection in a pool is always allowed; past that, respect the cap.
    if !on_probation && ejected > 0 && (ejected + 1) * 100 > in_service * cfg.max_ejected_percent as usize {
        tracing::warn!(pool = %pool.name, backend = %pool.backends[bi].name, reason, "not ejecting: max_ejected_percent reached");
        return;
    }
    let k = st.ejections.fetch_add(1, Ordering::Relaxed).min(16);
    let base = (cfg.base_ejection.as_millis() as u64)
        .saturating_mul(1 << k)
        .min(cfg.max_ejection.as_millis() as u64);
    // ±10% jitter so backends ejected together do not return together.
    let jitter = fastrand::u64(..=base / 5).saturating_sub(base / 10);
    let until = now + base + jitter;
    if st
        .ejected_until
        .compare_exchange(prev_until, until, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        st.probation.store(true, Ordering::Relaxed);
        // One short of the threshold: a single failure after return re-ejects.
        st.consecutive_failures
            .store(cfg.consecutive_failures.saturating_sub(1), Ordering::Relaxed);
        tracing::warn!(pool = %pool.name, backend = %pool.backends[bi].name, reason, ejection_ms = until - now, ejections = k + 1, "backend ejected");
        st.counters.ejections.fetch_add(1, Ordering::Relaxed);
    }
}

/// Called by the control loop once per `outlier.interval`, with the tries each
/// backend had since the last call (read and reset together, so both judgments see
/// one window):
///
/// - `failure_percentage` (Envoy's failure-percentage detection) ejects each backend
///   whose failed tries reach the percentage, out of at least
///   `failure_percentage_min_requests`. It catches the backend that fails one request
///   in five, say, which consecutive failures rarely eject: they take a run of
///   failures in a row.
/// - `success_rate_stdev_factor` (Envoy's success-rate detection) ejects each backend
///   whose success rate is more than that many standard deviations below the mean of
///   the backends with at least `success_rate_min_requests` tries, when there are at
///   least `success_rate_min_hosts` of them. It needs no threshold: a backend is
///   judged against its peers, so a pool whose every backend fails alike (a bad
///   database behind them all) loses none.
///
/// The ejections are `try_eject`'s, with its cap and backoff.
pub fn judge(pool: &Pool) {
    let cfg = &pool.config.outlier;
    let counts: Vec<(u64, u64)> = pool
        .backends
        .iter()
        .map(|b| {
            let w = b.state.outcomes.swap(0, Ordering::Relaxed);
            (w >> 32, w & (TRY - 1))
        })
        .collect();
    if let Some(threshold) = cfg.failure_percentage {
        for (bi, &(tries, failures)) in counts.iter().enumerate() {
            if tries >= u64::from(cfg.failure_percentage_min_requests) && failures * 100 >= u64::from(threshold) * tries
            {
                tracing::warn!(pool = %pool.name, backend = %pool.backends[bi].name, tries, failures, "failure percentage reached");
                try_eject(pool, bi, "failure_percentage");
            }
        }
    }
    if let Some(factor) = cfg.success_rate_stdev_factor {
        for (bi, rate, mean, floor) in success_rate_outliers(
            &counts,
            cfg.success_rate_min_requests,
            cfg.success_rate_min_hosts,
            factor,
        ) {
            tracing::warn!(pool = %pool.name, backend = %pool.backends[bi].name, rate, mean, floor, "success rate below the pool's");
            try_eject(pool, bi, "success_rate");
        }
    }
}

/// The backends (index, success rate %, the pool's mean, the floor) whose success
/// rate, of `(tries, failures)`, is below the mean by more than `factor` standard
/// deviations, among those with `min_requests` tries, if `min_hosts` have them.
fn success_rate_outliers(
    counts: &[(u64, u64)],
    min_requests: u32,
    min_hosts: u32,
    factor: f64,
) -> Vec<(usize, f64, f64, f64)> {
    let rates: Vec<(usize, f64)> = counts
        .iter()
        .enumerate()
        .filter(|(_, (tries, _))| *tries >= u64::from(min_requests).max(1))
        .map(|(bi, &(tries, failures))| (bi, (tries - failures.min(tries)) as f64 * 100.0 / tries as f64))
        .collect();
    if rates.len() < min_hosts as usize {
        return Vec::new();
    }
    let n = rates.len() as f64;
    let mean = rates.iter().map(|r| r.1).sum::<f64>() / n;
    let stdev = (rates.iter().map(|r| (r.1 - mean).powi(2)).sum::<f64>() / n).sqrt();
    let floor = mean - factor * stdev;
    rates
        .into_iter()
        .filter(|&(_, rate)| rate < floor)
        .map(|(bi, rate)| (bi, rate, mean, floor))
        .collect()
}

/// A probation probe passed after the ejection ended: traffic may return.
pub fn restore(pool: &Pool, bi: usize) {
    let st = &pool.backends[bi].state;
    if st.probation.swap(false, Ordering::Relaxed) {
        st.ramp_from.store(now_ms(), Ordering::Relaxed);
        tracing::info!(pool = %pool.name, backend = %pool.backends[bi].name, "probe passed: backend restored");
        st.counters.restores.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{AdminState, Snapshot};
    use std::sync::Arc;

    #[test]
    fn a_success_rate_is_judged_against_the_pool_s_mean() {
        // Four at 100% and one at 0%: mean 80, deviation 40, floor 80 - 1.9 * 40 = 4.
        let counts = [(100, 0), (100, 0), (100, 0), (100, 0), (100, 100)];
        let out = success_rate_outliers(&counts, 100, 5, 1.9);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].0, out[0].1, out[0].2), (4, 0.0, 80.0));
        assert!((out[0].3 - 4.0).abs() < 1e-9);
        // A factor of 2.1 puts the floor below 0: no one.
        assert!(success_rate_outliers(&counts, 100, 5, 2.1).is_empty());
        // Too few backends with enough tries: no judgment.
        assert!(success_rate_outliers(&counts, 101, 5, 1.9).is_empty());
        assert!(success_rate_outliers(&counts[..4], 100, 5, 1.9).is_empty());
        // All failing alike: no deviation, no one below the mean.
        assert!(success_rate_outliers(&[(50, 25); 6], 10, 5, 1.9).is_empty());
    }

    #[test]
    fn the_ejection_cap_is_a_share_of_the_backends_in_service() {
        let toml = "[[listeners]]\nbind = \"127.0.0.1:0\"\n[[routes]]\npool = \"app\"\n[pools.app]\nbackends = [\"127.0.0.1:1\", \"127.0.0.1:2\", \"127.0.0.1:3\", \"127.0.0.1:4\"]\n";
        let snap = Snapshot::build(Arc::new(crate::config::Config::parse(toml, "t").unwrap()), None);
        let pool = &snap.pools[0];
        let now = now_ms();
        pool.backends[0].state.set_admin_state(AdminState::Drain);
        pool.backends[1].state.set_admin_state(AdminState::Maint);
        try_eject(pool, 2, "test");
        assert!(pool.backends[2].state.is_ejected(now));
        // Ejecting the other would take the last backend in service (2 of 2 over
        // the 50% cap; counting the four, 2 of 4 would pass).
        try_eject(pool, 3, "test");
        assert!(!pool.backends[3].state.is_ejected(now));
    }
}
