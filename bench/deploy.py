"""`fleet deploy` on 16 lab hosts against a plain sequential ssh script doing the same steps.

Usage (as root): python bench/deploy.py [--hosts 16] [--deploy-user]
--deploy-user deploys as the lab's deploy user other than root: every closure signed with
the lab's key first, every step through sudo and the host's signature check.
Prints: wall time of one host alone, of all hosts in parallel, of the sequential script;
the tool's CPU time per host (its own process and its ssh/nix children); and the time from
a failed health check to every touched host running its recorded generation again; then
how long each command takes to start (bench/startup.py).
Runs on its own lab instance, torn down at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import urllib.request

os.environ.setdefault("FLEET_LAB_INSTANCE", "8")
os.environ.setdefault("NIX_CONFIG", "substituters =")

from startup import print_times, startup_times  # bench/startup.py, beside this script

from fleet import nix
from fleet.lab import flake, ops
from fleet.lab.layout import Lab
from fleet.lab.rootfs import DEPLOY_USER

ENV: dict[str, str] = dict(os.environ)


def as_deploy_user(lab: Lab) -> None:
    """Every `fleet` run below with an operator config naming the deploy user and key."""
    home = lab.state / "bench-xdg"
    (home / "fleet").mkdir(parents=True, exist_ok=True)
    (home / "fleet/config.yaml").write_text(
        f"sshUser: {DEPLOY_USER}\nsigningKey: {lab.signing_key}\n"
    )
    ENV["XDG_CONFIG_HOME"] = str(home)


def fleet(lab: Lab, *args: str) -> tuple[dict, float, float]:
    """Run `fleet --json deploy ...`; its report, wall time and CPU time (with children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    argv = [sys.executable, "-m", "fleet", "--flake", str(lab.flake), "--json", "deploy", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=ENV)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if not proc.stdout:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout), wall, cpu


def sequential(lab: Lab, hosts: list[str]) -> float:
    """What an operator's loop would do: build, then per host copy, set, switch, check."""
    start = time.monotonic()
    paths = nix.build_systems(str(lab.flake), hosts)
    spec = flake.spec(lab) or {}
    ssh = ["ssh", "-i", str(lab.identity), "-o", f"UserKnownHostsFile={lab.known_hosts}",
           "-o", "BatchMode=yes"]  # fmt: skip
    for host, path in paths.items():
        address = spec["hosts"][host]["address"]
        env = dict(os.environ, NIX_SSHOPTS=" ".join(ssh[1:]))
        subprocess.run(
            ["nix-copy-closure", "--to", f"root@{address}", path],
            env=env,
            check=True,
            capture_output=True,
        )
        for command in (
            f"nix-env -p /nix/var/nix/profiles/system --set {path}",
            f"{path}/bin/switch-to-configuration switch",
        ):
            subprocess.run([*ssh, f"root@{address}", command], check=True, capture_output=True)
        with urllib.request.urlopen(f"http://{address}:8080/health", timeout=5) as answer:
            assert answer.status == 200
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--deploy-user", action="store_true")
    args = parser.parse_args()
    lab = Lab.from_env()
    ops.down(lab)
    ops.up(lab, args.hosts, lambda _m: None)
    if args.deploy_user:
        as_deploy_user(lab)
    names = [f"lab{i}" for i in range(1, args.hosts + 1)]
    try:
        flake.set_release(lab, flake.LabRelease("b1"))
        fleet(lab, "--dry-run")  # build once, so every timed run below starts warm
        _, one, _ = fleet(lab, "lab1")
        report, wall, cpu = fleet(lab, "--parallel", str(args.hosts), "--canary", "0")
        assert report["result"] == "deployed", report
        flake.set_release(lab, flake.LabRelease("b2"))
        nix.build_systems(str(lab.flake), names)
        seq = sequential(lab, names)
        flake.set_release(lab, flake.LabRelease("b3", broken="health"))
        fleet(lab, "--dry-run")
        report, _, _ = fleet(
            lab, "--parallel", str(args.hosts), "--canary", "0", "--health-timeout", "3"
        )
        assert report["result"] == "rolled-back", report
        rollback = max(h["timings"]["rollback"] for h in report["hosts"].values())
        switch = max(h["timings"]["activate"] for h in report["hosts"].values())
        print(f"hosts: {args.hosts}, as {DEPLOY_USER if args.deploy_user else 'root'}")
        print(f"fleet deploy, one host alone:            {one:6.2f} s")
        print(
            f"fleet deploy --parallel {args.hosts}:            {wall:6.2f} s "
            f"({wall / one:.2f}x one host)"
        )
        print(
            f"sequential ssh script, same steps:       {seq:6.2f} s "
            f"({seq / wall:.1f}x slower than fleet)"
        )
        print(f"fleet CPU time per host (with children): {cpu / args.hosts * 1000:6.0f} ms")
        print(
            f"failed check -> all on recorded gen:     {rollback:6.2f} s "
            f"(one switch: {switch:.2f} s)"
        )
    finally:
        ops.down(lab)
    print("fleet start-up, to its first Nix call (bench/startup.py), median of 10:")
    print_times(startup_times())


if __name__ == "__main__":
    main()
