"""Booting many lab hosts: the deadline, and one line naming what went wrong for a host."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fleet.lab import boot, containers
from fleet.lab.boot import HostFacts, Pace, describe


def test_the_deadline_grows_with_the_hosts_started() -> None:
    assert boot.PACE.deadline(0) == 60
    assert boot.PACE.deadline(8) == 72
    assert boot.PACE.deadline(200) == 360
    assert Pace(base=10, per_host=2).deadline(5) == 20


RUNNING = HostFacts(
    "lab3", 74.2, system_state="running", sshd="active", port_open=True, link_up=True
)


def test_a_container_that_ended_is_down_with_its_status_and_last_words() -> None:
    facts = HostFacts("lab3", 2, ended=True, exit_status=1, console=("a", "Failed to mount /nix"))
    assert describe(facts) == (
        "lab3 is down: its container ended with status 1 (`fleet lab up` boots it again); "
        "console: a | Failed to mount /nix"
    )
    assert describe(HostFacts("lab3", 2, ended=True)) == (
        "lab3 is down: its container ended (`fleet lab up` boots it again)"
    )


def test_what_systemd_inside_says_names_the_failure() -> None:
    starting = HostFacts(
        "lab3",
        74.2,
        system_state="starting",
        sshd="activating",
        failed_units=("nix-daemon.service",),
    )
    assert describe(starting) == (
        "lab3: systemd had not finished booting after 74 s (state starting; "
        "sshd activating); failed units: nix-daemon.service"
    )
    no_sshd = HostFacts(
        "lab3", 74, system_state="degraded", sshd="failed", failed_units=("ssh.service",)
    )
    assert describe(no_sshd) == (
        "lab3: sshd is failed (systemd state degraded); failed units: ssh.service"
    )
    assert describe(HostFacts("lab3", 74, leader=False)) == (
        "lab3: systemd-nspawn had not started the container's systemd after 74 s"
    )
    assert describe(HostFacts("lab3", 74, console=("x",))) == (
        "lab3: no answer from inside the container after 74 s; console: x"
    )


def test_what_ssh_says_names_the_failure() -> None:
    assert describe(HostFacts("lab3", 5, key_mismatch=True)) == (
        "lab3: ssh answered with a host key other than the one pinned for it"
    )
    closed = HostFacts("lab3", 74, system_state="running", sshd="active")
    assert describe(closed) == "lab3: sshd is active but port 22 does not answer"
    refused = HostFacts(
        "lab3", 74, system_state="running", sshd="active", port_open=True,
        ssh_error="lab3 (root@10.231.0.13:22): cannot connect: Permission denied (publickey).",
    )  # fmt: skip
    assert describe(refused) == (
        "lab3: port 22 answers but ssh fails: lab3 (root@10.231.0.13:22): cannot connect: "
        "Permission denied (publickey)."
    )
    assert describe(HostFacts("lab3", 74, link_up=False, system_state="running")) == (
        "lab3: its link is cut (`fleet lab fault lab3 heal` restores it)"
    )
    assert describe(RUNNING) == (
        "lab3: answered ssh but had not finished booting after 74 s (systemd state running a "
        "moment later)"
    )


def test_degraded_and_never_started_hosts() -> None:
    assert describe(HostFacts("lab3", 9, degraded="lab-web.service failed: boom")) == (
        "lab3 booted degraded: lab-web.service failed: boom"
    )
    assert describe(HostFacts("lab199", 360, started=False)) == (
        "lab199: not started: the deadline passed (360 s) before its turn came"
    )


def test_the_console_tail_of_this_boot_and_the_supervisors_exit_status(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("old boot's last line\n")
    offset = log.stat().st_size
    with log.open("a") as f:
        f.write("\x1b[0;1;31mFailed to mount /nix\x1b[0m\n\n")
        f.write("Container lab3 failed with error code 1.\n")
        f.write("fleet lab: the container ended with status 1\n")
    assert boot.console_tail(log, offset) == (
        ("Failed to mount /nix", "Container lab3 failed with error code 1."),
        1,
    )
    assert boot.console_tail(log, 0, lines=1) == (("Container lab3 failed with error code 1.",), 1)
    assert boot.console_tail(tmp_path / "none", 0) == ((), None)


def test_the_supervisor_writes_what_the_console_tail_reads(tmp_path: Path) -> None:
    """containers.SUPERVISE boots again on nspawn's reboot code, and ends with its status."""
    count = tmp_path / "boots"
    nspawn = f"echo x >> {count}; [ $(wc -l < {count}) -lt 3 ] && exit 133; exit 7"
    log = tmp_path / "console.log"
    with log.open("wb") as out:
        done = subprocess.run(
            ["sh", "-c", containers.SUPERVISE, containers.SUPERVISOR, "sh", "-c", nspawn],
            stdout=out,
            check=False,
        )
    assert done.returncode == 7
    assert count.read_text().count("x") == 3
    assert boot.console_tail(log, 0) == (
        (
            "fleet lab: the host rebooted; booting it again",
            "fleet lab: the host rebooted; booting it again",
        ),
        7,
    )
