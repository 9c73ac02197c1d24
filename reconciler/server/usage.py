"""What each instance used of the key pool, against its budget, as the API relays it: ``GET
/api/usage`` (the current windows, or daily totals of a range) and the usage fields of each
instance row. Read from the in-process proxy: its book for the current windows (reservations of
requests in flight included), its ledger for the days before."""
from __future__ import annotations

import asyncio
from datetime import date
from typing import Any, Mapping

from proxy.budget import UsageBook, daily_document
from proxy.callers import ANONYMOUS, CLIENT
from proxy.service import ProxyService

from ..desired.model import DesiredState, port_of
from .fleet import ApiError

MAX_SPAN_DAYS = 3660   # ten years of daily totals in one answer is plenty


def instance_fields(proxy: ProxyService | None, id_: str) -> dict[str, Any]:
    """``usage`` (today, month), ``budget`` and ``left`` of one instance; None while no proxy runs."""
    if proxy is None or proxy.state is None:
        return {"usage": None, "budget": None, "left": None}
    document = proxy.state.usage.caller_document(id_)
    return {"usage": {"today": document["today"], "month": document["month"]},
            "budget": document["budget"], "left": document["left"]}


def _book(proxy: ProxyService | None) -> UsageBook:
    if proxy is None or proxy.state is None:
        raise ApiError(503, "no_proxy")
    return proxy.state.usage


def _day(query: Mapping[str, str], field: str, default: str) -> date:
    value = query.get(field, default)
    try:
        if len(value) != 10:
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise ApiError(400, "bad_day", field=field, value=repr(value[:40])) from None


async def usage(proxy: ProxyService | None, desired: DesiredState, query: Mapping[str, str]) -> dict[str, Any]:
    """The current windows of every declared instance (and any other caller seen); with ``from``,
    ``to`` or ``instance`` in ``query``, daily totals of that range instead."""
    book = _book(proxy)
    if not {"from", "to", "instance"} & set(query):
        return book.document(i.id for i in desired.instances)
    window = book.window()
    first = _day(query, "from", window["month"] + "-01")
    last = _day(query, "to", window["day"])
    if first > last or (last - first).days >= MAX_SPAN_DAYS:
        raise ApiError(400, "bad_range", first=first.isoformat(), last=last.isoformat(), days=MAX_SPAN_DAYS)
    caller = query.get("instance")
    if caller is not None and caller not in (CLIENT, ANONYMOUS) and port_of(caller) is None:
        raise ApiError(400, "bad_caller", value=repr(caller[:40]))
    assert book.ledger is not None
    totals = await asyncio.to_thread(book.ledger.store.daily, first.isoformat(), last.isoformat(), caller)
    return daily_document(window, totals, first.isoformat(), last.isoformat())
