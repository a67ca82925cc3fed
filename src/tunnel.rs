//! Upgraded connections (WebSocket and any other `Upgrade` protocol) after the
//! backend's 101: bytes are copied both ways until either side closes, or nothing
//! has moved either way for the pool's `tunnel_idle_timeout` (HAProxy's
//! `timeout tunnel`). A tunnel is still an open client connection: it counts
//! against `max_connections`, and shutdown waits for it up to `shutdown_grace`.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::listener::ConnGuard;
use crate::netio::{ClientIo, UpIo};
use crate::state::Shared;

/// The client's half, before it is handed over.
pub enum ClientSide {
    /// hyper completes the upgrade once the 101 is written.
    Hyper(hyper::upgrade::OnUpgrade),
    /// `idle::run_h1` hands the socket over once the 101 is written.
    Manual(tokio::sync::oneshot::Receiver<crate::idle::Upgraded>),
}

/// How a tunnel ended.
enum Ended {
    Closed,
    Idle,
}

/// What keeps a tunnel counted: as a client connection of its worker, and in
/// `Shared::tunnels`.
pub struct Counted {
    _conn: ConnGuard,
    shared: Arc<Shared>,
    /// The request's place under its route's `in_flight_limit`: a tunnel is a
    /// request in flight until it closes, as in nginx's `limit_conn`.
    _held: Option<crate::inflight::InFlightSlot>,
}

impl Counted {
    pub fn new(conn: ConnGuard, shared: Arc<Shared>, held: Option<crate::inflight::InFlightSlot>) -> Counted {
        shared.tunnels.fetch_add(1, Ordering::Relaxed);
        Counted {
            _conn: conn,
            shared,
            _held: held,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.shared.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One tunnel, ready to run once the 101 goes out. `upstream` holds the backend
/// connection (TLS or not) and what it sent right after its 101.
pub struct Tunnel {
    client: ClientSide,
    upstream: (UpIo, Bytes),
    backend: SocketAddr,
    idle: Duration,
    open: Counted,
}

pub fn new(client: ClientSide, upstream: (UpIo, Bytes), backend: SocketAddr, idle: Duration, open: Counted) -> Tunnel {
    Tunnel {
        client,
        upstream,
        backend,
        idle,
        open,
    }
}

impl Tunnel {
    /// Runs the tunnel to its end, then ends the request's access-log line, if it has
    /// one, with the bytes the backend sent the client through it and how it closed.
    pub async fn run(self, log: Option<Box<crate::accesslog::Pending>>) {
        let (to_client, how) = self.splice().await;
        if let Some(log) = log {
            log.tunnel_ended(to_client, how);
        }
    }

    /// Returns the bytes sent to the client and, for the log, how the tunnel ended.
    async fn splice(self) -> (u64, &'static str) {
        let Tunnel {
            client,
            upstream,
            backend,
            idle,
            open: _open,
        } = self;
        let (mut upstream, from_backend) = upstream;
        let to_client = Cell::new(0);
        let result = match client {
            ClientSide::Hyper(on) => match on.await {
                Ok(c) => splice(TokioIo::new(c), &mut upstream, &[], &from_backend, idle, &to_client).await,
                Err(e) => {
                    tracing::debug!(backend = %backend, error = %e, "client upgrade failed");
                    return (0, "client_aborted");
                }
            },
            ClientSide::Manual(rx) => match rx.await {
                // Bytes the client sent right behind its upgrade request go first.
                Ok((ClientIo::Plain(io), early)) => {
                    splice(io.into_inner(), &mut upstream, &early, &from_backend, idle, &to_client).await
                }
                Ok((ClientIo::Tls(mut io), early)) => {
                    // rustls writes through the socket's `send_timeout` watch: a tunnel
                    // waits on a client that reads nothing as long as it would in the
                    // clear, until it has been idle for `tunnel_idle_timeout`.
                    io.get_mut().0.set_send_timeout(idle);
                    splice(io, &mut upstream, &early, &from_backend, idle, &to_client).await
                }
                Err(_) => {
                    tracing::debug!(backend = %backend, "client connection closed before the upgrade");
                    return (0, "client_aborted");
                }
            },
        };
        let how = match result {
            Ok(Ended::Closed) => "-",
            Ok(Ended::Idle) => {
                tracing::debug!(backend = %backend, idle = ?idle, "tunnel idle; closed");
                "tunnel_idle_timeout"
            }
            Err(e) => {
                tracing::debug!(backend = %backend, error = %e, "tunnel closed with error");
                crate::accesslog::TUNNEL_ERROR
            }
        };
        (to_client.get(), how)
    }
}

/// Delivers bytes each side sent early, then copies both ways until a side closes
/// or the tunnel has been idle for `idle`.
async fn splice<C>(
    client: C,
    upstream: &mut UpIo,
    to_backend: &[u8],
    to_client: &[u8],
    idle: Duration,
    sent: &Cell<u64>,
) -> io::Result<Ended>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let last = Cell::new(crate::clock::now());
    let to_backend_count = Cell::new(0);
    let mut client = Watched {
        io: client,
        last: &last,
        read: &to_backend_count,
    };
    let mut upstream = Watched {
        io: upstream,
        last: &last,
        read: sent,
    };
    // Flushed: over TLS the bytes could otherwise wait in rustls until the first
    // write of the copy below.
    upstream.io.write_all(to_backend).await?;
    upstream.io.flush().await?;
    client.io.write_all(to_client).await?;
    client.io.flush().await?;
    sent.set(to_client.len() as u64);
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    // One timer for the tunnel's life, moved on to the last byte's deadline when it
    // fires early, rather than one reset per read.
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            biased;
            done = &mut copy => return done.map(|_| Ended::Closed),
            () = &mut timer => {
                let due = last.get() + idle;
                if due <= crate::clock::now() {
                    return Ok(Ended::Idle);
                }
                timer.as_mut().reset(due.into());
            }
        }
    }
}

/// A stream that notes when it last read a byte. A read on either side is activity;
/// a side whose peer stops reading stops being read from, so a stalled tunnel is an
/// idle one.
struct Watched<'a, S> {
    io: S,
    last: &'a Cell<Instant>,
    /// Bytes read from this side (so written to the other), for the access log.
    read: &'a Cell<u64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.last.set(crate::clock::now());
            this.read.set(this.read.get() + n as u64);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
