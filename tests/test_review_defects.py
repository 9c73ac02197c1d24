"""Defects a review of main found (issue 17), each against a live `cst serve` on the stand-in:
the test fails on the code before its fix."""
from __future__ import annotations

import hashlib
import ipaddress
import os
from types import SimpleNamespace

import httpx
import pytest
from multidict import CIMultiDict

from conftest import Project, free_ports, http_status, serve_settings, standin_file, wait_until
from reconciler.desired.model import load
from reconciler.desired.problems import InvalidDesiredState
from reconciler.desired.validation import MAX_PROBLEMS
from reconciler.runtime.statedir import StateDir
from reconciler.server.events import EventHub
from reconciler.server.security import client_address

KEY = "review-admin-key"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_put_repairs_a_broken_file_judged_against_the_last_valid_state(project: Project, serve) -> None:
    api, port = free_ports(2)
    project.write(standin_file([(port, "running")], settings=serve_settings(api)))
    served = serve(api, admin_key=KEY)
    wait_until(lambda: http_status(port) == 401, timeout=30)
    good = project.file.read_text()
    broken = good + "instances: [\n"
    project.file.write_text(broken)
    wait_until(lambda: not served.api("GET", "/api/status").json()["file"]["valid"], timeout=10)

    # a restricted change is still refused, judged against the last valid state
    sneaky = good.replace("settings:\n", "settings:\n  data_root: /etc\n", 1)
    refused = served.api("PUT", "/api/desired?lang=en", content=sneaky, headers={"If-Match": sha(broken)})
    assert refused.status_code == 403 and "settings.data_root" in refused.text
    assert project.file.read_text() == broken

    # the repair itself goes through (it was a 500 with a traceback)
    repaired = served.api("PUT", "/api/desired", content=good, headers={"If-Match": sha(broken)})
    assert repaired.status_code == 200, repaired.text
    assert project.file.read_text() == good and served.api("GET", "/api/status").json()["file"]["valid"]
    assert http_status(port) == 401


def test_if_match_compares_strongly_and_star_matches_the_current_file(project: Project, serve) -> None:
    api, = free_ports(1)
    project.write(standin_file([], settings=serve_settings(api)))
    served = serve(api, admin_key=KEY)
    text = project.file.read_text()
    changed = text + "# one\n"

    weak = served.api("PUT", "/api/desired", content=changed, headers={"If-Match": f'W/"{sha(text)}"'})
    assert weak.status_code == 412 and project.file.read_text() == text   # a weak tag never matches
    listed = served.api("PUT", "/api/desired", content=changed, headers={"If-Match": f'"{"0" * 64}", "{sha(text)}"'})
    assert listed.status_code == 200 and project.file.read_text() == changed
    star = served.api("PUT", "/api/desired", content=changed + "# two\n", headers={"If-Match": "*"})
    assert star.status_code == 200 and project.file.read_text().endswith("# two\n")


def test_a_last_event_id_of_other_digits_gets_a_fresh_stream_not_a_second_answer(project: Project, serve) -> None:
    api, = free_ports(1)
    project.write(standin_file([], settings=serve_settings(api)))
    served = serve(api, admin_key=KEY)
    hub = EventHub(pool=lambda: {})
    for odd in ("²", "٣", "1²", "9" * 40, "-1", " 1"):
        assert hub.since(f"{hub.run}-{odd}") is None, odd   # isdigit() took '²', and int() raised
    headers = {"X-ST-Admin-Key": KEY}
    with httpx.stream("GET", served.url + "/api/events", timeout=10, headers=headers) as stream:
        ids = (line for line in stream.iter_lines() if line.startswith("id:"))
        run = next(ids).split(":", 1)[1].strip().split("-")[0]   # this cst serve's run
    with httpx.stream("GET", served.url + "/api/events", timeout=10,
                      headers={**headers, "Last-Event-ID": f"{run}-²".encode()}) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        seen = [next(lines) for _ in range(3)]
    assert any(line.startswith("event:") and "reset" in line for line in seen), seen
    assert not any("500" in line or "HTTP/" in line for line in seen), seen


