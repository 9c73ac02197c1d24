"""The pool's ledger: every request billed once to one caller, counted right, kept on disk, and
held to its instance's budget."""
from __future__ import annotations

import asyncio
import gzip
import json
import os
import sqlite3
import stat
import time
from datetime import datetime
from typing import Any, cast
from zoneinfo import ZoneInfo

import aiohttp
import openai
import pytest
from aiohttp import web
from fakes import PROMPT_TOKENS, FakeUpstream
from openai.types.chat import ChatCompletionMessageParam
from proxy_fixtures import MakeProxy, env, make_proxy, sdk, static_account, upstream

from conftest import eventually, wait_until
from proxy.budget import Limit, Refusal, Reservation, UsageBook
from proxy.calendar import Calendar
from proxy.ledger import _SCHEMA, COLUMNS, LedgerWriter, Row, SqliteStore
from proxy.metering import MeteringPolicy
from proxy.request_body import RequestFacts, inspect
from proxy.service import ledger_path
from reconciler.desired.model import Budget, MeteringSettings
from reconciler.runtime.instance_keys import InstanceKeys
from reconciler.runtime.statedir import StateDir

GOOD = "sk-good-aaaaaaaaaaaa1111"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
ME = "st-instance-8001"
POLICY = MeteringPolicy(MeteringSettings())


class RawUpstream:
    """An upstream on a bare socket whose behaviour the key chooses: ``sk-stall-*`` reads the
    request whole and never answers, ``sk-close-*`` reads it whole and closes the connection,
    ``sk-429-*`` and ``sk-503-*`` answer that status. Counts the requests it read, by key."""

    def __init__(self) -> None:
        self.read: list[str] = []
        self._server: asyncio.Server | None = None
        self._held: list[asyncio.StreamWriter] = []

    async def start(self) -> "RawUpstream":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
                await reader.readexactly(int(headers.get("Content-Length", "0")))
                key = headers["Authorization"].split()[-1]
                self.read.append(key)
                if key.startswith("sk-stall-"):
                    self._held.append(writer)
                    return
                if key.startswith("sk-close-"):
                    writer.close()
                    return
                status = {"sk-429-": "429 Too Many Requests", "sk-503-": "503 Service Unavailable"}[key[:7]]
                body = b'{"error": {"message": "try another", "type": "server_error"}}'
                writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nRetry-After: 30\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def stop(self) -> None:
        for writer in self._held:
            writer.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def raw():
    server = await RawUpstream().start()
    yield server
    await server.stop()


# -- billed once ----------------------------------------------------------------------------

@pytest.mark.parametrize("behaviour, status, code", [("stall", 504, "upstream_timeout"),
                                                     ("close", 502, "upstream_broken")])
async def test_a_request_the_upstream_read_is_never_sent_again(make_proxy: MakeProxy, raw: RawUpstream, env,
                                                               behaviour: str, status: int, code: str) -> None:
    first, second = f"sk-{behaviour}-aaaaaaaaaaaa0001", f"sk-{behaviour}-bbbbbbbbbbbb0002"
    env("KEYS", f"{first},{second}")
    proxy = await make_proxy(static_account("main", "KEYS"), upstream_url=raw.url, timeout="0.5s")
    client = sdk(proxy)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="gpt-fake", messages=HI, stream=stream)
        assert info.value.status_code == status and info.value.body["code"] == code  # type: ignore[index]  # the error's JSON body
        assert "not sent again" in info.value.body["message"]  # type: ignore[index]  # the error's JSON body
    await client.close()
    assert raw.read == [first, second]   # each request reached the upstream exactly once


async def test_429_and_503_move_on_to_another_key(make_proxy: MakeProxy, raw: RawUpstream, env) -> None:
    """The upstream said it did not do it: another key may."""
    env("KEYS", "sk-429-aaaaaaaaaaaa0001,sk-503-bbbbbbbbbbbb0002")
    proxy = await make_proxy(static_account("main", "KEYS"), upstream_url=raw.url)
    client = sdk(proxy)
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="gpt-fake", messages=HI)
    assert info.value.status_code in (429, 503)
    assert sorted(raw.read) == ["sk-429-aaaaaaaaaaaa0001", "sk-503-bbbbbbbbbbbb0002"]   # both keys tried
    await client.close()


