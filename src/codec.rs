//! The HTTP/1.1 wire format on the backend side, as pure functions over buffers:
//! encoding a request head, parsing a response head (with `httparse`, the parser
//! hyper uses), deciding how the response body is framed (RFC 9112 §6.3), and
//! decoding a chunked body. No sockets here: `upstream` does the I/O.
//!
//! rampart speaks HTTP/1.1 to backends itself rather than through hyper's client:
//! hyper's client runs each connection as a separate task fed through a channel, which
//! cost about a third of the proxy's instructions per request under callgrind. The
//! server side (clients, HTTP/2) stays on hyper.

use std::mem::MaybeUninit;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

use crate::rawfields::RawFields;

/// The most header fields a backend response may carry (hyper's default too).
pub const MAX_HEADERS: usize = 100;
/// The largest response head accepted, status line to blank line.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The longest chunk-size line (with extensions) and the most trailer bytes accepted.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// How a request body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqFraming {
    /// No body, or one whose `Content-Length` header is sent as the client gave it.
    AsIs,
    /// A body of known length: `Content-Length` written here, the client's dropped.
    Length(u64),
    /// A body of unknown length: `Transfer-Encoding: chunked`.
    Chunked,
}

/// Fields the proxy adds to a request (`X-Forwarded-*`, `Via`, ...). They are kept
/// apart from the client's `HeaderMap` and written straight onto the wire: five map
/// inserts per request cost more than the encoding itself.
#[derive(Clone, Debug, Default)]
pub struct AddedFields {
    /// `Host`, when the client sent none (HTTP/2 sends `:authority`): written first,
    /// as RFC 9112 §3.2 asks.
    pub host: Option<HeaderValue>,
    /// The request names no host at all (HTTP/1.0 without `Host`): the backend's
    /// address is written as `Host`, which HTTP/1.1 requires, as nginx writes its
    /// upstream's name.
    pub host_from_backend: bool,
    /// The request asks to switch protocols (its `Connection: upgrade` and `Upgrade`
    /// are kept in the map): it goes to one backend, never hedged. A flag, because
    /// looking the field up in the map per request cost ~120 instructions.
    pub upgrade: bool,
    /// Filled from the front; the first `None` ends the list.
    fields: [(&'static str, Option<HeaderValue>); ADDED_MAX],
}

/// How many fields `AddedFields` holds besides `Host`.
const ADDED_MAX: usize = 6;

impl AddedFields {
    /// Adds a field, written after the client's in the order added. `name` must be
    /// lowercase. Past capacity (a programming error) the field is dropped.
    pub fn push(&mut self, name: &'static str, value: HeaderValue) {
        let free = self.fields.iter_mut().find(|(_, v)| v.is_none());
        debug_assert!(free.is_some(), "AddedFields is full");
        if let Some(slot) = free {
            *slot = (name, Some(value));
        }
    }

    /// The fields after `Host`, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &HeaderValue)> {
        self.fields.iter().map_while(|(n, v)| v.as_ref().map(|v| (*n, v)))
    }

    /// The value of an added field (`host` included).
    pub fn get(&self, name: &str) -> Option<&HeaderValue> {
        if name == "host" {
            return self.host.as_ref();
        }
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// A request head as it goes to backends. One per client request, shared (`Rc`) by
/// every try and hedge of it, so a retry costs no copy of the head.
#[derive(Debug, Clone)]
pub struct UpHead {
    pub method: Method,
    /// In origin form.
    pub uri: Uri,
    /// The client's fields, less the hop-by-hop ones.
    pub headers: HeaderMap,
    /// Or the client's fields as it wrote them, whole CRLF lines, when none needed
    /// rewriting (`rawfields::RawRequest`): no framing or hop-by-hop field among them.
    pub raw: Option<Bytes>,
    pub added: AddedFields,
    /// The response's fields may stay as the backend wrote them (`Head::raw`): its
    /// client is written by `h1`, which copies them out. Hyper (HTTP/2 clients, and
    /// the HTTP/1.1 requests `h1` hands over) takes a `HeaderMap`, so building one
    /// straight from the head costs less than keeping the lines and converting them.
    pub raw_response: bool,
}

impl UpHead {
    /// The client's fields as a map: those the HTTP/1.1 fast path kept as written
    /// (`raw`) are parsed into it, after any already there.
    pub fn fields_to_map(&mut self) {
        let Some(raw) = self.raw.take() else {
            return;
        };
        let mut map = crate::rawfields::block_map(&raw);
        // `drain` names a field once, then yields its further values unnamed.
        let mut name = None;
        for (n, value) in self.headers.drain() {
            name = n.or(name);
            if let Some(n) = &name {
                map.append(n.clone(), value);
            }
        }
        self.headers = map;
    }
}

/// Writes the request line and header block for an origin-form request to `backend`.
pub fn encode_request_head(dst: &mut Vec<u8>, head: &UpHead, framing: ReqFraming, backend: SocketAddr) {
    dst.clear();
    dst.extend_from_slice(head.method.as_str().as_bytes());
    dst.push(b' ');
    match head.uri.path_and_query() {
        Some(pq) if !pq.as_str().is_empty() => dst.extend_from_slice(pq.as_str().as_bytes()),
        _ => dst.push(b'/'),
    }
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = &head.added.host {
        push_field(dst, "host", host);
    } else if head.added.host_from_backend {
        use std::io::Write;
        // Writing to a Vec cannot fail.
        let _ = write!(dst, "host: {backend}\r\n");
    }
    if let Some(raw) = &head.raw {
        dst.extend_from_slice(raw);
    }
    let skip_length = !matches!(framing, ReqFraming::AsIs);
    for (name, value) in &head.headers {
        if (skip_length && name == header::CONTENT_LENGTH) || name == header::TRANSFER_ENCODING {
            continue;
        }
        push_field(dst, name.as_str(), value);
    }
    for (name, value) in head.added.iter() {
        push_field(dst, name, value);
    }
    match framing {
        ReqFraming::AsIs => {}
        ReqFraming::Length(n) => {
            dst.extend_from_slice(b"content-length: ");
            push_decimal(dst, n);
            dst.extend_from_slice(b"\r\n");
        }
        ReqFraming::Chunked => dst.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    dst.extend_from_slice(b"\r\n");
}

fn push_field(dst: &mut Vec<u8>, name: &str, value: &HeaderValue) {
    dst.extend_from_slice(name.as_bytes());
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value.as_bytes());
    dst.extend_from_slice(b"\r\n");
}

/// `n` in decimal (also the access log's numbers, `accesslog`).
pub(crate) fn push_decimal(dst: &mut Vec<u8>, n: u64) {
    let len = n.checked_ilog10().unwrap_or(0) as usize + 1;
    push_digits(dst, n, len);
}

/// The last `len` decimal digits of `n`, zero-padded. Written straight into the
/// vector's spare room: a `push` per digit, or a copy from a digit buffer (a `memcpy`
/// call), cost more than the digits (callgrind: 70-110 instructions a number).
pub(crate) fn push_digits(dst: &mut Vec<u8>, mut n: u64, len: usize) {
    dst.reserve(len);
    for slot in dst.spare_capacity_mut()[..len].iter_mut().rev() {
        slot.write(b'0' + (n % 10) as u8);
        n /= 10;
    }
    // SAFETY: the `len` bytes past the length were written just above.
    unsafe { dst.set_len(dst.len() + len) };
}

/// The chunk-size line for `len` bytes of data: hex digits and CRLF.
pub fn chunk_header(len: usize) -> ([u8; 18], usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 18];
    let digits = ((usize::BITS - len.leading_zeros()).max(1)).div_ceil(4) as usize;
    for (i, b) in out[..digits].iter_mut().enumerate() {
        *b = HEX[(len >> (4 * (digits - 1 - i))) & 0xf];
    }
    out[digits] = b'\r';
    out[digits + 1] = b'\n';
    (out, digits + 2)
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    /// `Content-Length`: this many bytes remain.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Neither: the body ends when the backend closes the connection.
    UntilClose,
}

/// Where one header field lies in the head: name start and end, value start and end.
pub type Span = (u32, u32, u32, u32);

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub fields: RespFields,
    pub framing: Framing,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

/// Where a response's fields are kept: one or the other, so the raw path carries no
/// empty map (dropping one cost ~85 instructions a request).
#[derive(Debug)]
pub enum RespFields {
    /// As the backend wrote them, when they can pass that way.
    Raw(RawFields),
    Map(HeaderMap),
}

impl Head {
    /// All the fields as one map, wherever they are kept.
    pub fn header_map(&self) -> HeaderMap {
        match &self.fields {
            RespFields::Raw(raw) => raw.clone().into_header_map(HeaderMap::new()),
            RespFields::Map(map) => map.clone(),
        }
    }

    /// The fields as written, if they are kept that way.
    pub fn raw(&self) -> Option<&RawFields> {
        match &self.fields {
            RespFields::Raw(raw) => Some(raw),
            RespFields::Map(_) => None,
        }
    }

    /// The fields' map, if they are kept in one.
    pub fn map(&self) -> Option<&HeaderMap> {
        match &self.fields {
            RespFields::Raw(_) => None,
            RespFields::Map(map) => Some(map),
        }
    }
}

/// Parses one response head from the front of `buf`. `Ok(None)`: incomplete, read
/// more. On success the head's bytes are split off `buf` (the header values share
/// them, uncopied), leaving whatever followed. `head_request`: the request was HEAD,
/// so the response has no body whatever its headers say. `raw_ok`: the fields may stay
/// as written (`UpHead::raw_response`).
///
/// The framing fields are read as the fields go by, and the hop-by-hop ones
/// (`Connection`, `Keep-Alive`, `Transfer-Encoding`, ...) are dropped: they describe
/// this connection, not the response, and the client side frames anew. The rest
/// usually stay as the backend wrote them (`Head::raw`, see `rawfields`); without
/// `raw_ok`, a 101, a `Connection` that names other fields (kept, for `proxy` to remove those) or a head
/// that `RawFields` cannot carry get a `HeaderMap` instead.
pub fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
    raw_ok: bool,
    spans: &mut Vec<Span>,
) -> Result<Option<Head>, &'static str> {
    // Each kept field's position in `buf`, so that the values become slices of the
    // frozen head, as in hyper. `spans` is the caller's, kept for its capacity: a
    // fresh array here was zeroed on every response.
    spans.clear();
    let mut f = FramingFields::default();
    let (len, code, minor) = {
        let mut raw = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut raw) {
            Ok(httparse::Status::Complete(n)) if n > MAX_HEAD_BYTES => return Err("response head too large"),
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => return Err("response head too large"),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err("too many response header fields"),
            Err(_) => return Err("malformed response head"),
        };
        let base = buf.as_ptr() as usize;
        for h in resp.headers.iter() {
            if !f.note(h.name, h.value) {
                continue;
            }
            let n = (h.name.as_ptr() as usize - base) as u32;
            let v = (h.value.as_ptr() as usize - base) as u32;
            spans.push((n, n + h.name.len() as u32, v, v + h.value.len() as u32));
        }
        (len, resp.code.unwrap_or(0), resp.version.unwrap_or(1))
    };
    let status = StatusCode::from_u16(code).map_err(|_| "invalid status code")?;
    let version = if minor == 0 { Version::HTTP_10 } else { Version::HTTP_11 };
    let mut keep_alive = !f.close && (version == Version::HTTP_11 || f.keep_alive);
    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if f.transfer_encoding {
        // Only `chunked` can be passed on: the client side frames the body anew and
        // `Transfer-Encoding` is hop-by-hop, so a `gzip` coding would reach the client
        // unlabelled, as if it were the content. nginx answers 502 too.
        if f.other_coding || !f.chunked {
            return Err("unsupported transfer coding");
        }
        // RFC 9112 §6.3: Transfer-Encoding wins over Content-Length, and a message
        // with both may be an attack on some hop: never reuse that connection.
        if f.content_length != LengthField::Absent {
            keep_alive = false;
        }
        Framing::Chunked
    } else {
        match f.content_length {
            LengthField::Absent => {
                keep_alive = false;
                Framing::UntilClose
            }
            LengthField::Invalid => return Err("invalid Content-Length"),
            LengthField::Value(n) => Framing::Length(n),
        }
    };
    let head = buf.split_to(len).freeze();
    // A `Connection` field that names others is kept for `proxy` to act on, and a 101
    // is rewritten there too: both take the map.
    let declared = match (f.transfer_encoding, f.content_length) {
        (false, LengthField::Value(n)) => Some(n),
        _ => None,
    };
    let raw = if !raw_ok || f.names_others || status == StatusCode::SWITCHING_PROTOCOLS {
        None
    } else {
        RawFields::build(&head, spans, declared)
    };
    if let Some(raw) = raw {
        return Ok(Some(Head {
            status,
            version,
            fields: RespFields::Raw(raw),
            framing,
            keep_alive,
        }));
    }
    let mut headers = HeaderMap::with_capacity(spans.len());
    for &(ns, ne, vs, ve) in spans.iter() {
        let name = header_name(&head[ns as usize..ne as usize]).ok_or("invalid header name")?;
        if f.transfer_encoding && name == header::CONTENT_LENGTH {
            continue;
        }
        // SAFETY: httparse accepted this value, and it accepts only the bytes a
        // HeaderValue may hold (HTAB, SP, VCHAR, obs-text), as hyper relies on too;
        // the check again cost ~1% of a request's instructions.
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(vs as usize..ve as usize)) };
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        version,
        fields: RespFields::Map(headers),
        framing,
        keep_alive,
    }))
}

