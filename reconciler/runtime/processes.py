"""The process table as the runtime sees it: who listens on a port, whether a recorded process
still runs (the same one, not a recycled pid), and stopping one for good.

A process is named by its pid *and* its start time; a signal goes through a pidfd opened after
that check, so it can never reach a process that took over the pid meanwhile.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import time
from datetime import datetime, timezone

import psutil

KILL_WAIT = 10.0   # after SIGKILL; a process still there is stuck in the kernel (D state)


class StopStuck(OSError):
    """A process outlived SIGKILL by ``KILL_WAIT``: it is stuck in the kernel, and still recorded."""


def iso_utc(epoch: float) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, as the seed's startTime."""
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    return iso_utc(time.time())


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def tree_rss(pids: set[int]) -> dict[int, int]:
    """The resident memory of each of ``pids`` with all its descendants, in bytes, from one scan of
    the process table (asking each pid for its children would scan it once per pid)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for proc in psutil.process_iter(["ppid", "memory_info"]):
        info = proc.info
        if info["memory_info"] is None:   # gone meanwhile, or not ours to read
            continue
        rss[proc.pid] = info["memory_info"].rss
        children.setdefault(info["ppid"], []).append(proc.pid)
    totals: dict[int, int] = {}
    for root in pids & rss.keys():
        total, stack = 0, [root]
        while stack:
            pid = stack.pop()
            total += rss.get(pid, 0)
            stack.extend(children.get(pid, ()))
        totals[root] = total
    return totals


def listeners(ports: set[int]) -> dict[int, int | None]:
    """pid listening on each of ``ports`` (None when the kernel will not say)."""
    found: dict[int, int | None] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if (conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in ports
                and found.get(conn.laddr.port) is None):
            found[conn.laddr.port] = conn.pid
    return found


def describe(pid: int | None) -> str:
    if pid is None:
        return "a process this user cannot see"
    try:
        proc = psutil.Process(pid)
        return f"pid {pid}, {' '.join(proc.cmdline()[:3])[:80]}"
    except psutil.Error:
        return f"pid {pid}"


def live_process(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The process if it still runs and is the same one (not a recycled pid), else None."""
    if pid is None or create_time is None:
        return None
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():  # one read of /proc/<pid>/stat for both questions
            same = abs(proc.create_time() - create_time) <= 0.05
            zombie = proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return None
    if zombie and same:
        _reap(pid)
    return proc if same and not zombie else None


def _reap(pid: int) -> None:
    """Collect an exited child of ours so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _pidfd(pid: int, create_time: float) -> int | None:
    """A pidfd for the process, opened *before* checking it is the recorded one: once the check
    passes, the descriptor names that process whatever becomes of the pid number."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if live_process(pid, create_time) is None:
        os.close(pidfd)
        return None
    return pidfd


def _signal(pidfd: int, pid: int, sig: signal.Signals) -> bool:
    """``sig`` to the process through its pidfd, then to the rest of its group (started in a session
    of its own, so its group id is its pid; a pid still in use as a group id is never handed out
    again). False when the process had already exited."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    return True


async def _exits_within(pidfd: int, seconds: float) -> bool:
    """Whether the process exits within ``seconds``: a pidfd turns readable when it does."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)
    loop.add_reader(pidfd, readable)
    try:
        async with asyncio.timeout(seconds):
            await exited
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


async def terminate(pid: int | None, create_time: float | None, grace: float) -> None:
    """SIGTERM the process and its group, SIGKILL after ``grace`` seconds; return once it exited.

    Raises StopStuck when it outlives SIGKILL by ``KILL_WAIT``: a stop must not hold the state
    dir's lock for ever."""
    if pid is None or create_time is None:
        return
    pidfd = _pidfd(pid, create_time)
    if pidfd is None:
        return
    try:
        if not _signal(pidfd, pid, signal.SIGTERM) or await _exits_within(pidfd, grace):
            return
        if not _signal(pidfd, pid, signal.SIGKILL) or await _exits_within(pidfd, KILL_WAIT):
            return
        raise StopStuck(f"pid {pid} did not exit {KILL_WAIT:g}s after SIGKILL "
                        f"(state {_state(pid)}: stuck in the kernel); it stays recorded")
    finally:
        os.close(pidfd)
        live_process(pid, create_time)  # reaps it if it was our child


def _state(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except psutil.Error:
        return "unknown"
