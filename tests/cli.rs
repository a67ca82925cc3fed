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
