"""Who may use the REST API: the admin key on every route but ``PUBLIC_ROUTES`` (deny by default),
compared in constant time, as ``X-ST-Admin-Key`` or, on ``BEARER_ROUTES``, a bearer token; wrong
keys limited per client address, found behind the file's trusted reverse proxies."""
from __future__ import annotations

import hmac
import ipaddress
import logging
from typing import Callable

from aiohttp import web

from ..desired.model import IPNetwork
from .ratelimit import FailureLimiter
from .responses import Handler, error_answer

log = logging.getLogger("cst.api")
ADMIN_KEY = web.AppKey("admin_key", str)
LIMITER = web.AppKey("limiter", FailureLimiter)
# the reverse proxies whose X-Forwarded-For is believed, as the file in force says them
TRUSTED_PROXIES: web.AppKey[Callable[[], tuple[IPNetwork, ...]]] = web.AppKey("trusted_proxies")


def key_matches(given: str, expected: str) -> bool:
    """Constant-time comparison of a header value with a key. aiohttp keeps header bytes that
    are not UTF-8 as surrogates; they are compared as the bytes that arrived (and never match)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


def client_address(request: web.BaseRequest, trusted: tuple[IPNetwork, ...]) -> str | None:
    """Who is calling: the peer, or, when the peer is a trusted reverse proxy, the nearest address
    in ``X-Forwarded-For`` that is not one (each proxy appends the address it heard from, so the
    addresses before a trusted proxy's are the client's word and believed no further)."""
    address = request.remote
    if not trusted or not _trusted(address, trusted):
        return address
    for hop in reversed(",".join(request.headers.getall("X-Forwarded-For", [])).split(",")):
        hop = hop.strip()
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break   # not an address: nothing before it can be believed either
        address = hop
        if not _trusted(hop, trusted):
            break
    return address


def _trusted(address: str | None, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def caller(request: web.Request) -> str | None:
    """The client's address, as ``client_address`` finds it behind the file's trusted proxies."""
    return client_address(request, request.app[TRUSTED_PROXIES]())


# The only routes answered without the admin key, as (method, route pattern): liveness, and the
# admin page with its static files (it holds no secret and asks for the key once loaded). Every
# other route needs the key, one added later too, and so does a path no route matches (a 404 or
# 405 tells nothing without it). HEAD follows its GET.
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset({
    ("GET", "/health"),
    ("GET", "/"),
    ("GET", "/page/{name}"),
})


# Routes that also take the admin key as ``Authorization: Bearer <key>``: what Prometheus and other
# scrapers send (bearer_token_file, authorization.credentials_file), where a header of another name
# needs a recent Prometheus. Compared, and limited when wrong, as X-ST-Admin-Key is.
BEARER_ROUTES: frozenset[tuple[str, str]] = frozenset({("GET", "/metrics")})


def matched_route(request: web.Request) -> tuple[str, str] | None:
    """(method, route pattern) of the route the router matched (HEAD as its GET), never the
    path's spelling; None when no route matched (a 404 or 405)."""
    route = request.match_info.route
    if route.resource is None:
        return None
    return ("GET" if route.method == "HEAD" else route.method, route.resource.canonical)


def is_public(request: web.Request) -> bool:
    """Whether the route ``request`` matched is one of ``PUBLIC_ROUTES``."""
    return matched_route(request) in PUBLIC_ROUTES


def _bearer_key(request: web.Request) -> str | None:
    """The token of ``Authorization: Bearer <token>`` on a route of ``BEARER_ROUTES``."""
    if matched_route(request) not in BEARER_ROUTES:
        return None
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None   # the scheme is case-insensitive (RFC 9110)


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if is_public(request):
        return await handler(request)
    limiter = request.app[LIMITER]
    who = caller(request)
    wait = limiter.retry_after(who)
    if wait:
        if limiter.first_refusal(who):
            log.warning("too many wrong admin keys from %s: refusing it for now", who)
        response = error_answer(request, 429, "too_many_failures", seconds=wait)
        response.headers["Retry-After"] = str(wait)
        return response
    given = request.headers.get("X-ST-Admin-Key") or _bearer_key(request)
    if not given:  # not a guess: not counted
        return error_answer(request, 401, "missing_admin_key")
    if not key_matches(given, request.app[ADMIN_KEY]):
        limiter.failed(who)
        return error_answer(request, 401, "invalid_admin_key")
    return await handler(request)
