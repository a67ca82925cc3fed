//! Active health checks, run once per process on the control thread (not per worker).
//! One task per backend probes at `interval` ± `jitter`, TCP connect, an HTTP request
//! or a gRPC health check (`grpc_health`),
//! and flips the backend's `healthy` atomic after `fall` failures or `rise` successes
//! in a row. Workers only read the atomic. When a reload or a DNS answer installs a new
//! snapshot, each backend that stays keeps its task, which goes on with the new
//! snapshot's pool; the verdicts and counts live in the backend state.
//!
//! The same loop probes a backend whose outlier ejection has just ended (probation)
//! and restores or re-ejects it; with `type = "none"` that probe is a TCP connect.
//! A backend an operator put in `maint` is not probed until it leaves it, and then at
//! once, on probation.
//! The control loop here also refreshes each pool's hedge delay and retry budget, and
//! drains the metrics exporter's pending histogram samples.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};

use crate::config::{HealthCheckConfig, HealthCheckKind};
use crate::error::ProxyError;
use crate::outlier;
use crate::state::{now_ms, AdminState, Pool, Shared, Snapshot};

/// How often the control loop looks for a new snapshot, refreshes hedge delays and
/// refills retry budgets.
const CONTROL_TICK: Duration = Duration::from_millis(200);
/// Drain the metrics exporter's pending histogram samples every 5 s (25 ticks).
const METRICS_UPKEEP_TICKS: u32 = 25;

pub async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut tasks = JoinSet::new();
    let mut checkers = HashMap::new();
    // When each pool's outcomes were last judged (`outlier::judge`), by pool name (a
    // reload keeps the window of a pool that stays).
    let mut judged: HashMap<String, tokio::time::Instant> = HashMap::new();
    loop {
        let snap = shared.snapshot.load_full();
        checkers = follow(&snap, checkers, &mut tasks);
        let mut last = tokio::time::Instant::now();
        let mut upkeep_ticks = 0u32;
        loop {
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => return,
                _ = tokio::time::sleep(CONTROL_TICK) => {}
            }
            let elapsed = last.elapsed();
            last = tokio::time::Instant::now();
            for pool in &snap.pools {
                pool.latency.update();
                pool.budget.refill(elapsed);
                if pool.config.outlier.counts_outcomes {
                    // Looked up by `&str`: the name is copied only when a pool is first seen.
                    match judged.get_mut(pool.name.as_str()) {
                        None => {
                            judged.insert(pool.name.clone(), last);
                        }
                        Some(since) if last.duration_since(*since) >= pool.config.outlier.interval => {
                            *since = last;
                            outlier::judge(pool);
                        }
                        Some(_) => {}
                    }
                }
            }
            upkeep_ticks += 1;
            if upkeep_ticks.is_multiple_of(METRICS_UPKEEP_TICKS) {
                // The exporter keeps raw histogram samples until drained; with no
                // scraper they would grow by a few bytes per request, forever.
                crate::metrics::install().run_upkeep();
            }
            if !Arc::ptr_eq(&shared.snapshot.load(), &snap) {
                break;
            }
        }
    }
}

/// Where a backend is in the live snapshot: its pool and its index there.
type Place = (Arc<Pool>, usize);

/// A backend's check loop, as `run` keeps it (keyed by the backend's state id).
struct Checker {
    /// Tells the loop where its backend is after a swap.
    place: watch::Sender<Place>,
    /// The check it runs; a reload that changes it starts the loop again.
    config: HealthCheckConfig,
    task: AbortHandle,
}

/// Moves the check loops onto a new snapshot. A backend that stays, with the same
/// health check, keeps its loop, which goes on from where it was: a reload or DNS
/// update every few hundred milliseconds neither cuts every probe short (a backend
/// that froze would never time out, so never be marked down) nor probes every backend
/// at once. A new backend, or one whose check changed, gets a new loop; a removed
/// one's loop ends.
fn follow(snap: &Snapshot, mut old: HashMap<u64, Checker>, tasks: &mut JoinSet<()>) -> HashMap<u64, Checker> {
    let mut next = HashMap::with_capacity(old.len());
    for pool in &snap.pools {
        let config = &pool.config.health_check;
        for (bi, b) in pool.backends.iter().enumerate() {
            let id = b.state.id;
            if next.contains_key(&id) {
                // An address listed twice shares its state, and one loop serves both.
                continue;
            }
            let checker = match old.remove(&id) {
                Some(c) if c.config == *config => {
                    c.place.send_replace((pool.clone(), bi));
                    c
                }
                changed => {
                    if let Some(c) = changed {
                        c.task.abort();
                    }
                    let (place, rx) = watch::channel((pool.clone(), bi));
                    Checker {
                        place,
                        config: config.clone(),
                        task: tasks.spawn(check_loop(rx)),
                    }
                }
            };
            next.insert(id, checker);
        }
    }
    for c in old.into_values() {
        c.task.abort();
    }
    // Reap the loops that ended, so the set holds only live ones.
    while tasks.try_join_next().is_some() {}
    next
}

