//! The client's address from a trusted proxy (`[server] trusted_proxies`), over real
//! sockets: the client a trusted peer names in `X-Forwarded-For` (right to left, past
//! every trusted address) is the one `allow`, rate limits and `$remote_addr` see, while
//! `X-Forwarded-For` appends the peer itself; an untrusted peer's list, or a list that
//! ends in junk, is not taken; and another header (`X-Real-IP`) can carry the client.

mod common;

use common::*;

/// A config whose route sets `X-Real-IP` from `$remote_addr`, plus `route_extra`.
fn config(origin: std::net::SocketAddr, server: &str, route_extra: &str) -> String {
    let toml = with_server_setting(&pool_config(&[origin], NO_HEALTH_CHECKS), server);
    toml.replacen(
        "[[routes]]\npool = \"app\"\n",
        &format!("[[routes]]\npool = \"app\"\nrequest_headers = {{ set = {{ \"X-Real-IP\" = \"$remote_addr\" }} }}\n{route_extra}\n"),
        1,
    )
}

/// What the origin saw of the last request: (X-Real-IP, X-Forwarded-For).
fn last_seen(origin: &TestOrigin) -> (String, String) {
    let seen = origin.seen_headers.lock().unwrap();
    let h = seen.last().expect("a request reached the origin");
    let get = |n: &str| h.get(n).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (get("x-real-ip"), get("x-forwarded-for"))
}

#[tokio::test]
async fn a_trusted_proxy_names_the_client() {
    let origin = TestOrigin::start("o", Behavior::Healthy).await;
    // The test's own connections come from 127.0.0.1: the trusted proxy.
    let (srv, addr) = start_proxy(&config(
        origin.addr,
        "trusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]",
        "",
    ));
    // Right to left: 10.0.0.2 is trusted (an inner balancer), 203.0.113.9 is not.
    let r = get_with(addr, "/", &[("x-forwarded-for", "198.51.100.1, 203.0.113.9, 10.0.0.2")]).await;
    assert_eq!(r.status, 200);
    let (real, xff) = last_seen(&origin);
    assert_eq!(real, "203.0.113.9");
    // The list grows by the hop rampart heard from, not by the client again.
    assert_eq!(xff, "198.51.100.1, 203.0.113.9, 10.0.0.2, 127.0.0.1");
    // Several fields are one list; a port some proxies add is dropped.
    get_with(
        addr,
        "/",
        &[
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-for", "[2001:db8::7]:4711, 10.1.1.1"),
        ],
    )
    .await;
    assert_eq!(last_seen(&origin).0, "2001:db8::7");
    // Every address trusted: the leftmost is the client (nginx's real_ip_recursive).
    get_with(addr, "/", &[("x-forwarded-for", "10.0.0.5, 10.0.0.6")]).await;
    assert_eq!(last_seen(&origin).0, "10.0.0.5");
    // Junk where an address should be ends the walk there: the address to its right,
    // or with none, the peer.
    get_with(addr, "/", &[("x-forwarded-for", "203.0.113.50, bogus, 10.0.0.3")]).await;
    assert_eq!(last_seen(&origin).0, "10.0.0.3");
    get_with(addr, "/", &[("x-forwarded-for", "203.0.113.50, bogus")]).await;
    assert_eq!(last_seen(&origin).0, "127.0.0.1");
    // No list: the peer.
    get(addr, "/").await;
    assert_eq!(last_seen(&origin), ("127.0.0.1".into(), "127.0.0.1".into()));
    stop_proxy(srv).await;
}

#[tokio::test]
async fn an_untrusted_peer_is_the_client_whatever_it_claims() {
    let origin = TestOrigin::start("o", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&config(
        origin.addr,
        "trusted_proxies = [\"10.0.0.0/8\"]",
        "allow = [\"203.0.113.0/24\"]",
    ));
    let r = get_with(addr, "/", &[("x-forwarded-for", "203.0.113.9")]).await;
    assert_eq!(r.status, 403, "an untrusted peer's claim must not pass allow");
    assert_eq!(origin.hits(), 0);
    stop_proxy(srv).await;
}

#[tokio::test]
async fn allow_and_rate_limits_see_the_named_client() {
    let origin = TestOrigin::start("o", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&config(
        origin.addr,
        "trusted_proxies = [\"127.0.0.0/8\"]",
        "allow = [\"203.0.113.0/24\"]\nrate_limit = { requests_per_second = 0.01, burst = 1 }",
    ));
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    assert_eq!(get_with(addr, "/", &from("203.0.113.9")).await.status, 200);
    // Its own budget is spent; another client's behind the same proxy is not.
    assert_eq!(get_with(addr, "/", &from("203.0.113.9")).await.status, 429);
    assert_eq!(get_with(addr, "/", &from("203.0.113.10")).await.status, 200);
    // Outside the allowed block, and the proxy itself, are refused.
    assert_eq!(get_with(addr, "/", &from("198.51.100.1")).await.status, 403);
    assert_eq!(get(addr, "/").await.status, 403);
    assert_eq!(origin.hits(), 2);
    stop_proxy(srv).await;
}

#[tokio::test]
async fn another_header_can_carry_the_client() {
    let origin = TestOrigin::start("o", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&config(
        origin.addr,
        "trusted_proxies = [\"127.0.0.1\"]\nclient_ip_header = \"X-Real-IP\"",
        "",
    ));
    // No field rampart rewrites: the request takes the fast path, fields as written.
    get_with(addr, "/", &[("x-real-ip", "192.0.2.44")]).await;
    assert_eq!(last_seen(&origin), ("192.0.2.44".into(), "127.0.0.1".into()));
    // X-Forwarded-For is not read then.
    get_with(addr, "/", &[("x-forwarded-for", "192.0.2.45")]).await;
    assert_eq!(last_seen(&origin).0, "127.0.0.1");
    stop_proxy(srv).await;
}
