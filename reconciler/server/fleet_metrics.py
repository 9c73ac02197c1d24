"""Prometheus metrics of the fleet: what ``GET /metrics`` of cst serve's API answers.

Read at scrape time, as the proxy's own metrics are (``proxy.metrics``): the instance rows the
API lists (``Fleet.rows()``: instances by state, restarts, memory, the data dirs' disk use as
``cst serve`` last walked them), what the daemon counted
(reconcile passes in ``PassCounters``, parks and wakes in ``ParkingCounters``), and the
proxy process's answer times (``proxy.metrics.latency_families``, in the text format its control
socket answers, appended as it is: its families are none of these).

The park/wake code (``parking.Parking``) reports to ``ParkingCounters``, the daemon's
``parking_counters``, on the daemon's event loop (where scrapes read them):

    parked()                an instance was parked
    woken(seconds: float)   a parked instance answers again; ``seconds`` since its wake began
    wake_failed()           a wake did not bring the instance up

Wakes are counted by the wake-time histogram: ``cst_wake_seconds_count``.
"""
from __future__ import annotations

from typing import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.histogram import Histogram

from ..engine.inventory import InstanceRow
from ..engine.results import Report

# every state is exposed, at 0 when no instance is in it, so a query need not tell "none" from "absent"
INSTANCE_STATES = ("running", "parked", "stopped", "crashed", "port-taken", "errored")
# a wake starts a SillyTavern: about a second with its front end pre-built, up to its start_timeout
WAKE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0)


class ParkingCounters:
    """Parks and wakes, as the park/wake code reports them (see the module's docstring)."""

    def __init__(self) -> None:
        self._parks = 0
        self._wake_failures = 0
        self._wake_seconds = Histogram(WAKE_BUCKETS)

    def parked(self) -> None:
        self._parks += 1

    def woken(self, seconds: float) -> None:
        self._wake_seconds.observe(seconds)

    def wake_failed(self) -> None:
        self._wake_failures += 1

    def families(self) -> list[Metric]:
        return [
            CounterMetricFamily("cst_parks", "Instances parked", value=self._parks),
            self._wake_seconds.family("cst_wake_seconds", "Wakes of parked instances: seconds from the wake's "
                                      "start until the instance answered (_count: the wakes)"),
            CounterMetricFamily("cst_wake_failures", "Wakes that did not bring the instance up",
                                value=self._wake_failures),
        ]


class PassCounters:
    """cst serve's reconcile passes, counted by the daemon on its loop as each one ends."""

    def __init__(self) -> None:
        self._passes = 0
        self._failed_passes = 0    # the pass as a whole could not run (Report.failure)
        self._failed_results = 0   # results whose outcome was "failed", over all passes

    def count(self, report: Report) -> None:
        self._passes += 1
        if report.failure is not None:
            self._failed_passes += 1
        self._failed_results += report.count("failed")

    def families(self) -> list[Metric]:
        return [
            CounterMetricFamily("cst_reconcile_passes", "Reconcile passes cst serve ran", value=self._passes),
            CounterMetricFamily("cst_reconcile_passes_failed", "Reconcile passes that could not run as a whole "
                                "(the state dir held, an error)", value=self._failed_passes),
            CounterMetricFamily("cst_reconcile_results_failed", "Failed results of reconcile passes: an instance "
                                "or release a pass could not bring to the desired state (again at each pass "
                                "while it cannot)", value=self._failed_results),
        ]


def instance_families(rows: Iterable[InstanceRow]) -> Iterator[Metric]:
    by_state = dict.fromkeys(INSTANCE_STATES, 0)
    restarts = CounterMetricFamily("cst_instance_restarts", "Times CST started an instance again after it ran "
                                   "(a restart, a crash repaired, an upgrade), as its record counts them",
                                   labels=["instance"])
    memory = GaugeMetricFamily("cst_instance_memory_bytes", "Resident memory of an instance's processes",
                               labels=["instance"])
    disk = GaugeMetricFamily("cst_instance_disk_bytes", "Disk allocated to an instance's data dir (blocks, not "
                             "apparent sizes; measured every few minutes)", labels=["instance"])
    disk_total = 0
    for row in rows:
        by_state[row.status] += 1   # CST's own state (the seed's "status" folds several into one)
        restarts.add_metric([row.id], row.restarts)
        if row.memory is not None:
            memory.add_metric([row.id], row.memory)
        if row.disk is not None:
            disk.add_metric([row.id], row.disk)
            disk_total += row.disk
    instances = GaugeMetricFamily("cst_instances", "Instances in each state", labels=["state"])
    for state, count in by_state.items():
        instances.add_metric([state], count)
    total = GaugeMetricFamily("cst_instances_disk_bytes", "Disk allocated to all the instances' data dirs",
                              value=disk_total)
    yield from (instances, restarts, memory, disk, total)


class _Scrape(Collector):
    """One scrape's figures: the rows observed for it and the daemon's counters as they are now."""

    def __init__(self, rows: list[InstanceRow], parking: ParkingCounters, passes: PassCounters):
        self.rows, self.parking, self.passes = rows, parking, passes

    def collect(self) -> Iterator[Metric]:
        yield from instance_families(self.rows)
        yield from self.passes.families()
        yield from self.parking.families()


def exposition(rows: list[InstanceRow], parking: ParkingCounters, passes: PassCounters, proxy: bytes | None) -> bytes:
    """The metrics in Prometheus' text format (``prometheus_client.CONTENT_TYPE_LATEST``); ``proxy``:
    the proxy's answer-time families in that format (None while it does not answer)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape(rows, parking, passes))
    return generate_latest(registry) + (proxy or b"")
