"""Prometheus metrics of the fleet (issue 19): ``GET /metrics`` of cst serve's API.

A real ``cst serve`` on the stand-in with a fake upstream behind its proxy: the figures scraped
are what was done to it (instances started and stopped, a restart through the API, a file
change, a port someone else holds, a streamed chat through the proxy). The admin key guards the
route, as X-ST-Admin-Key or as a bearer token (that route only), with the limiter of every route
(the real app in this process). Units for the counters the daemon and the park/wake code bump.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, get_args

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from conftest import fake_upstream, free_ports, http_status, standin_file, wait_until
from proxy.histogram import Histogram
from reconciler.desired.shared_file import DesiredFile
from reconciler.engine.inventory import InstanceRow
from reconciler.engine.results import Report, Result
from reconciler.runtime.base import ObservedStatus
from reconciler.server import api
from reconciler.server.daemon import Daemon
from reconciler.server.fleet_metrics import (
    INSTANCE_STATES,
    ParkingCounters,
    PassCounters,
    exposition,
    instance_families,
)

KEY = "metrics-admin-key"
POOL_KEY = "sk-good-metrics0000001"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, by (sample name, labels); parsed as Prometheus reads it."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scraped: Samples, name: str, **labels: str) -> float:
    return scraped[(name, frozenset(labels.items()))]


def by_state(scraped: Samples) -> dict[str, float]:
    return {state: value(scraped, "cst_instances", state=state) for state in INSTANCE_STATES}


def memory_of(scraped: Samples) -> dict[str, float]:
    return {dict(labels)["instance"]: v for (name, labels), v in scraped.items() if name == "cst_instance_memory_bytes"}


def text_of(families: list[Metric]) -> str:
    """``families`` in the exposition format, as a registry writes them."""
    class Families(Collector):
        def collect(self) -> Iterator[Metric]:
            yield from families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())
    return generate_latest(registry).decode()


# -- units


def test_a_histogram_counts_a_bound_in_its_own_bucket_and_exposes_cumulative_buckets() -> None:
    histogram = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(seconds)
    assert histogram.count == 4
    scraped = samples(text_of([histogram.family("t_seconds", "test")]))
    assert [value(scraped, "t_seconds_bucket", le=le) for le in ("0.1", "1.0", "+Inf")] == [2, 3, 4]
    assert value(scraped, "t_seconds_count") == 4 and value(scraped, "t_seconds_sum") == pytest.approx(3.65)


def test_parking_counters_count_parks_wakes_with_their_time_and_failed_wakes() -> None:
    parking = ParkingCounters()
    scraped = samples(exposition([], parking, PassCounters(), None).decode())
    assert (value(scraped, "cst_parks_total"), value(scraped, "cst_wake_seconds_count"),
            value(scraped, "cst_wake_failures_total")) == (0, 0, 0)
    parking.parked()
    parking.parked()
    parking.woken(0.3)
    parking.woken(12.0)
    parking.wake_failed()
    scraped = samples(exposition([], parking, PassCounters(), None).decode())
    assert value(scraped, "cst_parks_total") == 2
    assert value(scraped, "cst_wake_failures_total") == 1
    assert value(scraped, "cst_wake_seconds_count") == 2
    assert value(scraped, "cst_wake_seconds_sum") == pytest.approx(12.3)
    assert value(scraped, "cst_wake_seconds_bucket", le="0.25") == 0
    assert value(scraped, "cst_wake_seconds_bucket", le="0.5") == 1
    assert value(scraped, "cst_wake_seconds_bucket", le="10.0") == 1
    assert value(scraped, "cst_wake_seconds_bucket", le="15.0") == 2
    assert value(scraped, "cst_wake_seconds_bucket", le="30.0") == 2


def test_pass_counters_tell_failed_passes_from_failed_results() -> None:
    passes = PassCounters()
    passes.count(Report(results=[Result("st-instance-8001", "ok"), Result("st-instance-8002", "changed")]))
    passes.count(Report(failure="waiting for the state dir lock: held by pid 4242"))
    passes.count(Report(results=[Result("st-instance-8001", "failed", "port 8001 is held"),
                                 Result("st-instance-8002", "failed", "exited with code 7"),
                                 Result("st-instance-8003", "ok")]))
    scraped = samples(exposition([], ParkingCounters(), passes, None).decode())
    assert value(scraped, "cst_reconcile_passes_total") == 3
    assert value(scraped, "cst_reconcile_passes_failed_total") == 1
    assert value(scraped, "cst_reconcile_results_failed_total") == 2


def row(port: int, status: str, restarts: int = 0, memory: int | None = None) -> InstanceRow:
    return InstanceRow(id=f"st-instance-{port}", port=port, url=None, desired="running", status=status, detail="",
                       pid=None, started_at=None, uptime=None, memory=memory, park_after=None, restarts=restarts,
                       data_dir=Path(f"/data/{port}"), disk=None)


def test_instance_rows_give_states_restarts_and_the_memory_rows_report() -> None:
    rows = [row(8001, "running", restarts=3, memory=180_000_000), row(8002, "running"), row(8003, "parked"),
            row(8004, "crashed", restarts=1), row(8005, "errored", restarts=5)]
    scraped = samples(text_of(list(instance_families(rows))))
    assert by_state(scraped) == {"running": 2, "parked": 1, "stopped": 0, "crashed": 1, "port-taken": 0,
                                 "errored": 1}
    assert [value(scraped, "cst_instance_restarts_total", instance=row.id) for row in rows] == [3, 0, 0, 1, 5]
    assert memory_of(scraped) == {"st-instance-8001": 180_000_000}   # none for an instance whose memory is not known


def test_every_state_an_instance_row_can_have_is_a_state_of_the_gauge() -> None:
    # what the runtime observes, and the supervisor's "errored" (engine.inventory): an unknown one
    # would make every scrape fail
    assert set(get_args(ObservedStatus)) | {"errored"} == set(INSTANCE_STATES)


# -- the route's guard: the real app in this process (no instances, no proxy)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    (tmp_path / "desired.yaml").write_text("version: 1\ninstances: []\n")
    file = DesiredFile(tmp_path / "desired.yaml")
    app = api.make_app(Daemon(file, file.read()), KEY)
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as client:
        yield client


async def test_metrics_take_the_admin_key_as_header_or_bearer_token_and_wrong_ones_are_limited(
        client: TestClient) -> None:
    for headers in ({"X-ST-Admin-Key": KEY}, {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {KEY}"}):
        answer = await client.get("/metrics", headers=headers)
        assert answer.status == 200, headers
        assert answer.headers["Content-Type"] == CONTENT_TYPE_LATEST
        assert by_state(samples(await answer.text())) == dict.fromkeys(INSTANCE_STATES, 0)
    for headers in ({}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer "}):
        answer = await client.get("/metrics?lang=en", headers=headers)
        assert (answer.status, await answer.json()) == (401, {"error": "Missing admin key (header X-ST-Admin-Key)",
                                                                   "code": "missing_admin_key"})
    # the bearer form is this route's only: elsewhere it is no key at all
    answer = await client.get("/api/status?lang=en", headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status == 401
    # wrong bearer tokens are guesses like wrong keys: a burst, then 429 for the right key too
    statuses = [(await client.get("/metrics", headers={"Authorization": f"Bearer wrong-{n}"})).status
                for n in range(12)]
    assert statuses[0] == 401 and statuses[-1] == 429 and statuses.count(401) <= 11, statuses
    assert (await client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})).status == 429


# -- a real cst serve


def test_metrics_of_a_served_fleet_follow_what_happens_to_it(project, serve) -> None:
    api_port, proxy_port, a, b, c, taken = free_ports(6)
    ids = {port: f"st-instance-{port}" for port in (a, b, c, taken)}
    with fake_upstream(chunks=4, slow_gap=0.3) as upstream:   # a slow stream: 3 gaps of 0.3 s after its first piece
        settings = (f'resync: 1h\napi: {{listen: "127.0.0.1:{api_port}"}}\n'   # passes come from changes only
                    f'proxy: {{listen: "127.0.0.1:{proxy_port}", upstream: "{upstream.url}/v1"}}')
        accounts = "accounts:\n  - {name: main, provider: static, keys_env: POOL_KEYS}\n"
        parks = {b: {"park_after": "1h"}}   # parking: parked until woken (through the API only)
        project.write(standin_file([(a, "running"), (b, "running"), (c, "stopped")], parks, settings) + accounts)
        project.env["POOL_KEYS"] = POOL_KEY
        served = serve(api_port, admin_key=KEY)

        def scrape() -> Samples:
            answer = served.api("GET", "/metrics")
            assert answer.status_code == 200, answer.text
            return samples(answer.text)

        assert httpx.get(served.url + "/metrics", timeout=10).status_code == 401
        wait_until(lambda: http_status(a) == 401 and http_status(b) == 401, timeout=30)
        wait_until(lambda: by_state(scrape())["parked"] == 1)
        assert by_state(scrape()) == {"running": 1, "parked": 1, "stopped": 1, "crashed": 0, "port-taken": 0,
                                      "errored": 0}
        assert served.api("POST", f"/api/instances/{ids[b]}/wake").status_code == 200
        first = scrape()
        assert by_state(first) == {"running": 2, "parked": 0, "stopped": 1, "crashed": 0, "port-taken": 0,
                                   "errored": 0}
        assert value(first, "cst_wake_seconds_count") == 1
        assert [value(first, "cst_instance_restarts_total", instance=ids[p]) for p in (a, b, c)] == [0, 0, 0]
        memory = memory_of(first)
        assert set(memory) == {ids[a], ids[b]} and all(rss > 10_000_000 for rss in memory.values()), memory
        assert value(first, "cst_reconcile_passes_total") >= 1
        assert value(first, "cst_reconcile_results_failed_total") == 0
        assert value(first, "cst_proxy_answer_seconds_count") == 0

        assert served.api("POST", f"/api/instances/{ids[a]}/restart").status_code == 200
        restarted = scrape()
        assert value(restarted, "cst_instance_restarts_total", instance=ids[a]) == 1
        assert value(restarted, "cst_instance_restarts_total", instance=ids[b]) == 0

        assert served.api("POST", f"/api/instances/{ids[b]}/park").status_code == 200
        parked = scrape()
        assert (value(parked, "cst_parks_total"), value(parked, "cst_wake_seconds_count")) == (1, 1)
        assert by_state(parked) == {"running": 1, "parked": 1, "stopped": 1, "crashed": 0, "port-taken": 0,
                                    "errored": 0}
        assert ids[b] not in memory_of(parked)
        assert served.api("POST", f"/api/instances/{ids[b]}/wake").status_code == 200
        woken = scrape()
        assert (value(woken, "cst_parks_total"), value(woken, "cst_wake_seconds_count"),
                value(woken, "cst_wake_failures_total")) == (1, 2, 0)
        assert 0 < value(woken, "cst_wake_seconds_sum") < 15
        assert by_state(woken)["running"] == 2
        passes = value(woken, "cst_reconcile_passes_total")

        # a file change: an instance declared on a port another process listens on
        with socket.create_server(("127.0.0.1", taken)):
            project.write(standin_file([(a, "running"), (b, "running"), (c, "stopped"), (taken, "running")],
                                       parks, settings) + accounts)
            wait_until(lambda: value(scrape(), "cst_reconcile_results_failed_total") >= 1)
            changed = scrape()
        assert value(changed, "cst_reconcile_passes_total") > passes
        assert value(changed, "cst_reconcile_passes_failed_total") == 0   # the pass ran; one result failed
        assert by_state(changed) == {"running": 2, "parked": 0, "stopped": 1, "crashed": 0, "port-taken": 1,
                                     "errored": 0}

        # a streamed chat through the proxy, by an instance's own key: timed to its first piece and its end
        key = (project.state_dir / "secrets" / "proxy-keys" / ids[a]).read_text().strip()
        with httpx.stream("POST", f"http://127.0.0.1:{proxy_port}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {key}"},
                          json={"model": "slow-stream", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                          ) as chat:
            assert chat.status_code == 200
            assert b"[DONE]" in chat.read()
        for scraped in (scrape(), samples(httpx.get(f"http://127.0.0.1:{proxy_port}/metrics", timeout=10,
                                                    headers={"Authorization": f"Bearer {key}"}).text)):
            assert value(scraped, "cst_proxy_answer_seconds_count") == 1
            assert value(scraped, "cst_proxy_first_byte_seconds_count") == 1
            assert value(scraped, "cst_proxy_answer_seconds_bucket", le="0.5") == 0      # 0.9 s of gaps
            assert value(scraped, "cst_proxy_answer_seconds_bucket", le="2.5") == 1
            assert value(scraped, "cst_proxy_first_byte_seconds_bucket", le="0.5") == 1  # the first piece at once
            assert value(scraped, "cst_proxy_answer_seconds_sum") > value(scraped, "cst_proxy_first_byte_seconds_sum")
