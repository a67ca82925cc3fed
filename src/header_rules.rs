//! A route's header rules (`request_headers`, `response_headers`): fields to remove,
//! set (replacing any the message had) and add (appending), with static values, as
//! nginx's `proxy_set_header` and `add_header ... always`, HAProxy's
//! `http-request`/`http-response set-header`, `add-header` and `del-header`, and
//! Envoy's `request_headers_to_add`/`_to_remove`. Parsed and checked with the config;
//! applied by `proxy` to a request's map before it goes to the backend, and to every
//! response to a request the route matched.
//!
//! Fields rampart writes itself (framing, hop-by-hop, `X-Forwarded-*`, `Via`,
//! `x-request-id`) are refused, so a rule can never fight them or break framing.

use http::{HeaderMap, HeaderName, HeaderValue};

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
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderRules {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }

    /// The `Host` a request rule sets, which replaces the one rampart would send.
    pub fn host(&self) -> Option<&HeaderValue> {
        self.set.iter().find(|(n, _)| n == http::header::HOST).map(|(_, v)| v)
    }
}

/// Why rampart keeps a field to itself, or `None` when a rule may touch it.
fn reserved(name: &HeaderName, dir: Direction, setting: bool) -> Option<&'static str> {
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
                        let value = match value.as_str().map(HeaderValue::from_str) {
                            Some(Ok(v)) => v,
                            Some(Err(_)) => {
                                errors.push((at, "the value may not contain control characters".to_string()));
                                continue;
                            }
                            None => {
                                errors.push((at, format!("expected a string value, got {}", value.type_str())));
                                continue;
                            }
                        };
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
        rules.apply(&mut h);
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
