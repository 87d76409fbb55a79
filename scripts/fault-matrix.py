#!/usr/bin/env python3
"""Run the whole fault matrix in the lab: every change (deploy, --boot, rollback, the
fleet-wide revert, --reboot, gc), behind a balancer, stopped at every boundary between two
remote steps (the drain included), with every
fault (SIGKILL of the tool, a partition healed after the confirm timeout, a host crash,
a second operator's --break-lock takeover), each followed by the promised recovery and
the invariant on every host. Prints one line per case and the totals.

As root, from the repository: .venv/bin/python scripts/fault-matrix.py [-k SUBSTRING]
It uses lab instance 9 (FLEET_LAB_INSTANCE overrides) and tears it down at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("FLEET_LAB_INSTANCE", "9")
os.environ.setdefault("NIX_CONFIG", "substituters =")

from fleet.lab import ops
from fleet.lab.layout import Lab
from tests.lab.faultmatrix import all_cases, run_case
from tests.lab.fleetrun import assert_safe, set_release


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only cases whose id contains this")
    args = parser.parse_args()
    cases = [c for c in all_cases() if args.k in c.id]
    lab = Lab.from_env()
    ops.down(lab)
    # lab1 to lab3 run lab-web behind lab4's HAProxy: every change drains, and the
    # invariant includes every healthy instance being in rotation.
    ops.up(lab, 4, lambda _m: None, balancers=1)
    held, failed, times = 0, [], []
    recovery: dict[str, list[float]] = {}
    print(f"fault matrix: {len(cases)} cases", flush=True)
    try:
        for case in cases:
            start = time.monotonic()
            try:
                assert_safe(lab)
                seconds = run_case(lab, case)
                set_release(lab, "0")
                held += 1
                recovery.setdefault(case.fault.value, []).append(seconds)
                verdict = f"held (invariant back {seconds:.1f}s after the fault)"
            except Exception as exc:  # one broken case must not hide the others
                failed.append(case.id)
                verdict = f"BROKEN: {exc}".splitlines()[0][:200]
                traceback.print_exc(file=sys.stderr)
                ops.up(lab, None, lambda _m: None)
            elapsed = time.monotonic() - start
            times.append(elapsed)
            print(f"{case.id:<32} {elapsed:6.1f}s  {verdict}", flush=True)
    finally:
        ops.down(lab)
    print(
        f"cases run: {len(cases)}, held: {held}, broken: {len(failed)}"
        + (f" ({', '.join(failed)})" if failed else "")
    )
    for fault, values in sorted(recovery.items()):
        values.sort()
        print(
            f"recovery after {fault}: median {values[len(values) // 2]:.1f}s, "
            f"max {values[-1]:.1f}s (fault injected to invariant holding, {len(values)} cases)"
        )
    if times:
        print(f"time per case: median {sorted(times)[len(times) // 2]:.1f}s, max {max(times):.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
