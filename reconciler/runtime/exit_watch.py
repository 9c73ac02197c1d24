"""Hearing the moment an instance process exits, rather than at the next resync.

A pidfd refers to one process, not to a pid number, and works for processes adopted from an
earlier run, which are not our children: it turns readable when the process exits.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

log = logging.getLogger("cst.serve")


class ExitWatches:
    """pidfds of the instance processes being watched, read by the running loop; ``on_exit(pid, id)``
    is called once for each that exits."""

    def __init__(self, on_exit: Callable[[int, str], None]):
        self._on_exit = on_exit
        self._pidfds: dict[int, int] = {}

    def __contains__(self, pid: int) -> bool:
        return pid in self._pidfds

    def watch(self, running: list[tuple[int, str]]) -> None:
        """Watch each ``(pid, id)`` not watched yet; one that already exited is left to the next pass."""
        loop = asyncio.get_running_loop()
        for pid, id_ in running:
            if pid in self._pidfds:
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            self._pidfds[pid] = pidfd
            loop.add_reader(pidfd, self._exited, pid, id_)

    def _exited(self, pid: int, id_: str) -> None:
        try:
            self._unwatch(pid)
            log.debug("%s (pid %d) exited", id_, pid)
        except Exception:  # a reader callback that raises would be called again at once, for ever
            log.exception("watching %s (pid %d)", id_, pid)
        finally:
            self._on_exit(pid, id_)

    def _unwatch(self, pid: int) -> None:
        pidfd = self._pidfds.pop(pid, None)
        if pidfd is not None:
            asyncio.get_running_loop().remove_reader(pidfd)
            os.close(pidfd)

    def close(self) -> None:
        for pid in list(self._pidfds):
            self._unwatch(pid)
