//! rampart's own HTTP/1.1 server for the common request: no body, or a small body
//! that arrived whole with its head (`Content-Length`), and no upgrade or `Expect`.
//! It parses the head with httparse, runs `proxy::handle`, and writes the response
//! head and body itself.
//!
//! hyper's server side was about 31% of the instructions rampart spends on such a
//! request (callgrind): its dispatcher, a fresh 8 KiB read buffer per request, and
//! its encoder's buffering. This path reads into one per-connection buffer, copies
//! just the head out of it, and writes head and body with one `writev`.
//!
//! Everything else goes to hyper (`Ended::Hyper` hands over the socket with the bytes
//! read so far): bodies still arriving, `Transfer-Encoding`, `Expect`, upgrades, absolute-form
//! targets, `CONNECT`, and every malformed or oversized head, so hyper keeps answering
//! those with its 400/414/431. The connection comes back here once hyper's busy
//! period parks (`listener::serve_h1`).
//!
//! Semantics follow hyper's server, so a client cannot tell the two apart: HTTP/1.0
//! keep-alive only when asked (`Connection: keep-alive` echoed), `Connection: close`
//! on the last response of a draining worker, `Date` added when the backend sent
//! none, `Content-Length` from the body's exact size or the response's field, else
//! chunked (HTTP/1.1) or close-delimited (HTTP/1.0); no body for `HEAD`, 204 and 304;
//! a client that closes while its request is in flight cancels it.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::{InBody, RespBody};
use crate::codec;
use crate::idle::{Lifetime, PARK_AFTER};
use crate::listener::ConnTracker;
use crate::netio::write_all;
use crate::proxy::{self, Answer, ConnInfo};
use crate::rawfields::{self, RawFields, RawRequest};
use crate::worker::WorkerCtx;

/// Header fields the fast path parses on the stack; a request with more goes to hyper,
/// which applies `max_headers` itself.
const MAX_FAST_HEADERS: usize = 100;
/// Initial read space; a head that needs more grows the buffer up to `Limits::max_buf`.
const READ_CHUNK: usize = 4096;

/// How a fast-path busy period ended.
pub enum Ended {
    /// Keep-alive, nothing buffered, and no new byte for `PARK_AFTER`.
    Idle(TcpStream),
    /// A request this path does not serve: hyper takes over with these bytes.
    Hyper(TcpStream, Bytes),
    /// The connection is done (closed, failed, timed out, or the worker stops).
    Closed,
}

/// The limits the fast path needs from `[server]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_headers: usize,
    /// The longest head the fast path waits for; hyper answers past it.
    pub max_buf: usize,
    pub header_timeout: Duration,
    /// `send_timeout`: the longest the client may take no response bytes.
    pub send_timeout: Duration,
}

/// What the head says about the connection, beyond the request itself.
struct HeadFacts {
    keep_alive: bool,
    version: Version,
    head_request: bool,
}

// Returned once per request and unpacked at once: boxing the large variant would
// cost an allocation per request to save a copy of ~280 bytes.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Partial,
    /// The request (its map empty when its fields come as written), those fields,
    /// what the response needs to know, and the bytes it took.
    Request(Request<InBody>, Option<RawRequest>, HeadFacts, usize),
    Hyper,
}

