//! The admin listener, kept off the data path on the control thread:
//! - `GET /metrics`: Prometheus text.
//! - `GET /status`: JSON view of pools and backends (health, ejection, in-flight, EWMA),
//!   and of TLS certificates (names, expiry).
//! - `GET /healthz`: liveness, 200 while the process serves.
//! - `GET /ready`: readiness, 503 while draining or when no route can reach a backend.
//! - `POST /backends/POOL/BACKEND/STATE`: an operator drains a backend, puts it in
//!   maintenance or makes it ready again (`state::AdminState`), from loopback only
//!   unless `[admin] control` says otherwise.

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
        return set_backend_state(shared, req.method(), rest, peer);
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
            "endpoints: GET /metrics /status /healthz /ready, POST /backends/POOL/BACKEND/{ready,drain,maint}\n",
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

const BACKENDS_USAGE: &str = "POST /backends/POOL/BACKEND/STATE: POOL a pool's name or *, BACKEND its label or address (ip:port) or as written in backends, STATE ready, drain or maint";

/// `POST /backends/POOL/BACKEND/STATE`: sets the operator's state of every backend
/// that matches, and answers what each was, as JSON.
fn set_backend_state(shared: &Shared, method: &Method, rest: &str, peer: SocketAddr) -> Response<Full<Bytes>> {
    if method != Method::POST {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, format!("{BACKENDS_USAGE}\n"));
        r.headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("POST"));
        return r;
    }
    let snap = shared.snapshot.load();
    let control = snap.config.admin.as_ref().map(|a| a.control).unwrap_or_default();
    if let Some(why) = refusal(control, peer) {
        tracing::warn!(%peer, path = %rest, "admin: backend state change refused");
        return text(StatusCode::FORBIDDEN, why);
    }
    let bad = |msg: String| text(StatusCode::BAD_REQUEST, format!("{msg}\n{BACKENDS_USAGE}\n"));
    // The state is the last segment and the pool the first, so a backend's label may
    // hold anything between.
    let Some((head, state)) = rest.rsplit_once('/') else {
        return bad(format!("no state in /backends/{rest}"));
    };
    let Some((pool, backend)) = head.split_once('/') else {
        return bad(format!("no backend in /backends/{rest}"));
    };
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let (pool, backend) = (decode(pool), decode(backend));
    let Some(to) = crate::state::AdminState::parse(state) else {
        return bad(format!("unknown state {state:?}"));
    };
    let pools: Vec<_> = snap.pools.iter().filter(|p| pool == "*" || p.name == pool).collect();
    if pools.is_empty() {
        let names: Vec<_> = snap.pools.iter().map(|p| p.name.as_str()).collect();
        return text(
            StatusCode::NOT_FOUND,
            format!("no pool {pool:?}; pools: {}\n", names.join(", ")),
        );
    }
    let mut changed = Vec::new();
    for p in &pools {
        for b in &p.backends {
            if b.name != backend && b.written != backend && b.addr.to_string() != backend {
                continue;
            }
            let was = b.state.set_admin_state(to);
            if was != to {
                tracing::info!(pool = %p.name, backend = %b.name, from = was.as_str(), to = to.as_str(), %peer, "admin: backend state set");
            }
            changed.push(serde_json::json!({
                "pool": p.name,
                "backend": b.name,
                "was": was.as_str(),
                "admin_state": to.as_str(),
                "in_flight": b.state.in_flight(),
            }));
        }
    }
    if changed.is_empty() {
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

/// Every per-backend series: the `rampart_backend_{healthy,ejected,in_flight}` gauges
/// and the `rampart_{upstream_errors,ejections,restores}_total` counters. They are
/// written from the live snapshot at each scrape rather than kept in the recorder,
/// where a backend a reload or a DNS answer removed would stay, frozen at its last
/// values, for good.
fn backend_series(shared: &Shared, out: &mut String) {
    use std::fmt::Write;
    let now = now_ms();
    let snap = shared.snapshot.load();
    type Value = fn(&crate::state::BackendState, u64) -> u64;
    let series: [(&str, &str, &str, Value); 5] = [
        (
            crate::metrics::BACKEND_HEALTHY,
            "gauge",
            "1 when the backend passes active health checks",
            |st, _| st.is_healthy() as u64,
        ),
        (
            crate::metrics::BACKEND_EJECTED,
            "gauge",
            "1 while the backend is ejected by outlier detection",
            |st, now| st.is_ejected(now) as u64,
        ),
        (
            crate::metrics::BACKEND_IN_FLIGHT,
            "gauge",
            "Requests in flight to the backend",
            |st, _| st.in_flight() as u64,
        ),
        (
            crate::metrics::EJECTIONS,
            "counter",
            "Times outlier detection ejected the backend",
            |st, _| st.counters.ejections.load(std::sync::atomic::Ordering::Relaxed),
        ),
        (
            crate::metrics::RESTORES,
            "counter",
            "Times an ejected backend passed its probation probe and took traffic again",
            |st, _| st.counters.restores.load(std::sync::atomic::Ordering::Relaxed),
        ),
    ];
    // Labels escaped once, for all six series.
    let backends: Vec<_> = snap
        .pools
        .iter()
        .flat_map(|p| {
            p.backends
                .iter()
                .map(move |b| (label_value(&p.name), label_value(&b.name), &b.state))
        })
        .collect();
    for (name, kind, help, value) in series {
        describe(out, name, kind, help);
        for (pool, backend, st) in &backends {
            let _ = writeln!(
                out,
                "{name}{{pool=\"{pool}\",backend=\"{backend}\"}} {}",
                value(st, now)
            );
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
    for (pool, backend, st) in &backends {
        let set = st.admin_state();
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
    for (pool, backend, st) in &backends {
        for (code, n) in st.counters.responses() {
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
    for (pool, backend, st) in &backends {
        let _ = writeln!(
            out,
            "{name}{{pool=\"{pool}\",backend=\"{backend}\"}} {}",
            st.ewma() / 1e9
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
    for (pool, backend, st) in &backends {
        for (kind, n) in st.counters.errors().filter(|(_, n)| *n > 0) {
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
