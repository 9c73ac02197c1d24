"""The local runtime through the real ``cst`` command, on the fast stand-in server."""
import json
import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from conftest import AS_ROOT, SANDBOXED, free_ports, http_status, processes_of, standin_file, wait_until
from reconciler.runtime import sandbox


def recap(result) -> str:
    return result.stdout.strip().splitlines()[-1]


def test_apply_is_idempotent_and_instances_answer_with_their_credentials(project):
    a, b = free_ports(2)
    project.write(standin_file([(a, "running"), (b, "stopped")]))
    first = project.cst("apply")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"changed: st-instance-{a} (started)" in first.stdout
    assert f"ok: st-instance-{b}" in first.stdout
    assert recap(first) == "ok=1 changed=1 failed=0"
    password = project.cst("password", f"st-instance-{a}").stdout.strip()
    assert len(password) == 36
    assert http_status(a) == 401
    assert http_status(a, (f"st-instance-{a}", password)) == 200
    assert http_status(a, (f"st-instance-{a}", "wrong")) == 401
    secret = project.state_dir / "secrets" / f"st-instance-{a}.password"
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    assert password not in " ".join(psutil.Process(project.record(f"st-instance-{a}")["pid"]).cmdline())

    second = project.cst("apply")
    assert recap(second) == "ok=2 changed=0 failed=0"
    status = project.status()
    assert status[f"st-instance-{a}"]["status"] == "running"
    assert status[f"st-instance-{b}"]["status"] == "stopped"


def test_check_changes_nothing(project):
    (a,) = free_ports(1)
    project.write(standin_file([(a, "running")]))
    result = project.cst("apply", "--check", "--diff")
    assert result.returncode == 0
    assert f"changed: st-instance-{a} (would be started)" in result.stdout
    assert recap(result) == "check: ok=0 changed=1 failed=0"
    assert not project.state_dir.exists()
    assert not processes_of(project.state_dir.resolve())


def test_json_output(project):
    (a,) = free_ports(1)
    project.write(standin_file([(a, "running")]))
    report = json.loads(project.cst("apply", "-o", "json").stdout)
    assert report["recap"] == {"ok": 0, "changed": 1, "failed": 0}
    assert report["results"][0]["id"] == f"st-instance-{a}"
    assert report["results"][0]["before"] == "absent" and report["results"][0]["after"] == "running"


def test_kill_9_is_repaired_with_the_same_data(project):
    (a,) = free_ports(1)
    project.write(standin_file([(a, "running")]))
    project.cst("apply")
    first_pid = project.record(f"st-instance-{a}")["pid"]
    os.kill(first_pid, signal.SIGKILL)
    wait_until(lambda: project.status()[f"st-instance-{a}"]["status"] == "crashed")
    result = project.cst("apply")
    assert f"changed: st-instance-{a} (restarted: process had exited)" in result.stdout
    row = project.status()[f"st-instance-{a}"]
    assert row["status"] == "running" and row["restarts"] == 1 and row["pid"] != first_pid
    starts = (project.dir / "user-data" / str(a) / "default-user" / "starts.txt").read_text().split()
    assert len(starts) == 2 and len(set(starts)) == 2, "a second start of the same data dir"


def test_stop_then_start_again(project):
    (a,) = free_ports(1)
    project.write(standin_file([(a, "running")]))
    project.cst("apply")
    pid = project.record(f"st-instance-{a}")["pid"]
    project.write(standin_file([(a, "stopped")]))
    assert f"changed: st-instance-{a} (stopped)" in project.cst("apply").stdout
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert project.status()[f"st-instance-{a}"]["status"] == "stopped"
    project.write(standin_file([(a, "running")]))
    assert f"changed: st-instance-{a} (started)" in project.cst("apply").stdout
    assert http_status(a) == 401


