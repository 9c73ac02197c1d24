"""The seed's operations (create, list, stop, start, restart, reset password, delete, backup),
done the CST way: each one edits desired.yaml, then waits for a reconcile pass to make it so.

Handlers in ``api`` only translate HTTP to these calls and shape what they return (values, not
the wire format: ``documents``); failures are ``FleetError``s (a kind and a code, the key of a
message in ``messages``), which ``api`` alone turns into HTTP. Runtimes come from the daemon's
factory (``Control.runtime``), so this logic runs against a fake one in tests. Every answer
carries the status observed after the pass, not the one asked for; a change the reconciler could
not finish in time is a 504 naming what is pending. Observing processes is blocking work: it runs in a thread, and listings are served
from an observation at most ``LISTING_MAX_AGE`` old (newer than the last pass or exit), which
concurrent callers share.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..desired import edits
from ..desired.model import DesiredState, InstanceSpec, instance_id, parse, port_of
from ..desired.restricted import RestrictedChange, refuse_restricted
from ..desired.shared_file import ChangeRefused, CurrentFileInvalid, FileReading
from ..engine.inventory import InstanceRow, instance_rows
from ..engine.results import Result
from ..runtime.base import StartFailed
from ..runtime.processes import port_is_free
from ..runtime.restore import Restored, restore_snapshot
from ..runtime.snapshots import Snapshot, SnapshotNotFound, Snapshots
from ..runtime.statedir import LockHeld
from .control import Control
from .errors import ErrorKind, FleetError
from .gate import WakeFailed
from .parking import Parking

LISTING_MAX_AGE = 1.0   # seconds a listing may be served again without a new observation
# what a change that wants an instance running or stopped accepts to see after its pass: a parked
# instance answers (its first request wakes it), so it is as good as running
UP = frozenset({"running", "parked"})
DOWN = frozenset({"stopped"})


@dataclass(frozen=True)
class Changed:
    """A change made: the instance as observed after its pass, and what was done (``message_key``:
    "started", "parked"... in ``messages``)."""

    row: InstanceRow
    message_key: str


@dataclass(frozen=True)
class Deleted:
    id: str
    archive: str | None   # where its data went; None when it had none


@dataclass(frozen=True)
class Created:
    row: InstanceRow
    password: str


@dataclass(frozen=True)
class PasswordReset:
    id: str
    password: str


def change_note(what: str, client: str) -> str:
    """A change's description for the file's history: its first line says what it did."""
    return f"{what}\n\nMade through CST's REST API by a client at {client}."


def _problems(exc: Exception) -> str:
    return "; ".join(str(p) for p in getattr(exc, "problems", [])) or str(exc)


def parse_port(body: Any) -> int:
    if not isinstance(body, dict):
        raise FleetError(ErrorKind.BAD_REQUEST, "bad_body")
    if "port" not in body or body["port"] in (None, ""):
        raise FleetError(ErrorKind.BAD_REQUEST, "missing_port")
    raw = body["port"]
    # the seed's clients send a number; a string of digits is accepted as the seed's parseInt did
    digits = isinstance(raw, str) and raw.isascii() and raw.isdigit()  # not full-width or other scripts' digits
    if isinstance(raw, bool) or not (isinstance(raw, int) or digits):
        raise FleetError(ErrorKind.BAD_REQUEST, "invalid_port", port=str(raw)[:20])
    port = int(raw)
    if not 1024 <= port <= 65535:
        raise FleetError(ErrorKind.BAD_REQUEST, "invalid_port", port=port)
    return port


class Fleet:
    def __init__(self, daemon: Control):
        self.daemon = daemon
        self._listing: tuple[float, list[InstanceRow]] | None = None                  # (observed at, rows)
        self._observing: tuple[float, asyncio.Future[list[InstanceRow]]] | None = None  # one under way

    @property
    def desired(self) -> DesiredState:
        return self.daemon.desired

    # -- reading

    def _observe(self) -> list[InstanceRow]:
        """Blocking: read the records and look at the processes and ports."""
        desired = self.desired
        return instance_rows(self.daemon.runtime(desired, readonly=True), desired, self.daemon.supervisor.errored,
                             self.daemon.disk.of)

    async def rows(self, since: float | None = None) -> list[InstanceRow]:
        """Every instance's row, from an observation that began at ``since`` (monotonic) or later;
        by default a recent one, newer than the last pass and the last exit seen."""
        if since is None:
            since = max(time.monotonic() - LISTING_MAX_AGE, self.daemon.changed_at)
        if self._listing is not None and self._listing[0] >= since:
            return self._listing[1]
        if self._observing is not None and self._observing[0] >= since:
            return await asyncio.shield(self._observing[1])
        began = time.monotonic()
        observing = asyncio.ensure_future(asyncio.to_thread(self._observe))
        self._observing = (began, observing)
        rows = await asyncio.shield(observing)  # a caller that goes away does not cancel the others'
        if self._listing is None or self._listing[0] < began:
            self._listing = (began, rows)
        return rows

    async def row(self, id_: str, since: float | None = None) -> InstanceRow:
        """The instance's row: declared ones and undeclared ones CST still has a record of."""
        if port_of(id_) is not None:
            for row in await self.rows(since):
                if row.id == id_:
                    return row
        raise FleetError(ErrorKind.NOT_FOUND, "not_found", id=id_[:40])

    def _known(self, id_: str) -> int:
        """The port of an instance that is declared or still has a record; 404 for anything else."""
        port = port_of(id_)
        if port is None or (self.desired.instance(id_) is None and self.daemon.state.record(id_) is None):
            raise FleetError(ErrorKind.NOT_FOUND, "not_found", id=id_[:40])
        return port

    def _declared(self, id_: str) -> InstanceSpec:
        """A declared instance; 404 for anything else."""
        spec = self.desired.instance(id_) if port_of(id_) is not None else None
        if spec is None:
            raise FleetError(ErrorKind.NOT_FOUND, "not_found", id=id_[:40])
        return spec

    def data_dir(self, id_: str) -> Path:
        port = self._known(id_)
        path = self.desired.data_dir(port)
        if not path.is_dir():
            raise FleetError(ErrorKind.NOT_FOUND, "no_data", id=id_)
        return path

    def log_path(self, id_: str) -> Path:
        self._known(id_)
        return self.daemon.state.log_path(id_)

    def _reserved(self) -> dict[int, str]:
        """Ports cst serve itself listens on, each with the setting that says so."""
        return {listen.port: setting for setting, listen in (
            ("settings.api.listen", self.desired.settings.api.listen),
            ("settings.proxy.listen", self.desired.settings.proxy.listen))}

    def free_port(self) -> int:
        """A port to suggest for a new instance: the first free one after the highest declared."""
        taken = {i.port for i in self.desired.instances} | set(self._reserved())
        start = max((i.port for i in self.desired.instances), default=8000) + 1
        host = self.desired.settings.sillytavern.listen_address
        for port in range(start, min(start + 200, 65536)):
            if port not in taken and port_is_free(host, port):
                return port
        raise FleetError(ErrorKind.CONFLICT, "no_free_port", start=start)

    # -- changing (each: edit the file, then converge)

    async def _edit(self, edit: Callable[[str], str], failure_key: str, note: str) -> FileReading:
        """``note``: what the change was and who asked, for the file's history (a git commit)."""
        try:
            reading = await self.daemon.file.change(edit, guard=refuse_restricted, note=note)
        except RestrictedChange as exc:
            raise FleetError(ErrorKind.FORBIDDEN, "restricted", fields=", ".join(exc.fields)) from None
        except CurrentFileInvalid as exc:
            raise FleetError(ErrorKind.CONFLICT, "file_invalid", problems=_problems(exc)) from None
        except ChangeRefused as exc:
            raise FleetError(ErrorKind.BAD_REQUEST, "change_invalid", problems=_problems(exc)) from None
        except edits.EditError as exc:
            raise FleetError(ErrorKind.CONFLICT, failure_key, reason=str(exc)) from None
        except OSError as exc:  # disk full, read-only: the old file is untouched
            raise FleetError(ErrorKind.FAILED, "write_failed", reason=exc.strerror or str(exc)) from None
        self.daemon.accept(reading)
        return reading

    async def _converge(self, id_: str, failure_key: str) -> tuple[Result | None, float]:
        """Wait for a pass that applies the change; its result for ``id_`` and when it ended.

        A pass that could not run (the state dir held by a long ``cst apply``, an error) is a
        failure, not a silent success; one that takes too long is a 504 saying what is pending."""
        report = await self.daemon.converge()  # NotConverged: the API answers 504
        ended = time.monotonic()
        result = report.result(id_)
        if result is None:
            if report.failure is not None:
                raise FleetError(ErrorKind.FAILED, failure_key, reason=report.failure)
        elif result.outcome == "failed":
            raise FleetError(ErrorKind.FAILED, failure_key, reason=result.detail)
        return result, ended

    async def _observed(self, id_: str, ended: float, expected: frozenset[str], failure_key: str) -> InstanceRow:
        """The instance's row observed after the pass; a failure unless its status is one of
        ``expected`` (it may have exited at once after starting, or been stopped by someone else
        meanwhile)."""
        row = await self.row(id_, since=ended)
        if row.status not in expected:
            detail = f": {row.detail}" if row.detail else ""
            raise FleetError(ErrorKind.FAILED, failure_key, reason=f"{id_} is {row.status} now{detail}")
        return row

    async def create(self, body: Any, client: str) -> Created:
        port = parse_port(body)
        id_ = instance_id(port)

        def add(text: str) -> str:
            if parse(text, self.daemon.file.path).instance(id_) is not None:
                raise FleetError(ErrorKind.BAD_REQUEST, "port_declared", port=port, id=id_)
            return edits.add_instance(text, port, "running")

        if self.desired.instance(id_) is not None:
            raise FleetError(ErrorKind.BAD_REQUEST, "port_declared", port=port, id=id_)
        if port in self._reserved():
            raise FleetError(ErrorKind.BAD_REQUEST, "reserved_port", port=port, setting=self._reserved()[port])
        if not port_is_free(self.desired.settings.sillytavern.listen_address, port):
            raise FleetError(ErrorKind.BAD_REQUEST, "port_in_use", port=port)
        reading = await self._edit(add, "create_failed", change_note(f"create {id_} (port {port})", client))
        # the instance as created: a DELETE that lands while this call waits must not leave it without one
        desired = reading.desired
        spec = desired.instance(id_) if desired is not None else None
        assert desired is not None and spec is not None, "a create that was written declares its instance"
        self.daemon.supervisor.forget(id_)
        _, ended = await self._converge(id_, "create_failed")
        row = await self._observed(id_, ended, UP, "create_failed")
        password = await asyncio.to_thread(self.daemon.runtime(desired).password, spec)
        return Created(row, password)

    async def set_state(self, id_: str, state: str, client: str) -> Changed:
        spec = self._declared(id_)
        port = spec.port
        failure_key = "stop_failed" if state == "stopped" else "start_failed"
        if spec.state != state:
            verb = "stop" if state == "stopped" else "start"
            await self._edit(lambda text: edits.set_instance_state(text, port, state), failure_key,
                             change_note(f"{verb} {id_}", client))
        self.daemon.supervisor.forget(id_)
        _, ended = await self._converge(id_, failure_key)
        row = await self._observed(id_, ended, UP if state == "running" else DOWN, failure_key)
        return Changed(row, "started" if state == "running" else "stopped")

    async def restart(self, id_: str) -> Changed:
        if self._declared(id_).state != "running":
            raise FleetError(ErrorKind.CONFLICT, "restart_failed", reason=f"{id_} is stopped in desired.yaml; start it instead")
        self.daemon.supervisor.forget(id_)
        self.daemon.supervisor.request_restart(id_, "asked through the API")
        _, ended = await self._converge(id_, "restart_failed")
        row = await self._observed(id_, ended, UP, "restart_failed")
        return Changed(row, "restarted")

    async def reset_password(self, id_: str) -> PasswordReset:
        spec = self._declared(id_)
        if spec.password_env:
            raise FleetError(ErrorKind.CONFLICT, "password_from_env", id=id_, env=spec.password_env)
        password = str(uuid.uuid4())
        try:
            await asyncio.to_thread(self.daemon.runtime(self.desired).set_password, id_, password)
        except OSError as exc:
            raise FleetError(ErrorKind.FAILED, "restart_failed", reason=exc.strerror or str(exc)) from None
        # the launch fingerprint includes the password: the next pass restarts the instance with it
        await self._converge(id_, "restart_failed")
        return PasswordReset(id_, password)

    async def rotate_key(self, id_: str) -> str:
        """The instance's new proxy key."""
        spec = self._declared(id_)
        if not spec.proxy:
            raise FleetError(ErrorKind.CONFLICT, "proxy_off", id=id_)
        runtime = self.daemon.runtime(self.desired)
        waited = self.desired.settings.api.timeout
        try:
            async with runtime.lock(waited):   # not while a pass starts the instance with the old key
                key = await asyncio.to_thread(runtime.rotate_key, spec)
        except LockHeld as exc:
            raise FleetError(ErrorKind.BUSY, "state_busy", id=id_, seconds=f"{waited:g}", holder=exc.holder) from None
        await self.daemon.proxy_keys_changed()
        return key

    async def delete(self, id_: str, client: str) -> Deleted:
        port = self._known(id_)
        if self.desired.instance(id_) is not None:
            await self._edit(lambda text: edits.remove_instance(text, port), "delete_failed",
                             change_note(f"delete {id_} (port {port}; its data is archived)", client))
        result, _ = await self._converge(id_, "delete_failed")
        self.daemon.supervisor.forget(id_)
        archive = result.archive if result else ""
        return Deleted(id_, archive or None)

    # -- parking (park_after): by hand

    def _parking(self, id_: str) -> tuple[InstanceSpec, Parking]:
        spec = self._declared(id_)
        parking = self.daemon.parking
        if spec.park_after is None or spec.state != "running" or parking is None:
            raise FleetError(ErrorKind.CONFLICT, "park_unavailable", id=id_)
        return spec, parking

    async def park(self, id_: str) -> Changed:
        """Park a running instance now, however recently it was used."""
        _, parking = self._parking(id_)
        try:
            await parking.park(id_, "asked through the API")
        except LockHeld as exc:
            raise FleetError(ErrorKind.BUSY, "park_busy", id=id_, seconds=f"{self.desired.settings.api.timeout:g}",
                           holder=exc.holder) from None
        except OSError as exc:
            raise FleetError(ErrorKind.FAILED, "park_failed", id=id_, reason=str(exc)) from None
        row = await self.row(id_, since=time.monotonic())
        if row.status != "parked":
            raise FleetError(ErrorKind.CONFLICT, "park_unavailable", id=id_)
        return Changed(row, "parked")

    async def wake(self, id_: str) -> Changed:
        """Wake a parked instance now, without waiting for its first request."""
        _, parking = self._parking(id_)
        try:
            await parking.wake(id_)
        except WakeFailed as exc:
            raise FleetError(ErrorKind.UNAVAILABLE, "wake_failed", retry_after=exc.retry_after, id=id_,
                             reason=exc.reason) from None
        return Changed(await self.row(id_, since=time.monotonic()), "woken")

    # -- snapshots (settings.backups, rollouts) and restoring one

    async def backups(self, id_: str) -> list[Snapshot]:
        """The instance's snapshots, oldest first."""
        self._known(id_)
        return await asyncio.to_thread(Snapshots(self.daemon.state).list, id_)

    async def restore(self, id_: str, body: Any) -> Restored:
        """Put a snapshot back in place of the instance's data dir (the replaced one is archived)."""
        spec = self._declared(id_)
        if not isinstance(body, dict):
            raise FleetError(ErrorKind.BAD_REQUEST, "bad_body")
        snapshot_id = body.get("snapshot")
        if not isinstance(snapshot_id, str) or not snapshot_id:
            raise FleetError(ErrorKind.BAD_REQUEST, "missing_snapshot")
        waited = self.desired.settings.api.timeout
        # its own loop in a thread: stopping, copying a data dir and starting all block
        try:
            restored = await asyncio.to_thread(asyncio.run, restore_snapshot(
                self.daemon.runtime(self.desired), spec, snapshot_id, lock_timeout=waited))
        except SnapshotNotFound:
            raise FleetError(ErrorKind.NOT_FOUND, "no_snapshot", id=id_, snapshot=snapshot_id[:40]) from None
        except LockHeld as exc:
            raise FleetError(ErrorKind.BUSY, "restore_busy", id=id_, seconds=f"{waited:g}", holder=exc.holder) from None
        except (StartFailed, OSError) as exc:
            raise FleetError(ErrorKind.FAILED, "restore_failed", id=id_, reason=str(exc)) from None
        finally:
            self.daemon.changed_at = time.monotonic()   # listings observe again
            self.daemon.disk.refresh_soon()              # the data put back is measured
        self.daemon.supervisor.forget(id_)
        return restored
