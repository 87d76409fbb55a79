"""How fast `fleet` starts: per command, the wall time from process start to its first Nix call.

Usage: python bench/startup.py [--runs 10] [--repo CHECKOUT] [COMMAND ...]
A stub `nix` and `nix-store` first on PATH record when they are started and fail with one
line, so that each command stops right after the point measured: what it loaded before
it could ask Nix anything. A command that calls no Nix (--help, --version) is timed to
its exit; so is the floor, a bare `python -c pass`. The flake is a minimal local one and
the operator's config is empty, so the figures are the tool's own. Prints the median of
--runs runs per command in ms, and the CPU time of the whole run (to the exit), which a
busy machine changes less than the wall clock. No lab, no Nix, no root.
"""

from __future__ import annotations

import argparse
import compileall
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR = "python -c pass"

# Each command as an operator would type it (after `fleet --flake FLAKE`).
COMMANDS: dict[str, tuple[str, ...]] = {
    "--help": ("--help",),
    "--version": ("--version",),
    "status": ("status",),
    "deploy": ("deploy",),
    "rollback": ("rollback", "--yes"),
    "history": ("history",),
    "exec": ("exec", "--", "true"),
    "report": ("report", "--html", "{tmp}/report.html"),
    "health": ("health",),
    "gc": ("gc", "--keep", "3"),
    "diff": ("diff",),
}

# Bash's clock, read without a child process: the stub's start is the moment measured.
STUB = """#!/bin/bash
echo "$EPOCHREALTIME" >> "$FLEET_BENCH_STAMPS"
echo "$(basename "$0"): a stub of bench/startup.py" >&2
exit 1
"""


def _once(
    argv: Sequence[str], env: Mapping[str, str], stamps: Path, repo: Path
) -> tuple[float, float]:
    """Seconds from the start of ``argv`` to its first Nix call (else to its exit), and the
    CPU seconds of its whole run."""
    stamps.write_text("")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()  # the realtime clock, as bash's EPOCHREALTIME
    subprocess.run(argv, env=dict(env), cwd=repo, capture_output=True, check=False)
    end = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    first = stamps.read_text().split()
    return (float(first[0]) if first else end) - start, cpu


def measure(
    commands: Mapping[str, Sequence[str]] = COMMANDS, runs: int = 10, repo: Path = REPO
) -> dict[str, list[tuple[float, float]]]:
    """Per command (and the floor), each run's (wall, CPU) seconds as ``_once`` has them,
    running the fleet of the checkout ``repo``, byte-compiled first as an installed tool is
    (an environment with PYTHONDONTWRITEBYTECODE would compile it on every start)."""
    compileall.compile_dir(str(repo / "fleet"), quiet=1)
    with tempfile.TemporaryDirectory(prefix="fleet-startup-") as scratch:
        tmp = Path(scratch)
        (tmp / "bin").mkdir()
        for name in ("nix", "nix-store"):
            (tmp / "bin" / name).write_text(STUB)
            (tmp / "bin" / name).chmod(0o755)
        (tmp / "flake").mkdir()
        (tmp / "flake" / "flake.nix").write_text("{ outputs = { self }: { }; }\n")
        stamps = tmp / "stamps"
        env = {
            **os.environ,
            "PATH": f"{tmp / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(repo),  # this checkout's fleet, whatever is installed
            "XDG_CONFIG_HOME": str(tmp / "config"),  # no operator config
            "FLEET_BENCH_STAMPS": str(stamps),
        }
        argvs = {FLOOR: [sys.executable, "-c", "pass"]}
        for name, args in commands.items():
            typed = [a.format(tmp=tmp) for a in args]
            argvs[name] = [sys.executable, "-m", "fleet", "--flake", str(tmp / "flake"), *typed]
        found: dict[str, list[tuple[float, float]]] = {name: [] for name in argvs}
        for _ in range(runs):  # interleaved, so that a busy moment weighs on every command
            for name, argv in argvs.items():
                found[name].append(_once(argv, env, stamps, repo))
        return found


def startup_times(
    commands: Mapping[str, Sequence[str]] = COMMANDS, runs: int = 10
) -> dict[str, float]:
    """Median seconds per command to its first Nix call (else its exit), and the floor's."""
    found = measure(commands, runs)
    return {name: statistics.median(wall for wall, _ in each) for name, each in found.items()}


def print_times(found: Mapping[str, float], cpu: Mapping[str, float] | None = None) -> None:
    """One line per command: ms to the first Nix call, and over the floor; CPU ms if given."""
    floor = found.get(FLOOR, 0.0)
    for name, seconds in found.items():
        line = f"{name:16s} {seconds * 1000:7.1f} ms"
        if name != FLOOR:
            line += f"  +{(seconds - floor) * 1000:6.1f} over the floor"
        if cpu is not None and name in cpu:
            line += f"   CPU {cpu[name] * 1000:6.1f} ms"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--repo", type=Path, default=REPO, help="the checkout whose fleet is timed (to compare)"
    )
    parser.add_argument("commands", nargs="*", metavar="COMMAND", help=", ".join(COMMANDS))
    args = parser.parse_args()
    unknown = [name for name in args.commands if name not in COMMANDS]
    if unknown:
        parser.error(f"unknown command {unknown[0]!r}; known: {', '.join(COMMANDS)}")
    chosen = {name: COMMANDS[name] for name in args.commands} if args.commands else COMMANDS
    print(f"fleet start-up: median of {args.runs} runs, to the first Nix call (else the exit)")
    found = measure(chosen, args.runs, args.repo.resolve())
    wall = {name: statistics.median(w for w, _ in each) for name, each in found.items()}
    cpu = {name: statistics.median(c for _, c in each) for name, each in found.items()}
    print_times(wall, cpu)


if __name__ == "__main__":
    main()
