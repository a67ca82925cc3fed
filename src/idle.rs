//! HTTP/1.1 client connections that hold no buffers while idle, on hyper's path: the
//! requests `h1` (rampart's own path, which frees its buffers the same way) hands over,
//! and every request over TLS (`netio::ClientIo`: the socket, or rustls over it).
//!
//! hyper keeps a connection's read buffer, write buffer and parser state for as long
//! as the connection is open, idle or not: about 30 KB per idle keep-alive client.
//! nginx instead frees its buffers between requests (`ngx_http_set_keepalive`). This
//! module does the same around hyper: a connection is served by a boxed hyper
//! connection over `ParkIo`; once it has been idle for `PARK_AFTER` (response flushed,
//! no new byte), `ParkIo` reports end of stream to hyper ("parks"), hyper finishes
//! cleanly without closing the socket, and the connection waits for its next request
//! holding nothing but the socket and a timer. Busy connections never park, so the
//! hot path keeps hyper's per-connection reuse (header map, buffers).
//!
//! `ParkIo` also owns the request-header deadline (`client_header_timeout`, from the
//! first byte of a request to its complete head), replacing hyper's own header timer:
//! one timer per connection serves both deadlines, where hyper allocated a fresh
//! `Sleep` for every request.
//!
//! What makes parking safe: `ClientBody`'s drop (the response is done), hyper's
//! `poll_flush` after that (hyper flushes the socket only once its write buffer is
//! empty), and a read that would block. A partial pipelined request hyper had already
//! buffered comes back in `Parts::read_buf` and is replayed to the next connection.
//! Upgrades (WebSocket) are completed by hand: hyper hands back the socket and the
//! proxy's tunnel receives it through `ParkState::take_upgrade`.
//!
//! Also owns what every client connection's life between and after requests needs:
//! its keep-alive budget (`Lifetime`: `keepalive_requests`, `keepalive_time`) and
//! the lingering close after its last answer (`linger`).

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::body::{InBody, RespBody};
use crate::listener::ConnTracker;
use crate::netio::ClientIo;
use crate::proxy::{self, ConnInfo};
use crate::worker::WorkerCtx;

/// How long a keep-alive connection stays idle before it gives its buffers back.
/// Short enough that idle clients cost almost nothing; long enough that a client
/// sending back-to-back requests never pays for a new hyper connection.
pub const PARK_AFTER: Duration = Duration::from_millis(250);

/// nginx's `lingering_time`: the longest a closing connection goes on reading what
/// its client still sends (`linger`)...
const LINGER_TIME: Duration = Duration::from_secs(30);
/// ...and nginx's `lingering_timeout`: the longest it waits for more.
const LINGER_TIMEOUT: Duration = Duration::from_secs(5);

/// A closing connection, after its last response and our FIN: reads and discards what
/// the client still sends (the rest of a request body answered without being read: a
/// 413, a 401; the head past a 431; pipelined requests), until the client closes,
/// stays quiet for `LINGER_TIMEOUT`, `LINGER_TIME` passes, or the stopping worker
/// closes its idle connections. Closing a socket with unread bytes sends a reset, and
/// a client still sending then loses the answer before it reads it (RFC 9112 §9.6).
/// nginx's `lingering_close` does the same.
pub async fn linger(tcp: &TcpStream, tracker: &ConnTracker) {
    let until = Instant::now() + LINGER_TIME;
    // On the heap: lingering is rare, and its caller's future stays small.
    let mut sink = vec![0u8; 16 * 1024];
    loop {
        let wait = until.saturating_duration_since(Instant::now()).min(LINGER_TIMEOUT);
        tokio::select! {
            biased;
            _ = tracker.idle_closed() => return,
            r = tokio::time::timeout(wait, tcp.readable()) => match r {
                Ok(Ok(())) => match tcp.try_read(&mut sink) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                },
                _ => return,
            },
        }
    }
}

/// `keepalive_requests` and `keepalive_time`, from `[server]`.
#[derive(Clone, Copy, Debug)]
pub struct KeepLimits {
    pub requests: Option<std::num::NonZeroU32>,
    pub time: Option<Duration>,
}

/// What a client connection carries across its busy periods and dormancy
/// (`dormant::Slot`): when its first bytes came, the requests it has begun, and its
/// serial number (the access log's `$connection`).
#[derive(Debug, Clone, Copy)]
pub struct Tally {
    pub born: std::time::Instant,
    pub begun: u32,
    pub serial: u64,
}

