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
import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from reconciler.desired.model import NO_LIMIT, Budget

from .calendar import Calendar
from .ledger import DayTotal, LedgerWriter, Row, Standing, Tally
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


def _left(allowed: int | None, used: int) -> int | None:
    return None if allowed is None else max(allowed - used, 0)


def charge(facts: RequestFacts, meter_usage: tuple[int, int] | None, accepted: bool,
           text_bytes: int) -> tuple[int, int, bool]:
    """(prompt, completion, estimated) to bill: the upstream's figures when it reported them; else,
    once an upstream took the request (2xx), an estimate of the prompt and of what was relayed;
    else nothing (it answered an error, or never answered)."""
    if meter_usage is not None:
        return meter_usage[0], meter_usage[1], False
    if facts.billable and accepted:
        return facts.prompt_estimate, estimate_tokens(text_bytes), True
    return 0, 0, False


class UsageBook:
    def __init__(self, calendar: Calendar, ledger: LedgerWriter | None = None,
                 clock: Callable[[], float] = time.time):
        self.calendar = calendar
        self.ledger = ledger
        self.clock = clock
        self.budgets: Mapping[str, Budget] = {}   # the callers with a limit; the others have none
        self._accounts: dict[str, _Account] = {}

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

    def _account(self, caller: str, day: str, month: str) -> _Account:
        account = self._accounts.get(caller)
        if account is None:
            account = self._accounts[caller] = _Account(day, month)
        else:
            account.roll(day, month)
        return account

    def admit(self, caller: str, facts: RequestFacts) -> Reservation | Refusal:
        now = self.clock()
        day, month = self.calendar.window(now)
        budget = self.budgets.get(caller) if facts.billable else None
        if budget is None:
            return Reservation(caller, facts, 0, now, day, month)
        account = self._account(caller, day, month)
        refusal = self._refusal(caller, budget, account, now)
        if refusal is not None:
            return refusal
        # never more than is left, so that one request is not refused for its worst case
        tokens = facts.reservation
        if budget.tokens_per_day is not None:
            tokens = min(tokens, budget.tokens_per_day - account.today.tokens - account.reserved)
        if budget.tokens_per_month is not None:
            tokens = min(tokens, budget.tokens_per_month - account.this_month.tokens - account.reserved)
        if budget.requests_per_minute is not None:
            account.recent.append(now)
        account.reserved += tokens
        return Reservation(caller, facts, tokens, now, day, month)

    def _refusal(self, caller: str, budget: Budget, account: _Account, now: float) -> Refusal | None:
        """Which limit is used up, if one is."""
        calendar = self.calendar
        per_minute = budget.requests_per_minute
        if per_minute is not None and account.recent_count(now) >= per_minute:
            resets = datetime.fromtimestamp((account.recent[0] if account.recent else now) + MINUTE, calendar.zone)
            return Refusal(caller, Limit.MINUTE, len(account.recent), per_minute, resets, calendar.name)
        if budget.tokens_per_day is not None and account.today.tokens + account.reserved >= budget.tokens_per_day:
            return Refusal(caller, Limit.DAY, account.today.tokens, budget.tokens_per_day, calendar.day_ends(now),
                           calendar.name)
        if (budget.tokens_per_month is not None
                and account.this_month.tokens + account.reserved >= budget.tokens_per_month):
            return Refusal(caller, Limit.MONTH, account.this_month.tokens, budget.tokens_per_month,
                           calendar.month_ends(now), calendar.name)
        return None

    def settle(self, reservation: Reservation, status: int, prompt: int, completion: int, estimated: bool,
               key: str) -> Row:
        """The request has ended: its reservation becomes what it cost, and a row of the ledger."""
        now = self.clock()
        facts = reservation.facts
        row = Row(reservation.caller, facts.model, facts.path, status, prompt, completion, estimated,
                  reservation.started, now, key, reservation.day)
        account = self._account(reservation.caller, *self.calendar.window(now))
        account.reserved = max(account.reserved - reservation.tokens, 0)
        if account.day == reservation.day:
            account.today.add(row)
        if account.month == reservation.month:
            account.this_month.add(row)
        if self.ledger is not None:
            self.ledger.append(row)
        return row

    def refused(self, caller: str, facts: RequestFacts, status: int) -> Row:
        """A request answered without going upstream (over budget): a row, no tokens."""
        now = self.clock()
        nothing = Reservation(caller, facts, 0, now, *self.calendar.window(now))
        return self.settle(nothing, status, 0, 0, False, "")

    # -- what people read -------------------------------------------------------------------

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
