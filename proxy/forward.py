"""Forward one client request upstream with a key from the pool, relaying the answer.

Bytes pass through untouched (the body is never parsed or re-serialised, content
encodings are not decoded) and the upstream answer is relayed chunk by chunk as
it arrives, so an SSE stream is never buffered. A retry on another key happens
only before the first byte goes to the client; after that the client gets
exactly what the upstream sent, or a cut connection if the upstream broke off.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict

from .pool import Key, KeyPool, Outcome
from .usage import Meter
from .upstream import Origin, UpstreamClient, UpstreamError, UpstreamResponse, UpstreamTimeout

log = logging.getLogger("cst.proxy.forward")

# RFC 9110 hop-by-hop headers, plus the ones the proxy sets itself.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
DROP_REQUEST = frozenset(h.encode() for h in HOP_BY_HOP | {"host", "authorization", "content-length", "expect"})
DROP_RESPONSE = HOP_BY_HOP | {"content-length"}
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# An error body kept to relay when no other key works; error bodies are small.
MAX_ERROR_BODY = 64 * 1024
# Answers up to this size with a Content-Length are read whole and sent in one write. Not a
# stream buffer: an SSE stream or a large/unknown-length body is always relayed chunk by chunk.
SMALL_BODY = 256 * 1024


@dataclass
class ForwardConfig:
    upstream: str  # e.g. https://api.daidaibird.top/v1
    max_attempts: int = 3
    timeout: float = 600.0  # connect, and silence while waiting for the answer or its next bytes
    origin: Origin = field(init=False)

    def __post_init__(self) -> None:
        self.upstream = self.upstream.rstrip("/")
        self.origin = Origin.parse(self.upstream)


@dataclass
class ForwardStats:
    responses: Counter[int] = field(default_factory=Counter)  # status sent to clients
    retries: int = 0
    no_key: int = 0
    client_disconnects: int = 0
    upstream_cuts: int = 0  # answers the upstream broke off after they began


def openai_error(status: int, message: str, type_: str, code: str) -> web.Response:
    body = json.dumps({"error": {"message": message, "type": type_, "code": code}})
    return web.Response(status=status, text=body, content_type="application/json")


def _sse_error(message: str) -> bytes:
    error = {"error": {"message": message, "type": "upstream_error", "code": "upstream_broken"}}
    return b"data: " + json.dumps(error).encode() + b"\n\n"


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def classify(status: int) -> Outcome:
    if status < 400:
        return Outcome.SUCCESS
    if status == 429:
        return Outcome.RATE_LIMITED
    if status in (401, 402, 403):  # 402: the key ran out of credit; the next refresh says more
        return Outcome.UNAUTHORIZED
    if status >= 500:
        return Outcome.FAILURE
    return Outcome.NEUTRAL  # 400, 404, 422...: the request's fault, not the key's


def request_head(request: web.BaseRequest, origin: Origin) -> bytes:
    """Request line, Host and the client's end-to-end headers; Authorization and
    Content-Length are added per attempt."""
    # raw_path keeps the path and query exactly as the client encoded them; strip "/v1".
    target = origin.base_path + request.raw_path[3:] or "/"
    parts = [f"{request.method} {target} HTTP/1.1\r\nHost: ".encode("latin-1"), origin.host_header, b"\r\n"]
    raw = request.raw_headers
    listed: frozenset[bytes] = frozenset()
    for name, value in raw:
        if name.lower() == b"connection":  # headers named in Connection are hop-by-hop too
            listed = frozenset(t.strip().lower() for t in value.split(b","))
    for name, value in raw:
        lower = name.lower()
        if lower not in DROP_REQUEST and lower not in listed:
            parts += (name, b": ", value, b"\r\n")
    return b"".join(parts)


def _small(request: web.BaseRequest, resp: UpstreamResponse) -> bool:
    """A small answer of known length (a completion, a model list): read whole, one write to the client."""
    length = resp.content_length
    return (length is not None and length <= SMALL_BODY and request.method != "HEAD"
            and not (resp.header("Content-Type") or "").startswith("text/event-stream"))


def response_headers(resp: UpstreamResponse) -> CIMultiDict[str]:
    return CIMultiDict([(k, v) for k, v in resp.headers if k.lower() not in DROP_RESPONSE])


class Forwarder:
    def __init__(self, client: UpstreamClient, pool: KeyPool, config: ForwardConfig):
        self.client = client
        self.pool = pool
        self.config = config
        self.stats = ForwardStats()

    async def handle(self, request: web.BaseRequest, meter: Meter) -> web.StreamResponse:
        """Forward ``request``; ``meter`` sees the answer's pieces (for the caller's token counts)."""
        config = self.config  # one consistent config for the whole request, even if apply() swaps it
        body = await request.read() if request.body_exists else b""
        head = request_head(request, config.origin)
        length = b"Content-Length: %d\r\n\r\n" % len(body) if body or request.method in BODY_METHODS else b"\r\n"
        tried: set[Key] = set()
        last_error: tuple[int, str, CIMultiDict[str], bytes] | None = None
        transport_error: str | None = None
        answered = False  # some upstream answer began (so "unreachable" would be the wrong word)

        for attempt in range(config.max_attempts):
            key = self.pool.acquire(tried)
            if key is None:
                break
            if attempt:
                self.stats.retries += 1
            tried.add(key)
            auth = b"Authorization: Bearer " + key.value.encode("ascii") + b"\r\n"
            try:
                resp = await self.client.request(config.origin, request.method, head + auth + length, body,
                                                 config.timeout)
            except UpstreamError as exc:
                reason = "timeout" if isinstance(exc, UpstreamTimeout) else str(exc)
                transport_error = reason
                self._log(self.pool.report(key, Outcome.FAILURE, reason), key, reason)
                continue
            outcome = classify(resp.status)
            if outcome is Outcome.SUCCESS or outcome is Outcome.NEUTRAL:
                # Nothing has gone to the client yet, so an answer that breaks off before its
                # first byte (or, if small, before its end) can still move on to the next key.
                small = _small(request, resp)
                try:
                    first = await (resp.read() if small else resp.read_some())
                except UpstreamError as exc:
                    resp.close()
                    answered = True
                    transport_error = f"answer broke off: {exc}"
                    self._log(self.pool.report(key, Outcome.FAILURE, transport_error), key, transport_error)
                    continue
                except BaseException:
                    resp.close()
                    raise
                self.pool.report(key, outcome)
                self.stats.responses[resp.status] += 1
                metered = meter if outcome is Outcome.SUCCESS else None
                if small:
                    resp.finish()
                    if metered:
                        metered.body(first)
                    return web.Response(status=resp.status, reason=resp.reason, body=first,
                                        headers=response_headers(resp))
                return await self._stream(request, resp, key, first, metered)
            # Retryable: keep the answer in case no other key does better.
            try:
                err_body = await resp.read(MAX_ERROR_BODY)
            except UpstreamError:
                err_body = b""
            resp.finish()  # keeps the connection when the error body was read to its end
            last_error = (resp.status, resp.reason, response_headers(resp), err_body)
            retry_after = retry_after_seconds(resp.header("Retry-After")) if resp.status == 429 else None
            self._log(self.pool.report(key, outcome, f"HTTP {resp.status}", retry_after), key,
                      f"upstream answered {resp.status}")

        if last_error is not None:
            status, reason, headers, err_body = last_error
            self.stats.responses[status] += 1
            return web.Response(status=status, reason=reason, body=err_body, headers=headers)
        if transport_error is not None:
            self.stats.responses[502] += 1
            if answered:
                return openai_error(502, f"the upstream's answer broke off ({transport_error})",
                                    "upstream_error", "upstream_broken")
            return openai_error(502, f"the upstream could not be reached ({transport_error})",
                                "upstream_error", "upstream_unreachable")
        self.stats.no_key += 1
        self.stats.responses[503] += 1
        return openai_error(503, "no API key is available in the pool", "server_error", "no_available_key")

    @staticmethod
    def _log(benched: bool, key: Key, reason: str) -> None:
        # One warning when a key leaves the rotation, not one per failed request: an outage
        # must not flood the log.
        if benched:
            log.warning("key %s (%s) out of rotation: %s (%s)", key.masked, key.account, reason,
                        "quarantined until the account's next refresh" if key.quarantined else "cooling down")
        else:
            log.debug("key %s (%s): %s; trying another key", key.masked, key.account, reason)

    async def _stream(self, request: web.BaseRequest, resp: UpstreamResponse, key: Key,
                      first: bytes, meter: Meter | None) -> web.StreamResponse:
        """Relay an answer piece by piece, starting with the ``first`` piece already read."""
        out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=response_headers(resp))
        if resp.content_length is not None:
            out.content_length = resp.content_length
        events = resp.content_length is None and (resp.header("Content-Type") or "").startswith("text/event-stream")
        chunk = first
        try:
            await out.prepare(request)
            while chunk:
                await out.write(chunk)
                if meter:
                    meter.piece(chunk)
                between_events = chunk.endswith((b"\n\n", b"\r\n\r\n"))
                try:
                    chunk = await resp.read_some()  # whatever has arrived: each SSE event goes on at once
                except UpstreamError as exc:
                    # Nothing can be retried now. The key was accepted and answered: a cut is the
                    # upstream's or the network's doing, so the key is not blamed for it.
                    resp.close()
                    if meter:
                        meter.broken = True
                    self.stats.upstream_cuts += 1
                    log.warning("key %s (%s): the upstream answer broke off: %s", key.masked, key.account, exc)
                    if events and between_events:
                        # a last event that says so, then a clean end: OpenAI's SDKs raise it as an error
                        await out.write(_sse_error(f"the upstream's answer broke off ({exc})"))
                        await out.write_eof()
                    elif request.transport is not None:
                        # cut the client off without a clean end, so it cannot take this for a whole answer
                        request.transport.close()
                    return out
        except ConnectionResetError:
            # The client hung up and a write failed: dropping the upstream connection cancels
            # the upstream request too.
            self.stats.client_disconnects += 1
            resp.close()
            return out
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client goes away (handler_cancellation=True).
            self.stats.client_disconnects += 1
            resp.close()
            raise
        resp.finish()
        await out.write_eof()
        return out
