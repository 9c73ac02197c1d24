"""The environment of every process CST starts (npm, SillyTavern's build script, SillyTavern).

CST's own environment holds the admin key, account passwords and pool keys. A child gets a
short allow-list of what a Node program needs to run (where things are, locale, time zone,
certificates) and what the caller adds, so none of those secrets reach npm, an install
script or a SillyTavern server.
"""
from __future__ import annotations

import os
from typing import Mapping

# what every child inherits from CST's environment, if set
_RUNNING = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "NODE_OPTIONS", "NODE_EXTRA_CA_CERTS", "SSL_CERT_FILE")
# what npm needs besides to reach its registry: the proxy settings, and npm's own configuration
_NETWORK = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
_NPM_PREFIX = "npm_config_"


def child_environment(extra: Mapping[str, str] | None = None, network: bool = False) -> dict[str, str]:
    """A minimal environment: the allow-list from ``os.environ``, plus ``extra``.

    ``network``: also the proxy settings and ``npm_config_*`` (for npm reaching its registry)."""
    names = _RUNNING + (_NETWORK if network else ())
    env = {name: os.environ[name] for name in names if name in os.environ}
    if network:
        env.update({k: v for k, v in os.environ.items() if k.lower().startswith(_NPM_PREFIX)})
    env.update(extra or {})
    return env