/// Serves requests on `stream` until it idles, needs hyper, or ends. `replay` holds
/// bytes already read from the client (a pipelined request hyper left unparsed).
pub async fn serve(
    ctx: &Rc<WorkerCtx>,
    info: &Rc<ConnInfo>,
    life: &Lifetime,
    limits: Limits,
    tracker: &ConnTracker,
    mut stream: TcpStream,
    replay: Bytes,
) -> Ended {
    let mut rbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK.max(replay.len()));
    rbuf.extend_from_slice(&replay);
    let mut out: Vec<u8> = Vec::with_capacity(512);
    let mut scratch: Vec<[u32; 4]> = Vec::new();
    // The caller saw the first byte of a request, or holds replayed bytes. When a
    // head began only matters once it is seen to be incomplete, so the clock is read
    // then, not for every request.
    let mut idle_since = crate::clock::tokio_now();
    let mut head_started: Option<Instant> = None;
    let timer = tokio::time::sleep_until(idle_since + limits.header_timeout);
    tokio::pin!(timer);
    // Registered once for the busy period, not once per wait. A stopping worker
    // answers the next request with `Connection: close` (below) and closes the
    // connection only if none comes before it closes idle ones.
    let idle_closed = tracker.idle_closed();
    tokio::pin!(idle_closed);
    loop {
        // 1. A complete request head.
        let (req, raw, facts) = loop {
            if !rbuf.is_empty() {
                match parse(&rbuf, limits.max_headers, &mut scratch) {
                    Parsed::Request(req, raw, facts, len) => {
                        rbuf.drain(..len);
                        break (req, raw, facts);
                    }
                    Parsed::Partial if rbuf.len() < limits.max_buf => {}
                    _ => return Ended::Hyper(stream, Bytes::from(rbuf)),
                }
            }
            let was_empty = rbuf.is_empty();
            let deadline = if was_empty {
                idle_since + PARK_AFTER
            } else {
                *head_started.get_or_insert_with(crate::clock::tokio_now) + limits.header_timeout
            };
            // Moved earlier at once, later only once it fires (below): the idle
            // deadline moves with every request, and resetting the timer each time
            // re-registered it in tokio's timer wheel (~200 instructions a request).
            if timer.deadline() > deadline {
                timer.as_mut().reset(deadline);
            }
            if rbuf.capacity() - rbuf.len() < READ_CHUNK / 2 {
                rbuf.reserve(READ_CHUNK.min(limits.max_buf));
            }
            tokio::select! {
                biased;
                // `read_buf` goes through tokio's `AsyncRead`, which forgets the socket's
                // readiness after a short read: the next wait costs no extra `recvfrom`.
                r = stream.read_buf(&mut rbuf) => match r {
                    Ok(n) if n > 0 => {}
                    // EOF or an error; hyper also closes quietly on both.
                    _ => return Ended::Closed,
                },
                _ = idle_closed.as_mut() => return Ended::Closed,
                _ = timer.as_mut() => {
                    if crate::clock::tokio_now() < deadline {
                        // An earlier deadline, since moved: wait for the real one.
                        timer.as_mut().reset(deadline);
                        continue;
                    }
                    if was_empty {
                        return Ended::Idle(stream);
                    }
                    tracing::debug!(client = %info.peer, "client_header_timeout: request head incomplete");
                    return Ended::Closed;
                }
            }
        };

        // 2. The response; a client that goes away meanwhile cancels the request.
        // Pinned in place, not boxed: this future is itself boxed once per busy
        // period, and a box per request cost an allocation and a copy of the whole
        // request future (2.4 KB). In a block of its own, so that its space is reused
        // for the write below: held to the end of the loop, it made this future 5.5 KB.
        // Counted as it begins, as on hyper's path (`idle::Svc`), so its log line's
        // `$connection_requests` includes it.
        let more = life.another();
        let answer = {
            let fut = std::pin::pin!(proxy::handle(ctx.clone(), info.clone(), req, raw, true));
            in_flight(fut, &mut stream, &mut rbuf).await
        };
        let Some(answer) = answer else {
            return Ended::Closed;
        };

        // 3. Write it. The head is encoded here, not in the write's future, which
        // then holds the body alone rather than a copy of the whole answer.
        let keep_alive = more && facts.keep_alive && !tracker.is_stopping();
        out.clear();
        let (framing, keep_alive, mut body) = encode_answer(&mut out, answer, &facts, keep_alive);
        body.head_written(out.len());
        let keep_alive = match write_response(&mut stream, &out, body, framing, keep_alive, limits.send_timeout).await {
            Ok(k) => k,
            Err(e) => {
                tracing::debug!(client = %info.peer, error = %e, "client connection ended with error");
                return Ended::Closed;
            }
        };
        if !keep_alive {
            let _ = stream.shutdown().await;
            // Pipelined requests came after this one: the client may still be sending.
            if !rbuf.is_empty() {
                crate::alloc::boxed(|| crate::idle::linger(&stream, tracker)).await;
            }
            return Ended::Closed;
        }
        idle_since = crate::clock::tokio_now();
        head_started = None;
    }
}

