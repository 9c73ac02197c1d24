"""What the sandbox costs (issue 25), side by side with instances outside one, on the real SillyTavern 1.19.0.

Two fleets of one instance each, alike but for ``settings.sillytavern.sandbox.enabled``, measured
in turns (with, without, with, ...) so the machine's noise falls on both:

1. start: ``cst apply`` taking the instance from stopped to answering its health route (the
   command's whole run, Python's start included on both sides), p50 and p99 of --runs;
2. wake: under ``cst serve`` with ``park_after``, the instance parked through the API, then the
   first byte of a request through the edge, p50 and p99 of --runs;
3. memory of the idle instance, its page fetched, 15 s after: RSS of node's tree (what
   ``max_memory`` and the rows count), and of the sandbox's own processes (bwrap and its init),
   medians of 3.

Run as root (each instance under its own uid in both fleets):

    CST_SILLYTAVERN_HOME=.cache/sillytavern .venv/bin/python bench/sandbox.py --runs 10
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import httpx
import psutil
from density import Fleet, free_ports, tree_rss, wait

MiB = 2 ** 20
MODES = {"sandbox": "", "no sandbox": ", sandbox: {enabled: false}"}


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def health(port: int, password: str) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/plugins/cst/health", auth=(f"st-instance-{port}", password),
                         timeout=120).status_code
    except httpx.HTTPError:
        return 0


def set_state(fleet: Fleet, port: int, state: str) -> None:
    text = fleet.file.read_text().replace("state: running", "").replace("state: stopped", "")
    fleet.file.write_text(text.replace(f"  - port: {port}\n", f"  - port: {port}\n    state: {state}\n"))


def starts(fleets: dict[str, tuple[Fleet, int]], runs: int) -> dict[str, list[float]]:
    took: dict[str, list[float]] = {mode: [] for mode in fleets}
    for _ in range(runs):
        for mode, (fleet, port) in fleets.items():
            set_state(fleet, port, "stopped")
            assert fleet.cst("apply").returncode == 0
            set_state(fleet, port, "running")
            began = time.perf_counter()
            applied = fleet.cst("apply")
            took[mode].append(time.perf_counter() - began)
            assert applied.returncode == 0 and "(started)" in applied.stdout, applied.stdout + applied.stderr
    return took


def wakes(fleets: dict[str, tuple[Fleet, int]], runs: int) -> dict[str, list[float]]:
    took: dict[str, list[float]] = {mode: [] for mode in fleets}
    for fleet, _ in fleets.values():   # behind the edge, parked until asked
        fleet.file.write_text(fleet.file.read_text().replace("start_timeout: 300", "start_timeout: 300, park_after: 1h"))
        fleet.start_serve()
    for fleet, port in fleets.values():
        wait(lambda fleet=fleet, port=port: port in [row["port"] for row in fleet.rows().values()], 120, "cst serve")
    for _ in range(runs):
        for mode, (fleet, port) in fleets.items():
            parked = fleet.api_call("POST", f"/api/instances/st-instance-{port}/park")
            assert parked.status_code == 200, parked.text
            wait(lambda fleet=fleet, port=port: fleet.rows()[f"st-instance-{port}"]["observed"] == "parked", 60, "park")
            began = time.perf_counter()
            with httpx.stream("GET", f"http://127.0.0.1:{port}/api/plugins/cst/health",
                              auth=(f"st-instance-{port}", fleet.password(port)), timeout=300) as answer:
                next(answer.iter_raw())
                took[mode].append(time.perf_counter() - began)
                assert answer.status_code == 200
    return took


def memory(fleets: dict[str, tuple[Fleet, int]]) -> dict[str, tuple[int, int]]:
    """(node's tree, the sandbox's own processes) in bytes, 15 s after the page was fetched."""
    for fleet, port in fleets.values():
        httpx.get(f"http://127.0.0.1:{port}/", auth=(f"st-instance-{port}", fleet.password(port)), timeout=120)
    time.sleep(15)
    found = {}
    for mode, (fleet, port) in fleets.items():
        node = psutil.Process(fleet.record(port)["pid"])
        wrappers = [proc for proc in node.parents() if proc.name() == "bwrap"]
        found[mode] = (tree_rss(node.pid), sum(proc.memory_info().rss for proc in wrappers))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the sandbox with a uid per instance is root's")
    fleets: dict[str, tuple[Fleet, int]] = {}
    try:
        for mode, setting in MODES.items():
            (port,) = free_ports(1)
            fleets[mode] = (Fleet([port], f'version: "1.19.0", start_timeout: 300{setting}'), port)
        for fleet, _ in fleets.values():
            installed = fleet.cst("st", "install")
            assert installed.returncode == 0, installed.stdout + installed.stderr
        took = starts(fleets, args.runs)
        for mode, values in took.items():
            print(f"start ({mode}): p50 {p(values, 0.5):.2f} s, p99 {p(values, 0.99):.2f} s (n={len(values)})", flush=True)
        woke = wakes(fleets, args.runs)
        for mode, values in woke.items():
            print(f"wake ({mode}): p50 {p(values, 0.5):.2f} s, p99 {p(values, 0.99):.2f} s (n={len(values)})", flush=True)
        samples: dict[str, list[tuple[int, int]]] = {mode: [] for mode in fleets}
        for _ in range(3):
            for mode, figures in memory(fleets).items():
                samples[mode].append(figures)
        for mode, figures in samples.items():
            node = statistics.median(n for n, _ in figures) / MiB
            wrap = statistics.median(w for _, w in figures) / MiB
            print(f"idle RSS ({mode}): node's tree {node:.0f} MiB, the sandbox's own processes {wrap:.1f} MiB", flush=True)
    finally:
        for fleet, _ in fleets.values():
            fleet.close()


if __name__ == "__main__":
    main()
