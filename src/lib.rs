//! rampart: an HTTP (L7) load balancer that ejects a failing backend before any client
//! sees a 502. This file holds the module list and [`Server`], which starts workers,
//! the admin listener and the control loop, so tests and `main.rs` drive the same code.
//!
//! Threads: `workers` data-path threads (each a current-thread runtime with its own
//! `SO_REUSEPORT` sockets and upstream pools), plus one control thread for the admin
//! listener, active health checks and DNS refreshes, which run once per process, not
//! per worker.

pub mod accesslog;
pub mod admin;
pub mod alloc;
pub mod auth;
pub mod backend_tls;
pub mod balancer;
pub mod body;
pub mod breaker;
pub mod clock;
pub mod codec;
pub mod compress;
pub mod config;
pub mod demo;
pub mod dns;
pub mod dormant;
pub mod error;
pub mod filewatch;
pub mod forward;
pub mod grpc_health;
pub mod h1;
pub mod h2up;
pub mod header_rules;
pub mod health;
pub mod idle;
pub mod inflight;
pub mod listener;
pub mod metrics;
pub mod mirror;
pub mod netio;
pub mod outlier;
pub mod proxy;
pub mod proxyproto;
pub mod ratelimit;
pub mod rawfields;
pub mod retry;
pub mod router;
pub mod state;
pub mod tls;
pub mod tunnel;
pub mod upgrade;
pub mod upstream;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::watch;

pub use config::Config;
pub use error::StartupError;
use state::Shared;

/// A running rampart. Dropping it starts a graceful shutdown without waiting.
pub struct Server {
    shared: Arc<Shared>,
    addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
    /// Each worker's way to new listening sockets (`listener::manage`).
    listeners: Vec<tokio::sync::mpsc::UnboundedSender<(std::net::TcpListener, config::ListenerConfig)>>,
    /// Every listening socket, for a handover to a new process (`upgrade`).
    sockets: Mutex<upgrade::Inventory>,
}

/// Opens the access log `target` names (`None`: off), for start-up and reload alike.
fn open_access_log(target: &config::AccessLog) -> Result<Option<Arc<accesslog::Sink>>, StartupError> {
    accesslog::Sink::open(target)
        .map(|sink| sink.map(Arc::new))
        .map_err(|e| StartupError::AccessLog {
            path: target.to_string(),
            source: e,
        })
}

impl Server {
    /// Binds every socket (so bind errors surface here), then starts the threads.
    pub fn start(config: Config) -> Result<Server, StartupError> {
        Server::start_with(config, &mut upgrade::Inherited::default())
    }

