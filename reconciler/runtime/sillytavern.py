"""The SillyTavern release CST runs: install it from the npm registry, once, and pre-build its front end.

Layout of an install home (``$CST_SILLYTAVERN_HOME``, else ``<state_dir>/sillytavern``)::

    <home>/<version>/node_modules/sillytavern/server.js
    <home>/<version>/node_modules/sillytavern/dist/_webpack/   front-end build, made once here
    <home>/<version>/node_modules/sillytavern/plugins/cst/…     CST's overlay (see ``overlay``)
    <home>/<version>/cst-overlay.json                           what the overlay laid, with sha256s
    <home>/<version>/front-end-sandbox/                         the front end built for the sandbox's paths
    <home>/<version>/.cst-ready                                 written last: the install is complete

SillyTavern compiles its front-end libraries with webpack on every start and
keeps the cache in ``<dataRoot>/_webpack`` -- or, when it believes it runs in a
container, in ``dist/_webpack`` of its own package (its server.js chdirs there).
A cold compile is ~20 s of CPU, so CST builds it once per install; in a
container every instance then finds it in the package, elsewhere CST copies it
into each new data root.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

from . import overlay, sandbox
from .base import ReleaseId, StartFailed
from .environment import child_environment
from .statedir import LockHeld, StateDir

_READY = ".cst-ready"
# the front end built for the sandbox's paths (see sandbox.build_front_end), beside the package
_SANDBOX_FRONT_END = "front-end-sandbox"
_PACKAGE = Path("node_modules") / "sillytavern"
# the folders of an install home that are releases (schemas/desired.schema.json's st_version):
# anything else there (locks, a folder someone put there) is never removed
_VERSION_FOLDER = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.-]+)?$")
# what npm says when the registry has no such release (a typo, or one not published yet)
_UNPUBLISHED = re.compile(r"\b(ETARGET|E404)\b|No matching version found|is not in this registry")


class InstallError(Exception):
    pass


class Unpublished(InstallError):
    """The npm registry has no such release of SillyTavern (a typo, or one not published yet)."""


@dataclass(frozen=True)
class Release:
    """Where one SillyTavern server lives and how to run it."""

    server_js: Path
    prebuilt_webpack: Path | None   # None for a custom checkout: it manages its own cache
    has_overlay: bool = False       # CST's overlay is laid (the npm release): its health route answers

    @property
    def package_dir(self) -> Path:
        return self.server_js.parent

    @property
    def root(self) -> Path:
        """All a sandbox shows of the release: an npm install's folder (the package and, hoisted
        beside it in ``node_modules``, its dependencies), or a checkout's own folder."""
        return self.package_dir.parent.parent if self.prebuilt_webpack is not None else self.package_dir

    @property
    def sandbox_front_end(self) -> Path | None:
        """The front end built for a sandbox's view of the release, once built; None for a checkout."""
        if self.prebuilt_webpack is None:
            return None
        built = self.root / _SANDBOX_FRONT_END
        return built if (built / _READY).exists() else None


def identity(version: str) -> str:
    """The npm release ``version`` as the runtime names what an instance runs ("sillytavern@1.19.0")."""
    return str(ReleaseId(version=version))


def release_of_identity(identity: str, state_dir: Path) -> Release:
    """The release an identity (``ReleaseId``'s text) names; ValueError when it names none."""
    named = ReleaseId.parse(identity)
    if named.version is not None:
        return release_of(named.version, state_dir)
    return Release(Path(str(named.server)), None)


def version_of_server(server_js: str) -> str | None:
    """The version of the npm release a server.js path lies in, by the install home's layout
    (``<home>/<version>/node_modules/sillytavern/server.js``); None for any other path."""
    parts = Path(server_js).parts
    if len(parts) < 5 or parts[-3:] != ("node_modules", "sillytavern", "server.js"):
        return None
    return parts[-4] if _VERSION_FOLDER.match(parts[-4]) else None


def install_home(state_dir: Path) -> Path:
    env = os.environ.get("CST_SILLYTAVERN_HOME")
    return Path(env).expanduser().resolve() if env else state_dir / "sillytavern"


def node_binary() -> str:
    node = shutil.which("node")
    if not node:
        raise InstallError("Node.js is not installed (SillyTavern needs node >= 20 on PATH)")
    return node


def outside_our_git(package_dir: Path) -> dict[str, str]:
    """SillyTavern keys its webpack cache on the git revision it finds from its package dir. An
    install inside a git checkout (``.cache/`` of CST's own) would take that checkout's HEAD, so
    every commit there would void the prebuilt front end: git must not look above the install.
    A SillyTavern checkout of one's own keeps its ``.git``, which sits in the package dir itself."""
    return {"GIT_CEILING_DIRECTORIES": str(package_dir.parent)}


