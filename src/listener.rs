//! Client-facing sockets: socket2 binding (`SO_REUSEPORT`, backlog, `TCP_NODELAY`), the
//! accept loop with its per-worker connection cap, the hyper connection builders
//! (HTTP/1.1 and h2c, limits, header timeout), protocol detection, the TLS handshake
//! (`serve_tls`), and graceful drain of HTTP/2 connections. Plain HTTP/1.1 connections
//! are served by `serve_h1`'s loop over `h1::serve` (rampart's own path for the common
//! request) and `idle::run_h1` (hyper); HTTP/1.1 over TLS by `serve_tls_h1`'s loop over
//! `idle::run_h1` alone.
//!
//! Every worker binds its own socket to each listen address; the kernel spreads new
//! connections across them, so no worker wakes another.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::alloc::boxed;
use crate::config::{ListenerConfig, ServerConfig};
use crate::error::StartupError;
use crate::h1::{self, Ended};
use crate::idle::{self, IdleWaits, KeepLimits, Lifetime, Svc};
use crate::netio::ClientIo;
use crate::proxy::{ConnInfo, Local};
use crate::state::Shared;
use crate::tls::TlsSettings;
use crate::worker::WorkerCtx;
use bytes::Bytes;

/// Spawns hyper's HTTP/2 stream tasks on the worker's runtime, so request futures
/// may hold worker-local (`Rc`) state; inside `clock::Polled`, as every connection
/// task is, and under `send_timeout` for flow control (`idle::StreamTask`).
#[derive(Clone, Copy, Debug)]
pub struct LocalExec {
    send_timeout: Duration,
}

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(crate::clock::Polled::new(idle::StreamTask::new(fut, self.send_timeout)));
    }
}

/// The connection builders and idle waits, from `[server]`, shared by a worker's
/// connections.
pub struct HttpBuilder {
    /// Detects h2c prior knowledge; used for connections that start like the preface.
    auto: auto::Builder<LocalExec>,
    h1: http1::Builder,
    /// rampart's own HTTP/1.1 path (`h1`), tried first on every busy period.
    fast: h1::Limits,
    waits: IdleWaits,
    keep: KeepLimits,
    max_connections: usize,
}

/// Binds one listening socket. `SO_REUSEPORT` lets every worker bind the same address.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY on Linux: one syscall saved per connection.
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Whether some socket is already listening on `addr`: a probe without
/// `SO_REUSEPORT` (but with `SO_REUSEADDR`, so leftover TIME_WAIT connections do not
/// count) fails to bind only then.
pub fn already_bound(addr: SocketAddr) -> bool {
    let Ok(probe) = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)) else {
        return false;
    };
    if probe.set_reuse_address(true).is_err() {
        return false;
    }
    matches!(probe.bind(&addr.into()), Err(e) if e.kind() == io::ErrorKind::AddrInUse)
}

/// One configured listener's sockets: at least one per worker.
pub struct Bound {
    pub config: ListenerConfig,
    /// The address bound (port 0 resolved to the real port).
    pub addr: SocketAddr,
    pub sockets: Vec<std::net::TcpListener>,
}

/// Binds each configured listener once per worker, or takes the sockets a handover
/// passed (`upgrade::Inherited`) and binds only what more the workers need.
pub fn bind_all(
    listeners: &[ListenerConfig],
    workers: usize,
    inherited: &mut crate::upgrade::Inherited,
) -> Result<Vec<Bound>, StartupError> {
    let mut all = Vec::new();
    for l in listeners {
        let err = |addr| move |e| StartupError::Bind { addr, source: e };
        let mut sockets = inherited.take(l.bind);
        let addr = match sockets.first() {
            Some(first) => {
                // The old process's sockets, with the connections queued on them: the
                // new config's backlog applies (listen(2) again only resizes the queue).
                let addr = first.local_addr().map_err(err(l.bind))?;
                for s in &sockets {
                    socket2::SockRef::from(s)
                        .listen(l.backlog.min(i32::MAX as u32) as i32)
                        .map_err(err(addr))?;
                }
                addr
            }
            None => {
                let taken = l.bind.port() != 0 && already_bound(l.bind);
                let first = bind(l.bind, l.backlog).map_err(err(l.bind))?;
                if taken {
                    // The holder also set SO_REUSEPORT (or our bind would have failed),
                    // so the kernel now splits new connections between it and
                    // rampart, silently.
                    tracing::warn!(
                        addr = %l.bind,
                        "another socket was already listening on this address, and the kernel will share \
                         new connections between it and rampart (SO_REUSEPORT); to replace a running \
                         rampart, send it SIGUSR2 instead, or stop the other process"
                    );
                }
                let addr = first.local_addr().map_err(err(l.bind))?;
                sockets.push(first);
                addr
            }
        };
        // Every worker binds its own (the first bound above resolved port 0).
        while sockets.len() < workers {
            sockets.push(bind(addr, l.backlog).map_err(err(addr))?);
        }
        all.push(Bound {
            config: l.clone(),
            addr,
            sockets,
        });
    }
    Ok(all)
}

