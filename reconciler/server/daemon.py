"""``cst serve``: one asyncio process that keeps reality equal to desired.yaml.

Three things wake the reconcile loop: the file changing on disk (watchfiles,
debounced), an API call that changed the file, and the resync timer that
repairs drift nobody announced (a killed instance). One pass runs at a time;
a caller that needs its change applied waits for a pass that started after it.
An invalid file is reported and ignored: the last valid desired state stays in force.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import ssl
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.service import ProxyService

from ..desired.model import DesiredState
from ..desired.shared_file import DesiredFile, Snapshot
from ..desired.watch import changes_of
from ..engine.reconcile import Report, Result, reconcile
from ..engine.supervision import Supervisor
from ..runtime.local import LocalRuntime, live_process, utc_now
from ..runtime.logs import rotate_log
from ..runtime.statedir import LockHeld, StateDir
from .api import make_app
from .events import EventHub
from .keypool import pool_document

log = logging.getLogger("cst.serve")


class DaemonError(Exception):
    pass


class Daemon:
    def __init__(self, file: DesiredFile, snapshot: Snapshot):
        if not snapshot.valid:
            raise DaemonError("\n".join(str(p) for p in snapshot.problems))
        self.file = file
        self.snapshot = snapshot                 # the file as last read (may be invalid)
        self.desired: DesiredState = snapshot.desired  # the last valid desired state: what is enforced
        self.enforced_sha256 = snapshot.sha256
        self.pid = os.getpid()
        self.state = StateDir(self.desired.settings.state_dir)
        self.supervisor = Supervisor(self.desired)
        self.started_at = utc_now()
        self.last_report: Report | None = None
        self.last_pass_at: str | None = None
        self.last_pass_ms: float | None = None
        self._requested = 0
        self._completed = 0
        self._done = asyncio.Condition()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.proxy: Any = None                   # the key-pool proxy, when it runs in this process
        self._exit_watches: dict[int, int] = {}  # pid -> pidfd of each instance process we watch
        self._background: set[asyncio.Task] = set()
        self.events = EventHub(pool=lambda: pool_document(self.proxy))

    # -- the desired state

    def accept(self, snapshot: Snapshot) -> None:
        """Take a new reading of the file: enforce it if valid, report it if not."""
        previous = self.snapshot
        self.snapshot = snapshot
        self.events.file_read(previous, snapshot)
        if not snapshot.valid:
            for problem in snapshot.problems:
                log.error("desired.yaml is invalid, keeping the last valid state: %s", problem)
            return
        if snapshot.sha256 == previous.sha256 and previous.valid:
            return
        restart_needed = [name for name, old, new in (
            ("settings.api", self.desired.settings.api, snapshot.desired.settings.api),
            ("settings.state_dir", self.desired.settings.state_dir, snapshot.desired.settings.state_dir),
        ) if old != new]
        for name in restart_needed:
            log.warning("%s changed: restart cst serve for it to take effect", name)
        self.desired = snapshot.desired
        self.enforced_sha256 = snapshot.sha256
        self.supervisor.desired = snapshot.desired
        if self.proxy is not None:
            task = asyncio.get_running_loop().create_task(self.proxy.apply(snapshot.desired))
            self._background.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._background.discard)
        self._wake.set()

    def reload(self) -> None:
        self.accept(self.file.read())

    # -- reconciling

    async def converge(self) -> Report:
        """Ask for a pass and wait for one that started after this call; its report."""
        self._requested += 1
        ticket = self._requested
        self._wake.set()
        async with self._done:
            await self._done.wait_for(lambda: self._completed >= ticket)
        return self.last_report

    async def _reconcile_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.desired.settings.resync)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            ticket = self._requested
            report = await self._pass()
            async with self._done:
                self.last_report = report
                self._completed = ticket
                self._done.notify_all()

    async def _pass(self) -> Report:
        desired = self.desired
        started = time.monotonic()
        try:
            report = await reconcile(desired, lock_timeout=120, hints=self.supervisor.hints)
        except (LockHeld, OSError) as exc:
            log.error("reconcile pass failed: %s", exc)
            report = Report(results=[Result("reconcile", "failed", str(exc))])
        else:
            self.supervisor.learn(report.observed, report.results)
        for result in report.results:
            if result.outcome != "ok":
                log.info("%s", result.line())
        await self.proxy_keys_changed()   # a started instance's key works, a removed one's does not
        for spec in desired.instances:
            rotate_log(self.state.log_path(spec.id), desired.settings.logs.max_size, desired.settings.logs.keep)
        self._watch_exits()
        self.last_pass_at = utc_now()
        self.last_pass_ms = round((time.monotonic() - started) * 1000, 1)
        self.events.passed(report, self.last_pass_at, self.last_pass_ms)
        return report

    async def proxy_keys_changed(self) -> None:
        if self.proxy is not None:
            try:
                await self.proxy.reload_instance_keys()
            except OSError as exc:
                log.error("could not read the instances' proxy keys: %s", exc)

    async def _liveness_loop(self) -> None:
        """Every ``resync``, ask each running instance's health route; the supervisor restarts one
        that keeps failing (a hung server keeps its pid, so the exit watch cannot see it)."""
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self.desired.settings.resync)
            except asyncio.TimeoutError:
                pass
            else:
                return
            try:
                if self.supervisor.learn_health(await self._check_liveness()):
                    self._wake.set()
            except Exception:   # never silently, and the next round tries again
                log.exception("liveness check failed")

    async def _check_liveness(self) -> dict[str, str | None]:
        """Probe the processes the last pass found running and left alone (not one being started)."""
        report = self.last_report
        if report is None:
            return {}
        runtime = LocalRuntime(self.desired)
        now = await asyncio.to_thread(runtime.observe)
        specs = []
        for spec in self.desired.instances:
            result, before, seen = report.result(spec.id), report.observed.get(spec.id), now.get(spec.id)
            if (result is not None and result.outcome == "ok" and before is not None and seen is not None
                    and before.status == seen.status == "running" and before.pid == seen.pid):
                specs.append(spec)
        answers = await asyncio.gather(*(runtime.probe(spec) for spec in specs))
        return dict(zip((spec.id for spec in specs), answers))

    def _watch_exits(self) -> None:
        """Wake the loop the moment an instance process exits, rather than at the next resync.

        A pidfd refers to one process, not to a pid number, and works for processes adopted from
        an earlier run, which are not our children."""
        if not hasattr(os, "pidfd_open"):
            return
        loop = asyncio.get_running_loop()
        for record in self.state.records().values():
            if record.pid is None or record.pid in self._exit_watches:
                continue
            if live_process(record.pid, record.create_time) is None:
                continue
            try:
                pidfd = os.pidfd_open(record.pid)
            except OSError:
                continue
            self._exit_watches[record.pid] = pidfd
            loop.add_reader(pidfd, self._exited, record.pid, record.id)

    def _exited(self, pid: int, id_: str) -> None:
        pidfd = self._exit_watches.pop(pid)
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        log.debug("%s (pid %d) exited", id_, pid)
        self._wake.set()

    async def _watch(self) -> None:
        async for _ in changes_of(self.file.path, self._stop):
            self.reload()

    # -- running

    def admin_key(self) -> str:
        env = self.desired.settings.api.admin_key_env
        value = os.environ.get(env)
        if value:
            return value
        self.state.ensure()
        where = self.state.secret_path("admin.key")
        key = self.state.read_secret("admin.key")
        if key is not None:  # printed once, when made: logs (journald, CI) must not collect it
            print(f"cst serve: {env} is not set; using the admin key kept in {where}", flush=True)
            return key
        key = self.state.secret("admin.key", lambda: secrets.token_urlsafe(32))
        print(f"cst serve: {env} is not set; admin key generated and kept in {where} (0600): {key}", flush=True)
        return key

    async def run(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.state.ensure()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        async with self.state.alock("daemon", timeout=0):
            app = make_app(self, self.admin_key())
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            listen = self.desired.settings.api.listen
            site = web.TCPSite(runner, listen.host, listen.port, ssl_context=ssl_context)
            try:
                await site.start()
            except OSError as exc:
                await runner.cleanup()
                raise DaemonError(f"cannot listen on {listen} (settings.api.listen): {exc.strerror}") from None
            self.proxy = ProxyService(self.desired)
            try:
                await self.proxy.start()
            except OSError as exc:
                self.proxy = None
                await runner.cleanup()
                raise DaemonError(f"cannot start the key-pool proxy on {self.desired.settings.proxy.listen} "
                                  f"(settings.proxy.listen): {exc.strerror or exc}") from None
            scheme = "https" if ssl_context else "http"
            print(f"cst serve: API on {scheme}://{listen}, key-pool proxy on http://{self.desired.settings.proxy.listen}/v1, "
                  f"watching {self.file.path}", flush=True)
            self._wake.set()  # first pass at once: adopt what runs, start what is missing
            tasks = [asyncio.create_task(self._reconcile_loop()), asyncio.create_task(self._watch()),
                     asyncio.create_task(self._liveness_loop())]
            try:
                await self._stop.wait()
                log.info("stopping; instances keep running and the next cst serve or cst apply adopts them")
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if self.proxy is not None:
                    await self.proxy.stop()
                for pid in list(self._exit_watches):
                    pidfd = self._exit_watches.pop(pid)
                    loop.remove_reader(pidfd)
                    os.close(pidfd)
                await runner.cleanup()


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
