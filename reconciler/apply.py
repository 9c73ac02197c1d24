"""One reconcile pass: observe, plan, act, report.

``reconcile()`` is what ``cst apply`` runs once and what the daemon runs on every
change. Actions on different instances run concurrently (bounded by
``settings.concurrency``); actions on one instance run in order.
"""
from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from itertools import groupby
from typing import Callable, Literal, Mapping

from . import sillytavern
from .desired import DesiredState
from .plan import Action, Kind, Observed, plan
from .runtime import LaunchSpec, LocalRuntime, StartFailed
from .statedir import Record

Outcome = Literal["ok", "changed", "failed"]
# the daemon's policies (crash backoff, memory limit): given what was observed, which instances
# to hold back and which to restart anyway, each with why
Hints = Callable[[Mapping[str, Observed]], tuple[Mapping[str, str], Mapping[str, str]]]


@dataclass(frozen=True)
class Result:
    id: str
    outcome: Outcome
    detail: str = ""
    before: str = ""        # observed status before the pass (for --diff)
    after: str = ""         # what it should be after
    archive: str = ""       # where a removed instance's data went

    def line(self) -> str:
        return f"{self.outcome}: {self.id}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    check: bool = False
    observed: dict[str, Observed] = field(default_factory=dict, repr=False)  # before acting

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def recap(self) -> dict[str, int]:
        return {o: self.count(o) for o in ("ok", "changed", "failed")}

    def result(self, id_: str) -> Result | None:
        return next((r for r in reversed(self.results) if r.id == id_), None)

    def as_dict(self) -> dict:
        return {"check": self.check, "results": [asdict(r) for r in self.results], "recap": self.recap}


async def reconcile(desired: DesiredState, check: bool = False,
                    on_result: Callable[[Result], None] | None = None, lock_timeout: float = 60.0,
                    hints: Hints | None = None) -> Report:
    """Make reality match ``desired`` (or, with ``check``, only say what that would take)."""
    runtime = LocalRuntime(desired, readonly=check)
    report = Report(check=check)

    def emit(result: Result) -> None:
        report.results.append(result)
        if on_result:
            on_result(result)

    if check:
        targets, _ = runtime.targets()
        observed = runtime.observe()
        for action in plan(targets, observed):
            emit(_would(action, observed.get(action.id)))
        return report

    runtime.state.ensure()
    async with runtime.state.alock(timeout=lock_timeout):
        targets, specs = runtime.targets()
        observed = report.observed = runtime.observe()
        hold, restart = hints(observed) if hints else ({}, {})
        actions = plan(targets, observed, hold, restart)
        if any(a.kind in (Kind.START, Kind.RESTART) for a in actions):
            failure = await _ensure_release(desired, emit)
            if failure:
                actions = [Action(Kind.FAIL, a.id, a.port, failure) if a.kind in (Kind.START, Kind.RESTART)
                           else a for a in actions]
        limit = asyncio.Semaphore(desired.settings.concurrency)

        async def run_group(group: list[Action]) -> None:
            async with limit:
                for action in group:
                    emit(await _execute(runtime, action, specs.get(action.id), observed.get(action.id)))

        groups = [list(g) for _, g in groupby(actions, key=lambda a: a.id)]
        await asyncio.gather(*(run_group(g) for g in groups))
    return report


async def _ensure_release(desired: DesiredState, emit: Callable[[Result], None]) -> str | None:
    """Install the pinned SillyTavern on first need; the reason it failed, or None."""
    st = desired.settings.sillytavern
    if st.server is not None:
        return None if st.server.is_file() else f"settings.sillytavern.server: {st.server} does not exist"
    if sillytavern.is_installed(st.version, desired.settings.state_dir):
        return None
    name = f"sillytavern {st.version}"
    try:
        await asyncio.to_thread(sillytavern.install, st.version, desired.settings.state_dir)
    except (sillytavern.InstallError, OSError) as exc:
        emit(Result(name, "failed", str(exc)))
        return f"SillyTavern {st.version} is not installed: {str(exc).splitlines()[0]}"
    emit(Result(name, "changed", "installed from the npm registry"))
    return None


def _would(action: Action, seen: Observed | None) -> Result:
    before = seen.status if seen else "absent"
    if action.kind in (Kind.FAIL, Kind.WAIT):
        return Result(action.id, "failed", action.reason, before)
    if action.changes:
        after = {Kind.START: "running", Kind.RESTART: "running", Kind.STOP: "stopped",
                 Kind.REMOVE: "absent"}[action.kind]
        return Result(action.id, "changed", f"would be {action.reason.split(':')[0]}", before, after)
    return Result(action.id, "ok", action.reason, before, before)


async def _execute(runtime: LocalRuntime, action: Action, launch: LaunchSpec | None,
                   seen: Observed | None) -> Result:
    before = seen.status if seen else "absent"
    try:
        if action.kind in (Kind.FAIL, Kind.WAIT):
            return Result(action.id, "failed", action.reason, before)
        if action.kind == Kind.OK:
            return Result(action.id, "ok", "", before, before)
        if action.kind == Kind.ADOPT:
            runtime.adopt(action.id, action.port, seen.pid)
            return Result(action.id, "ok", "adopted", before, "running")
        if action.kind == Kind.FORGET_PID:
            runtime.forget_pid(action.id)
            return Result(action.id, "ok", "", before, "stopped")
        if action.kind == Kind.STOP:
            await runtime.stop(_record(runtime, action.id))
            return Result(action.id, "changed", "stopped", before, "stopped")
        if action.kind == Kind.REMOVE:
            archived = await runtime.remove(action.id)
            where = f"data archived in {archived}" if archived else "it had no data dir"
            return Result(action.id, "changed", f"removed; {where}", before, "absent", str(archived or ""))
        if action.kind == Kind.RESTART:
            await runtime.stop(_record(runtime, action.id))
            await runtime.start(launch, count_restart=True)
            return Result(action.id, "changed", action.reason, before, "running")
        if action.kind == Kind.START:
            await runtime.start(launch, count_restart=before == "crashed")
            return Result(action.id, "changed", action.reason, before, "running")
    except StartFailed as exc:
        return Result(action.id, "failed", f"did not start: {exc}", before)
    except OSError as exc:
        return Result(action.id, "failed", f"{action.kind.value}: {exc}", before)
    raise AssertionError(f"unhandled action {action.kind}")


def _record(runtime: LocalRuntime, id_: str) -> Record:
    record = runtime.state.record(id_)
    if record is None:
        raise OSError(f"no record for {id_} in {runtime.state.root}")
    return record
