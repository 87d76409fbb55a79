"""Loading the inventory of a large fleet: `inventory.parse` on generated inventories.

Usage: python bench/inventory.py [--hosts 1000,5000,10000] [--services 100]
       [--per-host 10] [--runs 5] [--former-runs 1] [--clock wall|cpu]
Each host runs --per-host of --services services (tests/unit/generated.py builds the
document as fleet/nix/inventory.nix would: checks, secrets, balancers, monitoring). Per
size: the schema validation alone and the whole parse, min and median of --runs runs,
and the parse per host, which stays flat when loading grows linearly. "former" is
jsonschema's whole error search over the valid document, which is what validation cost
before the compiled check (--former-runs 0 skips it: a minute at 10,000 hosts).
--clock cpu counts this process's CPU time instead of the wall clock's, for a machine
that is busy with other work. No lab, no Nix: pure Python, in one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fleet, tests

import jsonschema
import jsonschema.exceptions

from fleet import inventory
from tests.unit.generated import inventory_document

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(work: Callable[[], object], runs: int, clock: Callable[[], float]) -> list[float]:
    times = []
    for _ in range(runs):
        start = clock()
        work()
        times.append(clock() - start)
    return times


def former(document: object) -> None:
    """Validation as it was: jsonschema's best match among all the errors."""
    validator = jsonschema.Draft202012Validator(inventory.schema())
    assert jsonschema.exceptions.best_match(validator.iter_errors(document)) is None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", default="1000,5000,10000")
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--per-host", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--former-runs", type=int, default=1)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    sizes = [int(n) for n in args.hosts.split(",")]
    print(f"{args.services} services, {args.per_host} per host; {args.clock} seconds, "
          f"min / median of {args.runs} runs; former: min of {args.former_runs}")  # fmt: skip
    header = f"{'hosts':>6} {'MB':>5} {'validate':>15} {'parse':>15} {'µs/host':>8} {'former':>8}"
    print(header)
    inventory.parse(inventory_document(3), "warm-up")  # the schema compiled once
    for hosts in sizes:
        document = inventory_document(hosts, args.services, args.per_host)
        size = len(json.dumps(document)) / 1e6
        validate = timed(lambda d=document: inventory.validate(d, "bench"), args.runs, clock)
        parse = timed(lambda d=document: inventory.parse(d, "bench"), args.runs, clock)
        parsed = inventory.parse(document, "bench")
        assert len(parsed.hosts) == hosts
        old = timed(lambda d=document: former(d), args.former_runs, clock)
        median = statistics.median(parse)
        print(
            f"{hosts:>6} {size:>5.1f} "
            f"{min(validate):>7.3f}/{statistics.median(validate):<7.3f} "
            f"{min(parse):>7.3f}/{median:<7.3f} {median / hosts * 1e6:>8.0f} "
            + (f"{min(old):>8.2f}" if old else f"{'-':>8}")
        )


if __name__ == "__main__":
    main()
