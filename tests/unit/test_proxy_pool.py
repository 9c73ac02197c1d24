"""The key pool's health policy, with a fake clock."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.pool import BASE_COOLDOWN, OUTAGE_COOLDOWN, AttemptOutcome, KeyInfo, KeyPool, mask


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_pool(clock: Clock, *values: str, threshold: int = 3) -> KeyPool:
    pool = KeyPool(threshold, clock=clock)
    pool.set_account_keys("a", [KeyInfo(v, 5.0) for v in values])
    return pool


def take(pool: KeyPool, n: int) -> list[str]:
    out = []
    for _ in range(n):
        key = pool.acquire()
        assert key is not None
        out.append(key.value)
    return out


def test_round_robin_over_all_accounts(clock: Clock) -> None:
    pool = make_pool(clock, "k1", "k2")
    pool.set_account_keys("b", [KeyInfo("k3")])
    assert take(pool, 6) == ["k1", "k2", "k3", "k1", "k2", "k3"]


def test_unfunded_keys_are_skipped_unknown_balance_is_fine(clock: Clock) -> None:
    pool = KeyPool(clock=clock)
    pool.set_account_keys("a", [KeyInfo("empty", 0.0), KeyInfo("rich", 3.0), KeyInfo("static", None)])
    assert take(pool, 4) == ["rich", "static", "rich", "static"]


def test_exclude_skips_keys_already_tried(clock: Clock) -> None:
    pool = make_pool(clock, "k1", "k2", "k3")
    first = pool.acquire()
    second = pool.acquire({first})
    third = pool.acquire({first, second})
    assert {first.value, second.value, third.value} == {"k1", "k2", "k3"}
    assert pool.acquire({first, second, third}) is None


def test_429_cools_down_for_retry_after(clock: Clock) -> None:
    pool = make_pool(clock, "k1", "k2")
    k1 = pool.acquire()
    pool.report(k1, AttemptOutcome.RATE_LIMITED, "HTTP 429", retry_after=30)
    assert take(pool, 3) == ["k2", "k2", "k2"]
    clock.now += 29
    assert "k1" not in take(pool, 2)
    clock.now += 1.5
    assert "k1" in take(pool, 2)
    assert k1.failures == 0, "a rate limit is not a failure of the key"


def test_401_quarantines_until_the_account_refreshes(clock: Clock) -> None:
    pool = make_pool(clock, "k1", "k2")
    k1 = pool.acquire()
    pool.report(k1, AttemptOutcome.UNAUTHORIZED, "HTTP 401")
    clock.now += 10_000
    assert take(pool, 3) == ["k2", "k2", "k2"]
    pool.set_account_keys("a", [KeyInfo("k1", 5.0), KeyInfo("k2", 5.0)])  # the refresh
    assert "k1" in take(pool, 2)
    assert k1.total_failures == 1, "the key kept its history through the refresh"


def test_threshold_consecutive_failures_cool_down_growing_then_probe(clock: Clock) -> None:
    pool = make_pool(clock, "bad", "good")
    bad = pool.keys()[0]
    good = pool.keys()[1]
    for _ in range(2):  # below the threshold: still chosen
        pool.report(bad, AttemptOutcome.FAILURE, "timeout")
        pool.report(good, AttemptOutcome.SUCCESS)
    assert bad.available(clock.now)
    pool.report(bad, AttemptOutcome.FAILURE, "timeout")
    assert not bad.available(clock.now)
    assert bad.cooldown_until == pytest.approx(clock.now + BASE_COOLDOWN)
    clock.now += BASE_COOLDOWN + 0.1
    assert bad.available(clock.now), "probed again after the cooldown"
    pool.report(bad, AttemptOutcome.FAILURE, "timeout")  # the probe fails: a longer cooldown
    assert bad.cooldown_until == pytest.approx(clock.now + 2 * BASE_COOLDOWN)
    clock.now += 2 * BASE_COOLDOWN + 0.1
    pool.report(bad, AttemptOutcome.SUCCESS)
    assert bad.failures == 0 and bad.streak == 0 and bad.available(clock.now)


def test_consecutive_means_consecutive(clock: Clock) -> None:
    pool = make_pool(clock, "k1", "k2")
    k1 = pool.keys()[0]
    for _ in range(5):
        pool.report(k1, AttemptOutcome.FAILURE, "HTTP 500")
        pool.report(k1, AttemptOutcome.FAILURE, "HTTP 500")
        pool.report(k1, AttemptOutcome.SUCCESS)
    assert k1.available(clock.now) and k1.total_failures == 10


def test_client_errors_do_not_count(clock: Clock) -> None:
    pool = make_pool(clock, "k1")
    k1 = pool.keys()[0]
    pool.report(k1, AttemptOutcome.FAILURE, "HTTP 500")
    for _ in range(10):
        pool.report(k1, AttemptOutcome.NEUTRAL)
    assert k1.failures == 1 and k1.total_failures == 1 and k1.last_error == "HTTP 500"


def test_outage_of_the_whole_pool_is_not_a_long_bench(clock: Clock) -> None:
    pool = make_pool(clock, "k1", "k2", "k3")
    for _ in range(3):
        for key in pool.keys():
            pool.report(key, AttemptOutcome.FAILURE, "ClientConnectorError")
            clock.now += 0.01
    # Every key failed within moments: the upstream is down; nobody is benched for long.
    for key in pool.keys():
        assert key.cooldown_until <= clock.now + OUTAGE_COOLDOWN
        assert key.streak == 0
    clock.now += OUTAGE_COOLDOWN + 0.1
    assert pool.counts() == (3, 3)


def test_one_broken_key_among_working_ones_is_benched(clock: Clock) -> None:
    pool = make_pool(clock, "k1", "k2")
    k1, k2 = pool.keys()
    for _ in range(3):
        pool.report(k2, AttemptOutcome.SUCCESS)
        pool.report(k1, AttemptOutcome.FAILURE, "HTTP 502")
        clock.now += 0.01
    assert k1.cooldown_until >= clock.now + BASE_COOLDOWN - 1


def test_when_everything_is_out_the_soonest_back_is_tried(clock: Clock) -> None:
    pool = make_pool(clock, "k1", "k2", "k3")
    k1, k2, k3 = pool.keys()
    pool.report(k1, AttemptOutcome.RATE_LIMITED, retry_after=50)
    pool.report(k2, AttemptOutcome.RATE_LIMITED, retry_after=20)
    pool.report(k3, AttemptOutcome.UNAUTHORIZED)
    assert pool.acquire() is k2
    assert pool.acquire({k2}) is k1
    assert pool.acquire({k1, k2}) is None, "a quarantined key is never a fallback"


def test_empty_pool_and_removed_account(clock: Clock) -> None:
    pool = make_pool(clock, "k1")
    held = pool.acquire()
    pool.remove_account("a")
    assert pool.acquire() is None and pool.counts() == (0, 0)
    pool.report(held, AttemptOutcome.SUCCESS)  # a request that was in flight finishes harmlessly


def test_refresh_keeps_counters_of_surviving_keys(clock: Clock) -> None:
    pool = make_pool(clock, "k1", "k2")
    take(pool, 4)
    pool.set_account_keys("a", [KeyInfo("k2", 1.0), KeyInfo("k9", 2.0)])
    assert [(k.value, k.requests) for k in pool.keys()] == [("k2", 2), ("k9", 0)]


def test_mask_never_shows_the_whole_key() -> None:
    key = "sk-abcdefghijklmnopqrstuvwxyz"
    assert mask(key) == "sk-ab…wxyz"
    for short in ("sk-1", "abcdefgh", "sk-123456789"):
        assert short not in mask(short)


def test_outage_is_recognised_even_with_quarantined_and_rate_limited_keys(clock: Clock) -> None:
    pool = make_pool(clock, "k1", "k2", "k3", "k4")
    k1, k2, k3, k4 = pool.keys()
    pool.report(k3, AttemptOutcome.UNAUTHORIZED)
    pool.report(k4, AttemptOutcome.RATE_LIMITED, retry_after=60)
    for _ in range(3):
        for key in (k1, k2):
            pool.report(key, AttemptOutcome.FAILURE, "timeout")
    assert k1.cooldown_until <= clock.now + OUTAGE_COOLDOWN and k1.streak == 0
    assert k4.cooldown_until == clock.now + 60, "a 429 cooldown is the upstream's word and stands"


def test_report_says_when_a_key_leaves_the_rotation(clock: Clock) -> None:
    pool = make_pool(clock, "k1", "k2")
    k1, k2 = pool.keys()
    pool.report(k2, AttemptOutcome.SUCCESS)
    assert [pool.report(k1, AttemptOutcome.FAILURE, "x") for _ in range(4)] == [False, False, True, False]
    assert pool.report(k2, AttemptOutcome.UNAUTHORIZED) is True

_ops = st.lists(st.tuples(
    st.sampled_from(["acquire", "report", "tick", "refresh"]),
    st.integers(0, 4),
    st.sampled_from(list(AttemptOutcome)),
    st.floats(0, 120),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(balances=st.lists(st.sampled_from([None, 0.0, 2.5]), min_size=1, max_size=5), ops=_ops)
def test_acquire_invariants_hold_whatever_happens(balances: list, ops: list) -> None:
    clock = Clock()
    infos = [KeyInfo(f"sk-prop-{i:04d}xxxx", b) for i, b in enumerate(balances)]
    pool = KeyPool(3, clock=clock)
    pool.set_account_keys("a", infos)
    for op, index, outcome, amount in ops:
        keys = pool.keys()
        if op == "tick":
            clock.now += amount
        elif op == "refresh":
            pool.set_account_keys("a", infos)
            assert not any(k.quarantined for k in pool.keys())
        elif op == "report":
            pool.report(keys[index % len(keys)], outcome, "x", retry_after=amount)
        else:
            exclude = set(keys[:index % (len(keys) + 1)])
            key = pool.acquire(exclude)
            usable = [k for k in keys if not k.quarantined and k.funded and k not in exclude]
            if key is None:
                assert usable == [], "None only when nothing at all can be tried"
            else:
                assert key in usable
                if any(k.available(clock.now) for k in usable):
                    assert key.available(clock.now), "a cooling key only when no key is available"
                else:
                    assert key.cooldown_until == min(k.cooldown_until for k in usable)


def test_round_robin_is_fair_among_healthy_keys(clock: Clock) -> None:
    pool = make_pool(clock, *[f"k{i}" for i in range(5)])
    counts: dict[str, int] = {}
    for value in take(pool, 103):
        counts[value] = counts.get(value, 0) + 1
    assert sorted(counts.values()) == [20, 20, 21, 21, 21]