def test_removal_archives_the_data_and_stops_the_process(project):
    a, b = free_ports(2)
    project.write(standin_file([(a, "running"), (b, "running")]))
    project.cst("apply")
    pid = project.record(f"st-instance-{a}")["pid"]
    started = (project.dir / "user-data" / str(a) / "default-user" / "starts.txt").read_text()
    project.write(standin_file([(b, "running")]))
    result = project.cst("apply")
    assert result.returncode == 0
    assert f"changed: st-instance-{a} (removed; data archived in " in result.stdout
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    assert not (project.dir / "user-data" / str(a)).exists()
    [archived] = list((project.state_dir / "archive").iterdir())
    assert archived.name.startswith(f"st-instance-{a}-") and archived.name.endswith("Z")
    assert (archived / "default-user" / "starts.txt").read_text() == started and len(started.split()) == 1
    status = project.status()
    assert f"st-instance-{a}" not in status and status[f"st-instance-{b}"]["status"] == "running"


def test_adopts_a_running_instance_whose_record_was_lost(project):
    (a,) = free_ports(1)
    project.write(standin_file([(a, "running")]))
    project.cst("apply")
    pid = project.record(f"st-instance-{a}")["pid"]
    (project.state_dir / "instances" / f"st-instance-{a}.json").unlink()
    result = project.cst("apply")
    assert f"ok: st-instance-{a} (adopted)" in result.stdout
    assert recap(result) == "ok=1 changed=0 failed=0"
    assert project.record(f"st-instance-{a}")["pid"] == pid


def test_a_recycled_pid_is_not_mistaken_for_the_instance(project):
    (a,) = free_ports(1)
    project.write(standin_file([(a, "running")]))
    project.cst("apply")
    os.kill(project.record(f"st-instance-{a}")["pid"], signal.SIGKILL)
    # a stranger now has the pid the record remembers (simulated with our own test process)
    path = project.state_dir / "instances" / f"st-instance-{a}.json"
    record = json.loads(path.read_text())
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record["pid"] = stranger.pid
        path.write_text(json.dumps(record))
        assert project.status()[f"st-instance-{a}"]["status"] == "crashed"
        result = project.cst("apply")
        assert f"changed: st-instance-{a} (restarted: process had exited)" in result.stdout
        assert stranger.poll() is None, "cst must not signal a process that only shares a pid"
    finally:
        stranger.kill()
        stranger.wait()


def test_a_foreign_process_on_the_port_fails_only_that_instance(project):
    a, b = free_ports(2)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", a))
    squatter.listen()
    try:
        project.write(standin_file([(a, "running"), (b, "running")]))
        result = project.cst("apply")
        assert result.returncode == 2
        assert f"failed: st-instance-{a} (port {a} is held by another process (pid {os.getpid()}" in result.stdout
        assert f"changed: st-instance-{b} (started)" in result.stdout
        assert recap(result) == "ok=0 changed=1 failed=1"
        assert project.status()[f"st-instance-{a}"]["status"] == "port-taken"
    finally:
        squatter.close()


def test_a_start_that_fails_reports_the_log_tail(project):
    (a,) = free_ports(1)
    project.standin_knobs(a, {"exitCode": 3})
    project.write(standin_file([(a, "running")]))
    result = project.cst("apply")
    assert result.returncode == 2
    assert f"failed: st-instance-{a} (did not start: exited with code 3 before answering" in result.stdout
    assert "stand-in: exiting with 3 as asked" in result.stdout
    assert not processes_of(project.state_dir.resolve())


def test_a_start_that_never_answers_times_out_and_is_cleaned_up(project):
    (a,) = free_ports(1)
    project.standin_knobs(a, {"startDelayMs": 60000})
    project.write(standin_file([(a, "running")]).replace("start_timeout: 15", "start_timeout: 1"))
    result = project.cst("apply")
    assert result.returncode == 2
    assert f"port {a} did not answer within 1s" in result.stdout
    assert not processes_of(project.state_dir.resolve())


