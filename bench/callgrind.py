#!/usr/bin/env python3
"""Instructions per proxied request under callgrind: the repeatable measure.

Usage:  python3 bench/callgrind.py [BINARY ...] [--nginx] [--haproxy] [--cache] [--keep DIR] [--browser] [--h2] [--rate N] [--layout] [--access-log] [--gzip | --zstd | --br]
e.g.    python3 bench/callgrind.py target/release/rampart /tmp/old/rampart --nginx

Wall-clock CPU per request on a shared 2-CPU machine swings by 2x between 5 s samples;
the number of instructions a proxy executes per request barely moves between runs, so
this is how a hot-path change is judged before the wall-clock bench (bench/run.py).

Each BINARY (default: target/release/rampart) runs under `valgrind --tool=callgrind`
with bench/peers/rampart.toml, in front of the bench's three nginx origins; with
--nginx, the bench's nginx proxy (one worker, master process off) runs the same way,
and with --haproxy the bench's HAProxy (one thread, in the foreground).
wrk -t1 -c16 warms it for 4 s, the counters are zeroed, wrk runs 8 s more, and the
counters are dumped. The result is the program's instructions (and, with --cache, its
simulated I1/D1 misses) divided by the requests wrk completed in those 8 s. Valgrind
slows the proxy about 50-fold, so the proxy is the bottleneck and wrk's 16 connections
keep it busy: this is the cost per request under load, batching included.

--keep DIR keeps the callgrind output files for `callgrind_annotate`. --browser sends
the fields a browser sends with a page request (wrk alone sends only Host). --h2 loads
with h2load -c16 -m8 (HTTP/2 over cleartext, prior knowledge) instead of wrk: the
requests hyper serves. --rate N loads with oha at N requests a second over 8
connections instead: a rate low enough for the slowed proxy to go idle between
requests, so each one pays its own wakeup (epoll, the runtime's park and timers), as
in bench/run.py's fixed-rate CPU row, where the saturated default batches them. Keep
N at 40 or more: a connection idle for 250 ms parks (src/dormant.rs), which the
fixed-rate row, at 8,000 req/s over 64 connections, never does.

--access-log profiles each proxy a second time with its access log written to a file
(rampart's buffered writer, nginx's `buffer=64k flush=1s`, HAProxy's `option httplog`
to stdout): the difference is the log's cost in user-space instructions (the kernel's
part, the write calls, is outside callgrind's count).

--gzip requests a 16 KiB HTML page (bench/run.py's `page_html`) with `Accept-Encoding:
gzip` from proxies that compress it: rampart with `compress = true` (level 1, zlib-rs),
nginx with `gzip on` (`gzip_comp_level 1`, the system's zlib) and HAProxy with
`compression algo gzip` (Debian's is built with libslz, a stateless compressor that
trades ratio for speed and has no levels). Instructions per request are then mostly
the compressor's, so each row also gives the compressed size of one response.
--zstd and --br do the same with `Accept-Encoding: zstd` (or `br`) and rampart's
`compress = { encodings = ["zstd"] }` (level 1; or `["br"]`, quality 1); rampart alone,
as neither peer has zstd or brotli.

--layout adds, for each rampart binary, the machine code of the request path's largest
futures (LAYOUT) and how much of it sits on source lines the load never ran (from the
binary's line table, `objdump -d -l`, against the lines the profile counted). Each of
them is about as large as the 32 KiB L1 instruction cache. Moving the never-run code
out alone did not lower the I1 misses per request (bench/README.md, "Code layout"): the misses
follow the code a request runs, which the profile-guided build (bench/pgo.py) inlines
and orders with data.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: tools, configs and load helpers)

PORT = {"rampart": 18080, "nginx": 18081, "haproxy": 18082}
WARM, MEASURE = 4, 8
# What a desktop browser sends for a page, less cookies: eight fields besides Host.
BROWSER = [
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Accept-Language: en-US,en;q=0.5",
    "Accept-Encoding: gzip, deflate, br, zstd",
    "Upgrade-Insecure-Requests: 1",
    "Sec-Fetch-Dest: document",
    "Sec-Fetch-Mode: navigate",
    "Sec-Fetch-Site: none",
]
HEADERS = []
# With --h2: h2load instead of wrk, on each proxy's h2c port (nginx has its own).
H2 = []
H2_PORT = {18081: 18091, 18082: 18092}
# With --rate: oha at this many requests a second instead of wrk.
RATE = []
# The coding asked for with --gzip, --zstd or --br.
CODING = ["gzip"]
# The target requested (--gzip: the HTML page).
TARGET = ["/"]


def wrk_requests(port, seconds):
    if H2:
        return h2_requests(H2_PORT.get(port, port), seconds)
    if RATE:
        return rate_requests(port, seconds, RATE[0])
    flags = [f for h in HEADERS for f in ("-H", h)]
    out = bench.sh(["wrk", "-t1", "-c16", f"-d{seconds}s", *flags, f"http://127.0.0.1:{port}{TARGET[0]}"]).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"error responses from port {port}: {out}")
    return int(re.search(r"(\d+) requests in", out).group(1))


def totals(outfile: Path):
    """Event totals from a callgrind output file: {"Ir": n, ...}."""
    events = summary = None
    for line in outfile.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("summary:") or line.startswith("totals:"):
            summary = [int(x) for x in line.split()[1:]]
    return dict(zip(events, summary))


def profile(name, cmd, port, out: Path, cache: bool):
    vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    if cache:
        vg.append("--cache-sim=yes")
    log = open(out.with_suffix(".log"), "w")
    p = subprocess.Popen(vg + cmd, stdout=log, stderr=log)
    try:
        bench.wait_port(port, timeout=60)
        wrk_requests(port, WARM)
        size = response_size(port)
        subprocess.run(["callgrind_control", "-z", str(p.pid)], check=True, capture_output=True)
        n = wrk_requests(port, MEASURE)
        subprocess.run(["callgrind_control", "-d", str(p.pid)], check=True, capture_output=True)
        time.sleep(1)
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    # The dump after zeroing is the file with the highest part number.
    parts = sorted(out.parent.glob(out.name + ".*"), key=lambda f: int(f.suffix[1:]) if f.suffix[1:].isdigit() else -1)
    dump = next((f for f in reversed(parts) if f.suffix[1:].isdigit()), None)
    if dump is None:
        raise RuntimeError(f"no callgrind dump for {name}: see {out.with_suffix('.log')}")
    t = totals(dump)
    row = {"requests": n, "Ir": t["Ir"] / n}
    if TARGET[0] != "/":
        row["body bytes"] = size
    if cache:
        row["I1 misses"] = t.get("I1mr", 0) / n
        row["D1 misses"] = (t.get("D1mr", 0) + t.get("D1mw", 0)) / n
    return row, dump


def with_access_log(target, run: Path):
    """`target` (name, command, port) with its access log on, each proxy's usual way
    of writing one to a file: rampart's `access_log = "path"` (buffered, 64 KiB or one
    second), nginx's `combined` format with `buffer=64k flush=1s`, and HAProxy's
    `option httplog` to stdout (a write per line; its usual target, syslog, is one
    datagram per line), which `profile` sends to the run's .log file."""
    name, cmd, port = target
    if name.startswith("rampart "):
        conf = bench.config_for(cmd[0], bench.replaced_once(
            (bench.PEERS / "rampart.toml").read_text(),
            "[server]\n", f'[server]\naccess_log = "{run}/rampart-access.log"\n'), run / "rampart-access-log.toml")
        cmd = [cmd[0], "--config", str(conf), *cmd[3:]]
    elif name == "nginx":
        conf = run / "nginx-access-log.conf"
        conf.write_text(bench.replaced_once(Path(cmd[2]).read_text(),
                                            "access_log off;", f"access_log {run}/nginx-access.log combined buffer=64k flush=1s;"))
        cmd = [cmd[0], "-c", str(conf), *cmd[3:]]
    else:
        conf = run / "haproxy-access-log.cfg"
        text = bench.replaced_once(Path(cmd[3]).read_text(), "global\n", "global\n    log stdout format raw local0\n")
        conf.write_text(bench.replaced_once(text, "defaults\n", "defaults\n    log global\n    option httplog\n"))
        cmd = [*cmd[:3], str(conf)]
    return f"{name} + access log", cmd, port


