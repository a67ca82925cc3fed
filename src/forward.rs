//! The attempt loop: pick a backend, get a connection, send, and on a failure that is
//! safe to retry, try a *different* backend while the policy (`retry.rs`), the retry
//! budget and the circuit breakers allow. For idempotent requests a hedge goes to a
//! second backend after the pool's adaptive delay, and the first answer wins.
//!
//! Small responses to replayable requests are read whole before the client sees a byte
//! (`retry.response_buffer_bytes`), so a backend that resets mid-body is retried like
//! one that failed before answering. Larger ones stream after that prefix.
//!
//! `proxy.rs` prepares the request and turns the result into the client's response.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::body::{ReqBody, RespBody};
use crate::breaker::Limit;
use crate::codec::{Head, RespFields};
use crate::config::{HedgeDelay, PoolConfig, RouteConfig, UpstreamProtocol};
use crate::error::ProxyError;
use crate::h2up;
use crate::outlier;
use crate::rawfields::RawFields;
use crate::retry::{self, Attempts};
use crate::state::Pool;
use crate::upstream::{Home, SendError, UpBody, UpRequest};
use crate::worker::WorkerCtx;

/// Never-written requests on stale pooled connections are resent this many times on
/// the same backend (they say nothing about the backend).
const MAX_STALE_RESENDS: u8 = 2;

/// What every try of one request shares.
#[derive(Clone, Copy)]
struct TryOpts {
    /// Per-try deadline for the response head (and the buffered body prefix).
    timeout: Duration,
    /// Body bytes read before the client sees any (0: stream at once).
    buffer: usize,
    /// Replay-safe: the same backend may get it again on a new connection after a
    /// pooled one ended unanswered (`resend_on_fresh`).
    idempotent: bool,
}

/// A successful exchange.
pub struct Forwarded {
    pub response: Response<RespBody>,
    pub backend: SocketAddr,
    /// For a 101: the backend socket and any bytes it sent after the 101. Boxed:
    /// rare, and a `Forwarded` is moved several times per request.
    pub upgraded: Option<Box<(crate::netio::UpIo, Bytes)>>,
    /// The response's fields as the backend wrote them (the response's map then
    /// holds none of the backend's).
    pub raw: Option<RawFields>,
    /// Microseconds the try spent opening its connection (TCP, and TLS with a pool's
    /// `tls`); 0 on a connection reused, as nginx's `$upstream_connect_time` says.
    pub connect_us: u32,
}

/// Microseconds since `began`, for `Forwarded::connect_us`.
fn micros_since(began: std::time::Instant) -> u32 {
    crate::clock::now()
        .saturating_duration_since(began)
        .as_micros()
        .min(u32::MAX.into()) as u32
}

/// How one try ended.
enum Outcome {
    Response(Forwarded),
    /// A status of the pool's `retry.on_status` (502/503/504 by default) from the
    /// backend: retried when safe, else passed to the client.
    Gateway(ProxyError, Forwarded),
    /// Failed; `unsent` is the request when it was never written.
    Failed(ProxyError, Option<UpRequest>),
    /// The client's fault or a pool limit: no retry.
    Fatal(ProxyError),
}

fn breaker_error(pool: &Pool, l: Limit) -> ProxyError {
    metrics::counter!("rampart_circuit_open_total", "pool" => pool.name.clone(), "limit" => l.as_str()).increment(1);
    ProxyError::CircuitOpen {
        pool: pool.name.clone(),
        limit: l.as_str(),
    }
}

/// How one request's tries go: its pool's `retry` with what its route changes.
#[derive(Debug, Clone, Copy)]
pub struct TryPolicy {
    /// Each try's time to response headers.
    pub timeout: Duration,
    /// Tries in all, the first included.
    pub attempts: u32,
    pub hedge: bool,
}

impl TryPolicy {
    /// The pool's own.
    pub fn of(pool: &PoolConfig) -> TryPolicy {
        TryPolicy {
            timeout: pool.try_timeout(),
            attempts: pool.retry.attempts,
            hedge: pool.retry.hedge,
        }
    }

