"""Instance proxy keys and the first-start wiring of an instance's chat API to the key pool."""
from __future__ import annotations

import json
import stat
from pathlib import Path

from reconciler.runtime import wiring
from reconciler.runtime.instance_keys import InstanceKeys
from reconciler.runtime.statedir import StateDir

DEFAULTS = {"firstRun": True, "main_api": "koboldhorde", "power_user": {"auto_swipe": False},
            "oai_settings": {"chat_completion_source": "openai", "openai_model": "gpt-4-turbo"}}


def package_with_defaults(tmp_path: Path) -> Path:
    """A package whose default settings are those above (SillyTavern's own has ~1,000 lines)."""
    package = tmp_path / "package"
    (package / "default" / "content").mkdir(parents=True)
    (package / "default" / "content" / "settings.json").write_text(json.dumps(DEFAULTS))
    return package


def mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


def test_keys_are_minted_once_private_rotated_and_revoked(tmp_path: Path) -> None:
    keys = InstanceKeys(StateDir(tmp_path / ".cst"))
    first = keys.ensure("st-instance-8001")
    assert first.startswith("cst-") and len(first) >= 4 + 43
    assert keys.ensure("st-instance-8001") == first
    assert mode(keys.path("st-instance-8001")) == "0o600" and mode(keys.folder) == "0o700"
    other = keys.ensure("st-instance-8002")
    assert other != first
    old, new = keys.rotate("st-instance-8001")
    assert old == first and new not in (first, other) and keys.get("st-instance-8001") == new
    assert keys.all() == {"st-instance-8001": new, "st-instance-8002": other}
    assert keys.revoke("st-instance-8001") and not keys.revoke("st-instance-8001")
    assert keys.all() == {"st-instance-8002": other}


def test_first_start_points_the_chat_api_at_the_proxy_with_the_instance_key(tmp_path: Path) -> None:
    data = tmp_path / "user-data" / "8001"
    done = wiring.wire(data, package_with_defaults(tmp_path), "http://127.0.0.1:5100", "cst-KEY")
    assert done == "chat completion wired to the key pool at http://127.0.0.1:5100/v1"
    settings = json.loads((data / "default-user" / "settings.json").read_text())
    assert settings["main_api"] == "openai"
    assert settings["oai_settings"] == {"chat_completion_source": "custom", "openai_model": "gpt-4-turbo",
                                        "custom_url": "http://127.0.0.1:5100/v1"}
    assert settings["power_user"] == {"auto_swipe": False, "auto_connect": True}
    assert settings["firstRun"] is True   # the rest is SillyTavern's own defaults, untouched
    secrets_file = data / "default-user" / "secrets.json"
    [entry] = json.loads(secrets_file.read_text())["api_key_custom"]
    assert entry["value"] == "cst-KEY" and entry["active"] is True
    assert mode(secrets_file) == "0o600"


def test_a_later_choice_of_the_user_is_never_overwritten(tmp_path: Path) -> None:
    data, package = tmp_path / "data", package_with_defaults(tmp_path)
    wiring.wire(data, package, "http://127.0.0.1:5100", "cst-KEY")
    path = data / "default-user" / "settings.json"
    settings = json.loads(path.read_text())
    settings["oai_settings"]["custom_url"] = "https://example.invalid/v1"
    settings["main_api"] = "textgenerationwebui"
    path.write_text(json.dumps(settings))
    for proxy in ("http://127.0.0.1:5100", "http://127.0.0.1:5200"):   # a later start; the proxy moved
        assert wiring.wire(data, package, proxy, "cst-KEY") == ""
    assert json.loads(path.read_text()) == settings


def test_a_url_cst_wrote_follows_the_proxy_when_it_moves(tmp_path: Path) -> None:
    data, package = tmp_path / "data", package_with_defaults(tmp_path)
    wiring.wire(data, package, "http://127.0.0.1:5100", "cst-KEY")
    assert wiring.wire(data, package, "http://127.0.0.1:5200", "cst-KEY") == \
        "proxy URL moved: custom endpoint http://127.0.0.1:5100/v1 -> http://127.0.0.1:5200/v1"
    settings = json.loads((data / "default-user" / "settings.json").read_text())
    assert settings["oai_settings"]["custom_url"] == "http://127.0.0.1:5200/v1"
    assert wiring.wire(data, package, "http://127.0.0.1:5200", "cst-KEY") == ""


def test_an_instance_that_predates_the_wiring_keeps_its_settings(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "default-user").mkdir(parents=True)
    (data / "default-user" / "settings.json").write_text('{"main_api": "koboldhorde"}')
    assert wiring.wire(data, package_with_defaults(tmp_path), "http://127.0.0.1:5100", "cst-KEY") == ""
    assert (data / "default-user" / "settings.json").read_text() == '{"main_api": "koboldhorde"}'
    assert not (data / "default-user" / "secrets.json").exists()


def test_a_server_without_sillytavern_defaults_is_not_wired(tmp_path: Path) -> None:
    assert wiring.wire(tmp_path / "data", tmp_path / "no-package", "http://127.0.0.1:5100", "cst-KEY") == ""
    assert not (tmp_path / "data").exists()


def test_a_rotated_key_replaces_the_old_one_wherever_it_is_stored(tmp_path: Path) -> None:
    data = tmp_path / "data"
    wiring.wire(data, package_with_defaults(tmp_path), "http://127.0.0.1:5100", "cst-OLD")
    path = data / "default-user" / "secrets.json"
    secrets = json.loads(path.read_text())
    secrets["api_key_custom"].append({"id": "x", "value": "sk-users-own", "label": "mine", "active": False})
    secrets["api_key_openai"] = [{"id": "y", "value": "cst-OLD", "label": "copied", "active": True}]
    path.write_text(json.dumps(secrets))
    assert wiring.replace_key(data, "cst-OLD", "cst-NEW") == 2
    after = json.loads(path.read_text())
    assert [e["value"] for e in after["api_key_custom"]] == ["cst-NEW", "sk-users-own"]
    assert after["api_key_openai"][0]["value"] == "cst-NEW"
    assert mode(path) == "0o600"
    assert wiring.replace_key(tmp_path / "nothing-here", "cst-OLD", "cst-NEW") == 0


def test_a_key_rotated_where_no_start_replaced_it_is_replaced_at_the_next(tmp_path: Path) -> None:
    """A cluster's instance: its key changes in its Secret, and its init step (`cst wire`) finds the
    old key by the marker's digest; a key the user stored themselves stays."""
    data, package = tmp_path / "data", package_with_defaults(tmp_path)
    wiring.wire(data, package, "http://127.0.0.1:5100", "cst-OLD")
    secrets_path = data / "default-user" / "secrets.json"
    secrets = json.loads(secrets_path.read_text())
    secrets["api_key_openai"] = [{"id": "mine", "value": "sk-the-users-own", "active": True}]
    secrets_path.write_text(json.dumps(secrets))
    assert "cst-OLD" not in (data / wiring.MARKER).read_text()   # a digest, not the key
    assert wiring.wire(data, package, "http://127.0.0.1:5100", "cst-NEW") == "proxy key rotated: replaced in 1 place(s)"
    stored = json.loads(secrets_path.read_text())
    assert stored["api_key_custom"][0]["value"] == "cst-NEW"
    assert stored["api_key_openai"][0]["value"] == "sk-the-users-own"
    assert mode(secrets_path) == "0o600"
    assert wiring.wire(data, package, "http://127.0.0.1:5100", "cst-NEW") == ""
