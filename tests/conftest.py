"""Shared fixtures: free ports, a ``cst`` runner, and a project dir whose processes are all killed after."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "standin" / "server.js"


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (bound to port 0, then released)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            if s.getsockname()[1] >= 1024:
                ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def processes_of(state_dir: Path) -> list[psutil.Process]:
    """Every live process started for this state dir (found by the marker in its environment)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("CST_STATE_DIR") == str(state_dir) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_all(state_dir: Path) -> None:
    for proc in processes_of(state_dir):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    psutil.wait_procs(processes_of(state_dir), timeout=5)


@dataclass
class Project:
    """A folder with a desired.yaml; ``cst(...)`` runs the real command line on it."""

    dir: Path
    env: dict

    @property
    def file(self) -> Path:
        return self.dir / "desired.yaml"

    @property
    def state_dir(self) -> Path:
        return self.dir / ".cst"

    def write(self, text: str) -> None:
        self.file.write_text(textwrap.dedent(text))

    def cst(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "reconciler", *args, "-f", str(self.file)],
                              cwd=self.dir, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)

    def status(self) -> dict[str, dict]:
        result = self.cst("status", "-o", "json")
        assert result.returncode == 0, result.stderr
        return {row["id"]: row for row in json.loads(result.stdout)}

    def record(self, id_: str) -> dict:
        return json.loads((self.state_dir / "instances" / f"{id_}.json").read_text())


@pytest.fixture
def project(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CST_")}
    if "CST_SILLYTAVERN_HOME" in os.environ:
        env["CST_SILLYTAVERN_HOME"] = os.environ["CST_SILLYTAVERN_HOME"]
    proj = Project(tmp_path, env)
    yield proj
    kill_all(proj.state_dir.resolve())


def standin_file(ports_states: list[tuple[int, str]], extra_instance: dict | None = None,
                 settings: str = "") -> str:
    lines = ["version: 1", "settings:", f"  sillytavern: {{server: {STANDIN}, start_timeout: 15, stop_timeout: 3}}"]
    lines += [f"  {line}" for line in settings.splitlines() if line.strip()]
    lines.append("instances:" if ports_states else "instances: []")
    for port, state in ports_states:
        lines.append(f"  - port: {port}")
        lines.append(f"    state: {state}")
        for key, value in (extra_instance or {}).get(port, {}).items():
            lines.append(f"    {key}: {value}")
    return "\n".join(lines) + "\n"


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
