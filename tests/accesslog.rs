//! The access log over real sockets: one line per request with its fields, how it
//! ended (retried, client gone, backend broke off), the `combined`, `json` and
//! template formats, written within `FLUSH_AFTER` without a shutdown, reopened by name for log rotation,
//! moved by a reload, a reload to a file that cannot be opened is refused whole, and a
//! write that fails (a full disk) loses only its lines.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn temp_dir(name: &str) -> TempDir {
    TempDir::new(&format!("accesslog-{name}"))
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

/// The default line's fields, split on spaces (the request's three parts apart):
/// time client "method target protocol" status bytes request_time header_time pool
/// backend attempts termination request-id.
fn fields(line: &str) -> Vec<&str> {
    let f: Vec<&str> = line.split(' ').collect();
    assert_eq!(f.len(), 14, "{line}");
    f
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
    let f: Vec<Vec<&str>> = got.iter().map(|l| fields(l)).collect();
    let backend = origin.addr.to_string();
    assert_eq!(
        f[0][1..],
        [
            "127.0.0.1",
            "\"GET",
            "/a/b?q=1&r=2",
            "HTTP/1.1\"",
            "200",
            "1",
            f[0][7],
            f[0][8],
            "app",
            backend.as_str(),
            "1",
            "-",
            "client-id-1"
        ]
    );
    assert!(f[0][0].ends_with('Z') && f[0][0].len() == 24, "{}", f[0][0]);
    let (total, head): (f64, f64) = (f[0][7].parse().unwrap(), f[0][8].parse().unwrap());
    assert!(head > 0.0 && head <= total, "{}", got[0]);
    assert_eq!(f[1][13], "id\\x20\\x22x\\x22", "{}", got[1]);
    assert_eq!(f[2][2..5], ["\"GET", "/two", "HTTP/2.0\""]);
    assert_eq!(f[2][13], generated, "the line carries the id the client was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_requests_are_logged_with_their_status_error_and_tries() {
    let dead = refused_addr().await;
    let dead2 = refused_addr().await;
    let dir = temp_dir("failed");
    let log = dir.join("access.log");
    let (srv, addr) = start_proxy(&config(&[dead, dead2], &log));
    let r = get(addr, "/gone").await;
    assert_eq!(r.status, 503);
    stop_proxy(srv).await;
    let got = lines(&log);
    assert_eq!(got.len(), 1, "{got:#?}");
    let f = fields(&got[0]);
    // Both backends were tried; rampart answered itself, so no backend and no time to
    // a backend's head, and the error's kind as in `rampart_proxy_errors_total`.
    assert_eq!(
        [f[5], f[8], f[9], f[10], f[11], f[12]],
        ["503", "-", "app", "-", "2", "connect_failed"],
        "{}",
        got[0]
    );
    assert_ne!(f[6], "0", "the error page's bytes: {}", got[0]);
}

/// A request head hyper refuses, and answers itself, is logged as nginx logs its 400s:
/// the status, and `-` for the request it could not read; in JSON, `null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_unparsed_is_logged() {
    let origin = TestOrigin::start("a", Behavior::Healthy).await;
    let dir = temp_dir("unparsed");
    let log = dir.join("access.log");
    let (srv, addr) = start_proxy(&config(&[origin.addr], &log));
    // A field line without a colon, after a good request on the same connection.
    let answer = raw(
        addr,
        b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\nGET /bad HTTP/1.1\r\nHost t\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.contains("HTTP/1.1 400 Bad Request"), "{answer}");
    let got = wait_for_lines(&log, 2).await;
    assert_eq!(got.len(), 2, "{got:#?}");
    let f: Vec<&str> = got[1].split(' ').collect();
    // time client request status bytes ...: the request is `"-"`, as nginx writes it.
    assert_eq!(
        [f[1], f[2], f[3], f[8], f[10]],
        ["127.0.0.1", "\"-\"", "400", "-", "bad_request"],
        "{}",
        got[1]
    );
    assert_eq!(f.len(), 12, "{}", got[1]);

    let json = with_server_setting(&config(&[origin.addr], &log), "access_log_format = \"json\"");
    srv.reload(rampart::Config::parse(&json, "t").unwrap()).unwrap();
    raw(addr, b"BAD\x01 / HTTP/1.1\r\nHost: t\r\n\r\n", Duration::from_secs(5)).await;
    let got = wait_for_lines(&log, 3).await;
    assert_eq!(got.len(), 3, "{got:#?}");
    let v: serde_json::Value = serde_json::from_str(&got[2]).unwrap();
    assert_eq!(v["status"], 400);
    assert_eq!(v["request_method"], serde_json::Value::Null);
    assert_eq!(v["request_uri"], serde_json::Value::Null);
    assert_eq!(origin.hits(), 1);
    stop_proxy(srv).await;
}

