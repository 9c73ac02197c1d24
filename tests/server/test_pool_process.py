"""The key pool as a process of its own beside `cst serve` (reconciler/server/pool_process.py): started
and recorded, adopted by the next cst serve so that a chat in flight outlives a restart, started again
when it dies, and asked on its control socket for what the API shows. Real processes throughout."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil

from conftest import (
    fake_upstream,
    free_ports,
    http_status,
    processes_of,
    standin_file,
    start_serve,
    wait_until,
)

POOL_KEY = "sk-good-poolprocess00001"
CLIENT_KEY = "client-key-pool-process"
CHUNKS, GAP = 20, 0.5   # the slow stream: ~10 s


def settings(api: int, proxy: int, upstream: str) -> str:
    return (f'resync: 1s\napi: {{listen: "127.0.0.1:{api}"}}\n'
            f'proxy: {{listen: "127.0.0.1:{proxy}", upstream: "{upstream}/v1", client_keys_env: CLIENT_KEYS}}')


ACCOUNTS = "accounts:\n  - {name: main, provider: static, keys_env: POOL_KEYS}\n"


def pool_project(project, api: int, proxy: int, upstream: str, instances=()) -> None:
    project.write(standin_file(list(instances), settings=settings(api, proxy, upstream)) + ACCOUNTS)
    project.env["POOL_KEYS"] = POOL_KEY
    project.env["CLIENT_KEYS"] = CLIENT_KEY


def record_of(project) -> dict:
    return json.loads((project.state_dir / "proxy" / "process.json").read_text())


def proxies_of(project) -> list[psutil.Process]:
    """The live key-pool proxy processes started for the project's state dir."""
    return [p for p in processes_of(project.state_dir.resolve()) if "proxy.cli" in " ".join(p.cmdline())]


def answers(proxy: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{proxy}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class SlowChat(threading.Thread):
    """A streamed chat through the pool with the official SDK, read to its end."""

    def __init__(self, proxy: int):
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{proxy}/v1", api_key=CLIENT_KEY, max_retries=0,
                                    timeout=120)
        self.words: list[str] = []
        self.first = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            stream = self.client.chat.completions.create(
                model="slow-stream", stream=True, messages=[{"role": "user", "content": "a long answer"}])
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    self.words.append(chunk.choices[0].delta.content)
                    self.first.set()
        except BaseException as exc:   # said by the test
            self.error = exc