    /// The pool's, with the route's `response_timeout` and `retry` in place.
    pub fn for_route(pool: &PoolConfig, route: Option<&RouteConfig>) -> TryPolicy {
        let mut p = TryPolicy::of(pool);
        if let Some(route) = route {
            if let Some(t) = route.response_timeout {
                p.timeout = t;
            }
            if let Some(r) = route.retry {
                p.attempts = r.attempts.unwrap_or(p.attempts);
                p.hedge = r.hedge.unwrap_or(p.hedge);
            }
        }
        p
    }
}

/// `policy`: the tries' timeout, number and hedging (the pool's, or the route's).
/// `tries` counts the tries sent, hedges included, for the access log. `prefer`: the
/// backend a sticky client's cookie names, tried first if it may be
/// (`Pool::sticky_fit`); a retry goes where the balancer says.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    ctx: &Rc<WorkerCtx>,
    pool: &Arc<Pool>,
    req: UpRequest,
    hash: Option<u64>,
    prefer: Option<usize>,
    policy: TryPolicy,
    tries: &Cell<u8>,
) -> Result<Forwarded, ProxyError> {
    let cfg = &pool.config;
    let request_slot = pool
        .breakers
        .acquire(Limit::Requests, &cfg.circuit_breaker)
        .map_err(|l| breaker_error(pool, l))?;
    pool.budget.deposit();
    let mut attempts = Attempts::new(pool, &req, policy.attempts);
    // A replay template exists only for replay-safe (idempotent) requests.
    let retryable_after_send = attempts.replayable();
    let opts = TryOpts {
        timeout: policy.timeout,
        buffer: if retryable_after_send {
            cfg.retry.response_buffer_bytes
        } else {
            0
        },
        idempotent: attempts.idempotent(),
    };
    // An upgrade (WebSocket) must reach one backend only: never hedged.
    let upgrade = req.head.added.upgrade;
    let hedge = policy.hedge && retryable_after_send && !upgrade && pool.backends.len() > 1;
    let mut req = Some(req);
    let mut gateway_reply: Option<Forwarded> = None;
    let mut prefer = prefer.filter(|&bi| pool.sticky_fit(bi));
    while let Some(bi) = prefer.take().or_else(|| pool.pick(hash, attempts.tried())) {
        let Some(request) = req.take().or_else(|| attempts.replay()) else {
            break;
        };
        let _retry_slot = if attempts.failures() > 0 {
            match pool.breakers.acquire(Limit::Retries, &cfg.circuit_breaker) {
                Ok(s) => Some(s),
                Err(l) => {
                    breaker_error(pool, l);
                    break;
                }
            }
        } else {
            None
        };
        tries.set(tries.get().saturating_add(1));
        let (bi, outcome) = attempt(ctx, pool, hash, bi, request, &mut attempts, opts, hedge, tries).await;
        if let Outcome::Response(fwd) | Outcome::Gateway(_, fwd) = &outcome {
            let status = fwd.response.status().as_u16();
            pool.backends[bi].state.counters.count_response(status);
        }
        let (err, unsent) = match outcome {
            Outcome::Response(mut fwd) => {
                attach_slot(&mut fwd, request_slot);
                return Ok(fwd);
            }
            Outcome::Fatal(e) => return Err(e),
            Outcome::Gateway(err, mut fwd) => {
                let another = pool.could_pick(&[attempts.tried(), &[bi]].concat());
                if !(retryable_after_send && another && attempts.has_tries_left()) {
                    attach_slot(&mut fwd, request_slot);
                    return Ok(fwd);
                }
                // Keep the backend's answer in case no retry can happen after all.
                gateway_reply = Some(fwd);
                (err, None)
            }
            Outcome::Failed(err, unsent) => {
                outlier::on_failure(pool, bi, &err);
                // Written, but provably never received: send the kept copy, whatever
                // the method, as if it had never been written.
                let unsent = match (unsent, &err) {
                    (None, err) if err.never_read() => attempts.replay(),
                    (unsent, _) => unsent,
                };
                (err, unsent)
            }
        };
        req = unsent;
        // Retrying what was never written costs the backends nothing; anything else
        // spends the retry budget and backs off first.
        let budgeted = req.is_none();
        if !attempts.failed(bi, err, req.is_some()) {
            break;
        }
        if budgeted {
            if !pool.budget.try_withdraw() {
                tracing::warn!(pool = %pool.name, "retry budget exhausted; not retrying");
                metrics::counter!("rampart_retry_budget_exhausted_total", "pool" => pool.name.clone()).increment(1);
                break;
            }
            tokio::time::sleep(retry::backoff(
                cfg.retry.backoff_base,
                cfg.retry.backoff_max,
                attempts.failures(),
            ))
            .await;
        }
        metrics::counter!("rampart_retries_total", "pool" => pool.name.clone()).increment(1);
    }
    if let Some(mut fwd) = gateway_reply {
        attach_slot(&mut fwd, request_slot);
        return Ok(fwd);
    }
    if attempts.tried().is_empty() {
        return Err(nothing_tried(pool, attempts));
    }
    Err(attempts.into_error(pool))
}

