//! Backend connections: connecting with a timeout, sending one HTTP/1.1 request and
//! reading its response head (`Conn::send`), streaming the response body
//! (`UpBody`), and each worker's own pool of idle keep-alive connections. The pool
//! is worker-local (`Rc<RefCell<…>>` on a current-thread runtime), so checkout and
//! checkin take no lock and wake no other thread.
//!
//! A connection is driven by the request task that uses it: no connection task, no
//! channel, no wake-up of another task per request. The wire format lives in `codec`.
//!
//! `Conn::send` also notices when the backend closed the connection with the request
//! in flight unread (the keep-alive race: the backend closes an idle connection just as
//! we reuse it). Such a request never reached the application, so `forward` may send
//! it to another backend whatever its method.
//!
//! This module does not decide which backend to use (`balancer`), nor whether to retry
//! (`proxy`/`retry`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

use rustls::pki_types::ServerName;

use crate::backend_tls::BackendTls;
use crate::body::{ReqBody, StreamBody};
use crate::breaker::Slot;
use crate::codec::{self, Chunked, Decoded, Framing, Head, ReqFraming, UpHead};
use crate::error::ProxyError;
use crate::netio::{self, Stall, UpIo};

/// Reads ask for at least this much free buffer, and grow it by `READ_CHUNK`.
const MIN_READ: usize = 1024;
const READ_CHUNK: usize = 8 * 1024;
/// Reads of a long body grow the buffer up to this much at once.
const MAX_READ: usize = 64 * 1024;

/// The longest wait for a reset after a FIN that cut off a request in flight (two
/// smoothed round trips plus a millisecond), and for the probe that asks whether a
/// backend that reset one has exited. Both happen only on those failures.
const MAX_RESET_WAIT: Duration = Duration::from_millis(100);
/// How long, beyond two round trips, the exit probe gives a dying process's kernel
/// to close its listener after it reset our connection. Closing sockets takes the
/// kernel microseconds each; a process with thousands open takes milliseconds.
const EXIT_WAIT: Duration = Duration::from_millis(10);

/// One HTTP/1.1 connection to a backend. Boxed once when opened (`connect`), so
/// that the pool, the request and the response body move a pointer, not the struct.
pub struct Conn {
    stream: UpIo,
    /// Bytes read and not yet consumed.
    buf: BytesMut,
    /// The request head being written, and response field positions (both kept for
    /// their capacity).
    head: Vec<u8>,
    spans: Vec<codec::Span>,
    addr: SocketAddr,
    /// The pool's connection breaker slot, held for the connection's life.
    _slot: Option<Slot>,
    /// The wait for more of a response body (`read_timeout`), set per response.
    /// Here rather than in `UpBody`, which every response carries by value.
    body_stall: Stall,
    /// Responses it may still carry before it closes (`max_requests_per_connection`).
    /// Here rather than in `Home`, which is kept small.
    uses_left: u32,
    /// When it stops being reused (`max_connection_duration`).
    retire_at: Option<Instant>,
}

/// One try's request: the head every try of the request shares, and this try's body
/// (buffered bytes are shared too; a streamed body belongs to one try).
#[derive(Debug)]
pub struct UpRequest {
    pub head: Rc<UpHead>,
    pub body: ReqBody,
}

/// Why a send failed, as the retry logic needs to know it.
#[derive(Debug)]
pub enum SendError {
    /// Not a byte of the request was written: it may go anywhere, any method.
    Unsent(ProxyError),
    /// Failed once the request was (partly) written.
    Failed(ProxyError),
    /// Written, then the connection ended before a byte of response came back
    /// (closed, reset, or `NotReceived`): on a pooled connection, the keep-alive race.
    Unanswered(ProxyError),
    /// The client's request body failed: not the backend's fault, no retry.
    Fatal(ProxyError),
}

impl Conn {
    /// `uses`: the responses it may carry before it closes; `max_age`: how long it
    /// may be reused.
    fn new(stream: UpIo, addr: SocketAddr, slot: Option<Slot>, uses: u32, max_age: Option<Duration>) -> Conn {
        Conn {
            stream,
            buf: BytesMut::new(),
            head: Vec::new(),
            spans: Vec::new(),
            addr,
            _slot: slot,
            body_stall: Stall::new(Duration::MAX),
            uses_left: uses,
            retire_at: max_age.and_then(|d| crate::clock::now().checked_add(d)),
        }
    }

