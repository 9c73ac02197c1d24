"""Scheduled backups: ``cst serve`` snapshots each running instance every ``settings.backups.every``
and keeps the ``keep`` newest of each.

When an instance is due is read from its snapshots on disk (the newest, of any reason: a
rollout's snapshot an hour ago is as good a backup), so restarting ``cst serve`` neither takes a
snapshot at every start nor skips one. Snapshots are blocking I/O: each runs in a thread, one
at a time (they compete for the same disk). A snapshot that fails (disk full) is logged and
tried again after ``RETRY_AFTER`` (or ``every``, when shorter); the others go on.

The clock and the sleep are injectable, so a test drives the schedule on a fake clock with
``round()``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Awaitable, Callable

from ..desired.model import DesiredState
from ..runtime.processes import live_process
from ..runtime.snapshots import Snapshots
from ..runtime.statedir import LockHeld, StateDir

log = logging.getLogger("cst.backups")

IDLE_CHECK = 60.0     # with backups off or nothing due soon: look at the settings again this often
RETRY_AFTER = 300.0   # a snapshot that failed is tried again after this long


class BackupScheduler:
    def __init__(self, desired: Callable[[], DesiredState], state: StateDir,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.desired = desired          # the desired state in force, read at each round
        self.snapshots = Snapshots(state)
        self.state = state
        self.clock = clock              # wall-clock seconds, as snapshots are dated
        self.sleep = sleep
        self._failed_at: dict[str, float] = {}
        self.last_error: dict[str, str] = {}   # instance id -> why its last snapshot failed

    async def run(self) -> None:
        """Until cancelled: a round, then sleep until the next snapshot is due."""
        while True:
            wait = await self.round()
            await self.sleep(min(wait, IDLE_CHECK))

    async def round(self) -> float:
        """Snapshot (and prune) every running instance that is due; seconds until the next is due."""
        desired = self.desired()
        settings = desired.settings.backups
        if settings is None:
            return IDLE_CHECK
        running = await asyncio.to_thread(self._running, desired)
        next_due = settings.every
        if len(running) < sum(spec.state == "running" for spec in desired.instances):
            # one is starting (or being repaired): its first snapshot comes soon after it runs
            next_due = min(next_due, desired.settings.resync)
        for instance_id, data_dir in running:
            due_in = await asyncio.to_thread(self._due_in, instance_id, settings.every)
            if due_in > 0:
                next_due = min(next_due, due_in)
                continue
            try:
                await asyncio.to_thread(self._backup, instance_id, data_dir, settings.keep)
            except (OSError, ValueError, LockHeld) as exc:   # disk full, a data dir gone, a long restore: this one only
                self._failed_at[instance_id] = self.clock()
                self.last_error[instance_id] = str(exc)
                log.error("scheduled snapshot of %s failed: %s; trying again in %.0fs", instance_id, exc,
                          min(RETRY_AFTER, settings.every))
                next_due = min(next_due, RETRY_AFTER)
        return max(next_due, 0.001)

    def _running(self, desired: DesiredState) -> list[tuple[str, Path]]:
        """(id, data dir) of each declared instance whose recorded process is alive."""
        found: list[tuple[str, Path]] = []
        for spec in desired.instances:
            record = self.state.record(spec.id)
            if record is not None and record.pid is not None and live_process(record.pid, record.create_time):
                found.append((spec.id, desired.data_dir(spec.port)))
        return found

    def _due_in(self, instance_id: str, every: float) -> float:
        """Seconds until the instance's next snapshot (0 or less: now)."""
        now = self.clock()
        failed = self._failed_at.get(instance_id)
        if failed is not None and now - failed < min(RETRY_AFTER, every):
            return failed + min(RETRY_AFTER, every) - now
        snapshots = self.snapshots.list(instance_id)
        if not snapshots:
            return 0.0
        last = datetime.fromisoformat(snapshots[-1].taken_at).timestamp()
        return last + every - now

    def _backup(self, instance_id: str, data_dir: Path, keep: int) -> None:
        snapshot = self.snapshots.take(instance_id, data_dir, "scheduled")
        removed = self.snapshots.prune(instance_id, keep)
        self._failed_at.pop(instance_id, None)
        self.last_error.pop(instance_id, None)
        log.info("snapshot %s of %s: %d files, %d bytes new%s", snapshot.id, instance_id, snapshot.files,
                 snapshot.bytes_new, f"; removed {len(removed)} older" if removed else "")
