//! The access log over real sockets: one line per answered request with its fields,
//! written within `FLUSH_AFTER` without a shutdown, reopened by name for log rotation,
//! moved by a reload, a reload to a file that cannot be opened is refused whole, and a
//! write that fails (a full disk) loses only its lines.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rampart-accesslog-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn config(backends: &[std::net::SocketAddr], log: &Path) -> String {
    with_server_setting(
        &pool_config(backends, "health_check = { type = \"none\" }"),
        &format!("access_log = \"{}\"", log.display()),
    )
}

/// Waits (generously: the flush is due after one second) until `path` has `n` lines.
async fn wait_for_lines(path: &Path, n: usize) -> Vec<String> {
    let start = Instant::now();
    loop {
        let got = lines(path);
        if got.len() >= n || start.elapsed() > Duration::from_secs(10) {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answered_request_gets_one_line_with_its_fields() {
    let origin = TestOrigin::start("a", Behavior::Healthy).await;
    let dir = temp_dir("fields");
    let log = dir.join("access.log");
    let (srv, addr) = start_proxy(&config(&[origin.addr], &log));

    let ok = get_with(addr, "/a/b?q=1&r=2", &[("x-request-id", "client-id-1")]).await;
    assert_eq!(ok.status, 200);
    // A request id with a quote and a space must not split or forge a field.
    let odd = get_with(addr, "/odd", &[("x-request-id", "id \"x\"")]).await;
    assert_eq!(odd.status, 200);
    let h2 = get_h2(addr, "/two").await;
    assert_eq!(h2.status, 200);
    let generated = h2.headers["x-request-id"].to_str().unwrap().to_string();
    stop_proxy(srv).await;

    let got = lines(&log);
    assert_eq!(got.len(), 3, "{got:#?}");
    let fields: Vec<Vec<&str>> = got.iter().map(|l| l.split(' ').collect()).collect();
    let backend = origin.addr.to_string();
    // time client "method target version" status ms pool backend request-id
    assert_eq!(
        fields[0][1..],
        [
            "127.0.0.1",
            "\"GET",
            "/a/b?q=1&r=2",
            "HTTP/1.1\"",
            "200",
            fields[0][6],
            "app",
            backend.as_str(),
            "client-id-1"
        ]
    );
    assert!(
        fields[0][0].ends_with('Z') && fields[0][0].len() == 24,
        "{}",
        fields[0][0]
    );
    assert!(fields[0][6].parse::<f64>().is_ok(), "{}", fields[0][6]);
    assert_eq!(fields[1].len(), 10, "{}", got[1]);
    assert_eq!(fields[1][9], "id\\x20\\x22x\\x22", "{}", got[1]);
    assert_eq!(fields[2][2..5], ["\"GET", "/two", "HTTP/2.0\""]);
    assert_eq!(fields[2][9], generated, "the line carries the id the client was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_requests_are_logged_with_their_status_and_no_backend() {
    let dead = refused_addr().await;
    let dir = temp_dir("failed");
    let log = dir.join("access.log");
    let (srv, addr) = start_proxy(&config(&[dead], &log));
    let r = get(addr, "/gone").await;
    assert_eq!(r.status, 503);
    stop_proxy(srv).await;
    let got = lines(&log);
    assert_eq!(got.len(), 1, "{got:#?}");
    let f: Vec<&str> = got[0].split(' ').collect();
    assert_eq!([f[5], f[7], f[8]], ["503", "app", "-"], "{}", got[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_are_written_within_seconds_and_reopening_follows_log_rotation() {
    let origin = TestOrigin::start("a", Behavior::Healthy).await;
    let dir = temp_dir("rotate");
    let log = dir.join("access.log");
    let (srv, addr) = start_proxy(&config(&[origin.addr], &log));
    for _ in 0..3 {
        get(addr, "/before").await;
    }
    // No shutdown, no full buffer: the once-a-second flush writes them.
    assert_eq!(wait_for_lines(&log, 3).await.len(), 3);

    // logrotate: move the file, then signal (SIGUSR1 in the binary).
    let rotated = dir.join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    srv.reopen_logs().unwrap();
    for _ in 0..2 {
        get(addr, "/after").await;
    }
    stop_proxy(srv).await;
    let old = lines(&rotated);
    let new = lines(&log);
    assert_eq!(old.len(), 3, "{old:#?}");
    assert!(old.iter().all(|l| l.contains(" /before ")), "{old:#?}");
    assert_eq!(new.len(), 2, "{new:#?}");
    assert!(new.iter().all(|l| l.contains(" /after ")), "{new:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_the_log_and_one_that_cannot_open_it_changes_nothing() {
    let a = TestOrigin::start("a", Behavior::Healthy).await;
    let b = TestOrigin::start("b", Behavior::Healthy).await;
    let dir = temp_dir("reload");
    let (first, second) = (dir.join("first.log"), dir.join("second.log"));
    let (srv, addr) = start_proxy(&config(&[a.addr], &first));
    assert_eq!(get(addr, "/").await.text(), "a");
    assert_eq!(wait_for_lines(&first, 1).await.len(), 1);

    // A file in a directory that does not exist, behind a symlink so that the config
    // itself validates: opening it fails at reload, and the reload is refused whole.
    let broken = dir.join("broken.log");
    std::os::unix::fs::symlink(dir.join("missing/x.log"), &broken).unwrap();
    let bad = rampart::Config::parse(&config(&[b.addr], &broken), "t").unwrap();
    let err = srv.reload(bad).unwrap_err().to_string();
    assert!(
        err.contains("server.access_log: cannot open") && err.contains("broken.log"),
        "{err}"
    );
    assert_eq!(get(addr, "/").await.text(), "a", "the pool change was refused too");
    // Written to the first file before the next reload: a line still buffered at a
    // reload goes to the new file.
    assert_eq!(wait_for_lines(&first, 2).await.len(), 2);

    srv.reload(rampart::Config::parse(&config(&[b.addr], &second), "t").unwrap())
        .unwrap();
    assert_eq!(get(addr, "/").await.text(), "b");
    stop_proxy(srv).await;
    assert_eq!(lines(&first).len(), 2, "{:#?}", lines(&first));
    assert_eq!(lines(&second).len(), 1, "{:#?}", lines(&second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_be_written_drops_its_lines_and_the_proxy_carries_on() {
    // /dev/full opens, and every write to it fails with ENOSPC: a full disk.
    let origin = TestOrigin::start("a", Behavior::Healthy).await;
    let (srv, addr) = start_proxy(&config(&[origin.addr], Path::new("/dev/full")));
    assert_eq!(get(addr, "/first").await.status, 200);
    // Past the once-a-second flush, which fails.
    tokio::time::sleep(rampart::accesslog::FLUSH_AFTER * 2).await;
    for _ in 0..20 {
        assert_eq!(get(addr, "/after").await.status, 200);
    }
    // The failed flush again, at shutdown: the server still stops cleanly.
    stop_proxy(srv).await;
    // Every line is counted as dropped: the first flush's one, and the 20 at shutdown.
    assert_eq!(metric("rampart_access_log_dropped_lines_total"), "21");
}
