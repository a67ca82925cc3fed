//! A route's header rules (`request_headers`, `response_headers`): fields to remove,
//! set (replacing any the message had) and add (appending), with values fixed or
//! made per message from nginx-style variables (`$remote_addr`, `$host`, ...), as
//! nginx's `proxy_set_header` and `add_header ... always`, HAProxy's
//! `http-request`/`http-response set-header`, `add-header` and `del-header`, and
//! Envoy's `request_headers_to_add`/`_to_remove`. Parsed and checked with the config;
//! applied by `proxy` to a request's map before it goes to the backend, and to every
//! response to a request the route matched.
//!
//! Fields rampart writes itself (framing, hop-by-hop, `X-Forwarded-*`, `Via`,
//! `x-request-id`) are refused, so a rule can never fight them or break framing.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::codec::AddedFields;

/// Which message a set of rules is for: the fields each may not touch differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// One route's rules for one direction, applied in this order: remove, set, add.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRules {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, Value)>,
    pub add: Vec<(HeaderName, Value)>,
    /// Some value names a variable: values are made per message.
    templated: bool,
}

/// A rule's value: fixed, or text with variables (`$remote_addr`, nginx's syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Fixed(HeaderValue),
    Template(Box<[Part]>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(Bytes),
    Var(Var),
}

/// The variables a value may name, each with nginx's name and meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    /// The client's IP address (the PROXY protocol's source, on such a listener).
    RemoteAddr,
    RemotePort,
    /// `http` or `https`: how the client reached rampart.
    Scheme,
    /// The request's host, lowercased, without its port. Requests only.
    Host,
    /// The path and query as routed (before a `prefix_rewrite` or `path_rewrite`). Requests only.
    RequestUri,
    RequestMethod,
    RequestId,
    /// A request field's values, joined with ", ", as they go to the backend before
    /// the rules apply. Requests only.
    Http(HeaderName),
    /// The user the request's `Authorization: Basic` names (checked when the route
    /// has `basic_auth`). Requests only.
    RemoteUser,
    /// The backend that answered, `IP:port`; empty for rampart's own answers.
    /// Responses only.
    UpstreamAddr,
    /// What a TLS connection negotiated (`tls::TlsFacts`); empty over plain HTTP.
    SslProtocol,
    SslCipher,
    SslServerName,
    SslClientSDn,
    SslClientVerify,
    /// The port the client connected to, as nginx's `$server_port`:
    /// `X-Forwarded-Port` for apps that build absolute URLs.
    ServerPort,
    /// The time the value is made, in seconds since the epoch with milliseconds
    /// (`1733580000.123`), as nginx's `$msec`: `X-Request-Start: t=${msec}` is how
    /// New Relic, Datadog and Scout measure the time a request queued before the app.
    Msec,
}

/// What one message's variables are made from.
pub struct Vars<'a> {
    pub remote_ip: &'a HeaderValue,
    pub remote_port: u16,
    /// The port the client connected to.
    pub server_port: u16,
    pub scheme: &'a HeaderValue,
    pub method: &'a Method,
    pub request_id: &'a HeaderValue,
    /// The host the request was routed on, as written (requests).
    pub host: Option<&'a HeaderValue>,
    /// The path and query as routed, before any `prefix_rewrite` or `path_rewrite` (requests).
    pub target: Option<&'a str>,
    /// The fields rampart adds to the request (requests).
    pub added: Option<&'a AddedFields>,
    pub upstream: Option<SocketAddr>,
    /// The connection's TLS, if it has any.
    pub tls: Option<&'a crate::tls::TlsFacts>,
}

impl HeaderRules {
    /// Applies the rules to `headers`. A value that comes out empty is not sent: a
    /// `set` then only removes the field, and an `add` adds nothing (nginx's
    /// `proxy_set_header`, Envoy's default `keep_empty_value: false`). For request
    /// rules `headers` is the request, which `$http_NAME` reads before any rule
    /// changes it.
    pub fn apply(&self, headers: &mut HeaderMap, vars: &Vars) {
        if !self.templated {
            return self.apply_values(headers, |_, v| match v {
                Value::Fixed(v) => (!v.is_empty()).then(|| v.clone()),
                Value::Template(_) => None,
            });
        }
        let mut values: Vec<Option<HeaderValue>> = self
            .set
            .iter()
            .chain(&self.add)
            .map(|(_, v)| v.resolve(vars, headers))
            .collect();
        self.apply_values(headers, |i, _| values[i].take());
    }

