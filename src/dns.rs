//! Backend discovery by DNS. A pool with `dns_refresh` resolves the host names in its
//! `backends` with rampart's own stub resolver, at load and every `dns_refresh` after,
//! and every address a name has is a backend (Envoy's `STRICT_DNS`, nginx's
//! `server ... resolve`). This module owns that resolver (hickory, pointed at
//! `[server] resolvers` or at /etc/resolv.conf's nameservers), the expansion of a
//! pool's entries into backends, and the control-thread loop that installs a changed
//! answer as a new snapshot (`Shared::discovered`).
//!
//! A failed lookup never removes a backend: the pool keeps the addresses of the last
//! answer, as Envoy does, so a DNS outage cannot empty a pool that still works.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use tokio::sync::watch;

use crate::config::{BackendConfig, PoolConfig};
use crate::state::Shared;

/// The nameservers rampart asks: `[server] resolvers`, or `None` for the system's
/// (/etc/resolv.conf, with its search domains, and /etc/hosts).
pub type Nameservers = Option<Vec<SocketAddr>>;

/// How long one lookup may take, over every attempt and nameserver; past it the
/// lookup fails (and at a refresh, the pool keeps what it had).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the loop looks for a pool whose refresh is due.
const TICK: Duration = Duration::from_millis(250);

/// A pool's backends as written, for a pool that re-resolves (`PoolConfig::dns`).
#[derive(Debug, Clone)]
pub struct DnsPool {
    pub refresh: Duration,
    /// In `backends` order; each expands in place, so the order of the backends (and
    /// so of round robin) follows the file.
    pub entries: Vec<Entry>,
}

/// One `backends` item of a re-resolving pool.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Everything but the address (and for a name, the label), which expansion fills in.
    pub template: BackendConfig,
    /// The host name to resolve; `None` for an IP address, which is its own backend.
    pub host: Option<String>,
}

impl DnsPool {
    /// The pool's backends for one answer per entry (`None` for an IP entry): each
    /// name becomes one backend per address, labelled `name:port (ip)`. An address
    /// two names share is one backend, the first's.
    pub fn expand(&self, answers: &[Option<Vec<IpAddr>>]) -> Vec<BackendConfig> {
        let mut out: Vec<BackendConfig> = Vec::new();
        for (entry, answer) in self.entries.iter().zip(answers) {
            match answer {
                None => {
                    if !out.iter().any(|b| b.addr == entry.template.addr) {
                        out.push(entry.template.clone());
                    }
                }
                Some(ips) => {
                    for ip in ips {
                        let addr = SocketAddr::new(*ip, entry.template.addr.port());
                        if out.iter().any(|b| b.addr == addr) {
                            continue;
                        }
                        out.push(BackendConfig {
                            name: format!("{} ({ip})", entry.template.written),
                            addr,
                            ..entry.template.clone()
                        });
                    }
                }
            }
        }
        out
    }

    /// The addresses `current` (the pool's backends now) holds for entry `i`: what a
    /// failed lookup keeps, and what `rampart check` prints.
    fn current_answer(&self, i: usize, current: &[BackendConfig]) -> Vec<IpAddr> {
        let written = &self.entries[i].template.written;
        current
            .iter()
            .filter(|b| &b.written == written)
            .map(|b| b.addr.ip())
            .collect()
    }
}

/// What `rampart check` says of a re-resolving pool: each name's addresses now, and
/// how they are kept current.
pub fn describe(pool: &PoolConfig, dns: &DnsPool, ns: &Nameservers) -> String {
    let names: Vec<String> = dns
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.host.is_some())
        .map(|(i, e)| {
            let ips: Vec<String> = dns
                .current_answer(i, &pool.backends)
                .iter()
                .map(IpAddr::to_string)
                .collect();
            format!("{} is {}", e.template.written, ips.join(", "))
        })
        .collect();
    let via = match ns {
        None => "the nameservers in /etc/resolv.conf".to_string(),
        Some(list) => list.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
    };
    format!(
        "{}; looked up again every {} through {via}",
        names.join("; "),
        humantime::format_duration(dns.refresh)
    )
}

