"""desired.yaml as a file that several writers share: people, git, the REST API.

Every change made through CST re-reads the file from disk first, edits only the
lines it must (``edits``), validates the result (an edit that would make the file
invalid is refused and writes nothing), and replaces the file atomically. CST's
writers take turns (within a process, and across processes through a lock on the
file's folder). A save by anyone else -- an editor, ``git pull`` -- can still land
between CST's read and its write; the atomic exchange hands back whatever it
displaced, so such a save is never discarded: the edit is applied again on top of
it, or (for a whole-file replace made against an older version) it is put back.

The async methods read, validate and write in a worker thread: ``cst serve``'s event loop
also relays every proxied chat request, and a large file or a slow fsync must not stall it.
"""
from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

from ..files import conditional_replace, swap
from .model import DesiredState, parse
from .problems import InvalidDesiredState, Problem
from .safe_yaml import decode, read_text

_SETTLE_TRIES = 5
_SETTLE_PAUSE = 0.05
_LOCK_POLL = 0.01
_LOCK_TIMEOUT = 30.0

# a check of a change before it is written: raises to refuse it (see ``restricted``)
Guard = Callable[[DesiredState, DesiredState], None]
# told of each change CST wrote, in turn with the writes and in a worker thread: the text the
# change was built on, the text written, and what the change was (the daemon commits it when the
# file is in git)
Recorder = Callable[[str, str, str], None]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class FileReading:
    """The file's content at one moment, and what it means (or why it means nothing)."""

    text: str
    sha256: str
    desired: DesiredState | None
    problems: tuple[Problem, ...] = ()

    @property
    def valid(self) -> bool:
        return self.desired is not None


class CurrentFileInvalid(InvalidDesiredState):
    """The file on disk is invalid now, so there is nothing sound to build a change on."""


class ChangeRefused(InvalidDesiredState):
    """The change would make the file invalid; nothing was written."""


class StaleVersion(Exception):
    """The file is no longer the version the caller based its change on."""

    def __init__(self, current: str):
        self.current = current
        super().__init__(f"the file changed since it was read (now sha256 {current})")


