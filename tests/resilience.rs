//! Zero-502 mechanisms, each provoked for real: killed, frozen, 503-serving and
//! mid-body-resetting backends; health checks; probation; panic mode; breakers;
//! the retry budget; slow start; and non-idempotent requests never sent twice.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

async fn status_of(srv: &rampart::Server) -> serde_json::Value {
    rampart::admin::status_json(srv.shared())
}

fn backend_field(status: &serde_json::Value, addr: std::net::SocketAddr, field: &str) -> serde_json::Value {
    status["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["addr"] == addr.to_string())
        .unwrap()[field]
        .clone()
}

async fn post(addr: std::net::SocketAddr, body: &'static str) -> Reply {
    post_bytes(addr, "/submit", body).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_costs_no_request_get_or_post() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let c = TestOrigin::start("c", Behavior::Healthy).await;
    // Round robin so the dead backend is certainly tried (peak-EWMA might avoid it).
    let (srv, addr) = start_proxy(&pool_config(&[a.addr, b.addr, c.addr], "balancer = \"round_robin\""));
    // Warm pooled connections to every backend, then kill one.
    for _ in 0..30 {
        get(addr, "/").await;
    }
    b.stop();
    for i in 0..60 {
        let r = if i % 2 == 0 {
            get(addr, "/").await
        } else {
            post(addr, "form=1").await
        };
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_ne!(r.text(), "b");
    }
    let st = status_of(&srv).await;
    assert_eq!(backend_field(&st, b.addr, "ejected"), true, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_left_unread_by_a_backend_that_died_goes_to_another() {
    let dying = DyingOrigin::start(false).await;
    let good = TestOrigin::start("good", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[dying.addr, good.addr], "balancer = \"round_robin\""));
    for i in 0..6 {
        let r = post(addr, "pay=1").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.text(), "good");
    }
    assert_eq!(good.hits(), 6, "every POST reached the good backend once");
    assert_eq!(dying.read.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_read_by_a_backend_that_died_is_not_sent_again() {
    let dying = DyingOrigin::start(true).await;
    let good = TestOrigin::start("good", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&pool_config(&[dying.addr, good.addr], "balancer = \"round_robin\""));
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(post(addr, "pay=1").await.status.as_u16());
    }
    // The backend read one POST, then died with a FIN: it may have acted on it.
    assert_eq!(dying.read.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(statuses.iter().filter(|s| **s == 502).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 5, "{statuses:?}");
    assert_eq!(good.hits(), 5, "the POST the dead backend read was not resent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_may_have_reached_the_backend_is_never_sent_twice() {
    let bad = TestOrigin::start("bad", Behavior::CloseBeforeResponse).await;
    let good = TestOrigin::start("good", Behavior::Healthy).await;
    // Ejection off, so the bad backend keeps getting its share of requests; and a
    // budget that covers retrying every GET (the default caps retries at ~20%).
    let extra =
        "balancer = \"round_robin\"\noutlier = { consecutive_failures = 1000 }\nretry = { budget_percent = 100 }";
    let (_srv, addr) = start_proxy(&pool_config(&[bad.addr, good.addr], extra));
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..20 {
        let r = post(addr, "pay=1").await;
        match r.status.as_u16() {
            200 => ok += 1,
            502 => failed += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(
        bad.hits() + good.hits(),
        20,
        "every POST reached exactly one backend once"
    );
    assert_eq!(
        failed,
        bad.hits(),
        "each POST the bad backend saw failed, none was retried"
    );
    assert_eq!(ok, good.hits());
    assert!(failed > 0 && ok > 0);
    // A POST with an Idempotency-Key is retried: the server deduplicates.
    bad.reset_hits();
    good.reset_hits();
    for _ in 0..10 {
        let r = send(
            addr,
            Request::post("/submit")
                .header("host", "t")
                .header("idempotency-key", "k-1")
                .body(Full::new(Bytes::from("pay=1")))
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
    }
    assert!(bad.hits() > 0);
    assert_eq!(good.hits(), 10);
    // Also without a body, when its fields go to the backend as the client wrote them
    // (no map is built on that path, and the key must still be seen).
    bad.reset_hits();
    good.reset_hits();
    for _ in 0..10 {
        let status = status_of_raw(
            addr,
            b"POST /submit HTTP/1.1\r\nHost: t\r\nIdempotency-Key: k-2\r\n\r\n",
        )
        .await;
        assert_eq!(status, 200);
    }
    assert!(bad.hits() > 0);
    assert_eq!(good.hits(), 10);
    // The same failure on a GET is retried on the other backend.
    bad.reset_hits();
    good.reset_hits();
    for _ in 0..20 {
        assert_eq!(get(addr, "/").await.status, 200);
    }
    assert!(bad.hits() > 0, "round robin sent some GETs to the bad backend");
    assert_eq!(good.hits(), 20, "each of them was retried on the good one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_backend_is_hedged_then_ejected() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let frozen = TestOrigin::start("frozen", Behavior::Freeze).await;
    let (srv, addr) = start_proxy(&pool_config(
        &[a.addr, b.addr, frozen.addr],
        "balancer = \"round_robin\"",
    ));
    let mut worst = Duration::ZERO;
    for i in 0..30 {
        let t = Instant::now();
        let r = get(addr, "/").await;
        worst = worst.max(t.elapsed());
        assert_eq!(r.status, 200, "request {i}");
    }
    // Generous bound; the 250 ms claim is measured by the chaos suite.
    assert!(worst < Duration::from_secs(2), "worst {worst:?}");
    assert!(frozen.hits() >= 1, "the frozen backend was tried");
    // Ejected once three hedged-against tries stay silent past the grace period.
    let deadline = Instant::now() + Duration::from_secs(3);
    while backend_field(&status_of(&srv).await, frozen.addr, "ejected") != true {
        assert!(Instant::now() < deadline, "frozen backend never ejected");
        get(addr, "/").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        frozen.hits() <= 20,
        "ejected after a few silent tries, got {}",
        frozen.hits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_serving_503s_is_retried_around_and_ejected() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let sick = TestOrigin::start("sick", Behavior::Status(503)).await;
    let c = TestOrigin::start("c", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&pool_config(&[a.addr, sick.addr, c.addr], "balancer = \"round_robin\""));
    for i in 0..30 {
        let r = get(addr, "/").await;
        assert_eq!(r.status, 200, "request {i}");
    }
    assert!(sick.hits() <= 4, "ejected after 3 failures, got {}", sick.hits());
    let st = status_of(&srv).await;
    assert_eq!(backend_field(&st, sick.addr, "ejected"), true);
}

/// Sends a POST head declaring `len` body bytes, then `chunks` of the body with
/// `pause` between them, and reads until rampart closes or 10 s pass.
async fn upload(addr: std::net::SocketAddr, len: usize, chunks: &[usize], pause: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST /count HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    for &n in chunks {
        if s.write_all(&vec![b'x'; n]).await.is_err() {
            break;
        }
        tokio::time::sleep(pause).await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_its_upload_gets_408_and_the_backend_is_not_blamed() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    // One failure counted against the backend would eject it; the response timeout is
    // shorter than the body timeout, so a clock that ran during the upload would give
    // the backend a 504 first.
    let pool = "outlier = { consecutive_failures = 1 }\nresponse_timeout = \"200ms\"";
    let toml = with_server_setting(&pool_config(&[o.addr], pool), "client_body_timeout = \"500ms\"");
    let (srv, addr) = start_proxy(&toml);
    // Small (kept whole for a retry before it goes out) and large (streamed to the
    // backend as it arrives), each stalled after its first bytes.
    for (len, sent) in [(100, 10), (10_000_000, 300_000)] {
        let t = Instant::now();
        let r = upload(addr, len, &[sent], Duration::ZERO).await;
        assert!(r.starts_with("HTTP/1.1 408"), "{len}: {r}");
        assert!(t.elapsed() < Duration::from_secs(8), "{len}: {:?}", t.elapsed());
    }
    let st = status_of(&srv).await;
    assert_eq!(backend_field(&st, o.addr, "ejected"), false, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_slower_than_the_response_timeout_still_gets_its_answer() {
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    // The response timeout runs from the end of the request, as in nginx and Envoy:
    // an upload that takes 1.5 s is not a backend that failed to answer in 300 ms.
    let (srv, addr) = start_proxy(&pool_config(&[o.addr], "response_timeout = \"300ms\""));
    let chunks = [100_000; 10];
    let r = upload(addr, 1_000_000, &chunks, Duration::from_millis(150)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("1000000"), "{r}");
    // Nor is the upload's time the backend's latency, for the balancer (peak-EWMA
    // takes a peak at once) or the hedge delay.
    let ewma = backend_field(&status_of(&srv).await, o.addr, "ewma_ms")
        .as_f64()
        .unwrap();
    assert!(ewma < 500.0, "ewma {ewma} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stops_taking_an_upload_gets_504_after_the_try_timeout() {
    // Reads the head, never the body: the upload fills the socket buffers and stops.
    let o = TestOrigin::start("o", Behavior::Freeze).await;
    let (_srv, addr) = start_proxy(&pool_config(&[o.addr], "response_timeout = \"300ms\""));
    let t = Instant::now();
    let r = upload(addr, 64_000_000, &[64_000_000], Duration::ZERO).await;
    assert!(r.starts_with("HTTP/1.1 504"), "{r}");
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
}

/// An origin that answers every request with an endless body, and notes when
/// rampart stops taking it (its write fails).
async fn endless_origin() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cut = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = cut.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let cut = seen.clone();
            tokio::spawn(async move {
                if !read_request(&mut s).await {
                    return;
                }
                let chunk = vec![b'x'; 64 * 1024];
                let mut out = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n")
                    .await;
                while out.is_ok() {
                    out = s.write_all(&chunk).await;
                }
                cut.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    (addr, cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_after_send_timeout() {
    use tokio::io::AsyncWriteExt;
    let (origin, cut) = endless_origin().await;
    let toml = with_server_setting(&pool_config(&[origin], ""), "send_timeout = \"300ms\"");
    let (_srv, addr) = start_proxy(&toml);
    // Written by rampart's own HTTP/1.1 path, then by hyper's (a chunked upload
    // goes there). Neither client reads a byte of its response.
    let requests: [&[u8]; 2] = [
        b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n",
        b"POST /big HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ];
    let mut held = Vec::new();
    for (i, req) in requests.iter().enumerate() {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(req).await.unwrap();
        held.push(s);
        // Once the buffers between them are full, the client has taken nothing for
        // send_timeout: rampart closes its side, and the backend connection with it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while cut.load(std::sync::atomic::Ordering::SeqCst) <= i {
            assert!(Instant::now() < deadline, "request {i}: the backend is still writing");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_given_no_window_is_reset_after_send_timeout_but_a_slow_reader_is_not() {
    use http_body_util::BodyExt;
    use std::sync::atomic::Ordering;
    let (origin, cut) = endless_origin().await;
    let toml = with_server_setting(&pool_config(&[origin], ""), "send_timeout = \"300ms\"");
    let (_srv, addr) = start_proxy(&toml);
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let get = || Request::get("http://t/big").body(Full::new(Bytes::new())).unwrap();

    // Slower than the backend, never stalled for send_timeout: 64 KiB (one stream
    // window) every 150 ms.
    let mut body = tx.send_request(get()).await.unwrap().into_body();
    let (started, mut got, mut paused_at) = (Instant::now(), 0, 0);
    while started.elapsed() < Duration::from_millis(1500) {
        let frame = body
            .frame()
            .await
            .expect("the stream ended")
            .expect("the stream was reset");
        got += frame.data_ref().map_or(0, |d| d.len());
        if got - paused_at >= 64 * 1024 {
            paused_at = got;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    assert_eq!(cut.load(Ordering::SeqCst), 0, "a slow reader was cut off");
    drop(body); // resets the stream: the backend connection goes with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cut.load(Ordering::SeqCst) < 1 {
        assert!(
            Instant::now() < deadline,
            "the backend is still writing to a reset stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // This one never opens its window past the first 64 KiB; the connection (pings,
    // other streams) stays alive, so only the stream's own timeout can end it.
    let held = tx.send_request(get()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cut.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "a stream given no window still holds its backend"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut body = held.into_body();
    let mut outcome = Ok(());
    while let Some(frame) = body.frame().await {
        if let Err(e) = frame {
            outcome = Err(e);
            break;
        }
    }
    assert!(
        outcome.is_err(),
        "the stalled stream ended cleanly instead of being reset"
    );
    // The connection itself is fine: a new stream on it is answered.
    let r = tx.send_request(get()).await.unwrap();
    assert_eq!(r.status(), 200);
}

/// An origin that answers the first request on each connection (keep-alive), then
/// reads the second and resets the connection without answering (`SO_LINGER` 0):
/// a server whose idle timer closed the connection as rampart reused it. Counts the
/// requests it read.
async fn one_answer_per_connection_origin() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                for answered in [false, true] {
                    if !read_request(&mut s).await {
                        return;
                    }
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if answered {
                        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                        return;
                    }
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_reset_unanswered_is_resent_on_a_new_one_to_the_same_backend() {
    use std::sync::atomic::Ordering;
    let (origin, reads) = one_answer_per_connection_origin().await;
    // Its own pool name, for its own line in the process-wide metrics.
    let toml = pool_config(&[origin], NO_HEALTH_CHECKS)
        .replace("\"app\"", "\"resend\"")
        .replace("pools.app", "pools.resend");
    let (_srv, addr) = start_proxy(&toml);
    assert_eq!(get(addr, "/a").await.status, 200);
    // Reused, reset: a pool of one has no other backend, so before this the GET
    // was a 502. Resent on a new connection, as nginx does for a cached one.
    let r = get(addr, "/b").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(reads.load(Ordering::SeqCst), 3);
    // A POST the application may have read is not sent twice.
    let r = post_bytes(addr, "/c", Bytes::from_static(b"x=1")).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(reads.load(Ordering::SeqCst), 4);
    assert_eq!(metric("rampart_stale_connection_resends_total{pool=\"resend\"}"), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_upload_never_meets_the_keep_alive_race() {
    use std::sync::atomic::Ordering;
    let (origin, reads) = one_answer_per_connection_origin().await;
    let (_srv, addr) = start_proxy(&pool_config(&[origin], NO_HEALTH_CHECKS));
    // An idle pooled connection that the backend will reset under the next request.
    assert_eq!(get(addr, "/a").await.status, 200);
    // Past max_replay_bytes (64 KiB) the body streams: it could not be sent again, so
    // it goes on a new connection, not the pooled one, and is answered. On the
    // pooled one it was a 502.
    let big = Bytes::from(vec![b'x'; 200 * 1024]);
    let r = post_bytes(addr, "/upload", big).await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "ok".to_string()));
    assert_eq!(reads.load(Ordering::SeqCst), 2);
    // A chunked body of unknown length streams too.
    let chunked = Request::post("/upload").header("host", "t").body(big_body(3)).unwrap();
    let r = send(addr, chunked).await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "ok".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_passed_through_when_no_retry_is_possible() {
    let sick = TestOrigin::start("sick", Behavior::Status(503)).await;
    let (_srv, addr) = start_proxy(&pool_config(&[sick.addr], ""));
    let r = get(addr, "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "sick", "the backend's own answer, not an error page");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_body_is_retried_for_get_and_the_client_sees_a_whole_body() {
    let reset = TestOrigin::start("reset", Behavior::ResetMidBody).await;
    let good = TestOrigin::start("good", Behavior::Healthy).await;
    let extra = "balancer = \"round_robin\"\noutlier = { consecutive_failures = 1000 }";
    let (_srv, addr) = start_proxy(&pool_config(&[reset.addr, good.addr], extra));
    for i in 0..10 {
        let r = get(addr, "/").await;
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.text(), "good");
    }
    assert!(reset.hits() > 0);
}

/// A backend whose responses all fail after their head (reset, or stalled past
/// `read_timeout`) is failing, whatever its status line says: it is ejected after
/// `consecutive_failures` of them, buffered (and retried) or streamed alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_whose_bodies_fail_is_ejected() {
    for (behavior, extra) in [
        (Behavior::ResetMidBody, ""),
        (Behavior::ResetMidBody, "retry = { response_buffer_bytes = 0 }"),
        (
            Behavior::StallMidBody,
            "read_timeout = \"200ms\"\nretry = { response_buffer_bytes = 0 }",
        ),
        (Behavior::ResetMidBody, "protocol = \"h2\""),
        (
            Behavior::ResetMidBody,
            "protocol = \"h2\"\nretry = { response_buffer_bytes = 0 }",
        ),
        (
            Behavior::StallMidBody,
            "protocol = \"h2\"\nread_timeout = \"200ms\"\nretry = { response_buffer_bytes = 0 }",
        ),
    ] {
        let bad = TestOrigin::start("bad", behavior.clone()).await;
        let good = TestOrigin::start("good", Behavior::Healthy).await;
        let extra = format!("balancer = \"round_robin\"\n{NO_HEALTH_CHECKS}\n{extra}");
        let (srv, addr) = start_proxy(&pool_config(&[bad.addr, good.addr], &extra));
        let mut ok = 0;
        for _ in 0..12 {
            if let Ok(r) = try_get(addr, "/").await {
                ok += (r.text() == "good") as usize;
            }
            if backend_field(&status_of(&srv).await, bad.addr, "ejected") == true {
                break;
            }
        }
        assert_eq!(
            backend_field(&status_of(&srv).await, bad.addr, "ejected"),
            true,
            "{behavior:?} {extra}: {} tries to it, {ok} good answers, never ejected",
            bad.hits()
        );
        stop_proxy(srv).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stalls_mid_body_fails_the_response_after_read_timeout() {
    let stall = TestOrigin::start("stall", Behavior::StallMidBody).await;
    // Streamed at once (no retry buffer), so the client has the head and part of the
    // body when the backend stops sending.
    let extra = "read_timeout = \"300ms\"\nretry = { response_buffer_bytes = 0 }";
    let (_srv, addr) = start_proxy(&pool_config(&[stall.addr], extra));
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(20), try_get(addr, "/")).await;
    let outcome = outcome.expect("the response never ended: no read_timeout");
    let err = outcome.expect_err("a body cut short is an error to the client");
    assert!(err.contains("body"), "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "not before read_timeout"
    );
}

/// `retry.on_status`: a 500 means the backend failed only when it is listed. Listed,
/// every GET is answered by the other backend (the 500s are retried there) and the
/// backend that sends them is ejected; by default the client gets the 500 and nothing
/// is ejected; and `on_status = []` passes even a 503 on, as nginx's default does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_status_names_the_statuses_that_mean_a_backend_failed() {
    let good = TestOrigin::start("good", Behavior::Healthy).await;
    for (status, on_status, retried) in [
        (500, "", false),
        (500, "on_status = [500, 502, 503, 504], ", true),
        (503, "on_status = [], ", false),
    ] {
        let bad = TestOrigin::start("bad", Behavior::Status(status)).await;
        let extra = format!(
            "balancer = \"round_robin\"\n{NO_HEALTH_CHECKS}\nretry = {{ {on_status}hedge = false, budget_percent = 100 }}"
        );
        let (srv, addr) = start_proxy(&pool_config(&[good.addr, bad.addr], &extra));
        let mut passed_on = 0;
        for _ in 0..10 {
            let r = get(addr, "/").await;
            if r.status.as_u16() == status {
                passed_on += 1;
            } else {
                assert_eq!((r.status.as_u16(), r.text()), (200, "good".to_string()), "{on_status}");
            }
        }
        let ejected = backend_field(&status_of(&srv).await, bad.addr, "ejected") == true;
        if retried {
            assert_eq!(
                (passed_on, ejected),
                (0, true),
                "{status} listed: retried, and the backend ejected"
            );
        } else {
            assert!(
                passed_on >= 3,
                "{status} {on_status}: the client gets it ({passed_on} of 10)"
            );
            assert!(!ejected, "{status} {on_status}: not a failure, no ejection");
        }
        stop_proxy(srv).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_checks_take_a_backend_out_and_bring_it_back() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let hc = "health_check = { path = \"/healthz\", interval = \"50ms\", timeout = \"40ms\", rise = 2, fall = 2 }";
    let (srv, addr) = start_proxy(&pool_config(&[a.addr, b.addr], hc));
    b.set(Behavior::Status(500));
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend_field(&status_of(&srv).await, b.addr, "healthy") == true {
        assert!(Instant::now() < deadline, "b never marked down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.reset_hits();
    for _ in 0..20 {
        assert_eq!(get(addr, "/").await.text(), "a");
    }
    b.set(Behavior::Healthy);
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend_field(&status_of(&srv).await, b.addr, "healthy") == false {
        assert!(Instant::now() < deadline, "b never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut saw_b = false;
    for _ in 0..40 {
        saw_b |= get(addr, "/").await.text() == "b";
    }
    assert!(saw_b, "a recovered backend gets traffic again");
}

/// `expect_body`: a backend that answers its check 200 but without the text (a status
/// page saying it is still warming up) is marked down, over HTTP/1.1 and HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_check_can_require_text_in_the_body() {
    // `fall = 3`: with 1, one probe of the ready backend slower than the timeout on
    // a loaded machine marked it down (seen once under two test runs at a time).
    for protocol in ["http1", "h2"] {
        let ready = TestOrigin::start("ready: yes", Behavior::Healthy).await;
        let warming = TestOrigin::start("ready: not yet", Behavior::Healthy).await;
        let hc = format!(
            "protocol = \"{protocol}\"\nhealth_check = {{ path = \"/healthz\", expect_body = \"ready: yes\", interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 3 }}"
        );
        let (srv, addr) = start_proxy(&pool_config(&[ready.addr, warming.addr], &hc));
        let deadline = Instant::now() + Duration::from_secs(5);
        while backend_field(&status_of(&srv).await, warming.addr, "healthy") == true {
            assert!(
                Instant::now() < deadline,
                "{protocol}: the warming backend never marked down"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            backend_field(&status_of(&srv).await, ready.addr, "healthy"),
            true,
            "{protocol}"
        );
        for _ in 0..20 {
            assert_eq!(get(addr, "/").await.text(), "ready: yes", "{protocol}");
        }
        stop_proxy(srv).await;
    }
}

/// `health_check.headers`: every probe carries them, over HTTP/1.1 and HTTP/2, and a
/// `User-Agent` among them replaces rampart's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_send_the_configured_fields() {
    for protocol in ["http1", "h2"] {
        let o = TestOrigin::start("o", Behavior::Healthy).await;
        let hc = format!(
            "protocol = \"{protocol}\"\nhealth_check = {{ path = \"/healthz\", interval = \"50ms\", headers = {{ \"X-Health-Token\" = \"s3cret\", \"User-Agent\" = \"lb-probe/1\" }} }}"
        );
        let (srv, _addr) = start_proxy(&pool_config(&[o.addr], &hc));
        let deadline = Instant::now() + Duration::from_secs(5);
        while o.hits() < 2 {
            assert!(Instant::now() < deadline, "{protocol}: no probe reached the origin");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
        assert_eq!(seen["x-health-token"], "s3cret", "{protocol}: {seen:?}");
        assert_eq!(
            seen.get_all("user-agent").iter().collect::<Vec<_>>(),
            ["lb-probe/1"],
            "{protocol}"
        );
        stop_proxy(srv).await;
    }
    let with = |hc: &str| pool_config(&["127.0.0.1:1".parse().unwrap()], hc);
    assert_config_errors(
        &with("health_check = { path = \"/h\", headers = { Host = \"x\", \"a b\" = \"1\", X-Ok = \"bad\\u0001\" } }"),
        &[
            "pools.app.health_check.headers.Host: rampart writes it itself (the check's host is health_check.host)",
            "pools.app.health_check.headers.a b: not a header name",
            "pools.app.health_check.headers.X-Ok: not a valid header value",
        ],
    );
    assert_config_errors(
        &with("health_check = { type = \"tcp\", headers = { X-Token = \"1\" } }"),
        &["pools.app.health_check.headers.X-Token: only an HTTP or gRPC check sends fields"],
    );
}

/// Under frequent reloads (or DNS updates), a backend failing its checks is still
/// marked down: the checks failed in a row do not start again from zero, and a probe
/// waiting on a frozen backend is not cut short, at each reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_go_on_through_reloads() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Status(500)).await;
    let c = TestOrigin::start("c", Behavior::Freeze).await;
    let hc = "health_check = { path = \"/healthz\", interval = \"600ms\", jitter = \"60ms\", timeout = \"200ms\", fall = 3 }";
    let toml = pool_config(&[a.addr, b.addr, c.addr], hc);
    let (srv, _addr) = start_proxy(&toml);
    let started = Instant::now();
    // A reload every 150 ms. b's probes fail at once: the counts toward `fall` must
    // survive each reload. c's take the whole 200 ms timeout: a reload must not cut
    // them short.
    let deadline = started + Duration::from_secs(10);
    for reloads in 0.. {
        let st = status_of(&srv).await;
        let down = backend_field(&st, b.addr, "healthy") == false && backend_field(&st, c.addr, "healthy") == false;
        if down && reloads >= 16 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b or c never marked down across reloads: {st}"
        );
        srv.reload(rampart::Config::parse(&toml, "t").unwrap()).unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Nor does a reload bring the next probe forward: a, which gets no requests, was
    // probed about once per 600 ms interval (540 ms at the least, with the jitter),
    // not once per reload.
    let probes = a.hits() as u128;
    let allowed = started.elapsed().as_millis() / 540 + 2;
    assert!(probes <= allowed, "a probed {probes} times, more than {allowed}");
    assert_eq!(backend_field(&status_of(&srv).await, a.addr, "healthy"), true);
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_backend_is_probed_before_it_gets_traffic_again() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let b_addr = b.addr;
    let extra = "balancer = \"round_robin\"\nhealth_check = { type = \"none\" }\noutlier = { base_ejection = \"200ms\", max_ejection = \"200ms\" }";
    let (srv, addr) = start_proxy(&pool_config(&[a.addr, b_addr], extra));
    get(addr, "/").await;
    b.stop();
    for _ in 0..10 {
        assert_eq!(get(addr, "/").await.status, 200);
    }
    assert_eq!(backend_field(&status_of(&srv).await, b_addr, "available"), false);
    // Ejections end but b still refuses: each probe fails and b stays out.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let st = status_of(&srv).await;
    assert_eq!(
        backend_field(&st, b_addr, "available"),
        false,
        "a failing probe keeps b out: {st}"
    );
    for _ in 0..10 {
        assert_eq!(get(addr, "/").await.text(), "a");
    }
    // b comes back: the next probe restores it.
    let b2 = TestOrigin::start_on("b", b_addr, Behavior::Healthy).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = status_of(&srv).await;
        if backend_field(&st, b_addr, "available") == true {
            break;
        }
        assert!(Instant::now() < deadline, "b never restored: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..10 {
        get(addr, "/").await;
    }
    assert!(b2.hits() > 0, "restored backend gets traffic");
}

/// An origin whose every third request gets 502: a third of its tries fail, never
/// three in a row.
async fn every_third_fails() -> std::net::SocketAddr {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let n = n.clone();
            let svc = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let status = if i.is_multiple_of(3) { 502 } else { 200 };
                async move {
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from_static(b"flaky")))
                            .unwrap(),
                    )
                }
            });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    addr
}

/// `outlier.failure_percentage`: a backend that fails a third of its tries, never
/// three in a row (so consecutive failures never eject it), is ejected once an
/// interval's tries show it; without the setting it is not. Clients see no failure
/// either way: each 502 of a GET is retried on the other backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_failing_a_share_of_its_requests_is_ejected_by_failure_percentage() {
    let good = TestOrigin::start("good", Behavior::Healthy).await;
    let flaky = every_third_fails().await;
    for judged in [false, true] {
        let extra = if judged {
            "balancer = \"round_robin\"\noutlier = { failure_percentage = 20, failure_percentage_min_requests = 10, failure_percentage_interval = \"500ms\" }"
        } else {
            "balancer = \"round_robin\""
        };
        let (srv, addr) = start_proxy(&pool_config(
            &[good.addr, flaky],
            &format!("{extra}\n{NO_HEALTH_CHECKS}"),
        ));
        let started = Instant::now();
        let mut ejected = false;
        while started.elapsed() < Duration::from_millis(2500) {
            let r = get(addr, "/").await;
            assert_eq!(r.status, 200, "the client never sees the 502");
            if backend_field(&status_of(&srv).await, flaky, "ejected") == true {
                ejected = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(ejected, judged, "failure_percentage set: {judged}");
        stop_proxy(srv).await;
    }
}

/// `outlier.success_rate_stdev_factor`: among five backends, the one whose success
/// rate is far below the others' is ejected, judged against them, not a threshold;
/// consecutive failures are kept from ejecting it, and without the setting it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_far_below_its_peers_success_rate_is_ejected() {
    let mut good = Vec::new();
    for name in ["a", "b", "c", "d"] {
        good.push(TestOrigin::start(name, Behavior::Healthy).await);
    }
    let bad = TestOrigin::start("bad", Behavior::Status(503)).await;
    let mut backends: Vec<_> = good.iter().map(|o| o.addr).collect();
    backends.push(bad.addr);
    for judged in [false, true] {
        let outlier = if judged {
            "outlier = { consecutive_failures = 1000, success_rate_stdev_factor = 1.9, success_rate_min_requests = 5, interval = \"500ms\" }"
        } else {
            "outlier = { consecutive_failures = 1000 }"
        };
        let (srv, addr) = start_proxy(&pool_config(
            &backends,
            // Random: round robin's order, with each retry taking a turn, starved one.
            &format!("balancer = \"random\"\n{outlier}\nretry = {{ budget_percent = 100 }}\n{NO_HEALTH_CHECKS}"),
        ));
        let started = Instant::now();
        let mut ejected = false;
        while started.elapsed() < Duration::from_millis(2500) {
            let r = get(addr, "/").await;
            assert_eq!(r.status, 200, "the client never sees the 503");
            if backend_field(&status_of(&srv).await, bad.addr, "ejected") == true {
                ejected = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(ejected, judged, "success_rate_stdev_factor set: {judged}");
        for o in &good {
            assert_eq!(backend_field(&status_of(&srv).await, o.addr, "ejected"), false);
        }
        stop_proxy(srv).await;
    }
}

/// Round robin keeps every healthy backend's turn while another fails: deciding
/// whether a 503 can be retried elsewhere must not use up the next backend's turn
/// (it did, and the backend after the failing one in the order got nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_skips_no_healthy_backend_while_another_fails() {
    let mut good = Vec::new();
    for name in ["a", "b", "c"] {
        good.push(TestOrigin::start(name, Behavior::Healthy).await);
    }
    let bad = TestOrigin::start("bad", Behavior::Status(503)).await;
    let mut backends: Vec<_> = good.iter().map(|o| o.addr).collect();
    backends.push(bad.addr);
    let (srv, addr) = start_proxy(&pool_config(
        &backends,
        &format!("balancer = \"round_robin\"\noutlier = {{ consecutive_failures = 1000 }}\nretry = {{ budget_percent = 100, hedge = false }}\n{NO_HEALTH_CHECKS}"),
    ));
    for _ in 0..40 {
        assert_eq!(get(addr, "/").await.status, 200);
    }
    let hits: Vec<usize> = good.iter().map(|o| o.hits()).collect();
    assert!(
        hits.iter().all(|&h| h >= 8),
        "hits of a, b, c: {hits:?} (bad: {})",
        bad.hits()
    );
    stop_proxy(srv).await;
}

/// The same for a hedge the retry budget refuses: the backend after a slow one in
/// round robin's order keeps its turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_skips_no_backend_when_a_hedge_is_refused() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let slow = TestOrigin::start("slow", Behavior::Slow(Duration::from_millis(100))).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&pool_config(
        &[a.addr, slow.addr, b.addr],
        &format!("balancer = \"round_robin\"\nretry = {{ hedge_delay = \"20ms\", budget_percent = 0, budget_min_per_sec = 0 }}\n{NO_HEALTH_CHECKS}"),
    ));
    for _ in 0..15 {
        assert_eq!(get(addr, "/").await.status, 200);
    }
    let hits = [a.hits(), slow.hits(), b.hits()];
    assert!(hits.iter().all(|&h| h >= 4), "hits of a, slow, b: {hits:?}");
    stop_proxy(srv).await;
}

#[test]
fn failure_percentage_errors_name_their_field() {
    let with = |outlier: &str| pool_config(&["127.0.0.1:1".parse().unwrap()], outlier);
    assert_config_errors(
        &with("outlier = { failure_percentage = 0, failure_percentage_min_requests = 0, failure_percentage_interval = \"10ms\" }"),
        &[
            "pools.app.outlier.failure_percentage: must be between 1 and 100",
            "pools.app.outlier.failure_percentage_min_requests: must be at least 1",
            "pools.app.outlier.failure_percentage_interval: must be at least 100ms",
        ],
    );
    assert_config_errors(
        &with("outlier = { failure_percentage_min_requests = 20, interval = \"1s\", success_rate_min_hosts = 3 }"),
        &[
            "pools.app.outlier.failure_percentage_min_requests: has no effect without failure_percentage",
            "pools.app.outlier.interval: has no effect without failure_percentage or success_rate_stdev_factor",
            "pools.app.outlier.success_rate_min_hosts: has no effect without success_rate_stdev_factor",
        ],
    );
    assert_config_errors(
        &with("outlier = { success_rate_stdev_factor = 0.0, success_rate_min_hosts = 1, success_rate_min_requests = 0, interval = \"1s\", failure_percentage_interval = \"1s\" }"),
        &[
            "pools.app.outlier.success_rate_stdev_factor: must be above 0 and at most 10 (Envoy's default, 1900, is 1.9 here)",
            "pools.app.outlier.success_rate_min_hosts: must be at least 2",
            "pools.app.outlier.success_rate_min_requests: must be at least 1",
            "pools.app.outlier.failure_percentage_interval: is the older name of interval: set one",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_panic_threshold_traffic_goes_to_all_backends() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    // A health check nobody can pass marks every backend down.
    let hc =
        "health_check = { path = \"/\", expect_status = \"599\", interval = \"50ms\", timeout = \"40ms\", fall = 1 }";
    let (srv, addr) = start_proxy(&pool_config(&[a.addr, b.addr], hc));
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend_field(&status_of(&srv).await, b.addr, "healthy") == true
        || backend_field(&status_of(&srv).await, a.addr, "healthy") == true
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..10 {
        assert_eq!(get(addr, "/").await.status, 200, "panic mode serves from all backends");
    }
    let no_panic = format!("{hc}\noutlier = {{ panic_threshold = 0 }}");
    let (srv2, addr2) = start_proxy(&pool_config(&[a.addr, b.addr], &no_panic));
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend_field(&status_of(&srv2).await, a.addr, "healthy") == true
        || backend_field(&status_of(&srv2).await, b.addr, "healthy") == true
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = get(addr2, "/").await;
    assert_eq!(r.status, 503, "without panic mode, no healthy backend means 503");
    assert_eq!(r.headers["retry-after"], "1");
}

/// The breaker's counts belong to the pool, not to one config: requests in flight
/// when a reload (or a DNS update) installs a new snapshot still count against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_counts_survive_a_reload() {
    let slow = TestOrigin::start("slow", Behavior::Slow(Duration::from_millis(1500))).await;
    let toml = pool_config(&[slow.addr], "circuit_breaker = { max_requests = 1 }");
    let (srv, addr) = start_proxy(&toml);
    let first = tokio::spawn(async move { get(addr, "/").await.status });
    let deadline = Instant::now() + Duration::from_secs(5);
    while slow.hits() == 0 {
        assert!(Instant::now() < deadline, "the first request never reached the backend");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    srv.reload(rampart::Config::parse(&toml, "t").unwrap()).unwrap();
    let r = get(addr, "/").await;
    assert_eq!(r.status, 503, "a reload reset the breaker: {}", r.text());
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(get(addr, "/").await.status, 200, "the slot was given back");
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_sheds_excess_requests_with_a_fast_503() {
    let slow = TestOrigin::start("slow", Behavior::Slow(Duration::from_millis(600))).await;
    let (_srv, addr) = start_proxy(&pool_config(&[slow.addr], "circuit_breaker = { max_requests = 2 }"));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..6 {
        set.spawn(async move {
            let t = Instant::now();
            let r = get(addr, "/").await;
            (r.status.as_u16(), r.headers.get("retry-after").is_some(), t.elapsed())
        });
    }
    let mut ok = 0;
    let mut shed = 0;
    while let Some(r) = set.join_next().await {
        let (status, retry_after, took) = r.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                shed += 1;
                assert!(retry_after);
                assert!(
                    took < Duration::from_millis(500),
                    "shed requests must not queue: {took:?}"
                );
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((ok, shed), (2, 4));
    assert_eq!(slow.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_retry_budget_stops_retries() {
    let sick = TestOrigin::start("sick", Behavior::Status(503)).await;
    let good = TestOrigin::start("good", Behavior::Healthy).await;
    let extra = "balancer = \"round_robin\"\noutlier = { consecutive_failures = 1000 }\n\
                 retry = { budget_percent = 0, budget_min_per_sec = 0, hedge = false }";
    let (_srv, addr) = start_proxy(&pool_config(&[sick.addr, good.addr], extra));
    let mut passed_through = 0;
    for _ in 0..10 {
        if get(addr, "/").await.status == 503 {
            passed_through += 1;
        }
    }
    assert_eq!(passed_through, sick.hits(), "no budget: every 503 reached the client");
    assert!(passed_through > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_up_a_backend_added_by_reload() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let c = TestOrigin::start("c", Behavior::Healthy).await;
    let extra = "balancer = \"round_robin\"\nslow_start = \"60s\"";
    let (srv, addr) = start_proxy(&pool_config(&[a.addr, b.addr], extra));
    srv.reload(rampart::Config::parse(&pool_config(&[a.addr, b.addr, c.addr], extra), "t").unwrap())
        .unwrap();
    for _ in 0..300 {
        assert_eq!(get(addr, "/").await.status, 200);
    }
    // Without slow start c would get 100; at the start of its ramp it gets about 10%
    // of its share (about 10).
    assert!(c.hits() < 40, "c got {} of 300", c.hits());
    assert!(c.hits() > 0, "a ramping backend still gets some traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_is_hedged_and_the_faster_backend_wins() {
    let slow = TestOrigin::start("slow", Behavior::Slow(Duration::from_millis(800))).await;
    let fast = TestOrigin::start("fast", Behavior::Healthy).await;
    let extra = "balancer = \"round_robin\"\nretry = { hedge_delay = \"30ms\" }\nhealth_check = { type = \"none\" }";
    let (_srv, addr) = start_proxy(&pool_config(&[slow.addr, fast.addr], extra));
    for _ in 0..4 {
        let t = Instant::now();
        let r = get(addr, "/").await;
        assert_eq!(r.text(), "fast");
        assert!(
            t.elapsed() < Duration::from_millis(700),
            "hedge did not win: {:?}",
            t.elapsed()
        );
    }
    assert!(slow.hits() >= 1, "the slow backend got the first try");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_that_fails_leaves_the_slow_first_try_to_answer() {
    // Every request meets both: the slow backend answers in 300 ms; the other closes
    // each connection unanswered. Sent to the slow one first, a request is hedged to
    // the failing one after 30 ms, which loses at once: the first try is still owed
    // its answer. Sent to the failing one first, it is retried on the slow one.
    let slow = TestOrigin::start("slow", Behavior::Slow(Duration::from_millis(300))).await;
    let gone = TestOrigin::start("gone", Behavior::CloseBeforeResponse).await;
    let extra = "balancer = \"round_robin\"\nretry = { hedge_delay = \"30ms\", budget_percent = 100 }\n\
                 health_check = { type = \"none\" }\noutlier = { consecutive_failures = 1000 }";
    let (_srv, addr) = start_proxy(&pool_config(&[slow.addr, gone.addr], extra));
    for i in 0..4 {
        let r = get(addr, "/").await;
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.text(), "slow", "request {i}");
    }
    assert_eq!(slow.hits(), 4, "each request answered by the slow backend, once");
    assert_eq!(gone.hits(), 4, "each request also tried on the failing one, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_are_never_hedged() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = TestOrigin::start("a", Behavior::Slow(Duration::from_millis(300))).await;
    let b = TestOrigin::start("b", Behavior::Slow(Duration::from_millis(300))).await;
    let extra = "retry = { hedge_delay = \"20ms\" }\nhealth_check = { type = \"none\" }";
    let (_srv, addr) = start_proxy(&pool_config(&[a.addr, b.addr], extra));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(a.hits() + b.hits(), 1, "an upgrade must reach exactly one backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_hedge_races_while_still_answering_does_not_eject() {
    // Answers in 120 ms: every request to it is hedged after 20 ms and loses the race,
    // but it does answer, well within the grace period. That is a slow backend (or a
    // saturated proxy), not a stuck one: it must stay in the pool.
    let late = TestOrigin::start("late", Behavior::Slow(Duration::from_millis(120))).await;
    let fast = TestOrigin::start("fast", Behavior::Healthy).await;
    let extra = "balancer = \"round_robin\"\nretry = { hedge_delay = \"20ms\", budget_percent = 100 }\nhealth_check = { type = \"none\" }";
    let (srv, addr) = start_proxy(&pool_config(&[late.addr, fast.addr], extra));
    for _ in 0..12 {
        assert_eq!(get(addr, "/").await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(late.hits() >= 3, "the late backend got its share of first tries");
    let st = status_of(&srv).await;
    assert_eq!(backend_field(&st, late.addr, "ejected"), false, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedged_tries_still_time_out_when_every_backend_is_frozen() {
    let a = TestOrigin::start("a", Behavior::Freeze).await;
    let b = TestOrigin::start("b", Behavior::Freeze).await;
    // With budget, the hedge goes out and both tries run into their deadlines; with
    // none, the first try alone is held to its deadline (and not retried).
    for (budget, tries) in [
        ("budget_percent = 100", 2),
        ("budget_percent = 0, budget_min_per_sec = 0", 1),
    ] {
        let extra = format!(
            "response_timeout = \"300ms\"\nretry = {{ hedge_delay = \"20ms\", {budget} }}\n\
             health_check = {{ type = \"none\" }}\noutlier = {{ consecutive_failures = 1000 }}"
        );
        let (_srv, addr) = start_proxy(&pool_config(&[a.addr, b.addr], &extra));
        let before = a.hits() + b.hits();
        let t = Instant::now();
        let r = get(addr, "/").await;
        assert_eq!(r.status, 504, "{budget}");
        assert!(t.elapsed() < Duration::from_secs(5), "{budget}: {:?}", t.elapsed());
        assert_eq!(a.hits() + b.hits() - before, tries, "{budget}");
    }
}

/// Sends `request` as it is on a new connection and returns the response's status
/// (the connection stays open, as keep-alive does).
async fn status_of_raw(addr: std::net::SocketAddr, request: &[u8]) -> u16 {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let (head, _) = read_one_response(&mut s, &mut Vec::new(), false).await;
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line")
}

/// `pool_config` with an admin listener.
fn with_admin(backends: &[std::net::SocketAddr], pool_extra: &str, admin_extra: &str) -> String {
    format!(
        "{}\n[admin]\nbind = \"127.0.0.1:0\"\n{admin_extra}\n",
        pool_config(backends, pool_extra)
    )
}

/// A request to the admin listener's backend API.
async fn admin(srv: &rampart::Server, method: &str, path: &str) -> Reply {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(srv.admin_addr().unwrap(), req).await.unwrap()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "waited 10 s for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Which origin answered each of `n` GETs of `path`, by the body's name.
async fn answers(addr: std::net::SocketAddr, path: &str, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for _ in 0..n {
        let r = get(addr, path).await;
        assert_eq!(r.status, 200, "{}", r.text());
        names.push(r.text());
    }
    names
}

/// How many requests for `path` the origin got (health checks have their own).
fn requests_for(o: &TestOrigin, path: &str) -> usize {
    o.seen_headers
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h.get(SEEN_TARGET).is_some_and(|t| t == path))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_finishes_its_requests_and_gets_no_new_ones() {
    let slow = Behavior::Slow(Duration::from_millis(800));
    let a = TestOrigin::start("a", slow.clone()).await;
    let b = TestOrigin::start("b", slow).await;
    let toml = with_admin(&[a.addr, b.addr], "balancer = \"round_robin\"", "");
    let (srv, addr) = start_proxy(&toml);
    // A POST in flight on each backend (round robin alternates).
    let posts: Vec<_> = (0..2).map(|_| tokio::spawn(post(addr, "order"))).collect();
    wait_for("a POST on each backend", || a.hits() == 1 && b.hits() == 1).await;
    a.set(Behavior::Healthy);
    b.set(Behavior::Healthy);

    let r = admin(&srv, "POST", &format!("/backends/app/{}/drain", a.addr)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let changed: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let one = &changed["backends"][0];
    assert_eq!(
        (one["was"].as_str(), one["admin_state"].as_str()),
        (Some("ready"), Some("drain"))
    );
    assert_eq!(one["in_flight"], 1, "{changed}");

    assert!(answers(addr, "/x", 10).await.iter().all(|n| n == "b"));
    assert_eq!(a.hits(), 1, "a drained backend got a new request");
    // What it had in flight finished, answered by it.
    let mut got: Vec<String> = Vec::new();
    for p in posts {
        let r = p.await.unwrap();
        assert_eq!(r.status, 200);
        got.push(r.text());
    }
    got.sort();
    assert_eq!(got, ["a", "b"]);
    let status = status_of(&srv).await;
    assert_eq!(backend_field(&status, a.addr, "admin_state"), "drain");
    assert_eq!(backend_field(&status, a.addr, "available"), false);
    assert_eq!(backend_field(&status, b.addr, "admin_state"), "ready");
    let series = |state: &str| {
        server_metric(
            &srv,
            &format!(
                "rampart_backend_admin_state{{pool=\"app\",backend=\"{}\",state=\"{state}\"}}",
                a.addr
            ),
        )
    };
    assert_eq!(
        (series("ready"), series("drain"), series("maint")),
        ("0".into(), "1".into(), "0".into())
    );

    // A reload keeps it drained.
    srv.reload(rampart::config::Config::parse(&toml, "test.toml").unwrap())
        .unwrap();
    assert!(answers(addr, "/x", 6).await.iter().all(|n| n == "b"));

    let r = admin(&srv, "POST", &format!("/backends/app/{}/ready", a.addr)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("\"was\":\"drain\""), "{}", r.text());
    let names = answers(addr, "/x", 10).await;
    assert!(names.iter().filter(|n| *n == "a").count() >= 3, "{names:?}");
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maint_pauses_health_checks_and_a_backend_leaving_it_is_probed_first() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let toml = with_admin(
        &[a.addr, b.addr],
        "balancer = \"round_robin\"\nhealth_check = { path = \"/health\", interval = \"100ms\", jitter = \"0s\" }",
        "",
    );
    let (srv, addr) = start_proxy(&toml);
    wait_for("two health checks of a", || requests_for(&a, "/health") >= 2).await;

    let r = admin(&srv, "POST", &format!("/backends/app/{}/maint", a.addr)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    tokio::time::sleep(Duration::from_millis(150)).await; // a probe under way ends
    let probes = requests_for(&a, "/health");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        requests_for(&a, "/health"),
        probes,
        "a backend in maint was still probed"
    );
    assert!(answers(addr, "/x", 6).await.iter().all(|n| n == "b"));

    // It comes back broken. Its checks were paused, so its verdict is stale: it is
    // probed at once, fails, and gets no request.
    a.set(Behavior::Status(503));
    let r = admin(&srv, "POST", &format!("/backends/app/{}/ready", a.addr)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    wait_for("a probe of a", || requests_for(&a, "/health") > probes).await;
    assert!(answers(addr, "/x", 20).await.iter().all(|n| n == "b"));
    assert_eq!(
        requests_for(&a, "/x"),
        0,
        "a backend back from maint got traffic before a probe"
    );

    // Every backend out of service: a fast 503, not panic mode's try of each.
    for (pool, o) in [("app", &a), ("*", &b)] {
        let r = admin(&srv, "POST", &format!("/backends/{pool}/{}/drain", o.addr)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let before = requests_for(&b, "/x");
    let r = get(addr, "/x").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(requests_for(&b, "/x"), before);
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_api_says_what_is_wrong_and_obeys_control() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let toml = with_admin(&[a.addr], "", "");
    let (srv, _addr) = start_proxy(&toml);
    let drain = format!("/backends/app/{}/drain", a.addr);
    let r = admin(&srv, "GET", &drain).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "POST");
    let cases = [
        (
            "/backends/web/127.0.0.1:1/drain".to_string(),
            404,
            "no pool \"web\"; pools: app",
        ),
        (
            "/backends/app/127.0.0.1:1/drain".to_string(),
            404,
            "no backend \"127.0.0.1:1\" in pool \"app\"",
        ),
        (
            format!("/backends/app/{}/pause", a.addr),
            400,
            "unknown state \"pause\"",
        ),
        (
            "/backends/app/drain".to_string(),
            400,
            "no backend in /backends/app/drain",
        ),
        ("/backends/app".to_string(), 400, "no state in /backends/app"),
    ];
    for (path, status, says) in cases {
        let r = admin(&srv, "POST", &path).await;
        assert_eq!(r.status, status, "{path}: {}", r.text());
        assert!(r.text().contains(says), "{path}: {}", r.text());
    }
    assert_eq!(backend_field(&status_of(&srv).await, a.addr, "admin_state"), "ready");
    // The address may come percent-encoded.
    let encoded = format!("/backends/app/{}/drain", a.addr.to_string().replace(':', "%3A"));
    assert_eq!(admin(&srv, "POST", &encoded).await.status, 200);
    assert_eq!(backend_field(&status_of(&srv).await, a.addr, "admin_state"), "drain");
    // `control` follows reloads.
    let off = with_admin(&[a.addr], "", "control = \"none\"");
    srv.reload(rampart::config::Config::parse(&off, "test.toml").unwrap())
        .unwrap();
    let r = admin(&srv, "POST", &format!("/backends/app/{}/ready", a.addr)).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("control = \"none\""), "{}", r.text());
    assert_eq!(backend_field(&status_of(&srv).await, a.addr, "admin_state"), "drain");
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_stands_in_while_no_primary_can_answer() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let backup = TestOrigin::start("backup", Behavior::Healthy).await;
    let toml = pool_config(
        &[a.addr, b.addr],
        "health_check = { interval = \"100ms\", jitter = \"0s\" }",
    )
    .replace(
        &format!("\"{}\"]", b.addr),
        &format!("\"{}\", {{ addr = \"{}\", backup = true }}]", b.addr, backup.addr),
    );
    assert!(toml.contains("backup = true"), "{toml}");
    let (srv, addr) = start_proxy(&toml);
    let names = answers(addr, "/x", 10).await;
    assert!(names.iter().all(|n| n != "backup"), "{names:?}");
    assert_eq!(backend_field(&status_of(&srv).await, backup.addr, "backup"), true);

    // One primary gone: the other takes it all, the backup still nothing.
    a.stop();
    assert!(answers(addr, "/x", 10).await.iter().all(|n| n == "b"));
    // Both gone: the backup answers every request, the first ones too (their
    // connect failures are retried there), a POST as well.
    b.stop();
    assert!(answers(addr, "/x", 10).await.iter().all(|n| n == "backup"));
    let r = post(addr, "order").await;
    assert_eq!((r.status.as_u16(), r.text()), (200, "backup".to_string()));
    // And once their checks have marked both down, it takes them straight, with no
    // panic mode sending requests to the primaries first.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = status_of(&srv).await;
        if [a.addr, b.addr]
            .iter()
            .all(|o| backend_field(&st, *o, "healthy") == false)
        {
            break;
        }
        assert!(Instant::now() < deadline, "primaries never marked down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tries = || {
        let text = rampart::admin::metrics_text(srv.shared());
        [a.addr, b.addr]
            .iter()
            .map(|o| {
                let series =
                    format!("rampart_upstream_errors_total{{pool=\"app\",backend=\"{o}\",kind=\"connect_failed\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(series.as_str()))
                    .map_or(0, |n| n.trim().parse::<u64>().unwrap())
            })
            .sum::<u64>()
    };
    let before = tries();
    assert!(answers(addr, "/x", 10).await.iter().all(|n| n == "backup"));
    assert_eq!(tries(), before, "requests went to primaries marked down");

    // A primary back: once its checks pass, the traffic goes back to it.
    let a2 = TestOrigin::start_on("a", a.addr, Behavior::Healthy).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend_field(&status_of(&srv).await, a2.addr, "available") != true {
        assert!(Instant::now() < deadline, "a never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answers(addr, "/x", 10).await.iter().all(|n| n == "a"));
    stop_proxy(srv).await;
}

/// The `Set-Cookie` a sticky pool sent, as `NAME=VALUE` to send back, if any.
fn sticky_set(r: &Reply) -> Option<String> {
    r.headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|v| v.starts_with("srv="))
        .map(|v| {
            assert!(v.ends_with("; Path=/; Max-Age=3600; HttpOnly"), "{v}");
            v.split(';').next().unwrap().to_string()
        })
}

/// The sticky cookie's attributes as configured: `Secure` forced on a plain-HTTP
/// listener (TLS ended in front of rampart), `SameSite`, `Domain`, and `HttpOnly` or not.
#[tokio::test]
async fn a_sticky_cookie_carries_the_attributes_it_is_given() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    for (sticky, want) in [
        (
            "{ cookie = \"srv\", domain = \"example.com\", same_site = \"strict\", secure = true }",
            "; Path=/; Domain=example.com; HttpOnly; SameSite=Strict; Secure",
        ),
        ("{ cookie = \"srv\", http_only = false }", "; Path=/"),
    ] {
        let extra = format!("{NO_HEALTH_CHECKS}\nsticky = {sticky}");
        let (srv, addr) = start_proxy(&pool_config(&[a.addr], &extra));
        let r = get(addr, "/").await;
        let set = r.headers["set-cookie"].to_str().unwrap();
        let (value, attributes) = set.split_at(set.find(';').unwrap());
        assert!(value.starts_with("srv=") && value.len() == 20, "{set}");
        assert_eq!(attributes, want);
        stop_proxy(srv).await;
    }
}

/// A sticky pool: a client's first answer sets a cookie naming its backend, and
/// every request with it goes there, over HTTP/1.1 (as written, and with a body) and
/// HTTP/2, among other cookies. A backend that cannot take it (refused, then in
/// maintenance) loses the client to another, whose answer re-sets the cookie with
/// no failed request; a drained one keeps its sticky clients (HAProxy's drain) and
/// gets no new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_cookie_keeps_a_client_on_its_backend_until_it_cannot_serve() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let c = TestOrigin::start("c", Behavior::Healthy).await;
    let extra =
        format!("balancer = \"round_robin\"\n{NO_HEALTH_CHECKS}\nsticky = {{ cookie = \"srv\", max_age = \"1h\" }}");
    let (srv, addr) = start_proxy(&with_admin(&[a.addr, b.addr, c.addr], &extra, ""));
    let status = status_of(&srv).await;
    assert_eq!(status["pools"][0]["sticky_cookie"], "srv");

    // Three new clients: round robin spreads them, and each is told where it went.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let r = get(addr, "/").await;
        let cookie = sticky_set(&r).expect("a new client gets the cookie");
        let id = cookie.trim_start_matches("srv=").to_string();
        let origin = [&a, &b, &c].into_iter().find(|o| o.name == r.text()).unwrap();
        assert_eq!(backend_field(&status, origin.addr, "sticky_id"), id.as_str());
        clients.push((cookie, r.text()));
    }
    let mut names: Vec<&str> = clients.iter().map(|(_, n)| n.as_str()).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);

    // Each keeps to its own, however it asks, and is not told again.
    for (cookie, name) in &clients {
        let with_others = format!("theme=dark; {cookie}; lang=en");
        for _ in 0..4 {
            let r = get_with(addr, "/", &[("cookie", with_others.as_str())]).await;
            assert_eq!((r.text(), sticky_set(&r)), (name.clone(), None));
        }
        let post = send(
            addr,
            Request::post("/echo")
                .header("host", "t")
                .header("cookie", cookie.as_str())
                .body(Full::new(Bytes::from_static(b"x")))
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(post.status, 200);
        assert_eq!(
            requests_for([&a, &b, &c].into_iter().find(|o| &o.name == name).unwrap(), "/echo"),
            1
        );
        let h2 = send_h2(
            addr,
            Request::get(format!("http://{addr}/"))
                .header("cookie", "theme=dark")
                .header("cookie", cookie.as_str())
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!((h2.text(), sticky_set(&h2)), (name.clone(), None), "over HTTP/2");
    }
    // A cookie that names no backend is a new client.
    let r = get_with(addr, "/", &[("cookie", "srv=00000000000000aa")]).await;
    assert!(sticky_set(&r).is_some());

    // Drained: its sticky client stays, no new client comes.
    let (a_cookie, _) = clients.iter().find(|(_, n)| n == "a").unwrap().clone();
    let r = admin(&srv, "POST", &format!("/backends/app/{}/drain", a.addr)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for _ in 0..3 {
        let r = get_with(addr, "/", &[("cookie", a_cookie.as_str())]).await;
        assert_eq!(
            (r.text(), sticky_set(&r)),
            ("a".to_string(), None),
            "drained keeps its own"
        );
    }
    for _ in 0..6 {
        assert_ne!(get(addr, "/").await.text(), "a", "a drained backend got a new client");
    }
    // Maintenance: the client moves, with no failure, and is told where to.
    admin(&srv, "POST", &format!("/backends/app/{}/maint", a.addr)).await;
    let r = get_with(addr, "/", &[("cookie", a_cookie.as_str())]).await;
    assert_eq!(r.status, 200);
    assert_ne!(r.text(), "a");
    let moved = sticky_set(&r).expect("the new backend's cookie");
    assert_ne!(moved, a_cookie);
    let again = get_with(addr, "/", &[("cookie", moved.as_str())]).await;
    assert_eq!((again.text(), sticky_set(&again)), (r.text(), None));

    // Its backend dies (refused, no health checks): the request is retried
    // elsewhere, never failed, and the cookie follows.
    admin(&srv, "POST", &format!("/backends/app/{}/ready", a.addr)).await;
    let (b_cookie, _) = clients.iter().find(|(_, n)| n == "b").unwrap().clone();
    b.stop();
    let r = get_with(addr, "/", &[("cookie", b_cookie.as_str())]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(r.text(), "b");
    assert!(sticky_set(&r).is_some_and(|c| c != b_cookie));
    stop_proxy(srv).await;
}

/// Per-backend responses by status class, those a retry replaced included, and the
/// balancer's latency estimate, in `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_each_backend_s_responses_by_class() {
    let bad = TestOrigin::start("bad", Behavior::Status(503)).await;
    let good = TestOrigin::start("good", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&pool_config(
        &[bad.addr, good.addr],
        &format!("balancer = \"round_robin\"\n{NO_HEALTH_CHECKS}"),
    ));
    assert!(answers(addr, "/x", 6).await.iter().all(|n| n == "good"));
    good.set(Behavior::Status(404));
    for _ in 0..3 {
        assert_eq!(get(addr, "/missing").await.status, 404);
    }
    let n = |o: &TestOrigin, code: &str| -> u64 {
        server_metric(
            &srv,
            &format!(
                "rampart_backend_responses_total{{pool=\"app\",backend=\"{}\",code=\"{code}\"}}",
                o.addr
            ),
        )
        .parse()
        .unwrap()
    };
    assert_eq!((n(&good, "2xx"), n(&good, "4xx"), n(&good, "5xx")), (6, 3, 0));
    assert_eq!(n(&bad, "2xx"), 0);
    // Every 503 it sent was retried on `good`; outlier detection ejects it after a few.
    let tried = requests_for(&bad, "/x") + requests_for(&bad, "/missing");
    assert!(
        tried >= 1 && n(&bad, "5xx") == tried as u64,
        "{tried} tries, {} 5xx",
        n(&bad, "5xx")
    );
    let latency: f64 = server_metric(
        &srv,
        &format!(
            "rampart_backend_latency_ewma_seconds{{pool=\"app\",backend=\"{}\"}}",
            good.addr
        ),
    )
    .parse()
    .unwrap();
    assert!(latency > 0.0 && latency < 5.0, "{latency}");
    stop_proxy(srv).await;
}

/// A backend's `max_in_flight` (nginx's `max_conns`, HAProxy's `maxconn`): past it
/// the backend is passed over, and a pool whose backends are all full answers 503
/// at once (`circuit_open`) rather than queueing; the backend never sees more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_at_its_max_in_flight_is_passed_over() {
    let slow = || Behavior::Slow(Duration::from_millis(400));
    let a = TestOrigin::start("a", slow()).await;
    let b = TestOrigin::start("b", slow()).await;
    let backends = format!(
        "backends = [{{ addr = \"{}\", max_in_flight = 1 }}, \"{}\"]",
        a.addr, b.addr
    );
    // No hedges: each request is one try, so the origins' hits count requests.
    let extra = format!("balancer = \"round_robin\"\n{NO_HEALTH_CHECKS}\nretry = {{ hedge = false }}");
    let toml = pool_config(&[a.addr], &extra).replace(&format!("backends = [\"{}\"]", a.addr), &backends);
    let (srv, addr) = start_proxy(&toml);
    assert_eq!(backend_field(&status_of(&srv).await, a.addr, "max_in_flight"), 1);
    let all = futures_lite::future::zip(
        futures_lite::future::zip(get(addr, "/1"), get(addr, "/2")),
        futures_lite::future::zip(get(addr, "/3"), get(addr, "/4")),
    )
    .await;
    let replies = [all.0 .0, all.0 .1, all.1 .0, all.1 .1];
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!((a.hits(), b.hits()), (1, 3), "a took one at a time");
    stop_proxy(srv).await;

    // One backend, full: the rest are refused at once, and it sees only its limit.
    let c = TestOrigin::start("c", slow()).await;
    let toml = pool_config(&[c.addr], &extra).replace(
        &format!("backends = [\"{}\"]", c.addr),
        &format!("backends = [{{ addr = \"{}\", max_in_flight = 2 }}]", c.addr),
    );
    let (srv, addr) = start_proxy(&toml);
    let all = futures_lite::future::zip(
        futures_lite::future::zip(get(addr, "/1"), get(addr, "/2")),
        futures_lite::future::zip(get(addr, "/3"), get(addr, "/4")),
    )
    .await;
    let mut statuses: Vec<u16> = [all.0 .0, all.0 .1, all.1 .0, all.1 .1]
        .iter()
        .map(|r| r.status.as_u16())
        .collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 503, 503]);
    assert_eq!(c.hits(), 2);
    assert_eq!(
        server_metric(&srv, "rampart_proxy_errors_total{kind=\"circuit_open\"}"),
        "2"
    );
    stop_proxy(srv).await;
}

/// `[admin] state_file`: each change through the admin API is saved, and a new
/// process reads it, so a drained backend stays drained across a restart (HAProxy's
/// `server-state-file`). A file that does not parse leaves every backend ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_states_survive_a_restart_through_the_state_file() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let dir = TempDir::new("state");
    let file = dir.join("state.json");
    let toml = with_admin(
        &[a.addr, b.addr],
        &format!("balancer = \"round_robin\"\n{NO_HEALTH_CHECKS}"),
        &format!("state_file = \"{}\"", file.display()),
    );
    let (srv, _) = start_proxy(&toml);
    for (backend, state) in [(a.addr, "drain"), (b.addr, "maint"), (b.addr, "ready")] {
        let r = admin(&srv, "POST", &format!("/backends/app/{backend}/{state}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(
        saved,
        serde_json::json!([{ "pool": "app", "addr": a.addr.to_string(), "state": "drain" }])
    );
    stop_proxy(srv).await;

    let (srv, addr) = start_proxy(&toml);
    let status = status_of(&srv).await;
    assert_eq!(
        (
            backend_field(&status, a.addr, "admin_state"),
            backend_field(&status, b.addr, "admin_state")
        ),
        ("drain".into(), "ready".into())
    );
    assert!(answers(addr, "/x", 4).await.iter().all(|n| n == "b"));
    stop_proxy(srv).await;

    std::fs::write(&file, "not json").unwrap();
    let (srv, addr) = start_proxy(&toml);
    assert_eq!(backend_field(&status_of(&srv).await, a.addr, "admin_state"), "ready");
    let mut got = answers(addr, "/x", 4).await;
    got.sort();
    got.dedup();
    assert_eq!(got, ["a", "b"]);
    stop_proxy(srv).await;
}

/// How many of `names` are `name`.
fn count(names: &[String], name: &str) -> usize {
    names.iter().filter(|n| *n == name).count()
}

/// `POST /backends/POOL/BACKEND/weight/W` (HAProxy's `set weight`): the balancer
/// weighs the backend by it at once, a reload that leaves the backend's configured
/// weight alone keeps it, as does a restart through the state file, and a reload
/// that changes the configured weight drops it. Round robin's order is exact, so
/// the counts are too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_s_weight_holds_until_the_config_changes_the_backend_s() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let dir = TempDir::new("weights");
    let file = dir.join("state.json");
    let toml = with_admin(
        &[a.addr, b.addr],
        &format!("balancer = \"round_robin\"\n{NO_HEALTH_CHECKS}"),
        &format!("state_file = \"{}\"", file.display()),
    );
    let (srv, addr) = start_proxy(&toml);
    let set = |w: &str| format!("/backends/app/{}/weight/{w}", b.addr);
    let r = admin(&srv, "POST", &set("3")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
    assert_eq!(
        body["backends"][0],
        serde_json::json!({ "pool": "app", "backend": b.addr.to_string(), "was": 1, "weight": 3, "config_weight": 1 })
    );
    let got = answers(addr, "/x", 8).await;
    assert_eq!((count(&got, "a"), count(&got, "b")), (2, 6), "{got:?}");
    let status = status_of(&srv).await;
    assert_eq!(
        (
            backend_field(&status, b.addr, "weight"),
            backend_field(&status, b.addr, "config_weight")
        ),
        (3.into(), 1.into())
    );
    let metrics = rampart::admin::metrics_text(srv.shared());
    assert!(
        metrics.contains(&format!(
            "rampart_backend_weight{{pool=\"app\",backend=\"{}\"}} 3",
            b.addr
        )),
        "{metrics}"
    );
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(
        saved,
        serde_json::json!([{ "pool": "app", "addr": b.addr.to_string(), "state": "ready", "weight": 3, "config_weight": 1 }])
    );
    // A reload that leaves the weights alone keeps the operator's.
    srv.reload(rampart::config::Config::parse(&toml, "test.toml").unwrap())
        .unwrap();
    let got = answers(addr, "/x", 8).await;
    assert_eq!((count(&got, "a"), count(&got, "b")), (2, 6), "{got:?}");
    stop_proxy(srv).await;

    // So does a restart, through the state file.
    let (srv, addr) = start_proxy(&toml);
    assert_eq!(backend_field(&status_of(&srv).await, b.addr, "weight"), 3);
    let got = answers(addr, "/x", 8).await;
    assert_eq!((count(&got, "a"), count(&got, "b")), (2, 6), "{got:?}");

    // A reload that gives b a weight of its own drops the operator's.
    let weighted = toml.replace(
        &format!("\"{}\"]", b.addr),
        &format!("{{ addr = \"{}\", weight = 2 }}]", b.addr),
    );
    assert_ne!(weighted, toml);
    srv.reload(rampart::config::Config::parse(&weighted, "test.toml").unwrap())
        .unwrap();
    assert_eq!(backend_field(&status_of(&srv).await, b.addr, "weight"), 2);
    let got = answers(addr, "/x", 6).await;
    assert_eq!((count(&got, "a"), count(&got, "b")), (2, 4), "{got:?}");
    // Dropped for good: the config going back to the weight it was set against
    // does not bring it back.
    for (config, weight) in [(&toml, 1), (&weighted, 2)] {
        srv.reload(rampart::config::Config::parse(config, "test.toml").unwrap())
            .unwrap();
        assert_eq!(backend_field(&status_of(&srv).await, b.addr, "weight"), weight);
    }

    // A share of the configured weight, and back to it.
    let r = admin(&srv, "POST", &set("50%")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = answers(addr, "/x", 4).await;
    assert_eq!((count(&got, "a"), count(&got, "b")), (2, 2), "{got:?}");
    let r = admin(&srv, "POST", &set("config")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(backend_field(&status_of(&srv).await, b.addr, "weight"), 2);
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(saved, serde_json::json!([]));

    for (w, says) in [
        ("0", "set its state to drain"),
        ("1001", "must be 1 to 1000"),
        ("0%", "set its state to drain"),
        ("heavy", "must be 1 to 1000"),
    ] {
        let r = admin(&srv, "POST", &set(w)).await;
        assert_eq!(r.status, 400, "{w}: {}", r.text());
        assert!(r.text().contains(says), "{w}: {}", r.text());
    }
    assert_eq!(backend_field(&status_of(&srv).await, b.addr, "weight"), 2);
    stop_proxy(srv).await;
}

/// A route's `retry` changes its pool's for the route's requests only: `attempts = 1`
/// passes a failing backend's 503 to the client where the pool would retry it, and
/// `hedge = false` waits for a slow backend where the pool would hedge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_can_retry_and_hedge_less_than_its_pool() {
    let bad = TestOrigin::start("bad", Behavior::Status(503)).await;
    let good = TestOrigin::start("good", Behavior::Healthy).await;
    let routes = "[[routes]]\npool = \"app\"\n\n[[routes]]\npath_prefix = \"/report/\"\npool = \"app\"\nretry = { attempts = 1 }\n";
    let pool = format!("balancer = \"round_robin\"\n{NO_HEALTH_CHECKS}\noutlier = {{ consecutive_failures = 1000 }}");
    let toml = pool_config(&[bad.addr, good.addr], &pool).replacen("[[routes]]\npool = \"app\"\n", routes, 1);
    let (srv, addr) = start_proxy(&toml);
    let mut failed = 0;
    for _ in 0..6 {
        let r = get(addr, "/report/x").await;
        assert!(matches!(r.status.as_u16(), 200 | 503), "{}", r.status);
        failed += usize::from(r.status == 503);
    }
    // Every try that reached the failing backend reached the client.
    assert!(failed >= 1, "round robin sent none to the failing backend");
    assert_eq!(bad.hits(), failed);
    for _ in 0..6 {
        assert_eq!(get(addr, "/x").await.status, 200);
    }
    assert!(
        bad.hits() > failed,
        "the pool's own route tried the failing backend too"
    );
    stop_proxy(srv).await;

    let slow = TestOrigin::start("slow", Behavior::Slow(Duration::from_millis(600))).await;
    let fast = TestOrigin::start("fast", Behavior::Healthy).await;
    let routes = "[[routes]]\npool = \"app\"\n\n[[routes]]\npath_prefix = \"/one/\"\npool = \"app\"\nretry = { hedge = false }\n";
    let pool = format!(
        "balancer = \"round_robin\"\n{NO_HEALTH_CHECKS}\nretry = {{ hedge_delay = \"50ms\", budget_percent = 100 }}"
    );
    let toml = pool_config(&[slow.addr, fast.addr], &pool).replacen("[[routes]]\npool = \"app\"\n", routes, 1);
    let (srv, addr) = start_proxy(&toml);
    let mut bodies = Vec::new();
    for _ in 0..4 {
        bodies.push(get(addr, "/one/x").await.text());
    }
    // Not hedged: one try each, and the slow backend's answers came from it.
    assert_eq!(slow.hits() + fast.hits(), 4);
    assert_eq!(bodies.iter().filter(|b| *b == "slow").count(), slow.hits());
    let before = slow.hits() + fast.hits();
    for _ in 0..4 {
        assert_eq!(get(addr, "/x").await.text(), "fast", "hedged past the slow backend");
    }
    assert!(slow.hits() + fast.hits() > before + 4, "the pool's own route hedged");
    stop_proxy(srv).await;
}

#[test]
fn a_route_retry_that_could_not_apply_is_refused() {
    let route = |extra: &str| {
        pool_config(&["127.0.0.1:9".parse().unwrap()], "").replacen(
            "pool = \"app\"\n",
            &format!("pool = \"app\"\n{extra}\n"),
            1,
        )
    };
    assert_config_errors(
        &route("retry = { attempts = 0 }"),
        &["t.toml: routes[0].retry.attempts: must be between 1 and 10 (1 disables retries)"],
    );
    assert_config_errors(
        &route("retry = { on_status = [] }"),
        &["routes[0].retry.on_status: unknown field `on_status`, expected `attempts` or `hedge`"],
    );
    let direct = pool_config(&["127.0.0.1:9".parse().unwrap()], "").replacen(
        "pool = \"app\"\n",
        "return = { status = 204 }\nretry = { attempts = 1 }\n",
        1,
    );
    assert_config_errors(
        &direct,
        &["routes[0].retry: a route with return sends nothing to a backend: there is nothing to retry"],
    );
}