/// A field name as a `HeaderName`. The names common servers, browsers, curl and load
/// tools send, spelled as they send them, are matched as they are:
/// `HeaderName::from_bytes` lowercases the name and then looks it up, which was ~150
/// instructions a field (a browser's nine-field request head took 488 ns to parse
/// that way, 432 ns with its names here: `cargo bench --bench hotpath -- h1/parse`).
/// Serves both the backend's response heads and `h1`'s request heads.
pub(crate) fn header_name(raw: &[u8]) -> Option<HeaderName> {
    Some(match raw {
        // Responses.
        b"Server" | b"server" => header::SERVER,
        b"Date" | b"date" => header::DATE,
        b"Content-Type" | b"content-type" => header::CONTENT_TYPE,
        b"Content-Length" | b"content-length" => header::CONTENT_LENGTH,
        b"Last-Modified" | b"last-modified" => header::LAST_MODIFIED,
        b"ETag" | b"etag" => header::ETAG,
        b"Accept-Ranges" | b"accept-ranges" => header::ACCEPT_RANGES,
        b"Cache-Control" | b"cache-control" => header::CACHE_CONTROL,
        b"Vary" | b"vary" => header::VARY,
        b"Set-Cookie" | b"set-cookie" => header::SET_COOKIE,
        b"Location" | b"location" => header::LOCATION,
        b"Expires" | b"expires" => header::EXPIRES,
        // Requests.
        b"Host" | b"host" => header::HOST,
        b"User-Agent" | b"user-agent" => header::USER_AGENT,
        b"Accept" | b"accept" => header::ACCEPT,
        b"Accept-Encoding" | b"accept-encoding" => header::ACCEPT_ENCODING,
        b"Accept-Language" | b"accept-language" => header::ACCEPT_LANGUAGE,
        b"Connection" | b"connection" => header::CONNECTION,
        b"Cookie" | b"cookie" => header::COOKIE,
        b"Referer" | b"referer" => header::REFERER,
        b"Authorization" | b"authorization" => header::AUTHORIZATION,
        b"If-None-Match" | b"if-none-match" => header::IF_NONE_MATCH,
        b"If-Modified-Since" | b"if-modified-since" => header::IF_MODIFIED_SINCE,
        b"Origin" | b"origin" => header::ORIGIN,
        b"Pragma" | b"pragma" => header::PRAGMA,
        b"Upgrade-Insecure-Requests" | b"upgrade-insecure-requests" => header::UPGRADE_INSECURE_REQUESTS,
        _ => return HeaderName::from_bytes(raw).ok(),
    })
}

