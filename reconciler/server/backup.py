"""A zip of an instance's data dir, produced while it is sent: never built in memory or on disk."""
from __future__ import annotations

import asyncio
import os
import queue
import threading
import zipfile
from pathlib import Path
from typing import AsyncIterator

_CHUNK_QUEUE = 8      # chunks in flight between the zipping thread and the socket
_DONE = object()


class _QueueWriter:
    """A write-only, unseekable file object that hands what zipfile writes to a queue."""

    def __init__(self, out: queue.Queue):
        self.out = out
        self.written = 0

    def write(self, data: bytes) -> int:
        if data:
            self.out.put(bytes(data))
            self.written += len(data)
        return len(data)

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        pass


def _zip(root: Path, out: queue.Queue, cancelled: threading.Event) -> None:
    try:
        with zipfile.ZipFile(_QueueWriter(out), "w", compression=zipfile.ZIP_DEFLATED, compresslevel=5) as archive:
            for folder, dirs, files in os.walk(root):
                dirs.sort()
                for name in sorted(files):
                    if cancelled.is_set():
                        return
                    path = Path(folder) / name
                    if path.is_symlink() or not path.is_file():
                        continue  # never follow a link out of the data dir
                    try:
                        archive.write(path, path.relative_to(root).as_posix())
                    except OSError:
                        continue  # a file SillyTavern removed while we walked
    except BaseException as exc:  # reported to the reader, which ends the response
        out.put(exc)
    finally:
        out.put(_DONE)


async def zip_stream(root: Path) -> AsyncIterator[bytes]:
    """Yield the bytes of a zip of ``root`` as they are produced (bounded memory)."""
    out: queue.Queue = queue.Queue(maxsize=_CHUNK_QUEUE)
    cancelled = threading.Event()
    worker = threading.Thread(target=_zip, args=(root, out, cancelled), daemon=True)
    worker.start()
    try:
        while True:
            item = await asyncio.to_thread(out.get)
            if item is _DONE:
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
