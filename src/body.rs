//! The body types that cross rampart, streaming unless small:
//! - `InBody`, a request's body as it arrives from the client;
//! - `ReqBody`, what we send upstream: the client's body with an optional size limit,
//!   or bytes already buffered for replay on retry.
//! - `RespBody`, what we send the client: the backend's body (`upstream::UpBody`, which
//!   returns its pooled connection when it has been read to the end), or a small
//!   generated page, either one carrying the request's access-log record when the log
//!   is on, and either one gzipped on its way when the route compresses.
//!
//! Enums rather than boxed trait objects: no allocation per request.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::breaker::Slot;
use crate::netio::Stall;
use crate::state::InFlight;
use crate::upstream::UpBody;

/// Why the request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReqBodyError {
    #[error("request body exceeds {0} bytes")]
    TooLarge(u64),
    #[error("client body: {0}")]
    Client(#[source] hyper::Error),
    /// Nothing arrived for `client_body_timeout`.
    #[error("no request body bytes for {0:?}")]
    Idle(Duration),
}

impl ReqBodyError {
    /// The request's failure, answered to the client; none of these is the backend's.
    pub fn into_proxy_error(self) -> crate::error::ProxyError {
        match self {
            ReqBodyError::Client(e) => crate::error::ProxyError::ClientBody(e),
            other => other.to_proxy_error(),
        }
    }

    /// The same from a borrowed error (hyper's HTTP/2 client keeps the body's error
    /// and lends it): the client's own I/O failure, which cannot be taken, is a
    /// plain 400.
    pub fn to_proxy_error(&self) -> crate::error::ProxyError {
        use crate::error::ProxyError;
        match self {
            ReqBodyError::TooLarge(limit) => ProxyError::BodyTooLarge { limit: *limit },
            ReqBodyError::Client(_) => ProxyError::BadRequest("the request body failed"),
            ReqBodyError::Idle(d) => ProxyError::ClientBodyTimeout(*d),
        }
    }
}

/// A request's body as the client sent it.
#[derive(Debug)]
pub enum InBody {
    /// None: no `Content-Length` (or 0) and no `Transfer-Encoding`.
    Empty,
    /// The whole body, read with the head by `h1` (it was already in the buffer).
    Full(Bytes),
    /// hyper's stream: HTTP/2, and the HTTP/1.1 requests `h1` hands to hyper.
    Incoming(Incoming),
}

/// The request body sent to a backend.
#[derive(Debug)]
pub enum ReqBody {
    /// Streams from the client, to one try only. Boxed: it is the rare kind, and
    /// every request's `UpRequest` is moved between futures a few times.
    Stream(Box<StreamBody>),
    /// Fully buffered, so every try (and hedge) sends the same bytes; `Conn::send`
    /// only borrows them. `None`: no body.
    Buffered(Option<Bytes>),
}

impl ReqBody {
    pub fn empty() -> ReqBody {
        ReqBody::Buffered(None)
    }
}

/// The client's body as it goes to one backend, not kept for a retry; `limit`
/// enforces a route's `max_body_bytes` on bodies without a (small enough)
/// `Content-Length`.
#[derive(Debug)]
pub struct StreamBody {
    inner: Source,
    limit: Option<u64>,
    seen: u64,
    /// The access log's count of the body's bytes (`$request_length`), when it has one.
    counted: Option<Rc<Cell<u64>>>,
    /// `client_body_timeout`: the longest wait for the client's next frame. Time
    /// spent waiting on the backend between frames is not the client's.
    idle: Stall,
    /// The pool's per-try timeout, for the backend's side (`upstream::Conn::send`).
    try_timeout: Duration,
}

#[derive(Debug)]
enum Source {
    Incoming(Incoming),
    /// Read whole already (`InBody::Full`), but not to be replayed.
    Once(Option<Bytes>),
}

impl StreamBody {
    pub fn new(
        inner: Incoming,
        limit: Option<u64>,
        idle: Duration,
        try_timeout: Duration,
        counted: Option<Rc<Cell<u64>>>,
    ) -> StreamBody {
        StreamBody {
            inner: Source::Incoming(inner),
            limit,
            seen: 0,
            counted,
            idle: Stall::new(idle),
            try_timeout,
        }
    }

