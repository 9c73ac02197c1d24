"""`cst serve` and the proxy under load: the figures of "never blocks, never hangs a caller".

    .venv/bin/python bench/load.py [--only latency,api,streams,instances] [--runs 3] [--seconds 60]
                                   [--baseline DIR]

* latency: chat requests through the proxy inside `cst serve` (a fake upstream, 16 keep-alive
  connections, each paced at 25 requests/s), p50/p99 while idle, and while the daemon starts and
  removes 20 stand-in instances over and over and GET /api/instances is called 50 times a second.
  Between the two, a control: the same 20 stand-ins started and stopped by this script instead,
  with the same listings, which is what starting node processes costs this machine whoever does
  it. Goal: p99 under load within 2x of idle. Medians of --runs runs; each phase --phase-seconds.
  With --pin, every node process runs on CPU 1 (through a `node` on PATH that runs
  `taskset -c 1 node`) and the measured path (this script, the fake upstream, cst serve) on
  CPU 0: what is left between idle and loaded is then what cst serve's own work costs its proxy.
  With --baseline DIR (another checkout, e.g. `git archive main | tar -x -C DIR`), its `cst serve`
  is measured too, run for run in turn with this one.
* api: 200 concurrent clients for --seconds against the REST API (listings, status, a no-op start
  that waits for a pass) while an editor saves desired.yaml every half second. Goal: no errors.
* streams: `cst proxy` relaying 1,000 concurrent streams for --seconds (each 20 events 0.5 s apart,
  then another) against the fake upstream, 10 % of the keys failing (HTTP 500). Streams cut by
  CST (goal: none) and the proxy's RSS in the first and the last 10 s (goal: flat).
* instances: 200 stand-in instances declared in one save: time until all answer, peak CPU (of one
  core) and peak RSS of the `cst serve` process.

Every process started here is stopped (by pid, and instances by the state-dir marker in their
environment) before it exits. Stand-in servers (tests/standin/server.js) keep SillyTavern out of it.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(HERE / "proxy")]
from serve import answers, free_ports, wait  # noqa: E402  (bench/serve.py)

import bench as proxy_bench  # noqa: E402  (bench/proxy/bench.py: the keep-alive client, the fake upstream)

STANDIN = ROOT / "tests" / "standin" / "server.js"
KEY = "bench-admin-key"
GOOD_KEYS = [f"sk-good-load{i:04d}xxxxxxxxxxxx" for i in range(18)]
FAILING_KEYS = [f"sk-500-load{i:04d}xxxxxxxxxxxx" for i in range(2)]  # 10 % of the keys answer 500


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def ms(value: float) -> str:
    return f"{value * 1000:.2f} ms"


def node_on_cpu1(folder: Path) -> Path:
    """A folder holding a `node` that runs the real one on CPU 1."""
    shim = folder / "pinned-bin"
    shim.mkdir(exist_ok=True)
    (shim / "node").write_text(f"#!/bin/sh\nexec taskset -c 1 {shutil.which('node')} \"$@\"\n")
    (shim / "node").chmod(0o755)
    return shim


class Serve:
    """`cst serve` in a temporary folder, with its proxy pointed at the fake upstream."""

    def __init__(self, upstream_port: int, instances: list[int] = (), resync: str = "10s",
                 code: Path | None = None, pin: bool = False):
        self.folder = Path(tempfile.mkdtemp(prefix="cst-bench-load-"))
        self.api, self.proxy = free_ports(2)
        self.resync = resync
        self.upstream_port = upstream_port
        self.write(instances)
        env = {**os.environ, "CST_ADMIN_KEY": KEY, "BENCH_KEYS": ",".join(GOOD_KEYS)}
        if code is not None:  # run another checkout's cst
            env["PYTHONPATH"] = str(code)
        if pin:  # cst serve on CPU 0; the node it starts goes to CPU 1
            env["PATH"] = f"{node_on_cpu1(self.folder)}{os.pathsep}{env['PATH']}"
        self.log = open(self.folder / "serve.log", "wb")  # noqa: SIM115 -- serve's stdout while it runs, closed after
        self.proc = subprocess.Popen([sys.executable, "-m", "reconciler", "serve", "-f", "desired.yaml"],
                                     cwd=self.folder, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if pin else None)
        wait(lambda: answers(self.api), timeout=30)

    def text(self, instances: list[int], comment: str = "") -> str:
        body = "".join(f"  - port: {p}\n" for p in instances)
        return (f"version: 1\n{comment}settings:\n  resync: {self.resync}\n  concurrency: 8\n"
                f"  sillytavern: {{server: {STANDIN}, start_timeout: 60}}\n"
                f"  api: {{listen: \"127.0.0.1:{self.api}\"}}\n"
                f"  proxy: {{listen: \"127.0.0.1:{self.proxy}\", upstream: \"http://127.0.0.1:{self.upstream_port}/v1\"}}\n"
                "accounts:\n  - {name: bench, provider: static, keys_env: BENCH_KEYS}\n"
                + (f"instances:\n{body}" if instances else "instances: []\n"))

    def write(self, instances: list[int], comment: str = "") -> None:
        """Save as an editor does: a new file renamed over the old one."""
        tmp = self.folder / ".desired.yaml.new"
        tmp.write_text(self.text(instances, comment))
        os.replace(tmp, self.folder / "desired.yaml")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        marker = str((self.folder / ".cst").resolve())
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("CST_STATE_DIR") == marker:
                    os.killpg(proc.pid, signal.SIGKILL)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        shutil.rmtree(self.folder, ignore_errors=True)


# -- latency of the proxy inside cst serve, idle and while the daemon works

async def paced_chat(port: int, seconds: float, connections: int = 16, rate: float = 25.0) -> list[float]:
    """Latencies of non-streaming chat requests: each connection sends one every 1/rate s."""
    raw = proxy_bench.request_bytes(port, proxy_bench.BODY)
    conns = [await proxy_bench.Conn(port).open() for _ in range(connections)]
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker(conn, offset: float) -> None:
        next_at = time.perf_counter() + offset
        while next_at < stop_at:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            start = time.perf_counter()
            status, _ = await conn.request(raw)
            assert status == 200, status
            latencies.append(time.perf_counter() - start)
            next_at += 1 / rate

    await asyncio.gather(*(worker(c, i / (rate * connections)) for i, c in enumerate(conns)))
    for c in conns:
        c.close()
    return latencies


async def list_instances(api: int, stop: asyncio.Event, per_second: float = 50.0) -> int:
    done = 0
    async with aiohttp.ClientSession(headers={"X-ST-Admin-Key": KEY}) as http:
        next_at = time.perf_counter()
        while not stop.is_set():
            async with http.get(f"http://127.0.0.1:{api}/api/instances") as resp:
                assert resp.status == 200, resp.status
                await resp.read()
            done += 1
            next_at += 1 / per_second
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    return done


async def churn(serve: Serve, ports: list[int], stop: asyncio.Event) -> int:
    """Declare the instances, wait until they answer, remove them, wait until they are gone; again."""
    cycles = 0
    while not stop.is_set():
        serve.write(ports)
        await asyncio.to_thread(wait, lambda: all(answers(p) for p in ports), 60, 0.01)
        serve.write([])
        await asyncio.to_thread(wait, lambda: not any(answers(p) for p in ports), 60, 0.01)
        cycles += 1
    return cycles


async def churn_without_cst(folder: Path, ports: list[int], stop: asyncio.Event) -> int:
    """The same starts and stops of 20 stand-ins, done by this script: the machine's share of the load."""
    cycles = 0
    while not stop.is_set():
        procs = [subprocess.Popen(["node", str(STANDIN), "--port", str(p), "--dataRoot", str(folder / str(p)),
                                   "--listen", "true", "--listenAddressIPv4", "127.0.0.1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in ports]
        await asyncio.to_thread(wait, lambda: all(answers(p) for p in ports), 60, 0.01)
        for proc in procs:
            proc.terminate()
        await asyncio.to_thread(lambda: [proc.wait() for proc in procs])
        cycles += 1
    return cycles


async def latency_run(seconds: float, code: Path | None, pin: bool) -> dict[str, tuple[list[float], float, int]]:
    """Chat latencies in three phases: idle; stand-ins churned by this script while the API is
    listed 50 times a second (what the machine costs); the same churn done by cst serve."""
    upstream, upstream_port = proxy_bench.start_upstream(5, 0.2)
    if pin:
        os.sched_setaffinity(upstream.pid, {0})
    serve = Serve(upstream_port, code=code, pin=pin)
    phases: dict[str, tuple[list[float], float, int]] = {}
    try:
        await paced_chat(serve.proxy, 1.0)  # warm the connections and the proxy's upstream pool
        phases["idle"] = (await paced_chat(serve.proxy, seconds), 0.0, 0)
        for phase, churner in (("churn by a script", lambda stop: churn_without_cst(serve.folder, free_ports(20), stop)),
                               ("churn by cst serve", lambda stop: churn(serve, free_ports(20), stop))):
            stop = asyncio.Event()
            background = [asyncio.create_task(list_instances(serve.api, stop)), asyncio.create_task(churner(stop))]
            latencies = await paced_chat(serve.proxy, seconds)
            stop.set()
            listings, cycles = await asyncio.gather(*background)
            phases[phase] = (latencies, listings / seconds, cycles)
        return phases
    finally:
        serve.stop()
        upstream.kill()
        upstream.wait()


def bench_latency(runs: int, seconds: float, baseline: Path | None, pin: bool) -> None:
    shims = Path(tempfile.mkdtemp(prefix="cst-bench-pin-"))
    try:
        if pin:  # this script on CPU 0; the node processes of the control go through the same `node` on CPU 1
            os.sched_setaffinity(0, {0})
            os.environ["PATH"] = f"{node_on_cpu1(shims)}{os.pathsep}{os.environ['PATH']}"
        latency_table(runs, seconds, baseline, pin)
    finally:
        shutil.rmtree(shims, ignore_errors=True)


def latency_table(runs: int, seconds: float, baseline: Path | None, pin: bool) -> None:
    sides = {"this checkout": None, **({f"baseline {baseline}": baseline} if baseline else {})}
    rows: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(runs):
        for name, code in sides.items():  # in turn, so both see the same machine
            phases = asyncio.run(latency_run(seconds, code, pin))
            rows[name].append(phases)
            print(f"  {name}: " + " | ".join(
                f"{phase} p50 {ms(statistics.median(lat))} p99 {ms(percentile(lat, 99))}"
                + (f" ({rate:.0f} listings/s, {cycles} cycles)" if cycles else "")
                for phase, (lat, rate, cycles) in phases.items()), flush=True)
    for name in sides:
        def med(phase: str, figure) -> float:
            return statistics.median(figure(run[phase]) for run in rows[name])
        idle99 = med("idle", lambda p: percentile(p[0], 99))
        for phase in rows[name][0]:
            p50, p99 = med(phase, lambda p: statistics.median(p[0])), med(phase, lambda p: percentile(p[0], 99))
            extra = "" if phase == "idle" else (f", {med(phase, lambda p: p[2]):.0f} cycles of 20 starts and stops, "
                                                f"GET /api/instances {med(phase, lambda p: p[1]):.0f}/s")
            print(f"| {name}: proxy chat, 16 connections at 25 req/s each, {phase}{extra} | "
                  f"p50 {ms(p50)}, p99 {ms(p99)} ({p99 / idle99:.1f}x idle p99) |")


# -- the REST API under 200 clients while the file is edited

async def api_clients(serve: Serve, ports: list[int], clients: int, seconds: float) -> tuple[dict, list[str]]:
    latencies: dict[str, list[float]] = {"list": [], "status": [], "start": []}
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds
    base = f"http://127.0.0.1:{serve.api}"
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers={"X-ST-Admin-Key": KEY}) as http:
        async def client(rng: random.Random) -> None:
            while time.perf_counter() < stop_at:
                roll = rng.random()
                if roll < 0.7:
                    kind, method, path = "list", "GET", "/api/instances"
                elif roll < 0.9:
                    kind, method, path = "status", "GET", "/api/status"
                else:  # already running: no edit, but it waits for a pass that started after it
                    kind, method, path = "start", "POST", f"/api/instances/st-instance-{rng.choice(ports)}/start"
                start = time.perf_counter()
                try:
                    async with http.request(method, base + path) as resp:
                        await resp.read()
                        if resp.status >= 400:
                            errors.append(f"{method} {path}: {resp.status} {(await resp.text())[:200]}")
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    errors.append(f"{method} {path}: {type(exc).__name__} {exc}")
                latencies[kind].append(time.perf_counter() - start)

        async def editor() -> int:
            saves = 0
            while time.perf_counter() < stop_at:
                serve.write(ports, comment=f"# edit {saves}\n")
                saves += 1
                await asyncio.sleep(0.5)
            return saves

        saved = asyncio.create_task(editor())
        await asyncio.gather(*(client(random.Random(i)) for i in range(clients)))
        latencies["saves"] = [await saved]
    return latencies, errors


def bench_api(seconds: float, clients: int = 200) -> None:
    upstream, upstream_port = proxy_bench.start_upstream(5, 0.2)
    ports = free_ports(10)
    serve = Serve(upstream_port, ports, resync="1s")
    try:
        wait(lambda: all(answers(p) for p in ports), timeout=60)
        latencies, errors = asyncio.run(api_clients(serve, ports, clients, seconds))
    finally:
        serve.stop()
        upstream.kill()
        upstream.wait()
    every = latencies["list"] + latencies["status"] + latencies["start"]
    print(f"| REST API, {clients} clients for {seconds:.0f} s, desired.yaml saved {latencies['saves'][0]} times "
          f"| {len(every)} requests ({len(every) / seconds:.0f}/s), {len(errors)} errors, "
          f"p50 {ms(statistics.median(every))}, p99 {ms(percentile(every, 99))} |")
    for kind in ("list", "status", "start"):
        values = latencies[kind]
        print(f"|   {kind}: {len(values)} | p50 {ms(statistics.median(values))}, p99 {ms(percentile(values, 99))} |")
    for error in errors[:10]:
        print("    error:", error)


# -- 1,000 concurrent streams for a minute

async def stream_clients(port: int, clients: int, seconds: float, rss: list[tuple[float, float]],
                         proxy_pid: int) -> tuple[int, int, list[str]]:
    done = cut = 0
    problems: list[str] = []
    stop_at = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)

    async def sample() -> None:
        process = psutil.Process(proxy_pid)
        start = time.perf_counter()
        while time.perf_counter() < stop_at:
            rss.append((time.perf_counter() - start, process.memory_info().rss / 2**20))
            await asyncio.sleep(1.0)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        async def client() -> None:
            nonlocal done, cut
            while time.perf_counter() < stop_at:
                try:
                    async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=proxy_bench.SLOW_BODY,
                                         headers={"Content-Type": "application/json"}) as resp:
                        body = await resp.read()
                        if resp.status != 200 or not body.rstrip().endswith(b"data: [DONE]"):
                            cut += 1
                            problems.append(f"{resp.status} {body[-120:]!r}")
                            continue
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    cut += 1
                    problems.append(f"{type(exc).__name__}: {exc}")
                    continue
                done += 1

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(client() for _ in range(clients)))
        await sampler
    return done, cut, problems


