//! Compiled host and path matching. Built once per config load; a lookup is one hash
//! probe for exact hosts plus a scan of prefixes sorted longest first.
//!
//! Order: the most specific host wins (exact, then the longest `*.suffix`, then routes
//! without a host); within a host group, the longest `path_prefix` wins. When a host
//! group has no matching prefix the lookup falls through to the less specific groups,
//! so a catch-all route still catches. Prefixes are plain string prefixes, as in nginx
//! `location /api` and Envoy `prefix`. At the same prefix, routes with conditions
//! (`methods`, `headers`, `path_regex`) come first, in config order, and one whose conditions the
//! request does not meet is passed over, so a canary route sits above its catch-all.
//!
//! Also what a host is: `valid_host` checks a `Host` value before it is routed on;
//! and what a path is: `normalize_path` removes dot segments before it is routed on.

use std::collections::HashMap;

use crate::config::{HostMatch, RouteConfig};

#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, Vec<Entry>>,
    /// `(".example.com", entries)`, longest suffix first.
    suffix: Vec<(String, Vec<Entry>)>,
    any_host: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    prefix: String,
    route: usize,
    /// The route has `methods` or `headers` conditions to check.
    conditional: bool,
}

impl Router {
    pub fn new(routes: &[RouteConfig]) -> Router {
        let mut r = Router::default();
        for (i, route) in routes.iter().enumerate() {
            let e = Entry {
                prefix: route.path_prefix.clone(),
                route: i,
                conditional: route.matches.is_some(),
            };
            match &route.host {
                None => r.any_host.push(e),
                Some(HostMatch::Exact(h)) => r.exact.entry(h.clone()).or_default().push(e),
                Some(HostMatch::Suffix(s)) => match r.suffix.iter_mut().find(|(x, _)| x == s) {
                    Some((_, v)) => v.push(e),
                    None => r.suffix.push((s.clone(), vec![e])),
                },
            }
        }
        let sort = |v: &mut Vec<Entry>| {
            v.sort_by(|a, b| {
                (b.prefix.len().cmp(&a.prefix.len()))
                    .then(b.conditional.cmp(&a.conditional))
                    .then(a.route.cmp(&b.route))
            })
        };
        r.exact.values_mut().for_each(sort);
        r.suffix.iter_mut().for_each(|(_, v)| sort(v));
        sort(&mut r.any_host);
        r.suffix.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        r
    }

    /// `host` is the request's host without port, any case. `fits` says whether the
    /// request meets a route's conditions (asked only of routes that have some).
    /// Returns the route index.
    pub fn find(&self, host: Option<&str>, path: &str, fits: &dyn Fn(usize) -> bool) -> Option<usize> {
        let first = |entries: &[Entry]| {
            entries
                .iter()
                .find(|e| path.starts_with(&e.prefix) && (!e.conditional || fits(e.route)))
                .map(|e| e.route)
        };
        if let Some(host) = host.filter(|_| !self.exact.is_empty() || !self.suffix.is_empty()) {
            let lowered;
            let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                lowered = host.to_ascii_lowercase();
                lowered.as_str()
            } else {
                host
            };
            let host = host.strip_suffix('.').unwrap_or(host);
            if let Some(r) = self.exact.get(host).and_then(|v| first(v)) {
                return Some(r);
            }
            for (suffix, entries) in &self.suffix {
                if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                    if let Some(r) = first(entries) {
                        return Some(r);
                    }
                }
            }
        }
        first(&self.any_host)
    }
}

/// A `Host` value as text, if it is `uri-host [":" port]` (RFC 9112 §3.2, RFC 3986
/// §3.2.2): an IP literal in brackets or a reg-name, then digits after one colon.
/// Anything else (a space, `/`, `\\`, `@`, `?`, a second colon) is a 400, as in
/// Envoy: a backend that builds links or cache keys from its `Host` must not get
/// one that is not a host. Percent-encoding is let through undecoded.
pub fn host_str(h: &[u8]) -> Option<&str> {
    // A byte-wise check already: `str::from_utf8` cost more than it (125 instructions
    // for a 15-byte host, under callgrind), and `HeaderValue::to_str` about as much.
    // SAFETY: `valid_host` admits ASCII bytes only, and ASCII is UTF-8.
    valid_host(h).then(|| unsafe { std::str::from_utf8_unchecked(h) })
}

