"""What the admin key may not change: what runs, what is read from disk, where secrets are sent.

The REST API edits desired.yaml, so without this an admin key would be a shell: point
``sillytavern.server`` at any ``.js`` file, ``keys_file`` at any 0600 file and ``upstream`` at
any host (which then receives that file's lines as bearer tokens). These settings change in
the file itself, through git, where a person reviews them. Removing an account is allowed
(it reads and sends nothing); adding one is allowed when it takes its secret from the
environment and talks to the default platform.
"""
from __future__ import annotations

from typing import Any

from .model import Account, DesiredState

_ACCOUNT_FIELDS = ("api_base", "password_file", "keys_file")


class RestrictedChange(Exception):
    """The change touches settings only the file's owners may change; ``fields`` names them."""

    def __init__(self, fields: list[str]):
        self.fields = fields
        super().__init__(f"{', '.join(fields)} cannot be changed through the API: change desired.yaml itself")


def _settings(state: DesiredState) -> dict[str, Any]:
    s = state.settings
    return {
        "settings.state_dir": s.state_dir,
        "settings.data_root": s.data_root,
        "settings.sillytavern.server": s.sillytavern.server,
        "settings.sillytavern.version": s.sillytavern.version,
        # who an instance runs as and what it sees of the machine
        "settings.sillytavern.users": s.sillytavern.users,
        "settings.sillytavern.sandbox": s.sillytavern.sandbox,
        "settings.api": s.api,                       # its address, TLS paths, insecure_http, the key's variable
        "settings.proxy.upstream": s.proxy.upstream,
        # where the ledger and the instances' key digests go, with which password
        "settings.usage.store": s.usage.store,
        "settings.usage.store_password_env": s.usage.store_password_env,
        "settings.usage.store_password_file": s.usage.store_password_file,
        "settings.git": s.git,                       # where the file is followed from and pushed to
        "settings.backups": s.backups,               # a lower keep deletes snapshots for good
        "settings.edge": s.edge,                     # what faces the internet: names, TLS files, ports
        "settings.kubernetes": s.kubernetes,         # which images a cluster runs, what may reach what
    }


def _account(account: Account | None, field: str) -> Any:
    if account is None:  # an account that does not exist yet has the defaults
        return Account.__dataclass_fields__[field].default
    return getattr(account, field)


def restricted_changes(old: DesiredState, new: DesiredState) -> list[str]:
    """The restricted settings that differ between ``old`` and ``new`` (YAML paths)."""
    before, after = _settings(old), _settings(new)
    changed = [name for name in before if before[name] != after[name]]
    # an instance's own release changes what runs, as the fleet's version does (a new instance
    # may name none: it runs the fleet's)
    releases = {spec.port: spec.sillytavern_version for spec in old.instances}
    for i, spec in enumerate(new.instances):
        if spec.sillytavern_version != releases.get(spec.port):
            changed.append(f"instances[{i}].sillytavern_version")
    previous = {a.name: a for a in old.accounts}
    for i, account in enumerate(new.accounts):
        for field in _ACCOUNT_FIELDS:
            if getattr(account, field) != _account(previous.get(account.name), field):
                changed.append(f"accounts[{i}].{field}")
    return changed


def refuse_restricted(old: DesiredState, new: DesiredState) -> None:
    """Raise RestrictedChange when ``new`` changes a restricted setting of ``old``."""
    changed = restricted_changes(old, new)
    if changed:
        raise RestrictedChange(changed)
