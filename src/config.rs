//! Configuration: the raw TOML form (`File*` structs, serde with `deny_unknown_fields`
//! and humantime durations) and its validation into the typed [`Config`].
//!
//! Validation never stops at the first problem: every section is deserialized on its
//! own and every semantic check runs, so `rampart check` prints every error with its
//! field path at once, the way `nginx -t` does. This module owns defaults (each a named
//! constant with its reason) and cross-field checks. It does not own live state: that
//! is `state.rs`, built from a validated `Config`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::header_rules::{Direction, HeaderRules};
use serde::Deserialize;

// ---- defaults, each with its reason -------------------------------------------------

/// Shutdown waits this long for in-flight requests, like Kubernetes' default grace period.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Per-worker cap on client connections; enough for 10k idle keep-alive clients per worker.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// Slowloris defence: time to send complete request headers, and for a new connection
/// to send its first byte (HAProxy's `timeout http-request`).
pub const DEFAULT_CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between two reads of a request body from the client: nginx's
/// `client_body_timeout` default. A client that stalls mid-upload gets a 408.
pub const DEFAULT_CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a client may take no response bytes before its connection closes:
/// nginx's `send_timeout` default. Stops a client that never reads from holding a
/// backend connection (and the backend worker writing to it) for good.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle wait for the next request on a client keep-alive connection: nginx's
/// `keepalive_timeout` default. An idle connection holds no buffers, so this is cheap.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(75);
/// Requests on one client connection before it closes (HTTP/2: streams before
/// GOAWAY): nginx's `keepalive_requests` default. A client that never reconnects
/// would otherwise stay on one worker, and behind an L4 balancer on one instance, for
/// good; one new connection per thousand requests costs nothing measurable.
pub const DEFAULT_KEEPALIVE_REQUESTS: u32 = 1000;
/// Age of a client connection after which its next response closes it: nginx's
/// `keepalive_time` default, for the same reason.
pub const DEFAULT_KEEPALIVE_TIME: Duration = Duration::from_secs(3600);
/// Total request header bytes before 431; nginx's large_client_header_buffers is 4×8k.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// Request target length before 414, nginx's one large header buffer.
pub const DEFAULT_MAX_URI_BYTES: usize = 8 * 1024;
/// Header count before 431; HAProxy's tune.http.maxhdr is 101.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// HTTP/2 streams per client connection, the value most servers advertise.
pub const DEFAULT_H2_MAX_STREAMS: u32 = 128;
/// Listen backlog; the kernel clamps it to net.core.somaxconn.
pub const DEFAULT_BACKLOG: u32 = 4096;
/// Backends are on the same network; a connect slower than this is a dead host.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time to response headers; nginx's proxy_read_timeout is 60s, Envoy's route timeout 15s.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest wait for more of a response body: nginx's `proxy_read_timeout` default.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Below Node.js's, Apache's and uvicorn's 5s keep-alive, so we never reuse a
/// connection the backend is about to close.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// `tunnel_idle_timeout` default: HAProxy's usual `timeout tunnel 1h`. nginx's 60 s
/// (`proxy_read_timeout`) is the classic cause of dropped idle WebSockets.
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Streams per HTTP/2 backend connection before another is opened: at or below the
/// limit servers commonly announce (nginx 128, hyper 200, Go 250), so requests do not
/// queue behind a full connection.
pub const DEFAULT_UPSTREAM_H2_MAX_STREAMS: u32 = 100;
/// Age after which a backend connection is not reused: nginx's upstream
/// `keepalive_time` default. A backend address that is itself a balancer (a
/// Kubernetes Service, a cloud load balancer) spreads only new connections, so a
/// pool that never reconnects stays on the instances it first reached.
pub const DEFAULT_MAX_CONNECTION_DURATION: Duration = Duration::from_secs(3600);
/// Idle upstream connections kept per backend per worker (nginx `keepalive 32` is common).
pub const DEFAULT_MAX_IDLE_PER_BACKEND: usize = 64;
/// Health-check period: TCP connect once a second is cheap and finds a dead host fast.
pub const DEFAULT_HC_INTERVAL: Duration = Duration::from_secs(1);
/// A probe slower than this counts as a failure.
pub const DEFAULT_HC_TIMEOUT: Duration = Duration::from_millis(500);
/// Successes in a row before a down backend is up again (HAProxy's rise is 2).
pub const DEFAULT_HC_RISE: u32 = 2;
/// Failures in a row before an up backend is down (fast: passive ejection covers blips).
pub const DEFAULT_HC_FALL: u32 = 2;
/// Consecutive failures that eject a backend (HAProxy's fall is 3; real traffic is
/// evidence enough to act on quickly).
pub const DEFAULT_OUTLIER_CONSECUTIVE: u32 = 3;
/// First ejection; doubles with each ejection in a row. Short, because a returning
/// backend is probed before it gets traffic again.
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(2);
/// Longest ejection.
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(60);
/// At most half a pool is ejected at once (Envoy's max_ejection_percent is 10; half
/// still leaves capacity while shielding clients from a broken half).
pub const DEFAULT_MAX_EJECTED_PERCENT: u32 = 50;
/// Below this share of available backends, balance over all of them (Envoy's 50%).
pub const DEFAULT_PANIC_THRESHOLD: u32 = 50;
/// Tries per request including the first.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 3;
/// Retries after a request was sent may add at most this share of load (Finagle/linkerd).
pub const DEFAULT_BUDGET_PERCENT: u32 = 20;
/// ...plus this many per second, so a quiet pool can still retry.
pub const DEFAULT_BUDGET_MIN_PER_SEC: u32 = 10;
/// Request bodies up to this size are buffered so an idempotent request can be replayed.
pub const DEFAULT_MAX_REPLAY_BYTES: u64 = 64 * 1024;
/// Responses to idempotent requests up to this size are read whole before the client
/// sees a byte, so a backend that resets mid-body is retried instead of truncating.
pub const DEFAULT_RESPONSE_BUFFER_BYTES: usize = 64 * 1024;
/// Jittered exponential backoff between tries after a send: first step and cap.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(2);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(50);
/// Circuit breakers per pool (Envoy's defaults are 1024; ours leave room for 10k clients).
pub const DEFAULT_CB_MAX_CONNECTIONS: u32 = 10_000;
pub const DEFAULT_MAX_PENDING: u32 = 1_024;
pub const DEFAULT_MAX_REQUESTS: u32 = 10_000;
pub const DEFAULT_MAX_RETRIES: u32 = 256;
/// A backend with no weight gets this weight.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Weights above this are rejected: they only make the round-robin table large.
pub const MAX_WEIGHT: u32 = 1000;

// ---- the typed, validated config ------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, for error messages and reloads.
    pub path: Option<PathBuf>,
    pub server: ServerConfig,
    pub admin: Option<AdminConfig>,
    pub listeners: Vec<ListenerConfig>,
    pub routes: Vec<RouteConfig>,
    /// In file order; routes refer to pools by index.
    pub pools: Vec<PoolConfig>,
    /// Custom error pages by status code.
    pub error_pages: HashMap<u16, ErrorPage>,
    /// Every other file the config named and loading read (certificates, keys, CA
    /// bundles, user files, error pages): what `watch_config` watches besides `path`.
    pub inputs: Vec<PathBuf>,
}

thread_local! {
    /// The files read while a config loads on this thread (`Config::inputs`).
    static INPUTS: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Notes a file a config being loaded reads, for `Config::inputs`.
pub fn note_input(path: &Path) {
    INPUTS.with(|i| {
        let mut i = i.borrow_mut();
        if !i.iter().any(|p| p == path) {
            i.push(path.to_path_buf());
        }
    });
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub workers: usize,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    pub client_header_timeout: Duration,
    pub client_body_timeout: Duration,
    pub send_timeout: Duration,
    pub keepalive_timeout: Duration,
    /// `keepalive_requests`: requests a client connection serves (`None`: no limit).
    pub keepalive_requests: Option<std::num::NonZeroU32>,
    /// `keepalive_time`: the age past which a connection serves no further request
    /// (`None`: no limit).
    pub keepalive_time: Option<Duration>,
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    pub max_headers: usize,
    pub h2_max_concurrent_streams: u32,
    pub access_log: AccessLog,
    /// The line format (`accesslog::LogFormat`): `"rampart"` unless set.
    pub access_log_format: Arc<crate::accesslog::LogFormat>,
    /// The nameservers `dns_refresh` pools ask; `None`: /etc/resolv.conf's.
    pub resolvers: crate::dns::Nameservers,
    /// `compress`: what every route without its own `compress` does (`None`: off).
    pub compress: Option<Arc<CompressConfig>>,
    /// `trusted_proxies`: whose word on the client's address is taken (`None`: no one's).
    pub real_ip: Option<Arc<RealIp>>,
    /// `intercept_errors`: what every route without its own setting does.
    pub intercept_errors: bool,
    /// `max_body_bytes`: the limit of every route without its own (`None`: none).
    pub max_body_bytes: Option<u64>,
    /// `watch_config`: reload when the config file, or a file it names, changes.
    pub watch_config: bool,
}

/// `trusted_proxies` and `client_ip_header`: nginx's `set_real_ip_from`,
/// `real_ip_header` and `real_ip_recursive on`; Envoy's `xff_num_trusted_hops`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealIp {
    pub trusted: Vec<ipnet::IpNet>,
    /// Lowercase; `x-forwarded-for` unless set.
    pub header: http::HeaderName,
}

impl RealIp {
    /// Whether `ip` is one of the trusted proxies (an IPv4 address over a dual-stack
    /// socket counts as IPv4).
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        let ip = crate::netio::canonical_ip(ip);
        self.trusted.iter().any(|n| n.contains(&ip))
    }
}

/// Where the access log goes (`accesslog`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    /// `access_log = true`: standard output (journald under systemd).
    Stdout,
    /// `access_log = "path"`: appended to this file (relative paths are resolved
    /// against the config file's directory).
    File(PathBuf),
}

/// As messages name it: `off`, `standard output` or the file's path.
impl std::fmt::Display for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessLog::Off => f.write_str("off"),
            AccessLog::Stdout => f.write_str("standard output"),
            AccessLog::File(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    pub control: AdminControl,
    /// Where the backends' admin states (drain, maint) are saved on each change and
    /// read at start (HAProxy's `server-state-file`); relative to the config file.
    pub state_file: Option<PathBuf>,
}

/// Who may change backends' states through the admin listener (`POST /backends/...`).
/// Loopback by default, as HAProxy's `stats admin if LOCALHOST`: an admin port opened
/// to a network for Prometheus should not also let that network drain the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdminControl {
    /// Clients connecting from 127.0.0.0/8 or ::1.
    #[default]
    Loopback,
    /// Every client that can reach the admin listener.
    Any,
    /// Nobody: the admin listener is read-only.
    None,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub bind: SocketAddr,
    /// What routes' `listeners` call it (`None`: it serves only the routes without).
    pub name: Option<Arc<str>>,
    /// Every request gets a redirect to `https://`, bar routes with
    /// `https_redirect = false` (nginx's `server { listen 80; return 301 ...; }`).
    pub https_redirect: bool,
    pub backlog: u32,
    /// Each connection starts with a PROXY protocol header (`proxyproto`).
    pub proxy_protocol: bool,
    /// TLS termination (`[listeners.tls]`), certificates loaded.
    pub tls: Option<Arc<crate::tls::TlsSettings>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// Lower-cased host without port.
    Exact(String),
    /// `*.example.com` is stored as `.example.com`: any subdomain, not the apex.
    Suffix(String),
}

/// `Default` is for tests and benches that build a route by hand (with every option
/// off and an empty prefix); a config's routes come from `Config::parse`.
#[derive(Debug, Clone, Default)]
pub struct RouteConfig {
    pub host: Option<HostMatch>,
    pub path_prefix: String,
    pub pool: usize,
    pub max_body_bytes: Option<u64>,
    /// `true`: requests that arrive over plain HTTP get a redirect to `https://`
    /// instead. `false`: served over plain HTTP even on a listener with
    /// `https_redirect` (an ACME http-01 challenge route). `None`: as the listener says.
    pub https_redirect: Option<bool>,
    /// Fields to remove, set and add on the request to the backend (`None`: none).
    pub request_headers: Option<Arc<HeaderRules>>,
    /// The same on every response to a request this route matched.
    pub response_headers: Option<Arc<HeaderRules>>,
    /// `prefix_rewrite` or `path_rewrite`: how the path the backend gets differs from
    /// the one routed.
    pub rewrite: Option<PathRewrite>,
    /// With `prefix_rewrite`: a backend's `Location` under the rewritten prefix is
    /// mapped back under `path_prefix` (nginx's `proxy_redirect default`).
    pub rewrite_location: bool,
    /// Requests per client (by `key`) past which the route answers 429.
    pub rate_limit: Option<RateLimitConfig>,
    /// Requests per client (by `key`) in flight at once past which the route answers 429.
    pub in_flight_limit: Option<InFlightLimitConfig>,
    /// What else a request must have to take this route (`None`: nothing).
    pub matches: Option<Arc<RouteMatch>>,
    /// `pools`: the requests split over several pools by weight (`pool` is then the
    /// first with a weight, for what needs one).
    pub split: Option<Arc<PoolSplit>>,
    /// Replaces the pool's time to response headers, per try, for this route's
    /// requests (nginx's `proxy_read_timeout` in one `location`).
    pub response_timeout: Option<Duration>,
    /// `retry = { attempts, hedge }`: the pool's, changed for this route's requests.
    pub retry: Option<RouteRetry>,
    /// `access_log = false`: the route's requests get no access-log line.
    pub skip_access_log: bool,
    /// `allow` and `deny`: which client addresses the route admits (`None`: all).
    pub access: Option<Arc<AccessRules>>,
    /// `return`: the route answers itself (nginx's `return`, Envoy's
    /// `direct_response` and `redirect`); `pool` is then unused.
    pub direct: Option<Arc<DirectResponse>>,
    /// gzip for the route's responses: its own `compress`, else the server's.
    pub compress: Option<Arc<CompressConfig>>,
    /// `basic_auth`: requests must carry a user and password of its file, else 401.
    pub basic_auth: Option<Arc<crate::auth::BasicAuth>>,
    /// `forward_auth`: each request is first put to an auth pool, which lets it pass.
    pub forward_auth: Option<Arc<ForwardAuth>>,
    /// `intercept_errors`: a backend's response whose status has an `[error_pages]`
    /// page gets that page in place of its own body (nginx's `proxy_intercept_errors`).
    pub intercept_errors: bool,
    /// `mirror`: a copy of the route's requests goes to another pool (`mirror.rs`).
    pub mirror: Option<Arc<Mirror>>,
}

/// A route's `mirror = { pool, percent }`.
#[derive(Debug, PartialEq)]
pub struct Mirror {
    /// Index into the config's pools.
    pub pool: usize,
    /// The share of requests copied, above 0 and up to 100.
    pub percent: f64,
}

/// A route's `forward_auth = { pool, path, auth_response_headers }`: Traefik's
/// ForwardAuth, nginx's `auth_request`, Envoy's HTTP `ext_authz`.
#[derive(Debug, PartialEq, Eq)]
pub struct ForwardAuth {
    /// The pool that decides; index into the config's pools.
    pub pool: usize,
    /// Where it is asked (`GET path`), in origin form.
    pub path: http::uri::PathAndQuery,
    /// Fields of a 2xx answer that go on to the backend, replacing the client's.
    pub response_headers: Vec<http::HeaderName>,
    /// Cookies a 2xx answer sets (a refreshed session) that go on to the client with
    /// the response, by name (Traefik's `addAuthCookiesToResponse`).
    pub response_cookies: Vec<String>,
}

pub use crate::compress::CompressConfig;

/// A route's own answer (`return = { status = 301, location = "..." }`).
#[derive(Debug, PartialEq, Eq)]
pub struct DirectResponse {
    pub status: http::StatusCode,
    /// For a redirect: with `$variables`, filled in per request.
    pub location: Option<crate::header_rules::Value>,
    pub body: bytes::Bytes,
    pub content_type: Option<http::HeaderValue>,
}

/// A route's `allow` and `deny` lists of addresses and CIDR blocks (nginx's
/// `allow`/`deny`, HAProxy's `src` ACLs, Envoy's RBAC on the source IP). Matched
/// against the client's address, the PROXY protocol header's source on a
/// `proxy_protocol` listener.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessRules {
    pub allow: Vec<ipnet::IpNet>,
    pub deny: Vec<ipnet::IpNet>,
}

impl AccessRules {
    /// Denied if `deny` holds the address; else admitted if `allow` is empty or
    /// holds it. An IPv4 client of a dual-stack socket is matched as IPv4.
    pub fn admits(&self, ip: std::net::IpAddr) -> bool {
        let ip = crate::netio::canonical_ip(ip);
        !self.deny.iter().any(|n| n.contains(&ip))
            && (self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip)))
    }
}

/// A route's `pools = { NAME = WEIGHT, ... }`: Envoy's `weighted_clusters`, nginx's
/// `split_clients`, for a canary that takes a share of the traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSplit {
    /// Pool indexes and weights, in name order; weights may be 0.
    pub pools: Vec<(usize, u32)>,
    pub total: u32,
    /// `split_key`: a client's share is fixed by this (same key, same pool while the
    /// weights stay); without it each request is drawn at random.
    pub key: Option<HashKey>,
}

impl PoolSplit {
    /// The pool for a request whose `split_key` hashed to `hash` (`None`: random).
    pub fn pick(&self, hash: Option<u64>) -> usize {
        // The hash's top bits as a fraction of the total, so a client keeps its place
        // in the line when the total changes, and a canary that grows keeps the
        // clients it had (those at the end of the line).
        let at = match hash {
            Some(h) => (((h >> 32) * self.total as u64) >> 32) as u32,
            None => fastrand::u32(..self.total),
        };
        let mut acc = 0;
        for &(pool, weight) in &self.pools {
            acc += weight;
            if at < acc {
                return pool;
            }
        }
        // `total` is the sum of the weights, so `at` always falls inside.
        self.pools.last().map_or(0, |p| p.0)
    }
}

/// A route's `retry`: what it changes of its pool's `retry` for its own requests
/// (Envoy's route `retry_policy`, nginx's `proxy_next_upstream_tries` in one
/// `location`). The rest (budget, backoff, buffers, `on_status`) stays the pool's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRetry {
    pub attempts: Option<u32>,
    pub hedge: Option<bool>,
}

/// How a route changes the path its backend gets.
#[derive(Debug, Clone)]
pub enum PathRewrite {
    /// `prefix_rewrite`: the matched `path_prefix` is replaced by this.
    Prefix(String),
    /// `path_rewrite`: every match of a pattern in the path is replaced.
    Regex(Arc<RegexRewrite>),
}

/// A route's `path_rewrite = { regex, replace }`: Envoy's `regex_rewrite`, nginx's
/// `rewrite ... break`, HAProxy's `replace-path`.
#[derive(Debug)]
pub struct RegexRewrite {
    pub regex: regex::Regex,
    /// With `$1`, `${name}` for the groups (`regex`'s replacement syntax).
    pub replace: String,
    /// `replace` ends in `?`: the client's query is dropped, as in nginx's `rewrite`
    /// (otherwise it follows any query `replace` makes, after `&`).
    pub drops_query: bool,
}

