//! HTTP/1.1 client connections that hold no buffers while idle.
//!
//! hyper keeps a connection's read buffer, write buffer and parser state for as long
//! as the connection is open, idle or not: about 30 KB per idle keep-alive client.
//! nginx instead frees its buffers between requests (`ngx_http_set_keepalive`). This
//! module does the same around hyper: each request (or pipelined run of requests) is
//! served by a fresh, boxed hyper connection over `ParkIo`; when the response has been
//! fully flushed and the socket has nothing more to read, `ParkIo` reports end of
//! stream to hyper ("parks"), hyper finishes cleanly without closing the socket, and
//! the connection waits for readability with nothing but the socket and a timer.
//!
//! Three signals make parking safe: `ClientBody`'s drop (the response body is done),
//! `ParkIo::poll_flush` completing after that (hyper flushes only once its write
//! buffer is empty), and a read that would block. Bytes that arrive in between (a
//! pipelined request) cancel the park; a partial request that hyper had already
//! buffered comes back in `Parts::read_buf` and is replayed to the next connection.
//! Upgrades (WebSocket) are completed by hand: hyper hands back the socket and the
//! proxy's tunnel receives it through `ParkState::upgrade`.

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};

use crate::body::RespBody;
use crate::proxy::{self, ConnInfo};
use crate::worker::WorkerCtx;

/// What a tunnel gets when hyper hands an upgraded connection back: the socket and
/// any bytes the client sent after its request.
pub type Upgraded = (TcpStream, Bytes);

/// Shared between a connection's `ParkIo`, its service and its response bodies.
#[derive(Default)]
pub struct ParkState {
    /// The last response body has been dropped by hyper (written in full or aborted).
    response_done: Cell<bool>,
    /// hyper flushed its write buffer after `response_done`.
    flushed: Cell<bool>,
    /// `ParkIo` reported end of stream to hyper so the connection can park.
    parked: Cell<bool>,
    /// Set by the proxy when it answers 101: the tunnel waiting for the socket.
    upgrade: RefCell<Option<oneshot::Sender<Upgraded>>>,
}

impl ParkState {
    fn reset(&self) {
        self.response_done.set(false);
        self.flushed.set(false);
        self.parked.set(false);
    }

    /// Called by the proxy once the backend agreed to switch protocols.
    pub fn take_upgrade(&self) -> oneshot::Receiver<Upgraded> {
        let (tx, rx) = oneshot::channel();
        *self.upgrade.borrow_mut() = Some(tx);
        rx
    }
}

/// The client socket as hyper sees it, with the park signal and replayed bytes.
pub struct ParkIo {
    stream: TcpStream,
    /// Bytes read by an earlier hyper connection but not yet parsed.
    replay: Bytes,
    state: Rc<ParkState>,
}

