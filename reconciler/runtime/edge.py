"""The edge: nginx in front of the instances, a process of its own that outlives any cst.

Every instance behind the edge (``DesiredState.behind_edge``: all of them with ``settings.edge``,
else those with ``park_after``) answers on a Unix socket in ``<state_dir>/edge/sockets``, and
nginx holds its host names and its own port (``edge_config`` says what it does with a request).
Any cst that runs a pass (``cst apply`` or ``cst serve``) writes nginx's configuration from the
file and starts nginx, or adopts the one already running (its pid file, its command line naming
this state dir) and reloads it when the configuration or the certificate files changed. Nothing
stops it when cst serve stops: users keep reaching running instances while CST restarts or is
upgraded; only waking a parked instance waits for cst serve (``server/gate.py``).

Why nginx (not Caddy, also in Debian): it is already what the tests put in front of the key-pool
replicas, it has what the edge needs (TLS, HTTP/2, ``map``, ``limit_req``, ``realip``) in
Debian's ``nginx-light``, and it relays a request at ~21 µs of CPU (bench/proxy). Caddy's
automatic certificates were the reason to consider it; this edge takes the operator's files.

As root, nginx's workers run as the system user ``cst-edge`` (made on first need, like
``www-data`` for Debian's own nginx): the instances' sockets, cst serve's gate and use sockets
are root's and that group's alone, so no instance's uid, nor ``nobody``, can reach or replace them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pwd
import resource
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import psutil

from ..desired.model import DesiredState, InstanceSpec, Listen
from ..files import atomic_write, private_dir
from . import edge_config
from .base import EdgeChange, LaunchImpossible
from .processes import port_is_free

log = logging.getLogger("cst.edge")

WORKER_USER = "cst-edge"
START_WAIT = 10.0     # nginx answers a start or a reload in milliseconds; this long is a failure
NGINX = "/usr/sbin/nginx"


class EdgeFailed(OSError):
    """nginx refused its configuration or could not start; the message is nginx's own."""


class Paths:
    """The edge's files: its configuration, pid and log in ``<state_dir>/edge``; the sockets in a
    short folder of their own (``/run/cst/<digest of the state dir>`` as root), as a socket's path
    must fit in 107 bytes and a state dir may lie deep."""

    def __init__(self, state_root: Path):
        self.root = state_root / "edge"
        self.run = _run_root() / hashlib.sha256(str(state_root).encode()).hexdigest()[:12]

    @property
    def sockets(self) -> Path:
        return self.run / "sockets"

    def socket(self, id_: str) -> Path:
        return self.sockets / f"{id_}.sock"

    @property
    def config(self) -> Path:
        return self.root / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        return self.root / "nginx.pid"

    @property
    def error_log(self) -> Path:
        return self.root / "error.log"

    @property
    def gate(self) -> Path:
        return self.run / "gate.sock"

    @property
    def use(self) -> Path:
        return self.run / "use.sock"

    @property
    def nobody(self) -> Path:
        return self.run / "nobody"

    @property
    def applied(self) -> Path:
        return self.root / "applied.json"    # what the running nginx was last given


def _run_root() -> Path:
    """Where the sockets of every state dir live: root's ``/run/cst``; else the user's runtime
    folder (``$XDG_RUNTIME_DIR``), or ``/tmp/cst-<uid>``."""
    if os.geteuid() == 0:
        return Path("/run/cst")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "cst" if runtime else Path(f"/tmp/cst-{os.geteuid()}")


def worker_gid() -> int | None:
    """The group of nginx's workers, which may reach the edge's sockets; None when CST is not root."""
    if os.geteuid() != 0:
        return None
    return _worker_account().pw_gid


