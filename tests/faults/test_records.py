"""Records in the state dir that lie: truncated, garbage, or naming a pid that is now someone else's.
Such a process is never killed and never adopted; the daemon goes on and records match reality."""
from __future__ import annotations

import json
import subprocess

import psutil

from conftest import free_ports, http_status, serve_settings, standin_file, wait_until


def record_path(project, port: int):
    return project.state_dir / "instances" / f"st-instance-{port}.json"


def passes_go_on(served, count: int = 2) -> None:
    """Wait for ``count`` more passes to finish, none of them failed as a whole."""
    for _ in range(count):
        before = served.api("GET", "/api/status").json()["reconcile"]["lastRun"]
        status = wait_until(lambda: (s := served.api("GET", "/api/status").json())["reconcile"]["lastRun"] != before
                            and s, timeout=30)
        assert all(r["id"] != "reconcile" for r in status["reconcile"]["results"]), status["reconcile"]
        assert all(t["totalFailures"] == 0 for t in status["daemon"]["tasks"].values())


def test_truncated_and_garbage_records_are_ignored_and_rewritten(project, serve):
    api, a, b, c = free_ports(4)
    project.write(standin_file([(a, "running")], settings=serve_settings(api, "0.3s")))
    served = serve(api)
    wait_until(lambda: http_status(a) == 401, timeout=30)
    pid = served.api("GET", f"/api/instances/st-instance-{a}").json()["pid"]
    whole = record_path(project, a).read_text()
    record_path(project, a).write_text(whole[: len(whole) // 2])  # cut off mid-write
    records = project.state_dir / "instances"
    garbage = {
        records / f"st-instance-{b}.json": b"\x00\xff\xfe garbage",
        records / f"st-instance-{c}.json": json.dumps(  # the right shape, but pid 1 and wrong types
            {"id": f"st-instance-{c}", "port": str(c), "data_dir": 7, "pid": 1, "create_time": 0}).encode(),
        records / "st-instance-1.json": json.dumps(  # says it is another instance than its name
            {"id": f"st-instance-{b}", "port": b, "data_dir": "/", "pid": 1, "create_time": 0}).encode(),
        records / "junk.json": b"[]",
        records / "deep.json": b"[" * 100000,
    }
    for path, data in garbage.items():
        path.write_bytes(data)
    passes_go_on(served, 3)
    # the instance was found again by its port (its environment names it) and adopted, not restarted
    assert json.loads(record_path(project, a).read_text())["pid"] == pid
    assert http_status(a) == 401 and psutil.pid_exists(1)
    rows = served.api("GET", "/api/instances").json()
    assert [(r["id"], r["pid"]) for r in rows] == [(f"st-instance-{a}", pid)], "garbage shows as nothing"
    assert all(path.read_bytes() == data for path, data in garbage.items()), "garbage is left for a person to see"


def test_a_record_whose_pid_now_belongs_to_another_process(project, serve):
    api, a = free_ports(2)
    project.write(standin_file([(a, "stopped")], settings=serve_settings(api, "0.3s")))
    stranger = subprocess.Popen(["sleep", "600"])
    try:
        # the record of a process that ended long ago, whose pid the kernel has since given to `sleep`
        record_path(project, a).parent.mkdir(parents=True)
        record_path(project, a).write_text(json.dumps({
            "id": f"st-instance-{a}", "port": a, "data_dir": str(project.dir / "user-data" / str(a)),
            "pid": stranger.pid, "create_time": psutil.Process(stranger.pid).create_time() - 1000,
            "argv": ["node", "server.js"], "fingerprint": "0" * 16, "started_at": None, "restarts": 0}))
        served = serve(api)
        passes_go_on(served, 2)
        assert stranger.poll() is None, "a recycled pid is never signalled"
        row = served.api("GET", f"/api/instances/st-instance-{a}").json()
        assert (row["status"], row["pid"]) == ("stopped", None)
        # asked to run, it is started afresh on its port; the stranger is neither adopted nor killed
        project.write(project.file.read_text().replace("state: stopped", "state: running"))
        wait_until(lambda: http_status(a) == 401, timeout=30)
        passes_go_on(served, 1)
        pid = json.loads(record_path(project, a).read_text())["pid"]
        assert pid != stranger.pid and stranger.poll() is None
        assert psutil.Process(pid).environ()["CST_INSTANCE_ID"] == f"st-instance-{a}"
    finally:
        stranger.kill()
        stranger.wait()
