"""The kernel limits a lab of N hosts needs, raised before any host boots.

Every lab host is a container on the machine's own kernel, run by the machine's own root:
what each container's systemd, journald and sshd take counts against limits the whole
machine shares. Measured on booted Debian 12 lab hosts: 7 inotify instances (systemd,
journald, logind, dbus), 28 to 34 inotify watches, and 2 entries of the kernel's ARP
table, which is one table for every network namespace (the machine's entry for the host,
the host's for its gateway; one more on the monitoring host and on each balancer). A stock
kernel allows root 128 inotify instances: some 15 hosts. Other shared limits (pid_max,
file-max, root's keys; somaxconn is per namespace) stay far below theirs at 200 hosts;
README's lab section has the figures.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import UsageError


@dataclass(frozen=True)
class Limit:
    sysctl: str  # as sysctl(8) spells it
    per_host: int  # what one more host takes, with room (a deploy's, a balancer's)
    reserve: int  # room for the machine's own programs on top of what is in use now


INOTIFY_INSTANCES = Limit("fs.inotify.max_user_instances", per_host=10, reserve=16)
INOTIFY_WATCHES = Limit("fs.inotify.max_user_watches", per_host=64, reserve=1024)
ARP_TABLE = Limit("net.ipv4.neigh.default.gc_thresh3", per_host=4, reserve=128)
LIMITS = (INOTIFY_INSTANCES, INOTIFY_WATCHES, ARP_TABLE)


def needed(limit: Limit, hosts: int, in_use: int) -> int:
    """What ``hosts`` more hosts need: what the machine uses now (other labs included), each
    new host's share, and the reserve."""
    return in_use + hosts * limit.per_host + limit.reserve


@dataclass(frozen=True)
class Shortfall:
    limit: Limit
    current: int
    needed: int


def shortfalls(
    hosts: int, current: Mapping[str, int], in_use: Mapping[str, int]
) -> list[Shortfall]:
    """The limits below what ``hosts`` more hosts need."""
    found = []
    for limit in LIMITS:
        need = needed(limit, hosts, in_use.get(limit.sysctl, 0))
        if current[limit.sysctl] < need:
            found.append(Shortfall(limit, current[limit.sysctl], need))
    return found


def _path(sysctl: str) -> Path:
    return Path("/proc/sys") / sysctl.replace(".", "/")


def read_sysctl(sysctl: str) -> int:
    return int(_path(sysctl).read_text().split()[0])


def write_sysctl(sysctl: str, value: int) -> None:
    _path(sysctl).write_text(f"{value}\n")


def _inotify_in_use() -> tuple[int, int]:
    """Inotify instances and watches of root's processes (the limits are per user)."""
    instances = watches = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            uid = next(line for line in status.splitlines() if line.startswith("Uid:"))
            if uid.split()[2] != "0":  # the effective uid is what inotify counts
                continue
            fds = list((entry / "fd").iterdir())
        except (OSError, StopIteration):
            continue  # gone, or a kernel thread
        for fd in fds:
            try:
                if os.readlink(fd) != "anon_inode:inotify":
                    continue
                info = (entry / "fdinfo" / fd.name).read_text()
            except OSError:
                continue
            instances += 1
            watches += sum(1 for line in info.splitlines() if line.startswith("inotify wd:"))
    return instances, watches


def _arp_entries() -> int:
    """The ARP table's entries, every network namespace's (its limits are the table's)."""
    try:
        lines = Path("/proc/net/stat/arp_cache").read_text().splitlines()
        return int(lines[1].split()[0], 16)
    except (OSError, IndexError, ValueError):
        return 0


def in_use() -> dict[str, int]:
    instances, watches = _inotify_in_use()
    return {
        INOTIFY_INSTANCES.sysctl: instances,
        INOTIFY_WATCHES.sysctl: watches,
        ARP_TABLE.sysctl: _arp_entries(),
    }


def ensure(
    hosts: int,
    say: Callable[[str], None],
    *,
    read: Callable[[str], int] = read_sysctl,
    write: Callable[[str, int], None] = write_sysctl,
    usage: Callable[[], Mapping[str, int]] = in_use,
) -> None:
    """Raise each limit below what ``hosts`` more hosts need, one line said per limit.

    A limit that cannot be raised (no root, a read-only /proc/sys in a container) raises
    UsageError naming every such sysctl and its value before anything boots: without them
    hosts fail one by one, late, with errors that never name the limit.
    """
    if hosts <= 0:
        return
    lacking = shortfalls(hosts, {limit.sysctl: read(limit.sysctl) for limit in LIMITS}, usage())
    refused: list[tuple[Shortfall, str]] = []
    for short in lacking:
        try:
            write(short.limit.sysctl, short.needed)
        except OSError as exc:
            refused.append((short, exc.strerror or str(exc)))
            continue
        say(f"raised {short.limit.sysctl} {short.current} → {short.needed} for {hosts} lab hosts")
    if refused:
        settings = " ".join(f"{s.limit.sysctl}={s.needed}" for s, _ in refused)
        causes = "; ".join(f"{s.limit.sysctl} is {s.current}: {why}" for s, why in refused)
        raise UsageError(
            f"{hosts} lab hosts need more than the kernel allows and the limits could not be "
            f"raised ({causes}): run `sysctl -w {settings}` as root, then `fleet lab up` again"
        )
