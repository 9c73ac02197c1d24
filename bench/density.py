"""How many hosted users one machine holds with parking (issue 19), on the real SillyTavern 1.19.0.

Four measurements, each printed as it ends:

1. memory of one idle instance with and without the lean node profile: the page loaded in
   chromium, a tokenizer run in it (tiktoken's WebAssembly: what --jitless would break), then
   15 s idle; RSS of the process tree, median of --runs;
2. what the front door costs while an instance runs: one small request at a time (latency), and a
   page load (the ~350 GETs chromium made for the page, 6 at a time as a browser does), straight
   to node and through the door, alternating, medians of --runs; with cst serve's CPU per request;
3. wake time: the first byte of the first request after parking (parked through the API), p50
   and p99 over --wakes;
4. a fleet: --instances declared with park_after, all parked, then --active of them woken by a
   page load; the memory of everything (cst serve and every node), and from it how many hosted
   users fit in 24 GiB at that share of active users.

    CST_SILLYTAVERN_HOME=.cache/sillytavern .venv/bin/python bench/density.py --runs 3 --wakes 20 --instances 100
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CST = [sys.executable, "-m", "reconciler"]
CHROMIUM = os.environ.get("CST_CHROMIUM", "/usr/bin/chromium")
ADMIN_KEY = "bench-admin-key"
GiB = 2 ** 30
MiB = 2 ** 20


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tree_rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return 0


class Fleet:
    """A folder with a desired.yaml and, optionally, a `cst serve` on it."""

    def __init__(self, instances: list[int], sillytavern: str, extra: str = ""):
        self.dir = Path(tempfile.mkdtemp(prefix="cst-bench-density-"))
        os.chmod(self.dir, 0o755)   # as root, instances run under uids of their own
        self.api, self.proxy = free_ports(2)
        self.ports = instances
        lines = ["version: 1", "settings:", "  concurrency: 2", f"  sillytavern: {{{sillytavern}}}",
                 f'  api: {{listen: "127.0.0.1:{self.api}"}}', f'  proxy: {{listen: "127.0.0.1:{self.proxy}"}}',
                 *[f"  {line}" for line in extra.splitlines()], "instances:"]
        lines += [f"  - port: {port}" for port in instances]
        self.file = self.dir / "desired.yaml"
        self.file.write_text("\n".join(lines) + "\n")
        self.serve: subprocess.Popen | None = None

    def cst(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CST, *args, "-f", str(self.file)], cwd=ROOT, capture_output=True, text=True,
                              timeout=1800, check=False)

    def start_serve(self) -> None:
        self.serve = subprocess.Popen([*CST, "serve", "-f", str(self.file)], cwd=ROOT,
                                      env={**os.environ, "CST_ADMIN_KEY": ADMIN_KEY},
                                      stdout=open(self.dir / "serve.log", "wb"),  # noqa: SIM115 -- serve's stdout
                                      stderr=subprocess.STDOUT)

    def api_call(self, method: str, path: str) -> httpx.Response:
        return httpx.request(method, f"http://127.0.0.1:{self.api}{path}", headers={"X-ST-Admin-Key": ADMIN_KEY},
                             timeout=600)

    def rows(self) -> dict[str, dict]:
        try:
            return {row["id"]: row for row in self.api_call("GET", "/api/instances").json()}
        except (httpx.HTTPError, ValueError):
            return {}

    def password(self, port: int) -> str:
        return (self.dir / ".cst" / "secrets" / f"st-instance-{port}.password").read_text().strip()

    def record(self, port: int) -> dict:
        return json.loads((self.dir / ".cst" / "instances" / f"st-instance-{port}.json").read_text())

    def close(self) -> None:
        if self.serve is not None:
            self.serve.terminate()
            self.serve.wait(30)
        self._stop_edge()
        for proc in psutil.process_iter(["environ"]):
            try:
                if (proc.info["environ"] or {}).get("CST_STATE_DIR") == str(self.dir / ".cst"):
                    proc.kill()
            except psutil.Error:
                continue
        shutil.rmtree(self.dir, ignore_errors=True)


    def _stop_edge(self) -> None:
        """The edge's nginx outlives cst serve by design: stopped here by its pid (a tree from before the
        edge has none)."""
        try:
            from reconciler.runtime import edge
        except ModuleNotFoundError as exc:
            if exc.name != "reconciler.runtime.edge":
                raise
            return
        paths = edge.Paths((self.dir / ".cst").resolve())
        master = edge.master_pid(paths)
        if master is not None:
            os.killpg(master, signal.SIGKILL)
        shutil.rmtree(paths.run, ignore_errors=True)


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def load_page(context, url: str):
    """SillyTavern's page at ``url``, loaded in ``context`` until it is ready (its greeting or its
    chat box shown); the page, and the URLs of the GETs it made (filled in as it goes on)."""
    page = context.new_page()
    gets: list[str] = []
    page.on("request", lambda r: gets.append(r.url) if r.method == "GET" else None)
    page.goto(url, timeout=300_000)
    page.locator(".popup-button-ok:visible").or_(page.locator("#send_textarea")).first.wait_for(timeout=120_000)
    return page, gets


def open_page(browser, port: int, password: str) -> list[str]:
    """Load SillyTavern's page as its user, run a tokenizer in it; the URLs of the GETs it made."""
    context = browser.new_context(http_credentials={"username": f"st-instance-{port}", "password": password})
    page, gets = load_page(context, f"http://127.0.0.1:{port}/")
    greeting = page.locator(".popup-button-ok:visible")
    if greeting.count():
        greeting.first.click()
    counted = page.evaluate("""async () => {
        const { token } = await (await fetch('/csrf-token')).json();
        const r = await fetch('/api/tokenizers/openai/count?model=gpt-4o', {method: 'POST',
            headers: {'Content-Type': 'application/json', 'X-CSRF-Token': token},
            body: JSON.stringify([{role: 'user', content: 'how many tokens is this?'}])});
        return (await r.json()).token_count; }""")
    if not counted:
        raise SystemExit(f"the tokenizer did not count on port {port}: {counted!r}")
    context.close()
    return [url for url in gets if url.startswith(f"http://127.0.0.1:{port}/")]


