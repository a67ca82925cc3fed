//! The live snapshot every worker reads: routes, pools, backends. Built from a validated
//! `Config`; swapped whole on reload through an `ArcSwap`, so a request sees one
//! consistent picture and the hot path takes no locks.
//!
//! Backend state (health, ejection, in-flight, latency) lives in `BackendState` behind
//! an `Arc` and is carried over to the next snapshot for every backend a reload did not
//! remove, so a reload neither forgets an ejection nor drops pooled connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};

use rustls::pki_types::ServerName;

use crate::backend_tls::BackendTlsSpec;
use crate::balancer::Balancer;
use crate::breaker::Breakers;
use crate::config::{BalancerKind, Config, PoolConfig, RouteConfig};
use crate::inflight::InFlightLimiter;
use crate::metrics::PoolMetrics;
use crate::ratelimit::RateLimiter;
use crate::retry::{LatencyTracker, RetryBudget};
use crate::router::Router;

/// Milliseconds on a process-wide monotonic clock; 1 is process start (0 means
/// "never" in the timestamps kept in atomics).
pub fn now_ms() -> u64 {
    ms_of(clock_ns())
}

/// `now_ms()` for a `clock_ns()` reading, so one clock read can serve both.
pub fn ms_of(ns: u64) -> u64 {
    (ns - 1) / 1_000_000 + 1
}

/// Latency assumed for a backend with no samples yet, so new backends get tried.
const DEFAULT_RTT_NS: f64 = 1_000_000.0;
/// Peak-EWMA decay window, as in linkerd.
const EWMA_DECAY_NS: f64 = 10_000_000_000.0;

/// Shared, lock-free state of one backend, carried across reloads.
#[derive(Debug)]
pub struct BackendState {
    /// Unique per process; keys the workers' connection pools.
    pub id: u64,
    /// Active health-check verdict. Starts healthy so traffic flows at once.
    pub healthy: AtomicBool,
    /// Passive ejection deadline on the `now_ms` clock; 0 when not ejected.
    pub ejected_until: AtomicU64,
    /// How many times in a row the backend has been ejected, for backoff.
    pub ejections: AtomicU32,
    pub consecutive_failures: AtomicU32,
    /// Set on ejection; the health loop clears it after a successful probe once the
    /// ejection ends, so a returning backend is probed before it gets traffic.
    pub probation: AtomicBool,
    /// Slow start: when the backend (re)gained traffic, on the `now_ms` clock; 0 = none.
    pub ramp_from: AtomicU64,
    /// Active checks passed and failed in a row (`rise`, `fall`). Here, not in the
    /// check loop, so a reload or DNS update, which restarts the loops, does not
    /// start the count again (only the health loop writes them).
    pub check_passes: AtomicU32,
    pub check_failures: AtomicU32,
    /// With `outlier.failure_percentage` or `success_rate_stdev_factor`: tries (high
    /// 32 bits) and failed tries (low 32) since the control loop last judged the
    /// backend, which swaps it to 0 (`outlier::judge`).
    pub outcomes: AtomicU64,
    in_flight: AtomicU32,
    ewma_ns: AtomicU64,
    ewma_stamp_ns: AtomicU64,
    /// Errors, ejections and restores, for `/metrics`.
    pub counters: BackendCounters,
    /// What an operator set through the admin API (`AdminState`, as `u8`).
    admin: std::sync::atomic::AtomicU8,
    /// A weight an operator set through the admin API, in the low 32 bits, and the
    /// configured weight it was set against in the high 32; 0 when none is set. The
    /// snapshot's balancers are built from it (`Snapshot::build`), and a reload
    /// that changes the backend's configured weight drops it (`Shared::swap`).
    weight_set: AtomicU64,
    /// Wakes the backend's health-check loop at once (a backend leaving `maint`).
    pub check_now: tokio::sync::Notify,
}

/// A backend's state as an operator sets it (`POST /backends/POOL/BACKEND/STATE` on
/// the admin listener), HAProxy's `set server state`. Only `Ready` gets new requests;
/// both others let the requests in flight finish. `Maint` also pauses health checks,
/// and a backend leaving it is probed before it gets traffic again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    #[default]
    Ready = 0,
    Drain = 1,
    Maint = 2,
}

impl AdminState {
    pub const ALL: [AdminState; 3] = [AdminState::Ready, AdminState::Drain, AdminState::Maint];

    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }

    pub fn parse(s: &str) -> Option<AdminState> {
        AdminState::ALL.into_iter().find(|a| a.as_str() == s)
    }

    fn from_u8(v: u8) -> AdminState {
        match v {
            1 => AdminState::Drain,
            2 => AdminState::Maint,
            _ => AdminState::Ready,
        }
    }
}

/// The kinds of failed try `rampart_upstream_errors_total` counts (`ProxyError::kind`,
/// plus the outlier detector's own `hedge_lost` and `read_timeout`).
pub const BACKEND_ERROR_KINDS: [&str; 12] = [
    "connect_failed",
    "connect_timeout",
    "backend_tls",
    "response_timeout",
    "upstream_closed",
    "upstream_closed_unread",
    "upstream_exited_unread",
    "stream_refused",
    "bad_response",
    "bad_status",
    "hedge_lost",
    "read_timeout",
];

/// A backend's counters, kept on the backend rather than in the metrics recorder so
/// that a backend a reload or a DNS answer removed takes its series with it (the
/// recorder keeps every series it ever saw). `admin` renders them at each scrape.
/// A response costs one relaxed add, on a line the try already wrote (in-flight
/// count, latency); the rest are written only on failures.
#[derive(Debug, Default)]
pub struct BackendCounters {
    /// Responses the backend sent, by status class (1xx at 0 ... 5xx at 4), those a
    /// retry then replaced included.
    responses: [AtomicU64; 5],
    /// By `BACKEND_ERROR_KINDS` index; the last slot counts any other kind.
    errors: [AtomicU64; BACKEND_ERROR_KINDS.len() + 1],
    pub ejections: AtomicU64,
    pub restores: AtomicU64,
}

