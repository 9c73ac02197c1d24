"""The key pool and its health policy.

Pure bookkeeping, no I/O: the forwarder asks ``acquire()`` for a key and tells
``report()`` what happened; the account sources call ``set_account_keys()``.
Time comes from an injectable monotonic clock so the policy is unit-testable.

Policy (the seed's round robin, made less naive):

* Round robin over *available* keys: not quarantined, not cooling down, balance
  positive (or unknown, for static keys).
* 429 cools the key down for ``Retry-After`` (or a default).
* 401/403 quarantine the key until its account's next refresh replaces the list.
* Connection errors, timeouts and 5xx count as failures; ``failure_threshold``
  consecutive ones cool the key down, longer each time it happens again
  (exponential, capped). After the cooldown the key is simply eligible again:
  the next request probes it. A success resets the failure count and the streak.
* Outage guard: when every key that could be tried (not quarantined, funded, not
  in a 429 cooldown) has failed with a transport/5xx error within a few seconds
  and nothing succeeded since, the fault is the upstream or the network, not the
  keys; failure cooldowns are then capped to a second and do not lengthen the
  streak, so the pool is whole again as soon as the upstream is back.
* Shared verdicts: with replicas on a shared store, a key another replica cooled down (429) or
  quarantined (401/402/403) is skipped here until the time it said (``apply_verdict``), and this
  pool's own such verdicts go to ``on_verdict``. Verdicts for keys not (yet) in the pool are kept
  and applied when an account's refresh brings them.
* When nothing is available, the key whose cooldown ends first is offered anyway
  (the seed reset everything instead); only when there is no key at all, or all
  were tried, ``acquire`` returns None and the caller answers 503.
"""
from __future__ import annotations

import enum
import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

# Why these numbers: a key that failed three times in a row is likely broken for
# a while, but a short first cooldown keeps transient hiccups cheap; the cap stops
# a flaky key from vanishing for hours.
BASE_COOLDOWN = 10.0
MAX_COOLDOWN = 600.0
DEFAULT_RETRY_AFTER = 5.0
MAX_RETRY_AFTER = 3600.0
OUTAGE_WINDOW = 5.0
OUTAGE_COOLDOWN = 1.0


def mask(key: str) -> str:
    """``sk-abcdef…wxyz``-style: enough to tell keys apart, never the whole key."""
    if len(key) <= 12:
        return key[:2] + "…" if len(key) > 4 else "…"
    return f"{key[:5]}…{key[-4:]}"


class AttemptOutcome(enum.Enum):
    SUCCESS = "success"
    RATE_LIMITED = "rate_limited"  # 429
    UNAUTHORIZED = "unauthorized"  # 401/403
    FAILURE = "failure"  # connect error, timeout, 5xx
    NEUTRAL = "neutral"  # the client's own fault (400/404/422...): says nothing about the key


@dataclass(frozen=True)
class KeyInfo:
    """What an account source knows about one key."""

    value: str
    balance: float | None = None  # None: unknown (static keys) and treated as positive
    used: float | None = None


@dataclass(eq=False)
class Key:
    value: str
    account: str
    balance: float | None = None
    used: float | None = None
    requests: int = 0
    failures: int = 0  # consecutive
    total_failures: int = 0
    streak: int = 0  # how many threshold cooldowns in a row: makes the next one longer
    last_error: str | None = None
    cooldown_until: float = 0.0
    rate_limited: bool = False  # the current cooldown comes from a 429, not from failures
    quarantined: bool = False
    last_failure_at: float = field(default=-1e18)
    masked: str = ""
    digest: str = ""   # SHA-256 of the value: how replicas name a key to each other
    authorization: bytes = b""   # the header line that carries it upstream

    def __post_init__(self) -> None:
        self.masked = mask(self.value)
        self.digest = hashlib.sha256(self.value.encode()).hexdigest()
        # the pool only holds printable ASCII keys (_usable); anything else fails its first request
        self.authorization = b"Authorization: Bearer " + self.value.encode("ascii", "replace") + b"\r\n"

    @property
    def funded(self) -> bool:
        return self.balance is None or self.balance > 0

    def available(self, now: float) -> bool:
        return not self.quarantined and self.cooldown_until <= now and self.funded


def _usable(value: str) -> bool:
    # A key goes into an HTTP header: printable ASCII without spaces, nothing else.
    return bool(value) and value.isascii() and value.isprintable() and " " not in value