/// No backend could be tried: when one in service was at its `max_in_flight`, a full
/// pool says so (a 503, `circuit_open`), not that no backend is healthy.
#[cold]
fn nothing_tried(pool: &Pool, attempts: Attempts) -> ProxyError {
    const LIMIT: &str = "backend_max_in_flight";
    if pool.backends.iter().any(|b| b.state.in_service() && !b.has_room()) {
        metrics::counter!("rampart_circuit_open_total", "pool" => pool.name.clone(), "limit" => LIMIT).increment(1);
        return ProxyError::CircuitOpen {
            pool: pool.name.clone(),
            limit: LIMIT,
        };
    }
    attempts.into_error(pool)
}

#[inline]
fn attach_slot(fwd: &mut Forwarded, slot: crate::breaker::Slot) {
    match fwd.response.body_mut() {
        RespBody::Upstream { request_slot, .. } => *request_slot = Some(slot),
        RespBody::H2(h2) => h2.request_slot = Some(slot),
        RespBody::Full(_) | RespBody::Logged(_) | RespBody::Compressed(_) | RespBody::Held(_) => {}
    }
}

/// One try; with `hedge`, after the hedge delay a second try on another backend,
/// and the first usable answer wins and the other is cancelled.
///
/// Each try is boxed, the hedge only once it is sent, so the futures of the
/// request's whole call chain stay small: they are moved (copied whole) into place
/// at each level, and a try's state machine is the largest of them.
///
/// A hedged first try keeps no timer of its own: one timer here fires at the hedge
/// delay and is then moved to the try's deadline. A timer costs about as much as
/// the rest of the attempt loop, and most requests need neither firing.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    ctx: &Rc<WorkerCtx>,
    pool: &Arc<Pool>,
    hash: Option<u64>,
    bi: usize,
    request: UpRequest,
    attempts: &mut Attempts,
    opts: TryOpts,
    hedge: bool,
    tries: &Cell<u8>,
) -> (usize, Outcome) {
    let start = crate::clock::tokio_now();
    let deadline = start + opts.timeout;
    if !hedge {
        let first = crate::alloc::boxed(|| try_backend(ctx.clone(), pool.clone(), bi, request, opts, Some(deadline)));
        return (bi, first.await);
    }
    // Boxed also so that, if the hedge wins, the first try can be handed to
    // `watch_primary`.
    let mut first = crate::alloc::boxed(|| try_backend(ctx.clone(), pool.clone(), bi, request, opts, None));
    let cfg = &pool.config;
    let delay = match cfg.retry.hedge_delay {
        HedgeDelay::Fixed(d) => d,
        HedgeDelay::Auto => pool.latency.hedge_delay(cfg.response_timeout),
    };
    let timer = tokio::time::sleep_until((start + delay).min(deadline));
    tokio::pin!(timer);
    tokio::select! {
        o = &mut first => return (bi, o),
        _ = &mut timer => {}
    }
    if crate::clock::tokio_now() >= deadline {
        return (bi, timed_out(pool, bi));
    }
    timer.as_mut().reset(deadline);
    let exclude = [attempts.tried(), &[bi]].concat();
    // The backend is picked last, once the hedge will be sent: a pick moves round
    // robin's cursor, and one refused by the breaker or the budget would skip a turn.
    if !pool.could_pick(&exclude) {
        return (bi, by_deadline(pool, bi, first, timer).await);
    }
    let Some(hreq) = attempts.replay() else {
        return (bi, by_deadline(pool, bi, first, timer).await);
    };
    let Ok(_slot) = pool.breakers.acquire(Limit::Retries, &cfg.circuit_breaker) else {
        return (bi, by_deadline(pool, bi, first, timer).await);
    };
    if !pool.budget.try_withdraw() {
        return (bi, by_deadline(pool, bi, first, timer).await);
    }
    let Some(hb) = pool.pick(hash, &exclude) else {
        return (bi, by_deadline(pool, bi, first, timer).await);
    };
    metrics::counter!("rampart_hedges_total", "pool" => pool.name.clone()).increment(1);
    tries.set(tries.get().saturating_add(1));
    tracing::debug!(pool = %pool.name, slow = %pool.backends[bi].name, hedge = %pool.backends[hb].name, delay_ms = delay.as_millis() as u64, "hedging");
    // Both count as tried: whichever fails, a retry goes to a third backend.
    attempts.mark_tried(bi);
    attempts.mark_tried(hb);
    let hedge_deadline = crate::clock::tokio_now() + opts.timeout;
    let mut second =
        crate::alloc::boxed(|| try_backend(ctx.clone(), pool.clone(), hb, hreq, opts, Some(hedge_deadline)));
    // The race decides what is left to wait for; the waiting happens after it, so that
    // no lost try's outcome is held across that wait (it made this future 0.4 KB
    // larger, and the future is built and moved for every request, hedged or not).
    let left = tokio::select! {
        o = &mut first => match o {
            Outcome::Response(_) | Outcome::Fatal(_) => return (bi, o),
            other => {
                note_lost(pool, bi, &other);
                Left::Second
            }
        },
        _ = &mut timer => {
            note_lost(pool, bi, &timed_out(pool, bi));
            Left::Second
        },
        o = &mut second => match o {
            Outcome::Response(_) | Outcome::Fatal(_) => {
                metrics::counter!("rampart_hedges_won_total", "pool" => pool.name.clone()).increment(1);
                watch_primary(pool.clone(), bi, first, delay);
                return (hb, o);
            }
            other => {
                note_lost(pool, hb, &other);
                Left::First
            }
        },
    };
    match left {
        Left::Second => (hb, second.await),
        Left::First => (bi, by_deadline(pool, bi, first, timer).await),
    }
}

