"""Account sources against the fake DaiDai platform, the key cache, and in-place pool updates."""
from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import aiohttp
import openai
from fakes import FakeDaiDai, FakeUpstream, daidai_key
from proxy_fixtures import MakeProxy, daidai, env, make_proxy, static_account, upstream

from conftest import eventually
from ports import free_port
from proxy.accounts import AccountManager
from proxy.pool import KeyPool
from reconciler.desired.model import Account

PASSWORD = "correct horse battery staple"


def daidai_account(name: str, email: str, api_base: str, env_name: str = "DAIDAI_PW", refresh: str = "5m") -> str:
    return (f"- {{name: {name}, provider: daidai, email: {email}, password_env: {env_name}, "
            f"api_base: \"{api_base}\", refresh: {refresh}}}")


async def get_json(url: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return await resp.json()


async def chat(proxy) -> str:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        result = await client.chat.completions.create(model="gpt-fake", messages=[])
        return result.choices[0].message.content
    finally:
        await client.close()


async def test_daidai_keys_are_listed_filtered_and_served(make_proxy: MakeProxy, daidai: FakeDaiDai,
                                                          upstream: FakeUpstream, env, tmp_path: Path) -> None:
    daidai.add_account("me@example.com", PASSWORD, [
        daidai_key("sk-good-usable00000001", "12.50", "3.20"),
        daidai_key("sk-good-failedstate002", state="fail"),
        daidai_key("sk-good-haserror000003", has_error=True),
        daidai_key("sk-good-usable00000004", "0.80", "9.20"),
        daidai_key("sk-good-broke000000005", "0.00", "20.00"),
    ])
    env("DAIDAI_PW", PASSWORD)
    proxy = await make_proxy(daidai_account("main", "me@example.com", daidai.url))
    await eventually(lambda: proxy.state.pool.counts()[0] == 3)
    assert {await chat(proxy) for _ in range(4)} == {"w0 w1 w2 w3 w4 [0001]", "w0 w1 w2 w3 w4 [0004]"}
    assert "sk-good-broke000000005" not in upstream.keys_seen(), "a key without balance is not used"

    doc = await get_json(proxy.url + "/status")
    main = doc["accounts"]["main"]
    assert main["provider"] == "daidai" and main["last_error"] is None and main["balance"] == 13.3
    assert main["keys"][0] == {**main["keys"][0], "key": "sk-go…0001", "balance": 12.5, "used": 3.2}

    cache = tmp_path / ".cst" / "proxy" / "keys-main.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    assert [k["api_key"] for k in json.loads(cache.read_text())["keys"]] == [
        "sk-good-usable00000001", "sk-good-usable00000004", "sk-good-broke000000005"]


async def test_expired_token_means_a_new_login(daidai: FakeDaiDai, tmp_path: Path, env) -> None:
    daidai.add_account("me@example.com", PASSWORD, [daidai_key("sk-good-one000000000001")])
    env("DAIDAI_PW", PASSWORD)
    pool = KeyPool()
    async with aiohttp.ClientSession() as session:
        manager = AccountManager(pool, session, tmp_path)
        account = Account("main", "daidai", email="me@example.com", password_env="DAIDAI_PW",
                          api_base=daidai.url, refresh=0.1)
        manager.update([account])
        await eventually(lambda: daidai.lists >= 2)
        assert daidai.logins == 1, "a working token is reused"
        daidai.add_account("me@example.com", PASSWORD, [daidai_key("sk-good-two000000000002")])
        daidai.expire_tokens()
        await eventually(lambda: [k.value for k in pool.keys()] == ["sk-good-two000000000002"])
        assert daidai.logins == 2
        assert manager.status()["main"]["last_error"] is None
        await manager.close()


async def test_wrong_password_is_reported_and_other_accounts_keep_working(
        make_proxy: MakeProxy, daidai: FakeDaiDai, env, caplog) -> None:
    caplog.set_level(logging.INFO)
    daidai.add_account("me@example.com", PASSWORD, [daidai_key("sk-good-dd0000000000001")])
    env("DAIDAI_PW", "not the password")
    env("STATIC_KEYS", "sk-good-static0000000009")
    proxy = await make_proxy(daidai_account("main", "me@example.com", daidai.url) + "\n"
                             + static_account("extra", "STATIC_KEYS"))
    await eventually(lambda: daidai.failed_logins == 1)
    await eventually(lambda: proxy.state.accounts.status()["main"]["last_error"] is not None)
    doc = await get_json(proxy.url + "/status")
    assert "login failed for me@example.com" in doc["accounts"]["main"]["last_error"]
    assert "wrong email or password" in doc["accounts"]["main"]["last_error"]
    assert doc["accounts"]["main"]["keys"] == []
    assert doc["accounts"]["extra"]["last_error"] is None
    assert "login failed for me@example.com" in caplog.text
    assert "not the password" not in caplog.text
    assert await chat(proxy) == "w0 w1 w2 w3 w4 [0009]"


async def test_platform_down_at_start_serves_the_cached_keys(make_proxy: MakeProxy, daidai: FakeDaiDai,
                                                            upstream: FakeUpstream, env, tmp_path: Path) -> None:
    daidai.add_account("me@example.com", PASSWORD, [daidai_key("sk-good-cached000000007")])
    env("DAIDAI_PW", PASSWORD)
    first = await make_proxy(daidai_account("main", "me@example.com", daidai.url))
    await eventually(lambda: first.state.pool.counts() == (1, 1))
    await first.stop()
    await daidai.stop()  # the platform is gone

    second = await make_proxy(daidai_account("main", "me@example.com", daidai.url))
    await eventually(lambda: second.state.pool.counts() == (1, 1))
    assert await chat(second) == "w0 w1 w2 w3 w4 [0007]"
    status = second.state.accounts.status()["main"]
    assert status["from_cache"] is True and "platform unreachable" in status["last_error"]

    # A cache of another account (different email) is never used.
    third = await make_proxy(daidai_account("main", "other@example.com", daidai.url))
    await eventually(lambda: third.state.accounts.status()["main"]["last_error"] is not None)
    assert third.state.pool.counts() == (0, 0)


