"""What CST's children and files give away: no secret in a child's environment, nothing readable
by other local users, and no mode an operator tightened ever loosened."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import (
    AS_ROOT,
    SANDBOXED,
    STANDIN,
    UID_FROM,
    capabilities,
    chat_from_inside,
    fake_upstream,
    free_ports,
    http_status,
    in_sandbox,
    searchable_standin,
    serve_settings,
    standin_file,
    start_serve,
    wait_until,
)
from reconciler.desired.model import SandboxSettings
from reconciler.runtime import listener, sandbox, sillytavern

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
        except BaseException as exc:   # reported to the test
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
    # as root, instances run under uids of their own: the folders on their way may be searched by
    # others (o+x, never listed), nothing more
    searched = {".cst/", ".cst/run/", "user-data/"} if AS_ROOT else set()
    loose = {path: oct(mode) for path, mode in modes.items()
             if mode & (0o076 if path in searched else 0o077)}
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
        # as root outside a sandbox the one exception: the data root lets instance users search it (o+x)
        searched = stat.S_IXOTH if AS_ROOT and not SANDBOXED and path == project.dir / "user-data" else 0
        assert stat.S_IMODE(path.stat().st_mode) == mode | searched, path
    assert stat.S_IMODE(loosened.stat().st_mode) == 0o700, "a looser mode is tightened"


# -- each instance under a user of its own (cst as root; CI runs as root)

root_only = pytest.mark.skipif(not AS_ROOT, reason="instances get users of their own only when cst runs as "
                               "root (CI does); under another user they share cst's, as before")


def as_user(uid: int, *argv: str) -> subprocess.CompletedProcess:
    """``argv`` run with exactly an instance's credentials: its uid and gid, no other group."""
    return subprocess.run(list(argv), user=uid, group=uid, extra_groups=[], capture_output=True, text=True,
                          timeout=60, cwd="/", env={"PATH": os.environ["PATH"]})