def response_size(port):
    """The body size of one response to the bench's request, as sent (compressed)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{TARGET[0]}",
                                 headers=dict(h.split(": ", 1) for h in HEADERS))
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
        if TARGET[0] != "/" and r.headers.get("Content-Encoding") != CODING[0]:
            raise RuntimeError(f"port {port} did not compress {TARGET[0]}: {dict(r.headers)}")
        return len(body)


def with_gzip(target, run: Path):
    """`target` (name, command, port) compressing the page: rampart's `compress = true`
    (with --zstd, `encodings = ["zstd"]`), nginx's `gzip on` at level 1 (its default)
    with `Vary`, HAProxy's `compression`."""
    name, cmd, port = target
    if name.startswith("rampart "):
        setting = "compress = true" if CODING[0] == "gzip" else f'compress = {{ encodings = ["{CODING[0]}"] }}'
        conf = bench.config_for(cmd[0], bench.replaced_once((bench.PEERS / "rampart.toml").read_text(),
                                                            "[server]\n", f"[server]\n{setting}\n"),
                                run / f"rampart-{CODING[0]}.toml")
        cmd = [cmd[0], "--config", str(conf), *cmd[3:]]
    elif name == "nginx":
        conf = run / "nginx-gzip.conf"
        conf.write_text(bench.replaced_once(Path(cmd[2]).read_text(), "access_log off;",
                                            "access_log off;\n    gzip on;\n    gzip_comp_level 1;\n"
                                            "    gzip_min_length 256;\n    gzip_vary on;"))
        cmd = [cmd[0], "-c", str(conf), *cmd[3:]]
    else:
        conf = run / "haproxy-gzip.cfg"
        conf.write_text(bench.replaced_once(Path(cmd[3]).read_text(), "\nbackend origins\n",
                                            "\n    compression algo gzip\n    compression type text/html\n"
                                            "backend origins\n"))
        cmd = [*cmd[:3], str(conf)]
    return f"{name} + {CODING[0]}", cmd, port


