"""Proxy replicas on one PostgreSQL store: one budget, one ledger, one view of the keys' health and
of the instances' keys, and what happens while the store is away.

Real parts throughout: a PostgreSQL cluster of the tests' own (Debian's server), ``cst proxy``
replicas as processes (``--listen`` on one desired.yaml), the official SDK as the client. The
upstream is the fake one (an LLM is outside our reach).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import aiohttp
import openai
import pytest
import trustme
from fakes import FakeUpstream
from postgres_cluster import PASSWORD, PostgresCluster
from proxy_fixtures import cluster, store_url, upstream

from conftest import eventually, fake_upstream, free_ports, http_status, standin_file, wait_until
from proxy.ledger import Row, StoreUnavailable
from proxy.postgres import PostgresStore, connection_settings
from proxy.service import ProxyService
from proxy.shared import SharedStore
from reconciler.desired.model import Budget, UsageSettings, load, parse
from reconciler.runtime.instance_keys import InstanceKeys
from reconciler.runtime.statedir import StateDir

CST = (sys.executable, "-m", "reconciler")
ROOT = Path(__file__).resolve().parents[2]
ME = "st-instance-8001"
PASSWORD_ENV = "CST_TEST_STORE_PASSWORD"
KEYS_ENV = "CST_TEST_POOL_KEYS"


def write_desired(path: Path, upstream_url: str, store: str, state_dir: str = ".cst", budget: str = "",
                  usage_extra: str = "") -> Path:
    path.write_text(textwrap.dedent(f"""\
        version: 1
        settings:
          state_dir: {state_dir}
          usage:
            store: "{store}"
            store_password_env: {PASSWORD_ENV}
            {usage_extra}
          proxy:
            listen: "127.0.0.1:{free_ports(1)[0]}"
            upstream: "{upstream_url}/v1"
            timeout: 10s
        accounts:
          - {{name: pool, provider: static, keys_env: {KEYS_ENV}}}
        instances:
          - port: 8001
            {budget}
        """))
    return path


class Replicas:
    """``cst proxy`` processes on free ports, stopped by pid at the end."""

    def __init__(self, folder: Path, keys: str):
        self.folder = folder
        self.env = {**os.environ, PASSWORD_ENV: PASSWORD, KEYS_ENV: keys}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    async def start(self, desired: Path, count: int = 1) -> list[str]:
        urls = []
        for port in free_ports(count):
            with open(self.folder / f"replica-{port}.log", "wb") as log:
                self.procs[port] = subprocess.Popen([*CST, "proxy", "-f", str(desired), "--listen", f"127.0.0.1:{port}"],
                                                    env=self.env, stdout=log, stderr=subprocess.STDOUT)
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            await eventually(lambda url=url: self._store_up(url), timeout=30,
                             failure=lambda url=url: f"{url} never reported its store up:\n{self.log(url)}")
        return urls

    def log(self, url: str) -> str:
        return (self.folder / f"replica-{url.rsplit(':', 1)[1]}.log").read_text(errors="replace")[-3000:]

    async def _store_up(self, url: str) -> bool:
        health = await get_json(url + "/health")
        return health is not None and health["store"]["state"] == "up"

    def kill(self, url: str) -> None:
        proc = self.procs.pop(int(url.rsplit(":", 1)[1]))
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[Replicas]:
    started = Replicas(tmp_path, "sk-good-1,sk-good-2")
    try:
        yield started
    finally:
        started.stop_all()


async def get_json(url: str, key: str | None = None) -> dict | None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
            return await response.json() if response.status == 200 else None
    except aiohttp.ClientError:
        return None


def client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


async def chat(url: str, key: str, model: str = "gpt-4o-mini") -> str:
    answer = await client(url, key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=20)
    return answer.choices[0].message.content or ""


def instance_key(state_dir: Path, id_: str = ME) -> str:
    return InstanceKeys(StateDir(state_dir)).ensure(id_)


def ledger_rows(cluster: PostgresCluster, store_url: str, caller: str = ME) -> list[tuple]:
    with cluster.connect(store_url.rsplit("/", 1)[1]) as db:
        return db.execute("SELECT rid, status, key FROM cst_requests WHERE caller = %s ORDER BY id",
                          (caller,)).fetchall()


# -- budgets ---------------------------------------------------------------------------------------

async def test_fifty_concurrent_requests_over_three_replicas_admit_what_one_would(
        tmp_path: Path, upstream: FakeUpstream, replicas: Replicas, cluster: PostgresCluster, store_url: str) -> None:
    desired = write_desired(tmp_path / "desired.yaml", upstream.url, store_url,
                            budget="budget: {requests_per_minute: 5}")
    key = instance_key(tmp_path / ".cst")
    urls = await replicas.start(desired, 3)

    async def one(i: int) -> str:
        try:
            await chat(urls[i % 3], key)
            return "admitted"
        except openai.RateLimitError as exc:
            assert exc.code == "budget_exceeded", exc
            return "refused"

    outcomes = await asyncio.gather(*(one(i) for i in range(50)))
    # one atomic decision in the store: exactly what a single proxy admits (the issue allows one
    # more per replica; this store needs none)
    assert outcomes.count("admitted") == 5, outcomes
    assert len(upstream.keys_seen("/v1/chat/completions")) == 5

    # every request is in the one ledger once; cst usage reads it from the store
    await eventually(lambda: len(ledger_rows(cluster, store_url)) == 50, timeout=10,
                     failure=lambda: f"{len(ledger_rows(cluster, store_url))} rows")
    rows = ledger_rows(cluster, store_url)
    assert sorted(status for _, status, _ in rows) == [200] * 5 + [429] * 45
    assert len({rid for rid, _, _ in rows}) == 50
    shown = subprocess.run([*CST, "usage", "-f", str(desired), "-o", "json"], capture_output=True, text=True,
                           env=replicas.env, check=True)
    today = json.loads(shown.stdout)["instances"][ME]["today"]
    assert today["requests"] == 50 and today["errors"] == 45


# -- key health ------------------------------------------------------------------------------------

async def _key_available(url: str, key: str, masked_prefix: str) -> bool | None:
    status = await get_json(url + "/status", key)
    if status is None:
        return None
    keys = [k for k in status["accounts"]["pool"]["keys"] if k["key"].startswith(masked_prefix)]
    return keys[0]["available"] if keys else None


async def _skips(url: str, key: str, masked_prefix: str) -> bool:
    return await _key_available(url, key, masked_prefix) is False


async def test_a_key_cooled_by_a_429_on_one_replica_is_skipped_by_all(
        tmp_path: Path, upstream: FakeUpstream, replicas: Replicas, store_url: str) -> None:
    replicas.env[KEYS_ENV] = "sk-429-aaaaaaaaaaaa,sk-good-bbbbbbbbbbbb"
    desired = write_desired(tmp_path / "desired.yaml", upstream.url, store_url)
    key = instance_key(tmp_path / ".cst")
    first, *others = await replicas.start(desired, 3)

    # the first replica meets the 429 (Retry-After: 30) on one of its first two requests
    for _ in range(2):
        await chat(first, key)
    assert any(k.startswith("sk-429-") for k in upstream.keys_seen("/v1/chat/completions"))
    learnt = time.monotonic()
    for url in others:
        await eventually(lambda url=url: _skips(url, key, "sk-42"), timeout=1.0,
                         failure=lambda url=url: f"{url} still offers the cooled key")
    assert time.monotonic() - learnt < 1.0
    seen = len(upstream.keys_seen("/v1/chat/completions"))
    for url in others:
        for _ in range(4):
            await chat(url, key)
    after = upstream.keys_seen("/v1/chat/completions")[seen:]
    assert len(after) == 8 and all(k.startswith("sk-good-") for k in after), after

    # a replica that starts now learns the cooldown from the store
    [late] = await replicas.start(desired, 1)
    assert await _skips(late, key, "sk-42")


# -- instance keys ---------------------------------------------------------------------------------

async def test_replicas_without_the_state_dir_accept_an_instance_key_and_refuse_it_once_revoked(
        tmp_path: Path, upstream: FakeUpstream, replicas: Replicas, store_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # cst serve's proxy (the one that publishes) owns the state dir where the keys are minted
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    monkeypatch.setenv(KEYS_ENV, "sk-good-1")
    owner_file = write_desired(tmp_path / "serve.yaml", upstream.url, store_url, state_dir="serve-state")
    key = instance_key(tmp_path / "serve-state")
    owner = ProxyService(load(owner_file), publishes_keys=True)
    await owner.start()
    try:
        # the replicas run elsewhere: a state dir of their own, with no key in it
        elsewhere = write_desired(tmp_path / "replica.yaml", upstream.url, store_url, state_dir="elsewhere")
        urls = await replicas.start(elsewhere, 3)
        for url in urls:
            await eventually(lambda url=url: _answers(url, key), timeout=5,
                             failure=lambda url=url: f"{url} never accepted the published key")
        assert InstanceKeys(StateDir(tmp_path / "elsewhere")).all() == {}   # they know it only from the store

        InstanceKeys(StateDir(tmp_path / "serve-state")).revoke(ME)
        revoked = time.monotonic()
        for url in urls:
            await eventually(lambda url=url: _refused(url, key), timeout=1.0,
                             failure=lambda url=url: f"{url} still accepts a revoked key")
        assert time.monotonic() - revoked < 1.0
    finally:
        await owner.stop()


async def _answers(url: str, key: str) -> bool:
    try:
        await chat(url, key)
        return True
    except openai.AuthenticationError:
        return False


async def _refused(url: str, key: str) -> bool:
    return not await _answers(url, key)


# -- a replica lost ---------------------------------------------------------------------------------

async def test_a_replica_killed_mid_stream_leaves_the_others_serving_and_every_settled_request_once(
        tmp_path: Path, upstream: FakeUpstream, replicas: Replicas, cluster: PostgresCluster, store_url: str) -> None:
    desired = write_desired(tmp_path / "desired.yaml", upstream.url, store_url)
    key = instance_key(tmp_path / ".cst")
    doomed, *others = await replicas.start(desired, 3)
    upstream.slow_gap = 0.3

    async def stream(url: str, started: asyncio.Event) -> str:
        chunks = await client(url, key).chat.completions.create(
            model="slow-stream", messages=[{"role": "user", "content": "a long answer"}], stream=True)
        text = ""
        async for chunk in chunks:
            started.set()
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
        return text

    events = [asyncio.Event() for _ in range(6)]
    streams = [asyncio.create_task(stream(url, events[i])) for i, url in enumerate([doomed, *others] * 2)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 10)
    replicas.kill(doomed)
    results = await asyncio.gather(*streams, return_exceptions=True)
    lost = [r for i, r in enumerate(results) if i % 3 == 0]
    served = [r for i, r in enumerate(results) if i % 3 != 0]
    assert all(isinstance(r, Exception) for r in lost), lost
    assert all(isinstance(r, str) and r for r in served), served
    for url in others:   # the survivors go on
        assert await chat(url, key)

    settled = len(served) + len(others)
    await eventually(lambda: len(ledger_rows(cluster, store_url)) >= settled, timeout=10)
    rows = ledger_rows(cluster, store_url)
    assert len(rows) == settled, rows   # the killed replica's streams never settled: no row, none twice
    assert all(status == 200 for _, status, _ in rows)
    assert len({rid for rid, _, _ in rows}) == len(rows)


# -- the store away ------------------------------------------------------------------------------

async def test_the_store_away_closed_refuses_and_recovers_open_serves_and_replays_its_spool_once(
        tmp_path: Path, upstream: FakeUpstream, replicas: Replicas) -> None:
    server = PostgresCluster(free_ports(1)[0])   # a cluster of its own: this test stops it
    try:
        server.start()
        url = server.url(server.new_database())
        closed_file = write_desired(tmp_path / "closed.yaml", upstream.url, url,
                                    budget="budget: {tokens_per_day: 1000000}")
        open_file = write_desired(tmp_path / "open.yaml", upstream.url, url,
                                  budget="budget: {tokens_per_day: 1000000}", usage_extra="on_store_down: open")
        key = instance_key(tmp_path / ".cst")
        [closed] = await replicas.start(closed_file)
        [opened] = await replicas.start(open_file)
        assert await chat(closed, key) and await chat(opened, key)

        server.stop()
        for replica in (closed, opened):
            await eventually(lambda replica=replica: _store_state(replica, "down"), timeout=10)
        with pytest.raises(openai.InternalServerError) as refused:
            await chat(closed, key)
        assert refused.value.status_code == 503 and refused.value.code == "store_unavailable"
        assert "127.0.0.1" in str(refused.value)   # it names the store
        health = await get_json(closed + "/health")
        assert health is not None and health["status"] == "store_down" and health["store"]["serving"] is False
        for _ in range(5):
            assert await chat(opened, key)
        # five rows at least: the row of the request just before the stop may be there too
        await eventually(lambda: _spooled(opened, 5, at_least=True), timeout=15,
                         failure=lambda: "the open replica's rows never reached its spool")

        server.start()
        for replica in (closed, opened):
            await eventually(lambda replica=replica: _store_state(replica, "up"), timeout=15)
        assert await chat(closed, key)
        await eventually(lambda: _spooled(opened, 0), timeout=15)
        with server.connect(url.rsplit("/", 1)[1]) as db:
            rows = db.execute("SELECT rid, status FROM cst_requests ORDER BY id").fetchall()
            today = db.execute("SELECT sum(requests) FROM cst_daily").fetchone()[0]
        # closed: 2 served (its 503 was never admitted, so never billed); open: 6 served
        assert len(rows) == 8 and len({rid for rid, _ in rows}) == 8 and today == 8
    finally:
        replicas.stop_all()
        server.remove()


async def _store_state(url: str, state: str) -> bool:
    health = await get_json(url + "/health")
    return health is not None and health["store"]["state"] == state


async def _spooled(url: str, count: int, at_least: bool = False) -> bool:
    health = await get_json(url + "/health")
    if health is None:
        return False
    spooled = health["ledger"]["spooled"]
    return spooled >= count if at_least else spooled == count


# -- the store itself ------------------------------------------------------------------------------

def _row(rid: str, tokens: int = 10) -> tuple:
    now = time.time()
    return tuple(Row(ME, "m", "/v1/chat/completions", 200, tokens, tokens, False, now, now, "", "2026-12-01", rid))


def test_a_batch_written_twice_counts_once_and_the_schema_is_versioned(
        cluster: PostgresCluster, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    usage = load_usage(store_url)
    store = PostgresStore(*connection_settings(usage, "test"))
    try:
        batch = [_row("a"), _row("b")]
        store.write(batch)
        store.write(batch + [_row("c")])   # a commit whose answer was lost, sent again with a new row
        assert store.rows() == 3
        [total] = store.daily("2026-12-01", "2026-12-01")
        assert total.tally.requests == 3 and total.tally.tokens == 60
    finally:
        store.close()
    with cluster.connect(store_url.rsplit("/", 1)[1]) as db:
        assert db.execute("SELECT max(version) FROM cst_schema").fetchone()[0] == 1
    # a second store on the same database migrates nothing twice
    again = PostgresStore(*connection_settings(usage, "test"))
    assert again.rows() == 3
    again.close()


def test_a_wrong_password_or_an_absent_store_is_a_clear_error(
        tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "not-the-password")
    store = PostgresStore(*connection_settings(load_usage(store_url), "test"))
    with pytest.raises(StoreUnavailable, match="password authentication failed"):
        store.rows()
    store.close()
    desired = write_desired(tmp_path / "desired.yaml", "http://127.0.0.1:9", store_url)
    shown = subprocess.run([*CST, "usage", "-f", str(desired)], capture_output=True, text=True,
                           env={**os.environ, PASSWORD_ENV: "not-the-password"})
    assert shown.returncode == 2   # the store could not be read: an action failed (README: exit codes)
    assert "cannot read the usage store" in shown.stderr and "password authentication failed" in shown.stderr
    assert "Traceback" not in shown.stderr and "not-the-password" not in shown.stderr


def load_usage(store_url: str) -> UsageSettings:
    text = f'version: 1\nsettings:\n  usage: {{store: "{store_url}", store_password_env: {PASSWORD_ENV}}}\n'
    return parse(text, Path("/tmp/desired.yaml")).settings.usage


async def _shared(url: str, replica: str) -> tuple[SharedStore, PostgresStore]:
    connect = {"password": PASSWORD, "autocommit": True}
    store = PostgresStore(url, connect)
    shared = SharedStore(url, connect, replica, False, store.ensure_schema, lambda _: None, lambda _: None)
    await shared.start(10)
    return shared, store


async def test_concurrent_reservations_never_hold_more_than_is_left(store_url: str) -> None:
    shared, store = await _shared(store_url, "replica-a")
    other, other_store = await _shared(store_url, "replica-b")
    budget = Budget(tokens_per_day=250)
    try:
        asks = [(shared if i % 2 else other).reserve(ME, budget, 100, time.time(), "2026-12-01", "2026-12", f"r{i}")
                for i in range(10)]
        granted = [tokens for tokens, _ in await asyncio.gather(*asks)]
        assert sorted(g for g in granted if g is not None) == [50, 100, 100]   # the last one gets what is left
        assert granted.count(None) == 7
        # what was held is released by the ledger's batch that records the requests
        store.write([_row(f"r{i}", 10) for i in range(10) if granted[i] is not None])
        tokens, used = await shared.reserve(ME, budget, 100, time.time(), "2026-12-01", "2026-12", "r-next")
        assert used.today == 60 and used.reserved == 0 and tokens == 100
    finally:
        for s, st in ((shared, store), (other, other_store)):
            await s.close()
            st.close()


async def test_a_request_gone_while_its_budget_is_decided_holds_nothing(
        cluster: PostgresCluster, store_url: str) -> None:
    shared, store = await _shared(store_url, "replica-a")
    database = store_url.rsplit("/", 1)[1]
    try:
        await shared.reserve(ME, Budget(tokens_per_day=1000), 1, time.time(), "2026-12-01", "2026-12", "first")
        with cluster.connect(database) as blocker:
            with blocker.transaction():   # another replica deciding for the same caller, slowly
                blocker.execute("SELECT 1 FROM cst_callers WHERE caller = %s FOR UPDATE", (ME,))
                asking = asyncio.create_task(shared.reserve(ME, Budget(tokens_per_day=1000), 100, time.time(),
                                                            "2026-12-01", "2026-12", "gone"))
                await eventually(lambda: _waiting_on_lock(cluster, database), timeout=5)
                asking.cancel()   # the client hung up
            with pytest.raises(asyncio.CancelledError):
                await asking
        await eventually(lambda: _holds(cluster, database) == ["first"], timeout=5,
                         failure=lambda: f"holds: {_holds(cluster, database)}")
        with cluster.connect(database) as db:   # what the caller holds is the one hold left
            assert db.execute("SELECT holding FROM cst_callers WHERE caller = %s", (ME,)).fetchone()[0] == 1
    finally:
        await shared.close()
        store.close()


def _waiting_on_lock(cluster: PostgresCluster, database: str) -> bool:
    with cluster.connect(database) as db:
        return bool(db.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                               " AND datname = %s", (database,)).fetchone()[0])


def _holds(cluster: PostgresCluster, database: str) -> list[str]:
    with cluster.connect(database) as db:
        return [row[0] for row in db.execute("SELECT id FROM cst_holds ORDER BY id")]


def test_tls_options_in_the_url_reach_libpq(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    authority, stranger = trustme.CA(), trustme.CA()
    certificate = authority.issue_cert("localhost", "127.0.0.1")
    server = PostgresCluster(free_ports(1)[0])
    try:
        server.serve_tls(certificate.cert_chain_pems[0].bytes(), certificate.private_key_pem.bytes())
        server.start()
        authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        stranger.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
        monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
        base = f"postgresql://cst@localhost:{server.port}/postgres?sslmode=verify-full&sslrootcert="
        trusted = PostgresStore(*connection_settings(load_usage(base + str(tmp_path / "ca.pem")), "test"))
        assert trusted.rows() == 0
        with trusted._connection() as db:   # the connection is encrypted
            assert db.pgconn.ssl_in_use
        trusted.close()
        doubted = PostgresStore(*connection_settings(load_usage(base + str(tmp_path / "other-ca.pem")), "test"))
        with pytest.raises(StoreUnavailable, match="certificate verify failed"):
            doubted.rows()
        doubted.close()
    finally:
        server.remove()


def test_a_password_file_others_can_read_is_refused_before_anything_starts(tmp_path: Path, store_url: str) -> None:
    password = tmp_path / "store-password"
    password.write_text(PASSWORD)
    password.chmod(0o644)
    desired = write_desired(tmp_path / "desired.yaml", "http://127.0.0.1:9", store_url)
    desired.write_text(desired.read_text().replace(f"store_password_env: {PASSWORD_ENV}",
                                                   f"store_password_file: {password}"))
    started = subprocess.run([*CST, "proxy", "-f", str(desired)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, KEYS_ENV: "sk-good-1"})
    assert started.returncode == 1, started.stderr
    assert "settings.usage.store's password" in started.stderr and "chmod 600" in started.stderr
    assert "Traceback" not in started.stderr
    password.chmod(0o600)
    usage = subprocess.run([*CST, "usage", "-f", str(desired)], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0, usage.stderr


# -- cst serve on the store ------------------------------------------------------------------------

async def test_cst_serve_publishes_its_instances_keys_and_its_api_reads_every_replicas_use(
        project, serve, tmp_path: Path, replicas: Replicas, cluster: PostgresCluster, store_url: str) -> None:
    api, proxy, port = free_ports(3)
    me = f"st-instance-{port}"
    with fake_upstream() as upstream:
        project.write(standin_file([(port, "running")], settings=(
            f'resync: 1s\napi: {{listen: "127.0.0.1:{api}"}}\n'
            f'proxy: {{listen: "127.0.0.1:{proxy}", upstream: "{upstream.url}/v1"}}\n'
            f'usage: {{store: "{store_url}", store_password_env: {PASSWORD_ENV}}}'))
            + f"accounts:\n  - {{name: pool, provider: static, keys_env: {KEYS_ENV}}}\n")
        project.env.update({PASSWORD_ENV: PASSWORD, KEYS_ENV: "sk-good-1"})
        served = serve(api)
        wait_until(lambda: http_status(port) == 401, timeout=30)
        key = (project.state_dir / "secrets" / "proxy-keys" / me).read_text().strip()

        # a replica on "another machine": its own state dir, the same store
        elsewhere = write_desired(tmp_path / "replica.yaml", upstream.url, store_url, state_dir="elsewhere")
        [replica] = await replicas.start(elsewhere)
        await eventually(lambda: _answers(replica, key), timeout=5,
                         failure=lambda: "the replica never accepted the key cst serve minted")

        def counted() -> bool:   # the request went through the replica; cst serve's API reads the store
            return served.api("GET", "/api/usage").json()["instances"][me]["today"]["requests"] == 1
        wait_until(counted, timeout=10)
        store = served.api("GET", "/api/pool").json()["store"]
        assert (store["kind"], store["state"], store["serving"]) == ("postgresql", "up", True)
        listing = project.cst("usage", "-o", "json")
        assert json.loads(listing.stdout)["instances"][me]["today"]["requests"] == 1, listing.stderr

        rotated = served.api("POST", f"/api/instances/{me}/rotate-key")
        assert rotated.status_code == 200, rotated.text
        new_key = (project.state_dir / "secrets" / "proxy-keys" / me).read_text().strip()
        await eventually(lambda: _refused(replica, key), timeout=1.0,
                         failure=lambda: "the replica still accepts the rotated-out key")
        assert await _answers(replica, new_key)


# -- the deployment the README shows ---------------------------------------------------------------

NGINX_MAIN = """\
daemon off;
master_process off;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    include {folder}/replicas.conf;
}}
"""


async def test_two_replicas_behind_the_example_nginx_config_survive_the_loss_of_one(
        tmp_path: Path, upstream: FakeUpstream, replicas: Replicas, cluster: PostgresCluster, store_url: str) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    front, first, second = free_ports(3)
    example = (ROOT / "examples" / "nginx-replicas.conf").read_text()
    for old, new in (("127.0.0.1:5100", f"127.0.0.1:{front}"), ("127.0.0.1:5101", f"127.0.0.1:{first}"),
                     ("127.0.0.1:5102", f"127.0.0.1:{second}")):
        assert old in example
        example = example.replace(old, new)
    (tmp_path / "replicas.conf").write_text(example)
    (tmp_path / "nginx.conf").write_text(NGINX_MAIN.format(folder=tmp_path))
    desired = write_desired(tmp_path / "desired.yaml", upstream.url, store_url)
    key = instance_key(tmp_path / ".cst")
    for port in (first, second):   # the example's two commands
        with open(tmp_path / f"replica-{port}.log", "wb") as log:
            replicas.procs[port] = subprocess.Popen(
                [*CST, "proxy", "-f", str(desired), "--listen", f"127.0.0.1:{port}"], env=replicas.env,
                stdout=log, stderr=subprocess.STDOUT)
    with open(tmp_path / "nginx.out", "wb") as out:
        proxy = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                                 stdout=subprocess.DEVNULL, stderr=out)
    try:
        url = f"http://127.0.0.1:{front}"
        for port in (first, second):
            await eventually(lambda port=port: replicas._store_up(f"http://127.0.0.1:{port}"), timeout=30)
        upstream.slow_gap = 0.05
        chunks = await client(url, key).chat.completions.create(
            model="slow-stream", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        answers = await asyncio.gather(*(chat(url, key) for _ in range(6)))
        assert all(answers)
        # (a replica killed loses the rows of its last 50 ms: wait for them, to count every one below)
        await eventually(lambda: len(ledger_rows(cluster, store_url)) == 7, timeout=10)
        replicas.kill(f"http://127.0.0.1:{first}")   # one machine lost: the other takes every request
        answers = await asyncio.gather(*(chat(url, key) for _ in range(6)))
        assert all(answers)
        health = await get_json(url + "/health")
        assert health is not None and health["store"]["state"] == "up"
        await eventually(lambda: len(ledger_rows(cluster, store_url)) == 13, timeout=10,
                         failure=lambda: f"{len(ledger_rows(cluster, store_url))} ledger rows")
    finally:
        proxy.terminate()
        proxy.wait(10)


async def test_the_holds_of_a_replica_that_stopped_beating_stop_counting(
        cluster: PostgresCluster, store_url: str) -> None:
    lost, lost_store = await _shared(store_url, "replica-lost")
    alive, alive_store = await _shared(store_url, "replica-alive")
    budget = Budget(tokens_per_day=1000)
    try:
        tokens, _ = await lost.reserve(ME, budget, 600, time.time(), "2026-12-01", "2026-12", "in-flight")
        assert tokens == 600
        await lost.close()   # as a kill -9 would: its request never settles, its beats stop
        lost_store.close()
        with cluster.connect(store_url.rsplit("/", 1)[1]) as db:   # 30 s pass, for the store
            db.execute("UPDATE cst_replicas SET seen = seen - interval '1 minute' WHERE id = 'replica-lost'")
        _, used = await alive.reserve(ME, budget, 1, time.time(), "2026-12-01", "2026-12", "probe-1")
        assert used.reserved == 600   # until a living replica's next beat

        async def released() -> bool:
            _, seen = await alive.reserve(ME, budget, 0, time.time(), "2026-12-01", "2026-12",
                                          f"probe-{time.monotonic()}")
            return seen.reserved == 1   # only the first probe's hold is left
        await eventually(released, timeout=15, interval=0.5)
    finally:
        await alive.close()
        alive_store.close()