@root_only
def test_an_instance_in_its_sandbox_sees_only_what_is_its_own(project, serve):
    api, proxy, a, b = free_ports(4)
    pool = project.dir / "pool.keys"
    pool.write_text("sk-good-pool-key-1\n")
    pool.chmod(0o600)
    with fake_upstream() as upstream:
        settings = (f'resync: 1s\napi: {{listen: "127.0.0.1:{api}"}}\n'
                    f'proxy: {{listen: "127.0.0.1:{proxy}", upstream: "{upstream.url}/v1"}}')
        project.write(standin_file([(a, "running"), (b, "running")], settings=settings)
                      + "accounts:\n  - {name: pool, provider: static, keys_file: pool.keys}\n")
        project.env = {**project.env, **SECRETS}   # cst's environment: secrets in /proc/<pid>/environ
        served = serve(api, admin_key="")   # no key in the environment: one is generated into the state dir
        served.admin_key = (project.state_dir / "secrets" / "admin.key").read_text().strip()
        wait_until(lambda: http_status(a) == 401 and http_status(b) == 401, timeout=30)
        ids = {p: f"st-instance-{p}" for p in (a, b)}
        procs = {p: psutil.Process(project.record(ids[p])["pid"]) for p in (a, b)}
        uid = UID_FROM + a
        assert procs[a].uids() == (uid, uid, uid) and procs[a].gids() == (uid, uid, uid)
        assert procs[b].uids().real == UID_FROM + b
        assert capabilities(procs[a].pid) == {"CapEff": 0, "CapPrm": 0, "CapBnd": 0}
        assert procs[a].environ()["CST_PROXY_KEY_FILE"] == str(sandbox.HOME / "proxy.key")
        state = project.state_dir

        def inside(*argv: str) -> subprocess.CompletedProcess:
            return in_sandbox(procs[a].pid, uid, *argv)

        # CST's secrets and state, another instance's data, root's home: not even there
        theirs = [state / "secrets" / "admin.key", state / "secrets" / "proxy-keys" / ids[a], pool,
                  project.dir / "user-data" / str(b) / "default-user" / "starts.txt", state, Path("/root"),
                  project.dir / "user-data" / str(b), Path(sillytavern.install_home(state))]
        for path in theirs:
            seen = inside("ls", "-d", str(path))
            assert seen.returncode != 0 and "No such file or directory" in seen.stderr, (path, seen.stdout)
        # the processes it sees are its sandbox's own: no other instance's command line or environment
        listed = inside("sh", "-c", "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done")
        assert listed.returncode == 0 and "--port" in listed.stdout, listed
        assert str(b) not in listed.stdout and "cst" not in listed.stdout.replace(str(sandbox.HOME), "")
        pids = inside("ls", "/proc").stdout.split()
        assert len([p for p in pids if p.isdigit()]) <= 4, pids   # bwrap's init, node, the shell, ls
        assert not inside("cat", f"/proc/{served.proc.pid}/environ").stdout
        # the release read-only, its data read-write, a /tmp of its own
        assert inside("head", "-c", "30", str(sandbox.RELEASE / "server.js")).stdout.startswith("// A fast stand-in")
        assert "Read-only file system" in inside("touch", str(sandbox.RELEASE / "mine")).stderr
        assert inside("sh", "-c", f"echo mine > {sandbox.DATA}/mine.txt && echo mine > /tmp/mine.txt").returncode == 0
        assert (project.dir / "user-data" / str(a) / "mine.txt").stat().st_uid == uid
        assert in_sandbox(procs[b].pid, UID_FROM + b, "ls", "/tmp/mine.txt").returncode != 0
        assert not Path("/tmp/mine.txt").exists()
        tmp = inside("df", "-k", "--output=size", "/tmp").stdout.split()
        assert tmp[-1] == str(64 * 1024), tmp   # capped at sandbox.tmp_size's default, 64 MiB
        full = inside("sh", "-c", "head -c 80M /dev/zero > /tmp/big")
        assert full.returncode != 0 and "No space left" in full.stderr, full
        # on the host, everything cst keeps stays closed to its uid too
        for path in (state / "secrets" / "admin.key", pool, Path(f"/proc/{served.proc.pid}/environ")):
            read = as_user(uid, "cat", str(path))
            assert read.returncode != 0 and "Permission denied" in read.stderr, (path, read.stdout, read.stderr)
        for folder in (state, state / "run", project.dir / "user-data"):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder   # no way in through the host

        # its own key copy, its own health route
        own = inside("cat", str(sandbox.HOME / "proxy.key"))
        assert own.returncode == 0 and own.stdout.strip() == (state / "secrets" / "proxy-keys" / ids[a]).read_text().strip()
        health = httpx.get(f"http://127.0.0.1:{a}/api/plugins/cst/health", timeout=10,
                           auth=(ids[a], project.cst("password", ids[a]).stdout.strip()))
        assert health.status_code == 200 and health.json()["instance"] == ids[a]

        # it chats through the pool with its own key, as the plugin would
        def chat() -> str:
            return chat_from_inside(procs[a].pid, uid, proxy)
        assert chat().startswith("200 "), "the instance's own key works"
        assert upstream.keys_seen("/v1/chat/completions")[-1] == "sk-good-pool-key-1"

        # a rotated key reaches its copy; the old one is refused at once
        old = own.stdout.strip()
        rotated = served.api("POST", f"/api/instances/{ids[a]}/rotate-key")
        assert rotated.status_code == 200, rotated.text
        new = inside("cat", str(sandbox.HOME / "proxy.key")).stdout.strip()
        assert new.startswith("cst-") and new != old
        wait_until(lambda: chat().startswith("200 "), timeout=10)
        stale = httpx.post(f"http://127.0.0.1:{proxy}/v1/chat/completions", headers={"Authorization": f"Bearer {old}"},
                           json={"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert stale.status_code == 401

        # removed: archived by root, its data intact and still its own
        project.write(standin_file([(a, "running")], settings=settings)
                      + "accounts:\n  - {name: pool, provider: static, keys_file: pool.keys}\n")
        archived = wait_until(lambda: list((state / "archive").iterdir()), timeout=30)
        starts = archived[0] / "default-user" / "starts.txt"
        assert starts.read_text().strip() and starts.stat().st_uid == UID_FROM + b


@root_only
def test_data_from_before_users_is_given_to_the_instance_and_links_are_not_followed(project):
    """Symbolic links are given, never what they point at; a hard link to a file that is not the
    instance's (root's here) is not given at all: the chown would reach the file itself."""
    (port,) = free_ports(1)
    id_ = f"st-instance-{port}"

    def write(users: str) -> None:
        project.write(f"version: 1\nsettings:\n  sillytavern: {{server: {STANDIN}, start_timeout: 15, "
                      f"stop_timeout: 3{users}}}\ninstances:\n  - port: {port}\n")

    write(", users: {isolate: false}")   # as cst ran every instance before: under its own user
    assert project.cst("apply").returncode == 0
    assert psutil.Process(project.record(id_)["pid"]).uids().real == 0
    if SANDBOXED:   # uid 0 in its sandbox, but none of root's powers
        assert capabilities(project.record(id_)["pid"]) == {"CapEff": 0, "CapPrm": 0, "CapBnd": 0}
    data = project.dir / "user-data" / str(port)
    chats = data / "default-user" / "chats"
    chats.mkdir(parents=True)
    (chats / "old.jsonl").write_text('{"mes": "hello"}\n')
    outside = project.dir / "outside.txt"
    outside.write_text("root's own\n")
    os.symlink(outside, chats / "link")
    roots = project.dir / "roots-secret.txt"
    roots.write_text("root's alone\n")
    roots.chmod(0o600)
    os.link(roots, chats / "hard-link")   # planted: where fs.protected_hardlinks is 0, an instance can

    write("")   # the default: a user of its own
    applied = project.cst("apply")
    assert f"changed: {id_} (restarted: settings changed)" in applied.stdout, applied.stdout
    uid = UID_FROM + port
    assert psutil.Process(project.record(id_)["pid"]).uids().real == uid
    not_given = [path for path in [data, *data.rglob("*")] if (path.lstat().st_uid, path.lstat().st_gid) != (uid, uid)]
    assert not_given == [chats / "hard-link"], not_given
    assert outside.stat().st_uid == 0, "a link is given, never what it points at"
    assert (roots.stat().st_uid, roots.stat().st_gid, roots.stat().st_mode & 0o777) == (0, 0, 0o600)
    assert "left 1 file(s) with more than one link" in applied.stderr and "hard-link" in applied.stderr, \
        applied.stderr
    assert (project.state_dir / "run" / id_).stat().st_uid == uid
    assert "files from before given to it" in (project.state_dir / "logs" / f"{id_}.log").read_text()
    pid = project.record(id_)["pid"]
    assert in_sandbox(pid, uid, "cat", f"{sandbox.DATA}/default-user/chats/old.jsonl").stdout == '{"mes": "hello"}\n'

    again = project.cst("apply")
    assert again.stdout.strip().splitlines()[-1] == "ok=1 changed=0 failed=0"


@root_only
def test_outside_a_sandbox_a_folder_the_instance_user_cannot_search_is_named(project, tmp_path_factory):
    closed = tmp_path_factory.mktemp("closed")
    closed.chmod(0o700)
    (port,) = free_ports(1)
    project.write(standin_file([(port, "running")], settings=f"data_root: {closed / 'data'}",
                               server=searchable_standin(tmp_path_factory), sillytavern=", sandbox: {enabled: false}"))
    applied = project.cst("apply")
    assert applied.returncode == 2
    assert (f"st-instance-{port} runs as uid {UID_FROM + port}, but {closed} (mode 0700, owner uid 0) "
            f"does not let others search it") in applied.stdout, applied.stdout


@root_only
def test_the_ways_in_of_the_design_before_the_sandbox_are_closed(project, tmp_path_factory):
    """Instances outside a sandbox needed the search bit on the state dir, its run/ and the data
    root; once every instance runs in a sandbox, those bits are taken back."""
    (a,) = free_ports(1)
    server = searchable_standin(tmp_path_factory)
    folders = (project.state_dir, project.state_dir / "run", project.dir / "user-data")

    def write(sandboxed: bool) -> None:
        project.write(standin_file([(a, "running")], server=server,
                                   sillytavern="" if sandboxed else ", sandbox: {enabled: false}"))

    write(False)
    assert project.cst("apply").returncode == 0
    assert not project.record(f"st-instance-{a}")["sandboxed"]
    assert all(stat.S_IMODE(folder.stat().st_mode) & stat.S_IXOTH for folder in folders), "opened for a"
    write(True)
    moved = project.cst("apply")
    assert f"changed: st-instance-{a} (restarted: settings changed)" in moved.stdout, moved.stdout
    assert project.record(f"st-instance-{a}")["sandboxed"]
    assert [stat.S_IMODE(folder.stat().st_mode) for folder in folders] == [0o700] * 3
    assert http_status(a) == 401


@root_only
def test_not_root_each_instance_is_sandboxed_in_a_user_namespace(tmp_path_factory, monkeypatch):
    """cst run by an ordinary user: bwrap makes an unprivileged user namespace (where the kernel
    allows one, as here), so the same sandbox holds the instance, as that user. The sandbox is
    entered from a child of this test that dropped root (this interpreter lives under /root, which
    another uid cannot run), with the runtime's own code: mode() and Sandbox.spawn."""
    uid = 65534   # nobody
    folder = tmp_path_factory.mktemp("not-root")
    data, work = folder / "data", folder / "work"
    for made in (data, work):
        made.mkdir()
        os.chown(made, uid, uid)
    server = searchable_standin(tmp_path_factory)
    (port,) = free_ports(1)
    box = sandbox.Sandbox(server.parent, data, work, 16 << 20, None, privileged=False)
    # CST's preload, where the ordinary user can read it (this checkout may lie under /root)
    shutil.copy2(listener.PRELOAD, server.parent / listener.PRELOAD.name)
    monkeypatch.setattr(sandbox, "HOST_PRELOAD", server.parent / listener.PRELOAD.name)
    argv = (str(sandbox.NODE), "--require", str(sandbox.PRELOAD), box.inside(server), "--port", str(port),
            "--dataRoot", str(sandbox.DATA), "--listen", "true", "--listenAddressIPv4", "127.0.0.1")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "SILLYTAVERN_BASICAUTHUSER_USERNAME": "user",
           "SILLYTAVERN_BASICAUTHUSER_PASSWORD": "secret"}
    import concurrent.futures.thread  # asyncio.to_thread's, loaded while /root's stdlib can be read
    said_read, said_write = os.pipe()
    child = os.fork()
    if child == 0:   # the child: an ordinary user from here on
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            chosen = sandbox.mode(SandboxSettings())
            with open(os.devnull, "wb") as log, listener.open_listener(listener.Address(port=port)) as bound:
                env[listener.ENV_LISTEN_FD] = str(bound.fileno())
                _, node_pid = asyncio.run(box.spawn(argv, env, log, 0o077, bound.fileno()))
            os.write(said_write, json.dumps({"mode": chosen.value, "node": node_pid}).encode())
        except BaseException as exc:   # reported to the test through the pipe
            os.write(said_write, json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(0)
    os.close(said_write)
    os.waitpid(child, 0)
    with os.fdopen(said_read) as said_file:
        said = json.loads(said_file.read())
    assert "error" not in said, said
    node = psutil.Process(said["node"])
    try:
        assert said["mode"] == sandbox.Mode.USER_NAMESPACE.value
        assert node.uids().real == uid and node.cmdline()[3] == box.inside(server)
        for ns in ("user", "pid", "mnt"):
            assert os.readlink(f"/proc/{node.pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        seen = Path(f"/proc/{node.pid}/root")
        assert (seen / "opt" / "sillytavern" / "server.js").is_file() and not (seen / "root").exists()
        wait_until(lambda: http_status(port) == 401, timeout=15)
        assert (data / "default-user" / "starts.txt").stat().st_uid == uid
    finally:
        node.kill()


@root_only
def test_a_sandbox_whose_start_is_abandoned_leaves_nothing_running(tmp_path_factory, monkeypatch):
    """The start fails (or is cancelled) after bwrap made the sandbox but before node is known: no
    record will ever name it, so the whole sandbox is ended, not only the outer bwrap."""
    folder = tmp_path_factory.mktemp("abandoned")
    (folder / "data").mkdir()
    (folder / "work").mkdir()
    server = searchable_standin(tmp_path_factory)
    box = sandbox.Sandbox(server.parent, folder / "data", folder / "work", 16 << 20, None, privileged=True)
    inits: list[int] = []

    def fails(init: int, proc: subprocess.Popen) -> int:
        inits.append(init)
        wait_until(lambda: psutil.Process(init).children(), timeout=10)   # node is there
        raise sandbox.StartFailed("abandoned by the test")

    monkeypatch.setattr(sandbox, "_node_pid", fails)
    (port,) = free_ports(1)
    argv = (str(sandbox.NODE), box.inside(server), "--port", str(port), "--dataRoot", str(sandbox.DATA))
    with open(os.devnull, "wb") as log, pytest.raises(sandbox.StartFailed), \
            listener.open_listener(listener.Address(port=0)) as bound:   # handed down, not used
        asyncio.run(box.spawn(argv, {"PATH": "/usr/bin"}, log, 0o077, bound.fileno()))
    assert inits

    def running() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            if f"--port {port}" in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        return found
    wait_until(lambda: not running(), timeout=10)   # SIGKILLed: gone within moments


@root_only
def test_without_bwrap_a_pass_stops_nothing_and_names_the_package(project, tmp_path_factory):
    (port,) = free_ports(1)
    id_ = f"st-instance-{port}"
    project.write(standin_file([(port, "running")]))
    assert project.cst("apply").returncode == 0
    pid = project.record(id_)["pid"]
    # a change that restarts it (what the sandbox shows), applied where bwrap is not installed
    project.write(standin_file([(port, "running")], sillytavern=", sandbox: {tmp_size: 32MiB}"))
    bare = tmp_path_factory.mktemp("bin")
    for tool in ("node", "setpriv"):
        os.symlink(shutil.which(tool), bare / tool)
    refused = project.cst("apply", env={"PATH": str(bare)})
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "settings.sillytavern.sandbox: bwrap not found (Debian's packages bubblewrap" in refused.stdout, refused.stdout
    assert project.record(id_)["pid"] == pid and psutil.pid_exists(pid), "nothing stopped"
    moved = project.cst("apply")
    assert f"changed: {id_} (restarted: settings changed)" in moved.stdout, moved.stdout