def test_stop_escalates_to_sigkill(project):
    (a,) = free_ports(1)
    project.standin_knobs(a, {"ignoreSigterm": True})
    project.write(standin_file([(a, "running")]).replace("stop_timeout: 3", "stop_timeout: 0.5"))
    project.cst("apply")
    pid = project.record(f"st-instance-{a}")["pid"]
    project.write(standin_file([(a, "stopped")]).replace("stop_timeout: 3", "stop_timeout: 0.5"))
    assert project.cst("apply").returncode == 0
    assert "ignoring SIGTERM" in (project.state_dir / "logs" / f"st-instance-{a}.log").read_text()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_password_from_environment_and_restart_when_it_changes(project):
    (a,) = free_ports(1)
    project.write(standin_file([(a, "running")], {a: {"password_env": "MY_ST_PASSWORD"}}))
    missing = project.cst("apply")
    assert missing.returncode == 2
    assert f"failed: st-instance-{a} (environment variable MY_ST_PASSWORD (password of st-instance-{a}) is not set)" in missing.stdout
    project.cst("apply", env={"MY_ST_PASSWORD": "first-secret"})
    assert http_status(a, (f"st-instance-{a}", "first-secret")) == 200
    assert project.cst("password", f"st-instance-{a}", env={"MY_ST_PASSWORD": "first-secret"}).stdout.strip() == "first-secret"
    same = project.cst("apply", env={"MY_ST_PASSWORD": "first-secret"})
    assert recap(same) == "ok=1 changed=0 failed=0"
    changed = project.cst("apply", env={"MY_ST_PASSWORD": "second-secret"})
    assert f"changed: st-instance-{a} (restarted: settings changed)" in changed.stdout
    assert http_status(a, (f"st-instance-{a}", "second-secret")) == 200
    assert http_status(a, (f"st-instance-{a}", "first-secret")) == 401
    environ = psutil.Process(project.record(f"st-instance-{a}")["pid"]).environ()
    assert "MY_ST_PASSWORD" not in environ, "CST's own environment must not leak into instances"


def test_many_instances_start_concurrently(project):
    ports = free_ports(12)
    project.write(standin_file([(p, "running") for p in ports], settings="concurrency: 6"))
    result = project.cst("apply")
    assert recap(result) == "ok=0 changed=12 failed=0", result.stdout
    assert all(http_status(p) == 401 for p in ports)
    assert recap(project.cst("apply")) == "ok=12 changed=0 failed=0"


def test_invalid_file_changes_nothing(project):
    (a,) = free_ports(1)
    project.write(standin_file([(a, "running")]))
    project.cst("apply")
    pid = project.record(f"st-instance-{a}")["pid"]
    project.write(standin_file([(a, "running"), (a, "running")]))
    result = project.cst("apply")
    assert result.returncode == 1
    assert "is used twice" in result.stderr and result.stdout == ""
    assert project.record(f"st-instance-{a}")["pid"] == pid and psutil.pid_exists(pid)


def test_password_command_rejects_bad_ids(project):
    project.write(standin_file([]))
    assert project.cst("password", "../../etc/passwd").returncode == 1   # invalid input (README: exit codes)
    assert project.cst("password", "st-instance-9999").returncode == 1


