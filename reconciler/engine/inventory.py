"""What the fleet looks like right now: one row per instance, for `cst status` and the REST API."""
from __future__ import annotations

import time
from typing import Callable

from ..desired.model import DesiredState
from ..runtime.local import LocalRuntime
from ..runtime.processes import tree_rss


def instance_rows(desired: DesiredState, errored: Callable[[str], str | None] = lambda _: None,
                  disk: Callable[[str], int | None] = lambda _: None) -> list[dict]:
    """Declared instances in file order, then undeclared ones CST still has a record of; ``disk``
    gives each one's data dir's disk use as last measured (never walked here: a listing must stay
    cheap at a thousand instances)."""
    runtime = LocalRuntime(desired, readonly=True)
    records = runtime.state.records()
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
        started = seen.create_time if seen and status == "running" else None
        rows.append({
            "id": id_,
            "port": port,
            "url": desired.url_of(spec) if spec else None,
            "desired": spec.state if spec else "absent",
            "status": status,
            "detail": held or (seen.holder if seen and seen.holder else ""),
            "pid": seen.pid if seen and status == "running" else None,
            "startTime": record.started_at if record and status == "running" else None,
            "uptime": round(time.time() - started, 1) if started else None,
            "memory": memory.get(seen.pid) if seen and seen.pid and status == "running" else None,
            "parkAfter": spec.park_after if spec else None,
            "restarts": record.restarts if record else 0,
            "dataDir": str(desired.data_dir(port)),
            "disk": disk(id_),
        })
    return rows
