"""What a runtime is to the engine: the values it reports and the operations it offers.

The engine observes, plans and acts only through ``Runtime``, and the server gets every
runtime it uses from the ``RuntimeFactory`` it is given. ``LocalRuntime`` (processes on this
machine) is the one CST ships; ``tests/fake_runtime.py`` is another, for the server's logic.
Another (containers, a remote host) would sit beside them and implement the same operations.
Failures are typed and carry fields (``StartFailed.cause``): code decides on those, never on
a message's words.
"""
from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..desired.model import DesiredState, InstanceSpec

if TYPE_CHECKING:   # these import this module
    from .health import HealthChecks
    from .snapshots import Snapshot
    from .statedir import Record

# parked: no process, on purpose; the edge keeps its routes and cst serve wakes it on use
ObservedStatus = Literal["running", "parked", "stopped", "crashed", "port-taken"]


@dataclass(frozen=True)
class ReleaseId:
    """What an instance runs: an npm release of SillyTavern (``version``), or a checkout of one's
    own (``server``, the path of its server.js as the file names it). Records, halts and an
    instance's environment keep it as text, ``str()`` of it ("sillytavern@1.19.0", "server
    /path/server.js"); ``parse`` reads that back, so the format is known here and nowhere else."""

    version: str | None = None
    server: str | None = None

    _NPM = "sillytavern@"
    _SERVER = "server "

    def __str__(self) -> str:
        return f"{self._NPM}{self.version}" if self.version is not None else f"{self._SERVER}{self.server}"

    @classmethod
    def parse(cls, text: str) -> ReleaseId:
        """The release ``text`` names; ValueError when it names none."""
        if text.startswith(cls._NPM) and len(text) > len(cls._NPM):
            return cls(version=text.removeprefix(cls._NPM))
        if text.startswith(cls._SERVER) and len(text) > len(cls._SERVER):
            return cls(server=text.removeprefix(cls._SERVER))
        raise ValueError(f"not a release identity: {text!r}")


@dataclass(frozen=True)
class Observed:
    """An instance as found: by its record in the state dir, or by the process on its port."""

    id: str
    port: int
    status: ObservedStatus
    pid: int | None = None
    fingerprint: str | None = None
    adopted: bool = False           # found running without a valid record: the record needs writing
    holder: str = ""                # for port-taken: who holds the port
    create_time: float | None = None  # when the running process started (epoch seconds)
    # the release the process was started on ("sillytavern@1.19.0", as Runtime.release_identity
    # says it), from its record or, adopted, its environment; None: unknown (started by a cst
    # from before releases were recorded), or no process
    release: str | None = None


@dataclass(frozen=True)
class Preparation:
    """What getting ready to start instances took: ``subject`` (say, "sillytavern 1.19.0") was
    ``done`` ("installed from the npm registry"; "" when it was ready), or failed with ``failure``."""

    subject: str
    done: str = ""
    failure: str | None = None
    # with a failure: the releases that could not be had (as Runtime.release_identity says them),
    # so a pass may fail only the instances on those; empty when the failure is everyone's
    failed_releases: tuple[str, ...] = ()


@dataclass(frozen=True)
class EdgeChange:
    """What following the edge did, for the pass's report; ``detail`` is empty when nothing changed."""

    detail: str = ""
    waiting: tuple[int, ...] = ()    # ports not taken yet: something else still listens there


class StartFailed(Exception):
    """An instance was started but did not come up; the runtime has stopped it again.

    Code reads the fields, never the message: ``cause`` is the failure in its own words, one line
    ("exited with code 3 before answering"); ``log_tail`` the instance's last log lines when they
    tell more. ``str()`` is both, for people and logs."""

    def __init__(self, cause: str, log_tail: str = ""):
        self.cause, self.log_tail = cause, log_tail
        super().__init__(f"{cause}; last log lines:\n{log_tail}" if log_tail else cause)


def failure_cause(exc: BaseException) -> str:
    """A failure in a line, for a result's ``cause`` and a status page: a StartFailed's own
    ``cause``, else the exception's message (its type's name when it has none)."""
    if isinstance(exc, StartFailed):
        return exc.cause
    return str(exc) or type(exc).__name__


class LaunchImpossible(Exception):
    """An instance cannot be started as declared (say, its password variable is unset)."""


