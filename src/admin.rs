//! The admin listener, kept off the data path on the control thread:
//! - `GET /metrics`: Prometheus text.
//! - `GET /status`: JSON view of pools and backends (health, ejection, in-flight, EWMA),
//!   and of TLS certificates (names, expiry).
//! - `GET /healthz`: liveness, 200 while the process serves.
//! - `GET /ready`: readiness, 503 while draining or when no route can reach a backend.
//! - `POST /backends/POOL/BACKEND/STATE`: an operator drains a backend, puts it in
//!   maintenance or makes it ready again (`state::AdminState`), from loopback only
//!   unless `[admin] control` says otherwise.
//! - `POST /backends/POOL/BACKEND/weight/WEIGHT`: an operator sets a backend's
//!   weight (a canary's share) without editing the config, as HAProxy's
//!   `set weight`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::state::{now_ms, Shared};

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = crate::stopped(&mut shutdown) => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        conns.spawn(serve_connection(stream, peer, shared, shutdown));
    }
    // Stop accepting (after an upgrade the new process takes the admin socket's
    // connections), and let each open one end cleanly, as the workers do.
    drop(listener);
    let _ = tokio::time::timeout(ADMIN_DRAIN_LIMIT, async { while conns.join_next().await.is_some() {} }).await;
}

/// Longest a stopping process waits for its admin connections.
const ADMIN_DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// One admin connection. When the process stops, it is drained like a client
/// connection: for `listener::DRAIN_IDLE` a request on it is still answered, with
/// `Connection: close`, and then it closes; cut at once, a scrape sent on a kept-alive
/// connection just as the old process of an upgrade stopped would fail.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        async move {
            let mut r = route(&shared, req, peer);
            if shared.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
                r.headers_mut()
                    .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(r)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = crate::stopped(&mut shutdown) => {}
    }
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = tokio::time::sleep(crate::listener::DRAIN_IDLE) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

fn route(shared: &Shared, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    if let Some(rest) = req.uri().path().strip_prefix("/backends/") {
        return change_backends(shared, req.method(), rest, peer);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(metrics_text(shared))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4".parse().expect("static"),
            );
            r
        }
        "/status" => {
            let mut r = Response::new(Full::new(Bytes::from(status_json(shared).to_string())));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, "application/json".parse().expect("static"));
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/ready" => {
            if shared.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if !any_backend_available(shared) {
                text(StatusCode::SERVICE_UNAVAILABLE, "no backend available\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: GET /metrics /status /healthz /ready, POST /backends/POOL/BACKEND/{ready,drain,maint}, POST /backends/POOL/BACKEND/weight/WEIGHT\n",
        ),
    }
}

/// Writes every backend's admin state that is not `ready` to `[admin] state_file`,
/// whole and then renamed into place, so a crash mid-write leaves the last file.
pub fn save_states(snap: &crate::state::Snapshot) -> Result<(), String> {
    let Some(path) = snap.config.admin.as_ref().and_then(|a| a.state_file.as_ref()) else {
        return Ok(());
    };
    let text = serde_json::to_string_pretty(&snap.admin_states()).map_err(|e| e.to_string())? + "\n";
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Sets the states `[admin] state_file` saved, at start. A file that is missing (the
/// first start) is no state; one that cannot be read or parsed is logged and left.
pub fn load_states(snap: &crate::state::Snapshot) {
    let Some(path) = snap.config.admin.as_ref().and_then(|a| a.state_file.as_ref()) else {
        return;
    };
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the backend state file; every backend starts ready");
            return;
        }
    };
    match serde_json::from_slice::<Vec<crate::state::SavedState>>(&text) {
        Ok(saved) => {
            let set = snap.restore_admin_states(&saved);
            tracing::info!(file = %path.display(), backends = set, "backend admin states restored");
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot parse the backend state file; every backend starts ready")
        }
    }
}

const BACKENDS_USAGE: &str = "POST /backends/POOL/BACKEND/STATE or POST /backends/POOL/BACKEND/weight/WEIGHT: POOL a pool's name or *, BACKEND its label or address (ip:port) or as written in backends, STATE ready, drain or maint, WEIGHT 1 to 1000, N% of the configured weight, or config (the configured weight again)";

/// What `POST /backends/...` changes on the backends it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    State(crate::state::AdminState),
    /// A weight, 1 to `config::MAX_WEIGHT`.
    Weight(u32),
    /// Percent of each backend's configured weight.
    WeightPercent(u32),
    /// Back to the configured weight.
    ConfigWeight,
}

