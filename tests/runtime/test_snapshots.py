"""Snapshots and scheduled backups (issue 15): on a fake clock, `keep` and hard links for what did
not change; links never followed; restore through the API and the command line, on the stand-in."""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from conftest import free_ports, http_status, nest, serve_settings, standin_file, wait_until
from reconciler.desired.model import load
from reconciler.runtime.snapshots import Snapshots
from reconciler.runtime.statedir import StateDir
from reconciler.server.snapshot_schedule import BackupScheduler

LONG_AGO = time.time() - 3600   # files SillyTavern saved a while ago (a file changed seconds before a
                                # snapshot is copied again the next time, as git treats "racy" files)


def _chat(data: Path, name: str, text: str) -> Path:
    path = data / "default-user" / "chats" / "Seraphina" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (LONG_AGO, LONG_AGO))
    return path


def test_scheduled_snapshots_keep_link_unchanged_files_and_never_follow_links(project):
    port, stopped_port = free_ports(2)
    project.write(standin_file([(port, "running"), (stopped_port, "stopped")],
                               settings="backups: {every: 1h, keep: 2}"))
    assert project.cst("apply").returncode == 0
    data = project.dir / "user-data" / str(port)
    same = _chat(data, "same.jsonl", '{"mes": "unchanged"}\n' * 200)
    changing = _chat(data, "changing.jsonl", '{"mes": "first"}\n')
    os.chown(same, 12345, 23456)                     # an owner of its own, as an instance user's files
    for top, _, files in os.walk(data):   # what the stand-in wrote as it started too
        for name in files:
            os.utime(os.path.join(top, name), (LONG_AGO, LONG_AGO))
    os.symlink("/etc", data / "etc-link")
    os.mkfifo(data / "pipe")

    desired = load(project.file)
    state = StateDir(desired.settings.state_dir)
    now = [time.time()]
    scheduler = BackupScheduler(lambda: desired, state, clock=lambda: now[0])
    snapshots = Snapshots(state)
    id_, stopped_id = f"st-instance-{port}", f"st-instance-{stopped_port}"

    asyncio.run(scheduler.round())
    (first,) = snapshots.list(id_)
    assert first.reason == "scheduled" and first.bytes_new == first.bytes_total > 0
    assert snapshots.list(stopped_id) == [], "a stopped instance is not snapshotted"
    link = first.tree / "etc-link"
    assert link.is_symlink() and os.readlink(link) == "/etc", "the link itself is recorded"
    assert not (first.tree / "etc-link" / "passwd").resolve().is_relative_to(first.tree), "never followed"
    assert not os.path.lexists(first.tree / "pipe")
    assert snapshots.left_out(first) == [["pipe", "a FIFO, not a regular file"]]
    copy = os.stat(first.tree / same.relative_to(data))
    assert (copy.st_uid, copy.st_gid, copy.st_mode) == (12345, 23456, os.stat(same).st_mode)

    now[0] += 600
    asyncio.run(scheduler.round())
    assert len(snapshots.list(id_)) == 1, "not due yet"

    now[0] += 3600
    asyncio.run(scheduler.round())
    first_, second = snapshots.list(id_)
    assert first_.id == first.id and second.id > first.id
    assert second.bytes_new == 0 < second.bytes_total, "nothing changed: nothing copied"
    a, b = (os.stat(s.tree / same.relative_to(data)) for s in (first, second))
    assert a.st_ino == b.st_ino and b.st_nlink > 1, "an unchanged file is one file on disk"

    _chat(data, "changing.jsonl", '{"mes": "first"}\n{"mes": "second"}\n')
    now[0] += 3600
    asyncio.run(scheduler.round())
    kept = snapshots.list(id_)
    assert [s.id for s in kept][0] == second.id and len(kept) == 2, "keep: 2, the oldest pruned"
    third = kept[1]
    assert not first.path.exists()
    assert third.bytes_new == os.stat(changing).st_size
    old_copy, new_copy = (os.stat(s.tree / changing.relative_to(data)) for s in (second, third))
    assert old_copy.st_ino != new_copy.st_ino, "a changed file is copied"
    assert (third.tree / changing.relative_to(data)).read_text().endswith('"second"}\n')
    assert (second.tree / changing.relative_to(data)).read_text() == '{"mes": "first"}\n'
    assert os.stat(third.tree / same.relative_to(data)).st_ino == b.st_ino
    assert {p.name for p in (state.root / "snapshots" / id_).iterdir()} == {second.id, third.id}, \
        "no temporary folder left"