/// Which try of a hedged pair is still worth waiting for.
enum Left {
    First,
    Second,
}

/// A try that has not answered by its deadline.
fn timed_out(pool: &Pool, bi: usize) -> Outcome {
    Outcome::Failed(
        ProxyError::ResponseTimeout {
            backend: pool.backends[bi].addr,
        },
        None,
    )
}

/// Finishes an untimed try on backend `bi` under `timer`, which is set to its
/// deadline.
async fn by_deadline(
    pool: &Pool,
    bi: usize,
    try_: impl Future<Output = Outcome>,
    timer: std::pin::Pin<&mut tokio::time::Sleep>,
) -> Outcome {
    tokio::select! {
        o = try_ => o,
        _ = timer => timed_out(pool, bi),
    }
}

/// After a hedge won, keeps waiting for the first try in the background. Only if it has
/// still not answered after a grace period (4 × the hedge delay, at least 250 ms) does
/// it count against its backend. Losing a race alone is no evidence: when rampart
/// itself is saturated every answer is late, and counting each lost race ejected
/// healthy backends. While it waits the try holds its in-flight count, so peak-EWMA and
/// least-request already steer new requests away from a stuck backend.
fn watch_primary(
    pool: Arc<Pool>,
    bi: usize,
    first: std::pin::Pin<Box<impl Future<Output = Outcome> + 'static>>,
    delay: Duration,
) {
    let grace = (delay * 4).max(Duration::from_millis(250));
    tokio::task::spawn_local(async move {
        match tokio::time::timeout(grace, first).await {
            Err(_) => outlier::on_hedge_loss(&pool, bi),
            Ok(Outcome::Failed(e, _)) => outlier::on_failure(&pool, bi, &e),
            // It answered (success or 5xx, both already recorded): the answer is dropped.
            Ok(_) => {}
        }
    });
}

/// Records the failure of the try that lost a hedged race (the winner's outcome is
/// recorded by the caller).
fn note_lost(pool: &Pool, bi: usize, o: &Outcome) {
    if let Outcome::Failed(e, _) = o {
        outlier::on_failure(pool, bi, e);
    }
}

