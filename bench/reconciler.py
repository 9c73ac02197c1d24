"""Figures for the reconciler: plan time, no-op apply, SillyTavern start times, idle RSS.

Run with ``make bench`` (or ``.venv/bin/python bench/reconciler.py [--runs N] [--skip-real]``).
Each figure is the median of several runs on this machine, printed as a table. Every process
started here is killed (by pid) before the script exits.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reconciler.engine.plan import Observed, Target, plan  # noqa: E402
from reconciler.runtime import sillytavern  # noqa: E402

STANDIN = ROOT / "tests" / "standin" / "server.js"
VERSION = "1.19.0"


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def kill_state_dir(state_dir: Path) -> None:
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("CST_STATE_DIR") == str(state_dir):
                os.killpg(proc.pid, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue


def bench_plan(runs: int) -> float:
    """Milliseconds for plan() over 1,000 declared instances in a mix of states."""
    targets = [Target(f"st-instance-{p}", p, "running" if p % 3 else "stopped", "fp") for p in range(10000, 11000)]
    kinds = ["running", "stopped", "crashed"]
    observed = {f"st-instance-{p}": Observed(f"st-instance-{p}", p, kinds[p % 3], 1, "fp" if p % 7 else "old")
                for p in range(10000, 11000)}
    times = []
    for _ in range(runs * 20):
        start = time.perf_counter()
        plan(targets, observed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def cst(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], cwd=cwd, capture_output=True, text=True)


def bench_noop_apply(runs: int) -> tuple[float, str]:
    """Seconds for a whole `cst apply` command with 50 stand-in instances already running."""
    work = Path(tempfile.mkdtemp(prefix="cst-bench-"))
    ports = free_ports(50)
    body = "".join(f"  - port: {p}\n" for p in ports)
    (work / "desired.yaml").write_text(
        f"version: 1\nsettings:\n  concurrency: 8\n  sillytavern: {{server: {STANDIN}}}\ninstances:\n{body}")
    try:
        first = cst("apply", "-f", "desired.yaml", cwd=work)
        assert first.stdout.strip().endswith("ok=0 changed=50 failed=0"), first.stdout + first.stderr
        times, last = [], ""
        for _ in range(runs):
            start = time.perf_counter()
            result = cst("apply", "-f", "desired.yaml", cwd=work)
            times.append(time.perf_counter() - start)
            last = result.stdout.strip().splitlines()[-1]
        start = time.perf_counter()
        cst("validate", "-f", "desired.yaml", cwd=work)
        floor = time.perf_counter() - start
        return statistics.median(times), f"{last}; `cst validate` alone (interpreter + imports): {floor:.2f} s"
    finally:
        kill_state_dir((work / ".cst").resolve())
        shutil.rmtree(work, ignore_errors=True)


def wait_http(port: int, timeout: float = 240) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return time.perf_counter() - start
        except urllib.error.HTTPError:
            return time.perf_counter() - start
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise TimeoutError(port)


def bench_real(runs: int) -> dict[str, float]:
    """Start times of the real SillyTavern, and the RSS of one idle instance."""
    home = ROOT / ".cache" / "sillytavern"
    os.environ.setdefault("CST_SILLYTAVERN_HOME", str(home))
    rel, _ = sillytavern.install(VERSION, ROOT / ".cache")
    node = shutil.which("node")
    figures: dict[str, list[float]] = {"no_prefill": [], "cold": [], "warm": [], "rss": []}

    def launch(port: int, data: Path, workdir: Path, server_js: Path = rel.server_js) -> subprocess.Popen:
        workdir.mkdir(parents=True, exist_ok=True)
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
               "SILLYTAVERN_BASICAUTHUSER_USERNAME": "bench", "SILLYTAVERN_BASICAUTHUSER_PASSWORD": "bench"}
        argv = [node, str(server_js), "--port", str(port), "--dataRoot", str(data),
                "--configPath", str(workdir / "config.yaml"), "--listen", "true",
                "--listenAddressIPv4", "127.0.0.1", "--whitelist", "false", "--basicAuthMode", "true",
                "--browserLaunchEnabled", "false"]
        return subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    # "before": a copy of the package without the prebuilt front end, beside the original so that
    # its dependencies still resolve (SillyTavern reads the build from its own package dir)
    cold = rel.package_dir.parent / f".cst-bench-cold-{os.getpid()}"
    shutil.copytree(rel.package_dir, cold, ignore=shutil.ignore_patterns("dist"))
    try:
        for _ in range(runs):
            work = Path(tempfile.mkdtemp(prefix="cst-bench-st-"))
            try:
                (port,) = free_ports(1)
                shutil.rmtree(cold / "dist", ignore_errors=True)
                proc = launch(port, work / "u-data", work / "u-run", cold / "server.js")
                figures["no_prefill"].append(wait_http(port))
                stop(proc)
                # after: a new instance of the install, with its prebuilt front end, as cst runs it
                sillytavern.prefill_webpack_cache(rel, work / "data")
                proc = launch(port, work / "data", work / "run")
                figures["cold"].append(wait_http(port))
                stop(proc)
                # warm: the same instance started again
                proc = launch(port, work / "data", work / "run")
                figures["warm"].append(wait_http(port))
                time.sleep(5)  # let start-up work settle before reading the idle footprint
                p = psutil.Process(proc.pid)
                figures["rss"].append(sum(c.memory_info().rss for c in [p, *p.children(recursive=True)]) / 2**20)
                stop(proc)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(cold, ignore_errors=True)
    return {k: statistics.median(v) for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-real", action="store_true", help="skip the real SillyTavern figures")
    args = parser.parse_args()
    rows = [("plan() for 1,000 declared instances", f"{bench_plan(args.runs):.2f} ms", "median of 100 calls")]
    noop, note = bench_noop_apply(args.runs)
    rows.append(("no-op `cst apply`, 50 running instances", f"{noop:.2f} s", f"median of {args.runs}; {note}"))
    if not args.skip_real:
        real = bench_real(max(1, min(args.runs, 3)))
        n = max(1, min(args.runs, 3))
        rows += [
            ("new instance, no prebuilt front end (without cst's prebuild)", f"{real['no_prefill']:.1f} s", f"median of {n}; port answers"),
            ("new instance, prebuilt front end prefilled (cold start)", f"{real['cold']:.1f} s", f"median of {n}; port answers"),
            ("existing instance started again (warm start)", f"{real['warm']:.1f} s", f"median of {n}; port answers"),
            ("RSS of one idle instance", f"{real['rss']:.0f} MiB", f"median of {n}; 5 s after it answered"),
        ]
    print("| figure | value | how |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
