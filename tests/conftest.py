"""Shared fixtures: free ports, a ``cst`` runner, and a project dir whose processes are all killed after."""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest

from reconciler.desired.model import SandboxSettings
from reconciler.runtime import edge, sandbox, tree_walk

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "standin" / "server.js"
AS_ROOT = os.geteuid() == 0
# whether instances run in a sandbox here (as root, by default: CI's case); see runtime/sandbox.py
SANDBOXED = sandbox.applies(SandboxSettings())


# As root, cst runs each instance under a uid of its own. In its sandbox (the default) it reaches
# nothing through the host's folders; the few tests that run instances outside one need their
# folders searchable by others: pytest keeps them in /tmp/pytest-of-root (0700, tightened again by
# every pytest session that starts), so the tests run in a folder of this session's own where each
# folder on the way lets others search it (o+x, never list).
_SESSIONS = Path(tempfile.gettempdir()) / "cst-pytest-of-root"


def _searchable(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & stat.S_IXOTH:
        path.chmod(mode | stat.S_IXOTH)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config) -> None:
    if not AS_ROOT or config.option.basetemp or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    _SESSIONS.mkdir(mode=0o701, exist_ok=True)
    _searchable(_SESSIONS)
    old = sorted((p for p in _SESSIONS.iterdir() if p.name.startswith("run-")), key=lambda p: p.stat().st_mtime)
    for stale in old[:-3]:   # as pytest, the last three sessions' folders are kept
        pid = stale.name.split("-")[-1]
        if not (pid.isdigit() and psutil.pid_exists(int(pid))):
            with contextlib.suppress(OSError):   # a data dir a test nested deep included (rmtree recurses)
                tree_walk.remove(stale)
    config.option.basetemp = str(_SESSIONS / f"run-{int(time.time())}-{os.getpid()}")


if AS_ROOT:
    _mktemp = pytest.TempPathFactory.mktemp

    def _searchable_mktemp(self, basename: str, numbered: bool = True) -> Path:
        path = _mktemp(self, basename, numbered)
        for folder in (self.getbasetemp(), path):
            _searchable(folder)
        return path

    pytest.TempPathFactory.mktemp = _searchable_mktemp  # type: ignore[method-assign]  # pytest's own, wrapped


# git as the tests run it: no system or user configuration (no signing, hooks or identity from the
# host), never a prompt, and a tester's identity for the commits people make in the tests
GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0",
           "GIT_AUTHOR_NAME": "Tester", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "Tester", "GIT_COMMITTER_EMAIL": "t@example.com"}


def git(cwd: Path, *args: str, check: bool = True) -> str:
    """Run git in ``cwd``; its output, stripped (an AssertionError with git's words when it fails)."""
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **GIT_ENV})
    if check and done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {done.stderr}")
    return done.stdout.strip()


_GIVEN: set[int] = set()   # every port handed out in this session: two calls of one test never share one


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (bound to port 0, then released), none given
    before in this session (a test's ports and those of its `cst serve`'s settings come from two calls)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port >= 1024 and port not in _GIVEN:
                ports.append(port)
                _GIVEN.add(port)
    finally:
        for s in socks:
            s.close()
    return ports


def http_status(port: int, auth: tuple[str, str] | None = None, timeout: float = 10) -> int:
    """HTTP status of GET / on a local port (with basic auth if given); 0 when nothing answers
    within ``timeout``."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/")
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return 0


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


def stop_edge(state_dir: Path) -> None:
    """The state dir's nginx (it outlives every cst, as it must) killed by its pid, and its sockets' folder removed."""
    paths = edge.Paths(state_dir)
    master = edge.master_pid(paths)
    if master is not None:
        os.killpg(master, signal.SIGKILL)   # its own session and group: the master and its workers
        wait_until(lambda: not psutil.pid_exists(master) or psutil.Process(master).status() == psutil.STATUS_ZOMBIE,
                   timeout=10)
    shutil.rmtree(paths.run, ignore_errors=True)


def kill_all(state_dir: Path) -> None:
    stop_edge(state_dir)
    for proc in processes_of(state_dir):
        # the process itself (in a sandbox, node: its sandbox ends with it), then its group (outside one)
        for kill in (os.kill, os.killpg):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(proc.pid, signal.SIGKILL)
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

    def standin_knobs(self, port: int, knobs: dict) -> None:
        """Make the stand-in on ``port`` misbehave as asked (see tests/standin/server.js)."""
        data = self.dir / "user-data" / str(port)
        data.mkdir(parents=True, exist_ok=True)
        (data / "standin.json").write_text(json.dumps(knobs))

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
                 settings: str = "", server: Path = STANDIN, sillytavern: str = "") -> str:
    """A desired.yaml of stand-in instances; ``sillytavern``: more of its settings (", users: ...")."""
    lines = ["version: 1", "settings:",
             f"  sillytavern: {{server: {server}, start_timeout: 15, stop_timeout: 3{sillytavern}}}"]
    lines += [f"  {line}" for line in settings.splitlines() if line.strip()]
    lines.append("instances:" if ports_states else "instances: []")
    for port, state in ports_states:
        lines.append(f"  - port: {port}")
        lines.append(f"    state: {state}")
        for key, value in (extra_instance or {}).get(port, {}).items():
            lines.append(f"    {key}: {value}")
    return "\n".join(lines) + "\n"


def release_home_of_its_own(folder: Path, versions: tuple[str, ...]) -> Path:
    """An install home in ``folder`` holding ``versions`` of the shared one (``make test`` exports
    it), as hard links (``cp -al``: a second, no download): a test that removes a release it no
    longer runs (a rollout does) removes it from its own home, not from the other tests'."""
    assert "CST_SILLYTAVERN_HOME" in os.environ, "make test exports the shared install home"
    shared = Path(os.environ["CST_SILLYTAVERN_HOME"])
    folder.mkdir(parents=True, exist_ok=True)
    for version in versions:
        subprocess.run(["cp", "-al", str(shared / version), str(folder / version)], check=True)
    return folder


