"""Every request under /v1 that costs goes through its caller's budget and is billed to it, on the
SQLite ledger and on a PostgreSQL store alike; nothing a client or an upstream sends can stall
the ledger or leave a budget hold behind; a budget is overshot by no more than the README says.

Real parts: the proxy in this process on a loopback port, the fake OpenAI upstream (chat,
Responses API, anything else echoed), the official SDK or aiohttp as the client, and a
PostgreSQL cluster of the module's own (Debian's server).
"""
from __future__ import annotations

import asyncio
import json
import sqlite3
import textwrap
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest
from fakes import PROMPT_TOKENS, FakeUpstream
from openai.types.chat import ChatCompletionMessageParam
from postgres_cluster import PASSWORD, PostgresCluster
from proxy_fixtures import cluster, upstream

from conftest import eventually, free_ports, wait_until
from proxy.budget import Reservation, UsageBook
from proxy.calendar import Calendar
from proxy.ledger import _SCHEMA, LedgerWriter, Row, SqliteStore
from proxy.metering import Metering, MeteringPolicy, Refused
from proxy.postgres import PostgresStore
from proxy.request_body import DEFAULT_COMPLETION_RESERVE, RequestFacts, Unreadable, inspect
from proxy.service import ProxyService, ledger_path, set_aside_path
from proxy.shared import SharedStore
from proxy.usage import MAX_REPORTED_TOKENS
from reconciler.desired.model import Budget, MeteringSettings, load
from reconciler.runtime.instance_keys import InstanceKeys
from reconciler.runtime.statedir import StateDir

ME = "st-instance-8001"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
PASSWORD_ENV = "CST_TEST_STORE_PASSWORD"
POLICY = MeteringPolicy(MeteringSettings())
ONE_CHAT = PROMPT_TOKENS + 5   # what the fake upstream reports for one chat (5 chunks)


class Pool:
    """A proxy on one of the two stores, with an instance key under a budget."""

    def __init__(self, folder: Path, upstream: FakeUpstream, store: str | None, cluster: PostgresCluster | None):
        self.folder, self.upstream, self.store, self.cluster = folder, upstream, store, cluster
        self.service: ProxyService | None = None
        self.key = InstanceKeys(StateDir(folder / ".cst")).ensure(ME)

    async def start(self, budget: str, metering: str = "") -> "Pool":
        usage = f'  usage: {{store: "{self.store}", store_password_env: {PASSWORD_ENV}}}\n' if self.store else ""
        path = self.folder / "desired.yaml"
        path.write_text(
            "version: 1\nsettings:\n  state_dir: .cst\n" + usage +
            f"  proxy:\n    listen: \"127.0.0.1:{free_ports(1)[0]}\"\n    upstream: \"{self.upstream.url}/v1\"\n"
            + textwrap.indent(textwrap.dedent(metering), "    ") +
            "accounts:\n  - {name: main, provider: static, keys_env: CST_TEST_POOL_KEYS}\n"
            f"instances:\n  - port: 8001\n    budget: {budget}\n")
        self.service = ProxyService(load(path))
        await self.service.start()
        return self

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
            self.service = None

    @property
    def url(self) -> str:
        assert self.service is not None
        return self.service.url

    @property
    def book(self) -> UsageBook:
        assert self.service is not None and self.service.state is not None
        return self.service.state.usage

    def sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.key, max_retries=0, timeout=20)

    async def post(self, path: str, body: Any = None, data: bytes | None = None) -> tuple[int, Any]:
        async with (aiohttp.ClientSession() as http,
                    http.post(self.url + path, json=body if data is None else None, data=data,
                              headers={"Authorization": f"Bearer {self.key}"}) as resp):
            return resp.status, await resp.json(content_type=None)

    def rows(self) -> list[tuple]:
        """(model, path, status, prompt, completion, estimated) of each row in the store."""
        columns = "model, path, status, prompt_tokens, completion_tokens, estimated"
        if self.store is None:
            db: Any = sqlite3.connect(f"file:{ledger_path(self.folder / '.cst')}?mode=ro", uri=True)
            try:
                return [(*r[:5], bool(r[5])) for r in db.execute(f"SELECT {columns} FROM requests ORDER BY id")]
            finally:
                db.close()
        assert self.cluster is not None
        with self.cluster.connect(self.store.rsplit("/", 1)[1]) as db:
            return list(db.execute(f"SELECT {columns} FROM cst_requests ORDER BY id"))

    def held(self) -> int:
        """Tokens still held by requests in flight (in the store, when shared)."""
        if self.store is None:
            return self.book.reserved(ME)
        assert self.cluster is not None
        with self.cluster.connect(self.store.rsplit("/", 1)[1]) as db:
            holds = db.execute("SELECT count(*) FROM cst_holds").fetchone()[0]
            holding = db.execute("SELECT coalesce(sum(holding), 0) FROM cst_callers").fetchone()[0]
            return int(holds) + int(holding)

    def spent(self) -> int:
        return sum(prompt + completion for _, _, _, prompt, completion, _ in self.rows())


