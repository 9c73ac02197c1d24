"""Benchmark: CST's proxy side by side with nginx, both relaying to one local fake upstream, in one run.

    .venv/bin/python bench/proxy/bench.py [--runs 5] [--seconds 4] [--modes anonymous,budget,large,postgres]
                                          [--streams 2000] [--baseline DIR [--baseline-mode budget]]

Every relay runs as its own process next to the fake upstream (tests/proxy/fakes.py) and to the load
generator (this process): Debian's nginx (``worker_processes 1``, a plain reverse proxy with an
``upstream {}`` block kept alive, ``proxy_buffering off`` as for SSE), and one CST proxy
(``python -m proxy.cli``) per mode:

    anonymous  ``settings.proxy.anonymous: true``, no Authorization header, no budget: the anchor figure
    budget     the caller is an instance, by its own key, under a budget it never reaches (admitted,
               settled, a ledger row)
    large      the budget mode with a ~100 KB body shaped like SillyTavern's chat request
    postgres   the budget mode with ``settings.usage.store`` on a PostgreSQL cluster of the bench's own

Each run measures, target after target (the order rotates from run to run, backwards every other
run, so no target always follows the same one): 64 keep-alive
connections for ``--seconds`` straight at the upstream, through nginx, through each CST mode (the
same body; the large mode beside a direct and an nginx run with its large body); then the latency
at one connection, each relay paired with direct request by request. CPU per request is
utime+stime of the relay's processes from /proc (nginx: master + worker; CST: the proxy process,
all its threads; the PostgreSQL cluster's own CPU is shown apart) across its 64-connection run.
Last, ``--streams`` concurrent slow streams through nginx and each CST mode: the relay's VmRSS
before and in the middle of the streams. Everything shares the machine's cores; the share of the
CPU that other processes used during each run is printed.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from ports import free_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
NGINX = "/usr/sbin/nginx"
KEYS = ",".join(f"sk-good-bench{i:04d}xxxxxxxxxxxx" for i in range(4))
POOL_KEY = KEYS.split(",")[0]   # the key nginx puts on every request, as CST puts a pool key
BODY = json.dumps({"model": "gpt-fake", "messages": [{"role": "user", "content": "Hello, how are you?"}]}).encode()
STREAM_BODY = json.dumps({"model": "gpt-fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
SLOW_BODY = json.dumps({"model": "slow-stream", "stream": True, "messages": []}).encode()
STORE_PASSWORD_ENV = "BENCH_STORE_PASSWORD"

# the requests come from an instance, by its own proxy key, so the proxy names the caller, holds it
# to its budget and writes a ledger row for each (the proxy closes to requests without a known key)
CALLER = "st-instance-8001"
CALLER_KEY = "cst-bench-" + "x" * 33
# a budget the benchmark never reaches, so that every request goes through admission and settlement
BUDGET = "{tokens_per_day: 1000000000000, tokens_per_month: 1000000000000, requests_per_minute: 1000000}"


def request_bytes(port: int, body: bytes, key: str | None = CALLER_KEY) -> bytes:
    """A chat request; ``key`` None: without an Authorization header (the anonymous mode)."""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


# -- a SillyTavern-sized chat request -----------------------------------------------------------

_CARD = ("{{char}} is Captain Mira Valen, thirty-four, commander of the salvage frigate *Wandering Lark*. "
         "She is dry-humoured, fiercely loyal to her crew and allergic to paperwork. She grew up on the ice "
         "moon Kessa, flew cargo for the Tamsin Combine for nine years and left after a contract went wrong "
         "in a way she refuses to talk about. She carries her late mentor’s compass, which points at nothing "
         "in particular. ")
_SCENARIO = ("Scenario: the Lark has answered a distress beacon in the Corvid Drift, an asteroid field thick with "
             "old wrecks. {{user}} is the ship’s new engineer, three weeks aboard. Write {{char}}'s next reply in "
             "a fictional chat between {{char}} and {{user}}. Write one reply only, in internet RP style, italicise "
             "actions, and avoid quotation marks. Use markdown. Be proactive, creative, and drive the plot and "
             "conversation forward. Always stay in character and avoid repetition. ")
_SENTENCES = [
    "*Mira leans over the console, the blue glow catching the scar above her eyebrow.*",
    "The beacon has been repeating the same forty-second loop for what the logs say is eleven years.",
    "“If that hull breach is where I think it is, we have about twenty minutes of air to work with.”",
    "She taps the display twice, frowning — the readings jump, settle, then jump again.",
    "*{{user}} checks the coupling on the starboard manifold and finds frost creeping along the seam.*",
    "Somewhere below deck a pump coughs, sputters, and then resumes its steady, reassuring thrum.",
    "“You’re telling me the reactor’s fine but the lights are flickering in time with the beacon?”",
    "The wreck drifts closer on the forward screen: a long-haul freighter, its name scoured off by ice.",
    "*She pulls the compass from her jacket, watches the needle spin, and pockets it again without comment.*",
    "Cargo manifests recovered from the freighter list medical supplies, seed stock and one sealed crate…",
    "“Pack the cutter and two spare cells. If we go in, we go in light, and we come back out lighter.”",
    "The comm crackles with static that almost, if you listen long enough, sounds like a voice counting down.",
    "*{{user}} wipes grease from their hands and glances at the captain, trying to read her expression.*",
    "Outside, a smaller rock glances off the shields and the whole ship rings like a struck bell.",
    "“Nobody touches the sealed crate until I’ve read whatever is stencilled on its lid. Understood?”",
    "The airlock cycles with a hiss; the indicator blinks amber, then green, then amber again.",
    "She laughs once, short and surprised, the first real laugh anyone has heard from her in days.",
    "*Mira keys the intercom.* “Bridge to all hands: we are holding station. Nobody sleeps tonight.”",
    "Every light in the freighter’s corridor is dead except one, which burns a steady, patient white.",
    "“Engineer, tell me honestly — if this goes sideways, how fast can you get us moving again?”",
]


@functools.lru_cache(maxsize=None)
def sillytavern_body(size: int = 100_000) -> bytes:
    """A chat request as SillyTavern sends it to an OpenAI-compatible endpoint when a long chat is
    under way: a system prompt (the character card, the scenario), many user/assistant turns of
    role-play prose, the sampling knobs it sends, ``stream: false``; about ``size`` bytes, UTF-8 with
    its typographic quotes and dashes (JSON.stringify keeps them as they are)."""
    rng = random.Random(19)

    def turn(low: int, high: int) -> str:   # SillyTavern fills in the names before it sends
        text = " ".join(rng.choice(_SENTENCES) for _ in range(rng.randint(low, high)))
        return text.replace("{{char}}", "Mira").replace("{{user}}", "Jun")

    system = (_CARD + _SCENARIO).replace("{{char}}", "Mira").replace("{{user}}", "Jun")
    messages = [{"role": "system", "content": system + "\n\n[Example dialogue]\n" + turn(10, 14)}]
    request = {"messages": messages, "model": "gpt-fake", "temperature": 1, "max_tokens": 400, "stream": False,
               "presence_penalty": 0, "frequency_penalty": 0, "top_p": 1, "logit_bias": {}, "seed": 8121}
    while True:
        messages.append({"role": "user", "content": turn(1, 5)})
        body = json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode()
        if len(body) >= size:
            return body
        messages.append({"role": "assistant", "content": turn(6, 16)})


# -- the load generator ---------------------------------------------------------------------


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
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15): every thread's


def cpu_snapshot(pids: Iterable[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):   # gone meanwhile (a PostgreSQL backend)
            found[pid] = cpu_seconds(pid)
    return found


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two snapshots; a process that appeared meanwhile counts whole."""
    return sum(spent - before.get(pid, 0.0) for pid, spent in after.items())


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / TICKS


