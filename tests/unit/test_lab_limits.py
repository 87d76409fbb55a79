"""The kernel limits a lab needs: what N hosts take, and raising or refusing before a boot."""

from __future__ import annotations

import errno

import pytest

from fleet.errors import ExitCode, UsageError
from fleet.lab import limits
from fleet.lab.limits import ARP_TABLE, INOTIFY_INSTANCES, INOTIFY_WATCHES

STOCK = {  # a stock Debian 12 kernel on a machine of 24 GiB
    INOTIFY_INSTANCES.sysctl: 128,
    INOTIFY_WATCHES.sysctl: 192536,
    ARP_TABLE.sysctl: 1024,
}
QUIET = {INOTIFY_INSTANCES.sysctl: 20, INOTIFY_WATCHES.sysctl: 300, ARP_TABLE.sysctl: 2}


class Kernel:
    """Sysctls to read and write, some of them refused as a read-only /proc/sys would."""

    def __init__(self, values: dict[str, int], refused: tuple[str, ...] = ()) -> None:
        self.values = dict(values)
        self.refused = refused
        self.written: dict[str, int] = {}

    def read(self, sysctl: str) -> int:
        return self.values[sysctl]

    def write(self, sysctl: str, value: int) -> None:
        if sysctl in self.refused:
            raise OSError(errno.EROFS, "Read-only file system")
        self.written[sysctl] = self.values[sysctl] = value


def ensure(kernel: Kernel, hosts: int, in_use: dict[str, int] = QUIET) -> list[str]:
    said: list[str] = []
    limits.ensure(hosts, said.append, read=kernel.read, write=kernel.write, usage=lambda: in_use)
    return said


def test_what_n_hosts_need_grows_with_them_on_top_of_what_is_in_use() -> None:
    assert limits.needed(INOTIFY_INSTANCES, 0, 20) == 20 + INOTIFY_INSTANCES.reserve
    assert limits.needed(INOTIFY_INSTANCES, 200, 20) == 20 + 200 * 10 + 16
    assert limits.needed(INOTIFY_WATCHES, 200, 300) == 300 + 200 * 64 + 1024
    assert limits.needed(ARP_TABLE, 200, 2) == 2 + 200 * 4 + 128


def test_a_stock_kernel_is_short_of_inotify_instances_from_a_few_dozen_hosts() -> None:
    """Each host's systemd, journald, logind and dbus hold 7 instances; root gets 128."""
    assert limits.shortfalls(8, STOCK, QUIET) == []
    [short] = limits.shortfalls(24, STOCK, QUIET)
    assert (short.limit, short.current, short.needed) == (INOTIFY_INSTANCES, 128, 276)
    lacking = {s.limit.sysctl for s in limits.shortfalls(200, STOCK, QUIET)}
    assert lacking == {INOTIFY_INSTANCES.sysctl}
    # Another lab's hosts are in use too: with 500 more ARP entries, 200 hosts overflow.
    busy = {**QUIET, ARP_TABLE.sysctl: 500}
    lacking = {s.limit.sysctl for s in limits.shortfalls(200, STOCK, busy)}
    assert lacking == {INOTIFY_INSTANCES.sysctl, ARP_TABLE.sysctl}


def test_a_limit_below_the_need_is_raised_and_said() -> None:
    kernel = Kernel(STOCK)
    said = ensure(kernel, 200)
    assert kernel.written == {INOTIFY_INSTANCES.sysctl: 2036}
    assert said == ["raised fs.inotify.max_user_instances 128 → 2036 for 200 lab hosts"]
    assert ensure(kernel, 200) == []  # enough now: nothing written, nothing said


def test_nothing_is_asked_when_no_host_starts() -> None:
    kernel = Kernel({})  # any read would fail
    assert ensure(kernel, 0) == []


def test_a_limit_that_cannot_be_raised_fails_with_the_sysctl_to_set() -> None:
    kernel = Kernel(STOCK, refused=(INOTIFY_INSTANCES.sysctl,))
    with pytest.raises(UsageError) as caught:
        ensure(kernel, 24)
    assert caught.value.exit_code == ExitCode.USAGE
    assert str(caught.value) == (
        "24 lab hosts need more than the kernel allows and the limits could not be raised "
        "(fs.inotify.max_user_instances is 128: Read-only file system): run "
        "`sysctl -w fs.inotify.max_user_instances=276` as root, then `fleet lab up` again"
    )
    assert "\n" not in str(caught.value)


def test_every_refused_limit_is_named_and_the_others_are_still_raised() -> None:
    kernel = Kernel(
        {**STOCK, INOTIFY_WATCHES.sysctl: 8192, ARP_TABLE.sysctl: 512},
        refused=(INOTIFY_INSTANCES.sysctl, ARP_TABLE.sysctl),
    )
    said: list[str] = []
    with pytest.raises(UsageError, match="could not be raised") as caught:
        limits.ensure(200, said.append, read=kernel.read, write=kernel.write, usage=lambda: QUIET)
    wanted = "fs.inotify.max_user_instances=2036 net.ipv4.neigh.default.gc_thresh3=930"
    assert f"`sysctl -w {wanted}`" in str(caught.value)
    assert said == ["raised fs.inotify.max_user_watches 8192 → 14124 for 200 lab hosts"]


def test_the_machines_own_use_is_read_from_proc() -> None:
    """Whatever the machine runs, the counts are numbers the check can add to."""
    used = limits.in_use()
    assert set(used) == {limit.sysctl for limit in limits.LIMITS}
    assert all(value >= 0 for value in used.values())
    assert limits.read_sysctl(INOTIFY_INSTANCES.sysctl) > 0
