"""A runtime whose instances are not processes: what the server's logic (fleet, parking, passes)
is tested against without SillyTavern, node or the stand-in.

Records are kept in a real ``StateDir`` (CST's own files, as the parking's view of processes
reads them); a "running" instance's pid is this test process's, so it is alive for as long as
the test. ``fail_start`` makes the next starts fail with the cause it names, as a release that
exits at once would.
"""
from __future__ import annotations

import hashlib
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import psutil

from reconciler.desired.model import DesiredState, InstanceSpec
from reconciler.runtime.base import EdgeChange, Observed, ObservedStatus, Preparation, ReleaseId, StartFailed
from reconciler.runtime.health import HealthChecks
from reconciler.runtime.processes import utc_now
from reconciler.runtime.snapshots import Snapshot, SnapshotNotFound
from reconciler.runtime.statedir import Record, StateDir


def _fingerprint(spec: InstanceSpec, release: str) -> str:
    return hashlib.sha256(f"{spec.port} {release}".encode()).hexdigest()


@dataclass
class FakeWorld:
    """What every runtime the factory makes shares: the instances "running", the calls made."""

    state: StateDir
    # release identity -> (cause, log tail) a start on it fails with; "" fails every release
    fail_start: dict[str, tuple[str, str]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)   # (operation, instance id)
    archived: dict[str, Path] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)

    def factory(self, desired: DesiredState, *, readonly: bool = False,
                checks: HealthChecks | None = None) -> FakeRuntime:
        return FakeRuntime(self, desired)


class FakeRuntime:
    def __init__(self, world: FakeWorld, desired: DesiredState):
        self.world, self.desired = world, desired

    # -- resolving

    def release_identity(self, spec: InstanceSpec) -> str:
        return str(ReleaseId(version=self.desired.version_of(spec)))

    def launch_fingerprint(self, spec: InstanceSpec) -> str:
        return _fingerprint(spec, self.release_identity(spec))

    def password(self, spec: InstanceSpec) -> str:
        return self.world.passwords.setdefault(spec.id, f"pw-{spec.port}")

    def set_password(self, id_: str, password: str) -> None:
        self.world.passwords[id_] = password

    def rotate_key(self, spec: InstanceSpec) -> str:
        self.world.calls.append(("rotate_key", spec.id))
        return f"sk-cst-{spec.port}-{time.monotonic_ns()}"

    # -- observing

    def records(self) -> dict[str, Record]:
        return self.world.state.records()

    def observe(self, records: dict[str, Record] | None = None) -> dict[str, Observed]:
        observed = {}
        for record in (self.records() if records is None else records).values():
            status: ObservedStatus = "running" if record.pid is not None else "parked" if record.parked_at else "stopped"
            observed[record.id] = Observed(record.id, record.port, status, record.pid, record.fingerprint,
                                           create_time=record.create_time, release=record.release)
        return observed

    @asynccontextmanager
    async def lock(self, timeout: float) -> AsyncIterator[None]:
        yield

    async def prepare(self) -> Preparation:
        return Preparation("fake releases")

    def follow_edge(self) -> EdgeChange:
        return EdgeChange()

    def rollout_halt(self) -> dict | None:
        return self.world.state.rollout_halt()

    def record_rollout_halt(self, halt: dict | None) -> None:
        self.world.state.record_rollout_halt(halt)

    async def remove_unused_releases(self) -> list[str]:
        return []

    # -- acting

    async def start(self, spec: InstanceSpec, count_restart: bool = False, release: str | None = None) -> Record:
        release = release or self.release_identity(spec)
        self.world.calls.append(("start", spec.id))
        previous = self.world.state.record(spec.id)
        failure = self.world.fail_start.get(release) or self.world.fail_start.get("")
        if failure is not None:
            if previous is not None:
                previous.pid = previous.create_time = None
                self.world.state.save(previous)
            raise StartFailed(*failure)
        me = os.getpid()
        record = Record(id=spec.id, port=spec.port, data_dir=str(self.desired.data_dir(spec.port)), pid=me,
                        create_time=psutil.Process(me).create_time(),
                        fingerprint=_fingerprint(spec, release),
                        started_at=utc_now(), release=release,
                        restarts=(previous.restarts if previous else 0) + (1 if count_restart else 0))
        self.world.state.ensure()
        self.world.state.save(record)
        return record

    async def stop(self, id_: str) -> None:
        self.world.calls.append(("stop", id_))
        record = self.world.state.record(id_)
        if record is not None:
            record.pid = record.create_time = record.parked_at = None
            self.world.state.save(record)

    async def park(self, id_: str) -> None:
        self.world.calls.append(("park", id_))
        record = self.world.state.record(id_)
        if record is None:   # never started: parked from the first
            spec = self.desired.instance(id_)
            if spec is None:
                raise OSError(f"{id_} is not declared")
            record = Record(id=id_, port=spec.port, data_dir=str(self.desired.data_dir(spec.port)))
        record.pid = record.create_time = None
        record.parked_at = utc_now()
        self.world.state.ensure()
        self.world.state.save(record)

    async def wake(self, spec: InstanceSpec) -> Record:
        record = self.world.state.record(spec.id)
        if record is not None and record.pid is not None:
            return record
        return await self.start(spec)

    def adopt(self, id_: str, port: int, pid: int) -> None:
        raise AssertionError("nothing runs outside the fake runtime's records")

    def forget_pid(self, id_: str) -> None:
        record = self.world.state.record(id_)
        if record is not None:
            record.pid = record.create_time = record.parked_at = None
            self.world.state.save(record)

    async def archive(self, id_: str) -> Path | None:
        self.world.calls.append(("archive", id_))
        record = self.world.state.record(id_)
        self.world.state.record_path(id_).unlink(missing_ok=True)
        if record is None:
            return None
        where = self.world.archived[id_] = self.world.state.archive_dir / f"{id_}-archived"
        return where

    async def snapshot(self, id_: str, reason: str) -> str:
        self.world.calls.append(("snapshot", id_))
        return f"{id_}-{reason}"

    async def put_back(self, id_: str, snapshot_id: str) -> Path | None:
        self.world.calls.append(("put_back", id_))
        return None

    def find_snapshot(self, id_: str, snapshot_id: str) -> Snapshot:
        raise SnapshotNotFound(snapshot_id)

    async def stays_healthy(self, spec: InstanceSpec, seconds: float) -> str | None:
        return None

    async def probe(self, spec: InstanceSpec) -> str | None:
        return None

    async def close(self) -> None:
        pass
