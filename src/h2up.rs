//! HTTP/2 to backends, for pools with `protocol = "h2"` (gRPC, and services that
//! speak only HTTP/2): per worker, a few multiplexed connections per backend, opened
//! as needed (prior knowledge on a plain connection, ALPN `h2` over TLS) and each
//! driven by its own task; each request is a stream on the first with room (fewer
//! than `h2_max_streams` open), through hyper's HTTP/2 client.
//!
//! `forward` keeps the attempt loop (retries, hedging, breakers, ejection); this
//! module owns the connections, turns an `UpHead` into an HTTP/2 request, and says
//! of each failure whether the backend could have processed the request: a stream it
//! refused (`REFUSED_STREAM`, RFC 9113 §8.7) or a request that never left a
//! connection that had closed was not, so it may go anywhere, whatever its method.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::error::Error as _;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::sync::Notify;

use crate::backend_tls::BackendTls;
use crate::body::{ReqBody, ReqBodyError, StreamBody};
use crate::breaker::Slot;
use crate::codec::UpHead;
use crate::error::ProxyError;

/// How often an idle connection is pinged, so a backend that vanished without a
/// close (a dead host, a dropped NAT entry) is found before a request is sent on it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may wait for its answer before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A request body as one backend stream sends it.
pub enum H2Body {
    Full(Option<Bytes>),
    Stream(Box<StreamBody>, Rc<Notify>),
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = ReqBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ReqBodyError>>> {
        match self.get_mut() {
            H2Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            H2Body::Stream(s, sent) => {
                let r = Pin::new(&mut **s).poll_frame(cx);
                if let Poll::Ready(None) = r {
                    // The upload is done: the try's timeout starts now.
                    sent.notify_one();
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            H2Body::Full(b) => b.is_none(),
            H2Body::Stream(s, _) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            H2Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            H2Body::Stream(s, _) => s.size_hint(),
        }
    }
}

struct Entry {
    send: SendRequest<H2Body>,
    /// Streams open on it (requests whose responses have not ended).
    streams: Rc<Cell<u32>>,
    /// Streams it has carried; at the pool's `max_requests_per_connection` it takes
    /// no more, and closes once those open end.
    served: u32,
    last_used: Instant,
    idle_timeout: Duration,
    /// From then on it takes no new stream (`max_connection_duration`), and closes
    /// once those open end.
    retire_at: Option<Instant>,
}

/// A backend's connections, and whether one is being opened.
#[derive(Default)]
struct Held {
    open: Vec<Entry>,
    /// A request is opening a connection; others that find no room wait for it
    /// rather than open their own (a burst would otherwise open one each).
    opening: Option<Rc<Pending>>,
}

/// A connection being opened, as those waiting for it see it.
#[derive(Default)]
pub struct Pending {
    notify: Notify,
    failed: Cell<bool>,
}

impl Pending {
    /// Waits for the connect to end; whether it opened a connection.
    pub async fn opened(&self) -> bool {
        self.notify.notified().await;
        !self.failed.get()
    }
}

/// What a request finds for its backend.
pub enum Checkout {
    /// A connection with room for a stream, and the stream's place on it.
    Open(SendRequest<H2Body>, Stream),
    /// One is being opened: wait on this, then look again.
    Wait(Rc<Pending>),
    /// None has room: this request opens one, and tells the waiters through the guard.
    Connect(Opening),
}

/// One open stream on a connection, counted while it lives (until the response ends
/// or fails), so a full connection is not given more.
pub struct Stream(Rc<Cell<u32>>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

fn stream_on(e: &mut Entry) -> (SendRequest<H2Body>, Stream) {
    e.streams.set(e.streams.get() + 1);
    e.served = e.served.saturating_add(1);
    e.last_used = crate::clock::now();
    (e.send.clone(), Stream(e.streams.clone()))
}

/// One worker's HTTP/2 connections to backends, by backend id.
#[derive(Default)]
pub struct H2Conns {
    conns: RefCell<HashMap<u64, Held, foldhash::fast::FixedState>>,
}

impl H2Conns {
    /// A connection to `backend` with fewer than `max_streams` streams open (the
    /// first such, so traffic packs onto few connections and the rest idle out),
    /// or who is to open one. A connection that has carried `max_requests` streams,
    /// or reached its `retire_at`, is let go: hyper closes it once the streams still
    /// open on it end.
    pub fn checkout(self: &Rc<Self>, backend: u64, max_streams: u32, max_requests: u32) -> Checkout {
        let mut conns = self.conns.borrow_mut();
        let held = conns.entry(backend).or_default();
        let now = crate::clock::now();
        held.open
            .retain(|e| !e.send.is_closed() && e.served < max_requests && e.retire_at.is_none_or(|at| now < at));
        if let Some(e) = held.open.iter_mut().find(|e| e.streams.get() < max_streams) {
            let (send, stream) = stream_on(e);
            return Checkout::Open(send, stream);
        }
        if let Some(n) = &held.opening {
            return Checkout::Wait(n.clone());
        }
        let pending = Rc::new(Pending::default());
        held.opening = Some(pending.clone());
        Checkout::Connect(Opening {
            conns: self.clone(),
            backend,
            pending,
            done: false,
        })
    }

    /// Lets go of connections unused for their pool's `idle_timeout`, and of closed
    /// ones (hyper closes a connection once no handle is left and its streams end).
    pub fn sweep(&self) {
        let now = Instant::now();
        self.conns.borrow_mut().retain(|_, held| {
            held.open
                .retain(|e| !e.send.is_closed() && now.saturating_duration_since(e.last_used) < e.idle_timeout);
            !held.open.is_empty() || held.opening.is_some()
        });
    }

    pub fn clear(&self) {
        self.conns.borrow_mut().clear();
    }
}

/// The right to open a connection to a backend. Dropped without `opened` (the
/// connect failed, or the request went away), it clears the way and wakes the
/// waiters.
pub struct Opening {
    conns: Rc<H2Conns>,
    backend: u64,
    pending: Rc<Pending>,
    done: bool,
}

impl Opening {
    /// Keeps `send` as one of the backend's connections, with this request's stream
    /// on it.
    /// `max_age`: how long it may take new streams.
    pub fn opened(mut self, send: SendRequest<H2Body>, idle_timeout: Duration, max_age: Option<Duration>) -> Stream {
        let now = crate::clock::now();
        let mut entry = Entry {
            send,
            streams: Rc::new(Cell::new(0)),
            served: 0,
            last_used: now,
            idle_timeout,
            retire_at: max_age.and_then(|d| now.checked_add(d)),
        };
        let (_, stream) = stream_on(&mut entry);
        let mut conns = self.conns.conns.borrow_mut();
        let held = conns.entry(self.backend).or_default();
        held.open.push(entry);
        held.opening = None;
        self.done = true;
        self.pending.notify.notify_waiters();
        stream
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut conns = self.conns.conns.borrow_mut();
        if let Some(held) = conns.get_mut(&self.backend) {
            if held.opening.as_ref().is_some_and(|p| Rc::ptr_eq(p, &self.pending)) {
                held.opening = None;
            }
        }
        self.pending.failed.set(true);
        self.pending.notify.notify_waiters();
    }
}

/// Runs hyper's connection and stream tasks on the worker's thread.
#[derive(Clone, Copy)]
struct LocalSpawn;

impl<F: Future + 'static> hyper::rt::Executor<F> for LocalSpawn {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(crate::clock::Polled::new(fut));
    }
}

/// Opens an HTTP/2 connection to `addr` (TLS first for a pool that has it) within
/// `timeout`. Its task holds `slot`, the pool's connection breaker slot, for the
/// connection's life.
pub async fn connect(
    addr: SocketAddr,
    tls: Option<(&BackendTls, &ServerName<'static>)>,
    timeout: Duration,
    slot: Slot,
) -> Result<SendRequest<H2Body>, ProxyError> {
    // Over TLS, ALPN offers `h2` alone, so a server that chose anything chose it. One
    // that ignores ALPN gets HTTP/2 all the same, as Envoy and HAProxy send it to a
    // backend configured for it.
    let io = crate::backend_tls::connect(addr, tls, timeout).await?;
    let handshake = hyper::client::conn::http2::Builder::new(LocalSpawn)
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .handshake(TokioIo::new(io));
    let (send, conn) = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            return Err(ProxyError::UpstreamClosed {
                backend: addr,
                source: io::Error::other(e),
            })
        }
        Err(_) => return Err(ProxyError::ConnectTimeout { backend: addr }),
    };
    metrics::counter!(crate::metrics::UPSTREAM_CONNECTS).increment(1);
    tokio::task::spawn_local(crate::clock::Polled::new(async move {
        let _slot = slot;
        if let Err(e) = conn.await {
            tracing::debug!(backend = %addr, error = %e, "HTTP/2 backend connection ended");
        }
    }));
    Ok(send)
}

