"""A Prometheus histogram kept as plain numbers: fixed buckets, a list of ints and a float sum.

prometheus-client's ``Histogram`` takes a lock and walks its buckets on every observation; this
one costs a bisection and two additions, cheap enough for the proxy's hot path (see
``metrics``). It is not thread-safe: an owner that observes from several threads locks around it.
The exposition (cumulative buckets, ``+Inf``, sum and count) is built at scrape time by
``family``.
"""
from __future__ import annotations

from bisect import bisect_left

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds                     # upper bounds (``le``), rising; +Inf is implied
        self.counts = [0] * (len(bounds) + 1)    # per bucket, not cumulative; the last is above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (Prometheus' le)
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """The histogram as Prometheus exposes it: cumulative buckets up to ``+Inf``, sum, count."""
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            # prometheus_client leaves floatToGoString unannotated (it returns the bound as a str)
            buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)
