//! Test helpers: real origin servers with scripted behaviours, rampart started
//! in-process on 127.0.0.1:0, and a small HTTP client over real sockets.
#![allow(dead_code)]

pub mod pki;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rampart::{Config, Server};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

#[derive(Clone, Debug, PartialEq)]
pub enum Behavior {
    /// 200 with "NAME" as the body. `/echo` streams the request body back.
    Healthy,
    /// Accepts and reads the request, never answers.
    Freeze,
    /// Answers after a delay.
    Slow(Duration),
    /// Answers with this status.
    Status(u16),
    /// Sends headers promising 1 MB, 64 KB of it, then aborts the connection.
    ResetMidBody,
    /// Sends headers promising 1 MB, 64 KB of it, then nothing more (the connection
    /// stays open for a minute).
    StallMidBody,
    /// Reads the request and writes bytes that are not HTTP.
    Garbage,
    /// Reads the request and closes the connection without a response.
    CloseBeforeResponse,
}

pub struct TestOrigin {
    pub name: String,
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    conns: Arc<AtomicUsize>,
    tls_failures: Arc<AtomicUsize>,
    behavior: Arc<Mutex<Behavior>>,
    pub seen_headers: Arc<Mutex<Vec<HeaderMap>>>,
    tasks: Arc<Mutex<Option<JoinSet<()>>>>,
}

impl TestOrigin {
    pub async fn start(name: &str, behavior: Behavior) -> TestOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().unwrap();
        Self::serve(name, listener, addr, behavior, None)
    }

    /// An origin that speaks HTTPS: every connection starts with a handshake with
    /// `tls`; one that fails is counted (`tls_failures`) and closed.
    pub async fn start_tls(name: &str, behavior: Behavior, tls: tokio_rustls::TlsAcceptor) -> TestOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().unwrap();
        Self::serve(name, listener, addr, behavior, Some(tls))
    }

    /// Starts (again) on a given address, e.g. to bring a refused backend back.
    pub async fn start_on(name: &str, addr: SocketAddr, behavior: Behavior) -> TestOrigin {
        Self::start_on_with(name, addr, behavior, None)
    }

    /// `start_on` for an HTTPS origin (`start_tls`).
    pub async fn start_on_tls(
        name: &str,
        addr: SocketAddr,
        behavior: Behavior,
        tls: tokio_rustls::TlsAcceptor,
    ) -> TestOrigin {
        Self::start_on_with(name, addr, behavior, Some(tls))
    }

    fn start_on_with(
        name: &str,
        addr: SocketAddr,
        behavior: Behavior,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> TestOrigin {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_reuse_address(true).unwrap();
        // A listener just stopped (`stop`) closes once its aborted task is dropped.
        let mut tries = 0;
        while let Err(e) = sock.bind(&addr.into()) {
            tries += 1;
            assert!(tries < 100, "bind {addr}: {e}");
            std::thread::sleep(Duration::from_millis(10));
        }
        sock.listen(1024).unwrap();
        sock.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(sock.into()).unwrap();
        Self::serve(name, listener, addr, behavior, tls)
    }

    fn serve(
        name: &str,
        listener: TcpListener,
        addr: SocketAddr,
        behavior: Behavior,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> TestOrigin {
        let o = TestOrigin {
            name: name.to_string(),
            addr,
            hits: Arc::new(AtomicUsize::new(0)),
            conns: Arc::new(AtomicUsize::new(0)),
            tls_failures: Arc::new(AtomicUsize::new(0)),
            behavior: Arc::new(Mutex::new(behavior)),
            seen_headers: Arc::new(Mutex::new(Vec::new())),
            tasks: Arc::new(Mutex::new(None)),
        };
        let mut set = JoinSet::new();
        let (conns, tls_failures) = (o.conns.clone(), o.tls_failures.clone());
        let (hits, beh, seen, name2, tasks) = (
            o.hits.clone(),
            o.behavior.clone(),
            o.seen_headers.clone(),
            o.name.clone(),
            o.tasks.clone(),
        );
        set.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let (hits, beh, seen, name) = (hits.clone(), beh.clone(), seen.clone(), name2.clone());
                let (tls, tls_failures) = (tls.clone(), tls_failures.clone());
                let conn = async move {
                    match tls {
                        None => serve_conn(stream, name, hits, beh, seen).await,
                        Some(tls) => match tls.accept(stream).await {
                            Ok(s) => serve_conn(s, name, hits, beh, seen).await,
                            Err(_) => {
                                tls_failures.fetch_add(1, Ordering::SeqCst);
                            }
                        },
                    }
                };
                if let Some(set) = tasks.lock().unwrap().as_mut() {
                    set.spawn(conn);
                }
            }
        });
        *o.tasks.lock().unwrap() = Some(set);
        o
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    /// Connections whose TLS handshake failed (`start_tls`).
    pub fn tls_failures(&self) -> usize {
        self.tls_failures.load(Ordering::SeqCst)
    }

    pub fn reset_hits(&self) {
        self.hits.store(0, Ordering::SeqCst);
    }

    pub fn set(&self, b: Behavior) {
        *self.behavior.lock().unwrap() = b;
    }

    /// Stops listening and drops every connection: the port now refuses.
    pub fn stop(&self) {
        if let Some(mut set) = self.tasks.lock().unwrap().take() {
            set.abort_all();
        }
    }
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A backend process that dies with the first request it gets, as under `kill -9`:
/// it stops accepting, the request's connection closes, and 2 ms later its listener
/// closes (a dying process's kernel releases its sockets last-opened first). Left
/// unread (`read_first` false), the kernel resets that connection without a FIN;
/// read first, it closes with a FIN. Connections queued on the listener meanwhile
/// are reset when it closes, as the kernel does.
pub struct DyingOrigin {
    pub addr: SocketAddr,
    /// Requests it read before dying: 0 or 1.
    pub read: Arc<AtomicUsize>,
}