def test_a_second_apply_waits_for_the_lock_then_says_who_holds_it(project):
    import fcntl
    project.write(standin_file([]))
    project.state_dir.mkdir()
    with open(project.state_dir / "reconcile.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("424242\n")
        held.flush()
        result = project.cst("apply", "--wait", "0.5")
    assert result.returncode == 2
    assert "reconcile.lock is held by pid 424242" in result.stderr


def test_each_instance_gets_its_own_proxy_key_and_loads_the_overlay(project):
    a, b, c = free_ports(3)
    project.write(standin_file([(a, "running"), (b, "running"), (c, "running")], extra_instance={c: {"proxy": "false"}}))
    assert project.cst("apply").returncode == 0
    keys = project.state_dir / "secrets" / "proxy-keys"
    key_a, key_b = ((keys / f"st-instance-{p}").read_text().strip() for p in (a, b))
    assert key_a.startswith("cst-") and key_b.startswith("cst-") and key_a != key_b
    assert oct((keys / f"st-instance-{a}").stat().st_mode & 0o777) == "0o600"
    assert not (keys / f"st-instance-{c}").exists()
    env = psutil.Process(project.record(f"st-instance-{a}")["pid"]).environ()
    assert env["SILLYTAVERN_ENABLESERVERPLUGINS"] == "true"
    assert env["SILLYTAVERN_ENABLESERVERPLUGINSAUTOUPDATE"] == "false"
    # as root the instance runs under a uid of its own and reads a copy of its key (0400, its own)
    # in its workdir: the key folder is root's alone; in its sandbox, the workdir is its $HOME
    copy = project.state_dir / "run" / f"st-instance-{a}" / "proxy.key"
    key_file = sandbox.HOME / "proxy.key" if SANDBOXED else copy if AS_ROOT else keys / f"st-instance-{a}"
    assert env["CST_PROXY_KEY_FILE"] == str(key_file) and env["CST_PROXY_URL"] == "http://127.0.0.1:5100"
    if AS_ROOT:
        uid = psutil.Process(project.record(f"st-instance-{a}")["pid"]).uids().real
        assert (copy.read_text().strip(), copy.stat().st_uid, oct(copy.stat().st_mode & 0o777)) == (key_a, uid, "0o400")
    assert key_a not in json.dumps(env), "the key is in a file, never in the environment"
    env_c = psutil.Process(project.record(f"st-instance-{c}")["pid"]).environ()
    assert "CST_PROXY_URL" not in env_c and "CST_PROXY_KEY_FILE" not in env_c

    rotated = project.cst("rotate-key", f"st-instance-{a}")
    assert rotated.returncode == 0, rotated.stderr
    new = (keys / f"st-instance-{a}").read_text().strip()
    assert new != key_a and rotated.stdout.startswith(f"changed: st-instance-{a} has a new proxy key (cst-")
    assert new not in rotated.stdout
    if AS_ROOT:
        assert copy.read_text().strip() == new and oct(copy.stat().st_mode & 0o777) == "0o400", "the copy follows"
    refused = project.cst("rotate-key", f"st-instance-{c}")
    assert refused.returncode == 1 and "has proxy: false" in refused.stderr

    # opting out later revokes the key (and restarts the instance without the proxy's settings)
    project.write(standin_file([(a, "running"), (b, "running"), (c, "running")],
                               extra_instance={b: {"proxy": "false"}, c: {"proxy": "false"}}))
    changed = project.cst("apply")
    assert f"changed: st-instance-{b} (restarted: settings changed)" in changed.stdout
    assert not (keys / f"st-instance-{b}").exists()
    assert not (project.state_dir / "run" / f"st-instance-{b}" / "proxy.key").exists(), "nor its copy"
    # removing an instance revokes its key
    project.write(standin_file([(b, "running"), (c, "running")], extra_instance={b: {"proxy": "false"}, c: {"proxy": "false"}}))
    assert project.cst("apply").returncode == 0
    assert list(keys.iterdir()) == []


def test_readiness_is_the_health_route(project):
    (a,) = free_ports(1)
    project.write(standin_file([(a, "running")]))
    assert project.cst("apply").returncode == 0
    id_ = f"st-instance-{a}"
    password = project.cst("password", id_).stdout.strip()
    import urllib.request
    from base64 import b64encode
    request = urllib.request.Request(f"http://127.0.0.1:{a}/api/plugins/cst/health",
                                     headers={"Authorization": "Basic " + b64encode(f"{id_}:{password}".encode()).decode()})
    with urllib.request.urlopen(request, timeout=10) as answer:
        health = json.loads(answer.read())
    assert health["status"] == "ok" and health["instance"] == id_
    assert health["dataRoot"] == str(sandbox.DATA if SANDBOXED else project.dir / "user-data" / str(a))
    assert health["memory"]["rss"] > 0 and health["uptime"] >= 0


async def test_a_stop_is_bounded_when_the_process_outlives_sigkill(monkeypatch: pytest.MonkeyPatch) -> None:
    # a process in D state outlives SIGKILL; here, signals that reach nobody stand for it
    import asyncio
    import subprocess

    import psutil

    from reconciler.runtime import processes
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        monkeypatch.setattr(processes, "_signal", lambda pidfd, pid, sig: True)
        monkeypatch.setattr(processes, "KILL_WAIT", 0.3)
        create_time = psutil.Process(sleeper.pid).create_time()
        with pytest.raises(processes.StopStuck, match=f"pid {sleeper.pid} did not exit"):
            async with asyncio.timeout(10):   # the code before the fix waited here for ever
                await processes.terminate(sleeper.pid, create_time, grace=0.2)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