def bench_streams(seconds: float, clients: int = 1000) -> None:
    upstream, upstream_port = proxy_bench.start_upstream(20, 0.5)
    folder = Path(tempfile.mkdtemp(prefix="cst-bench-streams-"))
    (port,) = free_ports(1)
    (folder / "desired.yaml").write_text(
        "version: 1\nsettings:\n  state_dir: state\n  proxy:\n"
        f"    listen: \"127.0.0.1:{port}\"\n    upstream: \"http://127.0.0.1:{upstream_port}/v1\"\n"
        "accounts:\n  - {name: bench, provider: static, keys_env: BENCH_KEYS}\n")
    keys = GOOD_KEYS + FAILING_KEYS
    env = {**os.environ, "BENCH_KEYS": ",".join(keys)}
    proxy = subprocess.Popen([sys.executable, "-m", "proxy.cli", "-f", str(folder / "desired.yaml"),
                              "--log-level", "warning"], cwd=ROOT, env=env,
                             stdout=open(folder / "proxy.log", "wb"),  # noqa: SIM115 -- the proxy's stdout for its life
                             stderr=subprocess.STDOUT)
    rss: list[tuple[float, float]] = []
    try:
        wait(lambda: answers(port), timeout=30)
        done, cut, problems = asyncio.run(stream_clients(port, clients, seconds, rss, proxy.pid))
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(30)
        upstream.kill()
        upstream.wait()
        shutil.rmtree(folder, ignore_errors=True)
    first = [mb for t, mb in rss if t < 10]
    last = [mb for t, mb in rss if t >= rss[-1][0] - 10]
    print(f"| proxy, {clients} concurrent streams for {seconds:.0f} s, {len(FAILING_KEYS)} of {len(keys)} keys "
          f"answering 500 | {done} streams complete, {cut} cut; RSS {statistics.mean(first):.1f} MiB "
          f"in the first 10 s, {statistics.mean(last):.1f} MiB in the last 10 s (peak {max(mb for _, mb in rss):.1f}) |")
    for problem in problems[:10]:
        print("    cut:", problem)


