"""The package's shape: imports flow one way (tests/packaging/test_wheel.py: an ordinary install works)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# each layer may import the ones after it in this list, never one before it
LAYERS = ["reconciler.cli", "reconciler.kubernetes", "reconciler.server", "proxy", "reconciler.engine", "reconciler.runtime",
          "reconciler.desired", "reconciler.files", "reconciler.tasks"]


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved), typing-only ones too."""
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def _modules() -> list[tuple[str, Path]]:
    out = []
    for top in ("reconciler", "proxy"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out.append((".".join(parts), path))
    return out


def _layer(name: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if name == layer or name.startswith(layer + "."):
            return i
    return None


def test_imports_flow_one_way() -> None:
    upward = []
    for module, path in _modules():
        own = _layer(module)
        if own is None:
            continue
        for imported in _imports(path, module):
            theirs = _layer(imported)
            if theirs is not None and theirs < own:
                upward.append(f"{module} imports {imported}")
    assert upward == []


def test_nothing_below_the_server_imports_the_server_the_cli_or_the_proxy() -> None:
    """The issue's rule in its own words, independent of the layer list above."""
    forbidden = ("reconciler.server", "reconciler.cli", "proxy")
    offenders = [
        f"{module} imports {imported}"
        for module, path in _modules()
        if module.startswith(("reconciler.desired", "reconciler.engine", "reconciler.runtime"))
        for imported in _imports(path, module)
        if imported == "proxy" or imported.startswith(tuple(f + "." for f in forbidden)) or imported in forbidden
    ]
    assert offenders == []


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The two tests above would pass on an empty list: show that they do see an import."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..server.daemon import Daemon\nimport proxy.service\n")
    found = _imports(probe, "reconciler.engine.probe")
    assert "reconciler.server.daemon" in found and "proxy.service" in found
    assert _layer("reconciler.server.daemon") < _layer("reconciler.engine.probe")
