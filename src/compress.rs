//! gzip for responses (`compress`, on `[server]` or a route): nginx's `gzip`, HAProxy's
//! `compression`, Envoy's compressor filter. Owns what decides whether a response is
//! compressed (the client's `Accept-Encoding`; the response's status, type, length,
//! `Content-Encoding` and `Cache-Control: no-transform`), the fields that change with
//! it (`Content-Encoding`, `Content-Length`, `Vary`, `ETag`, `Accept-Ranges`), and the
//! compressing body, which streams: what the backend has sent so far goes out as soon
//! as the backend pauses (a sync flush), so a slow or endless response is not held back.
//!
//! The deflate state (about 316 KiB resident, with zlib's 32 KiB window) is kept per worker
//! thread and reused, a few at most, rather than allocated for every response.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress, Status};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use http_body::{Body, Frame, SizeHint};

use crate::body::RespBody;

/// A route's (or the server's) `compress` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressConfig {
    /// Media types compressed, lowercase: `type/subtype`, `type/*`, or `*` for all.
    pub types: Vec<String>,
    /// Responses declared shorter than this many bytes go as they are.
    pub min_length: u64,
    /// 1 (fastest) to 9 (smallest).
    pub level: u32,
}

/// The types compressed by default: text that compresses well, as Envoy's compressor
/// filter lists them, with the script, feed and WebAssembly types nginx users add to
/// `gzip_types`.
pub const DEFAULT_TYPES: &[&str] = &[
    "text/html",
    "text/plain",
    "text/css",
    "text/xml",
    "text/javascript",
    "application/javascript",
    "application/json",
    "application/xml",
    "application/xhtml+xml",
    "application/rss+xml",
    "application/atom+xml",
    "application/wasm",
    "image/svg+xml",
];

/// nginx's `gzip_min_length` is 20 and Envoy's 30; below a few hundred bytes the 18
/// bytes of gzip framing and a deflate stream's start win back little.
pub const DEFAULT_MIN_LENGTH: u64 = 256;

/// nginx's `gzip_comp_level` and HAProxy's `tune.comp.maxlevel` default. zlib-rs's
/// level 1 is zlib-ng's "quick" strategy: on bench/run.py's page, 4,564 bytes for
/// C zlib's 3,684 at 0.73x nginx's instructions per response; level 2 gives 3,433 at
/// 1.22x (bench/README.md, "Compression").
pub const DEFAULT_LEVEL: u32 = 1;

impl Default for CompressConfig {
    fn default() -> Self {
        CompressConfig {
            types: DEFAULT_TYPES.iter().map(|t| t.to_string()).collect(),
            min_length: DEFAULT_MIN_LENGTH,
            level: DEFAULT_LEVEL,
        }
    }
}

impl CompressConfig {
    /// Whether a `Content-Type` value is one of `types` (parameters ignored).
    fn covers(&self, content_type: &[u8]) -> bool {
        let end = content_type
            .iter()
            .position(|&b| b == b';')
            .unwrap_or(content_type.len());
        let media = content_type[..end].trim_ascii();
        let Ok(media) = std::str::from_utf8(media) else {
            return false;
        };
        let kind = media.split('/').next().unwrap_or("");
        self.types.iter().any(|t| {
            t == "*"
                || t.eq_ignore_ascii_case(media)
                || t.strip_suffix("/*").is_some_and(|k| k.eq_ignore_ascii_case(kind))
        })
    }
}

/// `type/subtype`, `type/*` or `*`, in the token characters of RFC 9110 §5.6.2.
pub fn is_media_range(t: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    match t.split_once('/') {
        None => t == "*",
        Some((kind, sub)) => token(kind) && kind != "*" && token(sub) && !sub.contains('/'),
    }
}

/// Whether `Accept-Encoding` values admit gzip: `gzip` (or the old `x-gzip`) with a
/// nonzero weight, or failing a mention of either, `*` with one (RFC 9110 §12.5.3).
pub fn accepts_gzip<'a>(values: impl Iterator<Item = &'a [u8]>) -> bool {
    let mut star = None;
    for value in values {
        for item in value.split(|&b| b == b',') {
            let mut parts = item.split(|&b| b == b';');
            let coding = parts.next().unwrap_or_default().trim_ascii();
            let weighted = parts
                .map(<[u8]>::trim_ascii)
                .find_map(|p| p.strip_prefix(b"q=").or_else(|| p.strip_prefix(b"Q=")));
            let allowed = weighted.is_none_or(nonzero_weight);
            if coding.eq_ignore_ascii_case(b"gzip") || coding.eq_ignore_ascii_case(b"x-gzip") {
                return allowed;
            }
            if coding == b"*" {
                star = Some(allowed);
            }
        }
    }
    star.unwrap_or(false)
}

