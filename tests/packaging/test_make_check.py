"""`make check`, the fast tier, in a fresh clone with Python and the venv only: the PATH it runs with
holds make, sh, git and the venv's python, and no chromium, PostgreSQL, nginx, node or npm. It holds
tests/unit to its promise (README: Tests); the clone is of this checkout's HEAD, the venv this one's,
used as it is (make's ``-o``: the marker is old beside the clone's new pyproject.toml, nothing is
installed)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)   # the venv running these tests
# what `make check` itself needs; the tests of tests/unit start only the venv's python
TOOLS = ("make", "sh", "git")
ABSENT = ("chromium", "psql", "pg_ctl", "initdb", "nginx", "node", "npm", "npx", "bwrap")


def test_make_check_passes_in_a_clone_without_the_servers_or_node(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True,
                   capture_output=True)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, f"{tool} is needed to run `make check`"
        (bin_ / tool).symlink_to(found)
    for name in ("python", "python3"):
        (bin_ / name).symlink_to(VENV / "bin" / "python")
    path = str(bin_)
    assert [tool for tool in ABSENT if shutil.which(tool, path=path)] == []

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CST_", "PYTEST_", "PYTHON"))}
    # the clone's code, not the checkout the venv's editable install points at
    env.update(PATH=path, PYTHONPATH=str(clone))
    marker = VENV / "bin" / ".installed"
    done = subprocess.run(["make", "--no-print-directory", "-o", str(marker), "check", f"VENV={VENV}"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "pip install" not in out and "-m venv" not in out, "the venv is used as it is"
    assert f"{VENV}/bin/ruff check ." in out and "All checks passed!" in out
    assert out.count("Success: no issues found") == 2, "mypy over the project, then over the tests"
    assert f"{VENV}/bin/python -m pytest -q tests/unit" in out
    summary = [line for line in out.splitlines() if " passed" in line and " in " in line][-1]
    assert "failed" not in summary and "error" not in summary, summary
