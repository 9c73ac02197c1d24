"""Each instance in a sandbox of its own: it sees its release, node, its data and nothing else.

An instance runs SillyTavern's server plugins and its users' extensions: code CST does not
vouch for. In its sandbox (mount, pid, ipc and uts namespaces) it sees, at fixed paths that a
container image of it uses too (``RELEASE``, ``DATA``, ``HOME``, ``NODE``):

* its release, read-only, and node with the system's libraries (``/usr``, read-only; the host's
  ``/usr/local`` is hidden);
* its data dir and its workdir (config.yaml, the copy of its proxy key), read-write;
* a private ``/tmp`` of its own, capped (``settings.sillytavern.sandbox.tmp_size``);
* the few files of ``/etc`` that name resolution and TLS read;
* its own processes in ``/proc``, nobody else's;
* its release's front end, built once for the sandbox's paths (``build_front_end``), and an
  empty ``/.dockerenv``: SillyTavern then believes it runs in a container, as in an image of
  it, and reads that prebuilt front end instead of building one into each data dir (nothing is
  copied into a new data dir; a start compiles nothing).

Not ``/root``, the state dir, other data dirs or other processes: wherever the operator keeps
CST (a clone in root's 0700 home), no folder on the host has to let the instance's uid through.
The network is the host's: an instance reaches the key pool on loopback and the internet.

Bubblewrap (Debian's ``bubblewrap``, the sandbox of Flatpak) rather than the namespaces by hand:
setting up the mounts has to happen in the child between fork and exec, which Python cannot do
safely in a threaded process, and bwrap is a small, audited program that does exactly that. As
root it needs no user namespace; ``setpriv`` (util-linux) then drops to the instance's uid with no
groups, no capabilities and no way to regain them (``no_new_privs``). Not root, bwrap makes an
unprivileged user namespace where the kernel allows one; elsewhere instances run as before.

The process tree: bwrap (cst's child) → bwrap's init (pid 1 inside) → node (pid 2 inside).
Records, exit watches, stops and adoption all name node itself: a SIGTERM to the outer bwrap
would leave node running. When node exits, the init follows and the kernel ends every other
process of the sandbox, so a stop is still one SIGTERM to SillyTavern and the whole tree goes.
Node's environment (its password among it) reaches bwrap through a descriptor (``--args``),
never its command line; bwrap's own processes carry none of CST's markers, so only node is
ever taken for the instance.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import psutil

from ..desired.model import SandboxSettings
from .base import StartFailed
from .instance_users import InstanceUser
from .listener import PRELOAD as HOST_PRELOAD

log = logging.getLogger("cst.runtime")

# where things are inside every sandbox (and in a container image of an instance)
RELEASE = PurePosixPath("/opt/sillytavern")   # the release's root: node_modules/sillytavern/server.js
DATA = PurePosixPath("/data")                 # the instance's data dir (--dataRoot)
HOME = PurePosixPath("/home/sillytavern")     # its workdir: config.yaml, proxy.key; $HOME
NODE = PurePosixPath("/usr/local/bin/node")
_SETPRIV = PurePosixPath("/usr/local/bin/setpriv")
PRELOAD = PurePosixPath("/usr/local/lib/node/listen_preload.cjs")   # node's --require (see listener.py)
# what of /etc a node process reads to resolve names and check certificates
_ETC = ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/host.conf", "/etc/gai.conf",
        "/etc/ssl", "/etc/ca-certificates", "/etc/pki", "/etc/localtime")
# part of the launch fingerprint: a change of what the sandbox shows restarts each instance once
LAYOUT = "sandbox 1"
_FIND_NODE = 10.0   # bwrap's init forks node at once; this long is a sandbox that never started


class Mode(enum.Enum):
    OFF = "off"                    # the file says so, or not root and no user namespaces here
    ROOT = "root"                  # bwrap as root, then setpriv to the instance's uid
    USER_NAMESPACE = "userns"      # not root: bwrap in an unprivileged user namespace


_said_off = False


def mode(settings: SandboxSettings) -> Mode:
    """How instances are sandboxed here; said once per process when they are not though asked to be."""
    global _said_off
    if not settings.enabled:
        return Mode.OFF
    if os.geteuid() == 0:
        return Mode.ROOT
    problem = _user_namespaces_fail()
    if problem is None:
        return Mode.USER_NAMESPACE
    if not _said_off:
        _said_off = True
        log.warning("instances run without a sandbox (%s): each sees the machine's files and processes "
                    "as cst's user does", problem)
    return Mode.OFF


def applies(settings: SandboxSettings) -> bool:
    """Whether instances run in sandboxes here (in either mode)."""
    return mode(settings) is not Mode.OFF


@functools.cache
def _user_namespaces_fail() -> str | None:
    """Why bwrap cannot make an unprivileged sandbox here, or None when it can (tried once)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    try:
        done = subprocess.run([bwrap, "--unshare-user", *_View().args, "--", "true"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired, StartFailed) as exc:
        return f"bwrap could not be run: {exc}"
    return None if done.returncode == 0 else f"no unprivileged user namespaces: {done.stderr.strip()[:200]}"


def missing_tools(chosen: Mode) -> str | None:
    """What this machine lacks to start sandboxed instances in ``chosen`` mode, else None."""
    if chosen is Mode.OFF:
        return None
    lacking = [tool for tool in ("bwrap", *(("setpriv",) if chosen is Mode.ROOT else ())) if shutil.which(tool) is None]
    if not lacking:
        return None
    return (f"settings.sillytavern.sandbox: {' and '.join(lacking)} not found (Debian's packages bubblewrap and "
            f"util-linux); install them, or set sandbox: {{enabled: false}}")


class _View:
    """bwrap's options for what every sandbox shows: new pid, ipc, uts (and cgroup) namespaces,
    the system read-only, node at NODE, its own /proc, /dev and /tmp. ``bind`` adds more."""

    def __init__(self, tmp_size: int = 16 << 20) -> None:
        self.args = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                     "--hostname", "sillytavern", "--new-session",
                     "--ro-bind", "/usr", "/usr", "--perms", "0755", "--tmpfs", "/usr/local"]
        self._made = {PurePosixPath("/"), PurePosixPath("/usr"), PurePosixPath("/usr/local")}
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):   # merged /usr: links; else folders
            top = Path("/") / name
            if top.is_symlink():
                self.args.extend(["--symlink", os.readlink(top), str(top)])
            elif top.is_dir():
                self.bind("--ro-bind", top, str(top))
        for path in _ETC:
            self.bind("--ro-bind-try", Path(path), path)
        self.bind("--ro-bind", Path(_tool("node")).resolve(), NODE)
        self.args.extend(["--proc", "/proc", "--dev", "/dev",
                          "--perms", "1777", "--size", str(tmp_size), "--tmpfs", "/tmp"])

    def bind(self, how: str, source: Path, dest: PurePosixPath | str) -> None:
        """``how`` (--bind, --ro-bind, --ro-bind-try) ``source`` at ``dest``, the folders on the way
        made 0755 explicitly: bwrap makes them with cst's umask (077), which would shut the
        instance's uid out of its own mounts."""
        for folder in reversed(PurePosixPath(dest).parents):
            if folder not in self._made:
                self._made.add(folder)
                self.args.extend(["--perms", "0755", "--dir", str(folder)])
        self.args.extend([how, str(source), str(dest)])

    def environment(self, env: dict[str, str]) -> None:
        self.args.append("--clearenv")
        for name, value in sorted(env.items()):
            self.args.extend(["--setenv", name, value])


