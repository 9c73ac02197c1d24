"""What a runtime is to the engine: the values it reports and the operations it offers.

The engine observes, plans and acts only through ``Runtime``; ``LocalRuntime`` (processes
on this machine) is the one implementation today. Another (containers, a remote host)
would sit beside it and implement the same few operations.
"""
from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from ..desired.model import InstanceSpec

# parked: no process, on purpose; the edge keeps its routes and cst serve wakes it on use
ObservedStatus = Literal["running", "parked", "stopped", "crashed", "port-taken"]


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
    """An instance was started but did not come up; the runtime has stopped it again."""


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

    def observe(self) -> dict[str, Observed]:
        """Every instance this runtime knows of, plus whoever holds a declared port."""

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

    def rollout_halt(self) -> dict | None:
        """The rollout halt recorded by an earlier pass, if one stands (see ``engine.rollout.Halt``)."""

    def record_rollout_halt(self, halt: dict | None) -> None:
        """Record a halt (None: no rollout is halted)."""

    async def archive(self, id_: str) -> Path | None:
        """Stop the instance and move its data into the archive; where it went, or None."""
