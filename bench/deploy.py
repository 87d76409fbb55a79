"""`fleet deploy` against the same work done by hand (the floor), at 1, 8 and 16 lab hosts.

Usage (as root): python bench/deploy.py [--hosts 16] [--runs 3] [--deploy-user]

The floor is what an operator's script does for one host, without any safety step: one
`nix build` of the systems, then per host, over ONE ssh connection (a ControlMaster the
script opens and closes): `nix-copy-closure`, `nix-env -p /nix/var/nix/profiles/system
--set`, `switch-to-configuration switch`, and the web service's health check; N hosts are
N such scripts at once. The safe floor is the same by hand, in the order a deploy that
can be undone needs and with nothing else: `switch-to-configuration test`, the check, then
over a new connection (new logins still work) `nix-env --set` and `switch-to-configuration
boot`. Each run deploys a release no host runs yet, built beforehand, so all start warm;
the tool's modules are byte-compiled first, as an installed tool's are.

Prints, per host count: fleet's wall time and both floors' (medians), the ratios, and
fleet's phases for one host; the ssh processes a one-host `fleet deploy` and the floor
start (a wrapper `ssh` first on PATH logs each exec), split by what started them; the
evaluations of Nix a deploy starts; the tool's CPU time per host; the time from a failed
health check to every touched host on its recorded generation; the CLI's start time per
command. --deploy-user deploys as the lab's deploy user other than root: every closure
signed with the lab's key first, every step through sudo and the host's signature check.
Runs on its own lab instance (8 unless FLEET_LAB_INSTANCE says otherwise), torn down at
the end.
"""

from __future__ import annotations

import argparse
import collections
import compileall
import itertools
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("FLEET_LAB_INSTANCE", "8")
os.environ.setdefault("NIX_CONFIG", "substituters =")

import fleet as fleet_package
from fleet import nix
from fleet.lab import flake, ops
from fleet.lab.layout import WEB_PORT, Lab
from fleet.lab.rootfs import DEPLOY_USER

ENV: dict[str, str] = dict(os.environ)
COUNTS = (1, 8, 16)
_versions = itertools.count(1)


def as_deploy_user(lab: Lab) -> None:
    """Every `fleet` run below with an operator config naming the deploy user and key."""
    home = lab.state / "bench-xdg"
    (home / "fleet").mkdir(parents=True, exist_ok=True)
    (home / "fleet/config.yaml").write_text(
        f"sshUser: {DEPLOY_USER}\nsigningKey: {lab.signing_key}\n"
    )
    ENV["XDG_CONFIG_HOME"] = str(home)


def fleet(
    lab: Lab, *args: str, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], float, float]:
    """Run `fleet --json deploy ...`; its report, wall time and CPU time (with children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    argv = [sys.executable, "-m", "fleet", "--flake", str(lab.flake), "--json", "deploy", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env or ENV)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if not proc.stdout:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout), wall, cpu


def new_release(lab: Lab, names: Sequence[str]) -> None:
    """A release no host runs yet, built now so that the timed run starts warm."""
    flake.set_release(lab, flake.LabRelease(f"b{next(_versions)}"))
    nix.build_systems(str(lab.flake), list(names))


# -- the floor --------------------------------------------------------------------------


def _ssh_base(lab: Lab, control: Path | None) -> list[str]:
    """The floor's ssh options: over the master at ``control``, else a connection of its own."""
    return ["-i", str(lab.identity), "-o", f"UserKnownHostsFile={lab.known_hosts}",
            "-o", "BatchMode=yes", "-o", f"ControlPath={control or 'none'}"]  # fmt: skip


def floor_build(lab: Lab, names: Sequence[str]) -> dict[str, str]:
    """By hand: one `nix build` of every host's system, its output paths in order."""
    attr = "config.system.build.toplevel"
    argv = [*nix.NIX, "build", "--no-link", "--json",
            *(f"{lab.flake}#nixosConfigurations.{n}.{attr}" for n in names)]  # fmt: skip
    built = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
    return {n: b["outputs"]["out"] for n, b in zip(names, built, strict=True)}


def floor_host(lab: Lab, address: str, path: str, env: dict[str, str], safe: bool) -> None:
    """One host by hand: one master connection, copy, set the profile, switch, check.
    ``safe``: the order a safe deploy needs, still by hand and with nothing else: activate
    (``test``), check, then over a NEW connection (new logins still work) set the profile
    and make it the boot default (``boot``)."""
    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        base = _ssh_base(lab, Path(tmp) / "master")
        dest = f"root@{address}"

        def ssh(*argv: str, new: bool = False) -> None:
            opts = _ssh_base(lab, None) if new else base
            subprocess.run(["ssh", *opts, dest, *argv], check=True, capture_output=True, env=env)

        subprocess.run(["ssh", *base, "-o", "ControlMaster=yes", "-o", "ControlPersist=yes",
                        "-f", "-N", dest], check=True, capture_output=True, env=env)  # fmt: skip
        try:
            copy_env = env | {"NIX_SSHOPTS": " ".join(base)}
            subprocess.run(["nix-copy-closure", "--to", dest, path],
                           check=True, capture_output=True, env=copy_env)  # fmt: skip
            switch = f"{path}/bin/switch-to-configuration"
            if safe:
                ssh(switch, "test")
                web_check(address)
                profile = shlex.join(["nix-env", "-p", "/nix/var/nix/profiles/system", "--set",
                                      path])  # fmt: skip
                ssh(f"{profile} && {shlex.join([switch, 'boot'])}", new=True)
            else:
                ssh("nix-env", "-p", "/nix/var/nix/profiles/system", "--set", path)
                ssh(switch, "switch")
                web_check(address)
        finally:
            subprocess.run(["ssh", *base, "-O", "exit", dest], capture_output=True, env=env)