/// What the framing and connection fields of a response head said.
#[derive(Default)]
struct FramingFields {
    content_length: LengthField,
    transfer_encoding: bool,
    /// `chunked` is named once, and last.
    chunked: bool,
    /// A coding besides `chunked`, or `chunked` twice: rampart frames the body anew
    /// for the client and could only pass it on mislabelled.
    other_coding: bool,
    close: bool,
    keep_alive: bool,
    /// A `Connection` field names other fields (hop-by-hop too).
    names_others: bool,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum LengthField {
    #[default]
    Absent,
    Value(u64),
    /// Unparsable, or values that disagree.
    Invalid,
}

impl FramingFields {
    /// Notes one field; returns whether it belongs in the response's header map.
    fn note(&mut self, name: &str, value: &[u8]) -> bool {
        let is = |n: &str| eq_lower(name.as_bytes(), n.as_bytes());
        match name.len() {
            14 if is("content-length") => {
                self.content_length = match (self.content_length, parse_length(value)) {
                    (LengthField::Absent, Some(n)) => LengthField::Value(n),
                    (LengthField::Value(a), Some(b)) if a == b => LengthField::Value(a),
                    _ => LengthField::Invalid,
                };
                true
            }
            17 if is("transfer-encoding") => {
                self.transfer_encoding = true;
                for t in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if eq_lower(t, b"chunked") {
                        self.other_coding |= self.chunked;
                        self.chunked = true;
                    } else if !t.is_empty() {
                        // Even before a `chunked`: that one would not be last.
                        self.other_coding = true;
                    }
                }
                false
            }
            10 if is("connection") => {
                let t = connection_tokens(value);
                self.close |= t.close;
                self.keep_alive |= t.keep_alive;
                self.names_others |= t.other;
                t.other
            }
            10 if is("keep-alive") => false,
            16 if is("proxy-connection") => false,
            2 if is("te") => false,
            7 if is("trailer") => false,
            _ => true,
        }
    }
}