/// A route's conditions beyond host and prefix: its `methods`, `headers` and
/// `path_regex`. A route with conditions is tried before one without at the same host
/// and prefix (`router`), as Envoy's and HAProxy's ordered rules let a canary route
/// sit above its catch-all.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    /// Any of these (empty: any method).
    pub methods: Vec<http::Method>,
    /// Every one of these.
    pub headers: Vec<(http::HeaderName, HeaderCondition)>,
    /// The path (without its query, dot segments removed) must contain a match.
    pub path_regex: Option<regex::Regex>,
    /// The connection came in on a listener of one of these names (empty: any).
    pub listeners: Vec<Arc<str>>,
}

/// Patterns compare by their text (a reload keeps a route whose conditions are the
/// same, and two routes with the same ones are a config error).
impl PartialEq for RouteMatch {
    fn eq(&self, other: &Self) -> bool {
        self.methods == other.methods
            && self.listeners == other.listeners
            && self.headers == other.headers
            && self.path_regex.as_ref().map(regex::Regex::as_str) == other.path_regex.as_ref().map(regex::Regex::as_str)
    }
}

#[derive(Debug, Clone)]
pub enum HeaderCondition {
    /// A field of that name has exactly this value.
    Equals(http::HeaderValue),
    Present,
    Absent,
    /// A field of that name has a value that contains a match.
    Matches(regex::bytes::Regex),
}

impl PartialEq for HeaderCondition {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (HeaderCondition::Equals(a), HeaderCondition::Equals(b)) => a == b,
            (HeaderCondition::Present, HeaderCondition::Present) => true,
            (HeaderCondition::Absent, HeaderCondition::Absent) => true,
            (HeaderCondition::Matches(a), HeaderCondition::Matches(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl RouteMatch {
    /// Whether a request with `method` and `path` and the fields `headers` gives
    /// (asked only when a header condition needs them), on a connection to the
    /// listener named `listener`, meets every condition.
    pub fn fits<'h>(
        &self,
        method: &http::Method,
        path: &str,
        listener: Option<&str>,
        headers: impl FnOnce() -> &'h http::HeaderMap,
    ) -> bool {
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return false;
        }
        if !self.listeners.is_empty() && !listener.is_some_and(|l| self.listeners.iter().any(|n| &**n == l)) {
            return false;
        }
        if self.path_regex.as_ref().is_some_and(|r| !r.is_match(path)) {
            return false;
        }
        if self.headers.is_empty() {
            return true;
        }
        let fields = headers();
        self.headers.iter().all(|(name, cond)| match cond {
            HeaderCondition::Present => fields.contains_key(name),
            HeaderCondition::Absent => !fields.contains_key(name),
            HeaderCondition::Equals(v) => fields.get_all(name).iter().any(|x| x == v),
            HeaderCondition::Matches(r) => fields.get_all(name).iter().any(|x| r.is_match(x.as_bytes())),
        })
    }
}

/// A route's `rate_limit`: each client (as `key` tells them apart) may send
/// `requests_per_second` on average, and `burst` at once.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    pub requests_per_second: f64,
    pub burst: u32,
    pub key: HashKey,
}

/// A route's `in_flight_limit`: each client (as `key` tells them apart) may have at
/// most `max` requests in flight on the route.
#[derive(Debug, Clone, PartialEq)]
pub struct InFlightLimitConfig {
    pub max: u32,
    pub key: HashKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    RoundRobin,
    LeastRequest,
    PeakEwma,
    ConsistentHash,
    Random,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
    ClientIp,
    /// The target's path and query, as the backend gets it: nginx's `hash $request_uri
    /// consistent` and HAProxy's `balance uri`, for caches, each URL on one backend.
    Uri,
    /// The path alone (HAProxy's `balance uri path-only`).
    Path,
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// For logs and metrics labels, unique in its pool: as written in the file, or
    /// for an address a name resolved to in a `dns_refresh` pool, `name:port (ip)`.
    pub name: String,
    /// As written in the file (for an HTTP check's default `Host`).
    pub written: String,
    pub addr: SocketAddr,
    pub weight: u32,
    /// Gets requests only while no other backend of the pool can take them (nginx's
    /// and HAProxy's `backup`).
    pub backup: bool,
    /// The most requests it may have in flight, all workers together (nginx's
    /// `max_conns`, HAProxy's `maxconn`); `None`: no limit.
    pub max_in_flight: Option<u32>,
    /// For a pool with `tls`: the name its certificate is verified against (and
    /// sent as SNI).
    pub tls_name: Option<rustls::pki_types::ServerName<'static>>,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub backends: Vec<BackendConfig>,
    pub balancer: BalancerKind,
    pub hash_key: HashKey,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    /// An upgraded connection (WebSocket) closes after this long with no bytes
    /// either way.
    pub tunnel_idle_timeout: Duration,
    /// The longest wait for more of a response body once its head arrived.
    pub read_timeout: Duration,
    pub max_idle_per_backend: usize,
    pub health_check: HealthCheckConfig,
    pub outlier: OutlierConfig,
    pub retry: RetryConfig,
    pub circuit_breaker: BreakerConfig,
    /// Ramp a recovered or newly added backend's share up over this window; 0 is off.
    pub slow_start: Duration,
    /// TLS to the backends (`[pools.NAME.tls]`), trust store and client certificate
    /// loaded.
    pub tls: Option<Arc<crate::backend_tls::BackendTls>>,
    /// What the pool's backends speak: HTTP/1.1, or HTTP/2 (`protocol = "h2"`).
    pub protocol: UpstreamProtocol,
    /// With HTTP/2: streams one connection carries before another is opened.
    pub h2_max_streams: u32,
    /// Requests one backend connection carries before it is closed (Envoy's
    /// `max_requests_per_connection`, nginx's upstream `keepalive_requests`);
    /// `u32::MAX`: no limit.
    pub max_requests_per_connection: u32,
    /// Age past which a backend connection takes no further request (Envoy's
    /// `max_connection_duration`, nginx's upstream `keepalive_time`); `None`: none.
    pub max_connection_duration: Option<Duration>,
    /// With `dns_refresh`: the backends as written, looked up again every so often
    /// (`dns`); `backends` then holds the last answer's addresses.
    pub dns: Option<crate::dns::DnsPool>,
    /// Session affinity by a cookie rampart sets (`sticky = { cookie = ... }`).
    pub sticky: Option<StickyConfig>,
}

/// `[pools.NAME] sticky`: a client keeps to the backend its cookie names (HAProxy's
/// `cookie NAME insert`, Traefik's and Envoy's sticky cookies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickyConfig {
    pub cookie: String,
    /// What follows `NAME=VALUE` in the `Set-Cookie` field: `; Path=/; HttpOnly`,
    /// with `Domain`, `Max-Age` and `SameSite` when they are set.
    pub attributes: String,
    /// `Secure` always (`true`), never (`false`), or when the client came over TLS.
    pub secure: Option<bool>,
}

/// A pool's protocol to its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2: prior knowledge (h2c) on plain connections, ALPN `h2` over TLS. A few
    /// multiplexed connections per backend per worker (`h2up`).
    H2,
}

impl UpstreamProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2 => "h2",
        }
    }
}