    /// Remove, set, add, with the `i`th set-or-add rule's value from `value`.
    fn apply_values(&self, headers: &mut HeaderMap, mut value: impl FnMut(usize, &Value) -> Option<HeaderValue>) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (i, (name, v)) in self.set.iter().enumerate() {
            match value(i, v) {
                Some(v) => {
                    headers.insert(name.clone(), v);
                }
                None => {
                    headers.remove(name);
                }
            }
        }
        let base = self.set.len();
        for (i, (name, v)) in self.add.iter().enumerate() {
            if let Some(v) = value(base + i, v) {
                headers.append(name.clone(), v);
            }
        }
    }

    /// The rules set the request's `Host`, which replaces the one rampart would send.
    pub fn sets_host(&self) -> bool {
        self.set.iter().any(|(n, _)| n == http::header::HOST)
    }
}

impl Value {
    pub(crate) fn resolve(&self, vars: &Vars, request: &HeaderMap) -> Option<HeaderValue> {
        let parts = match self {
            Value::Fixed(v) => return (!v.is_empty()).then(|| v.clone()),
            Value::Template(parts) => parts,
        };
        let mut out = Vec::with_capacity(64);
        for part in parts.iter() {
            match part {
                Part::Text(t) => out.extend_from_slice(t),
                Part::Var(var) => var.write(vars, request, &mut out),
            }
        }
        if out.is_empty() {
            return None;
        }
        HeaderValue::from_maybe_shared(Bytes::from(out)).ok()
    }
}

impl Var {
    fn write(&self, vars: &Vars, request: &HeaderMap, out: &mut Vec<u8>) {
        use std::io::Write;
        match self {
            Var::RemoteAddr => out.extend_from_slice(vars.remote_ip.as_bytes()),
            Var::RemotePort => {
                let _ = write!(out, "{}", vars.remote_port);
            }
            Var::Scheme => out.extend_from_slice(vars.scheme.as_bytes()),
            Var::Host => {
                if let Some(h) = vars.host {
                    out.extend(host_only(h.as_bytes()).iter().map(u8::to_ascii_lowercase));
                }
            }
            Var::RequestUri => {
                if let Some(target) = vars.target {
                    out.extend_from_slice(target.as_bytes());
                }
            }
            Var::RequestMethod => out.extend_from_slice(vars.method.as_str().as_bytes()),
            Var::RequestId => out.extend_from_slice(vars.request_id.as_bytes()),
            Var::Http(name) => {
                let mut values = request.get_all(name).iter().peekable();
                if values.peek().is_none() {
                    if let Some(v) = vars.added.and_then(|a| a.get(name.as_str())) {
                        out.extend_from_slice(v.as_bytes());
                    }
                    return;
                }
                for (i, v) in values.enumerate() {
                    if i > 0 {
                        out.extend_from_slice(b", ");
                    }
                    out.extend_from_slice(v.as_bytes());
                }
            }
            Var::RemoteUser => {
                if let Some(user) = request
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| crate::auth::user_of(v.as_bytes()))
                {
                    out.extend_from_slice(&user);
                }
            }
            Var::UpstreamAddr => {
                if let Some(a) = vars.upstream {
                    let _ = write!(out, "{a}");
                }
            }
            Var::ServerPort => {
                let _ = write!(out, "{}", vars.server_port);
            }
            Var::Msec => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let _ = write!(out, "{}.{:03}", now.as_secs(), now.subsec_millis());
            }
            Var::SslProtocol | Var::SslCipher | Var::SslServerName | Var::SslClientSDn | Var::SslClientVerify => {
                if let Some(t) = vars.tls {
                    out.extend_from_slice(match self {
                        Var::SslProtocol => t.protocol.as_bytes(),
                        Var::SslCipher => t.cipher.as_bytes(),
                        Var::SslServerName => t.server_name.as_ref().map_or(&b""[..], |v| v.as_bytes()),
                        Var::SslClientSDn => t.client_subject.as_ref().map_or(&b""[..], |v| v.as_bytes()),
                        _ => t.client_verify.as_bytes(),
                    });
                }
            }
        }
    }
}

