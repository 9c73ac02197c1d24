"""Each exit code of the README's table ("Every command exits with one of three codes"), from the
command as CI would run it: 0 done, 1 invalid input (nothing changed), 2 an action failed."""
from __future__ import annotations

import fcntl
import re
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from reconciler.cli import EXIT_FAILED, EXIT_INVALID, cli

README = Path(__file__).resolve().parents[2] / "README.md"
KEY_ENV = "CST_TEST_EXIT_ADMIN_KEY"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    file = tmp_path / "desired.yaml"
    file.write_text(f"version: 1\nsettings:\n  api: {{admin_key_env: {KEY_ENV}}}\n"
                    "instances:\n  - {port: 8001, state: stopped}\n")
    return file


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env=env)
    assert not isinstance(result.exception, AssertionError), result.output
    return result.exit_code, result.output


def test_the_readme_table_lists_exactly_these_codes() -> None:
    table = re.search(r"\| exit \| meaning \|.*?\n\n", README.read_text(), re.S)
    assert table is not None, "README.md lost its table of exit codes"
    codes = re.findall(r"^\| (\d) \| ([^|]+)", table.group(0), re.M)
    assert [(int(code), meaning.split(":")[0].strip()) for code, meaning in codes] == [
        (0, "done (or, with `--check`, nothing would fail)"), (EXIT_INVALID, "invalid input"),
        (EXIT_FAILED, "an action failed")]


def test_done_is_0(project: Path) -> None:
    assert run("validate", "-f", str(project))[0] == 0
    assert run("apply", "--check", "-f", str(project))[0] == 0


@pytest.mark.parametrize("case", ["file", "argument", "option", "combination", "variable"])
def test_invalid_input_is_1_and_changes_nothing(project: Path, case: str) -> None:
    before = sorted(p.name for p in project.parent.iterdir())
    if case == "file":   # a port used twice
        project.write_text(project.read_text() + "  - {port: 8001, state: stopped}\n")
        code, said = run("apply", "-f", str(project))
        assert "is used twice" in said
    elif case == "argument":   # click's BadParameter, which click itself would exit 2 with
        code, said = run("password", "../x", "-f", str(project))
        assert "is not an instance id" in said
    elif case == "option":   # click's own usage error
        code, said = run("apply", "--no-such-option", "-f", str(project))
        assert "No such option" in said
    elif case == "combination":
        code, said = run("apply", "--remote", "http://127.0.0.1:1", "-f", str(project))
        assert "add --check" in said
    else:   # the admin key's variable is unset
        code, said = run("apply", "--check", "--remote", "http://127.0.0.1:1", "-f", str(project),
                         env={KEY_ENV: ""})
        assert f"{KEY_ENV} (settings.api.admin_key_env) is not set" in said
    assert code == EXIT_INVALID, said
    assert sorted(p.name for p in project.parent.iterdir()) == before


def test_an_unreachable_remote_is_2(project: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    code, said = run("apply", "--check", "--remote", url, "-f", str(project), env={KEY_ENV: "k"})
    assert (code, f"cannot reach {url}" in said) == (EXIT_FAILED, True), said


def test_a_held_state_dir_is_2(project: Path) -> None:
    state = project.parent / ".cst"
    state.mkdir()
    with open(state / "reconcile.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("424242\n")
        held.flush()
        code, said = run("apply", "--wait", "0.2", "-f", str(project))
    assert (code, "held by pid 424242" in said) == (EXIT_FAILED, True), said


def test_an_unreadable_usage_store_is_2(project: Path) -> None:
    port = closed_port()
    project.write_text(project.read_text().replace(
        "settings:\n", f"settings:\n  usage: {{store: 'postgresql://cst@127.0.0.1:{port}/cst', "
                       "store_password_env: CST_TEST_EXIT_STORE}\n", 1))
    code, said = run("usage", "-f", str(project), env={"CST_TEST_EXIT_STORE": "pw"})
    assert (code, "cannot read the usage store" in said) == (EXIT_FAILED, True), said