/// `name` equals `lower` ignoring ASCII case, where `lower` holds only lowercase
/// letters, digits and `-`: eight bytes per step, not one. OR-ing 0x20 folds case,
/// and maps nothing else onto those characters except CR and bytes 0x10-0x19, which
/// httparse admits in neither names nor values. Field names and tokens are compared
/// this way several times per message; byte by byte it was ~1.5% of a request.
#[inline]
pub(crate) fn eq_lower(name: &[u8], lower: &[u8]) -> bool {
    debug_assert!(lower
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-'));
    if name.len() != lower.len() {
        return false;
    }
    let (mut a, mut b) = (name, lower);
    while let (Some((x, ra)), Some((y, rb))) = (a.split_first_chunk::<8>(), b.split_first_chunk::<8>()) {
        if u64::from_ne_bytes(*x) | 0x2020_2020_2020_2020 != u64::from_ne_bytes(*y) {
            return false;
        }
        (a, b) = (ra, rb);
    }
    a.iter().zip(b).all(|(x, y)| x | 0x20 == *y)
}

/// What the tokens of one `Connection` field say.
#[derive(Default, Clone, Copy)]
pub(crate) struct ConnectionTokens {
    pub close: bool,
    pub keep_alive: bool,
    /// A token other than `close`, `keep-alive` and `upgrade`: a field it names is
    /// hop-by-hop too.
    pub other: bool,
}

/// Reads one `Connection` field's value, for requests (`h1`) and responses alike.
pub(crate) fn connection_tokens(value: &[u8]) -> ConnectionTokens {
    let mut t = ConnectionTokens::default();
    for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if eq_lower(token, b"close") {
            t.close = true;
        } else if eq_lower(token, b"keep-alive") {
            t.keep_alive = true;
        } else if !token.is_empty() && !eq_lower(token, b"upgrade") {
            t.other = true;
        }
    }
    t
}

