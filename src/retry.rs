//! Retry policy: which failures are safe to retry, on which methods, how many tries, and
//! the body replay limit. A retry always goes to a *different* backend.
//!
//! - Any method: connect failures, requests never written (a pooled connection the
//!   backend had closed), and requests written onto a connection the backend closed
//!   with them unread (`ProxyError::NotReceived`). None reached the
//!   application. The last needs the body again, so small bodies of every method are
//!   buffered up front (`retry.max_replay_bytes`), as nginx does by default.
//! - Idempotent methods (or `Idempotency-Key`) only: resets, response timeouts and
//!   502/503/504 (the pool's `retry.on_status`), because the application may have
//!   seen the request.
//!
//! Also here: the retry budget (retries after a send and hedges may add at most
//! `budget_percent` of load plus `budget_min_per_sec`), the adaptive hedge delay
//! (the pool's recent p95 latency), and jittered backoff.
//!
//! This module owns the decision; `forward.rs` owns the loop.

use std::rc::Rc;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body::Body;
use http_body_util::BodyExt;

use crate::body::{InBody, ReqBody, ReqBodyError, StreamBody};
use crate::codec::UpHead;
use crate::config::PoolConfig;
use crate::error::ProxyError;
use crate::state::Pool;
use crate::upstream::UpRequest;

pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether the request may be sent again after it was written: an idempotent method,
/// or a client-supplied `Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header;
/// Go's net/http honours it the same way), which says the server deduplicates.
pub fn is_replay_safe(m: &Method, headers: &HeaderMap) -> bool {
    is_idempotent(m) || headers.contains_key("idempotency-key")
}

/// Chooses how the body travels: replayable bytes when it is empty or small (so any
/// request can be resent after a failure that provably did not reach the application,
/// and an idempotent one after any retryable failure), otherwise a stream. A chunked
/// body of unknown length streams.
pub async fn prepare_body(
    body: InBody,
    content_length: Option<u64>,
    limit: Option<u64>,
    pool: &PoolConfig,
    idle: Duration,
    // Tries and the bound on each wait for the backend to take more of a streamed body.
    policy: crate::forward::TryPolicy,
    // The access log's count of the body's bytes, for `$request_length`.
    counted: Option<std::rc::Rc<std::cell::Cell<u64>>>,
) -> Result<ReqBody, ProxyError> {
    let try_timeout = policy.timeout;
    // A body is kept for replay when a retry may happen and it is small enough.
    let kept = |len: u64| policy.attempts > 1 && len <= pool.retry.max_replay_bytes;
    let incoming = match body {
        InBody::Empty => return Ok(ReqBody::empty()),
        InBody::Full(b) if b.is_empty() => return Ok(ReqBody::empty()),
        // Its length is its Content-Length, already checked against `limit`.
        InBody::Full(b) if kept(b.len() as u64) => return Ok(ReqBody::Buffered(Some(b))),
        InBody::Full(b) => return Ok(ReqBody::Stream(Box::new(StreamBody::once(b, try_timeout)))),
        InBody::Incoming(i) if i.is_end_stream() => return Ok(ReqBody::empty()),
        InBody::Incoming(i) => i,
    };
    let mut stream = StreamBody::new(incoming, limit, idle, try_timeout, counted);
    if let Some(len) = content_length.filter(|&l| kept(l)) {
        let cap = limit.map_or(len, |l| l.min(len)) as usize;
        if let Some(bytes) = collect_limited(&mut stream, cap).await? {
            return Ok(ReqBody::Buffered(Some(bytes)));
        }
        return Err(ProxyError::BadRequest("request body longer than its Content-Length"));
    }
    Ok(ReqBody::Stream(Box::new(stream)))
}

/// Reads a whole small body for replay; `None` when it is longer than `limit`.
async fn collect_limited(body: &mut StreamBody, limit: usize) -> Result<Option<Bytes>, ProxyError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ReqBodyError::into_proxy_error)?;
        if let Some(d) = frame.data_ref() {
            if buf.len() + d.len() > limit {
                return Ok(None);
            }
            buf.extend_from_slice(d);
        }
    }
    Ok(Some(buf.freeze()))
}

/// What a replay needs: the shared request head and the buffered body.
struct Template {
    head: Rc<UpHead>,
    body: Option<Bytes>,
}

/// The state of one request's tries.
pub struct Attempts {
    tried: Vec<usize>,
    last: Option<ProxyError>,
    template: Option<Template>,
    idempotent: bool,
    max_tries: usize,
}

