"""The front door: cst serve holds the port of every instance with ``park_after``.

Node listens on a loopback port of its own behind it (``Record.backend_port``); the door checks
the instance's basic-auth credentials on every request, wakes a parked instance for the first
one that has them, and relays each request to node and its answer back as it comes (a chat
stream too). A request without valid credentials gets a 401 from the door and wakes nothing, so
scanners and bots cannot keep a host's memory busy; wrong passwords are rate-limited per
address as the admin key is. What the door sees is what "in use" means for parking: a request
in flight, or one ended less than ``park_after`` ago (``Entrance.idle_for``).

One aiohttp low-level server (no router: every request takes the same way) serves all the
ports; the port a connection came in on names the instance.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import aiohttp
from aiohttp import BasicAuth, web
from multidict import CIMultiDict
from yarl import URL

from .ratelimit import FailureLimiter

log = logging.getLogger("cst.door")

# headers of one connection, not of the request or answer: never relayed (RFC 9110, 7.6.1)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "proxy-connection"})
CONNECT_TIMEOUT = 5.0   # to node on loopback: it answers at once or is not there
STARTING_WAIT = 30.0    # a refused connection to a node with a live record: it may be starting
RETRY_GAP = 0.1


class WakeFailed(Exception):
    """The instance could not be woken; ``retry_after``: seconds before another try is worth it."""

    def __init__(self, reason: str, retry_after: int = 5):
        self.retry_after = retry_after
        super().__init__(reason)


@dataclass(eq=False)
class Entrance:
    """One instance's door: its port, the credentials that open it, and its use."""

    id: str
    host: str
    port: int
    credentials: str                 # "<id>:<password>": what basic auth must carry. Never log it.
    park_after: float
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)   # one park or wake at a time

    def idle_for(self, now: float) -> float:
        """Seconds without a request in flight; 0 while one is."""
        return 0.0 if self.in_flight else now - self.last_used

    def same_door(self, other: "Entrance") -> bool:
        return (self.id, self.host, self.port) == (other.id, other.host, other.port)


# where node answers for an instance now (its loopback port), or None: no process (parked, stopped)
BackendOf = Callable[[str], int | None]
# start the instance behind an entrance (its turn is held); raises WakeFailed
Wake = Callable[[Entrance], Awaitable[None]]


def _text(status: int, english: str, chinese: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=f"{english}\n{chinese}\n", headers=headers)


