//! Header fields kept as their sender wrote them, in both directions: a backend
//! response's fields for the client side to copy straight out (`RawFields`), and a
//! plain client request's fields for the backend side to copy (`RawRequest`). Owns
//! which fields may pass that way and turning them back into a `HeaderMap` for
//! whoever needs one (hyper, for HTTP/2 clients and the connections it serves).
//! Parsing is `codec` and `h1`; writing is `h1` and `codec`.
//!
//! Why: building a `HeaderMap` from a head (a name lookup, a hash and an insert per
//! field, two allocations, and freeing it all after the write) cost about 1,100
//! instructions per proxied response and 700 per request under callgrind, for fields
//! that go out byte for byte anyway. nginx passes the lines the same way.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH};

use crate::codec::{eq_lower, header_name, Span};

/// Runs of adjacent field lines kept at most. A head whose kept lines fall into more
/// runs (many dropped fields between them) goes into a `HeaderMap` as before.
const MAX_RUNS: usize = 4;

/// Kept field lines of one response head: whole lines, CRLF included, in runs over
/// the head's bytes. Hop-by-hop fields, `Content-Length` (the client side frames the
/// body itself) and `x-request-id` (the proxy sets its own) are left out.
#[derive(Debug, Clone)]
pub struct RawFields {
    head: Bytes,
    runs: [(u32, u32); MAX_RUNS],
    len: u8,
    /// A `Date` field is among them.
    pub has_date: bool,
    /// The `Content-Length` the backend declared, when the body is framed by it.
    pub declared: Option<u64>,
}

impl RawFields {
    /// The kept fields of `head`, given where each field lies (`spans`, as
    /// `codec::parse_response` found them), or `None` when they cannot pass as they
    /// are: too many runs, or a line not ended by CRLF (a bare LF, which clients
    /// would then get too).
    pub fn build(head: &Bytes, spans: &[Span], declared: Option<u64>) -> Option<RawFields> {
        let mut raw = RawFields {
            head: head.clone(),
            runs: [(0, 0); MAX_RUNS],
            len: 0,
            has_date: false,
            declared,
        };
        for &(ns, ne, _, ve) in spans {
            let name = &head[ns as usize..ne as usize];
            if eq_lower(name, b"content-length") || eq_lower(name, b"x-request-id") {
                continue;
            }
            raw.has_date |= eq_lower(name, b"date");
            // httparse has trimmed the value: the line ends at the next LF.
            let end = ve as usize + head[ve as usize..].iter().position(|&b| b == b'\n')? + 1;
            if head[end - 2] != b'\r' {
                return None;
            }
            let end = end as u32;
            match raw.runs[..raw.len as usize].last_mut() {
                Some(run) if run.1 == ns => run.1 = end,
                _ if (raw.len as usize) < MAX_RUNS => {
                    raw.runs[raw.len as usize] = (ns, end);
                    raw.len += 1;
                }
                _ => return None,
            }
        }
        Some(raw)
    }

    /// The first value of field `name`; `Content-Length` is the one declared.
    pub fn find(&self, name: &HeaderName) -> Option<HeaderValue> {
        if name == CONTENT_LENGTH {
            return self.declared.map(HeaderValue::from);
        }
        self.runs[..self.len as usize]
            .iter()
            .find_map(|&(s, e)| first_value(&self.head, s as usize, e as usize, name))
    }

    /// Appends the field lines to a head being written.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        for &(s, e) in &self.runs[..self.len as usize] {
            out.extend_from_slice(&self.head[s as usize..e as usize]);
        }
    }

    /// The fields as a map, `Content-Length` included, followed by `extra`'s.
    pub fn into_header_map(self, extra: HeaderMap) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(8 + extra.len());
        for &(s, e) in &self.runs[..self.len as usize] {
            append_lines(&mut map, &self.head, s as usize, e as usize);
        }
        if let Some(n) = self.declared {
            map.insert(CONTENT_LENGTH, HeaderValue::from(n));
        }
        let mut last = None;
        for (name, value) in extra {
            if let Some(n) = name {
                last = Some(n);
            }
            if let Some(n) = &last {
                map.append(n.clone(), value);
            }
        }
        map
    }
}