/// A `Content-Length` value: digits, or a comma list of equal numbers.
fn parse_length(value: &[u8]) -> Option<u64> {
    let mut found = None;
    for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + (d - b'0') as u64);
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

/// What one step of body decoding produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// `buf` holds too little to go on: read more.
    NeedMore,
    /// The body is complete; `buf` holds only what followed it.
    End,
}

/// Where a chunked body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Chunked {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
    Done,
}

impl Chunked {
    /// Decodes from the front of `buf`, consuming what it uses. Always inlined: it was
    /// into `upstream::UpBody` until a health check became its second caller.
    #[inline(always)]
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, &'static str> {
        loop {
            match *self {
                Chunked::Size => {
                    let Some(line) = take_line(buf, MAX_CHUNK_LINE, "chunk size line too long")? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = parse_chunk_size(&line)?;
                    *self = if size == 0 {
                        Chunked::Trailers(0)
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = left.min(buf.len() as u64);
                    *self = if n == left {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left - n)
                    };
                    return Ok(Decoded::Data(buf.split_to(n as usize).freeze()));
                }
                Chunked::DataEnd => {
                    let Some(line) = take_line(buf, 2, "missing CRLF after chunk data")? else {
                        return Ok(Decoded::NeedMore);
                    };
                    if !line.is_empty() {
                        return Err("missing CRLF after chunk data");
                    }
                    *self = Chunked::Size;
                }
                Chunked::Trailers(seen) => {
                    let Some(line) = take_line(buf, MAX_TRAILER_BYTES - seen, "trailers too large")? else {
                        return Ok(Decoded::NeedMore);
                    };
                    // Trailers are dropped: HTTP/1.1 clients rarely accept them.
                    *self = if line.is_empty() {
                        Chunked::Done
                    } else {
                        Chunked::Trailers(seen + line.len() + 2)
                    };
                }
                Chunked::Done => return Ok(Decoded::End),
            }
        }
    }
}

