"""Instance keys at the proxy: who is calling, what each caller used, and revocation."""
from __future__ import annotations

import time
from typing import Any

import aiohttp
import openai
import pytest
from fakes import PROMPT_TOKENS, FakeUpstream
from openai.types.chat import ChatCompletionMessageParam
from proxy_fixtures import MakeProxy, env, make_proxy, sdk, static_account, upstream

from conftest import eventually
from proxy.budget import UsageBook
from proxy.calendar import Calendar
from proxy.ledger import Row
from proxy.usage import Meter
from reconciler.runtime.instance_keys import InstanceKeys
from reconciler.runtime.statedir import StateDir

GOOD = "sk-good-aaaaaaaaaaaaaaaa1111"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


async def get(service, path: str, key: str | None = None) -> tuple[int, Any]:   # a JSON body or text
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http, http.get(service.url + path, headers=headers) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


async def refused(service, key: str) -> bool:
    status, body = await get(service, "/v1/models", key)
    return status == 401


async def test_instance_keys_name_the_caller_and_count_its_use(make_proxy: MakeProxy, upstream: FakeUpstream,
                                                               env, tmp_path) -> None:
    env("KEYS", GOOD)
    proxy = await make_proxy(static_account("main", "KEYS"), closed=True)
    # no key exists yet: closed all the same
    assert (await get(proxy, "/v1/models", "whatever"))[0] == 401
    assert (await get(proxy, "/v1/models"))[0] == 401
    keys = InstanceKeys(StateDir(tmp_path / ".cst"))
    one, two = keys.ensure("st-instance-8001"), keys.ensure("st-instance-8002")

    async def accepted(key: str) -> bool:   # /status: not a request of the caller's
        return (await get(proxy, "/status", key))[0] == 200
    await eventually(lambda: accepted(one))   # minted by another process: followed

    a, b = sdk(proxy, one), sdk(proxy, two)
    chat = await a.chat.completions.create(model="gpt-fake", messages=HI)
    assert chat.choices[0].message.content.startswith("w0")
    stream = await a.chat.completions.create(model="gpt-fake", messages=HI, stream=True)
    assert "".join([c.choices[0].delta.content async for c in stream if c.choices]) == "w0 w1 w2 w3 w4 "
    with pytest.raises(openai.NotFoundError):
        await a.chat.completions.create(model="missing-model", messages=HI)
    await b.embeddings.create(model="emb-fake", input="x")
    assert set(upstream.keys_seen()) == {GOOD}   # the upstream saw a pool key, never an instance key

    status, mine = await get(proxy, "/status", one)
    assert status == 200 and mine["caller"] == "st-instance-8001"
    assert "instances" not in mine["usage"]   # an instance sees its own counts only
    counts = mine["usage"]["today"]
    assert {k: counts[k] for k in ("requests", "errors", "prompt_tokens", "completion_tokens")} == {
        "requests": 3, "errors": 1, "prompt_tokens": 2 * PROMPT_TOKENS, "completion_tokens": 5 + 5}
    assert mine["usage"]["month"] == counts and mine["usage"]["budget"] is None
    assert mine["usage"]["window"]["day"] == time.strftime("%Y-%m-%d")   # the machine's zone by default
    assert (await get(proxy, "/status", two))[1]["usage"]["today"]["requests"] == 1

    status, metrics = await get(proxy, "/metrics", two)
    assert status == 200
    assert 'cst_proxy_instance_requests_total{instance="st-instance-8001"} 3.0' in metrics
    assert 'cst_proxy_instance_errors_total{instance="st-instance-8001"} 1.0' in metrics
    assert 'cst_proxy_instance_tokens_total{instance="st-instance-8001",kind="completion"} 10.0' in metrics
    assert 'cst_proxy_instance_requests_total{instance="st-instance-8002"} 1.0' in metrics
    assert one not in metrics and two not in metrics

    # revoked: removing the file is enough, and the answer is OpenAI's error shape
    keys.revoke("st-instance-8001")
    await eventually(lambda: refused(proxy, one))
    status, body = await get(proxy, "/v1/models", one)
    assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        await a.models.list()
    assert [m.id async for m in await b.models.list()] == ["gpt-fake", "emb-fake"]
    await a.close()
    await b.close()


async def test_a_rotated_key_counts_at_once_after_a_reload(make_proxy: MakeProxy, env, tmp_path) -> None:
    """What cst serve does after a rotation: read the folder now rather than wait for the watch."""
    env("KEYS", GOOD)
    keys = InstanceKeys(StateDir(tmp_path / ".cst"))
    old = keys.ensure("st-instance-8001")
    proxy = await make_proxy(static_account("main", "KEYS"), closed=True)
    assert (await get(proxy, "/v1/models", old))[0] == 200
    _, new = keys.rotate("st-instance-8001")
    await proxy.reload_instance_keys()
    assert (await get(proxy, "/v1/models", old))[0] == 401
    assert (await get(proxy, "/v1/models", new))[0] == 200


