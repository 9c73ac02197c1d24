"""Edits of desired.yaml touch only their own lines; everything a person wrote stays byte for byte."""
import asyncio
import os
from functools import partial

import pytest

from reconciler.desired.edits import EditError, add_instance, remove_instance, set_instance_state
from reconciler.desired.shared_file import ChangeRefused, CurrentFileInvalid, DesiredFile, StaleVersion, sha256
from reconciler.desired.validation import check

COMMENTED = """\
# Our fleet. Reviewed in PR #12.
version: 1

settings:
  state_dir: .cst   # keep out of git
  api: {listen: "127.0.0.1:3000"}

# --- instances -------------------------------------------------
instances:
  # the first customer
  - port: 8001     # alice
    state: running # keep up

  # the second customer, on hold
  - port: 8002     # bob
    state: stopped

  - {port: 8003}   # flow style, carol
# end of instances

accounts: []   # none yet
"""

COMMENTS = [line.split("#", 1)[1] for line in COMMENTED.splitlines() if "#" in line]


@pytest.mark.parametrize("shape,expected", [
    ("version: 1\n", "version: 1\ninstances:\n  - port: 9000\n    state: running\n"),
    ("version: 1\ninstances:\n", "version: 1\ninstances:\n  - port: 9000\n    state: running\n"),
    ("version: 1\ninstances: []\n", "version: 1\ninstances: [{port: 9000, state: running}]\n"),
    ("version: 1\ninstances: [{port: 1}]\n", "version: 1\ninstances: [{port: 1}, {port: 9000, state: running}]\n"),
    ("version: 1\ninstances:\n- port: 8001\n", "version: 1\ninstances:\n- port: 8001\n- port: 9000\n  state: running\n"),
    ("version: 1\ninstances:\n    - port: 8001\n      state: stopped  # x\n# tail\n",
     "version: 1\ninstances:\n    - port: 8001\n      state: stopped  # x\n    - port: 9000\n      state: running\n# tail\n"),
])
def test_add_keeps_the_file_shape(shape, expected):
    assert add_instance(shape, 9000) == expected


def test_set_state_replaces_only_the_value():
    text = set_instance_state(COMMENTED, 8001, "stopped")
    assert text == COMMENTED.replace("state: running # keep up", "state: stopped # keep up")
    text = set_instance_state(COMMENTED, 8003, "stopped")
    assert text == COMMENTED.replace("{port: 8003}", "{port: 8003, state: stopped}")
    text = set_instance_state("version: 1\ninstances:\n  - port: 8001  # a\n", 8001, "stopped")
    assert text == "version: 1\ninstances:\n  - port: 8001  # a\n    state: stopped\n"


def test_remove_takes_only_the_item_lines():
    text = remove_instance(COMMENTED, 8001)
    assert text == COMMENTED.replace("  - port: 8001     # alice\n    state: running # keep up\n", "")
    assert remove_instance("version: 1\ninstances:\n  - port: 8001\n", 8001) == "version: 1\ninstances: []\n"
    assert remove_instance("version: 1\ninstances: [{port: 1}, {port: 2}]\n", 1) == "version: 1\ninstances: [{port: 2}]\n"
    assert remove_instance("version: 1\ninstances: [{port: 1}, {port: 2}]\n", 2) == "version: 1\ninstances: [{port: 1}]\n"


def test_unknown_instance_is_an_edit_error():
    with pytest.raises(EditError):
        set_instance_state(COMMENTED, 9999, "stopped")
    with pytest.raises(EditError):
        remove_instance("version: 1\n", 8001)


def test_ten_mixed_edits_keep_every_comment():
    text = COMMENTED
    for edit in [lambda t: add_instance(t, 8004), lambda t: set_instance_state(t, 8001, "stopped"),
                 lambda t: remove_instance(t, 8003), lambda t: add_instance(t, 8005),
                 lambda t: set_instance_state(t, 8002, "running"), lambda t: add_instance(t, 8006),
                 lambda t: remove_instance(t, 8004), lambda t: set_instance_state(t, 8005, "stopped"),
                 lambda t: set_instance_state(t, 8001, "running"), lambda t: remove_instance(t, 8006)]:
        text = edit(text)
        check(text)
    kept = [c for c in COMMENTS if "carol" not in c]  # carol's line went with her instance
    for comment in kept:
        assert comment in text, comment
    ports = [int(line.split("port:")[1].split()[0].strip("},")) for line in text.splitlines() if "port:" in line]
    assert ports == [8001, 8002, 8005]


async def test_desired_file_refuses_bad_changes_and_stale_replaces(tmp_path):
    path = tmp_path / "desired.yaml"
    path.write_text(COMMENTED)
    os.chmod(path, 0o640)
    desired_file = DesiredFile(path)
    with pytest.raises(ChangeRefused):
        await desired_file.change(lambda t: add_instance(t, 3000))  # the API's port
    assert path.read_text() == COMMENTED
    snapshot = await desired_file.change(lambda t: add_instance(t, 8009))
    assert "port: 8009" in path.read_text() and snapshot.sha256 == sha256(path.read_text())
    assert oct(path.stat().st_mode & 0o777) == "0o640", "an atomic rewrite keeps the file's mode"
    with pytest.raises(StaleVersion):
        await desired_file.replace("version: 1\n", frozenset({sha256(COMMENTED)}))
    path.write_text("version: [\n")
    with pytest.raises(CurrentFileInvalid):
        await desired_file.change(lambda t: add_instance(t, 8010))
    assert path.read_text() == "version: [\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


async def test_concurrent_changes_are_serialized(tmp_path):
    path = tmp_path / "desired.yaml"
    path.write_text("version: 1\ninstances: []\n")
    desired_file = DesiredFile(path)
    await asyncio.gather(*(desired_file.change(partial(add_instance, port=p)) for p in range(9000, 9020)))
    desired = desired_file.read().desired
    assert sorted(i.port for i in desired.instances) == list(range(9000, 9020))


def test_an_edit_reads_the_file_within_the_loaders_limits() -> None:
    from reconciler.desired import edits
    nested = "version: 1\ninstances: " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(edits.EditError, match="nested more than"):   # was RecursionError
        edits.add_instance(nested, 8001, "running")
    assert edits.instance_lines(nested) == {}
