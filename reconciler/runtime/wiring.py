"""Pointing a new instance's chat-completion API at the key pool, on its first start only.

Before an instance's very first start (its data dir has no ``default-user/settings.json`` yet)
CST writes the settings SillyTavern would have copied from its own defaults, with four values
changed: the API is Chat Completion, the source is "Custom (OpenAI-compatible)", its URL is the
proxy's ``/v1``, and auto-connect is on; the instance's proxy key goes into ``secrets.json`` as
the custom endpoint's key. SillyTavern never replaces a settings file that exists, and CST never
writes these settings again: whatever the user chooses later in the page stays.

Afterwards CST only follows its own values: when the proxy moves, a URL still equal to the one
CST wrote is updated, and a rotated key replaces the old one wherever the old one is stored (by
``cst rotate-key`` at once on one machine; at the next start where it could not, in a cluster).
``<data_dir>/cst-wiring.json`` records what was written: the URL, and a digest of the key.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any, Callable

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


def _digest(key: str) -> str:
    """What the marker keeps of the key CST wrote: enough to find it again, not the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def wire(data_dir: Path, package_dir: Path, proxy_url: str, key: str) -> str:
    """Make the first-start defaults, or follow CST's own values on a later start; what was done."""
    marker, user = data_dir / MARKER, data_dir / _USER
    if marker.exists():
        return _follow(marker, user, proxy_url, key)
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
    # last: a crash before it wires again
    _write(marker, {"custom_url": _endpoint(proxy_url), "key_sha256": _digest(key)}, 0o644)
    return f"chat completion wired to the key pool at {_endpoint(proxy_url)}"


def _follow(marker: Path, user: Path, proxy_url: str, key: str) -> str:
    """Follow a moved proxy and a rotated key where they are still CST's own values; the marker last."""
    record = _read(marker)
    before = dict(record)
    done = [note for note in (_follow_url(record, user / "settings.json", proxy_url),
                              _follow_key(record, user / "secrets.json", key)) if note]
    if record != before:
        _write(marker, record, 0o644)
    return "; ".join(done)


def _follow_url(record: dict[str, Any], settings_path: Path, proxy_url: str) -> str:
    wired = record.get("custom_url")
    endpoint = _endpoint(proxy_url)
    if wired == endpoint or not settings_path.exists():
        return ""
    settings = _read(settings_path)
    oai = settings.get("oai_settings")
    if not isinstance(oai, dict) or oai.get("custom_url") != wired:
        return ""   # the user chose another endpoint: theirs
    oai["custom_url"] = endpoint
    _write(settings_path, settings, 0o644)
    record["custom_url"] = endpoint
    return f"proxy URL moved: custom endpoint {wired} -> {endpoint}"


def _follow_key(record: dict[str, Any], secrets_path: Path, key: str) -> str:
    """A key rotated where no start could replace the old one (a cluster's Secret) replaced now."""
    wired, current = record.get("key_sha256"), _digest(key)
    if wired == current:
        return ""
    record["key_sha256"] = current
    if wired is None:   # wired before the marker kept its key: followed from now on
        return ""
    replaced = _replace(secrets_path, lambda value: _digest(value) == wired, key)
    return f"proxy key rotated: replaced in {replaced} place(s)" if replaced else ""


def replace_key(data_dir: Path, old: str, new: str) -> int:
    """Put ``new`` wherever the instance stored ``old`` (its rotated proxy key); how many places."""
    return _replace(data_dir / _USER / "secrets.json", lambda value: value == old, new)


def _replace(path: Path, is_old: Callable[[str], bool], new: str) -> int:
    try:
        secrets = _read(path)
    except FileNotFoundError:
        return 0
    replaced = 0
    for entries in secrets.values() if isinstance(secrets, dict) else ():
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and isinstance(entry.get("value"), str) and is_old(entry["value"]):
                entry["value"] = new
                replaced += 1
    if replaced:
        _write(path, secrets, 0o600)
    return replaced
