"""Log rotation while an instance keeps writing, and while another CST rotates the same log
(issue 17, defect 7): no line lost or repeated, in the rotated copies, the live file, or a
follower's stream; one rotation per overflow."""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import AsyncGenerator, cast

import pytest

import reconciler
from conftest import wait_until
from reconciler.runtime import logs
from reconciler.runtime.logfollow import follow, last_lines
from reconciler.runtime.logs import rotate_log

COLLAPSE_RANGE = 0x08  # linux/falloc.h FALLOC_FL_COLLAPSE_RANGE
KEEP = 500  # more generations than any test makes: none is dropped, so every line is somewhere
LINE = b"%09d\n"

# Writes numbered lines as fast as it can through its own O_APPEND descriptor, as node does,
# from argv[2] (0) on, until SIGTERM; then prints the next number (how many lines there are).
WRITER = r"""
import os, signal, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
stop = False
def halt(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, halt)
i = int(sys.argv[2]) if len(sys.argv) > 2 else 0
while not stop:
    os.write(fd, b"%09d\n" % i)
    i += 1
print(i, flush=True)
"""

# Another CST: rotates the log each time it reads "go" and answers 1 (rotated) or 0; with
# "loop" it rotates every millisecond until the stop file exists, then prints how often it did.
ROTATOR = r"""
import os, sys, time
from pathlib import Path
from reconciler.runtime.logs import rotate_log
log, max_bytes, keep = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print("ready", flush=True)
for command in sys.stdin:
    if command.strip() == "go":
        print(int(rotate_log(log, max_bytes, keep)), flush=True)
    elif command.strip() == "loop":
        done = 0
        while not os.path.exists(sys.argv[4]):
            done += rotate_log(log, max_bytes, keep)
            time.sleep(0.001)  # the rotator's pace: a rotation every millisecond or so
        print(done, flush=True)
"""


@pytest.fixture
def spawn() -> Iterator:
    """Start Python helpers importing this checkout's ``reconciler``; each is killed (by its pid) after the test."""
    started: list[subprocess.Popen] = []
    env = {**os.environ, "PYTHONPATH": str(Path(reconciler.__file__).resolve().parent.parent)}

    def start(script: str, *args: object, stdin: int | None = None) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=stdin,
                                stdout=subprocess.PIPE, text=True, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream:
                stream.close()


def _can_collapse(folder: Path) -> bool:
    """Whether the filesystem under ``folder`` cuts a file's first block in place (ext4, xfs)."""
    probe = folder / "collapse-probe"
    probe.write_bytes(b"x" * (3 * os.statvfs(folder).f_bsize))
    fd = os.open(probe, os.O_RDWR)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.fallocate(fd, COLLAPSE_RANGE, ctypes.c_int64(0),
                              ctypes.c_int64(os.statvfs(folder).f_bsize)) == 0
    finally:
        os.close(fd)
        probe.unlink()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    if not _can_collapse(tmp_path):
        pytest.skip("this filesystem cannot collapse a range; rotation falls back to copy and truncate, "
                    "which may lose a line by design")
    return tmp_path / "st-instance-8001.log"


