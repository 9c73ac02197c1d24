"""The proxy's HTTP/1.1 server side: llhttp (through ``httptools``) on an asyncio protocol, one
task a request, the answer written in one ``send``.

Why not aiohttp's server: measured on this machine (``bench/proxy/``), a bare aiohttp server
spends ~80 µs of CPU a request, a protocol of this shape ~10 µs, and nginx relays a whole request
in ~25 µs; the proxy's goal is 3× nginx. The proxy serves four fixed routes and relays the rest,
so it needs none of aiohttp's generality (routing, middlewares, multipart, cookies, websockets).

What a request gets:

* Its body is read whole before the handler runs, up to ``max_body``: a Content-Length above it
  is a 413 before a byte of the body is read (then the connection closes), a chunked body that
  grows past it too. ``Expect: 100-continue`` is answered when the body may come.
* Heads are limited (``MAX_HEAD`` bytes); what llhttp refuses (bad framing, a negative or
  conflicting Content-Length, an upgrade) is a 400 and the connection closes.
* Each connection has one task, which answers its requests in order and waits for the next
  between them (a task a request cost ~4 µs more); a client may pipeline a few
  (``MAX_PIPELINED``) before reading stops until the answers catch up.
* A client that hangs up cancels its request's handler (its upstream request ends with it).
* An answer is a whole ``Answer`` (head and body in one write) or a ``Stream`` the handler writes
  itself; once a stream's head is out, a failure cuts the connection rather than answering twice.
* Idle keep-alive connections close after ``IDLE_TIMEOUT``; at shutdown, handlers in flight get
  ``grace`` seconds to end (and settle) before they are cancelled.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from http import HTTPStatus
from typing import Any, Awaitable, Callable, NamedTuple

import httptools

log = logging.getLogger("cst.proxy.front")

MAX_HEAD = 64 * 1024          # bytes of request line and headers
MAX_PIPELINED = 16            # requests waiting behind the one being answered
IDLE_TIMEOUT = 75.0           # seconds a keep-alive connection may sit idle (aiohttp's default)
SWEEP_EVERY = 10.0
HIGH_WATER = 1 << 20          # a stream's writer waits while this much is unsent to a slow client

Headers = list[tuple[str, str]]
# an answer's headers: name-value pairs, or header lines as they came from the upstream (relayed as is)
AnyHeaders = Headers | bytes


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


class Answer(NamedTuple):
    """A whole answer: written with its head in one send."""

    status: int
    body: bytes = b""
    headers: AnyHeaders = []
    reason: str = ""


def json_answer(document: Any, status: int = 200, headers: Headers | None = None) -> Answer:
    return Answer(status, json.dumps(document).encode(), [("Content-Type", "application/json"), *(headers or [])])


def _head(status: int, reason: str, headers: AnyHeaders, framing: bytes, keep_alive: bool) -> bytes:
    line = b"HTTP/1.1 %d %b\r\n" % (status, (reason or _reason(status)).encode("latin-1", "replace"))
    if not isinstance(headers, bytes):
        headers = "".join([f"{name}: {value}\r\n" for name, value in headers]).encode("latin-1", "replace")
    return line + headers + framing + (b"\r\n" if keep_alive else b"Connection: close\r\n\r\n")


class Request:
    """One request, its body read whole."""

    __slots__ = ("method", "raw_path", "raw_headers", "authorization", "body", "keep_alive", "_connection")

    def __init__(self, method: str, raw_path: str, raw_headers: list[tuple[bytes, bytes]], authorization: str,
                 body: bytes, keep_alive: bool, connection: "_Connection"):
        self.method = method
        self.raw_path = raw_path           # path and query as the client encoded them
        self.raw_headers = raw_headers     # (name, value) as they came
        self.authorization = authorization
        self.body = body
        self.keep_alive = keep_alive
        self._connection = connection

    @property
    def path(self) -> str:
        return self.raw_path.partition("?")[0]

    def abort(self) -> None:
        """Cut the client off without a clean end (an answer that broke off must not look whole)."""
        self._connection.keep = False
        transport = self._connection.transport
        if transport is not None:
            transport.close()


class Stream:
    """An answer written piece by piece: chunked, or with the Content-Length given."""

    __slots__ = ("_head", "_chunked", "prepared", "_connection", "status")

    def __init__(self, request: Request, status: int, headers: AnyHeaders, reason: str = "",
                 content_length: int | None = None):
        self.status = status
        self._connection = request._connection
        self._chunked = content_length is None
        framing = b"Transfer-Encoding: chunked\r\n" if content_length is None else b"Content-Length: %d\r\n" % content_length
        self._head = _head(status, reason, headers, framing, request.keep_alive)
        self.prepared = False

    async def prepare(self) -> None:
        """Send the head (an error after this cuts the connection instead of answering)."""
        self.prepared = True
        self._connection.answered = True
        self._connection.write(self._head)

    async def write(self, data: bytes) -> None:
        if not data:
            return
        connection = self._connection
        if connection.transport is None or connection.transport.is_closing():
            raise ConnectionResetError("the client went away")
        connection.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        if connection.paused_writing:
            await connection.drain()

    async def write_eof(self) -> None:
        if self._chunked:
            self._connection.write(b"0\r\n\r\n")


Handler = Callable[[Request], Awaitable["Answer | Stream"]]


class _Connection(asyncio.Protocol):
    __slots__ = ("server", "transport", "parser", "url", "headers", "authorization", "body", "body_size", "head_bytes", "head_size",
                 "in_body", "length", "expect", "waiting", "task", "busy", "next_request", "keep", "answered", "paused_writing", "paused_reading",
                 "_drained", "idle_since", "refused", "refusal")

    def __init__(self, server: "Front"):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.waiting: deque[Request] = deque()
        self.task: asyncio.Task[None] | None = None      # answers this connection's requests
        self.busy = False                                 # it is answering one now
        self.next_request: asyncio.Future[Request] | None = None   # what it waits on between requests
        self.keep = True
        self.answered = False     # the answer's head went out (a stream's)
        self.paused_writing = self.paused_reading = False
        self._drained: asyncio.Future[None] | None = None
        self.idle_since = time.monotonic()
        self.refused = False      # an answer that ends the connection was sent: read nothing more
        self.refusal = b""        # that answer, while it waits for the one being made
        self.head_bytes = 0       # bytes received since the request being read began (its head unparsed)
        self._new()

    def _new(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.authorization = ""
        self.body: list[bytes] = []
        self.body_size = 0
        self.head_size = 0    # bytes of this request's line and headers, as parsed
        self.in_body = False
        self.length: int | None = None
        self.expect = False   # Expect: 100-continue

    # -- the transport -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self.waiting.clear()
        if self.task is not None and not self.task.done():
            self.task.cancel()   # the client hung up: its handler (and upstream request) ends
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("the client went away"))

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self) -> None:
        if self.transport is None:
            raise ConnectionResetError("the client went away")
        if self.paused_writing:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if not self.in_body:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "upgrades are not served here")
        except httptools.HttpParserError as exc:
            if not self.refused:
                self._refuse(400, f"malformed request ({exc})")
        if not self.in_body and self.head_bytes > MAX_HEAD and not self.refused:   # still reading a head
            self._refuse(431, "the request's head is too large")

    def eof_received(self) -> bool:
        return False   # the client closed its side: close ours once what it asked is answered (or at once)

    # -- llhttp's callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > MAX_HEAD:
            self._head_too_large()

    def _head_too_large(self) -> None:
        self._refuse(431, "the request's head is too large")
        raise httptools.HttpParserError("refused")   # stop parsing this connection

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        size = len(name)
        self.head_size += size + len(value) + 4
        if self.head_size > MAX_HEAD:
            self._head_too_large()
        if size == 13 and name.lower() == b"authorization":
            self.authorization = value.decode("latin-1")
        elif size == 14 and name.lower() == b"content-length":
            self.length = int(value)   # llhttp has checked it: digits, one value
        elif size == 6 and name.lower() == b"expect":
            self.expect = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        self.in_body = True
        if self.parser.should_upgrade():
            self._refuse(400, "upgrades are not served here")
            raise httptools.HttpParserError("refused")
        length = self.length
        if length is not None and length > self.server.max_body:
            self._refuse(413, f"the request body is larger than the proxy's limit of {self.server.max_body} bytes",
                         "request_too_large")
            raise httptools.HttpParserError("refused")   # stop parsing this connection
        if self.expect and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.body_size += len(body)
        if self.body_size > self.server.max_body:
            self._refuse(413, f"the request body is larger than the proxy's limit of {self.server.max_body} bytes",
                         "request_too_large")
            raise httptools.HttpParserError("refused")

    def on_message_complete(self) -> None:
        parser = self.parser
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        request = Request(parser.get_method().decode("latin-1"), self.url.decode("latin-1"), self.headers,
                          self.authorization, body, parser.should_keep_alive(), self)
        self._new()
        waiter = self.next_request
        if self.task is None:
            self.busy = True
            self.task = self.server.loop.create_task(self._answer(request))
        elif waiter is not None:
            self.next_request = None
            self.busy = True
            waiter.set_result(request)
        else:
            self.waiting.append(request)
            if len(self.waiting) >= MAX_PIPELINED and not self.paused_reading and self.transport is not None:
                self.paused_reading = True
                self.transport.pause_reading()

    # -- answering ---------------------------------------------------------------------------

    async def _answer(self, request: Request) -> None:
        while True:
            self.answered = False
            try:
                answer = await self.server.handler(request)
            except asyncio.CancelledError:
                return   # the client went away (or the server stops): nothing to answer
            except Exception:
                log.exception("answering %s %s failed", request.method, request.raw_path[:200])
                if self.answered:   # a stream's head went out: never answer twice
                    request.abort()
                    return
                answer = Answer(500, b'{"error": {"message": "internal error", "type": "server_error", '
                                     b'"code": "internal_error"}}', [("Content-Type", "application/json")])
            if isinstance(answer, Answer):
                keep = request.keep_alive and self.keep
                self.write(_head(answer.status, answer.reason, answer.headers,
                                 b"Content-Length: %d\r\n" % len(answer.body), keep) + answer.body)
            else:
                keep = request.keep_alive and self.keep and answer.prepared
            if not keep or self.transport is None:
                if self.transport is not None:
                    if self.refusal:
                        self.write(self.refusal)
                    self.transport.close()
                return
            self.idle_since = time.monotonic()
            if self.waiting:
                request = self.waiting.popleft()
            else:
                self.busy = False
                self.next_request = self.server.loop.create_future()
                try:
                    request = await self.next_request
                except asyncio.CancelledError:
                    return   # the connection ended, or the server stops
            if self.paused_reading and len(self.waiting) < MAX_PIPELINED // 2 and self.transport is not None:
                self.paused_reading = False
                self.transport.resume_reading()

    def _refuse(self, status: int, message: str, code: str = "invalid_request") -> None:
        """Answer the request being read with an error and close (its framing can't be trusted)."""
        self.refused = True
        if self.transport is None:
            return
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}}).encode()
        head = _head(status, "", [("Content-Type", "application/json")], b"Content-Length: %d\r\n" % len(body), False)
        if not self.busy:
            self.transport.write(head + body)
            self.transport.close()
        else:   # the answer being made goes first; then this one, then the end
            self.waiting.clear()
            self.keep = False
            self.refusal = head + body


