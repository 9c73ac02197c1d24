"""What the REST API and the fleet operations need of the daemon, and nothing more.

The daemon implements ``Control``; ``api`` and ``fleet`` depend on this protocol, not
on the daemon, so imports flow one way: daemon -> api -> fleet -> control.
"""
from __future__ import annotations

from typing import Any, Protocol

from ..desired.model import DesiredState
from ..desired.shared_file import DesiredFile, FileReading
from ..engine.results import Report
from ..engine.supervision import Supervisor
from ..runtime.base import RuntimeFactory
from ..runtime.statedir import StateDir
from .disk_watch import DiskWatch
from .events import EventHub
from .fleet_metrics import ParkingCounters, PassCounters
from .git_follow import GitFollower
from .parking import Parking
from .pool_process import PoolProcess


class NotConverged(Exception):
    """No reconcile pass finished the change in time; ``pending`` says what the reconciler is doing."""

    def __init__(self, waited: float, pending: str):
        self.waited, self.pending = waited, pending
        super().__init__(f"not applied within {waited:g}s: {pending}")


class Control(Protocol):
    file: DesiredFile               # desired.yaml, shared with people and git
    reading: FileReading              # the file as last read (may be invalid)
    desired: DesiredState           # the last valid desired state: what is enforced
    enforced_sha256: str
    restart_needed: tuple[str, ...]  # settings the file changed that wait for a restart (see restart_settings)
    runtime: RuntimeFactory          # the one place the server's runtimes come from
    supervisor: Supervisor
    state: StateDir
    pid: int
    started_at: str
    last_report: Report | None
    last_pass_at: str | None
    last_pass_ms: float | None
    events: EventHub                # what changed, for GET /api/events
    proxy: PoolProcess | None       # the key-pool proxy's process (asked on its control socket), once started
    parking: Parking | None         # parks and wakes instances with park_after (the gate), once started
    git: GitFollower                # the file's commits and the branch it follows
    changed_at: float               # monotonic time of the last pass or instance exit: older listings are stale
    pass_counters: PassCounters     # reconcile passes, for GET /metrics
    parking_counters: ParkingCounters  # parks and wakes, for GET /metrics
    disk: DiskWatch                 # each data dir's disk use, walked in the background

    def accept(self, reading: FileReading) -> None:
        """Take a new reading of the file: enforce it if valid, report it if not."""

    async def converge(self) -> Report:
        """Ask for a reconcile pass and wait for one that started after this call; NotConverged
        when none finishes within ``settings.api.timeout``."""

    def pending(self) -> str:
        """What the reconciler is doing now, in words (for an answer that could not wait longer)."""

    def health(self) -> dict[str, Any]:
        """The background tasks' failures, for /api/status."""

    async def proxy_keys_changed(self) -> None:
        """An instance's proxy key was minted, rotated or revoked: make the proxy read them now."""