#[derive(Debug, Clone)]
pub struct OutlierConfig {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u32,
    pub panic_threshold: u32,
    /// Eject a backend whose share of failed tries over `interval` reaches this
    /// percentage (Envoy's `failure_percentage_threshold`); `None`: off.
    pub failure_percentage: Option<u32>,
    /// Tries a backend must have had in the interval to be judged by the percentage.
    pub failure_percentage_min_requests: u32,
    /// Eject a backend whose success rate over `interval` is this many standard
    /// deviations below the pool's mean (Envoy's `success_rate_stdev_factor`, / 1000
    /// there); `None`: off.
    pub success_rate_stdev_factor: Option<f64>,
    /// Backends with enough tries (`success_rate_min_requests`) needed for a mean.
    pub success_rate_min_hosts: u32,
    /// Tries a backend must have had in the interval to count toward the mean.
    pub success_rate_min_requests: u32,
    /// The window each judgment by `failure_percentage` or `success_rate_*` covers.
    pub interval: Duration,
    /// Either judgment is on: workers count each try's outcome (`outcomes`).
    pub counts_outcomes: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HedgeDelay {
    /// From the pool's observed latency (its recent p95), clamped.
    Auto,
    Fixed(Duration),
}

#[derive(Debug, Clone)]
pub struct RetryConfig {
    pub attempts: u32,
    pub budget_percent: u32,
    pub budget_min_per_sec: u32,
    pub max_replay_bytes: u64,
    pub response_buffer_bytes: usize,
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub hedge: bool,
    pub hedge_delay: HedgeDelay,
    /// `on_status`: the 5xx statuses that mean the backend failed (retried for
    /// idempotent requests, counted for ejection): bit `s - 500` for status `s`.
    pub on_status: u128,
}

/// 502, 503 and 504: the gateway errors, as Envoy's `gateway-error`.
pub const DEFAULT_ON_STATUS: u128 = 0b11100;

impl RetryConfig {
    /// Whether `status` is one of `on_status`.
    #[inline(always)]
    pub fn fails_on(&self, status: u16) -> bool {
        status.wrapping_sub(500) < 100 && (self.on_status >> (status - 500)) & 1 == 1
    }
}

#[derive(Debug, Clone)]
pub struct BreakerConfig {
    pub max_connections: u32,
    pub max_pending: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    Tcp,
    Http,
    /// gRPC's health checking protocol (`grpc.health.v1.Health/Check`), over HTTP/2.
    Grpc,
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    pub kind: HealthCheckKind,
    pub path: String,
    pub method: String,
    pub host: Option<String>,
    /// Inclusive ranges of statuses that pass.
    pub expect_status: Vec<(u16, u16)>,
    /// Text the response body must contain, within its first `health::BODY_LIMIT`
    /// bytes (HAProxy's `http-check expect string`).
    pub expect_body: Option<String>,
    /// Fields every probe carries (a token the health endpoint wants, a
    /// `User-Agent` the app's logs filter on), by name.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// With `Grpc`: the service asked about (`""`: the server as a whole).
    pub service: String,
    /// Probe this port of each backend in place of the one traffic goes to.
    pub port: Option<u16>,
    /// Probe over the pool's TLS (false: in clear, for a pool with `tls` whose
    /// backends answer checks on a plain port).
    pub tls: bool,
    pub interval: Duration,
    pub timeout: Duration,
    pub jitter: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl PoolConfig {
    /// How long one try waits for the response head: `retry.per_try_timeout`, else
    /// `response_timeout`.
    pub fn try_timeout(&self) -> Duration {
        self.retry.per_try_timeout.unwrap_or(self.response_timeout)
    }
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            kind: HealthCheckKind::Tcp,
            path: "/".into(),
            method: "GET".into(),
            host: None,
            expect_status: vec![(200, 399)],
            expect_body: None,
            headers: Vec::new(),
            service: String::new(),
            port: None,
            tls: true,
            interval: DEFAULT_HC_INTERVAL,
            timeout: DEFAULT_HC_TIMEOUT,
            jitter: DEFAULT_HC_INTERVAL / 10,
            rise: DEFAULT_HC_RISE,
            fall: DEFAULT_HC_FALL,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ErrorPage {
    pub content_type: &'static str,
    pub body: bytes::Bytes,
}

// ---- errors --------------------------------------------------------------------------

/// One problem in a config file, with the field path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if e.path.is_empty() {
                write!(f, "{}: {}", self.file, e.message)?;
            } else {
                write!(f, "{}: {}: {}", self.file, e.path, e.message)?;
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// One error, `message`, for each of `fields` (under `at`) that is set.
    fn each_set(&mut self, at: &str, fields: &[(bool, &str)], message: &str) {
        for &(set, field) in fields {
            if set {
                self.push(format!("{at}.{field}"), message);
            }
        }
    }
}

// ---- the raw file form ---------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLogFilter {
    min_status: Option<u16>,
    #[serde(default, with = "humantime_serde")]
    slower_than: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    workers: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    shutdown_grace: Option<Duration>,
    max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    client_header_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    client_body_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    send_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    keepalive_timeout: Option<Duration>,
    keepalive_requests: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    keepalive_time: Option<Duration>,
    max_header_bytes: Option<usize>,
    max_uri_bytes: Option<usize>,
    max_headers: Option<usize>,
    h2_max_concurrent_streams: Option<u32>,
    /// `true`, `false` or a file path: checked in `validate_server`.
    access_log: Option<toml::Value>,
    access_log_format: Option<String>,
    access_log_escape: Option<String>,
    access_log_filter: Option<FileLogFilter>,
    resolvers: Option<Vec<String>>,
    compress: Option<toml::Value>,
    trusted_proxies: Option<Vec<String>>,
    client_ip_header: Option<String>,
    intercept_errors: Option<bool>,
    max_body_bytes: Option<u64>,
    watch_config: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    bind: String,
    control: Option<AdminControl>,
    state_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListener {
    bind: String,
    name: Option<String>,
    https_redirect: Option<bool>,
    backlog: Option<u32>,
    proxy_protocol: Option<bool>,
    tls: Option<FileTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    certificates: Vec<FileCert>,
    min_version: Option<String>,
    http2: Option<bool>,
    strict_sni: Option<bool>,
    client_ca: Option<String>,
    client_verify: Option<String>,
    forward_client_cert: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCert {
    cert: String,
    key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    host: Option<String>,
    path_prefix: Option<String>,
    pool: Option<String>,
    pools: Option<toml::Table>,
    split_key: Option<String>,
    #[serde(default, with = "humantime_serde")]
    response_timeout: Option<Duration>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
    max_body_bytes: Option<u64>,
    https_redirect: Option<bool>,
    #[serde(rename = "return")]
    direct: Option<toml::Value>,
    prefix_rewrite: Option<String>,
    path_rewrite: Option<FilePathRewrite>,
    rewrite_location: Option<bool>,
    request_headers: Option<toml::Value>,
    response_headers: Option<toml::Value>,
    rate_limit: Option<FileRateLimit>,
    in_flight_limit: Option<FileInFlightLimit>,
    methods: Option<Vec<String>>,
    headers: Option<toml::Table>,
    path_regex: Option<String>,
    listeners: Option<Vec<String>>,
    retry: Option<toml::Value>,
    access_log: Option<bool>,
    compress: Option<toml::Value>,
    basic_auth: Option<FileBasicAuth>,
    forward_auth: Option<FileForwardAuth>,
    mirror: Option<FileMirror>,
    intercept_errors: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMirror {
    pool: String,
    percent: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePathRewrite {
    regex: String,
    replace: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForwardAuth {
    pool: String,
    path: String,
    #[serde(default)]
    auth_response_headers: Vec<String>,
    #[serde(default)]
    auth_response_cookies: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBasicAuth {
    realm: Option<String>,
    user_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCompress {
    types: Option<Vec<String>>,
    min_length: Option<u64>,
    level: Option<u32>,
    encodings: Option<Vec<String>>,
    zstd_level: Option<i32>,
    brotli_level: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRateLimit {
    requests_per_second: f64,
    burst: Option<u32>,
    key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileInFlightLimit {
    max: u32,
    key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    addr: String,
    weight: Option<u32>,
    backup: Option<bool>,
    max_in_flight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePool {
    backends: Vec<toml::Value>,
    balancer: Option<BalancerKind>,
    hash_key: Option<String>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    response_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    tunnel_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    read_timeout: Option<Duration>,
    max_idle_per_backend: Option<usize>,
    health_check: Option<toml::Value>,
    outlier: Option<toml::Value>,
    retry: Option<toml::Value>,
    circuit_breaker: Option<toml::Value>,
    #[serde(default, with = "humantime_serde")]
    slow_start: Option<Duration>,
    tls: Option<toml::Value>,
    protocol: Option<String>,
    h2_max_streams: Option<u32>,
    max_requests_per_connection: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    max_connection_duration: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    dns_refresh: Option<Duration>,
    sticky: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSticky {
    cookie: String,
    #[serde(default, with = "humantime_serde")]
    max_age: Option<Duration>,
    path: Option<String>,
    domain: Option<String>,
    same_site: Option<String>,
    secure: Option<bool>,
    http_only: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackendTls {
    verify: Option<bool>,
    ca: Option<String>,
    server_name: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    min_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOutlier {
    consecutive_failures: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    base_ejection: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_ejection: Option<Duration>,
    max_ejected_percent: Option<u32>,
    panic_threshold: Option<u32>,
    failure_percentage: Option<u32>,
    failure_percentage_min_requests: Option<u32>,
    /// The older name of `interval`, from when only `failure_percentage` used it.
    #[serde(default, with = "humantime_serde")]
    failure_percentage_interval: Option<Duration>,
    success_rate_stdev_factor: Option<f64>,
    success_rate_min_hosts: Option<u32>,
    success_rate_min_requests: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRetry {
    attempts: Option<u32>,
    budget_percent: Option<u32>,
    budget_min_per_sec: Option<u32>,
    max_replay_bytes: Option<u64>,
    response_buffer_bytes: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    per_try_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    backoff_base: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    backoff_max: Option<Duration>,
    hedge: Option<bool>,
    hedge_delay: Option<String>,
    on_status: Option<Vec<u16>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBreaker {
    max_connections: Option<u32>,
    max_pending: Option<u32>,
    max_requests: Option<u32>,
    max_retries: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHealthCheck {
    #[serde(rename = "type")]
    kind: Option<HealthCheckKind>,
    path: Option<String>,
    method: Option<String>,
    host: Option<String>,
    expect_status: Option<String>,
    expect_body: Option<String>,
    headers: Option<std::collections::BTreeMap<String, String>>,
    service: Option<String>,
    port: Option<u16>,
    tls: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    jitter: Option<Duration>,
    rise: Option<u32>,
    fall: Option<u32>,
}

const TOP_LEVEL_KEYS: &[&str] = &["server", "admin", "listeners", "routes", "pools", "error_pages"];

// ---- loading -------------------------------------------------------------------------

impl Config {
    /// Reads and validates a file. Every error names the file and the field.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            errors: vec![FieldError {
                path: String::new(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        INPUTS.with(|i| i.borrow_mut().clear());
        let cfg = Config::parse_with_base(&text, &file, &base);
        let inputs = INPUTS.with(|i| std::mem::take(&mut *i.borrow_mut()));
        let mut cfg = cfg?;
        cfg.path = Some(path.to_path_buf());
        cfg.inputs = inputs;
        Ok(cfg)
    }

    /// Validates TOML text; `name` is used in error messages, relative error-page
    /// files are resolved against the current directory.
    pub fn parse(text: &str, name: &str) -> Result<Config, ConfigError> {
        Config::parse_with_base(text, name, Path::new("."))
    }

    fn parse_with_base(text: &str, name: &str, base: &Path) -> Result<Config, ConfigError> {
        let fail = |errors| ConfigError {
            file: name.to_string(),
            errors,
        };
        let table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                return Err(fail(vec![FieldError {
                    path: String::new(),
                    message: format!("invalid TOML: {}", e.to_string().trim_end()),
                }]))
            }
        };
        let mut errs = Errors::default();
        let cfg = validate(&table, base, &mut errs);
        if errs.0.is_empty() {
            cfg.ok_or_else(|| fail(vec![]))
        } else {
            Err(fail(errs.0))
        }
    }
}

/// Deserializes one section, recording the error under `path` (plus the inner path).
/// A route's `methods` and `headers` conditions.
/// A `path_regex` or header `regex`: Rust's `regex` syntax, with a compiled-size cap
/// so that a pattern cannot make a config load take gigabytes.
fn pattern<R>(
    text: &str,
    at: String,
    errs: &mut Errors,
    build: impl FnOnce(&str) -> Result<R, regex::Error>,
) -> Option<R> {
    match build(text) {
        Ok(r) => Some(r),
        Err(e) => {
            // The engine's message spans lines (the pattern, a caret, the reason).
            let reason = e
                .to_string()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            errs.push(at, format!("not a valid pattern: {reason}"));
            None
        }
    }
}

const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// `pattern` for a text (not bytes) pattern: a path's.
fn path_pattern(text: &str, at: String, errs: &mut Errors) -> Option<regex::Regex> {
    pattern(text, at, errs, |t| {
        regex::RegexBuilder::new(t).size_limit(PATTERN_SIZE_LIMIT).build()
    })
}

/// A route's `path_rewrite`. Beyond the pattern, `replace` is checked here so that
/// no request can find a mistake in it: each `$` reference must name a group of the
/// pattern (`regex` would put nothing in silently), and its text must be valid in a
/// path and query, since only it (never a captured piece of the path) can bring a
/// character that is not.
fn path_rewrite(raw: &FilePathRewrite, at: &str, errs: &mut Errors) -> Option<RegexRewrite> {
    let regex = path_pattern(&raw.regex, format!("{at}.regex"), errs)?;
    let mut ok = true;
    let mut literal = String::with_capacity(raw.replace.len());
    let mut rest = raw.replace.as_str();
    while let Some(at_dollar) = rest.find('$') {
        literal.push_str(&rest[..at_dollar]);
        let after = &rest[at_dollar + 1..];
        let (name, braced, next) = if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                Some(end) => (&inner[..end], true, &inner[end + 1..]),
                // `regex` reads an unclosed `${` as text.
                None => ("", false, after),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], false, &after[end..])
        };
        if let Some(tail) = after.strip_prefix('$') {
            literal.push('$');
            rest = tail;
            continue;
        }
        if name.is_empty() {
            literal.push('$');
            rest = after;
            continue;
        }
        let known = match name.parse::<usize>() {
            Ok(n) => n < regex.captures_len(),
            Err(_) => regex.capture_names().flatten().any(|g| g == name),
        };
        if !known {
            ok = false;
            let groups = regex.captures_len() - 1;
            let digits = name.bytes().take_while(u8::is_ascii_digit).count();
            let hint = if !braced && digits > 0 && digits < name.len() {
                format!(
                    "; for group {} followed by {:?}, write ${{{}}}{}",
                    &name[..digits],
                    &name[digits..],
                    &name[..digits],
                    &name[digits..]
                )
            } else {
                String::new()
            };
            errs.push(
                format!("{at}.replace"),
                format!("${name} names no group of the pattern, which has {groups} (and $0, the whole match){hint}"),
            );
        }
        rest = next;
    }
    literal.push_str(rest);
    // The `/` stands for the one a path that comes out without it is given.
    if literal.contains('#') || http::uri::PathAndQuery::try_from(format!("/{literal}")).is_err() {
        ok = false;
        errs.push(
            format!("{at}.replace"),
            format!(
                "{:?} is not valid in a path (percent-encode spaces and other special characters)",
                raw.replace
            ),
        );
    }
    ok.then(|| RegexRewrite {
        regex,
        replace: raw.replace.clone(),
        drops_query: raw.replace.ends_with('?'),
    })
}

fn route_match(
    raw: &FileRoute,
    listeners: &[ListenerConfig],
    path: &str,
    errs: &mut Errors,
) -> Option<Arc<RouteMatch>> {
    let (methods, headers, path_regex) = (raw.methods.as_deref(), raw.headers.as_ref(), raw.path_regex.as_deref());
    let mut m = RouteMatch::default();
    if let Some(names) = &raw.listeners {
        if names.is_empty() {
            errs.push(
                format!("{path}.listeners"),
                "is empty: no request could match (omit it for every listener)",
            );
        }
        for (i, name) in names.iter().enumerate() {
            match listeners
                .iter()
                .find_map(|l| l.name.as_ref().filter(|n| ***n == **name))
            {
                Some(n) => m.listeners.push(n.clone()),
                None => {
                    let named: Vec<&str> = listeners.iter().filter_map(|l| l.name.as_deref()).collect();
                    errs.push(
                        format!("{path}.listeners[{i}]"),
                        match named.is_empty() {
                            true => format!(
                                "no listener is named {name:?}: give one a name (name = {name:?} under [[listeners]])"
                            ),
                            false => format!("no listener is named {name:?} (named: {})", named.join(", ")),
                        },
                    );
                }
            }
        }
    }
    if let Some(text) = path_regex {
        m.path_regex = path_pattern(text, format!("{path}.path_regex"), errs);
    }
    if let Some(methods) = methods {
        if methods.is_empty() {
            errs.push(
                format!("{path}.methods"),
                "is empty: no request could match (omit it for any method)",
            );
        }
        for (i, name) in methods.iter().enumerate() {
            // Methods are case-sensitive (RFC 9110 §9.1): `get` is not GET.
            match http::Method::from_bytes(name.as_bytes()) {
                Ok(method) if !name.is_empty() => m.methods.push(method),
                _ => errs.push(format!("{path}.methods[{i}]"), format!("{name:?} is not a method")),
            }
        }
    }
    for (name, value) in headers.into_iter().flatten() {
        let at = format!("{path}.headers.{name}");
        let Ok(field) = http::HeaderName::from_bytes(name.as_bytes()) else {
            errs.push(at, format!("{name:?} is not a header field name"));
            continue;
        };
        let cond = match value {
            toml::Value::String(v) => match http::HeaderValue::from_str(v) {
                Ok(v) => HeaderCondition::Equals(v),
                Err(_) => {
                    errs.push(at, format!("{v:?} is not a valid field value"));
                    continue;
                }
            },
            toml::Value::Boolean(true) => HeaderCondition::Present,
            toml::Value::Boolean(false) => HeaderCondition::Absent,
            toml::Value::Table(t) if t.len() == 1 && t.contains_key("regex") => {
                let Some(toml::Value::String(text)) = t.get("regex") else {
                    errs.push(format!("{at}.regex"), "expected a string (the pattern)");
                    continue;
                };
                let built = pattern(text, format!("{at}.regex"), errs, |t| {
                    regex::bytes::RegexBuilder::new(t)
                        .size_limit(PATTERN_SIZE_LIMIT)
                        .build()
                });
                match built {
                    Some(r) => HeaderCondition::Matches(r),
                    None => continue,
                }
            }
            other => {
                errs.push(
                    at,
                    format!(
                        "expected a string (the exact value), true/false (present/absent) or {{ regex = \"...\" }}, got {}",
                        match other {
                            toml::Value::Table(_) => "another table",
                            o => o.type_str(),
                        }
                    ),
                );
                continue;
            }
        };
        m.headers.push((field, cond));
    }
    (m != RouteMatch::default()).then(|| Arc::new(m))
}

fn section<T: DeserializeOwned>(value: &toml::Value, path: &str, errs: &mut Errors) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value.clone()) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let full = match (path.is_empty(), inner == ".") {
                (_, true) => path.to_string(),
                (true, false) => inner,
                (false, false) => format!("{path}.{inner}"),
            };
            // toml appends "in `key`" on a second line; the path already says where.
            let msg = e.into_inner().to_string();
            errs.push(full, msg.lines().next().unwrap_or("").trim_end().to_string());
            None
        }
    }
}

fn array_items<'a>(table: &'a toml::Table, key: &str, errs: &mut Errors) -> &'a [toml::Value] {
    match table.get(key) {
        None => &[],
        Some(toml::Value::Array(items)) => items,
        Some(_) => {
            errs.push(key, format!("must be an array of tables ([[{key}]])"));
            &[]
        }
    }
}

fn validate(table: &toml::Table, base: &Path, errs: &mut Errors) -> Option<Config> {
    for key in table.keys() {
        if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
            errs.push(
                "",
                format!(
                    "unknown field `{key}`, expected one of `{}`",
                    TOP_LEVEL_KEYS.join("`, `")
                ),
            );
        }
    }

    let server = validate_server(table, base, errs);

    let admin = table.get("admin").and_then(|v| {
        let raw: FileAdmin = section(v, "admin", errs)?;
        let state_file = raw.state_file.as_deref().map(|f| {
            let full = base.join(f);
            if f.trim().is_empty() {
                errs.push("admin.state_file", "must not be empty");
            } else {
                check_file_path(&full, "admin.state_file", errs);
            }
            full
        });
        parse_bind(&raw.bind, "admin.bind", errs).map(|bind| AdminConfig {
            bind,
            control: raw.control.unwrap_or_default(),
            state_file,
        })
    });

    let mut listeners = Vec::new();
    for (i, item) in array_items(table, "listeners", errs).iter().enumerate() {
        let path = format!("listeners[{i}]");
        let Some(raw) = section::<FileListener>(item, &path, errs) else {
            continue;
        };
        let Some(bind) = parse_bind(&raw.bind, &format!("{path}.bind"), errs) else {
            continue;
        };
        if let Some(j) = listeners
            .iter()
            .position(|l: &ListenerConfig| l.bind == bind && bind.port() != 0)
        {
            errs.push(
                format!("{path}.bind"),
                format!("{bind} is already bound by listeners[{j}]"),
            );
        }
        if admin.as_ref().is_some_and(|a| a.bind == bind && bind.port() != 0) {
            errs.push(format!("{path}.bind"), format!("{bind} is already bound by admin.bind"));
        }
        let name = raw.name.and_then(|n| {
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                errs.push(
                    format!("{path}.name"),
                    format!("{n:?}: use letters, digits, '-', '_' and '.'"),
                );
                return None;
            }
            if let Some(j) = listeners
                .iter()
                .position(|l: &ListenerConfig| l.name.as_deref() == Some(&n))
            {
                errs.push(
                    format!("{path}.name"),
                    format!("{n:?} is already listeners[{j}]'s name"),
                );
                return None;
            }
            Some(Arc::<str>::from(n))
        });
        let has_tls = raw.tls.is_some();
        let tls = raw
            .tls
            .and_then(|t| validate_tls(t, &format!("{path}.tls"), base, errs));
        let https_redirect = raw.https_redirect.unwrap_or(false);
        if https_redirect && has_tls {
            errs.push(
                format!("{path}.https_redirect"),
                "a TLS listener's requests came over HTTPS already: set it on the plain-HTTP listener",
            );
        }
        listeners.push(ListenerConfig {
            bind,
            name,
            https_redirect,
            backlog: raw.backlog.unwrap_or(DEFAULT_BACKLOG),
            proxy_protocol: raw.proxy_protocol.unwrap_or(false),
            tls,
        });
    }
    if listeners.is_empty() && !table.contains_key("listeners") {
        errs.push(
            "listeners",
            "at least one [[listeners]] with a bind address is required",
        );
    }

    // Pools before routes, so routes can be checked against pool names.
    let mut pools = Vec::new();
    let mut pool_names_seen = Vec::new();
    match table.get("pools") {
        None => errs.push("pools", "at least one pool is required ([pools.NAME])"),
        Some(toml::Value::Table(t)) => {
            // BTreeMap order is the file's order only by accident; sort for stable output.
            let sorted: BTreeMap<_, _> = t.iter().collect();
            for (name, value) in sorted {
                pool_names_seen.push(name.clone());
                let ns = server.as_ref().map(|s| &s.resolvers);
                if let Some(p) = validate_pool(name, value, base, ns, errs) {
                    pools.push(p);
                }
            }
        }
        Some(_) => errs.push("pools", "must be a table of pools ([pools.NAME])"),
    }

    // Before the routes, which check `intercept_errors` against it.
    let error_pages = validate_error_pages(table, base, errs);
    if server.as_ref().is_some_and(|s| s.intercept_errors) && error_pages.is_empty() {
        errs.push(
            "server.intercept_errors",
            "has nothing to put in place of a backend's page: add [error_pages]",
        );
    }

    let mut routes = Vec::new();
    let route_items = array_items(table, "routes", errs);
    if route_items.is_empty() && !table.contains_key("routes") {
        errs.push("routes", "at least one [[routes]] is required");
    }
    for (i, item) in route_items.iter().enumerate() {
        let path = format!("routes[{i}]");
        let Some(raw) = section::<FileRoute>(item, &path, errs) else {
            continue;
        };
        let host = raw
            .host
            .as_deref()
            .and_then(|h| parse_host(h, &format!("{path}.host"), errs));
        let matches = route_match(&raw, &listeners, &path, errs);
        let path_prefix = raw.path_prefix.unwrap_or_else(|| "/".to_string());
        if !path_prefix.starts_with('/') {
            errs.push(
                format!("{path}.path_prefix"),
                format!("must start with '/', got {path_prefix:?}"),
            );
        }
        if let Some(rewrite) = &raw.prefix_rewrite {
            if !rewrite.starts_with('/') {
                errs.push(
                    format!("{path}.prefix_rewrite"),
                    format!("must start with '/', got {rewrite:?}"),
                );
            } else if http::uri::PathAndQuery::try_from(rewrite.as_str()).is_err() || rewrite.contains(['?', '#']) {
                errs.push(
                    format!("{path}.prefix_rewrite"),
                    format!("{rewrite:?} is not a valid path (percent-encode spaces and other special characters)"),
                );
            }
        }
        let regex_rewrite = raw
            .path_rewrite
            .as_ref()
            .and_then(|r| path_rewrite(r, &format!("{path}.path_rewrite"), errs));
        if raw.prefix_rewrite.is_some() && raw.path_rewrite.is_some() {
            errs.push(
                format!("{path}.path_rewrite"),
                "and prefix_rewrite both rewrite the path: use one (path_rewrite = { regex = '^/prefix/', replace = '/new/' } does what prefix_rewrite does)",
            );
        }
        if raw.direct.is_some() {
            errs.each_set(
                &path,
                &[
                    (raw.prefix_rewrite.is_some(), "prefix_rewrite"),
                    (raw.path_rewrite.is_some(), "path_rewrite"),
                ],
                "a route with return sends nothing to a backend: there is no path to rewrite",
            );
        }
        if raw.rewrite_location.is_some() && raw.prefix_rewrite.is_none() {
            errs.push(
                format!("{path}.rewrite_location"),
                "has no effect without prefix_rewrite",
            );
        }
        let route_retry = raw.retry.as_ref().and_then(|v| {
            let at = format!("{path}.retry");
            let r: RouteRetry = section(v, &at, errs)?;
            if r.attempts.is_some_and(|a| a == 0 || a > 10) {
                errs.push(
                    format!("{at}.attempts"),
                    "must be between 1 and 10 (1 disables retries)",
                );
            }
            if raw.direct.is_some() {
                errs.push(
                    &at,
                    "a route with return sends nothing to a backend: there is nothing to retry",
                );
            }
            Some(r)
        });
        let access = access_rules(raw.allow.as_deref(), raw.deny.as_deref(), &path, errs);
        if raw.response_timeout.is_some_and(|t| t.is_zero()) {
            errs.push(format!("{path}.response_timeout"), "must be greater than 0");
        }
        // 0: no limit, in place of the server's (nginx's `client_max_body_size 0`).
        let max_body_bytes = match raw.max_body_bytes {
            Some(0) => None,
            Some(n) => Some(n),
            None => server.as_ref().and_then(|s| s.max_body_bytes),
        };
        let rate_limit = raw.rate_limit.as_ref().map(|r| {
            let at = format!("{path}.rate_limit");
            let rps = r.requests_per_second;
            if !(rps.is_finite() && rps > 0.0 && rps <= 1_000_000.0) {
                errs.push(
                    format!("{at}.requests_per_second"),
                    format!("must be above 0 and at most 1000000, got {rps}"),
                );
            }
            let burst = r.burst.unwrap_or_else(|| rps.ceil().clamp(1.0, 1_000_000.0) as u32);
            if burst == 0 || burst > 1_000_000 {
                errs.push(
                    format!("{at}.burst"),
                    format!("must be between 1 and 1000000, got {burst}"),
                );
            }
            let key = parse_key(r.key.as_deref(), &format!("{at}.key"), errs);
            RateLimitConfig {
                requests_per_second: rps,
                burst,
                key,
            }
        });
        let in_flight_limit = raw.in_flight_limit.as_ref().map(|l| {
            let at = format!("{path}.in_flight_limit");
            if l.max == 0 || l.max > 1_000_000 {
                errs.push(
                    format!("{at}.max"),
                    format!("must be between 1 and 1000000, got {}", l.max),
                );
            }
            if raw.direct.is_some() {
                errs.push(
                    &at,
                    "a route with return answers at once and never has requests in flight: use rate_limit",
                );
            }
            InFlightLimitConfig {
                max: l.max,
                key: parse_key(l.key.as_deref(), &format!("{at}.key"), errs),
            }
        });
        let mut rules = |value: &Option<toml::Value>, field: &str, dir| {
            let value = value.as_ref()?;
            let mut problems = Vec::new();
            let rules = crate::header_rules::parse(value, &format!("{path}.{field}"), dir, &mut problems);
            for (at, message) in problems {
                errs.push(at, message);
            }
            (rules != HeaderRules::default()).then(|| Arc::new(rules))
        };
        let request_headers = rules(&raw.request_headers, "request_headers", Direction::Request);
        let response_headers = rules(&raw.response_headers, "response_headers", Direction::Response);
        let known = |name: &str, at: String, errs: &mut Errors| -> Option<usize> {
            let found = pools.iter().position(|p: &PoolConfig| p.name == name);
            if found.is_none() && !pool_names_seen.iter().any(|n| n == name) {
                let known = if pool_names_seen.is_empty() {
                    "no pools are defined".to_string()
                } else {
                    format!("defined pools: {}", pool_names_seen.join(", "))
                };
                errs.push(at, format!("unknown pool '{name}' ({known})"));
            }
            // A pool that had errors of its own is not named again.
            found
        };
        let direct = raw
            .direct
            .as_ref()
            .and_then(|v| validate_return(v, &format!("{path}.return"), errs));
        let compress = match &raw.compress {
            Some(v) => validate_compress(v, &format!("{path}.compress"), errs),
            None => server.as_ref().and_then(|s| s.compress.clone()),
        };
        let basic_auth = raw.basic_auth.as_ref().and_then(|a| {
            let at = format!("{path}.basic_auth");
            let realm = a.realm.as_deref().unwrap_or("Restricted");
            match crate::auth::BasicAuth::load(realm, &base.join(&a.user_file), Path::new(&a.user_file)) {
                Ok(auth) => Some(Arc::new(auth)),
                Err(problems) => {
                    for p in problems {
                        errs.push(format!("{at}.user_file"), p);
                    }
                    None
                }
            }
        });
        let forward_auth = raw.forward_auth.as_ref().and_then(|fa| {
            let at = format!("{path}.forward_auth");
            let pool = known(&fa.pool, format!("{at}.pool"), errs);
            let auth_path = match http::uri::PathAndQuery::try_from(fa.path.as_str()) {
                Ok(p) if fa.path.starts_with('/') => Some(p),
                _ => {
                    errs.push(
                        format!("{at}.path"),
                        format!("must be a path starting with '/', got {:?}", fa.path),
                    );
                    None
                }
            };
            if raw.direct.is_some() {
                errs.push(
                    &at,
                    "a route with return answers before anything is asked: use basic_auth, or a route to a pool",
                );
            }
            let mut response_headers = Vec::new();
            for name in &fa.auth_response_headers {
                match http::HeaderName::from_bytes(name.trim().as_bytes()) {
                    Ok(n) if n == http::header::HOST => errs.push(
                        format!("{at}.auth_response_headers"),
                        "Host: the backend's Host is the client's (or a request_headers rule's)",
                    ),
                    Ok(n) => match crate::header_rules::reserved(&n, Direction::Request, true) {
                        Some(why) => errs.push(
                            format!("{at}.auth_response_headers"),
                            format!("{name}: rampart keeps it to itself: {why}"),
                        ),
                        None => response_headers.push(n),
                    },
                    Err(_) => errs.push(
                        format!("{at}.auth_response_headers"),
                        format!("not a header name: {name:?}"),
                    ),
                }
            }
            for name in &fa.auth_response_cookies {
                // RFC 6265 §4.1.1: a cookie name is a token.
                let token = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
                if !token {
                    errs.push(
                        format!("{at}.auth_response_cookies"),
                        format!("not a cookie name: {name:?}"),
                    );
                }
            }
            Some(Arc::new(ForwardAuth {
                pool: pool?,
                path: auth_path?,
                response_headers,
                response_cookies: fa.auth_response_cookies.clone(),
            }))
        });
        let mirror = raw.mirror.as_ref().and_then(|m| {
            let at = format!("{path}.mirror");
            let percent = m.percent.unwrap_or(100.0);
            if !(percent > 0.0 && percent <= 100.0) {
                errs.push(
                    format!("{at}.percent"),
                    format!("must be above 0 and at most 100, got {percent}"),
                );
            }
            if raw.direct.is_some() {
                errs.push(&at, "a route with return sends nothing to mirror");
            }
            let pool = known(&m.pool, format!("{at}.pool"), errs)?;
            Some(Arc::new(Mirror { pool, percent }))
        });
        let target = match (&raw.pool, &raw.pools) {
            _ if raw.direct.is_some() => {
                if raw.pool.is_some() || raw.pools.is_some() {
                    errs.push(
                        format!("{path}.return"),
                        "a route with return answers itself: remove its pool (or pools)",
                    );
                }
                // Never read: the route answers before a pool is chosen.
                direct.is_some().then_some((0, None))
            }
            (Some(_), Some(_)) => {
                errs.push(&path, "set pool or pools, not both");
                None
            }
            (None, None) => {
                errs.push(
                    format!("{path}.pool"),
                    "missing: the pool that serves the route (or pools, to split its requests by weight)",
                );
                None
            }
            (Some(name), None) => known(name, format!("{path}.pool"), errs).map(|p| (p, None)),
            (None, Some(table)) => pool_split(table, raw.split_key.as_deref(), &path, &known, errs),
        };
        if let (Some(m), Some((pool, None))) = (&mirror, &target) {
            if m.pool == *pool {
                errs.push(
                    format!("{path}.mirror.pool"),
                    "is the route's own pool: its backends would get every request twice",
                );
            }
        }
        let intercept_errors = match raw.intercept_errors {
            Some(true) if raw.direct.is_some() => {
                errs.push(
                    format!("{path}.intercept_errors"),
                    "a route with return sends its own answer: there is no backend's page to replace",
                );
                false
            }
            Some(true) if error_pages.is_empty() => {
                errs.push(
                    format!("{path}.intercept_errors"),
                    "has nothing to put in place of a backend's page: add [error_pages]",
                );
                false
            }
            Some(set) => set,
            None => raw.direct.is_none() && server.as_ref().is_some_and(|s| s.intercept_errors),
        };
        if raw.split_key.is_some() && raw.pools.is_none() {
            errs.push(format!("{path}.split_key"), "has no effect without pools");
        }
        if let Some((pool, split)) = target {
            routes.push(RouteConfig {
                host,
                path_prefix,
                pool,
                max_body_bytes,
                https_redirect: raw.https_redirect,
                rewrite_location: raw.prefix_rewrite.is_some() && raw.rewrite_location.unwrap_or(true),
                rewrite: match (raw.prefix_rewrite, regex_rewrite) {
                    (Some(to), _) => Some(PathRewrite::Prefix(to)),
                    (None, Some(r)) => Some(PathRewrite::Regex(Arc::new(r))),
                    (None, None) => None,
                },
                request_headers,
                response_headers,
                rate_limit,
                in_flight_limit,
                matches,
                split,
                response_timeout: raw.response_timeout,
                retry: route_retry,
                skip_access_log: raw.access_log == Some(false),
                access,
                direct: direct.map(Arc::new),
                compress,
                basic_auth,
                forward_auth,
                mirror,
                intercept_errors,
            });
        }
    }
    for (i, a) in routes.iter().enumerate() {
        if let Some(j) = routes[..i]
            .iter()
            .position(|b| b.host == a.host && b.path_prefix == a.path_prefix && b.matches == a.matches)
        {
            errs.push(
                format!("routes[{i}]"),
                format!("matches exactly what routes[{j}] matches; it can never be chosen"),
            );
        }
    }

    Some(Config {
        path: None,
        server: server?,
        admin,
        listeners,
        routes,
        pools,
        error_pages,
        inputs: Vec::new(),
    })
}

fn validate_server(table: &toml::Table, base: &Path, errs: &mut Errors) -> Option<ServerConfig> {
    let raw: FileServer = match table.get("server") {
        None => FileServer::default(),
        Some(v) => section(v, "server", errs)?,
    };
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let workers = raw.workers.unwrap_or(cpus);
    if workers == 0 || workers > 1024 {
        errs.push("server.workers", format!("must be between 1 and 1024, got {workers}"));
    }
    let max_connections = raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if max_connections == 0 {
        errs.push("server.max_connections", "must be greater than 0");
    }
    let client_header_timeout = raw.client_header_timeout.unwrap_or(DEFAULT_CLIENT_HEADER_TIMEOUT);
    let client_body_timeout = raw.client_body_timeout.unwrap_or(DEFAULT_CLIENT_BODY_TIMEOUT);
    let send_timeout = raw.send_timeout.unwrap_or(DEFAULT_SEND_TIMEOUT);
    let keepalive_timeout = raw.keepalive_timeout.unwrap_or(DEFAULT_KEEPALIVE_TIMEOUT);
    for (field, d) in [
        ("client_header_timeout", client_header_timeout),
        ("client_body_timeout", client_body_timeout),
        ("send_timeout", send_timeout),
        ("keepalive_timeout", keepalive_timeout),
    ] {
        if d.is_zero() {
            errs.push(format!("server.{field}"), "must be greater than 0");
        }
    }
    let max_header_bytes = raw.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
    if !(1024..=1024 * 1024).contains(&max_header_bytes) {
        errs.push(
            "server.max_header_bytes",
            format!("must be between 1024 and 1048576, got {max_header_bytes}"),
        );
    }
    let max_uri_bytes = raw.max_uri_bytes.unwrap_or(DEFAULT_MAX_URI_BYTES);
    if !(256..=1024 * 1024).contains(&max_uri_bytes) {
        errs.push(
            "server.max_uri_bytes",
            format!("must be between 256 and 1048576, got {max_uri_bytes}"),
        );
    }
    let max_headers = raw.max_headers.unwrap_or(DEFAULT_MAX_HEADERS);
    if !(8..=1000).contains(&max_headers) {
        errs.push(
            "server.max_headers",
            format!("must be between 8 and 1000, got {max_headers}"),
        );
    }
    let h2_max_concurrent_streams = raw.h2_max_concurrent_streams.unwrap_or(DEFAULT_H2_MAX_STREAMS);
    if h2_max_concurrent_streams == 0 {
        errs.push("server.h2_max_concurrent_streams", "must be greater than 0");
    }
    Some(ServerConfig {
        workers,
        shutdown_grace: raw.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
        max_connections,
        client_header_timeout,
        client_body_timeout,
        send_timeout,
        keepalive_timeout,
        // 0 lifts either limit, as a route's `max_body_bytes = 0` does: their
        // defaults are limits, so leaving them out cannot.
        keepalive_requests: std::num::NonZeroU32::new(raw.keepalive_requests.unwrap_or(DEFAULT_KEEPALIVE_REQUESTS)),
        keepalive_time: Some(raw.keepalive_time.unwrap_or(DEFAULT_KEEPALIVE_TIME)).filter(|d| !d.is_zero()),
        max_header_bytes,
        max_uri_bytes,
        max_headers,
        h2_max_concurrent_streams,
        access_log_format: {
            let parsed = raw.access_log_format.as_deref().map(crate::accesslog::LogFormat::parse);
            let unreadable = matches!(parsed, Some(Err(_)));
            let mut format = match parsed {
                None => crate::accesslog::LogFormat::default(),
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    errs.push("server.access_log_format", e);
                    crate::accesslog::LogFormat::default()
                }
            };
            match raw.access_log_escape.as_deref() {
                None | Some("default") => {}
                // Not checked against a format that did not parse: its error says why.
                Some("json") if unreadable => {}
                Some("json") => {
                    if let Err(e) = format.escape_json() {
                        errs.push("server.access_log_escape", e);
                    }
                }
                Some(other) => errs.push(
                    "server.access_log_escape",
                    format!("must be \"default\" or \"json\", got {other:?}"),
                ),
            }
            format.filter = raw.access_log_filter.as_ref().map(|f| {
                if raw.access_log.as_ref().is_none_or(|v| v.as_bool() == Some(false)) {
                    errs.push("server.access_log_filter", "has no effect without access_log");
                }
                if f.min_status.is_some_and(|s| !(100..=599).contains(&s)) {
                    errs.push(
                        "server.access_log_filter.min_status",
                        "must be a status between 100 and 599",
                    );
                }
                crate::accesslog::LogFilter {
                    min_status: f.min_status,
                    slower_than: f.slower_than,
                }
            });
            Arc::new(format)
        },
        access_log: validate_access_log(raw.access_log.as_ref(), base, errs),
        resolvers: validate_resolvers(raw.resolvers.as_deref(), errs),
        compress: raw
            .compress
            .as_ref()
            .and_then(|v| validate_compress(v, "server.compress", errs)),
        real_ip: validate_real_ip(raw.trusted_proxies.as_deref(), raw.client_ip_header.as_deref(), errs),
        intercept_errors: raw.intercept_errors.unwrap_or(false),
        max_body_bytes: match raw.max_body_bytes {
            Some(0) => {
                errs.push("server.max_body_bytes", "must be greater than 0 (omit it for no limit)");
                None
            }
            n => n,
        },
        watch_config: raw.watch_config.unwrap_or(false),
    })
}

/// `trusted_proxies = ["10.0.0.0/8"]`, with `client_ip_header` (`X-Forwarded-For`
/// unless set), which means nothing without them.
fn validate_real_ip(trusted: Option<&[String]>, header: Option<&str>, errs: &mut Errors) -> Option<Arc<RealIp>> {
    let set = header.is_some();
    let header = match header {
        None => http::HeaderName::from_static("x-forwarded-for"),
        Some(h) => match http::HeaderName::from_bytes(h.trim().as_bytes()) {
            Ok(name) => name,
            Err(_) => {
                errs.push("server.client_ip_header", format!("not a header name: {h:?}"));
                return None;
            }
        },
    };
    let Some(list) = trusted else {
        if set {
            errs.push(
                "server.client_ip_header",
                "has no effect without trusted_proxies (the proxies whose word on the client is taken)",
            );
        }
        return None;
    };
    if list.is_empty() {
        errs.push(
            "server.trusted_proxies",
            "is empty: omit it to take no proxy's word on the client's address",
        );
        return None;
    }
    let before = errs.0.len();
    let trusted = ip_nets(list, "server.trusted_proxies", errs);
    (errs.0.len() == before).then(|| Arc::new(RealIp { trusted, header }))
}

/// `compress = true`, `false`, or `{ types = [...], min_length = 256, level = 1 }`
/// (what is left out keeps its default).
fn validate_compress(value: &toml::Value, path: &str, errs: &mut Errors) -> Option<Arc<CompressConfig>> {
    let raw: FileCompress = match value {
        toml::Value::Boolean(false) => return None,
        toml::Value::Boolean(true) => return Some(Arc::default()),
        toml::Value::Table(_) => section(value, path, errs)?,
        other => {
            errs.push(
                path,
                format!(
                    "expected true, false or a table ({{ types = [...], min_length = 256, level = 1 }}), got {}",
                    other.type_str()
                ),
            );
            return None;
        }
    };
    let before = errs.0.len();
    let mut cfg = CompressConfig::default();
    if let Some(types) = raw.types {
        if types.is_empty() {
            errs.push(
                format!("{path}.types"),
                "must list at least one media type (compress = false turns compression off)",
            );
        }
        cfg.types = Vec::with_capacity(types.len());
        for (i, t) in types.iter().enumerate() {
            let t = t.trim().to_ascii_lowercase();
            if !crate::compress::is_media_range(&t) {
                errs.push(
                    format!("{path}.types[{i}]"),
                    format!("expected a media type (\"text/html\", \"text/*\" or \"*\"), got {t:?}"),
                );
            }
            cfg.types.push(t);
        }
    }
    if let Some(n) = raw.min_length {
        cfg.min_length = n;
    }
    if let Some(level) = raw.level {
        cfg.level = compress_level(level, 1..=9, &format!("{path}.level"), errs);
    }
    if let Some(list) = raw.encodings {
        if list.is_empty() {
            errs.push(
                format!("{path}.encodings"),
                "must list at least one of \"zstd\", \"br\", \"gzip\" (compress = false turns compression off)",
            );
        }
        cfg.encodings = Vec::with_capacity(list.len());
        for (i, name) in list.iter().enumerate() {
            match crate::compress::Coding::parse(&name.trim().to_ascii_lowercase()) {
                Some(c) if cfg.encodings.contains(&c) => {
                    errs.push(format!("{path}.encodings[{i}]"), format!("{name:?} is listed twice"))
                }
                Some(c) => cfg.encodings.push(c),
                None => errs.push(
                    format!("{path}.encodings[{i}]"),
                    format!("expected \"zstd\", \"br\" or \"gzip\", got {name:?}"),
                ),
            }
        }
    }
    if let Some(level) = raw.zstd_level {
        let max = crate::compress::MAX_ZSTD_LEVEL;
        cfg.zstd_level = compress_level(level, 1..=max, &format!("{path}.zstd_level"), errs);
    }
    if let Some(level) = raw.brotli_level {
        let max = crate::compress::MAX_BROTLI_LEVEL;
        cfg.brotli_level = compress_level(level, 0..=max, &format!("{path}.brotli_level"), errs);
    }
    (errs.0.len() == before).then(|| Arc::new(cfg))
}

/// A compressor's level, with an error naming `field` when it is outside `range`.
fn compress_level<T: PartialOrd + std::fmt::Display>(
    level: T,
    range: std::ops::RangeInclusive<T>,
    field: &str,
    errs: &mut Errors,
) -> T {
    if !range.contains(&level) {
        errs.push(
            field,
            format!(
                "must be from {} (fastest) to {} (smallest), got {level}",
                range.start(),
                range.end()
            ),
        );
    }
    level
}

/// `resolvers = ["10.0.0.2", "10.0.0.3:5353"]`: nameservers by IP, port 53 unless given.
fn validate_resolvers(list: Option<&[String]>, errs: &mut Errors) -> crate::dns::Nameservers {
    let list = list?;
    if list.is_empty() {
        errs.push(
            "server.resolvers",
            "must name at least one nameserver (omit it to use /etc/resolv.conf's)",
        );
        return None;
    }
    let mut out = Vec::new();
    for (i, text) in list.iter().enumerate() {
        let t = text.trim();
        let parsed = t
            .parse::<SocketAddr>()
            .ok()
            .or_else(|| t.parse::<std::net::IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
        match parsed {
            Some(a) if a.port() != 0 => out.push(a),
            _ => errs.push(
                format!("server.resolvers[{i}]"),
                format!("expected a nameserver's IP address, with :port if not 53 (\"10.0.0.2\", \"10.0.0.2:5353\", \"[fd00::2]:53\"), got {text:?}"),
            ),
        }
    }
    Some(out)
}

/// A file rampart writes (the access log, the state file): it is opened or written at
/// start, on reload or on use, where a failure is reported; a directory that does not
/// exist, or a path that is one, is certain to fail, so `rampart check` says so.
fn check_file_path(full: &Path, field: &str, errs: &mut Errors) {
    match full.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            errs.push(field, format!("directory {} does not exist", dir.display()));
        }
        _ if full.is_dir() => errs.push(field, format!("{} is a directory", full.display())),
        _ => {}
    }
}

fn validate_access_log(v: Option<&toml::Value>, base: &Path, errs: &mut Errors) -> AccessLog {
    const FIELD: &str = "server.access_log";
    match v {
        None | Some(toml::Value::Boolean(false)) => AccessLog::Off,
        Some(toml::Value::Boolean(true)) => AccessLog::Stdout,
        Some(toml::Value::String(s)) if s.trim().is_empty() => {
            errs.push(
                FIELD,
                "must not be empty (false turns the log off, true sends it to standard output)",
            );
            AccessLog::Off
        }
        Some(toml::Value::String(s)) => {
            let full = base.join(s);
            check_file_path(&full, FIELD, errs);
            AccessLog::File(full)
        }
        Some(other) => {
            errs.push(
                FIELD,
                format!("must be true, false or a file path, got {}", other.type_str()),
            );
            AccessLog::Off
        }
    }
}

/// `ns`: the nameservers for a `dns_refresh` pool's names; `None` when `[server]`
/// itself is in error, and the names are then not looked up.
/// What tells requests apart, for `hash_key` and a rate limit's `key`:
/// `"client_ip"` (the default), `"header:NAME"` or `"cookie:NAME"`.
/// A route's `allow` and `deny`: each item an address (`10.0.0.7`, `::1`) or a CIDR
/// block (`10.0.0.0/8`).
/// IP addresses and CIDR blocks (`10.0.0.0/8`, `192.0.2.7`, `::1`); each one that is
/// neither, or a block with host bits set, is an error at `path[i]`.
fn ip_nets(list: &[String], path: &str, errs: &mut Errors) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let text = item.trim();
        match text.parse::<ipnet::IpNet>() {
            // `10.0.0.7/8` names a host but means the block: nginx takes it as
            // `10.0.0.0/8` with a warning; here it is an error.
            Ok(net) if net.trunc() != net => errs.push(
                format!("{path}[{i}]"),
                format!("{text:?} has host bits set: the block is {}", net.trunc()),
            ),
            Ok(net) => out.push(net),
            Err(_) => match text.parse::<std::net::IpAddr>() {
                Ok(ip) => out.push(ipnet::IpNet::from(ip)),
                Err(_) => errs.push(
                    format!("{path}[{i}]"),
                    format!("{text:?} is not an IP address or CIDR block"),
                ),
            },
        }
    }
    out
}

