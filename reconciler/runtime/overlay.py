"""CST's overlay: the files of ``stsource-changed/`` laid over an installed SillyTavern package.

The overlay only adds files at the places SillyTavern loads extensions from (a server plugin,
a global UI extension); laying one over a file of the release is refused. What was laid is
recorded with each file's sha256 in ``<install>/<version>/cst-overlay.json``, beside the
``.cst-ready`` marker, so that ``verify`` can tell a package that is exactly the pinned release
plus this overlay from one that was altered since.

Record::

    {"source": "<sha256 over the overlay's paths and contents>",
     "files": {"plugins/cst/index.mjs": "<sha256>", ...}}
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from ..files import atomic_write

SOURCE = "reconciler.stsource"   # the top-level stsource-changed/ folder, shipped inside the package
RECORD = "cst-overlay.json"
PLUGIN_ENTRY = "plugins/cst/index.mjs"   # the server plugin: its health route tells a start is ready
# in stsource-changed/ but not laid: its own README, and what makes the folder a Python package
_NOT_LAID = {"README.md", "__init__.py"}


class OverlayError(Exception):
    pass


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _walk(folder: Traversable, prefix: str) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for entry in folder.iterdir():
        rel = f"{prefix}{entry.name}"
        if entry.name == "__pycache__" or (not prefix and entry.name in _NOT_LAID):
            continue
        if entry.is_dir():
            found.update(_walk(entry, rel + "/"))
        else:
            found[rel] = entry.read_bytes()
    return found


def overlay_files(source: Traversable | None = None) -> dict[str, bytes]:
    """Every file of the overlay: its path relative to the package, and its content."""
    return dict(sorted(_walk(source or resources.files(SOURCE), "").items()))


def source_digest(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for rel, data in sorted(files.items()):
        digest.update(rel.encode() + b"\0" + _sha256(data).encode() + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class Laid:
    source: str
    files: dict[str, str]   # relative path -> sha256


def read_record(install_root: Path) -> Laid | None:
    try:
        data = json.loads((install_root / RECORD).read_text(encoding="utf-8"))
        return Laid(str(data["source"]), {str(k): str(v) for k, v in data["files"].items()})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OverlayError(f"{install_root / RECORD} is unreadable ({exc}): run `cst st install` to lay the "
                           "overlay again") from None


def lay(install_root: Path, package_dir: Path, files: dict[str, bytes] | None = None) -> list[str]:
    """Write the overlay into ``package_dir`` and record it; returns the paths written.

    Files an earlier overlay laid and this one no longer has are removed. Raises OverlayError
    when a file would replace one of the release's own."""
    files = overlay_files() if files is None else files
    previous = read_record(install_root)
    ours = set(previous.files) if previous else set()
    for rel in files:
        if rel not in ours and (package_dir / rel).exists():
            raise OverlayError(f"stsource-changed/{rel} would replace SillyTavern's own {package_dir / rel}; "
                               "the overlay only adds files")
    written = []
    for rel, data in files.items():
        target = package_dir / rel
        try:
            same = target.read_bytes() == data
        except FileNotFoundError:
            same = False
        if not same:
            atomic_write(target, data, mode=0o644)
            written.append(rel)
    for rel in sorted(ours - set(files)):
        (package_dir / rel).unlink(missing_ok=True)
        _prune_empty(package_dir / rel, package_dir)
        written.append(rel)
    open_folders(package_dir, files)
    record = {"source": source_digest(files), "files": {rel: _sha256(data) for rel, data in files.items()}}
    atomic_write(install_root / RECORD, json.dumps(record, indent=2).encode() + b"\n")
    return written


def open_folders(package_dir: Path, files: dict[str, bytes] | None = None) -> None:
    """Let everyone read and enter the folders the overlay laid (its files are 0644): an instance
    under a user of its own must load the plugin and the panel. Installs whose overlay folders were
    made owner-only (0700, before instances had users of their own) are opened here too."""
    files = overlay_files() if files is None else files
    folders = {folder for rel in files for folder in (package_dir / rel).parents
               if folder != package_dir and package_dir in folder.parents}
    for folder in folders:
        try:
            mode = stat.S_IMODE(folder.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o055 != 0o055:
            try:
                os.chmod(folder, mode | 0o055)
            except PermissionError:
                continue   # a shared install of another user's: a start as an instance user says what it cannot reach


def _prune_empty(path: Path, package_dir: Path) -> None:
    """Remove the folders a dropped overlay file leaves empty (never the package's own, which are not)."""
    folder = path.parent
    while folder != package_dir and package_dir in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def is_current(install_root: Path, files: dict[str, bytes] | None = None) -> bool:
    """Whether the install holds this overlay (by its record; ``verify`` looks at the files)."""
    laid = read_record(install_root)
    return laid is not None and laid.source == source_digest(overlay_files() if files is None else files)


def problems(install_root: Path, package_dir: Path, files: dict[str, bytes] | None = None) -> list[str]:
    """Why the package is not exactly its release plus this overlay, one line per file; [] when it is."""
    laid = read_record(install_root)
    if laid is None:
        return [f"the overlay was never laid over {package_dir}: run `cst st install`"]
    found = []
    for rel, expected in sorted(laid.files.items()):
        try:
            actual = _sha256((package_dir / rel).read_bytes())
        except FileNotFoundError:
            found.append(f"{rel}: missing from {package_dir}")
            continue
        except OSError as exc:
            found.append(f"{rel}: unreadable ({exc.strerror or exc})")
            continue
        if actual != expected:
            found.append(f"{rel}: changed since it was laid (sha256 {actual[:12]}, laid {expected[:12]})")
    if laid.source != source_digest(overlay_files() if files is None else files):
        found.append(f"the overlay in {install_root} is not this cst's stsource-changed/: run `cst st install`")
    return found


def environ_flags() -> dict[str, str]:
    """What an instance needs to load the overlay: server plugins on, their git auto-update off
    (SillyTavern's environment form of config.yaml's enableServerPlugins*)."""
    return {"SILLYTAVERN_ENABLESERVERPLUGINS": "true", "SILLYTAVERN_ENABLESERVERPLUGINSAUTOUPDATE": "false"}