/// A `qvalue` other than 0 (`0`, `0.`, `0.0`, `0.000`); a malformed one counts as
/// nonzero, as the client named the coding.
fn nonzero_weight(q: &[u8]) -> bool {
    match q.split_first() {
        Some((b'0', rest)) => match rest.split_first() {
            None => false,
            Some((b'.', digits)) => digits.iter().any(|&d| d != b'0'),
            Some(_) => true,
        },
        _ => true,
    }
}

/// What a request on a compressing route brings to its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The client takes gzip.
    Gzip,
    /// It does not: the response goes as it is, but says it varies by
    /// `Accept-Encoding`, so that a shared cache does not hand it to a client that does.
    Identity,
}

/// Compresses `response` when it qualifies, and marks every response of a type that
/// could be compressed with `Vary: Accept-Encoding`. Returns whether it compressed.
pub fn apply(
    cfg: &CompressConfig,
    want: Want,
    method: &Method,
    response: &mut http::Response<RespBody>,
    counters: &Counters,
) -> bool {
    let status = response.status();
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::PARTIAL_CONTENT
    {
        return false;
    }
    let headers = response.headers();
    if headers.contains_key(header::CONTENT_RANGE) {
        return false;
    }
    let eligible = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| cfg.covers(t.as_bytes()))
        && headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .all(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"))
        && !headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"no-transform"));
    if !eligible {
        return false;
    }
    // A HEAD's answer has no body but says what a GET's would, in its fields.
    let head = *method == Method::HEAD;
    let declared = match response.body().size_hint().exact() {
        Some(n) if !head => Some(n),
        _ => headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .and_then(|s| s.trim().parse::<u64>().ok()),
    };
    let headers = response.headers_mut();
    add_vary(headers);
    // An empty or short body goes as it is.
    if want == Want::Identity || declared.is_some_and(|n| n < cfg.min_length.max(1)) {
        return false;
    }
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::CONTENT_ENCODING);
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    // The bytes are no longer the identity representation's: ranges of it cannot be
    // served from them, and a strong validator would claim byte-equality (nginx and
    // Envoy weaken it the same way).
    headers.remove(header::ACCEPT_RANGES);
    if let Some(etag) = headers.get(header::ETAG) {
        if !etag.as_bytes().starts_with(b"W/") {
            let mut weak = Vec::with_capacity(etag.len() + 2);
            weak.extend_from_slice(b"W/");
            weak.extend_from_slice(etag.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&weak) {
                headers.insert(header::ETAG, v);
            }
        }
    }
    if head {
        return true;
    }
    counters.responses.increment(1);
    let body = std::mem::replace(response.body_mut(), RespBody::empty());
    *response.body_mut() = match body {
        // Read whole already (a pool that buffers for retries): compressed at once,
        // so it keeps a `Content-Length`.
        RespBody::Full(Some(whole)) => match compress_whole(cfg.level, &whole) {
            Ok(z) => {
                counters.bytes_in.increment(whole.len() as u64);
                counters.bytes_out.increment(z.len() as u64);
                RespBody::Full(Some(z))
            }
            // Not expected (zlib fails only on misuse); the response goes as it was.
            Err(_) => {
                let headers = response.headers_mut();
                headers.remove(header::CONTENT_ENCODING);
                RespBody::Full(Some(whole))
            }
        },
        streaming => RespBody::Gzip(Box::new(Gzip::new(cfg.level, streaming, counters.clone()))),
    };
    true
}

/// Appends `Accept-Encoding` to `Vary` unless it is listed already, or `*`.
fn add_vary(headers: &mut HeaderMap) {
    let listed = headers
        .get_all(header::VARY)
        .iter()
        .any(|v| has_token(v.as_bytes(), b"accept-encoding") || has_token(v.as_bytes(), b"*"));
    if !listed {
        headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
}

/// Whether a comma-separated field value lists `token` (ASCII case ignored).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|t| {
        let t = t.trim_ascii();
        let t = t.split(|&b| b == b'=').next().unwrap_or(t).trim_ascii();
        t.eq_ignore_ascii_case(token)
    })
}

