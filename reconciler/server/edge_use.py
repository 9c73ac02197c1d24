"""What the edge tells parking about each instance's use.

* **Requests that ended**: nginx logs the end of each request it relays for an instance as a
  datagram to cst serve's use socket (``$cst_id``, syslog-framed). Datagrams are never waited
  for: while cst serve is away nginx drops them, and nothing is parked meanwhile anyway.
* **Requests in flight**: an access log line comes when a request ends, so a long upload or a
  chat stream would look idle. nginx opens a connection to node's socket per request (no
  keep-alive upstream), so the connections open on that socket (``/proc/net/unix``) are the
  requests in flight at the edge.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger("cst.parking")

_CONNECTED = "03"   # /proc/net/unix's state of a connected socket (an accepted one names its listener's path)


def connections_by_path(table: str) -> Counter[str]:
    """Connected sockets per path, in the text of ``/proc/net/unix``."""
    counts: Counter[str] = Counter()
    for line in table.splitlines()[1:]:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[5] == _CONNECTED:
            counts[fields[7]] += 1
    return counts


def in_flight_at_edge() -> Counter[str]:
    """Blocking (reads /proc): requests in flight at the edge, by node's socket path."""
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
        return connections_by_path(table.read())


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, ended: dict[str, float]):
        self._ended = ended

    def datagram_received(self, data: bytes, addr: object) -> None:
        # "<190>Dec  5 22:40:00 nginx: st-instance-8001": the instance is the last word
        id_ = data.rsplit(b" ", 1)[-1].strip().decode("ascii", errors="replace")
        self._ended[id_] = time.monotonic()


class EdgeUse:
    """The last request the edge ended for each instance, as cst serve heard it."""

    def __init__(self, path: Path, group: int | None):
        self._path = path
        self._group = group
        self.ended: dict[str, float] = {}     # instance id -> monotonic time of its last request's end
        self._transport: asyncio.BaseTransport | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._path.unlink(missing_ok=True)
            sock.bind(str(self._path))
            if self._group is not None:
                os.chown(self._path, -1, self._group)
            os.chmod(self._path, 0o660 if self._group is not None else 0o600)
        except BaseException:
            sock.close()
            raise
        self._transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Datagrams(self.ended), sock=sock)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
