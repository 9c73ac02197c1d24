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
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timezone
from pathlib import Path

import psutil

from ..desired.model import DesiredState, InstanceSpec
from ..desired.secret_source import SecretUnavailable, read_secret
from ..files import private_dir
from . import instance_users, overlay, sillytavern, wiring
from .base import LaunchImpossible, Observed, Preparation, StartFailed
from .environment import child_environment
from .health import HealthChecks
from .instance_keys import InstanceKeys
from .launch import (
    ENV_FINGERPRINT,
    ENV_INSTANCE,
    ENV_PROXY_KEY_FILE,
    ENV_PROXY_URL,
    ENV_RELEASE,
    ENV_STATE_DIR,
    LEAN_ENV,
    LEAN_NODE_FLAGS,
    LaunchSpec,
)
from .logs import open_log, rotate_log, tail
from .observe import observe
from .processes import free_loopback_port, iso_utc, live_process, terminate, utc_now
from .snapshots import Snapshots
from .statedir import Record, StateDir

# what an instance creates (chats, settings, its config.yaml) is its owner's alone
_INSTANCE_UMASK = 0o077
# an instance under a user of its own reads its proxy key from this file of its workdir (0400, its own)
KEY_COPY = "proxy.key"


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

    def release_for(self, spec: InstanceSpec) -> sillytavern.Release:
        """Where the server ``spec`` runs lives: the checkout ``settings.sillytavern.server`` names
        (every instance's), else the npm release of the instance's version, its own or the fleet's."""
        st = self.settings.sillytavern
        if st.server is not None:
            return sillytavern.Release(st.server, None)
        return sillytavern.release_of(self.desired.version_of(spec), self.settings.state_dir)

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

    def release_identity(self, spec: InstanceSpec) -> str:
        """What the file says ``spec`` runs: its release's version ("sillytavern@1.19.0"), or the
        server.js it names ("server /path/server.js"). Not where this shell found them, so `cst
        apply` from CI (another PATH, $CST_SILLYTAVERN_HOME spelled another way) agrees with the
        daemon about what runs. Part of the fingerprint, in the process's environment
        (``ENV_RELEASE``) and in its record: what a rollout compares."""
        st = self.settings.sillytavern
        return f"server {st.server}" if st.server is not None else sillytavern.identity(self.desired.version_of(spec))

    def instance_user(self, spec: InstanceSpec) -> instance_users.InstanceUser | None:
        """The user the instance runs as; None for cst's own (cst is not root, or the file says so)."""
        return instance_users.user_for(self.settings.sillytavern.users, spec.port)

    def _release(self, spec: InstanceSpec, identity: str | None) -> tuple[sillytavern.Release, str]:
        """The release ``spec`` runs and its identity: the file's, or the one named (a rollback runs
        the release an instance ran before, which the file no longer names)."""
        if identity is None:
            return self.release_for(spec), self.release_identity(spec)
        return sillytavern.release_of_identity(identity, self.settings.state_dir), identity

    def launch_spec(self, spec: InstanceSpec, release: str | None = None, backend_port: int | None = None) -> LaunchSpec:
        """What starting ``spec`` takes; on ``release`` (an identity) instead of the file's when given.

        An instance with ``park_after`` is behind cst serve's front door: node listens on a
        loopback port of its own (``backend_port`` for a start; else the one its record names,
        where it answers now) and the door holds the instance's port."""
        st = self.settings.sillytavern
        data_dir = self.desired.data_dir(spec.port)
        workdir = self.state.workdir(spec.id)
        password = self.password(spec)
        user = self.instance_user(spec)
        fronted = spec.park_after is not None
        if fronted and backend_port is None:
            record = self.state.record(spec.id)
            backend_port = record.backend_port if record and record.backend_port else 0
        listen_port, listen_address = (backend_port or 0, "127.0.0.1") if fronted else (spec.port, st.listen_address)

        def flags(port: object) -> tuple[object, ...]:
            return (
                "--port", port,
                "--dataRoot", str(data_dir),
                "--configPath", str(workdir / "config.yaml"),
                "--listen", "true",
                "--listenAddressIPv4", listen_address,
                "--enableIPv6", "false",
                "--whitelist", "false",
                "--basicAuthMode", "true",
                "--browserLaunchEnabled", "false",
            )

        release_of, release_identity = self._release(spec, release)
        node_flags = LEAN_NODE_FLAGS if st.lean else ()
        argv = (shutil.which("node") or "node", *node_flags, str(release_of.server_js),
                *(str(flag) for flag in flags(listen_port)))
        cst_env = {**overlay.environ_flags(), **self._proxy_env(spec, user)}
        # everything a restart would change, as the file and the release say it: not the node binary
        # or install folder this process resolved, nor the loopback port a door's node got this time.
        # The user only when it has one of its own, so an instance of a cst that is not root keeps the
        # fingerprint it had before users existed; the lean profile only when it is on, likewise.
        identity: list[object] = [release_identity, flags("front door" if fronted else str(spec.port)),
                                  password, cst_env]
        if user is not None:
            identity.append([user.uid, user.gid])
        if st.lean:
            identity.append(["lean", node_flags, LEAN_ENV])
        digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
        env = child_environment({
            **sillytavern.outside_our_git(release_of.package_dir),
            **({"HOME": str(workdir)} if user is not None else {}),   # not root's home
            **(LEAN_ENV if st.lean else {}),
            "SILLYTAVERN_BASICAUTHUSER_USERNAME": spec.id,
            "SILLYTAVERN_BASICAUTHUSER_PASSWORD": password,
            **cst_env,
            ENV_INSTANCE: spec.id,
            ENV_STATE_DIR: str(self.state.root),
            ENV_FINGERPRINT: digest,
            ENV_RELEASE: release_identity,
        })
        probe_host = "127.0.0.1" if listen_address == "0.0.0.0" else listen_address
        return LaunchSpec(spec.id, spec.port, argv, tuple(sorted(env.items())), data_dir, workdir,
                          self.state.log_path(spec.id), password, probe_host, listen_port, digest, user,
                          release_identity, backend_port if fronted else None)

    def _proxy_env(self, spec: InstanceSpec, user: instance_users.InstanceUser | None) -> dict[str, str]:
        """Where the instance's plugin finds the proxy and its key: under a user of its own, the
        copy in its workdir (the state dir's key folder is root's alone); else the key itself."""
        if not spec.proxy:
            return {}
        key_file = self.state.workdir(spec.id) / KEY_COPY if user is not None else self.keys.path(spec.id)
        return {ENV_PROXY_URL: self.settings.proxy.local_url, ENV_PROXY_KEY_FILE: str(key_file)}

    def launch_fingerprint(self, spec: InstanceSpec) -> str:
        return self.launch_spec(spec).fingerprint

    # -- observing

    def lock(self, timeout: float) -> AbstractAsyncContextManager[None]:
        return self.state.alock(timeout=timeout)

    async def prepare(self) -> Preparation:
        """Install every release the file uses (the fleet's version and each instance's own) with
        CST's overlay on first need; refuse a package that fails verification (the pinned release
        plus the overlay, each file unchanged). Every release is tried, one after the other (an
        install takes a core for a minute), and a failure names the version and the fields that
        ask for it. A pass prepares before it stops anything, so a release that cannot be had
        leaves every instance as it was."""
        st = self.settings.sillytavern
        if st.server is not None:
            missing = None if st.server.is_file() else f"settings.sillytavern.server: {st.server} does not exist"
            return Preparation(str(st.server), failure=missing)
        done: dict[str, str] = {}
        failed: dict[str, str] = {}
        versions = self.desired.versions()
        for version, fields in versions.items():
            try:
                done[version] = await asyncio.to_thread(sillytavern.ready, version, self.settings.state_dir)
            except sillytavern.Unpublished as exc:   # the file asks for it: say where
                failed[version] = f"{', '.join(fields)}: {exc}"
            except (sillytavern.InstallError, overlay.OverlayError, OSError) as exc:
                failed[version] = str(exc)
        if failed:
            return Preparation(_subject(failed), failure="\n".join(failed.values()),
                               failed_releases=tuple(sillytavern.identity(v) for v in failed))
        did = {version: what for version, what in done.items() if what}
        return Preparation(_subject(did or versions), done="; ".join(
            f"{version}: {what}" if len(did) > 1 else what for version, what in did.items()))

    def observe(self, records: dict[str, Record] | None = None) -> dict[str, Observed]:
        return observe(self.desired, self.state, records)

    # -- acting

    def adopt(self, id_: str, port: int, pid: int) -> None:
        proc = psutil.Process(pid)
        previous = self.state.record(id_)
        environ = proc.environ()
        self.state.save(Record(
            id=id_, port=port, data_dir=str(self.desired.data_dir(port)), pid=pid,
            create_time=proc.create_time(), argv=proc.cmdline(),
            fingerprint=environ.get(ENV_FINGERPRINT),
            started_at=iso_utc(proc.create_time()),
            restarts=previous.restarts if previous else 0,
            release=environ.get(ENV_RELEASE),   # None: started by a cst from before the marker
            backend_port=_backend_port(proc.cmdline(), port)))

    def forget_pid(self, id_: str) -> None:
        record = self.state.record(id_)
        if record:
            record.pid = record.create_time = record.parked_at = None
            self.state.save(record)

    def _prepare_folders(self, launch: LaunchSpec, release: sillytavern.Release) -> str:
        """The instance's data dir and workdir, its own when it has a user of its own (folders from
        before, root's, are given to it here, links never followed), the key copy it reads, and
        the way to them; what was done, for its log. Raises StartFailed when its user could not
        reach a folder, node or server.js, or its uid is not free."""
        user = launch.user
        self.state.ensure(searchable=user is not None)
        if user is None:
            private_dir(self.settings.data_root)
        else:
            instance_users.check_usable(user, launch.port)
            instance_users.searchable(private_dir(self.settings.data_root, 0o701))
        private_dir(launch.data_dir)
        private_dir(launch.workdir)
        if user is None:
            return ""
        given = instance_users.own_tree(launch.data_dir, user) + instance_users.own_tree(launch.workdir, user)
        needed = [(Path(launch.argv[0]), 5), (release.server_js, 4), (launch.data_dir, 1), (launch.workdir, 1)]
        if release.has_overlay:   # CST's plugin: its health route is how a start is seen
            needed.append((release.package_dir / overlay.PLUGIN_ENTRY, 4))
        for path, need in needed:
            problem = instance_users.unreachable(user, path, need)
            if problem:
                raise StartFailed(f"{launch.id} runs as {user}, but {problem}")
        return f"runs as {user}" + (f"; {given} files from before given to it" if given else "")

    async def start(self, spec: InstanceSpec, count_restart: bool = False, release: str | None = None) -> Record:
        """Start the process (on ``release``, an identity, instead of the file's when given) and wait
        until its port answers with basic auth; raises StartFailed."""
        launch = self.launch_spec(spec, release, free_loopback_port() if spec.park_after is not None else None)
        server, _ = self._release(spec, release)
        user = launch.user
        owned = self._prepare_folders(launch, server)
        with instance_users.acting_as(user):   # what cst writes into the data dir is the instance's
            sillytavern.prefill_webpack_cache(server, launch.data_dir)
        wired = self._wire(spec, launch, server)
        previous = self.state.record(launch.id)
        rotate_log(launch.log, self.settings.logs.max_size, self.settings.logs.keep)
        with open_log(launch.log) as log:
            log.write(f"\n--- cst: starting {launch.id} at {utc_now()}\n".encode())
            for done in (owned, wired):
                if done:
                    log.write(f"--- cst: {done}\n".encode())
            log.flush()
            proc = subprocess.Popen(  # noqa: ASYNC220 -- a fork and exec, on the pass's own loop
                launch.argv, cwd=launch.workdir, env=dict(launch.env), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                umask=_INSTANCE_UMASK, user=user.uid if user else None, group=user.gid if user else None,
                extra_groups=[] if user else None)
        record = Record(
            id=launch.id, port=launch.port, data_dir=str(launch.data_dir), pid=proc.pid,
            create_time=psutil.Process(proc.pid).create_time(), argv=list(launch.argv),
            fingerprint=launch.fingerprint, started_at=utc_now(),
            restarts=(previous.restarts if previous else 0) + (1 if count_restart else 0),
            release=launch.release, backend_port=launch.backend_port)
        self.state.save(record)  # written at once: a crash from here on still knows the pid
        try:
            await self.checks.wait_ready(launch, proc, server.has_overlay,
                                         self.settings.sillytavern.start_timeout, lambda: self.log_tail(launch.id))
        except StartFailed:
            await self._stop(record)
            raise
        return record

    def _wire(self, spec: InstanceSpec, launch: LaunchSpec, server: sillytavern.Release) -> str:
        """The instance's proxy key (minted, or revoked with ``proxy: false``; copied where its own
        user reads it) and its first-start chat settings; what was done, for the instance's log."""
        if not spec.proxy:
            self._drop_key_copy(spec.id)
            return "proxy: false, proxy key revoked" if self.keys.revoke(spec.id) else ""
        key = self.keys.ensure(spec.id)
        if launch.user is not None:
            self._copy_key(spec.id, key, launch.user)
        try:
            with instance_users.acting_as(launch.user):
                return wiring.wire(launch.data_dir, server.package_dir,
                                   self.settings.proxy.local_url, key)
        except (OSError, ValueError) as exc:   # the instance still starts; the log says why it is not wired
            return f"could not wire the chat API to the key pool: {exc}"

    def _copy_key(self, id_: str, key: str, user: instance_users.InstanceUser) -> None:
        """The instance's own copy of its key, 0400 and its user's, in its workdir. The proxy keeps
        reading the state dir's key folder: that decides which keys work."""
        instance_users.write_owned(self.state.workdir(id_) / KEY_COPY, key.encode() + b"\n", user, 0o400)

    def _drop_key_copy(self, id_: str) -> None:
        (self.state.workdir(id_) / KEY_COPY).unlink(missing_ok=True)

    def rotate_key(self, spec: InstanceSpec) -> str:
        """Give the instance a new proxy key; the old one stops working as soon as the proxy reads
        the key folder. Where the instance stored the old key (its custom endpoint's secret, and
        the copy its own user reads), the new one goes. Returns the new key."""
        old, new = self.keys.rotate(spec.id)
        user = self.instance_user(spec)
        if user is not None and self.state.workdir(spec.id).is_dir():
            self._copy_key(spec.id, new, user)
        if old:
            with instance_users.acting_as(user):
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

    async def park(self, id_: str) -> None:
        """Stop the instance's process as a stop does (SIGTERM: SillyTavern saves before it exits)
        and remember it as parked: nothing is archived, and cst serve's front door keeps its port."""
        record = self.state.record(id_)
        if record is None:   # never started: parked from the first
            spec = self.desired.instance(id_)
            if spec is None:
                raise OSError(f"{id_} is not declared")
            record = Record(id=id_, port=spec.port, data_dir=str(self.desired.data_dir(spec.port)))
        await terminate(record.pid, record.create_time, self.settings.sillytavern.stop_timeout)
        record.pid = record.create_time = None
        record.parked_at = utc_now()
        self.state.ensure()
        self.state.save(record)

    async def wake(self, spec: InstanceSpec) -> Record:
        """Start a parked (or stopped) instance for a request at its door; a live process is left
        as it is. Its data was last used by another release when the file changed it meanwhile: a
        snapshot first, as a rollout takes one. Raises StartFailed."""
        record = self.state.record(spec.id)
        if record is not None and live_process(record.pid, record.create_time) is not None:
            return record
        if record is not None and record.release not in (None, self.release_identity(spec)):
            await self.snapshot(spec.id, "rollout")
        return await self.start(spec)

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

    # -- what a rollout needs (engine.rollout)

    async def snapshot(self, id_: str, reason: str) -> str:
        spec = self.desired.instance(id_)
        record = self.state.record(id_)
        data_dir = self.desired.data_dir(spec.port) if spec else Path(record.data_dir) if record else None
        if data_dir is None:
            raise OSError(f"{id_} has no data dir to take a snapshot of")
        taken = await asyncio.to_thread(Snapshots(self.state).take, id_, data_dir, reason)
        return taken.id

    async def put_back(self, id_: str, snapshot_id: str) -> Path | None:
        spec = self.desired.instance(id_)
        if spec is None:
            raise OSError(f"{id_} is not declared")
        return await asyncio.to_thread(Snapshots(self.state).put_back, id_, snapshot_id,
                                       self.desired.data_dir(spec.port), self.state.archive_dir)

    async def stays_healthy(self, spec: InstanceSpec, seconds: float) -> str | None:
        launch = await asyncio.to_thread(self.launch_spec, spec)
        return await self.checks.stays_healthy(launch, self.release_for(spec).has_overlay, seconds)

    def rollout_halt(self) -> dict | None:
        return self.state.rollout_halt()

    def record_rollout_halt(self, halt: dict | None) -> None:
        self.state.record_rollout_halt(halt)

    async def remove_unused_releases(self) -> list[str]:
        """Remove the installed npm releases no declared instance and no recorded process uses any
        more (after a rollout completed); the versions removed."""
        if self.settings.sillytavern.server is not None:
            return []
        in_use = {self.desired.version_of(spec) for spec in self.desired.instances}
        in_use.add(self.settings.sillytavern.version)
        for record in self.state.records().values():
            version = (record.release or "").removeprefix("sillytavern@")
            if record.pid is not None and version:
                in_use.add(version)
        return await asyncio.to_thread(sillytavern.remove_unused, self.settings.state_dir, in_use)


def _backend_port(argv: list[str], port: int) -> int | None:
    """The loopback port an adopted node behind the front door listens on (its --port, when that is
    not the instance's own); None for one on its own port."""
    flag = argv.index("--port") if "--port" in argv else -1
    value = argv[flag + 1] if 0 <= flag < len(argv) - 1 else ""
    return int(value) if value.isascii() and value.isdigit() and int(value) != port else None


def _subject(versions: Iterable[str]) -> str:
    """What a preparation was about: "sillytavern 1.19.0", "sillytavern 1.18.0, 1.19.0"."""
    return "sillytavern " + ", ".join(versions)