    /// A body already in hand, sent once.
    pub fn once(bytes: Bytes, try_timeout: Duration) -> StreamBody {
        StreamBody {
            inner: Source::Once(Some(bytes).filter(|b| !b.is_empty())),
            limit: None,
            seen: 0,
            counted: None,
            idle: Stall::new(Duration::MAX),
            try_timeout,
        }
    }

    pub fn try_timeout(&self) -> Duration {
        self.try_timeout
    }
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = ReqBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ReqBodyError>>> {
        let this = self.get_mut();
        let inner = match &mut this.inner {
            Source::Incoming(i) => i,
            Source::Once(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.progressed();
                if let Some(d) = frame.data_ref() {
                    this.seen += d.len() as u64;
                    if let Some(c) = &this.counted {
                        c.set(this.seen);
                    }
                    if let Some(l) = this.limit {
                        if this.seen > l {
                            return Poll::Ready(Some(Err(ReqBodyError::TooLarge(l))));
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(ReqBodyError::Client(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending if this.idle.expired(cx) => Poll::Ready(Some(Err(ReqBodyError::Idle(this.idle.limit())))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Source::Incoming(i) => i.is_end_stream(),
            Source::Once(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Source::Incoming(i) => i.size_hint(),
            Source::Once(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// The response body sent to the client.
pub enum RespBody {
    Full(Option<Bytes>),
    Upstream {
        /// Bytes already read (while deciding whether a retry was needed), sent first.
        prefix: Option<Bytes>,
        inner: UpBody,
        /// The pool's request slot, held to the end (the backend's in-flight guard is
        /// `inner`'s).
        request_slot: Option<Slot>,
    },
    /// An HTTP/2 backend's stream (`h2up`); its trailers pass on (gRPC's status).
    /// Boxed: inline it made every response, and every future holding one, larger
    /// (+3% instructions per HTTP/1.1 request, in `memcpy`).
    H2(Box<H2Resp>),
    /// Any of the others, with the request's access-log record, which counts its bytes
    /// and writes the line when the body is dropped (`accesslog::Pending`). Only when
    /// the log is on.
    Logged(Box<crate::accesslog::Pending>),
    /// Any of the others, compressed on its way (`compress`). Boxed: rare, and large.
    Compressed(Box<crate::compress::Compressor>),
    /// Any of the others, with the request's place under its route's
    /// `in_flight_limit`, given back when the body is dropped: sent, or the client gone.
    Held(Box<Held>),
}

/// A response body and the place its request holds under `in_flight_limit`.
pub struct Held {
    pub body: RespBody,
    pub _slot: crate::inflight::InFlightSlot,
}

/// Out of line, as `H2Resp`'s: inlined (or with `RespBody`'s methods calling
/// themselves), they made those methods too large to inline into the request path
/// (+30 instructions a request, with no limit set).
impl Held {
    #[inline(never)]
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    #[inline(never)]
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    #[inline(never)]
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

pub struct H2Resp {
    pub prefix: Option<Bytes>,
    pub inner: Incoming,
    /// Trailers already read with the prefix, sent after it.
    pub trailers: Option<http::HeaderMap>,
    pub in_flight: Option<InFlight>,
    pub request_slot: Option<Slot>,
    /// `read_timeout`: the longest wait for the next frame.
    pub stall: Stall,
    /// The stream's place on its connection, given up when the body ends.
    pub stream: Option<crate::h2up::Stream>,
}

impl From<Bytes> for RespBody {
    fn from(b: Bytes) -> Self {
        RespBody::Full(Some(b))
    }
}

impl RespBody {
    pub fn empty() -> RespBody {
        RespBody::Full(None)
    }

    pub fn upstream(prefix: Option<Bytes>, inner: UpBody) -> RespBody {
        RespBody::Upstream {
            prefix: prefix.filter(|p| !p.is_empty()),
            inner,
            request_slot: None,
        }
    }

    /// rampart's HTTP/1.1 path wrote this response's head, of `n` bytes: for the
    /// access log's `$bytes_sent` (the record is outermost, when there is one).
    #[inline]
    pub fn head_written(&mut self, n: usize) {
        if let RespBody::Logged(p) = self {
            p.head_written(n);
        }
    }

    /// The same for `n` bytes of chunked framing around the body.
    #[inline]
    pub fn framing_written(&mut self, n: usize) {
        if let RespBody::Logged(p) = self {
            p.framing_written(n);
        }
    }

    /// A compressed body's bytes taken and given so far, for the access log.
    pub fn compressed_bytes(&self) -> Option<(u64, u64)> {
        match self {
            RespBody::Compressed(c) => Some(c.bytes()),
            RespBody::Held(h) => h.body.compressed_bytes(),
            _ => None,
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            RespBody::Full(b) => Poll::Ready(b.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b)))),
            RespBody::Upstream {
                prefix,
                inner,
                request_slot,
            } => {
                if let Some(p) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                let res = Pin::new(&mut *inner).poll_frame(cx);
                if let Poll::Ready(None) = res {
                    request_slot.take();
                }
                res
            }
            RespBody::H2(h2) => h2.poll_frame(cx),
            RespBody::Logged(l) => l.poll_frame(cx),
            RespBody::Compressed(z) => z.poll_frame(cx),
            RespBody::Held(h) => h.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            RespBody::Upstream { prefix, inner, .. } => prefix.is_none() && inner.is_end_stream(),
            RespBody::H2(h2) => h2.is_end_stream(),
            RespBody::Logged(l) => l.is_end_stream(),
            RespBody::Compressed(z) => z.is_end_stream(),
            RespBody::Held(h) => h.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RespBody::Upstream { prefix, inner, .. } => with_prefix(prefix, inner.size_hint()),
            RespBody::H2(h2) => h2.size_hint(),
            RespBody::Logged(l) => l.size_hint(),
            RespBody::Compressed(z) => z.size_hint(),
            RespBody::Held(h) => h.size_hint(),
        }
    }
}

/// Out of line, so the HTTP/1.1 arms of `RespBody`'s methods stay small enough to be
/// inlined into the request path (inline, this arm cost it 50 instructions a request).
impl H2Resp {
    #[inline(never)]
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        let res = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending if self.stall.expired(cx) => {
                let limit = self.stall.limit();
                Some(Err(crate::upstream::stalled_body(limit)))
            }
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(f)) => {
                self.stall.progressed();
                Some(f.map_err(io::Error::other))
            }
            Poll::Ready(None) => self.trailers.take().map(|t| Ok(Frame::trailers(t))),
        };
        match &res {
            None => {
                if let Some(f) = self.in_flight.take() {
                    f.succeeded();
                }
                self.request_slot.take();
                self.stream.take();
            }
            Some(Err(e)) => {
                if let Some(f) = self.in_flight.take() {
                    f.body_failed(e);
                }
            }
            Some(Ok(_)) => {}
        }
        Poll::Ready(res)
    }

    #[inline(never)]
    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.trailers.is_none() && self.inner.is_end_stream()
    }

    #[inline(never)]
    fn size_hint(&self) -> SizeHint {
        with_prefix(&self.prefix, self.inner.size_hint())
    }
}

/// A stream dropped at its end without a last poll (a server may not poll a body
/// that says it has ended) still ended whole.
impl Drop for H2Resp {
    fn drop(&mut self) {
        if self.in_flight.is_some() && self.is_end_stream() {
            if let Some(f) = self.in_flight.take() {
                f.succeeded();
            }
        }
    }
}

/// A body's size hint with `prefix` sent before it.
fn with_prefix(prefix: &Option<Bytes>, h: SizeHint) -> SizeHint {
    let p = prefix.as_ref().map_or(0, |p| p.len() as u64);
    let mut out = SizeHint::new();
    out.set_lower(h.lower() + p);
    if let Some(u) = h.upper() {
        out.set_upper(u + p);
    }
    out
}