/// A request retried on another backend says so; one whose client left before the
/// answer is logged as nginx logs it (499); one whose backend broke off mid-body is
/// logged with the status it started with, the bytes that got through, and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_says_how_its_request_ended() {
    let dead = refused_addr().await;
    let good = TestOrigin::start("good", Behavior::Healthy).await;
    let frozen = TestOrigin::start("frozen", Behavior::Freeze).await;
    let reset = TestOrigin::start("reset", Behavior::ResetMidBody).await;
    let dir = temp_dir("ended");
    let log = dir.join("access.log");
    let toml = format!(
        r#"
[server]
workers = 1
shutdown_grace = "5s"
access_log = "{log}"

[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
path_prefix = "/frozen"
pool = "frozen"

[[routes]]
path_prefix = "/reset"
pool = "reset"

[[routes]]
pool = "app"

[pools.app]
backends = ["{dead}", "{good}"]
balancer = "round_robin"
health_check = {{ type = "none" }}

[pools.frozen]
backends = ["{frozen}"]
health_check = {{ type = "none" }}

[pools.reset]
backends = ["{reset}"]
health_check = {{ type = "none" }}
retry = {{ response_buffer_bytes = 0 }}
"#,
        log = log.display(),
        good = good.addr,
        frozen = frozen.addr,
        reset = reset.addr,
    );
    let (srv, addr) = start_proxy(&toml);
    for _ in 0..2 {
        assert_eq!(get(addr, "/retried").await.text(), "good");
    }

    // The client sends its request and leaves while the backend holds it.
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut c, b"GET /frozen HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    while frozen.hits() == 0 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(c);

    assert!(try_get(addr, "/reset").await.is_err(), "the body breaks off");
    let got = wait_for_lines(&log, 4).await;
    stop_proxy(srv).await;
    assert_eq!(got.len(), 4, "{got:#?}");
    let f: Vec<Vec<&str>> = got.iter().map(|l| fields(l)).collect();

    let retried: Vec<&str> = f[..2].iter().map(|f| f[11]).collect();
    assert!(
        retried.contains(&"2"),
        "one of two round-robin requests met the dead backend first: {got:#?}"
    );
    for f in &f[..2] {
        assert_eq!(
            [f[5], f[6], f[10], f[12]],
            ["200", "4", good.addr.to_string().as_str(), "-"]
        );
    }
    let frozen_line = got.iter().position(|l| l.contains(" /frozen ")).unwrap();
    let reset_line = got.iter().position(|l| l.contains(" /reset ")).unwrap();
    let (fr, rs) = (&f[frozen_line], &f[reset_line]);
    assert_eq!(
        [fr[5], fr[6], fr[8], fr[9], fr[10], fr[12]],
        ["499", "0", "-", "-", "-", "client_aborted"],
        "{}",
        got[frozen_line]
    );
    assert_eq!(
        [rs[5], rs[9], rs[11], rs[12]],
        ["200", "reset", "1", "upstream_body_failed"],
        "{}",
        got[reset_line]
    );
    let sent: u64 = rs[6].parse().unwrap();
    assert!(
        sent > 0 && sent < 1_000_000,
        "part of the promised 1 MB got through: {sent}"
    );
}

