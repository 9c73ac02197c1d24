"""Each SillyTavern instance under a user of its own, when CST runs as root.

SillyTavern runs server plugins and third-party extensions: one compromised instance must not
read CST's state dir (the admin key, account passwords, every instance's proxy key), another
instance's data, or CST's environment in ``/proc``. When CST runs as root (and
``settings.sillytavern.users.isolate`` is true, the default), instance ``st-instance-<port>``
runs as uid and gid ``users.uid_from + port`` (2000008001 for port 8001 with the default
``uid_from``), with no supplementary groups. These ids need no ``/etc/passwd`` entry: CST creates
no account and leaves none behind. An entry an operator gave such a uid (to see a name in ``ps``)
must be named ``cst-…``; a uid that belongs to anybody else is refused.

The instance owns its data dir and its workdir (``<state_dir>/run/<id>``: config.yaml, and a
0400 copy of its proxy key, ``proxy.key``) and nothing else. For it to reach them, the state
dir, its ``run`` folder and the data root gain the search bit for others (``o+x``: enter by
name, never list); everything else in the state dir stays root's alone. The release and node
must be readable by others on every folder of their path; a start that could not reach one says
which folder stops it.

When CST is not root, every instance runs as CST's user, as before; CST says so once.
"""
from __future__ import annotations

import ctypes
import logging
import os
import pwd
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..desired.model import UserSettings
from ..files import atomic_write
from . import tree_walk
from .base import StartFailed

log = logging.getLogger("cst.runtime")
NAME_PREFIX = "cst-"     # the only names an operator may give an instance's uid
_said_shared = False


@dataclass(frozen=True)
class InstanceUser:
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"uid {self.uid}"


def isolating(users: UserSettings) -> bool:
    """Whether instances run under users of their own: CST is root and the file does not opt out."""
    return os.geteuid() == 0 and users.isolate


def user_for(users: UserSettings, port: int) -> InstanceUser | None:
    """The user instance ``port`` runs as; None when it runs as CST's own (said once per process)."""
    global _said_shared
    if not isolating(users):
        if not _said_shared:
            _said_shared = True
            why = ("settings.sillytavern.users.isolate is false" if os.geteuid() == 0
                   else "cst does not run as root")
            log.info("instances run as cst's own user (%s): each can read the state dir and the others' data", why)
        return None
    uid = users.uid_of(port)
    return InstanceUser(uid, uid)


def _mapped(uid: int) -> bool:
    """Whether this user namespace can run processes as ``uid``."""
    try:
        lines = Path("/proc/self/uid_map").read_text().splitlines()
    except OSError:
        return True
    for line in lines:
        inside, _, count = (int(n) for n in line.split())
        if inside <= uid < inside + count:
            return True
    return False


def check_usable(user: InstanceUser, port: int) -> None:
    """Raise StartFailed when the uid is somebody else's or outside this user namespace."""
    if not _mapped(user.uid):
        raise StartFailed(
            f"uid {user.uid} (settings.sillytavern.users.uid_from + {port}) does not exist in this user "
            f"namespace (/proc/self/uid_map): choose a uid_from that fits, or users.isolate: false")
    try:
        owner = pwd.getpwuid(user.uid).pw_name
    except KeyError:
        return
    if not owner.startswith(NAME_PREFIX):
        raise StartFailed(
            f"uid {user.uid} (settings.sillytavern.users.uid_from + {port}) is the user {owner!r}: "
            f"an instance runs only as a uid of its own; choose another uid_from")


def _allows(st: os.stat_result, user: InstanceUser, need: int) -> bool:
    """Whether ``user`` has the ``need`` bits (4 r, 2 w, 1 x) on a file with ``st``."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == user.uid:
        bits = mode >> 6
    elif st.st_gid == user.gid:
        bits = mode >> 3
    else:
        bits = mode
    return bits & need == need


def unreachable(user: InstanceUser, path: Path, need: int) -> str | None:
    """Why ``user`` cannot use ``path`` (``need``: 4 read, 1 execute, 5 both), else None: every
    folder above it must let the user search it (mode bits, not ACLs)."""
    path = Path(os.path.abspath(path))
    for folder in reversed(path.parents):
        try:
            st = os.stat(folder)
        except OSError as exc:
            return f"{folder}: {exc.strerror}"
        if not _allows(st, user, 1):
            return (f"{folder} (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}) does not let "
                    f"others search it, so {user} cannot reach {path}")
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not _allows(st, user, need):
        what = {4: "read", 1: "run", 5: "read and run"}.get(need, "use")
        return f"{user} may not {what} {path} (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid})"
    return None


def searchable(path: Path) -> None:
    """Let others enter ``path`` by name (``o+x``) without listing it; no other bit changes."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if not mode & stat.S_IXOTH:
        os.chmod(path, mode | stat.S_IXOTH)