def test_rotate_key_while_another_cst_holds_the_state_dir_is_a_504_naming_it(project: Project, serve) -> None:
    api, port = free_ports(2)
    settings = serve_settings(api).replace(f'api: {{listen: "127.0.0.1:{api}"}}',
                                           f'api: {{listen: "127.0.0.1:{api}", timeout: 2s}}')
    project.write(standin_file([(port, "running")], settings=settings))
    served = serve(api, admin_key=KEY)
    wait_until(lambda: http_status(port) == 401, timeout=30)
    key_file = project.state_dir / "secrets" / "proxy-keys" / f"st-instance-{port}"
    before = key_file.read_text()
    with StateDir(project.state_dir).lock(timeout=5):   # as a long `cst apply` would
        answer = served.api("POST", f"/api/instances/st-instance-{port}/rotate-key?lang=en")
    assert answer.status_code == 504, answer.text   # was a 500: LockHeld escaped
    assert "not rotated" in answer.json()["error"] and f"pid {os.getpid()}" in answer.json()["error"]
    assert key_file.read_text() == before
    assert served.api("POST", f"/api/instances/st-instance-{port}/rotate-key").status_code == 200


def test_behind_a_trusted_reverse_proxy_one_guesser_locks_out_only_itself(project: Project, serve) -> None:
    api, = free_ports(1)
    settings = serve_settings(api).replace(f'api: {{listen: "127.0.0.1:{api}"}}',
                                           f'api: {{listen: "127.0.0.1:{api}", trusted_proxies: [127.0.0.1]}}')
    project.write(standin_file([], settings=settings))
    served = serve(api, admin_key=KEY)
    guesser, colleague = {"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "198.51.100.9, 203.0.113.8"}
    answers = [served.api("GET", "/api/status", headers={**guesser, "X-ST-Admin-Key": f"guess-{i}"}).status_code
               for i in range(30)]
    assert answers[-1] == 429 and answers.count(401) >= 10
    assert served.api("GET", "/api/status", headers=colleague).status_code == 200   # was 429 for everyone
    assert served.api("GET", "/api/status", headers=guesser).status_code == 429


def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)

    def seen(remote: str, forwarded: str | None) -> str | None:
        headers = CIMultiDict({"X-Forwarded-For": forwarded} if forwarded is not None else {})
        return client_address(SimpleNamespace(remote=remote, headers=headers), trusted)  # type: ignore[arg-type]

    assert seen("203.0.113.7", "1.2.3.4") == "203.0.113.7"            # a client cannot name itself
    assert seen("10.0.0.2", "1.2.3.4") == "1.2.3.4"
    assert seen("10.0.0.2", "6.6.6.6, 1.2.3.4, 10.0.0.3") == "1.2.3.4"  # spoofed hops before the client: not believed
    assert seen("10.0.0.2", "not-an-address") == "10.0.0.2"
    assert seen("10.0.0.2", None) == "10.0.0.2"
    assert client_address(SimpleNamespace(remote="1.2.3.4", headers=CIMultiDict({"X-Forwarded-For": "5.6.7.8"})),
                          ()) == "1.2.3.4"   # type: ignore[arg-type]   off by default


def test_a_file_of_thousands_of_problems_lists_the_first_and_counts_the_rest(tmp_path) -> None:
    entries = "".join(f"  - port: not-a-port-{i}\n" for i in range(3000))
    path = tmp_path / "desired.yaml"
    path.write_text("version: 1\ninstances:\n" + entries)
    with pytest.raises(InvalidDesiredState) as invalid:
        load(path)
    problems = [str(p) for p in invalid.value.problems]
    assert len(problems) == MAX_PROBLEMS + 1   # was 3,000 lines, each logged by cst serve on every save
    assert problems[0].startswith(f"{path}:3: instances[0].port:")
    assert problems[-1] == f"{path}:{3 + MAX_PROBLEMS}: and {3000 - MAX_PROBLEMS} more problems from this line on"


def test_get_desired_answers_for_a_deeply_nested_file(project: Project, serve) -> None:
    api, = free_ports(1)
    project.write(standin_file([], settings=serve_settings(api)))
    served = serve(api, admin_key=KEY)
    deep = project.file.read_text() + "extra: " + "[" * 5000 + "]" * 5000 + "\n"
    project.file.write_text(deep)
    wait_until(lambda: not served.api("GET", "/api/status").json()["file"]["valid"], timeout=10)
    answer = served.api("GET", "/api/desired")
    assert answer.status_code == 200, answer.text   # was a 500: RecursionError in the plain YAML parser
    assert answer.json()["valid"] is False and answer.json()["instances"] == {}
    assert any("nest" in p for p in answer.json()["problems"]), answer.json()["problems"]


