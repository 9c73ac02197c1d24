"""desired.yaml cannot be rewritten (disk full, read-only): the old file stays whole, the API answers
an error, the instances keep running. On a real tmpfs where this machine lets us mount one, and with
ENOSPC / EROFS injected at the write everywhere."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Project, free_ports, http_status, kill_all, serve_settings, standin_file, start_serve, wait_until

FAULTY = (sys.executable, str(Path(__file__).with_name("faulty_cst.py")))


def refused_everywhere(served, file: Path, port: int, reason: str) -> None:
    """Every way of changing the file fails with ``reason``; the file and the instance are untouched."""
    before = file.read_bytes()
    sha = served.api("GET", "/api/desired").json()["sha256"]
    (new_port,) = free_ports(1)
    create = served.api("POST", "/api/instances?lang=en", json={"port": new_port})
    assert create.status_code == 500, create.text
    assert create.json() == {"error": f"Could not write desired.yaml ({reason}); nothing was changed",
                             "code": "write_failed"}
    stop = served.api("POST", f"/api/instances/st-instance-{port}/stop?lang=en")
    assert stop.status_code == 500 and reason in stop.json()["error"]
    put = served.api("PUT", "/api/desired?lang=en", content=before.replace(b"instances:", b"# edited\ninstances:"),
                     headers={"If-Match": sha})
    assert put.status_code == 500 and reason in put.json()["error"]
    assert file.read_bytes() == before
    assert not [p for p in file.parent.iterdir() if p.name.endswith(".tmp")], "no temporary file left behind"
    assert http_status(port) == 401
    assert served.proc.poll() is None


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
def test_injected_write_failure(project, serve, code):
    api, a = free_ports(2)
    project.write(standin_file([(a, "running")], settings=serve_settings(api, "1s")))
    project.env["CST_TEST_FAULTS"] = json.dumps({"write": {"name": "desired.yaml", "errno": code}})
    served = serve(api, command=FAULTY)
    wait_until(lambda: http_status(a) == 401, timeout=30)
    refused_everywhere(served, project.file, a, os.strerror(code))


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                          capture_output=True)
    return done.returncode == 0


def test_a_real_full_then_read_only_filesystem(tmp_path, project):
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, "64k"):
        pytest.skip("this machine does not let the tests mount a tmpfs; the injected faults cover it")
    on_tmpfs = Project(mount, project.env)
    state_dir = tmp_path / "state"  # state and data elsewhere: only desired.yaml lives on the small disk
    served = None
    try:
        api, a = free_ports(2)
        on_tmpfs.write(standin_file([(a, "running")], settings=serve_settings(api, "1s")
                                    + f"\nstate_dir: {state_dir}\ndata_root: {tmp_path / 'data'}"))
        served = start_serve(on_tmpfs, api, log_name="../serve.log")
        wait_until(lambda: http_status(a) == 401, timeout=30)
        filler = mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk to the last byte
            while True:
                os.write(fd, b"\0" * 512)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        refused_everywhere(served, on_tmpfs.file, a, os.strerror(errno.ENOSPC))
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        refused_everywhere(served, on_tmpfs.file, a, os.strerror(errno.EROFS))
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
        (b,) = free_ports(1)
        created = served.api("POST", "/api/instances", json={"port": b})
        assert created.status_code == 201 and http_status(b) == 401, "writable again: changes go through"
    finally:
        if served is not None:
            served.stop()
        kill_all(state_dir)
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
