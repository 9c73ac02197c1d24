"""The proxy end to end with the official openai SDK as the client and a fake upstream."""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time

import aiohttp
import openai
import pytest
from fakes import FakeUpstream, throwaway_tls
from proxy_fixtures import MakeProxy, daidai, env, make_proxy, sdk, static_account, upstream

from conftest import eventually

GOOD = "sk-good-aaaaaaaaaaaaaaaa1111"
GOOD2 = "sk-good-bbbbbbbbbbbbbbbb2222"


async def test_chat_streaming_embeddings_and_models_through_the_sdk(make_proxy: MakeProxy, upstream: FakeUpstream,
                                                                    env) -> None:
    env("KEYS", f"{GOOD},{GOOD2}")
    proxy = await make_proxy(static_account("main", "KEYS"))
    client = sdk(proxy)

    chat = await client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "w0 w1 w2 w3 w4 [1111]"

    stream = await client.chat.completions.create(model="gpt-fake", stream=True,
                                                  messages=[{"role": "user", "content": "hi"}])
    pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert pieces == ["w0 ", "w1 ", "w2 ", "w3 ", "w4 "]

    emb = await client.embeddings.create(model="emb-fake", input=["abc", "hello"])
    assert [d.embedding[0] for d in emb.data] == [3.0, 5.0]

    models = await client.models.list()
    assert [m.id async for m in models] == ["gpt-fake", "emb-fake"]

    completion = await client.completions.create(model="gpt-fake", prompt="x")
    assert completion.choices[0].text == "completed"

    # Round robin, and the client's key never reached the upstream.
    assert upstream.keys_seen() == [GOOD, GOOD2, GOOD, GOOD2, GOOD]
    assert all("client-key-ignored" not in json.dumps(s.headers) for s in upstream.seen)
    await client.close()


@pytest.mark.parametrize("bad", ["sk-bad-cccccccccccc3333", "sk-429-dddddddddddd4444",
                                 "sk-500-eeeeeeeeeeee5555"])
async def test_a_failing_key_among_good_ones_never_reaches_the_client(make_proxy: MakeProxy, upstream: FakeUpstream,
                                                                      env, bad: str) -> None:
    env("KEYS", f"{bad},{GOOD}")
    proxy = await make_proxy(static_account("main", "KEYS"), timeout="0.5s")
    client = sdk(proxy)
    for i in range(6):
        stream = i % 2 == 1
        if stream:
            s = await client.chat.completions.create(model="gpt-fake", stream=True, messages=[])
            text = "".join([c.choices[0].delta.content async for c in s if c.choices])
            assert text == "w0 w1 w2 w3 w4 "
        else:
            chat = await client.chat.completions.create(model="gpt-fake", messages=[])
            assert chat.choices[0].message.content.endswith("[1111]")
    seen = upstream.keys_seen()
    assert seen.count(GOOD) == 6
    # 401 and 429 take a key out at once; 5xx after failure_threshold (3) in a row.
    assert seen.count(bad) == (1 if bad.startswith(("sk-bad", "sk-429")) else 3)
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/status") as resp:
        doc = await resp.json()
    keys = {k["key"]: k for k in doc["accounts"]["main"]["keys"]}
    bad_entry = keys[bad[:5] + "…" + bad[-4:]]
    assert bad_entry["available"] is False
    assert bad_entry["last_error"] == f"HTTP {bad[3:6]}".replace("bad", "401")
    if bad.startswith("sk-429"):
        assert bad_entry["cooldown_until"] is not None
    if bad.startswith("sk-bad"):
        assert bad_entry["quarantined"] is True
    await client.close()


async def test_client_errors_go_back_untouched_and_do_not_count(make_proxy: MakeProxy, upstream: FakeUpstream,
                                                               env) -> None:
    env("KEYS", GOOD)
    proxy = await make_proxy(static_account("main", "KEYS"), proxy_extra="failure_threshold: 1")
    client = sdk(proxy)
    for _ in range(3):
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model="missing-model", messages=[])
        assert info.value.body["code"] == "model_not_found"  # type: ignore[index]  # the error's JSON body
    assert len(upstream.seen) == 3, "not retried"
    key = proxy.state.pool.keys()[0]
    assert key.failures == 0 and key.available(proxy.state.pool.clock())
    await client.close()


