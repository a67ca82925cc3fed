//! One request, start to finish: `handle()` has `prepare()` check limits, route and
//! rewrite the headers, hands the request to `forward::forward`, which owns the
//! attempt loop over backends, and turns the `Result` into a response (the error
//! page, metrics and logs live here, once). Header rewriting
//! (hop-by-hop removal, `X-Forwarded-*`, `Via`, `x-request-id`) lives here too.
//!
//! Retry *policy* (what is safe, the budget) is `retry.rs`; passive health is
//! `outlier.rs`; connection reuse is `upstream.rs`.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};

use crate::accesslog::{Answered, Pending};
use crate::balancer::{hash64, Balancer};
use crate::body::{InBody, RespBody};
use crate::codec::{AddedFields, UpHead};
use crate::compress::Want;
use crate::config::{AccessLog, HashKey, PathRewrite, RegexRewrite};
use crate::error::{error_response, ProxyError};
use crate::forward::Forwarded;
use crate::header_rules::{HeaderRules, Vars};
use crate::idle::ParkState;
use crate::inflight::InFlightSlot;
use crate::rawfields::{RawFields, RawRequest};
use crate::retry;
use crate::router::host_without_port;
use crate::state::{Pool, Snapshot};
use crate::tunnel::ClientSide;
use crate::upstream::UpRequest;
use crate::worker::WorkerCtx;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop fields (RFC 9110 §7.6.1, plus the legacy ones Go's ReverseProxy drops).
/// `Upgrade` is handled separately so tunnels keep it.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

const VIA_10: HeaderValue = HeaderValue::from_static("1.0 rampart");
const VIA_11: HeaderValue = HeaderValue::from_static("1.1 rampart");
const VIA_2: HeaderValue = HeaderValue::from_static("2.0 rampart");
const UPGRADE_TOKEN: HeaderValue = HeaderValue::from_static("upgrade");

/// Facts about one client connection, computed once per connection. For a request
/// that a trusted proxy forwarded (`[server] trusted_proxies`), a copy whose `peer` is
/// the client that proxy named (`real_client`).
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer IP, pre-rendered for `X-Forwarded-For`.
    pub peer_ip: HeaderValue,
    /// When `peer` is a client a trusted proxy named: that proxy's own address (the
    /// connection's peer), which is what `X-Forwarded-For` appends, as every hop
    /// appends the address it was connected from.
    pub hop_ip: Option<HeaderValue>,
    /// `X-Forwarded-Proto`.
    pub proto: HeaderValue,
    /// The connection came in over TLS.
    pub tls: bool,
    /// `X-Forwarded-Client-Cert` for its requests: the client's certificate, on a
    /// listener with `forward_client_cert`.
    pub client_cert: Option<HeaderValue>,
    /// What a TLS connection negotiated, for `$ssl_*` header-rule variables. Behind a
    /// pointer: plain connections carry a null one, and a request's copy shares it.
    pub tls_facts: Option<Rc<crate::tls::TlsFacts>>,
    /// Set for HTTP/1.1 connections served through `idle::ParkIo`, whose upgrades
    /// are completed by hand.
    pub park: Option<Rc<ParkState>>,
    /// The port the connection came in on (`$server_port`).
    pub local_port: u16,
    /// The name of the listener it came in on, for routes' `listeners`.
    pub listener: Option<Arc<str>>,
    /// That listener has `https_redirect`.
    pub redirect_http: bool,
    /// The connection's keep-alive budget and serial number, for the access log's
    /// `$connection` and `$connection_requests` (`idle::Svc` sets it).
    pub life: Option<Rc<crate::idle::Lifetime>>,
}

/// Which listener a connection came in on: its port (`$server_port`), name and
/// `https_redirect`.
#[derive(Debug, Clone, Default)]
pub struct Local {
    pub port: u16,
    pub name: Option<Arc<str>>,
    pub https_redirect: bool,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> ConnInfo {
        ConnInfo {
            peer,
            peer_ip: ip_value(peer.ip()),
            hop_ip: None,
            proto: HeaderValue::from_static(if tls { "https" } else { "http" }),
            tls,
            client_cert: None,
            tls_facts: None,
            park: None,
            local_port: 0,
            listener: None,
            redirect_http: false,
            life: None,
        }
    }

    pub fn on_port(mut self, port: u16) -> ConnInfo {
        self.local_port = port;
        self
    }

    pub fn at(mut self, local: Local) -> ConnInfo {
        self.local_port = local.port;
        self.listener = local.name;
        self.redirect_http = local.https_redirect;
        self
    }

    /// The header rules' variables that come from the connection and the request.
    fn vars<'a>(&'a self, method: &'a Method, request_id: &'a HeaderValue, upstream: Option<SocketAddr>) -> Vars<'a> {
        Vars {
            remote_ip: &self.peer_ip,
            remote_port: self.peer.port(),
            server_port: self.local_port,
            scheme: &self.proto,
            method,
            request_id,
            host: None,
            target: None,
            added: None,
            upstream,
            tls: self.tls_facts.as_deref(),
        }
    }

    pub fn with_tls_facts(mut self, facts: crate::tls::TlsFacts) -> ConnInfo {
        self.tls_facts = Some(Rc::new(facts));
        self
    }

    pub fn with_client_cert(mut self, field: Option<HeaderValue>) -> ConnInfo {
        self.client_cert = field;
        self
    }

    pub fn with_park(mut self, park: Rc<ParkState>) -> ConnInfo {
        self.park = Some(park);
        self
    }

    /// This connection's facts for a request from `client`, whom the peer (a trusted
    /// proxy) named. The client's port is unknown: 0.
    fn for_client(&self, client: std::net::IpAddr) -> ConnInfo {
        ConnInfo {
            peer: SocketAddr::new(client, 0),
            peer_ip: ip_value(client),
            hop_ip: Some(self.hop_ip.clone().unwrap_or_else(|| self.peer_ip.clone())),
            proto: self.proto.clone(),
            tls: self.tls,
            client_cert: self.client_cert.clone(),
            tls_facts: self.tls_facts.clone(),
            park: self.park.clone(),
            local_port: self.local_port,
            listener: self.listener.clone(),
            redirect_http: self.redirect_http,
            life: self.life.clone(),
        }
    }
}

/// An address as `X-Forwarded-For` and `$remote_addr` write it (IPv4 as IPv4 when it
/// came over a dual-stack socket).
fn ip_value(ip: std::net::IpAddr) -> HeaderValue {
    let ip = crate::netio::canonical_ip(ip);
    HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
}

/// The client a request came from when the connection's peer is one of `[server]
/// trusted_proxies`: read from `client_ip_header` right to left, past every trusted
/// address, as nginx's `real_ip_recursive on`; the first address not trusted is the
/// client. A value that is not an address ends the walk at the address right of it
/// (so a client cannot pass itself off as anyone by writing junk). `None`: the
/// connection's peer stands, the peer not being trusted or the header naming no one.
#[cold]
fn real_client<B>(
    real: &crate::config::RealIp,
    conn: &ConnInfo,
    req: &Request<B>,
    raw: Option<&RawRequest>,
) -> Option<std::net::IpAddr> {
    if !real.trusts(conn.peer.ip()) {
        return None;
    }
    let mut values: Vec<&[u8]> = field_values(req, raw, &real.header).collect();
    let mut found = None;
    while let Some(value) = values.pop() {
        for item in value.rsplit(|&b| b == b',') {
            let Some(ip) = parse_forwarded_ip(item.trim_ascii()) else {
                return found;
            };
            found = Some(ip);
            if !real.trusts(ip) {
                return found;
            }
        }
    }
    found
}

/// One address of an `X-Forwarded-For`-style list: `192.0.2.7`, `2001:db8::1`, and
/// the forms with a port some proxies write (`192.0.2.7:4711`, `[2001:db8::1]:4711`).
fn parse_forwarded_ip(item: &[u8]) -> Option<std::net::IpAddr> {
    let text = std::str::from_utf8(item).ok()?;
    if let Ok(ip) = text.parse::<std::net::IpAddr>() {
        return Some(crate::netio::canonical_ip(ip));
    }
    text.parse::<SocketAddr>()
        .ok()
        .map(|a| crate::netio::canonical_ip(a.ip()))
}

