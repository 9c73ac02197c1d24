"""Parking idle instances and waking them on their first request (issue 19), on the stand-in.

One `cst serve` with four instances, each with ``park_after: 2s``: while a 60 s chat stream of one
instance's proxy key runs at the key pool (and keeps that instance awake), the others are parked,
refused without credentials, woken by ten requests at once, kept awake by a slow answer through
the edge, and fail to wake into a 503 and the crash backoff. Then, with `cst serve` stopped, the
edge still holds every port and answers a parked instance's users 503 with ``Retry-After``; a new
`cst serve` finds it parked, and ``state: stopped`` frees the port.
"""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import httpx
import openai

from conftest import STANDIN, EventReader, fake_upstream, free_ports, serve_settings, standin_file, wait_until
from reconciler.runtime.processes import port_is_free
from reconciler.runtime.snapshots import Snapshots
from reconciler.runtime.statedir import StateDir

POOL_KEY = "sk-good-parking-0000000001"
STREAM_CHUNKS = 300            # 0.2 s apart at the fake upstream: a 60 s chat stream


def starts(project, port: int) -> list[str]:
    """The pids the stand-in on ``port`` was started as (it appends one at each start)."""
    path = project.dir / "user-data" / str(port) / "default-user" / "starts.txt"
    return path.read_text().split() if path.exists() else []


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def password(project, port: int) -> str:
    return (project.state_dir / "secrets" / f"st-instance-{port}.password").read_text().strip()


def observed(served, port: int) -> dict:
    return served.api("GET", f"/api/instances/st-instance-{port}").json()


def idle_parks_since(events: EventReader, port: int, since: int) -> list[dict]:
    """The instance's ``parked`` events for being idle, among the ``since``-th event and later (not
    the first pass's "parked: not in use", which may be told after a test's first steps)."""
    return [e for e in list(events.events)[since:] if e.get("event") == "instance"
            and e["data"] == {**e["data"], "id": f"st-instance-{port}", "change": "parked"}
            and e["data"]["detail"].startswith("idle")]


class ChatStream(threading.Thread):
    """A streamed chat completion with an instance's proxy key, read to its end."""

    def __init__(self, proxy: int, key: str):
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{proxy}/v1", api_key=key, max_retries=0,
                                    timeout=120)
        self.chunks = 0
        self.first = threading.Event()
        self.ended_at: float | None = None   # wall clock, as events say "at"

    def run(self) -> None:
        stream = self.client.chat.completions.create(
            model="slow-stream", stream=True, messages=[{"role": "user", "content": "a long answer, please"}])
        for _ in stream:
            self.chunks += 1
            self.first.set()
        self.ended_at = time.time()


