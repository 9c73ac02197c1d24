"""Liveness: asking each running instance's health route, as the supervisor's restarts need it.

A hung server keeps its pid, so the exit watch cannot see it; three failed checks in a row
restart it (``Supervisor.learn_health``). Finding what to ask reads /proc, the PATH and the
instances' password files: that runs in a thread, only the requests run on the loop.
"""
from __future__ import annotations

import asyncio

from ..desired.model import DesiredState
from ..engine.results import Report
from ..runtime.health import HealthChecks
from ..runtime.launch import LaunchSpec
from ..runtime.local import LocalRuntime
from ..runtime.processes import live_process


def _to_probe(desired: DesiredState, report: Report) -> list[tuple[LaunchSpec, bool]]:
    """The processes the last pass found running and left alone (not one being started), as long
    as each is still that very process (its pid and start time): each one's launch spec, and
    whether its release has CST's health route."""
    specs = []
    for spec in desired.instances:
        result, seen = report.result(spec.id), report.observed.get(spec.id)
        if (result is not None and result.outcome == "ok" and seen is not None and seen.status == "running"
                and live_process(seen.pid, seen.create_time) is not None):
            specs.append(spec)
    if not specs:
        return []
    runtime = LocalRuntime(desired, readonly=True)
    return [(runtime.launch_spec(spec), runtime.release_for(spec).has_overlay) for spec in specs]


async def check(desired: DesiredState, report: Report | None, checks: HealthChecks) -> dict[str, str | None]:
    """Each instance's answer: None when healthy, else why not."""
    if report is None:
        return {}
    probes = await asyncio.to_thread(_to_probe, desired, report)
    answers = await asyncio.gather(*(checks.probe(launch, has_overlay) for launch, has_overlay in probes))
    return dict(zip((launch.id for launch, _ in probes), answers, strict=True))
