"""The local process runtime: SillyTavern servers as processes on this machine.

It resolves desired.yaml into launch specs and acts (start, stop, archive); observing is
``observe``, the process table ``processes``, the health checks ``health``.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timezone
from pathlib import Path

import psutil

from . import overlay, sillytavern, wiring
from ..desired.model import DesiredState, InstanceSpec
from ..desired.secret_source import SecretUnavailable, read_secret
from ..files import private_dir
from .base import LaunchImpossible, Observed, Preparation, StartFailed
from .environment import child_environment
from .health import HealthChecks
from .instance_keys import InstanceKeys
from .launch import (ENV_FINGERPRINT, ENV_INSTANCE, ENV_PROXY_KEY_FILE, ENV_PROXY_URL, ENV_STATE_DIR,
                     LaunchSpec)
from .logs import open_log, rotate_log, tail
from .observe import observe
from .processes import iso_utc, terminate, utc_now
from .statedir import Record, StateDir

# what an instance creates (chats, settings, its config.yaml) is its owner's alone
_INSTANCE_UMASK = 0o077


class LocalRuntime:
    def __init__(self, desired: DesiredState, readonly: bool = False, checks: HealthChecks | None = None):
        """``checks``: the health checks of the loop this runtime acts on, when its caller keeps
        one for longer than a pass; otherwise the runtime makes its own (see ``close``)."""
        self.desired = desired
        self._owns_checks = checks is None
        self.checks = checks or HealthChecks()
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

    def lock(self, timeout: float) -> AbstractAsyncContextManager[None]:
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
        return observe(self.desired, self.state, records)

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
            await self.checks.wait_ready(launch, proc, self.server_release().has_overlay,
                                         self.settings.sillytavern.start_timeout, lambda: self.log_tail(launch.id))
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

    async def close(self) -> None:
        """Close the health checks' session if this runtime made it (on the loop it acted on)."""
        if self._owns_checks:
            await self.checks.close()

    async def stop(self, id_: str) -> None:
        record = self.state.record(id_)
        if record is None:
            raise OSError(f"no record for {id_} in {self.state.root}")
        await self._stop(record)

    async def _stop(self, record: Record) -> None:
        """SIGTERM the instance's process group, SIGKILL after ``stop_timeout``; then clear the pid.
        Raises StopStuck (an OSError) when the process outlives SIGKILL: it stays recorded."""
        await terminate(record.pid, record.create_time, self.settings.sillytavern.stop_timeout)
        record.pid = record.create_time = None
        self.state.save(record)

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