async def test_stream_chunks_arrive_as_the_upstream_sends_them(make_proxy: MakeProxy, upstream: FakeUpstream,
                                                              env) -> None:
    env("KEYS", "sk-slow-gggggggggggg7777")
    proxy = await make_proxy(static_account("main", "KEYS"))
    client = sdk(proxy)
    stream = await client.chat.completions.create(model="gpt-fake", stream=True, messages=[])
    arrivals = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
    assert len(arrivals) == 5
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    # The upstream sends one chunk every 200 ms; buffering would show up as gaps near 0.
    assert min(gaps) >= 0.1, gaps
    await client.close()


async def test_every_other_v1_path_is_passed_through(make_proxy: MakeProxy, upstream: FakeUpstream, env) -> None:
    """A path the proxy does not know goes upstream as it came (charged per request: see
    test_proxy_metering)."""
    env("KEYS", GOOD)
    proxy = await make_proxy(static_account("main", "KEYS"))
    async with (aiohttp.ClientSession() as http,
                http.put(proxy.url + "/v1/custom/abc%2Fdef?purpose=fine-tune&x=1", data=b"\x00raw\xffbytes",
                         headers={"Authorization": "Bearer client", "X-Custom": "kept",
                                  "Connection": "keep-alive, X-Hop", "X-Hop": "dropped",
                                  "Content-Type": "application/octet-stream"}) as resp):
        assert resp.status == 200
        assert resp.headers["X-Upstream-Echo"] == "yes"
        echo = await resp.json()
    assert echo["method"] == "PUT"
    assert echo["query"] == "purpose=fine-tune&x=1"
    assert echo["headers"]["X-Custom"] == "kept"
    assert "X-Hop" not in echo["headers"]
    assert echo["headers"]["Content-Type"] == "application/octet-stream"
    seen = upstream.seen[-1]
    assert seen.body == b"\x00raw\xffbytes" and seen.key == GOOD
    assert seen.path == "/v1/custom/abc/def"


async def test_no_key_answers_503_openai_style(make_proxy: MakeProxy, upstream: FakeUpstream, env) -> None:
    env("KEYS", "sk-bad-hhhhhhhhhhhh8888")
    proxy = await make_proxy(static_account("main", "KEYS"))
    client = sdk(proxy)
    with pytest.raises(openai.AuthenticationError):  # the first time, the upstream's own 401 is relayed
        await client.chat.completions.create(model="gpt-fake", messages=[])
    with pytest.raises(openai.APIStatusError) as info:  # then the key is quarantined: nothing to try
        await client.chat.completions.create(model="gpt-fake", messages=[])
    assert info.value.status_code == 503
    assert set(info.value.body) >= {"message", "type", "code"} and info.value.body["code"] == "no_available_key"  # type: ignore[call-overload,index]  # the error's JSON body
    assert len(upstream.seen) == 1
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/health") as resp:
        health = await resp.json()
    assert health["keys"] == {"total": 1, "available": 0, "unavailable": 1}
    assert health["status"] == "degraded" and health["uptime"] >= 0
    await client.close()


async def test_when_all_keys_are_cooling_the_soonest_is_tried(make_proxy: MakeProxy, upstream: FakeUpstream,
                                                              env) -> None:
    env("KEYS", GOOD)
    proxy = await make_proxy(static_account("main", "KEYS"))
    pool = proxy.state.pool
    key = pool.keys()[0]
    key.cooldown_until = pool.clock() + 100  # as if it had been rate limited
    client = sdk(proxy)
    chat = await client.chat.completions.create(model="gpt-fake", messages=[])
    assert chat.choices[0].message.content.endswith("[1111]")
    await client.close()


async def test_upstream_down_is_a_502_and_the_pool_is_not_benched(make_proxy: MakeProxy, env) -> None:
    env("KEYS", f"{GOOD},{GOOD2}")
    from ports import free_port
    proxy = await make_proxy(static_account("main", "KEYS"), upstream_url=f"http://127.0.0.1:{free_port()}")
    client = sdk(proxy)
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="gpt-fake", messages=[])
        assert info.value.status_code == 502 and info.value.body["code"] == "upstream_unreachable"  # type: ignore[index]  # the error's JSON body
    now = proxy.state.pool.clock()
    assert all(k.cooldown_until <= now + 1.5 for k in proxy.state.pool.keys())
    await client.close()


async def test_client_hanging_up_cancels_the_upstream_stream(make_proxy: MakeProxy, upstream: FakeUpstream,
                                                             env) -> None:
    env("KEYS", "sk-slow-iiiiiiiiiiii9999")
    upstream.chunks = 50
    proxy = await make_proxy(static_account("main", "KEYS"))
    async with aiohttp.ClientSession() as http:
        resp = await http.post(proxy.url + "/v1/chat/completions", json={"model": "m", "stream": True})
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"data: {")
        resp.close()  # hang up mid-stream
    await eventually(lambda: upstream.cancelled, timeout=2.5)
    assert upstream.cancelled == 1


