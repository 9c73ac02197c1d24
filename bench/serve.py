"""Figures for `cst serve`, on the stand-in server so they measure CST, not SillyTavern.

- save -> answering: desired.yaml gains an instance (saved atomically, as an editor does);
  time until its port answers HTTP.
- kill -9 -> answering: an instance is killed; time until its port answers again.
- GET /api/instances with 50 instances: requests per second from a local aiohttp client
  (16 connections), and the median latency at one connection.

Run: ``.venv/bin/python bench/serve.py [--runs N]``. Medians of N runs; every process
started here is killed (by pid) before it exits.
"""
from __future__ import annotations

import argparse
import asyncio
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

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "standin" / "server.js"
KEY = "bench-admin-key"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def wait(predicate, timeout: float = 60, interval: float = 0.002) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if predicate():
            return time.perf_counter() - start
        time.sleep(interval)
    raise TimeoutError


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(".desired.yaml.new")
    tmp.write_text(text)
    os.replace(tmp, path)


def fleet(api: int, ports: list[int], resync: str) -> str:
    body = "".join(f"  - port: {p}\n" for p in ports)
    return (f"version: 1\nsettings:\n  resync: {resync}\n  concurrency: 8\n"
            f"  sillytavern: {{server: {STANDIN}}}\n  api: {{listen: \"127.0.0.1:{api}\"}}\n"
            f"instances:\n{body if ports else '  []'}\n").replace("instances:\n  []", "instances: []")


class Daemon:
    def __init__(self, folder: Path, api: int):
        self.folder, self.api = folder, api
        env = {**os.environ, "CST_ADMIN_KEY": KEY}
        self.proc = subprocess.Popen([sys.executable, "-m", "reconciler", "serve", "-f", "desired.yaml"],
                                     cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(lambda: answers(api), timeout=30)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("CST_STATE_DIR") == str((self.folder / ".cst").resolve()):
                    os.killpg(proc.pid, signal.SIGKILL)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue


def record_pid(folder: Path, port: int) -> int:
    import json
    return json.loads((folder / ".cst" / "instances" / f"st-instance-{port}.json").read_text())["pid"]


def bench_save_and_kill(runs: int) -> tuple[list[float], list[float]]:
    folder = Path(tempfile.mkdtemp(prefix="cst-bench-serve-"))
    api, *ports = free_ports(runs + 1)
    (folder / "desired.yaml").write_text(fleet(api, [], "60s"))
    daemon = Daemon(folder, api)
    saves, kills = [], []
    try:
        declared: list[int] = []
        for port in ports:
            declared.append(port)
            start = time.perf_counter()
            write_atomically(folder / "desired.yaml", fleet(api, declared, "60s"))
            wait(lambda port=port: answers(port))
            saves.append(time.perf_counter() - start)
        for port in ports:
            wait(lambda port=port: (folder / ".cst" / "instances" / f"st-instance-{port}.json").exists())
            pid = record_pid(folder, port)
            start = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            wait(lambda port=port: not answers(port), timeout=5)
            wait(lambda port=port: answers(port))
            kills.append(time.perf_counter() - start)
    finally:
        daemon.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return saves, kills


async def _load(url: str, seconds: float, connections: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    done = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, headers={"X-ST-Admin-Key": KEY}) as session:
        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                async with session.get(url) as response:
                    assert response.status == 200
                    await response.read()
                latencies.append(time.perf_counter() - start)
                done += 1
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        return done / (time.perf_counter() - start), latencies


def bench_api(runs: int) -> tuple[list[float], list[float]]:
    folder = Path(tempfile.mkdtemp(prefix="cst-bench-api-"))
    api, *ports = free_ports(51)
    (folder / "desired.yaml").write_text(fleet(api, ports, "60s"))
    daemon = Daemon(folder, api)
    try:
        wait(lambda: all(answers(p) for p in ports), timeout=120)
        url = f"http://127.0.0.1:{api}/api/instances"
        rates, p50s = [], []
        for _ in range(runs):
            rate, _ = asyncio.run(_load(url, 3.0, 16))
            rates.append(rate)
            _, single = asyncio.run(_load(url, 2.0, 1))
            p50s.append(statistics.median(single) * 1000)
        return rates, p50s
    finally:
        daemon.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    saves, kills = bench_save_and_kill(args.runs)
    rates, p50s = bench_api(args.runs)
    ms = lambda xs: f"{statistics.median(xs) * 1000:.0f} ms (min {min(xs) * 1000:.0f}, max {max(xs) * 1000:.0f})"  # noqa: E731
    print("| figure | median | how |\n|---|---|---|")
    print(f"| save desired.yaml -> new instance answers | {ms(saves)} | {len(saves)} instances added one by one, stand-in server |")
    print(f"| kill -9 -> instance answers again | {ms(kills)} | {len(kills)} kills, resync 60 s: the exit watch repairs it |")
    print(f"| GET /api/instances, 50 instances, 16 connections | {statistics.median(rates):.0f} req/s | {args.runs} runs of 3 s |")
    print(f"| GET /api/instances, 50 instances, 1 connection | {statistics.median(p50s):.1f} ms p50 | {args.runs} runs of 2 s |")


if __name__ == "__main__":
    main()
