"""What the proxy's parts share while it runs: the pool, the forwarder, the accounts, who may call
and what each caller used."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .accounts import AccountManager
from .callers import Callers
from .forward import Forwarder
from .pool import KeyPool
from .usage import UsageBook


@dataclass
class ProxyState:
    pool: KeyPool
    forwarder: Forwarder
    accounts: AccountManager
    callers: Callers = field(default_factory=Callers)   # no keys at all: no client authentication
    usage: UsageBook = field(default_factory=UsageBook)
    started: float = field(default_factory=time.monotonic)