def _package_inside(release_root: Path, package_dir: Path) -> PurePosixPath:
    return RELEASE / package_dir.relative_to(release_root)


def build_front_end(release_root: Path, package_dir: Path, target: Path, log_file: IO[bytes]) -> None:
    """Build SillyTavern's front end (its webpack cache and output) into ``target`` as a sandbox sees
    the release: webpack's cache names every module by its absolute path, so the one built at the
    install's own path is void at RELEASE (a start would compile for ~18 s of CPU, every time, as
    the release is read-only). Run once per release, as SillyTavern's own image build does; raises
    StartFailed when the build fails."""
    view = _View()
    package = _package_inside(release_root, package_dir)
    view.bind("--ro-bind", release_root, RELEASE)
    view.bind("--bind", target, package / "dist" / "_webpack")
    view.environment({"PATH": os.defpath, "HOME": "/tmp", "GIT_CEILING_DIRECTORIES": str(package.parent)})
    view.args.extend(["--chdir", str(package)])
    done = subprocess.run([_tool("bwrap"), *view.args, "--", str(NODE), str(package / "docker" / "build-lib.js")],
                          stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, check=False,
                          cwd="/", env={"PATH": os.defpath})
    if done.returncode != 0:
        raise StartFailed(f"building the front end for the sandbox failed (exit {done.returncode})")


