//! Retry policy: which failures are safe to retry, on which methods, how many tries, and
//! the body replay limit. A retry always goes to a *different* backend.
//!
//! - Any method: connect failures and requests never written (a pooled connection the
//!   backend had closed). Neither reached the application, and the body is untouched.
//! - Idempotent methods only: resets, response timeouts and 502/503/504, because the
//!   application may have seen the request. The body must be replayable: empty, or
//!   buffered up front when it is no larger than `MAX_REPLAY_BYTES`.
//!
//! This module owns the decision; `proxy::forward` owns the loop.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;

use crate::body::ReqBody;
use crate::config::PoolConfig;
use crate::error::ProxyError;
use crate::state::Pool;

/// Bodies up to this size are buffered so an idempotent request can be replayed.
pub const MAX_REPLAY_BYTES: u64 = 64 * 1024;
/// Tries per request, the first included (Envoy and HAProxy default to a few).
pub const MAX_TRIES: usize = 3;
/// Retries of never-written requests on stale pooled connections.
const MAX_STALE_RETRIES: u8 = 2;

pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Chooses how the body travels: replayable bytes when it is empty or small and the
/// request may be retried after it was sent, otherwise a stream.
pub async fn prepare_body(
    mut incoming: Incoming,
    content_length: Option<u64>,
    limit: Option<u64>,
    idempotent: bool,
    _pool: &PoolConfig,
) -> Result<ReqBody, ProxyError> {
    if incoming.is_end_stream() {
        return Ok(ReqBody::empty());
    }
    if idempotent {
        if let Some(len) = content_length.filter(|&l| l <= MAX_REPLAY_BYTES) {
            let cap = limit.map_or(len, |l| l.min(len)) as usize;
            if let Some(bytes) = crate::proxy::collect_limited(&mut incoming, cap).await? {
                return Ok(ReqBody::Buffered(Some(bytes)));
            }
            return Err(ProxyError::BadRequest("request body longer than its Content-Length"));
        }
    }
    Ok(ReqBody::Stream {
        inner: incoming,
        limit,
        seen: 0,
    })
}

/// What a replay needs: the request head and its buffered body.
struct Template {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Option<Bytes>,
}

/// The state of one request's tries.
pub struct Attempts {
    tried: Vec<usize>,
    last: Option<ProxyError>,
    template: Option<Template>,
    idempotent: bool,
    max_tries: usize,
    stale_left: u8,
}

impl Attempts {
    pub fn new(pool: &Pool, req: &Request<ReqBody>) -> Attempts {
        let idempotent = is_idempotent(req.method());
        let max_tries = MAX_TRIES.min(pool.backends.len());
        let template = match req.body() {
            ReqBody::Buffered(b) if idempotent && max_tries > 1 => Some(Template {
                method: req.method().clone(),
                uri: req.uri().clone(),
                headers: req.headers().clone(),
                body: b.clone(),
            }),
            _ => None,
        };
        Attempts {
            tried: Vec::new(),
            last: None,
            template,
            idempotent,
            max_tries,
            stale_left: MAX_STALE_RETRIES,
        }
    }

    pub fn tried(&self) -> &[usize] {
        &self.tried
    }

    /// A fresh copy of the request for another try, when it can be replayed.
    pub fn replay(&self) -> Option<Request<ReqBody>> {
        let t = self.template.as_ref()?;
        let mut r = Request::new(ReqBody::Buffered(t.body.clone()));
        *r.method_mut() = t.method.clone();
        *r.uri_mut() = t.uri.clone();
        *r.version_mut() = Version::HTTP_11;
        *r.headers_mut() = t.headers.clone();
        Some(r)
    }

    /// A never-written request on a stale pooled connection: try again, not counted
    /// as a failure of the backend.
    pub fn stale_retry(&mut self) -> bool {
        if self.stale_left == 0 {
            return false;
        }
        self.stale_left -= 1;
        true
    }

    /// Records a failed try on backend `bi`. Returns whether another try is allowed;
    /// `have_request` says the original request is still in hand (not yet written).
    pub fn failed(&mut self, bi: usize, err: ProxyError, have_request: bool) -> bool {
        self.tried.push(bi);
        let safe = if err.is_retryable_any_method() {
            have_request || self.template.is_some()
        } else {
            self.idempotent && err.is_retryable_idempotent() && self.template.is_some()
        };
        let again = safe && self.tried.len() < self.max_tries;
        if again {
            tracing::warn!(backend = %backend_of(&err), error = %err, "attempt failed; retrying on another backend");
        }
        self.last = Some(err);
        again
    }

    /// A 502/503/504 from backend `bi`: retry on another backend when the request can
    /// be replayed; otherwise the client gets the backend's own response.
    pub fn should_retry_status(&mut self, bi: usize, err: ProxyError) -> bool {
        if !(self.idempotent && self.template.is_some() && self.tried.len() + 1 < self.max_tries) {
            return false;
        }
        self.failed(bi, err, false)
    }

    pub fn into_error(self, pool: &Pool) -> ProxyError {
        self.last.unwrap_or_else(|| ProxyError::NoHealthyBackend {
            pool: pool.name.clone(),
        })
    }
}

fn backend_of(e: &ProxyError) -> String {
    match e {
        ProxyError::Connect { backend, .. }
        | ProxyError::ConnectTimeout { backend }
        | ProxyError::ResponseTimeout { backend }
        | ProxyError::UpstreamClosed { backend, .. }
        | ProxyError::BadResponse { backend, .. }
        | ProxyError::BadStatus { backend, .. } => backend.to_string(),
        _ => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods_follow_rfc_9110() {
        for m in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE, Method::OPTIONS] {
            assert!(is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH] {
            assert!(!is_idempotent(&m), "{m}");
        }
    }
}