async fn check_loop(mut place: watch::Receiver<Place>) {
    let first = {
        let cfg = &place.borrow().0.config.health_check;
        jittered(cfg.interval.min(Duration::from_millis(100)), cfg.jitter)
    };
    // Spread the first probes over one interval so backends are not probed in lockstep.
    tokio::time::sleep(first).await;
    loop {
        // The newest snapshot's pool: its TLS and protocol settings, and its other
        // backends for the ejection cap.
        let (pool, bi) = place.borrow_and_update().clone();
        let wake = check_once(&pool, bi).await;
        let state = pool.backends[bi].state.clone();
        drop(pool);
        // A backend leaving `maint` is probed at once, not an interval later.
        tokio::select! {
            _ = tokio::time::sleep(wake) => {}
            _ = state.check_now.notified() => {}
        }
    }
}

/// One round of a backend's checks; returns how long to wait for the next.
async fn check_once(pool: &Arc<Pool>, bi: usize) -> Duration {
    let cfg = &pool.config.health_check;
    let backend = &pool.backends[bi];
    if backend.state.admin_state() == AdminState::Maint {
        // Maintenance pauses the checks (the backend may be down on purpose); the
        // verdicts wait, and leaving it puts the backend on probation.
        return cfg.interval;
    }
    let active = cfg.kind != HealthCheckKind::None;
    // Probation first: an ejection that has ended is probed right away.
    let now = now_ms();
    let until = backend.state.ejected_until.load(Ordering::Relaxed);
    if backend.state.probation.load(Ordering::Relaxed) && until <= now {
        match probe(pool, bi).await {
            Ok(()) => outlier::restore(pool, bi),
            Err(reason) => {
                tracing::warn!(pool = %pool.name, backend = %backend.name, reason = %reason, "probation probe failed");
                outlier::try_eject(pool, bi, "probation probe failed");
            }
        }
    }
    if !active {
        return next_wake(pool, bi, cfg.interval);
    }
    let result = probe(pool, bi).await;
    let healthy = backend.state.is_healthy();
    match result {
        Ok(()) => {
            backend.state.check_failures.store(0, Ordering::Relaxed);
            let ok_run = backend.state.check_passes.fetch_add(1, Ordering::Relaxed) + 1;
            if !healthy && ok_run >= cfg.rise {
                backend.state.healthy.store(true, Ordering::Relaxed);
                backend.state.ramp_from.store(now_ms(), Ordering::Relaxed);
                tracing::info!(pool = %pool.name, backend = %backend.name, "health check passing: backend up");
                metrics::counter!("rampart_health_transitions_total", "pool" => pool.name.clone(), "to" => "up")
                    .increment(1);
            }
        }
        Err(reason) => {
            backend.state.check_passes.store(0, Ordering::Relaxed);
            let fail_run = backend.state.check_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if healthy && fail_run >= cfg.fall {
                backend.state.healthy.store(false, Ordering::Relaxed);
                tracing::warn!(pool = %pool.name, backend = %backend.name, reason = %reason, "health check failing: backend down");
                metrics::counter!("rampart_health_transitions_total", "pool" => pool.name.clone(), "to" => "down")
                    .increment(1);
            } else {
                tracing::debug!(pool = %pool.name, backend = %backend.name, reason = %reason, "health check failed");
            }
        }
    }
    next_wake(pool, bi, jittered(cfg.interval, cfg.jitter))
}

/// Sleeps `normal`, or less when an ejection ends sooner, so probation is prompt.
fn next_wake(pool: &Pool, bi: usize, normal: Duration) -> Duration {
    let st = &pool.backends[bi].state;
    if !st.probation.load(Ordering::Relaxed) {
        return normal;
    }
    let until = st.ejected_until.load(Ordering::Relaxed);
    normal.min(Duration::from_millis(until.saturating_sub(now_ms())))
}

