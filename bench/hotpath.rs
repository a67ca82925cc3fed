//! Microbenchmarks of the hot-path pieces: balancer pick, route match, header rewrite,
//! the client-side HTTP/1.1 path (`h1`: request head in, response head out) and the
//! backend-side codec (request head out, response head in, chunks).
//! Run: `cargo bench --bench hotpath`. Use them to keep regressions out of the data
//! path; whole-proxy figures come from `bench/run.py`.

use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Version};
use rampart::balancer::Balancer;
use rampart::config::{BalancerKind, HostMatch, RouteConfig};
use rampart::proxy::{rewrite_request_headers, ConnInfo, RequestIds};
use rampart::router::Router;
use rampart::state::{Backend, BackendState};

fn backends(n: usize) -> Vec<Backend> {
    (0..n)
        .map(|i| {
            let addr: SocketAddr = format!("10.0.0.{}:80", i + 1).parse().unwrap();
            Backend {
                name: addr.to_string(),
                written: addr.to_string(),
                addr,
                weight: 1,
                config_weight: 1,
                backup: false,
                max_in_flight: u32::MAX,
                tls_name: None,
                state: Arc::new(BackendState::new()),
                sticky_id: 0,
            }
        })
        .collect()
}

fn balancers(c: &mut Criterion) {
    let live = backends(3);
    let ok = |_: usize| true;
    for kind in [
        BalancerKind::RoundRobin,
        BalancerKind::LeastRequest,
        BalancerKind::PeakEwma,
        BalancerKind::ConsistentHash,
        BalancerKind::Random,
    ] {
        let b = Balancer::new(kind, &live);
        c.bench_function(&format!("pick/{}", b.kind()), |bench| {
            bench.iter(|| b.pick(black_box(&live), Some(0x1234_5678), rampart::state::clock_ns(), &ok))
        });
    }
}

fn routes(c: &mut Criterion) {
    let mut table = Vec::new();
    for i in 0..20 {
        table.push(RouteConfig {
            host: Some(HostMatch::Exact(format!("svc{i}.example.com"))),
            path_prefix: format!("/api/v{i}"),
            ..RouteConfig::default()
        });
    }
    table.push(RouteConfig {
        host: Some(HostMatch::Suffix(".example.com".into())),
        path_prefix: "/".into(),
        ..RouteConfig::default()
    });
    table.push(RouteConfig {
        host: None,
        path_prefix: "/".into(),
        ..RouteConfig::default()
    });
    let r = Router::new(&table);
    c.bench_function("route/exact-host-prefix", |b| {
        b.iter(|| {
            r.find(black_box(Some("svc7.example.com")), black_box("/api/v7/users"), &|_| {
                true
            })
        })
    });
    c.bench_function("route/catch-all", |b| {
        b.iter(|| r.find(black_box(Some("other.org")), black_box("/x"), &|_| true))
    });
}

fn headers(c: &mut Criterion) {
    let conn = ConnInfo::new("192.0.2.10:50000".parse().unwrap(), false);
    let ids = RequestIds::new();
    let mut base = HeaderMap::new();
    base.insert("host", HeaderValue::from_static("shop.example.com"));
    base.insert("user-agent", HeaderValue::from_static("wrk"));
    base.insert("accept", HeaderValue::from_static("*/*"));
    c.bench_function("headers/rewrite-request", |b| {
        b.iter(|| {
            let mut h = base.clone();
            let id = ids.next();
            let added = rewrite_request_headers(
                &mut h,
                &conn,
                Version::HTTP_11,
                Some(HeaderValue::from_static("shop.example.com")),
                &id,
                false,
            );
            (h, added)
        })
    });
    c.bench_function("headers/request-id", |b| b.iter(|| ids.next()));
}