/// Drives the request future. Meanwhile, with nothing pipelined yet, watches the
/// client: end of stream or an error cancels the request (`None`), as hyper does;
/// pipelined bytes are kept for the next request.
async fn in_flight<F, T>(mut fut: Pin<&mut F>, stream: &mut TcpStream, rbuf: &mut Vec<u8>) -> Option<T>
where
    F: Future<Output = T> + ?Sized,
{
    poll_fn(|cx| {
        if let Poll::Ready(r) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        // As hyper does, watch only while nothing is buffered: bytes of a next request
        // are kept (up to the buffer's capacity) and read no further meanwhile.
        while rbuf.is_empty() {
            match std::pin::pin!(stream.read_buf(&mut *rbuf)).poll(cx) {
                Poll::Ready(Ok(n)) if n > 0 => {}
                Poll::Ready(_) => return Poll::Ready(None),
                Poll::Pending => break,
            }
        }
        Poll::Pending
    })
    .await
}

/// Parses one request head from `buf`. Anything the fast path does not serve, or
/// cannot parse, is `Hyper`.
fn parse(buf: &[u8], max_headers: usize, scratch: &mut Vec<[u32; 4]>) -> Parsed {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FAST_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Hyper,
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Hyper;
    };
    if req.headers.len() > max_headers || !path.starts_with('/') {
        return Parsed::Hyper;
    }
    let method = match method {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        "POST" => Method::POST,
        "PUT" => Method::PUT,
        "DELETE" => Method::DELETE,
        "OPTIONS" => Method::OPTIONS,
        "PATCH" => Method::PATCH,
        _ => return Parsed::Hyper,
    };
    let version = if version == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut close = false;
    let mut keep_alive_token = false;
    let mut content_length: Option<usize> = None;
    let base = buf.as_ptr() as usize;
    scratch.clear();
    // Whether the fields can go to the backend as written (`RawRequest`), and what
    // `proxy` needs from them then.
    let mut as_written = true;
    let mut field_bytes = 0;
    let (mut host, mut request_id) = (None, None);
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        field_bytes += name.len() + h.value.len() + 4;
        if as_written {
            if !rawfields::request_field_passes(name) {
                as_written = false;
            } else if codec::eq_lower(name, b"host") {
                // A second Host is a 400 (RFC 9112 §3.2): `proxy::scan` sees both
                // in the map.
                if host.is_some() {
                    as_written = false;
                }
                host = Some(h.value);
            } else if request_id.is_none() && codec::eq_lower(name, b"x-request-id") {
                request_id = Some(h.value);
            }
        }
        // Framing and protocol switches beyond a plain length are hyper's: chunked
        // bodies, 100-continue, upgrades.
        if codec::eq_lower(name, b"content-length") {
            match (content_length, digits(h.value)) {
                (None, Some(n)) => content_length = Some(n),
                // Repeated (even if equal) or not a plain number: hyper decides.
                _ => return Parsed::Hyper,
            }
        } else if codec::eq_lower(name, b"transfer-encoding")
            || codec::eq_lower(name, b"expect")
            || codec::eq_lower(name, b"upgrade")
            || codec::eq_lower(name, b"te")
        {
            return Parsed::Hyper;
        } else if codec::eq_lower(name, b"connection") {
            let t = codec::connection_tokens(h.value);
            close |= t.close;
            keep_alive_token |= t.keep_alive;
        }
        let n = name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        scratch.push([n as u32, (n + name.len()) as u32, v as u32, (v + h.value.len()) as u32]);
    }
    // A body is served here only when it arrived whole with its head (a small POST
    // usually does); one still on its way streams through hyper.
    let body_len = content_length.unwrap_or(0);
    let Some(total) = len.checked_add(body_len).filter(|&t| t <= buf.len()) else {
        return Parsed::Hyper;
    };
    let path_start = path.as_ptr() as usize - base;
    let path_end = path_start + path.len();

    // One copy of head and body: the request's values and body share it, and the read
    // buffer is reused for the next request.
    let head = Bytes::copy_from_slice(&buf[..total]);
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path_start..path_end)) else {
        return Parsed::Hyper;
    };
    // SAFETY (both uses): httparse already rejected every byte a field value may not
    // hold, so (as hyper does) the value skips a second scan.
    let value_at =
        |start: usize, end: usize| unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(start..end)) };
    let block = match as_written && body_len == 0 {
        true => rawfields::field_block(&head[..len], scratch),
        false => None,
    };
    let body = if body_len == 0 {
        InBody::Empty
    } else {
        InBody::Full(head.slice(len..total))
    };
    // Fields go into the request's own map: assigning a map built apart dropped the
    // request's empty one (about 85 instructions, on every request).
    let mut request = Request::new(body);
    let raw = match block {
        Some((start, end)) => {
            let value_of = |v: &[u8]| {
                let start = v.as_ptr() as usize - base;
                value_at(start, start + v.len())
            };
            Some(RawRequest {
                block: head.slice(start..end),
                host: host.map(value_of),
                request_id: request_id.map(value_of),
                bytes: field_bytes,
            })
        }
        None => {
            let headers = request.headers_mut();
            headers.reserve(scratch.len());
            for &[ns, ne, vs, ve] in scratch.iter() {
                let Some(name) = codec::header_name(&head[ns as usize..ne as usize]) else {
                    return Parsed::Hyper;
                };
                headers.append(name, value_at(vs as usize, ve as usize));
            }
            None
        }
    };
    let head_request = method == Method::HEAD;
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    let keep_alive = !close && (version == Version::HTTP_11 || keep_alive_token);
    Parsed::Request(
        request,
        raw,
        HeadFacts {
            keep_alive,
            version,
            head_request,
        },
        total,
    )
}

