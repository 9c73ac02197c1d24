"""Wake time of a parked instance, side by side for two CST trees: this one and another checkout.

The issue that put the edge in front of instances asked for the wake through the edge against
the wake through cst serve's old front door (commit 8cb61cd, the last before the edge). Each tree
runs its own `bench/density.py` (``Fleet``, ``wake_times``: parked through the API, then the time
to the first byte of a credentialed GET / on the instance's port), on the real SillyTavern 1.19.0,
in alternating rounds so that the machine's load falls on both alike:

    git worktree add /tmp/cst-door 8cb61cd
    CST_SILLYTAVERN_HOME=$PWD/.cache/sillytavern .venv/bin/python bench/wake.py --other /tmp/cst-door

Prints p50 and p99 of each, and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

ROUND = """
import json, sys
sys.path[:0] = [".", "bench"]   # the package reconciler first: bench/ has a reconciler.py of its own
from density import Fleet, free_ports, wait, wake_times
(port,) = free_ports(1)
fleet = Fleet([port], 'version: "1.19.0", start_timeout: 300, park_after: 1h')
try:
    fleet.start_serve()
    wait(lambda: fleet.rows().get(f"st-instance-{port}", {}).get("observed") == "parked", 600, "the instance parked")
    print(json.dumps(wake_times(fleet, port, int(sys.argv[1]))))
finally:
    fleet.close()
"""


def one_round(tree: Path, wakes: int) -> list[float]:
    done = subprocess.run([sys.executable, "-c", ROUND, str(wakes)], cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree)}, timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the round in {tree} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", type=Path, required=True, help="another CST checkout (the old front door)")
    parser.add_argument("--wakes", type=int, default=10, help="wakes per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each tree, alternating")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"other": [], "this": []}
    for _ in range(args.rounds):
        times["other"] += one_round(args.other.resolve(), args.wakes)
        times["this"] += one_round(HERE, args.wakes)
    for name, values in times.items():
        print(f"{name:5} ({len(values)} wakes): p50 {statistics.median(values):.2f} s, p99 {percentile(values, 0.99):.2f} s")
    print(f"ratio this/other: p50 {statistics.median(times['this']) / statistics.median(times['other']):.2f}, "
          f"p99 {percentile(times['this'], 0.99) / percentile(times['other'], 0.99):.2f}")


if __name__ == "__main__":
    main()