/// Generates request ids: a random per-worker prefix and a counter, 24 hex digits.
pub struct RequestIds {
    prefix: u32,
    counter: Cell<u64>,
}

impl RequestIds {
    pub fn new() -> RequestIds {
        RequestIds {
            prefix: fastrand::u32(..),
            counter: Cell::new(fastrand::u64(..) >> 16),
        }
    }

    // Always inlined: with a second caller (`accesslog::Pending::unparsed`) it was
    // not, at +187 instructions a request.
    #[inline(always)]
    pub fn next(&self) -> HeaderValue {
        let n = self.counter.get().wrapping_add(1);
        self.counter.set(n);
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 24];
        for (i, b) in buf[..8].iter_mut().enumerate() {
            *b = HEX[((self.prefix >> (28 - 4 * i)) & 0xf) as usize];
        }
        for (i, b) in buf[8..].iter_mut().enumerate() {
            *b = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
        }
        HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("0"))
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

/// What `handle` answers. The head goes out as: the backend's fields as it wrote them
/// (`raw`), then the response's own, then `x-request-id`. Kept apart, a proxied
/// response to an HTTP/1.1 client needs no `HeaderMap` at all: allocating, filling and
/// freeing one for the request id alone was ~2% of a request's instructions.
pub struct Answer {
    pub response: Response<RespBody>,
    pub raw: Option<RawFields>,
    /// The response's map holds no `x-request-id`.
    pub request_id: HeaderValue,
}

impl Answer {
    /// The response with all its fields in its map, for hyper.
    pub fn into_response(self) -> Response<RespBody> {
        let mut response = self.response;
        if let Some(raw) = self.raw {
            let own = std::mem::take(response.headers_mut());
            *response.headers_mut() = raw.into_header_map(own);
        }
        // Unique per response, so not worth a place in an HTTP/2 client's HPACK
        // table: "never indexed" keeps it out (no insert, so no eviction of fields
        // that do repeat). h2 still hashes it and searches the table for its name.
        // HTTP/1.1 ignores the flag.
        let mut id = self.request_id;
        id.set_sensitive(true);
        response.headers_mut().insert(X_REQUEST_ID, id);
        response
    }
}

/// Entry point from the connection's service: never fails, always answers.
/// `raw`: the request's fields as the client wrote them (`h1` only), its map then empty.
/// `h1_writer`: `h1` writes the answer, and takes the backend's fields as written
/// (`codec::UpHead::raw_response`); hyper, for everything else, takes a map.
///
/// A plain `fn` returning an `async move` block, not an `async fn`: an `async fn`
/// moves its arguments into locals and keeps the space of both in its future, so the
/// request (264 bytes) and its fields (120) were held twice in a future that is moved
/// whole at least once per request.
#[allow(clippy::manual_async_fn)]
pub fn handle(
    ctx: Rc<WorkerCtx>,
    conn: Rc<ConnInfo>,
    req: Request<InBody>,
    raw: Option<RawRequest>,
    h1_writer: bool,
) -> impl Future<Output = Answer> {
    async move {
        ctx.timer_floor.request_started();
        let start = crate::clock::now();
        // One snapshot for the whole request; `load_full` because it lives across awaits.
        let snap = ctx.shared.snapshot.load_full();
        let mut fields = match &raw {
            Some(r) => Fields::of_raw(r),
            None => scan(req.headers()),
        };
        let request_id = match fields.request_id.take() {
            Some(v) if !v.is_empty() && v.len() <= 200 => v,
            _ => ctx.ids.next(),
        };
        let method = req.method().clone();
        // Behind a trusted proxy (a CDN, a layer-7 balancer), the client it names is
        // the client: for the log, `allow`/`deny`, rate limits and hashing.
        let conn = match &snap.config.server.real_ip {
            Some(real) => match real_client(real, &conn, &req, raw.as_ref()) {
                Some(client) => Rc::new(conn.for_client(client)),
                None => conn,
            },
            None => conn,
        };
        // The access-log record; boxed, so a request without one carries a null pointer.
        // Dropped with the request if it ends before an answer: a line saying so.
        let mut log = (!matches!(snap.config.server.access_log, AccessLog::Off)).then(|| {
            let format = &snap.config.server.access_log_format;
            Pending::begin(
                &ctx,
                &conn,
                format,
                &req,
                raw.as_ref(),
                fields.host.as_ref(),
                &request_id,
                start,
            )
        });
        let tries = Cell::new(0u8);
        let mut tunnel = None;
        let mut pool_idx = None;
        let mut route_idx = None;
        // A `forward_auth` route's question to its auth pool (an out-parameter of
        // `prepare`, as `route_idx` is).
        let mut auth = None;
        // Cookies the auth service set on its 2xx, for the client (`forward_auth`'s
        // `auth_response_cookies`).
        let mut auth_cookies: Option<Box<[HeaderValue]>> = None;
        let mut mirror = None;
        let mut held = None;
        let mut backend = None;
        // The answering try's connect, for `$upstream_connect_time`.
        let mut connect_us = 0;
        let mut backend_fields = None;
        // The awaits sit here, not in a nested `async fn`: every level of future nesting
        // copies the request in and the response out, and holds its own copy of the
        // locals. (The service boxes this whole future: see `idle::Svc`.)
        let result = 'proxied: {
            let mut p = match prepare(
                &conn,
                &snap,
                req,
                raw,
                fields,
                &request_id,
                h1_writer,
                &mut route_idx,
                &mut auth,
                &mut mirror,
                &mut held,
            ) {
                Ok(p) => p,
                Err(e) => {
                    skip_log(&mut log, &snap, route_idx);
                    break 'proxied Err(e);
                }
            };
            // Before any await: a client that goes mid-request gets no line either.
            skip_log(&mut log, &snap, route_idx);
            if let Some(auth) = auth.take() {
                // Boxed: the auth pool's forwarding would otherwise sit in every
                // request's future.
                let asked = Cell::new(0u8);
                let gate = crate::auth::forward_auth(&ctx, &snap, route_idx, auth, &asked);
                match Box::pin(gate).await {
                    Ok(crate::auth::Verdict::Pass(passed)) => {
                        let crate::auth::Passed { fields, cookies } = *passed;
                        pass_auth_fields(&mut p.head, fields);
                        if !cookies.is_empty() {
                            auth_cookies = Some(cookies.into_boxed_slice());
                        }
                    }
                    Ok(crate::auth::Verdict::Answer(pool, answer)) => {
                        (pool_idx, backend, connect_us) = (Some(pool), Some(answer.backend), answer.connect_us);
                        tries.set(asked.get());
                        break 'proxied Ok(answer.response);
                    }
                    Err((pool, e)) => {
                        pool_idx = pool;
                        tries.set(asked.get());
                        break 'proxied Err(e);
                    }
                }
            }
            pool_idx = Some(p.pool);
            let pool = &snap.pools[p.pool];
            let policy = crate::forward::TryPolicy::for_route(&pool.config, route_idx.map(|i| &snap.routes[i]));
            let body = match retry::prepare_body(
                p.body,
                p.content_length,
                p.max_body_bytes,
                &pool.config,
                snap.config.server.client_body_timeout,
                policy,
                log.as_ref().and_then(|l| l.body_counter()),
            )
            .await
            {
                Ok(b) => b,
                Err(e) => break 'proxied Err(e),
            };
            if let Some(m) = mirror {
                crate::mirror::send(&ctx, &snap, m, &p.head, &body);
            }
            let req = UpRequest { head: p.head, body };
            let prefer = match p.sticky {
                Sticky::Named(bi) => Some(bi as usize),
                _ => None,
            };
            let Forwarded {
                mut response,
                backend: addr,
                upgraded,
                raw: fields,
                connect_us: connected,
            } = match crate::forward::forward(&ctx, pool, req, p.hash, prefer, policy, &tries).await {
                Ok(f) => f,
                Err(e) => break 'proxied Err(e),
            };
            (backend, connect_us) = (Some(addr), connected);
            backend_fields = fields;
            // Error pages are 400-599: a success costs one comparison here.
            if response.status().as_u16() >= 400 {
                intercept_error(&snap, route_idx, &mut response, &mut backend_fields, &request_id);
            }
            if let (Some(want), Some(cfg)) = (p.compress, route_idx.and_then(|i| snap.routes[i].compress.as_ref())) {
                crate::compress::apply(cfg, want, &method, &mut response, &pool.metrics.compression);
            }
            if let Some(cookie) = sticky_cookie(pool, p.sticky, addr, conn.tls) {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
            if let (Some(host), Some(route)) = (&p.location_host, route_idx.map(|i| &snap.routes[i])) {
                if let Some(PathRewrite::Prefix(to)) = &route.rewrite {
                    map_location_back(response.headers_mut(), &route.path_prefix, to, host);
                }
            }
            if let (Some(client_upgrade), Some(upstream)) = (p.client_upgrade, upgraded) {
                let client = match client_upgrade {
                    ClientUpgrade::Hyper(on) => ClientSide::Hyper(on),
                    ClientUpgrade::Manual(park) => ClientSide::Manual(park.take_upgrade()),
                };
                let idle = pool.config.tunnel_idle_timeout;
                // The tunnel holds the request's place under `in_flight_limit` too.
                let open = crate::tunnel::Counted::new(ctx.tracker.enter(), ctx.shared.clone(), held.take());
                // Spawned below, once the access-log record (if any) is complete: the
                // tunnel's end is the request's.
                tunnel = Some(crate::tunnel::new(client, *upstream, addr, idle, open));
            }
            Ok(response)
        };
        let pool = pool_idx.map(|i| &snap.pools[i]);
        let mut error = None;
        let mut response = match result {
            Ok(r) => r,
            Err(ProxyError::HttpsRedirect(location)) => redirect_response(location, &method),
            Err(ProxyError::Direct(d)) => direct_response(*d),
            Err(e) => {
                log_failure(&e, &method, pool.map(|p| p.name.as_str()), &request_id);
                metrics::counter!(crate::metrics::PROXY_ERRORS, "kind" => e.kind()).increment(1);
                let custom = snap.config.error_pages.get(&e.status().as_u16());
                error = Some(e.kind());
                error_response(&e, &request_id, custom)
            }
        };
        if let Some(cookies) = auth_cookies {
            for c in cookies.into_vec() {
                response.headers_mut().append(header::SET_COOKIE, c);
            }
        }
        if let Some(rules) = route_idx.and_then(|i| snap.routes[i].response_headers.as_deref()) {
            rules.apply(response.headers_mut(), &conn.vars(&method, &request_id, backend));
        }
        // The request id goes out last, as ours: a backend's (or an error page's) goes.
        // A response passed as the backend wrote it has an empty, unallocated map.
        if !response.headers().is_empty() {
            response.headers_mut().remove(X_REQUEST_ID);
        }
        let elapsed = crate::clock::now().saturating_duration_since(start);
        if let Some(p) = pool {
            p.metrics.record(response.status().as_u16(), elapsed);
        }
        if let Some(slot) = held {
            let body = std::mem::replace(response.body_mut(), RespBody::empty());
            *response.body_mut() = RespBody::Held(Box::new(crate::body::Held { body, _slot: slot }));
        }
        if let Some(log) = log {
            let log = log.head_ready(
                Answered {
                    status: response.status().as_u16(),
                    pool: pool.cloned(),
                    backend,
                    head_time: elapsed,
                    connect_time: std::time::Duration::from_micros(connect_us.into()),
                    tries: tries.get(),
                    error,
                    route: route_idx,
                },
                &response,
                backend_fields.as_ref(),
                &snap,
                h1_writer,
            );
            match tunnel.take() {
                // The line waits for the tunnel's end.
                Some(t) => {
                    tokio::task::spawn_local(t.run(Some(log)));
                }
                None => {
                    let body = std::mem::replace(response.body_mut(), RespBody::empty());
                    *response.body_mut() = log.into_body(body);
                }
            }
        }
        if let Some(t) = tunnel {
            tokio::task::spawn_local(t.run(None));
        }
        Answer {
            response,
            raw: backend_fields,
            request_id,
        }
    }
}

