"""What CST's children and files give away: no secret in a child's environment, nothing readable
by other local users, and no mode an operator tightened ever loosened."""
from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import psutil

from conftest import free_ports, http_status, serve_settings, standin_file, start_serve, wait_until
from reconciler.runtime import sillytavern

SECRETS = {"CST_ADMIN_KEY": "secret-admin-key-1", "DAIDAI_PASSWORD": "secret-daidai-2",
           "EXTRA_OPENAI_KEYS": "sk-secret-pool-3", "AWS_SECRET_ACCESS_KEY": "secret-cloud-4"}


def leaked(env: dict[str, str]) -> set[str]:
    return {name for name, value in SECRETS.items() if name in env or value in "\0".join(env.values())}


def test_an_instance_sees_none_of_csts_secrets(project):
    (port,) = free_ports(1)
    project.write(standin_file([(port, "running")]))
    assert project.cst("apply", env=SECRETS).returncode == 0
    pid = project.record(f"st-instance-{port}")["pid"]
    env = psutil.Process(pid).environ()  # /proc/<pid>/environ
    assert not leaked(env), leaked(env)
    assert env["SILLYTAVERN_BASICAUTHUSER_USERNAME"] == f"st-instance-{port}" and "PATH" in env


def test_npm_sees_none_of_csts_secrets(tmp_path: Path, monkeypatch):
    """The real npm, pointed at a local registry that never answers, is caught while it waits."""
    registry = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    asked = threading.Event()

    def hold() -> None:
        try:
            conn, _ = registry.accept()
        except OSError:
            return
        held.append(conn)
        asked.set()

    threading.Thread(target=hold, daemon=True).start()
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CST_SILLYTAVERN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("npm_config_registry", f"http://127.0.0.1:{registry.getsockname()[1]}/")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
    failure: list[BaseException] = []

    def install() -> None:
        try:
            sillytavern.install("1.19.0", tmp_path / "state")
        except BaseException as exc:  # noqa: BLE001 (reported to the test)
            failure.append(exc)

    installer = threading.Thread(target=install)
    installer.start()
    npm: list[psutil.Process] = []
    try:
        assert asked.wait(120), "npm asked the registry"
        # npm rewrites its process title, so its command line may come back as one string
        npm = [p for p in psutil.Process().children(recursive=True) if "npm install" in " ".join(p.cmdline())]
        assert len(npm) == 1, [p.cmdline() for p in npm]
        env = npm[0].environ()
    finally:
        for proc in npm:
            proc.kill()  # the process this test made CST start
        installer.join(60)
        registry.close()
        for conn in held:
            conn.close()
    assert not leaked(env), leaked(env)
    assert env["npm_config_registry"].startswith("http://127.0.0.1:") and "PATH" in env
    assert failure and isinstance(failure[0], sillytavern.InstallError)


def modes_under(root: Path) -> dict[str, int]:
    found = {root.name + "/": stat.S_IMODE(root.stat().st_mode)}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root.parent) + "/"] = \
                stat.S_IMODE(os.lstat(os.path.join(folder, name)).st_mode)
        for name in files:
            found[os.path.relpath(os.path.join(folder, name), root.parent)] = \
                stat.S_IMODE(os.lstat(os.path.join(folder, name)).st_mode)
    return found


def test_everything_cst_creates_is_owner_only(project):
    """An instance is started, served (the admin key generated), logs rotated, then removed and archived."""
    api, a, b = free_ports(3)
    project.write(standin_file([(a, "running"), (b, "running")], settings=serve_settings(api) + "\nlogs: {max_size: 1}"))
    assert project.cst("apply").returncode == 0
    env = {k: v for k, v in project.env.items() if k != "CST_ADMIN_KEY"}
    project.env = env
    served = start_serve(project, api, admin_key="")  # no key in the environment: one is generated
    try:
        wait_until(lambda: (project.state_dir / "logs" / f"st-instance-{a}.log.1").exists(), timeout=30)
        project.write(standin_file([(a, "running")], settings=serve_settings(api)))
        wait_until(lambda: list((project.state_dir / "archive").iterdir()), timeout=30)
    finally:
        served.stop()
    modes = {**modes_under(project.state_dir), **modes_under(project.dir / "user-data")}
    loose = {path: oct(mode) for path, mode in modes.items() if mode & 0o077}
    assert not loose, loose
    for must in (".cst/", ".cst/instances/", ".cst/secrets/admin.key", f".cst/instances/st-instance-{a}.json",
                 f".cst/logs/st-instance-{a}.log", f".cst/logs/st-instance-{a}.log.1", ".cst/archive/",
                 "user-data/", f"user-data/{a}/", f"user-data/{a}/default-user/starts.txt"):
        assert must in modes, (must, sorted(modes))
    archived = [p for p in modes if p.startswith(".cst/archive/st-instance-") and p.endswith("starts.txt")]
    assert archived, "the archive kept the removed instance's data"


def test_a_mode_tightened_by_the_operator_is_never_loosened(project):
    (port,) = free_ports(1)
    project.write(standin_file([(port, "running")]))
    assert project.cst("apply").returncode == 0
    tightened = {project.state_dir / "logs": 0o500, project.dir / "user-data": 0o500,
                 project.dir / "user-data" / str(port): 0o300}
    loosened = project.state_dir / "instances"
    for path, mode in tightened.items():
        path.chmod(mode)
    loosened.chmod(0o755)
    project.write(standin_file([(port, "stopped")]))
    assert project.cst("apply").returncode == 0
    project.write(standin_file([(port, "running")]))
    assert project.cst("apply").returncode == 0
    assert http_status(port) == 401
    for path, mode in tightened.items():
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert stat.S_IMODE(loosened.stat().st_mode) == 0o700, "a looser mode is tightened"