/// `combined` and `json` lines, `$http_NAME` from every way a request's fields arrive
/// (as written on the HTTP/1.1 fast path, in a map with a body, over HTTP/2), and a
/// reload that changes the format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formats_are_nginx_s_combined_json_or_a_template() {
    let origin = TestOrigin::start("a", Behavior::Healthy).await;
    let dir = temp_dir("formats");
    let log = dir.join("access.log");
    let with_format =
        |f: &str| with_server_setting(&config(&[origin.addr], &log), &format!("access_log_format = {f:?}"));
    let (srv, addr) = start_proxy(&with_format("combined"));
    let ua = [("user-agent", "probe/1.0 (test; \"x\")"), ("referer", "http://r/")];
    assert_eq!(get_with(addr, "/c?x=1", &ua).await.status, 200);
    let got = wait_for_lines(&log, 1).await;
    assert_eq!(got.len(), 1, "{got:#?}");
    let l = &got[0];
    assert!(l.starts_with("127.0.0.1 - - ["), "{l}");
    assert!(
        l.ends_with("] \"GET /c?x=1 HTTP/1.1\" 200 1 \"http://r/\" \"probe/1.0 (test; \\x22x\\x22)\""),
        "{l}"
    );

    srv.reload(rampart::Config::parse(&with_format("json"), "t").unwrap())
        .unwrap();
    assert_eq!(get_with(addr, "/j", &ua).await.status, 200);
    let posted = send(
        addr,
        http::Request::post("/p")
            .header("host", "Site.Example:99")
            .header("user-agent", "poster")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"body")))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(posted.status, 200);
    assert_eq!(get_h2(addr, "/h2").await.status, 200);
    let got = wait_for_lines(&log, 4).await;
    assert_eq!(got.len(), 4, "{got:#?}");
    let v: Vec<serde_json::Value> = got[1..].iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(v[0]["request_uri"], "/j");
    assert_eq!(v[0]["http_user_agent"], "probe/1.0 (test; \"x\")");
    assert_eq!(v[0]["http_referer"], "http://r/");
    assert_eq!(v[0]["status"], 200);
    assert_eq!(v[0]["upstream_attempts"], 1);
    assert_eq!(v[0]["pool"], "app");
    assert_eq!(v[1]["request_method"], "POST");
    assert_eq!(v[1]["http_user_agent"], "poster");
    assert_eq!(v[1]["host"], "site.example");
    assert_eq!(v[1]["http_referer"], serde_json::Value::Null);
    assert_eq!(v[2]["server_protocol"], "HTTP/2.0");
    assert!(v[2]["request_time"].as_f64().unwrap() > 0.0);

    // Response fields: the backend's as written (`Date`, and `Content-Length` as it
    // declared it), over HTTP/1.1 and HTTP/2 clients alike; none for one not sent.
    let template = "[$sent_http_content_length] [$sent_http_date] [$sent_http_x_none] $server_protocol";
    srv.reload(rampart::Config::parse(&with_format(template), "t").unwrap())
        .unwrap();
    assert_eq!(get(addr, "/s").await.status, 200);
    assert_eq!(get_h2(addr, "/s2").await.status, 200);
    let got = wait_for_lines(&log, 6).await;
    assert_eq!(got.len(), 6, "{got:#?}");
    for (l, protocol) in got[4..].iter().zip(["HTTP/1.1", "HTTP/2.0"]) {
        assert!(
            l.starts_with("[1] [") && l.ends_with(&format!(" GMT] [-] {protocol}")),
            "{l}"
        );
    }

    let template = "$status $request_method [$http_x_trace] ${pool}! $scheme $server_port $ssl_protocol";
    srv.reload(rampart::Config::parse(&with_format(template), "t").unwrap())
        .unwrap();
    assert_eq!(get_with(addr, "/t", &[("x-trace", "t 1")]).await.status, 200);
    stop_proxy(srv).await;
    let got = lines(&log);
    assert_eq!(
        got.last().unwrap(),
        &format!("200 GET [t 1] app! http {} -", addr.port()),
        "{got:#?}"
    );
}