/// `intercept_errors`: the route's error page in place of the backend's, when the
/// route asks for it and `[error_pages]` has one for the status.
#[inline(never)]
fn intercept_error(
    snap: &Snapshot,
    route_idx: Option<usize>,
    response: &mut Response<RespBody>,
    backend_fields: &mut Option<RawFields>,
    request_id: &HeaderValue,
) {
    if !route_idx.is_some_and(|i| snap.routes[i].intercept_errors) {
        return;
    }
    if let Some(page) = snap.config.error_pages.get(&response.status().as_u16()) {
        let backend = std::mem::replace(response, Response::new(RespBody::empty()));
        *response = crate::error::intercepted(backend, page, request_id);
        *backend_fields = None;
    }
}

fn log_failure(e: &ProxyError, method: &Method, pool: Option<&str>, request_id: &HeaderValue) {
    let id = request_id.to_str().unwrap_or("-");
    if e.status().is_server_error() && e.side() != crate::error::Side::Client {
        tracing::error!(request_id = id, method = %method, pool = pool.unwrap_or("-"), status = e.status().as_u16(), error = %e, "request failed");
    } else {
        tracing::debug!(request_id = id, method = %method, status = e.status().as_u16(), error = %e, "request rejected");
    }
}

/// Where a plain-HTTP request to an `https_redirect` route is sent: the same host,
/// lowercased and without its port (HTTPS on 443, as nginx's usual
/// `return 301 https://$host$request_uri`),
/// and the target as routed: as the client wrote it, less any dot segments
/// (`unusual_path` removed them before routing).
#[cold]
fn https_redirect<B>(host: Option<&str>, req: &Request<B>) -> ProxyError {
    let Some(host) = host else {
        // HTTP/1.0 without Host: nothing to name in the Location.
        return ProxyError::BadRequest("no Host to redirect to");
    };
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let host = host_without_port(host).to_ascii_lowercase();
    match HeaderValue::from_str(&format!("https://{host}{target}")) {
        Ok(location) => ProxyError::HttpsRedirect(location),
        Err(_) => ProxyError::BadRequest("invalid Host header"),
    }
}

/// A route's `return` for this request: its `location` filled in with the request's
/// variables. A location that comes out empty or invalid is a 500, as nginx answers
/// a `return` whose URL it cannot make.
#[cold]
fn direct<B>(
    d: &crate::config::DirectResponse,
    conn: &ConnInfo,
    req: &Request<B>,
    raw: Option<&RawRequest>,
    host: Option<&HeaderValue>,
    request_id: &HeaderValue,
) -> ProxyError {
    let location = match &d.location {
        None => None,
        Some(template) => {
            let mut vars = conn.vars(req.method(), request_id, None);
            vars.host = host;
            vars.target = Some(req.uri().path_and_query().map_or("/", |pq| pq.as_str()));
            match with_fields(req, raw, |headers| template.resolve(&vars, headers)) {
                Some(l) => Some(l),
                None => {
                    return ProxyError::Direct(Box::new(crate::error::DirectAnswer {
                        status: StatusCode::INTERNAL_SERVER_ERROR,
                        location: None,
                        body: Bytes::from_static(b"500 the route's return location came out empty\n"),
                        content_type: Some(HeaderValue::from_static("text/plain; charset=utf-8")),
                    }))
                }
            }
        }
    };
    ProxyError::Direct(Box::new(crate::error::DirectAnswer {
        status: d.status,
        location,
        body: d.body.clone(),
        content_type: d.content_type.clone(),
    }))
}

fn direct_response(d: crate::error::DirectAnswer) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::from(d.body));
    *resp.status_mut() = d.status;
    let h = resp.headers_mut();
    if let Some(l) = d.location {
        h.insert(header::LOCATION, l);
    }
    if let Some(t) = d.content_type {
        h.insert(header::CONTENT_TYPE, t);
    }
    resp
}

