"""Several SillyTavern releases side by side, and a version per instance (issue 15).

The fast tests use the model, the runtime's resolution and fake installs (the stand-in server as
each release's server.js); the ones marked ``sillytavern`` run the real 1.18.0 and 1.19.0 from the
npm registry (1.18.0 is installed on first need, once per install home: ~70 s)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import SANDBOXED, STANDIN, free_ports, front_end_for_the_sandbox, wait_until
from reconciler.desired.model import parse
from reconciler.desired.problems import InvalidDesiredState
from reconciler.desired.restricted import restricted_changes
from reconciler.runtime import overlay, sandbox, sillytavern
from reconciler.runtime.launch import ENV_RELEASE
from reconciler.runtime.local import LocalRuntime
from reconciler.runtime.statedir import Record, StateDir


def model(text: str, where: Path):
    return parse(text, where / "desired.yaml")


PINNED = """\
version: 1
settings:
  sillytavern: {version: "1.19.0"}
instances:
  - port: 8001
    sillytavern_version: "1.18.0"
  - port: 8002
  - port: 8003
    sillytavern_version: "1.19.0"
"""


# -- the model and validation

def test_an_instance_runs_its_own_version_else_the_fleets(tmp_path: Path) -> None:
    desired = model(PINNED, tmp_path)
    a, b, c = desired.instances
    assert (a.sillytavern_version, b.sillytavern_version) == ("1.18.0", None)
    assert [desired.version_of(spec) for spec in desired.instances] == ["1.18.0", "1.19.0", "1.19.0"]
    assert desired.versions() == {"1.19.0": ["settings.sillytavern.version", "instances[2].sillytavern_version"],
                                  "1.18.0": ["instances[0].sillytavern_version"]}


@pytest.mark.parametrize("value,line", [('"1.18"', 6), ("latest", 6), ('"1.18.0; rm -rf /"', 6), ("1.18", 6)])
def test_a_bad_version_is_located(tmp_path: Path, value: str, line: int) -> None:
    text = PINNED.replace('sillytavern_version: "1.18.0"', f"sillytavern_version: {value}")
    with pytest.raises(InvalidDesiredState) as caught:
        model(text, tmp_path)
    [problem] = caught.value.problems
    assert (problem.line, problem.path) == (line, "instances[0].sillytavern_version")
    assert "is not valid here (expected to match ^[0-9]+" in problem.message or "expected a string" in problem.message


def test_a_version_per_instance_cannot_go_with_a_checkout_of_ones_own(tmp_path: Path) -> None:
    text = PINNED.replace('{version: "1.19.0"}', "{server: ../SillyTavern/server.js}")
    with pytest.raises(InvalidDesiredState) as caught:
        model(text, tmp_path)
    lines = [str(p) for p in caught.value.problems]
    assert lines == [f"{tmp_path / 'desired.yaml'}:{n}: instances[{i}].sillytavern_version: cannot be used with "
                     "settings.sillytavern.server (your own checkout runs every instance); remove one of them"
                     for n, i in ((6, 0), (9, 2))]


def test_the_api_cannot_change_what_an_instance_runs(tmp_path: Path) -> None:
    old = model(PINNED, tmp_path)
    changed = model(PINNED.replace('"1.18.0"', '"1.19.0"'), tmp_path)
    assert restricted_changes(old, changed) == ["instances[0].sillytavern_version"]
    added = model(PINNED + "  - port: 8004\n", tmp_path)
    assert restricted_changes(old, added) == [], "a new instance on the fleet's version is fine"
    pinned_new = model(PINNED + '  - port: 8004\n    sillytavern_version: "1.19.0"\n', tmp_path)
    assert restricted_changes(old, pinned_new) == ["instances[3].sillytavern_version"]


# -- resolution in the runtime

def test_release_for_each_instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CST_SILLYTAVERN_HOME", str(tmp_path / "home"))
    desired = model(PINNED, tmp_path)
    runtime = LocalRuntime(desired, readonly=True)
    a, b, c = desired.instances
    package = tmp_path / "home" / "{}" / "node_modules" / "sillytavern"
    assert runtime.release_for(a).server_js == Path(str(package).format("1.18.0")) / "server.js"
    assert runtime.release_for(b).server_js == Path(str(package).format("1.19.0")) / "server.js"
    assert runtime.release_for(a).has_overlay
    assert [runtime.release_identity(s) for s in (a, b, c)] == ["sillytavern@1.18.0", "sillytavern@1.19.0",
                                                                  "sillytavern@1.19.0"]
    launch = runtime.launch_spec(a)
    if launch.sandbox is None:
        assert str(runtime.release_for(a).server_js) in launch.argv
    else:   # the release bound at the sandbox's fixed path, node given that path
        assert launch.sandbox.release_root == tmp_path / "home" / "1.18.0"
        assert str(sandbox.RELEASE / "node_modules" / "sillytavern" / "server.js") in launch.argv
    assert dict(launch.env)[ENV_RELEASE] == "sillytavern@1.18.0" == launch.release

    own = model(PINNED.replace('{version: "1.19.0"}', "{server: ../st/server.js}").replace(
        '    sillytavern_version: "1.18.0"\n', "").replace('    sillytavern_version: "1.19.0"\n', ""), tmp_path)
    runtime = LocalRuntime(own, readonly=True)
    spec = own.instances[0]
    assert runtime.release_for(spec) == sillytavern.Release((tmp_path.parent / "st" / "server.js").resolve(), None)
    assert runtime.release_identity(spec) == f"server {(tmp_path.parent / 'st' / 'server.js').resolve()}"


def test_the_fingerprint_follows_the_instances_own_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CST_SILLYTAVERN_HOME", str(tmp_path / "home"))

    def fingerprints(text: str) -> list[str]:
        desired = model(text, tmp_path)
        runtime = LocalRuntime(desired)   # not readonly: the generated passwords are kept, the same each time
        return [runtime.launch_fingerprint(spec) for spec in desired.instances]

    before = fingerprints(PINNED)
    moved = fingerprints(PINNED.replace('"1.18.0"', '"1.19.0"'))
    assert moved[0] != before[0] and moved[1:] == before[1:], "only the re-pinned instance restarts"
    # pinned to the fleet's version is the same as not pinned: no restart for writing it down
    unpinned = fingerprints(PINNED.replace('    sillytavern_version: "1.19.0"\n', ""))
    assert unpinned == before
    fleet = fingerprints(PINNED.replace('{version: "1.19.0"}', '{version: "1.20.0"}'))
    assert (fleet[0], fleet[2]) == (before[0], before[2]) and fleet[1] != before[1]


def test_records_keep_the_release_and_old_records_still_load(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    old = {"id": "st-instance-8001", "port": 8001, "data_dir": "/d", "pid": None, "create_time": None,
           "argv": [], "fingerprint": "f", "started_at": None, "restarts": 2}
    state.record_path("st-instance-8001").write_text(json.dumps(old))
    loaded = state.record("st-instance-8001")
    assert loaded is not None and loaded.release is None and loaded.restarts == 2
    state.save(Record("st-instance-8002", 8002, "/d", release="sillytavern@1.18.0"))
    again = state.record("st-instance-8002")
    assert again is not None and again.release == "sillytavern@1.18.0"
    state.record_path("st-instance-8003").write_text(json.dumps({**old, "id": "st-instance-8003", "port": 8003,
                                                                   "release": 7}))
    assert state.record("st-instance-8003") is None, "a garbled release makes the record unknown, as any field"


def test_observed_carries_the_recorded_release(tmp_path: Path) -> None:
    desired = model(PINNED.replace("settings:\n", f"settings:\n  state_dir: {tmp_path / 'state'}\n"), tmp_path)
    runtime = LocalRuntime(desired)
    me = psutil.Process()
    runtime.state.save(Record("st-instance-8001", 8001, "/d", pid=me.pid, create_time=me.create_time(),
                              release="sillytavern@1.18.0"))
    runtime.state.save(Record("st-instance-8002", 8002, "/d", release="sillytavern@1.19.0"))
    seen = runtime.observe()
    assert (seen["st-instance-8001"].status, seen["st-instance-8001"].release) == ("running", "sillytavern@1.18.0")
    assert seen["st-instance-8002"].release is None, "no process, no release it runs"
    # a record from before CST kept the release: read off the server.js it ran, when an npm release's
    server = "/h/1.18.0/node_modules/sillytavern/server.js"
    for argv, release in (([server], None), (["node", server, "--port", "8001"], "sillytavern@1.18.0"),
                          (["node", "/src/SillyTavern/server.js"], None),
                          (["node", "/h/latest/node_modules/sillytavern/server.js"], None)):
        runtime.state.save(Record("st-instance-8001", 8001, "/d", pid=me.pid, create_time=me.create_time(),
                                  argv=argv))
        assert runtime.observe()["st-instance-8001"].release == release, argv


# -- fake installs: the stand-in as each release's server.js

def fake_release(home: Path, version: str) -> Path:
    """``<home>/<version>`` as the npm install leaves it, with the stand-in for server.js."""
    root = home / version
    package = root / "node_modules" / "sillytavern"
    (package / "plugins").mkdir(parents=True)
    (package / "plugins" / "package.json").write_text('{"name": "sillytavern-plugins", "type": "commonjs"}\n')
    (package / "package.json").write_text(json.dumps({"name": "sillytavern", "version": version}))
    shutil.copy(STANDIN, package / "server.js")
    front_end_for_the_sandbox(root)
    (root / ".cst-ready").write_text(version + "\n")
    return root


def test_prepare_names_the_version_and_the_field_it_cannot_have(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    monkeypatch.setenv("CST_SILLYTAVERN_HOME", str(tmp_path / "home"))
    for version in ("1.19.0", "1.18.0"):
        fake_release(tmp_path / "home", version)
    desired = model(PINNED.replace("settings:\n", f"settings:\n  state_dir: {tmp_path / 'state'}\n"), tmp_path)
    first = asyncio.run(LocalRuntime(desired).prepare())
    assert (first.subject, first.failure) == ("sillytavern 1.19.0, 1.18.0", None)
    assert first.done == "1.19.0: overlay laid (7 files written); 1.18.0: overlay laid (7 files written)"
    for version in ("1.19.0", "1.18.0"):   # SillyTavern's own start would fail to make it as an instance user
        backups = tmp_path / "home" / version / "node_modules" / "sillytavern" / "backups"
        assert backups.is_dir() and backups.stat().st_mode & 0o777 == 0o755
    again = asyncio.run(LocalRuntime(desired).prepare())
    assert (again.subject, again.done, again.failure) == ("sillytavern 1.19.0, 1.18.0", "", None)

    def unpublished(version: str, state_dir: Path, sandboxed: bool) -> str:
        if version == "1.99.0":
            raise sillytavern.Unpublished("sillytavern 1.99.0 is not published on the npm registry (ETARGET)")
        return ""

    monkeypatch.setattr(sillytavern, "ready", unpublished)
    bad = model(PINNED.replace('"1.18.0"', '"1.99.0"').replace("settings:\n", f"settings:\n  state_dir: {tmp_path}\n"),
                tmp_path)
    ready = asyncio.run(LocalRuntime(bad).prepare())
    assert ready.subject == "sillytavern 1.99.0" and ready.failed_releases == ("sillytavern@1.99.0",)
    assert ready.failure == ("instances[0].sillytavern_version: sillytavern 1.99.0 is not published on the npm "
                             "registry (ETARGET)")


def test_cli_installs_and_verifies_each_release_one_line_each(project, tmp_path: Path) -> None:
    home = tmp_path / "home"
    for version in ("1.18.0", "1.19.0"):
        fake_release(home, version)
    project.write(PINNED)
    env = {"CST_SILLYTAVERN_HOME": str(home)}
    never = project.cst("st", "verify", env=env)
    assert never.returncode == 2, never.stdout + never.stderr
    installed = project.cst("st", "install", env=env)
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.splitlines() == [
        f"changed: sillytavern {v} at {home / v / 'node_modules' / 'sillytavern'} (overlay laid (7 files written))"
        for v in ("1.19.0", "1.18.0")]
    verified = project.cst("st", "verify", env=env)
    assert verified.returncode == 0, verified.stderr
    assert [line.split(" at ")[0] for line in verified.stdout.splitlines()] == ["ok: sillytavern 1.19.0",
                                                                                  "ok: sillytavern 1.18.0"]
    (home / "1.18.0" / "node_modules" / "sillytavern" / overlay.PLUGIN_ENTRY).write_text("// altered\n")
    bad = project.cst("st", "verify", env=env)
    assert bad.returncode == 2
    assert bad.stdout.startswith("ok: sillytavern 1.19.0 at "), "each release is checked on its own"
    assert f"failed: {overlay.PLUGIN_ENTRY}: changed since it was laid" in bad.stderr
    assert "sillytavern 1.18.0 at " in bad.stderr and "1.19.0" not in bad.stderr


# -- removing releases no instance uses

def test_remove_unused_keeps_what_is_used_busy_or_not_a_release(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("CST_SILLYTAVERN_HOME", str(home))
    for version in ("1.17.0", "1.18.0", "1.19.0", "1.20.0-rc.1", "1.16.0"):
        fake_release(home, version)
    (home / "notes").mkdir()
    (home / "1.15.0").symlink_to(home / "1.16.0")
    busy = home / "1.16.0" / "node_modules" / "sillytavern" / "server.js"
    # a process of another state dir sharing the home runs 1.16.0
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(busy)])
    try:
        wait_until(lambda: str(busy) in psutil.Process(proc.pid).cmdline())
        with StateDir(home / "1.20.0-rc.1").lock("install"):   # another cst installs it right now
            removed = sillytavern.remove_unused(tmp_path / "state", {"1.19.0"})
    finally:
        proc.kill()
        proc.wait()
    assert removed == ["1.17.0", "1.18.0"]
    assert sorted(p.name for p in home.iterdir()) == ["1.15.0", "1.16.0", "1.19.0", "1.20.0-rc.1", "notes"]
    assert (home / "1.19.0" / "node_modules" / "sillytavern" / "server.js").is_file()
    assert sillytavern.remove_unused(tmp_path / "state", {"1.19.0", "1.16.0", "1.20.0-rc.1"}) == []
    with pytest.raises(ValueError, match="no release is in use"):
        sillytavern.remove_unused(tmp_path / "state", set())
    monkeypatch.delenv("CST_SILLYTAVERN_HOME")
    assert sillytavern.remove_unused(tmp_path / "nowhere", {"1.19.0"}) == [], "no install home yet"


# -- real releases from the npm registry

def runs(project, id_: str, server_js: Path) -> bool:
    """Whether the instance's node runs ``server_js`` (in a sandbox, seen through its root from the
    host's side: the same file, not only the same name)."""
    node = psutil.Process(project.record(id_)["pid"])
    argv = node.cmdline()
    script = argv[argv.index("--require") + 2]   # node [its flags] --require <CST's preload> <server.js> ...
    ran = os.stat(f"/proc/{node.pid}/root{script}") if SANDBOXED else os.stat(script)
    return (ran.st_dev, ran.st_ino) == (server_js.stat().st_dev, server_js.stat().st_ino)


