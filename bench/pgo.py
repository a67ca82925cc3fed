#!/usr/bin/env python3
"""Profile-guided build of rampart: the same code, laid out and inlined by how the bench's
traffic exercises it.

Usage:  python3 bench/pgo.py            # writes target/pgo/release/rampart

1. Builds rampart instrumented (`-Cprofile-generate`) into target/pgo-gen/.
2. Runs it as the bench does (bench/peers/rampart.toml, the three nginx origins) under
   the bench's own loads: wrk on the 13-byte and 64 KiB responses, h2load with h2c
   clients, oha at a fixed rate. SIGTERM then drains it and it writes its profile.
3. Merges the profile with llvm-profdata (rustup's llvm-tools component, added if
   missing) and builds target/pgo/release/rampart with `-Cprofile-use`.

Measure it against the same peers, in the same rounds as the default build, with
    python3 bench/run.py --pgo        (builds it first, then adds a column for it)
or alone in rampart's place with
    RAMPART_BIN=target/pgo/release/rampart python3 bench/run.py --results bench/RESULTS-other.md

The profile covers the hot path only; error paths stay as the compiler laid them
out without data. Rebuild the profile after changing the code: a function whose
code changed keeps no profile data (LLVM drops it on a hash mismatch) and is built
as in a plain release build.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: tools, configs and load helpers)

ROOT = bench.ROOT
TRAIN_SECONDS = 4


def llvm_profdata() -> Path:
    """llvm-profdata from the toolchain that builds rampart (its LLVM reads the profile)."""
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], check=True, capture_output=True, text=True).stdout
    host = next(line.split()[1] for line in subprocess.run(
        ["rustc", "-vV"], check=True, capture_output=True, text=True).stdout.splitlines()
        if line.startswith("host:"))
    tool = Path(sysroot.strip()) / "lib" / "rustlib" / host / "bin" / "llvm-profdata"
    if not tool.exists():
        if shutil.which("rustup") is None:
            raise RuntimeError(f"{tool} is missing, and without rustup it cannot be added: install "
                               "llvm-profdata for this rustc's LLVM version there, or build with rustup")
        print("adding rustup's llvm-tools component ...", flush=True)
        subprocess.run(["rustup", "component", "add", "llvm-tools"], check=True)
    if not tool.exists():
        raise RuntimeError(f"{tool} not found after `rustup component add llvm-tools`")
    return tool


def cargo_build(target_dir: str, rustflags: str):
    env = {**os.environ, "RUSTFLAGS": f"{os.environ.get('RUSTFLAGS', '')} {rustflags}".strip()}
    subprocess.run(["cargo", "build", "--release", "-q", "--target-dir", target_dir], cwd=ROOT, env=env, check=True)


def train(binary: Path, run: Path):
    """The bench's loads against `binary`, then SIGTERM so that it writes its profile."""
    bench.require_free((19001, 19002, 19003, 18080))
    origin = bench.start_origins(run)
    rampart = subprocess.Popen([str(binary), "--config", str(bench.PEERS / "rampart.toml"), "--log-level", "warn"])
    try:
        for port in (19001, 19002, 19003, 18080):
            bench.wait_port(port)
        print(f"training: {bench.wrk(18080, '/', TRAIN_SECONDS):,.0f} req/s (13 B), "
              f"{bench.wrk(18080, '/64k', TRAIN_SECONDS):,.0f} req/s (64 KiB), "
              f"{bench.h2load(18080, TRAIN_SECONDS):,.0f} req/s (h2c)", flush=True)
        bench.sh(["oha", "-z", f"{TRAIN_SECONDS}s", "-c", "64", "-q", "8000", "--no-tui", "http://127.0.0.1:18080/"])
    finally:
        rampart.terminate()
        try:
            code = rampart.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rampart.kill()
            code = "killed"
        origin.terminate()
        origin.wait(timeout=10)
    if code != 0:
        raise RuntimeError(f"instrumented rampart exited with {code}: its profile may be incomplete")


def build() -> Path:
    """Builds target/pgo/release/rampart from the current tree and returns its path.
    Needs the bench's ports (19001-19003, 18080) free while it trains."""
    bench.raise_fd_limit()
    bench.ensure_tools()
    profdata_tool = llvm_profdata()
    raw = ROOT / "target" / "pgo-raw"
    shutil.rmtree(raw, ignore_errors=True)
    print("building instrumented rampart (release) ...", flush=True)
    cargo_build("target/pgo-gen", f"-Cprofile-generate={raw}")
    run = Path(tempfile.mkdtemp(prefix="rampart-pgo-"))
    os.chmod(run, 0o755)  # nginx workers run as nobody
    train(ROOT / "target" / "pgo-gen" / "release" / "rampart", run)
    time.sleep(0.2)
    if not any(raw.glob("*.profraw")):
        raise RuntimeError(f"no profile written in {raw}")
    profile = ROOT / "target" / "pgo" / "rampart.profdata"
    profile.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(profdata_tool), "merge", "-o", str(profile), str(raw)], check=True)
    print("building rampart with the profile (release) ...", flush=True)
    cargo_build("target/pgo", f"-Cprofile-use={profile}")
    out = ROOT / "target" / "pgo" / "release" / "rampart"
    print(f"done: {out.relative_to(ROOT)}", flush=True)
    return out


def main():
    build()


if __name__ == "__main__":
    sys.exit(main())
