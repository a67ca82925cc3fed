#!/usr/bin/env python3
"""Two rampart builds side by side: which one costs less per request.

Usage:  python3 bench/ab.py A_BINARY B_BINARY [--rounds 12] [--duration 5]
e.g.    python3 bench/ab.py target/release/rampart target/pgo/release/rampart

Both run at once behind the bench's three nginx origins (bench/peers/rampart.toml on
ports 18085 and 18086), and the rounds alternate which goes first. Each round, for
each build: oha at 8,000 req/s for --duration s (CPU per request from /proc utime and
stime, p99), then wrk -t1 -c64 for --duration s (req/s). Prints every round, then the
medians. A difference smaller than the rounds' spread is noise: on a shared 2-CPU
machine one 5 s sample of user time per request ranges over 2×.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: tools, configs and load helpers)

PORTS = {"A": 18085, "B": 18086}
RATE = 8000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--duration", type=int, default=5)
    args = ap.parse_args()
    bench.raise_fd_limit()
    bench.ensure_tools()
    bench.require_free((19001, 19002, 19003, *PORTS.values()))
    run = Path(tempfile.mkdtemp(prefix="rampart-ab-"))
    os.chmod(run, 0o755)  # nginx workers run as nobody
    config = (bench.PEERS / "rampart.toml").read_text()
    procs = [bench.start_origins(run)]
    builds = {}
    for name, binary in (("A", args.a), ("B", args.b)):
        cfg = bench.config_for(binary, config.replace("127.0.0.1:18080", f"127.0.0.1:{PORTS[name]}"),
                               run / f"rampart-{name}.toml")
        p = subprocess.Popen([binary, "--config", str(cfg), "--log-level", "warn"])
        procs.append(p)
        builds[name] = p.pid
    rows = {name: [] for name in builds}
    try:
        for port in (19001, 19002, 19003, *PORTS.values()):
            bench.wait_port(port)
        for name in builds:  # warm up
            bench.sh(["oha", "-z", "2s", "-c", "64", "-q", str(RATE), "--no-tui", f"http://127.0.0.1:{PORTS[name]}/"])
        for rnd in range(args.rounds):
            for name in (("A", "B") if rnd % 2 == 0 else ("B", "A")):
                cpu, kernel, p99 = bench.fixed_rate([builds[name]], PORTS[name], args.duration, RATE)
                user = cpu - kernel
                rps = bench.wrk(PORTS[name], "/", args.duration)
                rows[name].append((user, kernel, p99, rps))
                print(f"round {rnd + 1:2} {name}: user {user:5.2f} µs/req  kernel {kernel:5.2f}  "
                      f"p99 {p99:5.2f} ms  {rps:9,.0f} req/s", flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    print()
    for name, binary in (("A", args.a), ("B", args.b)):
        r = rows[name]
        med = [statistics.median(x[i] for x in r) for i in range(4)]
        total = statistics.median(x[0] + x[1] for x in r)
        print(f"{name} ({binary}), medians of {len(r)}: user {med[0]:.2f} µs/req, kernel {med[1]:.2f}, "
              f"total {total:.2f}, p99 {med[2]:.2f} ms, {med[3]:,.0f} req/s")


if __name__ == "__main__":
    sys.exit(main())