/// 301 for GET and HEAD, as nginx and Envoy send; 308 for other methods, which must
/// keep their method and body on the way to HTTPS (RFC 9110 §15.4.9).
#[cold]
fn redirect_response(location: HeaderValue, method: &Method) -> Response<RespBody> {
    let status = if method == Method::GET || method == Method::HEAD {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::PERMANENT_REDIRECT
    };
    let body = format!("{} {}\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    let mut resp = Response::new(RespBody::from(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::LOCATION, location);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Everything about a request before its body is read and it goes out: limits,
/// route, pool, the backend request head. `routed` is the route, once found, even
/// if the request then fails (its response rules still apply). `held`: the request's
/// place under its route's `in_flight_limit`, kept until its response has been sent.
#[allow(clippy::too_many_arguments)]
fn prepare<'a>(
    conn: &ConnInfo,
    snap: &'a Snapshot,
    mut req: Request<InBody>,
    raw: Option<RawRequest>,
    mut fields: Fields,
    request_id: &HeaderValue,
    h1_writer: bool,
    routed: &mut Option<usize>,
    auth: &mut Option<Rc<UpHead>>,
    mirror: &mut Option<&'a crate::config::Mirror>,
    held: &mut Option<InFlightSlot>,
) -> Result<Prepared, ProxyError> {
    let server = &snap.config.server;
    if let Some(pq) = req.uri().path_and_query() {
        if pq.as_str().len() > server.max_uri_bytes {
            return Err(ProxyError::UriTooLong {
                limit: server.max_uri_bytes,
            });
        }
    }
    if fields.bytes > server.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge {
            limit: server.max_header_bytes,
        });
    }
    if req.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT is not supported"));
    }

    if fields.hosts_repeated {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    if fields.chunked_twice {
        return Err(ProxyError::BadRequest("chunked applied more than once"));
    }
    if fields.other_coding {
        return Err(ProxyError::NotImplemented("a transfer coding other than chunked"));
    }
    // HTTP/2 clients split `Cookie` into one field per pair (RFC 9113 §8.2.3), and an
    // HTTP/1.1 backend must get them joined: many read only the first field.
    if fields.cookies > 1 && req.version() == Version::HTTP_2 {
        join_cookies(req.headers_mut());
    }

    // The authority (h2, absolute-form) wins over Host, as RFC 9112 §3.2.2 says.
    let host_value: Option<HeaderValue> = match req.uri().authority() {
        Some(a) => {
            // `GET host:port`: authority-form is for CONNECT only (RFC 9112 §3.2.3).
            if req.uri().scheme().is_none() {
                return Err(ProxyError::BadRequest("authority-form target"));
            }
            // RFC 9110 §4.2.4: userinfo in an http(s) URI is an error.
            if a.as_str().contains('@') {
                return Err(ProxyError::BadRequest("userinfo in the request target"));
            }
            let from_target = HeaderValue::from_str(a.as_str()).ok();
            // The backend must see the host the request was routed on: a Host that
            // differs goes, and the target's authority takes its place (RFC 9112
            // §3.2.2 for absolute-form; an h2 client's `:authority` likewise).
            if fields.present.host && fields.host != from_target {
                req.headers_mut().remove(header::HOST);
                fields.present.host = false;
            }
            from_target
        }
        None => fields.host,
    };
    if host_value.is_none() && req.version() == Version::HTTP_11 {
        return Err(ProxyError::BadRequest("missing Host header"));
    }
    let host = match &host_value {
        Some(v) => {
            Some(crate::router::host_str(v.as_bytes()).ok_or_else(|| ProxyError::BadRequest("invalid Host header"))?)
        }
        None => None,
    };
    // The query is scanned too (a `/.` there only costs the slow path a look).
    let plain = req
        .uri()
        .path_and_query()
        .is_none_or(|pq| crate::router::plain_path(pq.as_str()));
    let asterisk = !plain && unusual_path(&mut req)?;
    let path = if asterisk { "/" } else { req.uri().path() };
    // A route's header conditions read the client's fields: on the HTTP/1.1 fast path
    // they are still raw, so they are parsed once, if a route asks.
    let parsed = std::cell::OnceCell::new();
    let fits = |i: usize| {
        snap.routes[i].matches.as_ref().is_none_or(|m| {
            m.fits(req.method(), path, conn.listener.as_deref(), || match &raw {
                Some(r) => parsed.get_or_init(|| r.header_map()),
                None => req.headers(),
            })
        })
    };
    let Some(route_idx) = snap.router.find(host.map(host_without_port), path, &fits) else {
        // A listener that redirects sends everything away, routed or not (nginx's
        // `return 301` in the port 80 `server`).
        if conn.redirect_http && !conn.tls {
            return Err(https_redirect(host, &req));
        }
        return Err(ProxyError::NoRoute);
    };
    *routed = Some(route_idx);
    let route = &snap.routes[route_idx];
    if route.access.as_ref().is_some_and(|a| !a.admits(conn.peer.ip())) {
        return Err(ProxyError::Forbidden);
    }
    if route.https_redirect.unwrap_or(conn.redirect_http) && !conn.tls {
        return Err(https_redirect(host, &req));
    }
    let limits = &snap.limiters[route_idx];
    if let Some(limiter) = &limits.rate {
        rate_limit(limiter, &req, raw.as_ref(), conn)?;
    }
    if let Some(limiter) = &limits.in_flight {
        *held = in_flight(limiter, &req, raw.as_ref(), conn)?;
    }
    if let Some(auth) = &route.basic_auth {
        if !auth.admits(field_values(&req, raw.as_ref(), &header::AUTHORIZATION)) {
            return Err(ProxyError::Unauthorized(auth.challenge.clone()));
        }
    }
    if let Some(d) = &route.direct {
        return Err(direct(d, conn, &req, raw.as_ref(), host_value.as_ref(), request_id));
    }
    let pool_idx = match &route.split {
        None => route.pool,
        Some(split) => split_pool(split, &req, raw.as_ref(), conn),
    };
    let pool = &snap.pools[pool_idx];
    // The target as routed, kept for `$request_uri` when the backend gets another.
    let routed_target = match &route.rewrite {
        Some(PathRewrite::Prefix(to)) if !asterisk => rewrite_prefix(&mut req, &route.path_prefix, to)?,
        Some(PathRewrite::Regex(rw)) if !asterisk => rewrite_path(&mut req, rw)?,
        _ => None,
    };

    let content_length = content_length(fields.content_length.as_ref())?;
    if let (Some(limit), Some(len)) = (route.max_body_bytes, content_length) {
        if len > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
    }

    let hash = match &pool.balancer {
        Balancer::ConsistentHash { .. } => request_key(&pool.config.hash_key, &req, raw.as_ref(), conn),
        _ => None,
    };

    let sticky = match &pool.config.sticky {
        None => Sticky::Off,
        Some(s) => sticky_backend(pool, &s.cookie, &req, raw.as_ref()),
    };

    let compress = route.compress.as_ref().map(|cfg| {
        match crate::compress::choose(
            field_values(&req, raw.as_ref(), &header::ACCEPT_ENCODING),
            &cfg.encodings,
        ) {
            Some(coding) => Want::Encode(coding),
            None => Want::Identity,
        }
    });

    let upgrade = fields.upgrade && is_upgrade(&req);
    if upgrade && pool.config.protocol == crate::config::UpstreamProtocol::H2 {
        return Err(ProxyError::NotImplemented(
            "a protocol upgrade (WebSocket) to a pool that speaks HTTP/2",
        ));
    }
    let client_upgrade = upgrade.then(|| match &conn.park {
        Some(park) => ClientUpgrade::Manual(park.clone()),
        None => ClientUpgrade::Hyper(hyper::upgrade::on(&mut req)),
    });

    let (parts, incoming) = req.into_parts();
    let http::request::Parts {
        method,
        uri,
        version,
        headers,
        ..
    } = parts;
    // Filled in place: `AddedFields` is a third of the head's size.
    let mut head = UpHead {
        method,
        uri: origin_form(uri),
        headers,
        raw: raw.map(|r| r.block),
        added: AddedFields::default(),
        // Response rules, and a `Location` to map back, need
        // the backend's fields as a map, and so does compression (which may add
        // `Vary` whether or not it compresses), and so do intercepted errors (which
        // keep a few of them).
        raw_response: h1_writer
            && route.response_headers.is_none()
            && !route.rewrite_location
            && route.compress.is_none()
            && !route.intercept_errors,
    };
    let location_host = match (route.rewrite_location, host) {
        (true, Some(h)) => Some(Box::from(h)),
        _ => None,
    };
    rewrite_with(
        &mut head.headers,
        &mut head.added,
        &fields.present,
        conn,
        version,
        host_value,
        request_id,
        upgrade,
    );
    *mirror = route.mirror.as_deref();
    // The auth service sees the client's request as it came, before the route's rules.
    if let Some(fa) = &route.forward_auth {
        let target = routed_target
            .as_ref()
            .or(head.uri.path_and_query())
            .map_or("/", |t| t.as_str());
        *auth = Some(Rc::new(crate::auth::forward_auth_head(fa, &head, target)));
    }
    if let Some(rules) = &route.request_headers {
        apply_request_rules(&mut head, rules, conn, request_id, routed_target.as_ref());
    }
    let head = Rc::new(head);

    Ok(Prepared {
        pool: pool_idx,
        head,
        body: incoming,
        content_length,
        max_body_bytes: route.max_body_bytes,
        hash,
        sticky,
        client_upgrade,
        location_host,
        compress,
    })
}

