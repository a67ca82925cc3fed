//! The `rampart` binary: `check` reports every error with file and field, and exits 1.

use std::process::Command;

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rampart-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_reports_every_error_with_file_and_field_and_exits_1() {
    let p = write(
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
fn missing_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["check", "--config", "/nonexistent/rampart.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/rampart.toml: cannot read"));
}

#[test]
fn logs_go_to_stderr_without_colour_codes_and_the_access_log_to_stdout() {
    use std::io::{Read, Write};
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, dead) = (free_port(), free_port());
    let p = write(
        "stdout.toml",
        &format!(
            r#"
[server]
workers = 1
access_log = true
shutdown_grace = "1s"
[[listeners]]
bind = "127.0.0.1:{port}"
[[routes]]
pool = "app"
[pools.app]
backends = ["127.0.0.1:{dead}"]
health_check = {{ type = "none" }}
"#
        ),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .arg("--config")
        .arg(&p)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let mut s = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) if start.elapsed() > std::time::Duration::from_secs(20) => {
                let _ = child.kill();
                panic!("rampart did not listen: {e}");
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    };
    s.write_all(b"GET /hello?x=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
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
