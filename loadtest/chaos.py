#!/usr/bin/env python3
"""Chaos suite: break backends under load behind rampart, nginx and HAProxy, in one run.

Usage:  python3 loadtest/chaos.py [--scenarios killed,frozen,...] [--proxies rampart,...]
                                  [--duration 12] [--logs DIR] [--results PATH]

Three origins (loadtest/origin.rs, 13-byte body; HTTP/1.1 or h2c) sit behind each
proxy: rampart with the README's minimal config, nginx and HAProxy tuned for failover
(loadtest/peers/). `--proxies rampart-h2` adds rampart speaking HTTP/2 to the origins
(`protocol = "h2"`), which a default run leaves out.
For each scenario and proxy, oha drives 32 keep-alive clients for --duration seconds;
the fault starts at 1/4 and heals at 3/4 of the run. In `upgrade` the backends stay
healthy and the proxy itself is upgraded, at 1/4, 1/2 and 3/4 of the run, by its own
procedure for replacing a running binary (`upgrade_proxy`). Client-visible failures are non-2xx
responses plus transport errors; "max" is the slowest request. The table goes to stdout,
and to loadtest/RESULTS.md when every scenario ran on every proxy (a subset run leaves
the committed results alone; --results PATH writes its table there). Load goes to
127.0.0.1 only; every run is bounded in time.
With --logs DIR, each proxy's output goes to DIR/<proxy>-<scenario>.log (rampart at
log level warn: every retry and every failed request, with its reason).
"""
import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from run import steal_ms  # noqa: E402  (bench/run.py: the host's steal counter)
PEERS = ROOT / "loadtest" / "peers"
ORIGIN_PORTS = [29001, 29002, 29003]
PROXIES = {"rampart": 28080, "nginx": 28081, "haproxy": 28082, "rampart-h2": 28083}
# The comparison run: `rampart-h2` (the same minimal config with `protocol = "h2"`,
# HTTP/2 to the origins) runs only when named.
DEFAULT_PROXIES = ["rampart", "nginx", "haproxy"]
SCENARIOS = ["steady", "killed", "killed_post", "frozen", "503s", "slow", "reset", "backlog", "flapping",
             "rolling", "rolling_post", "all_down", "post_unsafe", "upgrade"]
POST_BODY = "x" * 512


def ensure_tools():
    missing = [p for p, b in [("nginx", "nginx"), ("haproxy", "haproxy")] if shutil.which(b) is None]
    if missing:
        subprocess.run("apt-get update -qq", shell=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    os.environ["PATH"] = f"{Path.home() / '.cargo/bin'}:{os.environ['PATH']}"
    if shutil.which("oha") is None:
        print("installing oha with cargo (a few minutes) ...", flush=True)
        subprocess.run(["cargo", "install", "oha", "--locked"], check=True)
    for svc in ("nginx", "haproxy"):
        subprocess.run(["systemctl", "stop", svc], capture_output=True)
    print("building rampart and the chaos origin (release) ...", flush=True)
    subprocess.run(["cargo", "build", "--release", "-q", "--bin", "rampart", "--example", "chaos-origin"],
                   cwd=ROOT, check=True)


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def build_label():
    """The commit the build came from, and whether the tree had changes to the code."""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "Cargo.toml", "Cargo.lock")
    return f"at {commit}" + (" with uncommitted changes" if dirty else "")


def code_version():
    """What the build is made of: the committed trees of the code, plus any uncommitted
    changes to them."""
    paths = ["src", "Cargo.toml", "Cargo.lock", "loadtest/origin.rs"]
    return (git("rev-parse", *[f"HEAD:{p}" for p in paths]),
            git("diff", "HEAD", "--", *paths))


