"""The proxy's control endpoint: what the ``cst serve`` that started this proxy asks of it.

``cst proxy --control PATH`` serves these small JSON routes on a Unix socket (0600, in a 0700
folder of the state dir), so only CST's own user reaches them; the OpenAI-compatible port
never does:

    GET  /                        {"pid", "url"}: answers once the proxy listens (readiness)
    GET  /pool                    the key pool's document (``GET /api/pool``)
    GET  /usage?instance=ID ...   the current windows (``UsageBook.document``), IDs listed even unused
    GET  /usage/daily?from=&to=[&instance=]   daily totals from the ledger (``daily_document``)
    GET  /in-flight               {"callers": {caller: requests being forwarded now}}
    GET  /metrics                 the answer-time histograms, in Prometheus' text format
    POST /instance-keys/reload    read the instances' proxy keys again now

A socket path longer than ``sun_path`` allows (108 bytes; deep test folders) is reached
through ``/proc/self/fd`` of its open folder (``reachable``).
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from reconciler.files import private_dir

from .budget import UsageBook, daily_document
from .metrics import latency_families
from .server import status_document
from .service import ProxyService

SUN_PATH_MAX = 100   # sun_path holds 108 bytes with its NUL; longer paths go through /proc/self/fd


def reachable(path: Path) -> tuple[str, int | None]:
    """A path to bind or connect ``path`` by, and the descriptor of its folder to keep open while
    it is used (None when ``path`` itself is short enough)."""
    if len(os.fsencode(str(path))) < SUN_PATH_MAX:
        return str(path), None
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{folder}/{path.name}", folder


def account_state(info: dict[str, Any]) -> str:
    """``ok`` (logged in / keys loaded), ``error`` (``last_error`` says why) or ``pending`` (not yet)."""
    if info.get("last_error"):
        return "error"
    return "ok" if info.get("last_refresh") else "pending"


def pool_document(service: ProxyService) -> dict[str, Any]:
    """The proxy's status document, plus its URL, each account's state and the total balance, so
    the admin page needs nothing but cst serve's API."""
    assert service.state is not None
    document = status_document(service.state)
    accounts = {name: {**info, "state": account_state(info)} for name, info in document["accounts"].items()}
    return {
        "running": True,
        "url": f"{service.url}/v1",
        "totalBalance": round(sum(a["balance"] for a in accounts.values()), 2),
        "keys": document["keys"],
        "accounts": accounts,
        "store": service.shared.status() if service.shared is not None else {"kind": "sqlite"},
    }


class _Latency(Collector):
    def __init__(self, service: ProxyService):
        self.service = service

    def collect(self) -> Iterator[Metric]:
        if self.service.state is not None:
            yield from latency_families(self.service.state)


class ControlServer:
    def __init__(self, service: ProxyService, path: Path):
        self.service = service
        self.path = path
        self._runner: web.AppRunner | None = None
        self._folder: int | None = None
        self._latency = CollectorRegistry(auto_describe=False)
        self._latency.register(_Latency(service))

    async def start(self) -> None:
        await asyncio.to_thread(private_dir, self.path.parent)
        app = web.Application()
        app.router.add_get("/", self._hello)
        app.router.add_get("/pool", self._pool)
        app.router.add_get("/usage", self._usage)
        app.router.add_get("/usage/daily", self._daily)
        app.router.add_get("/in-flight", self._in_flight)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/instance-keys/reload", self._reload_keys)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        where, self._folder = reachable(self.path)
        # a stale socket of a proxy that died is replaced (asyncio removes a socket file in the way)
        await web.UnixSite(self._runner, where).start()
        os.chmod(where, 0o600)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._folder is not None:
            os.close(self._folder)
            self._folder = None

    async def _hello(self, request: web.Request) -> web.Response:
        return web.json_response({"pid": os.getpid(), "url": self.service.url})

    async def _pool(self, request: web.Request) -> web.Response:
        return web.json_response(pool_document(self.service))

    def _book(self) -> UsageBook:
        assert self.service.state is not None
        return self.service.state.usage

    async def _usage(self, request: web.Request) -> web.Response:
        return web.json_response(self._book().document(request.query.getall("instance", [])))

    async def _daily(self, request: web.Request) -> web.Response:
        """Days as cst serve checked them (``reconciler/server/usage.py``); read off the loop."""
        book = self._book()
        first, last, caller = request.query["from"], request.query["to"], request.query.get("instance")
        assert book.ledger is not None
        totals = await asyncio.to_thread(book.ledger.store.daily, first, last, caller)
        return web.json_response(daily_document(book.window(), totals, first, last))

    async def _in_flight(self, request: web.Request) -> web.Response:
        assert self.service.state is not None
        return web.json_response({"callers": dict(self.service.state.in_flight_by_caller)})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self._latency), content_type="text/plain")

    async def _reload_keys(self, request: web.Request) -> web.Response:
        await self.service.reload_instance_keys()
        return web.json_response({"reloaded": True})
