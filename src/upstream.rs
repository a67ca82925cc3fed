//! Backend connections: connecting with a timeout, and each worker's own pool of idle
//! HTTP/1.1 keep-alive connections. The pool is worker-local (`Rc<RefCell<…>>` on a
//! current-thread runtime), so checkout and checkin take no lock and wake no other
//! thread. Connections are hyper's low-level `SendRequest`, with the connection driver
//! spawned on the worker's runtime.
//!
//! Each connection's socket is wrapped in `UpIo`, which notices when the backend closed
//! the connection with the request in flight unread (the keep-alive race:
//! the backend closes an idle connection just as we reuse it). Such a request never
//! reached the application, so `forward` may send it to another backend whatever its
//! method.
//!
//! This module does not decide which backend to use (`balancer`), nor whether to retry
//! (`proxy`/`retry`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use hyper::rt::{Read, ReadBufCursor, Write};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::body::ReqBody;
use crate::error::ProxyError;

/// Where the request in flight on a connection stands, shared by the `Sender` (which
/// starts requests) and the connection's `UpIo` (which sees the bytes).
const HEARD: u8 = 0;
/// A request was started and nothing has been read from the backend since.
const UNHEARD: u8 = 1;
/// The backend closed with that request unread.
const UNREAD: u8 = 2;

/// One backend connection as a request uses it.
pub struct Sender {
    pub tx: http1::SendRequest<ReqBody>,
    state: Arc<AtomicU8>,
}

impl Sender {
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub fn is_ready(&self) -> bool {
        self.tx.is_ready()
    }

    /// Marks the start of a request: until the backend sends a byte, a close with
    /// the request unread means no application saw it.
    pub fn begin_request(&self) {
        self.state.store(UNHEARD, Ordering::Relaxed);
    }

    /// The backend closed this connection with the request in flight unread, before
    /// sending anything for it: no application can have seen it. Meaningful once a
    /// send on it has failed.
    pub fn closed_unread(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UNREAD
    }
}

/// The backend socket as hyper sees it. Notes whether anything was written since the
/// backend last sent anything. If the backend then closes the connection, it asks the kernel
/// whether the close was a FIN followed by a reset: a socket resets after its FIN only
/// when bytes reached it after it was closed, or were still unread when it closed.
/// Either way the application did not read the whole request, so it cannot have
/// acted on it, and any method may go to another backend. This is the keep-alive race:
/// the backend closes an idle connection (a deploy draining, its idle timer) just as
/// we reuse it.
///
/// Anything read from the backend since the request began (a 1xx, say) also rules it
/// out: the backend had seen the request head.
///
/// Other closes prove nothing and are not treated as unread: a bare FIN (the
/// application may have read the request, then died), a reset without a FIN (a
/// server that read the request may abort with `SO_LINGER` 0), and a FIN that did not
/// acknowledge the request (a half-closed server can still read it).
struct UpIo {
    stream: TcpStream,
    /// Bytes written since the backend last sent any.
    unanswered: bool,
    state: Arc<AtomicU8>,
    /// Waiting for the reset that may follow a FIN (it comes up to a round trip later).
    reset_wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The longest wait for a reset after a FIN that cut off a request in flight. The wait
/// is two smoothed round trips plus a millisecond, and happens only on that failure.
const MAX_RESET_WAIT: Duration = Duration::from_millis(100);

impl UpIo {
    fn new(stream: TcpStream, state: Arc<AtomicU8>) -> UpIo {
        UpIo {
            stream,
            unanswered: false,
            state,
            reset_wait: None,
        }
    }

    /// Whether the peer reset the connection after its FIN (`SO_ERROR` is `EPIPE`
    /// for a reset received in CLOSE_WAIT). Reading clears the error.
    fn reset_after_fin(&self) -> bool {
        matches!(self.stream.take_error(), Ok(Some(e)) if e.raw_os_error() == Some(libc::EPIPE))
    }

    /// The EOF that cut off a request is held back until a reset arrives or the wait
    /// ends; then the verdict is recorded and EOF goes on to hyper.
    fn poll_reset_wait(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut reset = self.reset_after_fin();
        if !reset {
            if let Some(wait) = self.reset_wait.as_mut() {
                std::task::ready!(wait.as_mut().poll(cx));
            }
            reset = self.reset_after_fin();
        }
        self.reset_wait = None;
        self.unanswered = false;
        if reset && self.state.load(Ordering::Relaxed) == UNHEARD {
            self.state.store(UNREAD, Ordering::Relaxed);
        }
        Poll::Ready(())
    }
}

impl Read for UpIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.reset_wait.is_some() {
            std::task::ready!(this.poll_reset_wait(cx));
            return Poll::Ready(Ok(()));
        }
        let n = std::task::ready!(crate::netio::poll_read_into(&mut this.stream, cx, buf))?;
        if n > 0 {
            this.unanswered = false;
            this.state.store(HEARD, Ordering::Relaxed);
        } else if this.unanswered {
            // EOF with a request in flight: the reset, if any, comes within a round trip
            // (at once on loopback).
            let rtt = crate::netio::smoothed_rtt(&this.stream).unwrap_or_default();
            let wait = (rtt * 2 + Duration::from_millis(1)).min(MAX_RESET_WAIT);
            this.reset_wait = Some(Box::pin(tokio::time::sleep(wait)));
            std::task::ready!(this.poll_reset_wait(cx));
        }
        Poll::Ready(Ok(()))
    }
}

