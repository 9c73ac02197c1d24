"""Parking idle instances and waking them on their first request (``park_after``).

An instance with ``park_after`` sits behind cst serve's front door (``front_door``). Idle means,
for ``park_after``: no request through its door in flight or ended since, and no chat request of
its proxy key in flight at the key-pool proxy. CST's own probes go to node directly and do not
count. Parking stops the process as a stop does (SIGTERM; SillyTavern has saved before it
answers) and records it as parked: nothing is archived, the door keeps its port, and a pass
finds it ``parked``, which is as good as running (``engine.plan``). Its first request with the
instance's credentials wakes it: started on the file's release and settings of that moment.
A wake that fails answers 503 and counts as a failed start for the supervisor's backoff.

Parks and wakes take the state dir's lock, as a pass does, and run on a loop of their own in a
worker thread: stopping, starting (folders, the webpack cache) and snapshots block.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

from ..desired.model import DesiredState
from ..engine.results import Happened, Result
from ..engine.supervision import Supervisor
from ..runtime.base import LaunchImpossible, StartFailed
from ..runtime.health import HealthChecks
from ..runtime.local import LocalRuntime
from ..runtime.processes import utc_now
from ..runtime.statedir import LockHeld, Record, StateDir
from ..tasks import LoopThread
from .events import EventHub
from .fleet_metrics import ParkingCounters
from .front_door import Entrance, FrontDoor, WakeFailed

log = logging.getLogger("cst.parking")

TICK = 0.5   # how often idleness is looked at: park_after is seconds at the least


@dataclass(frozen=True)
class _Seen:
    """A record as last read, and the file identity it was read at."""

    stamp: tuple[int, int]   # (inode, mtime ns): records are replaced by a rename, never edited
    backend: int | None      # where node answers; None: no process


class Backends:
    """Where each instance's node answers, from its record, read again only when the record file
    changed (a stat per request, not a JSON read): a restart by a pass or a `cst apply` shows at once."""

    def __init__(self, state: StateDir):
        self._state = state
        self._seen: dict[str, _Seen] = {}

    def of(self, id_: str) -> int | None:
        path = self._state.record_path(id_)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._seen.pop(id_, None)
            return None
        stamp = (st.st_ino, st.st_mtime_ns)
        seen = self._seen.get(id_)
        if seen is None or seen.stamp != stamp:
            record = self._state.record(id_)
            seen = self._seen[id_] = _Seen(stamp, _backend(record))
        return seen.backend


def _backend(record: Record | None) -> int | None:
    if record is None or record.pid is None:
        return None
    return record.backend_port


class Parking:
    def __init__(self, desired: Callable[[], DesiredState], state: StateDir, supervisor: Supervisor,
                 events: EventHub, counters: ParkingCounters, in_flight_at_proxy: Callable[[str], int],
                 on_changed: Callable[[Record | None], None]):
        """``in_flight_at_proxy(id)``: the instance's chat requests at the key-pool proxy now;
        ``on_changed(record)``: an instance was parked (None) or woken (its new record)."""
        self._desired = desired
        self._state = state
        self._supervisor = supervisor
        self._events = events
        self._counters = counters
        self._in_flight_at_proxy = in_flight_at_proxy
        self._on_changed = on_changed
        self.backends = Backends(state)
        self.door = FrontDoor(self.backends.of, self._wake_at_door)
        self._worker = LoopThread("cst-parking")
        self._checks = HealthChecks()   # the worker loop's

    async def start(self) -> None:
        await self.door.start()
        self._worker.start()

    async def close(self) -> None:
        await self._worker.close(cleanup=self._checks.close)
        await self.door.close()

    async def follow(self, desired: DesiredState) -> None:
        """Hold the ports of the instances the file wants running with park_after, and no others."""
        entrances = await asyncio.to_thread(_entrances, desired)
        await self.door.follow(entrances)

    # -- parking

    async def run(self) -> None:
        """Park each instance idle for its park_after; for ever (a background task)."""
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for entrance in self.door.entrances:
                if not self._idle(entrance, now):
                    continue
                try:
                    await self.park(entrance.id, f"idle for {entrance.park_after:g}s")
                except (OSError, LockHeld) as exc:   # tried again once it has been idle that long again
                    entrance.last_used = time.monotonic()
                    log.error("could not park %s: %s", entrance.id, exc)

    def _idle(self, entrance: Entrance, now: float) -> bool:
        if self._in_flight_at_proxy(entrance.id):   # a chat in progress is use, until it ends (to a tick)
            entrance.last_used = now
            return False
        return (entrance.idle_for(now) >= entrance.park_after and not entrance.turn.locked()
                and self.backends.of(entrance.id) is not None)

    async def park(self, id_: str, why: str) -> bool:
        """Park the instance now; False when it was not running. Raises OSError (the stop failed,
        the state dir is busy)."""
        entrance = self.door.entrance(id_)
        if entrance is None:
            raise OSError(f"{id_} has no front door (park_after is not set, or it is not running)")
        async with entrance.turn:
            if self.backends.of(id_) is None:
                return False
            await self._worker.run(self._park(id_))
            entrance.last_used = time.monotonic()
        log.info("parked %s: %s", id_, why)
        self._counters.parked()
        self._events.publish("instance", {"id": id_, "change": "parked", "detail": why, "at": utc_now()})
        self._on_changed(None)
        return True

    async def _park(self, id_: str) -> None:
        runtime = LocalRuntime(self._desired(), checks=self._checks)
        async with runtime.lock(runtime.settings.api.timeout):
            await runtime.park(id_)

    # -- waking

    async def wake(self, id_: str) -> bool:
        """Wake the instance now (the API's wake); False when it was running. Raises WakeFailed."""
        entrance = self.door.entrance(id_)
        if entrance is None:
            raise WakeFailed(f"{id_} has no front door (park_after is not set, or it is not running)")
        async with entrance.turn:
            if self.backends.of(id_) is not None:
                return False
            await self._wake_at_door(entrance)
        return True

    async def _wake_at_door(self, entrance: Entrance) -> None:
        id_ = entrance.id
        held = self._supervisor.errored(id_)
        if held:   # its starts are backing off: the door does not start it sooner than a pass would
            raise WakeFailed(held, retry_after=max(1, round(self._supervisor.retry_in(id_))))
        began = time.monotonic()
        try:
            record = await self._worker.run(self._wake(id_))
        except (StartFailed, OSError, LockHeld) as exc:
            # its own first words ("exited with code 3 before answering"), not the log lines after them
            reason = (str(exc).split(";")[0].splitlines() or [type(exc).__name__])[0]
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
        runtime = LocalRuntime(desired, checks=self._checks)
        async with runtime.lock(desired.settings.api.timeout):
            return await runtime.wake(spec)


def _entrances(desired: DesiredState) -> list[Entrance]:
    """Blocking (reads the instances' passwords): a door for each instance wanted running with park_after."""
    runtime = LocalRuntime(desired)   # a new instance's password is generated here or by the pass: the same
    host = desired.settings.sillytavern.listen_address
    doors = []
    for spec in desired.instances:
        if spec.state != "running" or spec.park_after is None:
            continue
        try:
            password = runtime.password(spec)
        except LaunchImpossible:   # its variable is unset: the pass says so; no door meanwhile
            continue
        doors.append(Entrance(spec.id, host, spec.port, f"{spec.id}:{password}", spec.park_after))
    return doors
