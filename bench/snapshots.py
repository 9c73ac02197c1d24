"""Snapshot time and disk used for a data dir of 1,000 chats (issue 15), against a plain full copy.

A data dir in SillyTavern's layout (``default-user/chats/<character>/<chat>.jsonl``: a header
line, then one JSON message a line, a few KiB to 100 KiB each), saved a while ago. Then:

* the first snapshot (``Snapshots.take``): every file copied;
* 1 % of the chats get a new message (appended, as SillyTavern saves a chat), then the second
  snapshot: those copied, the rest hard links to the first snapshot's copies;
* a plain full copy of the same data dir (``shutil.copytree``, what a snapshot without links
  would cost), for comparison.

Disk used is counted in allocated blocks, each inode once (hard links share one), so "new" is
what a snapshot added beyond what was already on disk. Medians of ``--runs`` runs, each on a new
data dir. Files are read from the page cache (just written), as a busy host's recent chats are.

    .venv/bin/python bench/snapshots.py [--runs 5] [--chats 1000] [--dir /var/tmp]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler.runtime.snapshots import Snapshots
from reconciler.runtime.statedir import StateDir

INSTANCE = "st-instance-8001"
CHARACTERS = 40
WORDS = ("the", "tavern", "night", "she", "smiled", "and", "looked", "at", "you", "softly", "forest", "light",
         "*", "said", "\"Hello\"", "sword", "quiet", "rain", "warm", "again", "story", "remember", "door")


def _message(rng: random.Random, name: str, is_user: bool, when: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 220)))
    return json.dumps({"name": name, "is_user": is_user, "is_system": False,
                       "send_date": time.strftime("%B %d, %Y %I:%M%p", time.gmtime(when)), "mes": text,
                       "extra": {"api": "openai", "model": "gpt-4o-mini"} if not is_user else {}},
                      ensure_ascii=False)


def make_data_dir(root: Path, chats: int, seed: int) -> list[Path]:
    """``chats`` chat files of 2 KiB to 100 KiB, dated a day ago; their paths."""
    rng = random.Random(seed)
    made = []
    old = time.time() - 86400
    for n in range(chats):
        character = f"Character {n % CHARACTERS:02d}"
        folder = root / "default-user" / "chats" / character
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{character} - 2025-01-{n % 28 + 1:02d}@{n:04d}h00m00s.jsonl"
        target = rng.randint(2 * 1024, 100 * 1024)
        lines = [json.dumps({"user_name": "User", "character_name": character, "create_date": "2025-01-01",
                             "chat_metadata": {"integrity": f"{rng.getrandbits(64):016x}"}})]
        size, when = len(lines[0]), int(old) - 86400 * 30
        while size < target:
            line = _message(rng, "User" if len(lines) % 2 else character, bool(len(lines) % 2), when)
            lines.append(line)
            size += len(line) + 1
            when += 60
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.utime(path, (old, old))
        made.append(path)
    for folder, _, _ in os.walk(root):
        os.utime(folder, (old, old))
    return made


def disk_used(*roots: Path) -> int:
    """Allocated bytes under ``roots``, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in roots:
        for top, dirs, files in os.walk(root):
            for name in dirs + files:
                st = os.lstat(os.path.join(top, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def one_run(base: Path, chats: int, seed: int) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="cst-bench-snap-", dir=base))
    try:
        data = work / "user-data" / "8001"
        files = make_data_dir(data, chats, seed)
        snapshots = Snapshots(StateDir(work / ".cst"))
        os.sync()

        started = time.perf_counter()
        first = snapshots.take(INSTANCE, data, "scheduled")
        first_s = time.perf_counter() - started
        first_disk = disk_used(first.path)

        rng = random.Random(seed + 1)
        for path in rng.sample(files, max(1, chats // 100)):   # 1 %: a new message in each
            with path.open("a", encoding="utf-8") as chat:
                chat.write(_message(rng, "User", True, int(time.time())) + "\n")
        started = time.perf_counter()
        second = snapshots.take(INSTANCE, data, "scheduled")
        second_s = time.perf_counter() - started
        second_disk = disk_used(first.path, second.path) - first_disk

        started = time.perf_counter()
        shutil.copytree(data, work / "plain-copy", symlinks=True)
        os.sync()   # the snapshot syncs its filesystem before it is renamed into place: same here
        copy_s = time.perf_counter() - started
        copy_disk = disk_used(work / "plain-copy")
        return {"data_mib": disk_used(data) / 2**20, "first_s": first_s, "first_mib": first_disk / 2**20,
                "second_s": second_s, "second_mib": second_disk / 2**20, "second_files": second.files,
                "second_copied_mib": second.bytes_new / 2**20, "copy_s": copy_s, "copy_mib": copy_disk / 2**20}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--chats", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the data dirs are made (its filesystem is what is measured)")
    args = parser.parse_args()
    runs = [one_run(args.dir, args.chats, seed) for seed in range(args.runs)]
    med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    print(f"{args.chats} chats, {med['data_mib']:.1f} MiB on disk, in {args.dir}; medians of {args.runs} runs")
    rows = [
        ("first snapshot (every file copied)", med["first_s"], med["first_mib"]),
        (f"second snapshot, {max(1, args.chats // 100)} chats changed (hard links for the rest)",
         med["second_s"], med["second_mib"]),
        ("plain full copy (shutil.copytree), for comparison", med["copy_s"], med["copy_mib"]),
    ]
    width = max(len(row[0]) for row in rows)
    print(f"{'':{width}}  {'time':>8}  {'new on disk':>12}")
    for label, seconds, mib in rows:
        print(f"{label:{width}}  {seconds * 1000:>6.0f}ms  {mib:>8.2f} MiB")


if __name__ == "__main__":
    main()