/// A request ready to go to `pool`, once its body is prepared for replay.
struct Prepared {
    pool: usize,
    head: Rc<UpHead>,
    body: InBody,
    content_length: Option<u64>,
    max_body_bytes: Option<u64>,
    hash: Option<u64>,
    sticky: Sticky,
    client_upgrade: Option<ClientUpgrade>,
    /// For a route that maps a backend's `Location` back: the host the client asked
    /// for (with any port), whose absolute URLs are mapped. Boxed: rare.
    location_host: Option<Box<str>>,
    /// A route that compresses: whether the client takes gzip.
    compress: Option<Want>,
}

/// A request to a sticky pool (`sticky`): whether its cookie names one of the pool's
/// backends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sticky {
    /// Not a sticky pool.
    Off,
    /// No cookie, or one that names no backend of the pool (any longer).
    Unnamed,
    /// A backend's index; `u32` keeps the enum, moved with every request, at 8 bytes.
    Named(u32),
}

/// The backend a sticky pool's cookie names. The fast path's raw fields are parsed
/// for it: only for sticky pools.
#[cold]
fn sticky_backend<B>(pool: &Pool, name: &str, req: &Request<B>, raw: Option<&RawRequest>) -> Sticky {
    let id = with_fields(req, raw, |headers| {
        cookie(headers, name)
            .filter(|v| v.len() == 16)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
    });
    match id.and_then(|id| pool.backends.iter().position(|b| b.sticky_id == id)) {
        Some(bi) => Sticky::Named(bi as u32),
        None => Sticky::Unnamed,
    }
}

/// The `Set-Cookie` for a sticky pool's response from `answered`, unless the client's
/// cookie already names it. `Secure` when the client came over TLS.
fn sticky_cookie(pool: &Pool, sticky: Sticky, answered: SocketAddr, tls: bool) -> Option<HeaderValue> {
    let cfg = pool.config.sticky.as_ref()?;
    if let Sticky::Named(bi) = sticky {
        if pool.backends[bi as usize].addr == answered {
            return None;
        }
    }
    sticky_set_cookie(pool, cfg, answered, tls)
}

#[cold]
fn sticky_set_cookie(
    pool: &Pool,
    cfg: &crate::config::StickyConfig,
    answered: SocketAddr,
    tls: bool,
) -> Option<HeaderValue> {
    let b = pool.backends.iter().find(|b| b.addr == answered)?;
    let secure = if cfg.secure.unwrap_or(tls) { "; Secure" } else { "" };
    let v = format!("{}={:016x}{}{secure}", cfg.cookie, b.sticky_id, cfg.attributes);
    HeaderValue::from_str(&v).ok()
}

enum ClientUpgrade {
    Hyper(hyper::upgrade::OnUpgrade),
    /// `idle::run_h1` hands the socket over once the 101 is written.
    Manual(Rc<ParkState>),
}

fn content_length(field: Option<&HeaderValue>) -> Result<Option<u64>, ProxyError> {
    match field {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| ProxyError::BadRequest("invalid Content-Length")),
    }
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && upgrades_to_a_tunnel(req.headers())
        && connection_has_token(req.headers(), "upgrade")
}

/// `Upgrade` names a protocol other than `h2c`. An h2c upgrade is this hop's own
/// business (its `HTTP2-Settings` is hop-by-hop), and forwarded it would let a client
/// speak HTTP/2 straight to the backend past every rule of the proxy ("h2c
/// smuggling"); Envoy and nginx do not forward it either. The request goes on
/// without it.
fn upgrades_to_a_tunnel(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| t.trim_ascii())
        .any(|t| !t.is_empty() && !t.eq_ignore_ascii_case(b"h2c"))
}