# -- closed by default ------------------------------------------------------------------------

async def test_when_the_last_instance_key_is_revoked_everyone_gets_401(make_proxy: MakeProxy, env, tmp_path) -> None:
    env("KEYS", GOOD)
    keys = InstanceKeys(StateDir(tmp_path / ".cst"))
    key = keys.ensure(ME)
    proxy = await make_proxy(static_account("main", "KEYS"), closed=True)
    async with aiohttp.ClientSession() as http:
        async def status(token: str | None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with http.get(proxy.url + "/v1/models", headers=headers) as resp:
                return resp.status
        assert await status(key) == 200 and await status(None) == 401
        keys.revoke(ME)   # the last instance deleted: the key table is empty
        await proxy.reload_instance_keys()
        assert (await status(key), await status(None), await status("anything")) == (401, 401, 401)


# -- budgets ------------------------------------------------------------------------------------

def _facts(max_tokens: int, stream: bool = False):
    body = json.dumps({"model": "gpt-fake", "messages": HI, "max_tokens": max_tokens, "stream": stream}).encode()
    return inspect("/v1/chat/completions", "POST", body, POLICY)


async def test_requests_pass_until_the_day_s_budget_is_used_then_429_with_the_reset(
        make_proxy: MakeProxy, upstream: FakeUpstream, env, tmp_path) -> None:
    env("KEYS", GOOD)
    key = InstanceKeys(StateDir(tmp_path / ".cst")).ensure(ME)
    cost = PROMPT_TOKENS + upstream.chunks   # what the fake reports for each answer
    proxy = await make_proxy(static_account("main", "KEYS"), closed=True,
                             extra=f"instances:\n  - port: 8001\n    budget: {{tokens_per_day: {4 * cost}}}\n")
    client = sdk(proxy, key)
    for _ in range(4):
        await client.chat.completions.create(model="gpt-fake", messages=HI, max_tokens=8)
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="gpt-fake", messages=HI, max_tokens=8)
    error = cast(dict[str, Any], info.value.body)
    assert error["code"] == "budget_exceeded" and error["type"] == "insufficient_quota"
    tomorrow = proxy.state.usage.calendar.day_ends(time.time()).strftime("%Y-%m-%d %H:%M:%S")
    assert f"has used {4 * cost} of its {4 * cost} tokens per day" in error["message"]
    assert tomorrow in error["message"] and "今日额度已用完" in error["message"]
    retry_after = int(info.value.response.headers["Retry-After"])
    assert 0 < retry_after <= 86400 + 3600
    assert len(upstream.seen) == 4   # the refused request never went upstream
    async with (aiohttp.ClientSession() as http,   # an escaped path is the same path to the budget
                http.post(proxy.url + "/v1/chat/%63ompletions", json={"model": "gpt-fake", "messages": HI},
                          headers={"Authorization": f"Bearer {key}"}) as resp):
        assert resp.status == 429 and (await resp.json())["error"]["code"] == "budget_exceeded"
    await client.close()
    usage = proxy.state.usage.caller_document(ME)
    assert usage["left"]["tokens_per_day"] == 0 and usage["today"]["requests"] == 6
    assert usage["today"]["errors"] == 2 and usage["today"]["tokens"] == 4 * cost
    async with (aiohttp.ClientSession() as http,
                http.get(proxy.url + "/metrics", headers={"Authorization": f"Bearer {key}"}) as resp):
        metrics = await resp.text()
    assert f'cst_proxy_budget_limit{{budget="tokens_per_day",instance="{ME}"}} {4 * cost}.0' in metrics
    assert f'cst_proxy_budget_left{{budget="tokens_per_day",instance="{ME}"}} 0.0' in metrics
    assert f'cst_proxy_usage_tokens{{instance="{ME}",window="day"}} {4 * cost}.0' in metrics
    assert "tokens_per_month" not in metrics   # no such limit declared


