"""``cst serve``'s figures of each data dir's real disk use (``runtime/disk_use.py``), kept fresh.

Every ``every`` (``REFRESH_EVERY``), and soon after a pass changed an instance (a start, a
restore, a wake: new data dirs, data put back), every data dir is walked on a worker thread,
never on the event loop that serves requests and relays chats. Listings, ``/metrics`` and the
page read the figures from memory (``of``, ``total``); the walk also saves them in the state dir
for ``cst status``. A data dir that cannot be walked is logged with its traceback, keeps its
last figure and is walked again after ``RETRY_AFTER``; anything else that fails ends ``run``,
and ``BackgroundTasks`` logs it and starts it again.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import Callable

from ..desired.model import DesiredState
from ..runtime.disk_use import REFRESH_EVERY, data_dirs, measure, save
from ..runtime.statedir import StateDir

log = logging.getLogger("cst.disk")

RETRY_AFTER = 60.0      # a data dir whose walk failed is tried again this soon
SOON = 2.0              # after a change, wait this long so a burst of passes makes one walk


class DiskWatch:
    def __init__(self, desired: Callable[[], DesiredState], state: StateDir,
                 changed: Callable[[], None] = lambda: None, every: float = REFRESH_EVERY):
        self.desired = desired      # the desired state in force, read at each walk
        self.state = state
        self.changed = changed      # called on the daemon's loop after a walk that changed a figure
        self.every = every
        self.measured_at: str | None = None   # ISO 8601 UTC, when the last walk began
        self._use: dict[str, int | None] = {}
        self._soon = asyncio.Event()

    def of(self, instance_id: str) -> int | None:
        """Bytes the instance's data dir uses, as last walked; None before a walk or without one."""
        return self._use.get(instance_id)

    def total(self) -> int:
        return sum(n for n in self._use.values() if n is not None)

    def refresh_soon(self) -> None:
        """Walk again shortly (an instance started or its data was put back)."""
        self._soon.set()

    async def run(self) -> None:
        """Until cancelled: walk, then wait for ``every`` or a change."""
        while True:
            self._soon.clear()
            wait = await self.walk()
            try:
                async with asyncio.timeout(wait):
                    await self._soon.wait()
                await asyncio.sleep(SOON)
            except TimeoutError:
                pass

    async def walk(self) -> float:
        """One walk of every data dir (in a thread); seconds until the next is due."""
        desired = self.desired()
        dirs = await asyncio.to_thread(data_dirs, desired, self.state)
        measured = await asyncio.to_thread(measure, dirs)
        use = {id_: measured.use.get(id_, self._use.get(id_)) for id_ in dirs}   # a failed walk keeps its last figure
        for id_, exc in measured.failed.items():
            log.error("could not measure the disk use of %s (%s); trying again in %.0fs", id_, dirs[id_], RETRY_AFTER,
                      exc_info=exc)
        try:
            await asyncio.to_thread(save, self.state, use, measured.at)
        except OSError as exc:   # a full disk must not stop the figures that show it (nor cst serve)
            log.error("could not save the disk use figures for cst status: %s", exc)
        # the figures, their time and the notice of them at once, with no await between, once the
        # file cst status reads is written: a figure seen here is saved there, and a walk cancelled
        # in between changes nothing
        changed, self._use = use != self._use, use
        self.measured_at = datetime.fromtimestamp(measured.at, timezone.utc).isoformat(timespec="seconds")
        if changed:
            self.changed()
        return min(self.every, RETRY_AFTER) if measured.failed else self.every
