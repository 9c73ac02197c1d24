"""Launching one instance, as a pipeline: prepare its tree, enter its sandbox, spawn, wait until ready.

* **Prepare**: the data dir and workdir (the instance's own when it has a uid of its own; what
  was root's from before is given to it, links and hard-linked files never followed), the
  webpack cache (copied into a new data dir only outside a sandbox), the first-start wiring to
  the key pool and the copy of its proxy key it reads.
* **Enter the sandbox and spawn** (``sandbox.Sandbox.spawn``), or spawn on the host under its
  uid when there is no sandbox; the record is written at once, naming node itself.
* **Wait until ready**: the health route answers with the instance's credentials
  (``health.HealthChecks``); a start that fails is stopped again.

``LocalRuntime`` resolves desired.yaml into a ``LaunchSpec``; this module only carries it out.
"""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import BinaryIO

import psutil

from ..desired.model import Settings
from ..files import private_dir
from . import edge, instance_users, overlay, sillytavern, wiring
from .base import StartFailed
from .health import HealthChecks
from .instance_keys import InstanceKeys
from .launch import LaunchSpec
from .listener import ENV_LISTEN_FD, open_listener
from .logs import open_log, rotate_log, tail
from .processes import live_process, terminate, utc_now
from .statedir import Record, StateDir

# what an instance creates (chats, settings, its config.yaml) is its owner's alone
_INSTANCE_UMASK = 0o077
# the copy of its proxy key an instance reads, in its workdir (0400, its own): the state dir's key
# folder is root's alone, and outside a sandbox's view
KEY_COPY = "proxy.key"


