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
from itertools import groupby
from typing import Callable, Mapping

import psutil

from ..desired.model import DesiredState, InstanceSpec
from ..runtime.base import LaunchImpossible, Observed, ReleaseId, Runtime, StartFailed
from ..runtime.processes import utc_now
from .plan import Action, ActionKind, Target, plan
from .results import Happened, Report, Result
from .rollout import Halt, roll_out, stands

# the daemon's policies (crash backoff, memory limit): given what was observed, which instances
# to hold back and which to restart anyway, each with why
Hints = Callable[[Mapping[str, Observed]], tuple[Mapping[str, str], Mapping[str, str]]]

log = logging.getLogger("cst.reconcile")


def targets(desired: DesiredState, runtime: Runtime) -> list[Target]:
    """What each declared instance should be, resolved at the edge (variables, secrets)."""
    out: list[Target] = []
    for spec in desired.instances:
        try:
            out.append(Target(spec.id, spec.port, spec.state, runtime.launch_fingerprint(spec),
                              release=runtime.release_identity(spec), parks=spec.park_after is not None))
        except LaunchImpossible as exc:
            out.append(Target(spec.id, spec.port, spec.state, problem=str(exc)))
    return out


async def reconcile(runtime: Runtime, desired: DesiredState, check: bool = False,
                    on_result: Callable[[Result], None] | None = None, lock_timeout: float = 60.0,
                    hints: Hints | None = None, on_phase: Callable[[str], None] | None = None,
                    on_action: Callable[[Action], None] | None = None) -> Report:
    """Make reality match ``desired`` (or, with ``check``, only say what that would take) through
    ``runtime``, made for it by the caller (read-only for a check).

    ``on_phase`` hears what the pass is doing ("waiting for the state dir lock", "observing"...),
    ``on_action`` each action as it begins and ``on_result`` each result: the daemon tells a
    caller that waits too long what is still pending."""
    report = Report(check=check)
    phase = on_phase or (lambda _: None)

    def emit(result: Result) -> None:
        report.results.append(result)
        if on_result:
            on_result(result)

    if check:
        _say_what_would_change(runtime, desired, report, emit)
        return report

    phase("waiting for the state dir lock")
    async with runtime.lock(lock_timeout):
        phase("observing")
        wanted = targets(desired, runtime)
        observed = report.observed = runtime.observe()
        hold, restart = hints(observed) if hints else ({}, {})
        halt = _standing_halt(runtime, wanted, drop_stale=True)
        actions = plan(wanted, observed, hold, restart, halt.line() if halt else None)
        if any(a.kind in _STARTS for a in actions):
            phase("preparing the SillyTavern release")
            actions = await _prepared(runtime, actions, emit)
        phase("updating the edge")
        await _follow_edge(runtime, emit, quiet=True)   # ports leaving the edge are free for their nodes
        phase("acting")
        limit = asyncio.Semaphore(desired.settings.concurrency)
        specs = {spec.id: spec for spec in desired.instances}

        async def run_group(group: list[Action]) -> None:
            async with limit:
                for action in group:
                    if on_action:
                        on_action(action)
                    emit(await _execute(runtime, action, specs.get(action.id), observed.get(action.id)))

        async def run_rollout(upgrades: list[Action]) -> None:
            nonlocal halt
            async with limit:   # one instance at a time: it takes one slot
                for action in upgrades:
                    if on_action:
                        on_action(action)
                halted = await roll_out(runtime, upgrades, specs, observed, desired.settings.sillytavern.rollout,
                                        emit, utc_now)
            if halted is not None:
                halt = halted
                runtime.record_rollout_halt(halted.as_dict())
            elif all(ReleaseId.parse(a.release).version is not None for a in upgrades):   # npm releases only
                for version in await runtime.remove_unused_releases():
                    emit(Result(f"sillytavern {version}", "changed", "removed: no instance runs it any more",
                                happened=Happened.RELEASE_REMOVED))

        upgrades = [a for a in actions if a.kind == ActionKind.UPGRADE]
        others = [a for a in actions if a.kind != ActionKind.UPGRADE]
        groups = [list(g) for _, g in groupby(others, key=lambda a: a.id)]
        await asyncio.gather(*(run_group(g) for g in groups))
        if upgrades:   # after the rest: an instance found running without a record is adopted first
            await run_rollout(upgrades)
        phase("updating the edge")
        await _follow_edge(runtime, emit, quiet=False)   # and ports their nodes left are the edge's
        report.halt = halt.as_dict() if halt else None
    return report