async def test_fifty_concurrent_requests_against_a_budget_for_five_admit_at_most_six(
        make_proxy: MakeProxy, upstream: FakeUpstream, env, tmp_path) -> None:
    env("KEYS", "sk-slow-aaaaaaaaaaaa1111")   # streams 0.2 s apart: all 50 are in flight together
    key = InstanceKeys(StateDir(tmp_path / ".cst")).ensure(ME)
    body = {"model": "gpt-fake", "messages": HI, "max_tokens": 16, "stream": True}
    facts = cast(RequestFacts, inspect("/v1/chat/completions", "POST", json.dumps(body).encode(), POLICY))
    reservation = facts.reservation
    budget = 5 * reservation
    proxy = await make_proxy(static_account("main", "KEYS"), closed=True,
                             extra=f"instances:\n  - port: 8001\n    budget: {{tokens_per_day: {budget}}}\n")

    async def one(http: aiohttp.ClientSession) -> int:
        async with http.post(proxy.url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as resp:
            await resp.read()
            return resp.status

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as http:
        statuses = await asyncio.gather(*(one(http) for _ in range(50)))
    admitted = statuses.count(200)
    assert 1 <= admitted <= 6 and statuses.count(429) == 50 - admitted, statuses
    assert len(upstream.seen) == admitted


async def test_requests_per_minute(make_proxy: MakeProxy, upstream: FakeUpstream, env, tmp_path) -> None:
    env("KEYS", GOOD)
    key = InstanceKeys(StateDir(tmp_path / ".cst")).ensure(ME)
    proxy = await make_proxy(static_account("main", "KEYS"), closed=True,
                             extra="instances:\n  - port: 8001\n    budget: {requests_per_minute: 2}\n")
    client = sdk(proxy, key)
    for _ in range(2):
        await client.chat.completions.create(model="gpt-fake", messages=HI)
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="gpt-fake", messages=HI)
    assert "of its 2 requests per minute" in info.value.body["message"]  # type: ignore[index]  # the error's JSON body
    assert 1 <= int(info.value.response.headers["Retry-After"]) <= 61
    assert [m.id async for m in await client.models.list()] == ["gpt-fake", "emb-fake"]   # a list costs nothing
    await client.close()


# -- counted right --------------------------------------------------------------------------------

async def _rows(proxy, count: int) -> list[Row]:
    """The ledger's rows once ``count`` are on disk (read as ``cst usage`` would)."""
    store = SqliteStore(ledger_path(proxy.desired.settings.state_dir), readonly=True)
    try:
        async def written() -> bool:
            return store.rows() >= count
        await eventually(written, failure=lambda: f"{store.rows()} ledger rows, expected {count}")
        query = f"SELECT {', '.join(COLUMNS)} FROM requests ORDER BY id"
        return [Row._make((*r[:6], bool(r[6]), *r[7:])) for r in store._db.execute(query).fetchall()]
    finally:
        store.close()


async def test_a_stream_cut_after_ten_chunks_without_usage_is_charged_an_estimate(
        make_proxy: MakeProxy, upstream: FakeUpstream, env, tmp_path) -> None:
    upstream.chunks = 20   # sk-cut- drops the connection half-way: after 10 chunks, before the usage event
    env("KEYS", "sk-cut-aaaaaaaaaaaa1111")
    key = InstanceKeys(StateDir(tmp_path / ".cst")).ensure(ME)
    proxy = await make_proxy(static_account("main", "KEYS"), closed=True)
    client = sdk(proxy, key)
    with pytest.raises(openai.APIError):
        stream = await client.chat.completions.create(model="gpt-fake", messages=HI, stream=True)
        [c async for c in stream]
    await client.close()
    (row,) = await _rows(proxy, 1)
    assert row.estimated and row.status == 502 and row.caller == ME and row.model == "gpt-fake"
    assert row.prompt_tokens > 0 and row.completion_tokens >= 10 * len("w0 ") // 3
    assert row.key.startswith("sk-cu") and "aaaaaaaa" not in row.key   # masked