def rss_kb(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        total += int(m.group(1)) if m else 0
    return total


def peak_rss_mb(pid: int) -> float:
    m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024


def children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


@dataclass
class Load:
    rate: float                  # requests per second
    cpu: float | None            # CPU seconds per request of the measured processes
    latencies: list[float]       # each request's, whole answer, seconds
    requests: int

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)


async def load(port: int, raw: bytes, concurrency: int, seconds: float,
               pids: Callable[[], Iterable[int]] | None = None, started: Callable[[], None] | None = None) -> Load:
    """``concurrency`` keep-alive connections sending ``raw`` back to back for ``seconds``; the CPU
    per request of the processes ``pids()`` names (read before and after). ``started`` is called
    when the measured window begins (the connections open and warm)."""
    conns = [await Conn(port).open() for _ in range(concurrency)]
    for c in conns:  # warm the connections (and the relay's upstream pool)
        status, _ = await c.request(raw)
        assert status == 200, status
    latencies: list[float] = []
    stop_at = 0.0

    async def worker(c: Conn) -> None:
        while (start := time.perf_counter()) < stop_at:
            status, _ = await c.request(raw)
            latencies.append(time.perf_counter() - start)
            assert status == 200, status

    if started is not None:
        started()
    cpu0 = cpu_snapshot(pids()) if pids else {}
    start = time.perf_counter()
    stop_at = start + seconds
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - start
    done = len(latencies)
    cpu = cpu_spent(cpu0, cpu_snapshot(pids())) / done if pids else None
    for c in conns:
        c.close()
    return Load(done / elapsed, cpu, latencies, done)