    /// Whether an idle connection can take a request: the backend has neither closed
    /// it nor sent anything unasked. tokio keeps the socket's readiness as epoll
    /// reported it, so this costs no system call unless the socket looks readable.
    fn is_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match &mut self.stream {
            UpIo::Plain(tcp) => match tcp.poll_read_ready(&mut cx) {
                Poll::Pending => true,
                Poll::Ready(Err(_)) => false,
                // Readiness can be left over from the last read; only a read tells.
                Poll::Ready(Ok(())) => {
                    let mut probe = [0u8; 1];
                    matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
                }
            },
            // rustls may hold what the socket no longer shows (a `close_notify`, bytes
            // after the response), and reads for itself what the socket does show: a
            // session ticket or key update is not an answer, and leaves it usable.
            UpIo::Tls(tls) => {
                let mut byte = [0u8; 1];
                let mut probe = tokio::io::ReadBuf::new(&mut byte);
                Pin::new(&mut **tls).poll_read(&mut cx, &mut probe).is_pending()
            }
        }
    }

    /// Sends `req` and reads the response head, skipping interim (1xx) responses other
    /// than 101. The request is only borrowed: when nothing of it was written
    /// (`SendError::Unsent`) the caller still has it whole.
    ///
    /// A streamed body (`ReqBody::Stream`) carries the per-try timeout, which then
    /// bounds each wait for the backend to take body bytes and, once the body is
    /// sent, the wait for the response head (as nginx's `proxy_send_timeout` and
    /// `proxy_read_timeout`; Envoy's route timeout also starts at the end of the
    /// request). An upload takes what the client takes, and a client that stalls it
    /// hits `client_body_timeout`, a 408, rather than the backend's 504. Otherwise
    /// the caller's deadline bounds the whole exchange.
    pub async fn send(&mut self, req: &mut UpRequest) -> Result<Head, SendError> {
        let framing = match &req.body {
            ReqBody::Buffered(Some(b)) if !b.is_empty() => ReqFraming::Length(b.len() as u64),
            ReqBody::Stream(s)
                if !s.is_end_stream() && !req.head.headers.contains_key(http::header::CONTENT_LENGTH) =>
            {
                ReqFraming::Chunked
            }
            _ => ReqFraming::AsIs,
        };
        codec::encode_request_head(&mut self.head, &req.head, framing, self.addr);
        let head = std::mem::take(&mut self.head);
        let written = match &req.body {
            ReqBody::Buffered(Some(b)) => self.write_all(&mut [IoSlice::new(&head), IoSlice::new(b)]).await,
            _ => self.write_all(&mut [IoSlice::new(&head)]).await,
        };
        self.head = head;
        // The backend answering before it has the whole request (a 413, say) is read
        // like any answer; the connection is not reused after it.
        let mut write_failed = None;
        match written {
            Ok(()) => {}
            Err((WriteStop::Failed(e), any)) => {
                let err = self.closed(e);
                return Err(if any {
                    SendError::Failed(err)
                } else {
                    SendError::Unsent(err)
                });
            }
            Err((stop @ WriteStop::Answered, _)) => write_failed = Some(stop.into_error()),
        }
        if let (ReqBody::Stream(body), None) = (&mut req.body, &write_failed) {
            // Boxed: its timers are a streamed body's cost, not every request's.
            match Box::pin(self.write_body(body, framing)).await {
                Ok(()) => {}
                Err(BodyWrite::Client(e)) => return Err(SendError::Fatal(e)),
                Err(BodyWrite::Backend(stop)) => write_failed = Some(stop.into_error()),
                Err(BodyWrite::Stalled) => return Err(SendError::Failed(self.timed_out())),
            }
        }
        let head_request = req.head.method == http::Method::HEAD;
        let (raw_ok, upgrade) = (req.head.raw_response, req.head.added.upgrade);
        // One call site, so that the read stays inlined into the try's future, and the
        // timer boxed, so that a request without one carries only an empty pointer.
        let timer = match &req.body {
            ReqBody::Stream(b) => Some(Box::pin(tokio::time::sleep(b.try_timeout()))),
            ReqBody::Buffered(_) => None,
        };
        let read = Bounded {
            timer,
            f: self.read_head(head_request, raw_ok, upgrade),
        };
        let read = match read.await {
            Some(r) => r,
            None => Err(SendError::Failed(self.timed_out())),
        };
        match (read, write_failed) {
            (Ok(mut head), failed) => {
                head.keep_alive &= failed.is_none();
                Ok(head)
            }
            (Err(e), None) => Err(e),
            (Err(SendError::Unanswered(e)), Some(_)) if e.never_read() => Err(SendError::Unanswered(e)),
            (Err(_), Some(e)) => Err(SendError::Failed(self.closed(e))),
        }
    }

    fn timed_out(&self) -> ProxyError {
        ProxyError::ResponseTimeout { backend: self.addr }
    }

    fn closed(&self, source: io::Error) -> ProxyError {
        ProxyError::UpstreamClosed {
            backend: self.addr,
            source,
        }
    }

    /// Writes every byte of `bufs`; on failure also says whether any were written.
    /// While the backend is not taking bytes, it watches for an early answer: a
    /// backend that rejects a request without reading its body would otherwise leave
    /// us blocked on a full socket until the timeout.
    async fn write_all(&mut self, mut bufs: &mut [IoSlice<'_>]) -> Result<(), (WriteStop, bool)> {
        let mut any = false;
        std::future::poll_fn(|cx| loop {
            // Each kind of stream by its own type: the plain one's writes then compile
            // as they did before TLS, with no dispatch in between.
            let wrote = match (&mut self.stream, bufs.is_empty()) {
                (UpIo::Plain(_), true) => return Poll::Ready(Ok(())),
                (UpIo::Plain(s), false) => netio::poll_write_gather(s, cx, bufs),
                // Records rustls still holds.
                (UpIo::Tls(s), true) => match Pin::new(&mut **s).poll_flush(cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Ok(())),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                },
                (UpIo::Tls(s), false) => netio::poll_write_gather(&mut **s, cx, bufs),
            };
            match wrote {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err((WriteStop::Failed(io::ErrorKind::WriteZero.into()), any)))
                }
                Poll::Ready(Ok(n)) => {
                    any = true;
                    IoSlice::advance_slices(&mut bufs, n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err((WriteStop::Failed(e), any))),
                Poll::Pending => return self.poll_answered(cx).map(|()| Err((WriteStop::Answered, any))),
            }
        })
        .await
    }

    /// While a write waits on the backend: whether it has sent something or closed.
    fn poll_answered(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &self.stream {
            UpIo::Plain(s) => {
                // A peek, not the readiness flag alone: that can be left over from
                // the last response.
                let mut byte = [0u8; 1];
                let mut peek = tokio::io::ReadBuf::new(&mut byte);
                s.poll_peek(cx, &mut peek).map(|_| ())
            }
            // Only rustls can tell a response from the session tickets a TLS 1.3
            // server sends after the handshake, so this reads; what it reads stays
            // in `buf` for `read_head`.
            UpIo::Tls(_) => self.poll_fill(cx, 0).map(|_| ()),
        }
    }

    /// The backend may take no bytes for the body's `try_timeout` while some wait.
    async fn write_body(&mut self, body: &mut StreamBody, framing: ReqFraming) -> Result<(), BodyWrite> {
        let stall = body.try_timeout();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyWrite::Client(e.into_proxy_error()))?;
            // Trailers are dropped (HTTP/1.1 backends rarely accept them).
            let Ok(data) = frame.into_data() else { continue };
            if data.is_empty() {
                continue;
            }
            let (size, n) = codec::chunk_header(data.len());
            let mut chunked = [IoSlice::new(&size[..n]), IoSlice::new(&data), IoSlice::new(b"\r\n")];
            let mut plain = [IoSlice::new(&data)];
            let bufs: &mut [IoSlice<'_>] = match framing {
                ReqFraming::Chunked => &mut chunked,
                _ => &mut plain,
            };
            match tokio::time::timeout(stall, self.write_all(bufs)).await {
                Ok(r) => r.map_err(|(e, _)| BodyWrite::Backend(e))?,
                Err(_) => return Err(BodyWrite::Stalled),
            }
        }
        if framing == ReqFraming::Chunked {
            self.write_all(&mut [IoSlice::new(b"0\r\n\r\n")])
                .await
                .map_err(|(e, _)| BodyWrite::Backend(e))?;
        }
        Ok(())
    }

    async fn read_head(&mut self, head_request: bool, raw_ok: bool, upgrade: bool) -> Result<Head, SendError> {
        // Anything heard from the backend since the request began: it saw the request.
        let mut heard = !self.buf.is_empty();
        loop {
            match codec::parse_response(&mut self.buf, head_request, raw_ok, &mut self.spans) {
                Err(reason) => {
                    return Err(SendError::Failed(ProxyError::BadResponse {
                        backend: self.addr,
                        reason,
                    }))
                }
                // 100 Continue, 103 Early Hints: the final answer follows.
                Ok(Some(h)) if h.status.is_informational() && h.status != StatusCode::SWITCHING_PROTOCOLS => {}
                // A switch the request did not ask for (RFC 9110 §15.2.2): passed on,
                // the client would get a 101 it cannot act on and a closed connection.
                Ok(Some(h)) if h.status == StatusCode::SWITCHING_PROTOCOLS && !upgrade => {
                    return Err(SendError::Failed(ProxyError::BadResponse {
                        backend: self.addr,
                        reason: "101 Switching Protocols to a request that asked for no upgrade",
                    }))
                }
                Ok(Some(h)) => return Ok(h),
                Ok(None) => match std::future::poll_fn(|cx| self.poll_fill(cx, 0)).await {
                    Ok(0) if !heard && self.closed_unread().await => {
                        return Err(SendError::Unanswered(ProxyError::NotReceived { backend: self.addr }))
                    }
                    Ok(0) => {
                        let err = self.closed(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed before a complete response head",
                        ));
                        return Err(if heard {
                            SendError::Failed(err)
                        } else {
                            SendError::Unanswered(err)
                        });
                    }
                    Ok(_) => heard = true,
                    Err(e) if !heard && e.kind() == io::ErrorKind::ConnectionReset && self.exited().await => {
                        return Err(SendError::Unanswered(ProxyError::ExitedUnread { backend: self.addr }))
                    }
                    Err(e) if heard => return Err(SendError::Failed(self.closed(e))),
                    Err(e) => return Err(SendError::Unanswered(self.closed(e))),
                },
            }
        }
    }

    /// The backend closed with our request in flight and nothing sent back. Did it
    /// reset after its FIN? A socket resets after its FIN only when bytes reached it
    /// after it was closed, or were still unread when it closed: either way the
    /// application did not read the whole request, so it cannot have acted on it.
    ///
    /// Other closes prove nothing and are not treated as unread: a bare FIN (the
    /// application may have read the request, then died), a reset without a FIN (a
    /// server that read the request may abort with `SO_LINGER` 0), and a FIN that did
    /// not acknowledge the request (a half-closed server can still read it).
    ///
    /// The reset can trail the FIN by a round trip, so this waits up to two smoothed
    /// round trips plus a millisecond for it (only on this failure path).
    async fn closed_unread(&self) -> bool {
        if self.reset_after_fin() {
            return true;
        }
        tokio::time::sleep(self.failure_wait(Duration::from_millis(1))).await;
        self.reset_after_fin()
    }

    /// The backend reset the connection, without a FIN, with our request in flight and
    /// nothing sent back. A socket closes that way in two cases: it still held unread
    /// bytes when its process closed it (or exited), or the application chose an
    /// abortive close (`SO_LINGER` 0), perhaps after reading the request. Is its
    /// listener gone? Then the process that owned the connection has exited: a process
    /// exits without aborting on purpose, so its kernel reset the connection for the
    /// unread request (a process that read the whole request and then died would have
    /// sent a FIN). A backend still accepting proves nothing, and neither does a
    /// connect that hangs: both are treated as "may have been read".
    ///
    /// The probe is one connect, only on this failure path. A refusal says the
    /// listener is closed. But an exiting process's sockets are released in no set
    /// order (on Linux, last opened first), so the listener may close a moment after
    /// the connection. A closing listener resets every connection still queued on it,
    /// so a probe reset while connecting, or soon after, says the same. A live server
    /// accepts the probe and waits for a request; the probe is then closed unused.
    async fn exited(&self) -> bool {
        let wait = self.failure_wait(EXIT_WAIT);
        let probe = async {
            let reset = |e: &io::Error| e.kind() == io::ErrorKind::ConnectionReset;
            match TcpStream::connect(self.addr).await {
                // Refused: no listener. Reset: the handshake reached a listener that
                // closed before accepting it.
                Err(e) => e.kind() == io::ErrorKind::ConnectionRefused || reset(&e),
                Ok(probe) => {
                    let mut byte = [0u8; 1];
                    matches!(probe.peek(&mut byte).await, Err(e) if reset(&e))
                }
            }
        };
        tokio::time::timeout(wait, probe).await.unwrap_or(false)
    }

    /// How long a failure path waits to hear more from the backend's kernel: two
    /// smoothed round trips plus `extra`, at most `MAX_RESET_WAIT`.
    fn failure_wait(&self, extra: Duration) -> Duration {
        let rtt = netio::smoothed_rtt(self.stream.tcp()).unwrap_or_default();
        (rtt * 2 + extra).min(MAX_RESET_WAIT)
    }

    /// `SO_ERROR` is `EPIPE` for a reset received in CLOSE_WAIT. Reading clears it.
    fn reset_after_fin(&self) -> bool {
        matches!(self.stream.tcp().take_error(), Ok(Some(e)) if e.raw_os_error() == Some(libc::EPIPE))
    }

    /// Makes room for a read: at least `MIN_READ` bytes, more for a long body.
    fn reserve(&mut self, want: u64) {
        if self.buf.capacity() - self.buf.len() < MIN_READ {
            self.buf
                .reserve(want.clamp(READ_CHUNK as u64, MAX_READ as u64) as usize);
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, want: u64) -> Poll<io::Result<usize>> {
        self.reserve(want);
        // `read_buf` keeps no state between polls, so a fresh one per poll is fine.
        // The plain socket by its own type, as in `write_all`; TLS through `UpIo`,
        // which reads an EOF without `close_notify` as an EOF.
        if let UpIo::Plain(s) = &mut self.stream {
            return pin!(s.read_buf(&mut self.buf)).poll(cx);
        }
        pin!(self.stream.read_buf(&mut self.buf)).poll(cx)
    }

    /// The connection and any bytes that followed a 101 response, for the tunnel.
    pub fn into_upgraded(self) -> (UpIo, Bytes) {
        (self.stream, self.buf.freeze())
    }
}