def test_idle_instances_park_and_wake_on_their_first_request(project, serve):
    api, proxy, a, b, c, d = free_ports(6)
    with fake_upstream(chunks=STREAM_CHUNKS, slow_gap=0.2) as upstream:
        project.write(standin_file(
            [(a, "running"), (b, "running"), (c, "running"), (d, "running")],
            settings=(f'resync: 1s\napi: {{listen: "127.0.0.1:{api}"}}\n'
                      f'proxy: {{listen: "127.0.0.1:{proxy}", upstream: "{upstream.url}/v1"}}'),
            extra_instance={port: {"park_after": "2s"} for port in (a, b, c, d)})
            + "accounts:\n  - {name: main, provider: static, keys_env: POOL_KEYS}\n")
        project.env["POOL_KEYS"] = POOL_KEY
        served = serve(api)
        events = EventReader(served)
        try:
            # instances with park_after are parked from the first: nobody used them yet
            wait_until(lambda: all(observed(served, p)["observed"] == "parked" for p in (a, b, c, d)), timeout=30)
            assert [starts(project, p) for p in (a, b, c, d)] == [[]] * 4

            # b: a chat of its proxy key in flight at the pool keeps it awake past park_after
            woke_b = served.api("POST", f"/api/instances/st-instance-{b}/wake")
            assert woke_b.json().get("observed") == "running", woke_b.text
            pid_b, woken_b, starts_b = observed(served, b)["pid"], len(events.events), starts(project, b)
            key = (project.state_dir / "secrets" / "proxy-keys" / f"st-instance-{b}").read_text().strip()
            stream = ChatStream(proxy, key)
            stream.start()
            assert stream.first.wait(15), "the chat stream did not begin"
            assert observed(served, b)["pid"] == pid_b, "b was parked before its stream began"

            # a: parked, its port held by cst serve, no process
            row = observed(served, a)
            assert row["status"] == "online" and row["pid"] is None and row["memory"] is None and row["parkAfter"] == 2
            assert not port_is_free("127.0.0.1", a) and accepts(a)
            started = starts(project, a)

            # without the credentials: a 401 from the edge, and nothing wakes
            bare = httpx.get(f"http://127.0.0.1:{a}/", timeout=10)
            assert bare.status_code == 401 and bare.headers["WWW-Authenticate"].startswith("Basic")
            wrong = httpx.get(f"http://127.0.0.1:{a}/", auth=(f"st-instance-{a}", "not-it"), timeout=10)
            assert wrong.status_code == 401
            assert observed(served, a)["observed"] == "parked" and starts(project, a) == started

            # ten requests at once with them: one start, ten of SillyTavern's own answers
            auth = (f"st-instance-{a}", password(project, a))
            with ThreadPoolExecutor(10) as pool:
                answers = list(pool.map(lambda _: httpx.get(f"http://127.0.0.1:{a}/", auth=auth, timeout=30),
                                        range(10)))
            assert [r.status_code for r in answers] == [200] * 10
            assert all("stand-in SillyTavern" in r.text for r in answers)
            assert len(starts(project, a)) == 1
            woken = events.wait_for("instance", id=f"st-instance-{a}", change="woken")
            assert woken["data"]["detail"].startswith("in ")
            assert observed(served, a)["observed"] == "running"

            # c: an answer still streaming through the edge keeps it awake past park_after
            served.api("POST", f"/api/instances/st-instance-{c}/wake")
            pid_c = observed(served, c)["pid"]
            seen_before = len(events.events)
            began = time.monotonic()
            with httpx.stream("GET", f"http://127.0.0.1:{c}/standin/stream?seconds=5",
                              auth=(f"st-instance-{c}", password(project, c)), timeout=30) as slow:
                ticks = sum(1 for line in slow.iter_lines() if line == "tick")
            assert ticks >= 20 and time.monotonic() - began >= 5
            assert observed(served, c)["pid"] == pid_c and not idle_parks_since(events, c, seen_before)
            wait_until(lambda: observed(served, c)["observed"] == "parked", timeout=10)

            # d: a wake that fails answers 503, and the next request meets the backoff, not a new start
            wait_until(lambda: observed(served, d)["observed"] == "parked", timeout=15)
            project.standin_knobs(d, {"exitCode": 3})
            auth_d = (f"st-instance-{d}", password(project, d))
            failed = httpx.get(f"http://127.0.0.1:{d}/", auth=auth_d, timeout=30)
            assert failed.status_code == 503 and "exited with code 3" in failed.text
            assert int(failed.headers["Retry-After"]) >= 1
            again = httpx.get(f"http://127.0.0.1:{d}/", auth=auth_d, timeout=30)
            assert again.status_code == 503 and "failed 1 times in a row" in again.text
            project.standin_knobs(d, {})
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{d}/", auth=auth_d, timeout=30).status_code == 200,
                       timeout=20, interval=0.5)

            # cst status and cst apply report it parked, as ok; apply does not wake it
            wait_until(lambda: observed(served, a)["observed"] == "parked", timeout=10)
            assert project.status()[f"st-instance-{a}"]["status"] == "parked"
            applied = project.cst("apply")
            assert applied.returncode == 0 and f"ok: st-instance-{a} (parked)" in applied.stdout, applied.stdout
            assert "no cst serve runs" not in applied.stderr   # cst serve runs: it wakes them
            assert len(starts(project, a)) == 1 and observed(served, a)["observed"] == "parked"

            # b stayed awake for its whole stream, the same process throughout; then it parks
            stream.join(timeout=90)
            assert stream.chunks >= STREAM_CHUNKS and stream.ended_at is not None
            # (the steps above may outlast it on a busy machine: b then parks while they go on)
            (first_park, *_) = wait_until(lambda: idle_parks_since(events, b, woken_b), timeout=10)
            parked_at = datetime.fromisoformat(first_park["data"]["at"].replace("Z", "+00:00")).timestamp()
            assert parked_at >= stream.ended_at + 1, "b was parked while its stream ran"
            assert len(starts_b) == 1 and starts(project, b) == starts_b
        finally:
            events.close()

        # cst serve away: the edge still holds every port; a parked instance answers 503 with
        # Retry-After (never a refused connection) and is not woken; a running one goes on answering
        served.stop()
        assert accepts(a) and not port_is_free("127.0.0.1", a)
        asleep = httpx.get(f"http://127.0.0.1:{a}/", auth=auth, timeout=10)
        assert asleep.status_code == 503 and int(asleep.headers["Retry-After"]) >= 1
        assert httpx.get(f"http://127.0.0.1:{a}/", timeout=10).status_code == 401
        alone = project.cst("apply")   # without cst serve nothing parks or wakes: said, and nothing woken
        assert alone.returncode == 0 and "no cst serve runs" in alone.stderr, alone.stderr
        assert len(starts(project, a)) == 1
        served = serve(api)
        assert observed(served, a)["observed"] == "parked" and len(starts(project, a)) == 1

        # the API parks and wakes by hand; state: stopped frees the port (the edge lets it go)
        assert served.api("POST", f"/api/instances/st-instance-{a}/wake").json()["observed"] == "running"
        assert len(starts(project, a)) == 2
        assert served.api("POST", f"/api/instances/st-instance-{a}/park").json()["observed"] == "parked"
        stopped = served.api("POST", f"/api/instances/st-instance-{a}/stop")
        assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
        wait_until(lambda: port_is_free("127.0.0.1", a), timeout=10)
        refused = served.api("POST", f"/api/instances/st-instance-{a}/park?lang=en")
        assert refused.status_code == 409 and "park_after" in refused.json()["error"]