def test_serve_starts_the_pool_as_a_process_of_its_own_and_records_it(project, serve):
    api, proxy = free_ports(2)
    with fake_upstream() as upstream:
        pool_project(project, api, proxy, upstream.url)
        served = serve(api)
        record = record_of(project)
        pid = record["pid"]
        assert pid != served.proc.pid and [p.pid for p in proxies_of(project)] == [pid]
        process = psutil.Process(pid)
        assert abs(process.create_time() - record["create_time"]) < 0.05
        assert process.cmdline() == record["argv"] and record["listen"] == f"127.0.0.1:{proxy}"
        assert record["file"] == str(project.file.resolve())
        assert os.getsid(pid) == pid != os.getsid(served.proc.pid)   # a session of its own
        # no secret on its command line; what the file names for them reaches it through its environment
        assert POOL_KEY not in " ".join(process.cmdline()) and CLIENT_KEY not in " ".join(process.cmdline())
        assert process.environ()["POOL_KEYS"] == POOL_KEY
        control = Path(record["control"])
        assert stat.S_IMODE(control.stat().st_mode) == 0o600 and stat.S_ISSOCK(control.stat().st_mode)
        assert stat.S_IMODE(control.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE((project.state_dir / "proxy" / "process.json").stat().st_mode) == 0o600
        log = project.state_dir / "logs" / "proxy.log"
        assert "proxy listening on" in log.read_text()
        assert httpx.post(f"http://127.0.0.1:{proxy}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                          json={"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
        # the file changed: the proxy follows it itself (a second account)
        project.env["MORE_KEYS"] = "sk-good-more0000000001"   # not in its environment: the account has no keys
        project.write(project.file.read_text() + "  - {name: more, provider: static, keys_env: MORE_KEYS}\n")
        wait_until(lambda: "more" in served.api("GET", "/api/pool").json()["accounts"], timeout=20)


def test_a_chat_in_flight_outlives_a_restart_of_serve_which_adopts_the_same_proxy(project, serve):
    api, proxy = free_ports(2)
    with fake_upstream(chunks=CHUNKS, slow_gap=GAP) as upstream:
        pool_project(project, api, proxy, upstream.url)
        served = serve(api)
        pid = record_of(project)["pid"]
        down: list[float] = []
        watching = threading.Event()

        def watch_port() -> None:   # the pool's port answers throughout
            while not watching.is_set():
                if not answers(proxy):
                    down.append(time.monotonic())
                watching.wait(0.1)   # the sampling period, ended at once when the watch stops
        watcher = threading.Thread(target=watch_port, daemon=True)
        watcher.start()
        chat = SlowChat(proxy)
        chat.start()
        assert chat.first.wait(30), chat.error
        assert served.stop() == 0   # SIGTERM
        assert chat.is_alive() and answers(proxy)
        again = serve(api, log_name="serve-again.log")
        assert record_of(project)["pid"] == pid and [p.pid for p in proxies_of(project)] == [pid]
        assert "adopted the key-pool proxy" in again.log.read_text()
        chat.join(60)
        watching.set()
        watcher.join(5)
        assert chat.error is None and not chat.is_alive()
        assert chat.words == [f"w{i} " for i in range(CHUNKS)]   # every chunk, in order
        assert down == []
        assert again.api("GET", "/api/pool").json()["running"] is True
        assert [p.pid for p in proxies_of(project)] == [pid]


def test_a_killed_proxy_is_started_again(project, serve):
    api, proxy = free_ports(2)
    with fake_upstream() as upstream:
        pool_project(project, api, proxy, upstream.url)
        served = serve(api)
        first = record_of(project)["pid"]
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: record_of(project)["pid"] != first and answers(proxy), timeout=30)
        second = record_of(project)["pid"]
        assert [p.pid for p in proxies_of(project)] == [second]
        assert f"the key-pool proxy (pid {first}) exited" in served.log.read_text()
        assert served.api("GET", "/api/pool").json()["running"] is True


def test_the_api_reads_pool_usage_and_metrics_through_the_control_socket(project, serve):
    api, proxy, a = free_ports(3)
    id_ = f"st-instance-{a}"
    with fake_upstream() as upstream:
        pool_project(project, api, proxy, upstream.url, [(a, "running")])
        served = serve(api)
        wait_until(lambda: http_status(a) == 401, timeout=30)
        key = (project.state_dir / "secrets" / "proxy-keys" / id_).read_text().strip()
        answer = httpx.post(f"http://127.0.0.1:{proxy}/v1/chat/completions", timeout=30,
                            headers={"Authorization": f"Bearer {key}"},
                            json={"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200
        pool = served.api("GET", "/api/pool").json()
        assert pool["running"] is True and pool["url"] == f"http://127.0.0.1:{proxy}/v1"
        assert pool["keys"] == {"total": 1, "available": 1} and pool["accounts"]["main"]["state"] == "ok"
        row = served.api("GET", f"/api/instances/{id_}").json()
        assert row["usage"]["today"]["requests"] == 1 and row["budget"] is None
        listing = served.api("GET", "/api/instances").json()
        assert [r["usage"] for r in listing] == [row["usage"]]
        assert served.api("GET", "/api/usage").json()["instances"][id_]["today"]["requests"] == 1
        today = served.api("GET", "/api/usage").json()["window"]["day"]
        wait_until(lambda: served.api("GET", f"/api/usage?from={today}&instance={id_}").json()["days"], timeout=10)
        days = served.api("GET", f"/api/usage?from={today}&instance={id_}").json()["days"]
        assert [(d["instance"], d["requests"]) for d in days] == [(id_, 1)]
        metrics = served.api("GET", "/metrics").text
        assert "cst_proxy_answer_seconds_count 1.0" in metrics and "cst_instances{" in metrics
        # the proxy stopped (not gone): the API says it does not run, within a call's timeout
        pid = record_of(project)["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            assert served.api("GET", "/api/pool").json()["running"] is False
            assert served.api("GET", f"/api/instances/{id_}").json()["usage"] is None
            assert served.api("GET", "/api/usage").status_code == 503
        finally:
            os.kill(pid, signal.SIGCONT)
        assert served.api("GET", "/api/pool").json()["running"] is True


def test_a_proxy_that_cannot_start_fails_serve_with_its_words_and_leaves_nothing(project):
    api, proxy = free_ports(2)
    project.write(standin_file([], settings=settings(api, proxy, "http://127.0.0.1:9")) + ACCOUNTS)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", proxy))
        taken.listen()
        done = subprocess.run([sys.executable, "-m", "reconciler", "serve", "-f", str(project.file)],
                              cwd=project.dir, env={**project.env, "CST_ADMIN_KEY": "k"}, capture_output=True,
                              text=True, timeout=90)
    assert done.returncode != 0
    assert f"cannot start the key-pool proxy on 127.0.0.1:{proxy} (settings.proxy.listen)" in done.stderr
    assert "Traceback" not in done.stderr
    assert proxies_of(project) == [] and not (project.state_dir / "proxy" / "process.json").exists()
    assert http_status(api) == 0
    served = start_serve(project, api)   # the port free again: it starts
    try:
        assert answers(proxy)
    finally:
        served.stop()