impl Attempts {
    /// `attempts`: tries in all (`TryPolicy::attempts`).
    pub fn new(pool: &Pool, req: &UpRequest, attempts: u32) -> Attempts {
        let idempotent = is_replay_safe(&req.head.method, &req.head.headers);
        let max_tries = (attempts as usize).min(pool.backends.len());
        let template = match &req.body {
            ReqBody::Buffered(b) if max_tries > 1 => Some(Template {
                head: req.head.clone(),
                body: b.clone(),
            }),
            _ => None,
        };
        Attempts {
            tried: Vec::new(),
            last: None,
            template,
            idempotent,
            max_tries,
        }
    }

    pub fn tried(&self) -> &[usize] {
        &self.tried
    }

    /// How many tries have failed so far.
    pub fn failures(&self) -> usize {
        self.tried.len()
    }

    /// Replay-safe by method (or `Idempotency-Key`), whether or not a copy is kept.
    pub fn idempotent(&self) -> bool {
        self.idempotent
    }

    /// Whether the request can be sent again after the application may have seen it:
    /// replay-safe and its body kept.
    pub fn replayable(&self) -> bool {
        self.idempotent && self.template.is_some()
    }

    /// Marks a backend as used without a failure (a hedge's target).
    pub fn mark_tried(&mut self, bi: usize) {
        if !self.tried.contains(&bi) {
            self.tried.push(bi);
        }
    }

    /// Room for one more try after those recorded.
    pub fn has_tries_left(&self) -> bool {
        self.tried.len() < self.max_tries
    }

    /// A fresh copy of the request for another try, when its body was kept. Whether
    /// it may be sent is `failed`'s decision.
    pub fn replay(&self) -> Option<UpRequest> {
        let t = self.template.as_ref()?;
        Some(UpRequest {
            head: t.head.clone(),
            body: ReqBody::Buffered(t.body.clone()),
        })
    }

    /// Records a failed try on backend `bi`. Returns whether another try is allowed;
    /// `have_request` says the request is in hand and no application saw it: nothing
    /// of it was written (whatever the error, such as a connection reset before the
    /// first byte), or it is the kept copy of one provably never read.
    pub fn failed(&mut self, bi: usize, err: ProxyError, have_request: bool) -> bool {
        self.mark_tried(bi);
        let safe = have_request
            || (self.template.is_some()
                && (err.is_retryable_any_method() || (self.idempotent && err.is_retryable_idempotent())));
        let again = safe && self.tried.len() < self.max_tries;
        if again {
            tracing::warn!(backend = %err.backend().map_or_else(|| "-".to_string(), |b| b.to_string()), error = %err, "attempt failed; retrying on another backend");
        }
        self.last = Some(err);
        again
    }

    pub fn into_error(self, pool: &Pool) -> ProxyError {
        self.last.unwrap_or_else(|| ProxyError::NoHealthyBackend {
            pool: pool.name.clone(),
        })
    }
}

/// A retry budget shared by all workers: each request deposits `percent`/100 of a
/// token, each budgeted retry or hedge withdraws one; the control loop adds
/// `min_per_sec` tokens a second. Balances are in thousandths of a token.
#[derive(Debug)]
pub struct RetryBudget {
    balance: AtomicI64,
    deposit: i64,
    min_per_sec: i64,
    cap: i64,
}

impl RetryBudget {
    pub fn new(percent: u32, min_per_sec: u32) -> RetryBudget {
        let cap = (min_per_sec as i64 * 10 + 100) * 1000;
        RetryBudget {
            balance: AtomicI64::new(min_per_sec as i64 * 1000),
            deposit: percent as i64 * 10,
            min_per_sec: min_per_sec as i64,
            cap,
        }
    }

