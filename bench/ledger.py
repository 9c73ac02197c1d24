"""Benchmark: the ledger's own costs, apart from the HTTP around them.

    .venv/bin/python bench/ledger.py [--runs 5] [--rows 200000]

* the bookkeeping each proxied chat request adds on the event loop: reading the body
  (``request_body.inspect``), admission against a budget, settlement and handing the row to the
  writer (CPU per request, median of the runs);
* the rows per second the SQLite store sustains, written in the writer's batches (a thread of
  its own, as in the proxy), and its size on disk per million requests.

The end-to-end figure (the proxy's CPU per request and its latency, before vs after) is
``bench/proxy/bench.py --baseline DIR --baseline-without-budgets``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from proxy.budget import Reservation, UsageBook, charge  # noqa: E402
from proxy.calendar import Calendar  # noqa: E402
from proxy.ledger import LedgerWriter, Row, SqliteStore  # noqa: E402
from proxy.metering import MeteringPolicy  # noqa: E402
from proxy.request_body import inspect  # noqa: E402
from reconciler.desired.model import Budget, MeteringSettings  # noqa: E402

BODY = json.dumps({"model": "gpt-fake", "messages": [{"role": "user", "content": "Hello, how are you?"}],
                   "max_tokens": 300}).encode()
CALLER = "st-instance-8001"
POLICY = MeteringPolicy(MeteringSettings())


class NullWriter:
    """Takes rows as the writer does (one queue put), writes nothing: the loop's share alone."""

    def __init__(self) -> None:
        import queue
        self._queue: queue.SimpleQueue[Row] = queue.SimpleQueue()

    def append(self, row: Row) -> None:
        self._queue.put(row)


def bookkeeping(n: int) -> float:
    """CPU seconds per request of what the event loop does for the ledger and budgets."""
    book = UsageBook(Calendar("Asia/Shanghai"), NullWriter())  # type: ignore[arg-type]
    book.budgets = {CALLER: Budget(tokens_per_day=10**12, tokens_per_month=10**12, requests_per_minute=10**6)}
    start = time.process_time()
    for _ in range(n):
        facts = inspect("/v1/chat/completions", "POST", BODY, POLICY)
        reservation = book.admit(CALLER, facts)
        assert isinstance(reservation, Reservation)
        prompt, completion, estimated = charge(facts, (12, 30), True, 0)
        book.settle(reservation, 200, prompt, completion, estimated, "sk-ab…1234")
    return (time.process_time() - start) / n


def store_rate(rows: int, folder: Path) -> tuple[float, float, float]:
    """(rows written per second, CPU seconds per row, bytes on disk per row) through the writer."""
    path = folder / "ledger.sqlite3"
    store = SqliteStore(path)
    writer = LedgerWriter(store, retention=90 * 86400)
    now = time.time()
    sample = [Row(f"st-instance-{8001 + i % 50}", "gpt-4o-mini", "/v1/chat/completions", 200, 812, 240, False,
                  now + i * 1e-3, now + i * 1e-3 + 2.5, "sk-ab…1234", "2026-12-01", f"bench-{i}")
              for i in range(rows)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for row in sample:
        writer.append(row)
    writer.close()   # returns once every row is committed
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    size = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("ledger.sqlite3"))
    return rows / wall, cpu / rows, size / rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    loop_cpu, rates, row_cpu, sizes = [], [], [], []
    for run in range(args.runs):
        loop_cpu.append(bookkeeping(50_000))
        with tempfile.TemporaryDirectory() as tmp:
            rate, cpu, size = store_rate(args.rows, Path(tmp))
        rates.append(rate)
        row_cpu.append(cpu)
        sizes.append(size)
        print(f"run {run + 1}: bookkeeping {loop_cpu[-1] * 1e6:.2f} us/request; store {rate:,.0f} rows/s, "
              f"{cpu * 1e6:.2f} us CPU/row, {size:.0f} bytes/row", flush=True)
    med = statistics.median
    print()
    print(f"event-loop bookkeeping per request (inspect + admit + settle + hand-off): {med(loop_cpu) * 1e6:.2f} us")
    print(f"SQLite store: {med(rates):,.0f} rows/s sustained, {med(row_cpu) * 1e6:.2f} us of CPU per row "
          f"(writer thread), {med(sizes) * 1e6 / 2**20:.0f} MiB per million requests")


if __name__ == "__main__":
    main()
