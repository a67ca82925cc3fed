//! The two body types that cross rampart, both streaming (never buffered whole):
//! - `ReqBody`, what we send upstream: the client's body with an optional size limit,
//!   or bytes already buffered for replay on retry.
//! - `RespBody`, what we send the client: the backend's body, which returns its pooled
//!   connection when it has been read to the end, or a small generated page.
//!
//! Enums rather than boxed trait objects: no allocation per request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::state::InFlight;
use crate::upstream::Release;

/// Why the request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReqBodyError {
    #[error("request body exceeds {0} bytes")]
    TooLarge(u64),
    #[error("client body: {0}")]
    Client(#[source] hyper::Error),
}

/// The request body sent to a backend.
#[derive(Debug)]
pub enum ReqBody {
    /// Streams from the client; `limit` enforces a route's `max_body_bytes`.
    Stream {
        inner: Incoming,
        limit: Option<u64>,
        seen: u64,
    },
    /// Fully buffered (for replay on retry). `None` once sent.
    Buffered(Option<Bytes>),
}

impl ReqBody {
    pub fn empty() -> ReqBody {
        ReqBody::Buffered(None)
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = ReqBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ReqBodyError>>> {
        match self.get_mut() {
            ReqBody::Buffered(b) => Poll::Ready(b.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b)))),
            ReqBody::Stream { inner, limit, seen } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        *seen += d.len() as u64;
                        if let Some(l) = *limit {
                            if *seen > l {
                                return Poll::Ready(Some(Err(ReqBodyError::TooLarge(l))));
                            }
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(ReqBodyError::Client(e)))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Buffered(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            ReqBody::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Buffered(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ReqBody::Stream { inner, .. } => inner.size_hint(),
        }
    }
}

/// The response body sent to the client.
pub enum RespBody {
    Full(Option<Bytes>),
    Upstream {
        inner: Incoming,
        /// Returns the connection to the worker's pool once the body is fully read.
        release: Option<Release>,
        _in_flight: Option<InFlight>,
    },
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

    pub fn upstream(inner: Incoming, release: Release, in_flight: InFlight) -> RespBody {
        RespBody::Upstream {
            inner,
            release: Some(release),
            _in_flight: Some(in_flight),
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RespBody::Full(b) => Poll::Ready(b.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b)))),
            RespBody::Upstream {
                inner,
                release,
                _in_flight,
            } => {
                let res = Pin::new(&mut *inner).poll_frame(cx);
                if let Poll::Ready(None) = res {
                    if let Some(r) = release.take() {
                        r.reuse();
                    }
                    _in_flight.take();
                }
                res
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            RespBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RespBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        // hyper may stop polling once `is_end_stream` is true, so a fully read body is
        // also released here. A body dropped half-read leaves the connection in an
        // unknown state: `Release` is dropped and the connection closes.
        if let RespBody::Upstream { inner, release, .. } = self {
            if inner.is_end_stream() {
                if let Some(r) = release.take() {
                    r.reuse();
                }
            }
        }
    }
}