def _worker_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(WORKER_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise EdgeFailed(f"the edge's workers need a user {WORKER_USER!r}, and useradd is not installed")
    done = subprocess.run([useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                           "--shell", "/usr/sbin/nologin", WORKER_USER], capture_output=True, text=True, check=False)
    if done.returncode != 0 and "already exists" not in done.stderr:
        raise EdgeFailed(f"could not make the edge's user {WORKER_USER!r}: {done.stderr.strip()}")
    log.info("made the system user %s for the edge's nginx workers", WORKER_USER)
    return pwd.getpwnam(WORKER_USER)


def prepare_folders(paths: Paths) -> None:
    """The edge's folders: the configuration's, root's alone; the sockets' (and nginx's temporary
    files'), which its workers' group may enter (``0710``) and nobody else."""
    private_dir(paths.root)
    gid = worker_gid()
    parent = paths.run.parent
    if not parent.is_dir():
        parent.mkdir(parents=True, mode=0o711 if gid is not None else 0o700)
    st = parent.lstat()
    if st.st_uid != os.geteuid() or not stat.S_ISDIR(st.st_mode) or stat.S_IMODE(st.st_mode) & 0o022:
        raise EdgeFailed(f"{parent} is not this user's alone: the edge's sockets cannot live there")
    for folder in (paths.run, paths.sockets):
        private_dir(folder, 0o710 if gid is not None else 0o700)
        if gid is not None:
            os.chown(folder, 0, gid)
            os.chmod(folder, 0o710)
    private_dir(paths.run / "tmp")   # nginx makes its folders in it, its workers'
    if not paths.nobody.exists():
        atomic_write(paths.nobody, b"", mode=0o640)
    if gid is not None:
        os.chown(paths.nobody, 0, gid)


def routes(desired: DesiredState, password_of: Callable[[InstanceSpec], str]) -> list[edge_config.Route]:
    """An instance declared running and behind the edge is routed (parked or not); a stopped one is not."""
    edge = desired.settings.edge
    paths = Paths(desired.settings.state_dir)
    found = []
    for spec in desired.instances:
        if spec.state != "running" or not desired.behind_edge(spec):
            continue
        try:
            password = password_of(spec)
        except LaunchImpossible:   # its variable is unset: the pass says so; no route meanwhile
            continue
        port = (Listen(desired.settings.sillytavern.listen_address, spec.port)
                if edge is None or edge.ports else None)
        found.append(edge_config.Route(spec.id, edge.names_of(spec) if edge else (), port,
                                       f"{spec.id}:{password}", paths.socket(spec.id)))
    return found


def master_pid(paths: Paths) -> int | None:
    """The master's pid when nginx runs for this state dir (its pid file, checked against its
    command line), else None."""
    try:
        pid = int(paths.pid_file.read_text().strip())
        cmdline = psutil.Process(pid).cmdline()
    except (OSError, ValueError, psutil.Error):
        return None
    return pid if str(paths.config) in cmdline else None


class Edge:
    """The nginx of one state dir."""

    def __init__(self, desired: DesiredState):
        self.desired = desired
        self.paths = Paths(desired.settings.state_dir)

    def follow(self, wanted: list[edge_config.Route]) -> EdgeChange:
        """Make the running nginx serve ``wanted``: started, reloaded, or stopped when nothing is
        behind the edge. A port still held by someone else (a node about to restart behind the
        edge) is left out until the next pass. Raises EdgeFailed with nginx's own words."""
        pid = master_pid(self.paths)
        entrance = self._entrance()
        if not wanted and entrance is None:
            if pid is not None:
                self._stop(pid)
                return EdgeChange("stopped: nothing is behind it any more")
            return EdgeChange()
        prepare_folders(self.paths)
        held = self._held() if pid is not None else set()
        waiting = tuple(sorted(r.port.port for r in wanted if r.port is not None and r.port.port not in held
                               and not port_is_free(r.port.host, r.port.port)))
        routes_now = [r if r.port is None or r.port.port not in waiting else replace(r, port=None) for r in wanted]
        text = edge_config.render(routes_now, self._layout(), entrance, self.desired.settings.api.trusted_proxies,
                                  resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        stamp = self._stamp(text, entrance)
        applied = self._applied()
        if pid is not None and applied.get("stamp") == stamp:
            return EdgeChange(waiting=waiting)
        atomic_write(self.paths.config, text.encode(), mode=0o600)
        self._test()
        ports = [r.port.port for r in routes_now if r.port is not None]
        if pid is None:
            pid = self._start()
            what = f"started nginx (pid {pid}) for {len(routes_now)} instance(s)"
        else:
            self._reload(pid)
            what = f"reloaded nginx for {len(routes_now)} instance(s)"
        atomic_write(self.paths.applied, json.dumps({"stamp": stamp, "ports": ports}).encode(), mode=0o600)
        return EdgeChange(what, waiting)

    def _entrance(self) -> edge_config.Entrance | None:
        edge = self.desired.settings.edge
        if edge is None:
            return None
        return edge_config.Entrance(edge.listen, edge.tls.cert, edge.tls.key, edge.redirect_http)

    def _layout(self) -> edge_config.Layout:
        return edge_config.Layout(self.paths.run / "tmp", self.paths.gate, self.paths.use, self.paths.nobody,
                                  WORKER_USER if os.geteuid() == 0 else None)

    def _stamp(self, text: str, entrance: edge_config.Entrance | None) -> str:
        """The configuration and the certificate files as they are now: a new certificate reloads."""
        digest = hashlib.sha256(text.encode())
        if entrance is not None:
            for path in (entrance.cert, entrance.key):
                try:
                    st = path.stat()
                except OSError as exc:
                    raise EdgeFailed(f"settings.edge.tls: cannot read {path}: {exc.strerror}") from None
                digest.update(f"{path}:{st.st_mtime_ns}:{st.st_size}:{st.st_ino}".encode())
        return digest.hexdigest()

    def _applied(self) -> dict[str, Any]:
        try:
            applied = json.loads(self.paths.applied.read_text())
        except (OSError, ValueError):
            return {}
        return applied if isinstance(applied, dict) else {}

    def _held(self) -> set[int]:
        ports = self._applied().get("ports")
        return {p for p in ports if isinstance(p, int)} if isinstance(ports, list) else set()

    def _command(self, *extra: str) -> list[str]:
        return [NGINX, "-p", f"{self.paths.root}/", "-c", str(self.paths.config), "-e", str(self.paths.error_log),
                *extra]

    def _test(self) -> None:
        done = subprocess.run(self._command("-t", "-q"), capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise EdgeFailed(f"nginx refused the edge's configuration: {_said(done.stderr)}")

    def _start(self) -> int:
        self.paths.pid_file.unlink(missing_ok=True)
        offset = _size(self.paths.error_log)
        # a session of its own: no signal meant for this cst reaches it, and it outlives it
        proc = subprocess.Popen(self._command("-g", "daemon off;"), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                close_fds=True)
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EdgeFailed(f"nginx exited with code {proc.returncode}: {_said(_since(self.paths.error_log, offset))}")
            if master_pid(self.paths) == proc.pid and _workers(proc.pid):
                return proc.pid
            time.sleep(0.02)
        proc.kill()
        raise EdgeFailed(f"nginx did not start within {START_WAIT:g}s")

    def _reload(self, pid: int) -> None:
        """SIGHUP, then wait for a worker of the new configuration, or nginx's words against it
        (a port it could not take: the old configuration stays in force)."""
        offset = _size(self.paths.error_log)
        before = set(_workers(pid))
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            said = _since(self.paths.error_log, offset)
            if "[emerg]" in said:
                raise EdgeFailed(f"nginx kept its previous configuration: {_said(said)}")
            if set(_workers(pid)) - before:
                return
            time.sleep(0.02)
        raise EdgeFailed(f"nginx did not take its new configuration within {START_WAIT:g}s")

    def _stop(self, pid: int) -> None:
        os.kill(pid, signal.SIGQUIT)   # graceful: requests in flight end first
        self.paths.applied.unlink(missing_ok=True)


def _workers(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children() if "worker process" in " ".join(child.cmdline())
                and "shutting down" not in " ".join(child.cmdline())]
    except psutil.Error:
        return []


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _since(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read(64 * 1024).decode(errors="replace")
    except OSError:
        return ""


def _said(text: str) -> str:
    """nginx's own complaint, without its timestamps: the lines that say what is wrong."""
    lines = [line.split("] ", 1)[-1].split(": ", 1)[-1] if line.startswith("20") else line
             for line in text.splitlines() if "emerg" in line or "alert" in line or "crit" in line or "nginx:" in line]
    return "; ".join(dict.fromkeys(line.strip() for line in lines if line.strip())) or text.strip()[-500:]