pin_project_lite::pin_project! {
    /// `f`, or `None` once `timer` (when there is one) fires first.
    struct Bounded<F> {
        #[pin]
        f: F,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<F: Future> Future for Bounded<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.f.poll(cx) {
            return Poll::Ready(Some(v));
        }
        match this.timer {
            Some(t) => t.as_mut().poll(cx).map(|()| None),
            None => Poll::Pending,
        }
    }
}

enum BodyWrite {
    Client(ProxyError),
    Backend(WriteStop),
    /// The backend took no bytes for the per-try timeout.
    Stalled,
}

/// Why a write to the backend stopped short.
enum WriteStop {
    Failed(io::Error),
    /// The backend sent something (or closed) while not reading the request.
    Answered,
}

impl WriteStop {
    fn into_error(self) -> io::Error {
        match self {
            WriteStop::Failed(e) => e,
            WriteStop::Answered => io::Error::other("the backend answered or closed before taking the whole request"),
        }
    }
}

/// Where a response body's connection goes when the body is done. Compact (24
/// bytes): it is part of every response body, which is moved several times per
/// request, and a larger body turned those moves into `memcpy` calls.
pub struct Home {
    pub pool: Rc<ConnPool>,
    pub backend: u64,
    pub idle_timeout_ms: u32,
    pub max_idle: u32,
}