def _run(argv: list[str], cwd: Path, what: str, log: Path, network: bool = False) -> None:
    """Run an install step with a minimal environment (none of CST's secrets), its output to ``log``."""
    env = child_environment(outside_our_git(cwd), network=network)
    with open(log, "ab") as out:
        result = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise InstallError(f"{what} failed (exit {result.returncode}); see {log}:\n" + "\n".join(tail))


def release_of(version: str, state_dir: Path) -> Release:
    root = install_home(state_dir) / version
    package = root / _PACKAGE
    return Release(package / "server.js", package / "dist" / "_webpack", has_overlay=True)


def install(version: str, state_dir: Path, repair: bool = False, sandboxed: bool = False) -> tuple[Release, str]:
    """Install ``sillytavern@version`` unless present and lay CST's overlay over it unless it holds
    this overlay already (an install made before the overlay existed gets it now). With ``repair``,
    the overlay is laid again when a laid file was altered or removed. ``sandboxed``: instances
    run in sandboxes, which need the front end built for their view too. Returns the release and
    what was done ("" when nothing was)."""
    root = install_home(state_dir) / version
    rel = release_of(version, state_dir)

    def overlay_needed() -> bool:
        if not (root / _READY).exists() or not overlay.is_current(root):
            return True
        return repair and bool(overlay.problems(root, rel.package_dir))

    def needed() -> bool:
        return overlay_needed() or (sandboxed and rel.sandbox_front_end is None)

    if not needed():
        return rel, ""
    root.mkdir(parents=True, exist_ok=True)
    # several state dirs (or test workers) may share one home: one installer at a time
    with StateDir(root).lock("install", timeout=900):
        if not needed():
            return rel, ""
        done = []
        if not (root / _READY).exists():
            _install_release(version, root, rel)
            done.append("installed from the npm registry")
        if overlay_needed():
            written = overlay.lay(root, rel.package_dir)
            done.append(f"overlay laid ({len(written)} files written)")
            (root / _READY).write_text(version + "\n")
        if sandboxed and rel.sandbox_front_end is None:
            _build_sandbox_front_end(rel)
            done.append("front end built for the sandbox")
    return rel, "; ".join(done)


def _build_sandbox_front_end(rel: Release) -> None:
    """Build the front end for the sandbox's paths into a temporary folder, then rename it into place."""
    built = rel.root / _SANDBOX_FRONT_END
    building = rel.root / f".{_SANDBOX_FRONT_END}.tmp"
    shutil.rmtree(building, ignore_errors=True)   # an earlier build cut short
    building.mkdir(mode=0o755)
    with open(rel.root / "install.log", "ab") as log:
        try:
            sandbox.build_front_end(rel.root, rel.package_dir, building, log)
        except StartFailed as exc:
            raise InstallError(f"{exc}; see {rel.root / 'install.log'}") from None
    (building / _READY).write_text("built for the sandbox\n")
    shutil.rmtree(built, ignore_errors=True)
    building.rename(built)


def _install_release(version: str, root: Path, rel: Release) -> None:
    npm = shutil.which("npm")
    if not npm:
        raise InstallError("npm is not installed (it comes with Node.js >= 20)")
    node_binary()
    log = root / "install.log"
    if not (root / "package.json").exists():
        (root / "package.json").write_text('{"name": "cst-sillytavern", "private": true}\n')
    # --ignore-scripts: no package's install script runs. SillyTavern 1.19.0 needs none (its
    # only one, protobufjs's postinstall, prints version warnings); its own build runs below.
    start = log.stat().st_size if log.exists() else 0
    try:
        _run([npm, "install", "--ignore-scripts", "--no-audit", "--no-fund", "--no-save", f"sillytavern@{version}"],
             root, f"npm install sillytavern@{version}", log, network=True)
    except InstallError:
        with open(log, "rb") as out:   # this attempt's lines only: an earlier one may have failed otherwise
            out.seek(start)
            said = out.read().decode(errors="replace")
        found = next((line for line in said.splitlines() if _UNPUBLISHED.search(line)), None)
        if found is not None:
            raise Unpublished(f"sillytavern {version} is not published on the npm registry "
                               f"({found.strip()})") from None
        raise
    if not rel.server_js.exists():
        raise InstallError(f"npm installed sillytavern@{version} but {rel.server_js} is missing")
    # SillyTavern's own build script for container images: compiles into <cwd>/dist/_webpack
    _run([node_binary(), str(rel.package_dir / "docker" / "build-lib.js")],
         rel.package_dir, "building the SillyTavern front end", log)
    make_startup_folders(rel.package_dir)


# the folders SillyTavern makes in its package dir on every start (its src/constants.js
# PUBLIC_DIRECTORIES, relative to the package dir: server.js chdirs there); the others ship with
# the package or the overlay
_STARTUP_FOLDERS = ("backups",)