def idle_memory(browser, lean: bool, runs: int) -> float:
    samples = []
    for _ in range(runs):
        (port,) = free_ports(1)
        fleet = Fleet([port], f'version: "1.19.0", start_timeout: 300, lean: {str(lean).lower()}')
        try:
            applied = fleet.cst("apply")
            assert applied.returncode == 0, applied.stdout + applied.stderr
            open_page(browser, port, fleet.password(port))
            time.sleep(15)
            samples.append(tree_rss(fleet.record(port)["pid"]))
        finally:
            fleet.close()
    return statistics.median(samples)


def page_load(urls: list[str], loaded_from: int, port: int, auth: tuple[str, str]) -> float:
    """Seconds to GET every URL of a page load (made on ``loaded_from``) from ``port``, six at a
    time as a browser does."""
    moved = [url.replace(f"127.0.0.1:{loaded_from}/", f"127.0.0.1:{port}/", 1) for url in urls]
    with httpx.Client(auth=auth, timeout=60, limits=httpx.Limits(max_connections=6)) as client:
        began = time.perf_counter()
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda url: client.get(url).status_code, moved))
        took = time.perf_counter() - began
    bad = [s for s in statuses if s >= 400]
    if bad:
        raise SystemExit(f"a page load got {len(bad)} errors: {bad[:5]}")
    return took


def door_cost(browser, fleet: Fleet, port: int, runs: int) -> None:
    auth = (f"st-instance-{port}", fleet.password(port))
    urls = open_page(browser, port, auth[1])
    backend = fleet.record(port)["backend_port"]
    serve = psutil.Process(fleet.serve.pid)
    small = "/api/plugins/cst/health"
    latency: dict[str, list[float]] = {"direct": [], "door": []}
    loads: dict[str, list[float]] = {"direct": [], "door": []}
    cpu_per_request: list[float] = []
    with httpx.Client(auth=auth, timeout=30) as client:
        for _ in range(runs):
            for name, target in (("direct", backend), ("door", port)):
                times = []
                for _ in range(200):
                    began = time.perf_counter()
                    client.get(f"http://127.0.0.1:{target}{small}")
                    times.append(time.perf_counter() - began)
                latency[name].append(statistics.median(times))
                cpu = serve.cpu_times()
                loads[name].append(page_load(urls, port, target, auth))
                if name == "door":
                    spent = sum(serve.cpu_times()[:2]) - sum(cpu[:2])
                    cpu_per_request.append(spent / len(urls))
    print(f"front door, one request at a time ({small}, median of 200, median of {runs} runs): "
          f"direct {statistics.median(latency['direct']) * 1000:.2f} ms, "
          f"through the door {statistics.median(latency['door']) * 1000:.2f} ms")
    direct, door = statistics.median(loads["direct"]), statistics.median(loads["door"])
    print(f"front door, a page load of {len(urls)} GETs, 6 at a time (median of {runs}): direct {direct * 1000:.0f} ms, "
          f"through the door {door * 1000:.0f} ms ({door / direct:.2f}x); cst serve's CPU "
          f"{statistics.median(cpu_per_request) * 1e6:.0f} us per request")