/// A worker's spare deflate states, by level. A few: a burst of large compressed
/// responses should not leave megabytes behind.
const SPARE_STATES: usize = 4;

thread_local! {
    static SPARES: RefCell<Vec<(u32, Compress)>> = const { RefCell::new(Vec::new()) };
}

fn take_state(level: u32) -> Compress {
    let spare = SPARES.with(|s| {
        let mut s = s.borrow_mut();
        let i = s.iter().position(|(l, _)| *l == level)?;
        Some(s.swap_remove(i).1)
    });
    spare.unwrap_or_else(|| Compress::new_gzip(Compression::new(level), 15))
}

fn give_back(level: u32, mut z: Compress) {
    z.reset();
    SPARES.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARE_STATES {
            s.push((level, z));
        }
    });
}

/// One gzip member of `data`, whole.
fn compress_whole(level: u32, data: &[u8]) -> io::Result<Bytes> {
    let mut z = take_state(level);
    // Text rarely grows, and a deflate stream's worst case is a few bytes per 16 KiB.
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    let r = run(&mut z, data, &mut out, FlushCompress::Finish);
    give_back(level, z);
    r.map(|()| Bytes::from(out))
}

/// Feeds `input` to `z` with `flush`, growing `out` as needed, until `z` has taken
/// all of it and written all the flush asks for.
fn run(z: &mut Compress, mut input: &[u8], out: &mut Vec<u8>, flush: FlushCompress) -> io::Result<()> {
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve((input.len() / 2).max(8 * 1024));
        }
        let (taken, written) = (z.total_in(), out.len());
        let status = z.compress_vec(input, out, flush).map_err(io::Error::other)?;
        let consumed = (z.total_in() - taken) as usize;
        input = &input[consumed..];
        let room = out.len() < out.capacity();
        match status {
            Status::StreamEnd => return Ok(()),
            // Done once the input is in and zlib stopped short of a full buffer (a
            // full one may hold more of a flush back); a finish waits for its end.
            _ if flush != FlushCompress::Finish && input.is_empty() && room => return Ok(()),
            _ if room && consumed == 0 && out.len() == written => {
                return Err(io::Error::other("deflate made no progress"));
            }
            _ => {}
        }
    }
}

/// Emits compressed bytes without waiting for the backend's pause once this many
/// are ready.
const EMIT_AT: usize = 16 * 1024;

/// A response body compressed as it streams.
pub struct Gzip {
    inner: RespBody,
    /// The pool's `rampart_compression_{input,output}_bytes_total`.
    counters: Counters,
    z: Option<Compress>,
    level: u32,
    out: Vec<u8>,
    /// Input taken since the last flush: a pause in the backend's body flushes it.
    unflushed: bool,
    /// The inner body has ended (trailers, if any, wait in `trailers`).
    finished: bool,
    trailers: Option<HeaderMap>,
}

impl Gzip {
    fn new(level: u32, inner: RespBody, counters: Counters) -> Gzip {
        Gzip {
            inner,
            counters,
            z: Some(take_state(level)),
            level,
            out: Vec::new(),
            unflushed: false,
            finished: false,
            trailers: None,
        }
    }

    fn deflate(&mut self, input: &[u8], flush: FlushCompress) -> io::Result<()> {
        match &mut self.z {
            Some(z) => run(z, input, &mut self.out, flush),
            None => Err(io::Error::other("compression already finished")),
        }
    }

    fn emit(&mut self) -> Option<Result<Frame<Bytes>, io::Error>> {
        Some(Ok(Frame::data(Bytes::from(std::mem::take(&mut self.out)))))
    }

