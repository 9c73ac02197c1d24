"""Each instance in a sandbox of its own, with the real SillyTavern release (marker: sillytavern).

The releases come from a home of each test's own (``release_home_of_its_own``): a rollout here
removes the release it left, as it should, without taking it from the other tests.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest

from conftest import (
    AS_ROOT,
    ROOT,
    UID_FROM,
    Project,
    chat_from_inside,
    fake_upstream,
    free_ports,
    git,
    in_sandbox,
    kill_all,
    release_home_of_its_own,
    start_serve,
    wait_until,
)
from reconciler.runtime import sandbox, sillytavern
from reconciler.runtime.launch import HEALTH_PATH
from reconciler.runtime.snapshots import Snapshots
from reconciler.runtime.statedir import StateDir

pytestmark = [pytest.mark.sillytavern,
              pytest.mark.skipif(not AS_ROOT, reason="the sandbox with a uid per instance is root's (CI runs as root)")]
POOL_KEY = "sk-sandbox-pool-key"


def project_in(folder: Path, home: Path) -> Project:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CST_")}
    return Project(folder, {**env, "CST_SILLYTAVERN_HOME": str(home), "POOL_KEYS": POOL_KEY})


@pytest.fixture
def closed_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as root's home is: 0700, root's."""
    home = tmp_path_factory.mktemp("root-home")
    home.chmod(0o700)
    return home


def test_a_clone_in_roots_closed_home_answers_its_first_visit(closed_home: Path) -> None:
    """As a newcomer does it: `git clone` into root's home, `make run` (examples/desired.yaml, its
    release in the clone's .cache), then the first visit, which wakes the parked instance."""
    clone = closed_home / "cst"
    git(ROOT, "clone", "--quiet", str(ROOT), str(clone))
    home = release_home_of_its_own(clone / ".cache" / "sillytavern", ("1.19.0",))
    a, b, api, proxy = free_ports(4)
    example = (clone / "examples" / "desired.yaml").read_text()
    for old, new in (("8001", a), ("8002", b), ("3000", api), ("5100", proxy)):
        example = example.replace(f":{old}\"", f":{new}\"").replace(f"port: {old}", f"port: {new}")
    (clone / "examples" / "desired.yaml").write_text(example)
    project = project_in(clone / "examples", home)
    served = start_serve(project, api)
    try:
        id_ = f"st-instance-{a}"
        password = project.cst("password", id_).stdout.strip()
        page = httpx.get(f"http://127.0.0.1:{a}/", auth=(id_, password), timeout=120)
        assert page.status_code == 200, page.text[:500]
        assert "<title>SillyTavern</title>" in page.text
        node = psutil.Process(project.record(id_)["pid"])
        assert node.uids().real == UID_FROM + a and project.record(id_)["sandboxed"]
        assert node.cmdline()[node.cmdline().index("--dataRoot") + 1] == str(sandbox.DATA)
        # wired to the pool on its first start: the release's defaults were read through root's way in
        assert wired(project, a)
        # nothing on the way to the clone had to be opened for it
        assert closed_home.stat().st_mode & 0o777 == 0o700
        for folder in (project.state_dir, project.state_dir / "run", project.dir / "user-data"):
            assert folder.stat().st_mode & 0o777 == 0o700, folder
    finally:
        served.stop()
        kill_all(project.state_dir.resolve())


@pytest.fixture
def fleet(closed_home: Path) -> Iterator[tuple[Project, int, int, int, object]]:
    """Two real instances in their sandboxes under cst serve, in a closed home, with a key pool in
    front of a fake upstream: ``a`` on 1.18.0 (to be rolled out), ``b`` parked after 2 s."""
    home = release_home_of_its_own(closed_home / "sillytavern", ("1.18.0", "1.19.0"))
    with fake_upstream() as upstream:
        project = project_in(closed_home / "fleet", home)
        project.dir.mkdir()
        api, proxy, a, b = free_ports(4)
        head = f"""\
            version: 1
            settings:
              resync: 1s
              sillytavern: {{version: "1.19.0", start_timeout: 300, rollout: {{pause: 2s}}}}
              api: {{listen: "127.0.0.1:{api}"}}
              proxy: {{listen: "127.0.0.1:{proxy}", upstream: "{upstream.url}/v1"}}
            accounts:
              - {{name: main, provider: static, keys_env: POOL_KEYS}}
            instances:
              - {{port: {b}, park_after: 2s}}
            """
        project.write(head + f'  - {{port: {a}, sillytavern_version: "1.18.0"}}\n')
        served = start_serve(project, api)
        try:
            yield project, a, b, proxy, served
        finally:
            served.stop()
            kill_all(project.state_dir.resolve())


def wired(project: Project, port: int) -> bool:
    """Whether CST pointed the instance's chat API at the pool on its first start."""
    settings = json.loads((project.dir / "user-data" / str(port) / "default-user" / "settings.json").read_text())
    log = (project.state_dir / "logs" / f"st-instance-{port}.log").read_text()
    return (settings["oai_settings"]["chat_completion_source"] == "custom"
            and "--- cst: chat completion wired to the key pool at" in log)