def _say_what_would_change(runtime: Runtime, desired: DesiredState, report: Report,
                           emit: Callable[[Result], None]) -> None:
    """A check: observe and plan without the lock, and say what each action would do."""
    wanted = targets(desired, runtime)
    observed = runtime.observe()
    halt = _standing_halt(runtime, wanted, drop_stale=False)
    report.halt = halt.as_dict() if halt else None
    for action in plan(wanted, observed, halted=halt.line() if halt else None):
        emit(_would(action, observed.get(action.id)))


async def _prepared(runtime: Runtime, actions: list[Action], emit: Callable[[Result], None]) -> list[Action]:
    """Get the releases ready for the starts among ``actions``; when that fails, those starts
    fail with why (the others, stops included, go ahead)."""
    ready = await runtime.prepare()
    if ready.failure:
        emit(Result(ready.subject, "failed", ready.failure, happened=Happened.RELEASE_FAILED))
        reason = f"{ready.subject} is not ready: {ready.failure.splitlines()[0]}"
        return [Action(ActionKind.FAIL, a.id, a.port, reason) if a.kind in _STARTS else a for a in actions]
    if ready.done:
        emit(Result(ready.subject, "changed", ready.done, happened=Happened.RELEASE_READY))
    return actions


async def reconcile_once(runtime: Runtime, desired: DesiredState, check: bool = False,
                         on_result: Callable[[Result], None] | None = None, lock_timeout: float = 60.0) -> Report:
    """One pass on a runtime made for it alone (``cst apply``, a plan), closed after it."""
    try:
        return await reconcile(runtime, desired, check, on_result, lock_timeout)
    finally:
        await runtime.close()


async def _follow_edge(runtime: Runtime, emit: Callable[[Result], None], quiet: bool) -> None:
    """The edge's routes as the file says; a failure is reported and the pass goes on (the edge
    keeps its previous routes). ``quiet``: a port still held is not worth a word yet."""
    try:
        change = await asyncio.to_thread(runtime.follow_edge)
    except OSError as exc:
        emit(Result("edge", "failed", str(exc), happened=Happened.EDGE_FAILED))
        return
    detail, waiting = change.detail, change.waiting
    if waiting and not quiet:
        detail = "; ".join(filter(None, [detail, "ports still in use by another process, taken at the next pass: "
                                         + ", ".join(map(str, waiting))]))
    if detail:
        emit(Result("edge", "changed", detail, happened=Happened.EDGE_CHANGED))


_STARTS = (ActionKind.START, ActionKind.RESTART, ActionKind.UPGRADE)


def standing_halt(runtime: Runtime, desired: DesiredState) -> Halt | None:
    """The rollout halt that holds the fleet back now, if one does (for `cst status`)."""
    return _standing_halt(runtime, targets(desired, runtime), drop_stale=False)


def _standing_halt(runtime: Runtime, wanted: list[Target], drop_stale: bool) -> Halt | None:
    """The rollout halt an earlier pass recorded, while the file still wants what it wanted then;
    one that no longer stands is dropped with ``drop_stale``."""
    halt = Halt.from_dict(runtime.rollout_halt())
    if halt is None:
        return None
    if stands(halt, {t.id: t.release for t in wanted if t.release}):
        return halt
    if drop_stale:
        runtime.record_rollout_halt(None)
    return None


_HAPPENS = {ActionKind.OK: Happened.UNCHANGED, ActionKind.ADOPT: Happened.ADOPTED, ActionKind.FORGET_PID: Happened.FORGOTTEN,
            ActionKind.START: Happened.STARTED, ActionKind.RESTART: Happened.RESTARTED, ActionKind.UPGRADE: Happened.UPGRADED,
            ActionKind.STOP: Happened.STOPPED, ActionKind.PARK: Happened.PARKED,
            ActionKind.REMOVE: Happened.REMOVED, ActionKind.BACK_OFF: Happened.HELD, ActionKind.FAIL: Happened.IMPOSSIBLE}