def nest(folder: Path, levels: int) -> None:
    """``levels`` folders one inside the other in ``folder`` (each named ``d``), made by descriptor:
    deeper than a path can name, as an instance can make them in its data dir."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)


def unnest(folder: Path) -> None:
    """Remove what ``nest`` made, one level at a time (shutil.rmtree, pytest's cleanup, recurses)."""
    while (folder / "d").exists():
        if (folder / "d" / "d").exists():
            os.rename(folder / "d" / "d", folder / "next")
        os.rmdir(folder / "d")
        if (folder / "next").exists():
            os.rename(folder / "next", folder / "d")


def front_end_for_the_sandbox(root: Path) -> None:
    """What `cst st install` adds to a release ``root`` for sandboxes, faked for a fake release (the
    stand-in needs no front end): the folder it binds over the package's dist/_webpack, built."""
    (root / "node_modules" / "sillytavern" / "dist" / "_webpack").mkdir(parents=True, exist_ok=True)
    (root / "front-end-sandbox").mkdir(exist_ok=True)
    (root / "front-end-sandbox" / ".cst-ready").write_text("faked for the stand-in\n")


def fake_install(home: Path, version: str = "1.19.0", installed: str | None = None) -> Path:
    """``<home>/<version>`` as `cst st install` left it before CST had an overlay."""
    root = home / version
    package = root / "node_modules" / "sillytavern"
    (package / "plugins").mkdir(parents=True)
    (package / "plugins" / "package.json").write_text('{"name": "sillytavern-plugins", "type": "commonjs"}\n')
    (package / "package.json").write_text(json.dumps({"name": "sillytavern", "version": installed or version}))
    (package / "server.js").write_text("// stands in for the release\n")
    front_end_for_the_sandbox(root)
    (root / ".cst-ready").write_text(version + "\n")
    return root


def capabilities(pid: int) -> dict[str, int]:
    """The effective, permitted and bounding capability sets of process ``pid``, as numbers."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1], 16) for line in status
            if line.startswith(("CapEff:", "CapPrm:", "CapBnd:"))}


def in_sandbox(pid: int, uid: int, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``argv`` run inside the sandbox of the instance whose node is ``pid`` (its mount, pid, ipc and
    uts namespaces), as its uid with no other group: what code of the instance's own could do."""
    return subprocess.run(["nsenter", "-t", str(pid), "-m", "-p", "-i", "-u", "--setuid", str(uid),
                           "--setgid", str(uid), "--", *argv], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin"}, cwd="/")


UID_FROM = 2_000_000_000   # settings.sillytavern.users.uid_from's default (the schema's)

# what an instance's plugin does with its key: read the file CST_PROXY_KEY_FILE names, call the proxy
_CHAT = """
const key = require('node:fs').readFileSync(process.argv[1], 'utf8').trim();
fetch(process.argv[2] + '/v1/chat/completions', {method: 'POST',
    headers: {Authorization: 'Bearer ' + key, 'Content-Type': 'application/json'},
    body: JSON.stringify({model: 'gpt-fake', messages: [{role: 'user', content: 'hello'}]})})
  .then(async r => console.log(r.status, (await r.text()).slice(0, 200)));
"""


def chat_from_inside(pid: int, uid: int, proxy_port: int) -> str:
    """A chat sent from inside the sandbox of the instance whose node is ``pid``, with the copy of its
    key it reads: the answer's status and the start of its body ("200 {...}")."""
    done = in_sandbox(pid, uid, "node", "-e", _CHAT, str(sandbox.HOME / "proxy.key"), f"http://127.0.0.1:{proxy_port}")
    assert done.returncode == 0, done.stderr
    return done.stdout


def searchable_standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the stand-in that a uid other than root's can reach on the host, for the tests
    of instances outside a sandbox (this checkout may lie in a folder closed to others)."""
    folder = tmp_path_factory.mktemp("standin")
    shutil.copy2(STANDIN, folder / "server.js")
    (folder / "server.js").chmod(0o644)
    return folder / "server.js"


def serve_settings(api_port: int, resync: str = "1s") -> str:
    """settings lines for a `cst serve` test: its API on ``api_port``, its proxy on a free port."""
    (proxy_port,) = free_ports(1)
    return (f'resync: {resync}\napi: {{listen: "127.0.0.1:{api_port}"}}\n'
            f'proxy: {{listen: "127.0.0.1:{proxy_port}"}}')


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


async def eventually(check, timeout: float = 10.0, failure=None, interval: float = 0.02) -> None:
    """``wait_until`` for asyncio tests: wait for ``check()`` (plain or async) to be true without
    blocking the loop; ``failure()`` says what was awaited when it never is."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(failure() if failure else f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@dataclass
class Served:
    """A running `cst serve` on a project; ``api(...)`` calls its REST API."""

    project: Project
    proc: subprocess.Popen
    port: int
    admin_key: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, method: str, path: str, **kwargs):
        import httpx
        headers = {"X-ST-Admin-Key": self.admin_key, **kwargs.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=120, **kwargs)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


CST = (sys.executable, "-m", "reconciler")


def start_serve(project: Project, api_port: int, admin_key: str = "test-admin-key", args: tuple = (),
                scheme: str = "http", wait: bool = True, log_name: str = "serve.log",
                command: tuple[str, ...] = CST, prefix: tuple = ()) -> Served:
    """``cst serve`` on the project. ``command`` runs cst (the fault tests inject faults through
    it); ``prefix`` runs that (like setpriv, to drop root's capabilities)."""
    import httpx
    log = project.dir / log_name
    with open(log, "wb") as out:   # the child keeps its own copy
        proc = subprocess.Popen([*prefix, *command, "serve", "-f", str(project.file), *args],
                                cwd=project.dir, env={**project.env, "CST_ADMIN_KEY": admin_key},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    served = Served(project, proc, api_port, admin_key, log)
    if wait:
        def up():
            if proc.poll() is not None:
                raise AssertionError(f"cst serve exited {proc.returncode}:\n{log.read_text()}")
            try:
                return httpx.get(f"{scheme}://127.0.0.1:{api_port}/health", timeout=1, verify=False).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(up, timeout=30)
    return served


@pytest.fixture
def serve(project: Project):
    """Start `cst serve` on ``project`` (after it has written its desired.yaml); stopped after the test."""
    started: list[Served] = []

    def _start(*args, **kwargs) -> Served:
        served = start_serve(project, *args, **kwargs)
        started.append(served)
        return served

    yield _start
    for served in started:
        served.stop()


def proxy_fakes():
    """tests/proxy/fakes.py for tests outside tests/proxy (the same module object the proxy tests use)."""
    if "fakes" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fakes", ROOT / "tests" / "proxy" / "fakes.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["fakes"] = module
        spec.loader.exec_module(module)
    return sys.modules["fakes"]


@contextmanager
def _on_a_thread(server):
    """One of tests/proxy/fakes.py's aiohttp servers on an event loop of its own thread, for tests
    that run `cst serve` as a process."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextmanager
def fake_daidai(accounts: dict[str, tuple[str, list[dict]]]) -> Iterator[str]:
    """The fake DaiDai platform: ``{email: (password, keys)}`` in, its base URL out."""
    platform = proxy_fakes().FakeDaiDai()
    for email, (password, keys) in accounts.items():
        platform.add_account(email, password, keys)
    with _on_a_thread(platform):
        yield platform.url


@contextmanager
def fake_upstream(**options):
    """The fake OpenAI-compatible upstream (``options`` as FakeUpstream takes them)."""
    with _on_a_thread(proxy_fakes().FakeUpstream(**options)) as upstream:
        yield upstream


def daidai_account(name: str, email: str, api_base: str, password_env: str = "DAIDAI_PASSWORD") -> str:
    """An ``accounts:`` item of desired.yaml for a (fake) DaiDai platform."""
    return (f"  - name: {name}\n    provider: daidai\n    email: {email}\n"
            f"    password_env: {password_env}\n    api_base: {api_base}\n")


class EventReader:
    """GET /api/events read on a thread of its own; ``events`` grows as they arrive."""

    def __init__(self, served, last_event_id: str | None = None, key: str | None = None):
        headers = {"X-ST-Admin-Key": key if key is not None else served.admin_key}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        self.events: list[dict] = []
        self._client = httpx.Client(timeout=httpx.Timeout(10, read=60))
        self.response = self._client.send(self._client.build_request("GET", served.url + "/api/events",
                                                                     headers=headers), stream=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        if self.response.status_code == 200:
            self._thread.start()

    def _read(self) -> None:
        event: dict = {}
        try:
            for line in self.response.iter_lines():
                if not line:
                    if event:
                        self.events.append(event)
                    event = {}
                elif not line.startswith(":"):
                    field, _, value = line.partition(": ")
                    event[field] = json.loads(value) if field == "data" else value
        except (httpx.HTTPError, RuntimeError):
            pass  # closed by the test

    def wait_for(self, name: str, timeout: float = 30, **data) -> dict:
        def match() -> dict | None:
            return next((e for e in list(self.events) if e.get("event") == name
                         and all(e["data"].get(k) == v for k, v in data.items())), None)
        return wait_until(match, timeout=timeout)

    def close(self) -> None:
        self.response.close()
        self._client.close()