fn connection_has_token(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes every field named in `Connection` and the fixed hop-by-hop list (and
/// `Upgrade`, which callers put back for tunnels, and `Expect`, which is meaningless
/// past the hop that answered it and never sent in responses). One pass over the names present:
/// most messages carry none of these, and a `remove` per listed name cost ten hash
/// lookups per request (about 2,900 instructions under callgrind).
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // The usual tokens name nothing beyond the fixed list below.
            .filter(|t| {
                !["close", "keep-alive", "upgrade"]
                    .iter()
                    .any(|k| t.eq_ignore_ascii_case(k))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    // One scan per field removed, and no list: most messages carry one at most (a
    // backend's `Connection: keep-alive`), and standard names clone for free.
    while let Some(name) = headers.keys().find(|n| is_hop_by_hop(n)).cloned() {
        headers.remove(name);
    }
}

/// Which of the fields rampart rewrites a request carries.
#[derive(Default)]
struct Present {
    hop_by_hop: bool,
    host: bool,
    forwarded_for: bool,
    forwarded_proto: bool,
    forwarded_host: bool,
    forwarded_client_cert: bool,
    via: bool,
    request_id: bool,
}

/// What handling a request needs from its header fields, from one pass over them:
/// a `get` per field hashed its name each time, and most requests carry few fields.
#[derive(Default)]
struct Fields {
    /// The header block's size as `max_header_bytes` counts it.
    bytes: usize,
    /// The first of each.
    request_id: Option<HeaderValue>,
    host: Option<HeaderValue>,
    content_length: Option<HeaderValue>,
    /// An `Upgrade` field is present (`is_upgrade` decides the rest).
    upgrade: bool,
    /// More than one `Host` field: a 400 (RFC 9112 §3.2).
    hosts_repeated: bool,
    /// A `Transfer-Encoding` with a coding besides `chunked`, which hyper accepts
    /// when `chunked` is last: re-chunked without it, the body would reach the
    /// backend still encoded and labelled as not, so it gets a 501.
    other_coding: bool,
    /// `chunked` named more than once (RFC 9112 §6.1 forbids it): hyper would undo
    /// one, and the body would reach the backend still chunked. A 400.
    chunked_twice: bool,
    seen_chunked: bool,
    /// How many `Cookie` fields (up to 2: whether they need joining).
    cookies: u8,
    present: Present,
}

impl Fields {
    /// What `scan` finds in fields that passed `rawfields::request_field_passes`.
    fn of_raw(r: &RawRequest) -> Fields {
        Fields {
            bytes: r.bytes,
            request_id: r.request_id.clone(),
            host: r.host.clone(),
            content_length: None,
            upgrade: false,
            hosts_repeated: false,
            other_coding: false,
            chunked_twice: false,
            seen_chunked: false,
            cookies: 0,
            present: Present {
                host: r.host.is_some(),
                request_id: r.request_id.is_some(),
                ..Present::default()
            },
        }
    }
}

fn scan(headers: &HeaderMap) -> Fields {
    let mut f = Fields::default();
    for (name, value) in headers {
        f.bytes += name.as_str().len() + value.len() + 4;
        if name == header::HOST {
            f.hosts_repeated |= f.host.is_some();
            f.host.get_or_insert_with(|| value.clone());
            f.present.host = true;
        } else if name == header::CONTENT_LENGTH {
            f.content_length.get_or_insert_with(|| value.clone());
        } else if name == header::VIA {
            f.present.via = true;
        } else if name == header::COOKIE {
            f.cookies = (f.cookies + 1).min(2);
        } else if is_hop_by_hop(name) {
            f.present.hop_by_hop = true;
            f.upgrade |= name == header::UPGRADE;
            if name == header::TRANSFER_ENCODING {
                transfer_codings(value, &mut f);
            }
        } else {
            match name.as_str() {
                "x-forwarded-for" => f.present.forwarded_for = true,
                "x-forwarded-proto" => f.present.forwarded_proto = true,
                "x-forwarded-host" => f.present.forwarded_host = true,
                "x-forwarded-client-cert" => f.present.forwarded_client_cert = true,
                "x-request-id" => {
                    f.request_id.get_or_insert_with(|| value.clone());
                    f.present.request_id = true;
                }
                _ => {}
            }
        }
    }
    f
}

/// Notes in `f` what a `Transfer-Encoding` field names besides one `chunked` (hyper
/// has already refused a request whose last coding is not `chunked`).
fn transfer_codings(value: &HeaderValue, f: &mut Fields) {
    for t in value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if t.eq_ignore_ascii_case(b"chunked") {
            f.chunked_twice |= f.seen_chunked;
            f.seen_chunked = true;
        } else if !t.is_empty() {
            f.other_coding = true;
        }
    }
}

fn is_hop_by_hop(n: &HeaderName) -> bool {
    *n == header::UPGRADE || *n == header::EXPECT || HOP_BY_HOP.contains(n)
}

/// Prepares client request headers for the backend: removes the hop-by-hop fields
/// from `headers` and returns the fields rampart adds (`X-Forwarded-For`, `-Proto`,
/// `-Host`, `Via`, `x-request-id`, and `Host` for HTTP/2 clients), which the codec
/// writes after the client's. A field the client sent that rampart extends
/// (`X-Forwarded-For`, `Via`) or replaces (`X-Forwarded-Proto`, `-Host`) moves out
/// of `headers`, so each goes out once.
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    conn: &ConnInfo,
    version: Version,
    host: Option<HeaderValue>,
    request_id: &HeaderValue,
    upgrade: bool,
) -> AddedFields {
    let present = scan(headers).present;
    let mut added = AddedFields::default();
    rewrite_with(headers, &mut added, &present, conn, version, host, request_id, upgrade);
    added
}

/// `rewrite_request_headers` with the fields present already known (`scan`), adding
/// to `added`, which starts empty.
#[allow(clippy::too_many_arguments)]
fn rewrite_with(
    headers: &mut HeaderMap,
    added: &mut AddedFields,
    p: &Present,
    conn: &ConnInfo,
    version: Version,
    host: Option<HeaderValue>,
    request_id: &HeaderValue,
    upgrade: bool,
) {
    if p.hop_by_hop {
        let upgrade_value = if upgrade {
            headers.get(header::UPGRADE).cloned()
        } else {
            None
        };
        // Also drops `Upgrade` and `Expect` (hyper already answered `100-continue`).
        remove_hop_by_hop(headers);
        if let Some(u) = upgrade_value {
            headers.insert(header::CONNECTION, UPGRADE_TOKEN);
            headers.insert(header::UPGRADE, u);
            added.upgrade = true;
        }
    }
    let forwarded_for = if p.forwarded_for {
        // Several fields fold into one list, then our hop is appended.
        fold_out(headers, X_FORWARDED_FOR, conn.hop_ip.as_ref().unwrap_or(&conn.peer_ip))
    } else {
        conn.hop_ip.clone().unwrap_or_else(|| conn.peer_ip.clone())
    };
    added.push("x-forwarded-for", forwarded_for);
    if p.forwarded_proto {
        headers.remove(X_FORWARDED_PROTO);
    }
    // Only rampart vouches for a client certificate: a client's own field never
    // reaches the backend (Envoy's `SANITIZE`), on any listener.
    if p.forwarded_client_cert {
        headers.remove(X_FORWARDED_CLIENT_CERT);
    }
    if let Some(cert) = &conn.client_cert {
        added.push("x-forwarded-client-cert", cert.clone());
    }
    added.push("x-forwarded-proto", conn.proto.clone());
    if let Some(h) = host {
        if p.forwarded_host {
            headers.remove(X_FORWARDED_HOST);
        }
        if !p.host {
            // h2 clients send :authority instead of Host; HTTP/1.1 backends need Host.
            added.host = Some(h.clone());
        }
        added.push("x-forwarded-host", h);
    } else if !p.host {
        added.host_from_backend = true;
    }
    let via = match version {
        Version::HTTP_2 => VIA_2,
        Version::HTTP_10 => VIA_10,
        _ => VIA_11,
    };
    added.push(
        "via",
        if p.via {
            fold_out(headers, header::VIA, &via)
        } else {
            via
        },
    );
    if !p.request_id {
        added.push("x-request-id", request_id.clone());
    }
}

/// A route's request header rules, on the fields the backend will get: the client's
/// as written move into the map first, where the rules can reach them. A `Host` the
/// rules set replaces the one rampart would send (the client's, or its `:authority`),
/// which `X-Forwarded-Host` still carries.
#[cold]
fn apply_request_rules(
    head: &mut UpHead,
    rules: &HeaderRules,
    conn: &ConnInfo,
    request_id: &HeaderValue,
    routed_target: Option<&PathAndQuery>,
) {
    head.fields_to_map();
    let vars = Vars {
        host: head.added.get("x-forwarded-host"),
        target: routed_target.or(head.uri.path_and_query()).map(PathAndQuery::as_str),
        added: Some(&head.added),
        ..conn.vars(&head.method, request_id, None)
    };
    rules.apply(&mut head.headers, &vars);
    if rules.sets_host() {
        head.added.host = None;
        head.added.host_from_backend = false;
    }
}

/// A `forward_auth` pool let the request pass: the fields of its answer the route
/// names go to the backend in place of the client's (removed when the answer had none).
#[cold]
fn pass_auth_fields(head: &mut Rc<UpHead>, fields: Vec<(HeaderName, Option<HeaderValue>)>) {
    if fields.is_empty() {
        return;
    }
    // Not shared before the first try, so no copy is made; were it shared, a copy
    // still gets the fields (never the client's forged ones).
    let head = Rc::make_mut(head);
    head.fields_to_map();
    for (name, value) in fields {
        head.headers.remove(&name);
        if let Some(v) = value {
            head.headers.insert(name, v);
        }
    }
}

/// Drops the access-log record, unwritten, of a request whose route has
/// `access_log = false`.
#[inline]
fn skip_log(log: &mut Option<Box<Pending>>, snap: &Snapshot, route: Option<usize>) {
    if let Some(l) = log.take_if(|_| route.is_some_and(|i| snap.routes[i].skip_access_log)) {
        l.discard();
    }
}

/// A route's `prefix_rewrite`: the matched `path_prefix` is replaced by `to` in the
/// target the backend gets, the query kept (Envoy's `prefix_rewrite`; nginx's
/// `location /api/ { proxy_pass http://app/; }`). When `to` ends in `/` and the rest
/// of the path starts with one, one of the two goes, so `/api` rewritten to `/` sends
/// `/api/users` as `/users`, not `//users`. Returns the target as it was routed.
#[cold]
fn rewrite_prefix<B>(req: &mut Request<B>, prefix: &str, to: &str) -> Result<Option<PathAndQuery>, ProxyError> {
    let Some(routed) = req.uri().path_and_query().cloned() else {
        return Ok(None);
    };
    // The router matched `prefix` against this path, so it starts with it.
    let rest = routed.path().get(prefix.len()..).unwrap_or("");
    let rest = match rest.strip_prefix('/') {
        Some(tail) if to.ends_with('/') => tail,
        _ => rest,
    };
    let query = routed.query();
    let mut target = String::with_capacity(to.len() + rest.len() + query.map_or(0, |q| q.len() + 1));
    target.push_str(to);
    target.push_str(rest);
    if let Some(q) = query {
        target.push('?');
        target.push_str(q);
    }
    set_target(req, target)?;
    Ok(Some(routed))
}

/// A route's `path_rewrite`: every match of its pattern in the path is replaced
/// (Envoy's `regex_rewrite`). A `?` in the replacement makes a query, which the
/// client's follows after `&` unless the replacement ends in `?`, as in nginx's
/// `rewrite`. A path that comes out without its leading `/` gets one. Returns the
/// target as it was routed, or `None` when the pattern did not match.
#[cold]
fn rewrite_path<B>(req: &mut Request<B>, rw: &RegexRewrite) -> Result<Option<PathAndQuery>, ProxyError> {
    let Some(routed) = req.uri().path_and_query().cloned() else {
        return Ok(None);
    };
    let std::borrow::Cow::Owned(new) = rw.regex.replace_all(routed.path(), rw.replace.as_str()) else {
        return Ok(None);
    };
    // A `?` can only come from the replacement's text: the path has none.
    let (path, args) = match new.split_once('?') {
        Some((path, args)) => (path, Some(args)),
        None => (new.as_str(), None),
    };
    let client = routed.query().filter(|_| !(rw.drops_query && args.is_some()));
    let mut target = String::with_capacity(new.len() + 2 + client.map_or(0, str::len));
    if !path.starts_with('/') {
        target.push('/');
    }
    target.push_str(path);
    for (i, part) in args.into_iter().chain(client).filter(|a| !a.is_empty()).enumerate() {
        target.push(if i == 0 { '?' } else { '&' });
        target.push_str(part);
    }
    set_target(req, target)?;
    Ok(Some(routed))
}

/// Gives `req` the target `target`; `Err` (400) only for one that is not valid.
fn set_target<B>(req: &mut Request<B>, target: String) -> Result<(), ProxyError> {
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(
        PathAndQuery::from_maybe_shared(Bytes::from(target))
            .map_err(|_| ProxyError::BadRequest("invalid request target"))?,
    );
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
    Ok(())
}

/// nginx's `proxy_redirect default` for a route with `prefix_rewrite`: a `Location`
/// the backend wrote under the prefix the route rewrote to (`to`) goes back under the
/// prefix the client used (`prefix`), so a redirect does not send the client outside
/// the route. A path is mapped, and so is an absolute http(s) URL on the host the
/// client asked for (`host`); any other URL (another site) is left alone.
#[cold]
fn map_location_back(headers: &mut HeaderMap, prefix: &str, to: &str, host: &str) {
    let Some(location) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let (origin, path) = if location.starts_with('/') && !location.starts_with("//") {
        ("", location)
    } else {
        let Some((scheme, rest)) = location.split_once("://") else {
            return;
        };
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return;
        }
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if !rest[..end].eq_ignore_ascii_case(host) {
            return;
        }
        location.split_at(location.len() - rest.len() + end)
    };
    let Some(rest) = path.strip_prefix(to) else {
        return;
    };
    // The inverse of `rewrite_prefix`, which drops one of two slashes where a rewrite
    // ending in `/` meets the rest of the path: `/api/users` went as `/users`.
    let slash = if to.ends_with('/') && !prefix.ends_with('/') {
        "/"
    } else {
        ""
    };
    let mapped = format!("{origin}{prefix}{slash}{rest}");
    if let Ok(v) = HeaderValue::from_str(&mapped) {
        headers.insert(header::LOCATION, v);
    }
}

