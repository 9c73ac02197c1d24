"""The local process runtime: SillyTavern servers as processes on this machine.

It observes (records + process table + ports), and it acts (start, stop,
archive). Identity is never a bare pid: a record holds the pid *and* the
process's start time, and a process found on a port without a record is ours
only if its environment carries our instance id and state dir.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import psutil

from . import overlay, sillytavern, wiring
from ..desired.model import DesiredState, InstanceSpec
from ..desired.secret_source import SecretUnavailable, read_secret
from ..files import private_dir
from .base import LaunchImpossible, Observed, Preparation, StartFailed
from .environment import child_environment
from .instance_keys import InstanceKeys
from .logs import open_log, rotate_log, tail
from .statedir import Record, StateDir

# environment markers that let a later run recognise its own processes
ENV_INSTANCE = "CST_INSTANCE_ID"
ENV_STATE_DIR = "CST_STATE_DIR"
ENV_FINGERPRINT = "CST_FINGERPRINT"
# what CST's server plugin reads (see stsource-changed/plugins/cst/): the proxy, and the file with
# the instance's own proxy key (a path, not the key: the environment of a process is readable in /proc)
ENV_PROXY_URL = "CST_PROXY_URL"
ENV_PROXY_KEY_FILE = "CST_PROXY_KEY_FILE"
HEALTH_PATH = "/api/plugins/cst/health"   # the overlay's health route: readiness and liveness
# what an instance creates (chats, settings, its config.yaml) is its owner's alone
_INSTANCE_UMASK = 0o077
_POLL = 0.05   # readiness and exit polling: a localhost connect or a /proc read, cheap
PROBE_TIMEOUT = 5.0   # the liveness probe: a healthy instance answers in milliseconds


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one instance. Holds its password: never print or log it."""

    id: str
    port: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    data_dir: Path
    workdir: Path
    log: Path
    password: str
    probe_host: str
    fingerprint: str


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


def _listeners(ports: set[int]) -> dict[int, int | None]:
    """pid listening on each of ``ports`` (None when the kernel will not say)."""
    found: dict[int, int | None] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in ports:
            if found.get(conn.laddr.port) is None:
                found[conn.laddr.port] = conn.pid
    return found