async def test_client_hanging_up_before_the_first_byte_cancels_the_upstream_request(
        make_proxy: MakeProxy, upstream: FakeUpstream, env) -> None:
    # A long proxy timeout, so only the client's hang-up can end the upstream request in time.
    env("KEYS", "sk-hang-mmmmmmmmmmmm1212")
    proxy = await make_proxy(static_account("main", "KEYS"), timeout="60s")
    async with aiohttp.ClientSession() as http:
        request = asyncio.create_task(http.post(proxy.url + "/v1/chat/completions", json={"model": "m"}))
        await eventually(lambda: upstream.hanging, timeout=2)
        assert upstream.hanging == 1
        request.cancel()  # the client gives up and closes its connection
        with pytest.raises(asyncio.CancelledError):
            await request
    await eventually(lambda: upstream.hang_cancelled, timeout=5)
    assert upstream.hang_cancelled == 1
    key = proxy.state.pool.keys()[0]
    assert key.failures == 0, "a client hanging up says nothing about the key"


async def test_upstream_breaking_mid_stream_is_not_disguised_as_a_full_answer(make_proxy: MakeProxy,
                                                                             upstream: FakeUpstream, env) -> None:
    env("KEYS", "sk-cut-jjjjjjjjjjjj0000")
    proxy = await make_proxy(static_account("main", "KEYS"))
    async with (aiohttp.ClientSession() as http,
                http.post(proxy.url + "/v1/chat/completions", json={"model": "m", "stream": True}) as resp):
        body = await resp.read()  # a clean end of the HTTP answer...
    events = body.split(b"\n\n")[:-1]
    assert b"[DONE]" not in body and len(events) == 3  # ...whose last event says the answer broke off
    assert json.loads(events[-1].removeprefix(b"data: "))["error"]["code"] == "upstream_broken"
    key = proxy.state.pool.keys()[0]
    assert key.failures == 0 and key.available(proxy.state.pool.clock()), "a cut upstream is not a bad key"
    assert proxy.state.forwarder.stats.upstream_cuts == 1


async def test_client_keys_are_required_when_configured(make_proxy: MakeProxy, upstream: FakeUpstream, env) -> None:
    env("KEYS", GOOD)
    env("PROXY_CLIENT_KEYS", "secret-one, secret-two")
    proxy = await make_proxy(static_account("main", "KEYS"), proxy_extra="client_keys_env: PROXY_CLIENT_KEYS",
                             closed=True)
    with pytest.raises(openai.AuthenticationError):
        await sdk(proxy, "wrong").models.list()
    for path in ("/status", "/metrics"):
        async with aiohttp.ClientSession() as http, http.get(proxy.url + path) as resp:
            assert resp.status == 401
    assert upstream.seen == []
    for good in ("secret-one", "secret-two"):
        client = sdk(proxy, good)
        assert [m.id async for m in await client.models.list()] == ["gpt-fake", "emb-fake"]
        await client.close()
    assert upstream.keys_seen() == [GOOD, GOOD]
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/health") as resp:
        assert resp.status == 200


