"""Instance logs: owner-only, capped in place, and their last lines for error messages."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO

from ..files import tighten

LOG_MODE = 0o600  # a log holds what users typed into their chats


def open_log(path: Path) -> BinaryIO:
    """``path`` opened for appending, created owner-only (an existing log is tightened, never loosened)."""
    log = open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_MODE), "ab")
    tighten(path, LOG_MODE)
    return log


def rotate_log(path: Path, max_bytes: int, keep: int) -> bool:
    """Cap a log that a running process appends to: copy it to ``.1`` (shifting older copies) and
    truncate it in place, so the writer's O_APPEND descriptor carries on in the same file."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
    if keep > 0:
        copy = path.with_name(f"{path.name}.1")
        created = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, LOG_MODE)
        with open(path, "rb") as source, open(created, "wb") as out:
            shutil.copyfileobj(source, out)
        tighten(copy, LOG_MODE)
    os.truncate(path, 0)
    return True


def tail(path: Path, lines: int = 12) -> str:
    """The last ``lines`` lines of a log (at most its last 8 KiB), or "(no log)"."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 8192))
            text = log.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
