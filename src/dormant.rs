//! Dormant client connections: HTTP/1.1 keep-alive connections that have parked
//! (`idle::ParkIo`: no request for `PARK_AFTER`) and wait for their next request with
//! no task, no hyper state and no tokio registration. Each costs one slot here (the
//! socket, the peer address, its connection-count guard) and an entry in the worker's
//! own epoll set, which tokio watches as a single file descriptor. This is how nginx
//! keeps an idle keep-alive connection at a few hundred bytes.
//!
//! When bytes arrive, the socket goes back to tokio and a new connection task starts
//! (`listener::resume`). A dormant connection closes when `keepalive_timeout` passes,
//! or when a stopping worker closes its idle connections (`listener::DRAIN_IDLE`
//! after the stop; one that sends a request before then is answered, and closed).
//!
//! Owns: the epoll set, the slots (56 bytes each, allocated `CHUNK` at a time) and
//! their deadlines (checked by a scan every `SCAN_EVERY`, so a dormant connection
//! closes up to that much after its deadline, and memory stays one slot per
//! connection), and the task that serves them.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::idle::Tally;
use crate::listener::{ConnGuard, ConnTracker};
use crate::state::Shared;

/// Readiness events taken per `epoll_wait`.
const BATCH: usize = 64;

/// How often deadlines are checked while any connection is dormant.
const SCAN_EVERY: Duration = Duration::from_millis(250);

/// Slots are allocated this many at a time, so the table never holds more than one
/// partly used chunk of spare room (a `Vec` doubling would hold up to 2x).
const CHUNK: usize = 256;

/// One dormant connection: 56 bytes.
struct Slot {
    stream: Option<std::net::TcpStream>,
    /// Bumped on reuse, so stale events for an old tenant are ignored.
    generation: u32,
    /// Milliseconds since `Dormant::epoch` (wrapping; waits are far below 24 days).
    deadline_ms: u32,
    /// When the connection's first bytes came, in whole seconds since `Dormant::epoch`
    /// (rounded down: it wakes up to a second older), the requests it has begun and
    /// its serial number: its `idle::Tally`.
    born_s: u32,
    begun: u32,
    serial: u64,
    peer: PeerAddr,
    guard: Option<ConnGuard>,
}

/// A peer address in 19 bytes instead of `SocketAddr`'s 32 (IPv6 scope and flow
/// label are not kept: the proxy only reports the address and port).
#[derive(Clone, Copy)]
struct PeerAddr {
    ip: [u8; 16],
    port: u16,
    v4: bool,
}

impl PeerAddr {
    const EMPTY: PeerAddr = PeerAddr {
        ip: [0; 16],
        port: 0,
        v4: true,
    };

    fn new(a: SocketAddr) -> PeerAddr {
        match a {
            SocketAddr::V4(v4) => PeerAddr {
                ip: v4.ip().to_ipv6_mapped().octets(),
                port: v4.port(),
                v4: true,
            },
            SocketAddr::V6(v6) => PeerAddr {
                ip: v6.ip().octets(),
                port: v6.port(),
                v4: false,
            },
        }
    }

    fn get(self) -> SocketAddr {
        let v6 = std::net::Ipv6Addr::from(self.ip);
        match (self.v4, v6.to_ipv4_mapped()) {
            (true, Some(v4)) => SocketAddr::from((v4, self.port)),
            _ => SocketAddr::from((v6, self.port)),
        }
    }
}

/// A connection handed back to a task: its socket (registered with tokio again), its
/// peer, its guard and its `idle::Lifetime` so far.
pub struct Woken {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub guard: ConnGuard,
    pub tally: Tally,
}

/// A connection taken out of its slot, its socket not yet back with tokio.
struct Taken {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    guard: ConnGuard,
    tally: Tally,
}

pub struct Dormant {
    epoll: AsyncFd<OwnedFd>,
    chunks: RefCell<Vec<Box<[Slot]>>>,
    free: RefCell<Vec<u32>>,
    epoch: Instant,
    /// Wakes the task when the first connection goes dormant.
    armed: Notify,
    shared: Arc<Shared>,
}

