//! gzip, zstd and brotli for responses (`compress`, on `[server]` or a route): nginx's `gzip`,
//! HAProxy's `compression`, Envoy's compressor filter. Owns what decides whether a
//! response is compressed, and how (the client's `Accept-Encoding` against the
//! `encodings` offered; the response's status, type, length, `Content-Encoding` and
//! `Cache-Control: no-transform`), the fields that change with it
//! (`Content-Encoding`, `Content-Length`, `Vary`, `ETag`, `Accept-Ranges`), and the
//! compressing body, which streams: what the backend has sent so far goes out as soon
//! as the backend pauses (a flush), so a slow or endless response is not held back.
//!
//! The compressor states (deflate's about 315 KiB resident, with zlib's 32 KiB window;
//! zstd's about 0.9 MiB at level 1 and 1.6 MiB at level 3, with the 512 KiB window
//! `ZSTD_WINDOW_LOG` caps it at) are kept per worker thread and reused, a few at most,
//! rather than allocated for every response. brotli's cannot be reset, so each
//! response makes its own (118 KiB at quality 1, 1.8 MiB at 4, with a 256 KiB
//! window).

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
    /// gzip's: 1 (fastest) to 9 (smallest).
    pub level: u32,
    /// The codings offered, the server's preference first (`encodings`).
    pub encodings: Vec<Coding>,
    /// zstd's: 1 (fastest) to 19 (smallest).
    pub zstd_level: i32,
    /// brotli's quality: 0 (fastest) to 11 (smallest).
    pub brotli_level: u32,
}

/// A content coding rampart can compress with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Zstd,
    Brotli,
}

impl Coding {
    pub const ALL: [Coding; 3] = [Coding::Gzip, Coding::Zstd, Coding::Brotli];

