"""What the proxy needs to know of a request body before it goes upstream, read without parsing
the JSON in the common case: the model, whether it streams, how many tokens it may cost, and the
body with ``stream_options.include_usage`` added when a stream did not ask for usage itself.

A body is parsed whole only in the rare case that it already has ``stream_options`` without
``include_usage: true``; otherwise a few ``bytes.find`` calls do, which keeps the proxy's
per-request cost within microseconds for bodies of any size.
"""
from __future__ import annotations

import json
import re
from typing import NamedTuple

# Paths whose answers cost tokens: budgets apply to them and a missing usage is estimated.
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
_STREAMABLE = frozenset({"/v1/chat/completions", "/v1/completions"})

# An estimate when the upstream reports nothing: about three bytes of UTF-8 text a token (four
# English letters, one Chinese character) errs towards charging a little more, never zero.
BYTES_PER_TOKEN = 3
# A request's reservation before it goes upstream: its prompt plus what it may generate, where
# ``max_tokens`` is absent or huge, capped so one request is not refused for a theoretical worst case.
DEFAULT_COMPLETION_RESERVE = 1024
MAX_COMPLETION_RESERVE = 4096

_INJECT = b'"stream_options":{"include_usage":true},'
_NUMBER = re.compile(rb'\s*:\s*([0-9]{1,12})')
_STRING = re.compile(rb'\s*:\s*"([^"\\]{0,200})"')   # a model name: no escapes, no quotes
_TRUE = re.compile(rb'\s*:\s*true')
_BLANK = b" \t\r\n"


def estimate_tokens(nbytes: int) -> int:
    return -(-nbytes // BYTES_PER_TOKEN)


class RequestFacts(NamedTuple):   # a tuple: built on every request, at a fraction of a dataclass's cost
    path: str
    model: str
    billable: bool            # a generation path: budgets apply, missing usage is estimated
    stream: bool
    prompt_estimate: int      # tokens
    completion_limit: int     # tokens the reservation allows for the answer
    body: bytes               # what goes upstream
    usage_added: bool         # the proxy asked for the stream's usage: its usage-only event is not relayed

    @property
    def reservation(self) -> int:
        return self.prompt_estimate + self.completion_limit if self.billable else 0


def _after(body: bytes, name: bytes, pattern: re.Pattern[bytes]) -> re.Match[bytes] | None:
    at = body.find(name)
    return pattern.match(body, at + len(name)) if at >= 0 else None


def _max_tokens(body: bytes) -> int | None:
    if b'_tokens"' not in body:
        return None
    found = _after(body, b'"max_completion_tokens"', _NUMBER) or _after(body, b'"max_tokens"', _NUMBER)
    return int(found.group(1)) if found else None


def _with_usage(body: bytes) -> bytes | None:
    """``body`` asking for the stream's usage, or None when it is not a JSON object we can edit."""
    if b'"stream_options"' not in body:
        start = len(body) - len(body.lstrip(_BLANK))
        if body[start:start + 1] != b"{":
            return None
        return body[:start + 1] + _INJECT + body[start + 1:]
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    options = data.get("stream_options")
    data["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _asks_usage(body: bytes) -> bool:
    return _after(body, b'"include_usage"', _TRUE) is not None


def inspect(path: str, method: str, body: bytes) -> RequestFacts:
    """The facts of a request to ``path`` (normalised, without its query)."""
    if method != "POST" or path not in GENERATION_PATHS:
        return RequestFacts(path, "", False, False, 0, 0, body, False)
    model = ""
    at = body.find(b'"model"')
    if at >= 0:
        found = _STRING.match(body, at + 7)
        if found:
            model = found.group(1).decode("utf-8", "replace")
    stream = False
    if path in _STREAMABLE:
        at = body.find(b'"stream"')
        stream = at >= 0 and _TRUE.match(body, at + 8) is not None
    usage_added = False
    if stream and not _asks_usage(body):
        edited = _with_usage(body)
        if edited is not None:
            body, usage_added = edited, True
    asked = _max_tokens(body)
    limit = 0 if path == "/v1/embeddings" else min(asked if asked is not None else DEFAULT_COMPLETION_RESERVE,
                                                  MAX_COMPLETION_RESERVE)
    return RequestFacts(path, model, True, stream, estimate_tokens(len(body)), limit, body, usage_added)
