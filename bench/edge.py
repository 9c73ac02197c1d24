"""What the edge (settings.edge: nginx, TLS, host names) costs, on the real SillyTavern 1.19.0.

One `cst serve` with ``settings.edge`` on 127.0.0.1 (a trustme certificate for ``*.st.test``), one
instance with ``park_after: 1h`` (woken through the API, then used), and four measurements side by
side, medians of --runs:

1. a page load: the GETs chromium made for SillyTavern's page (loaded once through the edge),
   replayed 6 at a time on fresh connections as a browser's first visit does (HTTP/1.1), straight
   to node's Unix socket in plain HTTP (``Paths(state_dir).socket(id)``, no nginx) and through the
   edge over TLS, alternating; wall time per load (goal: edge <= 1.1x direct);
2. CPU per relayed request: --requests small GETs (``/api/plugins/cst/health``, 4 keep-alive
   connections) through the edge, and through a plain nginx (Debian's, a minimal configuration
   written to a temporary folder: ``proxy_pass`` to the same socket, nothing else); the CPU
   (user+system) of each one's workers per request, over TLS and over plain HTTP (the edge's
   plain listener is the instance's own port, ``ports: true``) (goal: edge <= 1.5x plain nginx);
3. wake time through the edge: parked through the API, then the first credentialed request's whole
   answer (GET /, over TLS), p50 and p99 of --wakes (the real 1.19.0, not the stand-in);
4. the edge's memory (RSS of the master and its workers) idle, and with --idle keep-alive TLS
   connections held open (each having made one request).

    CST_SILLYTAVERN_HOME=.cache/sillytavern .venv/bin/python bench/edge.py --runs 5

Prints a table and writes it to bench/EDGE_RESULTS.md. Every process started here is stopped by
its pid (the edge's nginx by its pid file, as it outlives cst serve by design).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import resource
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import aiohttp
import psutil
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE), str(HERE / "proxy")]
from density import CHROMIUM, Fleet, free_ports, load_page, wait  # noqa: E402  (bench/density.py)

import bench as proxy_bench  # noqa: E402  (bench/proxy/bench.py: the keep-alive client)
from reconciler.runtime.edge import NGINX, WORKER_USER, Paths, master_pid  # noqa: E402

DOMAIN = "st.test"
SMALL = "/api/plugins/cst/health"
RESULTS = HERE / "EDGE_RESULTS.md"


def spki_pin(cert_pem: bytes) -> str:
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    return base64.b64encode(hashlib.sha256(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()).decode()


def workers(master: int) -> list[psutil.Process]:
    return [child for child in psutil.Process(master).children() if "worker process" in " ".join(child.cmdline())]


def workers_cpu(master: int) -> float:
    """The CPU seconds (user+system) of the workers: /proc/<pid>/schedstat's time on a CPU, in
    nanoseconds (psutil's user+system counts whole 10 ms ticks, too coarse for a few thousand
    requests of tens of microseconds); an nginx worker is one thread."""
    total = 0.0
    for worker in workers(master):
        try:
            total += int(Path(f"/proc/{worker.pid}/schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            total += sum(worker.cpu_times()[:2])
    return total


def nginx_memory(master: int) -> tuple[int, int]:
    """(RSS, PSS) of the master and its workers: RSS counts their shared pages once per process."""
    procs = [psutil.Process(master), *workers(master)]
    return sum(p.memory_info().rss for p in procs), sum(p.memory_full_info().pss for p in procs)


class Loopback(aiohttp.abc.AbstractResolver):
    """Every name is 127.0.0.1: the edge's host names without DNS."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


class TlsConn(proxy_bench.Conn):
    """bench/proxy's keep-alive client over TLS, to a host name at 127.0.0.1:port."""

    def __init__(self, port: int, context: ssl.SSLContext, name: str):
        super().__init__(port)
        self.context, self.name = context, name

    async def open(self) -> "TlsConn":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=self.context,
                                                                 server_hostname=self.name)
        return self


