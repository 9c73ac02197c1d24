"""Settings a running ``cst serve`` cannot take on the fly: where it listens, its admin key's
variable, its state dir, the ledger's store. A change to one waits for a restart; until then
the values it started with stay in force, whatever else of the file is applied."""
from __future__ import annotations

from dataclasses import replace

from .model import DesiredState


def keep_restart_settings(new: DesiredState, started: DesiredState) -> tuple[DesiredState, tuple[str, ...]]:
    """``new`` with the settings that need a restart as in ``started``; and the names of those it
    would have changed."""
    n, s = new.settings, started.settings
    changed = tuple(name for name, before, after in (
        ("settings.state_dir", s.state_dir, n.state_dir),
        ("settings.api.listen", s.api.listen, n.api.listen),
        ("settings.api.tls", s.api.tls, n.api.tls),
        ("settings.api.admin_key_env", s.api.admin_key_env, n.api.admin_key_env),
        ("settings.usage.store", (s.usage.store, s.usage.store_password_env, s.usage.store_password_file),
         (n.usage.store, n.usage.store_password_env, n.usage.store_password_file)),
    ) if before != after)
    if not changed:
        return new, ()
    settings = replace(
        n, state_dir=s.state_dir,
        api=replace(n.api, listen=s.api.listen, tls=s.api.tls, admin_key_env=s.api.admin_key_env),
        usage=replace(n.usage, store=s.usage.store, store_password_env=s.usage.store_password_env,
                      store_password_file=s.usage.store_password_file))
    return replace(new, settings=settings), changed
