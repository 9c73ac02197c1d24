"""Decide what to do: ``plan(targets, observed) -> [Action]``, a pure function.

Inputs are plain values: what each declared instance should be (``Target``,
resolved from desired.yaml at the edge) and what is there now (``Observed``,
reported by the runtime, ``runtime.base``). No I/O here,
so every transition is a table row in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal, Mapping, Sequence

from ..runtime.base import Observed


@dataclass(frozen=True)
class Target:
    """A declared instance, with what its process must have been started with."""

    id: str
    port: int
    state: Literal["running", "stopped"]
    fingerprint: str = ""           # digest of everything a restart would change
    release: str = ""               # the release it should run ("sillytavern@1.19.0"), as Observed.release says it
    problem: str | None = None      # e.g. its password variable is unset: cannot start
    parks: bool = False             # park_after is set: parked is as good as running (cst serve wakes it)


class ActionKind(str, Enum):
    OK = "ok"                       # nothing to do
    ADOPT = "adopt"                 # running already: write its record, leave the process alone
    FORGET_PID = "forget-pid"       # record says running, process is gone, and stopped is wanted
    START = "start"
    RESTART = "restart"
    UPGRADE = "upgrade"             # running another release than the file asks for: rolled out one
                                    # instance at a time, a snapshot first (see engine.rollout)
    STOP = "stop"
    PARK = "park"                   # park_after is set and it has no process: parked, not started (its
                                    # first request starts it), so a fleet's first pass starts nobody
    REMOVE = "remove"               # stop, archive the data dir, drop the record
    BACK_OFF = "back-off"           # should run, but its restarts are backing off after repeated
                                    # failures: reported as failed, since it is not running as asked
    FAIL = "fail"                   # cannot be done; reason says why


CHANGES = {ActionKind.START, ActionKind.RESTART, ActionKind.UPGRADE, ActionKind.STOP, ActionKind.PARK, ActionKind.REMOVE}


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    id: str
    port: int
    reason: str = ""
    release: str = ""               # UPGRADE: the release to run

    @property
    def changes(self) -> bool:
        return self.kind in CHANGES


def _for_declared(target: Target, seen: Observed | None, hold: str | None, restart: str | None,
                  halted: str | None) -> list[Action]:
    def act(kind: ActionKind, reason: str = "") -> list[Action]:
        return [Action(kind, target.id, target.port, reason)]

    status = seen.status if seen else "stopped"
    adopted = [Action(ActionKind.ADOPT, target.id, target.port, "adopted")] if seen and seen.adopted else []

    if target.state == "stopped":
        if status == "running":
            return act(ActionKind.STOP, "stopped")
        if status in ("crashed", "parked"):
            return act(ActionKind.FORGET_PID, "not running")
        return act(ActionKind.OK)

    if status == "parked":   # woken by its first request, on the file's release and settings then
        return act(ActionKind.OK, "parked") if target.parks else act(ActionKind.START, "started: park_after is off")

    # running is wanted
    if seen is not None and seen.status == "port-taken":
        return act(ActionKind.FAIL, f"port {target.port} is held by another process ({seen.holder})")
    if target.problem:
        return act(ActionKind.FAIL, target.problem)
    if seen is not None and seen.status == "running":
        return adopted + _for_running(target, seen, restart, halted) or act(ActionKind.OK)
    if hold:
        return act(ActionKind.BACK_OFF, hold)
    if target.parks and status == "stopped":
        return act(ActionKind.PARK, "parked: not in use")
    # its data was last used by another release: a snapshot first (release set), as in a rollout
    moving = seen.release if seen and seen.release and target.release and seen.release != target.release else None
    release = target.release if moving else ""
    if status == "crashed":
        return [Action(ActionKind.START, target.id, target.port, "restarted: process had exited", release)]
    return [Action(ActionKind.START, target.id, target.port, f"started (was on {moving})" if moving else "started",
                   release)]


def _for_running(target: Target, seen: Observed, restart: str | None, halted: str | None) -> list[Action]:
    """What a running instance that should run needs: an upgrade, a restart, or nothing."""
    def act(kind: ActionKind, reason: str = "", release: str = "") -> list[Action]:
        return [Action(kind, target.id, target.port, reason, release)]

    if seen.release and target.release and seen.release != target.release:
        if halted:   # the rollout stopped: instances not reached stay on their release until the file changes
            return act(ActionKind.OK, f"on {seen.release}: {halted}")
        return act(ActionKind.UPGRADE, f"upgraded: {seen.release} -> {target.release}", target.release)
    if seen.fingerprint != target.fingerprint:
        return act(ActionKind.RESTART, "restarted: settings changed")
    if restart:
        return act(ActionKind.RESTART, f"restarted: {restart}")
    return []   # as it should be


def plan(targets: Sequence[Target], observed: Mapping[str, Observed],
         hold: Mapping[str, str] | None = None, restart: Mapping[str, str] | None = None,
         halted: str | None = None) -> list[Action]:
    """Actions that make ``observed`` match ``targets``; instances known but undeclared are removed.

    ``hold`` names instances whose (re)start must wait, with why (crash backoff); ``restart``
    names running instances to restart anyway, with why (memory limit, an operator's request);
    ``halted`` says why a rollout stands halted: no instance changes release meanwhile.
    """
    hold, restart = hold or {}, restart or {}
    actions: list[Action] = []
    declared = {t.id for t in targets}
    for target in targets:
        actions.extend(_for_declared(target, observed.get(target.id), hold.get(target.id), restart.get(target.id),
                                     halted))
    for id_, seen in sorted(observed.items()):
        if id_ not in declared and seen.status != "port-taken":
            actions.append(Action(ActionKind.REMOVE, id_, seen.port, "removed: data archived"))
    return actions
