//! The `rampart` command: CLI, logging setup and signals. Nothing else lives here.
//!
//! - `rampart --config FILE`: run. SIGTERM/SIGINT drain and exit 0; SIGHUP reloads
//!   the file (a bad file keeps the running config).
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
            init_logging(&cli.log_level);
            let config = match Config::load(&cli.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            report(run(config, Some(cli.config)))
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
/// config in place, and the error says why (every config error, or the access log).
fn reload(server: &Server, path: &std::path::Path) -> Result<(), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    server.reload(config).map_err(|e| e.to_string())
}

/// Runs until SIGTERM or SIGINT; SIGHUP reloads `path`; SIGUSR1 reopens the access log.
fn run(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("signal runtime")?;
    // The handlers go in before the listeners accept: a signal sent as soon as rampart
    // answers (a `systemctl reload` right after start, say) would otherwise meet the
    // default action, and SIGHUP, SIGTERM and SIGUSR1 all end the process on the spot.
    let (mut term, mut int, mut hup, mut usr1) = {
        let _rt = rt.enter();
        (
            signal(SignalKind::terminate()).context("SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("SIGINT handler")?,
            signal(SignalKind::hangup()).context("SIGHUP handler")?,
            signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?,
        )
    };
    let server = Server::start(config).context("startup failed")?;
    rt.block_on(async {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => match &path {
                    Some(p) => {
                        if let Err(e) = reload(&server, p) {
                            metrics::counter!(rampart::metrics::CONFIG_RELOADS, "result" => "rejected").increment(1);
                            tracing::error!("reload rejected, keeping the running config:\n{e}");
                        }
                    }
                    None => tracing::warn!("SIGHUP ignored: no config file"),
                },
                _ = usr1.recv() => match server.reopen_logs() {
                    Ok(()) => tracing::info!("access log reopened"),
                    Err(e) => tracing::error!(error = %e, "cannot reopen the access log; still writing to the old file"),
                },
            }
        }
        anyhow::Ok(())
    })?;
    tracing::info!("shutting down: draining in-flight requests");
    server.join();
    tracing::info!("stopped");
    Ok(())
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
    run(config, None)
}