impl Dormant {
    /// A worker's dormant set; must be created on the worker's runtime.
    pub fn new(shared: Arc<Shared>) -> io::Result<Dormant> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Dormant {
            // SAFETY: an `OwnedFd` stays open, and is the same descriptor, for as long
            // as the `AsyncFd` owning it.
            epoll: unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }.map_err(io::Error::from)?,
            chunks: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            epoch: Instant::now(),
            armed: Notify::new(),
            shared,
        })
    }

    /// How many connections are dormant.
    pub fn len(&self) -> usize {
        self.chunks.borrow().len() * CHUNK - self.free.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn now_ms(&self) -> u32 {
        self.epoch.elapsed().as_millis() as u32
    }

    /// A free slot's index, growing the table by a chunk when none is left.
    fn vacant(&self) -> u32 {
        let mut free = self.free.borrow_mut();
        if free.is_empty() {
            let mut chunks = self.chunks.borrow_mut();
            let base = (chunks.len() * CHUNK) as u32;
            chunks.push(
                (0..CHUNK)
                    .map(|_| Slot {
                        stream: None,
                        generation: 0,
                        deadline_ms: 0,
                        born_s: 0,
                        begun: 0,
                        serial: 0,
                        peer: PeerAddr::EMPTY,
                        guard: None,
                    })
                    .collect(),
            );
            // Lowest index on top, so the first chunks fill first.
            free.extend((base..base + CHUNK as u32).rev());
        }
        free.pop().unwrap_or_default()
    }

    fn with_slot<R>(&self, idx: u32, f: impl FnOnce(&mut Slot) -> R) -> Option<R> {
        let mut chunks = self.chunks.borrow_mut();
        let slot = chunks.get_mut(idx as usize / CHUNK)?.get_mut(idx as usize % CHUNK)?;
        Some(f(slot))
    }

    /// Puts a connection to sleep until its next byte or `wait` passes. On failure
    /// the connection is simply closed (it was idle). `tally` is handed back when it
    /// wakes.
    pub fn park(&self, stream: TcpStream, peer: SocketAddr, guard: ConnGuard, wait: Duration, tally: Tally) {
        let Ok(stream) = stream.into_std() else {
            return;
        };
        let idx = self.vacant();
        let Some(generation) = self.with_slot(idx, |s| {
            s.generation = s.generation.wrapping_add(1);
            s.generation
        }) else {
            return;
        };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: token(idx, generation),
        };
        // SAFETY: both descriptors are open; `ev` outlives the call.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, stream.as_raw_fd(), &mut ev) };
        if rc != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "cannot park connection; closing it");
            self.free.borrow_mut().push(idx);
            return;
        }
        let deadline_ms = self
            .now_ms()
            .wrapping_add(wait.as_millis().min(u32::MAX as u128 / 2) as u32);
        let born_s = tally
            .born
            .saturating_duration_since(self.epoch.into_std())
            .as_secs()
            .min(u32::MAX as u64) as u32;
        self.with_slot(idx, |s| {
            s.stream = Some(stream);
            s.peer = PeerAddr::new(peer);
            s.guard = Some(guard);
            s.deadline_ms = deadline_ms;
            s.born_s = born_s;
            s.begun = tally.begun;
            s.serial = tally.serial;
        });
        self.shared.dormant_connections.fetch_add(1, Ordering::Relaxed);
        if self.len() == 1 {
            self.armed.notify_one();
        }
    }

    /// Takes the connection out of its slot, if `generation` is still its tenant.
    fn take(&self, idx: u32, generation: u32) -> Option<Taken> {
        let epoch = self.epoch.into_std();
        let taken = self.with_slot(idx, |s| {
            if s.generation != generation {
                return None;
            }
            Some(Taken {
                stream: s.stream.take()?,
                peer: s.peer.get(),
                guard: s.guard.take()?,
                tally: Tally {
                    born: epoch + Duration::from_secs(s.born_s.into()),
                    begun: s.begun,
                    serial: s.serial,
                },
            })
        })??;
        let stream = &taken.stream;
        // SAFETY: both descriptors are open; DEL ignores the event argument.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                stream.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
        self.free.borrow_mut().push(idx);
        self.shared.dormant_connections.fetch_sub(1, Ordering::Relaxed);
        Some(taken)
    }

    /// Connections whose socket became readable (a request, or the client closing).
    /// Returns how many events there were.
    fn ready(&self, out: &mut Vec<Woken>) -> usize {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        // SAFETY: `events` has room for BATCH entries; timeout 0 never blocks.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), BATCH as i32, 0) };
        for ev in events.iter().take(n.max(0) as usize) {
            let (idx, generation) = untoken(ev.u64);
            let Some(t) = self.take(idx, generation) else {
                continue;
            };
            match TcpStream::from_std(t.stream) {
                Ok(stream) => out.push(Woken {
                    stream,
                    peer: t.peer,
                    guard: t.guard,
                    tally: t.tally,
                }),
                Err(e) => tracing::debug!(error = %e, "cannot resume connection"),
            }
        }
        n.max(0) as usize
    }

    /// The tenants matching `pred`, as (index, generation).
    fn tenants(&self, pred: impl Fn(&Slot) -> bool) -> Vec<(u32, u32)> {
        let chunks = self.chunks.borrow();
        chunks
            .iter()
            .flat_map(|c| c.iter())
            .enumerate()
            .filter(|(_, s)| s.stream.is_some() && pred(s))
            .map(|(i, s)| (i as u32, s.generation))
            .collect()
    }

    /// Closes the connections whose keep-alive wait has passed.
    fn expire(&self) {
        let now = self.now_ms();
        // Wrapping: due when the deadline is not ahead of now.
        for (idx, generation) in self.tenants(|s| (now.wrapping_sub(s.deadline_ms) as i32) >= 0) {
            drop(self.take(idx, generation));
        }
    }

    /// Closes every dormant connection (the worker is stopping).
    fn close_all(&self) {
        for (idx, generation) in self.tenants(|_| true) {
            drop(self.take(idx, generation));
        }
    }
}