@pytest.mark.sillytavern
def test_an_unpublished_version_stops_nothing(project, tmp_path: Path) -> None:
    """The npm registry is asked for a release that does not exist: the pinned instance keeps
    running on the release it had, the file's field is named, nothing else is touched."""
    home = tmp_path / "home"
    for version in ("1.18.0", "1.19.0"):
        fake_release(home, version)
    env = {"CST_SILLYTAVERN_HOME": str(home)}
    a, b = free_ports(2)
    head = ('version: 1\nsettings:\n  sillytavern: {version: "1.19.0", start_timeout: 15, stop_timeout: 3, '
            'rollout: {pause: 1s}}\ninstances:\n')
    project.write(head + f'  - port: {a}\n    sillytavern_version: "1.18.0"\n  - port: {b}\n')
    first = project.cst("apply", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    ids = {a: f"st-instance-{a}", b: f"st-instance-{b}"}
    assert runs(project, ids[a], home / "1.18.0" / "node_modules" / "sillytavern" / "server.js")
    assert runs(project, ids[b], home / "1.19.0" / "node_modules" / "sillytavern" / "server.js")
    assert project.record(ids[a])["release"] == "sillytavern@1.18.0"
    pid_a, pid_b = project.record(ids[a])["pid"], project.record(ids[b])["pid"]

    project.write(head + f'  - port: {a}\n    sillytavern_version: "0.0.1-cst-never"\n  - port: {b}\n')
    started = time.monotonic()
    refused = project.cst("apply", env=env)
    took = time.monotonic() - started
    assert refused.returncode == 2, refused.stdout + refused.stderr
    said = ("instances[0].sillytavern_version: sillytavern 0.0.1-cst-never is not published on the npm registry (")
    assert f"failed: sillytavern 0.0.1-cst-never ({said}" in refused.stdout
    assert f"failed: {ids[a]} (sillytavern 0.0.1-cst-never is not ready: {said}" in refused.stdout
    assert project.record(ids[a])["pid"] == pid_a and psutil.pid_exists(pid_a), "not stopped"
    assert project.record(ids[b])["pid"] == pid_b, "the other instance untouched"
    assert took < 120

    project.write(head + f'  - port: {a}\n    sillytavern_version: "1.19.0"\n  - port: {b}\n')
    moved = project.cst("apply", env=env)
    assert f"changed: {ids[a]} (upgraded: sillytavern@1.18.0 -> sillytavern@1.19.0 (snapshot " in moved.stdout, \
        moved.stdout + moved.stderr
    assert f"ok: {ids[b]}" in moved.stdout
    assert runs(project, ids[a], home / "1.19.0" / "node_modules" / "sillytavern" / "server.js")
    assert project.record(ids[a])["release"] == "sillytavern@1.19.0"


@pytest.mark.sillytavern
def test_real_releases_side_by_side(project) -> None:
    """1.18.0 for one instance, 1.19.0 (the fleet's) for another: both installed into the shared
    home with CST's overlay, both start on their own server.js and answer CST's health route
    with their own credentials. (Moving an instance to 1.19.0 is a rollout: tests/runtime/test_rollouts.py,
    which also removes 1.18.0 once nothing runs it, from a home of its own.)"""
    import httpx

    from reconciler.runtime.launch import HEALTH_PATH
    a, b = free_ports(2)
    ids = {a: f"st-instance-{a}", b: f"st-instance-{b}"}
    head = 'version: 1\nsettings:\n  sillytavern: {version: "1.19.0", start_timeout: 180, rollout: {pause: 2s}}\ninstances:\n'
    project.write(head + f'  - port: {a}\n    sillytavern_version: "1.18.0"\n  - port: {b}\n')
    home = sillytavern.install_home(project.state_dir)
    started = time.monotonic()
    install = project.cst("st", "install", timeout=900)   # 1.18.0 once per home: ~70 s
    assert install.returncode == 0, install.stdout + install.stderr
    assert [line.split(" at ")[0].split(": ", 1)[1] for line in install.stdout.splitlines()] == [
        "sillytavern 1.19.0", "sillytavern 1.18.0"], install.stdout
    print(f"cst st install: {time.monotonic() - started:.1f}s")
    verify = project.cst("st", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert len(verify.stdout.splitlines()) == 2

    first = project.cst("apply", timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.strip().splitlines()[-1] == "ok=0 changed=2 failed=0"
    for port, version in ((a, "1.18.0"), (b, "1.19.0")):
        id_ = ids[port]
        password = project.cst("password", id_).stdout.strip()
        server_js = home / version / "node_modules" / "sillytavern" / "server.js"
        assert runs(project, id_, server_js)
        assert project.record(id_)["release"] == f"sillytavern@{version}"
        health = httpx.get(f"http://127.0.0.1:{port}{HEALTH_PATH}", auth=(id_, password), timeout=10)
        assert health.status_code == 200, health.text
        assert health.json()["version"] == version, health.json()
        assert httpx.get(f"http://127.0.0.1:{port}{HEALTH_PATH}", auth=(id_, "wrong"), timeout=10).status_code == 401