@pytest.fixture(params=["sqlite", "postgresql"])
async def pool(request: pytest.FixtureRequest, tmp_path: Path, upstream: FakeUpstream,
               monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Pool]:
    monkeypatch.setenv("CST_TEST_POOL_KEYS", "sk-good-aaaaaaaaaaaa1111")
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    found: PostgresCluster | None = None
    store = None
    if request.param == "postgresql":
        found = request.getfixturevalue("cluster")
        store = found.url(found.new_database())
    made = Pool(tmp_path, upstream, store, found)
    try:
        yield made
    finally:
        await made.stop()


# -- one admission for every path that costs ------------------------------------------------------

COSTLY = ["/v1/responses", "/v1/chat/completions/", "/v1//chat/completions", "/v1/./chat/completions",
          "/v1/completions", "/v1/embeddings", "/v1/images/generations", "/v1/audio/speech", "/v1/moderations",
          "/v1/chat%2Fcompletions", "/v1/a/path/nobody/knows"]


async def test_with_the_budget_spent_every_path_that_costs_gets_429_and_the_model_list_still_answers(
        pool: Pool) -> None:
    await pool.start(f"{{tokens_per_day: {ONE_CHAT}}}")
    client = pool.sdk()
    await client.chat.completions.create(model="gpt-fake", messages=HI)
    seen = len(pool.upstream.seen)
    for path in COSTLY:
        status, answer = await pool.post(path, {"model": "gpt-fake", "input": "hi", "messages": HI, "prompt": "hi"})
        assert status == 429 and answer["error"]["code"] == "budget_exceeded", (path, status, answer)
    assert len(pool.upstream.seen) == seen   # none went upstream
    models = await client.models.list()   # SillyTavern shows "Not connected" when this fails
    assert [m.id for m in models.data] == ["gpt-fake", "emb-fake"]
    await client.close()


