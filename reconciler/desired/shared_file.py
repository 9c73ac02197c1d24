"""desired.yaml as a file that several writers share: people, git, the REST API.

Every change made through CST re-reads the file from disk first (a hand edit
is never clobbered), edits only the lines it must (``edits``), validates the
result (an edit that would make the file invalid is refused and writes
nothing), and replaces the file atomically. Changes are serialized.

The async methods read, validate and write in a worker thread: ``cst serve``'s event loop
also relays every proxied chat request, and a large file or a slow fsync must not stall it.
"""
from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .model import DesiredState, parse
from ..files import atomic_write
from .validation import InvalidDesiredState, Problem, read_text


_SETTLE_TRIES = 5
_SETTLE_PAUSE = 0.05


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Snapshot:
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


class DesiredFile:
    def __init__(self, path: Path):
        self.path = path.resolve()
        self._lock = asyncio.Lock()

    def read(self) -> Snapshot:
        """The file now (blocking: file I/O and validation)."""
        try:
            text = read_text(self.path)
        except InvalidDesiredState as exc:  # unreadable, not a file, too big, not UTF-8
            return Snapshot("", sha256(""), None, tuple(exc.problems))
        return self.interpret(text)

    async def aread(self) -> Snapshot:
        """``read`` in a worker thread."""
        return await asyncio.to_thread(self.read)

    def interpret(self, text: str) -> Snapshot:
        try:
            return Snapshot(text, sha256(text), parse(text, self.path))
        except InvalidDesiredState as exc:
            return Snapshot(text, sha256(text), None, tuple(exc.problems))

    async def settled_read(self) -> Snapshot:
        """Read, giving an editor that is half-way through writing the file a moment to finish."""
        for _ in range(_SETTLE_TRIES):
            snapshot = await self.aread()
            if snapshot.valid:
                return snapshot
            await asyncio.sleep(_SETTLE_PAUSE)
        return snapshot

    async def change(self, edit: Callable[[str], str]) -> Snapshot:
        """Apply ``edit`` to the current text and write the result if it is valid.

        Raises CurrentFileInvalid or ChangeRefused; ``edit`` may raise its own errors. In every
        such case nothing is written. If someone else writes the file meanwhile, the edit is
        applied again to their version.
        """
        async with self._lock:
            while True:
                current = await self.settled_read()
                if not current.valid:
                    raise CurrentFileInvalid(list(current.problems))
                written = await asyncio.to_thread(lambda: self._write(edit(current.text), expected=current.sha256))
                if written is not None:
                    return written

    async def replace(self, text: str, if_match: str) -> Snapshot:
        """Replace the whole file, only if it is still the version whose sha256 is ``if_match``."""
        async with self._lock:
            current = await self.aread()
            if current.sha256 != if_match:
                raise StaleVersion(current.sha256)
            written = await asyncio.to_thread(self._write, text, current.sha256)
            if written is None:
                raise StaleVersion((await self.aread()).sha256)
            return written

    def _write(self, text: str, expected: str) -> Snapshot | None:
        """Write ``text`` unless the file stopped being version ``expected`` (then None)."""
        new = self.interpret(text)
        if not new.valid:
            raise ChangeRefused(list(new.problems))
        try:
            mode = self.path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        # written only over the version we read: a hand edit made since then is never overwritten
        unchanged = lambda old: hashlib.sha256(old).hexdigest() == expected  # noqa: E731
        return new if atomic_write(self.path, text.encode("utf-8"), mode, replaces=unchanged) else None
