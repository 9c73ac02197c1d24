"""Poison desired.yaml files: `cst validate` names file and line; a running `cst serve` reports them,
keeps every instance up and the watcher alive, and applies the next valid save."""
from __future__ import annotations

import os
import random
import re
import threading
import time

import httpx
import pytest

from conftest import free_ports, http_status, serve_settings, standin_file, wait_until

NINE = ", ".join(["*a{}"] * 9)
ALIAS_BOMB = ("version: 1\na0: &a0 [x, x, x, x, x, x, x, x, x]\n"
              + "".join(f"a{i}: &a{i} [{NINE.format(*[i - 1] * 9)}]\n" for i in range(1, 9))).encode()

# name, bytes of desired.yaml, the line the problem is on, words of its message
POISONS = [
    ("complex key", b"version: 1\n? [a, b]\n: 1\n", 2, "a key must be plain text, not a list"),
    ("recursive alias", b"version: 1\na: &a [*a]\n", 2, "refers to a value that contains it"),
    ("bad binary", b"version: 1\nx: !!binary 'zz'\n", 2, "cannot read this value: failed to decode base64"),
    ("control character", b"version: 1\nsettings:\n  state_dir: a\x07b\n", 3, "character U+0007 is not allowed"),
    ("NUL byte", b"version: 1\ninstances: []\n\x00\n", 3, "character U+0000 is not allowed"),
    ("NUL escape", b'version: 1\nsettings: {state_dir: "a\\0b"}\n', 2, "contains a NUL character"),
    ("not UTF-8", b"version: 1\ninstances: []\n# caf\xe9\n", 3, "not UTF-8 text: byte 0xe9 at column 6"),
    ("alias bomb", ALIAS_BOMB, 2, "expands to more than 100000 values"),
    ("deep nesting", b"version: 1\nx: " + b"[" * 20000 + b"]" * 20000 + b"\n", 2, "nested more than 32 levels"),
    ("too big", b"version: 1\n#" + b"x" * 2**20 + b"\n", 1, "more than the limit of 1048576 bytes"),
    ("python tag", b"version: 1\nx: !!python/object/apply:os.system ['true']\n", 2, "is not supported here"),
    ("merge key", b"version: 1\nbase: &b {state: running}\ninstances:\n  - <<: *b\n    port: 8001\n", 4,
     "merge keys (<<) are not supported"),
    ("integer key", b"version: 1\n8001: {state: running}\n", 2, "a key must be text, got an integer 8001"),
    ("unusable duration", b"version: 1\nsettings: {resync: .nan}\n", 2, "settings.resync: nan is out of range"),
]


def located(stderr: str, file: str) -> list[str]:
    """Every line of ``stderr`` that is a located problem; fails on a traceback or any other line."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines and all(re.match(rf"^{re.escape(file)}:[1-9][0-9]*: ", line) for line in lines), stderr
    return lines


@pytest.mark.parametrize("name,data,line,words", POISONS, ids=[p[0] for p in POISONS])
def test_cst_validate_names_file_and_line(project, name, data, line, words):
    project.file.write_bytes(data)
    result = project.cst("validate", timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = located(result.stderr, str(project.file))
    assert any(f.startswith(f"{project.file}:{line}: ") and words in f for f in lines), lines


def test_cst_validate_refuses_a_fifo_without_hanging(project):
    os.mkfifo(project.file)  # reading one would block for ever
    result = project.cst("validate", timeout=30)
    assert result.returncode == 1
    assert located(result.stderr, str(project.file)) == [f"{project.file}:1: not a regular file"]


def random_files(seed: int, count: int) -> list[bytes]:
    """Random bytes, and random arrangements of YAML's punctuation around a valid start."""
    rng = random.Random(seed)
    tokens = ["version: 1\n", "instances:\n", "  - port: ", "8001", ": ", "- ", "[", "]", "{", "}", ",",
              "&a ", "*a", "? ", "!!binary ", "!!int ", "<<: ", "'", '"', "\\", "\n", "  ", "\x00", "\x07",
              "#", "|", "---\n", "~", ".nan", "é"]
    out = []
    for i in range(count):
        if i % 2:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        else:
            out.append("".join(rng.choice(tokens) for _ in range(rng.randrange(1, 40))).encode())
    return out


