"""A lean HTTP/1.1 client for the one thing the proxy does all day: relay a request.

Why not aiohttp's ClientSession: measured on this project's machines it costs
about as much CPU per request as the whole aiohttp server side (~180 µs), most
of it generality the proxy never uses (cookies, redirects, tracing, decoding,
multipart). This client keeps keep-alive connections per origin, writes each
request in one send and hands the body back raw, chunk by chunk, so streams pass
through as they arrive. It does not decode content encodings (bytes pass
through) and does not follow redirects.

Answers are parsed by llhttp (through ``httptools``, the parser Node.js uses), which is
strict where a hand-written parser was lenient: a negative, repeated or conflicting
Content-Length, Content-Length beside Transfer-Encoding, a chunk size like ``-2`` or
``1_0``, a bad header line -- each ends the answer with an error and the connection is
dropped, so a broken or hostile upstream cannot desynchronise a keep-alive connection
and hand one client's answer to another. Bytes that arrive on a connection while no
request is out (a stray or stale answer) drop the connection too.

Re-sending: a kept-alive connection is checked just before it is used (a peek at the
socket: has the upstream closed it?). A request is only ever re-sent on a fresh
connection when that check proves the upstream never saw it; once the request is
written, a connection that dies is the caller's error to handle, because the upstream
may have acted on it (a completion is billed). An idle connection is trusted no longer
than the upstream's ``Keep-Alive: timeout`` says, less a second.
"""
from __future__ import annotations

import asyncio
import enum
import select
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import httptools

# Flow control: stop reading from the upstream when this much is waiting for a slow client.
HIGH_WATER = 1 << 20
MAX_HEAD = 64 * 1024
IDLE_TIMEOUT = 30.0  # seconds an idle keep-alive connection is trusted at most
MAX_IDLE_PER_ORIGIN = 512
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
# How often the waits for an upstream are checked against their deadlines: a timeout fires up to
# this late. One timer for all of them, since a timer a wait (uvloop's call_later, then cancel)
# cost ~2.6 µs, a request's largest single cost in this client.
TICK = 0.1

# RFC 9110 hop-by-hop headers: never relayed, in either direction
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})


class _Read(enum.Enum):
    """An answer's header this client reads."""

    LENGTH = enum.auto()
    FRAMING = enum.auto()       # Transfer-Encoding
    KEEP_ALIVE = enum.auto()    # its timeout hint
    TYPE = enum.auto()
    ENCODING = enum.auto()
    RETRY_AFTER = enum.auto()


# The headers of an answer that this client reads, or does not relay (None): any other is relayed
# as it came (UpstreamResponse.end_to_end), and so are the ones read that are not hop-by-hop.
_ANSWER_HEADERS: dict[bytes, _Read | None] = {
    **dict.fromkeys((name.encode() for name in HOP_BY_HOP), None),
    b"content-length": _Read.LENGTH, b"transfer-encoding": _Read.FRAMING, b"keep-alive": _Read.KEEP_ALIVE,
    b"content-type": _Read.TYPE, b"content-encoding": _Read.ENCODING, b"retry-after": _Read.RETRY_AFTER,
}
_RELAYED_TOO = frozenset({_Read.TYPE, _Read.ENCODING, _Read.RETRY_AFTER})


class UpstreamError(Exception):
    """The upstream could not be reached, or its answer broke off."""


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamNotSent(UpstreamError):
    """The request never left: the connection could not be made. Safe to send elsewhere."""


class ConnectTimeout(UpstreamNotSent, UpstreamTimeout):
    pass


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int
    base_path: str  # "/v1", no trailing slash
    host_header: bytes
    address: str    # scheme://host:port: the key of its idle connections (a str caches its hash)

    @classmethod
    def parse(cls, url: str) -> "Origin":
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        default = (tls and port == 443) or (not tls and port == 80)
        host = parts.hostname or ""
        shown = f"[{host}]" if ":" in host else host
        value = shown if default else f"{shown}:{port}"
        host_header = value.encode("ascii") if value.isascii() else value.encode("idna")
        return cls(parts.scheme, host, port, parts.path.rstrip("/"), host_header, f"{parts.scheme}://{shown}:{port}")

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


