"""Every error code the server can answer with has a message in both languages and is listed in
the OpenAPI document a client reads it from; every kind of service failure has its status."""
from __future__ import annotations

import json
import re
from pathlib import Path

from reconciler.server.api import STATUS
from reconciler.server.errors import ErrorKind
from reconciler.server.messages import MESSAGES

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "reconciler" / "server"
# the operations' failure codes, passed on as a variable (failure_key) to the pass's failures
FAILURE_KEYS = {"create_failed", "start_failed", "stop_failed", "restart_failed", "delete_failed"}


def codes_in_use() -> set[str]:
    codes = set(FAILURE_KEYS)
    for module in SERVER.glob("*.py"):
        text = module.read_text()
        codes |= set(re.findall(r'FleetError\(ErrorKind\.\w+, "(\w+)"', text))
        codes |= set(re.findall(r'error_answer\(request, \d+, "(\w+)"', text))
    return codes


def test_every_code_has_both_messages_and_is_documented() -> None:
    codes = codes_in_use()
    assert len(codes) > 40   # the scan found the raises
    assert codes <= set(MESSAGES)
    error = json.loads((ROOT / "schemas" / "openapi.json").read_text())["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "code"]
    documented = set(re.findall(r"[a-z_]+", error["properties"]["code"]["description"].split("One of:")[1]))
    assert codes <= documented, codes - documented


def test_every_kind_of_failure_has_one_status() -> None:
    assert set(STATUS) == set(ErrorKind)
    assert all(400 <= status < 600 for status in STATUS.values())