fn access_rules(
    allow: Option<&[String]>,
    deny: Option<&[String]>,
    path: &str,
    errs: &mut Errors,
) -> Option<Arc<AccessRules>> {
    let mut nets = |list: Option<&[String]>, field: &str| -> Vec<ipnet::IpNet> {
        let list = list.unwrap_or_default();
        if list.is_empty() && field == "allow" && allow.is_some() {
            errs.push(
                format!("{path}.allow"),
                "is empty: it would admit nobody (omit it to admit every address; deny = [\"0.0.0.0/0\", \"::/0\"] to refuse all)",
            );
        }
        ip_nets(list, &format!("{path}.{field}"), errs)
    };
    let rules = AccessRules {
        allow: nets(allow, "allow"),
        deny: nets(deny, "deny"),
    };
    (allow.is_some() || deny.is_some()).then(|| Arc::new(rules))
}

/// A route's `pools` table: the pools (each known) and weights, and the first pool
/// with a weight, which stands for the route where one pool is needed.
fn pool_split(
    table: &toml::Table,
    key: Option<&str>,
    path: &str,
    known: &dyn Fn(&str, String, &mut Errors) -> Option<usize>,
    errs: &mut Errors,
) -> Option<(usize, Option<Arc<PoolSplit>>)> {
    let mut split = Vec::new();
    let mut whole = true;
    for (name, weight) in table {
        let at = format!("{path}.pools.{name}");
        let weight = match weight {
            toml::Value::Integer(w) if (0..=MAX_SPLIT_WEIGHT).contains(w) => *w as u32,
            other => {
                errs.push(
                    &at,
                    format!("must be a weight from 0 to {MAX_SPLIT_WEIGHT}, got {other}"),
                );
                whole = false;
                continue;
            }
        };
        match known(name, at, errs) {
            Some(pool) => split.push((pool, weight)),
            None => whole = false,
        }
    }
    let total: u32 = split.iter().map(|(_, w)| w).sum();
    if table.is_empty() {
        errs.push(format!("{path}.pools"), "is empty: name the pools and their weights");
        return None;
    }
    if whole && total == 0 {
        errs.push(
            format!("{path}.pools"),
            "every weight is 0: no pool would get a request",
        );
    }
    let key = key.map(|k| parse_key(Some(k), &format!("{path}.split_key"), errs));
    let first = split.iter().find(|(_, w)| *w > 0)?.0;
    (whole && total > 0).then(|| {
        (
            first,
            Some(Arc::new(PoolSplit {
                pools: split,
                total,
                key,
            })),
        )
    })
}

