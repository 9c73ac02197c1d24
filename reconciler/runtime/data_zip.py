"""A zip of an instance's data dir, produced while it is sent: never built in memory or on disk.

What goes in: regular files only, each opened without following a link (``O_NOFOLLOW``, and
folders walked by descriptor, so a link swapped in during the walk leads nowhere) and without
blocking (``O_NONBLOCK``: a FIFO is seen for what it is, not waited on). Everything left out
(links, FIFOs, sockets, unreadable or vanished files, unreadable folders) is named with the
reason in a manifest, the zip's last entry. Times before 1980, which zip cannot store, are
stored as 1980-01-01.

Sparse files are left out too, named in the manifest with their size and how much of it is data.
A file's holes use no disk but read as zeros: an instance's ``truncate -s 1T`` would make this
zip stream a terabyte (deflated, still ~1 GB and hours of a core), and whoever unzips it gets the
terabyte written out as zeros. Reading holes as zeros up to a cap was the other choice; it was
not taken because the file would then come back from the zip cut short or not come back at all,
silently, and SillyTavern never writes a sparse file: one in a data dir was made by hand (or by
an extension misbehaving), and the manifest saying so is the useful answer. A file with up to
``SPARSE_HOLES_MAX`` in holes (preallocated tails some filesystems leave) is zipped whole, its
zeros being cheap; whether a file has holes at all is read from its allocated blocks first, so
the ordinary file costs no extra system call.

Why the standard library's ``zipfile`` and not zipstream-ng: ``zipfile`` already streams to an
unseekable writer (sizes go in data descriptors), and every entry here is written from a
descriptor this module opened and checked itself; zipstream-ng's own path walking opens by
name, so it would be fed the same descriptors, and its one extra -- the total size known in
advance -- cannot hold for a data dir that SillyTavern writes while the zip is made.
"""
from __future__ import annotations

import asyncio
import errno
import os
import queue
import stat
import threading
import time
import zipfile
from pathlib import Path
from typing import AsyncIterator

from ..runtime import tree_walk
from ..runtime.holes import hole_bytes

MANIFEST = "CST-BACKUP-MANIFEST.txt"
_CHUNK_QUEUE = 8      # chunks in flight between the zipping thread and the socket
_READ = 1 << 20
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_ZIP_LAST = (2107, 12, 31, 23, 59, 58)
# what the zipping thread hands the reader: bytes, the error that ended it, or None once it is done
_Item = bytes | BaseException | None
_LINK = "a symbolic link (not followed)"
SPARSE_HOLES_MAX = 1 << 20   # bytes of holes a zipped file may hold (see the module's docstring)


class _QueueWriter:
    """A write-only, unseekable file object that hands what zipfile writes to a queue."""

    def __init__(self, out: queue.Queue[_Item], cancelled: threading.Event):
        self.out, self.cancelled = out, cancelled
        self.written = 0

    def write(self, data: bytes) -> int:
        if self.cancelled.is_set():
            raise _Cancelled
        if data:
            self.out.put(bytes(data))
            self.written += len(data)
        return len(data)

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        pass

    def close(self) -> None:   # the queue is ended by the reader's side
        pass


class _Cancelled(Exception):
    """The reader went away: stop zipping."""


class _Skip(Exception):
    """A file left out of the zip; the message is the reason shown in the manifest."""


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return _LINK
    if exc.errno == errno.ENOENT:
        return "removed while the backup ran"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "not readable (permission denied)"
    return f"not readable ({exc.strerror or exc})"