impl Change {
    /// The weight backend `b` gets, for a weight change.
    fn weight_for(self, configured: u32) -> u32 {
        match self {
            Change::Weight(w) => w,
            Change::WeightPercent(p) => {
                let w = (configured as u64 * p as u64 + 50) / 100;
                w.clamp(1, crate::config::MAX_WEIGHT as u64) as u32
            }
            Change::State(_) | Change::ConfigWeight => configured,
        }
    }
}

/// Splits `POOL/BACKEND/STATE` or `POOL/BACKEND/weight/WEIGHT` (percent-decoded
/// pool and backend). The change is the last segment, or the last two, and the pool
/// the first, so a backend's label may hold anything between.
fn parse_change(rest: &str) -> Result<(String, String, Change), String> {
    let Some((head, last)) = rest.rsplit_once('/') else {
        return Err(format!("no state in /backends/{rest}"));
    };
    let (head, change) = match head.strip_suffix("/weight") {
        Some(head) => (head, parse_weight(last)?),
        None => match crate::state::AdminState::parse(last) {
            Some(to) => (head, Change::State(to)),
            None => return Err(format!("unknown state {last:?}")),
        },
    };
    let Some((pool, backend)) = head.split_once('/') else {
        return Err(format!("no backend in /backends/{rest}"));
    };
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    Ok((decode(pool), decode(backend), change))
}

fn parse_weight(w: &str) -> Result<Change, String> {
    if w == "config" {
        return Ok(Change::ConfigWeight);
    }
    let (digits, percent) = match w.strip_suffix('%') {
        Some(d) => (d, true),
        None => (w, false),
    };
    let max = crate::config::MAX_WEIGHT;
    match digits.parse::<u32>() {
        // Weight 0 would be a drain by another name, one `/status` and the state
        // file would not show as such.
        Ok(0) => Err(format!(
            "weight {w:?}: to stop sending a backend new requests, set its state to drain"
        )),
        Ok(p) if percent && p <= 100 * max => Ok(Change::WeightPercent(p)),
        Ok(n) if !percent && n <= max => Ok(Change::Weight(n)),
        _ => Err(format!(
            "weight {w:?}: must be 1 to {max}, N% of the configured weight, or config"
        )),
    }
}