def wait_port(port, timeout=10.0):
    import socket
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.3):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class Origins:
    def __init__(self):
        self.bin = ROOT / "target" / "release" / "examples" / "chaos-origin"
        self.procs = {}
        self.ctl = {}

    def start(self, port):
        self.procs[port] = subprocess.Popen([str(self.bin), f"127.0.0.1:{port}"])
        wait_port(port)
        # A control connection opened now still works once the origin stops accepting.
        self.ctl[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=2)

    def start_all(self):
        for p in ORIGIN_PORTS:
            self.start(p)

    def mode(self, port, mode):
        c = self.ctl[port]
        c.request("GET", f"/__mode/{mode}")
        c.getresponse().read()

    def posts(self, port):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        c.request("GET", "/__stats")
        return json.loads(c.getresponse().read())["posts"]

    def kill(self, port):
        p = self.procs.pop(port, None)
        if p:
            p.kill()
            p.wait()

    def stop_graceful(self, port):
        p = self.procs.pop(port, None)
        if p:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=6)
            except subprocess.TimeoutExpired:
                p.kill()

    def signal(self, port, sig):
        self.procs[port].send_signal(sig)

    def stop_all(self):
        for port in list(self.procs):
            try:
                self.procs[port].send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.kill(port)


def rampart_config(name):
    return PEERS / ("rampart-h2.toml" if name == "rampart-h2" else "rampart.toml")


def start_proxy(name, run, log, scenario):
    if name.startswith("rampart"):
        cmd = [str(ROOT / "target/release/rampart"), "--config", str(rampart_config(name)),
               "--log-level", "warn" if log else "error"]
    elif name == "nginx":
        conf = run / "nginx.conf"
        conf.write_text((PEERS / "nginx-tuned.conf").read_text().replace("{RUN}", str(run)))
        cmd = ["nginx", "-g", "daemon off;", "-c", str(conf)]
        if scenario == "upgrade":
            # nginx changes its binary only as a daemon, and executes its argv[0] anew.
            cmd = [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf)]
    else:
        conf = run / "haproxy.cfg"
        conf.write_text((PEERS / "haproxy-tuned.cfg").read_text().replace("{RUN}", str(run)))
        # Master-worker mode (-W, as Debian's unit runs it with -Ws) for the upgrade
        # scenario: its master re-executes the binary on SIGUSR2.
        cmd = ["haproxy", "-db", "-f", str(conf)]
        if scenario == "upgrade":
            cmd.insert(1, "-W")
    out = open(log, "w") if log else subprocess.DEVNULL
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    wait_port(PROXIES[name])
    time.sleep(1.5)  # let health checks settle
    return p


