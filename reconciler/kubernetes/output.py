"""Rendered objects as YAML: the same objects, the same bytes; one file per object, or one stream.

A folder of output is replaced whole and at once (``files.exchange``), so ``kubectl apply -f DIR``
never sees half of a render, and an object the file dropped leaves no file behind to re-apply.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import yaml

from ..files import exchange
from .render import Manifest

_HEADER = "# Rendered by `cst render kubernetes` from {source}: change that file, not this one.\n"
_MARK = b"# Rendered by `cst render kubernetes`"


class _Dumper(yaml.SafeDumper):
    """Every value written out where it is (no anchors and aliases: a reader of one file sees it
    all), text of several lines (the pool's desired.yaml) as a literal block, readable in a diff."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


class OutputRefused(Exception):
    """The output folder holds files this command did not write: nothing was changed."""


def dump(obj: Manifest) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)


def file_name(obj: Manifest) -> str:
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def stream(objects: tuple[Manifest, ...], source: str) -> str:
    """Every object as one YAML stream, a document each."""
    return _HEADER.format(source=source) + "".join(f"---\n{dump(obj)}" for obj in objects)


def write_folder(objects: tuple[Manifest, ...], target: Path, source: str) -> None:
    """``target`` holding exactly one file per object; raises OutputRefused when it holds anything
    else (a folder of someone's own is never emptied)."""
    if target.exists():
        if not target.is_dir():
            raise OutputRefused(f"{target} is not a folder")
        strangers = sorted(p.name for p in target.iterdir() if not _ours(p))
        if strangers:
            raise OutputRefused(f"{target} holds files `cst render kubernetes` did not write "
                                f"({', '.join(strangers[:5])}): give an empty or new folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    built = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    built.mkdir(mode=0o755)
    try:
        header = _HEADER.format(source=source)
        for obj in objects:
            with open(built / file_name(obj), "w", encoding="utf-8") as out:
                out.write(header + dump(obj))
                out.flush()
                os.fsync(out.fileno())
        if not target.exists():
            os.rename(built, target)
        elif not exchange(built, target):
            raise OutputRefused(f"{target}: this file system cannot swap folders atomically")
    finally:
        shutil.rmtree(built, ignore_errors=True)   # the old render, after a swap


def _ours(path: Path) -> bool:
    if not (path.is_file() and path.suffix == ".yaml"):
        return False
    with open(path, "rb") as f:
        return f.read(len(_MARK)) == _MARK

