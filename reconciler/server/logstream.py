"""``GET /api/instances/{id}/logs?tail=N&follow=1``: an instance's log over HTTP, as plain text.

Without ``follow`` the answer is the last ``tail`` lines. With it the response stays open and
carries each addition as it is written (chunked), until the client hangs up or cst serve stops.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from ..runtime.logfollow import MAX_LINES, follow, last_lines
from . import responses
from .errors import ErrorKind, FleetError

DEFAULT_TAIL = 100
TRUE, FALSE = ("1", "true", "yes"), ("", "0", "false", "no")


def _options(request: web.Request) -> tuple[int, bool]:
    tail = request.query.get("tail", str(DEFAULT_TAIL))
    if not tail.isdigit() or int(tail) > MAX_LINES:  # isdigit: no sign, no spaces
        raise FleetError(ErrorKind.BAD_REQUEST, "bad_tail", tail=tail[:20], max=MAX_LINES)
    flag = request.query.get("follow", "").lower()
    if flag not in TRUE + FALSE:
        raise FleetError(ErrorKind.BAD_REQUEST, "bad_follow", follow=flag[:20])
    return int(tail), flag in TRUE


async def respond(request: web.Request, path: Path) -> web.StreamResponse:
    tail, following = _options(request)
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if not following:
        text, _, _ = await asyncio.to_thread(last_lines, path, tail)
        return web.Response(body=text, content_type="text/plain", charset="utf-8", headers=headers)
    response = web.StreamResponse(headers={**headers, "Content-Type": "text/plain; charset=utf-8"})
    await responses.start(response, request)

    def gone() -> bool:
        return request.transport is None or request.transport.is_closing()

    try:
        async for chunk in follow(path, tail, gone):
            await response.write(chunk)
    except ConnectionResetError:
        pass  # the client went away between two checks
    return response
