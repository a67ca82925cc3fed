//! A route's `basic_auth` over real sockets: a request without a user and password
//! of the route's file, or with a wrong one, gets 401 with the realm's challenge and
//! never reaches the backend; a right one (over HTTP/1.1 or HTTP/2) is proxied with
//! its `Authorization`, `$remote_user` names the user to the backend and in the
//! access log; other routes stay open; and a reload reads the file again.

mod common;

use base64::Engine as _;
use common::*;
use http::Request;
use http_body_util::Full;

fn basic(user: &str, password: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}

/// Users: alice (bcrypt, as `htpasswd -B` writes it) and bob (`$apr1$`, htpasswd's
/// default: `openssl passwd -apr1 -salt RandSalt password`).
fn users(alice_password: &str) -> String {
    let alice = bcrypt::hash(alice_password, 4).unwrap();
    format!("alice:{alice}\nbob:$apr1$RandSalt$PgCXHRrkpSt4cbyC2C6bm/\n")
}

/// `/admin/` needs a user of `users.htpasswd` in `dir` (and tells the backend who,
/// in `X-Remote-User`); `/` is open. The access log is `combined`.
fn config(origin: std::net::SocketAddr, dir: &TempDir) -> String {
    let toml = with_server_setting(
        &pool_config(&[origin], NO_HEALTH_CHECKS),
        &format!(
            "access_log = \"{}\"\naccess_log_format = \"combined\"",
            dir.path().join("access.log").display()
        ),
    );
    toml.replacen(
        "[[routes]]\npool = \"app\"\n",
        &format!(
            "[[routes]]\npool = \"app\"\n\n[[routes]]\npath_prefix = \"/admin/\"\npool = \"app\"\n\
             basic_auth = {{ realm = \"Admin \\\"area\\\"\", user_file = \"{}\" }}\n\
             request_headers = {{ set = {{ \"X-Remote-User\" = \"$remote_user\" }} }}\n",
            dir.path().join("users.htpasswd").display()
        ),
        1,
    )
}

fn seen(origin: &TestOrigin) -> usize {
    origin.seen_headers.lock().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_files_users_pass_and_the_backend_learns_who() {
    let origin = TestOrigin::start("o", Behavior::Healthy).await;
    let dir = TempDir::new("auth-users");
    std::fs::write(dir.path().join("users.htpasswd"), users("s3cret")).unwrap();
    let (srv, addr) = start_proxy(&config(origin.addr, &dir));

    // No credentials, a wrong password, an unknown user, another scheme, two fields:
    // 401 with the challenge, and the backend sees none of them.
    let refused = [
        vec![],
        vec![("authorization", basic("alice", "wrong"))],
        vec![("authorization", basic("mallory", "s3cret"))],
        vec![("authorization", "Bearer s3cret".to_string())],
        vec![
            ("authorization", basic("alice", "s3cret")),
            ("authorization", basic("alice", "s3cret")),
        ],
    ];
    for headers in &refused {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = get_with(addr, "/admin/x", &h).await;
        assert_eq!(r.status, 401, "{headers:?}");
        assert_eq!(
            r.headers["www-authenticate"],
            "Basic realm=\"Admin \\\"area\\\"\", charset=\"UTF-8\""
        );
    }
    assert_eq!(seen(&origin), 0, "a refused request must not reach the backend");

    // The right password, twice (the second from the worker's cache).
    for _ in 0..2 {
        let r = get_with(addr, "/admin/x", &[("authorization", &basic("alice", "s3cret"))]).await;
        assert_eq!(r.status, 200);
    }
    let r = get_with(addr, "/admin/x", &[("authorization", &basic("bob", "password"))]).await;
    assert_eq!(r.status, 200);
    {
        let seen = origin.seen_headers.lock().unwrap();
        assert_eq!(seen.len(), 3);
        // `Authorization` goes on, as nginx passes it; `$remote_user` names the user.
        assert_eq!(seen[0]["authorization"], basic("alice", "s3cret").as_str());
        assert_eq!(seen[0]["x-remote-user"], "alice");
        assert_eq!(seen[2]["x-remote-user"], "bob");
    }

    // Over HTTP/2 (the fields in a map, not raw) the same.
    let h2 = |auth: Option<String>| {
        let mut b = Request::get("http://test.local/admin/y");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(Full::new(bytes::Bytes::new())).unwrap()
    };
    assert_eq!(send_h2(addr, h2(None)).await.status, 401);
    assert_eq!(send_h2(addr, h2(Some(basic("bob", "nope")))).await.status, 401);
    assert_eq!(send_h2(addr, h2(Some(basic("bob", "password")))).await.status, 200);

    // Another route stays open.
    assert_eq!(get(addr, "/open").await.status, 200);
    assert_eq!(seen(&origin), 5);
    stop_proxy(srv).await;

    // `combined` logs the user as nginx does: the one the request named, checked or not.
    let log = std::fs::read_to_string(dir.path().join("access.log")).unwrap();
    let users: Vec<&str> = log.lines().map(|l| l.split(' ').nth(2).unwrap()).collect();
    assert_eq!(
        users,
        ["-", "alice", "mallory", "-", "alice", "alice", "alice", "bob", "-", "bob", "bob", "-"],
        "{log}"
    );
    assert!(log.lines().nth(1).unwrap().contains("\" 401 "), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_the_user_file_again() {
    let origin = TestOrigin::start("o", Behavior::Healthy).await;
    let dir = TempDir::new("auth-reload");
    let file = dir.path().join("users.htpasswd");
    std::fs::write(&file, users("old")).unwrap();
    let toml = config(origin.addr, &dir);
    let (srv, addr) = start_proxy(&toml);
    let alice = |pw: &str| basic("alice", pw);
    assert_eq!(
        get_with(addr, "/admin/", &[("authorization", &alice("old"))])
            .await
            .status,
        200
    );

    // A new password for alice, and bob gone.
    std::fs::write(&file, users("new").lines().next().unwrap()).unwrap();
    srv.reload(rampart::Config::parse(&toml, "test.toml").unwrap()).unwrap();
    assert_eq!(
        get_with(addr, "/admin/", &[("authorization", &alice("old"))])
            .await
            .status,
        401
    );
    assert_eq!(
        get_with(addr, "/admin/", &[("authorization", &alice("new"))])
            .await
            .status,
        200
    );
    let bob = basic("bob", "password");
    assert_eq!(get_with(addr, "/admin/", &[("authorization", &bob)]).await.status, 401);

    // A broken file fails the check, naming the route, the file and the line.
    std::fs::write(&file, "alice:{PLAIN}x\nbob:not-a-hash\n").unwrap();
    let err = rampart::Config::parse(&toml, "test.toml").unwrap_err().to_string();
    assert!(
        err.contains("routes[1].basic_auth.user_file") && err.contains("users.htpasswd line 2 (user \"bob\")"),
        "{err}"
    );
    // The running config still holds.
    assert_eq!(
        get_with(addr, "/admin/", &[("authorization", &alice("new"))])
            .await
            .status,
        200
    );
    stop_proxy(srv).await;
}
