"""The package's shape as a wheel: an ordinary (non-editable) install carries the overlay and the admin
page and works from another folder (tests/unit/test_layout.py: imports flow one way)."""
from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "reconciler" / "server" / "page"
# its files by their names under page/ (views/logs.js), as the server names them
PAGE_FILES = sorted(path.relative_to(PAGE).as_posix() for path in PAGE.rglob("*") if path.is_file())


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
