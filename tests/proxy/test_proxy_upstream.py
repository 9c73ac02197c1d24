"""The lean upstream HTTP/1.1 client against hand-written answers (framing, keep-alive, errors)."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Awaitable, Callable

import pytest

from conftest import eventually
from proxy.upstream import Origin, UpstreamClient, UpstreamError, UpstreamTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server whose answers are raw bytes, to exercise every framing."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> "RawServer":
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        self.origin = Origin.parse(f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head + body


HEAD = b"POST /v1/x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n"


async def body_of(client: UpstreamClient, origin: Origin, method: str = "POST") -> tuple[int, list[bytes]]:
    resp = await client.request(origin, method, HEAD, b"{}", timeout=2)
    pieces = []
    while chunk := await resp.read_some():
        pieces.append(chunk)
    resp.finish()
    return resp.status, pieces


async def test_chunked_answers_split_anywhere_with_trailers_and_keep_alive() -> None:
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
              b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n")

    async def handler(reader, writer):
        while True:
            await server.read_request(reader)
            for i in range(0, len(answer), 3):  # dribble the answer 3 bytes at a time
                writer.write(answer[i:i + 3])
                await writer.drain()
                await asyncio.sleep(0)

    client = UpstreamClient()
    async with RawServer(handler) as server:
        for _ in range(3):
            status, pieces = await body_of(client, server.origin)
            assert status == 200 and b"".join(pieces) == b"hello 0123456789"
        assert server.connections == 1, "the connection was kept alive and reused"
        assert server.requests[0] == HEAD + b"{}"
    await client.close()


async def test_content_length_read_until_close_and_no_body() -> None:
    async def handler(reader, writer):
        while True:
            request = await server.read_request(reader)
            if request.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
            elif b"close" in request:
                writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
                return
            else:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n"
                             b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-A: 1\r\n\r\nbody")
            await writer.drain()

    client = UpstreamClient()
    async with RawServer(handler) as server:
        resp = await client.request(server.origin, "POST", HEAD, b"{}", timeout=2)
        assert (resp.status, resp.reason, resp.content_length) == (201, "Created", 4) and b"X-A: 1\r\n" in resp.end_to_end
        assert await resp.read() == b"body"
        resp.finish()

        resp = await client.request(server.origin, "HEAD", b"HEAD / HTTP/1.1\r\n\r\n", None, timeout=2)
        assert resp.status == 200 and await resp.read() == b""
        resp.finish()
        resp = await client.request(server.origin, "POST", b"POST /close HTTP/1.1\r\n\r\n", None, timeout=2)
        assert await resp.read() == b"until the end"
        resp.finish()
    await client.close()


async def test_an_idle_connection_the_upstream_closed_is_never_used() -> None:
    """The upstream closes an idle keep-alive connection; its FIN is in the kernel but the event
    loop has not seen it yet. The peek before reuse sees it: the request goes out once, fresh."""
    closed = threading.Event()

    def serve(listener: socket.socket) -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                if not closed.is_set():
                    time.sleep(0.1)  # after the answer was read, the upstream gives up on the connection
                    conn.shutdown(socket.SHUT_RDWR)
                    closed.set()

    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=serve, args=(listener,), daemon=True)
    thread.start()
    origin = Origin.parse(f"http://127.0.0.1:{listener.getsockname()[1]}/v1")
    client = UpstreamClient()
    try:
        assert await body_of(client, origin) == (200, [b"ok"])
        closed.wait(5)   # blocks the loop on purpose: the FIN arrives, nobody reads it yet
        time.sleep(0.05)  # the FIN crosses loopback; seeing it would take reading it, which the test must not
        assert await body_of(client, origin) == (200, [b"ok"])
    finally:
        await client.close()
        thread.join(5)
        listener.close()


async def test_a_request_the_upstream_may_have_seen_is_not_re_sent() -> None:
    async def handler(reader, writer):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await server.read_request(reader)  # it read the request (and may have billed it), then died

    client = UpstreamClient()
    async with RawServer(handler) as server:
        assert await body_of(client, server.origin) == (200, [b"ok"])
        with pytest.raises(UpstreamError, match="before answering"):
            await body_of(client, server.origin)
        assert server.connections == 1 and len(server.requests) == 2, "sent once, not again"
    await client.close()


HOSTILE = {
    "negative Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
    "repeated Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    "conflicting Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\nok",
    "Content-Length list": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 9\r\n\r\nok",
    "Content-Length with chunked": (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"2\r\nok\r\n0\r\n\r\n"),
    "chunk size -2": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nok\r\n0\r\n\r\n",
    "chunk size 1_0": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\nok\r\n0\r\n\r\n",
    "chunk size 0x2": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nok\r\n0\r\n\r\n",
    "chunk size overflow": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"10000000000000000\r\nok\r\n0\r\n\r\n"),
    "folded header": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("answer", HOSTILE.values(), ids=HOSTILE.keys())
async def test_hostile_framing_fails_that_answer_and_the_next_gets_its_own(answer: bytes) -> None:
    async def handler(reader, writer):
        while True:
            request = await server.read_request(reader)
            writer.write(answer if b"/bad" in request else
                         b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(request) + request)
            await writer.drain()

    client = UpstreamClient()
    async with RawServer(handler) as server:
        with pytest.raises(UpstreamError, match="malformed"):
            resp = await client.request(server.origin, "POST", b"POST /bad HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                                        None, timeout=2)
            await resp.read()
        own = b"POST /mine HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        resp = await client.request(server.origin, "POST", own, None, timeout=2)
        assert await resp.read() == own, "the next answer is its own"
        resp.finish()
    await client.close()


async def test_an_answer_nobody_asked_for_drops_the_connection() -> None:
    stray_sent = asyncio.Event()

    async def handler(reader, writer):
        while True:
            request = await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(request) + request)
            if b"/first" in request:  # then a second answer to the same request
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
            await writer.drain()
            if b"/first" in request:
                stray_sent.set()

    client = UpstreamClient()
    async with RawServer(handler) as server:
        first = b"POST /first HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        resp = await client.request(server.origin, "POST", first, None, timeout=2)
        assert await resp.read() == first
        resp.finish()
        await eventually(stray_sent.is_set)  # the stray answer is on its way to the idle connection
        second = b"POST /second HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        resp = await client.request(server.origin, "POST", second, None, timeout=2)
        assert await resp.read() == second, "not the stray answer"
        resp.finish()
        assert server.connections == 2
    await client.close()


async def test_timeouts_broken_answers_and_refused_connections() -> None:
    async def handler(reader, writer):
        request = await server.read_request(reader)
        if b"hang" in request:
            await asyncio.sleep(10)   # a hung upstream, past the request's timeout
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
        await writer.drain()

    client = UpstreamClient()
    async with RawServer(handler) as server:
        with pytest.raises(UpstreamTimeout):
            await client.request(server.origin, "POST", b"POST /hang HTTP/1.1\r\n\r\n", None, timeout=0.2)
        resp = await client.request(server.origin, "POST", HEAD, b"{}", timeout=2)
        with pytest.raises(UpstreamError, match="mid-answer"):
            await resp.read()
        resp.close()
        port = server.origin.port
    with pytest.raises(UpstreamError, match="cannot connect"):
        await client.request(Origin.parse(f"http://127.0.0.1:{port}/v1"), "POST", HEAD, b"{}", timeout=2)
    await client.close()


class MovedClock:
    """Monotonic time a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_waits_end_at_their_own_deadline_of_silence_on_one_timer() -> None:
    """Waits carry deadlines that one timer checks: a wait ends no sooner than its own timeout of
    silence, bytes that keep coming keep an answer alive however long it takes in all, a cancelled
    request leaves nothing waiting, and the timer stops once nothing waits. Time is moved by hand."""
    chunks: asyncio.Queue[bytes] = asyncio.Queue()
    never = asyncio.Event()

    async def handler(reader, writer):
        request = await server.read_request(reader)
        if b"hang" in request:
            await never.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        while chunk := await chunks.get():
            writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    clock = MovedClock()
    client = UpstreamClient(clock=clock)
    hang = b"POST /hang HTTP/1.1\r\n\r\n"
    async with RawServer(handler) as server:
        # two waits, 5 s and 8 s: each ends when its own silence has lasted that long
        short = asyncio.ensure_future(client.request(server.origin, "POST", hang, None, timeout=5))
        long = asyncio.ensure_future(client.request(server.origin, "POST", hang, None, timeout=8))
        await eventually(lambda: client._deadlines is not None and len(client._deadlines.waiting) == 2)
        deadlines = client._deadlines
        assert deadlines is not None
        clock.now += 4.9
        deadlines.expire_overdue()
        assert len(deadlines.waiting) == 2, "neither has been silent for its timeout yet"
        clock.now += 0.2
        deadlines.expire_overdue()
        assert len(deadlines.waiting) == 1
        with pytest.raises(UpstreamTimeout):
            await short
        assert not long.done()
        clock.now += 3.0
        deadlines.expire_overdue()
        with pytest.raises(UpstreamTimeout):
            await long

        # an answer 24 s long in all, never 5 s silent: it completes
        resp = await client.request(server.origin, "POST", HEAD, b"{}", timeout=5)
        for _ in range(6):
            piece = asyncio.ensure_future(resp.read_some())
            await eventually(lambda: len(deadlines.waiting) == 1)
            clock.now += 4.0
            deadlines.expire_overdue()
            assert len(deadlines.waiting) == 1, "4 s of silence is not 5"
            chunks.put_nowait(b"x")
            assert await piece == b"x"
        chunks.put_nowait(b"")
        assert await resp.read() == b""
        resp.finish()

        cancelled = asyncio.ensure_future(client.request(server.origin, "POST", hang, None, timeout=30))
        await eventually(lambda: len(deadlines.waiting) == 1)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert not deadlines.waiting
        await eventually(lambda: not deadlines._ticking)
        never.set()
    await client.close()


def test_origin_parsing() -> None:
    o = Origin.parse("https://api.daidaibird.top/v1/")
    assert (o.host, o.port, o.base_path, o.host_header, o.tls) == ("api.daidaibird.top", 443, "/v1",
                                                                   b"api.daidaibird.top", True)
    o = Origin.parse("http://[::1]:8080/openai/v1")
    assert (o.host, o.port, o.base_path, o.host_header) == ("::1", 8080, "/openai/v1", b"[::1]:8080")