/// A route's `pools` weight at most (so a sum of many stays far from `u32::MAX`).
const MAX_SPLIT_WEIGHT: i64 = 1_000_000;

fn parse_key(value: Option<&str>, at: &str, errs: &mut Errors) -> HashKey {
    match value {
        None | Some("client_ip") => HashKey::ClientIp,
        Some("uri") => HashKey::Uri,
        Some("path") => HashKey::Path,
        Some(s) if s.starts_with("header:") => match http::HeaderName::from_bytes(s[7..].trim().as_bytes()) {
            Ok(h) => HashKey::Header(h),
            Err(_) => {
                errs.push(at, format!("invalid header name in {s:?}"));
                HashKey::ClientIp
            }
        },
        Some(s) if s.starts_with("cookie:") && s.len() > 7 => HashKey::Cookie(s[7..].trim().to_string()),
        Some(s) => {
            errs.push(
                at,
                format!("expected \"client_ip\", \"uri\", \"path\", \"header:NAME\" or \"cookie:NAME\", got {s:?}"),
            );
            HashKey::ClientIp
        }
    }
}

fn validate_pool(
    name: &str,
    value: &toml::Value,
    base: &Path,
    ns: Option<&crate::dns::Nameservers>,
    errs: &mut Errors,
) -> Option<PoolConfig> {
    let path = format!("pools.{name}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        errs.push(&path, "pool names may use only letters, digits, '_', '-' and '.'");
    }
    let raw: FilePool = section(value, &path, errs)?;
    let before = errs.0.len();
    let protocol = match raw.protocol.as_deref() {
        None | Some("http1") => UpstreamProtocol::Http1,
        Some("h2") => UpstreamProtocol::H2,
        Some(other) => {
            errs.push(
                format!("{path}.protocol"),
                format!("expected \"http1\" or \"h2\", got {other:?}"),
            );
            UpstreamProtocol::Http1
        }
    };
    let h2_max_streams = raw.h2_max_streams.unwrap_or(DEFAULT_UPSTREAM_H2_MAX_STREAMS);
    if h2_max_streams == 0 {
        errs.push(format!("{path}.h2_max_streams"), "must be at least 1");
    }
    if raw.max_requests_per_connection == Some(0) {
        errs.push(
            format!("{path}.max_requests_per_connection"),
            "must be at least 1 (omit it for no limit)",
        );
    }
    if raw.h2_max_streams.is_some() && protocol != UpstreamProtocol::H2 {
        errs.push(format!("{path}.h2_max_streams"), "only used with protocol = \"h2\"");
    }
    let tls_path = format!("{path}.tls");
    let tls = raw
        .tls
        .as_ref()
        .and_then(|t| validate_backend_tls(t, &tls_path, base, protocol, errs));
    // First each item's text and weight, then its address(es): a `dns_refresh` pool's
    // names are looked up together, through rampart's resolver.
    let mut items = Vec::new();
    for (i, b) in raw.backends.iter().enumerate() {
        let bpath = format!("{path}.backends[{i}]");
        let (addr_text, weight, backup, max_in_flight) = match b {
            toml::Value::String(s) => (s.clone(), DEFAULT_WEIGHT, false, None),
            toml::Value::Table(_) => {
                let Some(fb) = section::<FileBackend>(b, &bpath, errs) else {
                    continue;
                };
                (
                    fb.addr,
                    fb.weight.unwrap_or(DEFAULT_WEIGHT),
                    fb.backup.unwrap_or(false),
                    fb.max_in_flight,
                )
            }
            other => {
                errs.push(
                    &bpath,
                    format!(
                        "expected \"host:port\" or {{ addr, weight, backup, max_in_flight }}, got {}",
                        other.type_str()
                    ),
                );
                continue;
            }
        };
        if weight == 0 || weight > MAX_WEIGHT {
            errs.push(
                format!("{bpath}.weight"),
                format!("must be between 1 and {MAX_WEIGHT}, got {weight}"),
            );
        }
        if max_in_flight == Some(0) {
            errs.push(
                format!("{bpath}.max_in_flight"),
                "must be at least 1 (use the admin API's maint to stop a backend's traffic)",
            );
        }
        items.push((i, bpath, addr_text, (weight, backup, max_in_flight)));
    }
    let dns_refresh = raw.dns_refresh;
    if let Some(d) = dns_refresh {
        if d < Duration::from_secs(1) {
            errs.push(format!("{path}.dns_refresh"), format!("must be at least 1s, got {d:?}"));
        }
        if !items.iter().any(|(_, _, t, _)| t.parse::<SocketAddr>().is_err()) && !items.is_empty() {
            errs.push(
                format!("{path}.dns_refresh"),
                "has no effect: every backend of the pool is an IP address",
            );
        }
    }
    // Per item: its addresses (one, unless a `dns_refresh` name has several), and
    // for a `dns_refresh` name, the name to look up again.
    let mut resolved: Vec<Option<(Vec<SocketAddr>, Option<String>)>> = Vec::new();
    match dns_refresh {
        None => {
            for (_, bpath, text, _) in &items {
                resolved.push(resolve_backend(text, bpath, errs).map(|a| (vec![a], None)));
            }
        }
        Some(_) => {
            let mut names = Vec::new();
            for (_, bpath, text, _) in &items {
                if let Ok(a) = text.parse::<SocketAddr>() {
                    resolved.push(resolve_backend(text, bpath, errs).map(|_| (vec![a], None)));
                    continue;
                }
                match split_host_port(text, bpath, errs) {
                    Some((host, port)) => {
                        names.push((resolved.len(), host.to_string(), port));
                        resolved.push(None);
                    }
                    None => resolved.push(None),
                }
            }
            let hosts: Vec<&str> = names.iter().map(|(_, h, _)| h.as_str()).collect();
            match ns.map(|ns| crate::dns::lookup_blocking(ns, &hosts)) {
                None => {}
                Some(Err(e)) => errs.push(format!("{path}.dns_refresh"), e),
                Some(Ok(answers)) => {
                    for ((at, host, port), answer) in names.iter().zip(answers) {
                        let (_, bpath, text, _) = &items[*at];
                        match answer {
                            Ok(ips) => {
                                let addrs = ips.into_iter().map(|ip| SocketAddr::new(ip, *port)).collect();
                                resolved[*at] = Some((addrs, Some(host.clone())));
                            }
                            Err(e) => errs.push(bpath, format!("cannot resolve {text}: {e}")),
                        }
                    }
                }
            }
        }
    }
    let mut backends: Vec<BackendConfig> = Vec::new();
    let (mut entries, mut answers) = (Vec::new(), Vec::new());
    // Each IP address written so far, with its index in `backends`.
    let mut fixed: Vec<(SocketAddr, usize)> = Vec::new();
    for (k, ((i, bpath, addr_text, (weight, backup, max_in_flight)), found)) in items.iter().zip(resolved).enumerate() {
        let Some((addrs, host)) = found else {
            continue;
        };
        let Some(&first) = addrs.first() else {
            continue;
        };
        if let Some((j, ..)) = items[..k].iter().find(|(_, _, t, _)| t == addr_text) {
            errs.push(
                bpath,
                format!("{addr_text} is listed twice (also backends[{j}]); use weight instead"),
            );
            continue;
        }
        if host.is_none() {
            if let Some((_, j)) = fixed.iter().find(|(a, _)| *a == first) {
                errs.push(
                    bpath,
                    format!("{first} is listed twice (also backends[{j}]); use weight instead"),
                );
                continue;
            }
            fixed.push((first, *i));
        }
        // With `server_name` set (and checked above) this cannot fail; without it,
        // the backend's own host must be a name a certificate can carry.
        let tls_name = match &tls {
            Some(t) => match crate::backend_tls::server_name(addr_text, t.spec.server_name.as_deref()) {
                Ok(n) => Some(n),
                Err(e) => {
                    errs.push(bpath, format!("{e}; set {tls_path}.server_name"));
                    continue;
                }
            },
            None => None,
        };
        let template = BackendConfig {
            name: addr_text.clone(),
            written: addr_text.clone(),
            addr: first,
            weight: *weight,
            backup: *backup,
            max_in_flight: *max_in_flight,
            tls_name,
        };
        match dns_refresh {
            None => backends.push(template),
            Some(_) => {
                answers.push(host.as_ref().map(|_| addrs.iter().map(|a| a.ip()).collect()));
                entries.push(crate::dns::Entry { template, host });
            }
        }
    }
    let dns = dns_refresh.map(|refresh| crate::dns::DnsPool { refresh, entries });
    if let Some(d) = &dns {
        backends = d.expand(&answers);
    }
    if !items.is_empty() && items.iter().all(|(_, _, _, (_, backup, _))| *backup) {
        errs.push(
            format!("{path}.backends"),
            "every backend is a backup: a backup stands in for the others, so at least one must not be",
        );
    }
    if raw.backends.is_empty() {
        errs.push(format!("{path}.backends"), "a pool needs at least one backend");
    }
    let hash_key = parse_key(raw.hash_key.as_deref(), &format!("{path}.hash_key"), errs);
    let balancer = raw.balancer.unwrap_or(BalancerKind::PeakEwma);
    if raw.hash_key.is_some() && balancer != BalancerKind::ConsistentHash {
        errs.push(
            format!("{path}.hash_key"),
            "only used with balancer = \"consistent_hash\"",
        );
    }
    let connect_timeout = raw.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let response_timeout = raw.response_timeout.unwrap_or(DEFAULT_RESPONSE_TIMEOUT);
    let idle_timeout = raw.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
    let tunnel_idle_timeout = raw.tunnel_idle_timeout.unwrap_or(DEFAULT_TUNNEL_IDLE_TIMEOUT);
    let read_timeout = raw.read_timeout.unwrap_or(DEFAULT_READ_TIMEOUT);
    for (field, d) in [
        ("connect_timeout", connect_timeout),
        ("response_timeout", response_timeout),
        ("idle_timeout", idle_timeout),
        ("tunnel_idle_timeout", tunnel_idle_timeout),
        ("read_timeout", read_timeout),
    ] {
        if d.is_zero() {
            errs.push(format!("{path}.{field}"), "must be greater than 0");
        }
    }
    let health_check = validate_health(
        raw.health_check.as_ref(),
        &format!("{path}.health_check"),
        protocol,
        raw.tls.is_some(),
        errs,
    );
    let outlier = validate_outlier(raw.outlier.as_ref(), &format!("{path}.outlier"), errs);
    let retry = validate_retry(raw.retry.as_ref(), &format!("{path}.retry"), response_timeout, errs);
    let circuit_breaker = validate_breaker(raw.circuit_breaker.as_ref(), &format!("{path}.circuit_breaker"), errs);
    let sticky = match &raw.sticky {
        None => None,
        Some(v) => validate_sticky(v, &format!("{path}.sticky"), errs),
    };
    if errs.0.len() > before {
        return None;
    }
    Some(PoolConfig {
        name: name.to_string(),
        backends,
        balancer,
        hash_key,
        connect_timeout,
        response_timeout,
        idle_timeout,
        tunnel_idle_timeout,
        read_timeout,
        max_idle_per_backend: raw.max_idle_per_backend.unwrap_or(DEFAULT_MAX_IDLE_PER_BACKEND),
        health_check: health_check.unwrap_or_default(),
        outlier: outlier?,
        retry: retry?,
        circuit_breaker: circuit_breaker?,
        slow_start: raw.slow_start.unwrap_or(Duration::ZERO),
        tls,
        protocol,
        h2_max_streams,
        max_requests_per_connection: raw.max_requests_per_connection.unwrap_or(u32::MAX),
        // "0s" lifts it: the default is a limit, so leaving it out cannot.
        max_connection_duration: Some(raw.max_connection_duration.unwrap_or(DEFAULT_MAX_CONNECTION_DURATION))
            .filter(|d| !d.is_zero()),
        dns,
        sticky,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileReturn {
    status: u16,
    location: Option<String>,
    body: Option<String>,
    content_type: Option<String>,
}

/// `return = { status = 301, location = "https://example.com$request_uri" }`, or
/// `{ status = 200, body = "ok\n" }`. A redirect status needs a `location`, and only
/// a redirect may have one.
fn validate_return(value: &toml::Value, path: &str, errs: &mut Errors) -> Option<DirectResponse> {
    let raw: FileReturn = section(value, path, errs)?;
    let before = errs.0.len();
    let status = match http::StatusCode::from_u16(raw.status) {
        Ok(s) if (200..=599).contains(&s.as_u16()) => Some(s),
        _ => {
            errs.push(
                format!("{path}.status"),
                format!("must be a status from 200 to 599, got {}", raw.status),
            );
            None
        }
    };
    let redirect = matches!(raw.status, 301 | 302 | 303 | 307 | 308);
    let location = match (&raw.location, redirect) {
        (Some(l), true) => match crate::header_rules::parse_value(l, crate::header_rules::Direction::Request) {
            Ok(v) => Some(v),
            Err(e) => {
                errs.push(format!("{path}.location"), e);
                None
            }
        },
        (None, true) => {
            errs.push(
                format!("{path}.location"),
                format!("missing: a {} redirect needs the URL to send the client to", raw.status),
            );
            None
        }
        (Some(_), false) => {
            errs.push(
                format!("{path}.location"),
                "only a redirect (301, 302, 303, 307, 308) has a location",
            );
            None
        }
        (None, false) => None,
    };
    let content_type = match &raw.content_type {
        Some(t) => match http::HeaderValue::from_str(t) {
            Ok(v) => Some(v),
            Err(_) => {
                errs.push(format!("{path}.content_type"), format!("not a header value: {t:?}"));
                None
            }
        },
        None => raw
            .body
            .as_ref()
            .map(|_| http::HeaderValue::from_static("text/plain; charset=utf-8")),
    };
    if errs.0.len() > before {
        return None;
    }
    Some(DirectResponse {
        status: status?,
        location,
        body: raw.body.map(bytes::Bytes::from).unwrap_or_default(),
        content_type,
    })
}

/// `sticky = { cookie = "srv", max_age = "8h", path = "/" }`.
fn validate_sticky(value: &toml::Value, path: &str, errs: &mut Errors) -> Option<StickyConfig> {
    let raw: FileSticky = section(value, path, errs)?;
    // A cookie name is an RFC 9110 token (RFC 6265 §4.1.1).
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    let mut ok = true;
    if raw.cookie.is_empty() || !raw.cookie.chars().all(token) {
        errs.push(
            format!("{path}.cookie"),
            format!(
                "must be a cookie name (letters, digits and !#$%&'*+-.^_`|~), got {:?}",
                raw.cookie
            ),
        );
        ok = false;
    }
    let cookie_path = raw.path.unwrap_or_else(|| "/".to_string());
    if !cookie_path.starts_with('/') || cookie_path.chars().any(|c| c == ';' || !(' '..='~').contains(&c)) {
        errs.push(
            format!("{path}.path"),
            format!("must start with / and hold no ';' or control characters, got {cookie_path:?}"),
        );
        ok = false;
    }
    let mut attributes = format!("; Path={cookie_path}");
    if let Some(domain) = &raw.domain {
        // A host name, or a parent domain with its leading dot (RFC 6265 §5.2.3).
        let name = domain.strip_prefix('.').unwrap_or(domain);
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
            errs.push(
                format!("{path}.domain"),
                format!("must be a domain name (example.com), got {domain:?}"),
            );
            ok = false;
        }
        attributes.push_str(&format!("; Domain={domain}"));
    }
    match raw.max_age {
        Some(d) if d.as_secs() == 0 => {
            errs.push(
                format!("{path}.max_age"),
                "must be at least 1s (omit it for a session cookie)",
            );
            ok = false;
        }
        Some(d) => attributes.push_str(&format!("; Max-Age={}", d.as_secs())),
        None => {}
    }
    if raw.http_only.unwrap_or(true) {
        attributes.push_str("; HttpOnly");
    }
    if let Some(same_site) = &raw.same_site {
        match ["Strict", "Lax", "None"]
            .iter()
            .find(|v| v.eq_ignore_ascii_case(same_site))
        {
            Some(v) => {
                if *v == "None" && raw.secure == Some(false) {
                    errs.push(
                        format!("{path}.same_site"),
                        "\"None\" needs Secure (browsers drop such a cookie without it): remove secure = false",
                    );
                    ok = false;
                }
                attributes.push_str(&format!("; SameSite={v}"));
            }
            None => {
                errs.push(
                    format!("{path}.same_site"),
                    format!("must be \"Strict\", \"Lax\" or \"None\", got {same_site:?}"),
                );
                ok = false;
            }
        }
    }
    ok.then_some(StickyConfig {
        cookie: raw.cookie,
        attributes,
        secure: raw.secure,
    })
}

/// `[pools.NAME.tls]`: checks the fields, then loads the trust store and client
/// certificate. `None` (with errors pushed) when anything is wrong.
fn validate_backend_tls(
    value: &toml::Value,
    path: &str,
    base: &Path,
    protocol: UpstreamProtocol,
    errs: &mut Errors,
) -> Option<Arc<crate::backend_tls::BackendTls>> {
    use crate::backend_tls::{BackendTls, BackendTlsSpec, Trust};
    let raw: FileBackendTls = section(value, path, errs)?;
    let before = errs.0.len();
    let min_version = parse_min_version(raw.min_version.as_deref(), path, errs);
    let trust = match (raw.verify.unwrap_or(true), &raw.ca) {
        (true, None) => Trust::System,
        (true, Some(ca)) => Trust::File(base.join(ca)),
        (false, None) => Trust::None,
        (false, Some(_)) => {
            errs.push(
                format!("{path}.ca"),
                "has no effect with verify = false; remove one of the two",
            );
            Trust::None
        }
    };
    if let Some(n) = &raw.server_name {
        if let Err(e) = crate::backend_tls::server_name("", Some(n)) {
            errs.push(format!("{path}.server_name"), e);
        }
    }
    let client_cert = match (&raw.cert, &raw.key) {
        (Some(cert), Some(key)) => Some(crate::tls::CertFiles {
            cert: base.join(cert),
            key: base.join(key),
        }),
        (None, None) => None,
        (Some(_), None) => {
            errs.push(format!("{path}.key"), "a client certificate (cert) needs its key");
            None
        }
        (None, Some(_)) => {
            errs.push(format!("{path}.cert"), "a client key (key) needs its certificate");
            None
        }
    };
    let spec = BackendTlsSpec {
        trust,
        server_name: raw.server_name,
        client_cert,
        min_version,
        h2: protocol == UpstreamProtocol::H2,
    };
    // The files are read even when a field above was wrong, so every error shows.
    match BackendTls::load(spec) {
        Ok(t) if errs.0.len() == before => Some(Arc::new(t)),
        Ok(_) => None,
        Err(errors) => {
            for (field, message) in errors {
                errs.push(format!("{path}.{field}"), message);
            }
            None
        }
    }
}

/// A TLS `min_version` field: `"1.2"` (the default) or `"1.3"`.
fn parse_min_version(v: Option<&str>, path: &str, errs: &mut Errors) -> crate::tls::MinVersion {
    match v {
        None => crate::tls::MinVersion::Tls12,
        Some(v) => crate::tls::MinVersion::parse(v).unwrap_or_else(|| {
            errs.push(
                format!("{path}.min_version"),
                format!("must be \"1.2\" or \"1.3\", not {v:?}"),
            );
            crate::tls::MinVersion::Tls12
        }),
    }
}

fn validate_outlier(value: Option<&toml::Value>, path: &str, errs: &mut Errors) -> Option<OutlierConfig> {
    let raw: FileOutlier = match value {
        None => FileOutlier::default(),
        Some(v) => section(v, path, errs)?,
    };
    let c = OutlierConfig {
        consecutive_failures: raw.consecutive_failures.unwrap_or(DEFAULT_OUTLIER_CONSECUTIVE),
        base_ejection: raw.base_ejection.unwrap_or(DEFAULT_BASE_EJECTION),
        max_ejection: raw.max_ejection.unwrap_or(DEFAULT_MAX_EJECTION),
        max_ejected_percent: raw.max_ejected_percent.unwrap_or(DEFAULT_MAX_EJECTED_PERCENT),
        panic_threshold: raw.panic_threshold.unwrap_or(DEFAULT_PANIC_THRESHOLD),
        failure_percentage: raw.failure_percentage,
        failure_percentage_min_requests: raw.failure_percentage_min_requests.unwrap_or(50),
        success_rate_stdev_factor: raw.success_rate_stdev_factor,
        success_rate_min_hosts: raw.success_rate_min_hosts.unwrap_or(5),
        success_rate_min_requests: raw.success_rate_min_requests.unwrap_or(100),
        interval: raw
            .interval
            .or(raw.failure_percentage_interval)
            .unwrap_or(Duration::from_secs(10)),
        counts_outcomes: raw.failure_percentage.is_some() || raw.success_rate_stdev_factor.is_some(),
    };
    if c.failure_percentage.is_some_and(|p| p == 0 || p > 100) {
        errs.push(format!("{path}.failure_percentage"), "must be between 1 and 100");
    }
    if c.failure_percentage_min_requests == 0 {
        errs.push(format!("{path}.failure_percentage_min_requests"), "must be at least 1");
    }
    if raw.interval.is_some() && raw.failure_percentage_interval.is_some() {
        errs.push(
            format!("{path}.failure_percentage_interval"),
            "is the older name of interval: set one",
        );
    }
    let interval_field = match raw.interval {
        Some(_) => "interval",
        None => "failure_percentage_interval",
    };
    if c.interval < Duration::from_millis(100) {
        errs.push(format!("{path}.{interval_field}"), "must be at least 100ms");
    }
    if c.success_rate_stdev_factor.is_some_and(|f| !(f > 0.0 && f <= 10.0)) {
        errs.push(
            format!("{path}.success_rate_stdev_factor"),
            "must be above 0 and at most 10 (Envoy's default, 1900, is 1.9 here)",
        );
    }
    if c.success_rate_min_hosts < 2 {
        errs.push(
            format!("{path}.success_rate_min_hosts"),
            "must be at least 2: a mean of one backend is its own rate",
        );
    }
    if c.success_rate_min_requests == 0 {
        errs.push(format!("{path}.success_rate_min_requests"), "must be at least 1");
    }
    if c.failure_percentage.is_none() && raw.failure_percentage_min_requests.is_some() {
        errs.push(
            format!("{path}.failure_percentage_min_requests"),
            "has no effect without failure_percentage",
        );
    }
    if c.success_rate_stdev_factor.is_none() {
        errs.each_set(
            path,
            &[
                (raw.success_rate_min_hosts.is_some(), "success_rate_min_hosts"),
                (raw.success_rate_min_requests.is_some(), "success_rate_min_requests"),
            ],
            "has no effect without success_rate_stdev_factor",
        );
    }
    if !c.counts_outcomes && (raw.interval.is_some() || raw.failure_percentage_interval.is_some()) {
        errs.push(
            format!("{path}.{interval_field}"),
            "has no effect without failure_percentage or success_rate_stdev_factor",
        );
    }
    if c.consecutive_failures == 0 {
        errs.push(format!("{path}.consecutive_failures"), "must be at least 1");
    }
    if c.base_ejection.is_zero() {
        errs.push(format!("{path}.base_ejection"), "must be greater than 0");
    }
    if c.max_ejection < c.base_ejection {
        errs.push(
            format!("{path}.max_ejection"),
            format!("must be at least base_ejection ({:?})", c.base_ejection),
        );
    }
    if c.max_ejected_percent > 100 {
        errs.push(format!("{path}.max_ejected_percent"), "must be between 0 and 100");
    }
    if c.panic_threshold > 100 {
        errs.push(format!("{path}.panic_threshold"), "must be between 0 and 100");
    }
    Some(c)
}

fn validate_retry(
    value: Option<&toml::Value>,
    path: &str,
    response_timeout: Duration,
    errs: &mut Errors,
) -> Option<RetryConfig> {
    let raw: FileRetry = match value {
        None => FileRetry::default(),
        Some(v) => section(v, path, errs)?,
    };
    let hedge_delay = match raw.hedge_delay.as_deref() {
        None | Some("auto") => HedgeDelay::Auto,
        Some(s) => match humantime::parse_duration(s) {
            Ok(d) if !d.is_zero() => HedgeDelay::Fixed(d),
            _ => {
                errs.push(
                    format!("{path}.hedge_delay"),
                    format!("expected \"auto\" or a duration like \"50ms\", got {s:?}"),
                );
                HedgeDelay::Auto
            }
        },
    };
    let c = RetryConfig {
        attempts: raw.attempts.unwrap_or(DEFAULT_RETRY_ATTEMPTS),
        budget_percent: raw.budget_percent.unwrap_or(DEFAULT_BUDGET_PERCENT),
        budget_min_per_sec: raw.budget_min_per_sec.unwrap_or(DEFAULT_BUDGET_MIN_PER_SEC),
        max_replay_bytes: raw.max_replay_bytes.unwrap_or(DEFAULT_MAX_REPLAY_BYTES),
        response_buffer_bytes: raw.response_buffer_bytes.unwrap_or(DEFAULT_RESPONSE_BUFFER_BYTES),
        per_try_timeout: raw.per_try_timeout,
        backoff_base: raw.backoff_base.unwrap_or(DEFAULT_BACKOFF_BASE),
        backoff_max: raw.backoff_max.unwrap_or(DEFAULT_BACKOFF_MAX),
        hedge: raw.hedge.unwrap_or(true),
        hedge_delay,
        on_status: match &raw.on_status {
            None => DEFAULT_ON_STATUS,
            Some(list) => {
                let mut mask = 0u128;
                for &status in list {
                    if (500..600).contains(&status) {
                        mask |= 1 << (status - 500);
                    } else {
                        errs.push(
                            format!("{path}.on_status"),
                            format!(
                                "{status} is not a 5xx status: only a server error (500-599) can mean the backend failed"
                            ),
                        );
                    }
                }
                mask
            }
        },
    };
    if c.attempts == 0 || c.attempts > 10 {
        errs.push(
            format!("{path}.attempts"),
            "must be between 1 and 10 (1 disables retries)",
        );
    }
    if c.budget_percent > 100 {
        errs.push(format!("{path}.budget_percent"), "must be between 0 and 100");
    }
    if c.max_replay_bytes > 16 * 1024 * 1024 {
        errs.push(format!("{path}.max_replay_bytes"), "must be at most 16 MiB");
    }
    if c.response_buffer_bytes > 16 * 1024 * 1024 {
        errs.push(format!("{path}.response_buffer_bytes"), "must be at most 16 MiB");
    }
    if let Some(t) = c.per_try_timeout {
        if t.is_zero() || t > response_timeout {
            errs.push(
                format!("{path}.per_try_timeout"),
                format!("must be greater than 0 and at most the pool's response_timeout ({response_timeout:?})"),
            );
        }
    }
    if c.backoff_max < c.backoff_base {
        errs.push(format!("{path}.backoff_max"), "must be at least backoff_base");
    }
    if let HedgeDelay::Fixed(d) = c.hedge_delay {
        if d >= response_timeout {
            errs.push(
                format!("{path}.hedge_delay"),
                "must be shorter than the pool's response_timeout",
            );
        }
    }
    Some(c)
}

fn validate_breaker(value: Option<&toml::Value>, path: &str, errs: &mut Errors) -> Option<BreakerConfig> {
    let raw: FileBreaker = match value {
        None => FileBreaker::default(),
        Some(v) => section(v, path, errs)?,
    };
    let c = BreakerConfig {
        max_connections: raw.max_connections.unwrap_or(DEFAULT_CB_MAX_CONNECTIONS),
        max_pending: raw.max_pending.unwrap_or(DEFAULT_MAX_PENDING),
        max_requests: raw.max_requests.unwrap_or(DEFAULT_MAX_REQUESTS),
        max_retries: raw.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
    };
    for (field, v) in [
        ("max_connections", c.max_connections),
        ("max_pending", c.max_pending),
        ("max_requests", c.max_requests),
    ] {
        if v == 0 {
            errs.push(format!("{path}.{field}"), "must be at least 1");
        }
    }
    Some(c)
}

fn validate_health(
    value: Option<&toml::Value>,
    path: &str,
    protocol: UpstreamProtocol,
    pool_tls: bool,
    errs: &mut Errors,
) -> Option<HealthCheckConfig> {
    let raw: FileHealthCheck = match value {
        None => FileHealthCheck::default(),
        Some(v) => section(v, path, errs)?,
    };
    let d = HealthCheckConfig::default();
    let interval = raw.interval.unwrap_or(d.interval);
    let timeout = raw.timeout.unwrap_or(d.timeout.min(interval));
    let kind = raw.kind.unwrap_or(if raw.path.is_some() || raw.expect_body.is_some() {
        HealthCheckKind::Http
    } else if raw.service.is_some() {
        HealthCheckKind::Grpc
    } else {
        HealthCheckKind::Tcp
    });
    if kind == HealthCheckKind::Grpc {
        if protocol != UpstreamProtocol::H2 {
            errs.push(
                format!("{path}.type"),
                "a gRPC check speaks HTTP/2, as gRPC does: set the pool's protocol = \"h2\"",
            );
        }
        errs.each_set(
            path,
            &[
                (raw.path.is_some(), "path"),
                (raw.method.is_some(), "method"),
                (raw.expect_status.is_some(), "expect_status"),
                (raw.expect_body.is_some(), "expect_body"),
            ],
            "has no effect on a gRPC check, which asks grpc.health.v1.Health/Check and passes on SERVING",
        );
    } else if raw.service.is_some() {
        errs.push(
            format!("{path}.service"),
            "only a gRPC check asks about a service: set type = \"grpc\"",
        );
    }
    let service = raw.service.unwrap_or_default();
    if raw.port == Some(0) {
        errs.push(format!("{path}.port"), "must be between 1 and 65535");
    }
    if raw.tls == Some(true) && !pool_tls {
        errs.push(
            format!("{path}.tls"),
            "the pool has no tls table: its checks are in clear already",
        );
    }
    if kind == HealthCheckKind::None {
        errs.each_set(
            path,
            &[(raw.port.is_some(), "port"), (raw.tls.is_some(), "tls")],
            "has no effect with type = \"none\": no check is sent",
        );
    }
    if service.len() > 1024 {
        errs.push(format!("{path}.service"), "is longer than 1024 bytes");
    }
    match &raw.expect_body {
        Some(b) if b.is_empty() => errs.push(
            format!("{path}.expect_body"),
            "is empty: every body contains it (omit it to judge by status alone)",
        ),
        Some(_) if kind != HealthCheckKind::Http => errs.push(
            format!("{path}.expect_body"),
            "only an HTTP check reads a body: set path (or type = \"http\")",
        ),
        _ => {}
    }
    if interval < Duration::from_millis(10) {
        errs.push(format!("{path}.interval"), "must be at least 10ms");
    }
    if timeout.is_zero() || timeout > interval {
        errs.push(
            format!("{path}.timeout"),
            format!("must be greater than 0 and at most interval ({interval:?})"),
        );
    }
    let rise = raw.rise.unwrap_or(d.rise);
    let fall = raw.fall.unwrap_or(d.fall);
    if rise == 0 || rise > 100 {
        errs.push(format!("{path}.rise"), "must be between 1 and 100");
    }
    if fall == 0 || fall > 100 {
        errs.push(format!("{path}.fall"), "must be between 1 and 100");
    }
    let health_path = raw.path.unwrap_or(d.path);
    if !health_path.starts_with('/') || health_path.contains(char::is_whitespace) {
        errs.push(format!("{path}.path"), "must start with '/' and contain no spaces");
    }
    let method = raw.method.unwrap_or(d.method).to_ascii_uppercase();
    if !method.chars().all(|c| c.is_ascii_uppercase()) || method.is_empty() {
        errs.push(format!("{path}.method"), format!("invalid method {method:?}"));
    }
    let expect_status = match raw.expect_status {
        None => d.expect_status,
        Some(s) => match parse_status_ranges(&s) {
            Some(r) => r,
            None => {
                errs.push(
                    format!("{path}.expect_status"),
                    format!("expected e.g. \"200-399\" or \"200,204\", got {s:?}"),
                );
                d.expect_status
            }
        },
    };
    let jitter = raw.jitter.unwrap_or(interval / 10);
    if jitter >= interval {
        errs.push(format!("{path}.jitter"), "must be less than interval");
    }
    let mut headers = Vec::new();
    for (name, value) in raw.headers.iter().flatten() {
        let at = format!("{path}.headers.{name}");
        match (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            (Ok(_), _) if !matches!(kind, HealthCheckKind::Http | HealthCheckKind::Grpc) => errs.push(
                &at,
                "only an HTTP or gRPC check sends fields: set path (or type = \"http\")",
            ),
            (Ok(n), _) if kind == HealthCheckKind::Grpc && n == http::header::CONTENT_TYPE => {
                errs.push(&at, "rampart writes it itself (application/grpc)")
            }
            (Ok(n), _)
                if matches!(
                    n.as_str(),
                    "host" | "content-length" | "transfer-encoding" | "connection" | "te" | "upgrade" | "keep-alive"
                ) =>
            {
                errs.push(&at, "rampart writes it itself (the check's host is health_check.host)")
            }
            (Ok(n), Ok(v)) => headers.push((n, v)),
            (Err(_), _) => errs.push(&at, "not a header name"),
            (_, Err(_)) => errs.push(&at, "not a valid header value"),
        }
    }
    Some(HealthCheckConfig {
        kind,
        path: health_path,
        method,
        host: raw.host,
        expect_status,
        expect_body: raw.expect_body,
        headers,
        service,
        port: raw.port,
        tls: raw.tls.unwrap_or(true),
        interval,
        timeout,
        jitter,
        rise,
        fall,
    })
}

fn parse_status_ranges(s: &str) -> Option<Vec<(u16, u16)>> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
            None => {
                let v: u16 = part.parse().ok()?;
                (v, v)
            }
        };
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            return None;
        }
        out.push((lo, hi));
    }
    (!out.is_empty()).then_some(out)
}

