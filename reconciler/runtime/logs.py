"""Instance logs: owner-only, capped in place, and their last lines for error messages.

An instance writes its log through an O_APPEND descriptor it keeps for life (and it may outlive
this CST), so a log is capped in place, never renamed. ``rotate_log`` copies a block-aligned
prefix of the log to ``.1`` and then cuts exactly that prefix off the live file with
``fallocate(FALLOC_FL_COLLAPSE_RANGE)``: the kernel does that under the inode lock appends take,
so a line written meanwhile lands after the cut and stays. Only where the filesystem cannot
collapse (tmpfs, ext4 without extents) is the log copied and truncated, with a window of a few
microseconds in which an appended line is lost. Two CSTs (``cst apply`` and ``cst serve``) take
turns through an exclusive ``flock`` on the log; followers (``logfollow``) take it shared, so they
never see a copy without its cut.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import BinaryIO

from ..files import fsync_dir, tighten

LOG_MODE = 0o600  # a log holds what users typed into their chats
LOCK_WAIT = 2.0   # seconds a rotator waits for another to finish before leaving it to the next pass
FALLOC_FL_COLLAPSE_RANGE = 0x08  # linux/falloc.h; Python's os.posix_fallocate takes no flags
_COPY_CHUNK = 1 << 20

log = logging.getLogger("cst.logs")
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int
_said_fallback = False


def open_log(path: Path) -> BinaryIO:
    """``path`` opened for appending, created owner-only (an existing log is tightened, never loosened)."""
    # returned open: the caller writes the log through it (an instance's stdout) and closes it
    log_file = open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_MODE), "ab")  # noqa: SIM115
    tighten(path, LOG_MODE)
    return log_file


def generation(path: Path, n: int) -> Path:
    """The ``n``-th rotated copy of ``path`` (``<id>.log.1`` is the newest)."""
    return path.with_name(f"{path.name}.{n}")


def rotate_log(path: Path, max_bytes: int, keep: int) -> bool:
    """Cap a log that running processes append to, losing none of their lines: when it is over
    ``max_bytes``, move its content to ``.1`` (shifting older copies up to ``.keep``) and cut it
    from the live file in place, so writers' O_APPEND descriptors carry on in the same file.
    True when this call rotated; False when the log is within its cap, missing, or another
    process held it for longer than ``LOCK_WAIT`` (it was rotating it: the next pass looks again)."""
    try:
        if path.stat().st_size <= max_bytes:  # the common case, without opening or locking
            return False
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if not _lock(fd):
            return False
        # asked again under the lock: another rotator may have just handled this very overflow
        size = os.fstat(fd).st_size
        if size <= max_bytes:
            return False
        _rotate_locked(path, fd, size, keep)
        return True
    finally:
        os.close(fd)  # also releases the lock


def _lock(fd: int) -> bool:
    """An exclusive flock on the live log, waiting at most ``LOCK_WAIT`` (flock has no timeout)."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


def _rotate_locked(path: Path, fd: int, size: int, keep: int) -> None:
    for n in range(keep - 1, 0, -1):
        older = generation(path, n)
        if older.exists():
            os.replace(older, generation(path, n + 1))
    out = None
    if keep > 0:
        out = os.open(generation(path, 1), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, LOG_MODE)
    try:
        if out is not None:
            tighten(generation(path, 1), LOG_MODE)
        # The cut must be whole filesystem blocks and end before the end of file (ext4 and xfs
        # refuse anything else); the bytes past it stay in the live file.
        block = os.fstatvfs(fd).f_bsize or 4096
        cut = (size - 1) // block * block
        copied = _copy(fd, out, 0, cut) if out is not None else cut
        if cut and copied == cut:
            if out is not None:
                os.fsync(out)  # the copy is on disk before its bytes leave the live file
                fsync_dir(path.parent)
            if _collapse(fd, cut):
                return
        _copy_and_truncate(fd, out, copied)
    finally:
        if out is not None:
            os.close(out)


def _copy(src: int, out: int | None, start: int, end: int | None) -> int:
    """Copy ``src`` from ``start`` to ``end`` (None: to its current end) onto ``out``; the offset reached."""
    pos = start
    while end is None or pos < end:
        want = _COPY_CHUNK if end is None else min(_COPY_CHUNK, end - pos)
        data = os.pread(src, want, pos)
        if not data:
            break
        if out is not None:
            view = memoryview(data)
            while view:
                view = view[os.write(out, view):]
        pos += len(data)
    return pos


def _collapse(fd: int, length: int) -> bool:
    """Remove the first ``length`` bytes of the file in place; False where the filesystem cannot."""
    if _fallocate is not None and _fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, length) == 0:
        return True
    code = ctypes.get_errno() if _fallocate is not None else errno.ENOSYS
    if code in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
        _say_fallback(code)
        return False
    raise OSError(code, f"collapsing the first {length} bytes of a log: {os.strerror(code)}")


def _copy_and_truncate(fd: int, out: int | None, copied: int) -> None:
    """The fallback where nothing can be cut losslessly (a filesystem without COLLAPSE_RANGE, or a
    log shorter than one block): copy to the end, then truncate. A line appended between the last
    read and the truncate is lost, so that window is kept to two syscalls: the slow fsync comes
    before a last catch-up copy, and the bytes of that catch-up are synced after the truncate."""
    if out is None:  # keep: 0, nothing to copy
        os.ftruncate(fd, 0)
        return
    copied = _copy(fd, out, copied, None)
    os.fsync(out)
    _copy(fd, out, copied, None)
    os.ftruncate(fd, 0)
    os.fsync(out)


def _say_fallback(code: int) -> None:
    global _said_fallback
    if not _said_fallback:
        _said_fallback = True
        log.info("logs: this filesystem cannot cut a log in place (fallocate COLLAPSE_RANGE: %s); "
                 "rotation copies and truncates, and a line written at that instant may be lost",
                 os.strerror(code))


def tail(path: Path, lines: int = 12) -> str:
    """The last ``lines`` lines of a log (at most its last 8 KiB), or "(no log)"."""
    try:
        with open(path, "rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            log_file.seek(max(0, log_file.tell() - 8192))
            text = log_file.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
