//! HTTP/2 to backends (`protocol = "h2"`), over real sockets: multiplexing, trailers
//! (gRPC's status), refused streams retried elsewhere, restarts, health checks of
//! HTTP/2-only backends, TLS with ALPN, and the errors.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pki::Pki;
use common::*;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

fn h2_pool(backends: &[SocketAddr], extra: &str) -> String {
    pool_config(backends, &format!("protocol = \"h2\"\n{NO_HEALTH_CHECKS}\n{extra}"))
}

/// A backend that speaks only HTTP/2 (no HTTP/1.1 fallback), as gRPC servers do.
/// `/healthz` answers `health`; `/grpc` answers a body and gRPC trailers, echoing the
/// request's `te` in them; anything else answers its name.
struct H2Only {
    addr: SocketAddr,
    streams: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl H2Only {
    async fn start(name: &'static str, health: u16) -> H2Only {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let streams = Arc::new(AtomicUsize::new(0));
        let counted = streams.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        counted.fetch_add(1, Ordering::SeqCst);
                        async move { Ok::<_, Infallible>(h2_only_answer(name, health, req)) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        H2Only { addr, streams, task }
    }

    fn streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }
}

impl Drop for H2Only {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type AnyBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn h2_only_answer(name: &str, health: u16, req: Request<Incoming>) -> Response<AnyBody> {
    match req.uri().path() {
        "/healthz" => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"health")).boxed());
            *r.status_mut() = StatusCode::from_u16(health).unwrap();
            r
        }
        "/grpc" => {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let te = req.headers().get("te").cloned().unwrap_or("none".parse().unwrap());
            trailers.insert("x-te-seen", te);
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
                Ok(Frame::trailers(trailers)),
            ];
            let mut r = Response::new(StreamBody::new(futures_lite::stream::iter(frames)).boxed());
            r.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            r
        }
        "/stall" => {
            // 64 KiB of a body, then nothing more on the stream.
            let first = futures_lite::stream::once(Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 65536]))));
            let then_nothing = futures_lite::StreamExt::chain(first, futures_lite::stream::pending());
            Response::new(StreamBody::new(then_nothing).boxed())
        }
        _ => Response::new(Full::new(Bytes::from(name.to_string())).boxed()),
    }
}

/// An HTTP/2 client connection to rampart (prior knowledge).
async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_from_http1_and_h2_clients_share_one_http2_connection_per_backend() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&h2_pool(&[o.addr], ""));
    // Concurrent requests, each on its own client connection.
    let mut tasks = Vec::new();
    for i in 0..20 {
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                get(addr, "/").await
            } else {
                get_h2(addr, "/").await
            }
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "o"));
    }
    // A body both ways, 1 MiB, streamed (chunked from an HTTP/1.1 client).
    let n = 1024 * 1024;
    let req = Request::post("/echo").header("host", "t").body(big_body(n)).unwrap();
    let r = send(addr, req).await.unwrap();
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, n));
    assert_eq!(o.connections(), 1, "one multiplexed connection carried every request");
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["te"], "trailers");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert!(seen.contains_key("x-request-id") && !seen.contains_key("connection"));
    stop_proxy(srv).await;
}

/// A pool of `o` alone, speaking `protocol` ("http1" or "h2") to it, with `extra`.
fn pool_speaking(protocol: &str, o: &TestOrigin, extra: &str) -> String {
    match protocol {
        "h2" => h2_pool(&[o.addr], extra),
        _ => pool_config(&[o.addr], &format!("{NO_HEALTH_CHECKS}\n{extra}")),
    }
}

/// `max_connection_duration`: a backend connection older than that takes no further
/// request, over HTTP/1.1 (idle in the pool) and HTTP/2 alike; by default (1 h) and
/// with "0s" (no limit) the same requests share one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_connection_is_not_reused_past_max_connection_duration() {
    for (protocol, limit, want) in [
        ("http1", "max_connection_duration = \"1s\"", 2),
        ("h2", "max_connection_duration = \"1s\"", 2),
        ("http1", "", 1),
        ("h2", "max_connection_duration = \"0s\"", 1),
    ] {
        let o = TestOrigin::start("o", Behavior::Healthy).await;
        let (srv, addr) = start_proxy(&pool_speaking(protocol, &o, limit));
        for _ in 0..3 {
            assert_eq!(get(addr, "/").await.text(), "o", "{protocol} {limit}");
        }
        assert_eq!(o.connections(), 1, "{protocol} {limit:?}: 3 requests at once");
        // Past the limit, within idle_timeout (4 s).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for _ in 0..3 {
            assert_eq!(get(addr, "/").await.text(), "o", "{protocol} {limit}");
        }
        assert_eq!(o.hits(), 6);
        assert_eq!(o.connections(), want, "{protocol} {limit:?}: 3 more requests 1.5 s on");
        stop_proxy(srv).await;
    }
}