async def test_a_gzip_answer_is_metered(make_proxy: MakeProxy, env, tmp_path) -> None:
    """An upstream that compresses whatever it is asked (the proxy asks for identity)."""
    seen: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept-Encoding", ""))
        answer = {"id": "x", "object": "chat.completion", "model": "gpt-fake", "created": 1,
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                               "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}
        return web.Response(body=gzip.compress(json.dumps(answer).encode()),
                            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        env("KEYS", GOOD)
        key = InstanceKeys(StateDir(tmp_path / ".cst")).ensure(ME)
        proxy = await make_proxy(static_account("main", "KEYS"), closed=True,
                                 upstream_url=f"http://127.0.0.1:{runner.addresses[0][1]}")
        async with (aiohttp.ClientSession() as http,   # a client that accepts gzip, as browsers and SDKs do
                    http.post(proxy.url + "/v1/chat/completions", json={"model": "gpt-fake", "messages": HI},
                              headers={"Authorization": f"Bearer {key}", "Accept-Encoding": "gzip"}) as resp):
            assert (await resp.json())["choices"][0]["message"]["content"] == "hello"
        assert seen == ["identity"]
        (row,) = await _rows(proxy, 1)
        assert (row.prompt_tokens, row.completion_tokens, row.estimated) == (7, 2, False)
    finally:
        await runner.cleanup()


# -- durable -------------------------------------------------------------------------------------

async def test_a_restarted_proxy_picks_every_count_up_where_it_was(make_proxy: MakeProxy, upstream: FakeUpstream,
                                                                   env, tmp_path) -> None:
    env("KEYS", GOOD)
    key = InstanceKeys(StateDir(tmp_path / ".cst")).ensure(ME)
    extra = "instances:\n  - port: 8001\n    budget: {tokens_per_day: 1000, tokens_per_month: 5000}\n"
    first = await make_proxy(static_account("main", "KEYS"), closed=True, extra=extra)
    client = sdk(first, key)
    for _ in range(3):
        await client.chat.completions.create(model="gpt-fake", messages=HI)
    await client.close()
    before = first.state.usage.caller_document(ME)
    await first.stop()
    second = await make_proxy(static_account("main", "KEYS"), closed=True, extra=extra)
    after = second.state.usage.caller_document(ME)
    assert after == before and after["today"]["requests"] == 3 and after["left"]["tokens_per_day"] < 1000


def test_the_store_is_owner_only_and_its_daily_totals_outlive_pruned_rows(tmp_path) -> None:
    path = tmp_path / "state" / "proxy" / "ledger.sqlite3"
    store = SqliteStore(path)
    old = time.time() - 200 * 86400
    writer = LedgerWriter(store, retention=90 * 86400, clock=time.time)
    writer.append(Row(ME, "m", "/v1/chat/completions", 200, 5, 6, False, old, old + 1, "sk-ab…1234", "2026-05-01", "r1"))
    writer.append(Row(ME, "m", "/v1/chat/completions", 200, 1, 2, True, time.time(), time.time(), "", "2026-11-30", "r2"))
    writer.close()   # writes what is queued, prunes the row older than the retention
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    reopened = SqliteStore(path)   # the schema is not created twice
    assert reopened.rows() == 1
    days = {d.day: d.tally for d in reopened.daily("2026-01-01", "2026-12-31")}
    assert days["2026-05-01"].tokens == 11 and days["2026-11-30"].estimated == 1
    reopened.close()


# -- windows ---------------------------------------------------------------------------------------

def test_the_day_and_month_roll_at_midnight_in_the_declared_zone() -> None:
    zone = ZoneInfo("Asia/Shanghai")
    now = [datetime(2026, 11, 30, 23, 59, 30, tzinfo=zone).timestamp()]   # 15:59:30 UTC
    book = UsageBook(Calendar("Asia/Shanghai"), clock=lambda: now[0])
    book.budgets = {ME: Budget(tokens_per_day=100, tokens_per_month=150)}
    spend = book.admit(ME, _facts(10))
    assert isinstance(spend, Reservation)
    late = book.admit(ME, _facts(10))   # starts before midnight, ends after: counts on the day it started
    assert isinstance(late, Reservation)
    book.settle(spend, 200, 60, 30, False, "")
    assert late.tokens == spend.tokens == _facts(10).reservation   # 45: both fit in the 100
    assert book.caller_document(ME)["left"]["tokens_per_day"] == 0   # 90 spent and the late one's reserved
    refused = book.admit(ME, _facts(10))
    assert isinstance(refused, Refusal) and refused.limit is Limit.DAY
    assert refused.resets == datetime(2026, 12, 1, 0, 0, tzinfo=zone)

    now[0] += 60   # 00:00:30 on 1 December in Shanghai, still 30 November in UTC
    book.settle(late, 200, 5, 5, False, "")
    document = book.caller_document(ME)
    assert book.window()["day"] == "2026-12-01" and book.window()["month"] == "2026-12"
    assert document["today"]["tokens"] == 0 and document["month"]["tokens"] == 0   # a new month too
    assert document["left"] == {"tokens_per_day": 100, "tokens_per_month": 150, "requests_per_minute": None}
    assert isinstance(book.admit(ME, _facts(10)), Reservation)


def test_a_limit_changed_in_the_file_never_resets_what_was_spent() -> None:
    book = UsageBook(Calendar("UTC"), clock=lambda: 1_800_000_000.0)
    book.budgets = {ME: Budget(tokens_per_day=100)}
    reservation = book.admit(ME, _facts(10))
    assert isinstance(reservation, Reservation)
    book.settle(reservation, 200, 50, 50, False, "")
    assert isinstance(book.admit(ME, _facts(10)), Refusal)
    book.budgets = {ME: Budget(tokens_per_day=150)}
    assert book.caller_document(ME)["left"]["tokens_per_day"] == 50


def test_a_store_that_fails_keeps_the_rows_says_so_and_writes_them_once_it_can(tmp_path, caplog) -> None:
    class DiskFullOnce(SqliteStore):
        failed = False

        def write(self, rows) -> None:
            if not self.failed:
                self.failed = True
                raise OSError(28, "No space left on device")
            super().write(rows)

    store = DiskFullOnce(tmp_path / "ledger.sqlite3")
    writer = LedgerWriter(store, retention=90 * 86400)
    now = time.time()
    writer.append(Row(ME, "m", "/v1/chat/completions", 200, 1, 1, False, now, now, "", "2026-11-30", "r1"))
    wait_until(lambda: writer.failures == 1)
    writer.append(Row(ME, "m", "/v1/chat/completions", 200, 2, 2, False, now, now, "", "2026-11-30", "r2"))
    wait_until(lambda: writer.status() == {"written": 2, "failures": 1, "unwritten": 0, "spooled": 0, "set_aside": 0},
               timeout=10)
    writer.close()
    assert "No space left on device" in caplog.text and "keeping them" in caplog.text
    reopened = SqliteStore(tmp_path / "ledger.sqlite3")
    assert reopened.rows() == 2 and reopened.daily("2026-11-30", "2026-11-30")[0].tally.tokens == 6
    reopened.close()


def test_a_ledger_from_before_request_ids_is_migrated_in_place(tmp_path) -> None:
    path = tmp_path / "ledger.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(_SCHEMA[0] + "PRAGMA user_version = 1;")
    old.execute("INSERT INTO requests (caller, model, path, status, prompt_tokens, completion_tokens, estimated,"
                " started, ended, key, day) VALUES (?, 'm', '/v1/chat/completions', 200, 1, 2, 0, 1.0, 2.0, '', "
                "'2026-11-30')", (ME,))
    old.commit()
    old.close()
    store = SqliteStore(path)
    store.write([tuple(Row(ME, "m", "/v1/chat/completions", 200, 3, 4, False, 3.0, 4.0, "", "2026-11-30", "r-new"))])
    last, rows = store.oldest(10)
    assert [(row[0], row[4], row[-1]) for row in rows] == [(ME, 1, ""), (ME, 3, "r-new")]
    assert store._db.execute("PRAGMA user_version").fetchone()[0] == len(_SCHEMA)
    store.close()