    /// As `Content-Encoding` and `Accept-Encoding` name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Zstd => "zstd",
            Coding::Brotli => "br",
        }
    }

    pub fn parse(s: &str) -> Option<Coding> {
        Coding::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Whether an `Accept-Encoding` item names it (`x-gzip` is gzip, RFC 9110 §8.4.1.3).
    fn named_by(self, item: &[u8]) -> bool {
        item.eq_ignore_ascii_case(self.as_str().as_bytes())
            || (self == Coding::Gzip && item.eq_ignore_ascii_case(b"x-gzip"))
    }
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

/// On bench/run.py's 16 KiB page, zstd's level 1 sent 2,605 bytes in 17.7 us, its
/// level 3 (zstd's and Envoy's default) 2,822 in 21.7 us, and gzip's level 1 4,564 in
/// 19.5 us (one compressor, 2,000 times, release build); level 1's state is also the
/// smaller (0.9 MiB against 1.6).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// zstd's levels past 19 ("ultra") use windows past the 8 MiB that HTTP's `zstd`
/// coding allows decoders to refuse (RFC 9659).
pub const MAX_ZSTD_LEVEL: i32 = 19;

/// brotli's quality by default. On bench/run.py's 16 KiB page (release build, a
/// fresh state per page, as brotli's cannot be reset): quality 1 sent 3,190 bytes in
/// 48 us with a 118 KiB state; 4, 2,756 bytes in 87 us with 1.8 MiB; 5, 2,282 bytes
/// in 126 us with 1.9 MiB (gzip's level 1: 4,564 bytes, 19 us; zstd's level 1: 2,605
/// bytes, 18 us). Quality 1 keeps a compressing response's cost and memory near
/// gzip's; an operator who wants brotli's ratio raises it.
pub const DEFAULT_BROTLI_LEVEL: u32 = 1;

/// brotli's highest quality.
pub const MAX_BROTLI_LEVEL: u32 = 11;

/// A brotli stream's window: 256 KiB (`lgwin` 18, Envoy's default), where brotli's
/// default of 4 MiB would size every compressing response's state by it.
const BROTLI_WINDOW_LOG: u32 = 18;

/// A zstd stream's window: 512 KiB, where zstd's level 3 would take 2 MiB for a body
/// of unknown length. It bounds each compressing response's state to about 1.6 MiB at
/// level 3 (RSS over 50 states that each took 1 MB of text, one kind per process);
/// web pages and scripts gain little from matches further back.
const ZSTD_WINDOW_LOG: i32 = 19;

impl Default for CompressConfig {
    fn default() -> Self {
        CompressConfig {
            types: DEFAULT_TYPES.iter().map(|t| t.to_string()).collect(),
            min_length: DEFAULT_MIN_LENGTH,
            level: DEFAULT_LEVEL,
            encodings: vec![Coding::Gzip],
            zstd_level: DEFAULT_ZSTD_LEVEL,
            brotli_level: DEFAULT_BROTLI_LEVEL,
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

/// The coding to answer with, from `Accept-Encoding` values: of the `offered` codings
/// the client accepts (named with a nonzero weight, or failing a mention, `*` with
/// one; RFC 9110 §12.5.3), the one it weighs highest, and among equals the first
/// offered. `None`: the response goes as it is.
pub fn choose<'a>(values: impl Iterator<Item = &'a [u8]>, offered: &[Coding]) -> Option<Coding> {
    // Per offered coding: its weight where named (in thousandths), and `*`'s.
    let mut named = [None::<u16>; Coding::ALL.len()];
    let mut star = None;
    for value in values {
        for item in value.split(|&b| b == b',') {
            let mut parts = item.split(|&b| b == b';');
            let coding = parts.next().unwrap_or_default().trim_ascii();
            let weight = parts
                .map(<[u8]>::trim_ascii)
                .find_map(|p| p.strip_prefix(b"q=").or_else(|| p.strip_prefix(b"Q=")))
                .map_or(1000, qvalue);
            if coding == b"*" {
                star = Some(weight);
            } else if let Some(i) = offered.iter().position(|c| c.named_by(coding)) {
                named[i] = Some(weight);
            }
        }
    }
    let mut best: Option<(Coding, u16)> = None;
    for (i, &c) in offered.iter().enumerate().take(named.len()) {
        let w = named[i].or(star).unwrap_or(0);
        if w > 0 && best.is_none_or(|(_, b)| w > b) {
            best = Some((c, w));
        }
    }
    best.map(|(c, _)| c)
}

/// A `qvalue` in thousandths (`1`, `0.5`, `0.001`); a malformed one counts as 1, as
/// the client named the coding.
fn qvalue(q: &[u8]) -> u16 {
    match q.split_first() {
        Some((b'0', rest)) => match rest.split_first() {
            None => 0,
            Some((b'.', digits)) if digits.len() <= 3 && digits.iter().all(u8::is_ascii_digit) => {
                let mut n = 0u16;
                for k in 0..3 {
                    n = n * 10 + digits.get(k).map_or(0, |d| (d - b'0') as u16);
                }
                n
            }
            Some(_) => 1000,
        },
        _ => 1000,
    }
}

/// What a request on a compressing route brings to its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The client takes this coding.
    Encode(Coding),
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
    let coding = match want {
        Want::Encode(c) if declared.is_none_or(|n| n >= cfg.min_length.max(1)) => c,
        _ => return false,
    };
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::CONTENT_ENCODING);
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding.as_str()));
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
        RespBody::Full(Some(whole)) => match compress_whole(Kind::of(cfg, coding), &whole) {
            Ok(z) => {
                counters.bytes_in.increment(whole.len() as u64);
                counters.bytes_out.increment(z.len() as u64);
                RespBody::Full(Some(z))
            }
            // Not expected (zlib and zstd fail only on misuse, or out of memory); the
            // response goes as it was.
            Err(_) => {
                let headers = response.headers_mut();
                headers.remove(header::CONTENT_ENCODING);
                RespBody::Full(Some(whole))
            }
        },
        streaming => {
            let kind = Kind::of(cfg, coding);
            match take_state(kind) {
                Ok(z) => RespBody::Compressed(Box::new(Compressor::new(kind, z, streaming, counters.clone()))),
                // Not expected (out of memory): the response goes as it is.
                Err(e) => {
                    tracing::warn!(error = %e, coding = coding.as_str(), "cannot start compressing a response");
                    response.headers_mut().remove(header::CONTENT_ENCODING);
                    streaming
                }
            }
        }
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

