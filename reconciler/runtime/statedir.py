"""The state directory: process records, generated secrets, logs, archives, the lock.

Everything CST knows about what it started lives here, on disk, so a later
``cst apply`` (or a restarted daemon) picks up where the last one stopped.
Writes are atomic (temp file, fsync, rename): a crash leaves the old file or
the new one, never half of one.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

from ..desired.model import port_of
from ..files import atomic_write, create_once, private_dir, tighten
from . import instance_users


@dataclass
class Record:
    """What CST remembers of one instance it manages."""

    id: str
    port: int
    data_dir: str
    pid: int | None = None
    create_time: float | None = None    # the process's start time: a recycled pid will not match
    argv: list[str] = field(default_factory=list)
    fingerprint: str | None = None
    started_at: str | None = None       # ISO 8601 UTC
    restarts: int = 0
    # the release it was (last) started on, as LocalRuntime.release_identity says it
    # ("sillytavern@1.19.0"); None: unknown (a record written before CST kept it, or an
    # adopted process started without the marker)
    release: str | None = None
    behind_edge: bool = False           # node answers on its socket behind the edge (runtime/edge.py)
    parked_at: str | None = None        # ISO 8601 UTC: parked then (no process; the edge keeps its routes)
    sandboxed: bool = False             # its process runs in a sandbox (needs no way in through the host's folders)


def _well_formed(record: Record, name: str) -> bool:
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    return (record.id == name and port_of(name) == record.port and isinstance(record.data_dir, str)
            and (record.pid is None or (type(record.pid) is int and record.pid > 0))
            and (record.create_time is None or number(record.create_time))
            and isinstance(record.argv, list) and all(isinstance(arg, str) for arg in record.argv)
            and (record.fingerprint is None or isinstance(record.fingerprint, str))
            and (record.started_at is None or isinstance(record.started_at, str))
            and type(record.restarts) is int
            and (record.release is None or isinstance(record.release, str))
            and type(record.behind_edge) is bool
            and (record.parked_at is None or isinstance(record.parked_at, str))
            and type(record.sandboxed) is bool)


class LockHeld(Exception):
    def __init__(self, path: Path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by {holder}: another cst is working on this state dir")


class StateDir:
    def __init__(self, root: Path):
        self.root = root

    # layout
    @property
    def records_dir(self) -> Path:
        return self.root / "instances"

    def record_path(self, id_: str) -> Path:
        return self.records_dir / f"{id_}.json"

    def workdir(self, id_: str) -> Path:
        """Per-instance working directory: its config.yaml lives here, not in the shared install
        (and, when it runs under a user of its own, the copy of its proxy key it reads)."""
        return self.root / "run" / id_

    def log_path(self, id_: str) -> Path:
        return self.root / "logs" / f"{id_}.log"

    # the key-pool proxy cst serve runs as a process of its own (server/pool_process.py), in the
    # proxy's folder (0700, beside its ledger and key cache) but its log, which is with the others
    @property
    def pool_record_path(self) -> Path:
        return self.root / "proxy" / "process.json"

    @property
    def pool_control_path(self) -> Path:
        return self.root / "proxy" / "control.sock"

    @property
    def pool_log_path(self) -> Path:
        return self.root / "logs" / "proxy.log"

    def secret_path(self, name: str) -> Path:
        return self.root / "secrets" / name

    @property
    def archive_dir(self) -> Path:
        return self.root / "archive"

    def ensure(self, searchable: bool = False) -> None:
        """Every folder owner-only: records, logs and archives hold users' data and secrets.
        Modes are only tightened, never loosened, with one exception: ``searchable`` (instances
        run under users of their own) lets others search the state dir and its ``run`` folder
        (``o+x``: enter by name, never list) to reach their workdirs. That bit is never taken
        away again here, so an instance keeps its way in while CST runs."""
        for path in (self.root, *(self.root / sub for sub in ("instances", "run", "logs", "archive", "secrets"))):
            if path in (self.root, self.root / "run"):
                path.mkdir(parents=True, exist_ok=True, mode=0o700)
                tighten(path, 0o701)
                if searchable:
                    instance_users.searchable(path)
            else:
                private_dir(path)

    # records
    @staticmethod
    def _load(path: Path) -> Record | None:
        """The record in ``path``, or None when it is missing, truncated, garbage or not about the
        instance its name says: unknown rather than guessed, so nothing is signalled on its word."""
        try:
            record = Record(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, RecursionError):
            return None
        return record if _well_formed(record, path.stem) else None

    def records(self) -> dict[str, Record]:
        if not self.records_dir.is_dir():
            return {}
        loaded = (self._load(path) for path in sorted(self.records_dir.glob("*.json")))
        return {record.id: record for record in loaded if record is not None}

    def record(self, id_: str) -> Record | None:
        """One instance's record, without reading the others."""
        return self._load(self.record_path(id_))

    def save(self, record: Record) -> None:
        atomic_write(self.record_path(record.id), json.dumps(asdict(record), indent=2).encode(), mode=0o600)

    @property
    def rollout_halt_path(self) -> Path:
        return self.root / "rollout-halt.json"

    def rollout_halt(self) -> dict[str, Any] | None:
        try:
            halt = json.loads(self.rollout_halt_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):   # unreadable or torn by hand: no halt holds the fleet back
            return None
        return halt if isinstance(halt, dict) else None

    def record_rollout_halt(self, halt: dict[str, Any] | None) -> None:
        if halt is None:
            self.rollout_halt_path.unlink(missing_ok=True)
        else:
            atomic_write(self.rollout_halt_path, json.dumps(halt, indent=2).encode(), mode=0o600)

    def forget(self, id_: str) -> None:
        self.record_path(id_).unlink(missing_ok=True)

    # secrets
    def read_secret(self, name: str) -> str | None:
        try:
            return self.secret_path(name).read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def secret(self, name: str, generate: Callable[[], str] = lambda: str(uuid.uuid4())) -> str:
        """The secret kept under ``name``, generated on first use (a UUID, as the seed's passwords).
        Two callers at once (a pass and a wake) get the same one."""
        value = self.read_secret(name)
        if value is not None:
            return value
        value = generate()
        if create_once(self.secret_path(name), value.encode() + b"\n"):
            return value
        found = self.read_secret(name)   # the other caller's; an empty file is replaced
        if found is None:
            self.write_secret(name, value)
        return found or value

    def write_secret(self, name: str, value: str) -> None:
        atomic_write(self.secret_path(name), value.encode() + b"\n", mode=0o600)

    def drop_secret(self, name: str) -> None:
        self.secret_path(name).unlink(missing_ok=True)

    # locks
    def _open_lock(self, name: str) -> tuple[int, Path]:
        # created owner-only, but not tightened here: an install home shares this lock
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.root / f"{name}.lock"
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600), path

    @staticmethod
    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return True

    def held(self, name: str) -> bool:
        """Whether another process holds ``<name>.lock`` now (``daemon``: a cst serve runs here)."""
        if not (self.root / f"{name}.lock").exists():
            return False
        fd, _ = self._open_lock(name)
        try:
            return not self._try_lock(fd)
        finally:
            os.close(fd)   # releases it, when this call took it

    def lock_holder(self, name: str = "reconcile") -> str | None:
        """The pid the last holder of ``<name>.lock`` wrote in it (the holder, while it is held)."""
        try:
            return (self.root / f"{name}.lock").read_text(errors="replace").strip()[:20] or None
        except OSError:
            return None

    def _acquired(self, fd: int, path: Path, deadline: float) -> bool:
        """One attempt at the lock: True when held, False to wait and try again; LockHeld past the deadline."""
        if self._try_lock(fd):
            return True
        if time.monotonic() >= deadline:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeld(path, f"pid {holder}")
        return False

    @contextmanager
    def lock(self, name: str = "reconcile", timeout: float = 60.0) -> Iterator[None]:
        """Hold ``<state_dir>/<name>.lock``; waits up to ``timeout`` for another holder to finish."""
        fd, path = self._open_lock(name)
        try:
            deadline = time.monotonic() + timeout
            while not self._acquired(fd, path, deadline):
                time.sleep(0.1)
            yield
        finally:
            os.close(fd)

    @asynccontextmanager
    async def alock(self, name: str = "reconcile", timeout: float = 60.0) -> AsyncIterator[None]:
        """``lock`` for asyncio code: waits without blocking the event loop."""
        fd, path = self._open_lock(name)
        try:
            deadline = time.monotonic() + timeout
            while not self._acquired(fd, path, deadline):  # noqa: ASYNC110 -- flock has no waiter to await
                await asyncio.sleep(0.1)
            yield
        finally:
            os.close(fd)