# -- 200 instances declared at once

def bench_instances(count: int = 200) -> None:
    upstream, upstream_port = proxy_bench.start_upstream(5, 0.2)
    serve = Serve(upstream_port)
    ports = free_ports(count)
    process = psutil.Process(serve.proc.pid)
    peak_cpu = peak_rss = 0.0
    try:
        process.cpu_percent()
        cpu0 = sum(process.cpu_times()[:2])
        start = time.perf_counter()
        serve.write(ports)
        pending = set(ports)
        while pending:
            pending = {p for p in pending if not answers(p)}
            peak_cpu = max(peak_cpu, process.cpu_percent())
            peak_rss = max(peak_rss, process.memory_info().rss / 2**20)
            if time.perf_counter() - start > 600:
                raise TimeoutError(f"{len(pending)} instances did not answer in 10 minutes")
            time.sleep(0.25)
        took = time.perf_counter() - start
        cpu = sum(process.cpu_times()[:2]) - cpu0
    finally:
        serve.stop()
        upstream.kill()
        upstream.wait()
    print(f"| {count} stand-in instances declared in one save | all answer after {took:.1f} s; cst serve used "
          f"{cpu:.1f} s of CPU, peak {peak_cpu:.0f} % of a core (0.25 s samples), peak RSS {peak_rss:.0f} MiB |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="latency,api,streams,instances")
    parser.add_argument("--runs", type=int, default=3, help="latency: runs (medians are reported)")
    parser.add_argument("--phase-seconds", type=float, default=15, help="latency: length of each phase")
    parser.add_argument("--seconds", type=float, default=60, help="api and streams: length")
    parser.add_argument("--baseline", type=Path, help="latency: also measure the cst in this folder")
    parser.add_argument("--pin", action="store_true", help="latency: cst serve alone on CPU 0, the rest on CPU 1")
    args = parser.parse_args()
    chosen = args.only.split(",")
    print("| figure | value |\n|---|---|", flush=True)
    if "latency" in chosen:
        bench_latency(args.runs, args.phase_seconds, args.baseline, args.pin)
    if "api" in chosen:
        bench_api(args.seconds)
    if "streams" in chosen:
        bench_streams(args.seconds)
    if "instances" in chosen:
        bench_instances()


if __name__ == "__main__":
    main()