impl Tally {
    /// A connection whose first bytes came now: the next serial number, counted over
    /// every worker, as nginx counts `$connection`.
    pub fn fresh() -> Tally {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Tally {
            born: crate::clock::now(),
            begun: 0,
            serial: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// A client connection's keep-alive budget: the requests it has begun and when its
/// first bytes came, carried across its busy periods and dormancy (`Tally`).
/// Checked as each request begins, as nginx does: the request that reaches a limit
/// is served, and its response closes the connection (HTTP/1.1 `Connection: close`,
/// HTTP/2 GOAWAY).
pub struct Lifetime {
    /// `keepalive_requests`, or `u64::MAX` for none (one compare per request).
    max: u64,
    /// `born + keepalive_time`, past which a request is the last.
    until: Option<std::time::Instant>,
    born: std::time::Instant,
    begun: Cell<u64>,
    serial: u64,
}

impl Lifetime {
    pub fn new(limits: KeepLimits, tally: Tally) -> Lifetime {
        Lifetime {
            max: limits.requests.map_or(u64::MAX, |n| n.get().into()),
            until: limits.time.and_then(|t| tally.born.checked_add(t)),
            born: tally.born,
            begun: Cell::new(tally.begun.into()),
            serial: tally.serial,
        }
    }

    /// Counts a request that begins; `false` when it must be the connection's last.
    #[inline]
    pub fn another(&self) -> bool {
        let n = self.begun.get() + 1;
        self.begun.set(n);
        n < self.max && self.until.is_none_or(|t| crate::clock::now() <= t)
    }

    /// The requests begun so far (`$connection_requests`).
    pub fn begun(&self) -> u64 {
        self.begun.get()
    }

    /// The connection's serial number (`$connection`).
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// What the connection carries into dormancy (the requests begun saturating:
    /// past `u32::MAX` there can be no limit left to reach).
    pub fn so_far(&self) -> Tally {
        Tally {
            born: self.born,
            begun: self.begun.get().min(u32::MAX.into()) as u32,
            serial: self.serial,
        }
    }
}

/// What a tunnel gets when hyper hands an upgraded connection back: the connection
/// and any bytes the client sent after its request.
pub type Upgraded = (ClientIo, Bytes);

/// Shared between a connection's `ParkIo`, its service and its response bodies.
pub struct ParkState {
    /// No request in progress: before the first, or since the last response body was
    /// dropped by hyper (written in full or aborted).
    waiting: Cell<bool>,
    /// hyper flushed its write buffer since the last response ended.
    flushed: Cell<bool>,
    /// Requests started on this connection; `ParkIo` notices a new one by it.
    requests: Cell<u64>,
    /// `ParkIo` reported end of stream to hyper so the connection can park.
    parked: Cell<bool>,
    /// Set by the proxy when it answers 101: the tunnel waiting for the socket.
    upgrade: RefCell<Option<oneshot::Sender<Upgraded>>>,
    /// When the last response ended (the idle wait began).
    idle_since: Cell<Option<Instant>>,
    /// One timer for the park and header deadlines; dropped when the connection parks.
    timer: RefCell<Option<Pin<Box<Sleep>>>>,
    armed: Cell<Option<Instant>>,
    /// The connection task, to re-poll hyper when a response ends without a poll
    /// context at hand (an empty body).
    waker: RefCell<Option<Waker>>,
}

impl ParkState {
    fn new() -> ParkState {
        ParkState {
            waiting: Cell::new(true),
            flushed: Cell::new(true),
            requests: Cell::new(0),
            parked: Cell::new(false),
            upgrade: RefCell::new(None),
            idle_since: Cell::new(None),
            timer: RefCell::new(None),
            armed: Cell::new(None),
            waker: RefCell::new(None),
        }
    }

    /// Polls the shared deadline timer for `deadline`. A timer already set to fire
    /// earlier is left alone (it wakes the connection early, and the reader then sets
    /// it again), so a busy connection does not reset its timer on every response.
    fn deadline_passed(&self, cx: &mut Context<'_>, deadline: Instant) -> bool {
        let mut slot = self.timer.borrow_mut();
        let timer = slot.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match self.armed.get() {
            Some(at) if at == deadline => {}
            Some(at) if at < deadline && at > Instant::now() => {}
            _ => {
                timer.as_mut().reset(deadline);
                self.armed.set(Some(deadline));
            }
        }
        timer.as_mut().poll(cx).is_ready() && Instant::now() >= deadline
    }

    /// The response is complete: start the idle wait. With a poll context the park
    /// timer is armed at once; without one, hyper is re-polled so its next (idle)
    /// read arms it.
    fn response_done(&self, cx: Option<&mut Context<'_>>) {
        let now = Instant::now();
        self.waiting.set(true);
        self.flushed.set(false);
        self.idle_since.set(Some(now));
        match cx {
            Some(cx) => {
                let _ = self.deadline_passed(cx, now + PARK_AFTER);
            }
            None => {
                if let Some(w) = self.waker.borrow().as_ref() {
                    w.wake_by_ref();
                }
            }
        }
    }

    /// Called by the proxy once the backend agreed to switch protocols.
    pub fn take_upgrade(&self) -> oneshot::Receiver<Upgraded> {
        let (tx, rx) = oneshot::channel();
        *self.upgrade.borrow_mut() = Some(tx);
        rx
    }
}

/// The client socket as hyper sees it, with the park signal, the header deadline and
/// replayed bytes.
pub struct ParkIo {
    /// The socket, or TLS over it; its writes carry `send_timeout`.
    io: ClientIo,
    /// Bytes read by an earlier hyper connection but not yet parsed.
    replay: Bytes,
    state: Rc<ParkState>,
    header_timeout: Duration,
    /// `state.requests` when the fields below were last reset.
    seen_requests: u64,
    /// When the first byte of the next request head arrived.
    head_started: Option<Instant>,
}

impl ParkIo {
    pub fn new(stream: TcpStream, replay: Bytes, state: Rc<ParkState>, waits: &IdleWaits) -> ParkIo {
        let io = ClientIo::Plain(crate::netio::Gather::new(stream, waits.send));
        ParkIo::over(io, replay, state, waits)
    }

    /// The same over a connection already wrapped (TLS).
    pub fn over(io: ClientIo, replay: Bytes, state: Rc<ParkState>, waits: &IdleWaits) -> ParkIo {
        // The caller saw the first byte of a request (or has replayed bytes).
        let now = Instant::now();
        ParkIo {
            io,
            replay,
            seen_requests: state.requests.get(),
            state,
            header_timeout: waits.header,
            head_started: Some(now),
        }
    }

    /// A new request started since we last looked: forget the old wait.
    fn sync(&mut self) {
        let requests = self.state.requests.get();
        if requests != self.seen_requests {
            self.seen_requests = requests;
            self.head_started = None;
        }
    }

    /// The read would block while no request is in progress: park, time out a slow
    /// request head, or keep waiting.
    fn blocked_while_waiting(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let state = &*self.state;
        if let Some(started) = self.head_started {
            if state.deadline_passed(cx, started + self.header_timeout) {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client_header_timeout: request head incomplete",
                )));
            }
            return Poll::Pending;
        }
        let since = match state.idle_since.get() {
            Some(t) => t,
            None => {
                let now = Instant::now();
                state.idle_since.set(Some(now));
                now
            }
        };
        if state.deadline_passed(cx, since + PARK_AFTER) {
            if state.flushed.get() {
                // Idle: let hyper end this connection as if the client had closed.
                state.parked.set(true);
                state.timer.borrow_mut().take();
                state.armed.set(None);
                return Poll::Ready(Ok(()));
            }
            // Still flushing to a slow reader: look again later.
            let now = Instant::now();
            state.idle_since.set(Some(now));
            // Not yet due, so this only arms the timer (and registers the waker).
            let _ = state.deadline_passed(cx, now + PARK_AFTER);
        }
        Poll::Pending
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
        match crate::netio::poll_read_into(&mut this.io, cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 && this.state.waiting.get() {
                    this.sync();
                    this.head_started.get_or_insert_with(Instant::now);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if this.state.waiting.get() => {
                this.sync();
                this.blocked_while_waiting(cx)
            }
            // A request is in progress (hyper is reading its body, or watching for the
            // client going away while the response is produced): no deadline of ours.
            Poll::Pending => {
                let mut w = this.state.waker.borrow_mut();
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Write for ParkIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Through to the connection: TLS may hold encrypted bytes a slow client has
        // not taken yet (a plain socket's flush is immediate).
        std::task::ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        // hyper calls this only once its write buffer is empty.
        this.state.flushed.set(true);
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The response body as hyper sees it: tells `ParkState` the moment the response is
/// complete. That must happen before hyper's next read (which it does right after the
/// last frame, before dropping the body), so the idle timer is armed by that read.
pub struct ClientBody {
    inner: RespBody,
    state: Option<Rc<ParkState>>,
    done: Cell<bool>,
    /// HTTP/2: the stream counts as open until hyper drops its body.
    _stream: Option<StreamGuard>,
}

/// An HTTP/2 connection's open streams, for its idle timeout
/// (`listener::serve_h2`): hyper closes no idle HTTP/2 connection itself, and its
/// pings keep one alive.
pub struct Streams {
    open: Cell<usize>,
    idle_since: Cell<Instant>,
    /// Notified when a stream begins that the connection's `Lifetime` allows no
    /// further one after: the connection sends GOAWAY.
    pub spent: tokio::sync::Notify,
}

impl Streams {
    pub fn new() -> Rc<Streams> {
        Rc::new(Streams {
            open: Cell::new(0),
            idle_since: Cell::new(Instant::now()),
            spent: tokio::sync::Notify::new(),
        })
    }

    /// When the connection may close for idleness; `None` while a stream is open.
    pub fn idle_until(&self, keepalive: Duration) -> Option<Instant> {
        (self.open.get() == 0).then(|| self.idle_since.get() + keepalive)
    }
}

/// What a response body did last in the current poll of its HTTP/2 stream's task
/// (`StreamTask`), which runs the stream's service call and hyper's copy of the body
/// into the stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyStep {
    /// Not polled in this task poll.
    NotPolled,
    /// Handed hyper a frame: if the task then waits, it waits for stream capacity,
    /// which only the client can give (a `WINDOW_UPDATE`, or draining the socket).
    Yielded,
    /// Waited for the backend.
    Waited,
}

thread_local! {
    static BODY_STEP: Cell<BodyStep> = const { Cell::new(BodyStep::NotPolled) };
}

pin_project_lite::pin_project! {
    /// An HTTP/2 stream's task (hyper spawns one per stream through `LocalExec`),
    /// with `send_timeout` for a stream whose client stops granting it flow-control
    /// window: the task ends, which resets the stream (`RST_STREAM` CANCEL) and frees
    /// the backend connection feeding it. A socket that stops draining stalls every
    /// stream, and `netio::Gather` closes the connection for that.
    pub struct StreamTask<F> {
        #[pin]
        fut: F,
        stall: crate::netio::Stall,
        stuck: bool,
    }
}

impl<F: Future> StreamTask<F> {
    pub fn new(fut: F, send_timeout: Duration) -> StreamTask<F> {
        StreamTask {
            fut,
            stall: crate::netio::Stall::new(send_timeout),
            stuck: false,
        }
    }
}

impl<F: Future> Future for StreamTask<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        BODY_STEP.set(BodyStep::NotPolled);
        if this.fut.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        match BODY_STEP.get() {
            // A frame went out, and now the stream waits: the wait starts now.
            BodyStep::Yielded => {
                this.stall.progressed();
                *this.stuck = true;
            }
            BodyStep::Waited => {
                this.stall.progressed();
                *this.stuck = false;
            }
            // Woken by its timer, or for something other than the body.
            BodyStep::NotPolled => {}
        }
        if *this.stuck && this.stall.expired(cx) {
            tracing::debug!(
                timeout = ?this.stall.limit(),
                "HTTP/2 stream given no flow-control window for send_timeout; reset"
            );
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// One open stream: counted from the service call until its response body is
/// dropped, or until the call's future is (a stream reset before the answer).
struct StreamGuard(Rc<Streams>);

impl StreamGuard {
    fn open(streams: &Rc<Streams>) -> StreamGuard {
        streams.open.set(streams.open.get() + 1);
        StreamGuard(streams.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let open = self.0.open.get() - 1;
        self.0.open.set(open);
        if open == 0 {
            self.0.idle_since.set(Instant::now());
        }
    }
}

impl ClientBody {
    fn mark_done(&self, cx: Option<&mut Context<'_>>) {
        if self.done.replace(true) {
            return;
        }
        if let Some(s) = &self.state {
            s.response_done(cx);
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        match &res {
            Poll::Ready(None) => this.mark_done(Some(cx)),
            Poll::Ready(Some(_)) if this.inner.is_end_stream() => this.mark_done(Some(cx)),
            _ => {}
        }
        // For `StreamTask` (HTTP/2); harmless on HTTP/1.1, where nothing reads it.
        BODY_STEP.set(if res.is_pending() {
            BodyStep::Waited
        } else {
            BodyStep::Yielded
        });
        res
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.mark_done(None);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        self.mark_done(None);
    }
}

impl Svc {
    /// The service of an HTTP/1.1 connection served through `ParkIo`, and the park
    /// state they share.
    pub fn h1(ctx: Rc<WorkerCtx>, mut info: ConnInfo, life: Lifetime) -> (Svc, Rc<ParkState>) {
        let state = Rc::new(ParkState::new());
        let life = Rc::new(life);
        info.life = Some(life.clone());
        let info = Rc::new(info.with_park(state.clone()));
        (
            Svc {
                ctx,
                info,
                streams: None,
                life,
            },
            state,
        )
    }

    /// The service of an HTTP/2 connection, and its stream count.
    pub fn counted(ctx: Rc<WorkerCtx>, mut info: ConnInfo, life: Lifetime) -> (Svc, Rc<Streams>) {
        let streams = Streams::new();
        let life = Rc::new(life);
        info.life = Some(life.clone());
        let svc = Svc {
            ctx,
            info: Rc::new(info),
            streams: Some(streams.clone()),
            life,
        };
        (svc, streams)
    }
}

/// The per-connection service. Its future is boxed: hyper keeps the service future
/// inline in the dispatcher, and the request's state machine (tries, hedges) is large.
#[derive(Clone)]
pub struct Svc {
    pub ctx: Rc<WorkerCtx>,
    pub info: Rc<ConnInfo>,
    /// HTTP/2 connections count their open streams (`Streams`).
    pub streams: Option<Rc<Streams>>,
    /// `keepalive_requests` and `keepalive_time`.
    pub life: Rc<Lifetime>,
}

/// The service's future: the boxed request future (boxed once, so the large state
/// machine is copied into the heap once), then the response wrapped in `ClientBody`.
pub struct SvcFuture {
    inner: Pin<Box<dyn Future<Output = proxy::Answer>>>,
    state: Option<Rc<ParkState>>,
    stream: Option<StreamGuard>,
    /// HTTP/1.1: the connection's last request (`Lifetime`); its response says
    /// `Connection: close`, and hyper closes the connection after it.
    last: bool,
}

impl Future for SvcFuture {
    type Output = Result<Response<ClientBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut resp = std::task::ready!(this.inner.as_mut().poll(cx)).into_response();
        // Not on a 101: the connection then belongs to the tunnel.
        if this.last && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            resp.headers_mut()
                .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        let state = this.state.take();
        let stream = this.stream.take();
        Poll::Ready(Ok(resp.map(|inner| ClientBody {
            inner,
            state,
            done: Cell::new(false),
            _stream: stream,
        })))
    }
}

impl hyper::service::Service<Request<Incoming>> for Svc {
    type Response = Response<ClientBody>;
    type Error = Infallible;
    type Future = SvcFuture;

    fn call(&self, req: Request<Incoming>) -> SvcFuture {
        let state = self.info.park.clone();
        if let Some(s) = &state {
            s.waiting.set(false);
            s.idle_since.set(None);
            s.requests.set(s.requests.get() + 1);
        }
        let last = !self.life.another();
        if let (true, Some(streams)) = (last, &self.streams) {
            streams.spent.notify_one();
        }
        SvcFuture {
            inner: crate::alloc::boxed(|| {
                proxy::handle(
                    self.ctx.clone(),
                    self.info.clone(),
                    req.map(InBody::Incoming),
                    None,
                    false,
                )
            }),
            state,
            stream: self.streams.as_ref().map(StreamGuard::open),
            last: last && self.streams.is_none(),
        }
    }
}

/// Waits until the client has sent something (or closed), and copies up to
/// `buf.len()` of its first bytes into `buf` without consuming them. Returns 0 on end
/// of stream. A `poll_fn` over `poll_peek` stores no readiness future, so the wait
/// that every idle connection sits in stays small.
pub fn peek_request<'a>(stream: &'a TcpStream, buf: &'a mut [u8]) -> impl Future<Output = io::Result<usize>> + 'a {
    poll_fn(move |cx| stream.poll_peek(cx, &mut tokio::io::ReadBuf::new(&mut *buf)))
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

/// Timeouts for the waits between requests.
pub struct IdleWaits {
    /// Until the first request byte of a new connection, and from the first byte of a
    /// request to its complete head (`client_header_timeout`).
    pub header: Duration,
    /// Between requests on a keep-alive connection (`keepalive_timeout`).
    pub keepalive: Duration,
    /// The longest the client may take no response bytes (`send_timeout`).
    pub send: Duration,
}

impl IdleWaits {
    /// The keep-alive wait left once a connection has parked: parking spends
    /// `PARK_AFTER` of it.
    pub fn after_park(&self) -> Duration {
        self.keepalive.saturating_sub(PARK_AFTER).max(Duration::from_millis(1))
    }
}

/// Waits, holding no buffer, until the client sends its next bytes. `None`: timed
/// out, closed by the client, a socket error, or the stopping worker closing its idle
/// connections.
pub async fn wait_for_request(
    stream: &TcpStream,
    tracker: &ConnTracker,
    wait: Duration,
    buf: &mut [u8],
) -> Option<usize> {
    tokio::select! {
        biased;
        _ = tracker.idle_closed() => None,
        r = tokio::time::timeout(wait, peek_request(stream, buf)) => match r {
            Ok(Ok(n)) if n > 0 => Some(n),
            _ => None,
        },
    }
}

/// One busy period of an HTTP/1.1 connection: a hyper connection until it parks
/// (returns the socket and any unparsed bytes) or ends (`None`). The caller boxes this
/// future: it holds hyper's connection, which must not size the idle task.
pub async fn run_h1(
    builder: &http1::Builder,
    io: ParkIo,
    svc: &Svc,
    tracker: &ConnTracker,
) -> Option<(ClientIo, Bytes)> {
    let state = io.state.clone();
    state.waiting.set(true);
    state.flushed.set(true);
    state.parked.set(false);
    state.idle_since.set(None);
    let mut conn = builder.serve_connection(io, svc.clone());
    let mut stopping = false;
    let result = tokio::select! {
        r = poll_fn(|cx| conn.poll_without_shutdown(cx)) => r,
        _ = tracker.stopped() => {
            // The request in flight, or else the next one if it comes before the idle
            // connections close, is answered with `Connection: close` and ends the
            // connection (hyper's graceful shutdown, once a request is under way).
            let idle_closed = tracker.idle_closed();
            tokio::pin!(idle_closed);
            poll_fn(|cx| {
                if !stopping && (!state.waiting.get() || idle_closed.as_mut().poll(cx).is_ready()) {
                    stopping = true;
                    Pin::new(&mut conn).graceful_shutdown();
                }
                let r = conn.poll_without_shutdown(cx);
                if r.is_pending() && !stopping && !state.waiting.get() {
                    // A request began in that poll: a busy connection is woken by
                    // its own work, so no poll is lost.
                    stopping = true;
                    Pin::new(&mut conn).graceful_shutdown();
                }
                r
            })
            .await
        }
    };
    let parts = conn.into_parts();
    let mut stream = parts.io.io;
    let upgrade = state.upgrade.borrow_mut().take();
    let answered = match (result, upgrade) {
        (Ok(()), Some(tx)) => {
            let _ = tx.send((stream, parts.read_buf));
            return None;
        }
        // An empty `read_buf` still pins hyper's whole read buffer: drop it.
        (Ok(()), None) if state.parked.get() && !stopping => return Some((stream, nonempty(parts.read_buf))),
        // The client had sent part of a pipelined request when we parked: hyper saw
        // "end of stream" mid-request, but wrote nothing; replay its bytes.
        (Err(e), _) if state.parked.get() && !stopping && e.is_incomplete_message() && !parts.read_buf.is_empty() => {
            return Some((stream, nonempty(parts.read_buf)));
        }
        // hyper ended the connection (Connection: close, shutdown, client EOF).
        (Ok(()), None) => true,
        (Err(e), _) => {
            // A head hyper could not parse, which it answered itself: logged, as
            // nginx logs its 400s.
            if e.is_parse_too_large() {
                // hyper says which in its message only: 414 or 431.
                let (status, kind) = if e.to_string().contains("URI too long") {
                    (414, "uri_too_long")
                } else {
                    (431, "headers_too_large")
                };
                crate::accesslog::Pending::unparsed(&svc.ctx, &svc.info, status, kind);
            } else if e.is_parse() {
                crate::accesslog::Pending::unparsed(&svc.ctx, &svc.info, 400, "bad_request");
            }
            tracing::debug!(client = %svc.info.peer, error = %e, "client connection ended with error");
            // `is_parse` covers the too-large heads too: the client may still be
            // sending the head hyper refused.
            e.is_parse()
        }
    };
    if answered {
        let _ = stream.shutdown().await;
        crate::alloc::boxed(|| linger(stream.tcp(), tracker)).await;
    }
    None
}