def health(port: int, id_: str, password: str) -> dict:
    """The instance's health route, once it answers (a start takes seconds)."""
    def answer() -> httpx.Response | None:
        try:
            got = httpx.get(f"http://127.0.0.1:{port}{HEALTH_PATH}", auth=(id_, password), timeout=10)
        except httpx.HTTPError:
            return None
        return got if got.status_code == 200 else None
    return wait_until(answer, timeout=300).json()




def test_real_instances_in_their_sandboxes(fleet) -> None:
    project, a, b, proxy, served = fleet
    ids = {a: f"st-instance-{a}", b: f"st-instance-{b}"}
    passwords = {p: project.cst("password", ids[p]).stdout.strip() for p in (a, b)}
    assert health(a, ids[a], passwords[a])["version"] == "1.18.0"
    assert wired(project, a)
    node = psutil.Process(project.record(ids[a])["pid"])
    uid = UID_FROM + a

    def inside(*argv: str) -> subprocess.CompletedProcess:
        return in_sandbox(node.pid, uid, *argv)

    # what it sees: its release (read-only), its data (read-write), its /tmp; nothing else
    package = sandbox.RELEASE / "node_modules" / "sillytavern"
    assert '"version": "1.18.0"' in inside("cat", str(package / "package.json")).stdout
    assert "Read-only file system" in inside("touch", str(package / "mine")).stderr
    assert inside("touch", f"{sandbox.DATA}/mine", "/tmp/mine").returncode == 0
    for hidden in ("/root", str(project.state_dir), str(project.dir / "user-data" / str(b)),
                   str(project.state_dir / "secrets" / "admin.key"), str(sillytavern.install_home(project.state_dir))):
        seen = inside("ls", "-d", hidden)
        assert "No such file or directory" in seen.stderr, (hidden, seen.stdout)
    commands = inside("sh", "-c", "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done").stdout
    assert f"--port {a}" in commands and str(b) not in commands and "reconciler" not in commands, commands
    assert "SILLYTAVERN_BASICAUTHUSER_PASSWORD" not in inside("cat", f"/proc/{served.proc.pid}/environ").stdout

    # it chats through the pool with its own key
    def chat() -> str:
        return chat_from_inside(node.pid, uid, proxy)
    assert chat().startswith("200 ")

    # its key rotated: the copy it reads follows, the chat goes on with the new key
    old_key = inside("cat", str(sandbox.HOME / "proxy.key")).stdout.strip()
    assert served.api("POST", f"/api/instances/{ids[a]}/rotate-key").status_code == 200
    assert inside("cat", str(sandbox.HOME / "proxy.key")).stdout.strip() not in ("", old_key)
    wait_until(lambda: chat().startswith("200 "), timeout=15)

    # rolled out from 1.18.0 to 1.19.0, a snapshot of its data first, still in its sandbox
    project.write(project.file.read_text().replace(', sillytavern_version: "1.18.0"', ""))
    wait_until(lambda: project.record(ids[a]).get("release") == "sillytavern@1.19.0"
               and project.status()[ids[a]]["status"] == "running", timeout=300)
    assert health(a, ids[a], passwords[a])["version"] == "1.19.0"
    snapshots = Snapshots(StateDir(project.state_dir)).list(ids[a])
    assert [s.reason for s in snapshots] == ["rollout"] and (snapshots[0].tree / "mine").exists()
    node = psutil.Process(project.record(ids[a])["pid"])
    assert project.record(ids[a])["sandboxed"] and node.uids().real == uid
    assert '"version": "1.19.0"' in inside("cat", str(package / "package.json")).stdout

    # restored from that snapshot: the data dir as it was, the instance back in its sandbox
    (project.dir / "user-data" / str(a) / "mine").unlink()
    restored = project.cst("restore", ids[a], snapshots[0].id)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    wait_until(lambda: project.status()[ids[a]]["status"] == "running", timeout=300)
    node = psutil.Process(project.record(ids[a])["pid"])
    assert inside("ls", f"{sandbox.DATA}/mine").returncode == 0
    assert health(a, ids[a], passwords[a])["status"] == "ok"

    # b parks, and its first request wakes it, in its sandbox
    wait_until(lambda: project.status()[ids[b]]["status"] == "parked", timeout=120)
    woken = httpx.get(f"http://127.0.0.1:{b}/", auth=(ids[b], passwords[b]), timeout=120)
    assert woken.status_code == 200 and "<title>SillyTavern</title>" in woken.text
    record_b = project.record(ids[b])
    assert record_b["sandboxed"] and psutil.Process(record_b["pid"]).uids().real == UID_FROM + b
    # a sandbox each: their own pid and mount namespaces
    for ns in ("pid", "mnt"):
        assert os.readlink(f"/proc/{record_b['pid']}/ns/{ns}") != os.readlink(f"/proc/{node.pid}/ns/{ns}")
