"""What ``cst serve`` adds to a plain reconcile: crash backoff, the memory limit, liveness.

All are policies over time, so they live in the daemon, not in the planner:
before each pass the supervisor turns what it remembers into planner hints
(``hold`` an instance whose restarts are backing off, ``restart`` one whose
memory stayed too high or that stopped answering its health check); after each
pass it learns from the results.

``cst serve`` calls ``hints`` and ``learn`` from its reconcile thread while API handlers call
``request_restart``, ``forget`` and ``errored`` from the event loop: each touches a dict in
single steps (a get, a set, a pop, a swap), never iterating one the other side changes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import psutil

from ..desired.model import DesiredState
from ..runtime.base import Observed
from .results import Happened, Result

BACKOFF_BASE = 2.0        # seconds before the second restart; doubles each time
BACKOFF_CAP = 300.0
STABLE_AFTER = 60.0       # running this long clears the crash count
MEMORY_STRIKES = 3        # consecutive samples over max_memory before a restart
HEALTH_STRIKES = 3        # consecutive failed health checks before a restart


@dataclass
class _Crashes:
    count: int = 0
    retry_at: float = 0.0
    reason: str = ""          # the first line of the last failure


@dataclass
class Supervisor:
    desired: DesiredState
    clock: Callable[[], float] = time.monotonic
    crashes: dict[str, _Crashes] = field(default_factory=dict)
    memory_strikes: dict[str, int] = field(default_factory=dict)
    requested: dict[str, str] = field(default_factory=dict)   # restarts asked for by an operator
    health_strikes: dict[str, int] = field(default_factory=dict)

    def request_restart(self, id_: str, reason: str) -> None:
        self.requested[id_] = reason

    def forget(self, id_: str) -> None:
        """An operator changed this instance on purpose: start its history afresh."""
        self.crashes.pop(id_, None)
        self.memory_strikes.pop(id_, None)
        self.health_strikes.pop(id_, None)

    def learn_health(self, answers: Mapping[str, str | None]) -> bool:
        """Take the liveness checks' answers (None: healthy, else why not); True when an instance
        has now failed HEALTH_STRIKES in a row, and a restart of it is requested."""
        asked = False
        for id_, failure in answers.items():
            if failure is None:
                self.health_strikes.pop(id_, None)
                continue
            strikes = self.health_strikes[id_] = self.health_strikes.get(id_, 0) + 1
            if strikes >= HEALTH_STRIKES:
                del self.health_strikes[id_]
                self.request_restart(id_, f"not answering its health check ({strikes} in a row: {failure})")
                asked = True
        return asked

    def errored(self, id_: str) -> str | None:
        """Why the instance is held back, if it is."""
        crashes = self.crashes.get(id_)
        if crashes and crashes.retry_at > self.clock():
            wait = crashes.retry_at - self.clock()
            why = f" ({crashes.reason})" if crashes.reason else ""
            return f"errored: failed {crashes.count} times in a row{why}; next restart in {wait:.0f}s"
        return None

    def retry_in(self, id_: str) -> float:
        """Seconds until the instance's next start may be tried (0: now)."""
        crashes = self.crashes.get(id_)
        return max(0.0, crashes.retry_at - self.clock()) if crashes else 0.0

    def restarts(self, id_: str) -> int:
        crashes = self.crashes.get(id_)
        return crashes.count if crashes else 0

    def hints(self, observed: Mapping[str, Observed]) -> tuple[dict[str, str], dict[str, str]]:
        hold = {id_: reason for id_ in observed if (reason := self.errored(id_))}
        restart, self.requested = self.requested, {}  # one swap: a request made meanwhile waits for the next pass
        limits = {i.id: i.max_memory for i in self.desired.instances if i.max_memory}
        for id_, seen in observed.items():
            limit = limits.get(id_)
            if seen.status != "running" or not limit:
                self.memory_strikes.pop(id_, None)
                continue
            rss = _rss(seen.pid)
            if rss is not None and rss > limit:
                self.memory_strikes[id_] = self.memory_strikes.get(id_, 0) + 1
                if self.memory_strikes[id_] >= MEMORY_STRIKES:
                    del self.memory_strikes[id_]   # counted afresh after this restart
                    restart.setdefault(id_, f"memory {rss / 2**20:.0f} MiB stayed above max_memory "
                                            f"{limit / 2**20:.0f} MiB")
            else:
                self.memory_strikes.pop(id_, None)
        return hold, restart

    def learn(self, observed: Mapping[str, Observed], results: Iterable[Result]) -> None:
        now = self.clock()
        for result in results:
            seen = observed.get(result.id)
            crashed = seen is not None and seen.status == "crashed"
            failed_start = result.happened is Happened.START_FAILED
            if failed_start or (crashed and result.outcome == "changed"):
                entry = self.crashes.setdefault(result.id, _Crashes())
                entry.count += 1
                entry.retry_at = now + min(BACKOFF_BASE * 2 ** (entry.count - 1), BACKOFF_CAP)
                entry.reason = result.cause if failed_start else "the process had exited"
        for id_, seen in observed.items():
            if seen.status == "running" and id_ in self.crashes and _uptime(seen.pid) > STABLE_AFTER:
                self.crashes.pop(id_, None)


def _rss(pid: int | None) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss if pid else None
    except psutil.Error:
        return None


def _uptime(pid: int | None) -> float:
    try:
        return time.time() - psutil.Process(pid).create_time() if pid else 0.0
    except psutil.Error:
        return 0.0
