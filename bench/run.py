#!/usr/bin/env python3
"""Side-by-side benchmark: rampart vs nginx vs HAProxy, one worker each, same origins.

Usage:  python3 bench/run.py [--rounds 3] [--duration 10] [--quick] [--pgo] [--results bench/RESULTS.md]
        python3 bench/run.py --check   (CI: scripts compile, peer configs agree, the report
                                        renders from made-up samples; no peers needed)

Installs what is missing (nginx, haproxy, wrk, nghttp2-client from Debian; oha with
cargo), builds rampart in release mode, starts three nginx origins and the three
proxies with equivalent settings (bench/peers/), then runs, each round, each of these
measurements for every proxy back to back (the proxies' order rotating by round):

  throughput   wrk -t1 -c64 for --duration s, 13-byte body      (median req/s), and
               meanwhile the proxy's share of a CPU, its CPU per request, and how
               often the scheduler switched it out while runnable (preemptions)
  own CPU      the same with the proxy alone on one CPU and wrk and the origins on the
               others (affinity set for that run, then restored): req/s and CPU per
               request without the scheduler's placement in them, and how busy the
               other CPU (wrk and the origins) was meanwhile
  64k          wrk -t1 -c64, 64 KiB body                         (median req/s)
  h2           h2load -c16 -m8 (h2c prior knowledge)             (median req/s)
  fixed rate   oha -q 8000 for --duration s: proxy CPU per request (µs, from
               /proc utime+stime; stime also shown alone) and p99 latency
  idle memory  9,000 idle keep-alive client connections (one request each): proxy RSS
               growth from 3,000 to 9,000 of them / 6,000, IDLE_SETTLE s and IDLE_LONG s
               after the last one opened
  floor        throughput and fixed-rate CPU of HAProxy in TCP mode (no HTTP parsing):
               not a competitor, the floor any proxy hop costs on this machine (also
               alone on one CPU)
  scaling      wrk -c64 on each proxy with one worker and with two (HAProxy: threads;
               bench/peers/*-2w*, *-2t*), back to back: the ratio, per proxy

and writes bench/RESULTS.md with ratios against the better of nginx and HAProxy: of the
medians, and within each round (median and range over the rounds) (--quick only prints
its table).

--pgo first builds the profile-guided rampart (bench/pgo.py, about 7 minutes) and
measures it as a fourth proxy in the same rounds (port 18085), so that the table sets
both builds against the same peers' samples rather than against another run's.
Load goes to 127.0.0.1 only; every loop is bounded in time.
"""
import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"
PROXIES = {
    # name: (port for h1, port for h2c)
    "rampart": (18080, 18080),
    "nginx": (18081, 18091),
    "haproxy": (18082, 18092),
}
# With --pgo: the profile-guided build, measured in the same rounds as the others.
PGO = "rampart-pgo"
PGO_PORT = 18085


def ports(name):
    """(h1 port, h2c port) of a measured proxy."""
    return PROXIES.get(name) or (PGO_PORT, PGO_PORT)


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, text=True, capture_output=True, **kw)