impl DyingOrigin {
    pub async fn start(read_first: bool) -> DyingOrigin {
        let listener = Arc::new(TcpListener::bind("127.0.0.1:0").await.expect("bind origin"));
        let addr = listener.local_addr().unwrap();
        let read = Arc::new(AtomicUsize::new(0));
        let dead = Arc::new(tokio::sync::Notify::new());
        let (read2, dead2) = (read.clone(), dead.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = dead2.notified() => return,
                    r = listener.accept() => match r {
                        Ok((stream, _)) => stream,
                        Err(_) => return,
                    },
                };
                let (listener, read, dead) = (listener.clone(), read2.clone(), dead2.clone());
                tokio::spawn(async move {
                    let mut stream = stream;
                    let mut first = [0u8; 1];
                    // Health checks connect and close: wait for a request's first byte.
                    if !matches!(stream.peek(&mut first).await, Ok(n) if n > 0) {
                        return;
                    }
                    if read_first {
                        read_request(&mut stream).await;
                        read.fetch_add(1, Ordering::SeqCst);
                    }
                    dead.notify_one();
                    drop(stream);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    // Linux stops a listener on shutdown(SHUT_RD), as on close.
                    let _ = socket2::SockRef::from(&*listener).shutdown(std::net::Shutdown::Read);
                });
            }
        });
        DyingOrigin { addr, read }
    }
}

/// Reads one request: its head and a `content-length` body. False if the connection
/// ended first.
pub async fn read_request(stream: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return true;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An address on which nothing listens: connections are refused.
pub async fn refused_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// An origin's connection: a socket, or TLS over one.
pub trait OriginStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Closes the connection with a reset (`SO_LINGER` 0), no FIN.
    fn abort(self);
}

impl OriginStream for TcpStream {
    fn abort(self) {
        let s2 = socket2::Socket::from(self.into_std().unwrap());
        let _ = s2.set_linger(Some(Duration::ZERO));
    }
}

