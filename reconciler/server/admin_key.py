"""The admin key ``cst serve`` asks for: from its variable, or minted once and kept 0600."""
from __future__ import annotations

import os
import secrets

from ..desired.model import DesiredState
from ..runtime.statedir import StateDir


def admin_key(desired: DesiredState, state: StateDir) -> str:
    env = desired.settings.api.admin_key_env
    value = os.environ.get(env)
    if value:
        return value
    state.ensure()
    where = state.secret_path("admin.key")
    key = state.read_secret("admin.key")
    if key is not None:  # printed once, when made: logs (journald, CI) must not collect it
        print(f"cst serve: {env} is not set; using the admin key kept in {where}", flush=True)
        return key
    key = state.secret("admin.key", lambda: secrets.token_urlsafe(32))
    print(f"cst serve: {env} is not set; admin key generated and kept in {where} (0600): {key}", flush=True)
    return key