/// A Host value without its port; an IPv6 literal keeps its brackets, as nginx's
/// `$host` does.
fn host_only(host: &[u8]) -> &[u8] {
    if host.first() == Some(&b'[') {
        return match host.iter().position(|&b| b == b']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.iter().rposition(|&b| b == b':') {
        Some(colon) if host[colon + 1..].iter().all(u8::is_ascii_digit) => &host[..colon],
        _ => host,
    }
}

/// The variables by name, for errors.
const VARIABLES: &str = "$remote_addr, $remote_port, $scheme, $host, $request_uri, $request_method, $request_id, $remote_user, $http_NAME, $upstream_addr, $ssl_protocol, $ssl_cipher, $ssl_server_name, $ssl_client_s_dn, $ssl_client_verify, $server_port, $msec";

/// Parses a rule's value: text with `$name` or `${name}` variables, and `$$` for a
/// literal `$`.
pub(crate) fn parse_value(text: &str, dir: Direction) -> Result<Value, String> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        literal.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, next) = if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                Some(end) => (&inner[..end], &inner[end + 1..]),
                None => return Err(format!("`${{` without its `}}` in {text:?}")),
            }
        } else if let Some(next) = after.strip_prefix('$') {
            literal.push('$');
            rest = next;
            continue;
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        if name.is_empty() {
            return Err(format!(
                "`$` must start a variable ({VARIABLES}); write `$$` for a literal `$`"
            ));
        }
        let var = variable(name, dir)?;
        if !literal.is_empty() {
            parts.push(Part::Text(text_bytes(&std::mem::take(&mut literal))?));
        }
        parts.push(Part::Var(var));
        rest = next;
    }
    literal.push_str(rest);
    if parts.is_empty() {
        return text_value(&literal).map(Value::Fixed);
    }
    if !literal.is_empty() {
        parts.push(Part::Text(text_bytes(&literal)?));
    }
    Ok(Value::Template(parts.into()))
}

fn text_value(text: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(text).map_err(|_| "the value may not contain control characters".to_string())
}

fn text_bytes(text: &str) -> Result<Bytes, String> {
    text_value(text).map(|_| Bytes::copy_from_slice(text.as_bytes()))
}

fn variable(name: &str, dir: Direction) -> Result<Var, String> {
    let var = match name {
        "remote_addr" => Var::RemoteAddr,
        "remote_port" => Var::RemotePort,
        "scheme" => Var::Scheme,
        "host" => Var::Host,
        "request_uri" => Var::RequestUri,
        "request_method" => Var::RequestMethod,
        "request_id" => Var::RequestId,
        "remote_user" => Var::RemoteUser,
        "upstream_addr" => Var::UpstreamAddr,
        "ssl_protocol" => Var::SslProtocol,
        "ssl_cipher" => Var::SslCipher,
        "ssl_server_name" => Var::SslServerName,
        "ssl_client_s_dn" => Var::SslClientSDn,
        "ssl_client_verify" => Var::SslClientVerify,
        "msec" => Var::Msec,
        "server_port" => Var::ServerPort,
        _ => match name.strip_prefix("http_") {
            Some(field) if !field.is_empty() => {
                let field = field.replace('_', "-").to_ascii_lowercase();
                match HeaderName::from_bytes(field.as_bytes()) {
                    Ok(n) => Var::Http(n),
                    Err(_) => return Err(format!("${name}: {field:?} is not a valid header name")),
                }
            }
            _ => return Err(format!("unknown variable ${name}; known: {VARIABLES}")),
        },
    };
    match (&var, dir) {
        (Var::Host | Var::RequestUri | Var::Http(_) | Var::RemoteUser, Direction::Response) => {
            Err(format!("${name} is known only for requests (`request_headers`)"))
        }
        (Var::UpstreamAddr, Direction::Request) => Err(format!(
            "${name} is known only for responses (`response_headers`): no backend is chosen when request rules apply"
        )),
        _ => Ok(var),
    }
}