def own_tree(root: Path, user: InstanceUser) -> int:
    """Give ``root`` and everything under it to ``user`` (symlinks themselves, never what they
    point at; by folder descriptors, so a folder swapped for a link mid-walk is not followed).
    How many entries changed owner.

    A regular file with more than one link that is not already the user's is left as it is, and
    logged: the other link may be anywhere on the filesystem (a hard link the instance planted to
    ``/etc/shadow`` or CST's admin key), and chowning it would hand that file to the instance. It
    runs before the instance starts, so nothing of the user's swaps an entry between the look and
    the chown."""
    changed = 0
    shared: list[str] = []

    def own(name: str, dir_fd: int | None, shown: str) -> None:
        nonlocal changed
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (st.st_uid, st.st_gid) == (user.uid, user.gid):
            return
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            shared.append(shown)
            return
        os.chown(name, user.uid, user.gid, dir_fd=dir_fd, follow_symlinks=False)
        changed += 1

    own(str(root), None, str(root))
    for top, dirs, files, fd in tree_walk.fwalk(root):
        for name in (*dirs, *files):
            own(name, fd, os.path.join(top, name))
    if shared:
        log.warning("%s: left %d file(s) with more than one link to their owner, not given to %s (a hard "
                    "link may lead anywhere): %s", root, len(shared), user, ", ".join(shared[:5]) +
                    (", ..." if len(shared) > 5 else ""))
    return changed


_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def acting_as(user: InstanceUser | None) -> Iterator[None]:
    """Within the block, this thread reads and writes files as ``user`` (Linux's fsuid/fsgid,
    which are per thread): what CST writes into an instance's own folders is the instance's, and a
    link the instance planted there cannot lead a write of root's anywhere else. Nothing else
    (signals, the process's other threads) changes. Keep the block free of awaits: another
    coroutine on this loop would act as ``user`` too."""
    if user is None:
        yield
        return
    old_gid = _libc.setfsgid(user.gid)
    old_uid = _libc.setfsuid(user.uid)
    try:
        if _libc.setfsuid(user.uid) != user.uid or _libc.setfsgid(user.gid) != user.gid:
            raise OSError(f"could not act as {user} (setfsuid)")
        yield
    finally:
        _libc.setfsuid(old_uid)   # back to root first: setting the fsgid back needs root's capability
        _libc.setfsgid(old_gid)


@contextmanager
def acting_in(user: InstanceUser | None, *folders: Path) -> Iterator[tuple[Path, ...]]:
    """``acting_as(user)`` on the files of ``folders``, reached without the search bit on the
    folders above them (they may be root's alone: a sandboxed instance's data dir, a release in
    root's home): each is opened as root first, and the block gets a path through that descriptor
    (``/proc/self/fd/N``, which this process may always follow to its own descriptors), in the same
    order. The folders themselves, unchanged, when ``user`` is None. Keep the block free of awaits,
    as for ``acting_as``."""
    if user is None:
        yield folders
        return
    fds: list[int] = []
    try:
        for folder in folders:
            fds.append(os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC))
        with acting_as(user):
            yield tuple(Path(f"/proc/self/fd/{fd}") for fd in fds)
    finally:
        for fd in fds:
            os.close(fd)


def write_owned(path: Path, data: bytes, user: InstanceUser | None, mode: int) -> None:
    """Replace ``path`` atomically with a file holding ``data`` with ``mode``, owned by ``user``
    (by CST's own user when None). The folder may be the user's: ``atomic_write`` creates its
    temporary file exclusively (a link planted under its name is refused, not followed)."""
    atomic_write(path, data, mode, (user.uid, user.gid) if user is not None else None)