/// The circuit breaker's slots a new backend connection takes: one pending while it
/// connects, and one for its life. A full breaker ends the request.
fn connect_slots(pool: &Pool) -> Result<(crate::breaker::Slot, crate::breaker::Slot), ProxyError> {
    let cfg = &pool.config.circuit_breaker;
    let pending = pool
        .breakers
        .acquire(Limit::Pending, cfg)
        .map_err(|l| breaker_error(pool, l))?;
    let conn = pool
        .breakers
        .acquire(Limit::Connections, cfg)
        .map_err(|l| breaker_error(pool, l))?;
    Ok((pending, conn))
}

#[cold]
fn stale_resend(pool: &Pool) {
    metrics::counter!("rampart_stale_connection_resends_total", "pool" => pool.name.clone()).increment(1);
}

/// Whether a request a pooled connection failed to answer goes again, on a new
/// connection to the same backend: always when provably unread (`NotReceived`); after
/// a plain close or reset only if it is idempotent, since the application may have
/// read it. Never a streamed body (spent), nor after a backend that exited.
fn resend_on_fresh(err: &ProxyError, request: &UpRequest, opts: TryOpts) -> bool {
    matches!(request.body, ReqBody::Buffered(_))
        && match err {
            ProxyError::NotReceived { .. } => true,
            ProxyError::UpstreamClosed { .. } => opts.idempotent,
            _ => false,
        }
}