def test_a_hand_edit_of_the_state_dir_waits_for_a_restart_and_status_says_so(project: Project, serve) -> None:
    api, port = free_ports(2)
    text = standin_file([(port, "running")], settings=serve_settings(api))
    project.write(text)
    served = serve(api, admin_key=KEY)
    id_ = f"st-instance-{port}"
    wait_until(lambda: http_status(port) == 401, timeout=30)
    elsewhere = project.dir / "elsewhere"
    project.write(text.replace("settings:\n", f"settings:\n  state_dir: {elsewhere}\n", 1))

    def restart_noted() -> bool:
        return served.api("GET", "/api/status").json()["daemon"]["restartNeeded"] == ["settings.state_dir"]
    wait_until(restart_noted, timeout=15)
    before = served.api("GET", "/api/status").json()["reconcile"]["lastRun"]
    wait_until(lambda: served.api("GET", "/api/status").json()["reconcile"]["lastRun"] != before, timeout=15)
    # the passes keep the state dir cst serve started with: the instance is still its own, not
    # "port taken by another process", and nothing was written to the new one
    assert served.api("GET", f"/api/instances/{id_}").json()["status"] == "online"
    status = served.api("GET", "/api/status").json()
    assert status["reconcile"]["recap"]["failed"] == 0, status["reconcile"]
    assert not elsewhere.exists()
    project.write(text)   # put back: nothing waits for a restart any more
    wait_until(lambda: served.api("GET", "/api/status").json()["daemon"]["restartNeeded"] == [], timeout=15)


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


async def test_liveness_resolves_launch_specs_off_the_loop(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from reconciler.engine.results import Report, Result
    from reconciler.runtime.base import Observed
    from reconciler.runtime.health import HealthChecks
    from reconciler.runtime.local import LocalRuntime
    from reconciler.server import liveness
    (port,) = free_ports(1)
    project.write(standin_file([(port, "running")]))
    desired = load(project.file)
    me = os.getpid()
    import psutil
    seen = Observed(f"st-instance-{port}", port, "running", me, create_time=psutil.Process(me).create_time())
    report = Report(results=[Result(seen.id, "ok")], observed={seen.id: seen})
    threads = []
    real = LocalRuntime.launch_spec
    monkeypatch.setattr(LocalRuntime, "launch_spec",
                        lambda self, spec: threads.append(threading.current_thread()) or real(self, spec))
    checks = HealthChecks()
    try:
        answers = await liveness.check(LocalRuntime(desired, readonly=True, checks=checks), desired, report)
    finally:
        await checks.close()
    assert answers[seen.id] and "could not be reached" in answers[seen.id]   # nobody listens there
    assert threads and threading.main_thread() not in threads


def test_backoff_follows_the_kind_of_a_result_not_its_wording(project: Project) -> None:
    from reconciler.engine.results import Happened, Result
    from reconciler.engine.supervision import Supervisor
    from reconciler.runtime.base import Observed
    (port,) = free_ports(1)
    project.write(standin_file([(port, "running")]))
    now = [1000.0]
    supervisor = Supervisor(load(project.file), clock=lambda: now[0])
    id_ = f"st-instance-{port}"
    observed = {id_: Observed(id_, port, "stopped")}
    # reworded: neither starts with "did not start"
    supervisor.learn(observed, [Result(id_, "failed", "never came up", happened=Happened.START_FAILED,
                                       cause="exit 7")])
    held = supervisor.errored(id_)
    assert held is not None and "(exit 7)" in held
    supervisor.learn(observed, [Result(id_, "failed", "did not start: but this is a taken port",
                                       happened=Happened.IMPOSSIBLE)])
    assert supervisor.crashes[id_].count == 1   # not a failed start, whatever it says


def test_an_edit_reads_the_file_within_the_loaders_limits() -> None:
    from reconciler.desired import edits
    nested = "version: 1\ninstances: " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(edits.EditError, match="nested more than"):   # was RecursionError
        edits.add_instance(nested, 8001, "running")
    assert edits.instance_lines(nested) == {}
