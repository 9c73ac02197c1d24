"""The key pool as the API relays it (``GET /api/pool``, the ``pool`` event): the document the
proxy process builds (``proxy.control.pool_document``: its status, its URL, each account's state
and the total balance), asked on its control socket, so the admin page needs nothing but the API."""
from __future__ import annotations

import copy
from typing import Any

from .pool_process import PoolProcess

NOT_RUNNING: dict[str, Any] = {"running": False, "url": None, "totalBalance": 0.0,
                               "keys": {"total": 0, "available": 0}, "accounts": {}, "store": {"kind": "sqlite"}}


async def pool_document(proxy: PoolProcess | None) -> dict[str, Any]:
    """The proxy's document; ``NOT_RUNNING`` while none runs or answers."""
    document = await proxy.pool() if proxy is not None else None
    return document if document is not None else copy.deepcopy(NOT_RUNNING)
