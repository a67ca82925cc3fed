//! The `rampart` binary: `check` reports every error with file and field, and exits 1;
//! diagnostics go to stderr and the access log to stdout; SIGHUP reloads the file, and a
//! bad one is rejected with its reason while the running config stays; SIGUSR2 hands
//! the listening sockets to a new process without refusing a connection.

mod common;

use std::process::Command;

use common::TempDir;

fn write(dir: &TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_reports_every_error_with_file_and_field_and_exits_1() {
    let dir = TempDir::new("cli-check");
    let p = write(
        &dir,
        "bad.toml",
        r#"
colour = "red"
[[listeners]]
bind = "127.0.0.1:99999"
[[routes]]
pool = "nope"
[pools.app]
backends = ["127.0.0.1:9001", { addr = "127.0.0.1:9002", weight = 0 }]
response_timeout = 5
"#,
    );
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["check", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = p.display().to_string();
    for expected in [
        "unknown field `colour`".to_string(),
        format!("{file}: listeners[0].bind: invalid port 99999"),
        format!("{file}: routes[0].pool: unknown pool 'nope'"),
        format!("{file}: pools.app.response_timeout"),
    ] {
        assert!(err.contains(&expected), "missing {expected:?} in:\n{err}");
    }
}

#[test]
fn check_accepts_the_shipped_example_and_minimal_configs() {
    for f in ["conf/rampart.toml", "conf/minimal.toml"] {
        let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(["check", "--config", f])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{f}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_tls_pool_without_ca_trusts_the_system_store_as_ssl_cert_file_names_it() {
    let dir = TempDir::new("cli-tls-pool");
    let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_string()]).unwrap();
    let ca_file = write(&dir, "system-ca.pem", &ca.cert.pem());
    let empty = write(&dir, "empty-ca.pem", "");
    let conf = write(
        &dir,
        "tls-pool.toml",
        r#"
[[listeners]]
bind = "127.0.0.1:0"
[[routes]]
pool = "app"
[pools.app]
backends = ["127.0.0.1:9443"]
tls = {}
"#,
    );
    let check = |store: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(["check", "--config"])
            .arg(&conf)
            .env("SSL_CERT_FILE", store)
            .env_remove("SSL_CERT_DIR")
            .output()
            .unwrap()
    };
    let out = check(&ca_file);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        said.contains("pool app: TLS to backends, verified against the system's 1 CA certificates"),
        "{said}"
    );
    let out = check(&empty);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pools.app.tls.ca: no CA certificates found in the system's trust store"),
        "{err}"
    );
}

#[test]
fn missing_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["check", "--config", "/nonexistent/rampart.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/rampart.toml: cannot read"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A one-worker config on `port` whose only backend (`dead`) refuses, with
/// `server_extra` lines in `[server]`.
fn dead_backend_config(port: u16, dead: u16, server_extra: &str) -> String {
    format!(
        r#"
[server]
workers = 1
shutdown_grace = "1s"
{server_extra}
[[listeners]]
bind = "127.0.0.1:{port}"
[[routes]]
pool = "app"
[pools.app]
backends = ["127.0.0.1:{dead}"]
health_check = {{ type = "none" }}
"#
    )
}

/// The binary on config file `p`, stdout captured and stderr to `stderr`, as soon as
/// it accepts on `port` (polled every millisecond: a signal sent then must be handled).
fn spawn_listening(p: &std::path::Path, port: u16, stderr: std::process::Stdio) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rampart"));
    cmd.stdout(std::process::Stdio::piped()).stderr(stderr);
    start_listening(cmd, p, port)
}