/// Joins every `Cookie` field into one, with "; " (RFC 9113 §8.2.3).
#[cold]
fn join_cookies(headers: &mut HeaderMap) {
    let mut joined = Vec::with_capacity(128);
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
        headers.insert(header::COOKIE, v);
    }
}

/// Removes every `name` field from `headers` and returns their values and `ours` as
/// one comma-separated list (RFC 9110 §5.3).
fn fold_out(headers: &mut HeaderMap, name: HeaderName, ours: &HeaderValue) -> HeaderValue {
    let mut joined = Vec::with_capacity(64);
    for v in headers.get_all(&name) {
        joined.extend_from_slice(v.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(ours.as_bytes());
    headers.remove(&name);
    HeaderValue::from_maybe_shared(Bytes::from(joined)).unwrap_or_else(|_| ours.clone())
}

/// Prepares backend response headers for the client.
pub fn rewrite_response_headers(headers: &mut HeaderMap, status: StatusCode) {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let upgrade = headers.get(header::UPGRADE).cloned();
        remove_hop_by_hop(headers);
        if let Some(u) = upgrade {
            headers.insert(header::CONNECTION, UPGRADE_TOKEN);
            headers.insert(header::UPGRADE, u);
        }
    } else {
        remove_hop_by_hop(headers);
    }
}

/// The request target in origin form (`/path?query`), reusing the parsed bytes.
fn origin_form(uri: Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri;
    }
    let pq = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(pq);
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// For a path that is not plain (`router::plain_path`): an asterisk-form target
/// (true: route it as `/`), or a path whose dot segments go (`router::normalize_path`),
/// so that it is routed, and forwarded, without them. The authority, if the target
/// had one, was read before.
#[cold]
fn unusual_path<B>(req: &mut Request<B>) -> Result<bool, ProxyError> {
    if req.uri().path() == "*" {
        // Asterisk-form asks about the server, not a resource, and only OPTIONS may
        // (RFC 9112 §3.2.4); it goes, as written, to the host's catch-all route.
        if req.method() != Method::OPTIONS {
            return Err(ProxyError::BadRequest("asterisk-form target"));
        }
        return Ok(true);
    }
    match crate::router::normalize_path(req.uri().path()) {
        Ok(Some(path)) => *req.uri_mut() = with_path(req.uri(), path)?,
        Ok(None) => {}
        Err(_) => return Err(ProxyError::BadRequest("path above the root")),
    }
    Ok(false)
}

/// `uri` in origin-form with `path` in place of its own.
#[cold]
fn with_path(uri: &Uri, mut path: String) -> Result<Uri, ProxyError> {
    if let Some(q) = uri.query() {
        path.push('?');
        path.push_str(q);
    }
    let mut parts = http::uri::Parts::default();
    parts.path_and_query =
        Some(PathAndQuery::from_maybe_shared(path).map_err(|_| ProxyError::BadRequest("invalid path"))?);
    Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid path"))
}

/// A route's `rate_limit`: a request without the key (no such header or cookie) is
/// not limited, as in nginx's `limit_req` and Envoy's descriptors. Out of line: most
/// routes have no limit.
#[inline(never)]
fn rate_limit<B>(
    limiter: &crate::ratelimit::RateLimiter,
    req: &Request<B>,
    raw: Option<&RawRequest>,
    conn: &ConnInfo,
) -> Result<(), ProxyError> {
    match request_key(&limiter.config.key, req, raw, conn) {
        Some(k) => limiter
            .check(k, crate::state::clock_ns() / 1000)
            .map_err(|retry_after| ProxyError::RateLimited { retry_after }),
        None => Ok(()),
    }
}

/// A route's `in_flight_limit`: a place among the client's requests in flight, or 429.
/// A request without the key (no such header or cookie) is not limited, as with
/// `rate_limit`. Out of line: most routes have no limit.
#[inline(never)]
fn in_flight<B>(
    limiter: &std::sync::Arc<crate::inflight::InFlightLimiter>,
    req: &Request<B>,
    raw: Option<&RawRequest>,
    conn: &ConnInfo,
) -> Result<Option<InFlightSlot>, ProxyError> {
    match request_key(&limiter.key, req, raw, conn) {
        Some(k) => match limiter.acquire(k) {
            Some(slot) => Ok(Some(slot)),
            None => Err(ProxyError::TooManyInFlight { max: limiter.max() }),
        },
        None => Ok(None),
    }
}

/// The pool a route's `pools` split gives this request: by its `split_key`, or at
/// random when it has none (or the request lacks that field or cookie).
#[cold]
fn split_pool<B>(
    split: &crate::config::PoolSplit,
    req: &Request<B>,
    raw: Option<&RawRequest>,
    conn: &ConnInfo,
) -> usize {
    let hash = split.key.as_ref().and_then(|k| request_key(k, req, raw, conn));
    split.pick(hash)
}

/// `hash_key` for a request whose fields may still be raw (the HTTP/1.1 fast path):
/// parsed into a map only when the key is a field or a cookie.
fn request_key<B>(key: &HashKey, req: &Request<B>, raw: Option<&RawRequest>, conn: &ConnInfo) -> Option<u64> {
    match key {
        HashKey::ClientIp => Some(hash64(conn.peer_ip.as_bytes())),
        // The target as the backend will get it: dot segments gone, any
        // `prefix_rewrite` applied.
        HashKey::Uri => Some(hash64(
            req.uri().path_and_query().map_or("/", |pq| pq.as_str()).as_bytes(),
        )),
        HashKey::Path => Some(hash64(req.uri().path().as_bytes())),
        HashKey::Header(_) | HashKey::Cookie(_) => with_fields(req, raw, |headers| field_key(key, headers)),
    }
}

/// `f` over the request's fields: its map, or on the HTTP/1.1 fast path (where the
/// map is empty) its raw fields parsed into one.
fn with_fields<B, T>(req: &Request<B>, raw: Option<&RawRequest>, f: impl FnOnce(&HeaderMap) -> T) -> T {
    match raw {
        Some(r) => f(&r.header_map()),
        None => f(req.headers()),
    }
}

/// Every value of field `name`, as the client wrote it: from its map, or on the
/// HTTP/1.1 fast path from its raw fields, without parsing them into one.
fn field_values<'a, B>(
    req: &'a Request<B>,
    raw: Option<&'a RawRequest>,
    name: &'a HeaderName,
) -> impl Iterator<Item = &'a [u8]> {
    let (from_raw, from_map) = match raw {
        Some(r) => (Some(crate::rawfields::values(&r.block, name.as_str().as_bytes())), None),
        None => (
            None,
            Some(req.headers().get_all(name).iter().map(HeaderValue::as_bytes)),
        ),
    };
    from_raw.into_iter().flatten().chain(from_map.into_iter().flatten())
}