impl ParkIo {
    fn read_socket(&mut self, cx: &mut Context<'_>, mut buf: ReadBufCursor<'_>) -> Poll<io::Result<usize>> {
        // SAFETY: as in hyper-util's `TokioIo`: tokio's `ReadBuf` only writes into the
        // uninitialised tail and reports how much it filled; we advance by exactly that.
        let n = unsafe {
            let mut tbuf = tokio::io::ReadBuf::uninit(buf.as_mut());
            match Pin::new(&mut self.stream).poll_read(cx, &mut tbuf) {
                Poll::Ready(Ok(())) => tbuf.filled().len(),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        };
        // SAFETY: `n` bytes were just initialised by the read above.
        unsafe { buf.advance(n) };
        Poll::Ready(Ok(n))
    }
}

impl Read for ParkIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, mut buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            return Poll::Ready(Ok(()));
        }
        match this.read_socket(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    // A new request is arriving: not idle.
                    this.state.response_done.set(false);
                    this.state.flushed.set(false);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if this.state.response_done.get() && this.state.flushed.get() => {
                // Idle: let hyper end this connection as if the client had closed.
                this.state.parked.set(true);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Write for ParkIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // hyper calls this only once its write buffer is empty.
        if this.state.response_done.get() && !this.state.flushed.get() {
            this.state.flushed.set(true);
            // hyper polled its read side before this flush; poll again so the idle
            // read happens now rather than when the next request arrives.
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The response body as hyper sees it: marks the response done when dropped.
pub struct ClientBody {
    inner: RespBody,
    state: Option<Rc<ParkState>>,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        if let Some(s) = &self.state {
            s.response_done.set(true);
        }
    }
}

/// The per-connection service. Its future is boxed: hyper keeps the service future
/// inline in the dispatcher, and the request's state machine (tries, hedges) is large.
#[derive(Clone)]
pub struct Svc {
    pub ctx: Rc<WorkerCtx>,
    pub info: Rc<ConnInfo>,
}

type SvcFuture = Pin<Box<dyn Future<Output = Result<Response<ClientBody>, Infallible>>>>;

impl hyper::service::Service<Request<Incoming>> for Svc {
    type Response = Response<ClientBody>;
    type Error = Infallible;
    type Future = SvcFuture;

    fn call(&self, req: Request<Incoming>) -> SvcFuture {
        let ctx = self.ctx.clone();
        let info = self.info.clone();
        if let Some(s) = &info.park {
            s.response_done.set(false);
            s.flushed.set(false);
        }
        Box::pin(async move {
            let state = info.park.clone();
            let resp = proxy::handle(ctx, info, req).await;
            Ok(resp.map(|inner| ClientBody { inner, state }))
        })
    }
}

/// Waits until the client has sent something (or closed), and copies up to
/// `buf.len()` of its first bytes into `buf` without consuming them. Returns 0 on end
/// of stream. `readable()` may wake without data; this keeps waiting then, so an idle
/// connection never builds hyper state it does not need.
pub async fn peek_request(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        let mut raw = [std::mem::MaybeUninit::<u8>::uninit(); 32];
        let len = buf.len().min(raw.len());
        match stream.try_io(Interest::READABLE, || {
            socket2::SockRef::from(stream).peek(&mut raw[..len])
        }) {
            Ok(n) => {
                for (dst, src) in buf.iter_mut().zip(&raw[..n]) {
                    // SAFETY: the kernel initialised the first `n` bytes.
                    *dst = unsafe { src.assume_init() };
                }
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Copies what is left unparsed, so the parked connection does not keep hyper's read
/// buffer (a `Bytes` slice of it, however short, keeps all of it alive).
fn nonempty(buf: Bytes) -> Bytes {
    if buf.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&buf)
    }
}

/// Timeouts for the idle waits between requests.
pub struct IdleWaits {
    /// Until the first request byte of a new connection.
    pub first: Duration,
    /// Between requests on a keep-alive connection.
    pub keepalive: Duration,
}

/// Serves an HTTP/1.1 connection until the client closes, a wait times out, hyper
/// closes it, or shutdown. Each request gets a fresh hyper connection; between
/// requests the task holds only the socket.
pub async fn serve_h1(
    ctx: Rc<WorkerCtx>,
    builder: &http1::Builder,
    waits: &IdleWaits,
    mut stream: TcpStream,
    peer: SocketAddr,
    shutdown: &mut watch::Receiver<bool>,
) {
    let state = Rc::new(ParkState::default());
    let svc = Svc {
        ctx,
        info: Rc::new(ConnInfo::new(peer, false).with_park(state.clone())),
    };
    let mut replay = Bytes::new();
    let mut wait = waits.first;
    loop {
        if replay.is_empty() {
            let mut one = [0u8; 1];
            let ready = tokio::select! {
                biased;
                _ = crate::stopped(shutdown) => return,
                r = tokio::time::timeout(wait, peek_request(&stream, &mut one)) => r,
            };
            // Timed out, closed by the client, or a socket error: nothing to answer.
            if !matches!(ready, Ok(Ok(n)) if n > 0) {
                return;
            }
        }
        wait = waits.keepalive;
        state.reset();
        let io = ParkIo {
            stream,
            replay: std::mem::take(&mut replay),
            state: state.clone(),
        };
        // Boxed so it is freed while the connection is parked.
        let mut conn = Box::new(builder.serve_connection(io, svc.clone()));
        let result = tokio::select! {
            r = poll_fn(|cx| conn.poll_without_shutdown(cx)) => r,
            _ = crate::stopped(shutdown) => {
                // Finish the request in flight; hyper then closes.
                Pin::new(&mut *conn).graceful_shutdown();
                poll_fn(|cx| conn.poll_without_shutdown(cx)).await
            }
        };
        let parts = conn.into_parts();
        stream = parts.io.stream;
        let upgrade = state.upgrade.borrow_mut().take();
        match result {
            Ok(()) if upgrade.is_some() => {
                if let Some(tx) = upgrade {
                    let _ = tx.send((stream, parts.read_buf));
                }
                return;
            }
            // An empty `read_buf` still pins hyper's whole read buffer: drop it.
            Ok(()) if state.parked.get() && !*shutdown.borrow() => replay = nonempty(parts.read_buf),
            // The client sent part of a pipelined request just as we parked: hyper saw
            // "end of stream" mid-request, but nothing was written; replay its bytes.
            Err(e) if state.parked.get() && e.is_incomplete_message() && !parts.read_buf.is_empty() => {
                replay = nonempty(parts.read_buf);
            }
            Ok(()) => {
                // hyper ended the connection (Connection: close, shutdown, client EOF).
                let _ = stream.shutdown().await;
                return;
            }
            Err(e) => {
                tracing::debug!(client = %peer, error = %e, "client connection ended with error");
                return;
            }
        }
    }
}
