"""What the proxy's parts share while it runs: the pool, the forwarder, the accounts, the client keys, the limits."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .accounts import AccountManager
from .forward import Forwarder
from .pool import KeyPool


@dataclass
class ProxyState:
    pool: KeyPool
    forwarder: Forwarder
    accounts: AccountManager
    client_keys: tuple[bytes, ...] = ()  # empty: no client authentication
    max_body: int = 16 * 2**20           # settings.proxy.max_body
    max_concurrent: int = 512            # settings.proxy.max_concurrent
    in_flight: int = 0                   # forwarded requests running now
    started: float = field(default_factory=time.monotonic)