/// A key read from the request's fields; the others `request_key` reads itself.
fn field_key(key: &HashKey, headers: &HeaderMap) -> Option<u64> {
    match key {
        HashKey::Header(name) => headers.get(name).map(|v| hash64(v.as_bytes())),
        HashKey::Cookie(name) => cookie(headers, name).map(|v| hash64(v.as_bytes())),
        HashKey::ClientIp | HashKey::Uri | HashKey::Path => None,
    }
}

/// The value of cookie `name` in the request's `Cookie` fields.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_location_maps_back_as_its_path_was_rewritten() {
        let back = |prefix: &str, to: &str, location: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::LOCATION, HeaderValue::from_str(location).unwrap());
            map_location_back(&mut h, prefix, to, "a.test");
            h[header::LOCATION].to_str().unwrap().to_string()
        };
        // `path_prefix = "/api"`, `prefix_rewrite = "/"`: /api/users went as /users.
        assert_eq!(back("/api", "/", "/login"), "/api/login");
        assert_eq!(back("/api", "/", "/"), "/api/");
        assert_eq!(back("/api/", "/", "/login?x=1"), "/api/login?x=1");
        assert_eq!(back("/api/", "/internal/", "/internal/a"), "/api/a");
        assert_eq!(back("/v1", "/internal/v2", "/internal/v2beta"), "/v1beta");
        // Not under the rewritten prefix, a relative reference, another host or
        // scheme: as the backend wrote it.
        assert_eq!(back("/api/", "/internal/", "/other/a"), "/other/a");
        assert_eq!(back("/api/", "/", "login"), "login");
        assert_eq!(back("/api/", "/", "//a.test/x"), "//a.test/x");
        assert_eq!(back("/api/", "/", "http://b.test/x"), "http://b.test/x");
        assert_eq!(back("/api/", "/", "ftp://a.test/x"), "ftp://a.test/x");
        assert_eq!(back("/api/", "/", "HTTPS://A.test/x#f"), "HTTPS://A.test/api/x#f");
        assert_eq!(back("/api/", "/", "http://a.test"), "http://a.test");
        assert_eq!(back("/api/", "/", "http://a.test?q"), "http://a.test?q");
    }

    fn conn() -> ConnInfo {
        ConnInfo::new("10.1.2.3:5555".parse().unwrap(), false)
    }

    #[test]
    fn connection_listed_fields_and_hop_by_hop_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret, x-other"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic x"));
        let id = HeaderValue::from_static("rid");
        let added = rewrite_request_headers(
            &mut h,
            &conn(),
            Version::HTTP_11,
            Some(HeaderValue::from_static("a.test")),
            &id,
            false,
        );
        for gone in [
            "connection",
            "x-secret",
            "x-other",
            "keep-alive",
            "te",
            "proxy-authorization",
        ] {
            assert!(!h.contains_key(gone), "{gone} should be removed");
        }
        assert_eq!(h["x-kept"], "1");
        assert_eq!(added.get("x-forwarded-for").unwrap(), "10.1.2.3");
        assert_eq!(added.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(added.get("x-forwarded-host").unwrap(), "a.test");
        assert_eq!(added.get("via").unwrap(), "1.1 rampart");
        assert_eq!(added.get("x-request-id").unwrap(), "rid");
        assert_eq!(
            added.host.as_ref().unwrap(),
            "a.test",
            "the map had no Host: it is added"
        );
    }

    #[test]
    fn forwarded_for_and_via_append() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
        h.insert(header::VIA, HeaderValue::from_static("1.1 edge"));
        h.append(header::VIA, HeaderValue::from_static("1.0 old"));
        h.insert(X_REQUEST_ID, HeaderValue::from_static("theirs"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("spoofed"));
        let id = HeaderValue::from_static("ours");
        let added = rewrite_request_headers(&mut h, &conn(), Version::HTTP_2, None, &id, false);
        assert_eq!(added.get("x-forwarded-for").unwrap(), "1.1.1.1, 2.2.2.2, 10.1.2.3");
        assert_eq!(added.get("via").unwrap(), "1.1 edge, 1.0 old, 2.0 rampart");
        assert_eq!(added.get("x-forwarded-proto").unwrap(), "http");
        for moved in ["x-forwarded-for", "via", "x-forwarded-proto"] {
            assert!(!h.contains_key(moved), "{moved} goes out once, from the added fields");
        }
        assert_eq!(h["x-request-id"], "theirs");
        assert!(added.get("x-request-id").is_none());
    }

    #[test]
    fn an_h2_request_gets_a_host_field_from_its_authority() {
        let mut h = HeaderMap::new();
        let id = HeaderValue::from_static("rid");
        let host = Some(HeaderValue::from_static("h2.test"));
        let added = rewrite_request_headers(&mut h, &conn(), Version::HTTP_2, host, &id, false);
        assert_eq!(added.host.as_ref().unwrap(), "h2.test");
        assert_eq!(added.get("x-forwarded-host").unwrap(), "h2.test");
        assert!(h.is_empty());
    }

    #[test]
    fn no_field_rampart_rewrites_passes_as_written() {
        use crate::rawfields::request_field_passes;
        let rewritten = [
            X_FORWARDED_FOR,
            X_FORWARDED_PROTO,
            X_FORWARDED_HOST,
            X_FORWARDED_CLIENT_CERT,
            header::VIA,
        ];
        let framing = [header::CONTENT_LENGTH, header::UPGRADE, header::EXPECT];
        for name in HOP_BY_HOP.iter().chain(&rewritten).chain(&framing) {
            assert!(!request_field_passes(name.as_str().as_bytes()), "{name}");
            assert!(
                !request_field_passes(name.as_str().to_ascii_uppercase().as_bytes()),
                "{name}"
            );
            assert!(is_hop_by_hop(name) || rewritten.contains(name) || framing.contains(name));
        }
        for name in [
            "host",
            "x-request-id",
            "user-agent",
            "cookie",
            "x-forwarded-port",
            "vias",
        ] {
            assert!(request_field_passes(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn request_ids_are_unique_and_fixed_width() {
        let ids = RequestIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 24);
    }

    #[test]
    fn absolute_form_becomes_origin_form() {
        let u: Uri = "http://example.com:8080/a/b?c=d".parse().unwrap();
        assert_eq!(origin_form(u), "/a/b?c=d");
        let u: Uri = "/x".parse().unwrap();
        assert_eq!(origin_form(u), "/x");
    }
}
