//! One worker: a thread with its own current-thread tokio runtime (`LocalRuntime`), its
//! own listening sockets and its own upstream connection pool. Workers share only the
//! read-mostly `Shared` state (config snapshot, backend atomics).

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::error::StartupError;
use crate::listener::{self, ConnTracker, HttpBuilder};
use crate::proxy::RequestIds;
use crate::state::Shared;
use crate::upstream::ConnPool;

/// How often idle upstream connections are checked for expiry.
const POOL_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// How far ahead a busy worker keeps a timer armed (`TimerFloor`): below
/// `retry::HEDGE_MIN_DELAY`, the soonest timer a request registers.
const TIMER_FLOOR: Duration = Duration::from_millis(20);

/// Keeps the runtime's next timer wake near while requests flow, so the timers each
/// request registers are never the earliest.
///
/// tokio's timer driver writes to the runtime's eventfd whenever a timer is
/// registered to fire before the driver's planned wake-up (and the next `epoll_wait`
/// then returns at once, for nothing: on a current-thread runtime the driver is never
/// parked while a task runs). Every idempotent request arms its hedge timer 25 ms or
/// more ahead, which at moderate load was usually the earliest timer: two extra
/// system calls per request (`strace -c`). While requests arrive, one timer re-armed
/// every `TIMER_FLOOR` keeps the planned wake-up sooner than any of them; it stops
/// after a quiet tick, so an idle worker does not wake.
#[derive(Default)]
pub struct TimerFloor {
    started: Cell<u64>,
    idle: Cell<bool>,
    wake: Notify,
}

impl TimerFloor {
    /// Called as each request starts.
    pub fn request_started(&self) {
        self.started.set(self.started.get().wrapping_add(1));
        if self.idle.replace(false) {
            self.wake.notify_one();
        }
    }

    async fn run(&self) {
        loop {
            let seen = self.started.get();
            tokio::time::sleep(TIMER_FLOOR).await;
            if self.started.get() == seen {
                self.idle.set(true);
                self.wake.notified().await;
            }
        }
    }
}

/// Everything a request handler on this worker may use.
pub struct WorkerCtx {
    pub index: usize,
    pub shared: Arc<Shared>,
    pub conns: Rc<ConnPool>,
    /// HTTP/2 connections to the backends of `protocol = "h2"` pools.
    pub h2: Rc<crate::h2up::H2Conns>,
    pub ids: RequestIds,
    /// Where idle keep-alive connections wait without a task (`None` if the worker
    /// could not create its epoll set: they then wait in their own tasks).
    pub dormant: Option<Rc<crate::dormant::Dormant>>,
    pub timer_floor: TimerFloor,
    /// This worker's unwritten access-log lines.
    pub access_log: crate::accesslog::LogBuf,
    /// Open client connections, tunnels included: for the cap and for drain.
    pub tracker: Rc<ConnTracker>,
    /// New connections' builders, and the config they were made from.
    builder: RefCell<(Arc<Config>, Rc<HttpBuilder>)>,
    /// This worker's listening sockets, for `local_for`.
    listeners: RefCell<Vec<ListeningOn>>,
}

/// A listening socket of this worker.
struct ListeningOn {
    /// The address bound (port 0 resolved).
    bound: SocketAddr,
    /// The `bind` it was configured with.
    bind: SocketAddr,
    /// Its name and `https_redirect` when it started.
    name: Option<Arc<str>>,
    https_redirect: bool,
}

/// Lines recorded after the worker's last flush (requests whose tasks were dropped with
/// the runtime, each logging how it ended) are written when the last task lets go.
impl Drop for WorkerCtx {
    fn drop(&mut self) {
        self.access_log.flush(&self.shared);
    }
}

impl WorkerCtx {
    /// Notes a listening socket this worker accepts on, for `local_for`.
    pub fn register_listener(&self, bound: SocketAddr, cfg: &crate::config::ListenerConfig) {
        let mut table = self.listeners.borrow_mut();
        table.retain(|l| l.bound != bound);
        table.push(ListeningOn {
            bound,
            bind: cfg.bind,
            name: cfg.name.clone(),
            https_redirect: cfg.https_redirect,
        });
    }

    /// Which listener a connection whose local address is `addr` came in on: the
    /// socket bound to it, or to the unspecified address on its port. The name and
    /// `https_redirect` are the latest config's for that `bind`, so a reload that
    /// changes them applies to the connections it accepts next; a listener on port
    /// 0 (tests) keeps what it started with.
    pub fn local_for(&self, addr: SocketAddr) -> crate::proxy::Local {
        let table = self.listeners.borrow();
        let entry = table.iter().find(|l| l.bound == addr).or_else(|| {
            table
                .iter()
                .find(|l| l.bound.ip().is_unspecified() && l.bound.port() == addr.port())
        });
        let (name, https_redirect) = entry.map_or((None, false), |on| {
            let snap = self.shared.snapshot.load();
            match snap.config.listeners.iter().find(|l| l.bind == on.bind) {
                Some(l) if on.bind.port() != 0 => (l.name.clone(), l.https_redirect),
                _ => (on.name.clone(), on.https_redirect),
            }
        });
        crate::proxy::Local {
            port: addr.port(),
            name,
            https_redirect,
        }
    }

    /// The builders for a new connection (or a dormant one waking): remade after a
    /// reload changed `[server]`, so its timeouts and limits apply without a restart.
    /// Once per connection, not per request.
    pub fn http_builder(&self) -> Rc<HttpBuilder> {
        let snap = self.shared.snapshot.load();
        let mut cur = self.builder.borrow_mut();
        if !Arc::ptr_eq(&cur.0, &snap.config) {
            if cur.0.server != snap.config.server {
                cur.1 = Rc::new(listener::http_builder(&snap.config.server));
            }
            cur.0 = snap.config.clone();
        }
        cur.1.clone()
    }
}

