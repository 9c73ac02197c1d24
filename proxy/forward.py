"""Forward one client request upstream with a key from the pool, relaying the answer.

The answer's bytes pass through untouched and are relayed chunk by chunk as they arrive, so an
SSE stream is never buffered. The request body goes as the client sent it, except that a stream
that did not ask for its usage is asked for it (see ``request_body``); the upstream is asked for
an answer without content encoding, so the meter can read it.

Billed once: a request goes to another key only when the upstream certainly did not process it:
the connection could not be made (nothing was sent), or the upstream answered with a status that
says it did not (429, 5xx). Once the request was written, a timeout, a reset or an answer that
breaks off ends the request with a 504 or 502, and it is never sent again.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field

from .front import Answer, Headers, Request, Stream
from .pool import AttemptOutcome, Key, KeyPool
from .request_body import RequestFacts
from .upstream import (
    HOP_BY_HOP,
    Origin,
    UpstreamClient,
    UpstreamError,
    UpstreamNotSent,
    UpstreamResponse,
    UpstreamTimeout,
)
from .usage import Meter

log = logging.getLogger("cst.proxy.forward")

# Hop-by-hop headers, plus the ones the proxy sets itself.
DROP_REQUEST = frozenset(h.encode() for h in HOP_BY_HOP | {"host", "authorization", "content-length", "expect",
                                                            "accept-encoding"})
# Answers come unencoded, so the meter reads their usage (the client's Accept-Encoding is dropped).
IDENTITY = b"Accept-Encoding: identity\r\n"
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
    not_resent: int = 0     # requests that failed after they were written, and so were not sent again


def openai_error(status: int, message: str, type_: str, code: str, headers: Headers | None = None) -> Answer:
    body = json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()
    return Answer(status, body, [("Content-Type", "application/json"), *(headers or [])])


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


def classify(status: int) -> AttemptOutcome:
    if status < 400:
        return AttemptOutcome.SUCCESS
    if status == 429:
        return AttemptOutcome.RATE_LIMITED
    if status in (401, 402, 403):  # 402: the key ran out of credit; the next refresh says more
        return AttemptOutcome.UNAUTHORIZED
    if status >= 500:
        return AttemptOutcome.FAILURE
    return AttemptOutcome.NEUTRAL  # 400, 404, 422...: the request's fault, not the key's


def request_head(request: Request, origin: Origin, drop: frozenset[bytes] = DROP_REQUEST) -> bytes:
    """Request line, Host and the client's end-to-end headers (those not in ``drop``);
    Authorization and Content-Length are added per attempt."""
    # raw_path keeps the path and query exactly as the client encoded them; strip "/v1".
    target = origin.base_path + request.raw_path[3:] or "/"
    parts = [f"{request.method} {target} HTTP/1.1\r\nHost: ".encode("latin-1"), origin.host_header, b"\r\n",
             IDENTITY]
    connection = None
    for name, value in request.raw_headers:
        lower = name.lower()
        if lower in drop:
            if lower == b"connection":
                connection = value
        else:
            parts += (name, b": ", value, b"\r\n")
    if connection is not None:   # the headers it names are hop-by-hop too (rarely any but keep-alive)
        listed = {token.strip().lower() for token in connection.split(b",")} - drop
        if listed:
            return request_head(request, origin, drop | listed)
    return b"".join(parts)


def _small(request: Request, resp: UpstreamResponse) -> bool:
    """A small answer of known length (a completion, a model list): read whole, one write to the client."""
    length = resp.content_length
    return (length is not None and length <= SMALL_BODY and request.method != "HEAD"
            and not resp.content_type.startswith("text/event-stream"))


class Forwarder:
    def __init__(self, client: UpstreamClient, pool: KeyPool, config: ForwardConfig):
        self.client = client
        self.pool = pool
        self.config = config
        self.stats = ForwardStats()

    async def handle(self, request: Request, facts: RequestFacts, meter: Meter) -> Answer | Stream:
        """Forward ``request`` with ``facts.body``; ``meter`` sees the answer's pieces (for its cost)."""
        config = self.config  # one consistent config for the whole request, even if apply() swaps it
        body = facts.body
        head = request_head(request, config.origin)
        length = b"Content-Length: %d\r\n\r\n" % len(body) if body or request.method in BODY_METHODS else b"\r\n"
        tried: set[Key] = set()
        last_error: tuple[int, str, bytes, bytes] | None = None
        unreachable: str | None = None

        for attempt in range(config.max_attempts):
            key = self.pool.acquire(tried)
            if key is None:
                break
            if attempt:
                self.stats.retries += 1
            tried.add(key)
            meter.key = key.masked
            try:
                # the whole request in one piece: one copy, one send
                resp = await self.client.request(config.origin, request.method,
                                                 b"".join((head, key.authorization, length, body)), None,
                                                 config.timeout)
            except UpstreamNotSent as exc:
                unreachable = str(exc)   # nothing left this machine: another key may try
                self._log(self.pool.report(key, AttemptOutcome.FAILURE, unreachable), key, unreachable)
                continue
            except UpstreamError as exc:
                # written, then silence or a reset: the upstream may have processed (and billed) it
                reason = "timeout" if isinstance(exc, UpstreamTimeout) else str(exc)
                self._log(self.pool.report(key, AttemptOutcome.FAILURE, reason), key, reason)
                return self._not_resent(exc)
            outcome = classify(resp.status)
            if outcome is AttemptOutcome.SUCCESS or outcome is AttemptOutcome.NEUTRAL:
                meter.accepted = outcome is AttemptOutcome.SUCCESS
                if resp.content_encoding:
                    meter.encoded(resp.content_encoding)
                small = _small(request, resp)
                try:
                    first = await (resp.read() if small else resp.read_some())
                except UpstreamError as exc:
                    resp.close()
                    meter.broken = True
                    self._log(self.pool.report(key, AttemptOutcome.FAILURE, str(exc)), key, str(exc))
                    return self._not_resent(exc)
                except BaseException:
                    resp.close()
                    raise
                meter.first_piece_at = time.monotonic()
                self.pool.report(key, outcome)
                self.stats.responses[resp.status] += 1
                metered = meter if outcome is AttemptOutcome.SUCCESS else None
                if small:
                    resp.finish()
                    if metered:
                        metered.body(first)
                    return Answer(resp.status, first, resp.end_to_end, resp.reason)
                strip = UsageEventFilter() if facts.usage_added else None
                return await self._stream(request, resp, key, first, metered, strip)
            # 429 or 5xx: the upstream says it did not do it. Keep the answer in case no other key does better.
            try:
                err_body = await resp.read(MAX_ERROR_BODY)
            except UpstreamError:
                err_body = b""
            resp.finish()  # keeps the connection when the error body was read to its end
            last_error = (resp.status, resp.reason, resp.end_to_end, err_body)
            retry_after = retry_after_seconds(resp.retry_after) if resp.status == 429 else None
            self._log(self.pool.report(key, outcome, f"HTTP {resp.status}", retry_after), key,
                      f"upstream answered {resp.status}")

        if last_error is not None:
            status, reason, headers, err_body = last_error
            self.stats.responses[status] += 1
            return Answer(status, err_body, headers, reason)
        if unreachable is not None:
            self.stats.responses[502] += 1
            return openai_error(502, f"the upstream could not be reached ({unreachable})",
                                "upstream_error", "upstream_unreachable")
        self.stats.no_key += 1
        self.stats.responses[503] += 1
        return openai_error(503, "no API key is available in the pool", "server_error", "no_available_key")

    def _not_resent(self, exc: UpstreamError) -> Answer:
        """The answer to a request that reached the upstream and then failed: never sent again."""
        self.stats.not_resent += 1
        if isinstance(exc, UpstreamTimeout):
            self.stats.responses[504] += 1
            return openai_error(504, f"the upstream did not answer within {self.config.timeout:g} s; the request "
                                "was not sent again, since the upstream may have processed it",
                                "upstream_error", "upstream_timeout")
        self.stats.responses[502] += 1
        return openai_error(502, f"the upstream's answer broke off ({exc}); the request was not sent again, "
                            "since the upstream may have processed it", "upstream_error", "upstream_broken")

    @staticmethod
    def _log(benched: bool, key: Key, reason: str) -> None:
        # One warning when a key leaves the rotation, not one per failed request: an outage
        # must not flood the log.
        if benched:
            log.warning("key %s (%s) out of rotation: %s (%s)", key.masked, key.account, reason,
                        "quarantined until the account's next refresh" if key.quarantined else "cooling down")
        else:
            log.debug("key %s (%s): %s; trying another key", key.masked, key.account, reason)

    async def _stream(self, request: Request, resp: UpstreamResponse, key: Key,
                      first: bytes, meter: Meter | None, strip: "UsageEventFilter | None") -> Stream:
        """Relay an answer piece by piece, starting with the ``first`` piece already read."""
        out = Stream(request, resp.status, resp.end_to_end, resp.reason, resp.content_length)
        events = resp.content_length is None and resp.content_type.startswith("text/event-stream")
        chunk = first
        try:
            await out.prepare()
            while chunk:
                if meter:
                    meter.piece(chunk)
                relayed = strip.feed(chunk) if strip else chunk
                if relayed:
                    await out.write(relayed)
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
                    else:
                        # cut the client off without a clean end, so it cannot take this for a whole answer
                        request.abort()
                    return out
        except ConnectionResetError:
            # The client hung up and a write failed: dropping the upstream connection cancels
            # the upstream request too.
            self.stats.client_disconnects += 1
            resp.close()
            return out
        except asyncio.CancelledError:
            # the front cancels the handler when the client goes away
            self.stats.client_disconnects += 1
            resp.close()
            raise
        resp.finish()
        if strip:
            rest = strip.end()
            if rest:
                await out.write(rest)
        await out.write_eof()
        return out


class UsageEventFilter:
    """Drops from a stream the usage-only event (``"choices": []`` with a ``usage`` object) that is
    there only because the proxy asked for it, so the client gets the stream it asked for. Events
    are passed on whole; bytes of an event not yet ended wait for its end."""

    __slots__ = ("_held",)
    _END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
    _EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
    _USAGE = re.compile(rb'"usage"\s*:\s*\{')

    def __init__(self) -> None:
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        data = self._held + data
        out = []
        start = 0
        for end in self._END.finditer(data):
            event = data[start:end.end()]
            if not (self._USAGE.search(event) and self._EMPTY_CHOICES.search(event)):
                out.append(event)
            start = end.end()
        self._held = data[start:]
        return b"".join(out)

    def end(self) -> bytes:
        held, self._held = self._held, b""
        return held
