"""`fleet` at scale on real lab hosts: lab up, status, deploy and rollback at 16, 64, 200.

Usage (as root): python bench/scale.py [--hosts 16,64,200] [--json]
For each count N: a lab of N hosts plus one binary cache host (`lab up --cache`), then
  - `lab up` to every host answering ssh, and the memory the lab took;
  - `fleet status`;
  - `fleet deploy --no-cache` (every closure copied from this machine) and `fleet deploy`
    (published once to the cache, fetched by the hosts), of releases whose app hosts share
    PAYLOAD_MIB of incompressible data, as hosts share their packages;
  - `fleet deploy` again with the operator's `sshOptions` choosing curve25519 alone for the
    key exchange (Debian 12's OpenSSH 9.2 defaults to sntrup761x25519, about 70 ms of the
    client's CPU a handshake; current OpenSSH's mlkem768x25519 costs about what this does);
  - `fleet rollback --release` of the last deploy.
For each command: wall time, the tool's CPU per host (its process and its ssh and nix
children), its peak memory (the Python process), ssh handshakes per host (counted by the
hosts' sshd), and the bytes that left this machine for the lab (the lab bridge's counter).
The deploys run with --parallel 64 --canary 1 and the lab's batch size (100%).
Runs on its own lab instance, torn down at the end.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("FLEET_LAB_INSTANCE", "8")
os.environ.setdefault("NIX_CONFIG", "substituters =")

import fleet as fleet_package
from fleet.lab import containers, flake, ops
from fleet.lab.layout import Lab

PARALLEL = 64
# What the app hosts of each release share (as packages are shared): what a cache saves.
PAYLOAD_MIB = 4
MAXRSS = "fleet-bench-maxrss"
# Runs the CLI and prints its own peak memory at exit (the children's is not the tool's).
WRAPPER = (
    "import atexit, resource, sys\n"
    "def _say():\n"
    "    me = resource.getrusage(resource.RUSAGE_SELF)\n"
    f"    sys.stderr.write('\\n{MAXRSS} %d %f\\n' % (me.ru_maxrss, me.ru_utime + me.ru_stime))\n"
    "atexit.register(_say)\n"
    "from fleet.cli import main\n"
    "main(sys.argv[1:])\n"
)


def meminfo_used() -> int:
    """Bytes of memory in use on the machine (MemTotal - MemAvailable)."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


def bridge_tx(lab: Lab) -> int:
    """Bytes this machine sent into the lab (the bridge's transmit counter)."""
    return int(Path(f"/sys/class/net/{lab.bridge}/statistics/tx_bytes").read_text())


def accepted(lab: Lab) -> dict[str, int]:
    """Per host, the ssh logins its sshd accepted so far (one per handshake)."""
    hosts = flake.hosts(lab) or []

    def count(host: Any) -> tuple[str, int]:
        result = containers.run_inside(
            lab, host, ["journalctl", "-q", "-o", "cat", "-u", "ssh.service", "--no-pager"]
        )
        return host.name, result.stdout.count("Accepted publickey")

    with ThreadPoolExecutor(16) as pool:
        return dict(pool.map(count, hosts))