async def throughput(port: int, concurrency: int, seconds: float, pid: int | None) -> tuple[float, float | None]:
    """(requests/s, CPU seconds per request of ``pid``) with the small body and the instance's key."""
    result = await load(port, request_bytes(port, BODY), concurrency, seconds, (lambda: [pid]) if pid else None)
    return result.rate, result.cpu


async def paired_raw(direct_port: int, direct_raw: bytes, port: int, raw: bytes, n: int,
                     first_byte: bool) -> tuple[float, float, float]:
    """One connection each, requests alternating direct/relayed so both see the same machine noise.
    Returns medians (direct, relayed, per-pair difference) in seconds: of the whole request, or of
    the time to the first body byte when ``first_byte``."""
    raws = direct_raw, raw
    conns = await Conn(direct_port).open(), await Conn(port).open()
    for _ in range(50):
        for c, r in zip(conns, raws):
            await c.request(r)
    direct, relayed = [], []
    for _ in range(n):
        for c, r, out in zip(conns, raws, (direct, relayed)):
            start = time.perf_counter()
            status, ttfb = await c.request(r)
            assert status == 200, status
            out.append(ttfb if first_byte else time.perf_counter() - start)
    for c in conns:
        c.close()
    diffs = [p - d for d, p in zip(direct, relayed)]
    return statistics.median(direct), statistics.median(relayed), statistics.median(diffs)


async def paired(direct_port: int, proxy_port: int, body: bytes, n: int, first_byte: bool) -> tuple[float, float, float]:
    return await paired_raw(direct_port, request_bytes(direct_port, body), proxy_port,
                            request_bytes(proxy_port, body), n, first_byte)


@dataclass
class Held:
    started: int = 0
    flowing: int = 0             # streams with an event in the last two gaps, mid-stream
    in_flight: int = 0           # streams started and not ended when the memory was read
    rss_before_kb: int = 0
    rss_mid_kb: int = 0

    @property
    def per_stream_kb(self) -> float:
        return (self.rss_mid_kb - self.rss_before_kb) / max(self.in_flight, 1)