pub fn spawn(
    index: usize,
    shared: Arc<Shared>,
    listeners: listener::NewListeners,
    shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, StartupError> {
    spawn_runtime_thread(format!("rampart-w{index}"), move || {
        run(index, shared, listeners, shutdown)
    })
}

/// Starts a named thread running `main()` to completion on its own `LocalRuntime` (a
/// current-thread runtime that runs `!Send` tasks, so `spawn_local` works). Unlike a
/// `LocalSet` on a current-thread runtime, a task woken by the I/O driver goes
/// straight onto the run queue: a `LocalSet` pushed it through a mutex-guarded
/// remote queue and woke the runtime through its eventfd (~0.5 extra `write` calls per
/// proxied request under `strace -c`). The runtime is built on its thread, which
/// reports failure back before this returns, so it is a startup error, not a panic.
pub fn spawn_runtime_thread<F, Fut>(name: String, main: F) -> Result<JoinHandle<()>, StartupError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build_local(tokio::runtime::LocalOptions::default());
            match rt {
                Ok(rt) => {
                    let _ = tx.send(Ok(()));
                    rt.block_on(main());
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })
        .map_err(StartupError::Thread)?;
    match rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => Err(StartupError::Runtime(e)),
        Err(_) => Err(StartupError::Runtime(std::io::Error::other(
            "runtime thread exited at start",
        ))),
    }
}

async fn run(
    index: usize,
    shared: Arc<Shared>,
    listeners: listener::NewListeners,
    mut shutdown: watch::Receiver<bool>,
) {
    let config = shared.snapshot.load().config.clone();
    let builder = RefCell::new((config.clone(), Rc::new(listener::http_builder(&config.server))));
    let dormant = crate::dormant::Dormant::new(shared.clone());
    let tracker = Rc::new(ConnTracker::new(shared.clone()));
    let ctx = Rc::new(WorkerCtx {
        index,
        shared,
        conns: ConnPool::new(),
        h2: Rc::default(),
        ids: RequestIds::new(),
        dormant: match dormant {
            Ok(d) => Some(Rc::new(d)),
            Err(e) => {
                tracing::warn!(worker = index, error = %e, "no dormant set; idle connections keep their tasks");
                None
            }
        },
        timer_floor: TimerFloor::default(),
        access_log: Default::default(),
        tracker: tracker.clone(),
        builder,
        listeners: RefCell::default(),
    });
    let floor_ctx = ctx.clone();
    let floor = tokio::task::spawn_local(async move { floor_ctx.timer_floor.run().await });
    let log_ctx = ctx.clone();
    let log_flusher = tokio::task::spawn_local(async move { log_ctx.access_log.run_flusher(&log_ctx.shared).await });
    if let Some(dormant) = ctx.dormant.clone() {
        let ctx = ctx.clone();
        tokio::task::spawn_local(crate::dormant::run(dormant, tracker.clone(), move |w| {
            listener::resume(ctx.clone(), w)
        }));
    }
    let managed = tokio::task::spawn_local(listener::manage(ctx.clone(), listeners, shutdown.clone()));
    let (conns, h2) = (ctx.conns.clone(), ctx.h2.clone());
    let (dormant, open) = (ctx.dormant.clone(), tracker.clone());
    let sweeper = tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(POOL_SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            // Closed connections free their buffers at once (no connection tasks),
            // so this tick's collect below returns them.
            conns.sweep();
            h2.sweep();
            // Every open connection dormant: nothing is in flight, so give back all
            // freed memory now rather than page by page over the next seconds.
            let quiet = dormant.as_ref().is_some_and(|d| d.len() == open.active());
            crate::trim_allocator(quiet);
        }
    });

    crate::stopped(&mut shutdown).await;
    tracker.stop();
    let open = tracker.active();
    tracing::info!(worker = index, open_connections = open, "draining");
    // As the config is now, after any reload.
    let grace = ctx.shared.snapshot.load().config.server.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    let drained = async {
        // Idle keep-alive connections first get a moment for one more request.
        tokio::select! {
            _ = tracker.drained() => return,
            _ = tokio::time::sleep(listener::DRAIN_IDLE.min(grace)) => tracker.close_idle(),
        }
        tracker.drained().await
    };
    if tokio::time::timeout_at(deadline, drained).await.is_err() {
        tracing::warn!(
            worker = index,
            open_connections = tracker.active(),
            "shutdown grace expired; closing the rest"
        );
    }
    managed.abort();
    sweeper.abort();
    floor.abort();
    log_flusher.abort();
    ctx.access_log.flush(&ctx.shared);
    ctx.conns.clear();
    ctx.h2.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives `run` for `d` of (paused) time.
    async fn advance(run: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>, d: Duration) {
        tokio::select! {
            _ = run.as_mut() => unreachable!("the floor runs forever"),
            _ = tokio::time::sleep(d) => {}
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_floor_ticks_while_requests_arrive_and_rests_after_a_quiet_tick() {
        let floor = TimerFloor::default();
        let run = floor.run();
        tokio::pin!(run);
        advance(&mut run, TIMER_FLOOR + Duration::from_millis(5)).await;
        assert!(floor.idle.get(), "no request: resting after one tick");
        floor.request_started();
        assert!(!floor.idle.get());
        // Requests every half tick: every tick sees one.
        for _ in 0..10 {
            floor.request_started();
            advance(&mut run, TIMER_FLOOR / 2).await;
            assert!(!floor.idle.get(), "requests in every tick keep it ticking");
        }
        advance(&mut run, TIMER_FLOOR * 3).await;
        assert!(floor.idle.get(), "resting again once requests stop");
    }
}