/// `max_requests_per_connection`: a backend connection carries that many requests,
/// then closes and the next goes on a new one, over HTTP/1.1 and HTTP/2 alike;
/// without it one connection carries them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_connection_closes_after_max_requests_per_connection() {
    for (protocol, limit, want) in [
        ("http1", "", 1),
        ("http1", "max_requests_per_connection = 3", 3),
        ("h2", "max_requests_per_connection = 3", 3),
    ] {
        let o = TestOrigin::start("o", Behavior::Healthy).await;
        let (srv, addr) = start_proxy(&pool_speaking(protocol, &o, limit));
        for _ in 0..7 {
            assert_eq!(get(addr, "/").await.text(), "o", "{protocol} {limit}");
        }
        assert_eq!(o.hits(), 7);
        assert_eq!(o.connections(), want, "{protocol} {limit:?}: 7 requests");
        stop_proxy(srv).await;
    }
    let bad = pool_config(&["127.0.0.1:1".parse().unwrap()], "max_requests_per_connection = 0");
    let err = rampart::Config::parse(&bad, "p.toml").unwrap_err().to_string();
    assert!(
        err.contains("pools.app.max_requests_per_connection: must be at least 1 (omit it for no limit)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_connection_gets_a_second_one_beside_it() {
    let o = TestOrigin::start("o", Behavior::Slow(Duration::from_millis(300))).await;
    let (srv, addr) = start_proxy(&h2_pool(&[o.addr], "h2_max_streams = 2"));
    let burst: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { get(addr, "/").await }))
        .collect();
    for t in burst {
        assert_eq!(t.await.unwrap().status, 200);
    }
    assert_eq!(o.connections(), 3, "six streams at two a connection");
    // The streams ended, so their places are free again: no new connection.
    for _ in 0..4 {
        assert_eq!(get(addr, "/").await.status, 200);
    }
    assert_eq!(o.connections(), 3);
    stop_proxy(srv).await;

    let bad = pool_config(&[o.addr], "h2_max_streams = 0");
    let err = rampart::Config::parse(&bad, "p.toml").unwrap_err().to_string();
    assert!(err.contains("pools.app.h2_max_streams: must be at least 1"), "{err}");
    assert!(
        err.contains("pools.app.h2_max_streams: only used with protocol = \"h2\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_http2_backend_is_hedged_and_a_503_is_retried_elsewhere() {
    let slow = TestOrigin::start("slow", Behavior::Slow(Duration::from_secs(2))).await;
    let fast = TestOrigin::start("fast", Behavior::Healthy).await;
    let extra =
        "balancer = \"round_robin\"\nretry = { hedge_delay = \"50ms\" }\noutlier = { consecutive_failures = 1000 }";
    let (srv, addr) = start_proxy(&h2_pool(&[slow.addr, fast.addr], extra));
    for i in 0..4 {
        assert_eq!(get(addr, "/").await.text(), "fast", "request {i}");
    }
    assert!(slow.hits() >= 1, "some requests went to the slow backend first");
    stop_proxy(srv).await;

    let failing = TestOrigin::start("failing", Behavior::Status(503)).await;
    let extra = "balancer = \"round_robin\"\nretry = { hedge = false }\noutlier = { consecutive_failures = 1000 }";
    let (srv, addr) = start_proxy(&h2_pool(&[failing.addr, fast.addr], extra));
    for i in 0..4 {
        let r = get(addr, "/").await;
        assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "fast"), "request {i}");
    }
    assert!(failing.hits() >= 1);
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_on_a_connect_that_fails_go_elsewhere_without_connecting_again() {
    // Accepts TCP and never answers the TLS handshake: its connect times out.
    let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_addr = mute.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = mute.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            open.push(s);
        }
    });
    let pki = Pki::new();
    let mut config = pki.leaf("good", &["127.0.0.1"]).server_config(None);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let good = TestOrigin::start_tls(
        "good",
        Behavior::Healthy,
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    )
    .await;
    let extra = "connect_timeout = \"500ms\"\nbalancer = \"round_robin\"\nretry = { hedge = false }\n\
                 outlier = { consecutive_failures = 1000 }\ntls = { verify = false }";
    let (srv, addr) = start_proxy(&h2_pool(&[mute_addr, good.addr], extra));
    let burst: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { get(addr, "/").await }))
        .collect();
    for t in burst {
        assert_eq!(t.await.unwrap().text(), "good");
    }
    // Three went to the mute backend first: one connected, two waited for it, and
    // when it failed all three went to the good one, with no second attempt.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    held.abort();
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_trailers_from_an_http2_backend_reach_an_http2_client() {
    let b = H2Only::start("b", 200).await;
    let (srv, addr) = start_proxy(&h2_pool(&[b.addr], ""));
    let mut tx = h2_client(addr).await;
    let req = Request::post("http://grpc.test/grpc")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x01x")))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-te-seen"], "trailers");
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"\0\0\0\0\x02hi"));
    stop_proxy(srv).await;
}