/// Each field line in `head[start..end]` (whole lines, as httparse accepted them):
/// its name, and where its value (without surrounding whitespace) lies in `head`.
fn field_lines(head: &Bytes, start: usize, end: usize) -> impl Iterator<Item = (&[u8], std::ops::Range<usize>)> {
    let mut at = start;
    std::iter::from_fn(move || {
        while at < end {
            let line_start = at;
            let line = &head[at..end];
            at += line.iter().position(|&b| b == b'\n').map_or(line.len(), |p| p + 1);
            let line = &head[line_start..at];
            if let Some(colon) = line.iter().position(|&b| b == b':') {
                let rest = &line[colon + 1..];
                let v = line_start + colon + 1 + (rest.len() - rest.trim_ascii_start().len());
                return Some((&line[..colon], v..v + rest.trim_ascii().len()));
            }
        }
        None
    })
}

/// Appends the field lines `head[start..end]` to `map`.
fn append_lines(map: &mut HeaderMap, head: &Bytes, start: usize, end: usize) {
    for (name, value) in field_lines(head, start, end) {
        if let Some(name) = header_name(name) {
            // SAFETY: httparse accepted this line's value, as in
            // `codec::parse_response`, which builds its map the same way.
            map.append(name, unsafe {
                HeaderValue::from_maybe_shared_unchecked(head.slice(value))
            });
        }
    }
}

/// A client request's fields as the client wrote them, for a request that `h1` serves
/// and whose fields need no rewriting: no body, and none of the fields rampart removes,
/// replaces or extends (`request_field_passes`). The request's own map is then empty.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// Whole field lines, CRLF included, in the client's order.
    pub block: Bytes,
    /// The first `Host` and `x-request-id` values.
    pub host: Option<HeaderValue>,
    pub request_id: Option<HeaderValue>,
    /// The header block's size as `server.max_header_bytes` counts it.
    pub bytes: usize,
}

impl RawRequest {
    /// The fields as a map (for a consistent-hash key taken from a header or cookie).
    pub fn header_map(&self) -> HeaderMap {
        block_map(&self.block)
    }
}

/// The first value of field `name` in a `RawRequest::block` (for the access log's
/// `$http_NAME`), sharing the block's bytes.
pub fn find(block: &Bytes, name: &HeaderName) -> Option<HeaderValue> {
    first_value(block, 0, block.len(), name)
}

/// The first value of field `name` among the lines `head[start..end]`.
fn first_value(head: &Bytes, start: usize, end: usize, name: &HeaderName) -> Option<HeaderValue> {
    let want = name.as_str().as_bytes();
    field_lines(head, start, end)
        .find(|(n, _)| eq_lower(n, want))
        .and_then(|(_, value)| HeaderValue::from_maybe_shared(head.slice(value)).ok())
}

/// Every value of field `name` (lowercase) in a `RawRequest::block`, as written.
pub fn values<'a>(block: &'a Bytes, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    field_lines(block, 0, block.len())
        .filter(move |(n, _)| eq_lower(n, name))
        .map(move |(_, value)| &block[value])
}

/// A `RawRequest::block` as a map (a route's request header rules need one).
pub fn block_map(block: &Bytes) -> HeaderMap {
    let mut map = HeaderMap::new();
    append_lines(&mut map, block, 0, block.len());
    map
}

/// Whether a request field may go to the backend as the client wrote it: not
/// hop-by-hop (`proxy::HOP_BY_HOP`, `Upgrade`, `Expect`), not one rampart replaces or
/// extends or removes (`X-Forwarded-*`, `Via`), not framing (`Content-Length`), and not
/// `Idempotency-Key`, which the retry decision reads from the map
/// (`retry::is_replay_safe`).
pub fn request_field_passes(name: &[u8]) -> bool {
    !match name.len() {
        2 => eq_lower(name, b"te"),
        3 => eq_lower(name, b"via"),
        6 => eq_lower(name, b"expect"),
        7 => eq_lower(name, b"upgrade") || eq_lower(name, b"trailer"),
        10 => eq_lower(name, b"connection") || eq_lower(name, b"keep-alive"),
        14 => eq_lower(name, b"content-length"),
        15 => eq_lower(name, b"x-forwarded-for") || eq_lower(name, b"idempotency-key"),
        16 => eq_lower(name, b"proxy-connection") || eq_lower(name, b"x-forwarded-host"),
        17 => eq_lower(name, b"transfer-encoding") || eq_lower(name, b"x-forwarded-proto"),
        18 => eq_lower(name, b"proxy-authenticate"),
        19 => eq_lower(name, b"proxy-authorization"),
        23 => eq_lower(name, b"x-forwarded-client-cert"),
        _ => false,
    }
}

