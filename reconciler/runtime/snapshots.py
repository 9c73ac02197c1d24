"""Snapshots of an instance's data dir, kept under the state dir, cheap by hard links.

``<state_dir>/snapshots/<instance id>/<snapshot id>/`` holds ``snapshot.json`` (what it is) and
``data/`` (the data dir's tree as it was). A file unchanged since the previous snapshot of the
same instance (same size, mtime_ns, mode and owner) is a hard link to the previous snapshot's
copy; anything else is copied, its holes kept as holes (``holes.copy_keeping_holes``: a sparse
file an instance made costs no more disk here than in its data dir, and the same goes for a
restore). So the first snapshot costs a full copy and each later one only what changed
(``bench/snapshots.py`` measures both).

What goes in: folders, regular files (opened without following a link, by folder descriptors,
as ``server/backup.py`` reads a data dir for its zip) and symbolic links *as links*: the link's
own target text is recorded with ``os.symlink`` and never followed, so a restore gives back the
tree as it was without ever reading through a link (the zip cannot store a link portably, so it
leaves them out). FIFOs, sockets and devices are left out and listed in ``snapshot.json``.

A snapshot is written into a hidden temporary folder, synced, then renamed into place: a crash
leaves no half snapshot under a snapshot's name (the next ``take`` removes the leftover). Copies
keep their mode, mtime and owner (CST may run as root with each instance under a uid of its own).
Snapshots are root's (0700 folders up to ``data/``): an instance cannot reach its own.

Every operation on one instance's snapshots takes a per-instance lock
(``<state_dir>/snapshots/<id>.lock``), so a prune never removes what a restore is copying and a
take never races another take of the same instance.
"""
from __future__ import annotations

import builtins
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import stat
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from ..desired.model import port_of
from ..files import fsync_dir, private_dir
from . import tree_walk
from .holes import copy_keeping_holes
from .statedir import StateDir

REASONS = ("scheduled", "rollout", "manual")
META = "snapshot.json"
TREE = "data"
LOCK_WAIT = 600.0   # a take of a large data dir may hold an instance's snapshot lock this long
# ids are UTC times to the microsecond: fixed width, so sorting by name is sorting by time
_ID_FORMAT = "%Y%m%dT%H%M%S.%fZ"
_ID = re.compile(r"[0-9]{8}T[0-9]{6}\.[0-9]{6}Z")
# a file changed within this long before the previous snapshot began may have changed again in the
# same timestamp tick after it was copied ("racy git"): it is copied again rather than trusted
_RACY = 2_000_000_000
_TMP_PREFIX = ".tmp-"

_libc = ctypes.CDLL(None, use_errno=True)


class SnapshotNotFound(LookupError):
    """No such snapshot of that instance (or an id that cannot be one)."""


@dataclass(frozen=True)
class Snapshot:
    id: str
    instance: str
    path: Path            # the snapshot's folder; its tree is ``path / "data"``
    taken_at: str         # ISO 8601 UTC
    reason: str           # "scheduled", "rollout" or "manual"
    files: int            # regular files and links recorded
    bytes_total: int      # their apparent size
    bytes_new: int        # the data this snapshot copied (the rest are hard links to the previous
                          # one, or holes, which are kept as holes)

    @property
    def tree(self) -> Path:
        return self.path / TREE


@dataclass
class _Tally:
    files: int = 0
    bytes_total: int = 0
    bytes_new: int = 0


def _check_instance(instance_id: str) -> None:
    if port_of(instance_id) is None:
        raise SnapshotNotFound(f"{instance_id[:60]!r} is not an instance id (like st-instance-8001)")


def valid_snapshot_id(snapshot_id: str) -> bool:
    """Whether ``snapshot_id`` has the shape of our ids (so it names no other path: no separator, no ``..``)."""
    return isinstance(snapshot_id, str) and _ID.fullmatch(snapshot_id) is not None