async def test_a_responses_call_is_billed_its_usage_whole_and_streamed(pool: Pool) -> None:
    await pool.start("{tokens_per_day: 100000}")
    client = pool.sdk()
    answer = await client.responses.create(model="gpt-fake", input="hi")
    assert answer.usage is not None and answer.usage.output_tokens == 5
    stream = await client.responses.create(model="gpt-fake", input="hi", stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[-1] == "response.completed" and kinds.count("response.output_text.delta") == 5
    await client.close()
    await eventually(lambda: len(pool.rows()) == 2)
    assert pool.rows() == [("gpt-fake", "/v1/responses", 200, PROMPT_TOKENS, 5, False)] * 2
    assert pool.book.caller_document(ME)["today"]["tokens"] == 2 * ONE_CHAT


async def test_paths_whose_cost_comes_later_and_paths_the_file_refuses_are_refused(pool: Pool) -> None:
    await pool.start("{tokens_per_day: 100000}", metering="""\
        metering:
          per_request: 700
          paths: {"/v1/audio/*": refuse, "/v1/images/*": 5000}
        """)
    for path, body, code in (("/v1/batches", {"input_file_id": "f"}, "cost_deferred"),
                             ("/v1/files", None, "cost_deferred"),
                             ("/v1/fine_tuning/jobs", {"model": "m"}, "cost_deferred"),
                             ("/v1/threads/t1/runs", {"assistant_id": "a"}, "cost_deferred"),
                             ("/v1/responses", {"model": "m", "input": "hi", "background": True}, "cost_deferred"),
                             ("/v1/audio/speech", {"model": "tts", "input": "hi"}, "path_refused")):
        status, answer = await pool.post(path, body, data=None if body else b"multipart...")
        assert status == 403 and answer["error"]["code"] == code, (path, answer)
    assert pool.upstream.seen == []
    status, _ = await pool.post("/v1/images/generations", {"model": "img", "prompt": "a cat"})
    assert status == 200
    status, _ = await pool.post("/v1/moderations", {"input": "hi"})
    assert status == 200
    status, answer = await pool.post("/v1/chat/completions", data=b"[1, 2]")
    assert status == 400 and answer["error"]["code"] == "invalid_body"
    await eventually(lambda: len(pool.rows()) == 2)
    assert pool.rows() == [("", "/v1/images/generations", 200, 5000, 0, True), ("", "/v1/moderations", 200, 700, 0, True)]


async def test_deferred_paths_pass_when_the_file_allows_them_charged_per_request(pool: Pool) -> None:
    await pool.start("{tokens_per_day: 100000}", metering="metering: {deferred: allow}\n")
    status, _ = await pool.post("/v1/batches", {"input_file_id": "f", "endpoint": "/v1/chat/completions"})
    assert status == 200
    await eventually(lambda: len(pool.rows()) == 1)
    assert pool.rows() == [("", "/v1/batches", 200, MeteringSettings().per_request, 0, True)]


# -- nothing stalls the ledger -----------------------------------------------------------------------

async def test_a_nul_in_the_model_name_is_cleaned_and_the_rows_after_it_are_written(pool: Pool) -> None:
    await pool.start("{tokens_per_day: 100000}")
    client = pool.sdk()
    await client.chat.completions.create(model="before", messages=HI)
    await client.chat.completions.create(model="a\x00b\x1b[31m", messages=HI)
    for _ in range(3):
        await client.chat.completions.create(model="after", messages=HI)
    await client.close()
    await eventually(lambda: len(pool.rows()) == 5, failure=lambda: f"rows: {pool.rows()}")
    assert [row[0] for row in pool.rows()] == ["before", "a\ufffdb\ufffd[31m", "after", "after", "after"]
    await eventually(lambda: pool.held() == 0)
    assert pool.book.ledger is not None and pool.book.ledger.status()["set_aside"] == 0
    await pool.stop()   # a restart reads every row's tokens back
    await pool.start("{tokens_per_day: 100000}")
    assert pool.book.caller_document(ME)["today"]["tokens"] == 5 * ONE_CHAT


async def test_usage_figures_beyond_belief_are_clamped_and_the_ledger_writes_on(pool: Pool) -> None:
    await pool.start("{tokens_per_month: 1000000000}")
    client = pool.sdk()
    await client.chat.completions.create(model="huge-usage", messages=HI)
    await client.chat.completions.create(model="gpt-fake", messages=HI)
    await client.close()
    await eventually(lambda: len(pool.rows()) == 2)
    assert [row[3:5] for row in pool.rows()] == [(MAX_REPORTED_TOKENS, MAX_REPORTED_TOKENS), (PROMPT_TOKENS, 5)]
    assert pool.book.caller_document(ME)["month"]["tokens"] == 2 * MAX_REPORTED_TOKENS + ONE_CHAT


def _raw_row(rid: str, model: str = "m", prompt: int = 1) -> Row:
    now = time.time()
    return Row(ME, model, "/v1/chat/completions", 200, prompt, 1, False, now, now, "", "2026-12-01", rid)


def _store(kind: str, tmp_path: Path, cluster: PostgresCluster | None) -> SqliteStore | PostgresStore:
    if kind == "sqlite":
        return SqliteStore(tmp_path / "ledger.sqlite3")
    assert cluster is not None
    return PostgresStore(cluster.url(cluster.new_database()), {"password": PASSWORD, "autocommit": True})


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_row_the_store_refuses_is_set_aside_and_the_rows_behind_it_are_written(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """What cleaning cannot foresee (a row as an older version queued it): SQLite cannot take an
    integer of 2^64, PostgreSQL a NUL in text."""
    found = request.getfixturevalue("cluster") if kind == "postgresql" else None
    store = _store(kind, tmp_path, found)
    aside = set_aside_path(tmp_path)
    writer = LedgerWriter(store, retention=86400, set_aside=aside)
    poisoned = _raw_row("r2", model="a\x00b") if kind == "postgresql" else _raw_row("r2", prompt=2 ** 64)
    for row in (_raw_row("r1"), poisoned, _raw_row("r3"), _raw_row("r4")):
        writer.append(row)
    wait_until(lambda: writer.status()["written"] == 3 and writer.status()["set_aside"] == 1)
    writer.close()
    kept = [json.loads(line) for line in aside.read_text().splitlines()]
    assert [entry["row"]["rid"] for entry in kept] == ["r2"] and oct(aside.stat().st_mode & 0o777) == "0o600"
    reopened = _store(kind, tmp_path, None) if kind == "sqlite" else store
    assert reopened.daily("2026-12-01", "2026-12-01")[0].tally.requests == 3
    reopened.close()


def test_a_poisoned_spool_from_an_older_version_is_replayed_cleaned(tmp_path: Path, cluster: PostgresCluster) -> None:
    spool = SqliteStore(tmp_path / "spool.sqlite3")
    spool.write([tuple(_raw_row("s1")), tuple(_raw_row("s2", model="x\x00y")), tuple(_raw_row("s3", prompt=2 ** 62))])
    store = _store("postgresql", tmp_path, cluster)
    writer = LedgerWriter(store, retention=86400, spool=spool, set_aside=set_aside_path(tmp_path))
    wait_until(lambda: writer.status()["spooled"] == 0 and writer.status()["written"] == 3)
    writer.close()
    assert isinstance(store, PostgresStore)
    total = store.daily("2026-12-01", "2026-12-01")[0].tally
    assert total.requests == 3 and total.prompt_tokens == 1 + 1 + 10_000_000
    store.close()


def test_a_ledger_with_figures_beyond_belief_is_repaired_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(_SCHEMA[0] + _SCHEMA[1] + "PRAGMA user_version = 2;")
    old.execute("INSERT INTO requests (caller, model, path, status, prompt_tokens, completion_tokens, estimated,"
                " started, ended, key, day, rid) VALUES (?, 'm', '/v1/chat/completions', 200, ?, 5, 0, 1, 1, '',"
                " '2026-12-01', 'r1')", (ME, 2 ** 62))
    old.execute("INSERT INTO daily VALUES ('2026-12-01', ?, 1, 0, ?, 5, 0)", (ME, 2 ** 62))
    old.commit()
    old.close()
    store = SqliteStore(path)
    assert store.daily("2026-12-01", "2026-12-01")[0].tally.prompt_tokens == 10_000_000
    store.write([tuple(_raw_row("r2"))])   # and it adds up again
    assert store.daily("2026-12-01", "2026-12-01")[0].tally.requests == 2
    store.close()


def test_a_store_with_figures_beyond_belief_is_repaired_once_without_a_new_schema_version(
        tmp_path: Path, cluster: PostgresCluster) -> None:
    database = cluster.new_database()
    store = PostgresStore(cluster.url(database), {"password": PASSWORD, "autocommit": True})
    store.ensure_schema()
    with cluster.connect(database) as db:
        db.execute("DELETE FROM cst_repairs")   # as a store an older version left
        db.execute("INSERT INTO cst_daily VALUES ('2026-12-01', %s, 2, 0, %s, 7, 0)", (ME, 2 ** 62))
        version = db.execute("SELECT max(version) FROM cst_schema").fetchone()[0]
    store.close()
    again = PostgresStore(cluster.url(database), {"password": PASSWORD, "autocommit": True})
    again.ensure_schema()
    assert again.daily("2026-12-01", "2026-12-01")[0].tally.prompt_tokens == 20_000_000
    with cluster.connect(database) as db:
        assert db.execute("SELECT max(version) FROM cst_schema").fetchone()[0] == version   # old replicas run on
        assert [r[0] for r in db.execute("SELECT name FROM cst_repairs")] == ["clamp-tokens"]
    again.close()


# -- holds -----------------------------------------------------------------------------------------------

async def test_a_reserve_cancelled_after_its_batch_granted_it_holds_nothing(
        cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one await of a reservation, past its decision: the task is cancelled in the same step
    that hands it its grant (its client hung up then), so it never resumes to settle."""
    database = cluster.new_database()
    connect = {"password": PASSWORD, "autocommit": True}
    store = PostgresStore(cluster.url(database), connect)
    shared = SharedStore(cluster.url(database), connect, "replica-a", False, store.ensure_schema,
                         lambda _: None, lambda _: None)
    await shared.start(10)
    asking: list[asyncio.Task[Any]] = []
    decide = SharedStore._decide_batch

    async def decide_then_hang_up(self: SharedStore, batch: Any) -> None:
        await decide(self, batch)
        asking[0].cancel()   # the answer is set; its task has not resumed yet

    monkeypatch.setattr(SharedStore, "_decide_batch", decide_then_hang_up)
    try:
        asking.append(asyncio.create_task(shared.reserve(ME, Budget(tokens_per_day=1000), 100, time.time(),
                                                         "2026-12-01", "2026-12", "granted-then-gone")))
        with pytest.raises(asyncio.CancelledError):
            await asking[0]

        def holds() -> list[tuple]:
            with cluster.connect(database) as db:
                return list(db.execute("SELECT h.id FROM cst_holds h")) + \
                    list(db.execute("SELECT holding FROM cst_callers WHERE holding <> 0"))
        await eventually(lambda: holds() == [], timeout=5, failure=lambda: f"left: {holds()}")
    finally:
        await shared.close()
        store.close()


async def test_a_client_that_hangs_up_mid_stream_leaves_no_hold(pool: Pool) -> None:
    await pool.start("{tokens_per_day: 100000}")
    async with (aiohttp.ClientSession() as http,
                http.post(pool.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {pool.key}"},
                          json={"model": "slow-stream", "stream": True, "messages": HI}) as resp):
        await resp.content.readline()
        assert pool.held() > 0
    await eventually(lambda: pool.held() == 0 and len(pool.rows()) == 1)
    assert pool.rows()[0][2] == 0   # the row says the client hung up


# -- read at the top level only; a budget holds -------------------------------------------------------------

async def test_a_tool_property_named_stream_does_not_hide_the_request_s_own_stream(pool: Pool) -> None:
    pool.upstream.stream_usage = "asked"   # as OpenAI: usage only when the request asks for it
    await pool.start("{tokens_per_day: 100000}")
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"stream": {"type": "boolean"}}, "stream": False}}}
    body = b'{"tools": ' + json.dumps([tool]).encode() + b', "model": "gpt-fake", "messages": ' + \
        json.dumps(HI).encode() + b', "stream": true}'
    assert body.find(b'"stream"') < body.rfind(b'"stream": true')
    async with aiohttp.ClientSession() as http, http.post(pool.url + "/v1/chat/completions", data=body,
                         headers={"Authorization": f"Bearer {pool.key}", "Content-Type": "application/json"}) as resp:
        events = (await resp.read()).split(b"\n\n")
    assert b'"choices": []' not in b"".join(events)   # the usage event it did not ask for is not relayed
    await eventually(lambda: len(pool.rows()) == 1)
    assert pool.rows() == [("gpt-fake", "/v1/chat/completions", 200, PROMPT_TOKENS, 5, False)]   # not an estimate


def test_n_and_best_of_reserve_every_answer() -> None:
    def facts(**fields: Any) -> RequestFacts:
        found = inspect("/v1/chat/completions" if "best_of" not in fields else "/v1/completions", "POST",
                        json.dumps({"model": "m", "messages": HI, **fields}).encode(), POLICY)
        assert isinstance(found, RequestFacts)
        return found

    one, four = facts(max_tokens=100), facts(max_tokens=100, n=4)
    assert four.reservation - four.prompt_estimate == 4 * (one.reservation - one.prompt_estimate) == 400
    assert facts(max_tokens=100, n=2, best_of=5).choices == 5
    assert facts(n=4).reservation == facts(n=4).prompt_estimate + 4 * DEFAULT_COMPLETION_RESERVE
    nested = facts(max_tokens=10, tools=[{"n": 50, "max_tokens": 99999, "model": "x", "stream": True}])
    assert (nested.choices, nested.completion_limit, nested.model, nested.stream) == (1, 10, "m", False)


def test_what_is_refused_before_it_goes_upstream() -> None:
    assert inspect("/v1/chat/completions", "POST", b'{"n": NaN}', POLICY) is Unreadable.NOT_AN_OBJECT
    assert inspect("/v1/chat/completions", "POST", b"", POLICY) is Unreadable.NOT_AN_OBJECT
    assert inspect("/v1/batches", "POST", b"{}", POLICY) is Refused.DEFERRED
    free = inspect("/v1/models", "GET", b"", POLICY)
    assert isinstance(free, RequestFacts) and free.metering is Metering.FREE and free.reservation == 0


async def test_n_4_near_the_end_of_a_budget_is_sent_with_its_limit_lowered_to_what_is_left(pool: Pool) -> None:
    budget = 2000
    await pool.start(f"{{tokens_per_day: {budget}}}")
    client = pool.sdk()
    await client.chat.completions.create(model="verbose", messages=HI, max_tokens=1500)   # 1,503 spent
    await client.chat.completions.create(model="verbose", messages=HI, max_tokens=1000, n=4)
    sent = json.loads(pool.upstream.seen[-1].body)
    assert sent["n"] == 4 and 0 < sent["max_tokens"] < (budget - 1503) // 4
    await client.close()
    await eventually(lambda: len(pool.rows()) == 2)
    assert pool.spent() <= budget   # the fake's prompt (3 tokens) is below the estimate: no overshoot at all


async def test_concurrent_requests_without_a_limit_cannot_overshoot_the_budget(pool: Pool) -> None:
    """Ten requests at once, each asking for no limit (the fake would generate 100,000 tokens),
    against a budget of 3,000: each is sent with a limit within what it holds."""
    budget = 3000
    await pool.start(f"{{tokens_per_day: {budget}}}")
    client = pool.sdk()
    results = await asyncio.gather(*(client.chat.completions.create(model="verbose", messages=HI)
                                     for _ in range(10)), return_exceptions=True)
    await client.close()
    admitted = [r for r in results if not isinstance(r, BaseException)]
    assert admitted and all(isinstance(r, openai.RateLimitError) for r in results if isinstance(r, BaseException))
    await eventually(lambda: len(pool.rows()) == 10 and pool.held() == 0)
    # the README's bound: each request's prompt underestimate (none here: the fake's prompt is 3
    # tokens, far below the estimate) plus one token an answer when what it holds is below its estimate
    assert pool.spent() <= budget + len(admitted), pool.rows()
    assert all("max_tokens" in json.loads(seen.body) for seen in pool.upstream.seen)


def test_a_local_admission_near_the_end_lowers_the_limit() -> None:
    book = UsageBook(Calendar("UTC"), clock=lambda: 1_800_000_000.0)
    book.budgets = {ME: Budget(tokens_per_day=500)}
    facts = inspect("/v1/responses", "POST", json.dumps({"model": "m", "input": "hi"}).encode(), POLICY)
    assert isinstance(facts, RequestFacts) and not facts.limited
    held = book.admit(ME, facts)
    assert isinstance(held, Reservation) and held.tokens == 500
    sent = json.loads(held.facts.body)
    assert sent["max_output_tokens"] == 500 - facts.prompt_estimate and held.facts.limited


@pytest.mark.parametrize("fields, sent", [
    ({}, {"max_tokens": 90}),                                                  # none: one added
    ({"max_tokens": None}, {"max_tokens": 90}),                                # null: replaced
    ({"max_tokens": 500, "max_completion_tokens": 800}, {"max_tokens": 90, "max_completion_tokens": 90}),
    ({"max_tokens": 50}, {"max_tokens": 50}),                                  # it fits: sent as it came
])
def test_the_limit_a_request_is_sent_with_under_a_budget(fields: dict[str, Any], sent: dict[str, Any]) -> None:
    facts = inspect("/v1/chat/completions", "POST", json.dumps({"model": "m", "messages": HI, **fields}).encode(),
                    POLICY)
    assert isinstance(facts, RequestFacts)
    body = json.loads(facts.within(facts.prompt_estimate + 90).body)
    assert {name: body[name] for name in sent} == sent and body["messages"] == HI
