"""The real ``cst`` command with faults injected, for the fault tests: ``python faulty_cst.py serve -f F``.

``CST_TEST_FAULTS`` (JSON) says which, counting calls within this process:

    {"observe": [2, 3]}        LocalRuntime.observe raises RuntimeError on its 2nd and 3rd call
    {"slow_observe": 4.0}      every observe first blocks for that many seconds (time.sleep)
    {"watch": [1]}             the file watcher raises when it wakes for the 1st time
    {"watch_start": "always"}  the file watcher raises as soon as it starts, every time
    {"adopt": [1]}             LocalRuntime.adopt raises psutil.NoSuchProcess on its 1st call
                               (the process exited at that very moment)
    {"write": {"name": "desired.yaml", "errno": 28}}
                               writing a file of that name fails with that errno (28 ENOSPC, 30 EROFS)
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import psutil

FAULTS = json.loads(os.environ.get("CST_TEST_FAULTS", "{}"))


def _hits(name: str):
    """A function telling, call by call, whether the fault ``name`` fires this time."""
    rule = FAULTS.get(name)
    calls = 0

    def fires() -> bool:
        nonlocal calls
        calls += 1
        return rule == "always" or (isinstance(rule, list) and calls in rule)
    return fires


def _inject() -> None:
    """Each fault FAULTS names, patched in (one at a time; each its own function)."""
    if "observe" in FAULTS or "slow_observe" in FAULTS:
        _inject_observe()
    if "adopt" in FAULTS:
        _inject_adopt()
    if "watch" in FAULTS or "watch_start" in FAULTS:
        _inject_watch()
    if "write" in FAULTS:
        _inject_write()


def _inject_observe() -> None:
    from reconciler.runtime.local import LocalRuntime

    original_observe, fires = LocalRuntime.observe, _hits("observe")

    @functools.wraps(original_observe)
    def observe(self, *args, **kwargs):
        time.sleep(FAULTS.get("slow_observe", 0))   # the fault: a slow observation
        if fires():
            raise RuntimeError("injected fault in observe")
        return original_observe(self, *args, **kwargs)
    LocalRuntime.observe = observe  # type: ignore[method-assign]  # the fault injected


def _inject_adopt() -> None:
    from reconciler.runtime.local import LocalRuntime

    original_adopt, fires = LocalRuntime.adopt, _hits("adopt")

    def adopt(self, id_, port, pid):
        if fires():
            raise psutil.NoSuchProcess(pid, msg="injected: the process exited just now")
        return original_adopt(self, id_, port, pid)
    LocalRuntime.adopt = adopt  # type: ignore[method-assign]  # the fault injected


def _inject_watch() -> None:
    from reconciler.server import daemon

    original_changes, fires, fires_at_start = daemon.changes_of, _hits("watch"), _hits("watch_start")

    def changes_of(path, stop, *args, **kwargs):
        async def changes():
            if fires_at_start():
                raise RuntimeError("injected fault as the file watcher starts")
            async for change in original_changes(path, stop, *args, **kwargs):
                if fires():
                    raise RuntimeError("injected fault in the file watcher")
                yield change
        return changes()
    daemon.changes_of = changes_of


def _inject_write() -> None:
    from reconciler import files

    target, code = FAULTS["write"]["name"], FAULTS["write"]["errno"]
    original_temp = files._temp_beside

    def temp_beside(path: Path, *args, **kwargs):  # every replacement of a file writes one first
        if path.name == target:
            raise OSError(code, os.strerror(code), str(path))
        return original_temp(path, *args, **kwargs)
    files._temp_beside = temp_beside


if __name__ == "__main__":
    _inject()
    from reconciler.cli import cli
    sys.argv[0] = "cst"
    cli()
