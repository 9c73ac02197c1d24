"""How CST writes files: atomic replacement, replacement that never discards someone else's save,
and owner-only modes that are only ever tightened."""
from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def tighten(path: Path, mode: int) -> None:
    """Take away every permission of ``path`` that ``mode`` does not grant; never add one
    (an operator's tighter choice stays)."""
    current = stat.S_IMODE(path.stat().st_mode)
    if current & ~mode:
        os.chmod(path, current & mode)


def private_dir(path: Path, mode: int = 0o700) -> Path:
    """``path`` as a folder only its owner can enter (created if missing, tightened if looser)."""
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    tighten(path, mode)
    return path


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOENT, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def fsync_dir(path: Path) -> None:
    """Make the entries of ``path`` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_beside(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> Path:
    """A durable temporary file holding ``data`` in ``path``'s folder, with exactly ``mode``, owned
    by ``owner`` (uid, gid) when given. Created exclusively: a link planted under its name in a
    folder someone else may write is refused, never followed."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            if owner is not None:
                os.fchown(out.fileno(), *owner)
            os.fchmod(out.fileno(), mode)  # after the owner, and exactly: O_CREAT's mode is filtered by the umask
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: Path, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data``: readers see the old or the new content, never a mix;
    ``owner``: the (uid, gid) the file belongs to, when not CST's own user."""
    tmp = _temp_beside(path, data, mode, owner)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def create_once(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Put ``data`` at ``path`` unless something is there already (then False): of two writers at
    once, one wins whole, and the other finds its content (a hard link never replaces a file)."""
    tmp = _temp_beside(path, data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def swap(path: Path, data: bytes, mode: int) -> bytes | None:
    """Put ``data`` at ``path`` atomically and return the content it displaced (None if none).

    The displaced file is read from where the exchange put it, so whatever was there at the
    instant of the swap is known, even a save that landed a moment before. Where Linux's
    exchange is unavailable, the content is read just before a plain rename (a short window)."""
    tmp = _temp_beside(path, data, mode)
    try:
        if exchange(tmp, path):
            displaced = tmp.read_bytes()
            tmp.unlink()
        else:
            try:
                displaced = path.read_bytes()
            except FileNotFoundError:
                displaced = None
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return displaced


def conditional_replace(path: Path, data: bytes, expected: bytes, mode: int) -> bool:
    """Write ``data`` only over the version ``expected``; True when written.

    If ``path`` holds anything else at the instant of the atomic exchange, that file is put
    back (and so is any save that lands while it is put back): nothing someone saved is lost.
    """
    tmp = _temp_beside(path, data, mode)
    try:
        ours = tmp.stat().st_ino
        if not exchange(tmp, path):
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                current = None
            if current != expected:
                tmp.unlink()
                return False
            os.replace(tmp, path)
            fsync_dir(path.parent)
            return True
        if tmp.read_bytes() == expected:
            tmp.unlink()
            fsync_dir(path.parent)
            return True
        _put_back(tmp, path, ours)
        return False
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _put_back(held: Path, path: Path, ours: int) -> None:
    """``held`` has a save our exchange displaced: put it back in place of our file.

    Each exchange hands back what was at ``path`` at that instant: our file (done), a save
    older than one already put back (superseded, as a later save replaces an earlier one:
    done), or a save newer still (put that back instead, and look again)."""
    superseded = {held.stat().st_ino}
    while True:
        exchange(held, path)
        back = held.stat().st_ino
        if back == ours or back in superseded:
            held.unlink()
            fsync_dir(path.parent)
            return
        superseded.add(back)
