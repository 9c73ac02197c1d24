"""What a reconcile pass reports: one ``Result`` per thing it looked at, in a ``Report``."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Literal

from ..runtime.base import Observed

Outcome = Literal["ok", "changed", "failed"]


class Happened(str, Enum):
    """What a result is, for code to decide on: ``detail`` is for people and may be reworded."""

    UNCHANGED = "unchanged"
    ADOPTED = "adopted"             # found running without a record; now recorded
    FORGOTTEN = "forgotten"         # its process was gone and stopped is wanted: record cleared
    STARTED = "started"
    RESTARTED = "restarted"         # detail says why (settings changed, memory, an operator...)
    STOPPED = "stopped"
    PARKED = "parked"               # park_after is set: no process until its first request
    REMOVED = "removed"             # stopped and archived
    HELD = "held"                   # should run, but its restarts are backing off
    IMPOSSIBLE = "impossible"       # cannot be done as declared (a taken port, an unset variable)
    START_FAILED = "start-failed"   # started, but did not come up
    ACTION_FAILED = "action-failed"  # an action raised (a stop that would not end, an I/O error)
    RELEASE_READY = "release-ready"  # the release was installed or repaired (id: the release)
    RELEASE_FAILED = "release-failed"
    RELEASE_REMOVED = "release-removed"  # no instance runs it after a rollout
    UPGRADED = "upgraded"           # now on the release the file asks for, after a snapshot
    ROLLED_BACK = "rolled-back"     # the new release failed: back on the old one, its data as it was
    ROLLBACK_FAILED = "rollback-failed"
    EDGE_CHANGED = "edge-changed"   # nginx started, reloaded or stopped (id: "edge")
    EDGE_FAILED = "edge-failed"     # nginx refused its configuration: the previous one stays in force


@dataclass(frozen=True)
class Result:
    id: str
    outcome: Outcome
    detail: str = ""
    before: str = ""        # observed status before the pass (for --diff)
    after: str = ""         # what it should be after
    archive: str = ""       # where a removed instance's data went
    happened: Happened = Happened.UNCHANGED
    cause: str = ""         # a failure's own first line, without what was being done ("exited with code 7 ...")

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
    failure: str | None = None   # the pass as a whole could not run (the state dir held, an error)
    halt: dict[str, Any] | None = None     # the rollout halt that stands after this pass (engine.rollout.Halt)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def recap(self) -> dict[str, int]:
        return {o: self.count(o) for o in ("ok", "changed", "failed")}

    def result(self, id_: str) -> Result | None:
        return next((r for r in reversed(self.results) if r.id == id_), None)

    def recap_line(self) -> str:
        recap = self.recap
        line = f"{'check: ' if self.check else ''}ok={recap['ok']} changed={recap['changed']} failed={recap['failed']}"
        if self.halt:
            line += f"\nrollout halted at {self.halt['at']}: {self.halt['reason']}, rolled back"
        return line

    def text(self, diff: bool) -> str:
        """The whole report as ``cst apply`` prints it (``--check --diff`` when asked)."""
        return "\n".join([line for r in self.results for line in r.lines(diff)] + [self.recap_line()]) + "\n"

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "results": [asdict(r) for r in self.results], "recap": self.recap,
                "failure": self.failure, "halt": self.halt}