class Snapshots:
    def __init__(self, state: StateDir, lock_wait: float = LOCK_WAIT):
        self.state = state
        self.lock_wait = lock_wait

    @property
    def root(self) -> Path:
        return self.state.root / "snapshots"

    def folder(self, instance_id: str) -> Path:
        _check_instance(instance_id)
        return self.root / instance_id

    def _lock(self, instance_id: str) -> AbstractContextManager[None]:   # the state dir's lock
        private_dir(self.root)
        return self.state.lock(f"snapshots/{instance_id}", timeout=self.lock_wait)

    # -- reading

    def list(self, instance_id: str) -> builtins.list[Snapshot]:
        """The instance's snapshots, oldest first; none when it has none."""
        folder = self.folder(instance_id)
        try:
            names = sorted(name for name in os.listdir(folder) if valid_snapshot_id(name))
        except FileNotFoundError:
            return []
        found = (self._read(instance_id, folder / name) for name in names)
        return [snapshot for snapshot in found if snapshot is not None]

    def get(self, instance_id: str, snapshot_id: str) -> Snapshot:
        """One snapshot of the instance; SnapshotNotFound when it has none by that id (another
        instance's id, a malformed one or a path are never looked up)."""
        if not valid_snapshot_id(snapshot_id):
            raise SnapshotNotFound(f"{str(snapshot_id)[:60]!r} is not a snapshot id (like 20250101T120000.000000Z)")
        snapshot = self._read(instance_id, self.folder(instance_id) / snapshot_id)
        if snapshot is None:
            raise SnapshotNotFound(f"{instance_id} has no snapshot {snapshot_id}")
        return snapshot

    @staticmethod
    def _read(instance_id: str, path: Path) -> Snapshot | None:
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
            snapshot = Snapshot(id=meta["id"], instance=meta["instance"], path=path, taken_at=meta["taken_at"],
                                reason=meta["reason"], files=meta["files"], bytes_total=meta["bytes_total"],
                                bytes_new=meta["bytes_new"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        # a folder copied or renamed by hand under another instance's name is not that instance's
        if snapshot.id != path.name or snapshot.instance != instance_id or not (path / TREE).is_dir():
            return None
        return snapshot

    def left_out(self, snapshot: Snapshot) -> builtins.list[builtins.list[str]]:
        """What the snapshot did not record: ``[path, why]`` each (FIFOs, sockets, unreadable files)."""
        try:
            return builtins.list(json.loads((snapshot.path / META).read_text(encoding="utf-8")).get("left_out", []))
        except (OSError, ValueError):
            return []

    # -- taking

    def take(self, instance_id: str, data_dir: Path, reason: str) -> Snapshot:
        """Snapshot ``data_dir`` now (blocking). Raises FileNotFoundError when there is no data dir."""
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {', '.join(REASONS)}, not {reason!r}")
        folder = self.folder(instance_id)
        with self._lock(instance_id):
            private_dir(folder)
            self._remove_leftovers(folder)
            previous = self.list(instance_id)
            last = previous[-1] if previous else None
            snapshot_id = self._new_id(last.id if last else None)
            started_ns = time.time_ns()
            tmp = folder / f"{_TMP_PREFIX}{snapshot_id}-{secrets.token_hex(4)}"
            os.mkdir(tmp, 0o700)
            try:
                tally, left_out = _Tally(), builtins.list[builtins.list[str]]()
                linkable = _previous_tree(last, self._started_ns(last))
                _copy_tree(data_dir, tmp / TREE, tally, left_out, linkable)
                taken_at = datetime.fromtimestamp(started_ns / 1e9, timezone.utc).isoformat(timespec="seconds")
                meta = {"id": snapshot_id, "instance": instance_id, "taken_at": taken_at, "reason": reason,
                        **asdict(tally), "started_ns": started_ns, "source": str(data_dir),
                        "left_out": left_out}
                _write_new(tmp / META, json.dumps(meta, indent=2).encode(), 0o600)
                _syncfs(tmp)   # one sync of the filesystem, not one fsync a file
                os.rename(tmp, folder / snapshot_id)
                fsync_dir(folder)
            except BaseException:
                _remove_tree(tmp)
                raise
        snapshot = self._read(instance_id, folder / snapshot_id)
        assert snapshot is not None, "a snapshot just written reads back"
        return snapshot

    @staticmethod
    def _new_id(last: str | None) -> str:
        """Now, to the microsecond; after ``last`` even when the clock went back or two come in
        one microsecond, so names sort as snapshots were taken."""
        now = datetime.now(timezone.utc)
        if last is not None:
            after = datetime.strptime(last, _ID_FORMAT).replace(tzinfo=timezone.utc) + timedelta(microseconds=1)
            now = max(now, after)
        return now.strftime(_ID_FORMAT)

    @staticmethod
    def _started_ns(snapshot: Snapshot | None) -> int:
        if snapshot is None:
            return 0
        try:
            return int(json.loads((snapshot.path / META).read_text(encoding="utf-8"))["started_ns"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0   # nothing can be trusted as unchanged: every file is copied

    @staticmethod
    def _remove_leftovers(folder: Path) -> None:
        """Half snapshots of a take that crashed (ours alone: no user data is only there)."""
        for name in os.listdir(folder):
            if name.startswith(_TMP_PREFIX):
                _remove_tree(folder / name)

    # -- pruning

    def prune(self, instance_id: str, keep: int) -> builtins.list[str]:
        """Remove the oldest snapshots beyond the ``keep`` newest, whatever their reason (every
        snapshot counts against ``keep``, so the disk used stays bounded); the ids removed."""
        if keep < 1:
            raise ValueError("keep must be at least 1: the newest snapshot is never pruned")
        with self._lock(instance_id):
            snapshots = self.list(instance_id)
            removed = [s.id for s in snapshots[: max(0, len(snapshots) - keep)]]
            for snapshot_id in removed:
                _remove_tree(self.folder(instance_id) / snapshot_id)
        return removed

    # -- putting back

    def put_back(self, instance_id: str, snapshot_id: str, data_dir: Path, archive_dir: Path) -> Path | None:
        """Make ``data_dir`` the snapshot's tree again; the instance must be stopped (the caller's
        job). The current data dir, if any, moves into ``archive_dir`` as
        ``<id>-replaced-<stamp>`` (never deleted); where it went is returned.

        The tree is copied (not linked: the snapshot must stay as it is while the instance writes)
        into a folder beside the data dir, then exchanged with it in one atomic rename, so at no
        instant is there no data dir or half of one."""
        with self._lock(instance_id):
            snapshot = self.get(instance_id, snapshot_id)
            staging = data_dir.with_name(f".{data_dir.name}.restoring-{secrets.token_hex(4)}")
            try:
                _copy_tree(snapshot.tree, staging, _Tally(), [], None)
                _syncfs(staging)
                replaced = _swap_in(staging, data_dir)
            except BaseException:
                _remove_tree(staging)
                raise
        if replaced is None:
            return None
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = archive_dir / f"{instance_id}-replaced-{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = archive_dir / f"{instance_id}-replaced-{stamp}-{n}"
        private_dir(archive_dir)
        shutil.move(str(replaced), str(target))   # a rename on one filesystem; copy then delete across
        return target


# -- the tree walk


def _previous_tree(last: Snapshot | None, started_ns: int) -> Callable[[str], tuple[str, os.stat_result] | None]:
    """For a relative path: the previous snapshot's copy and its stat, when it may be linked to."""
    def lookup(relative: str) -> tuple[str, os.stat_result] | None:
        if last is None or not started_ns:
            return None
        copy = os.path.join(last.tree, relative)
        try:
            st = os.lstat(copy)
        except OSError:
            return None
        return (copy, st) if stat.S_ISREG(st.st_mode) and st.st_mtime_ns < started_ns - _RACY else None
    return lookup


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_mode, a.st_uid, a.st_gid) == (b.st_size, b.st_mtime_ns, b.st_mode,
                                                                       b.st_uid, b.st_gid)


def _copy_tree(source: Path, target: Path, tally: _Tally, left_out: list[list[str]],
               linkable: Callable[[str], tuple[str, os.stat_result] | None] | None) -> None:
    """Copy ``source`` (a folder, never entered through a link) to ``target`` (created here).

    Folders are walked by descriptor (``os.fwalk``), files opened with ``O_NOFOLLOW``: a link
    swapped in during the walk leads nowhere. With ``linkable``, a file unchanged since the
    previous snapshot becomes a hard link to its copy there."""
    root_st = os.lstat(source)
    if not stat.S_ISDIR(root_st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a folder (a link is never followed)", str(source))
    os.mkdir(target, 0o700)
    folders: list[tuple[str, os.stat_result]] = [("", root_st)]
    def unreadable(exc: OSError) -> None:
        relative = os.path.relpath(str(exc.filename), source)
        left_out.append([relative + "/", f"not readable ({exc.strerror})"])

    for top, dirs, files, top_fd in tree_walk.fwalk(source, onerror=unreadable):
        relative_top = os.path.relpath(top, source)
        relative_top = "" if relative_top == "." else relative_top
        out_top = os.path.join(target, relative_top)
        for name in dirs:
            relative = os.path.join(relative_top, name)
            try:
                st = os.stat(name, dir_fd=top_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):   # fwalk lists a link to a folder among the folders
                _copy_link(name, top_fd, os.path.join(out_top, name), st, tally)
                continue
            os.mkdir(os.path.join(out_top, name), 0o700)
            folders.append((relative, st))
        for name in files:
            relative = os.path.join(relative_top, name)
            try:
                st = os.stat(name, dir_fd=top_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue   # gone since the folder was listed: it is not part of the data any more
            why = _file(name, top_fd, os.path.join(out_top, name), relative, st, tally, linkable)
            if why:
                left_out.append([relative, why])
    # folders last, deepest first: their mode may forbid writing into them, their times change as they fill
    for relative, st in reversed(folders):
        path = os.path.join(target, relative) if relative else str(target)
        _own(path, st)
        os.chmod(path, stat.S_IMODE(st.st_mode))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _file(name: str, dir_fd: int, out: str, relative: str, st: os.stat_result, tally: _Tally,
          linkable: Callable[[str], tuple[str, os.stat_result] | None] | None) -> str | None:
    """Record one entry that is not a folder; why it was left out, or None."""
    if stat.S_ISLNK(st.st_mode):
        _copy_link(name, dir_fd, out, st, tally)
        return None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device")
        return f"{kind}, not a regular file"
    previous = linkable(relative) if linkable else None
    if previous is not None and _same(st, previous[1]):
        try:
            os.link(previous[0], out)
        except OSError as exc:
            if exc.errno != errno.EMLINK:   # a file linked the most times the filesystem allows: copy it
                raise
        else:
            tally.files += 1
            tally.bytes_total += st.st_size
            return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except PermissionError:
        return "not readable (permission denied)"
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:   # became a link since it was listed
            return "a symbolic link (not followed)"
        raise
    try:
        read_st = os.fstat(fd)
        if not stat.S_ISREG(read_st.st_mode):
            return "not a regular file"
        written = _copy_fd(fd, out, read_st)
    finally:
        os.close(fd)
    tally.files += 1
    tally.bytes_total += read_st.st_size
    tally.bytes_new += written
    return None


def _copy_fd(fd: int, out: str, st: os.stat_result) -> int:
    """Copy an open file of ``st.st_size`` bytes to a new file ``out`` with its mode, owner and
    times, its holes kept as holes (a ``truncate -s 1T`` file costs its snapshot no disk); the
    bytes written."""
    target = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        written = copy_keeping_holes(fd, target, st.st_size)
        if os.geteuid() == 0:
            os.fchown(target, st.st_uid, st.st_gid)
        os.fchmod(target, stat.S_IMODE(st.st_mode))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(target)
    return written


def _copy_link(name: str, dir_fd: int, out: str, st: os.stat_result, tally: _Tally) -> None:
    """The link itself (its target's text), never what it points at."""
    os.symlink(os.readlink(name, dir_fd=dir_fd), out)
    if os.geteuid() == 0:
        os.lchown(out, st.st_uid, st.st_gid)
    tally.files += 1


def _own(path: str, st: os.stat_result) -> None:
    if os.geteuid() == 0:
        os.lchown(path, st.st_uid, st.st_gid)


# -- small filesystem helpers


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path`` (Linux syncfs), so what is renamed into place is on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if getattr(_libc, "syncfs", None) is None or _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _swap_in(staging: Path, data_dir: Path) -> Path | None:
    """Put ``staging`` at ``data_dir``; the folder it displaced (now at ``staging``'s name), or None."""
    if not os.path.lexists(data_dir):
        os.rename(staging, data_dir)
        fsync_dir(data_dir.parent)
        return None
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is not None and renameat2(_AT_FDCWD, os.fsencode(staging), _AT_FDCWD,
                                           os.fsencode(data_dir), _RENAME_EXCHANGE) == 0:
        fsync_dir(data_dir.parent)
        return staging
    # no atomic exchange here: two renames, the data dir missing for the instant between them
    aside = data_dir.with_name(f".{data_dir.name}.replaced-{secrets.token_hex(4)}")
    os.rename(data_dir, aside)
    os.rename(staging, data_dir)
    fsync_dir(data_dir.parent)
    return aside


def _remove_tree(path: Path) -> None:
    """Remove a snapshot's folder (ours), including read-only folders copied from a data dir, at
    whatever depth the data dir had."""
    if os.path.lexists(path):
        tree_walk.remove(path)