class Setup:
    """The fleet (one instance behind the edge), its certificate, and a plain nginx beside it."""

    def __init__(self) -> None:
        (self.port,) = free_ports(1)
        self.edge_port, self.plain_tls, self.plain_http = free_ports(3)
        self.id = f"st-instance-{self.port}"
        self.name = f"{self.id}.{DOMAIN}"
        self.fleet = Fleet([self.port], 'version: "1.19.0", start_timeout: 300, park_after: 1h',
                           extra=f'edge: {{listen: "127.0.0.1:{self.edge_port}", domain: {DOMAIN}, '
                                 'tls: {cert: cert.pem, key: key.pem}}')
        ca = trustme.CA()
        leaf = ca.issue_cert(f"*.{DOMAIN}")
        ca.cert_pem.write_to_path(str(self.fleet.dir / "ca.pem"))
        leaf.private_key_pem.write_to_path(str(self.fleet.dir / "key.pem"))
        for blob in leaf.cert_chain_pems:
            blob.write_to_path(str(self.fleet.dir / "cert.pem"), append=True)
        self.pin = spki_pin(leaf.cert_chain_pems[0].bytes())
        self.tls = ssl.create_default_context(cafile=str(self.fleet.dir / "ca.pem"))
        self.paths = Paths(self.fleet.dir / ".cst")
        self.plain: subprocess.Popen | None = None

    @property
    def socket(self) -> Path:
        return self.paths.socket(self.id)

    @property
    def authorization(self) -> str:
        login = f"{self.id}:{self.fleet.password(self.port)}"
        return "Basic " + base64.b64encode(login.encode()).decode()

    def edge_master(self) -> int:
        pid = master_pid(self.paths)
        assert pid is not None, "the edge's nginx is not running"
        return pid

    def start(self) -> None:
        self.fleet.start_serve()
        wait(lambda: self.fleet.rows().get(self.id, {}).get("observed") == "parked", 120,
             "the instance parked (never started: nobody used it)")
        woken = self.fleet.api_call("POST", f"/api/instances/{self.id}/wake")
        assert woken.status_code == 200, woken.text

    def start_plain_nginx(self) -> int:
        """Debian's nginx with nothing but the relay to the same socket (its workers as the edge's,
        which may reach the socket), over TLS with the same certificate, and over plain HTTP."""
        folder = Path(tempfile.mkdtemp(prefix="cst-bench-nginx-"))
        user = f"user {WORKER_USER} {WORKER_USER};" if os.geteuid() == 0 else ""
        relay = (f"location / {{ proxy_pass http://unix:{self.socket}:; }}")
        (folder / "nginx.conf").write_text(f"""
            {user}
            worker_processes auto;
            pid {folder}/nginx.pid;
            error_log {folder}/error.log;
            events {{ worker_connections 16384; }}
            http {{
              access_log off;
              client_body_temp_path {folder}/body;
              proxy_temp_path {folder}/proxy;
              proxy_http_version 1.1;
              proxy_set_header Connection "";
              proxy_buffering off;
              server {{
                listen 127.0.0.1:{self.plain_tls} ssl http2;
                ssl_certificate {self.fleet.dir / 'cert.pem'};
                ssl_certificate_key {self.fleet.dir / 'key.pem'};
                {relay}
              }}
              server {{ listen 127.0.0.1:{self.plain_http}; {relay} }}
            }}
            """)
        self.plain = subprocess.Popen([NGINX, "-p", f"{folder}/", "-c", str(folder / "nginx.conf"), "-e",
                                       str(folder / "error.log"), "-g", "daemon off;"],
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        wait(lambda: len(workers(self.plain.pid)) > 0, 10, "the plain nginx")
        return self.plain.pid

    def close(self) -> None:
        if self.plain is not None and self.plain.poll() is None:
            os.killpg(self.plain.pid, signal.SIGKILL)
            self.plain.wait(10)
        edge = master_pid(self.paths)
        self.fleet.close()   # cst serve, then the instance by its state-dir marker
        if edge is not None:
            os.killpg(edge, signal.SIGKILL)   # the edge: a session of its own, outliving cst serve
            psutil.wait_procs([p for p in psutil.process_iter() if p.pid == edge], timeout=10)


# -- 1. a page load

def page_urls(setup: Setup) -> list[str]:
    """The paths of the GETs chromium makes for SillyTavern's page, loaded through the edge."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1",
            f"--ignore-certificate-errors-spki-list={setup.pin}"])
        try:
            context = browser.new_context(extra_http_headers={"Authorization": setup.authorization})
            page, gets = load_page(context, f"https://{setup.name}:{setup.edge_port}/")
            page.wait_for_load_state("networkidle")
            context.close()
        finally:
            browser.close()
    prefix = f"https://{setup.name}:{setup.edge_port}"
    return [url[len(prefix):] for url in gets if url.startswith(prefix + "/")]


async def page_load(session: aiohttp.ClientSession, base: str, paths: list[str], headers: dict) -> float:
    queue = list(reversed(paths))
    bad: list[int] = []

    async def fetch() -> None:
        while queue:
            async with session.get(base + queue.pop(), headers=headers) as answer:
                await answer.read()
                if answer.status >= 400:
                    bad.append(answer.status)

    began = time.perf_counter()
    await asyncio.gather(*(fetch() for _ in range(6)))
    took = time.perf_counter() - began
    if bad:
        raise SystemExit(f"a page load got {len(bad)} errors: {bad[:5]}")
    return took


async def page_loads(setup: Setup, paths: list[str], runs: int) -> dict[str, list[float]]:
    headers = {"Authorization": setup.authorization, "Host": setup.name}
    loads: dict[str, list[float]] = {"direct": [], "edge": []}
    for _ in range(runs + 1):   # the first pair warms node's caches: not counted
        for name in ("direct", "edge"):
            if name == "direct":
                connector = aiohttp.UnixConnector(str(setup.socket), limit=6)
                base = "http://localhost"
            else:
                connector = aiohttp.TCPConnector(limit=6, ssl=setup.tls, resolver=Loopback())
                base = f"https://{setup.name}:{setup.edge_port}"
            async with aiohttp.ClientSession(connector=connector) as session:
                loads[name].append(await page_load(session, base, paths,
                                                   headers if name == "direct" else {"Authorization": headers["Authorization"]}))
    return {name: values[1:] for name, values in loads.items()}


# -- 2. CPU per relayed request

async def relay_cpu(master: int, open_conn, raw: bytes, requests: int, connections: int = 4) -> float:
    conns = [await open_conn() for _ in range(connections)]
    for conn in conns:
        status, _ = await conn.request(raw)
        assert status == 200, status
    left = requests

    async def worker(conn) -> None:
        nonlocal left
        used = 1
        while left > 0:
            left -= 1
            if used == 900:   # nginx closes a connection after 1,000 requests (keepalive_requests)
                conn.close()
                conn, used = await open_conn(), 0
            status, _ = await conn.request(raw)
            assert status == 200, status
            used += 1
        conn.close()

    before = workers_cpu(master)
    await asyncio.gather(*(worker(c) for c in conns))
    return (workers_cpu(master) - before) / requests


async def cpu_per_request(setup: Setup, plain_master: int, requests: int, runs: int) -> dict[str, list[float]]:
    raw = (f"GET {SMALL} HTTP/1.1\r\nHost: {setup.name}\r\nAuthorization: {setup.authorization}\r\n\r\n").encode()
    edge = setup.edge_master()
    ways = {
        "edge, TLS": (edge, lambda: TlsConn(setup.edge_port, setup.tls, setup.name).open()),
        "plain nginx, TLS": (plain_master, lambda: TlsConn(setup.plain_tls, setup.tls, setup.name).open()),
        "edge, HTTP (own port)": (edge, lambda: proxy_bench.Conn(setup.port).open()),
        "plain nginx, HTTP": (plain_master, lambda: proxy_bench.Conn(setup.plain_http).open()),
    }
    spent: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(runs):
        for name, (master, open_conn) in ways.items():
            spent[name].append(await relay_cpu(master, open_conn, raw, requests))
    return spent


# -- 3. wake time

def wake_times(setup: Setup, wakes: int) -> list[float]:
    async def first_answer() -> float:
        connector = aiohttp.TCPConnector(ssl=setup.tls, resolver=Loopback(), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            began = time.perf_counter()
            async with session.get(f"https://{setup.name}:{setup.edge_port}/",
                                   headers={"Authorization": setup.authorization},
                                   timeout=aiohttp.ClientTimeout(total=120)) as answer:
                await answer.read()
                assert answer.status == 200, answer.status
            return time.perf_counter() - began

    times = []
    for _ in range(wakes):
        parked = setup.fleet.api_call("POST", f"/api/instances/{setup.id}/park")
        assert parked.status_code == 200, parked.text
        assert setup.fleet.rows()[setup.id]["observed"] == "parked"
        times.append(asyncio.run(first_answer()))
    return times


# -- 4. memory with idle connections

async def idle_memory(setup: Setup, count: int) -> tuple[tuple[int, int], tuple[int, int], int]:
    """((RSS, PSS) idle, (RSS, PSS) with ``count`` idle connections, connections held)."""
    master = setup.edge_master()
    idle = nginx_memory(master)
    raw = (f"GET {SMALL} HTTP/1.1\r\nHost: {setup.name}\r\nAuthorization: {setup.authorization}\r\n\r\n").encode()
    conns: list[TlsConn] = []
    began = time.monotonic()
    for start in range(0, count, 100):   # keep-alive for 75 s after their one request: open them all well within it
        batch = await asyncio.gather(*(TlsConn(setup.edge_port, setup.tls, setup.name).open()
                                       for _ in range(min(100, count - start))))
        await asyncio.gather(*(conn.request(raw) for conn in batch))
        conns.extend(batch)
    if time.monotonic() - began > 60:
        raise SystemExit("opening the idle connections took longer than nginx keeps them")
    held = nginx_memory(master)
    # still open: each gets another answer on the connection it kept
    statuses = await asyncio.gather(*(conn.request(raw) for conn in conns[:50]))
    assert all(s == 200 for s, _ in statuses), statuses
    for conn in conns:
        conn.close()
    return idle, held, len(conns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=4000, help="small requests per CPU measurement")
    parser.add_argument("--wakes", type=int, default=20)
    parser.add_argument("--idle", type=int, default=2500, help="idle connections held for the memory figure")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.idle + 1000)), hard))

    load_before = os.getloadavg()[0]
    setup = Setup()
    try:
        setup.start()
        paths = page_urls(setup)
        print(f"page: {len(paths)} GETs", flush=True)
        loads = asyncio.run(page_loads(setup, paths, args.runs))
        direct, through = statistics.median(loads["direct"]), statistics.median(loads["edge"])
        # the loads alternate: the ratio of each pair sees the same moment of the machine's noise
        pair_ratios = sorted(e / d for d, e in zip(loads["direct"], loads["edge"]))
        print(f"page load: direct {direct * 1000:.0f} ms, edge {through * 1000:.0f} ms", flush=True)
        plain = setup.start_plain_nginx()
        cpu = asyncio.run(cpu_per_request(setup, plain, args.requests, args.runs))
        cpu_us = {name: statistics.median(values) * 1e6 for name, values in cpu.items()}
        print("CPU per request: " + ", ".join(f"{name} {us:.1f} us" for name, us in cpu_us.items()), flush=True)
        idle, held, count = asyncio.run(idle_memory(setup, args.idle))
        print(f"edge RSS: idle {idle[0] / 2**20:.1f} MiB, {count} connections {held[0] / 2**20:.1f} MiB", flush=True)
        times = sorted(wake_times(setup, args.wakes))
        p50 = statistics.median(times)
        p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
        print(f"wake: p50 {p50:.2f}s p99 {p99:.2f}s", flush=True)
    finally:
        setup.close()

    load_after = os.getloadavg()[0]
    tls_ratio = cpu_us["edge, TLS"] / cpu_us["plain nginx, TLS"]
    http_ratio = cpu_us["edge, HTTP (own port)"] / cpu_us["plain nginx, HTTP"]
    rows = [
        ("page load, SillyTavern 1.19.0 "
         f"({len(paths)} GETs, 6 at a time, fresh connections; median of {args.runs})",
         f"direct to node's socket (HTTP) {direct * 1000:.0f} ms; edge (TLS) {through * 1000:.0f} ms",
         f"{through / direct:.2f}x (median of the pairs' ratios {statistics.median(pair_ratios):.2f}x, "
         f"{pair_ratios[0]:.2f} … {pair_ratios[-1]:.2f})", "<= 1.1x"),
        (f"nginx workers' CPU per relayed request, TLS ({args.requests} x {SMALL}, 4 keep-alive connections; "
         f"median of {args.runs})",
         f"plain nginx {cpu_us['plain nginx, TLS']:.1f} us; edge {cpu_us['edge, TLS']:.1f} us",
         f"{tls_ratio:.2f}x", "<= 1.5x"),
        ("the same over plain HTTP (the edge at the instance's own port)",
         f"plain nginx {cpu_us['plain nginx, HTTP']:.1f} us; edge {cpu_us['edge, HTTP (own port)']:.1f} us",
         f"{http_ratio:.2f}x", "<= 1.5x"),
        (f"wake through the edge (real 1.19.0; parked through the API, then GET / over TLS, whole answer; "
         f"{len(times)} wakes)", f"p50 {p50:.2f} s, p99 {p99:.2f} s (min {times[0]:.2f}, max {times[-1]:.2f})", "", ""),
        (f"edge memory (master + workers), idle / with {count} idle TLS keep-alive connections",
         f"RSS {idle[0] / 2**20:.1f} MiB / {held[0] / 2**20:.1f} MiB ({(held[0] - idle[0]) / count / 1024:.1f} KiB "
         f"a connection); PSS {idle[1] / 2**20:.1f} MiB / {held[1] / 2**20:.1f} MiB", "", ""),
    ]
    table = ["| figure | measured | ratio | goal |", "|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    print("\n".join(table))
    RESULTS.write_text("\n".join([
        "# The edge's cost (bench/edge.py)",
        "",
        f"Measured {date.today()} on this machine ({os.cpu_count()} cores, shared; nginx "
        f"{subprocess.run([NGINX, '-v'], capture_output=True, text=True).stderr.strip().split('/')[-1]}), "
        "one `cst serve` with `settings.edge` (TLS, a trustme certificate for `*.st.test`) and one "
        "SillyTavern 1.19.0 instance behind it. \"Direct\" is node's own Unix socket "
        "(`reconciler.runtime.edge.Paths(state_dir).socket(id)`) in plain HTTP, without nginx; \"plain nginx\" "
        "is Debian's nginx with a minimal configuration (`proxy_pass` to the same socket, workers as the edge's). "
        f"The machine's load average (1 min) was {load_before:.1f} before and {load_after:.1f} after: on this "
        "shared machine other work runs beside the bench, and the figures move with it (the ratios less "
        "than the times).",
        "",
        *table,
        "",
        "Reproduce:",
        "",
        "```sh",
        f"CST_SILLYTAVERN_HOME=.cache/sillytavern .venv/bin/python bench/edge.py --runs {args.runs} "
        f"--requests {args.requests} --wakes {args.wakes} --idle {args.idle}",
        "```",
        "",
        "See the docstring of bench/edge.py for what each figure measures.",
        "",
    ]))


if __name__ == "__main__":
    main()