/// A resolver for `ns` that asks the nameservers on every lookup (no cache, so
/// `dns_refresh` is how stale an answer may be, whatever its TTL) and prefers IPv4:
/// a name's A records when it has any, else its AAAA records (Envoy's
/// `V4_PREFERRED`), so `localhost` is not also `::1` for a backend listening on
/// 127.0.0.1 only.
pub fn resolver(ns: &Nameservers) -> Result<TokioResolver, String> {
    let (config, mut opts) = match ns {
        None => hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| format!("cannot read the system's resolver configuration (/etc/resolv.conf): {e}"))?,
        Some(list) => {
            let servers = list
                .iter()
                .map(|a| {
                    let mut s = NameServerConfig::udp_and_tcp(a.ip());
                    for c in &mut s.connections {
                        c.port = a.port();
                    }
                    s
                })
                .collect();
            (ResolverConfig::from_name_servers(servers), ResolverOpts::default())
        }
    };
    opts.cache_size = 0;
    opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 1;
    hickory_resolver::Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| format!("cannot start the DNS resolver: {e}"))
}

/// One name's addresses, sorted (DNS servers rotate their answers; the order of a
/// pool's backends should not churn with them).
pub async fn lookup(resolver: &TokioResolver, host: &str) -> Result<Vec<IpAddr>, String> {
    let answer = match tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup_ip(host)).await {
        Err(_) => return Err(format!("no answer within {LOOKUP_TIMEOUT:?}")),
        Ok(Err(e)) if e.is_nx_domain() => return Err("no such name (NXDOMAIN)".into()),
        Ok(Err(e)) if e.is_no_records_found() => return Err("the name has no A or AAAA record".into()),
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(a)) => a,
    };
    let mut ips: Vec<IpAddr> = answer.iter().collect();
    ips.sort_unstable();
    ips.dedup();
    if ips.is_empty() {
        return Err("the name has no A or AAAA record".into());
    }
    Ok(ips)
}

/// Looks up every name at once: the whole wait is the slowest lookup's.
async fn lookup_all(resolver: &TokioResolver, hosts: &[&str]) -> Vec<Result<Vec<IpAddr>, String>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, host) in hosts.iter().enumerate() {
        let (r, host) = (resolver.clone(), host.to_string());
        set.spawn(async move { (i, lookup(&r, &host).await) });
    }
    let mut out: Vec<Result<Vec<IpAddr>, String>> = vec![Err("lookup did not finish".into()); hosts.len()];
    while let Some(done) = set.join_next().await {
        if let Ok((i, r)) = done {
            out[i] = r;
        }
    }
    out
}

/// `lookup_all` for the config loader, which is not async: on a thread of its own
/// with its own runtime, so it works whether or not the caller is inside one.
pub fn lookup_blocking(ns: &Nameservers, hosts: &[&str]) -> Result<Vec<Result<Vec<IpAddr>, String>>, String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the DNS resolver: {e}"))?;
            rt.block_on(async {
                let r = resolver(ns)?;
                Ok(lookup_all(&r, hosts).await)
            })
        })
        .join()
        .unwrap_or_else(|_| Err("the DNS resolver failed".into()))
    })
}

/// Resolves a pool's names afresh. `Some(backends)` when the addresses differ from
/// what the pool has now; a name whose lookup fails keeps its addresses.
async fn refresh(resolver: &TokioResolver, pool: &PoolConfig, dns: &DnsPool) -> Option<Vec<BackendConfig>> {
    let hosts: Vec<&str> = dns.entries.iter().filter_map(|e| e.host.as_deref()).collect();
    let mut results = lookup_all(resolver, &hosts).await.into_iter();
    let mut answers = Vec::with_capacity(dns.entries.len());
    for (i, entry) in dns.entries.iter().enumerate() {
        let Some(host) = &entry.host else {
            answers.push(None);
            continue;
        };
        let result = results.next().unwrap_or_else(|| Err("lookup did not finish".into()));
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!(crate::metrics::DNS_LOOKUPS, "pool" => pool.name.clone(), "result" => outcome).increment(1);
        answers.push(Some(match result {
            Ok(ips) => ips,
            Err(e) => {
                tracing::warn!(pool = %pool.name, name = %host, error = %e, "DNS lookup failed; keeping the backends of the last answer");
                dns.current_answer(i, &pool.backends)
            }
        }));
    }
    let next = dns.expand(&answers);
    let addrs = |b: &[BackendConfig]| {
        let mut v: Vec<SocketAddr> = b.iter().map(|b| b.addr).collect();
        v.sort_unstable();
        v
    };
    let (was, now) = (addrs(&pool.backends), addrs(&next));
    if was == now {
        return None;
    }
    let added: Vec<String> = now.iter().filter(|a| !was.contains(a)).map(|a| a.to_string()).collect();
    let removed: Vec<String> = was.iter().filter(|a| !now.contains(a)).map(|a| a.to_string()).collect();
    tracing::info!(pool = %pool.name, added = ?added, removed = ?removed, "DNS answer changed: backends updated");
    metrics::counter!(crate::metrics::DNS_UPDATES, "pool" => pool.name.clone()).increment(1);
    Some(next)
}

