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

use arc_swap::ArcSwap;

use crate::balancer::Balancer;
use crate::config::{Config, PoolConfig, RouteConfig};
use crate::metrics::PoolMetrics;
use crate::router::Router;

/// Milliseconds on a process-wide monotonic clock; 0 is process start.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
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
    in_flight: AtomicU32,
    ewma_ns: AtomicU64,
    ewma_stamp_ns: AtomicU64,
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
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(DEFAULT_RTT_NS.to_bits()),
            ewma_stamp_ns: AtomicU64::new(0),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_ms
    }

    pub fn is_available(&self, now_ms: u64) -> bool {
        self.is_healthy() && !self.is_ejected(now_ms)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
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
            let w = (-((now.saturating_sub(stamp)) as f64) / EWMA_DECAY_NS).exp();
            prev * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    /// The current latency estimate, decayed toward zero while there are no samples so
    /// that a backend that was slow once is tried again.
    pub fn ewma(&self) -> f64 {
        let v = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let stamp = self.ewma_stamp_ns.load(Ordering::Relaxed);
        if stamp == 0 {
            return v;
        }
        let idle = clock_ns().saturating_sub(stamp) as f64;
        v * (-idle / EWMA_DECAY_NS).exp()
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

fn clock_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// Decrements the backend's in-flight count when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<BackendState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct Backend {
    /// As written in the config, for logs and labels.
    pub name: String,
    pub addr: SocketAddr,
    pub weight: u32,
    pub state: Arc<BackendState>,
}

#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub backends: Vec<Backend>,
    pub balancer: Balancer,
    pub config: PoolConfig,
    pub metrics: PoolMetrics,
}

impl Pool {
    /// Picks an available backend that is not in `exclude`.
    pub fn pick(&self, hash: Option<u64>, exclude: &[usize]) -> Option<usize> {
        let now = now_ms();
        let ok = |i: usize| !exclude.contains(&i) && self.backends[i].state.is_available(now);
        self.balancer.pick(&self.backends, hash, &ok)
    }
}

/// One consistent view of the configuration and its compiled tables.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub router: Router,
    pub routes: Vec<RouteConfig>,
    pub pools: Vec<Arc<Pool>>,
}

impl Snapshot {
    /// Builds a snapshot, reusing `previous`' backend state for unchanged backends
    /// (same pool name and address).
    pub fn build(config: Arc<Config>, previous: Option<&Snapshot>) -> Snapshot {
        let mut carried: HashMap<(&str, SocketAddr), Arc<BackendState>> = HashMap::new();
        if let Some(prev) = previous {
            for p in &prev.pools {
                for b in &p.backends {
                    carried.insert((p.name.as_str(), b.addr), b.state.clone());
                }
            }
        }
        let pools = config
            .pools
            .iter()
            .map(|pc| {
                let backends = pc
                    .backends
                    .iter()
                    .map(|bc| Backend {
                        name: bc.name.clone(),
                        addr: bc.addr,
                        weight: bc.weight,
                        state: carried
                            .get(&(pc.name.as_str(), bc.addr))
                            .cloned()
                            .unwrap_or_else(|| Arc::new(BackendState::new())),
                    })
                    .collect();
                Arc::new(Pool {
                    name: pc.name.clone(),
                    backends,
                    balancer: Balancer::new(pc.balancer, &pc.backends),
                    config: pc.clone(),
                    metrics: PoolMetrics::new(&pc.name),
                })
            })
            .collect();
        Snapshot {
            router: Router::new(&config.routes),
            routes: config.routes.clone(),
            pools,
            config,
        }
    }
}

/// Process-wide state shared by workers, the admin listener and the control loop.
#[derive(Debug)]
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub shutting_down: AtomicBool,
}

impl Shared {
    pub fn new(config: Arc<Config>) -> Shared {
        Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::build(config, None)),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Installs a new config, carrying over backend state.
    pub fn swap(&self, config: Arc<Config>) {
        let prev = self.snapshot.load_full();
        self.snapshot.store(Arc::new(Snapshot::build(config, Some(&prev))));
    }
}