/// Where the field lines of a head lie in `buf`, given each field's span: `None`
/// unless they follow each other and each ends with CRLF (a bare LF would reach the
/// backend too). With no fields, an empty range.
pub fn field_block(buf: &[u8], spans: &[[u32; 4]]) -> Option<(usize, usize)> {
    let Some(first) = spans.first() else {
        return Some((0, 0));
    };
    let mut at = first[0] as usize;
    for &[ns, _, _, ve] in spans {
        if ns as usize != at {
            return None;
        }
        let ve = ve as usize;
        let lf = ve + buf.get(ve..)?.iter().position(|&b| b == b'\n')?;
        if buf[lf - 1] != b'\r' {
            return None;
        }
        at = lf + 1;
    }
    Some((first[0] as usize, at))
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};
    use http::header::HeaderName;

    use crate::codec::{parse_response, Head};

    #[test]
    fn find_reads_the_first_value_of_a_field_in_a_block() {
        let block = Bytes::from_static(b"Host: a\r\nUser-Agent:  x y \r\nuser-agent: z\r\nX-Agent: no\r\nAgent: w\r\n");
        let find = |n: &'static str| super::find(&block, &HeaderName::from_static(n));
        assert_eq!(find("user-agent").unwrap(), "x y");
        assert_eq!(find("agent").unwrap(), "w");
        assert_eq!(find("host").unwrap(), "a");
        assert!(find("referer").is_none());
        assert!(super::find(&Bytes::new(), &HeaderName::from_static("host")).is_none());
    }

    fn head(raw: &str) -> Head {
        parse_response(&mut BytesMut::from(raw), false, true, &mut Vec::new())
            .unwrap()
            .unwrap()
    }

    fn written(h: &Head) -> String {
        let mut out = Vec::new();
        h.raw().expect("raw fields").write_to(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn kept_lines_pass_as_written_without_framing_hop_by_hop_or_request_id() {
        let h = head(
            "HTTP/1.1 200 OK\r\nServer: x\r\nDate: d\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\
             X-Request-Id: theirs\r\nSet-Cookie: a=1\r\nset-cookie:  b=2 \r\n\r\n",
        );
        assert!(h.map().is_none());
        assert_eq!(
            written(&h),
            "Server: x\r\nDate: d\r\nSet-Cookie: a=1\r\nset-cookie:  b=2 \r\n"
        );
        let raw = h.raw().unwrap();
        assert!(raw.has_date);
        assert_eq!(raw.declared, Some(3));
    }

    #[test]
    fn chunked_responses_declare_no_length() {
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nx: 1\r\n\r\n");
        assert_eq!(written(&h), "x: 1\r\n");
        assert_eq!(h.raw().unwrap().declared, None);
        assert!(!h.raw().unwrap().has_date);
    }

    #[test]
    fn bare_lf_lines_and_scattered_fields_take_the_map() {
        let h = head("HTTP/1.1 200 OK\nServer: x\nContent-Length: 0\n\n");
        assert!(h.raw().is_none());
        assert_eq!(h.map().unwrap()["server"], "x");
        // Five runs of kept lines, split by dropped ones.
        let h = head(
            "HTTP/1.1 200 OK\r\na: 1\r\nkeep-alive: x\r\nb: 2\r\nte: x\r\nc: 3\r\ntrailer: x\r\nd: 4\r\n\
             proxy-connection: x\r\ne: 5\r\ncontent-length: 0\r\n\r\n",
        );
        assert!(h.raw().is_none());
        assert_eq!(h.map().unwrap().len(), 6, "{:?}", h.map());
        // Four runs still pass.
        let h = head("HTTP/1.1 200 OK\r\na: 1\r\nkeep-alive: x\r\nb: 2\r\nte: x\r\nc: 3\r\ntrailer: x\r\nd: 4\r\n\r\n");
        assert_eq!(written(&h), "a: 1\r\nb: 2\r\nc: 3\r\nd: 4\r\n");
    }

    #[test]
    fn the_map_form_holds_the_same_fields_then_the_extra_ones() {
        let h = head("HTTP/1.1 200 OK\r\nX-A:   v w  \r\nx-a: 2\r\nContent-Length: 7\r\nDate: d\r\n\r\n");
        let mut extra = http::HeaderMap::new();
        extra.insert("x-request-id", "ours".parse().unwrap());
        let map = h.raw().unwrap().clone().into_header_map(extra);
        let a: Vec<_> = map.get_all("x-a").iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(a, ["v w", "2"]);
        assert_eq!(map["content-length"], "7");
        assert_eq!(map["date"], "d");
        assert_eq!(map["x-request-id"], "ours");
        assert_eq!(map.len(), 5);
        assert!(map
            .keys()
            .all(|k: &HeaderName| k.as_str() == k.as_str().to_ascii_lowercase()));
    }
}
