"""desired.yaml as the key pool reads it in its pod: the settings the pool uses, its paths the pod's.

The pool follows the same file as on one machine, minus what is another component's in a cluster
(the API, the edge, git, backups, the instances' own settings) and with its paths moved into the
pod: the state dir on the pool's volume, each ``*_file`` in the Secret ``cst-pool-files``. The
values stay as written: a change of a budget or an account is a change of this ConfigMap.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ..desired.model import DesiredState
from .names import CLIENT_KEYS_ENV, POOL_FILES, POOL_PORT, POOL_STATE, STORE_PASSWORD_FILE, account_file

_SETTINGS = ("logs", "proxy", "usage", "budget")       # what of settings the pool reads
_INSTANCE_FIELDS = ("port", "state", "proxy", "budget")   # what of an instance the pool reads
_ACCOUNT_FILES = ("password_file", "keys_file")
HEADER = "# desired.yaml as the key pool reads it in the cluster, rendered by `cst render kubernetes`\n"


def pool_file(document: dict[str, Any]) -> str:
    """The pool's desired.yaml, from the file's own document (as written, before defaults)."""
    settings = document.get("settings") or {}
    kept: dict[str, Any] = {"state_dir": POOL_STATE, "data_root": f"{POOL_STATE}/user-data"}
    kept.update({name: copy.deepcopy(settings[name]) for name in _SETTINGS if name in settings})
    proxy = kept.setdefault("proxy", {})
    proxy["listen"] = f"0.0.0.0:{POOL_PORT}"
    proxy.setdefault("client_keys_env", CLIENT_KEYS_ENV)
    if "store_password_file" in kept.get("usage", {}):
        kept["usage"]["store_password_file"] = f"{POOL_FILES}/{STORE_PASSWORD_FILE}"
    accounts = []
    for account in document.get("accounts") or []:
        account = dict(account)
        for field in _ACCOUNT_FILES:
            if field in account:
                account[field] = f"{POOL_FILES}/{account_file(account['name'], field)}"
        accounts.append(account)
    instances = [{field: copy.deepcopy(item[field]) for field in _INSTANCE_FIELDS if field in item}
                 for item in document.get("instances") or []]
    body = {"version": 1, "settings": kept, "accounts": accounts, "instances": instances}
    return HEADER + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, default_flow_style=False)


def file_sources(desired: DesiredState) -> dict[str, Path]:
    """Each file the pool reads, by its key in the Secret ``cst-pool-files``: where it is here."""
    found: dict[str, Path] = {}
    for account in desired.accounts:
        for field in _ACCOUNT_FILES:
            path = getattr(account, field)
            if path is not None:
                found[account_file(account.name, field)] = path
    if desired.settings.usage.store_password_file is not None:
        found[STORE_PASSWORD_FILE] = desired.settings.usage.store_password_file
    return found


def env_names(desired: DesiredState) -> list[str]:
    """The variables the pool reads, in the file's order: its environment in the cluster."""
    names = [name for account in desired.accounts for name in (account.password_env, account.keys_env) if name]
    usage, proxy = desired.settings.usage, desired.settings.proxy
    names.extend(name for name in (usage.store_password_env, proxy.client_keys_env or CLIENT_KEYS_ENV) if name)
    return list(dict.fromkeys(names))
