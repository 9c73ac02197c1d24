"""What the proxy's parts share while it runs: the pool, the forwarder, the accounts, who may call
and what each caller used (with its budget), and the limits."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .accounts import AccountManager
from .budget import UsageBook
from .callers import Callers
from .forward import Forwarder
from .pool import KeyPool


@dataclass
class ProxyState:
    pool: KeyPool
    forwarder: Forwarder
    accounts: AccountManager
    callers: Callers                     # who may call
    usage: UsageBook                     # what each caller used, its budget, the ledger
    max_body: int                        # settings.proxy.max_body
    max_concurrent: int                  # settings.proxy.max_concurrent
    in_flight: int = 0                   # forwarded requests running now
    in_flight_by_caller: dict[str, int] = field(default_factory=dict)   # the same, per caller (parking asks)
    started: float = field(default_factory=time.monotonic)
