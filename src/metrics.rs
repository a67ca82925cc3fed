//! Metric names, in one place, and the Prometheus recorder. Hot-path metrics are
//! pre-registered handles built once per config load (`PoolMetrics`), so recording is
//! an atomic add with no label hashing per request. Cold-path pool events (retries,
//! hedges, breaker trips) use the macros with labels. Per-backend series live on the
//! backend (`state::BackendCounters`) and `admin` renders them.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "rampart_requests_total";
pub const REQUEST_DURATION: &str = "rampart_request_duration_seconds";
pub const PROXY_ERRORS: &str = "rampart_proxy_errors_total";
pub const UPSTREAM_CONNECTS: &str = "rampart_upstream_connections_opened_total";
/// The per-backend series are written by `admin` from the live snapshot at each
/// scrape, not kept in the recorder.
pub const UPSTREAM_ERRORS: &str = "rampart_upstream_errors_total";
pub const EJECTIONS: &str = "rampart_ejections_total";
pub const RESTORES: &str = "rampart_restores_total";
pub const BACKEND_HEALTHY: &str = "rampart_backend_healthy";
pub const BACKEND_EJECTED: &str = "rampart_backend_ejected";
pub const BACKEND_IN_FLIGHT: &str = "rampart_backend_in_flight";
pub const BACKEND_RESPONSES: &str = "rampart_backend_responses_total";
pub const BACKEND_LATENCY: &str = "rampart_backend_latency_ewma_seconds";
pub const BACKEND_ADMIN_STATE: &str = "rampart_backend_admin_state";
pub const BACKEND_WEIGHT: &str = "rampart_backend_weight";
pub const CONFIG_RELOADS: &str = "rampart_config_reloads_total";
pub const DORMANT_CONNECTIONS: &str = "rampart_dormant_connections";
pub const CLIENT_CONNECTIONS: &str = "rampart_client_connections";
pub const TUNNELS: &str = "rampart_tunnels";
pub const ACCESS_LOG_DROPPED: &str = "rampart_access_log_dropped_lines_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "rampart_tls_handshake_failures_total";
pub const DNS_LOOKUPS: &str = "rampart_dns_lookups_total";
pub const DNS_UPDATES: &str = "rampart_dns_updates_total";
pub const COMPRESSED: &str = "rampart_compressed_responses_total";
pub const COMPRESSION_IN: &str = "rampart_compression_input_bytes_total";
pub const COMPRESSION_OUT: &str = "rampart_compression_output_bytes_total";
pub const MIRROR_SKIPPED: &str = "rampart_mirror_skipped_total";
/// Written by `admin` from the live config at each scrape, not kept in the recorder.
pub const TLS_CERT_EXPIRY: &str = "rampart_tls_certificate_expiry_timestamp_seconds";

const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the global recorder once per process and returns its handle.
pub fn install() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(DURATION_BUCKETS)
            .expect("static bucket list is non-empty")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only when another recorder is installed (an embedding program's); then
        // our handle renders nothing, which is the embedder's choice.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    describe_counter!(REQUESTS, "Requests answered, by pool and status class");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from request to response headers, by pool"
    );
    describe_counter!(PROXY_ERRORS, "Error responses rampart generated, by kind");
    describe_counter!(UPSTREAM_CONNECTS, "New connections opened to backends");
    describe_counter!(CONFIG_RELOADS, "Config reloads, by result");
    describe_counter!(
        DNS_LOOKUPS,
        "Lookups of a dns_refresh pool's backend names, by pool and result (ok, error)"
    );
    describe_counter!(
        DNS_UPDATES,
        "Changes to a dns_refresh pool's backends from a new DNS answer, by pool"
    );
    describe_counter!(
        COMPRESSED,
        "Responses gzipped on their way to the client (compress), by pool"
    );
    describe_counter!(
        COMPRESSION_IN,
        Unit::Bytes,
        "Bytes of response bodies that went into gzip, by pool"
    );
    describe_counter!(
        COMPRESSION_OUT,
        Unit::Bytes,
        "Bytes that came out of gzip, by pool: over the input bytes, the compression ratio"
    );
    describe_counter!(
        ACCESS_LOG_DROPPED,
        "Access-log lines lost because writing them failed (a full disk, say)"
    );
    describe_gauge!(
        DORMANT_CONNECTIONS,
        "Idle keep-alive client connections waiting without a task"
    );
    describe_gauge!(
        CLIENT_CONNECTIONS,
        "Open client connections, tunnels and dormant ones included"
    );
    describe_gauge!(TUNNELS, "Open WebSocket (upgraded) tunnels");
    describe_counter!(
        MIRROR_SKIPPED,
        "Requests not mirrored to this pool because their body streamed (too large to keep, or chunked)"
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS connections that failed before a request: error, timeout, or plain_http (plain HTTP sent to a TLS listener)"
    );
}

/// Pre-registered per-pool handles for the hot path.
#[derive(Debug)]
pub struct PoolMetrics {
    /// Index 0 is "other", 1..=5 are 1xx..5xx.
    by_class: [Counter; 6],
    pub duration: Histogram,
    pub compression: crate::compress::Counters,
}

impl PoolMetrics {
    pub fn new(pool: &str) -> PoolMetrics {
        let c = |class: &'static str| metrics::counter!(REQUESTS, "pool" => pool.to_string(), "class" => class);
        PoolMetrics {
            by_class: [c("other"), c("1xx"), c("2xx"), c("3xx"), c("4xx"), c("5xx")],
            duration: metrics::histogram!(REQUEST_DURATION, "pool" => pool.to_string()),
            compression: crate::compress::Counters {
                responses: metrics::counter!(COMPRESSED, "pool" => pool.to_string()),
                bytes_in: metrics::counter!(COMPRESSION_IN, "pool" => pool.to_string()),
                bytes_out: metrics::counter!(COMPRESSION_OUT, "pool" => pool.to_string()),
            },
        }
    }

    pub fn record(&self, status: u16, elapsed: std::time::Duration) {
        let class = (status / 100) as usize;
        self.by_class[if (1..=5).contains(&class) { class } else { 0 }].increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
}