/// Loads a listener's certificates now, so a missing file, a key that does not match
/// its certificate or a bad PEM is a config error (for `check`, and a rejected reload).
fn validate_tls(raw: FileTls, path: &str, base: &Path, errs: &mut Errors) -> Option<Arc<crate::tls::TlsSettings>> {
    let before = errs.0.len();
    let version = parse_min_version(raw.min_version.as_deref(), path, errs);
    // The certificates are checked even then, so every error shows at once.
    if raw.certificates.is_empty() {
        errs.push(
            format!("{path}.certificates"),
            "at least one certificate is required ({ cert = \"FILE\", key = \"FILE\" })",
        );
        return None;
    }
    let files = raw
        .certificates
        .iter()
        .map(|c| crate::tls::CertFiles {
            cert: base.join(&c.cert),
            key: base.join(&c.key),
        })
        .collect();
    let strict_sni = raw.strict_sni.unwrap_or(false);
    let client_ca = raw.client_ca.as_ref().and_then(|f| {
        let file = base.join(f);
        match crate::backend_tls::load_roots_file(&file) {
            Ok(roots) => Some((file, roots)),
            Err(e) => {
                errs.push(format!("{path}.client_ca"), e);
                None
            }
        }
    });
    let client_optional = match raw.client_verify.as_deref() {
        None | Some("required") => false,
        Some("optional") => true,
        Some(other) => {
            errs.push(
                format!("{path}.client_verify"),
                format!("expected \"required\" or \"optional\", got {other:?}"),
            );
            false
        }
    };
    if raw.client_verify.is_some() && raw.client_ca.is_none() {
        errs.push(
            format!("{path}.client_verify"),
            "needs client_ca: it says how client certificates signed by its CAs are asked for",
        );
    }
    let forward_client_cert = raw.forward_client_cert.unwrap_or(false);
    if forward_client_cert && raw.client_ca.is_none() {
        errs.push(
            format!("{path}.forward_client_cert"),
            "needs client_ca: without it clients present no certificate to forward",
        );
    }
    match crate::tls::settings(
        files,
        version,
        raw.http2.unwrap_or(true),
        strict_sni,
        client_ca,
        client_optional,
        forward_client_cert,
    ) {
        Ok(s) => (errs.0.len() == before).then(|| Arc::new(s)),
        Err(errors) => {
            for (i, message) in errors {
                let at = match i {
                    Some(i) => format!("{path}.certificates[{i}]"),
                    None => path.to_string(),
                };
                errs.push(at, message);
            }
            None
        }
    }
}