def test_a_parked_instance_wakes_on_the_new_release_with_a_snapshot_first(project, serve):
    """A release change while parked is no rollout turn: the instance stays parked (never two
    copies of one data dir) and moves when it next wakes, its data kept in a snapshot first."""
    api, port = free_ports(2)
    id_ = f"st-instance-{port}"
    newer = project.dir / "newer" / "server.js"   # the same server elsewhere: another release
    newer.parent.mkdir()
    shutil.copy(STANDIN, newer)

    def write(server) -> None:
        project.write(standin_file([(port, "running")], settings=serve_settings(api),
                                   extra_instance={port: {"park_after": "1s"}}).replace(str(STANDIN), str(server)))
    write(STANDIN)
    served = serve(api)
    wait_until(lambda: observed(served, port)["observed"] == "parked", timeout=15)   # its password made
    auth = (id_, password(project, port))
    assert httpx.get(f"http://127.0.0.1:{port}/", auth=auth, timeout=30).status_code == 200   # its data now
    wait_until(lambda: observed(served, port)["observed"] == "parked", timeout=15)
    write(newer)
    wait_until(lambda: project.cst("apply", "--check").stdout.count(f"ok: {id_} (parked)") == 1, timeout=10)
    assert observed(served, port)["observed"] == "parked" and len(starts(project, port)) == 1

    answer = httpx.get(f"http://127.0.0.1:{port}/", auth=auth, timeout=30)
    assert answer.status_code == 200 and len(starts(project, port)) == 2
    record = json.loads((project.state_dir / "instances" / f"{id_}.json").read_text())
    assert record["release"] == f"server {newer}"
    (taken,) = Snapshots(StateDir(project.state_dir)).list(id_)
    assert taken.reason == "rollout" and (taken.tree / "default-user" / "starts.txt").read_text().split() == \
        starts(project, port)[:1]