class KeyPool:
    def __init__(self, failure_threshold: int = 3, clock: Callable[[], float] = time.monotonic):
        self.failure_threshold = failure_threshold
        self.clock = clock
        self._accounts: dict[str, list[Key]] = {}
        self._keys: list[Key] = []  # flattened, in account order: the round-robin ring
        self._next = 0
        self._last_success_at = -1e18
        # another replica's verdicts by key digest: (skip until, on this pool's clock; why)
        self._verdicts: dict[str, tuple[float, str]] = {}
        # told of this pool's own verdicts: (key, quarantined, skip until on this pool's clock)
        self.on_verdict: Callable[[Key, bool, float], None] | None = None

    # -- membership ------------------------------------------------------------------

    def set_account_keys(self, account: str, infos: Iterable[KeyInfo]) -> None:
        """Replace an account's keys. A key that stays keeps its counters and
        cooldown (an in-place update), but a refresh lifts its quarantine."""
        old = {k.value: k for k in self._accounts.get(account, [])}
        keys: list[Key] = []
        seen: set[str] = set()
        for info in infos:
            if info.value in seen or not _usable(info.value):
                continue
            seen.add(info.value)
            key = old.get(info.value) or Key(info.value, account)
            key.balance, key.used, key.quarantined = info.balance, info.used, False
            keys.append(key)
        self._accounts[account] = keys
        self._rebuild()
        now = self.clock()
        for key in keys:
            verdict = self._verdicts.get(key.digest)
            if verdict is not None and verdict[0] > now:
                self._skip(key, *verdict)

    def apply_verdict(self, digest: str, until: float, reason: str) -> None:
        """Another replica benched the key with ``digest`` until ``until`` (this pool's clock)."""
        now = self.clock()
        self._verdicts = {d: v for d, v in self._verdicts.items() if v[0] > now}
        if until <= now:
            return
        self._verdicts[digest] = (until, reason)
        for key in self._keys:
            if key.digest == digest:
                self._skip(key, until, reason)

    @staticmethod
    def _skip(key: Key, until: float, reason: str) -> None:
        if until > key.cooldown_until:
            key.cooldown_until, key.last_error = until, reason

    def remove_account(self, account: str) -> None:
        # Requests in flight hold their Key object; reports on it just touch an orphan.
        if self._accounts.pop(account, None) is not None:
            self._rebuild()

    def _rebuild(self) -> None:
        self._keys = [k for keys in self._accounts.values() for k in keys]
        if self._next >= len(self._keys):
            self._next = 0

    def accounts(self) -> dict[str, list[Key]]:
        return {name: list(keys) for name, keys in self._accounts.items()}

    def keys(self) -> list[Key]:
        return list(self._keys)

    # -- choosing --------------------------------------------------------------------

    def acquire(self, exclude: set[Key] | frozenset[Key] = frozenset()) -> Key | None:
        """The next available key in round-robin order, else the cooling key that
        comes back first, else None. ``exclude`` holds keys this request already tried."""
        ring = self._keys
        n = len(ring)
        if not n:
            return None
        now = self.clock()
        start = self._next
        for i in range(n):
            idx = (start + i) % n
            key = ring[idx]
            if key.available(now) and key not in exclude:
                self._next = (idx + 1) % n
                key.requests += 1
                return key
        fallback = None
        for key in ring:
            if key.quarantined or not key.funded or key in exclude:
                continue
            if fallback is None or key.cooldown_until < fallback.cooldown_until:
                fallback = key
        if fallback is not None:
            fallback.requests += 1
        return fallback

    # -- learning --------------------------------------------------------------------

    def report(self, key: Key, outcome: AttemptOutcome, error: str | None = None,
               retry_after: float | None = None) -> bool:
        """Learn from one attempt. True when this took the key out of the rotation (worth a log line)."""
        now = self.clock()
        if outcome is AttemptOutcome.SUCCESS:   # the common case: it cannot take a key out
            self._learn(key, outcome, now, error, retry_after)
            return False
        was_available = key.available(now)
        self._learn(key, outcome, now, error, retry_after)
        return was_available and not key.available(now)

    def _learn(self, key: Key, outcome: AttemptOutcome, now: float, error: str | None, retry_after: float | None) -> None:
        if outcome is AttemptOutcome.SUCCESS:
            key.failures = 0
            key.streak = 0
            key.cooldown_until = 0.0
            key.rate_limited = False
            self._last_success_at = now
            return
        if outcome is AttemptOutcome.NEUTRAL:
            return
        key.total_failures += 1
        key.last_error = error or outcome.value
        if outcome is AttemptOutcome.RATE_LIMITED:
            wait = DEFAULT_RETRY_AFTER if retry_after is None else min(max(retry_after, 0.0), MAX_RETRY_AFTER)
            if now + wait > key.cooldown_until:
                key.cooldown_until, key.rate_limited = now + wait, True
                if self.on_verdict is not None:
                    self.on_verdict(key, False, key.cooldown_until)
            return
        if outcome is AttemptOutcome.UNAUTHORIZED:
            if not key.quarantined and self.on_verdict is not None:
                self.on_verdict(key, True, now)
            key.quarantined = True
            return
        # FAILURE: transport error, timeout or 5xx.
        key.failures += 1
        key.last_failure_at = now
        key.rate_limited = False
        if self._outage(now):
            # Everyone fails at once: the upstream is down. Keep retries cheap and
            # bring every failure-benched key back soon, without growing streaks.
            limit = now + OUTAGE_COOLDOWN
            for other in self._keys:
                if other.failures >= self.failure_threshold and other.cooldown_until > limit:
                    other.cooldown_until = limit
            if key.failures >= self.failure_threshold:
                key.cooldown_until = max(key.cooldown_until, limit)
            return
        if key.failures >= self.failure_threshold:
            wait = min(BASE_COOLDOWN * (2 ** key.streak), MAX_COOLDOWN)
            key.streak += 1
            key.cooldown_until = now + wait

    def _outage(self, now: float) -> bool:
        """Every key that could have been tried failed within moments, and nothing succeeded since."""
        since = max(now - OUTAGE_WINDOW, self._last_success_at)
        candidates = [k for k in self._keys if not k.quarantined and k.funded
                      and not (k.rate_limited and k.cooldown_until > now)]
        return bool(candidates) and all(k.last_failure_at > since for k in candidates)

    # -- reading ---------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(total, available) right now."""
        now = self.clock()
        return len(self._keys), sum(1 for k in self._keys if k.available(now))
