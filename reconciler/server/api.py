"""The REST API: the seed's (ChainSillyTavern) contract, plus the desired file and status.

Handlers only translate HTTP into ``Fleet`` calls and back (``documents`` shapes what they
return); ``security`` authenticates every route but its public ones, and the ``errors``
middleware here is the one place a failure becomes HTTP: ``{"error": "...", "code": "..."}`` in
the caller's language, with no traceback.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from ..desired.edits import instance_lines
from ..desired.model import instance_id
from ..desired.restricted import RestrictedChange, refuse_restricted
from ..desired.schema import SCHEMAS
from ..desired.shared_file import ChangeRefused, CurrentFileInvalid, StaleVersion
from ..engine.inventory import InstanceRow
from ..engine.reconcile import reconcile_once
from ..runtime.data_zip import MANIFEST, zip_stream
from . import documents, fleet_metrics, logstream, responses, usage
from .admin_page import Page
from .control import Control, NotConverged
from .errors import ErrorKind, FleetError
from .fleet import Fleet, change_note
from .keypool import pool_document
from .messages import message
from .ratelimit import FailureLimiter
from .responses import Handler, error_answer, json_answer, language_of
from .security import ADMIN_KEY, LIMITER, TRUSTED_PROXIES, auth, caller

log = logging.getLogger("cst.api")
DAEMON = web.AppKey("daemon", Control)
FLEET = web.AppKey("fleet", Fleet)
STARTED = web.AppKey("started", float)
OPENAPI = web.AppKey("openapi", dict)
PAGE = web.AppKey("page", Page)
STREAMS = web.AppKey("streams", set[asyncio.Task[None]])  # the tasks serving open streams

# the one place a service failure becomes HTTP
STATUS: dict[ErrorKind, int] = {
    ErrorKind.BAD_REQUEST: 400, ErrorKind.FORBIDDEN: 403, ErrorKind.NOT_FOUND: 404, ErrorKind.CONFLICT: 409,
    ErrorKind.STALE: 412, ErrorKind.UNSUPPORTED_BODY: 415, ErrorKind.PRECONDITION_REQUIRED: 428,
    ErrorKind.FAILED: 500, ErrorKind.UNAVAILABLE: 503, ErrorKind.BUSY: 504,
}


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except FleetError as exc:
        answer = error_answer(request, STATUS[exc.kind], exc.code, **exc.params)
        if exc.retry_after is not None:
            answer.headers["Retry-After"] = str(exc.retry_after)
        return answer
    except NotConverged as exc:  # the change is in the file; the caller is not kept waiting for ever
        return error_answer(request, 504, "not_applied", seconds=f"{exc.waited:g}", pending=exc.pending)
    except web.HTTPNotFound:
        return error_answer(request, 404, "not_route")
    except web.HTTPMethodNotAllowed:
        return error_answer(request, 405, "method")
    except web.HTTPException as exc:   # aiohttp's own (a body over the limit): its reason, in English
        return json_answer({"error": exc.reason, "code": f"http_{exc.status}"}, status=exc.status)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        if responses.started(request):
            raise   # its answer is under way: aiohttp ends the connection instead of answering twice
        return error_answer(request, 500, "internal")


async def _json_body(request: web.Request) -> object:
    content_type = request.content_type
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise FleetError(ErrorKind.UNSUPPORTED_BODY, "bad_content_type", content_type=content_type[:60])
    try:
        return await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError):
        raise FleetError(ErrorKind.BAD_REQUEST, "bad_body") from None


def _done(request: web.Request, result: dict[str, Any]) -> web.Response:
    key = result.pop("message_key", None)
    if key:
        result["message"] = message(key, language_of(request), **result)
    return json_answer(result)


# -- the seed's endpoints

async def health(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    return json_answer({
        "status": "ok",
        "version": __version__,
        "instances": len(daemon.desired.instances),
        "desiredValid": daemon.reading.valid,
        "uptime": round(time.monotonic() - request.app[STARTED], 1),
    })


async def create_instance(request: web.Request) -> web.Response:
    body = await _json_body(request)
    return json_answer(documents.created_document(await request.app[FLEET].create(body, _client(request))), status=201)


async def _with_usage(request: web.Request, rows: list[InstanceRow]) -> list[dict[str, Any]]:
    """Rows (shared by listings up to a second old) as the API shows them, with each instance's
    use as of now (one call to the proxy for them all)."""
    daemon = request.app[DAEMON]
    fields = await usage.instance_fields(daemon.proxy, [row.id for row in rows])
    return [{**documents.instance_document(row, daemon.events.last_failure.get(row.id)), **fields[row.id]}
            for row in rows]


async def list_instances(request: web.Request) -> web.Response:
    try:
        rows = await request.app[FLEET].rows()
    except OSError:
        log.exception("listing instances")
        raise FleetError(ErrorKind.FAILED, "list_failed") from None
    return json_answer(await _with_usage(request, rows))


async def get_instance(request: web.Request) -> web.Response:
    (row,) = await _with_usage(request, [await request.app[FLEET].row(request.match_info["id"])])
    return json_answer(row)


async def stop_instance(request: web.Request) -> web.Response:
    changed = await request.app[FLEET].set_state(request.match_info["id"], "stopped", _client(request))
    return _done(request, documents.changed_document(changed))


async def start_instance(request: web.Request) -> web.Response:
    changed = await request.app[FLEET].set_state(request.match_info["id"], "running", _client(request))
    return _done(request, documents.changed_document(changed))


async def restart_instance(request: web.Request) -> web.Response:
    return _done(request, documents.changed_document(await request.app[FLEET].restart(request.match_info["id"])))


async def park_instance(request: web.Request) -> web.Response:
    return _done(request, documents.changed_document(await request.app[FLEET].park(request.match_info["id"]),
                                                     observed=True))


async def wake_instance(request: web.Request) -> web.Response:
    return _done(request, documents.changed_document(await request.app[FLEET].wake(request.match_info["id"]),
                                                     observed=True))


async def reset_password(request: web.Request) -> web.Response:
    return json_answer(documents.password_document(await request.app[FLEET].reset_password(request.match_info["id"])))


async def rotate_key(request: web.Request) -> web.Response:
    id_ = request.match_info["id"]
    return _done(request, documents.key_document(id_, await request.app[FLEET].rotate_key(id_)))


async def delete_instance(request: web.Request) -> web.Response:
    return _done(request, documents.deleted_document(await request.app[FLEET].delete(request.match_info["id"],
                                                                                     _client(request))))


async def list_backups(request: web.Request) -> web.Response:
    snapshots = await request.app[FLEET].backups(request.match_info["id"])
    return json_answer([documents.snapshot_document(snapshot) for snapshot in snapshots])


async def restore_backup(request: web.Request) -> web.Response:
    body = await _json_body(request)
    id_ = request.match_info["id"]
    return _done(request, documents.restored_document(id_, await request.app[FLEET].restore(id_, body)))


async def backup(request: web.Request) -> web.StreamResponse:
    id_ = request.match_info["id"]
    root = request.app[FLEET].data_dir(id_)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    response = web.StreamResponse(headers={
        "Content-Type": "application/zip",
        "Content-Disposition": f'attachment; filename="{id_}-{stamp}.zip"',
    })
    response.enable_chunked_encoding()
    await responses.start(response, request)
    left_out: list[tuple[str, str]] = []
    try:
        async for chunk in zip_stream(root, left_out):
            await response.write(chunk)
    except Exception as exc:
        # The head (200) is gone: the one honest signal left is a connection cut before the
        # chunked body's end, which every client reports as a failed download.
        log.error("backup of %s failed after it started; connection cut: %s", id_, exc)
        if request.transport is not None:
            request.transport.abort()
        return response
    if left_out:
        log.warning("backup of %s left out %d files or folders (listed in its %s): %s", id_, len(left_out), MANIFEST,
                    ", ".join(f"{path} ({reason})" for path, reason in left_out[:10]))
    await response.write_eof()
    return response


# -- the desired file and the daemon's status

def if_match(header: str) -> frozenset[str] | None:
    """The versions an ``If-Match`` header accepts, as RFC 9110 reads it: ``*`` any current
    version (None); else its entity tags compared strongly, so a weak one (``W/"..."``) never
    matches. Tags are the file's sha256, quoted or not."""
    if header.strip() == "*":
        return None
    tags = (tag.strip() for tag in header.split(","))
    return frozenset(tag.strip('"') for tag in tags if tag and not tag.startswith("W/"))


