//! Who may pass a route, over real sockets. `basic_auth`: a request without a user
//! and password of the route's file, or with a wrong one, gets 401 with the realm's
//! challenge and never reaches the backend; a right one (over HTTP/1.1 or HTTP/2) is
//! proxied with its `Authorization`, `$remote_user` names the user to the backend and
//! in the access log; other routes stay open; and a reload reads the file again.
//! `forward_auth`: a real auth server is asked first, with the client's fields and
//! what it asked for; its 2xx lets the request (body and all) through with the
//! fields it names, replacing forged ones; its 401 or redirect goes to the client and
//! the backend sees nothing; an auth pool that is down fails the request with 503.

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

/// An auth service as oauth2-proxy or Authelia behave: `Bearer good` passes as
/// alice, `Bearer anon` passes with no user field, `Bearer login` is sent to a sign-in
/// page, anything else gets 401. Every request it got is kept.
struct AuthServer {
    addr: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<http::Request<()>>>>,
}

impl AuthServer {
    async fn start() -> AuthServer {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (parts, _) = req.into_parts();
                    let auth = parts
                        .headers
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_string());
                    log.lock().unwrap().push(http::Request::from_parts(parts, ()));
                    async move {
                        let mut r = http::Response::builder();
                        let body = match auth.as_deref() {
                            Some("Bearer good") => {
                                // A refreshed session, as oauth2-proxy sends, and a
                                // cookie of its own that is not the client's business.
                                r = r
                                    .status(200)
                                    .header("x-auth-user", "alice")
                                    .header("set-cookie", "_oauth2_proxy=refreshed; Path=/; HttpOnly")
                                    .header("set-cookie", "_oauth2_proxy_csrf=x; Path=/");
                                "ok"
                            }
                            Some("Bearer anon") => {
                                r = r.status(204);
                                ""
                            }
                            Some("Bearer login") => {
                                r = r.status(302).header("location", "https://login.example/start");
                                ""
                            }
                            _ => {
                                r = r.status(401).header("www-authenticate", "Bearer realm=\"app\"");
                                "sign in first"
                            }
                        };
                        Ok::<_, std::convert::Infallible>(r.body(Full::new(bytes::Bytes::from(body))).unwrap())
                    }
                });
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
        AuthServer { addr, seen }
    }
}

