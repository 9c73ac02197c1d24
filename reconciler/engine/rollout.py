"""Rolling a new SillyTavern release out: one instance at a time, each with a snapshot first, and
back to where it was when it fails.

The planner marks an instance running another release than the file asks for as ``UPGRADE``.
``roll_out`` takes those in file order: the canary first and alone, then batches of ``batch``.
For each: a snapshot of its data dir, stop, start on the new release, and it must keep answering
its health route and its front page for ``pause``. The first failure halts the rollout: that
instance is stopped, its data dir put back from the snapshot (what it held on the new release is
kept in the archive), and it starts again on the release it ran before. Instances not yet reached
keep running the old release. The halt stands until the file asks for something else; passes in
between leave those instances alone and say why.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..desired.model import InstanceSpec, RolloutSettings
from ..runtime.base import Observed, RolloutRuntime, StartFailed
from .plan import Action
from .results import Happened, Result


@dataclass(frozen=True)
class Halt:
    """A rollout that stopped at ``at`` because of ``reason``; it stands while the file wants
    ``wanted`` (instance id -> release)."""

    wanted: Mapping[str, str]
    at: str
    reason: str
    when: str = ""

    def line(self) -> str:
        return f"rollout halted at {self.at}: {self.reason}, rolled back"

    def as_dict(self) -> dict[str, object]:
        return {"at": self.at, "reason": self.reason, "when": self.when, "wanted": dict(self.wanted)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any] | None) -> Halt | None:
        """A halt as ``as_dict`` wrote it; None for nothing, or for a document of another shape."""
        if doc is None or not isinstance(doc.get("wanted"), dict):
            return None
        try:
            return cls({str(k): str(v) for k, v in doc["wanted"].items()}, str(doc["at"]), str(doc["reason"]),
                       str(doc.get("when", "")))
        except KeyError:
            return None


def batches(ids: Sequence[str], policy: RolloutSettings) -> list[list[str]]:
    """The canary (the first ``canary`` instances) alone first, then groups of ``batch``."""
    canary = list(ids[:policy.canary])
    rest = list(ids[policy.canary:])
    groups = [canary] if canary else []
    groups += [rest[i:i + policy.batch] for i in range(0, len(rest), policy.batch)]
    return groups


def stands(halt: Halt | None, wanted: Mapping[str, str]) -> bool:
    """Whether ``halt`` still holds: the file wants, of the instances it named, the same releases."""
    return halt is not None and all(wanted.get(id_) == release for id_, release in halt.wanted.items())


@dataclass
class _Turn:
    action: Action
    spec: InstanceSpec
    seen: Observed
    results: list[Result] = field(default_factory=list)


async def roll_out(runtime: RolloutRuntime, upgrades: Sequence[Action], specs: Mapping[str, InstanceSpec],
                   observed: Mapping[str, Observed], policy: RolloutSettings,
                   emit: Callable[[Result], None], now: Callable[[], str]) -> Halt | None:
    """Upgrade ``upgrades`` in turn; the halt if one failed (it has been rolled back), else None."""
    wanted = {a.id: a.release for a in upgrades}
    for group in batches([a.id for a in upgrades], policy):
        turns = [_Turn(a, specs[a.id], observed[a.id]) for a in upgrades if a.id in group]
        results = await asyncio.gather(*(_upgrade(runtime, turn, policy.pause) for turn in turns))
        for result in results:
            emit(result)
        failed = next((r for r in results if r.outcome == "failed"), None)
        if failed is not None:
            return Halt(wanted, failed.id, failed.cause or failed.detail, now())
    return None


async def _upgrade(runtime: RolloutRuntime, turn: _Turn, pause: float) -> Result:
    action, spec, seen = turn.action, turn.spec, turn.seen
    old = seen.release or ""
    before = seen.status

    def failed(happened: Happened, detail: str, cause: str) -> Result:
        return Result(action.id, "failed", detail, before, happened=happened, cause=cause)

    try:
        snapshot = await runtime.snapshot(action.id, "rollout")
    except OSError as exc:   # nothing was stopped
        return failed(Happened.ACTION_FAILED, f"not upgraded: could not take a snapshot first: {exc}",
                      f"no snapshot ({exc})")
    why: str | None
    try:
        await runtime.stop(action.id)
        await runtime.start(spec, count_restart=True)
        why = await runtime.stays_healthy(spec, pause)
    except StartFailed as exc:
        why = exc.cause
    except OSError as exc:
        why = str(exc)
    if why is None:
        return Result(action.id, "changed", f"upgraded: {old} -> {action.release} (snapshot {snapshot} first)",
                      before, "running", happened=Happened.UPGRADED)
    try:
        await runtime.stop(action.id)
        kept = await runtime.put_back(action.id, snapshot)
        await runtime.start(spec, count_restart=True, release=old)
    except (StartFailed, OSError, LookupError) as exc:   # LookupError: the snapshot was pruned meanwhile
        return failed(Happened.ROLLBACK_FAILED,
                      f"rollout halted: {why}; rolling back to {old} failed too: {exc}", why)
    where = f"; what it held on {action.release} is kept in {kept}" if kept else ""
    return failed(Happened.ROLLED_BACK,
                  f"rollout halted: {why}; rolled back to {old} with its data as it was (snapshot {snapshot}){where}",
                  why)