async def test_status_metrics_and_logs_never_show_a_whole_key(make_proxy: MakeProxy, upstream: FakeUpstream, env,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    keys = [GOOD, "sk-bad-kkkkkkkkkkkkkkkk", "sk-500-llllllllllllllll"]
    env("KEYS", ",".join(keys))
    proxy = await make_proxy(static_account("main", "KEYS"))
    client = sdk(proxy)
    for _ in range(4):
        await client.chat.completions.create(model="gpt-fake", messages=[])
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/status") as resp:
            status_text = await resp.text()
        async with http.get(proxy.url + "/metrics") as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            metrics_text = await resp.text()
        async with http.get(proxy.url + "/health") as resp:
            health_text = await resp.text()
    doc = json.loads(status_text)
    entries = doc["accounts"]["main"]["keys"]
    assert [e["key"] for e in entries] == ["sk-go…1111", "sk-ba…kkkk", "sk-50…llll"]
    assert entries[0]["requests"] >= 3 and entries[1]["last_error"] == "HTTP 401"
    assert 'cst_proxy_key_requests_total{account="main",key="sk-go…1111"}' in metrics_text
    assert "cst_proxy_responses_total{code=\"200\"} 4.0" in metrics_text
    for text in (status_text, metrics_text, health_text, caplog.text):
        for key in keys:
            assert key not in text
    assert "sk-ba…kkkk" in caplog.text  # the failure was logged, masked
    await client.close()


async def test_unknown_routes_methods_and_big_bodies(make_proxy: MakeProxy, upstream: FakeUpstream, env) -> None:
    env("KEYS", GOOD)
    proxy = await make_proxy(static_account("main", "KEYS"))
    big = b"x" * (3 * 1024 * 1024)  # above aiohttp's default 1 MiB request limit: image prompts get this big
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/nope") as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
        async with http.post(proxy.url + "/health") as resp:
            assert resp.status == 405
        async with http.post(proxy.url + "/v1/images/edits", data=big) as resp:
            assert resp.status == 200
            assert len((await resp.json())["body"]) == len(big)
    assert upstream.seen[-1].body == big and upstream.seen[-1].key == GOOD


async def test_an_https_upstream(make_proxy: MakeProxy, env, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real upstream is https: the lean client must do TLS with certificate checks.
    cert, key, ca = throwaway_tls(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    tls_upstream = await FakeUpstream().start(ssl_context=server_ctx)
    try:
        env("KEYS", GOOD)
        untrusted = await make_proxy(static_account("main", "KEYS"), upstream_url=tls_upstream.url)
        client = sdk(untrusted)
        with pytest.raises(openai.APIStatusError) as info:  # not trusted: refused, never sent in clear
            await client.chat.completions.create(model="gpt-fake", messages=[])
        assert info.value.status_code == 502 and "CERTIFICATE_VERIFY_FAILED" in info.value.body["message"]  # type: ignore[index]  # the error's JSON body
        await client.close()
        assert tls_upstream.seen == []

        monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # how an operator trusts a private CA
        trusted = await make_proxy(static_account("main", "KEYS"), upstream_url=tls_upstream.url,
                                   file=tmp_path / "second.yaml")
        client = sdk(trusted)
        stream = await client.chat.completions.create(model="gpt-fake", stream=True, messages=[])
        assert "".join([c.choices[0].delta.content async for c in stream if c.choices]) == "w0 w1 w2 w3 w4 "
        await client.close()
        assert tls_upstream.keys_seen() == [GOOD]
    finally:
        await tls_upstream.stop()


async def test_client_keys_env_set_but_empty_refuses_everyone(make_proxy: MakeProxy, upstream: FakeUpstream,
                                                              env) -> None:
    env("KEYS", GOOD)
    env("PROXY_CLIENT_KEYS", " , ")
    proxy = await make_proxy(static_account("main", "KEYS"), proxy_extra="client_keys_env: PROXY_CLIENT_KEYS",
                             closed=True)
    async with aiohttp.ClientSession() as http:
        for token in ("", " ", ","):
            async with http.get(proxy.url + "/v1/models", headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 401
    assert upstream.seen == []


def test_retry_after_forms() -> None:
    from email.utils import formatdate

    from proxy.forward import retry_after_seconds
    assert retry_after_seconds("30") == 30.0
    assert retry_after_seconds("1.5") == 1.5
    assert retry_after_seconds("-3") == 0.0
    assert 55 <= retry_after_seconds(formatdate(time.time() + 60, usegmt=True)) <= 61
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


async def test_an_answer_that_breaks_before_its_first_byte_is_never_sent_again(
        make_proxy: MakeProxy, upstream: FakeUpstream, env) -> None:
    """The upstream answered 200, so it took the request (and may bill it): another key must not."""
    drop = "sk-drop-nnnnnnnnnnnn3434"
    env("KEYS", f"{drop},{GOOD}")
    proxy = await make_proxy(static_account("main", "KEYS"))
    client = sdk(proxy)
    for stream in (True, False):
        with pytest.raises(openai.APIStatusError) as info:   # the drop key's turn
            await client.chat.completions.create(model="gpt-fake", stream=stream, messages=[])
        assert info.value.status_code == 502 and info.value.body["code"] == "upstream_broken"  # type: ignore[index]  # the error's JSON body
        assert "not sent again" in info.value.body["message"]  # type: ignore[index]  # the error's JSON body
        chat = await client.chat.completions.create(model="gpt-fake", messages=[])   # the good key's turn
        assert chat.choices[0].message.content.endswith("[1111]")
    assert upstream.keys_seen() == [drop, GOOD, drop, GOOD]   # each request reached the upstream once
    await client.close()
