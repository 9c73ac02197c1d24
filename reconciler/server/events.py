"""Server-sent events: what changes in the fleet, as it happens (``GET /api/events``).

Events (the SSE ``event:`` field; ``data:`` is one line of JSON):

* ``file``: desired.yaml was read and differs from the last reading: ``{sha256, valid, problems}``
* ``instance``: an instance ``started``, ``stopped``, ``crashed``, ``restarted``, ``upgraded``,
  ``failed`` (a rollout's rolled-back instance too), was ``adopted`` or ``removed``:
  ``{id, change, detail, at}``
* ``rollout``: a rollout halted (``halted``: ``{at, reason, when, wanted}``) or its halt no longer
  stands (``halted``: null): ``{halted, at}``
* ``reconcile``: a pass that changed or failed something: ``{at, durationMs, recap}``
* ``pool``: the key pool's document changed (the one ``GET /api/pool`` answers)
* ``reset``: the events this client missed are gone (or it never had any): reload everything

Every event has an id ``<run>-<n>``. A client that reconnects with ``Last-Event-ID`` gets what
it missed from the last ``KEEP`` events, or ``reset`` when those are gone or the id is from an
earlier ``cst serve``. The stream is an ``/api/`` call like any other, behind ``X-ST-Admin-Key``:
the page reads it with ``fetch()``, which can send that header, because the browser's
``EventSource`` cannot, and a key in the URL would end up in logs and the history.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import secrets
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator

from aiohttp import web

from ..desired.shared_file import FileReading
from ..engine.results import Happened, Report, Result
from . import responses

log = logging.getLogger("cst.events")

KEEP = 256            # events kept for clients that reconnect
BACKLOG = 512         # events queued for one slow client before its stream is closed
HEARTBEAT = 15.0      # seconds between comments on a quiet stream, so dead clients are noticed
POOL_POLL = 1.0       # seconds between looks at the pool while someone listens
# Supervisor.errored()'s wording: the instance is held back by the crash backoff. Holding it is
# not a new failure (that was published when it happened), and its countdown changes every pass.


_DIGITS = re.compile(r"[0-9]{1,18}")   # an event number from a client: at most 18 ASCII digits


@dataclass(frozen=True)
class Event:
    id: str
    seq: int
    name: str
    data: dict[str, Any]

    def encode(self) -> bytes:
        # json.dumps escapes newlines, so the data is one SSE line
        return f"id: {self.id}\nevent: {self.name}\ndata: {json.dumps(self.data, ensure_ascii=False)}\n\n".encode()


@dataclass(eq=False)
class _Listener:
    pending: deque[Event] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: bool = False     # fell BACKLOG events behind: its stream ends, it reconnects


def changes(result: Result, pid: int | None) -> list[tuple[str, str]]:
    """What one reconcile result means to someone watching the instance: ``(change, detail)`` pairs."""
    crashed = [("crashed", f"process {pid} exited while it should be running")] if result.before == "crashed" else []
    happened = result.happened
    if happened is Happened.REMOVED:
        return [("removed", result.detail)]
    if happened is Happened.STOPPED:
        return [("stopped", "")]
    if happened is Happened.PARKED:
        return [("parked", result.detail)]
    if happened is Happened.RESTARTED:   # the detail reads "restarted: <why>": the why is told
        return crashed + [("restarted", result.detail.partition(": ")[2] or result.detail)]
    if happened is Happened.STARTED:
        return crashed + [("started", "")]
    if happened is Happened.UPGRADED:
        return [("upgraded", result.detail)]
    if happened is Happened.HELD:        # backing off: said when it failed, not again each pass
        return []
    if result.outcome == "failed":
        return crashed + [("failed", result.detail)]
    return [("adopted", "")] if happened is Happened.ADOPTED else []


class EventHub:
    def __init__(self, pool: Callable[[], dict[str, Any] | Awaitable[dict[str, Any]]]):
        self.run = secrets.token_hex(4)   # ids from an earlier cst serve never match this one's
        self._seq = 0
        self._recent: deque[Event] = deque(maxlen=KEEP)
        self._listeners: set[_Listener] = set()
        self._pool = pool
        self._pool_task: asyncio.Task[None] | None = None
        self._failing: dict[str, str] = {}              # id -> the failure last published for it
        self.last_failure: dict[str, dict[str, str]] = {}  # id -> {reason, at}, since cst serve started
        self._halt: dict[str, Any] | None = None                  # the rollout halt last announced

    @property
    def last_id(self) -> str:
        return f"{self.run}-{self._seq}"

    def publish(self, name: str, data: dict[str, Any]) -> Event:
        self._seq += 1
        event = Event(self.last_id, self._seq, name, data)
        self._recent.append(event)
        for listener in self._listeners:
            if len(listener.pending) >= BACKLOG:
                listener.dropped = True
            else:
                listener.pending.append(event)
            listener.wake.set()
        return event

    def since(self, last_event_id: str | None) -> list[Event] | None:
        """The events after ``last_event_id``; None when they cannot all be given."""
        run, _, number = (last_event_id or "").partition("-")
        # ASCII digits only: str.isdigit() also takes '²' and '٣', which int() refuses or reads
        if run != self.run or not _DIGITS.fullmatch(number) or int(number) > self._seq:
            return None
        seq = int(number)
        oldest = self._recent[0].seq if self._recent else self._seq + 1
        if seq + 1 < oldest:
            return None
        return [e for e in self._recent if e.seq > seq]

    # -- what the daemon reports

    def file_read(self, previous: FileReading, reading: FileReading) -> None:
        if (reading.sha256, reading.valid) == (previous.sha256, previous.valid):
            return
        self.publish("file", {"sha256": reading.sha256, "valid": reading.valid,
                              "problems": [{"line": p.line, "text": str(p)} for p in reading.problems]})

    def passed(self, report: Report, at: str, duration_ms: float) -> None:
        published = False
        for result in report.results:
            if result.happened in (Happened.RELEASE_READY, Happened.RELEASE_FAILED, Happened.RELEASE_REMOVED):
                continue  # not an instance: the release being installed
            seen = report.observed.get(result.id)
            for change, detail in changes(result, seen.pid if seen else None):
                if change == "failed" and self._failing.get(result.id) == detail:
                    continue  # the same failure again (a port still taken): said already
                self._note(result.id, change, detail, at)
                self.publish("instance", {"id": result.id, "change": change, "detail": detail, "at": at})
                published = True
            if result.outcome != "failed":
                self._failing.pop(result.id, None)
        if report.halt != self._halt:   # a rollout halted, or its halt no longer stands
            self._halt = report.halt
            self.publish("rollout", {"halted": report.halt, "at": at})
            published = True
        if published:
            self.publish("reconcile", {"at": at, "durationMs": duration_ms, "recap": report.recap})

    def _note(self, id_: str, change: str, detail: str, at: str) -> None:
        if change in ("crashed", "failed"):
            self.last_failure[id_] = {"reason": detail.splitlines()[0] if detail else change, "at": at}
            if change == "failed":
                self._failing[id_] = detail
        elif change == "removed":
            self.last_failure.pop(id_, None)

    # -- listening

    @contextmanager
    def listen(self) -> Iterator[_Listener]:
        listener = _Listener()
        self._listeners.add(listener)
        if self._pool_task is None:
            self._pool_task = asyncio.get_running_loop().create_task(self._watch_pool(), name="cst-events-pool")
        try:
            yield listener
        finally:
            self._listeners.discard(listener)
            if not self._listeners and self._pool_task is not None:
                self._pool_task.cancel()
                self._pool_task = None

    async def _watch_pool(self) -> None:
        """Publish the pool's document when it changes, while anyone listens: the pool changes on
        every proxied request, so it is looked at once a second rather than announced each time."""
        last, failing = None, None
        while True:
            try:
                document = self._pool()
                if inspect.isawaitable(document):   # the daemon's asks the proxy process
                    document = await document
                encoded = json.dumps(document, sort_keys=True)
                if encoded != last:
                    self.publish("pool", document)
                    last = encoded
                failing = None
            except Exception as exc:  # a bug here must not end the stream; said once, with its traceback
                if repr(exc) != failing:
                    log.exception("cannot read the key pool for the event stream")
                    failing = repr(exc)
            await asyncio.sleep(POOL_POLL)

    async def respond(self, request: web.Request) -> web.StreamResponse:
        """The SSE stream for one client, from its ``Last-Event-ID`` on, until it hangs up."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await responses.start(response, request)
        last = request.headers.get("Last-Event-ID")
        with self.listen() as listener:  # listening before reading the backlog: nothing falls between
            try:
                backlog = self.since(last)
                if backlog is None:
                    await response.write(f"retry: 2000\nid: {self.last_id}\nevent: reset\ndata: {{}}\n\n".encode())
                    sent = self._seq
                else:
                    sent = int((last or "").partition("-")[2])
                    for event in backlog:
                        await response.write(event.encode())
                        sent = event.seq
                while not listener.dropped:
                    try:
                        async with asyncio.timeout(HEARTBEAT):  # not wait_for: see Daemon._reconcile_loop
                            await listener.wake.wait()
                    except TimeoutError:
                        await response.write(b": keep-alive\n\n")
                        continue
                    listener.wake.clear()
                    while listener.pending:
                        event = listener.pending.popleft()
                        if event.seq > sent:
                            await response.write(event.encode())
                            sent = event.seq
            except ConnectionResetError:
                pass  # the client went away
        return response