impl OriginStream for tokio_rustls::server::TlsStream<TcpStream> {
    fn abort(self) {
        self.into_inner().0.abort()
    }
}

/// The head of a 1 MB response and its first 64 KB: `ResetMidBody` and
/// `StallMidBody` then break it off or go silent.
async fn send_part_of_a_long_body<S: OriginStream>(stream: &mut S) {
    let _ = stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n")
        .await;
    let _ = stream.write_all(&vec![b'x'; 65536]).await;
    let _ = stream.flush().await;
}

async fn serve_conn<S: OriginStream>(
    mut stream: S,
    name: String,
    hits: Arc<AtomicUsize>,
    beh: Arc<Mutex<Behavior>>,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
) {
    let current = beh.lock().unwrap().clone();
    if matches!(
        current,
        Behavior::Garbage | Behavior::CloseBeforeResponse | Behavior::ResetMidBody | Behavior::StallMidBody
    ) {
        // Raw behaviours: read one request head, then misbehave.
        let mut buf = vec![0u8; 65536];
        let mut n = 0;
        while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => return,
                Ok(k) => n += k,
            }
        }
        hits.fetch_add(1, Ordering::SeqCst);
        match current {
            Behavior::Garbage => {
                let _ = stream.write_all(b"this is not http\r\n\r\n").await;
                let _ = stream.flush().await;
            }
            Behavior::ResetMidBody => {
                send_part_of_a_long_body(&mut stream).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                stream.abort();
                return;
            }
            Behavior::StallMidBody => {
                send_part_of_a_long_body(&mut stream).await;
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
            _ => {}
        }
        return;
    }
    let svc = service_fn(move |req: Request<Incoming>| {
        let (name, hits, beh, seen) = (name.clone(), hits.clone(), beh.clone(), seen.clone());
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            // The target it got rides along as a made-up field, `:target`'s stand-in.
            let mut fields = req.headers().clone();
            if let Ok(t) = http::HeaderValue::from_str(req.uri().path_and_query().map_or("", |pq| pq.as_str())) {
                fields.insert(SEEN_TARGET, t);
            }
            seen.lock().unwrap().push(fields);
            let b = beh.lock().unwrap().clone();
            let resp = match b {
                Behavior::Freeze => {
                    std::future::pending::<()>().await;
                    unreachable!()
                }
                Behavior::Slow(d) => {
                    tokio::time::sleep(d).await;
                    healthy(&name, req).await
                }
                Behavior::Status(c) => {
                    let mut r = text(&name);
                    *r.status_mut() = StatusCode::from_u16(c).unwrap();
                    r
                }
                _ => healthy(&name, req).await,
            };
            Ok::<_, Infallible>(resp)
        }
    });
    // HTTP/1.1, or HTTP/2 for a connection that starts with its preface (pools with
    // `protocol = "h2"`; over TLS, when the acceptor offers `h2`).
    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .await;
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn text(name: &str) -> Response<OriginBody> {
    Response::new(Full::new(Bytes::from(name.to_string())).map_err(|e| match e {}).boxed())
}

async fn healthy(name: &str, mut req: Request<Incoming>) -> Response<OriginBody> {
    match req.uri().path() {
        "/echo" => {
            // Stream the request body straight back.
            let body = req.into_body();
            Response::new(body.boxed())
        }
        "/count" => {
            // Reads the whole body before answering, as an upload handler does, and
            // answers its length.
            let n = match req.into_body().collect().await {
                Ok(b) => b.to_bytes().len().to_string(),
                Err(e) => format!("body failed: {e}"),
            };
            Response::new(Full::new(Bytes::from(n)).map_err(|e| match e {}).boxed())
        }
        "/ws" => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut r = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut().insert("upgrade", "websocket".parse().unwrap());
            r.headers_mut().insert("connection", "upgrade".parse().unwrap());
            r
        }
        "/fields" => {
            let mut r = text(name);
            let h = r.headers_mut();
            h.append("set-cookie", "a=1".parse().unwrap());
            h.append("set-cookie", "b=2".parse().unwrap());
            h.insert("x-request-id", "from-backend".parse().unwrap());
            h.insert("x-custom", "v".parse().unwrap());
            h.insert("keep-alive", "timeout=5".parse().unwrap());
            r
        }
        "/hop" => {
            let mut r = text(name);
            r.headers_mut().insert("connection", "x-internal".parse().unwrap());
            r.headers_mut().insert("x-internal", "secret".parse().unwrap());
            r.headers_mut().insert("keep-alive", "timeout=5".parse().unwrap());
            r
        }
        _ => text(name),
    }
}