/// Takes one line (without its CRLF or bare LF) off the front of `buf`, if a whole one
/// is there; a line longer than `max` is an error.
fn take_line(buf: &mut BytesMut, max: usize, too_long: &'static str) -> Result<Option<BytesMut>, &'static str> {
    match buf.iter().take(max + 2).position(|&b| b == b'\n') {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > max + 1 => Err(too_long),
        None => Ok(None),
    }
}

/// Hex digits, then optional whitespace and `;extensions`, which are ignored.
fn parse_chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err("invalid chunk size");
    }
    let rest = &line[digits..];
    let rest = &rest[rest.iter().take_while(|&&b| b == b' ' || b == b'\t').count()..];
    if !(rest.is_empty() || rest[0] == b';') {
        return Err("invalid chunk size");
    }
    let mut n = 0u64;
    for &b in &line[..digits] {
        n = n * 16 + (b as char).to_digit(16).unwrap_or(0) as u64;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKEND: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 8081));

    fn parse(raw: &str, head: bool) -> Result<Option<Head>, &'static str> {
        parse_response(&mut BytesMut::from(raw), head, true, &mut Vec::new())
    }

    fn framing(raw: &str) -> (Framing, bool) {
        let h = parse(raw, false).unwrap().unwrap();
        (h.framing, h.keep_alive)
    }

    #[test]
    fn request_heads_carry_the_framing_rampart_chose() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("a"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        let mut head = UpHead {
            method: Method::POST,
            uri: "/p?q=1".parse().unwrap(),
            headers,
            raw: None,
            added: AddedFields::default(),
            raw_response: true,
        };
        let mut out = Vec::new();
        encode_request_head(&mut out, &head, ReqFraming::Length(3), BACKEND);
        assert_eq!(out, b"POST /p?q=1 HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\n");
        encode_request_head(&mut out, &head, ReqFraming::AsIs, BACKEND);
        assert_eq!(out, b"POST /p?q=1 HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\n");
        head.headers.remove(header::CONTENT_LENGTH);
        head.method = Method::PUT;
        encode_request_head(&mut out, &head, ReqFraming::Chunked, BACKEND);
        assert_eq!(
            out,
            b"PUT /p?q=1 HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let mut n = Vec::new();
        push_decimal(&mut n, 0);
        push_decimal(&mut n, 18446744073709551615);
        assert_eq!(n, b"018446744073709551615");
    }

    #[test]
    fn added_fields_follow_the_clients_and_a_missing_host_comes_first() {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        let mut added = AddedFields {
            host: Some(HeaderValue::from_static("h2.test")),
            ..AddedFields::default()
        };
        added.push("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        added.push("via", HeaderValue::from_static("2.0 rampart"));
        let head = UpHead {
            method: Method::GET,
            uri: "/".parse().unwrap(),
            headers,
            raw: None,
            added,
            raw_response: true,
        };
        let mut out = Vec::new();
        encode_request_head(&mut out, &head, ReqFraming::AsIs, BACKEND);
        assert_eq!(
            out,
            b"GET / HTTP/1.1\r\nhost: h2.test\r\naccept: */*\r\nx-forwarded-for: 10.0.0.1\r\nvia: 2.0 rampart\r\n\r\n"
        );
        assert_eq!(head.added.get("via").unwrap(), "2.0 rampart");
        assert_eq!(head.added.get("host").unwrap(), "h2.test");
        assert!(head.added.get("x-forwarded-proto").is_none());
    }

    #[test]
    fn header_values_keep_tabs_and_obs_text_and_control_bytes_are_refused() {
        let raw = b"HTTP/1.1 200 OK\r\nx-a: one\ttwo \xe9t\xe9\r\ncontent-length: 0\r\n\r\n";
        let h = parse_response(&mut BytesMut::from(&raw[..]), false, true, &mut Vec::new())
            .unwrap()
            .unwrap();
        assert_eq!(h.header_map()["x-a"].as_bytes(), b"one\ttwo \xe9t\xe9");
        for bad in [&b"\x01"[..], b"\x7f", b"\x00"] {
            let mut raw = b"HTTP/1.1 200 OK\r\nx-a: a".to_vec();
            raw.extend_from_slice(bad);
            raw.extend_from_slice(b"b\r\ncontent-length: 0\r\n\r\n");
            assert_eq!(
                parse_response(&mut BytesMut::from(&raw[..]), false, true, &mut Vec::new()).err(),
                Some("malformed response head"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn common_field_names_map_to_the_same_names_as_the_general_parser() {
        for raw in [
            "Server",
            "server",
            "Date",
            "Content-Type",
            "content-length",
            "Last-Modified",
            "ETag",
            "Accept-Ranges",
            "Cache-Control",
            "Vary",
            "Set-Cookie",
            "Location",
            "Expires",
            "X-Custom",
            "SERVER",
            "Host",
            "host",
            "User-Agent",
            "accept-encoding",
            "Upgrade-Insecure-Requests",
            "x-a",
        ] {
            assert_eq!(
                header_name(raw.as_bytes()),
                HeaderName::from_bytes(raw.as_bytes()).ok(),
                "{raw}"
            );
        }
        assert_eq!(header_name(b"bad name"), None);
        assert_eq!(header_name(b"Bad Name"), None);
    }

    #[test]
    fn names_compare_ignoring_case_only() {
        for (name, lower, eq) in [
            (&b"Content-Length"[..], &b"content-length"[..], true),
            (b"CONTENT-LENGTH", b"content-length", true),
            (b"Transfer-Encoding", b"transfer-encoding", true),
            (b"Transfer-Encodinh", b"transfer-encoding", false),
            (b"Transfer_Encoding", b"transfer-encoding", false),
            (b"content-length", b"content-lengt", false),
            (b"TE", b"te", true),
            (b"Tf", b"te", false),
            (b"Keep-Alive", b"keep-alive", true),
            (b"keep-alivf", b"keep-alive", false),
            (b"X-Request-Id", b"x-request-id", true),
            (b"", b"", true),
        ] {
            assert_eq!(eq_lower(name, lower), eq, "{:?}", String::from_utf8_lossy(name));
            assert_eq!(eq, name.eq_ignore_ascii_case(lower));
        }
    }

    #[test]
    fn chunk_headers_are_lowercase_hex() {
        for (len, want) in [
            (0usize, "0\r\n"),
            (1, "1\r\n"),
            (15, "f\r\n"),
            (16, "10\r\n"),
            (65536, "10000\r\n"),
        ] {
            let (buf, n) = chunk_header(len);
            assert_eq!(&buf[..n], want.as_bytes());
        }
        // The longest line still fits the buffer.
        assert_eq!(chunk_header(usize::MAX).1, usize::BITS as usize / 4 + 2);
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        for (wire, want) in [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                (Framing::Length(5), true),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
                (Framing::Length(5), true),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                (Framing::Chunked, true),
            ),
            ("HTTP/1.1 200 OK\r\nserver: x\r\n\r\n", (Framing::UntilClose, false)),
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
                (Framing::Empty, true),
            ),
            ("HTTP/1.1 304 Not Modified\r\n\r\n", (Framing::Empty, true)),
            (
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                (Framing::Length(1), false),
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
                (Framing::Length(1), false),
            ),
            (
                "HTTP/1.0 200 OK\r\nconnection: Keep-Alive\r\ncontent-length: 1\r\n\r\n",
                (Framing::Length(1), true),
            ),
        ] {
            assert_eq!(framing(wire), want, "{wire:?}");
        }
        // Both: chunked wins, Content-Length goes, and the connection is not reused.
        let h = parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        assert!(!h.header_map().contains_key(header::CONTENT_LENGTH));
        // Codings rampart cannot pass on: the body would reach the client unlabelled.
        for te in [
            "gzip",
            "gzip, chunked",
            "chunked, gzip",
            "chunked, chunked",
            "gzip\r\ntransfer-encoding: chunked",
        ] {
            let wire = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {te}\r\n\r\n");
            assert_eq!(parse(&wire, false).err(), Some("unsupported transfer coding"), "{te}");
        }
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding:  Chunked \r\n\r\n"),
            (Framing::Chunked, true)
        );
        assert!(
            !h.header_map().contains_key(header::TRANSFER_ENCODING),
            "hop-by-hop: not passed on"
        );
        let h = parse("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Empty, "a HEAD response has no body");
    }

    #[test]
    fn a_parsed_head_leaves_the_body_bytes_and_keeps_its_fields() {
        let mut buf = BytesMut::from("HTTP/1.1 201 Created\r\nX-A: 1\r\nx-a: 2\r\nlocation: /n\r\n\r\nbody");
        let h = parse_response(&mut buf, false, true, &mut Vec::new()).unwrap().unwrap();
        assert_eq!(h.status, StatusCode::CREATED);
        assert!(h.raw().is_some() && h.map().is_none(), "passed as written");
        let map = h.header_map();
        assert_eq!(map.get_all("x-a").iter().count(), 2);
        assert_eq!(map["location"], "/n");
        assert_eq!(&buf[..], b"body");
    }

    #[test]
    fn a_head_for_hyper_gets_a_map_even_when_its_fields_could_pass_as_written() {
        let raw = "HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a: 2\r\ncontent-length: 4\r\n\r\nbody";
        let h = parse_response(&mut BytesMut::from(raw), false, false, &mut Vec::new())
            .unwrap()
            .unwrap();
        assert!(h.raw().is_none(), "no raw fields when the client side takes a map");
        assert_eq!(h.map().unwrap().get_all("x-a").iter().count(), 2);
        assert_eq!(h.framing, Framing::Length(4));
    }

    #[test]
    fn connection_fields_stay_out_of_the_map_unless_they_name_others() {
        let h = parse(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nx: 1\r\ncontent-length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(h.keep_alive);
        assert_eq!(h.header_map().len(), 2, "{:?}", h.header_map());
        let h = parse(
            "HTTP/1.1 200 OK\r\nConnection: close, x-secret\r\nx-secret: 1\r\ncontent-length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!h.keep_alive);
        assert!(h.raw().is_none(), "a Connection naming fields takes the map");
        assert_eq!(
            h.map().unwrap()["connection"],
            "close, x-secret",
            "kept so proxy drops x-secret"
        );
    }

    #[test]
    fn bad_or_incomplete_heads_are_told_apart() {
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-le", false).unwrap().is_none());
        assert!(parse("garbage\r\n\r\n", false).is_err());
        assert!(parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            false
        )
        .is_err());
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", false).is_err());
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\n", false).is_err());
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert!(parse(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), false).is_err());
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD_BYTES));
        assert!(parse(&huge, false).is_err());
    }

    fn decode_all(chunks: &[&str]) -> Result<(Vec<u8>, BytesMut), &'static str> {
        let mut state = Chunked::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut feed = chunks.iter();
        loop {
            match state.decode(&mut buf)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::End => return Ok((out, buf)),
                Decoded::NeedMore => match feed.next() {
                    Some(c) => buf.extend_from_slice(c.as_bytes()),
                    None => return Err("ran out"),
                },
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire = "5;ext=1\r\nhello\r\nA \r\n, world!!!\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let (out, rest) = decode_all(&[wire]).unwrap();
        assert_eq!(out, b"hello, world!!!");
        assert_eq!(&rest[..], b"NEXT");
        // Byte by byte: every state waits for more correctly.
        let bytes: Vec<String> = wire.chars().map(String::from).collect();
        let split: Vec<&str> = bytes.iter().map(String::as_str).collect();
        let (out, _) = decode_all(&split).unwrap();
        assert_eq!(out, b"hello, world!!!");
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        assert!(decode_all(&["zz\r\n"]).is_err());
        assert!(decode_all(&["5\r\nhelloXX0\r\n\r\n"]).is_err());
        assert!(decode_all(&["ffffffffffffffff\r\n"]).is_err());
        assert!(decode_all(&[&"1".repeat(MAX_CHUNK_LINE + 8)]).is_err());
    }
}
