"""Budgets: what each caller used in the current windows, what is reserved by its requests in
flight, and whether the next request may go.

Reserve, then settle: before a request goes upstream, ``admit`` reserves what it may cost (its
prompt estimate plus what it may generate, never more than is left), so concurrent requests
cannot all pass a budget that allows a few; when it ends, ``settle`` replaces the reservation
with the real figure and hands the row to the ledger. Windows are keys of the calendar (see
``calendar``): a new day starts at zero because its key is new, and changing a limit never
changes what was spent.

Pure bookkeeping on the event loop (the ledger writes on its own thread); time comes from an
injectable clock, so windows rolling at midnight are testable.
"""
from __future__ import annotations

import enum
import itertools
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Protocol

from reconciler.desired.model import NO_LIMIT, Budget

from .calendar import Calendar
from .ledger import DayTotal, LedgerWriter, Standing, StoreUnavailable, Tally, clean_text
from .metering import Metering
from .request_body import RequestFacts, estimate_tokens

MINUTE = 60.0


class Limit(enum.Enum):
    DAY = "tokens_per_day"
    MONTH = "tokens_per_month"
    MINUTE = "requests_per_minute"


@dataclass(frozen=True)
class Refusal:
    """A request refused because ``limit`` is used up until ``resets``."""

    caller: str
    limit: Limit
    used: int
    allowed: int
    resets: datetime
    zone: str

    def retry_after(self, now: float) -> int:
        return max(1, math.ceil(self.resets.timestamp() - now))

    def message(self) -> str:
        """English and Chinese in one message: SillyTavern shows the endpoint's error text as it is."""
        when = self.resets.strftime("%Y-%m-%d %H:%M:%S")
        if self.limit is Limit.MINUTE:
            return (f"{self.caller} has made {self.used} of its {self.allowed} requests per minute; "
                    f"try again after {when} ({self.zone}). / "
                    f"{self.caller} 每分钟最多 {self.allowed} 次请求，已用 {self.used} 次；请于 {when}（{self.zone}）后再试。")
        span_en, span_zh = ("day", "今日") if self.limit is Limit.DAY else ("month", "本月")
        return (f"{self.caller} has used {self.used} of its {self.allowed} tokens per {span_en}; "
                f"the budget resets at {when} ({self.zone}). / "
                f"{self.caller} {span_zh}额度已用完：已用 {self.used} / {self.allowed} tokens，将于 {when}（{self.zone}）重置。")


class Reservation(NamedTuple):
    caller: str
    facts: RequestFacts
    tokens: int
    started: float
    day: str
    month: str
    rid: str          # the request's id: its ledger row's, and its hold's in a shared store


@dataclass
class _Account:
    """One caller's standing in the current windows."""

    day: str = ""
    month: str = ""
    today: Tally = field(default_factory=Tally)
    this_month: Tally = field(default_factory=Tally)
    reserved: int = 0
    recent: deque[float] = field(default_factory=deque)   # start times within the last minute

    def roll(self, day: str, month: str) -> None:
        if day != self.day:
            self.day, self.today = day, Tally()
        if month != self.month:
            self.month, self.this_month = month, Tally()

    def recent_count(self, now: float) -> int:
        while self.recent and self.recent[0] <= now - MINUTE:
            self.recent.popleft()
        return len(self.recent)

    def used(self, now: float) -> Used:
        recent = self.recent_count(now)
        return Used(self.today.tokens, self.this_month.tokens, self.reserved, recent,
                    self.recent[0] if recent else None)


class Used(NamedTuple):
    """What a caller used in the current windows, where a budget decision reads it (the book's own
    account, or a shared store's answer)."""

    today: int          # tokens of the day, settled
    month: int          # tokens of the month, settled
    reserved: int       # tokens held by requests in flight
    recent: int         # requests started within the last minute
    oldest_recent: float | None   # when the oldest of those started


def refusal(caller: str, budget: Budget, used: Used, calendar: Calendar, now: float) -> Refusal | None:
    """Which limit of ``budget`` is used up, if one is."""
    per_minute = budget.requests_per_minute
    if per_minute is not None and used.recent >= per_minute:
        resets = datetime.fromtimestamp((used.oldest_recent or now) + MINUTE, calendar.zone)
        return Refusal(caller, Limit.MINUTE, used.recent, per_minute, resets, calendar.name)
    if budget.tokens_per_day is not None and used.today + used.reserved >= budget.tokens_per_day:
        return Refusal(caller, Limit.DAY, used.today, budget.tokens_per_day, calendar.day_ends(now), calendar.name)
    if budget.tokens_per_month is not None and used.month + used.reserved >= budget.tokens_per_month:
        return Refusal(caller, Limit.MONTH, used.month, budget.tokens_per_month, calendar.month_ends(now),
                       calendar.name)
    return None


