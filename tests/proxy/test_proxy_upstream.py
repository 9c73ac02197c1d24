"""The lean upstream HTTP/1.1 client against hand-written answers (framing, keep-alive, errors)."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import pytest

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
        request = await server.read_request(reader)
        if b"HEAD" in request[:4]:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
            await writer.drain()
            request = await server.read_request(reader)
        if b"close" in request:
            writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
            return
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-A: 1\r\n\r\nbody")
        await writer.drain()
        await server.read_request(reader)

    client = UpstreamClient()
    async with RawServer(handler) as server:
        resp = await client.request(server.origin, "POST", HEAD, b"{}", timeout=2)
        assert (resp.status, resp.reason, resp.header("x-a"), resp.content_length) == (201, "Created", "1", 4)
        assert await resp.read() == b"body"
        resp.finish()

        resp = await client.request(server.origin, "HEAD", b"HEAD / HTTP/1.1\r\n\r\n", None, timeout=2)
        assert resp.status == 200 and await resp.read() == b""
        resp.finish()
        resp = await client.request(server.origin, "POST", b"POST /close HTTP/1.1\r\n\r\n", None, timeout=2)
        assert await resp.read() == b"until the end"
        resp.finish()
    await client.close()


async def test_a_stale_keep_alive_connection_is_retried_once_on_a_fresh_one() -> None:
    async def handler(reader, writer):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # The next request on this connection meets a server that just gave up on it.
        await server.read_request(reader)

    client = UpstreamClient()
    async with RawServer(handler) as server:
        assert await body_of(client, server.origin) == (200, [b"ok"])
        assert await body_of(client, server.origin) == (200, [b"ok"])
        assert server.connections == 2 and len(server.requests) == 3
    await client.close()


async def test_timeouts_broken_answers_and_refused_connections() -> None:
    async def handler(reader, writer):
        request = await server.read_request(reader)
        if b"hang" in request:
            await asyncio.sleep(10)
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


def test_origin_parsing() -> None:
    o = Origin.parse("https://api.daidaibird.top/v1/")
    assert (o.host, o.port, o.base_path, o.host_header, o.tls) == ("api.daidaibird.top", 443, "/v1",
                                                                   b"api.daidaibird.top", True)
    o = Origin.parse("http://[::1]:8080/openai/v1")
    assert (o.host, o.port, o.base_path, o.host_header) == ("::1", 8080, "/openai/v1", b"[::1]:8080")
