//! TLS termination: real handshakes with certificates made fresh for each test
//! (rcgen), through rampart to plain-HTTP origins.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pki::{provider, Leaf, Pki};
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// `pool_config`'s config with its listener terminating TLS with `certs`.
fn tls_config(backends: &[SocketAddr], certs: &[&Leaf], tls_extra: &str) -> String {
    let list: Vec<String> = certs
        .iter()
        .map(|c| format!("{{ cert = {:?}, key = {:?} }}", c.cert, c.key))
        .collect();
    pool_config(backends, NO_HEALTH_CHECKS).replacen(
        "bind = \"127.0.0.1:0\"\n",
        &format!(
            "bind = \"127.0.0.1:0\"\ntls = {{ certificates = [{}]{tls_extra} }}\n",
            list.join(", ")
        ),
        1,
    )
}

/// rampart terminating TLS for `site.test` in front of one healthy origin, with
/// extra `[server]` lines and extra `tls` fields: the CA, the origin, the server (stops
/// when dropped) and its address.
async fn site(server_lines: &str, tls_extra: &str) -> (Pki, TestOrigin, rampart::Server, SocketAddr) {
    let pki = Pki::new();
    let leaf = pki.leaf("site", &["site.test"]);
    let origin = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = with_server_setting(&tls_config(&[origin.addr], &[&leaf], tls_extra), server_lines);
    let (srv, addr) = start_proxy(&toml);
    (pki, origin, srv, addr)
}

/// Accepts any certificate: for tests that look at which one was served.
#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verify_tls12_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// How a test client checks the server.
enum Trust<'a> {
    /// The test CA, and the name must match.
    Ca(&'a Pki),
    Any,
}

/// A TLS connection to rampart offering `alpn`, with `sni` as the server name (an IP
/// address sends no SNI).
async fn connect(
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
    trust: Trust<'_>,
) -> Result<TlsStream<TcpStream>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let mut config = match trust {
        Trust::Ca(pki) => builder.with_root_certificates(pki.roots()).with_no_client_auth(),
        Trust::Any => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert))
            .with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}

/// The certificate rampart served on `s`.
fn served(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

/// One GET over HTTP/1.1 on an open connection: the response head (lower-cased) and
/// body.
async fn get_on<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, host: &str) -> (String, String) {
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, body) = read_one_response(s, &mut Vec::new(), false).await;
    (head, String::from_utf8(body).unwrap())
}

