"""Time `fleet lab up` to every host answering ssh (with its pinned key), warm and cold, and
what each host costs the machine: memory and the kernel's shared limits.

Usage (as root): python bench/lab_up.py [--hosts 8] [--runs 3] [--cold] [--window 16]
Warm: the Debian root is cached. Cold: the cache is removed first, so debootstrap runs.
Runs on its own lab instance, so an operator's lab is left alone.

Then one more run measures each host's cost: the machine's MemAvailable before the lab
was made and once every host answered (everything a host costs: its processes, its tmpfs
disk, its overlay, the kernel's objects; other programs on the machine add noise), split
into tmpfs, slab and page tables; the proportional set size of each container's processes;
and what each container holds of the limits the whole machine shares (fleet.lab.limits).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("FLEET_LAB_INSTANCE", "9")
os.environ.setdefault("NIX_CONFIG", "substituters =")

from fleet.lab import boot, containers, limits, ops, rootfs
from fleet.lab.layout import Lab


def meminfo() -> dict[str, int]:
    """Bytes by /proc/meminfo's names."""
    lines = Path("/proc/meminfo").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines}


def tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return found


def pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def machine_counters() -> dict[str, int]:
    """What the machine's shared tables count now, whoever's entries they are."""
    keys = Path("/proc/key-users").read_text().split("\n", 1)[0].split()
    return {
        "ARP entries": limits.in_use()[limits.ARP_TABLE.sysctl],
        "root's keys": int(keys[2].split("/")[0]) if keys and keys[0] == "0:" else 0,
    }


def inotify(pid: int) -> tuple[int, int]:
    instances = watches = 0
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == "anon_inode:inotify":
                    instances += 1
                    info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
                    watches += info.count("inotify wd:")
    return instances, watches


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def container_counters(pid: int) -> dict[str, float]:
    """What one container's processes hold of the machine's per-user and global limits."""
    procs = tree(pid)
    notify = [inotify(p) for p in procs]
    return {
        "PSS MiB": round(sum(pss(p) for p in procs) / 1024**2, 1),
        "processes": len(procs),
        "threads": sum(threads(p) for p in procs),
        "open files": sum(fds(p) for p in procs),
        "inotify instances": sum(i for i, _ in notify),
        "inotify watches": sum(w for _, w in notify),
    }


BOOTS: list[float] = []  # how long each run's boot took: its hosts started and answering
_boot = ops._boot


def _timed_boot(*args: Any, **kwargs: Any) -> None:
    start = time.monotonic()
    _boot(*args, **kwargs)
    BOOTS.append(time.monotonic() - start)


ops._boot = _timed_boot


def timed_up(lab: Lab, hosts: int, pace: boot.Pace) -> float:
    ops.down(lab)
    start = time.monotonic()
    states = ops.up(lab, hosts, lambda _m: None, pace=pace)
    elapsed = time.monotonic() - start
    assert all(s.ssh for s in states), states
    return elapsed


def per_host(lab: Lab, hosts: int, pace: boot.Pace) -> None:
    ops.down(lab)
    time.sleep(2)  # what the lab freed settles
    before, counted = meminfo(), machine_counters()
    timed_up(lab, hosts, pace)
    time.sleep(5)  # the hosts' boot-time jobs end
    now, after = meminfo(), machine_counters()
    grew = {name: (now[name] - before[name]) / hosts / 1024**2 for name in before}
    per_container = []
    for host in lab.hosts(hosts):
        pid = containers.nspawn_pid(lab, host)
        if pid is not None:
            disk = os.statvfs(lab.host_root(host))
            used_disk = round((disk.f_blocks - disk.f_bfree) * disk.f_frsize / 1024**2, 1)
            per_container.append({**container_counters(pid), "disk (tmpfs) MiB": used_disk})
    print(
        f"memory per host: {-grew['MemAvailable']:.1f} MiB of the machine's available memory; "
        f"of it tmpfs (disks, overlays) {grew['Shmem']:.1f} MiB, kernel slab "
        f"{grew['Slab']:.1f} MiB, page tables {grew['PageTables']:.2f} MiB"
    )
    for name in per_container[0]:
        values = [c[name] for c in per_container]
        print(f"{name} per host: median {statistics.median(values):g}, max {max(values):g}")
    for name, value in after.items():
        print(f"{name} per host: {(value - counted[name]) / hosts:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--window", type=int, default=boot.PACE.window)
    args = parser.parse_args()
    lab = Lab.from_env()
    pace = replace(boot.PACE, window=args.window)
    print(
        f"pace: {pace.window} hosts booting at once, a host's place freed after "
        f"{pace.stall:g} s; deadline {pace.base:g} s + {pace.per_host:g} s per host "
        f"= {pace.deadline(args.hosts):g} s"
    )
    try:
        if args.cold:
            shutil.rmtree(lab.cache / f"rootfs-{rootfs.cache_key()}", ignore_errors=True)
            print(f"cold  lab up --hosts {args.hosts}: {timed_up(lab, args.hosts, pace):6.1f} s")
        BOOTS.clear()
        warm = [timed_up(lab, args.hosts, pace) for _ in range(args.runs)]
        print(
            f"warm  lab up --hosts {args.hosts}: median {statistics.median(warm):.2f} s, "
            f"min {min(warm):.2f} s, max {max(warm):.2f} s over {args.runs} runs; "
            f"of which booting (start to every host answering) median "
            f"{statistics.median(BOOTS):.2f} s"
        )
        per_host(lab, args.hosts, pace)
    finally:
        ops.down(lab)


if __name__ == "__main__":
    main()
