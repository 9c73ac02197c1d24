"""One reconcile pass: observe, plan, act, report.

``reconcile()`` is what ``cst apply`` runs once and what the daemon runs on every
change. Actions on different instances run concurrently (bounded by
``settings.concurrency``); actions on one instance run in order.

An action that raises ends as a ``failed`` result for that instance, never as an exception out
of the pass: the other instances' actions go on, and the next pass tries again.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass, field
from itertools import groupby
from typing import Callable, Literal, Mapping

import psutil

from ..desired.model import DesiredState, InstanceSpec
from ..runtime.base import LaunchImpossible, Observed, Runtime, StartFailed
from ..runtime.local import LocalRuntime
from .plan import Action, Kind, Target, plan

Outcome = Literal["ok", "changed", "failed"]
# the daemon's policies (crash backoff, memory limit): given what was observed, which instances
# to hold back and which to restart anyway, each with why
Hints = Callable[[Mapping[str, Observed]], tuple[Mapping[str, str], Mapping[str, str]]]

log = logging.getLogger("cst.reconcile")


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

    def lines(self, diff: bool) -> list[str]:
        """What ``cst apply`` prints for this result; ``diff``: also observed -> desired."""
        if diff and self.before != self.after and self.outcome == "changed":
            return [self.line(), f"    - {self.before}", f"    + {self.after}"]
        return [self.line()]


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

    def recap_line(self) -> str:
        recap = self.recap
        return f"{'check: ' if self.check else ''}ok={recap['ok']} changed={recap['changed']} failed={recap['failed']}"

    def text(self, diff: bool) -> str:
        """The whole report as ``cst apply`` prints it (``--check --diff`` when asked)."""
        return "\n".join([line for r in self.results for line in r.lines(diff)] + [self.recap_line()]) + "\n"

    def as_dict(self) -> dict:
        return {"check": self.check, "results": [asdict(r) for r in self.results], "recap": self.recap}


def targets(desired: DesiredState, runtime: Runtime) -> list[Target]:
    """What each declared instance should be, resolved at the edge (variables, secrets)."""
    out: list[Target] = []
    for spec in desired.instances:
        try:
            out.append(Target(spec.id, spec.port, spec.state, runtime.launch_fingerprint(spec)))
        except LaunchImpossible as exc:
            out.append(Target(spec.id, spec.port, spec.state, problem=str(exc)))
    return out


async def reconcile(desired: DesiredState, check: bool = False,
                    on_result: Callable[[Result], None] | None = None, lock_timeout: float = 60.0,
                    hints: Hints | None = None, runtime: Runtime | None = None,
                    on_phase: Callable[[str], None] | None = None,
                    on_action: Callable[[Action], None] | None = None) -> Report:
    """Make reality match ``desired`` (or, with ``check``, only say what that would take).

    ``on_phase`` hears what the pass is doing ("waiting for the state dir lock", "observing"...),
    ``on_action`` each action as it begins and ``on_result`` each result: the daemon tells a
    caller that waits too long what is still pending."""
    if runtime is None:
        local = LocalRuntime(desired, readonly=check)
        try:
            return await reconcile(desired, check, on_result, lock_timeout, hints, local, on_phase, on_action)
        finally:
            await local.close()
    report = Report(check=check)
    phase = on_phase or (lambda _: None)

    def emit(result: Result) -> None:
        report.results.append(result)
        if on_result:
            on_result(result)

    if check:
        observed = runtime.observe()
        for action in plan(targets(desired, runtime), observed):
            emit(_would(action, observed.get(action.id)))
        return report

    phase("waiting for the state dir lock")
    async with runtime.lock(lock_timeout):
        phase("observing")
        wanted = targets(desired, runtime)
        observed = report.observed = runtime.observe()
        hold, restart = hints(observed) if hints else ({}, {})
        actions = plan(wanted, observed, hold, restart)
        if any(a.kind in (Kind.START, Kind.RESTART) for a in actions):
            phase("preparing the SillyTavern release")
            ready = await runtime.prepare()
            if ready.failure:
                emit(Result(ready.subject, "failed", ready.failure))
                reason = f"{ready.subject} is not ready: {ready.failure.splitlines()[0]}"
                actions = [Action(Kind.FAIL, a.id, a.port, reason) if a.kind in (Kind.START, Kind.RESTART)
                           else a for a in actions]
            elif ready.done:
                emit(Result(ready.subject, "changed", ready.done))
        phase("acting")
        limit = asyncio.Semaphore(desired.settings.concurrency)
        specs = {spec.id: spec for spec in desired.instances}

        async def run_group(group: list[Action]) -> None:
            async with limit:
                for action in group:
                    if on_action:
                        on_action(action)
                    emit(await _execute(runtime, action, specs.get(action.id), observed.get(action.id)))

        groups = [list(g) for _, g in groupby(actions, key=lambda a: a.id)]
        await asyncio.gather(*(run_group(g) for g in groups))
    return report


def _would(action: Action, seen: Observed | None) -> Result:
    before = seen.status if seen else "absent"
    if action.kind in (Kind.FAIL, Kind.BACK_OFF):
        return Result(action.id, "failed", action.reason, before)
    if action.changes:
        after = {Kind.START: "running", Kind.RESTART: "running", Kind.STOP: "stopped",
                 Kind.REMOVE: "absent"}[action.kind]
        return Result(action.id, "changed", f"would be {action.reason.split(':')[0]}", before, after)
    return Result(action.id, "ok", action.reason, before, before)


async def _execute(runtime: Runtime, action: Action, spec: InstanceSpec | None,
                   seen: Observed | None) -> Result:
    before = seen.status if seen else "absent"
    try:
        if action.kind in (Kind.FAIL, Kind.BACK_OFF):
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
            await runtime.stop(action.id)
            return Result(action.id, "changed", "stopped", before, "stopped")
        if action.kind == Kind.REMOVE:
            archived = await runtime.archive(action.id)
            where = f"data archived in {archived}" if archived else "it had no data dir"
            return Result(action.id, "changed", f"removed; {where}", before, "absent", str(archived or ""))
        if action.kind == Kind.RESTART:
            await runtime.stop(action.id)
            await runtime.start(spec, count_restart=True)
            return Result(action.id, "changed", action.reason, before, "running")
        if action.kind == Kind.START:
            await runtime.start(spec, count_restart=before == "crashed")
            return Result(action.id, "changed", action.reason, before, "running")
    except StartFailed as exc:
        return Result(action.id, "failed", f"did not start: {exc}", before)
    except OSError as exc:
        return Result(action.id, "failed", f"{action.kind.value}: {exc}", before)
    except psutil.Error as exc:
        # the process exited (or changed hands) between observing and acting: the next pass sees
        return Result(action.id, "failed", f"{action.kind.value}: the process changed meanwhile ({exc})", before)
    except Exception as exc:  # a defect: reported for this instance, logged, and the others go on
        log.error("%s of %s failed unexpectedly", action.kind.value, action.id, exc_info=exc)
        return Result(action.id, "failed", f"{action.kind.value}: unexpected {type(exc).__name__}: {exc}", before)
    raise AssertionError(f"unhandled action {action.kind}")