/// A compressor's coding and level: what a spare state must match to be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gzip(u32),
    Zstd(i32),
    Brotli(u32),
}

impl Kind {
    fn of(cfg: &CompressConfig, coding: Coding) -> Kind {
        match coding {
            Coding::Gzip => Kind::Gzip(cfg.level),
            Coding::Zstd => Kind::Zstd(cfg.zstd_level),
            Coding::Brotli => Kind::Brotli(cfg.brotli_level),
        }
    }
}

/// A compressor's state.
enum Engine {
    Gzip(Compress),
    Zstd(zstd::stream::raw::Encoder<'static>),
    /// Boxed: the state is 1.5 KB inline.
    Brotli(Box<BrotliState>),
}

type BrotliState = brotli::enc::encode::BrotliEncoderStateStruct<brotli::enc::StandardAlloc>;

/// How much of what was fed a call asks the compressor to write out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flush {
    /// As the compressor likes: it may hold input back.
    None,
    /// Everything fed so far, decodable by the client now (deflate's sync flush,
    /// zstd's and brotli's flush).
    Sync,
    /// Everything, and the stream's end.
    Finish,
}

impl Engine {
    fn new(kind: Kind) -> io::Result<Engine> {
        Ok(match kind {
            Kind::Gzip(level) => Engine::Gzip(Compress::new_gzip(Compression::new(level), 15)),
            Kind::Zstd(level) => {
                use zstd::stream::raw::CParameter;
                let mut e = zstd::stream::raw::Encoder::new(level)?;
                e.set_parameter(CParameter::WindowLog(ZSTD_WINDOW_LOG as u32))?;
                Engine::Zstd(e)
            }
            Kind::Brotli(quality) => {
                use brotli::enc::encode::BrotliEncoderParameter as P;
                let mut b = Box::new(BrotliState::new(brotli::enc::StandardAlloc::default()));
                for (p, v) in [
                    (P::BROTLI_PARAM_QUALITY, quality),
                    (P::BROTLI_PARAM_LGWIN, BROTLI_WINDOW_LOG),
                ] {
                    if !b.set_parameter(p, v) {
                        return Err(io::Error::other("brotli refused a parameter"));
                    }
                }
                Engine::Brotli(b)
            }
        })
    }

    /// Feeds `input` with `flush`, growing `out` as needed, until the compressor has
    /// taken all of it and written all the flush asks for.
    fn run(&mut self, input: &[u8], out: &mut Vec<u8>, flush: Flush) -> io::Result<()> {
        match self {
            Engine::Gzip(z) => {
                let flush = match flush {
                    Flush::None => FlushCompress::None,
                    Flush::Sync => FlushCompress::Sync,
                    Flush::Finish => FlushCompress::Finish,
                };
                deflate(z, input, out, flush)
            }
            Engine::Zstd(z) => zstd_run(z, input, out, flush),
            Engine::Brotli(b) => brotli_run(b, input, out, flush),
        }
    }

    fn reset(&mut self) -> io::Result<()> {
        match self {
            Engine::Gzip(z) => {
                z.reset();
                Ok(())
            }
            Engine::Zstd(z) => {
                use zstd::stream::raw::Operation;
                z.reinit()
            }
            // brotli's state cannot be reset (neither can the C library's): each
            // response makes its own.
            Engine::Brotli(_) => Err(io::Error::other("a brotli state is not reused")),
        }
    }
}