/// A streaming body of `n` bytes in 16 KB chunks.
pub fn big_body(n: usize) -> StreamBody<impl futures_lite::Stream<Item = Result<Frame<Bytes>, Infallible>>> {
    let chunk = Bytes::from(vec![b'r'; 16 * 1024]);
    let chunks = n.div_ceil(chunk.len());
    let last = n - (chunks - 1) * chunk.len();
    StreamBody::new(futures_lite::stream::iter((0..chunks).map(move |i| {
        Ok(Frame::data(if i + 1 == chunks {
            chunk.slice(..last)
        } else {
            chunk.clone()
        }))
    })))
}

/// Starts rampart with `toml` (listeners should bind 127.0.0.1:0).
pub fn start_proxy(toml: &str) -> (Server, SocketAddr) {
    // RUST_LOG=rampart=debug cargo test ... shows the proxy's logs for a failing test.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let config = Config::parse(toml, "test.toml").unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
    let server = Server::start(config).expect("start rampart");
    let addr = server.listen_addrs()[0];
    (server, addr)
}

/// Shuts the proxy down (in-flight requests drain) and waits for it, off the test's
/// runtime: `Server::join` blocks until every thread has finished.
pub async fn stop_proxy(server: Server) {
    tokio::task::spawn_blocking(move || server.join()).await.unwrap();
}

/// `toml` (from `pool_config`) with one more `[server]` setting.
pub fn with_server_setting(toml: &str, line: &str) -> String {
    toml.replacen("[server]\n", &format!("[server]\n{line}\n"), 1)
}

/// The value of one series (`name{labels}` as Prometheus writes it) in the
/// process-wide metrics, which every proxy a test binary starts shares.
pub fn metric(series: &str) -> String {
    series_value(&rampart::metrics::install().render(), series)
}

/// The value of one series on `srv`'s `/metrics` page, which adds what the recorder
/// does not keep: the per-backend series, written from its running config.
pub fn server_metric(srv: &rampart::Server, series: &str) -> String {
    series_value(&rampart::admin::metrics_text(srv.shared()), series)
}

fn series_value(text: &str, series: &str) -> String {
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .trim()
        .to_string()
}

/// Asserts that `toml` fails to load and that its errors include each of `wants`.
pub fn assert_config_errors(toml: &str, wants: &[&str]) {
    let e = rampart::Config::parse(toml, "t.toml").unwrap_err().to_string();
    for want in wants {
        assert!(e.contains(want), "{want:?} not in:\n{e}");
    }
}

/// `pool_config`'s extra line for a pool without active health checks.
pub const NO_HEALTH_CHECKS: &str = "health_check = { type = \"none\" }";

/// A config with one pool of `backends`, with extra lines for the pool appended.
/// In `TestOrigin::seen_headers`, the target (path and query) each request came with.
pub const SEEN_TARGET: &str = "x-test-origin-target";