/// Why rampart keeps a field to itself, or `None` when a rule may touch it.
pub fn reserved(name: &HeaderName, dir: Direction, setting: bool) -> Option<&'static str> {
    match name.as_str() {
        "content-length" | "transfer-encoding" | "trailer" => Some("rampart frames every message itself"),
        "connection" | "keep-alive" | "proxy-connection" | "te" | "upgrade" => {
            Some("it is hop-by-hop: rampart removes it and manages its own connections")
        }
        "x-request-id" => Some("rampart sets it (the client's, or one it generates) on both sides"),
        "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" | "x-forwarded-client-cert" | "via"
            if dir == Direction::Request =>
        {
            Some("rampart sets it on every request (README, \"Headers\")")
        }
        "expect" if dir == Direction::Request => Some("rampart answers `100-continue` itself"),
        // Host may be set (the backend's own name, as `proxy_set_header Host`), not
        // removed: HTTP/1.1 requires one.
        "host" if dir == Direction::Response => None,
        "host" if !setting => Some("an HTTP/1.1 request must carry a Host; `set` it instead"),
        _ => None,
    }
}

/// Parses one direction's rules from a TOML table `{ remove = [...], set = {...},
/// add = {...} }`. Every problem is reported, with its field path under `path`.
pub fn parse(value: &toml::Value, path: &str, dir: Direction, errors: &mut Vec<(String, String)>) -> HeaderRules {
    let mut rules = HeaderRules::default();
    let Some(table) = value.as_table() else {
        errors.push((
            path.to_string(),
            format!(
                "expected a table {{ remove = [NAMES], set = {{ NAME = VALUE }}, add = {{ NAME = VALUE }} }}, got {}",
                value.type_str()
            ),
        ));
        return rules;
    };
    for (key, v) in table {
        let at = format!("{path}.{key}");
        match key.as_str() {
            "remove" => match v.as_array() {
                Some(names) => {
                    for (i, n) in names.iter().enumerate() {
                        let at = format!("{at}[{i}]");
                        match n.as_str().map(|s| name_of(s, dir, false)) {
                            Some(Ok(name)) => rules.remove.push(name),
                            Some(Err(e)) => errors.push((at, e)),
                            None => errors.push((at, format!("expected a header name, got {}", n.type_str()))),
                        }
                    }
                }
                None => errors.push((at, format!("expected a list of header names, got {}", v.type_str()))),
            },
            "set" | "add" => match v.as_table() {
                Some(fields) => {
                    for (n, value) in fields {
                        let at = format!("{at}.{n}");
                        let name = match name_of(n, dir, key == "set") {
                            Ok(name) => name,
                            Err(e) => {
                                errors.push((at, e));
                                continue;
                            }
                        };
                        let value = match value.as_str().map(|v| parse_value(v, dir)) {
                            Some(Ok(v)) => v,
                            Some(Err(e)) => {
                                errors.push((at, e));
                                continue;
                            }
                            None => {
                                errors.push((at, format!("expected a string value, got {}", value.type_str())));
                                continue;
                            }
                        };
                        rules.templated |= matches!(value, Value::Template(_));
                        let list = if key == "set" { &mut rules.set } else { &mut rules.add };
                        list.push((name, value));
                    }
                }
                None => errors.push((
                    at,
                    format!("expected a table of NAME = \"value\", got {}", v.type_str()),
                )),
            },
            _ => errors.push((at, "unknown field; expected `remove`, `set` or `add`".to_string())),
        }
    }
    // Removing a field the same rules set or add says two things at once.
    for name in &rules.remove {
        if rules.set.iter().chain(&rules.add).any(|(n, _)| n == name) {
            errors.push((
                format!("{path}.remove"),
                format!("{name} is also set or added; `set` alone replaces it"),
            ));
        }
    }
    rules
}