def _pid(project, id_: str) -> int:
    return project.record(id_)["pid"]


def test_restore_puts_the_old_data_back_keeps_the_replaced_and_refuses_wrong_snapshots(project, serve):
    api_port, port, other_port = free_ports(3)
    project.write(standin_file([(port, "running"), (other_port, "running")],
                               settings=serve_settings(api_port) + "\nbackups: {every: 1h, keep: 3}"))
    data = project.dir / "user-data" / str(port)
    chat = _chat(data, "chat.jsonl", '{"mes": "as it was"}\n')
    served = serve(api_port)
    id_, other = f"st-instance-{port}", f"st-instance-{other_port}"
    # cst serve snapshots each instance once it runs (none was taken before)
    listed = wait_until(lambda: all(served.api("GET", f"/api/instances/{i}/backups").json() for i in (id_, other)),
                        timeout=30)
    assert listed
    (snapshot,) = served.api("GET", f"/api/instances/{id_}/backups").json()
    (others,) = served.api("GET", f"/api/instances/{other}/backups").json()
    assert snapshot["reason"] == "scheduled" and snapshot["instance"] == id_ and snapshot["files"] >= 1
    text = project.cst("backups", id_)
    assert text.returncode == 0 and snapshot["id"] in text.stdout and "scheduled" in text.stdout
    assert json.loads(project.cst("backups", id_, "-o", "json").stdout) == [snapshot]

    chat.write_text('{"mes": "overwritten by {}"}\n')
    pid = _pid(project, id_)

    # wrong snapshots: a clear error, and nothing stopped
    for wrong in ("20990101T000000.000000Z", others["id"], "../" + snapshot["id"], ""):
        answer = served.api("POST", f"/api/instances/{id_}/restore?lang=en", json={"snapshot": wrong})
        assert answer.status_code == (400 if wrong == "" else 404), answer.text
        assert "error" in answer.json()
    answer = served.api("POST", f"/api/instances/{id_}/restore?lang=en", json={"snapshot": others["id"]})
    assert "nothing was stopped" in answer.json()["error"]
    refused = project.cst("restore", id_, others["id"])
    assert refused.returncode == 1 and f"{id_} has no snapshot {others['id']}" in refused.stderr
    assert served.api("POST", "/api/instances/st-instance-1/restore", json={"snapshot": snapshot["id"]}).status_code == 404
    assert _pid(project, id_) == pid and http_status(port) == 401, "the instance was never stopped"

    answer = served.api("POST", f"/api/instances/{id_}/restore?lang=en", json={"snapshot": snapshot["id"]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "online" and body["snapshot"] == snapshot["id"]
    replaced = Path(body["replaced"])
    assert replaced.parent == project.state_dir.resolve() / "archive" and replaced.name.startswith(f"{id_}-replaced-")
    assert (replaced / chat.relative_to(data)).read_text() == '{"mes": "overwritten by {}"}\n'
    assert chat.read_text() == '{"mes": "as it was"}\n'
    snapshot_copy = project.state_dir / "snapshots" / id_ / snapshot["id"] / "data" / chat.relative_to(data)
    assert os.stat(chat).st_ino != os.stat(snapshot_copy).st_ino, "a copy: the snapshot stays as it was"
    wait_until(lambda: http_status(port) == 401, timeout=15)
    assert _pid(project, id_) != pid, "it runs again, restarted on the restored data"
    assert _pid(project, other) and http_status(other_port) == 401

    # the command line does the same
    chat.write_text("changed again\n")
    again = project.cst("restore", id_, snapshot["id"])
    assert again.returncode == 0, again.stderr
    assert "running again" in again.stdout and "replaced" in again.stdout
    assert chat.read_text() == '{"mes": "as it was"}\n'
    wait_until(lambda: http_status(port) == 401, timeout=15)


def test_keep_zero_is_an_error_with_its_line(project):
    project.write(standin_file([], settings="backups:\n  every: 24h\n  keep: 0"))
    result = project.cst("validate")
    assert result.returncode == 1
    assert f"{project.file}:6: settings.backups.keep: 0 is less than the minimum of 1" in result.stderr + result.stdout


def test_a_sparse_file_stays_sparse_in_its_snapshot_and_after_a_restore(tmp_path: Path):
    """An instance can make a terabyte out of nothing (``truncate -s``): copied byte by byte, root's
    scheduled snapshots and restores would fill the host's disk with its zeros (issue 25)."""
    data = tmp_path / "user-data" / "8001"
    data.mkdir(parents=True)
    sparse = data / "default-user" / "huge.bin"
    sparse.parent.mkdir()
    with open(sparse, "wb") as out:
        out.truncate(1 << 30)
        out.seek(512 << 20)
        out.write(b"data in the middle of the holes")   # one extent of data among the holes
    os.utime(sparse, (LONG_AGO, LONG_AGO))
    os.chmod(sparse, 0o640)
    before = os.stat(sparse)
    assert before.st_blocks * 512 < 1 << 20, "the filesystem keeps holes (the test means nothing otherwise)"
    snapshots = Snapshots(StateDir(tmp_path / ".cst"))

    snapshot = snapshots.take("st-instance-8001", data, "manual")
    copy = os.stat(snapshot.tree / "default-user" / "huge.bin")
    assert copy.st_size == 1 << 30 and copy.st_blocks <= before.st_blocks + 8, "holes stay holes"
    assert (copy.st_mode, copy.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)
    assert snapshot.bytes_total >= 1 << 30 and snapshot.bytes_new < 1 << 20, "only the data was copied"

    sparse.write_bytes(b"replaced")
    snapshots.put_back("st-instance-8001", snapshot.id, data, tmp_path / ".cst" / "archive")
    restored = os.stat(sparse)
    assert restored.st_size == 1 << 30 and restored.st_blocks <= before.st_blocks + 8, "a restore keeps them too"
    assert (restored.st_mode, restored.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)
    with open(sparse, "rb") as back:
        assert back.read(4096) == bytes(4096)
        back.seek(512 << 20)
        assert back.read(31) == b"data in the middle of the holes"
        back.seek((1 << 30) - 4096)
        assert back.read() == bytes(4096)


def test_a_data_dir_nested_too_deep_is_an_error_of_its_own_not_a_crash(tmp_path: Path):
    """Folders nested deeper than Python 3.11's os.fwalk can recurse: a snapshot of it and the
    start that gives it to its user are OSErrors (what the backup task, a rollout and a pass
    handle as that instance's failure), never a RecursionError; the half-taken snapshot is removed
    all the same, and so is such a tree (read-only folders too)."""
    import errno

    import pytest

    from reconciler.runtime import instance_users, tree_walk
    data = tmp_path / "data"
    data.mkdir()
    (data / "chat.jsonl").write_text("{}\n")
    nest(data, 1200)
    snapshots = Snapshots(StateDir(tmp_path / "state"))
    with pytest.raises(OSError) as taken:
        snapshots.take("st-instance-8001", data, "scheduled")
    assert taken.value.errno == errno.ELOOP and str(data) in str(taken.value)
    assert os.listdir(snapshots.folder("st-instance-8001")) == [], "no half snapshot left behind"
    with pytest.raises(OSError) as owned:
        instance_users.own_tree(data, instance_users.InstanceUser(2_000_008_001, 2_000_008_001))
    assert owned.value.errno == errno.ELOOP
    (data / "d").chmod(0o500)
    tree_walk.remove(data)
    assert not data.exists()
