"""Who is calling the proxy: the instance a proxy key belongs to, or a holder of a client key.

Instances each have a ``cst-`` key of their own (``reconciler.runtime.instance_keys``); people
may add client keys with ``settings.proxy.client_keys_env``. Closed by default: a request must
bring a known key, whatever the reason the table is empty (no instance yet, the last one deleted,
only ``proxy: false`` instances), unless ``settings.proxy.anonymous`` keeps the seed's "any key
works".

Instances' keys come from the state dir's key folder, or, for a replica on another machine, as
digests that ``cst serve`` published to a shared store. Keys are looked up by their SHA-256 in a
dict: one hash per request whatever the number of keys, and the time a lookup takes depends on
the digest, not on how much of a guessed key is right (which a plain comparison would tell).
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

CLIENT = "client"         # a key from settings.proxy.client_keys_env
ANONYMOUS = "anonymous"   # no key or an unknown one, where that is allowed


def key_digest(key: str | bytes) -> bytes:
    # header bytes that are not UTF-8 arrive as surrogates: hashed as the bytes sent, never a match
    return hashlib.sha256(key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key).digest()


def bearer_token(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class Callers:
    def __init__(self, client_keys: Iterable[str] = (), instance_keys: Mapping[str, str] | None = None,
                 anonymous: bool = False):
        self._client = tuple(client_keys)
        self._instances: dict[str, str] = dict(instance_keys or {})
        self._published: dict[bytes, str] = {}   # digests from a shared store: instance keys of cst serve
        self.anonymous = anonymous
        self._by_digest: dict[bytes, str] = {}
        self._rebuild()

    def _rebuild(self) -> None:
        table = {key_digest(key): CLIENT for key in self._client}
        table.update(self._published)
        table.update({key_digest(key): id_ for id_, key in self._instances.items()})
        self._by_digest = table   # swapped whole: a request in flight sees the old table or the new one

    def set_client_keys(self, keys: Iterable[str], anonymous: bool) -> None:
        self._client, self.anonymous = tuple(keys), anonymous
        self._rebuild()

    def set_instance_keys(self, keys: Mapping[str, str]) -> None:
        self._instances = dict(keys)
        self._rebuild()

    def set_published_keys(self, digests: Mapping[bytes, str]) -> None:
        """The instances' keys as a shared store lists them (digest -> instance id): what a replica
        without the state dir knows of them."""
        self._published = dict(digests)
        self._rebuild()

    def instance_digests(self) -> dict[str, bytes]:
        """Instance id -> the digest of its key, for publishing."""
        return {id_: key_digest(key) for id_, key in self._instances.items()}

    @property
    def required(self) -> bool:
        """Whether a request without a known key is refused."""
        return not self.anonymous

    def identify(self, authorization: str) -> str | None:
        """The caller behind an Authorization header: an instance id, CLIENT, ANONYMOUS, or None
        when the request must be refused."""
        token = bearer_token(authorization)
        caller = self._by_digest.get(key_digest(token)) if token else None
        if caller is None and not self.required:
            return ANONYMOUS
        return caller

    def is_instance(self, caller: str | None) -> bool:
        return caller is not None and caller not in (CLIENT, ANONYMOUS)
