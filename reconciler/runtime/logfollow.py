"""Reading an instance's log as ``pm2 logs`` does: its last lines, then whatever is appended.

Used by ``cst logs ID [-n N] [-f]`` and by ``GET /api/instances/{id}/logs``. The file is polled
(a ``stat`` every ``POLL`` seconds, a read only when it grew): a handful of people following a
log do not need a watcher thread each. ``rotate_log`` copies a full log to ``.1`` and truncates it
in place; a follower notices the file shrank and first reads the part of ``.1`` it had not seen.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import AsyncIterator, Callable

MAX_LINES = 10_000
CHUNK = 64 * 1024
POLL = 0.2


def last_lines(path: Path, n: int) -> tuple[bytes, int, int | None]:
    """The last ``n`` lines of ``path``, the offset they end at, and the file's inode (None: no file)."""
    try:
        log = open(path, "rb")
    except FileNotFoundError:
        return b"", 0, None
    with log:
        info = os.fstat(log.fileno())
        end = pos = info.st_size
        data = b""
        # one newline more than n lines need, so the first of them is whole
        while n and pos > 0 and data.count(b"\n") <= n:
            step = min(CHUNK, pos)
            pos -= step
            log.seek(pos)
            data = log.read(step) + data
        return b"".join(data.splitlines(keepends=True)[-n:]) if n else b"", end, info.st_ino


def _read_from(path: Path, offset: int, limit: int = CHUNK) -> bytes:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            return log.read(limit)
    except FileNotFoundError:
        return b""


async def follow(path: Path, n: int, gone: Callable[[], bool] = lambda: False,
                 poll: float = POLL) -> AsyncIterator[bytes]:
    """The last ``n`` lines, then each addition as it comes, until ``gone()`` says the reader left."""
    text, offset, inode = await asyncio.to_thread(last_lines, path, n)
    if text:
        yield text
    while not gone():
        try:
            info = os.stat(path)
        except FileNotFoundError:
            inode, offset = None, 0  # not written yet, or moved away: wait for the next one
            await asyncio.sleep(poll)
            continue
        missed = b""
        if info.st_ino != inode:
            inode, offset = info.st_ino, 0                 # a new file: from its start
        elif info.st_size < offset:                        # truncated by rotate_log
            missed = await asyncio.to_thread(_read_from, path.with_name(path.name + ".1"), offset, 2**20)
            offset = 0
        chunk = await asyncio.to_thread(_read_from, path, offset) if info.st_size > offset else b""
        offset += len(chunk)
        if missed or chunk:
            yield missed + chunk
        if len(chunk) < CHUNK:  # more is waiting when a whole chunk came: read on at once
            await asyncio.sleep(poll)