def _generations(log: Path) -> list[Path]:
    """The rotated copies, oldest first."""
    found = sorted((p for p in log.parent.iterdir() if p.name.startswith(log.name + ".")
                    and p.name[len(log.name) + 1:].isdigit()), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    return found[::-1]


def _everything(log: Path) -> bytes:
    return b"".join(p.read_bytes() for p in _generations(log)) + log.read_bytes()


def _check_lines(data: bytes, count: int) -> None:
    """Every numbered line 0..count-1 exactly once, in order; says how many were lost or repeated."""
    got = data.split(b"\n")
    assert got[-1] == b"", "the text ends with a whole line"
    numbers = [int(line) for line in got[:-1]]
    if numbers != list(range(count)):
        lost = count - len(set(numbers) & set(range(count)))
        repeated = len(numbers) - len(set(numbers))
        raise AssertionError(f"{lost} of {count} lines lost, {repeated} repeated")


def _stop(writer: subprocess.Popen) -> int:
    writer.terminate()
    count = int(writer.stdout.readline())
    assert writer.wait(10) == 0
    return count


def test_no_line_is_lost_while_the_writer_keeps_writing(log_path: Path, spawn) -> None:
    writer = spawn(WRITER, log_path)
    wait_until(lambda: log_path.exists() and log_path.stat().st_size > 0)
    rotations = 0
    deadline = time.monotonic() + 20
    while rotations < 60 and time.monotonic() < deadline:
        rotations += rotate_log(log_path, 8192, KEEP)
    count = _stop(writer)
    assert rotations == 60 and len(_generations(log_path)) == 60
    _check_lines(_everything(log_path), count)
    for path in [log_path, *_generations(log_path)]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_two_rotators_make_one_rotation_of_one_overflow(log_path: Path, spawn) -> None:
    max_bytes = 64 * 1024
    rotators = [spawn(ROTATOR, log_path, max_bytes, KEEP, stdin=subprocess.PIPE) for _ in range(2)]
    for rotator in rotators:
        assert rotator.stdout.readline() == "ready\n"
    written = 0
    with open(log_path, "ab") as out:
        for round_ in range(20):
            # an overflow of several blocks, so both rotators find the log over its cap
            out.write(b"".join(LINE % i for i in range(written, written + 40_000)))
            out.flush()
            written += 40_000
            for rotator in rotators:
                rotator.stdin.write("go\n")
                rotator.stdin.flush()
            answers = [int(rotator.stdout.readline()) for rotator in rotators]
            assert sorted(answers) == [0, 1], f"round {round_}: rotated {sum(answers)} times for one overflow"
    assert len(_generations(log_path)) == 20
    _check_lines(_everything(log_path), written)


def test_two_rotators_and_a_writer_lose_nothing(log_path: Path, tmp_path: Path, spawn) -> None:
    max_bytes = 8192
    stop = tmp_path / "stop"
    rotators = [spawn(ROTATOR, log_path, max_bytes, KEEP, stop, stdin=subprocess.PIPE) for _ in range(2)]
    for rotator in rotators:
        assert rotator.stdout.readline() == "ready\n"
    writer = spawn(WRITER, log_path)
    wait_until(lambda: log_path.exists() and log_path.stat().st_size > 0)
    for rotator in rotators:
        rotator.stdin.write("loop\n")
        rotator.stdin.flush()
    wait_until(lambda: len(_generations(log_path)) >= 60, timeout=20)
    stop.touch()
    rotations = sum(int(rotator.stdout.readline()) for rotator in rotators)
    count = _stop(writer)
    _check_lines(_everything(log_path), count)
    generations = _generations(log_path)
    assert rotations == len(generations), "two rotators shifted the copies at once"
    # a rotation only for an overflow: each copy holds at least the cap (a second rotation of
    # the same overflow would copy the few bytes written since the first)
    assert min(p.stat().st_size for p in generations) >= max_bytes


async def test_followers_see_each_line_once_across_rotations(log_path: Path, spawn) -> None:
    """One follower reads as lines come; another (a slow client) only once the writing is over,
    by then many rotations behind."""
    log_path.write_bytes(b"".join(LINE % i for i in range(10)))
    live, late = follow(log_path, 10, poll=0.005), follow(log_path, 10, poll=0.005)
    got = {live: [await live.__anext__()], late: [await late.__anext__()]}  # the first ten: both have their offsets
    writer = spawn(WRITER, log_path, 10)
    done = threading.Event()
    rotations = []

    def rotate() -> None:
        while not done.is_set():
            rotations.append(rotate_log(log_path, 8192, KEEP))
            done.wait(0.002)   # a rotation every 2 ms while the writer writes

    length: list[int] = []  # known once the writer stopped

    async def read_on(reader) -> None:
        while not length or sum(map(len, got[reader])) < length[0]:
            got[reader].append(await reader.__anext__())

    rotator = threading.Thread(target=rotate)
    rotator.start()
    reading = asyncio.ensure_future(read_on(live))
    try:
        await asyncio.to_thread(wait_until, lambda: sum(rotations) >= 30, 20)
    finally:
        done.set()
        await asyncio.to_thread(rotator.join)
        count = _stop(writer)
    length.append(count * len(LINE % 0))
    for reader, task in ((live, reading), (late, asyncio.ensure_future(read_on(late)))):
        with contextlib.suppress(TimeoutError):   # it lost lines and waits for more: _check_lines says how many
            await asyncio.wait_for(task, 10)
        await cast(AsyncGenerator[bytes, None], reader).aclose()   # follow() is an async generator
    assert len(_generations(log_path)) == sum(rotations) >= 30
    _check_lines(b"".join(got[live]), count)
    _check_lines(b"".join(got[late]), count)


def test_last_lines_just_after_a_rotation_come_whole_from_the_copy(log_path: Path) -> None:
    log_path.write_bytes(b"".join(LINE % i for i in range(1000)))  # 10,000 bytes: cut at 8192
    assert rotate_log(log_path, 9000, 2)
    assert log_path.stat().st_size == 10_000 - 8192
    text, end, _ = last_lines(log_path, 300)
    assert text == b"".join(LINE % i for i in range(700, 1000)) and end == 10_000 - 8192


def test_without_collapse_it_copies_and_truncates_and_says_so_once(tmp_path: Path, monkeypatch, caplog) -> None:
    def unsupported(*_: object) -> int:
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(logs, "_fallocate", unsupported, raising=False)
    monkeypatch.setattr(logs, "_said_fallback", False, raising=False)
    log = tmp_path / "i.log"
    caplog.set_level("INFO", "cst.logs")
    for round_ in range(2):
        log.write_bytes(b"".join(LINE % i for i in range(2000 * round_, 2000 * round_ + 2000)))
        assert rotate_log(log, 1000, 3)
        assert log.stat().st_size == 0
    assert _everything(log) == b"".join(LINE % i for i in range(4000))
    assert stat.S_IMODE((tmp_path / "i.log.1").stat().st_mode) == 0o600
    said = [r.getMessage() for r in caplog.records if r.name == "cst.logs"]
    assert len(said) == 1 and "cannot cut a log in place" in said[0]


def test_under_the_cap_or_missing_nothing_happens(tmp_path: Path) -> None:
    log = tmp_path / "i.log"
    assert not rotate_log(log, 10, 3)
    log.write_bytes(b"short\n")
    assert not rotate_log(log, 10, 3)
    assert log.read_bytes() == b"short\n" and _generations(log) == []
