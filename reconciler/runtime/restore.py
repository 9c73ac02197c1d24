"""Putting a snapshot back in place of an instance's data dir: ``cst restore`` and
``POST /api/instances/{id}/restore`` both come here.

The snapshot is looked up before anything is stopped, so a wrong id stops nothing. Then, under
the state dir's reconcile lock (no pass starts the instance meanwhile, and no other ``cst``
acts on it): stop the instance, put the snapshot back (the replaced data dir goes to the
archive, never deleted), and start it again when desired.yaml says it runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..desired.model import InstanceSpec
from .base import Runtime
from .snapshots import Snapshot


@dataclass(frozen=True)
class Restored:
    snapshot: Snapshot
    replaced: Path | None   # where the data dir it replaced went, in the archive
    running: bool           # started again (desired.yaml says it runs)


async def restore_snapshot(runtime: Runtime, spec: InstanceSpec, snapshot_id: str,
                           lock_timeout: float) -> Restored:
    """Raises SnapshotNotFound (nothing stopped), LockHeld (nothing stopped), StartFailed (the
    snapshot is in place but the instance did not come up), or OSError."""
    try:
        snapshot = runtime.find_snapshot(spec.id, snapshot_id)   # before anything is stopped
        async with runtime.lock(lock_timeout):
            record = runtime.records().get(spec.id)
            if record is not None:
                await runtime.stop(spec.id)
            replaced = await runtime.put_back(spec.id, snapshot.id)
            if spec.state == "running":
                await runtime.start(spec, count_restart=record is not None and record.pid is not None)
    finally:
        await runtime.close()
    return Restored(snapshot, replaced, spec.state == "running")
