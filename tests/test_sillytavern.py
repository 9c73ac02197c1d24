"""End to end with the real SillyTavern release from the npm registry (marker: sillytavern)."""
import os
import signal
import textwrap

import psutil
import pytest

from conftest import free_ports, http_status, wait_until

pytestmark = pytest.mark.sillytavern


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_real_sillytavern_lifecycle(project):
    a, b = free_ports(2)
    ids = {a: f"st-instance-{a}", b: f"st-instance-{b}"}

    def write(ports):
        body = "".join(f"  - port: {p}\n" for p in ports)
        project.write("version: 1\nsettings:\n  sillytavern: {version: \"1.19.0\", start_timeout: 180}\n"
                      "instances:\n" + body)

    write([a, b])
    install = project.cst("st", "install", timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    assert "sillytavern 1.19.0 at " in install.stdout

    first = project.cst("apply")
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.strip().splitlines()[-1] == "ok=0 changed=2 failed=0"
    passwords = {p: project.cst("password", ids[p]).stdout.strip() for p in (a, b)}
    for p in (a, b):
        assert http_status(p) == 401
        assert http_status(p, (ids[p], passwords[p])) == 200
        assert http_status(p, (ids[p], passwords[b if p == a else a])) == 401
    status = project.status()
    assert {status[ids[p]]["status"] for p in (a, b)} == {"running"}
    # the front end came prebuilt: the install's build was copied where this instance looks for it
    seeded = [project.state_dir / "run" / ids[a] / "dist" / "_webpack", project.dir / "user-data" / str(a) / "_webpack"]
    assert any(path.is_dir() and any(path.iterdir()) for path in seeded)
    assert "compiled" in (project.state_dir / "logs" / f"{ids[a]}.log").read_text()

    again = project.cst("apply")
    assert again.stdout.strip().splitlines()[-1] == "ok=2 changed=0 failed=0"

    data_a = project.dir / "user-data" / str(a)
    cookie = (data_a / "cookie-secret.txt").read_text()
    killed = project.record(ids[a])["pid"]
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: project.status()[ids[a]]["status"] == "crashed")
    repaired = project.cst("apply")
    assert f"changed: {ids[a]} (restarted: process had exited)" in repaired.stdout
    assert http_status(a, (ids[a], passwords[a])) == 200
    assert (data_a / "cookie-secret.txt").read_text() == cookie
    status = project.status()
    assert status[ids[a]]["status"] == "running" and status[ids[a]]["restarts"] == 1
    assert status[ids[a]]["pid"] != killed

    pid_b = project.record(ids[b])["pid"]
    write([a])
    removed = project.cst("apply")
    assert f"changed: {ids[b]} (removed; data archived in " in removed.stdout
    wait_until(lambda: gone(pid_b))
    assert not (project.dir / "user-data" / str(b)).exists()
    [archived] = list((project.state_dir / "archive").iterdir())
    assert archived.name.startswith(ids[b]) and (archived / "cookie-secret.txt").exists()
    status = project.status()
    assert ids[b] not in status and status[ids[a]]["status"] == "running"
