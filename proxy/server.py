"""The HTTP front: thin handlers over the pool, the forwarder and the accounts.

Routes: ``/v1/*`` (forwarded), ``/health`` (open, for liveness probes),
``/status`` and ``/metrics`` (behind a key once any exists, since they reveal
balances and masked keys). A request is counted for its caller (see ``callers``
and ``usage``); an instance calling ``/status`` sees its own counts only.

Limits, answered in OpenAI's error shape: a body over ``settings.proxy.max_body`` is a 413
(refused before it is read when its Content-Length says so); past
``settings.proxy.max_concurrent`` forwarded requests in flight, a 503 with Retry-After.
A forwarded path is normalised (dot segments resolved, empty and trailing ones dropped, escapes
of unreserved characters decoded, others written one way) and refused when it would leave ``/v1/``
or hides a dot segment behind an escaped separator (``..%2F``), so no pool key goes to a path the
proxy does not serve. The normalised path is both what is metered (see ``metering``) and what
goes upstream.
"""
from __future__ import annotations

import asyncio
import re
import time
from typing import Any, Awaitable, Callable
from urllib.parse import quote, unquote

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .budget import Refusal, Reservation, SharedBudgets, charge
from .forward import openai_error
from .front import Answer, Front, Request, Stream, json_answer
from .ledger import StoreUnavailable
from .metering import Refused
from .metrics import registry_for
from .request_body import Unreadable, inspect
from .state import ProxyState
from .usage import Meter

_NOT_PLAIN = re.compile(r"//|/\.|%|\\|/$")  # a path without these is already in normal form
_DOTS = {".", ".."}
_SEGMENT_SAFE = "!$&'()*+,;=:@"   # RFC 3986 pchar besides the unreserved ones, which quote() keeps too


def normalised_path(raw_path: str) -> tuple[str, str] | None:
    """(the path, the path with its query) of ``raw_path`` in normal form: dot segments resolved,
    empty segments dropped, each segment decoded and encoded again one way; or None when it
    leaves /v1/, or a segment decodes to NUL or hides a dot segment behind an escaped separator
    (``..%2F``)."""
    path, sep, query = raw_path.partition("?")
    if not _NOT_PLAIN.search(path):
        return (path, raw_path) if path.startswith("/v1/") else None
    segments: list[str] = []
    for segment in path.split("/")[1:]:
        decoded = unquote(segment, errors="strict") if "%" in segment else segment
        if decoded in ("", "."):
            continue
        if decoded == "..":
            if not segments:
                return None
            segments.pop()
        elif "\0" in decoded or _DOTS & set(decoded.replace("\\", "/").split("/")):
            return None  # an escaped separator is fine (a model named org/name), an escaped ../ is not
        else:
            segments.append(quote(decoded, safe=_SEGMENT_SAFE))
    if len(segments) < 2 or segments[0] != "v1":
        return None
    normal = "/" + "/".join(segments)
    return normal, normal + sep + query



def _caller(state: ProxyState, request: Request) -> str | None:
    return state.callers.identify(request.authorization)


def _denied() -> Answer:
    return openai_error(401, "a valid proxy key is required (Authorization: Bearer ...)",
                        "invalid_request_error", "invalid_api_key", [("WWW-Authenticate", "Bearer")])


def _too_large(state: ProxyState) -> Answer:
    return openai_error(413, f"the request body is larger than the proxy's limit of {state.max_body} bytes",
                        "invalid_request_error", "request_too_large")


def _over_budget(refusal: Refusal, now: float) -> Answer:
    return openai_error(429, refusal.message(), "insufficient_quota", "budget_exceeded",
                        [("Retry-After", str(refusal.retry_after(now)))])


def _refused_path(refused: Refused, path: str) -> Answer:
    if refused is Refused.DEFERRED:
        message = (f"{path} is not served: its cost comes after the answer, where no budget can hold it "
                   "(settings.proxy.metering.deferred: refuse)")
    else:
        message = f"{path} is not served here (settings.proxy.metering.paths refuses it)"
    return openai_error(403, message, "invalid_request_error", refused.value)


def _unreadable(unreadable: Unreadable, path: str) -> Answer:
    return openai_error(400, f"the body of a request to {path} must be a JSON object", "invalid_request_error",
                        unreadable.value)


def _store_down(shared: SharedBudgets) -> Answer:
    return openai_error(503, f"the usage store {shared.url} cannot be reached, and the proxy serves no request "
                        "it cannot account for (settings.usage.on_store_down: closed); retry shortly",
                        "server_error", "store_unavailable", [("Retry-After", "5")])


async def forward(state: ProxyState, request: Request) -> Answer | Stream:
    arrived = time.monotonic()
    caller = _caller(state, request)
    if caller is None:
        return _denied()
    try:
        normal = normalised_path(request.raw_path)
    except UnicodeDecodeError:   # an escape that is not UTF-8
        normal = None
    if normal is None:
        return openai_error(400, "the path must stay inside /v1/ (no '..' above it, no escaped '/')",
                            "invalid_request_error", "invalid_path")
    path, request.raw_path = normal
    if len(request.body) > state.max_body:   # the front reads up to the limit it had when the body came
        return _too_large(state)
    if state.in_flight >= state.max_concurrent:
        return openai_error(503, f"the proxy is serving its limit of {state.max_concurrent} requests; "
                            "retry shortly", "server_error", "overloaded", [("Retry-After", "1")])
    state.in_flight += 1
    state.in_flight_by_caller[caller] = state.in_flight_by_caller.get(caller, 0) + 1
    try:
        facts = inspect(path, request.method, request.body, state.metering)
        if isinstance(facts, Refused):
            return _refused_path(facts, path)
        if isinstance(facts, Unreadable):
            return _unreadable(facts, path)
        book = state.usage
        if book.shared is None:
            admitted = book.admit(caller, facts)
        else:
            try:
                admitted = await book.admit_shared(caller, facts)
            except StoreUnavailable:
                return _store_down(book.shared)
        if isinstance(admitted, Refusal):
            state.usage.refused(caller, facts, 429)
            return _over_budget(admitted, state.usage.clock())
        # forwarded: what it cost is settled however it ends
        meter = Meter()
        status = 500   # unless it answers: an unexpected failure, which the front answers with a 500
        try:
            answer = await state.forwarder.handle(request, admitted.facts, meter)
            status = 502 if meter.broken else answer.status
            return answer
        except asyncio.CancelledError:
            status = 0   # the client hung up (SillyTavern's stop button): counted, but not as an error
            raise
        finally:
            _settle(state, admitted, meter, status, arrived)
    finally:
        state.in_flight -= 1
        if state.in_flight_by_caller[caller] == 1:
            del state.in_flight_by_caller[caller]
        else:
            state.in_flight_by_caller[caller] -= 1