impl BackendCounters {
    #[inline]
    pub fn count_response(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    /// `("1xx", n)` ... `("5xx", n)`.
    pub fn responses(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ["1xx", "2xx", "3xx", "4xx", "5xx"]
            .into_iter()
            .zip(self.responses.iter().map(|c| c.load(Ordering::Relaxed)))
    }

    pub fn count_error(&self, kind: &str) {
        let i = BACKEND_ERROR_KINDS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(BACKEND_ERROR_KINDS.len());
        self.errors[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Each kind with its count, `other` last.
    pub fn errors(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        BACKEND_ERROR_KINDS
            .iter()
            .copied()
            .chain(["other"])
            .zip(self.errors.iter().map(|c| c.load(Ordering::Relaxed)))
    }
}

impl BackendState {
    pub fn new() -> BackendState {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        BackendState {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            healthy: AtomicBool::new(true),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            probation: AtomicBool::new(false),
            ramp_from: AtomicU64::new(0),
            check_passes: AtomicU32::new(0),
            check_failures: AtomicU32::new(0),
            outcomes: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(DEFAULT_RTT_NS.to_bits()),
            ewma_stamp_ns: AtomicU64::new(0),
            counters: BackendCounters::default(),
            admin: std::sync::atomic::AtomicU8::new(AdminState::Ready as u8),
            weight_set: AtomicU64::new(0),
            check_now: tokio::sync::Notify::new(),
        }
    }

    pub fn admin_state(&self) -> AdminState {
        AdminState::from_u8(self.admin.load(Ordering::Relaxed))
    }

    /// Whether the operator lets the backend take new requests (`AdminState::Ready`).
    #[inline]
    pub fn in_service(&self) -> bool {
        self.admin.load(Ordering::Relaxed) == AdminState::Ready as u8
    }

    /// Sets the operator's state; returns the one it replaced. A backend leaving
    /// `maint` had no health checks meanwhile, so it is put on probation: the health
    /// loop, woken now, probes it before it gets traffic, as after an ejection.
    pub fn set_admin_state(&self, to: AdminState) -> AdminState {
        let was = AdminState::from_u8(self.admin.swap(to as u8, Ordering::Relaxed));
        if was == AdminState::Maint && to != AdminState::Maint {
            self.probation.store(true, Ordering::Relaxed);
            self.check_now.notify_one();
        }
        was
    }

    /// Sets (`Some`) or drops (`None`) the operator's weight, set against the
    /// configured weight `config`. Takes effect when the snapshot is next built
    /// (`Shared::rebuild`).
    pub fn set_weight(&self, config: u32, weight: Option<u32>) {
        let packed = weight.map_or(0, |w| (config as u64) << 32 | w as u64);
        self.weight_set.store(packed, Ordering::Relaxed);
    }

    /// The operator's weight and the configured weight it was set against, if any.
    pub fn weight_set(&self) -> Option<(u32, u32)> {
        match self.weight_set.load(Ordering::Relaxed) {
            0 => None,
            v => Some(((v & u32::MAX as u64) as u32, (v >> 32) as u32)),
        }
    }

    /// The weight a backend configured with `config` gets: the operator's, while it
    /// was set against that configured weight, else `config`.
    fn weight_for(&self, config: u32) -> u32 {
        match self.weight_set() {
            Some((w, against)) if against == config => w,
            _ => config,
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_ms
    }

    pub fn is_available(&self, now_ms: u64) -> bool {
        self.in_service() && self.is_judged_fit(now_ms)
    }

    /// Healthy, not ejected, not on probation: whether the checks and the traffic would
    /// send it requests, whatever the operator's state.
    pub fn is_judged_fit(&self, now_ms: u64) -> bool {
        self.is_healthy() && !self.is_ejected(now_ms) && !self.probation.load(Ordering::Relaxed)
    }

    /// Share of its weight the backend gets under slow start, in (0, 1].
    pub fn ramp_factor(&self, now_ms: u64, window: Duration) -> f64 {
        let from = self.ramp_from.load(Ordering::Relaxed);
        let w = window.as_millis() as u64;
        if from == 0 || w == 0 || now_ms >= from + w {
            return 1.0;
        }
        // Envoy's min_weight_percent is 10: a ramping backend still gets some traffic.
        ((now_ms.saturating_sub(from)) as f64 / w as f64).max(0.1)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Records a time-to-first-byte sample. Peak-sensitive: a slower sample replaces
    /// the estimate at once, a faster one is averaged in with time-based decay.
    pub fn observe_latency(&self, rtt: Duration) {
        let now = clock_ns();
        let rtt = rtt.as_nanos() as f64;
        let prev = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let stamp = self.ewma_stamp_ns.swap(now, Ordering::Relaxed);
        let next = if stamp == 0 || rtt > prev {
            // The first sample replaces the default guess outright.
            rtt
        } else {
            let w = decay(now.saturating_sub(stamp) as f64 / EWMA_DECAY_NS);
            prev * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    /// The current latency estimate, decayed toward zero while there are no samples so
    /// that a backend that was slow once is tried again.
    pub fn ewma(&self) -> f64 {
        self.ewma_at(clock_ns())
    }

    /// `ewma()` at `now_ns` (a `clock_ns()` reading).
    pub fn ewma_at(&self, now_ns: u64) -> f64 {
        let v = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let stamp = self.ewma_stamp_ns.load(Ordering::Relaxed);
        if stamp == 0 {
            return v;
        }
        let idle = now_ns.saturating_sub(stamp) as f64;
        v * decay(idle / EWMA_DECAY_NS)
    }

    /// Whether any latency sample was recorded yet.
    pub fn has_latency_sample(&self) -> bool {
        self.ewma_stamp_ns.load(Ordering::Relaxed) != 0
    }

    /// Peak-EWMA cost: latency × (in-flight + 1).
    pub fn ewma_cost(&self, latency: f64) -> f64 {
        latency * (self.in_flight() as f64 + 1.0)
    }
}

impl Default for BackendState {
    fn default() -> Self {
        Self::new()
    }
}

/// `e^-x` for `x >= 0`. Under load the EWMA is read and updated within microseconds
/// of its last sample, where the series' first terms are exact to ~1e-10; `exp`
/// was three libm calls per request.
fn decay(x: f64) -> f64 {
    if x < 1e-3 {
        1.0 - x + x * x / 2.0
    } else {
        (-x).exp()
    }
}

/// Nanoseconds on the process-wide monotonic clock; 1 is process start.
pub fn clock_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let now = crate::clock::now();
    now.saturating_duration_since(*EPOCH.get_or_init(|| now)).as_nanos() as u64 + 1
}

/// A request to one backend: counted in flight until the guard drops, and the way
/// its outcome reaches outlier detection once the response has ended. A response is
/// a success when its body is whole (`succeeded`), not when its head arrives: a
/// backend whose every response breaks off mid-body is failing, and must be
/// ejected like one that refuses connections.
#[derive(Debug)]
pub struct InFlight {
    pool: Arc<Pool>,
    /// u32, so the guard is 16 bytes: it is moved with every response body.
    bi: u32,
    /// False once the head has judged the response (a `retry.on_status`, counted then).
    report: bool,
}

impl InFlight {
    /// Judges the response's status (`outlier::on_status`): a 502-504 (the pool's
    /// `retry.on_status`) is counted as a failure and returned, and the response's end
    /// then adds nothing.
    #[inline]
    pub fn on_status(&mut self, status: http::StatusCode) -> Option<crate::error::ProxyError> {
        let gateway = crate::outlier::on_status(&self.pool, self.bi as usize, status);
        if gateway.is_some() {
            self.report = false;
        }
        gateway
    }

    /// The response ended whole.
    #[inline]
    pub fn succeeded(self) {
        if self.report {
            crate::outlier::on_success(&self.pool, self.bi as usize);
        }
    }

    /// The response's body failed after its head had been sent on.
    #[cold]
    pub fn body_failed(self, e: &std::io::Error) {
        if self.report {
            crate::outlier::on_body_failure(&self.pool, self.bi as usize, e);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.pool.backends[self.bi as usize]
            .state
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Backend {
    /// Below its `max_in_flight`. Read, not reserved: workers picking it at once may
    /// pass the limit by one each, as nginx's workers pass `max_conns`.
    #[inline]
    pub fn has_room(&self) -> bool {
        self.max_in_flight == u32::MAX || self.state.in_flight() < self.max_in_flight
    }

    /// Drops the operator's weight when the config gives the backend another weight
    /// than the one it was set against: the file is the newer word, as HAProxy reads
    /// its `server-state-file`. On a reload (`Shared::swap`), and on a weight saved or
    /// handed over (`restore_weight`).
    fn drop_stale_weight(&self, pool: &str) {
        if let Some((w, against)) = self.state.weight_set() {
            if against != self.config_weight {
                self.state.set_weight(self.config_weight, None);
                tracing::info!(pool, backend = %self.name, dropped = w, weight = self.config_weight, "the config changed the backend's weight: the weight set through the admin API is dropped");
            }
        }
    }
}

#[derive(Debug)]
pub struct Backend {
    /// For logs and labels, unique in its pool (`BackendConfig::name`).
    pub name: String,
    /// As written in the config.
    pub written: String,
    pub addr: SocketAddr,
    /// What the balancer weighs it by: `config_weight`, or the weight an operator
    /// set through the admin API.
    pub weight: u32,
    /// As configured (`BackendConfig::weight`).
    pub config_weight: u32,
    /// Picked only when no other backend can be (`BackendConfig::backup`).
    pub backup: bool,
    /// Not picked while this many requests are in flight to it, all workers
    /// together (`BackendConfig::max_in_flight`; `u32::MAX`: no limit).
    pub max_in_flight: u32,
    /// For a pool with `tls`: the name the backend's certificate is verified against.
    pub tls_name: Option<rustls::pki_types::ServerName<'static>>,
    pub state: Arc<BackendState>,
    /// Its value in a sticky pool's cookie: a hash of its address, so that every
    /// rampart with the same backends, and every restart, reads the cookie alike,
    /// and the cookie does not show the address.
    pub sticky_id: u64,
}

#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub backends: Vec<Backend>,
    pub balancer: Balancer,
    pub config: PoolConfig,
    pub metrics: PoolMetrics,
    pub budget: RetryBudget,
    pub breakers: Arc<Breakers>,
    pub latency: LatencyTracker,
    /// Set while fewer than `panic_threshold`% of backends are available (with
    /// backups: while none is).
    pub panic: AtomicBool,
    /// Whether any backend is a backup, so `pick` has a second tier to try.
    pub has_backups: bool,
}

impl Pool {
    /// Counts a request to backend `bi` as in flight until the guard drops.
    pub fn start_request(self: &Arc<Self>, bi: usize) -> InFlight {
        self.backends[bi].state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            pool: self.clone(),
            // A pool's backends are far fewer than 2^32 (a config, or DNS answers).
            bi: bi as u32,
            report: true,
        }
    }

    /// Picks an available backend that is not in `exclude`. Below the panic threshold
    /// every backend counts as available (Envoy's panic mode): better to try a backend
    /// marked down than to fail every request. A backend the operator drained or put
    /// in maintenance is never picked, panic or not, and is not counted in the pool.
    ///
    /// Backups (nginx's and HAProxy's `backup`) are a second tier: tried only when no
    /// other backend can be, down or all tried already by this request. A pool with
    /// backups panics only when no backend of either tier is available: the backups
    /// are the operator's answer to a thin pool.
    /// Whether a sticky client may keep to backend `bi`: healthy, not ejected, and
    /// not in maintenance. A drained backend keeps its sticky clients, as HAProxy's
    /// drain does: their sessions end there, while no new client is sent to it.
    pub fn sticky_fit(&self, bi: usize) -> bool {
        let b = &self.backends[bi];
        b.state.admin_state() != AdminState::Maint && b.state.is_judged_fit(ms_of(clock_ns())) && b.has_room()
    }

    /// Whether `pick` could choose a backend outside `exclude`, asked without
    /// choosing one: a pick moves round robin's cursor, and a pick made only to ask
    /// would skip a backend's turn (after every failed try of one backend, the next
    /// in the order lost its turn, and got no traffic at all while a backend failed).
    pub fn could_pick(&self, exclude: &[usize]) -> bool {
        let now = ms_of(clock_ns());
        let panic = self.panic.load(Ordering::Relaxed);
        self.backends
            .iter()
            .enumerate()
            .any(|(i, b)| may_take(b, i, exclude, panic, now))
    }

    pub fn pick(&self, hash: Option<u64>, exclude: &[usize]) -> Option<usize> {
        // One clock read per pick: it was three (availability, two EWMA decays).
        let now_ns = clock_ns();
        let now = ms_of(now_ns);
        let (mut total, mut available, mut backups_available) = (0, 0, 0);
        for b in &self.backends {
            if !b.state.in_service() {
                continue;
            }
            let fit = b.state.is_judged_fit(now) as usize;
            if b.backup {
                backups_available += fit;
            } else {
                total += 1;
                available += fit;
            }
        }
        let panic = if self.has_backups {
            available == 0 && backups_available == 0
        } else {
            available * 100 < total * self.config.outlier.panic_threshold as usize
        };
        if panic != self.panic.load(Ordering::Relaxed) {
            self.panic.store(panic, Ordering::Relaxed);
            if panic {
                tracing::warn!(pool = %self.name, available, total, "panic mode: balancing over all backends in service");
                metrics::counter!("rampart_panic_mode_total", "pool" => self.name.clone()).increment(1);
            } else {
                tracing::info!(pool = %self.name, available, total, "left panic mode");
            }
        }
        let window = self.config.slow_start;
        let ramping = !panic && !window.is_zero() && self.config.balancer != BalancerKind::ConsistentHash;
        let tier = |backup: bool, ramp: bool| {
            let ok = |i: usize| {
                let b = &self.backends[i];
                b.backup == backup
                    && may_take(b, i, exclude, panic, now)
                    // Slow start: a ramping backend is passed over in proportion to its
                    // ramp (never in panic mode: `ramping` is off then).
                    && (!ramp || fastrand::f64() < b.state.ramp_factor(now, window))
            };
            self.balancer.pick(&self.backends, hash, now_ns, &ok)
        };
        let tiers: &[bool] = if self.has_backups { &[false, true] } else { &[false] };
        tiers.iter().find_map(|&backup| {
            // Slow start must never make a pool refuse: try again without the ramp.
            (ramping.then(|| tier(backup, true)).flatten()).or_else(|| tier(backup, false))
        })
    }
}

/// One consistent view of the configuration and its compiled tables.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub router: Router,
    pub routes: Vec<RouteConfig>,
    /// Each route's `rate_limit` and `in_flight_limit` state, by route index.
    pub limiters: Vec<RouteLimits>,
    pub pools: Vec<Arc<Pool>>,
}

/// A route's per-client limits (each `None` where it has none).
#[derive(Debug, Default)]
pub struct RouteLimits {
    pub rate: Option<Arc<RateLimiter>>,
    pub in_flight: Option<Arc<InFlightLimiter>>,
}

/// The routes' limiters. A route a reload kept (same `host`, `path_prefix` and
/// conditions) keeps its clients' state. Rate limits: the same limiter if the limit is
/// unchanged, else a new one that takes over each client's debt, so a reload hands no
/// one a fresh burst. In-flight limits: the same table if the key is unchanged (its
/// counts are given back to it as requests end), with the new `max`.
fn limiters(routes: &[RouteConfig], previous: Option<&Snapshot>) -> Vec<RouteLimits> {
    routes
        .iter()
        .map(|r| {
            let old = previous.and_then(|p| {
                p.routes
                    .iter()
                    .zip(&p.limiters)
                    .find(|(o, _)| o.host == r.host && o.path_prefix == r.path_prefix && o.matches == r.matches)
                    .map(|(_, l)| l)
            });
            let rate = r
                .rate_limit
                .as_ref()
                .map(|limit| match old.and_then(|o| o.rate.as_ref()) {
                    Some(old) if old.config == *limit => old.clone(),
                    old => {
                        let new = RateLimiter::new(limit.clone());
                        if let Some(old) = old {
                            new.carry(old);
                        }
                        Arc::new(new)
                    }
                });
            let in_flight = r
                .in_flight_limit
                .as_ref()
                .map(|limit| match old.and_then(|o| o.in_flight.as_ref()) {
                    Some(old) if old.key == limit.key => {
                        old.set_max(limit.max);
                        old.clone()
                    }
                    _ => Arc::new(InFlightLimiter::new(limit.key.clone(), limit.max)),
                });
            RouteLimits { rate, in_flight }
        })
        .collect()
}

/// One backend's verdicts as a binary upgrade hands them to the new process
/// (`upgrade`), which would otherwise start with every backend healthy and sent
/// traffic: a backend down or ejected stays so across the upgrade.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Handed {
    pub pool: String,
    pub addr: SocketAddr,
    pub healthy: bool,
    pub check_passes: u32,
    pub check_failures: u32,
    pub consecutive_failures: u32,
    pub ejections: u32,
    /// What is left of the ejection (the `now_ms` clocks of two processes differ).
    pub ejected_for_ms: u64,
    pub probation: bool,
    /// What the operator set; absent from an older process's handover.
    #[serde(default)]
    pub admin: AdminState,
    /// The weight the operator set, and the configured weight it was set against.
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub config_weight: Option<u32>,
}

impl Snapshot {
    /// Every backend's verdicts, for the new process of an upgrade.
    pub fn hand_over(&self) -> Vec<Handed> {
        let now = now_ms();
        let mut all = Vec::new();
        for p in &self.pools {
            for b in &p.backends {
                let st = &b.state;
                all.push(Handed {
                    pool: p.name.clone(),
                    addr: b.addr,
                    healthy: st.is_healthy(),
                    check_passes: st.check_passes.load(Ordering::Relaxed),
                    check_failures: st.check_failures.load(Ordering::Relaxed),
                    consecutive_failures: st.consecutive_failures.load(Ordering::Relaxed),
                    ejections: st.ejections.load(Ordering::Relaxed),
                    ejected_for_ms: st.ejected_until.load(Ordering::Relaxed).saturating_sub(now),
                    probation: st.probation.load(Ordering::Relaxed),
                    admin: st.admin_state(),
                    weight: st.weight_set().map(|(w, _)| w),
                    config_weight: st.weight_set().map(|(_, c)| c),
                });
            }
        }
        all
    }

    /// Takes the verdicts the old process handed over for the backends this one has
    /// too (same pool name and address); returns how many it took.
    pub fn take_over(&self, handed: &[Handed]) -> usize {
        let now = now_ms();
        let mut taken = 0;
        for h in handed {
            for b in self.backends_at(&h.pool, h.addr) {
                let st = &b.state;
                st.healthy.store(h.healthy, Ordering::Relaxed);
                st.check_passes.store(h.check_passes, Ordering::Relaxed);
                st.check_failures.store(h.check_failures, Ordering::Relaxed);
                st.consecutive_failures.store(h.consecutive_failures, Ordering::Relaxed);
                st.ejections.store(h.ejections, Ordering::Relaxed);
                let until = if h.ejected_for_ms > 0 {
                    now + h.ejected_for_ms
                } else {
                    0
                };
                st.ejected_until.store(until, Ordering::Relaxed);
                st.probation.store(h.probation, Ordering::Relaxed);
                st.admin.store(h.admin as u8, Ordering::Relaxed);
                restore_weight(b, &h.pool, h.weight, h.config_weight);
                taken += 1;
            }
        }
        taken
    }
}

/// Sets a weight saved (state file) or handed over (upgrade) on backend `b`, unless
/// the config now gives the backend another weight than the one it was set against:
/// then the config wins, as on a reload (`Backend::drop_stale_weight`).
fn restore_weight(b: &Backend, pool: &str, weight: Option<u32>, against: Option<u32>) {
    if let (Some(w), Some(against)) = (weight, against) {
        b.state.set_weight(against, Some(w));
        b.drop_stale_weight(pool);
    }
}

/// A backend's admin state as `[admin] state_file` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedState {
    pub pool: String,
    pub addr: SocketAddr,
    pub state: AdminState,
    /// A weight set through the admin API, and the configured weight it was set
    /// against (absent from the files of versions before weights could be set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_weight: Option<u32>,
}

impl Snapshot {
    /// Every backend an operator took out of service or set a weight on, for the
    /// state file.
    pub fn admin_states(&self) -> Vec<SavedState> {
        self.pools
            .iter()
            .flat_map(|p| {
                p.backends
                    .iter()
                    .filter(|b| b.state.admin_state() != AdminState::Ready || b.state.weight_set().is_some())
                    .map(|b| SavedState {
                        pool: p.name.clone(),
                        addr: b.addr,
                        state: b.state.admin_state(),
                        weight: b.state.weight_set().map(|(w, _)| w),
                        config_weight: b.state.weight_set().map(|(_, c)| c),
                    })
            })
            .collect()
    }

    /// Sets the saved states on the backends still in the config (matched by pool
    /// and address); returns how many were set. A saved weight takes effect once
    /// the snapshot is built again (`has_set_weights`, `Shared::rebuild`).
    pub fn restore_admin_states(&self, saved: &[SavedState]) -> usize {
        let mut set = 0;
        for s in saved {
            for b in self.backends_at(&s.pool, s.addr) {
                b.state.admin.store(s.state as u8, Ordering::Relaxed);
                restore_weight(b, &s.pool, s.weight, s.config_weight);
                set += 1;
            }
        }
        set
    }

    /// Whether an operator set the weight of any backend, which the balancers
    /// take only from a snapshot built since (`Shared::rebuild`).
    pub fn has_set_weights(&self) -> bool {
        self.pools
            .iter()
            .flat_map(|p| &p.backends)
            .any(|b| b.state.weight_set().is_some_and(|(w, _)| w != b.weight))
    }

    /// The backends of pool `pool` at `addr`, as a handover or the state file names
    /// them.
    fn backends_at<'a>(&'a self, pool: &'a str, addr: SocketAddr) -> impl Iterator<Item = &'a Backend> {
        self.pools
            .iter()
            .filter(move |p| p.name == pool)
            .take(1)
            .flat_map(move |p| p.backends.iter().filter(move |b| b.addr == addr))
    }
}

impl Snapshot {
    /// Builds a snapshot, reusing `previous`' backend state for unchanged backends:
    /// same pool name, address and transport. A backend whose pool gained, lost or
    /// changed its `tls` settings (renewed files aside) is a new backend: its health
    /// is judged afresh, and the workers' idle connections to it, made the old way,
    /// are never reused (they are keyed by the state's id).
    ///
    /// A backend a reload added takes traffic at once (ramped by `slow_start`); one
    /// that a DNS answer added (`discovered`) to a pool with an active health check
    /// waits, marked down, until the check has passed `rise` times, as Envoy holds
    /// back a discovered host until its first check passes.
    pub fn build(config: Arc<Config>, previous: Option<&Snapshot>) -> Snapshot {
        Snapshot::build_with(config, previous, false)
    }

    fn build_with(config: Arc<Config>, previous: Option<&Snapshot>, discovered: bool) -> Snapshot {
        let mut carried: HashMap<(&str, SocketAddr), (Arc<BackendState>, Transport<'_>)> = HashMap::new();
        if let Some(prev) = previous {
            for p in &prev.pools {
                for b in &p.backends {
                    carried.insert(
                        (p.name.as_str(), b.addr),
                        (b.state.clone(), transport(&p.config, &b.tls_name)),
                    );
                }
            }
        }
        let now = now_ms();
        let pools = config
            .pools
            .iter()
            .map(|pc| {
                let backends = pc
                    .backends
                    .iter()
                    .map(|bc| {
                        let state = carried
                            .get(&(pc.name.as_str(), bc.addr))
                            .filter(|(_, t)| *t == transport(pc, &bc.tls_name))
                            .map(|(st, _)| st.clone())
                            .unwrap_or_else(|| {
                                let st = BackendState::new();
                                if let Some((old, _)) = carried.get(&(pc.name.as_str(), bc.addr)) {
                                    // New TLS settings make it a new backend, but what
                                    // the operator set (drained, a weight) stays.
                                    st.admin.store(old.admin_state() as u8, Ordering::Relaxed);
                                    st.weight_set
                                        .store(old.weight_set.load(Ordering::Relaxed), Ordering::Relaxed);
                                }
                                if previous.is_some() {
                                    // Added by a reload: slow start applies (if configured).
                                    st.ramp_from.store(now, Ordering::Relaxed);
                                }
                                if discovered && pc.health_check.kind != crate::config::HealthCheckKind::None {
                                    st.healthy.store(false, Ordering::Relaxed);
                                }
                                Arc::new(st)
                            });
                        Backend {
                            sticky_id: crate::balancer::hash64(bc.addr.to_string().as_bytes()),
                            name: bc.name.clone(),
                            written: bc.written.clone(),
                            addr: bc.addr,
                            weight: state.weight_for(bc.weight),
                            config_weight: bc.weight,
                            backup: bc.backup,
                            max_in_flight: bc.max_in_flight.unwrap_or(u32::MAX),
                            tls_name: bc.tls_name.clone(),
                            state,
                        }
                    })
                    .collect::<Vec<_>>();
                // The pool's own counters go on from the pool it replaces: the
                // circuit breaker's counts (the requests and connections still open
                // hold the old pool's slots, and release them there), the retry
                // budget and the latency estimate. Fresh, a reload (or every DNS
                // update) would let a pool at its limits double its load.
                let old = previous.and_then(|p| p.pools.iter().find(|p| p.name == pc.name));
                let budget = RetryBudget::new(pc.retry.budget_percent, pc.retry.budget_min_per_sec);
                let latency = LatencyTracker::default();
                if let Some(old) = old {
                    budget.carry(&old.budget);
                    latency.carry(&old.latency);
                }
                let balancer = Balancer::new(pc.balancer, &backends);
                Arc::new(Pool {
                    name: pc.name.clone(),
                    backends,
                    balancer,
                    config: pc.clone(),
                    metrics: PoolMetrics::new(&pc.name),
                    budget,
                    breakers: old.map_or_else(|| Arc::new(Breakers::default()), |p| p.breakers.clone()),
                    latency,
                    panic: AtomicBool::new(false),
                    has_backups: pc.backends.iter().any(|b| b.backup),
                })
            })
            .collect();
        Snapshot {
            router: Router::new(&config.routes),
            routes: config.routes.clone(),
            limiters: limiters(&config.routes, previous),
            pools,
            config,
        }
    }
}

/// How a backend is reached: its pool's protocol, its TLS settings and the name it
/// is verified against. State carries over a reload only while this stays the same,
/// so no pooled connection is used for a protocol it does not speak.
type Transport<'a> = (
    crate::config::UpstreamProtocol,
    Option<&'a BackendTlsSpec>,
    Option<&'a ServerName<'static>>,
);

fn transport<'a>(pool: &'a PoolConfig, tls_name: &'a Option<ServerName<'static>>) -> Transport<'a> {
    (pool.protocol, pool.tls.as_deref().map(|t| &t.spec), tls_name.as_ref())
}

/// Process-wide state shared by workers, the admin listener and the control loop.
#[derive(Debug)]
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub shutting_down: AtomicBool,
    /// Keep-alive client connections waiting without a task, over all workers
    /// (`dormant::Dormant`).
    pub dormant_connections: std::sync::atomic::AtomicUsize,
    /// Open client connections over all workers, tunnels and dormant ones included
    /// (`listener::ConnTracker`).
    pub client_connections: std::sync::atomic::AtomicUsize,
    /// Open WebSocket (upgraded) tunnels over all workers (`tunnel::run`).
    pub tunnels: std::sync::atomic::AtomicUsize,
    /// Woken by every config swap: a worker waiting at `max_connections` looks again
    /// at the (maybe raised) cap.
    pub reloaded: tokio::sync::Notify,
    /// Where workers write their access-log lines; `None` while the log is off.
    pub access_log: ArcSwapOption<crate::accesslog::Sink>,
}

impl Shared {
    pub fn new(config: Arc<Config>) -> Shared {
        Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::build(config, None)),
            shutting_down: AtomicBool::new(false),
            dormant_connections: Default::default(),
            client_connections: Default::default(),
            tunnels: Default::default(),
            reloaded: tokio::sync::Notify::new(),
            access_log: ArcSwapOption::empty(),
        }
    }

    /// Installs a new config, carrying over backend state. A weight an operator set
    /// on a backend whose configured weight this config changes is dropped: the
    /// file is the newer word, as HAProxy's `server-state-file` reads it.
    pub fn swap(&self, config: Arc<Config>) {
        let prev = self.snapshot.load_full();
        let next = Snapshot::build(config, Some(&prev));
        for p in &next.pools {
            for b in &p.backends {
                b.drop_stale_weight(&p.name);
            }
        }
        self.snapshot.store(Arc::new(next));
        self.reloaded.notify_waiters();
    }

    /// Builds the snapshot again from its own config, so the balancers take the
    /// weights an operator set (`BackendState::set_weight`). Retried when a reload or
    /// a DNS update installs another snapshot meanwhile, which would otherwise be
    /// lost; returns the snapshot installed.
    pub fn rebuild(&self) -> Arc<Snapshot> {
        loop {
            let cur = self.snapshot.load_full();
            let next = Arc::new(Snapshot::build(cur.config.clone(), Some(&cur)));
            let prev = self.snapshot.compare_and_swap(&cur, next.clone());
            if Arc::ptr_eq(&prev, &cur) {
                self.reloaded.notify_waiters();
                return next;
            }
        }
    }

    /// Installs `config`, `expected`'s config with backends a DNS answer changed,
    /// unless the snapshot is no longer `expected` (a reload came first): then
    /// nothing changes and `false` says so.
    pub fn discovered(&self, expected: &Arc<Snapshot>, config: Arc<Config>) -> bool {
        let next = Arc::new(Snapshot::build_with(config, Some(expected), true));
        let prev = self.snapshot.compare_and_swap(expected, next);
        let installed = Arc::ptr_eq(&prev, expected);
        if installed {
            self.reloaded.notify_waiters();
        }
        installed
    }
}

