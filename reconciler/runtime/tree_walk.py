"""Walking a folder an instance shaped: its data dir, or a snapshot of it.

``os.fwalk`` opens each folder by descriptor relative to its parent and never follows a link,
so a folder swapped for a link mid-walk leads nowhere. But on Python 3.11 it recurses once per
level: an instance that nests folders a thousand deep would end a snapshot, a backup zip or a
start in ``RecursionError``, which the callers' ``OSError`` handling does not expect (a task
that keeps failing so takes ``cst serve`` down). Here that is an ``OSError`` of the tree walked;
``shutil.rmtree`` recurses too, so ``remove`` does without.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path
from typing import Callable, Iterator


def fwalk(root: Path | str, onerror: Callable[[OSError], None] | None = None
          ) -> Iterator[tuple[str, list[str], list[str], int]]:
    """``os.fwalk(root, follow_symlinks=False, onerror=onerror)``, top-down; a tree nested deeper
    than the interpreter can recurse raises OSError (ELOOP) naming ``root``."""
    try:
        yield from os.fwalk(root, follow_symlinks=False, onerror=onerror)
    except RecursionError:
        raise OSError(errno.ELOOP, "folders nested too deep to walk", str(root)) from None



def remove(path: Path) -> None:
    """Remove the folder ``path`` (CST's own: a snapshot) and all in it, at any depth, links removed
    and never followed, read-only folders included. Not by recursion: each folder is emptied by
    moving what it holds up into ``path``, one descriptor open at a time besides ``path``'s."""
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        os.fchmod(top, 0o700)
        while names := os.listdir(top):
            for name in names:
                if not stat.S_ISDIR(os.stat(name, dir_fd=top, follow_symlinks=False).st_mode):
                    os.unlink(name, dir_fd=top)
                    continue
                folder = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
                try:
                    os.fchmod(folder, 0o700)
                    for inner in os.listdir(folder):
                        os.rename(inner, f".cst-removing-{secrets.token_hex(8)}", src_dir_fd=folder, dst_dir_fd=top)
                finally:
                    os.close(folder)
                os.rmdir(name, dir_fd=top)
    finally:
        os.close(top)
    os.rmdir(path)