def raise_fd_limit():
    """10,000 idle connections need more descriptors than the usual 1024-20000; as
    root, raise the hard limit too, so every proxy started from here inherits it."""
    want = 200_000
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, PermissionError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def ensure_tools():
    missing = [p for p, b in [("nginx", "nginx"), ("haproxy", "haproxy"), ("wrk", "wrk"), ("nghttp2-client", "h2load")]
               if shutil.which(b) is None]
    if missing:
        print(f"installing {' '.join(missing)} ...", flush=True)
        subprocess.run("apt-get update -qq", shell=True, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if shutil.which("oha") is None and not (Path.home() / ".cargo/bin/oha").exists():
        print("installing oha with cargo (a few minutes) ...", flush=True)
        subprocess.run(["cargo", "install", "oha", "--locked"], check=True)
    os.environ["PATH"] = f"{Path.home() / '.cargo/bin'}:{os.environ['PATH']}"
    # Stop the system nginx/haproxy services if the install started them: they would
    # compete for the CPU.
    for svc in ("nginx", "haproxy"):
        subprocess.run(["systemctl", "stop", svc], capture_output=True)


def build_rampart():
    # RAMPART_BIN: measure another build (an older commit's, say) against the same peers.
    if os.environ.get("RAMPART_BIN"):
        return Path(os.environ["RAMPART_BIN"])
    print("building rampart (release) ...", flush=True)
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    return ROOT / "target" / "release" / "rampart"


def replaced_once(text, old, new):
    """`text` with `old`, which must occur exactly once, replaced by `new`. For configs
    derived from the committed ones, where a setting that silently stayed as it was
    would measure something else without any error."""
    if text.count(old) != 1:
        raise RuntimeError(f"expected {old!r} exactly once in a peer config, found it "
                           f"{text.count(old)} times: update the script that derives it")
    return text.replace(old, new)


def config_for(binary, text: str, out: Path) -> Path:
    """Writes rampart config `text` to `out` for `binary`. A setting that `binary`, an
    older build, does not know (`unknown field`, as when a later commit added one to
    the bench's configs) is left out, with a note, so that A/B runs against older
    commits measure the same setup rather than fail to start."""
    for _ in range(10):
        out.write_text(text)
        r = subprocess.run([str(binary), "check", "--config", str(out)], capture_output=True, text=True)
        unknown = set(re.findall(r"unknown field `(\w+)`", r.stdout + r.stderr))
        if r.returncode == 0 or not unknown:
            break
        for field in sorted(unknown):
            print(f"note: {binary} does not know `{field}`: left out of its config", file=sys.stderr)
            text = re.sub(rf"(?m)^{field}\s*=.*\n", "", text)
    return out


def render(template: Path, run: Path) -> Path:
    out = run / template.name
    out.write_text(template.read_text().replace("{RUN}", str(run)))
    return out


# Origins, then rampart, nginx, HAProxy, rampart with 2 workers, HAProxy in TCP mode,
# nginx with 2 workers, HAProxy with 2 threads.
PORTS = (19001, 19002, 19003, 18080, 18081, 18082, 18083, 18084, 18087, 18088)
# The scaling row: each proxy's one-worker and two-worker (or -thread) instances.
SCALING = {"rampart": (18080, 18083), "nginx": (18081, 18087), "haproxy": (18082, 18088)}
# HAProxy in TCP mode: the floor for a proxy hop (no HTTP parsing), not a competitor.
FLOOR_PORT = 18084

# The scaling row's two-worker configs are copies of the one-worker ones. Besides
# comments, only these lines may differ (worker count, ports, pid and log paths): any
# other difference and the row no longer compares a proxy with itself.
SCALING_CONFIGS = (
    ("rampart.toml", "rampart-2w.toml", r"(workers|bind)\s*="),
    ("nginx.conf", "nginx-2w.conf", r"(worker_processes|pid|error_log|listen)\s"),
    ("haproxy.cfg", "haproxy-2t.cfg", r"(nbthread|pidfile|bind)\s"),
)


def scaling_config_drift(peers: Path = PEERS):
    """How each two-worker peer config differs from its one-worker original beyond
    SCALING_CONFIGS' lines: one message (a unified diff) per pair that drifted."""
    import difflib

    def kept(path, allowed):
        return [line.strip() for line in path.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")
                and not re.match(allowed, line.strip())]

    drifted = []
    for one, two, allowed in SCALING_CONFIGS:
        a, b = kept(peers / one, allowed), kept(peers / two, allowed)
        if a != b:
            diff = "\n".join(difflib.unified_diff(a, b, one, two, lineterm="", n=1))
            drifted.append(f"bench/peers/{two} differs from {one} beyond workers, ports and "
                           f"paths; make the same change in both:\n{diff}")
    return drifted


def self_check():
    """What CI can check without the peers installed: every bench and loadtest script
    compiles, the scaling configs agree (and the agreement check catches a drift), and
    the report renders."""
    failures = []
    for script in sorted([*ROOT.glob("bench/*.py"), *ROOT.glob("loadtest/*.py")]):
        try:
            compile(script.read_text(), str(script), "exec")
        except SyntaxError as e:
            failures.append(f"{script}: {e}")
    failures += scaling_config_drift()
    with tempfile.TemporaryDirectory() as tmp:
        for one, two, _ in SCALING_CONFIGS:
            shutil.copy(PEERS / one, tmp)
            shutil.copy(PEERS / two, tmp)
        # A setting changed in one copy only, as a hand edit would leave it.
        nginx = Path(tmp) / "nginx-2w.conf"
        nginx.write_text(nginx.read_text().replace("keepalive ", "keepalive 1", 1))
        caught = scaling_config_drift(Path(tmp))
        if not any("nginx-2w.conf" in c and "keepalive 164" in c for c in caught):
            failures.append(f"the config drift check missed an edited nginx-2w.conf: {caught}")
    failures += report_check()
    for f in failures:
        print(f, file=sys.stderr)
    print(f"bench self-check: {'FAILED' if failures else 'ok'}")
    return not failures


def report_check():
    """Renders RESULTS.md from made-up samples, so a slip in the report code shows in CI
    rather than after a 20-minute run: a list of failures, empty when it rendered."""
    import contextlib
    import io
    rounds = 3
    failures = []
    for names in (list(PROXIES), [*PROXIES, PGO]):
        results = empty_results(names)
        for key, per_proxy in results.items():
            for i, name in enumerate(names):
                per_proxy[name] += [10.0 + i + r for r in range(rounds)]
        results["scaling"] = {name: 1.0 + i / 10 for i, name in enumerate(SCALING)}
        results["floor"] = {key: 9.0 for key in RESULT_KEYS}
        results["steal"] = [(10.0, 1, "h2c", "nginx"), (100.0, 2, "fixed rate", names[-1])]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "RESULTS.md"
            args = argparse.Namespace(rounds=rounds, duration=1, rate=8000, idle=100, quick=False,
                                      pgo=PGO in names, results=str(out))
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    write_results(results, args, 100.0)
            except Exception as e:  # any slip in the report code is what this is for
                failures.append(f"bench/run.py's report failed on made-up samples ({', '.join(names)}): "
                                f"{type(e).__name__}: {e}")
                continue
            text = out.read_text()
        want = ["| measurement |", "Reading the throughput row", "Scaling:", "Floor,", "Kernel time:",
                "110 ms of CPU time", "was 100 ms (fixed rate"]
        if PGO in names:
            want += ["| rampart PGO |", "the profile-guided build 14.00", "--pgo"]
        missing = [k for k in want if k not in text]
        if missing:
            failures.append(f"bench/run.py's report ({', '.join(names)}) lacks {missing}")
    return failures


def port_open(port):
    import socket
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(port, timeout=10.0):
    import socket
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def require_free(ports):
    """Stops with a clear error if any port is taken. rampart binds with SO_REUSEPORT,
    so a leftover instance would silently take a share of the load, and the figures
    would be wrong without any error."""
    for p in ports:
        if port_open(p):
            raise RuntimeError(f"port {p} is already in use (a leftover proxy or origin?): stop it first")


def page_html() -> bytes:
    """A 16 KiB HTML page that compresses as pages do (bench/callgrind.py --gzip): a
    table whose rows repeat their markup and vary their text and numbers."""
    rows, i = [], 0
    head = "<!doctype html>\n<html><head><title>Orders</title></head><body>\n<table>\n"
    size = len(head)
    while size < 16 * 1024 - 40:
        row = (f'<tr class="r{i % 2}"><td>{10000 + i * 37}</td><td>item {(i * 7919) % 10007}</td>'
               f'<td>category {i % 13}, shipped {1 + i % 28:02d}/{1 + i % 12:02d}</td><td>{(i * 6151) % 9973 / 100:.2f}</td></tr>\n')
        rows.append(row)
        size += len(row)
        i += 1
    return (head + "".join(rows) + "</table>\n</body></html>\n").encode()


def start_origins(run: Path) -> subprocess.Popen:
    """The three nginx origins (19001-19003) with the 64 KiB file and the HTML page,
    their files in `run`."""
    (run / "64k.bin").write_bytes(b"x" * 65536)
    (run / "page.html").write_bytes(page_html())
    return subprocess.Popen(
        ["nginx", "-g", "daemon off;", "-c", str(render(PEERS / "origin-nginx.conf", run))])


class Procs:
    def __init__(self, run: Path, rampart: Path, pgo: Path = None):
        self.run = run
        self.rampart = rampart
        self.pgo = pgo
        self.procs = {}

    def start_all(self):
        listening = PORTS + ((PGO_PORT,) if self.pgo else ())
        require_free(listening)
        if self.pgo:
            # The bench's own config, on its own port: the same settings as the default build's.
            # Checked: a bind left on 18080 would not fail, as SO_REUSEPORT would
            # silently split the default build's load between the two.
            config = config_for(self.pgo, replaced_once((PEERS / "rampart.toml").read_text(),
                                                        '"127.0.0.1:18080"', f'"127.0.0.1:{PGO_PORT}"'),
                                self.run / "rampart-pgo.toml")
            self.procs[PGO] = subprocess.Popen(
                [str(self.pgo), "--config", str(config), "--log-level", "warn"])
        self.procs["origin"] = start_origins(self.run)
        self.procs["nginx"] = subprocess.Popen(
            ["nginx", "-g", "daemon off;", "-c", str(render(PEERS / "nginx.conf", self.run))])
        self.procs["haproxy"] = subprocess.Popen(
            ["haproxy", "-db", "-f", str(render(PEERS / "haproxy.cfg", self.run))])
        self.procs["haproxy-tcp"] = subprocess.Popen(
            ["haproxy", "-db", "-f", str(render(PEERS / "haproxy-tcp.cfg", self.run))])
        for name in ("rampart", "rampart-2w"):
            config = config_for(self.rampart, (PEERS / f"{name}.toml").read_text(), self.run / f"{name}.toml")
            self.procs[name] = subprocess.Popen([str(self.rampart), "--config", str(config), "--log-level", "warn"])
        self.procs["nginx-2w"] = subprocess.Popen(
            ["nginx", "-g", "daemon off;", "-c", str(render(PEERS / "nginx-2w.conf", self.run))])
        self.procs["haproxy-2t"] = subprocess.Popen(
            ["haproxy", "-db", "-f", str(render(PEERS / "haproxy-2t.cfg", self.run))])
        for p in listening:
            wait_port(p)
        time.sleep(0.5)

    def pids(self, name):
        """The PIDs whose CPU and memory count for `name` (nginx: the worker)."""
        p = self.procs[name]
        if name == "nginx":
            return children(p.pid) or [p.pid]
        return [p.pid]

    def stop_all(self):
        for p in self.procs.values():
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def cpu_ticks(pids):
    """(user, kernel) clock ticks the processes have used: utime and stime."""
    user = kernel = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        kernel += int(fields[12])
    return user, kernel


def switches(pids):
    """(voluntary, involuntary) context switches of the processes' threads so far: the
    times they went to sleep for want of work, and the times they were switched out
    while still runnable (preempted)."""
    slept = preempted = 0
    for pid in pids:
        for status in Path(f"/proc/{pid}/task").glob("*/status"):
            with open(status) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        slept += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        preempted += int(line.split()[1])
    return slept, preempted


def saturated(pids, port, duration):
    """wrk -c64 on `port` with what the processes `pids` did meanwhile: req/s ("rps"),
    the share of one CPU they were running ("busy", %), CPU µs per request ("cpu"),
    preemptions and sleeps per 1,000 requests ("preempt", "slept"), and the share of
    all the machine's CPU time that went idle ("idle", %). Throughput alone mixes what
    a proxy costs with how much CPU the scheduler gave it while wrk and the origins
    compete for the same 2 CPUs."""
    hz = os.sysconf("SC_CLK_TCK")
    before, sw, jiffies = cpu_ticks(pids), switches(pids), cpu_jiffies()
    start = time.monotonic()
    rps = wrk(port, "/", duration)
    used = sum(cpu_ticks(pids)) - sum(before)
    wall, after = time.monotonic() - start, switches(pids)
    n = max(rps * duration, 1)
    return {"rps": rps, "busy": used / hz / wall * 100.0, "cpu": used / hz * 1e6 / n,
            "slept": (after[0] - sw[0]) * 1000.0 / n, "preempt": (after[1] - sw[1]) * 1000.0 / n,
            "idle": 100.0 - busy_since(jiffies, cpu_jiffies())}


def children(pid):
    """The PIDs of `pid`'s child processes (nginx's workers)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def threads_of(pid):
    """`pid`, its child processes, and all their threads."""
    return [int(t.name) for p in [pid, *children(pid)] for t in Path(f"/proc/{p}/task").glob("*")]


def set_affinity(tids, cpus):
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, PermissionError):
            pass


def cpu_jiffies(cpus=None):
    """(total, idle) jiffies the CPUs `cpus` (default: every CPU) have counted, from /proc/stat."""
    total = idle = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and (cpus is None or int(name[3:]) in cpus):
                v = [int(x) for x in fields]
                total += sum(v)
                idle += v[3] + v[4]  # idle and iowait
    return total, idle


def steal_ms():
    """CPU time the hypervisor has taken from this machine's CPUs since boot (ms, all
    CPUs summed: /proc/stat's steal column). On a shared VM the host can take a CPU
    away for 100 ms at a time, and whatever runs on it, the proxy, an origin or the
    load generator, stalls: a sample taken across such a stall is not the proxy's."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) * 1000.0 / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def busy_since(before, after):
    """The share of the time between two `cpu_jiffies()` readings the CPUs were busy (%)."""
    total, idle = after[0] - before[0], after[1] - before[1]
    return 100.0 * (1 - idle / max(total, 1))


def rotated(names, rnd):
    """`names` in round `rnd`'s order: each round starts one further along, so no proxy
    is always measured first (or last, when the machine has warmed up, or is busier)."""
    k = rnd % len(names)
    return names[k:] + names[:k]


def pinned_saturated(procs, name, port, duration):
    """`saturated()` with the proxy alone on the last CPU and wrk and the origins on the
    others, as a proxy runs in production (its clients and origins are other machines):
    req/s then measures what a request costs the proxy, not also how the scheduler
    shares a CPU between it and the processes it wakes. Affinity is restored after.
    Adds how busy the other CPUs (wrk and the origins) were: when they are full, they
    set the rate as much as the proxy does."""
    every = os.sched_getaffinity(0)
    if len(every) < 2:
        # One CPU: nothing to set apart; the row then repeats the shared one.
        return {**saturated(procs.pids(name), port, duration), "load": float("nan")}
    own = {max(every)}
    rest = every - own
    proxy, origins = threads_of(procs.procs[name].pid), threads_of(procs.procs["origin"].pid)
    set_affinity(origins, rest)
    set_affinity(proxy, own)
    try:
        # wrk inherits this process's affinity between fork and exec.
        os.sched_setaffinity(0, rest)
        try:
            before = cpu_jiffies(rest)
            got = saturated(procs.pids(name), port, duration)
            return {**got, "load": busy_since(before, cpu_jiffies(rest))}
        finally:
            os.sched_setaffinity(0, every)
    finally:
        set_affinity(proxy + origins, every)


def rss_kib(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def wrk(port, path, duration):
    out = sh(["wrk", "-t1", "-c64", f"-d{duration}s", f"http://127.0.0.1:{port}{path}"]).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        # A benchmark of error pages measures nothing: stop.
        raise RuntimeError(f"{errors.group(1)} non-2xx responses from port {port}{path}")
    return float(m.group(1))


def h2load(port, duration):
    out = sh(["h2load", "-c16", "-m8", "-t1", f"-D{duration}", f"http://127.0.0.1:{port}/"]).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    return float(m.group(1))


def fixed_rate(pids, port, duration, rate):
    """oha at `rate` req/s on `port`: (CPU µs per answered request, of which kernel, p99 ms)
    for the processes `pids`."""
    hz = os.sysconf("SC_CLK_TCK")
    before = cpu_ticks(pids)
    out = sh(["oha", "-z", f"{duration}s", "-c", "64", "-q", str(rate), "--no-tui", "--output-format", "json",
              f"http://127.0.0.1:{port}/"]).stdout
    after = cpu_ticks(pids)
    data = json.loads(out)
    ok = sum(v for k, v in data.get("statusCodeDistribution", {}).items() if k.startswith("2"))
    # µs per answered request: total, and the part spent in the kernel (system calls,
    # the TCP stack, wakeups), which a proxy's own code cannot remove.
    user_us, kernel_us = ((a - b) / hz * 1e6 / max(ok, 1) for a, b in zip(after, before))
    p99 = data["latencyPercentiles"]["p99"] * 1000.0
    return user_us + kernel_us, kernel_us, p99


# Seconds the connections sit idle before RSS is read, the same for every proxy. rampart
# frees a connection's buffers after 250 ms idle, and its allocator returns the pages
# to the OS about a second or two later; nginx and HAProxy are flat by then.
IDLE_SETTLE = 5.0
# The second reading: what an idle connection costs once every proxy has settled
# (rampart's idle upstream connections expire after 4 s and their memory goes back a
# second or two later).
IDLE_LONG = 15.0


async def _idle_conns(port, n, conns):
    """Opens `n` more keep-alive connections (one request each, answer read) into `conns`."""
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    fresh = []
    answered = 0
    for i in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(req)
        fresh.append((r, w))
        if len(fresh) - answered == 500 or i == n - 1:
            # Each connection's answer is read once: a second read would wait forever.
            await asyncio.gather(*(c[0].read(200) for c in fresh[answered:]))
            answered = len(fresh)
    conns.extend(fresh)


def idle_memory(procs, name, port, n):
    """Bytes per idle connection, as the marginal cost: RSS with `n` idle connections
    minus RSS with a third of them, over the difference. A baseline without any
    connections is not stable for an allocator that keeps (and later gives back) what
    the load phases before left: rampart's RSS with no connections open sat ~6 MB above
    its fresh start, and fell ~1 MB below that once connections had come and gone,
    which made the growth per connection negative."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 1000)), hard))
    pids = procs.pids(name)
    loop = asyncio.new_event_loop()
    conns = []
    first = n // 3
    loop.run_until_complete(_idle_conns(port, first, conns))
    loop.run_until_complete(asyncio.sleep(IDLE_SETTLE))
    base = rss_kib(pids)
    loop.run_until_complete(_idle_conns(port, n - first, conns))
    loop.run_until_complete(asyncio.sleep(IDLE_SETTLE))
    after = rss_kib(pids)
    loop.run_until_complete(asyncio.sleep(IDLE_LONG - IDLE_SETTLE))
    settled = rss_kib(pids)
    for _, w in conns:
        w.close()
    loop.run_until_complete(asyncio.sleep(0.5))
    loop.close()
    added = n - first
    return (after - base) * 1024 / added, (settled - base) * 1024 / added


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    vers = {}
    for tool, cmd in [("nginx", "nginx -v 2>&1"), ("haproxy", "haproxy -v | head -1"),
                      ("wrk", "wrk --version 2>&1 | head -1"), ("oha", "oha --version")]:
        vers[tool] = subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    return cpu, vers


# The measurements of one round, in the order they run; the floor (HAProxy in TCP mode)
# takes part in those it has a meaning for (it cannot answer h2c or be compared on 64 KiB).
MEASURES = ("throughput", "own CPU", "64k", "h2c", "fixed rate")
FLOOR_MEASURES = ("throughput", "own CPU", "fixed rate")


def measure(procs, kind, name, args):
    """One sample of `kind` for proxy `name` ("floor": HAProxy in TCP mode), as the
    result keys it fills."""
    proc, port, h2port = (("haproxy-tcp", FLOOR_PORT, None) if name == "floor"
                          else (name, *ports(name)))
    if kind == "throughput":
        got = saturated(procs.pids(proc), port, args.duration)
        return {"rps": got["rps"], "busy": got["busy"], "cpu_sat": got["cpu"],
                "preempt": got["preempt"], "slept": got["slept"], "idle_cpu": got["idle"]}
    if kind == "own CPU":
        got = pinned_saturated(procs, proc, port, args.duration)
        return {"rps_pin": got["rps"], "busy_pin": got["busy"], "cpu_pin": got["cpu"], "load_pin": got["load"]}
    if kind == "64k":
        return {"rps64k": wrk(port, "/64k", args.duration)}
    if kind == "h2c":
        return {"h2": h2load(h2port, args.duration)}
    cpu, kernel, p99 = fixed_rate(procs.pids(proc), port, args.duration, args.rate)
    return {"cpu": cpu, "kernel": kernel, "user": cpu - kernel, "p99": p99}


def describe(kind, got):
    """One sample, for the progress line."""
    if kind == "throughput":
        return (f"{got['rps']:,.0f} req/s ({got['busy']:.0f}% CPU, {got['cpu_sat']:.2f} µs/req, "
                f"{got['preempt']:.1f} preempted/1k, {got['slept']:.1f} slept/1k; machine {got['idle_cpu']:.0f}% idle)")
    if kind == "own CPU":
        return (f"{got['rps_pin']:,.0f} req/s ({got['busy_pin']:.0f}% CPU, {got['cpu_pin']:.2f} µs/req; "
                f"wrk and origins' CPU {got['load_pin']:.0f}% busy)")
    if kind in ("64k", "h2c"):
        return f"{next(iter(got.values())):,.0f} req/s"
    return f"{got['cpu']:.2f} µs/req (kernel {got['kernel']:.2f}), p99 {got['p99']:.2f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rate", type=int, default=8000)
    # 9,000 rather than 10,000: where the hard descriptor limit is 20,000 (as on these
    # machines), HAProxy reserves two descriptors per maxconn and cannot hold 10,000.
    ap.add_argument("--idle", type=int, default=9000)
    ap.add_argument("--quick", action="store_true", help="1 round of 3 s, 2000 idle connections")
    ap.add_argument("--results", help="where to write the table (default: bench/RESULTS.md; with --quick "
                    "the table is only printed, so a smoke run never replaces the published one)")
    ap.add_argument("--pgo", action="store_true",
                    help="also build the profile-guided rampart (bench/pgo.py) and measure it in the same "
                    "rounds, as a fourth column")
    ap.add_argument("--check", action="store_true",
                    help="only check the scripts compile, the peer configs agree and the report renders "
                    "(CI; needs no peers)")
    args = ap.parse_args()
    if args.check:
        sys.exit(0 if self_check() else 1)
    drift = scaling_config_drift()
    if drift:
        sys.exit("\n".join(drift))
    if args.quick:
        args.rounds, args.duration, args.idle = 1, 3, 2000
    elif args.results is None:
        args.results = "bench/RESULTS.md"
    raise_fd_limit()
    ensure_tools()
    rampart = build_rampart()
    pgo = None
    if args.pgo:
        # Built (and trained) before the proxies start: its training uses their ports.
        import pgo as pgo_build
        pgo = pgo_build.build()
    names = list(PROXIES) + ([PGO] if pgo else [])
    run = Path(tempfile.mkdtemp(prefix="rampart-bench-"))
    # nginx workers run as nobody: they must be able to read the 64 KiB file.
    os.chmod(run, 0o755)
    procs = Procs(run, rampart, pgo)
    results = empty_results(names)
    floor = {}
    stolen = []  # (ms, round, measurement, proxy) for every sample the host took CPU time in
    try:
        procs.start_all()
        direct = wrk(19001, "/", args.duration)
        print(f"direct to one origin: {direct:,.0f} req/s", flush=True)
        for rnd in range(args.rounds):
            # Interleaved per measurement, not per proxy: the proxies' samples of one
            # measurement are taken back to back, so a slow minute of the shared machine
            # falls on all of them rather than on whichever proxy was running then.
            order = rotated(names, rnd)
            for kind in MEASURES:
                line = []
                for name in order + (["floor"] if kind in FLOOR_MEASURES else []):
                    before = steal_ms()
                    got = measure(procs, kind, name, args)
                    steal = steal_ms() - before
                    for k, v in got.items():
                        (floor.setdefault(k, []) if name == "floor" else results[k][name]).append(v)
                    if steal:
                        stolen.append((steal, rnd + 1, kind, name))
                    line.append(f"{name} {describe(kind, got)}" + (f" [host steal {steal:.0f} ms]" if steal else ""))
                print(f"round {rnd + 1} {kind:10} " + " | ".join(line), flush=True)
        # Each proxy with one worker and with two, back to back, so the ratio is taken
        # within a round; the peers' ratios say what a second worker can add on this
        # machine, where wrk and the origins share the two CPUs.
        scaling = {name: [] for name in SCALING}
        for rnd in range(args.rounds):
            line = []
            for name in rotated(list(SCALING), rnd):
                one, two = (wrk(port, "/", args.duration) for port in SCALING[name])
                scaling[name].append(two / one)
                line.append(f"{name} {one:,.0f} -> {two:,.0f} req/s ({two / one:.2f}×)")
            print(f"round {rnd + 1} scaling 1 -> 2 workers: " + " | ".join(line), flush=True)
        results["scaling"] = {name: statistics.median(v) for name, v in scaling.items()}
        results["floor"] = {k: statistics.median(v) for k, v in floor.items()}
        results["steal"] = stolen
        for name in names:
            port, _ = ports(name)
            mem, settled = idle_memory(procs, name, port, args.idle)
            results["idle"][name].append(mem)
            results["idle15"][name].append(settled)
            print(f"idle     {name:8} {mem:8.0f} bytes per idle connection ({args.idle} open) after "
                  f"{IDLE_SETTLE:.0f} s, {settled:8.0f} after {IDLE_LONG:.0f} s", flush=True)
    finally:
        procs.stop_all()
    write_results(results, args, direct)


# What each round records per proxy (`measure()`'s keys), and the idle-memory readings.
RESULT_KEYS = ("rps", "busy", "cpu_sat", "preempt", "slept", "idle_cpu", "rps_pin", "busy_pin", "cpu_pin",
               "load_pin", "rps64k", "h2", "cpu", "kernel", "user", "p99", "idle", "idle15")


def empty_results(names=tuple(PROXIES)):
    return {m: {p: [] for p in names} for m in RESULT_KEYS}


def build_label():
    """Which rampart was measured: RAMPART_BIN, or the commit (and whether the tree had changes)."""
    if os.environ.get("RAMPART_BIN"):
        return f"from RAMPART_BIN={os.environ['RAMPART_BIN']}"
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "Cargo.toml", "Cargo.lock")
    return f"at {commit}" + (" with uncommitted changes" if dirty else "")


def command(args):
    """The command line that reproduces this run."""
    env = f"RAMPART_BIN={os.environ['RAMPART_BIN']} " if os.environ.get("RAMPART_BIN") else ""
    out = f" --results {args.results}" if args.results not in (None, "bench/RESULTS.md") else ""
    out = (" --pgo" if getattr(args, "pgo", False) else "") + out
    if getattr(args, "quick", False):
        return f"{env}python3 bench/run.py --quick{out}"
    return f"{env}python3 bench/run.py --rounds {args.rounds} --duration {args.duration}{out}"


def paired(samples, higher_better, who="rampart"):
    """`who` (rampart, or its profile-guided build) against the better peer within each
    round, where they ran this measurement back to back: "median (min–max)" over the
    rounds, or "" with one round."""
    r, n, h = samples[who], samples["nginx"], samples["haproxy"]
    if len(r) < 2 or not len(r) == len(n) == len(h):
        return ""
    pick = max if higher_better else min
    ratios = [a / pick(b, c) for a, b, c in zip(r, n, h) if pick(b, c) > 0]
    if not ratios:
        return ""
    return f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def steal_line(stolen):
    """What the host took from the machine during the round samples (`main`'s list)."""
    if not stolen:
        return "The host took no CPU time from this machine (steal, `/proc/stat`) during the round samples."
    ms, rnd, kind, name = max(stolen)
    return (f"The host took {sum(s[0] for s in stolen):,.0f} ms of CPU time from this machine (steal, "
            f"`/proc/stat`, both CPUs summed) during {len(stolen)} of the round samples; the most in one "
            f"was {ms:,.0f} ms ({kind}, {name}, round {rnd}). A sample that lost CPU time that way "
            "measured the machine as much as the proxy.")


def write_results(results, args, direct):
    scaling = results.pop("scaling", None)
    floor = results.pop("floor", None)
    stolen = results.pop("steal", [])
    med = {m: {p: statistics.median(v) for p, v in d.items() if v} for m, d in results.items()}
    higher_better = {"rps", "rps_pin", "rps64k", "h2"}
    # The profile-guided build's column, when it ran (--pgo).
    pgo = all(results[k].get(PGO) for k in RESULT_KEYS)
    rows = [
        ("throughput, 13 B body (req/s, wrk -c64)", "rps"),
        ("… the proxy's share of one CPU meanwhile (%)", "busy"),
        ("… its CPU per request meanwhile (µs)", "cpu_sat"),
        ("… times it was preempted, per 1,000 requests", "preempt"),
        ("… times it slept for want of work, per 1,000 requests", "slept"),
        ("… the machine's CPU time left idle meanwhile (%, both CPUs)", "idle_cpu"),
        ("throughput, 13 B body, the proxy alone on one CPU (wrk and the origins on the other)", "rps_pin"),
        ("… its CPU per request meanwhile (µs)", "cpu_pin"),
        ("throughput, 64 KiB body (req/s)", "rps64k"),
        ("HTTP/2 h2c clients (req/s, h2load -c16 -m8)", "h2"),
        (f"CPU per request at {args.rate} req/s (µs)", "cpu"),
        ("… of which in the kernel (µs)", "kernel"),
        ("… of which in user space, the proxy's own code (µs)", "user"),
        (f"p99 latency at {args.rate} req/s (ms)", "p99"),
        (f"memory per idle client connection ({args.idle} open, bytes, marginal, after {IDLE_SETTLE:.0f} s)", "idle"),
        (f"memory per idle client connection ({args.idle} open, bytes, marginal, after {IDLE_LONG:.0f} s)", "idle15"),
    ]
    cpu, vers = machine()
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `{command(args)}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, rampart {build_label()}.",
        "",
        f"Machine: {os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}. "
        f"Peers: {vers['nginx']}; {vers['haproxy']}. Load: {vers['wrk']}; {vers['oha']}; h2load.",
        "One worker/thread per proxy, three nginx origins behind each, keep-alive upstream, logs off. "
        f"Medians of {args.rounds} interleaved round(s). Direct to one origin: {direct:,.0f} req/s. "
        "Absolute numbers on shared machines swing ±30%: read the ratios.",
        "",
        steal_line(stolen),
        "",
        "The ratio column compares the medians; the last column is the same ratio taken within "
        "each round, where the proxies ran that measurement back to back, as the median "
        "and the range over the rounds: the range is how far one run of this bench can be "
        "trusted.",
        "",
    ]
    if pgo:
        lines += [
            f"`rampart PGO` is the profile-guided build (`bench/pgo.py`), measured in the same rounds "
            "as the others; its last two columns set it against the same peers' samples.",
            "",
            "| measurement | rampart | nginx | HAProxy | rampart vs best peer | per round: median (range) "
            "| rampart PGO | PGO vs best peer | per round: median (range) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    else:
        lines += [
            "| measurement | rampart | nginx | HAProxy | rampart vs best peer | per round: median (range) |",
            "|---|---:|---:|---:|---:|---:|",
        ]

    def ratio_cells(key, who):
        """(ratio of the medians with its goal, the per-round ratio) for `who`'s `key`."""
        r, n, h = med[key][who], med[key]["nginx"], med[key]["haproxy"]
        if key in ("busy", "idle_cpu"):
            return "(context)", ""
        per_round = paired(results[key], key in higher_better, who)
        if key in higher_better:
            best = max(n, h)
            goal = " (goal ≥ 1.2×)" if key in ("rps", "rps_pin") else ""
        else:
            best = min(n, h)
            goal = {"cpu": " (goal ≤ 0.8×)", "p99": " (goal ≤ 1.0×)", "idle": " (goal ≤ nginx)",
                    "idle15": " (goal ≤ nginx)"}.get(key, "")
        # A peer can read 0 with few connections (preallocated, already resident).
        return (f"{r / best:.2f}×{goal}" if best > 0 else f"n/a{goal}"), per_round

    for label, key in rows:
        r, n, h = med[key]["rampart"], med[key]["nginx"], med[key]["haproxy"]
        fmt = "{:,.0f}" if key in higher_better or key.startswith("idle") or key == "busy" else "{:.2f}"
        ratio, per_round = ratio_cells(key, "rampart")
        line = f"| {label} | {fmt.format(r)} | {fmt.format(n)} | {fmt.format(h)} | {ratio} | {per_round} |"
        if pgo:
            ratio, per_round = ratio_cells(key, PGO)
            line += f" {fmt.format(med[key][PGO])} | {ratio} | {per_round} |"
        lines.append(line)
    # Throughput here is what the proxy costs times the CPU the scheduler lets it have;
    # say which of the two a throughput ratio comes from.
    busy, sat = med["busy"], med["cpu_sat"]
    lines += ["", "Reading the throughput row: with wrk and the origins on the same 2 CPUs, req/s is the "
              "CPU the scheduler gives the proxy divided by its CPU per request. rampart ran "
              f"{busy['rampart']:.0f}% of a CPU (nginx {busy['nginx']:.0f}%, HAProxy {busy['haproxy']:.0f}%) at "
              f"{sat['rampart']:.2f} µs per request ({sat['rampart'] / min(sat['nginx'], sat['haproxy']):.2f}× the "
              f"better peer's {min(sat['nginx'], sat['haproxy']):.2f}), and was preempted "
              f"{med['preempt']['rampart']:.1f} times per 1,000 requests (nginx {med['preempt']['nginx']:.1f}, "
              f"HAProxy {med['preempt']['haproxy']:.1f}): in `perf record -e sched:sched_switch -g` nearly all of these "
              "happen as the proxy's `send` returns, to the origin or wrk thread that send woke onto the "
              "proxy's CPU. It slept for want of work "
              f"{med['slept']['rampart']:.1f} times per 1,000 requests (nginx {med['slept']['nginx']:.1f}, "
              f"HAProxy {med['slept']['haproxy']:.1f}) while {med['idle_cpu']['rampart']:.0f}% of the machine's CPU "
              f"time went idle (nginx {med['idle_cpu']['nginx']:.0f}%, HAProxy {med['idle_cpu']['haproxy']:.0f}%): "
              "while the proxy sleeps, its CPU is free for wrk and the origins, and the idle share is the "
              "CPU time none of them used. "
              "The next row takes the scheduler out: each proxy alone on one CPU, wrk and the origins "
              f"on the other. There rampart ran {med['rps_pin']['rampart']:,.0f} req/s at "
              f"{med['cpu_pin']['rampart']:.2f} µs per request (nginx {med['rps_pin']['nginx']:,.0f} at "
              f"{med['cpu_pin']['nginx']:.2f}, HAProxy {med['rps_pin']['haproxy']:,.0f} at "
              f"{med['cpu_pin']['haproxy']:.2f}), using {med['busy_pin']['rampart']:.0f}% of its CPU (nginx "
              f"{med['busy_pin']['nginx']:.0f}%, HAProxy {med['busy_pin']['haproxy']:.0f}%), while the other "
              f"CPU, with wrk and the origins, was {med['load_pin']['rampart']:.0f}% busy (nginx "
              f"{med['load_pin']['nginx']:.0f}%, HAProxy {med['load_pin']['haproxy']:.0f}%). A proxy below "
              "100% with the other CPU near 100% was waiting for wrk and the origins: the rate was theirs as "
              "much as the proxy's, and its CPU per request is then the proxy's own measure; a proxy near "
              "100% with the other CPU below it set the rate itself."]
    if scaling is not None:
        lines += ["", "Scaling: throughput with 2 workers (HAProxy: threads) against 1, wrk -c64, same "
                  "machine (wrk and the origins share the 2 CPUs), median of the per-round ratios over "
                  f"{args.rounds} round(s): rampart {scaling['rampart']:.2f}×, nginx {scaling['nginx']:.2f}×, "
                  f"HAProxy {scaling['haproxy']:.2f}×."]
    if floor:
        best_rps = max(med["rps"]["nginx"], med["rps"]["haproxy"])
        best_pin = max(med["rps_pin"]["nginx"], med["rps_pin"]["haproxy"])
        best_cpu = min(med["cpu"]["nginx"], med["cpu"]["haproxy"])
        lines += ["", "Floor, for reading the goals: HAProxy in TCP mode (`bench/peers/haproxy-tcp.cfg`: "
                  "bytes relayed without parsing HTTP, one backend connection per client) in the same "
                  f"rounds: {floor['rps']:,.0f} req/s ({floor['rps'] / best_rps:.2f}× the better HTTP peer; "
                  f"rampart {med['rps']['rampart'] / floor['rps']:.2f}× of it), alone on one CPU "
                  f"{floor['rps_pin']:,.0f} req/s ({floor['rps_pin'] / best_pin:.2f}× the better HTTP peer; "
                  f"rampart {med['rps_pin']['rampart'] / floor['rps_pin']:.2f}× of it), and {floor['cpu']:.2f} µs of "
                  f"CPU per request at {args.rate} req/s ({floor['cpu'] / best_cpu:.2f}× the better HTTP "
                  f"peer; rampart {med['cpu']['rampart'] / floor['cpu']:.2f}× of it)."]
        # The CPU goal against what no proxy's code controls: the kernel's share of a hop.
        kernel = med["kernel"]["rampart"]
        room = 0.8 * best_cpu - kernel
        if room >= 0:
            budget = f"leaves rampart {room:.2f} µs of user time per request"
        else:
            # In a run where the kernel alone is past the goal, no user-space work can meet it.
            budget = (f"is {-room:.2f} µs below rampart's kernel time alone, so no user-space "
                      "saving can meet it in this run")
        lines += ["", f"Kernel time: rampart's {kernel:.2f} µs per request in the kernel alone is "
                  f"{kernel / best_cpu:.2f}× the better HTTP peer's whole CPU per request (the floor's is "
                  f"{floor['kernel']:.2f} µs, {floor['kernel'] / best_cpu:.2f}×). The CPU goal (≤ 0.8×, "
                  f"{0.8 * best_cpu:.2f} µs) {budget}; rampart's user time is "
                  f"{med['user']['rampart']:.2f} µs (nginx {med['user']['nginx']:.2f}, "
                  f"HAProxy {med['user']['haproxy']:.2f}, the floor {floor['user']:.2f}"
                  + (f", the profile-guided build {med['user'][PGO]:.2f}" if pgo else "") + ")."]
    lines.append("")
    text = "\n".join(lines)
    if args.results:
        (ROOT / args.results).write_text(text)
    print()
    print(text)


if __name__ == "__main__":
    sys.exit(main())