impl Home {
    pub fn new(pool: Rc<ConnPool>, backend: u64, idle_timeout: Duration, max_idle: usize) -> Home {
        Home {
            pool,
            backend,
            idle_timeout_ms: idle_timeout.as_millis().min(u32::MAX as u128) as u32,
            max_idle: max_idle.min(u32::MAX as usize) as u32,
        }
    }
}

/// A backend response body, read straight off its connection. Read to the end, it
/// returns the connection to the pool (when the response allows reuse); dropped
/// half-read, the connection closes.
pub struct UpBody {
    conn: Option<Box<Conn>>,
    state: BodyState,
    keep_alive: bool,
    home: Home,
    /// Once the body streams to the client: its end or failure goes to outlier
    /// detection. (While `forward` reads a retry buffer, it judges the outcome.)
    tracked: Option<crate::state::InFlight>,
}

enum BodyState {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

impl UpBody {
    /// `read_timeout` bounds each wait for more of the body (nginx's
    /// `proxy_read_timeout` between reads); a backend that stalls longer fails it.
    pub fn new(mut conn: Box<Conn>, framing: Framing, keep_alive: bool, home: Home, read_timeout: Duration) -> UpBody {
        conn.body_stall.set_limit(read_timeout);
        UpBody {
            conn: Some(conn),
            state: match framing {
                Framing::Empty => BodyState::Length(0),
                Framing::Length(n) => BodyState::Length(n),
                Framing::Chunked => BodyState::Chunked(Chunked::default()),
                Framing::UntilClose => BodyState::UntilClose,
            },
            keep_alive,
            home,
            tracked: None,
        }
    }