class Front:
    """Serves ``handler`` on HTTP/1.1 connections; ``max_body`` may change while it runs."""

    def __init__(self, handler: Handler, max_body: int):
        self.handler = handler
        self.max_body = max_body
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.servers: list[asyncio.base_events.Server] = []
        self._sweeping = self.loop.create_task(self._sweep_forever())

    def protocol(self) -> _Connection:
        return _Connection(self)

    async def listen(self, host: str, port: int) -> asyncio.base_events.Server:
        server = await self.loop.create_server(self.protocol, host, port, reuse_address=True)
        self.servers.append(server)
        return server

    async def unlisten(self, server: asyncio.base_events.Server) -> None:
        """Stop accepting on ``server``; connections already made go on."""
        server.close()
        await server.wait_closed()
        self.servers.remove(server)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = time.monotonic()
            for connection in list(self.connections):
                if not connection.busy and now - connection.idle_since > IDLE_TIMEOUT \
                        and connection.transport is not None:
                    connection.transport.close()

    async def close(self, grace: float) -> None:
        """Accept nothing more, let the handlers in flight end within ``grace`` seconds, then
        cancel what is left and close every connection."""
        for server in list(self.servers):
            server.close()
        self.servers.clear()
        self._sweeping.cancel()
        running = [c.task for c in self.connections if c.busy and c.task is not None]
        for connection in list(self.connections):
            connection.keep = False
            if not connection.busy and connection.transport is not None:
                connection.transport.close()
        if running:
            await asyncio.wait(running, timeout=grace)
        for connection in list(self.connections):
            if connection.task is not None:
                connection.task.cancel()
            if connection.transport is not None:
                connection.transport.close()
        leftover = [c.task for c in self.connections if c.task is not None]
        if leftover:
            await asyncio.wait(leftover, timeout=1.0)
