"""desired.yaml shared between CST's writers and everyone else: no save is ever lost."""
from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import pytest

from reconciler.desired import edits, shared_file
from reconciler.desired.restricted import RestrictedChange, refuse_restricted
from reconciler.desired.shared_file import CurrentFileInvalid, DesiredFile, StaleVersion
from reconciler.files import conditional_replace, swap

# no state: line, so no text CST writes (it toggles state:) is ever byte-equal to an editor's save
BODY = "version: 1\nsettings: {state_dir: .cst}\ninstances:\n  - port: 8001\n"
SAVES = 1000
MAX_SAVES = 50_000


def saved(n: int) -> bytes:
    return f"# save {n}\n{BODY}".encode()


def markers(text: bytes | str | None) -> set[int]:
    if text is None:
        return set()
    if isinstance(text, bytes):
        text = text.decode()
    return {int(n) for n in re.findall(r"^# save (\d+)$", text, re.M)}


def toggle(text: str) -> str:
    return edits.set_instance_state(text, 8001, "stopped" if "state: stopped" not in text else "running")


async def test_a_thousand_racing_saves_are_never_lost(tmp_path: Path, monkeypatch) -> None:
    """An editor saves 1,000 times (atomic renames, as editors and git do) while two CST writers
    keep editing the same file. Every save must survive: still in the file, replaced by the
    editor's own next save, or displaced by a CST write and then carried in CST's next write."""
    path = tmp_path / "desired.yaml"
    path.write_bytes(saved(0))
    displaced_by_editor: list[bytes | None] = []
    done = threading.Event()

    def editor() -> None:
        # swap() is an atomic rename that also tells the test what each save replaced. At least
        # SAVES saves, and on until CST has written a few times meanwhile: on a loaded machine the
        # editor's thread may finish its 1,000 before the CST writers get much of a turn
        n = 0
        while n < SAVES or (changes <= 20 and n < MAX_SAVES):
            n += 1
            displaced_by_editor.append(swap(path, saved(n), 0o644))
        done.set()

    cst_swaps: list[tuple[bytes, bytes | None]] = []  # (written, displaced), in order (writers take turns)

    def recorded_swap(target: Path, data: bytes, mode: int) -> bytes | None:
        displaced = swap(target, data, mode)
        cst_swaps.append((data, displaced))
        return displaced

    monkeypatch.setattr(shared_file, "swap", recorded_swap)
    changes = 0

    async def cst_writer(file: DesiredFile) -> None:
        nonlocal changes
        while not done.is_set():
            await file.change(toggle)
            changes += 1
            await asyncio.sleep(0)

    thread = threading.Thread(target=editor)
    thread.start()
    try:
        await asyncio.gather(cst_writer(DesiredFile(path)), cst_writer(DesiredFile(path)))
    finally:
        thread.join()

    saves = {saved(n): n for n in range(len(displaced_by_editor) + 1)}
    survived = {saves[d] for d in displaced_by_editor if d in saves} | markers(path.read_bytes())
    raced = 0
    for i, (written, displaced) in enumerate(cst_swaps):
        n = saves.get(displaced)
        if n is None:
            continue
        survived.add(n)
        if n not in markers(written):  # CST displaced a save it had not built on...
            raced += 1
            assert i + 1 < len(cst_swaps) and n in markers(cst_swaps[i + 1][0]), \
                f"save {n} was displaced by CST and not carried into its next write"
    lost = set(saves.values()) - survived
    assert not lost, f"{len(lost)} saves lost, e.g. {sorted(lost)[:10]}"
    assert changes > 20, "CST wrote while the editor saved"
    assert raced > 0, "some CST writes raced a save (else this test proves nothing)"
    assert not list(tmp_path.glob(".desired.yaml.*.tmp")), "no temporary file left behind"


