//! The `rampart` command: CLI, logging setup and signals. Nothing else lives here.
//!
//! - `rampart --config FILE`: run. SIGTERM/SIGINT drain and exit 0; SIGHUP reloads
//!   the file (a bad file keeps the running config); SIGUSR1 reopens the access log;
//!   SIGUSR2 hands the listening sockets to a new process of the binary and, once it
//!   serves, drains and exits (`rampart::upgrade`).
//! - `rampart check --config FILE`: validate, print every error, exit 0 or 1.
//! - `rampart demo`: three demo origins plus rampart in front of them.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rampart::{Config, Server};
use tokio::signal::unix::{signal, SignalKind};

/// mimalloc: glibc malloc/free were 14% of rampart's instructions per request under
/// callgrind; a per-thread-heap allocator suits one-runtime-per-thread workers.
/// (`rampart::alloc` says why not the `mimalloc` crate's own `GlobalAlloc`.)
#[global_allocator]
static GLOBAL: rampart::alloc::MiMalloc = rampart::alloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "rampart",
    version,
    about = "HTTP load balancer that ejects failing backends before clients see a 502"
)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short, global = true, default_value = "/etc/rampart/rampart.toml")]
    config: PathBuf,
    /// Log filter, e.g. "info" or "warn,rampart::health=debug" (RUST_LOG wins). The
    /// access log (`server.access_log`) is separate and not filtered.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config file and print every error; exit 1 if any.
    Check,
    /// Start three demo origins on 127.0.0.1:9001-9003 and rampart on 127.0.0.1:8080.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => match Config::load(&cli.config) {
            Ok(c) => {
                println!(
                    "{}: OK ({} listener(s), {} route(s), {} pool(s))",
                    cli.config.display(),
                    c.listeners.len(),
                    c.routes.len(),
                    c.pools.len()
                );
                let now = rampart::tls::unix_now();
                for l in &c.listeners {
                    for line in l.tls.iter().flat_map(|t| t.describe(now)) {
                        println!("  {} certificate {line}", l.bind);
                    }
                    if let Some(line) = l.tls.as_ref().and_then(|t| t.describe_clients()) {
                        println!("  {} {line}", l.bind);
                    }
                }
                for p in &c.pools {
                    if p.protocol == rampart::config::UpstreamProtocol::H2 {
                        println!("  pool {}: HTTP/2 to backends", p.name);
                    }
                    if let Some(tls) = &p.tls {
                        println!("  pool {}: {}", p.name, tls.describe(now));
                    }
                    if let Some(dns) = &p.dns {
                        println!(
                            "  pool {}: {}",
                            p.name,
                            rampart::dns::describe(p, dns, &c.server.resolvers)
                        );
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                eprintln!("{}: {} error(s)", cli.config.display(), e.errors.len());
                ExitCode::FAILURE
            }
        },
        Some(Command::Demo) => {
            init_logging(&cli.log_level);
            report(run_demo())
        }
        None => {
            // First, before any thread starts: it edits the environment.
            let inherited = match rampart::upgrade::Inherited::from_env() {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("rampart: {e}");
                    return ExitCode::FAILURE;
                }
            };
            init_logging(&cli.log_level);
            let config = match Config::load(&cli.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            report(run(config, Some(cli.config), inherited))
        }
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("rampart: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Diagnostics go to stderr, leaving stdout to the access log (`access_log = true`);
    // colour only on a terminal, never into journald or a file.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Loads and validates `path`, then installs it: either failing leaves the running
/// config in place, and the log says why (every config error, or the access log).
/// Then the watch on the config's files (`watch_config`) follows the running config,
/// whichever it is. For SIGHUP and for a watched file that changed alike.
fn reload(server: &Server, path: &std::path::Path, watcher: &mut Option<rampart::filewatch::Watcher>) {
    let installed = Config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|config| server.reload(config).map_err(|e| e.to_string()));
    if let Err(e) = installed {
        metrics::counter!(rampart::metrics::CONFIG_RELOADS, "result" => "rejected").increment(1);
        tracing::error!("reload rejected, keeping the running config:\n{e}");
    }
    sync_watch(watcher, server);
}

/// Runs until SIGTERM or SIGINT, or until a new process took over after SIGUSR2;
/// SIGHUP reloads `path`; SIGUSR1 reopens the access log. `path` is `None` for the
/// demo, which neither reloads nor hands over.
fn run(config: Config, path: Option<PathBuf>, mut inherited: rampart::upgrade::Inherited) -> anyhow::Result<()> {
    // Where this binary was started from, read now: an upgrade installs a new binary
    // there, and /proc/self/exe would then name the old, deleted file.
    let exe = std::env::current_exe().context("cannot tell where this binary is")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("signal runtime")?;
    // The handlers go in before the listeners accept: a signal sent as soon as rampart
    // answers (a `systemctl reload` right after start, say) would otherwise meet the
    // default action, and SIGHUP, SIGTERM, SIGUSR1 and SIGUSR2 all end the process on
    // the spot.
    let (mut term, mut int, mut hup, mut usr1, mut usr2) = {
        let _rt = rt.enter();
        (
            signal(SignalKind::terminate()).context("SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("SIGINT handler")?,
            signal(SignalKind::hangup()).context("SIGHUP handler")?,
            signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?,
            signal(SignalKind::user_defined2()).context("SIGUSR2 handler")?,
        )
    };
    let server = Server::start_with(config, &mut inherited).context("startup failed")?;
    let mut watcher = None;
    if path.is_some() {
        sync_watch(&mut watcher, &server);
    }
    // Serving: tell systemd, and the process we take over from, if any.
    inherited.serving();
    drop(inherited);
    rt.block_on(async {
        // The new process of an upgrade under way: its pid, and whether it serves.
        let mut upgrading: Option<(u32, tokio::sync::oneshot::Receiver<Result<(), String>>)> = None;
        loop {
            let outcome = async {
                match upgrading.as_mut() {
                    Some((_, rx)) => rx.await.unwrap_or_else(|_| Err("lost track of it".into())),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => match &path {
                    Some(p) => reload(&server, p, &mut watcher),
                    None => tracing::warn!("SIGHUP ignored: no config file"),
                },
                _ = async { match watcher.as_mut() {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                } } => {
                    if let Some(p) = &path {
                        tracing::info!("a watched file changed: reloading {}", p.display());
                        reload(&server, p, &mut watcher);
                    }
                }
                _ = usr1.recv() => match server.reopen_logs() {
                    Ok(()) => tracing::info!("access log reopened"),
                    Err(e) => tracing::error!(error = %e, "cannot reopen the access log; still writing to the old file"),
                },
                _ = usr2.recv() => {
                    if path.is_none() {
                        tracing::warn!("SIGUSR2 ignored: the demo does not upgrade");
                    } else if let Some((pid, _)) = &upgrading {
                        tracing::warn!(pid, "SIGUSR2 ignored: an upgrade is already under way");
                    } else {
                        match start_upgrade(&server, &exe, &args) {
                            Ok(u) => upgrading = Some(u),
                            Err(e) => tracing::error!(exe = %exe.display(), error = %e, "upgrade failed: cannot start the new process; still serving"),
                        }
                    }
                }
                result = outcome => {
                    let Some((pid, _)) = upgrading.take() else { continue };
                    match result {
                        Ok(()) => {
                            tracing::info!(pid, "upgrade: the new process serves on the listening sockets; this one stops accepting");
                            // The new process said so too; from us, the main process,
                            // systemd takes it whatever its NotifyAccess.
                            rampart::upgrade::notify(&format!("MAINPID={pid}"));
                            break;
                        }
                        Err(e) => tracing::error!(pid, "upgrade failed: the new process {e}; still serving"),
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    tracing::info!("shutting down: draining in-flight requests");
    server.join();
    tracing::info!("stopped");
    Ok(())
}

/// Starts, follows or stops the watch on the config's files (`watch_config`), as the
/// running config says: after start and after every reload, taken or not (a rejected
/// file leaves the running config, and its files, as they were).
fn sync_watch(watcher: &mut Option<rampart::filewatch::Watcher>, server: &Server) {
    let config = server.shared().snapshot.load().config.clone();
    if !config.server.watch_config {
        if watcher.take().is_some() {
            tracing::info!("watch_config is off: no longer watching the config's files");
        }
        return;
    }
    let before = watcher.as_ref().map(|w| w.dirs().to_vec());
    let result = match watcher {
        Some(w) => w.follow(&config),
        None => rampart::filewatch::Watcher::start(&config).map(|w| {
            *watcher = Some(w);
        }),
    };
    match (result, watcher.as_ref()) {
        // Said when the watch starts, and when a reload moves it.
        (Ok(()), Some(w)) if before.as_deref() != Some(w.dirs()) => tracing::info!(
            "watch_config: reloading when a file in {} changes",
            w.dirs()
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        (Ok(()), _) => {}
        (Err(e), _) => tracing::error!("watch_config: {e}; reload with SIGHUP"),
    }
}

/// How long a new process has to load its config and serve before it is stopped and
/// the upgrade given up. Generous: loading resolves every backend's name.
const UPGRADE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Starts the new process of an upgrade, and a thread that waits for it to serve
/// (or to exit, or to run out of time) and reports on the returned channel.
fn start_upgrade(
    server: &Server,
    exe: &std::path::Path,
    args: &[std::ffi::OsString],
) -> std::io::Result<(u32, tokio::sync::oneshot::Receiver<Result<(), String>>)> {
    let mut up = server.hand_over(exe, args)?;
    let pid = up.child.id();
    tracing::info!(pid, exe = %exe.display(), "upgrade: started a new process with the listening sockets");
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A watchdog: past the timeout, the new process is stopped, which ends the wait.
    let (done, watched) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("rampart-upgrade".into())
        .spawn(move || {
            if watched.recv_timeout(UPGRADE_TIMEOUT).is_err() {
                // SAFETY: a signal to the process we started, not yet reaped.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        })?;
    std::thread::Builder::new()
        .name("rampart-upgrade".into())
        .spawn(move || {
            let ready = up.wait_ready();
            let _ = done.send(());
            let result = if ready {
                Ok(())
            } else {
                match up.child.wait() {
                    Ok(status) => Err(format!("exited ({status}) before it served")),
                    Err(e) => Err(format!("ended before it served ({e})")),
                }
            };
            let _ = tx.send(result);
        })?;
    Ok((pid, rx))
}

/// The demo runs the shipped minimal config, so what the README shows is what runs.
const DEMO_CONFIG: &str = include_str!("../conf/minimal.toml");

fn run_demo() -> anyhow::Result<()> {
    let config = Config::parse(DEMO_CONFIG, "conf/minimal.toml").map_err(|e| anyhow::anyhow!("{e}"))?;
    let addrs: Vec<std::net::SocketAddr> = config.pools[0].backends.iter().map(|b| b.addr).collect();
    std::thread::Builder::new().name("demo-origins".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return eprintln!("demo origins: {e}"),
        };
        rt.block_on(async move {
            let mut set = tokio::task::JoinSet::new();
            for (i, a) in addrs.into_iter().enumerate() {
                set.spawn(rampart::demo::origin(a, format!("origin {}", i + 1)));
            }
            while let Some(r) = set.join_next().await {
                if let Ok(Err(e)) = r {
                    eprintln!("demo origin failed: {e}");
                }
            }
        });
    })?;
    println!(
        "demo: origins on 127.0.0.1:9001-9003, rampart on http://127.0.0.1:8080, admin on http://127.0.0.1:9901/status"
    );
    println!("try:  curl -s http://127.0.0.1:8080/   (Ctrl-C to stop)");
    run(config, None, rampart::upgrade::Inherited::default())
}