async def many_streams(port: int, n: int, gap: float, chunks: int, key: str | None = CALLER_KEY,
                       pids: Callable[[], Iterable[int]] | None = None) -> Held:
    """Hold n slow streams at once (opened 100 at a time, 50 ms apart, so no listen backlog
    overflows); in their middle, read the VmRSS of ``pids()`` and count the streams flowing."""
    last_chunk = [0.0] * n
    ended = [False] * n
    held = Held()
    all_started = asyncio.Event()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    async def one(i: int, http: aiohttp.ClientSession) -> None:
        async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=SLOW_BODY, headers=headers) as resp:
            assert resp.status == 200, resp.status
            held.started += 1
            if held.started == n:
                all_started.set()
            async for _ in resp.content.iter_any():
                last_chunk[i] = time.monotonic()
        ended[i] = True

    held.rss_before_kb = rss_kb(pids()) if pids else 0
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=gap * chunks + 120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        first = time.monotonic()
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(one(i, http)))
            if i % 100 == 99:
                await asyncio.sleep(0.05)
        await asyncio.wait_for(all_started.wait(), gap * chunks / 2 + 60)
        # the middle of the streams, and at least two events after the last one began
        await asyncio.sleep(max(first + gap * chunks / 2 - time.monotonic(), 2 * gap))
        now = time.monotonic()
        held.rss_mid_kb = rss_kb(pids()) if pids else 0
        held.flowing = sum(1 for t in last_chunk if now - t <= 2 * gap + 0.5)
        held.in_flight = held.started - sum(ended)
        await asyncio.gather(*tasks)
    return held


# -- the processes --------------------------------------------------------------------------


