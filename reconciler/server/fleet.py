"""The seed's operations (create, list, stop, start, restart, reset password, delete, backup),
done the CST way: each one edits desired.yaml, then waits for a reconcile pass to make it so.

Handlers in ``api`` only translate HTTP to these calls; errors are ``ApiError`` with a
message key from ``messages``.
"""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from proxy.pool import mask

from ..desired import edits
from ..desired.model import DesiredState, instance_id, parse, port_of
from ..desired.restricted import RestrictedChange, refuse_restricted
from ..desired.shared_file import ChangeRefused, CurrentFileInvalid, Snapshot
from ..engine.inventory import instance_rows
from ..engine.reconcile import Result
from ..runtime.local import LocalRuntime, port_is_free
from .control import Control

# the seed (PM2) called a running instance "online"
SEED_STATUS = {"running": "online", "stopped": "stopped", "crashed": "errored",
               "port-taken": "errored", "errored": "errored"}


class ApiError(Exception):
    def __init__(self, status: int, key: str, **params: Any):
        self.status, self.key, self.params = status, key, params
        super().__init__(key)


def _problems(exc: Exception) -> str:
    return "; ".join(str(p) for p in getattr(exc, "problems", [])) or str(exc)


def parse_port(body: Any) -> int:
    if not isinstance(body, dict):
        raise ApiError(400, "bad_body")
    if "port" not in body or body["port"] in (None, ""):
        raise ApiError(400, "missing_port")
    raw = body["port"]
    # the seed's clients send a number; a string of digits is accepted as the seed's parseInt did
    digits = isinstance(raw, str) and raw.isascii() and raw.isdigit()  # not full-width or other scripts' digits
    if isinstance(raw, bool) or not (isinstance(raw, int) or digits):
        raise ApiError(400, "invalid_port", port=str(raw)[:20])
    port = int(raw)
    if not 1024 <= port <= 65535:
        raise ApiError(400, "invalid_port", port=port)
    return port