fn valid_host(h: &[u8]) -> bool {
    match h.first() {
        // An http URI's host is never empty (RFC 9110 §4.2.1); nginx answers 400 too.
        None | Some(b':') => return false,
        Some(b'[') => return valid_ip_literal(&h[1..]),
        Some(_) => {}
    }
    // One pass, as this runs on every request: reg-name bytes, then digits after
    // one colon.
    let mut allowed = &REG_NAME;
    for &b in h {
        if !allowed[b as usize] {
            if b == b':' && std::ptr::eq(allowed, &REG_NAME) {
                allowed = &DIGIT;
                continue;
            }
            return false;
        }
    }
    true
}

/// After the `[`: an IPv6 (or IPv4) literal, `]`, then nothing or a port.
#[cold]
fn valid_ip_literal(rest: &[u8]) -> bool {
    let Some(end) = rest.iter().position(|&b| b == b']') else {
        return false;
    };
    let literal = &rest[..end];
    let valid = !literal.is_empty() && literal.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    valid
        && match rest[end + 1..].split_first() {
            None => true,
            Some((&b':', digits)) => digits.iter().all(u8::is_ascii_digit),
            Some(_) => false,
        }
}

/// The bytes of a reg-name: unreserved, sub-delims and `%` (RFC 3986 §3.2.2).
static REG_NAME: [bool; 256] =
    byte_set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%");

static DIGIT: [bool; 256] = byte_set(b"0123456789");

const fn byte_set(bytes: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < bytes.len() {
        t[bytes[i] as usize] = true;
        i += 1;
    }
    t
}

/// Splits `host[:port]` (or `[v6]:port`) and returns the host part.
pub fn host_without_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// The path without its dot segments (RFC 3986 §5.2.4, with `%2e` read as `.`), or
/// `None` when it has none, the common case, found in one pass without allocating.
/// Routed and forwarded as written, `/api/../internal` would match `/api` and reach
/// that pool's backend, which resolves it to `/internal`: a path the route never
/// exposed (Envoy's `normalize_path`, CVE-2019-9901). A path that climbs above the
/// root is an error, as in nginx. Empty segments (`//`) stay: merging them changes
/// what some applications mean.
pub fn normalize_path(path: &str) -> Result<Option<String>, AboveRoot> {
    if plain_path(path) {
        return Ok(None);
    }
    normalize_slow(path)
}

/// Starts with `/` and has no segment starting with `.` or `%`: nothing in it for
/// `normalize_path` to do. One pass, no allocation.
#[inline]
pub fn plain_path(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    let mut after_slash = false;
    for &c in b {
        if after_slash && (c == b'.' || c == b'%') {
            return false;
        }
        after_slash = c == b'/';
    }
    true
}

/// A path whose `..` segments climb above the root.
#[derive(Debug, PartialEq, Eq)]
pub struct AboveRoot;