impl Write for UpIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = std::task::ready!(Pin::new(&mut this.stream).poll_write(cx, buf))?;
        this.unanswered |= n > 0;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = std::task::ready!(Pin::new(&mut this.stream).poll_write_vectored(cx, bufs))?;
        this.unanswered |= n > 0;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

struct Idle {
    tx: Sender,
    expires: Instant,
}

/// One worker's idle upstream connections, keyed by backend id.
#[derive(Default)]
pub struct ConnPool {
    idle: RefCell<HashMap<u64, Vec<Idle>>>,
}

impl ConnPool {
    pub fn new() -> Rc<ConnPool> {
        Rc::new(ConnPool::default())
    }

    /// The most recently used ready connection to `backend`, if any (LIFO keeps the
    /// warmest connections busy and lets the rest expire). Dead and expired entries
    /// are dropped; one that is alive but not ready yet (its connection task has not
    /// yet seen the end of the last response) stays for a later request.
    pub fn checkout(&self, backend: u64) -> Option<Sender> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&backend)?;
        let now = Instant::now();
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let c = &list[i];
            if c.expires <= now || c.tx.is_closed() {
                list.remove(i);
            } else if c.tx.is_ready() {
                return Some(list.remove(i).tx);
            }
        }
        None
    }

    fn checkin(&self, backend: u64, tx: Sender, idle_timeout: Duration, max_idle: usize) {
        if max_idle == 0 || tx.is_closed() {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(backend).or_default();
        if list.len() >= max_idle {
            // Drop the oldest; the newest is the one most likely to stay open.
            list.remove(0);
        }
        list.push(Idle {
            tx,
            expires: Instant::now() + idle_timeout,
        });
    }

    /// Closes expired and dead connections; run periodically so idle sockets to
    /// backends do not linger past `idle_timeout`. Returns whether any were closed.
    pub fn sweep(&self) -> bool {
        let now = Instant::now();
        let mut idle = self.idle.borrow_mut();
        let mut closed = false;
        idle.retain(|_, list| {
            let before = list.len();
            list.retain(|c| c.expires > now && !c.tx.is_closed());
            closed |= list.len() < before;
            !list.is_empty()
        });
        closed
    }

    /// Drops every idle connection (shutdown).
    pub fn clear(&self) {
        self.idle.borrow_mut().clear();
    }
}

