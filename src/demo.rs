//! Demo origins for `rampart demo`: tiny HTTP servers that answer with their own name,
//! so a newcomer sees traffic spread across a pool without writing a backend.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves "hello from origin N" on `addr` until the runtime stops.
pub async fn origin(addr: SocketAddr, name: String) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let body = Bytes::from(format!("hello from {name} ({addr})\n"));
    loop {
        let (stream, _) = listener.accept().await?;
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req: Request<Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
