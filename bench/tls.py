#!/usr/bin/env python3
"""TLS side by side, rampart vs nginx vs HAProxy, one worker each: terminating TLS, and TLS to backends.

Usage:  python3 bench/tls.py [--rounds 3] [--duration 5] [--idle 3000] [--results bench/RESULTS-tls.md]

The same origins and settings as bench/run.py (bench/peers/*-tls*: the plain configs
with TLS listeners), one ECDSA P-256 certificate made with openssl for the run. Each
round, for each proxy in rotating order:

  h1          wrk -t1 -c64 over TLS (keep-alive; wrk offers no ALPN): req/s, and the
              proxy's CPU per request (/proc utime+stime)
  h2          h2load -c16 -m8 over TLS (ALPN h2): req/s and CPU per request
  handshakes  wrk -t1 -c16 with `Connection: close`: a TLS handshake per request
              (wrk resumes its session, so these are TLS 1.3 resumptions with a new
              X25519 exchange): connections/s and CPU per connection
  upstream    the other direction, TLS to backends: wrk -t1 -c64 in plain HTTP/1.1
              to each proxy, which speaks HTTPS (keep-alive, unverified, the peers'
              default) to the same origins listening with TLS on 19101-19103
              (bench/peers/origin-nginx-tls.conf): req/s and CPU per request
then, once, the idle memory of --idle TLS keep-alive connections (one request each):
RSS growth from a third of them to all, per connection, after IDLE_SETTLE s.

Prints medians and the ratios against the better of nginx and HAProxy. The cipher
suite is the client's choice (OpenSSL's, TLS_AES_256_GCM_SHA384) for all three.
Load goes to 127.0.0.1 only; every loop is bounded in time.
"""
import argparse
import asyncio
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: tools, origins and helpers)

PROXIES = {"rampart": (18180, 18180), "nginx": (18181, 18191), "haproxy": (18182, 18192)}
# Plain listeners whose requests go to the HTTPS origins (rampart's by its route's host).
UPSTREAM = {"rampart": 18183, "nginx": 18184, "haproxy": 18185}
UPSTREAM_HOST = "upstream-tls.test"
TLS_ORIGINS = (19101, 19102, 19103)
IDLE_SETTLE = 5.0


def certificate(run: Path):
    if shutil.which("openssl") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "openssl"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    bench.sh(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
              "-keyout", str(run / "bench.key"), "-out", str(run / "bench.crt"), "-days", "2",
              "-subj", "/CN=bench.test", "-addext", "subjectAltName=DNS:bench.test"])
    (run / "bench.pem").write_text((run / "bench.crt").read_text() + (run / "bench.key").read_text())


def start(run: Path, rampart: Path):
    procs = {"origin": bench.start_origins(run)}
    procs["origin-tls"] = subprocess.Popen(
        ["nginx", "-g", "daemon off;", "-c", str(bench.render(bench.PEERS / "origin-nginx-tls.conf", run))])
    procs["rampart"] = subprocess.Popen(
        [str(rampart), "--config", str(bench.render(bench.PEERS / "rampart-tls.toml", run)), "--log-level", "warn"])
    procs["nginx"] = subprocess.Popen(
        ["nginx", "-g", "daemon off;", "-c", str(bench.render(bench.PEERS / "nginx-tls.conf", run))])
    procs["haproxy"] = subprocess.Popen(
        ["haproxy", "-db", "-f", str(bench.render(bench.PEERS / "haproxy-tls.cfg", run))])
    for port in ALL_PORTS:
        bench.wait_port(port)
    time.sleep(0.5)
    return procs


ALL_PORTS = (19001, 19002, 19003, *TLS_ORIGINS, *UPSTREAM.values(), *(p for pair in PROXIES.values() for p in pair))


def pids(procs, name):
    pid = procs[name].pid
    return (bench.children(pid) or [pid]) if name == "nginx" else [pid]


def cpu_us(ps, before, requests):
    hz = os.sysconf("SC_CLK_TCK")
    return sum(a - b for a, b in zip(bench.cpu_ticks(ps), before)) / hz * 1e6 / max(requests, 1)


def wrk(port, duration, close, scheme="https"):
    cmd = ["wrk", "-t1", "-c16" if close else "-c64", f"-d{duration}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    if scheme == "http":
        cmd += ["-H", f"Host: {UPSTREAM_HOST}"]
    return wrk_run([*cmd, f"{scheme}://127.0.0.1:{port}/"], f"port {port}")


def wrk_run(cmd, what):
    """Runs wrk: (requests, req/s), or an error naming `what` if any answer was not 2xx/3xx."""
    out = bench.sh(cmd).stdout
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        raise RuntimeError(f"{bad.group(1)} non-2xx responses from {what}")
    return int(re.search(r"(\d+) requests in", out).group(1)), float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def h2load(port, duration):
    out = bench.sh(["h2load", "-c16", "-m8", "-t1", f"-D{duration}", f"https://127.0.0.1:{port}/"]).stdout
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
    if int(m.group(2)):
        raise RuntimeError(f"{m.group(2)} failed h2 requests on port {port}")
    return int(m.group(1)), float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))


