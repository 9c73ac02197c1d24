"""Parking idle instances and waking them on their first request (``park_after``).

An instance with ``park_after`` is behind the edge (``runtime/edge.py``). Idle means, for
``park_after``: no request through the edge or the gate in flight or ended since, and no chat
request of its proxy key in flight at the key-pool proxy. CST's own probes go to node directly
and do not count. Parking stops the process as a stop does (SIGTERM; SillyTavern has saved
before it answers) and records it as parked: nothing is archived, the edge keeps its routes,
and a pass finds it ``parked``, which is as good as running (``engine.plan``). Its first request
with the instance's credentials reaches the gate (``gate.py``), which wakes it: started on the
file's release and settings of that moment. A wake that fails answers 503 and counts as a
failed start for the supervisor's backoff; one that waited too long for the state dir (a pass
at work) answers 503 and counts as nothing.

Parks and wakes take the state dir's lock, as a pass does, and run on a loop of their own in a
worker thread: stopping, starting (folders, the webpack cache) and snapshots block.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from ..desired.model import DesiredState
from ..engine.results import Happened, Result
from ..engine.supervision import Supervisor
from ..runtime import edge
from ..runtime.base import LaunchImpossible, Runtime, RuntimeFactory, StartFailed, failure_cause
from ..runtime.health import HealthChecks
from ..runtime.processes import utc_now
from ..runtime.statedir import LockHeld, Record, StateDir
from ..tasks import LoopThread
from .edge_use import EdgeUse, in_flight_at_edge
from .events import EventHub
from .fleet_metrics import ParkingCounters
from .gate import Entrance, Gate, WakeFailed

log = logging.getLogger("cst.parking")

TICK = 0.5   # how often idleness is looked at: park_after is seconds at the least


@dataclass(frozen=True)
class _Seen:
    """A record as last read, and the file identity it was read at."""

    stamp: tuple[int, int]   # (inode, mtime ns): records are replaced by a rename, never edited
    running: bool            # it names a process


class Processes:
    """Whether each instance has a process, from its record, read again only when the record file
    changed (a stat per request, not a JSON read): a restart by a pass or a `cst apply` shows at once."""

    def __init__(self, state: StateDir):
        self._state = state
        self._seen: dict[str, _Seen] = {}

    def running(self, id_: str) -> bool:
        path = self._state.record_path(id_)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._seen.pop(id_, None)
            return False
        stamp = (st.st_ino, st.st_mtime_ns)
        seen = self._seen.get(id_)
        if seen is None or seen.stamp != stamp:
            record = self._state.record(id_)
            seen = self._seen[id_] = _Seen(stamp, record is not None and record.pid is not None)
        return seen.running


class Parking:
    def __init__(self, desired: Callable[[], DesiredState], runtime: RuntimeFactory, state: StateDir,
                 supervisor: Supervisor,
                 events: EventHub, counters: ParkingCounters, in_flight_at_proxy: Callable[[str], int],
                 on_changed: Callable[[Record | None], None]):
        """``in_flight_at_proxy(id)``: the instance's chat requests at the key-pool proxy now;
        ``on_changed(record)``: an instance was parked (None) or woken (its new record)."""
        self._desired = desired
        self._runtime = runtime
        self._state = state
        self._supervisor = supervisor
        self._events = events
        self._counters = counters
        self._in_flight_at_proxy = in_flight_at_proxy
        self._on_changed = on_changed
        self.processes = Processes(state)
        paths = edge.Paths(state.root)
        self._paths = paths
        group = edge.worker_gid()
        self.gate = Gate(paths.gate, paths.socket, self.processes.running, self._wake_at_gate, group)
        self.use = EdgeUse(paths.use, group)
        self._at_edge: Counter[str] = Counter()   # requests in flight at the edge, by socket path
        self._worker = LoopThread("cst-parking")
        self._checks = HealthChecks()   # the worker loop's

    async def start(self) -> None:
        await asyncio.to_thread(edge.prepare_folders, self._paths)
        await self.gate.start()
        await self.use.start()
        self._worker.start()

    async def close(self) -> None:
        await self._worker.close(cleanup=self._checks.close)
        self.use.close()
        await self.gate.close()

    async def follow(self, desired: DesiredState) -> None:
        """Know the instances the file wants running with park_after, and no others."""
        self.gate.follow(await asyncio.to_thread(_entrances, self._runtime(desired), desired))

    # -- parking

    async def run(self) -> None:
        """Park each instance idle for its park_after; for ever (a background task)."""
        while True:
            await asyncio.sleep(TICK)
            if self.gate.entrances:
                self._at_edge = await asyncio.to_thread(in_flight_at_edge)
            now = time.monotonic()
            for entrance in list(self.gate.entrances.values()):
                if not self._idle(entrance, now):
                    continue
                try:
                    await self.park(entrance.id, f"idle for {entrance.park_after:g}s")
                except (OSError, LockHeld) as exc:   # tried again once it has been idle that long again
                    entrance.last_used = time.monotonic()
                    log.error("could not park %s: %s", entrance.id, exc)

    def _idle(self, entrance: Entrance, now: float) -> bool:
        # a request at the edge or a chat at the pool in progress is use, until it ends (to a tick)
        if self._at_edge[str(self._paths.socket(entrance.id))] or self._in_flight_at_proxy(entrance.id):
            entrance.last_used = now
            return False
        entrance.last_used = max(entrance.last_used, self.use.ended.get(entrance.id, 0.0))
        return (not entrance.in_flight and now - entrance.last_used >= entrance.park_after
                and not entrance.turn.locked() and self.processes.running(entrance.id))

    async def park(self, id_: str, why: str) -> bool:
        """Park the instance now; False when it was not running. Raises OSError (the stop failed,
        the state dir is busy)."""
        entrance = self.gate.entrance(id_)
        if entrance is None:
            raise OSError(f"{id_} does not park (park_after is not set, or it is not running)")
        async with entrance.turn:
            if not self.processes.running(id_):
                return False
            await self._worker.run(self._park(id_))
            entrance.last_used = time.monotonic()
        log.info("parked %s: %s", id_, why)
        self._counters.parked()
        self._events.publish("instance", {"id": id_, "change": "parked", "detail": why, "at": utc_now()})
        self._on_changed(None)
        return True

    async def _park(self, id_: str) -> None:
        desired = self._desired()
        runtime = self._runtime(desired, checks=self._checks)
        async with runtime.lock(desired.settings.api.timeout):
            await runtime.park(id_)

    # -- waking

    async def wake(self, id_: str) -> bool:
        """Wake the instance now (the API's wake); False when it was running. Raises WakeFailed."""
        entrance = self.gate.entrance(id_)
        if entrance is None:
            raise WakeFailed(f"{id_} does not park (park_after is not set, or it is not running)")
        async with entrance.turn:
            if self.processes.running(id_):
                return False
            await self._wake_at_gate(entrance)
        return True

    async def _wake_at_gate(self, entrance: Entrance) -> None:
        id_ = entrance.id
        held = self._supervisor.errored(id_)
        if held:   # its starts are backing off: the gate does not start it sooner than a pass would
            raise WakeFailed(held, retry_after=max(1, round(self._supervisor.retry_in(id_))))
        began = time.monotonic()
        try:
            record = await self._worker.run(self._wake(id_))
        except LockHeld:   # a pass or a `cst apply` at work: not the instance's failure
            log.warning("waking %s waited too long for the state dir; the next request tries again", id_)
            raise WakeFailed("CST is busy applying a change", retry_after=5) from None
        except (StartFailed, OSError) as exc:
            reason = failure_cause(exc)   # "exited with code 3 before answering": the log lines are in the log
            log.error("waking %s failed: %s", id_, exc)
            self._counters.wake_failed()
            self._supervisor.learn({}, [Result(id_, "failed", f"did not start: {exc}", happened=Happened.START_FAILED,
                                               cause=reason)])
            self._events.publish("instance", {"id": id_, "change": "failed", "detail": f"wake failed: {reason}",
                                              "at": utc_now()})
            raise WakeFailed(reason) from None
        took = time.monotonic() - began
        entrance.last_used = time.monotonic()
        log.info("woke %s in %.2fs", id_, took)
        self._counters.woken(took)
        self._events.publish("instance", {"id": id_, "change": "woken", "detail": f"in {took:.1f}s", "at": utc_now()})
        self._on_changed(record)

    async def _wake(self, id_: str) -> Record:
        desired = self._desired()
        spec = desired.instance(id_)
        if spec is None or spec.state != "running":
            raise OSError(f"{id_} is not declared running any more")
        runtime = self._runtime(desired, checks=self._checks)
        async with runtime.lock(desired.settings.api.timeout):
            return await runtime.wake(spec)


def _entrances(runtime: Runtime, desired: DesiredState) -> list[Entrance]:
    """Blocking (reads the instances' passwords): an entrance for each instance wanted running with
    park_after. ``runtime`` is not read-only: a new instance's password is generated here or by the
    pass, the same either way."""
    entrances = []
    for spec in desired.instances:
        if spec.state != "running" or spec.park_after is None:
            continue
        try:
            password = runtime.password(spec)
        except LaunchImpossible:   # its variable is unset: the pass says so; no entrance meanwhile
            continue
        entrances.append(Entrance(spec.id, f"{spec.id}:{password}", spec.park_after))
    return entrances