def _describe(pid: int | None) -> str:
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
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class LocalRuntime:
    def __init__(self, desired: DesiredState, readonly: bool = False):
        self.desired = desired
        self.readonly = readonly  # --check: look, generate nothing
        self.settings = desired.settings
        self.state = StateDir(desired.settings.state_dir)
        self.keys = InstanceKeys(self.state)

    # -- resolving desired.yaml into launch specs (reads env and secrets: the edge, not the planner)

    def server_release(self) -> sillytavern.Release:
        st = self.settings.sillytavern
        if st.server is not None:
            return sillytavern.Release(st.server, None)
        return sillytavern.release_of(st.version, self.settings.state_dir)

    def password(self, spec: InstanceSpec) -> str:
        """The instance's basic-auth password: from its variable if declared, else the generated one.

        Raises LaunchImpossible when the declared variable is unset."""
        if spec.password_env:
            try:
                return read_secret(env=spec.password_env, what=f"password of {spec.id}")
            except SecretUnavailable as exc:
                raise LaunchImpossible(str(exc)) from None
        if self.readonly:
            return self.state.read_secret(f"{spec.id}.password") or ""
        return self.state.secret(f"{spec.id}.password")

    def release_identity(self) -> str:
        """What the file says to run: the release's version, or the server.js it names. Not where
        this shell found them, so `cst apply` from CI (another PATH, $CST_SILLYTAVERN_HOME
        spelled another way) agrees with the daemon about what runs."""
        st = self.settings.sillytavern
        return f"server {st.server}" if st.server is not None else f"sillytavern@{st.version}"

    def launch_spec(self, spec: InstanceSpec) -> LaunchSpec:
        st = self.settings.sillytavern
        data_dir = self.desired.data_dir(spec.port)
        workdir = self.state.workdir(spec.id)
        password = self.password(spec)
        flags = (
            "--port", str(spec.port),
            "--dataRoot", str(data_dir),
            "--configPath", str(workdir / "config.yaml"),
            "--listen", "true",
            "--listenAddressIPv4", st.listen_address,
            "--enableIPv6", "false",
            "--whitelist", "false",
            "--basicAuthMode", "true",
            "--browserLaunchEnabled", "false",
        )
        argv = (shutil.which("node") or "node", str(self.server_release().server_js), *flags)
        cst_env = {**overlay.environ_flags(), **self._proxy_env(spec)}
        # everything a restart would change, as the file and the release say it: not the node binary
        # or install folder this process resolved
        digest = hashlib.sha256(json.dumps([self.release_identity(), flags, password, cst_env]).encode()).hexdigest()[:16]
        env = child_environment({
            **sillytavern.outside_our_git(self.server_release().package_dir),
            "SILLYTAVERN_BASICAUTHUSER_USERNAME": spec.id,
            "SILLYTAVERN_BASICAUTHUSER_PASSWORD": password,
            **cst_env,
            ENV_INSTANCE: spec.id,
            ENV_STATE_DIR: str(self.state.root),
            ENV_FINGERPRINT: digest,
        })
        probe_host = "127.0.0.1" if st.listen_address == "0.0.0.0" else st.listen_address
        return LaunchSpec(spec.id, spec.port, argv, tuple(sorted(env.items())), data_dir, workdir,
                          self.state.log_path(spec.id), password, probe_host, digest)

    def _proxy_env(self, spec: InstanceSpec) -> dict[str, str]:
        if not spec.proxy:
            return {}
        return {ENV_PROXY_URL: self.settings.proxy.local_url, ENV_PROXY_KEY_FILE: str(self.keys.path(spec.id))}

    def launch_fingerprint(self, spec: InstanceSpec) -> str:
        return self.launch_spec(spec).fingerprint

    # -- observing

    def lock(self, timeout: float):
        return self.state.alock(timeout=timeout)

    async def prepare(self) -> Preparation:
        """Install the pinned SillyTavern and CST's overlay on first need; refuse a package that
        fails verification (the pinned release plus the overlay, each file unchanged)."""
        st = self.settings.sillytavern
        if st.server is not None:
            missing = None if st.server.is_file() else f"settings.sillytavern.server: {st.server} does not exist"
            return Preparation(str(st.server), failure=missing)
        subject = f"sillytavern {st.version}"
        try:
            done = await asyncio.to_thread(sillytavern.ready, st.version, self.settings.state_dir)
        except (sillytavern.InstallError, overlay.OverlayError, OSError) as exc:
            return Preparation(subject, failure=str(exc))
        return Preparation(subject, done=done)

    def observe(self, records: dict[str, Record] | None = None) -> dict[str, Observed]:
        """What runs now: every recorded instance, plus whoever holds a declared port."""
        observed: dict[str, Observed] = {}
        for record in (self.state.records() if records is None else records).values():
            if record.pid is None:
                observed[record.id] = Observed(record.id, record.port, "stopped")
            elif live_process(record.pid, record.create_time):
                observed[record.id] = Observed(record.id, record.port, "running", record.pid, record.fingerprint,
                                               create_time=record.create_time)
            else:
                observed[record.id] = Observed(record.id, record.port, "crashed", record.pid, record.fingerprint)

        host = self.settings.sillytavern.listen_address
        unsure = {i.port: i.id for i in self.desired.instances
                  if getattr(observed.get(i.id), "status", None) != "running"}
        busy = {port for port in unsure if not port_is_free(host, port)}
        holders = _listeners(busy) if busy else {}
        for port in busy:
            id_, pid = unsure[port], holders.get(port)
            fingerprint = self._our_process(pid, id_)
            if fingerprint is not None:
                observed[id_] = Observed(id_, port, "running", pid, fingerprint, adopted=True,
                                         create_time=psutil.Process(pid).create_time())
            else:
                observed[id_] = Observed(id_, port, "port-taken", holder=_describe(pid))
        # a process spawned by a cst killed before it wrote the record, not listening yet: ours all
        # the same, and starting another beside it would run the instance twice
        starting = {i.id for i in self.desired.instances if i.state == "running"
                    and i.port in unsure and i.port not in busy}
        spawned: dict[str, Observed] = {}
        for seen in self._spawned_without_record(starting) if starting else []:
            spawned.setdefault(seen.id, seen)
        observed.update(spawned)
        return observed

    def _spawned_without_record(self, ids: set[str]) -> list[Observed]:
        """Live processes whose environment names one of ``ids`` and this state dir."""
        ports = {i.id: i.port for i in self.desired.instances}
        found: list[Observed] = []
        for proc in psutil.process_iter():
            try:
                with proc.oneshot():
                    env = proc.environ()
                    if (env.get(ENV_INSTANCE) not in ids or env.get(ENV_STATE_DIR) != str(self.state.root)
                            or proc.status() == psutil.STATUS_ZOMBIE):
                        continue
                    id_ = env[ENV_INSTANCE]
                    found.append(Observed(id_, ports[id_], "running", proc.pid, env.get(ENV_FINGERPRINT, ""),
                                          adopted=True, create_time=proc.create_time()))
            except psutil.Error:
                continue
        return found

    def _our_process(self, pid: int | None, id_: str) -> str | None:
        """The fingerprint of ``pid`` if it is instance ``id_`` started from this state dir."""
        if pid is None:
            return None
        try:
            env = psutil.Process(pid).environ()
        except psutil.Error:
            return None
        if env.get(ENV_INSTANCE) == id_ and env.get(ENV_STATE_DIR) == str(self.state.root):
            return env.get(ENV_FINGERPRINT, "")
        return None

    # -- acting

    def adopt(self, id_: str, port: int, pid: int) -> None:
        proc = psutil.Process(pid)
        previous = self.state.record(id_)
        self.state.save(Record(
            id=id_, port=port, data_dir=str(self.desired.data_dir(port)), pid=pid,
            create_time=proc.create_time(), argv=proc.cmdline(),
            fingerprint=proc.environ().get(ENV_FINGERPRINT),
            started_at=iso_utc(proc.create_time()),
            restarts=previous.restarts if previous else 0))

    def forget_pid(self, id_: str) -> None:
        record = self.state.record(id_)
        if record:
            record.pid = record.create_time = None
            self.state.save(record)

    async def start(self, spec: InstanceSpec, count_restart: bool = False) -> Record:
        """Start the process and wait until its port answers with basic auth; raises StartFailed."""
        launch = self.launch_spec(spec)
        self.state.ensure()
        private_dir(self.settings.data_root)
        private_dir(launch.data_dir)
        private_dir(launch.workdir)
        sillytavern.prefill_webpack_cache(self.server_release(), launch.data_dir)
        wired = self._wire(spec, launch.data_dir)
        previous = self.state.record(launch.id)
        rotate_log(launch.log, self.settings.logs.max_size, self.settings.logs.keep)
        with open_log(launch.log) as log:
            log.write(f"\n--- cst: starting {launch.id} at {utc_now()}\n".encode())
            if wired:
                log.write(f"--- cst: {wired}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                launch.argv, cwd=launch.workdir, env=dict(launch.env), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                umask=_INSTANCE_UMASK)
        record = Record(
            id=launch.id, port=launch.port, data_dir=str(launch.data_dir), pid=proc.pid,
            create_time=psutil.Process(proc.pid).create_time(), argv=list(launch.argv),
            fingerprint=launch.fingerprint, started_at=utc_now(),
            restarts=(previous.restarts if previous else 0) + (1 if count_restart else 0))
        self.state.save(record)  # written at once: a crash from here on still knows the pid
        try:
            await self._wait_ready(launch, proc)
        except StartFailed:
            await self._stop(record)
            raise
        return record

    def _wire(self, spec: InstanceSpec, data_dir: Path) -> str:
        """The instance's proxy key (minted, or revoked with ``proxy: false``) and its first-start
        chat settings; what was done, for the instance's log."""
        if not spec.proxy:
            return "proxy: false, proxy key revoked" if self.keys.revoke(spec.id) else ""
        key = self.keys.ensure(spec.id)
        try:
            return wiring.wire(data_dir, self.server_release().package_dir, self.settings.proxy.local_url, key)
        except (OSError, ValueError) as exc:   # the instance still starts; the log says why it is not wired
            return f"could not wire the chat API to the key pool: {exc}"

    def rotate_key(self, spec: InstanceSpec) -> str:
        """Give the instance a new proxy key; the old one stops working as soon as the proxy reads
        the key folder. Where the instance stored the old key (its custom endpoint's secret), the
        new one goes. Returns the new key."""
        old, new = self.keys.rotate(spec.id)
        if old:
            wiring.replace_key(self.desired.data_dir(spec.port), old, new)
        return new

    async def _wait_ready(self, launch: LaunchSpec, proc: subprocess.Popen) -> None:
        health = self.server_release().has_overlay
        url = f"http://{launch.probe_host}:{launch.port}{HEALTH_PATH}"
        auth = aiohttp.BasicAuth(launch.id, launch.password)
        deadline = time.monotonic() + self.settings.sillytavern.start_timeout
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if proc.poll() is not None:
                    raise StartFailed(f"exited with code {proc.returncode} before answering; "
                                      f"last log lines:\n{self.log_tail(launch.id)}")
                try:
                    async with session.get(url, allow_redirects=False) as anon:
                        anonymous = anon.status
                    if anonymous == 401:
                        async with session.get(url, auth=auth, allow_redirects=False) as authed:
                            if authed.status == 200:
                                return
                            if authed.status == 404 and not health:
                                # your own checkout without CST's plugin: its front page will do
                                async with session.get(url.removesuffix(HEALTH_PATH) + "/", auth=auth,
                                                       allow_redirects=False) as page:
                                    if page.status == 200:
                                        return
                            raise StartFailed(f"port {launch.port} answers but refuses the instance's "
                                              f"credentials or has no health route ({HEALTH_PATH}: "
                                              f"HTTP {authed.status})")
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    pass
                if time.monotonic() >= deadline:
                    raise StartFailed(f"port {launch.port} did not answer within "
                                      f"{self.settings.sillytavern.start_timeout:g}s; last log lines:\n"
                                      f"{self.log_tail(launch.id)}")
                await asyncio.sleep(_POLL)

    async def probe(self, spec: InstanceSpec) -> str | None:
        """The liveness probe: None when the running instance answers its health route, else why not."""
        launch = self.launch_spec(spec)
        url = f"http://{launch.probe_host}:{launch.port}{HEALTH_PATH}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as session:
                async with session.get(url, auth=aiohttp.BasicAuth(launch.id, launch.password),
                                       allow_redirects=False) as answer:
                    if answer.status == 200 or (answer.status == 404 and not self.server_release().has_overlay):
                        return None
                    return f"its health route answered HTTP {answer.status}"
        except asyncio.TimeoutError:
            return f"its health route did not answer within {PROBE_TIMEOUT:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return f"its health route could not be reached ({exc})"

    async def stop(self, id_: str) -> None:
        record = self.state.record(id_)
        if record is None:
            raise OSError(f"no record for {id_} in {self.state.root}")
        await self._stop(record)

    async def _stop(self, record: Record) -> None:
        """SIGTERM the instance's process group, SIGKILL after ``stop_timeout``; then clear the pid."""
        proc = live_process(record.pid, record.create_time)
        if proc is not None:
            self._signal_group(record.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.settings.sillytavern.stop_timeout
            while live_process(record.pid, record.create_time) and time.monotonic() < deadline:
                await asyncio.sleep(_POLL)
            if live_process(record.pid, record.create_time):
                self._signal_group(record.pid, signal.SIGKILL)
                while live_process(record.pid, record.create_time):
                    await asyncio.sleep(_POLL)
        record.pid = record.create_time = None
        self.state.save(record)

    @staticmethod
    def _signal_group(pid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pid, sig)  # started with its own session, so its group id is its pid
        except ProcessLookupError:
            pass

    async def archive(self, id_: str) -> Path | None:
        """Revoke the instance's proxy key, stop it, move its data dir into the archive, drop its
        record and secret."""
        self.keys.revoke(id_)   # first: a removed instance must not use the pool while it stops
        record = self.state.record(id_)
        if record is None:
            return None
        await self._stop(record)
        archived = self._move_to_archive(Path(record.data_dir), id_)
        shutil.rmtree(self.state.workdir(id_), ignore_errors=True)
        self.state.drop_secret(f"{id_}.password")
        self.state.forget(id_)
        return archived

    def _move_to_archive(self, data_dir: Path, id_: str) -> Path | None:
        if not data_dir.exists():
            return None
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = self.state.archive_dir / f"{id_}-{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = self.state.archive_dir / f"{id_}-{stamp}-{n}"
        private_dir(target.parent)
        shutil.move(str(data_dir), str(target))  # a rename on one filesystem; copy then delete across
        return target

    def log_tail(self, id_: str) -> str:
        return tail(self.state.log_path(id_))