fn jittered(base: Duration, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return base;
    }
    let j = jitter.as_micros() as u64;
    let offset = fastrand::u64(..=2 * j);
    (base + Duration::from_micros(offset)).saturating_sub(jitter)
}

/// How far into a check's response body `expect_body` is looked for: the start of a
/// status page, not a download.
pub const BODY_LIMIT: usize = 64 * 1024;

/// An HTTP or gRPC check on a pool that speaks HTTP/2: one stream on a connection of
/// its own, with the check's `host` as `:authority`. (HTTP/1.1 checks are written and
/// read by hand, `probe_inner`: hyper's HTTP/1.1 client would give `httparse`'s
/// response parser a second caller, and the request path's copy, in `codec`, then
/// stopped being inlined: +158 instructions a request.)
async fn probe_h2(io: crate::netio::UpIo, cfg: &HealthCheckConfig, host: &str) -> Result<(), String> {
    let scheme = match io {
        crate::netio::UpIo::Tls(_) => "https",
        _ => "http",
    };
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let driver = tokio::spawn(conn);
    let grpc = cfg.kind == HealthCheckKind::Grpc;
    let (method, path, body) = match grpc {
        true => (
            "POST",
            crate::grpc_health::PATH,
            crate::grpc_health::request(&cfg.service),
        ),
        false => (cfg.method.as_str(), cfg.path.as_str(), bytes::Bytes::new()),
    };
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{scheme}://{host}{path}"))
        .header(http::header::USER_AGENT, "rampart-health-check")
        .body(http_body_util::Full::new(body))
        .map_err(|e| format!("request: {e}"))?;
    if grpc {
        crate::grpc_health::add_fields(req.headers_mut(), cfg.timeout);
    }
    for (name, value) in &cfg.headers {
        req.headers_mut().insert(name.clone(), value.clone());
    }
    let result = async {
        let resp = send.send_request(req).await.map_err(|e| format!("HTTP/2: {e}"))?;
        if grpc {
            return crate::grpc_health::verdict(resp).await;
        }
        judged(resp.status().as_u16(), &cfg.expect_status)?;
        match &cfg.expect_body {
            Some(text) => body_holds(resp.into_body(), text.as_bytes()).await,
            None => Ok(()),
        }
    }
    .await;
    driver.abort();
    result
}

/// Whether `text` is in the first `BODY_LIMIT` bytes of `body`.
async fn body_holds(mut body: hyper::body::Incoming, text: &[u8]) -> Result<(), String> {
    use http_body_util::BodyExt;
    if text.is_empty() {
        return Ok(());
    }
    let mut seen = Vec::new();
    while seen.len() < BODY_LIMIT {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Err(format!("body: {e}")),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    seen.extend_from_slice(&d);
                    if seen.windows(text.len()).any(|w| w == text) {
                        return Ok(());
                    }
                }
            }
        }
    }
    Err(format!(
        "body without {:?} (read {} bytes)",
        String::from_utf8_lossy(text),
        seen.len().min(BODY_LIMIT)
    ))
}

