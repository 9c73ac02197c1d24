"""A lean HTTP/1.1 client for the one thing the proxy does all day: relay a request.

Why not aiohttp's ClientSession: measured on this project's machines it costs
about as much CPU per request as the whole aiohttp server side (~180 µs), most
of it generality the proxy never uses (cookies, redirects, tracing, decoding,
multipart). This client keeps keep-alive connections per origin, writes each
request in one send, parses the response head by hand and hands the body back
raw, chunk by chunk, so streams pass through as they arrive. It does not decode
content encodings (bytes pass through) and does not follow redirects.

Framing handled: Content-Length, chunked, read-until-close; no body for HEAD,
1xx, 204 and 304. A request on a reused keep-alive connection that dies before
any byte of the answer is retried once on a fresh connection (the server closed
an idle connection just as we used it, which every HTTP client must tolerate).
"""
from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

# Flow control: stop reading from the upstream when this much is waiting for a slow client.
HIGH_WATER = 1 << 20
LOW_WATER = 1 << 18
MAX_HEAD = 64 * 1024
IDLE_TIMEOUT = 30.0  # seconds an idle keep-alive connection is trusted
MAX_IDLE_PER_ORIGIN = 512


class UpstreamError(Exception):
    """The upstream could not be reached, or its answer broke off."""


class UpstreamTimeout(UpstreamError):
    pass


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int
    base_path: str  # "/v1", no trailing slash
    host_header: bytes

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
        return cls(parts.scheme, host, port, parts.path.rstrip("/"), host_header)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; the reader side of a response lives here."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None

    # -- protocol callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- used by the response -----------------------------------------------------------

    async def wait(self, timeout: float) -> None:
        """Wait until more data or EOF arrives; UpstreamTimeout after ``timeout`` of silence."""
        if self.closed:
            raise UpstreamError("connection closed by the upstream")
        waiter = self.loop.create_future()
        self._waiter = waiter
        handle = self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None

    def take(self, n: int | None = None) -> bytes:
        buf = self.buffer
        if n is None or n >= len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        if self.paused and len(buf) < LOW_WATER and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("no answer from the upstream in time"))


