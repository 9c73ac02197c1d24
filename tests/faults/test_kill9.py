"""`kill -9` of `cst serve` or `cst apply` while it starts several instances: afterwards no instance
runs twice, none is orphaned, and the records match the processes."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess

import psutil
import pytest

from conftest import CST, free_ports, http_status, processes_of, serve_settings, standin_file, wait_until

SLOW_START_MS = 1500  # the stand-in listens this late: long enough to be killed in the middle


def started(project, ports: list[int]) -> int:
    """How many of the instances have a record with a pid (their process was spawned)."""
    count = 0
    for port in ports:
        try:
            record = json.loads((project.state_dir / "instances" / f"st-instance-{port}.json").read_text())
        except (OSError, ValueError):
            continue
        count += record.get("pid") is not None
    return count


def assert_one_process_per_instance_and_records_match(project, ports: list[int]) -> None:
    by_instance: dict[str, list[int]] = {}
    for proc in processes_of(project.state_dir.resolve()):
        if "CST_INSTANCE_ID" in proc.environ():   # not the key-pool proxy, which cst serve leaves running too
            by_instance.setdefault(proc.environ()["CST_INSTANCE_ID"], []).append(proc.pid)
    assert set(by_instance) == {f"st-instance-{p}" for p in ports}, "no orphans, none missing"
    for id_, pids in by_instance.items():
        assert len(pids) == 1, f"{id_} runs {len(pids)} times: {pids}"
        record = json.loads((project.state_dir / "instances" / f"{id_}.json").read_text())
        assert record["pid"] == pids[0], f"the record of {id_} names {record['pid']}, {pids[0]} runs"
        assert abs(psutil.Process(pids[0]).create_time() - record["create_time"]) <= 0.05


def slow_fleet(project, api: int, ports: list[int]) -> None:
    for port in ports:
        project.standin_knobs(port, {"startDelayMs": SLOW_START_MS})
    project.write(standin_file([(p, "running") for p in ports], settings=serve_settings(api, "0.5s")))


def test_kill_9_of_serve_while_it_starts_instances(project, serve):
    api, *ports = free_ports(6)
    slow_fleet(project, api, ports)
    first = serve(api)
    wait_until(lambda: started(project, ports) >= 2, timeout=30)  # settings.concurrency is 4: some wait
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    assert not all(http_status(p) == 401 for p in ports), "killed in the middle"
    again = serve(api, log_name="serve2.log")
    wait_until(lambda: all(http_status(p) == 401 for p in ports), timeout=60)
    wait_until(lambda: all(r["status"] == "online" for r in again.api("GET", "/api/instances").json()), timeout=30)
    assert_one_process_per_instance_and_records_match(project, ports)


def test_kill_9_of_apply_while_it_starts_instances(project):
    api, *ports = free_ports(6)
    slow_fleet(project, api, ports)
    apply = subprocess.Popen([*CST, "apply", "-f", str(project.file)], cwd=project.dir, env=project.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: started(project, ports) >= 2, timeout=30)
    finally:
        apply.kill()
        apply.wait()
    again = project.cst("apply")
    assert again.returncode == 0, again.stdout + again.stderr
    # a process the killed apply had spawned counts as running; it answers once it has started
    wait_until(lambda: all(http_status(p) == 401 for p in ports), timeout=30)
    assert_one_process_per_instance_and_records_match(project, ports)
    assert project.cst("apply").stdout.strip().splitlines()[-1] == f"ok={len(ports)} changed=0 failed=0"



@pytest.mark.parametrize("behind_edge", [False, True], ids=["own-port", "behind-the-edge"])
def test_a_process_spawned_just_before_the_kill_has_no_record_and_is_adopted(project, behind_edge, tmp_path):
    """The narrowest window: the process is spawned, the cst that spawned it is killed before the
    record is written, and the process does not listen yet. It is found by its environment, on its
    own port or behind the edge (where no port of its own would tell)."""
    from reconciler.desired.model import load
    from reconciler.runtime import edge, listener
    from reconciler.runtime.local import LocalRuntime

    api, port, edge_port = free_ports(3)
    project.standin_knobs(port, {"startDelayMs": 3000})
    settings = serve_settings(api, "1s")
    if behind_edge:   # every instance behind the edge, parked or not: settings.edge
        import trustme
        issued = trustme.CA().issue_cert("*.st.test")
        issued.private_key_pem.write_to_path(str(tmp_path / "edge.key"))
        issued.cert_chain_pems[0].write_to_path(str(tmp_path / "edge.pem"))
        settings += (f'\nedge: {{listen: "127.0.0.1:{edge_port}", domain: st.test, '
                     f'tls: {{cert: {tmp_path / "edge.pem"}, key: {tmp_path / "edge.key"}}}}}')
    project.write(standin_file([(port, "running")], settings=settings))
    launch = LocalRuntime(load(project.file)).launch_spec(load(project.file).instances[0])
    for folder in (launch.workdir, launch.data_dir):   # as the launcher prepares them: the instance's own
        folder.mkdir(parents=True, exist_ok=True)
        if launch.user is not None:
            os.chown(folder, launch.user.uid, launch.user.gid)
    # spawned as the runtime spawns it: on the address CST opened for it (into its sandbox, where
    # the record names node, not bwrap)
    if behind_edge:
        edge.prepare_folders(edge.Paths(project.state_dir.resolve()))
    with listener.open_listener(launch.address, edge.worker_gid() if behind_edge else None) as bound:
        env = {**dict(launch.env), listener.ENV_LISTEN_FD: str(bound.fileno())}
        if launch.sandbox is None:
            orphan = subprocess.Popen(launch.argv, cwd=launch.workdir, env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(bound.fileno(),))
            node = orphan.pid
        else:
            with open(os.devnull, "wb") as devnull:
                orphan, node = asyncio.run(launch.sandbox.spawn(launch.argv, env, devnull, 0o077, bound.fileno()))
    try:
        applied = project.cst("apply")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert f"ok: st-instance-{port} (adopted)" in applied.stdout
        wait_until(lambda: http_status(port) == 401, timeout=30)
        assert_one_process_per_instance_and_records_match(project, [port])
        assert json.loads((project.state_dir / "instances" / f"st-instance-{port}.json").read_text())["pid"] == node
    finally:
        os.kill(node, signal.SIGKILL)   # in a sandbox, its init and bwrap follow
        orphan.wait()