def newest_pid(pattern):
    out = subprocess.run(["pgrep", "-n", "-f", pattern], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def upgrade_proxy(name, run):
    """Replaces the proxy's running binary by each one's own hitless procedure: rampart
    and HAProxy (master-worker) on SIGUSR2; nginx on SIGUSR2 to start the new master,
    then SIGQUIT to the old one once the new one runs."""
    if name.startswith("rampart"):
        os.kill(newest_pid(str(rampart_config(name))), signal.SIGUSR2)
    elif name == "nginx":
        pidfile = run / "nginx.pid"
        old = int(pidfile.read_text())
        os.kill(old, signal.SIGUSR2)
        deadline = time.time() + 5
        while time.time() < deadline:
            try:
                if int(pidfile.read_text()) != old:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        os.kill(old, signal.SIGQUIT)
    else:
        os.kill(int((run / "haproxy.pid").read_text().split()[0]), signal.SIGUSR2)


def stop_leftovers(name, run):
    """The processes an upgrade started, which the proxy's Popen handle does not reach."""
    conf = {"nginx": "nginx.conf", "haproxy": "haproxy.cfg"}
    pattern = str(rampart_config(name)) if name.startswith("rampart") else str(run / conf[name])
    subprocess.run(["pkill", "-TERM", "-f", pattern], capture_output=True)
    deadline = time.time() + 10
    while newest_pid(pattern) and time.time() < deadline:
        time.sleep(0.05)
    subprocess.run(["pkill", "-KILL", "-f", pattern], capture_output=True)


def fault_plan(scenario, origins, d, proxy=None, run=None):
    """Returns (break, heal) callables run at d/4 and 3d/4, or a timed list."""
    o2 = ORIGIN_PORTS[1]
    t0, t1 = d / 4, 3 * d / 4
    if scenario == "upgrade":
        # The proxy's own binary upgrade, three times over, the backends all healthy.
        return [(t, lambda: upgrade_proxy(proxy, run)) for t in (t0, (t0 + t1) / 2, t1)]
    if scenario in ("killed", "killed_post"):
        return [(t0, lambda: origins.kill(o2)), (t1, lambda: origins.start(o2))]
    if scenario == "frozen":
        return [(t0, lambda: origins.signal(o2, signal.SIGSTOP)), (t1, lambda: origins.signal(o2, signal.SIGCONT))]
    if scenario in ("503s", "slow", "reset", "backlog"):
        mode = {"503s": "503", "slow": "slow", "reset": "reset", "backlog": "noaccept"}[scenario]
        return [(t0, lambda: origins.mode(o2, mode)), (t1, lambda: origins.mode(o2, "ok"))]
    if scenario == "post_unsafe":
        return [(t0, lambda: origins.mode(o2, "closeb4")), (t1, lambda: origins.mode(o2, "ok"))]
    if scenario == "flapping":
        plan, t, down = [], t0, True
        while t < t1:
            plan.append((t, (lambda: origins.kill(o2)) if down else (lambda: origins.start(o2))))
            t += 1.0
            down = not down
        plan.append((t1, lambda: (o2 in origins.procs) or origins.start(o2)))
        return plan
    if scenario in ("rolling", "rolling_post"):
        # A deploy: each backend in turn stops gracefully (SIGTERM: drains in-flight
        # requests, closes idle keep-alive connections) and comes back.
        plan = []
        step = (t1 - t0) / 3
        for i, port in enumerate(ORIGIN_PORTS):
            plan.append((t0 + i * step, lambda p=port: origins.stop_graceful(p)))
            plan.append((t0 + i * step + step / 2, lambda p=port: origins.start(p)))
        return plan
    if scenario == "all_down":
        return [(t0, lambda: [origins.kill(p) for p in ORIGIN_PORTS]),
                (t1, lambda: [origins.start(p) for p in ORIGIN_PORTS])]
    return []


PROBE_CLIENTS = 2


def timeline(csv_text, duration):
    """Per-second successful responses of the probe clients: the mean over the fault
    window [d/4, 3d/4) and its worst second, each as a ratio to the seconds before the
    fault (skipping the first, warm-up, second)."""
    per_sec = [0] * (duration + 2)
    for line in csv_text.splitlines()[1:]:
        f = line.split(",")
        try:
            end, status = float(f[0]) + float(f[4]), int(f[6])
        except (IndexError, ValueError):
            continue
        if 200 <= status < 300 and int(end) < len(per_sec):
            per_sec[int(end)] += 1
    t0, t1 = int(duration / 4), int(3 * duration / 4)
    before = per_sec[1:t0] or [0]
    during = per_sec[t0:t1] or [0]
    steady = sum(before) / len(before)
    if steady == 0:
        return {"fault_ratio": 0.0, "worst_ratio": 0.0}
    return {"fault_ratio": sum(during) / len(during) / steady, "worst_ratio": min(during) / steady}


def run_one(name, scenario, duration, run, logs=None):
    origins = Origins()
    origins.start_all()
    proxy = start_proxy(name, run, logs / f"{name}-{scenario}.log" if logs else None, scenario)
    post = scenario in ("killed_post", "rolling_post", "post_unsafe")
    posts_before = sum(origins.posts(p) for p in ORIGIN_PORTS)

    def oha(clients, fmt):
        cmd = ["oha", "-z", f"{duration}s", "-c", str(clients), "--no-tui", "--output-format", fmt,
               "--wait-ongoing-requests-after-deadline", "-t", "10s"]
        if post:
            cmd += ["-m", "POST", "-d", POST_BODY, "-T", "application/x-www-form-urlencoded"]
        return cmd + [f"http://127.0.0.1:{PROXIES[name]}/"]

    cmd = oha(32, "json")
    stolen = steal_ms()
    load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Two more clients whose every request is timestamped (oha's CSV leaves out transport
    # errors, so they are not counted as failures): their per-second throughput is the
    # timeline of the run. Not for POST rows: the origins' count of POSTs received must
    # match the main clients' requests exactly, to find duplicates.
    probe = None if post else subprocess.Popen(oha(PROBE_CLIENTS, "csv"), stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True)
    start = time.time()
    for at, action in fault_plan(scenario, origins, duration, name, run):
        delay = at - (time.time() - start)
        if delay > 0:
            time.sleep(delay)
        try:
            action()
        except Exception as e:  # a control call to a dead origin is expected in some plans
            print(f"   ({scenario}: {e})", file=sys.stderr)
    out, err = load.communicate(timeout=duration + 60)
    probe_out = probe.communicate(timeout=duration + 60)[0] if probe else None
    stolen = steal_ms() - stolen
    data = json.loads(out)
    statuses = {int(k): v for k, v in data.get("statusCodeDistribution", {}).items()}
    errors = sum(data.get("errorDistribution", {}).values())
    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    total = sum(statuses.values()) + errors
    result = {
        "failures": total - ok,
        "total": total,
        "rps": data["summary"]["requestsPerSec"],
        "max_ms": data["summary"]["slowest"] * 1000.0,
        "statuses": {k: v for k, v in statuses.items() if not 200 <= k < 300},
        "errors": data.get("errorDistribution", {}),
        "steal_ms": stolen,
    }
    if probe_out is not None:
        result.update(timeline(probe_out, duration))
    if post:
        for p in ORIGIN_PORTS:
            if p not in origins.procs:
                origins.start(p)
        received = sum(origins.posts(p) for p in ORIGIN_PORTS) - posts_before
        result["duplicates"] = max(0, received - total)
    proxy.send_signal(signal.SIGTERM)
    try:
        proxy.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proxy.kill()
    if scenario == "upgrade":
        stop_leftovers(name, run)
    origins.stop_all()
    time.sleep(0.3)
    return result


def cell(r, scenario):
    s = f"{r['failures']:,}"
    if scenario in ("frozen", "slow", "backlog", "all_down") or r["max_ms"] > 1000:
        s += f", max {r['max_ms']:.0f} ms"
    if "duplicates" in r and r["duplicates"]:
        s += f", {r['duplicates']} sent twice"
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--proxies", default=",".join(DEFAULT_PROXIES),
                    help=f"any of {', '.join(PROXIES)}")
    ap.add_argument("--duration", type=int, default=12)
    ap.add_argument("--logs", type=Path, help="keep each proxy's log in this directory")
    ap.add_argument("--results", type=Path, help="where to write the table (default: loadtest/RESULTS.md "
                    "for a run of every scenario on every proxy; a subset run only prints it)")
    args = ap.parse_args()
    if args.duration < 8:
        # The fault starts at a quarter of the run; the throughput probe compares it with
        # the seconds before, less the first (warm-up), and below 8 s none is left.
        ap.error("--duration must be at least 8 (seconds)")
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    scenarios = args.scenarios.split(",")
    proxies = args.proxies.split(",")
    label, code = build_label(), code_version()
    ensure_tools()
    if code_version() != code:
        # The build picked up code that changed while it ran: the figures would not
        # belong to any commit. (A commit that touches only docs does not count.)
        label += f", code changed during the build (now {build_label()})"
    run = Path(tempfile.mkdtemp(prefix="rampart-chaos-"))
    results = {}
    for sc in scenarios:
        for px in proxies:
            r = run_one(px, sc, args.duration, run, args.logs)
            results[(sc, px)] = r
            print(f"{sc:13} {px:8} failures {r['failures']:7,} of {r['total']:8,}  {r['rps']:9,.0f} req/s  "
                  f"max {r['max_ms']:7.0f} ms  {r['statuses'] or ''} {r['errors'] or ''}"
                  + (f" dup={r['duplicates']}" if "duplicates" in r else "")
                  + (f"  fault/steady {r['fault_ratio']:.2f} (worst second {r['worst_ratio']:.2f})"
                     if "fault_ratio" in r else "")
                  + f"  steal {r['steal_ms']:.0f} ms", flush=True)
    header = "| scenario | " + " | ".join(proxies) + " |"
    lines = ["# Chaos suite results", "",
             f"`{command(args, scenarios, proxies)}`, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, rampart {label}. "
             f"Backend 2 of 3 is broken from "
             f"{args.duration / 4:.0f}s to {3 * args.duration / 4:.0f}s of each run (rolling: each backend "
             "in turn; all_down: all three). 32 keep-alive clients. Cells: client-visible failures "
             "(non-2xx + transport errors), slowest request where relevant. rampart runs the minimal "
             "config; nginx and HAProxy run the tuned configs in loadtest/peers/.",
             "", header, "|---|" + "---|" * len(proxies)]
    for sc in scenarios:
        lines.append(f"| {sc} | " + " | ".join(cell(results[(sc, px)], sc) for px in proxies) + " |")
    lines += ["", "| scenario | " + " | ".join(f"{p} req/s" for p in proxies) + " |",
              "|---|" + "---|" * len(proxies)]
    for sc in scenarios:
        lines.append(f"| {sc} | " + " | ".join(f"{results[(sc, px)]['rps']:,.0f}" for px in proxies) + " |")
    lines += ["", f"Throughput during the fault as a share of before it, from {PROBE_CLIENTS} extra probe clients "
              "timed per request: mean over the fault window, and (in brackets) its worst second.", "",
              "| scenario | " + " | ".join(proxies) + " |", "|---|" + "---|" * len(proxies)]
    for sc in scenarios:
        if "fault_ratio" not in results[(sc, proxies[0])]:
            continue
        lines.append(f"| {sc} | " + " | ".join(
            f"{results[(sc, px)]['fault_ratio']:.2f} ({results[(sc, px)]['worst_ratio']:.2f})" for px in proxies) + " |")
    lines += ["", "CPU time the host took from this machine during each run (steal, ms, both CPUs summed; "
              "`/proc/stat`). The host can take a CPU away for 100 ms at a time, and every process on it, "
              "proxy, origin or oha, then stalls: a slowest request near 100 ms with no cause in the proxy's logs "
              "lines up with a run's steal.", "",
              "| scenario | " + " | ".join(proxies) + " |", "|---|" + "---|" * len(proxies)]
    for sc in scenarios:
        lines.append(f"| {sc} | " + " | ".join(f"{results[(sc, px)]['steal_ms']:.0f}" for px in proxies) + " |")
    text = "\n".join(lines) + "\n"
    full = scenarios == SCENARIOS and proxies == DEFAULT_PROXIES
    target = args.results or (ROOT / "loadtest" / "RESULTS.md" if full else None)
    if target:
        target.write_text(text)
    print()
    print(text)
    if not target:
        print("(a subset of the suite: loadtest/RESULTS.md is left as it is; --results PATH writes this table)")


def command(args, scenarios, proxies):
    """The command line that reproduces this run."""
    cmd = f"python3 loadtest/chaos.py --duration {args.duration}"
    if scenarios != SCENARIOS:
        cmd += f" --scenarios {','.join(scenarios)}"
    if proxies != DEFAULT_PROXIES:
        cmd += f" --proxies {','.join(proxies)}"
    return cmd


if __name__ == "__main__":
    sys.exit(main())
