//! Core proxy behaviour over real sockets: routing, balancing, header rewriting,
//! streaming, h2c, upgrades, error mapping, limits and graceful shutdown.

mod common;

/// For tests that count the origin's connections: TCP health checks would add some.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimal_config_spreads_requests_across_the_pool() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let c = TestOrigin::start("c", Behavior::Healthy).await;
    // The shipped minimal config, pointed at the test's origins.
    let toml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/minimal.toml"))
        .unwrap()
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9901", "127.0.0.1:0")
        .replace("127.0.0.1:9001", &a.addr.to_string())
        .replace("127.0.0.1:9002", &b.addr.to_string())
        .replace("127.0.0.1:9003", &c.addr.to_string());
    let (_srv, addr) = start_proxy(&toml);
    // Eight concurrent clients, as real traffic: peak-EWMA weighs in-flight load.
    concurrent_load(addr, 240, 8).await;
    // Every backend of the shipped pool serves. Peak-EWMA does not split evenly, by
    // design: one answer slowed by this machine's load (the tests run in parallel)
    // raises that backend's cost for the EWMA's 10 s decay, and from then on it gets
    // little, however early in the run that happens (17 of 240 was seen; so were
    // failures of a 12..=144 bound, about 1 run in 80). Splitting by weight is tested
    // with round robin (`round_robin_follows_weights_exactly`); avoiding a slow
    // backend, in `peak_ewma_avoids_a_slow_backend`.
    for o in [&a, &b, &c] {
        assert!(o.hits() >= 1, "{} got none of 240", o.name);
    }
    assert_eq!(a.hits() + b.hits() + c.hits(), 240);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_follows_weights_exactly() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let c = TestOrigin::start("c", Behavior::Healthy).await;
    let toml = pool_config(&[], "balancer = \"round_robin\"").replace(
        "backends = []",
        &format!(
            "backends = [{{ addr = \"{}\", weight = 3 }}, \"{}\", \"{}\"]",
            a.addr, b.addr, c.addr
        ),
    );
    let (_srv, addr) = start_proxy(&toml);
    for _ in 0..100 {
        get(addr, "/").await;
    }
    assert_eq!((a.hits(), b.hits(), c.hits()), (60, 20, 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_balancer_reaches_every_backend() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let c = TestOrigin::start("c", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[a.addr, b.addr, c.addr], "balancer = \"random\""));
    for _ in 0..300 {
        get(addr, "/").await;
    }
    for o in [&a, &b, &c] {
        assert!((50..=150).contains(&o.hits()), "{} got {} of 300", o.name, o.hits());
    }
}

