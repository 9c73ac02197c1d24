"""Slowing down admin-key guessers: a token bucket of failures per client address.

Each address may fail ``burst`` times in a row; a token comes back every ``refill`` seconds.
An address without tokens is refused before its key is even compared, so a guesser cannot
tell a right guess from a wrong one while it is limited; a right key costs no token. IPv6
addresses count per /64, the block one host usually controls. At most ``max_addresses``
buckets are kept (the least recently seen go first), so memory stays bounded however many
addresses try.
"""
from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable


@dataclass
class _Bucket:
    tokens: float
    at: float          # when ``tokens`` was last brought up to date
    reported: bool = False  # this burst of refusals was logged already


def client_block(address: str | None) -> str:
    """The unit a limit applies to: an IPv4 address, or an IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class FailureLimiter:
    def __init__(self, burst: int = 10, refill: float = 6.0, max_addresses: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        self.burst, self.refill, self.max_addresses, self.clock = burst, refill, max_addresses, clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _bucket(self, block: str) -> _Bucket | None:
        bucket = self._buckets.get(block)
        if bucket is None:
            return None
        now = self.clock()
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) / self.refill)
        bucket.at = now
        if bucket.tokens >= self.burst:  # back to full: nothing to remember
            del self._buckets[block]
            return None
        return bucket

    def retry_after(self, address: str | None) -> int:
        """0 when ``address`` may try a key now; else the whole seconds until it may."""
        bucket = self._bucket(client_block(address))
        if bucket is None or bucket.tokens >= 1:
            return 0
        return max(1, math.ceil((1 - bucket.tokens) * self.refill))

    def failed(self, address: str | None) -> None:
        """Count one wrong key from ``address``."""
        block = client_block(address)
        bucket = self._bucket(block)
        if bucket is None:
            bucket = self._buckets[block] = _Bucket(float(self.burst), self.clock())
            while len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(block)
        bucket.tokens = max(0.0, bucket.tokens - 1)
        if bucket.tokens >= 1:
            bucket.reported = False

    def first_refusal(self, address: str | None) -> bool:
        """True once per burst of refusals for ``address``: the one worth a log line."""
        bucket = self._bucket(client_block(address))
        if bucket is None or bucket.reported:
            return False
        bucket.reported = True
        return True

    def __len__(self) -> int:
        return len(self._buckets)