/// A template written as JSON, with `access_log_escape = "json"` (nginx's
/// `escape=json`): every line parses, whatever the client put in its fields, and a
/// value that does not exist is an empty string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_template_with_json_escaping_gives_lines_that_parse() {
    let origin = TestOrigin::start("a", Behavior::Healthy).await;
    let dir = temp_dir("json-escape");
    let log = dir.join("access.log");
    let template =
        r#"{"status":$status,"req":"$request","ua":"$http_user_agent","up":"$upstream_addr","rt":$request_time}"#;
    let toml = with_server_setting(
        &config(&[origin.addr], &log),
        &format!("access_log_format = '{template}'\naccess_log_escape = \"json\"\nmax_body_bytes = 4"),
    );
    let (srv, addr) = start_proxy(&toml);
    let ua = "evil\", \"status\": 0, \"x\\\t\u{e9}";
    assert_eq!(get_with(addr, "/a?q=%22", &[("user-agent", ua)]).await.status, 200);
    // A body past `max_body_bytes`: answered by rampart itself, no backend.
    let refused = send(
        addr,
        http::Request::post("/t")
            .header("host", "t")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"too long a body")))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(refused.status, 413);
    stop_proxy(srv).await;
    let got = lines(&log);
    assert_eq!(got.len(), 2, "{got:#?}");
    let v: Vec<serde_json::Value> = got.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(v[0]["status"], 200);
    assert_eq!(v[0]["req"], "GET /a?q=%22 HTTP/1.1");
    assert_eq!(v[0]["ua"], ua);
    assert_eq!(v[0]["up"], origin.addr.to_string());
    assert!(v[0]["rt"].as_f64().unwrap() > 0.0);
    assert_eq!(v[1]["status"], 413);
    assert_eq!(v[1]["up"], "");
}

/// nginx's size variables: `$request_length` and `$bytes_sent` are the bytes on the
/// wire on rampart's own HTTP/1.1 path (chunked framing included), and on hyper's
/// path the request's too; `$server_name` is the route's host as configured;
/// `$request_completion`, `$upstream_response_length` (the backend's body),
/// `$gzip_ratio` and `$upstream_cache_status` (`-`: no cache), and `$ssl_server_name`
/// (`-` over plain HTTP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_s_size_and_server_variables() {
    use tokio::io::AsyncWriteExt;
    let origin = TestOrigin::start("a", Behavior::Healthy).await;
    let dir = temp_dir("nginx-sizes");
    let log = dir.join("access.log");
    let template = "$request_length $bytes_sent $body_bytes_sent [$server_name] [$request_completion] \
                    $upstream_response_length $gzip_ratio $upstream_cache_status $ssl_server_name";
    let routes = "[[routes]]\nhost = \"site.test\"\npool = \"app\"\n\n[[routes]]\nhost = \"*.wild.test\"\npool = \"app\"\n\n[pools.app]\n";
    let toml = with_server_setting(
        &config(&[origin.addr], &log).replacen("[pools.app]\n", routes, 1),
        &format!("access_log_format = {template:?}"),
    );
    let (srv, addr) = start_proxy(&toml);
    let mut s = CountingReader {
        inner: tokio::net::TcpStream::connect(addr).await.unwrap(),
        read: 0,
    };
    let mut buf = Vec::new();
    // Each request as sent, and the bytes its response took.
    let mut exchange = async |s: &mut CountingReader<tokio::net::TcpStream>, request: &str| {
        s.inner.write_all(request.as_bytes()).await.unwrap();
        let before = s.read - buf.len();
        let (head, body) = read_one_response(s, &mut buf, false).await;
        assert!(head.starts_with("http/1.1 200 "), "{head}");
        (s.read - buf.len() - before, body.len())
    };
    let get = "GET /a?x=1 HTTP/1.1\r\nHost: site.test\r\nUser-Agent: raw/1.0\r\n\r\n";
    let (get_sent, get_body) = exchange(&mut s, get).await;
    // A body that came whole with its head, echoed back chunked.
    let post = "POST /echo HTTP/1.1\r\nHost: x.wild.test\r\nContent-Length: 5\r\n\r\nhello";
    let (post_sent, post_body) = exchange(&mut s, post).await;
    // A chunked body: hyper's path, which measures the head as HTTP/1.1 carries it.
    let chunked_head = "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n";
    let chunked = format!("{chunked_head}7\r\nchunked\r\n0\r\n\r\n");
    let (chunked_sent, chunked_body) = exchange(&mut s, &chunked).await;
    assert_eq!((get_body, post_body, chunked_body), (1, 5, 7));
    let got = wait_for_lines(&log, 3).await;
    stop_proxy(srv).await;
    assert_eq!(got.len(), 3, "{got:#?}");
    assert_eq!(
        got[0],
        format!("{} {get_sent} 1 [site.test] [OK] 1 - - -", get.len()),
        "{got:#?}"
    );
    assert_eq!(
        got[1],
        format!("{} {post_sent} 5 [*.wild.test] [OK] 5 - - -", post.len()),
        "{got:#?}"
    );
    // hyper's head and chunk framing are its own: the size logged is the head as
    // rampart would write it, and the body.
    let f: Vec<&str> = got[2].split(' ').collect();
    assert_eq!(f[0], (chunked_head.len() + 7).to_string(), "{got:#?}");
    assert_eq!(f[2..].join(" "), "7 [-] [OK] 7 - - -", "{got:#?}");
    let logged: usize = f[1].parse().unwrap();
    assert!(logged > 7 + 60 && logged <= chunked_sent, "{logged} of {chunked_sent}");
}

