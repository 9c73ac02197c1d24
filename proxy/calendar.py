"""Calendar windows in the declared time zone: the day and the month a moment belongs to.

A budget's window is a key (``2026-11-30``, ``2026-11``), not a timer: spend for "today" is what
the ledger holds under today's key, so nothing has to be reset at midnight and nothing can fail
to. The current day's bounds are cached, so telling the window of a request costs two float
comparisons, not a time-zone conversion.
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

LOCALTIME = "/etc/localtime"


def machine_zone() -> tuple[tzinfo, str]:
    """This machine's time zone and its name: ``$TZ``, else what /etc/localtime links to or holds,
    else UTC."""
    candidates = []
    if os.environ.get("TZ"):
        candidates.append(os.environ["TZ"].lstrip(":"))
    try:
        link = os.readlink(LOCALTIME)
        if "zoneinfo/" in link:
            candidates.append(link.split("zoneinfo/", 1)[1])
    except OSError:
        pass
    for name in candidates:
        try:
            return ZoneInfo(name), name
        except (ZoneInfoNotFoundError, ValueError, OSError):
            continue
    try:
        with open(LOCALTIME, "rb") as source:
            return ZoneInfo.from_file(source, key="localtime"), "localtime"
    except (OSError, ValueError):
        return ZoneInfo("UTC"), "UTC"


def _midnight(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _wall_to_zone(naive: datetime, zone: tzinfo) -> datetime:
    """The first moment a wall-clock time happens in ``zone`` (a midnight skipped by a DST change
    becomes the first moment of that day)."""
    aware = naive.replace(tzinfo=zone)
    # round-trip through UTC: a time in a gap moves forward to the instant the clocks jumped to
    return aware.astimezone(ZoneInfo("UTC")).astimezone(zone)


class Calendar:
    def __init__(self, zone: str | None = None):
        self.declared = zone   # as settings.usage.timezone says; None: the machine's
        if zone:
            self.zone: tzinfo = ZoneInfo(zone)
            self.name = zone
        else:
            self.zone, self.name = machine_zone()
        self._day_start = self._day_end = 0.0
        self._day = self._month = ""

    def _load(self, t: float) -> None:
        local = datetime.fromtimestamp(t, self.zone)
        start = _wall_to_zone(_midnight(local).replace(tzinfo=None), self.zone)
        end = _wall_to_zone((_midnight(local) + timedelta(days=1)).replace(tzinfo=None), self.zone)
        self._day_start, self._day_end = start.timestamp(), end.timestamp()
        self._day, self._month = local.strftime("%Y-%m-%d"), local.strftime("%Y-%m")

    def window(self, t: float) -> tuple[str, str]:
        """(day, month) of ``t``: ``YYYY-MM-DD`` and ``YYYY-MM``."""
        if not self._day_start <= t < self._day_end:
            self._load(t)
        return self._day, self._month

    def day_ends(self, t: float) -> datetime:
        """When the day of ``t`` ends (the next midnight), in the zone."""
        local = datetime.fromtimestamp(t, self.zone)
        return _wall_to_zone((_midnight(local) + timedelta(days=1)).replace(tzinfo=None), self.zone)

    def month_ends(self, t: float) -> datetime:
        local = datetime.fromtimestamp(t, self.zone)
        first = _midnight(local).replace(day=1, tzinfo=None)
        following = (first + timedelta(days=32)).replace(day=1)
        return _wall_to_zone(following, self.zone)