/// A `Content-Length` value: ASCII digits only, as RFC 9110 §8.6 allows.
fn digits(v: &[u8]) -> Option<usize> {
    if v.is_empty() || v.len() > 15 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0, |n, &d| n * 10 + (d - b'0') as usize))
}

/// How the response body is delimited on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// HTTP/1.0 with no known length: the body ends when the connection closes.
    Close,
}

/// What a response head carries besides the response's own map (`proxy::Answer`).
#[derive(Default, Clone, Copy)]
struct Extra<'a> {
    /// Written before the map's fields.
    raw: Option<&'a RawFields>,
    /// Written after them.
    request_id: Option<&'a HeaderValue>,
}

/// Encodes the head into `out`; returns the framing and whether the connection stays
/// open afterwards.
fn encode_head(
    out: &mut Vec<u8>,
    resp: &Response<RespBody>,
    extra: Extra<'_>,
    facts: &HeadFacts,
    mut keep_alive: bool,
) -> (Framing, bool) {
    let status = resp.status();
    let body = resp.body();
    // A 101 can only answer an upgrade, which hyper serves; from a backend that sends
    // one anyway, the client gets the head and the connection closes.
    let informational = status.is_informational();
    let can_body = !(informational
        || facts.head_request
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED);
    let http10 = facts.version == Version::HTTP_10;
    if http10 {
        out.extend_from_slice(b"HTTP/1.0 ");
    } else if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
    }
    if http10 || status != StatusCode::OK {
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut wrote_date = false;
    let mut declared: Option<u64> = None;
    let mut response_close = false;
    let mut response_keep_alive = false;
    // The backend's fields first, as it wrote them; they hold no framing or
    // connection fields.
    if let Some(raw) = extra.raw {
        raw.write_to(out);
        wrote_date = raw.has_date;
        declared = raw.declared;
    }
    for (name, value) in resp.headers() {
        match *name {
            header::CONTENT_LENGTH => {
                if declared.is_none() {
                    declared = std::str::from_utf8(value.as_bytes())
                        .ok()
                        .and_then(|s| s.trim().parse().ok());
                }
                continue;
            }
            header::TRANSFER_ENCODING => continue,
            header::CONNECTION => {
                let t = codec::connection_tokens(value.as_bytes());
                response_close |= t.close;
                response_keep_alive |= t.keep_alive;
            }
            header::DATE => wrote_date = true,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(id) = extra.request_id {
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    keep_alive &= !response_close && !informational;
    let framing = if !can_body {
        // HEAD keeps the length the backend declared; 204 and 304 carry none. A
        // page rampart made itself (an error, a `return`) still holds its body, so
        // its length is the GET's (a proxied HEAD's body is empty).
        if facts.head_request {
            if let Some(n) = declared.or_else(|| body.size_hint().exact().filter(|&n| n > 0)) {
                write_length(out, n);
            }
        }
        Framing::None
    } else if body.is_end_stream() {
        out.extend_from_slice(b"content-length: 0\r\n");
        Framing::None
    } else if let Some(n) = body.size_hint().exact().or(declared) {
        write_length(out, n);
        Framing::Length(n)
    } else if http10 {
        keep_alive = false;
        Framing::Close
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if http10 {
        if keep_alive && !response_keep_alive {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    } else if !keep_alive && !response_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        DATE.with(|d| d.borrow_mut().extend(out));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (framing, keep_alive)
}

fn write_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Encodes the answer's head into `out`; returns the body's framing, whether the
/// connection may carry another request, and the body.
fn encode_answer(out: &mut Vec<u8>, answer: Answer, facts: &HeadFacts, keep_alive: bool) -> (Framing, bool, RespBody) {
    let extra = Extra {
        raw: answer.raw.as_ref(),
        request_id: Some(&answer.request_id),
    };
    let (framing, keep_alive) = encode_head(out, &answer.response, extra, facts, keep_alive);
    (framing, keep_alive, answer.response.into_body())
}

/// Writes the response, its head already in `out`; returns whether the connection
/// may carry another request. The head goes out with the first body bytes when they
/// are ready at once (one `writev` for a small proxied response).
async fn write_response(
    stream: &mut TcpStream,
    out: &[u8],
    mut body: RespBody,
    framing: Framing,
    keep_alive: bool,
    send_timeout: Duration,
) -> io::Result<bool> {
    let stall = &mut crate::netio::Stall::new(send_timeout);
    if framing == Framing::None {
        write_all(stream, &mut [IoSlice::new(out)], stall).await?;
        return Ok(keep_alive);
    }
    let mut head_pending = true;
    let mut sent: u64 = 0;
    loop {
        let frame = if head_pending {
            match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    // Nothing yet: the client gets the head now, the body as it comes.
                    write_all(stream, &mut [IoSlice::new(out)], stall).await?;
                    head_pending = false;
                    body.frame().await
                }
            }
        } else {
            body.frame().await
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => return Err(e),
            // Trailers are dropped, as hyper drops them for clients that did not
            // ask (`TE: trailers` requests go to hyper).
            Some(Ok(f)) => match f.into_data() {
                Ok(d) if !d.is_empty() => d,
                _ => continue,
            },
        };
        sent += data.len() as u64;
        let head: &[u8] = if head_pending { out } else { &[] };
        head_pending = false;
        let last = body.is_end_stream();
        match framing {
            Framing::Chunked => {
                let (size, n) = codec::chunk_header(data.len());
                let size = &size[..n];
                let tail: &[u8] = if last { b"\r\n0\r\n\r\n" } else { b"\r\n" };
                body.framing_written(n + tail.len());
                write_all(
                    stream,
                    &mut [
                        IoSlice::new(head),
                        IoSlice::new(size),
                        IoSlice::new(&data),
                        IoSlice::new(tail),
                    ],
                    stall,
                )
                .await?;
                if last {
                    return Ok(keep_alive);
                }
            }
            Framing::Length(n) if sent > n => {
                return Err(io::Error::other("response body longer than its Content-Length"));
            }
            _ => write_all(stream, &mut [IoSlice::new(head), IoSlice::new(&data)], stall).await?,
        }
    }
    let head: &[u8] = if head_pending { out } else { &[] };
    match framing {
        Framing::Chunked => {
            body.framing_written(5);
            write_all(stream, &mut [IoSlice::new(head), IoSlice::new(b"0\r\n\r\n")], stall).await?
        }
        Framing::Length(n) if sent != n => {
            return Err(io::Error::other("response body shorter than its Content-Length"));
        }
        _ => write_all(stream, &mut [IoSlice::new(head)], stall).await?,
    }
    Ok(keep_alive)
}

/// The size of the head this path would write for `resp` (an HTTP/1.1 keep-alive
/// response to a GET): the access log's `$bytes_sent` for a response that hyper or
/// HTTP/2 wrote, which do not tell their own.
pub fn head_len(resp: &Response<RespBody>, raw: Option<&RawFields>, request_id: &HeaderValue) -> u64 {
    let facts = HeadFacts {
        keep_alive: true,
        version: Version::HTTP_11,
        head_request: false,
    };
    let extra = Extra {
        raw,
        request_id: Some(request_id),
    };
    let mut out = Vec::with_capacity(256);
    encode_head(&mut out, resp, extra, &facts, true);
    out.len() as u64
}

/// For `bench/hotpath.rs`: parses one request head as `serve` does; returns the bytes
/// the request took, or `None` when it would wait for more or go to hyper.
#[doc(hidden)]
pub fn parse_for_bench(buf: &[u8], scratch: &mut Vec<[u32; 4]>) -> Option<usize> {
    match parse(buf, MAX_FAST_HEADERS, scratch) {
        Parsed::Request(_, _, _, len) => Some(len),
        _ => None,
    }
}

/// For `bench/hotpath.rs`: encodes the head of `resp` to an HTTP/1.1 keep-alive GET.
#[doc(hidden)]
pub fn encode_head_for_bench(out: &mut Vec<u8>, resp: &Response<RespBody>) {
    let facts = HeadFacts {
        keep_alive: true,
        version: Version::HTTP_11,
        head_request: false,
    };
    encode_head(out, resp, Extra::default(), &facts, true);
}

/// The `Date` value, formatted once per second per worker thread.
struct DateCache {
    second: u64,
    value: [u8; 29],
}

impl DateCache {
    fn extend(&mut self, out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second {
            let s = httpdate::fmt_http_date(now);
            if s.len() == self.value.len() {
                self.value.copy_from_slice(s.as_bytes());
                self.second = second;
            }
        }
        out.extend_from_slice(&self.value);
    }
}

thread_local! {
    static DATE: RefCell<DateCache> = const {
        RefCell::new(DateCache {
            second: 0,
            value: *b"Thu, 01 Jan 1970 00:00:00 GMT",
        })
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed_raw(raw: &[u8]) -> Option<(Request<InBody>, Option<RawRequest>, HeadFacts, usize)> {
        match parse(raw, 100, &mut Vec::new()) {
            Parsed::Request(r, w, f, n) => Some((r, w, f, n)),
            _ => None,
        }
    }

    fn parsed(raw: &[u8]) -> Option<(Request<InBody>, HeadFacts, usize)> {
        parsed_raw(raw).map(|(r, _, f, n)| (r, f, n))
    }

    #[test]
    fn a_simple_get_is_parsed_with_its_fields_as_written() {
        let raw = b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-request-id: r1 \r\nX-A: 2\r\n\r\nGET";
        let (req, fields, facts, len) = parsed_raw(raw).unwrap();
        assert_eq!(len, raw.len() - 3);
        assert_eq!(req.uri(), "/a?b=1");
        assert!(req.headers().is_empty(), "the fields pass as written");
        let fields = fields.unwrap();
        assert_eq!(
            &fields.block[..],
            b"Host: x\r\nX-A: 1\r\nx-request-id: r1 \r\nX-A: 2\r\n"
        );
        assert_eq!(fields.host.as_ref().unwrap(), "x");
        assert_eq!(fields.request_id.as_ref().unwrap(), "r1");
        assert_eq!(fields.bytes, (4 + 1) + (3 + 1) + (12 + 2) + (3 + 1) + 4 * 4);
        assert_eq!(fields.header_map().get_all("x-a").iter().count(), 2);
        assert!(facts.keep_alive);
        assert!(matches!(req.body(), InBody::Empty));
    }

    #[test]
    fn fields_that_are_rewritten_or_bodies_or_bare_lf_take_the_map() {
        for raw in [
            &b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nVia: 1.1 a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nx-forwarded-proto: https\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-Host: y\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nKeep-Alive: 5\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nProxy-Authorization: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nTrailer: t\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na",
            b"POST / HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k\r\n\r\n",
            b"GET / HTTP/1.1\nHost: x\nX-A: 1\n\n",
        ] {
            let (req, fields, _, _) = parsed_raw(raw).unwrap();
            assert!(fields.is_none(), "{}", String::from_utf8_lossy(raw));
            assert_eq!(req.headers()["host"], "x");
        }
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_tokens() {
        let ka = |raw: &[u8]| parsed(raw).unwrap().1.keep_alive;
        assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n"));
    }

    #[test]
    fn bodies_upgrades_and_odd_targets_go_to_hyper() {
        for raw in [
            &b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GE\x01T / HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse(raw, 100, &mut Vec::new()), Parsed::Hyper),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost", 100, &mut Vec::new()),
            Parsed::Partial
        ));
        assert!(matches!(
            parsed(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
                .unwrap()
                .0
                .body(),
            InBody::Empty
        ));
    }

    #[test]
    fn a_body_that_arrived_with_its_head_is_taken_whole() {
        let raw = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n";
        let (req, _, len) = parsed(raw).unwrap();
        assert_eq!(&raw[len..], b"GET / HTTP/1.1\r\n");
        match req.body() {
            InBody::Full(b) => assert_eq!(&b[..], b"abc"),
            other => panic!("{other:?}"),
        }
    }

    fn head_of(
        resp: Response<RespBody>,
        version: Version,
        head_request: bool,
        keep_alive: bool,
    ) -> (String, Framing, bool) {
        let mut out = Vec::new();
        let facts = HeadFacts {
            keep_alive,
            version,
            head_request,
        };
        let (f, k) = encode_head(&mut out, &resp, Extra::default(), &facts, keep_alive);
        (String::from_utf8(out).unwrap(), f, k)
    }

    #[test]
    fn the_backends_fields_go_first_as_written_and_the_request_id_last() {
        let mut buf = bytes::BytesMut::from("HTTP/1.1 200 OK\r\nServer: o\r\nDate: d\r\nContent-Length: 42\r\n\r\n");
        let head = codec::parse_response(&mut buf, false, true, &mut Vec::new())
            .unwrap()
            .unwrap();
        let codec::RespFields::Raw(raw) = head.fields else {
            panic!("passed as written");
        };
        let mut r = Response::new(RespBody::from(Bytes::from_static(b"hello")));
        r.headers_mut().insert("x-own", HeaderValue::from_static("1"));
        let id = HeaderValue::from_static("id");
        let extra = Extra {
            raw: Some(&raw),
            request_id: Some(&id),
        };
        let facts = HeadFacts {
            keep_alive: true,
            version: Version::HTTP_11,
            head_request: false,
        };
        let mut out = Vec::new();
        let (f, k) = encode_head(&mut out, &r, extra, &facts, true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nServer: o\r\nDate: d\r\nx-own: 1\r\nx-request-id: id\r\ncontent-length: 5\r\n\r\n",
            "the backend's, ours, the id; no second Date; the length is the body's"
        );
        assert_eq!((f, k), (Framing::Length(5), true));
        // HEAD: the declared length goes out.
        let facts = HeadFacts {
            head_request: true,
            ..facts
        };
        let mut out = Vec::new();
        encode_head(&mut out, &Response::new(RespBody::empty()), extra, &facts, true);
        assert!(String::from_utf8(out).unwrap().contains("content-length: 42\r\n"));
    }

    #[test]
    fn response_heads_are_framed_like_hyper_frames_them() {
        let r = Response::new(RespBody::from(Bytes::from_static(b"hello")));
        let (h, f, k) = head_of(r, Version::HTTP_11, false, true);
        assert!(h.starts_with("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: "), "{h}");
        assert!(h.ends_with(" GMT\r\n\r\n"));
        assert_eq!((f, k), (Framing::Length(5), true));

        let mut r = Response::new(RespBody::empty());
        *r.status_mut() = StatusCode::NOT_FOUND;
        r.headers_mut().insert(header::DATE, HeaderValue::from_static("x"));
        let (h, f, _) = head_of(r, Version::HTTP_11, false, false);
        assert_eq!(
            h,
            "HTTP/1.1 404 Not Found\r\ndate: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(f, Framing::None);

        // HTTP/1.0 keep-alive is echoed.
        let r = Response::new(RespBody::from(Bytes::from_static(b"x")));
        let (h, _, k) = head_of(r, Version::HTTP_10, false, true);
        assert!(
            h.starts_with("HTTP/1.0 200 OK\r\ncontent-length: 1\r\nconnection: keep-alive\r\n"),
            "{h}"
        );
        assert!(k);

        // HEAD keeps the declared length and sends no body.
        let mut r = Response::new(RespBody::empty());
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("42"));
        let (h, f, _) = head_of(r, Version::HTTP_11, true, true);
        assert!(h.contains("content-length: 42\r\n"), "{h}");
        assert_eq!(f, Framing::None);

        // A response that says close closes.
        let mut r = Response::new(RespBody::empty());
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        let (h, _, k) = head_of(r, Version::HTTP_11, false, true);
        assert!(!k);
        assert_eq!(h.matches("close").count(), 1, "{h}");
    }
}