/// nginx's connection and upstream variables: `$connection` (a serial number, kept
/// while the connection sleeps dormant) and `$connection_requests` (this one
/// included) over rampart's own HTTP/1.1 path, hyper's and HTTP/2; `$uri`, `$args`,
/// `$is_args`; `$upstream_status`, `$upstream_response_time` and
/// `$upstream_connect_time` (`-` when rampart answered itself; 0 on a connection
/// reused); `$pid` and `$hostname`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_s_connection_and_upstream_variables() {
    use tokio::io::AsyncWriteExt;
    let origin = TestOrigin::start("a", Behavior::Healthy).await;
    let dir = temp_dir("nginx-vars");
    let log = dir.join("access.log");
    let template =
        "$connection $connection_requests $request_method [$uri] [$args] [$is_args] $upstream_status $status \
                    $upstream_header_time $upstream_response_time $request_time $pid $hostname $upstream_connect_time";
    let toml = with_server_setting(
        &config(&[origin.addr], &log),
        &format!("access_log_format = {template:?}"),
    );
    let (srv, addr) = start_proxy(&toml);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let mut exchange = async |s: &mut tokio::net::TcpStream, request: &str| {
        s.write_all(request.as_bytes()).await.unwrap();
        read_one_response(s, &mut buf, false).await.0
    };
    assert!(exchange(&mut s, "GET /a?x=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .contains(" 200 "));
    // A chunked body goes to hyper's path (idle::Svc); a bodiless GET takes rampart's.
    let chunked = "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nchunk\r\n0\r\n\r\n";
    assert!(exchange(&mut s, chunked).await.contains(" 200 "));
    // Dormant, then woken with its serial number and count.
    let dormant = || {
        srv.shared()
            .dormant_connections
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let start = Instant::now();
    while dormant() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the connection never went dormant"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(exchange(&mut s, "GET /b? HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .contains(" 200 "));
    let mut s2 = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(exchange(&mut s2, "GET /c HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .contains(" 200 "));
    let mut s3 = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(exchange(&mut s3, "GET /d HTTP/1.1\r\nHost: t\r\nno colon\r\n\r\n")
        .await
        .contains(" 400 "));
    assert_eq!(get_h2(addr, "/h2").await.status, 200);
    let got = wait_for_lines(&log, 6).await;
    stop_proxy(srv).await;
    assert_eq!(got.len(), 6, "{got:#?}");
    let f: Vec<Vec<&str>> = got.iter().map(|l| l.split(' ').collect()).collect();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let pid = std::process::id().to_string();
    for (l, f) in got.iter().zip(&f) {
        assert_eq!(f.len(), 14, "{l}");
        assert_eq!((f[11], f[12]), (pid.as_str(), host.trim()), "{l}");
    }
    let picked = |i: usize| f[i][1..8].join(" ");
    assert_eq!(picked(0), "1 GET [/a] [x=1] [?] 200 200", "{}", got[0]);
    assert_eq!(picked(1), "2 POST [/echo] [-] [] 200 200", "{}", got[1]);
    assert_eq!(picked(2), "3 GET [/b] [] [?] 200 200", "{}", got[2]);
    assert_eq!(picked(3), "1 GET [/c] [-] [] 200 200", "{}", got[3]);
    assert_eq!(picked(4), "1 - [-] [-] [-] - 400", "{}", got[4]);
    assert_eq!(picked(5), "1 GET [/h2] [-] [] 200 200", "{}", got[5]);
    // One connection for the first three, dormancy notwithstanding; then each its own.
    let serials: Vec<u64> = f.iter().map(|f| f[0].parse().unwrap()).collect();
    assert_eq!(
        (serials[0], serials[1], serials[2]),
        (serials[0], serials[0], serials[0]),
        "{got:#?}"
    );
    assert!(
        serials[0] < serials[3] && serials[3] < serials[4] && serials[4] < serials[5],
        "{got:#?}"
    );
    // A connection opened for the try (the first request; the streamed upload,
    // which never takes a pooled one) took some time; one reused took none.
    let connect: Vec<&str> = f.iter().map(|f| f[13]).collect();
    assert_eq!(connect[4], "-", "{got:#?}");
    for i in [0, 1] {
        assert!(connect[i].parse::<f64>().unwrap() > 0.0, "{got:#?}");
    }
    for i in [2, 3, 5] {
        assert_eq!(connect[i], "0.000000", "{got:#?}");
    }
    // The backend's head, then the end of its body, then the request's end.
    for (l, f) in got.iter().zip(&f) {
        if f[6] == "-" {
            assert_eq!((f[8], f[9]), ("-", "-"), "{l}");
            continue;
        }
        let t: Vec<f64> = f[8..11].iter().map(|v| v.parse().unwrap()).collect();
        assert!(t[0] <= t[1] && t[1] <= t[2], "{l}");
    }
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

/// A WebSocket is logged when its tunnel closes, as nginx logs it: status 101, the
/// bytes the backend sent through it, the whole time, and how it closed (the client
/// left, or it idled past `tunnel_idle_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_logged_when_its_tunnel_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = TestOrigin::start("a", Behavior::Healthy).await;
    let dir = temp_dir("tunnel");
    let log = dir.join("access.log");
    let toml = with_server_setting(
        &pool_config(
            &[origin.addr],
            "health_check = { type = \"none\" }\ntunnel_idle_timeout = \"300ms\"",
        ),
        &format!("access_log = \"{}\"", log.display()),
    );
    let (srv, addr) = start_proxy(&toml);
    let mut ws = tokio::net::TcpStream::connect(addr).await.unwrap();
    upgrade_to_websocket(&mut ws).await;
    let mut echoed = 0;
    for msg in [&b"ping-1"[..], b"second message"] {
        ws.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        ws.read_exact(&mut got).await.unwrap();
        echoed += got.len();
    }
    assert!(lines(&log).is_empty(), "no line while the tunnel is open");
    drop(ws);
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    upgrade_to_websocket(&mut idle).await;
    assert!(closed_within(&mut idle, Duration::from_secs(10)).await);
    let got = wait_for_lines(&log, 2).await;
    stop_proxy(srv).await;
    assert_eq!(got.len(), 2, "{got:#?}");
    let f: Vec<Vec<&str>> = got.iter().map(|l| fields(l)).collect();
    for f in &f {
        assert_eq!([f[3], f[5], f[9]], ["/ws", "101", "app"], "{f:?}");
    }
    let closed = f.iter().find(|f| f[12] == "-").expect("the closed tunnel's line");
    assert_eq!(closed[6], echoed.to_string(), "the echoes' bytes");
    let idled = f
        .iter()
        .find(|f| f[12] == "tunnel_idle_timeout")
        .expect("the idle tunnel's line");
    assert!(
        idled[7].parse::<f64>().unwrap() >= 0.3,
        "the whole tunnel's time: {}",
        idled[7]
    );
}

/// `access_log_filter` (HAProxy's `dontlog-normal`): only errors (here 400 and
/// up), slow requests, retried ones and cut ones get a line; a quick 200 does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_log_keeps_only_the_requests_worth_a_look() {
    let good = TestOrigin::start("good", Behavior::Healthy).await;
    let slow = TestOrigin::start("slow", Behavior::Slow(Duration::from_millis(400))).await;
    let failing = TestOrigin::start("failing", Behavior::Status(500)).await;
    let refused = refused_addr().await;
    let dir = TempDir::new("accesslog-filter");
    let log = dir.path().join("access.log");
    let toml = format!(
        r#"
[server]
workers = 1
access_log = "{}"
access_log_filter = {{ min_status = 400, slower_than = "300ms" }}

[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
pool = "good"

[[routes]]
path_prefix = "/slow"
pool = "slow"

[[routes]]
path_prefix = "/failing"
pool = "failing"

[[routes]]
path_prefix = "/retried"
pool = "retried"

[pools.good]
backends = ["{}"]
health_check = {{ type = "none" }}

[pools.slow]
backends = ["{}"]
health_check = {{ type = "none" }}
retry = {{ hedge = false }}

[pools.failing]
backends = ["{}"]
health_check = {{ type = "none" }}

[pools.retried]
backends = ["{refused}", "{}"]
balancer = "round_robin"
health_check = {{ type = "none" }}
"#,
        log.display(),
        good.addr,
        slow.addr,
        failing.addr,
        good.addr
    );
    let (srv, addr) = start_proxy(&toml);
    for path in ["/quick", "/slow", "/failing", "/retried/1", "/retried/2", "/quick"] {
        get(addr, path).await;
    }
    stop_proxy(srv).await;
    let got = lines(&log);
    let kept: Vec<(&str, &str, &str)> = got.iter().map(|l| fields(l)).map(|f| (f[3], f[5], f[11])).collect();
    assert_eq!(kept[..2], [("/slow", "200", "1"), ("/failing", "500", "1")], "{got:#?}");
    // Round robin starts at either backend, so one or both /retried requests tried
    // the refused backend first: those, and only those, have a line.
    let retried = &kept[2..];
    assert!(
        !retried.is_empty()
            && retried
                .iter()
                .all(|(path, status, tries)| path.starts_with("/retried/") && (*status, *tries) == ("200", "2")),
        "{got:#?}"
    );
}

/// `access_log = false` on a route: none of its requests get a line, answered,
/// refused (403) or abandoned by the client mid-request; other routes' do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_with_access_log_false_writes_no_lines() {
    use tokio::io::AsyncWriteExt;
    let good = TestOrigin::start("good", Behavior::Healthy).await;
    let frozen = TestOrigin::start("frozen", Behavior::Freeze).await;
    let dir = temp_dir("quiet-route");
    let log = dir.join("access.log");
    let routes = "[[routes]]\npool = \"app\"\n\n\
                  [[routes]]\npath_prefix = \"/healthz\"\npool = \"app\"\naccess_log = false\n\n\
                  [[routes]]\npath_prefix = \"/private/\"\npool = \"app\"\nallow = [\"192.0.2.0/24\"]\naccess_log = false\n\n\
                  [[routes]]\npath_prefix = \"/frozen\"\npool = \"frozen\"\naccess_log = false\n\n";
    let toml = config(&[good.addr], &log).replacen("[[routes]]\npool = \"app\"\n", routes, 1)
        + &format!(
            "\n[pools.frozen]\nbackends = [\"{}\"]\nhealth_check = {{ type = \"none\" }}\n",
            frozen.addr
        );
    let (srv, addr) = start_proxy(&toml);
    assert_eq!(get(addr, "/a").await.status, 200);
    for _ in 0..3 {
        assert_eq!(get(addr, "/healthz").await.status, 200);
    }
    assert_eq!(get(addr, "/private/x").await.status, 403);
    // A client that gives up on a request to the frozen backend.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /frozen HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while frozen.hits() == 0 {
        assert!(Instant::now() < deadline, "the request never reached the backend");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(s);
    assert_eq!(get(addr, "/b").await.status, 200);
    stop_proxy(srv).await;
    let got = lines(&log);
    let targets: Vec<&str> = got.iter().map(|l| fields(l)[3]).collect();
    assert_eq!(targets, ["/a", "/b"], "{got:?}");
}
