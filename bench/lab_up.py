"""Time `fleet lab up` to every host answering ssh (with its pinned key), warm and cold.

Usage (as root): python bench/lab_up.py [--hosts 8] [--runs 3] [--cold]
Warm: the Debian root is cached. Cold: the cache is removed first, so debootstrap runs.
Runs on its own lab instance, so an operator's lab is left alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

os.environ.setdefault("FLEET_LAB_INSTANCE", "9")
os.environ.setdefault("NIX_CONFIG", "substituters =")

from fleet.lab import ops, rootfs
from fleet.lab.layout import Lab


def timed_up(lab: Lab, hosts: int) -> float:
    ops.down(lab)
    start = time.monotonic()
    states = ops.up(lab, hosts, lambda _m: None)
    elapsed = time.monotonic() - start
    assert all(s.ssh for s in states), states
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold", action="store_true")
    args = parser.parse_args()
    lab = Lab.from_env()
    try:
        if args.cold:
            shutil.rmtree(lab.cache / f"rootfs-{rootfs.cache_key()}", ignore_errors=True)
            print(f"cold  lab up --hosts {args.hosts}: {timed_up(lab, args.hosts):6.1f} s")
        warm = [timed_up(lab, args.hosts) for _ in range(args.runs)]
        print(
            f"warm  lab up --hosts {args.hosts}: median {statistics.median(warm):.2f} s, "
            f"min {min(warm):.2f} s, max {max(warm):.2f} s over {args.runs} runs"
        )
    finally:
        ops.down(lab)


if __name__ == "__main__":
    main()