# The request path's futures whose code --layout reports (as callgrind and `nm -C` name them).
LAYOUT = ("rampart::forward::try_backend::{{closure}}", "rampart::proxy::handle::{{closure}}",
          "rampart::forward::forward::{{closure}}", "rampart::listener::serve_h1::{{closure}}")


def _short(path):
    """A source path without the registry or toolchain prefix, as both tools agree on it."""
    return re.sub(r".*/(registry/src/[^/]+/|rustc/[^/]+/library/)", "", path)


def executed_lines(dump: Path, function):
    """The (file, line) pairs of `function`'s code (inlined code included) that ran."""
    names, files, ran = {}, {}, set()
    fn = file = fn_file = None
    skip = False

    def name(v, table):
        m = re.match(r"\((\d+)\)(?:\s+(.*))?", v)
        if not m:
            return v
        if m.group(2):
            table[m.group(1)] = m.group(2)
        return table.get(m.group(1), m.group(1))

    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("fl="):
            fn_file = file = name(line[3:], files)
        elif line.startswith(("fi=", "fe=")):
            file = name(line[3:], files)
        elif line.startswith("fn="):
            fn, file = name(line[3:], names), fn_file
        elif line.startswith("cfn="):
            name(line[4:], names)
        elif line.startswith(("cfi=", "cfl=")):
            name(line[4:], files)
        elif line.startswith("calls="):
            skip = True  # the next cost line is the call's, not this function's own
        elif line[:1].isdigit():
            if not skip and fn == function:
                ran.add((_short(file or "?"), int(line.split()[0])))
            skip = False
    return ran


def code_by_line(binary, function):
    """(size of `function`'s largest symbol, {(file, line): bytes of its code})."""
    symbols = subprocess.run(["nm", "-S", "-C", binary], capture_output=True, text=True).stdout
    found = []
    for line in symbols.splitlines():
        fields = line.split(maxsplit=3)  # address, size, type, name (a sized symbol)
        if len(fields) == 4 and fields[3] == function:
            found.append((int(fields[0], 16), int(fields[1], 16)))
    best = max(found, key=lambda x: x[1], default=None)
    if best is None:
        return 0, {}
    start, size = best
    asm = subprocess.run(["objdump", "-d", "-l", "--no-show-raw-insn", f"--start-address={start}",
                          f"--stop-address={start + size}", binary], capture_output=True, text=True).stdout
    at, insns = ("?", 0), []
    for line in asm.splitlines():
        m = re.match(r"^(/\S+):(\d+)", line)
        if m:
            at = (_short(m.group(1)), int(m.group(2)))
            continue
        m = re.match(r"^\s+([0-9a-f]+):\s", line)
        if m:
            insns.append((int(m.group(1), 16), at))
    by_line = {}
    for (a, where), (b, _) in zip(insns, insns[1:] + [(start + size, None)]):
        by_line[where] = by_line.get(where, 0) + b - a
    return size, by_line


def layout(binary, dump: Path):
    """--layout's lines for one profiled binary."""
    for function in LAYOUT:
        size, by_line = code_by_line(binary, function)
        if not size:
            print(f"  {function}: not in the symbol table")
            continue
        ran = executed_lines(dump, function)
        cold = sum(n for where, n in by_line.items() if where not in ran)
        print(f"  {function}: {size:,} bytes of code, {cold:,} ({cold / size:.0%}) on lines this load never ran")


def h2_requests(port, seconds):
    out = bench.sh(["h2load", "-c16", "-m8", "-D", str(seconds), f"http://127.0.0.1:{port}/"]).stdout
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
    if m is None or int(m.group(2)):
        raise RuntimeError(f"h2load failed on port {port}: {out}")
    return int(m.group(1))


