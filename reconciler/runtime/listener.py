"""Where node answers, and the listening socket CST opens there before node starts.

Any local process may bind a free port, and node spends seconds loading before it listens: an
address picked for it and bound later could be taken first by someone else, who would then
receive the readiness probe with the instance's credentials and every request after it. So CST
binds the address itself and hands node the listening socket (``ENV_LISTEN_FD``; node's preload,
``listen_preload.cjs``, listens on it instead of the address SillyTavern names). Behind the edge
that address is a Unix socket in the edge's folder, which only root and the edge can reach and
nobody else can replace; otherwise it is the instance's own port.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

ENV_LISTEN_FD = "CST_LISTEN_FD"
PRELOAD = Path(__file__).with_name("listen_preload.cjs")
# part of the launch fingerprint: instances that bound their own address restart once onto CST's
LISTENS = "listener 1"
BACKLOG = 511   # requests that arrive while node loads wait here (the edge's, the readiness probe's)


@dataclass(frozen=True)
class Address:
    """A Unix socket (``socket``) behind the edge, else a TCP address of the instance's own."""

    socket: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0

    def __str__(self) -> str:
        return f"socket {self.socket}" if self.socket is not None else f"port {self.port}"

    @property
    def url(self) -> str:
        """The base URL to ask it at (a socket's host name is a placeholder: the connector decides)."""
        if self.socket is not None:
            return "http://localhost"
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"http://{host}:{self.port}"


def open_listener(address: Address, group: int | None = None) -> socket.socket:
    """Bind and listen at ``address``; the socket, to hand to node. A Unix socket replaces what was
    at its path (a previous start's) and is given to ``group`` (the edge's workers) read-write.
    Raises OSError (the port is in use)."""
    if address.socket is None:
        listener = socket.socket(socket.AF_INET6 if ":" in address.host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((address.host, address.port))
            listener.listen(BACKLOG)
        except BaseException:
            listener.close()
            raise
        return listener
    listener = socket.socket(socket.AF_UNIX)
    try:
        address.socket.unlink(missing_ok=True)
        listener.bind(str(address.socket))
        if group is not None:
            os.chown(address.socket, -1, group)
        os.chmod(address.socket, 0o660 if group is not None else 0o600)
        listener.listen(BACKLOG)
    except BaseException:
        listener.close()
        raise
    return listener