_AFTER = {ActionKind.START: "running", ActionKind.RESTART: "running", ActionKind.UPGRADE: "running", ActionKind.STOP: "stopped",
          ActionKind.PARK: "parked", ActionKind.REMOVE: "absent"}


def _would(action: Action, seen: Observed | None) -> Result:
    before = seen.status if seen else "absent"
    happens = _HAPPENS[action.kind]
    if action.kind in (ActionKind.FAIL, ActionKind.BACK_OFF):
        return Result(action.id, "failed", action.reason, before, happened=happens)
    if action.changes:
        return Result(action.id, "changed", f"would be {happens.value}", before, _AFTER[action.kind],
                      happened=happens)
    return Result(action.id, "ok", action.reason, before, before, happened=happens)


async def _execute(runtime: Runtime, action: Action, spec: InstanceSpec | None,
                   seen: Observed | None) -> Result:
    """Do ``action``; its result, a failure as a failed result (by the exception's type)."""
    before = seen.status if seen else "absent"

    def failed(happened: Happened, detail: str, cause: str = "") -> Result:
        return Result(action.id, "failed", detail, before, happened=happened, cause=cause)

    try:
        return await _act(runtime, action, spec, seen, before)
    except StartFailed as exc:
        return failed(Happened.START_FAILED, f"did not start: {exc}", exc.cause)
    except OSError as exc:
        return failed(Happened.ACTION_FAILED, f"{action.kind.value}: {exc}")
    except psutil.Error as exc:
        # the process exited (or changed hands) between observing and acting: the next pass sees
        return failed(Happened.ACTION_FAILED, f"{action.kind.value}: the process changed meanwhile ({exc})")
    except Exception as exc:  # a defect: reported for this instance, logged, and the others go on
        log.error("%s of %s failed unexpectedly", action.kind.value, action.id, exc_info=exc)
        return failed(Happened.ACTION_FAILED, f"{action.kind.value}: unexpected {type(exc).__name__}: {exc}")


async def _act(runtime: Runtime, action: Action, spec: InstanceSpec | None, seen: Observed | None,
               before: str) -> Result:
    happens = _HAPPENS[action.kind]
    if action.kind in (ActionKind.FAIL, ActionKind.BACK_OFF):
        return Result(action.id, "failed", action.reason, before, happened=happens)
    if action.kind == ActionKind.OK:
        return Result(action.id, "ok", action.reason, before, before, happened=happens)
    if action.kind == ActionKind.ADOPT:
        assert seen is not None and seen.pid is not None, "the planner adopts only a process it saw"
        runtime.adopt(action.id, action.port, seen.pid)
        return Result(action.id, "ok", action.reason, before, "running", happened=happens)
    if action.kind == ActionKind.FORGET_PID:
        runtime.forget_pid(action.id)
        return Result(action.id, "ok", "", before, "stopped", happened=happens)
    if action.kind == ActionKind.STOP:
        await runtime.stop(action.id)
        return Result(action.id, "changed", action.reason, before, "stopped", happened=happens)
    if action.kind == ActionKind.PARK:
        await runtime.park(action.id)
        return Result(action.id, "changed", action.reason, before, "parked", happened=happens)
    if action.kind == ActionKind.REMOVE:
        archived = await runtime.archive(action.id)
        where = f"data archived in {archived}" if archived else "it had no data dir"
        return Result(action.id, "changed", f"removed; {where}", before, "absent", str(archived or ""),
                      happened=happens)
    assert spec is not None, "the planner starts only declared instances"
    if action.kind == ActionKind.RESTART:
        await runtime.stop(action.id)
        await runtime.start(spec, count_restart=True)
        return Result(action.id, "changed", action.reason, before, "running", happened=happens)
    if action.kind == ActionKind.START:
        if action.release:   # its data was last used by another release: keep a copy first
            await runtime.snapshot(action.id, "rollout")
        await runtime.start(spec, count_restart=before == "crashed")
        again = Happened.RESTARTED if before == "crashed" else happens   # "restarted: process had exited"
        return Result(action.id, "changed", action.reason, before, "running", happened=again)
    raise AssertionError(f"unhandled action {action.kind}")