/// `/app/` (sent on without its prefix) asks the `auth` pool at `/verify`, passing
/// `X-Auth-User` on; `/` is open.
fn forward_auth_config(origin: std::net::SocketAddr, auth: std::net::SocketAddr) -> String {
    let toml = pool_config(&[origin], NO_HEALTH_CHECKS);
    toml.replacen(
        "[[routes]]\npool = \"app\"\n",
        "[[routes]]\npool = \"app\"\n\n[[routes]]\npath_prefix = \"/app/\"\nprefix_rewrite = \"/\"\npool = \"app\"\n\
         forward_auth = { pool = \"auth\", path = \"/verify\", auth_response_headers = [\"X-Auth-User\"], auth_response_cookies = [\"_oauth2_proxy\"] }\n",
        1,
    ) + &format!("\n[pools.auth]\nbackends = [\"{auth}\"]\n{NO_HEALTH_CHECKS}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_asks_first_and_passes_on_what_it_says() {
    let origin = TestOrigin::start("app", Behavior::Healthy).await;
    let auth = AuthServer::start().await;
    let (srv, addr) = start_proxy(&forward_auth_config(origin.addr, auth.addr));

    // Let through: the backend gets the auth service's user, not the one the client
    // forged, and the client's own fields.
    let r = get_with(
        addr,
        "/app/page?x=1",
        &[
            ("authorization", "Bearer good"),
            ("x-auth-user", "mallory"),
            ("cookie", "session=s1"),
        ],
    )
    .await;
    assert_eq!((r.status.as_u16(), r.text()), (200, "app".to_string()));
    // The session the auth service refreshed reaches the client; its other cookie does not.
    assert_eq!(
        r.headers.get_all("set-cookie").iter().collect::<Vec<_>>(),
        ["_oauth2_proxy=refreshed; Path=/; HttpOnly"]
    );
    {
        let seen = origin.seen_headers.lock().unwrap();
        let h = seen.last().unwrap();
        assert_eq!(h.get_all("x-auth-user").iter().collect::<Vec<_>>(), ["alice"]);
        assert_eq!(h["authorization"], "Bearer good");
        assert_eq!(h["cookie"], "session=s1");
    }
    {
        let asked = auth.seen.lock().unwrap();
        let q = asked.last().unwrap();
        assert_eq!(
            (q.method().as_str(), q.uri().to_string()),
            ("GET", "/verify".to_string())
        );
        let h = q.headers();
        assert_eq!(h["x-forwarded-method"], "GET");
        // What the client asked for, before the route's prefix_rewrite.
        assert_eq!(h["x-forwarded-uri"], "/app/page?x=1");
        assert_eq!(h["x-forwarded-host"], "test.local");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["cookie"], "session=s1");
        assert!(h.contains_key("x-request-id"));
    }

    // A 2xx without the field: the client's forged one does not get through either.
    let r = get_with(
        addr,
        "/app/",
        &[("authorization", "Bearer anon"), ("x-auth-user", "mallory")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(!origin
        .seen_headers
        .lock()
        .unwrap()
        .last()
        .unwrap()
        .contains_key("x-auth-user"));

    // A POST: the auth service gets a GET without the body, the backend the body.
    let post = http::Request::post("/app/count")
        .header("host", "test.local")
        .header("authorization", "Bearer good")
        .body(Full::new(bytes::Bytes::from(vec![b'p'; 3000])))
        .unwrap();
    let r = send(addr, post).await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "3000".to_string()));
    {
        let asked = auth.seen.lock().unwrap();
        let q = asked.last().unwrap();
        assert_eq!(q.method(), "GET");
        assert_eq!(q.headers()["x-forwarded-method"], "POST");
        assert!(!q.headers().contains_key("content-length"));
    }

    // Refused, or sent to sign in: the client gets the auth service's answer, and the
    // backend sees nothing, over HTTP/1.1 and HTTP/2.
    let before = origin.seen_headers.lock().unwrap().len();
    let r = get(addr, "/app/page").await;
    assert_eq!((r.status.as_u16(), r.text()), (401, "sign in first".to_string()));
    assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"app\"");
    let r = get_with(addr, "/app/page", &[("authorization", "Bearer login")]).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.headers["location"], "https://login.example/start");
    let denied_post = http::Request::post("/app/count")
        .header("host", "test.local")
        .body(Full::new(bytes::Bytes::from(vec![b'p'; 3000])))
        .unwrap();
    assert_eq!(send(addr, denied_post).await.unwrap().status, 401);
    let h2 = http::Request::get("http://test.local/app/page")
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(send_h2(addr, h2).await.status, 401);
    assert_eq!(
        origin.seen_headers.lock().unwrap().len(),
        before,
        "a refused request reached the backend"
    );

    // The open route does not ask.
    let asked = auth.seen.lock().unwrap().len();
    assert_eq!(get(addr, "/other").await.status, 200);
    assert_eq!(auth.seen.lock().unwrap().len(), asked);
    stop_proxy(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_auth_service_is_down_fails_without_reaching_the_backend() {
    let origin = TestOrigin::start("app", Behavior::Healthy).await;
    let down = refused_addr().await;
    let (srv, addr) = start_proxy(&forward_auth_config(origin.addr, down));
    let r = get_with(addr, "/app/", &[("authorization", "Bearer good")]).await;
    assert_eq!(r.status, 503);
    assert_eq!(origin.seen_headers.lock().unwrap().len(), 0);
    stop_proxy(srv).await;
}

#[test]
fn forward_auth_config_errors_name_the_field() {
    let toml = forward_auth_config("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
    let bad = toml
        .replace(
            "pool = \"auth\", path = \"/verify\"",
            "pool = \"nope\", path = \"verify\"",
        )
        .replace(
            "[\"X-Auth-User\"]",
            "[\"X-Auth-User\", \"Content-Length\", \"Host\", \"a b\"]",
        )
        .replace("[\"_oauth2_proxy\"]", "[\"_oauth2_proxy\", \"a;b\", \"\"]");
    assert_config_errors(
        &bad,
        &[
            "routes[1].forward_auth.pool: unknown pool 'nope'",
            "routes[1].forward_auth.path: must be a path starting with '/'",
            "routes[1].forward_auth.auth_response_headers: Content-Length: rampart keeps it to itself",
            "routes[1].forward_auth.auth_response_headers: Host",
            "routes[1].forward_auth.auth_response_headers: not a header name: \"a b\"",
            "routes[1].forward_auth.auth_response_cookies: not a cookie name: \"a;b\"",
            "routes[1].forward_auth.auth_response_cookies: not a cookie name: \"\"",
        ],
    );
    let answering = toml.replacen(
        "prefix_rewrite = \"/\"\npool = \"app\"\n",
        "return = { status = 200, body = \"hi\" }\n",
        1,
    );
    let err = rampart::Config::parse(&answering, "test.toml").unwrap_err().to_string();
    assert!(
        err.contains("routes[1].forward_auth: a route with return answers before anything is asked"),
        "{err}"
    );
}
