"""What each caller (an instance, mostly) used: requests, errors, and the tokens upstream reported.

Tokens come from the ``usage`` object of the answers: the JSON body of a whole answer, or the
event of a stream that carries it (OpenAI sends it last when asked with
``stream_options.include_usage``; gateways of the one-api family always do). The forwarder hands
every relayed piece to a ``Meter``; the meter looks for the bytes ``"usage"`` and decodes only
the object after them, so an answer is never parsed whole and a stream never buffered.

Counts are kept since the proxy started and for the current local day (the panel's "today").
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

_NEEDLE = b'"usage"'
_DECODER = json.JSONDecoder()
_MAX_PENDING = 64 * 1024   # a usage object split over stream pieces is small; past this, give up
_BLANK = b" \t\r\n"


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _tokens(usage: object) -> tuple[int, int] | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    prompt = prompt if isinstance(prompt, int) and prompt >= 0 else 0
    completion = completion if isinstance(completion, int) and completion >= 0 else 0
    return prompt, completion


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


def _wait(whole: bool) -> None:
    if not whole:
        raise _Incomplete
    return None


class Meter:
    """Usage seen in one answer. The last usage object seen wins (some upstreams repeat a running
    total in every event)."""

    __slots__ = ("usage", "broken", "_pending", "_tail")

    def __init__(self) -> None:
        self.usage: tuple[int, int] | None = None
        self.broken = False   # the upstream's answer broke off after it began
        self._pending: bytes | None = None
        self._tail = b""

    def body(self, data: bytes) -> None:
        """A whole answer."""
        at = data.rfind(_NEEDLE)
        if at >= 0:
            self.usage = _decode_after(data, at, whole=True) or self.usage

    def piece(self, data: bytes) -> None:
        """The next piece of a streamed answer."""
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


def _next_midnight(now: float) -> float:
    t = time.localtime(now)
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday + 1, 0, 0, 0, 0, 0, -1))


@dataclass
class UsageBook:
    clock: Callable[[], float] = time.time
    total: dict[str, Tally] = field(default_factory=dict)
    today: dict[str, Tally] = field(default_factory=dict)
    day: str = ""
    _day_ends: float = 0.0

    def _roll(self) -> None:
        now = self.clock()
        if now >= self._day_ends:
            self.today = {}
            self.day = time.strftime("%Y-%m-%d", time.localtime(now))
            self._day_ends = _next_midnight(now)

    def count(self, caller: str, status: int, meter: Meter) -> None:
        self._roll()
        failed = status >= 400 or meter.broken
        for book in (self.total, self.today):
            tally = book.get(caller)
            if tally is None:
                tally = book[caller] = Tally()
            tally.requests += 1
            if failed:
                tally.errors += 1
            if meter.usage is not None:
                tally.prompt_tokens += meter.usage[0]
                tally.completion_tokens += meter.usage[1]

    def document(self, only: str | None = None) -> dict[str, dict]:
        """Counts by caller (or of ``only``), each with today's beside the totals."""
        self._roll()
        names = [only] if only is not None else sorted(set(self.total) | set(self.today))
        return {name: {**asdict(self.total.get(name, Tally())),
                       "today": {"day": self.day, **asdict(self.today.get(name, Tally()))}}
                for name in names}