fn name_of(text: &str, dir: Direction, setting: bool) -> Result<HeaderName, String> {
    let name = HeaderName::from_bytes(text.as_bytes()).map_err(|_| format!("{text:?} is not a valid header name"))?;
    match reserved(&name, dir, setting) {
        Some(why) => Err(format!("{name} cannot be changed here: {why}")),
        None => Ok(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str, dir: Direction) -> (HeaderRules, Vec<String>) {
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("r = {text}")).unwrap()["r"].clone();
        let mut errors = Vec::new();
        let rules = parse(&value, "routes[0].request_headers", dir, &mut errors);
        (rules, errors.into_iter().map(|(p, m)| format!("{p}: {m}")).collect())
    }

    fn with_vars<R>(f: impl FnOnce(&Vars) -> R) -> R {
        let (ip, scheme, id) = (
            HeaderValue::from_static("10.1.2.3"),
            HeaderValue::from_static("https"),
            HeaderValue::from_static("req-7"),
        );
        let host = HeaderValue::from_static("App.Example:8443");

        f(&Vars {
            remote_ip: &ip,
            remote_port: 5555,
            server_port: 8443,
            scheme: &scheme,
            method: &Method::PUT,
            request_id: &id,
            host: Some(&host),
            target: Some("/a/b?c=1"),
            added: None,
            upstream: Some("127.0.0.1:9001".parse().unwrap()),
            tls: None,
        })
    }

    #[test]
    fn variables_are_filled_per_message() {
        let (rules, errors) = parse_text(
            r#"{ set = { "X-Real-IP" = "$remote_addr", "X-Who" = "${remote_addr}:$remote_port via $scheme to $server_port", "X-Target" = "$request_method $host$request_uri", "X-Copy" = "[$http_x_tag]", "X-Id" = "$request_id", "X-Gone" = "$http_x_absent", "X-Cost" = "$$5" }, add = { "X-Tag" = "$http_x_absent" } }"#,
            Direction::Request,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let mut h = HeaderMap::new();
        h.append("x-tag", HeaderValue::from_static("a"));
        h.append("x-tag", HeaderValue::from_static("b"));
        h.append("x-gone", HeaderValue::from_static("client's"));
        with_vars(|vars| rules.apply(&mut h, vars));
        let get = |n: &str| h.get(n).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(get("x-real-ip").as_deref(), Some("10.1.2.3"));
        assert_eq!(get("x-who").as_deref(), Some("10.1.2.3:5555 via https to 8443"));
        assert_eq!(get("x-target").as_deref(), Some("PUT app.example/a/b?c=1"));
        // `$http_NAME` reads the fields before the rules change them.
        assert_eq!(get("x-copy").as_deref(), Some("[a, b]"));
        assert_eq!(get("x-id").as_deref(), Some("req-7"));
        assert_eq!(get("x-cost").as_deref(), Some("$5"));
        // Empty values are not sent: a `set` removes, an `add` adds nothing.
        assert_eq!(get("x-gone"), None);
        assert_eq!(h.get_all("x-tag").iter().count(), 2);

        let (rules, errors) = parse_text(r#"{ set = { "X-Upstream" = "$upstream_addr" } }"#, Direction::Response);
        assert!(errors.is_empty(), "{errors:?}");
        let mut h = HeaderMap::new();
        with_vars(|vars| rules.apply(&mut h, vars));
        assert_eq!(h["x-upstream"], "127.0.0.1:9001");

        // `$msec`: now, in seconds with milliseconds, on either side.
        for dir in [Direction::Request, Direction::Response] {
            let (rules, errors) = parse_text(r#"{ set = { "X-Request-Start" = "t=${msec}" } }"#, dir);
            assert!(errors.is_empty(), "{errors:?}");
            let before = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            let mut h = HeaderMap::new();
            with_vars(|vars| rules.apply(&mut h, vars));
            let after = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            let v = h["x-request-start"].to_str().unwrap();
            let (secs, millis) = v.strip_prefix("t=").unwrap().split_once('.').unwrap();
            assert_eq!(millis.len(), 3, "{v}");
            let at = secs.parse::<u64>().unwrap() * 1000 + millis.parse::<u64>().unwrap();
            assert!(
                (before.as_millis() as u64..=after.as_millis() as u64).contains(&at),
                "{v} not between {before:?} and {after:?}"
            );
        }
    }

    #[test]
    fn host_keeps_an_ipv6_literal_whole() {
        assert_eq!(host_only(b"[::1]:8080"), b"[::1]");
        assert_eq!(host_only(b"[::1]"), b"[::1]");
        assert_eq!(host_only(b"example.com:80"), b"example.com");
        assert_eq!(host_only(b"example.com"), b"example.com");
    }

    #[test]
    fn bad_variables_are_refused() {
        let (_, errors) = parse_text(
            r#"{ set = { "X-A" = "$nope", "X-B" = "cost: $5", "X-C" = "${remote_addr", "X-D" = "$upstream_addr", "X-E" = "$ alone" } }"#,
            Direction::Request,
        );
        let all = errors.join("\n");
        for want in [
            "set.X-A: unknown variable $nope; known: $remote_addr,",
            "set.X-B: unknown variable $5",
            "set.X-C: `${` without its `}`",
            "set.X-D: $upstream_addr is known only for responses",
            "set.X-E: `$` must start a variable",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        let (_, errors) = parse_text(
            r#"{ add = { "X-A" = "$host", "X-B" = "$http_cookie", "X-C" = "$request_uri" } }"#,
            Direction::Response,
        );
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors.iter().all(|e| e.contains("known only for requests")),
            "{errors:?}"
        );
    }

    #[test]
    fn rules_remove_then_set_then_add() {
        let (rules, errors) = parse_text(
            r#"{ remove = ["X-Debug"], set = { "X-Env" = "prod" }, add = { "X-Tag" = "b" } }"#,
            Direction::Request,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let mut h = HeaderMap::new();
        h.append("x-debug", HeaderValue::from_static("1"));
        h.append("x-env", HeaderValue::from_static("dev"));
        h.append("x-env", HeaderValue::from_static("test"));
        h.append("x-tag", HeaderValue::from_static("a"));
        with_vars(|vars| rules.apply(&mut h, vars));
        assert!(!h.contains_key("x-debug"));
        assert_eq!(h.get_all("x-env").iter().collect::<Vec<_>>(), ["prod"]);
        assert_eq!(h.get_all("x-tag").iter().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn fields_rampart_writes_and_bad_names_and_values_are_refused() {
        let (_, errors) = parse_text(
            r#"{ remove = ["Host", "Content-Length", 3], set = { "X-Forwarded-For" = "1.2.3.4", "Bad Name" = "x", "X-Ok" = "a\u0001b", Host = "app.internal" }, add = { Host = "x", "X-Num" = 5 }, colour = 1 }"#,
            Direction::Request,
        );
        let all = errors.join("\n");
        for want in [
            "routes[0].request_headers.remove[0]: host cannot be changed here: an HTTP/1.1 request must carry a Host",
            "routes[0].request_headers.remove[1]: content-length cannot be changed here: rampart frames",
            "routes[0].request_headers.remove[2]: expected a header name, got integer",
            "routes[0].request_headers.set.X-Forwarded-For: x-forwarded-for cannot be changed here: rampart sets it",
            "routes[0].request_headers.set.Bad Name: \"Bad Name\" is not a valid header name",
            "routes[0].request_headers.set.X-Ok: the value may not contain control characters",
            "routes[0].request_headers.add.Host: host cannot be changed here",
            "routes[0].request_headers.add.X-Num: expected a string value, got integer",
            "routes[0].request_headers.colour: unknown field",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert!(!all.contains("set.Host"), "Host may be set: {all}");
        // On responses, X-Forwarded-For is the backend's business; x-request-id is not.
        let (rules, errors) = parse_text(
            r#"{ remove = ["X-Forwarded-For", "x-request-id"] }"#,
            Direction::Response,
        );
        assert_eq!(rules.remove, ["x-forwarded-for"]);
        assert_eq!(errors.len(), 1, "{errors:?}");
    }

    #[test]
    fn removing_what_is_also_set_is_an_error() {
        let (_, errors) = parse_text(r#"{ remove = ["X-A"], set = { "x-a" = "1" } }"#, Direction::Response);
        assert_eq!(
            errors,
            ["routes[0].request_headers.remove: x-a is also set or added; `set` alone replaces it"]
        );
    }
}
