"""What measuring disk use and keeping holes cost (issue 25).

* The background walk of ``cst serve`` (``runtime/disk_use.measure``) over ``--dirs`` data dirs of
  ``--files`` small files each in a few folders (warm page cache, as on a host walked every few
  minutes; a cold cache costs the disk's seeks on top): seconds per walk, on one worker thread.
* A snapshot and a restore of a data dir holding a 1 GiB sparse file with 4 KiB of data: time and
  blocks allocated to the copies.

    .venv/bin/python bench/disk_use.py [--dirs 1000] [--files 200] [--dir /var/tmp]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler.runtime.disk_use import measure
from reconciler.runtime.snapshots import Snapshots
from reconciler.runtime.statedir import StateDir


def data_dirs(root: Path, dirs: int, files: int) -> dict[str, Path]:
    made = {}
    for n in range(dirs):
        data = root / "user-data" / str(10000 + n)
        for f in range(files):
            folder = data / "default-user" / f"folder-{f % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"file-{f}.json").write_bytes(b"x" * 3000)
        made[f"st-instance-{10000 + n}"] = data
    return made


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dirs", type=int, default=1000)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--dir", default=None, help="where to make the data dirs (a real disk, not tmpfs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        dirs = data_dirs(root, args.dirs, args.files)
        times = []
        for _ in range(3):
            began = time.perf_counter()
            measured = measure(dirs)
            times.append(time.perf_counter() - began)
        total = sum(n or 0 for n in measured.use.values())
        print(f"walk of {args.dirs} data dirs x {args.files} files: {min(times):.2f} s (best of 3), "
              f"{total / 2**20:.0f} MiB allocated")

        sparse_dir = root / "sparse" / "data"
        sparse_dir.mkdir(parents=True)
        with open(sparse_dir / "huge.bin", "wb") as huge:
            huge.truncate(1 << 30)
            huge.write(b"y" * 4096)
        snapshots = Snapshots(StateDir(root / "state"))
        began = time.perf_counter()
        snapshot = snapshots.take("st-instance-8001", sparse_dir, "manual")
        took = time.perf_counter() - began
        copy = os.stat(snapshot.tree / "huge.bin")
        began = time.perf_counter()
        snapshots.put_back("st-instance-8001", snapshot.id, sparse_dir, root / "archive")
        restore = time.perf_counter() - began
        back = os.stat(sparse_dir / "huge.bin")
        print(f"1 GiB sparse file (4 KiB of data): snapshot {took * 1000:.0f} ms, {copy.st_blocks * 512} bytes "
              f"allocated; restore {restore * 1000:.0f} ms, {back.st_blocks * 512} bytes allocated")


if __name__ == "__main__":
    main()
