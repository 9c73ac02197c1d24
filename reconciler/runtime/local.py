"""The local process runtime: SillyTavern servers as processes on this machine.

It resolves desired.yaml into launch specs and acts (start, stop, archive); observing is
``observe``, the process table ``processes``, the health checks ``health``.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from ..desired.model import DesiredState, InstanceSpec
from ..desired.secret_source import SecretUnavailable, read_secret
from ..files import private_dir
from . import edge, instance_users, overlay, sandbox, sillytavern, wiring
from .base import EdgeChange, LaunchImpossible, Observed, Preparation, ReleaseId
from .environment import child_environment
from .health import HealthChecks
from .instance_keys import InstanceKeys
from .launch import (
    ENV_BEHIND_EDGE,
    ENV_FINGERPRINT,
    ENV_INSTANCE,
    ENV_PROXY_KEY_FILE,
    ENV_PROXY_URL,
    ENV_RELEASE,
    ENV_SANDBOXED,
    ENV_STATE_DIR,
    LEAN_ENV,
    LEAN_NODE_FLAGS,
    LaunchSpec,
    host_guard,
    reads_key_copy,
    server_flags,
)
from .launcher import KEY_COPY, Launcher
from .listener import LISTENS, PRELOAD, Address
from .logs import tail
from .observe import observe
from .processes import iso_utc, live_process, terminate, utc_now
from .snapshots import Snapshot, Snapshots
from .statedir import Record, StateDir


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
        self.launcher = Launcher(self.settings, self.state, self.keys, self.checks)

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
        if st.server is not None:
            return str(ReleaseId(server=str(st.server)))
        return sillytavern.identity(self.desired.version_of(spec))

    def instance_user(self, spec: InstanceSpec) -> instance_users.InstanceUser | None:
        """The user the instance runs as; None for cst's own (cst is not root, or the file says so)."""
        return instance_users.user_for(self.settings.sillytavern.users, spec.port)

    def sandbox_of(self, spec: InstanceSpec, release: sillytavern.Release) -> sandbox.Sandbox | None:
        """The sandbox the instance runs in; None when instances run on the host's tree."""
        chosen = sandbox.mode(self.settings.sillytavern.sandbox)
        if chosen is sandbox.Mode.OFF:
            return None
        privileged = chosen is sandbox.Mode.ROOT
        user = self.instance_user(spec) if privileged else None
        front_end = release.sandbox_front_end
        return sandbox.Sandbox(release.root, self.desired.data_dir(spec.port), self.state.workdir(spec.id),
                               self.settings.sillytavern.sandbox.tmp_size, user, privileged,
                               (release.package_dir, front_end) if front_end else None)

    def _release(self, spec: InstanceSpec, identity: str | None) -> tuple[sillytavern.Release, str]:
        """The release ``spec`` runs and its identity: the file's, or the one named (a rollback runs
        the release an instance ran before, which the file no longer names)."""
        if identity is None:
            return self.release_for(spec), self.release_identity(spec)
        return sillytavern.release_of_identity(identity, self.settings.state_dir), identity

    def launch_spec(self, spec: InstanceSpec, release: str | None = None) -> LaunchSpec:
        """What starting ``spec`` takes; on ``release`` (an identity) instead of the file's when given.

        Behind the edge (``DesiredState.behind_edge``) node answers on a Unix socket of the edge's
        folder and the edge holds the instance's port; otherwise on its own port. Either way CST
        opens the address and hands it to node (``listener``)."""
        st = self.settings.sillytavern
        data_dir = self.desired.data_dir(spec.port)
        workdir = self.state.workdir(spec.id)
        password = self.password(spec)
        user = self.instance_user(spec)
        behind_edge = self.desired.behind_edge(spec)
        address = (Address(socket=edge.Paths(self.state.root).socket(spec.id)) if behind_edge
                   else Address(host=st.listen_address, port=spec.port))
        release_of, release_identity = self._release(spec, release)
        boxed = self.sandbox_of(spec, release_of)
        # the paths node is given: inside its sandbox, the fixed ones there
        seen_data, seen_workdir = (sandbox.DATA, sandbox.HOME) if boxed else (data_dir, workdir)
        # SillyTavern's own idea of its port: it listens where CST hands it
        flags = server_flags(spec.port, str(seen_data), str(seen_workdir / "config.yaml"), st.listen_address)
        node_flags = LEAN_NODE_FLAGS if st.lean else ()
        if boxed:
            node, server_js = str(sandbox.NODE), boxed.inside(release_of.server_js)
            seen_package = Path(boxed.inside(release_of.package_dir))
            preload = str(sandbox.PRELOAD)
        else:
            node, server_js = shutil.which("node") or "node", str(release_of.server_js)
            seen_package = release_of.package_dir
            preload = str(PRELOAD)
        argv = (node, *node_flags, "--require", preload, server_js, *flags)
        cst_env = {**overlay.environ_flags(), **self._proxy_env(spec, user, boxed is not None),
                   **self._host_guard(spec)}
        # everything a restart would change, as the file and the release say it: not the node binary
        # or install folder this process resolved. The user only when it has one of its own, so an
        # instance of a cst that is not root keeps the fingerprint it had before users existed; the
        # lean profile and the sandbox only when on, likewise.
        identity: list[object] = [release_identity, flags, LISTENS, "behind the edge" if behind_edge else str(address),
                                  password, cst_env]
        if user is not None:
            identity.append([user.uid, user.gid])
        if st.lean:
            identity.append(["lean", node_flags, LEAN_ENV])
        if boxed:
            identity.append(boxed.identity())
        digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
        env = child_environment({
            **sillytavern.outside_our_git(seen_package),
            **({"HOME": str(seen_workdir)} if user is not None or boxed else {}),   # not root's home
            **(LEAN_ENV if st.lean else {}),
            "SILLYTAVERN_BASICAUTHUSER_USERNAME": spec.id,
            "SILLYTAVERN_BASICAUTHUSER_PASSWORD": password,
            **cst_env,
            ENV_INSTANCE: spec.id,
            ENV_STATE_DIR: str(self.state.root),
            ENV_FINGERPRINT: digest,
            ENV_RELEASE: release_identity,
            **({ENV_SANDBOXED: "1"} if boxed else {}),
            **({ENV_BEHIND_EDGE: "1"} if behind_edge else {}),
        })
        return LaunchSpec(spec.id, spec.port, argv, tuple(sorted(env.items())), data_dir, workdir,
                          self.state.log_path(spec.id), password, address, digest, user, release_identity, boxed)

    def _host_guard(self, spec: InstanceSpec) -> dict[str, str]:
        """SillyTavern's DNS-rebinding guard, on with the instance's host names at the edge."""
        edge_settings = self.settings.edge
        return {} if edge_settings is None else host_guard(edge_settings.names_of(spec))

    def _proxy_env(self, spec: InstanceSpec, user: instance_users.InstanceUser | None, boxed: bool) -> dict[str, str]:
        """Where the instance's plugin finds the proxy and its key: in a sandbox or under a user of its
        own, the copy in its workdir (the state dir's key folder is root's alone); else the key itself."""
        if not spec.proxy:
            return {}
        if not reads_key_copy(user, boxed):
            key_file = self.keys.path(spec.id)
        else:
            key_file = Path(sandbox.HOME if boxed else self.state.workdir(spec.id)) / KEY_COPY
        return {ENV_PROXY_URL: self.settings.proxy.local_url, ENV_PROXY_KEY_FILE: str(key_file)}

    def follow_edge(self) -> EdgeChange:
        """Make the edge (nginx) route what the file puts behind it; raises EdgeFailed."""
        return edge.Edge(self.desired).follow(edge.routes(self.desired, self.password))

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
        chosen = sandbox.mode(st.sandbox)
        lacking = sandbox.missing_tools(chosen)
        if lacking is not None:   # before anything is stopped: a restart into a sandbox could not start
            return Preparation("the sandbox", failure=lacking)
        if st.server is not None:
            missing = None if st.server.is_file() else f"settings.sillytavern.server: {st.server} does not exist"
            return Preparation(str(st.server), failure=missing)
        done: dict[str, str] = {}
        failed: dict[str, str] = {}
        versions = self.desired.versions()
        for version, fields in versions.items():
            try:
                done[version] = await asyncio.to_thread(sillytavern.ready, version, self.settings.state_dir,
                                                        chosen is not sandbox.Mode.OFF)
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

    def records(self) -> dict[str, Record]:
        return self.state.records()

    def find_snapshot(self, id_: str, snapshot_id: str) -> Snapshot:
        return Snapshots(self.state).get(id_, snapshot_id)

    def set_password(self, id_: str, password: str) -> None:
        self.state.write_secret(f"{id_}.password", password)

    async def probe(self, spec: InstanceSpec) -> str | None:
        launch, release = await asyncio.to_thread(lambda: (self.launch_spec(spec), self.release_for(spec)))
        return await self.checks.probe(launch, release.has_overlay)

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
            behind_edge=environ.get(ENV_BEHIND_EDGE) == "1",
            sandboxed=environ.get(ENV_SANDBOXED) == "1"))

    def forget_pid(self, id_: str) -> None:
        record = self.state.record(id_)
        if record:
            record.pid = record.create_time = record.parked_at = None
            self.state.save(record)

    async def start(self, spec: InstanceSpec, count_restart: bool = False, release: str | None = None) -> Record:
        """Start the process (on ``release``, an identity, instead of the file's when given) and wait
        until its port answers with basic auth; raises StartFailed."""
        launch = self.launch_spec(spec, release)
        server, _ = self._release(spec, release)
        previous = self.state.record(launch.id)
        restarts = (previous.restarts if previous else 0) + (1 if count_restart else 0)
        return await self.launcher.launch(launch, server, spec.proxy, restarts)

    def rotate_key(self, spec: InstanceSpec) -> str:
        """Give the instance a new proxy key; the old one stops working as soon as the proxy reads
        the key folder. Where the instance stored the old key (its custom endpoint's secret, and
        the copy it reads in a sandbox or under its own user), the new one goes. Returns the new key."""
        old, new = self.keys.rotate(spec.id)
        user = self.instance_user(spec)
        if reads_key_copy(user, sandbox.applies(self.settings.sillytavern.sandbox)) and self.state.workdir(spec.id).is_dir():
            self.launcher.copy_key(spec.id, new, user)
        if old and self.desired.data_dir(spec.port).is_dir():   # an instance never started stored nothing
            with instance_users.acting_in(user, self.desired.data_dir(spec.port)) as (data_dir,):
                wiring.replace_key(data_dir, old, new)
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
        and remember it as parked: nothing is archived, and the edge keeps its routes."""
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
        """Start a parked (or stopped) instance for a request at the edge; a live process is left
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

    def rollout_halt(self) -> dict[str, Any] | None:
        return self.state.rollout_halt()

    def record_rollout_halt(self, halt: dict[str, Any] | None) -> None:
        self.state.record_rollout_halt(halt)

    async def remove_unused_releases(self) -> list[str]:
        """Remove the installed npm releases no declared instance and no recorded process uses any
        more (after a rollout completed); the versions removed."""
        if self.settings.sillytavern.server is not None:
            return []
        in_use = {self.desired.version_of(spec) for spec in self.desired.instances}
        in_use.add(self.settings.sillytavern.version)
        for record in self.state.records().values():
            version = _npm_version(record.release)
            if record.pid is not None and version:
                in_use.add(version)
        return await asyncio.to_thread(sillytavern.remove_unused, self.settings.state_dir, in_use)


def _npm_version(release: str | None) -> str | None:
    """The npm version a recorded release names; None for a checkout, or nothing recorded."""
    try:
        return ReleaseId.parse(release).version if release else None
    except ValueError:
        return None


def _subject(versions: Iterable[str]) -> str:
    """What a preparation was about: "sillytavern 1.19.0", "sillytavern 1.18.0, 1.19.0"."""
    return "sillytavern " + ", ".join(versions)
