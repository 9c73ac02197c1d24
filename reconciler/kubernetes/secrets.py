"""The Secrets a rendered cluster names, made from this machine's state dir and environment
(``cst render kubernetes-secrets``): never part of the render, so the render can live in git.

* ``<id>``: the instance's basic-auth ``password`` and, wired to the pool, its ``proxy-key``,
  minted here exactly as on one machine (the state dir keeps them, so a second run gives the same
  ones), and ``auth``, the same credentials as an htpasswd line for the ingress's check.
* ``cst-pool``: the variables the file names (accounts' passwords and keys, the store's password,
  the pool's client keys), from this environment; the pool's environment in its pod.
* ``cst-pool-files``: the files the file names (``*_file``), read here.
* the edge's certificate (``settings.edge.tls``) as ``settings.kubernetes.ingress.tls_secret``,
  unless cert-manager issues certificates.

Instance keys reach the pool through a projected volume of these Secrets (see ``render``): a key
rotated here and applied reaches both the instance and the pool.
"""
from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass

from ..desired.model import DesiredState
from ..runtime.instance_keys import new_key
from ..runtime.local import LocalRuntime
from .names import AUTH_KEY, CLIENT_KEYS_ENV, PASSWORD_KEY, POOL_ENV_SECRET, POOL_FILES_SECRET, PROXY_KEY_KEY
from .pool_file import env_names, file_sources
from .render import Manifest

# the pool's client keys when the file names no variable for them: minted once, kept in the state dir
CLIENT_KEYS_SECRET = "kubernetes-client.key"


@dataclass(frozen=True)
class Secrets:
    objects: tuple[Manifest, ...]
    missing: tuple[str, ...]   # variables the file names that this environment does not set


def htpasswd(user: str, password: str) -> str:
    """An htpasswd line nginx's basic auth reads: the salted SHA-1 form ({SSHA}), which every build
    of nginx checks without a crypt library. The passwords CST makes are random UUIDs."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return f"{user}:{{SSHA}}{base64.b64encode(digest + salt).decode()}"


def _secret(name: str, namespace: str, data: dict[str, bytes], kind: str = "Opaque") -> Manifest:
    return {"apiVersion": "v1", "kind": "Secret", "type": kind,
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/managed-by": "cst"}},
            "data": {key: base64.b64encode(value).decode() for key, value in sorted(data.items())}}


def make(desired: DesiredState, namespace: str) -> Secrets:
    """Every Secret the render names, minting what is not minted yet. Raises LaunchImpossible (an
    instance's password variable unset) and OSError (a file the file names unreadable)."""
    runtime = LocalRuntime(desired)
    objects: list[Manifest] = []
    for spec in desired.instances:
        password = runtime.password(spec)
        data = {PASSWORD_KEY: password.encode(), AUTH_KEY: htpasswd(spec.id, password).encode()}
        if spec.proxy:
            data[PROXY_KEY_KEY] = runtime.keys.ensure(spec.id).encode()
        objects.append(_secret(spec.id, namespace, data))
    env: dict[str, bytes] = {}
    missing = []
    mints_client_keys = desired.settings.proxy.client_keys_env is None   # the render names CLIENT_KEYS_ENV
    for name in env_names(desired):
        value = os.environ.get(name)
        if value is None and mints_client_keys and name == CLIENT_KEYS_ENV:
            value = runtime.state.secret(CLIENT_KEYS_SECRET, new_key)
        if value is None:
            missing.append(name)
        else:
            env[name] = value.encode()
    objects.append(_secret(POOL_ENV_SECRET, namespace, env))
    objects.append(_secret(POOL_FILES_SECRET, namespace,
                           {key: path.read_bytes() for key, path in file_sources(desired).items()}))
    edge, k8s = desired.settings.edge, desired.settings.kubernetes
    if edge is not None and k8s.cert_manager_issuer is None:
        objects.append(_secret(k8s.tls_secret, namespace, {"tls.crt": edge.tls.cert.read_bytes(),
                                                            "tls.key": edge.tls.key.read_bytes()},
                               "kubernetes.io/tls"))
    return Secrets(tuple(objects), tuple(missing))

