"""The proxy against a faulty upstream and a faulty key platform: the client gets a clean error or a
clean end of stream, keys are judged fairly, and no task or connection is left behind."""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))  # the proxy tests' fakes and fixtures

from fakes import FakeDaiDai, FakeUpstream, daidai_key
from proxy_fixtures import MakeProxy, daidai, env, make_proxy, sdk, static_account, upstream

from conftest import eventually
from proxy import accounts

CUT, SLOW, GOOD = "sk-cut-aaaaaaaaaaaa0001", "sk-slow-bbbbbbbbbbbb0002", "sk-good-cccccccccccc0003"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _inotify_open() -> bool:
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                return True
        except OSError:
            continue
    return False


async def baseline() -> tuple[int, int]:
    """Descriptors and tasks once the proxy is in its steady state: its watch on the instance-key
    folder (an inotify, set up by a task of its own after start) in place."""
    await eventually(_inotify_open, failure=lambda: "the proxy never began to follow its key folder")
    return open_fds(), len(asyncio.all_tasks())


async def settled(fds: int, tasks: int) -> None:
    """Wait until this process holds no more descriptors and tasks than it did at the baseline."""
    await eventually(lambda: open_fds() <= fds and len(asyncio.all_tasks()) <= tasks,
                     failure=lambda: f"leak: {open_fds()} descriptors (was {fds}), {len(asyncio.all_tasks())} tasks (was {tasks})")


class SilentUpstream:
    """Accepts connections, reads whatever comes, never answers."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0

    async def start(self) -> "SilentUpstream":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        try:
            while await reader.read(65536):
                pass  # until the caller hangs up
        finally:
            self.open -= 1
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_an_upstream_that_accepts_and_never_answers(make_proxy: MakeProxy, env) -> None:
    silent = await SilentUpstream().start()
    env("KEYS", "sk-one-aaaaaaaaaaaa0001,sk-two-bbbbbbbbbbbb0002")
    proxy = await make_proxy(static_account("main", "KEYS"), upstream_url=silent.url, timeout="0.3s")
    fds, tasks = await baseline()
    client = sdk(proxy)
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="gpt-fake", messages=[])
        assert info.value.status_code == 504 and info.value.body["code"] == "upstream_timeout"  # type: ignore[index]  # the error's JSON body
    await client.close()
    assert silent.accepted == 3   # written once each, so never sent again on the other key
    # every key timed out within moments: the upstream is down, not the keys, so none is benched for long
    now = proxy.state.pool.clock()
    assert all(k.cooldown_until <= now + 1.5 and not k.quarantined for k in proxy.state.pool.keys())
    await eventually(lambda: silent.open == 0, failure=lambda: "every connection to the silent upstream is closed")
    await settled(fds, tasks)
    await silent.stop()


async def test_a_stream_cut_half_way_or_stalled_ends_in_a_clean_error(make_proxy: MakeProxy, upstream: FakeUpstream,
                                                                      env) -> None:
    upstream.chunks, upstream.slow_gap = 6, 5.0  # the slow key stalls far longer than the proxy waits
    env("KEYS", f"{CUT},{SLOW},{GOOD}")
    proxy = await make_proxy(static_account("main", "KEYS"), timeout="0.5s")
    client = sdk(proxy)
    for key in (CUT, SLOW, GOOD):  # round robin: each key once, without streaming all answer; pooled connections
        warm = await client.chat.completions.create(model="gpt-fake", messages=[])
        assert warm.choices[0].message.content.endswith(f"[{key[-4:]}]")
    await client.close()
    fds, tasks = await baseline()
    client = sdk(proxy)
    for broken, already in ((CUT, 3), (SLOW, 1)):
        stream = await client.chat.completions.create(model="gpt-fake", stream=True, messages=[])
        words = []
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                words.append(chunk.choices[0].delta.content)
        assert words == [f"w{i} " for i in range(already)], broken
        assert "the upstream's answer broke off" in info.value.message
    chat = await client.chat.completions.create(model="gpt-fake", messages=[])
    assert chat.choices[0].message.content.endswith("[0003]")
    await client.close()
    keys = {k.value: k for k in proxy.state.pool.keys()}
    now = proxy.state.pool.clock()
    for key in (CUT, SLOW):
        assert keys[key].failures == 0 and keys[key].available(now), "a cut upstream is not a bad key"
    assert proxy.state.forwarder.stats.upstream_cuts == 2
    await eventually(lambda: upstream.cancelled == 1, failure=lambda: "the stalled upstream request is hung up on")
    await settled(fds, tasks)


async def test_a_platform_that_times_out_or_answers_garbage(make_proxy: MakeProxy, daidai: FakeDaiDai,
                                                            upstream: FakeUpstream, env, monkeypatch) -> None:
    monkeypatch.setattr(accounts, "HTTP_TIMEOUT", aiohttp.ClientTimeout(total=0.3))
    daidai.add_account("me@example.com", "pw", [daidai_key(GOOD)])
    env("DAIDAI_PW", "pw")
    proxy = await make_proxy(f"- {{name: dd, provider: daidai, email: me@example.com, password_env: DAIDAI_PW, "
                             f"api_base: \"{daidai.url}\", refresh: 0.2s}}")
    status = proxy.state.accounts.status

    async def until(predicate) -> None:
        await eventually(predicate, failure=lambda: f"not reached; account status {status()}")

    await until(lambda: status()["dd"]["keys"] == 1 and status()["dd"]["last_error"] is None)
    client = sdk(proxy)
    assert (await client.chat.completions.create(model="gpt-fake", messages=[])).choices[0].message.content
    await client.close()
    lists = daidai.lists
    await until(lambda: daidai.lists > lists + 2)  # a few refreshes: pooled connections, steady state
    fds, tasks = await baseline()
    for fault, error in (("hang", "platform unreachable: TimeoutError"), ("garbage", "key list failed: HTTP 200"),
                         ("wrong-shape", "key list failed: HTTP 200")):
        daidai.fault = fault
        await until(lambda: status()["dd"]["last_error"] == error)
        client = sdk(proxy)  # the last good keys keep serving
        assert (await client.chat.completions.create(model="gpt-fake", messages=[])).choices[0].message.content
        await client.close()
    daidai.fault = None
    await until(lambda: status()["dd"]["last_error"] is None and status()["dd"]["keys"] == 1)
    assert "task_error" not in status()["dd"], "every fault was a refresh error, none escaped the source"
    await settled(fds, tasks)
