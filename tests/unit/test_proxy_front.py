"""The proxy's own HTTP/1.1 front, spoken to over raw loopback sockets: what a client may send it
and what it answers, byte for byte where framing matters."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

import pytest

from conftest import eventually
from proxy.front import MAX_HEAD, Answer, Front, Request, Stream


class Seen:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.cancelled = 0
        self.release = asyncio.Event()


@pytest.fixture
async def front() -> AsyncIterator[tuple[Front, int, Seen]]:
    seen = Seen()

    async def handler(request: Request) -> Answer | Stream:
        seen.requests.append(request)
        if request.raw_path == "/slow":
            try:
                await seen.release.wait()
            except asyncio.CancelledError:
                seen.cancelled += 1
                raise
        if request.raw_path == "/stream":
            out = Stream(request, 200, [("Content-Type", "text/event-stream")])
            await out.prepare()
            for i in range(3):
                await out.write(b"data: %d\n\n" % i)
            await out.write_eof()
            return out
        if request.raw_path == "/broken-stream":
            out = Stream(request, 200, [])
            await out.prepare()
            await out.write(b"partial")
            raise RuntimeError("a defect mid-stream")
        return Answer(200, request.raw_path.encode() + b" " + request.body, [("Content-Type", "text/plain")])

    server = Front(handler, max_body=1000)
    site = await server.listen("127.0.0.1", 0)
    yield server, site.sockets[0].getsockname()[1], seen
    await server.close(1.0)


async def _exchange(port: int, data: bytes, until_closed: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read() if until_closed else reader.read(65536), 5)
    finally:
        writer.close()


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(front) -> None:
    _, port, seen = front
    two = (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none"
           b"GET /b HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\n\r\n")
    answer = await _exchange(port, two)
    first, second = answer.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert first.endswith(b"\r\n\r\n/a one") and b"Content-Length: 6\r\n" in first
    assert second.endswith(b"/b ") and b"Connection: close\r\n" in second
    assert [r.authorization for r in seen.requests] == ["", "Bearer k"]


async def test_http_1_0_closes_after_its_answer(front) -> None:
    _, port, _ = front
    answer = await _exchange(port, b"GET /old HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"/old ")


async def test_a_body_over_the_limit_is_a_413_before_it_is_read_or_once_it_grows_past_it(front) -> None:
    _, port, seen = front
    declared = await _exchange(port, b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
    assert declared.startswith(b"HTTP/1.1 413 ") and b'"code": "request_too_large"' in declared
    chunked = await _exchange(port, b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                              + b"1f4\r\n" + b"x" * 500 + b"\r\n" + b"1f4\r\n" + b"x" * 500 + b"\r\n"
                              + b"1\r\nx\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 413 ")
    assert seen.requests == []


async def test_expect_100_continue_is_answered_before_the_body(front) -> None:
    _, port, _ = front
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ok")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 OK") and await reader.readexactly(5) == b"/e ok"
    writer.close()


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n", 431),
    (b"GARBAGE\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 400),
])
async def test_what_llhttp_refuses_is_answered_and_the_connection_closed(front, request_bytes: bytes,
                                                                       status: int) -> None:
    _, port, seen = front
    answer = await _exchange(port, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:100]
    assert b"Connection: close\r\n" in answer and seen.requests == []


async def test_a_client_that_hangs_up_cancels_its_handler(front) -> None:
    _, port, seen = front
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: seen.requests)
    writer.close()
    await eventually(lambda: seen.cancelled == 1)


async def test_a_stream_is_chunked_and_a_failure_after_its_head_cuts_the_connection(front) -> None:
    _, port, _ = front
    answer = await _exchange(port, b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"Transfer-Encoding: chunked\r\n" in answer
    assert answer.endswith(b"\r\n\r\n9\r\ndata: 0\n\n\r\n9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n")
    broken = await _exchange(port, b"GET /broken-stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert broken.startswith(b"HTTP/1.1 200 OK") and broken.endswith(b"7\r\npartial\r\n")   # no clean end
    assert b"500" not in broken   # never answered twice


async def test_closing_lets_a_request_in_flight_finish_within_the_grace(front) -> None:
    server, port, seen = front
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: seen.requests)
    closing = asyncio.create_task(server.close(5.0))
    seen.release.set()
    answer = await asyncio.wait_for(reader.read(), 5)
    await closing
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"/slow ") and b"Connection: close" in answer
    writer.close()


async def test_a_bad_request_pipelined_behind_one_being_answered_is_refused_after_it(front) -> None:
    server, port, seen = front
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: seen.requests)
    writer.write(b"GARBAGE\r\n\r\n")
    await eventually(lambda: any(c.refused for c in server.connections))   # while /slow is being answered
    seen.release.set()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    first, second = answer.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 OK") and first.endswith(b"/slow ") and second.startswith(b"400 ")