/// A backend that refuses every stream (`REFUSED_STREAM`), as an overloaded HTTP/2
/// server does: the request was not processed, so any method may go elsewhere.
async fn refusing_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let refused = Arc::new(AtomicUsize::new(0));
    let count = refused.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_goes_to_another_backend_whatever_the_method() {
    let (refuser, refused) = refusing_backend().await;
    let good = TestOrigin::start("good", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&h2_pool(&[refuser, good.addr], "balancer = \"round_robin\""));
    for _ in 0..4 {
        let r = post_bytes(addr, "/echo", "order=1").await.unwrap();
        assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "order=1"));
    }
    assert!(refused.load(Ordering::SeqCst) >= 1, "the refuser was tried");
    assert_eq!(good.hits(), 4, "each POST reached the good backend once");
    let metrics = rampart::admin::metrics_text(srv.shared());
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rampart_upstream_errors_total") && l.contains("kind=\"stream_refused\"")),
        "{metrics}"
    );
    stop_proxy(srv).await;
    // Alone, it is a 503: nothing processed the request.
    let (srv, addr) = start_proxy(&h2_pool(&[refuser], ""));
    let r = post_bytes(addr, "/echo", "order=2").await.unwrap();
    assert_eq!(r.status, 503);
    stop_proxy(srv).await;
}