/// Deals each listener's sockets out to the workers, round robin: every worker gets
/// one of each, and a handover from a process with more workers gives some two, so no
/// inherited socket (nor the connections queued on it) is closed unread.
pub fn deal(bound: Vec<Bound>, workers: usize) -> Vec<Vec<(std::net::TcpListener, ListenerConfig)>> {
    let mut per_worker: Vec<Vec<_>> = (0..workers).map(|_| Vec::new()).collect();
    for b in bound {
        for (i, s) in b.sockets.into_iter().enumerate() {
            per_worker[i % workers].push((s, b.config.clone()));
        }
    }
    per_worker
}

/// The connection builders, with limits from `[server]`.
pub fn http_builder(cfg: &ServerConfig) -> HttpBuilder {
    // hyper answers 431 itself past this; our own, exact checks run below it.
    let max_buf = (cfg.max_header_bytes + cfg.max_uri_bytes + 1024).max(8192);
    let mut auto = auto::Builder::new(LocalExec {
        send_timeout: cfg.send_timeout,
    });
    auto.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.client_header_timeout)
        .max_headers(cfg.max_headers)
        .max_buf_size(max_buf);
    auto.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.h2_max_concurrent_streams)
        .max_header_list_size(cfg.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    // No hyper header timer here: `idle::ParkIo` keeps that deadline with the timer it
    // already has for parking (hyper's allocated a `Sleep` per request).
    let mut h1 = http1::Builder::new();
    h1.max_headers(cfg.max_headers).max_buf_size(max_buf);
    HttpBuilder {
        auto,
        h1,
        fast: h1::Limits {
            max_headers: cfg.max_headers,
            max_buf,
            header_timeout: cfg.client_header_timeout,
            send_timeout: cfg.send_timeout,
        },
        waits: IdleWaits {
            header: cfg.client_header_timeout,
            keepalive: cfg.keepalive_timeout,
            send: cfg.send_timeout,
        },
        keep: KeepLimits {
            requests: cfg.keepalive_requests,
            time: cfg.keepalive_time,
        },
        max_connections: cfg.max_connections,
    }
}

/// Counts a worker's open client connections, for the cap and for drain, and tells
/// them when the worker stops. (A flag and a `Notify` rather than each connection
/// polling a `watch` receiver: a connection's stop future is polled every time its
/// task wakes, and `watch::Receiver::wait_for` re-registers on every poll.)
pub struct ConnTracker {
    active: Cell<usize>,
    changed: Notify,
    stopping: Cell<bool>,
    stop: Notify,
    /// Set `DRAIN_IDLE` after `stopping`: idle connections close.
    closing_idle: Cell<bool>,
    close_idle: Notify,
    /// Holds the process-wide count (`Shared::client_connections`).
    shared: Arc<Shared>,
}

/// How long a stopping worker keeps an idle HTTP/1.1 keep-alive connection open for
/// one more request (answered with `Connection: close`) before it closes it. A
/// client sends its next request on a connection it believes open: one closed under
/// it at that moment is reset, and the request fails (nginx closes idle connections
/// at once and loses some; HAProxy, like this, closes a connection after a response).
/// A client quiet for this long is idle indeed, and is closed.
pub const DRAIN_IDLE: Duration = Duration::from_secs(1);

impl ConnTracker {
    pub fn new(shared: Arc<Shared>) -> ConnTracker {
        ConnTracker {
            active: Cell::new(0),
            changed: Notify::new(),
            stopping: Cell::new(false),
            stop: Notify::new(),
            closing_idle: Cell::new(false),
            close_idle: Notify::new(),
            shared,
        }
    }

