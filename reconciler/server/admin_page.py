"""The admin page: ``GET /`` and ``GET /page/{name}``, the files of ``page/`` shipped in the package.

They are read once and served from memory with an ETag. The page is static and holds no secret:
it asks for the admin key and sends it with each ``/api/`` call. Its Content-Security-Policy lets
it load and call nothing but this server, run no inline script and be framed by no one.
"""
from __future__ import annotations

import hashlib
from importlib import resources

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


class Page:
    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str, str]] = {}  # name -> (body, content type, etag)
        for entry in resources.files(__package__).joinpath("page").iterdir():
            suffix = entry.name[entry.name.rfind("."):]
            if entry.is_file() and suffix in TYPES:
                body = entry.read_bytes()
                self.files[entry.name] = (body, TYPES[suffix], f'"{hashlib.sha256(body).hexdigest()[:32]}"')

    def respond(self, request: web.Request, name: str) -> web.Response:
        if name not in self.files:
            raise FleetError(ErrorKind.NOT_FOUND, "not_route")
        body, content_type, etag = self.files[name]
        headers = {**HEADERS, "ETag": etag}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=headers)