/// One try on backend `bi`: connection, send, response headers and up to `buffer`
/// bytes of body, all by `deadline` (`None`: the caller keeps the deadline).
async fn try_backend(
    ctx: Rc<WorkerCtx>,
    pool: Arc<Pool>,
    bi: usize,
    mut request: UpRequest,
    opts: TryOpts,
    deadline: Option<Instant>,
) -> Outcome {
    let buffer = opts.buffer;
    // Owned handles, so a hedged-against try can outlive its request (`watch_primary`).
    let (ctx, pool) = (&ctx, &pool);
    let cfg = &pool.config;
    if cfg.protocol == UpstreamProtocol::H2 {
        // Boxed: its state would otherwise size every HTTP/1.1 try's future too.
        return crate::alloc::boxed(|| try_backend_h2(ctx, pool, bi, request, opts, deadline)).await;
    }
    let backend = &pool.backends[bi];
    let addr = backend.addr;
    let mut stale_left = MAX_STALE_RESENDS;
    loop {
        // Counted from before the connection is found, so that a connect in progress
        // holds its place under `max_in_flight` (and weighs in least-request).
        let mut in_flight = pool.start_request(bi);
        // A body streamed from the client can be sent once only, so it never goes on
        // a pooled connection, which the backend may close as it arrives (the
        // keep-alive race), leaving the upload spent and unanswered. A new connection
        // costs a connect per upload past `max_replay_bytes` (or chunked); HAProxy's
        // default `http-reuse safe` keeps such requests off reused connections too.
        let pooled = match request.body {
            ReqBody::Stream(_) => None,
            ReqBody::Buffered(_) => ctx.conns.checkout(backend.state.id),
        };
        let (mut conn, reused, connect_us) = match pooled {
            Some(c) => (c, true, 0),
            None => {
                let began = crate::clock::now();
                let (pending, conn_slot) = match connect_slots(pool) {
                    Ok(slots) => slots,
                    Err(e) => return Outcome::Fatal(e),
                };
                let tls = cfg.tls.as_deref().zip(backend.tls_name.as_ref());
                let r = crate::upstream::connect(
                    addr,
                    tls,
                    cfg.connect_timeout,
                    conn_slot,
                    cfg.max_requests_per_connection,
                    cfg.max_connection_duration,
                )
                .await;
                drop(pending);
                match r {
                    Ok(c) => (c, false, micros_since(began)),
                    Err(e) => return Outcome::Failed(e, Some(request)),
                }
            }
        };
        let sent_at = crate::clock::tokio_now();
        // A body still arriving from the client: the try's timeout starts once it is
        // sent (`Conn::send`), not before the upload. Never hedged, so the deadline
        // is this try's own.
        let bound = match request.body {
            ReqBody::Stream(_) => None,
            ReqBody::Buffered(_) => deadline,
        };
        let head = match by(bound, conn.send(&mut request)).await {
            Err(_) => return timed_out(pool, bi),
            Ok(Err(SendError::Fatal(e))) => return Outcome::Fatal(e),
            Ok(Err(SendError::Unsent(_))) if reused && stale_left > 0 => {
                // A pooled connection the backend had reset: resend on a new one.
                stale_left -= 1;
                stale_resend(pool);
                continue;
            }
            Ok(Err(SendError::Unanswered(e))) if reused && stale_left > 0 && resend_on_fresh(&e, &request, opts) => {
                // A pooled connection that ended with no answer: the backend closed
                // it as the request went out (the keep-alive race). Resent on a new
                // connection to the same backend, as nginx does for its cached
                // connections, rather than spending a try on another backend, or
                // failing a pool of one.
                stale_left -= 1;
                stale_resend(pool);
                continue;
            }
            Ok(Err(SendError::Unsent(e))) => return Outcome::Failed(e, Some(request)),
            Ok(Err(SendError::Failed(e) | SendError::Unanswered(e))) => return Outcome::Failed(e, None),
            Ok(Ok(h)) => h,
        };
        record_ttfb(pool, bi, &request.body, sent_at);
        let Head {
            status,
            fields,
            framing,
            keep_alive,
            ..
        } = head;
        let gateway = in_flight.on_status(status);
        let mut response = Response::new(RespBody::empty());
        *response.status_mut() = status;
        let raw = match fields {
            RespFields::Raw(raw) => Some(raw),
            RespFields::Map(map) => {
                *response.headers_mut() = map;
                crate::proxy::rewrite_response_headers(response.headers_mut(), status);
                None
            }
        };
        let mut upgraded = None;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            // The connection now belongs to the tunnel.
            upgraded = Some(Box::new((*conn).into_upgraded()));
            in_flight.succeeded();
        } else {
            let home = Home::new(
                ctx.conns.clone(),
                backend.state.id,
                cfg.idle_timeout,
                cfg.max_idle_per_backend,
            );
            let mut incoming = UpBody::new(conn, framing, keep_alive, home, cfg.read_timeout);
            *response.body_mut() = if buffer > 0 {
                match read_prefix(&mut incoming, buffer, deadline).await {
                    Err(Some(e)) => {
                        return Outcome::Failed(
                            ProxyError::UpstreamClosed {
                                backend: addr,
                                source: e,
                            },
                            None,
                        )
                    }
                    Err(None) => return timed_out(pool, bi),
                    Ok((whole, true, _)) => {
                        // Complete: the connection is back in the pool already.
                        in_flight.succeeded();
                        RespBody::Full(Some(whole))
                    }
                    Ok((prefix, false, _)) => {
                        incoming.track(in_flight);
                        RespBody::upstream(Some(prefix), incoming)
                    }
                }
            } else {
                incoming.track(in_flight);
                RespBody::upstream(None, incoming)
            };
        }
        let fwd = Forwarded {
            response,
            backend: addr,
            upgraded,
            raw,
            connect_us,
        };
        return answered(gateway, fwd);
    }
}