    /// `start`, serving on the sockets a handover passed where the config names
    /// their address (`upgrade`), and binding the rest.
    pub fn start_with(config: Config, inherited: &mut upgrade::Inherited) -> Result<Server, StartupError> {
        metrics::install();
        raise_fd_limit();
        disable_transparent_huge_pages();
        let workers = config.server.workers;
        let mut inventory = upgrade::Inventory::default();
        // The admin socket first: once a client port answers, so does the admin one
        // (a probe or a script that waits for the first may ask the second at once).
        let admin = match &config.admin {
            Some(a) => {
                let l = match inherited.take_admin(a.bind) {
                    Some(l) => l,
                    None => listener::bind(a.bind, 128).map_err(|e| StartupError::Bind {
                        addr: a.bind,
                        source: e,
                    })?,
                };
                let addr = l.local_addr().map_err(|e| StartupError::Bind {
                    addr: a.bind,
                    source: e,
                })?;
                inventory
                    .set_admin(a.bind, &l)
                    .map_err(|e| StartupError::Bind { addr, source: e })?;
                Some((l, addr))
            }
            None => None,
        };
        let bound = listener::bind_all(&config.listeners, workers, inherited)?;
        let addrs: Vec<SocketAddr> = bound.iter().map(|b| b.addr).collect();
        inventory.add(&bound)?;
        for addr in inherited.left_over() {
            tracing::info!(bind = %addr, "inherited listener not in the config: closed");
        }
        let admin_addr = admin.as_ref().map(|(_, a)| *a);
        let sink = open_access_log(&config.server.access_log)?;
        crate::tls::log_certificates(&config);
        let shared = Arc::new(Shared::new(Arc::new(config)));
        shared.access_log.store(sink);
        // The saved admin states first: a handover's, below, are newer.
        admin::load_states(&shared.snapshot.load());
        if let Some(bytes) = inherited.take_state() {
            match serde_json::from_slice::<Vec<state::Handed>>(&bytes) {
                Ok(handed) => {
                    let taken = shared.snapshot.load().take_over(&handed);
                    tracing::info!(
                        backends = taken,
                        "took over the old process's backend health and ejections"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the old process's backend state; starting afresh"),
            }
        }
        // Weights an operator set (saved or handed over) reach the balancers through
        // a snapshot built with them.
        if shared.snapshot.load().has_set_weights() {
            shared.rebuild();
        }
        let (tx, rx) = watch::channel(false);

        let mut threads = Vec::new();
        let mut senders = Vec::new();
        for (i, listeners) in listener::deal(bound, workers).into_iter().enumerate() {
            let (send, recv) = tokio::sync::mpsc::unbounded_channel();
            for l in listeners {
                // The receiver is alive: it is about to be handed to the worker.
                let _ = send.send(l);
            }
            senders.push(send);
            threads.push(worker::spawn(i, shared.clone(), recv, rx.clone())?);
        }
        threads.push(spawn_control(shared.clone(), admin.map(|(l, _)| l), rx)?);
        tracing::info!(listen = ?addrs, admin = ?admin_addr, workers, "rampart started");
        Ok(Server {
            shared,
            addrs,
            admin_addr,
            shutdown: tx,
            threads,
            listeners: senders,
            sockets: Mutex::new(inventory),
        })
    }

    /// The listener addresses bound at start, in config order (port 0 resolved).
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Installs a new, already validated config. Routes, pools, backends and limits
    /// applied per request take effect at once, `[server]` connection settings for
    /// each new connection (`WorkerCtx::http_builder`). A listener added is bound
    /// first, in every worker, and a bind error rejects the reload; a listener removed
    /// stops accepting, and its open connections go on. A TLS listener's certificates are
    /// read again (by `Config::load`) and serve new connections. `workers`, and
    /// `backlog`, `proxy_protocol` or TLS on/off of a listener kept, need a restart,
    /// and a warning says so. A
    /// new access-log target is opened next, and if that fails nothing changes (the
    /// error says why); an unchanged one is reopened, for log rotation.
    pub fn reload(&self, config: Config) -> Result<(), StartupError> {
        let old = self.shared.snapshot.load_full();
        let added: Vec<config::ListenerConfig> = config
            .listeners
            .iter()
            .filter(|l| !old.config.listeners.iter().any(|o| o.bind == l.bind))
            .cloned()
            .collect();
        // Bound before anything changes: dropped, unsent, if a later step fails.
        let workers = self.listeners.len();
        let bound = listener::bind_all(&added, workers, &mut upgrade::Inherited::default())?;
        let mut copies = upgrade::Inventory::default();
        copies.add(&bound)?;
        let target = &config.server.access_log;
        let current = self.shared.access_log.load_full();
        match current.as_deref() {
            // The same file: opened again by name, so a reload also serves log
            // rotation. Failing that, the old file keeps the lines.
            Some(sink) if sink.target() == target => {
                if let Err(e) = sink.reopen() {
                    tracing::warn!(log = %target, error = %e, "cannot reopen the access log; still writing to the old file");
                }
            }
            _ => self.shared.access_log.store(open_access_log(target)?),
        }
        if old.config.server.workers != config.server.workers {
            tracing::warn!("workers changed: takes effect on restart only");
        }
        for l in &config.listeners {
            if let Some(o) = old.config.listeners.iter().find(|o| o.bind == l.bind) {
                if (o.backlog, o.proxy_protocol, o.tls.is_some()) != (l.backlog, l.proxy_protocol, l.tls.is_some()) {
                    tracing::warn!(
                        bind = %l.bind,
                        "listener's backlog, proxy_protocol or whether it has [listeners.tls] changed: takes effect on restart only"
                    );
                }
            }
        }
        for (sockets, worker) in listener::deal(bound, workers).into_iter().zip(&self.listeners) {
            for l in sockets {
                // A worker that has stopped has no use for it.
                let _ = worker.send(l);
            }
        }
        if let Ok(mut inventory) = self.sockets.lock() {
            inventory.retain(|bind| config.listeners.iter().any(|l| l.bind == bind));
            inventory.absorb(copies);
        }
        for l in &added {
            tracing::info!(bind = %l.bind, "listener added by reload");
        }
        crate::tls::log_certificates(&config);
        self.shared.swap(Arc::new(config));
        ::metrics::counter!(crate::metrics::CONFIG_RELOADS, "result" => "ok").increment(1);
        tracing::info!("config reloaded");
        Ok(())
    }

    /// Opens the access log file again by its name (SIGUSR1, as nginx does), so lines
    /// go to a new file after log rotation moved the old one.
    pub fn reopen_logs(&self) -> std::io::Result<()> {
        match self.shared.access_log.load().as_ref() {
            Some(sink) => sink.reopen(),
            None => Ok(()),
        }
    }

    /// Starts `exe` with `args` (this binary, installed anew, and our own arguments),
    /// handing it every listening socket. The caller waits on the result for the new
    /// process to serve, and then shuts this one down (`upgrade`).
    pub fn hand_over(&self, exe: &std::path::Path, args: &[std::ffi::OsString]) -> std::io::Result<upgrade::Upgrade> {
        let inventory = self
            .sockets
            .lock()
            .map_err(|_| std::io::Error::other("socket inventory poisoned"))?;
        let state = serde_json::to_vec(&self.shared.snapshot.load().hand_over()).map_err(std::io::Error::other)?;
        upgrade::spawn(exe, args, &inventory, &state)
    }

    /// Stops accepting and lets in-flight requests finish within `shutdown_grace`.
    pub fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::Relaxed);
        // Our copies of the listening sockets close now, so that they close as the
        // workers let go of theirs (unless a new process holds them, after a handover).
        if let Ok(mut inventory) = self.sockets.lock() {
            inventory.clear();
        }
        let _ = self.shutdown.send(true);
    }

