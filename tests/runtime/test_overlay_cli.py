"""`cst st verify` and `cst apply` on a SillyTavern package made for the test with CST's overlay laid
(tests/unit/test_overlay.py: what is laid, recorded, verified): an altered file refused at both."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import fake_install


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CST_SILLYTAVERN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_cli_verify_and_apply_refusal(project, home: Path) -> None:
    root = fake_install(home)
    project.write("version: 1\ninstances:\n  - port: 18001\n")
    env = {"CST_SILLYTAVERN_HOME": str(home)}
    never = project.cst("st", "verify", env=env)
    assert never.returncode == 2 and "failed: the overlay was never laid over" in never.stderr
    laid = project.cst("st", "install", env=env)
    assert laid.returncode == 0 and "(overlay laid (" in laid.stdout, laid.stderr
    ok = project.cst("st", "verify", env=env)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: sillytavern 1.19.0 at "), ok.stderr
    (root / "node_modules/sillytavern/public/scripts/extensions/third-party/cst-keypool/index.js").write_text("x")
    bad = project.cst("st", "verify", env=env)
    assert bad.returncode == 2
    assert "failed: public/scripts/extensions/third-party/cst-keypool/index.js: changed since it was laid" in bad.stderr
    refused = project.cst("apply", env=env)
    assert refused.returncode == 2
    assert ("failed: sillytavern 1.19.0 (sillytavern 1.19.0 fails verification: public/scripts/extensions/"
            "third-party/cst-keypool/index.js: changed since it was laid") in refused.stdout
    assert "failed: st-instance-18001 (sillytavern 1.19.0 is not ready: sillytavern 1.19.0 fails verification: " \
           "public/scripts/extensions/third-party/cst-keypool/index.js: changed" in refused.stdout
    assert not (project.state_dir / "instances" / "st-instance-18001.json").exists()