fn validate_error_pages(table: &toml::Table, base: &Path, errs: &mut Errors) -> HashMap<u16, ErrorPage> {
    let mut pages = HashMap::new();
    let Some(v) = table.get("error_pages") else {
        return pages;
    };
    let Some(t) = v.as_table() else {
        errs.push("error_pages", "must be a table of \"STATUS\" = \"file\"");
        return pages;
    };
    for (k, v) in t {
        let path = format!("error_pages.{k}");
        let status = match k.parse::<u16>() {
            Ok(s) if (400..=599).contains(&s) => s,
            _ => {
                errs.push(&path, "key must be an HTTP error status between 400 and 599");
                continue;
            }
        };
        let Some(file) = v.as_str() else {
            errs.push(&path, "must be a file path string");
            continue;
        };
        let full = base.join(file);
        note_input(&full);
        match std::fs::read(&full) {
            Ok(body) => {
                let content_type = match full.extension().and_then(|e| e.to_str()) {
                    Some("html" | "htm") => "text/html; charset=utf-8",
                    Some("json") => "application/json",
                    _ => "text/plain; charset=utf-8",
                };
                pages.insert(
                    status,
                    ErrorPage {
                        content_type,
                        body: body.into(),
                    },
                );
            }
            Err(e) => errs.push(&path, format!("cannot read {}: {e}", full.display())),
        }
    }
    pages
}

/// Parses `host:port` for a local bind, naming the bad part.
fn parse_bind(text: &str, path: &str, errs: &mut Errors) -> Option<SocketAddr> {
    let Some((host, port)) = text.rsplit_once(':') else {
        errs.push(path, format!("expected \"ip:port\", got {text:?}"));
        return None;
    };
    let port: u16 = match port.parse() {
        Ok(p) => p,
        Err(_) => {
            errs.push(path, format!("invalid port {port}"));
            return None;
        }
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = if host.is_empty() || host == "*" {
        std::net::IpAddr::from([0, 0, 0, 0])
    } else if host == "localhost" {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        match host.parse() {
            Ok(ip) => ip,
            Err(_) => {
                errs.push(
                    path,
                    format!("invalid IP address {host:?} (bind addresses must be IPs)"),
                );
                return None;
            }
        }
    };
    Some(SocketAddr::new(ip, port))
}

/// Backends may be IPs or host names; names resolve once, when the config loads, to
/// their first address (as HAProxy's `server` does), unless the pool has `dns_refresh`.
fn resolve_backend(text: &str, path: &str, errs: &mut Errors) -> Option<SocketAddr> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        if a.port() == 0 {
            errs.push(path, "port 0 is not a valid backend port");
            return None;
        }
        return Some(a);
    }
    split_host_port(text, path, errs)?;
    match text.to_socket_addrs() {
        Ok(mut it) => match it.next() {
            Some(a) => Some(a),
            None => {
                errs.push(path, format!("{text} resolved to no address"));
                None
            }
        },
        Err(e) => {
            errs.push(path, format!("cannot resolve {text}: {e}"));
            None
        }
    }
}

/// A backend written as `name:port`: the name and the port.
fn split_host_port<'a>(text: &'a str, path: &str, errs: &mut Errors) -> Option<(&'a str, u16)> {
    let Some((host, port)) = text.rsplit_once(':') else {
        errs.push(path, format!("expected \"host:port\", got {text:?}"));
        return None;
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => {
            errs.push(path, format!("invalid port {port}"));
            None
        }
        Ok(_) if host.is_empty() => {
            errs.push(path, format!("expected \"host:port\", got {text:?}"));
            None
        }
        Ok(p) => Some((host, p)),
    }
}