    /// Tells every connection to finish: each busy one ends after its response, which
    /// says `Connection: close` (HTTP/2: GOAWAY), and so does each idle one if its next
    /// request comes before `close_idle`.
    pub fn stop(&self) {
        self.stopping.set(true);
        self.stop.notify_waiters();
    }

    /// Closes the idle connections (`DRAIN_IDLE` after `stop`).
    pub fn close_idle(&self) {
        self.closing_idle.set(true);
        self.close_idle.notify_waiters();
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.get()
    }

    /// Resolves once `stop` has been called.
    pub async fn stopped(&self) {
        Self::once(&self.stop, &self.stopping).await
    }

    /// Resolves once `close_idle` has been called: what an idle connection waits on.
    pub async fn idle_closed(&self) {
        Self::once(&self.close_idle, &self.closing_idle).await
    }

    async fn once(notify: &Notify, flag: &Cell<bool>) {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if flag.get() {
            return;
        }
        notified.await
    }

    pub fn active(&self) -> usize {
        self.active.get()
    }

    /// Counts one more open connection until the guard drops.
    pub fn enter(self: &Rc<Self>) -> ConnGuard {
        self.active.set(self.active.get() + 1);
        self.shared.client_connections.fetch_add(1, Ordering::Relaxed);
        ConnGuard(self.clone())
    }

    /// Waits until fewer than `limit` connections are open.
    async fn below(&self, limit: usize) {
        while self.active.get() >= limit {
            self.changed.notified().await;
        }
    }

    pub async fn drained(&self) {
        self.below(1).await
    }
}

pub struct ConnGuard(Rc<ConnTracker>);

impl ConnGuard {
    pub fn tracker(&self) -> &ConnTracker {
        &self.0
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get() - 1);
        self.0.shared.client_connections.fetch_sub(1, Ordering::Relaxed);
        self.0.changed.notify_waiters();
    }
}

/// A worker's listening sockets as they come: those bound at start, then those a
/// reload adds (`Server::reload` binds them, so a bind error rejects the reload).
pub type NewListeners = tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpListener, ListenerConfig)>;

/// Runs an accept loop per listener the worker is given, and stops the loop of any
/// listener a reload removed: its socket closes, while the connections it accepted
/// go on. Without a per-accept cost: the loops are tasks, stopped from here.
pub async fn manage(ctx: Rc<WorkerCtx>, mut listeners: NewListeners, mut shutdown: watch::Receiver<bool>) {
    let mut loops: Vec<(SocketAddr, tokio::task::JoinHandle<()>)> = Vec::new();
    loop {
        let reloaded = ctx.shared.reloaded.notified();
        tokio::pin!(reloaded);
        reloaded.as_mut().enable();
        tokio::select! {
            biased;
            _ = crate::stopped(&mut shutdown) => return,
            got = listeners.recv() => {
                let Some((l, cfg)) = got else { return };
                match TcpListener::from_std(l) {
                    Ok(l) => {
                        let bind = cfg.bind;
                        let task = accept_loop(ctx.clone(), l, cfg, shutdown.clone());
                        loops.push((bind, tokio::task::spawn_local(task)));
                    }
                    Err(e) => tracing::error!(worker = ctx.index, bind = %cfg.bind, error = %e, "cannot register listener"),
                }
            }
            () = &mut reloaded => {
                let snap = ctx.shared.snapshot.load();
                loops.retain(|(bind, task)| {
                    let kept = snap.config.listeners.iter().any(|c| c.bind == *bind);
                    if !kept {
                        if ctx.index == 0 {
                            tracing::info!(bind = %bind, "listener removed by reload; its open connections go on");
                        }
                        task.abort();
                    }
                    kept
                });
            }
        }
    }
}