    /// Shuts down and waits for every thread to finish.
    pub fn join(mut self) {
        self.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn spawn_control(
    shared: Arc<Shared>,
    admin: Option<std::net::TcpListener>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, StartupError> {
    worker::spawn_runtime_thread("rampart-control".into(), move || async move {
        let admin = admin.and_then(|l| match tokio::net::TcpListener::from_std(l) {
            Ok(l) => Some(tokio::spawn(admin::serve(l, shared.clone(), shutdown.clone()))),
            Err(e) => {
                tracing::error!(error = %e, "cannot register admin listener");
                None
            }
        });
        tokio::spawn(health::run(shared.clone(), shutdown.clone()));
        tokio::spawn(dns::run(shared.clone(), shutdown.clone()));
        stopped(&mut shutdown).await;
        // The admin listener drains its connections before the runtime goes.
        if let Some(admin) = admin {
            let _ = admin.await;
        }
    })
}

/// Lets mimalloc give memory freed after a burst (parked connections' buffers) back to
/// the OS on an idle worker: it purges freed pages only during later allocations, so a
/// quiet worker would otherwise keep its peak. Called once a second per worker; `all`
/// (when the worker has nothing in flight) purges every free page at once. Measured
/// with 9,000 idle clients: 447 B per connection 6 s after the burst with `all`,
/// 907 B without (433 B only after ~30 s).
pub fn trim_allocator(all: bool) {
    extern "C" {
        fn mi_collect(force: bool);
    }
    // SAFETY: mimalloc's C API; `mi_collect` only walks the calling thread's heap.
    unsafe { mi_collect(all) }
}

/// Resolves once shutdown has been signalled. (Wraps `wait_for` so no borrow guard
/// is held across an await, which would make the future `!Send`.)
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Opts the process out of transparent huge pages. mimalloc marks its arenas
/// `MADV_HUGEPAGE`, and khugepaged (every 10 s by default) then collapses any 2 MiB
/// range with a single live page into a huge page: after a burst of connections the
/// freed, fragmented heap of an idle proxy grew by ~10 MB every 10 s (measured with
/// 1,000-9,000 idle keep-alive clients). A proxy's heap is small; TLB reach buys
/// little. (`MIMALLOC_ALLOW_THP=0` does the same, but only if set before start.)
fn disable_transparent_huge_pages() {
    // SAFETY: prctl with integer arguments only sets a flag on this process.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Raises the soft open-files limit to the hard limit, as Go's runtime does: every
/// client and backend connection is a descriptor, and 1024 is far too few.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