    // Out of line, as `body::H2Resp`'s: inlined, it made `RespBody`'s methods too
    // large to inline into the request path (+64 instructions a request, compression off).
    #[inline(never)]
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        loop {
            if self.finished {
                if !self.out.is_empty() {
                    return Poll::Ready(self.emit());
                }
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if let Err(e) = self.deflate(&data, FlushCompress::None) {
                            return Poll::Ready(Some(Err(e)));
                        }
                        self.unflushed |= !data.is_empty();
                        if self.out.len() >= EMIT_AT {
                            return Poll::Ready(self.emit());
                        }
                    }
                    Err(frame) => {
                        self.trailers = frame.into_trailers().ok();
                        if let Err(e) = self.end() {
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    if let Err(e) = self.end() {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Poll::Pending => {
                    // The backend paused: what it sent so far goes to the client now.
                    if self.unflushed {
                        self.unflushed = false;
                        if let Err(e) = self.deflate(&[], FlushCompress::Sync) {
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                    if !self.out.is_empty() {
                        return Poll::Ready(self.emit());
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// The inner body ended: the gzip trailer, and the state back to the worker.
    fn end(&mut self) -> io::Result<()> {
        self.deflate(&[], FlushCompress::Finish)?;
        self.finished = true;
        self.release();
        Ok(())
    }

    /// Counts the bytes in and out, and returns the state to the worker.
    fn release(&mut self) {
        if let Some(z) = self.z.take() {
            self.counters.bytes_in.increment(z.total_in());
            self.counters.bytes_out.increment(z.total_out());
            give_back(self.level, z);
        }
    }

    #[inline(never)]
    pub fn is_end_stream(&self) -> bool {
        self.finished && self.out.is_empty() && self.trailers.is_none()
    }

    #[inline(never)]
    pub fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A client that leaves mid-body: what was compressed is counted, and the state,
/// reset, serves another response.
impl Drop for Gzip {
    fn drop(&mut self) {
        self.release();
    }
}

/// A pool's compression counters, pre-registered (`metrics::PoolMetrics`).
#[derive(Debug, Clone)]
pub struct Counters {
    pub responses: metrics::Counter,
    pub bytes_in: metrics::Counter,
    pub bytes_out: metrics::Counter,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gunzip(z: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(z).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn accept_encoding_weights() {
        let ok = |v: &str| accepts_gzip(std::iter::once(v.as_bytes()));
        assert!(ok("gzip"));
        assert!(ok("deflate, GZIP;q=0.5, br"));
        assert!(ok("x-gzip"));
        assert!(ok("*"));
        assert!(ok("gzip;q=0.001"));
        assert!(!ok("gzip;q=0"));
        assert!(!ok("gzip; q=0.000"));
        assert!(!ok("br, deflate"));
        assert!(!ok("*;q=0"));
        assert!(!ok("gzip;q=0, *"));
        assert!(!ok(""));
        assert!(!ok("identity"));
        assert!(ok("gzipx, gzip"));
        assert!(!ok("gzipx"));
        // Fields together.
        assert!(accepts_gzip(["br", "gzip"].iter().map(|s| s.as_bytes())));
    }

    #[test]
    fn types_match_ignoring_parameters_and_case() {
        let cfg = CompressConfig {
            types: vec!["text/html".into(), "application/*".into()],
            ..CompressConfig::default()
        };
        assert!(cfg.covers(b"text/html; charset=utf-8"));
        assert!(cfg.covers(b"Text/HTML"));
        assert!(cfg.covers(b"application/json"));
        assert!(!cfg.covers(b"text/plain"));
        assert!(!cfg.covers(b"image/png"));
        let all = CompressConfig {
            types: vec!["*".into()],
            ..CompressConfig::default()
        };
        assert!(all.covers(b"image/png"));
    }

    #[test]
    fn whole_bodies_round_trip_and_states_are_reused() {
        let text = "rampart compresses text. ".repeat(400);
        for _ in 0..3 {
            let z = compress_whole(1, text.as_bytes()).unwrap();
            assert!(z.len() < text.len() / 10, "{} bytes", z.len());
            assert_eq!(gunzip(&z), text.as_bytes());
        }
        SPARES.with(|s| assert_eq!(s.borrow().iter().filter(|(l, _)| *l == 1).count(), 1));
        // Incompressible input larger than the first output buffer.
        let noise: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let z = compress_whole(9, &noise).unwrap();
        assert_eq!(gunzip(&z), noise);
    }

    #[test]
    fn vary_is_added_once() {
        let mut h = HeaderMap::new();
        add_vary(&mut h);
        add_vary(&mut h);
        assert_eq!(h.get_all(header::VARY).iter().count(), 1);
        let mut h = HeaderMap::new();
        h.insert(header::VARY, HeaderValue::from_static("Origin, accept-encoding"));
        add_vary(&mut h);
        assert_eq!(h.get_all(header::VARY).iter().count(), 1);
        let mut h = HeaderMap::new();
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        add_vary(&mut h);
        assert_eq!(h.get_all(header::VARY).iter().count(), 2);
    }
}
