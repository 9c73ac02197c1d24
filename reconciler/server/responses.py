"""The API's answers: JSON in the caller's language, errors with their code, and answers that
stream (events, logs, backups): once one of those is prepared, its head has gone out, and an
error must end the connection rather than send a second answer inside the first."""
from __future__ import annotations

import json
from typing import Awaitable, Callable

from aiohttp import web

from .messages import language, message

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_answer(data: object, status: int = 200) -> web.Response:
    # Chinese messages as characters, not \u escapes
    return web.json_response(data, status=status, dumps=lambda obj: json.dumps(obj, ensure_ascii=False))


def language_of(request: web.Request) -> str:
    return language(request.query, request.headers.get("Accept-Language"))


def error_answer(request: web.Request, status: int, code: str, **params: object) -> web.Response:
    """The seed's ``{"error": <message>}`` in the caller's language, with the stable ``code`` beside it."""
    return json_answer({"error": message(code, language_of(request), **params), "code": code}, status=status)

_STARTED = web.RequestKey("cst_response_started", bool)


async def start(response: web.StreamResponse, request: web.Request) -> None:
    """Prepare ``response`` and remember that this request has its answer under way."""
    await response.prepare(request)
    request[_STARTED] = True


def started(request: web.Request) -> bool:
    return bool(request.get(_STARTED, False))
