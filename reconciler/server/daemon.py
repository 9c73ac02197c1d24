"""``cst serve``: one asyncio process that keeps reality equal to desired.yaml.

Three things wake the reconcile loop: the file changing on disk (watchfiles,
debounced), an API call that changed the file, and the resync timer that
repairs drift nobody announced (a killed instance). One pass runs at a time;
a caller that needs its change applied waits for a pass that started after it,
for at most ``settings.api.timeout``, and is then told what is still pending.
An invalid file is reported and ignored: the last valid desired state stays in force.

The key-pool proxy runs as a process of its own (``pool_process``), started or adopted here and
left running when cst serve stops, so chats in flight outlive a restart; it follows the file
itself, and what the API needs of it is asked on its control socket.

Nothing that blocks runs on this process's loop: passes run on a loop of their own in a worker
thread (``LoopThread``), file reads and validation in threads. Every long-lived task (the reconcile
loop, the file watcher, the proxy's supervision) is kept by ``BackgroundTasks``: a failure is logged
with its traceback and the task restarted with backoff; one that keeps failing makes ``cst serve``
exit non-zero.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from ..desired.model import DesiredState
from ..desired.restart_settings import keep_restart_settings
from ..desired.shared_file import DesiredFile, FileReading
from ..desired.watch import changes_of
from ..engine.plan import Action
from ..engine.reconcile import reconcile
from ..engine.results import Report, Result
from ..engine.supervision import Supervisor
from ..runtime.base import RuntimeFactory
from ..runtime.exit_watch import ExitWatches
from ..runtime.health import HealthChecks
from ..runtime.local import LocalRuntime
from ..runtime.logs import rotate_log
from ..runtime.processes import live_process, utc_now
from ..runtime.statedir import LockHeld, Record, StateDir
from ..tasks import BackgroundTasks, LoopThread
from . import liveness
from .admin_key import admin_key
from .api import make_app
from .control import NotConverged
from .disk_watch import DiskWatch
from .events import EventHub
from .fleet_metrics import ParkingCounters, PassCounters
from .git_follow import GitFollower
from .keypool import pool_document
from .parking import Parking
from .pool_process import PoolProcess, PoolStartFailed
from .snapshot_schedule import BackupScheduler

log = logging.getLogger("cst.serve")

PASS_LOCK_WAIT = 120.0    # a pass waits this long for a `cst apply` holding the state dir


class DaemonError(Exception):
    pass


class Daemon:
    def __init__(self, file: DesiredFile, reading: FileReading, runtime: RuntimeFactory = LocalRuntime):
        """``runtime``: where every runtime this daemon and its API use comes from (a fake in tests)."""
        if reading.desired is None:
            raise DaemonError("\n".join(str(p) for p in reading.problems))
        self.file = file
        self.runtime = runtime
        self.reading = reading                 # the file as last read (may be invalid)
        self.desired: DesiredState = reading.desired  # the last valid desired state: what is enforced
        self.started_with = self.desired          # its settings that need a restart stay in force
        self.restart_needed: tuple[str, ...] = ()  # those the file has changed since
        self.enforced_sha256 = reading.sha256
        self.pid = os.getpid()
        self.state = StateDir(self.desired.settings.state_dir)
        self.supervisor = Supervisor(self.desired)
        self.started_at = utc_now()
        self.last_report: Report | None = None
        self.last_pass_at: str | None = None
        self.last_pass_ms: float | None = None
        self.changed_at = time.monotonic()
        self.fatal: str | None = None            # why the daemon gave up, if it did
        self.pass_counters = PassCounters()      # for GET /metrics
        self.parking_counters = ParkingCounters()
        self._requested = 0
        self._completed = 0
        self._done = asyncio.Condition()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.proxy: PoolProcess | None = None     # the key-pool proxy's process, once started or adopted
        self.parking: Parking | None = None      # parks and wakes instances with park_after (the gate), once started
        self._exit_watches = ExitWatches(self._exited)
        self._checks = HealthChecks()          # liveness, on this loop
        self._pass_checks = HealthChecks()     # readiness after starts, on the worker's loop
        self.tasks = BackgroundTasks(log, on_give_up=self._give_up)
        self._worker = LoopThread("cst-reconcile")
        self._loop: asyncio.AbstractEventLoop | None = None
        # what the running pass is doing, for pending(): its phase and the actions under way
        self._phase: str | None = None
        self._phase_since = 0.0
        self._acting: dict[str, tuple[str, float]] = {}
        self.events = EventHub(pool=lambda: pool_document(self.proxy))
        self.git = GitFollower(file, lambda: self.desired.settings.git, self.reload,
                               lambda data: self.events.publish("git", data))
        self.disk = DiskWatch(lambda: self.desired, self.state, self._disk_changed)

    # -- the desired state

    def accept(self, reading: FileReading) -> None:
        """Take a new reading of the file: enforce it if valid, report it if not."""
        previous = self.reading
        self.reading = reading
        self.events.file_read(previous, reading)
        if reading.desired is None:
            for problem in reading.problems:
                log.error("desired.yaml is invalid, keeping the last valid state: %s", problem)
            return
        if reading.sha256 == previous.sha256 and previous.valid:
            return
        desired, restart_needed = keep_restart_settings(reading.desired, self.started_with)
        for name in set(restart_needed) - set(self.restart_needed):
            log.warning("%s changed: it takes effect when cst serve restarts; until then the "
                        "value it started with stays in force", name)
        self.restart_needed = restart_needed
        self.desired = desired
        self.enforced_sha256 = reading.sha256
        self.supervisor.desired = desired
        self._wake.set()

    async def reload(self) -> None:
        # in turn with the API's edits: a reading from before an edit accepted after it would put
        # the file's older version back in force until the next save (a create's pass would miss it)
        self.accept(await self.file.read_in_turn())

    # -- reconciling

    async def converge(self) -> Report:
        """Ask for a pass and wait for one that started after this call; its report.

        NotConverged after ``settings.api.timeout``: the change stays in the file and a later pass
        applies it, but the caller is not kept waiting for ever."""
        self._requested += 1
        ticket = self._requested
        self._wake.set()
        waited = self.desired.settings.api.timeout
        try:
            async with asyncio.timeout(waited):
                async with self._done:
                    await self._done.wait_for(lambda: self._completed >= ticket)
        except TimeoutError:
            raise NotConverged(waited, self.pending()) from None
        assert self.last_report is not None, "a pass has completed"
        return self.last_report

    def pending(self) -> str:
        now = time.monotonic()
        if self._phase is None:
            failure = self.last_report.failure if self.last_report else None
            why = f"; the last pass failed: {failure}" if failure else ""
            return f"the reconciler is between passes{why}"
        what = f"the reconciler has been {self._phase} for {now - self._phase_since:.0f}s"
        if self._phase == "waiting for the state dir lock":
            holder = self.state.lock_holder()
            what += f" (held by pid {holder}: another cst works on {self.state.root})" if holder else ""
        if self._acting:
            what += "; under way: " + ", ".join(f"{kind} {id_} ({now - since:.0f}s)"
                                               for id_, (kind, since) in sorted(self._acting.items()))
        return what

    def health(self) -> dict[str, Any]:
        return {name: {"failures": h.failures, "totalFailures": h.total_failures, "lastError": h.last_error}
                for name, h in self.tasks.health.items()}

    async def _reconcile_loop(self) -> None:
        while True:  # until cancelled
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that lands
            # as the wake comes, and this loop would then never stop (cst serve hung at SIGTERM)
            try:
                async with asyncio.timeout(self.desired.settings.resync):
                    await self._wake.wait()
            except TimeoutError:
                await self.reload()  # a save the watcher missed (while it restarted, say) counts too
            self._wake.clear()
            ticket = self._requested
            report = await self._pass()
            async with self._done:
                self.last_report = report
                self._completed = ticket
                self._done.notify_all()

    def _from_worker(self, callback: Any, *args: Any) -> None:
        """Run ``callback`` on the daemon's loop; the pass calls this from its own thread."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(callback, *args)

    def _set_phase(self, phase: str | None) -> None:
        self._phase, self._phase_since = phase, time.monotonic()
        if phase is None:
            self._acting.clear()

    def _action_began(self, action: Action) -> None:
        self._acting[action.id] = (action.kind.value, time.monotonic())

    def _result_came(self, result: Result) -> None:
        self._acting.pop(result.id, None)

    async def _pass(self) -> Report:
        desired = self.desired
        started = time.monotonic()
        self._set_phase("starting a pass")
        if self.parking is not None:   # the gate knows the instances that park now
            await self.parking.follow(desired)
        try:
            report, running = await self._worker.run(self._pass_in_worker(desired))
        except (LockHeld, OSError) as exc:
            log.error("reconcile pass failed while %s: %s", self._phase, exc)
            report, running = Report(failure=f"{self._phase}: {exc}"), []
        except Exception as exc:  # a defect: the pass failed, the loop goes on
            log.error("reconcile pass failed while %s", self._phase, exc_info=exc)
            report = Report(failure=f"{self._phase}: unexpected {type(exc).__name__}: {exc}")
            running = []
        finally:
            self._set_phase(None)
        self.pass_counters.count(report)
        if any(result.outcome == "changed" for result in report.results):   # a start, a new data dir
            self.disk.refresh_soon()
        for result in report.results:
            if result.outcome != "ok":
                log.info("%s", result.line())
        await self.proxy_keys_changed()   # a started instance's key works, a removed one's does not
        self._exit_watches.watch(running)
        self.last_pass_at = utc_now()
        self.last_pass_ms = round((time.monotonic() - started) * 1000, 1)
        self.changed_at = time.monotonic()
        self.events.passed(report, self.last_pass_at, self.last_pass_ms)
        return report

    async def proxy_keys_changed(self) -> None:
        # the proxy also follows the key folder itself: this makes a change count before the answer
        if self.proxy is not None and not await self.proxy.reload_keys():
            log.error("could not make the key-pool proxy read the instances' proxy keys now; it reads them "
                      "as it sees their folder change")

    async def _liveness_loop(self) -> None:
        """Every ``resync``, ask each running instance's health route; the supervisor restarts one
        that keeps failing (a hung server keeps its pid, so the exit watch cannot see it)."""
        while True:  # until cancelled
            await asyncio.sleep(self.desired.settings.resync)
            try:
                if self.supervisor.learn_health(await liveness.check(self.runtime(self.desired, readonly=True, checks=self._checks), self.desired, self.last_report)):
                    self._wake.set()
            except Exception:  # logged with its traceback; one bad round must not stop the checks
                log.exception("liveness check failed")

    async def _pass_in_worker(self, desired: DesiredState) -> tuple[Report, list[tuple[int, str]]]:
        """One pass, on the worker thread's loop: everything here may block."""
        report = await reconcile(
            self.runtime(desired, checks=self._pass_checks), desired, lock_timeout=PASS_LOCK_WAIT,
            hints=self.supervisor.hints,
            on_phase=lambda phase: self._from_worker(self._set_phase, phase),
            on_action=lambda action: self._from_worker(self._action_began, action),
            on_result=lambda result: self._from_worker(self._result_came, result))
        self._from_worker(self._set_phase, "finishing the pass")
        self.supervisor.learn(report.observed, report.results)
        for spec in desired.instances:
            rotate_log(self.state.log_path(spec.id), desired.settings.logs.max_size, desired.settings.logs.keep)
        rotate_log(self.state.pool_log_path, desired.settings.logs.max_size, desired.settings.logs.keep)
        running = [(record.pid, record.id) for record in self.state.records().values()
                   if record.pid is not None and record.pid not in self._exit_watches
                   and live_process(record.pid, record.create_time) is not None]
        return report, running

    def _parked_or_woken(self, record: Record | None) -> None:
        """Listings observe again; a woken instance's process is watched as a pass's would be."""
        self.changed_at = time.monotonic()
        if record is not None and record.pid is not None:
            self._exit_watches.watch([(record.pid, record.id)])

    def _disk_changed(self) -> None:
        """A walk changed a data dir's figure: listings observe again, and the page hears of it."""
        self.changed_at = time.monotonic()
        self.events.publish("disk", {"total": self.disk.total(), "at": self.disk.measured_at})

    def _exited(self, pid: int, id_: str) -> None:
        self.changed_at = time.monotonic()
        self._wake.set()

    async def _watch(self) -> None:
        # the first wake comes when the watch is in place: a save made before it is read then
        async for _ in changes_of(self.file.path, self._stop):
            await self.reload()

    def _give_up(self, name: str, why: str) -> None:
        self.fatal = why
        self._stop.set()

    # -- running

    async def run(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.state.ensure()
        loop = self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        async with self.state.alock("daemon", timeout=0):
            # the proxy first: once the API answers, so does the pool
            proxy = self.proxy = PoolProcess(self.state, self.file.path, lambda: self.desired)
            try:
                await proxy.start()   # adopts the proxy a previous cst serve left running
            except PoolStartFailed as exc:
                await proxy.close()
                self.proxy = None
                raise DaemonError(str(exc)) from None
            except BaseException:   # cancelled or a defect: a proxy this start began is not left behind
                await proxy.stop_started()
                await proxy.close()
                raise
            app = make_app(self, admin_key(self.desired, self.state))
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            listen = self.desired.settings.api.listen
            try:
                await runner.setup()
                site = web.TCPSite(runner, listen.host, listen.port, ssl_context=ssl_context)
                try:
                    await site.start()
                except OSError as exc:
                    raise DaemonError(f"cannot listen on {listen} (settings.api.listen): {exc.strerror}") from None
                self.parking = Parking(lambda: self.desired, self.runtime, self.state, self.supervisor, self.events,
                                       self.parking_counters, proxy.in_flight, self._parked_or_woken)
                await self.parking.start()
                await self.parking.follow(self.desired)
            except BaseException:   # nothing of a failed start is left behind, a proxy it began included
                await proxy.stop_started()
                await proxy.close()
                await runner.cleanup()
                raise
            scheme = "https" if ssl_context else "http"
            print(f"cst serve: API on {scheme}://{listen}, key-pool proxy on http://{self.desired.settings.proxy.listen}/v1, "
                  f"watching {self.file.path}", flush=True)
            await self.git.start()
            self._worker.start()
            self._wake.set()  # first pass at once: adopt what runs, start what is missing
            self.tasks.keep("reconcile-loop", self._reconcile_loop)
            self.tasks.keep("file-watcher", self._watch)
            self.tasks.keep("key-pool-proxy", proxy.supervise)
            self.tasks.keep("liveness", self._liveness_loop)
            self.tasks.keep("git-follower", self.git.follow)
            self.backups = BackupScheduler(lambda: self.desired, self.state)   # settings.backups
            self.tasks.keep("backups", self.backups.run)
            self.tasks.keep("parking", self.parking.run)
            self.tasks.keep("disk-use", self.disk.run)
            try:
                await self._stop.wait()
                if self.fatal is None:
                    log.info("stopping; instances keep running and the next cst serve or cst apply adopts them")
            finally:
                await self.tasks.close()
                if not await self._worker.close(cleanup=self._pass_checks.close):
                    log.warning("a reconcile pass is stuck in a blocking call; exiting without waiting for it")
                await self.parking.close()
                await proxy.close()   # the proxy keeps running, with its chats; the next cst serve adopts it
                self._exit_watches.close()
                await self._checks.close()
                await runner.cleanup()
        if self.fatal is not None:
            raise DaemonError(f"{self.fatal}; exiting so that a service manager can start cst serve afresh")


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