def test_conditional_replace_puts_back_a_save_it_displaced(tmp_path: Path) -> None:
    path = tmp_path / "desired.yaml"
    path.write_bytes(b"theirs\n")
    assert not conditional_replace(path, b"ours\n", expected=b"what we read\n", mode=0o644)
    assert path.read_bytes() == b"theirs\n"
    assert conditional_replace(path, b"ours\n", expected=b"theirs\n", mode=0o640)
    assert path.read_bytes() == b"ours\n" and path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["desired.yaml"]


async def test_a_foreign_save_the_edit_cannot_apply_to_is_put_back(tmp_path: Path) -> None:
    path = tmp_path / "desired.yaml"
    path.write_bytes(saved(0))
    file = DesiredFile(path)
    garbage = b"version: [unclosed\n"

    def edit_while_someone_saves(text: str) -> str:
        if "# save 0" in text:  # first call: someone saves garbage just before CST writes
            path.write_bytes(garbage)
        return toggle(text)

    with pytest.raises(CurrentFileInvalid):
        await file.change(edit_while_someone_saves)
    assert path.read_bytes() == garbage, "their save is back, untouched"


async def test_replace_is_refused_over_a_newer_version(tmp_path: Path) -> None:
    path = tmp_path / "desired.yaml"
    path.write_bytes(saved(0))
    file = DesiredFile(path)
    read = file.read()
    path.write_bytes(saved(1))
    with pytest.raises(StaleVersion):
        await file.replace(BODY, frozenset({read.sha256}))
    assert path.read_bytes() == saved(1)


@pytest.mark.parametrize("setting, field", [
    ("settings: {sillytavern: {server: /tmp/evil.js}}", "settings.sillytavern.server"),
    ("settings: {proxy: {upstream: 'https://attacker.example/v1'}}", "settings.proxy.upstream"),
    ("settings: {api: {tls: {cert: /etc/ssl/c.pem, key: /etc/ssl/k.pem}}}", "settings.api"),
    ("settings: {data_root: /etc}", "settings.data_root"),
    # where the ledger and the instances' key digests go, and which secret is sent there
    ("settings: {usage: {store: 'postgresql://cst@attacker.example/cst'}}", "settings.usage.store"),
    # where the file is followed from and pushed to
    ("settings: {git: {remote: attacker, push: true}}", "settings.git"),
    # a lower keep deletes snapshots for good
    ("settings: {backups: {keep: 1}}", "settings.backups"),
    ("settings: {usage: {store: 'postgresql://cst@db/cst', store_password_file: /root/.pgpass}}",
     "settings.usage.store_password_file"),
    ("accounts: [{name: a, provider: static, keys_file: /root/.ssh/id_rsa}]", "accounts[0].keys_file"),
    ("accounts: [{name: a, provider: daidai, email: a@b.c, password_env: X, api_base: 'http://evil'}]",
     "accounts[0].api_base"),
])
async def test_restricted_settings_are_refused_and_nothing_is_written(tmp_path: Path, setting, field) -> None:
    path = tmp_path / "desired.yaml"
    path.write_text("version: 1\n")
    file = DesiredFile(path)
    with pytest.raises(RestrictedChange) as refused:
        await file.replace(f"version: 1\n{setting}\n", frozenset({file.read().sha256}), guard=refuse_restricted)
    assert field in refused.value.fields
    assert path.read_text() == "version: 1\n"


async def test_what_the_api_may_change(tmp_path: Path) -> None:
    path = tmp_path / "desired.yaml"
    path.write_text("version: 1\naccounts: [{name: a, provider: static, keys_file: k.txt}]\n")
    file = DesiredFile(path)
    allowed = ("version: 1\nsettings: {concurrency: 2}\n"
               "accounts: [{name: b, provider: static, keys_env: B_KEYS}]\n"   # a removed, b added from env
               "instances: [{port: 8001}]\n")
    await file.replace(allowed, frozenset({file.read().sha256}), guard=refuse_restricted)
    assert path.read_text() == allowed