def grant(budget: Budget, want: int, used: Used) -> int:
    """Tokens to reserve for a request that may cost ``want``: never more than is left, so that
    one request is not refused for its worst case."""
    if budget.tokens_per_day is not None:
        want = min(want, budget.tokens_per_day - used.today - used.reserved)
    if budget.tokens_per_month is not None:
        want = min(want, budget.tokens_per_month - used.month - used.reserved)
    return want


def bounded(facts: RequestFacts, budget: Budget, tokens: int) -> RequestFacts:
    """``facts`` as a request holding ``tokens`` of ``budget`` is sent: under a limit of tokens, its
    answers may not generate more than it holds (the README states the bound)."""
    if budget.tokens_per_day is None and budget.tokens_per_month is None:
        return facts
    return facts.within(tokens)


class SharedBudgets(Protocol):
    """A store that decides budgets for several proxy replicas at once (``shared.SharedStore``)."""

    url: str   # the store as people may see it

    def status(self) -> dict[str, Any]: ...

    @property
    def serving(self) -> bool:
        """Whether requests are served now: the store answers, or on_store_down is open."""

    @property
    def up(self) -> bool: ...

    async def reserve(self, caller: str, budget: Budget, want: int, now: float, day: str, month: str,
                      rid: str) -> tuple[int | None, Used]:
        """Hold up to ``want`` tokens for ``caller`` atomically in the store: (tokens held, or None when
        a limit is used up; what the store counted). Raises ``StoreUnavailable``."""

    def release(self, rid: str) -> None:
        """The request ``rid`` reserved with has ended."""


def _left(allowed: int | None, used: int) -> int | None:
    return None if allowed is None else max(allowed - used, 0)


def charge(facts: RequestFacts, meter_usage: tuple[int, int] | None, accepted: bool,
           text_bytes: int) -> tuple[int, int, bool]:
    """(prompt, completion, estimated) to bill. On a path metered in tokens: the upstream's figures
    when it reported them; else, once an upstream took the request (2xx), an estimate of the
    prompt and of what was relayed. On a path charged per request: that charge, once an upstream
    took it, marked as estimated. Else nothing (it answered an error, or never answered)."""
    if facts.metering is Metering.TOKENS:
        if meter_usage is not None:
            return meter_usage[0], meter_usage[1], False
        if accepted:
            return facts.prompt_estimate, estimate_tokens(text_bytes), True
    elif facts.metering is Metering.PER_REQUEST and accepted:
        return facts.charge, 0, True
    return 0, 0, False


