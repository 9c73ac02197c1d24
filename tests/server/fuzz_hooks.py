"""Schemathesis hooks for tests/server/test_api_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

``GET /api/events`` is fuzzed with hostile ``Last-Event-ID`` values (issue 17, defect 4: a
``<run>-²`` passed ``isdigit()``, ``int()`` raised inside the started stream and a 500 went out
inside the 200). ``FUZZ_EVENTS_RUN`` is the run id of the ``cst serve`` under test, so the values
reach the number's parsing; each value sent and its answer is appended to ``FUZZ_EVENTS_LOG``.
Schemathesis reads a stream until its first event (``max-stream-events`` in the run's config).
"""
from __future__ import annotations

import json
import os
from collections import deque
from typing import Any

import schemathesis
from hypothesis import strategies as st

EVENTS = "/api/events"
RUN = os.environ.get("FUZZ_EVENTS_RUN", "0")
FIELDS = ("id", "event", "data", "retry")  # what the stream's lines may carry (besides comments)

# Numbers as a client may spell them: other scripts' digits (isdigit() true, int() refuses or reads
# them), huge, negative, signed, spaced, not numbers, very long (below aiohttp's 8 KiB header line)
NUMBERS = ["²", "١٢", "٣", "1²", "¹²³", "０", "１２", "𝟙", "߁", "৩", "9" * 18, "9" * 19, "9" * 40, str(2**64),
           "-1", "-0", "+1", "--1", "1 ", " 1", "1\t2", "1 2", "1_000", "1e3", "0x10", "", "-", "1-2", "٣" * 500,
           "9" * 4000]
HOSTILE = [f"{RUN}-{number}" for number in NUMBERS] + [
    "²", "١٢", "-1", "-", "", RUN, f"{RUN}-0-²", f"²{RUN}-1", "x" * 4000, "\u00a0", "é-1"]
# Each is sent by the first calls to the stream, whichever phase makes them, until the stream
# itself has answered it (a call the coverage phase makes without the key or with another method
# is answered before the handler: its value is tried again)
_pending = deque(HOSTILE)
_trying: dict[int, str] = {}
_sent: dict[int, Any] = {}   # case -> the Last-Event-ID it sent, as text (schemathesis may reset case.headers)


def _digitish() -> st.SearchStrategy[str]:
    """Text made of what looks like a number to someone: any script's digits, ASCII digits, signs and spaces."""
    return st.text(st.characters(categories=("Nd", "No", "Zs")) | st.sampled_from("0123456789+-. \t"), max_size=40)


def hostile_ids() -> st.SearchStrategy[str | None]:
    """A Last-Event-ID: one of HOSTILE, or generated (this run's or not), or none."""
    return st.one_of(
        st.sampled_from(HOSTILE),
        _digitish().map(lambda number: f"{RUN}-{number}"),
        st.integers().map(lambda number: f"{RUN}-{number}"),
        _digitish(),
        st.none(),  # no header: a fresh stream
    )


def on_the_wire(value: str) -> str:
    """A header value as its UTF-8 bytes, which is how a client sends '²' (and aiohttp reads it
    back as '²'); requests sends a str header as Latin-1, so the bytes are given as Latin-1.
    Leading blanks are dropped: HTTP drops them too, and requests refuses them."""
    return value.lstrip(" \t").encode("utf-8").decode("latin-1")


@schemathesis.hook
def flatmap_headers(ctx: schemathesis.HookContext, headers: dict[str, Any] | None) -> st.SearchStrategy:
    """Generated headers for the event stream carry a hostile Last-Event-ID (or none)."""
    if ctx.operation is None or ctx.operation.path != EVENTS:
        return st.just(headers)

    def with_id(value: str | None) -> dict[str, Any] | None:
        rest = {k: v for k, v in (headers or {}).items() if k.lower() != "last-event-id"}
        return {**rest, "Last-Event-ID": value} if value is not None else (rest or None)
    return hostile_ids().map(with_id)


def _content_type(response: schemathesis.Response) -> str:
    return " ".join(response.headers.get("content-type") or response.headers.get("Content-Type") or [])


@schemathesis.check
def no_traceback(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    content_type = _content_type(response)
    if "zip" in content_type:
        return  # a backup is binary; nothing to read
    body = response.content.decode("utf-8", "replace")
    if "Traceback" in body or 'File "' in body:
        raise AssertionError(f"a traceback leaked into the response: {body[:300]}")


@schemathesis.check
def one_clean_answer(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """An event stream is a 200 whose body is events and comments only, at least one whole event,
    never a second response (a status line, headers, a JSON error) inside it; else the stream's
    refusal is a 4xx JSON error."""
    content_type = _content_type(response)
    if "text/event-stream" not in content_type:
        if case.operation.path == EVENTS:
            assert 400 <= response.status_code < 500, f"the event stream answered {response.status_code}"
            try:
                error = json.loads(response.content)
            except ValueError:
                error = None
            assert isinstance(error, dict) and isinstance(error.get("error"), str), \
                f"the event stream refused with something else than a JSON error: {response.content[:300]!r}"
        return
    assert response.status_code == 200, f"an event stream with status {response.status_code}"
    text = response.content.decode("utf-8", "replace")
    blocks = text.split("\n\n")
    complete, rest = blocks[:-1], blocks[-1]
    assert any(line.startswith("data:") for block in complete for line in block.split("\n")), \
        f"no whole event in the stream: {text[:300]!r}"
    for block in complete + [rest]:
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            assert field in FIELDS, f"not an event stream line: {line[:200]!r} in {text[:500]!r}"
            if field == "data":
                try:
                    json.loads(value)
                except ValueError:
                    raise AssertionError(f"an event's data is not JSON: {line[:200]!r}") from None


@schemathesis.hook
def before_call(ctx: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    """A followed log never ends: fuzz the log endpoint's other answers, not its stream (tested on its own).
    The event stream gets each listed hostile Last-Event-ID until it has answered it, then the
    generated ones, all sent as UTF-8."""
    if case.operation.path == "/api/instances/{id}/logs" and isinstance(case.query, dict) \
            and str(case.query.get("follow", "")).lower() in ("1", "true", "yes"):
        case.query["follow"] = "0"
    if case.operation.path == EVENTS:
        headers: dict[str, Any] = dict(case.headers or {})   # a dict, or requests' CaseInsensitiveDict
        value = next((v for k, v in headers.items() if k.lower() == "last-event-id"), None)
        if case.method.upper() == "GET" and _pending:
            value = _trying[id(case)] = _pending.popleft()
        headers = {k: v for k, v in headers.items() if k.lower() != "last-event-id"}
        if value is not None:
            headers["Last-Event-ID"] = on_the_wire(value) if isinstance(value, str) else value
        _sent[id(case)] = value.lstrip(" \t") if isinstance(value, str) else value
        case.headers = headers  # type: ignore[assignment]  # a plain dict: schemathesis sends any mapping


@schemathesis.hook
def after_call(ctx: schemathesis.HookContext, case: schemathesis.Case, response: schemathesis.Response) -> None:
    """Each Last-Event-ID sent to the stream, and what came back, for the test to read."""
    if case.operation.path != EVENTS:
        return
    listed, sent = _trying.pop(id(case), None), _sent.pop(id(case), None)
    if listed is not None and response.status_code != 200:
        _pending.appendleft(listed)
    path = os.environ.get("FUZZ_EVENTS_LOG")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps({"sent": sent, "listed": sent in HOSTILE, "hostile": len(set(HOSTILE)),
                              "status": response.status_code, "type": _content_type(response),
                              "head": response.content[:200].decode("utf-8", "replace")}) + "\n")