def test_cst_validate_on_random_files(project):
    for data in random_files(seed=8, count=12):
        project.file.write_bytes(data)
        result = project.cst("validate", timeout=60)
        assert result.returncode in (0, 1), result.stderr
        if result.returncode:
            located(result.stderr, str(project.file))


def save(path, data: bytes) -> None:
    """As an editor saves: a new file renamed over the old one."""
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_serve_reports_each_poison_keeps_instances_up_and_applies_the_next_valid_save(project, serve):
    api, a, b = free_ports(3)
    good = standin_file([(a, "running")], settings=serve_settings(api, "0.5s"))
    project.write(good)
    served = serve(api)
    wait_until(lambda: http_status(a) == 401, timeout=30)
    pid = served.api("GET", f"/api/instances/st-instance-{a}").json()["pid"]
    poisons = [(name, data, words) for name, data, _, words in POISONS]
    # random bytes only: random YAML could be a valid file, which the daemon would rightly enforce
    poisons += [(f"random {i}", data, "") for i, data in enumerate(random_files(seed=9, count=12)) if i % 2]
    reports = "desired.yaml is invalid, keeping the last valid state"
    for name, data, words in poisons:
        logged = served.log.read_text().count(reports)
        save(project.file, data)

        def reported():
            status = served.api("GET", "/api/status").json()
            texts = [p["text"] for p in status["file"]["problems"]]
            fresh = served.log.read_text().count(reports) > logged
            return fresh and not status["file"]["valid"] and any(words in t for t in texts) and status

        status = wait_until(reported, timeout=20)
        assert all(t.startswith(f"{project.file}:") for t in (p["text"] for p in status["file"]["problems"])), name
        assert http_status(a) == 401, f"{name}: the instance must keep running"
    wait_until(lambda: served.api("GET", "/api/status").json()["reconcile"]["lastRun"] is not None)
    status = served.api("GET", "/api/status").json()
    assert status["daemon"]["tasks"]["file-watcher"]["totalFailures"] == 0, "the watcher never died"
    assert served.api("GET", f"/api/instances/st-instance-{a}").json()["pid"] == pid
    assert "Traceback" not in served.log.read_text()

    save(project.file, good.replace("instances:\n", f"instances:\n  - port: {b}\n").encode())
    wait_until(lambda: http_status(b) == 401, timeout=30)
    assert served.api("GET", "/api/status").json()["file"]["valid"] is True
    assert served.api("GET", f"/api/instances/st-instance-{a}").json()["pid"] == pid


def test_put_of_an_alias_bomb_is_refused_while_health_answers(project, serve):
    api, a = free_ports(2)
    project.write(standin_file([(a, "running")], settings=serve_settings(api, "1s")))
    served = serve(api)
    sha = served.api("GET", "/api/desired").json()["sha256"]
    before = project.file.read_bytes()
    health: list[int] = []
    done = threading.Event()

    def poll_health():
        while not done.is_set():
            health.append(httpx.get(served.url + "/health", timeout=5).status_code)
            time.sleep(0.02)   # the poller's pace while the PUTs run, not a wait

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        bomb = served.api("PUT", "/api/desired?lang=en", content=ALIAS_BOMB, headers={"If-Match": sha})
        too_big = served.api("PUT", "/api/desired?lang=en", content=b"version: 1\n#" + b"x" * (3 * 2**19),
                             headers={"If-Match": sha})
        cycle = served.api("PUT", "/api/desired?lang=en", content=b"version: 1\na: &a [*a]\n",
                           headers={"If-Match": sha})
    finally:
        done.set()
        poller.join()
    assert bomb.status_code == 400 and "expands to more than 100000 values" in bomb.json()["error"]
    assert too_big.status_code == 400 and "more than the limit of 1048576 bytes" in too_big.json()["error"]
    assert cycle.status_code == 400 and "contains it (a loop)" in cycle.json()["error"]
    assert health and set(health) == {200}
    assert project.file.read_bytes() == before, "a refused change writes nothing"
