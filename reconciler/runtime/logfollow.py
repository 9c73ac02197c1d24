"""Reading an instance's log as ``pm2 logs`` does: its last lines, then whatever is appended.

Used by ``cst logs ID [-n N] [-f]`` and by ``GET /api/instances/{id}/logs``. The file is polled
(a ``stat`` every ``POLL`` seconds, a read only when it grew): a handful of people following a
log do not need a watcher thread each. ``rotate_log`` moves a log's first bytes to a new ``.1``
and cuts them from the live file (it may shrink by less than a follower has read, or not at all
when much was written meanwhile), so a rotation is recognised by ``.1`` being another file, not
by the size. The bytes that were the live file are then the new generations, oldest first,
followed by the live file: a follower resumes at its offset in that sequence, so it neither
repeats nor skips. Each look is taken under a shared ``flock`` on the log, which a rotator holds
exclusively: never a copy without its cut.
"""
from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

from .logs import generation

MAX_LINES = 10_000
CHUNK = 64 * 1024
POLL = 0.2
_MAX_GENERATIONS = 1000  # settings.logs.keep is at most 100

Identity = tuple[int, int, int]  # a rotated copy's inode, size and mtime: never changed after rotation


def _identity(path: Path) -> Identity | None:
    # not ctime: renaming .1 to .2 changes it; size and mtime tell apart a copy that reused an inode
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def _locked(log: BinaryIO) -> None:
    fcntl.flock(log.fileno(), fcntl.LOCK_SH)  # waits out a rotation in progress; released on close


def _tail(log: BinaryIO, end: int, n: int, data: bytes) -> tuple[bytes, bool]:
    """``data`` with bytes before it, from ``end`` backwards, until it holds ``n`` + 1 newlines
    (so the first of the last ``n`` lines is whole); True when the file's start was reached."""
    pos = end
    while pos > 0 and data.count(b"\n") <= n:
        step = min(CHUNK, pos)
        pos -= step
        log.seek(pos)
        data = log.read(step) + data
    return data, pos == 0


def _start(path: Path, n: int) -> tuple[bytes, int, int | None, Identity | None]:
    try:
        log = open(path, "rb")  # noqa: SIM115 -- closed by the with below; only open's FileNotFoundError is caught
    except FileNotFoundError:
        return b"", 0, None, None
    with log:
        _locked(log)
        info = os.fstat(log.fileno())
        newest = generation(path, 1)
        gen = _identity(newest)
        data, whole = _tail(log, info.st_size, n, b"") if n else (b"", False)
        if whole and data.count(b"\n") <= n and gen is not None:
            # just rotated: the first lines (the first one cut at a block boundary) are in .1
            with open(newest, "rb") as older:
                data, _ = _tail(older, gen[1], n, data)
        return b"".join(data.splitlines(keepends=True)[-n:]) if n else b"", info.st_size, info.st_ino, gen


def last_lines(path: Path, n: int) -> tuple[bytes, int, int | None]:
    """The last ``n`` lines of ``path``, the offset they end at, and the file's inode (None: no file)."""
    return _start(path, n)[:3]


def _newer(path: Path, seen: Identity | None) -> list[tuple[Path, int]] | None:
    """The copies made since ``seen`` was ``.1``, oldest first, with their sizes; None when
    ``seen`` is gone (more rotations than ``keep`` since: the follower fell too far behind)."""
    newer: list[tuple[Path, int]] = []
    for k in range(1, _MAX_GENERATIONS):
        found = _identity(generation(path, k))
        if found == seen:
            return newer[::-1]
        if found is None:
            return newer[::-1] if seen is None else None
        newer.append((generation(path, k), found[1]))
    return None


def _step(path: Path, inode: int | None, offset: int, seen: Identity | None
          ) -> tuple[bytes, int | None, int, Identity | None, bool]:
    """One look at the log: up to a chunk of what follows ``offset`` (after any rotation), the
    new state, and whether a whole chunk came (more may be waiting).

    ``offset`` counts from the start of the copies made since ``seen`` was ``.1``, then the live
    file: ``seen`` moves on only once those copies are read, so a follower that fell behind
    reads them all, in order, a chunk at a time."""
    try:
        log = open(path, "rb")  # noqa: SIM115 -- closed by the with below; only open's FileNotFoundError is caught
    except FileNotFoundError:
        return b"", None, 0, None, False  # not written yet, or moved away: wait for the next one
    with log:
        _locked(log)
        info = os.fstat(log.fileno())
        now = _identity(generation(path, 1))
        newer: list[tuple[Path, int]] = []
        if info.st_ino != inode:
            inode, offset, seen = info.st_ino, 0, now       # a new file: from its start
        elif now != seen and now is not None:               # rotated since ``seen``
            copies = _newer(path, seen)
            if copies is None:
                offset, seen = 0, now                       # its copies were dropped: from the live start
            else:
                newer = copies
        elif info.st_size < offset:                         # truncated without a copy (keep: 0)
            offset = 0
        data = b""
        pos = offset
        for older, size in newer:
            if pos >= size:
                pos -= size
                continue
            with open(older, "rb") as copy:
                copy.seek(pos)
                data += copy.read(CHUNK - len(data))
            pos = 0
            if len(data) == CHUNK:
                return data, inode, offset + len(data), seen, True
        # every copy read: from here on, offsets are the live file's
        log.seek(pos)
        chunk = log.read(CHUNK - len(data)) if info.st_size > pos else b""
        full = len(data) + len(chunk) == CHUNK
        return data + chunk, inode, pos + len(chunk), now if newer else seen, full


async def follow(path: Path, n: int, gone: Callable[[], bool] = lambda: False,
                 poll: float = POLL) -> AsyncIterator[bytes]:
    """The last ``n`` lines, then each addition as it comes, until ``gone()`` says the reader left."""
    text, offset, inode, seen = await asyncio.to_thread(_start, path, n)
    if text:
        yield text
    while not gone():
        data, inode, offset, seen, full = await asyncio.to_thread(_step, path, inode, offset, seen)
        if data:
            yield data
        if not full:  # more is waiting when a whole chunk came: read on at once
            await asyncio.sleep(poll)
