"""Backups of a data dir: only its own regular files, a manifest of the rest, never a corrupt zip with a 200."""
from __future__ import annotations

import io
import os
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from conftest import free_ports, http_status, serve_settings, standin_file, wait_until
from reconciler.desired.shared_file import DesiredFile
from reconciler.runtime.data_zip import MANIFEST
from reconciler.server import api
from reconciler.server.daemon import Daemon

# root reads every file whatever its mode: without these capabilities a 000 file is unreadable to it too
AS_PLAIN_USER = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search") if os.geteuid() == 0 else ()


def test_backup_holds_only_the_data_dirs_own_regular_files(project, serve):
    api_port, port = free_ports(2)
    # cst serve as root without the DAC override cannot reach an instance's own 0700 folders: the
    # instance runs as cst's user here, which is what this test is about (the zip, not isolation)
    text = standin_file([(port, "running")], settings=serve_settings(api_port))
    project.write(text.replace("stop_timeout: 3}", "stop_timeout: 3, users: {isolate: false}}", 1))
    served = serve(api_port, prefix=AS_PLAIN_USER)
    wait_until(lambda: http_status(port) == 401, timeout=30)
    data = project.dir / "user-data" / str(port)
    chats = data / "default-user" / "chats"
    chats.mkdir(parents=True)
    (chats / "chat.jsonl").write_text('{"mes": "hello"}\n' * 500)
    os.symlink("/etc", data / "etc-link")                      # a folder outside
    os.symlink("/etc/hostname", chats / "hostname-link")      # a file outside
    os.mkfifo(chats / "pipe")                                  # would hang a plain open()
    secret = chats / "unreadable.txt"
    secret.write_text("not for the zip")
    secret.chmod(0)
    locked = data / "locked"                                   # a folder it cannot enter
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "f.txt").write_text("x")
    locked.chmod(0)
    old = chats / "old.txt"
    old.write_text("from 1970")
    os.utime(old, (0, 0))

    started = time.monotonic()
    response = served.api("GET", f"/api/instances/st-instance-{port}/backup")
    assert response.status_code == 200
    assert time.monotonic() - started < 60, "the FIFO did not hang the zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.testzip() is None
    names = set(archive.namelist())
    assert {"default-user/chats/chat.jsonl", "default-user/chats/old.txt", MANIFEST} <= names
    assert not any(n.startswith(("etc-link", "locked")) or "hostname" in n or n.endswith(("pipe", "unreadable.txt"))
                   for n in names), names
    assert archive.getinfo("default-user/chats/old.txt").date_time == (1980, 1, 1, 0, 0, 0)
    assert archive.read("default-user/chats/old.txt") == b"from 1970"
    listed = dict(line.split("\t") for line in archive.read(MANIFEST).decode().splitlines() if "\t" in line)
    assert listed == {
        "etc-link": "a symbolic link (not followed)",
        "default-user/chats/hostname-link": "a symbolic link (not followed)",
        "default-user/chats/pipe": "a FIFO, not a regular file",
        "default-user/chats/unreadable.txt": "not readable (permission denied)",
        "locked/": "not readable (permission denied)",
    }
    assert "left out 5 files or folders" in served.log.read_text()


def test_a_backup_without_anything_left_out_has_no_manifest(project, serve):
    api_port, port = free_ports(2)
    project.write(standin_file([(port, "running")], settings=serve_settings(api_port)))
    served = serve(api_port)
    wait_until(lambda: http_status(port) == 401, timeout=30)
    response = served.api("GET", f"/api/instances/st-instance-{port}/backup")
    assert MANIFEST not in zipfile.ZipFile(io.BytesIO(response.content)).namelist()


@pytest.mark.parametrize("fails", [True, False])
async def test_an_error_mid_stream_fails_the_download(tmp_path: Path, monkeypatch, fails: bool):
    """The real API app in this process, with the zip made to fail after its first megabyte."""
    (api_port,) = free_ports(1)
    (tmp_path / "desired.yaml").write_text(f"version: 1\ninstances: [{{port: {api_port + 1}}}]\n")
    (tmp_path / "user-data" / str(api_port + 1)).mkdir(parents=True)
    file = DesiredFile(tmp_path / "desired.yaml")

    async def zip_stream(root: Path, left_out: list):
        yield b"PK\x03\x04" + os.urandom(1 << 20)
        if fails:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(api, "zip_stream", zip_stream)
    runner = api.web.AppRunner(api.make_app(Daemon(file, file.read()), "key"))
    await runner.setup()
    await api.web.TCPSite(runner, "127.0.0.1", api_port).start()
    try:
        async with httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{api_port}/api/instances/st-instance-{api_port + 1}/backup"
            async with client.stream("GET", url, headers={"X-ST-Admin-Key": "key"}) as response:
                assert response.status_code == 200
                if fails:
                    with pytest.raises(httpx.RemoteProtocolError):
                        await response.aread()
                else:
                    assert len(await response.aread()) == 4 + (1 << 20)
    finally:
        await runner.cleanup()


def test_a_sparse_file_is_left_out_of_the_zip_and_the_manifest_says_why(project, serve):
    """Its holes would stream as zeros: a ``truncate -s 1T`` in a data dir would be a terabyte."""
    api_port, port = free_ports(2)
    project.write(standin_file([(port, "running")], settings=serve_settings(api_port)))
    served = serve(api_port)
    wait_until(lambda: http_status(port) == 401, timeout=30)
    data = project.dir / "user-data" / str(port)
    with open(data / "huge.bin", "wb") as huge:
        huge.truncate(1 << 30)
        huge.write(b"some data at its start")
    with open(data / "tail.bin", "wb") as tail:   # a few holes: zipped whole, zeros and all
        tail.write(b"x" * 4096)
        tail.truncate(4096 + (256 << 10))
    assert os.stat(data / "huge.bin").st_blocks * 512 < 1 << 20, "the filesystem keeps holes"

    started = time.monotonic()
    response = served.api("GET", f"/api/instances/st-instance-{port}/backup")
    assert response.status_code == 200
    assert len(response.content) < 1 << 20 and time.monotonic() - started < 30, "the holes were not read"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.read("tail.bin") == b"x" * 4096 + bytes(256 << 10)
    assert "huge.bin" not in archive.namelist()
    listed = dict(line.split("\t") for line in archive.read(MANIFEST).decode().splitlines() if "\t" in line)
    assert listed == {"huge.bin": "a sparse file (1024.0 MiB, 0.0 MiB of it data): its holes would be zipped, "
                                  "and unzipped, as zeros"}
