//! TLS to backends (`[pools.NAME.tls]`): real HTTPS origins with certificates made
//! fresh for each test, verified or not, with and without client certificates.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::{Leaf, Pki};
use common::*;
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

/// An HTTPS origin serving `leaf`; with `clients`, it requires a client certificate
/// that CA signed.
async fn https_origin(name: &str, leaf: &Leaf, clients: Option<&Pki>) -> TestOrigin {
    let acceptor = TlsAcceptor::from(Arc::new(leaf.server_config(clients)));
    TestOrigin::start_tls(name, Behavior::Healthy, acceptor).await
}

/// `pool_config` for `backends` over TLS with these `tls` fields, no health checks.
fn tls_pool(backends: &[SocketAddr], tls: &str) -> String {
    pool_config(backends, &format!("{NO_HEALTH_CHECKS}\ntls = {{ {tls} }}"))
}

fn trusting(pki: &Pki) -> String {
    format!("ca = {:?}", pki.ca_file())
}

async fn status_of(srv: &rampart::Server) -> serde_json::Value {
    rampart::admin::status_json(srv.shared())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_an_https_backend_verified_by_its_ip_and_reuse_the_connection() {
    let pki = Pki::new();
    let origin = https_origin("o", &pki.leaf("o", &["127.0.0.1"]), None).await;
    let extra = format!(
        "{NO_HEALTH_CHECKS}\nresponse_timeout = \"5s\"\ntls = {{ {} }}",
        trusting(&pki)
    );
    let toml = pool_config(&[origin.addr], &extra);
    let (srv, addr) = start_proxy(&toml);
    let post = |path: &str, n| Request::post(path).header("host", "t").body(big_body(n)).unwrap();
    // First, on the new connection, an upload larger than the socket buffers to a
    // backend that reads nothing for a while: the write waits, and the session
    // tickets a TLS 1.3 server sends after the handshake arrive meanwhile. They
    // must not be taken for an early answer.
    origin.set(Behavior::Slow(Duration::from_millis(300)));
    let n = 24 * 1024 * 1024;
    let r = send(addr, post("/count", n)).await.unwrap();
    assert_eq!(r.text(), n.to_string());
    origin.set(Behavior::Healthy);
    for _ in 0..5 {
        let r = get(addr, "/").await;
        assert_eq!((r.status.as_u16(), r.text()), (200, "o".to_string()));
    }
    // A streamed upload echoed back, both ways larger than a TLS record.
    let n = 2 * 1024 * 1024;
    let r = send(addr, post("/echo", n)).await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.len()), (200, n));
    // The GETs reused the first upload's connection; a streamed upload never takes a
    // pooled one (the keep-alive race could spend it), so the second made its own.
    assert_eq!(origin.connections(), 2, "TLS connections kept alive and reused");
    let tls = status_of(&srv).await["pools"][0]["tls"].as_str().unwrap().to_string();
    assert!(
        tls.contains("verified against") && tls.contains("(1 CA certificates)"),
        "{tls}"
    );
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_or_misnamed_backend_certificate_gets_no_request() {
    let pki = Pki::new();
    let stranger = Pki::new();
    let good = https_origin("good", &pki.leaf("good", &["127.0.0.1"]), None).await;
    let untrusted = https_origin("untrusted", &stranger.leaf("u", &["127.0.0.1"]), None).await;
    let misnamed = https_origin("misnamed", &pki.leaf("m", &["other.test"]), None).await;
    // A request that fails over lands on the good backend: the handshake failed
    // before a byte of the request went out, so even a POST is safe to resend.
    let (srv, addr) = start_proxy(&tls_pool(&[good.addr, untrusted.addr, misnamed.addr], &trusting(&pki)));
    for _ in 0..12 {
        let r = post_bytes(addr, "/submit", "x=1").await.unwrap();
        assert_eq!((r.status.as_u16(), r.text()), (200, "good".to_string()));
    }
    assert_eq!(untrusted.hits() + misnamed.hits(), 0);
    assert!(
        untrusted.tls_failures() + misnamed.tls_failures() > 0,
        "both were tried"
    );
    stop_proxy(srv).await;

    // Alone in its pool, each is a 502, counted as a backend TLS failure.
    for o in [&untrusted, &misnamed] {
        let (srv, addr) = start_proxy(&tls_pool(&[o.addr], &trusting(&pki)));
        let r = get(addr, "/").await;
        assert_eq!(r.status, 502, "{}", o.name);
        assert_ne!(metric("rampart_proxy_errors_total{kind=\"backend_tls\"}"), "0");
        stop_proxy(srv).await;
    }
    // The certificate's own name, as `server_name`, verifies it.
    let toml = tls_pool(
        &[misnamed.addr],
        &format!("{}, server_name = \"other.test\"", trusting(&pki)),
    );
    let (srv, addr) = start_proxy(&toml);
    assert_eq!(get(addr, "/").await.text(), "misnamed");
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_health_check_over_tls_names_the_certificates_host() {
    let pki = Pki::new();
    let origin = https_origin("o", &pki.leaf("o", &["app.test"]), None).await;
    let check = "health_check = { path = \"/healthz\", interval = \"1s\", timeout = \"1s\", rise = 1, fall = 1 }";
    let toml = pool_config(
        &[origin.addr],
        &format!("{check}\ntls = {{ {}, server_name = \"app.test\" }}", trusting(&pki)),
    );
    let (srv, _addr) = start_proxy(&toml);
    let deadline = Instant::now() + Duration::from_secs(5);
    let want = format!("app.test:{}", origin.addr.port());
    loop {
        let seen = origin.seen_headers.lock().unwrap().first().cloned();
        if let Some(seen) = seen {
            assert_eq!(seen["host"], want.as_str(), "{seen:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no health check arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stalls_the_handshake_is_a_connect_timeout_retried_elsewhere() {
    let pki = Pki::new();
    let good = https_origin("good", &pki.leaf("good", &["127.0.0.1"]), None).await;
    // Accepts connections, and never says a word.
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_addr = mute.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = mute.accept().await {
            open.push(s);
        }
    });
    let extra = format!(
        "{NO_HEALTH_CHECKS}\nbalancer = \"round_robin\"\nconnect_timeout = \"200ms\"\ntls = {{ {} }}",
        trusting(&pki)
    );
    let (srv, addr) = start_proxy(&pool_config(&[mute_addr, good.addr], &extra));
    let posts = async {
        for _ in 0..4 {
            let r = post_bytes(addr, "/submit", "x=1").await.unwrap();
            assert_eq!((r.status.as_u16(), r.text()), (200, "good".to_string()));
        }
    };
    // Generous: each stall costs `connect_timeout`; without it a POST waits forever.
    tokio::time::timeout(Duration::from_secs(20), posts)
        .await
        .expect("a stalled handshake held the request");
    let series =
        format!("rampart_upstream_errors_total{{pool=\"app\",backend=\"{mute_addr}\",kind=\"connect_timeout\"}}");
    assert_ne!(
        server_metric(&srv, &series),
        "0",
        "the stalled handshake was tried, and timed out"
    );
    held.abort();
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_false_accepts_any_certificate() {
    let stranger = Pki::new();
    let origin = https_origin("o", &stranger.leaf("o", &["self.test"]), None).await;
    let (srv, addr) = start_proxy(&tls_pool(&[origin.addr], "verify = false"));
    assert_eq!(get(addr, "/").await.text(), "o");
    let tls = status_of(&srv).await["pools"][0]["tls"].as_str().unwrap().to_string();
    assert!(tls.contains("NOT verified"), "{tls}");
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_requires_a_client_certificate_gets_the_configured_one() {
    let pki = Pki::new();
    let clients = Pki::new();
    let origin = https_origin("o", &pki.leaf("o", &["127.0.0.1"]), Some(&clients)).await;
    let (srv, addr) = start_proxy(&tls_pool(&[origin.addr], &trusting(&pki)));
    assert_eq!(get(addr, "/").await.status, 502, "no client certificate configured");
    assert!(origin.tls_failures() > 0);
    stop_proxy(srv).await;

    let me = clients.leaf("rampart", &["rampart.test"]);
    let tls = format!("{}, cert = {:?}, key = {:?}", trusting(&pki), me.cert, me.key);
    let (srv, addr) = start_proxy(&tls_pool(&[origin.addr], &tls));
    assert_eq!(get(addr, "/").await.text(), "o");
    let certs = status_of(&srv).await["tls_certificates"].clone();
    assert_eq!(certs[0]["pool"], "app", "{certs}");
    assert_eq!(certs[0]["certificate"], me.cert.display().to_string());
    let series = format!(
        "rampart_tls_certificate_expiry_timestamp_seconds{{pool=\"app\",certificate=\"{}\"}}",
        me.cert.display()
    );
    assert!(
        rampart::admin::metrics_text(srv.shared()).contains(&series),
        "the client certificate's expiry is exported"
    );
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_speak_tls_and_fail_a_backend_whose_certificate_is_refused() {
    let pki = Pki::new();
    let stranger = Pki::new();
    let good = https_origin("good", &pki.leaf("good", &["127.0.0.1"]), None).await;
    let bad = https_origin("bad", &stranger.leaf("bad", &["127.0.0.1"]), None).await;
    let toml = pool_config(
        &[good.addr, bad.addr],
        &format!(
            "health_check = {{ path = \"/healthz\", interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 3 }}\ntls = {{ {} }}",
            trusting(&pki)
        ),
    );
    let (srv, _addr) = start_proxy(&toml);
    let healthy = |status: &serde_json::Value, i: usize| status["pools"][0]["backends"][i]["healthy"].clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = status_of(&srv).await;
        if healthy(&status, 1) == false && good.hits() >= 2 {
            assert_eq!(healthy(&status, 0), true, "the good backend passes over HTTPS");
            break;
        }
        assert!(Instant::now() < deadline, "bad never marked down: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(bad.hits(), 0);
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_reaches_an_https_backend() {
    let pki = Pki::new();
    let origin = https_origin("o", &pki.leaf("o", &["127.0.0.1"]), None).await;
    let (srv, addr) = start_proxy(&tls_pool(&[origin.addr], &trusting(&pki)));
    let mut s = TcpStream::connect(addr).await.unwrap();
    upgrade_to_websocket(&mut s).await;
    s.write_all(b"ping over tls").await.unwrap();
    let mut buf = [0u8; 13];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("echo")
        .unwrap();
    assert_eq!(&buf, b"ping over tls");
    drop(s);
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_closed_its_pooled_tls_connection_costs_no_request() {
    let pki = Pki::new();
    let leaf = pki.leaf("o", &["127.0.0.1"]);
    let first = https_origin("first", &leaf, None).await;
    let at = first.addr;
    let (srv, addr) = start_proxy(&tls_pool(
        &[at],
        &format!("{}, server_name = \"127.0.0.1\"", trusting(&pki)),
    ));
    assert_eq!(get(addr, "/").await.text(), "first");
    // The backend restarts: its pooled connection is closed under rampart.
    first.stop();
    drop(first);
    let acceptor = TlsAcceptor::from(Arc::new(leaf.server_config(None)));
    let _second = TestOrigin::start_on_tls("second", at, Behavior::Healthy, acceptor).await;
    for _ in 0..3 {
        let r = post_bytes(addr, "/submit", "x=1").await.unwrap();
        assert_eq!((r.status.as_u16(), r.text()), (200, "second".to_string()));
    }
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_turns_tls_on_never_reuses_a_plain_connection() {
    let plain = TestOrigin::start("plain", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&pool_config(&[plain.addr], NO_HEALTH_CHECKS));
    assert_eq!(get(addr, "/").await.text(), "plain");
    // Now the pool says its backend speaks TLS. It does not, so every request must
    // fail the handshake, not slip through on the pooled plain connection.
    let toml = tls_pool(&[plain.addr], "verify = false");
    srv.reload(rampart::Config::parse(&toml, "t").unwrap()).unwrap();
    for _ in 0..3 {
        assert_eq!(get(addr, "/").await.status, 502);
    }
    assert_eq!(plain.hits(), 1);
    // And back: a fresh plain connection.
    srv.reload(rampart::Config::parse(&pool_config(&[plain.addr], NO_HEALTH_CHECKS), "t").unwrap())
        .unwrap();
    assert_eq!(get(addr, "/").await.text(), "plain");
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_to_a_backend_that_reads_slowly_arrives_whole_over_tls() {
    let pki = Pki::new();
    let acceptor = TlsAcceptor::from(Arc::new(pki.leaf("o", &["127.0.0.1"]).server_config(None)));
    // A small receive buffer and slow reads keep the socket full, so rustls is left
    // holding the last records of the upload unless they are flushed.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    sock.listen(16).unwrap();
    sock.set_nonblocking(true).unwrap();
    let l = tokio::net::TcpListener::from_std(sock.into()).unwrap();
    let at = l.local_addr().unwrap();
    // More than the kernel's send buffer on loopback (up to 4 MiB) and the receive
    // buffer together, so rampart's writes do wait.
    let n: usize = 12 * 1024 * 1024;
    let backend = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let mut s = acceptor.accept(tcp).await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        let head_end = loop {
            let k = s.read(&mut buf).await.unwrap();
            assert!(k > 0, "closed before the head");
            got.extend_from_slice(&buf[..k]);
            if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let mut body = got.len() - head_end;
        while body < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let k = s.read(&mut buf).await.unwrap();
            assert!(k > 0, "closed after {body} body bytes");
            body += k;
        }
        s.write_all(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.to_string().len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        s.flush().await.unwrap();
        body
    });
    let extra = format!(
        "{NO_HEALTH_CHECKS}\nresponse_timeout = \"10s\"\ntls = {{ {} }}",
        trusting(&pki)
    );
    let (srv, addr) = start_proxy(&pool_config(&[at], &extra));
    // With its length, so the backend counts the body's own bytes (no chunk framing).
    let req = Request::post("/upload")
        .header("host", "t")
        .header("content-length", n)
        .body(big_body(n))
        .unwrap();
    let r = send(addr, req).await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, n.to_string()));
    assert_eq!(backend.await.unwrap(), n);
    stop_proxy(srv).await;
}

#[test]
fn bad_backend_tls_settings_are_all_reported_with_their_field() {
    let pki = Pki::new();
    let leaf = pki.leaf("c", &["c.test"]);
    let toml = format!(
        r#"
[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
pool = "a"

[pools.a]
backends = ["127.0.0.1:9"]
tls = {{ ca = "/nonexistent/ca.pem", cert = {cert:?}, min_version = "1.1" }}

[pools.b]
backends = ["127.0.0.1:9"]
tls = {{ verify = false, ca = {ca:?}, key = {key:?}, server_name = "not a name" }}

[pools.c]
backends = ["127.0.0.1:9"]
tls = {{ ca = {key:?}, cert = {cert:?}, key = {other_key:?}, colour = "blue" }}
"#,
        cert = leaf.cert,
        key = leaf.key,
        ca = pki.ca_file(),
        other_key = pki.leaf("other", &["other.test"]).key,
    );
    assert_config_errors(
        &toml,
        &[
            "pools.a.tls.min_version: must be \"1.2\" or \"1.3\"",
            "pools.a.tls.key: a client certificate (cert) needs its key",
            "pools.a.tls.ca: /nonexistent/ca.pem: cannot read",
            "pools.b.tls.ca: has no effect with verify = false",
            "pools.b.tls.cert: a client key (key) needs its certificate",
            "pools.b.tls.server_name: \"not a name\" is not a DNS name",
            "pools.c.tls.colour: unknown field `colour`",
        ],
    );
    // With the unknown field gone, the files are read: a CA file with no
    // certificate in it, and a key that is not the certificate's.
    let toml = toml.replace(", colour = \"blue\"", "");
    assert_config_errors(
        &toml,
        &[
            "pools.c.tls.ca: ",
            "c.key: no PEM certificate in the file",
            "pools.c.tls.cert: ",
            "other.key does not belong to the certificate in",
        ],
    );
}

/// `health_check.port` and `tls = false`: backends that serve traffic over HTTPS and
/// answer checks in clear on another port (an app's management port) are judged by
/// that port. The two backends are on two loopback addresses, so that one port
/// number is each one's check port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_go_to_the_check_port_in_clear_when_told() {
    let pki = Pki::new();
    let (ip2, ip3) = ("127.0.0.2", "127.0.0.3");
    let any = |ip: &str| -> SocketAddr { format!("{ip}:0").parse().unwrap() };
    // A free port there (`start_on` takes the address as given).
    let free = |ip: &str| std::net::TcpListener::bind(any(ip)).unwrap().local_addr().unwrap();
    let serve = |ip: &'static str| {
        let leaf = pki.leaf(ip, &[ip]);
        let acceptor = TlsAcceptor::from(Arc::new(leaf.server_config(None)));
        TestOrigin::start_on_tls(ip, free(ip), Behavior::Healthy, acceptor)
    };
    let (traffic2, traffic3) = (serve(ip2).await, serve(ip3).await);
    // One port free on both addresses.
    let (down, up, port) = loop {
        let port = std::net::TcpListener::bind(any(ip2))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if std::net::TcpListener::bind((ip3, port)).is_ok() {
            let at = |ip: &str| format!("{ip}:{port}").parse().unwrap();
            let down = TestOrigin::start_on("check2", at(ip2), Behavior::Status(503)).await;
            let up = TestOrigin::start_on("check3", at(ip3), Behavior::Healthy).await;
            break (down, up, port);
        }
    };
    let toml = pool_config(
        &[traffic2.addr, traffic3.addr],
        &format!(
            "health_check = {{ path = \"/healthz\", port = {port}, tls = false, interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 3 }}\ntls = {{ {} }}",
            trusting(&pki)
        ),
    );
    let (srv, addr) = start_proxy(&toml);
    let healthy = |status: &serde_json::Value, i: usize| status["pools"][0]["backends"][i]["healthy"].clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = status_of(&srv).await;
        if healthy(&status, 0) == false && up.hits() >= 3 {
            assert_eq!(healthy(&status, 1), true, "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "never judged by the check port: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(down.hits() >= 3);
    // The traffic ports saw no check, and requests go to the backend that passes.
    assert_eq!((traffic2.hits(), traffic3.hits()), (0, 0));
    for _ in 0..4 {
        assert_eq!(get(addr, "/").await.text(), ip3);
    }
    stop_proxy(srv).await;
}

#[test]
fn check_port_and_tls_settings_that_could_not_apply_are_refused() {
    let at = ["127.0.0.1:9".parse().unwrap()];
    assert_config_errors(
        &pool_config(&at, "health_check = { port = 0, tls = true }"),
        &[
            "t.toml: pools.app.health_check.port: must be between 1 and 65535",
            "pools.app.health_check.tls: the pool has no tls table: its checks are in clear already",
        ],
    );
    assert_config_errors(
        &pool_config(&at, "health_check = { type = \"none\", port = 8081 }"),
        &["pools.app.health_check.port: has no effect with type = \"none\": no check is sent"],
    );
}