/// A backend going away whose GOAWAY names a last stream below one the client had
/// already sent, as a server in a graceful stop does when a request crosses its
/// GOAWAY: written frame by frame, since no server library lets a test place that
/// race. It answers the first stream (200, no body) after the GOAWAY, and ignores the
/// other, which RFC 9113 §6.8 says it did not process. Counts the streams it saw.
async fn going_away_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                if s.read_exact(&mut preface).await.is_err() {
                    return;
                }
                // Our SETTINGS (none).
                let _ = s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
                let mut streams: Vec<u32> = Vec::new();
                loop {
                    let mut head = [0u8; 9];
                    if s.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let mut payload = vec![0u8; len];
                    if s.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    match head[3] {
                        // SETTINGS, not an ACK: acknowledge it.
                        4 if head[4] & 1 == 0 => {
                            let _ = s.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await;
                        }
                        1 if !streams.contains(&id) => {
                            streams.push(id);
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                    if streams.len() == 2 {
                        let first = streams[0].to_be_bytes();
                        let mut out = vec![0, 0, 8, 7, 0, 0, 0, 0, 0];
                        out.extend_from_slice(&first);
                        out.extend_from_slice(&[0, 0, 0, 0]);
                        // HEADERS on the first stream, END_STREAM | END_HEADERS:
                        // `:status: 200` is HPACK's static entry 8.
                        out.extend_from_slice(&[0, 0, 1, 1, 5]);
                        out.extend_from_slice(&first);
                        out.push(0x88);
                        let _ = s.write_all(&out).await;
                        // Read on until the client closes.
                        let mut sink = [0u8; 4096];
                        while let Ok(n) = s.read(&mut sink).await {
                            if n == 0 {
                                return;
                            }
                        }
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_past_a_goaway_goes_to_another_backend_whatever_the_method() {
    let (leaving, seen) = going_away_backend().await;
    let good = TestOrigin::start("good", Behavior::Healthy).await;
    // Both POSTs to the leaving backend (on one connection), the retry to `good`.
    let toml = h2_pool(&[], "balancer = \"round_robin\"").replace(
        "backends = []",
        &format!(
            "backends = [{{ addr = \"{leaving}\", weight = 1000 }}, \"{}\"]",
            good.addr
        ),
    );
    let (srv, addr) = start_proxy(&toml);
    let (a, b) = tokio::join!(
        post_bytes(addr, "/echo", "order=1"),
        post_bytes(addr, "/echo", "order=2")
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "both streams went to the leaving backend"
    );
    let mut statuses = [a.status.as_u16(), b.status.as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 200], "{} / {}", a.text(), b.text());
    assert_eq!(
        good.hits(),
        1,
        "the stream past the GOAWAY went to the good backend, once"
    );
    let echoed = [a.text(), b.text()];
    assert!(echoed.iter().any(|t| t.starts_with("order=")), "{echoed:?}");
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_http2_backend_gets_a_new_connection() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&h2_pool(&[o.addr], ""));
    assert_eq!(post_bytes(addr, "/echo", "one").await.unwrap().text(), "one");
    o.stop();
    let again = TestOrigin::start_on("again", o.addr, Behavior::Healthy).await;
    // The pooled connection is gone; the very next POST (not idempotent) still gets
    // through, on a new connection, because the old one never carried it.
    for body in ["two", "three"] {
        let r = post_bytes(addr, "/echo", body).await.unwrap();
        assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, body));
    }
    assert_eq!((again.hits(), again.connections()), (2, 1));
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_speak_http2_to_an_http2_only_backend() {
    let up = H2Only::start("up", 200).await;
    let down = H2Only::start("down", 503).await;
    let toml = pool_config(
        &[up.addr, down.addr],
        "protocol = \"h2\"\nhealth_check = { path = \"/healthz\", interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 3 }",
    );
    let (srv, addr) = start_proxy(&toml);
    let healthy = |i: usize| rampart::admin::status_json(srv.shared())["pools"][0]["backends"][i]["healthy"].clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(healthy(0) == true && healthy(1) == false && up.streams() >= 2) {
        assert!(Instant::now() < deadline, "up {} down {}", healthy(0), healthy(1));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..4 {
        assert_eq!(get(addr, "/").await.text(), "up");
    }
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_backends_are_spoken_to_in_http2_chosen_by_alpn() {
    let pki = Pki::new();
    let leaf = pki.leaf("o", &["127.0.0.1"]);
    let acceptor = |alpn: &[&[u8]]| {
        let mut config = leaf.server_config(None);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    };
    let both = TestOrigin::start_tls("both", Behavior::Healthy, acceptor(&[b"h2", b"http/1.1"])).await;
    let tls = format!("tls = {{ ca = {:?} }}", pki.ca_file());
    let (srv, addr) = start_proxy(&h2_pool(&[both.addr], &tls));
    for _ in 0..3 {
        assert_eq!(get(addr, "/").await.text(), "both");
    }
    assert_eq!(both.connections(), 1);
    let seen = both.seen_headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["te"], "trailers", "it arrived over HTTP/2");
    stop_proxy(srv).await;
    // One that ignores ALPN gets HTTP/2 all the same (it was configured to speak it).
    let quiet = TestOrigin::start_tls("quiet", Behavior::Healthy, acceptor(&[])).await;
    let (srv, addr) = start_proxy(&h2_pool(&[quiet.addr], &tls));
    assert_eq!(get(addr, "/").await.text(), "quiet");
    let seen = quiet.seen_headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["te"], "trailers", "it arrived over HTTP/2");
    stop_proxy(srv).await;
    // A backend that offers only HTTP/1.1 cannot agree: a 502, as a failed
    // handshake, and it never hears a request.
    let h1 = TestOrigin::start_tls("h1", Behavior::Healthy, acceptor(&[b"http/1.1"])).await;
    let (srv, addr) = start_proxy(&h2_pool(&[h1.addr], &tls));
    assert_eq!(get(addr, "/").await.status, 502);
    assert_eq!(h1.hits(), 0);
    let metrics = rampart::admin::metrics_text(srv.shared());
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rampart_upstream_errors_total") && l.contains("kind=\"backend_tls\"")),
        "{metrics}"
    );
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stalls_mid_body_fails_after_read_timeout() {
    let b = H2Only::start("b", 200).await;
    let extra = "read_timeout = \"300ms\"\nretry = { response_buffer_bytes = 0 }";
    let (srv, addr) = start_proxy(&h2_pool(&[b.addr], extra));
    let outcome = tokio::time::timeout(Duration::from_secs(20), try_get(addr, "/stall")).await;
    let err = outcome
        .expect("the response never ended: no read_timeout")
        .expect_err("cut short");
    assert!(err.contains("body"), "{err}");
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_upgrades_and_config_errors() {
    let frozen = TestOrigin::start("frozen", Behavior::Freeze).await;
    let (srv, addr) = start_proxy(&h2_pool(&[frozen.addr], "response_timeout = \"300ms\""));
    assert_eq!(get(addr, "/").await.status, 504);
    // A WebSocket cannot be carried to an HTTP/2 backend here: 501, not a hang.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let answer = raw_exchange(
        &mut s,
        b"GET /ws HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    stop_proxy(srv).await;

    let bad = pool_config(&[frozen.addr], "protocol = \"h3\"");
    let err = rampart::Config::parse(&bad, "p.toml").unwrap_err().to_string();
    assert!(
        err.contains("p.toml: pools.app.protocol: expected \"http1\" or \"h2\", got \"h3\""),
        "{err}"
    );
}

/// Writes `request` and reads the answer's head.
async fn raw_exchange(s: &mut TcpStream, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A gRPC server's health service, as grpc-go's serves it: `Check` answers the
/// `serving` status (1 `SERVING`, 2 `NOT_SERVING`) for the server as a whole ("")
/// and for `shop.Cart`, and `NOT_FOUND` for any other service; with `serving` at 12
/// every call fails `UNIMPLEMENTED` in its head (Trailers-Only), as a server without
/// the health service does. A call without gRPC's fields gets 415. Other paths
/// answer the server's name.
struct GrpcServer {
    addr: SocketAddr,
    serving: Arc<AtomicU8>,
    services: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcServer {
    async fn start(name: &'static str, serving: u8) -> GrpcServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(AtomicU8::new(serving));
        let services = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s2, seen) = (state.clone(), services.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (state, seen) = (s2.clone(), seen.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (state, seen) = (state.clone(), seen.clone());
                        async move { Ok::<_, Infallible>(grpc_answer(name, &state, &seen, req).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        GrpcServer {
            addr,
            serving: state,
            services,
            task,
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn grpc_answer(
    name: &str,
    state: &AtomicU8,
    seen: &std::sync::Mutex<Vec<String>>,
    req: Request<Incoming>,
) -> Response<AnyBody> {
    if req.uri().path() != "/grpc.health.v1.Health/Check" {
        return Response::new(Full::new(Bytes::from(name.to_string())).boxed());
    }
    let grpc = req.method() == http::Method::POST
        && req
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/grpc")
        && req.headers().get("te").is_some_and(|v| v == "trailers")
        // rampart sends its check's timeout (100 ms in these tests) as the call's
        // deadline; a server that gets none answers 415 here, and the check fails.
        && req.headers().get("grpc-timeout").is_some_and(|v| v == "100m");
    if !grpc {
        let mut r = Response::new(Full::new(Bytes::new()).boxed());
        *r.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return r;
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    // `HealthCheckRequest`: a 5-byte frame head, then field 1 (a name under 128 bytes).
    let service = match &body[5..] {
        [] => String::new(),
        [0x0a, n, rest @ ..] if *n as usize == rest.len() => String::from_utf8(rest.to_vec()).unwrap(),
        other => panic!("not a HealthCheckRequest: {other:?}"),
    };
    seen.lock().unwrap().push(service.clone());
    let head_only = |code: &str| {
        let mut r = Response::new(Full::new(Bytes::new()).boxed());
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        r.headers_mut().insert("grpc-status", code.parse().unwrap());
        r
    };
    let status = state.load(Ordering::SeqCst);
    if status == 12 {
        return head_only("12");
    }
    if !service.is_empty() && service != "shop.Cart" {
        return head_only("5");
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    let frames = vec![
        Ok::<_, Infallible>(Frame::data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut r = Response::new(StreamBody::new(futures_lite::stream::iter(frames)).boxed());
    r.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_checks_take_a_backend_out_while_it_is_not_serving() {
    let a = GrpcServer::start("a", 1).await;
    let b = GrpcServer::start("b", 2).await;
    let toml = pool_config(
        &[a.addr, b.addr],
        "protocol = \"h2\"\nhealth_check = { type = \"grpc\", service = \"shop.Cart\", interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 2 }",
    );
    let (srv, addr) = start_proxy(&toml);
    let healthy = |i: usize| rampart::admin::status_json(srv.shared())["pools"][0]["backends"][i]["healthy"] == true;
    let wait_for = |want: [bool; 2]| async move {
        let deadline = Instant::now() + Duration::from_secs(5);
        while [healthy(0), healthy(1)] != want {
            assert!(
                Instant::now() < deadline,
                "want {want:?}, have {:?}",
                [healthy(0), healthy(1)]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // NOT_SERVING is down; SERVING is up, and takes every request.
    wait_for([true, false]).await;
    for _ in 0..4 {
        assert_eq!(get(addr, "/").await.text(), "a");
    }
    // b comes up; a loses its health service (UNIMPLEMENTED) and goes down.
    b.serving.store(1, Ordering::SeqCst);
    wait_for([true, true]).await;
    a.serving.store(12, Ordering::SeqCst);
    wait_for([false, true]).await;
    for _ in 0..4 {
        assert_eq!(get(addr, "/").await.text(), "b");
    }
    assert!(b.services.lock().unwrap().iter().all(|s| s == "shop.Cart"));
    stop_proxy(srv).await;

    // A service the server does not know (NOT_FOUND) fails the check; the empty
    // service, the server as a whole, is asked when none is named.
    let c = GrpcServer::start("c", 1).await;
    for (service, up) in [("shop.Nope", false), ("", true)] {
        let field = match service {
            "" => "type = \"grpc\"".to_string(),
            s => format!("service = \"{s}\""),
        };
        let toml = pool_config(
            &[c.addr],
            &format!("protocol = \"h2\"\nhealth_check = {{ {field}, interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 1 }}"),
        );
        let (srv, _) = start_proxy(&toml);
        let seen = c.services.lock().unwrap().len();
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.services.lock().unwrap().len() < seen + 3 {
            assert!(Instant::now() < deadline, "no checks");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let st = rampart::admin::status_json(srv.shared());
        assert_eq!(st["pools"][0]["backends"][0]["healthy"], up, "{service:?}: {st}");
        assert_eq!(c.services.lock().unwrap().last().unwrap(), service);
        stop_proxy(srv).await;
    }
}

#[test]
fn a_grpc_health_check_is_refused_where_it_could_not_work() {
    let at = ["127.0.0.1:9".parse().unwrap()];
    assert_config_errors(
        &pool_config(&at, "health_check = { type = \"grpc\" }"),
        &["t.toml: pools.app.health_check.type: a gRPC check speaks HTTP/2, as gRPC does: set the pool's protocol = \"h2\""],
    );
    assert_config_errors(
        &pool_config(
            &at,
            "protocol = \"h2\"\nhealth_check = { type = \"grpc\", path = \"/x\", expect_status = \"200\", headers = { content-type = \"x\", x-token = \"t\" } }",
        ),
        &[
            "pools.app.health_check.path: has no effect on a gRPC check, which asks grpc.health.v1.Health/Check and passes on SERVING",
            "pools.app.health_check.expect_status: has no effect on a gRPC check",
            "pools.app.health_check.headers.content-type: rampart writes it itself (application/grpc)",
        ],
    );
    assert_config_errors(
        &pool_config(
            &at,
            "protocol = \"h2\"\nhealth_check = { type = \"http\", service = \"a\" }",
        ),
        &["pools.app.health_check.service: only a gRPC check asks about a service: set type = \"grpc\""],
    );
}
