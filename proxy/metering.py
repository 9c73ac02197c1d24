"""How a request under ``/v1`` is paid for, decided from its method and normalised path alone.

Every path that costs goes through the budget; none is free because the proxy does not know it:

* ``TOKENS``: the answer reports what it cost (chat and completions, embeddings, the Responses
  API); the budget holds an estimate before and the upstream's ``usage`` is billed after.
* ``PER_REQUEST``: the cost is not counted in tokens (images, audio, any POST the proxy does
  not know), so each request is charged ``settings.proxy.metering`` declares, never zero.
* ``FREE``: reading (GET, HEAD) and deleting cost nothing: a model list is never refused, since
  SillyTavern shows "Not connected" when it fails.
* Paths whose cost arrives later, where no answer can say it (batches and the files they read,
  fine-tuning, assistants' runs, realtime sessions, video jobs), are refused unless the file
  allows them (then charged per request), as is any path the file refuses.
"""
from __future__ import annotations

import enum
from fnmatch import fnmatchcase
from typing import NamedTuple

from reconciler.desired.model import MeteringSettings


class Metering(enum.Enum):
    FREE = "free"
    TOKENS = "tokens"
    PER_REQUEST = "per_request"


class Refused(enum.Enum):
    """Why a path is not forwarded at all; each is a 403 with its own code."""

    DEFERRED = "cost_deferred"     # its cost comes later, and the file does not allow such paths
    DECLARED = "path_refused"      # the file refuses it


class PathCost(NamedTuple):
    metering: Metering
    charge: int                    # tokens per request (PER_REQUEST), else 0
    refused: Refused | None = None


TOKEN_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"})
STREAMABLE = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
# whose cost arrives after the answer (the first segment after /v1, or a glob of the path)
_DEFERRED_ROOTS = frozenset({"batches", "files", "uploads", "fine_tuning", "fine-tunes", "vector_stores", "realtime",
                             "videos", "evals", "containers"})
_DEFERRED_GLOBS = ("/v1/threads/*runs*",)
_FREE_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
_FREE = PathCost(Metering.FREE, 0)
_TOKENS = PathCost(Metering.TOKENS, 0)


def is_deferred(path: str) -> bool:
    root = path[4:].split("/", 1)[0]
    return root in _DEFERRED_ROOTS or any(fnmatchcase(path, glob) for glob in _DEFERRED_GLOBS)


class MeteringPolicy:
    """``settings.proxy.metering`` made ready for the request path: the cost of the token paths
    is decided once, here; other paths (rare) match the declared globs as they come."""

    def __init__(self, settings: MeteringSettings):
        self.settings = settings
        self._token_paths = {path: self._declared(path, _TOKENS) for path in TOKEN_PATHS}

    def _declared(self, path: str, otherwise: PathCost) -> PathCost:
        for glob, charge in self.settings.paths:
            if fnmatchcase(path, glob):
                if charge is None:
                    return PathCost(otherwise.metering, 0, Refused.DECLARED)
                # a path metered by its tokens keeps that meter: a declared charge is for the others
                return otherwise if otherwise.metering is Metering.TOKENS else PathCost(Metering.PER_REQUEST, charge)
        return otherwise

    def cost(self, method: str, path: str) -> PathCost:
        """``path``: normalised, without its query."""
        if method in _FREE_METHODS:
            return _FREE
        known = self._token_paths.get(path)
        if known is not None:
            return known
        if is_deferred(path):
            return self.deferred(path)
        return self._declared(path, PathCost(Metering.PER_REQUEST, self.settings.per_request))

    def deferred(self, path: str) -> PathCost:
        """The cost of a request to ``path`` whose cost comes later (a deferred path, or a
        background response): refused unless the file allows such requests or declares the path."""
        if self.settings.allow_deferred:
            return self._declared(path, PathCost(Metering.PER_REQUEST, self.settings.per_request))
        return self._declared(path, PathCost(Metering.PER_REQUEST, 0, Refused.DEFERRED))