class UsageBook:
    def __init__(self, calendar: Calendar, ledger: LedgerWriter | None = None,
                 clock: Callable[[], float] = time.time):
        self.calendar = calendar
        self.ledger = ledger
        self.clock = clock
        self.budgets: Mapping[str, Budget] = {}   # the callers with a limit; the others have none
        self.shared: SharedBudgets | None = None  # budgets decided in a store shared by replicas
        self._accounts: dict[str, _Account] = {}
        self._rid_prefix = secrets.token_hex(6) + "-"   # this process's requests' ids: prefix + count
        self._rids = itertools.count(1)

    def reset(self, calendar: Calendar) -> None:
        """Count in another time zone: the windows change, so what they hold is read again (``load``)."""
        self.calendar = calendar
        self._accounts = {}

    def load(self, standing: Mapping[str, Standing]) -> None:
        """Start from what the store holds for the current windows."""
        now = self.clock()
        day, month = self.calendar.window(now)
        for caller, found in standing.items():
            account = self._account(caller, day, month)
            account.today.merge(found.today)
            account.this_month.merge(found.month)
            account.recent.extend(sorted(t for t in found.recent if t > now - MINUTE))

    def refresh(self, standing: Mapping[str, Standing], day: str, month: str) -> None:
        """Take a shared store's totals of ``day`` and ``month`` as they are (every replica's
        requests), keeping this process's reservations in flight."""
        for caller, found in standing.items():
            account = self._account(caller, day, month)
            if account.day == day:
                account.today = found.today
            if account.month == month:
                account.this_month = found.month

    def _account(self, caller: str, day: str, month: str) -> _Account:
        account = self._accounts.get(caller)
        if account is None:
            account = self._accounts[caller] = _Account(day, month)
        elif account.day != day or account.month != month:
            account.roll(day, month)
        return account

    def _rid(self) -> str:
        return self._rid_prefix + str(next(self._rids))

    def admit(self, caller: str, facts: RequestFacts) -> Reservation | Refusal:
        """Decide on this process's own counts (the only ones, unless a store is shared)."""
        now = self.clock()
        day, month = self.calendar.window(now)
        budget = self.budgets.get(caller) if facts.metering is not Metering.FREE else None
        if budget is None:
            return Reservation(caller, facts, 0, now, day, month, self._rid())
        account = self._account(caller, day, month)
        used = account.used(now)
        refused = refusal(caller, budget, used, self.calendar, now)
        if refused is not None:
            return refused
        tokens = grant(budget, facts.reservation, used)
        if budget.requests_per_minute is not None:
            account.recent.append(now)
        account.reserved += tokens
        return Reservation(caller, bounded(facts, budget, tokens), tokens, now, day, month, self._rid())

    async def admit_shared(self, caller: str, facts: RequestFacts) -> Reservation | Refusal:
        """Decide in the shared store, where every replica's requests count; while it cannot be
        reached, on this process's counts if on_store_down is open (else ``StoreUnavailable``)."""
        shared = self.shared
        budget = self.budgets.get(caller) if facts.metering is not Metering.FREE else None
        if budget is None or shared is None or not shared.up:
            if shared is not None and not shared.serving:
                raise StoreUnavailable("the store is down")
            return self.admit(caller, facts)
        now = self.clock()
        day, month = self.calendar.window(now)
        rid = self._rid()
        try:
            tokens, used = await shared.reserve(caller, budget, facts.reservation, now, day, month, rid)
        except StoreUnavailable:
            if not shared.serving:
                raise
            return self.admit(caller, facts)
        if tokens is None:
            refused = refusal(caller, budget, used, self.calendar, now)
            assert refused is not None, "the store refused what the same rules admit"
            return refused
        account = self._account(caller, day, month)
        account.reserved += tokens
        return Reservation(caller, bounded(facts, budget, tokens), tokens, now, day, month, rid)

    def settle(self, reservation: Reservation, status: int, prompt: int, completion: int, estimated: bool,
               key: str) -> None:
        """The request has ended: its reservation becomes what it cost, and a row of the ledger."""
        now = self.clock()
        facts = reservation.facts
        if self.shared is not None:
            self.shared.release(reservation.rid)
        account = self._account(reservation.caller, *self.calendar.window(now))
        if reservation.tokens:
            account.reserved = max(account.reserved - reservation.tokens, 0)
        failed = status >= 400
        if account.day == reservation.day:
            account.today.add(failed, prompt, completion, estimated)
        if account.month == reservation.month:
            account.this_month.add(failed, prompt, completion, estimated)
        if self.ledger is not None:   # a Row's fields as a plain tuple (see LedgerWriter.append)
            self.ledger.append((reservation.caller, clean_text(facts.model), clean_text(facts.path), status, prompt,
                                completion, estimated, reservation.started, now, key, reservation.day,
                                reservation.rid))

    def refused(self, caller: str, facts: RequestFacts, status: int) -> None:
        """A request answered without going upstream (over budget): a row, no tokens."""
        now = self.clock()
        nothing = Reservation(caller, facts, 0, now, *self.calendar.window(now), self._rid())
        self.settle(nothing, status, 0, 0, False, "")

    # -- what people read -------------------------------------------------------------------

    def reserved(self, caller: str) -> int:
        """Tokens held by this process's requests of ``caller`` in flight."""
        account = self._accounts.get(caller)
        return account.reserved if account is not None else 0

    def window(self) -> dict[str, Any]:
        now = self.clock()
        calendar = self.calendar
        day, month = calendar.window(now)
        return {"timezone": calendar.name, "day": day, "month": month,
                "resets": {"day": calendar.day_ends(now).isoformat(), "month": calendar.month_ends(now).isoformat()}}

    def callers(self) -> list[str]:
        return sorted(set(self._accounts) | set(self.budgets))

    def caller_document(self, caller: str) -> dict[str, Any]:
        """``today``, ``month``, ``budget`` and ``left`` of one caller."""
        now = self.clock()
        account = self._account(caller, *self.calendar.window(now))
        budget = self.budgets.get(caller, NO_LIMIT)
        limited = budget.limited
        return {
            "today": account.today.document(),
            "month": account.this_month.document(),
            "budget": {limit.value: getattr(budget, limit.value) for limit in Limit} if limited else None,
            "left": {
                Limit.DAY.value: _left(budget.tokens_per_day, account.today.tokens + account.reserved),
                Limit.MONTH.value: _left(budget.tokens_per_month, account.this_month.tokens + account.reserved),
                Limit.MINUTE.value: _left(budget.requests_per_minute, account.recent_count(now)),
            } if limited else None,
        }

    def document(self, instances: Iterable[str] = ()) -> dict[str, Any]:
        """Every caller's use in the current windows; ``instances`` are listed even when unused."""
        callers = sorted(set(self.callers()) | set(instances))
        return {"window": self.window(), "instances": {caller: self.caller_document(caller) for caller in callers}}

    def this_month(self) -> dict[str, Tally]:
        """Each caller's month so far (Prometheus counters: they start again with each month)."""
        return {caller: account.this_month for caller, account in sorted(self._accounts.items())}


def daily_document(window: dict[str, Any], totals: Iterable[DayTotal], first: str, last: str) -> dict[str, Any]:
    """Daily totals per caller from ``first`` to ``last`` (days without use are absent)."""
    return {"window": window, "from": first, "to": last, "days": [total.document() for total in totals]}
