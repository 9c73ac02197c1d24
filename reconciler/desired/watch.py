"""Following one file (or one folder) for changes, as ``cst serve`` and ``cst proxy`` both do."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import AsyncIterator

import watchfiles

logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every change at INFO

# how long a quiet watch waits before it says so; its first quiet moment tells that it is in place
_QUIET_MS = 1000


async def changes_of(path: Path, stop: asyncio.Event, debounce_ms: int = 150) -> AsyncIterator[None]:
    """Yield once when the watch is in place, then once per (debounced) change of ``path``,
    until ``stop`` is set.

    The first yield lets the caller read the file after the watch began: a save made while the
    watch was being set up (just after start-up, or while a failed watcher was restarted) is
    then not missed. The folder is watched, not the file: editors and ``git checkout`` save by
    renaming a new file over the old one, which a watch on the old file would miss."""
    target = str(await asyncio.to_thread(path.resolve))
    in_place = False
    async for changes in watchfiles.awatch(Path(target).parent, watch_filter=lambda _, changed: changed == target,
                                           stop_event=stop, debounce=debounce_ms, step=25, recursive=False,
                                           rust_timeout=_QUIET_MS, yield_on_timeout=True):
        if changes or not in_place:
            in_place = True
            yield


async def changes_in(folder: Path, stop: asyncio.Event, debounce_ms: int = 50,
                     heartbeat_ms: int = 5000) -> AsyncIterator[None]:
    """Yield once per (debounced) batch of changes of the files in ``folder``, and at least every
    ``heartbeat_ms`` anyway: a change made while the watch was being set up is not missed for long."""
    async for _ in watchfiles.awatch(folder, stop_event=stop, debounce=debounce_ms, step=25, recursive=False,
                                     yield_on_timeout=True, rust_timeout=heartbeat_ms):
        yield
