//! Backend discovery by DNS (`dns_refresh`), over real sockets: a nameserver the test
//! runs (UDP, on 127.0.0.1) answers for a name, and origins listen on the loopback
//! addresses it names. A name with several addresses is several backends; a changed
//! answer moves traffic; a nameserver that stops answering, or denies the name, leaves
//! the pool as it was; a new address waits for its health check; and names that do
//! not resolve are config errors.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rampart::Config;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// A records for the names it knows, NXDOMAIN for the rest.
    Answer,
    /// Reads queries and never answers.
    Silent,
}

/// A nameserver: answers A queries from `records`, and AAAA queries for known names
/// with no records (so the resolver keeps the A answer).
struct TestDns {
    addr: SocketAddr,
    records: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>,
    mode: Arc<Mutex<Mode>>,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TestDns {
    /// On a thread of its own: the config loader looks names up while the test's
    /// runtime waits for it.
    async fn start(records: &[(&str, &[Ipv4Addr])]) -> TestDns {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = socket.local_addr().unwrap();
        let records: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>> = Arc::new(Mutex::new(
            records
                .iter()
                .map(|(name, ips)| (name.to_string(), ips.to_vec()))
                .collect(),
        ));
        let mode = Arc::new(Mutex::new(Mode::Answer));
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, m, q, st) = (records.clone(), mode.clone(), queries.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                q.fetch_add(1, Ordering::Relaxed);
                if *m.lock().unwrap() == Mode::Silent {
                    continue;
                }
                if let Some(reply) = answer(&buf[..n], &r.lock().unwrap()) {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        });
        TestDns {
            addr,
            records,
            mode,
            queries,
            stop,
        }
    }

    fn set(&self, name: &str, ips: &[Ipv4Addr]) {
        self.records.lock().unwrap().insert(name.to_string(), ips.to_vec());
    }

    fn forget(&self, name: &str) {
        self.records.lock().unwrap().remove(name);
    }