pub fn pool_config(backends: &[SocketAddr], pool_extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"
[server]
workers = 1
shutdown_grace = "5s"

[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
pool = "app"

[pools.app]
backends = [{}]
{pool_extra}
"#,
        list.join(", ")
    )
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on a fresh HTTP/1.1 connection.
pub async fn send<B>(addr: SocketAddr, req: Request<B>) -> Result<Reply, String>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// A POST with a fixed body on a fresh connection.
pub async fn post_bytes(addr: SocketAddr, path: &str, body: impl Into<Bytes>) -> Result<Reply, String> {
    send(
        addr,
        Request::post(path)
            .header("host", "t")
            .body(Full::new(body.into()))
            .unwrap(),
    )
    .await
}

/// A GET on a fresh connection whose failure the test looks at (a body cut short).
pub async fn try_get(addr: SocketAddr, path: &str) -> Result<Reply, String> {
    send(
        addr,
        Request::get(path)
            .header("host", "t")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    get_with(addr, path, &[]).await
}

pub async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        b = b.header("host", "test.local");
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(addr, b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// One GET over HTTP/2 with prior knowledge (h2c).
pub async fn get_h2(addr: SocketAddr, path: &str) -> Reply {
    let req = Request::get(format!("http://test.local{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    send_h2(addr, req).await
}

/// One request over HTTP/2 with prior knowledge (h2c); its URI's authority goes out
/// as `:authority`.
pub async fn send_h2(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// Sends raw bytes and reads until the peer closes or `timeout` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Upgrades `s` to a WebSocket with the origin's echo at `/ws`; returns past the 101.
pub async fn upgrade_to_websocket<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) {
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        n += s.read(&mut buf[n..]).await.unwrap();
    }
    let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
}

/// Waits up to `limit` for the peer to close `s`; true if it did (a reset counts).
pub async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(limit, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

/// Counts replies by body (the origin's name).
pub fn tally(replies: &[Reply]) -> std::collections::HashMap<String, usize> {
    let mut m = std::collections::HashMap::new();
    for r in replies {
        *m.entry(r.text()).or_insert(0) += 1;
    }
    m
}

/// Reads one response (head and body, by `Content-Length` or chunked framing) from
/// `buf`/`s`; returns the lower-cased head and the decoded body. `head_only`: a
/// response to HEAD, which has no body whatever its fields say.
pub async fn read_one_response<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    head_only: bool,
) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    async fn more<S: tokio::io::AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("response in time")
            .unwrap();
        assert!(
            n > 0,
            "connection closed mid-response: {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        more(s, buf).await;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    buf.drain(..end + 4);
    let field = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let mut body = Vec::new();
    if head_only {
        return (head, body);
    }
    if let Some(len) = field("content-length:") {
        let len: usize = len.parse().unwrap();
        while buf.len() < len {
            more(s, buf).await;
        }
        body.extend(buf.drain(..len));
    } else if field("transfer-encoding:").as_deref() == Some("chunked") {
        loop {
            let line_end = loop {
                if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                    break p;
                }
                more(s, buf).await;
            };
            let size = usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap(), 16).unwrap();
            buf.drain(..line_end + 2);
            while buf.len() < size + 2 {
                more(s, buf).await;
            }
            body.extend(buf.drain(..size));
            assert_eq!(buf.drain(..2).collect::<Vec<_>>(), b"\r\n");
            if size == 0 {
                break;
            }
        }
    }
    (head, body)
}

/// Counts the bytes read through it: what a response took on the wire.
pub struct CountingReader<S> {
    pub inner: S,
    pub read: usize,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountingReader<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += buf.filled().len() - before;
        r
    }
}

/// Asserts that the peer closes `s` (a read returns end of stream, or an error) within
/// a few seconds, with no bytes before it.
pub async fn closed_soon<S: tokio::io::AsyncRead + Unpin>(s: &mut S) {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(_)) => panic!("bytes where the connection should have closed"),
        Err(_) => panic!("the connection stayed open"),
    }
}

/// A directory of the test's own under the system's temp dir, removed with all it
/// holds when dropped, so test runs leave nothing behind.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("rampart-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

/// So a `TempDir` stands wherever a path does: `dir.join("x")`, `&dir` for `&Path`.
impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