/// `try_backend` for a pool that speaks HTTP/2 (`h2up`): the same outcomes, from a
/// stream on one of the backend's multiplexed connections.
async fn try_backend_h2(
    ctx: &Rc<WorkerCtx>,
    pool: &Arc<Pool>,
    bi: usize,
    mut request: UpRequest,
    opts: TryOpts,
    deadline: Option<Instant>,
) -> Outcome {
    let cfg = &pool.config;
    let backend = &pool.backends[bi];
    let addr = backend.addr;
    let tls = cfg.tls.as_deref().zip(backend.tls_name.as_ref());
    let mut stale_left = MAX_STALE_RESENDS;
    loop {
        // From before the connection is found, as for HTTP/1.1.
        let mut in_flight = pool.start_request(bi);
        let (mut send, stream, reused, connect_us) = loop {
            match ctx
                .h2
                .checkout(backend.state.id, cfg.h2_max_streams, cfg.max_requests_per_connection)
            {
                h2up::Checkout::Open(s, stream) => break (s, stream, true, 0),
                h2up::Checkout::Wait(pending) => {
                    if !pending.opened().await {
                        // The connect this request waited on failed: so does this
                        // try, at once, rather than each waiter trying in turn.
                        let source = std::io::Error::other("the connection being opened for it failed");
                        return Outcome::Failed(ProxyError::Connect { backend: addr, source }, Some(request));
                    }
                    // Opened: look again (it may already be full).
                }
                h2up::Checkout::Connect(opening) => {
                    let (pending, conn_slot) = match connect_slots(pool) {
                        Ok(slots) => slots,
                        Err(e) => return Outcome::Fatal(e),
                    };
                    let began = crate::clock::now();
                    let r = h2up::connect(addr, tls, cfg.connect_timeout, conn_slot).await;
                    drop(pending);
                    match r {
                        Ok(s) => {
                            let stream = opening.opened(s.clone(), cfg.idle_timeout, cfg.max_connection_duration);
                            break (s, stream, false, micros_since(began));
                        }
                        Err(e) => return Outcome::Failed(e, Some(request)),
                    }
                }
            }
        };
        let (body, upload) = h2up::take_body(&mut request.body);
        let req = h2up::request(&request.head, body, addr, tls.is_some());
        let sent_at = crate::clock::tokio_now();
        let answer = send.try_send_request(req);
        let answer = match upload {
            None => by(deadline, answer).await,
            // A body still arriving from the client: the try's timeout starts once
            // it is sent, as for HTTP/1.1.
            Some(upload) => {
                let mut answer = std::pin::pin!(answer);
                tokio::select! {
                    r = &mut answer => Ok(r),
                    _ = upload.notified() => by(Some(crate::clock::tokio_now() + opts.timeout), answer).await,
                }
            }
        };
        let resp = match answer {
            Err(()) => return timed_out(pool, bi),
            Ok(Ok(r)) => r,
            Ok(Err(mut e)) => {
                if let Some(unsent) = e.take_message() {
                    // The connection had closed (a GOAWAY, a restart): the request
                    // never left, so it may go again on a new one, or anywhere.
                    drop(in_flight);
                    if let h2up::H2Body::Stream(s, _) = unsent.into_body() {
                        request.body = ReqBody::Stream(s);
                    }
                    if reused && stale_left > 0 {
                        stale_left -= 1;
                        stale_resend(pool);
                        continue;
                    }
                    let source = std::io::Error::other(e.into_error());
                    return Outcome::Failed(ProxyError::UpstreamClosed { backend: addr, source }, Some(request));
                }
                return match h2up::classify(e.into_error(), addr) {
                    h2up::Failure::Client(err) => Outcome::Fatal(err),
                    h2up::Failure::Unprocessed(err) => {
                        let unsent = matches!(request.body, ReqBody::Buffered(_)).then_some(request);
                        Outcome::Failed(err, unsent)
                    }
                    h2up::Failure::Failed(err) => Outcome::Failed(err, None),
                };
            }
        };
        record_ttfb(pool, bi, &request.body, sent_at);
        let (parts, mut incoming) = resp.into_parts();
        let status = parts.status;
        let gateway = in_flight.on_status(status);
        let (prefix, trailers, in_flight) = if opts.buffer > 0 {
            match read_prefix(&mut incoming, opts.buffer, deadline).await {
                Err(Some(source)) => {
                    return Outcome::Failed(ProxyError::UpstreamClosed { backend: addr, source }, None)
                }
                Err(None) => return timed_out(pool, bi),
                Ok((whole, true, trailers)) => {
                    in_flight.succeeded();
                    (Some(whole), trailers.map(|t| *t), None)
                }
                Ok((prefix, false, _)) => (Some(prefix), None, Some(in_flight)),
            }
        } else {
            (None, None, Some(in_flight))
        };
        let mut response = Response::new(RespBody::H2(Box::new(crate::body::H2Resp {
            prefix: prefix.filter(|p| !p.is_empty()),
            inner: incoming,
            trailers,
            in_flight,
            request_slot: None,
            stall: crate::netio::Stall::new(cfg.read_timeout),
            stream: Some(stream),
        })));
        *response.status_mut() = status;
        *response.headers_mut() = parts.headers;
        crate::proxy::rewrite_response_headers(response.headers_mut(), status);
        let fwd = Forwarded {
            response,
            backend: addr,
            upgraded: None,
            raw: None,
            connect_us,
        };
        return answered(gateway, fwd);
    }
}