    fn mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The reply to one query (RFC 1035 §4.1), or `None` for bytes that are not one.
fn answer(q: &[u8], records: &HashMap<String, Vec<Ipv4Addr>>) -> Option<Vec<u8>> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*q.get(at)?, *q.get(at + 1)?]);
    let question = q.get(12..at + 4)?;
    let name = labels.join(".");
    let (rcode, ips): (u8, &[Ipv4Addr]) = match records.get(&name) {
        None => (3, &[]),
        Some(ips) if qtype == 1 => (0, ips),
        Some(_) => (0, &[]),
    };
    let mut out = vec![q[0], q[1], 0x84 | (q[2] & 0x79), 0x80 | rcode, 0, 1];
    out.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for ip in ips {
        // The name as a pointer to the question's; type A, class IN, TTL 300.
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 0x2c, 0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

const NAME: &str = "app.rampart.test";

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// One pool `app` with `NAME:port` as its backend, looked up through `dns` every second.
fn dns_config(dns: &TestDns, port: u16, extra: &str) -> String {
    format!(
        r#"
[server]
workers = 1
shutdown_grace = "5s"
resolvers = ["{}"]

[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
pool = "app"

[pools.app]
backends = ["{NAME}:{port}"]
dns_refresh = "1s"
balancer = "round_robin"
{extra}
"#,
        dns.addr
    )
}

/// The pool's backends now: their addresses, in order.
fn backends(server: &rampart::Server) -> Vec<SocketAddr> {
    server.shared().snapshot.load().pools[0]
        .backends
        .iter()
        .map(|b| b.addr)
        .collect()
}

/// Waits (generously) until the pool's backends are `want`.
async fn until_backends(server: &rampart::Server, want: &[SocketAddr]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while backends(server) != want {
        assert!(
            Instant::now() < deadline,
            "backends are {:?}, not {want:?}",
            backends(server)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Origins on 127.0.0.1, .2 and .3, all on one port (the port the name's backends use).
async fn origins() -> Vec<TestOrigin> {
    let first = TestOrigin::start("one", Behavior::Healthy).await;
    let port = first.addr.port();
    let mut all = vec![first];
    for (last, name) in [(2, "two"), (3, "three")] {
        all.push(TestOrigin::start_on(name, SocketAddr::new(ip(last).into(), port), Behavior::Healthy).await);
    }
    all
}

async fn spread(addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut replies = Vec::new();
    for _ in 0..n {
        replies.push(get(addr, "/").await);
    }
    tally(&replies)
}

#[tokio::test]
async fn a_name_is_every_address_it_has_and_follows_a_changed_answer() {
    let o = origins().await;
    let port = o[0].addr.port();
    let dns = TestDns::start(&[(NAME, &[ip(2), ip(1)])]).await;
    let (server, addr) = start_proxy(&dns_config(&dns, port, NO_HEALTH_CHECKS));
    // Sorted, so a nameserver rotating its answer does not reorder the pool.
    assert_eq!(backends(&server), vec![o[0].addr, o[1].addr]);
    let names: Vec<String> = server.shared().snapshot.load().pools[0]
        .backends
        .iter()
        .map(|b| b.name.clone())
        .collect();
    assert_eq!(
        names,
        vec![
            format!("{NAME}:{port} (127.0.0.1)"),
            format!("{NAME}:{port} (127.0.0.2)")
        ]
    );
    let seen = spread(addr, 20).await;
    assert_eq!((seen.get("one"), seen.get("two")), (Some(&10), Some(&10)), "{seen:?}");
    // .1 fails until ejected, so it has error and ejection counts to leave behind.
    o[0].set(Behavior::Status(503));
    let ejected = || {
        server.shared().snapshot.load().pools[0].backends[0]
            .state
            .is_ejected(rampart::state::now_ms())
    };
    for _ in 0..20 {
        if ejected() {
            break;
        }
        get(addr, "/").await;
    }
    assert!(ejected(), "three 503s in a row did not eject 127.0.0.1");
    let metrics = rampart::admin::metrics_text(server.shared());
    let one = format!("pool=\"app\",backend=\"{NAME}:{port} (127.0.0.1)\"");
    for series in [
        format!("rampart_upstream_errors_total{{{one},kind=\"bad_status\"}} 3"),
        format!("rampart_ejections_total{{{one}}} 1"),
    ] {
        assert!(metrics.contains(&series), "{series} not in {metrics}");
    }

    // The name moves: .1 goes, .3 comes; .2 stays, with its state. (After a refresh
    // has asked once already: a resolver that cached the answer for its TTL, 300 s,
    // would not see the move.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while dns.queries() < 2 {
        assert!(Instant::now() < deadline, "no refresh asked the nameserver");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept = server.shared().snapshot.load().pools[0].backends[1].state.id;
    dns.set(NAME, &[ip(3), ip(2)]);
    until_backends(&server, &[o[1].addr, o[2].addr]).await;
    assert_eq!(server.shared().snapshot.load().pools[0].backends[0].state.id, kept);
    let seen = spread(addr, 20).await;
    assert_eq!(seen.get("one"), None, "{seen:?}");
    // /metrics shows the backends there are, not the one the answer dropped: no
    // gauge, and no counter either.
    let metrics = rampart::admin::metrics_text(server.shared());
    let series =
        |last: u8| format!("rampart_backend_healthy{{pool=\"app\",backend=\"{NAME}:{port} (127.0.0.{last})\"}} 1");
    assert!(metrics.contains(&series(3)), "{metrics}");
    assert!(!metrics.contains("(127.0.0.1)"), "{metrics}");
    assert_eq!((seen.get("two"), seen.get("three")), (Some(&10), Some(&10)), "{seen:?}");
    stop_proxy(server).await;
}

#[tokio::test]
async fn a_nameserver_that_fails_leaves_the_pool_as_it_was() {
    let o = origins().await;
    let port = o[0].addr.port();
    let dns = TestDns::start(&[(NAME, &[ip(1), ip(2)])]).await;
    let (server, addr) = start_proxy(&dns_config(&dns, port, NO_HEALTH_CHECKS));
    let want = vec![o[0].addr, o[1].addr];
    assert_eq!(backends(&server), want);

    // Silent: each refresh times out. Then NXDOMAIN: the name is gone.
    for fail in [
        Box::new(|d: &TestDns| d.mode(Mode::Silent)) as Box<dyn Fn(&TestDns)>,
        Box::new(|d: &TestDns| {
            d.mode(Mode::Answer);
            d.forget(NAME);
        }),
    ] {
        fail(&dns);
        let asked = dns.queries();
        let deadline = Instant::now() + Duration::from_secs(20);
        while dns.queries() < asked + 2 {
            assert!(Instant::now() < deadline, "no refresh asked the nameserver");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Past the lookup's own timeout, whatever came of it has been applied.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(backends(&server), want);
        let seen = spread(addr, 10).await;
        assert_eq!((seen.get("one"), seen.get("two")), (Some(&5), Some(&5)), "{seen:?}");
    }

    // Answering again, with one address: the pool follows.
    dns.set(NAME, &[ip(1)]);
    until_backends(&server, &[o[0].addr]).await;
    stop_proxy(server).await;
}

#[tokio::test]
async fn a_discovered_address_waits_for_its_health_check() {
    let o = origins().await;
    let port = o[0].addr.port();
    o[1].set(Behavior::Status(503));
    let dns = TestDns::start(&[(NAME, &[ip(1)])]).await;
    let checks = r#"health_check = { path = "/", interval = "200ms", timeout = "150ms" }"#;
    let (server, addr) = start_proxy(&dns_config(&dns, port, checks));
    assert_eq!(backends(&server), vec![o[0].addr]);

    dns.set(NAME, &[ip(1), ip(2)]);
    until_backends(&server, &[o[0].addr, o[1].addr]).await;
    let healthy = |i: usize| server.shared().snapshot.load().pools[0].backends[i].state.is_healthy();
    // A reload's new backend would be up at once; a discovered one is down until checked.
    assert!(
        !healthy(1),
        "a discovered backend took traffic before its health check passed"
    );
    let seen = spread(addr, 20).await;
    assert_eq!(seen.get("one"), Some(&20), "{seen:?}");
    let served = |origin: &TestOrigin| {
        origin
            .seen_headers
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.get("user-agent").is_none_or(|v| v != "rampart-health-check"))
            .count()
    };
    assert_eq!(served(&o[1]), 0);
    assert!(!healthy(1));

    // Its checks pass: it is up after `rise` of them, and serves.
    o[1].set(Behavior::Healthy);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !healthy(1) {
        assert!(Instant::now() < deadline, "the discovered backend never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = spread(addr, 20).await;
    assert!(seen.get("two").is_some_and(|&n| n > 0), "{seen:?}");
    stop_proxy(server).await;
}

/// The errors of a config that must not load. Off the test's runtime: the loader
/// waits for its lookups.
async fn config_errors(text: String) -> String {
    tokio::task::spawn_blocking(move || Config::parse(&text, "t.toml").unwrap_err())
        .await
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn names_that_do_not_resolve_and_misuse_are_config_errors() {
    let dns = TestDns::start(&[(NAME, &[ip(1)])]).await;
    let text = format!(
        r#"
[server]
resolvers = ["{}", "not-an-ip"]

[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
pool = "a"

[pools.a]
backends = ["{NAME}:8080", "missing.rampart.test:8080", "127.0.0.9:80"]
dns_refresh = "1s"

[pools.b]
backends = ["127.0.0.1:80"]
dns_refresh = "500ms"
"#,
        dns.addr
    );
    let err = config_errors(text).await;
    for want in [
        "server.resolvers[1]: expected a nameserver's IP address",
        "pools.b.dns_refresh: must be at least 1s",
        "pools.b.dns_refresh: has no effect: every backend of the pool is an IP address",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }

    // With the nameservers valid, each name is looked up, and one that does not
    // resolve is an error at its place.
    let text = format!(
        r#"
[server]
resolvers = ["{}"]

[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
pool = "a"

[pools.a]
backends = ["{NAME}:8080", "missing.rampart.test:8080", "127.0.0.9:80", "{NAME}:8080"]
dns_refresh = "1s"
"#,
        dns.addr
    );
    let err = config_errors(text).await;
    for want in [
        "pools.a.backends[1]: cannot resolve missing.rampart.test:8080: no such name (NXDOMAIN)",
        &format!("pools.a.backends[3]: {NAME}:8080 is listed twice (also backends[0])"),
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert_eq!(err.lines().count(), 2, "{err}");
}

#[tokio::test]
async fn rampart_check_prints_each_names_addresses_and_the_nameservers() {
    let dns = TestDns::start(&[(NAME, &[ip(2), ip(1)])]).await;
    let path = std::env::temp_dir().join(format!("rampart-dns-check-{}.toml", std::process::id()));
    std::fs::write(&path, dns_config(&dns, 8080, "")).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&path);
        out
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let want = format!(
        "pool app: {NAME}:8080 is 127.0.0.1, 127.0.0.2; looked up again every 1s through {}",
        dns.addr
    );
    assert!(stdout.contains(&want), "missing {want:?} in:\n{stdout}");
}