/// A verified connection to `site.test` that has had one 200.
async fn served_once(addr: SocketAddr, pki: &Pki) -> TlsStream<TcpStream> {
    let mut s = connect(addr, "site.test", &[], Trust::Ca(pki)).await.unwrap();
    let (head, _) = get_on(&mut s, "t").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_requests_reach_the_backend_marked_https_over_http1_and_http2() {
    let (pki, o, _srv, addr) = site("", "").await;

    // HTTP/1.1, verified against the CA: the chain and the name are right.
    let mut s = connect(addr, "site.test", &[b"http/1.1"], Trust::Ca(&pki))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    // The post-quantum hybrid, which this client, as browsers now do, offers first.
    assert_eq!(
        s.get_ref().1.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    for _ in 0..2 {
        let (head, body) = get_on(&mut s, "site.test").await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, "o");
    }
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["x-forwarded-proto"], "https");

    // HTTP/2, chosen by ALPN.
    let s = connect(addr, "site.test", &[b"h2", b"http/1.1"], Trust::Ca(&pki))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    for _ in 0..2 {
        let req = Request::get("https://site.test/")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!((resp.status().as_u16(), resp.version()), (200, http::Version::HTTP_2));
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "o");
    }
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(o.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_chooses_the_certificate_that_names_the_host_and_the_first_is_the_default() {
    let pki = Pki::new();
    let first = pki.leaf("first", &["first.test"]);
    let second = pki.leaf("second", &["a.test", "*.b.test"]);
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (_srv, addr) = start_proxy(&tls_config(&[o.addr], &[&first, &second], ""));
    let cases = [
        ("first.test", &first),
        ("a.test", &second),
        ("x.b.test", &second),
        ("b.test", &first),
        ("other.test", &first),
        // An IP address as the server name: the client sends no SNI.
        ("127.0.0.1", &first),
    ];
    for (sni, want) in cases {
        let mut s = connect(addr, sni, &[], Trust::Any).await.unwrap();
        assert!(served(&s) == want.der, "{sni}: served the wrong certificate");
        let (head, _) = get_on(&mut s, "t").await;
        assert!(head.starts_with("http/1.1 200"), "{sni}: {head}");
    }
    // With verification on, each name's certificate passes.
    for sni in ["first.test", "a.test", "x.b.test"] {
        connect(addr, sni, &[], Trust::Ca(&pki))
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_renewed_certificates_to_new_connections_and_keeps_open_ones() {
    let pki = Pki::new();
    let old = pki.leaf("site", &["site.test"]);
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = tls_config(&[o.addr], &[&old], "");
    let (srv, addr) = start_proxy(&toml);
    let mut before = connect(addr, "site.test", &[], Trust::Ca(&pki)).await.unwrap();
    assert!(served(&before) == old.der);

    // Renewal writes new files under the same names; a reload reads them.
    let renewed = pki.leaf("site", &["site.test"]);
    assert!(renewed.der != old.der);
    srv.reload(rampart::Config::parse(&toml, "t").unwrap()).unwrap();
    let mut after = connect(addr, "site.test", &[], Trust::Ca(&pki)).await.unwrap();
    assert!(
        served(&after) == renewed.der,
        "a new connection gets the renewed certificate"
    );
    for s in [&mut before, &mut after] {
        let (head, _) = get_on(s, "t").await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
    }

    // A renewal gone wrong (the key of another certificate) is refused, naming the
    // files, and the running certificates stay.
    let other = pki.leaf("other", &["other.test"]);
    std::fs::copy(&other.key, &renewed.key).unwrap();
    let err = rampart::Config::parse(&toml, "t").unwrap_err().to_string();
    assert!(
        err.contains("listeners[0].tls.certificates[0]") && err.contains("site.key does not belong to the certificate"),
        "{err}"
    );
    let s = connect(addr, "site.test", &[], Trust::Ca(&pki)).await.unwrap();
    assert!(served(&s) == renewed.der);
}

#[test]
fn bad_tls_settings_are_all_reported_with_their_field_and_file() {
    let pki = Pki::new();
    let good = pki.leaf("good", &["good.test"]);
    let nameless = pki.leaf("nameless", &[]);
    let missing = Path::new("/nonexistent/rampart.crt");
    let toml = format!(
        r#"
[[listeners]]
bind = "127.0.0.1:0"
tls = {{ certificates = [
    {{ cert = {good_cert:?}, key = {good_key:?} }},
    {{ cert = {missing:?}, key = {good_key:?} }},
    {{ cert = {good_cert:?}, key = {nameless_key:?} }},
    {{ cert = {nameless_cert:?}, key = {nameless_key:?} }},
    {{ cert = {good_key:?}, key = {good_key:?} }},
], min_version = "1.1" }}

[[listeners]]
bind = "127.0.0.1:0"
tls = {{ certificates = [] }}

[[listeners]]
bind = "127.0.0.1:0"
tls = {{ certificates = [{{ cert = {good_cert:?} }}] }}

[[listeners]]
bind = "127.0.0.1:0"
tls = {{ certificates = [{{ cert = {nameless_cert:?}, key = {nameless_key:?} }}], strict_sni = true }}

[[routes]]
pool = "app"

[pools.app]
backends = ["127.0.0.1:9"]
"#,
        good_cert = good.cert,
        good_key = good.key,
        nameless_cert = nameless.cert,
        nameless_key = nameless.key,
    );
    let err = rampart::Config::parse(&toml, "bad.toml").unwrap_err().to_string();
    for want in [
        "bad.toml",
        "listeners[0].tls.min_version: must be \"1.2\" or \"1.3\"",
        "listeners[0].tls.certificates[1]: /nonexistent/rampart.crt: cannot read",
        "listeners[0].tls.certificates[2]: ",
        "nameless.key does not belong to the certificate in",
        "listeners[0].tls.certificates[3]: ",
        "nameless.crt names no DNS host",
        "listeners[0].tls.certificates[4]: ",
        "good.key: no PEM certificate in the file",
        "listeners[1].tls.certificates: at least one certificate is required",
        "listeners[2].tls.certificates[0]: missing field `key`",
        "nameless.crt names no DNS host (subjectAltName), so SNI can never choose it; with strict_sni",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_closes_after_client_header_timeout() {
    let (_pki, o, _srv, addr) = site("client_header_timeout = \"300ms\"", "").await;
    // The start of a ClientHello record, then nothing.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x80, 0x01]).await.unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(5)).await,
        "a stalled handshake must not hold the connection"
    );
    assert!(
        metric("rampart_tls_handshake_failures_total{reason=\"timeout\"}")
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(o.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_keepalive_outlives_client_header_timeout_but_a_slow_head_does_not() {
    let (pki, o, _srv, addr) = site("client_header_timeout = \"300ms\"\nkeepalive_timeout = \"20s\"", "").await;

    // Idle between requests for longer than the header timeout: still open.
    let mut s = served_once(addr, &pki).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (head, _) = get_on(&mut s, "t").await;
    assert!(head.starts_with("http/1.1 200"), "idle keep-alive closed early: {head}");

    // A head that stops halfway is closed after the header timeout, long before the
    // keep-alive timeout.
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").await.unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(10)).await);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed by keepalive_timeout, not client_header_timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(o.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_connection_closes_after_keepalive_requests() {
    let (pki, o, _srv, addr) = site("keepalive_requests = 3", "").await;
    let mut s = served_once(addr, &pki).await;
    let (head, _) = get_on(&mut s, "t").await;
    assert!(
        head.starts_with("http/1.1 200") && !head.contains("connection: close"),
        "{head}"
    );
    // Idle past PARK_AFTER: the count survives the connection parking.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (head, _) = get_on(&mut s, "t").await;
    assert!(
        head.starts_with("http/1.1 200") && head.contains("connection: close"),
        "{head}"
    );
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    assert_eq!(o.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_client_that_sends_its_whole_body_first_still_reads_the_413() {
    let (pki, o, _srv, addr) = site("max_body_bytes = 1000", "").await;
    // As over plain HTTP (tests/proxy.rs): more than the buffers hold, sent before
    // anything is read; rampart discards the rest rather than reset the connection.
    const N: usize = 5_000_000;
    let mut request = format!("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {N}\r\n\r\n").into_bytes();
    request.extend_from_slice(&vec![b'x'; N]);
    for _ in 0..3 {
        let mut s = connect(addr, "site.test", &[b"http/1.1"], Trust::Ca(&pki))
            .await
            .unwrap();
        s.write_all(&request).await.expect("the whole body written");
        let (head, _) = read_one_response(&mut s, &mut Vec::new(), false).await;
        assert!(head.starts_with("http/1.1 413 "), "{head}");
    }
    assert_eq!(o.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_https_connection_closes_after_keepalive_timeout() {
    let (pki, _origin, _srv, addr) = site("keepalive_timeout = \"500ms\"", "").await;
    let mut s = served_once(addr, &pki).await;
    assert!(closed_within(&mut s, Duration::from_secs(10)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_https_outlives_the_request_timeouts() {
    let (pki, _origin, _srv, addr) = site("client_header_timeout = \"300ms\"\nkeepalive_timeout = \"300ms\"", "").await;
    let mut s = connect(addr, "site.test", &[], Trust::Ca(&pki)).await.unwrap();
    upgrade_to_websocket(&mut s).await;
    // Quiet for longer than both timeouts, then a message in two halves with a
    // pause between them, as a request head that never ends would look.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for part in [&b"half a "[..], b"message"] {
        s.write_all(part).await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let mut got = vec![0u8; 14];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("the tunnel is still open");
    assert_eq!(got, b"half a message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_an_https_listener_gets_a_400_that_says_so() {
    let (_pki, o, _srv, addr) = site("", "").await;
    let answer = raw(addr, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("HTTPS port"), "{answer}");
    assert_eq!(o.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_1_3_refuses_a_tls_1_2_client_and_http2_off_offers_only_http1() {
    let (pki, _origin, _srv, addr) = site("", ", min_version = \"1.3\", http2 = false").await;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let refused = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("site.test").unwrap(), tcp)
        .await;
    assert!(refused.is_err(), "TLS 1.2 must be refused");
    let s = connect(addr, "site.test", &[b"h2", b"http/1.1"], Trust::Ca(&pki))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(s.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cipher_suite_handshakes_and_resumes_a_session() {
    let (pki, o, _srv, addr) = site("", "").await;
    let suites = provider().cipher_suites.clone();
    assert!(suites.len() >= 6, "TLS 1.3 and 1.2 suites: {suites:?}");
    let mut tried = 0;
    // The test certificates are ECDSA: TLS 1.2's RSA suites cannot use them.
    for suite in suites.into_iter().filter(|s| !format!("{s:?}").contains("ECDHE_RSA")) {
        let version = suite.version();
        let mut only = (*provider()).clone();
        only.cipher_suites = vec![suite];
        // One client config for both connections: it holds the session cache.
        let config = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(only))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(pki.roots())
                .with_no_client_auth(),
        );
        for want in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("site.test").unwrap();
            let mut s = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .unwrap_or_else(|e| panic!("{suite:?}: {e}"));
            assert_eq!(s.get_ref().1.negotiated_cipher_suite(), Some(suite));
            let (head, body) = get_on(&mut s, "t").await;
            assert!(head.starts_with("http/1.1 200"), "{suite:?}: {head}");
            assert_eq!(body, "o");
            // TLS 1.3 tickets arrive after the handshake: the response read above
            // has taken them in.
            assert_eq!(s.get_ref().1.handshake_kind(), Some(want), "{suite:?}");
        }
        tried += 1;
    }
    assert_eq!(tried, 6, "3 TLS 1.3 suites and 3 ECDSA TLS 1.2 ones");
    assert_eq!(o.hits(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_redirect_sends_plain_http_requests_to_https_and_proxies_tls_ones() {
    let pki = Pki::new();
    let leaf = pki.leaf("site", &["site.test"]);
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    // A plain listener first, then the TLS one; one route for both.
    let toml = tls_config(&[o.addr], &[&leaf], "")
        .replacen(
            "[[listeners]]",
            "[[listeners]]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]",
            1,
        )
        .replacen("pool = \"app\"", "pool = \"app\"\nhttps_redirect = true", 1);
    let (srv, plain) = start_proxy(&toml);
    let tls = srv.listen_addrs()[1];

    // GET and HEAD: 301, to the same host without its port, target as written.
    let r = get_with(plain, "/a/b?c=1&d", &[("host", "Site.Test:8080")]).await;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "https://site.test/a/b?c=1&d");
    assert_eq!(r.headers["x-request-id"].len(), 24);
    // Other methods: 308, which keeps the method and body. The connection stays
    // usable after a body that was never read.
    let mut s = TcpStream::connect(plain).await.unwrap();
    s.write_all(b"POST /form HTTP/1.1\r\nHost: site.test\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (head, _) = read_one_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("http/1.1 308"), "{head}");
    assert!(head.contains("location: https://site.test/form"), "{head}");
    buf.clear();
    s.write_all(b"GET /again HTTP/1.1\r\nHost: site.test\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_one_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("http/1.1 301"), "{head}");
    // Over HTTP/2 (h2c) too.
    let r = get_h2(plain, "/h2").await;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "https://test.local/h2");
    assert_eq!(o.hits(), 0, "nothing plain reaches the backend");

    // Over TLS the route proxies.
    let mut s = connect(tls, "site.test", &[], Trust::Ca(&pki)).await.unwrap();
    let (head, body) = get_on(&mut s, "site.test").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!((body.as_str(), o.hits()), ("o", 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_expiry_shows_in_status_metrics_and_check() {
    let pki = Pki::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // An hour short of 10 days, so `check` says 9 whatever second it runs in.
    let expires = now + 10 * 86_400 - 3600;
    let leaf = pki.leaf_until("soon", &["soon.test", "*.soon.test"], Some(expires));
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = tls_config(&[o.addr], &[&leaf], "");
    let (srv, _addr) = start_proxy(&toml);

    let status = rampart::admin::status_json(srv.shared());
    let cert = &status["tls_certificates"][0];
    assert_eq!(cert["names"], serde_json::json!(["soon.test", "*.soon.test"]));
    assert_eq!(cert["not_after"], expires);
    assert_eq!(cert["default"], true);
    let left = cert["expires_in_seconds"].as_i64().unwrap();
    assert!((10 * 86_400 - 3900..=10 * 86_400 - 3600).contains(&left), "{left}");

    let metrics = rampart::admin::metrics_text(srv.shared());
    let series = format!(
        "rampart_tls_certificate_expiry_timestamp_seconds{{listener=\"127.0.0.1:0\",certificate=\"{}\"}} {expires}",
        leaf.cert.display()
    );
    assert!(metrics.contains(&series), "no {series} in:\n{metrics}");

    // `rampart check` names each certificate, its hosts and its expiry.
    let file = pki.dir.join("rampart.toml");
    std::fs::write(&file, &toml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("soon.crt (soon.test, *.soon.test, the default): expires") && text.contains("(in 9 days)"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_https_requests_in_flight_over_http1_and_http2() {
    let pki = Pki::new();
    let leaf = pki.leaf("site", &["site.test"]);
    let o = TestOrigin::start("o", Behavior::Slow(Duration::from_millis(700))).await;
    let (srv, addr) = start_proxy(&tls_config(&[o.addr], &[&leaf], ""));
    let mut h1 = connect(addr, "site.test", &[b"http/1.1"], Trust::Ca(&pki))
        .await
        .unwrap();
    let h2 = connect(addr, "site.test", &[b"h2"], Trust::Ca(&pki)).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2))
        .await
        .unwrap();
    tokio::spawn(conn);
    let h1_request = tokio::spawn(async move { get_on(&mut h1, "site.test").await });
    let req = Request::get("https://site.test/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let h2_request = tokio::spawn(async move { tx.send_request(req).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = tokio::task::spawn_blocking(move || srv.join());
    let (head, body) = h1_request.await.unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "o");
    let resp = h2_request
        .await
        .unwrap()
        .expect("the HTTP/2 request finishes during drain");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "o");
    stopping.await.unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed");
}

/// The HTTPS form of `shutdown_answers_one_more_request_on_an_idle_keepalive_connection`
/// (tests/proxy.rs), where hyper serves HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_one_more_https_request_on_an_idle_keepalive_connection() {
    let pki = Pki::new();
    let leaf = pki.leaf("site", &["site.test"]);
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&tls_config(&[o.addr], &[&leaf], ""));
    let mut fresh = served_once(addr, &pki).await;
    let mut parked = served_once(addr, &pki).await;
    let mut silent = served_once(addr, &pki).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (head, _) = get_on(&mut fresh, "site.test").await;
    assert!(!head.contains("connection: close"), "{head}");
    let stopping = tokio::task::spawn_blocking(move || srv.join());
    tokio::time::sleep(Duration::from_millis(100)).await;
    for s in [&mut fresh, &mut parked] {
        let (head, body) = get_on(s, "site.test").await;
        assert!(
            head.starts_with("http/1.1 200") && head.contains("connection: close"),
            "{head}"
        );
        assert_eq!(body, "o");
        closed_soon(s).await;
    }
    closed_soon(&mut silent).await;
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_protocol_header_comes_before_the_tls_handshake() {
    let pki = Pki::new();
    let leaf = pki.leaf("site", &["site.test"]);
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let toml = tls_config(&[o.addr], &[&leaf], "").replacen(
        "bind = \"127.0.0.1:0\"\n",
        "bind = \"127.0.0.1:0\"\nproxy_protocol = true\n",
        1,
    );
    let (_srv, addr) = start_proxy(&toml);
    // As an AWS NLB or HAProxy's send-proxy passes TLS through: the header in clear,
    // then the client's handshake.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 443\r\n")
        .await
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("site.test").unwrap(), tcp)
        .await
        .unwrap();
    let (head, body) = get_on(&mut s, "site.test").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "o");
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9");
    assert_eq!(seen["x-forwarded-proto"], "https");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_sni_refuses_clients_whose_name_no_certificate_covers() {
    let pki = Pki::new();
    let first = pki.leaf("first", &["first.test"]);
    let second = pki.leaf("second", &["*.b.test"]);
    let o = TestOrigin::start("o", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&tls_config(&[o.addr], &[&first, &second], ", strict_sni = true"));
    // No certificate is the default, and /status says so.
    let status = rampart::admin::status_json(srv.shared());
    assert_eq!(status["tls_certificates"][0]["default"], false);
    assert_eq!(status["tls_certificates"][1]["default"], false);
    for sni in ["first.test", "x.b.test"] {
        let mut s = connect(addr, sni, &[], Trust::Ca(&pki))
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        let (head, _) = get_on(&mut s, "t").await;
        assert!(head.starts_with("http/1.1 200"), "{sni}: {head}");
    }
    // Process-wide, and absent until the first failure.
    let failures = || {
        let text = rampart::metrics::install().render();
        text.lines()
            .find_map(|l| l.strip_prefix("rampart_tls_handshake_failures_total{reason=\"error\"} "))
            .map_or(0, |v| v.trim().parse::<u64>().unwrap())
    };
    let before = failures();
    // An unknown name, and no SNI at all (an IP address as the name): no default
    // certificate answers them.
    for sni in ["other.test", "b.test", "127.0.0.1"] {
        let refused = connect(addr, sni, &[], Trust::Any).await;
        assert!(refused.is_err(), "{sni}: a certificate was served");
    }
    // The refusal (a TLS alert) reaches the client before the count is made.
    let deadline = Instant::now() + Duration::from_secs(5);
    while failures() < before + 3 {
        assert!(Instant::now() < deadline, "{before} -> {}", failures());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(o.hits(), 2);
}

/// One `GET /` to `site.test` as a client presenting `client` (or no certificate),
/// with `extra` header lines: the whole response, or why the connection failed.
async fn get_as(addr: SocketAddr, pki: &Pki, client: Option<&Leaf>, extra: &str) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(pki.roots());
    let config = match client {
        Some(c) => {
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&c.key).unwrap();
            builder.with_client_auth_cert(vec![c.der.clone()], key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("site.test").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let request = format!("GET / HTTP/1.1\r\nhost: site.test\r\n{extra}connection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ca_admits_only_clients_with_a_certificate_it_signed() {
    let clients = Pki::new();
    let strangers = Pki::new();
    let (pki, o, _srv, addr) = site("", &format!(", client_ca = {:?}", clients.ca_file())).await;
    let member = clients.leaf("member", &["member.test"]);
    let outsider = strangers.leaf("outsider", &["outsider.test"]);
    let answer = get_as(addr, &pki, Some(&member), "").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with('o'), "{answer}");
    // TLS 1.3 reports the refusal on the client's first read, as an alert.
    for (who, cert) in [("no certificate", None), ("another CA's", Some(&outsider))] {
        let r = get_as(addr, &pki, cert, "").await;
        assert!(r.is_err(), "{who}: {r:?}");
    }
    assert_eq!(o.hits(), 1, "only the member's request reached the backend");

    let bad = tls_config(&[o.addr], &[&member], ", client_ca = \"/nonexistent/ca.pem\"");
    let err = rampart::Config::parse(&bad, "bad.toml").unwrap_err().to_string();
    assert!(
        err.contains("listeners[0].tls.client_ca: /nonexistent/ca.pem: cannot read"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_verify_optional_admits_clients_without_a_certificate_but_not_with_a_bad_one() {
    let clients = Pki::new();
    let strangers = Pki::new();
    let extra = format!(
        ", client_ca = {:?}, client_verify = \"optional\", forward_client_cert = true",
        clients.ca_file()
    );
    let (pki, o, _srv, addr) = site("", &extra).await;
    let member = clients.leaf("member", &["member.test"]);
    let outsider = strangers.leaf("outsider", &["outsider.test"]);
    let xfcc = || {
        let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
        seen.get("x-forwarded-client-cert")
            .map(|v| v.to_str().unwrap().to_string())
    };
    // No certificate: served, and the backend is told of none.
    let answer = get_as(addr, &pki, None, "x-forwarded-client-cert: Hash=00\r\n")
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(xfcc(), None);
    // A good one: served and forwarded.
    let answer = get_as(addr, &pki, Some(&member), "").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(xfcc().is_some_and(|f| f.ends_with(";DNS=member.test")), "{:?}", xfcc());
    // One no CA in the file signed still fails the handshake.
    let r = get_as(addr, &pki, Some(&outsider), "").await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(o.hits(), 2);

    let member_cert = clients.leaf("m2", &["m2.test"]);
    for (extra, want) in [
        (
            ", client_verify = \"optional\"",
            "listeners[0].tls.client_verify: needs client_ca",
        ),
        (
            &*format!(", client_ca = {:?}, client_verify = \"on\"", clients.ca_file()),
            "listeners[0].tls.client_verify: expected \"required\" or \"optional\", got \"on\"",
        ),
    ] {
        let bad = tls_config(&[o.addr], &[&member_cert], extra);
        let err = rampart::Config::parse(&bad, "bad.toml").unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_variables_tell_the_backend_what_the_connection_negotiated() {
    let pki = Pki::new();
    let clients = Pki::new();
    let leaf = pki.leaf("site", &["site.test"]);
    let origin = TestOrigin::start("o", Behavior::Healthy).await;
    let extra = format!(", client_ca = {:?}, client_verify = \"optional\"", clients.ca_file());
    let rules = concat!(
        "request_headers = { set = { \"X-SSL-Protocol\" = \"$ssl_protocol\", \"X-SSL-Cipher\" = \"$ssl_cipher\", ",
        "\"X-SSL-SNI\" = \"$ssl_server_name\", \"X-SSL-Client-DN\" = \"$ssl_client_s_dn\", ",
        "\"X-SSL-Client-Verify\" = \"$ssl_client_verify\" } }\n",
        "response_headers = { set = { \"X-TLS\" = \"$ssl_protocol\" } }\n",
    );
    let toml = tls_config(&[origin.addr], &[&leaf], &extra).replacen(
        "pool = \"app\"\n",
        &format!("pool = \"app\"\n{rules}"),
        1,
    );
    let (_srv, addr) = start_proxy(&toml);
    let seen = || origin.seen_headers.lock().unwrap().last().cloned().unwrap();
    let member = clients.leaf("member", &["member.test"]);
    let answer = get_as(addr, &pki, Some(&member), "").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("x-tls: tlsv1.3"), "{answer}");
    let h = seen();
    assert_eq!(h["x-ssl-protocol"], "TLSv1.3");
    assert!(h["x-ssl-cipher"].to_str().unwrap().starts_with("TLS13_"), "{h:?}");
    assert_eq!(h["x-ssl-sni"], "site.test");
    assert!(h["x-ssl-client-dn"].to_str().unwrap().starts_with("CN="), "{h:?}");
    assert_eq!(h["x-ssl-client-verify"], "SUCCESS");
    // Without a certificate: NONE, and no subject (an empty value is not sent).
    get_as(addr, &pki, None, "").await.unwrap();
    let h = seen();
    assert_eq!(h["x-ssl-client-verify"], "NONE");
    assert!(!h.contains_key("x-ssl-client-dn"), "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_client_cert_tells_the_backend_who_the_client_is_and_a_client_cannot_forge_it() {
    let clients = Pki::new();
    let extra = format!(", client_ca = {:?}, forward_client_cert = true", clients.ca_file());
    let (pki, o, _srv, addr) = site("", &extra).await;
    let member = clients.leaf("member", &["member.test", "spiffe://example.org/ns/shop/sa/member"]);
    let forged = "x-forwarded-client-cert: Hash=00;Subject=\"CN=admin\"\r\n";
    let answer = get_as(addr, &pki, Some(&member), forged).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = o.seen_headers.lock().unwrap().last().cloned().unwrap();
    let fields: Vec<_> = seen.get_all("x-forwarded-client-cert").iter().collect();
    assert_eq!(fields.len(), 1, "only rampart's: {fields:?}");
    let field = fields[0].to_str().unwrap();
    let hash: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &member.der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(field.starts_with(&format!("Hash={hash};Subject=\"CN=")), "{field}");
    assert!(
        field.ends_with("\";URI=spiffe://example.org/ns/shop/sa/member;DNS=member.test"),
        "{field}"
    );

    let bad = tls_config(&[o.addr], &[&member], ", forward_client_cert = true");
    let err = rampart::Config::parse(&bad, "bad.toml").unwrap_err().to_string();
    assert!(
        err.contains("listeners[0].tls.forward_client_cert: needs client_ca"),
        "{err}"
    );
}
