"""The proxy against hostile input from both sides: an upstream with broken framing, clients
with oversized bodies, too many requests, paths that try to leave /v1/, keys that are not UTF-8."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
from fakes import FakeUpstream
from proxy_fixtures import MakeProxy, env, make_proxy, static_account, upstream
from test_proxy_upstream import HOSTILE, RawServer

from conftest import eventually

GOOD = "sk-good-aaaaaaaaaaaaaaaa1111"


@pytest.mark.parametrize("answer", HOSTILE.values(), ids=HOSTILE.keys())
async def test_hostile_framing_is_a_clean_502_and_the_next_request_gets_its_own_answer(
        make_proxy: MakeProxy, env, answer: bytes) -> None:
    async def handler(reader, writer):
        while True:
            request = await raw.read_request(reader)
            if b"/bad" in request:
                writer.write(answer)
            else:  # an answer that names the request it answers
                body = json.dumps({"path": request.split(b" ")[1].decode()}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % len(body) + body)
            await writer.drain()

    env("KEYS", GOOD)
    async with RawServer(handler) as raw:
        proxy = await make_proxy(static_account("main", "KEYS"), upstream_url=f"http://127.0.0.1:{raw.origin.port}")
        async with aiohttp.ClientSession() as http:
            async with http.post(proxy.url + "/v1/bad", json={}) as bad:
                assert bad.status == 502
                assert (await bad.json())["error"]["type"] == "upstream_error"
            for i in range(3):
                async with http.post(proxy.url + f"/v1/mine/{i}", json={}) as mine:
                    assert mine.status == 200 and await mine.json() == {"path": f"/v1/mine/{i}"}


async def test_body_limit_is_a_413_in_openais_shape(make_proxy: MakeProxy, upstream: FakeUpstream, env) -> None:
    env("KEYS", GOOD)
    proxy = await make_proxy(static_account("main", "KEYS"), proxy_extra="max_body: 1KiB")
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=20)
    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "x" * 2000}])
    assert refused.value.status_code == 413 and refused.value.body["code"] == "request_too_large"  # type: ignore[index]  # the error's JSON body
    ok = await client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].message.content
    await client.close()

    async def chunks():  # no Content-Length: the limit holds while the body is read
        for _ in range(4):
            yield b"x" * 512

    async with (aiohttp.ClientSession() as http,
                http.post(proxy.url + "/v1/chat/completions", data=chunks()) as response):
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "request_too_large"
    assert len(upstream.seen) == 1, "only the small request reached the upstream"


async def test_past_the_concurrency_bound_clients_get_503_at_once(make_proxy: MakeProxy, upstream: FakeUpstream,
                                                                  env) -> None:
    env("KEYS", GOOD)
    proxy = await make_proxy(static_account("main", "KEYS"), proxy_extra="max_concurrent: 2", timeout="30s")
    slow = json.dumps({"model": "slow-stream", "stream": True, "messages": []})
    async with aiohttp.ClientSession() as http:
        streams = [await http.post(proxy.url + "/v1/chat/completions", data=slow,
                                   headers={"Content-Type": "application/json"}) for _ in range(2)]
        assert [s.status for s in streams] == [200, 200]
        async with http.post(proxy.url + "/v1/chat/completions", json={"model": "gpt-fake", "messages": []}) as third:
            assert third.status == 503 and third.headers["Retry-After"] == "1"
            assert (await third.json())["error"] == {
                "message": "the proxy is serving its limit of 2 requests; retry shortly",
                "type": "server_error", "code": "overloaded"}
        for s in streams:
            s.close()
        async def served() -> bool:
            async with http.get(proxy.url + "/v1/models") as models:
                return models.status == 200
        # the slots come back as the streams end
        await eventually(served, timeout=5, failure=lambda: "the proxy did not serve again after the streams ended")


@pytest.mark.parametrize("path, status, forwarded", [
    ("/v1/../admin", 400, None),
    ("/v1/%2e%2e/admin", 400, None),
    ("/v1/..%2Fadmin", 400, None),
    ("/v1/models%2F..%2F..%2Fx", 400, None),
    ("/v1/a%5C..%5Cb", 400, None),
    ("/v1//models", 200, "/v1/models"),
    ("/v1/./chat/../models", 200, "/v1/models"),
])
async def test_paths_are_normalised_and_never_leave_v1(make_proxy: MakeProxy, upstream: FakeUpstream, env,
                                                       path: str, status: int, forwarded: str | None) -> None:
    env("KEYS", GOOD)
    proxy = await make_proxy(static_account("main", "KEYS"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())  # sent exactly as written
    answer = await reader.read()
    writer.close()
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    if forwarded is None:
        assert b'"code": "invalid_path"' in answer
        assert not upstream.seen, "no pool key went anywhere"
    else:
        assert [s.path for s in upstream.seen] == [forwarded]


async def test_a_client_key_that_is_not_utf8_is_a_401(make_proxy: MakeProxy, upstream: FakeUpstream, env) -> None:
    env("KEYS", GOOD)
    env("CLIENT_KEYS", "client-key-1")
    proxy = await make_proxy(static_account("main", "KEYS"), proxy_extra="client_keys_env: CLIENT_KEYS", closed=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xc3\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert not upstream.seen