def rate_requests(port, seconds, rate):
    out = bench.sh(["oha", "--no-tui", "-z", f"{seconds}s", "-q", str(rate), "-c", "8",
                    *[f for h in HEADERS for f in ("-H", h)], f"http://127.0.0.1:{port}/"]).stdout
    codes = dict(re.findall(r"\[(\d{3})\]\s+(\d+) responses", out))
    if set(codes) != {"200"}:
        raise RuntimeError(f"oha on port {port}: {out}")
    return int(codes["200"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binaries", nargs="*", default=[str(bench.ROOT / "target/release/rampart")])
    ap.add_argument("--nginx", action="store_true", help="also profile the bench's nginx proxy")
    ap.add_argument("--haproxy", action="store_true", help="also profile the bench's HAProxy")
    ap.add_argument("--cache", action="store_true", help="simulate I1/D1 caches (slower)")
    ap.add_argument("--keep", help="directory for the callgrind output files")
    ap.add_argument("--browser", action="store_true", help="send a browser's request fields")
    ap.add_argument("--h2", action="store_true", help="h2load (h2c) instead of wrk")
    ap.add_argument("--rate", type=int, help="oha at this many requests a second instead of wrk")
    ap.add_argument("--layout", action="store_true",
                    help="also report the request path's largest futures' code size and its share never run")
    ap.add_argument("--access-log", action="store_true",
                    help="profile each proxy a second time with its access log on")
    ap.add_argument("--gzip", action="store_true",
                    help="a 16 KiB HTML page, compressed by each proxy (gzip, level 1)")
    ap.add_argument("--zstd", action="store_true",
                    help="--gzip's page compressed with zstd (rampart alone: level 1)")
    ap.add_argument("--br", action="store_true",
                    help="--gzip's page compressed with brotli (rampart alone: quality 1)")
    args = ap.parse_args()
    if (args.zstd or args.br) and (args.nginx or args.haproxy):
        ap.error("--zstd, --br: neither nginx nor HAProxy (as Debian builds them) has zstd or brotli")
    if args.zstd or args.br:
        CODING[0] = "zstd" if args.zstd else "br"
        args.gzip = True
    if args.gzip:
        TARGET[0] = "/page.html"
        HEADERS.append(f"Accept-Encoding: {CODING[0]}")
    if args.rate:
        RATE.append(args.rate)
    if args.browser:
        HEADERS.extend(BROWSER)
    if args.h2:
        H2.append(True)
    bench.ensure_tools()
    if shutil.which("valgrind") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "valgrind"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    bench.require_free((19001, 19002, 19003, *PORT.values()))
    run = Path(tempfile.mkdtemp(prefix="rampart-cg-"))
    os.chmod(run, 0o755)  # nginx workers run as nobody
    keep = Path(args.keep) if args.keep else run
    keep.mkdir(parents=True, exist_ok=True)
    origins = bench.start_origins(run)
    rows = []
    try:
        for port in (19001, 19002, 19003):
            bench.wait_port(port)
        targets = [(f"rampart {b}", [b, "--config", str(bench.config_for(
                        b, (bench.PEERS / "rampart.toml").read_text(), run / f"rampart-{i}.toml")), "--log-level", "warn"],
                    PORT["rampart"]) for i, b in enumerate(args.binaries)]
        if args.nginx:
            conf = bench.render(bench.PEERS / "nginx.conf", run)
            targets.append(("nginx", ["nginx", "-c", str(conf), "-g", "daemon off; master_process off;"],
                            PORT["nginx"]))
        if args.haproxy:
            conf = bench.render(bench.PEERS / "haproxy.cfg", run)
            targets.append(("haproxy", ["haproxy", "-db", "-f", str(conf)], PORT["haproxy"]))
        if args.access_log:
            targets += [with_access_log(t, run) for t in targets]
        if args.gzip:
            targets = [with_gzip(t, run) for t in targets]
        for i, (name, cmd, port) in enumerate(targets):
            row, dump = profile(name, cmd, port, keep / f"callgrind-{i}.out", args.cache)
            rows.append((name, row, dump))
            print(f"{name}: " + ", ".join(f"{k} {v:,.0f}" for k, v in row.items()) + f"  ({dump})", flush=True)
            if args.layout and name.startswith("rampart "):
                layout(cmd[0], dump)
    finally:
        origins.send_signal(signal.SIGTERM)
        origins.wait(timeout=10)
    print()
    base = rows[0][1]["Ir"]
    sized = "body bytes" in rows[0][1]
    print(f"{'':50} {'instr/req':>10} {'vs first':>9}" + (f" {'body bytes':>11}" if sized else ""))
    for name, row, _ in rows:
        print(f"{name[-50:]:50} {row['Ir']:>10,.0f} {row['Ir'] / base:>8.3f}x"
              + (f" {row['body bytes']:>11,}" if sized else ""))


if __name__ == "__main__":
    main()