/// `cmd` (the binary) on config file `p`, as soon as it accepts on `port`.
fn start_listening(mut cmd: Command, p: &std::path::Path, port: u16) -> std::process::Child {
    let mut child = cmd.arg("--config").arg(p).env_remove("RUST_LOG").spawn().unwrap();
    let start = std::time::Instant::now();
    loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(_) => return child,
            Err(e) if start.elapsed() > std::time::Duration::from_secs(20) => {
                let _ = child.kill();
                panic!("rampart did not listen: {e}");
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    }
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// One HTTP/1.1 request with `Connection: close`; the whole answer.
fn request(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn logs_go_to_stderr_without_colour_codes_and_the_access_log_to_stdout() {
    let dir = TempDir::new("cli-stdout");
    let (port, dead) = (free_port(), free_port());
    let p = write(
        &dir,
        "stdout.toml",
        &dead_backend_config(port, dead, "access_log = true"),
    );
    let child = spawn_listening(&p, port, std::process::Stdio::piped());
    let answer = request(port, "/hello?x=1");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout holds the access log only:\n{stdout}");
    assert!(
        lines[0].contains(" 127.0.0.1 \"GET /hello?x=1 HTTP/1.1\" 503 "),
        "{stdout}"
    );
    assert!(
        stderr.contains("rampart started") && stderr.contains("stopped"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "colour codes in a log that is not a terminal:\n{stderr}"
    );
}

#[test]
fn sighup_rejects_a_bad_file_with_its_reason_and_installs_a_good_one() {
    let dir = TempDir::new("cli-reload");
    let (port, dead) = (free_port(), free_port());
    let p = write(&dir, "reload.toml", &dead_backend_config(port, dead, ""));
    let log = write(&dir, "reload.stderr", "");
    let child = spawn_listening(&p, port, std::fs::File::create(&log).unwrap().into());
    let outcomes = || {
        let text = std::fs::read_to_string(&log).unwrap();
        text.matches("reload rejected").count() + text.matches("config reloaded").count()
    };
    // The file is rewritten only once the previous SIGHUP's reload has said how it
    // ended: a reload reads the file when it runs, not when the signal is sent.
    let reload = |text: &str| {
        let before = outcomes();
        std::fs::write(&p, text).unwrap();
        signal(&child, libc::SIGHUP);
        let start = std::time::Instant::now();
        while outcomes() == before {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "no reload outcome logged"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    reload("[server]\ncolour = 1\n");
    // An access log behind a symlink into a missing directory: the file validates, and
    // opening it fails when the reload is installed, which refuses the reload whole.
    let broken = log.with_file_name("broken.log");
    let _ = std::fs::remove_file(&broken);
    std::os::unix::fs::symlink(log.with_file_name("missing/x.log"), &broken).unwrap();
    reload(&dead_backend_config(
        port,
        dead,
        &format!("access_log = {:?}", broken.display().to_string()),
    ));
    // Still serving on the running config.
    assert!(request(port, "/").starts_with("HTTP/1.1 503"));
    reload(&dead_backend_config(port, dead, "max_headers = 50"));
    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        stderr.matches("reload rejected, keeping the running config").count(),
        2,
        "{stderr}"
    );
    assert!(stderr.contains("unknown field `colour`"), "{stderr}");
    assert!(
        stderr.contains(&format!("server.access_log: cannot open {}", broken.display())),
        "{stderr}"
    );
    assert_eq!(stderr.matches("config reloaded").count(), 1, "{stderr}");
}

/// `watch_config`: a change to the config file, or to a file it names, reloads with no
/// signal; a bad edit is rejected and the running config stays; a file replaced by a
/// rename (as editors and Kubernetes do) counts; rewriting a file with the same
/// content does not reload.
#[test]
fn watch_config_reloads_when_the_file_or_a_file_it_names_changes() {
    let dir = TempDir::new("cli-watch");
    let (port, dead) = (free_port(), free_port());
    let config = |page: &str| {
        format!(
            "{}\n[error_pages]\n\"503\" = \"{page}\"\n",
            dead_backend_config(port, dead, "watch_config = true")
        )
    };
    write(&dir, "503.html", "<p>first</p>");
    let p = write(&dir, "watch.toml", &config("503.html"));
    let log = write(&dir, "watch.stderr", "");
    let child = spawn_listening(&p, port, std::fs::File::create(&log).unwrap().into());
    let logged = |what: &str| std::fs::read_to_string(&log).unwrap().matches(what).count();
    let serves = |want: &str| {
        let start = std::time::Instant::now();
        loop {
            let answer = request(port, "/");
            if answer.contains(want) {
                return;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "never served {want:?}; last answer:\n{answer}\nlog:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let until_logged = |what: &str, n: usize| {
        let start = std::time::Instant::now();
        while logged(what) < n {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "{what:?} not logged {n} times:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    serves("<p>first</p>");
    // Said once the watch is on; only then do changes count.
    until_logged("watch_config: reloading when a file in", 1);
    // A file the config names.
    std::fs::write(dir.join("503.html"), "<p>second</p>").unwrap();
    serves("<p>second</p>");
    assert_eq!(logged("config reloaded"), 1);
    // A bad edit: rejected, and the running config stays.
    std::fs::write(&p, "[server]\ncolour = 1\n").unwrap();
    let start = std::time::Instant::now();
    while logged("reload rejected") == 0 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "no rejection logged"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(request(port, "/").contains("<p>second</p>"));
    // Fixed by a rename over the file, naming a new page.
    write(&dir, "other.html", "<p>third</p>");
    let tmp = write(&dir, "watch.toml.tmp", &config("other.html"));
    std::fs::rename(&tmp, &p).unwrap();
    serves("<p>third</p>");
    assert_eq!(logged("config reloaded"), 2);
    // The same content written again: events, but no reload.
    std::fs::write(&p, config("other.html")).unwrap();
    std::thread::sleep(rampart::filewatch::QUIET * 3);
    assert_eq!(
        logged("config reloaded"),
        2,
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn a_sighup_sent_as_soon_as_rampart_accepts_reloads_instead_of_killing_it() {
    let dir = TempDir::new("cli-early");
    // The signal handlers were installed after the listeners, and a SIGHUP in between
    // met the default action: 18 of 20 such starts died. Five starts in a row.
    for round in 0..5 {
        let (port, dead) = (free_port(), free_port());
        let p = write(
            &dir,
            &format!("early-{round}.toml"),
            &dead_backend_config(port, dead, ""),
        );
        let log = write(&dir, &format!("early-{round}.stderr"), "");
        let mut child = spawn_listening(&p, port, std::fs::File::create(&log).unwrap().into());
        signal(&child, libc::SIGHUP);
        let start = std::time::Instant::now();
        while !std::fs::read_to_string(&log).unwrap().contains("config reloaded") {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("round {round}: rampart ended on the SIGHUP ({status})");
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "round {round}: no reload logged:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        signal(&child, libc::SIGTERM);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "round {round}");
    }
}

/// An origin on plain threads (these tests have no runtime): `/slow` is answered
/// after 1.5 s, anything else at once, each on a connection of its own.
fn thread_origin() -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let (mut head, mut buf) = (Vec::new(), [0u8; 4096]);
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(b"GET /slow") {
                    std::thread::sleep(std::time::Duration::from_millis(1500));
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
            });
        }
    });
    port
}

fn upgrade_config(port: u16, admin: u16, origin: u16, workers: usize, max_connections: usize) -> String {
    format!(
        r#"
[server]
workers = {workers}
max_connections = {max_connections}
shutdown_grace = "10s"
[admin]
bind = "127.0.0.1:{admin}"
[[listeners]]
bind = "127.0.0.1:{port}"
[[routes]]
pool = "app"
[pools.app]
backends = ["127.0.0.1:{origin}"]
health_check = {{ type = "none" }}
"#
    )
}

/// `request`, for a caller that counts failures rather than panics on them.
fn try_request(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    // A connection left in a queue nobody reads fails here rather than hangs.
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Stops a process this test did not start (the new one of an upgrade) when dropped,
/// so a failed test leaves nothing listening.
struct Reap(i32);

impl Drop for Reap {
    fn drop(&mut self) {
        // SAFETY: a signal to the process the test's upgrade started.
        unsafe { libc::kill(self.0, libc::SIGTERM) };
    }
}

/// The next message on the `NOTIFY_SOCKET` the test made.
fn notified(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("no sd_notify message within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn sigusr2_hands_the_sockets_to_a_new_process_without_refusing_a_connection() {
    let dir = TempDir::new("cli-upgrade");
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let (port, admin, origin) = (free_port(), free_port(), thread_origin());
    // One worker taking one connection at a time before; two workers after, so the
    // new process binds one more socket.
    let p = write(&dir, "upgrade.toml", &upgrade_config(port, admin, origin, 1, 1));
    let log = write(&dir, "upgrade.stderr", "");
    let notify_path = log.with_file_name("notify.sock");
    let _ = std::fs::remove_file(&notify_path);
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rampart"));
    cmd.env("NOTIFY_SOCKET", &notify_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut old = start_listening(cmd, &p, port);
    assert_eq!(notified(&notify), "READY=1");
    std::fs::write(&p, upgrade_config(port, admin, origin, 2, 1000)).unwrap();

    // A request in flight on the old process when it hands over: it drains. It holds
    // the old process's one connection, so the clients' connections wait, accepted
    // by the kernel, in the listening socket's queue: a socket that closed would
    // reset them.
    let slow = std::thread::spawn(move || try_request(port, "/slow"));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                // Each request on a connection of its own, until told to stop.
                while !stop.load(Ordering::Relaxed) {
                    match try_request(port, "/") {
                        Ok(a) if a.starts_with("HTTP/1.1 200") => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        ok.load(Ordering::Relaxed),
        0,
        "the clients' connections wait in the queue"
    );
    signal(&old, libc::SIGUSR2);
    let msg = notified(&notify);
    let new_pid: i32 = msg
        .strip_prefix("MAINPID=")
        .and_then(|m| m.strip_suffix("\nREADY=1"))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("not MAINPID=<pid>\\nREADY=1: {msg:?}"));
    let _reap = Reap(new_pid);
    assert_ne!(new_pid as u32, old.id());
    // And the old one, systemd's main process until then, names it too.
    assert_eq!(notified(&notify), format!("MAINPID={new_pid}"));
    let status = old.wait().unwrap();
    assert_eq!(status.code(), Some(0), "the old process drains and exits 0");
    std::thread::sleep(std::time::Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let slow = slow.join().unwrap().expect("the request in flight at the handover");
    assert!(slow.starts_with("HTTP/1.1 200"), "{slow}");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(failed, 0, "{failed} requests failed, {ok} passed:\n{text}");
    assert!(ok >= 20, "only {ok} requests");
    // The new process answers on the same sockets, with the new config.
    let status = request(admin, "/status");
    assert!(status.contains(&format!("\"pid\":{new_pid}")), "{status}");
    assert!(text.contains("workers=2"), "{text}");
    assert!(text.contains("upgrade: the new process serves"), "{text}");
}

#[test]
fn sigusr2_with_a_new_process_that_cannot_start_keeps_the_old_one() {
    let dir = TempDir::new("cli-upgrade-bad");
    let (port, admin, origin) = (free_port(), free_port(), thread_origin());
    let p = write(&dir, "upgrade-bad.toml", &upgrade_config(port, admin, origin, 1, 1000));
    let log = write(&dir, "upgrade-bad.stderr", "");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rampart"));
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let old = start_listening(cmd, &p, port);
    std::fs::write(&p, "[server]\ncolour = 1\n").unwrap();
    signal(&old, libc::SIGUSR2);
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&log).unwrap().contains("upgrade failed") {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "no upgrade outcome logged:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Still serving, on the config it had.
    assert!(request(port, "/").starts_with("HTTP/1.1 200"));
    let status = request(admin, "/status");
    assert!(status.contains(&format!("\"pid\":{}", old.id())), "{status}");
    signal(&old, libc::SIGTERM);
    let out = old.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("unknown field `colour`"),
        "the new process says why:\n{text}"
    );
    assert!(text.contains("exited (exit status: 1) before it served"), "{text}");
}

/// `/status`, parsed. Asked once: the old process of an upgrade drains the admin
/// connections it accepted, as the workers drain theirs, so none breaks off.
fn status(admin: u16, log: &std::path::Path) -> serde_json::Value {
    let answer = try_request(admin, "/status").unwrap_or_else(|e| {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        panic!("no /status: {e}; rampart's log:\n{text}")
    });
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("/status: {e}: {answer:?}"))
}

fn healthy(st: &serde_json::Value, backend: u16) -> bool {
    let addr = format!("127.0.0.1:{backend}");
    st["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["addr"] == addr.as_str())
        .unwrap_or_else(|| panic!("no {addr} in {st}"))["healthy"]
        .as_bool()
        .unwrap()
}

#[test]
fn an_upgrade_hands_over_which_backends_are_down() {
    let dir = TempDir::new("cli-upgrade-state");
    let (port, admin, origin, dead) = (free_port(), free_port(), thread_origin(), free_port());
    // Two failed checks 2 s apart mark a backend down: the new process, on its own,
    // would send it traffic for 2 s.
    let config = upgrade_config(port, admin, origin, 1, 1000).replace(
        &format!("backends = [\"127.0.0.1:{origin}\"]\nhealth_check = {{ type = \"none\" }}"),
        &format!(
            "backends = [\"127.0.0.1:{origin}\", \"127.0.0.1:{dead}\"]\nhealth_check = {{ interval = \"2s\", fall = 2 }}"
        ),
    );
    assert!(config.contains(&dead.to_string()), "{config}");
    let p = write(&dir, "upgrade-state.toml", &config);
    let log = write(&dir, "upgrade-state.stderr", "");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rampart"));
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut old = start_listening(cmd, &p, port);
    let start = std::time::Instant::now();
    while healthy(&status(admin, &log), dead) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(15),
            "never marked down"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    signal(&old, libc::SIGUSR2);
    let new = loop {
        let st = status(admin, &log);
        let pid = st["pid"].as_u64().unwrap() as u32;
        if pid != old.id() {
            break st;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "no new process");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let _reap = Reap(new["pid"].as_u64().unwrap() as i32);
    assert!(
        !healthy(&new, dead),
        "the new process takes the old one's verdict: {new}"
    );
    assert!(healthy(&new, origin), "{new}");
    assert_eq!(old.wait().unwrap().code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("took over the old process's backend health and ejections backends=2"),
        "{text}"
    );
}
