"""Pointing a new instance's chat-completion API at the key pool, on its first start only.

Before an instance's very first start (its data dir has no ``default-user/settings.json`` yet)
CST writes the settings SillyTavern would have copied from its own defaults, with four values
changed: the API is Chat Completion, the source is "Custom (OpenAI-compatible)", its URL is the
proxy's ``/v1``, and auto-connect is on; the instance's proxy key goes into ``secrets.json`` as
the custom endpoint's key. SillyTavern never replaces a settings file that exists, and CST never
writes these settings again: whatever the user chooses later in the page stays.

Afterwards CST only follows its own values: when the proxy moves, a URL still equal to the one
CST wrote is updated, and a rotated key replaces the old one wherever the old one is stored.
``<data_dir>/cst-wiring.json`` records what was written.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from ..files import atomic_write

MARKER = "cst-wiring.json"
_USER = "default-user"       # the only user when SillyTavern's user accounts are off, as CST runs it
_SECRET = "api_key_custom"   # SillyTavern's secret name for the custom OpenAI-compatible endpoint
DEFAULTS = Path("default") / "content" / "settings.json"   # in a release's package: what a new user gets


def _endpoint(proxy_url: str) -> str:
    return proxy_url.rstrip("/") + "/v1"


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write(path: Path, data: Any, mode: int) -> None:
    atomic_write(path, json.dumps(data, indent=4, ensure_ascii=False).encode(), mode=mode)


def wire(data_dir: Path, package_dir: Path, proxy_url: str, key: str) -> str:
    """Make the first-start defaults, or follow CST's own values on a later start; what was done."""
    marker, user = data_dir / MARKER, data_dir / _USER
    if marker.exists():
        return _follow(marker, user / "settings.json", proxy_url)
    if (user / "settings.json").exists():
        return ""   # started before CST wired instances: its settings are the user's
    defaults = package_dir / DEFAULTS
    if not defaults.exists():
        return ""   # not a SillyTavern whose settings CST knows (a custom server)
    settings = _read(defaults)
    settings["main_api"] = "openai"
    settings.setdefault("oai_settings", {}).update(chat_completion_source="custom", custom_url=_endpoint(proxy_url))
    settings.setdefault("power_user", {})["auto_connect"] = True
    secrets = {_SECRET: [{"id": str(uuid.uuid4()), "value": key, "label": "CST proxy key", "active": True}],
               "_migrated": []}
    user.mkdir(parents=True, exist_ok=True)
    _write(user / "secrets.json", secrets, 0o600)
    _write(user / "settings.json", settings, 0o644)
    _write(marker, {"custom_url": _endpoint(proxy_url)}, 0o644)   # last: a crash before it wires again
    return f"chat completion wired to the key pool at {_endpoint(proxy_url)}"


def _follow(marker: Path, settings_path: Path, proxy_url: str) -> str:
    wired = _read(marker).get("custom_url")
    endpoint = _endpoint(proxy_url)
    if wired == endpoint or not settings_path.exists():
        return ""
    settings = _read(settings_path)
    oai = settings.get("oai_settings")
    if not isinstance(oai, dict) or oai.get("custom_url") != wired:
        return ""   # the user chose another endpoint: theirs
    oai["custom_url"] = endpoint
    _write(settings_path, settings, 0o644)
    _write(marker, {"custom_url": endpoint}, 0o644)
    return f"proxy URL moved: custom endpoint {wired} -> {endpoint}"


def replace_key(data_dir: Path, old: str, new: str) -> int:
    """Put ``new`` wherever the instance stored ``old`` (its rotated proxy key); how many places."""
    path = data_dir / _USER / "secrets.json"
    try:
        secrets = _read(path)
    except FileNotFoundError:
        return 0
    replaced = 0
    for entries in secrets.values() if isinstance(secrets, dict) else ():
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and entry.get("value") == old:
                entry["value"] = new
                replaced += 1
    if replaced:
        _write(path, secrets, 0o600)
    return replaced
