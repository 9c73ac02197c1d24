"""Proxy keys of the instances: one random ``cst-…`` key per instance, minted and revoked by CST.

Each key is a 0600 file ``<state_dir>/secrets/proxy-keys/<instance id>``. The proxy reads the
folder to learn which instance a request comes from (and follows it for changes), so removing a
file revokes that key. The real pool keys never leave the proxy; an instance only ever holds
its own ``cst-`` key.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from ..files import atomic_write
from .statedir import StateDir

PREFIX = "cst-"
FOLDER = "proxy-keys"


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)   # 256 random bits


class InstanceKeys:
    def __init__(self, state: StateDir):
        self.folder = state.secret_path(FOLDER)

    def path(self, id_: str) -> Path:
        return self.folder / id_

    def get(self, id_: str) -> str | None:
        try:
            return self.path(id_).read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def _write(self, id_: str, key: str) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.path(id_), key.encode() + b"\n", mode=0o600)

    def ensure(self, id_: str) -> str:
        """The instance's key, minted on first use."""
        key = self.get(id_)
        if key is None:
            key = new_key()
            self._write(id_, key)
        return key

    def rotate(self, id_: str) -> tuple[str | None, str]:
        """Replace the instance's key: (the old one or None, the new one)."""
        old = self.get(id_)
        new = new_key()
        self._write(id_, new)
        return old, new

    def revoke(self, id_: str) -> bool:
        """Drop the instance's key; whether it had one."""
        try:
            self.path(id_).unlink()
        except FileNotFoundError:
            return False
        return True

    def all(self) -> dict[str, str]:
        """Every instance's key, by instance id (temporary files of a write in progress skipped)."""
        found: dict[str, str] = {}
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return found
        for name in names:
            if not name.startswith("."):
                key = self.get(name)
                if key:
                    found[name] = key
        return found