/// `Engine::run` for brotli: writes into `out`'s spare room (zeroed first: brotli
/// takes an initialised slice) until the input is in and, for a flush or a finish,
/// brotli has nothing more to write.
fn brotli_run(b: &mut BrotliState, input: &[u8], out: &mut Vec<u8>, flush: Flush) -> io::Result<()> {
    use brotli::enc::encode::BrotliEncoderOperation as Op;
    let op = match flush {
        Flush::None => Op::BROTLI_OPERATION_PROCESS,
        Flush::Sync => Op::BROTLI_OPERATION_FLUSH,
        Flush::Finish => Op::BROTLI_OPERATION_FINISH,
    };
    let (mut avail_in, mut in_at) = (input.len(), 0);
    loop {
        make_room(out, avail_in);
        let at = out.len();
        out.resize(out.capacity(), 0);
        let (mut avail_out, mut out_at, taken) = (out.len() - at, at, in_at);
        let ok = b.compress_stream(
            op,
            &mut avail_in,
            input,
            &mut in_at,
            &mut avail_out,
            out,
            &mut out_at,
            &mut None,
            &mut |_, _, _, _| (),
        );
        out.truncate(out_at);
        if !ok {
            return Err(io::Error::other("brotli failed"));
        }
        let done = match flush {
            Flush::None => avail_in == 0,
            Flush::Sync => avail_in == 0 && !b.has_more_output(),
            Flush::Finish => b.is_finished(),
        };
        if done {
            return Ok(());
        }
        if in_at == taken && out_at == at {
            return Err(io::Error::other("brotli made no progress"));
        }
    }
}

/// A worker's spare compressor states, by kind. A few: a burst of large compressed
/// responses should not leave megabytes behind.
const SPARE_STATES: usize = 4;

thread_local! {
    static SPARES: RefCell<Vec<(Kind, Engine)>> = const { RefCell::new(Vec::new()) };
}

fn take_state(kind: Kind) -> io::Result<Engine> {
    let spare = SPARES.with(|s| {
        let mut s = s.borrow_mut();
        let i = s.iter().position(|(k, _)| *k == kind)?;
        Some(s.swap_remove(i).1)
    });
    match spare {
        Some(e) => Ok(e),
        None => Engine::new(kind),
    }
}

fn give_back(kind: Kind, mut e: Engine) {
    // A state that cannot be reset is not reused.
    if e.reset().is_err() {
        return;
    }
    SPARES.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARE_STATES {
            s.push((kind, e));
        }
    });
}

/// `data` compressed whole: one gzip member, zstd frame or brotli stream.
fn compress_whole(kind: Kind, data: &[u8]) -> io::Result<Bytes> {
    let mut e = take_state(kind)?;
    // Text rarely grows, and either format's worst case is a few bytes per block.
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    let r = e.run(data, &mut out, Flush::Finish);
    give_back(kind, e);
    r.map(|()| Bytes::from(out))
}

/// Room in `out` for a compressor's next step, with `left` bytes of input still to
/// take: half of them (text rarely compresses worse), and at least 8 KiB.
fn make_room(out: &mut Vec<u8>, left: usize) {
    if out.capacity() - out.len() < 64 {
        out.reserve((left / 2).max(8 * 1024));
    }
}