def spawn(args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def wait_http(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(400):
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


def desired_yaml(workdir: Path, port: int, upstream_port: int, *, budget: bool = True, anonymous: bool = False,
                 store: str | None = None, max_concurrent: int | None = None) -> Path:
    """A desired.yaml for one proxy: four static pool keys, one instance (with its proxy key in the
    state dir's key folder), under ``BUDGET`` if ``budget``; the ledger in ``store`` (PostgreSQL,
    its password in $BENCH_STORE_PASSWORD) or in the state dir's SQLite file."""
    keys = workdir / "state" / "secrets" / "proxy-keys"
    keys.mkdir(parents=True, mode=0o700)
    (keys / CALLER).write_text(CALLER_KEY + "\n")
    (keys / CALLER).chmod(0o600)
    usage = f"  usage: {{store: \"{store}\", store_password_env: {STORE_PASSWORD_ENV}}}\n" if store else ""
    proxy = (f"    listen: \"127.0.0.1:{port}\"\n    upstream: \"http://127.0.0.1:{upstream_port}/v1\"\n"
             + ("    anonymous: true\n" if anonymous else "")
             + (f"    max_concurrent: {max_concurrent}\n" if max_concurrent else ""))
    path = workdir / "desired.yaml"
    path.write_text(
        f"version: 1\nsettings:\n  state_dir: state\n{usage}  proxy:\n{proxy}"
        "accounts:\n  - {name: bench, provider: static, keys_env: BENCH_KEYS}\n"
        "instances:\n  - port: 8001\n" + (f"    budget: {BUDGET}\n" if budget else ""))
    return path


async def start_cst(upstream_port: int, workdir: Path, code: Path = ROOT, *, budget: bool = True,
                    anonymous: bool = False, store: str | None = None, store_password: str = "",
                    max_concurrent: int | None = None,
                    launcher: list[str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """The proxy of the checkout at ``code`` (this one, or a baseline to compare with), started by
    ``launcher`` (default ``python -m proxy.cli``; the profiler wraps it) with its desired.yaml."""
    port = free_port()
    path = desired_yaml(workdir, port, upstream_port, budget=budget, anonymous=anonymous, store=store,
                        max_concurrent=max_concurrent)
    env = {**os.environ, "BENCH_KEYS": KEYS, "PYTHONPATH": str(code), STORE_PASSWORD_ENV: store_password}
    proc = spawn([*(launcher or [sys.executable, "-m", "proxy.cli"]), "-f", str(path), "--log-level", "warning"],
                 env, cwd=code)
    try:
        await wait_http(f"http://127.0.0.1:{port}/health")
    except RuntimeError:
        print(stop(proc)[-3000:], file=sys.stderr)
        raise
    return proc, port


async def start_proxy(upstream_port: int, workdir: Path, code: Path = ROOT,
                      budget: bool = True) -> tuple[subprocess.Popen[bytes], int]:
    """The budget mode's proxy (a baseline from before budgets existed gets ``budget=False``)."""
    return await start_cst(upstream_port, workdir, code, budget=budget)


def stop(proc: subprocess.Popen[bytes]) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=15)
    return (out or b"").decode(errors="replace")


class Nginx:
    """Debian's nginx as a plain reverse proxy to the fake upstream, as one would put it in front
    of an SSE API: one worker, keep-alive to the upstream, no buffering of answers, no access log;
    the pool key set on every request (CST replaces the caller's key with a pool key too). A body
    up to 128 KB is read into memory before it goes on (CST reads it whole too), not to a file."""

    def __init__(self, upstream_port: int, folder: Path, streams: int):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        user = "user root;" if os.geteuid() == 0 else ""
        temp = " ".join(f"{kind}_temp_path {folder}/{kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                           "uwsgi", "scgi"))
        (folder / "nginx.conf").write_text(f"""
{user}
worker_processes 1;
worker_rlimit_nofile {4 * streams + 1024};
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections {4 * streams + 512}; }}
http {{
    access_log off;
    {temp}
    keepalive_requests 1000000;
    client_body_buffer_size 128k;
    upstream fake {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {POOL_KEY}";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
""")
        self.proc = subprocess.Popen([NGINX, "-p", f"{folder}/", "-c", str(folder / "nginx.conf"),
                                      "-e", str(folder / "error.log"), "-g", "daemon off;"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self.workers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nginx did not start:\n" + self.log())
            time.sleep(0.05)

    def workers(self) -> list[int]:
        return children(self.proc.pid)

    def pids(self) -> list[int]:
        return [self.proc.pid, *self.workers()]

    def log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text()[-2000:] if path.exists() else ""

    def stop(self) -> None:
        workers = self.workers()
        self.proc.terminate()   # nginx's fast shutdown: the master stops its workers
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for pid in workers:   # a worker left behind by a master that did not stop it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def raise_open_files(need: int) -> str:
    """Raise this process's soft limit on open files to ``need`` if it is lower (the processes it
    starts inherit it); what was found, for the report."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    found = f"ulimit -n: soft {soft}, hard {hard}; needed about {need}"
    if soft >= need:
        return found + ": enough"
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return found + f": soft limit raised to {new} (children inherit it)" + ("" if new >= need else ", short of it")


# -- the run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    name: str
    anonymous: bool = False
    budget: bool = True
    large: bool = False
    postgres: bool = False


MODES = {m.name: m for m in (Mode("anonymous", anonymous=True, budget=False), Mode("budget"),
                             Mode("large", large=True), Mode("postgres", postgres=True))}


@dataclass
class Target:
    name: str
    group: str                    # "small" or "large": the body it gets, the direct and nginx runs it stands by
    port: int
    key: str | None               # the Authorization it sends (None: none)
    pids: Callable[[], list[int]]
    store_pids: Callable[[], list[int]] | None = None
    streams: bool = True          # held streams are measured through it
    ttfb_too: bool = True         # and a stream's time to first byte
    rate: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    store_cpu: list[float] = field(default_factory=list)
    p50_64: list[float] = field(default_factory=list)
    p50_1: list[float] = field(default_factory=list)
    direct_1: list[float] = field(default_factory=list)
    added_1: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    ttfb_direct: list[float] = field(default_factory=list)
    held: Held | None = None
    proc: subprocess.Popen[bytes] | None = None

    def raw(self, body: bytes) -> bytes:
        return request_bytes(self.port, body, self.key)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def measure_round(target: Target, body: bytes, concurrency: int, seconds: float) -> Load:
    store_before = cpu_snapshot(target.store_pids()) if target.store_pids else {}
    result = await load(target.port, target.raw(body), concurrency, seconds, target.pids)
    if target.store_pids:
        target.store_cpu.append(cpu_spent(store_before, cpu_snapshot(target.store_pids())) / result.requests)
    target.rate.append(result.rate)
    target.cpu.append(result.cpu or 0.0)
    target.p50_64.append(result.p50)
    return result


def report(groups: dict[str, list[Target]], args: argparse.Namespace, bodies: dict[str, bytes]) -> None:
    print(f"\n== 64-connection runs ({args.concurrency} connections x {args.seconds:g} s) and one connection; "
          f"medians of {args.runs} runs; xnginx = median of the per-run ratios to nginx with the same body ==")
    print(f"{'target':<12}{'body':>7}{'req/s':>8}{'CPU us/req':>12}{'xnginx':>8}{'req/s xng':>10}"
          f"{'p50@64 ms':>11}{'xnginx':>8}{'p50@1 ms':>10}{'direct@1':>10}{'added':>8}{'xnginx':>8}")
    for group, targets in groups.items():
        nginx = next(t for t in targets if t.name == "nginx")
        size = f"{len(bodies[group]) / 1000:.0f}KB" if group == "large" else f"{len(bodies[group])}B"
        for t in targets:
            def ratio(mine: list[float], theirs: list[float]) -> str:
                return "" if t.name == "direct" else f"{med([a / b for a, b in zip(mine, theirs) if b]):.2f}"
            p1 = f"{med(t.p50_1) * 1e3:.3f}" if t.p50_1 else ""
            d1 = f"{med(t.direct_1) * 1e3:.3f}" if t.direct_1 else ""
            added = f"+{med(t.added_1) * 1e3:.3f}" if t.added_1 else ""
            print(f"{t.name:<12}{size:>7}{med(t.rate):>8.0f}{med(t.cpu) * 1e6:>12.1f}{ratio(t.cpu, nginx.cpu):>8}"
                  f"{ratio(t.rate, nginx.rate):>10}{med(t.p50_64) * 1e3:>11.2f}{ratio(t.p50_64, nginx.p50_64):>8}"
                  f"{p1:>10}{d1:>10}{added:>8}{ratio(t.added_1, nginx.added_1) if t.added_1 else '':>8}")
    print("(direct: CPU is the fake upstream's own, a bare aiohttp server; p50@1: paired request by request "
          "with direct on one connection each, 'added' the median of the per-pair differences)")
    for targets in groups.values():
        for t in targets:
            if t.store_cpu:
                print(f"{t.name}: the PostgreSQL cluster's own CPU per request {med(t.store_cpu) * 1e6:.1f} us "
                      f"(not in the figure above); proxy + store {(med(t.cpu) + med(t.store_cpu)) * 1e6:.1f} us")
            if t.ttfb:
                print(f"{t.name}: stream time to first byte {med(t.ttfb) * 1e3:.2f} ms "
                      f"(direct {med(t.ttfb_direct) * 1e3:.2f} ms)")
    held = [t for targets in groups.values() for t in targets if t.held is not None]
    if held:
        nginx_held = next((t.held for t in held if t.name == "nginx"), None)
        print(f"\n== {args.streams} concurrent slow streams (VmRSS of the relay's processes) ==")
        print(f"{'target':<12}{'started':>9}{'flowing':>9}{'held':>7}{'RSS before MB':>15}{'mid-stream MB':>15}"
              f"{'KB/stream':>11}{'xnginx':>8}")
        for t in held:
            h = t.held
            assert h is not None
            x = f"{h.per_stream_kb / nginx_held.per_stream_kb:.1f}" if nginx_held and nginx_held.per_stream_kb > 0 else ""
            print(f"{t.name:<12}{h.started:>9}{h.flowing:>9}{h.in_flight:>7}{h.rss_before_kb / 1024:>15.1f}"
                  f"{h.rss_mid_kb / 1024:>15.1f}{h.per_stream_kb:>11.1f}{x:>8}")


async def start_mode(mode: Mode, up_port: int, tmp: Path, store_url: str | None, store_password: str,
                     store_pids: Callable[[], list[int]] | None, streams: int) -> Target:
    """CST's proxy started in ``mode``, as a target."""
    proc, port = await start_cst(up_port, tmp / mode.name, budget=mode.budget, anonymous=mode.anonymous,
                                 store=store_url if mode.postgres else None, store_password=store_password,
                                 max_concurrent=3 * streams + 64)
    return Target(mode.name, "large" if mode.large else "small", port, None if mode.anonymous else CALLER_KEY,
                  lambda pid=proc.pid: [pid], store_pids if mode.postgres else None,
                  streams=not mode.large, proc=proc)


def start_floors(up_port: int, floors: list[subprocess.Popen[bytes]], groups: dict[str, list[Target]]) -> None:
    """floor_relay.py, with and without a task per request, added to the small group."""
    for name, extra in (("floor", []), ("floor+task", ["--task"])):
        port = free_port()
        floor = spawn([sys.executable, str(Path(__file__).with_name("floor_relay.py")), str(up_port), str(port),
                       *extra])
        floors.append(floor)
        assert floor.stdout is not None and floor.stdout.readline().strip() == b"ready"
        groups["small"].append(Target(name, "small", port, CALLER_KEY, lambda pid=floor.pid: [pid],
                                      streams=False, ttfb_too=False))


async def start_baseline(args: argparse.Namespace, up_port: int, tmp: Path) -> Target:
    """The other checkout's proxy (--baseline), as a target."""
    anonymous = args.baseline_mode == "anonymous"
    proc, port = await start_cst(up_port, tmp / "baseline", args.baseline,
                                 budget=not (anonymous or args.baseline_without_budgets), anonymous=anonymous)
    return Target("baseline", "small", port, None if anonymous else CALLER_KEY, lambda pid=proc.pid: [pid],
                  streams=False, proc=proc)


def stop_relays(started: list[Target], nginxes: list[Nginx], floors: list[subprocess.Popen[bytes]],
                logs: dict[str, str]) -> None:
    """Stop every relay started; the logs of CST's proxies and nginx's go in ``logs``, by target."""
    for t in started:
        if t.proc is not None:
            logs[t.name] = stop(t.proc)
    for n in nginxes:
        n.stop()
        logs["nginx"] = n.log()
    for floor in floors:
        stop(floor)


async def measure_group(run: int, group: str, targets: list[Target], body: bytes, up_port: int, concurrency: int,
                        seconds: float) -> None:
    """One run's measurements of one group: throughput, then each target paired with the direct one."""
    turn = run % len(targets)
    order = targets[turn:] + targets[:turn]   # the order rotates from run to run,
    for t in order if run % 2 == 0 else order[::-1]:   # and every other run goes backwards
        await measure_round(t, body, concurrency, seconds)
    direct = targets[0]
    n = 1000 if group == "small" else 300
    for t in targets[1:]:
        d, p, added = await paired_raw(up_port, direct.raw(body), t.port, t.raw(body), n, first_byte=False)
        t.p50_1.append(p)
        t.direct_1.append(d)
        t.added_1.append(added)
        direct.p50_1.append(d)
        if group == "small" and t.ttfb_too:
            d, p, _ = await paired_raw(up_port, direct.raw(STREAM_BODY), t.port, t.raw(STREAM_BODY), 300,
                                       first_byte=True)
            t.ttfb.append(p)
            t.ttfb_direct.append(d)


def run_figures(groups: dict[str, list[Target]]) -> list[str]:
    """The last run's rate and CPU per request of every target, against nginx's."""
    line = []
    for group, targets in groups.items():
        nginx_cpu = targets[1].cpu[-1]
        for t in targets:
            x = f" {t.cpu[-1] / nginx_cpu:.1f}x" if t.name != "direct" and nginx_cpu else ""
            line.append(f"{t.name}{'(100KB)' if group == 'large' else ''} {t.rate[-1]:.0f}/s "
                        f"{t.cpu[-1] * 1e6:.0f}us{x}")
    return line


async def hold_streams(groups: dict[str, list[Target]], streams: int, gap: float, chunks: int) -> None:
    """``streams`` slow streams held at once through each target that takes them."""
    for targets in groups.values():
        for t in targets:
            if t.streams:
                t.held = await many_streams(t.port, streams, gap, chunks, t.key, t.pids)
                print(f"{streams} streams through {t.name}: {t.held.started} started, {t.held.flowing} "
                      f"flowing, {t.held.per_stream_kb:.1f} KB each", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--streams", type=int, default=2000, help="concurrent slow streams held (0: none)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"CST modes to measure, comma-separated, of {','.join(MODES)} (nginx always runs)")
    parser.add_argument("--baseline", type=Path,
                        help="another checkout (e.g. `git archive main | tar -x -C DIR`): its proxy is measured in "
                             "the same runs, alternating with the others, in --baseline-mode")
    parser.add_argument("--baseline-mode", choices=("anonymous", "budget"), default="budget")
    parser.add_argument("--baseline-without-budgets", action="store_true",
                        help="the baseline predates budgets: declare none in its file")
    parser.add_argument("--floor", action="store_true",
                        help="also measure floor_relay.py (a minimal Python relay: callbacks only, and with a task "
                             "per request), the floor of what relaying costs in Python on uvloop")
    args = parser.parse_args()
    modes = [MODES[name] for name in args.modes.split(",") if name]

    print(raise_open_files(3 * args.streams + 2048), flush=True)
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}; {os.cpu_count()} cores", flush=True)
    gap, chunks = 1.0, 20   # a slow stream lasts ~19 s: 20 events a second apart
    upstream, up_port = start_upstream(chunks, gap)
    bodies = {"small": BODY, "large": sillytavern_body()}
    cluster = None
    started: list[Target] = []
    nginxes: list[Nginx] = []
    floors: list[subprocess.Popen[bytes]] = []
    logs: dict[str, str] = {}
    groups: dict[str, list[Target]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="cst-bench-proxy-"))
    try:
        nginx = Nginx(up_port, tmp / "nginx", args.streams)
        nginxes.append(nginx)
        groups["small"] = [Target("direct", "small", up_port, CALLER_KEY, lambda: [upstream.pid], streams=False),
                           Target("nginx", "small", nginx.port, CALLER_KEY, nginx.pids)]
        if any(m.large for m in modes):
            groups["large"] = [Target("direct", "large", up_port, CALLER_KEY, lambda: [upstream.pid], streams=False),
                               Target("nginx", "large", nginx.port, CALLER_KEY, nginx.pids, streams=False)]
        store_url, store_password, store_pids = None, "", None
        if any(m.postgres for m in modes):
            sys.path.insert(0, str(ROOT / "tests" / "proxy"))
            from postgres_cluster import PASSWORD, PostgresCluster

            cluster = PostgresCluster(free_port(), durable=True)
            cluster.start()
            store_url, store_password = cluster.url(cluster.new_database()), PASSWORD
            store_pids = lambda: [cluster.proc.pid, *children(cluster.proc.pid)]   # noqa: E731
        for mode in modes:
            target = await start_mode(mode, up_port, tmp, store_url, store_password, store_pids, args.streams)
            started.append(target)
            groups[target.group].append(target)
        if args.floor:
            start_floors(up_port, floors, groups)
        if args.baseline:
            target = await start_baseline(args, up_port, tmp)
            started.append(target)
            groups["small"].append(target)

        for targets in groups.values():   # warm every relay (and the fake upstream) once, not measured
            for t in targets:
                await load(t.port, t.raw(bodies[t.group]), args.concurrency, 0.5)

        def ours() -> list[int]:
            pids = [os.getpid(), upstream.pid, *nginx.pids(), *(t.proc.pid for t in started if t.proc),
                    *(f.pid for f in floors)]
            pids += [p for t in started for p in (t.store_pids() if t.store_pids else [])]
            return list(dict.fromkeys(pids))

        for run in range(args.runs):
            busy0, ours0, wall0 = machine_busy(), cpu_snapshot(ours()), time.monotonic()
            for group, targets in groups.items():
                await measure_group(run, group, targets, bodies[group], up_port, args.concurrency, args.seconds)
            wall = time.monotonic() - wall0
            others = (machine_busy() - busy0 - cpu_spent(ours0, cpu_snapshot(ours()))) / (wall * (os.cpu_count() or 1))
            print(f"run {run + 1} (other processes used {max(others, 0) * 100:.0f}% of the machine): "
                  + "; ".join(run_figures(groups)), flush=True)

        if args.streams:
            await hold_streams(groups, args.streams, gap, chunks)
    finally:
        stop_relays(started, nginxes, floors, logs)
        stop(upstream)
        if cluster is not None:
            cluster.remove()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")
    report(groups, args, bodies)
    for name, log in logs.items():
        if log.strip():
            print(f"\n{name} log:\n" + log[-2000:])


if __name__ == "__main__":
    asyncio.run(main())