async def test_manager_adds_changes_and_removes_in_place(tmp_path: Path, env) -> None:
    env("A_KEYS", "sk-a1-xxxxxxxxxxxx,sk-a2-xxxxxxxxxxxx")
    env("B_KEYS", "sk-b1-xxxxxxxxxxxx")
    keys_file = tmp_path / "c.keys"
    keys_file.write_text("# comment\nsk-c1-xxxxxxxxxxxx\n\nsk-c2-xxxxxxxxxxxx\n")
    keys_file.chmod(0o600)
    pool = KeyPool()
    async with aiohttp.ClientSession() as session:
        manager = AccountManager(pool, session, tmp_path)
        a = Account("a", "static", keys_env="A_KEYS")
        manager.update([a, Account("b", "static", keys_env="B_KEYS")])
        assert [k.value for k in pool.keys()] == ["sk-a1-xxxxxxxxxxxx", "sk-a2-xxxxxxxxxxxx", "sk-b1-xxxxxxxxxxxx"]
        a1 = pool.keys()[0]
        a1.requests = 7
        manager.update([a, Account("b", "static", keys_file=keys_file)])  # b changed, a untouched
        assert [k.value for k in pool.keys()] == ["sk-a1-xxxxxxxxxxxx", "sk-a2-xxxxxxxxxxxx",
                                                 "sk-c1-xxxxxxxxxxxx", "sk-c2-xxxxxxxxxxxx"]
        assert pool.keys()[0] is a1 and a1.requests == 7
        manager.update([Account("b", "static", keys_file=keys_file)])  # a removed
        assert [k.value for k in pool.keys()] == ["sk-c1-xxxxxxxxxxxx", "sk-c2-xxxxxxxxxxxx"]
        assert set(manager.status()) == {"b"}
        keys_file.chmod(0o644)
        manager.update([Account("b", "static", keys_file=keys_file, refresh=60)])
        assert "readable by group or others" in manager.status()["b"]["last_error"]
        await manager.close()


async def test_missing_env_var_is_a_clear_error(tmp_path: Path) -> None:
    pool = KeyPool()
    async with aiohttp.ClientSession() as session:
        manager = AccountManager(pool, session, tmp_path)
        manager.update([Account("a", "static", keys_env="CST_TEST_UNSET_VAR")])
        assert manager.status()["a"]["last_error"] == "environment variable CST_TEST_UNSET_VAR is not set"
        manager.update([Account("d", "daidai", email="x@y.z", password_env="CST_TEST_UNSET_VAR",
                                api_base=f"http://127.0.0.1:{free_port()}")])
        await eventually(lambda: manager.status()["d"]["last_error"] is not None)
        assert "CST_TEST_UNSET_VAR is not set" in manager.status()["d"]["last_error"]
        await manager.close()


async def test_password_file_must_be_private(make_proxy: MakeProxy, daidai: FakeDaiDai, tmp_path: Path) -> None:
    daidai.add_account("me@example.com", PASSWORD, [daidai_key("sk-good-fromfile00000008")])
    secret = tmp_path / "daidai.password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o640)
    account = (f"- {{name: main, provider: daidai, email: me@example.com, password_file: {secret.name}, "
               f"api_base: \"{daidai.url}\"}}")
    proxy = await make_proxy(account)
    await eventually(lambda: proxy.state.accounts.status()["main"]["last_error"] is not None)
    assert "readable by group or others" in proxy.state.accounts.status()["main"]["last_error"]
    assert daidai.logins == 0 and daidai.failed_logins == 0, "the password was not even sent"

    secret.chmod(0o600)
    second = await make_proxy(account, file=tmp_path / "again.yaml")
    await eventually(lambda: second.state.pool.counts() == (1, 1))
    assert await chat(second) == "w0 w1 w2 w3 w4 [0008]"


async def test_changing_a_daidai_account_swaps_its_keys_in_place(daidai: FakeDaiDai, tmp_path: Path, env) -> None:
    daidai.add_account("one@example.com", PASSWORD, [daidai_key("sk-good-one000000000011")])
    daidai.add_account("two@example.com", "other secret", [daidai_key("sk-good-two000000000022")])
    env("DAIDAI_PW", PASSWORD)
    env("DAIDAI_PW2", "other secret")
    pool = KeyPool()
    async with aiohttp.ClientSession() as session:
        manager = AccountManager(pool, session, tmp_path)
        one = Account("main", "daidai", email="one@example.com", password_env="DAIDAI_PW", api_base=daidai.url)
        manager.update([one])
        await eventually(lambda: [k.value for k in pool.keys()] == ["sk-good-one000000000011"])
        held = pool.keys()[0]
        manager.update([one])  # the same account again: nothing restarts
        assert daidai.logins == 1
        two = Account("main", "daidai", email="two@example.com", password_env="DAIDAI_PW2", api_base=daidai.url)
        manager.update([two])
        assert pool.keys() == [held], "the old keys serve until the new account has answered"
        await eventually(lambda: [k.value for k in pool.keys()] == ["sk-good-two000000000022"])
        assert daidai.logins == 2
        cache = tmp_path / "proxy" / "keys-main.json"
        assert "sk-good-two000000000022" in cache.read_text()
        manager.update([])
        assert pool.keys() == [] and not cache.exists(), "a removed account leaves no keys on disk"
        await manager.close()
