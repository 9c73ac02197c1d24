"""A loopback port to listen on, for the tests' servers and the benchmarks' (no pytest here)."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port that was free a moment ago (bound to port 0, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
