"""How long one instance is unavailable during its turn of a rollout (issue 15).

One instance on the real SillyTavern 1.18.0 is moved to 1.19.0 by `cst apply`; a watcher asks its
port every 10 ms and measures how long it does not answer (from the stop to the new release's
first answer; the snapshot before and the `pause` after are not downtime). Median of --runs.

    .venv/bin/python bench/rollout.py --runs 3
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from ports import free_port  # noqa: E402

CST = [sys.executable, "-m", "reconciler"]


def answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 401
    except httpx.HTTPError:
        return False


def one_run(chats: int) -> tuple[float, float]:
    folder = Path(tempfile.mkdtemp(prefix="cst-bench-rollout-"))
    os.chmod(folder, 0o755)
    port = free_port()
    desired = folder / "desired.yaml"

    def write(version: str) -> None:
        desired.write_text(f'version: 1\nsettings:\n  sillytavern: {{version: "{version}", start_timeout: 180, '
                           f'rollout: {{pause: 1s}}}}\ninstances:\n  - port: {port}\n')

    def cst(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CST, *args, "-f", str(desired)], cwd=ROOT, capture_output=True, text=True,
                              timeout=900, check=False)
    try:
        write("1.18.0")
        assert cst("st", "install").returncode == 0
        assert cst("apply").returncode == 0
        chat_dir = folder / "user-data" / str(port) / "default-user" / "chats" / "Seraphina"
        chat_dir.mkdir(parents=True, exist_ok=True)
        for n in range(chats):
            (chat_dir / f"chat-{n}.jsonl").write_text('{"mes": "hello"}\n' * 50)
        write("1.19.0")
        down: list[float] = []
        stop = threading.Event()

        def watch() -> None:
            since = None
            while not stop.is_set():
                up = answers(port)
                now = time.monotonic()
                if not up and since is None:
                    since = now
                elif up and since is not None:
                    down.append(now - since)
                    since = None
                stop.wait(0.01)   # the sampling period
        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.monotonic()
        moved = cst("apply")
        whole = time.monotonic() - started
        stop.set()
        watcher.join()
        assert moved.returncode == 0, moved.stdout + moved.stderr
        return sum(down), whole
    finally:   # the instance removed (its data archived in the temporary state dir), then all of it
        desired.write_text("version: 1\ninstances: []\n")
        subprocess.run([*CST, "apply", "-f", str(desired)], cwd=ROOT, capture_output=True, check=False)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chats", type=int, default=1000)
    args = parser.parse_args()
    results = [one_run(args.chats) for _ in range(args.runs)]
    downs = [d for d, _ in results]
    wholes = [w for _, w in results]
    print(f"one instance's turn, 1.18.0 -> 1.19.0, {args.chats} chats, {args.runs} runs")
    print(f"  unavailable: median {statistics.median(downs):.2f} s (runs: {', '.join(f'{d:.2f}' for d in downs)})")
    print(f"  whole turn (snapshot, stop, start, 1 s pause): median {statistics.median(wholes):.2f} s")


if __name__ == "__main__":
    main()
