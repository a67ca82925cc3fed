//! gzip, zstd and brotli (`compress`) over real sockets: a page is compressed whole (read inside the
//! retry buffer) or as it streams, and a backend's pause flushes what it has sent so
//! far to the client; what must not be compressed is not (a client that does not ask,
//! a short body, a type not listed, a body already encoded, `no-transform`, a 206, a
//! route without it); a HEAD says what a GET would get; HTTP/2 clients get it too; a
//! backend that breaks off mid-body leaves the client a failed body, not a short one
//! that decodes; and the counters add up.

mod common;

use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn page_text(n: usize) -> String {
    let mut s = String::with_capacity(n + 64);
    let mut i = 0;
    while s.len() < n {
        s.push_str(&format!("<p>line {i} of a page that compresses well</p>\n"));
        i += 1;
    }
    s.truncate(n);
    s
}

fn respond(status: u16, fields: &[(&str, &str)], body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in fields {
        r.headers_mut()
            .append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    r
}

/// An origin whose paths each script one kind of response. `/stream` sends its first
/// half, then waits for `go` before the second.
async fn origin(go: Arc<Notify>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let go = go.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let go = go.clone();
                async move {
                    let html = [("content-type", "text/html; charset=utf-8")];
                    let page = page_text(4000);
                    // `/plain/...` (the route without compress) serves the same.
                    let r = match req.uri().path().trim_start_matches("/plain") {
                        "/page" => respond(
                            200,
                            &[
                                ("content-type", "text/html; charset=utf-8"),
                                ("etag", "\"v1\""),
                                ("accept-ranges", "bytes"),
                                ("vary", "Origin"),
                            ],
                            page,
                        ),
                        "/big" => respond(200, &html, page_text(300_000)),
                        "/small" => respond(200, &html, "<p>hi</p>"),
                        "/png" => respond(200, &[("content-type", "image/png")], page),
                        "/json404" => respond(404, &[("content-type", "application/json")], page),
                        "/encoded" => respond(200, &[("content-type", "text/html"), ("content-encoding", "br")], page),
                        "/no-transform" => respond(
                            200,
                            &[("content-type", "text/html"), ("cache-control", "public, no-transform")],
                            page,
                        ),
                        "/partial" => respond(
                            206,
                            &[("content-type", "text/html"), ("content-range", "bytes 0-3999/8000")],
                            page,
                        ),
                        "/stream" => {
                            let first = Bytes::from(page_text(3000));
                            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
                            tokio::spawn(async move {
                                let _ = tx.send(Ok(Frame::data(first))).await;
                                go.notified().await;
                                let _ = tx.send(Ok(Frame::data(Bytes::from("<p>the end</p>")))).await;
                            });
                            let stream =
                                futures_lite::stream::unfold(
                                    rx,
                                    |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
                                );
                            let mut r = Response::new(StreamBody::new(stream).boxed());
                            r.headers_mut().insert("content-type", "text/plain".parse().unwrap());
                            r
                        }
                        _ => respond(200, &html, page),
                    };
                    Ok::<_, Infallible>(r)
                }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn gunzip(z: &[u8]) -> String {
    let mut out = String::new();
    flate2::read::GzDecoder::new(z)
        .read_to_string(&mut out)
        .expect("a whole gzip stream");
    out
}

/// A pool's counter, from the test binary's metrics.
fn counter(name: &str, pool: &str) -> u64 {
    metric(&format!("{name}{{pool=\"{pool}\"}}")).parse().unwrap()
}

/// Each test its own pool name: the counters are the test binary's, shared.
fn config(pool: &str, origins: &[SocketAddr], pool_extra: &str, route_extra: &str) -> String {
    let origins: Vec<String> = origins.iter().map(|a| format!("\"{a}\"")).collect();
    let origins = origins.join(", ");
    format!(
        r#"
[server]
workers = 1

[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
path_prefix = "/plain/"
pool = "{pool}"

[[routes]]
pool = "{pool}"
{route_extra}

[pools.{pool}]
backends = [{origins}]
health_check = {{ type = "none" }}
{pool_extra}
"#
    )
}

const GZIP: &[(&str, &str)] = &[("accept-encoding", "br, gzip")];

#[tokio::test]
async fn text_is_gzipped_for_clients_that_ask_and_only_then() {
    // Two backends, so a GET may be retried and its response is read whole first
    // (`response_buffer_bytes`) when it fits.
    let origins = [
        origin(Arc::new(Notify::new())).await,
        origin(Arc::new(Notify::new())).await,
    ];
    let (srv, addr) = start_proxy(&config("whole", &origins, "", "compress = true"));

    // Read whole inside the retry buffer: compressed at once, with a length.
    let r = get_with(addr, "/page", GZIP).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-encoding"], "gzip", "{:?}", r.headers);
    assert_eq!(
        r.headers.get("content-length").map(|v| v.to_str().unwrap().to_string()),
        Some(r.body.len().to_string()),
        "{:?}",
        r.headers
    );
    assert!(r.body.len() < 1000, "{} bytes", r.body.len());
    assert_eq!(gunzip(&r.body), page_text(4000));
    let vary: Vec<_> = r.headers.get_all("vary").iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(vary, ["Origin", "Accept-Encoding"]);
    assert_eq!(r.headers["etag"], "W/\"v1\"");
    assert!(r.headers.get("accept-ranges").is_none());

    // Past the buffer: compressed as it streams, chunked.
    let r = get_with(addr, "/big", GZIP).await;
    assert_eq!(r.headers["content-encoding"], "gzip");
    assert!(r.headers.get("content-length").is_none());
    assert_eq!(r.headers["transfer-encoding"], "chunked");
    assert_eq!(gunzip(&r.body), page_text(300_000));
    assert!(r.body.len() < 60_000, "{} bytes", r.body.len());

    // An error page of a listed type is compressed too, as nginx does.
    let r = get_with(addr, "/json404", GZIP).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.headers["content-encoding"], "gzip");
    assert_eq!(gunzip(&r.body), page_text(4000));

    // A client that does not ask, or refuses gzip, gets the page as it is, marked as
    // varying so a cache does not serve it to one that asks.
    for fields in [
        &[][..],
        &[("accept-encoding", "gzip;q=0, br")],
        &[("accept-encoding", "identity")],
    ] {
        let r = get_with(addr, "/page", fields).await;
        assert!(r.headers.get("content-encoding").is_none(), "{fields:?}");
        assert_eq!(r.text(), page_text(4000));
        assert_eq!(r.headers["etag"], "\"v1\"");
        assert_eq!(r.headers.get_all("vary").iter().count(), 2, "{fields:?}");
    }

    // `*` admits gzip.
    let r = get_with(addr, "/page", &[("accept-encoding", "*")]).await;
    assert_eq!(r.headers["content-encoding"], "gzip");

    // HTTP/2 clients too.
    let req = Request::get("http://test.local/page")
        .header("accept-encoding", "gzip")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send_h2(addr, req).await;
    assert_eq!(r.headers["content-encoding"], "gzip");
    assert_eq!(gunzip(&r.body), page_text(4000));

    assert_eq!(counter("rampart_compressed_responses_total", "whole"), 5);
    let bytes_in = counter("rampart_compression_input_bytes_total", "whole");
    assert_eq!(bytes_in, 4 * 4000 + 300_000);
    let bytes_out = counter("rampart_compression_output_bytes_total", "whole");
    assert!(bytes_out > 0 && bytes_out < bytes_in / 4, "{bytes_out} of {bytes_in}");
    stop_proxy(srv).await;
}

fn unzstd(z: &[u8]) -> String {
    String::from_utf8(zstd::stream::decode_all(z).expect("a whole zstd frame")).unwrap()
}

/// A browser's `Accept-Encoding` over HTTPS (Chrome's, Firefox's).
const BROWSER: &[(&str, &str)] = &[("accept-encoding", "gzip, deflate, br, zstd")];

/// `encodings = ["zstd", "gzip"]`: a client that takes both gets zstd (equal
/// weights: the order offered), one that weighs gzip higher or takes only gzip gets
/// gzip, whole (inside the retry buffer) or streamed, over HTTP/1.1 and HTTP/2, and
/// the counters count both. The default offers gzip alone.
#[tokio::test]
async fn zstd_is_offered_first_when_listed_and_the_client_s_weights_decide() {
    let origins = [
        origin(Arc::new(Notify::new())).await,
        origin(Arc::new(Notify::new())).await,
    ];
    let (srv, addr) = start_proxy(&config(
        "zstd",
        &origins,
        "",
        "compress = { encodings = [\"zstd\", \"gzip\"] }",
    ));
    let r = get_with(addr, "/page", BROWSER).await;
    assert_eq!(r.headers["content-encoding"], "zstd", "{:?}", r.headers);
    assert_eq!(
        r.headers.get("content-length").map(|v| v.to_str().unwrap().to_string()),
        Some(r.body.len().to_string())
    );
    assert!(r.body.len() < 1000, "{} bytes", r.body.len());
    assert_eq!(unzstd(&r.body), page_text(4000));
    assert_eq!(r.headers["etag"], "W/\"v1\"");
    let r = get_with(addr, "/big", BROWSER).await;
    assert_eq!(r.headers["content-encoding"], "zstd");
    assert_eq!(r.headers["transfer-encoding"], "chunked");
    assert_eq!(unzstd(&r.body), page_text(300_000));
    assert!(r.body.len() < 60_000, "{} bytes", r.body.len());
    // The client's weights come first.
    for weights in ["zstd;q=0.5, gzip", "gzip", "x-gzip, zstd;q=0"] {
        let r = get_with(addr, "/page", &[("accept-encoding", weights)]).await;
        assert_eq!(r.headers["content-encoding"], "gzip", "{weights}");
        assert_eq!(gunzip(&r.body), page_text(4000));
    }
    let req = Request::get("http://test.local/page")
        .header("accept-encoding", "zstd")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send_h2(addr, req).await;
    assert_eq!(r.headers["content-encoding"], "zstd");
    assert_eq!(unzstd(&r.body), page_text(4000));
    assert_eq!(counter("rampart_compressed_responses_total", "zstd"), 6);
    assert_eq!(
        counter("rampart_compression_input_bytes_total", "zstd"),
        5 * 4000 + 300_000
    );
    stop_proxy(srv).await;

    // brotli for the browsers without zstd (Safari's `gzip, deflate, br`), where
    // listed after zstd.
    let (srv, addr) = start_proxy(&config(
        "br",
        &origins,
        "",
        "compress = { encodings = [\"zstd\", \"br\", \"gzip\"] }",
    ));
    let safari = [("accept-encoding", "gzip, deflate, br")];
    for path in ["/page", "/big"] {
        let r = get_with(addr, path, &safari).await;
        assert_eq!(r.headers["content-encoding"], "br", "{path}");
        let mut plain = String::new();
        brotli::Decompressor::new(&r.body[..], 4096)
            .read_to_string(&mut plain)
            .expect("a whole brotli stream");
        assert_eq!(plain, page_text(if path == "/page" { 4000 } else { 300_000 }));
    }
    assert_eq!(
        get_with(addr, "/page", BROWSER).await.headers["content-encoding"],
        "zstd"
    );
    stop_proxy(srv).await;

    // Not listed, not offered: the default is gzip alone.
    let (srv, addr) = start_proxy(&config("zstd-off", &origins, "", "compress = true"));
    let r = get_with(addr, "/page", &[("accept-encoding", "zstd, br")]).await;
    assert!(r.headers.get("content-encoding").is_none(), "{:?}", r.headers);
    assert_eq!(r.text(), page_text(4000));
    assert_eq!(
        get_with(addr, "/page", BROWSER).await.headers["content-encoding"],
        "gzip"
    );
    stop_proxy(srv).await;
}

#[tokio::test]
async fn what_must_not_be_compressed_goes_as_it_is() {
    let origin = origin(Arc::new(Notify::new())).await;
    let (srv, addr) = start_proxy(&config("not", &[origin], "", "compress = true"));
    for path in ["/small", "/png", "/encoded", "/no-transform", "/partial", "/plain/page"] {
        let r = get_with(addr, path, GZIP).await;
        let coding = r
            .headers
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_string());
        assert_ne!(coding.as_deref(), Some("gzip"), "{path}");
        assert_eq!(
            r.headers.get("content-length").unwrap(),
            &r.body.len().to_string(),
            "{path}"
        );
        let expected = if path == "/small" { 9 } else { 4000 };
        assert_eq!(r.body.len(), expected, "{path}");
    }
    // Only a listed type that could have been compressed says it varies.
    let r = get_with(addr, "/small", GZIP).await;
    assert_eq!(r.headers["vary"], "Accept-Encoding");
    let r = get_with(addr, "/png", GZIP).await;
    assert!(r.headers.get("vary").is_none());
    // The route without `compress` leaves even a page alone.
    let r = get_with(addr, "/plain/page", GZIP).await;
    assert_eq!(r.headers["vary"], "Origin");
    assert_eq!(r.headers["etag"], "\"v1\"");
    // No responses were counted as compressed.
    assert_eq!(metric("rampart_compressed_responses_total{pool=\"not\"}"), "0");
    stop_proxy(srv).await;
}

#[tokio::test]
async fn a_head_says_what_a_get_would_get() {
    let origin = origin(Arc::new(Notify::new())).await;
    let (srv, addr) = start_proxy(&config("head", &[origin], "", "compress = true"));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"HEAD /page HTTP/1.1\r\nhost: t\r\naccept-encoding: gzip\r\n\r\nGET /small HTTP/1.1\r\nhost: t\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("<p>hi</p>") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got).to_lowercase();
    let (head, rest) = text.split_once("\r\n\r\n").expect("a HEAD answer");
    assert!(head.contains("content-encoding: gzip"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    // No body followed the HEAD's answer: the next response starts right after it.
    assert!(rest.starts_with("http/1.1 200"), "{rest}");
    stop_proxy(srv).await;
}

/// A streaming decoder of either coding, written to as the body arrives.
enum Decoder {
    Gzip(Box<flate2::write::GzDecoder<Vec<u8>>>),
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
}

impl Decoder {
    fn of(coding: &str) -> Decoder {
        match coding {
            "gzip" => Decoder::Gzip(Box::new(flate2::write::GzDecoder::new(Vec::new()))),
            "br" => Decoder::Brotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 4096))),
            _ => Decoder::Zstd(zstd::stream::write::Decoder::new(Vec::new()).unwrap()),
        }
    }

    /// Decodes `d`, and everything it completes.
    fn write(&mut self, d: &[u8]) {
        use std::io::Write;
        match self {
            Decoder::Gzip(z) => z.write_all(d).and_then(|()| z.flush()).unwrap(),
            Decoder::Zstd(z) => z.write_all(d).and_then(|()| z.flush()).unwrap(),
            Decoder::Brotli(z) => z.write_all(d).and_then(|()| z.flush()).unwrap(),
        }
    }

    fn decoded(&self) -> &[u8] {
        match self {
            Decoder::Gzip(z) => z.get_ref(),
            Decoder::Zstd(z) => z.get_ref(),
            Decoder::Brotli(z) => z.get_ref(),
        }
    }

    /// Everything, once the stream has ended whole.
    fn finish(self) -> Vec<u8> {
        match self {
            Decoder::Gzip(z) => z.finish().expect("a whole gzip stream"),
            Decoder::Zstd(z) => z.into_inner(),
            Decoder::Brotli(z) => z.into_inner().expect("a whole brotli stream"),
        }
    }
}

