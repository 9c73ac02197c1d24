"""The key-pool proxy as a process of its own, which outlives a restart or an upgrade of ``cst serve``.

``cst serve`` starts ``cst proxy -f FILE --control SOCKET`` (``python -m proxy.cli``, argv from a
list, no shell) in a session of its own, so a SIGTERM or SIGINT to cst serve's process group does
not reach it; with cst serve's own environment (the variables the file names for account
passwords, pool keys, client keys and the usage store's password: no secret goes on argv, and
``runtime.environment.child_environment``, which strips them, is for SillyTavern only), plus the
``CST_STATE_DIR`` marker every process CST starts carries; its output goes to ``logs/proxy.log``.
It is recorded in ``proxy/process.json`` (pid, process start time, argv, file, listen address).

A cst serve that finds the recorded proxy alive (pid *and* start time, ``processes.live_process``)
adopts it instead of starting a second one; a dead or foreign record is replaced. Stopping cst
serve leaves the proxy running, with every chat it relays. A proxy started by older CST code (other
argv) is adopted as it is and keeps running its code: it changes when it exits or someone stops it
by its pid; a restart of the proxy from CST (``cst proxy restart``, say) is not part of this. When
the proxy exits, ``supervise`` starts it again and says so in cst serve's log.

The proxy follows desired.yaml and the instances' key folder itself. What cst serve needs of it, it
asks on the control socket (``proxy.control``), asynchronously (aiohttp over the Unix socket):
nothing blocks cst serve's loop. A proxy that does not answer is "not running" to the API, and its
in-flight requests are unknown to parking, which then treats each instance as busy (never parked
because the proxy was down).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp
import psutil

from proxy.control import reachable
from proxy.service import SHUTDOWN_GRACE

from ..desired.model import DesiredState
from ..files import atomic_write, private_dir
from ..runtime.exit_watch import ExitWatches
from ..runtime.launch import ENV_STATE_DIR
from ..runtime.processes import live_process, terminate, utc_now
from ..runtime.statedir import StateDir

log = logging.getLogger("cst.serve")

READY_WAIT = 60.0        # a new proxy answers within this (a shared store may take a few seconds)
ADOPT_WAIT = 5.0         # an adopted proxy still starting up (its cst serve crashed meanwhile)
CALL_TIMEOUT = 5.0       # one control call; an API answer never waits longer on the proxy
CHECK_EVERY = 10.0       # besides the exit watch, how often the recorded proxy is looked at
RESTART_CAP = 60.0       # a proxy that cannot start again is tried again up to this often
LOG_TAIL = 20            # lines of its log read back when a new proxy exits at once
IN_FLIGHT_FRESH = 0.25   # a snapshot of the requests in flight younger than this is not asked again
IN_FLIGHT_MAX_AGE = 2.0  # one older than this (the proxy did not answer) is no snapshot: unknown
UNKNOWN_IN_FLIGHT = 1    # what ``in_flight`` says when it does not know: busy, not idle


class PoolStartFailed(Exception):
    """The proxy could not be started: its own words (its address taken, the store's password
    unavailable), read from its log."""


@dataclass
class PoolRecord:
    """What cst serve remembers of the proxy process it started."""

    pid: int
    create_time: float
    argv: list[str]
    file: str
    listen: str       # settings.proxy.listen when it started (it follows the file's later changes itself)
    control: str      # its control socket
    started_at: str   # ISO 8601 UTC


def read_record(path: Path) -> PoolRecord | None:
    """The record in ``path``; None when missing or not one (nothing is signalled on its word)."""
    try:
        record = PoolRecord(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, RecursionError):
        return None
    well_formed = (type(record.pid) is int and record.pid > 0 and isinstance(record.create_time, (int, float))
                   and isinstance(record.argv, list) and all(isinstance(a, str) for a in record.argv)
                   and all(isinstance(v, str) for v in (record.file, record.listen, record.control, record.started_at)))
    return record if well_formed else None


def _log_tail(path: Path, offset: int) -> list[str]:
    """The last lines the proxy wrote to its log from ``offset`` on."""
    try:
        with path.open("rb") as log_file:
            log_file.seek(offset)
            text = log_file.read()[-16384:].decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-LOG_TAIL:]


def why_it_exited(path: Path, offset: int, code: int | None) -> str:
    """What a proxy that exited as it started said: the error ``cst proxy`` exits with (click's
    ``Error: ...``), else the end of its log."""
    lines = _log_tail(path, offset)
    errors = [line.removeprefix("Error: ") for line in lines if line.startswith("Error: ")]
    if errors:
        return errors[-1]
    return (f"the key-pool proxy exited as it started (code {code}); the end of {path}:\n" + "\n".join(lines))


class PoolProcess:
    def __init__(self, state: StateDir, file: Path, desired: Callable[[], DesiredState]):
        self.state = state
        self.file = file.resolve()
        self._desired = desired
        self.record: PoolRecord | None = None
        self.started_here = False          # this cst serve started the running proxy (not adopted it)
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._folder: int | None = None    # the socket's folder, when its path is too long to name
        self._exited = asyncio.Event()
        self._watches = ExitWatches(lambda pid, what: self._exited.set())
        self._answering = True             # for saying once that it stopped (and started) answering
        self._in_flight: tuple[float, dict[str, int]] | None = None
        self._asking: asyncio.Task[None] | None = None

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "proxy.cli", "-f", str(self.file),
                "--control", str(self.state.pool_control_path)]

    # -- the process

    async def start(self) -> None:
        """Adopt the recorded proxy if it runs, else start one and wait until it answers.
        Raises PoolStartFailed with the proxy's own words."""
        await self._connect()
        record = await asyncio.to_thread(self._live_record)
        if record is not None and record.file != str(self.file):
            log.warning("the key-pool proxy (pid %d) follows %s, not %s: replacing it", record.pid, record.file,
                        self.file)
            await self._stop(record)
            record = None
        if record is not None:
            self.record, self.started_here = record, False
            self._watches.watch([(record.pid, "key-pool proxy")])
            if record.argv != self.argv():
                log.info("the key-pool proxy (pid %d) was started by other CST code (%s); it keeps running as it "
                         "is until it exits or is stopped", record.pid, " ".join(record.argv))
            if not await self._answers_within(ADOPT_WAIT, lambda: False):
                log.warning("the key-pool proxy (pid %d) was adopted but its control socket %s does not answer",
                            record.pid, record.control)
            log.info("adopted the key-pool proxy (pid %d, started %s)", record.pid, record.started_at)
            return
        await self._spawn()

    def _live_record(self) -> PoolRecord | None:
        record = read_record(self.state.pool_record_path)
        if record is None or live_process(record.pid, record.create_time) is None:
            return None
        return record

    async def _spawn(self) -> None:
        desired = self._desired()
        proc, record, offset = await asyncio.to_thread(self._popen, desired)
        self._proc, self.record, self.started_here = proc, record, True
        self._exited.clear()
        self._watches.watch([(record.pid, "key-pool proxy")])
        if await self._answers_within(READY_WAIT, lambda: proc.poll() is not None):
            log.info("started the key-pool proxy (pid %d), its log in %s", record.pid, self.state.pool_log_path)
            return
        code = proc.poll()
        if code is None:   # alive but silent: not left behind
            await self._stop(record)
            why = (f"the key-pool proxy did not answer on {record.control} within {READY_WAIT:g}s; "
                   f"see {self.state.pool_log_path}")
        else:
            await asyncio.to_thread(self._forget, record)
            why = await asyncio.to_thread(why_it_exited, self.state.pool_log_path, offset, code)
        self.record = None
        raise PoolStartFailed(why)

    def _popen(self, desired: DesiredState) -> tuple[subprocess.Popen[bytes], PoolRecord, int]:
        """Start the proxy and record it (blocking: a fork, an fsync)."""
        argv = self.argv()
        log_path = self.state.pool_log_path
        private_dir(log_path.parent)
        private_dir(self.state.pool_record_path.parent)
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            offset = os.fstat(fd).st_size
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True, cwd=self.file.parent,
                                    env={**os.environ, ENV_STATE_DIR: str(self.state.root)})
        finally:
            os.close(fd)
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:   # gone already: its exit is seen as it is waited for
            create_time = 0.0
        record = PoolRecord(proc.pid, create_time, argv, str(self.file), str(desired.settings.proxy.listen),
                            str(self.state.pool_control_path), utc_now())
        try:
            atomic_write(self.state.pool_record_path, json.dumps(asdict(record), indent=2).encode(), mode=0o600)
        except BaseException:   # an unrecorded proxy would be found by no one: not left running
            proc.kill()
            proc.wait()
            raise
        return proc, record, offset

    async def _answers_within(self, seconds: float, gone: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + seconds
        while not gone():
            if await self._call("GET", "/", quiet=True) is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)
        return False

    def _forget(self, record: PoolRecord) -> None:
        if read_record(self.state.pool_record_path) == record:
            self.state.pool_record_path.unlink(missing_ok=True)

    async def _stop(self, record: PoolRecord) -> None:
        await terminate(record.pid, record.create_time, SHUTDOWN_GRACE + 1)
        await asyncio.to_thread(self._forget, record)

    async def stop_started(self) -> None:
        """Stop the proxy this cst serve started, when its own start failed after all (nothing of
        a crashed start stays behind); an adopted one keeps running."""
        if self.started_here and self.record is not None:
            record, self.record = self.record, None
            log.info("stopping the key-pool proxy (pid %d) started by this failed start", record.pid)
            await self._stop(record)

    async def supervise(self) -> None:
        """Start the proxy again whenever it exits (a background task of cst serve's): its exit watch
        wakes this at once, and the record is looked at every ``CHECK_EVERY`` besides."""
        failures = 0
        while True:  # until cancelled
            try:
                async with asyncio.timeout(CHECK_EVERY):
                    await self._exited.wait()
            except TimeoutError:
                pass
            self._exited.clear()
            record = self.record
            code = self._proc.poll() if self._proc is not None else None   # reaps our own child
            if record is not None and code is None and await asyncio.to_thread(
                    live_process, record.pid, record.create_time) is not None:
                continue
            if record is not None:
                said = f" with code {code}" if code is not None else ""
                log.error("the key-pool proxy (pid %d) exited%s; starting it again (its log: %s)", record.pid, said,
                          self.state.pool_log_path)
                await asyncio.to_thread(self._forget, record)
                self.record, self._proc = None, None
            try:
                await self._spawn()
                failures = 0
            except PoolStartFailed as exc:
                failures += 1
                delay = min(2.0 ** failures, RESTART_CAP)
                log.error("could not start the key-pool proxy again: %s; trying again in %.0fs", exc, delay)
                await asyncio.sleep(delay)
                self._exited.set()

    async def close(self) -> None:
        """Stop talking to the proxy; the process keeps running (the next cst serve adopts it)."""
        self._watches.close()
        if self._asking is not None:
            self._asking.cancel()
            await asyncio.gather(self._asking, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._folder is not None:
            os.close(self._folder)
            self._folder = None

    # -- the control socket

    async def _connect(self) -> None:
        path = self.state.pool_control_path
        await asyncio.to_thread(private_dir, path.parent)
        where, self._folder = reachable(path)
        self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=where),
                                              timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT))

    async def _call(self, method: str, path: str, params: Any = None, text: bool = False,
                    quiet: bool = False) -> Any:
        """The route's JSON answer (its text with ``text``); None when the proxy does not answer."""
        if self._session is None:
            return None
        try:
            async with self._session.request(method, "http://pool" + path, params=params) as response:
                response.raise_for_status()
                answer = await (response.text() if text else response.json())
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            if self._answering and not quiet:
                log.warning("the key-pool proxy does not answer on its control socket (%s %s: %s)", method, path,
                            exc or type(exc).__name__)
                self._answering = False
            return None
        if not self._answering:
            log.info("the key-pool proxy answers on its control socket again")
            self._answering = True
        return answer

    async def pool(self) -> dict[str, Any] | None:
        """The pool's document (``GET /api/pool``)."""
        return _document(await self._call("GET", "/pool"))

    async def usage(self, instances: list[str]) -> dict[str, Any] | None:
        """Every caller's current windows, ``instances`` listed even unused (``UsageBook.document``)."""
        return _document(await self._call("GET", "/usage", params=[("instance", id_) for id_ in instances]))

    async def daily(self, first: str, last: str, caller: str | None) -> dict[str, Any] | None:
        """Daily totals from the proxy's ledger (``daily_document``): read through the proxy, which
        has the store open (a PostgreSQL one with its password), rather than opened here again."""
        params = {"from": first, "to": last, **({"instance": caller} if caller is not None else {})}
        return _document(await self._call("GET", "/usage/daily", params=params))

    async def latency(self) -> bytes | None:
        """The answer-time histograms, in Prometheus' text format, for cst serve's ``/metrics``."""
        text = await self._call("GET", "/metrics", text=True)
        return text.encode() if text is not None else None

    async def reload_keys(self) -> bool:
        """Make the proxy read the instances' keys now (it also follows their folder itself)."""
        return await self._call("POST", "/instance-keys/reload") is not None

    def in_flight(self, caller: str) -> int:
        """``caller``'s requests at the proxy now, from a snapshot of every caller's asked at most once
        per ``IN_FLIGHT_FRESH`` (parking asks for each instance every tick): one call for all. Without
        a recent snapshot (the proxy down or slow) the answer is ``UNKNOWN_IN_FLIGHT``: busy."""
        now = time.monotonic()
        snapshot = self._in_flight
        if (snapshot is None or now - snapshot[0] >= IN_FLIGHT_FRESH) and (self._asking is None or self._asking.done()):
            self._asking = asyncio.get_running_loop().create_task(self._ask_in_flight())
        if snapshot is None or now - snapshot[0] > IN_FLIGHT_MAX_AGE:
            return UNKNOWN_IN_FLIGHT
        return snapshot[1].get(caller, 0)

    async def _ask_in_flight(self) -> None:
        answer = await self._call("GET", "/in-flight")
        if answer is not None:
            self._in_flight = (time.monotonic(), answer["callers"])


def _document(answer: Any) -> dict[str, Any] | None:
    """A control route's JSON document; None when the proxy did not answer or said no object."""
    return answer if isinstance(answer, dict) else None
