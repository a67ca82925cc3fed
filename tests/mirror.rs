//! A route's `mirror` over real sockets: a copy of each request (headers, request id
//! and small body alike) reaches the mirror pool while the client gets the route's
//! own answer; a frozen or refusing mirror costs the client nothing; `percent` copies
//! a share; and a body that streams is not mirrored, but counted.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::Full;

/// `app` serves the route; `mirror` is a pool of `shadow`, with `mirror_extra` lines.
fn config(app: std::net::SocketAddr, shadow: std::net::SocketAddr, mirror: &str, route_extra: &str) -> String {
    let toml = pool_config(&[app], NO_HEALTH_CHECKS);
    toml.replacen(
        "[[routes]]\npool = \"app\"\n",
        &format!("[[routes]]\npool = \"app\"\nmirror = {{ pool = \"{mirror}\"{route_extra} }}\n"),
        1,
    ) + &format!("\n[pools.{mirror}]\nbackends = [\"{shadow}\"]\n{NO_HEALTH_CHECKS}\nretry = {{ attempts = 1, hedge = false }}\n")
}

/// Waits (generously) until `origin` has seen `n` requests.
async fn seen_at_least(origin: &TestOrigin, n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = origin.seen_headers.lock().unwrap().len();
        if seen >= n || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_copied_to_the_mirror_and_answered_by_the_route() {
    let app = TestOrigin::start("app", Behavior::Healthy).await;
    let shadow = TestOrigin::start("shadow", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&config(app.addr, shadow.addr, "shadow", ""));
    for i in 0..5 {
        let r = get_with(addr, &format!("/page/{i}?q=1"), &[("cookie", "s=1")]).await;
        assert_eq!((r.status.as_u16(), r.text()), (200, "app".to_string()));
    }
    let post = http::Request::post("/count")
        .header("host", "test.local")
        .body(Full::new(Bytes::from(vec![b'x'; 3000])))
        .unwrap();
    assert_eq!(send(addr, post).await.unwrap().text(), "3000");
    assert_eq!(seen_at_least(&shadow, 6).await, 6);
    let main = app.seen_headers.lock().unwrap().clone();
    let copies = shadow.seen_headers.lock().unwrap().clone();
    let targets: Vec<String> = copies
        .iter()
        .map(|h| h[SEEN_TARGET].to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        targets,
        [
            "/page/0?q=1",
            "/page/1?q=1",
            "/page/2?q=1",
            "/page/3?q=1",
            "/page/4?q=1",
            "/count"
        ]
    );
    for (a, b) in main.iter().zip(copies.iter()) {
        // The same request: its id too, to match the two answers up.
        for field in ["x-request-id", "host", "x-forwarded-for"] {
            assert_eq!(a.get(field), b.get(field), "{field}");
        }
    }
    assert_eq!(copies[5]["content-length"], "3000");
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_freezes_or_refuses_costs_the_client_nothing() {
    let app = TestOrigin::start("app", Behavior::Healthy).await;
    let frozen = TestOrigin::start("frozen", Behavior::Freeze).await;
    let refused = refused_addr().await;
    for (shadow, name) in [(frozen.addr, "frozen"), (refused, "refused")] {
        let (srv, addr) = start_proxy(&config(app.addr, shadow, name, ""));
        let started = Instant::now();
        for _ in 0..10 {
            assert_eq!(get(addr, "/").await.text(), "app", "{name}");
        }
        // The mirror's response_timeout is 30 s: waiting on it even once would show.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name}: {:?}",
            started.elapsed()
        );
        stop_proxy(srv).await;
    }
    assert!(
        seen_at_least(&frozen, 10).await >= 10,
        "every copy reached the frozen mirror"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_copies_a_share_and_a_streamed_body_is_not_copied() {
    let app = TestOrigin::start("app", Behavior::Healthy).await;
    let shadow = TestOrigin::start("shadow", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&config(app.addr, shadow.addr, "shadow-share", ", percent = 25"));
    for _ in 0..200 {
        get(addr, "/").await;
    }
    // The copies go in tasks of their own: give the last ones time to land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let copied = shadow.seen_headers.lock().unwrap().len();
    // 25% of 200 is 50; the binomial's standard deviation is about 6.
    assert!((20..=80).contains(&copied), "{copied} of 200 copied at 25%");
    stop_proxy(srv).await;

    // A body past the route pool's max_replay_bytes streams: it can be read once.
    let shadow = TestOrigin::start("shadow", Behavior::Healthy).await;
    let toml = config(app.addr, shadow.addr, "shadow-skip", "").replacen(
        NO_HEALTH_CHECKS,
        &format!("{NO_HEALTH_CHECKS}\nretry = {{ max_replay_bytes = 1024 }}"),
        1,
    );
    let (srv, addr) = start_proxy(&toml);
    let post = http::Request::post("/count")
        .header("host", "test.local")
        .body(Full::new(Bytes::from(vec![b'x'; 4000])))
        .unwrap();
    assert_eq!(send(addr, post).await.unwrap().text(), "4000");
    get(addr, "/small").await;
    assert_eq!(seen_at_least(&shadow, 1).await, 1);
    assert_eq!(shadow.seen_headers.lock().unwrap()[0][SEEN_TARGET], "/small");
    assert_eq!(metric("rampart_mirror_skipped_total{pool=\"shadow-skip\"}"), "1");
    stop_proxy(srv).await;
}

#[test]
fn mirror_config_errors_name_the_field() {
    let toml = config(
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
        "shadow",
        "",
    );
    for (from, to, want) in [
        (
            "pool = \"shadow\" }",
            "pool = \"nope\" }",
            "routes[0].mirror.pool: unknown pool 'nope'",
        ),
        (
            "pool = \"shadow\" }",
            "pool = \"app\" }",
            "routes[0].mirror.pool: is the route's own pool",
        ),
        (
            "pool = \"shadow\" }",
            "pool = \"shadow\", percent = 0 }",
            "routes[0].mirror.percent: must be above 0 and at most 100",
        ),
    ] {
        let err = rampart::Config::parse(&toml.replacen(from, to, 1), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{want}\n{err}");
    }
}
