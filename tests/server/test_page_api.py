"""What the admin page reads from `cst serve`, over plain HTTP: the page itself, the event stream,
instance logs (and `cst logs`), the key pool relayed from the proxy, the suggested port and the
lines of each instance in desired.yaml. On the stand-in server; the pool on a fake DaiDai platform."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncGenerator, cast

import httpx
import pytest

from conftest import (
    EventReader,
    Project,
    daidai_account,
    fake_daidai,
    free_ports,
    http_status,
    proxy_fakes,
    serve_settings,
    standin_file,
    wait_until,
)
from reconciler.engine.results import Happened as H
from reconciler.engine.results import Report, Result
from reconciler.runtime.logfollow import follow
from reconciler.runtime.logs import rotate_log
from reconciler.server.events import KEEP, EventHub, changes

KEY = "review-admin-key"


def say(served, port: int, line: str) -> None:
    """Make the stand-in on ``port`` write ``line`` to its log."""
    id_ = f"st-instance-{port}"
    password = served.project.cst("password", id_).stdout.strip()
    response = httpx.get(f"http://127.0.0.1:{port}/standin/say", params={"line": line}, auth=(id_, password))
    assert response.status_code == 204


@pytest.fixture
def fleet(project, serve):
    """cst serve with one running stand-in instance: (served, its port)."""
    api, port = free_ports(2)
    project.write(standin_file([(port, "running")], settings=serve_settings(api, "1s")))
    served = serve(api)
    wait_until(lambda: http_status(port) == 401, timeout=30)
    return served, port


def test_the_page_is_served_with_its_policy(fleet):
    served, _ = fleet
    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert 'src="page/app.js"' in page.text and "http" not in page.text.split("<body>")[0]
    script = httpx.get(served.url + "/page/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    again = httpx.get(served.url + "/page/app.js", headers={"If-None-Match": script.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    for missing in ("/page/nothing.js", "/page/..%2Fapi.py", "/page/"):
        answer = httpx.get(served.url + missing + "?lang=en")
        assert (answer.status_code, answer.json()) == (404, {"error": "Not found", "code": "not_route"}), missing


def test_events_tell_what_happens_and_a_reconnect_gets_what_it_missed(fleet):
    served, port = fleet
    id_ = f"st-instance-{port}"
    missing = httpx.get(served.url + "/api/events?lang=en")
    assert (missing.status_code, missing.json()) == (401, {"error": "Missing admin key (header X-ST-Admin-Key)",
                                                                  "code": "missing_admin_key"})
    reader = EventReader(served)
    try:
        assert reader.response.headers["content-type"].startswith("text/event-stream")
        reset = reader.wait_for("reset")
        assert reader.events[0] is reset and reset["id"].count("-") == 1

        (other,) = free_ports(1)
        assert served.api("POST", "/api/instances", json={"port": other}).status_code == 201
        reader.wait_for("instance", id=f"st-instance-{other}", change="started")
        reader.wait_for("file", valid=True)

        pid = served.api("GET", f"/api/instances/{id_}").json()["pid"]
        os.kill(pid, signal.SIGKILL)
        crashed = reader.wait_for("instance", id=id_, change="crashed")
        assert str(pid) in crashed["data"]["detail"]
        reader.wait_for("instance", id=id_, change="restarted")
        reader.wait_for("reconcile")
        row = served.api("GET", f"/api/instances/{id_}").json()
        assert row["lastFailure"]["reason"] == crashed["data"]["detail"] and row["restarts"] == 1

        text = served.project.file.read_text()
        served.project.file.write_text(text + "instances: [oops\n")
        bad = reader.wait_for("file", valid=False)
        assert bad["data"]["problems"] and bad["data"]["problems"][0]["line"] >= 1
        served.project.file.write_text(text)
        wait_until(lambda: sum(1 for e in reader.events if e.get("event") == "file" and e["data"]["valid"]) >= 2)
        last = reader.events[-1]["id"]
    finally:
        reader.close()

    # what happens while nobody listens is replayed to a client that says where it was
    assert served.api("POST", f"/api/instances/{id_}/stop").status_code == 200
    resumed = EventReader(served, last_event_id=last)
    try:
        stopped = resumed.wait_for("instance", id=id_, change="stopped")
        assert all(e.get("event") != "reset" for e in resumed.events)
        assert int(stopped["id"].split("-")[1]) > int(last.split("-")[1])
    finally:
        resumed.close()
    for stale in (last.split("-")[0] + "-999999", "0000-1", "garbage"):
        again = EventReader(served, last_event_id=stale)
        try:
            assert again.wait_for("reset")
        finally:
            again.close()


def test_serve_stops_at_once_with_streams_open(fleet):
    served, port = fleet
    reader = EventReader(served)
    reader.wait_for("reset")
    follower = httpx.Client(timeout=httpx.Timeout(10, read=60))
    stream = follower.send(follower.build_request(
        "GET", served.url + f"/api/instances/st-instance-{port}/logs?follow=1",
        headers={"X-ST-Admin-Key": served.admin_key}), stream=True)
    assert stream.status_code == 200
    started = time.monotonic()
    try:
        assert served.stop() == 0
    finally:
        reader.close()
        stream.close()
        follower.close()
    assert time.monotonic() - started < 10, "open streams held the shutdown"


def test_logs_over_http(fleet):
    served, port = fleet
    id_ = f"st-instance-{port}"
    marker = f"line-{uuid.uuid4().hex[:8]}"
    say(served, port, marker)
    wait_until(lambda: marker in served.api("GET", f"/api/instances/{id_}/logs").text)
    last = served.api("GET", f"/api/instances/{id_}/logs?tail=1")
    assert last.status_code == 200 and last.headers["content-type"].startswith("text/plain")
    assert last.text == marker + "\n"
    assert served.api("GET", f"/api/instances/{id_}/logs?tail=0").text == ""

    with httpx.stream("GET", served.url + f"/api/instances/{id_}/logs?tail=1&follow=1",
                      headers={"X-ST-Admin-Key": served.admin_key}, timeout=httpx.Timeout(10, read=30)) as live:
        lines = live.iter_lines()
        assert next(lines) == marker
        later = f"later-{uuid.uuid4().hex[:8]}"
        say(served, port, later)  # written after the stream was opened
        assert next(lines) == later

    for query, code, english, chinese in (
            ("tail=-1", "bad_tail", "tail must be a whole number from 0 to 10000, not -1",
             "tail 必须是 0 到 10000 之间的整数，而不是 -1"),
            ("tail=10001", "bad_tail", "tail must be a whole number from 0 to 10000, not 10001", None),
            ("follow=maybe", "bad_follow", "follow must be 1 or 0, not maybe", "follow 必须是 1 或 0，而不是 maybe")):
        answer = served.api("GET", f"/api/instances/{id_}/logs?{query}&lang=en")
        assert (answer.status_code, answer.json()) == (400, {"error": english, "code": code})
        if chinese:
            assert served.api("GET", f"/api/instances/{id_}/logs?{query}",
                              headers={"Accept-Language": "zh-CN"}).json() == {"error": chinese, "code": code}
    missing = served.api("GET", "/api/instances/st-instance-1/logs?lang=en")
    assert (missing.status_code, missing.json()) == (404, {"error": "Instance st-instance-1 not found", "code": "not_found"})


def test_cst_logs_prints_the_last_lines_and_follows(fleet):
    served, port = fleet
    project, id_ = served.project, f"st-instance-{port}"

    def logs(*args: str) -> list[str]:  # `cst logs` takes the file as --file: its -f is --follow
        return [sys.executable, "-m", "reconciler", "logs", *args, "--file", str(project.file)]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(logs(*args), cwd=project.dir, env=project.env, capture_output=True, text=True, timeout=60)

    first, second = (f"cli-{n}-{uuid.uuid4().hex[:6]}" for n in (1, 2))
    say(served, port, first)
    wait_until(lambda: first in run(id_).stdout)
    shown = run(id_, "-n", "1")
    assert (shown.returncode, shown.stdout) == (0, first + "\n")
    assert "stand-in SillyTavern is listening" in run(id_, "-n", "50").stdout
    unknown = run("st-instance-1999")
    assert unknown.returncode == 1 and "st-instance-1999 is not declared" in unknown.stderr
    assert run("nonsense").returncode == 1   # invalid input (README: exit codes)

    # Ctrl-C as at a terminal: SIGINT at its default in the follower even when this run inherited it
    # ignored (a shell's background job does), which the follower would inherit in turn
    follower = subprocess.Popen(logs(id_, "-n", "1", "-f"), cwd=project.dir, env=project.env, stdout=subprocess.PIPE,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert follower.stdout.readline() == first + "\n"
        say(served, port, second)
        assert follower.stdout.readline() == second + "\n"
    finally:
        follower.send_signal(signal.SIGINT)
        try:
            assert follower.wait(10) == 0
        finally:
            if follower.poll() is None:   # it did not stop: no process outlives the test
                follower.kill()
                follower.wait()


async def test_follow_reads_across_a_rotation(tmp_path: Path):
    log = tmp_path / "i.log"
    log.write_bytes(b"old 1\nold 2\n")
    got: list[bytes] = []
    reader = follow(log, 1, poll=0.01)
    got.append(await reader.__anext__())
    with open(log, "ab") as out:
        out.write(b"before rotation\n")
        out.flush()
        got.append(await reader.__anext__())
        out.write(b"unseen when rotated\n")
        out.flush()
        assert rotate_log(log, 10, 2)  # copied to .1, truncated in place, the writer carries on
        out.write(b"after rotation\n")
        out.flush()
    while b"after rotation" not in b"".join(got):
        got.append(await reader.__anext__())
    await cast(AsyncGenerator[bytes, None], reader).aclose()   # follow() is an async generator
    assert b"".join(got) == b"old 2\nbefore rotation\nunseen when rotated\nafter rotation\n"


def test_pool_is_relayed_from_the_proxy(project, serve):
    daidai_key = proxy_fakes().daidai_key
    keys = [daidai_key("sk-good-aaaa11112222", "12.50", "3.20"), daidai_key("sk-good-bbbb33334444", "10.00", "0.50")]
    with fake_daidai({"me@example.com": ("right", keys), "other@example.com": ("right", [])}) as base:
        api, = free_ports(1)
        accounts = "accounts:\n" + daidai_account("main", "me@example.com", base) + daidai_account(
            "broken", "other@example.com", base, password_env="WRONG_PASSWORD")
        project.write(standin_file([], settings=serve_settings(api)) + accounts)
        project.env.update(DAIDAI_PASSWORD="right", WRONG_PASSWORD="wrong")
        served = serve(api)
        def both_read() -> dict | None:   # an account is listed once its first refresh began
            doc = served.api("GET", "/api/pool").json()
            states = {name: account.get("state") for name, account in doc["accounts"].items()}
            return doc if states == {"main": "ok", "broken": "error"} else None
        pool = wait_until(both_read)
    proxy_port = re.search(r'proxy: \{listen: "127\.0\.0\.1:(\d+)"', project.file.read_text()).group(1)
    assert pool["running"] and pool["url"] == f"http://127.0.0.1:{proxy_port}/v1"
    assert pool["totalBalance"] == 22.5 and pool["keys"] == {"total": 2, "available": 2}
    main = pool["accounts"]["main"]
    assert [(k["key"], k["balance"], k["used"]) for k in main["keys"]] == [
        ("sk-go…2222", 12.5, 3.2), ("sk-go…4444", 10.0, 0.5)]
    assert "wrong email or password" in pool["accounts"]["broken"]["last_error"]
    text = served.api("GET", "/api/pool").text
    assert "aaaa1111" not in text and "bbbb3333" not in text, "a whole key left the proxy"


def test_free_port_and_where_each_instance_is_written(fleet):
    served, port = fleet
    suggested = served.api("GET", "/api/free-port").json()["port"]
    assert suggested > port
    desired = served.api("GET", "/api/desired").json()
    lines = desired["text"].splitlines()
    span = desired["instances"][f"st-instance-{port}"]
    assert lines[span["from"] - 1].strip() == f"- port: {port}" and lines[span["to"] - 1].strip() == "state: running"
    status = served.api("GET", "/api/status").json()
    assert status["daemon"]["archiveDir"] == str(served.project.state_dir / "archive")


@pytest.mark.parametrize("result, pid, expected", [
    (Result("st-instance-8001", "changed", "started", "stopped", "running", happened=H.STARTED), None,
     [("started", "")]),
    (Result("st-instance-8001", "changed", "restarted: settings changed", "running", "running", happened=H.RESTARTED),
     7, [("restarted", "settings changed")]),
    (Result("st-instance-8001", "changed", "restarted: process had exited", "crashed", "running",
            happened=H.RESTARTED), 7,
     [("crashed", "process 7 exited while it should be running"), ("restarted", "process had exited")]),
    (Result("st-instance-8001", "changed", "stopped", "running", "stopped", happened=H.STOPPED), 7, [("stopped", "")]),
    (Result("st-instance-8001", "changed", "removed; data archived in /a", "running", "absent", "/a",
            happened=H.REMOVED), 7, [("removed", "removed; data archived in /a")]),
    (Result("st-instance-8001", "failed", "did not start: boom", "crashed", happened=H.START_FAILED), 7,
     [("crashed", "process 7 exited while it should be running"), ("failed", "did not start: boom")]),
    (Result("st-instance-8001", "failed", "errored: failed 2 times in a row; next restart in 3s", "crashed",
            happened=H.HELD), 7, []),
    (Result("st-instance-8001", "ok", "adopted", "running", "running", happened=H.ADOPTED), 7, [("adopted", "")]),
    (Result("st-instance-8001", "ok", "", "running", "running"), 7, []),
    # decided by the kind, not the words: reworded details mean the same
    (Result("st-instance-8001", "failed", "backing off for a while", "crashed", happened=H.HELD), 7, []),
    (Result("st-instance-8001", "ok", "found it running", "running", "running", happened=H.ADOPTED), 7,
     [("adopted", "")]),
    (Result("st-instance-8001", "changed", "restarted", "running", "running", happened=H.RESTARTED), 7,
     [("restarted", "restarted")]),
    (Result("st-instance-8001", "changed", "restarted? no: started", "stopped", "running", happened=H.STARTED), 7,
     [("started", "")]),
])
def test_what_a_reconcile_result_means_to_a_watcher(result, pid, expected):
    assert changes(result, pid) == expected


def test_a_failure_that_repeats_is_published_once_and_replay_knows_its_limits():
    hub = EventHub(pool=lambda: {})
    taken = Result("st-instance-8001", "failed", "port 8001 is held by another process (pid 9)", "port-taken",
                   happened=H.IMPOSSIBLE)
    installed = Result("sillytavern 1.19.0", "changed", "installed", happened=H.RELEASE_READY)
    for _ in range(3):
        hub.passed(Report(results=[taken, installed]), "t", 1.0)
    names = [(e.name, e.data.get("change")) for e in hub.since(f"{hub.run}-0")]
    assert names == [("instance", "failed"), ("reconcile", None)]
    assert hub.last_failure["st-instance-8001"]["reason"] == taken.detail
    removed = Result("st-instance-8001", "changed", "removed; no data", "stopped", "absent", happened=H.REMOVED)
    hub.passed(Report(results=[removed]), "t", 1.0)
    assert "st-instance-8001" not in hub.last_failure
    first = hub.last_id
    for n in range(KEEP + 5):
        hub.publish("pool", {"n": n})
    assert hub.since(first) is None, "the events after it are no longer all kept"
    assert [e.data["n"] for e in hub.since(f"{hub.run}-{hub._seq - 2}")] == [KEEP + 3, KEEP + 4]
    assert hub.since(hub.last_id) == [] and hub.since(f"{hub.run}-{hub._seq + 1}") is None


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
    other_digits: dict[str, Any] = {**headers, "Last-Event-ID": f"{run}-²".encode()}   # sent as UTF-8
    with httpx.stream("GET", served.url + "/api/events", timeout=10,
                      headers=other_digits) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        seen = [next(lines) for _ in range(3)]
    assert any(line.startswith("event:") and "reset" in line for line in seen), seen
    assert not any("500" in line or "HTTP/" in line for line in seen), seen
