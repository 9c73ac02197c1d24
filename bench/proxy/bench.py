"""Benchmark: the proxy against one local fake upstream, direct vs through the proxy.

    .venv/bin/python bench/proxy/bench.py [--runs 5] [--seconds 4] [--baseline DIR]

The fake upstream (tests/proxy/fakes.py) and the proxy (`python -m proxy.cli`)
each run as their own process, so the proxy's CPU time is read from
/proc/<pid>/stat (utime+stime) and its peak RSS from /proc/<pid>/status (VmHWM).
The load generator is a minimal keep-alive HTTP/1.1 client on asyncio streams
(cheaper than aiohttp's client, so it steals less CPU from the two processes it
measures); the 500-stream test uses aiohttp. Everything shares the machine's cores.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from proxy.service import free_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
KEYS = ",".join(f"sk-good-bench{i:04d}xxxxxxxxxxxx" for i in range(4))
BODY = json.dumps({"model": "gpt-fake", "messages": [{"role": "user", "content": "Hello, how are you?"}]}).encode()
STREAM_BODY = json.dumps({"model": "gpt-fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
UPSTREAM_CPU: list[float] = []  # the fake upstream's own CPU per request: what a bare aiohttp server costs here
SLOW_BODY = json.dumps({"model": "slow-stream", "stream": True, "messages": []}).encode()


# the requests come from an instance, by its own proxy key, so the proxy names the caller, holds it
# to its budget and writes a ledger row for each (the proxy closes to requests without a known key)
CALLER = "st-instance-8001"
CALLER_KEY = "cst-bench-" + "x" * 33
# a budget the benchmark never reaches, so that every request goes through admission and settlement
BUDGET = "{tokens_per_day: 1000000000000, tokens_per_month: 1000000000000, requests_per_minute: 1000000}"


def request_bytes(port: int, body: bytes) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {CALLER_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Conn:
    """One keep-alive HTTP/1.1 connection that understands Content-Length and chunked bodies."""

    def __init__(self, port: int):
        self.port = port

    async def open(self) -> "Conn":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def request(self, raw: bytes) -> tuple[int, float]:
        """Send, read the whole answer; returns (status, seconds to the first body byte)."""
        start = time.perf_counter()
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if m:
            first = await self.reader.readexactly(1)
            ttfb = time.perf_counter() - start
            await self.reader.readexactly(int(m.group(1)) - len(first))
            return status, ttfb
        ttfb = 0.0
        while True:  # chunked
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            if size and not ttfb:
                ttfb = time.perf_counter() - start
            await self.reader.readexactly(size + 2)
            if size == 0:
                return status, ttfb

    def close(self) -> None:
        self.writer.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


def peak_rss_mb(pid: int) -> float:
    m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024


async def throughput(port: int, concurrency: int, seconds: float, pid: int | None,
                     upstream_pid: int | None = None) -> tuple[float, float | None]:
    raw = request_bytes(port, BODY)
    conns = [await Conn(port).open() for _ in range(concurrency)]
    for c in conns:  # warm the connections (and the proxy's upstream pool)
        await c.request(raw)
    done = 0
    stop_at = 0.0

    async def worker(c: Conn) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            status, _ = await c.request(raw)
            assert status == 200, status
            done += 1

    cpu0 = cpu_seconds(pid) if pid else 0.0
    ucpu0 = cpu_seconds(upstream_pid) if upstream_pid else 0.0
    start = time.perf_counter()
    stop_at = start + seconds
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - start
    cpu = (cpu_seconds(pid) - cpu0) / done if pid else None
    if upstream_pid:
        UPSTREAM_CPU.append((cpu_seconds(upstream_pid) - ucpu0) / done)
    for c in conns:
        c.close()
    return done / elapsed, cpu


async def paired(direct_port: int, proxy_port: int, body: bytes, n: int, first_byte: bool) -> tuple[float, float, float]:
    """One connection each, requests alternating direct/proxy so both see the same machine noise.
    Returns medians (direct, proxy, per-pair difference) in seconds: of the whole request, or of
    the time to the first body byte when ``first_byte``."""
    raws = request_bytes(direct_port, body), request_bytes(proxy_port, body)
    conns = await Conn(direct_port).open(), await Conn(proxy_port).open()
    for _ in range(50):
        for c, raw in zip(conns, raws):
            await c.request(raw)
    direct, proxied = [], []
    for _ in range(n):
        for c, raw, out in zip(conns, raws, (direct, proxied)):
            start = time.perf_counter()
            _, ttfb = await c.request(raw)
            out.append(ttfb if first_byte else time.perf_counter() - start)
    for c in conns:
        c.close()
    diffs = [p - d for d, p in zip(direct, proxied)]
    return statistics.median(direct), statistics.median(proxied), statistics.median(diffs)


async def many_streams(port: int, n: int, gap: float, chunks: int) -> tuple[int, int]:
    """Open n slow streams at once; returns (started, flowing in a mid-stream window)."""
    last_chunk: list[float] = [0.0] * n
    started = 0
    window: list[float] = []

    async def one(i: int, http: aiohttp.ClientSession) -> None:
        nonlocal started
        async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=SLOW_BODY,
                             headers={"Content-Type": "application/json",
                                      "Authorization": f"Bearer {CALLER_KEY}"}) as resp:
            assert resp.status == 200, resp.status
            started += 1
            async for _ in resp.content.iter_any():
                last_chunk[i] = time.monotonic()

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=gap * chunks + 60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        tasks = [asyncio.create_task(one(i, http)) for i in range(n)]
        # Look in the middle of the streams: a stream is flowing if a chunk reached us in the last 2 gaps.
        await asyncio.sleep(gap * chunks / 2)
        now = time.monotonic()
        window = [t for t in last_chunk if now - t <= 2 * gap + 0.5]
        await asyncio.gather(*tasks)
    return started, len(window)


def spawn(args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def wait_http(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(url):
                    return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def start_upstream(chunks: int, gap: float) -> tuple[subprocess.Popen[bytes], int]:
    proc = spawn([sys.executable, "tests/proxy/fakes.py", "upstream", str(chunks), str(gap)])
    line = proc.stdout.readline().decode()  # type: ignore[union-attr]
    return proc, int(line.split()[1])


async def start_proxy(upstream_port: int, workdir: Path, code: Path = ROOT,
                      budget: bool = True) -> tuple[subprocess.Popen[bytes], int]:
    """The proxy of the checkout at ``code`` (this one, or a baseline to compare with; a baseline
    from before budgets existed gets ``budget=False``)."""
    port = free_port()
    keys = workdir / "state" / "secrets" / "proxy-keys"
    keys.mkdir(parents=True, mode=0o700)
    (keys / CALLER).write_text(CALLER_KEY + "\n")
    (keys / CALLER).chmod(0o600)
    path = workdir / "desired.yaml"
    path.write_text(
        "version: 1\nsettings:\n  state_dir: state\n  proxy:\n"
        f"    listen: \"127.0.0.1:{port}\"\n    upstream: \"http://127.0.0.1:{upstream_port}/v1\"\n"
        "accounts:\n  - {name: bench, provider: static, keys_env: BENCH_KEYS}\n"
        f"instances:\n  - port: 8001\n" + (f"    budget: {BUDGET}\n" if budget else ""))
    env = {**os.environ, "BENCH_KEYS": KEYS, "PYTHONPATH": str(code)}
    proc = spawn([sys.executable, "-m", "proxy.cli", "-f", str(path), "--log-level", "warning"], env, cwd=code)
    await wait_http(f"http://127.0.0.1:{port}/health")
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=15)
    return out.decode(errors="replace")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--baseline", type=Path,
                        help="another checkout (e.g. `git archive main | tar -x -C DIR`): its proxy's CPU per "
                             "request and latency are measured in the same runs, alternating with this one's")
    parser.add_argument("--baseline-without-budgets", action="store_true",
                        help="the baseline predates budgets: declare none in its file")
    args = parser.parse_args()

    gap, chunks = 0.5, 20  # the 500 slow streams each last 10 s
    upstream, up_port = start_upstream(chunks, gap)
    with tempfile.TemporaryDirectory() as tmp:
        proxy, px_port = await start_proxy(up_port, Path(tmp) / "current")
        baseline = (await start_proxy(up_port, Path(tmp) / "baseline", args.baseline,
                                      budget=not args.baseline_without_budgets) if args.baseline else None)
        base_cpu: list[float] = []
        base_rps: list[float] = []
        base_lat: list[float] = []
        try:
            direct_rps, proxy_rps, cpu = [], [], []
            lat_direct, lat_proxy, lat_added, ttfb_direct, ttfb_proxy = [], [], [], [], []
            for run in range(args.runs):
                d, _ = await throughput(up_port, args.concurrency, args.seconds, None, upstream.pid)
                p, c = await throughput(px_port, args.concurrency, args.seconds, proxy.pid)
                if baseline:
                    r, b = await throughput(baseline[1], args.concurrency, args.seconds, baseline[0].pid)
                    base_cpu.append(b)
                    base_rps.append(r)
                    print(f"run {run + 1}: baseline {r:.0f} req/s, CPU {b * 1e6:.0f} us/req; this checkout {p:.0f} req/s, "
                          f"CPU {c * 1e6:.0f} us/req", flush=True)
                direct_rps.append(d)
                proxy_rps.append(p)
                cpu.append(c)
                ld, lp, added = await paired(up_port, px_port, BODY, 1000, first_byte=False)
                if baseline:
                    _, lb, _ = await paired(up_port, baseline[1], BODY, 1000, first_byte=False)
                    base_lat.append(lb)
                td, tp, _ = await paired(up_port, px_port, STREAM_BODY, 300, first_byte=True)
                lat_direct.append(ld)
                lat_proxy.append(lp)
                lat_added.append(added)
                ttfb_direct.append(td)
                ttfb_proxy.append(tp)
                print(f"run {run + 1}: direct {d:.0f} req/s, proxy {p:.0f} req/s ({p / d:.2f}), "
                      f"CPU {c * 1e6:.0f} us/req, p50 {ld * 1e3:.3f} -> {lp * 1e3:.3f} ms (+{added * 1e3:.3f}), "
                      f"TTFB {td * 1e3:.2f} -> {tp * 1e3:.2f} ms", flush=True)
            rss_before = peak_rss_mb(proxy.pid)
            started, flowing = await many_streams(px_port, args.streams, gap, chunks)
            rss = peak_rss_mb(proxy.pid)
        finally:
            log = stop(proxy)
            if baseline:
                stop(baseline[0])
            stop(upstream)

    med = statistics.median
    ratios = [p / d for p, d in zip(proxy_rps, direct_rps)]
    print()
    print(f"requests/s at {args.concurrency} concurrent (median of {args.runs}): direct {med(direct_rps):.0f}, "
          f"proxy {med(proxy_rps):.0f}, ratio {med(ratios):.2f}")
    print(f"proxy CPU per request: {med(cpu) * 1e6:.0f} us "
          f"(for scale: the fake upstream, a bare aiohttp server, uses {med(UPSTREAM_CPU) * 1e6:.0f} us)")
    if base_cpu:
        print(f"baseline ({args.baseline}): {med(base_rps):.0f} req/s, this checkout {med(proxy_rps):.0f} req/s")
        print(f"baseline ({args.baseline}) CPU per request: {med(base_cpu) * 1e6:.0f} us; this checkout "
              f"{med(cpu) * 1e6:.0f} us ({(med(cpu) - med(base_cpu)) * 1e6:+.0f} us, "
              f"runs {' '.join(f'{(c - b) * 1e6:+.0f}' for c, b in zip(cpu, base_cpu))})")
        print(f"baseline p50 latency at 1 connection: {med(base_lat) * 1e3:.3f} ms; this checkout "
              f"{med(lat_proxy) * 1e3:.3f} ms")
    print(f"p50 latency at 1 connection: direct {med(lat_direct) * 1e3:.3f} ms, proxy {med(lat_proxy) * 1e3:.3f} ms, "
          f"added {med(lat_added) * 1e3:.3f} ms (median of per-pair differences)")
    print(f"stream time to first byte: direct {med(ttfb_direct) * 1e3:.2f} ms, proxy {med(ttfb_proxy) * 1e3:.2f} ms")
    print(f"{args.streams} concurrent streams: {started} started, {flowing} flowing mid-stream; "
          f"proxy peak RSS {rss:.1f} MB (before the streams: {rss_before:.1f} MB)")
    if log.strip():
        print("\nproxy log:\n" + log[-2000:])


if __name__ == "__main__":
    asyncio.run(main())