@dataclass(frozen=True)
class Sandbox:
    """One instance's sandbox: what of the host it sees, and as whom it runs there."""

    release_root: Path            # bound read-only at RELEASE
    data_dir: Path                # bound at DATA
    workdir: Path                 # bound at HOME
    tmp_size: int
    user: InstanceUser | None     # setpriv to this uid (as root); None: the caller's own
    # bwrap runs as root (Mode.ROOT): what it starts must give up root's capabilities, with or
    # without a uid of its own (users.isolate: false keeps uid 0, never its powers)
    privileged: bool
    # the release's front end built for RELEASE (see build_front_end), bound read-only over its
    # dist/_webpack; None (a checkout of one's own): SillyTavern builds one into the data dir
    front_end: tuple[Path, Path] | None = None   # (package dir, built front end)

    def inside(self, host_path: Path) -> str:
        """Where a file of the release is inside the sandbox."""
        return str(RELEASE / host_path.relative_to(self.release_root))

    def identity(self) -> list[object]:
        """What a restart would change, as the file says it: the layout, the folders of the instance
        bound and the cap of /tmp. Not where this shell found the release (the release's identity
        is in the fingerprint already), so `cst apply` from CI agrees with the daemon."""
        return [LAYOUT, str(self.data_dir), str(self.workdir), self.tmp_size]

    def options(self, env: dict[str, str], info_fd: int) -> list[str]:
        """bwrap's options, given through ``--args``: they hold node's environment, so never argv."""
        view = _View(self.tmp_size)
        view.args.extend(["--info-fd", str(info_fd)])
        if self.privileged:
            view.bind("--ro-bind", Path(_tool("setpriv")).resolve(), _SETPRIV)
        view.bind("--ro-bind", self.release_root, RELEASE)
        view.bind("--ro-bind", HOST_PRELOAD, PRELOAD)
        if self.front_end is not None:
            package_dir, built = self.front_end
            view.bind("--ro-bind", built, _package_inside(self.release_root, package_dir) / "dist" / "_webpack")
            # SillyTavern's is-docker test: "in a container" it reads the front end in its package's
            # dist/_webpack (the one built for the sandbox) rather than building one into the data dir
            view.bind("--ro-bind", Path("/dev/null"), "/.dockerenv")
        view.bind("--bind", self.data_dir, DATA)
        view.bind("--bind", self.workdir, HOME)
        view.args.extend(["--chdir", str(HOME)])
        view.environment(env)
        return view.args

    def command(self, argv: tuple[str, ...]) -> list[str]:
        """What bwrap runs inside (on its command line: paths of the sandbox, no secret)."""
        if not self.privileged:   # an unprivileged user namespace: nothing to give up
            return list(argv)
        user = (["--reuid", str(self.user.uid), "--regid", str(self.user.gid), "--clear-groups"]
                if self.user is not None else [])
        return [str(_SETPRIV), *user, "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--", *argv]

    async def spawn(self, argv: tuple[str, ...], env: dict[str, str], log_file: IO[bytes],
                    umask: int, listener: int) -> tuple[subprocess.Popen[bytes], int]:
        """Start ``argv`` (paths as seen inside) in the sandbox; the outer bwrap and node's pid on
        the host (found in a thread: the loop goes on meanwhile); node inherits ``listener``.
        Raises StartFailed when the sandbox does not come up."""
        info_read, info_write = os.pipe()
        args = os.memfd_create("cst-sandbox-args")
        try:
            os.write(args, b"".join(arg.encode() + b"\0" for arg in self.options(env, info_write)))
            os.lseek(args, 0, os.SEEK_SET)
            proc = subprocess.Popen(  # noqa: ASYNC220 -- a fork and exec, on the pass's own loop
                [_tool("bwrap"), "--args", str(args), "--", *self.command(argv)], cwd="/", env={"PATH": os.defpath},
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                close_fds=True, pass_fds=(args, info_write, listener), umask=umask)
        finally:
            os.close(args)
            os.close(info_write)
        init: int | None = None
        try:
            init = await asyncio.to_thread(_init_pid, info_read, proc)
            return proc, await asyncio.to_thread(_node_pid, init, proc)
        except BaseException:   # no record will name node (a failure, or the start cancelled): end it all
            _abandon(proc, init)
            raise
        finally:
            os.close(info_read)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise StartFailed(f"{name} is not installed (needed to start sandboxed instances)")
    return found


def _abandon(proc: subprocess.Popen[bytes], init: int | None) -> None:
    """SIGKILL a sandbox that never got its record: its init first (the kernel then ends every
    process of its pid namespace; killing bwrap alone would orphan them), then the outer bwrap."""
    if init is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, signal.SIGKILL)
    proc.kill()
    proc.wait()


def _init_pid(info: int, proc: subprocess.Popen[bytes]) -> int:
    """The host pid of the sandbox's init, from bwrap's ``--info-fd`` (a JSON document)."""
    said = b""
    deadline = time.monotonic() + _FIND_NODE
    while time.monotonic() < deadline:
        ready, _, _ = select.select([info], [], [], 0.1)
        if ready:
            chunk = os.read(info, 4096)
            said += chunk
            try:
                return int(json.loads(said)["child-pid"])
            except (ValueError, KeyError, TypeError):
                if not chunk:
                    break
        elif proc.poll() is not None:
            break
    raise StartFailed(f"the sandbox did not start (bwrap exited with {proc.poll()}); see the instance's log")


def _node_pid(init: int, proc: subprocess.Popen[bytes]) -> int:
    """The host pid of node: the one child of the sandbox's init, once it has forked it."""
    deadline = time.monotonic() + _FIND_NODE
    while time.monotonic() < deadline:
        try:
            children = psutil.Process(init).children()
        except psutil.Error:
            children = []
        if children:
            return children[0].pid
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    raise StartFailed(f"the sandbox's command did not start (bwrap exited with {proc.poll()}); see the instance's log")
