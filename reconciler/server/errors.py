"""What the service layer says when it refuses or cannot do a request, in its own terms.

``Fleet`` and the request readers raise ``FleetError``; ``api`` alone turns one into HTTP (the
status from its ``kind``, ``{"error": ..., "code": ...}`` in the caller's language). ``code`` is
stable and machine-readable: a client branches on it, never on the wording, and it is the key of
the localised message in ``messages``."""
from __future__ import annotations

from enum import Enum


class ErrorKind(Enum):
    """What sort of failure a ``FleetError`` is: decides the answer's status, nothing else."""

    BAD_REQUEST = "bad-request"          # the request itself is wrong (its body, a port, a query)
    UNSUPPORTED_BODY = "unsupported-body"  # not a JSON body
    FORBIDDEN = "forbidden"              # a change the API may not make (a restricted setting)
    NOT_FOUND = "not-found"              # no such instance, data dir, snapshot or page file
    CONFLICT = "conflict"                # not possible in the current state (the file is invalid, ...)
    STALE = "stale"                      # the caller's If-Match names an older file
    PRECONDITION_REQUIRED = "precondition-required"   # If-Match missing
    FAILED = "failed"                    # it was tried and did not work
    UNAVAILABLE = "unavailable"          # a part that would do it is not there now (the proxy, a wake)
    BUSY = "busy"                        # it waited its time for the state dir and gave up


class FleetError(Exception):
    """``retry_after``: seconds before trying again is worth it, when the failure says (a wake
    backing off, CST busy); ``params`` fill in the message."""

    def __init__(self, kind: ErrorKind, code: str, retry_after: int | None = None, **params: object):
        self.kind, self.code, self.retry_after, self.params = kind, code, retry_after, params
        super().__init__(code)