def web_check(address: str, timeout: float = 10.0) -> None:
    """The lab-web check, asked directly: retried every 0.2 s, as the declared check is."""
    end = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}:{WEB_PORT}/health", timeout=2) as r:
                if r.status == 200 and b"ok" in r.read():
                    return
        except OSError:
            pass
        if time.monotonic() > end:
            raise SystemExit(f"{address}: lab-web never healthy")
        time.sleep(0.2)


def floor(
    lab: Lab, names: Sequence[str], env: dict[str, str] | None = None, safe: bool = False
) -> float:
    """The floor for ``names``, all at once; its wall time."""
    spec = flake.spec(lab) or {}
    start = time.monotonic()
    paths = floor_build(lab, names)
    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(lambda n: floor_host(lab, spec["hosts"][n]["address"], paths[n],
                                           env or dict(os.environ), safe), names))  # fmt: skip
    return time.monotonic() - start


# -- counting child processes ----------------------------------------------------------

# One line per exec: the parent's pid and name, then the arguments (newlines flattened).
WRAPPER = """#!/bin/sh
args=$(printf '%s ' "$@" | tr '\\n' ' ')
printf '%s\\t%s\\t%s\\n' "$PPID" "$(cat /proc/$PPID/comm 2>/dev/null)" "$args" >> {log}
exec {real} "$@"
"""
NIX_WRAPPER = """#!/bin/sh
args=$(printf '%s ' "$@" | tr '\\n' ' ')
printf '%s %s\\n' {name} "$args" >> {log}
exec {real} "$@"
"""


def wrapped(directory: Path) -> tuple[dict[str, str], Path, Path]:
    """An environment whose `ssh`, `nix` and `nix-store` log each exec: (env, ssh log,
    nix log)."""
    ssh_log, nix_log = directory / "ssh.log", directory / "nix.log"
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    wrappers = (("ssh", WRAPPER, ssh_log), ("nix", NIX_WRAPPER, nix_log),
                ("nix-store", NIX_WRAPPER, nix_log))  # fmt: skip
    for name, template, log in wrappers:
        real = shutil.which(name)
        assert real is not None, name
        (bin_dir / name).write_text(template.format(log=log, real=real, name=name))
        (bin_dir / name).chmod(0o755)
    env = dict(ENV, PATH=f"{bin_dir}:{ENV.get('PATH', '')}")
    return env, ssh_log, nix_log


_HELPER = re.compile(r"fleet-host'? '?([a-z-]+)")


def ssh_kind(parent: str, args: str) -> str:
    """What an ssh exec was for, from its parent and arguments."""
    if "-O exit" in args:
        return "close the master (-O exit)"
    if parent.startswith("nix"):
        return "nix-copy-closure"
    if " -W " in args:
        return "health check tunnel (-W)"
    if " -f -N " in args or "fleet-master-ready" in args:
        return "the master connection"
    helper = _HELPER.search(args)
    fresh = " (new connection)" if "ControlPath=none" in args else ""
    if helper:
        return f"fleet-host {helper.group(1)}{fresh}"
    for by_hand in ("nix-env", "switch-to-configuration"):
        if by_hand in args:
            return by_hand
    return "other: " + args.strip().rsplit(" ", 1)[-1][:40]


def read_ssh_log(log: Path) -> collections.Counter[str]:
    kinds: collections.Counter[str] = collections.Counter()
    if log.exists():
        for line in log.read_text().splitlines():
            _pid, parent, args = line.split("\t", 2)
            kinds[ssh_kind(parent, f" {args} ")] += 1
    return kinds


def nix_kind(args: str) -> str:
    words = args.split()
    if words[0] == "nix-store":
        return "nix-store " + words[1]
    verb = next((w for w in words if w in ("eval", "build", "flake", "store", "copy")), "?")
    if verb == "flake":
        return "nix flake " + words[words.index("flake") + 1]
    if verb == "eval":
        installable = next((w for w in words if "#" in w), "?#?")
        return "nix eval " + ("(systems)" if "--apply" in words else installable.split("#")[-1])
    return f"nix {verb}"


def print_counts(title: str, kinds: collections.Counter[str]) -> None:
    print(f"{title}: {sum(kinds.values())}")
    for kind, count in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {count:3d}  {kind}")


# -- the CLI's start time --------------------------------------------------------------