/// Sends `total` requests with `concurrency` in flight and returns per-origin counts.
async fn concurrent_load(addr: std::net::SocketAddr, total: usize, concurrency: usize) {
    let per = total / concurrency;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        set.spawn(async move {
            for _ in 0..per {
                assert_eq!(get(addr, "/").await.status, 200);
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

/// Two fast backends and one slow one under `concurrency` clients: the slow one must
/// get under a fifth of what the fast ones get together.
async fn assert_slow_backend_avoided(pool_extra: &str, slow_by: Duration, concurrency: usize) {
    let fast1 = TestOrigin::start("fast1", Behavior::Healthy).await;
    let fast2 = TestOrigin::start("fast2", Behavior::Healthy).await;
    let slow = TestOrigin::start("slow", Behavior::Slow(slow_by)).await;
    let (_srv, addr) = start_proxy(&pool_config(&[fast1.addr, fast2.addr, slow.addr], pool_extra));
    concurrent_load(addr, 240, concurrency).await;
    assert!(
        slow.hits() * 4 < fast1.hits() + fast2.hits(),
        "slow={} fast={}+{}",
        slow.hits(),
        fast1.hits(),
        fast2.hits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_sends_less_to_a_slow_backend() {
    assert_slow_backend_avoided("balancer = \"least_request\"", Duration::from_millis(100), 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_avoids_a_slow_backend() {
    assert_slow_backend_avoided("", Duration::from_millis(50), 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_a_key_on_one_backend_and_spreads_keys() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let c = TestOrigin::start("c", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(
        &[a.addr, b.addr, c.addr],
        "balancer = \"consistent_hash\"\nhash_key = \"header:x-user\"",
    ));
    let mut owners = std::collections::HashMap::new();
    for user in 0..60 {
        let u = format!("user-{user}");
        let first = get_with(addr, "/", &[("x-user", &u)]).await.text();
        for _ in 0..3 {
            assert_eq!(get_with(addr, "/", &[("x-user", &u)]).await.text(), first, "{u} moved");
        }
        *owners.entry(first).or_insert(0) += 1;
    }
    assert_eq!(owners.len(), 3, "keys should spread over all backends: {owners:?}");
}

/// `hash_key = "uri"` (nginx's `hash $request_uri consistent`, HAProxy's `balance
/// uri`): each URL stays on one backend, query included, whatever the client; with
/// `"path"`, the query does not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_by_uri_or_path_keeps_each_url_on_one_backend() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let c = TestOrigin::start("c", Behavior::Healthy).await;
    let backends = [a.addr, b.addr, c.addr];
    let (srv, addr) = start_proxy(&pool_config(
        &backends,
        "balancer = \"consistent_hash\"\nhash_key = \"uri\"",
    ));
    let mut owners = std::collections::HashMap::new();
    let mut by_query = std::collections::HashSet::new();
    for n in 0..40 {
        let target = format!("/img/{n}.png");
        let first = get(addr, &target).await.text();
        for _ in 0..2 {
            assert_eq!(get(addr, &target).await.text(), first, "{target} moved");
        }
        // Over HTTP/2 too, and with dot segments that come to the same path.
        assert_eq!(get_h2(addr, &target).await.text(), first, "{target} over h2");
        assert_eq!(get(addr, &format!("/x/..{target}")).await.text(), first);
        by_query.insert(get(addr, &format!("{target}?v=2")).await.text() == first);
        *owners.entry(first).or_insert(0) += 1;
    }
    assert_eq!(owners.len(), 3, "URLs should spread over all backends: {owners:?}");
    assert_eq!(by_query.len(), 2, "the query is part of the key");
    stop_proxy(srv).await;

    let (srv, addr) = start_proxy(&pool_config(
        &backends,
        "balancer = \"consistent_hash\"\nhash_key = \"path\"",
    ));
    for n in 0..20 {
        let first = get(addr, &format!("/doc/{n}")).await.text();
        for q in ["?a=1", "?b=2", "?c=3"] {
            assert_eq!(get(addr, &format!("/doc/{n}{q}")).await.text(), first, "/doc/{n}{q}");
        }
    }
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_by_cookie_moves_only_a_removed_backends_keys() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let c = TestOrigin::start("c", Behavior::Healthy).await;
    let extra = "balancer = \"consistent_hash\"\nhash_key = \"cookie:sid\"";
    let (srv, addr) = start_proxy(&pool_config(&[a.addr, b.addr, c.addr], extra));
    let mut before = Vec::new();
    for k in 0..60 {
        let cookie = format!("theme=dark; sid=s{k}");
        before.push(get_with(addr, "/", &[("cookie", &cookie)]).await.text());
    }
    // Reload without b: only b's keys may move.
    srv.reload(rampart::Config::parse(&pool_config(&[a.addr, c.addr], extra), "t").unwrap())
        .unwrap();
    for (k, owner) in before.iter().enumerate() {
        let cookie = format!("theme=dark; sid=s{k}");
        let now = get_with(addr, "/", &[("cookie", &cookie)]).await.text();
        if owner != "b" {
            assert_eq!(&now, owner, "key s{k} moved although its backend stayed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_host_then_longest_prefix_and_unmatched_is_404() {
    let api = TestOrigin::start("api", Behavior::Healthy).await;
    let web = TestOrigin::start("web", Behavior::Healthy).await;
    let admin = TestOrigin::start("admin", Behavior::Healthy).await;
    let toml = format!(
        r#"
[server]
workers = 1
[[listeners]]
bind = "127.0.0.1:0"
[[routes]]
host = "*.example.com"
pool = "web"
[[routes]]
host = "*.example.com"
path_prefix = "/api"
pool = "api"
[[routes]]
host = "admin.example.com"
pool = "admin"
[pools.api]
backends = ["{}"]
[pools.web]
backends = ["{}"]
[pools.admin]
backends = ["{}"]
"#,
        api.addr, web.addr, admin.addr
    );
    let (_srv, addr) = start_proxy(&toml);
    let host = |h: &'static str, p: &'static str| async move { get_with(addr, p, &[("host", h)]).await };
    assert_eq!(host("www.example.com", "/").await.text(), "web");
    assert_eq!(host("www.example.com:8080", "/api/users").await.text(), "api");
    assert_eq!(host("ADMIN.example.com", "/api").await.text(), "admin");
    let miss = host("other.org", "/").await;
    assert_eq!(miss.status, 404);
    assert!(miss.headers.contains_key("x-request-id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_rewritten_both_ways() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    let r = get_with(
        addr,
        "/hop",
        &[
            ("host", "shop.test"),
            ("connection", "x-drop-me, keep-alive"),
            ("x-drop-me", "1"),
            ("keep-alive", "timeout=5"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-client-cert", "Hash=00;Subject=\"CN=admin\""),
            ("te", "trailers"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    // Response: backend's hop-by-hop and Connection-listed fields are gone.
    assert!(!r.headers.contains_key("x-internal"), "{:?}", r.headers);
    assert!(!r.headers.contains_key("keep-alive"));
    let rid = r.headers["x-request-id"].to_str().unwrap().to_string();
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["host"], "shop.test", "Host is preserved");
    assert!(!seen.contains_key("x-drop-me"), "Connection-listed field forwarded");
    assert!(!seen.contains_key("te"));
    assert!(!seen.contains_key("keep-alive"));
    assert!(
        !seen.contains_key("x-forwarded-client-cert"),
        "a client cannot vouch for itself"
    );
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "shop.test");
    assert_eq!(seen["via"], "1.1 rampart");
    assert_eq!(seen["x-request-id"].to_str().unwrap(), rid);
    for once in [
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "via",
        "x-request-id",
    ] {
        assert_eq!(seen.get_all(once).iter().count(), 1, "{once} is sent once: {seen:?}");
    }

    // A client's own request id is kept.
    get_with(addr, "/", &[("x-request-id", "client-id-1")]).await;
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["x-request-id"], "client-id-1");
    // Alone among fields that pass as written, a forged client certificate is still
    // dropped (rampart's HTTP/1.1 fast path copies the others as they are).
    get_with(addr, "/", &[("x-forwarded-client-cert", "Hash=00"), ("x-other", "1")]).await;
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    assert!(!seen.contains_key("x-forwarded-client-cert") && seen.contains_key("x-other"));
}

/// A route whose rules change fields both ways: `Host` and two fields set, one
/// removed, one added on the request; a security header set, one added and the
/// backend's `x-custom` removed on every response.
const HEADER_RULES: &str = r#"
request_headers = { remove = ["X-Debug"], set = { Host = "app.internal", "X-Env" = "prod" }, add = { "X-Tag" = "rampart" } }
response_headers = { set = { "Strict-Transport-Security" = "max-age=63072000" }, add = { "X-Frame-Options" = "DENY" }, remove = ["X-Custom"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_header_rules_change_requests_and_every_response_over_http1_and_h2() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = pool_config(&[o.addr], NO_HEALTH_CHECKS).replacen(
        "pool = \"app\"\n",
        &format!("pool = \"app\"\n{HEADER_RULES}"),
        1,
    );
    let (srv, addr) = start_proxy(&toml);
    let sent = [
        ("host", "shop.test"),
        ("x-debug", "1"),
        ("x-env", "dev"),
        ("x-tag", "client"),
    ];
    let mut h2 = Request::get("http://shop.test/fields");
    for (k, v) in &sent[1..] {
        h2 = h2.header(*k, *v);
    }
    let h2 = h2.body(Full::new(Bytes::new())).unwrap();
    for proto in ["HTTP/1.1", "h2"] {
        let r = match proto {
            "h2" => send_h2(addr, h2.clone()).await,
            _ => get_with(addr, "/fields", &sent).await,
        };
        assert_eq!(r.status, 200, "{proto}");
        let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
        assert_eq!(
            seen.get_all("host").iter().collect::<Vec<_>>(),
            ["app.internal"],
            "{proto}: {seen:?}"
        );
        assert_eq!(
            seen["x-forwarded-host"], "shop.test",
            "{proto}: the client's host is still told"
        );
        assert!(!seen.contains_key("x-debug"), "{proto}");
        assert_eq!(seen.get_all("x-env").iter().collect::<Vec<_>>(), ["prod"], "{proto}");
        assert_eq!(
            seen.get_all("x-tag").iter().collect::<Vec<_>>(),
            ["client", "rampart"],
            "{proto}"
        );
        assert_eq!(r.headers["strict-transport-security"], "max-age=63072000", "{proto}");
        assert_eq!(r.headers["x-frame-options"], "DENY", "{proto}");
        assert!(!r.headers.contains_key("x-custom"), "{proto}: {:?}", r.headers);
        assert_eq!(
            r.headers.get_all("set-cookie").iter().count(),
            2,
            "{proto}: the rest passes"
        );
        assert_eq!(r.headers["x-request-id"], seen["x-request-id"], "{proto}");
    }
    // rampart's own answers for the route get them too: here a 503.
    o.stop();
    let r = get_with(addr, "/", &[("host", "shop.test")]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["strict-transport-security"], "max-age=63072000");
    stop_proxy(srv).await;
}

/// Values made per request from variables, as nginx's `proxy_set_header X-Real-IP
/// $remote_addr` and `add_header X-Upstream $upstream_addr`.
const VARIABLE_RULES: &str = r#"
request_headers = { set = { "X-Real-IP" = "$remote_addr", "X-Client" = "$remote_addr:$remote_port", "X-Original-URL" = "$scheme://$host$request_uri", "X-UA" = "[$http_user_agent]", "X-Seen-For" = "$http_x_forwarded_for", "X-Absent" = "$http_x_nothing", "X-Forwarded-Port" = "$server_port" } }
response_headers = { set = { "X-Upstream" = "$upstream_addr" }, add = { "X-Trace" = "$request_method $request_id" } }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rule_variables_are_filled_per_request_over_http1_and_h2() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = pool_config(&[o.addr], NO_HEALTH_CHECKS).replacen(
        "pool = \"app\"\n",
        &format!("pool = \"app\"\n{VARIABLE_RULES}"),
        1,
    );
    let (srv, addr) = start_proxy(&toml);
    let h2 = Request::get("http://Shop.Test:8080/fields?q=1")
        .header("user-agent", "tester/2")
        .header("x-absent", "the client's")
        .body(Full::new(Bytes::new()))
        .unwrap();
    for proto in ["HTTP/1.1", "h2"] {
        let r = match proto {
            "h2" => send_h2(addr, h2.clone()).await,
            _ => {
                get_with(
                    addr,
                    "/fields?q=1",
                    &[
                        ("host", "Shop.Test:8080"),
                        ("user-agent", "tester/2"),
                        ("x-absent", "the client's"),
                    ],
                )
                .await
            }
        };
        assert_eq!(r.status, 200, "{proto}");
        let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
        let got = |n: &str| seen.get(n).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(got("x-real-ip").as_deref(), Some("127.0.0.1"), "{proto}: {seen:?}");
        assert_eq!(
            got("x-forwarded-port"),
            Some(addr.port().to_string()),
            "{proto}: {seen:?}"
        );
        let client = got("x-client").unwrap_or_default();
        let port = client.strip_prefix("127.0.0.1:").map(str::parse::<u16>);
        assert!(matches!(port, Some(Ok(p)) if p > 0), "{proto}: {client:?}");
        assert_eq!(
            got("x-original-url").as_deref(),
            Some("http://shop.test/fields?q=1"),
            "{proto}"
        );
        assert_eq!(got("x-ua").as_deref(), Some("[tester/2]"), "{proto}");
        // rampart's own X-Forwarded-For, as it goes to the backend.
        assert_eq!(got("x-seen-for"), got("x-forwarded-for"), "{proto}");
        assert_eq!(got("x-seen-for").as_deref(), Some("127.0.0.1"), "{proto}");
        // A value that comes out empty is not sent, and a `set` still replaces.
        assert_eq!(got("x-absent"), None, "{proto}");
        assert_eq!(r.headers["x-upstream"], o.addr.to_string().as_str(), "{proto}");
        let trace = format!("GET {}", seen["x-request-id"].to_str().unwrap());
        assert_eq!(r.headers["x-trace"], trace.as_str(), "{proto}");
    }
    // rampart's own answer: no backend, so no X-Upstream; the rest still comes.
    o.stop();
    let r = get_with(addr, "/", &[("host", "shop.test")]).await;
    assert_eq!(r.status, 503);
    assert!(!r.headers.contains_key("x-upstream"), "{:?}", r.headers);
    assert!(r.headers["x-trace"].to_str().unwrap().starts_with("GET "));
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_rewrite_replaces_the_matched_prefix_in_the_path_the_backend_gets() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let routes = r#"
[[routes]]
path_prefix = "/api/"
prefix_rewrite = "/"
pool = "app"
request_headers = { set = { "X-Original-URI" = "$request_uri" } }

[[routes]]
path_prefix = "/v1"
prefix_rewrite = "/internal/v2"
pool = "app"

[[routes]]
path_prefix = "/legacy"
prefix_rewrite = "/"
pool = "app"

[[routes]]
pool = "app"
"#;
    let toml = pool_config(&[o.addr], NO_HEALTH_CHECKS).replacen("[[routes]]\npool = \"app\"\n", routes, 1);
    let (srv, addr) = start_proxy(&toml);
    let cases = [
        ("/api/users?id=7", "/users?id=7"),
        ("/api/", "/"),
        ("/v1/orders", "/internal/v2/orders"),
        ("/v1", "/internal/v2"),
        ("/v1beta", "/internal/v2beta"),
        ("/legacy/page", "/page"),
        ("/legacy", "/"),
        // Dot segments go before routing, so the rewrite sees the routed path.
        ("/x/../api/a", "/a"),
        // Other routes are untouched.
        ("/other?q", "/other?q"),
    ];
    assert_rewrites(addr, &o, &cases, ("/api/users?id=8", "/users?id=8")).await;
    stop_proxy(srv).await;

    let bad = pool_config(&[o.addr], "").replacen("pool = \"app\"\n", "pool = \"app\"\nprefix_rewrite = \"v2\"\n", 1);
    let err = rampart::Config::parse(&bad, "p.toml").unwrap_err().to_string();
    assert!(
        err.contains("p.toml: routes[0].prefix_rewrite: must start with '/', got \"v2\""),
        "{err}"
    );
    let bad = bad.replace("\"v2\"", "\"/a b\"");
    let err = rampart::Config::parse(&bad, "p.toml").unwrap_err().to_string();
    assert!(
        err.contains("routes[0].prefix_rewrite: \"/a b\" is not a valid path"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_rewrite_replaces_each_match_of_its_pattern_in_the_path_the_backend_gets() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let routes = r#"
[[routes]]
path_prefix = "/users/"
path_rewrite = { regex = '^/users/([0-9]+)/profile$', replace = '/profiles/${1}' }
pool = "app"
request_headers = { set = { "X-Original-URI" = "$request_uri" } }

[[routes]]
path_prefix = "/item/"
path_rewrite = { regex = '^/item/(?<id>[0-9]+)$', replace = '/item.php?id=$id' }
pool = "app"

[[routes]]
path_prefix = "/old/"
path_rewrite = { regex = '^/old/(.*)$', replace = '/new/$1?' }
pool = "app"

[[routes]]
path_prefix = "/strip"
path_rewrite = { regex = '^/strip', replace = '' }
pool = "app"

[[routes]]
path_prefix = "/docs/"
path_rewrite = { regex = '/v1/', replace = '/v2/' }
pool = "app"

[[routes]]
pool = "app"
"#;
    let toml = pool_config(&[o.addr], NO_HEALTH_CHECKS).replacen("[[routes]]\npool = \"app\"\n", routes, 1);
    let (srv, addr) = start_proxy(&toml);
    let cases = [
        ("/users/42/profile?tab=2", "/profiles/42?tab=2"),
        // No match: the path goes as it came.
        ("/users/bob/profile", "/users/bob/profile"),
        // A query the replacement makes comes first; the client's follows (nginx).
        ("/item/7?ref=mail", "/item.php?id=7&ref=mail"),
        ("/item/7", "/item.php?id=7"),
        // A replacement that ends in `?` drops the client's query.
        ("/old/a/b?utm=x", "/new/a/b"),
        // A path that comes out empty, or without its `/`, gets one.
        ("/strip", "/"),
        ("/strip/x?q", "/x?q"),
        ("/stripped", "/ped"),
        // Every match, not only the first.
        ("/docs/v1/a/v1/b", "/docs/v2/a/v2/b"),
        // Dot segments go before routing, so the pattern sees the routed path.
        ("/x/../users/9/profile", "/profiles/9"),
        ("/other?q", "/other?q"),
    ];
    assert_rewrites(addr, &o, &cases, ("/users/5/profile?x=1", "/profiles/5?x=1")).await;
    stop_proxy(srv).await;
}

/// Each `(sent, want)` over HTTP/1.1: the target `o` got; then `h2` the same over
/// HTTP/2, whose route sets `X-Original-URI` to `$request_uri`, the target as routed.
async fn assert_rewrites(addr: std::net::SocketAddr, o: &TestOrigin, cases: &[(&str, &str)], h2: (&str, &str)) {
    let target = || {
        let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
        seen[SEEN_TARGET].to_str().unwrap().to_string()
    };
    for &(sent, want) in cases {
        let r = get(addr, sent).await;
        assert_eq!(r.status, 200, "{sent}");
        assert_eq!(target(), want, "{sent}");
    }
    let req = Request::get(format!("http://test.local{}", h2.0))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send_h2(addr, req).await.status, 200);
    assert_eq!(target(), h2.1);
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["x-original-uri"], h2.0);
}

#[test]
fn a_path_rewrite_that_could_go_wrong_on_a_request_is_refused_at_load() {
    let route = |extra: &str| {
        pool_config(&["127.0.0.1:9".parse().unwrap()], "").replacen(
            "pool = \"app\"\n",
            &format!("pool = \"app\"\n{extra}\n"),
            1,
        )
    };
    assert_config_errors(
        &route("path_rewrite = { regex = '^/(a)/(?<rest>.*)$', replace = '/$3/$1x/${rest}/$name/$$/${1}x/$2' }"),
        &[
            "t.toml: routes[0].path_rewrite.replace: $3 names no group of the pattern, which has 2 (and $0, the whole match)",
            "routes[0].path_rewrite.replace: $1x names no group of the pattern, which has 2 (and $0, the whole match); for group 1 followed by \"x\", write ${1}x",
            "routes[0].path_rewrite.replace: $name names no group",
        ],
    );
    assert_config_errors(
        &route("path_rewrite = { regex = '(unclosed', replace = '/' }"),
        &["routes[0].path_rewrite.regex: not a valid pattern: "],
    );
    assert_config_errors(
        &route("path_rewrite = { regex = 'x', replace = '/a b' }"),
        &["routes[0].path_rewrite.replace: \"/a b\" is not valid in a path (percent-encode"],
    );
    assert_config_errors(
        &route("path_rewrite = { regex = 'x', replace = '/a#b' }\nrewrite_location = true"),
        &[
            "routes[0].path_rewrite.replace: \"/a#b\" is not valid in a path",
            "routes[0].rewrite_location: has no effect without prefix_rewrite",
        ],
    );
    assert_config_errors(
        &route("path_rewrite = { regex = 'x', replace = '/' }\nprefix_rewrite = \"/\""),
        &["routes[0].path_rewrite: and prefix_rewrite both rewrite the path: use one"],
    );
    let direct = pool_config(&["127.0.0.1:9".parse().unwrap()], "").replacen(
        "pool = \"app\"\n",
        "return = { status = 200 }\npath_rewrite = { regex = 'x', replace = '/' }\nprefix_rewrite = \"/\"\n",
        1,
    );
    assert_config_errors(
        &direct,
        &[
            "routes[0].path_rewrite: a route with return sends nothing to a backend: there is no path to rewrite",
            "routes[0].prefix_rewrite: a route with return sends nothing to a backend",
        ],
    );
    // A good one parses, `$$` and `${name}` included.
    let good = route("path_rewrite = { regex = '^/(?<rest>.*)$', replace = '/$$/${rest}/$0' }");
    rampart::Config::parse(&good, "t.toml").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_with_listeners_serves_only_the_listeners_it_names() {
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncWriteExt;
    let app = TestOrigin::start("app", Behavior::Healthy).await;
    let admin = TestOrigin::start("admin", Behavior::Healthy).await;
    let ops = TestOrigin::start("ops", Behavior::Healthy).await;
    let toml = format!(
        r#"
[server]
workers = 1

[[listeners]]
bind = "127.0.0.1:0"
name = "public"

[[listeners]]
bind = "127.0.0.1:0"
name = "internal"

[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
pool = "app"

[[routes]]
path_prefix = "/admin/"
pool = "admin"
listeners = ["internal"]

[[routes]]
host = "ops.test"
pool = "ops"
listeners = ["internal", "public"]

[pools.app]
backends = ["{}"]
health_check = {{ type = "none" }}

[pools.admin]
backends = ["{}"]
health_check = {{ type = "none" }}

[pools.ops]
backends = ["{}"]
health_check = {{ type = "none" }}
"#,
        app.addr, admin.addr, ops.addr
    );
    let (srv, _) = start_proxy(&toml);
    let [public, internal, unnamed] = srv.listen_addrs()[..] else {
        panic!("three listeners: {:?}", srv.listen_addrs());
    };
    for (addr, path, host, want) in [
        (internal, "/admin/users", "t", "admin"),
        // Elsewhere the route is not there: the catch-all takes the request.
        (public, "/admin/users", "t", "app"),
        (unnamed, "/admin/users", "t", "app"),
        (internal, "/", "t", "app"),
        (public, "/x", "ops.test", "ops"),
        (internal, "/admin/", "ops.test", "ops"),
        // A listener with no name serves only the routes without `listeners`.
        (unnamed, "/x", "ops.test", "app"),
    ] {
        let r = get_with(addr, path, &[("host", host)]).await;
        assert_eq!(
            (r.status.as_u16(), r.text()),
            (200, want.to_string()),
            "{addr} {host}{path}"
        );
    }
    assert_eq!(get_h2(internal, "/admin/a").await.text(), "admin");
    assert_eq!(get_h2(public, "/admin/a").await.text(), "app");
    // A keep-alive connection that went dormant still knows its listener when it wakes.
    let shared = srv.shared().clone();
    let dormant = move || shared.dormant_connections.load(Ordering::Relaxed);
    let mut conns = Vec::new();
    for addr in [internal, public] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /admin/a HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        conns.push(s);
    }
    let mut bodies = Vec::new();
    for s in &mut conns {
        bodies.push(read_one_response(s, &mut Vec::new(), false).await.1);
    }
    assert_eq!(bodies, [b"admin".to_vec(), b"app".to_vec()]);
    assert!(eventually(|| dormant() == 2).await, "both dormant, saw {}", dormant());
    let mut bodies = Vec::new();
    for s in &mut conns {
        s.write_all(b"GET /admin/b HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        bodies.push(read_one_response(s, &mut Vec::new(), false).await.1);
    }
    assert_eq!(bodies, [b"admin".to_vec(), b"app".to_vec()]);
    stop_proxy(srv).await;

    // Names that do not exist, or are not names, are config errors.
    let bad = toml
        .replacen("name = \"internal\"", "name = \"public\"", 1)
        .replacen(
            "bind = \"127.0.0.1:0\"\n\n[[routes]]",
            "bind = \"127.0.0.1:0\"\nname = \"a b\"\n\n[[routes]]",
            1,
        )
        .replacen(
            "listeners = [\"internal\"]",
            "listeners = [\"internal\", \"public\"]\n",
            1,
        )
        .replacen("listeners = [\"internal\", \"public\"]\n", "listeners = []\n", 1);
    assert_config_errors(
        &bad,
        &[
            "t.toml: listeners[1].name: \"public\" is already listeners[0]'s name",
            "listeners[2].name: \"a b\": use letters, digits, '-', '_' and '.'",
            "routes[1].listeners: is empty: no request could match (omit it for every listener)",
            "routes[2].listeners[0]: no listener is named \"internal\" (named: public)",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_renames_a_listener_applies_to_its_next_connections() {
    let app = TestOrigin::start("app", Behavior::Healthy).await;
    let admin = TestOrigin::start("admin", Behavior::Healthy).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = |name: &str| {
        format!(
            "[server]\nworkers = 1\n[[listeners]]\nbind = \"127.0.0.1:{port}\"\nname = \"{name}\"\n\
             [[routes]]\npool = \"app\"\n[[routes]]\npool = \"admin\"\nlisteners = [\"internal\"]\n\
             [[listeners]]\nbind = \"127.0.0.1:0\"\nname = \"internal\"\n\
             [pools.app]\nbackends = [\"{}\"]\nhealth_check = {{ type = \"none\" }}\n\
             [pools.admin]\nbackends = [\"{}\"]\nhealth_check = {{ type = \"none\" }}\n",
            app.addr, admin.addr
        )
    };
    let (srv, addr) = start_proxy(&config("public"));
    assert_eq!(addr.port(), port);
    assert_eq!(get(addr, "/").await.text(), "app");
    // The listener on port 0 gives its name up; the fixed one takes it.
    let renamed = config("internal").replacen("name = \"internal\"\n[pools", "name = \"other\"\n[pools", 1);
    srv.reload(rampart::Config::parse(&renamed, "t").unwrap()).unwrap();
    assert_eq!(get(addr, "/").await.text(), "admin");
    stop_proxy(srv).await;
}

/// `https_redirect` on a listener: every request on it gets the redirect, routed
/// or not (nginx's port 80 `server` with `return 301`), except on a route with
/// `https_redirect = false` (the ACME challenge); other listeners serve as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_with_https_redirect_sends_every_request_to_https() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = format!(
        r#"
[server]
workers = 1

[[listeners]]
bind = "127.0.0.1:0"
https_redirect = true

[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
host = "app.test"
pool = "app"

[[routes]]
path_prefix = "/.well-known/acme-challenge/"
pool = "app"
https_redirect = false

[pools.app]
backends = ["{}"]
health_check = {{ type = "none" }}
"#,
        o.addr
    );
    let (srv, _) = start_proxy(&toml);
    let [redirecting, plain] = srv.listen_addrs()[..] else {
        panic!("two listeners");
    };
    let r = get_with(redirecting, "/a?b=1", &[("host", "App.Test:8080")]).await;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "https://app.test/a?b=1");
    // No route for this host: redirected all the same, not a 404.
    let r = get_with(redirecting, "/z", &[("host", "other.test")]).await;
    assert_eq!(
        (r.status.as_u16(), r.headers["location"].to_str().unwrap()),
        (301, "https://other.test/z")
    );
    let r = post_bytes(redirecting, "/form", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(r.status, 308, "a POST keeps its method");
    // The challenge is served over plain HTTP (for a host with routes of its own,
    // the route must name it: the most specific host wins).
    let r = get_with(
        redirecting,
        "/.well-known/acme-challenge/tok",
        &[("host", "other.test")],
    )
    .await;
    assert_eq!((r.status.as_u16(), r.text()), (200, "o".to_string()));
    assert_eq!(o.hits(), 1);
    // The other listener serves, and 404s what has no route.
    assert_eq!(get_with(plain, "/a", &[("host", "app.test")]).await.text(), "o");
    assert_eq!(get_with(plain, "/z", &[("host", "other.test")]).await.status, 404);
    stop_proxy(srv).await;

    let tls = toml.replacen(
        "https_redirect = true\n",
        "https_redirect = true\ntls = { certificates = [{ cert = \"c.pem\", key = \"k.pem\" }] }\n",
        1,
    );
    assert_config_errors(
        &tls,
        &["listeners[0].https_redirect: a TLS listener's requests came over HTTPS already: set it on the plain-HTTP listener"],
    );
}

#[test]
fn header_rules_on_fields_rampart_writes_are_refused_with_their_path() {
    let toml = pool_config(&["127.0.0.1:9".parse().unwrap()], "").replacen(
        "pool = \"app\"\n",
        "pool = \"app\"\nrequest_headers = { set = { Via = \"x\", \"X-Up\" = \"$upstream_addr\", \"X-Price\" = \"$5\" }, remove = [\"Host\"] }\nresponse_headers = { add = { \"Content-Length\" = \"1\" } }\n",
        1,
    );
    let err = rampart::Config::parse(&toml, "h.toml").unwrap_err().to_string();
    for want in [
        "h.toml: routes[0].request_headers.set.Via: via cannot be changed here: rampart sets it",
        "h.toml: routes[0].request_headers.remove[0]: host cannot be changed here",
        "h.toml: routes[0].request_headers.set.X-Up: $upstream_addr is known only for responses",
        "h.toml: routes[0].request_headers.set.X-Price: unknown variable $5; known: $remote_addr,",
        "h.toml: routes[0].response_headers.add.Content-Length: content-length cannot be changed here: rampart frames",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_megabyte_bodies_stream_both_ways() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    let n = 2 * 1024 * 1024;
    for method in ["POST", "PUT"] {
        // Chunked (no length): streams through.
        let req = Request::builder()
            .method(method)
            .uri("/echo")
            .header("host", "t")
            .body(big_body(n))
            .unwrap();
        let r = send(addr, req).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), n, "{method}");
        assert!(r.body.iter().all(|&b| b == b'r'));
    }
    // With Content-Length too.
    let req = Request::post("/echo")
        .header("host", "t")
        .body(Full::new(Bytes::from(vec![b'z'; n])))
        .unwrap();
    let r = send(addr, req).await.unwrap();
    assert_eq!(r.body.len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_response_fields_reach_http1_and_h2_clients_once_each() {
    use tokio::io::AsyncWriteExt;
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    // HTTP/1.1 (rampart's own writer), read as bytes.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /fields HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let (head, body) = read_one_response(&mut s, &mut Vec::new(), false).await;
    assert_eq!(body, b"o");
    let count = |name: &str| head.split("\r\n").filter(|l| l.starts_with(name)).count();
    for (name, n) in [
        ("set-cookie:", 2),
        ("x-custom:", 1),
        ("date:", 1),
        ("content-length:", 1),
        ("x-request-id:", 1),
        ("keep-alive:", 0),
    ] {
        assert_eq!(count(name), n, "{name} in {head:?}");
    }
    assert!(
        head.contains("set-cookie: a=1\r\nset-cookie: b=2\r\n"),
        "in order: {head:?}"
    );
    assert!(
        !head.contains("from-backend"),
        "rampart's request id replaces the backend's"
    );
    // HTTP/2 (hyper's writer): the same fields.
    let r = get_h2(addr, "/fields").await;
    assert_eq!(r.text(), "o");
    let cookies: Vec<_> = r
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(r.headers["x-custom"], "v");
    assert_eq!(r.headers.get_all("date").iter().count(), 1);
    assert_eq!(r.headers.get_all("x-request-id").iter().count(), 1);
    assert_eq!(r.headers["x-request-id"].len(), 24);
    assert!(!r.headers.contains_key("keep-alive"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_proxied_to_http1_backends() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    let r = get_h2(addr, "/x").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "o");
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["host"], "test.local", "h2 :authority becomes Host");
    assert_eq!(seen["via"], "2.0 rampart");
    assert_eq!(r.headers["x-request-id"].len(), 24, "the request id reaches h2 clients");
}

/// Opens a WebSocket through rampart to the origin's echo at `/ws`: the stream is
/// past the 101.
async fn open_websocket(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    upgrade_to_websocket(&mut s).await;
    s
}

/// Sends `msg` through an open tunnel and reads its echo; false if the tunnel is gone.
async fn echoes(s: &mut tokio::net::TcpStream, msg: &[u8]) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if s.write_all(msg).await.is_err() {
        return false;
    }
    let mut got = vec![0u8; msg.len()];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await {
        Ok(Ok(_)) => got == msg,
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_tunnelled() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    let mut s = open_websocket(addr).await;
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["upgrade"], "websocket");
    for msg in [&b"ping-1"[..], b"second message"] {
        assert!(echoes(&mut s, msg).await, "echo through tunnel");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_asterisk_goes_to_the_catch_all_route_and_other_asterisks_are_400() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    let r = raw(
        addr,
        b"OPTIONS * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(o.hits(), 1);
    let r = raw(
        addr,
        b"GET * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(o.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_protocol_listener_takes_the_client_from_the_header_and_closes_without_one() {
    use tokio::io::AsyncWriteExt;
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = pool_config(&[o.addr], "")
        .replace(
            "bind = \"127.0.0.1:0\"\n",
            "bind = \"127.0.0.1:0\"\nproxy_protocol = true\n",
        )
        .replacen(
            "pool = \"app\"\n",
            "pool = \"app\"\nrequest_headers = { set = { \"X-Real-IP\" = \"$remote_addr\", \"X-Real-Port\" = \"$remote_port\" } }\n",
            1,
        );
    assert!(toml.contains("proxy_protocol") && toml.contains("X-Real-IP"));
    let (_srv, addr) = start_proxy(&toml);
    let xff = || {
        o.seen_headers.lock().unwrap().last().unwrap()["x-forwarded-for"]
            .to_str()
            .unwrap()
            .to_string()
    };

    // Version 1, the request in the same segment.
    let r = raw(
        addr,
        b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\nGET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(xff(), "203.0.113.7");
    // The header rules' client is the PROXY header's too.
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["x-real-ip"], "203.0.113.7");
    assert_eq!(seen["x-real-port"], "5555");

    // Version 2, IPv6, then HTTP/2 on the same connection.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24".to_vec();
    v2.extend_from_slice(&"2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    v2.extend_from_slice(&[0; 16]);
    v2.extend_from_slice(&[0x15, 0xb3, 0x01, 0xbb]);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&v2).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let r = tx
        .send_request(Request::get("http://t/").body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(xff(), "2001:db8::1");

    // LOCAL (the balancer's own health check): the connection's own address.
    let r = raw(
        addr,
        b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(xff(), "127.0.0.1");

    // No header: closed unanswered, whoever it claims to be.
    let hits = o.hits();
    let r = raw(
        addr,
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 198.51.100.1\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(r.is_empty(), "{r}");
    assert_eq!(o.hits(), hits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_not_forwarded() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    // Forwarded, a backend that speaks h2c would switch the connection to HTTP/2
    // and take every later request on it straight from the client ("h2c smuggling").
    let r = raw(
        addr,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
          HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    for gone in ["upgrade", "http2-settings"] {
        assert!(!seen.contains_key(gone), "{gone} reached the backend: {seen:?}");
    }
    assert!(
        !seen
            .get_all("connection")
            .iter()
            .any(|v| v.to_str().unwrap().to_ascii_lowercase().contains("upgrade")),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_closes_after_tunnel_idle_timeout_but_a_busy_one_stays() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], "tunnel_idle_timeout = \"400ms\""));
    let mut s = open_websocket(addr).await;
    // Traffic every 150 ms keeps it open for three times the timeout.
    let busy = Instant::now();
    while busy.elapsed() < Duration::from_millis(1200) {
        assert!(echoes(&mut s, b"tick").await, "a busy tunnel was closed");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(
        closed_within(&mut s, Duration::from_secs(5)).await,
        "an idle tunnel stayed open past tunnel_idle_timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_an_open_connection_for_max_connections_and_for_shutdown() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let cfg = with_server_setting(&pool_config(&[o.addr], ""), "max_connections = 1");
    let (srv, addr) = start_proxy(&cfg);
    let mut ws = open_websocket(addr).await;
    let open = |key: &str| rampart::admin::status_json(srv.shared())[key].as_u64();
    // The upgraded client connection hands over to the tunnel: one open, as one tunnel.
    assert!(
        eventually(|| open("client_connections") == Some(1) && open("tunnels") == Some(1)).await,
        "{:?} {:?}",
        open("client_connections"),
        open("tunnels")
    );
    // The tunnel holds the only slot: another client waits in the backlog.
    let waiting = tokio::spawn(async move { get(addr, "/").await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !waiting.is_finished(),
        "a client was served past max_connections while a tunnel was open"
    );
    assert!(echoes(&mut ws, b"still here").await);
    drop(ws);
    let r = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting client is served once the tunnel closes")
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(eventually(|| open("tunnels") == Some(0)).await);

    // Shutdown drains a tunnel like a request in flight: it keeps working until it
    // closes (or shutdown_grace, 5 s, runs out).
    let mut ws = open_websocket(addr).await;
    let stopping = Instant::now();
    let joiner = std::thread::spawn(move || srv.join());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        echoes(&mut ws, b"draining").await,
        "shutdown cut an open tunnel at once"
    );
    drop(ws);
    tokio::task::spawn_blocking(move || joiner.join().unwrap())
        .await
        .unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "shutdown waited past the tunnel's close: {:?}",
        stopping.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_listeners_and_removing_one_keeps_its_connections() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let base = pool_config(&[o.addr], "");
    let parse = |t: &str| rampart::Config::parse(t, "t").unwrap();
    let (srv, addr) = start_proxy(&base);
    let with_listener = |bind: std::net::SocketAddr| {
        let t = base.replacen(
            "[[listeners]]\nbind = \"127.0.0.1:0\"\n",
            &format!("[[listeners]]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nbind = \"{bind}\"\n"),
            1,
        );
        assert!(t.contains(&bind.to_string()));
        t
    };
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();

    srv.reload(parse(&with_listener(free))).unwrap();
    assert_eq!(get(free, "/").await.status, 200, "the added listener serves");
    // A keep-alive connection on it, answered once.
    let mut held = tokio::net::TcpStream::connect(free).await.unwrap();
    let mut buf = Vec::new();
    let ask = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut held, ask).await.unwrap();
    let (head, _) = read_one_response(&mut held, &mut buf, false).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");

    // Removed again: it stops accepting, the open connection goes on, and the first
    // listener never stopped.
    srv.reload(parse(&base)).unwrap();
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(free).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "the removed listener still accepts");
    tokio::io::AsyncWriteExt::write_all(&mut held, ask).await.unwrap();
    let (head, _) = read_one_response(&mut held, &mut buf, false).await;
    assert!(
        head.starts_with("http/1.1 200"),
        "the removed listener's connection was dropped: {head}"
    );
    assert_eq!(get(addr, "/").await.status, 200);

    // A port another process holds rejects the reload, naming it; nothing changes.
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = blocker.local_addr().unwrap();
    let err = srv.reload(parse(&with_listener(taken))).unwrap_err().to_string();
    assert!(err.contains(&taken.to_string()), "{err}");
    assert_eq!(get(addr, "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_server_connection_settings_to_new_connections() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let base = pool_config(&[o.addr], "");
    let (srv, addr) = start_proxy(&with_server_setting(&base, "max_connections = 1"));
    // A connection that sends nothing holds the only slot for client_header_timeout
    // (10 s by default); the next client waits in the backlog.
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiting = tokio::spawn(async move { get(addr, "/").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "served past max_connections = 1");

    // Raising the cap lets the waiting client in at once, and a new connection
    // gets the new header timeout.
    let raised = with_server_setting(&base, "max_connections = 3\nclient_header_timeout = \"300ms\"");
    srv.reload(rampart::Config::parse(&raised, "t").unwrap()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting client was not let in by the raised cap")
        .unwrap();
    assert_eq!(r.status, 200);
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)).await,
        "a new connection still got the old 10 s client_header_timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_refusing_gives_a_fast_503_with_retry_after() {
    let a = refused_addr().await;
    let b = refused_addr().await;
    let c = refused_addr().await;
    let (_srv, addr) = start_proxy(&pool_config(&[a, b, c], ""));
    for _ in 0..5 {
        let t = Instant::now();
        let r = get(addr, "/").await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.headers["retry-after"], "1");
        let rid = r.headers["x-request-id"].to_str().unwrap().to_string();
        assert!(r.text().contains(&rid), "error page carries the request id");
        assert!(t.elapsed() < Duration::from_secs(1), "took {:?}", t.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_past_response_timeout_gives_504() {
    let o = TestOrigin::start("o", Behavior::Slow(Duration::from_secs(3))).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], "response_timeout = \"300ms\""));
    let t = Instant::now();
    let r = get(addr, "/").await;
    assert_eq!(r.status, 504);
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_backend_gives_504_not_a_hang() {
    let o = TestOrigin::start("o", Behavior::Freeze).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], "response_timeout = \"300ms\""));
    let r = tokio::time::timeout(Duration::from_secs(5), get(addr, "/"))
        .await
        .expect("no hang");
    assert_eq!(r.status, 504);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_upstream_response_gives_502() {
    let o = TestOrigin::start("o", Behavior::Garbage).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    let r = post_bytes(addr, "/", Bytes::from("x")).await.unwrap();
    assert_eq!(r.status, 502);
    let o2 = TestOrigin::start("o2", Behavior::CloseBeforeResponse).await;
    let (_srv2, addr2) = start_proxy(&pool_config(&[o2.addr], ""));
    let r = post_bytes(addr2, "/", Bytes::from("x")).await.unwrap();
    assert_eq!(r.status, 502);
}

/// An origin that answers each request with the bytes scripted for its path (404
/// for any other), over as many keep-alive requests as a connection brings.
async fn scripted_origin(script: &'static [(&'static str, &'static [u8])]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let path = head.split(' ').nth(1).unwrap_or("");
                        let answer = script
                            .iter()
                            .find(|(p, _)| *p == path)
                            .map_or(&b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"[..], |(_, a)| a);
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_rampart_cannot_pass_on_intact_get_502() {
    let origin = scripted_origin(&[
        (
            "/ok",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        // Re-chunked for the client without the gzip, the compressed bytes would
        // pass for the content. nginx answers 502 too.
        (
            "/gzip",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "/gzip-last",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
        ),
        // A switch to a protocol nobody asked for (RFC 9110 §15.2.2).
        (
            "/switch",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        ),
    ])
    .await;
    let (_srv, addr) = start_proxy(&pool_config(&[origin], NO_HEALTH_CHECKS));
    let r = get(addr, "/ok").await;
    assert_eq!((r.status.as_u16(), r.text()), (200, "abc".to_string()));
    for path in ["/gzip", "/gzip-last", "/switch"] {
        let r = get(addr, path).await;
        assert_eq!(r.status, 502, "{path}: {}", r.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_body_aborts_the_client_response_instead_of_truncating_silently() {
    let o = TestOrigin::start("o", Behavior::ResetMidBody).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    let res = try_get(addr, "/").await;
    match res {
        Err(e) => assert!(
            e.starts_with("body"),
            "headers should arrive, the body should fail: {e}"
        ),
        Ok(r) => panic!("a reset body must not look complete: {} bytes", r.body.len()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_get_413_414_and_431() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = pool_config(&[o.addr], "")
        .replace("pool = \"app\"", "pool = \"app\"\nmax_body_bytes = 1000")
        .replace(
            "shutdown_grace",
            "max_header_bytes = 4096\nmax_uri_bytes = 1024\nshutdown_grace",
        );
    let (_srv, addr) = start_proxy(&toml);
    let long_uri = format!("/{}", "a".repeat(2000));
    assert_eq!(get(addr, &long_uri).await.status, 414);
    let big = "v".repeat(5000);
    assert_eq!(get_with(addr, "/", &[("x-big", &big)]).await.status, 431);
    // Declared too large: refused before touching a backend.
    let r = post_bytes(addr, "/echo", Bytes::from(vec![1u8; 5000])).await.unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(o.hits(), 0, "refused requests never reach the backend");
    // Chunked and too large: caught while streaming (the client may see the 413 or a
    // closed connection, depending on how far its upload got).
    let r = send(
        addr,
        Request::post("/echo")
            .header("host", "t")
            .body(big_body(50_000))
            .unwrap(),
    )
    .await;
    if let Ok(r) = r {
        assert_eq!(r.status, 413);
    }
    // Under the limit is fine.
    let r = post_bytes(addr, "/echo", Bytes::from(vec![1u8; 900])).await.unwrap();
    assert_eq!(r.status, 200);
}

/// `[server] max_body_bytes`: every route's limit unless it sets its own, and a
/// route's 0 lifts it (nginx's `client_max_body_size`, and its `0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_body_limit_applies_to_routes_without_their_own() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let routes = "[[routes]]\npool = \"app\"\n\n\
                  [[routes]]\npath_prefix = \"/upload/\"\npool = \"app\"\nmax_body_bytes = 0\n\n\
                  [[routes]]\npath_prefix = \"/small/\"\npool = \"app\"\nmax_body_bytes = 100\n";
    let toml = with_server_setting(&pool_config(&[o.addr], NO_HEALTH_CHECKS), "max_body_bytes = 1000").replacen(
        "[[routes]]\npool = \"app\"\n",
        routes,
        1,
    );
    let (srv, addr) = start_proxy(&toml);
    for (path, size, want) in [
        ("/echo", 1000, 200),
        ("/echo", 1001, 413),
        ("/upload/echo", 5000, 200),
        ("/small/echo", 101, 413),
        ("/small/echo", 100, 200),
    ] {
        let r = post_bytes(addr, path, Bytes::from(vec![1u8; size])).await.unwrap();
        assert_eq!(r.status.as_u16(), want, "{path} {size}");
    }
    stop_proxy(srv).await;
    assert_config_errors(
        &with_server_setting(&pool_config(&[o.addr], ""), "max_body_bytes = 0"),
        &["t.toml: server.max_body_bytes: must be greater than 0 (omit it for no limit)"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    let no_host = raw(addr, b"GET / HTTP/1.1\r\n\r\n", Duration::from_secs(2)).await;
    assert!(no_host.starts_with("HTTP/1.1 400"), "{no_host}");
    let junk = raw(addr, b"NOT HTTP AT ALL\r\n\r\n", Duration::from_secs(2)).await;
    assert!(junk.starts_with("HTTP/1.1 400"), "{junk}");
    assert_eq!(o.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_two_host_fields_gets_400_and_reaches_no_backend() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    // Which Host a backend believes need not be the one rampart routed on (RFC 9112
    // §3.2 requires the 400). Read by rampart's own parser with the fields passed as
    // written, with a field that makes it build a map, and by hyper (chunked).
    let requests: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive\r\nhost: b.test\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nHost: b.test\r\n\r\n0\r\n\r\n",
    ];
    for req in requests {
        let r = raw(addr, req, Duration::from_secs(10)).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        assert!(r.contains("more than one Host") || r.contains("request-id"), "{r}");
    }
    let h2 = Request::get("http://a.test/")
        .header("host", "a.test")
        .header("host", "b.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send_h2(addr, h2).await.status, 400);
    assert_eq!(o.hits(), 0);
}

/// An HTTP/2 connection to `addr`: its sender, and the task driving it (which ends
/// when the connection does).
async fn h2_connection(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    (tx, tokio::spawn(conn))
}

/// A GET on `tx`'s connection: its status and body.
async fn h2_get(tx: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>) -> (u16, Bytes) {
    use http_body_util::BodyExt;
    let req = Request::get("http://test.local/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = tx.send_request(req).await.unwrap();
    (r.status().as_u16(), r.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_closes_after_keepalive_timeout_and_a_busy_one_does_not() {
    let o = TestOrigin::start("o", Behavior::Slow(Duration::from_millis(1500))).await;
    let toml = with_server_setting(&pool_config(&[o.addr], ""), "keepalive_timeout = \"500ms\"");
    let (_srv, addr) = start_proxy(&toml);
    let (mut tx, conn) = h2_connection(addr).await;
    // A request that outlasts keepalive_timeout three times over: the connection is
    // busy, not idle, and the answer arrives.
    assert_eq!(h2_get(&mut tx).await, (200, Bytes::from("o")));
    // Then idle: rampart closes it (hyper's pings alone would keep it for good).
    let t = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection still open after 10 s");
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "closed after {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_clients_cookie_fields_reach_the_backend_as_one() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    // Browsers send each pair as its own field over HTTP/2; an HTTP/1.1 backend must
    // get one field (RFC 9113 §8.2.3), as many frameworks read only the first.
    let req = Request::get("http://test.local/")
        .header("cookie", "a=1")
        .header("x-other", "x")
        .header("cookie", "b=2; c=3")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send_h2(addr, req).await.status, 200);
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    let cookies: Vec<_> = seen.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2; c=3"], "{seen:?}");
    // One field stays as it is.
    let req = Request::get("http://test.local/")
        .header("cookie", "solo=1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send_h2(addr, req).await.status, 200);
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.get_all("cookie").iter().collect::<Vec<_>>(), ["solo=1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_is_not_a_host_gets_400() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    // RFC 9112 §3.2: a Host with an invalid value is a 400. A backend that builds
    // links or cache keys from it must not get a path, a user or a second port.
    for host in [
        "",
        ":80",
        "a b",
        "a/b",
        "evil.test/x?",
        "a\\b",
        "user@a.test",
        "a.test:80x",
        "a:b:c",
        "[::1",
    ] {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let r = raw(addr, req.as_bytes(), Duration::from_secs(10)).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{host:?}: {r}");
    }
    assert_eq!(o.hits(), 0);
    for host in [
        "a.test",
        "A.Test:8080",
        "127.0.0.1",
        "[::1]:8443",
        "xn--bcher-kva.example",
    ] {
        assert_eq!(get_with(addr, "/", &[("host", host)]).await.status, 200, "{host:?}");
    }
    assert_eq!(o.hits(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_sees_the_host_the_request_was_routed_on() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let toml = format!(
        r#"
[server]
workers = 1
[[listeners]]
bind = "127.0.0.1:0"
[[routes]]
host = "a.test"
pool = "a"
[[routes]]
host = "b.test"
pool = "b"
[pools.a]
backends = ["{}"]
[pools.b]
backends = ["{}"]
"#,
        a.addr, b.addr
    );
    let (_srv, addr) = start_proxy(&toml);
    // An absolute-form target names the host, and a Host that differs is replaced
    // (RFC 9112 §3.2.2), not passed on beside a routing decision made on the other.
    let r = raw(
        addr,
        b"GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Over HTTP/2, `:authority` and a Host field that differs.
    let h2 = Request::get("http://a.test/y")
        .header("host", "b.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send_h2(addr, h2).await;
    assert_eq!((r.status.as_u16(), r.text()), (200, "a".to_string()));
    assert_eq!((a.hits(), b.hits()), (2, 0));
    for seen in a.seen_headers.lock().unwrap().iter() {
        let hosts: Vec<_> = seen.get_all("host").iter().collect();
        assert_eq!(hosts, ["a.test"], "{seen:?}");
        assert_eq!(seen["x-forwarded-host"], "a.test");
    }
    // Userinfo in the target is an error (RFC 9110 §4.2.4).
    let r = raw(
        addr,
        b"GET http://b.test@a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // So is authority-form outside CONNECT (RFC 9112 §3.2.3).
    let r = raw(
        addr,
        b"GET a.test:80 HTTP/1.1\r\nHost: a.test\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!((a.hits(), b.hits()), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_coding_other_than_chunked_gets_501() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    // hyper accepts it (chunked is last); forwarded re-chunked without the gzip, the
    // backend would take the compressed bytes for the body. nginx and Envoy answer 501.
    let r = raw(
        addr,
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 501"), "{r}");
    assert_eq!(o.hits(), 0);
    // Chunked twice: hyper would undo one, and the backend would get the other as data.
    for te in ["chunked, chunked", "chunked\r\nTransfer-Encoding: chunked"] {
        let req = format!("POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: {te}\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
        let r = raw(addr, req.as_bytes(), Duration::from_secs(10)).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{te}: {r}");
    }
    assert_eq!(o.hits(), 0);
    // `chunked` alone, in any case, goes through.
    for te in ["Chunked", "chunked", " chunked "] {
        let req = format!(
            "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: {te}\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        );
        let r = raw(addr, req.as_bytes(), Duration::from_secs(10)).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{te}: {r}");
        assert!(r.contains("abc"), "{te}: {r}");
    }
    assert_eq!(o.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_beside_transfer_encoding_smuggles_nothing() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    // Read by its Content-Length, the body would carry a second request; read as
    // chunked, that request follows an empty body. Chunked wins (RFC 9112 §6.3), the
    // length goes, and the connection closes after the response, so the bytes after
    // the body are never read as a request.
    let req = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";
    let t = Instant::now();
    let r = raw(addr, req, Duration::from_secs(10)).await;
    assert!(t.elapsed() < Duration::from_secs(8), "the connection stayed open");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "{r}");
    assert_eq!(o.hits(), 1);
    let seen = o.seen_headers.lock().unwrap()[0].clone();
    assert_ne!(
        seen.get("content-length").map(|v| v.as_bytes()),
        Some(&b"40"[..]),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_request_without_host_reaches_the_backend_with_one() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    // HTTP/1.0 does not require Host, but rampart speaks HTTP/1.1 to backends, which
    // does: it sends the backend's address, as nginx sends its upstream's name.
    let r = raw(addr, b"GET /old HTTP/1.0\r\n\r\n", Duration::from_secs(2)).await;
    assert!(r.contains(" 200 "), "{r}");
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["host"], o.addr.to_string().as_str());
    assert!(!seen.contains_key("x-forwarded-host"), "the client named no host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connection_is_closed_after_the_header_timeout() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = with_server_setting(&pool_config(&[o.addr], ""), "client_header_timeout = \"300ms\"");
    let (_srv, addr) = start_proxy(&toml);
    let t = Instant::now();
    let out = raw(addr, b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ", Duration::from_secs(5)).await;
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "connection held for {:?}",
        t.elapsed()
    );
    assert!(!out.contains("200 OK"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_error_pages_are_served_with_the_request_id() {
    let dir = TempDir::new("pages");
    let page = dir.join("503.html");
    std::fs::write(&page, "<h1>down for a moment</h1><p>ref {request_id}</p>").unwrap();
    let dead = refused_addr().await;
    let toml = format!(
        "{}\n[error_pages]\n\"503\" = \"{}\"\n",
        pool_config(&[dead], ""),
        page.display()
    );
    let (_srv, addr) = start_proxy(&toml);
    let r = get(addr, "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["content-type"], "text/html; charset=utf-8");
    let rid = r.headers["x-request-id"].to_str().unwrap();
    assert_eq!(r.headers.get_all("x-request-id").iter().count(), 1);
    assert_eq!(r.text(), format!("<h1>down for a moment</h1><p>ref {rid}</p>"));
}

/// `intercept_errors`: a backend's error whose status has an `[error_pages]` page gets
/// that page in place of its own (no stack trace, banner or cookie of the failing
/// backend reaches the client), keeping the status and the fields a client acts on;
/// statuses without a page, and routes without the setting, pass as the backend wrote them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intercept_errors_puts_the_error_page_in_place_of_the_backends() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = origin.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = origin.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                let (status, extra, body) = match path.rsplit('/').next().unwrap_or("") {
                    "boom" => (
                        "500 Internal Server Error",
                        "Server: Werkzeug/2.0.1\r\nSet-Cookie: debug=1\r\nX-Debug-Trace: app.py:42\r\n",
                        "Traceback (most recent call last): secret",
                    ),
                    "auth" => (
                        "401 Unauthorized",
                        "WWW-Authenticate: Bearer realm=\"api\"\r\n",
                        "no token",
                    ),
                    "busy" => ("503 Service Unavailable", "Retry-After: 30\r\n", "app busy"),
                    "missing" => ("404 Not Found", "", "the app's own 404"),
                    _ => ("200 OK", "", "fine"),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    let dir = TempDir::new("intercept");
    for (status, text) in [
        ("500", "<h1>sorry</h1><p>ref {request_id}</p>"),
        ("401", "<h1>sign in</h1>"),
        ("503", "<h1>busy</h1>"),
    ] {
        std::fs::write(dir.join(format!("{status}.html")), text).unwrap();
    }
    let toml = format!(
        r#"
[[listeners]]
bind = "127.0.0.1:0"
[[routes]]
pool = "app"
intercept_errors = true
[[routes]]
path_prefix = "/raw/"
pool = "app"
[pools.app]
backends = ["{origin_addr}"]
health_check = {{ type = "none" }}
retry = {{ on_status = [] }}
[error_pages]
"500" = "{d}/500.html"
"401" = "{d}/401.html"
"503" = "{d}/503.html"
"#,
        d = dir.display()
    );
    let (srv, addr) = start_proxy(&toml);

    let r = get(addr, "/boom").await;
    assert_eq!(r.status, 500);
    let rid = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(r.text(), format!("<h1>sorry</h1><p>ref {rid}</p>"));
    assert_eq!(r.headers["content-type"], "text/html; charset=utf-8");
    for leak in ["server", "set-cookie", "x-debug-trace"] {
        assert!(r.headers.get(leak).is_none(), "{leak} passed: {:?}", r.headers);
    }
    let r = get(addr, "/auth").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (401, "<h1>sign in</h1>"));
    assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"api\"");
    let r = get(addr, "/busy").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (503, "<h1>busy</h1>"));
    assert_eq!(r.headers["retry-after"], "30", "the backend's Retry-After stays");
    // No page for 404, nothing for 200: as the backend wrote them.
    let r = get(addr, "/missing").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (404, "the app's own 404"));
    assert_eq!(get(addr, "/fine").await.text(), "fine");
    // A route without the setting passes the backend's page.
    let r = get(addr, "/raw/boom").await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (500, "Traceback (most recent call last): secret")
    );
    assert_eq!(r.headers["x-debug-trace"], "app.py:42");
    stop_proxy(srv).await;
}

#[test]
fn intercept_errors_needs_error_pages_and_a_backend() {
    let toml = r#"
[server]
intercept_errors = true
[[listeners]]
bind = "127.0.0.1:0"
[[routes]]
pool = "app"
intercept_errors = true
[[routes]]
path_prefix = "/r"
return = { status = 204 }
intercept_errors = true
[pools.app]
backends = ["127.0.0.1:1"]
"#;
    assert_config_errors(
        toml,
        &[
            "server.intercept_errors: has nothing to put in place of a backend's page: add [error_pages]",
            "routes[0].intercept_errors: has nothing to put in place of a backend's page: add [error_pages]",
            "routes[1].intercept_errors: a route with return sends its own answer",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_the_request_in_flight() {
    let o = TestOrigin::start("o", Behavior::Slow(Duration::from_millis(700))).await;
    let (srv, addr) = start_proxy(&pool_config(&[o.addr], ""));
    let inflight = tokio::spawn(async move { get(addr, "/").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let joiner = std::thread::spawn(move || srv.join());
    let r = inflight.await.unwrap();
    assert_eq!(r.status, 200, "in-flight request must complete during drain");
    assert_eq!(r.text(), "o");
    tokio::task::spawn_blocking(move || joiner.join().unwrap())
        .await
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed after shutdown"
    );
}

/// A stopping rampart answers one more request on an idle keep-alive connection, with
/// `Connection: close`, rather than close it under a client that may be sending one:
/// whether the connection was idle a moment (rampart's own path) or long enough to go
/// dormant. A connection that sends nothing is closed soon after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_one_more_request_on_an_idle_keepalive_connection() {
    use tokio::io::AsyncWriteExt;
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&pool_config(&[o.addr], NO_HEALTH_CHECKS));
    let ask = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    let open = || async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(ask).await.unwrap();
        let (head, _) = read_one_response(&mut s, &mut Vec::new(), false).await;
        assert!(
            head.starts_with("http/1.1 200") && !head.contains("connection: close"),
            "{head}"
        );
        s
    };
    let (mut dormant, mut silent) = (open().await, open().await);
    // Idle past 250 ms: both have gone dormant.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut fresh = open().await;
    let stopping = tokio::task::spawn_blocking(move || srv.join());
    tokio::time::sleep(Duration::from_millis(100)).await;
    for s in [&mut fresh, &mut dormant] {
        s.write_all(ask).await.unwrap();
        let (head, body) = read_one_response(s, &mut Vec::new(), false).await;
        assert!(
            head.starts_with("http/1.1 200") && head.contains("connection: close"),
            "{head}"
        );
        assert_eq!(body, b"o");
        closed_soon(s).await;
    }
    closed_soon(&mut silent).await;
    stopping.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_one_more_request_on_an_idle_admin_connection() {
    use tokio::io::AsyncWriteExt;
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = format!(
        "{}\n[admin]\nbind = \"127.0.0.1:0\"\n",
        pool_config(&[o.addr], NO_HEALTH_CHECKS)
    );
    let (srv, _) = start_proxy(&toml);
    let admin = srv.admin_addr().unwrap();
    let ask = b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n";
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(ask).await.unwrap();
    let (head, _) = read_one_response(&mut s, &mut Vec::new(), false).await;
    assert!(
        head.starts_with("http/1.1 200") && !head.contains("connection: close"),
        "{head}"
    );
    let stopping = tokio::task::spawn_blocking(move || srv.join());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A scrape sent on the kept-alive connection as the process stops is answered.
    s.write_all(ask).await.unwrap();
    let (head, body) = read_one_response(&mut s, &mut Vec::new(), false).await;
    assert!(
        head.starts_with("http/1.1 200") && head.contains("connection: close"),
        "{head}"
    );
    assert_eq!(body, b"ok\n");
    closed_soon(&mut s).await;
    assert!(
        tokio::net::TcpStream::connect(admin).await.is_err(),
        "the admin listener is closed"
    );
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_upstream_connection() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], NO_HEALTH_CHECKS));
    for _ in 0..20 {
        assert_eq!(get(addr, "/").await.status, 200);
    }
    assert_eq!(o.hits(), 20);
    // Each client request used a fresh client connection; upstream, one was enough.
    assert_eq!(o.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_answers_end_at_their_head_and_the_connection_is_reused() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], NO_HEALTH_CHECKS));
    let plain = get(addr, "/").await;
    assert_eq!(plain.status, 200);
    assert!(!plain.body.is_empty());
    // HEAD: the backend's Content-Length describes a body that is not sent.
    let head = Request::head("/")
        .header("host", "t")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), send(addr, head))
        .await
        .expect("a HEAD answer must not wait for a body")
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    for code in [204, 304] {
        o.set(Behavior::Status(code));
        let r = tokio::time::timeout(Duration::from_secs(10), get(addr, "/"))
            .await
            .unwrap_or_else(|_| panic!("a {code} must not wait for a body"));
        assert_eq!(r.status, code);
        assert!(r.body.is_empty());
    }
    o.set(Behavior::Healthy);
    assert_eq!(get(addr, "/").await.body, plain.body);
    assert_eq!(o.hits(), 5);
    // Each answer ended where its framing said, so one backend connection served all.
    assert_eq!(o.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_expire_after_idle_timeout() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(
        &[o.addr],
        &format!("idle_timeout = \"200ms\"\n{NO_HEALTH_CHECKS}"),
    ));
    get(addr, "/").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    get(addr, "/").await;
    assert_eq!(o.connections(), 2, "an expired idle connection must not be reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_per_worker_cap_wait_until_a_slot_frees() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = with_server_setting(&pool_config(&[o.addr], ""), "max_connections = 2");
    let (_srv, addr) = start_proxy(&toml);
    // Two keep-alive connections, each after one answered request, fill the cap.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    // A third connection waits in the backlog, unserved, while the cap is reached.
    let third = tokio::spawn(async move {
        raw(
            addr,
            b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a connection past the cap was served");
    // Closing one frees a slot: the waiting connection is served, not dropped.
    drop(held.pop());
    let out = third.await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// Reads `n` HTTP/1.1 responses (Content-Length framed) off a raw connection and returns
/// each one's `x-request-id`.
async fn read_response_ids(s: &mut tokio::net::TcpStream, n: usize) -> Vec<String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut ids = Vec::new();
    let mut chunk = [0u8; 4096];
    while ids.len() < n {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let field = |name: &str| {
                head.lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                    .unwrap_or_default()
            };
            let len: usize = field("content-length:").parse().unwrap();
            if buf.len() >= end + 4 + len {
                ids.push(field("x-request-id:"));
                buf.drain(..end + 4 + len);
                continue;
            }
        }
        let got = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("response in time")
            .unwrap();
        assert!(got > 0, "connection closed after {} responses", ids.len());
        buf.extend_from_slice(&chunk[..got]);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_survives_idle_gaps_pipelining_and_split_requests() {
    use tokio::io::AsyncWriteExt;
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], NO_HEALTH_CHECKS));
    let req = |id: &str| format!("GET /{id} HTTP/1.1\r\nHost: t\r\nx-request-id: {id}\r\n\r\n");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Idle gaps: between requests the connection parks with no hyper state.
    for id in ["r1", "r2"] {
        s.write_all(req(id).as_bytes()).await.unwrap();
        assert_eq!(read_response_ids(&mut s, 1).await, [id]);
        // Longer than `PARK_AFTER`.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    // Pipelined: three requests in one write, answered in order.
    s.write_all(format!("{}{}{}", req("r3"), req("r4"), req("r5")).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response_ids(&mut s, 3).await, ["r3", "r4", "r5"]);
    // A whole request plus the first half of the next, then a pause: the half must
    // survive the park and be completed by the rest.
    let (r6, r7) = (req("r6"), req("r7"));
    s.write_all(format!("{r6}{}", &r7[..20]).as_bytes()).await.unwrap();
    assert_eq!(read_response_ids(&mut s, 1).await, ["r6"]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.write_all(&r7.as_bytes()[20..]).await.unwrap();
    assert_eq!(read_response_ids(&mut s, 1).await, ["r7"]);
    assert_eq!(o.hits(), 7);
}

/// Polls `cond` for up to 5 s.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_go_dormant_wake_for_their_next_request_and_close_at_shutdown() {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&pool_config(&[o.addr], NO_HEALTH_CHECKS));
    let shared = srv.shared().clone();
    let dormant = move || shared.dormant_connections.load(Ordering::Relaxed);
    let req = |id: &str| format!("GET /{id} HTTP/1.1\r\nHost: t\r\nx-request-id: {id}\r\n\r\n");
    let mut conns = Vec::new();
    for i in 0..3 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let id = format!("a{i}");
        s.write_all(req(&id).as_bytes()).await.unwrap();
        assert_eq!(read_response_ids(&mut s, 1).await, [id]);
        conns.push(s);
    }
    assert!(
        eventually(|| dormant() == 3).await,
        "3 idle connections dormant, saw {}",
        dormant()
    );
    // A dormant connection wakes for its next request and is served on the same socket.
    conns[0].write_all(req("b0").as_bytes()).await.unwrap();
    assert_eq!(read_response_ids(&mut conns[0], 1).await, ["b0"]);
    assert!(eventually(|| dormant() == 3).await, "it went dormant again");
    // A client closing a dormant connection frees its slot.
    drop(conns.pop());
    assert!(
        eventually(|| dormant() == 2).await,
        "closed by the client, saw {}",
        dormant()
    );
    // Shutdown closes dormant connections at once: no wait for shutdown_grace (5 s).
    let t = Instant::now();
    stop_proxy(srv).await;
    assert!(t.elapsed() < Duration::from_secs(3), "drain took {:?}", t.elapsed());
    for mut s in conns {
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("closed")
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without bytes");
    }
    assert_eq!(o.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_close_after_keepalive_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = with_server_setting(&pool_config(&[o.addr], ""), "keepalive_timeout = \"300ms\"");
    let (_srv, addr) = start_proxy(&toml);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nx-request-id: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response_ids(&mut s, 1).await, ["a"]);
    let t = Instant::now();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("idle connection closed by the proxy")
        .unwrap();
    assert_eq!(n, 0, "no bytes after the response");
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "closed too early: {:?}",
        t.elapsed()
    );
}

/// Sends `req` on `s` and reads its answer: whether it said `Connection: close`.
async fn closes_after(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, req: &str) -> bool {
    use tokio::io::AsyncWriteExt;
    s.write_all(req.as_bytes()).await.unwrap();
    let (h, _) = read_one_response(s, buf, false).await;
    assert!(h.starts_with("http/1.1 200"), "{h}");
    h.contains("connection: close")
}

const KEEPALIVE_GET: &str = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";

/// A proxy in front of `o` with `setting` under `[server]`, and a connection to it.
async fn connected_with(o: &TestOrigin, setting: &str) -> (rampart::Server, tokio::net::TcpStream) {
    let (srv, addr) = start_proxy(&with_server_setting(&pool_config(&[o.addr], NO_HEALTH_CHECKS), setting));
    (srv, tokio::net::TcpStream::connect(addr).await.unwrap())
}

/// Reads the end of a connection the proxy closes: no further bytes.
async fn closed_by_proxy(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(buf))
        .await
        .expect("connection closed by the proxy")
        .unwrap();
    assert_eq!(
        n,
        0,
        "bytes after the last response: {:?}",
        String::from_utf8_lossy(buf)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_requests_counts_across_both_paths_and_dormancy_and_closes_after_the_last() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, mut s) = connected_with(&o, "keepalive_requests = 4").await;
    let get = KEEPALIVE_GET;
    // A chunked body goes to hyper's path (idle::Svc); a bodiless GET takes rampart's.
    let chunked = "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nchunk\r\n0\r\n\r\n";
    let mut buf = Vec::new();
    assert!(!closes_after(&mut s, &mut buf, get).await);
    assert!(!closes_after(&mut s, &mut buf, chunked).await);
    // Idle past PARK_AFTER: the connection goes dormant and wakes with its count.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!closes_after(&mut s, &mut buf, get).await);
    assert!(closes_after(&mut s, &mut buf, get).await, "the 4th request is the last");
    closed_by_proxy(&mut s, &mut buf).await;

    // The last request on hyper's path: its response closes the connection too.
    let (_srv2, mut s) = connected_with(&o, "keepalive_requests = 2").await;
    let mut buf = Vec::new();
    assert!(!closes_after(&mut s, &mut buf, get).await);
    assert!(closes_after(&mut s, &mut buf, chunked).await);
    closed_by_proxy(&mut s, &mut buf).await;
    assert_eq!(o.hits(), 6, "every request reached the backend once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_requests_0_lifts_the_limit() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, mut s) = connected_with(&o, "keepalive_requests = 0").await;
    let mut buf = Vec::new();
    // Past nginx's default of 1000, which is rampart's too.
    for i in 0..1005 {
        assert!(
            !closes_after(&mut s, &mut buf, KEEPALIVE_GET).await,
            "closed after request {}",
            i + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_older_than_keepalive_time_closes_after_its_next_response() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, mut s) = connected_with(&o, "keepalive_time = \"1s\"").await;
    let get = KEEPALIVE_GET;
    let mut buf = Vec::new();
    assert!(!closes_after(&mut s, &mut buf, get).await);
    assert!(!closes_after(&mut s, &mut buf, get).await);
    // Idle past it (and dormant meanwhile): nothing closes the connection until a
    // request comes, as in nginx; that request is served, and is the last.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(closes_after(&mut s, &mut buf, get).await);
    closed_by_proxy(&mut s, &mut buf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_sends_goaway_after_keepalive_requests_streams() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = with_server_setting(&pool_config(&[o.addr], NO_HEALTH_CHECKS), "keepalive_requests = 3");
    let (_srv, addr) = start_proxy(&toml);
    let (mut tx, conn) = h2_connection(addr).await;
    for _ in 0..3 {
        assert_eq!(h2_get(&mut tx).await, (200, Bytes::from("o")));
    }
    // The third stream was the last: GOAWAY, and the connection ends long before
    // keepalive_timeout (75 s) would end it.
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(ended.is_ok(), "the HTTP/2 connection is still open after 3 streams");
    let req = Request::get("http://test.local/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert!(
        tx.send_request(req).await.is_err(),
        "a 4th stream on the closed connection"
    );
    assert_eq!(o.hits(), 3);
}

/// Writes all of `request`, closes the sending side, and reads the whole answer: as
/// a client that sends its upload before it reads does. `Err` if the proxy reset it.
async fn send_all_then_read(addr: std::net::SocketAddr, request: &[u8]) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    s.shutdown().await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("answered and closed in time")?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_its_whole_body_first_still_reads_the_413_or_431() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = with_server_setting(&pool_config(&[o.addr], NO_HEALTH_CHECKS), "max_body_bytes = 1000");
    let (_srv, addr) = start_proxy(&toml);
    // 5 MB: more than the sockets' buffers hold, so the client is still sending when
    // the answer is written. Closing then, with the body unread, would reset the
    // connection and lose the answer; rampart reads the rest and discards it first,
    // as nginx's lingering close does.
    const N: usize = 5_000_000;
    let body = vec![b'x'; N];
    let mut length = format!("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {N}\r\n\r\n").into_bytes();
    length.extend_from_slice(&body);
    let mut chunked = format!("POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{N:x}\r\n").into_bytes();
    chunked.extend_from_slice(&body);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let mut huge_head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
    huge_head.extend_from_slice(&body);
    huge_head.extend_from_slice(b"\r\n\r\n");
    for (what, request, status) in [
        ("Content-Length", &length, "413"),
        ("chunked", &chunked, "413"),
        ("a head past max_header_bytes", &huge_head, "431"),
    ] {
        for _ in 0..3 {
            let answer = send_all_then_read(addr, request)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{what}: {answer:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelining_client_past_keepalive_requests_reads_every_answer_it_was_given() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = with_server_setting(&pool_config(&[o.addr], NO_HEALTH_CHECKS), "keepalive_requests = 2");
    let (_srv, addr) = start_proxy(&toml);
    // 4 MB of pipelined GETs on rampart's own path: two are answered, the second with
    // `Connection: close`; the rest is read and discarded, not reset under the client.
    let pipelined = KEEPALIVE_GET.repeat(4_000_000 / KEEPALIVE_GET.len());
    let answer = send_all_then_read(addr, pipelined.as_bytes()).await.expect("no reset");
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    assert_eq!(answer.matches("connection: close").count(), 1, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_connection_discards_what_its_client_sends_until_it_goes_quiet() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = with_server_setting(&pool_config(&[o.addr], NO_HEALTH_CHECKS), "max_body_bytes = 10");
    let (_srv, addr) = start_proxy(&toml);
    // A tenth of a declared body: the 413, then rampart's FIN.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 413 "));
    // More of the body: read and discarded, so no reset comes back.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(&[b'x'; 1000]).await.expect("rampart still reading");
    }
    // Quiet past lingering_timeout (5 s): rampart closes, and bytes sent then are
    // refused (the first draws a reset, a later one sees it).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut refused = false;
    for _ in 0..10 {
        if s.write_all(b"late").await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "the connection was still open 7 s after its client went quiet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_closes_after_the_header_timeout() {
    use tokio::io::AsyncReadExt;
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = with_server_setting(&pool_config(&[o.addr], ""), "client_header_timeout = \"300ms\"");
    let (_srv, addr) = start_proxy(&toml);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("silent connection closed by the proxy")
        .unwrap();
    assert!(rest.is_empty());
}

// ---- rampart's own HTTP/1.1 path (src/h1.rs) and its hand-over to hyper ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_mixes_bodiless_requests_and_bodies_in_order() {
    use tokio::io::AsyncWriteExt;
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], NO_HEALTH_CHECKS));
    let get = |id: &str| format!("GET /{id} HTTP/1.1\r\nHost: t\r\nx-request-id: {id}\r\n\r\n");
    let post = |id: &str, body: &str| {
        format!(
            "POST /echo HTTP/1.1\r\nHost: t\r\nx-request-id: {id}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let chunked = |id: &str| {
        format!("POST /echo HTTP/1.1\r\nHost: t\r\nx-request-id: {id}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nchunk\r\n0\r\n\r\n")
    };
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    // rampart's own path; then a body that arrives after its head, which hyper
    // serves; then, after hyper's connection parks, the own path again.
    s.write_all(get("g1").as_bytes()).await.unwrap();
    let (h, b) = read_one_response(&mut s, &mut buf, false).await;
    assert!(h.starts_with("http/1.1 200") && h.contains("x-request-id: g1"), "{h}");
    assert_eq!(b, b"o");
    let p1 = post("p1", "first body");
    let (head, body) = p1.split_at(p1.len() - "first body".len());
    s.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(body.as_bytes()).await.unwrap();
    let (h, b) = read_one_response(&mut s, &mut buf, false).await;
    assert!(h.contains("x-request-id: p1"), "{h}");
    assert_eq!(b, b"first body");
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Pipelined in one write: bodiless, a whole small body (own path), a chunked body
    // (hyper), bodiless again; answered in order.
    s.write_all(format!("{}{}{}{}", get("g2"), post("p2", "second"), chunked("p3"), get("g3")).as_bytes())
        .await
        .unwrap();
    for (id, body) in [("g2", &b"o"[..]), ("p2", b"second"), ("p3", b"chunk"), ("g3", b"o")] {
        let (h, b) = read_one_response(&mut s, &mut buf, false).await;
        assert!(h.contains(&format!("x-request-id: {id}")), "expected {id}: {h}");
        assert_eq!(b, body, "{id}");
    }
    s.write_all(get("g4").as_bytes()).await.unwrap();
    let (h, _) = read_one_response(&mut s, &mut buf, false).await;
    assert!(h.contains("x-request-id: g4"), "{h}");
    assert_eq!(o.hits(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_clients_keep_the_connection_only_when_they_ask() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], NO_HEALTH_CHECKS));
    // No keep-alive asked: an HTTP/1.0 response, then the connection closes.
    let r = raw(addr, b"GET / HTTP/1.0\r\nHost: t\r\n\r\n", Duration::from_secs(5)).await;
    assert!(r.starts_with("HTTP/1.0 200 OK\r\n"), "{r}");
    assert!(r.ends_with("\r\n\r\no"), "closed after the body: {r}");
    // Asked: the answer says so, and a second request is served on the connection.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = b"GET / HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n";
    let mut buf = Vec::new();
    for _ in 0..2 {
        s.write_all(req).await.unwrap();
        let (h, b) = read_one_response(&mut s, &mut buf, false).await;
        assert!(
            h.starts_with("http/1.0 200") && h.contains("connection: keep-alive"),
            "{h}"
        );
        assert_eq!(b, b"o");
    }
    // An HTTP/1.1 client's `Connection: close` gets its response, then the close.
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (h, _) = read_one_response(&mut s, &mut buf, false).await;
    assert!(h.starts_with("http/1.1 200"), "{h}");
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut [0u8; 16]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "closed after the response");
    assert_eq!(o.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_responses_end_at_their_head_and_keep_the_connection() {
    use tokio::io::AsyncWriteExt;
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], NO_HEALTH_CHECKS));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (h, _) = read_one_response(&mut s, &mut buf, true).await;
    assert!(h.starts_with("http/1.1 200"), "{h}");
    // The GET's response follows the HEAD's head directly: no body bytes between.
    let (h, b) = read_one_response(&mut s, &mut buf, false).await;
    assert!(h.starts_with("http/1.1 200"), "{h}");
    assert_eq!(b, b"o");
}

/// An origin that records each request head as the bytes it received and answers
/// 200 with the body "o".
async fn recording_origin() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&buf[..end + 2]).into_owned());
                        buf.drain(..end + 4);
                        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\no")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
            });
        }
    });
    (addr, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_routed_and_forwarded_without_dot_segments() {
    let (api, heads) = recording_origin().await;
    let web = TestOrigin::start("web", Behavior::Healthy).await;
    let toml = format!(
        r#"
[server]
workers = 1
[[listeners]]
bind = "127.0.0.1:0"
[[routes]]
pool = "web"
[[routes]]
path_prefix = "/api/"
pool = "api"
[pools.api]
backends = ["{api}"]
[pools.web]
backends = ["{}"]
"#,
        web.addr
    );
    let (_srv, addr) = start_proxy(&toml);
    // Routed on the raw path, this matched /api/ and the api backend resolved it to
    // /internal: a path no route exposes.
    for sneaky in ["/api/../internal", "/api/%2e%2e/internal", "/api/.%2E/internal"] {
        let r = get(addr, sneaky).await;
        assert_eq!((r.status.as_u16(), r.text()), (200, "web".to_string()), "{sneaky}");
    }
    assert!(heads.lock().unwrap().is_empty(), "{:?}", heads.lock().unwrap());
    // The backend gets the path it was routed on, query kept.
    assert_eq!(get(addr, "/api/./v1/%2e%2e/users?q=/../x").await.status, 200);
    let head = heads.lock().unwrap().last().cloned().unwrap();
    assert!(head.starts_with("GET /api/users?q=/../x HTTP/1.1\r\n"), "{head}");
    // Above the root is an error, as in nginx.
    let r = raw(
        addr,
        b"GET /../etc/passwd HTTP/1.1\r\nHost: t\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(web.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_request_fields_reach_the_backend_as_written_and_rewritten_ones_are_folded() {
    use tokio::io::AsyncWriteExt;
    let (origin, heads) = recording_origin().await;
    let (_srv, addr) = start_proxy(&pool_config(&[origin], ""));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    // Nothing to rewrite: the client's lines go out as written, rampart's after them.
    s.write_all(
        b"GET /r?q=1 HTTP/1.1\r\nHost: shop.test\r\nUser-Agent: t/1\r\nAccept: */*\r\n\
          X-Mixed-Case: A  b\r\nx-request-id: client-7\r\n\r\n",
    )
    .await
    .unwrap();
    let (h, b) = read_one_response(&mut s, &mut buf, false).await;
    assert!(h.starts_with("http/1.1 200"), "{h}");
    assert_eq!(b, b"o");
    assert!(h.contains("x-request-id: client-7"), "{h}");
    let head = heads.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        head,
        "GET /r?q=1 HTTP/1.1\r\nHost: shop.test\r\nUser-Agent: t/1\r\nAccept: */*\r\n\
         X-Mixed-Case: A  b\r\nx-request-id: client-7\r\nx-forwarded-for: 127.0.0.1\r\n\
         x-forwarded-proto: http\r\nx-forwarded-host: shop.test\r\nvia: 1.1 rampart\r\n"
    );
    // Fields rampart removes, extends or replaces, each alone in a request: each
    // reaches the backend once, rewritten.
    for (field, want) in [
        ("Connection: keep-alive, x-drop\r\nx-drop: 1", None),
        ("Keep-Alive: timeout=5", None),
        ("Proxy-Authorization: Basic eA==", None),
        (
            "X-Forwarded-For: 203.0.113.9",
            Some("x-forwarded-for: 203.0.113.9, 127.0.0.1"),
        ),
        ("Via: 1.0 edge", Some("via: 1.0 edge, 1.1 rampart")),
        ("X-Forwarded-Proto: https", Some("x-forwarded-proto: http")),
        ("X-Forwarded-Host: evil.test", Some("x-forwarded-host: shop.test")),
    ] {
        s.write_all(format!("GET / HTTP/1.1\r\nHost: shop.test\r\n{field}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (h, _) = read_one_response(&mut s, &mut buf, false).await;
        assert!(h.starts_with("http/1.1 200"), "{h}");
        let head = heads.lock().unwrap().last().cloned().unwrap().to_ascii_lowercase();
        let count = |name: &str| head.split("\r\n").filter(|l| l.starts_with(name)).count();
        for name in [
            "host:",
            "x-forwarded-for:",
            "via:",
            "x-forwarded-proto:",
            "x-forwarded-host:",
            "x-request-id:",
        ] {
            assert_eq!(count(name), 1, "{name} after {field:?}: {head:?}");
        }
        for gone in ["connection:", "x-drop:", "keep-alive:", "proxy-authorization:"] {
            assert_eq!(count(gone), 0, "{gone} after {field:?}: {head:?}");
        }
        if let Some(want) = want {
            assert!(
                head.contains(&format!("{want}\r\n")),
                "{want} after {field:?}: {head:?}"
            );
        }
    }
}

/// An origin that answers `/` with a chunked body of unknown length.
async fn chunked_origin() -> std::net::SocketAddr {
    scripted_origin(&[(
        "/",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_unknown_length_is_chunked_for_http_1_1_and_close_delimited_for_1_0() {
    use tokio::io::AsyncWriteExt;
    let origin = chunked_origin().await;
    let (_srv, addr) = start_proxy(&pool_config(&[origin], NO_HEALTH_CHECKS));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        let (h, b) = read_one_response(&mut s, &mut buf, false).await;
        assert!(
            h.contains("transfer-encoding: chunked") && !h.contains("content-length"),
            "{h}"
        );
        assert_eq!(b, b"hello world");
    }
    // HTTP/1.0 knows no chunking: the body runs to the close, even when keep-alive
    // was asked for.
    let r = raw(
        addr,
        b"GET / HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(r.starts_with("HTTP/1.0 200 OK\r\n"), "{r}");
    let lower = r.to_lowercase();
    assert!(
        !lower.contains("transfer-encoding") && !lower.contains("keep-alive"),
        "{r}"
    );
    assert!(r.ends_with("\r\n\r\nhello world"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_request_cancels_the_backend_request() {
    use tokio::io::AsyncWriteExt;
    let o = TestOrigin::start("o", Behavior::Freeze).await;
    let toml = pool_config(&[o.addr], &format!("{NO_HEALTH_CHECKS}\nresponse_timeout = \"60s\""));
    let (srv, addr) = start_proxy(&toml);
    let in_flight = || rampart::admin::status_json(srv.shared())["pools"][0]["backends"][0]["in_flight"].as_u64();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    assert!(
        eventually(|| in_flight() == Some(1)).await,
        "the request reached the frozen backend"
    );
    drop(s);
    // Long before the 60 s response timeout: the client's close ended it.
    assert!(
        eventually(|| in_flight() == Some(0)).await,
        "still in flight after the client left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_body_sent_with_its_head_reaches_the_backend_whether_kept_for_replay_or_not() {
    use tokio::io::AsyncWriteExt;
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    // Kept for replay (the default), never kept (attempts = 1), and too large to keep.
    for extra in ["", "retry = { attempts = 1 }", "retry = { max_replay_bytes = 4 }"] {
        let (_srv, addr) = start_proxy(&pool_config(&[o.addr], &format!("{NO_HEALTH_CHECKS}\n{extra}")));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        let body = "0123456789";
        let req = format!(
            "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        // Twice on one connection, the second pipelined behind a bodiless request.
        s.write_all(req.as_bytes()).await.unwrap();
        let (h, b) = read_one_response(&mut s, &mut buf, false).await;
        assert!(h.starts_with("http/1.1 200"), "{extra}: {h}");
        assert_eq!(b, body.as_bytes(), "{extra}");
        s.write_all(format!("GET / HTTP/1.1\r\nHost: t\r\n\r\n{req}").as_bytes())
            .await
            .unwrap();
        assert_eq!(read_one_response(&mut s, &mut buf, false).await.1, b"o");
        assert_eq!(
            read_one_response(&mut s, &mut buf, false).await.1,
            body.as_bytes(),
            "{extra}"
        );
    }
}

/// One GET from `local` (an address of the loopback network) with `extra` header
/// lines: the status and the lower-cased head.
async fn get_from(local: &str, addr: std::net::SocketAddr, path: &str, extra: &str) -> (u16, String) {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, _) = read_one_response(&mut s, &mut Vec::new(), false).await;
    let status = head[9..12].parse().unwrap();
    (status, head)
}

/// A route's `rate_limit` gives each client its burst, then answers 429 with a
/// `Retry-After` that covers the wait; clients (by address, or by the key a header
/// carries) have budgets of their own; a request without the key is not limited, nor
/// is another route; and a reload keeps what each client has spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_answers_429_past_each_clients_burst() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    // One request per 10 s, so nothing refills during the test.
    let toml = format!(
        r#"
[server]
workers = 2
[[listeners]]
bind = "127.0.0.1:0"
[[routes]]
path_prefix = "/ip/"
pool = "app"
rate_limit = {{ requests_per_second = 0.1, burst = 3 }}
[[routes]]
path_prefix = "/key/"
pool = "app"
rate_limit = {{ requests_per_second = 0.1, burst = 2, key = "header:x-api-key" }}
[[routes]]
pool = "app"
[pools.app]
backends = ["{}"]
health_check = {{ type = "none" }}
"#,
        o.addr
    );
    let (srv, addr) = start_proxy(&toml);
    let statuses = |local: &'static str, path: &'static str, extra: &'static str, n: usize| async move {
        let mut all = Vec::new();
        for _ in 0..n {
            all.push(get_from(local, addr, path, extra).await);
        }
        all
    };
    let a = statuses("127.0.0.1", "/ip/x", "", 5).await;
    assert_eq!(a.iter().map(|r| r.0).collect::<Vec<_>>(), [200, 200, 200, 429, 429]);
    let refused = &a[3].1;
    let wait: u64 = refused
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .unwrap_or_else(|| panic!("no retry-after: {refused}"))
        .parse()
        .unwrap();
    assert!((1..=10).contains(&wait), "{refused}");
    assert!(refused.contains("x-request-id: "), "{refused}");
    // Another client address has its own burst; another route has no limit.
    let b = statuses("127.0.0.2", "/ip/x", "", 4).await;
    assert_eq!(b.iter().map(|r| r.0).collect::<Vec<_>>(), [200, 200, 200, 429]);
    let other = statuses("127.0.0.1", "/other", "", 5).await;
    assert!(other.iter().all(|r| r.0 == 200));
    // By API key: each key its own budget, whatever the address; no key, no limit.
    let k1 = statuses("127.0.0.1", "/key/x", "x-api-key: k1\r\n", 3).await;
    assert_eq!(k1.iter().map(|r| r.0).collect::<Vec<_>>(), [200, 200, 429]);
    let k2 = statuses("127.0.0.1", "/key/x", "x-api-key: k2\r\n", 1).await;
    assert_eq!(k2[0].0, 200);
    let none = statuses("127.0.0.1", "/key/x", "", 4).await;
    assert!(none.iter().all(|r| r.0 == 200));
    // Refused requests never reached the backend.
    assert_eq!(o.hits(), 3 + 3 + 5 + 2 + 1 + 4);
    // A reload keeps what each client has spent.
    srv.reload(rampart::Config::parse(&toml, "t").unwrap()).unwrap();
    assert_eq!(get_from("127.0.0.1", addr, "/ip/x", "").await.0, 429);
    stop_proxy(srv).await;
}

/// The status of a request from 127.0.0.1 to `path`, asked again while it is 429
/// (for up to a second): a place under `in_flight_limit` is given back just after
/// the client has the last byte of the response that held it.
async fn admitted_soon(addr: std::net::SocketAddr, path: &str) -> u16 {
    let mut status = 0;
    for _ in 0..50 {
        status = get_from("127.0.0.1", addr, path, "").await.0;
        if status != 429 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    status
}

/// A route's `in_flight_limit`: a client with `max` requests open gets 429 for the
/// next, at once and without the backend seeing it, while another client (or another
/// route) is served; a place comes back when a response ends, and a WebSocket holds
/// its place until it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_limit_answers_429_past_each_clients_open_requests() {
    use tokio::io::AsyncWriteExt;
    let slow = TestOrigin::start("slow", Behavior::Slow(Duration::from_millis(1500))).await;
    let ws = TestOrigin::start("ws", Behavior::Healthy).await;
    let toml = format!(
        r#"
[server]
workers = 2
[[listeners]]
bind = "127.0.0.1:0"
[[routes]]
path_prefix = "/slow/"
pool = "slow"
in_flight_limit = {{ max = 2 }}
[[routes]]
path_prefix = "/ws"
pool = "ws"
in_flight_limit = {{ max = 1 }}
[[routes]]
pool = "slow"
[pools.slow]
backends = ["{}"]
health_check = {{ type = "none" }}
[pools.ws]
backends = ["{}"]
health_check = {{ type = "none" }}
"#,
        slow.addr, ws.addr
    );
    let (srv, addr) = start_proxy(&toml);
    let open: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { get_from("127.0.0.1", addr, "/slow/x", "").await.0 }))
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while slow.hits() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the two requests never reached the origin"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The third of this client's is refused at once; the backend never sees it.
    let started = std::time::Instant::now();
    let (status, head) = get_from("127.0.0.1", addr, "/slow/x", "").await;
    assert_eq!(status, 429, "{head}");
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "refused only after {:?}",
        started.elapsed()
    );
    assert!(head.contains("x-request-id: "), "{head}");
    assert_eq!(slow.hits(), 2);
    // A reload that keeps the route keeps its count of what is open.
    srv.reload(rampart::Config::parse(&toml, "t").unwrap()).unwrap();
    assert_eq!(get_from("127.0.0.1", addr, "/slow/x", "").await.0, 429);
    assert_eq!(slow.hits(), 2);
    // Another client, and another route, are served meanwhile.
    let other = tokio::spawn(async move { get_from("127.0.0.2", addr, "/slow/x", "").await.0 });
    let unlimited = tokio::spawn(async move { get_from("127.0.0.1", addr, "/elsewhere", "").await.0 });
    for h in open {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(other.await.unwrap(), 200);
    assert_eq!(unlimited.await.unwrap(), 200);
    // Places come back as responses end (just after the client has the last byte).
    let status = admitted_soon(addr, "/slow/x").await;
    assert_eq!(status, 200);
    assert_eq!(metric("rampart_proxy_errors_total{kind=\"in_flight_limited\"}"), "2");

    // A WebSocket is a request in flight until it closes.
    let mut tunnel = tokio::net::TcpStream::connect(addr).await.unwrap();
    upgrade_to_websocket(&mut tunnel).await;
    // (`/ws` itself the origin answers with 101 whatever the request.)
    let (status, _) = get_from("127.0.0.1", addr, "/wsx", "").await;
    assert_eq!(status, 429, "a second request while the tunnel is open");
    tunnel.shutdown().await.unwrap();
    drop(tunnel);
    let status = admitted_soon(addr, "/wsx").await;
    assert_eq!(status, 200, "the tunnel's place came back when it closed");
    stop_proxy(srv).await;
}

#[test]
fn in_flight_limit_errors_name_their_field() {
    let toml = r#"
[[listeners]]
bind = "127.0.0.1:0"
[[routes]]
pool = "app"
in_flight_limit = { max = 0, key = "ip" }
[[routes]]
path_prefix = "/x"
pool = "app"
in_flight_limit = { key = "client_ip" }
[[routes]]
path_prefix = "/r"
return = { status = 204 }
in_flight_limit = { max = 5 }
[pools.app]
backends = ["127.0.0.1:1"]
"#;
    assert_config_errors(
        toml,
        &[
            "routes[0].in_flight_limit.max: must be between 1 and 1000000, got 0",
            "routes[0].in_flight_limit.key: expected \"client_ip\", \"uri\", \"path\", \"header:NAME\" or \"cookie:NAME\", got \"ip\"",
            "routes[1].in_flight_limit: missing field `max`",
            "routes[2].in_flight_limit: a route with return answers at once",
        ],
    );
}

#[test]
fn rate_limit_errors_name_their_field() {
    let toml = r#"
[[listeners]]
bind = "127.0.0.1:0"
[[routes]]
pool = "app"
rate_limit = { requests_per_second = 0, burst = 0, key = "ip" }
[[routes]]
path_prefix = "/x"
pool = "app"
rate_limit = { burst = 5 }
[pools.app]
backends = ["127.0.0.1:1"]
"#;
    assert_config_errors(
        toml,
        &[
            "routes[0].rate_limit.requests_per_second: must be above 0 and at most 1000000, got 0",
            "routes[0].rate_limit.burst: must be between 1 and 1000000, got 0",
            "routes[0].rate_limit.key: expected \"client_ip\", \"uri\", \"path\", \"header:NAME\" or \"cookie:NAME\", got \"ip\"",
            "routes[1].rate_limit: missing field `requests_per_second`",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_with_header_and_method_conditions_take_their_requests_first() {
    let main = TestOrigin::start("main", Behavior::Healthy).await;
    let canary = TestOrigin::start("canary", Behavior::Healthy).await;
    let toml = two_pools(
        r#"
[[routes]]
pool = "app"

[[routes]]
pool = "canary"
headers = { x-canary = "1", x-opt-out = false }

[[routes]]
path_prefix = "/cache/"
pool = "canary"
methods = ["PURGE"]
"#,
        main.addr,
        canary.addr,
    );
    let (srv, addr) = start_proxy(&toml);
    let cases: [(&[(&str, &str)], &str); 5] = [
        (&[], "main"),
        (&[("x-canary", "1")], "canary"),
        (&[("x-canary", "2")], "main"),
        (&[("X-Canary", "1"), ("x-opt-out", "yes")], "main"),
        (&[("x-other", "a"), ("x-canary", "1")], "canary"),
    ];
    for (fields, want) in cases {
        assert_eq!(get_with(addr, "/x", fields).await.text(), want, "{fields:?}");
    }
    // Over HTTP/2 (hyper's path, not the HTTP/1.1 fast path) alike.
    for (value, want) in [("1", "canary"), ("0", "main")] {
        let req = Request::get("http://test.local/x")
            .header("x-canary", value)
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send_h2(addr, req).await.text(), want);
    }
    // A method condition: PURGE under /cache/ goes to the canary pool, GET does not.
    let purge = Request::builder()
        .method("PURGE")
        .uri("/cache/a")
        .header("host", "t")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(addr, purge).await.unwrap().text(), "canary");
    assert_eq!(get(addr, "/cache/a").await.text(), "main");
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_with_path_and_header_patterns_take_what_matches() {
    let main = TestOrigin::start("main", Behavior::Healthy).await;
    let canary = TestOrigin::start("canary", Behavior::Healthy).await;
    let toml = two_pools(
        r#"
[[routes]]
pool = "app"

[[routes]]
pool = "canary"
path_regex = '\.(png|css)$'

[[routes]]
path_prefix = "/api/"
pool = "canary"
path_regex = '^/api/v[0-9]+/'
headers = { user-agent = { regex = '(?i)mobile' } }
"#,
        main.addr,
        canary.addr,
    );
    let (srv, addr) = start_proxy(&toml);
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 8] = [
        ("/logo.png", &[], "canary"),
        ("/a/site.css?v=3", &[], "canary"),
        // The pattern is matched against the path, never the query.
        ("/page?file=x.png", &[], "main"),
        ("/logo.png.html", &[], "main"),
        // Dot segments are gone before the match: the path the backend gets.
        ("/img/../logo.png", &[], "canary"),
        ("/api/v2/users", &[("user-agent", "Foo MOBILE Safari")], "canary"),
        ("/api/v2/users", &[("user-agent", "Desktop")], "main"),
        ("/api/vx/users", &[("user-agent", "Mobile")], "main"),
    ];
    for (target, fields, want) in cases {
        assert_eq!(get_with(addr, target, fields).await.text(), want, "{target} {fields:?}");
    }
    // Over HTTP/2 alike.
    let req = Request::get("http://test.local/api/v1/x")
        .header("user-agent", "mobile")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send_h2(addr, req).await.text(), "canary");
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_under_the_rewritten_prefix_comes_back_under_the_routes() {
    // A 302 to a path under the rewritten prefix, to an absolute URL on the host the
    // test asks for, and to another site.
    let origin = scripted_origin(&[
        (
            "/v2/rel",
            b"HTTP/1.1 302 Found\r\nLocation: /v2/login?next=%2Fx\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            "/v2/abs",
            b"HTTP/1.1 302 Found\r\nLocation: http://shop.example.com:8443/v2/login\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            "/v2/away",
            b"HTTP/1.1 302 Found\r\nLocation: https://accounts.example.org/v2/login\r\nContent-Length: 0\r\n\r\n",
        ),
    ])
    .await;
    let toml = pool_config(&[origin], NO_HEALTH_CHECKS).replace(
        "pool = \"app\"\n",
        "pool = \"app\"\npath_prefix = \"/api/\"\nprefix_rewrite = \"/v2/\"\n",
    );
    let (srv, addr) = start_proxy(&toml);
    let location = |r: &Reply| r.headers["location"].to_str().unwrap().to_string();
    let host = [("host", "shop.example.com:8443")];
    let r = get_with(addr, "/api/rel", &host).await;
    assert_eq!(
        (r.status.as_u16(), location(&r)),
        (302, "/api/login?next=%2Fx".to_string())
    );
    let r = get_with(addr, "/api/abs", &host).await;
    assert_eq!(location(&r), "http://shop.example.com:8443/api/login");
    let r = get_with(addr, "/api/away", &host).await;
    assert_eq!(
        location(&r),
        "https://accounts.example.org/v2/login",
        "another site's URL is left alone"
    );
    // Over HTTP/2 alike.
    let req = Request::get("http://shop.example.com:8443/api/abs")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        location(&send_h2(addr, req).await),
        "http://shop.example.com:8443/api/login"
    );
    stop_proxy(srv).await;

    // Turned off, the backend's Location goes as written.
    let (srv, addr) = start_proxy(&toml.replace("prefix_rewrite", "rewrite_location = false\nprefix_rewrite"));
    assert_eq!(
        location(&get_with(addr, "/api/rel", &host).await),
        "/v2/login?next=%2Fx"
    );
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_splits_its_requests_over_pools_by_weight() {
    let stable = TestOrigin::start("stable", Behavior::Healthy).await;
    let canary = TestOrigin::start("canary", Behavior::Healthy).await;
    let config = |route: &str| two_pools(&format!("[[routes]]\n{route}\n"), stable.addr, canary.addr);
    // At random: a quarter of 400 requests (binomial: 100 ± 8.7; the bounds are
    // beyond 5 standard deviations).
    let (srv, addr) = start_proxy(&config("pools = { app = 3, canary = 1 }"));
    let mut to_canary = 0;
    for _ in 0..400 {
        to_canary += (get(addr, "/").await.text() == "canary") as usize;
    }
    assert!((50..=150).contains(&to_canary), "{to_canary} of 400 went to the canary");
    stop_proxy(srv).await;

    // By a key: each user stays with one pool; both pools get users.
    let (srv, addr) = start_proxy(&config(
        "pools = { app = 3, canary = 1 }\nsplit_key = \"header:x-user\"",
    ));
    let mut users_on = std::collections::HashMap::new();
    for user in 0..60 {
        let user = format!("user-{user}");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            seen.insert(get_with(addr, "/", &[("x-user", &user)]).await.text());
        }
        assert_eq!(seen.len(), 1, "{user} went to {seen:?}");
        *users_on.entry(seen.into_iter().next().unwrap()).or_insert(0) += 1;
    }
    assert_eq!(users_on.len(), 2, "{users_on:?}");
    stop_proxy(srv).await;

    // A weight of 0 takes a pool out of the split.
    let (srv, addr) = start_proxy(&config("pools = { app = 1, canary = 0 }"));
    for _ in 0..20 {
        assert_eq!(get(addr, "/").await.text(), "stable");
    }
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_may_wait_longer_or_shorter_than_its_pool() {
    let o = TestOrigin::start("o", Behavior::Slow(Duration::from_millis(600))).await;
    let toml = pool_config(&[o.addr], &format!("{NO_HEALTH_CHECKS}\nresponse_timeout = \"200ms\"")).replace(
        "[[routes]]\npool = \"app\"\n",
        "[[routes]]\npool = \"app\"\n\n[[routes]]\npath_prefix = \"/export\"\npool = \"app\"\nresponse_timeout = \"5s\"\n",
    );
    assert!(toml.contains("/export"), "{toml}");
    let (srv, addr) = start_proxy(&toml);
    // The pool's 200 ms: a 600 ms answer is a 504.
    assert_eq!(get(addr, "/report").await.status, 504);
    // The route's 5 s: the same backend's answer arrives, for a GET and a POST
    // whose body streams (past max_replay_bytes), whose clock starts after it.
    let r = get(addr, "/export/all").await;
    assert_eq!((r.status.as_u16(), r.text()), (200, "o".to_string()));
    let r = post_bytes(addr, "/export/count", Bytes::from(vec![b'x'; 100 * 1024]))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    stop_proxy(srv).await;
}

/// A config with `routes` and two pools of one backend each: `app` and `canary`.
fn two_pools(routes: &str, app: std::net::SocketAddr, canary: std::net::SocketAddr) -> String {
    format!(
        "[server]\nworkers = 1\n\n[[listeners]]\nbind = \"127.0.0.1:0\"\n\n{routes}\n\
         [pools.app]\nbackends = [\"{app}\"]\n{NO_HEALTH_CHECKS}\n\n\
         [pools.canary]\nbackends = [\"{canary}\"]\n{NO_HEALTH_CHECKS}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_admits_only_the_addresses_it_allows() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let routes = r#"
[[routes]]
pool = "app"

[[routes]]
path_prefix = "/admin/"
pool = "app"
allow = ["10.0.0.0/8", "192.0.2.1"]

[[routes]]
path_prefix = "/local/"
pool = "app"
allow = ["127.0.0.0/8", "::1"]

[[routes]]
path_prefix = "/open/"
pool = "app"
deny = ["127.0.0.1"]
"#;
    let toml = pool_config(&[o.addr], NO_HEALTH_CHECKS).replace("[[routes]]\npool = \"app\"\n", routes);
    let (srv, addr) = start_proxy(&toml);
    // From 127.0.0.1.
    for (path, want) in [("/x", 200), ("/admin/x", 403), ("/local/x", 200), ("/open/x", 403)] {
        assert_eq!(get(addr, path).await.status, want, "{path}");
    }
    let hits = o.hits();
    assert_eq!(get(addr, "/admin/y").await.status, 403);
    assert_eq!(o.hits(), hits, "a refused request reached the backend");
    stop_proxy(srv).await;

    // Behind a balancer speaking the PROXY protocol, the header's client is the one.
    let (srv, addr) = start_proxy(&toml.replace(
        "bind = \"127.0.0.1:0\"\n",
        "bind = \"127.0.0.1:0\"\nproxy_protocol = true\n",
    ));
    for (client, path, want) in [
        ("10.9.8.7", "/admin/x", "200"),
        ("192.0.2.1", "/admin/x", "200"),
        ("192.0.2.2", "/admin/x", "403"),
        ("10.9.8.7", "/local/x", "403"),
        ("10.9.8.7", "/open/x", "200"),
    ] {
        let ask = format!(
            "PROXY TCP4 {client} 127.0.0.1 5555 80\r\nGET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        );
        let r = raw(addr, ask.as_bytes(), Duration::from_secs(10)).await;
        assert!(r.starts_with(&format!("HTTP/1.1 {want}")), "{client} {path}: {r}");
    }
    stop_proxy(srv).await;
}

/// A route with `return` answers itself: a redirect built from the request's
/// variables, a fixed page, an empty status, over HTTP/1.1 (as written, and HEAD) and
/// HTTP/2; the backend never sees those requests, and the route's response rules
/// still apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_with_return_answers_itself() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = pool_config(&[o.addr], NO_HEALTH_CHECKS).replace(
        "[[routes]]\npool = \"app\"",
        r#"[[routes]]
path_prefix = "/old/"
return = { status = 301, location = "https://$host/new$request_uri" }

[[routes]]
path_prefix = "/healthz"
return = { status = 200, body = "ok\n" }
response_headers = { set = { cache-control = "no-store" } }

[[routes]]
path_prefix = "/private"
return = { status = 403 }

[[routes]]
pool = "app""#,
    );
    let (_srv, addr) = start_proxy(&toml);
    let r = get_with(addr, "/old/a?b=1", &[("host", "Site.Example:8080")]).await;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "https://site.example/new/old/a?b=1");
    let r = get(addr, "/healthz").await;
    assert_eq!((r.status.as_u16(), r.text()), (200, "ok\n".to_string()));
    assert_eq!(r.headers["content-type"], "text/plain; charset=utf-8");
    assert_eq!(r.headers["cache-control"], "no-store");
    assert!(r.headers.contains_key("x-request-id"));
    let head = raw(
        addr,
        b"HEAD /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    assert!(!head.contains("ok\n"), "a HEAD gets no body: {head}");
    // ... but the length a GET's body would have, as nginx sends for its own pages.
    assert!(head.to_ascii_lowercase().contains("content-length: 3\r\n"), "{head}");
    let r = get_h2(addr, "/private/x").await;
    assert_eq!((r.status.as_u16(), r.body.len()), (403, 0));
    let r = get_h2(addr, "/old/h2").await;
    assert_eq!(r.headers["location"], "https://test.local/new/old/h2");
    assert_eq!(o.hits(), 0, "no return route reached the backend");
    assert_eq!(get(addr, "/other").await.text(), "o");
    // A proxied HEAD keeps the length the backend declared (its body is "o").
    let head = raw(
        addr,
        b"HEAD /other HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(head.to_ascii_lowercase().contains("content-length: 1\r\n"), "{head}");
}