fn codec(c: &mut Criterion) {
    use bytes::BytesMut;
    use rampart::codec::{encode_request_head, parse_response, AddedFields, Chunked, ReqFraming, UpHead};
    let mut headers = HeaderMap::new();
    for (k, v) in [("host", "shop.example.com"), ("user-agent", "wrk"), ("accept", "*/*")] {
        headers.insert(k, HeaderValue::from_static(v));
    }
    let mut added = AddedFields::default();
    for (k, v) in [
        ("x-forwarded-for", "192.0.2.10"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "shop.example.com"),
        ("via", "1.1 rampart"),
        ("x-request-id", "0123456789abcdef01234567"),
    ] {
        added.push(k, HeaderValue::from_static(v));
    }
    let head = UpHead {
        method: http::Method::GET,
        uri: "/products/42?ref=home".parse().unwrap(),
        headers,
        raw: None,
        added,
        raw_response: true,
    };
    let mut out = Vec::with_capacity(512);
    c.bench_function("codec/encode-request-head", |b| {
        b.iter(|| {
            encode_request_head(&mut out, &head, ReqFraming::AsIs, "10.0.0.1:8080".parse().unwrap());
            black_box(out.len())
        })
    });
    // What nginx, as the bench's origin, sends for a 13-byte body.
    let response: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 12:00:00 GMT\r\n\
Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\nhello, world\n";
    let mut spans = Vec::new();
    c.bench_function("codec/parse-response-head", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(response);
            black_box(parse_response(&mut buf, false, true, &mut spans).ok())
        })
    });
    let chunked: &[u8] = b"400\r\n";
    let data = vec![b'x'; 1024];
    c.bench_function("codec/decode-chunked-1k", |b| {
        b.iter(|| {
            let mut buf = BytesMut::with_capacity(1100);
            buf.extend_from_slice(chunked);
            buf.extend_from_slice(&data);
            buf.extend_from_slice(b"\r\n0\r\n\r\n");
            let mut state = Chunked::default();
            let mut n = 0;
            while let Ok(rampart::codec::Decoded::Data(d)) = state.decode(&mut buf) {
                n += d.len();
            }
            black_box(n)
        })
    });
}

fn client_side(c: &mut Criterion) {
    // A browser-like request and an nginx-like response.
    let req = b"GET /static/app.js?v=3 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0\r\nAccept: */*\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\nReferer: https://www.example.com/\r\nConnection: keep-alive\r\nCookie: session=abcdef0123456789\r\n\r\n";
    let mut scratch = Vec::new();
    c.bench_function("h1/parse-request-head", |b| {
        b.iter(|| rampart::h1::parse_for_bench(black_box(req), &mut scratch))
    });
    let mut resp = http::Response::new(rampart::body::RespBody::from(bytes::Bytes::from_static(
        b"hello, world!",
    )));
    for (k, v) in [
        ("server", "nginx/1.22.1"),
        ("date", "Mon, 23 Nov 2026 16:00:00 GMT"),
        ("content-type", "application/javascript"),
        ("last-modified", "Mon, 23 Nov 2026 12:00:00 GMT"),
        ("etag", "\"6741c0a0-d\""),
        ("accept-ranges", "bytes"),
        ("x-request-id", "0123456789abcdef01234567"),
    ] {
        resp.headers_mut().insert(k, HeaderValue::from_static(v));
    }
    let mut out = Vec::with_capacity(512);
    c.bench_function("h1/encode-response-head", |b| {
        b.iter(|| {
            out.clear();
            rampart::h1::encode_head_for_bench(&mut out, black_box(&resp));
        })
    });
}

/// A route's `rate_limit` check: 1,000 clients, each well under its limit (the
/// common case: a compare-and-swap on its slot).
fn rate_limit(c: &mut Criterion) {
    let limiter = rampart::ratelimit::RateLimiter::new(rampart::config::RateLimitConfig {
        requests_per_second: 1_000_000.0,
        burst: 1_000,
        key: rampart::config::HashKey::ClientIp,
    });
    let keys: Vec<u64> = (0..1000u32)
        .map(|i| rampart::balancer::hash64(&i.to_le_bytes()))
        .collect();
    let mut i = 0usize;
    let mut now = 1_000_000u64;
    c.bench_function("ratelimit/check", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            now += 1;
            black_box(limiter.check(black_box(keys[i]), now))
        })
    });
}

criterion_group!(hot, balancers, routes, headers, codec, client_side, rate_limit);
criterion_main!(hot);