class _Unsolicited(Exception):
    """An answer began while no request was out."""


class _Deadlines:
    """The connections waiting for their upstream, and one timer that ends the waits past their
    deadline every ``TICK`` while any is waiting."""

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float]):
        self.loop = loop
        self.clock = clock   # monotonic seconds; injectable, so tests move time instead of sleeping
        self.waiting: set[_Connection] = set()
        self._ticking = False

    def add(self, conn: "_Connection") -> None:
        self.waiting.add(conn)
        if not self._ticking:
            self._ticking = True
            self.loop.call_later(TICK, self._tick)

    def expire_overdue(self) -> None:
        """End the waits whose deadline has passed (and forget any nobody waits on any more)."""
        now = self.clock()
        for conn in [c for c in self.waiting if c.deadline <= now or c._waiter is None]:
            conn.expire()

    def _tick(self) -> None:
        try:
            self.expire_overdue()
        finally:   # whatever happened, the waits left keep their timer
            if self.waiting:
                self.loop.call_later(TICK, self._tick)
            else:
                self._ticking = False


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and llhttp's parser of the answers that arrive on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: bool, deadlines: _Deadlines):
        self.loop = loop
        self.tls = tls
        self.deadlines = deadlines
        self.deadline = 0.0         # monotonic: when the wait under way times out
        self.transport: asyncio.Transport | None = None
        self.fd = -1
        self.parser = httptools.HttpResponseParser(self)
        self.body = bytearray()     # parsed body bytes not yet taken
        self.closed = False
        self.broken: str | None = None  # why nothing more can be read from this connection
        self.paused = False
        self.idle_since = 0.0
        self.trusted_for = IDLE_TIMEOUT
        self._waiter: asyncio.Future[None] | None = None
        self._quiet: select.poll | None = None   # polls the socket for a close or stray bytes
        self._new_answer()
        self.expecting = False      # a request is out and its answer is not complete

    def start(self) -> None:
        """A request is about to go out: expect its answer."""
        self._new_answer()
        self.expecting = True

    def _new_answer(self) -> None:
        self.head_done = self.complete = self.interim = False
        self.head_bytes = 0
        self.status = 0
        self.keep_alive = False
        self.until_close = False
        self._new_head()

    def _new_head(self) -> None:
        self.reason = b""
        self.end_to_end: list[bytes] = []   # the header lines relayed, as they came
        self.content_length: int | None = None
        self.chunked = False
        self.content_type = ""
        self.content_encoding: str | None = None
        self.retry_after: str | None = None

    # -- protocol callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        if self.fd >= 0:
            self._quiet = select.poll()   # made once: cheaper than a peek that raises when nothing is pending
            self._quiet.register(self.fd, select.POLLIN)

    def data_received(self, data: bytes) -> None:
        if not self.head_done:
            self.head_bytes += len(data)
        try:
            if not self.expecting:
                raise _Unsolicited
            self.parser.feed_data(data)
        except (httptools.HttpParserError, _Unsolicited) as exc:
            stray = isinstance(exc, _Unsolicited) or isinstance(exc.__context__, _Unsolicited)
            self._break("the upstream sent bytes while no request was out" if stray
                        else f"malformed answer from the upstream: {exc}")
            return
        except httptools.HttpParserUpgrade:
            self._break("the upstream switched protocols")
            return
        if not self.head_done and self.head_bytes > MAX_HEAD:
            self._break("the upstream sent an oversized answer head")
            return
        if len(self.body) > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        if self.expecting and self.head_done and self.until_close:
            self.complete = True  # read-until-close framing: the end of the connection is the end
            self.expecting = False
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    # -- llhttp callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self.expecting:
            raise _Unsolicited  # a second answer to one request: the connection is out of step

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # one pass: each header relayed, read, or both (llhttp has checked the framing ones)
        lower = name.lower()
        if lower not in _ANSWER_HEADERS:
            self.end_to_end += (name, b": ", value, b"\r\n")
            return
        read = _ANSWER_HEADERS[lower]
        if read in _RELAYED_TOO:
            self.end_to_end += (name, b": ", value, b"\r\n")
        if read is _Read.LENGTH:
            self.content_length = int(value)
        elif read is _Read.FRAMING:
            self.chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        elif read is _Read.KEEP_ALIVE:
            hint = _keep_alive_timeout(value.decode("latin-1"))
            if hint is not None:
                self.trusted_for = max(0.0, min(IDLE_TIMEOUT, hint - 1.0))
        elif read is _Read.TYPE:
            self.content_type = value.decode("latin-1")
        elif read is _Read.ENCODING:
            self.content_encoding = value.decode("latin-1")
        elif read is _Read.RETRY_AFTER:
            self.retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue and friends: the real answer follows
            self.interim = True
            self._new_head()
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()  # read here: llhttp resets it after the message
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self.expecting = False

    # -- used by the client and the response ----------------------------------------------

    def _break(self, reason: str) -> None:
        self.broken = reason
        self.expecting = False
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self.deadlines.waiting.discard(self)
            if not waiter.done():
                waiter.set_result(None)

    def wait(self, timeout: float) -> asyncio.Future[None]:
        """A future done when more data or EOF arrives; UpstreamTimeout after ``timeout`` of
        silence (up to ``TICK`` more). A future, not a coroutine: one frame less a wait. Whoever
        stops waiting early (a cancelled request) closes the connection, which ends the wait."""
        waiter = self.loop.create_future()
        self._waiter = waiter
        self.deadline = self.deadlines.clock() + timeout
        self.deadlines.add(self)
        return waiter

    def expire(self) -> None:
        """The wait under way has timed out."""
        waiter = self._waiter
        self._waiter = None
        self.deadlines.waiting.discard(self)
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamTimeout("no answer from the upstream in time"))

    def take(self) -> bytes:
        data = bytes(self.body)
        self.body.clear()
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def provably_unused(self) -> bool:
        """True when this idle connection can carry a request: the upstream has not closed it
        and sent nothing since its last answer (a non-blocking peek at the socket). False
        means the upstream never saw a request on it, so it can be dropped at no risk."""
        if self.closed or self.broken or self._quiet is None:
            return False
        if not self._quiet.poll(0):
            return True  # nothing pending: open and quiet
        probe = socket.socket(fileno=self.fd)
        try:
            pending = probe.recv(1, _PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False  # reset
        finally:
            probe.detach()
        # b"": the upstream closed it. Bytes: a stray answer (plain HTTP), or a TLS record the
        # TLS layer has not read yet (a session ticket): only that last one leaves it usable.
        return bool(pending) and self.tls

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self._wake()


def _keep_alive_timeout(value: str) -> float | None:
    for part in value.split(","):
        name, _, number = part.strip().partition("=")
        if name.strip().lower() == "timeout":
            try:
                return float(number)
            except ValueError:
                return None
    return None


class UpstreamResponse:
    __slots__ = ("status", "reason", "end_to_end", "content_length", "content_encoding", "content_type",
                 "retry_after", "_conn", "_client", "_origin",
                 "_timeout", "_no_body", "_keep_alive", "_finished")

    def __init__(self, conn: _Connection, client: "UpstreamClient", origin: Origin, timeout: float, method: str):
        self._conn = conn
        self._client = client
        self._origin = origin
        self._timeout = timeout
        self.status = conn.status
        self.reason = conn.reason.decode("latin-1")
        # the header lines to relay, as they came (less hop-by-hop ones and the framing)
        self.end_to_end = b"".join(conn.end_to_end)
        chunked = conn.chunked
        self.content_length = None if chunked else conn.content_length
        self.content_encoding = conn.content_encoding
        self.content_type = conn.content_type
        self.retry_after = conn.retry_after
        # HEAD: llhttp cannot be told that no body follows, so the answer ends with its head
        # and the connection is not reused
        self._no_body = method == "HEAD"
        if self._no_body:
            conn.expecting = False
        conn.until_close = not chunked and self.content_length is None and not conn.complete
        self._keep_alive = conn.keep_alive and not self._no_body and not conn.until_close
        self._finished = False

    async def read_some(self) -> bytes:
        """The next piece of the body as soon as it is there; b"" at the end."""
        conn = self._conn
        while True:
            if conn.body:
                return conn.take()
            if conn.complete or self._no_body:
                return b""
            if conn.broken:
                raise UpstreamError(conn.broken)
            if conn.closed:
                raise UpstreamError("the upstream closed the connection mid-answer")
            await conn.wait(self._timeout)

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (or up to ``limit`` bytes of it)."""
        if self._conn.complete:   # all there already (a small answer, usually): no wait
            return self._conn.take()
        parts = []
        size = 0
        while limit is None or size < limit:
            data = await self.read_some()
            if not data:
                break
            parts.append(data)
            size += len(data)
        return b"".join(parts)

    def finish(self) -> None:
        """Done with the answer: reuse the connection when the answer was read to its end."""
        if self._finished:
            return
        self._finished = True
        conn = self._conn
        if conn.complete and self._keep_alive and not conn.closed and not conn.broken and not conn.body:
            self._client._put(self._origin, conn)
        else:
            conn.close()

    def close(self) -> None:
        """Abandon the answer: the connection is dropped, which the upstream sees as a hang-up."""
        self._finished = True
        self._conn.close()


class UpstreamClient:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock   # what the waits' deadlines are read on
        self._idle: dict[str, list[_Connection]] = {}   # by Origin.address
        self._ssl: ssl.SSLContext | None = None
        self._deadlines: _Deadlines | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _get(self, origin: Origin) -> _Connection | None:
        """An idle connection the upstream provably has not given up on, or None."""
        idle = self._idle.get(origin.address)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < conn.trusted_for and conn.provably_unused():
                return conn
            conn.close()
        return None

    def _put(self, origin: Origin, conn: _Connection) -> None:
        idle = self._idle.setdefault(origin.address, [])
        if len(idle) >= MAX_IDLE_PER_ORIGIN:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def _connect(self, origin: Origin, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        deadlines = self._deadlines
        if deadlines is None or deadlines.loop is not loop:
            deadlines = self._deadlines = _Deadlines(loop, self._clock)
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop, origin.tls, deadlines), origin.host, origin.port,
                                       ssl=self._ssl_context() if origin.tls else None,
                                       server_hostname=origin.host if origin.tls else None),
                timeout)
        except asyncio.TimeoutError:
            raise ConnectTimeout(f"connecting to {origin.host}:{origin.port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamNotSent(f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}"
                                if isinstance(exc, OSError) else str(exc)) from None
        return conn

    async def request(self, origin: Origin, method: str, head: bytes, body: bytes | None,
                      timeout: float) -> UpstreamResponse:
        """Send ``head`` (request line and headers, ending in a blank line) and ``body``;
        return once the answer's head has arrived. Never re-sends: see the module's notes.
        ``UpstreamNotSent`` when the request never left; any other ``UpstreamError`` once it may
        have reached the upstream."""
        conn = self._get(origin) or await self._connect(origin, timeout)
        assert conn.transport is not None
        conn.start()
        conn.transport.write(head + body if body else head)
        try:
            while not conn.head_done:
                if conn.broken:
                    raise UpstreamError(conn.broken)
                if conn.closed:
                    raise UpstreamError("the upstream closed the connection before answering")
                await conn.wait(timeout)
            return UpstreamResponse(conn, self, origin, timeout, method)
        except BaseException:
            conn.close()
            raise

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