def measure(procs, name, kind, duration):
    h1, h2 = PROXIES[name]
    ps = pids(procs, name)
    before = bench.cpu_ticks(ps)
    if kind == "h2":
        n, rate = h2load(h2, duration)
    elif kind == "upstream":
        n, rate = wrk(UPSTREAM[name], duration, False, "http")
    else:
        n, rate = wrk(h1, duration, kind == "handshakes")
    return rate, cpu_us(ps, before, n)


async def _open(port, n, conns, ctx):
    req = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="bench.test")
        w.write(req)
        await r.read(200)
        conns.append(w)


def idle_memory(procs, name, n):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ps = pids(procs, name)
    loop = asyncio.new_event_loop()
    conns = []
    first = n // 3
    loop.run_until_complete(_open(PROXIES[name][0], first, conns, ctx))
    loop.run_until_complete(asyncio.sleep(IDLE_SETTLE))
    base = bench.rss_kib(ps)
    loop.run_until_complete(_open(PROXIES[name][0], n - first, conns, ctx))
    loop.run_until_complete(asyncio.sleep(IDLE_SETTLE))
    after = bench.rss_kib(ps)
    for w in conns:
        w.close()
    loop.run_until_complete(asyncio.sleep(0.5))
    loop.close()
    return (after - base) * 1024 / (n - first)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--idle", type=int, default=3000)
    ap.add_argument("--results")
    args = ap.parse_args()
    bench.raise_fd_limit()
    bench.ensure_tools()
    bench.require_free(ALL_PORTS)
    rampart = bench.build_rampart()
    run = Path(tempfile.mkdtemp(prefix="rampart-tls-"))
    os.chmod(run, 0o755)  # nginx workers run as nobody
    certificate(run)
    procs = start(run, rampart)
    kinds = KINDS
    samples = {(k, n): [] for k in kinds for n in PROXIES}
    idle = {}
    try:
        for rnd in range(args.rounds):
            for kind in kinds:
                for name in bench.rotated(list(PROXIES), rnd):
                    got = measure(procs, name, kind, args.duration)
                    samples[(kind, name)].append(got)
                    print(f"round {rnd + 1} {kind:10} {name:8} {got[0]:9,.0f}/s {got[1]:7.1f} µs CPU each", flush=True)
        if args.idle:
            for name in PROXIES:
                idle[name] = idle_memory(procs, name, args.idle)
                print(f"idle {name:8} {idle[name]:8,.0f} bytes per TLS connection", flush=True)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(timeout=30)
    lines = table(samples, idle, args)
    print("\n".join(lines))
    if args.results:
        Path(args.results).write_text("\n".join(lines) + "\n")


KINDS = ("h1", "h2", "handshakes", "upstream")


def table(samples, idle, args):
    med = {k: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v)) for k, v in samples.items()}
    cpu, vers = bench.machine()
    out = [
        "# TLS termination and TLS to backends: rampart vs nginx vs HAProxy",
        "",
        f"Generated by `python3 bench/tls.py --rounds {args.rounds} --duration {args.duration} --idle {args.idle}` "
        f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs ({cpu}); "
        f"{vers['nginx']}; {vers['haproxy']}; {vers['wrk']}; h2load; OpenSSL clients.",
        "Medians over the rounds; ratios against the better of nginx and HAProxy (higher is better for "
        "rates, lower for CPU and memory).",
        "",
        "| measurement | rampart | nginx | HAProxy | rampart vs best |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"h1": "HTTP/1.1 keep-alive, req/s", "h2": "HTTP/2, req/s", "handshakes": "a handshake per request, conn/s",
             "upstream": "HTTPS to backends (plain clients, keep-alive), req/s"}
    for kind in KINDS:
        r, n, h = (med[(kind, p)] for p in PROXIES)
        out.append(f"| {names[kind]} | {r[0]:,.0f} | {n[0]:,.0f} | {h[0]:,.0f} | {r[0] / max(n[0], h[0]):.2f}× |")
        out.append(f"| ... CPU µs each | {r[1]:.1f} | {n[1]:.1f} | {h[1]:.1f} | {r[1] / min(n[1], h[1]):.2f}× |")
    if idle:
        r, n, h = (idle[p] for p in PROXIES)
        out.append(f"| idle TLS connection, bytes | {r:,.0f} | {n:,.0f} | {h:,.0f} | {r / min(n, h):.2f}× |")
    return out


if __name__ == "__main__":
    sys.exit(main())
