"""Liveness: asking each running instance's health route, as the supervisor's restarts need it.

A hung server keeps its pid, so the exit watch cannot see it; three failed checks in a row
restart it (``Supervisor.learn_health``). Finding which processes to ask reads /proc: that runs
in a thread, and the runtime's probes run their blocking part in one too.
"""
from __future__ import annotations

import asyncio

from ..desired.model import DesiredState, InstanceSpec
from ..engine.results import Report
from ..runtime.base import Runtime
from ..runtime.processes import live_process


def _to_probe(desired: DesiredState, report: Report) -> list[InstanceSpec]:
    """The processes the last pass found running and left alone (not one being started), as long
    as each is still that very process (its pid and start time)."""
    specs = []
    for spec in desired.instances:
        result, seen = report.result(spec.id), report.observed.get(spec.id)
        if (result is not None and result.outcome == "ok" and seen is not None and seen.status == "running"
                and live_process(seen.pid, seen.create_time) is not None):
            specs.append(spec)
    return specs


async def check(runtime: Runtime, desired: DesiredState, report: Report | None) -> dict[str, str | None]:
    """Each instance's answer: None when healthy, else why not."""
    if report is None:
        return {}
    specs = await asyncio.to_thread(_to_probe, desired, report)
    answers = await asyncio.gather(*(runtime.probe(spec) for spec in specs))
    return dict(zip((spec.id for spec in specs), answers, strict=True))
