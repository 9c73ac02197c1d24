"""Rollouts of a new release (issue 15): one instance at a time, a snapshot first, the first
failure rolled back and the rest left alone; on the stand-in (its server.js copied elsewhere is
"another release") and, marked `sillytavern`, on the real 1.18.0 and 1.19.0 from the npm registry."""
from __future__ import annotations

import shutil
import threading
from datetime import datetime
from pathlib import Path

import pytest

from conftest import STANDIN, Project, free_ports, http_status, release_home_of_its_own, serve_settings, wait_until
from reconciler.desired.model import RolloutSettings
from reconciler.engine.plan import Action, ActionKind, Target, plan
from reconciler.engine.rollout import Halt, batches, stands
from reconciler.runtime import sillytavern
from reconciler.runtime.base import Observed
from reconciler.runtime.snapshots import Snapshots
from reconciler.runtime.statedir import StateDir

CHAT = '{"user_name": "you"}\n{"name": "you", "mes": "remember this"}\n'


def test_the_canary_goes_alone_then_batches() -> None:
    ids = [f"st-instance-{p}" for p in range(8001, 8008)]
    assert batches(ids, RolloutSettings(canary=1, batch=1, pause=0)) == [[i] for i in ids]
    assert batches(ids, RolloutSettings(canary=2, batch=3, pause=0)) == [ids[:2], ids[2:5], ids[5:]]
    assert batches(ids, RolloutSettings(canary=0, batch=4, pause=0)) == [ids[:4], ids[4:]]


def test_a_halt_stands_until_the_file_asks_for_something_else() -> None:
    halt = Halt({"st-instance-8001": "sillytavern@1.19.0", "st-instance-8002": "sillytavern@1.19.0"},
                "st-instance-8001", "exited with code 1")
    assert stands(halt, {"st-instance-8001": "sillytavern@1.19.0", "st-instance-8002": "sillytavern@1.19.0",
                         "st-instance-8003": "sillytavern@1.18.0"})
    assert not stands(halt, {"st-instance-8001": "sillytavern@1.19.1", "st-instance-8002": "sillytavern@1.19.0"})
    assert not stands(None, {})
    assert Halt.from_dict(halt.as_dict()) == halt and Halt.from_dict({"wanted": 3}) is None


def test_the_planner_upgrades_a_running_instance_on_another_release_and_holds_while_halted() -> None:
    a, b = "st-instance-8001", "st-instance-8002"
    targets = [Target(a, 8001, "running", "fp2", release="sillytavern@1.19.0"),
               Target(b, 8002, "running", "fp2", release="sillytavern@1.19.0")]
    observed = {a: Observed(a, 8001, "running", 10, "fp1", release="sillytavern@1.18.0"),
                b: Observed(b, 8002, "stopped", release="sillytavern@1.18.0")}
    actions = plan(targets, observed)
    assert [(x.kind, x.release) for x in actions] == [(ActionKind.UPGRADE, "sillytavern@1.19.0"),
                                                     (ActionKind.START, "sillytavern@1.19.0")]
    held = plan(targets, observed, halted="rollout halted at st-instance-8003: boom, rolled back")
    assert held[0] == Action(ActionKind.OK, a, 8001, "on sillytavern@1.18.0: rollout halted at st-instance-8003: boom, "
                                               "rolled back")
    same = {a: Observed(a, 8001, "running", 10, "fp1", release="sillytavern@1.19.0")}
    assert plan(targets[:1], same)[0].kind == ActionKind.RESTART, "the same release: a plain restart"


def _fleet(project: Project, ports: list[int], server: Path, api_port: int, pause: str = "1s") -> None:
    lines = ["version: 1", "settings:",
             f"  sillytavern: {{server: {server}, start_timeout: 15, stop_timeout: 3, "
             f"rollout: {{canary: 1, batch: 1, pause: {pause}}}}}"]
    lines += [f"  {line}" for line in serve_settings(api_port).splitlines()]
    lines.append("instances:")
    lines += [f"  - port: {port}" for port in ports]
    project.write("\n".join(lines) + "\n")


def _chat(project: Project, port: int) -> Path:
    chat = project.dir / "user-data" / str(port) / "default-user" / "chats" / "Seraphina" / "kept.jsonl"
    chat.parent.mkdir(parents=True, exist_ok=True)
    chat.write_text(CHAT)
    return chat


class DownWatch:
    """How many of ``ports`` were down (not answering 401 within a quarter second) at once, at most,
    while it ran. CST keeps an instance's port open across its restart (node is handed the socket
    CST opened), so requests then wait for the new node rather than fail: that wait is "down" here."""

    def __init__(self, ports: list[int]):
        self.ports, self.most = ports, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, sum(1 for port in self.ports if http_status(port, timeout=0.25) != 401))
            self._stop.wait(0.02)   # the sampling period, ended at once by __exit__

    def __enter__(self) -> DownWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_rollout_goes_one_at_a_time_with_a_snapshot_each(project: Project, serve) -> None:
    api_port, *ports = free_ports(4)
    ids = [f"st-instance-{p}" for p in ports]
    newer = project.dir / "newer" / "server.js"   # the same server elsewhere: another release
    newer.parent.mkdir()
    shutil.copy(STANDIN, newer)
    _fleet(project, ports, STANDIN, api_port)
    chats = [_chat(project, port) for port in ports]
    served = serve(api_port)
    wait_until(lambda: all(http_status(p) == 401 for p in ports), timeout=30)
    assert {project.record(i)["release"] for i in ids} == {f"server {STANDIN}"}

    with DownWatch(ports) as down:
        _fleet(project, ports, newer, api_port)
        wait_until(lambda: all(project.record(i)["release"] == f"server {newer}" for i in ids)
                   and all(http_status(p) == 401 for p in ports), timeout=60)
    assert down.most <= 1, "never two instances stopped at once"
    # one at a time, a pause between: each new process started at least the pause after the one before
    started = [datetime.fromisoformat(project.record(i)["started_at"].replace("Z", "+00:00")) for i in ids]
    assert all((later - earlier).total_seconds() >= 1.0 for earlier, later in zip(started, started[1:])), started
    for id_, chat in zip(ids, chats, strict=True):
        (taken,) = Snapshots(StateDir(project.state_dir)).list(id_)
        assert taken.reason == "rollout"
        assert (taken.tree / chat.relative_to(project.dir / "user-data" / id_.split("-")[-1])).read_text() == CHAT
        assert chat.read_text() == CHAT
    status = served.api("GET", "/api/status").json()
    assert status["reconcile"]["rollout"] is None


