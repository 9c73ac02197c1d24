"""Each data dir's real disk use (issue 25): blocks, not apparent sizes, each inode once; walked in
the background by ``cst serve`` (never by a listing) and shown in the API rows, ``/api/status``,
``cst status`` and ``/metrics``."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from conftest import eventually, free_ports, http_status, nest, serve_settings, standin_file, unnest, wait_until
from reconciler.desired.model import load
from reconciler.runtime import disk_use
from reconciler.runtime.disk_use import allocated
from reconciler.runtime.statedir import StateDir
from reconciler.server import disk_watch
from reconciler.server.disk_watch import DiskWatch

MIB = 1 << 20


def _write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        out.write(os.urandom(size))
        out.flush()
        os.fsync(out.fileno())   # allocated now, not at the filesystem's next flush
    return path


def test_disk_use_counts_blocks_each_inode_once_and_never_follows_a_link(tmp_path: Path):
    data = tmp_path / "data"
    assert allocated(data) is None, "no data dir yet"
    data.mkdir()
    empty = allocated(data)
    assert empty is not None and empty < 64 << 10
    chat = _write(data / "chats" / "chat.jsonl", 2 * MIB)
    with_chat = allocated(data)
    assert with_chat is not None and 2 * MIB <= with_chat - empty < 3 * MIB
    os.link(chat, data / "chats" / "same.jsonl")            # one file with two names
    (data / "sparse.bin").open("wb").truncate(1 << 30)     # a gigabyte of holes
    os.symlink("/usr", data / "usr-link")                  # never walked into
    outside = tmp_path / "outside.bin"
    os.link(_write(outside, MIB), data / "from-outside")    # a name inside: its blocks are the data dir's too
    measured = allocated(data)
    assert measured is not None and 3 * MIB <= measured - empty < 4 * MIB, measured - empty

    # folders nested deeper than os.fwalk's recursion reaches: that data dir's walk fails, the
    # others' go on (an instance must not be able to stop cst serve's walks)
    deep = tmp_path / "deep"
    deep.mkdir()
    nest(deep, 1200)
    both = disk_use.measure({"deep": deep, "data": data})
    assert both.use["data"] == measured
    assert "deep" in both.failed or both.use["deep"], "a figure, or a failure said as such"
    unnest(deep)


async def test_the_watch_walks_again_after_a_change_and_every_period_and_retries_a_failed_walk(
        tmp_path: Path, monkeypatch, caplog):
    (port,) = free_ports(1)
    (tmp_path / "desired.yaml").write_text(standin_file([(port, "running")]))
    desired = load(tmp_path / "desired.yaml")
    state = StateDir(desired.settings.state_dir)
    id_ = f"st-instance-{port}"
    data = desired.data_dir(port)
    data.mkdir(parents=True)
    changes: list[int] = []
    watch = DiskWatch(lambda: desired, state, changed=lambda: changes.append(watch.total()), every=0.2)
    assert watch.of(id_) is None and watch.total() == 0 and watch.measured_at is None

    await watch.walk()
    first = watch.of(id_)
    assert first is not None and watch.total() == first and changes == [first]
    assert disk_use.saved(state, 60) == {id_: first}, "saved for cst status"

    real = disk_use.allocated
    failing = {"left": 1}

    def fails_once(path: Path) -> int | None:
        if failing["left"]:
            failing["left"] -= 1
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(disk_use, "allocated", fails_once)
    _write(data / "chat.jsonl", 4 * MIB)
    with caplog.at_level(logging.ERROR, logger="cst.disk"):
        assert await watch.walk() == 0.2
    assert watch.of(id_) == first, "a failed walk keeps the last figure"
    (failure,) = [r for r in caplog.records if r.name == "cst.disk"]
    assert id_ in failure.getMessage() and failure.exc_info is not None, "logged with its traceback"

    async def grown() -> bool:
        return (watch.of(id_) or 0) >= first + 4 * MIB

    running = asyncio.create_task(watch.run())   # the periodic walk picks it up
    try:
        await eventually(grown, timeout=10)
        _write(data / "more.jsonl", 4 * MIB)
        await eventually(lambda: (watch.of(id_) or 0) >= first + 8 * MIB, timeout=10)
    finally:
        running.cancel()
    assert changes[-1] == watch.total()


async def test_a_figure_is_seen_only_once_saved_and_a_cancelled_walk_changes_nothing(tmp_path: Path, monkeypatch):
    """Whoever reads a figure from the watch (the rows, the page's event) finds it in the file `cst
    status` reads too; a walk cancelled while it saves (cst serve stopping) leaves no figure behind
    that nobody was told of."""
    (port,) = free_ports(1)
    (tmp_path / "desired.yaml").write_text(standin_file([(port, "running")]))
    desired = load(tmp_path / "desired.yaml")
    state = StateDir(desired.settings.state_dir)
    desired.data_dir(port).mkdir(parents=True)
    changes: list[int] = []
    watch = DiskWatch(lambda: desired, state, changed=lambda: changes.append(watch.total()), every=60)
    saving, release = threading.Event(), threading.Event()
    real = disk_watch.save

    def slow_save(*args):
        saving.set()
        release.wait(10)
        real(*args)

    monkeypatch.setattr(disk_watch, "save", slow_save)
    walking = asyncio.create_task(watch.walk())
    await eventually(saving.is_set, timeout=10)
    assert watch.of(f"st-instance-{port}") is None and changes == [], "not before it is saved"
    walking.cancel()
    release.set()
    with contextlib.suppress(asyncio.CancelledError):
        await walking
    assert watch.of(f"st-instance-{port}") is None and changes == [] and watch.measured_at is None


def test_disk_use_is_in_the_rows_the_status_and_the_metrics_and_follows_a_write(project, serve):
    api_port, port, stopped_port = free_ports(3)
    project.write(standin_file([(port, "running"), (stopped_port, "stopped")], settings=serve_settings(api_port)))
    id_, stopped_id = f"st-instance-{port}", f"st-instance-{stopped_port}"

    # without cst serve, cst status walks the data dirs itself (there are no saved figures)
    assert project.cst("apply").returncode == 0
    walked = project.status()
    assert walked[id_]["disk"] > 0 and walked[stopped_id]["disk"] is None, "a data dir that does not exist yet"

    served = serve(api_port)
    wait_until(lambda: http_status(port) == 401, timeout=30)

    def rows() -> dict[str, dict]:
        return {row["id"]: row for row in served.api("GET", "/api/instances").json()}

    before = wait_until(lambda: rows()[id_]["disk"], timeout=30)
    status = served.api("GET", "/api/status").json()["disk"]
    assert status["total"] >= before and status["measuredAt"]

    # a file written, then a restart: the data dir is walked again soon after the pass
    _write(project.dir / "user-data" / str(port) / "default-user" / "chats" / "big.jsonl", 8 * MIB)
    assert served.api("POST", f"/api/instances/{id_}/restart").status_code == 200
    after = wait_until(lambda: (rows()[id_]["disk"] or 0) >= before + 8 * MIB and rows()[id_]["disk"], timeout=30)
    assert served.api("GET", "/api/status").json()["disk"]["total"] >= after

    # cst status reads what cst serve measured (no walk of its own while those figures are fresh)
    assert project.status()[id_]["disk"] >= before + 8 * MIB
    text = project.cst("status").stdout
    assert "DISK" in text and "disk used by the data dirs:" in text, text

    scraped = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(served.api("GET", "/metrics").text)
               for s in family.samples}
    assert scraped[("cst_instance_disk_bytes", (("instance", id_),))] >= before + 8 * MIB
    assert ("cst_instance_disk_bytes", (("instance", stopped_id),)) not in scraped, "no data dir: no sample"
    assert scraped[("cst_instances_disk_bytes", ())] == scraped[("cst_instance_disk_bytes", (("instance", id_),))]