def startup() -> dict[str, float]:
    """The CLI's start time per command: process start to its first Nix call
    (bench/startup.py, which has the commands and the floor of a bare interpreter)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from startup import startup_times  # type: ignore[import-not-found]

    times: dict[str, float] = startup_times()
    return times


# -- the run ---------------------------------------------------------------------------


def phases(report: dict[str, Any], wall: float) -> str:
    """Where one host's deploy went: before the rollout (evaluation, build), then each phase."""
    host = next(iter(report["hosts"].values()))
    parts = [f"before the rollout {wall - report['durationSeconds']:.2f}"]
    parts += [f"{k} {v:.2f}" for k, v in host["timings"].items()]
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each, median")
    parser.add_argument("--deploy-user", action="store_true")
    args = parser.parse_args()
    # As installed: the tool's modules byte-compiled (a checkout run with
    # PYTHONDONTWRITEBYTECODE would otherwise compile them on every start).
    compileall.compile_dir(str(Path(fleet_package.__file__).parent), quiet=1)
    lab = Lab.from_env()
    ops.down(lab)
    ops.up(lab, args.hosts, lambda _m: None)
    if args.deploy_user:
        as_deploy_user(lab)
    names = [f"lab{i}" for i in range(1, args.hosts + 1)]
    counts = [n for n in COUNTS if n <= args.hosts]
    try:
        new_release(lab, names)
        report, _, _ = fleet(lab, "--parallel", str(args.hosts), "--canary", "0")
        assert report["result"] == "deployed", report
        rows = []
        one_phases = []
        cpu_per_host = 0.0
        for n in counts:
            selected = names[:n]
            fleet_walls, floor_walls, safe_walls = [], [], []
            for _ in range(args.runs):
                new_release(lab, selected)
                report, wall, cpu = fleet(lab, *selected, "--parallel", str(n), "--canary", "0")
                assert report["result"] == "deployed", report
                fleet_walls.append(wall)
                if n == 1:
                    one_phases.append((wall, phases(report, wall)))
                if n == max(counts):
                    cpu_per_host = cpu / n
                new_release(lab, selected)
                floor_walls.append(floor(lab, selected))
                new_release(lab, selected)
                safe_walls.append(floor(lab, selected, safe=True))
            rows.append((n, statistics.median(fleet_walls), statistics.median(floor_walls),
                         statistics.median(safe_walls), min(fleet_walls),
                         max(fleet_walls)))  # fmt: skip

        # One more of each with every ssh and nix exec logged.
        with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
            env, ssh_log, nix_log = wrapped(Path(tmp))
            new_release(lab, names[:1])
            report, _, _ = fleet(lab, "lab1", env=env)
            assert report["result"] == "deployed", report
            fleet_ssh = read_ssh_log(ssh_log)
            nix_calls = collections.Counter(nix_kind(line) for line in
                                            nix_log.read_text().splitlines())  # fmt: skip
            ssh_log.unlink()
            new_release(lab, names[:1])
            floor(lab, names[:1], env)
            floor_ssh = read_ssh_log(ssh_log)
            handshakes = report.get("ssh", {}).get("handshakes", {})

        flake.set_release(lab, flake.LabRelease(f"b{next(_versions)}", broken="health"))
        nix.build_systems(str(lab.flake), names)
        report, _, _ = fleet(
            lab, "--parallel", str(args.hosts), "--canary", "0", "--health-timeout", "3"
        )
        assert report["result"] == "rolled-back", report
        rollback = max(h["timings"]["rollback"] for h in report["hosts"].values())
        switch = max(h["timings"]["activate"] for h in report["hosts"].values())

        print(f"hosts in the lab: {args.hosts}, as {DEPLOY_USER if args.deploy_user else 'root'}"
              f"; median of {args.runs} runs")  # fmt: skip
        print(f"{'hosts':>5}  {'fleet deploy':>12}  {'floor':>7}  {'ratio':>5}  "
              f"{'safe floor':>10}  {'ratio':>5}  fleet's range")  # fmt: skip
        for n, wall, low, safe, fastest, slowest in rows:
            print(f"{n:5d}  {wall:10.2f} s  {low:5.2f} s  {wall / low:5.2f}  {safe:8.2f} s  "
                  f"{wall / safe:5.2f}  {fastest:.2f}-{slowest:.2f} s")  # fmt: skip
        if one_phases:
            wall, where = sorted(one_phases)[len(one_phases) // 2]
            print(f"one host, the median run ({wall:.2f} s): {where}")
        print_counts("ssh processes, fleet deploy of one host", fleet_ssh)
        print(f"  handshakes the report counts: {handshakes}")
        print_counts("ssh processes, the floor for one host", floor_ssh)
        print_counts("nix evaluations and builds, fleet deploy of one host", nix_calls)
        print(f"fleet CPU time per host (with children), {max(counts)} hosts: "
              f"{cpu_per_host * 1000:.0f} ms")  # fmt: skip
        print(f"failed check -> all {args.hosts} on their recorded generation: {rollback:.2f} s "
              f"(one switch: {switch:.2f} s)")  # fmt: skip
        for command, seconds in startup().items():
            print(f"CLI start time, {command}: {seconds * 1000:.0f} ms")
    finally:
        ops.down(lab)


if __name__ == "__main__":
    main()
