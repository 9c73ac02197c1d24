"""The server's logic (create, delete, park and wake through ``Fleet`` and ``Parking``, passes,
rollouts) against a fake runtime: no SillyTavern, no node, no ports but the ones it checks.

The runtime comes from the factory the daemon is given (``Control.runtime``), so these are the
fleet's and the parking's own code paths; what they decide on is a failure's type and fields,
never its wording: a cause reworded (with the ";" and newlines the old code split on) leads to
the same backoff, the same rollback and the same API code, and reaches people whole.
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import AsyncIterator

import pytest

from conftest import eventually, free_ports, stop_edge
from fake_runtime import FakeWorld
from reconciler.desired.shared_file import DesiredFile, FileReading
from reconciler.engine.reconcile import reconcile
from reconciler.engine.results import Happened, Report
from reconciler.engine.supervision import BACKOFF_BASE, Supervisor
from reconciler.runtime.statedir import StateDir
from reconciler.server.api import STATUS
from reconciler.server.errors import ErrorKind, FleetError
from reconciler.server.events import EventHub
from reconciler.server.fleet import Fleet
from reconciler.server.fleet_metrics import ParkingCounters
from reconciler.server.parking import Parking

CAUSES = ["exited with code 3 before answering",
          "node ended; status 3 (SIGILL)\nno answer on its socket"]   # what the old code cut at ";" and "\n"
LOG_TAIL = "Error: boom\n    at server.js:1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Host:
    """What ``Fleet`` needs of the daemon (``Control``), with passes run on the fake runtime."""

    def __init__(self, file: DesiredFile, world: FakeWorld, clock: Clock):
        self.file = file
        self.snapshot = file.read()
        assert self.snapshot.desired is not None, self.snapshot.problems
        self.desired = self.snapshot.desired
        self.world = world
        self.runtime = world.factory
        self.state = world.state
        self.supervisor = Supervisor(self.desired, clock=clock)
        self.disk = SimpleNamespace(of=lambda id_: None, refresh_soon=lambda: None)
        self.changed_at = 0.0
        self.parking: Parking | None = None
        self.reports: list[Report] = []

    def accept(self, snapshot: FileReading) -> None:
        self.snapshot = snapshot
        if snapshot.desired is not None:
            self.desired = self.supervisor.desired = snapshot.desired

    async def converge(self) -> Report:
        report = await reconcile(self.runtime(self.desired), self.desired, hints=self.supervisor.hints)
        self.supervisor.learn(report.observed, report.results)
        self.changed_at = time.monotonic()
        self.reports.append(report)
        return report

    async def proxy_keys_changed(self) -> None:
        pass


def write_file(path: Path, instances: str, api: int, proxy: int) -> None:
    path.write_text("version: 1\nsettings:\n  state_dir: .cst\n  data_root: user-data\n"
                    f"  api: {{listen: '127.0.0.1:{api}'}}\n  proxy: {{listen: '127.0.0.1:{proxy}'}}\n"
                    f"instances:\n{instances}")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def project(tmp_path: Path) -> tuple[DesiredFile, FakeWorld]:
    api, proxy = free_ports(2)
    write_file(tmp_path / "desired.yaml", "  - {port: 8101, state: running}\n", api, proxy)
    return DesiredFile(tmp_path / "desired.yaml"), FakeWorld(StateDir(tmp_path / ".cst"))


@pytest.fixture
async def host(project: tuple[DesiredFile, FakeWorld], clock: Clock) -> Host:
    file, world = project
    host = Host(file, world, clock)
    await host.converge()
    return host


async def test_create_then_delete_edit_the_file_and_converge_on_the_runtime(host: Host) -> None:
    fleet = Fleet(host)  # type: ignore[arg-type]
    (port,) = free_ports(1)
    created = await fleet.create({"port": port}, "test")
    assert (created.row.id, created.row.status, created.password) == (f"st-instance-{port}", "running", f"pw-{port}")
    assert f"port: {port}" in host.file.path.read_text()
    world = host.world
    assert ("start", created.row.id) in world.calls

    with pytest.raises(FleetError) as again:   # the same port twice: a 400 a client tells apart by its code
        await fleet.create({"port": port}, "test")
    assert (again.value.kind, again.value.code) == (ErrorKind.BAD_REQUEST, "port_declared")

    deleted = await fleet.delete(created.row.id, "test")
    assert deleted.archive == str(world.archived[created.row.id])
    assert f"port: {port}" not in host.file.path.read_text()
    assert host.state.record(created.row.id) is None
    with pytest.raises(FleetError) as gone:
        await fleet.delete(created.row.id, "test")
    assert (gone.value.kind, STATUS[gone.value.kind], gone.value.code) == (ErrorKind.NOT_FOUND, 404, "not_found")


@pytest.mark.parametrize("cause", CAUSES)
async def test_a_create_that_does_not_start_fails_with_its_code_and_backs_off(host: Host, clock: Clock,
                                                                             cause: str) -> None:
    world = host.world
    world.fail_start[""] = (cause, LOG_TAIL)
    (port,) = free_ports(1)
    with pytest.raises(FleetError) as failed:
        await Fleet(host).create({"port": port}, "test")  # type: ignore[arg-type]
    assert (failed.value.kind, failed.value.code) == (ErrorKind.FAILED, "create_failed")
    assert cause in str(failed.value.params["reason"]) and LOG_TAIL in str(failed.value.params["reason"])
    id_ = f"st-instance-{port}"
    assert host.supervisor.crashes[id_].reason == cause          # whole, not cut at its ";" or line end
    assert host.supervisor.retry_in(id_) == BACKOFF_BASE
    (result,) = [r for r in host.reports[-1].results if r.id == id_]
    assert (result.happened, result.cause) == (Happened.START_FAILED, cause)


@pytest.fixture
async def parking(project: tuple[DesiredFile, FakeWorld], clock: Clock) -> AsyncIterator[tuple[Host, Parking]]:
    file, world = project
    api, proxy = free_ports(2)
    write_file(file.path, "  - {port: 8101, state: running, park_after: 1h}\n", api, proxy)
    host = Host(file, world, clock)
    parking = Parking(lambda: host.desired, host.runtime, host.state, host.supervisor, EventHub(dict),
                      ParkingCounters(), lambda id_: 0, lambda record: None)
    await parking.start()
    try:
        await parking.follow(host.desired)
        host.parking = parking
        await host.converge()   # parked at once: no process until its first request
        yield host, parking
    finally:
        await parking.close()
        stop_edge(host.state.root)   # the gate's and the use socket's folder under /run/cst


async def test_park_and_wake_through_the_fleet_on_the_runtime(parking: tuple[Host, Parking]) -> None:
    host, gate = parking
    fleet = Fleet(host)  # type: ignore[arg-type]
    assert (await fleet.row("st-instance-8101")).status == "parked"
    woken = await fleet.wake("st-instance-8101")
    assert (woken.row.status, woken.message_key) == ("running", "woken")
    assert gate.processes.running("st-instance-8101")
    parked = await fleet.park("st-instance-8101")
    assert (parked.row.status, parked.message_key) == ("parked", "parked")
    world = host.world
    assert [op for op, id_ in world.calls if id_ == "st-instance-8101"][-2:] == ["start", "park"]


@pytest.mark.parametrize("cause", CAUSES)
async def test_a_failed_wake_is_the_same_decision_whatever_its_wording(parking: tuple[Host, Parking], clock: Clock,
                                                                      cause: str) -> None:
    host, _ = parking
    world = host.world
    world.fail_start[""] = (cause, LOG_TAIL)
    fleet = Fleet(host)  # type: ignore[arg-type]
    with pytest.raises(FleetError) as failed:
        await fleet.wake("st-instance-8101")
    assert (failed.value.kind, STATUS[failed.value.kind], failed.value.code) == (ErrorKind.UNAVAILABLE, 503,
                                                                                 "wake_failed")
    assert failed.value.params["reason"] == cause                 # its cause, not its log lines
    assert host.supervisor.crashes["st-instance-8101"].reason == cause
    assert host.supervisor.retry_in("st-instance-8101") == BACKOFF_BASE
    starts = world.calls.count(("start", "st-instance-8101"))
    with pytest.raises(FleetError) as held:   # backing off: the gate does not start it sooner than a pass would
        await fleet.wake("st-instance-8101")
    assert held.value.code == "wake_failed" and world.calls.count(("start", "st-instance-8101")) == starts
    assert held.value.retry_after == round(BACKOFF_BASE)   # the answer's Retry-After: when the backoff ends
    clock.now += BACKOFF_BASE
    world.fail_start.clear()
    assert (await fleet.wake("st-instance-8101")).row.status == "running"


@pytest.mark.parametrize("cause", CAUSES)
async def test_a_release_that_fails_is_rolled_back_whatever_its_wording(host: Host, cause: str) -> None:
    world = host.world
    record = host.state.record("st-instance-8101")
    assert record is not None and record.release == "sillytavern@1.19.0"
    record.release = "sillytavern@1.18.0"   # running the release before: the file's moves it on
    host.state.save(record)
    world.fail_start["sillytavern@1.19.0"] = (cause, LOG_TAIL)
    report = await host.converge()
    (result,) = [r for r in report.results if r.id == "st-instance-8101"]
    assert (result.outcome, result.happened, result.cause) == ("failed", Happened.ROLLED_BACK, cause)
    assert report.halt is not None and report.halt["reason"] == cause
    assert [op for op, id_ in world.calls if id_ == "st-instance-8101"][-6:] == [
        "snapshot", "stop", "start", "stop", "put_back", "start"]
    back = host.state.record("st-instance-8101")
    assert back is not None and (back.release, back.pid is not None) == ("sillytavern@1.18.0", True)
    await eventually(lambda: host.runtime(host.desired).rollout_halt() is not None)
