"""What the proxy's parts share while it runs: the pool, the forwarder, the accounts, who may call
and what each caller used (with its budget), the limits, and how long its answers took."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .accounts import AccountManager
from .budget import UsageBook
from .callers import Callers
from .forward import Forwarder
from .histogram import Histogram
from .metering import MeteringPolicy
from .pool import KeyPool

# from an answer the proxy makes itself (milliseconds) or a model list, through a short completion,
# to a long generation streamed for minutes
ANSWER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


def _answer_histogram() -> Histogram:
    return Histogram(ANSWER_BUCKETS)


@dataclass
class ProxyState:
    pool: KeyPool
    forwarder: Forwarder
    accounts: AccountManager
    callers: Callers                     # who may call
    usage: UsageBook                     # what each caller used, its budget, the ledger
    max_body: int                        # settings.proxy.max_body
    max_concurrent: int                  # settings.proxy.max_concurrent
    metering: MeteringPolicy             # settings.proxy.metering: what each path costs
    in_flight: int = 0                   # forwarded requests running now
    in_flight_by_caller: dict[str, int] = field(default_factory=dict)   # the same, per caller (parking asks)
    started: float = field(default_factory=time.monotonic)
    # forwarded requests, from their arrival: to the first piece of the answer, and to its end
    first_byte_seconds: Histogram = field(default_factory=_answer_histogram)
    answer_seconds: Histogram = field(default_factory=_answer_histogram)
