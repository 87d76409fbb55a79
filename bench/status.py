"""`fleet status` on 16 lab hosts: all in parallel against one host after another.

Usage (as root): python bench/status.py [--hosts 16] [--runs 3]
Both measurements go through the same code (flows.status), in one process, after the
inventory is loaded, so the difference is only the parallelism.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("FLEET_LAB_INSTANCE", "8")
os.environ.setdefault("NIX_CONFIG", "substituters =")

from fleet import flows
from fleet.lab import ops
from fleet.lab.layout import Lab


def timed(work: object) -> float:
    start = time.monotonic()
    work()  # type: ignore[operator]
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    lab = Lab.from_env()
    ops.down(lab)
    ops.up(lab, args.hosts, lambda _m: None)
    try:
        session = flows.open_session(str(lab.flake))
        names = list(session.inventory.hosts)
        parallel, sequential, slowest = [], [], []
        for _ in range(args.runs):
            parallel.append(timed(lambda: flows.status(session, [])))
            singles = [timed(lambda n=n: flows.status(session, [n])) for n in names]
            sequential.append(sum(singles))
            slowest.append(max(singles))
        p, s, w = (statistics.median(x) for x in (parallel, sequential, slowest))
        print(f"hosts: {len(names)}, median of {args.runs} runs")
        print(f"fleet status, all hosts in parallel:   {p:6.2f} s")
        print(f"slowest single host's query:           {w:6.2f} s ({p / w:.1f}x of it)")
        print(f"one host after another:                {s:6.2f} s ({s / p:.1f}x the parallel)")
    finally:
        ops.down(lab)


if __name__ == "__main__":
    main()
