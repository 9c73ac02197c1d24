"""Answers that stream (events, logs, backups): once one is prepared, its head has gone out, and
an error must end the connection rather than send a second answer inside the first."""
from __future__ import annotations

from aiohttp import web

_STARTED = web.RequestKey("cst_response_started", bool)


async def start(response: web.StreamResponse, request: web.Request) -> None:
    """Prepare ``response`` and remember that this request has its answer under way."""
    await response.prepare(request)
    request[_STARTED] = True


def started(request: web.Request) -> bool:
    return request.get(_STARTED, False)
