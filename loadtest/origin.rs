//! The chaos suite's origin server: answers "hello world\n\n" (13 bytes) and can be
//! switched into a failure mode over HTTP, on its own port, by the chaos driver:
//!
//!   GET /__mode/ok        healthy
//!   GET /__mode/503       answer 503
//!   GET /__mode/slow      answer after 200 ms
//!   GET /__mode/reset     send headers and part of the body, then abort
//!   GET /__mode/closeb4   read the request, close without answering
//!   GET /__mode/noaccept  stop accepting (the backlog fills) and stop answering
//!   GET /__stats          {"requests": N, "posts": N}
//!
//! Freezing (SIGSTOP) and killing (SIGKILL) are done from outside. SIGTERM is a
//! graceful stop, as in a rolling deploy: stop accepting, close idle keep-alive
//! connections, finish requests in flight, exit.
//! Usage: chaos-origin 127.0.0.1:PORT

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const OK: u8 = 0;
const E503: u8 = 1;
const SLOW: u8 = 2;
const RESET: u8 = 3;
const CLOSEB4: u8 = 4;
const NOACCEPT: u8 = 5;

#[derive(Default)]
struct State {
    mode: AtomicU8,
    requests: AtomicU64,
    posts: AtomicU64,
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(b: &'static str) -> Body {
    Full::new(Bytes::from_static(b.as_bytes()))
        .map_err(|e| match e {})
        .boxed()
}

fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("usage: chaos-origin 127.0.0.1:PORT"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(addr));
}

async fn run(addr: SocketAddr) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_reuse_address(true).unwrap();
    sock.bind(&addr.into()).unwrap();
    // A small backlog, so that `noaccept` fills it quickly, as a stuck server's would.
    sock.listen(64).unwrap();
    sock.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(sock.into()).unwrap();
    let state = Arc::new(State::default());
    // SIGTERM: stop accepting, let every connection finish its request in flight and
    // close (idle keep-alive ones close at once), then exit: a deploy's rolling stop.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while state.mode.load(Ordering::Relaxed) == NOACCEPT {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stream = tokio::select! {
            _ = term.recv() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| handle(state.clone(), req));
            // HTTP/1.1, or HTTP/2 for a connection that starts with its preface (the
            // suite's `rampart-h2` column).
            let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let stopping = tokio::select! {
                _ = conn.as_mut() => false,
                r = stop.wait_for(|s| *s) => r.is_ok(),
            };
            if stopping {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        });
        // Reap finished connections as we go.
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, std::io::Error> {
    let path = req.uri().path().to_string();
    if let Some(mode) = path.strip_prefix("/__mode/") {
        let m = match mode {
            "ok" => OK,
            "503" => E503,
            "slow" => SLOW,
            "reset" => RESET,
            "closeb4" => CLOSEB4,
            "noaccept" => NOACCEPT,
            _ => return Ok(Response::builder().status(400).body(full("unknown mode\n")).unwrap()),
        };
        state.mode.store(m, Ordering::Relaxed);
        return Ok(Response::new(full("ok\n")));
    }
    if path == "/__stats" {
        let s = format!(
            "{{\"requests\": {}, \"posts\": {}}}\n",
            state.requests.load(Ordering::Relaxed),
            state.posts.load(Ordering::Relaxed)
        );
        return Ok(Response::new(Full::new(Bytes::from(s)).map_err(|e| match e {}).boxed()));
    }
    let is_post = req.method() == Method::POST;
    // Read the whole request body first, as an application would.
    let _ = req.into_body().collect().await;
    state.requests.fetch_add(1, Ordering::Relaxed);
    if is_post {
        state.posts.fetch_add(1, Ordering::Relaxed);
    }
    match state.mode.load(Ordering::Relaxed) {
        E503 => Ok(Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(full("unavailable\n"))
            .unwrap()),
        SLOW => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok(Response::new(full("hello world\n\n")))
        }
        RESET => {
            let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
                Ok(Frame::data(Bytes::from_static(b"hello"))),
                Err(std::io::Error::other("reset mid-response")),
            ];
            let body = StreamBody::new(futures_lite::stream::iter(chunks)).boxed();
            Ok(Response::builder().header("content-length", "13").body(body).unwrap())
        }
        // Returning an error makes hyper close the connection without a response.
        CLOSEB4 => Err(std::io::Error::other("closing before the response")),
        NOACCEPT => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        _ => Ok(Response::new(full("hello world\n\n"))),
    }
}