/// Records a try's time to the response head as its backend's latency (the
/// balancer's) and the pool's (the hedge delay's p95). Not for a body streamed from
/// the client: that time is mostly the client's.
#[inline]
fn record_ttfb(pool: &Pool, bi: usize, body: &ReqBody, sent_at: Instant) {
    if let ReqBody::Buffered(_) = body {
        let ttfb = crate::clock::tokio_now().saturating_duration_since(sent_at);
        pool.backends[bi].state.observe_latency(ttfb);
        pool.latency.record(ttfb);
    }
}

/// A try that got an answer: the client's, or a gateway error (`retry.on_status`) the
/// attempt loop may retry elsewhere, holding the answer in case it cannot.
#[inline]
fn answered(gateway: Option<ProxyError>, fwd: Forwarded) -> Outcome {
    match gateway {
        Some(err) => Outcome::Gateway(err, fwd),
        None => Outcome::Response(fwd),
    }
}

/// `f`, failing (`Err`) if `deadline` passes first; with no deadline, just `f`.
/// A hand-written future rather than an `async fn` matching on `deadline`: the
/// compiler gave each arm's future its own space, so the try's state machine held
/// the send future twice.
fn by<F: Future>(deadline: Option<Instant>, f: F) -> By<F> {
    By {
        f,
        timer: deadline.map(tokio::time::sleep_until),
    }
}

pin_project_lite::pin_project! {
    struct By<F> {
        #[pin]
        f: F,
        #[pin]
        timer: Option<tokio::time::Sleep>,
    }
}

impl<F: Future> Future for By<F> {
    type Output = Result<F::Output, ()>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let std::task::Poll::Ready(v) = this.f.poll(cx) {
            return std::task::Poll::Ready(Ok(v));
        }
        match this.timer.as_pin_mut() {
            Some(t) => t.poll(cx).map(|()| Err(())),
            None => std::task::Poll::Pending,
        }
    }
}

/// A body's prefix as `read_prefix` read it: the bytes, whether that was all of it,
/// and its trailers if the end came with some.
type Prefix = (Bytes, bool, Option<Box<http::HeaderMap>>);

/// A body's error as the `io::Error` a failed try carries.
trait IntoIo {
    fn into_io(self) -> std::io::Error;
}

impl IntoIo for std::io::Error {
    fn into_io(self) -> std::io::Error {
        self
    }
}

impl IntoIo for hyper::Error {
    fn into_io(self) -> std::io::Error {
        std::io::Error::other(self)
    }
}

/// Reads body frames until the end or until more than `limit` bytes. Returns the
/// bytes, whether the body is complete, and any trailers; `Err(None)` is the
/// deadline passing.
async fn read_prefix<B>(
    incoming: &mut B,
    limit: usize,
    deadline: Option<Instant>,
) -> Result<Prefix, Option<std::io::Error>>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: IntoIo,
{
    let mut first: Option<Bytes> = None;
    let mut more: Option<BytesMut> = None;
    let mut len = 0usize;
    let mut trailers = None;
    loop {
        let frame = match by(deadline, incoming.frame()).await {
            Err(_) => return Err(None),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(Some(e.into_io())),
            Ok(Some(Ok(f))) => f,
        };
        // Trailers end the body. An HTTP/1.1 backend's are dropped by the caller, as
        // hyper's HTTP/1 server would not send them to most clients anyway; an HTTP/2
        // backend's (gRPC's status) go on.
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(f) => {
                // Boxed: held across the awaits, inline it sized every try's future.
                trailers = f.into_trailers().ok().map(Box::new);
                continue;
            }
        };
        len += data.len();
        match (&mut first, &mut more) {
            (None, _) => first = Some(data),
            (Some(f), None) => {
                let mut m = BytesMut::with_capacity(f.len() + data.len());
                m.extend_from_slice(f);
                m.extend_from_slice(&data);
                more = Some(m);
            }
            (_, Some(m)) => m.extend_from_slice(&data),
        }
        if len > limit {
            return Ok((joined(first, more), false, None));
        }
    }
    Ok((joined(first, more), true, trailers))
}

fn joined(first: Option<Bytes>, more: Option<BytesMut>) -> Bytes {
    match (first, more) {
        (_, Some(m)) => m.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    }
}