#[tokio::test]
async fn a_backend_pause_flushes_what_it_sent_so_far() {
    for coding in ["gzip", "zstd", "br"] {
        let go = Arc::new(Notify::new());
        let origin = origin(go.clone()).await;
        let (srv, addr) = start_proxy(&config(
            &format!("paused-{coding}"),
            &[origin],
            "retry = { response_buffer_bytes = 0 }",
            &format!("compress = {{ encodings = [\"{coding}\"] }}"),
        ));
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/stream")
            .header("host", "t")
            .header("accept-encoding", coding)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.headers()["content-encoding"], coding);
        let mut body = resp.into_body();
        let mut z = Decoder::of(coding);
        let first = page_text(3000);
        // The origin holds its second half until the client has decoded the first: a
        // compressor that waited for more input, or for the end, would hang here.
        tokio::time::timeout(Duration::from_secs(5), async {
            while z.decoded().len() < first.len() {
                let frame = body.frame().await.expect("more body").expect("no error");
                if let Ok(d) = frame.into_data() {
                    z.write(&d);
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{coding}: the first half arrives before the origin sends the rest"));
        assert_eq!(z.decoded(), first.as_bytes(), "{coding}");
        go.notify_one();
        while let Some(frame) = body.frame().await {
            if let Ok(d) = frame.unwrap().into_data() {
                z.write(&d);
            }
        }
        let all = z.finish();
        assert_eq!(
            String::from_utf8(all).unwrap(),
            format!("{first}<p>the end</p>"),
            "{coding}"
        );
        stop_proxy(srv).await;
    }
}

/// An origin that sends a chunked page's head and first chunk, then resets.
async fn breaking_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if !read_request(&mut s).await {
                    return;
                }
                let chunk = page_text(100_000);
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n",
                    chunk.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let sock = socket2::Socket::from(s.into_std().unwrap());
                let _ = sock.set_linger(Some(Duration::ZERO));
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_body_broken_off_is_not_passed_as_a_whole_one() {
    let origin = breaking_origin().await;
    let (srv, addr) = start_proxy(&config("broken", &[origin], "", "compress = true"));
    for _ in 0..2 {
        let req = Request::get("/")
            .header("host", "t")
            .header("accept-encoding", "gzip")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let got = send(addr, req).await;
        assert!(
            got.is_err(),
            "a cut body must fail at the client: {:?}",
            got.map(|r| r.body.len())
        );
    }
    stop_proxy(srv).await;
}

#[tokio::test]
async fn server_wide_compress_and_a_route_that_turns_it_off() {
    let origin = origin(Arc::new(Notify::new())).await;
    let toml = config("wide", &[origin], "", "compress = false").replacen(
        "[server]\n",
        "[server]\ncompress = { types = [\"text/*\"], min_length = 5, level = 6 }\n",
        1,
    );
    let (srv, addr) = start_proxy(&toml);
    // `/plain/` has no `compress` of its own: the server's applies, small bodies too.
    let r = get_with(addr, "/plain/small", GZIP).await;
    assert_eq!(r.headers["content-encoding"], "gzip");
    assert_eq!(gunzip(&r.body), "<p>hi</p>");
    let r = get_with(addr, "/plain/png", GZIP).await;
    assert!(r.headers.get("content-encoding").is_none());
    // The catch-all route turned it off.
    let r = get_with(addr, "/page", GZIP).await;
    assert!(r.headers.get("content-encoding").is_none());
    assert_eq!(r.headers["vary"], "Origin");
    stop_proxy(srv).await;
}

/// The access log of compressed responses: `$gzip_ratio` (the backend's bytes over
/// those sent), `$upstream_response_length` (the backend's), `$body_bytes_sent` (the
/// client's) and `$bytes_sent`, which on rampart's HTTP/1.1 path is what the response
/// took on the wire, chunked framing included.
#[tokio::test]
async fn the_access_log_counts_what_compression_took_and_gave() {
    use tokio::io::AsyncWriteExt;
    let origin = origin(Arc::new(Notify::new())).await;
    let dir = TempDir::new("compress-log");
    let log = dir.join("access.log");
    let toml = with_server_setting(
        &config("logged", &[origin], "", "compress = true"),
        &format!(
            "access_log = \"{}\"\naccess_log_format = \"$bytes_sent $body_bytes_sent $upstream_response_length $gzip_ratio\"",
            log.display()
        ),
    );
    let (srv, addr) = start_proxy(&toml);
    let mut s = CountingReader {
        inner: TcpStream::connect(addr).await.unwrap(),
        read: 0,
    };
    let mut buf = Vec::new();
    let mut sizes = Vec::new();
    for request in [
        // Compressed as they stream (one backend: no retry, so nothing is read
        // whole first): chunked.
        "GET /big HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\n\r\n",
        "GET /page HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\n\r\n",
        // Not asked for.
        "GET /page HTTP/1.1\r\nHost: t\r\n\r\n",
    ] {
        s.inner.write_all(request.as_bytes()).await.unwrap();
        let before = s.read - buf.len();
        let (head, body) = read_one_response(&mut s, &mut buf, false).await;
        sizes.push((head, s.read - buf.len() - before, body.len()));
    }
    stop_proxy(srv).await;
    assert!(sizes[0].0.contains("transfer-encoding: chunked"), "{sizes:?}");
    assert!(sizes[2].0.contains("content-length: 4000"), "{sizes:?}");
    let got: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let ratio = |of: usize, to: usize| {
        let h = of * 100 / to;
        format!("{}.{:02}", h / 100, h % 100)
    };
    let want: Vec<String> = sizes
        .iter()
        .zip([300_000, 4000, 4000])
        .map(|((head, wire, body), of)| {
            let ratio = match head.contains("content-encoding: gzip") {
                true => ratio(of, *body),
                false => "-".to_string(),
            };
            format!("{wire} {body} {of} {ratio}")
        })
        .collect();
    assert_eq!(got, want);
    assert!(want[0].ends_with(&ratio(300_000, sizes[0].2)) && sizes[0].2 < 60_000);
}
