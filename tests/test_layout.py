"""The package's shape: imports flow one way, and an ordinary (non-editable) install works."""
from __future__ import annotations

import ast
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "reconciler" / "server" / "page"
# its files by their names under page/ (views/logs.js), as the server names them
PAGE_FILES = sorted(path.relative_to(PAGE).as_posix() for path in PAGE.rglob("*") if path.is_file())
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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True)
    return next(out.glob("cst-*.whl"))


def test_the_wheel_carries_the_overlay(wheel: Path) -> None:
    """stsource-changed/ travels inside the package: what `cst st install` lays over SillyTavern."""
    import zipfile

    from reconciler.runtime.overlay import overlay_files

    files = overlay_files()
    assert "plugins/cst/index.mjs" in files
    with zipfile.ZipFile(wheel) as archive:
        for rel, data in files.items():
            assert archive.read(f"reconciler/stsource/{rel}") == data, rel


def test_the_wheel_installs_and_validates_from_another_folder(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    # a fresh venv that sees this one's packages for the dependencies, but not the editable cst
    venv.create(env_dir, with_pip=False, system_site_packages=False)
    site = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install",
                    "--no-deps", "--no-index", "-q", str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shown = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import reconciler; print(reconciler.__file__)"],
                           cwd=elsewhere, check=True, capture_output=True, text=True).stdout
    assert str(env_dir) in shown, "the installed copy, not the checkout, must be the one imported"
    result = subprocess.run([str(env_dir / "bin" / "cst"), "validate", "-f", str(ROOT / "examples" / "desired.yaml")],
                            cwd=elsewhere, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "valid (2 instances, 2 accounts)" in result.stdout
    page = subprocess.run([str(env_dir / "bin" / "python"), "-c",
                           "from reconciler.server.admin_page import Page; print(' '.join(sorted(Page().files)))"],
                          cwd=elsewhere, check=True, capture_output=True, text=True).stdout.split()
    assert page == PAGE_FILES, "the installed package serves the whole admin page"


def test_the_wheel_carries_the_admin_page(wheel: Path) -> None:
    assert {Path(name).suffix for name in PAGE_FILES} == {".html", ".js", ".css"}
    assert "views/instances.js" in PAGE_FILES  # its views' folder too
    with zipfile.ZipFile(wheel) as archive:
        for name in PAGE_FILES:
            assert archive.read(f"reconciler/server/page/{name}") == (PAGE / name).read_bytes(), name
