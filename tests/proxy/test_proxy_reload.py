"""desired.yaml edits reach the running proxy in place (the `cst proxy` watch loop)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import pytest
from fakes import FakeUpstream
from proxy_fixtures import desired_text, env, static_account, upstream

from conftest import eventually
from ports import free_port
from proxy.cli import follow
from proxy.service import ProxyService
from reconciler.desired.model import load

ROOT = Path(__file__).resolve().parents[2]
OLD = "sk-slow-oldoldoldold0001"
NEW = "sk-good-newnewnewnew0002"


def inotify_watches() -> int:
    """How many inotify instances this process holds: each file watcher (watchfiles) opens one."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):   # a descriptor closed while listed
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
    return count


def write_atomically(path: Path, text: str) -> None:
    # As editors and `cst`'s own writer do: temp file, then rename over the original.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_editing_accounts_while_a_stream_is_in_flight(tmp_path: Path, upstream: FakeUpstream, env,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    env("OLD_KEYS", OLD)
    env("NEW_KEYS", NEW)
    upstream.chunks = 10  # 10 chunks, 200 ms apart: a 1.8 s stream
    port = free_port()
    path = tmp_path / "desired.yaml"
    path.write_text(desired_text(upstream.url, static_account("old", "OLD_KEYS"), port))
    service = ProxyService(load(path))
    watches = inotify_watches()
    await service.start()
    # the proxy follows its key folder with an inotify of its own, set up by a task after start
    await eventually(lambda: inotify_watches() > watches, failure=lambda: "the proxy never followed its key folder")
    watches = inotify_watches()
    stop = asyncio.Event()
    watcher = asyncio.create_task(follow(path, service, stop))
    client = openai.AsyncOpenAI(base_url=service.url + "/v1", api_key="x", max_retries=0)
    try:
        await eventually(lambda: inotify_watches() > watches, failure=lambda: "the watcher never followed the file")
        stream = await client.chat.completions.create(model="gpt-fake", stream=True, messages=[])
        pieces: list[str] = []
        edited = False
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if len(pieces) == 2 and not edited:
                edited = True
                # An invalid edit first: logged with file:line, nothing changes.
                write_atomically(path, desired_text(upstream.url, "- {name: broken, provider: nope}", port))
                await eventually(lambda: "is invalid" in caplog.text)
                assert [k.value for k in service.state.pool.keys()] == [OLD]
                # Then the real edit: the old account goes, a new one comes.
                write_atomically(path, desired_text(upstream.url, static_account("new", "NEW_KEYS"), port))
                await eventually(lambda: [k.value for k in service.state.pool.keys()] == [NEW])
        assert edited
        assert "".join(pieces) == "".join(f"w{i} " for i in range(10)), "the stream in flight completed"
        assert f"{path}:" in caplog.text and "accounts[0].provider" in caplog.text

        chat = await client.chat.completions.create(model="gpt-fake", messages=[])
        assert chat.choices[0].message.content.endswith("[0002]")
        assert upstream.keys_seen() == [OLD, NEW]
    finally:
        await client.close()
        stop.set()
        await asyncio.wait_for(watcher, 5)
        await service.stop()


async def test_cst_proxy_runs_standalone_and_stops_on_sigterm(tmp_path: Path, upstream: FakeUpstream) -> None:
    port = free_port()
    path = tmp_path / "desired.yaml"
    path.write_text(desired_text(upstream.url, static_account("main", "CST_TEST_KEYS"), port))
    env = {**os.environ, "CST_TEST_KEYS": "sk-good-subprocess0003", "CST_FILE": str(path)}
    code = "from proxy.cli import proxy_command; proxy_command()"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as http:
            answers: list[dict] = []

            async def up() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                        answers.append(await resp.json())
                        return True
                except aiohttp.ClientConnectionError:
                    return False
            await eventually(up, failure=lambda: "the proxy did not come up")
            health = answers[-1]
            assert health["keys"]["available"] == 1
            async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "m"}) as resp:
                assert (await resp.json())["choices"][0]["message"]["content"].endswith("[0003]")
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=10)
        assert proc.returncode == 0, out
        assert b"stopping the proxy" in out
        assert b"sk-good-subprocess0003" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cst_proxy_refuses_an_invalid_file_with_its_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from proxy.cli import proxy_command
    path = tmp_path / "desired.yaml"
    path.write_text("version: 1\naccounts:\n  - {name: x, provider: static}\n")
    result = CliRunner().invoke(proxy_command, ["-f", str(path)])
    assert result.exit_code == 1
    assert f"{path}:3" in result.output


async def test_apply_moves_listen_upstream_and_limits_in_place(tmp_path: Path, upstream: FakeUpstream, env) -> None:
    env("KEYS", "sk-500-aaaaaaaaaaaa,sk-500-bbbbbbbbbbbb,sk-good-cccccccccccc")
    second = await FakeUpstream().start()
    path = tmp_path / "desired.yaml"
    accounts = static_account("main", "KEYS")
    path.write_text(desired_text(upstream.url, accounts, free_port(), "max_attempts: 1"))
    service = ProxyService(load(path))
    await service.start()
    try:
        old_url = service.url
        async with aiohttp.ClientSession() as http:
            async with http.post(old_url + "/v1/chat/completions", json={"model": "m"}) as resp:
                assert resp.status == 500, "one attempt only"
            new_port = free_port()
            path.write_text(desired_text(second.url, accounts, new_port, "max_attempts: 3"))
            await service.apply(load(path))
            assert service.port == new_port
            async with http.post(service.url + "/v1/chat/completions", json={"model": "m"}) as resp:
                assert resp.status == 200
                assert (await resp.json())["choices"][0]["message"]["content"].endswith("[cccc]")
        async with aiohttp.ClientSession() as fresh:  # not the kept-alive connection of before
            with pytest.raises(aiohttp.ClientConnectionError):
                async with fresh.get(old_url + "/health"):
                    pass
        assert second.keys_seen()[-1] == "sk-good-cccccccccccc"
        assert len(upstream.seen) == 1
    finally:
        await service.stop()
        await second.stop()


async def test_a_taken_port_fails_start_cleanly(tmp_path: Path, upstream: FakeUpstream, env) -> None:
    env("KEYS", "sk-good-xxxxxxxxxxxx")
    first_path, second_path = tmp_path / "a.yaml", tmp_path / "b.yaml"
    port = free_port()
    first_path.write_text(desired_text(upstream.url, static_account("main", "KEYS"), port))
    second_path.write_text(desired_text(upstream.url, static_account("main", "KEYS"), port))
    first = ProxyService(load(first_path))
    await first.start()
    try:
        second = ProxyService(load(second_path))
        with pytest.raises(OSError):
            await second.start()
        assert second.state is not None and second.state.accounts.status() == {}, "its account tasks were stopped"
    finally:
        await first.stop()
