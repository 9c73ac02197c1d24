"""The gate: where the edge sends a request whose instance has no process to answer it.

nginx (``runtime/edge_config.py``) checks every request's credentials and sends it to the
instance's socket; when nobody listens there (a parked instance, or one starting after a crash)
it hands the request to this gate, on a Unix socket only root and the edge's workers reach,
naming the instance in ``X-CST-Instance``. The gate checks the credentials again, wakes an
instance with ``park_after`` (the first request wakes it, the others wait for that) and relays
the request to node once it listens, its answer back as it comes. An instance without
``park_after`` is not started here: a pass does that, and the gate answers 503 meanwhile.

Only these first requests cross Python: once node listens, nginx sends the next ones to it
directly. What the gate relays counts as use for parking (``Entrance.in_flight``), as what the
edge relays does (``parking.EdgeUse``).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

log = logging.getLogger("cst.gate")

# headers of one connection, not of the request or answer: never relayed (RFC 9110, 7.6.1)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "proxy-connection", "x-cst-instance"})
STARTING_WAIT = 30.0    # a refused connection to a node with a live record: it may be starting
RETRY_GAP = 0.1


class WakeFailed(Exception):
    """The instance could not be woken; ``retry_after``: seconds before another try is worth it."""

    def __init__(self, reason: str, retry_after: int = 5):
        self.reason, self.retry_after = reason, retry_after
        super().__init__(reason)


@dataclass(eq=False)
class Entrance:
    """One parking instance: the credentials that open it, and its use."""

    id: str
    credentials: str                 # "<id>:<password>": what basic auth must carry. Never log it.
    park_after: float
    in_flight: int = 0               # requests the gate relays now
    last_used: float = field(default_factory=time.monotonic)
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)   # one park or wake at a time


# whether the instance has a live process now (its record names one)
Running = Callable[[str], bool]
# start the instance behind an entrance (its turn is held); raises WakeFailed
Wake = Callable[[Entrance], Awaitable[None]]


def _text(status: int, english: str, chinese: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=f"{english}\n{chinese}\n", headers=headers)


def credentials_match(header: str, expected: str) -> bool:
    """Whether a Basic ``Authorization`` header carries ``expected`` ("<id>:<password>"), compared
    in constant time. The credentials are UTF-8, as browsers send them."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, expected.encode())


class Gate:
    def __init__(self, path: Path, sockets: Callable[[str], Path], running: Running, wake: Wake,
                 group: int | None):
        self._path = path
        self._socket_of = sockets
        self._running = running
        self._wake = wake
        self._group = group
        self.entrances: dict[str, Entrance] = {}
        self._runner: web.ServerRunner | None = None
        self._clients: dict[str, aiohttp.ClientSession] = {}   # by instance: a connector per socket

    def entrance(self, id_: str) -> Entrance | None:
        return self.entrances.get(id_)

    async def start(self) -> None:
        server = web.Server(self._handle, access_log=None, handler_cancellation=True)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        self._path.unlink(missing_ok=True)
        site = web.UnixSite(self._runner, str(self._path))
        await site.start()
        if self._group is not None:
            os.chown(self._path, -1, self._group)
        os.chmod(self._path, 0o660 if self._group is not None else 0o600)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        if self._runner is not None:
            await self._runner.cleanup()

    def follow(self, wanted: list[Entrance]) -> None:
        """Hold exactly ``wanted``: an entrance that stays keeps its use and its turn; its
        credentials and park_after follow the file."""
        by_id = {e.id: e for e in wanted}
        for id_ in set(self.entrances) - set(by_id):
            del self.entrances[id_]
        for id_, new in by_id.items():
            kept = self.entrances.get(id_)
            if kept is not None:
                kept.credentials, kept.park_after = new.credentials, new.park_after
            else:
                self.entrances[id_] = new

    # -- a request

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        id_ = request.headers.get("X-CST-Instance", "")
        entrance = self.entrances.get(id_)
        if entrance is None:
            if id_ and self._running(id_):   # started by a pass meanwhile: node listens, or soon will
                return await self._relay(request, id_)
            return _text(503, f"{id_ or 'This instance'} is not running; try again shortly.",
                         f"{id_ or '此实例'} 未在运行，请稍后重试。", **{"Retry-After": "5"})
        if not credentials_match(request.headers.get("Authorization", ""), entrance.credentials):
            return _text(401, "Unauthorized", "未授权", **{"WWW-Authenticate": 'Basic realm="SillyTavern"'})
        entrance.in_flight += 1
        try:
            # the wake goes on when the user gives up waiting (a closed tab): it is under way in the
            # worker, and what it starts must be recorded, watched and announced
            await asyncio.shield(self._awake(entrance))
            return await self._relay(request, id_)
        except WakeFailed as exc:
            return _text(503, f"{id_} could not be started: {exc}. Try again shortly.",
                         f"{id_} 无法启动：{exc}。请稍后重试。", **{"Retry-After": str(exc.retry_after)})
        finally:
            entrance.in_flight -= 1
            entrance.last_used = time.monotonic()

    async def _awake(self, entrance: Entrance) -> None:
        """Wake the entrance's instance when it has no process; the first request wakes it, the
        others wait for that and find it awake."""
        if self._running(entrance.id) and not entrance.turn.locked():
            return
        async with entrance.turn:
            if not self._running(entrance.id):
                await self._wake(entrance)
        if not self._running(entrance.id):
            raise WakeFailed("it stopped again at once")

    def _client(self, id_: str) -> aiohttp.ClientSession:
        client = self._clients.get(id_)
        if client is None or client.closed:
            # no cookie jar, no decompression: cookies and compressed bodies pass through as they are
            client = self._clients[id_] = aiohttp.ClientSession(
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                connector=aiohttp.UnixConnector(str(self._socket_of(id_)), force_close=True),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"))
        return client

    async def _connect(self, request: web.BaseRequest, id_: str, headers: CIMultiDict[str]) -> aiohttp.ClientResponse:
        """Send the request to node; a refused connection is tried again while its record names a
        live process (node loading: CST opened its socket before it started)."""
        deadline = time.monotonic() + STARTING_WAIT
        url = URL(f"http://localhost{request.raw_path}", encoded=True)
        while True:
            try:
                return await self._client(id_).request(request.method, url, headers=headers, allow_redirects=False,
                                                       data=request.content if request.body_exists else None)
            except aiohttp.ClientConnectorError:
                if not self._running(id_) or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(RETRY_GAP)

    async def _relay(self, request: web.BaseRequest, id_: str) -> web.StreamResponse:
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        try:
            upstream = await self._connect(request, id_, headers)
        except aiohttp.ClientConnectionError as exc:
            log.warning("gate: %s did not take the request (%s)", id_, exc)
            return _text(502, f"{id_} did not answer; try again shortly.", f"{id_} 没有响应，请稍后重试。",
                         **{"Retry-After": "2"})
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            # once prepared, an error aborts the connection (aiohttp), never a second answer
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
