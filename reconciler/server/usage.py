"""What each instance used of the key pool, against its budget, as the API relays it: ``GET
/api/usage`` (the current windows, or daily totals of a range) and the usage fields of each
instance row. Asked of the proxy process on its control socket (``pool_process``): its book for
the current windows (reservations of requests in flight included), and, for the days before, its
ledger, which it reads for us (it has the store open, a PostgreSQL one with its password) rather
than cst serve opening the store a second time."""
from __future__ import annotations

from datetime import date
from typing import Any, Mapping

from proxy.callers import ANONYMOUS, CLIENT

from ..desired.model import DesiredState, port_of
from .errors import ErrorKind, FleetError
from .pool_process import PoolProcess

MAX_SPAN_DAYS = 3660   # ten years of daily totals in one answer is plenty
NO_USAGE = {"usage": None, "budget": None, "left": None}


async def instance_fields(proxy: PoolProcess | None, ids: list[str]) -> dict[str, dict[str, Any]]:
    """``usage`` (today, month), ``budget`` and ``left`` of each instance, asked in one call; None
    in each while no proxy runs (or answers)."""
    document = await proxy.usage(ids) if proxy is not None and ids else None
    if document is None:
        return {id_: dict(NO_USAGE) for id_ in ids}
    fields = {}
    for id_ in ids:
        caller = document["instances"][id_]
        fields[id_] = {"usage": {"today": caller["today"], "month": caller["month"]},
                       "budget": caller["budget"], "left": caller["left"]}
    return fields


def _day(query: Mapping[str, str], field: str, default: str) -> date:
    value = query.get(field, default)
    try:
        if len(value) != 10:
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise FleetError(ErrorKind.BAD_REQUEST, "bad_day", field=field, value=repr(value[:40])) from None


async def usage(proxy: PoolProcess | None, desired: DesiredState, query: Mapping[str, str]) -> dict[str, Any]:
    """The current windows of every declared instance (and any other caller seen); with ``from``,
    ``to`` or ``instance`` in ``query``, daily totals of that range instead."""
    daily = bool({"from", "to", "instance"} & set(query))
    if proxy is None:
        raise FleetError(ErrorKind.UNAVAILABLE, "no_proxy")
    document = await proxy.usage([] if daily else [i.id for i in desired.instances])
    if document is None:
        raise FleetError(ErrorKind.UNAVAILABLE, "no_proxy")
    if not daily:
        return document
    window = document["window"]
    first = _day(query, "from", window["month"] + "-01")
    last = _day(query, "to", window["day"])
    if first > last or (last - first).days >= MAX_SPAN_DAYS:
        raise FleetError(ErrorKind.BAD_REQUEST, "bad_range", first=first.isoformat(), last=last.isoformat(), days=MAX_SPAN_DAYS)
    caller = query.get("instance")
    if caller is not None and caller not in (CLIENT, ANONYMOUS) and port_of(caller) is None:
        raise FleetError(ErrorKind.BAD_REQUEST, "bad_caller", value=repr(caller[:40]))
    totals = await proxy.daily(first.isoformat(), last.isoformat(), caller)
    if totals is None:
        raise FleetError(ErrorKind.UNAVAILABLE, "no_proxy")
    return totals