class Fleet:
    def __init__(self, daemon: Control):
        self.daemon = daemon

    @property
    def desired(self) -> DesiredState:
        return self.daemon.desired

    # -- reading

    def rows(self) -> list[dict]:
        rows = instance_rows(self.desired, self.daemon.supervisor.errored)
        for row in rows:
            row["status"] = SEED_STATUS[row["status"]]
            row["lastFailure"] = self.daemon.events.last_failure.get(row["id"])
        return rows

    def row(self, id_: str) -> dict:
        """The instance's row: declared ones and undeclared ones CST still has a record of."""
        if port_of(id_) is not None:
            for row in self.rows():
                if row["id"] == id_:
                    return row
        raise ApiError(404, "not_found", id=id_[:40])

    def _known(self, id_: str) -> int:
        """The port of an instance that is declared or still has a record; 404 for anything else."""
        port = port_of(id_)
        if port is None or (self.desired.instance(id_) is None and self.daemon.state.record(id_) is None):
            raise ApiError(404, "not_found", id=id_[:40])
        return port

    def _declared(self, id_: str) -> int:
        """The port of a declared instance; 404 for anything else."""
        port = port_of(id_)
        if port is None or self.desired.instance(id_) is None:
            raise ApiError(404, "not_found", id=id_[:40])
        return port

    def data_dir(self, id_: str) -> Path:
        port = self._known(id_)
        path = self.desired.data_dir(port)
        if not path.is_dir():
            raise ApiError(404, "no_data", id=id_)
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
        raise ApiError(409, "no_free_port", start=start)

    # -- changing (each: edit the file, then converge)

    async def _edit(self, edit, failure_key: str) -> Snapshot:
        try:
            snapshot = await self.daemon.file.change(edit, guard=refuse_restricted)
        except RestrictedChange as exc:
            raise ApiError(403, "restricted", fields=", ".join(exc.fields)) from None
        except CurrentFileInvalid as exc:
            raise ApiError(409, "file_invalid", problems=_problems(exc)) from None
        except ChangeRefused as exc:
            raise ApiError(400, "change_invalid", problems=_problems(exc)) from None
        except edits.EditError as exc:
            raise ApiError(409, failure_key, reason=str(exc)) from None
        self.daemon.accept(snapshot)
        return snapshot

    async def _converge(self, id_: str, failure_key: str) -> Result | None:
        report = await self.daemon.converge()
        result = report.result(id_)
        if result is not None and result.outcome == "failed":
            raise ApiError(500, failure_key, reason=result.detail)
        return result

    async def create(self, body: Any) -> dict:
        port = parse_port(body)
        id_ = instance_id(port)

        def add(text: str) -> str:
            if parse(text, self.daemon.file.path).instance(id_) is not None:
                raise ApiError(400, "port_declared", port=port, id=id_)
            return edits.add_instance(text, port, "running")

        if self.desired.instance(id_) is not None:
            raise ApiError(400, "port_declared", port=port, id=id_)
        if port in self._reserved():
            raise ApiError(400, "reserved_port", port=port, setting=self._reserved()[port])
        if not port_is_free(self.desired.settings.sillytavern.listen_address, port):
            raise ApiError(400, "port_in_use", port=port)
        await self._edit(add, "create_failed")
        self.daemon.supervisor.forget(id_)
        await self._converge(id_, "create_failed")
        row = self.row(id_)
        spec = self.desired.instance(id_)
        return {"id": id_, "port": port, "dataDir": row["dataDir"], "status": "running",
                "startTime": row["startTime"], "password": LocalRuntime(self.desired).password(spec)}

    async def set_state(self, id_: str, state: str) -> dict:
        port = self._declared(id_)
        if self.desired.instance(id_).state != state:
            await self._edit(lambda text: edits.set_instance_state(text, port, state),
                             "stop_failed" if state == "stopped" else "start_failed")
        self.daemon.supervisor.forget(id_)
        await self._converge(id_, "stop_failed" if state == "stopped" else "start_failed")
        return {"id": id_, "status": SEED_STATUS["running" if state == "running" else "stopped"],
                "message_key": "started" if state == "running" else "stopped"}

    async def restart(self, id_: str) -> dict:
        self._declared(id_)
        if self.desired.instance(id_).state != "running":
            raise ApiError(409, "restart_failed", reason=f"{id_} is stopped in desired.yaml; start it instead")
        self.daemon.supervisor.forget(id_)
        self.daemon.supervisor.request_restart(id_, "asked through the API")
        await self._converge(id_, "restart_failed")
        return {"id": id_, "status": "online", "message_key": "restarted"}

    async def reset_password(self, id_: str) -> dict:
        self._declared(id_)
        spec = self.desired.instance(id_)
        if spec.password_env:
            raise ApiError(409, "password_from_env", id=id_, env=spec.password_env)
        password = str(uuid.uuid4())
        LocalRuntime(self.desired).state.write_secret(f"{id_}.password", password)
        # the launch fingerprint includes the password: the next pass restarts the instance with it
        await self._converge(id_, "restart_failed")
        return {"id": id_, "password": password}

    async def rotate_key(self, id_: str) -> dict:
        self._declared(id_)
        spec = self.desired.instance(id_)
        if not spec.proxy:
            raise ApiError(409, "proxy_off", id=id_)
        runtime = LocalRuntime(self.desired)
        async with runtime.lock(120):   # not while a pass starts the instance with the old key
            key = await asyncio.to_thread(runtime.rotate_key, spec)
        await self.daemon.proxy_keys_changed()
        return {"id": id_, "key": mask(key), "message_key": "key_rotated"}

    async def delete(self, id_: str) -> dict:
        port = self._known(id_)
        if self.desired.instance(id_) is not None:
            await self._edit(lambda text: edits.remove_instance(text, port), "delete_failed")
        result = await self._converge(id_, "delete_failed")
        self.daemon.supervisor.forget(id_)
        archive = result.archive if result else ""
        return {"id": id_, "archive": archive or None, "message_key": "deleted" if archive else "deleted_no_data"}