def wake_times(fleet: Fleet, port: int, wakes: int) -> list[float]:
    auth = (f"st-instance-{port}", fleet.password(port))
    times = []
    for _ in range(wakes):
        parked = fleet.api_call("POST", f"/api/instances/st-instance-{port}/park")
        assert parked.status_code == 200, parked.text
        began = time.perf_counter()
        with httpx.stream("GET", f"http://127.0.0.1:{port}/", auth=auth, timeout=120) as answer:
            next(answer.iter_raw())
            assert answer.status_code == 200, answer.status_code
        times.append(time.perf_counter() - began)
    return times


def fleet_memory(browser, instances: int, active: int, lean: str) -> None:
    ports = free_ports(instances)
    # long enough for the active users' pages to be loaded one after the other before any parks again
    fleet = Fleet(ports, f'version: "1.19.0", start_timeout: 300, park_after: 10m, lean: {lean}', extra="resync: 5s")
    try:
        fleet.start_serve()
        began = time.monotonic()
        wait(lambda: sum(r["observed"] == "parked" for r in fleet.rows().values()) == instances, 3600,
             f"{instances} instances parked")
        print(f"fleet: {instances} instances declared, all parked (never started) after {time.monotonic() - began:.0f}s")
        for port in ports[:active]:   # the active users come back, one after the other
            open_page(browser, port, fleet.password(port))
        time.sleep(15)   # as idle as the single instance measured above
        rows = fleet.rows()
        nodes = sum(row["memory"] or 0 for row in rows.values())
        running = sum(row["observed"] == "running" for row in rows.values())
        serve = psutil.Process(fleet.serve.pid).memory_info().rss   # itself: the instances are counted above
        total = nodes + serve
        per_user = total / instances
        print(f"fleet: {instances} declared, {running} active: nodes {nodes / MiB:.0f} MiB + cst serve "
              f"{serve / MiB:.0f} MiB = {total / MiB:.0f} MiB; {per_user / MiB:.1f} MiB per hosted user, "
              f"{24 * GiB / per_user:.0f} hosted users in 24 GiB at {active / instances:.0%} active")
    finally:
        fleet.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--wakes", type=int, default=20)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--active", type=int, default=10)
    parser.add_argument("--only", choices=["memory", "door", "wake", "fleet"], action="append")
    parser.add_argument("--plain", action="store_true", help="door, wake and fleet with node's defaults (lean: false)")
    args = parser.parse_args()
    only = set(args.only or ["memory", "door", "wake", "fleet"])
    lean = "false" if args.plain else "true"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            if "memory" in only:
                lean, plain = idle_memory(browser, True, args.runs), idle_memory(browser, False, args.runs)
                print(f"one idle instance (page loaded, a tokenizer run, 15 s idle; median of {args.runs}): "
                      f"lean {lean / MiB:.0f} MiB, node's defaults {plain / MiB:.0f} MiB "
                      f"({(plain - lean) / MiB:.0f} MiB less)")
            if only & {"door", "wake"}:
                (port,) = free_ports(1)
                fleet = Fleet([port], f'version: "1.19.0", start_timeout: 300, park_after: 1h, lean: {lean}')
                try:
                    fleet.start_serve()
                    wait(lambda: fleet.rows().get(f"st-instance-{port}", {}).get("observed") == "parked", 60,
                         "the instance parked (never started: nobody used it)")
                    woken = fleet.api_call("POST", f"/api/instances/st-instance-{port}/wake")
                    assert woken.status_code == 200, woken.text
                    if "door" in only:
                        door_cost(browser, fleet, port, args.runs)
                    if "wake" in only:
                        times = sorted(wake_times(fleet, port, args.wakes))
                        p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
                        print(f"wake, first byte after parking ({len(times)} wakes): p50 {statistics.median(times):.2f}s, "
                              f"p99 {p99:.2f}s, min {times[0]:.2f}s, max {times[-1]:.2f}s")
                finally:
                    fleet.close()
            if "fleet" in only:
                fleet_memory(browser, args.instances, args.active, lean)
        finally:
            browser.close()


if __name__ == "__main__":
    main()
