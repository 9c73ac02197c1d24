"""CST's overlay (stsource-changed/) over a SillyTavern package: what is laid, recorded, verified.

These run on a package folder made for the test (a package.json and an install marker, as an
install made before the overlay existed leaves them); tests/runtime/test_overlay_cli.py runs `cst st verify`
and `cst apply` on one, tests/sillytavern/test_sillytavern.py does the same with the real release.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, fake_install
from reconciler.runtime import overlay, sillytavern


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CST_SILLYTAVERN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_the_overlay_is_stsource_changed_mirroring_the_package() -> None:
    files = overlay.overlay_files()
    on_disk = sorted(str(p.relative_to(ROOT / "stsource-changed")) for p in (ROOT / "stsource-changed").rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts)
    assert sorted(files) == [p for p in on_disk if p not in ("README.md", "__init__.py")]
    assert "plugins/cst/index.mjs" in files
    assert "public/scripts/extensions/third-party/cst-keypool/manifest.json" in files
    manifest = json.loads(files["public/scripts/extensions/third-party/cst-keypool/manifest.json"])
    assert manifest["js"] in {Path(p).name for p in files}
    assert set(manifest["i18n"].values()) <= {p.split("cst-keypool/", 1)[1] for p in files if "cst-keypool/" in p}


def test_an_install_made_before_the_overlay_gets_it_and_verifies(home: Path, tmp_path: Path) -> None:
    root = fake_install(home)
    state_dir = tmp_path / ".cst"
    assert sillytavern.verify("1.19.0", state_dir) == [
        f"the overlay was never laid over {root / 'node_modules' / 'sillytavern'}: run `cst st install`"]
    _, done = sillytavern.install("1.19.0", state_dir)
    assert done == f"overlay laid ({len(overlay.overlay_files())} files written)"   # no npm: it was installed
    package = root / "node_modules" / "sillytavern"
    for rel, data in overlay.overlay_files().items():
        assert (package / rel).read_bytes() == data
    record = json.loads((root / "cst-overlay.json").read_text())
    assert set(record["files"]) == set(overlay.overlay_files())
    assert sillytavern.verify("1.19.0", state_dir) == []
    assert sillytavern.install("1.19.0", state_dir) == (sillytavern.release_of("1.19.0", state_dir), "")


def test_an_altered_or_missing_file_fails_verify_and_is_laid_again_only_on_install(home: Path, tmp_path: Path) -> None:
    root = fake_install(home)
    state_dir = tmp_path / ".cst"
    sillytavern.install("1.19.0", state_dir)
    package = root / "node_modules" / "sillytavern"
    (package / "plugins" / "cst" / "index.mjs").write_text("export const info = {};  // tampered\n")
    (package / "public/scripts/extensions/third-party/cst-keypool/style.css").unlink()
    found = sillytavern.verify("1.19.0", state_dir)
    assert len(found) == 2
    assert found[0].startswith("plugins/cst/index.mjs: changed since it was laid (sha256 ")
    assert found[1] == f"public/scripts/extensions/third-party/cst-keypool/style.css: missing from {package}"
    # what cst apply runs before starting anything: it refuses, naming the files, and repairs nothing
    with pytest.raises(sillytavern.InstallError) as refused:
        sillytavern.ready("1.19.0", state_dir)
    assert "fails verification: plugins/cst/index.mjs: changed since it was laid" in str(refused.value)
    assert "tampered" in (package / "plugins" / "cst" / "index.mjs").read_text()
    # cst st install lays it again
    _, done = sillytavern.install("1.19.0", state_dir, repair=True)
    assert done == "overlay laid (2 files written)"
    assert sillytavern.verify("1.19.0", state_dir) == []


def test_a_different_release_fails_verify(home: Path, tmp_path: Path) -> None:
    root = fake_install(home, installed="1.18.0")
    state_dir = tmp_path / ".cst"
    sillytavern.install("1.19.0", state_dir)
    manifest = root / "node_modules" / "sillytavern" / "package.json"
    assert sillytavern.verify("1.19.0", state_dir) == [f"{manifest} says sillytavern 1.18.0, not the pinned 1.19.0"]
    assert sillytavern.verify("1.19.1", state_dir) == [
        f"sillytavern 1.19.1 is not installed in {home / '1.19.1'}: run `cst st install`"]


def test_a_changed_overlay_is_laid_again_and_dropped_files_go(tmp_path: Path) -> None:
    package = tmp_path / "package"
    (package / "plugins").mkdir(parents=True)
    first = {"plugins/cst/index.mjs": b"one", "plugins/cst/old.js": b"old", "public/x/third-party/p/a.js": b"a"}
    assert sorted(overlay.lay(tmp_path, package, first)) == sorted(first)
    assert overlay.is_current(tmp_path, first)
    second = {"plugins/cst/index.mjs": b"two", "public/x/third-party/p/a.js": b"a"}
    assert not overlay.is_current(tmp_path, second)
    assert overlay.lay(tmp_path, package, second) == ["plugins/cst/index.mjs", "plugins/cst/old.js"]
    assert (package / "plugins/cst/index.mjs").read_bytes() == b"two"
    assert not (package / "plugins/cst/old.js").exists()
    assert overlay.problems(tmp_path, package, second) == []
    # a file dropped with its folder: the folder goes too, the package's own folders stay
    overlay.lay(tmp_path, package, {"plugins/cst/index.mjs": b"two"})
    assert not (package / "public").exists() and (package / "plugins").is_dir()


def test_the_overlay_never_replaces_a_file_of_the_release(tmp_path: Path) -> None:
    package = tmp_path / "package"
    (package / "plugins").mkdir(parents=True)
    (package / "plugins" / "package.json").write_text("{}")
    with pytest.raises(overlay.OverlayError, match=r"stsource-changed/plugins/package.json would replace "
                                                   r"SillyTavern's own .*; the overlay only adds files"):
        overlay.lay(tmp_path, package, {"plugins/cst/index.mjs": b"x", "plugins/package.json": b"{}"})
    assert not (package / "plugins" / "cst").exists() and not (tmp_path / overlay.RECORD).exists()
    assert (package / "plugins" / "package.json").read_text() == "{}"


def test_an_unreadable_record_says_how_to_recover(tmp_path: Path) -> None:
    (tmp_path / overlay.RECORD).write_text("{not json")
    with pytest.raises(overlay.OverlayError, match="cst-overlay.json is unreadable .*run `cst st install`"):
        overlay.problems(tmp_path, tmp_path / "package")