class UpstreamResponse:
    __slots__ = ("status", "reason", "headers", "content_length", "_chunked", "_conn", "_client", "_origin",
                 "_remaining", "_done", "_keep_alive", "_timeout", "_chunk_left", "_finished")

    def __init__(self, conn: _Connection, client: "UpstreamClient", origin: Origin, timeout: float,
                 status: int, reason: str, headers: list[tuple[str, str]], content_length: int | None,
                 chunked: bool, keep_alive: bool, no_body: bool):
        self._conn = conn
        self._client = client
        self._origin = origin
        self._timeout = timeout
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = None if chunked else content_length
        self._chunked = chunked
        self._keep_alive = keep_alive and (chunked or content_length is not None or no_body)
        self._remaining = 0 if no_body else (content_length if content_length is not None and not chunked else -1)
        self._done = no_body or self._remaining == 0
        self._chunk_left = 0  # bytes left in the current chunk (chunked framing)
        self._finished = False

    def header(self, name: str) -> str | None:
        lower = name.lower()
        for k, v in self.headers:
            if k.lower() == lower:
                return v
        return None

    async def read_some(self) -> bytes:
        """The next piece of the body as soon as it is there; b"" at the end."""
        if self._done:
            return b""
        if self._chunked:
            return await self._read_chunked()
        conn = self._conn
        while not conn.buffer:
            if conn.closed:
                if self._remaining < 0:  # read-until-close framing: this is the end
                    self._done = True
                    return b""
                raise UpstreamError("the upstream closed the connection mid-answer")
            await conn.wait(self._timeout)
        if self._remaining < 0:
            return conn.take()
        data = conn.take(self._remaining)
        self._remaining -= len(data)
        if self._remaining == 0:
            self._done = True
        return data

    async def _read_chunked(self) -> bytes:
        conn = self._conn
        while True:
            buf = conn.buffer
            if self._chunk_left > 0:
                if buf:
                    data = conn.take(self._chunk_left)
                    self._chunk_left -= len(data)
                    if self._chunk_left == 0:
                        self._chunk_left = -2  # the CRLF after the chunk data
                    return data
            elif self._chunk_left == -2:
                if len(buf) >= 2:
                    if buf[:2] != b"\r\n":
                        raise UpstreamError("malformed chunked answer")
                    del buf[:2]
                    self._chunk_left = 0
                    continue
            else:
                end = buf.find(b"\r\n")
                if end >= 0:
                    line = bytes(buf[:end]).split(b";", 1)[0].strip()
                    try:
                        size = int(line, 16)
                    except ValueError:
                        raise UpstreamError("malformed chunk size") from None
                    if size == 0:
                        # The last chunk, then optional trailers, then a blank line.
                        rest = end + 2
                        if buf[rest:rest + 2] == b"\r\n":
                            del buf[:rest + 2]
                            self._done = True
                            return b""
                        if len(buf) >= rest + 2:
                            trailers_end = buf.find(b"\r\n\r\n", rest)
                            if trailers_end >= 0:
                                del buf[:trailers_end + 4]
                                self._done = True
                                return b""
                    else:
                        del buf[:end + 2]
                        self._chunk_left = size
                        continue
                elif len(buf) > MAX_HEAD:
                    raise UpstreamError("malformed chunked answer")
            if conn.closed:
                raise UpstreamError("the upstream closed the connection mid-answer")
            await conn.wait(self._timeout)

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (or up to ``limit`` bytes of it)."""
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
        if self._done and self._keep_alive and not self._conn.closed and not self._conn.buffer:
            self._client._put(self._origin, self._conn)
        else:
            self._conn.close()

    def close(self) -> None:
        """Abandon the answer: the connection is dropped, which the upstream sees as a hang-up."""
        self._finished = True
        self._conn.close()


class UpstreamClient:
    def __init__(self) -> None:
        self._idle: dict[Origin, list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _get(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.buffer and now - conn.idle_since < IDLE_TIMEOUT:
                return conn
            conn.close()
        return None

    def _put(self, origin: Origin, conn: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= MAX_IDLE_PER_ORIGIN:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def _connect(self, origin: Origin, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), origin.host, origin.port,
                                       ssl=self._ssl_context() if origin.tls else None,
                                       server_hostname=origin.host if origin.tls else None),
                timeout)
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"connecting to {origin.host}:{origin.port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}"
                                if isinstance(exc, OSError) else str(exc)) from None
        return conn

    async def request(self, origin: Origin, method: str, head: bytes, body: bytes | None,
                      timeout: float) -> UpstreamResponse:
        """Send ``head`` (request line and headers, ending in a blank line) and ``body``;
        return once the answer's head has arrived."""
        payload = head + body if body else head
        for attempt in (0, 1):
            conn = self._get(origin) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, timeout)
            assert conn.transport is not None
            conn.transport.write(payload)
            try:
                return await self._read_head(conn, origin, method, timeout)
            except UpstreamTimeout:
                conn.close()
                raise
            except UpstreamError:
                conn.close()
                if reused and not conn.buffer:
                    continue  # a stale keep-alive connection: try once more on a fresh one
                raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    async def _read_head(self, conn: _Connection, origin: Origin, method: str, timeout: float) -> UpstreamResponse:
        while True:
            buf = conn.buffer
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                if len(buf) > MAX_HEAD:
                    raise UpstreamError("the upstream sent an oversized answer head")
                if conn.closed:
                    raise UpstreamError("the upstream closed the connection before answering")
                await conn.wait(timeout)
                end = buf.find(b"\r\n\r\n")
            raw = bytes(buf[:end])
            del buf[:end + 4]
            lines = raw.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            try:
                status = int(parts[1])
            except (IndexError, ValueError):
                raise UpstreamError("the upstream sent a malformed status line") from None
            if 100 <= status < 200 and status != 101:
                continue  # 100 Continue and friends: the real answer follows
            headers: list[tuple[str, str]] = []
            length: int | None = None
            chunked = False
            keep_alive = parts[0] == "HTTP/1.1"
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    continue
                value = value.strip()
                lower = name.lower()
                if lower == "content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        raise UpstreamError("the upstream sent a malformed Content-Length") from None
                elif lower == "transfer-encoding":
                    chunked = value.lower().endswith("chunked")
                elif lower == "connection":
                    tokens = value.lower()
                    if "close" in tokens:
                        keep_alive = False
                    elif "keep-alive" in tokens:
                        keep_alive = True
                headers.append((name, value))
            no_body = method == "HEAD" or status in (204, 304)
            return UpstreamResponse(conn, self, origin, timeout, status, parts[2] if len(parts) > 2 else "",
                                    headers, length, chunked, keep_alive, no_body)

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