fn parse_host(text: &str, path: &str, errs: &mut Errors) -> Option<HostMatch> {
    let h = text.trim().to_ascii_lowercase();
    let valid = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if let Some(rest) = h.strip_prefix("*.") {
        if valid(rest) {
            return Some(HostMatch::Suffix(format!(".{rest}")));
        }
    } else if valid(&h) {
        return Some(HostMatch::Exact(h));
    }
    errs.push(
        path,
        format!("expected a host name or \"*.suffix\" (no port), got {text:?}"),
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped minimal config, so the test and the file cannot drift apart.
    const MINIMAL: &str = include_str!("../conf/minimal.toml");

    fn errors_of(text: &str) -> Vec<String> {
        match Config::parse(text, "t.toml") {
            Ok(_) => vec![],
            Err(e) => e.errors.iter().map(|e| format!("{}: {}", e.path, e.message)).collect(),
        }
    }

    #[test]
    fn minimal_config_gets_sane_defaults() {
        let c = Config::parse(MINIMAL, "t.toml").expect("valid");
        assert_eq!(c.server.workers, 1);
        assert_eq!(c.pools[0].balancer, BalancerKind::PeakEwma);
        assert_eq!(c.pools[0].backends.len(), 3);
        assert_eq!(c.pools[0].idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(c.pools[0].tunnel_idle_timeout, Duration::from_secs(3600));
        assert_eq!(c.routes[0].path_prefix, "/");
        assert!(c.routes[0].host.is_none());
    }

    #[test]
    fn every_error_is_reported_with_its_field_path() {
        let text = r#"
colour = "blue"
[server]
workers = 0
[[listeners]]
bind = "127.0.0.1:99999"
[[listeners]]
bind = "127.0.0.1:8080"
nope = 1
[[routes]]
pool = "missing"
[pools.app]
backends = ["127.0.0.1:9001", { addr = "127.0.0.1:9002", weight = 0 }]
connect_timeout = "soon"
"#;
        let errs = errors_of(text);
        let joined = errs.join("\n");
        assert!(joined.contains("unknown field `colour`"), "{joined}");
        assert!(
            joined.contains("server.workers: must be between 1 and 1024"),
            "{joined}"
        );
        assert!(joined.contains("listeners[0].bind: invalid port 99999"), "{joined}");
        assert!(joined.contains("listeners[1].nope: unknown field `nope`"), "{joined}");
        assert!(joined.contains("pools.app.connect_timeout"), "{joined}");
        assert!(errs.len() >= 5, "{joined}");
    }

    #[test]
    fn admin_control_is_loopback_unless_set() {
        assert!(MINIMAL.contains("[admin]\n"));
        let with = |extra: &str| MINIMAL.replacen("[admin]\n", &format!("[admin]\n{extra}\n"), 1);
        let control = |extra: &str| Config::parse(&with(extra), "t").unwrap().admin.unwrap().control;
        assert_eq!(control(""), AdminControl::Loopback);
        assert_eq!(control("control = \"any\""), AdminControl::Any);
        assert_eq!(control("control = \"none\""), AdminControl::None);
        let errs = errors_of(&with("control = \"everyone\""));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("admin.control: unknown variant `everyone`"),
            "{errs:?}"
        );
    }

    #[test]
    fn route_conditions_are_parsed_and_every_bad_one_named() {
        let with = |extra: &str| MINIMAL.replacen("[[routes]]\n", &format!("[[routes]]\n{extra}\n"), 1);
        let c = Config::parse(
            &with("methods = [\"GET\", \"PURGE\"]\nheaders = { x-canary = \"1\", x-debug = true, x-old = false }"),
            "t",
        )
        .unwrap();
        let m = c.routes[0].matches.as_deref().unwrap();
        assert_eq!(
            m.methods,
            [http::Method::GET, http::Method::from_bytes(b"PURGE").unwrap()]
        );
        assert!(m.headers.contains(&(
            http::HeaderName::from_static("x-canary"),
            HeaderCondition::Equals(http::HeaderValue::from_static("1"))
        )));
        assert!(m
            .headers
            .contains(&(http::HeaderName::from_static("x-debug"), HeaderCondition::Present)));
        assert!(m
            .headers
            .contains(&(http::HeaderName::from_static("x-old"), HeaderCondition::Absent)));
        assert!(Config::parse(MINIMAL, "t").unwrap().routes[0].matches.is_none());
        let errs = errors_of(&with(
            "methods = [\"GE T\"]\nheaders = { \"x y\" = \"1\", x-n = 3, x-v = \"a\\nb\" }",
        ));
        assert_eq!(
            errs,
            [
                "routes[0].methods[0]: \"GE T\" is not a method",
                "routes[0].headers.x y: \"x y\" is not a header field name",
                "routes[0].headers.x-n: expected a string (the exact value), true/false (present/absent) or { regex = \"...\" }, got integer",
                "routes[0].headers.x-v: \"a\\nb\" is not a valid field value",
            ]
        );
        assert_eq!(
            errors_of(&with("response_timeout = \"0s\"")),
            ["routes[0].response_timeout: must be greater than 0"]
        );
        let c = Config::parse(&with("response_timeout = \"2m\""), "t").unwrap();
        assert_eq!(c.routes[0].response_timeout, Some(Duration::from_secs(120)));
        assert_eq!(
            errors_of(&with("rewrite_location = false")),
            ["routes[0].rewrite_location: has no effect without prefix_rewrite"]
        );
        let c = Config::parse(&with("path_prefix = \"/a/\"\nprefix_rewrite = \"/\""), "t").unwrap();
        assert!(c.routes[0].rewrite_location, "on by default with prefix_rewrite");
        assert_eq!(
            errors_of(&with("methods = []")),
            ["routes[0].methods: is empty: no request could match (omit it for any method)"]
        );
    }

    #[test]
    fn a_route_admits_by_address_deny_first() {
        let with = |extra: &str| MINIMAL.replacen("[[routes]]\n", &format!("[[routes]]\n{extra}\n"), 1);
        let c = Config::parse(
            &with("allow = [\"10.0.0.0/8\", \"2001:db8::/32\", \" 192.0.2.1 \"]\ndeny = [\"10.6.6.0/24\"]"),
            "t",
        )
        .unwrap();
        let a = c.routes[0].access.as_deref().unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(a.admits(ip("10.1.2.3")) && a.admits(ip("192.0.2.1")) && a.admits(ip("2001:db8::7")));
        assert!(a.admits(ip("::ffff:10.1.2.3")), "an IPv4 client of a dual-stack socket");
        assert!(!a.admits(ip("10.6.6.6")), "deny comes first");
        assert!(!a.admits(ip("192.0.2.2")) && !a.admits(ip("127.0.0.1")) && !a.admits(ip("::1")));
        let open = Config::parse(&with("deny = [\"0.0.0.0/0\"]"), "t").unwrap();
        let open = open.routes[0].access.as_deref().unwrap();
        assert!(!open.admits(ip("8.8.8.8")) && open.admits(ip("::1")));
        assert!(Config::parse(MINIMAL, "t").unwrap().routes[0].access.is_none());
        assert_eq!(
            errors_of(&with("allow = [\"10.0.0.1/8\", \"ten\"]\ndeny = [\"::1/129\"]")),
            [
                "routes[0].allow[0]: \"10.0.0.1/8\" has host bits set: the block is 10.0.0.0/8",
                "routes[0].allow[1]: \"ten\" is not an IP address or CIDR block",
                "routes[0].deny[0]: \"::1/129\" is not an IP address or CIDR block",
            ]
        );
        assert_eq!(
            errors_of(&with("allow = []")),
            ["routes[0].allow: is empty: it would admit nobody (omit it to admit every address; deny = [\"0.0.0.0/0\", \"::/0\"] to refuse all)"]
        );
    }

    #[test]
    fn a_route_splits_over_pools_by_weight() {
        let two = "[pools.web]\nbackends = [\"127.0.0.1:9101\"]\n";
        let with = |route: &str| {
            format!(
                "{}\n{two}",
                MINIMAL.replacen("[[routes]]\npool = \"app\"\n", &format!("[[routes]]\n{route}\n"), 1)
            )
        };
        assert!(MINIMAL.contains("[[routes]]\npool = \"app\"\n"));
        let c = Config::parse(&with("pools = { web = 1, app = 3 }\nsplit_key = \"cookie:uid\""), "t").unwrap();
        let split = c.routes[0].split.as_deref().unwrap();
        // Name order: app (0), then web (1).
        assert_eq!((split.pools.as_slice(), split.total), (&[(0, 3), (1, 1)][..], 4));
        assert_eq!(split.key, Some(HashKey::Cookie("uid".into())));
        assert_eq!(c.routes[0].pool, 0);
        // A client's place is the hash's top bits as a share of the total.
        assert_eq!(split.pick(Some(0)), 0);
        assert_eq!(split.pick(Some(u64::MAX)), 1);
        assert_eq!(split.pick(Some(3 << 62)), 1);
        assert_eq!(split.pick(Some((3 << 62) - (1 << 32))), 0);
        let zero = Config::parse(&with("pools = { web = 0, app = 1 }"), "t").unwrap();
        assert!((0..100).all(|_| zero.routes[0].split.as_ref().unwrap().pick(None) == 0));
        for (route, want) in [
            (
                "pool = \"app\"\npools = { web = 1 }",
                "routes[0]: set pool or pools, not both",
            ),
            (
                "path_prefix = \"/\"",
                "routes[0].pool: missing: the pool that serves the route (or pools, to split its requests by weight)",
            ),
            (
                "pools = { web = 1, nope = 1 }",
                "routes[0].pools.nope: unknown pool 'nope' (defined pools: app, web)",
            ),
            (
                "pools = { web = -1 }",
                "routes[0].pools.web: must be a weight from 0 to 1000000, got -1",
            ),
            (
                "pools = { web = 0, app = 0 }",
                "routes[0].pools: every weight is 0: no pool would get a request",
            ),
            (
                "pools = {}",
                "routes[0].pools: is empty: name the pools and their weights",
            ),
            (
                "pool = \"app\"\nsplit_key = \"client_ip\"",
                "routes[0].split_key: has no effect without pools",
            ),
            (
                "pools = { web = 1 }\nsplit_key = \"ip\"",
                "routes[0].split_key: expected \"client_ip\", \"uri\", \"path\", \"header:NAME\" or \"cookie:NAME\", got \"ip\"",
            ),
        ] {
            assert_eq!(errors_of(&with(route)), [want], "{route}");
        }
    }

    #[test]
    fn a_pool_of_backups_alone_is_refused() {
        let pool = |list: &str| {
            format!(
                "[[listeners]]\nbind = \"127.0.0.1:0\"\n[[routes]]\npool = \"app\"\n[pools.app]\nbackends = [{list}]\n"
            )
        };
        let c = Config::parse(&pool("\"127.0.0.1:1\", { addr = \"127.0.0.1:2\", backup = true }"), "t").unwrap();
        assert_eq!(
            c.pools[0].backends.iter().map(|b| b.backup).collect::<Vec<_>>(),
            [false, true]
        );
        let errs = errors_of(&pool("{ addr = \"127.0.0.1:2\", backup = true }"));
        assert_eq!(
            errs,
            ["pools.app.backends: every backend is a backup: a backup stands in for the others, so at least one must not be"]
        );
        let errs = errors_of(&pool("{ addr = \"127.0.0.1:2\", backup = \"yes\" }"));
        assert!(
            errs[0].starts_with("pools.app.backends[0].backup: invalid type"),
            "{errs:?}"
        );
    }

    #[test]
    fn a_zero_server_timeout_is_refused() {
        for field in [
            "client_header_timeout",
            "client_body_timeout",
            "send_timeout",
            "keepalive_timeout",
        ] {
            let text = MINIMAL.replacen("[server]\n", &format!("[server]\n{field} = \"0s\"\n"), 1);
            let errs = errors_of(&text).join("\n");
            assert!(
                errs.contains(&format!("server.{field}: must be greater than 0")),
                "{errs}"
            );
        }
    }

    #[test]
    fn keepalive_requests_and_time_default_to_nginxs_and_zero_lifts_them() {
        let with = |v: &str| MINIMAL.replacen("[server]\n", &format!("[server]\n{v}\n"), 1);
        let s = Config::parse(MINIMAL, "t").unwrap().server;
        assert_eq!(s.keepalive_requests.map(|n| n.get()), Some(1000));
        assert_eq!(s.keepalive_time, Some(Duration::from_secs(3600)));
        let s = Config::parse(&with("keepalive_requests = 5\nkeepalive_time = \"90s\""), "t")
            .unwrap()
            .server;
        assert_eq!(s.keepalive_requests.map(|n| n.get()), Some(5));
        assert_eq!(s.keepalive_time, Some(Duration::from_secs(90)));
        let s = Config::parse(&with("keepalive_requests = 0\nkeepalive_time = \"0s\""), "t")
            .unwrap()
            .server;
        assert_eq!((s.keepalive_requests, s.keepalive_time), (None, None));
        let errs = errors_of(&with("keepalive_requests = -1")).join("\n");
        assert!(errs.contains("server.keepalive_requests"), "{errs}");
        let errs = errors_of(&with("keepalive_time = \"soon\"")).join("\n");
        assert!(errs.contains("server.keepalive_time"), "{errs}");
    }

    #[test]
    fn max_connection_duration_defaults_to_an_hour_and_0s_lifts_it() {
        let c = Config::parse(MINIMAL, "t").unwrap();
        assert_eq!(c.pools[0].max_connection_duration, Some(Duration::from_secs(3600)));
        let c = Config::parse(&format!("{MINIMAL}max_connection_duration = \"10m\"\n"), "t").unwrap();
        assert_eq!(c.pools[0].max_connection_duration, Some(Duration::from_secs(600)));
        let c = Config::parse(&format!("{MINIMAL}max_connection_duration = \"0s\"\n"), "t").unwrap();
        assert_eq!(c.pools[0].max_connection_duration, None);
        let errs = errors_of(&format!("{MINIMAL}max_connection_duration = 5\n")).join("\n");
        assert!(errs.contains("pools.app.max_connection_duration"), "{errs}");
    }

    #[test]
    fn a_zero_pool_timeout_is_refused() {
        for field in [
            "connect_timeout",
            "response_timeout",
            "idle_timeout",
            "tunnel_idle_timeout",
            "read_timeout",
        ] {
            let text = format!("{MINIMAL}{field} = \"0s\"\n");
            let errs = errors_of(&text).join("\n");
            assert!(
                errs.contains(&format!("pools.app.{field}: must be greater than 0")),
                "{errs}"
            );
        }
    }

    #[test]
    fn access_log_is_off_stdout_or_a_file_relative_to_the_config() {
        let with = |v: &str| MINIMAL.replacen("[server]\n", &format!("[server]\naccess_log = {v}\n"), 1);
        assert!(MINIMAL.contains("[server]\n"));
        assert_eq!(Config::parse(MINIMAL, "t").unwrap().server.access_log, AccessLog::Off);
        assert_eq!(
            Config::parse(&with("false"), "t").unwrap().server.access_log,
            AccessLog::Off
        );
        assert_eq!(
            Config::parse(&with("true"), "t").unwrap().server.access_log,
            AccessLog::Stdout
        );
        let dir = std::env::temp_dir();
        let c = Config::parse_with_base(&with("\"access.log\""), "t", &dir).unwrap();
        assert_eq!(c.server.access_log, AccessLog::File(dir.join("access.log")));
        // An absolute path ignores the config's directory.
        let abs = dir.join("a.log");
        let c = Config::parse_with_base(
            &with(&format!("{:?}", abs.display().to_string())),
            "t",
            Path::new("/elsewhere"),
        )
        .unwrap();
        assert_eq!(c.server.access_log, AccessLog::File(abs));
    }

    #[test]
    fn a_return_route_needs_no_pool_and_says_what_is_wrong() {
        let with = |v: &str| MINIMAL.replace("[[routes]]\npool = \"app\"", &format!("[[routes]]\n{v}"));
        let c = Config::parse(&with("return = { status = 204 }"), "t").unwrap();
        let d = c.routes[0].direct.as_ref().unwrap();
        assert_eq!(
            (d.status.as_u16(), d.body.len(), d.content_type.is_none()),
            (204, 0, true)
        );
        for (v, want) in [
            (
                "return = { status = 99 }",
                "routes[0].return.status: must be a status from 200 to 599, got 99",
            ),
            (
                "return = { status = 600 }",
                "routes[0].return.status: must be a status from 200 to 599",
            ),
            (
                "return = { status = 302 }",
                "routes[0].return.location: missing: a 302 redirect needs",
            ),
            (
                "return = { status = 200, location = \"/x\" }",
                "routes[0].return.location: only a redirect",
            ),
            (
                "return = { status = 301, location = \"$nope\" }",
                "routes[0].return.location:",
            ),
            (
                "pool = \"app\"\nreturn = { status = 404 }",
                "routes[0].return: a route with return answers itself: remove its pool",
            ),
            ("return = { code = 404 }", "routes[0].return"),
        ] {
            let errs = errors_of(&with(v)).join("\n");
            assert!(errs.contains(want), "{v}: {errs}");
        }
    }

    #[test]
    fn compress_defaults_the_server_setting_and_every_mistake_is_named() {
        let route = |v: &str| {
            MINIMAL.replace(
                "[[routes]]\npool = \"app\"",
                &format!("[[routes]]\npool = \"app\"\n{v}"),
            )
        };
        let c = Config::parse(&route("compress = true"), "t").unwrap();
        assert_eq!(c.routes[0].compress.as_deref(), Some(&CompressConfig::default()));
        let c = Config::parse(&route("compress = { level = 5, types = [\"Text/*\"] }"), "t").unwrap();
        let z = c.routes[0].compress.as_deref().unwrap();
        assert_eq!(
            (z.level, z.min_length, z.types.as_slice()),
            (5, 256, &["text/*".to_string()][..])
        );
        // The server's setting is every route's default; a route may turn it off.
        let server = |v: &str| MINIMAL.replacen("[server]\n", &format!("[server]\n{v}\n"), 1);
        let c = Config::parse(&server("compress = { min_length = 1000 }"), "t").unwrap();
        assert_eq!(c.routes[0].compress.as_ref().unwrap().min_length, 1000);
        let both = server("compress = true").replace(
            "[[routes]]\npool = \"app\"",
            "[[routes]]\npool = \"app\"\ncompress = false",
        );
        assert!(Config::parse(&both, "t").unwrap().routes[0].compress.is_none());
        assert!(Config::parse(MINIMAL, "t").unwrap().routes[0].compress.is_none());
        // zstd is offered when asked for, in the order given.
        let c = Config::parse(
            &route("compress = { encodings = [\"zstd\", \"br\", \"GZIP\"], zstd_level = 7, brotli_level = 0 }"),
            "t",
        )
        .unwrap();
        let z = c.routes[0].compress.as_deref().unwrap();
        use crate::compress::Coding;
        assert_eq!(
            (z.encodings.as_slice(), z.zstd_level, z.brotli_level),
            (&[Coding::Zstd, Coding::Brotli, Coding::Gzip][..], 7, 0)
        );
        assert_eq!(CompressConfig::default().encodings, [Coding::Gzip]);
        let errs = errors_of(&route(
            "compress = { encodings = [\"gzip\", \"deflate\", \"gzip\"], zstd_level = 20, brotli_level = 12 }",
        ))
        .join("\n");
        for want in [
            "routes[0].compress.encodings[1]: expected \"zstd\", \"br\" or \"gzip\", got \"deflate\"",
            "routes[0].compress.brotli_level: must be from 0 (fastest) to 11 (smallest), got 12",
            "routes[0].compress.encodings[2]: \"gzip\" is listed twice",
            "routes[0].compress.zstd_level: must be from 1 (fastest) to 19 (smallest), got 20",
        ] {
            assert!(errs.contains(want), "{want}: {errs}");
        }
        assert!(errors_of(&route("compress = { encodings = [] }"))
            .join("\n")
            .contains("routes[0].compress.encodings: must list at least one"));
        // Every mistake at once, each where it is.
        let errs = errors_of(&route(
            "compress = { level = 0, types = [\"text/html\", \"html\", \"*/*\"] }",
        ))
        .join("\n");
        for want in [
            "routes[0].compress.level: must be from 1 (fastest) to 9 (smallest), got 0",
            "routes[0].compress.types[1]: expected a media type",
            "routes[0].compress.types[2]: expected a media type",
        ] {
            assert!(errs.contains(want), "{want}: {errs}");
        }
        for (v, want) in [
            (
                "compress = \"gzip\"",
                "routes[0].compress: expected true, false or a table",
            ),
            (
                "compress = { types = [] }",
                "routes[0].compress.types: must list at least one",
            ),
            (
                "compress = { algo = \"br\" }",
                "routes[0].compress.algo: unknown field `algo`",
            ),
        ] {
            let errs = errors_of(&route(v)).join("\n");
            assert!(errs.contains(want), "{v}: {errs}");
        }
        let errs = errors_of(&server("compress = { level = 10 }")).join("\n");
        assert!(errs.contains("server.compress.level: must be from 1"), "{errs}");
    }

    #[test]
    fn patterns_are_compiled_and_a_bad_one_is_named() {
        let with = |extra: &str| MINIMAL.replacen("[[routes]]\n", &format!("[[routes]]\n{extra}\n"), 1);
        let c = Config::parse(
            &with("path_regex = '^/v[0-9]+/'\nheaders = { user-agent = { regex = 'bot' } }"),
            "t",
        )
        .unwrap();
        let m = c.routes[0].matches.as_deref().unwrap();
        let empty = http::HeaderMap::new();
        assert!(!m.fits(&http::Method::GET, "/v2/x", None, || &empty), "no user-agent");
        let mut h = http::HeaderMap::new();
        h.insert("user-agent", http::HeaderValue::from_static("a bot"));
        assert!(m.fits(&http::Method::GET, "/v2/x", None, || &h));
        assert!(!m.fits(&http::Method::GET, "/x/v2/", None, || &h));
        let errs = errors_of(&with(
            "path_regex = '(unclosed'\nheaders = { a = { regex = '[z-a]' }, b = { regex = 3 }, c = { exact = 'x' } }",
        ));
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(
            errs[0].starts_with("routes[0].path_regex: not a valid pattern: "),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("routes[0].headers.a.regex: not a valid pattern: "),
            "{errs:?}"
        );
        assert_eq!(errs[2], "routes[0].headers.b.regex: expected a string (the pattern)");
        assert!(
            errs[3].starts_with("routes[0].headers.c: expected a string"),
            "{errs:?}"
        );
        // Two routes with the same pattern at the same place: the second never wins.
        let twice = MINIMAL.replacen(
            "[[routes]]\npool = \"app\"\n",
            "[[routes]]\npool = \"app\"\npath_regex = 'x'\n[[routes]]\npool = \"app\"\npath_regex = 'x'\n",
            1,
        );
        assert!(errors_of(&twice)
            .join("\n")
            .contains("routes[1]: matches exactly what routes[0] matches"));
    }

    #[test]
    fn expect_body_makes_an_http_check_and_says_what_is_wrong() {
        let hc = |v: &str| format!("{MINIMAL}health_check = {{ {v} }}\n");
        let c = Config::parse(&hc("expect_body = \"ok\""), "t").unwrap();
        let h = &c.pools[0].health_check;
        assert_eq!(
            (h.kind, h.expect_body.as_deref(), h.path.as_str()),
            (HealthCheckKind::Http, Some("ok"), "/")
        );
        for (v, want) in [
            ("expect_body = \"\"", "pools.app.health_check.expect_body: is empty"),
            (
                "type = \"tcp\", expect_body = \"ok\"",
                "pools.app.health_check.expect_body: only an HTTP check reads a body",
            ),
        ] {
            let errs = errors_of(&hc(v)).join("\n");
            assert!(errs.contains(want), "{v}: {errs}");
        }
    }

    #[test]
    fn trusted_proxies_and_their_header_say_what_is_wrong() {
        let server = |v: &str| MINIMAL.replacen("[server]\n", &format!("[server]\n{v}\n"), 1);
        let c = Config::parse(&server("trusted_proxies = [\"10.0.0.0/8\", \"::1\"]"), "t").unwrap();
        let real = c.server.real_ip.unwrap();
        assert_eq!(real.header, "x-forwarded-for");
        assert!(real.trusts("10.2.3.4".parse().unwrap()));
        assert!(real.trusts("::ffff:10.2.3.4".parse().unwrap()));
        assert!(!real.trusts("192.0.2.1".parse().unwrap()));
        let c = Config::parse(
            &server("trusted_proxies = [\"::1\"]\nclient_ip_header = \"CF-Connecting-IP\""),
            "t",
        )
        .unwrap();
        assert_eq!(c.server.real_ip.unwrap().header, "cf-connecting-ip");
        assert!(Config::parse(MINIMAL, "t").unwrap().server.real_ip.is_none());
        let errs = errors_of(&server("trusted_proxies = [\"10.0.0.1/8\", \"proxy.local\"]")).join("\n");
        for want in [
            "server.trusted_proxies[0]: \"10.0.0.1/8\" has host bits set: the block is 10.0.0.0/8",
            "server.trusted_proxies[1]: \"proxy.local\" is not an IP address or CIDR block",
        ] {
            assert!(errs.contains(want), "{want}: {errs}");
        }
        for (v, want) in [
            ("trusted_proxies = []", "server.trusted_proxies: is empty"),
            (
                "client_ip_header = \"X-Real-IP\"",
                "server.client_ip_header: has no effect without trusted_proxies",
            ),
            (
                "trusted_proxies = [\"::1\"]\nclient_ip_header = \"bad header\"",
                "server.client_ip_header: not a header name",
            ),
        ] {
            let errs = errors_of(&server(v)).join("\n");
            assert!(errs.contains(want), "{v}: {errs}");
        }
    }

    #[test]
    fn a_state_file_is_relative_to_the_config_and_its_directory_must_exist() {
        let with = |v: &str| MINIMAL.replace("[admin]\n", &format!("[admin]\nstate_file = {v}\n"));
        let c = Config::parse_with_base(&with("\"state.json\""), "t", Path::new("/tmp")).unwrap();
        assert_eq!(c.admin.unwrap().state_file.unwrap(), Path::new("/tmp/state.json"));
        let errs = errors_of(&with("\"/nonexistent-rampart-dir/s.json\"")).join("\n");
        assert!(
            errs.contains("admin.state_file: directory /nonexistent-rampart-dir does not exist"),
            "{errs}"
        );
        assert!(errors_of(&with("\"/tmp\""))
            .join("\n")
            .contains("admin.state_file: /tmp is a directory"));
    }

    #[test]
    fn on_status_lists_5xx_statuses() {
        let with = |v: &str| format!("{MINIMAL}\nretry = {{ on_status = {v} }}\n");
        let retry = |v: &str| Config::parse(&with(v), "t").unwrap().pools[0].retry.clone();
        let default = Config::parse(MINIMAL, "t").unwrap().pools[0].retry.clone();
        assert!([502, 503, 504].iter().all(|&s| default.fails_on(s)));
        assert!(![500, 501, 505, 200, 404, 0, 65535].iter().any(|&s| default.fails_on(s)));
        let r = retry("[500, 599]");
        assert!(r.fails_on(500) && r.fails_on(599) && !r.fails_on(502));
        assert!(!retry("[]").fails_on(503));
        let errs = errors_of(&with("[503, 429, 600]")).join("\n");
        assert!(
            errs.contains("pools.app.retry.on_status: 429 is not a 5xx status")
                && errs.contains("pools.app.retry.on_status: 600 is not a 5xx status"),
            "{errs}"
        );
    }

    #[test]
    fn sticky_takes_a_cookie_name_and_says_what_is_wrong() {
        let with = |v: &str| format!("{MINIMAL}\nsticky = {v}\n");
        let c = Config::parse(&with("{ cookie = \"srv\" }"), "t").unwrap();
        let s = c.pools[0].sticky.as_ref().unwrap();
        assert_eq!(
            (s.cookie.as_str(), s.attributes.as_str()),
            ("srv", "; Path=/; HttpOnly")
        );
        let c = Config::parse(&with("{ cookie = \"srv\", max_age = \"8h\", path = \"/app\" }"), "t").unwrap();
        assert_eq!(
            c.pools[0].sticky.as_ref().unwrap().attributes,
            "; Path=/app; Max-Age=28800; HttpOnly"
        );
        let c = Config::parse(
            &with("{ cookie = \"srv\", domain = \".example.com\", same_site = \"lax\", secure = true, http_only = false }"),
            "t",
        )
        .unwrap();
        let s = c.pools[0].sticky.as_ref().unwrap();
        assert_eq!(
            (s.attributes.as_str(), s.secure),
            ("; Path=/; Domain=.example.com; SameSite=Lax", Some(true))
        );
        for (v, want) in [
            ("{ cookie = \"a b\" }", "pools.app.sticky.cookie: must be a cookie name"),
            ("{ cookie = \"\" }", "pools.app.sticky.cookie: must be a cookie name"),
            (
                "{ cookie = \"s\", path = \"x\" }",
                "pools.app.sticky.path: must start with /",
            ),
            (
                "{ cookie = \"s\", path = \"/a;b\" }",
                "pools.app.sticky.path: must start with /",
            ),
            (
                "{ cookie = \"s\", max_age = \"0s\" }",
                "pools.app.sticky.max_age: must be at least 1s",
            ),
            (
                "{ cookie = \"s\", domain = \"a;b\" }",
                "pools.app.sticky.domain: must be a domain name",
            ),
            (
                "{ cookie = \"s\", same_site = \"loose\" }",
                "pools.app.sticky.same_site: must be \"Strict\", \"Lax\" or \"None\"",
            ),
            (
                "{ cookie = \"s\", same_site = \"None\", secure = false }",
                "pools.app.sticky.same_site: \"None\" needs Secure",
            ),
            ("{ name = \"s\" }", "pools.app.sticky"),
            ("\"srv\"", "pools.app.sticky"),
        ] {
            let errs = errors_of(&with(v)).join("\n");
            assert!(errs.contains(want), "{v}: {errs}");
        }
    }

    #[test]
    fn a_bad_access_log_says_why() {
        let with = |v: &str| MINIMAL.replacen("[server]\n", &format!("[server]\naccess_log = {v}\n"), 1);
        for (v, want) in [
            (
                "5",
                "server.access_log: must be true, false or a file path, got integer",
            ),
            ("\" \"", "server.access_log: must not be empty"),
            (
                "\"/nonexistent-rampart-dir/a.log\"",
                "server.access_log: directory /nonexistent-rampart-dir does not exist",
            ),
            ("\"/tmp\"", "server.access_log: /tmp is a directory"),
            (
                "true\naccess_log_format = \"$status $bytes\"",
                "server.access_log_format: unknown variable $bytes; known:",
            ),
            (
                "false\naccess_log_filter = { min_status = 500 }",
                "server.access_log_filter: has no effect without access_log",
            ),
            (
                "true\naccess_log_filter = { min_status = 600 }",
                "server.access_log_filter.min_status: must be a status between 100 and 599",
            ),
            (
                "true\naccess_log_filter = { status = 500 }",
                "server.access_log_filter.status: unknown field `status`, expected `min_status` or `slower_than`",
            ),
            (
                "true\naccess_log_escape = \"json\"",
                "server.access_log_escape: \"json\" applies to a template of access_log_format; the \"rampart\" preset",
            ),
            (
                "true\naccess_log_format = '{\"s\":\"$status\",\"p\":\"$pipe\"}'\naccess_log_escape = \"json\"",
                "server.access_log_format: unknown variable $pipe",
            ),
            (
                "true\naccess_log_format = \"$status\"\naccess_log_escape = \"xml\"",
                "server.access_log_escape: must be \"default\" or \"json\", got \"xml\"",
            ),
        ] {
            let errs = errors_of(&with(v)).join("\n");
            assert!(errs.contains(want), "{v}: {errs}");
        }
        // A template that does not parse is the one error, not also a preset's.
        let errs = errors_of(&with("true\naccess_log_format = '$pipe'\naccess_log_escape = \"json\""));
        assert_eq!(errs.len(), 1, "{errs:?}");
        let c = Config::parse(&with("true\naccess_log_format = \"combined\""), "t").unwrap();
        assert_eq!(c.server.access_log_format.source(), "combined");
        let c = Config::parse(MINIMAL, "t").unwrap();
        assert_eq!(c.server.access_log_format.source(), "rampart");
        assert_eq!(c.server.access_log_format.filter, None);
        let c = Config::parse(&with("true\naccess_log_filter = { slower_than = \"2s\" }"), "t").unwrap();
        assert_eq!(
            c.server.access_log_format.filter,
            Some(crate::accesslog::LogFilter {
                min_status: None,
                slower_than: Some(Duration::from_secs(2))
            })
        );
    }

    #[test]
    fn route_to_unknown_pool_names_the_known_ones() {
        let text = MINIMAL.replace("pool = \"app\"", "pool = \"web\"");
        let errs = errors_of(&text).join("\n");
        assert!(
            errs.contains("routes[0].pool: unknown pool 'web' (defined pools: app)"),
            "{errs}"
        );
    }

    #[test]
    fn zero_weight_and_duplicate_backends_are_rejected() {
        let text = MINIMAL.replace(
            r#"backends = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]"#,
            r#"backends = ["127.0.0.1:9001", "127.0.0.1:9001", { addr = "127.0.0.1:9003", weight = 0 }]"#,
        );
        let errs = errors_of(&text).join("\n");
        assert!(
            errs.contains("pools.app.backends[1]: 127.0.0.1:9001 is listed twice"),
            "{errs}"
        );
        assert!(
            errs.contains("pools.app.backends[2].weight: must be between 1"),
            "{errs}"
        );
    }

    #[test]
    fn wildcard_hosts_and_hash_keys_parse() {
        let text = MINIMAL
            .replace("pool = \"app\"", "pool = \"app\"\nhost = \"*.Example.com\"")
            .replace(
                "[pools.app]",
                "[pools.app]\nbalancer = \"consistent_hash\"\nhash_key = \"header:x-user\"",
            );
        let c = Config::parse(&text, "t.toml").expect("valid");
        assert_eq!(c.routes[0].host, Some(HostMatch::Suffix(".example.com".into())));
        assert_eq!(
            c.pools[0].hash_key,
            HashKey::Header(http::HeaderName::from_static("x-user"))
        );
    }

    #[test]
    fn invalid_toml_is_one_clear_error() {
        let errs = errors_of("[server\nworkers = 1");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].contains("invalid TOML"), "{errs:?}");
    }
}