/// `POST /backends/POOL/BACKEND/STATE` or `.../weight/WEIGHT`: sets the operator's
/// state, or weight, of every backend that matches, and answers what each was, as
/// JSON. A weight takes effect through a new snapshot, whose balancers are built
/// with it (`Shared::rebuild`), and holds until a reload changes the backend's
/// configured weight.
fn change_backends(shared: &Shared, method: &Method, rest: &str, peer: SocketAddr) -> Response<Full<Bytes>> {
    if method != Method::POST {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, format!("{BACKENDS_USAGE}\n"));
        r.headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("POST"));
        return r;
    }
    let snap = shared.snapshot.load_full();
    let control = snap.config.admin.as_ref().map(|a| a.control).unwrap_or_default();
    if let Some(why) = refusal(control, peer) {
        tracing::warn!(%peer, path = %rest, "admin: backend change refused");
        return text(StatusCode::FORBIDDEN, why);
    }
    let (pool, backend, change) = match parse_change(rest) {
        Ok(c) => c,
        Err(msg) => return text(StatusCode::BAD_REQUEST, format!("{msg}\n{BACKENDS_USAGE}\n")),
    };
    let pools: Vec<_> = snap.pools.iter().filter(|p| pool == "*" || p.name == pool).collect();
    if pools.is_empty() {
        let names: Vec<_> = snap.pools.iter().map(|p| p.name.as_str()).collect();
        return text(
            StatusCode::NOT_FOUND,
            format!("no pool {pool:?}; pools: {}\n", names.join(", ")),
        );
    }
    let matched: Vec<_> = pools
        .iter()
        .flat_map(|p| p.backends.iter().map(move |b| (p, b)))
        .filter(|(_, b)| b.name == backend || b.written == backend || b.addr.to_string() == backend)
        .collect();
    if matched.is_empty() {
        let names: Vec<_> = pools
            .iter()
            .flat_map(|p| p.backends.iter().map(|b| b.name.as_str()))
            .collect();
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "no backend {backend:?} in pool {pool:?}; backends: {}\n",
                names.join(", ")
            ),
        );
    }
    let changed: Vec<_> = match change {
        Change::State(to) => matched
            .iter()
            .map(|(p, b)| {
                let was = b.state.set_admin_state(to);
                if was != to {
                    tracing::info!(pool = %p.name, backend = %b.name, from = was.as_str(), to = to.as_str(), %peer, "admin: backend state set");
                }
                serde_json::json!({
                    "pool": p.name,
                    "backend": b.name,
                    "was": was.as_str(),
                    "admin_state": to.as_str(),
                    "in_flight": b.state.in_flight(),
                })
            })
            .collect(),
        _ => {
            for (p, b) in &matched {
                let w = change.weight_for(b.config_weight);
                b.state
                    .set_weight(b.config_weight, (w != b.config_weight).then_some(w));
                if w != b.weight {
                    tracing::info!(pool = %p.name, backend = %b.name, from = b.weight, to = w, configured = b.config_weight, %peer, "admin: backend weight set");
                }
            }
            let now = shared.rebuild();
            matched
                .iter()
                .map(|(p, b)| {
                    // As the new snapshot has it (a reload meanwhile may have
                    // changed the configured weight, or removed the backend).
                    let live = now
                        .pools
                        .iter()
                        .filter(|np| np.name == p.name)
                        .flat_map(|np| &np.backends)
                        .find(|nb| Arc::ptr_eq(&nb.state, &b.state));
                    serde_json::json!({
                        "pool": p.name,
                        "backend": b.name,
                        "was": b.weight,
                        "weight": live.map(|nb| nb.weight),
                        "config_weight": live.map(|nb| nb.config_weight),
                    })
                })
                .collect()
        }
    };
    let mut body = serde_json::json!({ "backends": changed });
    if let Err(e) = save_states(&snap) {
        // The change holds in this process; only a restart would forget it.
        tracing::warn!(error = %e, "admin: cannot save the backend states");
        body["state_file_error"] = serde_json::Value::String(e);
    }
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

/// Why `[admin] control` refuses a change from `peer`, if it does.
fn refusal(control: crate::config::AdminControl, peer: SocketAddr) -> Option<&'static str> {
    use crate::config::AdminControl;
    // An IPv4 client of a dual-stack socket shows as ::ffff:127.0.0.1.
    let loopback = crate::netio::canonical_ip(peer.ip()).is_loopback();
    match control {
        AdminControl::None => Some("backend state changes are off ([admin] control = \"none\")\n"),
        AdminControl::Loopback if !loopback => {
            Some("backend state changes are taken from loopback clients only ([admin] control = \"loopback\")\n")
        }
        _ => None,
    }
}

/// A plain-text answer: a `&'static str` is sent without a copy, a `String` as made.
fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    r
}

fn any_backend_available(shared: &Shared) -> bool {
    let now = now_ms();
    let snap = shared.snapshot.load();
    snap.pools
        .iter()
        .any(|p| p.backends.iter().any(|b| b.state.is_available(now)))
}

/// The `/metrics` page.
pub fn metrics_text(shared: &Shared) -> String {
    update_gauges(shared);
    let mut body = crate::metrics::install().render();
    backend_series(shared, &mut body);
    certificate_expiry(shared, &mut body);
    body
}

fn update_gauges(shared: &Shared) {
    for (name, count) in [
        (crate::metrics::DORMANT_CONNECTIONS, &shared.dormant_connections),
        (crate::metrics::CLIENT_CONNECTIONS, &shared.client_connections),
        (crate::metrics::TUNNELS, &shared.tunnels),
    ] {
        metrics::gauge!(name).set(count.load(std::sync::atomic::Ordering::Relaxed) as f64);
    }
}