class RolloutRuntime(Protocol):
    """What a rollout needs of a runtime (see ``engine.rollout``)."""

    async def snapshot(self, id_: str, reason: str) -> str:
        """Take a snapshot of the instance's data dir; its id. OSError when it cannot."""

    async def put_back(self, id_: str, snapshot_id: str) -> Path | None:
        """Put a snapshot in place of the (stopped) instance's data dir; where the replaced data went."""

    async def stop(self, id_: str) -> None:
        """Stop the instance (gracefully, then by force); raises OSError when it will not go."""

    async def start(self, spec: InstanceSpec, count_restart: bool = False, release: str | None = None) -> object:
        """Start the instance (on ``release``, a release identity, instead of the file's) and return
        once it answers; raises StartFailed."""

    async def stays_healthy(self, spec: InstanceSpec, seconds: float) -> str | None:
        """None when the running instance keeps answering its health route and its front page for
        ``seconds``; else why not."""


class Runtime(RolloutRuntime, Protocol):
    def launch_fingerprint(self, spec: InstanceSpec) -> str:
        """A digest of everything a restart would change; raises LaunchImpossible."""

    def release_identity(self, spec: InstanceSpec) -> str:
        """What release the file says ``spec`` runs ("sillytavern@1.19.0"): ``Observed.release``'s terms."""

    def observe(self, records: dict[str, Record] | None = None) -> dict[str, Observed]:
        """Every instance this runtime knows of, plus whoever holds a declared port; ``records``:
        the records just read by ``records()``, so both tell of the same moment."""

    def records(self) -> dict[str, Record]:
        """What this runtime remembers of each instance (its process, start time, restarts)."""

    def lock(self, timeout: float) -> AbstractAsyncContextManager[None]:
        """Exclusive use of this runtime's instances, across processes."""

    async def prepare(self) -> Preparation:
        """Make sure instances can be started (install every release the file uses)."""

    def adopt(self, id_: str, port: int, pid: int) -> None:
        """Take over a process already running as ``id_``."""

    def forget_pid(self, id_: str) -> None:
        """The instance's process is gone: remember it as stopped."""

    async def park(self, id_: str) -> None:
        """Stop the instance's process, if it has one, and remember it as parked (park_after)."""

    def follow_edge(self) -> EdgeChange:
        """Make the edge route what the file puts behind it. Raises OSError (nginx refused it)."""

    async def remove_unused_releases(self) -> list[str]:
        """Remove installed releases nothing uses any more (a rollout completed); the versions removed."""

    def rollout_halt(self) -> dict[str, Any] | None:
        """The rollout halt recorded by an earlier pass, if one stands (see ``engine.rollout.Halt``)."""

    def record_rollout_halt(self, halt: dict[str, Any] | None) -> None:
        """Record a halt (None: no rollout is halted)."""

    async def archive(self, id_: str) -> Path | None:
        """Stop the instance and move its data into the archive; where it went, or None."""

    async def wake(self, spec: InstanceSpec) -> Record:
        """Start a parked instance (a live one is left as it is); raises StartFailed."""

    async def probe(self, spec: InstanceSpec) -> str | None:
        """The liveness probe of a running instance: None when it answers its health route, else why not."""

    def password(self, spec: InstanceSpec) -> str:
        """The instance's basic-auth password (generated once when the file names no variable for
        it); raises LaunchImpossible when the variable it names is unset."""

    def set_password(self, id_: str, password: str) -> None:
        """Give the instance a new generated password; its next start uses it."""

    def rotate_key(self, spec: InstanceSpec) -> str:
        """Give the instance a new proxy key; the new key."""

    def find_snapshot(self, id_: str, snapshot_id: str) -> Snapshot:
        """The instance's snapshot of that id; raises SnapshotNotFound."""

    async def close(self) -> None:
        """Let go of what acting took (on the loop it acted on)."""


class RuntimeFactory(Protocol):
    """Where the daemon and the commands get a runtime for a desired state: ``LocalRuntime``, or a
    fake in tests. ``readonly``: look, generate nothing; ``checks``: the health checks of the loop
    the runtime will act on, when its caller keeps them for longer than one use."""

    def __call__(self, desired: DesiredState, *, readonly: bool = False,
                 checks: HealthChecks | None = None) -> Runtime: ...
