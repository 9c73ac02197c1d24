"""Benchmark: CPU per request of proxy/upstream.py alone, this checkout against another one.

    .venv/bin/python bench/proxy/upstream_client.py --baseline DIR [--rounds 15] [--requests 2000]

One process on uvloop: a minimal server that answers every request with the same small
completion (Content-Length) or a short chunked stream, and the two clients taking turns in
rounds of sequential keep-alive requests. The server's share is the same for both, so the
difference of the medians of process CPU per request is what one client costs more than the
other. DIR is a checkout of the baseline (``git archive main | tar -x -C DIR``).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from proxy import upstream as current  # noqa: E402

BODY = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",' \
       b'"content":"w0 w1 w2 w3 w4"},"finish_reason":"stop"}]}'
ANSWERS = {
    "length": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY),
    "chunked": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in [b"data: {\"w\": %d}\n\n" % i for i in range(5)])
               + b"0\r\n\r\n",
}
REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"


def load(path: Path):
    spec = importlib.util.spec_from_file_location("baseline_upstream", path / "proxy" / "upstream.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


async def serve(answer: bytes) -> asyncio.Server:
    class Answering(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):  # one request per packet in this benchmark
            self.transport.write(answer)

    return await asyncio.get_running_loop().create_server(Answering, "127.0.0.1", 0)


async def cpu_per_request(module, origin_url: str, n: int) -> float:
    client = module.UpstreamClient()
    origin = module.Origin.parse(origin_url)
    start = time.process_time()
    for _ in range(n):
        resp = await client.request(origin, "POST", REQUEST, b"{}", 5.0)
        while await resp.read_some():
            pass
        resp.finish()
    spent = time.process_time() - start
    await client.close()
    return spent / n


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    baseline = load(args.baseline)
    for framing, answer in ANSWERS.items():
        server = await serve(answer)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        results: dict[str, list[float]] = {"baseline": [], "current": []}
        for _ in range(args.rounds):
            for name, module in (("baseline", baseline), ("current", current)):
                results[name].append(await cpu_per_request(module, url, args.requests))
        server.close()
        b, c = (statistics.median(results[k]) * 1e6 for k in ("baseline", "current"))
        diffs = sorted((x - y) * 1e6 for x, y in zip(results["current"], results["baseline"]))
        print(f"{framing:8}: CPU per request (client + server) baseline {b:.1f} us, this checkout {c:.1f} us, "
              f"difference {c - b:+.1f} us (median of per-round differences {statistics.median(diffs):+.1f} us)")


if __name__ == "__main__":
    uvloop.run(main())