#[cold]
fn normalize_slow(path: &str) -> Result<Option<String>, AboveRoot> {
    let Some(rest) = path.strip_prefix('/') else {
        return Ok(None);
    };
    let mut kept: Vec<&str> = Vec::new();
    let mut ends_in_dir = false;
    for seg in rest.split('/') {
        ends_in_dir = true;
        match dots(seg) {
            1 => {}
            2 => {
                kept.pop().ok_or(AboveRoot)?;
            }
            _ => {
                kept.push(seg);
                ends_in_dir = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for seg in &kept {
        out.push('/');
        out.push_str(seg);
    }
    if ends_in_dir || kept.is_empty() {
        out.push('/');
    }
    Ok((out != path).then_some(out))
}

/// 1 for a `.` segment, 2 for `..`, with any dot written `%2e`; 0 otherwise.
fn dots(seg: &str) -> usize {
    let mut s = seg.as_bytes();
    let mut n = 0;
    while !s.is_empty() {
        if s[0] == b'.' {
            s = &s[1..];
        } else if s.len() >= 3 && s[0] == b'%' && s[1] == b'2' && s[2].eq_ignore_ascii_case(&b'e') {
            s = &s[3..];
        } else {
            return 0;
        }
        n += 1;
        if n > 2 {
            return 0;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_checked_against_rfc_3986() {
        for ok in [
            "a.test",
            "A.Test:8080",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8443",
            "xn--bcher-kva.example",
            "a.test:",
            "..",
            "a%2eb",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok:?} should pass");
        }
        for bad in [
            "",
            ":80",
            "a b",
            "a/b",
            "a\\b",
            "a@b",
            "a?b",
            "a#b",
            "\"a\"",
            "a:b:c",
            "a.test:80x",
            "[::1",
            "[]",
            "[::1]x",
            "[::1]:8x",
            "[a/b]",
            "a\tb",
            "é.test",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?} should fail");
        }
    }

    #[test]
    fn dot_segments_are_removed_and_climbing_above_the_root_is_an_error() {
        for (path, want) in [
            ("/", None),
            ("/api/users", None),
            ("/static/app.js", None),
            ("/.well-known/acme", None),
            ("/a//b", None),
            ("/a/%41", None),
            ("/api/../internal", Some("/internal")),
            ("/api/%2e%2E/internal", Some("/internal")),
            ("/api/.%2e/internal", Some("/internal")),
            ("/a/./b", Some("/a/b")),
            ("/a/%2e/b", Some("/a/b")),
            ("/a/b/..", Some("/a/")),
            ("/a/b/.", Some("/a/b/")),
            ("/a/..", Some("/")),
            ("/.", Some("/")),
            ("/a/.../b", None),
            ("/a/..b/c", None),
        ] {
            assert_eq!(normalize_path(path), Ok(want.map(String::from)), "{path}");
        }
        for bad in ["/..", "/../etc/passwd", "/a/../../b", "/%2e%2e/x"] {
            assert_eq!(normalize_path(bad), Err(AboveRoot), "{bad}");
        }
    }

    fn route(host: Option<HostMatch>, prefix: &str) -> RouteConfig {
        RouteConfig {
            host,
            path_prefix: prefix.into(),
            ..RouteConfig::default()
        }
    }

    /// A router whose conditions every request meets.
    struct Finder<'a>(&'a Router);

    impl Finder<'_> {
        fn find(&self, host: Option<&str>, path: &str) -> Option<usize> {
            self.0.find(host, path, &|_| true)
        }
    }

    #[test]
    fn a_route_with_conditions_comes_before_its_catch_all_and_is_passed_over_when_unmet() {
        let canary = |prefix: &str| RouteConfig {
            matches: Some(std::sync::Arc::new(crate::config::RouteMatch::default())),
            ..route(None, prefix)
        };
        // Config order puts the catch-all first; the conditional route still wins.
        let routes = vec![route(None, "/"), canary("/"), route(None, "/api"), canary("/")];
        let r = Router::new(&routes);
        assert_eq!(r.find(None, "/x", &|_| true), Some(1));
        assert_eq!(r.find(None, "/x", &|i| i == 3), Some(3));
        assert_eq!(r.find(None, "/x", &|_| false), Some(0));
        // A longer prefix still beats a conditional shorter one.
        assert_eq!(r.find(None, "/api/x", &|_| true), Some(2));
    }

    #[test]
    fn most_specific_host_then_longest_prefix_wins() {
        let routes = vec![
            route(None, "/"),
            route(None, "/api"),
            route(Some(HostMatch::Exact("a.example.com".into())), "/"),
            route(Some(HostMatch::Suffix(".example.com".into())), "/"),
            route(Some(HostMatch::Exact("a.example.com".into())), "/api/v2"),
        ];
        let router = Router::new(&routes);
        let r = Finder(&router);
        assert_eq!(r.find(None, "/x"), Some(0));
        assert_eq!(r.find(None, "/api/x"), Some(1));
        assert_eq!(r.find(Some("A.Example.com"), "/x"), Some(2));
        assert_eq!(r.find(Some("a.example.com"), "/api/v2/z"), Some(4));
        assert_eq!(r.find(Some("b.example.com"), "/api"), Some(3));
        assert_eq!(r.find(Some("example.com"), "/api"), Some(1), "apex is not a subdomain");
        assert_eq!(r.find(Some("other.org"), "/"), Some(0));
    }

    #[test]
    fn no_match_without_catch_all() {
        let router = Router::new(&[route(Some(HostMatch::Exact("a".into())), "/only")]);
        let r = Finder(&router);
        assert_eq!(r.find(Some("a"), "/other"), None);
        assert_eq!(r.find(Some("b"), "/only"), None);
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(host_without_port("example.com:8080"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:80"), "::1");
    }
}
