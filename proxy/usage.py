"""Reading one answer for what it cost: the tokens the upstream reported, else what an estimate
needs (how much text was relayed).

Tokens come from the ``usage`` object of the answers: the JSON body of a whole answer, or the
event of a stream that carries it (OpenAI sends it last when asked with
``stream_options.include_usage``, which the proxy adds; gateways of the one-api family always
do; the Responses API's ``response.completed`` event carries its ``usage``). Figures are
clamped to ``MAX_REPORTED_TOKENS``. The forwarder hands every relayed piece to a ``Meter``; the meter looks for the bytes
``"usage"`` and decodes only the object after them, so an answer is never parsed whole and a
stream never buffered. A compressed answer (an upstream that ignored ``Accept-Encoding:
identity``) is inflated for the meter only; the client gets the bytes as they came.
"""
from __future__ import annotations

import json
import re
import zlib
from typing import Any

import msgspec

_NEEDLE = b'"usage"'
_DECODER = json.JSONDecoder()
_MAX_PENDING = 64 * 1024   # a usage object split over stream pieces is small; past this, give up
_BLANK = b" \t\r\n"
_MAX_INFLATED = 16 << 20   # a compressed answer is inflated this far for the meter, no further
# the generated text of a stream's events, for an estimate when no usage arrives (a Responses
# stream's text comes as string deltas; a chat stream's delta is an object, not matched)
_TEXT = re.compile(rb'"(?:content|text|reasoning_content|delta)"\s*:\s*"((?:[^"\\]|\\.)*)"')


# The most one request is believed to cost, per figure: beyond any model's context and output. An
# upstream's figure above it (a bug, or a lie) is billed as this, so one answer cannot spend a
# budget for good nor overflow a store's integers.
MAX_REPORTED_TOKENS = 10_000_000


def _figure(value: object) -> int:
    if type(value) is int and 0 <= value < MAX_REPORTED_TOKENS:   # as upstreams send it
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:   # NaN too
        return 0
    return MAX_REPORTED_TOKENS if value >= MAX_REPORTED_TOKENS else int(value)


def _tokens(usage: object) -> tuple[int, int] | None:
    """(prompt, completion) of a usage object: chat and completions name them prompt_tokens and
    completion_tokens, the Responses API input_tokens and output_tokens."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return _figure(prompt), _figure(completion)


class _Answer(msgspec.Struct):
    usage: Any = None   # the rest of a whole answer is skipped unbuilt


_ANSWER = msgspec.json.Decoder(_Answer).decode


class _Incomplete(Exception):
    pass


def _decode_after(data: bytes, at: int, whole: bool) -> tuple[int, int] | None:
    """Tokens of the ``"usage": {...}`` starting at ``at``; None for ``null`` or anything else;
    _Incomplete when it may still be arriving (not ``whole``, and its event has not ended)."""
    i = at + len(_NEEDLE)
    n = len(data)
    while i < n and data[i] in _BLANK:
        i += 1
    if i == n:
        return _wait(whole)
    if data[i] != ord(":"):
        return None
    i += 1
    while i < n and data[i] in _BLANK:
        i += 1
    if i == n:
        return _wait(whole)
    if data[i] != ord("{"):
        return None   # "usage": null, as OpenAI sends in every chunk but the last
    text = data[i:].decode("utf-8", "replace")
    try:
        usage, _ = _DECODER.raw_decode(text)
    except json.JSONDecodeError:
        return _wait(whole or b"\n\n" in data or b"\r\n\r\n" in data)   # an SSE event ends with a blank line
    return _tokens(usage)


def _wait(whole: bool) -> tuple[int, int] | None:
    """No usage here (None) if the answer is whole; else raise _Incomplete: more may come."""
    if not whole:
        raise _Incomplete
    return None


class Meter:
    """What one answer cost, and when it began to arrive. The last usage object seen wins (some
    upstreams repeat a running total in every event)."""

    __slots__ = ("usage", "broken", "key", "accepted", "text_bytes", "first_piece_at", "_pending", "_tail",
                 "_inflate")

    def __init__(self) -> None:
        self.usage: tuple[int, int] | None = None   # (prompt, completion) as the upstream reported
        self.broken = False     # the upstream's answer broke off after it began
        self.accepted = False   # an upstream answered 2xx: it took the request (and bills it)
        self.key = ""           # the pool key that carried it, masked
        self.text_bytes = 0     # generated text relayed, for an estimate when no usage arrives
        self.first_piece_at: float | None = None   # time.monotonic() when the answer's first piece was read
        self._pending: bytes | None = None
        self._tail = b""
        self._inflate: zlib._Decompress | None = None

    def encoded(self, content_encoding: str | None) -> None:
        """The answer comes with this Content-Encoding: gzip and deflate are inflated for metering."""
        if content_encoding and content_encoding.strip().lower() in ("gzip", "x-gzip", "deflate"):
            self._inflate = zlib.decompressobj(wbits=47)   # 32 + 15: gzip or zlib, told by the header

    def _plain(self, data: bytes) -> bytes:
        if self._inflate is None:
            return data
        try:
            return self._inflate.decompress(data, _MAX_INFLATED)
        except zlib.error:
            self._inflate = None   # not what it said it was: nothing more to read from it
            return b""

    def body(self, data: bytes) -> None:
        """A whole answer."""
        if self._inflate is not None:
            data = self._plain(data)
        at = data.rfind(_NEEDLE)
        if at >= 0:
            try:   # a JSON object: its own top-level usage
                self.usage = _tokens(_ANSWER(data).usage) or self.usage
            except (msgspec.DecodeError, msgspec.ValidationError):   # anything else: the last usage in it
                self.usage = _decode_after(data, at, whole=True) or self.usage
        if self.usage is None:
            self.text_bytes += sum(len(m) for m in _TEXT.findall(data))

    def piece(self, data: bytes) -> None:
        """The next piece of a streamed answer."""
        data = self._plain(data)
        if self.usage is None:
            self.text_bytes += sum(len(m) for m in _TEXT.findall(data))
        if self._pending is not None:
            self._pending += data
        else:
            window = self._tail + data
            at = window.rfind(_NEEDLE)
            self._tail = window[-(len(_NEEDLE) - 1):]   # the needle may straddle two pieces
            if at < 0:
                return
            self._pending = window[at:]
        try:
            found = _decode_after(self._pending, 0, whole=False)
        except _Incomplete:
            if len(self._pending) > _MAX_PENDING:
                self._pending = None
            return
        self._pending, self._tail = None, b""
        if found is not None:
            self.usage = found