def _client(request: web.Request) -> str:
    """Who asked, as a change's history names them: the client's address."""
    return caller(request) or "an unknown address"


async def get_desired(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    reading = await daemon.file.aread()
    return json_answer({
        "path": str(daemon.file.path), "text": reading.text, "sha256": reading.sha256,
        "valid": reading.valid, "problems": [str(p) for p in reading.problems],
        "warnings": [str(w) for w in reading.desired.warnings] if reading.desired is not None else [],
        # a valid file only (the loader's limits held for it), and off the loop that relays chats
        "instances": {instance_id(port): {"from": first, "to": last}
                      for port, (first, last) in (await asyncio.to_thread(instance_lines, reading.text)
                                                  if reading.valid else {}).items()},
        "git": await asyncio.to_thread(daemon.git.document)})


async def _file_text(request: web.Request) -> str:
    """A whole desired.yaml sent as the body: as it is, or as ``{"text": ...}`` in JSON."""
    raw = await request.read()
    text: str | None
    try:
        text = raw.decode("utf-8")
        if request.content_type == "application/json":
            body = json.loads(text)
            text = body["text"] if isinstance(body, dict) and isinstance(body.get("text"), str) else None
    except (UnicodeDecodeError, ValueError):
        text = None
    if text is None:
        raise FleetError(ErrorKind.BAD_REQUEST, "bad_body")
    return text


async def put_desired(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    header = request.headers.get("If-Match", "").strip()
    if not header:
        raise FleetError(ErrorKind.PRECONDITION_REQUIRED, "if_match_required")
    text = await _file_text(request)
    try:
        reading = await daemon.file.replace(text, if_match(header), guard=refuse_restricted, base=daemon.desired,
                                             note=change_note(f"replace desired.yaml (PUT, If-Match {header[:12]}…)",
                                                              _client(request)))
    except RestrictedChange as exc:
        raise FleetError(ErrorKind.FORBIDDEN, "restricted", fields=", ".join(exc.fields)) from None
    except StaleVersion as exc:
        raise FleetError(ErrorKind.STALE, "stale", sha256=exc.current) from None
    except ChangeRefused as exc:
        raise FleetError(ErrorKind.BAD_REQUEST, "change_invalid", problems="; ".join(str(p) for p in exc.problems)) from None
    except CurrentFileInvalid as exc:
        raise FleetError(ErrorKind.CONFLICT, "file_invalid", problems="; ".join(str(p) for p in exc.problems)) from None
    except OSError as exc:  # disk full, read-only: the old file is untouched
        raise FleetError(ErrorKind.FAILED, "write_failed", reason=exc.strerror or str(exc)) from None
    daemon.accept(reading)
    report = await daemon.converge()
    return json_answer({"sha256": reading.sha256, "valid": True, "recap": report.recap,
                  "failed": [r.line() for r in report.results if r.outcome == "failed"]})


async def plan(request: web.Request) -> web.Response:
    """What a candidate desired.yaml would change on this host, as ``cst apply --check --diff``
    prints it; nothing is changed or written (a pull request's check before it is merged)."""
    daemon = request.app[DAEMON]
    text = await _file_text(request)
    candidate = await asyncio.to_thread(daemon.file.interpret, text)
    if candidate.desired is None:
        raise FleetError(ErrorKind.BAD_REQUEST, "change_invalid", problems="; ".join(str(p) for p in candidate.problems))
    # check mode only observes and plans (blocking work, so in a thread with a loop of its own)
    report = await asyncio.to_thread(asyncio.run, reconcile_once(daemon.runtime(candidate.desired, readonly=True),
                                                                 candidate.desired, check=True))
    return json_answer({"text": report.text(diff=True), "recap": report.recap,
                  "results": [asdict(r) for r in report.results], "sha256": candidate.sha256})


async def status(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    reading, report = daemon.reading, daemon.last_report
    return json_answer({
        "file": {
            "path": str(daemon.file.path), "sha256": reading.sha256, "valid": reading.valid,
            "problems": [{"file": p.file, "line": p.line, "path": p.path, "message": p.message, "text": str(p)}
                         for p in reading.problems],
            "warnings": [str(w) for w in daemon.desired.warnings],  # of the version in force
            "enforcedSha256": daemon.enforced_sha256,  # the last valid version, the one in force
        },
        "reconcile": {
            "lastRun": daemon.last_pass_at, "durationMs": daemon.last_pass_ms,
            "recap": report.recap if report else None,
            "failure": report.failure if report else None,
            "rollout": report.halt if report else None,   # a halted rollout, while it stands
            "results": [asdict(r) for r in report.results if r.outcome != "ok"] if report else [],
            "now": daemon.pending(),
        },
        "daemon": {"pid": daemon.pid, "startedAt": daemon.started_at, "version": __version__,
                   "archiveDir": str(daemon.state.archive_dir),
                   "restartNeeded": list(daemon.restart_needed),
                   "tasks": daemon.health()},
        # the data dirs' real use (allocated blocks), as last walked: rows carry each one's as "disk"
        "disk": {"total": daemon.disk.total(), "measuredAt": daemon.disk.measured_at},
        "git": await asyncio.to_thread(daemon.git.document),
    })


async def metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    rows = await request.app[FLEET].rows()
    latency = await daemon.proxy.latency() if daemon.proxy is not None else None
    response = web.Response(body=fleet_metrics.exposition(rows, daemon.parking_counters, daemon.pass_counters,
                                                          latency))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST   # with its version parameter, which content_type= refuses
    return response


async def openapi(request: web.Request) -> web.Response:
    return json_answer(request.app[OPENAPI])


# -- the admin page, and what it reads beyond the seed's endpoints

async def page_index(request: web.Request) -> web.Response:
    return request.app[PAGE].respond(request, "index.html")


async def page_file(request: web.Request) -> web.Response:
    return request.app[PAGE].respond(request, request.match_info["name"])


def _stream(handler: Handler) -> Handler:
    """Mark a handler whose response stays open, so shutdown can end it."""
    async def streaming(request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None, "a handler runs in a task"
        request.app[STREAMS].add(task)
        try:
            return await handler(request)
        finally:
            request.app[STREAMS].discard(task)
    return streaming


async def _end_streams(app: web.Application) -> None:
    # an open stream would otherwise hold the shutdown for the runner's whole timeout (60 s)
    streams: set[asyncio.Task[None]] = app[STREAMS]
    for task in list(streams):
        task.cancel()


async def events(request: web.Request) -> web.StreamResponse:
    return await request.app[DAEMON].events.respond(request)


async def instance_logs(request: web.Request) -> web.StreamResponse:
    return await logstream.respond(request, request.app[FLEET].log_path(request.match_info["id"]))


async def pool(request: web.Request) -> web.Response:
    return json_answer(await pool_document(request.app[DAEMON].proxy))


async def get_usage(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    return json_answer(await usage.usage(daemon.proxy, daemon.desired, request.query))


async def free_port(request: web.Request) -> web.Response:
    return json_answer({"port": request.app[FLEET].free_port()})


def make_app(daemon: Control, admin_key: str) -> web.Application:
    app = web.Application(middlewares=[errors, auth], client_max_size=2 * 2**20)
    app[DAEMON] = daemon
    app[FLEET] = Fleet(daemon)
    app[ADMIN_KEY] = admin_key
    app[LIMITER] = FailureLimiter()
    app[TRUSTED_PROXIES] = lambda: daemon.desired.settings.api.trusted_proxies   # as the file says now
    app[STARTED] = time.monotonic()
    app[OPENAPI] = json.loads(resources.files(SCHEMAS).joinpath("openapi.json").read_text(encoding="utf-8"))
    app.router.add_get("/health", health)
    app.router.add_get("/api/openapi.json", openapi)
    app.router.add_post("/api/instances", create_instance)
    app.router.add_get("/api/instances", list_instances)
    app.router.add_get("/api/instances/{id}", get_instance)
    app.router.add_delete("/api/instances/{id}", delete_instance)
    app.router.add_post("/api/instances/{id}/stop", stop_instance)
    app.router.add_post("/api/instances/{id}/start", start_instance)
    app.router.add_post("/api/instances/{id}/restart", restart_instance)
    app.router.add_post("/api/instances/{id}/reset-password", reset_password)
    app.router.add_post("/api/instances/{id}/park", park_instance)
    app.router.add_post("/api/instances/{id}/wake", wake_instance)
    app.router.add_post("/api/instances/{id}/rotate-key", rotate_key)
    app.router.add_get("/api/instances/{id}/backup", backup)
    app.router.add_get("/api/instances/{id}/backups", list_backups)
    app.router.add_post("/api/instances/{id}/restore", restore_backup)
    app.router.add_get("/api/desired", get_desired)
    app.router.add_put("/api/desired", put_desired)
    app.router.add_post("/api/plan", plan)
    app.router.add_get("/api/status", status)
    app.router.add_get("/metrics", metrics)
    # the admin page
    app[PAGE] = Page()
    app[STREAMS] = set()
    app.on_shutdown.append(_end_streams)
    app.router.add_get("/", page_index)
    # the whole folder: a name the page does not have ("/page/", "/page/a/b") is its 404, not a 401
    app.router.add_get("/page/{name:.*}", page_file)
    app.router.add_get("/api/events", _stream(events))
    app.router.add_get("/api/instances/{id}/logs", _stream(instance_logs))
    app.router.add_get("/api/pool", pool)
    app.router.add_get("/api/usage", get_usage)
    app.router.add_get("/api/free-port", free_port)
    return app