    pub fn deposit(&self) {
        if self.deposit > 0 && self.balance.load(Ordering::Relaxed) < self.cap {
            self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    pub fn try_withdraw(&self) -> bool {
        if self.balance.fetch_sub(1000, Ordering::Relaxed) >= 1000 {
            true
        } else {
            self.balance.fetch_add(1000, Ordering::Relaxed);
            false
        }
    }

    /// Called by the control loop; `elapsed` since the last refill.
    pub fn refill(&self, elapsed: Duration) {
        let add = (self.min_per_sec as f64 * 1000.0 * elapsed.as_secs_f64()) as i64;
        if self.balance.load(Ordering::Relaxed) < self.cap {
            self.balance.fetch_add(add, Ordering::Relaxed);
        }
    }

    pub fn tokens(&self) -> f64 {
        self.balance.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// Takes over `old`'s balance (a reload or DNS update replaced the pool), within
    /// this budget's cap: retries spent just before a reload stay spent.
    pub fn carry(&self, old: &RetryBudget) {
        let b = old.balance.load(Ordering::Relaxed).min(self.cap);
        self.balance.store(b, Ordering::Relaxed);
    }
}

/// Hedge delay bounds for `hedge_delay = "auto"`: never hedge sooner than this (a
/// hedge is extra load), and until there are samples, use the default.
pub const HEDGE_MIN_DELAY: Duration = Duration::from_millis(25);
pub const HEDGE_DEFAULT_DELAY: Duration = Duration::from_millis(50);
const LATENCY_BUCKETS: usize = 32;

/// Recent response latencies of a pool in log2 microsecond buckets, decayed by the
/// control loop, which also publishes the p95 used as the adaptive hedge delay.
#[derive(Debug)]
pub struct LatencyTracker {
    buckets: [AtomicU32; LATENCY_BUCKETS],
    p95_us: AtomicU64,
}

impl Default for LatencyTracker {
    fn default() -> Self {
        LatencyTracker {
            buckets: std::array::from_fn(|_| AtomicU32::new(0)),
            p95_us: AtomicU64::new(0),
        }
    }
}

impl LatencyTracker {
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = (64 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Recomputes the p95 (the upper edge of its bucket) and halves the counts, so
    /// the estimate follows the last few seconds.
    pub fn update(&self) {
        let counts: Vec<u32> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().map(|&c| c as u64).sum();
        if total >= 20 {
            let target = (total * 95).div_ceil(100);
            let mut seen = 0u64;
            for (i, &c) in counts.iter().enumerate() {
                seen += c as u64;
                if seen >= target {
                    self.p95_us.store(1u64 << i, Ordering::Relaxed);
                    break;
                }
            }
        }
        for b in &self.buckets {
            let v = b.load(Ordering::Relaxed);
            b.fetch_sub(v - v / 2, Ordering::Relaxed);
        }
    }

    /// Takes over `old`'s samples and estimate (a reload or DNS update replaced the
    /// pool), so the adaptive hedge delay does not fall back to its default.
    pub fn carry(&self, old: &LatencyTracker) {
        for (new, old) in self.buckets.iter().zip(&old.buckets) {
            new.store(old.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.p95_us.store(old.p95_us.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    pub fn p95(&self) -> Option<Duration> {
        match self.p95_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// The adaptive hedge delay: the recent p95, at least `HEDGE_MIN_DELAY`, at most
    /// half the response timeout.
    pub fn hedge_delay(&self, response_timeout: Duration) -> Duration {
        self.p95()
            .unwrap_or(HEDGE_DEFAULT_DELAY)
            .max(HEDGE_MIN_DELAY)
            .min(response_timeout / 2)
    }
}

/// Full-jitter exponential backoff before retry number `n` (1-based).
pub fn backoff(base: Duration, max: Duration, n: usize) -> Duration {
    let cap = base.saturating_mul(1u32 << (n.saturating_sub(1)).min(16)).min(max);
    Duration::from_micros(fastrand::u64(..=cap.as_micros() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Uri;
    use std::sync::Arc;

    #[test]
    fn budget_and_latency_carry_over_to_a_replacing_pool() {
        let old = RetryBudget::new(20, 10);
        while old.try_withdraw() {}
        let new = RetryBudget::new(20, 10);
        assert!(new.tokens() >= 10.0);
        new.carry(&old);
        assert!(new.tokens() < 1.0, "spent retries came back: {}", new.tokens());
        // Within the new cap: a budget made smaller does not keep the old surplus.
        let rich = RetryBudget::new(20, 1000);
        let small = RetryBudget::new(20, 1);
        small.carry(&rich);
        assert!(small.tokens() <= small.cap as f64 / 1000.0);

        let seen = LatencyTracker::default();
        for _ in 0..40 {
            seen.record(Duration::from_millis(3));
        }
        seen.update();
        let fresh = LatencyTracker::default();
        assert_eq!(fresh.p95(), None);
        fresh.carry(&seen);
        assert_eq!(fresh.p95(), seen.p95());
        assert!(fresh.p95().is_some());
    }

    #[test]
    fn budget_allows_its_share_and_refills() {
        let b = RetryBudget::new(20, 0);
        assert!(!b.try_withdraw(), "empty budget allows nothing");
        for _ in 0..10 {
            b.deposit();
        }
        assert!(b.try_withdraw(), "10 requests at 20% earn 2 retries");
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
        let m = RetryBudget::new(0, 10);
        assert!((m.tokens() - 10.0).abs() < 1e-9);
        m.refill(Duration::from_millis(500));
        assert!((m.tokens() - 15.0).abs() < 1e-9);
    }

    #[test]
    fn hedge_delay_follows_the_p95_within_bounds() {
        let t = LatencyTracker::default();
        let timeout = Duration::from_secs(30);
        assert_eq!(t.hedge_delay(timeout), HEDGE_DEFAULT_DELAY);
        for _ in 0..95 {
            t.record(Duration::from_millis(1));
        }
        for _ in 0..5 {
            t.record(Duration::from_millis(300));
        }
        t.update();
        assert_eq!(t.hedge_delay(timeout), HEDGE_MIN_DELAY, "fast pool: floor");
        for _ in 0..100 {
            t.record(Duration::from_millis(100));
        }
        t.update();
        let d = t.hedge_delay(timeout);
        assert!(
            d >= Duration::from_millis(100) && d <= Duration::from_millis(262),
            "{d:?}"
        );
    }

    #[test]
    fn backoff_is_capped() {
        for n in 1..20 {
            assert!(backoff(Duration::from_millis(2), Duration::from_millis(50), n) <= Duration::from_millis(50));
        }
    }

    fn pool() -> Arc<Pool> {
        let text = include_str!("../conf/minimal.toml");
        let config = crate::Config::parse(text, "minimal.toml").expect("valid");
        crate::state::Snapshot::build(Arc::new(config), None).pools[0].clone()
    }

    fn post() -> UpRequest {
        UpRequest {
            head: Rc::new(UpHead {
                method: Method::POST,
                uri: Uri::from_static("/order"),
                headers: HeaderMap::new(),
                raw: None,
                added: crate::codec::AddedFields::default(),
                raw_response: true,
            }),
            body: ReqBody::Buffered(Some(Bytes::from_static(b"order=1"))),
        }
    }

    #[test]
    fn a_post_the_backend_never_received_is_resent_but_one_it_may_have_read_is_not() {
        let pool = pool();
        let addr = "127.0.0.1:1".parse().unwrap();
        let mut a = Attempts::new(&pool, &post(), pool.config.retry.attempts);
        assert!(!a.replayable(), "a POST is not replay-safe");
        assert!(
            a.failed(0, ProxyError::NotReceived { backend: addr }, false),
            "never received: safe for any method"
        );
        let again = a.replay().expect("the small body was kept");
        assert_eq!(again.head.method, Method::POST);
        assert!(matches!(&again.body, ReqBody::Buffered(Some(b)) if b.len() == 7));
        assert!(
            !a.failed(1, ProxyError::ResponseTimeout { backend: addr }, false),
            "the backend may have read it: never sent twice"
        );
        // Reset before a byte of it was written: the request is still in hand.
        let mut a = Attempts::new(&pool, &post(), pool.config.retry.attempts);
        let reset = || std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(
            a.failed(
                0,
                ProxyError::UpstreamClosed {
                    backend: addr,
                    source: reset()
                },
                true
            ),
            "unwritten: safe for any method"
        );
        assert!(
            !a.failed(
                1,
                ProxyError::UpstreamClosed {
                    backend: addr,
                    source: reset()
                },
                false
            ),
            "written, may have been read: not sent twice"
        );
        let mut a = Attempts::new(&pool, &post(), pool.config.retry.attempts);
        assert!(!a.failed(
            0,
            ProxyError::BadStatus {
                backend: addr,
                status: 502
            },
            false
        ));
    }

    #[test]
    fn idempotent_methods_follow_rfc_9110() {
        for m in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE, Method::OPTIONS] {
            assert!(is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH] {
            assert!(!is_idempotent(&m), "{m}");
        }
        let mut h = HeaderMap::new();
        assert!(!is_replay_safe(&Method::POST, &h));
        h.insert(
            "idempotency-key",
            "8e03978e-40d5-43e8-bc93-6894a57f9324".parse().unwrap(),
        );
        assert!(
            is_replay_safe(&Method::POST, &h),
            "an Idempotency-Key makes a POST replayable"
        );
    }
}
