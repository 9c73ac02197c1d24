"""The token bucket of wrong admin keys, on a fake clock."""
from __future__ import annotations

import ipaddress
from types import SimpleNamespace

from multidict import CIMultiDict

from reconciler.server.ratelimit import FailureLimiter, client_block
from reconciler.server.security import client_address


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_one_try_per_refill_and_one_report_per_burst() -> None:
    clock = Clock()
    limiter = FailureLimiter(burst=3, refill=6.0, clock=clock)
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1") == 0
        limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 6
    assert limiter.first_refusal("10.0.0.1") and not limiter.first_refusal("10.0.0.1")
    assert limiter.retry_after("10.0.0.2") == 0, "another address is not affected"
    clock.now += 4
    assert limiter.retry_after("10.0.0.1") == 2
    clock.now += 2
    assert limiter.retry_after("10.0.0.1") == 0  # one token back: one more try
    limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 6 and not limiter.first_refusal("10.0.0.1"), "the same burst"
    clock.now += 18  # full again: forgotten when next seen, and a later burst is reported afresh
    assert limiter.retry_after("10.0.0.1") == 0 and len(limiter) == 0
    for _ in range(3):
        limiter.failed("10.0.0.1")
    assert limiter.first_refusal("10.0.0.1")


def test_memory_is_bounded_however_many_addresses_try() -> None:
    limiter = FailureLimiter(burst=2, max_addresses=100, clock=Clock())
    for i in range(10_000):
        limiter.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(limiter) == 100


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert client_block("2001:db8::1") == client_block("2001:db8::ffff:1") == "2001:db8::/64"
    assert client_block("2001:db8:0:1::1") != client_block("2001:db8::1")
    assert client_block("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_block(None) == "unknown"


def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)

    def seen(remote: str, forwarded: str | None) -> str | None:
        headers = CIMultiDict({"X-Forwarded-For": forwarded} if forwarded is not None else {})
        return client_address(SimpleNamespace(remote=remote, headers=headers), trusted)  # type: ignore[arg-type]

    assert seen("203.0.113.7", "1.2.3.4") == "203.0.113.7"            # a client cannot name itself
    assert seen("10.0.0.2", "1.2.3.4") == "1.2.3.4"
    assert seen("10.0.0.2", "6.6.6.6, 1.2.3.4, 10.0.0.3") == "1.2.3.4"  # spoofed hops before the client: not believed
    assert seen("10.0.0.2", "not-an-address") == "10.0.0.2"
    assert seen("10.0.0.2", None) == "10.0.0.2"
    assert client_address(SimpleNamespace(remote="1.2.3.4", headers=CIMultiDict({"X-Forwarded-For": "5.6.7.8"})),  # type: ignore[arg-type]
                          ()) == "1.2.3.4"   # off by default