@asynccontextmanager
async def _writers_turn(folder: Path) -> AsyncIterator[None]:
    """Hold the lock CST's writers of files in ``folder`` share: a flock on the folder itself,
    so no lock file appears beside desired.yaml (or in its git status)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another cst has been writing in {folder} for {_LOCK_TIMEOUT:g}s") from None
                await asyncio.sleep(_LOCK_POLL)
        yield
    finally:
        os.close(fd)


class DesiredFile:
    def __init__(self, path: Path):
        self.path = path.resolve()
        self._lock = asyncio.Lock()
        self.recorder: Recorder | None = None

    def read(self) -> FileReading:
        """The file now (blocking: file I/O and validation)."""
        try:
            text = read_text(self.path)
        except InvalidDesiredState as exc:  # unreadable, not a file, too big, not UTF-8
            return FileReading("", sha256(""), None, tuple(exc.problems))
        return self.interpret(text)

    async def aread(self) -> FileReading:
        """``read`` in a worker thread."""
        return await asyncio.to_thread(self.read)

    async def read_in_turn(self) -> FileReading:
        """``aread`` in turn with this process's own changes, so that a reading taken before a change
        is never handed over after it: a caller that uses the reading without awaiting anything
        first (``change`` callers do the same) sees this process's readings and writes in order."""
        async with self._lock:
            return await self.aread()

    def interpret(self, text: str) -> FileReading:
        try:
            return FileReading(text, sha256(text), parse(text, self.path))
        except InvalidDesiredState as exc:
            return FileReading(text, sha256(text), None, tuple(exc.problems))

    async def settled_read(self) -> FileReading:
        """Read, giving an editor that is half-way through writing the file a moment to finish."""
        for _ in range(_SETTLE_TRIES):
            reading = await self.aread()
            if reading.valid:
                return reading
            await asyncio.sleep(_SETTLE_PAUSE)
        return reading

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold CST's writers' turn: no write of CST's happens meanwhile (a merge of the file runs in it)."""
        async with self._lock, _writers_turn(self.path.parent):
            yield

    async def _record(self, before: FileReading, after: FileReading, note: str | None) -> None:
        if note is not None and self.recorder is not None:
            await asyncio.to_thread(self.recorder, before.text, after.text, note)

    async def change(self, edit: Callable[[str], str], guard: Guard | None = None, note: str | None = None) -> FileReading:
        """Apply ``edit`` to the current text and write the result if it is valid (and ``guard``
        lets it through).

        Raises CurrentFileInvalid or ChangeRefused; ``edit`` and ``guard`` may raise their own
        errors. In every such case the file is as it was. A save that lands between the read
        and the write is not lost: the edit is applied again on top of it.
        """
        async with self.turn():
            current = await self.settled_read()
            if not current.valid:
                raise CurrentFileInvalid(list(current.problems))
            base, new = await asyncio.to_thread(self._change, edit, current, guard)
            await self._record(base, new, note)
            return new

    def _change(self, edit: Callable[[str], str], current: FileReading, guard: Guard | None) -> tuple[FileReading, FileReading]:
        """``change`` once the current version is read (blocking: validation, fsync, rename): the
        version the change was built on, and the new one."""
        new = self._checked(edit(current.text), current, guard)
        there = current.text.encode("utf-8")  # what the path holds, as far as we know
        while True:
            ours = new.text.encode("utf-8")
            displaced = swap(self.path, ours, self._mode())
            if displaced is None or displaced == there:
                return current, new
            # someone saved meanwhile: their version is the base now, and the edit goes on top
            there = ours
            try:
                current = self._foreign(displaced)
                new = self._checked(edit(current.text), current, guard)
            except BaseException:
                # the edit does not apply to their version: theirs goes back, unchanged
                conditional_replace(self.path, displaced, ours, self._mode())
                raise

    async def replace(self, text: str, if_match: frozenset[str] | None, guard: Guard | None = None,
                      note: str | None = None, base: DesiredState | None = None) -> FileReading:
        """Replace the whole file, only if it is still a version whose sha256 is in ``if_match``
        (None: any version, as long as the file exists). ``guard`` compares the change with the
        file's version, or with ``base`` (the last valid state) when the file is invalid now: a
        broken file is exactly when an operator needs to replace it."""
        async with self.turn():
            current = await self.aread()
            if (current.sha256 not in if_match) if if_match is not None else not self.path.exists():
                raise StaleVersion(current.sha256)
            new = await asyncio.to_thread(self._checked, text, current, guard, base)
            replaced = await asyncio.to_thread(conditional_replace, self.path, text.encode("utf-8"),
                                               current.text.encode("utf-8"), self._mode())
            if not replaced:
                raise StaleVersion((await self.aread()).sha256)
            await self._record(current, new, note)
            return new

    def _foreign(self, data: bytes) -> FileReading:
        """A version someone else saved, to build on; CurrentFileInvalid when it cannot be."""
        try:
            reading = self.interpret(decode(data, str(self.path)))
        except InvalidDesiredState as exc:  # too big, not UTF-8
            raise CurrentFileInvalid(list(exc.problems)) from None
        if not reading.valid:
            raise CurrentFileInvalid(list(reading.problems))
        return reading

    def _checked(self, text: str, current: FileReading, guard: Guard | None,
                 base: DesiredState | None = None) -> FileReading:
        new = self.interpret(text)
        if new.desired is None:
            raise ChangeRefused(list(new.problems))
        if guard is not None:
            old = current.desired or base
            if old is None:   # nothing sound to compare the change with
                raise CurrentFileInvalid(list(current.problems))
            guard(old, new.desired)
        return new

    def _mode(self) -> int:
        try:
            return self.path.stat().st_mode & 0o777
        except FileNotFoundError:
            return 0o644
