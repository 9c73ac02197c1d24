"""The REST API's wire format for what ``fleet`` and ``engine.inventory`` return: the seed's
field names (``startTime``, ``dataDir``) and its statuses, in one place.

``cst status -o json`` prints ``row_document``; the API adds the seed's status beside CST's own.
"""
from __future__ import annotations

from typing import Any

from proxy.pool import mask

from ..engine.inventory import InstanceRow
from ..runtime.restore import Restored
from ..runtime.snapshots import Snapshot
from .fleet import Changed, Created, Deleted, PasswordReset

# the seed (PM2) called a running instance "online"; a parked one answers (its first request wakes
# it), so it is online to the seed's clients too, and ``observed`` says "parked"
SEED_STATUS = {"running": "online", "parked": "online", "stopped": "stopped", "crashed": "errored",
               "port-taken": "errored", "errored": "errored"}


def row_document(row: InstanceRow) -> dict[str, Any]:
    """An instance's row with CST's own status (running, parked, stopped, crashed, port-taken, errored)."""
    return {
        "id": row.id, "port": row.port, "url": row.url, "desired": row.desired, "status": row.status,
        "detail": row.detail, "pid": row.pid, "startTime": row.started_at, "uptime": row.uptime,
        "memory": row.memory, "parkAfter": row.park_after, "restarts": row.restarts,
        "dataDir": str(row.data_dir), "disk": row.disk,
    }


def instance_document(row: InstanceRow, last_failure: dict[str, str] | None) -> dict[str, Any]:
    """An instance as the API lists it: the seed's ``status``, CST's as ``observed``."""
    return {**row_document(row), "status": SEED_STATUS[row.status], "observed": row.status,
            "lastFailure": last_failure}


def created_document(created: Created) -> dict[str, Any]:
    # the seed's create answer says "running" where its listing says "online"
    return {"id": created.row.id, "port": created.row.port, "dataDir": str(created.row.data_dir),
            "status": "running", "startTime": created.row.started_at, "password": created.password}


def changed_document(changed: Changed, observed: bool = False) -> dict[str, Any]:
    """A change's answer, before its message (``message_key``) is put in the caller's language;
    ``observed``: CST's own status too (parking and waking, where the seed's cannot tell)."""
    row = changed.row
    document: dict[str, Any] = {"id": row.id, "status": SEED_STATUS[row.status]}
    if observed:
        document["observed"] = row.status
    return {**document, "message_key": changed.message_key}


def deleted_document(deleted: Deleted) -> dict[str, Any]:
    return {"id": deleted.id, "archive": deleted.archive,
            "message_key": "deleted" if deleted.archive else "deleted_no_data"}


def key_document(id_: str, key: str) -> dict[str, Any]:
    return {"id": id_, "key": mask(key), "message_key": "key_rotated"}


def restored_document(id_: str, restored: Restored) -> dict[str, Any]:
    return {"id": id_, "snapshot": restored.snapshot.id,
            "replaced": str(restored.replaced) if restored.replaced else None,
            "status": SEED_STATUS["running" if restored.running else "stopped"],
            "message_key": "restored" if restored.replaced else "restored_no_data"}


def snapshot_document(snapshot: Snapshot) -> dict[str, Any]:
    """A snapshot as the API and ``cst backups -o json`` show it."""
    return {"id": snapshot.id, "instance": snapshot.instance, "takenAt": snapshot.taken_at,
            "reason": snapshot.reason, "files": snapshot.files, "bytesTotal": snapshot.bytes_total,
            "bytesNew": snapshot.bytes_new}


def password_document(reset: PasswordReset) -> dict[str, Any]:
    return {"id": reset.id, "password": reset.password}