/// Whether backend `b` (index `i`) may take a request, in `Pool::pick` and
/// `Pool::could_pick` alike: not in `exclude`, in service, with room under
/// `max_in_flight` (the operator's limit, kept in panic mode too), and judged fit
/// unless the pool is in panic mode.
#[inline]
fn may_take(b: &Backend, i: usize, exclude: &[usize], panic: bool, now: u64) -> bool {
    !exclude.contains(&i) && b.state.in_service() && b.has_room() && (panic || b.state.is_judged_fit(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_matches_exp() {
        for x in [0.0f64, 1e-9, 1e-6, 5e-4, 9.99e-4, 1e-3, 0.5, 3.0] {
            let want = (-x).exp();
            assert!(
                (decay(x) - want).abs() <= want * 1e-9,
                "x = {x}: {} vs {want}",
                decay(x)
            );
        }
    }

    #[test]
    fn an_upgrade_carries_health_checks_and_ejections_by_pool_and_address() {
        let toml = "[[listeners]]\nbind = \"127.0.0.1:0\"\n[[routes]]\npool = \"app\"\n[pools.app]\nbackends = [\"127.0.0.1:1\", \"127.0.0.1:2\", \"127.0.0.1:3\"]\n";
        let config = Arc::new(Config::parse(toml, "t").unwrap());
        let old = Snapshot::build(config.clone(), None);
        let b = |s: &Snapshot, i: usize| s.pools[0].backends[i].state.clone();
        b(&old, 0).healthy.store(false, Ordering::Relaxed);
        b(&old, 0).check_failures.store(4, Ordering::Relaxed);
        b(&old, 1).ejected_until.store(now_ms() + 60_000, Ordering::Relaxed);
        b(&old, 1).ejections.store(2, Ordering::Relaxed);
        b(&old, 1).probation.store(true, Ordering::Relaxed);
        b(&old, 2).set_admin_state(AdminState::Drain);
        // Through the bytes the new process gets.
        let bytes = serde_json::to_vec(&old.hand_over()).unwrap();
        let handed: Vec<Handed> = serde_json::from_slice(&bytes).unwrap();
        let new = Snapshot::build(config, None);
        assert_eq!(new.take_over(&handed), 3);
        let now = now_ms();
        assert!(!b(&new, 0).is_healthy());
        assert_eq!(b(&new, 0).check_failures.load(Ordering::Relaxed), 4);
        assert!(b(&new, 1).is_ejected(now) && b(&new, 1).is_healthy());
        assert!(b(&new, 1).ejected_until.load(Ordering::Relaxed) <= now + 60_000);
        assert_eq!(b(&new, 1).ejections.load(Ordering::Relaxed), 2);
        assert!(b(&new, 1).probation.load(Ordering::Relaxed));
        assert_eq!(b(&new, 2).admin_state(), AdminState::Drain);
        assert!(!b(&new, 2).is_available(now) && b(&new, 2).is_judged_fit(now));
        assert_eq!(b(&new, 0).admin_state(), AdminState::Ready);
        // Another pool's backend at the same address is not this one.
        let text = String::from_utf8(bytes).unwrap().replace("\"app\"", "\"web\"");
        let other: Vec<Handed> = serde_json::from_str(&text).unwrap();
        assert_eq!(new.take_over(&other), 0);
        // A process from before the operator's state was handed over sends none.
        let older: Vec<Handed> = serde_json::from_str(
            &serde_json::to_string(&old.hand_over())
                .unwrap()
                .replace(",\"admin\":\"drain\"", ""),
        )
        .unwrap();
        assert_eq!(older[2].admin, AdminState::Ready);
    }

    #[test]
    fn an_upgrade_carries_an_operators_weight_unless_the_config_changed_the_backends() {
        let old = pool_of(2, "balancer = \"round_robin\"\n");
        old.pools[0].backends[1].state.set_weight(1, Some(3));
        let handed: Vec<Handed> = serde_json::from_slice(&serde_json::to_vec(&old.hand_over()).unwrap()).unwrap();
        let new = pool_of(2, "balancer = \"round_robin\"\n");
        assert_eq!(new.take_over(&handed), 2);
        // Taken, but the balancers are built with it only in the next snapshot.
        assert!(new.has_set_weights());
        let next = Snapshot::build(new.config.clone(), Some(&new));
        assert!(!next.has_set_weights());
        let pool = &next.pools[0];
        assert_eq!((pool.backends[1].weight, pool.backends[1].config_weight), (3, 1));
        let picks: Vec<_> = (0..8).filter_map(|_| pool.pick(None, &[])).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 6, "{picks:?}");
        // A new process whose config weighs the backend otherwise keeps its config.
        let reweighed = pool_of(
            0,
            "backends = [\"127.0.0.1:1\", { addr = \"127.0.0.1:2\", weight = 2 }]\nbalancer = \"round_robin\"\n",
        );
        assert_eq!(reweighed.take_over(&handed), 2);
        assert!(!reweighed.has_set_weights());
        assert_eq!(reweighed.pools[0].backends[1].state.weight_set(), None);
    }

    /// A pool of `backends` backends (none: `extra` lists them).
    fn pool_of(backends: usize, extra: &str) -> Snapshot {
        let list: Vec<_> = (1..=backends).map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        let listed = match backends {
            0 => String::new(),
            _ => format!("backends = [{}]\n", list.join(", ")),
        };
        let toml =
            format!("[[listeners]]\nbind = \"127.0.0.1:0\"\n[[routes]]\npool = \"app\"\n[pools.app]\n{listed}{extra}");
        Snapshot::build(Arc::new(Config::parse(&toml, "t").unwrap()), None)
    }

    #[test]
    fn backends_out_of_service_are_never_picked_nor_counted_toward_panic() {
        let snap = pool_of(4, "balancer = \"round_robin\"\n");
        let pool = &snap.pools[0];
        let st = |i: usize| &pool.backends[i].state;
        st(0).set_admin_state(AdminState::Drain);
        st(1).set_admin_state(AdminState::Maint);
        for _ in 0..20 {
            let bi = pool.pick(None, &[]).unwrap();
            assert!(bi >= 2, "picked backend {bi}, which is out of service");
        }
        // One of the two in service down is 50% of them: not yet panic, so only the
        // healthy one is picked. (Counting the four, it would be 25%: panic.)
        st(2).healthy.store(false, Ordering::Relaxed);
        for _ in 0..20 {
            assert_eq!(pool.pick(None, &[]), Some(3));
        }
        // Both down: panic balances over the two in service, never the others.
        st(3).healthy.store(false, Ordering::Relaxed);
        for _ in 0..20 {
            assert!(pool.pick(None, &[]).unwrap() >= 2);
        }
        assert!(pool.panic.load(Ordering::Relaxed));
        // Every backend out of service: nothing to pick, panic or not.
        st(2).set_admin_state(AdminState::Drain);
        st(3).set_admin_state(AdminState::Drain);
        assert_eq!(pool.pick(None, &[]), None);
        // Leaving drain gives traffic back at once; leaving maint waits for a probe.
        assert_eq!(st(0).set_admin_state(AdminState::Ready), AdminState::Drain);
        assert_eq!(pool.pick(None, &[]), Some(0));
        assert_eq!(st(1).set_admin_state(AdminState::Ready), AdminState::Maint);
        assert!(st(1).probation.load(Ordering::Relaxed));
        for _ in 0..20 {
            assert_eq!(pool.pick(None, &[]), Some(0));
        }
    }

    #[test]
    fn backups_take_requests_only_when_no_other_backend_can() {
        let snap = pool_of(
            0,
            "backends = [\"127.0.0.1:1\", \"127.0.0.1:2\", { addr = \"127.0.0.1:3\", backup = true }]\nbalancer = \"round_robin\"\n",
        );
        let pool = &snap.pools[0];
        assert!(pool.has_backups && pool.backends[2].backup);
        let st = |i: usize| &pool.backends[i].state;
        let picks = |exclude: &[usize]| (0..12).map(|_| pool.pick(None, exclude)).collect::<Vec<_>>();
        assert!(picks(&[]).iter().all(|p| matches!(p, Some(0 | 1))));
        // One primary down is below the panic threshold, but with a backup there is no
        // panic: the primary that is up takes everything.
        st(0).healthy.store(false, Ordering::Relaxed);
        assert!(picks(&[]).iter().all(|p| *p == Some(1)));
        assert!(!pool.panic.load(Ordering::Relaxed));
        // A request that has tried the other primary already goes to the backup.
        assert!(picks(&[1]).iter().all(|p| *p == Some(2)));
        st(1).healthy.store(false, Ordering::Relaxed);
        assert!(picks(&[]).iter().all(|p| *p == Some(2)));
        assert!(!pool.panic.load(Ordering::Relaxed));
        // Nothing available in either tier: panic tries the primaries first.
        st(2).healthy.store(false, Ordering::Relaxed);
        assert!(picks(&[]).iter().all(|p| matches!(p, Some(0 | 1))));
        assert!(pool.panic.load(Ordering::Relaxed));
        assert_eq!(pool.pick(None, &[0, 1]), Some(2));
        // A primary back up takes the traffic back from the backup.
        st(0).healthy.store(true, Ordering::Relaxed);
        st(2).healthy.store(true, Ordering::Relaxed);
        assert!(picks(&[]).iter().all(|p| *p == Some(0)));
        assert!(!pool.panic.load(Ordering::Relaxed));
    }

    #[test]
    fn a_backend_a_reload_remakes_keeps_the_operators_state() {
        let old = pool_of(2, "");
        old.pools[0].backends[1].state.set_admin_state(AdminState::Maint);
        // A new protocol makes new backends (their pooled connections speak the old).
        let toml = "[[listeners]]\nbind = \"127.0.0.1:0\"\n[[routes]]\npool = \"app\"\n[pools.app]\nbackends = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\nprotocol = \"h2\"\n";
        let new = Snapshot::build(Arc::new(Config::parse(toml, "t").unwrap()), Some(&old));
        let (o, n) = (&old.pools[0].backends[1].state, &new.pools[0].backends[1].state);
        assert_ne!(o.id, n.id);
        assert_eq!(n.admin_state(), AdminState::Maint);
        assert_eq!(new.pools[0].backends[0].state.admin_state(), AdminState::Ready);
        // A reload that keeps the backend keeps its state, the same one.
        let same = Snapshot::build(old.config.clone(), Some(&old));
        assert!(Arc::ptr_eq(&same.pools[0].backends[1].state, o));
    }
}