def _settle(state: ProxyState, reservation: Reservation, meter: Meter, status: int, arrived: float) -> None:
    """Bill a forwarded request that ended with ``status`` (0: its client hung up) what ``meter``
    saw, and time its answer from ``arrived`` (monotonic)."""
    prompt, completion, estimated = charge(reservation.facts, meter.usage, meter.accepted, meter.text_bytes)
    state.usage.settle(reservation, status, prompt, completion, estimated, meter.key)
    if status:   # not a request cancelled because its client hung up: it got no answer to time
        ended = time.monotonic()
        state.answer_seconds.observe(ended - arrived)
        # an answer with no piece from the upstream (the proxy's own error) is sent whole at its end
        first_piece = meter.first_piece_at if meter.first_piece_at is not None else ended
        state.first_byte_seconds.observe(first_piece - arrived)


async def health(state: ProxyState, request: Request) -> Answer:
    total, available = state.pool.counts()
    ledger = state.usage.ledger
    shared = state.usage.shared
    closed = shared is not None and not shared.serving
    return json_answer({
        "status": "store_down" if closed else "ok" if available else ("degraded" if total else "no_keys"),
        "keys": {"total": total, "available": available, "unavailable": total - available},
        "ledger": ledger.status() if ledger is not None else None,
        "store": shared.status() if shared is not None else {"kind": "sqlite"},
        "uptime": round(time.monotonic() - state.started, 3),
    })


def _wall(monotonic_deadline: float, now_mono: float) -> str | None:
    if monotonic_deadline <= now_mono:
        return None
    ts = time.time() + (monotonic_deadline - now_mono)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def status_document(state: ProxyState, caller: str | None = None) -> dict[str, Any]:
    """The pool and the counts by caller; ``caller`` an instance: its own counts only."""
    now = state.pool.clock()
    pool_accounts = state.pool.accounts()
    accounts: dict[str, Any] = {}
    for name, info in state.accounts.status().items():
        keys = pool_accounts.get(name, [])
        accounts[name] = {
            **info,
            "balance": round(sum(k.balance or 0.0 for k in keys), 2),
            "keys": [
                {
                    "key": k.masked,
                    "available": k.available(now),
                    "balance": k.balance,
                    "used": k.used,
                    "requests": k.requests,
                    "failures": k.total_failures,
                    "consecutive_failures": k.failures,
                    "last_error": k.last_error,
                    "quarantined": k.quarantined,
                    "cooldown_until": _wall(k.cooldown_until, now),
                }
                for k in keys
            ],
        }
    total, available = state.pool.counts()
    document: dict[str, Any] = {"keys": {"total": total, "available": available}, "accounts": accounts,
                                "caller": caller}
    if state.callers.is_instance(caller):
        assert caller is not None
        document["usage"] = {"window": state.usage.window(), **state.usage.caller_document(caller)}
    else:
        document["usage"] = state.usage.document()
        ledger = state.usage.ledger
        document["usage"]["ledger"] = ledger.status() if ledger is not None else None
    return document


async def status(state: ProxyState, request: Request) -> Answer:
    caller = _caller(state, request)
    if caller is None:
        return _denied()
    return json_answer(status_document(state, caller))


async def metrics(state: ProxyState, registry: CollectorRegistry, request: Request) -> Answer:
    if _caller(state, request) is None:
        return _denied()
    return Answer(200, generate_latest(registry), [("Content-Type", CONTENT_TYPE_LATEST)])


async def _answered(answer: Answer) -> Answer:
    return answer


def build_front(state: ProxyState) -> Front:
    """The HTTP front (see ``front``) with a four-way dispatch: /v1 relayed, three routes to observe."""
    registry = registry_for(state)
    observe: dict[str, Callable[[ProxyState, Request], Awaitable[Answer]]] = {
        "/health": health,
        "/status": status,
        "/metrics": lambda state, request: metrics(state, registry, request),
    }

    def dispatch(request: Request) -> Awaitable[Answer | Stream]:
        # not a coroutine itself: the handler's coroutine is awaited by the front, one level less
        raw_path = request.raw_path   # relayed as the client encoded it, once normalised
        if raw_path.startswith("/v1/") or raw_path.startswith("//"):
            return forward(state, request)
        path = request.path
        handler = observe.get(path)
        if handler is None:
            return _answered(openai_error(404, f"no route for {path}", "invalid_request_error", "not_found"))
        if request.method not in ("GET", "HEAD"):
            return _answered(openai_error(405, f"{request.method} is not allowed on {path}",
                                          "invalid_request_error", "method_not_allowed"))
        return handler(state, request)

    return Front(dispatch, state.max_body)
