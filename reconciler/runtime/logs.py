"""Instance logs: capped in place, and their last lines for error messages."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


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
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
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
