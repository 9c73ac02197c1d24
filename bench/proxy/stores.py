"""Benchmark: what the shared PostgreSQL store costs the proxy, beside the SQLite store and a proxy
without a ledger, in one run; what three replicas on one store sustain; how fast a verdict on a
key and a revoked instance key reach another replica.

    .venv/bin/python bench/proxy/stores.py [--runs 5] [--seconds 4] [--no-ledger DIR]

``--no-ledger DIR``: a checkout from before the ledger (``git archive fd9302c | tar -x -C DIR``),
whose proxy runs beside the others with no budget and no ledger. A PostgreSQL cluster of the
benchmark's own is started (Debian's server, as in the tests) with fsync on, as a host would run it.
Every proxy is called as an instance with a budget it never reaches, so every request is admitted
(in the PostgreSQL store: one ``cst_reserve`` round trip) and settled (a ledger row).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "proxy"))
from postgres_cluster import PASSWORD, PostgresCluster  # noqa: E402

from bench import BODY, BUDGET, CALLER, CALLER_KEY, KEYS, paired, spawn, start_upstream, stop, throughput, wait_http  # noqa: E402
from ports import free_port  # noqa: E402  (bench.py put tests/ on the path)
from proxy.postgres import PostgresStore  # noqa: E402
from proxy.shared import KeyVerdict, SharedStore  # noqa: E402

PASSWORD_ENV = "BENCH_STORE_PASSWORD"
med = statistics.median


def desired(workdir: Path, upstream_port: int, store: str | None, budget: bool = True) -> Path:
    keys = workdir / "state" / "secrets" / "proxy-keys"
    keys.mkdir(parents=True, mode=0o700)
    (keys / CALLER).write_text(CALLER_KEY + "\n")
    (keys / CALLER).chmod(0o600)
    usage = f"  usage: {{store: \"{store}\", store_password_env: {PASSWORD_ENV}}}\n" if store else ""
    path = workdir / "desired.yaml"
    path.write_text(
        f"version: 1\nsettings:\n  state_dir: state\n{usage}  proxy:\n"
        f"    listen: \"127.0.0.1:{free_port()}\"\n    upstream: \"http://127.0.0.1:{upstream_port}/v1\"\n"
        "accounts:\n  - {name: bench, provider: static, keys_env: BENCH_KEYS}\n"
        f"instances:\n  - port: 8001\n" + (f"    budget: {BUDGET}\n" if budget else ""))
    return path


async def start(path: Path, code: Path = ROOT, listen: bool = True):
    port = free_port()
    env = {**os.environ, "BENCH_KEYS": KEYS, PASSWORD_ENV: PASSWORD, "PYTHONPATH": str(code)}
    args = [sys.executable, "-m", "proxy.cli", "-f", str(path), "--log-level", "warning"]
    if listen:
        args += ["--listen", f"127.0.0.1:{port}"]
    else:   # a checkout from before --listen: its file's address
        port = int(path.read_text().split('listen: "127.0.0.1:')[1].split('"')[0])
    proc = spawn(args, env, cwd=code)
    await wait_http(f"http://127.0.0.1:{port}/health")
    return proc, port


async def spread(ports: list[int], concurrency: int, seconds: float) -> float:
    """Requests per second with ``concurrency`` connections spread evenly over ``ports`` (as a
    load balancer would), all measured at once."""
    share = concurrency // len(ports)
    results = await asyncio.gather(*(throughput(port, share, seconds, None) for port in ports))
    return sum(rate for rate, _ in results)


async def propagation(url: str, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds from one replica's publication to another's callback: key verdicts, instance keys."""
    loop = asyncio.get_running_loop()
    heard: asyncio.Future[float] | None = None

    def arrived(_: object) -> None:
        if heard is not None and not heard.done():
            heard.set_result(time.perf_counter())

    connect = {"password": PASSWORD, "autocommit": True}
    store = PostgresStore(url, connect)
    await asyncio.to_thread(store.ensure_schema)
    ignore = lambda _: None   # noqa: E731
    speaker = SharedStore(url, connect, "bench-a", False, store.ensure_schema, ignore, ignore)
    listener = SharedStore(url, connect, "bench-b", False, store.ensure_schema, arrived, arrived)
    await speaker.start(10)
    await listener.start(10)
    verdicts, keys = [], []
    try:
        for i in range(rounds):
            for kind, out in (("verdict", verdicts), ("keys", keys)):
                heard = loop.create_future()
                sent = time.perf_counter()
                if kind == "verdict":
                    speaker.publish_key(KeyVerdict(f"{i:064x}", time.time() + 60, False, "bench"))
                else:
                    speaker.publish_instance_keys({CALLER: os.urandom(32)})
                out.append(await asyncio.wait_for(heard, 5) - sent)
    finally:
        await speaker.close()
        await listener.close()
        store.close()
    return verdicts, keys


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--no-ledger", type=Path, help="a checkout from before the ledger (see the docstring)")
    args = parser.parse_args()

    cluster = PostgresCluster(free_port(), durable=True)
    upstream, up_port = start_upstream(5, 0.0)
    procs = []
    try:
        cluster.start()
        url = cluster.url(cluster.new_database())
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            kinds: dict[str, tuple] = {}
            kinds["sqlite"] = await start(desired(work / "sqlite", up_port, None))
            pg_file = desired(work / "pg", up_port, url)
            kinds["postgresql"] = await start(pg_file)
            if args.no_ledger:
                kinds["no ledger"] = await start(desired(work / "none", up_port, None, budget=False),
                                                 args.no_ledger, listen=False)
            procs = [proc for proc, _ in kinds.values()]
            cpu: dict[str, list[float]] = {k: [] for k in kinds}
            rate: dict[str, list[float]] = {k: [] for k in kinds}
            added: dict[str, list[float]] = {k: [] for k in kinds}
            for run in range(args.runs):
                line = []
                for kind, (proc, port) in kinds.items():
                    r, c = await throughput(port, args.concurrency, args.seconds, proc.pid)
                    _, _, plus = await paired(up_port, port, BODY, 500, first_byte=False)
                    rate[kind].append(r)
                    cpu[kind].append(c)
                    added[kind].append(plus)
                    line.append(f"{kind} {r:.0f} req/s, {c * 1e6:.0f} us CPU/req, +{plus * 1e3:.3f} ms p50")
                print(f"run {run + 1}: " + "; ".join(line), flush=True)

            # three replicas on the one store, the load spread over them; one replica alone beside it
            replicas = [await start(pg_file) for _ in range(2)] + [kinds["postgresql"]]
            procs += [proc for proc, _ in replicas[:2]]
            three, one = [], []
            for _ in range(args.runs):
                three.append(await spread([port for _, port in replicas], args.concurrency, args.seconds))
                one.append(await spread([replicas[-1][1]], args.concurrency, args.seconds))
            verdicts, keys = await propagation(url, 50)
    finally:
        for proc in procs:
            stop(proc)
        stop(upstream)
        cluster.remove()

    print()
    for kind in cpu:
        print(f"{kind:>10}: {med(rate[kind]):.0f} req/s at {args.concurrency} connections, "
              f"CPU {med(cpu[kind]) * 1e6:.0f} us/request, added p50 latency {med(added[kind]) * 1e3:.3f} ms "
              f"(medians of {args.runs} runs)")
    base = med(cpu["sqlite"])
    print(f"postgresql vs sqlite: CPU x{med(cpu['postgresql']) / base:.2f} "
          f"({(med(cpu['postgresql']) - base) * 1e6:+.0f} us/request), added p50 "
          f"{(med(added['postgresql']) - med(added['sqlite'])) * 1e3:+.3f} ms")
    print(f"three replicas on one store: {med(three):.0f} req/s in all; one replica alone {med(one):.0f} req/s "
          f"(ratio {med(three) / med(one):.2f}; 2 cores shared with the upstream and the load generator)")
    q = statistics.quantiles
    print(f"a key verdict reaches another replica in {med(verdicts) * 1e3:.2f} ms "
          f"(p99 {q(verdicts, n=100)[98] * 1e3:.2f} ms); an instance key change in {med(keys) * 1e3:.2f} ms "
          f"(p99 {q(keys, n=100)[98] * 1e3:.2f} ms), over 50 of each (LISTEN/NOTIFY)")


if __name__ == "__main__":
    asyncio.run(main())
