"""The admin page: ``GET /`` and ``GET /page/{name}``, the files of ``page/`` shipped in the package.

Its views are modules in ``page/views/``, served as ``/page/views/{name}``. They are read once and
served from memory with an ETag. The page is static and holds no secret: it asks for the admin key
and sends it with each ``/api/`` call. Its Content-Security-Policy lets it load and call nothing but
this server, run no inline script and be framed by no one.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable

from aiohttp import web

from .errors import ErrorKind, FleetError

TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated with the ETag: a new release shows at once
}


def _files(folder: Traversable, prefix: str = "") -> Iterator[tuple[str, Traversable]]:
    """The page's files by their names under page/: app.js, views/logs.js (a view a module)."""
    for entry in folder.iterdir():
        if entry.is_dir():
            yield from _files(entry, f"{prefix}{entry.name}/")
        elif entry.is_file() and entry.name[entry.name.rfind("."):] in TYPES:
            yield prefix + entry.name, entry


class Page:
    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str, str]] = {}  # name -> (body, content type, etag)
        for name, entry in _files(resources.files(__package__).joinpath("page")):
            body = entry.read_bytes()
            content_type = TYPES[name[name.rfind("."):]]
            self.files[name] = (body, content_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')

    def respond(self, request: web.Request, name: str) -> web.Response:
        if name not in self.files:
            raise FleetError(ErrorKind.NOT_FOUND, "not_route")
        body, content_type, etag = self.files[name]
        headers = {**HEADERS, "ETag": etag}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=headers)
