"""How much disk each instance's data dir really uses, and where ``cst serve`` keeps the figures.

Real use is what the filesystem allocated (``st_blocks * 512``), not the files' apparent sizes:
a sparse file an instance made with ``truncate -s 1T`` costs next to nothing, and a folder full
of small files costs more than their bytes. Each inode is counted once per data dir, so a file
hard-linked twice inside one data dir is counted once. Links are never followed (folders are
walked by descriptor), so a link to ``/`` costs the link.

Walking a data dir reads every inode of it: at a thousand instances that is seconds to minutes
of I/O, so nothing that answers a request walks. ``cst serve`` walks them on a worker thread
every few minutes and after starts (``server/disk_watch.py``), keeps the figures in memory for
the API, the page and the metrics, and writes them to ``<state_dir>/disk-use.json``, which
``cst status`` reads while it is fresh (and walks itself only without it).
"""
from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..desired.model import DesiredState
from ..files import atomic_write
from . import tree_walk
from .statedir import StateDir

CACHE = "disk-use.json"
REFRESH_EVERY = 300.0   # cst serve's walks: disk use creeps, and a walk of 1,000 data dirs is not free
FRESH_FOR = 3 * REFRESH_EVERY   # saved figures older than this were not kept by a running cst serve
BLOCK = 512   # st_blocks counts 512-byte units whatever the filesystem's block size


def allocated(root: Path) -> int | None:
    """Bytes allocated to the folder ``root`` and everything under it, each inode once; None when
    there is no such folder (a data dir not made yet). An entry that vanishes meanwhile is not
    counted; any other error (an unreadable folder) raises, as a figure missing a part would lie."""
    try:
        root_st = os.lstat(root)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(root_st.st_mode):
        return None
    total = root_st.st_blocks * BLOCK
    linked: set[tuple[int, int]] = set()   # inodes with several names, counted at the first

    def failed(exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):
            raise exc

    for _, dirs, files, top_fd in tree_walk.fwalk(root, onerror=failed):
        for name in (*dirs, *files):
            try:
                st = os.stat(name, dir_fd=top_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in linked:
                    continue
                linked.add((st.st_dev, st.st_ino))
            total += st.st_blocks * BLOCK
    return total


def data_dirs(desired: DesiredState, state: StateDir) -> dict[str, Path]:
    """Each instance's data dir: the declared ones, then undeclared ones CST still has a record of
    (the same instances the API lists)."""
    dirs = {spec.id: desired.data_dir(spec.port) for spec in desired.instances}
    for id_, record in sorted(state.records().items()):
        dirs.setdefault(id_, desired.data_dir(record.port))
    return dirs


@dataclass
class Measured:
    """One walk of every data dir."""

    use: dict[str, int | None] = field(default_factory=dict)   # id -> bytes (None: no data dir)
    failed: dict[str, OSError] = field(default_factory=dict)   # id -> why its walk failed
    at: float = field(default_factory=time.time)               # when the walk began (epoch seconds)


def measure(dirs: dict[str, Path]) -> Measured:
    """Walk each data dir (blocking); one that cannot be walked is in ``failed``, not ``use``."""
    measured = Measured()
    for id_, path in dirs.items():
        try:
            measured.use[id_] = allocated(path)
        except OSError as exc:   # nested too deep among them (tree_walk)
            measured.failed[id_] = exc
    return measured


def save(state: StateDir, use: dict[str, int | None], at: float) -> None:
    """Keep the figures for ``cst status``: root's alone, as the rest of the state dir."""
    atomic_write(state.root / CACHE, json.dumps({"at": at, "use": use}).encode())


def current(desired: DesiredState, state: StateDir) -> dict[str, int | None]:
    """Each instance's disk use for ``cst status``: what a running ``cst serve`` saved, and a walk
    of the data dirs it has no figure of (all of them without a ``cst serve``)."""
    dirs = data_dirs(desired, state)
    use = saved(state, FRESH_FOR) or {}
    missing = {id_: path for id_, path in dirs.items() if id_ not in use}
    measured = measure(missing)
    return {id_: use[id_] if id_ in use else measured.use.get(id_) for id_ in dirs}


def saved(state: StateDir, max_age: float) -> dict[str, int | None] | None:
    """The figures ``cst serve`` saved, when they are younger than ``max_age`` seconds."""
    try:
        document = json.loads((state.root / CACHE).read_text(encoding="utf-8"))
        at, use = float(document["at"]), document["use"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(use, dict) or time.time() - at > max_age:
        return None
    return {str(id_): n if isinstance(n, int) else None for id_, n in use.items()}