    /// Hands the request's guard to the body, to report how the body ends.
    pub fn track(&mut self, in_flight: crate::state::InFlight) {
        self.tracked = Some(in_flight);
    }

    fn finish(&mut self) {
        if let Some(t) = self.tracked.take() {
            t.succeeded();
        }
        if let Some(mut conn) = self.conn.take() {
            conn.uses_left = conn.uses_left.saturating_sub(1);
            // Bytes past the end of the response were never asked for: the
            // connection's state is unknown, so it closes.
            if self.keep_alive && conn.buf.is_empty() && conn.uses_left > 0 {
                if conn.buf.capacity() > 2 * READ_CHUNK {
                    // Do not keep a long body's buffer for an idle connection.
                    conn.buf = BytesMut::new();
                }
                let h = &self.home;
                h.pool.checkin(
                    h.backend,
                    conn,
                    Duration::from_millis(h.idle_timeout_ms as u64),
                    h.max_idle as usize,
                );
            }
        }
    }

    /// The framing says the body is complete (a chunked body only once its last chunk
    /// and trailers were read).
    fn at_end(&self) -> bool {
        matches!(self.state, BodyState::Length(0) | BodyState::Chunked(Chunked::Done))
    }

    fn fail(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.conn = None;
        if let Some(t) = self.tracked.take() {
            t.body_failed(&e);
        }
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let step = match &mut this.state {
                BodyState::Length(0) => Ok(Decoded::End),
                BodyState::Length(_) | BodyState::UntilClose if conn.buf.is_empty() => Ok(Decoded::NeedMore),
                BodyState::Length(left) => {
                    let n = (*left).min(conn.buf.len() as u64);
                    *left -= n;
                    Ok(Decoded::Data(conn.buf.split_to(n as usize).freeze()))
                }
                BodyState::UntilClose => Ok(Decoded::Data(conn.buf.split().freeze())),
                BodyState::Chunked(c) => c.decode(&mut conn.buf),
            };
            match step {
                Ok(Decoded::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Err(reason) => return this.fail(io::Error::new(io::ErrorKind::InvalidData, reason)),
                Ok(Decoded::NeedMore) => {
                    let want = match this.state {
                        BodyState::Length(left) => left,
                        _ => 0,
                    };
                    let filled = conn.poll_fill(cx, want);
                    match std::task::ready!(conn.body_stall.watch(cx, filled)) {
                        Ok(0) if matches!(this.state, BodyState::UntilClose) => {
                            this.conn = None;
                            if let Some(t) = this.tracked.take() {
                                t.succeeded();
                            }
                            return Poll::Ready(None);
                        }
                        Ok(0) => {
                            return this.fail(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "backend closed the connection mid-body",
                            ))
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                            let limit = conn.body_stall.limit();
                            return this.fail(stalled_body(limit));
                        }
                        Err(e) => return this.fail(e),
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.at_end()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.conn, &self.state) {
            (None, _) => SizeHint::with_exact(0),
            (Some(_), BodyState::Length(n)) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}

/// A backend that sent no more of a response body for `read_timeout`.
#[cold]
pub fn stalled_body(limit: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("the backend sent no more of the response body for {limit:?} (read_timeout)"),
    )
}

impl Drop for UpBody {
    fn drop(&mut self) {
        // hyper may stop polling once `is_end_stream` is true, so a fully read body is
        // also released here. A body dropped half-read leaves the connection in an
        // unknown state: it closes.
        if self.at_end() {
            self.finish();
        }
    }
}

struct Idle {
    conn: Box<Conn>,
    expires: Instant,
}

/// One worker's idle upstream connections, keyed by backend id. The ids are
/// rampart's own, so a fixed fast hasher is safe (std's SipHash cost ~160
/// instructions a request over checkout and checkin).
#[derive(Default)]
pub struct ConnPool {
    idle: RefCell<HashMap<u64, Vec<Idle>, foldhash::fast::FixedState>>,
}

impl ConnPool {
    pub fn new() -> Rc<ConnPool> {
        Rc::new(ConnPool::default())
    }

    /// The most recently used usable connection to `backend`, if any (LIFO keeps the
    /// warmest connections busy and lets the rest expire). Expired and closed ones met
    /// on the way are dropped.
    pub fn checkout(&self, backend: u64) -> Option<Box<Conn>> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&backend)?;
        let now = crate::clock::now();
        while let Some(mut c) = list.pop() {
            if c.expires > now && c.conn.is_usable() {
                return Some(c.conn);
            }
        }
        None
    }

    fn checkin(&self, backend: u64, conn: Box<Conn>, idle_timeout: Duration, max_idle: usize) {
        if max_idle == 0 {
            return;
        }
        // Past `max_connection_duration` a connection closes; nearer it than
        // `idle_timeout`, it expires then.
        let now = crate::clock::now();
        let expires = match conn.retire_at {
            Some(at) if at <= now => return,
            Some(at) => at.min(now + idle_timeout),
            None => now + idle_timeout,
        };
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(backend).or_default();
        if list.len() >= max_idle {
            // Drop the oldest; the newest is the one most likely to stay open.
            list.remove(0);
        }
        list.push(Idle { conn, expires });
    }

    /// Closes expired connections and those the backend closed; run periodically so
    /// idle sockets to backends do not linger past `idle_timeout`.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.idle.borrow_mut().retain(|_, list| {
            list.retain_mut(|c| c.expires > now && c.conn.is_usable());
            !list.is_empty()
        });
    }

    /// Drops every idle connection (shutdown).
    pub fn clear(&self) {
        self.idle.borrow_mut().clear();
    }
}

