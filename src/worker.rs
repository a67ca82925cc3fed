//! One worker: a thread with its own current-thread tokio runtime (`LocalRuntime`), its
//! own listening sockets and its own upstream connection pool. Workers share only the
//! read-mostly `Shared` state (config snapshot, backend atomics).

use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::StartupError;
use crate::listener::{self, ConnTracker};
use crate::proxy::RequestIds;
use crate::state::Shared;
use crate::upstream::ConnPool;

/// How often idle upstream connections are checked for expiry.
const POOL_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Everything a request handler on this worker may use.
pub struct WorkerCtx {
    pub index: usize,
    pub shared: Arc<Shared>,
    pub conns: Rc<ConnPool>,
    pub ids: RequestIds,
    /// Where idle keep-alive connections wait without a task (`None` if the worker
    /// could not create its epoll set: they then wait in their own tasks).
    pub dormant: Option<Rc<crate::dormant::Dormant>>,
}

pub fn spawn(
    index: usize,
    shared: Arc<Shared>,
    listeners: Vec<std::net::TcpListener>,
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
    listeners: Vec<std::net::TcpListener>,
    mut shutdown: watch::Receiver<bool>,
) {
    let server = shared.snapshot.load().config.server.clone();
    let dormant = crate::dormant::Dormant::new(shared.clone());
    let ctx = Rc::new(WorkerCtx {
        index,
        shared,
        conns: ConnPool::new(),
        ids: RequestIds::new(),
        dormant: match dormant {
            Ok(d) => Some(Rc::new(d)),
            Err(e) => {
                tracing::warn!(worker = index, error = %e, "no dormant set; idle connections keep their tasks");
                None
            }
        },
    });
    let builder = Rc::new(listener::http_builder(&server));
    let tracker = Rc::new(ConnTracker::default());
    if let Some(dormant) = ctx.dormant.clone() {
        let (ctx, builder) = (ctx.clone(), builder.clone());
        tokio::task::spawn_local(crate::dormant::run(dormant, tracker.clone(), move |w| {
            listener::resume(ctx.clone(), builder.clone(), w)
        }));
    }
    for l in listeners {
        match TcpListener::from_std(l) {
            Ok(l) => {
                tokio::task::spawn_local(listener::accept_loop(
                    ctx.clone(),
                    builder.clone(),
                    tracker.clone(),
                    l,
                    server.max_connections,
                    shutdown.clone(),
                ));
            }
            Err(e) => tracing::error!(worker = index, error = %e, "cannot register listener"),
        }
    }
    let conns = ctx.conns.clone();
    let (dormant, open) = (ctx.dormant.clone(), tracker.clone());
    let sweeper = tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(POOL_SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            // Closed connections free their buffers at once (no connection tasks),
            // so this tick's collect below returns them.
            conns.sweep();
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
    if tokio::time::timeout(server.shutdown_grace, tracker.drained())
        .await
        .is_err()
    {
        tracing::warn!(
            worker = index,
            open_connections = tracker.active(),
            "shutdown grace expired; closing the rest"
        );
    }
    sweeper.abort();
    ctx.conns.clear();
}