def test_a_failing_release_halts_the_rollout_and_rolls_the_canary_back(project: Project, serve) -> None:
    api_port, *ports = free_ports(4)
    ids = [f"st-instance-{p}" for p in ports]
    broken = project.dir / "broken" / "server.js"   # a release whose server exits at once
    broken.parent.mkdir()
    broken.write_text("console.error('this release cannot start'); process.exit(1);\n")
    _fleet(project, ports, STANDIN, api_port)
    chats = [_chat(project, port) for port in ports]
    served = serve(api_port)
    wait_until(lambda: all(http_status(p) == 401 for p in ports), timeout=30)
    pids = {i: project.record(i)["pid"] for i in ids}

    _fleet(project, ports, broken, api_port)
    halt = wait_until(lambda: served.api("GET", "/api/status").json()["reconcile"]["rollout"], timeout=60)
    assert halt["at"] == ids[0] and "exited with code 1" in halt["reason"], halt
    canary = project.record(ids[0])
    assert canary["release"] == f"server {STANDIN}", "back on the release it ran before"
    assert canary["pid"] not in (None, pids[ids[0]]) and http_status(ports[0]) == 401
    assert chats[0].read_text() == CHAT, "its data as it was"
    (taken,) = Snapshots(StateDir(project.state_dir)).list(ids[0])
    assert taken.reason == "rollout"
    for id_ in ids[1:]:
        assert project.record(id_)["pid"] == pids[id_], "instances not reached are never touched"
        assert Snapshots(StateDir(project.state_dir)).list(id_) == []
    # later passes leave everyone alone and say why; cst status says it too
    before = served.api("GET", "/api/status").json()["reconcile"]["lastRun"]
    wait_until(lambda: served.api("GET", "/api/status").json()["reconcile"]["lastRun"] != before, timeout=15)
    assert {i: project.record(i)["pid"] for i in ids[1:]} == {i: pids[i] for i in ids[1:]}
    said = project.cst("status")
    assert f"rollout halted at {ids[0]}: " in said.stdout and ", rolled back" in said.stdout, said.stdout

    _fleet(project, ports, STANDIN, api_port)   # the file changes again: the halt no longer stands
    wait_until(lambda: served.api("GET", "/api/status").json()["reconcile"]["rollout"] is None, timeout=30)
    assert "rollout halted" not in project.cst("status").stdout


@pytest.mark.sillytavern
def test_real_1_18_to_1_19_one_at_a_time_with_every_chat_intact(project: Project) -> None:
    ports = free_ports(3)
    ids = [f"st-instance-{p}" for p in ports]

    def fleet(version: str) -> None:
        project.write('version: 1\nsettings:\n'
                      f'  sillytavern: {{version: "{version}", start_timeout: 180, rollout: {{pause: 1s}}}}\n'
                      'instances:\n' + "".join(f"  - port: {p}\n" for p in ports))

    # a home of its own: the rollout removes 1.18.0 from it at the end, which the other tests still run
    project.env["CST_SILLYTAVERN_HOME"] = str(release_home_of_its_own(project.dir / "home", ("1.18.0", "1.19.0")))
    fleet("1.18.0")
    install = project.cst("st", "install", timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    first = project.cst("apply", timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    chats = [_chat(project, port) for port in ports]
    assert {project.record(i)["release"] for i in ids} == {"sillytavern@1.18.0"}

    fleet("1.19.0")
    with DownWatch(ports) as down:
        moved = project.cst("apply", timeout=900)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert down.most <= 1, "never two instances stopped at once"
    # one at a time, a pause between: each new process started at least the pause after the one before
    started = [datetime.fromisoformat(project.record(i)["started_at"].replace("Z", "+00:00")) for i in ids]
    assert all((later - earlier).total_seconds() >= 1.0 for earlier, later in zip(started, started[1:])), started
    for id_, chat in zip(ids, chats, strict=True):
        assert f"changed: {id_} (upgraded: sillytavern@1.18.0 -> sillytavern@1.19.0" in moved.stdout
        assert project.record(id_)["release"] == "sillytavern@1.19.0"
        assert chat.read_text() == CHAT
        (taken,) = Snapshots(StateDir(project.state_dir)).list(id_)
        assert taken.reason == "rollout"
    wait_until(lambda: all(http_status(p) == 401 for p in ports), timeout=30)
    # the release no instance uses any more is removed once the rollout completed
    assert "changed: sillytavern 1.18.0 (removed: no instance runs it any more)" in moved.stdout, moved.stdout
    assert not (Path(project.env["CST_SILLYTAVERN_HOME"]) / "1.18.0").exists()
    assert (sillytavern.install_home(project.state_dir) / "1.18.0").is_dir(), "the shared home keeps it"
