"""What the fleet looks like right now: one row per instance, for `cst status` and the REST API
(which shape it, ``server.documents``)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..desired.model import DesiredState
from ..runtime.base import Runtime
from ..runtime.processes import tree_rss

# an instance's status in a row: what the runtime observed, or errored (its starts are backing off)
RowStatus = str


@dataclass(frozen=True)
class InstanceRow:
    id: str
    port: int
    url: str | None              # where its users reach it; None when it is not declared any more
    desired: str                 # running, stopped, or absent (a record without a declaration)
    status: RowStatus            # running, parked, stopped, crashed, port-taken, or errored
    detail: str                  # why errored, or who holds its port
    pid: int | None
    started_at: str | None       # when its process started (ISO 8601, UTC)
    uptime: float | None         # seconds
    memory: int | None           # RSS of its process tree, bytes
    park_after: float | None
    restarts: int
    data_dir: Path
    disk: int | None             # its data dir's disk use as last measured, bytes


def instance_rows(runtime: Runtime, desired: DesiredState, errored: Callable[[str], str | None] = lambda _: None,
                  disk: Callable[[str], int | None] = lambda _: None) -> list[InstanceRow]:
    """Declared instances in file order, then undeclared ones CST still has a record of; ``disk``
    gives each one's data dir's disk use as last measured (never walked here: a listing must stay
    cheap at a thousand instances). Blocking: reads records, /proc and ports."""
    records = runtime.records()
    observed = runtime.observe(records)
    memory = tree_rss({seen.pid for seen in observed.values() if seen.status == "running" and seen.pid})
    declared = {i.id: i for i in desired.instances}
    rows = []
    for id_ in list(declared) + sorted(set(records) - set(declared)):
        spec, seen, record = declared.get(id_), observed.get(id_), records.get(id_)
        port = spec.port if spec else records[id_].port
        status: str = seen.status if seen else "stopped"
        held = errored(id_)
        if held and status != "running":
            status = "errored"
        running = seen is not None and status == "running"
        started = seen.create_time if seen is not None and running else None
        rows.append(InstanceRow(
            id=id_, port=port, url=desired.url_of(spec) if spec else None,
            desired=spec.state if spec else "absent", status=status,
            detail=held or (seen.holder if seen and seen.holder else ""),
            pid=seen.pid if seen is not None and running else None,
            started_at=record.started_at if record and running else None,
            uptime=round(time.time() - started, 1) if started else None,
            memory=memory.get(seen.pid) if seen is not None and seen.pid and running else None,
            park_after=spec.park_after if spec else None,
            restarts=record.restarts if record else 0,
            data_dir=desired.data_dir(port), disk=disk(id_)))
    return rows