/// Accepts until shutdown, at most `max_connections` open at once; past the cap the
/// kernel backlog holds new connections (as nginx and HAProxy do), nothing is dropped.
pub async fn accept_loop(
    ctx: Rc<WorkerCtx>,
    listener: TcpListener,
    cfg: ListenerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let tracker = &ctx.tracker;
    // `$server_port`: the port bound, which a `:0` in the config does not say.
    let bound = listener.local_addr().unwrap_or(cfg.bind);
    ctx.register_listener(bound, &cfg);
    loop {
        if tracker.active() >= ctx.http_builder().max_connections {
            // At the cap: wait for a slot, or for a reload that may raise the cap
            // (registered before the cap is read again, so none is missed).
            let reloaded = ctx.shared.reloaded.notified();
            tokio::pin!(reloaded);
            reloaded.as_mut().enable();
            let cap = ctx.http_builder().max_connections;
            tokio::select! {
                biased;
                _ = crate::stopped(&mut shutdown) => break,
                _ = tracker.below(cap) => {}
                _ = reloaded => continue,
            }
        }
        let accepted = tokio::select! {
            biased;
            _ = crate::stopped(&mut shutdown) => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let guard = tracker.enter();
                let builder = ctx.http_builder();
                let tls = cfg
                    .tls
                    .as_ref()
                    .map(|own| current_tls(&ctx, cfg.bind).unwrap_or_else(|| own.clone()));
                tokio::task::spawn_local(crate::clock::Polled::new(serve(
                    ctx.clone(),
                    builder,
                    stream,
                    peer,
                    guard,
                    cfg.proxy_protocol,
                    tls,
                    ctx.local_for(bound),
                )));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A TLS listener's certificates as of the latest reload (renewed files take effect
/// for new connections). `None` if a reload turned TLS off for this address, which
/// takes a restart: the listener keeps the certificates it started with.
fn current_tls(ctx: &WorkerCtx, bind: SocketAddr) -> Option<Arc<TlsSettings>> {
    let snap = ctx.shared.snapshot.load();
    snap.config
        .listeners
        .iter()
        .find(|l| l.bind == bind && l.tls.is_some())
        .and_then(|l| l.tls.clone())
}

/// The HTTP/2 connection preface a prior-knowledge h2c client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client connection's task. Its own state is what an idle keep-alive connection
/// costs, so everything busy (hyper's connection, h2) is boxed and awaited.
#[allow(clippy::too_many_arguments)]
async fn serve(
    ctx: Rc<WorkerCtx>,
    builder: Rc<HttpBuilder>,
    mut stream: TcpStream,
    mut peer: SocketAddr,
    guard: ConnGuard,
    proxy_protocol: bool,
    tls: Option<Arc<TlsSettings>>,
    local: Local,
) {
    if proxy_protocol {
        // Boxed: its buffer must not size every connection's task.
        match boxed(|| crate::proxyproto::read_header(&mut stream, peer, builder.waits.header)).await {
            Some(client) => peer = client,
            None => return,
        }
    }
    // Wait for the first bytes before choosing a protocol: a connection that sends
    // nothing holds no hyper state, and closes after `client_header_timeout`.
    let tracker = guard.tracker();
    let mut head = [0u8; H2_PREFACE.len()];
    let Some(n) = idle::wait_for_request(&stream, tracker, builder.waits.header, &mut head).await else {
        return;
    };
    // Its age counts from its first bytes: made before the wait, it would size every
    // connection's task while it waits for them.
    let life = Lifetime::new(builder.keep, idle::Tally::fresh());
    if let Some(tls) = tls {
        return boxed(|| serve_tls(ctx, &builder, stream, head[0], peer, tracker, tls, local, life)).await;
    }
    // A split preface (fewer bytes so far) also goes to the auto builder, which waits.
    if H2_PREFACE.starts_with(&head[..n]) {
        let io = ClientIo::Plain(crate::netio::Gather::new(stream, builder.waits.send));
        let info = ConnInfo::new(peer, false).at(local);
        return boxed(|| serve_h2(ctx, &builder, io, info, life, tracker)).await;
    }
    serve_h1(ctx, builder, stream, peer, guard, local, life).await
}

/// Serves a connection that was dormant (`dormant::Dormant`) and has bytes again.
pub fn resume(ctx: Rc<WorkerCtx>, w: crate::dormant::Woken) {
    let builder = ctx.http_builder();
    // The listener from the socket's address: a dormant slot does not keep it, and
    // a wake is rare next to the requests it serves.
    let local = w
        .stream
        .local_addr()
        .map_or_else(|_| Local::default(), |a| ctx.local_for(a));
    let life = Lifetime::new(builder.keep, w.tally);
    tokio::task::spawn_local(crate::clock::Polled::new(serve_h1(
        ctx, builder, w.stream, w.peer, w.guard, local, life,
    )));
}

/// HTTP/1.1 until the connection ends or goes dormant. Each busy period starts on
/// rampart's own path (`h1::serve`); a request it hands over runs on hyper until
/// hyper's connection parks, and the next busy period starts on the own path again.
async fn serve_h1(
    ctx: Rc<WorkerCtx>,
    builder: Rc<HttpBuilder>,
    mut stream: TcpStream,
    peer: SocketAddr,
    guard: ConnGuard,
    local: Local,
    life: Lifetime,
) {
    let tracker = guard.tracker();
    let dormant = ctx.dormant.clone();
    let (svc, state) = Svc::h1(ctx, ConnInfo::new(peer, false).at(local), life);
    let keepalive = builder.waits.after_park();
    let mut replay = Bytes::new();
    loop {
        // Boxed: the busy state (buffers, the request) must not size the idle task.
        (stream, replay) =
            match boxed(|| h1::serve(&svc.ctx, &svc.info, &svc.life, builder.fast, tracker, stream, replay)).await {
                Ended::Closed => return,
                Ended::Idle(s) => (s, Bytes::new()),
                Ended::Hyper(s, bytes) => {
                    let io = idle::ParkIo::new(s, bytes, state.clone(), &builder.waits);
                    match boxed(|| idle::run_h1(&builder.h1, io, &svc, tracker)).await {
                        Some((ClientIo::Plain(io), bytes)) => (io.into_inner(), bytes),
                        _ => return,
                    }
                }
            };
        if !replay.is_empty() {
            continue;
        }
        // Idle: hand the socket to the worker's dormant set and end this task (but
        // not while stopping: the dormant set is closing; wait here, for one more
        // request or for the idle connections to close).
        if let Some(dormant) = &dormant {
            if !tracker.is_stopping() {
                let tally = svc.life.so_far();
                drop((svc, state));
                dormant.park(stream, peer, guard, keepalive, tally);
                return;
            }
        }
        if idle::wait_for_request(&stream, tracker, keepalive, &mut [0u8; 1])
            .await
            .is_none()
        {
            return;
        }
    }
}

/// A TLS connection whose first bytes arrived: the handshake, under
/// `client_header_timeout` (nginx's default for it too), then HTTP/2 if ALPN chose
/// it and HTTP/1.1 otherwise, both on hyper.
#[allow(clippy::too_many_arguments)]
async fn serve_tls(
    ctx: Rc<WorkerCtx>,
    builder: &HttpBuilder,
    stream: TcpStream,
    first: u8,
    peer: SocketAddr,
    tracker: &ConnTracker,
    tls: Arc<TlsSettings>,
    local: Local,
    life: Lifetime,
) {
    if first != crate::tls::HANDSHAKE_RECORD {
        return plain_http_to_tls(stream, peer, builder.waits.send).await;
    }
    let io = crate::netio::Gather::new(stream, builder.waits.send);
    // The failures are counted before the connection closes (the socket lives in
    // `accept`, and in the error), so whoever sees the close also sees the count.
    let mut accept = std::pin::pin!(tls.acceptor.accept(io).into_fallible());
    let stream = match tokio::time::timeout(builder.waits.header, accept.as_mut()).await {
        Ok(Ok(s)) => s,
        Ok(Err((e, _io))) => {
            tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
            ::metrics::counter!(crate::metrics::TLS_HANDSHAKE_FAILURES, "reason" => "error").increment(1);
            return;
        }
        Err(_) => {
            tracing::debug!(client = %peer, "client_header_timeout: TLS handshake incomplete");
            ::metrics::counter!(crate::metrics::TLS_HANDSHAKE_FAILURES, "reason" => "timeout").increment(1);
            return;
        }
    };
    // The client's certificate, for its requests' `X-Forwarded-Client-Cert`: made
    // once per connection.
    let client_cert = tls
        .forward_client_cert
        .then(|| {
            stream
                .get_ref()
                .1
                .peer_certificates()?
                .first()
                .and_then(crate::tls::client_cert_field)
        })
        .flatten();
    drop(tls);
    let facts = crate::tls::TlsFacts::of(stream.get_ref().1);
    let info = ConnInfo::new(peer, true)
        .at(local)
        .with_client_cert(client_cert)
        .with_tls_facts(facts);
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    let io = ClientIo::Tls(Box::new(stream));
    if h2 {
        serve_h2(ctx, builder, io, info, life, tracker).await
    } else {
        serve_tls_h1(ctx, builder, io, info, life, tracker).await
    }
}

/// HTTP/1.1 over TLS: hyper over `idle::ParkIo`, as for a plain connection's handed
/// over requests, so an idle connection gives hyper's buffers back after `PARK_AFTER`
/// and waits for its next request holding only the TLS state (rustls keeps the
/// session; a TLS connection cannot join the dormant set, whose wake-up reads bytes
/// that would have to go through rustls).
async fn serve_tls_h1(
    ctx: Rc<WorkerCtx>,
    builder: &HttpBuilder,
    mut io: ClientIo,
    info: ConnInfo,
    life: Lifetime,
    tracker: &ConnTracker,
) {
    let (svc, state) = Svc::h1(ctx, info, life);
    let keepalive = builder.waits.after_park();
    let mut replay = Bytes::new();
    loop {
        let park = idle::ParkIo::over(io, replay, state.clone(), &builder.waits);
        (io, replay) = match boxed(|| idle::run_h1(&builder.h1, park, &svc, tracker)).await {
            Some(parked) => parked,
            None => return,
        };
        if !replay.is_empty() {
            continue;
        }
        // hyper parked only after a read found nothing, in rustls as in the socket:
        // the next request starts with the socket becoming readable.
        let woke = tokio::select! {
            biased;
            _ = tracker.idle_closed() => false,
            r = tokio::time::timeout(keepalive, io.tcp().readable()) => matches!(r, Ok(Ok(()))),
        };
        if !woke {
            return;
        }
    }
}

/// Plain HTTP sent to a TLS listener: a 400 that says so, as nginx answers, rather
/// than a handshake error the client cannot show.
async fn plain_http_to_tls(mut stream: TcpStream, peer: SocketAddr, send_timeout: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BODY: &str = "This listener speaks HTTPS: the plain HTTP request was sent to an HTTPS port.\n";
    tracing::debug!(client = %peer, "plain HTTP sent to a TLS listener");
    ::metrics::counter!(crate::metrics::TLS_HANDSHAKE_FAILURES, "reason" => "plain_http").increment(1);
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(send_timeout, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent before closing: closing with unread bytes would
        // reset the connection, and the client could lose the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
}

/// An HTTP/2 connection (h2c, or TLS with ALPN h2) until it ends: closes it with a
/// GOAWAY after `keepalive_timeout` with no stream open, as nginx closes an idle
/// connection (hyper would keep it, pinging, for good), or once a stream began that
/// `keepalive_requests` or `keepalive_time` makes its last, and finishes in-flight
/// requests when the worker stops.
async fn serve_h2(
    ctx: Rc<WorkerCtx>,
    builder: &HttpBuilder,
    io: ClientIo,
    info: ConnInfo,
    life: Lifetime,
    tracker: &ConnTracker,
) {
    let peer = info.peer;
    let (svc, streams) = Svc::counted(ctx, info, life);
    let conn = builder.auto.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let stopped = tracker.stopped();
    tokio::pin!(stopped);
    let keepalive = builder.waits.keepalive;
    let idle = tokio::time::sleep(keepalive);
    tokio::pin!(idle);
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = stopped.as_mut() => {
                // Finish in-flight requests; idle connections close now.
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
            _ = streams.spent.notified() => {
                // The streams begun so far are served; the client opens a new
                // connection for the next ones (GOAWAY names the last stream taken).
                tracing::debug!(client = %peer, "keepalive_requests or keepalive_time reached: GOAWAY");
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
            _ = idle.as_mut() => match streams.idle_until(keepalive) {
                Some(at) if at <= tokio::time::Instant::now() => {
                    tracing::debug!(client = %peer, "keepalive_timeout: idle HTTP/2 connection closed");
                    conn.as_mut().graceful_shutdown();
                    break conn.await;
                }
                Some(at) => idle.as_mut().reset(at),
                None => idle.as_mut().reset(tokio::time::Instant::now() + keepalive),
            },
        }
    };
    if let Err(e) = result {
        tracing::debug!(client = %peer, error = %e, "client connection ended with error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_address_is_seen_as_taken_and_a_free_one_is_not() {
        let held = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = held.local_addr().unwrap();
        assert!(already_bound(addr), "a listener holds {addr}");
        // rampart's own bind still succeeds alongside it (both set SO_REUSEPORT).
        let shared = bind(addr, 16).unwrap();
        drop((held, shared));
        assert!(!already_bound(addr), "{addr} is free again");
    }
}