class FrontDoor:
    def __init__(self, backend_of: BackendOf, wake: Wake, limiter: FailureLimiter | None = None):
        self._backend_of = backend_of
        self._wake = wake
        self._limiter = limiter or FailureLimiter()
        self._entrances: dict[int, Entrance] = {}     # by port
        self._sites: dict[int, web.TCPSite] = {}
        self._bind_failures: dict[int, str] = {}      # port -> why it could not be held (said once)
        self._runner: web.ServerRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    @property
    def entrances(self) -> list[Entrance]:
        return list(self._entrances.values())

    def entrance(self, id_: str) -> Entrance | None:
        return next((e for e in self._entrances.values() if e.id == id_), None)

    def held(self, port: int) -> bool:
        return port in self._sites

    async def start(self) -> None:
        server = web.Server(self._handle, access_log=None, handler_cancellation=True)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        # no cookie jar, no decompression: cookies and compressed bodies pass through as they are
        self._client = aiohttp.ClientSession(
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"))

    async def close(self) -> None:
        for port in list(self._sites):
            await self._release(port)
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def follow(self, wanted: list[Entrance]) -> None:
        """Hold exactly the ports of ``wanted``: release the others' (an instance stopped, removed or
        no longer parked), take the new ones. An entrance that stays keeps its use and its turn;
        its credentials and park_after follow the file. A port that cannot be taken yet (node still
        on it, before its restart behind the door) is tried again at the next call."""
        by_port = {e.port: e for e in wanted}
        for port, entrance in list(self._entrances.items()):
            new = by_port.get(port)
            if new is None or not new.same_door(entrance):
                await self._release(port)
        for port, new in by_port.items():
            kept = self._entrances.get(port)
            if kept is not None:
                kept.credentials, kept.park_after = new.credentials, new.park_after
            else:
                self._entrances[port] = new
            if port not in self._sites:
                await self._hold(new)

    async def _hold(self, entrance: Entrance) -> None:
        assert self._runner is not None, "start() first"
        site = web.TCPSite(self._runner, entrance.host, entrance.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            why = exc.strerror or str(exc)
            if self._bind_failures.get(entrance.port) != why:
                log.warning("front door of %s: cannot hold %s:%d yet (%s); trying again after the next pass",
                            entrance.id, entrance.host, entrance.port, why)
            self._bind_failures[entrance.port] = why
            return
        self._bind_failures.pop(entrance.port, None)
        self._sites[entrance.port] = site

    async def _release(self, port: int) -> None:
        self._entrances.pop(port, None)
        self._bind_failures.pop(port, None)
        site = self._sites.pop(port, None)
        if site is not None:
            await site.stop()

    # -- a request

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        entrance = self._entrances.get(sockname[1]) if sockname else None
        if entrance is None:   # the port is being released
            return _text(503, "This instance is not served here any more.", "此实例已不在此处提供服务。")
        refused = self._refuse(request, entrance)
        if refused is not None:
            return refused
        entrance.in_flight += 1
        try:
            backend = await self._awake(entrance)
            return await self._relay(request, entrance, backend)
        except WakeFailed as exc:
            return _text(503, f"{entrance.id} could not be started: {exc}. Try again shortly.",
                         f"{entrance.id} 无法启动：{exc}。请稍后重试。", **{"Retry-After": str(exc.retry_after)})
        finally:
            entrance.in_flight -= 1
            entrance.last_used = time.monotonic()

    def _refuse(self, request: web.BaseRequest, entrance: Entrance) -> web.Response | None:
        """A 401 without the instance's credentials, a 429 for an address that guessed too often."""
        client = request.remote
        wait = self._limiter.retry_after(client)
        if wait:
            if self._limiter.first_refusal(client):
                log.warning("too many wrong passwords for %s from %s: refusing it for now", entrance.id, client)
            return _text(429, f"Too many wrong passwords; try again in {wait} s.",
                         f"密码错误次数过多，请在 {wait} 秒后重试。", **{"Retry-After": str(wait)})
        given = request.headers.get("Authorization", "")
        if given:
            try:
                auth = BasicAuth.decode(given)
            except ValueError:
                auth = None
            if auth is not None and hmac.compare_digest(f"{auth.login}:{auth.password}".encode(),
                                                        entrance.credentials.encode()):
                return None
            self._limiter.failed(client)
        return _text(401, "Unauthorized", "未授权", **{"WWW-Authenticate": 'Basic realm="SillyTavern"'})

    async def _awake(self, entrance: Entrance) -> int:
        """Where node answers for the entrance: woken first when it has no process."""
        backend = self._backend_of(entrance.id)
        if backend is not None and not entrance.turn.locked():
            return backend
        # the first request wakes it; the others wait for that (its record names the port before
        # node listens on it) and find it awake
        async with entrance.turn:
            backend = self._backend_of(entrance.id)
            if backend is None:
                await self._wake(entrance)
                backend = self._backend_of(entrance.id)
        if backend is None:
            raise WakeFailed("it stopped again at once")
        return backend

    async def _connect(self, request: web.BaseRequest, entrance: Entrance, backend: int,
                       headers: CIMultiDict[str]) -> aiohttp.ClientResponse:
        """Send the request to node. A refused connection is tried again while node is starting
        (started by a pass, not this door: its record names the port before node listens on it);
        nothing of the request was sent then."""
        assert self._client is not None, "start() first"
        deadline = time.monotonic() + STARTING_WAIT
        while True:
            url = URL(f"http://127.0.0.1:{backend}{request.raw_path}", encoded=True)
            try:
                return await self._client.request(request.method, url, headers=headers, allow_redirects=False,
                                                  data=request.content if request.body_exists else None)
            except aiohttp.ClientConnectorError:
                now_at = self._backend_of(entrance.id)
                if now_at is None or time.monotonic() >= deadline:
                    raise
                backend = now_at
                await asyncio.sleep(RETRY_GAP)

    async def _relay(self, request: web.BaseRequest, entrance: Entrance, backend: int) -> web.StreamResponse:
        assert self._client is not None, "start() first"
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        try:
            upstream = await self._connect(request, entrance, backend, headers)
        except aiohttp.ClientConnectionError as exc:
            log.warning("front door of %s: node on port %d did not take the request (%s)", entrance.id, backend, exc)
            return _text(502, f"{entrance.id} did not answer; try again shortly.", f"{entrance.id} 没有响应，请稍后重试。",
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
