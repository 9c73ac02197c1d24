"""The key pool as the API relays it (``GET /api/pool``, the ``pool`` event): the in-process
proxy's own status document, plus the proxy's URL, each account's state and the total balance,
so the admin page needs nothing but the API."""
from __future__ import annotations

from typing import Any

from proxy.server import status_document
from proxy.service import ProxyService


def account_state(info: dict[str, Any]) -> str:
    """``ok`` (logged in / keys loaded), ``error`` (``last_error`` says why) or ``pending`` (not yet)."""
    if info.get("last_error"):
        return "error"
    return "ok" if info.get("last_refresh") else "pending"


def pool_document(proxy: ProxyService | None) -> dict[str, Any]:
    if proxy is None or proxy.state is None:
        return {"running": False, "url": None, "totalBalance": 0.0, "keys": {"total": 0, "available": 0},
                "accounts": {}, "store": {"kind": "sqlite"}}
    document = status_document(proxy.state)
    accounts = {name: {**info, "state": account_state(info)} for name, info in document["accounts"].items()}
    return {
        "running": True,
        "url": f"{proxy.url}/v1",
        "totalBalance": round(sum(a["balance"] for a in accounts.values()), 2),
        "keys": document["keys"],
        "accounts": accounts,
        "store": proxy.shared.status() if proxy.shared is not None else {"kind": "sqlite"},
    }
