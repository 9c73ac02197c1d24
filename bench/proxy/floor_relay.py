"""The floor of a relay in Python: what relaying a request costs on uvloop with nothing else done.

    .venv/bin/python bench/proxy/floor_relay.py UPSTREAM_PORT PORT [--task]

Not CST's proxy: a yardstick for bench.py (``--floor``). Each client connection is an
``asyncio.Protocol`` with httptools' request parser; a whole request goes to an idle keep-alive
upstream connection (its parser httptools' too) with the pool key put in, and the whole answer
comes back as one write: status line, the upstream's headers less the hop-by-hop ones, a
Content-Length, the body. No request object, no header dict, no accounting, no streaming (an
answer is relayed once complete), callbacks only; ``--task``: each request handled by a
coroutine in a task of its own, awaiting the answer as CST's forward() does. Prints ``ready``
once it listens.
"""
from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

POOL_KEY = b"Authorization: Bearer sk-good-bench0000xxxxxxxxxxxx\r\n"
DROP_REQUEST = frozenset({b"host", b"authorization", b"content-length", b"connection", b"keep-alive",
                          b"accept-encoding", b"transfer-encoding"})
DROP_RESPONSE = frozenset({b"content-length", b"connection", b"keep-alive", b"transfer-encoding"})


class Upstream(asyncio.Protocol):
    def __init__(self, relay: "Relay"):
        self.relay = relay
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.answer: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.relay.idle:
            self.relay.idle.remove(self)

    def on_message_begin(self) -> None:
        self.headers: list[bytes] = []
        self.body: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in DROP_RESPONSE:
            self.headers += (name, b": ", value, b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        answer = (b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code() + b"".join(self.headers)
                  + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        client, self.client = self.client, None
        self.relay.idle.append(self)
        if self.answer is not None:
            self.answer.set_result(answer)
            self.answer = None
        elif client is not None:
            client.transport.write(answer)


class Client(asyncio.Protocol):
    def __init__(self, relay: "Relay"):
        self.relay = relay
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers: list[bytes] = []
        self.body: list[bytes] = []

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in DROP_REQUEST:
            self.headers += (name, b": ", value, b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        request = (self.parser.get_method() + b" " + self.url + b" HTTP/1.1\r\n" + self.relay.host
                   + b"".join(self.headers) + POOL_KEY + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        if self.relay.tasks:
            asyncio.get_running_loop().create_task(self.handle(request))
        elif self.relay.idle:
            upstream = self.relay.idle.pop()
            upstream.client = self
            upstream.transport.write(request)
        else:
            asyncio.get_running_loop().create_task(self.handle(request, write=True))

    async def handle(self, request: bytes, write: bool = False) -> None:
        upstream = self.relay.idle.pop() if self.relay.idle else await self.relay.connect()
        if write:   # callbacks only: the answer is written by the upstream's callback
            upstream.client = self
            upstream.transport.write(request)
            return
        upstream.answer = asyncio.get_running_loop().create_future()
        upstream.transport.write(request)
        self.transport.write(await upstream.answer)


class Relay:
    def __init__(self, upstream_port: int, tasks: bool):
        self.upstream_port = upstream_port
        self.host = b"Host: 127.0.0.1:%d\r\n" % upstream_port
        self.tasks = tasks
        self.idle: list[Upstream] = []

    async def connect(self) -> Upstream:
        _, upstream = await asyncio.get_running_loop().create_connection(lambda: Upstream(self), "127.0.0.1",
                                                                         self.upstream_port)
        return upstream


async def main() -> None:
    relay = Relay(int(sys.argv[1]), "--task" in sys.argv[3:])
    await asyncio.get_running_loop().create_server(lambda: Client(relay), "127.0.0.1", int(sys.argv[2]), backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main())