async def test_anonymous_keeps_any_key_working_beside_instance_keys(make_proxy: MakeProxy, env, tmp_path) -> None:
    env("KEYS", GOOD)
    key = InstanceKeys(StateDir(tmp_path / ".cst")).ensure("st-instance-8001")
    proxy = await make_proxy(static_account("main", "KEYS"), proxy_extra="anonymous: true")
    assert (await get(proxy, "/v1/models", "sk-anything"))[0] == 200
    assert (await get(proxy, "/v1/models"))[0] == 200
    assert (await get(proxy, "/v1/models", key))[0] == 200
    status, doc = await get(proxy, "/status")
    assert status == 200 and doc["caller"] == "anonymous"
    assert {name: c["today"]["requests"] for name, c in doc["usage"]["instances"].items()} == {
        "anonymous": 2, "st-instance-8001": 1}


async def test_streams_are_asked_for_their_usage_and_the_client_gets_the_stream_it_asked_for(
        make_proxy: MakeProxy, upstream: FakeUpstream, env, tmp_path) -> None:
    env("KEYS", GOOD)
    key = InstanceKeys(StateDir(tmp_path / ".cst")).ensure("st-instance-8001")
    proxy = await make_proxy(static_account("main", "KEYS"), closed=True)
    upstream.stream_usage = "asked"   # as OpenAI: usage only with stream_options.include_usage
    client = sdk(proxy, key)
    plain = await client.chat.completions.create(model="gpt-fake", messages=HI, stream=True)
    chunks = [c async for c in plain]
    assert chunks and all(c.choices for c in chunks)   # no usage-only event it did not ask for
    assert b'"include_usage":true' in upstream.seen[-1].body   # but the proxy asked, and metered it
    asked = await client.chat.completions.create(model="gpt-fake", messages=HI, stream=True,
                                                 stream_options={"include_usage": True})
    usage = [c.usage async for c in asked if c.usage]
    assert [(u.prompt_tokens, u.completion_tokens) for u in usage] == [(PROMPT_TOKENS, 5)]
    counts = (await get(proxy, "/status", key))[1]["usage"]["today"]
    assert (counts["requests"], counts["prompt_tokens"], counts["completion_tokens"], counts["estimated"]) == (
        2, 2 * PROMPT_TOKENS, 10, 0)
    await client.close()


async def test_a_client_hanging_up_is_charged_an_estimate_but_not_as_an_error(
        make_proxy: MakeProxy, upstream: FakeUpstream, env, tmp_path) -> None:
    env("KEYS", "sk-slow-aaaaaaaaaaaa1111")   # streams its chunks 0.2 s apart
    key = InstanceKeys(StateDir(tmp_path / ".cst")).ensure("st-instance-8001")
    proxy = await make_proxy(static_account("main", "KEYS"), closed=True)
    async with (aiohttp.ClientSession() as http,
                http.post(proxy.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "gpt-fake", "stream": True, "messages": HI}) as resp):
        await resp.content.readline()   # SillyTavern's stop button: hang up mid-answer
    await eventually(lambda: _counted(proxy, key))
    counts = (await get(proxy, "/status", key))[1]["usage"]["today"]
    assert (counts["requests"], counts["errors"], counts["estimated"]) == (1, 0, 1)
    assert counts["prompt_tokens"] > 0   # never zero: the upstream had the prompt


async def _counted(proxy, key: str) -> bool:
    return (await get(proxy, "/status", key))[1]["usage"]["today"]["requests"] == 1


# -- the meter, piece by piece

USAGE_EVENT = b'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":22,"total_tokens":33}}\n\n'


@pytest.mark.parametrize("size", [1, 3, 7, 64, 10_000])
def test_the_meter_finds_usage_however_the_stream_is_cut(size: int) -> None:
    stream = (b'data: {"choices":[{"delta":{"content":"say \\"usage\\": {"}}],"usage":null}\n\n'
              + USAGE_EVENT + b"data: [DONE]\n\n")
    meter = Meter()
    for i in range(0, len(stream), size):
        meter.piece(stream[i:i + size])
    assert meter.usage == (11, 22)


def test_the_meter_keeps_the_last_usage_and_ignores_nonsense() -> None:
    meter = Meter()
    meter.piece(b'data: {"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n')
    meter.piece(b'data: {"usage":{"prompt_tokens":1,"completion_tokens":9}}\n\n')
    meter.piece(b'data: {"usage":{"prompt_tokens":"many","completion_tokens":-3}}\n\n')
    assert meter.usage == (0, 0)   # the last one said nothing usable
    broken = Meter()
    broken.piece(b'data: {"usage":{"prompt_tokens":1,,}\n\n')
    broken.piece(USAGE_EVENT)
    assert broken.usage == (11, 22)
    whole = Meter()
    whole.body(b'{"id":"x","usage": {"prompt_tokens": 4, "completion_tokens": 6}}')
    assert whole.usage == (4, 6)
    none = Meter()
    none.body(b'{"id":"x","usage": null}')
    none.body(b'{"data": []}')
    assert none.usage is None