/// Every per-backend series: the `rampart_backend_{healthy,ejected,in_flight,weight}` gauges
/// and the `rampart_{upstream_errors,ejections,restores}_total` counters. They are
/// written from the live snapshot at each scrape rather than kept in the recorder,
/// where a backend a reload or a DNS answer removed would stay, frozen at its last
/// values, for good.
fn backend_series(shared: &Shared, out: &mut String) {
    use std::fmt::Write;
    let now = now_ms();
    let snap = shared.snapshot.load();
    type Value = fn(&crate::state::Backend, u64) -> u64;
    let series: [(&str, &str, &str, Value); 6] = [
        (
            crate::metrics::BACKEND_HEALTHY,
            "gauge",
            "1 when the backend passes active health checks",
            |b, _| b.state.is_healthy() as u64,
        ),
        (
            crate::metrics::BACKEND_EJECTED,
            "gauge",
            "1 while the backend is ejected by outlier detection",
            |b, now| b.state.is_ejected(now) as u64,
        ),
        (
            crate::metrics::BACKEND_IN_FLIGHT,
            "gauge",
            "Requests in flight to the backend",
            |b, _| b.state.in_flight() as u64,
        ),
        (
            crate::metrics::BACKEND_WEIGHT,
            "gauge",
            "The weight the balancer gives the backend: as configured, or as set through the admin API",
            |b, _| b.weight as u64,
        ),
        (
            crate::metrics::EJECTIONS,
            "counter",
            "Times outlier detection ejected the backend",
            |b, _| b.state.counters.ejections.load(std::sync::atomic::Ordering::Relaxed),
        ),
        (
            crate::metrics::RESTORES,
            "counter",
            "Times an ejected backend passed its probation probe and took traffic again",
            |b, _| b.state.counters.restores.load(std::sync::atomic::Ordering::Relaxed),
        ),
    ];
    // Labels escaped once, for all the series.
    let backends: Vec<_> = snap
        .pools
        .iter()
        .flat_map(|p| {
            p.backends
                .iter()
                .map(move |b| (label_value(&p.name), label_value(&b.name), b))
        })
        .collect();
    for (name, kind, help, value) in series {
        describe(out, name, kind, help);
        for (pool, backend, b) in &backends {
            let _ = writeln!(out, "{name}{{pool=\"{pool}\",backend=\"{backend}\"}} {}", value(b, now));
        }
    }
    // The operator's state, one series per state (1 for the one set), as Prometheus
    // writes an enum.
    let name = crate::metrics::BACKEND_ADMIN_STATE;
    describe(
        out,
        name,
        "gauge",
        "1 for the state an operator set on the backend (ready, drain, maint)",
    );
    for (pool, backend, b) in &backends {
        let set = b.state.admin_state();
        for state in crate::state::AdminState::ALL {
            let _ = writeln!(
                out,
                "{name}{{pool=\"{pool}\",backend=\"{backend}\",state=\"{}\"}} {}",
                state.as_str(),
                (state == set) as u8
            );
        }
    }
    let name = crate::metrics::BACKEND_RESPONSES;
    describe(
        out,
        name,
        "counter",
        "Responses a backend sent, by status class (those a retry replaced included)",
    );
    for (pool, backend, b) in &backends {
        for (code, n) in b.state.counters.responses() {
            let _ = writeln!(
                out,
                "{name}{{pool=\"{pool}\",backend=\"{backend}\",code=\"{code}\"}} {n}"
            );
        }
    }
    let name = crate::metrics::BACKEND_LATENCY;
    describe(
        out,
        name,
        "gauge",
        "The balancer's estimate of the backend's time to response headers (peak EWMA, decaying while idle)",
    );
    for (pool, backend, b) in &backends {
        let _ = writeln!(
            out,
            "{name}{{pool=\"{pool}\",backend=\"{backend}\"}} {}",
            b.state.ewma() / 1e9
        );
    }
    // Only the kinds a backend has had: twelve zeros per backend would bury the rest.
    let name = crate::metrics::UPSTREAM_ERRORS;
    describe(
        out,
        name,
        "counter",
        "Failed attempts to a backend, by pool, backend and kind",
    );
    for (pool, backend, b) in &backends {
        for (kind, n) in b.state.counters.errors().filter(|(_, n)| *n > 0) {
            let _ = writeln!(
                out,
                "{name}{{pool=\"{pool}\",backend=\"{backend}\",kind=\"{kind}\"}} {n}"
            );
        }
    }
}

