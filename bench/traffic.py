"""Requests lost by a rolling deploy behind HAProxy, with drain and without; failover.

Usage (as root): python bench/traffic.py [--rounds 2]
A lab of five hosts (four run lab-web, the fifth Debian's HAProxy with the generated
configuration); four clients ask the balancer for lab-web's release throughout.
Prints per round: a rolling deploy one host at a time with drain (the default) and with
--no-drain (HAProxy's retries alone): requests, failed requests, wall time, and the time
draining added per host; then the time from a host's crash until the balancer stops
sending to it, and the requests that failed meanwhile.
Runs on its own lab instance, torn down at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("FLEET_LAB_INSTANCE", "7")
os.environ.setdefault("NIX_CONFIG", "substituters =")

from fleet import inventory, nix, traffic
from fleet.lab import flake, ops
from fleet.lab.layout import Lab
from fleet.lab.load import Clients

APPS = ("lab1", "lab2", "lab3", "lab4")


def deploy(lab: Lab, version: str, *extra: str) -> tuple[dict, float]:
    flake.set_release(lab, flake.LabRelease(version))
    argv = [sys.executable, "-m", "fleet", "--flake", str(lab.flake), "--json", "deploy",
            "--canary", "1", "--batch-size", "1", *extra]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"deploy {version} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout), wall


def clients(lab: Lab) -> Clients:
    return Clients(lab, lab.hosts(5)[4].address, flake.INGRESS_PORT, threads=4, max_seconds=600)


def rolling(lab: Lab, version: str, *extra: str) -> str:
    with clients(lab) as load:
        time.sleep(1)
        report, wall = deploy(lab, version, *extra)
        time.sleep(1)
    drains = [h["timings"].get("drain", 0.0) for n, h in report["hosts"].items() if n in APPS]
    seen = load.load
    return (
        f"{seen.requests:6d} requests, {seen.failed:4d} failed, deploy {wall:5.1f} s, "
        f"drain {statistics.mean(drains):.2f} s/host"
    )


def failover(lab: Lab) -> str:
    balanced = inventory.parse(nix.eval_json(str(lab.flake), "fleet"), "lab").traffic
    assert balanced is not None
    endpoints = {e.name: e for e in ops.endpoints(lab)}
    with ops.transport(lab) as transport, clients(lab) as load:
        time.sleep(1)
        ops.fault(lab, "lab3", ops.Fault.CRASH)
        crashed = time.monotonic()
        while True:
            servers, _ = traffic.view(balanced, lambda n: transport.remote(endpoints[n]))
            if any(s.host == "lab3" and s.status.startswith("DOWN") for s in servers):
                break
            time.sleep(0.1)
        taken_out = time.monotonic() - crashed
        time.sleep(1)
    ops.up(lab, None, lambda _m: None)
    return f"taken out {taken_out:.1f} s after the crash; {load.load.failed} requests failed"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    lab = Lab.from_env()
    ops.down(lab)
    ops.up(lab, 5, print, balancers=1)
    try:
        deploy(lab, "0")
        for n in range(args.rounds):
            print(f"round {n + 1}: drain    {rolling(lab, f'd{n}')}")
            print(f"round {n + 1}: no drain {rolling(lab, f'n{n}', '--no-drain')}")
        print(f"failover: {failover(lab)}")
    finally:
        ops.down(lab)


if __name__ == "__main__":
    main()
