//! Backend connections: connecting with a timeout, and each worker's own pool of idle
//! HTTP/1.1 keep-alive connections. The pool is worker-local (`Rc<RefCell<…>>` on a
//! current-thread runtime), so checkout and checkin take no lock and wake no other
//! thread. Connections are hyper's low-level `SendRequest`, with the connection driver
//! spawned on the worker's `LocalSet`.
//!
//! This module does not decide which backend to use (`balancer`), nor whether to retry
//! (`proxy`/`retry`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::ReqBody;
use crate::error::ProxyError;

pub type Sender = http1::SendRequest<ReqBody>;

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
    /// backends do not linger past `idle_timeout`.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.borrow_mut();
        idle.retain(|_, list| {
            list.retain(|c| c.expires > now && !c.tx.is_closed());
            !list.is_empty()
        });
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

/// Opens a connection to `addr` and spawns its driver on the current `LocalSet`.
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
    let (tx, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
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
    Ok(tx)
}