/// A series' `# HELP` and `# TYPE` lines.
fn describe(out: &mut String, name: &str, kind: &str, help: &str) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A Prometheus label value, its `\` and `"` escaped.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// `rampart_tls_certificate_expiry_timestamp_seconds`, written from the live config at
/// each scrape rather than kept in the recorder: a gauge there would outlive a
/// certificate a reload removed, and alert on it forever.
fn certificate_expiry(shared: &Shared, out: &mut String) {
    use std::fmt::Write;
    let snap = shared.snapshot.load();
    let mut header = false;
    for (used, c, _) in crate::tls::certificates(&snap.config) {
        let Some(t) = c.not_after else { continue };
        if !header {
            header = true;
            let name = crate::metrics::TLS_CERT_EXPIRY;
            describe(
                out,
                name,
                "gauge",
                "When each TLS certificate expires (notAfter), Unix seconds",
            );
        }
        let (label, value) = used.label();
        let _ = writeln!(
            out,
            "{}{{{label}=\"{}\",certificate=\"{}\"}} {t}",
            crate::metrics::TLS_CERT_EXPIRY,
            label_value(&value),
            label_value(&c.files.cert.display().to_string()),
        );
    }
}

pub fn status_json(shared: &Shared) -> serde_json::Value {
    let now = now_ms();
    let snap = shared.snapshot.load();
    let pools: Vec<_> = snap
        .pools
        .iter()
        .map(|p| {
            let backends: Vec<_> = p
                .backends
                .iter()
                .map(|b| {
                    let until = b.state.ejected_until.load(std::sync::atomic::Ordering::Relaxed);
                    serde_json::json!({
                        "addr": b.name,
                        "weight": b.weight,
                        "config_weight": b.config_weight,
                        "backup": b.backup,
                        "max_in_flight": (b.max_in_flight != u32::MAX).then_some(b.max_in_flight),
                        "healthy": b.state.is_healthy(),
                        "ejected": b.state.is_ejected(now),
                        "probation": b.state.probation.load(std::sync::atomic::Ordering::Relaxed),
                        "available": b.state.is_available(now),
                        "admin_state": b.state.admin_state().as_str(),
                        "ejected_for_ms": until.saturating_sub(now),
                        "in_flight": b.state.in_flight(),
                        "ewma_ms": b.state.ewma() / 1e6,
                        // The value a sticky pool's cookie names it by.
                        "sticky_id": p.config.sticky.as_ref().map(|_| format!("{:016x}", b.sticky_id)),
                    })
                })
                .collect();
            let tls = p.config.tls.as_ref().map(|t| t.describe(crate::tls::unix_now()));
            serde_json::json!({
                "name": p.name,
                "balancer": p.balancer.kind(),
                "protocol": p.config.protocol.as_str(),
                "dns_refresh_ms": p.config.dns.as_ref().map(|d| d.refresh.as_millis() as u64),
                "sticky_cookie": p.config.sticky.as_ref().map(|s| s.cookie.as_str()),
                "tls": tls,
                "backends": backends,
            })
        })
        .collect();
    serde_json::json!({
        "pid": std::process::id(),
        "draining": shared.shutting_down.load(std::sync::atomic::Ordering::Relaxed),
        "client_connections": shared.client_connections.load(std::sync::atomic::Ordering::Relaxed),
        "tunnels": shared.tunnels.load(std::sync::atomic::Ordering::Relaxed),
        "pools": pools,
        "tls_certificates": tls_json(&snap),
    })
}

/// Every certificate loaded: listeners' (file, names, expiry) and pools' client
/// certificates.
fn tls_json(snap: &crate::state::Snapshot) -> Vec<serde_json::Value> {
    let now = crate::tls::unix_now();
    crate::tls::certificates(&snap.config)
        .into_iter()
        .map(|(used, c, default)| {
            let (key, value) = used.label();
            let mut v = serde_json::json!({
                "certificate": c.files.cert.display().to_string(),
                "names": c.names,
                "not_after": c.not_after,
                "expires_in_seconds": c.not_after.map(|t| t - now),
            });
            v[key] = value.into();
            if let Some(d) = default {
                v["default"] = d.into();
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdminControl;

    #[test]
    fn backend_changes_come_from_where_control_allows() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        for local in [
            "127.0.0.1:5000",
            "127.9.9.9:5000",
            "[::1]:5000",
            "[::ffff:127.0.0.1]:5000",
        ] {
            assert_eq!(refusal(AdminControl::Loopback, addr(local)), None, "{local}");
            assert!(refusal(AdminControl::None, addr(local)).is_some(), "{local}");
        }
        for remote in ["10.0.0.7:5000", "[2001:db8::1]:5000", "[::ffff:10.0.0.7]:5000"] {
            assert!(refusal(AdminControl::Loopback, addr(remote)).is_some(), "{remote}");
            assert_eq!(refusal(AdminControl::Any, addr(remote)), None, "{remote}");
        }
    }
}