fn token(idx: u32, generation: u32) -> u64 {
    (generation as u64) << 32 | idx as u64
}

fn untoken(t: u64) -> (u32, u32) {
    (t as u32, (t >> 32) as u32)
}

/// The worker's dormant-connection task: wakes connections that have bytes to read
/// (handing each to `resume`), closes those past their deadline, and closes all of
/// them when the stopping worker closes its idle connections.
pub async fn run(dormant: Rc<Dormant>, tracker: Rc<ConnTracker>, resume: impl Fn(Woken)) {
    let mut woken = Vec::new();
    let mut next_scan = Instant::now() + SCAN_EVERY;
    loop {
        let timer = async {
            if dormant.is_empty() {
                dormant.armed.notified().await;
            } else {
                tokio::time::sleep_until(next_scan).await;
            }
        };
        tokio::select! {
            biased;
            _ = tracker.idle_closed() => {
                dormant.close_all();
                return;
            }
            r = dormant.epoll.readable() => {
                let Ok(mut guard) = r else {
                    // The epoll descriptor failed: nothing more can wake; close all.
                    dormant.close_all();
                    return;
                };
                if dormant.ready(&mut woken) < BATCH {
                    guard.clear_ready();
                }
                for w in woken.drain(..) {
                    resume(w);
                }
            }
            _ = timer => {
                let now = Instant::now();
                if now >= next_scan {
                    dormant.expire();
                    next_scan = now + SCAN_EVERY;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_small_and_keeps_the_peer_address() {
        assert!(std::mem::size_of::<Slot>() <= 56, "{}", std::mem::size_of::<Slot>());
        for a in [
            "192.0.2.7:51000",
            "[2001:db8::1]:443",
            "[::ffff:192.0.2.7]:80",
            "0.0.0.0:0",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(PeerAddr::new(a).get(), a);
        }
    }
}
