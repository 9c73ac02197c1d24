"""What starting an instance takes (``LaunchSpec``) and the markers its process carries."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .instance_users import InstanceUser
from .listener import Address
from .sandbox import Sandbox

# environment markers that let a later run recognise its own processes
ENV_INSTANCE = "CST_INSTANCE_ID"
ENV_STATE_DIR = "CST_STATE_DIR"
ENV_FINGERPRINT = "CST_FINGERPRINT"
# the release the process was started on ("sillytavern@1.19.0", "server /path/server.js"): what an
# adopted process runs, when no record says so
ENV_RELEASE = "CST_RELEASE"
# "1": the process runs in its sandbox (runtime/sandbox.py); what adoption records of it
ENV_SANDBOXED = "CST_SANDBOXED"
# "1": node answers on its socket behind the edge (runtime/edge.py), not on its own port
ENV_BEHIND_EDGE = "CST_BEHIND_EDGE"
# what CST's server plugin reads (see stsource-changed/plugins/cst/): the proxy, and the file with
# the instance's own proxy key (a path, not the key: the environment of a process is readable in /proc)
ENV_PROXY_URL = "CST_PROXY_URL"
ENV_PROXY_KEY_FILE = "CST_PROXY_KEY_FILE"
HEALTH_PATH = "/api/plugins/cst/health"   # the overlay's health route: readiness and liveness
# node's lean memory profile (settings.sillytavern.lean): a 256 MiB old generation, so what
# SillyTavern's start leaves behind (its front end compiled) is collected rather than kept, and
# fewer malloc arenas. Measured (bench/density.py): an idle instance with its page loaded and a
# tokenizer run holds ~246 MiB instead of ~391, and wakes ~0.2 s slower. Not --max-semi-space-size=1
# nor --optimize-for-size: 37 MiB less again, but 1.3 s more per start (a wake p50 of 4.5 s instead
# of 3.2). Not --jitless: tiktoken's WebAssembly needs the JIT.
LEAN_NODE_FLAGS = ("--max-old-space-size=256",)
LEAN_ENV = {"MALLOC_ARENA_MAX": "2"}


def server_flags(port: int, data: str, config: str, listen_address: str) -> tuple[str, ...]:
    """SillyTavern's command-line flags as CST runs it: its port, data root and config file, listening
    beyond localhost with basic auth on and its own IP whitelist and browser launch off. Part of an
    instance's launch fingerprint: a change restarts every instance once."""
    return ("--port", str(port), "--dataRoot", data, "--configPath", config, "--listen", "true",
            "--listenAddressIPv4", listen_address, "--enableIPv6", "false", "--whitelist", "false",
            "--basicAuthMode", "true", "--browserLaunchEnabled", "false")


def host_guard(names: tuple[str, ...]) -> dict[str, str]:
    """SillyTavern's own DNS-rebinding guard (``hostWhitelist``, 1.13.4+), on with the instance's
    host names; addresses and localhost stay allowed (SillyTavern always allows them)."""
    return {"SILLYTAVERN_HOSTWHITELIST_ENABLED": "true", "SILLYTAVERN_HOSTWHITELIST_SCAN": "false",
            "SILLYTAVERN_HOSTWHITELIST_HOSTS": json.dumps(list(names))}


def reads_key_copy(user: InstanceUser | None, sandboxed: bool) -> bool:
    """Whether an instance reads a copy of its proxy key in its workdir rather than the state dir's
    key folder: under a uid of its own the folder is root's alone, and a sandbox does not show it."""
    return user is not None or sandboxed


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one instance. Holds its password: never print or log it."""

    id: str
    port: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    data_dir: Path
    workdir: Path
    log: Path
    password: str
    address: Address                   # where node answers: its socket behind the edge, or its own port
    fingerprint: str
    user: InstanceUser | None = None   # None: it runs as cst's own user
    release: str = ""                  # the runtime's release identity of what argv runs
    # in a sandbox of its own: argv and env name the paths inside it; data_dir, workdir are the host's
    sandbox: Sandbox | None = None

    @property
    def behind_edge(self) -> bool:
        return self.address.socket is not None

    @property
    def copies_key(self) -> bool:
        return reads_key_copy(self.user, self.sandbox is not None)