def make_startup_folders(package_dir: Path) -> None:
    """Make, root's and readable by all, the folders SillyTavern would make in its package dir at
    start: an instance under a user of its own cannot create them in a root's install, and
    SillyTavern exits (EACCES, mkdir 'backups/'). That they exist is all it checks: the only
    writer of the package's ``backups/`` is a migration of a data layout older than multi-user
    SillyTavern, which never runs on CST's data roots."""
    for name in _STARTUP_FOLDERS:
        folder = package_dir / name
        if not folder.is_dir():
            try:
                folder.mkdir(exist_ok=True)
                folder.chmod(0o755)
            except PermissionError:
                continue   # a shared install of another user's: a start as an instance user says why it fails


def verify(version: str, state_dir: Path) -> list[str]:
    """Why the install is not exactly ``sillytavern@version`` plus CST's overlay; [] when it is."""
    root = install_home(state_dir) / version
    rel = release_of(version, state_dir)
    if not (root / _READY).exists():
        return [f"sillytavern {version} is not installed in {root}: run `cst st install`"]
    manifest = rel.package_dir / "package.json"
    try:
        installed = json.loads(manifest.read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError, AttributeError) as exc:
        return [f"{manifest} is unreadable ({exc}): run `cst st install`"]
    found = [] if installed == version else [f"{manifest} says sillytavern {installed}, not the pinned {version}"]
    return found + overlay.problems(root, rel.package_dir)


def ready(version: str, state_dir: Path, sandboxed: bool = False) -> str:
    """Install what is missing (never repairing an altered file), then verify; what was done.

    Raises InstallError naming each file that fails the check."""
    rel, done = install(version, state_dir, sandboxed=sandboxed)
    overlay.open_folders(rel.package_dir)   # installs laid before instances had users of their own
    make_startup_folders(rel.package_dir)   # and installs made before CST made these
    found = verify(version, state_dir)
    if found:
        raise InstallError(f"sillytavern {version} fails verification: " + "; ".join(found))
    return done


def looks_like_container() -> bool:
    """The test SillyTavern's webpack config makes (through the is-docker package) to pick its cache folder."""
    if Path("/.dockerenv").exists():
        return True
    try:
        return "docker" in Path("/proc/self/cgroup").read_text()
    except OSError:
        return False


def prefill_webpack_cache(rel: Release, data_dir: Path) -> Path | None:
    """Copy the prebuilt front end into a new data root, where SillyTavern looks outside a container.

    In a container SillyTavern reads the package's own ``dist/_webpack``: nothing to copy."""
    if rel.prebuilt_webpack is None or not rel.prebuilt_webpack.is_dir() or looks_like_container():
        return None
    target = data_dir / "_webpack"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(rel.prebuilt_webpack, target)
    return target


def _busy(folder: Path) -> bool:
    """Whether a live process runs a server.js inside ``folder`` (of any state dir sharing the home):
    by its command line, or, in a sandbox (where the release is bound at another path), by the
    folder its sandbox shows there (the same inode: not another home's copy of the same version)."""
    inside = str(folder) + os.sep
    here = os.stat(folder)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(arg.startswith(inside) for arg in proc.info["cmdline"] or ()):
                return True
            shown = os.stat(f"/proc/{proc.pid}/root{sandbox.RELEASE}")
        except (psutil.Error, TypeError, OSError):
            continue
        if (shown.st_dev, shown.st_ino) == (here.st_dev, here.st_ino):
            return True
    return False


def remove_unused(state_dir: Path, in_use: set[str]) -> list[str]:
    """Delete the installed releases (version folders of the install home) not in ``in_use``; the
    versions removed, in name order.

    ``in_use`` is the caller's: every version a declared instance runs or a running process was
    started on (a rollout calls this once it completed). Beyond it, a release is kept while any
    live process runs its server.js (a home may be shared by several state dirs, whose processes
    this caller does not know) or while another cst installs it. An empty ``in_use`` is refused:
    a fleet always uses its own version, so it is a caller's mistake that would empty the home."""
    if not in_use:
        raise ValueError("remove_unused: no release is in use; refusing to remove every installed one")
    home = install_home(state_dir)
    if not home.is_dir():
        return []
    removed: list[str] = []
    for folder in sorted(home.iterdir(), key=lambda p: p.name):
        if (not _VERSION_FOLDER.match(folder.name) or folder.name in in_use or folder.is_symlink()
                or not folder.is_dir() or _busy(folder)):
            continue
        try:
            with StateDir(folder).lock("install", timeout=0):
                # moved aside first, in one rename: no one finds half a release under its name
                doomed = home / f".removing-{folder.name}-{os.getpid()}"
                folder.rename(doomed)
        except LockHeld:
            continue   # being installed right now: someone is about to use it
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(folder.name)
    return removed