class Launcher:
    def __init__(self, settings: Settings, state: StateDir, keys: InstanceKeys, checks: HealthChecks):
        self.settings = settings
        self.state = state
        self.keys = keys
        self.checks = checks

    async def launch(self, launch: LaunchSpec, release: sillytavern.Release, proxy: bool, restarts: int) -> Record:
        """Start the instance and wait until its health route answers; its record. ``proxy``: it
        has a proxy key (else any it had is revoked). Raises StartFailed (the process stopped again)."""
        notes = [self._prepare_folders(launch, release)]
        if launch.sandbox is None:   # a sandbox shows SillyTavern the front end prebuilt in its release
            with instance_users.acting_in(launch.user, launch.data_dir) as (data_dir,):   # the instance's, as it writes
                sillytavern.prefill_webpack_cache(release, data_dir)
        notes.append(self._wire(launch, release, proxy))
        rotate_log(launch.log, self.settings.logs.max_size, self.settings.logs.keep)
        with open_log(launch.log) as log:
            log.write(f"\n--- cst: starting {launch.id} at {utc_now()}\n".encode())
            for note in notes:
                if note:
                    log.write(f"--- cst: {note}\n".encode())
            log.flush()
            try:
                if launch.behind_edge:
                    edge.prepare_folders(edge.Paths(self.state.root))
                listener = open_listener(launch.address, edge.worker_gid() if launch.behind_edge else None)
            except OSError as exc:
                raise StartFailed(f"cannot listen on its {launch.address}: {exc.strerror or exc}") from None
            with listener:   # node's from here on: this process keeps no copy
                proc, pid = await self._spawn(launch, log, listener.fileno())
        record = Record(
            id=launch.id, port=launch.port, data_dir=str(launch.data_dir), pid=pid,
            create_time=psutil.Process(pid).create_time(), argv=list(launch.argv),
            fingerprint=launch.fingerprint, started_at=utc_now(), restarts=restarts,
            release=launch.release, behind_edge=launch.behind_edge, sandboxed=launch.sandbox is not None)
        self.state.save(record)  # written at once: a crash from here on still knows the pid
        try:
            await self.checks.wait_ready(launch, proc, release.has_overlay, self.settings.sillytavern.start_timeout,
                                         lambda: tail(launch.log))
        except StartFailed:
            await terminate(record.pid, record.create_time, self.settings.sillytavern.stop_timeout)
            record.pid = record.create_time = None
            self.state.save(record)
            raise
        return record

    async def _spawn(self, launch: LaunchSpec, log: BinaryIO, listener: int) -> tuple[subprocess.Popen[bytes], int]:
        """The process that exits when the instance does, and node's pid; node inherits ``listener``."""
        env = {**dict(launch.env), ENV_LISTEN_FD: str(listener)}
        if launch.sandbox is not None:
            return await launch.sandbox.spawn(launch.argv, env, log, _INSTANCE_UMASK, listener)
        user = launch.user
        proc = subprocess.Popen(  # noqa: ASYNC220 -- a fork and exec, on the pass's own loop
            launch.argv, cwd=launch.workdir, env=env, stdin=subprocess.DEVNULL, pass_fds=(listener,),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            umask=_INSTANCE_UMASK, user=user.uid if user else None, group=user.gid if user else None,
            extra_groups=[] if user else None)
        return proc, proc.pid

    # -- preparing the tree

    def _prepare_folders(self, launch: LaunchSpec, release: sillytavern.Release) -> str:
        """The instance's data dir and workdir, its own when it has a user of its own (folders from
        before, root's, are given to it here, links never followed); the way to them, which only an
        instance outside a sandbox needs. What was done, for its log. Raises StartFailed when its
        uid is not free, or (outside a sandbox) it could not reach a folder, node or server.js."""
        user, boxed = launch.user, launch.sandbox is not None
        opens_ways = user is not None and not boxed
        self.state.ensure(searchable=opens_ways)
        if user is not None:
            instance_users.check_usable(user, launch.port)
        # with users of their own, tightened at most to 0701: an instance outside a sandbox may still
        # need its way in (see _close_ways_in)
        data_root = private_dir(self.settings.data_root, 0o700 if user is None else 0o701)
        if opens_ways:
            instance_users.searchable(data_root)
        private_dir(launch.data_dir)
        private_dir(launch.workdir)
        if boxed:
            self._close_ways_in(launch.id)
        if user is None:
            return "in its sandbox" if boxed else ""
        given = instance_users.own_tree(launch.data_dir, user) + instance_users.own_tree(launch.workdir, user)
        if not boxed:
            needed = [(Path(launch.argv[0]), 5), (release.server_js, 4), (launch.data_dir, 1), (launch.workdir, 1)]
            if release.has_overlay:   # CST's plugin: its health route is how a start is seen
                needed.append((release.package_dir / overlay.PLUGIN_ENTRY, 4))
            for path, need in needed:
                problem = instance_users.unreachable(user, path, need)
                if problem:
                    raise StartFailed(f"{launch.id} runs as {user}, but {problem}")
        where = " in its sandbox" if boxed else ""
        return f"runs as {user}{where}" + (f"; {given} files from before given to it" if given else "")

    def _close_ways_in(self, starting: str) -> None:
        """Take back the search bit (``o+x``) that instances outside a sandbox needed on the state dir,
        its ``run`` folder and the data root, once no such instance runs any more."""
        folders = [self.state.root, self.state.root / "run", self.settings.data_root]
        opened = [folder for folder in folders if os.stat(folder).st_mode & stat.S_IXOTH]
        if not opened:
            return
        for record in self.state.records().values():
            if record.id != starting and not record.sandboxed and live_process(record.pid, record.create_time):
                return
        for folder in opened:
            os.chmod(folder, stat.S_IMODE(os.stat(folder).st_mode) & ~stat.S_IXOTH)

    def _wire(self, launch: LaunchSpec, release: sillytavern.Release, proxy: bool) -> str:
        """The instance's proxy key (minted, or revoked with ``proxy: false``; copied where it reads
        it) and its first-start chat settings; what was done, for the instance's log."""
        if not proxy:
            self.drop_key_copy(launch.id)
            return "proxy: false, proxy key revoked" if self.keys.revoke(launch.id) else ""
        key = self.keys.ensure(launch.id)
        if launch.copies_key:
            self.copy_key(launch.id, key, launch.user)
        try:
            # the release's defaults read through root's descriptor too: the release may lie in a folder
            # closed to the instance's uid (a clone in root's home), which its sandbox needs no way into
            with instance_users.acting_in(launch.user, launch.data_dir, release.package_dir) as (data_dir, package):
                return wiring.wire(data_dir, package, self.settings.proxy.local_url, key)
        except (OSError, ValueError) as exc:   # the instance still starts; the log says why it is not wired
            return f"could not wire the chat API to the key pool: {exc}"

    def copy_key(self, id_: str, key: str, user: instance_users.InstanceUser | None) -> None:
        """The instance's own copy of its key, 0400 and its user's, in its workdir. The proxy keeps
        reading the state dir's key folder: that decides which keys work."""
        instance_users.write_owned(self.state.workdir(id_) / KEY_COPY, key.encode() + b"\n", user, 0o400)

    def drop_key_copy(self, id_: str) -> None:
        (self.state.workdir(id_) / KEY_COPY).unlink(missing_ok=True)