def _open_regular(name: str, folder_fd: int) -> tuple[int, os.stat_result]:
    """A descriptor of ``name`` in ``folder_fd`` if it is a regular file; _Skip otherwise."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder_fd)
    except OSError as exc:
        raise _Skip(_reason(exc)) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device"
        raise _Skip(f"{kind}, not a regular file")
    try:
        sparse = _sparse(fd, info)
    except OSError:
        os.close(fd)
        raise
    if sparse:
        os.close(fd)
        raise _Skip(sparse)
    return fd, info


def _sparse(fd: int, info: os.stat_result) -> str | None:
    """Why the open regular file is left out for its holes, or None when it is zipped."""
    if info.st_blocks * 512 >= info.st_size:   # as much disk as its size: no hole worth counting
        return None
    holes = hole_bytes(fd, info.st_size)
    os.lseek(fd, 0, os.SEEK_SET)   # counting moved the offset the zip reads from
    if holes <= SPARSE_HOLES_MAX:
        return None
    return (f"a sparse file ({_mib(info.st_size)}, {_mib(info.st_size - holes)} of it data): its holes "
            f"would be zipped, and unzipped, as zeros")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _unenterable(name: str, folder_fd: int) -> str | None:
    """Why the folder ``name`` in ``folder_fd`` cannot be walked into, or None if it can."""
    try:
        if stat.S_ISLNK(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode):
            return _LINK
        os.close(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd))
    except OSError as exc:
        return _reason(exc)
    return None


def _entry(arcname: str, info: os.stat_result) -> zipfile.ZipInfo:
    when = time.localtime(info.st_mtime)[:6]
    entry = zipfile.ZipInfo(arcname, date_time=min(max(when, _ZIP_EPOCH), _ZIP_LAST))
    entry.compress_type = zipfile.ZIP_DEFLATED
    entry.external_attr = (info.st_mode & 0xFFFF) << 16
    entry.file_size = info.st_size
    return entry


def _add(archive: zipfile.ZipFile, fd: int, entry: zipfile.ZipInfo) -> None:
    with os.fdopen(fd, "rb", closefd=True) as source, \
            archive.open(entry, "w", force_zip64=entry.file_size > 1 << 30) as target:
        while chunk := source.read(_READ):
            target.write(chunk)


def _zip(root: Path, out: queue.Queue[_Item], cancelled: threading.Event, left_out: list[tuple[str, str]]) -> None:
    try:
        with zipfile.ZipFile(_QueueWriter(out, cancelled), "w", compresslevel=5) as archive:
            def unreadable(exc: OSError) -> None:  # a folder that went away or changed mid-walk
                left_out.append((f"{exc.filename}/", _reason(exc)))

            for folder, dirs, files, folder_fd in tree_walk.fwalk(root, onerror=unreadable):
                here = Path(folder).relative_to(root)
                for name in list(dirs):
                    reason = _unenterable(name, folder_fd)
                    if reason:  # fwalk would skip it without a word: the manifest names it
                        dirs.remove(name)
                        left_out.append(((here / name).as_posix() + ("" if reason == _LINK else "/"), reason))
                dirs.sort()
                for name in sorted(files):
                    arcname = (here / name).as_posix()
                    try:
                        fd, info = _open_regular(name, folder_fd)
                    except _Skip as skip:
                        left_out.append((arcname, str(skip)))
                        continue
                    try:
                        _add(archive, fd, _entry(arcname, info))
                    except OSError as exc:  # a read error half-way: the entry is incomplete
                        raise OSError(exc.errno, f"reading {arcname}: {exc.strerror or exc}") from None
            if left_out:
                archive.writestr(zipfile.ZipInfo(MANIFEST, date_time=time.localtime()[:6]), manifest(left_out),
                                 compress_type=zipfile.ZIP_DEFLATED)
    except _Cancelled:
        pass
    except BaseException as exc:  # reported to the reader, which aborts the response
        out.put(exc)
    finally:
        out.put(None)


def manifest(left_out: list[tuple[str, str]]) -> str:
    lines = ["Left out of this backup (only regular files are saved, sparse ones not; links are never followed):",
             ""]
    lines += [f"{path}\t{reason}" for path, reason in left_out]
    return "\n".join(lines) + "\n"


async def zip_stream(root: Path, left_out: list[tuple[str, str]]) -> AsyncIterator[bytes]:
    """Yield the bytes of a zip of ``root`` as they are produced (bounded memory). Raises if the
    zip cannot be finished; ``left_out`` gets (path, reason) for every file not in it."""
    out: queue.Queue[_Item] = queue.Queue(maxsize=_CHUNK_QUEUE)
    cancelled = threading.Event()
    worker = threading.Thread(target=_zip, args=(root, out, cancelled, left_out), daemon=True)
    worker.start()
    try:
        while True:
            item = await asyncio.to_thread(out.get)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                out.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.01)