/// The control thread's discovery loop: refreshes each re-resolving pool every
/// `dns_refresh` and installs changed backends. A reload that lands meanwhile wins;
/// the pools are then looked up again on the new config.
pub async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut current: Option<(Nameservers, TokioResolver)> = None;
    let mut due: HashMap<String, tokio::time::Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        let snap = shared.snapshot.load_full();
        if !snap.config.pools.iter().any(|p| p.dns.is_some()) {
            continue;
        }
        let ns = &snap.config.server.resolvers;
        if current.as_ref().is_none_or(|(n, _)| n != ns) {
            match resolver(ns) {
                Ok(r) => current = Some((ns.clone(), r)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot refresh backends from DNS");
                    continue;
                }
            }
        }
        let Some((_, resolver)) = &current else { continue };
        let now = tokio::time::Instant::now();
        let mut changed = Vec::new();
        for (pi, pool) in snap.config.pools.iter().enumerate() {
            let Some(dns) = &pool.dns else { continue };
            let next = due.entry(pool.name.clone()).or_insert(now + dns.refresh);
            if *next > now {
                continue;
            }
            *next = now + dns.refresh;
            if let Some(backends) = refresh(resolver, pool, dns).await {
                changed.push((pi, backends));
            }
        }
        if changed.is_empty() {
            continue;
        }
        let mut config = (*snap.config).clone();
        let mut names = Vec::new();
        for (pi, backends) in changed {
            config.pools[pi].backends = backends;
            names.push(config.pools[pi].name.clone());
        }
        if !shared.discovered(&snap, Arc::new(config)) {
            // A reload replaced the config while we looked: look again at once.
            for name in names {
                due.insert(name, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(written: &str, host: bool) -> Entry {
        let addr = if host {
            SocketAddr::from(([0, 0, 0, 0], 80))
        } else {
            written.parse().unwrap()
        };
        Entry {
            template: BackendConfig {
                name: written.into(),
                written: written.into(),
                addr,
                weight: 1,
                backup: false,
                max_in_flight: None,
                tls_name: None,
            },
            host: host.then(|| written.split(':').next().unwrap().to_string()),
        }
    }

    #[test]
    fn names_expand_in_place_and_a_shared_address_is_one_backend() {
        let pool = DnsPool {
            refresh: Duration::from_secs(1),
            entries: vec![
                entry("a.test:80", true),
                entry("10.0.0.9:80", false),
                entry("b.test:80", true),
            ],
        };
        let ips = |l: &[u8]| Some(l.iter().map(|&x| IpAddr::from([10, 0, 0, x])).collect());
        let got = pool.expand(&[ips(&[1, 2]), None, ips(&[2, 3, 9])]);
        let names: Vec<&str> = got.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "a.test:80 (10.0.0.1)",
                "a.test:80 (10.0.0.2)",
                "10.0.0.9:80",
                "b.test:80 (10.0.0.3)"
            ]
        );
        assert!(got.iter().all(|b| b.addr.port() == 80));
        // What a failed lookup of b keeps: its own addresses, not a's or the IP's.
        assert_eq!(pool.current_answer(2, &got), vec![IpAddr::from([10, 0, 0, 3])]);
    }
}