/// A check's verdict on the status a backend answered.
fn judged(status: u16, expect: &[(u16, u16)]) -> Result<(), String> {
    if expect.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status)) {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

/// An HTTP check's `Host` when `host` is not set: for a TLS pool, the name the
/// backend's certificate is checked against (with its port, unless 443), which is
/// the virtual host such a backend most likely serves; otherwise the backend as
/// written in `backends`.
fn default_host(backend: &crate::state::Backend) -> String {
    use rustls::pki_types::ServerName;
    match &backend.tls_name {
        Some(ServerName::DnsName(name)) if backend.addr.port() == 443 => name.as_ref().to_string(),
        Some(ServerName::DnsName(name)) => format!("{}:{}", name.as_ref(), backend.addr.port()),
        _ => backend.written.clone(),
    }
}

/// One probe of backend `bi` within the check timeout.
pub async fn probe(pool: &Pool, bi: usize) -> Result<(), String> {
    let cfg = &pool.config.health_check;
    match tokio::time::timeout(cfg.timeout, probe_inner(pool, bi)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {:?}", cfg.timeout)),
    }
}

async fn probe_inner(pool: &Pool, bi: usize) -> Result<(), String> {
    let cfg = &pool.config.health_check;
    let backend = &pool.backends[bi];
    let addr = backend.addr;
    // For a pool with `tls` the probe completes the handshake too, even a `tcp`
    // check (as HAProxy's `check-ssl`): a backend whose certificate rampart would
    // refuse is no more use than one that refuses connections (`tls = false` probes
    // in clear). The timeout is the check's own, applied around the whole probe.
    let tls = pool
        .config
        .tls
        .as_deref()
        .zip(backend.tls_name.as_ref())
        .filter(|_| cfg.tls);
    let addr = cfg.port.map_or(addr, |port| std::net::SocketAddr::new(addr.ip(), port));
    let mut stream = match crate::backend_tls::connect(addr, tls, Duration::MAX).await {
        Ok(s) => s,
        Err(ProxyError::Connect { source, .. }) => return Err(format!("connect: {source}")),
        Err(e) => return Err(e.to_string()),
    };
    // Without an HTTP or gRPC check configured, a probation probe is a TCP connect.
    if !matches!(cfg.kind, HealthCheckKind::Http | HealthCheckKind::Grpc) {
        return Ok(());
    }
    let host = cfg.host.clone().unwrap_or_else(|| default_host(backend));
    if pool.config.protocol == crate::config::UpstreamProtocol::H2 {
        return probe_h2(stream, cfg, &host).await;
    }
    let mut req = format!("{} {} HTTP/1.1\r\nHost: {}\r\n", cfg.method, cfg.path, host).into_bytes();
    if !cfg.headers.iter().any(|(n, _)| n == http::header::USER_AGENT) {
        req.extend_from_slice(b"User-Agent: rampart-health-check\r\n");
    }
    for (name, value) in &cfg.headers {
        req.extend_from_slice(name.as_str().as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(value.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"Connection: close\r\n\r\n");
    stream.write_all(&req).await.map_err(|e| format!("write: {e}"))?;
    stream.flush().await.map_err(|e| format!("write: {e}"))?;
    // The status line, and with `expect_body` the rest (the request asked the
    // backend to close once it has answered).
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before a status line".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 4096 {
            return Err("status line too long".into());
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("malformed status line {:?}", line.lines().next().unwrap_or("")))?;
    judged(status, &cfg.expect_status)?;
    let Some(text) = &cfg.expect_body else {
        return Ok(());
    };
    // Head and body, up to the body limit and what chunk framing adds to it.
    let cap = 2 * BODY_LIMIT + 64 * 1024;
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() >= cap {
            break;
        }
    }
    let body = http1_body(&buf).ok_or("response head never ended")?;
    let body = &body[..body.len().min(BODY_LIMIT)];
    if text.is_empty() || body.windows(text.len()).any(|w| w == text.as_bytes()) {
        Ok(())
    } else {
        Err(format!("body without {text:?} (read {} bytes)", body.len()))
    }
}

/// The body of an HTTP/1.1 response read whole (or up to a limit): after the head,
/// chunked framing undone, cut at `Content-Length`. `None` without a complete head.
fn http1_body(response: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    let end = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
    let rest = &response[end + 4..];
    let field = |name: &str| {
        head.lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim() == name)
            .map(|(_, v)| v.trim().to_string())
    };
    if field("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        // The request path's own decoder; a malformed or cut-short body gives what
        // came before the fault.
        let mut buf = bytes::BytesMut::from(rest);
        let mut chunked = crate::codec::Chunked::default();
        let mut out = Vec::new();
        while let Ok(crate::codec::Decoded::Data(d)) = chunked.decode(&mut buf) {
            out.extend_from_slice(&d);
        }
        return Some(std::borrow::Cow::Owned(out));
    }
    let len = field("content-length").and_then(|v| v.parse::<usize>().ok());
    Some(std::borrow::Cow::Borrowed(
        &rest[..len.map_or(rest.len(), |n| n.min(rest.len()))],
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_http1_body_is_read_past_its_framing() {
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nready\r\n7;x=1\r\n: yes!!\r\n0\r\n\r\n";
        assert_eq!(&*super::http1_body(chunked).unwrap(), b"ready: yes!!");
        let sized = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA";
        assert_eq!(&*super::http1_body(sized).unwrap(), b"ok");
        let until_close = b"HTTP/1.0 200 OK\r\n\r\nall of it";
        assert_eq!(&*super::http1_body(until_close).unwrap(), b"all of it");
        // Cut short (the read stopped at its limit): what arrived.
        let cut = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\na\r\n01234";
        assert_eq!(&*super::http1_body(cut).unwrap(), b"01234");
        assert!(super::http1_body(b"HTTP/1.1 200 OK\r\nx: y").is_none());
    }
}