/// The HTTP/2 request for `head`: its fields (the client's, as written or as a map,
/// then rampart's own), `Host` as `:authority`, and `te: trailers`, which gRPC
/// servers require and which says truly that rampart passes trailers on. The fields
/// HTTP/2 forbids (RFC 9113 §8.2.2) are not removed here: rampart's request rewrite
/// drops the hop-by-hop ones, and hyper's HTTP/2 client strips any left as it sends.
pub fn request(head: &UpHead, body: H2Body, backend: SocketAddr, tls: bool) -> Request<H2Body> {
    let mut headers = match &head.raw {
        Some(raw) => {
            let mut map = crate::rawfields::block_map(raw);
            map.extend(head.headers.clone());
            map
        }
        None => head.headers.clone(),
    };
    for (name, value) in head.added.iter() {
        headers.append(HeaderName::from_static(name), value.clone());
    }
    let host = headers.remove(header::HOST).or_else(|| head.added.host.clone());
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    let authority = host
        .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
        .or_else(|| http::uri::Authority::try_from(backend.to_string()).ok());
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(if tls {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    });
    parts.authority = authority;
    parts.path_and_query = head.uri.path_and_query().cloned();
    let uri = Uri::from_parts(parts).unwrap_or_else(|_| head.uri.clone());
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = http::Version::HTTP_2;
    *req.headers_mut() = headers;
    req
}