/// `Engine::run` for deflate.
fn deflate(z: &mut Compress, mut input: &[u8], out: &mut Vec<u8>, flush: FlushCompress) -> io::Result<()> {
    loop {
        make_room(out, input.len());
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

/// `Engine::run` for zstd: the input in, then for a flush or a finish, until zstd
/// says nothing is left to write.
fn zstd_run(
    z: &mut zstd::stream::raw::Encoder<'static>,
    input: &[u8],
    out: &mut Vec<u8>,
    flush: Flush,
) -> io::Result<()> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let stuck = || io::Error::other("zstd made no progress");
    let mut input = InBuffer::around(input);
    while input.pos() < input.src.len() {
        make_room(out, input.src.len() - input.pos());
        let (at, taken) = (out.len(), input.pos());
        let mut o = OutBuffer::around_pos(out, at);
        z.run(&mut input, &mut o)?;
        if input.pos() == taken && out.len() == at {
            return Err(stuck());
        }
    }
    if flush == Flush::None {
        return Ok(());
    }
    loop {
        make_room(out, 0);
        let at = out.len();
        let mut o = OutBuffer::around_pos(out, at);
        let left = match flush {
            Flush::Finish => z.finish(&mut o, true)?,
            _ => z.flush(&mut o)?,
        };
        if left == 0 {
            return Ok(());
        }
        if out.len() == at {
            return Err(stuck());
        }
    }
}

/// Emits compressed bytes without waiting for the backend's pause once this many
/// are ready.
const EMIT_AT: usize = 16 * 1024;

/// A response body compressed as it streams.
pub struct Compressor {
    inner: RespBody,
    /// The pool's `rampart_compression_{input,output}_bytes_total`.
    counters: Counters,
    z: Option<Engine>,
    kind: Kind,
    out: Vec<u8>,
    /// Bytes taken and emitted, for the counters.
    taken: u64,
    emitted: u64,
    /// Input taken since the last flush: a pause in the backend's body flushes it.
    unflushed: bool,
    /// The inner body has ended (trailers, if any, wait in `trailers`).
    finished: bool,
    trailers: Option<HeaderMap>,
}

impl Compressor {
    /// Bytes taken from the backend's body and given to the client so far.
    pub fn bytes(&self) -> (u64, u64) {
        (self.taken, self.emitted)
    }

    fn new(kind: Kind, z: Engine, inner: RespBody, counters: Counters) -> Compressor {
        Compressor {
            inner,
            counters,
            z: Some(z),
            kind,
            out: Vec::new(),
            taken: 0,
            emitted: 0,
            unflushed: false,
            finished: false,
            trailers: None,
        }
    }

    fn compress(&mut self, input: &[u8], flush: Flush) -> io::Result<()> {
        self.taken += input.len() as u64;
        match &mut self.z {
            Some(z) => z.run(input, &mut self.out, flush),
            None => Err(io::Error::other("compression already finished")),
        }
    }

    fn emit(&mut self) -> Option<Result<Frame<Bytes>, io::Error>> {
        self.emitted += self.out.len() as u64;
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
                        if let Err(e) = self.compress(&data, Flush::None) {
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
                        if let Err(e) = self.compress(&[], Flush::Sync) {
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

    /// The inner body ended: the stream's end (gzip's trailer, zstd's and brotli's
    /// last block), and the state back to the worker.
    fn end(&mut self) -> io::Result<()> {
        self.compress(&[], Flush::Finish)?;
        self.finished = true;
        self.release();
        Ok(())
    }

    /// Counts the bytes in and out, and returns the state to the worker.
    fn release(&mut self) {
        if let Some(z) = self.z.take() {
            self.counters.bytes_in.increment(self.taken);
            // What is still to be emitted counts: it was compressed.
            self.counters.bytes_out.increment(self.emitted + self.out.len() as u64);
            give_back(self.kind, z);
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
impl Drop for Compressor {
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
        let gzip = [Coding::Gzip];
        let ok = |v: &str| choose(std::iter::once(v.as_bytes()), &gzip) == Some(Coding::Gzip);
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
        assert!(choose(["br", "gzip"].iter().map(|s| s.as_bytes()), &gzip).is_some());
    }

    #[test]
    fn the_client_s_weights_choose_the_coding_then_the_order_offered() {
        let both = [Coding::Zstd, Coding::Gzip];
        let pick = |v: &str, offered: &[Coding]| choose(std::iter::once(v.as_bytes()), offered);
        // Chrome's and Firefox's, over HTTPS: equal weights, so the first offered.
        assert_eq!(pick("gzip, deflate, br, zstd", &both), Some(Coding::Zstd));
        assert_eq!(
            pick("gzip, deflate, br, zstd", &[Coding::Gzip, Coding::Zstd]),
            Some(Coding::Gzip)
        );
        // A client that prefers gzip gets it.
        assert_eq!(pick("zstd;q=0.5, gzip", &both), Some(Coding::Gzip));
        assert_eq!(pick("zstd;q=0.51, gzip;q=0.5", &both), Some(Coding::Zstd));
        // Only what is offered, and only what is accepted.
        assert_eq!(pick("zstd", &[Coding::Gzip]), None);
        assert_eq!(pick("gzip, zstd;q=0", &both), Some(Coding::Gzip));
        assert_eq!(pick("ZSTD", &both), Some(Coding::Zstd));
        // `*` stands for what is not named.
        assert_eq!(pick("gzip;q=0.2, *", &both), Some(Coding::Zstd));
        assert_eq!(pick("zstd;q=0, *;q=0.3", &both), Some(Coding::Gzip));
        assert_eq!(qvalue(b"0.5"), 500);
        assert_eq!(qvalue(b"0.05"), 50);
        assert_eq!(qvalue(b"1.000"), 1000);
        assert_eq!(qvalue(b"0.1234"), 1000);
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
            let z = compress_whole(Kind::Gzip(1), text.as_bytes()).unwrap();
            assert!(z.len() < text.len() / 10, "{} bytes", z.len());
            assert_eq!(gunzip(&z), text.as_bytes());
        }
        SPARES.with(|s| assert_eq!(s.borrow().iter().filter(|(k, _)| *k == Kind::Gzip(1)).count(), 1));
        // Incompressible input larger than the first output buffer.
        let noise: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let z = compress_whole(Kind::Gzip(9), &noise).unwrap();
        assert_eq!(gunzip(&z), noise);
    }

    /// `z` decoded, as far as it goes (a flushed stream's prefix, or all of it).
    fn decode(kind: Kind, z: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = match kind {
            Kind::Gzip(_) => flate2::read::GzDecoder::new(z).read_to_end(&mut out),
            Kind::Zstd(_) => zstd::stream::read::Decoder::new(z).unwrap().read_to_end(&mut out),
            Kind::Brotli(_) => brotli::Decompressor::new(z, 4096).read_to_end(&mut out),
        };
        out
    }

    #[test]
    fn zstd_and_brotli_round_trip_whole_and_streamed_with_flushes() {
        let text = "rampart compresses text with zstd and brotli too. ".repeat(400);
        for (kind, reused) in [
            (Kind::Zstd(DEFAULT_ZSTD_LEVEL), 1),
            (Kind::Brotli(DEFAULT_BROTLI_LEVEL), 0),
        ] {
            for _ in 0..3 {
                let z = compress_whole(kind, text.as_bytes()).unwrap();
                assert!(z.len() < text.len() / 10, "{kind:?}: {} bytes", z.len());
                assert_eq!(decode(kind, &z), text.as_bytes(), "{kind:?}");
            }
            // zstd's state is reused; brotli's cannot be reset.
            SPARES.with(|s| assert_eq!(s.borrow().iter().filter(|(k, _)| *k == kind).count(), reused));
            // Streamed: each flush makes what was fed so far decodable, and the pieces
            // together are one stream.
            let mut e = take_state(kind).unwrap();
            let mut out = Vec::new();
            e.run(b"first part, ", &mut out, Flush::Sync).unwrap();
            assert_eq!(decode(kind, &out), b"first part, ", "{kind:?}");
            e.run(text.as_bytes(), &mut out, Flush::None).unwrap();
            e.run(b"end", &mut out, Flush::Sync).unwrap();
            e.run(b"", &mut out, Flush::Sync).unwrap();
            e.run(b"!", &mut out, Flush::Finish).unwrap();
            give_back(kind, e);
            assert_eq!(
                decode(kind, &out),
                [&b"first part, "[..], text.as_bytes(), b"end!"].concat(),
                "{kind:?}"
            );
        }
        // Incompressible input larger than the first output buffer, at the top levels.
        let noise: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for kind in [Kind::Zstd(MAX_ZSTD_LEVEL), Kind::Brotli(MAX_BROTLI_LEVEL)] {
            let z = compress_whole(kind, &noise).unwrap();
            assert_eq!(decode(kind, &z), noise, "{kind:?}");
        }
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
