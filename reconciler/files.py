"""Atomic file replacement (optionally conditional): the one way CST writes a file it keeps."""
from __future__ import annotations

import ctypes
import errno
import os
import secrets
from pathlib import Path
from typing import Callable

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOENT, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644,
                 replaces: Callable[[bytes], bool] | None = None) -> bool:
    """Replace ``path`` with ``data``: readers see the old or the new content, never a mix.

    With ``replaces``, the write happens only if the content it replaces passes that test, so
    a version someone else wrote meanwhile is never overwritten. The swap and the test are one
    atomic exchange where Linux offers it; elsewhere a last look just before the rename.
    Returns whether ``path`` now holds ``data``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask
        if replaces is None:
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            if not replaces(tmp.read_bytes()):  # tmp now holds what was there: not what we expected
                _exchange(tmp, path)           # give the newer version back
                tmp.unlink()
                return False
            tmp.unlink()
        else:
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                current = b""
            if not replaces(current):
                tmp.unlink()
                return False
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return True