/// The body for one try: buffered bytes are shared, a stream is handed over.
pub fn take_body(body: &mut ReqBody) -> (H2Body, Option<Rc<Notify>>) {
    match body {
        ReqBody::Buffered(b) => (H2Body::Full(b.clone()), None),
        ReqBody::Stream(_) => {
            let ReqBody::Stream(s) = std::mem::replace(body, ReqBody::empty()) else {
                unreachable!("matched above")
            };
            let sent = Rc::new(Notify::new());
            (H2Body::Stream(s, sent.clone()), Some(sent))
        }
    }
}

/// How a stream failed, for the retry logic.
pub enum Failure {
    /// The client's body failed: the client's error, not the backend's.
    Client(ProxyError),
    /// The backend cannot have processed the request.
    Unprocessed(ProxyError),
    /// It may have.
    Failed(ProxyError),
}

/// Sorts a failed stream's error.
pub fn classify(e: hyper::Error, backend: SocketAddr) -> Failure {
    let mut source = e.source();
    while let Some(s) = source {
        // hyper holds the body's error by reference only.
        if let Some(body) = s.downcast_ref::<ReqBodyError>() {
            return Failure::Client(body.to_proxy_error());
        }
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            if h2e.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return Failure::Unprocessed(ProxyError::StreamRefused { backend });
            }
            // The backend's GOAWAY named a last stream below this one (a graceful
            // stop crossing the request): by RFC 9113 §6.8 it was not processed.
            // h2 gives a stream this error for nothing else (a connection that
            // then drops gives a broken pipe), and it is no evidence against the
            // backend: a deploy, not a failure.
            if h2e.is_go_away() && h2e.is_remote() {
                return Failure::Unprocessed(ProxyError::NotReceived { backend });
            }
        }
        source = s.source();
    }
    Failure::Failed(ProxyError::UpstreamClosed {
        backend,
        source: io::Error::other(e),
    })
}