/// Opens a connection to `addr`, with TLS for a pool that has it
/// (`backend_tls::connect`). `slot` is the pool's connection breaker slot, held for
/// the connection's life.
/// `max_requests`: the responses it may carry before it closes; `max_age`: how long
/// it may be reused (from when it opened).
pub async fn connect(
    addr: SocketAddr,
    tls: Option<(&BackendTls, &ServerName<'static>)>,
    timeout: Duration,
    slot: Slot,
    max_requests: u32,
    max_age: Option<Duration>,
) -> Result<Box<Conn>, ProxyError> {
    let stream = crate::backend_tls::connect(addr, tls, timeout).await?;
    metrics::counter!(crate::metrics::UPSTREAM_CONNECTS).increment(1);
    Ok(Box::new(Conn::new(stream, addr, Some(slot), max_requests, max_age)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const HEAD: &[u8] = b"POST /order HTTP/1.1\r\nhost: a\r\ncontent-length: 7\r\n\r\n";
    const REQUEST: &[u8] = b"POST /order HTTP/1.1\r\nhost: a\r\ncontent-length: 7\r\n\r\norder=1";

    async fn pair() -> (Box<Conn>, TcpStream) {
        let (conn, server, _) = pair_listening().await;
        (conn, server)
    }

    /// A connection, the backend's end of it, and the backend's listener.
    async fn pair_listening() -> (Box<Conn>, TcpStream, TcpListener) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (
            Box::new(Conn::new(UpIo::Plain(client), addr, None, u32::MAX, None)),
            server,
            l,
        )
    }

    /// Closes the backend's end with a reset and no FIN (`SO_LINGER` 0).
    fn abort(server: TcpStream) {
        let std = server.into_std().unwrap();
        socket2::SockRef::from(&std).set_linger(Some(Duration::ZERO)).unwrap();
        drop(std);
    }

    /// The failure's label, for a send that must fail.
    fn failure(r: Result<Head, SendError>) -> &'static str {
        match r {
            Err(SendError::Failed(e) | SendError::Unanswered(e)) => e.kind(),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    fn request(method: http::Method, uri: &'static str, body: ReqBody) -> UpRequest {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, http::HeaderValue::from_static("a"));
        UpRequest {
            head: Rc::new(UpHead {
                method,
                uri: http::Uri::from_static(uri),
                headers,
                raw: None,
                added: codec::AddedFields::default(),
                raw_response: true,
            }),
            body,
        }
    }

    fn order() -> UpRequest {
        request(
            http::Method::POST,
            "/order",
            ReqBody::Buffered(Some(Bytes::from_static(b"order=1"))),
        )
    }

    async fn send_order(conn: &mut Conn) -> Result<Head, SendError> {
        conn.send(&mut order()).await
    }

    /// The backend reads exactly `bytes.len()` bytes.
    async fn backend_reads<S: tokio::io::AsyncRead + Unpin>(server: &mut S, bytes: &[u8]) {
        let mut got = vec![0u8; bytes.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, bytes);
    }

    /// One whole exchange, as on a pooled keep-alive connection before the test.
    async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(conn: &mut Conn, server: &mut S) {
        let backend = async {
            backend_reads(server, REQUEST).await;
            server
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            server.flush().await.unwrap();
        };
        let (head, ()) = tokio::join!(send_order(conn), backend);
        assert_eq!(head.unwrap().status, StatusCode::OK);
    }

    /// Where test bodies return their connection: backend 1 of `pool`.
    fn home(pool: &Rc<ConnPool>) -> Home {
        Home::new(pool.clone(), 1, Duration::from_secs(5), 4)
    }

    /// Lets the packets of the last step cross loopback.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    fn not_received(r: Result<Head, SendError>) -> bool {
        match r {
            Err(SendError::Unanswered(ProxyError::NotReceived { .. })) => true,
            Err(
                SendError::Unanswered(ProxyError::UpstreamClosed { .. })
                | SendError::Failed(ProxyError::UpstreamClosed { .. }),
            ) => false,
            other => panic!("expected a close, got {other:?}"),
        }
    }

    /// A connection over TLS (verification off) and the backend's end of it.
    async fn tls_pair() -> (Box<Conn>, tokio_rustls::server::TlsStream<TcpStream>) {
        use crate::backend_tls::{BackendTls, BackendTlsSpec, Trust};
        let cert = rcgen::generate_simple_self_signed(vec!["backend.test".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let client = BackendTls::load(BackendTlsSpec {
            trust: Trust::None,
            server_name: None,
            client_cert: None,
            min_version: crate::tls::MinVersion::Tls12,
            h2: false,
        })
        .unwrap();
        let name = crate::backend_tls::server_name("backend.test:443", None).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accept = async {
            let (tcp, _) = l.accept().await.unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(server))
                .accept(tcp)
                .await
                .unwrap()
        };
        let connect = crate::backend_tls::connect(addr, Some((&client, &name)), Duration::from_secs(5));
        let (io, server) = tokio::join!(connect, accept);
        (Box::new(Conn::new(io.unwrap(), addr, None, u32::MAX, None)), server)
    }

    #[tokio::test]
    async fn over_tls_a_request_crossing_the_backends_close_is_not_received_with_or_without_close_notify() {
        for close_notify in [false, true] {
            let (mut conn, mut server) = tls_pair().await;
            exchange(&mut conn, &mut server).await;
            if close_notify {
                server.shutdown().await.unwrap();
            }
            // Dropped without `close_notify` otherwise, as a killed or careless server
            // closes: an EOF rustls calls unexpected, which must not hide the reset.
            drop(server);
            settle().await;
            assert!(
                not_received(send_order(&mut conn).await),
                "close_notify {close_notify}: FIN then reset, never read"
            );
        }
    }

    #[tokio::test]
    async fn a_request_written_after_the_backend_closed_the_idle_connection_is_not_received() {
        let (mut conn, mut server) = pair().await;
        exchange(&mut conn, &mut server).await;
        // The backend closes the idle connection; the next request crosses its FIN.
        drop(server);
        settle().await;
        assert!(not_received(send_order(&mut conn).await), "FIN then reset: never read");
    }

    #[tokio::test]
    async fn a_request_the_backend_read_before_closing_may_have_been_received() {
        let (mut conn, mut server) = pair().await;
        let backend = async move {
            backend_reads(&mut server, REQUEST).await;
            // The application has the request and dies without answering.
            drop(server);
        };
        let (r, ()) = tokio::join!(send_order(&mut conn), backend);
        assert!(!not_received(r), "the backend may have acted on it");
    }

    #[tokio::test]
    async fn a_request_a_draining_backend_left_unread_is_not_received() {
        let (mut conn, mut server) = pair().await;
        // A draining server half-closes an idle connection (FIN), the request arrives
        // and is acknowledged by its kernel, and the server closes without reading it.
        server.shutdown().await.unwrap();
        settle().await;
        let backend = async move {
            // Closes as soon as the request is in its socket, unread.
            server.readable().await.unwrap();
            drop(server);
        };
        let (r, ()) = tokio::join!(send_order(&mut conn), backend);
        assert!(not_received(r), "FIN then reset: never read");
    }

    #[tokio::test]
    async fn a_request_whose_backend_exited_before_reading_it_was_never_received() {
        for listener_first in [true, false] {
            let (mut conn, server, listener) = pair_listening().await;
            // The process dies with the request in its socket: its kernel resets the
            // connection (unread bytes, no FIN) and closes the listener, in either
            // order.
            let backend = async move {
                server.readable().await.unwrap();
                if listener_first {
                    drop(listener);
                    drop(server);
                } else {
                    drop(server);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    drop(listener);
                }
            };
            let (r, ()) = tokio::join!(send_order(&mut conn), backend);
            assert_eq!(failure(r), "upstream_exited_unread", "listener first: {listener_first}");
        }
    }

    #[tokio::test]
    async fn a_reset_from_a_backend_that_still_accepts_may_have_been_received() {
        for read_first in [true, false] {
            let (mut conn, mut server, listener) = pair_listening().await;
            // An abortive close by a live server (after reading the request, or not):
            // the same reset on the wire, and its port still accepts.
            let backend = async {
                if read_first {
                    backend_reads(&mut server, REQUEST).await;
                } else {
                    server.readable().await.unwrap();
                }
                abort(server);
            };
            let (r, ()) = tokio::join!(send_order(&mut conn), backend);
            assert_eq!(failure(r), "upstream_closed", "read first: {read_first}");
            drop(listener);
        }
    }

    #[tokio::test]
    async fn a_request_a_half_closed_backend_read_may_have_been_received() {
        let (mut conn, mut server) = pair().await;
        // The FIN comes before the request, but the server still reads it: it may act.
        server.shutdown().await.unwrap();
        settle().await;
        let backend = async move {
            backend_reads(&mut server, REQUEST).await;
            drop(server);
        };
        let (r, ()) = tokio::join!(send_order(&mut conn), backend);
        assert!(!not_received(r), "the backend read the request");
    }

    #[tokio::test]
    async fn a_request_the_backend_answered_with_a_1xx_may_have_been_received() {
        let (mut conn, mut server) = pair().await;
        let backend = async move {
            // It reads the head only, answers 103, and closes with the body unread
            // (FIN, then a reset for the unread bytes).
            backend_reads(&mut server, HEAD).await;
            server
                .write_all(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n")
                .await
                .unwrap();
            server.shutdown().await.unwrap();
            settle().await;
            drop(server);
        };
        let (r, ()) = tokio::join!(send_order(&mut conn), backend);
        assert!(
            !not_received(r),
            "the backend answered 103: it had seen the request head"
        );
    }

    #[tokio::test]
    async fn an_idle_connection_the_backend_closed_is_not_usable() {
        let (mut conn, mut server) = pair().await;
        exchange(&mut conn, &mut server).await;
        assert!(conn.is_usable());
        settle().await;
        assert!(conn.is_usable(), "a quiet connection stays usable");
        drop(server);
        settle().await;
        assert!(!conn.is_usable(), "the backend's FIN is seen without a request");
    }

    #[tokio::test]
    async fn a_request_sent_to_a_reset_connection_is_unsent() {
        let (mut conn, mut server) = pair().await;
        exchange(&mut conn, &mut server).await;
        // SO_LINGER 0: the backend resets the connection instead of closing it.
        abort(server);
        settle().await;
        let mut req = order();
        match conn.send(&mut req).await {
            Err(SendError::Unsent(_)) => {}
            other => panic!("expected unsent, got {other:?}"),
        }
        assert!(
            matches!(&req.body, ReqBody::Buffered(Some(b)) if b.len() == 7),
            "the request is still whole"
        );
    }

    #[tokio::test]
    async fn bodies_stream_by_length_chunks_or_close_and_reuse_follows_the_framing() {
        for (wire, want, reusable) in [
            ("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", "hello", true),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
                "hello",
                true,
            ),
            ("HTTP/1.1 200 OK\r\n\r\nhello", "hello", false),
            (
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello",
                "hello",
                false,
            ),
        ] {
            let (mut conn, mut server) = pair().await;
            let backend = async {
                backend_reads(&mut server, REQUEST).await;
                server.write_all(wire.as_bytes()).await.unwrap();
                if !reusable {
                    server.shutdown().await.unwrap();
                }
            };
            let (head, ()) = tokio::join!(send_order(&mut conn), backend);
            let head = head.unwrap();
            let pool = ConnPool::new();
            let body = UpBody::new(conn, head.framing, head.keep_alive, home(&pool), Duration::from_secs(5))
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(body, want.as_bytes(), "{wire}");
            assert_eq!(pool.checkout(1).is_some(), reusable, "{wire}");
        }
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_body_was_taken_is_read_not_waited_out() {
        let (mut conn, mut server) = pair().await;
        // 8 MiB: far more than the socket buffers hold while the backend reads nothing.
        let big = Bytes::from(vec![b'x'; 8 << 20]);
        let mut req = request(http::Method::PUT, "/upload", ReqBody::Buffered(Some(big)));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let backend = async move {
            let mut head = vec![0u8; 256];
            let n = server.read(&mut head).await.unwrap();
            assert!(n > 0);
            server
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            // Keeps the connection open, unread, until the client has its answer.
            let _ = stopped.await;
        };
        let client = async {
            let r = tokio::time::timeout(Duration::from_secs(10), conn.send(&mut req)).await;
            let _ = stop.send(());
            r
        };
        let (r, ()) = tokio::join!(client, backend);
        let head = r.expect("the answer is read, not waited out").unwrap();
        assert_eq!(head.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(!head.keep_alive, "the rest of the body was never sent: not reusable");
    }

    #[tokio::test]
    async fn a_backend_closing_mid_body_is_an_error_not_a_short_body() {
        let (mut conn, mut server) = pair().await;
        let backend = async {
            backend_reads(&mut server, REQUEST).await;
            server
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
                .await
                .unwrap();
            server.shutdown().await.unwrap();
        };
        let (head, ()) = tokio::join!(send_order(&mut conn), backend);
        let head = head.unwrap();
        assert!(UpBody::new(
            conn,
            head.framing,
            head.keep_alive,
            home(&ConnPool::new()),
            Duration::from_secs(5)
        )
        .collect()
        .await
        .is_err());
    }
}
