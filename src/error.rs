//! `ProxyError`: every way a proxied request can fail, mapped to exactly one status code
//! in one place ([`ProxyError::status`]), with which side failed and whether a retry on
//! another backend is safe. Also builds the small error pages (custom per status when
//! the config names a file). Startup failures are `StartupError`; config problems are
//! `config::ConfigError`.

use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::config::ErrorPage;

/// Which side of the proxy a failure belongs to, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    Internal,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
        }
    }
}

/// A route's `return`, made for one request.
#[derive(Debug)]
pub struct DirectAnswer {
    pub status: StatusCode,
    pub location: Option<HeaderValue>,
    pub body: bytes::Bytes,
    pub content_type: Option<HeaderValue>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this host and path")]
    NoRoute,
    /// The route's `allow`/`deny` refused the client's address.
    #[error("the route does not admit this client's address")]
    Forbidden,
    /// The route's `basic_auth` found no valid user and password: 401 with this
    /// `WWW-Authenticate` challenge.
    #[error("no valid credentials for the route's basic_auth")]
    Unauthorized(HeaderValue),
    /// Not a failure: a plain-HTTP request to an `https_redirect` route, answered
    /// with a redirect to this location (`proxy::redirect_response`), not an error page.
    #[error("redirected to {0:?}")]
    HttpsRedirect(HeaderValue),
    /// Not a failure either: a route with `return` answered (`proxy::direct`).
    #[error("answered by the route's return: {}", .0.status)]
    Direct(Box<DirectAnswer>),
    #[error("no healthy backend in pool '{pool}'")]
    NoHealthyBackend { pool: String },
    #[error("connect to {backend} failed: {source}")]
    Connect {
        backend: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connect to {backend} timed out")]
    ConnectTimeout { backend: SocketAddr },
    /// The TLS handshake with a backend of a pool with a `tls` table failed: an
    /// untrusted or expired certificate, a name mismatch, no common version.
    #[error("TLS handshake with {backend} failed: {source}")]
    BackendTls {
        backend: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{backend} sent no response headers within the response timeout")]
    ResponseTimeout { backend: SocketAddr },
    #[error("{backend} closed or reset the connection before a response: {source}")]
    UpstreamClosed {
        backend: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The keep-alive race: the backend closed the connection with the request unread
    /// and nothing sent for it (`upstream::Conn::send`). No application saw the request.
    #[error("{backend} closed the connection before receiving any of the request")]
    NotReceived { backend: SocketAddr },
    /// The backend reset the connection with the request in flight and nothing sent
    /// for it, and its listener was then gone (`upstream::Conn::exited`): its process
    /// exited, and the kernel reset the connection because the request was still
    /// unread. No application saw the request.
    #[error("{backend} reset the connection with the request unread, and its listener is gone (its process exited)")]
    ExitedUnread { backend: SocketAddr },
    /// An HTTP/2 backend refused the stream (`REFUSED_STREAM`): by RFC 9113 §8.7 it
    /// did not process the request.
    #[error("{backend} refused the HTTP/2 stream (REFUSED_STREAM) without processing the request")]
    StreamRefused { backend: SocketAddr },
    #[error("invalid response from {backend}: {reason}")]
    BadResponse { backend: SocketAddr, reason: &'static str },
    #[error("{backend} answered {status}")]
    BadStatus { backend: SocketAddr, status: u16 },
    #[error("circuit breaker open for pool '{pool}': {limit}")]
    CircuitOpen { pool: String, limit: &'static str },
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("request target exceeds {limit} bytes")]
    UriTooLong { limit: usize },
    #[error("request headers exceed {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    /// A request rampart cannot forward faithfully, e.g. a transfer coding besides
    /// `chunked`: 501, as nginx and Envoy answer (RFC 9112 §6.1).
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    #[error("client closed or failed while sending the request body: {0}")]
    ClientBody(hyper::Error),
    /// The client sent no request body bytes for `client_body_timeout`.
    #[error("client sent no request body bytes for {0:?}")]
    ClientBodyTimeout(std::time::Duration),
    #[error("server is shutting down")]
    ShuttingDown,
    /// The route's `rate_limit` refused the client; it may try again after this long.
    #[error("rate limit: the client may send again in {retry_after:?}")]
    RateLimited { retry_after: std::time::Duration },
    /// The route's `in_flight_limit`: the client already has this many requests open.
    #[error("in-flight limit: the client already has {max} requests in flight on the route")]
    TooManyInFlight { max: u32 },
}

impl ProxyError {
    /// The one place a failure becomes a status code.
    pub fn status(&self) -> StatusCode {
        use ProxyError::*;
        match self {
            NoRoute => StatusCode::NOT_FOUND,
            Forbidden => StatusCode::FORBIDDEN,
            Unauthorized(_) => StatusCode::UNAUTHORIZED,
            HttpsRedirect(_) => StatusCode::MOVED_PERMANENTLY,
            Direct(d) => d.status,
            // Also `NotReceived`: like a refused connect, no application saw the
            // request, and a 503 with `Retry-After` tells the client a retry is safe.
            NoHealthyBackend { .. }
            | Connect { .. }
            | ConnectTimeout { .. }
            | NotReceived { .. }
            | ExitedUnread { .. }
            | StreamRefused { .. }
            | CircuitOpen { .. }
            | ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ResponseTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            // A backend that cannot prove who it is: the gateway's fault, as nginx
            // answers it.
            UpstreamClosed { .. } | BadResponse { .. } | BackendTls { .. } => StatusCode::BAD_GATEWAY,
            BadStatus { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY),
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            BadRequest(_) | ClientBody(_) => StatusCode::BAD_REQUEST,
            NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ClientBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            RateLimited { .. } | TooManyInFlight { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn side(&self) -> Side {
        use ProxyError::*;
        match self {
            NoRoute
            | Forbidden
            | Unauthorized(_)
            | HttpsRedirect(_)
            | Direct(_)
            | BodyTooLarge { .. }
            | UriTooLong { .. }
            | HeadersTooLarge { .. }
            | BadRequest(_)
            | NotImplemented(_)
            | ClientBody(_)
            | ClientBodyTimeout(_)
            | RateLimited { .. }
            | TooManyInFlight { .. } => Side::Client,
            NoHealthyBackend { .. } | CircuitOpen { .. } | ShuttingDown => Side::Internal,
            Connect { .. }
            | ConnectTimeout { .. }
            | BackendTls { .. }
            | ResponseTimeout { .. }
            | UpstreamClosed { .. }
            | NotReceived { .. }
            | ExitedUnread { .. }
            | StreamRefused { .. }
            | BadResponse { .. }
            | BadStatus { .. } => Side::Upstream,
        }
    }

    /// The failure never reached the application, so any method may go to another backend.
    pub fn is_retryable_any_method(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. } | ProxyError::BackendTls { .. }
        ) || self.never_read()
    }

    /// The request was written but provably never read: the kept copy may be resent,
    /// whatever the method, as if it had never been written.
    pub fn never_read(&self) -> bool {
        matches!(
            self,
            ProxyError::NotReceived { .. } | ProxyError::ExitedUnread { .. } | ProxyError::StreamRefused { .. }
        )
    }

    /// The application may have seen the request; only idempotent methods may be retried.
    pub fn is_retryable_idempotent(&self) -> bool {
        self.is_retryable_any_method()
            || matches!(
                self,
                ProxyError::ResponseTimeout { .. }
                    | ProxyError::UpstreamClosed { .. }
                    | ProxyError::BadResponse { .. }
                    | ProxyError::BadStatus { .. }
            )
    }

    /// Counts against the backend for passive health (outlier ejection). Losing the
    /// keep-alive race is not the backend failing: servers close idle connections on
    /// their own timers (Node.js after 5 s), and a backend that is going away shows
    /// up as refused connections right after.
    pub fn is_backend_failure(&self) -> bool {
        self.side() == Side::Upstream && !matches!(self, ProxyError::NotReceived { .. })
    }

    /// The backend the failure happened on, when there was one.
    pub fn backend(&self) -> Option<SocketAddr> {
        use ProxyError::*;
        match self {
            Connect { backend, .. }
            | ConnectTimeout { backend }
            | BackendTls { backend, .. }
            | ResponseTimeout { backend }
            | UpstreamClosed { backend, .. }
            | NotReceived { backend }
            | ExitedUnread { backend }
            | StreamRefused { backend }
            | BadResponse { backend, .. }
            | BadStatus { backend, .. } => Some(*backend),
            _ => None,
        }
    }

    /// A short label for metrics and access logs.
    pub fn kind(&self) -> &'static str {
        use ProxyError::*;
        match self {
            NoRoute => "no_route",
            Forbidden => "forbidden",
            Unauthorized(_) => "unauthorized",
            HttpsRedirect(_) => "https_redirect",
            Direct(_) => "return",
            NoHealthyBackend { .. } => "no_healthy_backend",
            Connect { .. } => "connect_failed",
            ConnectTimeout { .. } => "connect_timeout",
            BackendTls { .. } => "backend_tls",
            ResponseTimeout { .. } => "response_timeout",
            UpstreamClosed { .. } => "upstream_closed",
            NotReceived { .. } => "upstream_closed_unread",
            ExitedUnread { .. } => "upstream_exited_unread",
            StreamRefused { .. } => "stream_refused",
            BadResponse { .. } => "bad_response",
            BadStatus { .. } => "bad_status",
            CircuitOpen { .. } => "circuit_open",
            BodyTooLarge { .. } => "body_too_large",
            UriTooLong { .. } => "uri_too_long",
            HeadersTooLarge { .. } => "headers_too_large",
            BadRequest(_) => "bad_request",
            NotImplemented(_) => "not_implemented",
            ClientBody(_) => "client_body",
            ClientBodyTimeout(_) => "client_body_timeout",
            ShuttingDown => "shutting_down",
            RateLimited { .. } => "rate_limited",
            TooManyInFlight { .. } => "in_flight_limited",
        }
    }

    /// Whether the client connection should close after the error page.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::BodyTooLarge { .. }
                | ProxyError::ClientBody(_)
                | ProxyError::ClientBodyTimeout(_)
                | ProxyError::BadRequest(_)
                | ProxyError::NotImplemented(_)
                | ProxyError::ShuttingDown
        )
    }
}

/// Seconds a client should wait before retrying a 503; short, because ejection and
/// health checks restore capacity within seconds.
pub const RETRY_AFTER_SECS: HeaderValue = HeaderValue::from_static("1");

/// A custom page's body: `{request_id}` in it is replaced (the page is read at load
/// time).
fn page_body(page: &ErrorPage, id: &str) -> Bytes {
    let text = String::from_utf8_lossy(&page.body);
    if text.contains("{request_id}") {
        Bytes::from(text.replace("{request_id}", id))
    } else {
        page.body.clone()
    }
}

/// A page of rampart's own with `status`: its body, content type and
/// `Cache-Control: no-store` (an error page must not be cached as the resource).
fn page_response<B: From<Bytes>>(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<B> {
    let mut resp = Response::new(B::from(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A backend's response with its body replaced by the route's error page for its
/// status (`intercept_errors`, as nginx's `proxy_intercept_errors`): the status stays;
/// of the backend's fields only those a client needs to act on the status stay
/// (`Retry-After`, `WWW-Authenticate`, `Allow`), so no stack trace, server banner or
/// cookie of a failing backend reaches the client. The backend's body is dropped.
#[cold]
pub fn intercepted<B: From<Bytes>>(backend: Response<B>, page: &ErrorPage, request_id: &HeaderValue) -> Response<B> {
    let id = request_id.to_str().unwrap_or("-");
    let (parts, _) = backend.into_parts();
    let mut resp = page_response(parts.status, page.content_type, page_body(page, id));
    let h = resp.headers_mut();
    for name in [header::RETRY_AFTER, header::WWW_AUTHENTICATE, header::ALLOW] {
        for v in parts.headers.get_all(&name) {
            h.append(name.clone(), v.clone());
        }
    }
    resp
}

/// Builds the error response: a custom page when configured, otherwise a small text page.
/// Both carry the request id, in the body and in `x-request-id`.
pub fn error_response<B: From<Bytes>>(
    err: &ProxyError,
    request_id: &HeaderValue,
    custom: Option<&ErrorPage>,
) -> Response<B> {
    let status = err.status();
    let id = request_id.to_str().unwrap_or("-");
    let (content_type, body) = match custom {
        Some(page) => (page.content_type, page_body(page, id)),
        None => (
            "text/plain; charset=utf-8",
            Bytes::from(format!(
                "{} {}\nrequest-id: {}\n",
                status.as_u16(),
                status.canonical_reason().unwrap_or(""),
                id
            )),
        ),
    };
    let mut resp = page_response(status, content_type, body);
    let h = resp.headers_mut();
    h.insert(crate::proxy::X_REQUEST_ID, request_id.clone());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        h.insert(header::RETRY_AFTER, RETRY_AFTER_SECS);
    }
    if let ProxyError::RateLimited { retry_after } = err {
        // Whole seconds (RFC 9110 §10.2.3), rounded up, so a client that waits that
        // long is admitted.
        let secs = retry_after.as_micros().div_ceil(1_000_000).max(1);
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
    }
    if let ProxyError::Unauthorized(challenge) = err {
        h.insert(header::WWW_AUTHENTICATE, challenge.clone());
    }
    if err.closes_connection() {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Failures that stop rampart from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start worker thread: {0}")]
    Thread(#[source] io::Error),
    #[error("cannot build runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("server.access_log: cannot open {path}: {source}")]
    AccessLog {
        path: String,
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_its_documented_status() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let cases = [
            (ProxyError::NoRoute, 404),
            (ProxyError::Forbidden, 403),
            (ProxyError::Unauthorized(HeaderValue::from_static("Basic")), 401),
            (ProxyError::NoHealthyBackend { pool: "p".into() }, 503),
            (
                ProxyError::Connect {
                    backend: addr,
                    source: io::ErrorKind::ConnectionRefused.into(),
                },
                503,
            ),
            (ProxyError::ConnectTimeout { backend: addr }, 503),
            (ProxyError::ResponseTimeout { backend: addr }, 504),
            (ProxyError::NotReceived { backend: addr }, 503),
            (ProxyError::StreamRefused { backend: addr }, 503),
            (
                ProxyError::CircuitOpen {
                    pool: "p".into(),
                    limit: "max_requests",
                },
                503,
            ),
            (ProxyError::BodyTooLarge { limit: 1 }, 413),
            (ProxyError::UriTooLong { limit: 1 }, 414),
            (ProxyError::HeadersTooLarge { limit: 1 }, 431),
            (ProxyError::BadRequest("x"), 400),
            (ProxyError::NotImplemented("x"), 501),
            (ProxyError::ClientBodyTimeout(std::time::Duration::from_secs(1)), 408),
        ];
        for (e, status) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
        }
    }

    #[test]
    fn unavailable_pages_carry_retry_after_and_request_id() {
        let id = HeaderValue::from_static("abc123");
        let r: Response<http_body_util::Full<Bytes>> =
            error_response(&ProxyError::NoHealthyBackend { pool: "p".into() }, &id, None);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(r.headers()["x-request-id"], "abc123");
    }
}