/// A connection lent to one request; `reuse()` returns it to the pool.
pub struct Release {
    pub pool: Rc<ConnPool>,
    pub backend: u64,
    pub tx: Sender,
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

impl Release {
    /// Returns the connection to the pool. It may not be ready yet (the connection task
    /// runs after us); `checkout` only hands out ready ones, so no task is spawned and
    /// no connection is thrown away for being a moment early.
    pub fn reuse(self) {
        if !self.tx.is_closed() {
            self.pool
                .checkin(self.backend, self.tx, self.idle_timeout, self.max_idle);
        }
    }
}

/// Opens a connection to `addr` and spawns its driver on the worker's runtime.
/// `slot` is the pool's connection breaker slot, held for the connection's life.
pub async fn connect(addr: SocketAddr, timeout: Duration, slot: crate::breaker::Slot) -> Result<Sender, ProxyError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(ProxyError::ConnectTimeout { backend: addr }),
        Ok(Err(e)) => {
            return Err(ProxyError::Connect {
                backend: addr,
                source: e,
            })
        }
        Ok(Ok(s)) => s,
    };
    // Small requests and responses must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    // Shared with the connection task (an `Arc`: hyper needs `Send` I/O for upgrades).
    let state = Arc::new(AtomicU8::new(HEARD));
    let io = UpIo::new(stream, state.clone());
    let (tx, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| ProxyError::UpstreamClosed {
            backend: addr,
            source: e,
        })?;
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(backend = %addr, error = %e, "upstream connection ended with error");
        }
        drop(slot);
    });
    metrics::counter!(crate::metrics::UPSTREAM_CONNECTS).increment(1);
    Ok(Sender { tx, state })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const REQUEST: &[u8] = b"POST /order HTTP/1.1\r\nhost: a\r\ncontent-length: 7\r\n\r\norder=1";

    async fn pair() -> (UpIo, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let io = UpIo::new(client, Arc::new(AtomicU8::new(HEARD)));
        (io, server)
    }

    /// Writes a whole request, as `Sender::begin_request` then hyper would.
    async fn send(io: &mut UpIo, bytes: &[u8]) {
        io.state.store(UNHEARD, Ordering::Relaxed);
        write(io, bytes).await;
    }

    /// The backend reads exactly `bytes.len()` bytes (the request it was sent).
    async fn backend_reads(server: &mut TcpStream, bytes: &[u8]) {
        let mut got = vec![0u8; bytes.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, bytes);
    }

    /// One whole exchange, as on a pooled keep-alive connection before the test.
    async fn exchange(io: &mut UpIo, server: &mut TcpStream) {
        send(io, REQUEST).await;
        backend_reads(server, REQUEST).await;
        server
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        assert!(read(io).await > 0);
    }

    /// Lets the packets of the last step cross loopback.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    fn unread(io: &UpIo) -> bool {
        io.state.load(Ordering::Relaxed) == UNREAD
    }

    async fn write(io: &mut UpIo, bytes: &[u8]) {
        let n = poll_fn(|cx| Pin::new(&mut *io).poll_write(cx, bytes)).await.unwrap();
        assert_eq!(n, bytes.len());
    }

    /// Reads once; returns how many bytes arrived (0: the backend closed).
    async fn read(io: &mut UpIo) -> usize {
        let mut storage = [std::mem::MaybeUninit::<u8>::uninit(); 256];
        let mut buf = hyper::rt::ReadBuf::uninit(&mut storage);
        poll_fn(|cx| Pin::new(&mut *io).poll_read(cx, buf.unfilled()))
            .await
            .unwrap();
        buf.filled().len()
    }

    #[tokio::test]
    async fn a_request_written_after_the_backend_closed_the_idle_connection_is_unread() {
        let (mut io, mut server) = pair().await;
        exchange(&mut io, &mut server).await;
        // The backend closes the idle connection; the next request crosses its FIN.
        drop(server);
        settle().await;
        send(&mut io, REQUEST).await;
        settle().await;
        assert_eq!(read(&mut io).await, 0, "EOF");
        assert!(unread(&io), "FIN then reset: never read");
    }

    #[tokio::test]
    async fn a_request_the_backend_read_before_closing_is_not_unread() {
        let (mut io, mut server) = pair().await;
        send(&mut io, REQUEST).await;
        backend_reads(&mut server, REQUEST).await;
        // The application has the request and dies without answering.
        drop(server);
        settle().await;
        assert_eq!(read(&mut io).await, 0, "EOF");
        assert!(!unread(&io), "the backend may have acted on it");
    }

    #[tokio::test]
    async fn a_request_a_draining_backend_left_unread_is_unread() {
        let (mut io, mut server) = pair().await;
        // A draining server half-closes an idle connection (FIN), the request arrives
        // and is acknowledged by its kernel, and the server closes without reading it.
        server.shutdown().await.unwrap();
        settle().await;
        send(&mut io, REQUEST).await;
        settle().await;
        drop(server);
        settle().await;
        assert_eq!(read(&mut io).await, 0, "EOF");
        assert!(unread(&io), "FIN then reset: never read");
    }

    #[tokio::test]
    async fn a_request_a_half_closed_backend_read_is_not_unread() {
        let (mut io, mut server) = pair().await;
        // The FIN comes before the request, but the server still reads it: it may act.
        server.shutdown().await.unwrap();
        settle().await;
        send(&mut io, REQUEST).await;
        backend_reads(&mut server, REQUEST).await;
        drop(server);
        settle().await;
        assert_eq!(read(&mut io).await, 0, "EOF");
        assert!(!unread(&io), "the backend read the request");
    }

    #[tokio::test]
    async fn a_request_the_backend_answered_with_a_1xx_is_not_unread() {
        let (mut io, mut server) = pair().await;
        let head = &REQUEST[..REQUEST.len() - 7];
        send(&mut io, head).await;
        backend_reads(&mut server, head).await;
        server
            .write_all(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n")
            .await
            .unwrap();
        assert!(read(&mut io).await > 0, "the 103");
        // The body follows the 1xx; the backend closes with it unread (FIN, reset).
        server.shutdown().await.unwrap();
        settle().await;
        write(&mut io, b"order=1").await;
        settle().await;
        drop(server);
        settle().await;
        assert_eq!(read(&mut io).await, 0, "EOF");
        assert!(!unread(&io), "the backend answered 103: it had seen the request head");
    }

    #[tokio::test]
    async fn an_idle_connection_closing_is_not_a_lost_request() {
        let (mut io, mut server) = pair().await;
        exchange(&mut io, &mut server).await;
        drop(server);
        assert_eq!(read(&mut io).await, 0, "EOF");
        assert!(!unread(&io), "nothing was in flight");
    }
}
