"""Deny by default (issue 17): every route of the admin API needs ``X-ST-Admin-Key`` but the few in
``security.PUBLIC_ROUTES``, decided by the route the router matched; a route added later is protected
without anyone remembering to, and a path no route matches tells nothing without the key.

The real app (``make_app`` on a real, unstarted ``Daemon``) served in this process on a free port."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from reconciler.desired.schema import SCHEMAS
from reconciler.desired.shared_file import DesiredFile
from reconciler.server import api, security
from reconciler.server.daemon import Daemon

KEY = "deny-admin-key"
MISSING = {"error": "Missing admin key (header X-ST-Admin-Key)", "code": "missing_admin_key"}
INVALID = {"error": "Invalid admin key", "code": "invalid_admin_key"}
# what the page loads before anyone has typed a key: its HTML, then page/app.js and its imports
PAGE_FILES = ("style.css", "app.js", "api.js", "i18n.js", "usage.js", "dom.js", "format.js", "messages.js", "state.js",
              "stream.js", "timers.js", *(f"views/{view}.js" for view in ("signin", "instances", "logs", "pool",
                                                                          "usage", "file", "git")))


def _app(tmp_path: Path) -> web.Application:
    (tmp_path / "desired.yaml").write_text("version: 1\ninstances: []\n")
    file = DesiredFile(tmp_path / "desired.yaml")
    return api.make_app(Daemon(file, file.read()), KEY)


@pytest.fixture
async def app(tmp_path: Path) -> web.Application:
    return _app(tmp_path)


@pytest.fixture
async def client(app: web.Application) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as client:  # port 0: a free one
        yield client


def _path(route: web.AbstractRoute) -> str:
    """A concrete path for a route: each ``{param}`` of its pattern filled in."""
    return re.sub(r"\{[^}]*\}", "st-instance-1", route.resource.canonical)


async def _answer(client: TestClient, method: str, path: str, key: str | None = None) -> tuple[int, object]:
    headers = {"X-ST-Admin-Key": key} if key is not None else {}
    async with client.request(method, path + "?lang=en", headers=headers) as response:
        body = await response.read()
        if method == "HEAD" or not response.content_type.endswith("json"):
            return response.status, None
        return response.status, json.loads(body)


def test_the_public_routes_are_liveness_and_the_page_and_the_contract_says_so(app: web.Application) -> None:
    assert security.PUBLIC_ROUTES == {("GET", "/health"), ("GET", "/"), ("GET", "/page/{name}")}  # noqa: SIM300
    document = app[api.OPENAPI]   # the OpenAPI document the server serves
    keyless = {(method.upper(), path) for path, operations in document["paths"].items()
               for method, operation in operations.items() if operation.get("security") == []}
    assert keyless == security.PUBLIC_ROUTES


async def test_every_route_but_the_public_ones_answers_401_without_the_key(app: web.Application,
                                                                           client: TestClient) -> None:
    routes = [route for route in app.router.routes() if route.resource is not None]
    public = [route for route in routes if (route.method if route.method != "HEAD" else "GET",
                                            route.resource.canonical) in security.PUBLIC_ROUTES]
    assert {(route.method, route.resource.canonical) for route in public} >= security.PUBLIC_ROUTES
    protected = [route for route in routes if route not in public]
    assert len(protected) >= 20, "make_app's routes were enumerated"
    for route in protected:
        path = _path(route)
        missing = await _answer(client, route.method, path)
        assert missing[0] == 401, (route.method, path, missing)
        assert missing[1] in (MISSING, None), (route.method, path, missing)   # HEAD has no body
    for route in public:
        if route.method == "GET":
            status, _ = await _answer(client, "GET", _path(route).replace("st-instance-1", "app.js"))
            assert status == 200, (route.method, route.resource.canonical, status)


async def test_a_route_added_later_needs_the_key_without_being_listed(app: web.Application, tmp_path: Path) -> None:
    async def secret(request: web.Request) -> web.Response:
        return web.json_response({"secret": "the pool's keys"})

    # a new route anywhere, and a new method on a public route's path, are not public
    app.router.add_get("/later", secret)
    app.router.add_get("/metrics/{name}", secret)
    app.router.add_post("/health", secret)
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as client:
        for method, path in (("GET", "/later"), ("GET", "/metrics/all"), ("POST", "/health")):
            assert await _answer(client, method, path) == (401, MISSING), (method, path)
            assert await _answer(client, method, path, "wrong") == (401, INVALID), (method, path)
            assert await _answer(client, method, path, KEY) == (200, {"secret": "the pool's keys"}), (method, path)
        assert (await _answer(client, "GET", "/health"))[0] == 200   # the listed GET stays public


async def test_the_page_loads_without_a_key(client: TestClient) -> None:
    page = await client.get("/")
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    assert 'src="page/app.js"' in html and 'href="page/style.css"' in html
    for name in PAGE_FILES:
        answer = await client.get(f"/page/{name}")
        assert answer.status == 200, name
    assert (await client.head("/health")).status == 200 and (await client.head("/")).status == 200
    health = await client.get("/health")
    assert health.status == 200 and (await health.json())["status"] == "ok"
    # a file the page does not have is the page's 404, key or not; nothing is read from disk
    for missing in ("/page/nothing.js", "/page/", "/page/a/b", "/page/..%2Fapi.py"):
        assert await _answer(client, "GET", missing) == (404, {"error": "Not found", "code": "not_route"}), missing


async def test_unknown_paths_tell_nothing_without_the_key_and_wrong_keys_there_are_limited(client: TestClient) -> None:
    for method, path in (("GET", "/nothing"), ("GET", "/api/nothing"), ("POST", "/"), ("DELETE", "/health"),
                         ("GET", "/api/instances/a/b/c"), ("GET", "/health/")):
        assert await _answer(client, method, path) == (401, MISSING), (method, path)
    assert await _answer(client, "GET", "/nothing", KEY) == (404, {"error": "Not found", "code": "not_route"})
    assert await _answer(client, "POST", "/", KEY) == (405, {"error": "Method not allowed", "code": "method"})
    # guesses at unknown paths count like any other: a burst, then 429 for every protected route
    statuses = [(await _answer(client, "GET", f"/guess-{n}", f"wrong-{n}"))[0] for n in range(30)]
    assert statuses[0] == 401 and statuses[-1] == 429 and statuses.count(401) <= 11, statuses
    assert (await _answer(client, "GET", "/api/status", KEY))[0] == 429
    # liveness and the page are not behind the limiter (they never were)
    assert (await _answer(client, "GET", "/health"))[0] == 200
    assert (await _answer(client, "GET", "/"))[0] == 200
