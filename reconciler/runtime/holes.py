"""Sparse files: where their data is, and a copy that keeps their holes.

A file made with ``truncate -s 1T`` uses no disk, but read byte by byte it is a terabyte of zeros.
An instance can make one in its data dir, so everything CST does to a data dir's files as root
(snapshots, restores, the backup zip) goes by the file's data extents, found with ``lseek``'s
``SEEK_DATA`` and ``SEEK_HOLE``, and never reads or writes a hole. A filesystem that cannot tell
holes reports the whole file as data (Linux's generic fallback), so this is never wrong, only as
costly as a plain copy there.
"""
from __future__ import annotations

import errno
import os
from typing import Iterator

_CHUNK = 1 << 30        # copy_file_range's count per call
_READ = 1 << 20         # per read where copy_file_range cannot be used (across filesystems)


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each stretch of data in the first ``size`` bytes of the open file ``fd``;
    what lies between them (and after the last) is a hole, which reads as zeros. Moves the file's
    offset."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:   # no data after offset: the rest is one hole
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def copy_keeping_holes(source: int, target: int, size: int) -> int:
    """Copy the first ``size`` bytes of ``source`` into the empty file ``target``, writing only
    the data extents, and give ``target`` that size (its holes stay holes); the bytes written.
    A file that shrinks meanwhile gets zeros where its end was, as a hole."""
    written = 0
    for start, end in data_extents(source, size):
        offset = start
        while offset < end:
            n = _copy_range(source, target, offset, end - offset)
            if n == 0:   # the file shrank under us
                break
            offset += n
        written += offset - start
    os.ftruncate(target, size)
    return written


def _copy_range(source: int, target: int, offset: int, count: int) -> int:
    """Copy up to ``count`` bytes at ``offset`` to the same offset of ``target``; how many were."""
    try:   # in the kernel (and a reflink where the filesystem can)
        return os.copy_file_range(source, target, min(count, _CHUNK), offset, offset)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    data = os.pread(source, min(count, _READ), offset)
    view = memoryview(data)
    at = offset
    while view:
        n = os.pwrite(target, view, at)
        view, at = view[n:], at + n
    return len(data)


def hole_bytes(fd: int, size: int) -> int:
    """How many of the file's ``size`` bytes are in holes (use no disk and read as zeros)."""
    return size - sum(end - start for start, end in data_extents(fd, size))