def fleet(lab: Lab, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One `fleet --json ...` run, measured."""
    sent, before = bridge_tx(lab), accepted(lab)
    start = time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    argv = [sys.executable, "-c", WRAPPER, "--flake", str(lab.flake), "--json", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL, env=env)  # fmt: skip
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    sent = bridge_tx(lab) - sent
    logins = accepted(lab)
    own = next((line.split()[1:] for line in proc.stderr.splitlines()
                if line.startswith(MAXRSS)), ["0", "0"])  # fmt: skip
    maxrss, self_cpu = int(own[0]), float(own[1])
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        raise SystemExit(f"fleet {' '.join(args)}: exit {proc.returncode}: {proc.stderr}") from None
    shakes = [logins[h] - before.get(h, 0) for h in logins]
    return {
        "exit": proc.returncode,
        "wall": wall,
        "cpu": cpu,
        "maxrssMiB": maxrss / 1024,
        "selfCpu": self_cpu,
        "sentBytes": sent,
        "handshakes": shakes,
        "report": report,
    }


def cheap_kex(lab: Lab) -> dict[str, str]:
    """The environment of a `fleet` whose operator config picks curve25519 alone for the key
    exchange (sshOptions), as cheap as current OpenSSH's default mlkem768x25519."""
    home = lab.state / "bench-xdg"
    (home / "fleet").mkdir(parents=True, exist_ok=True)
    (home / "fleet/config.yaml").write_text("sshOptions: {KexAlgorithms: curve25519-sha256}\n")
    return dict(os.environ, XDG_CONFIG_HOME=str(home))


def row(what: str, hosts: int, run: dict[str, Any]) -> dict[str, Any]:
    shakes = sorted(run["handshakes"])
    report = run["report"] if isinstance(run["report"], dict) else {}
    hosts_report = report.get("hosts") if "release" in report else {}
    failed = [
        f"{n}: {h['result']} in {h['phase']}: {h['message']}"
        for n, h in (hosts_report or {}).items()
        if h.get("result") != "deployed"
    ]
    if failed:
        print(f"{what}: {len(failed)} hosts not deployed, e.g. {failed[0]}", file=sys.stderr)
    return {
        "command": what,
        "hosts": hosts,
        "exit": run["exit"],
        "wallSeconds": round(run["wall"], 2),
        "cpuMsPerHost": round(run["cpu"] / hosts * 1000),
        "pythonMsPerHost": round(run["selfCpu"] / hosts * 1000),
        "peakMiB": round(run["maxrssMiB"]),
        "handshakesPerHost": shakes[len(shakes) // 2] if shakes else 0,
        "handshakesMax": shakes[-1] if shakes else 0,
        "sentKiB": round(run["sentBytes"] / 1024),
    }


def one_count(lab: Lab, count: int) -> list[dict[str, Any]]:
    ops.down(lab)
    used = meminfo_used()
    start = time.monotonic()
    states = ops.up(lab, count + 1, lambda m: print(m, file=sys.stderr), cache=True)
    up = time.monotonic() - start
    assert all(s.ssh for s in states), [s for s in states if not s.ssh]
    time.sleep(5)  # let the hosts' boots settle before measuring memory
    per_host = (meminfo_used() - used) / (count + 1)
    rows = [{"command": "lab up", "hosts": count + 1, "exit": 0, "wallSeconds": round(up, 1),
             "memMiBPerHost": round(per_host / 2**20, 1)}]  # fmt: skip
    wave = ["--parallel", str(PARALLEL), "--canary", "1"]
    rows.append(row("status", count, fleet(lab, "status", "--parallel", str(PARALLEL))))
    flake.set_release(lab, flake.LabRelease("s1", payload_mib=PAYLOAD_MIB))
    fleet(lab, "deploy", "--dry-run")  # built once: the runs below do not build
    rows.append(row("deploy --no-cache", count, fleet(lab, "deploy", *wave, "--no-cache")))
    flake.set_release(lab, flake.LabRelease("s2", payload_mib=PAYLOAD_MIB))
    fleet(lab, "deploy", "--dry-run")
    cached = fleet(lab, "deploy", *wave)
    rows.append(row("deploy (cache)", count, cached))
    flake.set_release(lab, flake.LabRelease("s3", payload_mib=PAYLOAD_MIB))
    fleet(lab, "deploy", "--dry-run")
    kex = fleet(lab, "deploy", *wave, env=cheap_kex(lab))
    rows.append(row("deploy (cache, x25519)", count, kex))
    release = kex["report"]["release"]
    back = fleet(lab, "rollback", "--release", release, "--yes", *wave)
    rows.append(row("rollback --release", count, back))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", default="16,64,200")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # As installed: the tool's modules byte-compiled, not compiled again by every run.
    compileall.compile_dir(str(Path(fleet_package.__file__).parent), quiet=1)
    lab = Lab.from_env()
    rows: list[dict[str, Any]] = []
    try:
        for count in (int(n) for n in args.hosts.split(",")):
            rows += one_count(lab, count)
            if not args.json:
                for r in rows[-6:]:
                    print(json.dumps(r))
    finally:
        ops.down(lab)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'command':22} {'hosts':>5} {'exit':>4} {'wall s':>7} {'CPU ms/host':>11} "
          f"{'Python':>6} {'peak MiB':>8} {'shakes/host':>11} {'sent KiB':>9}")  # fmt: skip
    for r in rows:
        if r["command"] == "lab up":
            print(f"{'lab up':22} {r['hosts']:>5} {r['exit']:>4} {r['wallSeconds']:>7} "
                  f"{'':>11} {r['memMiBPerHost']:>8} (MiB per host)")  # fmt: skip
            continue
        shakes = f"{r['handshakesPerHost']} (max {r['handshakesMax']})"
        first = f"{r['command']:22} {r['hosts']:>5} {r['exit']:>4} {r['wallSeconds']:>7}"
        cpu = f"{r['cpuMsPerHost']:>11} {r['pythonMsPerHost']:>6}"
        print(f"{first} {cpu} {r['peakMiB']:>8} {shakes:>11} {r['sentKiB']:>9}")


if __name__ == "__main__":
    main()
